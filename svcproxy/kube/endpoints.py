"""Which endpoints of a Service port a node sends traffic to.

This is kube-proxy's ``CategorizeEndpoints`` (pkg/proxy/topology.go) and the endpoint
half of its ``EndpointSliceCache`` as pure functions over small immutable values, so
the rules can be table-tested without any Kubernetes object in sight:

* per endpoint only ``addresses[0]`` counts; ready = ``ready`` null or true, serving =
  ``serving`` null or true, terminating = ``terminating`` true, local = ``nodeName``
  equals this node;
* the same address:port seen twice (a Pod IP reused while the old Pod terminates, or an
  endpoint moving between slices) keeps the non-terminating one;
* the cluster set is the ready endpoints (narrowed by topology hints), falling back to
  the serving-and-terminating ones when nothing is ready, so connections drain instead
  of failing; the local set applies the same fallback to this node's endpoints only and
  ignores hints (the traffic already stays on the node).

Endpoints are ``NamedTuple``s rather than dataclasses because translation builds one
per endpoint per port and the cheaper constructor is measurable at 100k endpoints.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from operator import itemgetter
from typing import Any, Iterable, NamedTuple, Sequence

from svcproxy.model import Family

#: Topology modes, spelled as kube-proxy spells them (``trafficDistribution`` values).
TOPOLOGY_NONE = ""
TOPOLOGY_SAME_ZONE = "PreferSameZone"
TOPOLOGY_SAME_NODE = "PreferSameNode"

_NO_HINTS: frozenset[str] = frozenset()

#: For isinstance: plain dicts first, which is what the API client and YAML give and
#: far cheaper to check than the Mapping ABC.
_MAPPING = (dict, Mapping)


class EndpointError(ValueError):
    """One endpoint that cannot be used; ``kind`` is a translate ``Problem`` kind."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class Endpoint(NamedTuple):
    """One usable endpoint of one Service port, already parsed and canonical."""

    address: str
    port: int
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    local: bool = False
    zone_hints: frozenset[str] = _NO_HINTS
    node_hints: frozenset[str] = _NO_HINTS


#: ``Endpoint(...)`` without the Python-level ``__new__`` NamedTuple generates: much
#: faster, and endpoints are made by the hundred thousand.
_new = tuple.__new__


@dataclass(frozen=True)
class Categorized:
    """The endpoints a node uses for cluster-wide and node-local traffic policy."""

    cluster: tuple[Endpoint, ...]
    local: tuple[Endpoint, ...]


# Dotted quad without leading zeros: already canonical, no parsing and no cache entry
# needed. The fast path matters: a cluster has ~10 IPv4 endpoints per Service and
# ipaddress is slow, while a cache big enough for every Pod IP would cost memory.
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = re.compile(rf"{_OCTET}(?:\.{_OCTET}){{3}}")


@lru_cache(maxsize=1 << 16)
def _canonical(text: str) -> str:
    ip = ipaddress.ip_address(text.strip())
    if isinstance(ip, ipaddress.IPv6Address):
        # A mapped address would be programmed as IPv6 but means IPv4: never guess.
        if ip.ipv4_mapped is not None:
            raise ValueError(f"IPv4-mapped IPv6 address {text!r} is not allowed")
        if ip.scope_id is not None:
            raise ValueError(f"scoped IPv6 address {text!r} is not allowed")
    if ip.is_unspecified or ip.is_multicast:
        raise ValueError(f"{text!r} is not a unicast address")
    return ip.compressed


def canonical_address(text: object) -> str:
    """Canonical text of a unicast IP address (model.canonical_ip plus the odd cases).

    IPv4 in its usual spelling is checked by a regular expression; anything else goes
    through ipaddress behind a cache (a cluster repeats its IPv6 addresses across
    services, slices and syncs). Raises ValueError for anything that is not one
    usable unicast address.
    """
    if not isinstance(text, str):
        raise ValueError(f"address must be a string, not {type(text).__name__}")
    if _IPV4.fullmatch(text):
        first = int(text[: text.index(".")])
        if 224 <= first <= 239 or text == "0.0.0.0":
            raise ValueError(f"{text!r} is not a unicast address")
        return text
    return _canonical(text)


def _condition(value: object, name: str) -> bool:
    if isinstance(value, bool):
        return value
    raise EndpointError("wrong-type", f"conditions.{name} must be a boolean, not {value!r}")


def _hint_names(hints: Mapping[str, Any], field: str) -> frozenset[str]:
    entries = hints.get(field)
    if entries is None:
        return _NO_HINTS
    if not isinstance(entries, list):
        raise EndpointError("wrong-type", f"hints.{field} must be a list")
    names = []
    for entry in entries:
        name = entry.get("name") if isinstance(entry, _MAPPING) else None
        if not isinstance(name, str):
            raise EndpointError("wrong-type", f"hints.{field}[] needs a string name")
        names.append(name)
    return frozenset(names)


def parse_endpoint(
    raw: object, *, port: int, node_name: str, family: Family | None = None
) -> Endpoint:
    """One ``EndpointSlice.endpoints[]`` entry as an ``Endpoint`` with the given port.

    Raises ``EndpointError`` for an endpoint that must be skipped; the caller reports
    it and keeps the others.
    """
    if not isinstance(raw, _MAPPING):
        raise EndpointError("malformed-object", "endpoint is not an object")
    addresses = raw.get("addresses")
    if not isinstance(addresses, list) or not addresses:
        raise EndpointError("missing-field", "endpoint has no addresses")
    try:
        address = canonical_address(addresses[0])
    except ValueError as exc:
        raise EndpointError("invalid-ip", f"endpoint address: {exc}") from None
    if family is not None and (":" in address) != (family is Family.IPV6):
        raise EndpointError(
            "wrong-family", f"endpoint address {address} in an {family.value} slice"
        )
    conditions = raw.get("conditions")
    ready = serving = True
    terminating = False
    if conditions is not None:
        if not isinstance(conditions, _MAPPING):
            raise EndpointError("wrong-type", "conditions must be an object")
        value = conditions.get("ready")
        if value is not None:
            ready = value if value is True or value is False else _condition(value, "ready")
        value = conditions.get("serving")
        if value is not None:
            serving = value if value is True or value is False else _condition(value, "serving")
        value = conditions.get("terminating")
        if value is not None:
            terminating = (
                value if value is True or value is False else _condition(value, "terminating")
            )
    endpoint_node = raw.get("nodeName")
    if endpoint_node is not None and not isinstance(endpoint_node, str):
        raise EndpointError("wrong-type", "nodeName must be a string")
    local = bool(node_name) and endpoint_node == node_name
    hints = raw.get("hints")
    zone_hints = node_hints = _NO_HINTS
    if hints is not None:
        if not isinstance(hints, _MAPPING):
            raise EndpointError("wrong-type", "hints must be an object")
        zone_hints = _hint_names(hints, "forZones")
        node_hints = _hint_names(hints, "forNodes")
    return _new(Endpoint, (address, port, ready, serving, terminating, local, zone_hints, node_hints))


def with_port(endpoint: Endpoint, port: int) -> Endpoint:
    """The same endpoint on another port (a slice lists its endpoints once for all ports)."""
    return _new(Endpoint, (endpoint[0], port, *endpoint[2:]))


def dedupe(endpoints: Iterable[Endpoint]) -> list[Endpoint]:
    """One endpoint per address:port; a non-terminating one replaces a terminating one.

    Otherwise the first one seen wins, so callers that feed slices in a stable order
    get a stable answer (kube-proxy leaves the choice between two live ones undefined).
    """
    endpoints = list(endpoints)
    if len({ep[0] for ep in endpoints}) == len(endpoints):
        return endpoints  # distinct addresses, so nothing to merge (the usual case)
    seen: dict[tuple[str, int], Endpoint] = {}
    for ep in endpoints:
        key = (ep.address, ep.port)
        old = seen.get(key)
        if old is None or (old.terminating and not ep.terminating):
            seen[key] = ep
    return list(seen.values())


def topology_mode(endpoints: Sequence[Endpoint], node_name: str, zone: str | None) -> str:
    """kube-proxy's ``topologyModeFromHints``: use hints only if every ready endpoint
    has one and at least one is for this node (node hints) or this zone (zone hints).

    Partial hints mean the EndpointSlice controller is mid-update or gave up; using
    them then could send all traffic to too few endpoints, so they are ignored.
    """
    has_ready = False
    all_node_hints = all_zone_hints = True
    for_node = for_zone = False
    for ep in endpoints:
        if not ep.ready:
            continue
        if not ep.node_hints and not ep.zone_hints:
            return TOPOLOGY_NONE  # the common case: no hints at all, decided at once
        has_ready = True
        if not ep.node_hints:
            all_node_hints = False
        elif node_name in ep.node_hints:
            for_node = True
        if not ep.zone_hints:
            all_zone_hints = False
        elif zone is not None and zone in ep.zone_hints:
            for_zone = True
    if not has_ready:
        return TOPOLOGY_NONE
    if all_node_hints and for_node and node_name:
        return TOPOLOGY_SAME_NODE
    if all_zone_hints and for_zone:
        return TOPOLOGY_SAME_ZONE
    return TOPOLOGY_NONE


def _available(ep: Endpoint, mode: str, node_name: str, zone: str | None) -> bool:
    if mode == TOPOLOGY_SAME_ZONE:
        return zone in ep.zone_hints
    if mode == TOPOLOGY_SAME_NODE:
        return node_name in ep.node_hints
    return True


#: (address, port): the order of ``DestKey`` and so of a VirtualService's destinations.
_sort_key = itemgetter(0, 1)


def categorize_endpoints(
    endpoints: Sequence[Endpoint],
    *,
    node_name: str,
    zone: str | None = None,
    want_cluster: bool = True,
    want_local: bool = True,
) -> Categorized:
    """The cluster and local endpoint sets, each sorted by address and port.

    ``endpoints`` should already be deduplicated. A set that is not wanted is left
    empty, which saves the work for the common all-Cluster-policy Service.
    """
    cluster: list[Endpoint] = []
    local: list[Endpoint] = []
    if not endpoints:
        return Categorized((), ())
    endpoints = sorted(endpoints, key=_sort_key)  # once: the filters below keep the order
    if want_cluster:
        mode = topology_mode(endpoints, node_name, zone)
        if mode == TOPOLOGY_NONE:
            cluster = [ep for ep in endpoints if ep.ready]
        else:
            cluster = [
                ep for ep in endpoints if ep.ready and _available(ep, mode, node_name, zone)
            ]
        if not cluster:
            cluster = [ep for ep in endpoints if ep.serving and ep.terminating]
    if want_local:
        local = [ep for ep in endpoints if ep.local and ep.ready]
        if not local:
            local = [ep for ep in endpoints if ep.local and ep.serving and ep.terminating]
    return Categorized(tuple(cluster), tuple(local))
