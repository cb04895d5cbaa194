"""The IPVS table as plain, frozen values.

Everything in the core speaks in these types: translation produces a ``Table``, the
kernel backends read one back, and the diff compares two of them. Keeping them frozen
and free of I/O is what lets the core be tested exhaustively and compared by value.

Addresses are always stored in their canonical compressed text form
(``ipaddress.ip_address(x).compressed``) so that equal addresses compare equal no
matter how the kernel or the API server spelled them.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass, field
from typing import Iterable, Mapping

#: The schedulers the Linux IPVS code ships (``net/netfilter/ipvs/ip_vs_*.c``).
IPVS_SCHEDULERS: frozenset[str] = frozenset(
    {"rr", "wrr", "lc", "wlc", "lblc", "lblcr", "dh", "sh", "sed", "nq", "fo", "ovf", "mh", "twos"}
)

#: kube-proxy's default ClientIP affinity timeout (3 hours).
DEFAULT_AFFINITY_TIMEOUT = 10800


class Protocol(str, enum.Enum):
    TCP = "TCP"
    UDP = "UDP"
    SCTP = "SCTP"


class Family(str, enum.Enum):
    IPV4 = "IPv4"
    IPV6 = "IPv6"


class Forward(str, enum.Enum):
    """IPVS packet-forwarding method of a real server (ipvsadm -m/-g/-i)."""

    MASQ = "masq"
    ROUTE = "route"  # direct routing, "gatewaying"
    TUNNEL = "tunnel"  # ipip


def canonical_ip(text: str) -> str:
    """Canonical compressed form of an IP address; raises ValueError if it is not one."""
    return ipaddress.ip_address(text.strip()).compressed


def family_of(address: str) -> Family:
    return Family.IPV6 if ":" in address else Family.IPV4


@dataclass(frozen=True, order=True)
class ServiceKey:
    """Identity of a virtual service: what IPVS itself keys services by.

    ``fwmark`` services (never created by svcproxy, but possibly present in the kernel)
    have ``fwmark`` > 0, ``port`` 0 and the unspecified address of their family.
    """

    protocol: Protocol
    address: str
    port: int
    fwmark: int = 0

    @property
    def family(self) -> Family:
        return family_of(self.address)

    def __str__(self) -> str:
        if self.fwmark:
            return f"fwmark:{self.fwmark}/{self.family.value}"
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{self.protocol.value.lower()}://{host}:{self.port}"


@dataclass(frozen=True, order=True)
class DestKey:
    address: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class Destination:
    """A real server. Connection counts are observations, not settings: they take no
    part in equality, so a table read from the kernel equals the desired one."""

    address: str
    port: int
    weight: int = 1
    forward: Forward = Forward.MASQ
    active_conns: int = field(default=0, compare=False)
    inactive_conns: int = field(default=0, compare=False)

    @property
    def key(self) -> DestKey:
        return DestKey(self.address, self.port)

    def settings_equal(self, other: "Destination") -> bool:
        return self.weight == other.weight and self.forward == other.forward


@dataclass(frozen=True)
class VirtualService:
    """A virtual service with its settings and real servers (sorted by key)."""

    key: ServiceKey
    scheduler: str = "rr"
    #: Persistence timeout in seconds, None when the service is not persistent.
    persistence: int | None = None
    #: Scheduler/service flags as ipvsadm spells them (e.g. "sh-port", "ops").
    flags: frozenset[str] = frozenset()
    destinations: tuple[Destination, ...] = ()

    def settings_equal(self, other: "VirtualService") -> bool:
        return (
            self.scheduler == other.scheduler
            and self.persistence == other.persistence
            and self.flags == other.flags
        )

    def destination_map(self) -> dict[DestKey, Destination]:
        return {d.key: d for d in self.destinations}

    def with_destinations(self, dests: Iterable[Destination]) -> "VirtualService":
        # Plain (address, port) tuples sort as DestKey does, without a DestKey per
        # real server and its slow generated comparison (every image update pays it).
        merged = {(d.address, d.port): d for d in dests}
        return VirtualService(
            key=self.key,
            scheduler=self.scheduler,
            persistence=self.persistence,
            flags=self.flags,
            destinations=tuple(merged[k] for k in sorted(merged)),
        )


@dataclass(frozen=True)
class Table:
    """A whole IPVS table: virtual services by key. Treat ``services`` as read-only."""

    services: Mapping[ServiceKey, VirtualService] = field(default_factory=dict)

    @staticmethod
    def of(services: Iterable[VirtualService]) -> "Table":
        return Table({s.key: s for s in services})

    def __len__(self) -> int:
        return len(self.services)

    def destination_count(self) -> int:
        return sum(len(s.destinations) for s in self.services.values())

    def sorted(self) -> list[VirtualService]:
        return [self.services[k] for k in sorted(self.services)]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Table):
            return NotImplemented
        return dict(self.services) == dict(other.services)

    __hash__ = None  # type: ignore[assignment]


class OpKind(str, enum.Enum):
    ADD_SERVICE = "add-service"
    EDIT_SERVICE = "edit-service"
    DELETE_SERVICE = "delete-service"
    ADD_DESTINATION = "add-destination"
    EDIT_DESTINATION = "edit-destination"
    DELETE_DESTINATION = "delete-destination"

    @property
    def is_destination(self) -> bool:
        return self in (OpKind.ADD_DESTINATION, OpKind.EDIT_DESTINATION, OpKind.DELETE_DESTINATION)


@dataclass(frozen=True)
class Operation:
    """One change to the kernel table.

    Service operations carry the desired settings (scheduler, persistence, flags);
    destination operations carry the desired real server (weight, forward). Deletes
    only need the keys.
    """

    kind: OpKind
    service: ServiceKey
    scheduler: str = "rr"
    persistence: int | None = None
    flags: frozenset[str] = frozenset()
    destination: Destination | None = None

    def __str__(self) -> str:
        text = f"{self.kind.value} {self.service}"
        if self.destination is not None:
            text += f" -> {self.destination.key}"
            if self.kind is not OpKind.DELETE_DESTINATION:
                text += f" weight={self.destination.weight} forward={self.destination.forward.value}"
        elif self.kind is not OpKind.DELETE_SERVICE:
            text += f" scheduler={self.scheduler}"
            if self.persistence is not None:
                text += f" persistence={self.persistence}"
            if self.flags:
                text += f" flags={','.join(sorted(self.flags))}"
        return text


@dataclass(frozen=True)
class OperationResult:
    """What a backend reports for one operation it could not apply."""

    operation: Operation
    error: str
