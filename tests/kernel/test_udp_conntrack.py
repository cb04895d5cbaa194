"""UDP conntrack cleanup on a real kernel, with long-lived UDP flows: clients that
keep one source port, connect() their socket as DNS resolvers do, and send every
0.2 s. Each test first shows the stuck state (or its absence) without svcproxy's
cleanup, then runs ``svcproxy sync``.

What these tests found on the VM's kernel (6.1) with the sysctls svcproxy sets
(docs/parity.md, "UDP conntrack cleanup", has the kernel's reasons):

* A flow that hit the black hole of a Service not yet programmed (its NodePort on
  the node's own address, its ClusterIP routed out of the node) keeps a confirmed,
  un-translated conntrack entry. After the virtual service appears, the replies of
  the real server clash with that entry and leave under another source port, so a
  connected client never sees them: only the cleanup gets it out.
* A flow into a virtual service that exists but has no real server leaves no entry
  (IPVS drops the packet before its entry is confirmed): it gets its first endpoint
  without any cleanup.
* A flow whose real server is deleted moves to the new one by itself
  (expire_nodest_conn=1 makes IPVS drop the connection and its entry), in the node's
  namespace and in a replicated Pod namespace.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest

from k8s_objects import endpoint, endpoint_slice, node, service, slice_port, svc_port

from .netns import HELPER_PYTHON, Lab, ipvsadm, ns_cmd, route_add, run, sysctl_get, wait_until
from .test_sync import SVCPROXY, write_cluster

pytestmark = pytest.mark.kernel

POD_A, POD_B = "10.244.1.10", "10.244.2.10"
CLIENT, POD_CLIENT = "10.244.3.10", "10.244.4.10"
NODE_IP = "10.244.3.1"  # the node's address on the client's link, and its Node object's
SINK, SINK_GW = "10.244.9.2", "10.244.9.1"  # the node's default route leads here
UDP_PORT = 5353

#: A DNS-resolver-like client: one connected UDP socket (fixed source port) that sends
#: every 0.2 s and prints one line per answer (the server's name), or "refused" for an
#: ICMP port unreachable. A connected socket only takes answers from the address and
#: port it sent to, as a resolver does.
FLOW_CLIENT = r"""
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[3])))
s.connect((sys.argv[1], int(sys.argv[2])))
s.settimeout(0.2)
while True:
    t = time.monotonic() + 0.2
    try:
        s.send(b"ping")
    except ConnectionRefusedError:  # an earlier datagram's ICMP error
        print("refused", flush=True)
    while time.monotonic() < t:
        try:
            data = s.recv(4096)
        except socket.timeout:
            break
        except ConnectionRefusedError:
            print("refused", flush=True)
            break
        print(data.decode(errors="replace").splitlines()[0], flush=True)
    time.sleep(max(0.0, t - time.monotonic()))
"""


class Flow:
    """A running FLOW_CLIENT and the lines it printed so far."""

    def __init__(self, ns: str, path: Path, dst: str, port: int, sport: int) -> None:
        self.path, self.dst, self.port, self.sport = path, dst, port, sport
        self.out = open(path, "w")
        self.proc = subprocess.Popen(ns_cmd(ns, [*HELPER_PYTHON, "-c", FLOW_CLIENT, dst, str(port), str(sport)]),
                                     stdin=subprocess.DEVNULL, stdout=self.out, stderr=subprocess.STDOUT)

    def lines(self) -> list[str]:
        return self.path.read_text().splitlines()

    def since(self, mark: int) -> list[str]:
        return self.lines()[mark:]

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=30)
        self.out.close()

    def __repr__(self) -> str:
        return f"flow :{self.sport} -> {self.dst}:{self.port}"


@dataclass
class UdpNet:
    node: str
    client: str
    pod_client: str
    tmp: Path
    flows: list[Flow] = field(default_factory=list)

    def flow(self, ns: str, dst: str, port: int, sport: int) -> Flow:
        f = Flow(ns, self.tmp / f"flow-{sport}.log", dst, port, sport)
        self.flows.append(f)
        return f


@pytest.fixture
def udp_net(lab: Lab, tmp_path: Path) -> Iterator[UdpNet]:
    """node <-> pod-a, pod-b, a client, a Pod client (each on a /24 of its own, the
    node's end .1) and a sink: the node's default route, where packets to addresses
    the node does not serve go and are dropped (it does not forward)."""
    node_ns, pod_a, pod_b, client, pod_client, sink = (lab.netns() for _ in range(6))
    for ns, ip in ((pod_a, POD_A), (pod_b, POD_B), (client, CLIENT), (pod_client, POD_CLIENT)):
        gw = ip.rsplit(".", 1)[0] + ".1"
        lab.connect(node_ns, ns, [f"{gw}/24"], [f"{ip}/24"])
        route_add(ns, "default", via=gw)
    lab.connect(node_ns, sink, [f"{SINK_GW}/24"], [f"{SINK}/24"])
    route_add(node_ns, "default", via=SINK)
    run(["sysctl", "-qw", "net.ipv4.ip_forward=1"], ns=node_ns)
    for ns, name in ((pod_a, "pod-a"), (pod_b, "pod-b")):
        lab.server(ns, name, proto="udp", port=UDP_PORT)
    net = UdpNet(node_ns, client, pod_client, tmp_path)
    try:
        yield net
    finally:
        for f in net.flows:
            f.stop()


def dns_service(name: str, vip: str, endpoints: tuple[str, ...], node_port: int | None = None) -> list[dict[str, Any]]:
    eps = [endpoint(ip, node="node-a", pod=f"{name}-{ip}") for ip in endpoints]
    return [service(name, cluster_ips=(vip,), type="NodePort" if node_port else "ClusterIP",
                    ports=[svc_port("dns", 53, "UDP", node_port=node_port)]),
            endpoint_slice(name, ports=[slice_port("dns", UDP_PORT, "UDP")], endpoints=eps)]


def sync(net: UdpNet, objs: list[dict[str, Any]], *pod_netns: str) -> str:
    cluster = write_cluster(net.tmp / "cluster.json", [node("node-a", internal_ips=(NODE_IP,)), *objs])
    args = [a for ns in pod_netns for a in ("--pod-netns", f"/var/run/netns/{ns}")]
    out = run([*SVCPROXY, "sync", "-f", str(cluster), "--node", "node-a", "--node-plumbing", "on", *args],
              ns=net.node, timeout=300).stdout
    print(out)
    return out


def udp_entries(ns: str) -> list[dict[str, str]]:
    """The namespace's UDP conntrack entries (the kernel's /proc view, independent of
    svcproxy's reader): orig_src, orig_dst, sport, dport, reply_src of each."""
    text = run(["cat", "/proc/net/nf_conntrack"], ns=ns).stdout
    out = []
    for line in text.splitlines():
        words = line.split()
        if len(words) < 3 or words[2] != "udp":
            continue
        kv = [w.split("=", 1) for w in words if "=" in w]
        src = [v for k, v in kv if k == "src"]
        dst = [v for k, v in kv if k == "dst"]
        sport = [v for k, v in kv if k == "sport"]
        dport = [v for k, v in kv if k == "dport"]
        out.append({"orig_src": src[0], "orig_dst": dst[0], "sport": sport[0], "dport": dport[0],
                    "reply_src": src[1], "line": line})
    return out


def entry_of(ns: str, f: Flow) -> dict[str, str] | None:
    for e in udp_entries(ns):
        if e["orig_dst"] == f.dst and e["sport"] == str(f.sport) and e["dport"] == str(f.port):
            return e
    return None


def answered_by(flows: list[Flow], marks: list[int], name: str, timeout: float = 60.0) -> None:
    wait_until(lambda: all(name in f.since(m) for f, m in zip(flows, marks)), timeout,
               f"every flow to be answered by {name}", interval=0.5)


def after_first(lines: list[str], name: str) -> list[str]:
    """The lines from the first that is ``name`` on (none if it never came)."""
    return lines[lines.index(name):] if name in lines else []


def test_udp_flows_leave_the_black_hole_they_hit_before_the_service_was_programmed(udp_net: UdpNet) -> None:
    net = udp_net
    vip, empty_vip = "10.96.7.10", "10.96.7.11"
    # The node knows one UDP Service without endpoints ("empty": a virtual service with
    # no real server); "dns" (ClusterIP and NodePort 30053) is not created yet.
    sync(net, dns_service("empty", empty_vip, ()))
    nodeport = net.flow(net.client, NODE_IP, 30053, 40051)   # the node's own address: no listener
    clusterip = net.flow(net.client, vip, 53, 40052)           # not on the node: out the default route
    in_ipvs = net.flow(net.client, empty_vip, 53, 40053)       # IPVS drops it (no real server)
    # Each is in its black hole, with a live flow: the first two have confirmed,
    # un-translated entries in the node's conntrack table; IPVS's black hole leaves none.
    wait_until(lambda: entry_of(net.node, nodeport) and entry_of(net.node, clusterip)
               and "refused" in nodeport.lines() and "refused" in in_ipvs.lines(), 120,
               "the flows to be running in their black holes")
    assert entry_of(net.node, nodeport)["reply_src"] == NODE_IP  # type: ignore[index]
    assert entry_of(net.node, clusterip)["reply_src"] == vip  # type: ignore[index]
    assert entry_of(net.node, in_ipvs) is None, udp_entries(net.node)

    # Control: exactly what the sync will program (the address on the dummy device,
    # the virtual services and their real server), done behind svcproxy's back and
    # without any cleanup. "empty" gets its first endpoint and answers; the two
    # other flows stay stuck on their old entries: pod-a's answers clash with them
    # and leave under another source port, which the connected clients drop.
    flows = [nodeport, clusterip, in_ipvs]
    marks = [len(f.lines()) for f in flows]
    run(["ip", "addr", "add", f"{vip}/32", "dev", "kube-ipvs0"], ns=net.node)
    for addr in (f"{vip}:53", f"{NODE_IP}:30053"):
        ipvsadm(net.node, "-A", "-u", addr, "-s", "rr")
    for addr in (f"{vip}:53", f"{NODE_IP}:30053", f"{empty_vip}:53"):
        ipvsadm(net.node, "-a", "-u", addr, "-r", f"{POD_A}:{UDP_PORT}", "-m")
    answered_by([in_ipvs], [marks[2]], "pod-a")
    time.sleep(4)
    stuck = {repr(f): f.since(m) for f, m in zip(flows[:2], marks)}
    assert not any("pod-a" in got for got in stuck.values()), f"a flow left its black hole alone: {stuck}"
    assert entry_of(net.node, nodeport) and entry_of(net.node, clusterip), udp_entries(net.node)

    # svcproxy finds the table as it wants it (no IPVS operation) and deletes the two
    # stale entries: both flows are answered by pod-a.
    marks = [len(f.lines()) for f in flows]
    out = sync(net, [*dns_service("empty", empty_vip, (POD_A,)), *dns_service("dns", vip, (POD_A,), 30053)])
    assert "sync: 0 operations applied, 0 failed" in out, out
    assert "cleared 2 stale UDP conntrack entries" in out, out
    answered_by(flows[:2], marks[:2], "pod-a", timeout=30)
    for f in flows[:2]:
        assert entry_of(net.node, f)["reply_src"] == POD_A  # type: ignore[index]


def test_udp_flow_moves_to_the_new_endpoint_when_the_old_one_is_removed(udp_net: UdpNet) -> None:
    """Node and replicated Pod namespace. On this kernel IPVS moves the flows itself
    (svcproxy deletes a UDP real server at once and sets expire_nodest_conn=1 in both
    namespaces), so this passes without the cleanup too: it guards those two."""
    net = udp_net
    vip = "10.96.7.20"
    sync(net, dns_service("dns", vip, (POD_A,)), net.pod_client)
    for ns in (net.node, net.pod_client):
        assert sysctl_get(ns, "net.ipv4.vs.expire_nodest_conn") == "1"
    flows = [net.flow(net.client, vip, 53, 40061), net.flow(net.pod_client, vip, 53, 40062)]
    answered_by(flows, [0, 0], "pod-a", timeout=120)
    marks = [len(f.lines()) for f in flows]
    out = sync(net, dns_service("dns", vip, (POD_B,)), net.pod_client)
    assert f"delete-destination udp://{vip}:53 -> {POD_A}:{UDP_PORT}" in out, out
    answered_by(flows, marks, "pod-b", timeout=30)
    # Once a flow has moved it stays: three answers after its first from pod-b, and
    # every one of them from pod-b (the Pod flow may lag the node's by a datagram).
    def tails() -> list[list[str]]:
        return [after_first(f.since(m), "pod-b") for f, m in zip(flows, marks)]
    wait_until(lambda: all(len(t) >= 3 for t in tails()), 30, "three answers after the move")
    tails_now = tails()
    assert all(set(t) == {"pod-b"} for t in tails_now), tails_now
