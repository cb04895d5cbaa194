"""Fuzzing translate() with realistic objects that have been damaged at random.

Three properties: (1) no damage ever makes translate() raise and the output always
obeys the Table invariants; (2) damage that is known to be invalid is always reported
and never costs any other Service its virtual services; (3) even arbitrary JSON-like
garbage in place of whole objects is survived.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from k8s_objects import endpoint, endpoint_slice, service, slice_port, svc_port
from svcproxy.kube.endpoints import canonical_address
from svcproxy.kube.files import load_objects
from svcproxy.kube.translate import (
    PROBLEM_KINDS,
    NodeInfo,
    TranslateConfig,
    Translation,
    translate,
)
from svcproxy.model import Forward, Protocol, canonical_ip

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "cluster.yaml"
CONFIG = TranslateConfig(node=NodeInfo("node-a", ("192.168.49.2", "fd00:192:168:49::2"), "zone-a"))


def _base() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    objs = load_objects(EXAMPLE)
    services = list(objs.services)
    slices = list(objs.endpoint_slices)
    # A few more shapes the example does not have: hints, SCTP, externalIPs, dual-stack
    # NodePort with internalTrafficPolicy Local.
    services.append(service(
        "edge", "shop", type="NodePort", cluster_ips=["10.96.60.1", "fd00:10:96::60:1"],
        ports=[svc_port("sip", 5060, "SCTP", node_port=30560), svc_port("web", 80, node_port=30081)],
        external_ips=["198.51.100.7"], internal_traffic_policy="Local",
        session_affinity="ClientIP", affinity_timeout=60,
    ))
    slices.append(endpoint_slice(
        "edge", "v4", "shop", ports=[slice_port("sip", 5060, "SCTP"), slice_port("web", 8080)],
        endpoints=[endpoint("10.244.0.60", node="node-a", for_zones=["zone-a"]),
                   endpoint("10.244.1.60", node="node-b", for_zones=["zone-b"]),
                   endpoint("10.244.1.61", node="node-b", ready=False, terminating=True)],
    ))
    slices.append(endpoint_slice(
        "edge", "v6", "shop", address_type="IPv6",
        ports=[slice_port("sip", 5060, "SCTP"), slice_port("web", 8080)],
        endpoints=[endpoint("fd00:10:244::60", node="node-a")],
    ))
    return services, slices


BASE_SERVICES, BASE_SLICES = _base()
BASELINE = translate(BASE_SERVICES, BASE_SLICES, CONFIG)

JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**40), max_value=2**40),
    st.floats(allow_nan=True),
    st.text(max_size=12),
    st.lists(st.one_of(st.integers(), st.text(max_size=4)), max_size=3),
    st.dictionaries(st.text(max_size=6), st.one_of(st.integers(), st.text(max_size=4)),
                    max_size=3),
    st.sampled_from([
        "None", "", "Local", "Cluster", "ClientIP", "::ffff:10.0.0.1", "fe80::1%eth0",
        "10.96.0.10", "fd00:10:96::a", "0.0.0.0", "224.0.0.1", "65536", "TCP", "udp", "SCTP",
        "IPv4", "IPv6", "FQDN", "Proxy", "VIP", "LoadBalancer", "NodePort", "ExternalName",
        "node-a", "zone-a", "svcproxy", 0, 65535, 65536, 30080, 86401,
    ]),
)


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a value inside nested dicts and lists."""
    out: list[tuple[Any, ...]] = []
    if isinstance(obj, dict):
        items: Any = obj.items()
    elif isinstance(obj, list):
        items = enumerate(obj)
    else:
        return out
    for k, v in items:
        out.append(prefix + (k,))
        out.extend(_paths(v, prefix + (k,)))
    return out


def _mutate(obj: Any, path: tuple[Any, ...], op: str, value: Any) -> None:
    parent = obj
    for k in path[:-1]:
        parent = parent[k]
    last = path[-1]
    if op == "delete":
        if isinstance(parent, dict):
            del parent[last]
        else:
            parent.pop(last)
    elif op == "replace":
        parent[last] = value
    elif op == "wrap":
        parent[last] = [parent[last]]
    elif op == "stringify":
        parent[last] = str(parent[last])


def check_invariants(t: Translation) -> None:
    for p in t.problems:
        assert p.kind in PROBLEM_KINDS, p
        assert p.severity in ("error", "warning"), p
        assert isinstance(p.obj, str) and isinstance(p.message, str)
    owners: dict[Any, tuple[str, str]] = {}
    for nn, info in t.services.items():
        for k in info.keys:
            assert k in t.table.services, (nn, k)
            assert k not in owners, (k, owners.get(k), nn)
            owners[k] = nn
    assert set(owners) == set(t.table.services)
    for k, vs in t.table.services.items():
        assert vs.key == k
        assert isinstance(k.protocol, Protocol)
        assert 1 <= k.port <= 65535
        assert canonical_ip(k.address) == k.address
        keys = [d.key for d in vs.destinations]
        assert keys == sorted(set(keys))
        for d in vs.destinations:
            assert canonical_ip(d.address) == d.address
            assert (":" in d.address) == (":" in k.address)
            assert 1 <= d.port <= 65535
            assert (d.weight, d.forward) == (1, Forward.MASQ)
        if vs.persistence is not None:
            assert 1 <= vs.persistence <= 86400


def test_baseline_is_clean() -> None:
    assert BASELINE.problems == ()
    check_invariants(BASELINE)
    assert len(BASELINE.table) > 20


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_random_damage_never_raises(data: st.DataObject) -> None:
    services = copy.deepcopy(BASE_SERVICES)
    slices = copy.deepcopy(BASE_SLICES)
    for _ in range(data.draw(st.integers(1, 6), label="mutations")):
        pool = data.draw(st.sampled_from(["service", "slice"]))
        objs = services if pool == "service" else slices
        i = data.draw(st.integers(0, len(objs) - 1))
        if data.draw(st.integers(0, 30)) == 0:
            objs[i] = data.draw(JUNK, label="whole object")
            continue
        paths = _paths(objs[i])
        if not paths:
            continue
        path = data.draw(st.sampled_from(paths), label="path")
        op = data.draw(st.sampled_from(["delete", "replace", "replace", "wrap", "stringify"]))
        _mutate(objs[i], path, op, data.draw(JUNK, label="value") if op == "replace" else None)
    t = translate(services, slices, CONFIG)
    check_invariants(t)


def _bad_ip() -> st.SearchStrategy[str]:
    def invalid(text: str) -> bool:
        if text in ("None", ""):
            return False
        try:
            canonical_address(text)
        except ValueError:
            return True
        return False

    return st.one_of(
        st.sampled_from(["10.96.0.256", "::ffff:10.96.0.1", "fe80::1%eth0", "10.96.0",
                         "010.96.0.1", "0.0.0.0", "239.1.1.1", "fd00::g", "web.default.svc"]),
        st.text(min_size=1, max_size=20).filter(invalid),
    )


BAD_PORT = st.one_of(st.integers(max_value=0), st.integers(min_value=65536),
                     st.text(max_size=5), st.floats(), st.booleans(), st.just([80]))
BAD_PROTOCOL = st.one_of(st.text(max_size=6).filter(lambda s: s not in ("TCP", "UDP", "SCTP")),
                         st.integers(), st.just(["TCP"]))

# (which objects, path inside, strategy for an invalid value). Each must be reported.
TARGETS: list[tuple[str, tuple[Any, ...], st.SearchStrategy[Any]]] = [
    ("service", ("spec", "ports", 0, "port"), BAD_PORT),
    ("service", ("spec", "ports", 0, "protocol"), BAD_PROTOCOL),
    ("service", ("spec", "clusterIPs", 0), _bad_ip()),
    ("service", ("spec", "externalIPs"), st.lists(_bad_ip(), min_size=1, max_size=2)),
    ("service", ("spec",), st.one_of(st.none(), st.text(), st.integers(), st.lists(st.integers()))),
    ("service", ("metadata",), st.one_of(st.none(), st.text(), st.integers())),
    ("service", ("metadata", "annotations"), st.just({"svcproxy.io/scheduler": "fastest"})),
    ("service", ("spec", "ports"), st.one_of(st.none(), st.text(), st.integers())),
    ("slice", ("endpoints", 0, "addresses", 0), _bad_ip()),
    ("slice", ("endpoints", 0, "conditions", "ready"), st.one_of(st.text(), st.integers())),
    ("slice", ("endpoints", 0, "addresses"), st.one_of(st.just([]), st.text(), st.integers())),
    ("slice", ("ports", 0, "port"), st.one_of(st.integers(max_value=0), st.integers(min_value=65536),
                                              st.text(max_size=4))),
    ("slice", ("ports", 0, "protocol"), BAD_PROTOCOL),
    ("slice", ("addressType",), st.text(max_size=6).filter(lambda s: s not in ("IPv4", "IPv6", "FQDN"))),
    ("slice", ("endpoints",), st.one_of(st.text(), st.integers(), st.dictionaries(st.text(), st.text()))),
]


def _served(objs: list[dict[str, Any]]) -> list[int]:
    return [i for i, o in enumerate(objs) if (o["metadata"]["namespace"], o["metadata"]["name"])
            in BASELINE.services]


SERVED_SERVICES = _served(BASE_SERVICES)
SERVED_SLICES = [
    i for i, s in enumerate(BASE_SLICES)
    if (s["metadata"]["namespace"], s["metadata"]["labels"]["kubernetes.io/service-name"])
    in BASELINE.services
]


def _owner(obj: dict[str, Any], kind: str) -> tuple[str, str]:
    meta = obj["metadata"]
    if kind == "service":
        return meta["namespace"], meta["name"]
    return meta["namespace"], meta["labels"]["kubernetes.io/service-name"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_known_bad_damage_is_reported_and_isolated(data: st.DataObject) -> None:
    kind, path, values = data.draw(st.sampled_from(TARGETS), label="target")
    services = copy.deepcopy(BASE_SERVICES)
    slices = copy.deepcopy(BASE_SLICES)
    objs, candidates = (services, SERVED_SERVICES) if kind == "service" else (slices, SERVED_SLICES)
    i = data.draw(st.sampled_from(candidates), label="object")
    victim = _owner(objs[i], kind)
    what = f"{'Service' if kind == 'service' else 'EndpointSlice'} {victim[0]}/" + (
        victim[1] if kind == "service" else objs[i]["metadata"]["name"])
    parent: Any = objs[i]
    for k in path[:-1]:
        parent = parent[k]
    parent[path[-1]] = data.draw(values, label="value")

    t = translate(services, slices, CONFIG)
    check_invariants(t)
    # Reported, against the damaged object (a Service without metadata has no name).
    if path == ("metadata",):
        what = "Service <unnamed>"
    assert any(p.obj == what for p in t.problems), t.problems
    # Isolated: every other Service keeps exactly its virtual services.
    for nn, info in BASELINE.services.items():
        if nn == victim:
            continue
        assert t.services[nn] == info
        for k in info.keys:
            assert t.table.services[k] == BASELINE.table.services[k]


json_like = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8)),
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(
            st.sampled_from(["metadata", "spec", "name", "namespace", "labels", "ports", "port",
                             "protocol", "clusterIP", "clusterIPs", "endpoints", "addresses",
                             "addressType", "conditions", "type", "status", "kubernetes.io/service-name",
                             "externalIPs", "nodePort", "loadBalancer", "ingress", "ip"]),
            children, max_size=5),
    ),
    max_leaves=25,
)


@settings(max_examples=300, deadline=None)
@given(st.lists(json_like, max_size=4), st.lists(json_like, max_size=4))
def test_garbage_objects_never_raise(services: list[Any], slices: list[Any]) -> None:
    t = translate(services, slices, CONFIG)
    check_invariants(t)
    mixed = translate([*services, *BASE_SERVICES], [*slices, *BASE_SLICES], CONFIG)
    check_invariants(mixed)
    # Garbage may add problems but never costs a real Service a virtual service (unless
    # a piece of garbage is, by chance, a valid Service claiming the same name or key).
    if not any(p.kind.startswith("duplicate-") for p in mixed.problems):
        assert set(BASELINE.table.services) <= set(mixed.table.services)
