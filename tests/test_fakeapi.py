"""The fake apiserver itself: the protocol details the watcher tests rely on, checked at
the HTTP level (http.client) and through the official client's typed models, plus
every fault it can inject and the standalone mode."""

from __future__ import annotations

import base64
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import kubernetes
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from fakeapi import FakeApiServer, label_matcher  # noqa: E402

TOKEN = {"Authorization": "Bearer fake-token"}


def svc(name: str, ns: str = "default", **labels: str) -> dict[str, Any]:
    return {"kind": "Service", "metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": {"clusterIP": "10.96.0.1", "ports": [{"port": 80}]}}


@pytest.fixture
def fake() -> Iterator[FakeApiServer]:
    with FakeApiServer(bookmark_interval=None) as server:
        yield server


def get(fake: FakeApiServer, path: str, timeout: float = 5.0) -> tuple[int, Any, http.client.HTTPResponse]:
    conn = http.client.HTTPConnection("127.0.0.1", fake.port, timeout=timeout)
    conn.request("GET", path, headers=TOKEN)
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp.status, json.loads(body) if body else None, resp


def watch_lines(fake: FakeApiServer, path: str, timeout: float = 5.0) -> Iterator[dict[str, Any]]:
    """Events of a watch, decoded; ends when the server ends the stream."""
    conn = http.client.HTTPConnection("127.0.0.1", fake.port, timeout=timeout)
    conn.request("GET", path, headers=TOKEN)
    resp = conn.getresponse()
    assert resp.status == 200
    assert resp.getheader("Transfer-Encoding") == "chunked"
    assert resp.getheader("Content-Type") == "application/json"
    try:
        while line := resp.readline():
            yield json.loads(line)
    finally:
        conn.close()


# --------------------------------------------------------------------------- objects, lists


def test_objects_have_real_metadata_and_a_global_resource_version(fake: FakeApiServer) -> None:
    a = fake.apply(svc("a"))
    n = fake.apply({"kind": "Node", "metadata": {"name": "n1", "namespace": "ignored"}})
    a2 = fake.apply({**svc("a"), "spec": {"clusterIP": "10.96.0.2"}})
    meta = a2["metadata"]
    assert int(a["metadata"]["resourceVersion"]) < int(n["metadata"]["resourceVersion"]) < int(meta["resourceVersion"])
    assert meta["uid"] == a["metadata"]["uid"] and meta["creationTimestamp"].endswith("Z")
    assert meta["generation"] == 2 and meta["managedFields"][0]["manager"] == "fakeapi"
    assert a2["status"] == {"loadBalancer": {}} and a2["apiVersion"] == "v1"
    assert "namespace" not in n["metadata"]
    deleted = fake.delete("services", "default", "a")
    assert deleted is not None and int(deleted["metadata"]["resourceVersion"]) > int(meta["resourceVersion"])
    assert fake.delete("Service", "default", "a") is None


def test_list_shape_and_label_selectors(fake: FakeApiServer) -> None:
    fake.apply(svc("plain"))
    fake.apply(svc("hl", **{"service.kubernetes.io/headless": ""}))
    fake.apply(svc("mine", **{"service.kubernetes.io/service-proxy-name": "svcproxy"}))
    fake.apply(svc("other", ns="kube-system", **{"service.kubernetes.io/service-proxy-name": "other"}))
    status, body, resp = get(fake, "/api/v1/services")
    assert status == 200 and resp.getheader("Content-Type") == "application/json"
    assert body["kind"] == "ServiceList" and body["apiVersion"] == "v1"
    assert body["metadata"]["resourceVersion"] == fake.resource_version and "continue" not in body["metadata"]
    assert all("kind" not in item and "apiVersion" not in item for item in body["items"])

    def names(selector: str, path: str = "/api/v1/services") -> list[str]:
        status, body, _ = get(fake, f"{path}?labelSelector={selector}")
        assert status == 200, body
        return [i["metadata"]["name"] for i in body["items"]]

    assert sorted(names("!service.kubernetes.io/headless")) == ["mine", "other", "plain"]
    assert names("service.kubernetes.io/headless") == ["hl"]
    assert names("service.kubernetes.io/service-proxy-name=svcproxy") == ["mine"]
    assert sorted(names("service.kubernetes.io/service-proxy-name!=svcproxy")) == ["hl", "other", "plain"]
    assert names("service.kubernetes.io/service-proxy-name%20in%20(other,x)") == ["other"]
    assert names("!service.kubernetes.io/headless,service.kubernetes.io/service-proxy-name%20notin%20(other)") \
        == ["mine", "plain"]
    assert names("", "/api/v1/namespaces/kube-system/services") == ["other"]
    status, body, _ = get(fake, "/api/v1/services?labelSelector=a%20b")
    assert status == 400 and body["kind"] == "Status" and body["reason"] == "BadRequest"
    assert not label_matcher("a=b")({"a": "c"}) and label_matcher("a==b")({"a": "b"})


def test_pagination_is_a_consistent_snapshot_and_tokens_expire(fake: FakeApiServer) -> None:
    for i in range(5):
        fake.apply(svc(f"s{i}"))
    status, page1, _ = get(fake, "/api/v1/services?limit=2")
    meta = page1["metadata"]
    assert [i["metadata"]["name"] for i in page1["items"]] == ["s0", "s1"]
    assert meta["remainingItemCount"] == 3 and meta["continue"]
    fake.delete("Service", "default", "s3")  # after the snapshot: must not show
    fake.apply(svc("s9"))
    status, page2, _ = get(fake, f"/api/v1/services?limit=2&continue={meta['continue']}")
    status, page3, _ = get(fake, f"/api/v1/services?limit=2&continue={page2['metadata']['continue']}")
    assert [i["metadata"]["name"] for i in page2["items"] + page3["items"]] == ["s2", "s3", "s4"]
    assert page2["metadata"]["resourceVersion"] == page3["metadata"]["resourceVersion"] == meta["resourceVersion"]
    assert "continue" not in page3["metadata"]
    status, page1b, _ = get(fake, "/api/v1/services?limit=2")
    fake.expire_continue_tokens()
    status, body, _ = get(fake, f"/api/v1/services?limit=2&continue={page1b['metadata']['continue']}")
    assert status == 410 and body["kind"] == "Status" and body["reason"] == "Expired" and body["code"] == 410
    # etcd compaction expires tokens of older snapshots too
    status, page1c, _ = get(fake, "/api/v1/services?limit=2")
    fake.apply(svc("bump"))
    fake.compact()
    assert get(fake, f"/api/v1/services?limit=2&continue={page1c['metadata']['continue']}")[0] == 410
    bad = base64.urlsafe_b64encode(b"junk").decode()
    assert get(fake, f"/api/v1/services?continue={bad}")[0] == 400


def test_nodes_field_selector_endpointslices_single_gets_and_404s(fake: FakeApiServer) -> None:
    for name in ("n1", "n2"):
        fake.apply({"kind": "Node", "metadata": {"name": name}})
    fake.apply({"kind": "EndpointSlice", "metadata": {"name": "e1", "namespace": "x"}, "addressType": "IPv4"})
    status, body, _ = get(fake, "/api/v1/nodes?fieldSelector=metadata.name%3Dn2")
    assert [i["metadata"]["name"] for i in body["items"]] == ["n2"] and body["kind"] == "NodeList"
    status, body, _ = get(fake, "/api/v1/nodes?fieldSelector=metadata.name!%3Dn2")
    assert [i["metadata"]["name"] for i in body["items"]] == ["n1"]
    assert get(fake, "/api/v1/nodes?fieldSelector=spec.unschedulable%3Dtrue")[0] == 400
    status, body, _ = get(fake, "/apis/discovery.k8s.io/v1/namespaces/x/endpointslices")
    assert body["kind"] == "EndpointSliceList" and body["apiVersion"] == "discovery.k8s.io/v1"
    assert get(fake, "/apis/discovery.k8s.io/v1/endpointslices")[1]["items"][0]["metadata"]["name"] == "e1"
    status, body, _ = get(fake, "/api/v1/nodes/n1")
    assert status == 200 and body["kind"] == "Node"
    status, body, _ = get(fake, "/api/v1/nodes/zz")
    assert status == 404 and body["reason"] == "NotFound"
    assert get(fake, "/api/v1/endpointslices")[0] == 404  # wrong group
    assert get(fake, "/api/v1/namespaces/x/nodes")[0] == 404  # cluster-scoped
    status, body, _ = get(fake, "/version")
    assert status == 200 and body["major"] == "1"


def test_the_official_client_works_with_the_kubeconfig_and_the_token(fake: FakeApiServer, tmp_path: Path) -> None:
    fake.apply(svc("a"))
    fake.apply({"kind": "Node", "metadata": {"name": "n1"}})
    client = kubernetes.config.new_client_from_config(config_file=fake.write_kubeconfig(tmp_path / "kc"))
    try:
        core = kubernetes.client.CoreV1Api(client)
        services = core.list_service_for_all_namespaces()
        assert [s.metadata.name for s in services.items] == ["a"]
        assert services.items[0].metadata.resource_version and services.items[0].spec.cluster_ip == "10.96.0.1"
        assert core.list_node(field_selector="metadata.name=n1").items[0].metadata.name == "n1"
    finally:
        client.close()
    status, body, _ = get(fake, "/api/v1/nodes")  # with the token: fine
    conn = http.client.HTTPConnection("127.0.0.1", fake.port, timeout=5)
    conn.request("GET", "/api/v1/nodes")
    resp = conn.getresponse()
    assert resp.status == 401 and json.loads(resp.read())["reason"] == "Unauthorized"
    conn.close()


# --------------------------------------------------------------------------- watches


def test_watch_replays_streams_and_ends_cleanly_after_timeout(fake: FakeApiServer) -> None:
    fake.apply(svc("a"))
    rv = fake.resource_version
    fake.apply(svc("b"))
    fake.apply(svc("hl", **{"service.kubernetes.io/headless": ""}))

    def later() -> None:
        time.sleep(0.2)
        fake.apply(svc("a", changed="yes"))
        fake.apply({"kind": "Node", "metadata": {"name": "n"}})  # another resource
        fake.delete("Service", "default", "b")

    threading.Thread(target=later, daemon=True).start()
    t0 = time.monotonic()
    events = list(watch_lines(fake, f"/api/v1/services?watch=1&resourceVersion={rv}&timeoutSeconds=1"
                                    "&labelSelector=!service.kubernetes.io/headless"))
    assert 1.0 <= time.monotonic() - t0 < 2.0  # closed (terminating chunk) at timeoutSeconds
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == \
        [("ADDED", "b"), ("MODIFIED", "a"), ("DELETED", "b")]
    assert events[0]["object"]["kind"] == "Service"  # watch objects carry kind, list items do not
    rvs = [int(e["object"]["metadata"]["resourceVersion"]) for e in events]
    assert rvs == sorted(rvs) and rvs[0] > int(rv)


def test_watch_without_resource_version_starts_with_synthetic_adds(fake: FakeApiServer) -> None:
    fake.apply(svc("a"))
    fake.apply(svc("b"))
    for rv in ("", "0"):
        events = list(watch_lines(fake, f"/api/v1/services?watch=true&resourceVersion={rv}&timeoutSeconds=1"))
        assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [("ADDED", "a"), ("ADDED", "b")]


def test_label_transitions_become_added_and_deleted(fake: FakeApiServer) -> None:
    fake.apply(svc("a"))
    rv = fake.resource_version
    fake.apply(svc("a", **{"service.kubernetes.io/headless": ""}))
    fake.apply(svc("a"))
    events = list(watch_lines(fake, f"/api/v1/services?watch=1&resourceVersion={rv}&timeoutSeconds=1"
                                    "&labelSelector=!service.kubernetes.io/headless"))
    assert [e["type"] for e in events] == ["DELETED", "ADDED"]


def test_bookmarks_only_when_allowed(fake: FakeApiServer) -> None:
    rv = fake.resource_version
    threading.Timer(0.2, fake.bookmark).start()
    threading.Timer(0.3, fake.apply, args=({"kind": "Node", "metadata": {"name": "n"}},)).start()
    threading.Timer(0.5, fake.bookmark).start()
    with_bm = list(watch_lines(fake, f"/api/v1/services?watch=1&resourceVersion={rv}&timeoutSeconds=1"
                                     "&allowWatchBookmarks=true"))
    assert [e["type"] for e in with_bm] == ["BOOKMARK", "BOOKMARK"]
    assert with_bm[0]["object"] == {"kind": "Service", "apiVersion": "v1", "metadata": {"resourceVersion": rv}}
    assert int(with_bm[1]["object"]["metadata"]["resourceVersion"]) == int(rv) + 1  # the Node write
    threading.Timer(0.2, fake.bookmark).start()
    assert list(watch_lines(fake, f"/api/v1/services?watch=1&resourceVersion={rv}&timeoutSeconds=1")) == []


def test_periodic_bookmarks() -> None:
    with FakeApiServer(bookmark_interval=0.2) as fake:
        events = list(watch_lines(fake, f"/api/v1/nodes?watch=1&resourceVersion={fake.resource_version}"
                                        "&timeoutSeconds=1&allowWatchBookmarks=1"))
        assert 3 <= len(events) <= 5 and {e["type"] for e in events} == {"BOOKMARK"}


def test_too_old_resource_versions_get_410_in_both_forms(fake: FakeApiServer) -> None:
    fake.apply(svc("a"))
    old = fake.resource_version
    fake.apply(svc("b"))
    fake.compact()
    events = list(watch_lines(fake, f"/api/v1/services?watch=1&resourceVersion={old}"))
    assert len(events) == 1 and events[0]["type"] == "ERROR"
    status = events[0]["object"]
    assert status["kind"] == "Status" and status["code"] == 410 and status["reason"] == "Expired"
    assert "too old resource version" in status["message"]
    # the current resourceVersion is still fine after a compaction
    assert list(watch_lines(fake, f"/api/v1/services?watch=1&resourceVersion={fake.resource_version}"
                                  "&timeoutSeconds=1")) == []
    fake.set_watch_410("http")
    code, body, _ = get(fake, f"/api/v1/services?watch=1&resourceVersion={old}")
    assert code == 410 and body["reason"] == "Expired"


def test_a_bounded_history_expires_old_resource_versions() -> None:
    with FakeApiServer(history_limit=3) as fake:
        start = fake.resource_version
        for i in range(3):
            fake.apply(svc(f"s{i}"))
        assert len(list(watch_lines(fake, f"/api/v1/services?watch=1&resourceVersion={start}&timeoutSeconds=1"))) == 3
        fake.apply(svc("s3"))
        events = list(watch_lines(fake, f"/api/v1/services?watch=1&resourceVersion={start}&timeoutSeconds=1"))
        assert [e["type"] for e in events] == ["ERROR"]


def test_injected_raw_watch_lines_and_list_items(fake: FakeApiServer) -> None:
    rv = fake.resource_version
    fake.inject_watch_line("Service", b"garbage")
    fake.inject_watch_line("nodes", {"type": "ADDED", "object": 1})
    fake.inject_list_item("Service", "junk")
    conn = http.client.HTTPConnection("127.0.0.1", fake.port, timeout=5)
    conn.request("GET", f"/api/v1/services?watch=1&resourceVersion={rv}&timeoutSeconds=1", headers=TOKEN)
    assert conn.getresponse().read() == b"garbage\n"
    conn.close()
    assert get(fake, "/api/v1/services")[1]["items"] == ["junk"]


# --------------------------------------------------------------------------- faults


def test_fail_next_requests(fake: FakeApiServer) -> None:
    fake.fail_next(2, status=503)
    assert [get(fake, "/api/v1/services")[0] for _ in range(3)] == [503, 503, 200]
    fake.fail_next(1)
    status, body, _ = get(fake, "/api/v1/services")
    assert status == 500 and body["reason"] == "InternalError" and body["kind"] == "Status"


def test_drop_watches_breaks_open_streams(fake: FakeApiServer) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", fake.port, timeout=5)
    conn.request("GET", f"/api/v1/services?watch=1&resourceVersion={fake.resource_version}", headers=TOKEN)
    resp = conn.getresponse()
    deadline = time.monotonic() + 5
    while fake.open_watches() != 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    fake.drop_watches()
    with pytest.raises(http.client.IncompleteRead):  # no terminating chunk
        resp.read()
    conn.close()
    assert get(fake, "/api/v1/services")[0] == 200  # new requests are fine


def test_stall_silences_open_streams_for_good_and_delays_new_requests(fake: FakeApiServer) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", fake.port, timeout=0.5)
    conn.request("GET", f"/api/v1/services?watch=1&resourceVersion={fake.resource_version}", headers=TOKEN)
    resp = conn.getresponse()
    deadline = time.monotonic() + 5
    while fake.open_watches() != 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    fake.stall(0.3)
    fake.apply(svc("a"))
    with pytest.raises(TimeoutError):
        resp.readline()  # the event is never sent
    conn.close()
    t0 = time.monotonic()
    fake.stall(0.3)
    assert get(fake, "/api/v1/services")[0] == 200
    assert time.monotonic() - t0 >= 0.25


def test_down_refuses_then_comes_back_on_the_same_port(fake: FakeApiServer) -> None:
    fake.apply(svc("a"))
    port = fake.port
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request("GET", f"/api/v1/services?watch=1&resourceVersion={fake.resource_version}", headers=TOKEN)
    resp = conn.getresponse()
    fake.down()
    with pytest.raises((http.client.IncompleteRead, ConnectionError)):
        resp.read()
    conn.close()
    with pytest.raises(ConnectionRefusedError):
        get(fake, "/api/v1/services")
    fake.apply(svc("b"))  # state changes while down survive
    fake.up()
    assert fake.port == port
    assert [i["metadata"]["name"] for i in get(fake, "/api/v1/services")[1]["items"]] == ["a", "b"]
    fake.down(seconds=0.2)  # and comes back by itself
    deadline = time.monotonic() + 5
    while not fake.is_up and time.monotonic() < deadline:
        time.sleep(0.01)
    assert get(fake, "/api/v1/services")[0] == 200


def test_request_log_and_before_request_hook(fake: FakeApiServer) -> None:
    seen: list[str] = []
    fake.before_request = lambda r: seen.append(r.path)
    get(fake, "/api/v1/services?limit=3")
    reqs = fake.requests(path="/api/v1/services")
    assert seen == ["/api/v1/services"] and reqs[-1].query == {"limit": "3"} and not reqs[-1].watch


# --------------------------------------------------------------------------- standalone


def test_standalone_mode_serves_and_follows_the_state_file(tmp_path: Path) -> None:
    state = tmp_path / "state.yaml"
    state.write_text("kind: Service\nmetadata: {name: a, namespace: default}\nspec: {clusterIP: 10.96.0.1}\n"
                     "---\nkind: Node\nmetadata: {name: n1}\n")
    kubeconfig = tmp_path / "kc"
    proc = subprocess.Popen([sys.executable, str(Path(__file__).parent / "fakeapi.py"), "--port", "0",
                             "--state", str(state), "--kubeconfig", str(kubeconfig)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        kc = proc.stdout.readline().strip()
        assert url.startswith("URL=http://127.0.0.1:") and kc == f"KUBECONFIG={kubeconfig}"
        client = kubernetes.config.new_client_from_config(config_file=str(kubeconfig))
        core = kubernetes.client.CoreV1Api(client)
        assert [s.metadata.name for s in core.list_service_for_all_namespaces().items] == ["a"]
        state.write_text("kind: Service\nmetadata: {name: b, namespace: default}\nspec: {clusterIP: 10.96.0.2}\n")
        t = time.time_ns() + 10**9
        os.utime(state, ns=(t, t))
        deadline = time.monotonic() + 5
        while [s.metadata.name for s in core.list_service_for_all_namespaces().items] != ["b"]:
            assert time.monotonic() < deadline, "state file change not applied"
            time.sleep(0.05)
        assert core.list_node().items == []
        port = int(url.rsplit(":", 1)[1])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("POST", "/fake/fail?n=1&status=500")
        assert json.loads(conn.getresponse().read())["ok"] is True
        conn.close()
        with pytest.raises(kubernetes.client.ApiException) as exc:
            core.list_node()
        assert exc.value.status == 500
        client.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(5) == 0


def test_the_object_delete_returns_is_not_the_one_watchers_get(fake: FakeApiServer) -> None:
    """delete() returned the very dict kept in the watch history: a caller editing what
    it got back rewrote the DELETED event that every later watch replays."""
    fake.apply(svc("a"))
    rv = fake.resource_version
    gone = fake.delete("Service", "default", "a")
    assert gone is not None
    gone["spec"]["clusterIP"] = "10.96.0.99"
    events = list(watch_lines(fake, f"/api/v1/services?watch=1&resourceVersion={rv}&timeoutSeconds=1"))
    assert [(e["type"], e["object"]["spec"]["clusterIP"]) for e in events] == [("DELETED", "10.96.0.1")]


def test_apply_get_and_objects_are_isolated_from_their_callers(fake: FakeApiServer) -> None:
    source = svc("a")
    stored = fake.apply(source)
    source["spec"]["ports"].append({"port": 81})
    stored["spec"]["ports"].append({"port": 82})
    got = fake.get("Service", "default", "a")
    assert got is not None
    got["metadata"]["labels"]["x"] = "y"
    fake.objects("Service")[0]["spec"]["clusterIP"] = "1.2.3.4"
    assert fake.get("Service", "default", "a") == {**stored, "spec": {**stored["spec"], "ports": [{"port": 80}]}}
    rv = int(stored["metadata"]["resourceVersion"]) - 1
    events = list(watch_lines(fake, f"/api/v1/services?watch=1&resourceVersion={rv}&timeoutSeconds=1"))
    assert events[0]["object"]["spec"] == {"clusterIP": "10.96.0.1", "ports": [{"port": 80}]}
