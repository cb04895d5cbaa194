"""Which UDP conntrack entries are stale, as kube-proxy decides it (pure).

UDP has no connection for IPVS to end, and with ``net.ipv4.vs.conntrack=1`` every
flow through a virtual service has a conntrack entry that the client's next
datagram keeps alive. Two cases leave a client stuck on such an entry:

* the real server it was sent to went away: while the entry lives, IPVS drops the
  flow's packets instead of scheduling them again (a DNS client keeps asking a
  Pod that no longer exists);
* the virtual service had no real server when the flow began: the entry records
  the packet as unanswered and un-translated, and keeps the flow in that black
  hole after an endpoint appears.

So, like kube-proxy's conntrack cleanup, an entry whose original destination is a
UDP virtual service (address and port) and whose reply does not come from one of
that service's real servers is stale and gets deleted. The rule looks at the
desired table and the kernel's entries, not at what changed, so an entry left by a
restart or a failed delete is found at the next full sync too.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from svcproxy.model import Protocol, ServiceKey, Table

#: (virtual address, port) -> addresses of its real servers.
Backends = Mapping[tuple[str, int], frozenset[str]]


@dataclass(frozen=True)
class Flow:
    """One UDP conntrack entry, as far as the rule cares (addresses canonical)."""

    orig_src: str
    orig_dst: str
    sport: int
    dport: int
    reply_src: str

    @property
    def v6(self) -> bool:
        return ":" in self.orig_dst

    def __str__(self) -> str:
        return f"udp {self.orig_src}:{self.sport} -> {self.orig_dst}:{self.dport} (reply from {self.reply_src})"


def udp_backends(desired: Table, scope: Iterable[ServiceKey] | None = None) -> dict[tuple[str, int], frozenset[str]]:
    """Every UDP virtual service of ``desired`` (only those in ``scope``, when given)
    with the addresses of its real servers (weight 0 included: IPVS still serves the
    flows it has on them)."""
    keys = desired.services.keys() if scope is None else (k for k in scope if k in desired.services)
    out: dict[tuple[str, int], frozenset[str]] = {}
    for key in keys:
        if key.protocol is Protocol.UDP and not key.fwmark:
            vs = desired.services[key]
            out[(key.address, key.port)] = frozenset(d.address for d in vs.destinations)
    return out


def stale(flows: Iterable[Flow], backends: Backends) -> list[Flow]:
    """The flows to a UDP virtual service whose reply source is none of its real servers."""
    out = []
    for f in flows:
        servers = backends.get((f.orig_dst, f.dport))
        if servers is not None and f.reply_src not in servers:
            out.append(f)
    return out
