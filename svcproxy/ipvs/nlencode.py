"""Operation -> IPVS generic-netlink request, with ``struct`` alone.

Why our own encoder: pyroute2's message classes are general and far too slow
for plans of a hundred thousand operations. IPVS messages are few and almost
fixed-layout, so a handful of precompiled ``struct.Struct`` objects and byte
templates do the whole job. Nothing here does I/O; ``netlink.py`` owns sockets.

Two encoders, one reference: ``_Batch.encode`` in Python encodes every
operation with every check; the compiled loop (``_nlfast.c``, where it is built)
takes only the usual operations, with constant parts from here, and hands
everything else back. ``tests/test_nlfast.py`` holds the two to the same bytes.

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

Requests ipvsadm refuses before they reach the kernel are refused here too
(``EncodeError``), with ipvsadm's words, so the backends agree on what is valid:
the plan means the same thing whichever backend runs it.
"""

from __future__ import annotations

import socket
import struct
from typing import Callable, NamedTuple, Sequence

from svcproxy.ipvs.nlconst import (
    AF_INET,
    AF_INET6,
    CTRL_ATTR_FAMILY_NAME,
    CTRL_CMD_GETFAMILY,
    FLAG_BITS,
    FWD_NUMBER,
    GENL_HDR,
    IP_VS_PENAME_MAXLEN,
    IP_VS_SCHEDNAME_MAXLEN,
    IP_VS_SVC_F_ONEPACKET,
    IP_VS_SVC_F_PERSISTENT,
    IPVS_CMD_ATTR_DEST,
    IPVS_CMD_ATTR_SERVICE,
    IPVS_CMD_DEL_DEST,
    IPVS_CMD_DEL_SERVICE,
    IPVS_CMD_GET_DEST,
    IPVS_CMD_GET_SERVICE,
    IPVS_CMD_NEW_DEST,
    IPVS_CMD_NEW_SERVICE,
    IPVS_CMD_SET_DEST,
    IPVS_CMD_SET_SERVICE,
    IPVS_DEST_ATTR_ADDR,
    IPVS_DEST_ATTR_ADDR_FAMILY,
    IPVS_DEST_ATTR_FWD_METHOD,
    IPVS_DEST_ATTR_L_THRESH,
    IPVS_DEST_ATTR_PORT,
    IPVS_DEST_ATTR_U_THRESH,
    IPVS_DEST_ATTR_WEIGHT,
    IPVS_GENL_NAME,
    IPVS_GENL_VERSION,
    IPVS_SVC_ATTR_ADDR,
    IPVS_SVC_ATTR_AF,
    IPVS_SVC_ATTR_FLAGS,
    IPVS_SVC_ATTR_FWMARK,
    IPVS_SVC_ATTR_NETMASK,
    IPVS_SVC_ATTR_PE_NAME,
    IPVS_SVC_ATTR_PORT,
    IPVS_SVC_ATTR_PROTOCOL,
    IPVS_SVC_ATTR_SCHED_NAME,
    IPVS_SVC_ATTR_TIMEOUT,
    NLA_HDR,
    NLM_F_DUMP,
    NLM_F_REQUEST,
    NLMSG_HDR,
    PROTO_NUMBER,
    U16_ATTR,
    U32_ATTR,
    V4_DEFAULT_MASK,
    V6_DEFAULT_PLEN,
)
from svcproxy.ipvs.rules import MAX_PERSISTENCE, MAX_WEIGHT, NAME_RE, NETMASK_PREFIX, OPS_FLAG, PE_PREFIX
from svcproxy.model import Forward, OpKind, Operation, Protocol, ServiceKey

__all__ = [
    "COMPILED",
    "GET_SERVICE_BODY",
    "EncodeError",
    "Encoder",
    "family_request",
    "frame",
    "get_dests_request",
]


class EncodeError(ValueError):
    """An operation that cannot be expressed as a valid IPVS request."""


_compiled_encode: Callable[..., tuple[int, int]] | None
try:
    from svcproxy.ipvs._nlfast import encode as _compiled_encode
except ImportError:  # not built (no C compiler where it was installed): Python only
    _compiled_encode = None

#: Whether the compiled encoder loop is in use (the CLI warns when not).
COMPILED = _compiled_encode is not None

# Members looked up once: OpKind.X is a class attribute lookup at every use.
_ADD_SVC, _EDIT_SVC, _UDP = OpKind.ADD_SERVICE, OpKind.EDIT_SERVICE, Protocol.UDP
_ADD_DEST, _EDIT_DEST = OpKind.ADD_DESTINATION, OpKind.EDIT_DESTINATION
_U32 = struct.Struct("=I")

# --------------------------------------------------------------------------------------
# headers and requests that are not operations

def _nla(atype: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return NLA_HDR.pack(length, atype) + payload + bytes(-length & 3)


def _nest(atype: int, payload: bytes) -> bytes:
    return NLA_HDR.pack(4 + len(payload), atype) + payload


def _genl(cmd: int) -> bytes:
    return GENL_HDR.pack(cmd, IPVS_GENL_VERSION, 0)


_GENL = {cmd: _genl(cmd) for cmd in range(1, 9)}
#: Body of the GET_SERVICE dump request (the kernel reads no attributes from it).
GET_SERVICE_BODY = _GENL[IPVS_CMD_GET_SERVICE]


def frame(family: int, flags: int, seq: int, body: bytes) -> bytes:
    """One netlink message: header plus a generic-netlink body (port id 0: the kernel)."""
    return NLMSG_HDR.pack(16 + len(body), family, flags, seq, 0) + body


def family_request() -> bytes:
    """Body of CTRL_CMD_GETFAMILY for "IPVS" (send to GENL_ID_CTRL)."""
    return GENL_HDR.pack(CTRL_CMD_GETFAMILY, 1, 0) + _nla(CTRL_ATTR_FAMILY_NAME, IPVS_GENL_NAME.encode() + b"\0")


def get_dests_request(family: int, seq: int, ident: bytes) -> bytes:
    """The GET_DEST dump request for the service with identifying attributes ``ident``."""
    body = _GENL[IPVS_CMD_GET_DEST] + NLA_HDR.pack(4 + len(ident), IPVS_CMD_ATTR_SERVICE) + ident
    return NLMSG_HDR.pack(16 + len(body), family, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body


# --------------------------------------------------------------------------------------
# fixed parts


def _packed_address(address: str) -> tuple[int, bytes]:
    """(address family, the address's bytes): 16, or 4 for IPv4, which every
    layout's "16s" pads to the 16 IPVS wants."""
    try:
        if ":" in address:
            return AF_INET6, socket.inet_pton(AF_INET6, address)
        return AF_INET, socket.inet_pton(AF_INET, address)
    except (OSError, ValueError):  # ValueError: an embedded NUL
        raise EncodeError(f"not an IP address: {address!r}") from None


#: The destination nest of NEW/SET_DEST: ADDR, PORT, FWD_METHOD, WEIGHT, U_THRESH,
#: L_THRESH, ADDR_FAMILY. Constant parts are prebuilt byte strings, so one pack call
#: with eight arguments makes the whole nest (the hot path: most operations are these).
_DEST_FULL = struct.Struct("=8s16s4s2s2x8s4sI24s")
_DEST_FULL_HEAD = NLA_HDR.pack(_DEST_FULL.size, IPVS_CMD_ATTR_DEST) + NLA_HDR.pack(20, IPVS_DEST_ATTR_ADDR)
_PORT_HDR = NLA_HDR.pack(6, IPVS_DEST_ATTR_PORT)
_FWD_ATTR = {fwd: U32_ATTR.pack(8, IPVS_DEST_ATTR_FWD_METHOD, number) for fwd, number in FWD_NUMBER.items()}
_WEIGHT_HDR = NLA_HDR.pack(8, IPVS_DEST_ATTR_WEIGHT)
_DEST_FULL_TAIL = {
    af: U32_ATTR.pack(8, IPVS_DEST_ATTR_U_THRESH, 0)
    + U32_ATTR.pack(8, IPVS_DEST_ATTR_L_THRESH, 0)
    + U16_ATTR.pack(6, IPVS_DEST_ATTR_ADDR_FAMILY, af)
    for af in (AF_INET, AF_INET6)
}
#: The destination nest of DEL_DEST: ADDR, PORT, ADDR_FAMILY.
_DEST_KEY = struct.Struct("=8s16s4s2s2x8s")
_DEST_KEY_HEAD = NLA_HDR.pack(_DEST_KEY.size, IPVS_CMD_ATTR_DEST) + NLA_HDR.pack(20, IPVS_DEST_ATTR_ADDR)
_AF_ATTR = {af: U16_ATTR.pack(6, IPVS_DEST_ATTR_ADDR_FAMILY, af) for af in (AF_INET, AF_INET6)}


class _ServiceIdent(NamedTuple):
    """A service's identifying attributes, encoded once per service and reused
    (a NamedTuple: a plan makes one per service, and a frozen dataclass is
    several times as costly to make)."""

    family: int  # AF_INET / AF_INET6
    attrs: bytes  # AF + FWMARK or AF + PROTOCOL + ADDR + PORT, without the nest header
    nest: bytes  # the same inside an IPVS_CMD_ATTR_SERVICE nest


class Encoder:
    """Encodes operations into complete netlink messages (``messages``, what apply
    uses) or generic-netlink bodies (``encode``, ``get_dests``).

    Holds per-instance caches (identity attributes by service key, settings
    attributes), so make one per batch and drop it: there is no module-level state.
    """

    def __init__(self, *, compiled: bool = True) -> None:
        #: The compiled loop (svcproxy/ipvs/_nlfast.c) where it is built and wanted;
        #: the Python encoder (``_Batch``) is the reference it is tested against.
        self._compiled = _compiled_encode if compiled else None
        self._idents: dict[ServiceKey, _ServiceIdent] = {}
        #: Service settings attributes by everything they depend on: most services
        #: share a handful of settings, and building them is most of a service's cost.
        self._settings: dict[tuple[object, ...], bytes] = {}
        # Plans list a service's operations together: skip even the dict lookup
        # (hashing a ServiceKey is not cheap) while the key repeats.
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
        The compiled loop, where there is one, takes the usual operations and
        stops at any other, which the Python encoder takes, with the ones after
        it up to the next the compiled loop may take.
        """
        op_list = ops if type(ops) is list else list(ops)
        # Sequence numbers are u32. A batch that wraps them (once in 4 billion
        # messages) is numbered from 0 and renumbered at the end: no mask per message.
        seq = first_seq & 0xFFFFFFFF
        wraps = seq + len(op_list) > 0x100000000
        if wraps:
            seq = 0
        batch = _Batch(self, family, flags)
        compiled = self._compiled
        if compiled is None:
            batch.encode(op_list, 0, seq, False)
        else:
            context = self._compiled_context(family, flags)
            i, count = 0, len(op_list)
            while i < count:
                i, seq = compiled(op_list, i, seq, batch.out, context)
                if i < count:
                    i, seq = batch.encode(op_list, i, seq, True)
        return batch.result(len(op_list), first_seq if wraps else None)

    def encode(self, op: Operation) -> bytes:
        """The request body for one operation, as the Python encoder makes it
        (``messages`` without the netlink header); EncodeError if it cannot be one."""
        batch = _Batch(self, 0, 0)
        batch.encode([op], 0, 0, False)
        if batch.refused:
            raise EncodeError(batch.refused[0])
        return batch.out[0][NLMSG_HDR.size :]

    def _compiled_context(self, family: int, flags: int) -> tuple[object, ...]:
        """What the compiled loop takes (svcproxy/ipvs/_nlfast.c, parse_context):
        the constants, and this encoder's settings cache."""
        return (_ADD_SVC, _EDIT_SVC, _ADD_DEST, _EDIT_DEST, Forward.MASQ, _PROTOCOLS,
                _PROTOCOL_NUMBERS, _UDP, self._settings, family, flags, IPVS_CMD_ATTR_SERVICE, _SVC_GENL, _DEST_GENL,
                _SVC_IDENT_TEMPLATE, _DEST_FULL_HEAD, _masq_run(0), _DEST_FULL_TAIL[AF_INET], MAX_WEIGHT)

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


#: What NEW/SET_DEST messages of one service share (see ``_Batch.dest_service``).
_DestService = tuple[
    ServiceKey | None, int, bool, bytes, Callable[..., bytes], Callable[..., bytes], bytes, bytes
]
_NO_SERVICE: _DestService = (None, 0, False, b"", NLMSG_HDR.pack, NLMSG_HDR.pack, b"", b"")


class _Batch:
    """The Python encoder, for one ``Encoder.messages`` call: the messages so far,
    the refusals, and the message layouts built on the way (by service nest
    size, by settings size, by port), which the whole call shares."""

    def __init__(self, encoder: Encoder, family: int, flags: int) -> None:
        self.encoder = encoder
        self.family = family
        self.flags = flags
        self.out: list[bytes] = []
        self.refused: dict[int, str] = {}
        self.dest_layouts: dict[int, tuple[bytes, Callable[..., bytes], Callable[..., bytes]]] = {}
        self.service_layouts: dict[tuple[bool, int, int], tuple[bytes, bytes, Callable[..., bytes]]] = {}
        # A NAT server's PORT + FWD_METHOD + WEIGHT header, by port: a plan has few
        # distinct ports, and the lookup replaces a range check and to_bytes().
        self.masq_runs: dict[int, bytes] = {}
        #: The service of the last real-server operation (see dest_service).
        self.last: _DestService = _NO_SERVICE

    def encode(self, ops: list[Operation], i: int, seq: int, compiled: bool) -> tuple[int, int]:
        """Encode ``ops`` from ``i`` on, numbered from ``seq``; with ``compiled``,
        stop before the next operation (after the first) the compiled loop may
        take. Returns where it stopped and the next number. A NAT server with an
        IPv4 address in an IPv4 service (most of a large plan) is packed right
        here; any other, with its checks and refusals, through ``_dest_parts``."""
        out, refused, append = self.out, self.refused, self.out.append
        add, edit, add_svc, edit_svc = _ADD_DEST, _EDIT_DEST, _ADD_SVC, _EDIT_SVC
        masq, tail_v4, max_weight, af_inet, pton = Forward.MASQ, _DEST_FULL_TAIL[AF_INET], MAX_WEIGHT, AF_INET, socket.inet_pton
        masq_runs, parts, service_message = self.masq_runs, _dest_parts, self.service_message
        last_key, svc_family, inline_ok, lead, pack_v4, pack_any, new_prefix, set_prefix = self.last
        first, count = i, len(ops)
        while i < count:
            op = ops[i]
            kind = op.kind
            if compiled and i != first and (kind is add or kind is edit or kind is add_svc or kind is edit_svc):
                break
            i += 1
            try:
                if kind is add or kind is edit:
                    key = op.service
                    if key is not last_key:
                        self.last = self.dest_service(key)
                        last_key, svc_family, inline_ok, lead, pack_v4, pack_any, new_prefix, set_prefix = self.last
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
                elif kind is add_svc or kind is edit_svc:
                    message = service_message(op, kind is add_svc, seq)
                else:
                    message = self.other_message(op, seq)
            except EncodeError as exc:
                # Each earlier operation is either encoded or refused, so this is
                # its index: no enumerate() per operation for a rare case.
                refused[len(out) + len(refused)] = str(exc)
                continue
            append(message)
            seq += 1
        return i, seq

    def dest_service(self, key: ServiceKey) -> _DestService:
        """What NEW/SET_DEST messages in the service ``key`` share: the key, its
        family, whether its NAT servers may take the inline path (an IPv4
        service), the header's constant start and the two packs of
        ``_dest_message_layout``, and the NEW and SET prefixes (genl header,
        service nest, destination nest header, ADDR header)."""
        ident = self.encoder.ident(key)
        nest = ident.nest
        layout = self.dest_layouts.get(len(nest))
        if layout is None:
            layout = self.dest_layouts[len(nest)] = _dest_message_layout(len(nest), self.family, self.flags)
        lead, pack_v4, pack_any = layout
        nest_head = nest + _DEST_FULL_HEAD
        new_prefix, set_prefix = _DEST_GENL[0] + nest_head, _DEST_GENL[1] + nest_head
        return key, ident.family, ident.family == AF_INET, lead, pack_v4, pack_any, new_prefix, set_prefix

    def service_message(self, op: Operation, new: bool, seq: int) -> bytes:
        """A whole NEW_SERVICE (``new``) or SET_SERVICE message."""
        ident = self.encoder.ident(op.service)
        attrs = ident.attrs
        settings = self.encoder._service_settings(op, ident.family)
        layout_key = (new, len(attrs), len(settings))
        layout = self.service_layouts.get(layout_key)
        if layout is None:
            layout = self.service_layouts[layout_key] = _service_message_layout(*layout_key, self.family, self.flags)
        lead, head, pack = layout
        return pack(lead, seq, head, attrs, settings)

    def other_message(self, op: Operation, seq: int) -> bytes:
        """A DEL_SERVICE or DEL_DEST message (a kind the model does not have is
        encoded as SET_SERVICE, as it always was)."""
        kind = op.kind
        ident = self.encoder.ident(op.service)
        if kind is OpKind.DELETE_DESTINATION:
            dest = op.destination
            if dest is None:
                raise EncodeError(f"{kind.value} without a destination")
            af, addr = _packed_address(dest.address)
            body = (
                _GENL[IPVS_CMD_DEL_DEST]
                + ident.nest
                + _DEST_KEY.pack(_DEST_KEY_HEAD, addr, _PORT_HDR, _port_bytes(dest.port), _AF_ATTR[af])
            )
        elif kind is OpKind.DELETE_SERVICE:
            body = _GENL[IPVS_CMD_DEL_SERVICE] + ident.nest
        else:
            return self.service_message(op, False, seq)
        return NLMSG_HDR.pack(16 + len(body), self.family, self.flags, seq, 0) + body

    def result(self, count: int, renumber_from: int | None) -> tuple[list[bytes], list[int] | None, dict[int, str]]:
        """What ``Encoder.messages`` returns, messages renumbered from
        ``renumber_from`` when the batch wrapped the sequence numbers."""
        out, refused = self.out, self.refused
        if renumber_from is not None:
            out = [_renumbered(message, renumber_from + k) for k, message in enumerate(out)]
        if not refused:
            return out, None, refused
        return out, [k for k in range(count) if k not in refused], refused

def _port_bytes(port: int) -> bytes:
    if not 0 <= port <= 65535:
        raise EncodeError(f"port {port} out of range")
    return port.to_bytes(2, "big")


#: A service's AF, PROTOCOL, ADDR and PORT attributes, inside their nest: one pack
#: (the nest, then the attributes are its last 44 bytes). Headers are prebuilt, and
#: the format pads an IPv4 address to 16 bytes.
_SVC_IDENT = struct.Struct("=8sH2x4sH2x4s16s4s2s2x")
_SVC_IDENT_START = NLA_HDR.pack(_SVC_IDENT.size, IPVS_CMD_ATTR_SERVICE) + NLA_HDR.pack(6, IPVS_SVC_ATTR_AF)
_SVC_PROTOCOL_HDR = NLA_HDR.pack(6, IPVS_SVC_ATTR_PROTOCOL)
_SVC_ADDR_HDR = NLA_HDR.pack(20, IPVS_SVC_ATTR_ADDR)
_SVC_PORT_HDR = NLA_HDR.pack(6, IPVS_SVC_ATTR_PORT)
_TCP = Protocol.TCP
#: For the compiled service loop: the identity with zero values (without its nest
#: header), the protocols it may encode with their numbers, the genl headers.
_SVC_IDENT_TEMPLATE = _SVC_IDENT.pack(_SVC_IDENT_START, 0, _SVC_PROTOCOL_HDR, 0, _SVC_ADDR_HDR, b"", _SVC_PORT_HDR,
                                      b"\0\0")[4:]
_PROTOCOLS = tuple(PROTO_NUMBER)
_PROTOCOL_NUMBERS = tuple(PROTO_NUMBER.values())
_SVC_GENL = (_GENL[IPVS_CMD_NEW_SERVICE], _GENL[IPVS_CMD_SET_SERVICE])
_DEST_GENL = (_GENL[IPVS_CMD_NEW_DEST], _GENL[IPVS_CMD_SET_DEST])


def _make_ident(key: ServiceKey) -> _ServiceIdent:
    af, addr = _packed_address(key.address)
    if key.fwmark:
        if not 0 < key.fwmark < 2**32:
            raise EncodeError(f"fwmark {key.fwmark} out of range")
        attrs = U16_ATTR.pack(6, IPVS_SVC_ATTR_AF, af) + U32_ATTR.pack(8, IPVS_SVC_ATTR_FWMARK, key.fwmark)
        return _ServiceIdent(af, attrs, _nest(IPVS_CMD_ATTR_SERVICE, attrs))
    protocol = key.protocol
    # (An enum hashes in Python: the usual protocol is compared, not looked up.)
    number = socket.IPPROTO_TCP if protocol is _TCP else PROTO_NUMBER[protocol]
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
    head = _GENL[IPVS_CMD_NEW_SERVICE if new else IPVS_CMD_SET_SERVICE] + NLA_HDR.pack(
        4 + attrs_size + settings_size, IPVS_CMD_ATTR_SERVICE)
    return _NLMSG_LEAD.pack(layout.size, family, flags), head, layout.pack


def _service_settings(op: Operation, af: int) -> bytes:
    """SCHED_NAME, [PE_NAME], FLAGS, TIMEOUT, NETMASK for NEW/SET_SERVICE.

    Everything is always sent: SET_SERVICE replaces all of it (an absent PE_NAME
    clears the engine), so an edit states the whole desired service.
    """
    sched = op.scheduler
    if not NAME_RE.fullmatch(sched) or len(sched) >= IP_VS_SCHEDNAME_MAXLEN:
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
    netmask = V4_DEFAULT_MASK if af == AF_INET else struct.pack("=I", V6_DEFAULT_PLEN)
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
            if not NAME_RE.fullmatch(engine) or len(engine) >= IP_VS_PENAME_MAXLEN:
                raise EncodeError(f"bad persistence engine flag {flag!r}")
            pe = _nla(IPVS_SVC_ATTR_PE_NAME, engine.encode() + b"\0")
        elif flag == OPS_FLAG:
            if key.protocol is not Protocol.UDP and not key.fwmark:
                raise EncodeError("One-Packet Scheduling is only for UDP virtual services")
            flags |= IP_VS_SVC_F_ONEPACKET
        else:
            bit_sched = FLAG_BITS.get(flag)
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
        + U32_ATTR.pack(8, IPVS_SVC_ATTR_TIMEOUT, timeout)
        + _nla(IPVS_SVC_ATTR_NETMASK, netmask)
    )


def _netmask(text: str, af: int) -> bytes:
    if af == AF_INET:
        try:
            return socket.inet_pton(AF_INET, text)
        except (OSError, ValueError):
            raise EncodeError(f"bad IPv4 netmask {text!r}") from None
    if not text.isdigit() or not 1 <= int(text) <= 128:
        raise EncodeError(f"bad IPv6 netmask {text!r} (a prefix length 1..128)")
    return struct.pack("=I", int(text))
