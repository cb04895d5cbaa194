"""`svcproxy sync -f FILE` against real IPVS (the CLI as a subprocess, in the VM).

Every test runs the real command line (``python -m svcproxy``) under
``ip netns exec NS`` in a namespace of its own, so the ipvsadm it runs programs that
namespace's IPVS table; the table is read back with ``ipvsadm -Sn`` (parsed by
``svcproxy.ipvs.ipvsadm.parse_save``) and with ``svcproxy plan -o json``.

What is shown: a sync programs exactly the desired table and a second one does
nothing; drift made behind svcproxy's back with ipvsadm is repaired by the next sync
(a deleted service, a flushed table, a changed scheduler or weight, a foreign real
server, foreign services outside ``--exclude-cidrs``) while what is inside the
excluded ranges (and fwmark services) is kept; and an operation the kernel itself
rejects is reported, alone, with exit status 1, while the rest is applied.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import pytest

from k8s_objects import endpoint, endpoint_slice, node, service, slice_port, svc_port
from svcproxy.ipvs.ipvsadm import parse_save
from svcproxy.model import Destination, Forward, Protocol, ServiceKey, Table, VirtualService
from svcproxy.render import address_order, service_json

from .netns import Lab, ipvsadm, run

pytestmark = pytest.mark.kernel

#: The command line under test, exactly as a user runs it (the venv's interpreter).
SVCPROXY = [sys.executable, "-m", "svcproxy"]
NODE_IP = "192.168.49.2"
#: Arguments every sync/plan of these tests passes (node-a, its address for NodePorts).
COMMON = ["--node", "node-a", "--node-ip", NODE_IP, "--color", "never"]

SUMMARY_RE = re.compile(r"^sync: (\d+) operations applied, (\d+) failed", re.M)


# --------------------------------------------------------------------------------------
# helpers (also used by test_traffic.py and test_agent_vm.py)


def cluster_list(objs: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Objects as ``kubectl get -o json`` prints a List."""
    return {"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": ""}, "items": list(objs)}


def write_cluster(path: Path, objs: Iterable[dict[str, Any]]) -> Path:
    """Write objects for ``-f`` (atomically: the agent's file source and the fake API
    server's state file watcher must never see half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(cluster_list(objs), indent=1))
    tmp.replace(path)
    return path


def svcproxy(ns: str | None, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run ``svcproxy ARGS`` inside ``ns``; never raises on a non-zero exit status."""
    return run([*SVCPROXY, *args], ns=ns, check=False, timeout=timeout)


def sync(ns: str, cluster: Path, *extra: str, expect_rc: int = 0) -> tuple[int, int, str]:
    """``svcproxy sync``; returns (applied, failed, stdout) from its summary line."""
    cp = svcproxy(ns, "sync", "-f", str(cluster), *COMMON, *extra)
    assert cp.returncode == expect_rc, f"sync exit {cp.returncode}:\n{cp.stdout}\n{cp.stderr}"
    m = SUMMARY_RE.search(cp.stdout)
    assert m, f"no summary line in sync output:\n{cp.stdout}\n{cp.stderr}"
    return int(m.group(1)), int(m.group(2)), cp.stdout


def plan_json(ns: str, cluster: Path, *extra: str) -> tuple[int, dict[str, Any]]:
    """``svcproxy plan -o json`` against the namespace's kernel table: (exit status, doc)."""
    cp = svcproxy(ns, "plan", "-f", str(cluster), *COMMON, "-o", "json", *extra)
    assert cp.returncode in (0, 2), f"plan exit {cp.returncode}:\n{cp.stdout}\n{cp.stderr}"
    assert "cannot read the kernel" not in cp.stderr, cp.stderr  # it must see the live table
    return cp.returncode, json.loads(cp.stdout)


def kernel_table(ns: str | None) -> Table:
    return parse_save(ipvsadm(ns, "-Sn"))


def as_json(table: Table) -> list[dict[str, Any]]:
    """A table in the shape and order of ``plan -o json``'s "services", without what
    only translation knows (each virtual service's origin)."""
    return without_origins([service_json(vs) for vs in sorted(table.services.values(),
                                                               key=lambda vs: address_order(vs.key))])


def without_origins(services: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in s.items() if k != "origin"} for s in services]


def vs(proto: str, addr: str, port: int, sched: str, dests: Sequence[tuple[str, int]],
       persistence: int | None = None) -> VirtualService:
    return VirtualService(ServiceKey(Protocol(proto), addr, port), sched, persistence, frozenset(),
                          tuple(sorted((Destination(a, p, 1, Forward.MASQ) for a, p in dests),
                                       key=lambda d: d.key)))


# --------------------------------------------------------------------------------------
# the cluster these tests sync


WEB = ("10.244.1.2", "10.244.1.3", "10.244.2.2")


def cluster_objects(*, extra: Iterable[dict[str, Any]] = ()) -> list[dict[str, Any]]:
    """A small cluster: TCP, UDP, dual-stack, affinity, an annotation, a NodePort,
    a Service without endpoints, and a headless one (never programmed)."""
    return [
        node("node-a", internal_ips=(NODE_IP,)),
        service("web", cluster_ips=("10.96.0.10",), ports=[svc_port("http", 80, target_port=8080)]),
        endpoint_slice("web", endpoints=[endpoint(ip) for ip in WEB]),
        service("dns", "kube-system", cluster_ips=("10.96.0.53", "fd00:96::35"),
                ports=[svc_port("dns", 53, "UDP"), svc_port("dns-tcp", 53, "TCP")]),
        endpoint_slice("dns", "v4", "kube-system", ports=[slice_port("dns", 53, "UDP"), slice_port("dns-tcp", 53)],
                       endpoints=[endpoint("10.244.1.5"), endpoint("10.244.2.5")]),
        endpoint_slice("dns", "v6", "kube-system", address_type="IPv6",
                       ports=[slice_port("dns", 53, "UDP"), slice_port("dns-tcp", 53)],
                       endpoints=[endpoint("fd00:244:1::5"), endpoint("fd00:244:2::5")]),
        service("cart", cluster_ips=("10.96.0.20",), ports=[svc_port("redis", 6379)],
                session_affinity="ClientIP", affinity_timeout=600),
        endpoint_slice("cart", ports=[slice_port("redis", 6379)],
                       endpoints=[endpoint("10.244.1.7"), endpoint("10.244.2.7")]),
        service("front", cluster_ips=("10.96.0.30",), type="NodePort",
                annotations={"svcproxy.io/scheduler": "wlc"},
                ports=[svc_port("http", 80, target_port=8080, node_port=30080)]),
        endpoint_slice("front", endpoints=[endpoint("10.244.1.8")]),
        service("empty", cluster_ips=("10.96.0.40",), ports=[svc_port("http", 80, target_port=8080)]),
        service("db", cluster_ips=("None",), ports=[svc_port("pg", 5432)]),
        endpoint_slice("db", endpoints=[endpoint("10.244.1.9")], ports=[slice_port("pg", 5432)],
                       labels={"service.kubernetes.io/headless": ""}),
        *extra,
    ]


#: What node-a's table must be, written out by hand (independent of the translation code).
EXPECTED = Table.of([
    vs("TCP", "10.96.0.10", 80, "rr", [(ip, 8080) for ip in WEB]),
    vs("UDP", "10.96.0.53", 53, "rr", [("10.244.1.5", 53), ("10.244.2.5", 53)]),
    vs("TCP", "10.96.0.53", 53, "rr", [("10.244.1.5", 53), ("10.244.2.5", 53)]),
    vs("UDP", "fd00:96::35", 53, "rr", [("fd00:244:1::5", 53), ("fd00:244:2::5", 53)]),
    vs("TCP", "fd00:96::35", 53, "rr", [("fd00:244:1::5", 53), ("fd00:244:2::5", 53)]),
    vs("TCP", "10.96.0.20", 6379, "rr", [("10.244.1.7", 6379), ("10.244.2.7", 6379)], persistence=600),
    vs("TCP", "10.96.0.30", 80, "wlc", [("10.244.1.8", 8080)]),
    vs("TCP", NODE_IP, 30080, "wlc", [("10.244.1.8", 8080)]),
    vs("TCP", "10.96.0.40", 80, "rr", []),
])
EXPECTED_OPS = len(EXPECTED) + EXPECTED.destination_count()


@pytest.fixture
def ns(lab: Lab) -> str:
    return lab.netns()


@pytest.fixture
def cluster(tmp_path: Path) -> Path:
    return write_cluster(tmp_path / "cluster.json", cluster_objects())


def applied_ops(out: str) -> list[tuple[str, str]]:
    """(operation, virtual service) of every "applied ..." line of sync's text output."""
    return sorted((m.group(1), m.group(2)) for m in re.finditer(r"^applied (\S+) (\S+)", out, re.M))


def assert_converged(ns: str, cluster: Path, expected: Table, *extra: str) -> None:
    """The kernel holds exactly ``expected`` and plan finds nothing to do."""
    assert kernel_table(ns) == expected
    rc, doc = plan_json(ns, cluster, *extra)
    assert (rc, doc["operations"]) == (0, [])


# --------------------------------------------------------------------------------------
# tests


BACKENDS = ["netlink", "ipvsadm"]  # the default first


@pytest.mark.parametrize("backend", BACKENDS)
def test_sync_programs_exactly_the_desired_table(ns: str, cluster: Path, backend: str) -> None:
    assert kernel_table(ns) == Table()
    rc, planned = plan_json(ns, cluster, "--backend", backend)
    assert rc == 2
    assert len(planned["operations"]) == EXPECTED_OPS
    assert without_origins(planned["services"]) == as_json(EXPECTED)
    assert all(s["origin"] for s in planned["services"])  # each names the Service port it serves

    applied, failed, out = sync(ns, cluster, "--backend", backend)

    assert (applied, failed) == (EXPECTED_OPS, 0), out
    assert "FAILED" not in out
    table = kernel_table(ns)
    assert table == EXPECTED
    assert as_json(table) == without_origins(planned["services"])  # what plan promised is what the kernel has
    # the other reading of the kernel: -Ln agrees (-Sn and -Ln are separate code paths)
    listed = ipvsadm(ns, "-Ln")
    assert "TCP  10.96.0.20:6379 rr persistent 600" in listed
    assert "UDP  [fd00:96::35]:53 rr" in listed
    # a second sync performs zero operations and changes nothing
    saved = ipvsadm(ns, "-Sn")
    assert sync(ns, cluster, "--backend", backend)[:2] == (0, 0)
    assert ipvsadm(ns, "-Sn") == saved  # byte for byte: nothing was rewritten
    assert_converged(ns, cluster, EXPECTED, "--backend", backend)


@pytest.fixture(scope="module")
def synced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """One namespace synced once for all drift cases: each case starts from (and
    checks) the converged table and must leave it converged."""
    with Lab() as lab:
        ns = lab.netns()
        cluster = write_cluster(tmp_path_factory.mktemp("drift") / "cluster.json", cluster_objects())
        assert sync(ns, cluster)[:2] == (EXPECTED_OPS, 0)
        yield ns, cluster


DRIFT: dict[str, tuple[list[list[str]], list[tuple[str, str]]]] = {
    # name: (ipvsadm commands that damage the table, the operations that repair it)
    "service-deleted": (
        [["-D", "-t", "10.96.0.10:80"]],
        [("add-service", "tcp://10.96.0.10:80")] + [("add-destination", "tcp://10.96.0.10:80")] * 3,
    ),
    "table-flushed": ([["-C"]], []),  # [] = the whole table again (EXPECTED_OPS operations)
    "scheduler-changed": ([["-E", "-t", "10.96.0.10:80", "-s", "wlc"]], [("edit-service", "tcp://10.96.0.10:80")]),
    "persistence-dropped": ([["-E", "-t", "10.96.0.20:6379", "-s", "rr"]],
                            [("edit-service", "tcp://10.96.0.20:6379")]),
    "weight-changed": (
        [["-e", "-t", "10.96.0.10:80", "-r", "10.244.1.3:8080", "-m", "-w", "5"]],
        [("edit-destination", "tcp://10.96.0.10:80")],
    ),
    "forward-changed-and-real-server-deleted": (
        [["-e", "-u", "10.96.0.53:53", "-r", "10.244.1.5:53", "-g", "-w", "1"],
         ["-d", "-u", "[fd00:96::35]:53", "-r", "[fd00:244:2::5]:53"]],
        [("add-destination", "udp://[fd00:96::35]:53"), ("edit-destination", "udp://10.96.0.53:53")],
    ),
    "foreign-real-server-added": (
        [["-a", "-t", "10.96.0.10:80", "-r", "10.244.9.9:8080", "-m"]],
        [("delete-destination", "tcp://10.96.0.10:80")],
    ),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(DRIFT))
def test_sync_repairs_drift(synced: tuple[str, Path], case: str, backend: str) -> None:
    ns, cluster = synced
    damage, repair = DRIFT[case]
    assert kernel_table(ns) == EXPECTED
    for cmd in damage:
        ipvsadm(ns, *cmd)
    assert kernel_table(ns) != EXPECTED  # the damage is real

    applied, failed, out = sync(ns, cluster, "--backend", backend)

    if repair:
        assert applied_ops(out) == sorted(repair), out
    else:
        assert applied == EXPECTED_OPS, out
    assert (applied, failed) == (len(applied_ops(out)), 0), out
    assert_converged(ns, cluster, EXPECTED)


EXCLUDE = "10.100.0.0/16,fd00:100::/64"


def test_foreign_services_kept_inside_exclude_cidrs_removed_outside(ns: str, cluster: Path) -> None:
    ex = ("--exclude-cidrs", EXCLUDE)
    assert sync(ns, cluster, *ex)[:2] == (EXPECTED_OPS, 0)
    foreign_kept = [
        ["-A", "-t", "10.100.0.1:80", "-s", "sh"],
        ["-a", "-t", "10.100.0.1:80", "-r", "10.244.9.1:80", "-m", "-w", "3"],
        ["-A", "-u", "10.100.7.7:53", "-s", "rr"],
        ["-A", "-t", "[fd00:100::1]:443", "-s", "rr"],
        ["-a", "-t", "[fd00:100::1]:443", "-r", "[fd00:244:9::1]:443", "-m"],
        ["-A", "-f", "7", "-s", "rr"],  # fwmark services are never touched either
        ["-a", "-f", "7", "-r", "10.244.9.2:0", "-g"],
    ]
    foreign_removed = [
        ["-A", "-t", "10.97.0.1:80", "-s", "rr"],
        ["-a", "-t", "10.97.0.1:80", "-r", "10.244.9.3:80", "-m"],
        ["-A", "-u", "10.96.0.99:53", "-s", "rr"],
        ["-A", "-t", "10.101.0.1:80", "-s", "rr"],  # just outside 10.100.0.0/16
        ["-A", "-t", "[fd00:100:0:1::1]:80", "-s", "rr"],  # just outside fd00:100::/64
    ]
    for cmd in foreign_kept:
        ipvsadm(ns, *cmd)
    kept_table = Table.of(s for s in kernel_table(ns).sorted() if s.key not in EXPECTED.services)
    assert len(kept_table) == 4
    for cmd in foreign_removed:
        ipvsadm(ns, *cmd)

    applied, failed, out = sync(ns, cluster, *ex)

    assert applied_ops(out) == sorted(
        [("delete-service", a) for a in ("tcp://10.97.0.1:80", "udp://10.96.0.99:53", "tcp://10.101.0.1:80",
                                         "tcp://[fd00:100:0:1::1]:80")]
        + [("delete-destination", "tcp://10.97.0.1:80")]
    ), out
    assert (applied, failed) == (5, 0), out
    expected = Table({**EXPECTED.services, **kept_table.services})
    assert_converged(ns, cluster, expected, *ex)
    # the kept ones are untouched, settings and real servers included
    listed = ipvsadm(ns, "-Ln")
    assert re.search(r"TCP  10\.100\.0\.1:80 sh\s+-> 10\.244\.9\.1:80\s+Masq\s+3\s", listed), listed
    assert re.search(r"FWM  7 rr\s+-> 10\.244\.9\.2:0\s+Route\s+1\s", listed), listed


# --------------------------------------------------------------------------------------
# failure handling


TWOS = "10.96.0.77"


def _kernel_has_twos() -> bool:
    return subprocess.run(["modprobe", "-n", "-q", "ip_vs_twos"], check=False).returncode == 0


#: How each backend words the kernel's refusals (ipvsadm's own text; netlink: the
#: same, with the errno's name).
REFUSALS = {
    "netlink": ("Scheduler or persistence engine not found (ENOENT)", "Service not defined (ESRCH)"),
    "ipvsadm": ("Scheduler or persistence engine not found", "Service not defined"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_endpoints", [False, True], ids=["no-endpoints", "with-endpoints"])
def test_kernel_rejection_is_reported_alone_and_the_rest_applied(
    ns: str, tmp_path: Path, with_endpoints: bool, backend: str
) -> None:
    """'twos' is a valid IPVS scheduler name (svcproxy accepts the annotation: Linux
    6.2+ has it) but this 6.1 kernel has no ip_vs_twos module, so the kernel refuses
    that one service: a realistic rejection that only the kernel can make."""
    if _kernel_has_twos():
        pytest.skip("this kernel has ip_vs_twos: no scheduler left for the kernel to reject")
    twos_eps = ("10.244.1.77", "10.244.2.77") if with_endpoints else ()
    extra = [
        service("twos", cluster_ips=(TWOS,), annotations={"svcproxy.io/scheduler": "twos"},
                ports=[svc_port("http", 80, target_port=8080)]),
        endpoint_slice("twos", endpoints=[endpoint(ip) for ip in twos_eps]),
    ]
    cluster = write_cluster(tmp_path / "cluster.json", cluster_objects(extra=extra))
    n_twos = 1 + len(twos_eps)

    no_scheduler, no_service = REFUSALS[backend]
    cp = svcproxy(ns, "sync", "-f", str(cluster), *COMMON, "--backend", backend)

    assert cp.returncode == 1, f"{cp.stdout}\n{cp.stderr}"
    failed_lines = [line for line in cp.stdout.splitlines() if line.startswith("FAILED")]
    assert failed_lines[0] == f"FAILED  add-service tcp://{TWOS}:80 scheduler=twos: {no_scheduler}", cp.stdout
    # the destinations of a service that could not be created fail with it, and
    # nothing else fails
    assert sorted(failed_lines[1:]) == sorted(
        f"FAILED  add-destination tcp://{TWOS}:80 -> {ip}:8080 weight=1 forward=masq: {no_service}"
        for ip in twos_eps
    ), cp.stdout
    m = SUMMARY_RE.search(cp.stdout)
    assert m and (int(m.group(1)), int(m.group(2))) == (EXPECTED_OPS, n_twos), cp.stdout
    assert kernel_table(ns) == EXPECTED  # everything else was applied

    # the next sync retries exactly that service and reports it again (JSON this time)
    cp = svcproxy(ns, "sync", "-f", str(cluster), *COMMON, "--backend", backend, "-o", "json")
    assert cp.returncode == 1, f"{cp.stdout}\n{cp.stderr}"
    doc = json.loads(cp.stdout)
    assert doc["applied"] == 0
    assert [f["operation"] for f in doc["failed"]][0] == f"add-service tcp://{TWOS}:80 scheduler=twos"
    assert len(doc["failed"]) == n_twos
    assert kernel_table(ns) == EXPECTED
