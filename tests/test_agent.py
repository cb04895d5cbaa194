"""The whole agent in process: official client -> fake API server over real HTTP on
loopback -> reconcile loop -> in-memory IPVS backend, with the health server live.

The kernel is simulated here by MemoryBackend; the same agent against real IPVS runs
in the VM suite."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from fakeapi import FakeApiServer
from svcproxy.agent import Agent, AgentConfig
from svcproxy.ipvs.backend import MemoryBackend
from svcproxy.model import Protocol, ServiceKey

WEB = ServiceKey(Protocol.TCP, "10.96.0.20", 80)
LB = ServiceKey(Protocol.TCP, "10.96.0.30", 443)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def service(name: str, ip: str, port: int, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"type": "ClusterIP", "clusterIP": ip, "clusterIPs": [ip], "ipFamilies": ["IPv4"],
                 "ipFamilyPolicy": "SingleStack", "sessionAffinity": "None",
                 "ports": [{"name": "http", "port": port, "protocol": "TCP", "targetPort": 8080}], **spec},
        "status": {"loadBalancer": {}},
    }


def slice_(svc: str, *ips: str, node: str = "node-a", suffix: str = "abcde") -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
        "metadata": {"name": f"{svc}-{suffix}", "namespace": "default",
                     "labels": {"kubernetes.io/service-name": svc,
                                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": [ip], "nodeName": node,
                       "conditions": {"ready": True, "serving": True, "terminating": False}} for ip in ips],
    }


def get(url: str) -> tuple[int, str]:
    try:
        # The agent's port listens from construction but answers only once run() has made its
        # sources (importing the Kubernetes client takes seconds on a loaded machine): a
        # request waits in the listen queue meanwhile, so the bound is generous.
        with urllib.request.urlopen(url, timeout=30) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def wait_until(predicate: Callable[[], bool], timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class Running:
    def __init__(self, agent: Agent, backend: MemoryBackend) -> None:
        self.agent, self.backend = agent, backend
        self.base = f"http://127.0.0.1:{agent.server.port}"
        self.thread = threading.Thread(target=agent.run, daemon=True)

    def dests(self, key: ServiceKey) -> dict[str, int]:
        vs = self.backend.read().services.get(key)
        return {d.address: d.weight for d in vs.destinations} if vs else {}


@pytest.fixture
def start_agent() -> Iterator[Callable[..., Running]]:
    running: list[Running] = []

    def start(backend: MemoryBackend | None = None, **cfg: Any) -> Running:
        cfg = {"min_sync_period": 0.1, "sync_period": 2.0, **cfg}
        config = AgentConfig(node_name="node-a", health_bind="127.0.0.1:0", healthcheck_bind_host="127.0.0.1", **cfg)
        backend = backend or MemoryBackend()
        r = Running(Agent(config, backend), backend)
        r.thread.start()
        running.append(r)
        return r

    yield start
    for r in running:
        r.agent.stop.set()
        r.thread.join(10)
        assert not r.thread.is_alive(), "agent did not stop"


def test_agent_against_the_api_server(start_agent: Callable[..., Running], tmp_path: Path) -> None:
    hc_port = free_port()
    with FakeApiServer() as fake:
        fake.apply({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a", "labels": {
            "topology.kubernetes.io/zone": "zone-a"}}, "status": {"addresses": [
                {"type": "InternalIP", "address": "192.168.0.10"}]}})
        fake.apply(service("web", "10.96.0.20", 80))
        fake.apply(slice_("web", "10.244.1.1", "10.244.2.1"))
        fake.apply(service("lb", "10.96.0.30", 443, type="LoadBalancer", externalTrafficPolicy="Local",
                           healthCheckNodePort=hc_port))
        fake.apply(slice_("lb", "10.244.1.7"))
        r = start_agent(kubeconfig=fake.write_kubeconfig(tmp_path / "kubeconfig"))

        wait_until(lambda: get(r.base + "/readyz")[0] == 200, what="first full sync")
        assert r.dests(WEB) == {"10.244.1.1": 1, "10.244.2.1": 1}
        assert r.dests(LB) == {"10.244.1.7": 1}
        code, body = get(r.base + "/healthz")
        assert code == 200 and json.loads(body)["nodeEligible"] is True
        metrics = get(r.base + "/metrics")[1]
        assert "svcproxy_virtual_servers 2.0" in metrics
        assert 'svcproxy_watch_lists_total{resource="Service"} 1.0' in metrics

        wait_until(lambda: get(f"http://127.0.0.1:{hc_port}/")[0] == 200, what="healthCheckNodePort")
        assert json.loads(get(f"http://127.0.0.1:{hc_port}/")[1])["localEndpoints"] == 1

        # An endpoint change reaches the kernel table.
        fake.apply(slice_("web", "10.244.1.1", "10.244.3.1"))
        wait_until(lambda: "10.244.3.1" in r.dests(WEB), what="endpoint change")
        assert r.dests(WEB) == {"10.244.1.1": 1, "10.244.3.1": 1, "10.244.2.1": 0}  # TCP: drained, not cut
        # No connections in the (simulated) kernel: the next full sync deletes it.
        wait_until(lambda: r.dests(WEB) == {"10.244.1.1": 1, "10.244.3.1": 1}, what="drain completes")

        # The local endpoint goes away: the health check answers 503 with count 0.
        fake.apply(slice_("lb", "10.244.9.9", node="node-b"))
        wait_until(lambda: get(f"http://127.0.0.1:{hc_port}/")[0] == 503, what="no local endpoints")

        # API server down: every rule stays as it is, through several full syncs.
        wait_until(lambda: not r.agent.proxier.draining, what="drains complete")
        before = r.backend.read()
        applied_before = len(r.backend.applied)
        fake.down()
        time.sleep(5)
        assert r.backend.read() == before and len(r.backend.applied) == applied_before
        assert get(r.base + "/livez")[0] == 200

        # Changes made while it was unreachable converge once it is back.
        fake.delete("Service", "default", "lb")
        fake.delete("EndpointSlice", "default", "lb-abcde")
        fake.up()
        wait_until(lambda: LB not in r.backend.read().services, timeout=40, what="convergence after outage")
        assert WEB in r.backend.read().services
        wait_until(lambda: not _port_open(hc_port), what="healthCheckNodePort server stopped")


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_agent_from_a_file_in_dry_run_changes_nothing(start_agent: Callable[..., Running], tmp_path: Path) -> None:
    path = tmp_path / "cluster.json"
    path.write_text(json.dumps({"apiVersion": "v1", "kind": "List",
                                "items": [service("web", "10.96.0.20", 80), slice_("web", "10.244.1.1")]}))
    r = start_agent(file=str(path), dry_run=True)
    wait_until(lambda: get(r.base + "/readyz")[0] == 200, what="first (dry) sync")
    assert r.backend.applied == [] and len(r.backend.read()) == 0
    assert r.agent.proxier.last_result is not None and len(r.agent.proxier.last_result.operations) == 2


def test_agent_follows_a_file_and_keeps_rules_when_it_breaks(start_agent: Callable[..., Running],
                                                             tmp_path: Path) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text(json.dumps({"apiVersion": "v1", "kind": "List",
                                "items": [service("web", "10.96.0.20", 80), slice_("web", "10.244.1.1")]}))
    r = start_agent(file=str(path))
    wait_until(lambda: r.dests(WEB) == {"10.244.1.1": 1}, what="file sync")
    path.write_text(json.dumps({"apiVersion": "v1", "kind": "List",
                                "items": [service("web", "10.96.0.20", 80), slice_("web", "10.244.1.1", "10.244.1.2")]}))
    wait_until(lambda: r.dests(WEB) == {"10.244.1.1": 1, "10.244.1.2": 1}, what="file change")
    path.write_text("kind: [this is not valid")
    time.sleep(3)
    assert r.dests(WEB) == {"10.244.1.1": 1, "10.244.1.2": 1}


def _without_namespace(obj: dict[str, Any]) -> dict[str, Any]:
    meta = {k: v for k, v in obj["metadata"].items() if k != "namespace"}
    return {**obj, "metadata": meta}


def _duplicates(r: Running) -> float:
    return float(r.agent.metrics.input_problems.labels("duplicate-virtual-service")._value.get())


def test_objects_without_a_namespace_from_a_file_take_partial_syncs(start_agent: Callable[..., Running],
                                                                     tmp_path: Path) -> None:
    """Files rarely name a namespace: the Service and its slices are then in "default"
    for every part of the agent, so an endpoint change is applied by the partial sync
    that follows it (not refused as a second claim on the Service's own ClusterIP)."""
    path = tmp_path / "cluster.json"

    def write(*ips: str) -> None:
        items = [_without_namespace(service("web", "10.96.0.20", 80)), _without_namespace(slice_("web", *ips))]
        path.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))

    write("10.244.1.1")
    r = start_agent(file=str(path), sync_period=600.0)
    wait_until(lambda: r.dests(WEB) == {"10.244.1.1": 1}, what="file sync")
    write("10.244.1.1", "10.244.1.2")
    wait_until(lambda: r.dests(WEB) == {"10.244.1.1": 1, "10.244.1.2": 1}, what="partial sync of the change")
    assert _duplicates(r) == 0
    assert r.agent.proxier.full_syncs == 1 and r.agent.proxier.partial_syncs >= 1


def test_objects_without_a_namespace_from_the_api_server_take_partial_syncs(
        start_agent: Callable[..., Running], tmp_path: Path) -> None:
    """The same through the watcher: the server's copies are taken as sent."""
    with FakeApiServer() as fake:
        fake.apply({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a"},
                    "status": {"addresses": [{"type": "InternalIP", "address": "192.168.0.10"}]}})
        fake.inject_list_item("Service", _without_namespace(service("web", "10.96.0.20", 80)))
        fake.inject_list_item("EndpointSlice", _without_namespace(slice_("web", "10.244.1.1")))
        r = start_agent(kubeconfig=fake.write_kubeconfig(tmp_path / "kubeconfig"), sync_period=600.0)
        wait_until(lambda: r.dests(WEB) == {"10.244.1.1": 1}, what="first full sync")
        changed = _without_namespace(slice_("web", "10.244.1.1", "10.244.1.2"))
        changed["metadata"]["resourceVersion"] = "999"
        fake.inject_watch_line("EndpointSlice", {"type": "MODIFIED", "object": changed})
        wait_until(lambda: r.dests(WEB) == {"10.244.1.1": 1, "10.244.1.2": 1}, what="partial sync of the change")
        assert _duplicates(r) == 0
        assert r.agent.proxier.full_syncs == 1 and r.agent.proxier.partial_syncs >= 1


def test_a_file_that_parses_to_nothing_keeps_the_rules_and_an_empty_list_removes_them(
        start_agent: Callable[..., Running], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text(json.dumps({"apiVersion": "v1", "kind": "List",
                                "items": [service("web", "10.96.0.20", 80), slice_("web", "10.244.1.1")]}))
    r = start_agent(file=str(path))
    wait_until(lambda: r.dests(WEB) == {"10.244.1.1": 1}, what="file sync")
    source = r.agent.sources[0]
    for broken in ("\n", "a scalar\n", "kind: ConfigMap\n", "kind: Service\napiVersion: v1\n",
                   "kind: Service\nmetadata: {name: ''}\n"):
        errors = source.stats.errors
        path.write_text(broken)
        wait_until(lambda: source.stats.errors > errors, what=f"the file source noticing {broken!r}")
        assert r.dests(WEB) == {"10.244.1.1": 1}
    path.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": []}))
    wait_until(lambda: WEB not in r.backend.read().services, what="the empty List applied")
    assert any("empty List" in rec.getMessage() and rec.levelname == "WARNING" for rec in caplog.records)


def test_plan_of_a_file_with_nothing_in_it_is_an_error(tmp_path: Path) -> None:
    from svcproxy.cli import main

    path = tmp_path / "cluster.yaml"
    path.write_text("\n")
    backend = MemoryBackend()
    assert main(["sync", "-f", str(path)], backend=backend) == 1
    path.write_text("kind: List\napiVersion: v1\nitems: []\n")
    assert main(["plan", "-f", str(path)], backend=backend) == 0


class NoIpvs(MemoryBackend):
    def read(self, counts: bool | None = None) -> Any:
        from svcproxy.ipvs.backend import BackendError

        raise BackendError("IPVS not found (is the ip_vs module loaded?)")


def test_a_dry_run_beside_the_live_agent_takes_nothing_and_previews_without_ipvs(
        start_agent: Callable[..., Running], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """On a node (or a laptop) with no IPVS, --dry-run compares with an empty table
    (saying so once), becomes ready and logs the plan; it serves no CNI socket, not
    even one named on its command line, so the live agent's stays as it is."""
    import logging

    caplog.set_level(logging.INFO)
    socket_path = tmp_path / "live-agent.sock"
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(str(socket_path))
    live.listen(1)
    path = tmp_path / "cluster.json"
    path.write_text(json.dumps({"apiVersion": "v1", "kind": "List",
                                "items": [service("web", "10.96.0.20", 80), slice_("web", "10.244.1.1")]}))
    try:
        r = start_agent(NoIpvs(), file=str(path), dry_run=True, cni_socket=str(socket_path),
                        cni_socket_required=True)
        wait_until(lambda: get(r.base + "/readyz")[0] == 200, what="ready in a dry run without IPVS")
        messages = [rec.getMessage() for rec in caplog.records]
        assert sum("comparing with an empty table" in m for m in messages) == 1
        assert any("would apply 2 operations" in m and "10.244.1.1" in m for m in messages)
        assert r.agent.cni_server is None and r.backend.applied == []
        r.agent.stop.set()
        r.thread.join(10)
        assert socket_path.exists()  # the live agent's socket is still there
        live.settimeout(1)
    finally:
        live.close()


def test_a_service_listed_twice_in_a_file_keeps_the_first_copy_as_plan_does(
        start_agent: Callable[..., Running], tmp_path: Path) -> None:
    from svcproxy.cli import main

    first = service("web", "10.96.0.20", 80)
    second = _without_namespace(service("web", "10.96.0.99", 80))  # the same Service: "default"
    path = tmp_path / "cluster.json"
    path.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": [first, second, slice_("web", "10.244.1.1")]}))
    r = start_agent(file=str(path))
    wait_until(lambda: r.dests(WEB) == {"10.244.1.1": 1}, what="file sync")
    assert set(r.backend.read().services) == {WEB}
    planned = MemoryBackend()
    assert main(["sync", "-f", str(path), "--node", "node-a"], backend=planned) == 0
    assert set(planned.read().services) == {WEB}


def test_a_dry_run_starts_beside_an_agent_holding_the_health_port(tmp_path: Path) -> None:
    """By default a dry run's health server takes 127.0.0.1 and a free port, not the
    live agent's 10256 (held here by a socket of the test's)."""
    import subprocess
    import sys

    cluster = tmp_path / "cluster.json"
    cluster.write_text(json.dumps({"apiVersion": "v1", "kind": "List",
                                   "items": [service("web", "10.96.0.20", 80), slice_("web", "10.244.1.1")]}))
    with socket.socket() as live:
        live.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            live.bind(("0.0.0.0", 10256))
        except OSError:
            pytest.skip("port 10256 is taken on this machine")
        live.listen(1)
        proc = subprocess.Popen([sys.executable, "-m", "svcproxy", "run", "-f", str(cluster), "--node", "node-a",
                                 "--dry-run", "--cni-socket", "", "--node-plumbing", "off", "--backend", "ipvsadm",
                                 "--ipvsadm", "/nonexistent/ipvsadm"],
                                stderr=subprocess.PIPE, text=True)
        try:
            assert proc.stderr is not None
            for line in proc.stderr:
                if "health and metrics on 127.0.0.1:" in line:
                    break
            else:
                raise AssertionError("the dry run did not start its health server")
            assert proc.poll() is None
        finally:
            proc.terminate()
            proc.wait(10)


def test_nodeport_addresses_primary_reaches_the_loop_without_reading_the_kernel() -> None:
    """`primary` is a rule over the Node object, not a CIDR for rtnetlink."""
    base = {"node_name": "node-a", "health_bind": "127.0.0.1:0", "healthcheck_bind_host": "127.0.0.1"}
    agent = Agent(AgentConfig(**base, nodeport_addresses=("primary",)), MemoryBackend())
    assert agent.proxier.config.primary_node_ips is True
    assert agent.proxier.config.node_address_source is None
    cidrs = Agent(AgentConfig(**base, nodeport_addresses=("10.0.0.0/8",)), MemoryBackend())
    assert cidrs.proxier.config.primary_node_ips is False
    assert cidrs.proxier.config.node_address_source is not None
