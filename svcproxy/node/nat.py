"""Masquerade rules for the node namespace: one nftables table of svcproxy's own.

IPVS rewrites the destination of a connection (NAT forwarding) but keeps the client's
source address. That is right when the reply comes back through this node anyway and
wrong when it would not:

* NodePort, externalIP and LoadBalancer traffic with externalTrafficPolicy Cluster may
  go to an endpoint on another node, which would answer the client directly (the client
  drops a reply from an address it never talked to). Masquerading makes the endpoint
  answer this node. With policy Local the table only holds local endpoints and the
  client's address is kept, which is the point of that policy.
* A Pod reaching itself through its own Service (hairpin) would see a packet from
  itself and answer over loopback: masquerade it to the node.
* ``--masquerade-all`` masquerades all traffic to ClusterIPs; ``--cluster-cidr``
  masquerades ClusterIP traffic from outside the Pod network (kube-proxy's rules).
* The node's own connections to ClusterIPs are always masqueraded: their source is
  the VIP itself (bound to the dummy device), which an endpoint cannot answer.

The shape follows kube-proxy's IPVS mode (mark in prerouting/output, masquerade marked
packets in postrouting, sets instead of one rule per Service) in nftables: the
structure (chains and rules) depends only on the configuration; what Services change
are set elements, diffed like IPVS operations and applied as ``add element`` /
``delete element`` lines in one ``nft -f`` transaction. Everything here is pure: the
nftables adapter (svcproxy.node.nftables) runs the scripts and reads the table back.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
from dataclasses import dataclass, field, replace
from typing import Any, Hashable, Iterable, Mapping

from svcproxy.model import ServiceKey, Table

TABLE = "svcproxy"
FAMILY = "inet"
#: kube-proxy's masquerade bit (--iptables-masquerade-bit 14), for the same reasons:
#: it stays clear of the bits CNI plugins and Istio use.
DEFAULT_MARK = 0x4000

#: Set name -> nftables element type.
SET_TYPES: Mapping[str, str] = {
    "external4": "ipv4_addr . inet_proto . inet_service",
    "external6": "ipv6_addr . inet_proto . inet_service",
    "cluster4": "ipv4_addr . inet_proto . inet_service",
    "cluster6": "ipv6_addr . inet_proto . inet_service",
    "hairpin4": "ipv4_addr . ipv4_addr",
    "hairpin6": "ipv6_addr . ipv6_addr",
    # loadBalancerSourceRanges: the LoadBalancer addresses (and protocol, port) they
    # guard, and the source networks allowed for each.
    "lbfw4": "ipv4_addr . inet_proto . inet_service",
    "lbfw6": "ipv6_addr . inet_proto . inet_service",
    "lbsrc4": "ipv4_addr . inet_proto . inet_service . ipv4_addr",
    "lbsrc6": "ipv6_addr . inet_proto . inet_service . ipv6_addr",
}
#: Set name -> nftables set flags (sets of networks hold intervals).
SET_FLAGS: Mapping[str, str] = {"lbsrc4": "interval", "lbsrc6": "interval"}

#: One element of a set: (address, protocol, port) or (address, address).
Element = tuple[Any, ...]


@dataclass(frozen=True)
class NatConfig:
    masquerade_all: bool = False
    #: The Pod network; ClusterIP traffic from outside it is masqueraded.
    cluster_cidrs: tuple[str, ...] = ()
    mark: int = DEFAULT_MARK

    def __post_init__(self) -> None:
        if self.mark <= 0 or self.mark & (self.mark - 1) or self.mark >= 1 << 32:
            raise ValueError(f"the masquerade mark must be a single bit, not {self.mark:#x}")
        for cidr in self.cluster_cidrs:
            ipaddress.ip_network(cidr, strict=False)  # ValueError for the caller to report


@dataclass(frozen=True)
class NatElements:
    """What the sets should hold (or do hold): set name -> elements."""

    sets: Mapping[str, frozenset[Element]] = field(default_factory=dict)

    def get(self, name: str) -> frozenset[Element]:
        return self.sets.get(name, frozenset())

    def __len__(self) -> int:
        return sum(len(v) for v in self.sets.values())


@dataclass(frozen=True)
class ServiceNat:
    """What the rules need to know about one Service (from translation's ServiceInfo)."""

    keys: tuple[ServiceKey, ...]
    cluster_ips: tuple[str, ...]
    external_policy_local: bool
    local_endpoint_ips: tuple[str, ...] = ()
    #: loadBalancerSourceRanges (networks) and the LoadBalancer addresses they guard.
    source_ranges: tuple[str, ...] = ()
    load_balancer_ips: tuple[str, ...] = ()


def _v6(address: str) -> bool:
    return ":" in address


def _element(key: ServiceKey) -> Element:
    return (key.address, key.protocol.value.lower(), key.port)


#: Not an nftables set: the addresses to bind to the dummy device, kept in the same
#: index so that one pass over a changed Service updates both.
BIND = "bind"


def service_elements(svc: ServiceNat, node_addresses: frozenset[str]) -> dict[str, frozenset[Element]]:
    """One Service's share of every set (and of BIND). Its keys must be the ones that
    are in the desired table (translation drops duplicates from them)."""
    sets: dict[str, set[Element]] = {}
    cluster = frozenset(svc.cluster_ips)
    for key in svc.keys:
        suffix = "6" if _v6(key.address) else "4"
        if key.address not in node_addresses:
            sets.setdefault(BIND, set()).add((key.address,))
        if key.address in cluster:
            sets.setdefault("cluster" + suffix, set()).add(_element(key))
        elif not svc.external_policy_local:
            sets.setdefault("external" + suffix, set()).add(_element(key))
    for ip in svc.local_endpoint_ips:
        sets.setdefault("hairpin" + ("6" if _v6(ip) else "4"), set()).add((ip, ip))
    if svc.source_ranges and svc.load_balancer_ips:
        _firewall_elements(svc, node_addresses, sets)
    return {k: frozenset(v) for k, v in sets.items()}


def _firewall_elements(svc: ServiceNat, node_addresses: frozenset[str], sets: dict[str, set[Element]]) -> None:
    """kube-proxy's load balancer firewall: each guarded (LB address, protocol, port)
    in ``lbfw``, with the allowed source networks in ``lbsrc``. When a range holds
    one of the node's addresses, the node's own connections to the LB address (whose
    source is that address itself, bound to the dummy device) are allowed too.
    Ranges of the other family do not guard this one, as in kube-proxy. Networks
    are collapsed: an interval set refuses overlapping elements."""
    guarded = frozenset(svc.load_balancer_ips)
    for key in svc.keys:
        if key.address not in guarded:
            continue
        v6 = _v6(key.address)
        nets = [ipaddress.ip_network(r) for r in svc.source_ranges if _v6(r) == v6]
        if not nets:
            continue
        if any(n.version == (6 if v6 else 4) and ipaddress.ip_address(a) in n
               for n in nets for a in node_addresses if _v6(a) == v6):
            nets.append(ipaddress.ip_network(key.address))
        suffix = "6" if v6 else "4"
        sets.setdefault("lbfw" + suffix, set()).add(_element(key))
        for net in ipaddress.collapse_addresses(nets):  # type: ignore[type-var]
            sets.setdefault("lbsrc" + suffix, set()).add((*_element(key), str(net)))


def nat_elements(desired: Table, services: Iterable[ServiceNat],
                 node_addresses: Iterable[str] = ()) -> NatElements:
    """Every set's elements (and BIND) for ``desired``: only keys in it count."""
    present = desired.services
    node = frozenset(node_addresses)
    sets: dict[str, set[Element]] = {}
    for svc in services:
        keys = tuple(k for k in svc.keys if k in present)
        for name, elems in service_elements(replace(svc, keys=keys), node).items():
            sets.setdefault(name, set()).update(elems)
    return NatElements({k: frozenset(v) for k, v in sets.items() if v})


@dataclass(frozen=True)
class Delta:
    """Elements whose presence changed: set name -> (added, removed)."""

    changes: Mapping[str, tuple[frozenset[Element], frozenset[Element]]]

    def __bool__(self) -> bool:
        return any(a or r for a, r in self.changes.values())


class ElementIndex:
    """The union of every Service's elements, kept up to date Service by Service.

    Several Services may share an element (an endpoint's hairpin pair, say), so each
    element is reference-counted; ``update`` only looks at Services whose ServiceNat
    object changed (the reconcile loop keeps the object of an unchanged Service), so
    an endpoint change costs one Service, not the cluster.
    """

    def __init__(self) -> None:
        self._shares: dict[Hashable, tuple[ServiceNat, dict[str, frozenset[Element]]]] = {}
        self._counts: dict[str, dict[Element, int]] = {}
        self._node: frozenset[str] | None = None

    def update(self, services: Mapping[Any, ServiceNat], node_addresses: Iterable[str]) -> Delta:
        node = frozenset(node_addresses)
        if node != self._node:  # NodePorts move between BIND and not: start over
            self._node = node
            gone = {name: share for name, (_, share) in self._shares.items()}
            self._shares = {}
        else:
            gone = {name: self._shares.pop(name)[1] for name in list(self._shares) if name not in services}
        added: dict[str, set[Element]] = {}
        removed: dict[str, set[Element]] = {}

        def put(share: Mapping[str, frozenset[Element]], sign: int) -> None:
            for set_name, elems in share.items():
                counts = self._counts.setdefault(set_name, {})
                for e in elems:
                    n = counts.get(e, 0) + sign
                    if n:
                        counts[e] = n
                    else:
                        del counts[e]
                    if sign > 0 and n == 1:
                        if e in removed.get(set_name, ()):
                            removed[set_name].discard(e)
                        else:
                            added.setdefault(set_name, set()).add(e)
                    elif sign < 0 and n == 0:
                        if e in added.get(set_name, ()):
                            added[set_name].discard(e)
                        else:
                            removed.setdefault(set_name, set()).add(e)

        for share in gone.values():
            put(share, -1)
        for name, svc in services.items():
            old = self._shares.get(name)
            if old is not None and old[0] is svc:
                continue
            share = service_elements(svc, node)
            if old is not None:
                put(old[1], -1)
            put(share, +1)
            self._shares[name] = (svc, share)
        names = set(added) | set(removed)
        return Delta({n: (frozenset(added.get(n, ())), frozenset(removed.get(n, ()))) for n in names})

    def current(self) -> NatElements:
        return NatElements({k: frozenset(v) for k, v in self._counts.items() if v})


def _format_element(elem: Element) -> str:
    return " . ".join(str(part) for part in elem)


def _rules(config: NatConfig) -> list[tuple[str, str, str]]:
    """(chain, rule text, purpose) for the configuration; purposes are unique."""
    mark = f"{config.mark:#x}"
    set_mark = f"meta mark set meta mark | {mark}"
    rules: list[tuple[str, str, str]] = []
    for chain in ("prerouting", "output"):
        for fam, proto in (("4", "ip"), ("6", "ip6")):
            match = f"{proto} daddr . meta l4proto . th dport"
            rules.append((chain, f"{match} @external{fam} {set_mark}", f"{chain}-external{fam}"))
            if config.masquerade_all or chain == "output":
                # The node's own connections to a ClusterIP pick the VIP bound to the
                # dummy device as their source, which no endpoint can answer: always
                # masquerade them (to the address of the interface they leave by).
                rules.append((chain, f"{match} @cluster{fam} {set_mark}", f"{chain}-cluster{fam}"))
            else:
                cidrs = [c for c in config.cluster_cidrs if _v6(c) == (fam == "6")]
                if cidrs:
                    nets = ", ".join(str(ipaddress.ip_network(c, strict=False)) for c in cidrs)
                    rules.append((chain, f"{proto} saddr != {{ {nets} }} {match} @cluster{fam} {set_mark}",
                                  f"{chain}-cluster{fam}"))
    clear = f"meta mark set meta mark & {(~config.mark) & 0xFFFFFFFF:#x}"
    rules.append(("postrouting", f"meta mark & {mark} == {mark} {clear} masquerade", "postrouting-marked"))
    rules.append(("postrouting", "ip saddr . ip daddr @hairpin4 masquerade", "postrouting-hairpin4"))
    rules.append(("postrouting", "ip6 saddr . ip6 daddr @hairpin6 masquerade", "postrouting-hairpin6"))
    for chain in ("firewall-in", "firewall-out"):
        for fam, proto in (("4", "ip"), ("6", "ip6")):
            match = f"{proto} daddr . meta l4proto . th dport"
            rules.append((chain, f"{match} . {proto} saddr @lbsrc{fam} accept", f"{chain}-allowed{fam}"))
            rules.append((chain, f"{match} @lbfw{fam} drop", f"{chain}-drop{fam}"))
    return rules


_CHAINS = {
    "prerouting": "type nat hook prerouting priority dstnat; policy accept;",
    "output": "type nat hook output priority -100; policy accept;",
    "postrouting": "type nat hook postrouting priority srcnat; policy accept;",
    # Before IPVS sees the packet: it takes incoming connections at LOCAL_IN (priority
    # 98) and the node's own at LOCAL_OUT (-98), rewriting their destination.
    "firewall-in": "type filter hook input priority filter; policy accept;",
    "firewall-out": "type filter hook output priority -110; policy accept;",
}


def structure_tag(config: NatConfig) -> str:
    """A digest of the table's structure, kept in every rule's comment: a table left by
    another version or configuration (or with a rule missing) is rebuilt, not patched."""
    text = json.dumps([_rules(config), SET_TYPES, SET_FLAGS, _CHAINS], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def rule_comments(config: NatConfig) -> frozenset[str]:
    tag = structure_tag(config)
    return frozenset(f"svcproxy {tag} {purpose}" for _, _, purpose in _rules(config))


def render_table(config: NatConfig, elements: NatElements) -> str:
    """The whole table as one nft script that replaces any table of that name
    atomically (``add`` makes the ``delete`` safe when there is none)."""
    tag = structure_tag(config)
    lines = [f"add table {FAMILY} {TABLE}", f"delete table {FAMILY} {TABLE}", f"table {FAMILY} {TABLE} {{"]
    for name, typ in SET_TYPES.items():
        elems = sorted(elements.get(name), key=_sort_key)
        body = f"type {typ};" + (f" flags {SET_FLAGS[name]};" if name in SET_FLAGS else "")
        if elems:
            body += " elements = { " + ", ".join(_format_element(e) for e in elems) + " }"
        lines.append(f"\tset {name} {{ {body} }}")
    for chain, header in _CHAINS.items():
        lines.append(f"\tchain {chain} {{")
        lines.append(f"\t\t{header}")
        for rule_chain, text, purpose in _rules(config):
            if rule_chain == chain:
                lines.append(f'\t\t{text} comment "svcproxy {tag} {purpose}"')
        lines.append("\t}")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _sort_key(elem: Element) -> tuple[str, ...]:
    return tuple(str(p) for p in elem)


def element_script(old: NatElements, new: NatElements) -> str:
    """``delete element`` / ``add element`` lines turning ``old`` into ``new``; empty
    when they are equal. Deletes come first so a moved element is never doubled."""
    lines: list[str] = []
    for verb, a, b in (("delete", old, new), ("add", new, old)):
        for name in SET_TYPES:
            extra = sorted(a.get(name) - b.get(name), key=_sort_key)
            if extra:
                lines.append(f"{verb} element {FAMILY} {TABLE} {name} {{ "
                             + ", ".join(_format_element(e) for e in extra) + " }")
    return "\n".join(lines) + "\n" if lines else ""


@dataclass(frozen=True)
class Listing:
    """What ``nft -j list table`` showed: None when there is no table."""

    comments: frozenset[str]
    elements: NatElements


def _json_value(value: Any) -> Any:
    if isinstance(value, dict) and "prefix" in value:  # a network (lbsrc sets)
        return f'{value["prefix"]["addr"]}/{value["prefix"]["len"]}'
    if isinstance(value, str) and ":" in value:
        return str(ipaddress.ip_address(value))
    return value


_PROTO_NUMBERS = {6: "tcp", 17: "udp", 132: "sctp"}


def parse_listing(text: str) -> Listing:
    """Parse ``nft -j list table inet svcproxy`` output (nft >= 0.9.x JSON schema 1)."""
    doc = json.loads(text)
    comments: set[str] = set()
    sets: dict[str, set[Element]] = {}
    for item in doc.get("nftables", []):
        if "rule" in item:
            comment = item["rule"].get("comment")
            if isinstance(comment, str):
                comments.add(comment)
        elif "set" in item:
            s = item["set"]
            elems: set[Element] = set()
            for raw in s.get("elem", []) or []:
                if isinstance(raw, dict) and "elem" in raw:  # element with options (timeout, comment)
                    raw = raw["elem"]["val"]
                parts = raw["concat"] if isinstance(raw, dict) and "concat" in raw else [raw]
                values = [_json_value(p) for p in parts]
                values = [_PROTO_NUMBERS.get(v, v) if i == 1 and len(values) in (3, 4) and isinstance(v, int) else v
                          for i, v in enumerate(values)]
                if s["name"].startswith("lbsrc") and len(values) == 4:
                    # A /32 (/128) network is listed as a plain address.
                    values[3] = str(ipaddress.ip_network(str(values[3]), strict=False))
                elems.add(tuple(values))
            sets[s["name"]] = elems
    return Listing(frozenset(comments), NatElements({k: frozenset(v) for k, v in sets.items() if v}))


def canonical(elements: NatElements) -> NatElements:
    """Addresses in Python's canonical text (as ``parse_listing`` returns them)."""
    out: dict[str, frozenset[Element]] = {}
    for name, elems in elements.sets.items():
        out[name] = frozenset(tuple(_canonical_part(p) for p in e) for e in elems)
    return NatElements({k: v for k, v in out.items() if v})



def _canonical_part(part: Any) -> Any:
    if isinstance(part, str) and "/" in part:
        return str(ipaddress.ip_network(part, strict=False))
    if isinstance(part, str) and ":" in part:
        return str(ipaddress.ip_address(part))
    return part
