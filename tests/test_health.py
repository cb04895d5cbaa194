"""Health endpoints over real HTTP on loopback, with an injected clock."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from typing import Iterator

import pytest

from svcproxy import health
from svcproxy.health import (
    HealthCheckServers,
    HealthCheckTarget,
    HealthServer,
    HealthState,
    go_time,
    node_eligible,
)
from svcproxy.flags import parse_bind
from svcproxy.metrics import Metrics


class FakeClock:
    def __init__(self) -> None:
        self.t = 1_700_000_000.0

    def __call__(self) -> float:
        return self.t


def get(url: str) -> tuple[int, dict[str, str], str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, dict(resp.headers), resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read().decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def server(clock: FakeClock) -> Iterator[tuple[HealthServer, str]]:
    state = HealthState(timeout=60, clock=clock)
    srv = HealthServer("127.0.0.1:0", state, Metrics())
    srv.start()
    yield srv, f"http://127.0.0.1:{srv.port}"
    srv.stop()


def test_go_time_matches_go_format() -> None:
    assert go_time(0) == "0001-01-01 00:00:00 +0000 UTC"
    assert go_time(1_700_000_000.25) == "2023-11-14 22:13:20.25 +0000 UTC"
    assert go_time(1_700_000_000) == "2023-11-14 22:13:20 +0000 UTC"


def test_healthz_phases(server: tuple[HealthServer, str], clock: FakeClock) -> None:
    srv, base = server
    code, headers, body = get(base + "/healthz")
    assert code == 200  # nothing queued yet: kube-proxy is healthy at start
    assert headers["Content-Type"] == "application/json"
    assert json.loads(body) == {"lastUpdated": go_time(clock.t), "currentTime": go_time(clock.t), "nodeEligible": True}

    srv.state.queued()
    clock.t += 59
    assert get(base + "/healthz")[0] == 200
    clock.t += 1  # queued update older than the timeout, no sync since
    code, _, body = get(base + "/healthz")
    assert code == 503
    assert json.loads(body)["lastUpdated"] == go_time(0)
    assert get(base + "/livez")[0] == 503

    srv.state.updated()
    assert get(base + "/healthz")[0] == 200
    srv.state.set_node_eligible(False)
    code, _, body = get(base + "/healthz")
    assert code == 503 and json.loads(body)["nodeEligible"] is False
    code, _, body = get(base + "/livez")
    assert code == 200 and "nodeEligible" not in json.loads(body)


def test_readyz_after_first_full_sync(server: tuple[HealthServer, str]) -> None:
    srv, base = server
    assert get(base + "/readyz")[0] == 503
    srv.state.set_ready()
    assert get(base + "/readyz")[0] == 200


def test_metrics_and_404(server: tuple[HealthServer, str]) -> None:
    srv, base = server
    get(base + "/healthz")
    srv.metrics.virtual_servers.set(7)
    code, headers, body = get(base + "/metrics")
    assert code == 200 and headers["Content-Type"].startswith("text/plain")
    assert "svcproxy_virtual_servers 7.0" in body
    assert 'svcproxy_proxy_healthz_total{code="200"} 1.0' in body
    assert "svcproxy_sync_proxy_rules_duration_seconds_bucket" in body
    assert get(base + "/nope")[0] == 404


def test_node_eligibility() -> None:
    assert node_eligible(None)
    assert node_eligible({"metadata": {"name": "n"}})
    assert not node_eligible({"metadata": {"name": "n", "deletionTimestamp": "2026-01-01T00:00:00Z"}})
    assert not node_eligible({"metadata": {"name": "n"},
                              "spec": {"taints": [{"key": "ToBeDeletedByClusterAutoscaler", "effect": "NoSchedule"}]}})


def test_health_check_node_ports_answer_like_kube_proxy(clock: FakeClock) -> None:
    state = HealthState(timeout=60, clock=clock)
    servers = HealthCheckServers(state, bind_host="127.0.0.1")
    web, api = HealthCheckTarget("default", "web", free_port()), HealthCheckTarget("prod", "api", free_port())
    try:
        assert servers.sync({web: 2, api: 0}) == []
        code, headers, body = get(f"http://127.0.0.1:{web.port}/")
        assert code == 200
        assert headers["X-Load-Balancing-Endpoint-Weight"] == "2"
        assert body == ('{\n\t"service": {\n\t\t"namespace": "default",\n\t\t"name": "web"\n\t},\n'
                        '\t"localEndpoints": 2,\n\t"serviceProxyHealthy": true\n}')
        code, headers, body = get(f"http://127.0.0.1:{api.port}/")
        assert code == 503 and headers["X-Load-Balancing-Endpoint-Weight"] == "0"
        assert json.loads(body)["localEndpoints"] == 0

        state.queued()
        clock.t += 120  # proxy unhealthy: even a Service with endpoints answers 503
        code, _, body = get(f"http://127.0.0.1:{web.port}/")
        assert code == 503 and json.loads(body)["serviceProxyHealthy"] is False
        state.updated()

        assert servers.sync({api: 1}) == []  # web's server is stopped, api's count updated
        assert servers.ports == {("prod", "api"): api.port}
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{web.port}/", timeout=2)
        assert get(f"http://127.0.0.1:{api.port}/")[0] == 200
    finally:
        servers.stop()


def test_health_check_port_in_use_is_reported_not_fatal(clock: FakeClock) -> None:
    state = HealthState(timeout=60, clock=clock)
    servers = HealthCheckServers(state, bind_host="127.0.0.1")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = HealthCheckTarget("default", "taken", busy.getsockname()[1])
        ok = HealthCheckTarget("default", "ok", free_port())
        try:
            errors = servers.sync({taken: 1, ok: 1})
            assert len(errors) == 1 and "taken" in errors[0]
            assert get(f"http://127.0.0.1:{ok.port}/")[0] == 200
        finally:
            servers.stop()


def test_health_servers_bind_ipv6_and_both_families_on_the_unspecified_address() -> None:
    metrics = Metrics()
    state = HealthState(timeout=60)
    v6 = HealthServer("[::1]:0", state, metrics)
    v6.start()
    try:
        assert get(f"http://[::1]:{v6.port}/readyz")[0] == 503
    finally:
        v6.stop()
    both = HealthServer("[::]:0", state, metrics)
    both.start()
    try:
        assert get(f"http://[::1]:{both.port}/livez")[0] == 200
        assert get(f"http://127.0.0.1:{both.port}/livez")[0] == 200
    finally:
        both.stop()
    checks = HealthCheckServers(state, bind_host="::1")
    port = free_port()
    try:
        assert checks.sync({HealthCheckTarget("default", "web", port): 1}) == []
        assert get(f"http://[::1]:{port}/")[0] == 200
    finally:
        checks.stop()


@pytest.mark.parametrize("bind", ["127.0.0.1:99999", "localhost:80", "::1:80", "[::1]", "10.0.0.1:x"])
def test_a_bad_bind_address_is_a_value_error_naming_it(bind: str) -> None:
    with pytest.raises(ValueError, match="HOST:PORT|port|IP address|brackets"):
        parse_bind(bind)


def test_idle_connections_are_closed_and_connection_threads_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """1,000 idle clients must not cost 1,000 threads, and an idle client is let go."""
    monkeypatch.setattr(health, "MAX_CONNECTIONS", 8)
    monkeypatch.setattr(health._Handler, "timeout", 1.0)
    srv = HealthServer("127.0.0.1:0", HealthState(timeout=60), Metrics())
    srv.start()
    idle: list[socket.socket] = []
    try:
        before = threading.active_count()
        for _ in range(40):
            idle.append(socket.create_connection(("127.0.0.1", srv.port), timeout=5))
        time.sleep(0.3)
        assert threading.active_count() - before <= 8
        # Past the idle timeout the server has closed them: a read sees the end.
        time.sleep(1.5)
        idle[0].settimeout(2)
        assert idle[0].recv(1) == b""
        # And it serves new clients again.
        assert get(f"http://127.0.0.1:{srv.port}/livez")[0] == 200
    finally:
        for s in idle:
            s.close()
        srv.stop()


def test_clients_trickling_bytes_into_every_slot_cannot_shut_probes_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each holds its connection with a header byte now and then (never idle long
    enough to time out); a probe must still be answered, every time."""
    monkeypatch.setattr(health, "MAX_CONNECTIONS", 8)
    monkeypatch.setattr(health._Handler, "timeout", 2.0)
    srv = HealthServer("127.0.0.1:0", HealthState(timeout=60), Metrics())
    srv.start()
    stop = threading.Event()
    slow: list[socket.socket] = []

    def trickle() -> None:
        while not stop.wait(0.3):
            for s in list(slow):
                try:
                    s.send(b"X")
                except OSError:
                    pass

    try:
        for _ in range(8):
            s = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
            s.send(b"GET /livez HTTP/1.1\r\nX-Slow: ")
            slow.append(s)
        threading.Thread(target=trickle, daemon=True).start()
        for _ in range(5):
            assert get(f"http://127.0.0.1:{srv.port}/livez")[0] == 200
            time.sleep(0.5)
        assert threading.active_count() < 30
    finally:
        stop.set()
        for s in slow:
            s.close()
        srv.stop()
