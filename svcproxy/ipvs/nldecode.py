"""IPVS generic-netlink replies -> model values, with ``struct`` alone.

Why our own decoder: a full read decodes one message per service and one per
real server; pyroute2's general message classes are far too slow for that, and
the replies of current kernels have a fixed layout. So each kind of reply is
first tried with one precompiled unpack that also checks every attribute header
(``_DEST_FAST``, ``_SVC_FAST``); anything else (older or newer kernels, another
attribute order) takes a plain attribute walk, slower but complete. Nothing here
does I/O; ``netlink.py`` owns sockets.

Settings are named as the ipvsadm backend names them (see ``nlconst``), so both
backends read the same kernel table into equal ``Table`` values.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from typing import Callable, Iterator, NamedTuple

from svcproxy.ipvs.nlconst import (
    AF_INET,
    AF_INET6,
    CTRL_ATTR_FAMILY_ID,
    FWD_OF_NUMBER,
    GENERIC_FLAG_NAMES,
    IP_VS_CONN_F_FWD_MASK,
    IP_VS_SVC_F_ONEPACKET,
    IP_VS_SVC_F_PERSISTENT,
    IP_VS_SVC_F_SCHED1,
    IP_VS_SVC_F_SCHED2,
    IP_VS_SVC_F_SCHED3,
    IPVS_CMD_ATTR_DEST,
    IPVS_CMD_ATTR_SERVICE,
    IPVS_DEST_ATTR_ACTIVE_CONNS,
    IPVS_DEST_ATTR_ADDR,
    IPVS_DEST_ATTR_ADDR_FAMILY,
    IPVS_DEST_ATTR_FWD_METHOD,
    IPVS_DEST_ATTR_INACT_CONNS,
    IPVS_DEST_ATTR_L_THRESH,
    IPVS_DEST_ATTR_PERSIST_CONNS,
    IPVS_DEST_ATTR_PORT,
    IPVS_DEST_ATTR_TUN_FLAGS,
    IPVS_DEST_ATTR_TUN_PORT,
    IPVS_DEST_ATTR_TUN_TYPE,
    IPVS_DEST_ATTR_U_THRESH,
    IPVS_DEST_ATTR_WEIGHT,
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
    NLM_F_ACK_TLVS,
    NLM_F_CAPPED,
    NLMSG_DONE,
    NLMSG_ERROR,
    NLMSG_HDR,
    NLMSGERR_ATTR_MSG,
    PROTO_OF_NUMBER,
    SCHED_BITS,
    SCHED_FLAG_NAMES,
    V4_DEFAULT_MASK,
    V6_DEFAULT_PLEN,
)
from svcproxy.ipvs.rules import NETMASK_PREFIX, OPS_FLAG, PE_PREFIX
from svcproxy.model import Destination, Forward, Protocol, ServiceKey, VirtualService

__all__ = [
    "DecodeError",
    "DecodedService",
    "Message",
    "address_text",
    "decode_dest",
    "decode_dest_datagram",
    "decode_error",
    "decode_family_id",
    "decode_service",
    "make_destination",
    "walk",
]

_ERR = struct.Struct("=i")


class DecodeError(ValueError):
    """Bytes from the kernel that are not what this codec understands."""


def _hdr_word(length: int, atype: int) -> int:
    """An nlattr header read as one native u32 (for comparing layouts in one go)."""
    value: int = struct.unpack("=I", NLA_HDR.pack(length, atype))[0]
    return value


# --------------------------------------------------------------------------------------
# messages and attributes

class Message(NamedTuple):
    """Where one netlink message sits in a received buffer (a tuple: a read makes
    one per real server, and a frozen dataclass is much costlier to make)."""

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
    unpack = NLA_HDR.unpack_from
    while off + 4 <= end:
        length, atype = unpack(data, off)
        if length < 4 or off + length > end:
            raise DecodeError(f"bad attribute length {length} at offset {off}")
        yield atype & 0x3FFF, off + 4, off + length
        off += (length + 3) & ~3


def address_text(family: int, raw: bytes) -> str:
    """Canonical text (the model's ``ipaddress`` compressed form) of a 16-byte address."""
    if family == AF_INET:
        return socket.inet_ntop(AF_INET, raw[:4])
    if family != AF_INET6:
        raise DecodeError(f"unknown address family {family}")
    text = socket.inet_ntop(AF_INET6, raw)
    # inet_ntop agrees with ipaddress except for the dotted forms (::ffff:10.0.0.1).
    return ipaddress.IPv6Address(raw).compressed if "." in text else text


def _nested(data: bytes, msg: Message, want: int) -> tuple[int, int]:
    """Payload bounds of the top-level attribute ``want`` of a generic-netlink message."""
    for atype, start, end in _attrs(data, msg.start + 4, msg.end):
        if atype == want:
            return start, end
    raise DecodeError(f"message without attribute {want}")



# --------------------------------------------------------------------------------------
# real servers

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

    A frozen dataclass sets each field through object.__setattr__, a large part
    of decoding one real server, and a read makes one per real server. Filling
    the instance dict directly gives the very same object (equality, hash and
    repr come from the fields) much faster. If the model ever changes shape
    (slots, __post_init__, other fields) the plain class is used.
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
    and no intermediate objects (a read decodes one per real server); anything else
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
    fwds = FWD_OF_NUMBER
    make = make_destination
    ntop = socket.inet_ntop
    af_inet = AF_INET
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
    if msg.end - start >= _DEST_FAST.size and NLA_HDR.unpack_from(data, msg.start + 4)[1] & 0x3FFF == (
        IPVS_CMD_ATTR_DEST
    ):
        t = _DEST_FAST.unpack_from(data, start)
        if t[0::2] == _DEST_FAST_HDRS:
            fwd = FWD_OF_NUMBER.get(t[5] & IP_VS_CONN_F_FWD_MASK)
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
    if len(raw) != 16 and not (len(raw) == 4 and family == AF_INET):
        raise DecodeError("destination without an address")
    fwd = FWD_OF_NUMBER.get(fwd_number & IP_VS_CONN_F_FWD_MASK)
    if fwd is None:
        raise DecodeError(f"unknown forwarding method {fwd_number}")
    return make_destination(address_text(family, raw), port, weight, fwd, active, inactive)



# --------------------------------------------------------------------------------------
# services

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

    ``settings`` caches decoded settings for the caller (a read decodes every
    service, and services share a handful of settings)."""
    start, end = _nested(data, msg, IPVS_CMD_ATTR_SERVICE)
    ident = b""
    sched: str | None = None
    if end - start >= _SVC_FAST.size:
        t = _SVC_FAST.unpack_from(data, start)
        if t[0::2] == _SVC_FAST_HDRS:
            off = start + _SVC_FAST.size
            ident = data[start:off]
            # The kernel's usual order next: SCHED_NAME, then (no PE_NAME) FLAGS,
            # TIMEOUT, NETMASK in one unpack; anything else takes _service_attrs.
            if off + 4 <= end:
                length, atype = NLA_HDR.unpack_from(data, off)
                after = off + ((length + 3) & ~3)
                if atype == IPVS_SVC_ATTR_SCHED_NAME and length > 4 and after + _SVC_TAIL.size <= end:
                    u = _SVC_TAIL.unpack_from(data, after)
                    if (u[0], u[2], u[4]) == _SVC_TAIL_HDRS:
                        sched = data[off + 4 : off + length].split(b"\0", 1)[0].decode()
                        family, protocol, raw, port, fwmark = t[1], t[3], t[5], int.from_bytes(t[7], "big"), 0
                        flags, timeout, netmask, pe = u[1], u[3], u[5], ""
    if sched is None:
        family, protocol, raw, port, fwmark, sched, flags, timeout, netmask, pe = _service_attrs(data, start, end)
    key = _service_key(family, protocol, raw, port, fwmark)
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


def _service_attrs(data: bytes, start: int, end: int) -> tuple[int, int, bytes, int, int, str, int, int, bytes, str]:
    """(family, protocol, address, port, fwmark, scheduler, flags, timeout, netmask,
    persistence engine) of a service nest in any attribute order, any subset."""
    family = protocol = port = fwmark = flags = timeout = 0
    raw = netmask = b""
    sched = pe = ""
    for atype, a, b in _attrs(data, start, end):
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
    return family, protocol, raw, port, fwmark, sched, flags, timeout, netmask, pe


def _service_key(family: int, protocol: int, raw: bytes, port: int, fwmark: int) -> ServiceKey:
    if family not in (AF_INET, AF_INET6):
        raise DecodeError(f"service with unknown address family {family}")
    if fwmark:
        return ServiceKey(Protocol.TCP, "::" if family == AF_INET6 else "0.0.0.0", 0, fwmark)
    proto = PROTO_OF_NUMBER.get(protocol)
    if proto is None:
        raise DecodeError(f"service with unknown protocol {protocol}")
    if len(raw) != 16 and not (len(raw) == 4 and family == AF_INET):
        raise DecodeError("service without an address")
    return ServiceKey(proto, address_text(family, raw), port)


def _settings(
    sched: str, flags: int, timeout: int, netmask: bytes, pe: str, family: int
) -> tuple[int | None, frozenset[str]]:
    """(persistence, flags) in the ipvsadm backend's vocabulary."""
    names: list[str] = []
    persistence: int | None = None
    if flags & IP_VS_SVC_F_PERSISTENT:
        persistence = timeout
        if len(netmask) == 4:
            if family == AF_INET:
                if netmask != V4_DEFAULT_MASK:
                    names.append(NETMASK_PREFIX + socket.inet_ntop(AF_INET, netmask))
            else:
                plen = struct.unpack("=I", netmask)[0]
                if plen != V6_DEFAULT_PLEN:
                    names.append(f"{NETMASK_PREFIX}{plen}")
    if flags & IP_VS_SVC_F_ONEPACKET:
        names.append(OPS_FLAG)
    if flags & (IP_VS_SVC_F_SCHED1 | IP_VS_SVC_F_SCHED2 | IP_VS_SVC_F_SCHED3):
        labels = SCHED_FLAG_NAMES.get(sched, GENERIC_FLAG_NAMES)
        names.extend(label for bit, label in zip(SCHED_BITS, labels) if flags & bit)
    if pe:
        names.append(PE_PREFIX + pe)
    return persistence, frozenset(names)
