"""The old import path of the netlink codec, kept so existing imports keep working.

The codec is now split by job: ``nlconst`` (numbers and shared layout),
``nlencode`` (operations -> requests), ``nldecode`` (replies -> model values) and
``nlerrors`` (error text). New code imports from those.
"""

from __future__ import annotations

from svcproxy.ipvs.nlconst import *  # noqa: F403
from svcproxy.ipvs.nldecode import (
    DecodedService,
    DecodeError,
    Message,
    address_text,
    decode_dest,
    decode_dest_datagram,
    decode_error,
    decode_family_id,
    decode_service,
    make_destination,
    walk,
)
from svcproxy.ipvs.nlencode import (
    COMPILED,
    GET_SERVICE_BODY,
    EncodeError,
    Encoder,
    family_request,
    frame,
    get_dests_request,
)
from svcproxy.ipvs.nlerrors import describe_error
from svcproxy.ipvs.rules import MAX_PERSISTENCE, MAX_WEIGHT, NETMASK_PREFIX, OPS_FLAG, PE_PREFIX

__all__ = [
    "COMPILED",
    "GET_SERVICE_BODY",
    "MAX_PERSISTENCE",
    "MAX_WEIGHT",
    "NETMASK_PREFIX",
    "OPS_FLAG",
    "PE_PREFIX",
    "DecodeError",
    "DecodedService",
    "EncodeError",
    "Encoder",
    "Message",
    "address_text",
    "decode_dest",
    "decode_dest_datagram",
    "decode_error",
    "decode_family_id",
    "decode_service",
    "describe_error",
    "family_request",
    "frame",
    "get_dests_request",
    "make_destination",
    "walk",
]
