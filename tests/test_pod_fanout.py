"""Many Pod namespaces (replicate mode) against in-memory tables: namespaces whose
tables are equal share one plan; one that differs (drifted, failed, just attached)
is planned for alone and joins the others again once it is equal."""

from __future__ import annotations

from typing import Any, Sequence

import pytest

from svcproxy.ipvs.backend import BackendError, MemoryBackend
from svcproxy.kube.store import Kind
from svcproxy.model import Destination, Operation, OperationResult, Table
from svcproxy.reconcile import Proxier, Target
from svcproxy.reconcile import fanout as fanout_module
from test_reconcile import WEB, FlakyBackend, dests, eps, load, make


def attach(p: Proxier, backends: Sequence[MemoryBackend]) -> list[Target]:
    out = [Target(f"/run/netns/p{i}", b) for i, b in enumerate(backends)]
    for t in out:
        p.attach(t)
    return out


def scale_web(p: Proxier, *ips: str) -> None:
    p.on_event(Kind.ENDPOINT_SLICE, "MODIFIED", eps("web", ips, ("http", 8080, "TCP")))


@pytest.fixture
def diffs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many diffs the loop computed for Pod namespaces (one entry per call)."""
    calls: list[int] = []
    real = fanout_module.diff

    def counting(*args: Any, **kwargs: Any) -> list[Operation]:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(fanout_module, "diff", counting)
    return calls


def test_equal_namespaces_share_one_plan_and_one_image(diffs: list[int]) -> None:
    p, clock = make()
    load(p)
    backends = [MemoryBackend() for _ in range(4)]
    pods = attach(p, backends)
    p.sync()  # first sync: every namespace read and planned on its own
    assert all(t.actual is pods[0].actual for t in pods)  # then they hold one image
    scale_web(p, "10.244.1.1", "10.244.1.2", "10.244.1.3")
    clock.t += 2
    diffs.clear()
    result = p.sync()
    assert not result.full
    assert len(diffs) == 1  # one for all four namespaces
    for b in backends:
        assert dests(b, WEB) == {"10.244.1.1": 1, "10.244.1.2": 1, "10.244.1.3": 1}
        assert b.applied[-1].destination is not None and b.applied[-1].destination.address == "10.244.1.3"
    assert len(result.operations) == 5  # one operation per table
    assert all(t.actual is pods[0].actual for t in pods)
    assert pods[0].actual == Table({k: v for k, v in p.desired.services.items() if k.port != 30080})


class Reads(MemoryBackend):
    """Counts the reads of its table."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def read(self, counts: bool | None = None) -> Table:
        self.reads += 1
        return super().read(counts)


def weights(backend: MemoryBackend) -> dict[str, int]:
    """The web Service's real servers in a table, without reading it."""
    return {d.address: d.weight for d in backend.table.services[WEB].destinations}


def test_a_drifted_namespace_is_repaired_at_its_read_alone_and_joins_again(diffs: list[int]) -> None:
    """Namespaces are read afresh one at a time, never in the node's full sync, so a
    drifted one is repaired at its turn; then it shares the others' image again."""
    node = Reads()
    p, clock = make(node)
    load(p)
    backends = [Reads() for _ in range(3)]
    pods = attach(p, backends)
    p.sync()
    assert [b.reads for b in backends] == [1, 1, 1]
    # someone deletes a real server in one namespace: its table differs from its image
    web = backends[1].table.services[WEB]
    backends[1].table = Table({**backends[1].table.services,
                               WEB: web.with_destinations(d for d in web.destinations if d.address != "10.244.1.2")})
    clock.t += 31
    assert p.sync().full and node.reads == 2
    assert [b.reads for b in backends] == [1, 1, 1]  # the node's full sync reads no namespace
    assert p.runner._idle_timeout() <= 1.0  # reads are due: the loop wakes for them
    seen = []
    for _ in range(3):
        assert not p.sync().full
        seen.append([b.reads for b in backends])
        clock.t += p.config.pod_read_interval
    assert seen == [[2, 1, 1], [2, 2, 1], [2, 2, 2]]  # one namespace per sync, in turn
    assert dests(backends[1], WEB) == {"10.244.1.1": 1, "10.244.1.2": 1}
    assert [str(op) for op in backends[1].applied[-1:]] == [
        "add-destination tcp://10.96.0.20:80 -> 10.244.1.2:8080 weight=1 forward=masq"]
    assert all(t.actual is pods[0].actual for t in pods)  # equal again: one image
    assert p.runner._idle_timeout() > 1.0  # nothing due: the loop sleeps until the next full sync
    scale_web(p, "10.244.1.1")
    clock.t += 2
    diffs.clear()
    p.sync()
    assert len(diffs) == 1
    for b in backends:  # TCP: drained at weight 0 in every table
        assert dests(b, WEB) == {"10.244.1.1": 1, "10.244.1.2": 0}


def test_changes_reach_every_namespace_in_the_nodes_full_sync() -> None:
    """Not read then, the namespaces are still compared (with their images) in full."""
    p, clock = make()
    load(p)
    backends = [Reads() for _ in range(2)]
    attach(p, backends)
    p.sync()
    scale_web(p, "10.244.1.7")
    clock.t += 31
    assert p.sync().full
    assert all(b.reads == 1 and dests(b, WEB) == {"10.244.1.7": 1, "10.244.1.1": 0, "10.244.1.2": 0}
               for b in backends)


class Refusing(MemoryBackend):
    """A namespace where the kernel rejects some real servers, or every write."""

    def __init__(self) -> None:
        super().__init__()
        self.reject: set[str] = set()
        self.down = False

    def apply(self, ops: Sequence[Operation]) -> list[OperationResult]:
        if self.down:
            raise BackendError("netlink: Operation not permitted")
        bad = [op for op in ops if op.destination is not None and op.destination.address in self.reject]
        failed = super().apply([op for op in ops if op not in bad])
        return failed + [OperationResult(op, "Memory allocation problem") for op in bad]


def test_a_failing_namespace_holds_back_neither_the_node_nor_the_others(diffs: list[int]) -> None:
    node = MemoryBackend()
    p, clock = make(node)
    load(p)
    good = [MemoryBackend(), MemoryBackend()]
    partly, broken = Refusing(), Refusing()
    pods = attach(p, [good[0], partly, broken, good[1]])
    p.sync()
    assert all(t.actual is pods[0].actual for t in pods)

    partly.reject = {"10.244.1.3"}
    broken.down = True
    scale_web(p, "10.244.1.1", "10.244.1.2", "10.244.1.3")
    clock.t += 2
    result = p.sync()
    assert result.failed == 2  # one rejected operation, one namespace that could not be written
    want = {"10.244.1.1": 1, "10.244.1.2": 1, "10.244.1.3": 1}
    assert dests(node, WEB) == want
    assert dests(good[0], WEB) == want == dests(good[1], WEB)
    assert dests(partly, WEB) == {"10.244.1.1": 1, "10.244.1.2": 1}
    assert pods[0].actual is pods[3].actual
    assert pods[1].actual is not pods[0].actual and pods[1].retry == {WEB}
    assert pods[2].needs_full and pods[2].failures == 1
    assert p.metrics.sync_errors._value.get() == 1

    # the next change: the healthy ones still share a plan; the failing ones are on their own
    partly.reject = set()
    broken.down = False
    scale_web(p, "10.244.1.1", "10.244.1.2", "10.244.1.3", "10.244.1.4")
    clock.t += 2  # past the broken namespace's backoff
    diffs.clear()
    result = p.sync()
    assert result.failed == 0
    assert len(diffs) == 3  # the shared pair, the one with a retry, the one read again
    want["10.244.1.4"] = 1
    for b in (node, *good, partly, broken):
        assert dests(b, WEB) == want
    assert all(t.actual is pods[0].actual for t in pods)  # all equal again: one image


def test_dry_run_shares_a_plan_but_changes_nothing() -> None:
    p, clock = make(dry_run=True)
    load(p)
    backends = [MemoryBackend() for _ in range(3)]
    attach(p, backends)
    p.sync()
    scale_web(p, "10.244.1.1", "10.244.1.2", "10.244.1.3")
    clock.t += 2
    p.sync()
    assert all(b.applied == [] and len(b.table) == 0 for b in backends)


def test_a_namespace_with_a_virtual_service_of_its_own_stays_alone() -> None:
    """Equality is by value: a table with more in it never shares the others' image."""
    from svcproxy.diff import Exclusions
    from svcproxy.model import Protocol, ServiceKey, VirtualService

    p, clock = make(exclusions=Exclusions.parse(["192.0.2.0/24"]))
    load(p)
    foreign = VirtualService(ServiceKey(Protocol.TCP, "192.0.2.5", 80), destinations=(Destination("10.1.1.1", 80),))
    backends = [MemoryBackend(), MemoryBackend(Table.of([foreign])), MemoryBackend()]
    pods = attach(p, backends)
    p.sync()
    assert pods[0].actual is pods[2].actual and pods[1].actual is not pods[0].actual
    scale_web(p, "10.244.1.1", "10.244.1.2", "10.244.1.3")
    clock.t += 2
    p.sync()
    assert foreign.key in backends[1].table.services
    assert all(dests(b, WEB) == {"10.244.1.1": 1, "10.244.1.2": 1, "10.244.1.3": 1} for b in backends)


def test_equal_reads_share_one_plan(diffs: list[int]) -> None:
    """New namespaces (all empty) and a restarted agent's (all programmed) are read
    equal: one diff for all of them."""
    node = MemoryBackend()
    p, _ = make(node)
    load(p)
    backends = [MemoryBackend() for _ in range(4)]
    attach(p, backends)
    p.sync()
    assert len(diffs) == 1  # one for the four empty namespaces
    assert all(len(b.applied) == len(backends[0].applied) > 0 for b in backends)
    diffs.clear()
    restarted, _ = make(node)
    load(restarted)
    attach(restarted, backends)
    assert restarted.sync().operations == ()
    assert len(diffs) == 1


def test_equal_reads_with_different_connections_drain_each_on_its_own() -> None:
    """Connection counts take no part in equality, so a plan that deletes real
    servers (drains decide on the counts) is never shared between reads."""
    p, _ = make()
    load(p, web_ips=("10.244.1.1",))
    drained = Destination("10.244.1.9", 8080, weight=0)
    backends = [MemoryBackend(), MemoryBackend()]
    attach(p, backends)
    p.sync()
    for b, conns in zip(backends, (0, 3)):  # a real server draining in both, with or without connections
        web = b.table.services[WEB]
        b.table = Table({**b.table.services, WEB: web.with_destinations(
            (*web.destinations, Destination(drained.address, drained.port, 0, drained.forward, conns, 0)))})
    restarted, _ = make()
    load(restarted, web_ips=("10.244.1.1",))
    attach(restarted, backends)
    restarted.sync()
    assert dests(backends[0], WEB) == {"10.244.1.1": 1}  # no connections left: deleted
    assert dests(backends[1], WEB) == {"10.244.1.1": 1, "10.244.1.9": 0}  # still draining


def test_shared_drains_end_once_every_namespace_read_shows_no_connections() -> None:
    """A real server drains at weight 0 in every namespace; the namespaces are read in
    turn, and it is deleted from all of them (their images stay one) only once each
    read showed it without connections."""
    p, clock = make()
    load(p)
    backends = [Reads() for _ in range(3)]
    pods = attach(p, backends)
    p.sync()
    scale_web(p, "10.244.1.1")
    clock.t += 2
    p.sync()
    assert all(weights(b) == {"10.244.1.1": 1, "10.244.1.2": 0} for b in backends)
    # one namespace still has a connection through the leaving real server
    busy = backends[2].table.services[WEB]
    backends[2].table = Table({**backends[2].table.services, WEB: busy.with_destinations(
        Destination(d.address, d.port, d.weight, d.forward, 1 if d.address == "10.244.1.2" else 0, 0)
        for d in busy.destinations)})
    clock.t += 30
    for _ in range(4):  # the node's full sync, then each namespace read in turn
        p.sync()
        clock.t += p.config.pod_read_interval
    assert [b.reads for b in backends] == [2, 2, 2]
    assert all(weights(b) == {"10.244.1.1": 1, "10.244.1.2": 0} for b in backends)
    assert all(t.actual is pods[0].actual for t in pods)  # no namespace went its own way
    backends[2].table = Table({**backends[2].table.services, WEB: busy})  # the connection ended
    clock.t += 30
    for _ in range(5):
        p.sync()
        clock.t += p.config.pod_read_interval
    assert [b.reads for b in backends] == [3, 3, 3]
    assert all(weights(b) == {"10.244.1.1": 1} for b in backends)
    assert all(t.actual is pods[0].actual for t in pods)


def test_shared_drains_end_at_the_graceful_timeout() -> None:
    p, clock = make(graceful_timeout=100)
    load(p)
    backends = [MemoryBackend() for _ in range(2)]
    attach(p, backends)
    p.sync()
    scale_web(p, "10.244.1.1")
    clock.t += 2
    p.sync()
    clock.t += 101
    p.sync()  # the node's full sync: no namespace read, yet the drain is over
    assert all(weights(b) == {"10.244.1.1": 1} for b in backends)


def test_namespaces_get_the_pod_visible_table_through_partial_syncs_node_changes_and_failures() -> None:
    """The Pod-visible part of the desired table is kept key by key between full
    translations: after every kind of sync each namespace holds exactly it."""
    from svcproxy.podns.visible import pod_visible
    from test_reconcile import service

    node = FlakyBackend()
    p, clock = make(node)
    load(p)
    nodeport = service("np", "10.96.0.30", ("http", 80, "TCP"), type="NodePort")
    nodeport["spec"]["ports"][0]["nodePort"] = 30080
    p.on_event(Kind.SERVICE, "ADDED", nodeport)
    p.on_event(Kind.ENDPOINT_SLICE, "ADDED", eps("np", ["10.244.3.1"], ("http", 8080, "TCP")))
    backends = [MemoryBackend() for _ in range(3)]
    attach(p, backends)

    def node_object(ip: str) -> dict[str, Any]:
        return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a", "labels": {}},
                "status": {"addresses": [{"type": "InternalIP", "address": ip}]}}

    def serving(table: Table) -> dict[str, list[str]]:  # drains end on their own schedules per table
        return {str(k): sorted(d.address for d in vs.destinations if d.weight) for k, vs in table.services.items()}

    def check() -> None:
        expected = pod_visible(node.read(), p.node_addresses())
        assert any(k.port == 30080 for k in node.read().services)  # the NodePort is the node's only
        assert not any(k.port == 30080 for k in expected.services)
        for b in backends:
            assert serving(b.read()) == serving(expected)

    p.on_event(Kind.NODE, "ADDED", node_object("192.168.0.10"))
    p.sync()
    check()
    scale_web(p, "10.244.1.1", "10.244.1.9")
    clock.t += 1
    assert not p.sync().full
    check()
    p.on_event(Kind.NODE, "MODIFIED", node_object("192.168.0.11"))  # the NodePort moves
    clock.t += 1
    assert p.sync().full
    check()
    node.down = True
    scale_web(p, "10.244.1.5")
    p.on_event(Kind.SERVICE, "DELETED", service("dns", "10.96.0.10", ("dns", 53, "UDP")))
    clock.t += 60  # a full sync, whose read fails
    assert p.sync().skipped
    node.down = False
    clock.t += 5
    p.sync()
    check()
    assert serving(backends[0].read()) == {"tcp://10.96.0.20:80": ["10.244.1.5"], "tcp://10.96.0.30:80": ["10.244.3.1"]}


def test_without_pod_namespaces_the_loop_keeps_no_pod_table() -> None:
    """Node only, nothing reads the Pod-visible table: the keys translation changes are
    not gathered for it sync after sync (they would grow with every Service ever seen)."""
    p, clock = make()
    load(p)
    p.sync()
    for i in range(5):
        scale_web(p, f"10.244.1.{i + 10}")
        clock.t += 1
        p.sync()
    assert p._pod_desired is None and not p._pod_dirty
