"""List and watch Services, EndpointSlices and this node's Node as raw JSON dicts.

Design decisions:

- One ``Watcher`` per resource, each in its own daemon thread, feeding ``Event``s to a
  sink. The reconcile loop never sees the protocol: relists, replays and reconnects
  arrive as ordinary ADDED/MODIFIED/DELETED events through a ``Store`` (store.py).
- Raw dicts, not the client's typed models: the generated API functions are called
  with ``_preload_content=False`` and the body is decoded with ``json.loads``: the
  client's typed deserialisation costs several times as much (docs/performance.md),
  and the translation layer reads dicts anyway.
  Watch streams are split into lines here, so no event is ever deserialized twice.
- Services and EndpointSlices are selected with ``!service.kubernetes.io/headless``
  only. kube-proxy also excludes every ``service.kubernetes.io/service-proxy-name``,
  but svcproxy serves the Services whose label names it, so that filter is applied by
  value in translation instead.
- Protocol as client-go's reflector speaks it: paginated lists (``limit`` +
  ``continue``, restarted when a token expires), watches from the list's
  resourceVersion with bookmarks (which only advance the resourceVersion), a slightly
  randomised server ``timeoutSeconds`` so a fleet of agents does not reconnect in
  step. A stream that sends nothing for ``idle_timeout`` seconds is taken as stalled
  and resumed: the API server sends a bookmark on every quiet watch about once a
  minute, so the default (``WATCH_IDLE_TIMEOUT``) is just above that; lower would
  reconnect every healthy quiet watch of every node, higher leaves a dead stream
  unnoticed longer.
  A 410 (as an ERROR event or as an HTTP status) means the resourceVersion is gone:
  relist and let the store turn the difference into events.
- Failures are retried by tenacity with capped, jittered exponential backoff. The
  backoff restarts after a healthy stream (one that delivered something or stayed up
  for a while), so a long-lived watch that breaks reconnects at once, while a server
  that refuses, fails or drops every stream immediately is never hammered. The client
  made by ``make_api_client`` has urllib3's own retries off: one retry layer, so a
  stalled request costs one read timeout and attempts can be counted.
- Objects are kept without ``metadata.managedFields``: nothing here reads them, and
  they are often the largest part of an object (client-go's informers in kube-proxy
  drop them the same way), so a node's memory does not grow with their history.
- Field names of watched objects are interned (``_interned_keys``). A list page is one
  JSON document, whose decoder shares each field name among all its objects; every
  watch event is a document of its own, so without this each object replaced by an
  event would hold its own copy of every field name: a quarter more memory per object,
  reached gradually as churn touches every object once.
- Nothing a server sends may kill the thread: malformed objects and events are
  counted and skipped, sink exceptions are logged, and every other error is retried.
"""

from __future__ import annotations

import json
import logging
import os
import random
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Protocol, cast

import kubernetes.client
import kubernetes.config
import yaml
from kubernetes.client.exceptions import ApiException
from tenacity import RetryCallState, Retrying, retry_if_exception_type
from urllib3.exceptions import ReadTimeoutError
from tenacity.wait import wait_base

from svcproxy import __version__
from svcproxy.kube.filesource import FileSource
from svcproxy.kube.store import ADDED, DELETED, MODIFIED, Event, Key, Kind, Store, object_key, resource_version

__all__ = [
    "Backoff",
    "Event",
    "FileSource",
    "Kind",
    "Source",
    "WatchStats",
    "Watcher",
    "make_api_client",
    "HEADLESS_SELECTOR",
]

log = logging.getLogger("svcproxy.watch")

#: The label selector for Services and EndpointSlices (see the module docstring).
HEADLESS_SELECTOR = "!service.kubernetes.io/headless"
#: Seconds a watch stream may stay silent before it is taken as stalled: just above
#: the API server's once-a-minute bookmark on a quiet watch.
WATCH_IDLE_TIMEOUT = 65.0

Sink = Callable[[Event], None]
OnSynced = Callable[[Kind], None]


class Source(Protocol):
    """What the agent starts and stops: a ``Watcher`` or a ``FileSource``."""

    def start(self) -> None: ...

    def join(self, timeout: float | None = None) -> bool: ...


def make_api_client(kubeconfig: str | None = None, *, context: str | None = None) -> kubernetes.client.ApiClient:
    """An ApiClient from the in-cluster service account, or from ``kubeconfig`` when given.

    urllib3's retries are turned off (the watcher's backoff is the only retry layer) and
    the User-Agent names svcproxy, so the agent is recognisable in apiserver audit logs.
    """
    cfg = kubernetes.client.Configuration()
    # The config loaders carry no annotations: cast rather than a "type: ignore" that
    # would turn into an unused-ignore error with a client version that adds them.
    try:
        if kubeconfig:
            load = cast(Callable[..., None], kubernetes.config.load_kube_config)
            load(config_file=kubeconfig, context=context, client_configuration=cfg, persist_config=False)
        else:
            load = cast(Callable[..., None], kubernetes.config.load_incluster_config)
            load(client_configuration=cfg)
    except (kubernetes.config.ConfigException, yaml.YAMLError, UnicodeDecodeError, OSError, TypeError,
            AttributeError, KeyError) as exc:
        # The client's loader lets YAML and shape errors of a broken file through as is.
        where = f"kubeconfig {kubeconfig}" if kubeconfig else "the in-cluster service account (or pass --kubeconfig)"
        raise ValueError(f"cannot configure the API client from {where}: "
                         f"{' '.join(str(exc).split()) or type(exc).__name__}") from None
    if kubeconfig:
        token_file = _token_file(kubeconfig, context)
        if token_file:
            # In place of the loader's hook, which only re-sets the token it read once
            # (and puts itself back on every call).
            cfg.refresh_api_key_hook = cast(Any, _TokenFile(token_file))  # typed None upstream
    cfg.retries = 0
    client = kubernetes.client.ApiClient(cfg)
    client.user_agent = f"svcproxy/{__version__}"
    return client


def _token_file(kubeconfig: str, context: str | None) -> str | None:
    """The ``tokenFile`` of the kubeconfig's user in ``context`` (else the current one),
    relative to the kubeconfig's directory; None if it has none."""
    try:
        with open(kubeconfig, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
        name = context or doc.get("current-context")
        ctx = next(c["context"] for c in doc.get("contexts") or [] if c.get("name") == name)
        user = next(u["user"] for u in doc.get("users") or [] if u.get("name") == ctx.get("user"))
        path = user.get("tokenFile")
    except (OSError, yaml.YAMLError, StopIteration, AttributeError, KeyError, TypeError):
        return None  # the loader, which has just read the same file, decides what is wrong
    return os.path.join(os.path.dirname(os.path.abspath(kubeconfig)), path) if isinstance(path, str) and path else None


class _TokenFile:
    """Reads a kubeconfig's ``tokenFile`` again before every request.

    The kubelet rotates a projected service account token on disk (kube-proxy's
    kubeconfig points at one) and the API server refuses it once it expires; the
    client's loader reads the file once. A request is rare (lists and watches, not
    events), so reading a small file for each costs nothing. An unreadable file keeps
    the last token, with one log line per new error.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.last_error = ""

    def __call__(self, cfg: Any) -> None:
        try:
            with open(self.path, encoding="utf-8") as f:
                token = f.read().strip()
            if not token:
                raise ValueError("it is empty")
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            error = f"cannot read the token file {self.path} ({exc}); using the last token read"
            if error != self.last_error:
                log.warning("%s", error)
            self.last_error = error
            return
        self.last_error = ""
        cfg.api_key["BearerToken"] = f"Bearer {token}"


@dataclass
class WatchStats:
    """Counters for metrics and tests. Written only by the watcher's own thread."""

    lists: int = 0  # successful full lists, the first one included
    relists: int = 0  # lists after the first (410s, or a watch that could not resume)
    watches: int = 0  # watch requests that got a response
    reconnects: int = 0  # watches resumed from a resourceVersion without a relist
    expired: int = 0  # 410s seen (in a stream, as HTTP status, or on a continue token)
    errors: int = 0  # failed requests and broken streams
    consecutive_errors: int = 0  # failures since the last success; drives the backoff
    events: int = 0  # events handed to the sink
    bookmarks: int = 0
    stalls: int = 0  # streams resumed after staying silent for the idle timeout
    malformed: int = 0  # objects or events skipped as unusable
    sink_errors: int = 0
    last_error: str = ""
    last_backoff: float = 0.0
    resource_version: str = ""


class Backoff(wait_base):
    """Exponential backoff, capped, with jitter that only shortens the delay.

    ``initial * 2**(n-1)`` capped at ``maximum``, then multiplied by a random factor in
    ``[1 - jitter, 1]``: agents restarted together spread out, and no delay exceeds the cap
    nor falls below ``initial * (1 - jitter)`` (never a hot loop).
    """

    def __init__(self, initial: float = 0.5, maximum: float = 30.0, jitter: float = 0.2,
                 rng: random.Random | None = None) -> None:
        if not 0 < initial <= maximum or not 0 <= jitter < 1:
            raise ValueError("need 0 < initial <= maximum and 0 <= jitter < 1")
        self.initial, self.maximum, self.jitter = initial, maximum, jitter
        self._rng = rng or random.Random()

    def delay(self, failures: int) -> float:
        base = min(self.maximum, self.initial * 2.0 ** min(max(failures - 1, 0), 40))
        return base * (1.0 - self.jitter * self._rng.random())

    def __call__(self, retry_state: RetryCallState) -> float:
        return self.delay(retry_state.attempt_number)


class WatchError(Exception):
    """The server answered, but not with something a watch can continue from."""


class _Expired(Exception):
    """The server no longer has our resourceVersion (410): relist."""


def _interned_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """The JSON decoder's hook for watch events: one string per field name, shared by
    every object (see the module docstring)."""
    return {sys.intern(k): v for k, v in pairs}


def _timed_out(exc: BaseException) -> bool:
    """A read that waited the whole timeout (urllib3 wraps the socket's timeout)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, (TimeoutError, ReadTimeoutError)):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return "timed out" in str(exc).lower()


def _describe(exc: BaseException | None) -> str:
    """One line for a log: ApiException's str() is a multi-line dump with headers."""
    if exc is None:
        return "unknown error"
    if isinstance(exc, ApiException):
        message = ""
        try:
            body = json.loads(exc.body) if exc.body else None
            if isinstance(body, dict):
                message = str(body.get("message") or "")
        except (ValueError, TypeError):
            pass
        return f"HTTP {exc.status} {exc.reason or ''}{': ' + message if message else ''}".strip()
    reason = getattr(exc, "reason", None)  # urllib3 MaxRetryError wraps the real cause
    if isinstance(reason, BaseException):
        return f"{type(exc).__name__}: {reason}"
    return f"{type(exc).__name__}: {exc}"


def _iter_lines(resp: Any) -> Iterator[bytes]:
    """Lines of a streamed body as they arrive (a watch sends one JSON event per line)."""
    if getattr(resp, "chunked", False):
        pieces: Iterator[bytes] = resp.read_chunked(decode_content=True)
    else:
        pieces = iter(lambda: bytes(resp.read1(65536)), b"")
    partial: list[bytes] = []
    for piece in pieces:
        start = 0
        while True:
            nl = piece.find(b"\n", start)
            if nl < 0:
                if start < len(piece):
                    partial.append(piece[start:])
                break
            partial.append(piece[start:nl])
            yield b"".join(partial)
            partial.clear()
            start = nl + 1
    if partial:
        yield b"".join(partial)


def _endpoint(api_client: kubernetes.client.ApiClient, kind: Kind,
              node_name: str | None) -> tuple[Callable[..., Any], dict[str, str], str]:
    """The client call that lists and watches ``kind``, its selector, and its name in logs."""
    if kind is Kind.SERVICE:
        return (kubernetes.client.CoreV1Api(api_client).list_service_for_all_namespaces,
                {"label_selector": HEADLESS_SELECTOR}, "services")
    if kind is Kind.ENDPOINT_SLICE:
        return (kubernetes.client.DiscoveryV1Api(api_client).list_endpoint_slice_for_all_namespaces,
                {"label_selector": HEADLESS_SELECTOR}, "endpointslices")
    return (kubernetes.client.CoreV1Api(api_client).list_node,
            {"field_selector": f"metadata.name={node_name}"}, f"node {node_name}")


class Watcher:
    """List, then watch, one resource; deliver every change to ``sink``.

    ``on_synced(kind)`` is called after every successful (re)list, once the sink has
    received the list's events: the first call means "this kind is complete".
    """

    def __init__(
        self,
        api_client: kubernetes.client.ApiClient,
        kind: Kind,
        *,
        sink: Sink,
        on_synced: OnSynced,
        stop: threading.Event,
        node_name: str | None = None,
        page_size: int = 500,
        timeout_seconds: int = 300,
        connect_timeout: float = 10.0,
        read_timeout: float | None = None,
        idle_timeout: float | None = None,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
    ) -> None:
        """``read_timeout`` None means 60 s for list pages and ``idle_timeout`` for a
        watch stream (None: ``WATCH_IDLE_TIMEOUT``); both are the longest silence
        between two reads."""
        if kind is Kind.NODE and not node_name:
            raise ValueError("watching the Node needs node_name")
        if page_size < 1 or timeout_seconds < 1:
            raise ValueError("page_size and timeout_seconds must be positive")
        self.kind = kind
        self.node_name = node_name
        self.stats = WatchStats()
        self._sink = sink
        self._on_synced = on_synced
        self._stop = stop
        self._page_size = page_size
        self._timeout_seconds = timeout_seconds
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._idle_timeout = idle_timeout if idle_timeout is not None else WATCH_IDLE_TIMEOUT
        self._rng = random.Random()
        self._backoff = Backoff(backoff_initial, backoff_max, rng=self._rng)
        self._store = Store(kind)
        self._rv: str | None = None  # None: (re)list before the next watch
        self._first_watch = False  # the next watch is the first one after a list
        self._watched_since_list = False
        self._listed_once = False
        self._lock = threading.Lock()
        self._inflight: Any = None  # the urllib3 response being read, for prompt stop
        self._thread: threading.Thread | None = None
        self._waker: threading.Thread | None = None
        self._lister, self._selector, self._what = _endpoint(api_client, kind, node_name)

    # --- lifecycle ----------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("watcher already started")
        self._thread = threading.Thread(target=self._run, name=f"watch-{self.kind.value}", daemon=True)
        self._waker = threading.Thread(target=self._interrupt_on_stop, name=f"watch-{self.kind.value}-stop",
                                       daemon=True)
        self._thread.start()
        self._waker.start()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread to end (after ``stop`` is set); True when it has."""
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def resource_version(self) -> str | None:
        """The resourceVersion the next watch resumes from (None: a relist is due)."""
        return self._rv

    @property
    def cache(self) -> Mapping[Key, Mapping[str, Any]]:
        """A copy of what the watcher currently knows (for debugging and tests)."""
        return self._store.snapshot()

    def _interrupt_on_stop(self) -> None:
        # A watch read can block for minutes; shutting the socket down ends it now.
        self._stop.wait()
        with self._lock:
            resp = self._inflight
        if resp is not None:
            try:
                resp.shutdown()
            except Exception:  # already closed or released: nothing to interrupt
                pass

    def _track(self, resp: Any) -> None:
        with self._lock:
            self._inflight = resp
        if self._stop.is_set():  # stop raced with the request: interrupt it ourselves
            try:
                resp.shutdown()
            except Exception:
                pass

    def _untrack(self, resp: Any) -> None:
        with self._lock:
            self._inflight = None
        try:
            resp.close()
            resp.release_conn()
        except Exception:
            pass

    # --- the loop -----------------------------------------------------------------

    def _run(self) -> None:
        retrying = Retrying(
            sleep=self._sleep,
            stop=lambda _state: self._stop.is_set(),
            wait=self._backoff,
            retry=retry_if_exception_type(Exception),
            before_sleep=self._log_retry,
            reraise=True,
        )
        log.info("watch %s: starting", self._what)
        while not self._stop.is_set():
            try:
                retrying(self._cycle)  # a fresh call per success: the backoff restarts
            except Exception:
                if not self._stop.is_set():  # cannot happen (stop is tenacity's only limit)
                    log.exception("watch %s: retry loop ended unexpectedly", self._what)
                    self._stop.wait(self._backoff.maximum)
        log.info("watch %s: stopped", self._what)

    def _sleep(self, seconds: float) -> None:
        self._stop.wait(seconds)

    def _log_retry(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        delay = state.next_action.sleep if state.next_action is not None else 0.0
        self.stats.last_backoff = delay
        log.warning("watch %s: %s; retrying in %.2f s (failure %d in a row)",
                    self._what, _describe(exc), delay, state.attempt_number)

    def _cycle(self) -> None:
        """One attempt: list if needed, then one watch. Raises on failure (backoff),
        returns after a healthy stream or when a relist is due (no backoff)."""
        if self._stop.is_set():
            return
        try:
            if self._rv is None:
                self._list()
                if self._rv is None or self._stop.is_set():
                    return
            healthy = self._watch()
        except Exception as exc:
            if self._stop.is_set():
                return
            self.stats.errors += 1
            self.stats.consecutive_errors += 1
            self.stats.last_error = _describe(exc)
            raise
        if healthy:
            self.stats.consecutive_errors = 0

    # --- list ---------------------------------------------------------------------

    def _request(self, **kwargs: Any) -> Any:
        """Issue one API call and return the raw urllib3 response (tracked for stop)."""
        resp = self._lister(_preload_content=False, **self._selector, **kwargs)
        self._track(resp)
        return resp

    def _list(self) -> None:
        started = time.monotonic()
        for attempt in range(3):
            try:
                items, rv = self._list_pages()
                break
            except _Expired as exc:
                self.stats.expired += 1
                log.info("watch %s: continue token expired during the list (%s); restarting it", self._what, exc)
        else:
            raise WatchError("the list kept expiring before its last page")
        if self._stop.is_set():
            return
        events = self._store.replace(items)
        relist = self._listed_once
        self._listed_once = True
        self._rv, self._first_watch, self._watched_since_list = rv, True, False
        self.stats.lists += 1
        self.stats.relists += int(relist)
        self.stats.resource_version = rv
        log.info("watch %s: %s %d objects at resourceVersion %s in %.2f s (%d changes)",
                 self._what, "relisted" if relist else "listed", len(items), rv,
                 time.monotonic() - started, len(events))
        for event in events:
            self._emit(event)
        try:
            self._on_synced(self.kind)
        except Exception:
            self.stats.sink_errors += 1
            log.exception("watch %s: on_synced callback failed", self._what)

    def _list_pages(self) -> tuple[list[tuple[Key, Mapping[str, Any]]], str]:
        items: list[tuple[Key, Mapping[str, Any]]] = []
        token: str | None = None
        rv = ""
        timeout = (self._connect_timeout, self._read_timeout or 60.0)
        while not self._stop.is_set():
            kwargs: dict[str, Any] = {"limit": self._page_size, "_request_timeout": timeout}
            if token:
                kwargs["_continue"] = token
            try:
                resp = self._request(**kwargs)
            except ApiException as exc:
                if exc.status == 410 and token:
                    raise _Expired(_describe(exc)) from exc
                raise
            try:
                body = json.loads(resp.data)
            finally:
                self._untrack(resp)
            if not isinstance(body, dict) or not isinstance(body.get("items") or [], list):
                raise WatchError("list response is not a list object")
            meta: dict[str, Any] = body["metadata"] if isinstance(body.get("metadata"), dict) else {}
            for raw in body.get("items") or []:
                key = self._accept(raw, "list item")
                if key is not None:
                    if "kind" not in raw:  # list items omit them; watch events have them
                        raw["kind"], raw["apiVersion"] = self.kind.value, self.kind.api_version
                    items.append((key, raw))
            rv = str(meta.get("resourceVersion") or rv)
            token = meta.get("continue") or None
            if not token:
                break
        if not rv and not self._stop.is_set():
            raise WatchError("list response carries no resourceVersion")
        return items, rv

    def _accept(self, obj: Any, what: str) -> Key | None:
        """The object's key, None (counted, logged) if it has none. Accepted objects
        lose their managedFields here, before anything keeps them."""
        key = object_key(obj, self.kind)
        if key is None:
            self.stats.malformed += 1
            log.warning("watch %s: skipping malformed %s: %.200r", self._what, what, obj)
        else:
            obj["metadata"].pop("managedFields", None)
        return key

    # --- watch --------------------------------------------------------------------

    def _watch(self) -> bool:
        """One watch request; True if the stream was healthy (resets the backoff)."""
        timeout = int(self._timeout_seconds * self._rng.uniform(1.0, 1.2))
        read = self._read_timeout or self._idle_timeout
        healthy_after = min(10.0, self._timeout_seconds / 2)
        started = time.monotonic()
        first, self._first_watch = self._first_watch, False
        try:
            resp = self._request(watch=True, resource_version=self._rv, allow_watch_bookmarks=True,
                                 timeout_seconds=timeout, _request_timeout=(self._connect_timeout, read))
        except ApiException as exc:
            if exc.status == 410:
                return self._expired(f"HTTP 410: {_describe(exc)}", first)
            raise
        self.stats.watches += 1
        if self._watched_since_list:
            self.stats.reconnects += 1
            log.info("watch %s: resumed at resourceVersion %s", self._what, self._rv)
        self._watched_since_list = True
        # Progress: an event or bookmark was applied (garbage lines do not count).
        progress = False
        try:
            for line in _iter_lines(resp):
                if self._stop.is_set():
                    return True
                if self._handle(line) and not progress:
                    progress = True
                    self.stats.consecutive_errors = 0
        except _Expired as exc:
            return self._expired(str(exc), first and not progress)
        except Exception as exc:
            if self._stop.is_set():
                return True
            stalled = _timed_out(exc)
            if stalled:
                self.stats.stalls += 1
                log.warning("watch %s: nothing received for %.0f s: the stream stalled", self._what, read)
            if not (progress or time.monotonic() - started >= healthy_after):
                raise
            # A stream that was healthy and then broke: resume at once, backoff from scratch.
            self.stats.errors += 1
            self.stats.last_error = _describe(exc)
            if not stalled:
                log.warning("watch %s: stream broke after %.1f s (%s); resuming at once",
                            self._what, time.monotonic() - started, _describe(exc))
            return True
        finally:
            self._untrack(resp)
        if not progress and time.monotonic() - started < healthy_after and not self._stop.is_set():
            raise WatchError("the watch ended at once without sending anything")
        return True

    def _expired(self, why: str, first: bool) -> bool:
        self.stats.expired += 1
        self._rv = None
        if first:  # a server that expires what it just listed: relisting at once would loop
            raise WatchError(f"resourceVersion expired right after a list ({why})")
        log.info("watch %s: resourceVersion expired (%s); relisting", self._what, why)
        return True

    def _advance(self, rv: str) -> None:
        if rv:
            self._rv = rv
            self.stats.resource_version = rv

    def _handle(self, line: bytes) -> bool:
        """Apply one line of a watch; True if it was a usable event or bookmark."""
        if not line.strip():
            return False
        try:
            event = json.loads(line, object_pairs_hook=_interned_keys)
        except ValueError:
            self._malformed("event is not JSON", line)
            return False
        if not isinstance(event, dict):
            self._malformed("event is not an object", event)
            return False
        type_, obj = event.get("type"), event.get("object")
        if type_ == "ERROR":
            status: dict[str, Any] = obj if isinstance(obj, dict) else {}
            if status.get("code") == 410:
                raise _Expired(f"{status.get('reason', 'Gone')}: {status.get('message', '')}")
            raise WatchError(f"watch ERROR event: {status.get('code')} {status.get('reason')}: "
                             f"{status.get('message')}")
        if type_ == "BOOKMARK":
            self.stats.bookmarks += 1
            self._advance(resource_version(obj) if isinstance(obj, dict) else "")
            return True
        if type_ not in (ADDED, MODIFIED, DELETED):
            self._malformed(f"unknown event type {type_!r}", event)
            return False
        key = self._accept(obj, f"{type_} object")
        if key is None or not isinstance(obj, dict):
            return False
        self._advance(resource_version(obj))
        change = self._store.apply(type_, key, obj)
        if change is not None:
            self._emit(change)
        return True

    def _malformed(self, why: str, what: Any) -> None:
        self.stats.malformed += 1
        log.warning("watch %s: skipping malformed event (%s): %.200r", self._what, why, what)

    def _emit(self, event: Event) -> None:
        self.stats.events += 1
        try:
            self._sink(event)
        except Exception:
            self.stats.sink_errors += 1
            log.exception("watch %s: sink failed on %s %s/%s", self._what, event.type, *event.key)
