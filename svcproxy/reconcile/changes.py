"""What the watchers reported, and what changed since the last sync.

The watcher threads only ever touch this: each event updates the node-local copy of
the cluster (``ClusterState``) and marks what it touches (a Service, or the Node) as
changed; the loop takes the changes all at once when it syncs, and puts them back if
the sync could not run. Nothing here talks to the kernel, so an event costs a few
dictionary operations however busy the loop is.

The initialized gate lives here too: nothing may be programmed before Services and
EndpointSlices (and, for the agent, the Node) have each been listed once, or a
restarted agent would delete the rules of every Service it has not seen yet.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Mapping

from svcproxy.kube.objects import TRIGGER_TIME_ANNOTATION, NamespacedName, namespaced_name, slice_service
from svcproxy.kube.store import Kind

Snapshot = dict[NamespacedName, tuple[Mapping[str, Any] | None, list[Mapping[str, Any]]]]


@dataclass
class ClusterState:
    """The objects the watchers reported, indexed the way translation reads them."""

    node_name: str
    services: dict[NamespacedName, Mapping[str, Any]] = field(default_factory=dict)
    slices: dict[NamespacedName, Mapping[str, Any]] = field(default_factory=dict)
    slices_by_service: dict[NamespacedName, dict[NamespacedName, Mapping[str, Any]]] = field(default_factory=dict)
    node: Mapping[str, Any] | None = None

    def apply(self, kind: Kind, event_type: str, obj: Mapping[str, Any]) -> set[NamespacedName] | None:
        """Record one event; returns the Services it touches, or None for a Node change."""
        nn = namespaced_name(obj, cluster_scoped=kind is Kind.NODE)
        if nn is None:
            return set()
        deleted = event_type == "DELETED"
        if kind is Kind.SERVICE:
            if deleted:
                self.services.pop(nn, None)
            else:
                self.services[nn] = obj
            return {nn}
        if kind is Kind.ENDPOINT_SLICE:
            return self._apply_slice(nn, None if deleted else obj)
        if nn[1] == self.node_name:
            self.node = None if deleted else obj
        return None

    def _apply_slice(self, nn: NamespacedName, obj: Mapping[str, Any] | None) -> set[NamespacedName]:
        touched: set[NamespacedName] = set()
        old = self.slices.pop(nn, None)
        old_svc = slice_service(old) if old is not None else None
        if old_svc is not None:
            touched.add(old_svc)
            group = self.slices_by_service.get(old_svc)
            if group is not None:
                group.pop(nn, None)
                if not group:
                    del self.slices_by_service[old_svc]
        if obj is not None:
            self.slices[nn] = obj
            svc = slice_service(obj)
            if svc is not None:
                touched.add(svc)
                self.slices_by_service.setdefault(svc, {})[nn] = obj
        return touched

    def slices_of(self, service: NamespacedName) -> list[Mapping[str, Any]]:
        return list(self.slices_by_service.get(service, {}).values())

    def snapshot(self, only: set[NamespacedName] | None) -> Snapshot:
        """Each named Service (all when ``only`` is None) with its slices; a deleted
        Service appears with None."""
        names = self.services.keys() if only is None else only
        return {nn: (self.services.get(nn), self.slices_of(nn)) for nn in names}

    def orphan_slices(self) -> list[Mapping[str, Any]]:
        """Slices whose Service does not exist."""
        return [s for nn, group in self.slices_by_service.items()
                if nn not in self.services for s in group.values()]


@dataclass(frozen=True)
class Changes:
    """What a sync takes from the tracker: changed Services, the Node, trigger times."""

    services: frozenset[NamespacedName]
    node: bool
    triggers: tuple[float, ...]


def parse_trigger_time(text: object) -> float | None:
    if not isinstance(text, str):
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


class ChangeTracker:
    """Thread-safe: watchers record, the loop takes. ``lock`` also guards ``state``."""

    def __init__(self, node_name: str, *, wait_for_node: bool) -> None:
        self.lock = threading.RLock()
        self.state = ClusterState(node_name=node_name)
        self._wanted = frozenset({Kind.SERVICE, Kind.ENDPOINT_SLICE} | ({Kind.NODE} if wait_for_node else set()))
        self._listed: set[Kind] = set()
        self._dirty: set[NamespacedName] = set()
        self._node_dirty = True
        self._triggers: list[float] = []

    def record(self, kind: Kind, event_type: str, obj: Mapping[str, Any]) -> None:
        with self.lock:
            touched = self.state.apply(kind, event_type, obj)
            if touched is None:
                self._node_dirty = True
            else:
                self._dirty |= touched
            if kind is Kind.ENDPOINT_SLICE and event_type != "DELETED":
                annotations = (obj.get("metadata") or {}).get("annotations")
                if isinstance(annotations, Mapping):
                    trigger = parse_trigger_time(annotations.get(TRIGGER_TIME_ANNOTATION))
                    if trigger is not None:
                        self._triggers.append(trigger)

    def listed(self, kind: Kind) -> None:
        with self.lock:
            self._listed.add(kind)

    @property
    def initialized(self) -> bool:
        with self.lock:
            return self._wanted <= self._listed

    @property
    def node_changed(self) -> bool:
        with self.lock:
            return self._node_dirty

    def node_dirty(self) -> None:
        """Something translation reads besides the objects changed (node addresses)."""
        with self.lock:
            self._node_dirty = True

    @property
    def services_pending(self) -> bool:
        """A Service (or its slices) changed since the last take."""
        with self.lock:
            return bool(self._dirty)

    def take(self, *, services_only: bool = False) -> Changes:
        """Everything recorded since the last take; ``services_only`` leaves a Node
        change for later (it needs a full sync)."""
        with self.lock:
            node = self._node_dirty and not services_only
            changes = Changes(frozenset(self._dirty), node, tuple(self._triggers))
            self._dirty, self._triggers = set(), []
            self._node_dirty = self._node_dirty and not node
            return changes

    def put_back(self, changes: Changes) -> None:
        """A sync that could not run: its changes wait for the next one (triggers are
        dropped: the latency they measure ends when the change reaches the kernel)."""
        with self.lock:
            self._dirty |= changes.services
            self._node_dirty = self._node_dirty or changes.node
