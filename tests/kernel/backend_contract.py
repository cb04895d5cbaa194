"""The contract every IPVS backend keeps against a real kernel, as one reusable class.

A backend's kernel test module subclasses :class:`BackendContract`, says how to make
the backend (``make``) and how that backend words its errors (``errors``); pytest
collects the subclass (its name must start with ``Test``) and runs every case below
against that backend. So the backends are held to the same cases, in the root
namespace of the test VM and in a namespace of their own::

    class TestNetlinkContract(BackendContract):
        errors = {...}

        def make(self, netns: str | None) -> Backend:
            return NetlinkBackend(netns=netns)

The cases flush IPVS tables (``ipvsadm -C``): they run only in the throwaway VM
(tools/vmtest), like everything under tests/kernel.
"""

from __future__ import annotations

import subprocess
import time
import uuid
from dataclasses import replace
from typing import Any, ClassVar, Iterator

import pytest

from svcproxy.diff import diff
from svcproxy.ipvs.backend import Backend, BackendError
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

from .netns import HELPER_PYTHON, Lab, default_route, ns_cmd

TCP, UDP, SCTP = Protocol.TCP, Protocol.UDP, Protocol.SCTP
MASQ, ROUTE, TUNNEL = Forward.MASQ, Forward.ROUTE, Forward.TUNNEL
D = Destination

#: What every backend must report, in its own words, for each situation.
ERROR_KINDS = (
    "unknown_scheduler",  # ADD_SERVICE with scheduler "nosuchsched" (kernel: ENOENT)
    "service_exists",  # ADD_SERVICE of a service that exists (EEXIST)
    "destination_exists",  # ADD_DESTINATION of a real server that exists (EEXIST)
    "service_not_defined",  # a real-server operation on a missing service (ESRCH)
    "incompatible_flag",  # sh-port on an rr service (refused before the kernel)
    "not_unicast",  # an IPv4-mapped IPv6 real server (EINVAL)
    "missing_netns",  # regex for the BackendError of a namespace that does not exist
)


def vs(proto: Protocol, addr: str, port: int, sched: str, *dests: Destination, p: int | None = None,
       flags: tuple[str, ...] = (), fwmark: int = 0) -> VirtualService:
    return VirtualService(
        ServiceKey(proto, addr, port, fwmark), sched, p, frozenset(flags),
        tuple(sorted(dests, key=lambda d: d.key)),
    )


#: TCP/UDP/SCTP, IPv4/IPv6 (and IPv4-mapped), fwmark v4/v6, persistence with and
#: without netmask, scheduler flags, ops, masq/route/tunnel, weights 0..n, port 0.
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


def make_netns(prefix: str = "svcproxy-contract") -> str:
    """A namespace with lo up. With lo down (no local routing table yet) the kernel
    refuses every IPv4 real server with EINVAL (seen in the VM)."""
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
    return name


def flush(netns_path: str | None = None) -> None:
    cmd = ["ipvsadm", "-C"]
    if netns_path:
        cmd = ["nsenter", f"--net={netns_path}", *cmd]
    subprocess.run(cmd, check=True)


def big_table(services: int, dests: int, net: int = 100) -> Table:
    """``services`` TCP services with ``dests`` masq real servers each."""
    return Table.of(
        vs(TCP, f"10.{net}.{i // 250}.{i % 250 + 1}", 80, "rr",
           *(D(f"10.{net + 1}.{(i * dests + j) // 250}.{(i * dests + j) % 250 + 1}", 8080) for j in range(dests)))
        for i in range(services)
    )


class BackendContract:
    """Cases every backend must pass. Subclasses set ``errors`` and ``make``."""

    #: Expected error text for each of ERROR_KINDS.
    errors: ClassVar[dict[str, str]] = {}

    def make(self, netns: str | None) -> Backend:
        raise NotImplementedError

    def read_with_counts(self, backend: Backend) -> Table:
        """The table with connection counts (the ipvsadm backend needs counts=True)."""
        reader: Any = backend
        table: Table = reader.read(counts=True)
        return table

    @pytest.fixture(params=["root-netns", "own-netns"])
    def backend(self, request: pytest.FixtureRequest) -> Iterator[Backend]:
        if request.param == "root-netns":
            flush()
            try:
                yield self.make(None)
            finally:
                flush()
            return
        name = make_netns()
        try:
            path = f"/var/run/netns/{name}"
            yield self.make(path)
        finally:
            subprocess.run(["ip", "netns", "del", name], check=True)

    # ----------------------------------------------------------------- the cases

    def test_errors_are_declared(self) -> None:
        assert sorted(self.errors) == sorted(ERROR_KINDS)

    def test_apply_from_empty_reads_back_equal(self, backend: Backend) -> None:
        assert backend.read() == Table()
        plan = diff(DESIRED, Table())
        assert len(plan) == len(DESIRED) + DESIRED.destination_count()
        assert backend.apply(plan) == []
        got = backend.read()
        assert got == DESIRED
        assert diff(DESIRED, got) == []
        assert self.read_with_counts(backend) == DESIRED

    def test_edits_change_settings_in_place(self, backend: Backend) -> None:
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

    def test_only_the_rejected_operation_fails(self, backend: Backend) -> None:
        bad = Operation(OpKind.ADD_SERVICE, ServiceKey(TCP, "10.96.0.99", 80), "nosuchsched")
        plan = diff(DESIRED, Table())
        plan = plan[:3] + [bad] + plan[3:]
        assert backend.apply(plan) == [OperationResult(bad, self.errors["unknown_scheduler"])]
        assert backend.read() == DESIRED

    def test_refused_before_and_by_the_kernel(self, backend: Backend) -> None:
        """One operation the backend refuses itself, one the kernel refuses: only they fail."""
        stopper = Operation(OpKind.ADD_SERVICE, ServiceKey(TCP, "10.96.0.98", 80), "rr", None, frozenset({"sh-port"}))
        missing = Operation(OpKind.EDIT_DESTINATION, ServiceKey(TCP, "10.96.0.97", 80), destination=D("10.244.9.9", 80))
        plan = diff(DESIRED, Table())
        plan = [stopper] + plan[:5] + [missing] + plan[5:]
        assert backend.apply(plan) == [
            OperationResult(stopper, self.errors["incompatible_flag"]),
            OperationResult(missing, self.errors["service_not_defined"]),
        ]
        assert backend.read() == DESIRED

    def test_every_failure_of_a_large_plan_is_reported_exactly(self, backend: Backend) -> None:
        """Adding 1,200 services and real servers that all exist already, with other
        settings: every operation fails, each with its own error, and nothing changes
        (the plan spans several batches)."""
        table = big_table(300, 3)
        plan = diff(table, Table())
        assert backend.apply(plan) == []
        again = [
            Operation(op.kind, op.service, destination=replace(op.destination, weight=5))
            if op.destination is not None
            else Operation(op.kind, op.service, "wrr")
            for op in plan
        ]
        expected = [
            OperationResult(op, self.errors["destination_exists" if op.kind.is_destination else "service_exists"])
            for op in again
        ]
        assert backend.apply(again) == expected
        assert backend.read() == table

    def test_failures_interleaved_with_successes(self, backend: Backend) -> None:
        """Every 7th real server goes to a service that does not exist."""
        table = big_table(100, 5, net=110)
        plan = diff(table, Table())
        orphan = ServiceKey(TCP, "10.96.200.1", 80)
        bad: list[Operation] = []
        mixed: list[Operation] = []
        for i, op in enumerate(plan):
            mixed.append(op)
            if op.kind is OpKind.ADD_DESTINATION and i % 7 == 0:
                bad.append(Operation(OpKind.ADD_DESTINATION, orphan, destination=op.destination))
                mixed.append(bad[-1])
        assert len(bad) > 50
        assert backend.apply(mixed) == [OperationResult(op, self.errors["service_not_defined"]) for op in bad]
        assert backend.read() == table

    def test_delete_everything(self, backend: Backend) -> None:
        assert backend.apply(diff(DESIRED, Table())) == []
        plan = diff(Table(), backend.read())
        assert {op.kind for op in plan} == {OpKind.DELETE_DESTINATION, OpKind.DELETE_SERVICE}
        assert backend.apply(plan) == []
        # diff() leaves fwmark services alone; delete them by hand
        fwmarks = backend.read()
        assert sorted(k.fwmark for k in fwmarks.services) == [7, 8]
        by_hand = [
            Operation(OpKind.DELETE_DESTINATION, s.key, destination=d) for s in fwmarks.sorted() for d in s.destinations
        ] + [Operation(OpKind.DELETE_SERVICE, key) for key in fwmarks.services]
        assert backend.apply(by_hand) == []
        assert backend.read() == Table()

    def test_kernel_refuses_real_servers_that_are_not_unicast(self, backend: Backend) -> None:
        """An IPv4-mapped IPv6 real server is not unicast to IPVS: only that op fails."""
        svc = ServiceKey(TCP, "fd00::20", 80)
        mapped = Operation(OpKind.ADD_DESTINATION, svc, destination=D("::ffff:a00:c", 80))
        good = Operation(OpKind.ADD_DESTINATION, svc, destination=D("fd00:244::20", 80))
        plan = [Operation(OpKind.ADD_SERVICE, svc), mapped, good]
        assert backend.apply(plan) == [OperationResult(mapped, self.errors["not_unicast"])]
        assert backend.read() == Table.of([vs(TCP, "fd00::20", 80, "rr", D("fd00:244::20", 80))])

    def test_namespaces_are_separate_tables(self) -> None:
        flush()
        name = make_netns()
        try:
            root = self.make(None)
            inner = self.make(f"/var/run/netns/{name}")
            only_root = Table.of([vs(TCP, "10.96.1.1", 80, "rr", D("10.244.1.1", 80))])
            assert root.apply(diff(only_root, Table())) == []
            assert inner.apply(diff(DESIRED, Table())) == []
            assert root.read() == only_root
            assert inner.read() == DESIRED
        finally:
            subprocess.run(["ip", "netns", "del", name], check=True)
            flush()

    def test_missing_namespace_is_a_backend_error(self) -> None:
        with pytest.raises(BackendError, match=self.errors["missing_netns"]):
            self.make("/var/run/netns/svcproxy-does-not-exist").read()

    def test_reads_connection_counts(self, lab: Lab) -> None:
        """A held-open TCP connection through a VIP shows as one active connection.

        client --veth-- server; IPVS in the client's own namespace (the share-NS
        layout: the Pod's connections are scheduled in the Pod namespace itself).
        """
        client, server = lab.netns(), lab.netns()
        lab.connect(client, server, ["10.244.60.1/24"], ["10.244.60.2/24"])
        default_route(client, "10.244.60.2")
        backend = self.make(f"/var/run/netns/{client}")
        # The second real server has weight 0: rr never picks it, so the connection
        # goes to the one that exists.
        table = Table.of([vs(TCP, "10.96.60.1", 80, "rr", D("10.244.60.2", 8080), D("10.244.60.3", 8080, 0))])
        assert backend.apply(diff(table, Table())) == []
        listener = _hold(server, "import socket,time\n"
                                 "s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
                                 "s.bind(('0.0.0.0', 8080)); s.listen(8); print('READY', flush=True)\n"
                                 "c, _ = s.accept(); print('ACCEPTED', flush=True); time.sleep(600)\n")
        caller = None
        try:
            caller = _hold(client, "import socket,time\n"
                                   "c=socket.create_connection(('10.96.60.1', 80), timeout=20)\n"
                                   "print('READY', flush=True); time.sleep(600)\n")
            assert listener.stdout is not None
            assert listener.stdout.readline().strip() == "ACCEPTED"
            deadline = time.monotonic() + 30
            while True:
                got = self.read_with_counts(backend)
                dests = got.services[ServiceKey(TCP, "10.96.60.1", 80)].destination_map()
                counts = {str(k): (d.active_conns, d.inactive_conns) for k, d in dests.items()}
                if counts["10.244.60.2:8080"][0] == 1 or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            assert counts == {"10.244.60.2:8080": (1, 0), "10.244.60.3:8080": (0, 0)}
            assert got == table  # counts take no part in equality
        finally:
            for proc in (caller, listener):
                if proc is not None:
                    proc.kill()
                    proc.wait()
                    if proc.stdout:
                        proc.stdout.close()


def _hold(ns: str, code: str) -> subprocess.Popen[str]:
    """Run ``code`` in ``ns`` (system Python, no site) and wait for its READY line."""
    proc = subprocess.Popen(ns_cmd(ns, [*HELPER_PYTHON, "-c", code]), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "READY":
        proc.kill()
        rest = proc.communicate()[0]
        raise RuntimeError(f"helper in {ns} did not start: {line}{rest}")
    return proc
