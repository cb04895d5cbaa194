"""Services + EndpointSlices -> Table, one test per kube-proxy parity rule, then bad
input (skip only the broken piece, report it, never raise), determinism, node info,
and examples/cluster.yaml end to end."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Iterator, Mapping

import pytest

from k8s_objects import (
    endpoint,
    endpoint_slice,
    external_name_service,
    node,
    service,
    slice_port,
    svc_port,
)
from svcproxy.kube.files import load_objects
from svcproxy.kube.translate import (
    PROBLEM_KINDS,
    NodeInfo,
    Problem,
    ServiceInfo,
    TranslateConfig,
    Translation,
    node_info,
    translate,
    translate_service,
)
from svcproxy.model import (
    DEFAULT_AFFINITY_TIMEOUT,
    Destination,
    Family,
    Forward,
    Protocol,
    ServiceKey,
    VirtualService,
)

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "cluster.yaml"

TCP, UDP, SCTP = Protocol.TCP, Protocol.UDP, Protocol.SCTP
NODE_A = NodeInfo("node-a", ("192.168.49.2", "fd00:192:168:49::2"), "zone-a")
CONFIG = TranslateConfig(node=NODE_A)
V4_ONLY = TranslateConfig(node=NODE_A, families=frozenset({Family.IPV4}))


def key(proto: Protocol, address: str, port: int) -> ServiceKey:
    return ServiceKey(proto, address, port)


def dests(t: Translation, proto: Protocol, address: str, port: int) -> list[str]:
    """Destinations of one virtual service as "ip:port" text (fails if it is absent)."""
    vs = t.table.services[key(proto, address, port)]
    return [str(d.key) for d in vs.destinations]


def kinds(t: Translation | list[Problem] | tuple[Problem, ...]) -> list[str]:
    problems = t.problems if isinstance(t, Translation) else t
    return [p.kind for p in problems]


def web(**kw: Any) -> dict[str, Any]:
    kw.setdefault("cluster_ips", ["10.96.12.34"])
    kw.setdefault("ports", [svc_port("http", 80, target_port="http")])
    return service("web", **kw)


def web_slice(*eps: dict[str, Any], suffix: str = "abc12", **kw: Any) -> dict[str, Any]:
    kw.setdefault("ports", [slice_port("http", 8080)])
    return endpoint_slice("web", suffix, endpoints=eps or (
        endpoint("10.244.0.10", node="node-a"), endpoint("10.244.1.10", node="node-b")), **kw)


# --- selection -----------------------------------------------------------------------


def test_plain_clusterip_service() -> None:
    t = translate([web()], [web_slice()], CONFIG)
    assert t.problems == ()
    assert t.table.sorted() == [
        VirtualService(
            key(TCP, "10.96.12.34", 80), "rr", None, frozenset(),
            (Destination("10.244.0.10", 8080, 1, Forward.MASQ),
             Destination("10.244.1.10", 8080, 1, Forward.MASQ)),
        )
    ]


@pytest.mark.parametrize(
    "svc",
    [
        web(labels={"service.kubernetes.io/service-proxy-name": "other-proxy"}),
        web(labels={"service.kubernetes.io/service-proxy-name": ""}),
        web(labels={"service.kubernetes.io/headless": ""}),
        web(cluster_ips=["None"]),
        web(cluster_ips=[]),
        external_name_service("web"),
    ],
    ids=["other-proxy", "empty-proxy-name", "headless-label", "clusterIP-None",
         "clusterIP-empty", "ExternalName"],
)
def test_skipped_services_make_nothing_and_their_slices_are_not_orphans(svc: dict[str, Any]) -> None:
    t = translate([svc], [web_slice()], CONFIG)
    assert len(t.table) == 0
    assert t.problems == ()
    assert ("default", "web") not in t.services


def test_service_for_our_proxy_name_is_served() -> None:
    svc = web(labels={"service.kubernetes.io/service-proxy-name": "svcproxy"})
    t = translate([svc], [web_slice()], CONFIG)
    assert dests(t, TCP, "10.96.12.34", 80) == ["10.244.0.10:8080", "10.244.1.10:8080"]
    other = translate([svc], [web_slice()], TranslateConfig(node=NODE_A, proxy_name="blue"))
    assert len(other.table) == 0


def test_slices_labelled_for_another_proxy_or_headless_are_never_orphans() -> None:
    slices = [
        web_slice(labels={"service.kubernetes.io/headless": ""}),
        web_slice(suffix="x", labels={"service.kubernetes.io/service-proxy-name": "other"}),
    ]
    assert translate([], slices, CONFIG).problems == ()


def test_slice_of_missing_service_is_an_orphan_warning() -> None:
    t = translate([web()], [web_slice(), endpoint_slice("gone", endpoints=[endpoint("10.244.0.9")])],
                  CONFIG)
    assert [(p.kind, p.obj, p.severity) for p in t.problems] == [
        ("orphan-slice", "EndpointSlice default/gone-abc12", "warning")
    ]
    assert dests(t, TCP, "10.96.12.34", 80) == ["10.244.0.10:8080", "10.244.1.10:8080"]


def test_slices_join_services_by_namespace_too() -> None:
    other_ns = endpoint_slice("web", namespace="shop", endpoints=[endpoint("10.244.0.99")])
    t = translate([web()], [web_slice(), other_ns], CONFIG)
    assert dests(t, TCP, "10.96.12.34", 80) == ["10.244.0.10:8080", "10.244.1.10:8080"]
    assert kinds(t) == ["orphan-slice"]


# --- addresses -----------------------------------------------------------------------


def test_every_cluster_ip_of_a_served_family() -> None:
    svc = web(cluster_ips=["10.96.12.34", "fd00:10:96::1234"])
    v6 = endpoint_slice("web", "v6", address_type="IPv6", ports=[slice_port("http", 8080)],
                        endpoints=[endpoint("fd00:10:244::10", node="node-a")])
    t = translate([svc], [web_slice(), v6], CONFIG)
    assert set(t.table.services) == {key(TCP, "10.96.12.34", 80), key(TCP, "fd00:10:96::1234", 80)}
    assert dests(t, TCP, "fd00:10:96::1234", 80) == ["[fd00:10:244::10]:8080"]
    assert dests(t, TCP, "10.96.12.34", 80) == ["10.244.0.10:8080", "10.244.1.10:8080"]

    v4 = translate([svc], [web_slice(), v6], V4_ONLY)
    assert set(v4.table.services) == {key(TCP, "10.96.12.34", 80)}
    assert v4.problems == ()


def test_cluster_ip_falls_back_to_the_singular_field() -> None:
    svc = web()
    del svc["spec"]["clusterIPs"]
    t = translate([svc], [web_slice()], CONFIG)
    assert set(t.table.services) == {key(TCP, "10.96.12.34", 80)}


def test_addresses_are_canonicalised() -> None:
    svc = web(cluster_ips=["fd00:10:96:0:0:0:0:00a"], external_ips=["FD00:AB::0001"])
    s = endpoint_slice("web", address_type="IPv6", ports=[slice_port("http", 8080)],
                       endpoints=[endpoint("fd00:10:244:0::0010")])
    t = translate([svc], [s], CONFIG)
    assert dests(t, TCP, "fd00:10:96::a", 80) == ["[fd00:10:244::10]:8080"]
    assert dests(t, TCP, "fd00:ab::1", 80) == ["[fd00:10:244::10]:8080"]


def test_external_ips_and_load_balancer_ingress() -> None:
    svc = web(
        type="LoadBalancer",
        ports=[svc_port("http", 80, node_port=31080)],
        external_ips=["198.51.100.7"],
        ingress=[{"ip": "203.0.113.10", "ipMode": "VIP"}, {"ip": "203.0.113.11", "ipMode": "Proxy"},
                 {"hostname": "lb.example.com"}, {"ip": "203.0.113.12"}],
    )
    t = translate([svc], [web_slice()], CONFIG)
    assert set(t.table.services) == {
        key(TCP, "10.96.12.34", 80),
        key(TCP, "198.51.100.7", 80),
        key(TCP, "203.0.113.10", 80),
        key(TCP, "203.0.113.12", 80),
        key(TCP, "192.168.49.2", 31080),
    }
    assert t.problems == ()
    for address, port in [("198.51.100.7", 80), ("203.0.113.10", 80), ("192.168.49.2", 31080)]:
        assert dests(t, TCP, address, port) == ["10.244.0.10:8080", "10.244.1.10:8080"]


def test_node_port_on_each_node_address_of_a_served_family() -> None:
    node_info_ = NodeInfo("node-a", ("192.168.49.2", "10.0.5.2", "fd00:192:168:49::2"), "zone-a")
    svc = web(type="NodePort", ports=[svc_port("http", 80, node_port=30080)])
    t = translate([svc], [web_slice()], TranslateConfig(node=node_info_))
    # IPv4-only Service: no NodePort on the node's IPv6 address (kube-proxy agrees).
    assert set(t.table.services) == {
        key(TCP, "10.96.12.34", 80), key(TCP, "192.168.49.2", 30080), key(TCP, "10.0.5.2", 30080)
    }
    dual = web(type="NodePort", cluster_ips=["10.96.12.34", "fd00:10:96::1234"],
               ports=[svc_port("http", 80, node_port=30080)])
    t2 = translate([dual], [web_slice()], TranslateConfig(node=node_info_))
    assert key(TCP, "fd00:192:168:49::2", 30080) in t2.table.services
    assert dests(t2, TCP, "fd00:192:168:49::2", 30080) == []  # no IPv6 slice


def test_node_port_field_on_a_clusterip_service_is_ignored() -> None:
    svc = web(ports=[svc_port("http", 80, node_port=30080)])
    t = translate([svc], [web_slice()], CONFIG)
    assert set(t.table.services) == {key(TCP, "10.96.12.34", 80)}


def test_external_address_of_a_family_without_cluster_ip_is_a_warning() -> None:
    svc = web(external_ips=["fd00:ab::1", "198.51.100.7"])
    t = translate([svc], [web_slice()], CONFIG)
    assert key(TCP, "198.51.100.7", 80) in t.table.services
    assert key(TCP, "fd00:ab::1", 80) not in t.table.services
    assert [(p.kind, p.severity) for p in t.problems] == [("wrong-family", "warning")]
    # A family the node does not serve at all is not worth a warning.
    assert translate([svc], [web_slice()], V4_ONLY).problems == ()


# --- ports ---------------------------------------------------------------------------


def test_protocols_and_multi_port() -> None:
    svc = service("dns", "kube-system", cluster_ips=["10.96.0.10"], ports=[
        svc_port("dns", 53, "UDP"), svc_port("dns-tcp", 53, "TCP"),
        svc_port("metrics", 9153, None), svc_port("sctp", 3868, "SCTP"),
    ])
    s = endpoint_slice("dns", namespace="kube-system", ports=[
        slice_port("dns-tcp", 53, "TCP"), slice_port("dns", 53, "UDP"),
        slice_port("metrics", 9153, None), slice_port("sctp", 3868, "SCTP"),
    ], endpoints=[endpoint("10.244.0.3", node="node-a")])
    t = translate([svc], [s], CONFIG)
    assert t.problems == ()
    assert dests(t, UDP, "10.96.0.10", 53) == ["10.244.0.3:53"]
    assert dests(t, TCP, "10.96.0.10", 53) == ["10.244.0.3:53"]
    assert dests(t, TCP, "10.96.0.10", 9153) == ["10.244.0.3:9153"]
    assert dests(t, SCTP, "10.96.0.10", 3868) == ["10.244.0.3:3868"]
    assert len(t.table) == 4


def test_slice_port_must_match_name_and_protocol() -> None:
    svc = web(ports=[svc_port("dns", 53, "UDP"), svc_port("", 8125, "UDP")])
    s = web_slice(ports=[slice_port("dns", 5353, "TCP"), slice_port("other", 8125, "UDP")])
    t = translate([svc], [s], CONFIG)
    assert dests(t, UDP, "10.96.12.34", 53) == []
    assert dests(t, UDP, "10.96.12.34", 8125) == []
    unnamed = web_slice(suffix="z", ports=[slice_port("", 9125, "UDP")])
    assert dests(translate([svc], [unnamed], CONFIG), UDP, "10.96.12.34", 8125) == [
        "10.244.0.10:9125", "10.244.1.10:9125"
    ]


def test_named_target_ports_resolve_per_slice() -> None:
    svc = web(ports=[svc_port("http", 80, target_port="http"),
                     svc_port("https", 443, target_port="https")])
    old = web_slice(endpoint("10.244.0.10", node="node-a"), suffix="old",
                    ports=[slice_port("https", 8443), slice_port("http", 8080)])
    new = web_slice(endpoint("10.244.0.11", node="node-a"), suffix="new",
                    ports=[slice_port("https", 9443), slice_port("http", 9080)])
    t = translate([svc], [old, new], CONFIG)
    assert dests(t, TCP, "10.96.12.34", 80) == ["10.244.0.10:8080", "10.244.0.11:9080"]
    assert dests(t, TCP, "10.96.12.34", 443) == ["10.244.0.10:8443", "10.244.0.11:9443"]


def test_slice_ports_without_a_number_are_skipped_quietly() -> None:
    s = web_slice(ports=[slice_port("http", None), slice_port("http", 8080)])
    t = translate([web()], [s], CONFIG)
    assert dests(t, TCP, "10.96.12.34", 80) == ["10.244.0.10:8080", "10.244.1.10:8080"]
    assert t.problems == ()


def test_a_virtual_service_exists_for_every_port_even_without_endpoints() -> None:
    svc = web(ports=[svc_port("http", 80), svc_port("https", 443)])
    t = translate([svc], [], CONFIG)
    assert [(vs.key, vs.destinations) for vs in t.table.sorted()] == [
        (key(TCP, "10.96.12.34", 80), ()), (key(TCP, "10.96.12.34", 443), ())
    ]


# --- slices --------------------------------------------------------------------------


def test_slice_address_type_must_match_the_family() -> None:
    svc = web(cluster_ips=["10.96.12.34", "fd00:10:96::1234"])
    v6 = endpoint_slice("web", "v6", address_type="IPv6", ports=[slice_port("http", 8080)],
                        endpoints=[endpoint("fd00:10:244::10")])
    fqdn = endpoint_slice("web", "fq", address_type="FQDN", ports=[slice_port("http", 8080)],
                          endpoints=[endpoint("10.244.9.9")])
    t = translate([svc], [web_slice(), v6, fqdn], CONFIG)
    assert dests(t, TCP, "10.96.12.34", 80) == ["10.244.0.10:8080", "10.244.1.10:8080"]
    assert dests(t, TCP, "fd00:10:96::1234", 80) == ["[fd00:10:244::10]:8080"]
    assert t.problems == ()


def test_endpoint_of_the_wrong_family_is_skipped_and_reported() -> None:
    s = web_slice(endpoint("10.244.0.10"), endpoint("fd00:10:244::10"))
    t = translate([web()], [s], CONFIG)
    assert dests(t, TCP, "10.96.12.34", 80) == ["10.244.0.10:8080"]
    assert [(p.kind, p.obj) for p in t.problems] == [("wrong-family", "EndpointSlice default/web-abc12")]


def test_duplicate_ip_across_slices_non_terminating_wins() -> None:
    old = web_slice(endpoint("10.244.0.10", node="node-b", ready=False, terminating=True),
                    suffix="a")
    new = web_slice(endpoint("10.244.0.10", node="node-a"), suffix="b")
    svc = web(internal_traffic_policy="Local")
    t = translate([svc], [old, new], CONFIG)
    # The live endpoint (on node-a, this node) wins, so it is local and ready.
    assert dests(t, TCP, "10.96.12.34", 80) == ["10.244.0.10:8080"]
    assert t.services[("default", "web")].local_endpoints == 1
    t2 = translate([svc], [new, old], CONFIG)
    assert t2.table == t.table


# --- policies ------------------------------------------------------------------------

LOCAL_AND_REMOTE = (
    endpoint("10.244.0.10", node="node-a"),
    endpoint("10.244.1.10", node="node-b"),
)


def test_internal_traffic_policy_local() -> None:
    svc = web(internal_traffic_policy="Local")
    t = translate([svc], [web_slice(*LOCAL_AND_REMOTE)], CONFIG)
    assert dests(t, TCP, "10.96.12.34", 80) == ["10.244.0.10:8080"]
    assert t.services[("default", "web")].internal_policy_local is True


def test_internal_traffic_policy_local_without_local_endpoints_keeps_an_empty_service() -> None:
    svc = web(internal_traffic_policy="Local")
    t = translate([svc], [web_slice(endpoint("10.244.1.10", node="node-b"))], CONFIG)
    assert dests(t, TCP, "10.96.12.34", 80) == []


def test_internal_local_falls_back_to_local_terminating() -> None:
    svc = web(internal_traffic_policy="Local")
    s = web_slice(endpoint("10.244.0.10", node="node-a", ready=False, terminating=True),
                  endpoint("10.244.1.10", node="node-b"))
    t = translate([svc], [s], CONFIG)
    assert dests(t, TCP, "10.96.12.34", 80) == ["10.244.0.10:8080"]
    assert t.services[("default", "web")].local_endpoints == 0  # not ready: health says no


@pytest.mark.parametrize("svc_type", ["NodePort", "LoadBalancer"])
def test_external_traffic_policy_local(svc_type: str) -> None:
    svc = web(type=svc_type, external_traffic_policy="Local",
              ports=[svc_port("http", 80, node_port=31080)], external_ips=["198.51.100.7"],
              ingress=[{"ip": "203.0.113.10", "ipMode": "VIP"}] if svc_type == "LoadBalancer" else (),
              health_check_node_port=32000 if svc_type == "LoadBalancer" else None)
    t = translate([svc], [web_slice(*LOCAL_AND_REMOTE)], CONFIG)
    assert dests(t, TCP, "10.96.12.34", 80) == ["10.244.0.10:8080", "10.244.1.10:8080"]
    assert dests(t, TCP, "192.168.49.2", 31080) == ["10.244.0.10:8080"]
    assert dests(t, TCP, "198.51.100.7", 80) == ["10.244.0.10:8080"]
    if svc_type == "LoadBalancer":
        assert dests(t, TCP, "203.0.113.10", 80) == ["10.244.0.10:8080"]
    info = t.services[("default", "web")]
    assert info.external_policy_local is True
    assert info.health_check_node_port == (32000 if svc_type == "LoadBalancer" else None)
    assert t.problems == ()


REMOTE_ONLY = (endpoint("10.244.1.10", node="node-b"), endpoint("10.244.2.10", node="node-c"))


def external_local_web(**kw: Any) -> dict[str, Any]:
    return web(type="LoadBalancer", external_traffic_policy="Local", health_check_node_port=32000,
               external_ips=["198.51.100.7"], ingress=[{"ip": "203.0.113.10"}],
               ports=[svc_port("http", 80, node_port=31080)], **kw)


def test_external_local_without_local_endpoint_falls_back_to_the_cluster_like_kube_proxy() -> None:
    # kube-proxy's IPVS syncEndpoint: "node-local only" finds nothing here, so the
    # cluster-wide endpoints are used; Pods on this node keep the Service.
    t = translate([external_local_web()], [web_slice(*REMOTE_ONLY)], CONFIG)
    both = ["10.244.1.10:8080", "10.244.2.10:8080"]
    for address, port in (("192.168.49.2", 31080), ("198.51.100.7", 80), ("203.0.113.10", 80),
                          ("10.96.12.34", 80)):
        assert dests(t, TCP, address, port) == both, address
    info = t.services[("default", "web")]
    # ... while load balancers still see 503 here, and the metric counts it.
    assert (info.external_policy_local, info.local_endpoints) == (True, 0)
    assert info.no_local_external == {Family.IPV4} and info.no_local_internal == frozenset()


def test_external_local_fallback_follows_topology_hints() -> None:
    eps = (endpoint("10.244.1.10", node="node-b", for_zones=["zone-a"]),
           endpoint("10.244.2.10", node="node-c", for_zones=["zone-c"]))
    t = translate([external_local_web()], [web_slice(*eps)], CONFIG)
    assert dests(t, TCP, "192.168.49.2", 31080) == ["10.244.1.10:8080"]


def test_external_local_with_a_local_endpoint_is_not_counted() -> None:
    t = translate([external_local_web()], [web_slice(*LOCAL_AND_REMOTE)], CONFIG)
    assert dests(t, TCP, "192.168.49.2", 31080) == ["10.244.0.10:8080"]
    info = t.services[("default", "web")]
    assert info.no_local_external == info.no_local_internal == frozenset()


def test_a_local_serving_terminating_endpoint_is_local_enough() -> None:
    # kube-proxy's CategorizeEndpoints: local ready, else local serving-and-terminating.
    eps = (endpoint("10.244.0.10", node="node-a", ready=False, terminating=True),
           endpoint("10.244.1.10", node="node-b"))
    t = translate([external_local_web()], [web_slice(*eps)], CONFIG)
    assert dests(t, TCP, "192.168.49.2", 31080) == ["10.244.0.10:8080"]
    assert t.services[("default", "web")].no_local_external == frozenset()


def test_no_usable_endpoint_anywhere_is_not_counted() -> None:
    # kube-proxy counts only when the cluster has some endpoint (hasAnyEndpoints).
    eps = (endpoint("10.244.1.10", node="node-b", ready=False, serving=False),)
    for slices in ([], [web_slice(*eps)]):
        t = translate([external_local_web(internal_traffic_policy="Local")], slices, CONFIG)
        assert dests(t, TCP, "192.168.49.2", 31080) == []
        info = t.services[("default", "web")]
        assert info.no_local_external == info.no_local_internal == frozenset()


def test_internal_local_cluster_ip_keeps_its_contract_where_kube_proxy_falls_back() -> None:
    # kube-proxy's IPVS mode gives an externally reachable Service's ClusterIP the
    # cluster-wide endpoints under internalTrafficPolicy Local too; svcproxy keeps the
    # API's promise (node-local only, else nothing). The external ones fall back.
    svc = external_local_web(internal_traffic_policy="Local")
    t = translate([svc], [web_slice(*REMOTE_ONLY)], CONFIG)
    assert dests(t, TCP, "10.96.12.34", 80) == []
    assert dests(t, TCP, "192.168.49.2", 31080) == ["10.244.1.10:8080", "10.244.2.10:8080"]
    info = t.services[("default", "web")]
    assert info.no_local_internal == info.no_local_external == {Family.IPV4}


def test_internal_local_alone_counts_internal_only() -> None:
    svc = web(internal_traffic_policy="Local")
    t = translate([svc], [web_slice(*REMOTE_ONLY)], CONFIG)
    assert dests(t, TCP, "10.96.12.34", 80) == []
    info = t.services[("default", "web")]
    assert (info.no_local_internal, info.no_local_external) == ({Family.IPV4}, frozenset())


def test_no_local_endpoints_is_counted_per_family() -> None:
    svc = external_local_web(cluster_ips=["10.96.12.34", "fd00:96::12:34"])
    slices = [web_slice(*REMOTE_ONLY),
              web_slice(endpoint("fd00:10:244::10", node="node-a"), suffix="v6", address_type="IPv6")]
    t = translate([svc], slices, CONFIG)
    assert dests(t, TCP, "fd00:192:168:49::2", 31080) == ["[fd00:10:244::10]:8080"]
    assert t.services[("default", "web")].no_local_external == {Family.IPV4}


def test_external_traffic_policy_cluster_uses_all_ready_endpoints() -> None:
    for policy in ("Cluster", None):
        svc = web(type="NodePort", ports=[svc_port("http", 80, node_port=31080)])
        if policy is None:
            del svc["spec"]["externalTrafficPolicy"]
        t = translate([svc], [web_slice(*LOCAL_AND_REMOTE)], CONFIG)
        assert dests(t, TCP, "192.168.49.2", 31080) == ["10.244.0.10:8080", "10.244.1.10:8080"]
        assert t.services[("default", "web")].external_policy_local is False


def test_both_policies_local() -> None:
    svc = web(type="NodePort", external_traffic_policy="Local", internal_traffic_policy="Local",
              ports=[svc_port("http", 80, node_port=31080)])
    t = translate([svc], [web_slice(*LOCAL_AND_REMOTE)], CONFIG)
    assert dests(t, TCP, "10.96.12.34", 80) == ["10.244.0.10:8080"]
    assert dests(t, TCP, "192.168.49.2", 31080) == ["10.244.0.10:8080"]


def test_unknown_traffic_policy_value_means_cluster_with_a_warning() -> None:
    svc = web(internal_traffic_policy="Nearby")
    t = translate([svc], [web_slice(*LOCAL_AND_REMOTE)], CONFIG)
    assert dests(t, TCP, "10.96.12.34", 80) == ["10.244.0.10:8080", "10.244.1.10:8080"]
    assert [(p.kind, p.severity) for p in t.problems] == [("invalid-value", "warning")]


def test_topology_hints_apply_to_cluster_traffic() -> None:
    s = web_slice(
        endpoint("10.244.0.10", node="node-a", zone="zone-a", for_zones=["zone-a"]),
        endpoint("10.244.1.10", node="node-b", zone="zone-b", for_zones=["zone-b"]),
        endpoint("10.244.2.10", node="node-c", zone="zone-a", for_zones=["zone-a"]),
    )
    t = translate([web()], [s], CONFIG)
    assert dests(t, TCP, "10.96.12.34", 80) == ["10.244.0.10:8080", "10.244.2.10:8080"]
    # The node in zone-b sees only the zone-b endpoint; a node without zone sees all.
    zb = TranslateConfig(node=NodeInfo("node-b", ("192.168.49.3",), "zone-b"))
    assert dests(translate([web()], [s], zb), TCP, "10.96.12.34", 80) == ["10.244.1.10:8080"]
    nozone = TranslateConfig(node=NodeInfo("node-x"))
    assert len(dests(translate([web()], [s], nozone), TCP, "10.96.12.34", 80)) == 3


# --- settings ------------------------------------------------------------------------


def test_session_affinity_client_ip() -> None:
    t = translate([web(session_affinity="ClientIP", affinity_timeout=1800)], [web_slice()], CONFIG)
    assert t.table.services[key(TCP, "10.96.12.34", 80)].persistence == 1800
    svc = web(session_affinity="ClientIP")
    del svc["spec"]["sessionAffinityConfig"]
    t = translate([svc], [web_slice()], CONFIG)
    assert t.table.services[key(TCP, "10.96.12.34", 80)].persistence == DEFAULT_AFFINITY_TIMEOUT
    assert t.problems == ()
    t = translate([web()], [web_slice()], CONFIG)
    assert t.table.services[key(TCP, "10.96.12.34", 80)].persistence is None


@pytest.mark.parametrize("timeout", [0, -5, 86401, "1800", True, 1.5])
def test_bad_affinity_timeout_falls_back_with_a_warning(timeout: Any) -> None:
    t = translate([web(session_affinity="ClientIP", affinity_timeout=timeout)], [web_slice()],
                  CONFIG)
    assert t.table.services[key(TCP, "10.96.12.34", 80)].persistence == DEFAULT_AFFINITY_TIMEOUT
    assert [(p.kind, p.severity) for p in t.problems] == [("invalid-value", "warning")]


def test_affinity_applies_to_every_virtual_service_of_the_service() -> None:
    svc = web(type="NodePort", session_affinity="ClientIP", affinity_timeout=600,
              ports=[svc_port("http", 80, node_port=31080)])
    t = translate([svc], [web_slice()], CONFIG)
    assert {vs.persistence for vs in t.table.services.values()} == {600}
    assert len(t.table) == 2


def test_scheduler_default_annotation_and_fallback() -> None:
    assert translate([web()], [], CONFIG).table.sorted()[0].scheduler == "rr"
    assert translate([web()], [], TranslateConfig(node=NODE_A, scheduler="lc")).table.sorted()[
        0].scheduler == "lc"
    wlc = web(annotations={"svcproxy.io/scheduler": "wlc"})
    assert translate([wlc], [], CONFIG).table.sorted()[0].scheduler == "wlc"
    bogus = web(annotations={"svcproxy.io/scheduler": "fastest"})
    t = translate([bogus], [], CONFIG)
    assert t.table.sorted()[0].scheduler == "rr"
    assert [(p.kind, p.severity) for p in t.problems] == [("unknown-scheduler", "warning")]


def test_config_rejects_an_unknown_default_scheduler() -> None:
    with pytest.raises(ValueError):
        TranslateConfig(node=NODE_A, scheduler="fastest")


def test_destinations_are_weight_one_masquerade() -> None:
    t = translate([web()], [web_slice()], CONFIG)
    for d in t.table.services[key(TCP, "10.96.12.34", 80)].destinations:
        assert (d.weight, d.forward) == (1, Forward.MASQ)


# --- service info --------------------------------------------------------------------


def test_service_info() -> None:
    svc = web(type="LoadBalancer", external_traffic_policy="Local", health_check_node_port=32000,
              cluster_ips=["10.96.12.34", "fd00:10:96::1234"],
              ports=[svc_port("http", 80, node_port=31080)])
    v6 = endpoint_slice("web", "v6", address_type="IPv6", ports=[slice_port("http", 8080)],
                        endpoints=[endpoint("fd00:10:244::10", node="node-a")])
    s = web_slice(endpoint("10.244.0.10", node="node-a"), endpoint("10.244.1.10", node="node-b"),
                  endpoint("10.244.0.12", node="node-a", ready=False, terminating=True))
    t = translate([svc], [s, v6], CONFIG)
    info = t.services[("default", "web")]
    assert info == ServiceInfo(
        namespace="default",
        name="web",
        keys=tuple(sorted(t.table.services)),
        health_check_node_port=32000,
        external_policy_local=True,
        internal_policy_local=False,
        local_endpoints=1,  # one dual-stack Pod; the terminating one does not count
        cluster_ips=("10.96.12.34", "fd00:10:96::1234"),
        # Hairpin, as kube-proxy's loopback set: every local endpoint, terminating too
        # (it may still serve, when it is all there is).
        local_endpoint_ips=("10.244.0.10", "10.244.0.12", "fd00:10:244::10"),
    )
    assert len(info.keys) == 4


@pytest.mark.parametrize("how", ["flag", "annotation"])
def test_mh_virtual_services_hash_the_source_port_like_kube_proxy(how: str) -> None:
    # kube-proxy sets FlagSourceHash (IP_VS_SVC_F_SCHED2: ipvsadm's "mh-port") with mh.
    svc = web(type="NodePort", ports=[svc_port("http", 80, node_port=31080)])
    config = CONFIG
    if how == "flag":
        config = TranslateConfig(node=NODE_A, scheduler="mh")
    else:
        svc["metadata"]["annotations"] = {"svcproxy.io/scheduler": "mh"}
    t = translate([svc], [web_slice()], config)
    assert {(vs.scheduler, vs.flags) for vs in t.table.services.values()} == {("mh", frozenset({"mh-port"}))}
    plain = translate([web()], [web_slice()], TranslateConfig(node=NODE_A, scheduler="sh"))
    assert {vs.flags for vs in plain.table.services.values()} == {frozenset()}


def test_missing_health_check_node_port_is_reported() -> None:
    svc = web(type="LoadBalancer", external_traffic_policy="Local",
              ports=[svc_port("http", 80, node_port=31080)])
    t = translate([svc], [web_slice()], CONFIG)
    assert t.services[("default", "web")].health_check_node_port is None
    assert kinds(t) == ["invalid-port"]
    assert len(t.table) == 2


# --- bad input -----------------------------------------------------------------------


def test_one_bad_endpoint_does_not_lose_the_others() -> None:
    s = web_slice(endpoint("10.244.0.10"), endpoint("10.244.0.300"), endpoint("10.244.0.11"))
    s["endpoints"].append("10.244.0.12")
    s["endpoints"].append({"addresses": [], "conditions": {}})
    t = translate([web()], [s], CONFIG)
    assert dests(t, TCP, "10.96.12.34", 80) == ["10.244.0.10:8080", "10.244.0.11:8080"]
    assert kinds(t) == ["invalid-ip", "malformed-object", "missing-field"]
    assert all(p.obj == "EndpointSlice default/web-abc12" for p in t.problems)
    assert "endpoints[1]" in t.problems[0].message


def test_one_bad_port_does_not_lose_the_others() -> None:
    svc = web(ports=[svc_port("a", 0), svc_port("b", 70000), svc_port("c", 81, "QUIC"),
                     svc_port("d", 82), "e", svc_port("f", "83"),  # type: ignore[arg-type]
                     svc_port("g", 84, None)])
    s = web_slice(ports=[slice_port("d", 8082), slice_port("g", 8084), slice_port("x", 0),
                         slice_port("y", 8086, "ICMP")])
    t = translate([svc], [s], CONFIG)
    assert set(t.table.services) == {key(TCP, "10.96.12.34", 82), key(TCP, "10.96.12.34", 84)}
    assert dests(t, TCP, "10.96.12.34", 84) == ["10.244.0.10:8084", "10.244.1.10:8084"]
    assert sorted(kinds(t)) == ["invalid-port", "invalid-port", "invalid-port", "invalid-port",
                                "unknown-protocol", "unknown-protocol", "wrong-type"]


def test_bad_node_port_keeps_the_cluster_ip() -> None:
    svc = web(type="NodePort", ports=[svc_port("http", 80, node_port=99999)])
    t = translate([svc], [web_slice()], CONFIG)
    assert set(t.table.services) == {key(TCP, "10.96.12.34", 80)}
    assert kinds(t) == ["invalid-port"]


def test_bad_addresses_are_skipped_one_by_one() -> None:
    svc = web(cluster_ips=["10.96.12.34", "fd00::zz"], external_ips=["198.51.100.300", "198.51.100.7"],
              ingress=[{"ip": "not-an-ip"}])
    t = translate([svc], [web_slice()], CONFIG)
    assert set(t.table.services) == {key(TCP, "10.96.12.34", 80), key(TCP, "198.51.100.7", 80)}
    assert kinds(t) == ["invalid-ip", "invalid-ip", "invalid-ip"]


def test_service_whose_only_cluster_ip_is_bad_makes_nothing() -> None:
    t = translate([web(cluster_ips=["10.96.12.345"]), service("ok", cluster_ips=["10.96.0.7"])],
                  [web_slice()], CONFIG)
    assert set(t.table.services) == {key(TCP, "10.96.0.7", 80)}
    assert kinds(t) == ["invalid-ip"]


def test_one_bad_service_does_not_lose_the_others() -> None:
    broken: list[Any] = [
        "not a service",
        None,
        {"metadata": {"name": "nospec", "namespace": "default"}},
        {"spec": {"clusterIP": "10.96.0.50"}},
        service("bad-spec", cluster_ips=["10.96.0.51"]) | {"spec": "ClusterIP"},
        service("bad-ports", cluster_ips=["10.96.0.52"]) | {"metadata": {"name": 5}},
    ]
    t = translate([*broken, web()], [web_slice()], CONFIG)
    assert dests(t, TCP, "10.96.12.34", 80) == ["10.244.0.10:8080", "10.244.1.10:8080"]
    assert len(t.table) == 1
    assert len(t.problems) == len(broken)
    assert set(kinds(t)) <= {"malformed-object", "missing-field"}


class Exploding(Mapping[str, Any]):
    """A mapping that fails the way a buggy client object might."""

    def __init__(self, data: dict[str, Any], bad_key: str) -> None:
        self.data, self.bad_key = data, bad_key

    def __getitem__(self, k: str) -> Any:
        if k == self.bad_key:
            raise RuntimeError("boom")
        return self.data[k]

    def get(self, k: str, default: Any = None) -> Any:
        if k == self.bad_key:
            raise RuntimeError("boom")
        return self.data.get(k, default)

    def __iter__(self) -> Iterator[str]:
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)


def test_unexpected_exceptions_become_malformed_object_problems() -> None:
    svc = web()
    svc["spec"] = Exploding(svc["spec"], "ports")
    bad_slice = Exploding(web_slice(suffix="zzz"), "endpoints")
    ok = service("ok", cluster_ips=["10.96.0.7"])
    t = translate([svc, ok], [web_slice(), bad_slice], CONFIG)
    assert key(TCP, "10.96.0.7", 80) in t.table.services
    assert kinds(t) == ["malformed-object"]
    assert "RuntimeError" in t.problems[0].message

    svc2 = web()
    t2 = translate([svc2], [web_slice(suffix="aaa"), bad_slice], CONFIG)
    assert dests(t2, TCP, "10.96.12.34", 80) == ["10.244.0.10:8080", "10.244.1.10:8080"]
    assert [(p.kind, p.obj) for p in t2.problems] == [
        ("malformed-object", "EndpointSlice default/web-zzz")
    ]


def test_translate_survives_a_failing_iterable() -> None:
    def services() -> Iterator[dict[str, Any]]:
        yield web()
        raise RuntimeError("watch cache went away")

    t = translate(services(), [web_slice()], CONFIG)
    assert key(TCP, "10.96.12.34", 80) in t.table.services
    assert kinds(t) == ["malformed-object"]


def test_bad_slices() -> None:
    slices: list[Any] = [
        "nope",
        {"metadata": {"name": "x", "namespace": "default"}},  # no service-name label
        web_slice(suffix="a1") | {"addressType": "IPv5"},
        web_slice(suffix="a2") | {"addressType": None},
        web_slice(suffix="a3") | {"ports": "http"},
        web_slice(suffix="a4") | {"endpoints": {"addresses": ["10.244.0.1"]}},
        web_slice(endpoint("10.244.0.10")),
    ]
    t = translate([web()], slices, CONFIG)
    assert dests(t, TCP, "10.96.12.34", 80) == ["10.244.0.10:8080"]
    assert kinds(t) == ["malformed-object", "missing-field", "invalid-value", "missing-field",
                        "wrong-type", "wrong-type"]


def test_duplicate_virtual_service_keys_first_service_in_sorted_order_wins() -> None:
    a = service("alpha", cluster_ips=["10.96.0.1"], external_ips=["198.51.100.7"])
    b = service("beta", cluster_ips=["10.96.0.2"], external_ips=["198.51.100.7"])
    sa = endpoint_slice("alpha", endpoints=[endpoint("10.244.0.1")])
    sb = endpoint_slice("beta", endpoints=[endpoint("10.244.0.2")])
    for order in ([a, b], [b, a]):
        t = translate(order, [sb, sa], CONFIG)
        assert dests(t, TCP, "198.51.100.7", 80) == ["10.244.0.1:8080"]
        assert [(p.kind, p.obj) for p in t.problems] == [
            ("duplicate-virtual-service", "Service default/beta")
        ]
        assert key(TCP, "198.51.100.7", 80) in t.services[("default", "alpha")].keys
        assert key(TCP, "198.51.100.7", 80) not in t.services[("default", "beta")].keys
        assert dests(t, TCP, "10.96.0.2", 80) == ["10.244.0.2:8080"]


def test_duplicate_keys_inside_one_service_are_reported_once() -> None:
    svc = web(external_ips=["10.96.12.34"])  # same as its own ClusterIP
    t = translate([svc], [web_slice()], CONFIG)
    assert len(t.table) == 1
    assert [(p.kind, p.severity) for p in t.problems] == [("duplicate-virtual-service", "warning")]


def test_the_same_service_twice_keeps_the_first() -> None:
    t = translate([web(), web(cluster_ips=["10.96.99.99"])], [web_slice()], CONFIG)
    assert set(t.table.services) == {key(TCP, "10.96.12.34", 80)}
    assert kinds(t) == ["duplicate-service"]


def test_every_reported_kind_is_a_known_slug() -> None:
    svc = web(cluster_ips=["10.96.12.34", "fd00::zz"], internal_traffic_policy="Nearby",
              annotations={"svcproxy.io/scheduler": "x"},
              ports=[svc_port("a", 0), svc_port("b", 81, "QUIC"), svc_port("c", 82)])
    t = translate([svc, "x"], [web_slice(endpoint("fd00::1")),  # type: ignore[list-item]
                               endpoint_slice("gone")], CONFIG)
    assert len(t.problems) >= 6
    assert set(kinds(t)) <= PROBLEM_KINDS
    assert all(p.severity in ("error", "warning") for p in t.problems)


# --- incremental use and determinism -------------------------------------------------


def cluster_objects() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    objs = load_objects(EXAMPLE)
    return list(objs.services), list(objs.endpoint_slices)


def test_translate_service_alone_gives_the_same_virtual_services() -> None:
    services, slices = cluster_objects()
    whole = translate(services, slices, CONFIG)
    for svc in services:
        ns, name = svc["metadata"]["namespace"], svc["metadata"]["name"]
        own = [s for s in slices if s["metadata"]["namespace"] == ns
               and s["metadata"]["labels"]["kubernetes.io/service-name"] == name]
        vss, problems, info = translate_service(svc, own, CONFIG)
        assert problems == []
        assert {vs.key: vs for vs in vss} == {k: whole.table.services[k] for k in
                                              (info.keys if info else ())}
        assert info == whole.services.get((ns, name))


def test_input_order_does_not_matter() -> None:
    services, slices = cluster_objects()
    services.append(service("dup", cluster_ips=["10.96.0.99"], external_ips=["203.0.113.10"]))
    expected = translate(services, slices, CONFIG)
    rng = random.Random(7)
    for _ in range(5):
        rng.shuffle(services)
        rng.shuffle(slices)
        got = translate(services, slices, CONFIG)
        assert got.table == expected.table
        assert got.problems == expected.problems
        assert got.services == expected.services


def test_translate_does_not_modify_its_input() -> None:
    services, slices = cluster_objects()
    before = repr((services, slices))
    translate(services, slices, CONFIG)
    assert repr((services, slices)) == before


# --- node info -----------------------------------------------------------------------


def test_node_info_from_the_node_object() -> None:
    n = node("node-a", zone="zone-a", internal_ips=["192.168.49.2", "fd00:192:168:49::0002"],
             external_ips=["198.51.100.2"])
    info, problems = node_info("node-a", n)
    assert info == NodeInfo("node-a", ("192.168.49.2", "fd00:192:168:49::2", "198.51.100.2"),
                            "zone-a")
    assert problems == []


def test_node_info_primary_keeps_kube_proxys_primary_node_ips() -> None:
    # --nodeport-addresses primary: the first address of each family, InternalIPs
    # before ExternalIPs (kube-proxy's GetNodeHostIPs), loopback never.
    n = node("node-a", external_ips=["198.51.100.2", "2001:db8::2"],
             internal_ips=["127.0.0.1", "192.168.49.2", "192.168.49.3", "fd00::2"])
    n["status"]["addresses"].insert(0, n["status"]["addresses"].pop(4))  # an ExternalIP listed first
    info, problems = node_info("node-a", n, primary=True)
    assert info.addresses == ("192.168.49.2", "fd00::2") and problems == []
    only_external = node("node-a", internal_ips=[], external_ips=["2001:db8::2", "198.51.100.2"])
    assert node_info("node-a", only_external, primary=True)[0].addresses == ("2001:db8::2", "198.51.100.2")
    assert node_info("node-a", n, ["10.0.5.2", "10.0.5.3"], primary=True)[0].addresses == ("10.0.5.2",)
    assert node_info("node-a", None, primary=True)[0].addresses == ()


@pytest.mark.parametrize("internal, external", [([], []), (["127.0.0.1", "::1"], [])])
def test_node_info_primary_without_a_usable_address_says_so(internal: list[str], external: list[str]) -> None:
    # Without a warning, NodePorts would be served on no address and nothing would say why.
    info, problems = node_info("node-a", node("node-a", internal_ips=internal, external_ips=external), primary=True)
    assert info.addresses == ()
    assert [(p.kind, p.severity) for p in problems] == [("missing-field", "warning")]
    assert "--nodeport-addresses primary" in problems[0].message
    assert node_info("node-a", node("node-a", internal_ips=internal, external_ips=external))[1] == []


def test_node_info_override_ips_win() -> None:
    n = node("node-a", internal_ips=["192.168.49.2"])
    info, problems = node_info("node-a", n, ["10.0.5.2", "10.0.5.2", "bogus"])
    assert info.addresses == ("10.0.5.2",)
    assert info.zone == "zone-a"
    assert [p.kind for p in problems] == ["invalid-ip"]


def test_node_info_without_a_node() -> None:
    info, problems = node_info("node-a", None)
    assert info == NodeInfo("node-a")
    assert [(p.kind, p.severity) for p in problems] == [("missing-node", "warning")]
    info, problems = node_info("node-a", None, ["192.168.49.2"])
    assert info.addresses == ("192.168.49.2",)


def test_node_info_bad_fields() -> None:
    n = node("node-a", zone=None, internal_ips=["192.168.49.256", "192.168.49.2"])
    n["metadata"]["labels"]["topology.kubernetes.io/zone"] = 3
    info, problems = node_info("node-a", n)
    assert info == NodeInfo("node-a", ("192.168.49.2",), None)
    assert sorted(p.kind for p in problems) == ["invalid-ip", "wrong-type"]
    info, problems = node_info("node-a", "node-a")  # type: ignore[arg-type]
    assert info == NodeInfo("node-a") and [p.kind for p in problems] == ["malformed-object"]


# --- examples/cluster.yaml end to end ------------------------------------------------


def test_example_cluster_on_node_a() -> None:
    objs = load_objects(EXAMPLE)
    assert objs.problems == ()
    node_doc = next(n for n in objs.nodes if n["metadata"]["name"] == "node-a")
    info, problems = node_info("node-a", node_doc)
    assert problems == []
    assert info == NodeInfo("node-a", ("192.168.49.2", "fd00:192:168:49::2"), "zone-a")
    t = translate(objs.services, objs.endpoint_slices, TranslateConfig(node=info))
    assert t.problems == ()

    got = {str(vs.key): (vs.scheduler, vs.persistence, [str(d.key) for d in vs.destinations])
           for vs in t.table.sorted()}
    rr, wlc = "rr", "wlc"
    assert got == {
        # kube-dns: dual-stack, UDP 53 + TCP 53 + TCP 9153
        "udp://10.96.0.10:53": (rr, None, ["10.244.0.3:53", "10.244.1.4:53"]),
        "tcp://10.96.0.10:53": (rr, None, ["10.244.0.3:53", "10.244.1.4:53"]),
        "tcp://10.96.0.10:9153": (rr, None, ["10.244.0.3:9153", "10.244.1.4:9153"]),
        "udp://[fd00:10:96::a]:53": (rr, None, ["[fd00:10:244:1::4]:53", "[fd00:10:244::3]:53"]),
        "tcp://[fd00:10:96::a]:53": (rr, None, ["[fd00:10:244:1::4]:53", "[fd00:10:244::3]:53"]),
        "tcp://[fd00:10:96::a]:9153": (rr, None,
                                       ["[fd00:10:244:1::4]:9153", "[fd00:10:244::3]:9153"]),
        # web: named targetPorts resolve per slice; the terminating pod 10.244.1.11 is out
        "tcp://10.96.12.34:80": (rr, None,
                                 ["10.244.0.10:8080", "10.244.0.11:9080", "10.244.1.10:8080"]),
        "tcp://10.96.12.34:443": (rr, None,
                                  ["10.244.0.10:8443", "10.244.0.11:9443", "10.244.1.10:8443"]),
        # frontend: NodePort on node-a's IPv4 address only (IPv4-only Service)
        "tcp://10.96.40.1:80": (rr, None, ["10.244.0.20:8080", "10.244.1.20:8080"]),
        "tcp://192.168.49.2:30080": (rr, None, ["10.244.0.20:8080", "10.244.1.20:8080"]),
        # cart: ClientIP affinity for 30 minutes
        "tcp://10.96.50.5:6379": (rr, 1800, ["10.244.0.30:6379", "10.244.1.30:6379"]),
        # ingress: externalTrafficPolicy Local -> external VIPs only to node-a's pod;
        # the ipMode Proxy ingress IP 203.0.113.11 is not served
        "tcp://10.96.80.80:80": (wlc, None, ["10.244.0.40:8080", "10.244.1.40:8080"]),
        "tcp://10.96.80.80:443": (wlc, None, ["10.244.0.40:8443", "10.244.1.40:8443"]),
        "tcp://192.168.49.2:31080": (wlc, None, ["10.244.0.40:8080"]),
        "tcp://192.168.49.2:31443": (wlc, None, ["10.244.0.40:8443"]),
        "tcp://203.0.113.10:80": (wlc, None, ["10.244.0.40:8080"]),
        "tcp://203.0.113.10:443": (wlc, None, ["10.244.0.40:8443"]),
    }
    # headless db and ExternalName payments-api: skipped, no info, no orphan warning
    assert set(t.services) == {("kube-system", "kube-dns"), ("default", "web"),
                               ("default", "frontend"), ("default", "cart"),
                               ("default", "ingress")}
    ingress = t.services[("default", "ingress")]
    assert (ingress.health_check_node_port, ingress.external_policy_local,
            ingress.local_endpoints) == (32000, True, 1)
    assert t.services[("kube-system", "kube-dns")].local_endpoints == 1
    assert t.services[("default", "web")].local_endpoints == 2


def test_example_cluster_on_node_b_ipv4_only() -> None:
    objs = load_objects(EXAMPLE)
    node_doc = next(n for n in objs.nodes if n["metadata"]["name"] == "node-b")
    info, _ = node_info("node-b", node_doc)
    cfg = TranslateConfig(node=info, families=frozenset({Family.IPV4}))
    t = translate(objs.services, objs.endpoint_slices, cfg)
    assert t.problems == ()
    assert not any(":" in k.address for k in t.table.services)
    assert dests(t, TCP, "192.168.49.3", 31080) == ["10.244.1.40:8080"]
    assert dests(t, TCP, "203.0.113.10", 443) == ["10.244.1.40:8443"]
    assert dests(t, TCP, "192.168.49.3", 30080) == ["10.244.0.20:8080", "10.244.1.20:8080"]
    assert len(t.table) == 14
