"""`svcproxy run` (the node agent) against the fake API server and real IPVS, in the VM.

The fake API server (tests/fakeapi.py, standalone, driven by its state file) and the
agent both run inside the client namespace of test_traffic.py's topology: the agent
reaches the API server on that namespace's 127.0.0.1 through the official client and
a kubeconfig, and its ipvsadm programs that namespace's IPVS table, which catches the
client's own traffic. Changes are made the way a cluster makes them: by editing
objects on the API server (the state file is re-applied when it changes).

Shown here: an endpoint change made through the API server moves real traffic;
graceful termination keeps an open TCP connection working at weight 0 (new
connections go elsewhere) and deletes the real server once that connection has
closed, also across an agent restart mid-drain; a restart with the rules in place
writes nothing to the kernel; an unreachable API server leaves every rule alone.
"""

from __future__ import annotations

import os
import re
import queue
import signal
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from k8s_objects import endpoint, endpoint_slice, node, service, slice_port, svc_port
from svcproxy.ipvs.ipvsadm import parse_list
from svcproxy.model import Destination, Protocol, ServiceKey

from .netns import HELPER_PYTHON, Lab, curl, ipvsadm, ns_cmd, request, request_many, wait_until
from .test_sync import write_cluster
from .test_traffic import HTTP_PORT, PODS, Client, Net, answered, client, net  # noqa: F401 (fixtures)

pytestmark = pytest.mark.kernel

REPO = Path(__file__).resolve().parents[2]
FAKEAPI = REPO / "tests" / "fakeapi.py"
HEALTH = "127.0.0.1:10256"  # inside the client namespace: no clash with anything
SYNC_PERIOD = 2.0
#: Long enough that a real server deleted during a test was deleted because its
#: connections ended, never because the drain timed out.
GRACEFUL_TIMEOUT = 1200
#: The emulated VM is slow: importing the kubernetes client alone takes 20-60 s there
#: (and much longer when the machine is busy with other VMs).
START_TIMEOUT = 600.0

ECHO_PORT = 9000
VIP = "10.96.0.10"
ECHO_VIP = "10.96.0.50"
WEB_KEY = ServiceKey(Protocol.TCP, VIP, 80)
ECHO_KEY = ServiceKey(Protocol.TCP, ECHO_VIP, ECHO_PORT)


def guest_state() -> str:
    """What the VM is busy with (for timeout messages)."""
    ps = subprocess.run(["ps", "-eo", "pid,etime,time,rss,args"], capture_output=True, text=True).stdout
    with open("/proc/loadavg") as f:
        return f"--- load {f.read().strip()} --- ps ---\n{ps[-6000:]}"


_LINES: "weakref.WeakKeyDictionary[subprocess.Popen[str], queue.Queue[str | None]]" = weakref.WeakKeyDictionary()


def read_line(proc: subprocess.Popen[str], timeout: float, what: str) -> str:
    """The process's next output line, waiting at most `timeout` seconds.

    A reader thread per process feeds a queue: select() on the pipe cannot be
    used with readline(), which may pull several lines into its buffer at once
    and leave select() waiting for bytes that have already arrived.
    """
    q = _LINES.get(proc)
    if q is None:
        q = _LINES[proc] = queue.Queue()
        threading.Thread(target=_pump, args=(proc, q), daemon=True).start()
    try:
        line = q.get(timeout=timeout)
    except queue.Empty:
        raise AssertionError(f"no output from {what} within {timeout:.0f}s\n{guest_state()}") from None
    if line is None:
        q.put(None)  # for the next caller too
        raise AssertionError(f"{what} exited ({proc.wait()}) without output")
    return line.rstrip("\n")


def _pump(proc: subprocess.Popen[str], q: "queue.Queue[str | None]") -> None:
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            q.put(line)
    except (OSError, ValueError):
        pass  # closed by Procs.close()
    q.put(None)


# --------------------------------------------------------------------------------------
# processes: the fake API server, the agent, echo servers and a long-lived client


class Procs:
    """Processes a test started; all killed at the end."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[Any]] = []

    def popen(self, cmd: list[str], **kw: Any) -> subprocess.Popen[Any]:
        proc = subprocess.Popen(cmd, **kw)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)
            for f in (proc.stdin, proc.stdout):
                if f:
                    f.close()


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    p = Procs()
    try:
        yield p
    finally:
        p.close()
        log = tmp_path / "agent.log"
        if log.exists() and os.environ.get("SVCPROXY_SHOW_AGENT_LOG"):
            print(f"\n--- {log} ---\n{log.read_text()[-20000:]}")


class FakeApi:
    def __init__(self, procs: Procs, ns: str, state: Path, objs: list[dict[str, Any]]) -> None:
        self.ns, self.state = ns, state
        self.kubeconfig = state.with_name("kubeconfig")
        write_cluster(state, objs)
        self.proc = procs.popen(
            ns_cmd(ns, [sys.executable, str(FAKEAPI), "--port", "0", "--state", str(state),
                        "--kubeconfig", str(self.kubeconfig)]),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines = [read_line(self.proc, START_TIMEOUT, "fakeapi.py") for _ in range(2)]
        assert lines[0].startswith("URL=http://127.0.0.1:") and lines[1].startswith("KUBECONFIG="), lines

    def set(self, objs: list[dict[str, Any]]) -> None:
        """Replace the API server's objects (it re-reads its state file on change)."""
        write_cluster(self.state, objs)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=30)


class AgentProc:
    """``svcproxy run`` in a namespace, its log in a file."""

    def __init__(self, procs: Procs, ns: str, api: FakeApi, log: Path, *extra: str) -> None:
        self.ns, self.log = ns, log
        cmd = [sys.executable, "-m", "svcproxy", "run", "--node-plumbing", "off", "--kubeconfig", str(api.kubeconfig),
               "--node", "node-a", "--health-bind", HEALTH, "--healthcheck-bind-host", "127.0.0.1",
               "--min-sync-period", "0.2", "--sync-period", str(SYNC_PERIOD),
               "--graceful-timeout", str(GRACEFUL_TIMEOUT), "--cni-socket", "", *extra]
        with open(log, "a") as f:
            f.write(f"===== {' '.join(cmd)}\n")
            self.proc = procs.popen(ns_cmd(ns, cmd), stdin=subprocess.DEVNULL, stdout=f,
                                    stderr=subprocess.STDOUT)

    def text(self) -> str:
        """This run's log (the file also holds earlier runs', each after a ===== line)."""
        return "===== " + self.log.read_text().split("===== ")[-1]

    def get(self, path: str) -> tuple[int, str]:
        cp = curl(self.ns, f"http://{HEALTH}{path}", check=False, extra=["-w", "\n%{http_code}"])
        body, _, code = cp.stdout.rpartition("\n")
        return (int(code) if code.isdigit() else 0), body

    def metric(self, name: str, labels: str = "") -> float:
        code, body = self.get("/metrics")
        assert code == 200, body
        m = re.search(rf"^{re.escape(name + labels)} (\S+)$", body, re.M)
        return float(m.group(1)) if m else 0.0

    def full_syncs(self) -> float:
        return self.metric("svcproxy_syncs_total", '{mode="full"}')

    def wait_ready(self) -> None:
        def ready() -> bool:
            assert self.proc.poll() is None, f"agent exited ({self.proc.returncode}):\n{self.text()}"
            return self.get("/readyz")[0] == 200

        t0 = time.monotonic()
        try:
            wait_until(ready, START_TIMEOUT, "the agent's first full sync (/readyz 200)", interval=1.0)
        except AssertionError as e:
            raise AssertionError(f"{e}\n--- agent log ---\n{self.text()[-5000:]}\n{guest_state()}") from None
        print(f"agent ready after {time.monotonic() - t0:.1f}s")

    def wait_full_syncs(self, n: int) -> None:
        """Until ``n`` more full syncs (each re-reads the kernel) have run."""
        target = self.full_syncs() + n
        wait_until(lambda: self.full_syncs() >= target, 30 + 10 * n * SYNC_PERIOD, f"{n} more full syncs")

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout=60)
        assert "IPVS rules left in place" in self.text()
        return rc


ECHO_SERVER = r"""
import socket, sys, threading
name, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("::", port))
s.listen(64)
print("READY", flush=True)
def handle(c):
    with c:
        c.sendall(name.encode() + b"\n")
        for line in c.makefile("rb"):
            c.sendall(name.encode() + b" " + line)
while True:
    c, _ = s.accept()
    threading.Thread(target=handle, args=(c,), daemon=True).start()
"""

# `hold HOST PORT`: connect, print the greeting, echo stdin lines through the
# connection, close it at EOF on stdin and print CLOSED.
# `probe HOST PORT N`: N new connections, print each greeting.
ECHO_CLIENT = r"""
import socket, sys
mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
def connect():
    c = socket.create_connection((host, port), timeout=10)
    return c, c.makefile("rb")
try:
    if mode == "probe":
        for _ in range(int(sys.argv[4])):
            c, f = connect()
            print(f.readline().decode().strip(), flush=True)
            c.close()
    else:
        c, f = connect()
        print(f.readline().decode().strip(), flush=True)
        for line in sys.stdin:
            c.sendall(line.encode())
            print(f.readline().decode().strip() or "EOF", flush=True)
        c.close()
        print("CLOSED", flush=True)
except OSError as e:
    print(f"ERROR {type(e).__name__}: {e}", flush=True)
"""


def start_echo_servers(procs: Procs, net: Net, pods: tuple[str, ...]) -> None:
    for name in pods:
        proc = procs.popen(ns_cmd(net.pods[name].ns, [*HELPER_PYTHON, "-c", ECHO_SERVER, name, str(ECHO_PORT)]),
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert read_line(proc, 60, f"echo server {name}") == "READY"


class Held:
    """One long-lived TCP connection from the client namespace."""

    def __init__(self, procs: Procs, ns: str, host: str, port: int) -> None:
        self.proc = procs.popen(ns_cmd(ns, [*HELPER_PYTHON, "-c", ECHO_CLIENT, "hold", host, str(port)]),
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1)
        self.greeting = read_line(self.proc, 60, "echo client")

    def exchange(self, text: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()
        return read_line(self.proc, 30, "echo client")

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        assert read_line(self.proc, 30, "echo client") == "CLOSED"
        assert self.proc.wait(timeout=30) == 0


def probe(ns: str, host: str, port: int, n: int) -> list[str]:
    cmd = ns_cmd(ns, [*HELPER_PYTHON, "-c", ECHO_CLIENT, "probe", host, str(port), str(n)])
    cp = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    return cp.stdout.splitlines()


def dests(ns: str, key: ServiceKey) -> dict[str, Destination]:
    """The real servers of one virtual service in the namespace's kernel table, by address."""
    vs = parse_list(ipvsadm(ns, "-Ln")).services.get(key)
    return {d.address: d for d in vs.destinations} if vs else {}


# --------------------------------------------------------------------------------------
# the cluster the API server serves


def cluster(net: Net, web_pods: tuple[str, ...], echo_pods: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    objs = [
        node("node-a"),
        service("web", cluster_ips=(VIP,), ports=[svc_port("http", 80, target_port=HTTP_PORT)]),
        endpoint_slice("web", ports=[slice_port("http", HTTP_PORT)],
                       endpoints=[endpoint(net.pods[p].ip4, pod=p, node="node-a") for p in web_pods]),
    ]
    if echo_pods:
        objs += [
            service("echo", cluster_ips=(ECHO_VIP,), ports=[svc_port("echo", ECHO_PORT)]),
            endpoint_slice("echo", ports=[slice_port("echo", ECHO_PORT)],
                           endpoints=[endpoint(net.pods[p].ip4, pod=p) for p in echo_pods]),
        ]
    return objs


@dataclass
class Setup:
    api: FakeApi
    agent: AgentProc
    log: Path


@pytest.fixture
def start(procs: Procs, client: Client, tmp_path: Path) -> Callable[..., Setup]:
    def go(objs: list[dict[str, Any]], *extra: str) -> Setup:
        api = FakeApi(procs, client.ns, tmp_path / "state.json", objs)
        log = tmp_path / "agent.log"
        agent = AgentProc(procs, client.ns, api, log, *extra)
        agent.wait_ready()
        return Setup(api, agent, log)

    return go


# --------------------------------------------------------------------------------------
# tests


def test_endpoint_change_through_the_api_server_moves_traffic(
    net: Net, client: Client, start: Callable[..., Setup]
) -> None:
    s = start(cluster(net, ("pod-a", "pod-b")))
    assert answered(request_many(client.ns, VIP, 80, 6)) == {"pod-a": 3, "pod-b": 3}

    t0 = time.monotonic()
    s.api.set(cluster(net, ("pod-a", "pod-c")))  # pod-b replaced by pod-c

    def moved() -> bool:
        return set(answered(request_many(client.ns, VIP, 80, 4))) == {"pod-a", "pod-c"}

    wait_until(moved, 60, "traffic to move from pod-b to pod-c", interval=0.5)
    print(f"endpoint change reached the traffic in {time.monotonic() - t0:.1f}s")
    assert answered(request_many(client.ns, VIP, 80, 12)) == {"pod-a": 6, "pod-c": 6}
    # pod-b is drained (weight 0) or already deleted; pod-c serves at full weight
    weights = {a: d.weight for a, d in dests(client.ns, WEB_KEY).items()}
    assert weights.get(net.pods["pod-b"].ip4, 0) == 0
    assert weights[net.pods["pod-c"].ip4] == weights[net.pods["pod-a"].ip4] == 1
    assert s.agent.metric("svcproxy_ipvs_failed_operations_total", '{op="add-destination"}') == 0

    # a Service added through the API server answers; deleted, it stops answering
    s.api.set(cluster(net, ("pod-a", "pod-c")) + [
        service("extra", cluster_ips=("10.96.0.11",), ports=[svc_port("http", 80, target_port=HTTP_PORT)]),
        endpoint_slice("extra", ports=[slice_port("http", HTTP_PORT)],
                       endpoints=[endpoint(net.pods["pod-b"].ip4, pod="pod-b")]),
    ])
    wait_until(lambda: request(client.ns, "10.96.0.11", 80, timeout=1, check=False).text == "pod-b", 60,
               "the new Service to answer")
    s.api.set(cluster(net, ("pod-a", "pod-c")))
    wait_until(lambda: not request(client.ns, "10.96.0.11", 80, timeout=1, check=False).ok, 60,
               "the deleted Service to stop answering")
    assert ServiceKey(Protocol.TCP, "10.96.0.11", 80) not in parse_list(ipvsadm(client.ns, "-Ln")).services
    assert "IPVS operation failed" not in s.agent.text()


def _drain(net: Net, client: Client, procs: Procs, start: Callable[..., Setup],
           restart_mid_drain: bool) -> None:
    start_echo_servers(procs, net, ("pod-a", "pod-b"))
    s = start(cluster(net, ("pod-a",), echo_pods=("pod-a", "pod-b")))
    assert {a: d.weight for a, d in dests(client.ns, ECHO_KEY).items()} == {
        net.pods["pod-a"].ip4: 1, net.pods["pod-b"].ip4: 1}

    held = Held(procs, client.ns, ECHO_VIP, ECHO_PORT)
    x = held.greeting  # the pod this connection landed on; it will be removed
    assert x in ("pod-a", "pod-b"), x
    (y,) = {"pod-a", "pod-b"} - {x}
    x_ip = net.pods[x].ip4
    assert held.exchange("one") == f"{x} one"

    s.api.set(cluster(net, ("pod-a",), echo_pods=(y,)))

    wait_until(lambda: (d := dests(client.ns, ECHO_KEY).get(x_ip)) is not None and d.weight == 0, 60,
               f"{x} to go to weight 0")
    d = dests(client.ns, ECHO_KEY)[x_ip]
    assert d.active_conns == 1  # the held connection, still established
    assert held.exchange("two") == f"{x} two"  # and still carrying data
    assert probe(client.ns, ECHO_VIP, ECHO_PORT, 6) == [y] * 6  # new connections go elsewhere
    assert s.agent.metric("svcproxy_draining_real_servers") == 1

    s.agent.wait_full_syncs(3)  # full syncs re-read connection counts: the drain holds
    assert dests(client.ns, ECHO_KEY)[x_ip].weight == 0
    assert held.exchange("three") == f"{x} three"

    if restart_mid_drain:
        saved = ipvsadm(client.ns, "-Sn")
        assert s.agent.stop() == 0
        assert ipvsadm(client.ns, "-Sn") == saved  # an exiting agent leaves rules as they are
        s.agent = AgentProc(procs, client.ns, s.api, s.log)
        s.agent.wait_ready()
        s.agent.wait_full_syncs(2)
        assert dests(client.ns, ECHO_KEY)[x_ip].weight == 0  # adopted, neither cut nor restored
        assert s.agent.metric("svcproxy_draining_real_servers") == 1
        assert held.exchange("four") == f"{x} four"

    t0 = time.monotonic()
    held.close()
    # A closed connection still counts as inactive (InActConn) through IPVS's TIME_WAIT,
    # two minutes, as in kube-proxy: the real server goes once that has passed.
    wait_until(lambda: x_ip not in dests(client.ns, ECHO_KEY), 400, f"{x} to be deleted after its connection closed",
               interval=2.0)
    took = time.monotonic() - t0
    print(f"drained real server deleted {took:.1f}s after its last connection closed")
    assert took < GRACEFUL_TIMEOUT / 2  # because the connection ended, not by timeout
    assert set(dests(client.ns, ECHO_KEY)) == {net.pods[y].ip4}
    wait_until(lambda: s.agent.metric("svcproxy_draining_real_servers") == 0, 30, "the draining gauge to drop")
    assert "IPVS operation failed" not in s.agent.text()


def test_graceful_termination_keeps_an_open_connection_until_it_closes(
    net: Net, client: Client, procs: Procs, start: Callable[..., Setup]
) -> None:
    _drain(net, client, procs, start, restart_mid_drain=False)


def test_restart_mid_drain_keeps_the_drain(
    net: Net, client: Client, procs: Procs, start: Callable[..., Setup]
) -> None:
    _drain(net, client, procs, start, restart_mid_drain=True)


def test_restart_with_rules_in_place_writes_nothing(
    net: Net, client: Client, procs: Procs, start: Callable[..., Setup], tmp_path: Path
) -> None:
    s = start(cluster(net, PODS))
    assert s.agent.metric("svcproxy_ipvs_operations_total", '{op="add-destination"}') == 3
    saved = ipvsadm(client.ns, "-Sn")
    assert len(parse_list(ipvsadm(client.ns, "-Ln"))) == 1

    assert s.agent.stop() == 0
    assert ipvsadm(client.ns, "-Sn") == saved
    assert answered(request_many(client.ns, VIP, 80, 3)) == {p: 1 for p in PODS}  # serving without an agent

    # the second agent runs ipvsadm through a wrapper that logs every invocation
    calls = tmp_path / "ipvsadm-calls.log"
    wrapper = tmp_path / "ipvsadm-logged"
    wrapper.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> {calls}\nexec ipvsadm "$@"\n')
    wrapper.chmod(0o755)
    s.agent = AgentProc(procs, client.ns, s.api, s.log, "--backend", "ipvsadm", "--ipvsadm", str(wrapper))
    s.agent.wait_ready()
    s.agent.wait_full_syncs(2)

    invocations = calls.read_text().splitlines()
    assert invocations, "the wrapper was not used"
    assert set(invocations) <= {"-Ln", "-Sn"}, invocations  # reads only: no -R, no -C
    assert ipvsadm(client.ns, "-Sn") == saved
    assert "operations applied" not in s.agent.text(), s.agent.text()
    for op in ("add-service", "add-destination", "edit-destination", "delete-destination", "delete-service"):
        assert s.agent.metric("svcproxy_ipvs_operations_total", f'{{op="{op}"}}') == 0, op

    # the API server goes away: every rule stays, through several full syncs
    s.api.kill()
    s.agent.wait_full_syncs(3)
    assert ipvsadm(client.ns, "-Sn") == saved
    assert set(calls.read_text().splitlines()) <= {"-Ln", "-Sn"}
    assert answered(request_many(client.ns, VIP, 80, 6)) == {p: 2 for p in PODS}
    assert s.agent.get("/livez")[0] == 200
