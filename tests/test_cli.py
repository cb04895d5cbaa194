"""The CLI end to end, in process: plan (text and JSON), exit codes, sync against the
in-memory backend, problems on stderr, and the no-IPVS fallback."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import pytest

from svcproxy.cli import main
from svcproxy.ipvs.backend import BackendError, MemoryBackend
from svcproxy.model import Destination, Operation, OperationResult, Protocol, ServiceKey, Table, VirtualService

CLUSTER = """\
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default, uid: 1b4c, resourceVersion: "100"}
spec:
  type: ClusterIP
  clusterIP: 10.96.0.20
  clusterIPs: [10.96.0.20]
  ipFamilies: [IPv4]
  ports: [{name: http, port: 80, protocol: TCP, targetPort: http}]
  sessionAffinity: None
status: {loadBalancer: {}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-x7k2p
  namespace: default
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- addresses: [10.244.1.5]
  conditions: {ready: true, serving: true, terminating: false}
  nodeName: node-a
- addresses: [10.244.2.7]
  conditions: {ready: true, serving: true, terminating: false}
  nodeName: node-b
- addresses: [not-an-ip]
  conditions: {ready: true}
"""

WEB = ServiceKey(Protocol.TCP, "10.96.0.20", 80)
WEB_TABLE = Table.of([VirtualService(WEB, destinations=(Destination("10.244.1.5", 8080), Destination("10.244.2.7", 8080)))])


@pytest.fixture
def cluster(tmp_path: Path) -> Path:
    path = tmp_path / "cluster.yaml"
    path.write_text(CLUSTER)
    return path


def run(args: Sequence[str], backend: object) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(args), backend=backend, out=out, err=err)  # type: ignore[arg-type]
    return code, out.getvalue(), err.getvalue()


def test_plan_against_empty_kernel_prints_additions_and_exits_2(cluster: Path) -> None:
    code, out, err = run(["plan", "-f", str(cluster), "--node", "node-a"], MemoryBackend())
    assert code == 2
    assert "+ TCP  10.96.0.20:80  rr" in out
    assert "+   -> 10.244.1.5:8080  masq weight 1" in out
    assert "virtual services 1 to add" in out and "real servers 2 to add" in out
    assert "not-an-ip" in err and "invalid-ip" in err  # the bad endpoint is reported ...
    assert "10.244.2.7" in out  # ... and the good ones are kept


def test_plan_changes_nothing_and_exits_0_when_in_sync(cluster: Path) -> None:
    backend = MemoryBackend(WEB_TABLE)
    code, out, _ = run(["plan", "-f", str(cluster)], backend)
    assert code == 0
    assert out.startswith("No changes")
    assert backend.applied == []


def test_plan_json_shape(cluster: Path) -> None:
    stale = Table.of([VirtualService(WEB, "wlc", destinations=(Destination("10.244.9.9", 8080),
                                                                Destination("10.244.1.5", 8080, 0)))])
    code, out, _ = run(["plan", "-f", str(cluster), "-o", "json"], MemoryBackend(stale))
    assert code == 2
    doc = json.loads(out)
    assert doc["version"] == 1
    assert doc["services"] == [{
        "protocol": "TCP", "address": "10.96.0.20", "port": 80, "scheduler": "rr", "persistence": None,
        "origin": [{"namespace": "default", "name": "web", "port": "http", "kind": "ClusterIP"}],
        "destinations": [
            {"address": "10.244.1.5", "port": 8080, "weight": 1, "forward": "masq"},
            {"address": "10.244.2.7", "port": 8080, "weight": 1, "forward": "masq"},
        ],
    }]
    svc = {"protocol": "TCP", "address": "10.96.0.20", "port": 80}
    assert doc["operations"] == [
        {"op": "delete-destination", "service": svc, "destination": {"address": "10.244.9.9", "port": 8080}},
        {"op": "edit-service", "service": svc, "scheduler": "rr", "persistence": None},
        {"op": "edit-destination", "service": svc, "destination": {"address": "10.244.1.5", "port": 8080},
         "weight": 1, "forward": "masq"},
        {"op": "add-destination", "service": svc, "destination": {"address": "10.244.2.7", "port": 8080},
         "weight": 1, "forward": "masq"},
    ]


def test_plan_reads_current_state_from_a_saved_dump(cluster: Path, tmp_path: Path) -> None:
    saved = tmp_path / "saved.txt"
    saved.write_text("-A -t 10.96.0.20:80 -s rr\n-a -t 10.96.0.20:80 -r 10.244.1.5:8080 -m -w 1\n")

    class Untouchable:
        def read(self, counts: bool | None = None) -> Table:
            raise AssertionError("must not read the kernel when --current-file is given")

        def apply(self, ops: Sequence[Operation]) -> list[OperationResult]:
            raise AssertionError("plan must not apply")

    code, out, _ = run(["plan", "-f", str(cluster), "--current-file", str(saved), "-o", "json"], Untouchable())
    assert code == 2
    ops = json.loads(out)["operations"]
    assert [(o["op"], o["destination"]["address"]) for o in ops] == [("add-destination", "10.244.2.7")]


def test_plan_without_ipvs_compares_with_empty_table_and_says_so(cluster: Path) -> None:
    class NoIpvs:
        def read(self, counts: bool | None = None) -> Table:
            raise BackendError("ipvsadm: Can't initialize ipvs")

        def apply(self, ops: Sequence[Operation]) -> list[OperationResult]:
            raise AssertionError("plan must not apply")

    code, out, err = run(["plan", "-f", str(cluster)], NoIpvs())
    assert code == 2
    assert "notice: cannot read the kernel's IPVS table" in err
    assert "+ TCP  10.96.0.20:80" in out


def test_sync_applies_then_second_sync_is_a_no_op(cluster: Path) -> None:
    backend = MemoryBackend()
    code, out, _ = run(["sync", "-f", str(cluster)], backend)
    assert code == 0
    assert "3 operations applied, 0 failed" in out
    assert backend.read() == WEB_TABLE
    code, out, _ = run(["sync", "-f", str(cluster)], backend)
    assert code == 0 and "0 operations applied" in out


def test_sync_reports_failures_and_exits_1(cluster: Path) -> None:
    class Rejecting(MemoryBackend):
        def apply(self, ops: Sequence[Operation]) -> list[OperationResult]:
            bad = [op for op in ops if op.destination is not None and op.destination.address == "10.244.2.7"]
            failed = super().apply([op for op in ops if op not in bad])
            return failed + [OperationResult(op, "Memory allocation problem") for op in bad]

    backend = Rejecting()
    code, out, _ = run(["sync", "-f", str(cluster)], backend)
    assert code == 1
    assert "FAILED  add-destination tcp://10.96.0.20:80 -> 10.244.2.7:8080" in out
    assert "2 operations applied, 1 failed" in out


def test_sync_refuses_current_file(cluster: Path, tmp_path: Path) -> None:
    saved = tmp_path / "saved.txt"
    saved.write_text("")
    code, _, err = run(["sync", "-f", str(cluster), "--current-file", str(saved)], MemoryBackend())
    assert code == 1 and "plan only" in err


def test_unreadable_input_is_an_error_not_a_traceback(tmp_path: Path) -> None:
    code, _, err = run(["plan", "-f", str(tmp_path / "missing.yaml")], MemoryBackend())
    assert code == 1 and "error" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: Service\n  bad: [indent\n")
    code, _, err = run(["plan", "-f", str(bad)], MemoryBackend())
    assert code == 1 and "error" in err


def test_exclude_cidrs_keeps_foreign_services(cluster: Path) -> None:
    foreign = VirtualService(ServiceKey(Protocol.TCP, "192.0.2.1", 80))
    code, out, _ = run(["plan", "-f", str(cluster), "--exclude-cidrs", "192.0.2.0/24", "-o", "json"],
                       MemoryBackend(Table.of([*WEB_TABLE.sorted(), foreign])))
    assert code == 0 and json.loads(out)["operations"] == []


def test_ip_families_narrow_the_table(cluster: Path) -> None:
    code, out, _ = run(["plan", "-f", str(cluster), "--ip-families", "IPv6", "-o", "json"], MemoryBackend())
    assert code == 0 and json.loads(out)["services"] == []


def test_python_dash_m_runs_the_cli(cluster: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "svcproxy", "plan", "-f", str(cluster),
                           "--current-file", "/dev/null", "-o", "json"], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert len(json.loads(proc.stdout)["operations"]) == 3


def _nft_in_netns(tmp_path: Path) -> tuple[str, Path]:
    """A namespace of the test's own and an `nft` wrapper that runs there."""
    import os
    import shutil
    import uuid

    if os.geteuid() != 0 or not shutil.which("nft"):
        pytest.skip("needs root and nft (nftables)")
    name = f"svcproxy-cli-{uuid.uuid4().hex[:8]}"
    if subprocess.run(["ip", "netns", "add", name], capture_output=True).returncode != 0:
        pytest.skip("cannot create a network namespace here")
    wrapper = tmp_path / "nft"
    wrapper.write_text(f'#!/bin/sh\nexec ip netns exec {name} nft "$@"\n')
    wrapper.chmod(0o755)
    return name, wrapper


def test_cleanup_removes_ours_only_and_dry_run_changes_nothing(tmp_path: Path) -> None:
    ours = VirtualService(ServiceKey(Protocol.TCP, "10.96.0.1", 80), "rr", None, (),
                          (Destination("10.244.1.5", 8080, 1),))
    foreign = VirtualService(ServiceKey(Protocol.TCP, "10.200.0.1", 80), "rr", None, (), ())
    backend = MemoryBackend(Table({ours.key: ours, foreign.key: foreign}))
    name, nft = _nft_in_netns(tmp_path)
    try:
        subprocess.run(["ip", "netns", "exec", name, "nft", "add", "table", "inet", "svcproxy"], check=True)
        subprocess.run(["ip", "netns", "exec", name, "nft", "add", "table", "inet", "other"], check=True)
        # The dummy device is looked up in this (the host's) namespace: there is none,
        # and a lookup changes nothing.
        base = ["cleanup", "--exclude-cidrs", "10.200.0.0/16", "--nft", str(nft), "--dummy-device", "svcpx-none0"]
        out = io.StringIO()
        assert main([*base, "--dry-run"], backend=backend, out=out) == 0
        assert out.getvalue() == ("node: would remove virtual service tcp://10.96.0.1:80 (1 real server)\n"
                                  "node: would remove 1 virtual services\n"
                                  "node: would delete nftables table inet svcproxy\n")
        assert set(backend.table.services) == {ours.key, foreign.key}
        out = io.StringIO()
        assert main(base, backend=backend, out=out) == 0
        assert out.getvalue() == "node: removed 1 virtual services\nnode: removed nftables table inet svcproxy\n"
        assert set(backend.table.services) == {foreign.key}
        tables = subprocess.run(["ip", "netns", "exec", name, "nft", "list", "tables"], capture_output=True,
                                text=True, check=True).stdout
        assert tables.split() == ["table", "inet", "other"]
        out = io.StringIO()
        assert main(base, backend=backend, out=out) == 0  # again: nothing left to do
        assert out.getvalue() == "node: removed 0 virtual services\n"
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


class NoIpvs(MemoryBackend):
    def read(self, counts: bool | None = None) -> Table:
        raise BackendError("IPVS not found (is the ip_vs module loaded?)")


def test_cleanup_checks_its_arguments_first_then_cleans_each_part_on_its_own(tmp_path: Path) -> None:
    ours = VirtualService(ServiceKey(Protocol.TCP, "10.96.0.1", 80), destinations=(Destination("10.244.1.5", 8080),))
    name, nft = _nft_in_netns(tmp_path)

    def tables() -> list[str]:
        return subprocess.run(["ip", "netns", "exec", name, "nft", "list", "tables"], capture_output=True,
                              text=True, check=True).stdout.split()

    try:
        subprocess.run(["ip", "netns", "exec", name, "nft", "add", "table", "inet", "svcproxy"], check=True)
        base = ["cleanup", "--nft", str(nft), "--dummy-device", "svcpx-none0"]
        # A --pod-netns-dir that does not exist: an error before anything is removed.
        backend = MemoryBackend(Table.of([ours]))
        err = io.StringIO()
        assert main([*base, "--pod-netns-dir", str(tmp_path / "missing")], backend=backend, err=err) == 1
        assert "--pod-netns-dir" in err.getvalue() and "no such directory" in err.getvalue()
        assert ours.key in backend.table.services and tables() == ["table", "inet", "svcproxy"]
        # No IPVS on the node: said, and the nftables table still goes.
        out = io.StringIO()
        assert main(base, backend=NoIpvs(), out=out) == 1
        assert out.getvalue().splitlines() == [
            "node: IPVS: FAILED: IPVS not found (is the ip_vs module loaded?)",
            "node: removed nftables table inet svcproxy"]
        assert tables() == []
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


def test_run_without_cluster_config_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import signal as _signal

    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_PORT", raising=False)
    err = io.StringIO()
    saved = {sig: _signal.getsignal(sig) for sig in (_signal.SIGTERM, _signal.SIGINT)}
    try:
        rc = main(["run", "--node-plumbing", "off", "--node", "node-a", "--health-bind", "127.0.0.1:0",
                   "--healthcheck-bind-host", "127.0.0.1", "--cni-socket", ""], backend=MemoryBackend(), err=err)
    finally:
        for sig, handler in saved.items():
            _signal.signal(sig, handler)
    assert rc == 1
    assert "svcproxy: error: cannot configure the API client from the in-cluster service account" in err.getvalue()
    assert "Traceback" not in err.getvalue()


class Untouchable(MemoryBackend):
    """A kernel that must not even be read."""

    def read(self, counts: bool | None = None) -> Table:
        raise AssertionError("the kernel was read before the flags were checked")


@pytest.mark.parametrize("command, flag, value", [
    ("plan", "--node-ip", "192.168.49.2x"),
    ("sync", "--node-ip", "300.1.1.1"),
    ("sync", "--exclude-cidrs", "10.0.0.0/8,10.0.0.0/33"),
    ("sync", "--cluster-cidr", "pods"),
    ("run", "--nodeport-addresses", "192.168.0.0/16,nope"),
    ("run", "--nodeport-addresses", "primary,192.168.0.0/16"),
    ("run", "--nodeport-addresses", "primry"),
    ("run", "--health-bind", "127.0.0.1:99999"),
    ("run", "--health-bind", "localhost:10256"),
    ("run", "--healthcheck-bind-host", "0.0.0"),
    ("run", "--sync-period", "inf"),
    ("run", "--sync-period", "nan"),
    ("run", "--min-sync-period", "-1"),
    ("run", "--graceful-timeout", "soon"),
    ("run", "--sync-period", "1e12"),
    ("run", "--sync-period", "0"),
    ("run", "--sync-period", "5ss"),
    ("run", "--pod-netns-scan-period", "0"),
    ("run", "--cni-timeout", "1e12"),
    ("plan", "--node-ip", "fe80::1%eth0"),
    ("cleanup", "--exclude-cidrs", "x"),
    ("plan", "--logging-format", "xml"),
    ("cleanup", "--logging-format", "JSON"),
])
def test_a_bad_flag_value_is_one_line_naming_it_and_exit_1_before_anything(
        command: str, flag: str, value: str, cluster: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = [command, flag, value] if command == "cleanup" else [command, "-f", str(cluster), flag, value]
    with pytest.raises(SystemExit) as exited:
        main(args, backend=Untouchable())
    assert exited.value.code == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"svcproxy {command}: error: argument {flag}") and value.split(",")[-1] in last
    assert "_seconds" not in last and "Traceback" not in last


@pytest.mark.parametrize("value, says", [
    ("primary,primary", "'primary,primary': 'primary' is given 2 times (give it once, on its own)"),
    ("primary,10.0.0.0/8", "'primary,10.0.0.0/8': 'primary' cannot be combined with CIDRs "
                           "(give either 'primary' or CIDRs)"),
])
def test_nodeport_addresses_primary_errors_say_what_is_wrong(
        value: str, says: str, cluster: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["run", "-f", str(cluster), "--nodeport-addresses", value], backend=Untouchable())
    assert exited.value.code == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == f"svcproxy run: error: argument --nodeport-addresses: {says}", last


def test_a_bad_value_in_the_config_file_names_the_flag(cluster: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "svcproxy.yaml"
    config.write_text("node-ip: [192.168.49.2x]\n")
    with pytest.raises(SystemExit) as exited:
        main(["plan", "-f", str(cluster), "--config", str(config)], backend=Untouchable())
    assert exited.value.code == 1 and "argument --node-ip" in capsys.readouterr().err


def test_help_lists_every_command_in_plain_text_and_version_prints(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    assert all(name in text for name in ("plan", "sync", "run", "cleanup")) and "``" not in text
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.startswith("svcproxy ")


def test_valid_addresses_in_every_spelling_pass(cluster: Path) -> None:
    out = io.StringIO()
    code = main(["plan", "-f", str(cluster), "--node-ip", "fd00::0:1", "--node-ip", "192.168.0.10",
                 "--exclude-cidrs", "10.0.0.0/8, fd00::/64,192.168.1.1"], backend=MemoryBackend(), out=out)
    assert code == 2


@pytest.mark.parametrize("content, words", [
    (b"\xbd\x00\xff binary", "cannot read configuration file"),
    (b"a: " + b"[" * 3000 + b"]" * 3000 + b"\n", "nesting depth"),
    (b"a: &a [x, x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
     b"c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
     b"e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]\n",
     "aliases expand"),
])
def test_a_hostile_config_file_is_one_error_line(content: bytes, words: str, cluster: Path, tmp_path: Path) -> None:
    config = tmp_path / "svcproxy.yaml"
    config.write_bytes(content)
    code, out, err = run(["plan", "-f", str(cluster), "--config", str(config)], Untouchable())
    assert code == 1 and words in err and err.count("\n") == 1 and "Traceback" not in err


def test_current_file_errors_name_the_file_and_a_cut_last_line_is_refused(cluster: Path, tmp_path: Path) -> None:
    saved = tmp_path / "ipvs.save"
    saved.write_text("-A -t 10.0.0.1:80 -s rr\n-a -t 10.0.0.1:80 -r 10.1.1.1:8")  # cut inside "8080"
    code, _, err = run(["plan", "-f", str(cluster), "--current-file", str(saved)], Untouchable())
    assert code == 1 and f"--current-file {saved}" in err and "no newline" in err
    saved.write_text("-A -t 10.0.0.1:80 -s rr\n-a -t 10.0.0.1:80 -r 10.1.1.1:x -m\n")
    code, _, err = run(["plan", "-f", str(cluster), "--current-file", str(saved)], Untouchable())
    assert code == 1 and f"--current-file {saved}: line 2" in err


@pytest.mark.parametrize("content", [b"apiVersion: v1\nkind: Config\nclusters: [ {\n", b"\x96\xff\x00", b"[]\n"])
def test_a_broken_kubeconfig_is_one_line_before_anything_starts(content: bytes, tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_bytes(content)
    proc = subprocess.run([sys.executable, "-m", "svcproxy", "run", "--kubeconfig", str(kubeconfig), "--node", "n",
                           "--health-bind", "127.0.0.1:0", "--cni-socket", ""], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "kubeconfig" in proc.stderr
    assert "Traceback" not in proc.stderr


ORIGINS = """\
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Service
  metadata: {name: dns, namespace: kube-system}
  spec:
    clusterIP: 10.96.0.10
    clusterIPs: [10.96.0.10, "fd00:10:96::a"]
    ipFamilies: [IPv4, IPv6]
    ports: [{name: dns, port: 53, protocol: UDP}, {name: dns-tcp, port: 53, protocol: TCP}]
- apiVersion: v1
  kind: Service
  metadata: {name: lb, namespace: shop}
  spec:
    type: LoadBalancer
    clusterIP: 10.96.0.9
    clusterIPs: [10.96.0.9]
    externalIPs: [198.51.100.7]
    ports: [{port: 443, protocol: TCP, nodePort: 30443}]
  status: {loadBalancer: {ingress: [{ip: 203.0.113.9}]}}
- apiVersion: v1
  kind: Service
  metadata: {name: big, namespace: shop}
  spec:
    clusterIP: 10.96.0.100
    clusterIPs: [10.96.0.100]
    ports: [{name: http, port: 80, protocol: TCP}]
"""


def test_plan_names_each_virtual_service_and_orders_addresses_numerically(tmp_path: Path) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text(ORIGINS)
    code, out, _ = run(["plan", "-f", str(path), "--node", "node-a", "--node-ip", "192.168.49.2"], MemoryBackend())
    assert code == 2
    heads = [line for line in out.splitlines() if line.startswith("+ ") and "->" not in line]
    assert heads == [
        "+ TCP  10.96.0.9:443  rr  # shop/lb:443 ClusterIP",
        "+ TCP  10.96.0.10:53  rr  # kube-system/dns:dns-tcp ClusterIP",
        "+ UDP  10.96.0.10:53  rr  # kube-system/dns:dns ClusterIP",
        "+ TCP  10.96.0.100:80  rr  # shop/big:http ClusterIP",
        "+ TCP  192.168.49.2:30443  rr  # shop/lb:443 NodePort",
        "+ TCP  198.51.100.7:443  rr  # shop/lb:443 externalIP",
        "+ TCP  203.0.113.9:443  rr  # shop/lb:443 LoadBalancer",
        "+ TCP  [fd00:10:96::a]:53  rr  # kube-system/dns:dns-tcp ClusterIP",
        "+ UDP  [fd00:10:96::a]:53  rr  # kube-system/dns:dns ClusterIP",
    ]
    code, out, _ = run(["plan", "-f", str(path), "--node", "node-a", "--node-ip", "192.168.49.2", "-o", "json"],
                       MemoryBackend())
    doc = json.loads(out)
    assert doc["version"] == 1
    assert [(s["address"], s["protocol"], s["origin"][0]["kind"]) for s in doc["services"]][4:7] == [
        ("192.168.49.2", "TCP", "NodePort"), ("198.51.100.7", "TCP", "externalIP"),
        ("203.0.113.9", "TCP", "LoadBalancer")]
    assert doc["services"][0]["origin"] == [{"namespace": "shop", "name": "lb", "port": "443", "kind": "ClusterIP"}]
