"""Every virtual service's real servers from /proc/net/ip_vs, in one read.

Why: over netlink, real servers come one GET_DEST dump per virtual service, and a
dump costs a ``send`` and two ``recv`` calls (a socket runs one dump at a time),
so a large table spends much of its read on system calls before any decoding.
The kernel's seq_file lists every service with its real servers (address, port,
forwarding method, weight, active and inactive connections: everything a
``Destination`` holds) in one file, read a page per ``read`` call, far fewer
calls for the same table. What the file leaves out (scheduler
flags, persistence engine, IPv6 netmasks) is in the GET_SERVICE dump, so the
netlink backend joins the two by service (``label``).

The format (ip_vs_info_seq_show, unchanged since Linux 2.6.28)::

    IP Virtual Server version 1.2.1 (size=4096)
    Prot LocalAddress:Port Scheduler Flags
      -> RemoteAddress:Port Forward Weight ActiveConn InActConn
    TCP  0A600001:0050 rr
      -> 0A640001:1F90      Masq    1      0          0
    UDP  [fd00:0000:...:000a]:0035 rr
    FWM  00000007 wlc persistent 300 FFFFFFFF

Addresses and ports are hexadecimal in network order; IPv6 addresses are written
out in full. Anything else raises ``DecodeError``: the caller then reads over
netlink alone, so an unexpected file costs speed, never correctness.
"""

from __future__ import annotations

import socket
from typing import BinaryIO, Callable

from svcproxy.ipvs.nldecode import DecodeError, address_text, make_destination
from svcproxy.model import Destination, Forward, ServiceKey

__all__ = ["PATH", "label", "parse", "read"]

_compiled_parse: Callable[..., dict[tuple[str, str], list[Destination]] | None] | None
try:
    from svcproxy.ipvs._nlfast import proc_servers as _compiled_parse
except ImportError:  # not built: Python only (nlencode.COMPILED says so too)
    _compiled_parse = None

#: The calling thread's network namespace (/proc/net follows the thread group
#: leader's, which is not the namespace a netns-joining helper thread is in).
PATH = "/proc/thread-self/net/ip_vs"

_HEADER = ("Prot LocalAddress:Port Scheduler Flags", "  -> RemoteAddress:Port Forward Weight ActiveConn InActConn")
#: ip_vs_fwd_name(): LOCALNODE is "Local", anything not tunnel or route is "Masq"
#: (the netlink decoder maps the same numbers the same way).
_FORWARD_OF_NAME = {"Masq": Forward.MASQ, "Local": Forward.MASQ, "Tunnel": Forward.TUNNEL, "Route": Forward.ROUTE}
_FORWARD_PAIRS = tuple(_FORWARD_OF_NAME.items())
_READ_SIZE = 1 << 20


def read(file: BinaryIO) -> str:
    """The whole file. Reads ask for 1 MiB, but the kernel's seq_file returns about
    a page per call (and restarts its walk of the service table each time), so the
    size only saves Python's own buffering."""
    chunks: list[bytes] = []
    while True:
        chunk = file.read(_READ_SIZE)
        if not chunk:
            return b"".join(chunks).decode("ascii", "replace")
        chunks.append(chunk)


def label(key: ServiceKey) -> tuple[str, str]:
    """The first two words of ``key``'s line in the file (protocol and address).

    Not unique: the file gives no family for firewall marks, so an IPv4 and an
    IPv6 service of the same mark share a label (the caller must not join then)."""
    if key.fwmark:
        return "FWM", f"{key.fwmark:08X}"
    if ":" in key.address:
        words = socket.inet_pton(socket.AF_INET6, key.address).hex()
        full = ":".join(words[i : i + 4] for i in range(0, 32, 4))
        return key.protocol.value, f"[{full}]:{key.port:04X}"
    return key.protocol.value, f"{socket.inet_pton(socket.AF_INET, key.address).hex().upper()}:{key.port:04X}"


def parse(text: str, *, compiled: bool = True) -> dict[tuple[str, str], list[Destination]]:
    """Real servers by service label, in the kernel's order.

    The usual file is parsed by the compiled parser (svcproxy/ipvs/_nlfast.c),
    which makes real servers as ``make_destination`` does; anything it does not
    take (and ``compiled=False``) is parsed here, the reference."""
    lines = text.split("\n", 3)
    if len(lines) < 3 or not lines[0].startswith("IP Virtual Server version ") or tuple(lines[1:3]) != _HEADER:
        raise DecodeError("/proc/net/ip_vs does not start with the expected header")
    if compiled and _compiled_parse is not None and make_destination is not Destination:
        found = _compiled_parse(text, Destination, _FORWARD_PAIRS, _address)
        if found is not None:
            return found
    lines = text.split("\n")
    services: dict[tuple[str, str], list[Destination]] = {}
    current: list[Destination] | None = None
    # A Pod is the real server of several services (ClusterIP, NodePorts, ...):
    # convert each address and port text once.
    names: dict[str, str] = {}
    ports: dict[str, int] = {}
    forwards = _FORWARD_OF_NAME
    make = make_destination
    ntop, af_inet, fromhex = socket.inet_ntop, socket.AF_INET, bytes.fromhex
    try:
        for number, line in enumerate(lines[3:], 4):
            words = line.split()
            if not words:
                continue
            if words[0] == "->":
                if current is None or len(words) != 6:
                    raise DecodeError(f"line {number}: unexpected real server line {line!r}")
                _, address_port, forward_text, weight, active, inactive = words
                address_text, _, port_text = address_port.rpartition(":")
                address = names.get(address_text)
                if address is None:
                    address = names[address_text] = (
                        ntop(af_inet, fromhex(address_text)) if len(address_text) == 8 else _address(address_text)
                    )
                port = ports.get(port_text)
                if port is None:
                    if len(port_text) != 4:
                        raise DecodeError(f"line {number}: bad port in {line!r}")
                    port = ports[port_text] = int(port_text, 16)
                forward = forwards.get(forward_text)
                if forward is None:
                    raise DecodeError(f"line {number}: unknown forwarding method in {line!r}")
                current.append(make(address, port, int(weight), forward, int(active), int(inactive)))
            else:
                if len(words) < 3:
                    raise DecodeError(f"line {number}: unexpected service line {line!r}")
                key = (words[0], words[1])
                if key in services:
                    # Possible only if the table changed between two reads of the file.
                    raise DecodeError(f"line {number}: service {' '.join(key)} listed twice")
                current = services[key] = []
    except (ValueError, OSError) as exc:
        if isinstance(exc, DecodeError):
            raise
        raise DecodeError(f"/proc/net/ip_vs: {exc}") from None
    return services


def _address(text: str) -> str:
    """Address text as the model writes it, from the file's hexadecimal form."""
    if text.startswith("[") and text.endswith("]"):
        # The netlink decoder's text, the model's (::ffff:a00:1, not ::ffff:10.0.0.1).
        return address_text(socket.AF_INET6, socket.inet_pton(socket.AF_INET6, text[1:-1]))
    raise DecodeError(f"bad address {text!r}")
