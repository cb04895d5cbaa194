"""Node plumbing's pure parts (svcproxy.node.nat, .dummy) and NodePlumbing's logic.

The nftables scripts are also checked against the real nft and the host kernel's
nf_tables, in a network namespace of the test's own (skipped, with the reason, where
nft or namespaces are unavailable). The dummy device needs a kernel with the dummy
driver: that part runs in the VM (tests/kernel/test_node.py).
"""

from __future__ import annotations

import logging
from dataclasses import replace
import os
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest

from svcproxy.model import Destination, Protocol, ServiceKey, Table, VirtualService
from svcproxy.node.dummy import AddressChanges, address_changes, bound_addresses
from svcproxy.node.nat import (BIND, ElementIndex, NatConfig, NatElements, ServiceNat, canonical, element_script,
                               nat_elements, parse_listing, render_table, rule_comments, structure_tag)
from svcproxy.node.nftables import NftError, Nftables
from svcproxy.node.plumbing import NodePlumbing, PlumbingConfig, node_sysctls

TCP, UDP = Protocol.TCP, Protocol.UDP
NODE = "192.168.50.1"
NODE6 = "fd00:50::1"


def vs(proto: Protocol, addr: str, port: int, *dests: str) -> VirtualService:
    return VirtualService(ServiceKey(proto, addr, port), "rr", None, (),
                          tuple(Destination(d, 8080, 1) for d in dests))


def table(*vss: VirtualService) -> Table:
    return Table({v.key: v for v in vss})


WEB = [vs(TCP, "10.96.0.10", 80, "10.244.1.10"), vs(TCP, "fd00:10:96::a", 80, "fd00:244:1::10"),
       vs(TCP, NODE, 30080, "10.244.1.10"), vs(TCP, "203.0.113.7", 80, "10.244.1.10")]
LOCAL = [vs(UDP, "10.96.0.20", 53, "10.244.1.20"), vs(UDP, NODE, 30053, "10.244.1.20")]


def web_nat(local: bool = False) -> ServiceNat:
    return ServiceNat(tuple(v.key for v in WEB), ("10.96.0.10", "fd00:10:96::a"), local,
                      ("10.244.1.10", "fd00:244:1::10"))


def test_elements_classify_keys() -> None:
    desired = table(*WEB, *LOCAL)
    dns = ServiceNat(tuple(v.key for v in LOCAL), ("10.96.0.20",), True, ())
    e = nat_elements(desired, [web_nat(), dns], [NODE, "10.96.0.10", "fd00:10:96::a", "203.0.113.7", "10.96.0.20"])
    assert e.get("cluster4") == {("10.96.0.10", "tcp", 80), ("10.96.0.20", "udp", 53)}
    assert e.get("cluster6") == {("fd00:10:96::a", "tcp", 80)}
    # NodePort and externalIP with policy Cluster are masqueraded; policy Local keeps
    # the client address: the DNS Service's NodePort is in no set.
    assert e.get("external4") == {(NODE, "tcp", 30080), ("203.0.113.7", "tcp", 80)}
    assert e.get("external6") == frozenset()
    assert e.get("hairpin4") == {("10.244.1.10", "10.244.1.10")}
    assert e.get("hairpin6") == {("fd00:244:1::10", "fd00:244:1::10")}
    assert e.get(BIND) == frozenset()  # every address is a node address here: nothing to bind
    assert len(e) == 7
    bind = nat_elements(desired, [web_nat(), dns], [NODE]).get(BIND)
    assert bind == {("10.96.0.10",), ("fd00:10:96::a",), ("203.0.113.7",), ("10.96.0.20",)}


def test_elements_only_for_keys_in_the_desired_table() -> None:
    e = nat_elements(table(WEB[0]), [web_nat()])
    assert e.get("cluster4") == {("10.96.0.10", "tcp", 80)}
    assert e.get("external4") == frozenset() and e.get("cluster6") == frozenset()


def test_local_policy_service_has_no_external_elements() -> None:
    e = nat_elements(table(*WEB), [web_nat(local=True)])
    assert not e.get("external4") and not e.get("external6")


def test_element_script_deletes_then_adds_and_is_empty_when_equal() -> None:
    old = NatElements({"cluster4": frozenset({("10.96.0.1", "tcp", 80), ("10.96.0.2", "tcp", 80)})})
    new = NatElements({"cluster4": frozenset({("10.96.0.2", "tcp", 80), ("10.96.0.3", "udp", 53)})})
    assert element_script(old, new) == (
        "delete element inet svcproxy cluster4 { 10.96.0.1 . tcp . 80 }\n"
        "add element inet svcproxy cluster4 { 10.96.0.3 . udp . 53 }\n")
    assert element_script(new, new) == ""


def test_structure_depends_on_configuration() -> None:
    plain, every = NatConfig(), NatConfig(masquerade_all=True)
    cidr = NatConfig(cluster_cidrs=("10.244.0.0/16", "fd00:244::/48"))
    assert len({structure_tag(plain), structure_tag(every), structure_tag(cidr)}) == 3
    text = render_table(cidr, NatElements())
    assert "ip saddr != { 10.244.0.0/16 }" in text and "ip6 saddr != { fd00:244::/48 }" in text
    # The node's own traffic to ClusterIPs (output) always; forwarded traffic as configured.
    assert render_table(plain, NatElements()).count("@cluster4") == 1
    assert render_table(every, NatElements()).count("@cluster4") == 2
    assert len(rule_comments(cidr)) == 11 + 8  # 8: the LoadBalancer firewall (two chains, two families)


@pytest.mark.parametrize("mark", [0, 3, 1 << 32])
def test_mark_must_be_one_bit(mark: int) -> None:
    with pytest.raises(ValueError):
        NatConfig(mark=mark)


def test_bad_cluster_cidr_is_refused() -> None:
    with pytest.raises(ValueError):
        NatConfig(cluster_cidrs=("10.244.0.0/33",))


def test_parse_listing_reads_nft_json() -> None:
    doc = ('{"nftables": [{"metainfo": {"version": "1.0.6"}}, {"table": {"family": "inet", "name": "svcproxy"}},'
           '{"set": {"family": "inet", "name": "cluster6", "table": "svcproxy", "type": ["ipv6_addr",'
           '"inet_proto", "inet_service"], "elem": [{"concat": ["fd00:10:96:0::a", "tcp", 80]}]}},'
           '{"set": {"name": "hairpin4", "elem": [{"concat": ["10.244.1.10", "10.244.1.10"]}]}},'
           '{"set": {"name": "external4", "elem": [{"elem": {"val": {"concat": ["192.168.50.1", 17, 30053]},'
           '"comment": "x"}}]}},'
           '{"rule": {"chain": "postrouting", "comment": "svcproxy abc postrouting-marked", "expr": []}}]}')
    listing = parse_listing(doc)
    assert listing.comments == {"svcproxy abc postrouting-marked"}
    assert listing.elements.get("cluster6") == {("fd00:10:96::a", "tcp", 80)}
    assert listing.elements.get("hairpin4") == {("10.244.1.10", "10.244.1.10")}
    assert listing.elements.get("external4") == {("192.168.50.1", "udp", 30053)}


def test_bound_addresses_skip_node_addresses() -> None:
    desired = table(*WEB, *LOCAL)
    assert bound_addresses(desired, [NODE, NODE6]) == {"10.96.0.10", "fd00:10:96::a", "203.0.113.7", "10.96.0.20"}
    changes = address_changes(frozenset({"10.96.0.10", "10.96.0.30"}), frozenset({"10.96.0.10", "10.96.0.99"}))
    assert changes == AddressChanges(("10.96.0.30",), ("10.96.0.99",))
    assert changes.describe() == "+10.96.0.30 -10.96.0.99"
    assert not address_changes(frozenset({"a"}), frozenset({"a"}))


def test_node_sysctls() -> None:
    base = node_sysctls(False, {"conntrack": "1"})
    assert base == {"net/ipv4/vs/conntrack": "1", "net/ipv4/ip_forward": "1"}
    strict = node_sysctls(True, {})
    assert strict["net/ipv4/conf/all/arp_ignore"] == "1" and strict["net/ipv4/conf/all/arp_announce"] == "2"


# --------------------------------------------------------------------------------------
# NodePlumbing with a recording device and nft stand-in (the real ones: below and in the VM)


class RecordingDevice:
    def __init__(self, addresses: set[str] | None = None) -> None:
        self.bound = set(addresses or ())
        self.reads = 0
        self.applied: list[AddressChanges] = []
        self.fail: set[str] = set()

    def addresses(self) -> frozenset[str]:
        self.reads += 1
        return frozenset(self.bound)

    def apply(self, changes: AddressChanges) -> list[tuple[str, str]]:
        self.applied.append(changes)
        failed = [(a, "add: EPERM") for a in changes.add if a in self.fail]
        self.bound -= set(changes.delete)
        self.bound |= {a for a in changes.add if a not in self.fail}
        return failed

    def index(self) -> int | None:
        return 1

    def delete(self) -> bool:
        return True


class RecordingNft(Nftables):
    """Keeps the table as parsed state; scripts are recorded, not run."""

    def __init__(self) -> None:
        super().__init__("nft-not-run")
        self.listing: Any = None
        self.scripts: list[str] = []
        self.reads = 0

    def read(self) -> Any:
        self.reads += 1
        return self.listing

    def apply(self, script: str) -> None:
        self.scripts.append(script)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Plumbing(NodePlumbing):
    """Node plumbing as the reconcile loop drives it, with the test's Services (which
    a test may change between calls) and the node address."""

    def __init__(self, config: PlumbingConfig, services: dict[str, ServiceNat], **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.services = services

    def __call__(self, _desired: Any) -> None:
        self.sync(self.services, [NODE])


def plumbing(tmp_path: Path, config: PlumbingConfig | None = None, device: Any = None,
             nft: Any = None, clock: Clock | None = None, services: dict[str, ServiceNat] | None = None
             ) -> Plumbing:
    services = services if services is not None else {"web": web_nat()}
    root = tmp_path / "sys"
    for name, value in (("net/ipv4/vs/conntrack", "0"), ("net/ipv4/ip_forward", "0")):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(value + "\n")
    return Plumbing(config or PlumbingConfig(), services,
                    device=device or RecordingDevice(), nft=nft or RecordingNft(),
                    vs_sysctls={"conntrack": "1", "expire_nodest_conn": "1"}, sysctl_root=str(root),
                    monotonic=clock or Clock())


def test_plumbing_creates_then_patches_and_rereads_only_when_due(tmp_path: Path, caplog: Any) -> None:
    clock, device, nft = Clock(), RecordingDevice({"10.96.0.99"}), RecordingNft()
    services = {"web": web_nat()}
    p = plumbing(tmp_path, device=device, nft=nft, clock=clock, services=services)
    caplog.set_level(logging.INFO)
    p(table(*WEB))
    assert (tmp_path / "sys/net/ipv4/vs/conntrack").read_text() == "1"
    assert (tmp_path / "sys/net/ipv4/ip_forward").read_text() == "1"
    assert "net.ipv4.vs.expire_nodest_conn does not exist" in caplog.text  # skipped, logged
    assert device.bound == {"10.96.0.10", "fd00:10:96::a", "203.0.113.7"}
    assert len(nft.scripts) == 1 and nft.scripts[0].startswith("add table inet svcproxy\ndelete table")
    # Unchanged: nothing read, nothing written.
    p(table(*WEB))
    assert (device.reads, nft.reads, len(device.applied), len(nft.scripts)) == (1, 1, 1, 1)
    # The Service loses its externalIP: one address and one element, as a patch.
    services["web"] = replace(web_nat(), keys=tuple(v.key for v in WEB[:3]))
    p(table(*WEB[:3]))
    assert device.applied[-1] == AddressChanges((), ("203.0.113.7",))
    assert nft.scripts[-1] == "delete element inet svcproxy external4 { 203.0.113.7 . tcp . 80 }\n"
    # A second Service sharing the hairpin pair: only its own elements are added.
    services["other"] = ServiceNat((WEB[3].key,), (), False, ("10.244.1.10",))
    p(table(*WEB))
    assert nft.scripts[-1] == "add element inet svcproxy external4 { 203.0.113.7 . tcp . 80 }\n"
    del services["other"]
    p(table(*WEB[:3]))
    assert nft.scripts[-1] == "delete element inet svcproxy external4 { 203.0.113.7 . tcp . 80 }\n"
    assert len(nft.scripts) == 4
    # Due for a re-read: the table (as nft would list it) is taken as it is.
    clock.now = 61
    nft.listing = parse_listing_of(render_elements(table(*WEB[:3])), rule_comments(NatConfig()))
    p(table(*WEB[:3]))
    assert (device.reads, nft.reads, len(nft.scripts)) == (2, 2, 4)


def render_elements(desired: Table) -> NatElements:
    e = nat_elements(desired, [web_nat()])
    return NatElements({k: v for k, v in e.sets.items() if k != BIND})


def test_element_index_counts_shared_elements_and_follows_changes() -> None:
    index = ElementIndex()
    a = ServiceNat((WEB[0].key,), ("10.96.0.10",), False, ("10.244.1.10",))
    b = ServiceNat((LOCAL[0].key,), ("10.96.0.20",), False, ("10.244.1.10",))
    d = index.update({"a": a, "b": b}, [NODE])
    assert d.changes["hairpin4"] == ({("10.244.1.10", "10.244.1.10")}, frozenset())
    assert d.changes[BIND][0] == {("10.96.0.10",), ("10.96.0.20",)}
    assert not index.update({"a": a, "b": b}, [NODE])  # same objects: nothing to do
    d = index.update({"a": a}, [NODE])  # b gone; the shared hairpin pair stays
    assert d.changes.get("hairpin4", (frozenset(), frozenset())) == (frozenset(), frozenset())
    assert d.changes["cluster4"] == (frozenset(), {("10.96.0.20", "udp", 53)})
    moved = replace(a, local_endpoint_ips=("10.244.1.11",))
    d = index.update({"a": moved}, [NODE])
    assert d.changes["hairpin4"] == ({("10.244.1.11", "10.244.1.11")}, {("10.244.1.10", "10.244.1.10")})
    assert "cluster4" not in d.changes or d.changes["cluster4"] == (frozenset(), frozenset())
    # The node's own address became a virtual address's: it is not bound any more.
    d = index.update({"a": moved}, [NODE, "10.96.0.10"])
    assert d.changes[BIND] == (frozenset(), {("10.96.0.10",)})
    assert index.current().get(BIND) == frozenset()
    assert index.current().get("hairpin4") == {("10.244.1.11", "10.244.1.11")}


def parse_listing_of(elements: NatElements, comments: frozenset[str]) -> Any:
    from svcproxy.node.nat import Listing

    return Listing(comments, elements)


def test_plumbing_rebuilds_a_table_with_another_structure(tmp_path: Path) -> None:
    nft = RecordingNft()
    nft.listing = parse_listing_of(NatElements(), frozenset({"svcproxy 000000000000 postrouting-marked"}))
    plumbing(tmp_path, nft=nft)(table(*WEB))
    assert nft.scripts and "delete table inet svcproxy" in nft.scripts[0]


def test_plumbing_dry_run_changes_nothing(tmp_path: Path, caplog: Any) -> None:
    device, nft = RecordingDevice(), RecordingNft()
    caplog.set_level(logging.INFO)
    plumbing(tmp_path, PlumbingConfig(dry_run=True), device=device, nft=nft)(table(*WEB))
    assert not device.applied and not nft.scripts
    assert (tmp_path / "sys/net/ipv4/vs/conntrack").read_text() == "0\n"
    assert "dry run: would set sysctl net.ipv4.vs.conntrack=1" in caplog.text
    assert "dry run: would change addresses on kube-ipvs0: +10.96.0.10 +203.0.113.7 +fd00:10:96::a" in caplog.text
    assert "dry run: would create nftables table" in caplog.text


def test_plumbing_failure_is_counted_and_retried(tmp_path: Path, caplog: Any) -> None:
    class FailingNft(RecordingNft):
        def apply(self, script: str) -> None:
            raise NftError("nft -f failed (1): Error: Could not process rule")

    device = RecordingDevice()
    device.fail = {"203.0.113.7"}
    p = plumbing(tmp_path, device=device, nft=FailingNft())
    p(table(*WEB))
    assert p.stats.errors == {"dummy": 1, "nftables": 1}
    assert "cannot change address 203.0.113.7" in caplog.text and "Could not process rule" in caplog.text
    device.fail = set()
    p(table(*WEB))  # re-read and retried
    assert "203.0.113.7" in device.bound and device.reads == 2


# --------------------------------------------------------------------------------------
# the real nft, in a network namespace of the test's own


@pytest.fixture
def netns() -> Iterator[str]:
    if os.geteuid() != 0 or not shutil.which("nft") or not shutil.which("ip"):
        pytest.skip("needs root, nft and ip (nftables, iproute2)")
    name = f"svcproxy-nat-{uuid.uuid4().hex[:8]}"
    if subprocess.run(["ip", "netns", "add", name], capture_output=True).returncode != 0:
        pytest.skip("cannot create a network namespace here")
    try:
        probe = subprocess.run(["ip", "netns", "exec", name, "nft", "list", "tables"], capture_output=True, text=True)
        if probe.returncode != 0:
            pytest.skip(f"nft does not work in a namespace here: {probe.stderr.strip()}")
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


def in_ns(name: str) -> Any:
    def runner(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", name, *argv], **kw)
    return runner


@pytest.mark.parametrize("config", [NatConfig(), NatConfig(masquerade_all=True),
                                    NatConfig(cluster_cidrs=("10.244.0.0/16", "fd00:244::/48"))],
                         ids=["plain", "masquerade-all", "cluster-cidr"])
def test_real_nft_accepts_the_table_and_lists_it_back(netns: str, config: NatConfig) -> None:
    nft = Nftables(runner=in_ns(netns))
    assert nft.read() is None
    want = render_elements(table(*WEB, *LOCAL))
    nft.apply(render_table(config, want))
    listing = nft.read()
    assert listing is not None
    assert listing.comments == rule_comments(config)
    assert listing.elements == want
    # Patch: elements out and in, in one transaction; the listing follows.
    new = render_elements(table(WEB[0], WEB[2]))
    nft.apply(element_script(want, new))
    again = nft.read()
    assert again is not None and again.elements == new
    # Replacing the whole table is atomic and idempotent.
    nft.apply(render_table(config, want))
    nft.apply(render_table(config, want))
    final = nft.read()
    assert final is not None and final.elements == want
    assert nft.delete_table() is True and nft.delete_table() is False and nft.read() is None


def test_real_nft_rejects_a_broken_script_and_keeps_the_table(netns: str) -> None:
    nft = Nftables(runner=in_ns(netns))
    want = render_elements(table(*WEB))
    nft.apply(render_table(NatConfig(), want))
    with pytest.raises(NftError, match="nft -f failed"):
        nft.apply("add element inet svcproxy cluster4 { 10.96.0.99 . tcp . 80 }\n"
                  "add element inet svcproxy nosuchset { 1.2.3.4 }\n")
    listing = nft.read()
    assert listing is not None and listing.elements == want  # all or nothing


def test_plumbing_against_real_nft(netns: str, tmp_path: Path) -> None:
    nft = Nftables(runner=in_ns(netns))
    p = plumbing(tmp_path, nft=nft)
    p(table(*WEB))
    assert nft.read().elements == render_elements(table(*WEB))  # type: ignore[union-attr]
    # Someone deletes a rule: the next re-read rebuilds the table.
    subprocess.run(["ip", "netns", "exec", netns, "nft", "flush", "chain", "inet", "svcproxy", "output"], check=True)
    p._next_check = float("-inf")
    p(table(*WEB))
    listing = nft.read()
    assert listing is not None and listing.comments == rule_comments(NatConfig())
    assert p.stats.errors == {}
