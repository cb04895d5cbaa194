"""Kubernetes Services and EndpointSlices -> the IPVS ``Table`` one node wants.

Pure: plain API-server dicts in, frozen values out, no I/O, no clock, no mutable state
(only a cache of parsed addresses, in endpoints.py), so the same objects always give
the same table and a whole cluster can be tested in memory. The rules are kube-proxy's
IPVS mode (see the parity notes); where it leaves a choice open (two Services claiming
the same VIP:port) the answer is deterministic: Services are processed in sorted
(namespace, name) order and the first one wins.

Input is never trusted. The API server validates objects, but files, older servers,
other writers and future fields do not, and one bad object must never cost the node
the rest of its table. So every piece (endpoint, port, address, slice, Service) is
checked on its own, skipped when broken, and reported as a ``Problem`` with a short
stable ``kind`` (usable as a metric label); an unexpected exception is caught per
object and becomes a "malformed-object" problem. ``translate()`` does not raise.

One Service is translated in steps: what it asks for (service_spec.py), its endpoints
gathered from its slices (slice_endpoints.py), then the virtual services and the
``ServiceInfo`` built here. ``translate_service`` works on one Service and its slices
so that an incremental caller can recompute a single Service when only it changed;
``translate`` groups the slices by Service and puts the cluster together.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from svcproxy.kube.endpoints import Endpoint, canonical_address, categorize_endpoints
from svcproxy.kube.objects import (
    HEADLESS_LABEL,
    PROXY_NAME_LABEL,
    SCHEDULER_ANNOTATION,
    SERVICE_NAME_LABEL,
    ZONE_LABEL,
    NamespacedName,
    display_name,
    namespaced_name,
    slice_service,
)
from svcproxy.kube.owners import Owners
from svcproxy.kube.problems import PROBLEM_KINDS, Problem
from svcproxy.kube.service_spec import ServiceSpec, read_service
from svcproxy.kube.slice_endpoints import PortKey, endpoint_groups
from svcproxy.model import (
    IPVS_SCHEDULERS,
    Destination,
    Family,
    Forward,
    Protocol,
    ServiceKey,
    Table,
    VirtualService,
)

__all__ = [
    "HEADLESS_LABEL",
    "PROBLEM_KINDS",
    "PROXY_NAME_LABEL",
    "SCHEDULER_ANNOTATION",
    "SERVICE_NAME_LABEL",
    "ZONE_LABEL",
    "NodeInfo",
    "Origin",
    "Problem",
    "ServiceInfo",
    "TranslateConfig",
    "Translation",
    "node_info",
    "translate",
    "translate_service",
    "with_keys",
]

#: For isinstance: plain dicts first (what clients and YAML give), cheap to check.
_MAPPING = (dict, Mapping)
_NO_FLAGS: frozenset[str] = frozenset()
#: kube-proxy sets its FlagSourceHash (IP_VS_SVC_F_SCHED2, "mh-port") on every mh
#: virtual service, so that mh hashes the client's port as well as its address.
_MH_FLAGS: frozenset[str] = frozenset({"mh-port"})
_MASQ = Forward.MASQ
_NODE_ADDRESS_TYPES = ("InternalIP", "ExternalIP")


@dataclass(frozen=True)
class NodeInfo:
    """What translation needs to know about the node it runs for."""

    name: str
    addresses: tuple[str, ...] = ()
    zone: str | None = None


@dataclass(frozen=True)
class TranslateConfig:
    node: NodeInfo
    proxy_name: str = "svcproxy"
    families: frozenset[Family] = frozenset({Family.IPV4, Family.IPV6})
    scheduler: str = "rr"

    def __post_init__(self) -> None:
        # A bad default is an operator error at startup, not a per-object problem.
        if self.scheduler not in IPVS_SCHEDULERS:
            raise ValueError(f"unknown IPVS scheduler {self.scheduler!r}")


@dataclass(frozen=True)
class ServiceInfo:
    """What the node agent needs besides the table (health checks, metrics)."""

    namespace: str
    name: str
    keys: tuple[ServiceKey, ...]
    health_check_node_port: int | None
    external_policy_local: bool
    internal_policy_local: bool
    #: Ready endpoints on this node (the healthCheckNodePort answer): distinct
    #: addresses of the family with the most, so a dual-stack Pod counts once.
    local_endpoints: int
    #: The Service's ClusterIPs in the families served; every other address of
    #: its keys is an external/LoadBalancer address or a node address (NodePort).
    #: Node plumbing tells them apart for masquerading.
    cluster_ips: tuple[str, ...] = ()
    #: Addresses of this node's endpoints: a Pod reaching itself through the Service
    #: (hairpin) must be masqueraded, or it would answer itself directly.
    local_endpoint_ips: tuple[str, ...] = ()
    #: Families in which a virtual service under a Local policy found no endpoint on
    #: this node while the cluster has some: kube-proxy's
    #: sync_proxy_rules_no_local_endpoints_total, ``internal`` and ``external``.
    no_local_internal: frozenset[Family] = frozenset()
    no_local_external: frozenset[Family] = frozenset()
    #: loadBalancerSourceRanges, and the LoadBalancer ingress addresses they guard
    #: (empty when the Service has no valid range: every source may connect).
    source_ranges: tuple[str, ...] = ()
    load_balancer_ips: tuple[str, ...] = ()


@dataclass(frozen=True)
class Translation:
    table: Table
    problems: tuple[Problem, ...]
    services: Mapping[tuple[str, str], ServiceInfo] = field(default_factory=dict)
    #: What each virtual service is for (``translate`` only; the agent has no use for it).
    origins: Mapping[ServiceKey, tuple["Origin", ...]] = field(default_factory=dict)


@dataclass(frozen=True, order=True)
class Origin:
    """One Service port a virtual service serves, as a person names it."""

    namespace: str
    name: str
    #: The port's name, or its number when it has none.
    port: str
    #: ClusterIP, externalIP, LoadBalancer or NodePort.
    kind: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}:{self.port} {self.kind}"


#: (key, port name or number, kind) of each virtual service a Service asks for.
_OriginParts = tuple[ServiceKey, str, str]
#: (internal, external): families where a Local policy found no local endpoint.
_NoLocal = tuple[set[Family], set[Family]]


# --- small field readers -------------------------------------------------------------


def _mapping(value: object) -> Mapping[str, Any] | None:
    return value if isinstance(value, _MAPPING) else None


def _labels(obj: Mapping[str, Any], what: str, problems: list[Problem]) -> Mapping[str, Any]:
    meta = _mapping(obj.get("metadata")) or {}
    labels = meta.get("labels")
    if labels is None:
        return {}
    if not isinstance(labels, _MAPPING):
        problems.append(Problem("wrong-type", what, "metadata.labels is not an object"))
        return {}
    return labels


def _skip_reason(labels: Mapping[str, Any], config: TranslateConfig) -> str | None:
    """Why a Service (or a slice, by its mirrored labels) is deliberately not ours."""
    if PROXY_NAME_LABEL in labels and labels[PROXY_NAME_LABEL] != config.proxy_name:
        return "served by another proxy"
    if HEADLESS_LABEL in labels:
        return "headless"
    return None


# --- nodes ---------------------------------------------------------------------------


def node_info(
    name: str, node: Mapping[str, Any] | None, override_ips: Sequence[str] = (), *,
    primary: bool = False,
) -> tuple[NodeInfo, list[Problem]]:
    """The node's zone and NodePort addresses from its Node object.

    Addresses are the InternalIP and ExternalIP entries of ``status.addresses`` in
    their order, unless ``override_ips`` is given (an operator knows better, e.g. to
    serve NodePorts on one interface only). Missing Node: no zone, so no topology.
    ``primary`` (``--nodeport-addresses primary``) keeps kube-proxy's primary node IPs
    only: the first address of each family, InternalIPs before ExternalIPs, never a
    loopback one.
    """
    problems: list[Problem] = []
    what = f"Node {name}"
    zone: str | None = None
    addresses: list[str] = []
    try:
        if node is None:
            problems.append(
                Problem("missing-node", what, "Node object not found: no zone", "warning")
            )
        elif not isinstance(node, _MAPPING):
            problems.append(Problem("malformed-object", what, "Node is not an object"))
        else:
            zone = _node_zone(node, what, problems)
            if not override_ips:
                typed: list[tuple[str, str]] = []
                _add_status_addresses(node, what, typed, problems)
                if primary:  # stable: InternalIPs first, each type in its order
                    typed.sort(key=lambda pair: pair[0] != "InternalIP")
                addresses = [address for _, address in typed]
        for text in override_ips or ():
            try:
                addresses.append(canonical_address(text))
            except ValueError as exc:
                problems.append(Problem("invalid-ip", what, f"node IP override: {exc}"))
    except Exception as exc:  # last resort: a node we cannot read still gets a name
        problems.append(Problem("malformed-object", what, f"{type(exc).__name__}: {exc}"))
    if primary:
        addresses = _primary_ips(addresses)
        if not addresses and isinstance(node, _MAPPING):  # otherwise NodePorts vanish without a word
            problems.append(Problem("missing-field", what, "no InternalIP or ExternalIP address (loopback ones "
                                    "do not count) for --nodeport-addresses primary: NodePorts are served on "
                                    "no address", "warning"))
    return NodeInfo(name, tuple(dict.fromkeys(addresses)), zone), problems


def _primary_ips(addresses: Sequence[str]) -> list[str]:
    """The first non-loopback address of each family, in the order they come."""
    out: dict[bool, str] = {}
    for text in addresses:
        if not ipaddress.ip_address(text).is_loopback:
            out.setdefault(":" in text, text)
    return list(out.values())


def _node_zone(node: Mapping[str, Any], what: str, problems: list[Problem]) -> str | None:
    zone = _labels(node, what, problems).get(ZONE_LABEL)
    if isinstance(zone, str) and zone:
        return zone
    if zone is not None:
        problems.append(Problem("wrong-type", what, f"label {ZONE_LABEL} is not a string"))
    return None


def _add_status_addresses(
    node: Mapping[str, Any], what: str, addresses: list[tuple[str, str]], problems: list[Problem]
) -> None:
    """Append the node's (type, address) InternalIP and ExternalIP pairs (kept if a
    later one fails)."""
    status = _mapping(node.get("status")) or {}
    entries = status.get("addresses") or []
    if not isinstance(entries, list):
        problems.append(Problem("wrong-type", what, "status.addresses is not a list"))
        entries = []
    for entry in entries:
        if not isinstance(entry, _MAPPING):
            problems.append(Problem("wrong-type", what, "status.addresses[] entry"))
            continue
        kind = entry.get("type")
        if kind not in _NODE_ADDRESS_TYPES:
            continue
        try:
            addresses.append((kind, canonical_address(entry.get("address"))))
        except ValueError as exc:
            problems.append(Problem("invalid-ip", what, f"node address: {exc}"))


# --- one Service ---------------------------------------------------------------------


def translate_service(
    service: Mapping[str, Any],
    slices: Sequence[Mapping[str, Any]],
    config: TranslateConfig,
) -> tuple[list[VirtualService], list[Problem], ServiceInfo | None]:
    """Virtual services of one Service on this node, with its problems and info.

    Returns no info for a Service that is skipped (another proxy's, headless,
    ExternalName) or unusable. Never raises.
    """
    try:
        nn = namespaced_name(service)
    except Exception:  # last resort, reported below under a generic name
        nn = None
    return _translate_one(service, nn, slices, config)


def _translate_one(
    service: Mapping[str, Any],
    nn: NamespacedName | None,
    slices: Sequence[Mapping[str, Any]],
    config: TranslateConfig,
    origins: list[_OriginParts] | None = None,
) -> tuple[list[VirtualService], list[Problem], ServiceInfo | None]:
    problems: list[Problem] = []
    what = "Service"
    try:
        what = f"Service {nn[0]}/{nn[1]}" if nn is not None else display_name("Service", service)
        vss, info = _translate_service(service, nn, slices, config, what, problems, origins)
        return vss, problems, info
    except Exception as exc:  # last resort: never lose the other Services
        problems.append(Problem("malformed-object", what, f"{type(exc).__name__}: {exc}"))
        return [], problems, None


def _translate_service(
    service: Mapping[str, Any],
    nn: NamespacedName | None,
    slices: Sequence[Mapping[str, Any]],
    config: TranslateConfig,
    what: str,
    problems: list[Problem],
    origins: list[_OriginParts] | None,
) -> tuple[list[VirtualService], ServiceInfo | None]:
    """The steps: is it ours, what it asks for, its endpoints, its virtual services."""
    if nn is None:
        problems.append(Problem("malformed-object", what, "no usable metadata.name/namespace"))
        return [], None
    if _skip_reason(_labels(service, what, problems), config) is not None:
        return [], None
    node = config.node
    spec = read_service(service, config.families, config.scheduler, node.addresses,
                        what, problems)
    if spec is None:
        return [], None  # ExternalName, headless or unusable
    groups: dict[PortKey, list[Endpoint]] = {}
    if spec.families and spec.ports:
        groups = endpoint_groups(slices, spec.families, node.name, what, problems)
    no_local: _NoLocal = (set(), set())
    vss = _virtual_services(spec, groups, node, what, problems, origins, no_local)
    return vss, _service_info(nn, spec, groups, vss, no_local)


def _virtual_services(
    spec: ServiceSpec,
    groups: Mapping[PortKey, list[Endpoint]],
    node: NodeInfo,
    what: str,
    problems: list[Problem],
    origins: list[_OriginParts] | None = None,
    no_local: _NoLocal | None = None,
) -> list[VirtualService]:
    """Per port and family: the ClusterIP, external and node-address virtual services
    (and, into ``origins`` when given, what each one is for).

    ClusterIP traffic follows the internal traffic policy, the rest the external one.
    Under Local with no endpoint here, the external ones fall back to the cluster-wide
    endpoints as in kube-proxy's IPVS mode (Pods on this node keep the Service; outside
    clients, not masqueraded, get no reply back through here), the ClusterIP does not
    (the API promises node-local only): docs/parity.md. ``no_local``: see ``_no_local``.
    """
    scheduler, persistence = spec.scheduler, spec.persistence
    flags = _MH_FLAGS if scheduler == "mh" else _NO_FLAGS
    vss: list[VirtualService] = []
    seen: set[tuple[Protocol, str, int]] = set()  # tuples: hashed in C, keys in Python

    def add(protocol: Protocol, address: str, port: int, dests: tuple[Destination, ...]) -> None:
        if origins is not None:
            origins.append((ServiceKey(protocol, address, port), port_name, kind))
        if (protocol, address, port) in seen:
            key = ServiceKey(protocol, address, port)
            problems.append(
                Problem("duplicate-virtual-service", what, f"{key} listed twice", "warning")
            )
            return
        seen.add((protocol, address, port))
        vss.append(VirtualService(ServiceKey(protocol, address, port), scheduler, persistence,
                                  flags, dests))

    internal_local, external_local = spec.internal_local, spec.external_local
    want_local = internal_local or external_local
    # One Destination per real server when both sets are in use (they overlap).
    made: dict[tuple[str, int], Destination] | None = {} if want_local else None
    for port in spec.ports:
        for family in spec.addresses:
            external = bool(family.external) or (port.node_port is not None and bool(family.node))
            eps = groups.get((family.family, port.name, port.protocol)) or []
            cat = categorize_endpoints(
                eps, node_name=node.name, zone=node.zone,
                want_cluster=not internal_local or external, want_local=want_local,
            )
            cluster_dests = _destinations(cat.cluster, made)
            local_dests = _destinations(cat.local, made)
            internal = local_dests if internal_local else cluster_dests
            ext = local_dests if external_local and cat.local else cluster_dests
            if want_local and not cat.local and no_local is not None:
                _no_local(no_local, spec, family.family, external, eps)
            port_name, kind = port.name or str(port.port), "ClusterIP"
            add(port.protocol, family.cluster_ip, port.port, internal)
            for ip in family.external:
                kind = "externalIP" if ip in spec.external_ips else "LoadBalancer"
                add(port.protocol, ip, port.port, ext)
            if port.node_port is not None:
                kind = "NodePort"
                for ip in family.node:
                    add(port.protocol, ip, port.node_port, ext)
    return vss


def _no_local(no_local: _NoLocal, spec: ServiceSpec, family: Family, external: bool,
              endpoints: Sequence[Endpoint]) -> None:
    """kube-proxy's count, for one port and family without a local endpoint.

    kube-proxy's syncEndpoint records the Service under each Local policy it has
    whenever a virtual service synced with "node-local only" finds none on the node
    but the cluster has a usable one (ready, or serving and terminating). The
    ClusterIP is synced so under internalTrafficPolicy Local, the external virtual
    services under externalTrafficPolicy Local (when there are any).
    """
    if not (spec.internal_local or (spec.external_local and external)):
        return
    if not any(ep.ready or (ep.serving and ep.terminating) for ep in endpoints):
        return
    if spec.internal_local:
        no_local[0].add(family)
    if spec.external_local:
        no_local[1].add(family)


def _destinations(
    endpoints: Sequence[Endpoint], made: dict[tuple[str, int], Destination] | None
) -> tuple[Destination, ...]:
    """Weight 1, masquerade, in the (address, port) order the endpoints arrive in."""
    if made is None:
        return tuple([Destination(ep[0], ep[1], 1, _MASQ) for ep in endpoints])
    out = []
    for ep in endpoints:
        key = (ep[0], ep[1])
        dest = made.get(key)
        if dest is None:
            dest = made[key] = Destination(ep[0], ep[1], 1, _MASQ)
        out.append(dest)
    return tuple(out)


def _service_info(
    nn: NamespacedName,
    spec: ServiceSpec,
    groups: Mapping[PortKey, list[Endpoint]],
    vss: list[VirtualService],
    no_local: _NoLocal,
) -> ServiceInfo:
    # Count Pods, not addresses: a dual-stack Pod has one address per family. Hairpin
    # covers every local endpoint (a terminating one may still be a real server), as
    # kube-proxy's loopback set does; health counts the ready ones.
    local_ips: dict[Family, set[str]] = {}
    hairpin: set[str] = set()
    for (family, _, _), eps in groups.items():
        for ep in eps:
            if ep.local:
                hairpin.add(ep.address)
                if ep.ready:
                    local_ips.setdefault(family, set()).add(ep.address)
    return ServiceInfo(
        namespace=nn[0],
        name=nn[1],
        keys=tuple(sorted(vs.key for vs in vss)),
        health_check_node_port=spec.health_check_node_port,
        external_policy_local=spec.external_local,
        internal_policy_local=spec.internal_local,
        local_endpoints=max((len(ips) for ips in local_ips.values()), default=0),
        cluster_ips=tuple(family.cluster_ip for family in spec.addresses),
        local_endpoint_ips=tuple(sorted(hairpin)),
        no_local_internal=frozenset(no_local[0]),
        no_local_external=frozenset(no_local[1]),
        source_ranges=spec.source_ranges,
        load_balancer_ips=tuple(a for f in spec.addresses for a in f.external if a not in spec.external_ips)
        if spec.source_ranges else (),
    )


# --- the whole cluster ---------------------------------------------------------------


def translate(
    services: Iterable[Mapping[str, Any]],
    slices: Iterable[Mapping[str, Any]],
    config: TranslateConfig,
    *,
    origins: bool = False,
) -> Translation:
    """The node's whole desired table from all Services and EndpointSlices. Never raises.

    ``origins``: also say what each virtual service is for (``Translation.origins``),
    for people reading a plan; the agent has no use for it."""
    problems: list[Problem] = []
    by_service = _slices_by_service(slices, config, problems)
    by_name = _services_by_name(services, problems)
    found: dict[ServiceKey, list[Origin]] | None = {} if origins else None
    table, infos = _translate_all(by_name, by_service, config, problems, found)
    _report_orphans(by_service, by_name, problems)
    return Translation(Table(table), tuple(problems), infos, {k: tuple(v) for k, v in (found or {}).items()})


def _slices_by_service(
    slices: Iterable[Mapping[str, Any]], config: TranslateConfig, problems: list[Problem]
) -> dict[NamespacedName, list[Mapping[str, Any]]]:
    by_service: dict[NamespacedName, list[Mapping[str, Any]]] = {}
    try:
        for raw_slice in slices:
            try:
                owner = _slice_owner(raw_slice, config, problems)
                if owner is not None:
                    by_service.setdefault(owner, []).append(raw_slice)
            except Exception as exc:  # last resort
                problems.append(
                    Problem("malformed-object", display_name("EndpointSlice", raw_slice),
                            f"{type(exc).__name__}: {exc}")
                )
    except Exception as exc:  # the iterable itself failed
        problems.append(Problem("malformed-object", "EndpointSlices", f"{type(exc).__name__}: {exc}"))
    return by_service


def _slice_owner(
    raw_slice: Mapping[str, Any], config: TranslateConfig, problems: list[Problem]
) -> NamespacedName | None:
    """The Service a slice belongs to; None for another proxy's, a headless one's, or
    a slice that cannot be placed (reported)."""
    owner = slice_service(raw_slice)
    if owner is not None:
        labels = raw_slice["metadata"]["labels"]
        return owner if _skip_reason(labels, config) is None else None
    if namespaced_name(raw_slice) is None:
        problems.append(
            Problem("malformed-object", display_name("EndpointSlice", raw_slice),
                    "no usable metadata.name/namespace")
        )
        return None
    if _skip_reason(_slice_labels(raw_slice, problems), config) is None:
        problems.append(
            Problem("missing-field", display_name("EndpointSlice", raw_slice),
                    f"no {SERVICE_NAME_LABEL} label", "warning")
        )
    return None


def _slice_labels(raw_slice: Mapping[str, Any], problems: list[Problem]) -> Mapping[str, Any]:
    meta = raw_slice.get("metadata")
    labels = meta.get("labels") if isinstance(meta, _MAPPING) else None
    if labels is None or isinstance(labels, _MAPPING):
        return labels or {}
    problems.append(
        Problem("wrong-type", display_name("EndpointSlice", raw_slice),
                "metadata.labels is not an object")
    )
    return {}


def _services_by_name(
    services: Iterable[Mapping[str, Any]], problems: list[Problem]
) -> dict[NamespacedName, Mapping[str, Any]]:
    """Services by (namespace, name); of two with the same name the first is kept."""
    by_name: dict[NamespacedName, Mapping[str, Any]] = {}
    try:
        for svc in services:
            try:
                nn = namespaced_name(svc)
                if nn is None:
                    problems.append(
                        Problem("malformed-object", display_name("Service", svc),
                                "no usable metadata.name/namespace")
                    )
                elif nn in by_name:
                    problems.append(
                        Problem("duplicate-service", f"Service {nn[0]}/{nn[1]}",
                                "listed twice: first one kept")
                    )
                else:
                    by_name[nn] = svc
            except Exception as exc:  # last resort
                problems.append(
                    Problem("malformed-object", display_name("Service", svc),
                            f"{type(exc).__name__}: {exc}")
                )
    except Exception as exc:  # the iterable itself failed
        problems.append(Problem("malformed-object", "Services", f"{type(exc).__name__}: {exc}"))
    return by_name


def _translate_all(
    by_name: Mapping[NamespacedName, Mapping[str, Any]],
    by_service: Mapping[NamespacedName, list[Mapping[str, Any]]],
    config: TranslateConfig,
    problems: list[Problem],
    origins: dict[ServiceKey, list[Origin]] | None,
) -> tuple[dict[ServiceKey, VirtualService], dict[NamespacedName, ServiceInfo]]:
    """Each Service in sorted (namespace, name) order; a key already taken is dropped."""
    owners = Owners()
    infos: dict[NamespacedName, ServiceInfo] = {}
    for nn in sorted(by_name):
        parts: list[_OriginParts] | None = [] if origins is not None else None
        vss, svc_problems, info = _translate_one(by_name[nn], nn, by_service.get(nn, []), config, parts)
        problems.extend(svc_problems)
        keys = owners.claim(nn, vss, problems)
        if info is not None:
            infos[nn] = with_keys(info, keys)
        if origins is not None and parts:
            _add_origins(origins, nn, parts, keys)
    return owners.table, infos


def _add_origins(origins: dict[ServiceKey, list[Origin]], nn: NamespacedName, parts: list[_OriginParts],
                 keys: tuple[ServiceKey, ...]) -> None:
    """What each key the Service got is for (a key named twice lists both)."""
    got = set(keys)
    for key, port, kind in parts:
        if key in got:
            origins.setdefault(key, []).append(Origin(nn[0], nn[1], port, kind))


def with_keys(info: ServiceInfo, keys: tuple[ServiceKey, ...]) -> ServiceInfo:
    """``info`` of a Service that got only ``keys`` of its virtual services (the others
    belong to another Service)."""
    if len(keys) == len(info.keys):
        return info
    kept = set(keys)
    return replace(info, keys=tuple(k for k in info.keys if k in kept))


def _report_orphans(
    by_service: Mapping[NamespacedName, list[Mapping[str, Any]]],
    by_name: Mapping[NamespacedName, Mapping[str, Any]],
    problems: list[Problem],
) -> None:
    """Slices of a Service that does not exist (yet, or any more)."""
    for nn in sorted(by_service):
        if nn in by_name:
            continue
        for raw_slice in by_service[nn]:
            problems.append(
                Problem(
                    "orphan-slice",
                    display_name("EndpointSlice", raw_slice),
                    f"Service {nn[0]}/{nn[1]} does not exist",
                    "warning",
                )
            )
