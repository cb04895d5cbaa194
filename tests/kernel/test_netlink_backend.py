"""NetlinkBackend against a real kernel (the test VM only: these flush IPVS tables).

The shared contract (backend_contract.py) runs in the VM's root namespace and in a
namespace of its own; the tests below add what is particular to netlink: both
backends reading one kernel table to equal Tables, acknowledgement modes and
window sizes giving the same results, namespaces given as /proc/PID/ns/net, and
the kernel behaviour the design relies on (dumps cannot share a socket).
"""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

from svcproxy.diff import diff
from svcproxy.ipvs import nlconst, nldecode, nlencode
from svcproxy.ipvs.backend import Backend
from svcproxy.ipvs.ipvsadm import IpvsadmBackend, parse_save
from svcproxy.ipvs.netlink import NetlinkBackend, _Channel, _new_socket
from svcproxy.model import OpKind, Operation, OperationResult, ServiceKey, Table

from .backend_contract import DESIRED, TCP, BackendContract, D, big_table, flush, make_netns, vs

pytestmark = pytest.mark.kernel

FIXTURES = Path(__file__).resolve().parent.parent / "data" / "ipvsadm"


class TestNetlinkContract(BackendContract):
    errors = {
        "unknown_scheduler": "Scheduler or persistence engine not found (ENOENT)",
        "service_exists": "Service already exists (EEXIST)",
        "destination_exists": "Destination already exists (EEXIST)",
        "service_not_defined": "Service not defined (ESRCH)",
        "incompatible_flag": "incompatible scheduler flag `sh-port'",
        "not_unicast": "Invalid operation.  Possibly wrong module version, address not unicast, ... (EINVAL)",
        "missing_netns": "cannot open network namespace /var/run/netns/svcproxy-does-not-exist",
    }

    def make(self, netns: str | None) -> Backend:
        return NetlinkBackend(netns=netns)


@pytest.fixture
def root() -> Iterator[None]:
    flush()
    try:
        yield
    finally:
        flush()


def test_both_backends_read_the_same_kernel_table(root: None) -> None:
    """The "mixed" fixture table (every setting ipvsadm can express: gue/gre tunnels,
    --pe sip, flag-N, mh/sh flags, ops, fwmark v4/v6, -M) restored by ipvsadm and
    read by both backends."""
    text = (FIXTURES / "save_mixed.txt").read_text()
    subprocess.run(["ipvsadm", "-R"], input=text, text=True, check=True)
    netlink = NetlinkBackend().read()
    assert netlink == IpvsadmBackend().read()
    assert netlink == IpvsadmBackend().read(counts=True)
    assert netlink == parse_save(text)


@pytest.mark.parametrize("where", ["root", "netns"])
def test_real_servers_come_from_proc_net_ip_vs(root: None, where: str, caplog: pytest.LogCaptureFixture) -> None:
    """The default read takes real servers from the namespace's /proc/net/ip_vs
    (no fallback warning) and gives what one GET_DEST dump per service gives, for
    every setting ipvsadm can express; in a namespace, that namespace's file. The
    extra real server is IPv4-compatible IPv6, which inet_ntop writes dotted."""
    text = (FIXTURES / "save_mixed.txt").read_text() + "-a -t [fd00::1]:80 -r [::10.1.0.20]:80 -m -w 1\n"
    name = make_netns() if where == "netns" else None
    netns = f"/var/run/netns/{name}" if name else None
    try:
        cmd = ["ip", "netns", "exec", name, "ipvsadm", "-R"] if name else ["ipvsadm", "-R"]
        subprocess.run(cmd, input=text, text=True, check=True)
        with caplog.at_level(logging.DEBUG, logger="svcproxy.ipvs.netlink"):
            by_file = NetlinkBackend(netns=netns).read()
        assert [r.getMessage() for r in caplog.records if "one dump per service" in r.getMessage()] == []
        assert by_file == NetlinkBackend(netns=netns, proc=False).read()
        assert by_file == parse_save(text)
        if name:
            assert NetlinkBackend().read() == Table()
    finally:
        if name:
            subprocess.run(["ip", "netns", "del", name], check=True)


def test_ipvsadm_reads_what_netlink_wrote_and_back(root: None) -> None:
    assert NetlinkBackend().apply(diff(DESIRED, Table())) == []
    assert IpvsadmBackend().read() == DESIRED
    flush()
    assert IpvsadmBackend().apply(diff(DESIRED, Table())) == []
    assert NetlinkBackend().read() == DESIRED


@pytest.mark.parametrize("acks,window", [(False, 1), (False, 7), (True, 7), (True, 256), (False, 4096)])
def test_ack_modes_and_windows_give_the_same_results(root: None, acks: bool, window: int) -> None:
    table = big_table(40, 5, net=120)
    plan = diff(table, Table())
    orphan = ServiceKey(TCP, "10.96.201.1", 80)
    mixed: list[Operation] = []
    bad: list[Operation] = []
    for i, op in enumerate(plan):
        if i % 9 == 4 or i == len(plan) - 1:  # failures inside windows and at their ends
            bad.append(Operation(OpKind.ADD_DESTINATION, orphan, destination=D("10.250.0.1", i)))
            mixed.append(bad[-1])
        mixed.append(op)
    backend = NetlinkBackend(acks=acks, window=window)
    assert backend.apply(mixed) == [OperationResult(op, "Service not defined (ESRCH)") for op in bad]
    assert backend.read() == table


def test_namespace_given_as_proc_pid_path() -> None:
    name = make_netns()
    sleeper = subprocess.Popen(["ip", "netns", "exec", name, "sleep", "600"])
    try:
        # `ip netns exec` joins the namespace after the fork: wait until it has.
        deadline = time.monotonic() + 10
        while os.stat(f"/proc/{sleeper.pid}/ns/net").st_ino != os.stat(f"/var/run/netns/{name}").st_ino:
            assert time.monotonic() < deadline, "ip netns exec did not enter the namespace"
            time.sleep(0.05)
        table = Table.of([vs(TCP, "10.96.3.1", 80, "rr", D("10.244.3.1", 80))])
        by_pid = NetlinkBackend(netns=f"/proc/{sleeper.pid}/ns/net")
        assert by_pid.apply(diff(table, Table())) == []
        assert NetlinkBackend(netns=f"/var/run/netns/{name}").read() == table
        assert by_pid.read() == table
    finally:
        sleeper.kill()
        sleeper.wait()
        subprocess.run(["ip", "netns", "del", name], check=True)


def test_a_namespace_backend_leaves_the_root_table_alone(root: None) -> None:
    assert NetlinkBackend().read() == Table()
    name = make_netns()
    try:
        inner = NetlinkBackend(netns=f"/var/run/netns/{name}")
        assert inner.apply(diff(DESIRED, Table())) == []
        assert inner.read() == DESIRED
        assert NetlinkBackend().read() == Table()
        assert IpvsadmBackend().read() == Table()
    finally:
        subprocess.run(["ip", "netns", "del", name], check=True)


def test_dumps_cannot_share_a_socket(root: None) -> None:
    """Why read() does one dump at a time: a second dump request in the same
    datagram is refused with EBUSY, because the first dump only finishes when its
    reader calls recv()."""
    table = Table.of([vs(TCP, f"10.96.4.{i}", 80, "rr", D(f"10.244.4.{i}", 80)) for i in (1, 2)])
    assert NetlinkBackend().apply(diff(table, Table())) == []
    sock = _new_socket(1 << 20, 10.0)
    try:
        channel = _Channel(sock, 10.0)
        encoder = nlencode.Encoder()
        bodies = [encoder.get_dests(key) for key in sorted(table.services)]
        channel.send(b"".join(
            nlencode.frame(channel.family, nlconst.NLM_F_REQUEST | nlconst.NLM_F_DUMP, 100 + i, body)
            for i, body in enumerate(bodies)
        ))
        answers: dict[int, list[str]] = {100: [], 101: []}
        while not answers[100] or answers[100][-1] != "done":
            data = channel.recv()
            for msg in nldecode.walk(data):
                if msg.type == nlconst.NLMSG_ERROR:
                    answers[msg.seq].append(errno.errorcode[nldecode.decode_error(data, msg)[0]])
                elif msg.type == nlconst.NLMSG_DONE:
                    answers[msg.seq].append("done")
                else:
                    answers[msg.seq].append("dest")
        assert answers == {100: ["dest", "done"], 101: ["EBUSY"]}
    finally:
        sock.close()


def test_unknown_scheduler_errno_on_edit(root: None) -> None:
    key = ServiceKey(TCP, "10.96.5.1", 80)
    backend = NetlinkBackend()
    edit = Operation(OpKind.EDIT_SERVICE, key, "nosuchsched")
    assert backend.apply([Operation(OpKind.ADD_SERVICE, key), edit]) == [
        OperationResult(edit, "Scheduler or persistence engine not found (ENOENT)")
    ]
    assert backend.read() == Table.of([vs(TCP, "10.96.5.1", 80, "rr")])
