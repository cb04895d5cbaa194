"""The endpoints of one Service, gathered from its EndpointSlices.

A Service's endpoints arrive split over any number of slices, one address family
each, every slice listing its endpoints once for all of its ports. Virtual services
want them the other way round: per (family, port name, protocol), one endpoint per
address:port however many slices repeat it. Slices are read in name order so that
which duplicate wins never depends on the order the API server listed them in. A
broken slice, port or endpoint is skipped on its own and reported.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from svcproxy.kube.endpoints import Endpoint, EndpointError, dedupe, parse_endpoint, with_port
from svcproxy.kube.objects import display_name
from svcproxy.kube.problems import Problem
from svcproxy.kube.service_spec import parse_protocol, valid_port
from svcproxy.model import Family, Protocol

#: What a Service port is matched on: (family, port name, protocol).
PortKey = tuple[Family, str, Protocol]

#: For isinstance: plain dicts first (what clients and YAML give), cheap to check.
_MAPPING = (dict, Mapping)
_FAMILIES = {f.value: f for f in Family}

#: A slice port: (name, protocol, number).
_SlicePort = tuple[str, Protocol, int]


def endpoint_groups(
    slices: Sequence[Mapping[str, Any]],
    families: frozenset[Family],
    node_name: str,
    what: str,
    problems: list[Problem],
) -> dict[PortKey, list[Endpoint]]:
    """The Service's endpoints per port key, deduplicated across its slices."""
    groups: dict[PortKey, list[Endpoint]] = {}
    ordered = sorted(slices, key=_slice_sort_key) if len(slices) > 1 else slices
    for raw_slice in ordered:
        try:
            if not isinstance(raw_slice, _MAPPING):
                problems.append(Problem("malformed-object", what, "slice is not an object"))
                continue
            for key, eps in _slice_endpoints(raw_slice, families, node_name, problems).items():
                groups.setdefault(key, []).extend(eps)
        except Exception as exc:  # last resort: keep the other slices
            problems.append(
                Problem("malformed-object", display_name("EndpointSlice", raw_slice),
                        f"{type(exc).__name__}: {exc}")
            )
    return {k: dedupe(v) for k, v in groups.items()}


def _slice_sort_key(raw: Mapping[str, Any]) -> str:
    meta = raw.get("metadata")
    name = meta.get("name") if isinstance(meta, _MAPPING) else None
    return name if isinstance(name, str) else ""


def _slice_endpoints(
    raw_slice: Mapping[str, Any],
    families: frozenset[Family],
    node_name: str,
    problems: list[Problem],
) -> dict[PortKey, list[Endpoint]]:
    """Endpoints of one slice per port key; broken pieces skipped."""
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
) -> dict[PortKey, list[Endpoint]]:
    family = _slice_family(raw_slice, issues)
    if family is None or family not in families:
        return {}  # FQDN, unusable, or a family this node or this Service does not serve
    ports = _slice_ports(raw_slice, issues)
    if not ports:
        return {}
    first_port = ports[0][2]
    endpoints = _parse_endpoints(raw_slice, first_port, node_name, family, issues)
    if endpoints is None:
        return {}
    out: dict[PortKey, list[Endpoint]] = {}
    for name, protocol, number in ports:
        eps = endpoints if number == first_port else [with_port(ep, number) for ep in endpoints]
        out.setdefault((family, name, protocol), []).extend(eps)
    return out


def _slice_family(raw_slice: Mapping[str, Any], issues: list[tuple[str, str]]) -> Family | None:
    """The slice's address family; None for FQDN slices (never proxied) and bad ones."""
    address_type = raw_slice.get("addressType")
    if address_type == "FQDN":
        return None
    family = _FAMILIES.get(address_type) if isinstance(address_type, str) else None
    if family is None:
        if address_type is None:
            issues.append(("missing-field", "addressType is missing"))
        else:
            issues.append(("invalid-value", f"addressType {address_type!r}"))
    return family


def _slice_ports(raw_slice: Mapping[str, Any], issues: list[tuple[str, str]]) -> list[_SlicePort]:
    raw_ports = raw_slice.get("ports")
    if raw_ports is None:
        return []  # "all ports": no Service port can match it (kube-proxy agrees)
    if not isinstance(raw_ports, list):
        issues.append(("wrong-type", "ports is not a list"))
        return []
    ports: list[_SlicePort] = []
    for i, raw in enumerate(raw_ports):
        where = f"ports[{i}]"
        if not isinstance(raw, _MAPPING):
            issues.append(("wrong-type", f"{where} is not an object"))
            continue
        number = raw.get("port")
        if number is None:
            continue  # kube-proxy ignores ports without a number
        if not valid_port(number):
            issues.append(("invalid-port", f"{where}: port {number!r}"))
            continue
        name = raw.get("name")
        if name is None:
            name = ""
        elif not isinstance(name, str):
            issues.append(("wrong-type", f"{where}.name is not a string"))
            continue
        raw_protocol = raw.get("protocol")
        protocol = parse_protocol(raw_protocol)
        if protocol is None:
            issues.append(("unknown-protocol", f"{where}: protocol {raw_protocol!r}"))
            continue
        ports.append((name, protocol, number))
    return ports


def _parse_endpoints(
    raw_slice: Mapping[str, Any],
    port: int,
    node_name: str,
    family: Family,
    issues: list[tuple[str, str]],
) -> list[Endpoint] | None:
    """The slice's usable endpoints on ``port``; None when ``endpoints`` is not a list."""
    raw_endpoints = raw_slice.get("endpoints")
    if raw_endpoints is None:
        return []
    if not isinstance(raw_endpoints, list):
        issues.append(("wrong-type", "endpoints is not a list"))
        return None
    endpoints: list[Endpoint] = []
    for i, raw in enumerate(raw_endpoints):
        try:
            endpoints.append(parse_endpoint(raw, port=port, node_name=node_name, family=family))
        except EndpointError as exc:
            issues.append((exc.kind, f"endpoints[{i}]: {exc}"))
    return endpoints
