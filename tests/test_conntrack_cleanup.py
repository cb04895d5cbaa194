"""UDP conntrack cleanup: the rule (pure) and the loop running it after each sync,
against a conntrack table in memory (the kernel's is exercised in the VM:
tests/kernel/test_datapath.py)."""

from __future__ import annotations

import logging
from typing import Sequence

import pytest

from svcproxy.ipvs.backend import MemoryBackend
from svcproxy.kube.store import Kind
from svcproxy.model import Destination, Protocol, ServiceKey, Table, VirtualService
from svcproxy.node.conntrack import ConntrackError, clean_stale_flows
from svcproxy.reconcile import Proxier, ProxierConfig
from svcproxy.kube.translate import NodeInfo, TranslateConfig
from svcproxy.node.stale_flows import Flow, stale, udp_backends
from test_reconcile import Clock, eps, load

DNS = ServiceKey(Protocol.UDP, "10.96.0.10", 53)
DNS_TCP = ServiceKey(Protocol.TCP, "10.96.0.10", 53)


def table(*dests: str, key: ServiceKey = DNS) -> Table:
    return Table.of([VirtualService(key, destinations=tuple(Destination(d, 53) for d in dests)),
                     VirtualService(DNS_TCP, destinations=(Destination("10.244.9.9", 53),))])


def flow(reply_src: str, dst: str = "10.96.0.10", dport: int = 53, sport: int = 40000) -> Flow:
    return Flow("10.244.5.5", dst, sport, dport, reply_src)


def test_only_udp_virtual_services_count_and_weight_zero_servers_still_serve() -> None:
    t = table("10.244.1.1", "10.244.1.2")
    assert udp_backends(t) == {("10.96.0.10", 53): frozenset({"10.244.1.1", "10.244.1.2"})}
    assert udp_backends(t, scope={DNS_TCP}) == {}
    assert udp_backends(t, scope={DNS, ServiceKey(Protocol.UDP, "10.96.0.99", 53)}) == udp_backends(t)


def test_a_flow_is_stale_when_its_reply_comes_from_no_current_real_server() -> None:
    backends = udp_backends(table("10.244.1.2"))
    flows = [flow("10.244.1.1"),            # the removed endpoint
             flow("10.244.1.2"),            # a current one: kept
             flow("10.96.0.10"),            # un-translated: from before any endpoint existed
             flow("10.244.1.1", dport=54),  # another port of that address: not ours
             flow("10.244.1.1", dst="10.96.0.11")]
    assert stale(flows, backends) == [flows[0], flows[2]]
    assert stale(flows, udp_backends(table())) == [flows[0], flows[1], flows[2]]


class FakeConntrack:
    def __init__(self, flows: Sequence[Flow]) -> None:
        self.entries = list(flows)
        self.reads: list[object] = []
        self.fail = False

    def flows(self, keys: Sequence[tuple[str, int]] | None) -> list[Flow]:
        if self.fail:
            raise ConntrackError("conntrack: Operation not permitted")
        self.reads.append(keys)
        return [f for f in self.entries if keys is None or (f.orig_dst, f.dport) in keys]

    def delete(self, flows: Sequence[Flow]) -> int:
        gone = [f for f in flows if f in self.entries]
        self.entries = [f for f in self.entries if f not in flows]
        return len(gone)


def test_clean_reads_only_the_changed_services_and_a_dry_run_deletes_nothing() -> None:
    ct = FakeConntrack([flow("10.244.1.1"), flow("10.244.1.2", sport=40001)])
    found, deleted = clean_stale_flows(ct, table("10.244.1.2"), {DNS}, dry_run=True)
    assert found == [flow("10.244.1.1")] and deleted == 0 and len(ct.entries) == 2
    assert ct.reads == [[("10.96.0.10", 53)]]
    found, deleted = clean_stale_flows(ct, table("10.244.1.2"), None, dry_run=False)
    assert deleted == 1 and ct.entries == [flow("10.244.1.2", sport=40001)] and ct.reads[-1] is None
    assert clean_stale_flows(ct, table("10.244.1.2"), {DNS_TCP}, dry_run=False) == ([], 0)
    assert len(ct.reads) == 2  # no UDP service changed: the table is not even read


def make(ct: FakeConntrack, **cfg: object) -> Proxier:
    clock = Clock()
    config = ProxierConfig(translate=TranslateConfig(node=NodeInfo("node-a", ("192.168.0.10",))), **cfg)  # type: ignore[arg-type]
    return Proxier(MemoryBackend(), config, node_conntrack=ct, clock=clock, monotonic=clock)


def test_the_loop_clears_the_flows_of_a_removed_udp_endpoint(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    ct = FakeConntrack([flow("10.244.2.1"), flow("10.244.2.1", sport=40001)])
    p = make(ct)
    load(p)  # dns -> 10.244.2.1
    p.sync()
    assert len(ct.entries) == 2
    p.on_event(Kind.ENDPOINT_SLICE, "MODIFIED", eps("dns", ["10.244.2.2"], ("dns", 53, "UDP")))
    p.sync()
    assert ct.entries == [] and p.metrics.conntrack_deleted._value.get() == 2
    assert "cleared 2 stale UDP conntrack entries" in caplog.text


def test_dry_run_only_logs_and_a_failure_is_counted_without_stopping_the_sync(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    ct = FakeConntrack([flow("10.244.9.9")])
    p = make(ct, dry_run=True)
    load(p)
    p.sync()
    assert len(ct.entries) == 1 and "dry run: would clear 1 stale UDP conntrack entries" in caplog.text
    ct.fail = True
    p2 = make(ct)
    load(p2)
    result = p2.sync()
    assert result.failed == 0 and len(p2.backend.read().services) == 2
    assert p2.metrics.conntrack_errors._value.get() == 1
    assert "UDP conntrack cleanup failed (will retry at the next full sync)" in caplog.text


def test_kernel_conntrack_reads_and_deletes_real_entries_in_a_namespace() -> None:
    """The pyroute2 adapter against this host's conntrack table, in a namespace of the
    test's own (a UDP datagram over loopback, tracked because of one nft rule)."""
    import os
    import shutil
    import socket
    import subprocess
    import uuid

    from svcproxy.node.conntrack import KernelConntrack
    from svcproxy.podns.attach import in_namespace

    if os.geteuid() != 0 or not shutil.which("nft"):
        pytest.skip("needs root and nft")
    name = f"svcproxy-ct-{uuid.uuid4().hex[:8]}"
    if subprocess.run(["ip", "netns", "add", name], capture_output=True).returncode != 0:
        pytest.skip("cannot create a network namespace here")
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        rules = "table inet t {\n chain o {\n type filter hook output priority 0; ct state new accept\n }\n}\n"
        if subprocess.run(["ip", "netns", "exec", name, "nft", "-f", "-"], input=rules, text=True,
                          capture_output=True).returncode != 0:
            pytest.skip("no nftables conntrack here")
        fd = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
        try:
            def send() -> None:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                    s.bind(("127.0.0.1", 40123))
                    s.sendto(b"x", ("127.0.0.1", 5555))

            in_namespace(fd, send)
            ct = KernelConntrack(lambda fn: in_namespace(fd, fn))
            flows = ct.flows([("127.0.0.1", 5555)])
            assert flows == [Flow("127.0.0.1", "127.0.0.1", 40123, 5555, "127.0.0.1")]
            assert ct.flows(None) == flows and ct.flows([("127.0.0.1", 5556)]) == []
            backends = {("127.0.0.1", 5555): frozenset({"10.244.1.1"})}
            assert stale(flows, backends) == flows
            assert ct.delete(flows) == 1 and ct.delete(flows) == 0  # gone already: not counted
            assert ct.flows(None) == []
        finally:
            os.close(fd)
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


def test_ctnetlink_messages_round_trip_through_the_decoder() -> None:
    """The delete request carries the tuple the decoder reads back (the layout an
    IPCTNL_MSG_CT_NEW answer uses for its tuples), and a dump request asks the kernel
    to filter by protocol, or by protocol, destination address and port."""
    import socket
    import struct

    from svcproxy.node.ctnetlink import (CTA_FILTER, FILTER_IP_DST, FILTER_PROTO_DST_PORT, FILTER_PROTO_NUM, Tuple,
                                         decode_entry, delete_request, dump_request)

    orig = Tuple("10.244.5.5", "10.96.0.10", socket.IPPROTO_UDP, 40000, 53)
    msg = delete_request(7, socket.AF_INET, orig)
    length, mtype, flags, seq, _ = struct.unpack_from("=IHHII", msg)
    assert length == len(msg) and mtype == (1 << 8) | 2 and flags == 0x5 and seq == 7
    # An answer has the original and the reply tuple: build one from two requests' bodies.
    reply = Tuple("10.244.1.1", "10.244.5.5", socket.IPPROTO_UDP, 53, 40000)
    body_orig = delete_request(1, socket.AF_INET, orig)[16 + 4:]
    body_reply = bytearray(delete_request(1, socket.AF_INET, reply)[16 + 4:])
    struct.pack_into("=H", body_reply, 2, 2 | 0x8000)  # CTA_TUPLE_REPLY
    answer = struct.pack("=BBH", socket.AF_INET, 0, 0) + body_orig + bytes(body_reply)
    assert decode_entry(answer, 0, len(answer)) == (orig, reply)
    v6 = Tuple("fd00::5", "fd00:96::a", socket.IPPROTO_UDP, 40000, 53)
    body6 = delete_request(1, socket.AF_INET6, v6)[16:]
    assert decode_entry(body6, 0, len(body6)) is None  # no reply tuple: skipped
    for dst, want in ((None, FILTER_PROTO_NUM), (("10.96.0.10", 53),
                                                 FILTER_PROTO_NUM | FILTER_IP_DST | FILTER_PROTO_DST_PORT)):
        req = dump_request(3, socket.AF_INET, socket.IPPROTO_UDP, dst)
        at = req.index(struct.pack("=HH", 12, CTA_FILTER | 0x8000))
        assert struct.unpack_from("=I", req, at + 8)[0] == want
