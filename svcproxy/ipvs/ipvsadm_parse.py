"""ipvsadm's text -> ``Table``: ``ipvsadm -Sn`` (save format) and ``ipvsadm -Ln`` (list).

Why both: ``-Sn`` is what restore lines look like, so it is also how tests and the
CLI write tables by hand; ``-Ln`` carries the same settings plus connection counts
in one snapshot, which graceful termination needs. Text that is not what ipvsadm
prints raises ``ParseError`` with the line number: a table read wrong would make
the diff undo real state.

Most lines of a big table are real servers, so both parsers match those with one
regular expression and build the ``Destination`` inline; every other line goes
through a tokenizer and small per-option handlers.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass, field
from typing import Callable

from svcproxy.ipvs.rules import FLAG_RE, MAX_PERSISTENCE, MAX_WEIGHT, NAME_RE, NETMASK_PREFIX, OPS_FLAG, PE_PREFIX
from svcproxy.model import Destination, Family, Forward, Protocol, ServiceKey, Table, VirtualService

__all__ = ["DEFAULT_PERSISTENCE", "DEFAULT_SCHEDULER", "ParseError", "parse_list", "parse_save"]

#: What ``-p`` without a value means to ipvsadm 1.31 (observed: ``-p`` -> ``-p 360``).
DEFAULT_PERSISTENCE = 360
#: ipvsadm's default scheduler when a line names none.
DEFAULT_SCHEDULER = "wlc"

_V4_DEFAULT_MASK = "255.255.255.255"
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


# --------------------------------------------------------------------------------------
# fields


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
    and ``ipaddress``, which is much slower, is only asked about the rest.
    ``cache`` is per parse call.
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


def _sched_flags(text: str, flags: set[str]) -> None:
    """Scheduler flags as ``-b`` and ``-Ln`` write them: comma-separated names."""
    for flag in text.split(","):
        if not FLAG_RE.fullmatch(flag):
            raise _Bad(f"bad scheduler flag {flag!r}")
        flags.add(flag)


def _engine_flag(name: str) -> str:
    if not NAME_RE.fullmatch(name):
        raise _Bad(f"bad persistence engine {name!r}")
    return PE_PREFIX + name


def _with_sorted(vs: VirtualService, dmap: dict[tuple[str, int], Destination]) -> VirtualService:
    """The service with its real servers in the model's order (by DestKey, i.e. by
    (address, port)); ipvsadm sorts them numerically, which is a different order."""
    if not dmap:
        return vs
    return VirtualService(vs.key, vs.scheduler, vs.persistence, vs.flags, tuple(dmap[k] for k in sorted(dmap)))


# --------------------------------------------------------------------------------------
# ipvsadm -Sn


@dataclass(slots=True)
class _Line:
    """What one ``-A``/``-a`` line says, option by option, before it is checked."""

    service_opt: str = ""
    service_value: str = ""
    ipv6_fwmark: bool = False
    scheduler: str | None = None
    persistence: int | None = None
    netmask: str | None = None
    flags: set[str] = field(default_factory=set)
    server: str | None = None
    forward: Forward | None = None
    weight: int | None = None


def _forward_switch(forward: Forward) -> Callable[[_Line], None]:
    def handle(line: _Line) -> None:
        if line.forward is not None:
            raise _Bad("two forwarding methods")
        line.forward = forward

    return handle


def _set_ipv6_fwmark(line: _Line) -> None:
    line.ipv6_fwmark = True


def _set_ops(line: _Line) -> None:
    line.flags.add(OPS_FLAG)


def _ignore(line: _Line) -> None:
    """A tunnel checksum mode: not in the model (see render)."""


#: Options that take no value.
_SWITCHES: dict[str, Callable[[_Line], None]] = {
    **{opt: _forward_switch(forward) for opt, forward in _FORWARD_OPTS.items()},
    "-6": _set_ipv6_fwmark,
    "-o": _set_ops,
    "--tun-csum": _ignore,
    "--tun-nocsum": _ignore,
    "--tun-remcsum": _ignore,
}


def _service_option(opt: str) -> Callable[[_Line, str], None]:
    def handle(line: _Line, value: str) -> None:
        if line.service_opt:
            raise _Bad("two virtual services")
        line.service_opt = opt
        line.service_value = value

    return handle


def _set_scheduler(line: _Line, value: str) -> None:
    if not NAME_RE.fullmatch(value):
        raise _Bad(f"bad scheduler {value!r}")
    line.scheduler = value


def _set_persistence(line: _Line, value: str) -> None:
    line.persistence = _uint(value, "persistence timeout", MAX_PERSISTENCE)
    if line.persistence == 0:
        raise _Bad("persistence timeout 0")


def _set_netmask(line: _Line, value: str) -> None:
    line.netmask = value  # checked once the service's family is known


def _set_sched_flags(line: _Line, value: str) -> None:
    _sched_flags(value, line.flags)


def _set_engine(line: _Line, value: str) -> None:
    line.flags.add(_engine_flag(value))


def _set_server(line: _Line, value: str) -> None:
    line.server = value


def _set_weight(line: _Line, value: str) -> None:
    line.weight = _uint(value, "weight", MAX_WEIGHT)


def _check_threshold(line: _Line, value: str) -> None:
    _uint(value, "connection threshold", 65535)  # not in the model


def _check_tunnel_type(line: _Line, value: str) -> None:
    if value not in ("ipip", "gue", "gre"):
        raise _Bad(f"bad tunnel type {value!r}")


def _check_tunnel_port(line: _Line, value: str) -> None:
    _uint(value, "tunnel port", 65535)


#: Options that take a value (the next token).
_OPTIONS: dict[str, Callable[[_Line, str], None]] = {
    **{opt: _service_option(opt) for opt in (*_PROTOCOL_OPTS, "-f")},
    "-s": _set_scheduler,
    "-p": _set_persistence,
    "-M": _set_netmask,
    "-b": _set_sched_flags,
    "--pe": _set_engine,
    "-r": _set_server,
    "-w": _set_weight,
    "-x": _check_threshold,
    "-y": _check_threshold,
    "--tun-type": _check_tunnel_type,
    "--tun-port": _check_tunnel_port,
}


def _read_options(tokens: list[str]) -> _Line:
    """The options after the command, each through its handler."""
    line = _Line()
    i, n = 1, len(tokens)
    while i < n:
        opt = _LONG_ALIASES.get(tokens[i], tokens[i])
        i += 1
        switch = _SWITCHES.get(opt)
        if switch is not None:
            switch(line)
            continue
        if opt == "-p" and (i >= n or not _UINT_RE.fullmatch(tokens[i])):
            line.persistence = DEFAULT_PERSISTENCE
            continue
        if i >= n:
            raise _Bad(f"{opt} needs a value")
        value = tokens[i]
        i += 1
        handler = _OPTIONS.get(opt)
        if handler is None:
            raise _Bad(f"unknown option {opt!r}")
        handler(line, value)
    return line


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
        """Any ``-A`` or ``-a`` line, tokenized."""
        if tokens[0] == "ipvsadm":
            del tokens[0]
            if not tokens:
                return
        command = _LONG_ALIASES.get(tokens[0], tokens[0])
        if command not in ("-A", "-a"):
            raise _Bad("not an -A/-a line (ipvsadm -Sn prints no other command)")
        line = _read_options(tokens)
        if not line.service_opt:
            raise _Bad("no virtual service")
        key = self.service_key(line.service_opt, line.service_value, line.ipv6_fwmark)
        if command == "-A":
            self.add_service(key, line)
        else:
            self.add_server(key, line)

    def add_service(self, key: ServiceKey, line: _Line) -> None:
        if line.server is not None or line.forward is not None or line.weight is not None:
            raise _Bad("real-server options on an -A line")
        if key in self.specs:
            raise _Bad(f"service {key} listed twice")
        flags = line.flags
        if line.netmask is not None:
            mask_flag = _netmask_flag(line.netmask, ipv6=key.family is Family.IPV6)
            if mask_flag is not None:
                flags.add(mask_flag)
        scheduler = line.scheduler or DEFAULT_SCHEDULER
        self.specs[key] = _ServiceSpec(key, scheduler, line.persistence, frozenset(flags))
        self.dests[key] = {}

    def add_server(self, key: ServiceKey, line: _Line) -> None:
        if line.scheduler is not None or line.persistence is not None or line.netmask is not None or line.flags:
            raise _Bad("service options on an -a line")
        server = line.server
        if server is None:
            raise _Bad("-a without -r")
        dests = self.dests.get(key)
        if dests is None:
            raise _Bad(f"real server for {key}, which has no -A line before it")
        addr, port = _split_host_optional_port(server, self.addr_cache)
        dkey = (addr, key.port if port is None else port)
        if dkey in dests:
            raise _Bad(f"real server {server} listed twice")
        weight = 1 if line.weight is None else line.weight
        dests[dkey] = Destination(dkey[0], dkey[1], weight, Forward.ROUTE if line.forward is None else line.forward)

    def table(self) -> Table:
        return Table(
            {
                key: _with_sorted(VirtualService(key, spec.scheduler, spec.persistence, spec.flags), self.dests[key])
                for key, spec in self.specs.items()
            }
        )


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


# --------------------------------------------------------------------------------------
# ipvsadm -Ln

_LIST_HEADER_CHECKS: tuple[Callable[[list[str]], bool], ...] = (
    lambda tokens: tokens[:3] == ["IP", "Virtual", "Server"],
    lambda tokens: tokens == ["Prot", "LocalAddress:Port", "Scheduler", "Flags"],
    lambda tokens: tokens == _LIST_DEST_HEADER,
)


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
    if i >= len(tokens) or not NAME_RE.fullmatch(tokens[i]):
        raise _Bad("no scheduler")
    scheduler = tokens[i]
    persistence, flags = _list_settings(tokens, i + 1, key)
    return VirtualService(key, scheduler, persistence, frozenset(flags))


def _list_settings(tokens: list[str], i: int, key: ServiceKey) -> tuple[int | None, set[str]]:
    """(persistence, flags) from what follows the scheduler on an ``-Ln`` service line."""
    persistence: int | None = None
    flags: set[str] = set()
    while i < len(tokens):
        word = tokens[i]
        i += 1
        if word.startswith("(") and word.endswith(")"):
            _sched_flags(word[1:-1], flags)
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
                flags.add(_engine_flag(value))
        else:
            raise _Bad(f"unexpected {word!r}")
    return persistence, flags


class _ListParser:
    """State for one ``parse_list`` call: the header seen so far, the services,
    and the real servers of the service being read (None before the first)."""

    def __init__(self) -> None:
        self.cache: dict[str, str] = {}
        self.headers = 0
        self.services: dict[ServiceKey, VirtualService] = {}
        self.dests: dict[ServiceKey, dict[tuple[str, int], Destination]] = {}
        self.dmap: dict[tuple[str, int], Destination] | None = None

    def header(self, line: str) -> None:
        """One of the three header lines (blank lines before them are skipped)."""
        tokens = line.split()
        if not tokens:
            return
        if not _LIST_HEADER_CHECKS[self.headers](tokens):
            raise _Bad("not the header of plain `ipvsadm -Ln` output")
        self.headers += 1

    def line(self, tokens: list[str]) -> None:
        """A service line, or a real-server line the fast path did not take."""
        if tokens[0] == "->":
            self.server(tokens)
            return
        vs = _list_service(tokens, self.cache)
        if vs.key in self.services:
            raise _Bad(f"service {vs.key} listed twice")
        self.services[vs.key] = vs
        self.dmap = self.dests[vs.key] = {}

    def server(self, tokens: list[str]) -> None:
        dmap = self.dmap
        if dmap is None:
            raise _Bad("real server before any service")
        if len(tokens) != 6:
            raise _Bad("real-server line needs 5 columns")
        addr, port = _split_hostport(tokens[1], self.cache)
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

    def table(self) -> Table:
        return Table({key: _with_sorted(vs, self.dests[key]) for key, vs in self.services.items()})


def parse_list(text: str) -> Table:
    """Parse plain ``ipvsadm -Ln`` output into a Table, connection counts included.

    Carries every setting ``-Sn`` does (the fixtures check that both parse to the same
    table), so one ``-Ln`` is a complete, single snapshot. Other listings (--stats,
    --rate, --thresholds, --tun-info, without -n) have other columns: ParseError.
    """
    lines = text.splitlines()
    parser = _ListParser()
    fast = _LIST_DEST_RE.fullmatch
    forwards = _FORWARD_NAMES
    cache = parser.cache
    for lineno, line in enumerate(lines, 1):
        try:
            if parser.headers < 3:
                parser.header(line)
                continue
            m = fast(line)
            if m is None:
                tokens = line.split()
                if tokens:
                    parser.line(tokens)
                continue
            # The common real-server line, inlined: this loop is most of a big read.
            dmap = parser.dmap
            if dmap is None:
                raise _Bad("real server before any service")
            addr = m[1] or _canonical(m[2], cache)
            port = int(m[3])
            weight = int(m[5])
            if port > 65535 or weight > MAX_WEIGHT:
                raise _Bad("port or weight out of range")
            if (addr, port) in dmap:
                raise _Bad(f"real server {addr}:{port} listed twice")
            dmap[(addr, port)] = Destination(addr, port, weight, forwards[m[4]], int(m[6]), int(m[7]))
        except _Bad as exc:
            raise ParseError(lineno, line, str(exc)) from None
    if parser.headers < 3:
        raise ParseError(len(lines), lines[-1] if lines else "", "missing `ipvsadm -Ln` header")
    return parser.table()
