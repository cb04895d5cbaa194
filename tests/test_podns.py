"""Share-NS plumbing on the host: mode detection, namespace preparation, attach, scan.

This host's kernel has network namespaces and veth but no IPVS: the IPVS sysctls
are pointed at a directory of the test's own (``sysctl_dir``), IPVS tables are
in-memory backends, and everything else (namespace identity, loopback, addresses,
VIP routes through ``nsenter`` + ``ip -batch``) is real where the host allows it
(root and ``ip netns``). The dataplane itself is shown in the VM
(tests/kernel/test_share_ns.py).
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from k8s_objects import endpoint, endpoint_slice, node, service, slice_port, svc_port
from svcproxy import cli
from svcproxy.ipvs.backend import BackendError, MemoryBackend
from svcproxy.kube.store import Kind
from svcproxy.kube.translate import NodeInfo, TranslateConfig
from svcproxy.model import Destination, Family, Protocol, ServiceKey, Table, VirtualService
from svcproxy.podns.attach import (
    AttachResult,
    NsState,
    cleanup_namespace,
    in_namespace,
    read_state_here,
    PodNamespace,
    PodNamespaces,
    Preparer,
    Route,
    factory_like,
    ipvsadm_factory,
    kube_proxy_sysctls,
    netns_id,
    pod_target,
    pod_visible,
    sync_namespace,
    vips_of,
)
from svcproxy.podns.mode import Mode, ModeError, decide, decide_loaded, read_kernel_share
from svcproxy.podns.scan import NetnsScanner
from svcproxy.podns import netns
from svcproxy.podns.netns import NamespaceGone, NodeNamespace
from svcproxy.reconcile import Proxier, ProxierConfig, Target

NODE_IP = "192.168.49.2"
REAL_OWN_NETNS = netns.own_netns
# Most tests let this process's own namespace stand in for a Pod's (see conftest.py);
# the test of the refusal puts the real rule back.
pytestmark = pytest.mark.usefixtures("own_netns_as_pod")


def vs(address: str, port: int = 80, proto: Protocol = Protocol.TCP, *dests: str) -> VirtualService:
    return VirtualService(ServiceKey(proto, address, port), destinations=tuple(Destination(d, 8080) for d in dests))


# --------------------------------------------------------------------------------------
# mode detection


@pytest.fixture
def param(tmp_path: Path) -> Callable[[str | None], Path]:
    made = iter(range(1000))

    def make(value: str | None) -> Path:
        path = tmp_path / f"mode{next(made)}"
        if value is not None:
            path.write_text(value)
        return path

    return make


def test_kernel_share_mode_is_read_from_the_module_parameter(param: Callable[[str | None], Path]) -> None:
    assert read_kernel_share(param("2\n")).available
    assert not read_kernel_share(param("0\n")).available
    missing = read_kernel_share(param(None))
    assert not missing.available and "does not exist" in missing.detail


@pytest.mark.parametrize("value,requested,effective", [
    (None, "auto", Mode.REPLICATE), ("0", "auto", Mode.REPLICATE), ("1", "auto", Mode.REPLICATE),
    ("2", "auto", Mode.KERNEL), ("2", "kernel", Mode.KERNEL),
    (None, "replicate", Mode.REPLICATE), (None, "off", Mode.OFF), ("2", "off", Mode.OFF),
])
def test_decide(param: Callable[[str | None], Path], value: str | None, requested: str, effective: Mode) -> None:
    decision = decide(requested, param(value))
    assert decision.effective is effective
    assert decision.requested is Mode(requested)
    assert decision.describe()


@pytest.mark.parametrize("value", [None, "0", "1"])
def test_kernel_mode_is_refused_when_the_kernel_does_not_share(param: Callable[[str | None], Path],
                                                               value: str | None) -> None:
    with pytest.raises(ModeError, match="needs the share-namespace ip_vs"):
        decide("kernel", param(value))


def test_replicate_mode_is_refused_when_the_kernel_shares(param: Callable[[str | None], Path]) -> None:
    """A Pod namespace has no table of its own under mode=2: "syncing" it would act on
    the node's table (or be refused), so replicate stops before anything changes."""
    with pytest.raises(ModeError, match="--pod-netns-mode replicate cannot work here: .* reads '2'"):
        decide("replicate", param("2\n"))


def test_unknown_mode_is_rejected() -> None:
    with pytest.raises(ValueError):
        decide("bogus")


# --------------------------------------------------------------------------------------
# what preparation wants


@pytest.mark.parametrize("release,reuse", [("6.1.0-56-amd64", None), ("5.9.0", None), ("5.8.18", "0"),
                                           ("4.19.0-21-amd64", "0"), ("4.1.0", "0"), ("4.0.9", None),
                                           ("3.10.0-1160.el7.x86_64", None), ("garbage", None)])
def test_sysctls_follow_kube_proxy(release: str, reuse: str | None) -> None:
    wanted = kube_proxy_sysctls(release)
    assert wanted["conntrack"] == wanted["expire_nodest_conn"] == wanted["expire_quiescent_template"] == "1"
    assert wanted.get("conn_reuse_mode") == reuse


def test_vips_skip_fwmark_services_and_split_families() -> None:
    table = Table.of([vs("10.96.0.1"), vs("10.96.0.1", 53, Protocol.UDP), vs("fd00:96::1"),
                      VirtualService(ServiceKey(Protocol.TCP, "", 0, fwmark=7))])
    assert vips_of(table) == {Family.IPV4: frozenset({"10.96.0.1"}), Family.IPV6: frozenset({"fd00:96::1"})}


def test_vips_are_computed_once_per_table() -> None:
    """Every Pod namespace of a sync prepares against the same table: its VIPs are
    found once, not once per namespace; another table (the next sync's) is walked."""
    table = Table.of([vs("10.96.0.1"), vs("10.96.0.2")])
    first = vips_of(table)
    assert vips_of(table) is first
    other = Table.of([vs("10.96.0.1")])
    assert vips_of(other) == {Family.IPV4: frozenset({"10.96.0.1"}), Family.IPV6: frozenset()}
    assert vips_of(table) is not first and vips_of(table) == first


def test_pod_visible_leaves_out_node_ports() -> None:
    table = Table.of([vs("10.96.0.1"), vs(NODE_IP, 30080), vs("203.0.113.7")])
    assert set(pod_visible(table, (NODE_IP,)).services) == {ServiceKey(Protocol.TCP, "10.96.0.1", 80),
                                                           ServiceKey(Protocol.TCP, "203.0.113.7", 80)}


DEFAULT_SYSCTLS = {"conntrack": "0", "conn_reuse_mode": "1", "expire_nodest_conn": "0", "expire_quiescent_template": "0"}
SET_SYSCTLS = {"conntrack": "1", "conn_reuse_mode": "1", "expire_nodest_conn": "1", "expire_quiescent_template": "1"}
POD4, POD6 = "10.244.1.2", "fd00::2"


def ns_state(*, lo_up: bool = True, sources: dict[Family, str] | None = None, routes: set[Route] | None = None,
             sysctls: dict[str, str] | None = None) -> NsState:
    return NsState(lo_up, dict(sources if sources is not None else {Family.IPV4: POD4, Family.IPV6: POD6}),
                   set(routes or ()), dict(sysctls if sysctls is not None else DEFAULT_SYSCTLS))


class FakeNs:
    """Stands for one namespace: answers reads, takes sysctl writes in-process (the
    KernelIO role) and `ip -batch` through nsenter (the runner role)."""

    def __init__(self, state: NsState) -> None:
        self.state = state
        self.reads = 0
        self.sysctl_writes: list[dict[str, str]] = []
        self.calls: list[list[str]] = []
        self.stdin: list[str] = []
        self.apply_rc = 0
        self.apply_err = ""
        self.after_failed_apply: NsState | None = None
        self.sysctl_error: OSError | None = None

    def read(self, fd: int) -> NsState:
        assert os.fstat(fd)  # a live descriptor of the namespace
        self.reads += 1
        return NsState(self.state.lo_up, dict(self.state.sources), set(self.state.routes), dict(self.state.sysctls))

    def write_sysctls(self, fd: int, values: dict[str, str]) -> None:
        if self.sysctl_error is not None:
            raise self.sysctl_error
        self.sysctl_writes.append(dict(values))
        self.state.sysctls.update(values)

    def __call__(self, argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        assert argv[0] == "nsenter" and argv[1].startswith("--net=/proc/self/fd/")
        assert kw["pass_fds"] == (int(argv[1].rsplit("/", 1)[1]),)  # the descriptor reaches nsenter
        assert argv[2:] == ["ip", "-force", "-batch", "-"]
        self.calls.append(argv)
        self.stdin.append(kw.get("input") or "")
        if self.apply_rc and self.after_failed_apply is not None:
            self.state = self.after_failed_apply
        return subprocess.CompletedProcess(argv, self.apply_rc, "", self.apply_err)


@pytest.fixture
def own_ns() -> PodNamespace:
    """This process's own namespace file: always there, identity checks pass."""
    return PodNamespace.open("/proc/self/ns/net")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def preparer(ns: PodNamespace, fake: FakeNs, **kw: Any) -> Preparer:
    return Preparer(ns, runner=fake, io=fake, **kw)  # type: ignore[arg-type]


def test_prepare_reads_once_applies_once_then_costs_nothing(own_ns: PodNamespace) -> None:
    fake = FakeNs(ns_state(lo_up=False))
    clock = Clock()
    prep = preparer(own_ns, fake, kernel_release="6.1.0", clock=clock, recheck_period=30)
    table = Table.of([vs("10.96.0.1"), vs("10.96.0.1", 53, Protocol.UDP), vs("fd00:96::1")])

    prep(table)
    assert fake.reads == 1 and len(fake.calls) == 1
    assert fake.sysctl_writes == [{"conntrack": "1", "expire_nodest_conn": "1", "expire_quiescent_template": "1"}]
    assert fake.stdin[0].splitlines() == [
        "link set dev lo up",
        "route replace 10.96.0.1/32 dev lo src 10.244.1.2 proto 156 table main",
        "route replace local fd00:96::1/128 dev lo src fd00::2 proto 156 table main",
    ]
    for _ in range(5):
        prep(table)  # unchanged: nothing read, nothing run
    assert fake.reads == 1 and len(fake.calls) == 1

    prep(Table.of([vs("10.96.0.1"), vs("10.96.0.2")]))  # a new VIP, one gone: one `ip -batch`, no read
    assert fake.reads == 1 and len(fake.calls) == 2
    assert fake.stdin[-1].splitlines() == [
        "route del fd00:96::1/128 proto 156 table main",
        "route replace 10.96.0.2/32 dev lo src 10.244.1.2 proto 156 table main",
    ]
    assert len(fake.sysctl_writes) == 1  # sysctls already set

    clock.now += 31  # no read at a partial sync, however old the last read
    prep(Table.of([vs("10.96.0.1"), vs("10.96.0.2")]))
    assert fake.reads == 1
    prep.recheck()  # a full sync: read again (drift repair); nothing to do if there is none
    fake.state = ns_state(routes={Route("10.96.0.1", src=POD4), Route("10.96.0.2", src=POD4)}, sysctls=SET_SYSCTLS)
    prep(Table.of([vs("10.96.0.1"), vs("10.96.0.2")]))
    assert fake.reads == 2 and len(fake.calls) == 2
    prep.recheck()  # the next full sync, before recheck_period: no read
    prep(Table.of([vs("10.96.0.1"), vs("10.96.0.2")]))
    assert fake.reads == 2


def test_prepare_repairs_drift_found_at_recheck(own_ns: PodNamespace) -> None:
    fake = FakeNs(ns_state(sysctls={**SET_SYSCTLS, "conn_reuse_mode": "1"},
                           routes={Route("10.96.0.1", src=POD4), Route("10.96.9.9", src=POD4),
                                   Route("10.96.0.0/16", dev="eth0", table="100")}))
    prep = preparer(own_ns, fake, kernel_release="5.4.0")  # 4.1 <= 5.4 < 5.9: conn_reuse_mode=0
    prep(Table.of([vs("10.96.0.1")]))
    assert fake.sysctl_writes == [{"conn_reuse_mode": "0"}]
    assert fake.stdin[-1].splitlines() == [
        "route del 10.96.0.0/16 proto 156 table 100",  # ours by protocol number, wherever it is
        "route del 10.96.9.9/32 proto 156 table main",
    ]


def test_prepare_skips_a_family_without_a_pod_address(own_ns: PodNamespace) -> None:
    fake = FakeNs(ns_state(sources={Family.IPV6: POD6}, sysctls=SET_SYSCTLS))
    prep = preparer(own_ns, fake, kernel_release="6.1.0")
    prep(Table.of([vs("10.96.0.1"), vs("fd00:96::1")]))
    assert fake.stdin[0].splitlines() == ["route replace local fd00:96::1/128 dev lo src fd00::2 proto 156 table main"]


def test_a_refused_route_is_a_warning_a_refused_sysctl_an_error(own_ns: PodNamespace,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeNs(ns_state())
    fake.apply_rc, fake.apply_err = 1, "Error: Invalid prefsrc address.\nCommand failed -:2"
    # afterwards: sysctls and lo fine, the IPv6 route missing
    fake.after_failed_apply = ns_state(sysctls=SET_SYSCTLS, routes={Route("10.96.0.1", src=POD4)})
    prep = preparer(own_ns, fake, kernel_release="6.1.0")
    with caplog.at_level(logging.WARNING, "svcproxy.podns"):
        prep(Table.of([vs("10.96.0.1"), vs("fd00:96::1")]))  # no exception
    assert "still pending" in caplog.text and "Invalid prefsrc" in caplog.text
    calls = len(fake.calls)
    prep(Table.of([vs("10.96.0.1"), vs("fd00:96::1")]))
    assert len(fake.calls) == calls  # retried at the next recheck, not at every sync

    fake = FakeNs(ns_state())
    fake.sysctl_error = PermissionError(13, "Permission denied")
    prep = preparer(own_ns, fake, kernel_release="6.1.0")
    with pytest.raises(BackendError, match="sysctls not set"):
        prep(Table.of([vs("10.96.0.1")]))
    prep.checked_at = float("-inf")
    with pytest.raises(BackendError):
        prep(Table.of([vs("10.96.0.1")]))  # and tried again: nothing was remembered as done


def test_prepare_of_a_vanished_namespace_raises_namespace_gone(tmp_path: Path) -> None:
    link = tmp_path / "ns"
    link.symlink_to("/proc/self/ns/net")
    ns = PodNamespace.open(str(link))
    fake = FakeNs(ns_state())
    prep = preparer(ns, fake)
    link.unlink()
    with pytest.raises(NamespaceGone):
        prep(Table.of([vs("10.96.0.1")]))
    assert fake.calls == [] and fake.reads == 0


def test_a_file_that_is_not_a_namespace_is_not_attached(tmp_path: Path) -> None:
    (tmp_path / "plain").write_text("")
    with pytest.raises(NamespaceGone, match="not a namespace file"):
        netns_id(str(tmp_path / "plain"))
    with pytest.raises(NamespaceGone):
        netns_id(str(tmp_path / "missing"))


# --------------------------------------------------------------------------------------
# the backend factories


def test_ipvsadm_factory_runs_inside_the_pinned_namespace() -> None:
    seen: list[tuple[list[str], Any]] = []

    def runner(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        seen.append((argv, kw.get("pass_fds")))
        return subprocess.CompletedProcess(argv, 0, "", "")

    target = pod_target("/proc/self/ns/net", ipvsadm_factory("/sbin/ipvsadm", counts=False, runner=runner))
    assert target.pod and target.name == "/proc/self/ns/net"
    assert target.backend.read() == Table()
    (argv, fds), = seen
    assert argv[:2] == ["nsenter", f"--net=/proc/self/fd/{fds[0]}"] and argv[2:] == ["/sbin/ipvsadm", "-Sn"]


def test_factory_like_follows_the_node_backend() -> None:
    from svcproxy.ipvs.ipvsadm import IpvsadmBackend

    made = factory_like(IpvsadmBackend(binary="/opt/ipvsadm", counts=True))(f"/proc/self/fd/9", 9)
    assert isinstance(made, IpvsadmBackend) and made.binary == "/opt/ipvsadm" and made.counts
    assert made.netns == "/proc/self/fd/9"
    assert isinstance(factory_like(MemoryBackend())("/proc/self/fd/9", 9), IpvsadmBackend)
    try:
        from svcproxy.ipvs.netlink import NetlinkBackend
    except ImportError:  # another engineer's module, possibly not there
        return
    nl = factory_like(NetlinkBackend(window=64))("/proc/self/fd/9", 9)
    assert isinstance(nl, NetlinkBackend) and nl.netns == "/proc/self/fd/9" and nl.window == 64


def test_a_backend_error_after_the_namespace_vanished_is_namespace_gone(tmp_path: Path) -> None:
    link = tmp_path / "ns"
    link.symlink_to("/proc/self/ns/net")

    class Vanishing:
        def read(self, counts: bool | None = None) -> Table:
            link.unlink()  # deleted while we worked
            raise BackendError("nsenter: reassociate to namespace 'ns/net' failed: Invalid argument")

        def apply(self, ops: Any) -> list[Any]:
            raise BackendError("nope")

    target = pod_target(str(link), lambda path, fd: Vanishing())
    with pytest.raises(NamespaceGone):
        target.backend.read()
    # ...while a backend error in a namespace that is still there stays an error
    target = pod_target("/proc/self/ns/net", lambda path, fd: Vanishing())
    with pytest.raises(BackendError):
        target.backend.apply([])


# --------------------------------------------------------------------------------------
# the front door, with the reconcile loop


def cluster_objects() -> list[dict[str, Any]]:
    return [
        node("node-a", internal_ips=(NODE_IP,)),
        service("web", cluster_ips=("10.96.0.10",), type="NodePort",
                ports=[svc_port("http", 80, target_port=8080, node_port=30080)]),
        endpoint_slice("web", ports=[slice_port("http", 8080)], endpoints=[endpoint("10.244.1.2")]),
    ]


def make_proxier(node_backend: MemoryBackend) -> Proxier:
    proxier = Proxier(node_backend, ProxierConfig(translate=TranslateConfig(node=NodeInfo("node-a", (NODE_IP,)))),
                      monotonic=lambda: 0.0)
    for obj in cluster_objects():
        kind = {"Node": Kind.NODE, "Service": Kind.SERVICE, "EndpointSlice": Kind.ENDPOINT_SLICE}[obj["kind"]]
        proxier.on_event(kind, "ADDED", obj)
    proxier.on_synced(Kind.SERVICE)
    proxier.on_synced(Kind.ENDPOINT_SLICE)
    return proxier


class Tables:
    """A MemoryBackend per namespace identity: what a pod target's factory makes."""

    def __init__(self) -> None:
        self.by_id: dict[Any, MemoryBackend] = {}

    def target(self, path: str) -> Target:
        ident = netns_id(path)
        backend = self.by_id.setdefault(ident, MemoryBackend())
        return Target(path, PinnedMemory(PodNamespace(path, ident), backend), pod=True)


class PinnedMemory:
    def __init__(self, ns: PodNamespace, backend: MemoryBackend) -> None:
        self.ns, self.backend = ns, backend

    def read(self, counts: bool | None = None) -> Table:
        self.ns.check()
        return self.backend.read()

    def apply(self, ops: Any) -> list[Any]:
        self.ns.check()
        return self.backend.apply(ops)


@pytest.mark.parametrize("value,requested,expect", [
    (None, "auto", AttachResult.ATTACHED), ("2", "auto", AttachResult.SHARED),
    ("2", "kernel", AttachResult.SHARED), (None, "off", AttachResult.REFUSED),
])
def test_attach_follows_the_mode(param: Callable[[str | None], Path], value: str | None, requested: str,
                                 expect: AttachResult, tmp_path: Path) -> None:
    link = tmp_path / "pod"
    link.symlink_to("/proc/self/ns/net")
    node_backend = MemoryBackend()
    proxier = make_proxier(node_backend)
    tables = Tables()
    pods = PodNamespaces(proxier, decide(requested, param(value)), make_target=tables.target)

    assert pods.attach(str(link)) is expect
    proxier.sync()
    assert ServiceKey(Protocol.TCP, NODE_IP, 30080) in node_backend.table.services
    if expect is AttachResult.ATTACHED:
        assert proxier.pod_targets == [str(link)]
        pod_table = next(iter(tables.by_id.values())).table
        # the Pod-visible part only: the ClusterIP, not the NodePort
        assert set(pod_table.services) == {ServiceKey(Protocol.TCP, "10.96.0.10", 80)}
        assert pods.wait_attached(str(link), 0)
    else:
        # kernel mode: Pod namespaces get no tables (the kernel shares the node's);
        # off: not served at all
        assert proxier.pod_targets == [] and tables.by_id == {}
        assert pods.wait_attached(str(link), 0) is (expect is AttachResult.SHARED)
    assert pods.attach(str(tmp_path / "missing")) is (AttachResult.REFUSED if requested == "off"
                                                      else AttachResult.GONE)


def test_attach_is_idempotent_and_a_reused_name_is_attached_afresh(tmp_path: Path) -> None:
    proxier = make_proxier(MemoryBackend())
    made: list[str] = []
    tables = Tables()

    def make(path: str) -> Target:
        made.append(path)
        return tables.target(path)

    pods = PodNamespaces(proxier, decide("replicate"), make_target=make)
    link = tmp_path / "pod"
    link.symlink_to("/proc/self/ns/net")
    assert pods.attach(str(link)) is AttachResult.ATTACHED
    assert pods.attach(str(link)) is AttachResult.ATTACHED
    assert len(made) == 1
    link.unlink()
    link.symlink_to("/proc/self/ns/user")  # another namespace (of another type: fine for identity)
    assert pods.attach(str(link)) is AttachResult.ATTACHED
    assert len(made) == 2 and proxier.pod_targets == [str(link)]
    assert pods.known() == {str(link): netns_id(str(link))}
    assert pods.detach(str(link)) and not pods.detach(str(link))
    assert pods.known() == {}


def test_a_namespace_gone_mid_sync_is_dropped_quietly(tmp_path: Path) -> None:
    node_backend = MemoryBackend()
    proxier = make_proxier(node_backend)
    tables = Tables()
    pods = PodNamespaces(proxier, decide("replicate"), make_target=tables.target)
    links = []
    for name in ("a", "b", "c"):
        links.append(tmp_path / name)
        links[-1].symlink_to("/proc/self/ns/net")
        pods.attach(str(links[-1]))
    links[1].unlink()
    result = proxier.sync()
    assert result.failed == 0 and proxier.metrics.sync_errors._value.get() == 0
    assert proxier.pod_targets == [str(links[0]), str(links[2])]
    assert set(pods.known()) == {str(links[0]), str(links[2])}
    assert node_backend.table.services  # the node is synced as usual


# --------------------------------------------------------------------------------------
# CLI: plan and sync with --pod-netns (kernel mode, off, a missing namespace)


@pytest.fixture
def cluster_file(tmp_path: Path) -> Path:
    path = tmp_path / "cluster.json"
    path.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": cluster_objects()}))
    return path


def run_cli(*argv: str, backend: MemoryBackend | None = None) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    rc = cli.main(list(argv), backend=backend or MemoryBackend(), out=out, err=err)
    return rc, out.getvalue(), err.getvalue()


def test_cli_kernel_mode_refused_before_anything_changes(cluster_file: Path,
                                                         param: Callable[[str | None], Path]) -> None:
    backend = MemoryBackend()
    rc, out, err = run_cli("sync", "-f", str(cluster_file), "--node", "node-a", "--pod-netns-mode", "kernel",
                           "--ip-vs-mode-param", str(param("0")), backend=backend)
    assert rc == 1 and "--pod-netns-mode kernel needs the share-namespace ip_vs" in err
    assert backend.applied == []


def test_cli_kernel_mode_programs_the_node_only(cluster_file: Path, param: Callable[[str | None], Path]) -> None:
    backend = MemoryBackend()
    rc, out, err = run_cli("sync", "-f", str(cluster_file), "--node", "node-a", "--pod-netns-mode", "auto",
                           "--ip-vs-mode-param", str(param("2")), "--pod-netns", "/proc/self/ns/net",
                           "-o", "json", backend=backend)
    assert rc == 0, err
    assert "mode kernel" in err and "reads '2'" in err
    doc = json.loads(out)
    assert doc["applied"] == 4  # ClusterIP and NodePort, one real server each
    assert doc["pod_namespaces"] == [{"netns": "/proc/self/ns/net", "status": "shared", "applied": 0,
                                      "error": "", "failed": []}]


def test_cli_plan_per_namespace_in_kernel_mode_and_off(cluster_file: Path,
                                                       param: Callable[[str | None], Path]) -> None:
    rc, out, _ = run_cli("plan", "-f", str(cluster_file), "--node", "node-a", "--color", "never",
                         "--ip-vs-mode-param", str(param("2")), "--pod-netns", "/proc/self/ns/net")
    assert rc == 2 and "Pod network namespace /proc/self/ns/net: shares the node's table" in out
    rc, out, _ = run_cli("plan", "-f", str(cluster_file), "--node", "node-a", "--color", "never",
                         "--pod-netns-mode", "off", "--pod-netns", "/proc/self/ns/net")
    assert "not served (--pod-netns-mode off)" in out


def test_cli_sync_reports_a_missing_namespace_as_gone_not_as_an_error(cluster_file: Path, tmp_path: Path,
                                                                      param: Callable[[str | None], Path]) -> None:
    rc, out, err = run_cli("sync", "-f", str(cluster_file), "--node", "node-a", "--ip-vs-mode-param",
                           str(param(None)), "--pod-netns", str(tmp_path / "gone"))
    assert rc == 0, out + err
    assert f"sync netns {tmp_path / 'gone'}: gone, skipped" in out


def test_sync_namespace_reports_backend_errors(tmp_path: Path) -> None:
    class Broken:
        def read(self, counts: bool | None = None) -> Table:
            raise BackendError("IPVS is not available")

        def apply(self, ops: Any) -> list[Any]:
            return []

    report = sync_namespace("/proc/self/ns/net", Table.of([vs("10.96.0.1", 80, Protocol.TCP, "10.244.1.2")]),
                            decide("replicate"), backend_factory=lambda p, fd: Broken())
    assert report.status == "error" and not report.ok and "IPVS is not available" in report.summary()
    planned = sync_namespace("/proc/self/ns/net", Table.of([vs("10.96.0.1", 80, Protocol.TCP, "10.244.1.2")]),
                             decide("replicate"), backend_factory=lambda p, fd: Broken(), apply=False)
    assert planned.status == "planned" and len(planned.operations) == 2 and "empty" in planned.error


# --------------------------------------------------------------------------------------
# real namespaces on this host (root and `ip netns`; no IPVS)


def _can_make_netns() -> bool:
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("nsenter"):
        return False
    name = f"svcpt-probe-{uuid.uuid4().hex[:6]}"
    ok = subprocess.run(["ip", "netns", "add", name], capture_output=True).returncode == 0
    subprocess.run(["ip", "netns", "delete", name], capture_output=True)
    return ok


needs_netns = pytest.mark.skipif(not _can_make_netns(), reason="needs root and `ip netns` on this host")


class HostNs:
    """Real namespaces made with `ip netns add`, deleted at the end."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def add(self, *, nic: bool = True) -> str:
        name = f"svcpt-{uuid.uuid4().hex[:8]}"
        subprocess.run(["ip", "netns", "add", name], check=True)
        self.names.append(name)
        if nic:  # a veth pair inside the namespace stands for its NIC
            script = ("link add name eth0 type veth peer name eth1\n"
                      "addr add 10.244.7.2/24 dev eth0\naddr add fd00:7::2/64 dev eth0 nodad\n"
                      "link set eth0 up\nlink set eth1 up\n")
            subprocess.run(["ip", "-n", name, "-batch", "-"], input=script, text=True, check=True)
        return f"/var/run/netns/{name}"

    def delete(self, path: str) -> None:
        subprocess.run(["ip", "netns", "delete", os.path.basename(path)], capture_output=True)

    def close(self) -> None:
        for name in self.names:
            subprocess.run(["ip", "netns", "delete", name], capture_output=True)


@pytest.fixture
def hostns() -> Iterator[HostNs]:
    h = HostNs()
    yield h
    h.close()


@pytest.fixture
def sysctl_dir(tmp_path: Path) -> Path:
    """Stands for /proc/sys/net/ipv4/vs (this host has no IPVS), with a new
    namespace's defaults."""
    d = tmp_path / "vs"
    d.mkdir()
    for name, value in {"conntrack": "0", "conn_reuse_mode": "1", "expire_nodest_conn": "0",
                        "expire_quiescent_template": "0"}.items():
        (d / name).write_text(value + "\n")
    return d


def ip(path: str, *args: str) -> str:
    return subprocess.run(["nsenter", f"--net={path}", "ip", *args], capture_output=True, text=True,
                          check=True).stdout


class Counting:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        self.calls += 1
        return subprocess.run(argv, **kw)


@needs_netns
def test_prepare_a_real_namespace(hostns: HostNs, sysctl_dir: Path) -> None:
    path = hostns.add()
    ip(path, "link", "set", "lo", "down")
    runner = Counting()
    clock = Clock()
    target = pod_target(path, lambda p, fd: MemoryBackend(), runner=runner, kernel_release="6.1.0",
                        sysctl_dir=str(sysctl_dir), clock=clock)
    assert target.prepare is not None
    table = Table.of([vs("10.96.0.10"), vs("10.96.0.11"), vs("fd00:96::10")])

    target.prepare(table)

    assert "UP" in ip(path, "-j", "link", "show", "lo")
    v4 = ip(path, "-4", "route", "show", "table", "all", "proto", "0x9c")
    assert v4.splitlines() == ["10.96.0.10 dev lo scope link src 10.244.7.2 ",
                               "10.96.0.11 dev lo scope link src 10.244.7.2 "]
    v6 = ip(path, "-6", "route", "show", "table", "all", "proto", "0x9c")
    assert v6.startswith("local fd00:96::10 dev lo src fd00:7::2 ")
    assert "10.96.0.10" not in ip(path, "addr")  # routed, never bound
    assert {f.name: f.read_text().strip() for f in sysctl_dir.iterdir()} == {
        "conntrack": "1", "conn_reuse_mode": "1", "expire_nodest_conn": "1", "expire_quiescent_template": "1"}
    assert runner.calls == 1  # the read is in-process (rtnetlink); one `ip -batch`

    target.prepare(table)
    assert runner.calls == 1  # nothing changed: no process

    # what a restarted agent finds: nothing to do, nothing run
    again = pod_target(path, lambda p, fd: MemoryBackend(), runner=runner, kernel_release="6.1.0",
                       sysctl_dir=str(sysctl_dir))
    assert again.prepare is not None
    again.prepare(table)
    assert runner.calls == 1

    # drift behind svcproxy's back is repaired at the next recheck; stale routes go
    ip(path, "route", "del", "10.96.0.11/32", "proto", "0x9c")
    (sysctl_dir / "conntrack").write_text("0\n")
    clock.now += 60
    assert target.recheck is not None
    target.recheck()
    target.prepare(Table.of([vs("10.96.0.11"), vs("fd00:96::10")]))
    assert ip(path, "-4", "route", "show", "table", "all", "proto", "0x9c").splitlines() == [
        "10.96.0.11 dev lo scope link src 10.244.7.2 "]
    assert (sysctl_dir / "conntrack").read_text().strip() == "1"


class NoIpvsInPods:
    """A Pod backend factory that fails the test if it is ever used."""

    def __call__(self, path: str, fd: int) -> MemoryBackend:
        raise AssertionError(f"an IPVS request was made in Pod namespace {path}")


@needs_netns
def test_cleanup_in_kernel_mode_removes_vip_routes_and_makes_no_ipvs_request(
        hostns: HostNs, sysctl_dir: Path, param: Callable[[str | None], Path], tmp_path: Path) -> None:
    """Kernel mode: a Pod namespace has no IPVS table of its own; what an earlier
    replicate mode left (svcproxy's VIP routes) goes, nothing else."""
    path = hostns.add()
    left = pod_target(path, lambda p, fd: MemoryBackend(), sysctl_dir=str(sysctl_dir))
    assert left.prepare is not None
    left.prepare(Table.of([vs("10.96.0.10"), vs("10.96.0.11"), vs("fd00:96::10")]))
    ip(path, "route", "add", "10.96.0.99/32", "dev", "lo", "proto", "static")  # not svcproxy's
    shared = decide("auto", param("2"))

    assert cleanup_namespace(path, shared, backend_factory=NoIpvsInPods(), apply=False) == (
        "shares the node's table (kernel mode), no virtual services of its own; would remove 3 VIP routes", True)
    assert len(ip(path, "route", "show", "table", "all", "proto", "0x9c").splitlines()) == 3
    assert cleanup_namespace(path, shared, backend_factory=NoIpvsInPods()) == (
        "shares the node's table (kernel mode), no virtual services of its own; removed 3 VIP routes", True)
    assert ip(path, "route", "show", "table", "all", "proto", "0x9c") == ""
    assert "10.96.0.99 dev lo proto static" in ip(path, "route", "show", "table", "all")
    assert cleanup_namespace(path, shared, backend_factory=NoIpvsInPods())[0].endswith("removed 0 VIP routes")
    hostns.delete(path)
    line, ok = cleanup_namespace(path, shared, backend_factory=NoIpvsInPods())
    assert ok and line.startswith("gone "), line


@needs_netns
def test_cleanup_in_replicate_mode_removes_only_what_svcproxy_made(
        hostns: HostNs, sysctl_dir: Path, param: Callable[[str | None], Path]) -> None:
    """Replicate mode: the Pod's virtual services (outside the exclusions) and
    svcproxy's VIP routes go; loopback and the IPVS sysctls, which a sync set, are
    not touched (this host has no IPVS sysctls: any attempt to set them would fail
    the cleanup), nor is anyone else's route. A dry run changes nothing."""
    from svcproxy.diff import Exclusions

    path = hostns.add()
    ours = [vs("10.96.0.10", 80, Protocol.TCP, "10.244.1.5"), vs("10.96.0.11"), vs("fd00:96::10")]
    pod_table = MemoryBackend(Table.of([*ours, vs("10.200.0.1")]))
    left = pod_target(path, lambda p, fd: MemoryBackend(), sysctl_dir=str(sysctl_dir))
    assert left.prepare is not None
    left.prepare(Table.of(ours))
    ip(path, "route", "add", "10.96.0.99/32", "dev", "lo", "proto", "static")  # not svcproxy's
    replicate = decide("auto", param("0"))
    kw: dict[str, Any] = {"exclusions": Exclusions.parse(["10.200.0.0/16"]), "backend_factory": lambda p, fd: pod_table}

    assert cleanup_namespace(path, replicate, apply=False, **kw) == (
        "would remove 3 virtual services and 3 VIP routes", True)
    assert len(pod_table.table.services) == 4
    assert len(ip(path, "route", "show", "table", "all", "proto", "0x9c").splitlines()) == 3

    assert cleanup_namespace(path, replicate, **kw) == ("removed 3 virtual services and 3 VIP routes", True)
    assert [k.address for k in pod_table.table.services] == ["10.200.0.1"]
    assert ip(path, "route", "show", "table", "all", "proto", "0x9c") == ""
    assert "10.96.0.99 dev lo proto static" in ip(path, "route", "show", "table", "all")

    ip(path, "link", "set", "lo", "down")  # whoever set it down, cleanup does not set it up
    assert cleanup_namespace(path, replicate, **kw) == ("removed 0 virtual services and 0 VIP routes", True)
    assert "UP" not in json.loads(ip(path, "-j", "link", "show", "lo"))[0]["flags"]
    hostns.delete(path)
    line, ok = cleanup_namespace(path, replicate, **kw)
    assert ok and line.startswith("gone "), line


@needs_netns
def test_cli_cleanup_follows_the_loaded_mode(hostns: HostNs, sysctl_dir: Path,
                                             param: Callable[[str | None], Path], tmp_path: Path) -> None:
    """`cleanup --pod-netns` reads the ip_vs mode: kernel mode removes only VIP routes
    and succeeds; replicate mode programs the Pod's own table (ipvsadm, which this host
    cannot run: an error for that namespace, and exit status 1)."""
    path = hostns.add()
    left = pod_target(path, lambda p, fd: MemoryBackend(), sysctl_dir=str(sysctl_dir))
    assert left.prepare is not None
    left.prepare(Table.of([vs("10.96.0.10")]))
    node_ns = hostns.add(nic=False)  # where the test's nft runs: no svcproxy table there
    nft = tmp_path / "nft"
    nft.write_text(f'#!/bin/sh\nexec nsenter --net={node_ns} nft "$@"\n')
    nft.chmod(0o755)
    if not shutil.which("nft"):
        pytest.skip("needs nft (nftables)")
    ours = vs("10.96.0.10", 80, Protocol.TCP, "10.244.1.5")
    backend = MemoryBackend(Table.of([ours]))
    base = ["cleanup", "--pod-netns", path, "--nft", str(nft), "--dummy-device", "svcpx-none0"]
    rc, out, err = run_cli(*base, "--ip-vs-mode-param", str(param("2")), backend=backend)
    assert (rc, err) == (0, ""), out
    assert out.splitlines() == [
        "node: removed 1 virtual services",
        f"netns {path}: shares the node's table (kernel mode), no virtual services of its own; "
        "removed 1 VIP routes"]
    assert backend.table.services == {}
    assert ip(path, "route", "show", "table", "all", "proto", "0x9c") == ""
    rc, out, _ = run_cli(*base, "--ip-vs-mode-param", str(param("0")), backend=backend)
    assert rc == 1 and f"netns {path}: error " in out, out


@needs_netns
def test_ten_thousand_vip_routes_in_one_batch(hostns: HostNs, sysctl_dir: Path) -> None:
    path = hostns.add()
    runner = Counting()
    target = pod_target(path, lambda p, fd: MemoryBackend(), runner=runner, sysctl_dir=str(sysctl_dir))
    assert target.prepare is not None
    table = Table.of([vs(f"10.96.{i // 250}.{i % 250 + 1}") for i in range(10_000)])
    target.prepare(table)
    assert runner.calls == 1
    assert len(ip(path, "-4", "route", "show", "table", "all", "proto", "0x9c").splitlines()) == 10_000


@needs_netns
def test_a_namespace_without_a_nic_gets_loopback_and_no_routes(hostns: HostNs, sysctl_dir: Path) -> None:
    path = hostns.add(nic=False)
    target = pod_target(path, lambda p, fd: MemoryBackend(), sysctl_dir=str(sysctl_dir))
    assert target.prepare is not None
    target.prepare(Table.of([vs("10.96.0.10")]))
    assert "UP" in ip(path, "-j", "link", "show", "lo")
    assert ip(path, "route", "show", "table", "all", "proto", "0x9c") == ""


@needs_netns
def test_a_deleted_or_replaced_namespace_is_gone(hostns: HostNs, sysctl_dir: Path) -> None:
    path = hostns.add()
    target = pod_target(path, lambda p, fd: MemoryBackend(), sysctl_dir=str(sysctl_dir))
    assert target.prepare is not None
    hostns.delete(path)
    with pytest.raises(NamespaceGone):
        target.prepare(Table())
    with pytest.raises(NamespaceGone):
        target.backend.read()
    # the same name for a new namespace: the old target must not touch it
    subprocess.run(["ip", "netns", "add", os.path.basename(path)], check=True)
    with pytest.raises(NamespaceGone, match="another namespace"):
        target.backend.read()
    with pytest.raises(NamespaceGone, match="another namespace"):
        target.prepare(Table())


@needs_netns
def test_scan_attaches_new_forgets_vanished_and_reattaches_reused_names(hostns: HostNs, tmp_path: Path) -> None:
    proxier = make_proxier(MemoryBackend())
    tables = Tables()
    pods = PodNamespaces(proxier, decide("replicate"), make_target=tables.target)
    scan_dir = tmp_path / "netns"
    scan_dir.mkdir()
    paths = [hostns.add(nic=False) for _ in range(3)]
    for p in paths[:2]:
        (scan_dir / os.path.basename(p)).symlink_to(p)
    (scan_dir / "not-a-namespace").write_text("")
    elsewhere = paths[2]  # attached explicitly, outside the directory: the scan leaves it alone
    assert pods.attach(elsewhere) is AttachResult.ATTACHED
    scanner = NetnsScanner(str(scan_dir), pods, period=30)

    first = scanner.scan_once()
    in_dir = sorted(str(scan_dir / os.path.basename(p)) for p in paths[:2])
    assert sorted(first.attached) == in_dir and first.detached == ()
    assert scanner.scan_once() == type(first)()  # nothing new: nothing done

    hostns.delete(paths[0])
    hostns.delete(elsewhere)
    second = scanner.scan_once()
    assert second.detached == (str(scan_dir / os.path.basename(paths[0])),)
    assert elsewhere in pods.known()  # not the scan's to forget (the loop drops it when it syncs)

    subprocess.run(["ip", "netns", "add", os.path.basename(paths[0])], check=True)  # the name reused
    third = scanner.scan_once()
    assert third.attached == (str(scan_dir / os.path.basename(paths[0])),)
    old_id = netns_id(paths[1])
    hostns.delete(paths[1])
    subprocess.run(["ip", "netns", "add", os.path.basename(paths[1])], check=True)
    assert netns_id(paths[1]) != old_id
    fourth = scanner.scan_once()
    assert fourth.attached == (str(scan_dir / os.path.basename(paths[1])),)  # new inode: attached afresh
    proxier.sync()
    assert sorted(proxier.pod_targets) == in_dir  # the deleted explicit one was dropped by the sync


@needs_netns
def test_reading_a_namespace_in_process(hostns: HostNs, sysctl_dir: Path) -> None:
    """rtnetlink dumps from a thread that joined the namespace: loopback state, the
    first usable global address per family, svcproxy's routes in any table."""
    path = hostns.add()
    script = ("link set lo up\naddr add 10.244.7.3/24 dev eth0\naddr add fd00:8::2/64 dev eth0\n"  # tentative
              "route add 10.96.0.0/16 dev eth0 proto 156 table 100\n"
              "route add 10.96.0.9 dev lo src 10.244.7.2 proto 156\n"
              "route add local fd00:96::9/128 dev lo src fd00:7::2 proto 156 table main\n"
              "route add 10.97.0.0/16 dev eth0 proto static\n")
    subprocess.run(["ip", "-n", os.path.basename(path), "-batch", "-"], input=script, text=True, check=True)
    (sysctl_dir / "conntrack").write_text("1")  # /proc/sys files may end without a newline when read in parts
    with PodNamespace.open(path).entered() as (_p, fd):
        state = in_namespace(fd, lambda: read_state_here(str(sysctl_dir)))
    assert state.lo_up
    assert state.sources == {Family.IPV4: "10.244.7.2", Family.IPV6: "fd00:7::2"}
    assert state.routes == {Route("10.96.0.0/16", "unicast", "eth0", "", "100"),
                            Route("10.96.0.9", "unicast", "lo", "10.244.7.2", "main"),
                            Route("fd00:96::9", "local", "lo", "fd00:7::2", "main")}
    assert state.sysctls == {**DEFAULT_SYSCTLS, "conntrack": "1"}


def test_the_nodes_own_namespace_is_refused_on_every_attach_path(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Programmed as a Pod's, the node's namespace would lose its NodePorts every sync
    (a Pod's table has none) and get them back at the next: refuse it, whatever path
    names it (its /proc handle, or a runtime's link to it in the scanned directory)."""
    monkeypatch.setattr(netns, "own_netns", REAL_OWN_NETNS)
    proxier = make_proxier(MemoryBackend())
    tables = Tables()
    pods = PodNamespaces(proxier, decide("replicate"), make_target=tables.target)
    refused = proxier.metrics.pod_netns_refused.labels("node-namespace")
    own = f"/proc/{os.getpid()}/ns/net"
    for path in ("/proc/self/ns/net", own):
        assert pods.attach(path) is AttachResult.NODE
    assert proxier.pod_targets == [] and refused._value.get() == 2
    with pytest.raises(NodeNamespace):
        pod_target("/proc/self/ns/net")
    scan_dir = tmp_path / "netns"
    scan_dir.mkdir()
    (scan_dir / "host").symlink_to("/proc/self/ns/net")
    scanner = NetnsScanner(str(scan_dir), pods, period=30)
    assert scanner.scan_once() == type(scanner.scan_once())() and proxier.pod_targets == []
    assert refused._value.get() == 3  # said once, not at every scan
    report = sync_namespace("/proc/self/ns/net", Table(), decide("replicate"))
    assert report.status == "error" and "node's own network namespace" in report.error
    proxier.sync()
    assert proxier.pod_targets == []


def test_the_mode_is_read_after_the_first_ipvs_request_loaded_the_module(tmp_path: Path) -> None:
    """Where ip_vs is not loaded yet, the first IPVS request loads it with the node's
    options: a decision taken before would see no share-namespace mode that then exists."""
    param = tmp_path / "module" / "ip_vs" / "parameters" / "mode"
    loads: list[int] = []

    def load() -> None:  # what the kernel's module autoload does on the first request
        loads.append(1)
        param.parent.mkdir(parents=True)
        param.write_text("2\n")

    assert decide_loaded("auto", param, load).effective is Mode.KERNEL
    assert loads == [1]
    assert decide_loaded("auto", param, load).effective is Mode.KERNEL  # loaded: no second request
    assert loads == [1]

    def broken() -> None:
        raise OSError("no IPVS in this kernel")

    assert decide_loaded("auto", tmp_path / "none" / "ip_vs" / "parameters" / "mode", broken).effective \
        is Mode.REPLICATE
