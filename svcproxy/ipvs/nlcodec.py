"""The IPVS generic-netlink wire format, encoded and decoded with ``struct`` alone.

Why our own codec: pyroute2's message classes are general and slow (measured: 88x
slower than this to encode, which at 100,000 operations is the difference between
0.1 s and 9 s on the host, and minutes under emulation). IPVS messages are few and
almost fixed-layout, so a handful of precompiled ``struct.Struct`` objects and
byte templates do the whole job. Nothing here does I/O; ``netlink.py`` owns sockets.

What the kernel expects (net/netfilter/ipvs/ip_vs_ctl.c, checked against 6.1):

* Every command carries a nested ``IPVS_CMD_ATTR_SERVICE``: AF plus either FWMARK or
  PROTOCOL + ADDR (16 bytes, IPv4 in the first 4) + PORT (network order).
  NEW/SET_SERVICE also need SCHED_NAME, FLAGS ({flags, mask}), TIMEOUT and NETMASK;
  PE_NAME is optional and, when absent on SET, clears the engine.
* Destination commands add a nested ``IPVS_CMD_ATTR_DEST``: ADDR + PORT, and for
  NEW/SET also FWD_METHOD, WEIGHT, U_THRESH, L_THRESH. ADDR_FAMILY (kernel 3.18+)
  is always sent so mixed-family tunnel servers work.
* Netmask: for IPv4 the mask's bytes in network order (default 255.255.255.255);
  for IPv6 a prefix length 1..128 as a plain u32 (128 by default; 0 is EINVAL).

Names of settings follow the ipvsadm backend exactly (``svcproxy.ipvs.ipvsadm``):
scheduler flags are named by scheduler the way ``ipvsadm -Sn`` prints them
("sh-fallback"/"sh-port" for sh, "mh-*" for mh, "flag-N" otherwise, "flag-3" for
all), one-packet scheduling is "ops", a non-default persistence netmask is
"netmask=255.255.255.0" or "netmask=64" (only shown for persistent services, as
ipvsadm does), a persistence engine is "pe=sip". So both backends read the same
kernel table into equal ``Table`` values. Requests ipvsadm refuses before they reach
the kernel are refused here too, with ipvsadm's words, so the backends agree on
what is valid: the plan means the same thing whichever backend runs it.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import re
import socket
import struct
from typing import Any, Callable, Iterator, NamedTuple, Sequence

from svcproxy.model import (
    Destination,
    Forward,
    OpKind,
    Operation,
    Protocol,
    ServiceKey,
    VirtualService,
)

__all__ = [
    "DecodeError",
    "EncodeError",
    "Encoder",
    "Message",
    "decode_dest",
    "decode_dest_datagram",
    "decode_error",
    "decode_family_id",
    "address_text",
    "decode_service",
    "DecodedService",
    "get_dests_request",
    "describe_error",
    "family_request",
    "frame",
    "walk",
]

# --------------------------------------------------------------------------------------
# constants (include/uapi/linux/netlink.h, genetlink.h, ip_vs.h)

NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_ACK = 0x4
NLM_F_DUMP = 0x300
#: In an NLMSG_ERROR: extended-ack TLVs follow the echoed request header.
NLM_F_ACK_TLVS = 0x200
#: In an NLMSG_ERROR: the echoed request is only its header (NETLINK_CAP_ACK).
NLM_F_CAPPED = 0x100
NLMSGERR_ATTR_MSG = 1

GENL_ID_CTRL = 0x10
CTRL_CMD_GETFAMILY = 3
CTRL_ATTR_FAMILY_ID = 1
CTRL_ATTR_FAMILY_NAME = 2

IPVS_GENL_NAME = "IPVS"
IPVS_GENL_VERSION = 1

IPVS_CMD_NEW_SERVICE = 1
IPVS_CMD_SET_SERVICE = 2
IPVS_CMD_DEL_SERVICE = 3
IPVS_CMD_GET_SERVICE = 4
IPVS_CMD_NEW_DEST = 5
IPVS_CMD_SET_DEST = 6
IPVS_CMD_DEL_DEST = 7
IPVS_CMD_GET_DEST = 8

IPVS_CMD_ATTR_SERVICE = 1
IPVS_CMD_ATTR_DEST = 2

IPVS_SVC_ATTR_AF = 1
IPVS_SVC_ATTR_PROTOCOL = 2
IPVS_SVC_ATTR_ADDR = 3
IPVS_SVC_ATTR_PORT = 4
IPVS_SVC_ATTR_FWMARK = 5
IPVS_SVC_ATTR_SCHED_NAME = 6
IPVS_SVC_ATTR_FLAGS = 7
IPVS_SVC_ATTR_TIMEOUT = 8
IPVS_SVC_ATTR_NETMASK = 9
IPVS_SVC_ATTR_STATS = 10
IPVS_SVC_ATTR_PE_NAME = 11

IPVS_DEST_ATTR_ADDR = 1
IPVS_DEST_ATTR_PORT = 2
IPVS_DEST_ATTR_FWD_METHOD = 3
IPVS_DEST_ATTR_WEIGHT = 4
IPVS_DEST_ATTR_U_THRESH = 5
IPVS_DEST_ATTR_L_THRESH = 6
IPVS_DEST_ATTR_ACTIVE_CONNS = 7
IPVS_DEST_ATTR_INACT_CONNS = 8
IPVS_DEST_ATTR_PERSIST_CONNS = 9
IPVS_DEST_ATTR_STATS = 10
IPVS_DEST_ATTR_ADDR_FAMILY = 11
IPVS_DEST_ATTR_STATS64 = 12
IPVS_DEST_ATTR_TUN_TYPE = 13
IPVS_DEST_ATTR_TUN_PORT = 14
IPVS_DEST_ATTR_TUN_FLAGS = 15

IP_VS_SVC_F_PERSISTENT = 0x1
IP_VS_SVC_F_HASHED = 0x2
IP_VS_SVC_F_ONEPACKET = 0x4
IP_VS_SVC_F_SCHED1 = 0x8
IP_VS_SVC_F_SCHED2 = 0x10
IP_VS_SVC_F_SCHED3 = 0x20

IP_VS_CONN_F_MASQ = 0
IP_VS_CONN_F_LOCALNODE = 1
IP_VS_CONN_F_TUNNEL = 2
IP_VS_CONN_F_DROUTE = 3
IP_VS_CONN_F_FWD_MASK = 0x7

IP_VS_SCHEDNAME_MAXLEN = 16
IP_VS_PENAME_MAXLEN = 16

#: ipvsadm's own limits, the same as the ipvsadm backend's (see svcproxy/ipvs/ipvsadm.py).
MAX_PERSISTENCE = 86400 * 31
MAX_WEIGHT = 2**31 - 1

OPS_FLAG = "ops"
NETMASK_PREFIX = "netmask="
PE_PREFIX = "pe="

# Members looked up once: OpKind.X is a class attribute lookup at every use.
_ADD_SVC, _EDIT_SVC, _UDP = OpKind.ADD_SERVICE, OpKind.EDIT_SERVICE, Protocol.UDP
_PROTO_NUMBER = {Protocol.TCP: socket.IPPROTO_TCP, Protocol.UDP: socket.IPPROTO_UDP, Protocol.SCTP: 132}
_PROTO_OF_NUMBER = {number: proto for proto, number in _PROTO_NUMBER.items()}
_FWD_NUMBER = {Forward.MASQ: IP_VS_CONN_F_MASQ, Forward.TUNNEL: IP_VS_CONN_F_TUNNEL, Forward.ROUTE: IP_VS_CONN_F_DROUTE}
#: LOCALNODE is what kernels before 2.6.37 reported for a masq server with a local
#: address; ipvsadm -Sn prints it as -m too.
_FWD_OF_NUMBER = {
    IP_VS_CONN_F_MASQ: Forward.MASQ,
    IP_VS_CONN_F_LOCALNODE: Forward.MASQ,
    IP_VS_CONN_F_TUNNEL: Forward.TUNNEL,
    IP_VS_CONN_F_DROUTE: Forward.ROUTE,
}

#: Scheduler flag names by bit, as ipvsadm 1.31 prints them for each scheduler.
_SCHED_FLAG_NAMES: dict[str, tuple[str, str, str]] = {
    "sh": ("sh-fallback", "sh-port", "flag-3"),
    "mh": ("mh-fallback", "mh-port", "flag-3"),
}
_GENERIC_FLAG_NAMES = ("flag-1", "flag-2", "flag-3")
_SCHED_BITS = (IP_VS_SVC_F_SCHED1, IP_VS_SVC_F_SCHED2, IP_VS_SVC_F_SCHED3)
#: What ipvsadm accepts after -b, and the scheduler a name is tied to (None: any).
_FLAG_BITS: dict[str, tuple[int, str | None]] = {
    "flag-1": (IP_VS_SVC_F_SCHED1, None),
    "flag-2": (IP_VS_SVC_F_SCHED2, None),
    "flag-3": (IP_VS_SVC_F_SCHED3, None),
    "sh-fallback": (IP_VS_SVC_F_SCHED1, "sh"),
    "sh-port": (IP_VS_SVC_F_SCHED2, "sh"),
    "mh-fallback": (IP_VS_SVC_F_SCHED1, "mh"),
    "mh-port": (IP_VS_SVC_F_SCHED2, "mh"),
}

_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_V4_DEFAULT_MASK = b"\xff\xff\xff\xff"
_V6_DEFAULT_PLEN = 128
_AF_INET = int(socket.AF_INET)
_AF_INET6 = int(socket.AF_INET6)

# --------------------------------------------------------------------------------------
# low-level pieces

NLMSG_HDR = struct.Struct("=IHHII")  # length, type, flags, seq, port id
_NLA_HDR = struct.Struct("=HH")
_U16_ATTR = struct.Struct("=HHH2x")
_U32_ATTR = struct.Struct("=HHI")
_GENL_HDR = struct.Struct("=BBH")
_ERR = struct.Struct("=i")
_U32 = struct.Struct("=I")


class EncodeError(ValueError):
    """An operation that cannot be expressed as a valid IPVS request."""


class DecodeError(ValueError):
    """Bytes from the kernel that are not what this codec understands."""


_compiled_encode: Callable[..., tuple[int, int]] | None
try:
    from svcproxy.ipvs._nlfast import encode as _compiled_encode
except ImportError:  # not built (no C compiler where it was installed): Python only
    _compiled_encode = None

#: Whether the compiled encoder loop is in use (the CLI warns when not).
COMPILED = _compiled_encode is not None


def _nla(atype: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return _NLA_HDR.pack(length, atype) + payload + bytes(-length & 3)


def _nest(atype: int, payload: bytes) -> bytes:
    return _NLA_HDR.pack(4 + len(payload), atype) + payload


def _hdr_word(length: int, atype: int) -> int:
    """An nlattr header read as one native u32 (for comparing layouts in one go)."""
    value: int = struct.unpack("=I", _NLA_HDR.pack(length, atype))[0]
    return value


def _genl(cmd: int) -> bytes:
    return _GENL_HDR.pack(cmd, IPVS_GENL_VERSION, 0)


_GENL = {cmd: _genl(cmd) for cmd in range(1, 9)}
#: Body of the GET_SERVICE dump request (the kernel reads no attributes from it).
GET_SERVICE_BODY = _GENL[IPVS_CMD_GET_SERVICE]


def frame(family: int, flags: int, seq: int, body: bytes) -> bytes:
    """One netlink message: header plus a generic-netlink body (port id 0: the kernel)."""
    return NLMSG_HDR.pack(16 + len(body), family, flags, seq, 0) + body


def family_request() -> bytes:
    """Body of CTRL_CMD_GETFAMILY for "IPVS" (send to GENL_ID_CTRL)."""
    return _GENL_HDR.pack(CTRL_CMD_GETFAMILY, 1, 0) + _nla(CTRL_ATTR_FAMILY_NAME, IPVS_GENL_NAME.encode() + b"\0")


# --------------------------------------------------------------------------------------
# encoding


def _packed_address(address: str) -> tuple[int, bytes]:
    """(address family, the address's bytes): 16, or 4 for IPv4, which every
    layout's "16s" pads to the 16 IPVS wants."""
    try:
        if ":" in address:
            return _AF_INET6, socket.inet_pton(_AF_INET6, address)
        return _AF_INET, socket.inet_pton(_AF_INET, address)
    except (OSError, ValueError):  # ValueError: an embedded NUL
        raise EncodeError(f"not an IP address: {address!r}") from None


#: The destination nest of NEW/SET_DEST: ADDR, PORT, FWD_METHOD, WEIGHT, U_THRESH,
#: L_THRESH, ADDR_FAMILY. Constant parts are prebuilt byte strings, so one pack call
#: with eight arguments makes the whole nest (the hot path: most operations are these).
_DEST_FULL = struct.Struct("=8s16s4s2s2x8s4sI24s")
_DEST_FULL_HEAD = _NLA_HDR.pack(_DEST_FULL.size, IPVS_CMD_ATTR_DEST) + _NLA_HDR.pack(20, IPVS_DEST_ATTR_ADDR)
_PORT_HDR = _NLA_HDR.pack(6, IPVS_DEST_ATTR_PORT)
_FWD_ATTR = {fwd: _U32_ATTR.pack(8, IPVS_DEST_ATTR_FWD_METHOD, number) for fwd, number in _FWD_NUMBER.items()}
_WEIGHT_HDR = _NLA_HDR.pack(8, IPVS_DEST_ATTR_WEIGHT)
_DEST_FULL_TAIL = {
    af: _U32_ATTR.pack(8, IPVS_DEST_ATTR_U_THRESH, 0)
    + _U32_ATTR.pack(8, IPVS_DEST_ATTR_L_THRESH, 0)
    + _U16_ATTR.pack(6, IPVS_DEST_ATTR_ADDR_FAMILY, af)
    for af in (_AF_INET, _AF_INET6)
}
#: The destination nest of DEL_DEST: ADDR, PORT, ADDR_FAMILY.
_DEST_KEY = struct.Struct("=8s16s4s2s2x8s")
_DEST_KEY_HEAD = _NLA_HDR.pack(_DEST_KEY.size, IPVS_CMD_ATTR_DEST) + _NLA_HDR.pack(20, IPVS_DEST_ATTR_ADDR)
_AF_ATTR = {af: _U16_ATTR.pack(6, IPVS_DEST_ATTR_ADDR_FAMILY, af) for af in (_AF_INET, _AF_INET6)}


class _ServiceIdent(NamedTuple):
    """A service's identifying attributes, encoded once per service and reused
    (a NamedTuple: a plan makes 10,000 of them, a frozen dataclass costs 4x more)."""

    family: int  # AF_INET / AF_INET6
    attrs: bytes  # AF + FWMARK or AF + PROTOCOL + ADDR + PORT, without the nest header
    nest: bytes  # the same inside an IPVS_CMD_ATTR_SERVICE nest


class Encoder:
    """Encodes operations into generic-netlink bodies (genl header + attributes).

    Holds per-instance caches (identity attributes by service key), so make one per
    batch and drop it: there is no module-level state.
    """

    def __init__(self, *, compiled: bool = True) -> None:
        #: The compiled hot loop (svcproxy/ipvs/_nlfast.c) where it is built and wanted;
        #: this module's Python path is the reference it is tested against.
        self._compiled = _compiled_encode if compiled else None
        self._idents: dict[ServiceKey, _ServiceIdent] = {}
        #: Service settings attributes by everything they depend on: most services
        #: share a handful of settings, and building them is most of a service's cost.
        self._settings: dict[tuple[object, ...], bytes] = {}
        # Plans list a service's operations together: skip even the dict lookup
        # (a ServiceKey hash costs half a microsecond) while the key repeats.
        self._last: tuple[ServiceKey | None, _ServiceIdent | None] = (None, None)

    def ident(self, key: ServiceKey) -> _ServiceIdent:
        last_key, last_ident = self._last
        if key is last_key and last_ident is not None:
            return last_ident
        found = self._idents.get(key)
        if found is None:
            found = self._idents[key] = _make_ident(key)
        self._last = (key, found)
        return found

    def get_dests(self, key: ServiceKey) -> bytes:
        """Body of the GET_DEST dump request for one service."""
        return _GENL[IPVS_CMD_GET_DEST] + self.ident(key).nest

    def messages(
        self, ops: Sequence[Operation], family: int, flags: int, first_seq: int
    ) -> tuple[list[bytes], list[int] | None, dict[int, str]]:
        """Complete netlink messages for ``ops``, numbered from ``first_seq``.

        Returns the messages, the index in ``ops`` of each (None when every
        operation could be encoded, the usual case), and the refusals by index.
        Headers are packed here with the bodies, and real-server operations (most
        of any large plan) take an inlined path: at 100,000 operations every
        per-operation step is visible, tenfold under emulation.
        """
        out: list[bytes] = []
        append = out.append
        pack = NLMSG_HDR.pack
        refused: dict[int, str] = {}
        # Sequence numbers are u32. A batch that wraps them (once in 4 billion
        # messages) is numbered from 0 and renumbered at the end: no mask per message.
        seq = first_seq & 0xFFFFFFFF
        wraps = seq + len(ops) > 0x100000000
        if wraps:
            seq = 0
        add, edit = OpKind.ADD_DESTINATION, OpKind.EDIT_DESTINATION
        new_dest, set_dest, dest_head = _GENL[IPVS_CMD_NEW_DEST], _GENL[IPVS_CMD_SET_DEST], _DEST_FULL_HEAD
        layouts: dict[int, tuple[bytes, Callable[..., bytes], Callable[..., bytes]]] = {}
        # A NAT server's PORT + FWD_METHOD + WEIGHT header, by port: a plan has few
        # distinct ports, and the lookup replaces a range check and to_bytes().
        masq_runs: dict[int, bytes] = {}
        parts = _dest_parts
        masq, tail_v4, max_weight = Forward.MASQ, _DEST_FULL_TAIL[_AF_INET], MAX_WEIGHT
        af_inet, pton = _AF_INET, socket.inet_pton
        # Per service (set when its first destination operation is seen):
        last_key: ServiceKey | None = None
        svc_family = 0
        inline_ok = False  # an IPv4 service, whose NAT servers may take the inline path
        lead = new_prefix = set_prefix = b""  # see _dest_message_layout
        pack_v4 = pack_any = pack
        op_list = ops if type(ops) is list else list(ops)
        add_svc, edit_svc, settings_of = _ADD_SVC, _EDIT_SVC, self._service_settings
        compiled, context = self._compiled, self._compiled_context(family, flags)
        # NEW/SET_SERVICE messages by (NEW?, identity size, settings size): header
        # start, genl header + nest header, and one pack for the whole message.
        svc_layouts: dict[tuple[bool, int, int], tuple[bytes, bytes, Callable[..., bytes]]] = {}
        i, count = 0, len(op_list)
        while i < count:
            op = op_list[i]
            kind = op.kind
            # The usual operations compiled, up to the first other one, which this
            # loop takes (the first service of each settings, a delete, a refusal).
            if compiled is not None and (kind is add or kind is edit or kind is add_svc or kind is edit_svc):
                stop, seq = compiled(op_list, i, seq, out, context)
                if stop != i:
                    i = stop
                    continue
            i += 1
            try:
                if kind is add_svc or kind is edit_svc:
                    ident = self.ident(op.service)
                    attrs = ident.attrs
                    settings = settings_of(op, ident.family)
                    svc_layout_key = (kind is add_svc, len(attrs), len(settings))
                    svc_layout = svc_layouts.get(svc_layout_key)
                    if svc_layout is None:
                        svc_layout = svc_layouts[svc_layout_key] = _service_message_layout(
                            *svc_layout_key, family, flags)
                    svc_lead, svc_head, svc_pack = svc_layout
                    message = svc_pack(svc_lead, seq, svc_head, attrs, settings)
                elif kind is add or kind is edit:
                    key = op.service
                    if key is not last_key:
                        ident = self.ident(key)
                        last_key, nest, svc_family = key, ident.nest, ident.family
                        inline_ok = svc_family == af_inet
                        layout = layouts.get(len(nest))
                        if layout is None:
                            layout = layouts[len(nest)] = _dest_message_layout(len(nest), family, flags)
                        lead, pack_v4, pack_any = layout
                        nest_head = nest + dest_head
                        new_prefix, set_prefix = new_dest + nest_head, set_dest + nest_head
                    # The usual real server (NAT, IPv4 in an IPv4 service, a valid port
                    # and weight) inline; anything else, with its checks and refusals,
                    # through _dest_parts. (The checks keep their order, so even a
                    # value of the wrong type fails here as it did before.)
                    dest = op.destination
                    message = b""
                    if inline_ok and dest is not None and dest.forward is masq and 0 <= dest.weight <= max_weight:
                        port = dest.port
                        run = masq_runs.get(port)
                        if run is None and 0 <= port <= 65535:
                            run = masq_runs[port] = _masq_run(port)
                        if run is not None:
                            try:
                                message = pack_v4(
                                    lead, seq, new_prefix if kind is add else set_prefix,
                                    pton(af_inet, dest.address), run, dest.weight, tail_v4,
                                )
                            except (OSError, ValueError):
                                pass  # not IPv4 text (an IPv6 address, say): _dest_parts decides
                    if not message:
                        addr, port_bytes, fwd, weight, tail = parts(op, svc_family)
                        message = pack_any(
                            lead, seq, new_prefix if kind is add else set_prefix,
                            addr, _PORT_HDR, port_bytes, fwd, _WEIGHT_HDR, weight, tail,
                        )
                else:
                    body = self.encode(op)
                    message = pack(16 + len(body), family, flags, seq, 0) + body
            except EncodeError as exc:
                # Each earlier operation is either encoded or refused, so this is
                # its index: no enumerate() per operation for a rare case.
                refused[len(out) + len(refused)] = str(exc)
                continue
            append(message)
            seq += 1
        if wraps:
            out = [_renumbered(message, first_seq + k) for k, message in enumerate(out)]
        if not refused:
            return out, None, refused
        return out, [k for k in range(len(ops)) if k not in refused], refused

    def _compiled_context(self, family: int, flags: int) -> tuple[object, ...]:
        """What the compiled loop takes (svcproxy/ipvs/_nlfast.c, parse_context):
        the constants, and this encoder's settings cache."""
        return (_ADD_SVC, _EDIT_SVC, OpKind.ADD_DESTINATION, OpKind.EDIT_DESTINATION, Forward.MASQ, _PROTOCOLS,
                _PROTOCOL_NUMBERS, _UDP, self._settings, family, flags, IPVS_CMD_ATTR_SERVICE, _SVC_GENL, _DEST_GENL,
                _SVC_IDENT_TEMPLATE, _DEST_FULL_HEAD, _masq_run(0), _DEST_FULL_TAIL[_AF_INET], MAX_WEIGHT)

    def encode(self, op: Operation) -> bytes:
        """The request body for one operation; EncodeError if it cannot be one."""
        kind = op.kind
        ident = self.ident(op.service)
        if kind is OpKind.ADD_DESTINATION or kind is OpKind.EDIT_DESTINATION:
            return _GENL[IPVS_CMD_NEW_DEST if kind is OpKind.ADD_DESTINATION else IPVS_CMD_SET_DEST] + ident.nest + (
                _dest_full(op, ident.family)
            )
        if kind is OpKind.DELETE_DESTINATION:
            dest = op.destination
            if dest is None:
                raise EncodeError(f"{kind.value} without a destination")
            af, addr = _packed_address(dest.address)
            return (
                _GENL[IPVS_CMD_DEL_DEST]
                + ident.nest
                + _DEST_KEY.pack(_DEST_KEY_HEAD, addr, _PORT_HDR, _port_bytes(dest.port), _AF_ATTR[af])
            )
        if kind is OpKind.DELETE_SERVICE:
            return _GENL[IPVS_CMD_DEL_SERVICE] + ident.nest
        cmd = IPVS_CMD_NEW_SERVICE if kind is OpKind.ADD_SERVICE else IPVS_CMD_SET_SERVICE
        return _GENL[cmd] + _nest(IPVS_CMD_ATTR_SERVICE, ident.attrs + self._service_settings(op, ident.family))

    def _service_settings(self, op: Operation, family: int) -> bytes:
        """A service's settings attributes (cached: most services share a handful)."""
        key = op.service
        # (Whether UDP, not the Protocol: an enum hashes in Python, at every lookup.)
        inputs = (op.scheduler, op.persistence, op.flags, family, key.port == 0, key.fwmark != 0,
                  key.protocol is _UDP)
        settings = self._settings.get(inputs)
        if settings is None:  # refusals (EncodeError) are not kept: raised again each time
            settings = self._settings[inputs] = _service_settings(op, family)
        return settings


def _port_bytes(port: int) -> bytes:
    if not 0 <= port <= 65535:
        raise EncodeError(f"port {port} out of range")
    return port.to_bytes(2, "big")


#: A service's AF, PROTOCOL, ADDR and PORT attributes, inside their nest: one pack
#: (the nest, then the attributes are its last 44 bytes). Headers are prebuilt, and
#: the format pads an IPv4 address to 16 bytes.
_SVC_IDENT = struct.Struct("=8sH2x4sH2x4s16s4s2s2x")
_SVC_IDENT_START = _NLA_HDR.pack(_SVC_IDENT.size, IPVS_CMD_ATTR_SERVICE) + _NLA_HDR.pack(6, IPVS_SVC_ATTR_AF)
_SVC_PROTOCOL_HDR = _NLA_HDR.pack(6, IPVS_SVC_ATTR_PROTOCOL)
_SVC_ADDR_HDR = _NLA_HDR.pack(20, IPVS_SVC_ATTR_ADDR)
_SVC_PORT_HDR = _NLA_HDR.pack(6, IPVS_SVC_ATTR_PORT)
_TCP = Protocol.TCP
#: For the compiled service loop: the identity with zero values (without its nest
#: header), the protocols it may encode with their numbers, the genl headers.
_SVC_IDENT_TEMPLATE = _SVC_IDENT.pack(_SVC_IDENT_START, 0, _SVC_PROTOCOL_HDR, 0, _SVC_ADDR_HDR, b"", _SVC_PORT_HDR,
                                      b"\0\0")[4:]
_PROTOCOLS = tuple(_PROTO_NUMBER)
_PROTOCOL_NUMBERS = tuple(_PROTO_NUMBER.values())
_SVC_GENL = (_GENL[IPVS_CMD_NEW_SERVICE], _GENL[IPVS_CMD_SET_SERVICE])
_DEST_GENL = (_GENL[IPVS_CMD_NEW_DEST], _GENL[IPVS_CMD_SET_DEST])


def _make_ident(key: ServiceKey) -> _ServiceIdent:
    af, addr = _packed_address(key.address)
    if key.fwmark:
        if not 0 < key.fwmark < 2**32:
            raise EncodeError(f"fwmark {key.fwmark} out of range")
        attrs = _U16_ATTR.pack(6, IPVS_SVC_ATTR_AF, af) + _U32_ATTR.pack(8, IPVS_SVC_ATTR_FWMARK, key.fwmark)
        return _ServiceIdent(af, attrs, _nest(IPVS_CMD_ATTR_SERVICE, attrs))
    protocol = key.protocol
    # (An enum hashes in Python: the usual protocol is compared, not looked up.)
    number = socket.IPPROTO_TCP if protocol is _TCP else _PROTO_NUMBER[protocol]
    port = key.port
    if not 0 <= port <= 65535:
        raise EncodeError(f"port {port} out of range")
    nest = _SVC_IDENT.pack(_SVC_IDENT_START, af, _SVC_PROTOCOL_HDR, number, _SVC_ADDR_HDR, addr, _SVC_PORT_HDR,
                           port.to_bytes(2, "big"))
    return _ServiceIdent(af, nest[4:], nest)


def _dest_parts(op: Operation, svc_family: int) -> tuple[bytes, bytes, bytes, int, bytes]:
    """The variable parts of a NEW/SET_DEST nest (address, port, forwarding
    attribute, weight, tail), after the checks ipvsadm makes."""
    dest = op.destination
    if dest is None:
        raise EncodeError(f"{op.kind.value} without a destination")
    af, addr = _packed_address(dest.address)
    try:
        port = dest.port.to_bytes(2, "big")
    except OverflowError:
        raise EncodeError(f"port {dest.port} out of range") from None
    weight = dest.weight
    if not 0 <= weight <= MAX_WEIGHT:
        raise EncodeError(f"weight {weight} out of range 0..{MAX_WEIGHT}")
    forward = dest.forward
    if forward is not Forward.MASQ:
        if not op.service.fwmark and dest.port != op.service.port:
            # ipvsadm silently moves such a server to the service port; refuse
            # instead, like the ipvsadm backend, so a plan never means two things.
            raise EncodeError(
                f"{forward.value} real server {dest.key} must use the service port {op.service.port}"
            )
    if af != svc_family and forward is not Forward.TUNNEL:
        raise EncodeError("Different address family is allowed only for tunneling servers")
    return addr, port, _FWD_ATTR[forward], weight, _DEST_FULL_TAIL[af]


def _dest_full(op: Operation, svc_family: int) -> bytes:
    addr, port, fwd, weight, tail = _dest_parts(op, svc_family)
    return _DEST_FULL.pack(_DEST_FULL_HEAD, addr, _PORT_HDR, port, fwd, _WEIGHT_HDR, weight, tail)


def _renumbered(message: bytes, seq: int) -> bytes:
    return message[:8] + _U32.pack(seq & 0xFFFFFFFF) + message[12:]


#: The netlink header up to the sequence number: length, type, flags.
_NLMSG_LEAD = struct.Struct("=IHH")
#: What lies between ADDR and the weight in a NAT server's NEW/SET_DEST nest: the
#: PORT attribute (padded), the FWD_METHOD attribute and the WEIGHT header.
_MASQ_RUN = struct.Struct("=4s2s2x8s4s")


def _masq_run(port: int) -> bytes:
    return _MASQ_RUN.pack(_PORT_HDR, port.to_bytes(2, "big"), _FWD_ATTR[Forward.MASQ], _WEIGHT_HDR)


def _dest_message_layout(
    nest_size: int, family: int, flags: int
) -> tuple[bytes, Callable[..., bytes], Callable[..., bytes]]:
    """A whole NEW/SET_DEST message (netlink header, genl header, service nest of
    ``nest_size`` bytes, destination nest) as one pack per request.

    Returns the header's constant start (length, type, flags), then two packs
    that take it, the sequence number and the genl header + service nest +
    destination nest header + ADDR header as one string: that of a NAT server
    with an IPv4 address (then the 4-byte address, padded to 16 by the format, a
    ``_masq_run`` and the weight), and that of any real server (then the rest of
    ``_DEST_FULL``). Port id 0 is padding. Each argument left out is a step less
    per request.
    """
    head = f"=8sI4x{4 + nest_size + len(_DEST_FULL_HEAD)}s"
    ipv4_masq = struct.Struct(f"{head}4s12x{_MASQ_RUN.size}sI24s")
    any_server = struct.Struct(f"{head}16s4s2s2x8s4sI24s")
    return _NLMSG_LEAD.pack(any_server.size, family, flags), ipv4_masq.pack, any_server.pack


def _service_message_layout(
    new: bool, attrs_size: int, settings_size: int, family: int, flags: int
) -> tuple[bytes, bytes, Callable[..., bytes]]:
    """A whole NEW/SET_SERVICE message as one pack: the netlink header's start
    (length, type, flags), the genl header + service nest header, and a pack
    taking those, the sequence number, the identity and the settings."""
    layout = struct.Struct(f"=8sI4x8s{attrs_size}s{settings_size}s")
    head = _GENL[IPVS_CMD_NEW_SERVICE if new else IPVS_CMD_SET_SERVICE] + _NLA_HDR.pack(
        4 + attrs_size + settings_size, IPVS_CMD_ATTR_SERVICE)
    return _NLMSG_LEAD.pack(layout.size, family, flags), head, layout.pack


def _service_settings(op: Operation, af: int) -> bytes:
    """SCHED_NAME, [PE_NAME], FLAGS, TIMEOUT, NETMASK for NEW/SET_SERVICE.

    Everything is always sent: SET_SERVICE replaces all of it (an absent PE_NAME
    clears the engine), so an edit states the whole desired service.
    """
    sched = op.scheduler
    if not _NAME_RE.fullmatch(sched) or len(sched) >= IP_VS_SCHEDNAME_MAXLEN:
        raise EncodeError(f"bad scheduler name {sched!r}")
    key = op.service
    flags = 0
    timeout = 0
    if op.persistence is not None:
        if not 1 <= op.persistence <= MAX_PERSISTENCE:
            raise EncodeError(f"persistence {op.persistence} out of range 1..{MAX_PERSISTENCE}")
        flags |= IP_VS_SVC_F_PERSISTENT
        timeout = op.persistence
    elif key.port == 0 and not key.fwmark:
        raise EncodeError("Zero port specified for non-persistent service")
    netmask = _V4_DEFAULT_MASK if af == _AF_INET else struct.pack("=I", _V6_DEFAULT_PLEN)
    pe = b""
    for flag in sorted(op.flags):
        if flag.startswith(NETMASK_PREFIX):
            if op.persistence is None:
                # The kernel keeps it, but neither ipvsadm nor this decoder shows the
                # netmask of a service that is not persistent: it could never be seen
                # as applied.
                raise EncodeError(f"{flag} without persistence")
            netmask = _netmask(flag[len(NETMASK_PREFIX) :], af)
        elif flag.startswith(PE_PREFIX):
            engine = flag[len(PE_PREFIX) :]
            if not _NAME_RE.fullmatch(engine) or len(engine) >= IP_VS_PENAME_MAXLEN:
                raise EncodeError(f"bad persistence engine flag {flag!r}")
            pe = _nla(IPVS_SVC_ATTR_PE_NAME, engine.encode() + b"\0")
        elif flag == OPS_FLAG:
            if key.protocol is not Protocol.UDP and not key.fwmark:
                raise EncodeError("One-Packet Scheduling is only for UDP virtual services")
            flags |= IP_VS_SVC_F_ONEPACKET
        else:
            bit_sched = _FLAG_BITS.get(flag)
            if bit_sched is None:
                raise EncodeError(f"invalid scheduler flag `{flag}'")
            bit, only_for = bit_sched
            if only_for is not None and only_for != sched:
                raise EncodeError(f"incompatible scheduler flag `{flag}'")
            flags |= bit
    return (
        _nla(IPVS_SVC_ATTR_SCHED_NAME, sched.encode() + b"\0")
        + pe
        + _nla(IPVS_SVC_ATTR_FLAGS, struct.pack("=II", flags, 0xFFFFFFFF))
        + _U32_ATTR.pack(8, IPVS_SVC_ATTR_TIMEOUT, timeout)
        + _nla(IPVS_SVC_ATTR_NETMASK, netmask)
    )


def _netmask(text: str, af: int) -> bytes:
    if af == _AF_INET:
        try:
            return socket.inet_pton(_AF_INET, text)
        except (OSError, ValueError):
            raise EncodeError(f"bad IPv4 netmask {text!r}") from None
    if not text.isdigit() or not 1 <= int(text) <= 128:
        raise EncodeError(f"bad IPv6 netmask {text!r} (a prefix length 1..128)")
    return struct.pack("=I", int(text))


# --------------------------------------------------------------------------------------
# decoding


class Message(NamedTuple):
    """Where one netlink message sits in a received buffer (a tuple: made 100,000
    times per read, where a frozen dataclass would cost a microsecond each)."""

    type: int
    flags: int
    seq: int
    start: int  # first byte after the netlink header
    end: int


def walk(data: bytes) -> Iterator[Message]:
    """The netlink messages in one datagram."""
    off, size = 0, len(data)
    unpack = NLMSG_HDR.unpack_from
    while off + 16 <= size:
        length, mtype, flags, seq, _ = unpack(data, off)
        if length < 16 or off + length > size:
            raise DecodeError(f"truncated netlink message at offset {off} (length {length}, {size} bytes)")
        yield Message(mtype, flags, seq, off + 16, off + length)
        off += (length + 3) & ~3


def decode_error(data: bytes, msg: Message) -> tuple[int, str]:
    """(errno, extended-ack text or "") of an NLMSG_ERROR; errno 0 is an ack."""
    if msg.end - msg.start < 4:
        raise DecodeError("short NLMSG_ERROR")
    code: int = _ERR.unpack_from(data, msg.start)[0]
    text = ""
    if msg.flags & NLM_F_ACK_TLVS and msg.end - msg.start >= 20:
        # With NETLINK_CAP_ACK the echoed request is just its 16-byte header.
        echoed_len = NLMSG_HDR.unpack_from(data, msg.start + 4)[0]
        tlv_start = msg.start + 4 + (16 if msg.flags & NLM_F_CAPPED else (echoed_len + 3) & ~3)
        for atype, start, end in _attrs(data, tlv_start, msg.end):
            if atype == NLMSGERR_ATTR_MSG:
                text = data[start:end].split(b"\0", 1)[0].decode(errors="replace")
    return -code, text


def decode_family_id(data: bytes, msg: Message) -> int:
    """CTRL_ATTR_FAMILY_ID from a CTRL_CMD_NEWFAMILY reply."""
    for atype, start, _ in _attrs(data, msg.start + 4, msg.end):
        if atype == CTRL_ATTR_FAMILY_ID:
            value: int = struct.unpack_from("=H", data, start)[0]
            return value
    raise DecodeError("generic netlink family reply without CTRL_ATTR_FAMILY_ID")


def _attrs(data: bytes, off: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(type without flag bits, payload start, payload end) of each attribute."""
    unpack = _NLA_HDR.unpack_from
    while off + 4 <= end:
        length, atype = unpack(data, off)
        if length < 4 or off + length > end:
            raise DecodeError(f"bad attribute length {length} at offset {off}")
        yield atype & 0x3FFF, off + 4, off + length
        off += (length + 3) & ~3


def address_text(family: int, raw: bytes) -> str:
    """Canonical text (the model's ``ipaddress`` compressed form) of a 16-byte address."""
    if family == _AF_INET:
        return socket.inet_ntop(_AF_INET, raw[:4])
    if family != _AF_INET6:
        raise DecodeError(f"unknown address family {family}")
    text = socket.inet_ntop(_AF_INET6, raw)
    # inet_ntop agrees with ipaddress except for the dotted forms (::ffff:10.0.0.1).
    return ipaddress.IPv6Address(raw).compressed if "." in text else text


def _nested(data: bytes, msg: Message, want: int) -> tuple[int, int]:
    """Payload bounds of the top-level attribute ``want`` of a generic-netlink message."""
    for atype, start, end in _attrs(data, msg.start + 4, msg.end):
        if atype == want:
            return start, end
    raise DecodeError(f"message without attribute {want}")


#: The destination nest as kernels 5.3 to 6.x fill it (ip_vs_genl_fill_dest): fixed
#: layout up to ADDR_FAMILY. Each attribute is (header word, value), so the header
#: words are every other field and one tuple comparison checks the whole layout.
_DEST_FAST = struct.Struct("=I16sI2s2xIIIIIB3xI2s2xIH2xIIIIIIIIIIIH2x")
_DEST_FAST_HDRS = tuple(
    _hdr_word(length, atype)
    for length, atype in (
        (20, IPVS_DEST_ATTR_ADDR),
        (6, IPVS_DEST_ATTR_PORT),
        (8, IPVS_DEST_ATTR_FWD_METHOD),
        (8, IPVS_DEST_ATTR_WEIGHT),
        (5, IPVS_DEST_ATTR_TUN_TYPE),
        (6, IPVS_DEST_ATTR_TUN_PORT),
        (6, IPVS_DEST_ATTR_TUN_FLAGS),
        (8, IPVS_DEST_ATTR_U_THRESH),
        (8, IPVS_DEST_ATTR_L_THRESH),
        (8, IPVS_DEST_ATTR_ACTIVE_CONNS),
        (8, IPVS_DEST_ATTR_INACT_CONNS),
        (8, IPVS_DEST_ATTR_PERSIST_CONNS),
        (6, IPVS_DEST_ATTR_ADDR_FAMILY),
    )
)


def _dest_factory() -> Callable[[str, int, int, Forward, int, int], Destination]:
    """A maker of ``Destination`` values that skips the frozen dataclass __init__.

    A frozen dataclass sets each field through object.__setattr__: 2 us per
    Destination, a third of decoding one real server, and a read makes 100,000.
    Filling the instance dict directly gives the very same object (equality, hash
    and repr come from the fields) in a third of the time. If the model ever
    changes shape (slots, __post_init__, other fields) the plain class is used.
    """
    fields = ("address", "port", "weight", "forward", "active_conns", "inactive_conns")
    probe = Destination("0.0.0.0", 0)
    if (
        hasattr(Destination, "__slots__")
        or hasattr(Destination, "__post_init__")
        or tuple(getattr(probe, "__dict__", ())) != fields
    ):
        return Destination
    new = object.__new__

    def make(address: str, port: int, weight: int, forward: Forward, active: int, inactive: int) -> Destination:
        dest: Destination = new(Destination)
        dest.__dict__.update(
            address=address, port=port, weight=weight, forward=forward, active_conns=active, inactive_conns=inactive
        )
        return dest

    return make


make_destination = _dest_factory()


#: A whole GET_DEST reply in the layout of _DEST_FAST, netlink and generic-netlink
#: headers included: one unpack per real server.
_DEST_MESSAGE = struct.Struct("=IHHII4xHH" + _DEST_FAST.format[1:])


def decode_dest_datagram(
    data: bytes, family: int, seq: int, svc_family: int, out: list[Destination], names: dict[bytes, str] | None = None
) -> int:
    """Decode one datagram of the GET_DEST dump ``seq`` into ``out``.

    Returns -1 while the dump goes on, 0 at its NLMSG_DONE, or the errno of an
    NLMSG_ERROR. A message in the kernel's usual layout is read with one unpack
    and no intermediate objects (a read decodes 100,000 of them); anything else
    goes through ``decode_dest``. ``names`` caches address text by raw address
    for the caller (a Pod's address is usually the real server of several
    virtual services: ClusterIP, NodePorts, external IPs).
    """
    if names is None:
        names = {}
    off, size = 0, len(data)
    unpack_header = NLMSG_HDR.unpack_from
    unpack_message = _DEST_MESSAGE.unpack_from
    whole = _DEST_MESSAGE.size
    hdrs = _DEST_FAST_HDRS
    fwds = _FWD_OF_NUMBER
    make = make_destination
    ntop = socket.inet_ntop
    af_inet = _AF_INET
    while off + 16 <= size:
        if size - off >= whole:
            t = unpack_message(data, off)
            length, mtype, mseq = t[0], t[1], t[3]
            if (
                mtype == family
                and mseq == seq
                and length >= whole
                and t[6] & 0x3FFF == IPVS_CMD_ATTR_DEST
                and t[7:33:2] == hdrs
                and t[12] in fwds
            ):
                raw = t[8]
                address = names.get(raw)
                if address is None:
                    address = names[raw] = ntop(af_inet, raw[:4]) if t[32] == af_inet else address_text(t[32], raw)
                out.append(make(address, int.from_bytes(t[10], "big"), t[14], fwds[t[12]], t[26], t[28]))
                off += (length + 3) & ~3
                continue
        length, mtype, _, mseq, _ = unpack_header(data, off)
        if length < 16 or off + length > size:
            raise DecodeError(f"truncated netlink message at offset {off} (length {length}, {size} bytes)")
        if mseq == seq:
            if mtype == family:
                out.append(decode_dest(data, Message(mtype, 0, mseq, off + 16, off + length), svc_family))
            elif mtype == NLMSG_DONE:
                if length >= 20:
                    code: int = _ERR.unpack_from(data, off + 16)[0]
                    if code < 0:
                        return -code
                return 0
            elif mtype == NLMSG_ERROR:
                return decode_error(data, Message(mtype, 0, mseq, off + 16, off + length))[0] or -1
        off += (length + 3) & ~3
    return -1


def decode_dest(data: bytes, msg: Message, svc_family: int) -> Destination:
    """A real server from one GET_DEST dump message (connection counts included)."""
    start = msg.start + 8  # genl header, then the IPVS_CMD_ATTR_DEST nest header
    if msg.end - start >= _DEST_FAST.size and _NLA_HDR.unpack_from(data, msg.start + 4)[1] & 0x3FFF == (
        IPVS_CMD_ATTR_DEST
    ):
        t = _DEST_FAST.unpack_from(data, start)
        if t[0::2] == _DEST_FAST_HDRS:
            fwd = _FWD_OF_NUMBER.get(t[5] & IP_VS_CONN_F_FWD_MASK)
            if fwd is None:
                raise DecodeError(f"unknown forwarding method {t[5]}")
            return make_destination(address_text(t[25], t[1]), int.from_bytes(t[3], "big"), t[7], fwd, t[19], t[21])
    return _decode_dest_slow(data, msg, svc_family)


def _decode_dest_slow(data: bytes, msg: Message, svc_family: int) -> Destination:
    """Any attribute order, any subset the kernel may send (older or newer kernels)."""
    start, end = _nested(data, msg, IPVS_CMD_ATTR_DEST)
    raw = b""
    port = fwd_number = weight = active = inactive = 0
    family = svc_family
    for atype, a, b in _attrs(data, start, end):
        if atype == IPVS_DEST_ATTR_ADDR:
            raw = data[a:b]
        elif atype == IPVS_DEST_ATTR_PORT:
            port = int.from_bytes(data[a : a + 2], "big")
        elif atype == IPVS_DEST_ATTR_FWD_METHOD:
            fwd_number = struct.unpack_from("=I", data, a)[0]
        elif atype == IPVS_DEST_ATTR_WEIGHT:
            weight = struct.unpack_from("=I", data, a)[0]
        elif atype == IPVS_DEST_ATTR_ACTIVE_CONNS:
            active = struct.unpack_from("=I", data, a)[0]
        elif atype == IPVS_DEST_ATTR_INACT_CONNS:
            inactive = struct.unpack_from("=I", data, a)[0]
        elif atype == IPVS_DEST_ATTR_ADDR_FAMILY:
            family = struct.unpack_from("=H", data, a)[0]
    if len(raw) != 16 and not (len(raw) == 4 and family == _AF_INET):
        raise DecodeError("destination without an address")
    fwd = _FWD_OF_NUMBER.get(fwd_number & IP_VS_CONN_F_FWD_MASK)
    if fwd is None:
        raise DecodeError(f"unknown forwarding method {fwd_number}")
    return make_destination(address_text(family, raw), port, weight, fwd, active, inactive)


#: The service nest's identifying prefix as the kernel fills it for a non-fwmark
#: service: AF, PROTOCOL, ADDR, PORT (header words checked as with _DEST_FAST).
_SVC_FAST = struct.Struct("=IH2xIH2xI16sI2s2x")
_SVC_FAST_HDRS = tuple(
    _hdr_word(length, atype)
    for length, atype in (
        (6, IPVS_SVC_ATTR_AF),
        (6, IPVS_SVC_ATTR_PROTOCOL),
        (20, IPVS_SVC_ATTR_ADDR),
        (6, IPVS_SVC_ATTR_PORT),
    )
)


class DecodedService(NamedTuple):
    """One GET_SERVICE reply: the service (no real servers yet), its address
    family, and its identifying attributes exactly as the kernel sent them (empty
    if not in the usual layout), ready to go back in the GET_DEST request."""

    service: VirtualService
    family: int
    ident: bytes


#: What follows SCHED_NAME when there is no PE_NAME: FLAGS (flags, mask), TIMEOUT,
#: NETMASK; the statistics nests after them are not read.
_SVC_TAIL = struct.Struct("=II4xIII4s")
_SVC_TAIL_HDRS = (_hdr_word(12, IPVS_SVC_ATTR_FLAGS), _hdr_word(8, IPVS_SVC_ATTR_TIMEOUT),
                  _hdr_word(8, IPVS_SVC_ATTR_NETMASK))


def decode_service(
    data: bytes, msg: Message, settings: dict[tuple[str, int, int, bytes, int], tuple[int | None, frozenset[str]]]
    | None = None
) -> DecodedService:
    """A virtual service from one GET_SERVICE dump message.

    ``settings`` caches decoded settings for the caller (a read decodes 10,000
    services that share a handful of settings)."""
    start, end = _nested(data, msg, IPVS_CMD_ATTR_SERVICE)
    ident = b""
    family = protocol = port = fwmark = flags = timeout = 0
    raw = b""
    sched = ""
    pe = ""
    netmask = b""
    off = start
    if end - start >= _SVC_FAST.size:
        t = _SVC_FAST.unpack_from(data, start)
        if t[0::2] == _SVC_FAST_HDRS:
            family, protocol, raw, port = t[1], t[3], t[5], int.from_bytes(t[7], "big")
            off = start + _SVC_FAST.size
            ident = data[start:off]
            # The kernel's usual order next: SCHED_NAME, then (no PE_NAME) FLAGS,
            # TIMEOUT, NETMASK in one unpack; anything else takes the loop below.
            if off + 4 <= end:
                length, atype = _NLA_HDR.unpack_from(data, off)
                after = off + ((length + 3) & ~3)
                if atype == IPVS_SVC_ATTR_SCHED_NAME and length > 4 and after + _SVC_TAIL.size <= end:
                    u = _SVC_TAIL.unpack_from(data, after)
                    if (u[0], u[2], u[4]) == _SVC_TAIL_HDRS:
                        sched = data[off + 4 : off + length].split(b"\0", 1)[0].decode()
                        flags, timeout, netmask = u[1], u[3], u[5]
                        off = end
    for atype, a, b in _attrs(data, off, end):
        if atype == IPVS_SVC_ATTR_SCHED_NAME:
            sched = data[a:b].split(b"\0", 1)[0].decode()
        elif atype == IPVS_SVC_ATTR_FLAGS:
            flags = struct.unpack_from("=I", data, a)[0]
        elif atype == IPVS_SVC_ATTR_TIMEOUT:
            timeout = struct.unpack_from("=I", data, a)[0]
        elif atype == IPVS_SVC_ATTR_NETMASK:
            netmask = data[a : a + 4]
        elif atype == IPVS_SVC_ATTR_PE_NAME:
            pe = data[a:b].split(b"\0", 1)[0].decode()
        elif atype == IPVS_SVC_ATTR_AF:
            family = struct.unpack_from("=H", data, a)[0]
        elif atype == IPVS_SVC_ATTR_PROTOCOL:
            protocol = struct.unpack_from("=H", data, a)[0]
        elif atype == IPVS_SVC_ATTR_ADDR:
            raw = data[a:b]
        elif atype == IPVS_SVC_ATTR_PORT:
            port = int.from_bytes(data[a : a + 2], "big")
        elif atype == IPVS_SVC_ATTR_FWMARK:
            fwmark = struct.unpack_from("=I", data, a)[0]
    if family not in (_AF_INET, _AF_INET6):
        raise DecodeError(f"service with unknown address family {family}")
    if fwmark:
        key = ServiceKey(Protocol.TCP, "::" if family == _AF_INET6 else "0.0.0.0", 0, fwmark)
    else:
        proto = _PROTO_OF_NUMBER.get(protocol)
        if proto is None:
            raise DecodeError(f"service with unknown protocol {protocol}")
        if len(raw) != 16 and not (len(raw) == 4 and family == _AF_INET):
            raise DecodeError("service without an address")
        key = ServiceKey(proto, address_text(family, raw), port)
    if settings is None:
        persistence, names = _settings(sched, flags, timeout, netmask, pe, family)
    else:
        inputs = (sched, flags, timeout, netmask, family) if not pe else None
        found = settings.get(inputs) if inputs is not None else None
        if found is None:
            found = _settings(sched, flags, timeout, netmask, pe, family)
            if inputs is not None:
                settings[inputs] = found
        persistence, names = found
    return DecodedService(VirtualService(key, sched, persistence, names), family, ident)


def get_dests_request(family: int, seq: int, ident: bytes) -> bytes:
    """The GET_DEST dump request for the service with identifying attributes ``ident``."""
    body = _GENL[IPVS_CMD_GET_DEST] + _NLA_HDR.pack(4 + len(ident), IPVS_CMD_ATTR_SERVICE) + ident
    return NLMSG_HDR.pack(16 + len(body), family, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body


def _settings(
    sched: str, flags: int, timeout: int, netmask: bytes, pe: str, family: int
) -> tuple[int | None, frozenset[str]]:
    """(persistence, flags) in the ipvsadm backend's vocabulary."""
    names: list[str] = []
    persistence: int | None = None
    if flags & IP_VS_SVC_F_PERSISTENT:
        persistence = timeout
        if len(netmask) == 4:
            if family == _AF_INET:
                if netmask != _V4_DEFAULT_MASK:
                    names.append(NETMASK_PREFIX + socket.inet_ntop(_AF_INET, netmask))
            else:
                plen = struct.unpack("=I", netmask)[0]
                if plen != _V6_DEFAULT_PLEN:
                    names.append(f"{NETMASK_PREFIX}{plen}")
    if flags & IP_VS_SVC_F_ONEPACKET:
        names.append(OPS_FLAG)
    if flags & (IP_VS_SVC_F_SCHED1 | IP_VS_SVC_F_SCHED2 | IP_VS_SVC_F_SCHED3):
        labels = _SCHED_FLAG_NAMES.get(sched, _GENERIC_FLAG_NAMES)
        names.extend(label for bit, label in zip(_SCHED_BITS, labels) if flags & bit)
    if pe:
        names.append(PE_PREFIX + pe)
    return persistence, frozenset(names)


# --------------------------------------------------------------------------------------
# errors

#: What ipvsadm says for each kernel errno, by operation (libipvs ipvs_strerror);
#: its words are what operators know, the errno name is what they can search for.
_ERROR_TEXT: dict[tuple[OpKind | None, int], str] = {
    (OpKind.ADD_SERVICE, errno.EEXIST): "Service already exists",
    (OpKind.ADD_SERVICE, errno.ENOENT): "Scheduler or persistence engine not found",
    (OpKind.EDIT_SERVICE, errno.ESRCH): "No such service",
    (OpKind.EDIT_SERVICE, errno.ENOENT): "Scheduler or persistence engine not found",
    (OpKind.DELETE_SERVICE, errno.ESRCH): "No such service",
    (OpKind.ADD_DESTINATION, errno.ESRCH): "Service not defined",
    (OpKind.ADD_DESTINATION, errno.EEXIST): "Destination already exists",
    (OpKind.EDIT_DESTINATION, errno.ESRCH): "Service not defined",
    (OpKind.EDIT_DESTINATION, errno.ENOENT): "No such destination",
    (OpKind.DELETE_DESTINATION, errno.ESRCH): "Service not defined",
    (OpKind.DELETE_DESTINATION, errno.ENOENT): "No such destination",
    (None, errno.EPERM): "Permission denied (you must be root)",
    (None, errno.EINVAL): "Invalid operation.  Possibly wrong module version, address not unicast, ...",
    (None, errno.ENOPROTOOPT): "Protocol not available",
    (None, errno.ENOMEM): "Memory allocation problem",
    (None, errno.EAFNOSUPPORT): "Operation not supported with specified address family",
    (None, errno.ERANGE): "Weight or threshold out of range",
}


def describe_error(kind: OpKind | None, code: int, extack: str = "") -> str:
    """Readable text for a kernel error, e.g. "Service already exists (EEXIST)"."""
    text = _ERROR_TEXT.get((kind, code)) or _ERROR_TEXT.get((None, code)) or os.strerror(code)
    name = errno.errorcode.get(code, f"errno {code}")
    message = f"{text} ({name})"
    return f"{message}: {extack}" if extack else message
