"""Share-NS in replicate mode, end to end on a stock kernel (in the VM).

Topology (module-wide; each test adds the client Pods it needs)::

    node (svcproxy runs here)     vpc ──veth── pod-a   10.244.10.2  fd00:244:10::2
                                   │ ──veth── pod-b   10.244.11.2  fd00:244:11::2
                                   └ ──veth── client Pods 10.244.N.2 (own "NIC" each)

``vpc`` stands for the cloud network: a routing namespace. Client Pods have only
their own veth into it and default routes via it, so their traffic never passes the
node namespace, whose IPVS table (programmed too) is of no use to them. svcproxy runs
in the ``node`` namespace (never the VM's root namespace) with
``--pod-netns /var/run/netns/CLIENT``, and programs each client's own table.

Each pitfall of docs/share-ns.md has a test here: VIP routes and source address
(pitfalls 2/3), a Pod reaching itself (4), conntrack and INVALID-drop rules (5),
loopback down in a fresh namespace, fan-out and 50 namespaces (6), a namespace
deleted mid-sync, an agent restart re-adopting namespaces, and kernel mode's refusal
on this stock kernel.
"""

from __future__ import annotations

import itertools
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest

from k8s_objects import endpoint, endpoint_slice, node, service, slice_port, svc_port

from .netns import NETNS_DIR, Pod, Lab, Reply, curl, default_route, ipvsadm, ns_cmd, request, request_many, run, sysctl, sysctl_get, wait_until

pytestmark = pytest.mark.kernel

SVCPROXY = [sys.executable, "-m", "svcproxy"]
COMMON = ["--node", "node-a", "--node-ip", "192.168.49.2"]
HTTP_PORT, UDP_PORT = 8080, 5353
VIP, VIP6, SELF_VIP, MIXED_VIP = "10.96.0.10", "fd00:96::10", "10.96.0.20", "10.96.0.30"
PROTO = "0x9c"
HEALTH = "127.0.0.1:10256"  # inside the node namespace
START_TIMEOUT = 180.0


@dataclass
class Vpc:
    vpc: str
    node: str
    pods: dict[str, Pod]


_subnets = itertools.count(100)


def add_pod(lab: Lab, vpc: str, name: str, *, servers: bool = False) -> Pod:
    """A Pod namespace with its own veth "NIC" into the VPC and default routes via it."""
    n = next(_subnets)
    ns = lab.netns()
    pod = Pod(name, ns, f"10.244.{n}.2", f"fd00:244:{n}::2")
    lab.connect(ns, vpc, [f"{pod.ip4}/24", f"{pod.ip6}/64"], [f"10.244.{n}.1/24", f"fd00:244:{n}::1/64"])
    default_route(ns, f"10.244.{n}.1")
    default_route(ns, f"fd00:244:{n}::1")
    if servers:
        lab.server(ns, name, proto="http", port=HTTP_PORT)
        lab.server(ns, name, proto="udp", port=UDP_PORT)
    return pod


@pytest.fixture(scope="module")
def vpc() -> Iterator[Vpc]:
    with Lab() as lab:
        router = lab.netns()
        sysctl(router, "net.ipv4.ip_forward", 1, net__ipv6__conf__all__forwarding=1)
        node_ns = lab.netns()
        pods = {}
        for i, name in enumerate(("pod-a", "pod-b")):
            n = 10 + i
            ns = lab.netns()
            lab.connect(ns, router, [f"10.244.{n}.2/24", f"fd00:244:{n}::2/64"],
                        [f"10.244.{n}.1/24", f"fd00:244:{n}::1/64"])
            default_route(ns, f"10.244.{n}.1")
            default_route(ns, f"fd00:244:{n}::1")
            lab.server(ns, name, proto="http", port=HTTP_PORT)
            lab.server(ns, name, proto="udp", port=UDP_PORT)
            pods[name] = Pod(name, ns, f"10.244.{n}.2", f"fd00:244:{n}::2")
        yield Vpc(router, node_ns, pods)


def web(backends: list[Pod], *, vip: str = VIP, vip6: str | None = VIP6, name: str = "web") -> list[dict[str, Any]]:
    """Service NAME (TCP 80 -> 8080, UDP 53 -> 5353), dual-stack unless vip6 is None."""
    ports = [svc_port("http", 80, target_port=HTTP_PORT), svc_port("dns", 53, "UDP", target_port=UDP_PORT)]
    sports = [slice_port("http", HTTP_PORT), slice_port("dns", UDP_PORT, "UDP")]
    objs = [
        service(name, cluster_ips=(vip, vip6) if vip6 else (vip,), ports=ports),
        endpoint_slice(name, f"{name}-v4", ports=sports, endpoints=[endpoint(p.ip4, pod=p.name) for p in backends]),
    ]
    if vip6:
        objs.append(endpoint_slice(name, f"{name}-v6", address_type="IPv6", ports=sports,
                                   endpoints=[endpoint(p.ip6, pod=p.name) for p in backends]))
    return objs


def write_cluster(path: Path, objs: list[dict[str, Any]]) -> Path:
    import json

    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": [node("node-a"), *objs]}))
    tmp.replace(path)
    return path


def svcproxy(ns: str, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return run([*SVCPROXY, *args], ns=ns, check=False, timeout=timeout)


def sync(v: Vpc, cluster: Path, *pods: Pod | str, extra: tuple[str, ...] = (), expect_rc: int = 0) -> str:
    """``svcproxy sync`` in the node namespace with --pod-netns for each Pod."""
    args = [a for p in pods for a in ("--pod-netns", p.path if isinstance(p, Pod) else p)]
    cp = svcproxy(v.node, "sync", "-f", str(cluster), *COMMON, *args, *extra)
    assert cp.returncode == expect_rc, f"sync exit {cp.returncode}:\n{cp.stdout}\n{cp.stderr}"
    return cp.stdout + cp.stderr


def answered(replies: list[Reply]) -> Counter[str]:
    bad = [r.error for r in replies if not r.ok]
    assert not bad, f"{len(bad)} of {len(replies)} requests failed: {bad[:3]}"
    return Counter(r.text for r in replies)


def routes(ns: str) -> str:
    return run(["ip", "route", "show", "table", "all", "proto", PROTO], ns=ns).stdout


# --------------------------------------------------------------------------------------
# replicate mode: one-shot sync


def test_cluster_ip_works_from_attached_pods_only(vpc: Vpc, lab: Lab, tmp_path: Path) -> None:
    a, b = vpc.pods["pod-a"], vpc.pods["pod-b"]
    c1, c2, other = (add_pod(lab, vpc.vpc, n) for n in ("c1", "c2", "unattached"))
    cluster = write_cluster(tmp_path / "c.json", web([a, b]))

    out = sync(vpc, cluster, c1, c2)

    # TCP and UDP, IPv4 and IPv6: 4 virtual services with 2 real servers each
    assert f"sync netns {c1.path}: 12 operations applied, 0 failed" in out, out
    assert f"sync netns {c2.path}: 12 operations applied, 0 failed" in out, out
    for c in (c1, c2):
        replies = request_many(c.ns, VIP, 80, 6)
        assert answered(replies) == {"pod-a": 3, "pod-b": 3}
        assert {r.client for r in replies} == {c.ip4}  # pitfall 3: the Pod's address, not the VIP
        v6 = request_many(c.ns, VIP6, 80, 2)
        assert answered(v6) == {"pod-a": 1, "pod-b": 1} and {r.client for r in v6} == {c.ip6}
        # pitfall 2/3: VIPs routed via lo with the Pod's address as source, bound nowhere
        table = routes(c.ns)
        assert f"{VIP} dev lo " in table and f"src {c.ip4}" in table, table
        assert f"local {VIP6} dev lo " in run(["ip", "-6", "route", "show", "table", "all", "proto", PROTO],
                                              ns=c.ns).stdout
        assert VIP not in run(["ip", "addr"], ns=c.ns).stdout
        # pitfall 1: kube-proxy's IPVS sysctls, per namespace
        assert sysctl_get(c.ns, "net.ipv4.vs.conntrack") == "1"
        assert sysctl_get(c.ns, "net.ipv4.vs.expire_nodest_conn") == "1"
        assert sysctl_get(c.ns, "net.ipv4.vs.expire_quiescent_template") == "1"
    # the control: a Pod namespace that is not attached has no ClusterIP
    assert not request(other.ns, VIP, 80, timeout=2, check=False).ok
    assert "10.96.0.10:80" in ipvsadm(vpc.node, "-Sn")  # the node's own table is programmed too
    # a second sync changes nothing anywhere
    again = sync(vpc, cluster, c1, c2)
    assert f"sync netns {c1.path}: 0 operations applied, 0 failed" in again, again


def test_pod_reaches_itself_through_its_own_service(vpc: Vpc, lab: Lab, tmp_path: Path) -> None:
    """Pitfall 4: the Pod as the only backend of a Service, and among others."""
    me = add_pod(lab, vpc.vpc, "me", servers=True)
    a = vpc.pods["pod-a"]
    cluster = write_cluster(tmp_path / "c.json", [*web([me], vip=SELF_VIP, vip6="fd00:96::20", name="self"),
                                                 *web([me, a], vip=MIXED_VIP, vip6="fd00:96::30", name="mixed")])
    sync(vpc, cluster, me)

    only = request_many(me.ns, SELF_VIP, 80, 3)
    assert answered(only) == {"me": 3}
    assert {(r.client, r.server) for r in only} == {(me.ip4, me.ip4)}
    assert answered(request_many(me.ns, "fd00:96::20", 80, 2)) == {"me": 2}
    assert answered(request_many(me.ns, SELF_VIP, 53, 2, proto="udp")) == {"me": 2}
    assert answered(request_many(me.ns, MIXED_VIP, 80, 6)) == {"me": 3, "pod-a": 3}
    assert answered(request_many(me.ns, "fd00:96::30", 80, 4)) == {"me": 2, "pod-a": 2}
    assert answered(request_many(me.ns, MIXED_VIP, 53, 4, proto="udp")) == {"me": 2, "pod-a": 2}
    # the control: without svcproxy's VIP routes (default route only) the stock
    # kernel sends the packet DNATed to the Pod's own address out of its NIC
    run(["ip", "route", "flush", "proto", PROTO], ns=me.ns)
    assert not request(me.ns, SELF_VIP, 80, timeout=2, check=False).ok
    sync(vpc, cluster, me)  # puts the routes back
    assert answered(request_many(me.ns, SELF_VIP, 80, 1)) == {"me": 1}


def test_udp_and_invalid_drop_rules_in_the_pod(vpc: Vpc, lab: Lab, tmp_path: Path) -> None:
    """Pitfall 5: Pod-side `ctstate INVALID -j DROP` rules still let replies in,
    because svcproxy sets net.ipv4.vs.conntrack=1 in the namespace."""
    me = add_pod(lab, vpc.vpc, "strict", servers=True)
    for tool in ("iptables", "ip6tables"):
        for chain in ("INPUT", "OUTPUT"):
            run([tool, "-A", chain, "-m", "conntrack", "--ctstate", "INVALID", "-j", "DROP"], ns=me.ns)
    cluster = write_cluster(tmp_path / "c.json", [*web([vpc.pods["pod-a"], vpc.pods["pod-b"]]),
                                                 *web([me], vip=SELF_VIP, vip6=None, name="self")])
    sync(vpc, cluster, me)

    assert answered(request_many(me.ns, VIP, 80, 4)) == {"pod-a": 2, "pod-b": 2}
    udp = request_many(me.ns, VIP, 53, 4, proto="udp", payload="hello-udp")
    assert answered(udp) == {"pod-a": 2, "pod-b": 2}
    assert all(r.body.endswith("\nhello-udp") for r in udp)
    assert answered(request_many(me.ns, VIP6, 53, 2, proto="udp")) == {"pod-a": 1, "pod-b": 1}
    assert answered(request_many(me.ns, SELF_VIP, 80, 2)) == {"strict": 2}
    # the control: with the namespace's default (conntrack=0 in a new namespace)
    # the replies are INVALID and dropped
    sysctl(me.ns, "net.ipv4.vs.conntrack", 0)
    assert not request(me.ns, VIP, 80, timeout=2, check=False).ok
    sync(vpc, cluster, me)  # a new svcproxy process reads the namespace and repairs it
    assert sysctl_get(me.ns, "net.ipv4.vs.conntrack") == "1"
    assert answered(request_many(me.ns, VIP, 80, 2)) == {"pod-a": 1, "pod-b": 1}


def test_fresh_namespace_with_loopback_down(vpc: Vpc, lab: Lab, tmp_path: Path) -> None:
    """A namespace nobody configured (lo down, no address, not even a local routing
    table): IPVS refuses IPv4 real servers there until lo is up."""
    fresh = [f"svct-{n}-fresh" for n in (next(_subnets), next(_subnets))]
    for name in fresh:
        run(["ip", "netns", "add", name])
        lab.namespaces.append(name)
    ipvsadm(fresh[0], "-A", "-t", "10.96.0.1:80")
    refused = run(["ipvsadm", "-a", "-t", "10.96.0.1:80", "-r", "10.244.10.2:8080", "-m"], ns=fresh[0], check=False)
    # the control: without preparation (observed: exit 255, "Invalid operation.  Possibly
    # wrong module version, address not unicast, ...")
    assert refused.returncode != 0 and "not unicast" in refused.stderr, refused
    ipvsadm(fresh[0], "-C")
    cluster = write_cluster(tmp_path / "c.json", web([vpc.pods["pod-a"]], vip6=None))

    out = sync(vpc, cluster, *(f"{NETNS_DIR}/{n}" for n in fresh))

    for name in fresh:
        assert f"sync netns {NETNS_DIR}/{name}: 4 operations applied, 0 failed" in out, out
        assert "state UNKNOWN" in run(["ip", "link", "show", "lo"], ns=name).stdout  # up
        assert "10.244.10.2:8080" in ipvsadm(name, "-Sn")
        assert routes(name) == ""  # no address of its own: nothing to route from


def test_fifty_namespaces_and_one_deleted_mid_sync(vpc: Vpc, lab: Lab, tmp_path: Path) -> None:
    """Pitfall 6 at a small scale: 50 namespaces in one sync, timed; one of them is
    deleted while the sync runs (by the ipvsadm wrapper, at its 20th -R), which is
    reported as gone, not as an error, and the others are not affected."""
    names = [lab.netns() for _ in range(50)]
    victim = names[40]
    wrapper = tmp_path / "ipvsadm"
    count = tmp_path / "count"
    count.write_text("0")
    wrapper.write_text(
        "#!/bin/sh\n"
        'case "$1" in -R)\n'
        f'  n=$(cat {count}); echo $((n+1)) > {count}\n'
        f'  if [ "$n" = 20 ]; then ip netns delete {victim}; fi;;\n'
        "esac\n"
        'exec ipvsadm "$@"\n')
    wrapper.chmod(0o755)
    cluster = write_cluster(tmp_path / "c.json", web([vpc.pods["pod-a"], vpc.pods["pod-b"]], vip6=None))

    t0 = time.monotonic()
    out = sync(vpc, cluster, *(f"{NETNS_DIR}/{n}" for n in names), extra=("--backend", "ipvsadm", "--ipvsadm", str(wrapper)))
    took = time.monotonic() - t0

    assert f"sync netns {NETNS_DIR}/{victim}: gone, skipped" in out, out
    for name in names:
        if name != victim:
            assert f"sync netns {NETNS_DIR}/{name}: 6 operations applied, 0 failed" in out, out
    for name in (names[0], names[41], names[49]):
        assert ipvsadm(name, "-Sn").count("-a ") == 4
    # a sync of the node table alone, for scale
    t1 = time.monotonic()
    sync(vpc, write_cluster(tmp_path / "n.json", web([vpc.pods["pod-a"]], vip="10.96.0.11", vip6=None)))
    alone = time.monotonic() - t1
    print(f"\nshare-ns: sync of node + 50 namespaces {took:.1f}s; node alone {alone:.1f}s "
          f"(ratio {took / alone:.1f})")


# --------------------------------------------------------------------------------------
# the agent


class Agent:
    """``svcproxy run -f FILE`` in the node namespace, its log in a file."""

    def __init__(self, v: Vpc, cluster: Path, log: Path, *extra: str) -> None:
        self.v, self.log = v, log
        cmd = [*SVCPROXY, "run", "--node-plumbing", "off", "-f", str(cluster), *COMMON, "--health-bind", HEALTH,
               "--healthcheck-bind-host", "127.0.0.1", "--min-sync-period", "0.2", "--sync-period", "3",
               *extra]
        with open(log, "a") as f:
            f.write(f"===== {' '.join(cmd)}\n")
            self.proc = subprocess.Popen(ns_cmd(v.node, cmd), stdin=subprocess.DEVNULL, stdout=f,
                                         stderr=subprocess.STDOUT)

    def text(self) -> str:
        return "===== " + self.log.read_text().split("===== ")[-1]

    def full_syncs(self) -> float:
        assert self.proc.poll() is None, f"agent exited ({self.proc.returncode}):\n{self.text()}"
        cp = curl(self.v.node, f"http://{HEALTH}/metrics", check=False)
        m = re.search(r'^svcproxy_syncs_total\{mode="full"\} (\S+)$', cp.stdout, re.M)
        return float(m.group(1)) if m else 0.0

    def wait_full_syncs(self, n: int) -> None:
        target = self.full_syncs() + n
        wait_until(lambda: self.full_syncs() >= target, START_TIMEOUT, f"{n} more full syncs", interval=1.0)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)


@pytest.fixture
def agents() -> Iterator[list[Agent]]:
    started: list[Agent] = []
    yield started
    for a in started:
        if a.proc.poll() is None:
            a.proc.kill()
        a.proc.wait(timeout=30)


def test_agent_fans_out_changes_and_readopts_after_restart(vpc: Vpc, lab: Lab, tmp_path: Path,
                                                          agents: list[Agent]) -> None:
    a, b = vpc.pods["pod-a"], vpc.pods["pod-b"]
    pods = [add_pod(lab, vpc.vpc, f"p{i}") for i in range(3)]
    scan_dir = tmp_path / "netns"  # the Pods' namespaces only (a DaemonSet scans /var/run/netns)
    scan_dir.mkdir()
    for p in pods:
        (scan_dir / p.ns).symlink_to(p.path)
    cluster = write_cluster(tmp_path / "c.json", web([a], vip6=None))
    log = tmp_path / "agent.log"
    args = ("--pod-netns-dir", str(scan_dir), "--pod-netns-scan-period", "1")
    agents.append(Agent(vpc, cluster, log, *args))
    agent = agents[-1]

    def programmed(p: Pod, backends: int) -> bool:
        return ipvsadm(p.ns, "-Sn").count("-a -t 10.96.0.10:80") == backends

    wait_until(lambda: all(programmed(p, 1) for p in pods), START_TIMEOUT, "the scan to attach 3 namespaces")
    for p in pods:
        assert answered(request_many(p.ns, VIP, 80, 2)) == {"pod-a": 2}

    # one endpoint change: one operation per namespace, not a resync
    before = agent.text()
    write_cluster(cluster, web([a, b], vip6=None))
    wait_until(lambda: all(programmed(p, 2) for p in pods), 60, "the new endpoint in every namespace")
    for p in pods:
        assert answered(request_many(p.ns, VIP, 80, 4)) == {"pod-a": 2, "pod-b": 2}
    wait_until(lambda: agent.text().count("operations applied") - before.count("operations applied") >= 4,
               30, "the agent's log lines")
    new = agent.text()[len(before):]
    for p in pods:
        # TCP and UDP each gain pod-b: 2 operations in every namespace
        assert f"sync in Pod namespace {scan_dir / p.ns}: 2 operations applied, 0 failed" in new, new

    # restart: the tables are adopted as they are, nothing is written
    agent.wait_full_syncs(1)
    tables = {p.ns: (ipvsadm(p.ns, "-Sn"), routes(p.ns)) for p in pods}
    agent.stop()
    agents.append(Agent(vpc, cluster, log, *args))
    agent = agents[-1]
    wait_until(lambda: "3 namespaces attached" in agent.text(), START_TIMEOUT, "the scan after the restart")
    agent.wait_full_syncs(2)
    assert {p.ns: (ipvsadm(p.ns, "-Sn"), routes(p.ns)) for p in pods} == tables
    text = agent.text()
    assert "operations applied" not in text and "prepared" not in text, text

    # a namespace deleted while the agent runs: detached quietly, the others go on
    # (pod-a leaves: its UDP real server goes at once, its TCP one drains at weight 0)
    run(["ip", "netns", "delete", pods[0].ns])
    lab.namespaces.remove(pods[0].ns)
    write_cluster(cluster, web([b], vip6=None))

    def udp_only_b(p: Pod) -> bool:
        table = ipvsadm(p.ns, "-Sn")
        return table.count("-a -u 10.96.0.10:53") == 1 and "-a -u 10.96.0.10:53 -r 10.244.11.2:5353" in table

    wait_until(lambda: all(udp_only_b(p) for p in pods[1:]), 60, "the change in the remaining namespaces")
    wait_until(lambda: "forgotten" in agent.text() or "is gone" in agent.text(), 30, "the namespace to be dropped")
    assert "Traceback" not in agent.text()
    for p in pods[1:]:
        assert answered(request_many(p.ns, VIP, 80, 2)) == {"pod-b": 2}
    agent.stop()


# --------------------------------------------------------------------------------------
# kernel mode (the share-namespace kernel is not available: detection and plan only)


def test_kernel_mode_is_refused_on_a_stock_kernel_and_plans_no_pod_tables(vpc: Vpc, lab: Lab,
                                                                           tmp_path: Path) -> None:
    c = add_pod(lab, vpc.vpc, "k")
    cluster = write_cluster(tmp_path / "c.json", web([vpc.pods["pod-a"]], vip="10.96.0.40", vip6=None))
    out = sync(vpc, cluster, c, extra=("--pod-netns-mode", "kernel"), expect_rc=1)
    assert "--pod-netns-mode kernel needs the share-namespace ip_vs" in out, out
    assert "10.96.0.40" not in ipvsadm(vpc.node, "-Sn")  # refused before changing anything

    param = tmp_path / "mode"
    param.write_text("2\n")  # what /sys/module/ip_vs/parameters/mode reads where ip_vs runs with mode=2
    out = sync(vpc, cluster, c, extra=("--pod-netns-mode", "auto", "--ip-vs-mode-param", str(param)))
    assert f"sync netns {c.path}: shares the node's table (kernel mode), nothing to program" in out, out
    assert "10.96.0.40:80" in ipvsadm(vpc.node, "-Sn")
    assert ipvsadm(c.ns, "-Sn").strip() == ""
