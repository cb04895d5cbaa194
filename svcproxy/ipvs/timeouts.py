"""IPVS connection timeouts (kube-proxy's --ipvs-tcp-timeout, -tcpfin-, -udp-).

The kernel keeps three timeouts per network namespace: established TCP, TCP after
FIN, and UDP. They are set with IPVS_CMD_SET_CONFIG (``ipvsadm --set TCP TCPFIN
UDP``), where 0 leaves the kernel's value as it is, which is also what 0 means for
kube-proxy's flags. A new Pod namespace starts from the kernel's defaults, so the
values are set in each replicated namespace as well as on the node.

This module is the pure part: the value, what to change given what the kernel
holds, and the netlink encoding and decoding. The backends send and read.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

#: From include/uapi/linux/ip_vs.h.
IPVS_CMD_SET_CONFIG = 12
IPVS_CMD_GET_CONFIG = 13
IPVS_CMD_ATTR_TIMEOUT_TCP = 4
IPVS_CMD_ATTR_TIMEOUT_TCP_FIN = 5
IPVS_CMD_ATTR_TIMEOUT_UDP = 6
_GENL_VERSION = 1

#: The kernel refuses a timeout above INT_MAX / HZ seconds; with HZ at most 1000
#: this bound is safe on every kernel (about 24 days).
MAX_SECONDS = 2147483

_ATTR = struct.Struct("=HHI")


@dataclass(frozen=True)
class Timeouts:
    """Seconds; 0: leave the kernel's value."""

    tcp: int = 0
    tcpfin: int = 0
    udp: int = 0

    def __post_init__(self) -> None:
        for name in ("tcp", "tcpfin", "udp"):
            value = getattr(self, name)
            if not 0 <= value <= MAX_SECONDS:
                raise ValueError(f"IPVS {name} timeout {value} s is out of range (0 to {MAX_SECONDS})")

    def __bool__(self) -> bool:
        return bool(self.tcp or self.tcpfin or self.udp)

    def describe(self) -> str:
        return " ".join(f"{name}={getattr(self, name) or 'unchanged'}" for name in ("tcp", "tcpfin", "udp"))


def changes(current: Timeouts, wanted: Timeouts) -> Timeouts | None:
    """What to send so that ``current`` takes the non-zero values of ``wanted``
    (None: nothing to do). The zeros in the answer leave the kernel's values."""
    diff = Timeouts(*(w if w and w != c else 0 for w, c in ((wanted.tcp, current.tcp),
                                                            (wanted.tcpfin, current.tcpfin),
                                                            (wanted.udp, current.udp))))
    return diff if diff else None


def set_config_body(t: Timeouts) -> bytes:
    """The generic-netlink body of IPVS_CMD_SET_CONFIG (only non-zero values sent)."""
    body = struct.pack("=BBH", IPVS_CMD_SET_CONFIG, _GENL_VERSION, 0)
    for atype, value in ((IPVS_CMD_ATTR_TIMEOUT_TCP, t.tcp), (IPVS_CMD_ATTR_TIMEOUT_TCP_FIN, t.tcpfin),
                         (IPVS_CMD_ATTR_TIMEOUT_UDP, t.udp)):
        if value:
            body += _ATTR.pack(8, atype, value)
    return body


GET_CONFIG_BODY = struct.pack("=BBH", IPVS_CMD_GET_CONFIG, _GENL_VERSION, 0)


def decode_config(payload: bytes) -> Timeouts:
    """A GET_CONFIG reply's payload (after the netlink header) -> Timeouts."""
    values = {IPVS_CMD_ATTR_TIMEOUT_TCP: 0, IPVS_CMD_ATTR_TIMEOUT_TCP_FIN: 0, IPVS_CMD_ATTR_TIMEOUT_UDP: 0}
    off = 4  # the genl header
    while off + 4 <= len(payload):
        length, atype = struct.unpack_from("=HH", payload, off)
        if length < 4 or off + length > len(payload):
            raise ValueError(f"bad attribute length {length} in an IPVS config reply")
        if atype & 0x3FFF in values and length >= 8:
            values[atype & 0x3FFF] = min(struct.unpack_from("=I", payload, off + 4)[0], MAX_SECONDS)
        off += (length + 3) & ~3
    return Timeouts(values[IPVS_CMD_ATTR_TIMEOUT_TCP], values[IPVS_CMD_ATTR_TIMEOUT_TCP_FIN],
                    values[IPVS_CMD_ATTR_TIMEOUT_UDP])


def parse_ipvsadm(text: str) -> Timeouts:
    """``ipvsadm -L --timeout``: "Timeout (tcp tcpfin udp): 900 120 300"."""
    for line in text.splitlines():
        if line.startswith("Timeout (tcp tcpfin udp):"):
            parts = line.split(":", 1)[1].split()
            if len(parts) == 3 and all(p.isdigit() for p in parts):
                return Timeouts(*(min(int(p), MAX_SECONDS) for p in parts))
    raise ValueError(f"unexpected ipvsadm --timeout output: {text.strip()[:200]!r}")


def ipvsadm_args(t: Timeouts) -> list[str]:
    """``ipvsadm --set TCP TCPFIN UDP`` (ipvsadm passes 0 on: the kernel keeps that value)."""
    return ["--set", str(t.tcp), str(t.tcpfin), str(t.udp)]
