"""The reconcile loop against the in-memory backend: gate, full and partial syncs,
graceful termination, restarts, failures, dry run, coalescing."""

from __future__ import annotations

import threading
import time
from typing import Any, Sequence

import pytest

from svcproxy.diff import Exclusions
from svcproxy.ipvs.backend import BackendError, MemoryBackend
from svcproxy.kube.translate import NodeInfo, TranslateConfig
from svcproxy.model import Destination, OpKind, Operation, OperationResult, Protocol, ServiceKey, Table, VirtualService
from svcproxy.kube.store import Kind
from svcproxy.reconcile import Proxier, ProxierConfig


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def service(name: str, ip: str, *ports: tuple[str, int, str], ns: str = "default", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": ns, "uid": f"uid-{name}", "resourceVersion": "1"},
        "spec": {"type": "ClusterIP", "clusterIP": ip, "clusterIPs": [ip], "ipFamilies": ["IPv4"],
                 "ports": [{"name": n, "port": p, "protocol": proto, "targetPort": n} for n, p, proto in ports],
                 **spec},
        "status": {"loadBalancer": {}},
    }


def eps(svc: str, ips: Sequence[str], *ports: tuple[str, int, str], ns: str = "default", suffix: str = "a",
        node: str = "node-a", terminating: Sequence[str] = ()) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
        "metadata": {"name": f"{svc}-{suffix}", "namespace": ns, "labels": {"kubernetes.io/service-name": svc}},
        "ports": [{"name": n, "port": p, "protocol": proto} for n, p, proto in ports],
        "endpoints": [{"addresses": [ip], "nodeName": node,
                       "conditions": {"ready": ip not in terminating, "serving": True,
                                      "terminating": ip in terminating}} for ip in ips],
    }


WEB = ServiceKey(Protocol.TCP, "10.96.0.20", 80)
DNS_UDP = ServiceKey(Protocol.UDP, "10.96.0.10", 53)


def make(backend: MemoryBackend | Any = None, clock: Clock | None = None, **cfg: Any) -> tuple[Proxier, Clock]:
    clock = clock or Clock()
    config = ProxierConfig(translate=TranslateConfig(node=NodeInfo("node-a", ("192.168.0.10",))), **cfg)
    p = Proxier(backend if backend is not None else MemoryBackend(), config, clock=clock, monotonic=clock)
    return p, clock


def load(p: Proxier, web_ips: Sequence[str] = ("10.244.1.1", "10.244.1.2")) -> None:
    p.on_event(Kind.SERVICE, "ADDED", service("web", "10.96.0.20", ("http", 80, "TCP")))
    p.on_event(Kind.ENDPOINT_SLICE, "ADDED", eps("web", web_ips, ("http", 8080, "TCP")))
    p.on_event(Kind.SERVICE, "ADDED", service("dns", "10.96.0.10", ("dns", 53, "UDP")))
    p.on_event(Kind.ENDPOINT_SLICE, "ADDED", eps("dns", ["10.244.2.1"], ("dns", 53, "UDP")))
    p.on_synced(Kind.SERVICE)
    p.on_synced(Kind.ENDPOINT_SLICE)


def dests(backend: MemoryBackend, key: ServiceKey) -> dict[str, int]:
    return {d.address: d.weight for d in backend.read().services[key].destinations}


def test_nothing_is_programmed_before_both_lists_synced() -> None:
    backend = MemoryBackend()
    p, _ = make(backend)
    p.on_event(Kind.SERVICE, "ADDED", service("web", "10.96.0.20", ("http", 80, "TCP")))
    p.on_synced(Kind.SERVICE)
    result = p.sync()
    assert result.skipped and backend.applied == []
    assert not p.health.ready


def test_first_sync_programs_everything_and_second_changes_nothing() -> None:
    backend = MemoryBackend()
    p, clock = make(backend)
    load(p)
    result = p.sync()
    assert result.full and result.failed == 0
    assert dests(backend, WEB) == {"10.244.1.1": 1, "10.244.1.2": 1}
    assert dests(backend, DNS_UDP) == {"10.244.2.1": 1}
    assert p.health.ready
    clock.t += 60
    again = p.sync()
    assert again.full and again.operations == ()


def test_restart_with_rules_in_place_touches_nothing() -> None:
    backend = MemoryBackend()
    first, _ = make(backend)
    load(first)
    first.sync()
    applied_before = len(backend.applied)
    second, _ = make(backend)
    load(second)
    result = second.sync()
    assert result.operations == ()
    assert len(backend.applied) == applied_before


def test_endpoint_change_is_a_partial_sync_of_that_service_only() -> None:
    backend = MemoryBackend()
    p, clock = make(backend)
    load(p)
    p.sync()
    clock.t += 2
    p.on_event(Kind.ENDPOINT_SLICE, "MODIFIED", eps("dns", ["10.244.2.9"], ("dns", 53, "UDP")))
    result = p.sync()
    assert not result.full
    assert [(op.kind, op.destination.address if op.destination else None) for op in result.operations] == [
        (OpKind.DELETE_DESTINATION, "10.244.2.1"),  # UDP: deleted at once, no drain
        (OpKind.ADD_DESTINATION, "10.244.2.9"),
    ]
    assert dests(backend, DNS_UDP) == {"10.244.2.9": 1}


def test_deleted_service_is_removed() -> None:
    backend = MemoryBackend()
    p, clock = make(backend)
    load(p)
    p.sync()
    clock.t += 2
    p.on_event(Kind.SERVICE, "DELETED", service("dns", "10.96.0.10", ("dns", 53, "UDP")))
    result = p.sync()
    assert not result.full
    assert DNS_UDP not in backend.read().services and WEB in backend.read().services


def set_conns(backend: MemoryBackend, key: ServiceKey, address: str, active: int, inactive: int = 0) -> None:
    vs = backend.table.services[key]
    new = [Destination(d.address, d.port, d.weight, d.forward, active, inactive) if d.address == address else d
           for d in vs.destinations]
    backend.table = Table({**backend.table.services, key: vs.with_destinations(new)})


def test_graceful_termination_drains_tcp_then_deletes() -> None:
    backend = MemoryBackend()
    p, clock = make(backend, graceful_timeout=600)
    load(p)
    p.sync()
    set_conns(backend, WEB, "10.244.1.2", active=3)
    clock.t += 2
    p.on_event(Kind.ENDPOINT_SLICE, "MODIFIED", eps("web", ["10.244.1.1"], ("http", 8080, "TCP")))
    p.sync()
    assert dests(backend, WEB) == {"10.244.1.1": 1, "10.244.1.2": 0}  # drained, not cut
    assert p.draining == [(WEB, "10.244.1.2", 8080)]
    clock.t += 30
    p.sync(force_full=True)  # still 3 connections: kept
    assert dests(backend, WEB) == {"10.244.1.1": 1, "10.244.1.2": 0}
    set_conns(backend, WEB, "10.244.1.2", active=0, inactive=0)
    clock.t += 30
    p.sync(force_full=True)
    assert dests(backend, WEB) == {"10.244.1.1": 1}
    assert p.draining == []


def test_draining_makes_full_syncs_no_more_frequent_than_every_30_s() -> None:
    """Under steady endpoint churn something always drains, and each full sync reads
    and compares the whole table: at the default --sync-period (30 s) a drain does not
    bring the next full sync forward; with a longer period drains are still checked
    every 30 s."""
    for sync_period, first_full in ((30.0, 30), (300.0, 30)):
        backend = MemoryBackend()
        p, clock = make(backend, sync_period=sync_period)
        load(p)
        assert p.sync().full
        set_conns(backend, WEB, "10.244.1.2", active=3)
        clock.t += 2
        p.on_event(Kind.ENDPOINT_SLICE, "MODIFIED", eps("web", ["10.244.1.1"], ("http", 8080, "TCP")))
        assert not p.sync().full and p.draining
        clock.t = 1000.0 + 15  # a full sync here would only find the same connections
        p.on_event(Kind.ENDPOINT_SLICE, "MODIFIED", eps("web", ["10.244.1.1", "10.244.1.3"], ("http", 8080, "TCP")))
        assert not p.sync().full
        clock.t = 1000.0 + first_full
        assert p.sync().full


def test_graceful_timeout_deletes_busy_server() -> None:
    backend = MemoryBackend()
    p, clock = make(backend, graceful_timeout=100)
    load(p)
    p.sync()
    set_conns(backend, WEB, "10.244.1.2", active=1, inactive=5)
    clock.t += 2
    p.on_event(Kind.ENDPOINT_SLICE, "MODIFIED", eps("web", ["10.244.1.1"], ("http", 8080, "TCP")))
    p.sync()
    clock.t += 50
    p.sync(force_full=True)
    assert "10.244.1.2" in dests(backend, WEB)
    clock.t += 60
    p.sync(force_full=True)
    assert dests(backend, WEB) == {"10.244.1.1": 1}


def test_drained_server_that_comes_back_is_restored() -> None:
    backend = MemoryBackend()
    p, clock = make(backend)
    load(p)
    p.sync()
    set_conns(backend, WEB, "10.244.1.2", active=2)
    clock.t += 2
    p.on_event(Kind.ENDPOINT_SLICE, "MODIFIED", eps("web", ["10.244.1.1"], ("http", 8080, "TCP")))
    p.sync()
    clock.t += 2
    p.on_event(Kind.ENDPOINT_SLICE, "MODIFIED", eps("web", ["10.244.1.1", "10.244.1.2"], ("http", 8080, "TCP")))
    result = p.sync()
    assert [op.kind for op in result.operations] == [OpKind.EDIT_DESTINATION]
    assert dests(backend, WEB) == {"10.244.1.1": 1, "10.244.1.2": 1}
    assert p.draining == []


def test_restart_mid_drain_adopts_the_drain() -> None:
    backend = MemoryBackend()
    p, clock = make(backend)
    load(p)
    p.sync()
    set_conns(backend, WEB, "10.244.1.2", active=4)
    clock.t += 2
    p.on_event(Kind.ENDPOINT_SLICE, "MODIFIED", eps("web", ["10.244.1.1"], ("http", 8080, "TCP")))
    p.sync()
    restarted, clock2 = make(backend, graceful_timeout=100)
    load(restarted, web_ips=["10.244.1.1"])
    result = restarted.sync()
    assert result.operations == ()  # the weight-0 server is neither reset nor cut
    assert restarted.draining == [(WEB, "10.244.1.2", 8080)]
    clock2.t += 101
    restarted.sync(force_full=True)
    assert dests(backend, WEB) == {"10.244.1.1": 1}


class FlakyBackend(MemoryBackend):
    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.reject: set[str] = set()

    def read(self, counts: bool | None = None) -> Table:
        if self.down:
            raise BackendError("Can't initialize ipvs: Protocol not available")
        return super().read()

    def apply(self, ops: Sequence[Operation]) -> list[OperationResult]:
        bad = [op for op in ops if op.destination is not None and op.destination.address in self.reject]
        failed = super().apply([op for op in ops if op not in bad])
        return failed + [OperationResult(op, "Memory allocation problem") for op in bad]


def test_backend_unavailable_is_retried_without_crashing() -> None:
    backend = FlakyBackend()
    p, clock = make(backend)
    load(p)
    backend.down = True
    result = p.sync()
    assert result.skipped and "initialize" in result.skipped
    assert not p.health.ready
    backend.down = False
    clock.t += 2
    assert p.sync().failed == 0
    assert WEB in backend.read().services and p.health.ready


def test_failed_operations_are_counted_and_retried() -> None:
    backend = FlakyBackend()
    backend.reject = {"10.244.1.2"}
    p, clock = make(backend)
    load(p)
    result = p.sync()
    assert result.failed == 1
    assert p.metrics.failed_operations.labels("add-destination")._value.get() == 1
    assert not p.health.ready  # the first full sync did not fully succeed
    backend.reject = set()
    clock.t += 2
    retry = p.sync()  # partial, with nothing dirty: only the retry
    assert not retry.full and len(retry.operations) == 1
    assert dests(backend, WEB) == {"10.244.1.1": 1, "10.244.1.2": 1}


def test_drift_is_repaired_by_the_next_full_sync() -> None:
    backend = MemoryBackend()
    p, clock = make(backend, exclusions=Exclusions.parse(["192.0.2.0/24"]))
    load(p)
    p.sync()
    foreign_in = VirtualService(ServiceKey(Protocol.TCP, "192.0.2.5", 80))
    foreign_out = VirtualService(ServiceKey(Protocol.TCP, "198.51.100.5", 80))
    remaining = {k: v for k, v in backend.table.services.items() if k != WEB}
    remaining[foreign_in.key] = foreign_in
    remaining[foreign_out.key] = foreign_out
    backend.table = Table(remaining)
    clock.t += 31
    p.sync()
    keys = set(backend.read().services)
    assert WEB in keys and foreign_in.key in keys and foreign_out.key not in keys


def test_dry_run_changes_nothing(caplog: pytest.LogCaptureFixture) -> None:
    backend = MemoryBackend()
    p, _ = make(backend, dry_run=True)
    load(p)
    with caplog.at_level("INFO"):
        result = p.sync()
    assert len(result.operations) == 5
    assert backend.applied == [] and len(backend.read()) == 0
    assert "dry run: would apply 5 operations" in caplog.text and "+ TCP  10.96.0.20:80" in caplog.text


def test_health_follows_queue_and_sync() -> None:
    backend = MemoryBackend()
    p, clock = make(backend, sync_period=30)
    load(p)
    clock.t += 61
    assert p.health.proxy_healthy()[0] is False  # queued 61 s ago, never synced (timeout 2 x 30 s)
    p.sync()
    assert p.health.proxy_healthy()[0] is True


def test_problems_are_counted_once() -> None:
    p, clock = make()
    load(p)
    p.on_event(Kind.ENDPOINT_SLICE, "ADDED", eps("web", ["bogus"], ("http", 8080, "TCP"), suffix="b"))
    p.sync()
    clock.t += 31
    p.sync()
    assert p.metrics.input_problems.labels("invalid-ip")._value.get() == 1


def node(address: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a", "labels": {}},
            "status": {"addresses": [{"type": "InternalIP", "address": address},
                                     {"type": "Hostname", "address": "node-a"}]}}


def test_node_change_triggers_full_sync_with_new_addresses() -> None:
    backend = MemoryBackend()
    clock = Clock()
    p = Proxier(backend, ProxierConfig(translate=TranslateConfig(node=NodeInfo("node-a"))), clock=clock, monotonic=clock)
    p.on_event(Kind.NODE, "ADDED", node("192.168.0.10"))
    load(p)
    p.on_event(Kind.SERVICE, "ADDED", service("np", "10.96.0.30", ("http", 80, "TCP"), type="NodePort"))
    p.sync()
    p.on_event(Kind.SERVICE, "MODIFIED", {**service("np", "10.96.0.30", ("http", 80, "TCP")),
                                          "spec": {**service("np", "10.96.0.30", ("http", 80, "TCP"))["spec"],
                                                   "type": "NodePort",
                                                   "ports": [{"name": "http", "port": 80, "protocol": "TCP",
                                                              "targetPort": 80, "nodePort": 30080}]}})
    clock.t += 2
    p.sync()
    assert ServiceKey(Protocol.TCP, "192.168.0.10", 30080) in backend.read().services
    p.on_event(Kind.NODE, "MODIFIED", node("192.168.0.11"))
    clock.t += 2
    result = p.sync()
    assert result.full and result.translated == 3  # the Node feeds translation: everything again
    keys = set(backend.read().services)
    assert ServiceKey(Protocol.TCP, "192.168.0.11", 30080) in keys
    assert ServiceKey(Protocol.TCP, "192.168.0.10", 30080) not in keys
    p.on_event(Kind.NODE, "MODIFIED", {**node("192.168.0.11"), "metadata": {
        "name": "node-a", "deletionTimestamp": "2026-11-25T00:00:00Z"}})
    clock.t += 2
    p.sync()
    assert p.health.node_eligible is False


def test_burst_of_events_is_coalesced_by_the_loop() -> None:
    backend = MemoryBackend()
    clock_wall = time.monotonic
    config = ProxierConfig(translate=TranslateConfig(node=NodeInfo("node-a")), min_sync_period=0.3, sync_period=60)
    p = Proxier(backend, config, monotonic=clock_wall)
    load(p)
    stop = threading.Event()
    loop = threading.Thread(target=p.run, args=(stop,), daemon=True)
    loop.start()
    try:
        deadline = time.monotonic() + 10
        # The first full sync done, not started (full_syncs counts it before it applies).
        while WEB not in backend.read().services and time.monotonic() < deadline:
            time.sleep(0.01)
        for i in range(1000):
            ips = [f"10.244.3.{i % 200 + 1}", f"10.244.4.{i % 200 + 1}"]
            p.on_event(Kind.ENDPOINT_SLICE, "MODIFIED", eps("web", ips, ("http", 8080, "TCP")))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if dests(backend, WEB).keys() >= {"10.244.3.200", "10.244.4.200"}:
                break
            time.sleep(0.02)
    finally:
        stop.set()
        loop.join(5)
    assert {a for a, w in dests(backend, WEB).items() if w == 1} == {"10.244.3.200", "10.244.4.200"}
    assert p.partial_syncs <= 5, p.partial_syncs  # 1,000 events, a handful of syncs


# --- Pod namespaces (share-NS replicate mode) ------------------------------------------

from svcproxy.podns.netns import NamespaceGone  # noqa: E402
from svcproxy.reconcile import Target  # noqa: E402


class GoneBackend(MemoryBackend):
    def read(self, counts: bool | None = None) -> Table:
        raise NamespaceGone("/var/run/netns/pod-x: No such file or directory")


def test_pod_namespaces_get_the_pod_visible_table_and_incremental_updates() -> None:
    node_backend, pod_a, pod_b = MemoryBackend(), MemoryBackend(), MemoryBackend()
    p, clock = make(node_backend)
    load(p)
    p.on_event(Kind.SERVICE, "ADDED", {**service("np", "10.96.0.30", ("http", 80, "TCP")), "spec": {
        **service("np", "10.96.0.30", ("http", 80, "TCP"))["spec"], "type": "NodePort",
        "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 80, "nodePort": 30080}]}})
    prepared: list[set[ServiceKey]] = []
    rechecks: list[str] = []
    p.attach(Target("/run/netns/a", pod_a, prepare=lambda t: prepared.append(set(t.services)),
                    recheck=lambda: rechecks.append("a")))
    p.attach(Target("/run/netns/b", pod_b))
    p.sync()
    node_keys = set(node_backend.read().services)
    assert ServiceKey(Protocol.TCP, "192.168.0.10", 30080) in node_keys
    pod_keys = node_keys - {ServiceKey(Protocol.TCP, "192.168.0.10", 30080)}
    assert set(pod_a.read().services) == pod_keys == set(pod_b.read().services)
    assert prepared == [pod_keys]
    assert p.pod_targets == ["/run/netns/a", "/run/netns/b"]

    clock.t += 2
    applied = (len(pod_a.applied), len(pod_b.applied))
    p.on_event(Kind.ENDPOINT_SLICE, "MODIFIED", eps("dns", ["10.244.2.1", "10.244.2.2"], ("dns", 53, "UDP")))
    result = p.sync()
    assert not result.full
    assert len(pod_a.applied) - applied[0] == 1 and len(pod_b.applied) - applied[1] == 1  # one op each
    assert dests(pod_b, DNS_UDP) == {"10.244.2.1": 1, "10.244.2.2": 1}
    # the hook's recheck comes with full syncs only: never on the fan-out of a change
    assert rechecks == ["a"]
    assert p.sync(force_full=True).full and rechecks == ["a", "a"]


def test_vanished_namespace_is_detached_and_failing_one_does_not_block_others() -> None:
    node_backend, healthy = MemoryBackend(), MemoryBackend()
    broken = FlakyBackend()
    broken.down = True
    p, clock = make(node_backend)
    load(p)
    p.attach(Target("/run/netns/gone", GoneBackend()))
    p.attach(Target("/run/netns/broken", broken))
    p.attach(Target("/run/netns/ok", healthy))
    result = p.sync()
    assert result.skipped is None
    assert WEB in node_backend.read().services and WEB in healthy.read().services
    assert p.pod_targets == ["/run/netns/broken", "/run/netns/ok"]  # "gone" detached quietly
    broken.down = False
    clock.t += 5  # past the broken namespace's backoff
    p.sync()
    assert WEB in broken.read().services


def test_attached_namespace_restart_adopts_existing_table() -> None:
    pod, node_backend = MemoryBackend(), MemoryBackend()
    p, _ = make(node_backend)
    load(p)
    p.attach(Target("/run/netns/a", pod))
    p.sync()
    before = len(pod.applied)
    restarted, _ = make(node_backend)
    load(restarted)
    restarted.attach(Target("/run/netns/a", pod))
    assert restarted.sync().operations == ()
    assert len(pod.applied) == before


def test_nodeport_addresses_follow_the_node_and_are_reread_at_full_syncs(caplog: pytest.LogCaptureFixture) -> None:
    found = [("192.168.0.10", "192.168.7.7")]
    backend = MemoryBackend()
    p, clock = make(backend, node_address_source=lambda: found[0], sync_period=30.0)
    svc = service("np", "10.96.0.30", ("http", 80, "TCP"), type="NodePort")
    svc["spec"]["ports"][0]["nodePort"] = 30080
    p.on_event(Kind.SERVICE, "ADDED", svc)
    p.on_event(Kind.ENDPOINT_SLICE, "ADDED", eps("np", ["10.244.1.1"], ("http", 8080, "TCP")))
    p.on_synced(Kind.SERVICE)
    p.on_synced(Kind.ENDPOINT_SLICE)
    caplog.set_level("INFO")
    p.sync()
    node_ports = {k.address for k in backend.read().services if k.port == 30080}
    assert node_ports == {"192.168.0.10", "192.168.7.7"}
    assert "NodePorts served on 192.168.0.10, 192.168.7.7 (--nodeport-addresses)" in caplog.text
    found[0] = ("192.168.0.10",)  # an address went away: noticed at the next full sync, not before
    clock.t += 1
    p.sync()
    assert {k.address for k in backend.read().services if k.port == 30080} == {"192.168.0.10", "192.168.7.7"}
    clock.t += 31
    p.sync()
    assert {k.address for k in backend.read().services if k.port == 30080} == {"192.168.0.10"}
    # A failing read keeps what was found before.
    def broken() -> tuple[str, ...]:
        raise OSError("netlink: no buffer space")
    object.__setattr__(p.config, "node_address_source", broken)
    clock.t += 31
    p.sync()
    assert "cannot read the node's addresses for NodePorts (keeping 192.168.0.10)" in caplog.text
    assert {k.address for k in backend.read().services if k.port == 30080} == {"192.168.0.10"}


def test_nodeport_addresses_primary_serves_the_nodes_primary_ips_only() -> None:
    backend = MemoryBackend()
    p, _ = make(backend, primary_node_ips=True)
    two = node("192.168.0.10")
    two["status"]["addresses"].insert(1, {"type": "InternalIP", "address": "192.168.0.11"})
    p.on_event(Kind.NODE, "ADDED", two)
    svc = service("np", "10.96.0.30", ("http", 80, "TCP"), type="NodePort")
    svc["spec"]["ports"][0]["nodePort"] = 30080
    p.on_event(Kind.SERVICE, "ADDED", svc)
    p.on_synced(Kind.SERVICE)
    p.on_synced(Kind.ENDPOINT_SLICE)
    p.sync()
    assert {k.address for k in backend.read().services if k.port == 30080} == {"192.168.0.10"}


def test_unavailable_backend_is_retried_with_backoff_not_in_a_hot_loop() -> None:
    class Counting(MemoryBackend):
        calls = 0

        def read(self, counts: bool | None = None) -> Table:
            Counting.calls += 1
            raise BackendError("ipvsadm: Can't initialize ipvs: Protocol not available")

    config = ProxierConfig(translate=TranslateConfig(node=NodeInfo("node-a", ("192.168.0.10",))),
                           min_sync_period=0.0, sync_period=30.0, retry_backoff=0.2)
    p = Proxier(Counting(), config)
    load(p)
    stop = threading.Event()
    thread = threading.Thread(target=p.run, args=(stop,), daemon=True)
    thread.start()
    time.sleep(1.0)
    stop.set()
    p.request_sync()
    thread.join(5)
    # 0.2 + 0.4 (+ 0.8 would be at 1.4 s): three attempts, where the loop used to spin
    # thousands of times a second.
    assert 2 <= Counting.calls <= 4, Counting.calls
    assert p.metrics.sync_errors._value.get() == Counting.calls


def test_agent_waits_for_the_node_so_a_restart_keeps_its_nodeports() -> None:
    svc = service("np", "10.96.0.30", ("http", 80, "TCP"), type="NodePort")
    svc["spec"]["ports"][0]["nodePort"] = 30080
    node_port = ServiceKey(Protocol.TCP, "192.168.0.77", 30080)
    kept = VirtualService(node_port, "rr", None, (), (Destination("10.244.1.1", 8080, 1),))
    backend = MemoryBackend(Table({node_port: kept}))
    config = ProxierConfig(translate=TranslateConfig(node=NodeInfo("node-a")), wait_for_node=True)
    p = Proxier(backend, config)
    p.on_event(Kind.SERVICE, "ADDED", svc)
    p.on_event(Kind.ENDPOINT_SLICE, "ADDED", eps("np", ["10.244.1.1"], ("http", 8080, "TCP")))
    p.on_synced(Kind.SERVICE)
    p.on_synced(Kind.ENDPOINT_SLICE)
    assert p.sync().skipped  # the Node (with the address) has not been listed yet
    assert backend.applied == []
    p.on_event(Kind.NODE, "ADDED", {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a"},
                                    "status": {"addresses": [{"type": "InternalIP", "address": "192.168.0.77"}]}})
    p.on_synced(Kind.NODE)
    assert p.sync().failed == 0
    assert node_port in backend.read().services
    assert not any(op.kind is OpKind.DELETE_SERVICE for op in backend.applied)


def test_idle_full_syncs_translate_nothing_and_still_repair_drift() -> None:
    backend = MemoryBackend()
    p, clock = make(backend)
    load(p)
    assert p.sync().translated == 2
    clock.t += 31
    idle = p.sync()
    assert idle.full and idle.translated == 0 and idle.operations == ()
    # drift in the kernel is found by the full sync's read, not by translation
    backend.table = Table({k: v for k, v in backend.table.services.items() if k != WEB})
    clock.t += 31
    repaired = p.sync()
    assert repaired.full and repaired.translated == 0
    assert [op.kind for op in repaired.operations] == [OpKind.ADD_SERVICE, OpKind.ADD_DESTINATION,
                                                        OpKind.ADD_DESTINATION]
    assert dests(backend, WEB) == {"10.244.1.1": 1, "10.244.1.2": 1}


def test_full_sync_translates_only_what_changed_since_the_last() -> None:
    backend = MemoryBackend()
    p, clock = make(backend, min_sync_period=0)
    load(p)
    p.sync()
    p.on_event(Kind.ENDPOINT_SLICE, "MODIFIED", eps("dns", ["10.244.2.9"], ("dns", 53, "UDP")))
    clock.t += 31  # the change is picked up by a due full sync
    result = p.sync()
    assert result.full and result.translated == 1
    assert dests(backend, DNS_UDP) == {"10.244.2.9": 1}
    assert dests(backend, WEB) == {"10.244.1.1": 1, "10.244.1.2": 1}


def test_virtual_service_claimed_twice_moves_to_the_survivor() -> None:
    """Two Services with one ClusterIP:port (bad input): one owns it; when the owner
    goes, the other's real servers take over in the same sync."""
    backend = MemoryBackend()
    p, clock = make(backend)
    load(p)
    shared = ServiceKey(Protocol.TCP, "10.96.0.50", 80)
    ips = {"one": "10.244.5.1", "two": "10.244.5.2"}
    for name, ip in ips.items():
        p.on_event(Kind.SERVICE, "ADDED", service(name, "10.96.0.50", ("http", 80, "TCP")))
        p.on_event(Kind.ENDPOINT_SLICE, "ADDED", eps(name, [ip], ("http", 8080, "TCP")))
    p.sync()
    assert p.metrics.input_problems.labels("duplicate-virtual-service")._value.get() >= 1
    (owner_ip,) = dests(backend, shared)
    owner = next(n for n, ip in ips.items() if ip == owner_ip)
    survivor = next(n for n in ips if n != owner)
    clock.t += 2
    p.on_event(Kind.SERVICE, "DELETED", service(owner, "10.96.0.50", ("http", 80, "TCP")))
    handed = p.sync()  # the loser claims the freed virtual service at once
    assert not handed.full and handed.translated == 1
    assert dests(backend, shared) == {ips[survivor]: 1, ips[owner]: 0}  # the old one drains
    clock.t += 31
    result = p.sync()
    assert result.full and result.translated == 3  # everything, while claims collided
    assert dests(backend, shared) == {ips[survivor]: 1}
    clock.t += 31
    assert p.sync().translated == 0  # no collision left: back to incremental


def test_orphan_slices_are_still_reported_by_incremental_full_syncs() -> None:
    p, clock = make()
    load(p)
    p.sync()
    p.on_event(Kind.ENDPOINT_SLICE, "ADDED", eps("ghost", ["10.244.7.7"], ("http", 8080, "TCP")))
    clock.t += 2
    p.sync()  # partial: a Service may be on its way, nothing said yet
    assert p.metrics.input_problems.labels("orphan-slice")._value.get() == 0
    clock.t += 31
    result = p.sync()
    assert result.full and result.translated == 0
    assert p.metrics.input_problems.labels("orphan-slice")._value.get() == 1
    clock.t += 31
    p.sync()
    assert p.metrics.input_problems.labels("orphan-slice")._value.get() == 1  # said once


class SpawnFails(MemoryBackend):
    """What the ipvsadm backend met when the program could not start (ENOEXEC, EAGAIN)
    before that became a BackendError: any other exception out of the backend."""

    def __init__(self) -> None:
        super().__init__()
        self.broken = True

    def read(self, counts: bool | None = None) -> Table:
        if self.broken:
            raise OSError(8, "Exec format error")
        return super().read()


def test_an_unexpected_error_of_the_node_backend_is_retried_with_backoff_not_fatal() -> None:
    backend = SpawnFails()
    p, clock = make(backend, retry_backoff=1.0)
    load(p)
    result = p.sync()
    assert result.skipped and "Exec format error" in result.skipped
    assert p.metrics.sync_errors._value.get() == 1 and not p.health.ready
    backend.broken = False
    clock.t += 1.5
    assert p.sync().full and dests(backend, WEB) == {"10.244.1.1": 1, "10.244.1.2": 1}


def test_one_pod_namespace_that_cannot_be_prepared_stops_nothing_else() -> None:
    node_backend, pod_ok, pod_bad = MemoryBackend(), MemoryBackend(), MemoryBackend()
    p, clock = make(node_backend)
    load(p)

    def fails(_table: Table) -> None:
        raise OSError(11, "Resource temporarily unavailable")

    p.attach(Target("/run/netns/ok", pod_ok))
    p.attach(Target("/run/netns/bad", pod_bad, prepare=fails))
    result = p.sync()
    assert result.full and result.failed == 1
    assert WEB in node_backend.read().services and WEB in pod_ok.read().services
    assert len(pod_bad.read()) == 0 and p.pod_targets == ["/run/netns/bad", "/run/netns/ok"]


def test_a_virtual_service_moving_between_services_in_one_batch_is_not_lost() -> None:
    """An externalIP moves from beta to alpha (alpha sorts first) in one batch: every
    changed Service lets go before any claims, so alpha gets it in that sync."""
    backend = MemoryBackend()
    p, clock = make(backend)
    load(p)
    moving = ServiceKey(Protocol.TCP, "203.0.113.7", 80)

    def svc(name: str, ip: str, external: bool) -> dict[str, Any]:
        return service(name, ip, ("http", 80, "TCP"), externalIPs=["203.0.113.7"] if external else [])

    for name, ip, ext in (("alpha", "10.96.0.1", False), ("beta", "10.96.0.2", True)):
        p.on_event(Kind.SERVICE, "ADDED", svc(name, ip, ext))
        p.on_event(Kind.ENDPOINT_SLICE, "ADDED", eps(name, [f"10.244.9.{ip[-1]}"], ("http", 8080, "TCP")))
    p.sync()
    assert dests(backend, moving) == {"10.244.9.2": 1}
    clock.t += 2
    p.on_event(Kind.SERVICE, "MODIFIED", svc("alpha", "10.96.0.1", True))
    p.on_event(Kind.SERVICE, "MODIFIED", svc("beta", "10.96.0.2", False))
    result = p.sync()
    assert not result.full and dests(backend, moving) == {"10.244.9.1": 1, "10.244.9.2": 0}  # beta's drains
    assert p.metrics.input_problems.labels("duplicate-virtual-service")._value.get() == 0


class FailsOnce(MemoryBackend):
    def __init__(self) -> None:
        super().__init__()
        self.fail_next_apply = False

    def apply(self, ops: Sequence[Operation]) -> list[OperationResult]:
        if self.fail_next_apply:
            self.fail_next_apply = False
            raise BackendError("netlink socket closed")
        return super().apply(ops)


def test_a_deletion_in_a_failed_sync_is_not_forgotten_by_the_retry() -> None:
    backend = FailsOnce()
    p, clock = make(backend, retry_backoff=1.0)
    load(p)
    p.sync()
    clock.t += 2
    p.on_event(Kind.SERVICE, "DELETED", service("dns", "10.96.0.10", ("dns", 53, "UDP")))
    backend.fail_next_apply = True
    assert p.sync().skipped
    clock.t += 2
    retry = p.sync()
    assert DNS_UDP not in backend.read().services, retry
    assert WEB in backend.read().services


def test_a_gone_namespace_detaches_only_the_target_that_went() -> None:
    """The CNI server re-attaches a path while the loop syncs the old namespace under
    it: the old one's NamespaceGone must not detach the new one."""
    p, _ = make()
    load(p)
    new = Target("/run/netns/pod", MemoryBackend())

    class Replaced(MemoryBackend):
        def read(self, counts: bool | None = None) -> Table:
            p.attach(new)  # re-attached meanwhile
            raise NamespaceGone("/run/netns/pod now names another namespace")

    p.attach(Target("/run/netns/pod", Replaced()))
    p.sync()
    assert p.pod_targets == ["/run/netns/pod"] and p._targets["/run/netns/pod"] is new


def test_no_local_endpoints_is_counted_like_kube_proxy() -> None:
    """Services whose Local policy finds nothing on this node while the cluster has
    endpoints, by policy and family; a Service with no endpoint at all is not one."""
    p, _ = make()
    nodeport = {"type": "NodePort", "externalTrafficPolicy": "Local",
                "ports": [{"name": "http", "port": 80, "protocol": "TCP", "nodePort": 30080}]}
    p.on_event(Kind.SERVICE, "ADDED", service("ext", "10.96.0.30", ("http", 80, "TCP"), **nodeport))
    p.on_event(Kind.ENDPOINT_SLICE, "ADDED", eps("ext", ["10.244.3.1"], ("http", 8080, "TCP"), node="node-b"))
    p.on_event(Kind.SERVICE, "ADDED", service("int", "10.96.0.31", ("http", 80, "TCP"),
                                              internalTrafficPolicy="Local"))
    p.on_event(Kind.ENDPOINT_SLICE, "ADDED", eps("int", ["10.244.3.2"], ("http", 8080, "TCP"), node="node-b"))
    p.on_event(Kind.SERVICE, "ADDED", service("empty", "10.96.0.32", ("http", 80, "TCP"), **nodeport))
    p.on_event(Kind.SERVICE, "ADDED", service("here", "10.96.0.33", ("http", 80, "TCP"), **nodeport))
    p.on_event(Kind.ENDPOINT_SLICE, "ADDED", eps("here", ["10.244.1.9"], ("http", 8080, "TCP")))
    p.on_synced(Kind.SERVICE)
    p.on_synced(Kind.ENDPOINT_SLICE)
    p.sync()
    gauge = p.metrics.no_local_endpoints
    assert gauge.labels("external", "IPv4")._value.get() == 1
    assert gauge.labels("internal", "IPv4")._value.get() == 1
    assert gauge.labels("external", "IPv6")._value.get() == 0
    p.on_event(Kind.ENDPOINT_SLICE, "MODIFIED", eps("ext", ["10.244.1.8"], ("http", 8080, "TCP")))
    p.sync()
    assert gauge.labels("external", "IPv4")._value.get() == 0
