"""A protocol-faithful fake kube-apiserver for Services, EndpointSlices and Nodes.

No real apiserver can run in the test environment, so the watcher is tested against
this one: real HTTP/1.1 on loopback, driven by the official ``kubernetes`` client
through an ordinary kubeconfig. What it reproduces is what a list+watch client depends
on, following https://kubernetes.io/docs/reference/using-api/api-concepts/:

* objects with real metadata (uid, resourceVersion, creationTimestamp, generation,
  managedFields) under one global, monotonically increasing resourceVersion;
* lists with label selectors (``k``, ``!k``, ``k=v``, ``k==v``, ``k!=v``, ``k in (..)``,
  ``k notin (..)``), field selectors on metadata.name/namespace, ``limit`` +
  ``continue`` pagination over a consistent snapshot, items without kind/apiVersion;
* watches as chunked JSON lines replayed from a bounded history after the requested
  resourceVersion, synthetic ADDED events when starting from ``""``/``"0"``, label
  transitions turned into ADDED/DELETED like the watch cache does, BOOKMARKs only when
  ``allowWatchBookmarks`` is set, 410 "Expired" as an ERROR event (or, on demand, as an
  HTTP 410), and the stream closed cleanly after ``timeoutSeconds``;
* Status bodies for every error.

Faults are injected on demand: drop open watch streams, fail the next N requests,
stall (streams open at that moment go silent for good, new requests hang for a while),
go down (listening socket closed, connections reset) and come back on the same port,
compact the history, expire continue tokens, and inject malformed events or list items.

Standalone (for VM tests or by hand)::

    python tests/fakeapi.py --port 0 --state cluster.yaml [--kubeconfig PATH]

prints ``URL=...`` and ``KUBECONFIG=...``, serves until interrupted, and re-applies the
state file whenever it changes (objects missing from it are deleted). Faults can then be
injected over HTTP: ``POST /fake/ACTION`` with ACTION one of drop, fail?n=&status=,
stall?seconds=, down?seconds=, compact, bookmark, expire, watch410?mode=event|http,
apply (JSON object or List body), delete?kind=&namespace=&name=, requests, token?value=.
"""

from __future__ import annotations

import argparse
import base64
import bisect
import itertools
import json
import os
import re
import signal
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence
from urllib.parse import parse_qs, urlsplit

JSON = dict[str, Any]


@dataclass(frozen=True)
class Resource:
    plural: str
    kind: str
    api_version: str
    prefix: str  # URL prefix of the group version
    namespaced: bool


RESOURCES: dict[str, Resource] = {
    r.plural: r
    for r in (
        Resource("services", "Service", "v1", "/api/v1", True),
        Resource("endpointslices", "EndpointSlice", "discovery.k8s.io/v1", "/apis/discovery.k8s.io/v1", True),
        Resource("nodes", "Node", "v1", "/api/v1", False),
    )
}
_BY_NAME: dict[str, Resource] = {}
for _r in RESOURCES.values():
    for _alias in (_r.plural, _r.kind, _r.kind.lower(), _r.plural[:-1]):
        _BY_NAME[_alias.lower()] = _r


def resource_of(kind: str) -> Resource:
    """Accepts "Service", "services", "endpointslice", ... (and the svcproxy Kind values)."""
    try:
        return _BY_NAME[str(getattr(kind, "value", kind)).lower()]
    except KeyError:
        raise ValueError(f"unknown kind {kind!r}") from None


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def copy_json(value: Any) -> Any:
    """A deep copy of a JSON value (dicts, lists, scalars; tuples become lists and other
    mappings dicts, as they would through JSON): what the store keeps apart from its
    callers, several times cheaper than ``copy.deepcopy``, which dominated a write."""
    t = type(value)
    if t in _SCALARS:
        return value
    if t is dict:
        return {k: copy_json(v) for k, v in value.items()}
    if t is list or t is tuple:
        return [copy_json(v) for v in value]
    if isinstance(value, Mapping):
        return {k: copy_json(v) for k, v in value.items()}
    return value


_SCALARS = frozenset({str, int, float, bool, type(None)})


def status_body(code: int, reason: str, message: str, **extra: Any) -> JSON:
    body: JSON = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                  "message": message, "reason": reason, "code": code}
    body.update(extra)
    return body


# --------------------------------------------------------------------------- selectors


class SelectorError(ValueError):
    pass


def _split_requirements(text: str) -> list[str]:
    parts: list[str] = []
    cur: list[str] = []
    depth = 0
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


_SET_RE = re.compile(r"^([\w./-]+)\s+(in|notin)\s+\(([^)]*)\)$")
_KEY_RE = re.compile(r"^[\w./-]+$")


def _label_check(key: str, op: str, values: frozenset[str]) -> Callable[[Mapping[str, str]], bool]:
    def check(labels: Mapping[str, str]) -> bool:
        if op == "exists":
            return key in labels
        if op == "!":
            return key not in labels
        if op in ("=", "==", "in"):
            return labels.get(key) in values
        return labels.get(key) not in values  # "!=" and "notin" also match a missing key

    return check


def label_matcher(selector: str | None) -> Callable[[Mapping[str, str]], bool]:
    """Compile a label selector into a predicate over a labels dict."""
    checks: list[Callable[[Mapping[str, str]], bool]] = []
    for req in _split_requirements(selector or ""):
        m = _SET_RE.match(req)
        if m:
            values = frozenset(v.strip() for v in m.group(3).split(",") if v.strip())
            checks.append(_label_check(m.group(1), m.group(2), values))
            continue
        for op in ("!=", "==", "="):
            if op in req:
                key, _, value = (part.strip() for part in req.partition(op))
                if not _KEY_RE.match(key):
                    raise SelectorError(f"invalid label key {key!r}")
                checks.append(_label_check(key, op, frozenset({value})))
                break
        else:
            if req.startswith("!") and _KEY_RE.match(req[1:].strip()):
                checks.append(_label_check(req[1:].strip(), "!", frozenset()))
            elif _KEY_RE.match(req):
                checks.append(_label_check(req, "exists", frozenset()))
            else:
                raise SelectorError(f"unable to parse requirement: {req!r}")
    return lambda labels: all(c(labels) for c in checks)


def _field_check(attr: str, op: str, value: str) -> Callable[[Mapping[str, Any]], bool]:
    def check(obj: Mapping[str, Any]) -> bool:
        actual = (obj.get("metadata") or {}).get(attr, "")
        return bool(actual != value) if op == "!=" else bool(actual == value)

    return check


def field_matcher(selector: str | None) -> Callable[[Mapping[str, Any]], bool]:
    """metadata.name / metadata.namespace with =, ==, != (what the apiserver indexes for all kinds)."""
    checks: list[Callable[[Mapping[str, Any]], bool]] = []
    for req in _split_requirements(selector or ""):
        for op in ("!=", "==", "="):
            if op in req:
                path, _, value = (part.strip() for part in req.partition(op))
                break
        else:
            raise SelectorError(f"invalid field selector requirement {req!r}")
        if path not in ("metadata.name", "metadata.namespace"):
            raise SelectorError(f"field label not supported: {path}")
        checks.append(_field_check(path.split(".")[1], op, value))
    return lambda obj: all(c(obj) for c in checks)


@dataclass
class Query:
    """What a list or watch request asks for."""

    resource: Resource
    namespace: str | None
    labels: Callable[[Mapping[str, str]], bool]
    fields: Callable[[Mapping[str, Any]], bool]

    def matches(self, obj: Mapping[str, Any]) -> bool:
        meta = obj.get("metadata", {})
        if self.namespace is not None and meta.get("namespace") != self.namespace:
            return False
        return self.labels(meta.get("labels") or {}) and self.fields(obj)


# --------------------------------------------------------------------------- state


@dataclass(frozen=True)
class Change:
    """One history entry: a write, or a raw line injected for all watchers of a resource."""

    rv: int
    plural: str
    type: str
    obj: Any
    old: Any = None  # previous object for MODIFIED (label transitions)
    raw: bytes | None = None
    #: The encoded event lines, by event type: encoded once, sent to every watcher.
    lines: dict[str, bytes] = field(default_factory=dict, compare=False)

    def line(self, type_: str) -> bytes:
        out = self.lines.get(type_)
        if out is None:
            out = self.lines[type_] = _event_line(type_, self.obj)
        return out


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    time: float

    @property
    def watch(self) -> bool:
        return self.query.get("watch", "").lower() in ("1", "true")


@dataclass
class _Snapshot:
    rv: int
    items: list[tuple[tuple[str, str], JSON]]


@dataclass
class State:
    """Everything that survives the server going down and coming back."""

    history_limit: int = 10_000
    rv: int = 100
    floor: int = 100  # a watch from rv < floor gets 410
    objects: dict[tuple[str, str, str], JSON] = field(default_factory=dict)
    history: list[Change] = field(default_factory=list)
    snapshots: "OrderedDict[int, _Snapshot]" = field(default_factory=OrderedDict)
    extra_list_items: dict[str, list[Any]] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    fail_remaining: int = 0
    fail_status: int = 500
    stall_until: float = 0.0
    stall_seq: int = 0
    drop_seq: int = 0
    bookmark_seq: int = 0
    watch_410: str = "event"  # or "http"
    cond: threading.Condition = field(default_factory=threading.Condition)
    snapshot_ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))


class FakeApiServer:
    """The fake apiserver: state plus a listener that can go down and come back."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, history_limit: int = 10_000,
                 bookmark_interval: float | None = None, token: str | None = "fake-token",
                 default_watch_timeout: int = 1800) -> None:
        self.host = host
        self.state = State(history_limit=history_limit)
        self.bookmark_interval = bookmark_interval
        self.token = token
        self.default_watch_timeout = default_watch_timeout
        self._port = port
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._life = threading.Lock()
        self._down_timer: threading.Timer | None = None
        #: Called with every API request (in the handler thread) before it is served:
        #: lets a test act at an exact protocol step, e.g. between two list pages.
        self.before_request: Callable[[Request], None] | None = None

    # ----- lifecycle

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self._port}"

    @property
    def is_up(self) -> bool:
        return self._httpd is not None

    def start(self) -> "FakeApiServer":
        self.up()
        return self

    def up(self) -> None:
        """Listen (again) on the same port."""
        with self._life:
            if self._httpd is not None:
                return
            httpd = _HTTPServer((self.host, self._port), _Handler, self)
            self._port = httpd.server_address[1]
            self._httpd = httpd
            self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                            name=f"fakeapi:{self._port}", daemon=True)
            self._thread.start()

    def down(self, seconds: float | None = None) -> None:
        """Close the listening socket and reset every connection; come back after ``seconds``."""
        with self._life:
            httpd, self._httpd = self._httpd, None
            if httpd is not None:
                httpd.closing = True
                with self.state.cond:
                    self.state.cond.notify_all()
                httpd.shutdown()
                httpd.server_close()
                httpd.reset_connections()
            if seconds is not None:
                self._down_timer = threading.Timer(seconds, self.up)
                self._down_timer.daemon = True
                self._down_timer.start()

    def stop(self) -> None:
        if self._down_timer is not None:
            self._down_timer.cancel()
        self.down()

    def __enter__(self) -> "FakeApiServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def write_kubeconfig(self, path: str | os.PathLike[str] | None = None) -> str:
        """A kubeconfig for this server (plain http, the dummy bearer token if one is set)."""
        if path is None:
            fd, name = tempfile.mkstemp(prefix="fakeapi-", suffix=".kubeconfig")
            os.close(fd)
            path = name
        user: JSON = {"token": self.token} if self.token else {}
        config = {
            "apiVersion": "v1", "kind": "Config", "preferences": {},
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": user}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
            "current-context": "fake",
        }
        Path(path).write_text(json.dumps(config, indent=2) + "\n")
        return str(path)

    # ----- objects

    def apply(self, source: Mapping[str, Any]) -> JSON:
        """Create or replace an object (by kind/namespace/name); returns the stored copy."""
        obj: JSON = copy_json(dict(source))
        res = resource_of(obj.get("kind", ""))
        obj["kind"], obj["apiVersion"] = res.kind, res.api_version
        meta = obj.setdefault("metadata", {})
        name = meta.get("name")
        if not name:
            raise ValueError("metadata.name is required")
        if res.namespaced:
            meta.setdefault("namespace", "default")
        else:
            meta.pop("namespace", None)
        key = (res.plural, meta.get("namespace", ""), name)
        st = self.state
        with st.cond:
            old = st.objects.get(key)
            st.rv += 1
            meta["resourceVersion"] = str(st.rv)
            if old is None:
                meta["uid"] = meta.get("uid") or str(uuid.uuid4())
                meta["creationTimestamp"] = meta.get("creationTimestamp") or _now()
                meta["generation"] = 1
            else:
                om = old["metadata"]
                meta["uid"], meta["creationTimestamp"] = om["uid"], om["creationTimestamp"]
                changed = {k: v for k, v in obj.items() if k not in ("metadata", "status")} != \
                          {k: v for k, v in old.items() if k not in ("metadata", "status")}
                meta["generation"] = om.get("generation", 1) + (1 if changed else 0)
            meta["managedFields"] = [{
                "manager": "fakeapi", "operation": "Update" if old else "Apply", "apiVersion": res.api_version,
                "time": _now(), "fieldsType": "FieldsV1", "fieldsV1": {"f:metadata": {"f:labels": {}}},
            }]
            if res.kind == "Service":
                obj.setdefault("status", {"loadBalancer": {}})
            elif res.kind == "Node":
                obj.setdefault("status", {"conditions": [], "addresses": []})
            st.objects[key] = obj
            self._record(Change(st.rv, res.plural, "MODIFIED" if old else "ADDED", obj, old))
            return copy_json(obj)

    def delete(self, kind: str, namespace: str | None, name: str) -> JSON | None:
        """Delete an object; the DELETED event carries the deletion's resourceVersion."""
        res = resource_of(kind)
        key = (res.plural, (namespace or "default") if res.namespaced else "", name)
        st = self.state
        with st.cond:
            old = st.objects.pop(key, None)
            if old is None:
                return None
            st.rv += 1
            final = copy_json(old)
            final["metadata"]["resourceVersion"] = str(st.rv)
            self._record(Change(st.rv, res.plural, "DELETED", final, old))
            return copy_json(final)

    def get(self, kind: str, namespace: str | None, name: str) -> JSON | None:
        res = resource_of(kind)
        key = (res.plural, (namespace or "default") if res.namespaced else "", name)
        with self.state.cond:
            obj = self.state.objects.get(key)
            return copy_json(obj) if obj is not None else None

    def objects(self, kind: str) -> list[JSON]:
        res = resource_of(kind)
        with self.state.cond:
            return [copy_json(o) for (p, _, _), o in sorted(self.state.objects.items()) if p == res.plural]

    @property
    def resource_version(self) -> str:
        with self.state.cond:
            return str(self.state.rv)

    def _record(self, change: Change) -> None:
        st = self.state
        st.history.append(change)
        excess = len(st.history) - st.history_limit
        if excess > 0:
            st.floor = st.history[excess - 1].rv
            del st.history[:excess]
        st.cond.notify_all()

    # ----- fault injection

    def drop_watches(self) -> None:
        """Reset every open watch stream mid-chunk (no terminating chunk), like a dying LB."""
        with self.state.cond:
            self.state.drop_seq += 1
            self.state.cond.notify_all()

    def fail_next(self, n: int, status: int = 500) -> None:
        """Answer the next ``n`` API requests with ``status`` and a Status body."""
        with self.state.cond:
            self.state.fail_remaining, self.state.fail_status = n, status

    def stall(self, seconds: float) -> None:
        """Streams open now never send another byte; new requests hang for ``seconds``."""
        with self.state.cond:
            self.state.stall_seq += 1
            self.state.stall_until = time.monotonic() + seconds
            self.state.cond.notify_all()

    def compact(self) -> None:
        """Forget all history: a watch from any older resourceVersion gets 410, and
        continue tokens of older snapshots expire (as etcd compaction does)."""
        with self.state.cond:
            self.state.history.clear()
            self.state.floor = self.state.rv
            for sid in [s for s, snap in self.state.snapshots.items() if snap.rv < self.state.floor]:
                del self.state.snapshots[sid]
            self.state.cond.notify_all()

    def expire_continue_tokens(self) -> None:
        with self.state.cond:
            self.state.snapshots.clear()

    def bookmark(self) -> None:
        """Send a BOOKMARK now on every open watch that allows bookmarks."""
        with self.state.cond:
            self.state.bookmark_seq += 1
            self.state.cond.notify_all()

    def set_watch_410(self, mode: str) -> None:
        """How a too-old watch resourceVersion is refused: "event" (ERROR event) or "http"."""
        if mode not in ("event", "http"):
            raise ValueError(mode)
        with self.state.cond:
            self.state.watch_410 = mode

    def inject_watch_line(self, kind: str, line: bytes | Any) -> None:
        """Send one raw line (bytes) or event (anything JSON-able) to every watcher of ``kind``."""
        raw = line if isinstance(line, bytes) else json.dumps(line).encode()
        with self.state.cond:
            self.state.rv += 1
            self._record(Change(self.state.rv, resource_of(kind).plural, "RAW", None, raw=raw))

    def inject_list_item(self, kind: str, item: Any) -> None:
        """Return ``item`` verbatim in the first page of every list of ``kind``."""
        with self.state.cond:
            self.state.extra_list_items.setdefault(resource_of(kind).plural, []).append(item)

    # ----- introspection

    def requests(self, *, path: str | None = None, watch: bool | None = None) -> list[Request]:
        with self.state.cond:
            reqs = list(self.state.requests)
        return [r for r in reqs if (path is None or path in r.path) and (watch is None or r.watch == watch)]

    def open_watches(self) -> int:
        httpd = self._httpd
        return httpd.open_watches if httpd is not None else 0

    # ----- request handling (called from handler threads)

    def _list(self, q: Query, params: dict[str, str]) -> tuple[int, JSON]:
        st = self.state
        limit = int(params.get("limit") or 0)
        token = params.get("continue")
        with st.cond:
            if token:
                try:
                    decoded = json.loads(base64.urlsafe_b64decode(token.encode()))
                    sid, start = int(decoded["id"]), int(decoded["start"])
                except (ValueError, KeyError, TypeError):
                    return 400, status_body(400, "BadRequest", "continue key is not valid")
                snap = st.snapshots.get(sid)
                if snap is None:
                    return 410, status_body(
                        410, "Expired",
                        "The provided continue parameter is too old to display a consistent list result. "
                        "You can start a new list without the continue parameter.")
                extra: list[Any] = []
            else:
                items = sorted(((k[1], k[2]), o) for k, o in st.objects.items()
                               if k[0] == q.resource.plural and q.matches(o))
                snap = _Snapshot(st.rv, items)
                sid, start = next(st.snapshot_ids), 0
                extra = list(st.extra_list_items.get(q.resource.plural, []))
            end = len(snap.items) if not limit else min(len(snap.items), start + limit)
            page = [_list_item(o) for _, o in snap.items[start:end]]
            meta: JSON = {"resourceVersion": str(snap.rv)}
            if end < len(snap.items):
                st.snapshots[sid] = snap
                while len(st.snapshots) > 64:
                    st.snapshots.popitem(last=False)
                meta["continue"] = base64.urlsafe_b64encode(
                    json.dumps({"id": sid, "start": end, "rv": snap.rv}).encode()).decode()
                meta["remainingItemCount"] = len(snap.items) - end
        return 200, {"kind": f"{q.resource.kind}List", "apiVersion": q.resource.api_version,
                     "metadata": meta, "items": extra + page}


def _list_item(obj: JSON) -> JSON:
    # The apiserver leaves kind/apiVersion out of list items.
    return {k: v for k, v in obj.items() if k not in ("kind", "apiVersion")}


def _event_line(type_: str, obj: Any) -> bytes:
    return json.dumps({"type": type_, "object": obj}, separators=(",", ":")).encode() + b"\n"


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(self, addr: tuple[str, int], handler: type[BaseHTTPRequestHandler], fake: FakeApiServer) -> None:
        self.fake = fake
        self.closing = False
        self.open_watches = 0
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        super().__init__(addr, handler)

    def track(self, sock: socket.socket, add: bool) -> None:
        with self._conns_lock:
            (self._conns.add if add else self._conns.discard)(sock)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hung up mid-response is routine here (timeouts, drops): stay quiet.
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)

    def count_watch(self, delta: int) -> None:
        with self._conns_lock:
            self.open_watches += delta

    def reset_connections(self) -> None:
        with self._conns_lock:
            conns = list(self._conns)
        for sock in conns:
            _abort(sock)


def _abort(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


_PATH_RE = re.compile(r"^(?P<prefix>/api/v1|/apis/discovery\.k8s\.io/v1)"
                      r"(?:/namespaces/(?P<ns>[^/]+))?/(?P<plural>[a-z]+)(?:/(?P<name>[^/]+))?/?$")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # else header and body writes meet delayed ACKs: 40 ms a request
    server: _HTTPServer
    server_version = "fakeapi/1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet by default
        if os.environ.get("FAKEAPI_DEBUG"):
            super().log_message(format, *args)

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection, True)

    def finish(self) -> None:
        self.server.track(self.connection, False)
        try:
            super().finish()
        except OSError:
            pass

    # ----- plumbing

    @property
    def fake(self) -> FakeApiServer:
        return self.server.fake

    def _send_json(self, code: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-cache, private")
        self.end_headers()
        self.wfile.write(data)

    def _send_status(self, code: int, reason: str, message: str) -> None:
        self._send_json(code, status_body(code, reason, message))

    def _read_body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        return json.loads(self.rfile.read(length) or b"null")

    def do_POST(self) -> None:
        url = urlsplit(self.path)
        if url.path.startswith("/fake/"):
            self._control(url.path[len("/fake/"):], {k: v[-1] for k, v in parse_qs(url.query).items()})
        else:
            self._send_status(405, "MethodNotAllowed", "the fake only serves reads (use /fake/apply)")

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        params = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        fake, st = self.fake, self.fake.state
        if url.path.startswith("/fake/"):
            self._control(url.path[len("/fake/"):], params)
            return
        request = Request("GET", url.path, params, time.monotonic())
        with st.cond:
            st.requests.append(request)
        if fake.before_request is not None:
            fake.before_request(request)
        # Stall: accept, read the request, send nothing for a while.
        while time.monotonic() < st.stall_until and not self.server.closing:
            time.sleep(0.02)
        if self.server.closing:
            _abort(self.connection)
            return
        with st.cond:
            failing = st.fail_remaining > 0
            if failing:
                st.fail_remaining -= 1
        if failing:
            code = st.fail_status
            reason = {500: "InternalError", 503: "ServiceUnavailable", 429: "TooManyRequests"}.get(code, "Unknown")
            self._send_status(code, reason, f"fake: injected failure {code}")
            return
        if url.path == "/version":
            self._send_json(200, {"major": "1", "minor": "31", "gitVersion": "v1.31.0-fakeapi",
                                  "platform": "linux/amd64"})
            return
        if fake.token and self.headers.get("Authorization") != f"Bearer {fake.token}":
            self._send_status(401, "Unauthorized", "Unauthorized")
            return
        if url.path in ("/api", "/apis", "/healthz", "/livez", "/readyz"):
            body: Any = {"kind": "APIVersions", "versions": ["v1"]} if url.path == "/api" else \
                {"kind": "APIGroupList", "apiVersion": "v1", "groups": [{"name": "discovery.k8s.io", "versions": [
                    {"groupVersion": "discovery.k8s.io/v1", "version": "v1"}]}]} if url.path == "/apis" else "ok"
            self._send_json(200, body)
            return
        m = _PATH_RE.match(url.path)
        res = RESOURCES.get(m.group("plural")) if m else None
        if m is None or res is None or res.prefix != m.group("prefix") or (m.group("ns") and not res.namespaced):
            self._send_status(404, "NotFound", f"the server could not find the requested resource ({url.path})")
            return
        try:
            q = Query(res, m.group("ns"), label_matcher(params.get("labelSelector")),
                      field_matcher(params.get("fieldSelector")))
        except SelectorError as e:
            self._send_status(400, "BadRequest", str(e))
            return
        if m.group("name"):
            obj = fake.get(res.plural, m.group("ns"), m.group("name"))
            if obj is None:
                self._send_status(404, "NotFound", f'{res.plural} "{m.group("name")}" not found')
            else:
                self._send_json(200, obj)
            return
        if params.get("watch", "").lower() in ("1", "true"):
            self._watch(q, params)
        else:
            code, body = fake._list(q, params)
            self._send_json(code, body)

    # ----- control endpoint (standalone use)

    def _control(self, action: str, params: dict[str, str]) -> None:
        fake = self.fake
        try:
            if action == "apply":
                body = self._read_body()
                objs = body.get("items", []) if isinstance(body, dict) and body.get("kind", "").endswith("List") else [body]
                result: Any = [fake.apply(o) for o in objs]
            elif action == "delete":
                result = fake.delete(params["kind"], params.get("namespace"), params["name"])
            elif action == "drop":
                result = None
                fake.drop_watches()
            elif action == "fail":
                result = None
                fake.fail_next(int(params.get("n", "1")), int(params.get("status", "500")))
            elif action == "stall":
                result = None
                fake.stall(float(params.get("seconds", "5")))
            elif action == "down":
                seconds = float(params.get("seconds", "5"))
                self._send_json(200, {"ok": True})
                threading.Thread(target=fake.down, args=(seconds,), daemon=True).start()
                return
            elif action == "compact":
                result = None
                fake.compact()
            elif action == "bookmark":
                result = None
                fake.bookmark()
            elif action == "expire":
                result = None
                fake.expire_continue_tokens()
            elif action == "watch410":
                result = None
                fake.set_watch_410(params.get("mode", "event"))
            elif action == "requests":
                result = [r.__dict__ for r in fake.requests()]
            elif action == "token":  # the bearer token required from now on ('' for none)
                result = None
                fake.token = params.get("value") or None
            else:
                self._send_status(404, "NotFound", f"unknown control action {action!r}")
                return
        except (KeyError, ValueError) as e:
            self._send_status(400, "BadRequest", str(e))
            return
        self._send_json(200, {"ok": True, "result": result, "resourceVersion": fake.resource_version})

    # ----- watch

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _watch(self, q: Query, params: dict[str, str]) -> None:
        fake, st = self.fake, self.fake.state
        rv_param = params.get("resourceVersion", "")
        bookmarks = params.get("allowWatchBookmarks", "").lower() in ("1", "true")
        try:
            timeout = float(params.get("timeoutSeconds") or fake.default_watch_timeout)
            start_rv = int(rv_param) if rv_param not in ("", "0") else None
        except ValueError:
            self._send_status(400, "BadRequest", "invalid resourceVersion or timeoutSeconds")
            return
        deadline = time.monotonic() + timeout
        pending: list[bytes] = []
        with st.cond:
            if start_rv is not None and start_rv < st.floor:
                expired = status_body(410, "Expired", f"too old resource version: {start_rv} ({st.floor})")
                if st.watch_410 == "http":
                    self._send_json(410, expired)
                    return
                pending.append(_event_line("ERROR", expired))
                cursor = -1
            elif start_rv is None:
                # "Get state and start at most recent": synthetic ADDED for what exists.
                cursor = st.rv
                for (plural, _, _), obj in sorted(st.objects.items()):
                    if plural == q.resource.plural and q.matches(obj):
                        pending.append(_event_line("ADDED", obj))
            else:
                cursor = start_rv
            drop_seq, stall_seq, bm_seq = st.drop_seq, st.stall_seq, st.bookmark_seq
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Cache-Control", "no-cache, private")
        self.end_headers()
        self.wfile.flush()
        self.server.count_watch(1)
        try:
            self._stream(q, pending, cursor, deadline, bookmarks, drop_seq, stall_seq, bm_seq)
        except OSError:
            pass  # client went away
        finally:
            self.server.count_watch(-1)

    def _stream(self, q: Query, pending: list[bytes], cursor: int, deadline: float, bookmarks: bool,
                drop_seq: int, stall_seq: int, bm_seq: int) -> None:
        fake, st = self.fake, self.fake.state
        interval = fake.bookmark_interval
        next_bookmark = time.monotonic() + interval if interval else float("inf")
        while True:
            for line in pending:
                self._chunk(line)
            if cursor < 0:  # an ERROR ended the watch
                self._chunk(b"")
                return
            pending = []
            with st.cond:
                while True:
                    now = time.monotonic()
                    if self.server.closing or st.drop_seq != drop_seq:
                        _abort(self.connection)
                        self.close_connection = True
                        return
                    if st.stall_seq != stall_seq:
                        # A dead peer: never another byte; the client must notice by itself.
                        while not self.server.closing and st.drop_seq == drop_seq:
                            st.cond.wait(0.5)
                        _abort(self.connection)
                        self.close_connection = True
                        return
                    if cursor < st.floor:
                        pending.append(_event_line("ERROR", status_body(
                            410, "Expired", f"too old resource version: {cursor} ({st.floor})")))
                        cursor = -1
                        break
                    if st.rv > cursor:
                        # History is in resourceVersion order: start after the cursor
                        # instead of walking all of it at every wake-up.
                        first = bisect.bisect_right(st.history, cursor, key=_rv_of)
                        for change in itertools.islice(st.history, first, None):
                            if change.plural == q.resource.plural:
                                out = _watch_line(q, change)
                                if out is not None:
                                    pending.append(out)
                        cursor = st.rv
                    if bookmarks and (st.bookmark_seq != bm_seq or now >= next_bookmark):
                        bm_seq = st.bookmark_seq
                        next_bookmark = now + interval if interval else float("inf")
                        pending.append(_event_line("BOOKMARK", {
                            "kind": q.resource.kind, "apiVersion": q.resource.api_version,
                            "metadata": {"resourceVersion": str(cursor)}}))
                    if pending:
                        break
                    if now >= deadline:
                        break
                    st.cond.wait(min(deadline, next_bookmark) - now)
            if not pending and time.monotonic() >= deadline:
                self._chunk(b"")  # clean end of the chunked body: the watch timed out
                return


def _rv_of(change: Change) -> int:
    return change.rv


def _watch_line(q: Query, change: Change) -> bytes | None:
    if change.raw is not None:
        return change.raw + b"\n"
    now_matches = q.matches(change.obj)
    if change.type == "MODIFIED":
        was = q.matches(change.old)
        if was and not now_matches:
            return change.line("DELETED")
        if now_matches and not was:
            return change.line("ADDED")
    return change.line(change.type) if now_matches else None




# ----- standalone ------------------------------------------------------------------------

def load_state_file(path: Path) -> list[JSON]:
    """Objects from a YAML (multi-document, or a List) or JSON file."""
    text = path.read_text()
    try:
        import yaml
        docs: Iterable[Any] = list(yaml.safe_load_all(text))
    except ImportError:
        docs = [json.loads(text)] if text.strip() else []
    objs: list[JSON] = []
    for doc in docs:
        if isinstance(doc, dict) and str(doc.get("kind", "")).endswith("List") and "items" in doc:
            objs.extend(i for i in doc["items"] if isinstance(i, dict))
        elif isinstance(doc, dict):
            objs.append(doc)
    return [o for o in objs if o.get("kind") and o["kind"].lower() in _BY_NAME]


def sync_state(fake: FakeApiServer, objs: Sequence[JSON], previous: dict[tuple[str, str, str], JSON]) -> \
        dict[tuple[str, str, str], JSON]:
    """Apply what changed since ``previous`` (a file's last content) and delete what went."""
    current: dict[tuple[str, str, str], JSON] = {}
    for obj in objs:
        res = resource_of(obj["kind"])
        meta = obj.get("metadata") or {}
        ns = (meta.get("namespace") or "default") if res.namespaced else ""
        current[(res.plural, ns, meta.get("name", ""))] = obj
    for key, obj in current.items():
        if previous.get(key) != obj:
            fake.apply(obj)
    for key in previous.keys() - current.keys():
        fake.delete(key[0], key[1], key[2])
    return current


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--state", type=Path, default=None, help="YAML/JSON objects to serve; re-read on change")
    parser.add_argument("--kubeconfig", default=None, help="where to write the kubeconfig (default: a temp file)")
    parser.add_argument("--token", default="fake-token", help="bearer token to require ('' for none)")
    parser.add_argument("--bookmark-interval", type=float, default=60.0)
    args = parser.parse_args(argv)
    fake = FakeApiServer(args.host, args.port, bookmark_interval=args.bookmark_interval or None,
                         token=args.token or None)
    previous: dict[tuple[str, str, str], JSON] = {}
    stamp: tuple[int, int, int] | None = None
    if args.state is not None:
        previous = sync_state(fake, load_state_file(args.state), previous)
        st = args.state.stat()
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
    fake.start()
    kubeconfig = fake.write_kubeconfig(args.kubeconfig)
    print(f"URL={fake.url}", flush=True)
    print(f"KUBECONFIG={kubeconfig}", flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    while not done.wait(0.5):
        if args.state is None:
            continue
        try:
            st = args.state.stat()
        except OSError:
            continue  # being replaced; keep serving the old state
        now = (st.st_mtime_ns, st.st_size, st.st_ino)
        if now == stamp:
            continue
        stamp = now
        try:
            previous = sync_state(fake, load_state_file(args.state), previous)
        except Exception as e:  # keep serving the old state on a broken file
            print(f"fakeapi: state file: {e}", file=sys.stderr, flush=True)
    fake.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
