"""Endpoint choice, table-tested the way kube-proxy tests CategorizeEndpoints: endpoint
conditions, duplicates across slices, ready/terminating fallback, local sets and
topology hints, plus the address canonicalisation everything else relies on."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from k8s_objects import endpoint
from svcproxy.kube.endpoints import (
    TOPOLOGY_NONE,
    TOPOLOGY_SAME_NODE,
    TOPOLOGY_SAME_ZONE,
    Endpoint,
    EndpointError,
    canonical_address,
    categorize_endpoints,
    dedupe,
    parse_endpoint,
    topology_mode,
    with_port,
)
from svcproxy.model import Family, canonical_ip

NODE = "node-a"


def ep(
    address: str,
    *,
    ready: bool = True,
    serving: bool = True,
    terminating: bool = False,
    local: bool = False,
    zones: tuple[str, ...] = (),
    nodes: tuple[str, ...] = (),
    port: int = 80,
) -> Endpoint:
    return Endpoint(address, port, ready, serving, terminating, local, frozenset(zones),
                    frozenset(nodes))


def addrs(eps: tuple[Endpoint, ...]) -> list[str]:
    return [e.address for e in eps]


# --- parsing one endpoint ------------------------------------------------------------


@pytest.mark.parametrize(
    "conditions, expected",
    [
        # (ready, serving, terminating) as sent -> as understood; None = field absent (null)
        ((None, None, None), (True, True, False)),
        ((True, True, False), (True, True, False)),
        ((False, True, True), (False, True, True)),
        ((False, False, True), (False, False, True)),
        ((False, None, None), (False, True, False)),
        ((None, False, None), (True, False, False)),
        ((None, None, True), (True, True, True)),
    ],
)
def test_conditions_null_means_ready_and_serving_not_terminating(
    conditions: tuple[bool | None, ...], expected: tuple[bool, bool, bool]
) -> None:
    ready, serving, terminating = conditions
    raw = endpoint("10.244.1.5", ready=ready, serving=serving, terminating=terminating)
    got = parse_endpoint(raw, port=8080, node_name=NODE)
    assert (got.ready, got.serving, got.terminating) == expected
    assert (got.address, got.port) == ("10.244.1.5", 8080)


def test_missing_conditions_object_means_ready() -> None:
    raw = endpoint("10.244.1.5")
    del raw["conditions"]
    got = parse_endpoint(raw, port=80, node_name=NODE)
    assert (got.ready, got.serving, got.terminating) == (True, True, False)


def test_only_the_first_address_counts() -> None:
    raw = endpoint("10.244.1.5", extra_addresses=["10.244.1.6", "10.244.1.7"])
    assert parse_endpoint(raw, port=80, node_name=NODE).address == "10.244.1.5"


@pytest.mark.parametrize(
    "node_name, endpoint_node, local",
    [("node-a", "node-a", True), ("node-a", "node-b", False), ("node-a", None, False),
     ("", "", False)],
)
def test_local_means_same_node_name(node_name: str, endpoint_node: str | None, local: bool) -> None:
    raw = endpoint("10.244.0.5", node=endpoint_node)
    assert parse_endpoint(raw, port=80, node_name=node_name).local is local


def test_hints_are_read() -> None:
    raw = endpoint("10.244.0.5", for_zones=["zone-a", "zone-b"], for_nodes=["node-a"])
    got = parse_endpoint(raw, port=80, node_name=NODE)
    assert got.zone_hints == {"zone-a", "zone-b"}
    assert got.node_hints == {"node-a"}


def test_address_is_canonicalised() -> None:
    raw = endpoint("fd00:10:244:0:0:0:0:0001")
    assert parse_endpoint(raw, port=80, node_name=NODE, family=Family.IPV6).address == (
        "fd00:10:244::1"
    )


@pytest.mark.parametrize(
    "mutate, kind",
    [
        (lambda e: e.update(addresses=[]), "missing-field"),
        (lambda e: e.pop("addresses"), "missing-field"),
        (lambda e: e.update(addresses="10.244.0.1"), "missing-field"),
        (lambda e: e.update(addresses=["10.244.0.256"]), "invalid-ip"),
        (lambda e: e.update(addresses=["pod.example.com"]), "invalid-ip"),
        (lambda e: e.update(addresses=[42]), "invalid-ip"),
        (lambda e: e.update(addresses=["fd00:10:244::5"]), "wrong-family"),
        (lambda e: e.update(conditions="ready"), "wrong-type"),
        (lambda e: e["conditions"].update(ready="true"), "wrong-type"),
        (lambda e: e["conditions"].update(terminating=1), "wrong-type"),
        (lambda e: e.update(nodeName=7), "wrong-type"),
        (lambda e: e.update(hints=["zone-a"]), "wrong-type"),
        (lambda e: e.update(hints={"forZones": "zone-a"}), "wrong-type"),
        (lambda e: e.update(hints={"forZones": [{"zone": "zone-a"}]}), "wrong-type"),
    ],
)
def test_broken_endpoints_raise_endpoint_error_with_kind(mutate: Any, kind: str) -> None:
    raw = endpoint("10.244.0.5")
    mutate(raw)
    with pytest.raises(EndpointError) as info:
        parse_endpoint(raw, port=80, node_name=NODE, family=Family.IPV4)
    assert info.value.kind == kind


def test_non_object_endpoint_is_malformed() -> None:
    with pytest.raises(EndpointError) as info:
        parse_endpoint(["10.244.0.5"], port=80, node_name=NODE)
    assert info.value.kind == "malformed-object"


def test_with_port_keeps_everything_else() -> None:
    base = ep("10.244.0.5", ready=False, terminating=True, local=True, zones=("z",))
    moved = with_port(base, 9090)
    assert moved == base._replace(port=9090)
    assert isinstance(moved, Endpoint)


# --- canonical addresses -------------------------------------------------------------


@pytest.mark.parametrize(
    "text, canonical",
    [
        ("10.244.0.5", "10.244.0.5"),
        (" 10.244.0.5 ", "10.244.0.5"),
        ("fd00::0001", "fd00::1"),
        ("FD00:10:96::A", "fd00:10:96::a"),
        ("fd00:10:96:0:0:0:0:a", "fd00:10:96::a"),
        ("127.0.0.1", "127.0.0.1"),
    ],
)
def test_canonical_address(text: str, canonical: str) -> None:
    assert canonical_address(text) == canonical


@pytest.mark.parametrize(
    "text",
    [
        "::ffff:10.244.0.5",  # IPv4-mapped: would be programmed as IPv6
        "fe80::1%eth0",  # scoped
        "010.244.0.5",  # leading zero: octal to some parsers
        "0.0.0.0",
        "::",
        "224.0.0.1",
        "ff02::1",
        "10.244.0.5/32",
        "",
        "10.244.0",
        "1.2.3.4.5",
    ],
)
def test_odd_addresses_are_rejected(text: str) -> None:
    with pytest.raises(ValueError):
        canonical_address(text)


@pytest.mark.parametrize("value", [None, 42, b"10.0.0.1", ["10.0.0.1"], True])
def test_non_string_addresses_are_rejected(value: object) -> None:
    with pytest.raises(ValueError):
        canonical_address(value)


@given(st.ip_addresses())
def test_canonical_address_agrees_with_the_model(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    text = str(ip) if ip.version == 4 else ip.exploded
    odd = ip.is_multicast or ip.is_unspecified or (ip.version == 6 and ip.ipv4_mapped is not None)
    if odd:
        with pytest.raises(ValueError):
            canonical_address(text)
    else:
        assert canonical_address(text) == canonical_ip(text)


@given(st.text(alphabet="0123456789.", max_size=17))
def test_ipv4_fast_path_accepts_exactly_what_ipaddress_accepts(text: str) -> None:
    try:
        expected: str | None = canonical_ip(text)
        ip = ipaddress.ip_address(text.strip())
        if ip.is_multicast or ip.is_unspecified:
            expected = None
    except ValueError:
        expected = None
    try:
        got: str | None = canonical_address(text)
    except ValueError:
        got = None
    assert got == expected


# --- duplicates ----------------------------------------------------------------------


def test_dedupe_prefers_non_terminating_whatever_the_order() -> None:
    old = ep("10.244.0.5", ready=False, terminating=True)
    new = ep("10.244.0.5", ready=True)
    assert dedupe([old, new]) == [new]
    assert dedupe([new, old]) == [new]


def test_dedupe_keeps_the_first_of_two_live_ones() -> None:
    a = ep("10.244.0.5", local=True)
    b = ep("10.244.0.5", local=False)
    assert dedupe([a, b]) == [a]
    assert dedupe([b, a]) == [b]


def test_dedupe_keys_on_address_and_port() -> None:
    a = ep("10.244.0.5", port=8080)
    b = ep("10.244.0.5", port=9090)
    c = ep("10.244.0.6", port=8080)
    assert dedupe([a, b, c, a]) == [a, b, c]


# --- topology ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, endpoints, zone, mode",
    [
        ("no hints", [ep("10.0.0.1"), ep("10.0.0.2")], "zone-a", TOPOLOGY_NONE),
        ("all hinted, one for us",
         [ep("10.0.0.1", zones=("zone-a",)), ep("10.0.0.2", zones=("zone-b",))], "zone-a",
         TOPOLOGY_SAME_ZONE),
        ("one ready endpoint lacks a hint",
         [ep("10.0.0.1", zones=("zone-a",)), ep("10.0.0.2")], "zone-a", TOPOLOGY_NONE),
        ("unready endpoint without hint does not matter",
         [ep("10.0.0.1", zones=("zone-a",)), ep("10.0.0.2", ready=False)], "zone-a",
         TOPOLOGY_SAME_ZONE),
        ("no hint for our zone",
         [ep("10.0.0.1", zones=("zone-b",)), ep("10.0.0.2", zones=("zone-c",))], "zone-a",
         TOPOLOGY_NONE),
        ("node has no zone",
         [ep("10.0.0.1", zones=("zone-a",))], None, TOPOLOGY_NONE),
        ("hint for our zone only on an unready endpoint",
         [ep("10.0.0.1", zones=("zone-b",)), ep("10.0.0.2", ready=False, zones=("zone-a",))],
         "zone-a", TOPOLOGY_NONE),
        ("nothing ready", [ep("10.0.0.1", ready=False, zones=("zone-a",))], "zone-a",
         TOPOLOGY_NONE),
        ("one ready endpoint has only a node hint, not for us",
         [ep("10.0.0.1", zones=("zone-a",)), ep("10.0.0.2", nodes=("node-b",))], "zone-a",
         TOPOLOGY_NONE),
        ("node hints win over zone hints",
         [ep("10.0.0.1", zones=("zone-a",), nodes=(NODE,)),
          ep("10.0.0.2", zones=("zone-a",), nodes=("node-b",))], "zone-a", TOPOLOGY_SAME_NODE),
        ("node hints not for us fall back to zone hints",
         [ep("10.0.0.1", zones=("zone-a",), nodes=("node-c",)),
          ep("10.0.0.2", zones=("zone-b",), nodes=("node-b",))], "zone-a", TOPOLOGY_SAME_ZONE),
    ],
)
def test_topology_mode(name: str, endpoints: list[Endpoint], zone: str | None, mode: str) -> None:
    assert topology_mode(endpoints, NODE, zone) == mode, name


# --- CategorizeEndpoints -------------------------------------------------------------


@pytest.mark.parametrize(
    "name, endpoints, zone, cluster, local",
    [
        ("ready endpoints only",
         [ep("10.0.0.1"), ep("10.0.0.2", ready=False, serving=False), ep("10.0.0.3", local=True)],
         None, ["10.0.0.1", "10.0.0.3"], ["10.0.0.3"]),
        ("terminating endpoints are used only when nothing is ready",
         [ep("10.0.0.1"), ep("10.0.0.2", ready=False, serving=True, terminating=True)],
         None, ["10.0.0.1"], []),
        ("serving terminating fallback",
         [ep("10.0.0.1", ready=False, serving=True, terminating=True),
          ep("10.0.0.2", ready=False, serving=False, terminating=True),
          ep("10.0.0.3", ready=False, serving=True, terminating=False)],
         None, ["10.0.0.1"], []),
        ("local set falls back independently of the cluster set",
         [ep("10.0.0.1"),
          ep("10.0.0.2", ready=False, serving=True, terminating=True, local=True)],
         None, ["10.0.0.1"], ["10.0.0.2"]),
        ("local ready preferred over local terminating",
         [ep("10.0.0.1", local=True),
          ep("10.0.0.2", ready=False, serving=True, terminating=True, local=True)],
         None, ["10.0.0.1"], ["10.0.0.1"]),
        ("local non-serving terminating is never used",
         [ep("10.0.0.1"), ep("10.0.0.2", ready=False, serving=False, terminating=True, local=True)],
         None, ["10.0.0.1"], []),
        ("zone hints narrow the cluster set",
         [ep("10.0.0.1", zones=("zone-a",)), ep("10.0.0.2", zones=("zone-b",)),
          ep("10.0.0.3", zones=("zone-a",))],
         "zone-a", ["10.0.0.1", "10.0.0.3"], []),
        ("zone hints ignored when one ready endpoint has none",
         [ep("10.0.0.1", zones=("zone-a",)), ep("10.0.0.2")],
         "zone-a", ["10.0.0.1", "10.0.0.2"], []),
        ("zone hints ignored when none is for this zone",
         [ep("10.0.0.1", zones=("zone-b",)), ep("10.0.0.2", zones=("zone-c",))],
         "zone-a", ["10.0.0.1", "10.0.0.2"], []),
        ("hints do not narrow the local set",
         [ep("10.0.0.1", zones=("zone-a",)), ep("10.0.0.2", zones=("zone-b",), local=True)],
         "zone-a", ["10.0.0.1"], ["10.0.0.2"]),
        ("terminating fallback ignores topology",
         [ep("10.0.0.1", ready=False, terminating=True, zones=("zone-b",)),
          ep("10.0.0.2", ready=False, terminating=True, zones=("zone-a",))],
         "zone-a", ["10.0.0.1", "10.0.0.2"], []),
        ("node hints keep only ours",
         [ep("10.0.0.1", nodes=(NODE,), local=True), ep("10.0.0.2", nodes=("node-b",))],
         None, ["10.0.0.1"], ["10.0.0.1"]),
        ("no endpoints", [], "zone-a", [], []),
    ],
)
def test_categorize_endpoints(
    name: str, endpoints: list[Endpoint], zone: str | None, cluster: list[str], local: list[str]
) -> None:
    got = categorize_endpoints(endpoints, node_name=NODE, zone=zone)
    assert addrs(got.cluster) == cluster, name
    assert addrs(got.local) == local, name


def test_categorized_sets_are_sorted_by_address_then_port() -> None:
    eps = [ep("10.0.0.2", port=80), ep("10.0.0.10", port=80), ep("10.0.0.2", port=70)]
    got = categorize_endpoints(eps, node_name=NODE)
    assert [(e.address, e.port) for e in got.cluster] == [
        ("10.0.0.10", 80), ("10.0.0.2", 70), ("10.0.0.2", 80)
    ]


def test_unwanted_sets_are_left_empty() -> None:
    eps = [ep("10.0.0.1", local=True)]
    assert categorize_endpoints(eps, node_name=NODE, want_local=False).local == ()
    assert categorize_endpoints(eps, node_name=NODE, want_cluster=False).cluster == ()
