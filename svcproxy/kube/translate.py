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

``translate_service`` works on one Service and its slices so that an incremental
caller can recompute a single Service when only it changed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple, TypeGuard

from svcproxy.kube.endpoints import (
    Endpoint,
    EndpointError,
    canonical_address,
    categorize_endpoints,
    dedupe,
    parse_endpoint,
    with_port,
)
from svcproxy.kube.objects import (
    HEADLESS_LABEL,
    PROXY_NAME_LABEL,
    SCHEDULER_ANNOTATION,
    SERVICE_NAME_LABEL,
    ZONE_LABEL,
    display_name,
    namespaced_name,
)
from svcproxy.kube.problems import PROBLEM_KINDS, Problem
from svcproxy.model import (
    DEFAULT_AFFINITY_TIMEOUT,
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
    "Problem",
    "ServiceInfo",
    "TranslateConfig",
    "Translation",
    "node_info",
    "translate",
    "translate_service",
]

#: Longest ClientIP affinity the API server accepts (one day).
MAX_AFFINITY_TIMEOUT = 86400

#: For isinstance: plain dicts first (what clients and YAML give), cheap to check.
_MAPPING = (dict, Mapping)
_NO_FLAGS: frozenset[str] = frozenset()
_MASQ = Forward.MASQ
_PROTOCOLS = {p.value: p for p in Protocol}
_FAMILIES = {f.value: f for f in Family}
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
    #: Addresses of this node's ready endpoints: a Pod reaching itself through the
    #: Service (hairpin) must be masqueraded, or it would answer itself directly.
    local_endpoint_ips: tuple[str, ...] = ()


@dataclass(frozen=True)
class Translation:
    table: Table
    problems: tuple[Problem, ...]
    services: Mapping[tuple[str, str], ServiceInfo] = field(default_factory=dict)


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


def _slice_labels(raw_slice: Mapping[str, Any], problems: list[Problem]) -> Mapping[str, Any]:
    meta = raw_slice.get("metadata")
    labels = meta.get("labels") if isinstance(meta, _MAPPING) else None
    if labels is None or isinstance(labels, _MAPPING):
        return labels or {}
    problems.append(
        Problem("wrong-type", display_name("EndpointSlice", raw_slice), "metadata.labels is not an object")
    )
    return {}


def _valid_port(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 65535


def _protocol(value: object) -> Protocol | None:
    """TCP when absent (the API server's default), None when unknown."""
    if value is None:
        return Protocol.TCP
    return _PROTOCOLS.get(value) if isinstance(value, str) else None


def _skip_reason(labels: Mapping[str, Any], config: TranslateConfig) -> str | None:
    """Why a Service (or a slice, by its mirrored labels) is deliberately not ours."""
    if PROXY_NAME_LABEL in labels and labels[PROXY_NAME_LABEL] != config.proxy_name:
        return "served by another proxy"
    if HEADLESS_LABEL in labels:
        return "headless"
    return None


# --- nodes ---------------------------------------------------------------------------


def node_info(
    name: str, node: Mapping[str, Any] | None, override_ips: Sequence[str] = ()
) -> tuple[NodeInfo, list[Problem]]:
    """The node's zone and NodePort addresses from its Node object.

    Addresses are the InternalIP and ExternalIP entries of ``status.addresses`` in
    their order, unless ``override_ips`` is given (an operator knows better, e.g. to
    serve NodePorts on one interface only). Missing Node: no zone, so no topology.
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
            raw_zone = _labels(node, what, problems).get(ZONE_LABEL)
            if isinstance(raw_zone, str) and raw_zone:
                zone = raw_zone
            elif raw_zone is not None:
                problems.append(Problem("wrong-type", what, f"label {ZONE_LABEL} is not a string"))
            if not override_ips:
                status = _mapping(node.get("status")) or {}
                entries = status.get("addresses") or []
                if not isinstance(entries, list):
                    problems.append(Problem("wrong-type", what, "status.addresses is not a list"))
                    entries = []
                for entry in entries:
                    if not isinstance(entry, _MAPPING):
                        problems.append(Problem("wrong-type", what, "status.addresses[] entry"))
                        continue
                    if entry.get("type") not in _NODE_ADDRESS_TYPES:
                        continue
                    try:
                        addresses.append(canonical_address(entry.get("address")))
                    except ValueError as exc:
                        problems.append(Problem("invalid-ip", what, f"node address: {exc}"))
        for text in override_ips or ():
            try:
                addresses.append(canonical_address(text))
            except ValueError as exc:
                problems.append(Problem("invalid-ip", what, f"node IP override: {exc}"))
    except Exception as exc:  # last resort: a node we cannot read still gets a name
        problems.append(Problem("malformed-object", what, f"{type(exc).__name__}: {exc}"))
    return NodeInfo(name, tuple(dict.fromkeys(addresses)), zone), problems


# --- one Service ---------------------------------------------------------------------


class _Port(NamedTuple):
    name: str
    protocol: Protocol
    port: int
    node_port: int | None


def _service_ports(
    spec: Mapping[str, Any], what: str, node_ports: bool, problems: list[Problem]
) -> list[_Port]:
    raw_ports = spec.get("ports")
    if raw_ports is None:
        problems.append(Problem("missing-field", what, "spec.ports is missing"))
        return []
    if not isinstance(raw_ports, list):
        problems.append(Problem("wrong-type", what, "spec.ports is not a list"))
        return []
    ports: list[_Port] = []
    for i, raw in enumerate(raw_ports):
        where = f"spec.ports[{i}]"
        if not isinstance(raw, _MAPPING):
            problems.append(Problem("wrong-type", what, f"{where} is not an object"))
            continue
        name = raw.get("name")
        if name is None:
            name = ""
        elif not isinstance(name, str):
            problems.append(Problem("wrong-type", what, f"{where}.name is not a string"))
            continue
        raw_protocol = raw.get("protocol")
        protocol = _protocol(raw_protocol)
        if protocol is None:
            problems.append(
                Problem("unknown-protocol", what, f"{where}: protocol {raw_protocol!r}")
            )
            continue
        port = raw.get("port")
        if not _valid_port(port):
            problems.append(Problem("invalid-port", what, f"{where}: port {port!r}"))
            continue
        node_port: int | None = None
        if node_ports:
            raw_node_port = raw.get("nodePort")
            if _valid_port(raw_node_port):
                node_port = raw_node_port
            elif raw_node_port not in (None, 0):
                problems.append(
                    Problem("invalid-port", what, f"{where}: nodePort {raw_node_port!r}")
                )
        ports.append(_Port(name, protocol, port, node_port))
    return ports


def _address_list(
    values: object, where: str, what: str, problems: list[Problem]
) -> list[str]:
    if values is None:
        return []
    if not isinstance(values, list):
        problems.append(Problem("wrong-type", what, f"{where} is not a list"))
        return []
    out: list[str] = []
    for value in values:
        try:
            out.append(canonical_address(value))
        except ValueError as exc:
            problems.append(Problem("invalid-ip", what, f"{where}: {exc}"))
    return out


def _ingress_ips(status: object, what: str, problems: list[Problem]) -> list[str]:
    """``status.loadBalancer.ingress[].ip``, skipping ipMode Proxy (the LB proxies)."""
    if not isinstance(status, _MAPPING):
        return []
    lb = status.get("loadBalancer")
    if not isinstance(lb, _MAPPING):
        return []
    ingress = lb.get("ingress")
    if ingress is None:
        return []
    if not isinstance(ingress, list):
        problems.append(Problem("wrong-type", what, "status.loadBalancer.ingress is not a list"))
        return []
    out: list[str] = []
    for entry in ingress:
        if not isinstance(entry, _MAPPING):
            problems.append(Problem("wrong-type", what, "status.loadBalancer.ingress[] entry"))
            continue
        ip = entry.get("ip")
        if ip is None or ip == "" or entry.get("ipMode") == "Proxy":
            continue  # hostname-only ingress, or an LB that proxies instead of routing
        try:
            out.append(canonical_address(ip))
        except ValueError as exc:
            problems.append(Problem("invalid-ip", what, f"load balancer ingress: {exc}"))
    return out


def _policy_local(spec: Mapping[str, Any], key: str, what: str, problems: list[Problem]) -> bool:
    value = spec.get(key)
    if value is None or value == "Cluster":
        return False
    if value == "Local":
        return True
    problems.append(
        Problem("invalid-value", what, f"spec.{key} {value!r}: using Cluster", "warning")
    )
    return False


def _persistence(spec: Mapping[str, Any], what: str, problems: list[Problem]) -> int | None:
    affinity = spec.get("sessionAffinity")
    if affinity is None or affinity == "None":
        return None
    if affinity != "ClientIP":
        problems.append(
            Problem("invalid-value", what, f"spec.sessionAffinity {affinity!r}: none", "warning")
        )
        return None
    client_ip = _mapping((_mapping(spec.get("sessionAffinityConfig")) or {}).get("clientIP"))
    timeout = None if client_ip is None else client_ip.get("timeoutSeconds")
    if timeout is None:
        return DEFAULT_AFFINITY_TIMEOUT
    if (
        isinstance(timeout, int)
        and not isinstance(timeout, bool)
        and 1 <= timeout <= MAX_AFFINITY_TIMEOUT
    ):
        return timeout
    problems.append(
        Problem(
            "invalid-value",
            what,
            f"sessionAffinityConfig.clientIP.timeoutSeconds {timeout!r}: "
            f"using {DEFAULT_AFFINITY_TIMEOUT}",
            "warning",
        )
    )
    return DEFAULT_AFFINITY_TIMEOUT


def _scheduler(meta: Mapping[str, Any], config: TranslateConfig, what: str,
               problems: list[Problem]) -> str:
    annotations = meta.get("annotations")
    if annotations is None:
        return config.scheduler
    if not isinstance(annotations, _MAPPING):
        problems.append(Problem("wrong-type", what, "metadata.annotations is not an object"))
        return config.scheduler
    value = annotations.get(SCHEDULER_ANNOTATION)
    if value is None:
        return config.scheduler
    if isinstance(value, str) and value.strip() in IPVS_SCHEDULERS:
        return value.strip()
    problems.append(
        Problem(
            "unknown-scheduler",
            what,
            f"annotation {SCHEDULER_ANNOTATION}={value!r}: using {config.scheduler}",
            "warning",
        )
    )
    return config.scheduler


_PortKey = tuple[Family, str, Protocol]


def _slice_endpoints(
    raw_slice: Mapping[str, Any],
    families: frozenset[Family],
    node_name: str,
    problems: list[Problem],
) -> dict[_PortKey, list[Endpoint]]:
    """Endpoints of one slice per (family, port name, protocol); broken pieces skipped."""
    issues: list[tuple[str, str]] = []  # named only if needed: naming costs per slice
    try:
        return _slice_endpoints_of(raw_slice, families, node_name, issues)
    finally:
        if issues:
            what = display_name("EndpointSlice", raw_slice)
            problems.extend(Problem(kind, what, message) for kind, message in issues)


def _slice_endpoints_of(
    raw_slice: Mapping[str, Any],
    families: frozenset[Family],
    node_name: str,
    issues: list[tuple[str, str]],
) -> dict[_PortKey, list[Endpoint]]:
    address_type = raw_slice.get("addressType")
    if address_type == "FQDN":
        return {}
    family = _FAMILIES.get(address_type) if isinstance(address_type, str) else None
    if family is None:
        if address_type is None:
            issues.append(("missing-field", "addressType is missing"))
        else:
            issues.append(("invalid-value", f"addressType {address_type!r}"))
        return {}
    if family not in families:
        return {}  # a family this node or this Service does not serve

    raw_ports = raw_slice.get("ports")
    if raw_ports is None:
        return {}  # "all ports": no Service port can match it (kube-proxy agrees)
    if not isinstance(raw_ports, list):
        issues.append(("wrong-type", "ports is not a list"))
        return {}
    ports: list[tuple[str, Protocol, int]] = []
    for i, raw in enumerate(raw_ports):
        where = f"ports[{i}]"
        if not isinstance(raw, _MAPPING):
            issues.append(("wrong-type", f"{where} is not an object"))
            continue
        number = raw.get("port")
        if number is None:
            continue  # kube-proxy ignores ports without a number
        if not _valid_port(number):
            issues.append(("invalid-port", f"{where}: port {number!r}"))
            continue
        name = raw.get("name")
        if name is None:
            name = ""
        elif not isinstance(name, str):
            issues.append(("wrong-type", f"{where}.name is not a string"))
            continue
        raw_protocol = raw.get("protocol")
        protocol = _protocol(raw_protocol)
        if protocol is None:
            issues.append(("unknown-protocol", f"{where}: protocol {raw_protocol!r}"))
            continue
        ports.append((name, protocol, number))
    if not ports:
        return {}

    raw_endpoints = raw_slice.get("endpoints")
    if raw_endpoints is None:
        raw_endpoints = []
    if not isinstance(raw_endpoints, list):
        issues.append(("wrong-type", "endpoints is not a list"))
        return {}
    first_port = ports[0][2]
    endpoints: list[Endpoint] = []
    for i, raw in enumerate(raw_endpoints):
        try:
            endpoints.append(
                parse_endpoint(raw, port=first_port, node_name=node_name, family=family)
            )
        except EndpointError as exc:
            issues.append((exc.kind, f"endpoints[{i}]: {exc}"))
    out: dict[_PortKey, list[Endpoint]] = {}
    for name, protocol, number in ports:
        eps = endpoints if number == first_port else [with_port(ep, number) for ep in endpoints]
        out.setdefault((family, name, protocol), []).extend(eps)
    return out


def _slice_sort_key(raw: Mapping[str, Any]) -> str:
    name = (_mapping(raw.get("metadata")) or {}).get("name")
    return name if isinstance(name, str) else ""


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
    nn: tuple[str, str] | None,
    slices: Sequence[Mapping[str, Any]],
    config: TranslateConfig,
) -> tuple[list[VirtualService], list[Problem], ServiceInfo | None]:
    problems: list[Problem] = []
    what = "Service"
    try:
        what = f"Service {nn[0]}/{nn[1]}" if nn is not None else display_name("Service", service)
        vss, info = _translate_service(service, nn, slices, config, what, problems)
        return vss, problems, info
    except Exception as exc:  # last resort: never lose the other Services
        problems.append(Problem("malformed-object", what, f"{type(exc).__name__}: {exc}"))
        return [], problems, None


def _translate_service(
    service: Mapping[str, Any],
    nn: tuple[str, str] | None,
    slices: Sequence[Mapping[str, Any]],
    config: TranslateConfig,
    what: str,
    problems: list[Problem],
) -> tuple[list[VirtualService], ServiceInfo | None]:
    if nn is None:
        problems.append(Problem("malformed-object", what, "no usable metadata.name/namespace"))
        return [], None
    if _skip_reason(_labels(service, what, problems), config) is not None:
        return [], None
    spec = service.get("spec")
    if not isinstance(spec, _MAPPING):
        problems.append(Problem("missing-field", what, "spec is missing"))
        return [], None
    svc_type = spec.get("type")
    if svc_type is None:
        svc_type = "ClusterIP"
    if svc_type == "ExternalName":
        return [], None
    if svc_type not in ("ClusterIP", "NodePort", "LoadBalancer"):
        problems.append(
            Problem("invalid-value", what, f"spec.type {svc_type!r}: treated as ClusterIP",
                    "warning")
        )
        svc_type = "ClusterIP"

    # ClusterIPs decide which families the Service has at all: like kube-proxy, a
    # family without a ClusterIP gets no NodePort/external VIPs either.
    raw_ips = spec.get("clusterIPs")
    if raw_ips is None or raw_ips == []:
        single = spec.get("clusterIP")
        raw_ips = [] if single is None else [single]
    if not isinstance(raw_ips, list):
        problems.append(Problem("wrong-type", what, "spec.clusterIPs is not a list"))
        return [], None
    if not raw_ips or raw_ips[0] in ("None", ""):
        return [], None  # headless
    cluster_ips: dict[Family, str] = {}
    for text in raw_ips:
        try:
            ip = canonical_address(text)
        except ValueError as exc:
            problems.append(Problem("invalid-ip", what, f"clusterIP: {exc}"))
            continue
        fam = Family.IPV6 if ":" in ip else Family.IPV4
        if fam in cluster_ips:
            problems.append(
                Problem("invalid-value", what, f"second {fam.value} clusterIP {ip} ignored",
                        "warning")
            )
            continue
        cluster_ips[fam] = ip
    served = frozenset(f for f in cluster_ips if f in config.families)

    meta: Mapping[str, Any] = service["metadata"]
    node_ports = svc_type in ("NodePort", "LoadBalancer")
    ports = _service_ports(spec, what, node_ports, problems)
    scheduler = _scheduler(meta, config, what, problems)
    persistence = _persistence(spec, what, problems)
    internal_local = _policy_local(spec, "internalTrafficPolicy", what, problems)
    external_local_spec = _policy_local(spec, "externalTrafficPolicy", what, problems)

    external: list[str] = []
    for ip in _address_list(spec.get("externalIPs"), "spec.externalIPs", what, problems) + \
            _ingress_ips(service.get("status"), what, problems):
        fam = Family.IPV6 if ":" in ip else Family.IPV4
        if fam in served:
            external.append(ip)
        elif fam in config.families:
            problems.append(
                Problem("wrong-family", what,
                        f"external address {ip}: the Service has no {fam.value} clusterIP",
                        "warning")
            )
    externally_accessible = node_ports or bool(spec.get("externalIPs"))
    external_local = external_local_spec and externally_accessible

    health_port: int | None = None
    if svc_type == "LoadBalancer" and external_local:
        raw_hc = spec.get("healthCheckNodePort")
        if _valid_port(raw_hc):
            health_port = raw_hc
        else:
            problems.append(
                Problem("invalid-port", what, f"spec.healthCheckNodePort {raw_hc!r}")
            )

    # Endpoints, per (family, port name, protocol), deduplicated across slices.
    groups: dict[_PortKey, list[Endpoint]] = {}
    if served and ports:
        ordered = sorted(slices, key=_slice_sort_key) if len(slices) > 1 else slices
        for raw_slice in ordered:
            try:
                if not isinstance(raw_slice, _MAPPING):
                    problems.append(Problem("malformed-object", what, "slice is not an object"))
                    continue
                for key, eps in _slice_endpoints(
                    raw_slice, served, config.node.name, problems
                ).items():
                    groups.setdefault(key, []).extend(eps)
            except Exception as exc:  # last resort: keep the other slices
                problems.append(
                    Problem("malformed-object", display_name("EndpointSlice", raw_slice),
                            f"{type(exc).__name__}: {exc}")
                )
    deduped = {k: dedupe(v) for k, v in groups.items()}
    # Count Pods, not addresses: a dual-stack Pod has one address per family.
    local_ips: dict[Family, set[str]] = {}
    for (fam, _, _), eps in deduped.items():
        for ep in eps:
            if ep.local and ep.ready:
                local_ips.setdefault(fam, set()).add(ep.address)

    node_addresses = config.node.addresses
    vss: list[VirtualService] = []
    seen: set[tuple[Protocol, str, int]] = set()  # tuples: hashed in C, keys in Python

    def add(protocol: Protocol, address: str, port: int, dests: tuple[Destination, ...]) -> None:
        key = ServiceKey(protocol, address, port)
        if (protocol, address, port) in seen:
            problems.append(
                Problem("duplicate-virtual-service", what, f"{key} listed twice", "warning")
            )
            return
        seen.add((protocol, address, port))
        vss.append(VirtualService(key, scheduler, persistence, _NO_FLAGS, dests))

    node_name, zone = config.node.name, config.node.zone
    want_cluster = not (internal_local and external_local)
    want_local = internal_local or external_local
    families = sorted(served)  # IPv4 first (Family is a str enum)
    # One Destination per real server when both sets are in use (they overlap).
    made: dict[tuple[str, int], Destination] | None = {} if want_cluster and want_local else None
    for port in ports:
        for fam in families:
            eps = deduped.get((fam, port.name, port.protocol)) or []
            cat = categorize_endpoints(
                eps, node_name=node_name, zone=zone,
                want_cluster=want_cluster, want_local=want_local,
            )
            cluster_dests = _destinations(cat.cluster, made)
            local_dests = _destinations(cat.local, made)
            internal = local_dests if internal_local else cluster_dests
            ext = local_dests if external_local else cluster_dests
            add(port.protocol, cluster_ips[fam], port.port, internal)
            for ip in external:
                if (":" in ip) == (fam is Family.IPV6):
                    add(port.protocol, ip, port.port, ext)
            if port.node_port is not None:
                for ip in node_addresses:
                    if (":" in ip) == (fam is Family.IPV6):
                        add(port.protocol, ip, port.node_port, ext)

    info = ServiceInfo(
        namespace=nn[0],
        name=nn[1],
        keys=tuple(sorted(vs.key for vs in vss)),
        health_check_node_port=health_port,
        external_policy_local=external_local,
        internal_policy_local=internal_local,
        local_endpoints=max((len(ips) for ips in local_ips.values()), default=0),
        cluster_ips=tuple(cluster_ips[f] for f in families),
        local_endpoint_ips=tuple(sorted(set().union(*local_ips.values()))),
    )
    return vss, info


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


# --- the whole cluster ---------------------------------------------------------------


def translate(
    services: Iterable[Mapping[str, Any]],
    slices: Iterable[Mapping[str, Any]],
    config: TranslateConfig,
) -> Translation:
    """The node's whole desired table from all Services and EndpointSlices. Never raises."""
    problems: list[Problem] = []

    by_service: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    try:
        for raw_slice in slices:
            try:
                nn = namespaced_name(raw_slice)
                if nn is None:
                    problems.append(
                        Problem("malformed-object", display_name("EndpointSlice", raw_slice),
                                "no usable metadata.name/namespace")
                    )
                    continue
                labels = _slice_labels(raw_slice, problems)
                if _skip_reason(labels, config) is not None:
                    continue
                svc_name = labels.get(SERVICE_NAME_LABEL)
                if not isinstance(svc_name, str) or not svc_name:
                    problems.append(
                        Problem("missing-field", display_name("EndpointSlice", raw_slice),
                                f"no {SERVICE_NAME_LABEL} label", "warning")
                    )
                    continue
                by_service.setdefault((nn[0], svc_name), []).append(raw_slice)
            except Exception as exc:  # last resort
                problems.append(
                    Problem("malformed-object", display_name("EndpointSlice", raw_slice),
                            f"{type(exc).__name__}: {exc}")
                )
    except Exception as exc:  # the iterable itself failed
        problems.append(Problem("malformed-object", "EndpointSlices", f"{type(exc).__name__}: {exc}"))

    by_key: dict[tuple[str, str], Mapping[str, Any]] = {}
    try:
        for svc in services:
            try:
                nn = namespaced_name(svc)
                if nn is None:
                    problems.append(
                        Problem("malformed-object", display_name("Service", svc),
                                "no usable metadata.name/namespace")
                    )
                elif nn in by_key:
                    problems.append(
                        Problem("duplicate-service", f"Service {nn[0]}/{nn[1]}",
                                "listed twice: first one kept")
                    )
                else:
                    by_key[nn] = svc
            except Exception as exc:  # last resort
                problems.append(
                    Problem("malformed-object", display_name("Service", svc),
                            f"{type(exc).__name__}: {exc}")
                )
    except Exception as exc:  # the iterable itself failed
        problems.append(Problem("malformed-object", "Services", f"{type(exc).__name__}: {exc}"))

    table: dict[ServiceKey, VirtualService] = {}
    infos: dict[tuple[str, str], ServiceInfo] = {}
    for nn in sorted(by_key):
        vss, svc_problems, info = _translate_one(by_key[nn], nn, by_service.get(nn, []), config)
        problems.extend(svc_problems)
        dropped: set[ServiceKey] = set()
        for vs in vss:
            if table.setdefault(vs.key, vs) is not vs:
                dropped.add(vs.key)
                problems.append(
                    Problem(
                        "duplicate-virtual-service",
                        f"Service {nn[0]}/{nn[1]}",
                        f"{vs.key} already belongs to another Service: not programmed",
                    )
                )
        if info is not None:
            if dropped:
                info = replace(info, keys=tuple(k for k in info.keys if k not in dropped))
            infos[nn] = info

    for nn in sorted(by_service):
        if nn in by_key:
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

    return Translation(Table(table), tuple(problems), infos)
