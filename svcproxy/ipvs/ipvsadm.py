"""The ipvsadm backend: read the table with ``ipvsadm -Sn``/``-Ln``, write it with ``-R``.

Why ipvsadm at all: one ``ipvsadm -R`` applies tens of thousands of operations in a
few seconds (netlink one call at a time is ~30x slower from Python), and its text
formats are stable, so this backend is the fast and simple one.

What ``ipvsadm -R`` does wrong, and how ``apply`` copes (all observed in the VM,
kernel 6.1.0-56-amd64, ipvsadm 1:1.31-1+b1; see tests/data/ipvsadm/README.md):

* It is not atomic. A line the kernel rejects prints one message on stderr
  ("Service already exists", "No such destination", ...) and the next line runs.
* A line ipvsadm itself rejects (bad scheduler flag, timeout out of range, ...)
  prints one message and ends the whole run with status 2; later lines never run.
  An unknown option after a command is the exception: it prints
  "OPT: unknown option", skips that line and goes on.
* The exit status is that of the last line only.

So a clean run (status 0, empty stderr) means every line was applied. Otherwise the
table is read back and each operation's effect is checked; operations whose effect
is missing are applied again, this time each preceded by a marker line
(``-L --svcproxy-op-N``, which ipvsadm answers with "--svcproxy-op-N: unknown
option" and nothing else), so every stderr line can be tied to exactly one
operation and a run that stops early is resumed after the line that stopped it.
Markers are not used on the first run because they make ``-R`` 2-4x slower.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import subprocess
from dataclasses import dataclass
from typing import Callable, Sequence

from svcproxy.ipvs.backend import BackendError
from svcproxy.model import (
    DestKey,
    Destination,
    Family,
    Forward,
    OpKind,
    Operation,
    OperationResult,
    Protocol,
    ServiceKey,
    Table,
    VirtualService,
)

__all__ = [
    "IpvsadmBackend",
    "ParseError",
    "Runner",
    "parse_list",
    "parse_save",
    "render",
    "render_line",
]

#: How the backend runs commands: ``subprocess.run`` or a test double with its shape.
Runner = Callable[..., "subprocess.CompletedProcess[str]"]

#: ipvsadm's own limits (ipvsadm.c, confirmed in the VM: -p 2678401 and -w -1 are
#: rejected before reaching the kernel and stop ``-R``).
MAX_PERSISTENCE = 86400 * 31
MAX_WEIGHT = 2**31 - 1
#: What ``-p`` without a value means to ipvsadm 1.31 (observed: ``-p`` -> ``-p 360``).
DEFAULT_PERSISTENCE = 360
#: ipvsadm's default scheduler and forwarding method when a line names none.
DEFAULT_SCHEDULER = "wlc"

#: Flags that are not scheduler flags but other service settings, kept in
#: ``VirtualService.flags`` because the model has no fields for them.
OPS_FLAG = "ops"
NETMASK_PREFIX = "netmask="
PE_PREFIX = "pe="

_V4_DEFAULT_MASK = "255.255.255.255"
_MARKER_PREFIX = "--svcproxy-op-"
_MARKER_RE = re.compile(r"^--svcproxy-op-(\d+): unknown option$")
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_FLAG_RE = re.compile(r"[a-z0-9][a-z0-9-]*")
_ADDR_RE = re.compile(r"[0-9A-Fa-f:.]+")
_UINT_RE = re.compile(r"\d+")
_V4 = r"(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_V4_RE = re.compile(_V4)
#: The real-server line exactly as ``ipvsadm -Sn`` prints it for -m/-g and plain -i,
#: parsed without tokenising (most lines of a big table are these).
_SAVE_DEST_RE = re.compile(
    rf"-a (-t|-u|--sctp-service|-f) (\S+)( -6)? -r (?:({_V4})|\[([0-9a-f:.]+)\]):(\d{{1,5}}) -([mgi]) -w (\d{{1,10}})"
    r"(?: --tun-type ipip)?"
)
_LIST_DEST_RE = re.compile(
    rf"\s*-> (?:({_V4})|\[([0-9a-f:.]+)\]):(\d{{1,5}})\s+(Masq|Route|Tunnel)"
    r"\s+(\d{1,10})\s+(\d{1,20})\s+(\d{1,20})\s*"
)
_FAST_FORWARD = {"m": Forward.MASQ, "g": Forward.ROUTE, "i": Forward.TUNNEL}


class ParseError(ValueError):
    """Text that is not what ipvsadm prints; carries the 1-based line number."""

    def __init__(self, lineno: int, line: str, reason: str) -> None:
        super().__init__(f"line {lineno}: {reason}: {line.strip()!r}")
        self.lineno = lineno
        self.line = line
        self.reason = reason


# --------------------------------------------------------------------------------------
# parsing


class _Bad(Exception):
    """Internal: a reason a line is bad; turned into ParseError with the line number."""


_PROTOCOL_OPTS: dict[str, Protocol] = {"-t": Protocol.TCP, "-u": Protocol.UDP, "--sctp-service": Protocol.SCTP}
_FORWARD_OPTS: dict[str, Forward] = {
    "-m": Forward.MASQ,
    "--masquerading": Forward.MASQ,
    "-g": Forward.ROUTE,
    "--gatewaying": Forward.ROUTE,
    "-i": Forward.TUNNEL,
    "--ipip": Forward.TUNNEL,
}
_LONG_ALIASES: dict[str, str] = {
    "--add-service": "-A",
    "--add-server": "-a",
    "--tcp-service": "-t",
    "--udp-service": "-u",
    "--fwmark-service": "-f",
    "--ipv6": "-6",
    "--scheduler": "-s",
    "--persistent": "-p",
    "--netmask": "-M",
    "--sched-flags": "-b",
    "--ops": "-o",
    "--real-server": "-r",
    "--weight": "-w",
    "--u-threshold": "-x",
    "--l-threshold": "-y",
}
_FORWARD_NAMES: dict[str, Forward] = {"Masq": Forward.MASQ, "Route": Forward.ROUTE, "Tunnel": Forward.TUNNEL}
_LIST_PROTOCOLS: dict[str, Protocol] = {"TCP": Protocol.TCP, "UDP": Protocol.UDP, "SCTP": Protocol.SCTP}
_LIST_DEST_HEADER = ["->", "RemoteAddress:Port", "Forward", "Weight", "ActiveConn", "InActConn"]


def _uint(text: str, what: str, high: int) -> int:
    if not _UINT_RE.fullmatch(text):
        raise _Bad(f"bad {what} {text!r}")
    value = int(text)
    if value > high:
        raise _Bad(f"{what} {value} out of range")
    return value


def _canonical(text: str, cache: dict[str, str]) -> str:
    """Canonical address text (the model's ``ipaddress`` compressed form), fast.

    ipvsadm -n prints addresses with inet_ntop. For IPv4 that is already canonical
    (the regex admits nothing else). For IPv6, inet_ntop agrees with ``ipaddress``
    (lowercase, first longest run of 2+ zero groups as "::") except where it writes a
    dotted quad ("::ffff:10.0.0.1", Python's "::ffff:a00:1"): so a string that
    inet_ntop would print unchanged and that has no dot is canonical as it stands,
    at about a tenth of the cost of ``ipaddress``. ``cache`` is per parse call.
    """
    found = cache.get(text)
    if found is not None:
        return found
    if _V4_RE.fullmatch(text):
        result = text
    else:
        try:
            packed = socket.inet_pton(socket.AF_INET6, text)
        except OSError:
            raise _Bad(f"bad address {text!r}") from None
        result = socket.inet_ntop(socket.AF_INET6, packed)
        if "." in result or result != text:
            result = ipaddress.IPv6Address(packed).compressed
    cache[text] = result
    return result


def _split_hostport(text: str, cache: dict[str, str]) -> tuple[str, int]:
    """"10.0.0.1:80" or "[fd00::1]:80" -> (canonical address, port)."""
    if text.startswith("["):
        end = text.find("]:")
        if end < 0:
            raise _Bad(f"bad address:port {text!r}")
        host, port = text[1:end], text[end + 2 :]
        if "." in host and ":" not in host:
            raise _Bad(f"IPv4 address in brackets {text!r}")
        addr = _canonical(host, cache)
        if ":" not in addr:
            raise _Bad(f"bad address:port {text!r}")
    else:
        host, sep, port = text.rpartition(":")
        if not sep or ":" in host:
            raise _Bad(f"bad address:port {text!r}")
        addr = _canonical(host, cache)
    return addr, _uint(port, "port", 65535)


def _split_host_optional_port(text: str, cache: dict[str, str]) -> tuple[str, int | None]:
    """A real-server address as ``-R`` accepts it: the port may be left out."""
    if text.startswith("[") or text.count(":") == 1:
        addr, port = _split_hostport(text, cache)
        return addr, port
    if ":" in text:
        raise _Bad(f"IPv6 real server without brackets {text!r}")
    return _canonical(text, cache), None


def _netmask_flag(mask: str, ipv6: bool) -> str | None:
    """The flag for a persistence netmask, None when it is the family's default."""
    if ipv6:
        bits = _uint(mask, "IPv6 netmask", 128)
        if bits == 0:
            raise _Bad("IPv6 netmask 0")
        return None if bits == 128 else f"{NETMASK_PREFIX}{bits}"
    if not _V4_RE.fullmatch(mask):
        raise _Bad(f"bad netmask {mask!r}")
    return None if mask == _V4_DEFAULT_MASK else f"{NETMASK_PREFIX}{mask}"


@dataclass
class _ServiceSpec:
    """What an ``-A`` line says about a service, before its servers are known."""

    key: ServiceKey
    scheduler: str
    persistence: int | None
    flags: frozenset[str]


class _SaveParser:
    """State for one ``parse_save`` call (no state survives the call)."""

    def __init__(self) -> None:
        self.addr_cache: dict[str, str] = {}
        self.key_cache: dict[tuple[str, str, bool], ServiceKey] = {}
        self.specs: dict[ServiceKey, _ServiceSpec] = {}
        self.dests: dict[ServiceKey, dict[tuple[str, int], Destination]] = {}

    def service_key(self, opt: str, value: str, ipv6_fwmark: bool) -> ServiceKey:
        cache_key = (opt, value, ipv6_fwmark)
        key = self.key_cache.get(cache_key)
        if key is not None:
            return key
        if opt == "-f":
            mark = _uint(value, "fwmark", 2**32 - 1)
            if mark == 0:
                raise _Bad("fwmark 0")
            key = ServiceKey(Protocol.TCP, "::" if ipv6_fwmark else "0.0.0.0", 0, fwmark=mark)
        else:
            if ipv6_fwmark:
                raise _Bad("-6 is only for fwmark services")
            addr, port = _split_hostport(value, self.addr_cache)
            key = ServiceKey(_PROTOCOL_OPTS[opt], addr, port)
        self.key_cache[cache_key] = key
        return key

    def dests_of(self, svc: tuple[str | None, ...]) -> dict[tuple[str, int], Destination]:
        """The real servers so far of the service a fast-path line names."""
        opt, value, six = svc
        assert opt is not None and value is not None
        key = self.service_key(opt, value, six is not None)
        dests = self.dests.get(key)
        if dests is None:
            raise _Bad(f"real server for {key}, which has no -A line before it")
        return dests

    def line(self, tokens: list[str]) -> None:
        if tokens[0] == "ipvsadm":
            del tokens[0]
            if not tokens:
                return
        command = _LONG_ALIASES.get(tokens[0], tokens[0])
        if command not in ("-A", "-a"):
            raise _Bad("not an -A/-a line (ipvsadm -Sn prints no other command)")
        svc_opt = svc_value = ""
        ipv6_fwmark = False
        scheduler: str | None = None
        persistence: int | None = None
        netmask: str | None = None
        flags: set[str] = set()
        server: str | None = None
        forward: Forward | None = None
        weight: int | None = None
        i, n = 1, len(tokens)
        while i < n:
            opt = _LONG_ALIASES.get(tokens[i], tokens[i])
            i += 1
            if opt in _FORWARD_OPTS:
                if forward is not None:
                    raise _Bad("two forwarding methods")
                forward = _FORWARD_OPTS[opt]
                continue
            if opt == "-6":
                ipv6_fwmark = True
                continue
            if opt == "-o":
                flags.add(OPS_FLAG)
                continue
            if opt in ("--tun-csum", "--tun-nocsum", "--tun-remcsum"):
                continue  # tunnel checksum mode: not in the model (see render)
            if opt == "-p" and (i >= n or not _UINT_RE.fullmatch(tokens[i])):
                persistence = DEFAULT_PERSISTENCE
                continue
            if i >= n:
                raise _Bad(f"{opt} needs a value")
            value = tokens[i]
            i += 1
            if opt in _PROTOCOL_OPTS or opt == "-f":
                if svc_opt:
                    raise _Bad("two virtual services")
                svc_opt = opt
                svc_value = value
            elif opt == "-s":
                if not _NAME_RE.fullmatch(value):
                    raise _Bad(f"bad scheduler {value!r}")
                scheduler = value
            elif opt == "-p":
                persistence = _uint(value, "persistence timeout", MAX_PERSISTENCE)
                if persistence == 0:
                    raise _Bad("persistence timeout 0")
            elif opt == "-M":
                netmask = value
            elif opt == "-b":
                for flag in value.split(","):
                    if not _FLAG_RE.fullmatch(flag):
                        raise _Bad(f"bad scheduler flag {flag!r}")
                    flags.add(flag)
            elif opt == "--pe":
                if not _NAME_RE.fullmatch(value):
                    raise _Bad(f"bad persistence engine {value!r}")
                flags.add(PE_PREFIX + value)
            elif opt == "-r":
                server = value
            elif opt == "-w":
                weight = _uint(value, "weight", MAX_WEIGHT)
            elif opt in ("-x", "-y"):
                _uint(value, "connection threshold", 65535)  # not in the model
            elif opt == "--tun-type":
                if value not in ("ipip", "gue", "gre"):
                    raise _Bad(f"bad tunnel type {value!r}")
            elif opt == "--tun-port":
                _uint(value, "tunnel port", 65535)
            else:
                raise _Bad(f"unknown option {opt!r}")
        if not svc_opt:
            raise _Bad("no virtual service")
        key = self.service_key(svc_opt, svc_value, ipv6_fwmark)
        if command == "-A":
            if server is not None or forward is not None or weight is not None:
                raise _Bad("real-server options on an -A line")
            if key in self.specs:
                raise _Bad(f"service {key} listed twice")
            if netmask is not None:
                mask_flag = _netmask_flag(netmask, ipv6=key.family is Family.IPV6)
                if mask_flag is not None:
                    flags.add(mask_flag)
            self.specs[key] = _ServiceSpec(key, scheduler or DEFAULT_SCHEDULER, persistence, frozenset(flags))
            self.dests[key] = {}
            return
        if scheduler is not None or persistence is not None or netmask is not None or flags:
            raise _Bad("service options on an -a line")
        if server is None:
            raise _Bad("-a without -r")
        dests = self.dests.get(key)
        if dests is None:
            raise _Bad(f"real server for {key}, which has no -A line before it")
        addr, port = _split_host_optional_port(server, self.addr_cache)
        dkey = (addr, key.port if port is None else port)
        if dkey in dests:
            raise _Bad(f"real server {server} listed twice")
        dests[dkey] = Destination(
            dkey[0], dkey[1], 1 if weight is None else weight, Forward.ROUTE if forward is None else forward
        )

    def table(self) -> Table:
        return Table(
            {
                key: _with_sorted(VirtualService(key, spec.scheduler, spec.persistence, spec.flags), self.dests[key])
                for key, spec in self.specs.items()
            }
        )


def _with_sorted(vs: VirtualService, dmap: dict[tuple[str, int], Destination]) -> VirtualService:
    """The service with its real servers in the model's order (by DestKey, i.e. by
    (address, port)); ipvsadm sorts them numerically, which is a different order."""
    if not dmap:
        return vs
    return VirtualService(vs.key, vs.scheduler, vs.persistence, vs.flags, tuple(dmap[k] for k in sorted(dmap)))


def parse_save(text: str) -> Table:
    """Parse ``ipvsadm -Sn`` output (and, generally, ``-A``/``-a`` restore lines the way
    ``ipvsadm -R`` would read them, defaults included) into a Table.

    Settings the model has no field for are kept as flags so they round-trip and the
    diff sees them: ``-o`` -> "ops", ``-M`` (non-default) -> "netmask=255.255.255.0" or
    "netmask=64", ``--pe sip`` -> "pe=sip". Connection thresholds (-x/-y) and tunnel
    options (--tun-*) are checked but dropped: the model cannot hold them.
    """
    parser = _SaveParser()
    fast = _SAVE_DEST_RE.fullmatch
    forwards = _FAST_FORWARD
    max_weight = MAX_WEIGHT
    addr_cache = parser.addr_cache
    last_svc: tuple[str | None, ...] = ()
    dests: dict[tuple[str, int], Destination] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        try:
            m = fast(line)
            if m is None:
                tokens = line.split()
                if tokens:
                    parser.line(tokens)
                    last_svc = ()
                continue
            # The common real-server line, inlined: this loop is most of a big read.
            svc = m.group(1, 2, 3)
            if svc != last_svc:
                dests = parser.dests_of(svc)
                last_svc = svc
            v4, v6, port_text, fwd, weight_text = m.group(4, 5, 6, 7, 8)
            addr = v4 or _canonical(v6, addr_cache)
            port = int(port_text)
            weight = int(weight_text)
            if port > 65535 or weight > max_weight:
                raise _Bad("port or weight out of range")
            dkey = (addr, port)
            if dkey in dests:
                raise _Bad(f"real server {addr}:{port} listed twice")
            dests[dkey] = Destination(addr, port, weight, forwards[fwd])
        except _Bad as exc:
            raise ParseError(lineno, line, str(exc)) from None
    return parser.table()


def _list_service(tokens: list[str], cache: dict[str, str]) -> VirtualService:
    """One service line of ``ipvsadm -Ln``, e.g.
    ``UDP  [2001:db8::1]:53 sh (sh-port) persistent 100 mask 64`` or ``FWM  2 IPv6 rr ops``."""
    proto = tokens[0]
    i = 2
    if proto == "FWM":
        mark = _uint(tokens[1], "fwmark", 2**32 - 1)
        ipv6 = len(tokens) > 2 and tokens[2] == "IPv6"
        if ipv6:
            i = 3
        key = ServiceKey(Protocol.TCP, "::" if ipv6 else "0.0.0.0", 0, fwmark=mark)
    else:
        protocol = _LIST_PROTOCOLS.get(proto)
        if protocol is None:
            raise _Bad(f"unknown protocol {proto!r}")
        addr, port = _split_hostport(tokens[1], cache)
        key = ServiceKey(protocol, addr, port)
    if i >= len(tokens) or not _NAME_RE.fullmatch(tokens[i]):
        raise _Bad("no scheduler")
    scheduler = tokens[i]
    i += 1
    persistence: int | None = None
    flags: set[str] = set()
    while i < len(tokens):
        word = tokens[i]
        i += 1
        if word.startswith("(") and word.endswith(")"):
            for flag in word[1:-1].split(","):
                if not _FLAG_RE.fullmatch(flag):
                    raise _Bad(f"bad scheduler flag {flag!r}")
                flags.add(flag)
        elif word == "ops":
            flags.add(OPS_FLAG)
        elif word in ("persistent", "mask", "pe") and i < len(tokens):
            value = tokens[i]
            i += 1
            if word == "persistent":
                persistence = _uint(value, "persistence timeout", MAX_PERSISTENCE)
            elif word == "mask":
                mask_flag = _netmask_flag(value, ipv6=key.family is Family.IPV6)
                if mask_flag is not None:
                    flags.add(mask_flag)
            else:
                if not _NAME_RE.fullmatch(value):
                    raise _Bad(f"bad persistence engine {value!r}")
                flags.add(PE_PREFIX + value)
        else:
            raise _Bad(f"unexpected {word!r}")
    return VirtualService(key, scheduler, persistence, frozenset(flags))


def parse_list(text: str) -> Table:
    """Parse plain ``ipvsadm -Ln`` output into a Table, connection counts included.

    Carries every setting ``-Sn`` does (the fixtures check that both parse to the same
    table), so one ``-Ln`` is a complete, single snapshot. Other listings (--stats,
    --rate, --thresholds, --tun-info, without -n) have other columns: ParseError.
    """
    lines = text.splitlines()
    cache: dict[str, str] = {}
    services: dict[ServiceKey, VirtualService] = {}
    dests: dict[ServiceKey, dict[tuple[str, int], Destination]] = {}
    current: ServiceKey | None = None
    dmap: dict[tuple[str, int], Destination] = {}
    seen_header = 0
    fast = _LIST_DEST_RE.fullmatch
    forwards = _FORWARD_NAMES
    for lineno, line in enumerate(lines, 1):
        try:
            if seen_header < 3:
                tokens = line.split()
                if not tokens:
                    continue
                expected = (
                    tokens[:3] == ["IP", "Virtual", "Server"],
                    tokens == ["Prot", "LocalAddress:Port", "Scheduler", "Flags"],
                    tokens == _LIST_DEST_HEADER,
                )[seen_header]
                if not expected:
                    raise _Bad("not the header of plain `ipvsadm -Ln` output")
                seen_header += 1
                continue
            m = fast(line)
            if m is not None:
                if current is None:
                    raise _Bad("real server before any service")
                addr = m[1] or _canonical(m[2], cache)
                port = int(m[3])
                weight = int(m[5])
                if port > 65535 or weight > MAX_WEIGHT:
                    raise _Bad("port or weight out of range")
                if (addr, port) in dmap:
                    raise _Bad(f"real server {addr}:{port} listed twice")
                dmap[(addr, port)] = Destination(addr, port, weight, forwards[m[4]], int(m[6]), int(m[7]))
                continue
            tokens = line.split()
            if not tokens:
                continue
            if tokens[0] == "->":
                if current is None:
                    raise _Bad("real server before any service")
                if len(tokens) != 6:
                    raise _Bad("real-server line needs 5 columns")
                addr, port = _split_hostport(tokens[1], cache)
                forward = _FORWARD_NAMES.get(tokens[2])
                if forward is None:
                    raise _Bad(f"unknown forwarding method {tokens[2]!r}")
                if (addr, port) in dmap:
                    raise _Bad(f"real server {tokens[1]} listed twice")
                dmap[(addr, port)] = Destination(
                    addr,
                    port,
                    _uint(tokens[3], "weight", MAX_WEIGHT),
                    forward,
                    active_conns=_uint(tokens[4], "ActiveConn", 2**64),
                    inactive_conns=_uint(tokens[5], "InActConn", 2**64),
                )
                continue
            vs = _list_service(tokens, cache)
            if vs.key in services:
                raise _Bad(f"service {vs.key} listed twice")
            services[vs.key] = vs
            dmap = dests[vs.key] = {}
            current = vs.key
        except _Bad as exc:
            raise ParseError(lineno, line, str(exc)) from None
    if seen_header < 3:
        raise ParseError(len(lines), lines[-1] if lines else "", "missing `ipvsadm -Ln` header")
    return Table({key: _with_sorted(vs, dests[key]) for key, vs in services.items()})


# --------------------------------------------------------------------------------------
# rendering

_SERVICE_COMMANDS = {OpKind.ADD_SERVICE: "-A", OpKind.EDIT_SERVICE: "-E", OpKind.DELETE_SERVICE: "-D"}
_DEST_COMMANDS = {OpKind.ADD_DESTINATION: "-a", OpKind.EDIT_DESTINATION: "-e", OpKind.DELETE_DESTINATION: "-d"}
_FORWARD_SWITCH = {Forward.MASQ: "-m", Forward.ROUTE: "-g", Forward.TUNNEL: "-i"}
_PROTOCOL_SWITCH = {Protocol.TCP: "-t", Protocol.UDP: "-u", Protocol.SCTP: "--sctp-service"}


def _address(addr: str) -> str:
    if not _ADDR_RE.fullmatch(addr):
        raise ValueError(f"not an IP address: {addr!r}")
    return f"[{addr}]" if ":" in addr else addr


def _port(port: int) -> int:
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} out of range")
    return port


def _service_arg(key: ServiceKey) -> str:
    if key.fwmark:
        if not 0 < key.fwmark < 2**32:
            raise ValueError(f"fwmark {key.fwmark} out of range")
        return f"-f {key.fwmark} -6" if ":" in key.address else f"-f {key.fwmark}"
    return f"{_PROTOCOL_SWITCH[key.protocol]} {_address(key.address)}:{_port(key.port)}"


def _service_options(op: Operation) -> str:
    """Every setting, always: ``-E`` resets whatever it does not mention (observed:
    an -E without -p drops persistence, without -M the netmask, without -b the
    flags, without -o one-packet scheduling, without --pe the engine)."""
    if not _NAME_RE.fullmatch(op.scheduler):
        raise ValueError(f"bad scheduler name {op.scheduler!r}")
    parts = [f"-s {op.scheduler}"]
    if op.persistence is not None:
        if not 1 <= op.persistence <= MAX_PERSISTENCE:
            raise ValueError(f"persistence {op.persistence} out of range 1..{MAX_PERSISTENCE}")
        parts.append(f"-p {op.persistence}")
    sched_flags: list[str] = []
    for flag in sorted(op.flags):
        if flag.startswith(NETMASK_PREFIX):
            mask = flag[len(NETMASK_PREFIX) :]
            if not _ADDR_RE.fullmatch(mask):
                raise ValueError(f"bad netmask flag {flag!r}")
            if op.persistence is None:
                # ipvsadm takes it, but neither -Sn nor -Ln ever shows a netmask of a
                # service that is not persistent: the diff would never see it applied.
                raise ValueError(f"{flag} without persistence")
            parts.append(f"-M {mask}")
        elif flag.startswith(PE_PREFIX):
            engine = flag[len(PE_PREFIX) :]
            if not _NAME_RE.fullmatch(engine):
                raise ValueError(f"bad persistence engine flag {flag!r}")
            parts.append(f"--pe {engine}")
        elif flag == OPS_FLAG:
            parts.append("-o")
        elif _FLAG_RE.fullmatch(flag):
            sched_flags.append(flag)
        else:
            raise ValueError(f"bad flag {flag!r}")
    if sched_flags:
        parts.append("-b " + ",".join(sched_flags))
    return " ".join(parts)


def render_line(op: Operation) -> str:
    """The one ``ipvsadm -R`` line for an operation; ValueError if it cannot be one."""
    service = _service_arg(op.service)
    if op.kind in _SERVICE_COMMANDS:
        command = _SERVICE_COMMANDS[op.kind]
        if op.kind is OpKind.DELETE_SERVICE:
            return f"{command} {service}"  # -D takes no options (observed: -s stops -R)
        return f"{command} {service} {_service_options(op)}"
    dest = op.destination
    if dest is None:
        raise ValueError(f"{op.kind.value} without a destination")
    server = f"-r {_address(dest.address)}:{_port(dest.port)}"
    command = _DEST_COMMANDS[op.kind]
    if op.kind is OpKind.DELETE_DESTINATION:
        return f"{command} {service} {server}"  # -d takes no -m/-w (observed: stops -R)
    if not 0 <= dest.weight <= MAX_WEIGHT:
        raise ValueError(f"weight {dest.weight} out of range 0..{MAX_WEIGHT}")
    if dest.forward is not Forward.MASQ and not op.service.fwmark and dest.port != op.service.port:
        # ipvsadm silently stores such a server on the service's port (observed), so
        # the change would never show up as applied.
        raise ValueError(
            f"{dest.forward.value} real server {dest.key} must use the service port {op.service.port}"
        )
    # -e without a forwarding switch means -g (observed), so edits always carry it.
    return f"{command} {service} {server} {_FORWARD_SWITCH[dest.forward]} -w {dest.weight}"


def render(ops: Sequence[Operation]) -> list[str]:
    """One ``ipvsadm -R`` line per operation, in order."""
    return [render_line(op) for op in ops]


# --------------------------------------------------------------------------------------
# checking an operation's effect


class _Effects:
    """Checks operations against a table read back from the kernel."""

    def __init__(self, table: Table) -> None:
        self.table = table
        self._dests: dict[ServiceKey, dict[DestKey, Destination]] = {}

    def dest(self, key: ServiceKey, dkey: DestKey) -> Destination | None:
        dmap = self._dests.get(key)
        if dmap is None:
            vs = self.table.services.get(key)
            dmap = self._dests[key] = vs.destination_map() if vs is not None else {}
        return dmap.get(dkey)

    def in_effect(self, op: Operation) -> bool:
        """Whether the table shows what the operation was meant to do."""
        vs = self.table.services.get(op.service)
        if op.kind is OpKind.DELETE_SERVICE:
            return vs is None
        if op.kind in (OpKind.ADD_SERVICE, OpKind.EDIT_SERVICE):
            return (
                vs is not None
                and vs.scheduler == op.scheduler
                and vs.persistence == op.persistence
                and vs.flags == op.flags
            )
        if op.destination is None:
            return False
        have = self.dest(op.service, op.destination.key)
        if op.kind is OpKind.DELETE_DESTINATION:
            return have is None
        return have is not None and have.settings_equal(op.destination)

    def describe(self, op: Operation) -> str:
        """What the kernel has where the operation pointed, for error messages."""
        vs = self.table.services.get(op.service)
        if vs is None:
            return f"the kernel has no service {op.service}"
        if op.destination is None:
            persistence = "" if vs.persistence is None else f" persistence={vs.persistence}"
            flags = f" flags={','.join(sorted(vs.flags))}" if vs.flags else ""
            return f"the kernel has scheduler={vs.scheduler}{persistence}{flags}"
        have = self.dest(op.service, op.destination.key)
        if have is None:
            return f"the kernel has no real server {op.destination.key}"
        return f"the kernel has weight={have.weight} forward={have.forward.value}"


def _batches(ops: Sequence[Operation]) -> list[list[Operation]]:
    """Split a plan so that, within a batch, no operation can undo what an earlier one
    did. Then the table read after a batch shows each operation's own effect, which is
    what failure attribution relies on. Plans from ``diff()`` are always one batch."""
    batches: list[list[Operation]] = []
    current: list[Operation] = []
    service_ops: set[ServiceKey] = set()
    dest_writes: set[ServiceKey] = set()
    dest_ops: set[tuple[ServiceKey, str, int]] = set()
    for op in ops:
        key = op.service
        if op.kind.is_destination:
            dkey = (key, op.destination.address, op.destination.port) if op.destination else (key, "", -1)
            conflict = dkey in dest_ops
        else:
            conflict = key in service_ops or (
                op.kind in (OpKind.ADD_SERVICE, OpKind.DELETE_SERVICE) and key in dest_writes
            )
        if conflict:
            batches.append(current)
            current, service_ops, dest_writes, dest_ops = [], set(), set(), set()
        current.append(op)
        if op.kind.is_destination:
            dest_ops.add(dkey)
            if op.kind is not OpKind.DELETE_DESTINATION:
                dest_writes.add(key)
        else:
            service_ops.add(key)
    if current:
        batches.append(current)
    return batches


# --------------------------------------------------------------------------------------
# the backend


class IpvsadmBackend:
    """Backend that drives the ``ipvsadm`` binary (optionally inside a network namespace)."""

    def __init__(
        self,
        binary: str = "ipvsadm",
        netns: str | None = None,
        runner: Runner = subprocess.run,
        *,
        timeout: float | None = 600.0,
        counts: bool = False,
    ) -> None:
        self.binary = binary
        #: Default for read(): the agent wants connection counts (graceful termination).
        self.counts = counts
        self.netns = netns
        self.runner = runner
        self.timeout = timeout

    def _argv(self, *args: str) -> list[str]:
        # `ip netns exec` takes only names; nsenter takes any namespace file
        # (/var/run/netns/NAME, /proc/PID/ns/net).
        base = [self.binary, *args]
        return ["nsenter", f"--net={self.netns}", *base] if self.netns else base

    def _run(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        argv = self._argv(*args)
        try:
            proc = self.runner(
                argv, input=stdin, capture_output=True, text=True, check=False, timeout=self.timeout
            )
        except FileNotFoundError as exc:
            raise BackendError(f"cannot run {argv[0]}: not installed ({exc})") from exc
        except PermissionError as exc:
            raise BackendError(f"cannot run {argv[0]}: permission denied ({exc})") from exc
        except subprocess.TimeoutExpired as exc:
            raise BackendError(f"{' '.join(argv[:4])} did not finish in {self.timeout} s") from exc
        self._check_environment(argv, proc)
        return proc

    def _check_environment(self, argv: list[str], proc: subprocess.CompletedProcess[str]) -> None:
        """Failures of the environment rather than of an operation: no IPVS in the
        kernel (ipvsadm's "Can't initialize ipvs: ..."), a bad namespace, no root."""
        err = proc.stderr or ""
        if "Can't initialize ipvs" in err:
            raise BackendError(
                f"IPVS is not available ({' '.join(argv)}): {' '.join(err.split())}"
            )
        if self.netns and err.startswith("nsenter:"):
            raise BackendError(f"nsenter --net={self.netns} failed: {err.strip()}")

    def read(self, counts: bool | None = None) -> Table:
        """The kernel's table. With ``counts`` (None: this backend's default), from
        ``-Ln`` (which also carries every setting) so connection counts come from
        the same snapshot; without, from ``-Sn``."""
        if counts is None:
            counts = self.counts
        proc = self._run("-Ln" if counts else "-Sn")
        if proc.returncode != 0:
            raise BackendError(
                f"{' '.join(self._argv('-Ln' if counts else '-Sn'))} failed "
                f"(exit status {proc.returncode}): {proc.stderr.strip()}"
            )
        try:
            return parse_list(proc.stdout) if counts else parse_save(proc.stdout)
        except ParseError as exc:
            raise BackendError(f"cannot parse ipvsadm output: {exc}") from exc

    def apply(self, ops: Sequence[Operation]) -> list[OperationResult]:
        """Apply in order; return the operations that did not take effect, each with
        the message ipvsadm printed for it. One bad operation never stops the others."""
        failed: dict[int, OperationResult] = {}
        runnable: list[tuple[Operation, str]] = []
        for op in ops:
            try:
                runnable.append((op, render_line(op)))
            except ValueError as exc:
                failed[id(op)] = OperationResult(op, f"cannot express as an ipvsadm command: {exc}")
        lines = {id(op): line for op, line in runnable}
        for batch in _batches([op for op, _ in runnable]):
            for result in self._apply_batch(batch, lines):
                failed[id(result.operation)] = result
        return [failed[id(op)] for op in ops if id(op) in failed]

    def _apply_batch(self, batch: list[Operation], lines: dict[int, str]) -> list[OperationResult]:
        script = "".join(lines[id(op)] + "\n" for op in batch)
        proc = self._run("-R", stdin=script)
        if proc.returncode == 0 and not proc.stderr.strip():
            return []
        # Not clean: some lines failed, or -R stopped early. Find out which by what
        # the kernel now has, then apply those again one marker-separated line each.
        effects = _Effects(self.read())
        missing = [op for op in batch if not effects.in_effect(op)]
        if not missing:
            return []
        errors = self._apply_marked(missing, lines)
        accepted = [op for op in missing if id(op) not in errors]
        if accepted:
            effects = _Effects(self.read())
            for op in accepted:
                if not effects.in_effect(op):
                    errors[id(op)] = (
                        "ipvsadm accepted it without an error, but it is not in the kernel table"
                        f" afterwards: {effects.describe(op)}"
                    )
        return [OperationResult(op, errors[id(op)]) for op in missing if id(op) in errors]

    def _apply_marked(self, ops: list[Operation], lines: dict[int, str]) -> dict[int, str]:
        """Apply with a marker before each line; return error text by id(op).

        Each marker is a ``-L --svcproxy-op-N`` line: ipvsadm prints
        "--svcproxy-op-N: unknown option" for it and goes on (observed), so stderr
        reads marker, the errors of operation N, marker N+1, ... If ``-R`` stops
        early (a line ipvsadm itself rejects), the rest is applied in another run.
        """
        errors: dict[int, str] = {}
        todo = ops
        while todo:
            script = "".join(f"-L {_MARKER_PREFIX}{i}\n{lines[id(op)]}\n" for i, op in enumerate(todo))
            proc = self._run("-R", stdin=script)
            messages: dict[int, list[str]] = {}
            last = -1
            for raw in proc.stderr.splitlines():
                text = raw.strip()
                if not text:
                    continue
                match = _MARKER_RE.match(text)
                if match and int(match.group(1)) == last + 1:
                    last += 1
                elif last >= 0:
                    messages.setdefault(last, []).append(text)
            if last < 0:
                raise BackendError(
                    "ipvsadm -R did not process the marker lines it is known to accept"
                    f" (exit status {proc.returncode}): {proc.stderr.strip()[:500]!r}"
                )
            for i, lines_for_op in messages.items():
                errors[id(todo[i])] = "; ".join(lines_for_op)
            stopped = last < len(todo) - 1 or proc.returncode not in (0, 255)
            if stopped and last not in messages:
                # ipvsadm ended right after operation `last` started without saying why.
                errors[id(todo[last])] = f"ipvsadm -R stopped on this line (exit status {proc.returncode})"
            elif last == len(todo) - 1 and proc.returncode != 0 and last not in messages:
                errors[id(todo[last])] = f"ipvsadm -R exit status {proc.returncode} on this line"
            todo = todo[last + 1 :]
        return errors

