"""Which UDP conntrack entries are stale, as kube-proxy decides it (pure).

With ``net.ipv4.vs.conntrack=1`` every UDP flow through a virtual service has a
conntrack entry that the client's next datagram keeps alive. A flow that began
before its Service was programmed (a NodePort on the node's own address, a
ClusterIP routed out of the node) has a confirmed entry with the un-translated
reply; IPVS only rewrites entries it sees unconfirmed, so once the virtual service
exists the real server's replies clash with that entry and leave under another
source port, and a resolver's connected socket never takes them. The flow stays
stuck while the client keeps sending.

kube-proxy also cleans up after a deleted real server and after the black hole of a
virtual service without real servers. On 6.1, with the sysctls svcproxy sets, the
kernel handles both (docs/parity.md has the reasons): expire_nodest_conn=1 makes
IPVS drop a deleted server's connections with their entries, and IPVS drops a
packet to a virtual service without real servers before its entry is confirmed.
The rule below still deletes such entries wherever a kernel leaves them.

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
