"""Traffic end to end through what `svcproxy sync` programs in the VM's kernel.

Topology (built once per module; each test gets a fresh client namespace)::

    client ──veth── router ──veth── pod-a   10.244.10.2  fd00:244:10::2
    (sync runs            │──veth── pod-b   10.244.11.2  fd00:244:11::2
     here)                └──veth── pod-c   10.244.12.2  fd00:244:12::2

The client namespace has only its veth, its addresses and default routes via the
router: the share-NS case. ``svcproxy sync`` runs inside it (``ip netns exec``), so
its ipvsadm programs the client's own IPVS table, and IPVS catches the client's
locally generated traffic at LOCAL_OUT (masquerading: DNAT only, so the pods see the
client's own address). Every pod runs an HTTP server on 8080 and a UDP echo server
on 5353 (dual-stack) that answer with the pod's name.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest

from k8s_objects import endpoint, endpoint_slice, node, service, slice_port, svc_port

from .netns import Lab, Pod, Reply, default_route, ipvsadm, request, request_many, sysctl
from .test_sync import COMMON, svcproxy, sync, write_cluster

pytestmark = pytest.mark.kernel

PODS = ("pod-a", "pod-b", "pod-c")
HTTP_PORT, UDP_PORT = 8080, 5353


@dataclass
class Net:
    router: str
    pods: dict[str, Pod]


@pytest.fixture(scope="module")
def net() -> Iterator[Net]:
    with Lab() as lab:
        router = lab.netns()
        sysctl(router, "net.ipv4.ip_forward", 1, net__ipv6__conf__all__forwarding=1)
        pods = {}
        for i, name in enumerate(PODS):
            n = 10 + i
            ns = lab.netns()
            lab.connect(ns, router, [f"10.244.{n}.2/24", f"fd00:244:{n}::2/64"],
                        [f"10.244.{n}.1/24", f"fd00:244:{n}::1/64"])
            default_route(ns, f"10.244.{n}.1")
            default_route(ns, f"fd00:244:{n}::1")
            lab.server(ns, name, proto="http", port=HTTP_PORT)
            lab.server(ns, name, proto="udp", port=UDP_PORT)
            pods[name] = Pod(name, ns, f"10.244.{n}.2", f"fd00:244:{n}::2")
        yield Net(router, pods)


_subnets = itertools.count(100)


@dataclass(frozen=True)
class Client:
    ns: str
    ip4: str
    ip4b: str  # a second address, for a second "client"
    ip6: str


@pytest.fixture
def client(net: Net, lab: Lab) -> Client:
    n = next(_subnets)  # a fresh subnet per test: no stale neighbours or routes
    ns = lab.netns()
    c = Client(ns, f"10.244.{n}.2", f"10.244.{n}.3", f"fd00:244:{n}::2")
    lab.connect(ns, net.router, [f"{c.ip4}/24", f"{c.ip4b}/24", f"{c.ip6}/64"],
                [f"10.244.{n}.1/24", f"fd00:244:{n}::1/64"])
    default_route(ns, f"10.244.{n}.1")
    default_route(ns, f"fd00:244:{n}::1")
    return c


def web(net: Net, pods: tuple[str, ...], *, vip: str = "10.96.0.10", **kw: Any) -> list[dict[str, Any]]:
    """Service "web" (TCP 80 -> 8080 and UDP 53 -> 5353) with the given pods as endpoints."""
    return [
        node("node-a"),
        service("web", cluster_ips=(vip,), ports=[svc_port("http", 80, target_port=HTTP_PORT),
                                                  svc_port("dns", 53, "UDP", target_port=UDP_PORT)], **kw),
        endpoint_slice("web", ports=[slice_port("http", HTTP_PORT), slice_port("dns", UDP_PORT, "UDP")],
                       endpoints=[endpoint(net.pods[p].ip4, pod=p) for p in pods]),
    ]


def answered(replies: list[Reply]) -> Counter[str]:
    bad = [r.error for r in replies if not r.ok]
    assert not bad, f"{len(bad)} of {len(replies)} requests failed: {bad[:3]}"
    return Counter(r.text for r in replies)


def test_cluster_ip_answers_and_rr_spreads_over_all_backends(net: Net, client: Client, tmp_path: Path) -> None:
    cluster = write_cluster(tmp_path / "c.json", web(net, PODS))
    before = request(client.ns, "10.96.0.10", 80, timeout=2, check=False)
    assert not before.ok  # nothing answers on the ClusterIP until svcproxy programs it

    sync(client.ns, cluster)
    replies = request_many(client.ns, "10.96.0.10", 80, 30)

    assert answered(replies) == {p: 10 for p in PODS}  # rr: every backend, exactly evenly
    by_pod = {r.text: r for r in replies}
    for name, pod in net.pods.items():
        assert by_pod[name].server == pod.ip4  # really reached that pod ...
        assert by_pod[name].info["server_port"] == str(HTTP_PORT)
        assert by_pod[name].client == client.ip4  # ... with the client's own address (DNAT only)


def test_removing_an_endpoint_stops_traffic_to_it(net: Net, client: Client, tmp_path: Path) -> None:
    cluster = write_cluster(tmp_path / "c.json", web(net, PODS))
    sync(client.ns, cluster)
    assert set(answered(request_many(client.ns, "10.96.0.10", 80, 6))) == set(PODS)

    write_cluster(cluster, web(net, ("pod-a", "pod-c")))  # pod-b goes away
    applied, failed, out = sync(client.ns, cluster)
    assert (applied, failed) == (2, 0), out  # its TCP and its UDP real server
    assert "delete-destination tcp://10.96.0.10:80 -> 10.244.11.2:8080" in out

    tcp = answered(request_many(client.ns, "10.96.0.10", 80, 20))
    udp = answered(request_many(client.ns, "10.96.0.10", 53, 10, proto="udp"))
    assert tcp == {"pod-a": 10, "pod-c": 10}
    assert udp == {"pod-a": 5, "pod-c": 5}


def test_session_affinity_pins_a_client_to_one_backend(net: Net, client: Client, tmp_path: Path) -> None:
    cluster = write_cluster(tmp_path / "c.json",
                            web(net, PODS, session_affinity="ClientIP", affinity_timeout=300))
    sync(client.ns, cluster)
    assert "persistent 300" in ipvsadm(client.ns, "-Ln")

    first = answered(request_many(client.ns, "10.96.0.10", 80, 12, source=client.ip4))
    second = answered(request_many(client.ns, "10.96.0.10", 80, 12, source=client.ip4b))
    again = answered(request_many(client.ns, "10.96.0.10", 80, 6, source=client.ip4))

    assert len(first) == 1 and sum(first.values()) == 12  # one backend for all 12 connections
    assert len(second) == 1
    assert second != first  # another client address is scheduled on its own (rr: the next pod)
    assert again == Counter({next(iter(first)): 6})  # and the first one stays pinned


def test_udp_service_answers(net: Net, client: Client, tmp_path: Path) -> None:
    cluster = write_cluster(tmp_path / "c.json", web(net, PODS))
    sync(client.ns, cluster)

    replies = request_many(client.ns, "10.96.0.10", 53, 9, proto="udp", payload="hello-udp")

    assert answered(replies) == {p: 3 for p in PODS}  # a new source port each time: rr
    for r in replies:
        assert r.body.endswith("\nhello-udp")  # the datagram went through and came back
        assert r.client == client.ip4


def test_ipv6_cluster_ip_works(net: Net, client: Client, tmp_path: Path) -> None:
    """A dual-stack Service: its IPv6 ClusterIP and its IPv4 one both answer."""
    objs = [
        node("node-a"),
        service("web6", cluster_ips=("fd00:96::10", "10.96.0.16"),
                ports=[svc_port("http", 80, target_port=HTTP_PORT), svc_port("dns", 53, "UDP", target_port=UDP_PORT)]),
        endpoint_slice("web6", "v6", address_type="IPv6",
                       ports=[slice_port("http", HTTP_PORT), slice_port("dns", UDP_PORT, "UDP")],
                       endpoints=[endpoint(p.ip6, pod=p.name) for p in net.pods.values()]),
        endpoint_slice("web6", "v4", ports=[slice_port("http", HTTP_PORT), slice_port("dns", UDP_PORT, "UDP")],
                       endpoints=[endpoint(p.ip4, pod=p.name) for p in net.pods.values()]),
    ]
    cluster = write_cluster(tmp_path / "c.json", objs)
    sync(client.ns, cluster)

    v6 = request_many(client.ns, "fd00:96::10", 80, 9)
    v6_udp = request_many(client.ns, "fd00:96::10", 53, 3, proto="udp")
    v4 = request_many(client.ns, "10.96.0.16", 80, 3)

    assert answered(v6) == {p: 3 for p in PODS}
    assert {r.server for r in v6} == {p.ip6 for p in net.pods.values()}
    assert {r.client for r in v6} == {client.ip6}
    assert answered(v6_udp) == {p: 1 for p in PODS}
    assert answered(v4) == {p: 1 for p in PODS}
    assert {r.server for r in v4} == {p.ip4 for p in net.pods.values()}


def test_second_sync_does_not_disturb_open_traffic(net: Net, client: Client, tmp_path: Path) -> None:
    """Re-syncing an unchanged cluster is a no-op for the kernel: plan says so, and the
    table (with its rr state) serves on exactly as before."""
    cluster = write_cluster(tmp_path / "c.json", web(net, PODS))
    sync(client.ns, cluster)
    saved = ipvsadm(client.ns, "-Sn")
    assert sync(client.ns, cluster)[:2] == (0, 0)
    cp = svcproxy(client.ns, "plan", "-f", str(cluster), *COMMON)
    assert cp.returncode == 0 and "No changes" in cp.stdout, cp.stdout
    assert ipvsadm(client.ns, "-Sn") == saved
    assert answered(request_many(client.ns, "10.96.0.10", 80, 6)) == {p: 2 for p in PODS}
