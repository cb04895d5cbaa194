"""A YAML/JSON file standing in for the API server (``svcproxy run -f FILE``).

It produces exactly what the watchers produce: the same ``Event``s, the same label
selector (``!service.kubernetes.io/headless``), only this node's Node, and
``on_synced`` for every kind after each successful read. So the reconcile loop, and
everything tested through a file, cannot tell the two sources apart.

Design decisions:

- Poll the file's (device, inode, mtime, size) every ``poll_interval``: no inotify
  dependency, and it notices a ConfigMap volume's symlink swap (a new inode) as well as
  an in-place edit.
- Diff by content, not resourceVersion: hand-edited files rarely carry one, or do not
  bump it. Re-reading an unchanged object produces nothing.
- A source that goes away never deletes anything. A missing, unreadable, unparsable or
  empty (0-byte, as during a truncate-then-write) file, or one without a Service
  (only Nodes, say), is logged and the previous
  content stays in force until a good version appears. A file that changed while being
  read is read again at the next poll rather than trusted.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Protocol

from svcproxy.kube.objects import HEADLESS_LABEL
from svcproxy.kube.store import Event, Key, Kind, Store, object_key

log = logging.getLogger("svcproxy.watch")


class Loaded(Protocol):
    """What ``svcproxy.kube.files.load_objects`` returns."""

    @property
    def services(self) -> Iterable[Any]: ...

    @property
    def endpoint_slices(self) -> Iterable[Any]: ...

    @property
    def nodes(self) -> Iterable[Any]: ...

    @property
    def problems(self) -> Iterable[Any]: ...

    @property
    def empty(self) -> bool: ...

    @property
    def explicit_empty(self) -> bool: ...

    @property
    def lacks_services(self) -> bool: ...


Loader = Callable[[str], Loaded]


def _default_loader(path: str) -> Loaded:
    from svcproxy.kube.files import load_objects  # the parser, kept out of import time

    return load_objects(path)


@dataclass
class FileStats:
    reads: int = 0  # successful reads that were applied
    errors: int = 0  # changed content refused (unreadable, unparsable, no objects: content kept)
    events: int = 0
    malformed: int = 0
    sink_errors: int = 0
    last_error: str = ""


_Signature = tuple[int, int, int, int]


class FileSource:
    """Serve the objects in ``path`` as watch events, re-reading it when it changes."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        sink: Callable[[Event], None],
        on_synced: Callable[[Kind], None],
        stop: threading.Event,
        node_name: str | None = None,
        poll_interval: float = 1.0,
        loader: Loader | None = None,
    ) -> None:
        self.path = Path(path)
        self.node_name = node_name
        self.stats = FileStats()
        self._sink = sink
        self._on_synced = on_synced
        self._stop = stop
        self._poll_interval = poll_interval
        self._loader: Loader = loader or _default_loader
        self._stores = {kind: Store(kind, compare="content") for kind in Kind}
        self._seen: _Signature | None = None  # signature of the last read, good or bad
        self._last_problem: str | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("file source already started")
        self._thread = threading.Thread(target=self._run, name="watch-file", daemon=True)
        self._thread.start()

    def join(self, timeout: float | None = None) -> bool:
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.check()
            except Exception:  # never let a bug end the thread silently
                self.stats.errors += 1
                log.exception("file %s: unexpected error", self.path)
            self._stop.wait(self._poll_interval)

    def _signature(self) -> _Signature:
        st = os.stat(self.path)
        return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)

    def _problem(self, message: str, *, new_content: bool = True) -> None:
        """Count a refused read and log it once per distinct message (a missing file
        is polled every second: one line, and one count, per state change)."""
        self.stats.last_error = message
        if new_content or message != self._last_problem:
            self.stats.errors += 1
        if message != self._last_problem:
            log.warning("file %s: %s; keeping the previous content", self.path, message)
            self._last_problem = message

    def check(self) -> bool:
        """Re-read the file if it changed; True when new content was applied."""
        try:
            before = self._signature()
        except OSError as exc:
            self._problem(f"cannot stat: {exc.strerror or exc}", new_content=False)
            self._seen = None
            return False
        if before == self._seen:
            return False
        if before[3] == 0:
            self._seen = before
            self._problem("file is empty")
            return False
        try:
            loaded = self._loader(str(self.path))
        except Exception as exc:
            self._seen = before
            self._problem(str(exc))
            return False
        try:
            after = self._signature()
        except OSError:
            return False  # replaced while reading: look again next poll
        if after != before:
            return False
        self._seen = before
        for problem in loaded.problems:
            log.warning("file %s: %s", self.path, problem)
            self.stats.malformed += getattr(problem, "kind", "") == "malformed-object"
        batches = self._batches(loaded)
        if loaded.lacks_services or not any(items for _, items in batches):
            if not loaded.explicit_empty:
                self._problem("no usable Service in it (an empty List, kind: List with items: [], "
                              "removes everything)")
                return False
            log.warning("file %s: an empty List: every Service goes, and its virtual services with it", self.path)
        self._last_problem = None
        self._apply(batches)
        return True

    def _batches(self, loaded: Loaded) -> list[tuple[Kind, list[tuple[Key, Mapping[str, Any]]]]]:
        return [
            (Kind.NODE, self._usable(loaded.nodes, Kind.NODE)),
            (Kind.SERVICE, self._usable(loaded.services, Kind.SERVICE)),
            (Kind.ENDPOINT_SLICE, self._usable(loaded.endpoint_slices, Kind.ENDPOINT_SLICE)),
        ]

    def _apply(self, batches: list[tuple[Kind, list[tuple[Key, Mapping[str, Any]]]]]) -> None:
        events = [event for kind, items in batches for event in self._stores[kind].replace(items)]
        self.stats.reads += 1
        log.info("file %s: read %s; %d changes", self.path,
                 ", ".join(f"{len(items)} {kind.value}s" for kind, items in batches), len(events))
        for event in events:
            self.stats.events += 1
            try:
                self._sink(event)
            except Exception:
                self.stats.sink_errors += 1
                log.exception("file %s: sink failed on %s %s/%s", self.path, event.type, *event.key)
        for kind in (Kind.SERVICE, Kind.ENDPOINT_SLICE, Kind.NODE):
            try:
                self._on_synced(kind)
            except Exception:
                self.stats.sink_errors += 1
                log.exception("file %s: on_synced callback failed", self.path)

    def _usable(self, objs: Iterable[Any], kind: Kind) -> list[tuple[Key, Mapping[str, Any]]]:
        """The objects the API server would have sent: same selectors, kind filled in."""
        out: list[tuple[Key, Mapping[str, Any]]] = []
        seen: set[Key] = set()
        for obj in objs:
            key = object_key(obj, kind)
            if key is None:
                self.stats.malformed += 1
                log.warning("file %s: skipping %s without metadata.name", self.path, kind.value)
                continue
            if key in seen:  # first copy kept, as translation keeps it (plan says the same)
                self.stats.malformed += 1
                log.warning("file %s: %s %s/%s is listed twice: the first one is kept", self.path, kind.value, *key)
                continue
            seen.add(key)
            if kind is Kind.NODE:
                if self.node_name and key[1] != self.node_name:
                    continue
            else:
                labels = obj["metadata"].get("labels")
                if isinstance(labels, dict) and HEADLESS_LABEL in labels:
                    continue
            if "kind" not in obj or "apiVersion" not in obj:
                obj = {"kind": kind.value, "apiVersion": kind.api_version, **obj}
            out.append((key, obj))
        return out
