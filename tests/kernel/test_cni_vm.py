"""The CNI chain as a container runtime runs it, with Debian's reference plugins and
``svcproxy-cni`` (the static executable) against a running ``svcproxy run`` agent, in
the VM.

Topology (every piece a namespace of its own; the VM's root namespace is untouched)::

    node  (the node: the agent and the CNI plugins run here, as under containerd)
      |  eniN: a veth end standing for an elastic NIC, waiting to be moved into a Pod
    vpc   (the VPC: gateway 10.0.2.1 on the other ends, router to the backend)
      |
    backend 10.0.3.2:8080 (the Service's only endpoint)

    pod   (the sandbox the runtime made: loopback only, until the chain runs)

The conflist chains ``host-device`` (moves ``eniN`` into the Pod namespace as eth0 and
runs ``static`` IPAM on it: 10.0.2.10/24 and a default route via 10.0.2.1) before
``svcproxy-cni``. :class:`Runtime` drives it the way libcni does: VERSION first, ADD
plugin by plugin with each result as the next ``prevResult`` (the first error stops
it), the final result cached, CHECK with the cached result for every plugin, DEL in
reverse order with the cached result (none if ADD failed).

The Pod's traffic leaves through its own NIC straight into the VPC namespace and never
passes the node namespace, so the ClusterIP only answers because the agent programmed
the Pod namespace's own IPVS table, which it must have done by the time ADD returns.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from cni_build import is_static, static_plugin
from k8s_objects import endpoint, endpoint_slice, node, service, slice_port, svc_port

from .netns import Lab, ip_batch, ipvsadm, ns_cmd, request, run, sysctl, wait_until
from .test_sync import write_cluster

pytestmark = pytest.mark.kernel

REPO = Path(__file__).resolve().parents[2]
REFERENCE_PLUGINS = Path("/usr/lib/cni")
EXAMPLE = REPO / "examples" / "cni" / "10-eni.conflist"
VIP, PORT = "10.96.0.10", 80
BACKEND_IP, BACKEND_PORT = "10.0.3.2", 8080
GATEWAY = "10.0.2.1"
SELECT = "svcproxy.io/share-ns"
HEALTH = "127.0.0.1:10256"  # inside the node namespace
#: The emulated VM is slow: a Python process with the agent's imports takes a while.
START_TIMEOUT = 180.0
#: How long svcproxy-cni waits for the agent (its config's ``timeout``).
PLUGIN_TIMEOUT = 90


# --------------------------------------------------------------------------------------
# a runtime, as libcni


@dataclass
class Result:
    plugin: str
    rc: int
    stdout: str
    stderr: str
    command: str = ""
    seconds: float = 0.0

    @property
    def doc(self) -> Any:
        return json.loads(self.stdout) if self.stdout.strip() else None

    def __str__(self) -> str:
        return f"{self.plugin}: exit {self.rc}\nstdout: {self.stdout.strip()}\nstderr: {self.stderr.strip()}"


class ChainError(AssertionError):
    def __init__(self, command: str, result: Result) -> None:
        super().__init__(f"{command} failed in {result}")
        self.result = result
        self.error = result.doc or {}


class Runtime:
    """Runs one network's conflist for one sandbox the way libcni does."""

    def __init__(self, ns: str, conflist: dict[str, Any], cni_path: list[Path], *, container_id: str,
                 netns: str, ifname: str = "eth0", pod: tuple[str, str, str] = ("default", "web-0", ""),
                 annotations: dict[str, str] | None = None) -> None:
        self.ns, self.conflist, self.cni_path = ns, conflist, cni_path
        self.container_id, self.netns, self.ifname = container_id, netns, ifname
        namespace, name, uid = pod
        # containerd's order is random; it always adds IgnoreUnknown=1 for the IPAM plugins
        self.args = (f"K8S_POD_NAME={name};IgnoreUnknown=1;K8S_POD_UID={uid};K8S_POD_NAMESPACE={namespace};"
                     f"K8S_POD_INFRA_CONTAINER_ID={container_id}")
        self.runtime_config = {"io.kubernetes.cri.pod-annotations": annotations or {}}
        self.cached: dict[str, Any] | None = None
        self.log: list[Result] = []

    def find(self, plugin_type: str) -> Path:
        for d in self.cni_path:
            if (d / plugin_type).is_file() and os.access(d / plugin_type, os.X_OK):
                return d / plugin_type
        raise AssertionError(f"plugin {plugin_type} not found in {self.cni_path}")

    def invoke(self, plugin: dict[str, Any], command: str, prev: dict[str, Any] | None,
               config: dict[str, Any] | None = None) -> Result:
        if config is None:
            config = {**plugin, "name": self.conflist["name"], "cniVersion": self.conflist["cniVersion"]}
            caps = plugin.get("capabilities") or {}
            chosen = {k: v for k, v in self.runtime_config.items() if caps.get(k)}
            if chosen:
                config["runtimeConfig"] = chosen
            if prev is not None:
                config["prevResult"] = prev
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "CNI_COMMAND": command,
               "CNI_CONTAINERID": self.container_id, "CNI_NETNS": self.netns, "CNI_IFNAME": self.ifname,
               "CNI_ARGS": self.args, "CNI_PATH": ":".join(map(str, self.cni_path))}
        t0 = time.monotonic()
        cp = subprocess.run(ns_cmd(self.ns, [str(self.find(plugin["type"]))]), input=json.dumps(config), env=env,
                            capture_output=True, text=True, timeout=PLUGIN_TIMEOUT + 120)
        result = Result(plugin["type"], cp.returncode, cp.stdout, cp.stderr, command, time.monotonic() - t0)
        self.log.append(result)
        return result

    def timings(self) -> str:
        return ", ".join(f"{r.plugin} {r.command} {r.seconds:.1f}s" for r in self.log)

    def version(self) -> dict[str, list[str]]:
        """libcni's validation: every plugin supports the conflist's version."""
        out = {}
        for plugin in self.conflist["plugins"]:
            r = self.invoke(plugin, "VERSION", None, config={"cniVersion": self.conflist["cniVersion"]})
            assert r.rc == 0, str(r)
            out[plugin["type"]] = r.doc["supportedVersions"]
        return out

    def add(self) -> dict[str, Any]:
        prev = None
        for plugin in self.conflist["plugins"]:
            r = self.invoke(plugin, "ADD", prev)
            if r.rc != 0:
                raise ChainError("ADD", r)
            prev = r.doc
            assert prev["cniVersion"] == self.conflist["cniVersion"], str(r)
        assert prev is not None
        self.cached = prev
        return prev

    def check(self) -> None:
        assert self.cached is not None
        for plugin in self.conflist["plugins"]:
            r = self.invoke(plugin, "CHECK", self.cached)
            if r.rc != 0:
                raise ChainError("CHECK", r)
            assert r.stdout.strip() == "", str(r)

    def delete(self) -> None:
        for plugin in reversed(self.conflist["plugins"]):
            r = self.invoke(plugin, "DEL", self.cached)
            if r.rc != 0:
                raise ChainError("DEL", r)
            assert r.stdout.strip() == "", str(r)
        self.cached = None


# --------------------------------------------------------------------------------------
# the node, the VPC, the agent


def plugin_dir(tmp_path: Path) -> Path:
    """A CNI_PATH directory with ``svcproxy-cni``: the static executable the installer
    puts on nodes (``make cni-plugin``), which forwards each invocation to the agent."""
    d = tmp_path / "cnibin"
    d.mkdir()
    shutil.copy2(static_plugin(), d / "svcproxy-cni")
    return d


@dataclass
class Node:
    lab: Lab
    ns: str
    vpc: str
    tmp: Path
    sock: Path
    cluster: Path
    cni_path: list[Path]

    def eni(self) -> str:
        """A fresh veth pair node<->vpc: the node end is the "ENI" host-device moves."""
        name = f"eni{os.urandom(3).hex()}"
        run(["ip", "link", "add", name, "netns", self.ns, "type", "veth", "peer", "name", name + "p",
             "netns", self.vpc])
        ip_batch(self.vpc, [f"link set {name}p up", f"link set {name}p master br0"])
        return name

    def conflist(self, eni: str, address: str) -> dict[str, Any]:
        """examples/cni/10-eni.conflist with this test's device, address and socket."""
        conflist = json.loads(EXAMPLE.read_text())
        host_device, ours = conflist["plugins"]
        assert (host_device["type"], ours["type"]) == ("host-device", "svcproxy-cni")
        assert ours["selector"] == {"annotation": SELECT, "value": "true"}
        host_device["device"] = eni
        host_device["ipam"]["addresses"] = [{"address": f"{address}/24", "gateway": GATEWAY}]
        host_device["ipam"]["routes"] = [{"dst": "0.0.0.0/0", "gw": GATEWAY}]
        ours.update(socket=str(self.sock), timeout=PLUGIN_TIMEOUT)
        return dict(conflist)

    def pod(self, address: str, *, selected: bool = True) -> tuple[Runtime, str, str]:
        """A sandbox namespace and the runtime for it; returns (runtime, netns name, eni)."""
        pod_ns = self.lab.netns()
        eni = self.eni()
        rt = Runtime(self.ns, self.conflist(eni, address), self.cni_path, container_id=os.urandom(16).hex(),
                     netns=f"/run/netns/{pod_ns}", pod=("shop", pod_ns, os.urandom(8).hex()),
                     annotations={SELECT: "true" if selected else "false", "other": "x"})
        return rt, pod_ns, eni

    def talk(self, req: dict[str, Any]) -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(30)
            s.connect(str(self.sock))
            s.sendall(json.dumps(req).encode() + b"\n")
            return dict(json.loads(s.makefile("rb").readline()))

    def status(self, rt: Runtime) -> Result:
        """STATUS (spec 1.1: the conflist is 1.0.0, so libcni would not call it there)."""
        plugin = rt.conflist["plugins"][-1]
        return rt.invoke(plugin, "STATUS", None, config={**plugin, "name": "eni-net", "cniVersion": "1.1.0"})


@pytest.fixture
def node_env(lab: Lab, tmp_path: Path) -> Node:
    assert (REFERENCE_PLUGINS / "host-device").exists() and (REFERENCE_PLUGINS / "static").exists(), \
        "containernetworking-plugins is not installed (tools/vmtest installs it)"
    node_ns, vpc, backend = lab.netns(), lab.netns(), lab.netns()
    ip_batch(vpc, ["link add br0 type bridge", f"addr add {GATEWAY}/24 dev br0", "link set br0 up"])
    lab.connect(vpc, backend, ["10.0.3.1/24"], [f"{BACKEND_IP}/24"])
    run(["ip", "route", "replace", "default", "via", "10.0.3.1"], ns=backend)
    sysctl(vpc, "net.ipv4.ip_forward", 1)
    lab.server(backend, "backend", port=BACKEND_PORT)
    cluster = write_cluster(tmp_path / "cluster.json", [
        node("node-a"),
        service("web", cluster_ips=(VIP,), ports=[svc_port("http", PORT, target_port=BACKEND_PORT)]),
        endpoint_slice("web", ports=[slice_port("http", BACKEND_PORT)],
                       endpoints=[endpoint(BACKEND_IP, pod="web-0", node="node-b")]),
    ])
    return Node(lab, node_ns, vpc, tmp_path, tmp_path / "run" / "cni.sock", cluster,
                [REFERENCE_PLUGINS, plugin_dir(tmp_path)])


class AgentProc:
    def __init__(self, env: Node) -> None:
        self.env = env
        self.log = env.tmp / "agent.log"
        cmd = [sys.executable, "-m", "svcproxy", "run", "--node-plumbing", "off", "-f", str(env.cluster), "--node", "node-a",
               "--cni-socket", str(env.sock), "--cni-timeout", "60", "--health-bind", HEALTH,
               "--healthcheck-bind-host", "127.0.0.1", "--min-sync-period", "0.2", "--sync-period", "10"]
        with open(self.log, "a") as f:
            f.write(f"===== {' '.join(cmd)}\n")
            self.proc = subprocess.Popen(ns_cmd(env.ns, cmd), stdin=subprocess.DEVNULL, stdout=f,
                                         stderr=subprocess.STDOUT)

    def text(self) -> str:
        return self.log.read_text()

    def wait_ready(self) -> None:
        def ready() -> bool:
            assert self.proc.poll() is None, f"agent exited ({self.proc.returncode}):\n{self.text()}"
            try:
                return self.env.talk({"op": "status"}).get("initialized") is True
            except OSError:
                return False

        wait_until(ready, START_TIMEOUT, "the agent's socket and first sync")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        self.proc.wait(timeout=60)


@pytest.fixture
def agents() -> Iterator[list[AgentProc]]:
    started: list[AgentProc] = []
    yield started
    for a in started:
        a.kill()


def assert_vip_answers(pod_ns: str) -> None:
    r = request(pod_ns, VIP, PORT, timeout=5)
    assert r.text == "backend", r
    assert r.server == BACKEND_IP


# --------------------------------------------------------------------------------------
# tests


def test_chain_add_check_del_with_the_agent(node_env: Node, agents: list[AgentProc]) -> None:
    agent = AgentProc(node_env)
    agents.append(agent)
    agent.wait_ready()

    rt, pod_ns, eni = node_env.pod("10.0.2.10")
    versions = rt.version()
    assert "1.0.0" in versions["host-device"] and "1.0.0" in versions["svcproxy-cni"]
    assert is_static(rt.find("svcproxy-cni"))
    assert node_env.status(rt).rc == 0  # STATUS: the agent is up

    t0 = time.monotonic()
    result = rt.add()
    took = time.monotonic() - t0
    # No sleep: once ADD has returned, the Pod's Services work from inside its namespace.
    assert_vip_answers(pod_ns)
    print(f"CNI ADD (host-device + svcproxy-cni) took {took:.2f}s")
    # svcproxy-cni passed host-device's result through
    host_device = rt.log[-2]
    assert host_device.plugin == "host-device" and result == host_device.doc
    assert result["interfaces"][0]["sandbox"] == f"/run/netns/{pod_ns}"
    assert [ip["address"] for ip in result["ips"]] == ["10.0.2.10/24"]
    assert f"TCP  {VIP}:{PORT} rr" in ipvsadm(pod_ns, "-Ln")
    assert "attached Pod namespace" in agent.text() or "serving network namespace" in agent.text()

    rt.check()  # every plugin with the cached result

    # a Pod that is not selected: passed through, nothing attached, so the ClusterIP
    # does not answer there (the one above answers because of svcproxy)
    other, other_ns, _ = node_env.pod("10.0.2.11", selected=False)
    other_result = other.add()
    assert other_result == other.log[-2].doc
    assert other_result["ips"][0]["address"] == "10.0.2.11/24"
    assert not request(other_ns, VIP, PORT, timeout=2, check=False).ok
    assert node_env.talk({"op": "status", "netns": f"/run/netns/{other_ns}"})["state"] == "absent"
    assert request(other_ns, BACKEND_IP, BACKEND_PORT, timeout=5).text == "backend"  # its NIC works
    other.check()

    assert node_env.talk({"op": "status", "netns": rt.netns}) == {"ok": True, "state": "programmed"}
    rt.delete()
    # the agent let the namespace go, and host-device moved the "ENI" back to the node
    assert node_env.talk({"op": "status", "netns": rt.netns})["state"] == "absent"
    assert node_env.talk({"op": "status"})["attached"] == 0
    run(["ip", "link", "show", eni], ns=node_env.ns)
    # DEL again (the runtime retries teardown): host-device cannot, svcproxy-cni can
    rt.cached = None
    assert rt.invoke(rt.conflist["plugins"][1], "DEL", None).rc == 0
    other.delete()
    print("plugin runs:", rt.timings())


def test_chain_with_the_agent_down_then_up(node_env: Node, agents: list[AgentProc]) -> None:
    rt, pod_ns, eni = node_env.pod("10.0.2.20")
    # STATUS: plugin not available
    status = node_env.status(rt)
    assert status.rc != 0 and status.doc["code"] == 50, str(status)

    with pytest.raises(ChainError) as failed:
        rt.add()
    err = failed.value.error
    assert failed.value.result.plugin == "svcproxy-cni"
    assert err["code"] == 11, err
    assert "svcproxy agent unavailable" in err["msg"] and str(node_env.sock) in err["msg"], err
    assert err["cniVersion"] == "1.0.0"
    # libcni then tears the sandbox's network down: DEL without a cached result
    rt.delete()
    run(["ip", "link", "show", eni], ns=node_env.ns)  # back on the node

    agent = AgentProc(node_env)
    agents.append(agent)
    agent.wait_ready()
    assert node_env.status(rt).rc == 0  # STATUS: up

    rt.add()  # the kubelet's retry
    assert_vip_answers(pod_ns)
    rt.check()

    agent.kill()  # crashes: its socket is left behind, refusing connections
    status = node_env.status(rt)
    assert status.doc["code"] == 50 and "refuses connections" in status.doc["msg"], str(status)
    with pytest.raises(ChainError) as failed:  # CHECK cannot confirm: try again later
        rt.check()
    assert failed.value.error["code"] == 11
    rt.delete()  # DEL with the agent down succeeds
    assert "will forget the namespace" in rt.log[-2].stderr
    print("plugin runs:", rt.timings())
