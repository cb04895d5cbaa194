"""The collector policy of the agent (svcproxy/gcpause.py): the heap alive after a full
sync is frozen, partial syncs freeze nothing, and garbage is still collected, both
what died before a freeze and cycles that were frozen alive and died later."""

from __future__ import annotations

import gc
import weakref
from typing import Any, Iterator

import pytest

from svcproxy.agent import Agent, AgentConfig
from svcproxy.gcpause import LongLivedHeap
from svcproxy.ipvs.backend import MemoryBackend
from svcproxy.kube.store import Kind
from svcproxy.kube.translate import NodeInfo, TranslateConfig
from svcproxy.reconcile import Proxier, ProxierConfig

from test_reconcile import Clock, eps, service


class Cycle:
    """One tracked object referring to itself: only the cyclic collector frees it."""

    __slots__ = ("me", "__weakref__")

    def __init__(self) -> None:
        self.me = self


@pytest.fixture(autouse=True)
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()


def frozen(obj: Any) -> bool:
    """Tracked by the collector, yet in none of its generations: in the permanent one."""
    return gc.is_tracked(obj) and all(o is not obj for o in gc.get_objects())


def feed(proxier: Proxier, n: int, generation: int = 0) -> None:
    for i in range(n):
        if not generation:
            proxier.on_event(Kind.SERVICE, "ADDED", service(f"s{i}", f"10.96.1.{i + 1}", ("http", 80, "TCP")))
        proxier.on_event(Kind.ENDPOINT_SLICE, "MODIFIED" if generation else "ADDED",
                         eps(f"s{i}", [f"10.1.{generation}.{i + 1}"], ("http", 8080, "TCP")))


def test_the_agent_freezes_the_heap_after_a_full_sync_and_not_after_a_partial_one() -> None:
    agent = Agent(AgentConfig(node_name="node-a", health_bind="127.0.0.1:0", healthcheck_bind_host="127.0.0.1"),
                  MemoryBackend())
    proxier = agent.proxier
    feed(proxier, 5)
    for kind in Kind:
        proxier.on_synced(kind)
    before = [object()]
    assert gc.get_freeze_count() == 0
    assert proxier.sync().full
    assert gc.get_freeze_count() > 0 and frozen(before)
    after = [object()]
    feed(proxier, 5, generation=1)
    result = proxier.sync()
    assert not result.full and result.operations
    assert not frozen(after)


def test_only_full_syncs_that_ran_call_the_hook() -> None:
    calls: list[bool] = []
    clock = Clock()
    backend = MemoryBackend()
    proxier = Proxier(backend, ProxierConfig(translate=TranslateConfig(node=NodeInfo("node-a", ("192.168.0.10",)))),
                      after_full_sync=lambda: calls.append(True), clock=clock, monotonic=clock)
    assert proxier.sync().skipped  # not initialized: no sync, no call
    feed(proxier, 2)
    for kind in (Kind.SERVICE, Kind.ENDPOINT_SLICE):
        proxier.on_synced(kind)
    assert proxier.sync().full and calls == [True]
    feed(proxier, 2, generation=1)
    clock.t += 1
    assert not proxier.sync().full and calls == [True]
    clock.t += 60
    assert proxier.sync().full and calls == [True, True]


def test_garbage_not_yet_collected_at_a_freeze_is_collected_not_frozen() -> None:
    gc.disable()
    try:
        dead = weakref.ref(Cycle())  # garbage, waiting for the collector
        live = Cycle()
        LongLivedHeap().after_full_sync()
        assert dead() is None
        assert frozen(live)
    finally:
        gc.enable()


def test_garbage_after_a_freeze_is_collected() -> None:
    LongLivedHeap().after_full_sync()
    dead = weakref.ref(Cycle())
    gc.collect()
    assert dead() is None


def test_cycles_frozen_alive_are_collected_once_the_heap_has_grown() -> None:
    heap = LongLivedHeap(growth=0.25)
    heap.after_full_sync()
    base = heap.baseline
    assert base is not None and heap.full_collections == 1
    old = [Cycle() for _ in range(base // 10)]  # alive at the next freeze, dead after it
    refs = [weakref.ref(c) for c in old[:100]]
    heap.after_full_sync()
    assert heap.full_collections == 1 and frozen(old[0])
    del old
    gc.collect()
    assert all(r() is not None for r in refs)  # frozen: out of the collector's reach, for now
    new = [Cycle() for _ in range(base // 5)]  # what churn built since: the heap grows past 25%
    heap.after_full_sync()
    assert heap.full_collections == 2
    assert all(r() is None for r in refs)
    assert frozen(new[0]) and heap.baseline is not None and heap.baseline < base + len(new) + base // 20
