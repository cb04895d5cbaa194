"""``--pod-netns-mode kernel`` end to end: svcproxy's share-namespace IPVS module
loaded with ``mode=2`` (kernel/, built by tools/build-ipvs-module), in the VM.

These tests need a VM booted with the built modules in place of the stock ones
(``make test`` does that: ``VMTEST_IPVS_MODULES=DIR VMTEST_IPVS_MODE=2 tools/vmtest``,
which passes both variables to the guest). Anywhere else they are skipped, saying
why; in a boot that was meant to have the module in mode 2, its absence fails them.

Topology (module-wide)::

    node = the VM's root namespace (mode 2 shares ITS table)  10.244.0.2
      │ veth
    vpc (a router namespace) ──veth── pod-a 10.244.10.2, pod-b .11.2, pod-c .12.2 (backends)
                             └─veth── client Pods 10.244.N.2 (their own "NIC", default route)

svcproxy runs in the root namespace and programs only its table; client Pods have no
IPVS rules, routes or sysctls of their own, and reach every ClusterIP through the
node's table. The root namespace gets a route to the ClusterIP range via the VPC for
the node's own traffic; the fixture removes it and flushes the table at the end.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest

from k8s_objects import endpoint, endpoint_slice, node, service, slice_port, svc_port

from .netns import (NETNS_DIR, Pod, HELPER_PYTHON, Lab, Reply, default_route, ipvsadm, netns_add, netns_delete, ns_cmd,
                    request, request_many, run, sysctl, wait_until)

pytestmark = pytest.mark.kernel

MODE_PARAM = Path("/sys/module/ip_vs/parameters/mode")
SVCPROXY = [sys.executable, "-m", "svcproxy"]
NODE_IP, NODE_IP6, GW, GW6 = "10.244.0.2", "fd00:244::2", "10.244.0.1", "fd00:244::1"
COMMON = ["--node", "node-a", "--node-ip", NODE_IP]
HTTP_PORT, UDP_PORT = 8080, 5353
VIP, VIP6 = "10.96.0.10", "fd00:96::10"
PROTO = "0x9c"  # svcproxy's route protocol (replicate mode's VIP routes)
IPVS_MODULES = ("ip_vs_ftp", "ip_vs_pe_sip", "ip_vs_rr", "ip_vs_wrr", "ip_vs_lc", "ip_vs_wlc", "ip_vs_sh",
                "ip_vs_dh", "ip_vs_mh", "ip_vs_sed", "ip_vs_nq", "ip_vs_lblc", "ip_vs_lblcr", "ip_vs_fo",
                "ip_vs_ovf", "ip_vs_twos", "ip_vs")


def loaded_mode() -> str | None:
    try:
        return MODE_PARAM.read_text().strip()
    except OSError:
        return None


@pytest.fixture(scope="module", autouse=True)
def share_ns_ipvs() -> None:
    mode = loaded_mode()
    if mode == "2":
        return
    why = (f"needs svcproxy's share-namespace ip_vs loaded with mode=2 ({MODE_PARAM} "
           f"{'reads ' + repr(mode) if mode is not None else 'does not exist: stock ip_vs'}); "
           "make test boots a VM for it: VMTEST_IPVS_MODULES=DIR VMTEST_IPVS_MODE=2 tools/vmtest")
    if os.environ.get("VMTEST_IPVS_MODULES") and os.environ.get("VMTEST_IPVS_MODE") == "2":
        pytest.fail("this VM was booted for kernel mode, but it " + why.removeprefix("needs "))
    pytest.skip(why)


@dataclass
class Net:
    vpc: str
    pods: dict[str, Pod]  # the backends


_subnets = itertools.count(100)


def add_pod(lab: Lab, vpc: str, name: str, *, n: int | None = None, servers: bool = False) -> Pod:
    """A Pod namespace with its own veth "NIC" into the VPC and default routes via it."""
    n = next(_subnets) if n is None else n
    ns = lab.netns()
    pod = Pod(name, ns, f"10.244.{n}.2", f"fd00:244:{n}::2")
    lab.connect(ns, vpc, [f"{pod.ip4}/24", f"{pod.ip6}/64"], [f"10.244.{n}.1/24", f"fd00:244:{n}::1/64"])
    default_route(ns, f"10.244.{n}.1")
    default_route(ns, f"fd00:244:{n}::1")
    if servers:
        lab.server(ns, name, proto="http", port=HTTP_PORT)
        lab.server(ns, name, proto="udp", port=UDP_PORT)
    return pod


def _root_routes(action: str) -> None:
    for cmd in (["ip", "route", action, "10.244.0.0/16", "via", GW],
                ["ip", "route", action, "10.96.0.0/16", "via", GW],
                ["ip", "-6", "route", action, "fd00:244::/32", "via", GW6],
                ["ip", "-6", "route", action, "fd00:96::/64", "via", GW6]):
        run(cmd, check=action == "add")


@pytest.fixture(scope="module")
def net(share_ns_ipvs: None) -> Iterator[Net]:
    with Lab() as lab:
        vpc = lab.netns()
        sysctl(vpc, "net.ipv4.ip_forward", 1, net__ipv6__conf__all__forwarding=1)
        lab.connect(None, vpc, [f"{NODE_IP}/24", f"{NODE_IP6}/64"], [f"{GW}/24", f"{GW6}/64"])
        _root_routes("add")
        try:
            pods = {name: add_pod(lab, vpc, name, n=10 + i, servers=True)
                    for i, name in enumerate(("pod-a", "pod-b", "pod-c"))}
            yield Net(vpc, pods)
        finally:
            ipvsadm(None, "-C")
            _root_routes("del")


@pytest.fixture(autouse=True)
def _empty_node_table(share_ns_ipvs: None) -> Iterator[None]:
    yield
    ipvsadm(None, "-C")


def web(backends: list[Pod], *, vip: str = VIP, vip6: str | None = VIP6, name: str = "web",
        affinity: bool = False) -> list[dict[str, Any]]:
    """Service NAME (TCP 80 -> 8080, UDP 53 -> 5353), dual-stack unless vip6 is None."""
    ports = [svc_port("http", 80, target_port=HTTP_PORT), svc_port("dns", 53, "UDP", target_port=UDP_PORT)]
    sports = [slice_port("http", HTTP_PORT), slice_port("dns", UDP_PORT, "UDP")]
    objs = [
        service(name, cluster_ips=(vip, vip6) if vip6 else (vip,), ports=ports,
                session_affinity="ClientIP" if affinity else "None"),
        endpoint_slice(name, f"{name}-v4", ports=sports, endpoints=[endpoint(p.ip4, pod=p.name) for p in backends]),
    ]
    if vip6:
        objs.append(endpoint_slice(name, f"{name}-v6", address_type="IPv6", ports=sports,
                                   endpoints=[endpoint(p.ip6, pod=p.name) for p in backends]))
    return objs


def write_cluster(path: Path, objs: list[dict[str, Any]]) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": [node("node-a"), *objs]}))
    tmp.replace(path)
    return path


def sync(cluster: Path, *pods: Pod, extra: tuple[str, ...] = (), expect_rc: int = 0, command: str = "sync") -> str:
    """``svcproxy sync`` (or plan) in the node (root) namespace, --pod-netns for each Pod."""
    args = [a for p in pods for a in ("--pod-netns", p.path)]
    cp = run([*SVCPROXY, command, "-f", str(cluster), *COMMON, *args, *extra], check=False, timeout=900)
    out = cp.stdout + cp.stderr
    assert cp.returncode == expect_rc, f"{command} exit {cp.returncode}:\n{out}"
    return out


def answered(replies: list[Reply]) -> Counter[str]:
    bad = [r.error for r in replies if not r.ok]
    assert not bad, f"{len(bad)} of {len(replies)} requests failed: {bad[:3]}"
    return Counter(r.text for r in replies)


def untouched(pod: Pod) -> None:
    """svcproxy programmed nothing in the Pod's namespace: no routes of its own, no
    addresses but the NIC's, loopback as the namespace made it."""
    assert run(["ip", "route", "show", "table", "all", "proto", PROTO], ns=pod.ns).stdout == ""
    assert run(["ip", "-6", "route", "show", "table", "all", "proto", PROTO], ns=pod.ns).stdout == ""
    assert VIP not in run(["ip", "addr"], ns=pod.ns).stdout
    assert ipvsadm(pod.ns, "-Sn").strip() == ""  # a Pod namespace's own (unused) table


# --------------------------------------------------------------------------------------
# svcproxy in kernel mode: the node table only


def test_auto_picks_kernel_and_sync_programs_only_the_node_table(net: Net, lab: Lab, tmp_path: Path) -> None:
    c = add_pod(lab, net.vpc, "c")
    cluster = write_cluster(tmp_path / "c.json", web([net.pods["pod-a"], net.pods["pod-b"]]))

    planned = sync(cluster, c, command="plan", expect_rc=2)
    assert f"# Pod network namespace {c.path}: shares the node's table (kernel mode), nothing to program" \
        in planned, planned
    out = sync(cluster, c)  # --pod-netns-mode auto, the default

    assert "Pod network namespace mode kernel: programming the node table only" in out, out
    assert "(auto)" in out and f"{MODE_PARAM} reads '2'" in out, out
    assert f"sync netns {c.path}: shares the node's table (kernel mode), nothing to program" in out, out
    assert "sync: 12 operations applied, 0 failed" in out, out  # 4 virtual services x 2 real servers
    untouched(c)
    answers = request_many(c.ns, VIP, 80, 4)
    assert answered(answers) == {"pod-a": 2, "pod-b": 2}
    assert {r.client for r in answers} == {c.ip4}  # the Pod's own address reaches the backend
    again = sync(cluster, c)
    assert "sync: 0 operations applied, 0 failed" in again, again

    # replicate would "program" the node's table from inside the Pod: refused, nothing changed
    before = ipvsadm(None, "-Sn")
    refused = sync(write_cluster(tmp_path / "r.json", web([net.pods["pod-c"]])), c,
                   extra=("--pod-netns-mode", "replicate"), expect_rc=1)
    assert "--pod-netns-mode replicate cannot work here" in refused, refused
    assert ipvsadm(None, "-Sn") == before


def test_rr_spreads_over_all_backends_tcp_udp_ipv6(net: Net, lab: Lab, tmp_path: Path) -> None:
    c = add_pod(lab, net.vpc, "c")
    sync(write_cluster(tmp_path / "c.json", web(list(net.pods.values()))))
    everyone = {"pod-a": 2, "pod-b": 2, "pod-c": 2}

    assert answered(request_many(c.ns, VIP, 80, 6)) == everyone
    udp = request_many(c.ns, VIP, 53, 6, proto="udp", payload="hello-udp")
    assert answered(udp) == everyone
    assert all(r.body.endswith("\nhello-udp") for r in udp)
    v6 = request_many(c.ns, VIP6, 80, 6)
    assert answered(v6) == everyone and {r.client for r in v6} == {c.ip6}
    assert answered(request_many(c.ns, VIP6, 53, 6, proto="udp")) == everyone
    untouched(c)


def test_session_affinity_keeps_a_client_on_one_backend(net: Net, lab: Lab, tmp_path: Path) -> None:
    c1, c2 = add_pod(lab, net.vpc, "c1"), add_pod(lab, net.vpc, "c2")
    sync(write_cluster(tmp_path / "c.json", web(list(net.pods.values()), affinity=True)))
    assert "-p 10800" in ipvsadm(None, "-Sn")

    for c in (c1, c2):
        for proto, port in (("http", 80), ("udp", 53)):
            got = answered(request_many(c.ns, VIP, port, 5, proto=proto))
            assert len(got) == 1 and sum(got.values()) == 5, (c, proto, got)


def test_a_removed_endpoint_stops_getting_traffic(net: Net, lab: Lab, tmp_path: Path) -> None:
    c = add_pod(lab, net.vpc, "c")
    a, b, gone = net.pods["pod-a"], net.pods["pod-b"], net.pods["pod-c"]
    sync(write_cluster(tmp_path / "c.json", web([a, b, gone], vip6=None)))
    assert answered(request_many(c.ns, VIP, 80, 3)) == {"pod-a": 1, "pod-b": 1, "pod-c": 1}

    sync(write_cluster(tmp_path / "c.json", web([a, b], vip6=None)))

    assert gone.ip4 not in ipvsadm(None, "-Sn")
    assert answered(request_many(c.ns, VIP, 80, 6)) == {"pod-a": 3, "pod-b": 3}
    assert answered(request_many(c.ns, VIP, 53, 6, proto="udp")) == {"pod-a": 3, "pod-b": 3}


def test_pod_reaches_itself_through_its_own_service(net: Net, lab: Lab, tmp_path: Path) -> None:
    """The kernel delivers a packet DNATed to the Pod's own address on loopback (no
    VIP routes: the stock kernel would send it out of the NIC)."""
    me = add_pod(lab, net.vpc, "me", servers=True)
    a = net.pods["pod-a"]
    sync(write_cluster(tmp_path / "c.json", [*web([me], vip="10.96.0.20", vip6="fd00:96::20", name="self"),
                                            *web([me, a], vip="10.96.0.30", vip6="fd00:96::30", name="mixed")]))

    only = request_many(me.ns, "10.96.0.20", 80, 3)
    assert answered(only) == {"me": 3}
    assert {(r.client, r.server) for r in only} == {(me.ip4, me.ip4)}
    assert answered(request_many(me.ns, "fd00:96::20", 80, 2)) == {"me": 2}
    assert answered(request_many(me.ns, "10.96.0.20", 53, 2, proto="udp")) == {"me": 2}
    assert answered(request_many(me.ns, "10.96.0.30", 80, 6)) == {"me": 3, "pod-a": 3}
    assert answered(request_many(me.ns, "fd00:96::30", 80, 4)) == {"me": 2, "pod-a": 2}
    assert answered(request_many(me.ns, "10.96.0.30", 53, 4, proto="udp")) == {"me": 2, "pod-a": 2}
    untouched(me)


SAME_PORT_CLIENT = r"""
import socket, sys
host, port, sport, proto = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM if proto == "udp" else socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.settimeout(20)
s.bind(("", sport))
s.connect((host, port))
if proto == "udp":
    s.send(b"ping")
    print(s.recv(65536).decode().split("\n")[0], flush=True)
else:
    s.sendall(b"GET / HTTP/1.0\r\n\r\n")
    data = b""
    while True:
        c = s.recv(65536)
        if not c:
            break
        data += c
    print(data.partition(b"\r\n\r\n")[2].decode().split("\n")[0], flush=True)
sys.stdin.readline()  # hold the socket (and its IPVS connection) until told to go
"""


def test_two_pods_use_the_same_source_port_at_once(net: Net, lab: Lab, tmp_path: Path) -> None:
    """The connection table is the node's, shared by every namespace: two Pods'
    connections with the same source port are two entries, each answered."""
    c1, c2 = add_pod(lab, net.vpc, "c1"), add_pod(lab, net.vpc, "c2")
    sync(write_cluster(tmp_path / "c.json", web(list(net.pods.values()), vip6=None)))
    for proto, port in (("tcp", 80), ("udp", 53)):
        procs = [subprocess.Popen(ns_cmd(c.ns, [*HELPER_PYTHON, "-c", SAME_PORT_CLIENT, VIP, str(port), "40404",
                                                proto]), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                 for c in (c1, c2)]
        try:
            assert procs[0].stdout is not None and procs[1].stdout is not None
            texts = [p.stdout.readline().strip() for p in procs]  # type: ignore[union-attr]
            assert all(t in net.pods for t in texts), texts
            conns = run(["ipvsadm", "-Lnc"]).stdout
            for c in (c1, c2):
                assert f"{c.ip4}:40404" in conns, conns
        finally:
            for p in procs:
                p.communicate("\n", timeout=30)
        assert [p.returncode for p in procs] == [0, 0]


def test_the_nodes_own_traffic(net: Net, tmp_path: Path) -> None:
    sync(write_cluster(tmp_path / "c.json", web(list(net.pods.values()))))
    replies = request_many(None, VIP, 80, 6)
    assert answered(replies) == {"pod-a": 2, "pod-b": 2, "pod-c": 2}
    assert {r.client for r in replies} == {NODE_IP}
    assert answered(request_many(None, VIP, 53, 3, proto="udp")) == {"pod-a": 1, "pod-b": 1, "pod-c": 1}
    assert answered(request_many(None, VIP6, 80, 3)) == {"pod-a": 1, "pod-b": 1, "pod-c": 1}


def test_cleanup_of_a_pod_namespace_makes_no_ipvs_request_there(net: Net, lab: Lab) -> None:
    """`svcproxy cleanup --pod-netns` in kernel mode. A Pod namespace has no IPVS
    table of its own (its changes are refused with EPERM), so nothing is asked of
    IPVS there; what an earlier replicate mode may have left in it (VIP routes: they
    outlive the ip_vs reload that changed the mode) goes, and nothing else of the Pod
    changes (its IPVS sysctls keep a new namespace's defaults). The node's table is
    cleaned as in any mode, --exclude-cidrs respected."""
    c = add_pod(lab, net.vpc, "c")
    ipvsadm(None, "-R", input=(f"-A -t {VIP}:80 -s rr\n-a -t {VIP}:80 -r {net.pods['pod-a'].ip4}:{HTTP_PORT} -m\n"
                               f"-A -u {VIP}:53 -s rr\n"
                               "-A -t 10.200.0.1:80 -s rr\n"))  # the last one is not svcproxy's
    run(["ip", "route", "add", f"{VIP}/32", "dev", "lo", "proto", PROTO], ns=c.ns)
    run(["ip", "-6", "route", "add", "local", f"{VIP6}/128", "dev", "lo", "proto", PROTO, "table", "main"], ns=c.ns)

    def pod_state() -> tuple[str, str]:
        sysctls = run(["sh", "-c", "grep -rs . /proc/sys/net/ipv4/vs || true"], ns=c.ns).stdout
        return sysctls, run(["ip", "link", "show", "lo"], ns=c.ns).stdout

    state = pod_state()
    assert "net/ipv4/vs/conntrack:0" in state[0], state[0]  # a new namespace's default, as kernel mode leaves it
    cleanup = [*SVCPROXY, "cleanup", "--exclude-cidrs", "10.200.0.0/16", "--pod-netns", c.path,
               "--dummy-device", "svcpx-none0"]  # (--dry-run in kernel mode: tests/test_podns.py)
    done = run(cleanup, check=False, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (f"netns {c.path}: shares the node's table (kernel mode), no virtual services of its own; "
            "removed 2 VIP routes") in done.stdout, done.stdout
    assert "node: removed 2 virtual services" in done.stdout, done.stdout
    assert done.stderr == "", done.stderr
    assert ipvsadm(None, "-Sn").splitlines() == ["-A -t 10.200.0.1:80 -s rr"]
    untouched(c)
    assert pod_state() == state


# --------------------------------------------------------------------------------------
# the agent in kernel mode


def test_agent_programs_only_the_node_table_and_attaches_at_once(net: Net, lab: Lab, tmp_path: Path) -> None:
    """`svcproxy run` against the fake API server, in the root namespace, with a Pod
    named by --pod-netns, one in the scanned directory and one attached over the CNI
    socket: none is programmed, and the CNI attach answers as soon as the node's table is."""
    from .test_agent_vm import FakeApi, Procs

    c_flag, c_scan, c_cni = (add_pod(lab, net.vpc, n) for n in ("flag", "scan", "cni"))
    sock = tmp_path / "run" / "cni.sock"
    procs = Procs()
    try:
        api = FakeApi(procs, "", tmp_path / "state.json", web([net.pods["pod-a"], net.pods["pod-b"]]))
        log = tmp_path / "agent.log"
        with open(log, "w") as f:
            agent = procs.popen(
                [*SVCPROXY, "run", "--node-plumbing", "off", "--kubeconfig", str(api.kubeconfig), *COMMON,
                 "--health-bind", "127.0.0.1:10256", "--healthcheck-bind-host", "127.0.0.1",
                 "--min-sync-period", "0.2", "--sync-period", "2", "--cni-socket", str(sock),
                 "--pod-netns", c_flag.path, "--pod-netns-dir", NETNS_DIR, "--pod-netns-scan-period", "1"],
                stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT)

        def ready() -> bool:
            assert agent.poll() is None, f"agent exited ({agent.returncode}):\n{log.read_text()}"
            return VIP in ipvsadm(None, "-Sn") and sock.exists()

        wait_until(ready, 600, "the agent's first sync and its CNI socket", interval=1.0)
        t0 = time.monotonic()
        answer = talk(sock, {"op": "attach", "netns": c_cni.path, "containerId": "c0ffee", "ifname": "eth0",
                             "pod": {"namespace": "shop", "name": "cni", "uid": "u1", "annotations": {}},
                             "timeout": 60})
        took = time.monotonic() - t0
        assert answer.get("ok") is True, answer
        status = talk(sock, {"op": "status", "netns": c_cni.path})
        assert status.get("state") == "programmed", status
        print(f"CNI attach in kernel mode answered in {took:.2f}s ({answer})")
        text = log.read_text()
        assert "Pod network namespace mode kernel" in text and "(auto)" in text, text
        assert "kernel mode, nothing to attach for" in text, text
        assert "Traceback" not in text, text
        for c in (c_flag, c_scan, c_cni):
            untouched(c)
            assert answered(request_many(c.ns, VIP, 80, 2)) == {"pod-a": 1, "pod-b": 1}
        assert answered(request_many(c_cni.ns, VIP6, 53, 2, proto="udp")) == {"pod-a": 1, "pod-b": 1}
    finally:
        procs.close()


def talk(sock: Path, req: dict[str, Any]) -> dict[str, Any]:
    import socket

    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(90)
        s.connect(str(sock))
        s.sendall(json.dumps(req).encode() + b"\n")
        return dict(json.loads(s.makefile("rb").readline()))


# --------------------------------------------------------------------------------------
# namespaces coming and going; the module going


LOAD = r"""
import select, socket, sys
host, port = sys.argv[1], int(sys.argv[2])
ok = failed = 0
while not select.select([sys.stdin], [], [], 0)[0]:  # until stdin says stop (or closes)
    try:
        with socket.create_connection((host, port), timeout=5) as s:
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            while s.recv(65536):
                pass
        ok += 1
    except OSError as e:
        failed += 1
        print("error", e, flush=True)
print("ok", ok, "failed", failed, flush=True)
"""


def test_namespaces_created_and_deleted_under_load(net: Net, lab: Lab, tmp_path: Path) -> None:
    """Every namespace registers IPVS hooks in mode 2, and unregisters them as it goes:
    while a Pod sends requests without pause, 10 more Pods are made, used and deleted."""
    c = add_pod(lab, net.vpc, "busy")
    sync(write_cluster(tmp_path / "c.json", web(list(net.pods.values()), vip6=None)))
    load = subprocess.Popen(ns_cmd(c.ns, [*HELPER_PYTHON, "-c", LOAD, VIP, "80"]),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        for i in range(10):
            extra = Lab()
            try:
                p = add_pod(extra, net.vpc, f"churn{i}")
                if i % 2 == 0:  # some of them use the Service before they go
                    assert request(p.ns, VIP, 80).text in net.pods
            finally:
                extra.close()
        bare = [netns_add() for _ in range(5)]  # never configured at all
        for name in bare:
            netns_delete(name)
    finally:
        out, _ = load.communicate("stop\n", timeout=120)
    assert load.returncode == 0, out
    last = out.strip().splitlines()[-1].split()
    assert last[0] == "ok" and int(last[1]) > 0 and last[3] == "0", out


def test_unload_with_namespaces_alive(net: Net, lab: Lab, tmp_path: Path) -> None:
    """rmmod of every IPVS module while Pod namespaces (with hooks, and connections in
    the table) are alive; then the namespaces go. The kernel log must stay clean (the
    suite's check), and the modules come back as they were for whatever runs next."""
    pods = [add_pod(lab, net.vpc, f"u{i}") for i in range(3)]
    sync(write_cluster(tmp_path / "c.json", web(list(net.pods.values()))))
    for p in pods:
        answered(request_many(p.ns, VIP, 80, 2))
        answered(request_many(p.ns, VIP, 53, 1, proto="udp"))
    assert "10.96.0.10" in run(["ipvsadm", "-Lnc"]).stdout
    ipvsadm(None, "-C")  # a service holds its scheduler module
    loaded = [m for m in IPVS_MODULES if Path(f"/sys/module/{m}").exists()]
    params = {p.name: p.read_text().strip() for p in Path("/sys/module/ip_vs/parameters").iterdir()}

    for m in loaded:
        cp = run(["rmmod", m], check=False)
        assert cp.returncode == 0, f"rmmod {m}: {cp.stderr}"
    assert not Path("/sys/module/ip_vs").exists()
    for p in pods:  # the namespaces outlive the module and still work without it
        assert run(["ip", "link", "show", "lo"], ns=p.ns).returncode == 0
    lab.close()  # namespaces deleted with no IPVS loaded

    reload_ipvs(loaded, params)
    assert loaded_mode() == params.get("mode")


def reload_ipvs(modules: list[str], params: dict[str, str]) -> None:
    """Load the same modules again: from VMTEST_IPVS_MODULES (the built ones, as
    tools/vmtest loaded them) if set, else with modprobe; ip_vs first, with its ``mode``."""
    directory = os.environ.get("VMTEST_IPVS_MODULES")
    for m in reversed(modules):
        args = [f"mode={params['mode']}"] if m == "ip_vs" and "mode" in params else []
        if directory:
            ko = Path(directory) / f"{m}.ko"
            cmd = ["insmod", str(ko), *args]
        else:
            cmd = ["modprobe", m, *args]
        cp = run(cmd, check=False)
        assert cp.returncode == 0, f"{' '.join(cmd)}: {cp.stderr}"
