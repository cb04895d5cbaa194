"""Operation -> ``ipvsadm -R`` line: the write side of the ipvsadm backend.

Why a separate step: a line is checked against what ipvsadm would do with it
before it is sent. ipvsadm stops a whole ``-R`` run at a line it rejects itself,
and it silently stores some requests differently from what they ask (a routed
real server on another port, a netmask without persistence); such operations are
refused here with ValueError, so the diff never waits for a change it cannot see.
"""

from __future__ import annotations

import re
from typing import Sequence

from svcproxy.ipvs.rules import FLAG_RE, MAX_PERSISTENCE, MAX_WEIGHT, NAME_RE, NETMASK_PREFIX, OPS_FLAG, PE_PREFIX
from svcproxy.model import Forward, OpKind, Operation, Protocol, ServiceKey

__all__ = ["render", "render_line"]

_ADDR_RE = re.compile(r"[0-9A-Fa-f:.]+")

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
    if not NAME_RE.fullmatch(op.scheduler):
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
            if not NAME_RE.fullmatch(engine):
                raise ValueError(f"bad persistence engine flag {flag!r}")
            parts.append(f"--pe {engine}")
        elif flag == OPS_FLAG:
            parts.append("-o")
        elif FLAG_RE.fullmatch(flag):
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
