"""What ipvsadm accepts, shared by both backends so a plan means the same to either.

The model has no fields for some service settings; both backends keep them as
flags with these names, and both refuse what ipvsadm refuses (its own limits come
from ipvsadm.c and were confirmed in the VM: ``-p 2678401`` and ``-w -1`` are
rejected before reaching the kernel).
"""

from __future__ import annotations

import re

__all__ = ["FLAG_RE", "MAX_PERSISTENCE", "MAX_WEIGHT", "NAME_RE", "NETMASK_PREFIX", "OPS_FLAG", "PE_PREFIX"]

MAX_PERSISTENCE = 86400 * 31
MAX_WEIGHT = 2**31 - 1

#: One-packet scheduling (``-o``).
OPS_FLAG = "ops"
#: A non-default persistence netmask: "netmask=255.255.255.0" or "netmask=64".
NETMASK_PREFIX = "netmask="
#: A persistence engine: "pe=sip".
PE_PREFIX = "pe="

#: A scheduler or persistence engine name.
NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
#: A scheduler flag name as ipvsadm prints it ("sh-port", "flag-3").
FLAG_RE = re.compile(r"[a-z0-9][a-z0-9-]*")
