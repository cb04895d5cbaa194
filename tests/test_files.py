"""Loading objects from files: multi-document YAML, kubectl Lists, typed API lists,
JSON; odd documents become problems, unreadable files a clear error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from k8s_objects import endpoint, endpoint_slice, node, service
from svcproxy.kube.files import LoadedObjects, ObjectFileError, load_objects, parse_objects

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "cluster.yaml"


def names(objs: tuple[dict[str, object], ...]) -> list[str]:
    return [o["metadata"]["name"] for o in objs]  # type: ignore[index]


def test_multi_document_yaml(tmp_path: Path) -> None:
    docs = [service("web"), endpoint_slice("web", endpoints=[endpoint("10.244.0.1")]),
            node("node-a"), None]
    path = tmp_path / "objs.yaml"
    path.write_text(yaml.safe_dump_all(docs) + "---\n")
    got = load_objects(path)
    assert names(got.services) == ["web"]
    assert names(got.endpoint_slices) == ["web-abc12"]
    assert names(got.nodes) == ["node-a"]
    assert got.problems == ()
    assert got.services[0] == service("web")


def test_kubectl_list() -> None:
    text = yaml.safe_dump({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": ""},
                           "items": [service("a"), service("b"), node("node-a")]})
    got = parse_objects(text)
    assert names(got.services) == ["a", "b"]
    assert names(got.nodes) == ["node-a"]


def test_typed_api_list_items_have_no_kind() -> None:
    items = [service("a"), service("b")]
    for item in items:
        del item["kind"], item["apiVersion"]
    slices = [endpoint_slice("a")]
    del slices[0]["kind"]
    text = json.dumps({"kind": "ServiceList", "apiVersion": "v1", "items": items})
    text += "\n---\n" + json.dumps({"kind": "EndpointSliceList", "apiVersion":
                                    "discovery.k8s.io/v1", "items": slices})
    got = parse_objects(text)
    assert names(got.services) == ["a", "b"]
    assert names(got.endpoint_slices) == ["a-abc12"]
    assert got.problems == ()


def test_json_with_tabs() -> None:
    text = json.dumps({"kind": "List", "apiVersion": "v1", "items": [service("a")]}, indent="\t")
    assert "\t" in text
    assert names(parse_objects(text).services) == ["a"]


def test_json_array() -> None:
    text = json.dumps([service("a"), node("n")])
    got = parse_objects(text)
    assert names(got.services) == ["a"] and names(got.nodes) == ["n"]


def test_unknown_kinds_and_odd_documents_are_problems_not_errors() -> None:
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cfg"}}
    old_slice = endpoint_slice("a") | {"apiVersion": "discovery.k8s.io/v1beta1"}
    text = yaml.safe_dump_all([cm, "just a string", [1, 2], {"metadata": {}}, old_slice,
                               service("a")])
    got = parse_objects(text, source="dump.yaml")
    assert names(got.services) == ["a"]
    assert got.endpoint_slices == ()
    assert [(p.kind, p.severity) for p in got.problems] == [
        ("unknown-kind", "warning"),
        ("malformed-object", "error"),
        ("malformed-object", "error"),
        ("malformed-object", "error"),
        ("unknown-kind", "warning"),
        ("unknown-kind", "warning"),
    ]
    assert got.problems[0].obj == "dump.yaml document 0"
    assert "ConfigMap" in got.problems[0].message
    assert "v1beta1" in got.problems[5].message


def test_empty_file() -> None:
    assert parse_objects("") == LoadedObjects()
    assert parse_objects("---\n---\n") == LoadedObjects()


def test_unparsable_yaml_raises_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("kind: Service\nmetadata: {name: [unclosed\n")
    with pytest.raises(ObjectFileError, match="bad.yaml"):
        load_objects(path)


def test_unreadable_file_raises_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ObjectFileError, match="cannot read"):
        load_objects(tmp_path / "missing.yaml")
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ObjectFileError):
        load_objects(binary)
    # A ValueError, so callers that already handle bad input handle this too.
    assert issubclass(ObjectFileError, ValueError)


def test_example_cluster_file() -> None:
    got = load_objects(EXAMPLE)
    assert got.problems == ()
    assert names(got.nodes) == ["node-a", "node-b"]
    assert sorted(names(got.services)) == ["cart", "db", "frontend", "ingress", "kube-dns",
                                           "payments-api", "web"]
    assert len(got.endpoint_slices) == 8
    for s in got.endpoint_slices:
        labels = s["metadata"]["labels"]
        assert labels["endpointslice.kubernetes.io/managed-by"] == "endpointslice-controller.k8s.io"
        assert "uid" in s["metadata"] and "resourceVersion" in s["metadata"]


def test_nothing_is_not_an_empty_cluster_but_an_empty_list_is() -> None:
    for text in ("", "\n", "just a scalar\n", "---\n---\n", "[]", "kind: ConfigMap\n",
                 "kind: Service\napiVersion: v1\n", "kind: Service\nmetadata: {name: ''}\n"):
        got = parse_objects(text)
        assert got.empty and not got.explicit_empty, text
    for text in ('{"apiVersion": "v1", "kind": "List", "items": []}', "kind: ServiceList\nitems: []\n"):
        got = parse_objects(text)
        assert got.empty and got.explicit_empty, text
    assert not parse_objects(yaml.safe_dump(service("web"))).empty


def test_a_yaml_alias_bomb_is_refused_at_once() -> None:
    """A few hundred bytes that expand to 9**9 strings (used to take 25 s and 440 MB)."""
    bomb = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    prev = "a"
    for name in "bcdefghi":
        bomb += f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]\n"
        prev = name
    assert len(bomb) < 600
    with pytest.raises(ObjectFileError, match="aliases expand"):
        parse_objects(bomb)


def test_reasonable_aliases_still_load() -> None:
    text = ("kind: List\napiVersion: v1\nitems:\n"
            "- {apiVersion: v1, kind: Service, metadata: {name: a, namespace: x, labels: &l {team: t}},"
            " spec: {clusterIP: 10.96.0.1, ports: &p [{port: 80}]}}\n"
            "- {apiVersion: v1, kind: Service, metadata: {name: b, namespace: x, labels: *l},"
            " spec: {clusterIP: 10.96.0.2, ports: *p}}\n")
    got = parse_objects(text)
    assert names(got.services) == ["a", "b"] and got.services[1]["spec"]["ports"] == [{"port": 80}]


@pytest.mark.parametrize("text", ["[" * 2000 + "]" * 2000, '{"a":' * 5000 + "1" + "}" * 5000,
                                  "- " * 3000 + "x\n", "[" * 900 + "]" * 900])
def test_deep_nesting_is_a_clear_error_or_harmless_never_a_traceback(text: str) -> None:
    try:
        got = parse_objects(text)
    except ObjectFileError as exc:
        assert "\n" not in str(exc) and ("nested" in str(exc) or "nesting" in str(exc))
    else:
        assert got.empty


def test_an_alias_cycle_is_refused() -> None:
    """A Service whose spec contains itself: nothing could compare or copy it later."""
    with pytest.raises(ObjectFileError, match="cycle"):
        parse_objects("kind: Service\napiVersion: v1\nmetadata: {name: a}\nspec: &s {clusterIP: 10.96.0.1, self: *s}\n")
