"""Full syncs taken a slice at a time: changes that arrive meanwhile are applied before
the comparison ends, and the kernel still ends equal to the desired table."""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from typing import Any, Callable, Sequence

from svcproxy.diff import diff
from svcproxy.ipvs.backend import MemoryBackend
from svcproxy.kube.store import Kind
from svcproxy.model import Destination, OpKind, Operation, OperationResult, Protocol, ServiceKey, Table, VirtualService
from svcproxy.podns.visible import visible_in_pods
from svcproxy.reconcile import Proxier
from svcproxy.reconcile.targets import Target
from svcproxy.reconcile.sweep import Sweep
from test_reconcile import WEB, dests, eps, make, service, set_conns


class Recording(MemoryBackend):
    """The in-memory kernel; keeps each plan applied, and runs ``after_read`` once
    after the next read (an event arriving while a full sync compares)."""

    def __init__(self) -> None:
        super().__init__()
        self.plans: list[list[Operation]] = []
        self.reads = 0
        self.reads_before: list[int] = []  # for each plan: how many reads came before it
        self.after_read: Callable[[], None] | None = None

    def read(self, counts: bool | None = None) -> Table:
        table = super().read(counts)
        self.reads += 1
        hook, self.after_read = self.after_read, None
        if hook is not None:
            hook()
        return table

    def apply(self, ops: Sequence[Operation]) -> list[OperationResult]:
        self.plans.append(list(ops))
        self.reads_before.append(self.reads)
        return super().apply(ops)


def key(i: int) -> ServiceKey:
    return ServiceKey(Protocol.UDP, f"10.96.0.{i + 1}", 53)


# UDP: a removed real server goes at once (no drain), so tables compare simply.
def cluster(n: int) -> tuple[Proxier, Recording, Any]:
    backend = Recording()
    p, clock = make(backend, min_sync_period=0.0)
    p.applier = replace(p.applier, slice_size=3)
    for i in range(n):
        p.on_event(Kind.SERVICE, "ADDED", service(f"s{i:02}", f"10.96.0.{i + 1}", ("dns", 53, "UDP")))
        p.on_event(Kind.ENDPOINT_SLICE, "ADDED", eps(f"s{i:02}", [f"10.244.{i}.1"], ("dns", 53, "UDP")))
    p.on_synced(Kind.SERVICE)
    p.on_synced(Kind.ENDPOINT_SLICE)
    assert p.sync().full
    clock.t += 1
    return p, backend, clock


def drift(backend: MemoryBackend, k: ServiceKey, address: str) -> None:
    """Someone else adds a real server to a virtual service in the kernel."""
    services = dict(backend.table.services)
    vs = services[k]
    services[k] = VirtualService(k, vs.scheduler, vs.persistence, vs.flags,
                                 vs.destinations + (Destination(address, 53, 1),))
    backend.table = Table(services)


def addresses(backend: MemoryBackend, k: ServiceKey) -> set[str]:
    return {d.address for d in backend.table.services[k].destinations}


def test_a_change_during_a_full_sync_is_applied_before_the_comparison_ends() -> None:
    p, backend, clock = cluster(12)
    drift(backend, key(8), "10.9.9.9")  # 10.96.0.9: compared in the last slice
    backend.after_read = lambda: p.on_event(
        Kind.ENDPOINT_SLICE, "MODIFIED", eps("s00", ["10.244.0.2"], ("dns", 53, "UDP")))
    backend.plans.clear()
    partial_before = p.partial_syncs

    result = p.sync(force_full=True)

    assert result.full and result.failed == 0
    assert p.partial_syncs == partial_before + 1  # the change went in between two slices
    change = next(i for i, plan in enumerate(backend.plans) if any(op.service == key(0) for op in plan))
    repair = next(i for i, plan in enumerate(backend.plans) if any(op.service == key(8) for op in plan))
    assert change < repair  # it did not wait for the whole comparison
    assert addresses(backend, key(0)) == {"10.244.0.2"}
    assert addresses(backend, key(8)) == {"10.244.8.1"}  # drift elsewhere still repaired
    assert backend.table == p.desired
    assert p.sync(force_full=True).operations == ()


def test_a_full_sync_with_nothing_arriving_is_one_plan_as_before() -> None:
    p, backend, clock = cluster(12)
    for i in (0, 5, 11):
        drift(backend, key(i), f"10.9.9.{i}")
    expected = diff(p.desired, backend.table)
    backend.plans.clear()

    result = p.sync(force_full=True)

    assert backend.plans == [expected] and list(result.operations) == expected
    assert backend.table == p.desired


def after_the_read(p: Proxier, kind: Kind, obj: dict[str, Any]) -> None:
    """The event arrives once the node's table was read (in the loop's thread, so
    that the partial sync it causes surely runs between two slices)."""

    def arrive(_desired: Table) -> None:
        p.node_target.prepare = None
        p.on_event(kind, "MODIFIED", obj)

    p.node_target.prepare = arrive


def test_drift_on_a_service_changed_during_the_sweep_is_repaired_by_that_full_sync() -> None:
    p, backend, clock = cluster(12)
    drift(backend, key(8), "10.9.9.9")  # 10.96.0.9: last in plan order
    after_the_read(p, Kind.ENDPOINT_SLICE, eps("s08", ["10.244.8.1", "10.244.8.2"], ("dns", 53, "UDP")))

    p.sync(force_full=True)

    # s08 had no write since the read: the partial sync compared it with the read.
    assert p.partial_syncs == 1
    assert addresses(backend, key(8)) == {"10.244.8.1", "10.244.8.2"}
    assert backend.table == p.desired


def test_drift_on_a_service_changing_during_every_full_sync_is_repaired() -> None:
    """A busy Deployment's Service changes during every full sync: its drift was never
    repaired when touched keys were only compared with the kept image."""
    p, backend, clock = cluster(12)
    drift(backend, key(8), "10.9.9.9")
    for n in range(3):
        backend.after_read = lambda n=n: p.on_event(
            Kind.ENDPOINT_SLICE, "MODIFIED", eps("s08", ["10.244.8.1", f"10.244.8.{10 + n}"], ("dns", 53, "UDP")))
        clock.t += 31
        assert p.sync().full
    assert "10.9.9.9" not in addresses(backend, key(8))
    assert backend.table == p.desired


class RejectMissing(Recording):
    """The kernel's answer to deleting a real server that is not there."""

    def apply(self, ops: Sequence[Operation]) -> list[OperationResult]:
        table = self.table.services
        bad = [op for op in ops if op.kind is OpKind.DELETE_DESTINATION and op.destination is not None
               and op.destination.key not in table[op.service].destination_map()]
        failed = super().apply([op for op in ops if op not in bad])
        return failed + [OperationResult(op, "No such destination") for op in bad]


def test_an_operation_failing_on_a_wrong_image_heals_at_a_full_sync_under_churn() -> None:
    """A virtual service waiting for a retry is in the scope of every partial sync in
    a full one: it was never compared with the read, and an operation failing because
    the kept image was wrong failed again at every sync while changes kept arriving."""
    backend = RejectMissing()
    p, clock = make(backend, min_sync_period=0.0)
    p.applier = replace(p.applier, slice_size=3)
    for i in range(12):
        p.on_event(Kind.SERVICE, "ADDED", service(f"s{i:02}", f"10.96.0.{i + 1}", ("dns", 53, "UDP")))
        p.on_event(Kind.ENDPOINT_SLICE, "ADDED", eps(f"s{i:02}", [f"10.244.{i}.1"], ("dns", 53, "UDP")))
    p.on_synced(Kind.SERVICE)
    p.on_synced(Kind.ENDPOINT_SLICE)
    p.sync()
    vs = backend.table.services[key(8)]  # someone removed s08's real server
    backend.table = Table({**backend.table.services, key(8): vs.with_destinations([])})
    clock.t += 1
    p.on_event(Kind.ENDPOINT_SLICE, "MODIFIED", eps("s08", ["10.244.8.2"], ("dns", 53, "UDP")))
    assert p.sync().failed == 1 and key(8) in p.node_target.retry
    clock.t += 31
    after_the_read(p, Kind.ENDPOINT_SLICE, eps("s00", ["10.244.0.9"], ("dns", 53, "UDP")))
    result = p.sync()
    assert result.full and p.partial_syncs == 2  # the change came in between two slices
    assert result.failed == 0 and key(8) not in p.node_target.retry
    assert backend.table == p.desired


def test_a_sweep_leaves_touched_keys_to_partial_syncs() -> None:
    keys = [key(i) for i in range(5)]
    table = Table({k: VirtualService(k) for k in keys})
    sweep = Sweep.start(table, Table(), Table())
    assert sweep.next_slice(2) == keys[:2]
    sweep.take_compared()
    image = Table({keys[2]: VirtualService(keys[2], scheduler="wrr")})
    seen = sweep.touch({keys[2], keys[0]}, image)
    assert keys[2] not in seen.services  # first touched since the read: the read (empty)
    assert sweep.touch({keys[2]}, image) is image  # touched before: the kept image
    assert sweep.next_slice(2) == keys[3:5] and sweep.finished


def test_changes_taken_by_a_full_sync_are_applied_before_the_kernel_read() -> None:
    p, backend, clock = cluster(12)
    p.on_event(Kind.ENDPOINT_SLICE, "MODIFIED", eps("s08", ["10.244.8.2"], ("dns", 53, "UDP")))
    backend.plans.clear()
    backend.reads_before.clear()
    reads = backend.reads

    result = p.sync(force_full=True)

    assert result.full and {op.service for op in result.operations} == {key(8)}
    assert backend.plans == [list(result.operations)] and backend.reads_before == [reads]  # before the read
    assert backend.reads == reads + 1 and addresses(backend, key(8)) == {"10.244.8.2"}
    assert backend.table == p.desired


class SlowRead(Recording):
    """A kernel read that takes a while: it sees the table as it was when it began,
    and meanwhile a watcher reports a change (``during``); it ends once a plan came
    in or after two seconds."""

    def __init__(self) -> None:
        super().__init__()
        self.during: Callable[[], None] | None = None
        self.applied_while_reading = 0
        self._reading = False

    def read(self, counts: bool | None = None) -> Table:
        table = super().read(counts)
        hook, self.during = self.during, None
        if hook is None:
            return table
        self._reading, plans = True, len(self.plans)
        hook()
        deadline = time.monotonic() + 2.0
        while len(self.plans) == plans and time.monotonic() < deadline:
            time.sleep(0.01)
        self._reading = False
        return table

    def apply(self, ops: Sequence[Operation]) -> list[OperationResult]:
        self.applied_while_reading += self._reading
        return super().apply(ops)


def test_a_change_is_applied_while_the_node_is_read_and_the_stale_read_undoes_nothing() -> None:
    backend = SlowRead()
    p, clock = make(backend, min_sync_period=0.0)
    for i in range(12):
        p.on_event(Kind.SERVICE, "ADDED", service(f"s{i:02}", f"10.96.0.{i + 1}", ("dns", 53, "UDP")))
        p.on_event(Kind.ENDPOINT_SLICE, "ADDED", eps(f"s{i:02}", [f"10.244.{i}.1"], ("dns", 53, "UDP")))
    p.on_synced(Kind.SERVICE)
    p.on_synced(Kind.ENDPOINT_SLICE)
    assert p.sync().full
    drift(backend, key(3), "10.9.9.9")
    backend.during = lambda: p.on_event(
        Kind.ENDPOINT_SLICE, "MODIFIED", eps("s00", ["10.244.0.2"], ("dns", 53, "UDP")))

    result = p.sync(force_full=True)

    assert backend.applied_while_reading == 1  # the change did not wait for the read
    # The read predates the change; comparing it would re-add 10.244.0.1 (or fail).
    assert result.failed == 0 and addresses(backend, key(0)) == {"10.244.0.2"}
    assert addresses(backend, key(3)) == {"10.244.3.1"}  # untouched drift repaired
    assert backend.table == p.desired


# --- Pod namespaces while partial syncs nest in the node's sweep ---------------------


def pod_desired(p: Proxier) -> Table:
    visible = visible_in_pods(p.node_addresses())
    return Table({k: v for k, v in p.desired.services.items() if visible(k)})


def cluster_with_pods(n: int, *pods: Target, **config: Any) -> tuple[Proxier, Recording, Any]:
    """``n`` UDP Services, the node and ``pods`` programmed by a first full sync."""
    backend = Recording()
    p, clock = make(backend, **{"min_sync_period": 0.0, **config})
    p.applier = replace(p.applier, slice_size=3)
    for i in range(n):
        p.on_event(Kind.SERVICE, "ADDED", service(f"s{i:02}", f"10.96.0.{i + 1}", ("dns", 53, "UDP")))
        p.on_event(Kind.ENDPOINT_SLICE, "ADDED", eps(f"s{i:02}", [f"10.244.{i}.1"], ("dns", 53, "UDP")))
    for t in pods:
        p.attach(t)
    p.on_synced(Kind.SERVICE)
    p.on_synced(Kind.ENDPOINT_SLICE)
    assert p.sync().full
    clock.t += 1
    return p, backend, clock


def test_a_change_nested_in_a_full_sync_reaches_every_pod_namespace_and_stays() -> None:
    pod_a, pod_b = Recording(), Recording()
    p, node, clock = cluster_with_pods(12, Target("a", pod_a), Target("b", pod_b))
    after_the_read(p, Kind.ENDPOINT_SLICE, eps("s00", ["10.244.0.2"], ("dns", 53, "UDP")))

    assert p.sync(force_full=True).full and p.partial_syncs == 1

    for b in (node, pod_a, pod_b):
        assert addresses(b, key(0)) == {"10.244.0.2"}
    assert node.table == p.desired and pod_a.table == pod_b.table == pod_desired(p)


def test_a_service_deleted_during_a_full_sync_is_programmed_again_nowhere() -> None:
    pod_a, pod_b = Recording(), Recording()
    p, node, clock = cluster_with_pods(12, Target("a", pod_a), Target("b", pod_b))

    def arrive(_desired: Table) -> None:
        p.node_target.prepare = None
        p.on_event(Kind.SERVICE, "DELETED", service("s05", "10.96.0.6", ("dns", 53, "UDP")))

    p.node_target.prepare = arrive
    p.sync(force_full=True)

    assert p.partial_syncs == 1
    assert all(key(5) not in b.table.services for b in (node, pod_a, pod_b))
    assert node.table == p.desired and pod_a.table == pod_b.table == pod_desired(p)


def test_a_pod_namespace_failing_in_a_nested_partial_sync_is_retried() -> None:
    pod_a, pod_b = Recording(), Recording()
    armed = {"fail": True}

    def prepare(desired: Table) -> None:
        vs = desired.services.get(key(0))
        if armed["fail"] and vs is not None and {d.address for d in vs.destinations} == {"10.244.0.2"}:
            armed["fail"] = False
            raise OSError(11, "Resource temporarily unavailable")

    p, node, clock = cluster_with_pods(12, Target("a", pod_a, prepare=prepare), Target("b", pod_b))
    after_the_read(p, Kind.ENDPOINT_SLICE, eps("s00", ["10.244.0.2"], ("dns", 53, "UDP")))

    p.sync(force_full=True)
    assert not armed["fail"] and p.partial_syncs == 1  # a failed in the nested partial sync
    assert addresses(pod_b, key(0)) == {"10.244.0.2"} and addresses(pod_a, key(0)) == {"10.244.0.1"}
    clock.t += 10  # past its backoff
    p.sync()

    assert addresses(pod_a, key(0)) == {"10.244.0.2"}, "the failed namespace never got the change"
    assert pod_a.table == pod_desired(p)


def test_dry_run_with_a_nested_partial_sync_changes_nothing() -> None:
    pod = Recording()
    p, node, clock = cluster_with_pods(12, Target("a", pod), dry_run=True)

    def arrive(_desired: Table) -> None:
        p.node_target.prepare = None
        p.on_event(Kind.ENDPOINT_SLICE, "MODIFIED", eps("s00", ["10.244.0.2"], ("dns", 53, "UDP")))
        p.on_event(Kind.SERVICE, "DELETED", service("s05", "10.96.0.6", ("dns", 53, "UDP")))

    p.node_target.prepare = arrive
    p.sync(force_full=True)

    assert p.partial_syncs == 1
    assert node.plans == [] and pod.plans == [] and len(node.table) == 0 and len(pod.table) == 0


def test_a_nested_partial_sync_keeps_min_sync_period_from_the_full_syncs_start() -> None:
    """Syncs are at least --min-sync-period apart: a change arriving as a full sync
    starts waits for the next chance past it (the clock stands still here), not
    synced at once because the sync before the full one was long ago."""
    p, node, clock = cluster_with_pods(12, min_sync_period=1.0)
    clock.t += 5
    after_the_read(p, Kind.ENDPOINT_SLICE, eps("s00", ["10.244.0.2"], ("dns", 53, "UDP")))
    p.sync(force_full=True)
    assert p.partial_syncs == 0 and p.changes.services_pending
    clock.t += 1
    p.sync()
    assert addresses(node, key(0)) == {"10.244.0.2"}


def test_an_endpoint_drained_by_a_nested_partial_sync_stays_drained_in_every_pod_namespace() -> None:
    pod_a, pod_b = Recording(), Recording()
    p, node, clock = cluster_with_pods(12, Target("a", pod_a), Target("b", pod_b))
    p.on_event(Kind.SERVICE, "ADDED", service("web", "10.96.0.20", ("http", 80, "TCP")))
    p.on_event(Kind.ENDPOINT_SLICE, "ADDED", eps("web", ["10.244.1.1", "10.244.1.2"], ("http", 8080, "TCP")))
    p.sync()
    clock.t += 1
    set_conns(pod_b, WEB, "10.244.1.2", active=3)
    after_the_read(p, Kind.ENDPOINT_SLICE, eps("web", ["10.244.1.1"], ("http", 8080, "TCP")))

    p.sync(force_full=True)

    # New connections never go to the terminating Pod: drained where connections
    # remain, deleted or drained where the read showed none.
    assert p.partial_syncs == 2
    assert dests(pod_b, WEB) == {"10.244.1.1": 1, "10.244.1.2": 0}
    assert dests(pod_a, WEB).get("10.244.1.2", 0) == 0 and dests(pod_a, WEB)["10.244.1.1"] == 1


def test_watchers_recording_while_full_syncs_sweep_leave_the_node_exact() -> None:
    node = Recording()
    p, clock = make(node, min_sync_period=0.0)
    p.applier = replace(p.applier, slice_size=2)
    n = 40
    for i in range(n):
        p.on_event(Kind.SERVICE, "ADDED", service(f"s{i:02}", f"10.96.0.{i + 1}", ("dns", 53, "UDP")))
        p.on_event(Kind.ENDPOINT_SLICE, "ADDED", eps(f"s{i:02}", [f"10.244.{i}.1"], ("dns", 53, "UDP")))
    p.on_synced(Kind.SERVICE)
    p.on_synced(Kind.ENDPOINT_SLICE)
    p.sync()
    stop = threading.Event()
    errors: list[BaseException] = []

    def watcher(offset: int) -> None:
        k = 0
        try:
            while not stop.is_set():
                i = (k * 7 + offset) % n
                if k % 11 == 0:
                    p.on_event(Kind.SERVICE, "DELETED", service(f"s{i:02}", f"10.96.0.{i + 1}", ("dns", 53, "UDP")))
                elif k % 11 == 1:
                    p.on_event(Kind.SERVICE, "ADDED", service(f"s{i:02}", f"10.96.0.{i + 1}", ("dns", 53, "UDP")))
                else:
                    p.on_event(Kind.ENDPOINT_SLICE, "MODIFIED",
                               eps(f"s{i:02}", [f"10.244.{i}.{k % 200 + 2}"], ("dns", 53, "UDP")))
                k += 1
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=watcher, args=(o,)) for o in (0, 3)]
    for t in threads:
        t.start()
    try:
        for r in range(30):
            clock.t += 1
            # at least one change arrives in every sweep, whatever the threads manage
            node.after_read = lambda r=r: p.on_event(
                Kind.ENDPOINT_SLICE, "MODIFIED", eps(f"s{r:02}", [f"10.244.{r}.250"], ("dns", 53, "UDP")))
            assert p.sync(force_full=True).skipped is None
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors
    assert p.partial_syncs >= 30  # changes did arrive between slices
    clock.t += 1
    p.sync()  # what is still pending: the sweeps left nothing for a full sync to repair
    assert node.table == p.desired
    clock.t += 1
    assert p.sync(force_full=True).operations == ()
