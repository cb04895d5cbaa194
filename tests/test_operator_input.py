"""What an operator gets for a mistake in flags or the configuration file: one line
naming the flag or setting, exit status 1, nothing started or changed."""

from __future__ import annotations

import io
import socket
from pathlib import Path
from typing import Any

import pytest

from svcproxy import cli
from svcproxy.cli import main
from svcproxy.ipvs.backend import MemoryBackend

EMPTY = '{"apiVersion": "v1", "kind": "List", "items": []}'


def run_main(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), backend=MemoryBackend(), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("key", ["node", "kubeconfig", "cni-socket", "pod-netns-dir", "health-bind", "scheduler"])
def test_a_null_setting_in_the_file_means_the_default_not_the_text_none(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, key: str) -> None:
    """YAML reads ``node:`` with nothing after it (and ``node: null``) as null. Turned into
    the flag text "None", the agent ran as node "None" (no Node object, no local
    endpoints), or served its CNI socket at ./None, or read a kubeconfig named None."""
    seen: dict[str, object] = {}
    monkeypatch.setattr(cli, "run_agent", lambda args, backend: seen.update(vars(args)) or 0)
    conf = tmp_path / "config.yaml"
    conf.write_text(f"{key}:\nsync-period: 10\n")
    code, _, err = run_main("run", "--dry-run", "--config", str(conf))
    assert code == 0, err
    defaults = vars(cli.build_parser().parse_args(["run"]))
    attr = key.replace("-", "_")
    assert seen[attr] == defaults[attr] and seen[attr] != "None"
    assert seen["sync_period"] == 10.0  # the rest of the file still applies


def test_a_null_switch_in_the_file_is_left_at_its_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, object] = {}
    monkeypatch.setattr(cli, "run_agent", lambda args, backend: seen.update(vars(args)) or 0)
    conf = tmp_path / "config.yaml"
    conf.write_text("dry-run: null\nmasquerade-all: ~\n")
    code, _, err = run_main("run", "--config", str(conf))
    assert code == 0, err
    assert seen["dry_run"] is False and seen["masquerade_all"] is False


def test_health_bind_in_use_names_the_flag_and_the_address(tmp_path: Path) -> None:
    """kube-proxy still running on the node holds 10256: the error must say which
    address could not be taken and by which flag, not just "[Errno 98] ..."."""
    cluster = tmp_path / "c.json"
    cluster.write_text(EMPTY)
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        code, _, err = run_main("run", "-f", str(cluster), "--dry-run", "--health-bind", f"127.0.0.1:{port}",
                                "--node-plumbing", "off", "--cni-socket", "")
    finally:
        holder.close()
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "--health-bind" in lines[0] and f"127.0.0.1:{port}" in lines[0] and "in use" in lines[0]


@pytest.mark.parametrize("command", [["run", "--dry-run"], ["plan", "-f", "c.json"], ["sync", "-f", "c.json"]])
def test_an_unknown_scheduler_is_a_flag_error_naming_the_flag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              command: list[str]) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.json").write_text(EMPTY)
    monkeypatch.setattr(cli, "run_agent", lambda args, backend: pytest.fail("the agent started"))
    with pytest.raises(SystemExit) as exc:
        run_main(*command, "--scheduler", "bogus")
    assert exc.value.code == 1


def test_an_unknown_scheduler_in_the_file_names_the_setting(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "c.json").write_text(EMPTY)
    conf = tmp_path / "config.yaml"
    conf.write_text("scheduler: bogus\n")
    with pytest.raises(SystemExit) as exc:
        run_main("plan", "-f", str(tmp_path / "c.json"), "--config", str(conf))
    assert exc.value.code == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--scheduler" in last and "bogus" in last


@pytest.mark.parametrize("name", ["x" * 16, "", "a/b", "a b", "..", "a:b"])
@pytest.mark.parametrize("command", [["run", "--dry-run"], ["sync", "-f", "c.json"], ["cleanup", "--dry-run"]])
def test_a_dummy_device_linux_cannot_name_is_a_flag_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str], name: str,
                                                          command: list[str]) -> None:
    """An interface name Linux refuses (over 15 bytes, '/', whitespace, ':', . or ..)
    failed only at run time, at every sync, with the agent otherwise running."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.json").write_text(EMPTY)
    monkeypatch.setattr(cli, "run_agent", lambda args, backend: pytest.fail("the agent started"))
    monkeypatch.setattr(cli, "run_cleanup", lambda args, backend, out: pytest.fail("cleanup ran"))
    with pytest.raises(SystemExit) as exc:
        run_main(*command, "--dummy-device", name)
    assert exc.value.code == 1
    assert "argument --dummy-device" in capsys.readouterr().err


def test_a_good_dummy_device_name_is_accepted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, object] = {}
    monkeypatch.setattr(cli, "run_agent", lambda args, backend: seen.update(vars(args)) or 0)
    code, _, err = run_main("run", "--dry-run", "--dummy-device", "x" * 15)
    assert code == 0, err
    assert seen["dummy_device"] == "x" * 15


def test_the_python_plugin_answers_version_whatever_the_configuration() -> None:
    """libcni asks VERSION before anything else; a configuration nested deeper than
    Python's JSON decoder goes must not turn it into an internal error (999)."""
    from svcproxy.podns import cni

    for text in ("[" * 100_000, '{"cniVersion": ' + "[" * 100_000):
        out = io.StringIO()
        rc = cni.run({"CNI_COMMAND": "VERSION"}, io.StringIO(text), out, stderr=io.StringIO())
        assert rc == 0
        assert out.getvalue().startswith('{"cniVersion": "1.1.0", "supportedVersions"')


NODE_AND_LOCAL_SERVICE = """\
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Node
  metadata: {name: worker-1, labels: {topology.kubernetes.io/zone: z1}}
  status: {addresses: [{type: InternalIP, address: 192.0.2.10}]}
- apiVersion: v1
  kind: Service
  metadata: {name: web, namespace: default}
  spec: {type: NodePort, clusterIP: 10.96.0.20, clusterIPs: [10.96.0.20], ipFamilies: [IPv4],
         externalTrafficPolicy: Local,
         ports: [{name: http, port: 80, nodePort: 30080, protocol: TCP, targetPort: 8080}]}
- apiVersion: discovery.k8s.io/v1
  kind: EndpointSlice
  metadata: {name: web-1, namespace: default, labels: {kubernetes.io/service-name: web}}
  addressType: IPv4
  ports: [{name: http, port: 8080, protocol: TCP}]
  endpoints:
  - {addresses: [10.244.0.5], conditions: {ready: true}, nodeName: worker-1}
"""


@pytest.mark.parametrize("how", ["flag", "NODE_NAME", "hostname"])
def test_the_node_name_is_read_as_kube_proxy_reads_it_trimmed_and_lower_case(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    """kube-proxy (nodeutil.GetHostname) trims and lower-cases --hostname-override and
    the hostname, as the kubelet does when it names its Node. A host called Worker-1
    is Node worker-1: taken as is, the name matched no Node object (no NodePort
    addresses, no zone) and no endpoint's nodeName, so Local-policy Services had no
    local endpoints on that node."""
    (tmp_path / "c.yaml").write_text(NODE_AND_LOCAL_SERVICE)
    monkeypatch.delenv("NODE_NAME", raising=False)
    extra: list[str] = []
    if how == "flag":
        extra = ["--node", " Worker-1 "]
    elif how == "NODE_NAME":
        monkeypatch.setenv("NODE_NAME", "Worker-1\n")
    else:
        monkeypatch.setattr(cli.socket, "gethostname", lambda: "Worker-1")
    code, out, err = run_main("plan", "-f", str(tmp_path / "c.yaml"), "-o", "json", *extra)
    assert code == 2, err
    assert "missing-node" not in err
    addresses = {(s["address"], s["port"]) for s in __import__("json").loads(out)["services"]}
    assert ("192.0.2.10", 30080) in addresses


def test_a_blank_node_name_is_a_flag_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        run_main("run", "--dry-run", "--node", "  ")
    assert exc.value.code == 1
    assert "argument --node" in capsys.readouterr().err


@pytest.mark.parametrize("flag", [["--wait", "nan"], ["--wait", "-1"], ["--watch-interval", "inf"],
                                  ["--plugin-timeout", "nan"], ["--metrics-bind", "1.2.3.4"],
                                  ["--metrics-bind", "localhost:x"], ["--no-such-flag"]])
def test_install_cni_bad_flags_exit_1_and_change_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                         flag: list[str]) -> None:
    """The init container and the keeper: a bad flag value is one line naming the flag,
    exit status 1 (argparse's own is 2), and neither the binary nor the conflist is
    written (a bad --metrics-bind was found only after both were installed)."""
    from svcproxy.podns import install

    bin_dir, conf_dir = tmp_path / "bin", tmp_path / "net.d"
    bin_dir.mkdir()
    conf_dir.mkdir()
    conflist = conf_dir / "10-x.conflist"
    conflist.write_text('{"cniVersion": "1.0.0", "name": "x", "plugins": [{"type": "bridge"}]}\n')
    before = conflist.read_bytes()
    plugin = tmp_path / "plugin"
    plugin.write_text("#!/bin/sh\necho '{\"cniVersion\": \"1.0.0\", \"supportedVersions\": [\"1.0.0\"]}'\n")
    plugin.chmod(0o755)
    with pytest.raises(SystemExit) as exc:
        install.main(["--bin-dir", str(bin_dir), "--conf-dir", str(conf_dir), "--plugin", str(plugin),
                      "--watch", *flag])
    assert exc.value.code == 1
    name = flag[0]
    assert name in capsys.readouterr().err
    assert conflist.read_bytes() == before and list(bin_dir.iterdir()) == []


NODES_ONLY = "apiVersion: v1\nkind: Node\nmetadata: {name: vm}\n"
SLICES_ONLY = ("apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n"
               "metadata: {name: web-1, namespace: default, labels: {kubernetes.io/service-name: web}}\n"
               "addressType: IPv4\nendpoints: [{addresses: [10.244.0.5]}]\n")
CURRENT = "-A -t 10.96.0.10:53 -s rr\n-a -t 10.96.0.10:53 -r 10.244.0.3:53 -m -w 1\n"


@pytest.mark.parametrize("text", [NODES_ONLY, SLICES_ONLY])
@pytest.mark.parametrize("command", ["plan", "sync"])
def test_a_file_without_services_is_not_an_empty_cluster(tmp_path: Path, text: str, command: str) -> None:
    """`kubectl get nodes -o yaml > cluster.yaml` by mistake: no Service at all, so
    every virtual service was planned for deletion (and `sync` deleted them). Every
    real cluster has the `kubernetes` Service; an empty cluster on purpose is the
    empty List."""
    (tmp_path / "c.yaml").write_text(text)
    backend = MemoryBackend()
    from svcproxy.ipvs.ipvsadm import parse_save

    backend.apply(__import__("svcproxy.diff", fromlist=["diff"]).diff(parse_save(CURRENT), backend.read()))
    before = backend.read()
    assert len(before) == 1
    out, err = io.StringIO(), io.StringIO()
    code = main([command, "-f", str(tmp_path / "c.yaml")], backend=backend, out=out, err=err)
    assert code == 1
    assert "no Services" in err.getvalue() and "kind: List, items: []" in err.getvalue()
    assert backend.read() == before


def test_the_agents_file_source_keeps_its_services_when_the_file_loses_them(tmp_path: Path) -> None:
    import threading

    from svcproxy.kube.filesource import FileSource

    path = tmp_path / "cluster.yaml"
    path.write_text(NODE_AND_LOCAL_SERVICE)
    events: list[object] = []
    src = FileSource(path, sink=events.append, on_synced=lambda kind: None, stop=threading.Event(),
                     node_name="worker-1")
    assert src.check() is True
    n = len(events)
    path.write_text(NODES_ONLY.replace("vm", "worker-1"))
    import os
    os.utime(path, ns=(10**18, 10**18))
    assert src.check() is False
    assert len(events) == n and src.stats.errors == 1


@pytest.mark.parametrize("given, bind", [("0.0.0.0", "0.0.0.0:10256"), ("::", "[::]:10256"),
                                         ("192.0.2.7", "192.0.2.7:10256"), ("0.0.0.0:10266", "0.0.0.0:10266"),
                                         ("[::1]:10266", "[::1]:10266")])
def test_kube_proxy_healthz_bind_address_without_a_port_gets_kube_proxys_port(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, given: str, bind: str) -> None:
    """kube-proxy's defaulting (AppendPortIfNeeded) adds port 10256 to a healthzBindAddress
    that is only an IP; a KubeProxyConfiguration kube-proxy runs with was refused."""
    seen: dict[str, object] = {}
    monkeypatch.setattr(cli, "run_agent", lambda args, backend: seen.update(vars(args)) or 0)
    conf = tmp_path / "kp.yaml"
    conf.write_text("apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n"
                    f"healthzBindAddress: {given!r}\n")
    code, _, err = run_main("run", "--config", str(conf))
    assert code == 0, err
    assert seen["health_bind"] == bind


@pytest.mark.parametrize("fields, bind", [("bindAddress: '::'", "[::]:10256"),
                                          ("bindAddress: fd00::5", "[::]:10256"),
                                          ("bindAddress: '::'\nhealthzBindAddress: 127.0.0.1:10266", "127.0.0.1:10266"),
                                          ("bindAddress: 192.0.2.5", None)])
def test_kube_proxy_ipv6_bind_address_makes_the_default_healthz_address_ipv6(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fields: str, bind: str | None) -> None:
    """kube-proxy's default healthz address follows bindAddress' family ([::]:10256 on an
    IPv6 bindAddress); svcproxy's default 0.0.0.0:10256 is IPv4 only, so an IPv6-only
    node's load balancer health checks found nothing listening."""
    seen: dict[str, object] = {}
    monkeypatch.setattr(cli, "run_agent", lambda args, backend: seen.update(vars(args)) or 0)
    conf = tmp_path / "kp.yaml"
    conf.write_text(f"apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n{fields}\n")
    code, _, err = run_main("run", "--config", str(conf))
    assert code == 0, err
    assert seen["health_bind"] == bind


@pytest.mark.parametrize("command, unset, named", [
    ("ADD", ["CNI_NETNS"], "CNI_NETNS"), ("CHECK", ["CNI_CONTAINERID", "CNI_PATH"], "CNI_CONTAINERID,CNI_PATH"),
    ("DEL", ["CNI_IFNAME"], "CNI_IFNAME")])
def test_the_static_plugin_reports_missing_variables_as_the_agent_does(tmp_path: Path, command: str,
                                                                       unset: list[str], named: str) -> None:
    """With the agent up, a missing CNI_* variable is error 4 naming it (the agent's
    check); with the agent down the static plugin answered 11 (try again later) for ADD
    and CHECK and 0 for DEL: the same invocation's result depended on the agent."""
    import json
    import subprocess

    from cni_build import static_plugin

    env = {"CNI_COMMAND": command, "CNI_CONTAINERID": "abc", "CNI_NETNS": "/run/netns/pod-1", "CNI_IFNAME": "eth0",
           "CNI_PATH": "/opt/cni/bin"}
    for name in unset:
        env[name] = ""
    conf = {"cniVersion": "1.0.0", "name": "n", "type": "svcproxy-cni", "socket": str(tmp_path / "none.sock"),
            "prevResult": {"cniVersion": "1.0.0"}}
    done = subprocess.run([str(static_plugin())], input=json.dumps(conf).encode(), env=env, capture_output=True,
                          timeout=30)
    assert done.returncode == 1, done
    doc = json.loads(done.stdout)
    assert doc["code"] == 4 and doc["msg"] == f"required env variables [{named}] missing"
    from svcproxy.podns import cni

    out = io.StringIO()
    assert cni.run(env, io.StringIO(json.dumps(conf)), out, stderr=io.StringIO()) == 1
    assert json.loads(out.getvalue())["msg"] == doc["msg"]


def test_the_python_plugin_refuses_a_configuration_over_1_mib_without_reading_it_all() -> None:
    """The static plugin refuses stdin over 1 MiB (error 6); the Python one read any
    amount into memory, and went on to judge what it read."""
    import json

    from svcproxy.podns import cni

    class Endless(io.TextIOBase):
        """More configuration than anyone should send: reading it all never ends."""

        def __init__(self) -> None:
            self.given = 0

        def read(self, size: int | None = -1) -> str:
            if size is None or size < 0:
                raise AssertionError("read everything")
            self.given += size
            return ('{"cniVersion": "1.0.0", "name": "n", "pad": "' + "x" * size)[:size]

    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "abc", "CNI_NETNS": "/run/netns/p", "CNI_IFNAME": "eth0",
           "CNI_PATH": "/opt/cni/bin"}
    stdin = Endless()
    out = io.StringIO()
    assert cni.run(env, stdin, out, stderr=io.StringIO()) == 1
    doc = json.loads(out.getvalue())
    assert doc["code"] == cni.ERR_DECODE and "1 MiB" in doc["details"]
    assert stdin.given <= cni.MAX_LINE + 1
    out = io.StringIO()
    assert cni.run({"CNI_COMMAND": "VERSION"}, Endless(), out, stderr=io.StringIO()) == 0
    assert json.loads(out.getvalue())["cniVersion"] == cni.LATEST


def test_losing_the_api_server_keeps_rules_health_and_readiness(tmp_path: Path) -> None:
    """kube-proxy's semantics: with the API server gone nothing is queued, so /healthz,
    /livez and /readyz stay 200 and the table stays as it was (the node keeps serving
    what it knew); the lost watches show in svcproxy_watch_errors_total."""
    import json
    import threading
    import time

    from fakeapi import FakeApiServer
    from svcproxy.agent import Agent, AgentConfig
    from test_agent import get, wait_until


    fake = FakeApiServer().start()
    fake.apply({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a"}})
    fake.apply({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "default"},
                "spec": {"clusterIP": "10.96.0.20", "clusterIPs": ["10.96.0.20"], "ipFamilies": ["IPv4"],
                         "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]}})
    backend = MemoryBackend()
    agent = Agent(AgentConfig(node_name="node-a", health_bind="127.0.0.1:0", sync_period=0.5, min_sync_period=0.05,
                              kubeconfig=fake.write_kubeconfig(tmp_path / "kubeconfig"), cni_socket=None),
                  backend)
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{agent.server.port}"
    try:
        wait_until(lambda: get(base + "/readyz")[0] == 200, 20.0, "first full sync")
        table = backend.read()
        assert len(table) == 1
        fake.stop()
        wait_until(lambda: 'svcproxy_watch_errors_total{resource="Service"} 0.0' not in get(base + "/metrics")[1],
                   20.0, "the lost watch counted")
        time.sleep(1.5)  # full syncs (sync_period 0.5) with no API server
        for path in ("/healthz", "/livez", "/readyz"):
            assert get(base + path)[0] == 200, path
        assert json.loads(get(base + "/healthz")[1])["nodeEligible"] is True
        assert backend.read() == table
    finally:
        agent.stop.set()
        thread.join(10)


def test_a_scan_directory_that_cannot_be_listed_detaches_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """A listing error other than "no such directory" (permissions, EIO) ended the scan
    with a traceback at every period; had it read as an empty directory, every Pod
    namespace found there before would have been forgotten. Now: nothing attached or
    forgotten, one log line per new error, the failure counted."""
    import logging
    import os

    from svcproxy.metrics import Metrics
    from svcproxy.podns.scan import NetnsScanner, ScanResult

    scan_dir = tmp_path / "netns"
    scan_dir.mkdir()
    attached = str(scan_dir / "pod-1")

    class Namespaces:
        """What the scanner asks of the agent's PodNamespaces: one namespace known."""

        def __init__(self) -> None:
            self.proxier = type("P", (), {"metrics": Metrics()})()
            self.detached: list[str] = []

        def known(self) -> dict[str, object]:
            return {attached: (1, 2)}

        def attach(self, path: str) -> object:
            raise AssertionError(f"attached {path}")

        def detach(self, path: str) -> bool:
            self.detached.append(path)
            return True

    namespaces = Namespaces()
    scanner = NetnsScanner(str(scan_dir), namespaces, period=30)  # type: ignore[arg-type]
    real = os.listdir

    def listdir(path: str) -> list[str]:
        if os.path.abspath(path) == str(scan_dir):
            raise PermissionError(13, "Permission denied")
        return real(path)

    monkeypatch.setattr(os, "listdir", listdir)
    with caplog.at_level(logging.INFO, logger="svcproxy.podns"):
        for _ in range(3):
            assert scanner.scan_once() == ScanResult()
    assert namespaces.detached == []
    lines = [r for r in caplog.records if "cannot list" in r.getMessage()]
    assert len(lines) == 1 and lines[0].exc_info is None
    assert namespaces.proxier.metrics.pod_netns_scan_errors._value.get() == 3
    monkeypatch.setattr(os, "listdir", real)
    assert scanner.scan_once().detached == (attached,)  # listed again, empty: now it is gone


def test_run_pod_netns_dir_that_is_a_file_is_a_flag_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "run_agent", lambda args, backend: pytest.fail("the agent started"))
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    code, _, err = run_main("run", "--dry-run", "--pod-netns-dir", str(not_a_dir))
    assert code == 1
    assert err.strip().splitlines()[-1].endswith(f"--pod-netns-dir {not_a_dir}: not a directory")


@pytest.mark.parametrize("name", ["a,b", "node_1", "-node", "node-", "a" * 254, "node a", "n/1"])
def test_a_node_name_no_node_can_have_is_a_flag_error(capsys: pytest.CaptureFixture[str], name: str) -> None:
    """Node names are DNS subdomains (lower case letters, digits, '-' and '.'); a --node
    outside them matched no Node object and no endpoint, silently (and 'a,b' made the
    Node watch's field selector one the API server refuses, at every retry)."""
    with pytest.raises(SystemExit) as exc:
        run_main("run", "--dry-run", "--node", name)
    assert exc.value.code == 1
    assert "argument --node" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["node-1", "ip-10-0-0-1.ec2.internal", "a" * 253, "7"])
def test_node_names_kubernetes_accepts_are_accepted(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    seen: dict[str, object] = {}
    monkeypatch.setattr(cli, "run_agent", lambda args, backend: seen.update(vars(args)) or 0)
    assert run_main("run", "--dry-run", "--node", name)[0] == 0
    assert seen["node"] == name


@pytest.mark.parametrize("value", ["127.0.0.1", "127.0.0.1:10249", "''"])
def test_kube_proxy_default_metrics_address_written_as_an_ip_is_not_named_as_ignored(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, value: str) -> None:
    """kube-proxy appends its metrics port to an address without one, so 127.0.0.1 is its
    default 127.0.0.1:10249: nothing svcproxy leaves behind, no warning about it."""
    monkeypatch.setattr(cli, "run_agent", lambda args, backend: 0)
    conf = tmp_path / "kp.yaml"
    conf.write_text("apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n"
                    f"metricsBindAddress: {value}\n")
    code, _, err = run_main("run", "--config", str(conf))
    assert code == 0, err
    assert not [r for r in caplog.records if "metricsBindAddress" in r.getMessage()]
    conf.write_text(conf.read_text().replace(f"metricsBindAddress: {value}", "metricsBindAddress: 0.0.0.0:10249"))
    run_main("run", "--config", str(conf))
    assert [r for r in caplog.records if "metricsBindAddress" in r.getMessage()]  # not the default: named


@pytest.mark.parametrize("value", ["0.001", "0.5"])
def test_a_watch_idle_timeout_under_a_second_is_a_flag_error(capsys: pytest.CaptureFixture[str], value: str) -> None:
    """A quiet watch sends a bookmark about once a minute: a sub-second idle timeout
    would re-open every watch over and over on a quiet cluster."""
    with pytest.raises(SystemExit) as exc:
        run_main("run", "--dry-run", "--watch-idle-timeout", value)
    assert exc.value.code == 1
    assert "argument --watch-idle-timeout" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["a,b", "-x", "x-", "a" * 64, "svc proxy", "a/b"])
def test_a_proxy_name_no_label_can_have_is_a_flag_error(capsys: pytest.CaptureFixture[str], name: str) -> None:
    """--proxy-name is compared with a label's value: one no label can have would skip
    every labelled Service in silence (a list in the config file became the text 'a,b')."""
    with pytest.raises(SystemExit) as exc:
        run_main("run", "--dry-run", "--proxy-name", name)
    assert exc.value.code == 1
    assert "argument --proxy-name" in capsys.readouterr().err


def test_a_proxy_name_list_in_the_config_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("proxy-name: [a, b]\n")
    with pytest.raises(SystemExit) as exc:
        run_main("run", "--dry-run", "--config", str(config))
    assert exc.value.code == 1
    assert "--proxy-name" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["svcproxy", "my_proxy.v2", "a" * 63])
def test_proxy_names_a_label_can_have_are_accepted(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    seen: dict[str, object] = {}
    monkeypatch.setattr(cli, "run_agent", lambda args, backend: seen.update(vars(args)) or 0)
    assert run_main("run", "--dry-run", "--proxy-name", name, "--watch-idle-timeout", "1")[0] == 0
    assert seen["proxy_name"] == name and seen["watch_idle_timeout"] == 1.0
