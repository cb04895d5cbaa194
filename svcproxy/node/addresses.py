"""The node's own addresses, for NodePorts (``--nodeport-addresses``).

kube-proxy's IPVS mode serves NodePorts on the node's local addresses, narrowed by
``--nodeport-addresses`` CIDRs. svcproxy does the same when that flag is given: the
addresses are read from the kernel with pyroute2 (never those of the dummy device,
which holds virtual addresses, and never link-local ones), and re-read at every full
sync so an address that appears or goes moves its NodePorts with it. Without the flag
the Node object's addresses (or ``--node-ip``) are used, as before.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Iterable, Sequence

from svcproxy.node.dummy import DEVICE


def parse_cidrs(texts: Iterable[str]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """CIDRs as kube-proxy takes them; ValueError names the bad one."""
    out = []
    for text in texts:
        text = text.strip()
        if not text:
            continue
        try:
            out.append(ipaddress.ip_network(text, strict=False))
        except ValueError as exc:
            raise ValueError(f"--nodeport-addresses: {text!r} is not a CIDR ({exc})") from None
    return tuple(out)


def select(addresses: Iterable[tuple[str, str]], cidrs: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network],
           exclude_devices: Iterable[str] = (DEVICE,)) -> tuple[str, ...]:
    """(device, address) pairs -> the addresses NodePorts are served on, in order."""
    excluded = set(exclude_devices)
    out: dict[str, None] = {}
    for device, text in addresses:
        if device in excluded:
            continue
        ip = ipaddress.ip_address(text)
        if ip.is_link_local or ip.is_multicast or ip.is_loopback:
            continue  # loopback: kube-proxy's IPVS mode skips it too (IPVS cannot serve it)
        if any(ip in net for net in cidrs):
            out[str(ip)] = None
    return tuple(out)


class NodeAddresses:
    """Reads the current namespace's addresses through rtnetlink (pyroute2)."""

    def __init__(self, cidrs: Sequence[str], exclude_devices: Iterable[str] = (DEVICE,), ipr: Any = None) -> None:
        self.cidrs = parse_cidrs(cidrs)
        if not self.cidrs:
            raise ValueError("--nodeport-addresses needs at least one CIDR")
        self.exclude = tuple(exclude_devices)
        self._ipr = ipr

    def _pairs(self) -> list[tuple[str, str]]:
        if self._ipr is None:
            from pyroute2 import IPRoute  # type: ignore[import-untyped]

            self._ipr = IPRoute()
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in self._ipr.get_links()}
        pairs = []
        for msg in self._ipr.get_addr():
            address = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
            if address:
                pairs.append((names.get(msg["index"], ""), address))
        return pairs

    def __call__(self) -> tuple[str, ...]:
        return select(self._pairs(), self.cidrs, self.exclude)
