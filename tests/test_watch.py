"""The watcher through the official client against the fake apiserver (real HTTP on
loopback, a kubeconfig), the store's event semantics, the backoff, and FileSource.

Every watcher test ends by setting ``stop`` and requiring the thread to be gone within
a second, so prompt shutdown is checked everywhere, mid-stream or mid-backoff.
"""

from __future__ import annotations

import json
import logging
import os
import random
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from fakeapi import FakeApiServer, Request  # noqa: E402
from podspec import write_projected  # noqa: E402

from svcproxy.kube.store import Event, Kind, Store  # noqa: E402
from svcproxy.kube.watch import HEADLESS_SELECTOR, Backoff, FileSource, Watcher, make_api_client  # noqa: E402
from svcproxy.kube import watch as watch_module  # noqa: E402

HEADLESS = "service.kubernetes.io/headless"


def svc(name: str, ns: str = "default", ip: str = "10.96.0.10", **labels: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": ns, "labels": dict(labels)},
            "spec": {"type": "ClusterIP", "clusterIP": ip, "clusterIPs": [ip],
                     "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}}


def eps(name: str, service: str, ns: str = "default", ip: str = "10.244.0.5") -> dict[str, Any]:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": ns, "labels": {"kubernetes.io/service-name": service}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": [ip], "conditions": {"ready": True}, "nodeName": "node-a"}]}


def node(name: str, zone: str = "z1") -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": zone}}}


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


class Recorder:
    """Sink and on_synced in one: everything the watcher reported, in order."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.log: list[Event | Kind] = []

    def sink(self, event: Event) -> None:
        with self.lock:
            self.log.append(event)

    def synced(self, kind: Kind) -> None:
        with self.lock:
            self.log.append(kind)

    @property
    def events(self) -> list[Event]:
        with self.lock:
            return [e for e in self.log if isinstance(e, Event)]

    @property
    def syncs(self) -> int:
        with self.lock:
            return sum(1 for e in self.log if isinstance(e, Kind))

    def changes(self, start: int = 0) -> list[tuple[str, str]]:
        return [(e.type, e.key[1]) for e in self.events[start:]]

    def wait_events(self, n: int, timeout: float = 5.0) -> list[Event]:
        wait_until(lambda: len(self.events) >= n, timeout, f"{n} events (have {self.changes()})")
        return self.events


@pytest.fixture
def fake() -> Iterator[FakeApiServer]:
    with FakeApiServer() as server:
        yield server


@pytest.fixture
def api(fake: FakeApiServer, tmp_path: Path) -> Any:
    client = make_api_client(fake.write_kubeconfig(tmp_path / "kubeconfig"))
    yield client
    client.close()


@pytest.fixture
def watch(api: Any) -> Iterator[Callable[..., tuple[Watcher, Recorder]]]:
    """Start watchers with test-speed settings; stop them and require a prompt exit."""
    stop = threading.Event()
    started: list[Watcher] = []

    def start(kind: Kind = Kind.SERVICE, **kwargs: Any) -> tuple[Watcher, Recorder]:
        rec = Recorder()
        options: dict[str, Any] = {"timeout_seconds": 30, "backoff_initial": 0.05, "backoff_max": 0.2, **kwargs}
        w = Watcher(api, kind, sink=rec.sink, on_synced=rec.synced, stop=stop, **options)
        w.start()
        started.append(w)
        return w, rec

    yield start
    stop.set()
    t0 = time.monotonic()
    for w in started:
        assert w.join(1.0), "watcher thread did not stop within 1 s"
    assert time.monotonic() - t0 < 1.0


def synced(rec: Recorder, n: int = 1, timeout: float = 5.0) -> None:
    wait_until(lambda: rec.syncs >= n, timeout, f"{n} syncs")


# --------------------------------------------------------------------------- API watcher


def test_initial_list_is_paginated_filtered_and_then_synced(fake: FakeApiServer, watch: Any) -> None:
    for i in range(12):
        fake.apply(svc(f"s{i:02}", ns=f"ns{i % 3}"))
    fake.apply(svc("mine", **{"service.kubernetes.io/service-proxy-name": "svcproxy"}))
    fake.apply(svc("headless", **{HEADLESS: ""}))
    w, rec = watch(page_size=5)
    synced(rec)
    # All events come before the synced call, and nothing else.
    assert rec.log[-1] is Kind.SERVICE
    names = sorted(e.key[1] for e in rec.events)
    assert names == sorted([f"s{i:02}" for i in range(12)] + ["mine"])
    assert {e.type for e in rec.events} == {"ADDED"}
    assert all(e.kind is Kind.SERVICE for e in rec.events)
    e = next(e for e in rec.events if e.key == ("ns1", "s01"))
    assert e.obj["kind"] == "Service" and e.obj["apiVersion"] == "v1"  # filled in for list items
    assert e.obj["metadata"]["uid"] and e.obj["spec"]["clusterIP"] == "10.96.0.10"
    lists = fake.requests(path="/api/v1/services", watch=False)
    assert len(lists) == 3 and all(r.query["limit"] == "5" for r in lists)
    assert "continue" not in lists[0].query and all("continue" in r.query for r in lists[1:])
    assert all(r.query["labelSelector"] == HEADLESS_SELECTOR for r in lists)
    wait_until(lambda: len(fake.requests(watch=True)) == 1, what="the watch")
    wq = fake.requests(watch=True)[0].query
    assert wq["resourceVersion"] == w.resource_version == fake.resource_version
    assert wq["allowWatchBookmarks"] == "true" and wq["labelSelector"] == HEADLESS_SELECTOR
    assert 30 <= int(wq["timeoutSeconds"]) <= 36
    assert w.stats.lists == 1 and w.stats.relists == 0 and w.stats.errors == 0


def test_changes_reach_the_sink_in_order(fake: FakeApiServer, watch: Any) -> None:
    fake.apply(svc("a"))
    _, rec = watch()
    synced(rec)
    wait_until(lambda: fake.open_watches() == 1, what="the watch")
    fake.apply(svc("b"))
    fake.apply(svc("a", ip="10.96.0.99"))
    fake.delete("Service", "default", "b")
    fake.apply(svc("c"))
    fake.apply(svc("a", ip="10.96.0.98"))
    fake.delete("Service", "default", "a")
    events = rec.wait_events(7)
    assert rec.changes(1) == [("ADDED", "b"), ("MODIFIED", "a"), ("DELETED", "b"), ("ADDED", "c"),
                              ("MODIFIED", "a"), ("DELETED", "a")]
    assert events[2].obj["spec"]["clusterIP"] == "10.96.0.99"
    assert events[6].obj["spec"]["clusterIP"] == "10.96.0.98"  # the final state of a deleted object
    time.sleep(0.1)
    assert len(rec.events) == 7


def test_a_bookmark_advances_the_resource_version_without_an_event(fake: FakeApiServer, watch: Any) -> None:
    fake.apply(svc("a"))
    w, rec = watch()
    synced(rec)
    wait_until(lambda: fake.open_watches() == 1, what="the watch")
    listed = w.resource_version
    fake.apply(eps("other-resource", "x"))  # moves the global resourceVersion, not our kind
    fake.bookmark()
    wait_until(lambda: w.stats.bookmarks == 1, what="the bookmark")
    assert w.resource_version == fake.resource_version != listed
    assert len(rec.events) == 1
    fake.drop_watches()  # the next watch must resume from the bookmark's resourceVersion
    wait_until(lambda: len(fake.requests(watch=True)) == 2, what="the reconnect")
    assert fake.requests(watch=True)[1].query["resourceVersion"] == fake.resource_version
    assert w.stats.relists == 0 and len(rec.events) == 1


@pytest.mark.parametrize("form", ["event", "http"])
def test_410_relists_and_reports_exactly_what_changed_meanwhile(
        fake: FakeApiServer, watch: Any, form: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="svcproxy.watch")
    for name in ("a", "b", "c"):
        fake.apply(svc(name))
    w, rec = watch()
    synced(rec)
    wait_until(lambda: fake.open_watches() == 1, what="the watch")
    fake.set_watch_410(form)
    fake.down()  # disconnected while things change
    fake.delete("Service", "default", "a")
    fake.apply(svc("b", ip="10.96.0.77"))
    fake.apply(svc("d"))
    fake.compact()  # and our resourceVersion falls out of the history
    fake.up()
    synced(rec, 2)
    assert rec.changes(3) == [("DELETED", "a"), ("MODIFIED", "b"), ("ADDED", "d"), ]
    assert rec.log[-1] is Kind.SERVICE
    assert rec.events[4].obj["spec"]["clusterIP"] == "10.96.0.77"
    assert rec.events[3].obj["metadata"]["name"] == "a"  # the deleted object as last known
    assert w.stats.relists == 1 and w.stats.expired >= 1
    assert sorted(k[1] for k in w.cache) == ["b", "c", "d"]
    assert any("relisting" in r.getMessage() and r.levelno == logging.INFO for r in caplog.records)
    time.sleep(0.1)
    fake.apply(svc("e"))  # and the new watch works
    rec.wait_events(7)
    assert rec.changes(6) == [("ADDED", "e")]


def test_a_dropped_stream_resumes_without_relist_or_duplicates(fake: FakeApiServer, watch: Any) -> None:
    fake.apply(svc("a"))
    w, rec = watch()
    synced(rec)
    wait_until(lambda: fake.open_watches() == 1, what="the watch")
    fake.apply(svc("b"))
    rec.wait_events(2)
    rv_b = rec.events[1].obj["metadata"]["resourceVersion"]
    fake.drop_watches()
    fake.apply(svc("c"))  # while reconnecting
    rec.wait_events(3)
    fake.drop_watches()
    fake.apply(svc("a", ip="10.96.0.5"))
    rec.wait_events(4)
    time.sleep(0.1)
    assert rec.changes() == [("ADDED", "a"), ("ADDED", "b"), ("ADDED", "c"), ("MODIFIED", "a")]
    assert len(fake.requests(watch=False)) == 1 and w.stats.relists == 0
    watches = fake.requests(watch=True)
    assert len(watches) >= 2 and watches[1].query["resourceVersion"] == rv_b
    assert w.stats.reconnects >= 2 and rec.syncs == 1


def test_api_server_down_is_retried_with_bounded_backoff(
        fake: FakeApiServer, watch: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="svcproxy.watch")
    w, rec = watch(backoff_initial=0.1, backoff_max=0.4)
    synced(rec)
    wait_until(lambda: fake.open_watches() == 1, what="the watch")
    errors_before = w.stats.errors
    fake.down()
    time.sleep(1.5)
    attempts = w.stats.errors - errors_before
    # Delays 0.1, 0.2, 0.4, 0.4 ... (minus up to 20 % jitter): about 5 attempts in 1.5 s.
    # A hot loop would make thousands.
    assert 3 <= attempts <= 9, attempts
    assert 0.32 <= w.stats.last_backoff <= 0.4
    assert w.stats.consecutive_errors >= 3
    fake.up()
    fake.apply(svc("after"))
    rec.wait_events(1)
    assert rec.changes() == [("ADDED", "after")]
    assert w.stats.relists == 0  # the history still had our resourceVersion
    wait_until(lambda: w.stats.consecutive_errors == 0, what="the backoff reset")
    delays = [float(r.getMessage().split("retrying in ")[1].split()[0])
              for r in caplog.records if "retrying in" in r.getMessage()]
    assert delays and all(r.levelno == logging.WARNING for r in caplog.records if "retrying in" in r.getMessage())
    assert delays == sorted(delays[:3]) + delays[3:] and max(delays) <= 0.4
    # After a success the backoff starts from the beginning again.
    fake.fail_next(1)
    fake.drop_watches()
    wait_until(lambda: w.stats.consecutive_errors == 1, what="the injected failure")
    fake.apply(svc("again"))
    rec.wait_events(2)
    assert w.stats.last_backoff <= 0.1 and w.stats.consecutive_errors == 0


def test_500s_are_retried_for_lists_and_watches(fake: FakeApiServer, watch: Any) -> None:
    fake.apply(svc("a"))
    fake.fail_next(2)
    w, rec = watch()
    synced(rec)
    assert w.stats.errors == 2 and "HTTP 500" in w.stats.last_error and "injected" in w.stats.last_error
    wait_until(lambda: fake.open_watches() == 1, what="the watch")
    fake.fail_next(3)
    fake.drop_watches()
    fake.apply(svc("b"))
    rec.wait_events(2)
    assert rec.changes() == [("ADDED", "a"), ("ADDED", "b")]
    assert w.stats.errors >= 5 and w.stats.relists == 0 and rec.syncs == 1


def test_a_stalled_stream_is_detected_by_the_read_timeout(fake: FakeApiServer, watch: Any) -> None:
    fake.apply(svc("a"))
    w, rec = watch(read_timeout=0.5)
    synced(rec)
    wait_until(lambda: fake.open_watches() == 1, what="the watch")
    t0 = time.monotonic()
    fake.stall(0.8)  # the open stream goes silent for good, like a dead peer
    fake.apply(svc("b"))
    rec.wait_events(2, timeout=5)
    assert time.monotonic() - t0 >= 0.5
    assert rec.changes() == [("ADDED", "a"), ("ADDED", "b")]
    assert w.stats.errors >= 1 and "timed out" in w.stats.last_error.lower()
    assert w.stats.relists == 0


def test_a_silent_stream_is_resumed_after_the_idle_timeout_not_the_servers_timeout(
        fake: FakeApiServer, watch: Any) -> None:
    """The server's timeoutSeconds is 30 here (300+ by default): a stream that goes
    silent must be noticed by the idle timeout, counted as a stall, and resumed
    without a relist, with the change made meanwhile delivered."""
    fake.apply(svc("a"))
    w, rec = watch(idle_timeout=1.0)
    synced(rec)
    wait_until(lambda: fake.open_watches() == 1, what="the watch")
    t0 = time.monotonic()
    fake.stall(1.5)
    fake.apply(svc("b"))
    rec.wait_events(2, timeout=6)
    assert 1.0 <= time.monotonic() - t0 < 6
    assert w.stats.stalls == 1 and w.stats.relists == 0


def test_the_default_idle_timeout_is_just_above_the_servers_heartbeat(api: Any) -> None:
    w = Watcher(api, Kind.SERVICE, sink=lambda e: None, on_synced=lambda k: None, stop=threading.Event())
    assert 60 < watch_module.WATCH_IDLE_TIMEOUT < 90 and w._idle_timeout == watch_module.WATCH_IDLE_TIMEOUT


def test_malformed_objects_and_events_are_skipped(
        fake: FakeApiServer, watch: Any, caplog: pytest.LogCaptureFixture) -> None:
    fake.apply(svc("a"))
    fake.inject_list_item("Service", "not an object")
    fake.inject_list_item("Service", {"metadata": {"namespace": "default"}})
    w, rec = watch()
    synced(rec)
    assert rec.changes() == [("ADDED", "a")] and w.stats.malformed == 2
    wait_until(lambda: fake.open_watches() == 1, what="the watch")
    fake.inject_watch_line("Service", b"{not json")
    fake.inject_watch_line("Service", ["a", "list"])
    fake.inject_watch_line("Service", {"type": "ADDED", "object": "a string"})
    fake.inject_watch_line("Service", {"type": "MODIFIED", "object": {"metadata": {"name": ""}}})
    fake.inject_watch_line("Service", {"type": "EXPLODED", "object": {}})
    fake.apply(svc("b"))
    rec.wait_events(2)
    assert rec.changes() == [("ADDED", "a"), ("ADDED", "b")]
    assert w.stats.malformed == 7 and w.stats.errors == 0
    assert sum("malformed" in r.getMessage() for r in caplog.records) == 7


def test_a_failing_sink_does_not_kill_the_watcher(fake: FakeApiServer, api: Any) -> None:
    stop = threading.Event()
    seen: list[Event] = []

    def sink(event: Event) -> None:
        seen.append(event)
        if event.key[1] == "a":
            raise RuntimeError("consumer bug")

    fake.apply(svc("a"))
    w = Watcher(api, Kind.SERVICE, sink=sink, on_synced=lambda k: None, stop=stop)
    w.start()
    try:
        wait_until(lambda: len(seen) == 1)
        fake.apply(svc("b"))
        wait_until(lambda: len(seen) == 2)
        assert w.stats.sink_errors == 1 and w.stats.events == 2
    finally:
        stop.set()
        assert w.join(1.0)


def test_the_node_watch_sees_only_our_node(fake: FakeApiServer, api: Any, watch: Any) -> None:
    for name in ("node-a", "node-b", "node-c"):
        fake.apply(node(name))
    _, rec = watch(Kind.NODE, node_name="node-b")
    synced(rec)
    wait_until(lambda: fake.open_watches() == 1, what="the watch")
    fake.apply(node("node-a", zone="z9"))
    fake.apply(node("node-b", zone="z2"))
    rec.wait_events(2)
    time.sleep(0.1)
    assert rec.changes() == [("ADDED", "node-b"), ("MODIFIED", "node-b")]
    assert rec.events[0].key == ("", "node-b") and rec.events[0].kind is Kind.NODE
    assert rec.events[1].obj["metadata"]["labels"]["topology.kubernetes.io/zone"] == "z2"
    assert {r.query.get("fieldSelector") for r in fake.requests(path="/api/v1/nodes")} == {"metadata.name=node-b"}
    with pytest.raises(ValueError):  # a Node watch needs to know which node
        Watcher(api, Kind.NODE, sink=rec.sink, on_synced=rec.synced, stop=threading.Event())


def test_endpointslices_are_listed_and_watched_with_the_headless_filter(fake: FakeApiServer, watch: Any) -> None:
    fake.apply(eps("web-1", "web"))
    hl = eps("hl-1", "hl")
    hl["metadata"]["labels"][HEADLESS] = ""
    fake.apply(hl)
    w, rec = watch(Kind.ENDPOINT_SLICE)
    synced(rec)
    wait_until(lambda: fake.open_watches() == 1, what="the watch")
    fake.apply(eps("web-2", "web", ip="10.244.0.6"))
    fake.apply(svc("web"))  # another resource: not ours
    rec.wait_events(2)
    time.sleep(0.1)
    assert rec.changes() == [("ADDED", "web-1"), ("ADDED", "web-2")]
    assert rec.events[0].obj["kind"] == "EndpointSlice"
    assert rec.events[0].obj["apiVersion"] == "discovery.k8s.io/v1"
    assert all(r.query["labelSelector"] == HEADLESS_SELECTOR
               for r in fake.requests(path="/apis/discovery.k8s.io/v1/endpointslices"))


def test_an_expired_continue_token_restarts_the_list(fake: FakeApiServer, watch: Any) -> None:
    for i in range(7):
        fake.apply(svc(f"s{i}"))
    expired = threading.Event()

    def expire_once(request: Request) -> None:
        if "continue" in request.query and not expired.is_set():
            expired.set()
            fake.apply(svc("late"))  # the restarted list must include it
            fake.expire_continue_tokens()

    fake.before_request = expire_once
    w, rec = watch(page_size=3)
    synced(rec)
    assert sorted(e.key[1] for e in rec.events) == sorted([f"s{i}" for i in range(7)] + ["late"])
    assert len(rec.events) == 8 and rec.syncs == 1
    firsts = [r for r in fake.requests(watch=False) if "continue" not in r.query]
    assert len(firsts) == 2 and w.stats.expired == 1 and w.stats.lists == 1


def test_a_watch_that_times_out_resumes_from_its_resource_version(fake: FakeApiServer, watch: Any) -> None:
    fake.apply(svc("a"))
    w, rec = watch(timeout_seconds=1)
    synced(rec)
    wait_until(lambda: w.stats.reconnects >= 2, timeout=6, what="two clean reconnects")
    watches = fake.requests(watch=True)
    assert {r.query["timeoutSeconds"] for r in watches} == {"1"}
    assert {r.query["resourceVersion"] for r in watches} == {w.resource_version}
    assert len(watches) >= 3 and w.stats.errors == 0 and w.stats.relists == 0


def test_stop_is_prompt_during_a_long_watch_and_during_backoff(fake: FakeApiServer, api: Any) -> None:
    stop = threading.Event()
    rec = Recorder()
    w = Watcher(api, Kind.SERVICE, sink=rec.sink, on_synced=rec.synced, stop=stop)  # 300 s watch
    w.start()
    synced(rec)
    wait_until(lambda: fake.open_watches() == 1)
    t0 = time.monotonic()
    stop.set()
    assert w.join(1.0) and time.monotonic() - t0 < 0.5

    stop2 = threading.Event()
    fake.down()
    w2 = Watcher(api, Kind.SERVICE, sink=rec.sink, on_synced=rec.synced, stop=stop2,
                 backoff_initial=30, backoff_max=30)
    w2.start()
    wait_until(lambda: w2.stats.errors >= 1)
    t0 = time.monotonic()
    stop2.set()
    assert w2.join(1.0) and time.monotonic() - t0 < 0.5


def test_make_api_client_uses_the_kubeconfig_and_a_single_retry_layer(fake: FakeApiServer, tmp_path: Path) -> None:
    client = make_api_client(fake.write_kubeconfig(tmp_path / "kc"))
    try:
        assert client.configuration.host == fake.url
        assert client.configuration.retries == 0
        assert client.user_agent.startswith("svcproxy/")
        import kubernetes

        kubernetes.client.CoreV1Api(client).list_node()  # the fake answers 401 without the token
    finally:
        client.close()



def kubeconfig_with_token_file(fake: FakeApiServer, path: Path, token_file: str) -> Path:
    """The fake's kubeconfig with its user's token in a file (relative to the kubeconfig),
    as kubeadm writes kube-proxy's."""
    doc = json.loads(Path(fake.write_kubeconfig(path)).read_text())
    doc["users"][0]["user"] = {"tokenFile": token_file}
    path.write_text(json.dumps(doc))
    return path


def test_a_rotated_token_file_is_used_by_the_next_request(fake: FakeApiServer, tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    import kubernetes
    from kubernetes.client.exceptions import ApiException

    sa = tmp_path / "serviceaccount"
    sa.mkdir()
    write_projected(sa, {"token": "first-token"})
    fake.token = "first-token"
    client = make_api_client(str(kubeconfig_with_token_file(fake, tmp_path / "kc", "serviceaccount/token")))
    core = kubernetes.client.CoreV1Api(client)
    try:
        core.list_service_for_all_namespaces()  # the first token is accepted
        write_projected(sa, {"token": "second-token"})
        fake.token = "second-token"  # the API server now refuses the first one
        core.list_service_for_all_namespaces()
        fake.token = "third-token"  # a token the file does not hold: refused, so the check can fail
        with pytest.raises(ApiException) as refused:
            core.list_service_for_all_namespaces()
        assert refused.value.status == 401
        fake.token = "second-token"
        (sa / "..data").unlink()  # gone for a moment: the last token read is kept, and said so
        with caplog.at_level(logging.WARNING, logger="svcproxy.watch"):
            core.list_service_for_all_namespaces()
        assert "cannot read the token file" in caplog.text and "using the last token read" in caplog.text
    finally:
        client.close()

# --------------------------------------------------------------------------- store, backoff


def test_store_replace_reports_only_real_changes() -> None:
    st = Store(Kind.SERVICE)
    a1 = {"metadata": {"name": "a", "namespace": "n", "resourceVersion": "1"}}
    b1 = {"metadata": {"name": "b", "namespace": "n", "resourceVersion": "2"}}
    assert [(e.type, e.key) for e in st.replace([(("n", "a"), a1), (("n", "b"), b1)])] == \
        [("ADDED", ("n", "a")), ("ADDED", ("n", "b"))]
    a2 = {"metadata": {"name": "a", "namespace": "n", "resourceVersion": "5"}}
    c1 = {"metadata": {"name": "c", "namespace": "n", "resourceVersion": "6"}}
    events = st.replace([(("n", "c"), c1), (("n", "a"), a2)])
    assert [(e.type, e.key) for e in events] == [("DELETED", ("n", "b")), ("MODIFIED", ("n", "a")),
                                                 ("ADDED", ("n", "c"))]
    assert events[0].obj is b1
    assert st.replace([(("n", "c"), dict(c1)), (("n", "a"), dict(a2))]) == []  # same versions


def test_store_apply_normalises_and_drops_replays() -> None:
    st = Store(Kind.SERVICE)
    a1 = {"metadata": {"name": "a", "resourceVersion": "1"}}
    a2 = {"metadata": {"name": "a", "resourceVersion": "2"}}
    e = st.apply("MODIFIED", ("", "a"), a1)
    assert e is not None and e.type == "ADDED"  # unknown key: it is an addition
    assert st.apply("ADDED", ("", "a"), a1) is None  # a replay
    e = st.apply("ADDED", ("", "a"), a2)
    assert e is not None and e.type == "MODIFIED"
    assert st.apply("DELETED", ("", "zz"), a2) is None
    e = st.apply("DELETED", ("", "a"), a2)
    assert e is not None and e.type == "DELETED" and len(st) == 0
    content = Store(Kind.NODE, compare="content")
    content.replace([(("", "n"), {"metadata": {"name": "n"}, "x": 1})])
    assert [ev.type for ev in content.replace([(("", "n"), {"metadata": {"name": "n"}, "x": 2})])] == ["MODIFIED"]


def test_backoff_grows_is_capped_and_jittered_downwards() -> None:
    b = Backoff(0.5, 30.0, jitter=0.2, rng=random.Random(1))
    for n, base in [(1, 0.5), (2, 1.0), (3, 2.0), (6, 16.0), (7, 30.0), (50, 30.0), (10_000, 30.0)]:
        for _ in range(50):
            assert 0.8 * base <= b.delay(n) <= base
    assert len({round(b.delay(7), 6) for _ in range(20)}) > 1  # not in lock-step
    with pytest.raises(ValueError):
        Backoff(0, 1)


# --------------------------------------------------------------------------- FileSource

CLUSTER = """\
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec: {clusterIP: 10.96.0.20, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: default}
spec: {clusterIP: 10.96.0.30, ports: [{port: 5432}]}
---
apiVersion: v1
kind: Service
metadata: {name: hl, namespace: default, labels: {service.kubernetes.io/headless: ""}}
spec: {clusterIP: None}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
endpoints: [{addresses: [10.244.1.5]}]
---
apiVersion: v1
kind: Node
metadata: {name: node-a}
---
apiVersion: v1
kind: Node
metadata: {name: node-b}
"""


class _Mtime:
    """Writes that always move mtime: two writes inside one timestamp tick with the same
    size would otherwise look unchanged (tests write faster than people edit)."""

    def __init__(self) -> None:
        self.t = time.time_ns() - 10**12

    def write(self, path: Path, text: str) -> None:
        path.write_text(text)
        self.t += 10**9
        os.utime(path, ns=(self.t, self.t))


def _source(path: Path, rec: Recorder, **kw: Any) -> FileSource:
    return FileSource(path, sink=rec.sink, on_synced=rec.synced, stop=threading.Event(), node_name="node-a", **kw)


def test_filesource_initial_load(tmp_path: Path) -> None:
    path = tmp_path / "cluster.yaml"
    _Mtime().write(path, CLUSTER)
    rec = Recorder()
    src = _source(path, rec)
    assert src.check() is True
    assert [(e.kind, e.type, e.key) for e in rec.events] == [
        (Kind.NODE, "ADDED", ("", "node-a")),
        (Kind.SERVICE, "ADDED", ("default", "db")),
        (Kind.SERVICE, "ADDED", ("default", "web")),
        (Kind.ENDPOINT_SLICE, "ADDED", ("default", "web-1")),
    ]
    assert rec.log[-3:] == [Kind.SERVICE, Kind.ENDPOINT_SLICE, Kind.NODE]
    assert src.check() is False and len(rec.log) == 7  # unchanged file: nothing


def test_filesource_edit_emits_only_the_changes(tmp_path: Path) -> None:
    path, mt = tmp_path / "cluster.yaml", _Mtime()
    mt.write(path, CLUSTER)
    rec = Recorder()
    src = _source(path, rec)
    src.check()
    n = len(rec.events)
    edited = (CLUSTER.replace("10.96.0.20", "10.96.0.21")
              .replace("metadata: {name: db, namespace: default}", "metadata: {name: cache, namespace: default}")
              + "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n"
                "metadata: {name: web-2, namespace: default, labels: {kubernetes.io/service-name: web}}\n"
                "addressType: IPv4\nendpoints: [{addresses: [10.244.1.6]}]\n")
    mt.write(path, edited)
    assert src.check() is True
    assert [(e.kind, e.type, e.key[1]) for e in rec.events[n:]] == [
        (Kind.SERVICE, "DELETED", "db"),
        (Kind.SERVICE, "ADDED", "cache"),
        (Kind.SERVICE, "MODIFIED", "web"),
        (Kind.ENDPOINT_SLICE, "ADDED", "web-2"),
    ]


def test_filesource_keeps_the_old_state_when_the_file_breaks(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path, mt = tmp_path / "cluster.yaml", _Mtime()
    mt.write(path, CLUSTER)
    rec = Recorder()
    src = _source(path, rec)
    src.check()
    n, n_events = len(rec.log), len(rec.events)
    mt.write(path, "apiVersion: v1\nkind: Service\nmetadata: {name: [unclosed\n")
    assert src.check() is False
    mt.write(path, "")
    assert src.check() is False
    path.unlink()
    assert src.check() is False and src.check() is False
    assert len(rec.log) == n and src.stats.errors == 3
    assert sum("keeping the previous content" in r.getMessage() for r in caplog.records) == 3
    mt.write(path, CLUSTER.replace("10.96.0.30", "10.96.0.31"))
    assert src.check() is True
    assert rec.changes(n_events) == [("MODIFIED", "db")]


def test_filesource_thread_polls_for_changes(tmp_path: Path) -> None:
    path, mt = tmp_path / "cluster.yaml", _Mtime()
    mt.write(path, CLUSTER)
    rec = Recorder()
    stop = threading.Event()
    src = FileSource(path, sink=rec.sink, on_synced=rec.synced, stop=stop, node_name="node-b", poll_interval=0.05)
    src.start()
    try:
        rec.wait_events(4)
        assert ("ADDED", "node-b") in rec.changes() and ("ADDED", "node-a") not in rec.changes()
        mt.write(path, CLUSTER.replace("name: web,", "name: web2,"))
        rec.wait_events(6)
        assert rec.changes(4) == [("DELETED", "web"), ("ADDED", "web2")]
    finally:
        stop.set()
        assert src.join(1.0)


def test_filesource_skips_objects_without_a_name(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    _Mtime().write(path, json.dumps({"kind": "List", "items": [svc("ok"), {"kind": "Service", "metadata": {}}]}))
    rec = Recorder()
    src = _source(path, rec)
    assert src.check() is True
    assert rec.changes() == [("ADDED", "ok")] and src.stats.malformed == 1


def test_objects_are_kept_without_managed_fields(fake: FakeApiServer, watch: Any) -> None:
    fake.apply(svc("listed"))
    assert fake.get("Service", "default", "listed")["metadata"]["managedFields"]  # the server sends them
    w, rec = watch()
    synced(rec)
    wait_until(lambda: fake.open_watches() == 1, what="the watch")
    fake.apply(svc("watched"))
    events = rec.wait_events(2)
    assert {e.key[1] for e in events} == {"listed", "watched"}
    for event in events:
        assert "managedFields" not in event.obj["metadata"], event.obj
        assert event.obj["metadata"]["resourceVersion"] and event.obj["metadata"]["uid"]
    assert all("managedFields" not in obj["metadata"] for obj in w.cache.values())


def test_watched_objects_share_their_field_names(fake: FakeApiServer, watch: Any) -> None:
    """Each watch event is decoded on its own: without interning, every watched object
    held its own copy of every field name (memory that grew as churn replaced listed
    objects by watched ones)."""
    _, rec = watch()
    synced(rec)
    wait_until(lambda: fake.open_watches() == 1, what="the watch")
    fake.apply(svc("a"))
    fake.apply(svc("b"))
    a, b = (e.obj for e in rec.wait_events(2))

    def keys(obj: Any) -> list[str]:
        return [*obj, *obj["metadata"], *obj["spec"]]

    assert keys(a) == keys(b)
    assert all(x is y for x, y in zip(keys(a), keys(b))), "field names decoded into separate strings"
