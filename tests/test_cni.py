"""``svcproxy-cni`` driven exactly as a container runtime drives a CNI plugin, against a
real ``svcproxy.podns.server.CniServer`` on a temporary socket.

The plugin runs as an executable: CNI_* variables in its environment, the network
configuration (with ``prevResult`` and ``runtimeConfig``) on stdin, the result or a
CNI error on stdout, logs on stderr, the exit status. The server's attacher is a fake
(namespaces "programmed" after a chosen delay, or never) except in the tests that put
a real ``Proxier`` behind it. Namespaces are real: ``/proc/PID/ns/net`` files.
"""

from __future__ import annotations

import configparser
import io
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from cni_build import is_static, static_plugin
from k8s_objects import endpoint, endpoint_slice, service, slice_port, svc_port
from svcproxy.ipvs.backend import MemoryBackend
from svcproxy.kube.store import Kind
from svcproxy.kube.translate import NodeInfo, TranslateConfig
from svcproxy.model import Protocol, ServiceKey
from svcproxy.podns import server as server_mod
from svcproxy.podns.cni import SUPPORTED_VERSIONS
from svcproxy.podns.attach import PodNamespaces
from svcproxy.podns.mode import Mode, ModeDecision
from svcproxy.podns.server import (
    ABSENT,
    PENDING,
    PROGRAMMED,
    WAITING_FIRST_SYNC,
    CniServer,
    NamespacesAttacher,
    PodInfo,
    ServerError,
)
from svcproxy.reconcile import Proxier, ProxierConfig, Target

# Pods here are namespaces of this process (see conftest.own_netns_as_pod).
pytestmark = pytest.mark.usefixtures("own_netns_as_pod")

REPO = Path(__file__).resolve().parents[1]
CNI_PY = REPO / "svcproxy" / "podns" / "cni.py"
NETNS = f"/proc/{os.getpid()}/ns/net"  # a real network namespace file (ours)
NETNS2 = f"/proc/{os.getpid()}/task/{threading.get_native_id()}/ns/net"  # the same namespace, another path
CONTAINER = "5f0c6a1b9e2d4c7f8a3b1e0d9c8b7a6f"
K8S_ARGS = ("K8S_POD_UID=2b8f1c3e-7d6a-4e5f-9a0b-1c2d3e4f5a6b;IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;"
            f"K8S_POD_NAME=cart-7d9f;K8S_POD_INFRA_CONTAINER_ID={CONTAINER}")
ANNOTATIONS = {"svcproxy.io/share-ns": "true", "kubernetes.io/psp": "restricted"}
PREV_RESULT = {
    "cniVersion": "1.0.0",
    "interfaces": [{"name": "eth0", "mac": "02:42:0a:00:02:0a", "sandbox": NETNS}],
    "ips": [{"interface": 0, "address": "10.0.2.10/24", "gateway": "10.0.2.1"}],
    "routes": [{"dst": "0.0.0.0/0", "gw": "10.0.2.1"}],
    "dns": {},
}
PREV_RESULT_040 = {
    "cniVersion": "0.4.0",
    "interfaces": [{"name": "eth0", "mac": "02:42:0a:00:02:0a", "sandbox": NETNS}],
    "ips": [{"version": "4", "interface": 0, "address": "10.0.2.10/24", "gateway": "10.0.2.1"}],
    "routes": [{"dst": "0.0.0.0/0", "gw": "10.0.2.1"}],
    "dns": {},
}
VIP = "10.96.0.10"


# --------------------------------------------------------------------------------------
# the plugin, as a runtime runs it


def write_plugin(directory: Path) -> Path:
    """An executable ``svcproxy-cni`` that runs svcproxy/podns/cni.py's ``main`` the way
    the console script does, but with ``-I -S`` and the module loaded from its file:
    no site-packages and no package ``__init__``, so this also shows the plugin needs
    nothing but the standard library (what the package imports on the way is
    test_the_plugin_imports_nothing_heavy's business)."""
    directory.mkdir(parents=True, exist_ok=True)
    exe = directory / "svcproxy-cni"
    exe.write_text(f"#!{sys.executable} -IS\nimport importlib.util\n"
                   f"spec = importlib.util.spec_from_file_location('svcproxy_cni', {str(CNI_PY)!r})\n"
                   "module = importlib.util.module_from_spec(spec)\nspec.loader.exec_module(module)\n"
                   "module.main()\n")
    exe.chmod(0o755)
    return exe


@pytest.fixture(scope="module", params=["python", "static"])
def plugin(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Both plugins: the Python one, and the static executable (cni/svcproxy-cni.c)
    that forwards the whole invocation to the agent, which runs the same logic."""
    if request.param == "static":
        d = tmp_path_factory.mktemp("cnistatic")
        shutil.copy2(static_plugin(), d / "svcproxy-cni")
        return d / "svcproxy-cni"
    return write_plugin(tmp_path_factory.mktemp("cnibin"))


@dataclass
class Out:
    rc: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def doc(self) -> Any:
        return json.loads(self.stdout)

    def error(self, code: int) -> dict[str, Any]:
        """Assert this is a CNI error with ``code``; return it."""
        assert self.rc != 0, f"expected error {code}, got success: {self.stdout!r}"
        doc = self.doc
        assert doc["code"] == code, doc
        assert set(doc) <= {"cniVersion", "code", "msg", "details"} and doc["msg"], doc
        return dict(doc)


def conf(sock: Path | str, version: str = "1.0.0", prev: dict[str, Any] | None = PREV_RESULT,
         annotations: dict[str, str] | None = ANNOTATIONS, **extra: Any) -> dict[str, Any]:
    """The plugin's config as libcni builds it from the conflist."""
    doc: dict[str, Any] = {"cniVersion": version, "name": "eni-net", "type": "svcproxy-cni", "socket": str(sock),
                           "capabilities": {"io.kubernetes.cri.pod-annotations": True}}
    if annotations is not None:
        doc["runtimeConfig"] = {"io.kubernetes.cri.pod-annotations": annotations}
    if prev is not None:
        doc["prevResult"] = {**prev, "cniVersion": version}
    doc.update(extra)
    return doc


def cni(exe: Path, command: str, config: dict[str, Any] | str | None, *, netns: str = NETNS,
        container: str = CONTAINER, ifname: str = "eth0", args: str = K8S_ARGS,
        env: dict[str, str | None] | None = None, timeout: float = 30) -> Out:
    base: dict[str, str | None] = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "CNI_COMMAND": command, "CNI_CONTAINERID": container,
        "CNI_NETNS": netns, "CNI_IFNAME": ifname, "CNI_ARGS": args, "CNI_PATH": f"/opt/cni/bin:{exe.parent}",
        **(env or {}),
    }
    full = {k: v for k, v in base.items() if v is not None}
    stdin = config if isinstance(config, str) else json.dumps(config) if config is not None else ""
    t0 = time.monotonic()
    cp = subprocess.run([str(exe)], input=stdin, env=full, capture_output=True, text=True, timeout=timeout)
    return Out(cp.returncode, cp.stdout, cp.stderr, time.monotonic() - t0)


# --------------------------------------------------------------------------------------
# the agent side: a real server, a fake attacher


class FakeAttacher:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: list[tuple[str, str]] = []
        self.pods: list[PodInfo] = []
        self.events: dict[str, threading.Event] = {}
        self.program_after: float | None = 0.0  # None: never programmed
        self.is_initialized = True
        self.fail: str | None = None

    def resolve(self, netns: str) -> str:
        return netns

    def attach(self, netns: str, pod: PodInfo) -> bool:
        with self.lock:
            self.calls.append(("attach", netns))
            self.pods.append(pod)
            if self.fail:
                raise RuntimeError(self.fail)
            if netns in self.events:
                return True
            ev = self.events[netns] = threading.Event()
        if self.program_after is not None:
            threading.Timer(self.program_after, ev.set).start()
        return True

    def wait(self, netns: str, timeout: float) -> bool:
        ev = self.events.get(netns)
        return ev is not None and ev.wait(timeout)

    def detach(self, netns: str) -> bool:
        with self.lock:
            self.calls.append(("detach", netns))
            return self.events.pop(netns, None) is not None

    def state(self, netns: str) -> str:
        ev = self.events.get(netns)
        if ev is None:
            return ABSENT
        if ev.is_set():
            return PROGRAMMED
        return PENDING if self.is_initialized else WAITING_FIRST_SYNC

    def initialized(self) -> bool:
        return self.is_initialized

    def attached(self) -> list[str]:
        return sorted(self.events)

    def ops(self, op: str) -> list[str]:
        return [ns for o, ns in self.calls if o == op]


@pytest.fixture
def rundir() -> Iterator[Path]:
    # Short: unix socket paths are limited to 107 bytes.
    d = Path(tempfile.mkdtemp(prefix="svcproxy-cni-", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@dataclass
class Agent:
    server: CniServer
    attacher: Any
    sock: Path


@pytest.fixture
def agent(rundir: Path) -> Iterator[Agent]:
    attacher = FakeAttacher()
    sock = rundir / "run" / "cni.sock"
    server = CniServer(str(sock), attacher, timeout=10)
    server.start()
    try:
        yield Agent(server, attacher, sock)
    finally:
        server.stop()


def talk(sock: Path, *requests: Any, raw: bytes | None = None) -> list[dict[str, Any]]:
    """Send requests on one connection; one answer per request."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(sock))
        f = s.makefile("rb")
        answers = []
        if raw is not None:
            s.sendall(raw)
            answers.append(json.loads(f.readline()))
        for r in requests:
            s.sendall(json.dumps(r).encode() + b"\n")
            answers.append(json.loads(f.readline()))
        return answers


# --------------------------------------------------------------------------------------
# VERSION and the inputs every command checks


def test_version(plugin: Path) -> None:
    out = cni(plugin, "VERSION", {"cniVersion": "1.0.0"}, netns="", container="", ifname="")
    assert out.rc == 0, out
    assert out.doc == {"cniVersion": "1.0.0", "supportedVersions": list(SUPPORTED_VERSIONS)}
    assert {"0.4.0", "1.0.0", "1.1.0"} <= set(out.doc["supportedVersions"])
    # no input (or an unknown version): the plugin's own newest
    assert cni(plugin, "VERSION", None).doc["cniVersion"] == "1.1.0"
    assert cni(plugin, "VERSION", {"cniVersion": "9.9.9"}).doc["cniVersion"] == "1.1.0"


@pytest.mark.parametrize("command,missing,env", [
    ("", "CNI_COMMAND", {"CNI_COMMAND": None}),
    ("ADD", "CNI_NETNS", {"CNI_NETNS": ""}),
    ("ADD", "CNI_PATH", {"CNI_PATH": None}),
    ("CHECK", "CNI_CONTAINERID", {"CNI_CONTAINERID": None}),
    ("DEL", "CNI_IFNAME", {"CNI_IFNAME": ""}),
])
def test_missing_environment_is_error_4(plugin: Path, agent: Agent, command: str, missing: str,
                                        env: dict[str, str | None]) -> None:
    err = cni(plugin, command, conf(agent.sock), env=env).error(4)
    assert missing in err["msg"]
    assert agent.attacher.calls == []


@pytest.mark.parametrize("kw,needle", [
    ({"container": "bad/id"}, "containerID"),
    ({"ifname": "a-very-long-ifname0"}, "too long"),
    ({"ifname": "eth:0"}, "interface name"),
    ({"netns": "var/run/netns/x"}, "absolute"),
])
def test_invalid_environment_is_error_4(plugin: Path, agent: Agent, kw: dict[str, Any], needle: str) -> None:
    err = cni(plugin, "ADD", conf(agent.sock), **kw).error(4)
    assert needle in err["msg"] + err.get("details", "")
    assert agent.attacher.calls == []


def test_unknown_command_is_error_4(plugin: Path, agent: Agent) -> None:
    assert "FROB" in cni(plugin, "FROB", conf(agent.sock)).error(4)["msg"]


def test_bad_configuration(plugin: Path, agent: Agent) -> None:
    assert cni(plugin, "ADD", "{not json").error(6)["cniVersion"] == "1.1.0"
    assert cni(plugin, "ADD", "[1, 2]").error(6)
    err = cni(plugin, "ADD", conf(agent.sock, version="2.0.0")).error(1)
    assert err["cniVersion"] == "1.1.0" and "1.0.0" in err["details"]
    err = cni(plugin, "ADD", conf(agent.sock, version="0.4.0", timeout="soon")).error(7)
    assert "timeout" in err["msg"] and err["cniVersion"] == "0.4.0"  # errors carry the config's version
    assert cni(plugin, "ADD", conf(agent.sock, socket="run/cni.sock")).error(7)
    assert "selector" in cni(plugin, "ADD", conf(agent.sock, selector="some")).error(7)["msg"]
    assert cni(plugin, "ADD", conf(agent.sock, selector={"label": "x"})).error(7)
    assert cni(plugin, "ADD", {**conf(agent.sock), "name": ""}).error(7)
    assert agent.attacher.calls == []


# --------------------------------------------------------------------------------------
# ADD


def test_add_attaches_waits_until_programmed_and_passes_the_result_through(plugin: Path, agent: Agent) -> None:
    agent.attacher.program_after = 0.6
    out = cni(plugin, "ADD", conf(agent.sock))
    assert out.rc == 0, out
    assert out.doc == PREV_RESULT  # unchanged, cniVersion the config's
    assert list(out.doc)[0] == "cniVersion"
    assert out.seconds >= 0.6  # it waited for the table ...
    assert agent.attacher.state(NETNS) == PROGRAMMED  # ... which was programmed when ADD returned
    assert agent.attacher.calls == [("attach", NETNS)]
    assert agent.attacher.pods == [PodInfo("shop", "cart-7d9f", "2b8f1c3e-7d6a-4e5f-9a0b-1c2d3e4f5a6b", ANNOTATIONS)]
    assert out.stderr == ""


@pytest.mark.parametrize("version,prev", [("0.4.0", PREV_RESULT_040), ("0.3.1", PREV_RESULT_040),
                                          ("1.1.0", PREV_RESULT)])
def test_add_keeps_the_configs_version(plugin: Path, agent: Agent, version: str, prev: dict[str, Any]) -> None:
    out = cni(plugin, "ADD", conf(agent.sock, version=version, prev=prev))
    assert out.rc == 0, out
    assert out.doc == {**prev, "cniVersion": version}


def test_add_is_idempotent(plugin: Path, agent: Agent) -> None:
    for _ in range(2):
        out = cni(plugin, "ADD", conf(agent.sock))
        assert out.rc == 0, out
    assert agent.attacher.ops("attach") == [NETNS, NETNS]
    assert agent.attacher.attached() == [NETNS]


def test_add_without_prev_result_must_be_chained(plugin: Path, agent: Agent) -> None:
    err = cni(plugin, "ADD", conf(agent.sock, prev=None)).error(7)
    assert err["msg"] == "must be called as chained plugin"
    assert agent.attacher.calls == []


def test_selector_by_annotation(plugin: Path, agent: Agent) -> None:
    selector = {"annotation": "svcproxy.io/share-ns", "value": "true"}
    # not selected: passed through untouched, the agent never asked
    for annotations in ({}, {"svcproxy.io/share-ns": "false"}):
        out = cni(plugin, "ADD", conf(agent.sock, annotations=annotations, selector=selector))
        assert out.rc == 0 and out.doc == PREV_RESULT, out
    out = cni(plugin, "ADD", conf("/nonexistent/cni.sock", annotations={}, selector=selector))
    if is_static(plugin):  # the selector is the agent's to apply: no agent, no ADD
        assert out.error(11)
    else:
        assert out.rc == 0 and out.doc == PREV_RESULT, out
    assert cni(plugin, "CHECK", conf(agent.sock, annotations={}, selector=selector)).rc == 0
    assert agent.attacher.calls == []
    # selected
    out = cni(plugin, "ADD", conf(agent.sock, selector=selector))
    assert out.rc == 0 and out.doc == PREV_RESULT, out
    assert agent.attacher.ops("attach") == [NETNS]
    # presence only (no value)
    out = cni(plugin, "ADD", conf(agent.sock, annotations={"svcproxy.io/share-ns": "yes"}, selector={
        "annotation": "svcproxy.io/share-ns"}), netns=NETNS2)
    assert out.rc == 0 and agent.attacher.ops("attach") == [NETNS, NETNS2]
    # an annotation selector without the capability is a configuration error, not a silent skip
    err = cni(plugin, "ADD", conf(agent.sock, annotations=None, selector=selector)).error(7)
    assert "io.kubernetes.cri.pod-annotations" in err["details"]


def test_add_with_the_agent_down_is_try_again_later(plugin: Path, rundir: Path) -> None:
    err = cni(plugin, "ADD", conf(rundir / "cni.sock")).error(11)
    assert "svcproxy agent unavailable" in err["msg"] and str(rundir / "cni.sock") in err["msg"]
    assert "cart-7d9f" in err["details"]
    assert err["cniVersion"] == "1.0.0"
    # a stale socket nobody listens on
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(rundir / "stale.sock"))
    err = cni(plugin, "ADD", conf(rundir / "stale.sock")).error(11)
    assert "refuses connections" in err["msg"]


def test_add_when_the_agent_hangs_is_try_again_later(plugin: Path, rundir: Path) -> None:
    with socket.socket(socket.AF_UNIX) as s:  # accepts, never answers
        s.bind(str(rundir / "hung.sock"))
        s.listen(1)
        out = cni(plugin, "ADD", conf(rundir / "hung.sock", timeout=0.5))
    err = out.error(11)
    assert "did not answer within 0.5s" in err["msg"]
    assert 0.45 < out.seconds < 5


def test_add_times_out_when_the_table_is_never_programmed(plugin: Path, agent: Agent) -> None:
    agent.attacher.program_after = None
    out = cni(plugin, "ADD", conf(agent.sock, timeout=1.0))
    err = out.error(11)
    # the agent's own reason, a little before the plugin would give up
    assert "timed out after 0.5s" in err["msg"] and "not programmed yet" in err["msg"], err
    assert out.seconds < 2.0
    agent.attacher.is_initialized = False
    err = cni(plugin, "ADD", conf(agent.sock, timeout=0.5)).error(11)
    assert "waiting for the first sync" in err["msg"]


def test_add_when_the_agent_cannot_attach(plugin: Path, agent: Agent) -> None:
    agent.attacher.fail = "IPVS module not loaded"
    err = cni(plugin, "ADD", conf(agent.sock)).error(100)
    assert "IPVS module not loaded" in err["msg"]


def test_add_refuses_what_is_not_a_network_namespace(plugin: Path, agent: Agent, rundir: Path) -> None:
    fake = rundir / "not-a-netns"
    fake.write_text("")
    assert "not a network namespace" in cni(plugin, "ADD", conf(agent.sock), netns=str(fake)).error(4)["msg"]
    assert "does not exist" in cni(plugin, "ADD", conf(agent.sock), netns=str(rundir / "gone")).error(3)["msg"]
    # a namespace, but not a network one
    mnt = f"/proc/{os.getpid()}/ns/mnt"
    assert "not a network namespace" in cni(plugin, "ADD", conf(agent.sock), netns=mnt).error(4)["msg"]
    assert agent.attacher.calls == []


# --------------------------------------------------------------------------------------
# DEL, CHECK, STATUS, GC


def test_del_detaches_and_always_succeeds(plugin: Path, agent: Agent) -> None:
    assert cni(plugin, "ADD", conf(agent.sock)).rc == 0
    out = cni(plugin, "DEL", conf(agent.sock))
    assert (out.rc, out.stdout) == (0, ""), out
    assert agent.attacher.ops("detach") == [NETNS] and agent.attacher.attached() == []
    # repeated, without prevResult, without the capability: still fine
    out = cni(plugin, "DEL", conf(agent.sock, prev=None, annotations=None))
    assert (out.rc, out.stdout) == (0, ""), out
    # the namespace already gone
    out = cni(plugin, "DEL", conf(agent.sock, prev=None), netns="/run/netns/cni-0d1e2f-gone")
    assert (out.rc, out.stdout) == (0, ""), out
    assert agent.attacher.ops("detach")[-1] == "/run/netns/cni-0d1e2f-gone"


def test_del_with_an_empty_netns_finds_the_namespace_by_container(plugin: Path, agent: Agent) -> None:
    assert cni(plugin, "ADD", conf(agent.sock)).rc == 0
    out = cni(plugin, "DEL", conf(agent.sock, prev=None), netns="")
    assert (out.rc, out.stdout) == (0, ""), out
    assert agent.attacher.ops("detach") == [NETNS]
    # unknown container, no netns: nothing to do, no error
    assert cni(plugin, "DEL", conf(agent.sock), netns="", container="other").rc == 0
    assert agent.attacher.ops("detach") == [NETNS]


def test_del_keeps_a_namespace_another_interface_still_uses(plugin: Path, agent: Agent) -> None:
    assert cni(plugin, "ADD", conf(agent.sock), ifname="eth0").rc == 0
    assert cni(plugin, "ADD", conf(agent.sock), ifname="net1").rc == 0  # a second network (Multus)
    assert cni(plugin, "DEL", conf(agent.sock), ifname="net1").rc == 0
    assert agent.attacher.attached() == [NETNS]
    assert cni(plugin, "DEL", conf(agent.sock), ifname="eth0").rc == 0
    assert agent.attacher.attached() == []


def test_del_with_the_agent_down_succeeds(plugin: Path, rundir: Path) -> None:
    out = cni(plugin, "DEL", conf(rundir / "cni.sock", prev=None))
    assert (out.rc, out.stdout) == (0, ""), out
    assert "will forget the namespace" in out.stderr


def test_check(plugin: Path, agent: Agent, rundir: Path) -> None:
    err = cni(plugin, "CHECK", conf(agent.sock)).error(101)
    assert "not attached" in err["msg"]
    agent.attacher.program_after = None
    cni(plugin, "ADD", conf(agent.sock, timeout=0.5)).error(11)  # attached, never programmed
    assert "not programmed yet" in cni(plugin, "CHECK", conf(agent.sock)).error(101)["msg"]
    agent.attacher.events[NETNS].set()
    out = cni(plugin, "CHECK", conf(agent.sock))
    assert (out.rc, out.stdout) == (0, ""), out
    assert cni(plugin, "CHECK", conf(agent.sock, prev=None)).error(7)["msg"] == "must be called as chained plugin"
    assert cni(plugin, "CHECK", conf(agent.sock, version="0.3.1")).error(1)
    assert cni(plugin, "CHECK", conf(rundir / "cni.sock")).error(11)


def test_status(plugin: Path, agent: Agent, rundir: Path) -> None:
    out = cni(plugin, "STATUS", conf(agent.sock, version="1.1.0", prev=None), netns="", container="", ifname="")
    assert (out.rc, out.stdout) == (0, ""), out
    err = cni(plugin, "STATUS", conf(rundir / "cni.sock", version="1.1.0", prev=None)).error(50)
    assert "agent unreachable" in err["msg"]
    assert cni(plugin, "STATUS", conf(agent.sock, version="1.0.0", prev=None)).error(1)
    agent.attacher.is_initialized = False
    out = cni(plugin, "STATUS", conf(agent.sock, version="1.1.0", prev=None))
    assert out.rc == 0 and "first sync" in out.stderr, out


def test_gc_succeeds_and_detaches_nothing(plugin: Path, agent: Agent) -> None:
    assert cni(plugin, "ADD", conf(agent.sock)).rc == 0
    config = {**conf(agent.sock, version="1.1.0", prev=None),
              "cni.dev/valid-attachments": [{"containerID": "other", "ifname": "eth0"}]}
    out = cni(plugin, "GC", config, netns="", container="", ifname="")
    assert (out.rc, out.stdout) == (0, ""), out
    assert agent.attacher.attached() == [NETNS]
    assert cni(plugin, "GC", conf(agent.sock, prev=None)).error(1)  # 1.0.0 has no GC


# --------------------------------------------------------------------------------------
# the server itself


def test_socket_and_directory_are_root_only(agent: Agent) -> None:
    assert stat.S_IMODE(os.stat(agent.sock).st_mode) == 0o600
    assert stat.S_ISSOCK(os.stat(agent.sock).st_mode)
    assert stat.S_IMODE(os.stat(agent.sock.parent).st_mode) == 0o700
    agent.server.stop()
    assert not agent.sock.exists()


def test_other_users_are_refused(agent: Agent, monkeypatch: pytest.MonkeyPatch) -> None:
    if os.geteuid() == 0:  # a real other user cannot even reach the socket (directory 0700)
        pid = os.fork()
        if pid == 0:  # pragma: no cover (child)
            code = 1
            try:
                os.setgid(65534)
                os.setuid(65534)
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(str(agent.sock))
            except PermissionError:
                code = 0
            finally:
                os._exit(code)
        assert os.waitpid(pid, 0)[1] == 0
    # and one that gets through (say, the directory was loosened) is told no
    monkeypatch.setattr(server_mod, "_peer_uid", lambda sock: 4242)
    (answer,) = talk(agent.sock, {"op": "status"})
    assert answer == {"ok": False, "error": "permission denied", "code": 4}


def test_protocol(agent: Agent) -> None:
    a = talk(agent.sock, {"op": "status"}, {"op": "frob"}, {"op": "attach"}, {"op": "attach", "netns": "x"},
             {"op": "attach", "netns": NETNS, "pod": {"annotations": {"a": 1}}},
             {"op": "attach", "netns": NETNS, "timeout": "1"},
             {"op": "attach", "netns": NETNS, "containerId": "c1", "ifname": "eth0"},
             {"op": "status", "netns": NETNS}, {"op": "detach", "netns": NETNS, "containerId": "c1", "ifname": "eth0"},
             {"op": "detach", "netns": NETNS}, raw=b"not json\n")
    assert a[0] == {"ok": False, "error": "request is not JSON", "code": 4}
    assert a[1] == {"ok": True, "initialized": True, "attached": 0}
    assert "unknown op" in a[2]["error"]
    assert a[3]["error"] == "netns is required"
    assert "absolute path" in a[4]["error"]
    assert "annotations" in a[5]["error"]
    assert "timeout" in a[6]["error"]
    assert a[7]["ok"] is True and a[7]["elapsed"] >= 0
    assert a[8] == {"ok": True, "state": PROGRAMMED}
    assert a[9] == {"ok": True, "detached": True}
    assert a[10] == {"ok": True, "detached": False}  # not attached: not an error
    (too_long,) = talk(agent.sock, raw=b"x" * (1 << 20) + b"\n")
    assert too_long["ok"] is False and "too long" in too_long["error"]


def test_stale_socket_is_replaced_and_a_live_one_refused(rundir: Path) -> None:
    sock = rundir / "cni.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(sock))  # left behind by a killed agent
    with CniServer(str(sock), FakeAttacher()):
        assert talk(sock, {"op": "status"})[0]["ok"] is True
        with pytest.raises(ServerError, match="another process already serves"):
            CniServer(str(sock), FakeAttacher()).start()
        assert talk(sock, {"op": "status"})[0]["ok"] is True  # and the first one still serves
    (rundir / "file").write_text("")
    with pytest.raises(ServerError, match="not a socket"):
        CniServer(str(rundir / "file"), FakeAttacher()).start()


def test_directory_permissions(rundir: Path) -> None:
    shared = rundir / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    (shared / "other.pid").write_text("1")
    with pytest.raises(ServerError, match="directory of its own"):
        CniServer(str(shared / "cni.sock"), FakeAttacher()).start()
    assert stat.S_IMODE(shared.stat().st_mode) == 0o755  # a shared directory is never tightened
    own = rundir / "own"
    own.mkdir()
    own.chmod(0o755)  # e.g. a hostPath DirectoryOrCreate
    with CniServer(str(own / "cni.sock"), FakeAttacher()):
        assert stat.S_IMODE(own.stat().st_mode) == 0o700


# --------------------------------------------------------------------------------------
# a real Proxier behind the server


@pytest.fixture
def proxier() -> Iterator[Proxier]:
    p = Proxier(MemoryBackend(), ProxierConfig(translate=TranslateConfig(node=NodeInfo("node-a", ("192.168.0.10",))),
                                               min_sync_period=0.05, sync_period=60))
    stop = threading.Event()
    thread = threading.Thread(target=p.run, args=(stop,), daemon=True)
    thread.start()
    yield p
    stop.set()
    p.request_sync()
    thread.join(10)


def decision(mode: Mode) -> ModeDecision:
    return ModeDecision(mode, mode, "test")


def feed(proxier: Proxier, synced: bool = True) -> None:
    proxier.on_event(Kind.SERVICE, "ADDED", service("web", cluster_ips=(VIP,),
                                                    ports=[svc_port("http", 80, target_port=8080)]))
    proxier.on_event(Kind.ENDPOINT_SLICE, "ADDED", endpoint_slice("web", ports=[slice_port("http", 8080)],
                                                                   endpoints=[endpoint("10.0.3.2")]))
    if synced:
        proxier.on_synced(Kind.SERVICE)
        proxier.on_synced(Kind.ENDPOINT_SLICE)


def test_add_returns_once_the_proxiers_table_is_programmed(plugin: Path, proxier: Proxier, rundir: Path) -> None:
    tables: dict[str, MemoryBackend] = {}

    def make_target(path: str) -> Target:
        tables[path] = MemoryBackend()
        return Target(path, tables[path])

    sock = rundir / "cni.sock"
    key = ServiceKey(Protocol.TCP, VIP, 80)
    namespaces = PodNamespaces(proxier, decision(Mode.REPLICATE), make_target=make_target)
    with CniServer(str(sock), NamespacesAttacher(namespaces), timeout=10):
        feed(proxier, synced=False)
        # before the first sync: status says so, ADD waits and then asks to try again
        (status,) = talk(sock, {"op": "status"})
        assert status == {"ok": True, "initialized": False, "attached": 0, "message": "waiting for the first sync"}
        err = cni(plugin, "ADD", conf(sock, timeout=0.5)).error(11)
        assert "waiting for the first sync" in err["msg"]
        assert "waiting for the first sync" in cni(plugin, "CHECK", conf(sock)).error(101)["msg"]

        proxier.on_synced(Kind.SERVICE)
        proxier.on_synced(Kind.ENDPOINT_SLICE)
        out = cni(plugin, "ADD", conf(sock))
        assert out.rc == 0, out
        vs = tables[NETNS].read().services[key]  # programmed by the time ADD returned
        assert [d.address for d in vs.destinations] == ["10.0.3.2"]
        assert proxier.pod_targets == [NETNS]
        first = tables[NETNS]
        assert cni(plugin, "ADD", conf(sock)).rc == 0  # idempotent: same target, not replaced
        # the same namespace under another path (same nsfs inode) is the same target
        assert cni(plugin, "ADD", conf(sock), netns=NETNS2, ifname="net1").rc == 0
        assert tables[NETNS] is first and proxier.pod_targets == [NETNS] and list(tables) == [NETNS]
        assert cni(plugin, "CHECK", conf(sock), netns=NETNS2).rc == 0
        assert talk(sock, {"op": "status"})[0] == {"ok": True, "initialized": True, "attached": 1}

        assert cni(plugin, "DEL", conf(sock)).rc == 0
        assert proxier.pod_targets == [NETNS]  # net1 still uses it
        assert cni(plugin, "DEL", conf(sock), netns=NETNS2, ifname="net1").rc == 0
        assert proxier.pod_targets == []
        assert cni(plugin, "CHECK", conf(sock)).error(101)


def test_kernel_mode_waits_for_the_node_table_and_off_mode_passes(plugin: Path, proxier: Proxier,
                                                                 rundir: Path) -> None:
    def make_target(path: str) -> Target:
        raise AssertionError("no Pod targets in kernel or off mode")

    sock = rundir / "cni.sock"
    with CniServer(str(sock), NamespacesAttacher(PodNamespaces(proxier, decision(Mode.KERNEL),
                                                               make_target=make_target)), timeout=10):
        feed(proxier, synced=False)
        assert "first sync" in cni(plugin, "ADD", conf(sock, timeout=0.5)).error(11)["msg"]
        feed(proxier)
        assert cni(plugin, "ADD", conf(sock)).rc == 0  # once the node's table is programmed
        assert proxier.node_target.synced.is_set() and proxier.pod_targets == []
        assert cni(plugin, "CHECK", conf(sock)).rc == 0
    with CniServer(str(sock), NamespacesAttacher(PodNamespaces(proxier, decision(Mode.OFF),
                                                               make_target=make_target)), timeout=10):
        (answer,) = talk(sock, {"op": "attach", "netns": NETNS})
        assert answer["ok"] is True and answer["served"] is False and "off" in answer["message"]
        assert cni(plugin, "ADD", conf(sock)).rc == 0
        assert cni(plugin, "CHECK", conf(sock)).rc == 0
        assert cni(plugin, "DEL", conf(sock)).rc == 0


def test_agent_serves_the_socket(rundir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``svcproxy run``'s wiring: the agent serves the socket from start to stop, with
    the Pod target factory (podns.attach.pod_target) replaced by an in-memory one."""
    from svcproxy.agent import Agent as NodeAgent, AgentConfig
    from svcproxy.podns import attach as attach_mod

    made: list[str] = []

    def pod_target(path: str, *args: Any, **kw: Any) -> Target:
        made.append(path)
        return Target(path, MemoryBackend())

    monkeypatch.setattr(attach_mod, "pod_target", pod_target)
    cluster = tmp_path / "cluster.json"
    cluster.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": [
        service("web", cluster_ips=(VIP,), ports=[svc_port("http", 80, target_port=8080)]),
        endpoint_slice("web", ports=[slice_port("http", 8080)], endpoints=[endpoint("10.0.3.2")])]}))
    sock = rundir / "agent" / "cni.sock"
    node_agent = NodeAgent(AgentConfig(node_name="node-a", file=str(cluster), health_bind="127.0.0.1:0",
                                       healthcheck_bind_host="127.0.0.1", min_sync_period=0.05, sync_period=1.0,
                                       cni_socket=str(sock), cni_timeout=5), MemoryBackend())
    thread = threading.Thread(target=node_agent.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        out = cni(write_plugin(tmp_path / "bin"), "ADD", conf(sock))
        assert out.rc == 0, out
        assert made == [NETNS]
    finally:
        node_agent.stop.set()
        node_agent.proxier.request_sync()
        thread.join(10)
    assert not thread.is_alive()
    assert not sock.exists()  # removed on the way out


def test_cli_wires_the_socket_options() -> None:
    from svcproxy.cli import build_parser

    args = build_parser().parse_args(["run", "--cni-socket", "/tmp/x.sock", "--cni-timeout", "12"])
    assert (args.cni_socket, args.cni_timeout) == ("/tmp/x.sock", 12.0)
    args = build_parser().parse_args(["run"])
    assert (args.cni_socket, args.cni_timeout) == (None, 30.0)  # None: the default socket, not required


# --------------------------------------------------------------------------------------
# packaging: the entry point, and a fast start


def test_console_script_entry_point() -> None:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    scripts = dict(line.split("=", 1) for line in cfg["options.entry_points"]["console_scripts"].strip().splitlines())
    assert scripts["svcproxy-cni "].strip() == "svcproxy.podns.cni:main"


def test_the_plugin_imports_nothing_heavy() -> None:
    code = ("import sys, svcproxy.podns.cni; "
            "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('svcproxy', 'kubernetes', 'prometheus_client', 'yaml', 'pyroute2', 'tenacity', 'urllib3'))))")
    cp = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    heavy = [m for m in cp.stdout.split() if m not in ("svcproxy", "svcproxy.podns", "svcproxy.podns.cni")]
    # The runtime starts the plugin for every Pod: `import svcproxy.podns.cni` (what the
    # console script does) runs svcproxy/__init__.py and svcproxy/podns/__init__.py
    # first, so they must not import the agent (make their exports lazy, PEP 562).
    assert not heavy, f"importing the plugin also imports {len(heavy)} other modules: {heavy[:8]}"


def test_example_conflist(plugin: Path, agent: Agent) -> None:
    """examples/cni/10-eni.conflist: valid for libcni (a supported version, names) and
    its svcproxy-cni entry works as it stands, except for the socket path."""
    conflist = json.loads((REPO / "examples" / "cni" / "10-eni.conflist").read_text())
    assert conflist["cniVersion"] == "1.0.0"  # Debian's reference plugins speak up to 1.0.0
    first, ours = conflist["plugins"]
    assert first["type"] == "host-device" and ours["type"] == "svcproxy-cni"
    config = {**ours, "name": conflist["name"], "cniVersion": conflist["cniVersion"], "socket": str(agent.sock),
              "runtimeConfig": {"io.kubernetes.cri.pod-annotations": ANNOTATIONS}, "prevResult": PREV_RESULT}
    out = cni(plugin, "ADD", config)
    assert out.rc == 0 and out.doc == PREV_RESULT, out
    assert agent.attacher.ops("attach") == [NETNS]
    out = cni(plugin, "ADD", {**config, "runtimeConfig": {"io.kubernetes.cri.pod-annotations": {}}}, netns=NETNS2)
    assert out.rc == 0 and agent.attacher.ops("attach") == [NETNS]  # not annotated: not selected


def test_a_socket_that_cannot_be_served(rundir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Asked for explicitly (--cni-socket), it stops the agent with a clear error; the
    default one only logs the error and the agent keeps the node's table in sync."""
    from svcproxy.agent import Agent as NodeAgent, AgentConfig
    from svcproxy.cli import main

    blocker = rundir / "file"
    blocker.write_text("")
    cluster = tmp_path / "cluster.json"
    cluster.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": [
        service("web", cluster_ips=(VIP,), ports=[svc_port("http", 80, target_port=8080)])]}))
    err = io.StringIO()
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:  # main() installs the agent's signal handlers
        rc = main(["run", "--node-plumbing", "off", "-f", str(cluster), "--node", "node-a", "--health-bind", "127.0.0.1:0",
                   "--healthcheck-bind-host", "127.0.0.1", "--cni-socket", str(blocker / "cni.sock")],
                  backend=MemoryBackend(), err=err)
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    assert rc == 1
    assert f"svcproxy: error: cannot create {blocker} for the CNI socket" in err.getvalue()

    backend = MemoryBackend()
    node_agent = NodeAgent(AgentConfig(node_name="node-a", file=str(cluster), health_bind="127.0.0.1:0",
                                       healthcheck_bind_host="127.0.0.1", min_sync_period=0.05, sync_period=1.0,
                                       cni_socket=str(blocker / "cni.sock")), backend)
    thread = threading.Thread(target=node_agent.run, daemon=True)
    with caplog.at_level("ERROR", logger="svcproxy.agent"):
        thread.start()
        try:
            deadline = time.monotonic() + 10
            while not backend.read().services and time.monotonic() < deadline:
                time.sleep(0.02)
            assert ServiceKey(Protocol.TCP, VIP, 80) in backend.read().services
        finally:
            node_agent.stop.set()
            node_agent.proxier.request_sync()
            thread.join(10)
    assert "not serving the CNI plugin: cannot create" in caplog.text


def test_the_plugin_file_runs_on_its_own(agent: Agent, tmp_path: Path) -> None:
    """svcproxy/podns/cni.py needs only the standard library, so the file itself can be
    installed as /opt/cni/bin/svcproxy-cni on a node (the runtime runs plugins on the
    host, outside the agent's container), with any python3."""
    exe = tmp_path / "svcproxy-cni"
    exe.write_text(f"#!{sys.executable} -IS\n" + CNI_PY.read_text())
    exe.chmod(0o755)
    out = cni(exe, "ADD", conf(agent.sock))
    assert out.rc == 0 and out.doc == PREV_RESULT, out
    assert agent.attacher.ops("attach") == [NETNS]


@pytest.mark.parametrize("raw", [b"[" * 100_000 + b"\n", b'{"op":"cni","env":' + b"[" * 100_000 + b"\n"])
def test_deeply_nested_request_is_answered_and_the_connection_kept(agent: Agent, raw: bytes) -> None:
    """JSON nested past Python's recursion limit is one error answer, not a traceback on
    the agent's log and a connection closed without an answer."""
    bad, status = talk(agent.sock, {"op": "status"}, raw=raw)
    assert bad == {"ok": False, "error": "request is not JSON (nested too deeply)", "code": 4}
    assert status["ok"] is True


def test_a_configuration_nested_too_deeply_is_a_decode_error(agent: Agent, caplog: pytest.LogCaptureFixture) -> None:
    """The static plugin forwards any JSON object it can tokenize; one nested past
    Python's recursion limit is CNI error 6, not an internal error with a traceback."""
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_NETNS": NETNS, "CNI_IFNAME": "eth0",
           "CNI_PATH": "/opt/cni/bin"}
    (answer,) = talk(agent.sock, {"op": "cni", "env": env, "stdin": '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}"})
    assert answer["ok"] is True and answer["rc"] == 1, answer
    out = json.loads(answer["stdout"])
    assert out["code"] == 6 and out["details"] == "nested too deeply", out
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
