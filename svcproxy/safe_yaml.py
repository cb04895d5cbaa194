"""YAML from files people write: PyYAML's safe loader, with the two cheap attacks refused.

A few hundred bytes of nested aliases (the "billion laughs") expand to hundreds of
millions of nodes when anything walks the result, and nesting thousands deep ends in
a RecursionError somewhere far from the file. Both are refused here, before anything
is built, with a one-line ``YamlError``. Text without an anchor (``&``) cannot hold an
alias and goes straight to the (C) loader, so ordinary files pay nothing.
"""

from __future__ import annotations

from typing import Any

import yaml

_BASE_LOADER: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _Loader(_BASE_LOADER):  # type: ignore[valid-type,misc]  # chosen at import time
    """The safe loader, refusing a key written twice in one mapping (YAML forbids it;
    PyYAML would keep the last value silently, as Kubernetes' strict decoding does not)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[tuple[str, str]] = set()
        for key_node, _ in node.value:  # before "<<" merges, which may override on purpose
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != _MERGE_TAG:
                key = (key_node.tag, key_node.value)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key_node.value!r}", key_node.start_mark)
                seen.add(key)
        result: dict[Any, Any] = super().construct_mapping(node, deep)
        return result


_LOADER: type[yaml.SafeLoader] = _Loader

#: Deepest nesting accepted where aliases are checked (Kubernetes objects: about 8).
MAX_DEPTH = 100
#: Most YAML nodes aliases may add to a document once followed (beyond its own nodes).
MAX_ALIAS_NODES = 100_000


class YamlError(ValueError):
    """Not YAML, or YAML refused; the message is one line."""


def load_all(text: str) -> list[Any]:
    """Every document of ``text``; raises YamlError."""
    try:
        if "&" not in text:
            return list(yaml.load_all(text, Loader=_LOADER))
        return _checked_documents(text)
    except yaml.YAMLError as exc:
        raise YamlError(" ".join(str(exc).split())) from exc
    except RecursionError:
        raise YamlError("nested too deeply") from None


def load(text: str) -> Any:
    """The one document of ``text`` (None when empty); raises YamlError."""
    docs = load_all(text)
    if len(docs) > 1:
        raise YamlError(f"expected one document, found {len(docs)}")
    return docs[0] if docs else None


def _checked_documents(text: str) -> list[Any]:
    loader = _LOADER(text)
    try:
        docs = []
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                continue
            _check_nodes(node)
            docs.append(loader.construct_document(node))
        return docs
    finally:
        loader.dispose()


def _check_nodes(root: yaml.Node) -> None:
    """Refuse a document nested deeper than MAX_DEPTH, with an alias cycle (nothing
    could compare or copy it), or whose aliases would add more than MAX_ALIAS_NODES
    nodes. Each distinct node is visited once."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()  # on the path from the root: meeting one again is a cycle

    def size(node: yaml.Node, depth: int) -> int:
        if depth > MAX_DEPTH:
            raise YamlError(f"nested deeper than {MAX_DEPTH} levels")
        if id(node) in open_nodes:
            raise YamlError("an alias refers to a node that contains it (a cycle)")
        known = sizes.get(id(node))
        if known is not None:
            return known
        open_nodes.add(id(node))
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(size(child, depth + 1) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total += sum(size(k, depth + 1) + size(v, depth + 1) for k, v in node.value)
        open_nodes.discard(id(node))
        sizes[id(node)] = total
        return total

    if size(root, 0) - len(sizes) > MAX_ALIAS_NODES:
        raise YamlError(f"aliases expand to more than {MAX_ALIAS_NODES:,} extra nodes")
