"""The JSON writer of plan/sync: the same document json.loads gives back, one item per line."""

from __future__ import annotations

import json

import pytest

from svcproxy.render import json_text


def test_json_text_round_trips_and_puts_each_list_item_on_its_own_line() -> None:
    doc = {"version": 1, "services": [{"address": "fd00::1", "name": "ünïcode \"quoted\"\n", "n": None,
                                       "ok": True, "ratio": 0.5, "nested": [1, [2, {}]]}, {"x": []}],
           "operations": [], "empty": {}}
    text = json_text(doc)
    assert json.loads(text) == doc
    lines = text.splitlines()
    assert lines[0] == "{" and lines[-1] == "}" and text.endswith("}\n")
    assert sum(line.startswith("    {") for line in lines) == 2  # one line per service
    assert all(ord(ch) < 128 for ch in text)  # ASCII, as json.dumps writes by default


def test_json_text_refuses_what_json_refuses() -> None:
    with pytest.raises(TypeError):
        json_text({"services": [{"bad": object()}]})
    with pytest.raises(TypeError):
        json_text({"set": {1, 2}})


def test_the_plan_writer_writes_exactly_what_encoding_the_plan_document_gives() -> None:
    """plan_json_text is the fast path of json_text(plan_json(...)): same bytes, for
    every kind of operation, settings, fwmark keys, origins needing escapes."""
    from svcproxy.kube.translate import Origin
    from svcproxy.model import Destination, Forward, OpKind, Operation, Protocol, ServiceKey, Table, VirtualService
    from svcproxy.render import plan_json, plan_json_text

    web = ServiceKey(Protocol.TCP, "10.96.0.20", 80)
    v6 = ServiceKey(Protocol.UDP, "fd00::a", 53)
    mark = ServiceKey(Protocol.TCP, "0.0.0.0", 0, fwmark=7)
    desired = Table.of([
        VirtualService(web, "wlc", 1800, frozenset({"sh-port", "ops"}),
                       (Destination("10.244.1.5", 8080), Destination("10.244.2.7", 8080, 0, Forward.ROUTE))),
        VirtualService(v6, destinations=(Destination("fd00::5", 53),)),
        VirtualService(mark),
    ])
    ops = [Operation(OpKind.DELETE_DESTINATION, web, destination=Destination("10.244.9.9", 8080)),
           Operation(OpKind.DELETE_SERVICE, ServiceKey(Protocol.SCTP, "10.96.0.99", 9)),
           Operation(OpKind.EDIT_SERVICE, web, "wlc", 1800, frozenset({"sh-port", "ops"})),
           Operation(OpKind.ADD_SERVICE, v6),
           Operation(OpKind.ADD_DESTINATION, v6, destination=Destination("fd00::5", 53)),
           Operation(OpKind.EDIT_DESTINATION, web, destination=Destination("10.244.2.7", 8080, 0, Forward.ROUTE))]
    origins = {web: (Origin("shop", 'we"b\\\u00e9', "http", "ClusterIP"), Origin("shop", "web", "80", "externalIP"))}
    extra = {"applied": 6, "failed": [{"operation": "x", "error": "no"}], "pod_namespaces": []}
    assert plan_json_text(desired, ops, origins, extra) == json_text({**plan_json(desired, ops, origins), **extra})
    assert plan_json_text(Table(), []) == json_text(plan_json(Table(), []))
    assert json.loads(plan_json_text(desired, ops, origins))["services"][0]["origin"][0]["name"] == 'we"b\\\u00e9'
