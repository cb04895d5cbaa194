"""What one Service asks for, read from its spec, metadata and status.

Before any endpoint matters, translation needs a Service's own fields as checked
values: the families it has (its ClusterIPs decide), the addresses each family is
reached on, its ports, and the options that become IPVS settings. One small step per
field keeps each rule, and the ``Problem`` it reports, next to the field it is about.
``read_service`` runs the steps in a fixed order, which is the order of the problems.
"""

from __future__ import annotations

import ipaddress

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, TypeGuard

from svcproxy.kube.endpoints import canonical_address
from svcproxy.kube.objects import SCHEDULER_ANNOTATION
from svcproxy.kube.problems import Problem
from svcproxy.model import DEFAULT_AFFINITY_TIMEOUT, IPVS_SCHEDULERS, Family, Protocol, family_of

#: Longest ClientIP affinity the API server accepts (one day).
MAX_AFFINITY_TIMEOUT = 86400

#: For isinstance: plain dicts first (what clients and YAML give), cheap to check.
_MAPPING = (dict, Mapping)
_PROTOCOLS = {p.value: p for p in Protocol}
_SERVICE_TYPES = ("ClusterIP", "NodePort", "LoadBalancer")
_NODE_PORT_TYPES = ("NodePort", "LoadBalancer")

#: ``ServiceSpec(...)``/``FamilyAddresses(...)`` without the Python-level ``__new__``
#: NamedTuple generates: both are built for every Service translated.
_new = tuple.__new__
_NO_ADDRESSES: frozenset[str] = frozenset()


class ServicePort(NamedTuple):
    name: str
    protocol: Protocol
    port: int
    node_port: int | None


class FamilyAddresses(NamedTuple):
    """Where one address family of a Service is reached on this node."""

    family: Family
    cluster_ip: str
    #: ``spec.externalIPs``, then LoadBalancer ingress IPs, in the Service's order.
    external: tuple[str, ...]
    #: This node's addresses, for NodePorts (empty unless the Service has them).
    node: tuple[str, ...]


class ServiceSpec(NamedTuple):
    """One Service's fields, checked: everything but its endpoints."""

    #: The families served: the Service has a ClusterIP in them and so does the node.
    families: frozenset[Family]
    #: One entry per served family, IPv4 first.
    addresses: tuple[FamilyAddresses, ...]
    ports: list[ServicePort]
    scheduler: str
    persistence: int | None
    internal_local: bool
    external_local: bool
    health_check_node_port: int | None
    #: Which external addresses are ``spec.externalIPs`` (the others: LoadBalancer ingress).
    external_ips: frozenset[str]
    #: ``spec.loadBalancerSourceRanges`` of a LoadBalancer Service, as networks
    #: (``10.0.0.0/8``); invalid entries are reported and left out, as kube-proxy does.
    source_ranges: tuple[str, ...]


def valid_port(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 65535


def parse_protocol(value: object) -> Protocol | None:
    """TCP when absent (the API server's default), None when unknown."""
    if value is None:
        return Protocol.TCP
    return _PROTOCOLS.get(value) if isinstance(value, str) else None


def read_service(
    service: Mapping[str, Any],
    config_families: frozenset[Family],
    default_scheduler: str,
    node_addresses: Sequence[str],
    what: str,
    problems: list[Problem],
) -> ServiceSpec | None:
    """The Service's fields, or None for one that has no virtual services at all
    (ExternalName, headless, or without a usable spec)."""
    spec = service.get("spec")
    if not isinstance(spec, _MAPPING):
        problems.append(Problem("missing-field", what, "spec is missing"))
        return None
    svc_type = _service_type(spec, what, problems)
    if svc_type is None:
        return None
    cluster_ips = _cluster_ips(spec, what, problems)
    if cluster_ips is None:
        return None
    node_ports = svc_type in _NODE_PORT_TYPES
    ports = _service_ports(spec, what, node_ports, problems)
    scheduler = _scheduler(service["metadata"], default_scheduler, what, problems)
    persistence = _persistence(spec, what, problems)
    internal_local = _policy_local(spec, "internalTrafficPolicy", what, problems)
    # A Local external policy means nothing for a Service not reachable from outside.
    external_local = _policy_local(spec, "externalTrafficPolicy", what, problems) and (
        node_ports or bool(spec.get("externalIPs"))
    )
    families = frozenset(f for f in cluster_ips if f in config_families)
    external, external_ips = _external_addresses(service, spec, families, config_families, what, problems)
    addresses = tuple([
        _new(FamilyAddresses, (
            family,
            cluster_ips[family],
            _of_family(external, family) if external else (),
            _of_family(node_addresses, family) if node_ports else (),
        ))
        for family in sorted(families)  # IPv4 first (Family is a str enum)
    ])
    health_port = (
        _health_check_node_port(spec, what, problems)
        if svc_type == "LoadBalancer" and external_local
        else None
    )
    ranges = _source_ranges(spec, what, problems) if svc_type == "LoadBalancer" else ()
    return _new(ServiceSpec, (families, addresses, ports, scheduler, persistence,
                              internal_local, external_local, health_port, external_ips, ranges))


def _source_ranges(spec: Mapping[str, Any], what: str, problems: list[Problem]) -> tuple[str, ...]:
    """``spec.loadBalancerSourceRanges`` as canonical networks (host bits dropped, as
    kube-proxy's sloppy parse does). A bad entry is one problem and is skipped; the
    rest of the Service, and its other ranges, are kept."""
    values = spec.get("loadBalancerSourceRanges")
    if values is None:
        return ()
    if not isinstance(values, list):
        problems.append(Problem("wrong-type", what, "spec.loadBalancerSourceRanges is not a list"))
        return ()
    out: list[str] = []
    for value in values:
        try:
            if not isinstance(value, str) or "/" not in value:
                raise ValueError(f"{value!r} is not a CIDR")
            net = ipaddress.ip_network(value.strip(), strict=False)
        except ValueError as exc:
            problems.append(Problem("invalid-cidr", what, f"spec.loadBalancerSourceRanges: {exc} (entry ignored)"))
            continue
        if str(net) not in out:
            out.append(str(net))
    return tuple(out)


def _service_type(spec: Mapping[str, Any], what: str, problems: list[Problem]) -> str | None:
    """ClusterIP, NodePort or LoadBalancer; None for ExternalName (nothing to proxy)."""
    svc_type: str | None = spec.get("type")
    if svc_type is None:
        return "ClusterIP"
    if svc_type == "ExternalName":
        return None
    if svc_type not in _SERVICE_TYPES:
        problems.append(
            Problem("invalid-value", what, f"spec.type {svc_type!r}: treated as ClusterIP",
                    "warning")
        )
        return "ClusterIP"
    return svc_type


def _cluster_ips(
    spec: Mapping[str, Any], what: str, problems: list[Problem]
) -> dict[Family, str] | None:
    """One ClusterIP per family; None for a headless Service or an unusable list.

    ClusterIPs decide which families the Service has at all: like kube-proxy, a
    family without a ClusterIP gets no NodePort/external VIPs either.
    """
    raw_ips = spec.get("clusterIPs")
    if raw_ips is None or raw_ips == []:
        single = spec.get("clusterIP")
        raw_ips = [] if single is None else [single]
    if not isinstance(raw_ips, list):
        problems.append(Problem("wrong-type", what, "spec.clusterIPs is not a list"))
        return None
    if not raw_ips or raw_ips[0] in ("None", ""):
        return None  # headless
    cluster_ips: dict[Family, str] = {}
    for text in raw_ips:
        try:
            ip = canonical_address(text)
        except ValueError as exc:
            problems.append(Problem("invalid-ip", what, f"clusterIP: {exc}"))
            continue
        family = family_of(ip)
        if family in cluster_ips:
            problems.append(
                Problem("invalid-value", what, f"second {family.value} clusterIP {ip} ignored",
                        "warning")
            )
            continue
        cluster_ips[family] = ip
    return cluster_ips


def _service_ports(
    spec: Mapping[str, Any], what: str, node_ports: bool, problems: list[Problem]
) -> list[ServicePort]:
    raw_ports = spec.get("ports")
    if raw_ports is None:
        problems.append(Problem("missing-field", what, "spec.ports is missing"))
        return []
    if not isinstance(raw_ports, list):
        problems.append(Problem("wrong-type", what, "spec.ports is not a list"))
        return []
    ports: list[ServicePort] = []
    for i, raw in enumerate(raw_ports):
        port = _service_port(raw, f"spec.ports[{i}]", node_ports, what, problems)
        if port is not None:
            ports.append(port)
    return ports


def _service_port(
    raw: object, where: str, node_ports: bool, what: str, problems: list[Problem]
) -> ServicePort | None:
    """One ``spec.ports[]`` entry; None when it must be skipped (reported)."""
    if not isinstance(raw, _MAPPING):
        problems.append(Problem("wrong-type", what, f"{where} is not an object"))
        return None
    name = raw.get("name")
    if name is None:
        name = ""
    elif not isinstance(name, str):
        problems.append(Problem("wrong-type", what, f"{where}.name is not a string"))
        return None
    raw_protocol = raw.get("protocol")
    protocol = parse_protocol(raw_protocol)
    if protocol is None:
        problems.append(Problem("unknown-protocol", what, f"{where}: protocol {raw_protocol!r}"))
        return None
    port = raw.get("port")
    if not valid_port(port):
        problems.append(Problem("invalid-port", what, f"{where}: port {port!r}"))
        return None
    node_port: int | None = None
    if node_ports:
        raw_node_port = raw.get("nodePort")
        if valid_port(raw_node_port):
            node_port = raw_node_port
        elif raw_node_port not in (None, 0):
            problems.append(Problem("invalid-port", what, f"{where}: nodePort {raw_node_port!r}"))
    return ServicePort(name, protocol, port, node_port)


def _scheduler(
    meta: Mapping[str, Any], default: str, what: str, problems: list[Problem]
) -> str:
    annotations = meta.get("annotations")
    if annotations is None:
        return default
    if not isinstance(annotations, _MAPPING):
        problems.append(Problem("wrong-type", what, "metadata.annotations is not an object"))
        return default
    value = annotations.get(SCHEDULER_ANNOTATION)
    if value is None:
        return default
    if isinstance(value, str) and value.strip() in IPVS_SCHEDULERS:
        return value.strip()
    problems.append(
        Problem(
            "unknown-scheduler",
            what,
            f"annotation {SCHEDULER_ANNOTATION}={value!r}: using {default}",
            "warning",
        )
    )
    return default


def _persistence(spec: Mapping[str, Any], what: str, problems: list[Problem]) -> int | None:
    """The ClientIP affinity timeout, None without session affinity."""
    affinity = spec.get("sessionAffinity")
    if affinity is None or affinity == "None":
        return None
    if affinity != "ClientIP":
        problems.append(
            Problem("invalid-value", what, f"spec.sessionAffinity {affinity!r}: none", "warning")
        )
        return None
    config = spec.get("sessionAffinityConfig")
    client_ip = (config if isinstance(config, _MAPPING) else {}).get("clientIP")
    timeout = client_ip.get("timeoutSeconds") if isinstance(client_ip, _MAPPING) else None
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


def _policy_local(spec: Mapping[str, Any], key: str, what: str, problems: list[Problem]) -> bool:
    """Whether a traffic policy field says Local (anything unknown is Cluster)."""
    value = spec.get(key)
    if value is None or value == "Cluster":
        return False
    if value == "Local":
        return True
    problems.append(
        Problem("invalid-value", what, f"spec.{key} {value!r}: using Cluster", "warning")
    )
    return False


def _external_addresses(
    service: Mapping[str, Any],
    spec: Mapping[str, Any],
    families: frozenset[Family],
    config_families: frozenset[Family],
    what: str,
    problems: list[Problem],
) -> tuple[list[str], frozenset[str]]:
    """externalIPs and LoadBalancer ingress IPs in the served families, and which of
    them are externalIPs."""
    external: list[str] = []
    external_ips = _address_list(spec.get("externalIPs"), "spec.externalIPs", what, problems)
    for ip in external_ips + _ingress_ips(service.get("status"), what, problems):
        family = family_of(ip)
        if family in families:
            external.append(ip)
        elif family in config_families:
            problems.append(
                Problem("wrong-family", what,
                        f"external address {ip}: the Service has no {family.value} clusterIP",
                        "warning")
            )
    return external, frozenset(external_ips) if external_ips else _NO_ADDRESSES


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


def _of_family(addresses: Sequence[str], family: Family) -> tuple[str, ...]:
    return tuple([ip for ip in addresses if family_of(ip) is family])


def _health_check_node_port(
    spec: Mapping[str, Any], what: str, problems: list[Problem]
) -> int | None:
    """The port load balancers probe a Local-policy LoadBalancer Service's nodes on."""
    raw = spec.get("healthCheckNodePort")
    if valid_port(raw):
        return raw
    problems.append(Problem("invalid-port", what, f"spec.healthCheckNodePort {raw!r}"))
    return None
