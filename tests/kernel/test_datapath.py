"""The data path around the IPVS table on a real kernel: IPVS timeouts and
loadBalancerSourceRanges.

Every test builds its own namespaces (``lab``) and runs the real command line under
``ip netns exec``; what the kernel holds is read back with ipvsadm, conntrack and
nft, and traffic goes only between namespaces the test made.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from k8s_objects import endpoint, endpoint_slice, node, service, slice_port, svc_port

from .netns import Lab, curl, ipvsadm, route_add, run, sysctl
from .test_sync import SVCPROXY, write_cluster

pytestmark = pytest.mark.kernel


def timeouts(ns: str) -> tuple[int, int, int]:
    out = ipvsadm(ns, "-L", "--timeout")
    m = re.search(r"Timeout \(tcp tcpfin udp\): (\d+) (\d+) (\d+)", out)
    assert m, out
    return int(m[1]), int(m[2]), int(m[3])


@pytest.mark.parametrize("backend", ["netlink", "ipvsadm"])
def test_ipvs_timeouts_are_set_on_the_node_and_in_pod_namespaces(lab: Lab, tmp_path: Path, backend: str) -> None:
    node, pod = lab.netns(), lab.netns()
    cluster = write_cluster(tmp_path / "c.json", [])
    assert timeouts(node) == timeouts(pod) == (900, 120, 300)  # a new namespace's defaults
    base = [*SVCPROXY, "sync", "-f", str(cluster), "--node", "node-a", "--backend", backend,
            "--pod-netns", f"/var/run/netns/{pod}"]
    out = run([*base, "--ipvs-tcp-timeout", "1h", "--ipvs-udp-timeout", "45s"], ns=node).stdout
    assert "IPVS timeouts set: tcp=3600 tcpfin=unchanged udp=45" in out, out
    assert timeouts(node) == timeouts(pod) == (3600, 120, 45)
    # 0 (the default) leaves the kernel's value: only tcpfin changes.
    run([*base, "--ipvs-tcpfin-timeout", "30s"], ns=node)
    assert timeouts(node) == timeouts(pod) == (3600, 30, 45)
    # A bad value: one line naming the flag, exit 1, nothing changed.
    bad = run([*base, "--ipvs-udp-timeout", "soon"], ns=node, check=False)
    assert bad.returncode == 1 and "argument --ipvs-udp-timeout" in bad.stderr.strip().splitlines()[-1]
    assert timeouts(node) == timeouts(pod) == (3600, 30, 45)


# --------------------------------------------------------------------------------------
# loadBalancerSourceRanges

LAN_NODE, ALLOWED, DENIED = "192.168.60.1", "192.168.60.10", "192.168.60.20"
LB_IP, LB_CLUSTER_IP, WEB_POD = "192.168.61.100", "10.96.8.10", "10.244.8.10"


def lb_cluster(ranges: list[str]) -> list[dict[str, Any]]:
    svc = service("web", cluster_ips=(LB_CLUSTER_IP,), type="LoadBalancer",
                  ports=[svc_port("http", 80, node_port=30090)], ingress=[{"ip": LB_IP, "ipMode": "VIP"}])
    svc["spec"]["loadBalancerSourceRanges"] = ranges
    return [node("node-a", internal_ips=(LAN_NODE,)), svc,
            endpoint_slice("web", ports=[slice_port("http", 8080)],
                           endpoints=[endpoint(WEB_POD, node="node-a", pod="web")])]


def test_load_balancer_source_ranges_let_only_the_listed_sources_in(lab: Lab, tmp_path: Path) -> None:
    lan, node_ns, allowed, denied, pod = (lab.netns() for _ in range(5))
    run(["ip", "link", "add", "br0", "type", "bridge"], ns=lan)
    run(["ip", "link", "set", "br0", "up"], ns=lan)
    for ns, ip in ((node_ns, LAN_NODE), (allowed, ALLOWED), (denied, DENIED)):
        _, lan_end = lab.connect(ns, lan, [f"{ip}/24"], [])
        run(["ip", "link", "set", lan_end, "master", "br0"], ns=lan)
        if ns != node_ns:
            route_add(ns, "192.168.61.0/24", via=LAN_NODE)
    lab.connect(node_ns, pod, ["10.244.8.1/24"], [f"{WEB_POD}/24"])
    route_add(pod, "default", via="10.244.8.1")
    lab.server(pod, "web", port=8080)
    sysctl(node_ns, "net.ipv4.ip_forward", 1)

    def sync(ranges: list[str]) -> str:
        cluster = write_cluster(tmp_path / "lb.json", lb_cluster(ranges))
        return run([*SVCPROXY, "sync", "-f", str(cluster), "--node", "node-a", "--node-plumbing", "on"],
                   ns=node_ns, timeout=300).stdout + run(["nft", "list", "table", "inet", "svcproxy"],
                                                          ns=node_ns).stdout

    def answers(ns: str, host: str = LB_IP, port: int = 80) -> bool:
        return curl(ns, f"http://{host}:{port}/", timeout=3, check=False).returncode == 0

    # The node's address is in a range: its own connections to the LB address pass too.
    print(sync([f"{ALLOWED}/32", "192.168.60.0/30", "not-a-cidr"]))
    assert answers(allowed)
    assert not answers(denied)
    assert answers(node_ns)
    # Only the LB address is guarded: the denied client still has the NodePort.
    assert answers(denied, LAN_NODE, 30090)
    # The ranges change: elements are patched, the node loses its allowance.
    print(sync([f"{DENIED}/32"]))
    assert answers(denied) and not answers(allowed) and not answers(node_ns)
    # No ranges left: everyone is let in again.
    sync([])
    assert answers(allowed) and answers(denied) and answers(node_ns)
