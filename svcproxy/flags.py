"""Values of command-line flags: each type checks its text and says what is wrong.

argparse calls these with the text of one flag (or of one ``--config`` key, which
becomes a flag) and reports an ``ArgumentTypeError`` as "argument --FLAG: message",
so every bad value is one line naming the flag, before anything runs.
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import re
from typing import Sequence

from svcproxy.model import IPVS_SCHEDULERS, Family, canonical_ip


def split_csv(values: Sequence[str]) -> tuple[str, ...]:
    """``["a,b", " c"]`` -> ``("a", "b", "c")``: lists given as repeated or comma-separated flags."""
    return tuple(part.strip() for value in values for part in value.split(",") if part.strip())


def parse_bind(bind: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[V6]:PORT`` for IPv6; no host: 0.0.0.0) -> (host, port).
    Raises ValueError naming what is wrong."""
    host, sep, port_text = bind.rpartition(":")
    if not sep:
        raise ValueError(f"{bind!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"{bind!r}: write an IPv6 address in brackets, [ADDRESS]:PORT")
    host = host or "0.0.0.0"
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{bind!r}: {host!r} is not an IP address") from None
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{bind!r}: the port must be a number from 0 to 65535")
    return host, int(port_text)


def families(text: str) -> frozenset[Family]:
    names = {"ipv4": Family.IPV4, "4": Family.IPV4, "ipv6": Family.IPV6, "6": Family.IPV6}
    chosen = set()
    for part in text.split(","):
        part = part.strip().lower()
        if part not in names:
            raise argparse.ArgumentTypeError(f"unknown IP family {part!r} (use IPv4, IPv6 or IPv4,IPv6)")
        chosen.add(names[part])
    return frozenset(chosen)


#: Longest duration a flag takes (a week): waits past the platform's limit fail at run
#: time, and nothing svcproxy times is meant to wait longer.
MAX_SECONDS = 7 * 86400


def seconds(text: str) -> float:
    """A duration in seconds, ``30`` or ``30s``: 0 to a week."""
    try:
        value = float(text.removesuffix("s"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value < 0 or value > MAX_SECONDS:
        raise argparse.ArgumentTypeError(f"{text!r}: must be from 0 to {MAX_SECONDS} seconds")
    return value + 0.0  # -0.0 is 0


def positive_seconds(text: str) -> float:
    value = seconds(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be more than 0 seconds")
    return value


def watch_idle_seconds(text: str) -> float:
    """How long a watch may stay silent before it is resumed: at least a second, or a
    quiet cluster would have its watches re-opened over and over for nothing."""
    value = seconds(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be at least 1 second")
    return value


def ip(text: str) -> str:
    """An IP address, canonical; a scoped IPv6 address (``%eth0``) is not a node address."""
    try:
        if "%" in text:
            raise ValueError(text)
        return canonical_ip(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IP address") from None


def cidrs(text: str) -> str:
    """A comma-separated list of CIDRs (or bare addresses), checked; kept as given."""
    for part in split_csv([text]):
        try:
            ipaddress.ip_network(part, strict=False)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r} is not a CIDR (like 10.0.0.0/8 or fd00::/64)") from None
    return text


#: kube-proxy's --nodeport-addresses keyword: the node's primary IP of each family.
PRIMARY = "primary"


def nodeport_addresses(text: str) -> str:
    """CIDRs, or kube-proxy's keyword ``primary`` on its own (the node's primary IPs)."""
    parts = split_csv([text])
    if PRIMARY in parts:
        if set(parts) == {PRIMARY} and len(parts) > 1:
            raise argparse.ArgumentTypeError(f"{text!r}: {PRIMARY!r} is given {len(parts)} times "
                                             f"(give it once, on its own)")
        if parts != (PRIMARY,):
            raise argparse.ArgumentTypeError(f"{text!r}: {PRIMARY!r} cannot be combined with CIDRs "
                                             f"(give either {PRIMARY!r} or CIDRs)")
        return text
    try:
        return cidrs(text)
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"{exc}; or {PRIMARY!r} for the node's primary IPs") from None


def bind(text: str) -> str:
    try:
        parse_bind(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "\u00b5s": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_GO_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|\u00b5s|ms|s|m|h)")


def go_duration(text: str) -> float:
    """A duration as kube-proxy writes it (Go's ``900s``, ``15m``, ``1h30m``, ``0``),
    or a plain number of seconds; in seconds. Negative durations are refused."""
    body = text.strip()
    if body.startswith("-"):
        raise argparse.ArgumentTypeError(f"{text!r}: a duration must not be negative")
    if re.fullmatch(r"\d+(\.\d*)?", body):
        return float(body)
    if not body or not re.fullmatch(f"(?:{_GO_PART.pattern})+", body):
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (like 900s, 15m, 1h30m or 0)")
    return sum(float(n) * _GO_UNITS[u] for n, u in _GO_PART.findall(body))


def ipvs_timeout(text: str) -> int:
    """An IPVS timeout: a duration in whole seconds (fractions are dropped, as
    kube-proxy does); 0 leaves the kernel's value."""
    from svcproxy.ipvs.timeouts import MAX_SECONDS

    value = go_duration(text)
    if 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: IPVS timeouts are whole seconds; use 0 to keep the kernel's")
    if value > MAX_SECONDS:
        raise argparse.ArgumentTypeError(f"{text!r}: at most {MAX_SECONDS}s")
    return int(value)


def scheduler(text: str) -> str:
    """An IPVS scheduler the kernel has (rr, wlc, ...): checked here, before anything
    runs, rather than when the first table is translated."""
    if text not in IPVS_SCHEDULERS:
        known = ", ".join(sorted(IPVS_SCHEDULERS))
        raise argparse.ArgumentTypeError(f"unknown IPVS scheduler {text!r} (one of {known})")
    return text


def ifname(text: str) -> str:
    """A network interface name Linux accepts (its dev_valid_name): 1 to 15 bytes,
    not . or .., no '/', ':' or whitespace. A bad one would otherwise fail at every sync."""
    if not text or len(text.encode()) > 15:
        raise argparse.ArgumentTypeError(f"{text!r}: an interface name has 1 to 15 characters")
    if text in (".", "..") or any(c in "/:" or c.isspace() for c in text):
        raise argparse.ArgumentTypeError(f"{text!r} is not an interface name (no '/', ':' or spaces; not . or ..)")
    return text


_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def node_name(text: str) -> str:
    """A node name as kube-proxy and the kubelet read it (nodeutil.GetHostname):
    trimmed and lower-cased, so a host called Worker-1 is Node worker-1. It must then
    be a name a Node can have (a DNS subdomain), or it would match nothing."""
    name = text.strip().lower()
    if not name:
        raise argparse.ArgumentTypeError(f"{text!r}: a node name cannot be empty")
    if len(name) > 253 or not _DNS_SUBDOMAIN.fullmatch(name):
        raise argparse.ArgumentTypeError(f"{text!r} is not a node name (lower case letters, digits, '-' and '.', "
                                         "at most 253; no Node can have it)")
    return name


_LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?")


def label_value(text: str) -> str:
    """A value a Kubernetes label can have (at most 63 characters: letters, digits,
    '-', '_', '.', beginning and ending with a letter or digit); any other name would
    match no Service's label, so every labelled Service would be skipped in silence."""
    if len(text) > 63 or not _LABEL_VALUE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a label value (at most 63 letters, digits, '-', '_' "
                                         "or '.', beginning and ending with a letter or digit)")
    return text
