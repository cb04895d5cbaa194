"""loadBalancerSourceRanges: parsed from the Service (a bad entry reported and left
out), turned into the nftables firewall sets (kube-proxy's rules, with the node's own
allowance), and accepted and listed back by the real nft (in a namespace of the
test's own; traffic through them is tested in the VM, tests/kernel/test_datapath.py)."""

from __future__ import annotations

from typing import Any

import pytest

from k8s_objects import endpoint, endpoint_slice, service, slice_port, svc_port
from svcproxy.kube.translate import NodeInfo, TranslateConfig, translate_service
from svcproxy.model import Protocol, ServiceKey
from svcproxy.node.nat import (BIND, NatConfig, NatElements, ServiceNat, element_script, parse_listing, render_table,
                               rule_comments, service_elements)
from svcproxy.node.nftables import Nftables
from svcproxy.reconcile.desired import nat_view
from test_node_nat import in_ns, netns  # noqa: F401  (the fixture)

LB, LB6, EXT = "203.0.113.10", "2001:db8::10", "198.51.100.7"
NODE = "192.168.50.1"
CONFIG = TranslateConfig(node=NodeInfo("node-a", (NODE,)))


def lb_service(ranges: Any, **kw: Any) -> dict[str, Any]:
    svc = service("web", type="LoadBalancer", cluster_ips=("10.96.0.10",), external_ips=(EXT,),
                  ports=[svc_port("http", 80, node_port=30080)], ingress=[{"ip": LB, "ipMode": "VIP"}], **kw)
    if ranges is not None:
        svc["spec"]["loadBalancerSourceRanges"] = ranges
    return svc


def translated(ranges: Any) -> tuple[ServiceNat, list[str]]:
    slices = [endpoint_slice("web", ports=[slice_port("http", 8080)], endpoints=[endpoint("10.244.1.5")])]
    vss, problems, info = translate_service(lb_service(ranges), slices, CONFIG)
    assert info is not None and len(vss) == 4  # the Service itself is whole
    return nat_view(info, info.keys), [f"{p.kind}: {p.message}" for p in problems]


def test_ranges_guard_only_the_load_balancer_address_and_bad_entries_are_reported_and_skipped() -> None:
    nat, problems = translated(["10.0.0.1/8", "nonsense", "192.0.2.0/24", "10.0.0.0/8", "192.0.2.7", 7])
    assert nat.source_ranges == ("10.0.0.0/8", "192.0.2.0/24")
    assert nat.load_balancer_ips == (LB,)  # not the externalIP, as in kube-proxy
    assert len(problems) == 3 and all(p.startswith("invalid-cidr: spec.loadBalancerSourceRanges") for p in problems)
    assert translated(None) == (nat_view_without_ranges(), [])


def nat_view_without_ranges() -> ServiceNat:
    nat, _ = translated(["10.0.0.0/8"])
    return ServiceNat(nat.keys, nat.cluster_ips, nat.external_policy_local, nat.local_endpoint_ips)


def test_firewall_elements_collapse_ranges_and_allow_the_node_itself_when_a_range_holds_it() -> None:
    key = ServiceKey(Protocol.TCP, LB, 80)
    other = ServiceKey(Protocol.TCP, "10.96.0.10", 80)
    svc = ServiceNat((key, other), ("10.96.0.10",), False, (), ("10.0.0.0/8", "10.1.0.0/16", "2001:db8:1::/48"),
                     (LB,))
    sets = service_elements(svc, frozenset({"192.168.50.1"}))
    assert sets["lbfw4"] == {(LB, "tcp", 80)}
    assert sets["lbsrc4"] == {(LB, "tcp", 80, "10.0.0.0/8")}  # overlapping ranges: one interval
    assert "lbfw6" not in sets  # no IPv6 LoadBalancer address
    node_in = service_elements(svc, frozenset({"10.9.9.9"}))
    assert node_in["lbsrc4"] == {(LB, "tcp", 80, "10.0.0.0/8"), (LB, "tcp", 80, f"{LB}/32")}
    # Only ranges of the other family: this family is not guarded (kube-proxy's rule).
    v6_only = ServiceNat((key,), (), False, (), ("2001:db8:1::/48",), (LB,))
    assert not any(name.startswith("lb") for name in service_elements(v6_only, frozenset()))


def test_parse_listing_reads_networks_back_in_canonical_form() -> None:
    doc = {"nftables": [{"set": {"name": "lbsrc4", "elem": [
        {"concat": [LB, 6, 80, {"prefix": {"addr": "10.0.0.0", "len": 8}}]},
        {"concat": [LB, "tcp", 80, LB]}]}}]}
    import json
    listing = parse_listing(json.dumps(doc))
    assert listing.elements.get("lbsrc4") == {(LB, "tcp", 80, "10.0.0.0/8"), (LB, "tcp", 80, f"{LB}/32")}


def nft_only(sets: dict[str, Any]) -> NatElements:
    return NatElements({k: v for k, v in sets.items() if k != BIND})


def test_real_nft_accepts_the_firewall_and_lists_it_back(netns: str) -> None:  # noqa: F811
    nft = Nftables(runner=in_ns(netns))
    key, key6 = ServiceKey(Protocol.TCP, LB, 80), ServiceKey(Protocol.UDP, LB6, 53)
    svc = ServiceNat((key, key6), (), False, (), ("10.0.0.0/8", "192.0.2.0/24", "2001:db8:1::/48"), (LB, LB6))
    want = nft_only(service_elements(svc, frozenset({"10.1.1.1"})))
    config = NatConfig()
    nft.apply(render_table(config, want))
    listing = nft.read()
    assert listing is not None and listing.comments == rule_comments(config)
    assert listing.elements == want
    narrower = ServiceNat((key, key6), (), False, (), ("192.0.2.0/25",), (LB, LB6))
    new = nft_only(service_elements(narrower, frozenset({"10.1.1.1"})))
    nft.apply(element_script(listing.elements, new))
    again = nft.read()
    assert again is not None and again.elements == new
    assert "lbfw6" not in new.sets and "lbfw6" not in again.elements.sets
