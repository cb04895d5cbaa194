"""Kubernetes objects from a file, for ``svcproxy plan -f`` and for tests.

Accepts what people actually have at hand: multi-document YAML, the ``kind: List``
that ``kubectl get -o yaml`` prints, typed lists straight from the API
(``ServiceList`` ...; their items carry no ``kind``) and JSON. Unknown kinds and odd
documents are reported as problems, not errors, so one stray ConfigMap in a dump does
not stop a plan; only a file that cannot be read or parsed at all raises.

A file is written by hand or by a script, so YAML goes through ``safe_yaml`` (alias
bombs and absurd nesting refused) and JSON nested too deep for the parser is an error.
A file with no objects at all is not the same as an empty
cluster: ``LoadedObjects.explicit_empty`` says whether it spelled one out (an empty
List), and only then may a caller take it as "remove everything".
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

from svcproxy import safe_yaml
from svcproxy.kube.objects import namespaced_name
from svcproxy.kube.translate import Problem


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
    #: The file holds a List with no items: an empty cluster on purpose.
    explicit_empty: bool = False

    @property
    def empty(self) -> bool:
        """No usable Service, EndpointSlice or Node at all (nameless ones are problems)."""
        return not (self.services or self.endpoint_slices or self.nodes)

    @property
    def lacks_services(self) -> bool:
        """No Service, and not an empty List: not a cluster to plan, since taking it as
        one would remove every virtual service. Every real cluster has at least the
        ``kubernetes`` Service, so such a file is a mistake (``kubectl get nodes``)."""
        return not self.services and not self.explicit_empty


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
        except RecursionError:
            raise ObjectFileError(f"{source}: nested too deeply") from None
        except ValueError:
            pass
    try:
        return safe_yaml.load_all(text)
    except safe_yaml.YamlError as exc:
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
    try:
        return _sorted_objects(_documents(text, source), source)
    except RecursionError:  # JSON lists nested hundreds deep
        raise ObjectFileError(f"{source}: nested too deeply") from None


def _sorted_objects(documents: list[Any], source: str) -> LoadedObjects:
    buckets: dict[str, list[dict[str, Any]]] = {name: [] for _, name in _KINDS.values()}
    problems: list[Problem] = []
    empty_list = False
    for n, doc in enumerate(documents):
        if doc is None:
            continue  # empty document, e.g. a trailing "---"
        empty_list = empty_list or (isinstance(doc, Mapping) and doc.get("items") == []
                                    and str(doc.get("kind", "")).endswith("List"))
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
            if namespaced_name(obj, cluster_scoped=kind == "Node") is None:
                problems.append(Problem("malformed-object", where, f"{kind} without a usable metadata.name"))
                continue
            buckets[bucket].append(obj)
    return LoadedObjects(
        services=tuple(buckets["services"]),
        endpoint_slices=tuple(buckets["endpoint_slices"]),
        nodes=tuple(buckets["nodes"]),
        problems=tuple(problems),
        explicit_empty=empty_list,
    )
