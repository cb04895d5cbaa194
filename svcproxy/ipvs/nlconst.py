"""The IPVS generic-netlink protocol's numbers and shared attribute layout.

Why a module of its own: the encoder (``nlencode``) and the decoder (``nldecode``)
must agree on every number and header, and the compiled loop (``_nlfast.c``)
gets its constant parts from the encoder, which builds them from these.
Numbers are from include/uapi/linux/netlink.h, genetlink.h and ip_vs.h.

Names of settings follow the ipvsadm backend exactly (``svcproxy.ipvs.rules``):
scheduler flags are named by scheduler the way ``ipvsadm -Sn`` prints them
("sh-fallback"/"sh-port" for sh, "mh-*" for mh, "flag-N" otherwise, "flag-3" for
all), one-packet scheduling is "ops", a non-default persistence netmask is
"netmask=255.255.255.0" or "netmask=64" (only shown for persistent services, as
ipvsadm does), a persistence engine is "pe=sip". So both backends read the same
kernel table into equal ``Table`` values.
"""

from __future__ import annotations

import socket
import struct

from svcproxy.model import Forward, Protocol

# --------------------------------------------------------------------------------------
# numbers

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

PROTO_NUMBER = {Protocol.TCP: socket.IPPROTO_TCP, Protocol.UDP: socket.IPPROTO_UDP, Protocol.SCTP: 132}
PROTO_OF_NUMBER = {number: proto for proto, number in PROTO_NUMBER.items()}
FWD_NUMBER = {Forward.MASQ: IP_VS_CONN_F_MASQ, Forward.TUNNEL: IP_VS_CONN_F_TUNNEL, Forward.ROUTE: IP_VS_CONN_F_DROUTE}
#: LOCALNODE is what kernels before 2.6.37 reported for a masq server with a local
#: address; ipvsadm -Sn prints it as -m too.
FWD_OF_NUMBER = {
    IP_VS_CONN_F_MASQ: Forward.MASQ,
    IP_VS_CONN_F_LOCALNODE: Forward.MASQ,
    IP_VS_CONN_F_TUNNEL: Forward.TUNNEL,
    IP_VS_CONN_F_DROUTE: Forward.ROUTE,
}

#: Scheduler flag names by bit, as ipvsadm 1.31 prints them for each scheduler.
SCHED_FLAG_NAMES: dict[str, tuple[str, str, str]] = {
    "sh": ("sh-fallback", "sh-port", "flag-3"),
    "mh": ("mh-fallback", "mh-port", "flag-3"),
}
GENERIC_FLAG_NAMES = ("flag-1", "flag-2", "flag-3")
SCHED_BITS = (IP_VS_SVC_F_SCHED1, IP_VS_SVC_F_SCHED2, IP_VS_SVC_F_SCHED3)
#: What ipvsadm accepts after -b, and the scheduler a name is tied to (None: any).
FLAG_BITS: dict[str, tuple[int, str | None]] = {
    "flag-1": (IP_VS_SVC_F_SCHED1, None),
    "flag-2": (IP_VS_SVC_F_SCHED2, None),
    "flag-3": (IP_VS_SVC_F_SCHED3, None),
    "sh-fallback": (IP_VS_SVC_F_SCHED1, "sh"),
    "sh-port": (IP_VS_SVC_F_SCHED2, "sh"),
    "mh-fallback": (IP_VS_SVC_F_SCHED1, "mh"),
    "mh-port": (IP_VS_SVC_F_SCHED2, "mh"),
}

V4_DEFAULT_MASK = b"\xff\xff\xff\xff"
V6_DEFAULT_PLEN = 128
AF_INET = int(socket.AF_INET)
AF_INET6 = int(socket.AF_INET6)

# --------------------------------------------------------------------------------------
# layout

NLMSG_HDR = struct.Struct("=IHHII")  # length, type, flags, seq, port id
NLA_HDR = struct.Struct("=HH")
U16_ATTR = struct.Struct("=HHH2x")
U32_ATTR = struct.Struct("=HHI")
GENL_HDR = struct.Struct("=BBH")
