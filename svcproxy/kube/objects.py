"""The shape and identity of raw API objects: one home for what every reader agrees on.

The watcher, the file source, the store, translation and the reconcile loop all need
to name an object, find the Service an EndpointSlice belongs to and read the same
well-known labels. Each doing it on its own is how they came to disagree: a Service
without ``metadata.namespace`` (the file source never adds one) was keyed under ``""``
by some and ``"default"`` by others, so the same Service looked like two. Here a
missing namespace of a namespaced object means ``"default"``, as kubectl reads it;
cluster-scoped objects (Nodes) have the namespace ``""``.

Pure: plain dicts in, strings and tuples out.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: ``(namespace, name)``; ``""`` as the namespace of cluster-scoped objects.
NamespacedName = tuple[str, str]

DEFAULT_NAMESPACE = "default"

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
PROXY_NAME_LABEL = "service.kubernetes.io/service-proxy-name"
HEADLESS_LABEL = "service.kubernetes.io/headless"
ZONE_LABEL = "topology.kubernetes.io/zone"
SCHEDULER_ANNOTATION = "svcproxy.io/scheduler"
#: When the change that produced an EndpointSlice happened (network programming latency).
TRIGGER_TIME_ANNOTATION = "endpoints.kubernetes.io/last-change-trigger-time"

#: For isinstance: plain dicts first (what clients and YAML give), cheap to check.
_MAPPING = (dict, Mapping)


def metadata(obj: object) -> Mapping[str, Any] | None:
    """``obj.metadata`` when both are mappings, else None."""
    if not isinstance(obj, _MAPPING):
        return None
    meta = obj.get("metadata")
    return meta if isinstance(meta, _MAPPING) else None


def namespaced_name(obj: object, *, cluster_scoped: bool = False) -> NamespacedName | None:
    """``(namespace, name)`` of a raw object, or None when it cannot be named.

    A missing, null or empty namespace is ``"default"`` (``""`` for cluster-scoped
    objects, whose namespace is ignored); a name that is not a non-empty string, or a
    namespace that is not a string, makes the object unusable.
    """
    meta = metadata(obj)
    if meta is None:
        return None
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        return None
    if cluster_scoped:
        return ("", name)
    namespace = meta.get("namespace")
    if namespace is None or namespace == "":
        return (DEFAULT_NAMESPACE, name)
    if not isinstance(namespace, str):
        return None
    return (namespace, name)


def slice_service(obj: object) -> NamespacedName | None:
    """The Service an EndpointSlice belongs to (its service-name label, same namespace)."""
    nn = namespaced_name(obj)
    meta = metadata(obj)
    labels = meta.get("labels") if meta is not None else None
    if nn is None or not isinstance(labels, _MAPPING):
        return None
    service = labels.get(SERVICE_NAME_LABEL)
    return (nn[0], service) if isinstance(service, str) and service else None


def display_name(kind: str, obj: object) -> str:
    """``"Service ns/name"`` for messages, as far as the object allows."""
    meta = metadata(obj)
    if meta is None:
        return f"{kind} <unnamed>"
    ns, name = meta.get("namespace"), meta.get("name")
    ns_text = ns if isinstance(ns, str) and ns else DEFAULT_NAMESPACE
    name_text = name if isinstance(name, str) and name else "<unnamed>"
    return f"{kind} {ns_text}/{name_text}"
