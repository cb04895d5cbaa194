"""The dummy device that makes virtual addresses local to the node (``kube-ipvs0``).

IPVS only sees packets the node accepts for itself (LOCAL_IN). A packet forwarded into
the node for a ClusterIP, an externalIP or a LoadBalancer IP is accepted only when that
address is local, so, like kube-proxy, svcproxy binds each such address (/32, /128) to
a dummy device that stays down: the kernel adds a ``local`` route for every address
bound to it, and a down dummy never answers ARP for them or carries traffic itself.
Node addresses (NodePorts) are local already and are never bound.

Addresses are diffed: what the device holds is read at start and every
``recheck_period`` seconds (drift repair); in between, the image left by the last
change is trusted, so an unchanged Service set costs nothing.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from typing import Any, Iterable, Protocol as TypingProtocol

from svcproxy.model import Table

DEVICE = "kube-ipvs0"
IFA_F_NODAD = 0x02


def bound_addresses(desired: Table, node_addresses: Iterable[str]) -> frozenset[str]:
    """Every virtual address that is not already the node's."""
    node = {str(ipaddress.ip_address(a)) for a in node_addresses}
    return frozenset(key.address for key in desired.services if key.address not in node)


@dataclass(frozen=True)
class AddressChanges:
    add: tuple[str, ...]
    delete: tuple[str, ...]

    def __bool__(self) -> bool:
        return bool(self.add or self.delete)

    def describe(self) -> str:
        return " ".join([*(f"+{a}" for a in self.add), *(f"-{a}" for a in self.delete)])


def address_changes(desired: frozenset[str], actual: frozenset[str]) -> AddressChanges:
    return AddressChanges(tuple(sorted(desired - actual)), tuple(sorted(actual - desired)))


class Links(TypingProtocol):
    """What the device code needs from rtnetlink (pyroute2's IPRoute has it)."""

    def link_lookup(self, **kwargs: Any) -> list[int]: ...
    def link(self, command: str, **kwargs: Any) -> Any: ...
    def get_addr(self, **kwargs: Any) -> Any: ...
    def addr(self, command: str, **kwargs: Any) -> Any: ...


class DeviceError(Exception):
    pass


class DummyDevice:
    """The device in the current network namespace, through a pyroute2 IPRoute."""

    def __init__(self, name: str = DEVICE, ipr: Links | None = None) -> None:
        self.name = name
        self._ipr = ipr

    @property
    def ipr(self) -> Links:
        if self._ipr is None:
            from pyroute2 import IPRoute  # type: ignore[import-untyped]  # heavy: only when used

            self._ipr = IPRoute()
        return self._ipr

    def close(self) -> None:
        if self._ipr is not None and hasattr(self._ipr, "close"):
            self._ipr.close()
        self._ipr = None

    def index(self) -> int | None:
        found = self.ipr.link_lookup(ifname=self.name)
        return found[0] if found else None

    def ensure(self) -> int:
        """The device's index, creating it (down) when missing."""
        idx = self.index()
        if idx is not None:
            return idx
        try:
            self.ipr.link("add", ifname=self.name, kind="dummy")
        except Exception as exc:  # pyroute2's NetlinkError: the kernel has no dummy driver, ...
            raise DeviceError(f"cannot create dummy device {self.name}: {exc}") from exc
        idx = self.index()
        if idx is None:
            raise DeviceError(f"dummy device {self.name} vanished right after it was created")
        return idx

    def addresses(self) -> frozenset[str]:
        """The addresses bound to the device (empty when there is no device)."""
        idx = self.index()
        if idx is None:
            return frozenset()
        out = set()
        for msg in self.ipr.get_addr(index=idx):
            address = msg.get_attr("IFA_ADDRESS")
            if address and not ipaddress.ip_address(address).is_link_local:
                out.add(str(ipaddress.ip_address(address)))
        return frozenset(out)

    def apply(self, changes: AddressChanges) -> list[tuple[str, str]]:
        """Bind and unbind; returns (address, error) for each one that failed."""
        if not changes:
            return []
        idx = self.ensure()
        failed: list[tuple[str, str]] = []
        for verb, addresses in (("del", changes.delete), ("add", changes.add)):
            for address in addresses:
                v6 = ":" in address
                kwargs: dict[str, Any] = {"index": idx, "address": address, "prefixlen": 128 if v6 else 32,
                                          "family": socket.AF_INET6 if v6 else socket.AF_INET}
                if v6 and verb == "add":
                    kwargs["flags"] = IFA_F_NODAD
                try:
                    self.ipr.addr(verb, **kwargs)
                except Exception as exc:
                    code = getattr(exc, "code", None)
                    if (verb == "add" and code == 17) or (verb == "del" and code in (99, 19)):
                        continue  # already there / already gone: the goal holds
                    failed.append((address, f"{verb}: {exc}"))
        return failed

    def delete(self) -> bool:
        idx = self.index()
        if idx is None:
            return False
        self.ipr.link("del", index=idx)
        return True
