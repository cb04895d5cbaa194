"""Log output: plain text lines, or JSON lines (``--logging-format``, kube-proxy's flag).

A log pipeline (Loki, Elasticsearch, Cloud Logging) reads JSON lines without a
parser of its own: each record is one object with ``time`` (RFC 3339, UTC),
``level``, ``logger`` and ``message``, the exception's traceback under ``error``
when there is one, and, where a record is about one Kubernetes object, that object
as data: ``object`` (``namespace/name``, or ``name`` for a cluster-scoped one) and
``kind``. Code says which object a record is about with ``about(...)`` as the
logging call's ``extra``; the text format prints the message alone, as before.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from types import TracebackType
from typing import Any, TextIO

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

#: Problem/message prefixes naming an object (``Service ns/name``), as
#: ``svcproxy.kube.objects.display_name`` writes them.
_KINDS = ("Service", "EndpointSlice", "Node", "Pod")


def about(kind: str, namespace: str | None, name: str) -> dict[str, Any]:
    """``extra=`` for a record about one object."""
    return {"k8s_object": name if not namespace else f"{namespace}/{name}", "k8s_kind": kind}


def about_display_name(text: str) -> dict[str, Any]:
    """``extra=`` from a display name like ``Service ns/name``; empty when the text
    names no object (then the record has no ``object`` field)."""
    kind, _, rest = text.partition(" ")
    if kind not in _KINDS or not rest or " " in rest or "<unnamed>" in rest:
        return {}
    return {"k8s_object": rest, "k8s_kind": kind}


class JsonFormatter(logging.Formatter):
    """One JSON object per line; non-ASCII kept as is, newlines escaped."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": _rfc3339(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        obj = getattr(record, "k8s_object", None)
        if obj:
            doc["object"] = obj
            doc["kind"] = getattr(record, "k8s_kind", None)
        if record.exc_info:
            doc["error"] = self.formatException(record.exc_info)
        elif record.stack_info:
            doc["error"] = self.formatStack(record.stack_info)
        return json.dumps(doc, ensure_ascii=False, default=str)


def _rfc3339(created: float) -> str:
    seconds = int(created)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{int((created - seconds) * 1000):03d}Z"


def setup(fmt: str, *, verbose: bool, stream: TextIO) -> None:
    """Configure the root logger as ``logging.basicConfig`` does: not at all when the
    process already has handlers (an embedding program's, or pytest's)."""
    if fmt not in FORMATS:
        raise ValueError(f"--logging-format: {fmt!r} is not one of {', '.join(FORMATS)}")
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])
    if fmt == "json" and handler in logging.getLogger().handlers:
        sys.excepthook = _uncaught
        threading.excepthook = _uncaught_in_thread


def _uncaught(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    """Python prints an uncaught exception's traceback as raw lines; in the JSON format
    it becomes one record (the traceback under ``error``) like every other line."""
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, exc, tb)
        return
    logging.getLogger("svcproxy").critical("uncaught %s: %s", kind.__name__, exc, exc_info=(kind, exc, tb))


def _uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit or args.exc_value is None:
        return
    logging.getLogger("svcproxy").critical(
        "uncaught %s in thread %s: %s", args.exc_type.__name__, args.thread.name if args.thread else "?",
        args.exc_value, exc_info=(args.exc_type, args.exc_value, args.exc_traceback))


def fatal_line(fmt: str, message: str) -> str:
    """The line a command ends with when it fails: ``svcproxy: error: ...`` as text, one
    JSON object (level ``error``) in the JSON format, so that the last, most important
    line of a failed start is not the one a log pipeline cannot read."""
    if fmt != "json":
        return f"svcproxy: error: {message}\n"
    record = logging.LogRecord("svcproxy", logging.ERROR, __file__, 0, "%s", (message,), None)
    return JsonFormatter().format(record) + "\n"
