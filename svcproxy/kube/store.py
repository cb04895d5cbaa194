"""The last known copy of every watched object, and the events that change it.

Both sources (the API server watcher and the file source) keep one ``Store`` per kind
and push every list, watch event or file read through it, so the reconcile loop sees
one uniform stream of ``Event``s whatever the source:

* a (re)list or file read *replaces* the store: what vanished becomes ``DELETED``, what
  appeared ``ADDED``, what changed ``MODIFIED``, and what is unchanged produces nothing
  (a relist after a 410 is then exactly the changes missed while disconnected);
* a watch event is normalised against what is stored: a replayed event carrying a
  resourceVersion we already hold is dropped (no duplicates after a reconnect), an
  ``ADDED`` for a key we hold becomes ``MODIFIED`` and vice versa, and a ``DELETED`` for
  an unknown key is dropped.

"Unchanged" means the same ``metadata.resourceVersion`` for API objects (the server
bumps it on every write, comparing it is O(1)) and equal content for file objects
(hand-written files rarely carry a resourceVersion, or do not bump it when edited).

This module is pure: no I/O, no threads, no clock.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Literal, Mapping

from svcproxy.kube.objects import NamespacedName, namespaced_name

ADDED = "ADDED"
MODIFIED = "MODIFIED"
DELETED = "DELETED"

Key = NamespacedName


class Kind(str, enum.Enum):
    """The three watched resources; values are the API ``kind`` names."""

    SERVICE = "Service"
    ENDPOINT_SLICE = "EndpointSlice"
    NODE = "Node"

    @property
    def api_version(self) -> str:
        return "discovery.k8s.io/v1" if self is Kind.ENDPOINT_SLICE else "v1"


@dataclass(frozen=True, slots=True)
class Event:
    """One change of one object, as the reconcile loop consumes it.

    ``key`` is ``(namespace, name)`` as ``objects.namespaced_name`` spells it.
    For ``DELETED`` ``obj`` is the last state known (the server's final copy when the
    deletion was watched, the cached copy when it was found by a relist).
    """

    kind: Kind
    type: str  # "ADDED" | "MODIFIED" | "DELETED"
    obj: Mapping[str, Any]
    key: Key


def object_key(obj: Any, kind: Kind) -> Key | None:
    """``(namespace, name)`` of a raw object, or None when it is not a usable object.

    Sources hand on what they parsed from JSON or YAML, so both the object and its
    metadata must be plain dicts; naming rules are those of ``objects.namespaced_name``.
    """
    if not isinstance(obj, dict) or not isinstance(obj.get("metadata"), dict):
        return None
    return namespaced_name(obj, cluster_scoped=kind is Kind.NODE)


def resource_version(obj: Mapping[str, Any]) -> str:
    """``metadata.resourceVersion`` of a raw object, ``""`` when absent."""
    meta = obj.get("metadata")
    if isinstance(meta, dict):
        rv = meta.get("resourceVersion")
        if isinstance(rv, str):
            return rv
    return ""


class Store:
    """Objects of one kind by key; turns lists and watch events into ``Event``s."""

    def __init__(self, kind: Kind, *, compare: Literal["version", "content"] = "version") -> None:
        self.kind = kind
        self._by_content = compare == "content"
        self._objects: dict[Key, Mapping[str, Any]] = {}

    def __len__(self) -> int:
        return len(self._objects)

    def __contains__(self, key: object) -> bool:
        return key in self._objects

    def __iter__(self) -> Iterator[Key]:
        return iter(self._objects)

    def get(self, key: Key) -> Mapping[str, Any] | None:
        return self._objects.get(key)

    def snapshot(self) -> dict[Key, Mapping[str, Any]]:
        """A shallow copy of the current content (the objects themselves are shared)."""
        return dict(self._objects)

    def _same(self, old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
        if self._by_content:
            return old == new
        rv = resource_version(new)
        return bool(rv) and rv == resource_version(old)

    def replace(self, items: Iterable[tuple[Key, Mapping[str, Any]]]) -> list[Event]:
        """Make the store hold exactly ``items``; return the events that got it there.

        Deletions come first, then additions and modifications, each in key order, so
        the result is deterministic whatever order the server listed things in. When a
        key repeats in ``items`` the last copy wins.
        """
        new: dict[Key, Mapping[str, Any]] = {}
        for key, obj in items:
            new[key] = obj
        old = self._objects
        events = [Event(self.kind, DELETED, old[k], k) for k in sorted(old.keys() - new.keys())]
        for key in sorted(new):
            before = old.get(key)
            if before is None:
                events.append(Event(self.kind, ADDED, new[key], key))
            elif not self._same(before, new[key]):
                events.append(Event(self.kind, MODIFIED, new[key], key))
            else:
                new[key] = before  # keep the identical object the consumer already has
        self._objects = new
        return events

    def apply(self, type_: str, key: Key, obj: Mapping[str, Any]) -> Event | None:
        """Apply one watch event; None when it changes nothing (replay, unknown delete)."""
        before = self._objects.get(key)
        if type_ == DELETED:
            if before is None:
                return None
            del self._objects[key]
            return Event(self.kind, DELETED, obj, key)
        if type_ not in (ADDED, MODIFIED):
            raise ValueError(f"not a watch event type: {type_!r}")
        if before is not None and self._same(before, obj):
            return None
        self._objects[key] = obj
        return Event(self.kind, MODIFIED if before is not None else ADDED, obj, key)
