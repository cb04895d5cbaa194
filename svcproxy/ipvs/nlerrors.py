"""Readable text for the errors the kernel answers IPVS requests with.

Why ipvsadm's words: they are what operators know and search for, and the ipvsadm
backend reports the same failures in them, so a failed operation reads the same
whichever backend ran it. The errno name is added for the rest.
"""

from __future__ import annotations

import errno
import os

from svcproxy.model import OpKind

__all__ = ["describe_error"]

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
