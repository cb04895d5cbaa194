"""IpvsadmBackend against a real kernel: what it applies is what it reads back.

Runs only where IPVS exists (the throwaway test VM): it flushes IPVS tables. Every
test runs twice, in the VM's root namespace (flushed with ``ipvsadm -C`` before and
after) and in a network namespace of its own, reached through ``nsenter``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from typing import Iterator

import pytest

from svcproxy.diff import diff
from svcproxy.ipvs.backend import BackendError
from svcproxy.ipvs.ipvsadm import IpvsadmBackend
from svcproxy.model import (
    Destination,
    Forward,
    OpKind,
    Operation,
    OperationResult,
    Protocol,
    ServiceKey,
    Table,
    VirtualService,
)


def _ipvs_available() -> bool:
    if os.geteuid() != 0 or shutil.which("ipvsadm") is None or shutil.which("nsenter") is None:
        return False
    if os.path.exists("/proc/net/ip_vs"):
        return True
    return subprocess.run(["modprobe", "ip_vs"], capture_output=True, check=False).returncode == 0


pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(not _ipvs_available(), reason="needs root, ipvsadm, nsenter and IPVS (run in the test VM)"),
]

TCP, UDP, SCTP = Protocol.TCP, Protocol.UDP, Protocol.SCTP
MASQ, ROUTE, TUNNEL = Forward.MASQ, Forward.ROUTE, Forward.TUNNEL
D = Destination


def vs(proto: Protocol, addr: str, port: int, sched: str, *dests: Destination, p: int | None = None,
       flags: tuple[str, ...] = (), fwmark: int = 0) -> VirtualService:
    return VirtualService(
        ServiceKey(proto, addr, port, fwmark), sched, p, frozenset(flags),
        tuple(sorted(dests, key=lambda d: d.key)),
    )


DESIRED = Table.of(
    [
        vs(TCP, "10.96.0.10", 80, "rr", D("10.244.1.5", 8080), D("10.244.2.5", 8080, 3), D("10.244.3.5", 8080, 0)),
        vs(UDP, "10.96.0.10", 53, "wrr", D("10.244.1.6", 53, 2, ROUTE), D("10.244.1.7", 53, 1, TUNNEL), flags=("ops",)),
        vs(SCTP, "10.96.0.11", 3868, "sh", D("10.244.1.8", 3868), flags=("sh-fallback", "sh-port")),
        vs(TCP, "10.96.0.12", 443, "lc", D("10.244.1.9", 8443), p=10800, flags=("netmask=255.255.255.0",)),
        vs(TCP, "10.96.0.13", 0, "rr", D("10.244.1.10", 0, 1, ROUTE), p=300),
        vs(TCP, "fd00::10", 80, "rr", D("fd00:244::5", 8080), D("fd00:244::6", 8080, 7)),
        vs(UDP, "fd00::10", 53, "sh", D("fd00:244::7", 53, 1, ROUTE), p=60, flags=("netmask=64", "sh-port")),
        vs(SCTP, "fd00::11", 9, "mh", D("fd00:244::8", 9), flags=("mh-port",)),
        vs(TCP, "::ffff:a00:b", 80, "rr", D("fd00:244::a", 80)),
        vs(TCP, "0.0.0.0", 0, "rr", D("10.244.1.11", 80), fwmark=7),
        vs(TCP, "::", 0, "rr", D("fd00:244::9", 0, 1, ROUTE), fwmark=8),
        vs(TCP, "10.96.0.14", 8080, "wlc"),
    ]
)


def make_netns() -> str:
    """A namespace with lo up. In a namespace whose lo is down (no local routing
    table yet) the kernel refuses every IPv4 real server with "Invalid operation.
    Possibly wrong module version, address not unicast, ..." (seen in the VM)."""
    name = f"svcproxy-ipvsadm-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
    return name


@pytest.fixture(params=["root-netns", "own-netns"])
def backend(request: pytest.FixtureRequest) -> Iterator[IpvsadmBackend]:
    if request.param == "root-netns":
        subprocess.run(["ipvsadm", "-C"], check=True)
        try:
            yield IpvsadmBackend()
        finally:
            subprocess.run(["ipvsadm", "-C"], check=True)
        return
    name = make_netns()
    try:
        path = f"/var/run/netns/{name}"
        subprocess.run(["nsenter", f"--net={path}", "ipvsadm", "-C"], check=True)
        yield IpvsadmBackend(netns=path)
    finally:
        subprocess.run(["ip", "netns", "del", name], check=True)


def test_apply_from_empty_reads_back_equal(backend: IpvsadmBackend) -> None:
    assert backend.read() == Table()
    plan = diff(DESIRED, Table())
    assert len(plan) == len(DESIRED) + DESIRED.destination_count()
    assert backend.apply(plan) == []
    got = backend.read()
    assert got == DESIRED
    assert diff(DESIRED, got) == []
    assert backend.read(counts=True) == DESIRED


def test_edits_change_settings_in_place(backend: IpvsadmBackend) -> None:
    assert backend.apply(diff(DESIRED, Table())) == []
    services = dict(DESIRED.services)
    k80 = ServiceKey(TCP, "10.96.0.10", 80)
    k53 = ServiceKey(UDP, "10.96.0.10", 53)
    k443 = ServiceKey(TCP, "10.96.0.12", 443)
    k6 = ServiceKey(UDP, "fd00::10", 53)
    services[k80] = vs(TCP, "10.96.0.10", 80, "wrr", D("10.244.1.5", 8080, 5), D("10.244.2.5", 8080, 3),
                       D("10.244.4.5", 8080))
    services[k53] = vs(UDP, "10.96.0.10", 53, "rr", D("10.244.1.6", 53, 2, MASQ), D("10.244.1.7", 53, 1, ROUTE))
    services[k443] = vs(TCP, "10.96.0.12", 443, "lc", D("10.244.1.9", 8443), p=60)
    services[k6] = vs(UDP, "fd00::10", 53, "sh", D("fd00:244::7", 53, 1, ROUTE))
    del services[ServiceKey(SCTP, "fd00::11", 9)]
    new = Table(services)
    plan = diff(new, backend.read())
    kinds = {op.kind for op in plan}
    assert kinds == {OpKind.EDIT_SERVICE, OpKind.EDIT_DESTINATION, OpKind.ADD_DESTINATION,
                     OpKind.DELETE_DESTINATION, OpKind.DELETE_SERVICE}
    assert backend.apply(plan) == []
    assert backend.read() == new
    assert diff(new, backend.read()) == []


def test_only_the_rejected_operation_fails(backend: IpvsadmBackend) -> None:
    bad = Operation(OpKind.ADD_SERVICE, ServiceKey(TCP, "10.96.0.99", 80), "nosuchsched")
    plan = diff(DESIRED, Table())
    plan = plan[:3] + [bad] + plan[3:]
    assert backend.apply(plan) == [OperationResult(bad, "Scheduler or persistence engine not found")]
    assert backend.read() == DESIRED


def test_a_line_that_stops_restore_only_fails_itself(backend: IpvsadmBackend) -> None:
    """ipvsadm refuses sh-port for rr before the kernel sees it and ends -R there."""
    stopper = Operation(OpKind.ADD_SERVICE, ServiceKey(TCP, "10.96.0.98", 80), "rr", None, frozenset({"sh-port"}))
    missing = Operation(OpKind.EDIT_DESTINATION, ServiceKey(TCP, "10.96.0.97", 80), destination=D("10.244.9.9", 80))
    plan = diff(DESIRED, Table())
    plan = [stopper] + plan[:5] + [missing] + plan[5:]
    failed = backend.apply(plan)
    assert failed == [
        OperationResult(stopper, "incompatible scheduler flag `sh-port'"),
        OperationResult(missing, "Service not defined"),
    ]
    assert backend.read() == DESIRED


def test_delete_everything(backend: IpvsadmBackend) -> None:
    assert backend.apply(diff(DESIRED, Table())) == []
    plan = diff(Table(), backend.read())
    assert {op.kind for op in plan} == {OpKind.DELETE_DESTINATION, OpKind.DELETE_SERVICE}
    assert backend.apply(plan) == []
    # diff() leaves fwmark services alone; delete them by hand (-d/-D -f N [-6])
    fwmarks = backend.read()
    assert sorted(k.fwmark for k in fwmarks.services) == [7, 8]
    by_hand = [
        Operation(OpKind.DELETE_DESTINATION, s.key, destination=d) for s in fwmarks.sorted() for d in s.destinations
    ] + [Operation(OpKind.DELETE_SERVICE, key) for key in fwmarks.services]
    assert backend.apply(by_hand) == []
    assert backend.read() == Table()


def test_namespaces_are_separate_tables() -> None:
    subprocess.run(["ipvsadm", "-C"], check=True)
    name = make_netns()
    try:
        root = IpvsadmBackend()
        inner = IpvsadmBackend(netns=f"/var/run/netns/{name}")
        only_root = Table.of([vs(TCP, "10.96.1.1", 80, "rr", D("10.244.1.1", 80))])
        assert root.apply(diff(only_root, Table())) == []
        assert inner.apply(diff(DESIRED, Table())) == []
        assert root.read() == only_root
        assert inner.read() == DESIRED
    finally:
        subprocess.run(["ip", "netns", "del", name], check=True)
        subprocess.run(["ipvsadm", "-C"], check=True)


def test_missing_namespace_is_a_backend_error() -> None:
    with pytest.raises(BackendError, match="nsenter"):
        IpvsadmBackend(netns="/var/run/netns/svcproxy-does-not-exist").read()


def test_kernel_refuses_real_servers_that_are_not_unicast(backend: IpvsadmBackend) -> None:
    """An IPv4-mapped IPv6 real server is not unicast to IPVS: only that op fails."""
    svc = ServiceKey(TCP, "fd00::20", 80)
    mapped = Operation(OpKind.ADD_DESTINATION, svc, destination=D("::ffff:a00:c", 80))
    good = Operation(OpKind.ADD_DESTINATION, svc, destination=D("fd00:244::20", 80))
    plan = [Operation(OpKind.ADD_SERVICE, svc), mapped, good]
    assert backend.apply(plan) == [
        OperationResult(mapped, "Invalid operation.  Possibly wrong module version, address not unicast, ...")
    ]
    assert backend.read() == Table.of([vs(TCP, "fd00::20", 80, "rr", D("fd00:244::20", 80))])
