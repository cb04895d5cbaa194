"""Node-namespace plumbing on a real kernel: dummy device, masquerade, cleanup.

Two "nodes" and an "outside" client share a LAN (a bridge in a namespace of its own);
each node routes a Pod network to one Pod namespace behind a veth:

    client 192.168.50.10 --+
    node-1 192.168.50.1  --+-- br0 (lan)     node-1 -- pod-a 10.244.1.10
    node-2 192.168.50.2  --+                 node-2 -- pod-b 10.244.2.10

svcproxy runs for node-1 in node-1's namespace. pod-b is a remote endpoint: its
replies go from node-2 straight to the client over the LAN unless node-1 masquerades,
which is exactly the asymmetric return that masquerading exists to prevent.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from k8s_objects import endpoint, endpoint_slice, node, service, slice_port, svc_port

from .netns import Lab, curl, ipvsadm, ns_cmd, request_many, route_add, run, sysctl, sysctl_get, wait_until
from .test_sync import SVCPROXY, write_cluster

pytestmark = pytest.mark.kernel

NODE1, NODE2, CLIENT = "192.168.50.1", "192.168.50.2", "192.168.50.10"
POD_A, POD_B = "10.244.1.10", "10.244.2.10"
GW_A = "10.244.1.1"  # node-1's address toward pod-a
HEALTH = "127.0.0.1:10256"
WEB_VIP, LOCAL_VIP, REMOTE_VIP, SELF_VIP = "10.96.0.10", "10.96.0.20", "10.96.0.30", "10.96.0.40"
START_TIMEOUT = 600.0
COMMON = ["--node", "node-1", "--node-ip", NODE1]


@dataclass
class Net:
    lan: str
    client: str
    node1: str
    node2: str
    pod_a: str
    pod_b: str


@pytest.fixture(scope="module")
def net() -> Iterator[Net]:
    with Lab() as lab:
        lan = lab.netns()
        run(["ip", "link", "add", "br0", "type", "bridge"], ns=lan)
        run(["ip", "link", "set", "br0", "up"], ns=lan)
        names: dict[str, str] = {}
        for name, addr in (("client", CLIENT), ("node1", NODE1), ("node2", NODE2)):
            ns = names[name] = lab.netns()
            _, lan_end = lab.connect(ns, lan, [f"{addr}/24"], [])
            run(["ip", "link", "set", lan_end, "master", "br0"], ns=lan)
        pods = {}
        for pod, node_ns, ip, gw in (("pod_a", names["node1"], POD_A, GW_A),
                                     ("pod_b", names["node2"], POD_B, "10.244.2.1")):
            ns = pods[pod] = lab.netns()
            lab.connect(node_ns, ns, [f"{gw}/24"], [f"{ip}/24"])
            route_add(ns, "default", via=gw)
            lab.server(ns, pod.replace("_", "-"), port=8080)
        for ns in (names["node1"], names["node2"]):
            sysctl(ns, "net.ipv4.ip_forward", 1)
        route_add(names["node1"], "10.244.2.0/24", via=NODE2)
        route_add(names["node2"], "10.244.1.0/24", via=NODE1)
        # The client reaches ClusterIPs through node-1, as an outside router would.
        route_add(names["client"], "10.96.0.0/16", via=NODE1)
        yield Net(lan, names["client"], names["node1"], names["node2"], pods["pod_a"], pods["pod_b"])


def cluster(node_ip: str = NODE1) -> list[dict[str, Any]]:
    port = [svc_port("http", 80, node_port=None)]
    ep_a, ep_b = endpoint(POD_A, node="node-1", pod="pod-a"), endpoint(POD_B, node="node-2", pod="pod-b")

    def slice_for(name: str, *eps: dict[str, Any]) -> dict[str, Any]:
        return endpoint_slice(name, ports=[slice_port("http", 8080)], endpoints=list(eps))

    return [
        node("node-1", internal_ips=(node_ip,)),
        service("web", cluster_ips=(WEB_VIP,), type="NodePort", ports=[svc_port("http", 80, node_port=30080)]),
        slice_for("web", ep_a, ep_b),
        service("local", cluster_ips=(LOCAL_VIP,), type="LoadBalancer", external_traffic_policy="Local",
                health_check_node_port=32001, ports=[svc_port("http", 80, node_port=30081)]),
        slice_for("local", ep_a, ep_b),
        service("remote", cluster_ips=(REMOTE_VIP,), type="LoadBalancer", external_traffic_policy="Local",
                health_check_node_port=32002, ports=[svc_port("http", 80, node_port=30082)]),
        slice_for("remote", ep_b),
        service("self", cluster_ips=(SELF_VIP,), ports=port),
        slice_for("self", ep_a),
    ]


def seen(replies: list[Any]) -> dict[str, set[str]]:
    """Pod -> client addresses it saw; raises if any request failed."""
    bad = [r for r in replies if not r.ok]
    assert not bad, bad
    out: dict[str, set[str]] = {}
    for r in replies:
        out.setdefault(r.text, set()).add(r.client)
    return out


def addresses(ns: str, dev: str) -> set[str]:
    doc = json.loads(run(["ip", "-j", "addr", "show", "dev", dev], ns=ns).stdout)
    return {a["local"] for link in doc for a in link.get("addr_info", [])}


def nft_tables(ns: str) -> set[str]:
    return set(re.findall(r"^table (\S+ \S+)", run(["nft", "list", "tables"], ns=ns).stdout, re.M))


@pytest.fixture
def agent(net: Net, tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    log = tmp_path / "agent.log"
    # NodePorts on the addresses node-1 really has in 192.168.50.0/24, not on the Node
    # object's (a wrong one here): --nodeport-addresses reads them from the kernel.
    objs = cluster(node_ip="192.168.50.99")
    cmd = [*SVCPROXY, "run", "-f", str(write_cluster(tmp_path / "c.json", objs)), "--node", "node-1",
           "--nodeport-addresses", "192.168.50.0/24",
           "--health-bind", HEALTH, "--healthcheck-bind-host", NODE1, "--cluster-cidr", "10.244.0.0/16",
           "--min-sync-period", "0.2", "--cni-socket", ""]
    with open(log, "w") as f:
        proc = subprocess.Popen(ns_cmd(net.node1, cmd), stdin=subprocess.DEVNULL, stdout=f,
                                stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: proc.poll() is not None or curl(net.node1, f"http://{HEALTH}/readyz", check=False,
                                                           extra=["-f"]).returncode == 0,  # -f: 503 fails
                   START_TIMEOUT, "the agent to be ready", interval=2.0)
        assert proc.poll() is None, log.read_text()
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        print(log.read_text()[-6000:])
        run([*SVCPROXY, "cleanup"], ns=net.node1, check=False, timeout=600)


def test_agent_plumbing_masquerades_where_replies_would_go_astray(net: Net, agent: Any) -> None:
    # The dummy device holds the ClusterIPs, stays down, and NodePorts are not bound.
    assert addresses(net.node1, "kube-ipvs0") == {WEB_VIP, LOCAL_VIP, REMOTE_VIP, SELF_VIP}
    link = json.loads(run(["ip", "-j", "link", "show", "kube-ipvs0"], ns=net.node1).stdout)[0]
    assert "UP" not in link["flags"]
    assert nft_tables(net.node1) == {"inet svcproxy"}
    assert run(["sysctl", "-n", "net.ipv4.vs.conntrack"], ns=net.node1).stdout.strip() == "1"

    # NodePort, policy Cluster: both Pods answer, each saw node-1 (masqueraded), never
    # the client: without that, pod-b's answers would go to the client via node-2.
    got = seen(request_many(net.client, NODE1, 30080, 6))
    assert set(got) == {"pod-a", "pod-b"}, got
    assert got["pod-b"] == {NODE1} and got["pod-a"] == {GW_A}

    # A ClusterIP reached from outside the Pod network (--cluster-cidr): bound to the
    # dummy device, so node-1 accepts it; masqueraded like the NodePort.
    got = seen(request_many(net.client, WEB_VIP, 80, 6))
    assert set(got) == {"pod-a", "pod-b"} and CLIENT not in set().union(*got.values()), got

    # Policy Local: only the local Pod, and it sees the client's own address.
    got = seen(request_many(net.client, NODE1, 30081, 4))
    assert got == {"pod-a": {CLIENT}}, got

    # healthCheckNodePort answers for this node: 200 with a local endpoint, else 503.
    ok = curl(net.client, f"http://{NODE1}:32001/", check=False, extra=["-w", "\n%{http_code}"])
    body, code = ok.stdout.rsplit("\n", 1)
    assert code == "200" and json.loads(body)["localEndpoints"] == 1, ok.stdout
    bad = curl(net.client, f"http://{NODE1}:32002/", check=False, extra=["-w", "\n%{http_code}"])
    body, code = bad.stdout.rsplit("\n", 1)
    assert code == "503" and json.loads(body)["localEndpoints"] == 0, bad.stdout

    # Policy Local on a node without a local endpoint (remote: pod-b, on node-2 only).
    # As in kube-proxy's IPVS mode, a Pod on this node still reaches the NodePort
    # through the cluster-wide endpoints, with its own address (not masqueraded): the
    # reply comes back through node-1, which routes pod-a's network...
    got = seen(request_many(net.pod_a, NODE1, 30082, 2))
    assert got == {"pod-b": {POD_A}}, got
    # ...while the outside client, kept unmasqueraded by policy Local, gets no answer:
    # pod-b replies from node-2 straight to it, from an address it never talked to.
    # (Load balancers do not send it here: the health check above says 503.)
    astray = request_many(net.client, NODE1, 30082, 2, timeout=3)
    assert not any(r.ok for r in astray), astray

    # Hairpin: pod-a reaching itself through its Service is masqueraded to node-1;
    # without that it would get a packet from its own address and drop it.
    got = seen(request_many(net.pod_a, SELF_VIP, 80, 2))
    assert got == {"pod-a": {GW_A}}, got

    # The node's own connection to a ClusterIP (source: the VIP on the dummy device)
    # is masqueraded too.
    got = seen(request_many(net.node1, SELF_VIP, 80, 2))
    assert got == {"pod-a": {GW_A}}, got


def test_without_plumbing_remote_nodeport_replies_go_astray(net: Net, tmp_path: Path) -> None:
    """The control for the test above: IPVS alone, no masquerade."""
    c = write_cluster(tmp_path / "c.json", cluster())
    try:
        cp = run([*SVCPROXY, "sync", "-f", str(c), *COMMON, "--color", "never"], ns=net.node1, check=False,
                 timeout=600)
        assert cp.returncode == 0, cp.stdout + cp.stderr
        replies = request_many(net.client, NODE1, 30080, 6, timeout=3)
        answered = {r.text for r in replies if r.ok}
        failed = [r for r in replies if not r.ok]
        assert answered == {"pod-a"} and len(failed) >= 2, replies
    finally:
        ipvsadm(net.node1, "-C")


def test_cleanup_removes_ours_and_nothing_else(net: Net, tmp_path: Path) -> None:
    c = write_cluster(tmp_path / "c.json", cluster())
    node1 = net.node1
    # Things that are not svcproxy's: a virtual service inside --exclude-cidrs, a
    # dummy device and an nftables table of someone else's.
    ipvsadm(node1, "-A", "-t", "10.200.0.1:80", "-s", "rr")
    run(["ip", "link", "add", "other0", "type", "dummy"], ns=node1)
    run(["nft", "add", "table", "inet", "other"], ns=node1)
    try:
        cp = run([*SVCPROXY, "sync", "-f", str(c), *COMMON, "--node-plumbing", "on", "--exclude-cidrs",
                  "10.200.0.0/16", "--pod-netns", f"/run/netns/{net.pod_a}", "--color", "never"],
                 ns=node1, check=False, timeout=600)
        assert cp.returncode == 0, cp.stdout + cp.stderr
        assert nft_tables(node1) == {"inet svcproxy", "inet other"}
        assert len(addresses(node1, "kube-ipvs0")) == 4
        assert "10.96.0.10" in run(["ip", "route", "show", "table", "all"], ns=net.pod_a).stdout
        assert ipvsadm(net.pod_a, "-Sn").count("-A ") == 4
        assert sysctl_get(net.pod_a, "net.ipv4.vs.conntrack") == "1"  # what the sync set
        sysctl(net.pod_a, "net.ipv4.vs.conntrack", 0)  # changed since: cleanup must not set it again

        dry = run([*SVCPROXY, "cleanup", "--dry-run", "--exclude-cidrs", "10.200.0.0/16",
                   "--pod-netns", f"/run/netns/{net.pod_a}"], ns=node1, check=False, timeout=600)
        assert dry.returncode == 0, dry.stdout + dry.stderr
        assert "node: would remove 7 virtual services" in dry.stdout, dry.stdout
        assert "would delete dummy device kube-ipvs0" in dry.stdout and "would delete nftables" in dry.stdout
        assert len(addresses(node1, "kube-ipvs0")) == 4  # the dry run changed nothing

        cp = run([*SVCPROXY, "cleanup", "--exclude-cidrs", "10.200.0.0/16", "--pod-netns",
                  f"/run/netns/{net.pod_a}"], ns=node1, check=False, timeout=600)
        assert cp.returncode == 0, cp.stdout + cp.stderr
        assert ipvsadm(node1, "-Sn").split("\n")[0].startswith("-A -t 10.200.0.1:80")
        assert ipvsadm(node1, "-Sn").count("-A ") == 1
        assert nft_tables(node1) == {"inet other"}
        assert run(["ip", "link", "show", "kube-ipvs0"], ns=node1, check=False).returncode != 0
        assert run(["ip", "link", "show", "other0"], ns=node1, check=False).returncode == 0
        assert ipvsadm(net.pod_a, "-Sn").count("-A ") == 0
        assert "10.96.0." not in run(["ip", "route", "show", "table", "all"], ns=net.pod_a).stdout
        assert sysctl_get(net.pod_a, "net.ipv4.vs.conntrack") == "0"
    finally:
        sysctl(net.pod_a, "net.ipv4.vs.conntrack", 1)  # as the sync left it
        ipvsadm(node1, "-C")
        run(["ip", "link", "del", "other0"], ns=node1, check=False)
        run(["nft", "delete", "table", "inet", "other"], ns=node1, check=False)
        run(["nft", "delete", "table", "inet", "svcproxy"], ns=node1, check=False)
        run(["ip", "link", "del", "kube-ipvs0"], ns=node1, check=False)
        ipvsadm(net.pod_a, "-C")
