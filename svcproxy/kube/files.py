"""Kubernetes objects from a file, for ``svcproxy plan -f`` and for tests.

Accepts what people actually have at hand: multi-document YAML, the ``kind: List``
that ``kubectl get -o yaml`` prints, typed lists straight from the API
(``ServiceList`` ...; their items carry no ``kind``) and JSON. Unknown kinds and odd
documents are reported as problems, not errors, so one stray ConfigMap in a dump does
not stop a plan; only a file that cannot be read or parsed at all raises.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import yaml

from svcproxy.kube.translate import Problem

_LOADER: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

#: kind -> (accepted apiVersions, field of ``LoadedObjects``)
_KINDS: dict[str, tuple[frozenset[str], str]] = {
    "Service": (frozenset({"v1"}), "services"),
    "EndpointSlice": (frozenset({"discovery.k8s.io/v1"}), "endpoint_slices"),
    "Node": (frozenset({"v1"}), "nodes"),
}


class ObjectFileError(ValueError):
    """The file cannot be read, or is not YAML/JSON at all (a ValueError: bad input)."""


@dataclass(frozen=True)
class LoadedObjects:
    services: tuple[dict[str, Any], ...] = ()
    endpoint_slices: tuple[dict[str, Any], ...] = ()
    nodes: tuple[dict[str, Any], ...] = ()
    problems: tuple[Problem, ...] = ()


def load_objects(path: str | os.PathLike[str]) -> LoadedObjects:
    """Read and sort the objects of one file; raises ObjectFileError if unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ObjectFileError(f"cannot read {os.fspath(path)}: {exc}") from exc
    return parse_objects(text, source=os.fspath(path))


def _documents(text: str, source: str) -> list[Any]:
    stripped = text.lstrip()
    if stripped[:1] in ("{", "["):
        # JSON first: faster, and JSON with tab indentation is not valid YAML.
        try:
            return [json.loads(text)]
        except ValueError:
            pass
    try:
        return list(yaml.load_all(text, Loader=_LOADER))
    except yaml.YAMLError as exc:
        raise ObjectFileError(f"{source}: not valid YAML or JSON: {exc}") from exc


def _flatten(doc: object, where: str, item_kind: str | None) -> Iterator[tuple[str, object, str | None]]:
    """Documents and list items as (where, object, kind implied by a typed list)."""
    if isinstance(doc, Mapping) and isinstance(doc.get("items"), list) and (
        str(doc.get("kind", "")).endswith("List")
    ):
        kind = str(doc["kind"])
        implied = kind[: -len("List")] or None  # "List" implies nothing, "ServiceList" does
        for i, item in enumerate(doc["items"]):
            yield from _flatten(item, f"{where} items[{i}]", implied)
    elif isinstance(doc, list):  # a JSON array of objects
        for i, item in enumerate(doc):
            yield from _flatten(item, f"{where}[{i}]", item_kind)
    else:
        yield where, doc, item_kind


def parse_objects(text: str, source: str = "<string>") -> LoadedObjects:
    """Objects from YAML/JSON text; problems for documents that are not ours."""
    buckets: dict[str, list[dict[str, Any]]] = {name: [] for _, name in _KINDS.values()}
    problems: list[Problem] = []
    for n, doc in enumerate(_documents(text, source)):
        if doc is None:
            continue  # empty document, e.g. a trailing "---"
        for where, obj, implied in _flatten(doc, f"{source} document {n}", None):
            if not isinstance(obj, dict):
                problems.append(Problem("malformed-object", where, "not an object"))
                continue
            kind = obj.get("kind", implied)
            if not isinstance(kind, str) or kind not in _KINDS:
                problems.append(
                    Problem("unknown-kind", where, f"kind {kind!r} ignored", "warning")
                )
                continue
            versions, bucket = _KINDS[kind]
            version = obj.get("apiVersion")
            if version is not None and version not in versions:
                problems.append(
                    Problem(
                        "unknown-kind",
                        where,
                        f"{kind} apiVersion {version!r} ignored (want {sorted(versions)[0]})",
                        "warning",
                    )
                )
                continue
            buckets[bucket].append(obj)
    return LoadedObjects(
        services=tuple(buckets["services"]),
        endpoint_slices=tuple(buckets["endpoint_slices"]),
        nodes=tuple(buckets["nodes"]),
        problems=tuple(problems),
    )
