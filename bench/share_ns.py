#!/usr/bin/env python3
"""Benchmark of share-NS Pod namespaces against a real kernel (docs/performance.md).

Three figures, each as ratios measured in the same run (under emulation, seconds mean
little; see tests/kernel notes), for replicate mode (default) or kernel mode
(``--mode kernel``: svcproxy's patched ip_vs loaded with mode=2, the one table in
the VM's root namespace):

* Attach: what a new Pod namespace costs before its containers may start: read its
  (empty) IPVS table, diff, prepare it (loopback, sysctls, one VIP route per
  ClusterIP in one ``ip -batch``), apply the Pod-visible table; at 1,000 and 10,000
  virtual services, compared with programming the node's table from empty and with
  a steady-state full sync of the node (read + diff, nothing to do) in the same run.
  Also: re-adopting an already programmed namespace (what an agent restart costs per
  namespace). Kernel mode: the same call, which programs nothing.
* Fan-out: one endpoint change (one real server added) through the reconcile loop
  (``Proxier.sync``, a partial sync) with 0 and then each ``--fanout`` count of
  attached namespaces; then the next change, ``--fanout-repeat`` more (their median
  and minimum show the noise) and the guest's CPU use while nothing runs.
* Kernel memory per Pod namespace (slab, percpu, MemAvailable deltas) at 10,000
  services x 10 namespaces: the namespace with its NIC, its VIP routes, its table.

Tables are programmed over netlink (``--backend ipvsadm``: with ipvsadm). Runs as
root where IPVS exists, in namespaces of its own (replicate mode leaves the VM's root
namespace alone)::

    bench/share_ns.py --compare                     # both modes, one VM each, one table with ratios
    bench/share_ns.py --vm                          # replicate mode only (virtme-ng, emulated)
    bench/share_ns.py --vm --sizes 1000,2000        # smaller
    bench/share_ns.py --vm --only fanout --fanout-repeat 5 --profile /tmp/fanout.prof
                                                    # cProfile of one more change at the largest count
    bench/share_ns.py --vm --mode kernel --ipvs-modules "$(tools/build-ipvs-module | tail -n 1)"

``--compare`` builds the IPVS modules first (tools/build-ipvs-module, cached), boots a
VM with the kernel's own ip_vs for replicate mode (``--replicate-ipvs built``: the
built one with mode=0) and then one with the built ip_vs at mode=2, and keeps the
guests' JSON figures and the profile in ``--out-dir``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Sequence

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from svcproxy.diff import diff  # noqa: E402
from svcproxy.ipvs.ipvsadm import IpvsadmBackend  # noqa: E402
from svcproxy.model import Destination, Protocol, ServiceKey, Table, VirtualService  # noqa: E402
from svcproxy.ipvs.netlink import NetlinkBackend  # noqa: E402
from svcproxy.podns.attach import (  # noqa: E402
    BackendFactory, Preparer, PodNamespace, factory_like, ipvsadm_factory, pod_target, sync_namespace)
from svcproxy.podns.mode import decide  # noqa: E402
from vmboot import built_modules, load_built_ipvs, run_in_vm  # noqa: E402  (bench/vmboot.py)

NETNS = "/var/run/netns"


def node_backend(kind: str, path: str | None) -> IpvsadmBackend | NetlinkBackend:
    """The node's backend of the chosen kind; Pod namespaces get the same kind. ``path``
    None: the VM's root namespace (kernel mode: only it may hold the shared table)."""
    return NetlinkBackend(netns=path) if kind == "netlink" else IpvsadmBackend(netns=path, counts=True)


def pod_factory(kind: str) -> BackendFactory:
    return factory_like(NetlinkBackend()) if kind == "netlink" else ipvsadm_factory(counts=True)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    value = fn()
    return time.perf_counter() - t0, value


def build_table(services: int, dests: int) -> Table:
    out = []
    for i in range(services):
        key = ServiceKey(Protocol.TCP, f"10.96.{i // 250}.{i % 250 + 1}", 80)
        ds = tuple(Destination(f"10.244.{(i * dests + j) // 250 % 250}.{(i * dests + j) % 250 + 1}", 8080)
                   for j in range(dests))
        out.append(VirtualService(key, "rr", destinations=ds))
    return Table.of(out)


class Namespaces:
    def __init__(self) -> None:
        self.names: list[str] = []
        self.flush_root = False

    def add(self, *, nic: bool = True) -> str:
        """A Pod-like namespace: lo down (as a runtime leaves it), a veth pair inside it
        standing for its NIC, with an address and a default route. Without ``nic``: a
        plain namespace with lo up, standing for the node."""
        name = f"svcb-{uuid.uuid4().hex[:8]}"
        subprocess.run(["ip", "netns", "add", name], check=True)
        self.names.append(name)
        if not nic:  # IPVS refuses IPv4 real servers in a namespace that never had lo up
            subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        if nic:
            script = ("link add name eth0 type veth peer name eth1\naddr add 10.250.0.2/16 dev eth0\n"
                      "link set eth0 up\nlink set eth1 up\nroute add default via 10.250.0.1\n")
            subprocess.run(["ip", "-n", name, "-batch", "-"], input=script, text=True, check=True)
        return f"{NETNS}/{name}"

    def node(self, mode: str) -> str | None:
        """Where the node's table goes: a namespace of its own, or in kernel mode the
        VM's root namespace (mode=2 refuses table changes anywhere else)."""
        if mode == "kernel":  # an empty node table for each figure, as a fresh namespace has
            self.flush_root = True
            subprocess.run(["ipvsadm", "-C"], check=True)
            return None
        return self.add(nic=False)

    def close(self) -> None:
        if self.flush_root:
            subprocess.run(["ipvsadm", "-C"], capture_output=True)
        for name in self.names:
            subprocess.run(["ip", "netns", "delete", name], capture_output=True)


def attach_bench(sizes: list[int], dests: int, nss: Namespaces, kind: str, mode: str,
                 out: list[dict[str, Any]]) -> None:
    decision = decide(mode)
    print(f"\n## Attach of a new Pod namespace vs. the node's full sync ({dests} real servers per service, "
          f"{mode} mode)\n")
    print("| services | node: program from empty | node: steady full sync | attach: total | of which prepare "
          "(routes+sysctls) | re-adopt | attach / node program | attach / node steady |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in sizes:
        table = build_table(n, dests)
        node = node_backend(kind, nss.node(mode))

        def node_full() -> int:
            ops = diff(table, node.read())
            if ops:
                failed = node.apply(ops)
                assert not failed, failed[:3]
            return len(ops)

        t_node, node_ops = timed(node_full)
        t_steady, steady_ops = timed(node_full)
        assert steady_ops == 0
        path = nss.add()
        t_attach, report = timed(lambda: sync_namespace(path, table, decision,
                                                        backend_factory=pod_factory(kind)))
        t_prep = 0.0
        if decision.shared:  # kernel mode: nothing to program, nothing to prepare
            assert report.status == "shared", report.summary()
        else:
            assert report.status == "synced" and not report.failed, report.summary()
            # preparation alone, in another fresh namespace
            other = PodNamespace.open(nss.add())
            t_prep, _ = timed(lambda: Preparer(other)(table))
        t_readopt, again = timed(lambda: sync_namespace(path, table, decision,
                                                        backend_factory=pod_factory(kind)))
        assert again.status == report.status and not again.operations
        out.append({"services": n, "node_program": t_node, "node_ops": node_ops, "node_steady": t_steady,
                    "attach": t_attach, "attach_ops": len(report.operations), "prepare": t_prep,
                    "readopt": t_readopt})
        print(f"| {n:,} | {t_node:.2f} s ({node_ops:,} ops) | {t_steady:.2f} s | {t_attach:.2f} s "
              f"({len(report.operations):,} ops) | {t_prep:.2f} s | {t_readopt:.2f} s | "
              f"{t_attach / t_node:.2f} | {t_attach / t_steady:.2f} |", flush=True)


def fanout_objects(services: int) -> list[dict[str, Any]]:
    """The fan-out's cluster: ``services`` ClusterIP Services x 2 endpoints, and the Node."""
    from k8s_objects import endpoint, endpoint_slice, node, service, slice_port, svc_port

    objs: list[dict[str, Any]] = [node("node-a")]
    for i in range(services):
        objs.append(service(f"s{i}", cluster_ips=(f"10.96.{i // 250}.{i % 250 + 1}",),
                            ports=[svc_port("http", 80, target_port=8080)]))
        objs.append(endpoint_slice(f"s{i}", ports=[slice_port("http", 8080)],
                                   endpoints=[endpoint(f"10.244.{i // 100}.{(i % 100) * 2 + j + 1}")
                                              for j in range(2)]))
    return objs


def grown_slice(i: int, extra: int) -> dict[str, Any]:
    """Service ``s{i}``'s EndpointSlice with ``extra`` endpoints more than at the start."""
    from k8s_objects import endpoint, endpoint_slice, slice_port

    ips = [f"10.244.{i // 100}.{(i % 100) * 2 + j + 1}" for j in range(2)] + [f"10.245.{x}.{i + 1}"
                                                                             for x in range(extra)]
    return endpoint_slice(f"s{i}", ports=[slice_port("http", 8080)], endpoints=[endpoint(ip) for ip in ips])


def fanout_proxier(kind: str, node_path: str | None, objs: list[dict[str, Any]], mode: str,
                   pods: list[str]) -> Any:
    """A reconcile loop with the cluster loaded and ``pods`` attached, before its first sync."""
    from svcproxy.kube.store import Kind
    from svcproxy.kube.translate import NodeInfo, TranslateConfig
    from svcproxy.podns.attach import AttachResult, PodNamespaces
    from svcproxy.reconcile import Proxier, ProxierConfig

    proxier = Proxier(node_backend(kind, node_path),
                      # no time-based full syncs: the measured sync must be the partial one
                      ProxierConfig(translate=TranslateConfig(node=NodeInfo("node-a", ("192.168.49.2",))),
                                    sync_period=1e9, drain_check_period=1e9))
    kinds = {"Node": Kind.NODE, "Service": Kind.SERVICE, "EndpointSlice": Kind.ENDPOINT_SLICE}
    for obj in objs:
        proxier.on_event(kinds[obj["kind"]], "ADDED", obj)
    proxier.on_synced(Kind.SERVICE)
    proxier.on_synced(Kind.ENDPOINT_SLICE)
    attacher = PodNamespaces(proxier, decide(mode), make_target=lambda p: pod_target(p, pod_factory(kind)))
    for path in pods:
        assert attacher.attach(path) in (AttachResult.ATTACHED, AttachResult.SHARED)
    return proxier


def profiled_change(proxier: Any, i: int, extra: int, profile: str) -> None:
    """One more endpoint change, its partial sync under cProfile (not the measured one:
    the profiler's own cost would be in the figure)."""
    import cProfile
    import pstats

    from svcproxy.kube.store import Kind

    proxier.on_event(Kind.ENDPOINT_SLICE, "MODIFIED", grown_slice(i, extra))
    prof = cProfile.Profile()
    t, result = timed(lambda: prof.runcall(proxier.sync))
    prof.dump_stats(profile)
    print(f"\nProfiled partial sync (one more endpoint change, same namespaces): {t:.3f} s, "
          f"{len(result.operations)} operations; cumulative top 30 (also in {profile}):")
    pstats.Stats(prof).sort_stats("cumulative").print_stats(30)
    pstats.Stats(prof).sort_stats("tottime").print_stats(15)


def background_cpu(seconds: float) -> tuple[float, float]:
    """The guest's CPU use while this process sleeps: (busy, softirq) as fractions of
    all CPUs. What the kernel does on its own with the tables there are (IPVS's rate
    estimators walk every service and real server of every namespace every 2 s)."""
    def sample() -> list[int]:
        with open("/proc/stat") as f:
            return [int(x) for x in f.readline().split()[1:8]]
    a = sample()
    time.sleep(seconds)
    b = sample()
    d = [y - x for x, y in zip(a, b)]
    total = sum(d) or 1
    return (total - d[3] - d[4]) / total, d[6] / total


def fanout_bench(counts: list[int], services: int, nss: Namespaces, kind: str, mode: str,
                 out: list[dict[str, Any]], profile: str | None = None, repeat: int = 1) -> None:
    from svcproxy.kube.store import Kind

    decision = decide(mode)
    print(f"\n## Fan-out of one endpoint change ({services} Services x 2 endpoints; one real server added; "
          f"{mode} mode)\n")
    print(f"| attached namespaces | partial sync | operations | per namespace (over 0 attached) | full sync before it "
          f"| the next change's partial sync | {repeat} more changes: median, min | full GCs in the measured sync "
          "| guest CPU busy with nothing to do (softirq) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    node_path = nss.node(mode)
    pods = [nss.add() for _ in range(max(counts))]
    objs = fanout_objects(services)
    base: float | None = None
    for round_, k in enumerate([0, *counts]):
        proxier = fanout_proxier(kind, node_path, objs, mode, pods[:k])
        t_first, first = timed(lambda: proxier.sync(force_full=True))
        assert first.failed == 0, first
        # one real server added to one Service (another one each round, so earlier
        # rounds' changes never show up in this round's measured partial sync)
        proxier.on_event(Kind.ENDPOINT_SLICE, "MODIFIED", grown_slice(round_, 1))
        gen2 = gc.get_stats()[2]["collections"]
        t, result = timed(proxier.sync)
        full_gcs = gc.get_stats()[2]["collections"] - gen2
        assert not result.full and result.failed == 0, result
        assert len(result.operations) == (1 if decision.shared else k + 1), result.operations
        # a second change of the same Service: the first partial sync after a full one
        # may pay for what the full sync left (the collector, paused during it)
        proxier.on_event(Kind.ENDPOINT_SLICE, "MODIFIED", grown_slice(round_, 2))
        t_next, again = timed(proxier.sync)
        assert not again.full and again.failed == 0 and len(again.operations) == len(result.operations), again
        more = []  # noise: the same change again and again, one real server more each time
        for extra in range(3, 3 + repeat):
            proxier.on_event(Kind.ENDPOINT_SLICE, "MODIFIED", grown_slice(round_, extra))
            more.append(timed(proxier.sync)[0])
        if base is None:
            base = t
        per = (t - base) / k if k else 0.0
        out.append({"namespaces": k, "partial": t, "operations": len(result.operations), "per_namespace": per,
                    "full_before": t_first, "next_partial": t_next, "full_gcs": full_gcs, "more": more})
        spread = f"{sorted(more)[len(more) // 2]:.3f}, {min(more):.3f} s" if more else ""
        busy, softirq = background_cpu(6.0) if repeat else (float("nan"), float("nan"))
        out[-1].update(more=more, idle_busy=busy, idle_softirq=softirq)
        print(f"| {k} | {t:.3f} s | {len(result.operations)} | {f'{per * 1000:.1f} ms' if k else ''} "
              f"| {t_first:.1f} s | {t_next:.3f} s | {spread} | {full_gcs} | {busy:.0%} ({softirq:.0%}) |", flush=True)
        if profile and k == max(counts):
            profiled_change(proxier, round_, 3 + repeat, profile)


def _sync_sample(proxier: Any, k: int, prof: Any = None) -> dict[str, Any]:
    """One partial sync: wall seconds, this process's CPU (all threads; user is mostly
    Python, system the kernel's work on its behalf), the rest (waiting: for the
    scheduler, the disk, the netns path lookups), context switches, full GCs."""
    import resource

    ru0, gen2 = resource.getrusage(resource.RUSAGE_SELF), gc.get_stats()[2]["collections"]
    t, result = timed(lambda: prof.runcall(proxier.sync) if prof is not None else proxier.sync())
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    assert not result.full and result.failed == 0, result
    user, system = ru1.ru_utime - ru0.ru_utime, ru1.ru_stime - ru0.ru_stime
    return {"namespaces": k, "wall": t, "user": user, "system": system, "wait": t - user - system,
            "vcsw": ru1.ru_nvcsw - ru0.ru_nvcsw, "ivcsw": ru1.ru_nivcsw - ru0.ru_nivcsw,
            "operations": len(result.operations), "full_gcs": gc.get_stats()[2]["collections"] - gen2}


def _median(xs: Sequence[float]) -> float:
    s = sorted(xs)
    return (s[(len(s) - 1) // 2] + s[len(s) // 2]) / 2 if s else float("nan")


def _quartiles(xs: Sequence[float]) -> tuple[float, float]:
    s = sorted(xs)
    return (s[len(s) // 4], s[(3 * len(s)) // 4]) if s else (float("nan"), float("nan"))


def fanout_interleaved(counts: list[int], services: int, nss: Namespaces, kind: str, mode: str,
                       out: list[dict[str, Any]], rounds: int, profile: str | None) -> None:
    """Linearity of the fan-out: one reconcile loop per count, each with namespaces of
    its own, all built and fully synced first (so the VM holds the same namespaces and
    tables for every sample); then ``rounds`` rounds, each one endpoint change per
    loop in an order that rotates and reverses from round to round. Round 0 is a
    warm-up (the first partial sync after a full one) and not counted. Each loop
    changes a Service of its own, so kernel mode's one shared node table never sees
    another loop's change."""
    from svcproxy.kube.store import Kind

    ks = [0, *counts]
    objs = fanout_objects(services)
    shared_node = nss.node(mode) if mode == "kernel" else None
    loops: dict[int, Any] = {}
    for k in ks:
        loops[k] = fanout_proxier(kind, shared_node if mode == "kernel" else nss.node(mode), objs, mode,
                                  [nss.add() for _ in range(k)])
    for k in ks:
        t_full, first = timed(lambda: loops[k].sync(force_full=True))
        assert first.failed == 0, first
        print(f"full sync, {k} namespaces: {t_full:.1f} s", flush=True)
    samples: list[dict[str, Any]] = []
    for rnd in range(rounds + 1):
        order = ks[rnd % len(ks):] + ks[:rnd % len(ks)]
        for k in (order if rnd % 2 else order[::-1]):
            loops[k].on_event(Kind.ENDPOINT_SLICE, "MODIFIED", grown_slice(ks.index(k), rnd + 1))
            s = _sync_sample(loops[k], k)
            assert s["operations"] == (1 if decide(mode).shared else k + 1), s
            if rnd:
                samples.append({**s, "round": rnd})
    out.extend(samples)
    interleaved_report(ks, samples, rounds, mode)
    if profile:
        profile_counts(loops, ks, profile, rounds + 1)


def interleaved_report(ks: list[int], samples: list[dict[str, Any]], rounds: int, mode: str) -> None:
    by = {(s["round"], s["namespaces"]): s for s in samples}
    print(f"\n## Fan-out linearity ({rounds} interleaved rounds, {mode} mode): medians over rounds "
          "[quartiles], per sync\n")
    print("| namespaces | partial sync | [q1, q3] | min, max | per namespace over 0 (per round) | [q1, q3] "
          "| user CPU | system CPU | waiting | context switches: voluntary, involuntary | full GCs (all rounds) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for k in ks:
        mine = [s for s in samples if s["namespaces"] == k]
        walls = [s["wall"] for s in mine]
        per = [(s["wall"] - by[(s["round"], 0)]["wall"]) / k for s in mine if k]
        q1, q3 = _quartiles(walls)
        p1, p3 = _quartiles(per)
        cells = [f"{_median([s[x] for s in mine]) * 1000:.0f} ms" for x in ("user", "system", "wait")]
        print(f"| {k} | {_median(walls) * 1000:.0f} ms | [{q1 * 1000:.0f}, {q3 * 1000:.0f}] | "
              f"{min(walls) * 1000:.0f}, {max(walls) * 1000:.0f} | "
              + (f"{_median(per) * 1000:.1f} ms | [{p1 * 1000:.1f}, {p3 * 1000:.1f}] | " if k else " | | ")
              + " | ".join(cells) + f" | {_median([s['vcsw'] for s in mine]):.0f}, "
              f"{_median([s['ivcsw'] for s in mine]):.0f} | {sum(s['full_gcs'] for s in mine)} |")
    print("\nCost per added namespace between neighbouring counts, per round (same round: samples "
          "seconds apart), median [q1, q3]:\n")
    print("| from | to | wall per namespace | user CPU | system CPU | waiting |")
    print("|---:|---:|---:|---:|---:|---:|")
    for a, b in zip(ks, ks[1:]):
        cells = []
        for x in ("wall", "user", "system", "wait"):
            d = [(by[(r, b)][x] - by[(r, a)][x]) / (b - a) for r in range(1, rounds + 1)
                 if (r, a) in by and (r, b) in by]
            q1, q3 = _quartiles(d)
            cells.append(f"{_median(d) * 1000:.1f} ms [{q1 * 1000:.1f}, {q3 * 1000:.1f}]")
        print(f"| {a} | {b} | " + " | ".join(cells) + " |")
    # least squares over every sample: wall = a + b*k + c*k^2; c*k_max^2 is what bending adds at k_max
    xs = [float(s["namespaces"]) for s in samples]
    ys = [s["wall"] for s in samples]
    a, b, c = _quadfit(xs, ys)
    kmax = max(ks)
    print(f"\nLeast squares over all {len(ys)} samples: wall = {a * 1000:.0f} ms + {b * 1000:.1f} ms x n + "
          f"{c * 1000:.3f} ms x n^2; at n = {kmax} the n^2 term is {c * kmax * kmax * 1000:.0f} ms of "
          f"{(a + b * kmax + c * kmax * kmax) * 1000:.0f} ms. Linear fit: {_linfit(xs, ys)[1] * 1000:.1f} ms "
          "per namespace.")


def _linfit(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    n, mx, my = len(xs), sum(xs) / len(xs), sum(ys) / len(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def _quadfit(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float, float]:
    """Least squares y = a + b x + c x^2 (normal equations, Cramer's rule)."""
    s = [sum(x ** p for x in xs) for p in range(5)]
    t = [sum(y * x ** p for x, y in zip(xs, ys)) for p in range(3)]
    m = [[s[0], s[1], s[2]], [s[1], s[2], s[3]], [s[2], s[3], s[4]]]

    def det(a: list[list[float]]) -> float:
        return (a[0][0] * (a[1][1] * a[2][2] - a[1][2] * a[2][1]) - a[0][1] * (a[1][0] * a[2][2] - a[1][2] * a[2][0])
                + a[0][2] * (a[1][0] * a[2][1] - a[1][1] * a[2][0]))
    d = det(m)
    coef = []
    for i in range(3):
        mi = [row[:] for row in m]
        for r in range(3):
            mi[r][i] = t[r]
        coef.append(det(mi) / d)
    return coef[0], coef[1], coef[2]


def profile_counts(loops: dict[int, Any], ks: list[int], profile: str, first_extra: int, rounds: int = 3) -> None:
    """``rounds`` more changes per loop under cProfile (not in the figures above: the
    profiler's cost), accumulated per count; the functions that take most time at the
    largest count, per change and per namespace, next to the same at each count."""
    import cProfile
    import pstats

    from svcproxy.kube.store import Kind

    profs = {k: cProfile.Profile() for k in ks}
    for rnd in range(rounds):
        for k in (ks if rnd % 2 else ks[::-1]):
            loops[k].on_event(Kind.ENDPOINT_SLICE, "MODIFIED", grown_slice(ks.index(k), first_extra + rnd + 1))
            _sync_sample(loops[k], k, profs[k])
    stats = {}
    for k, prof in profs.items():
        prof.dump_stats(f"{profile}.{k}")
        st = pstats.Stats(prof)
        raw = st.stats  # type: ignore[attr-defined]  # {(file, line, name): (cc, calls, tottime, cumtime, callers)}
        stats[k] = {f"{Path(f[0]).name}:{f[1]}({f[2]})": (v[2], v[3], v[1]) for f, v in raw.items()}
    kmax = max(ks)
    top = sorted(stats[kmax], key=lambda f: stats[kmax][f][1], reverse=True)[:20]
    print(f"\nProfiled: {rounds} more changes per count (profiles in {profile}.N). Cumulative ms per change "
          "(calls per change); at the larger counts also per namespace:\n")
    print("| function | " + " | ".join(f"{k}" for k in ks) + " | per namespace at " + ", ".join(
        str(k) for k in ks if k) + " |")
    print("|---|" + "---:|" * (len(ks) + 1))
    for f in top:
        cells = []
        for k in ks:
            tt, ct, calls = stats[k].get(f, (0.0, 0.0, 0))
            cells.append(f"{ct / rounds * 1000:.1f} ({calls / rounds:.0f})")
        pern = ", ".join(f"{stats[k].get(f, (0, 0.0, 0))[1] / rounds / k * 1000:.2f}" for k in ks if k)
        print(f"| `{f}` | " + " | ".join(cells) + f" | {pern} |")
    print("\nOwn time (tottime), top 12 at the largest count, ms per change:\n")
    tops = sorted(stats[kmax], key=lambda f: stats[kmax][f][0], reverse=True)[:12]
    for f in tops:
        print(f"  {f}: " + ", ".join(f"{k}: {stats[k].get(f, (0.0, 0.0, 0))[0] / rounds * 1000:.1f}" for k in ks))


def meminfo() -> dict[str, int]:
    """/proc/meminfo in kB."""
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            name, _, rest = line.partition(":")
            out[name] = int(rest.split()[0])
    return out


def slabs() -> dict[str, int]:
    """Bytes held by each slab cache (objects x object size), from /proc/slabinfo."""
    out = {}
    with open("/proc/slabinfo") as f:
        for line in f.readlines()[2:]:
            words = line.split()
            out[words[0]] = int(words[2]) * int(words[3])
    return out


def settled() -> tuple[dict[str, int], dict[str, int]]:
    """Memory figures once deferred frees (RCU) have run."""
    time.sleep(2)
    subprocess.run(["sync"], check=True)
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")
    time.sleep(1)
    return meminfo(), slabs()


def memory_bench(services: int, pods: int, dests: int, nss: Namespaces, kind: str, mode: str,
                 out: list[dict[str, Any]]) -> None:
    """Kernel memory each Pod namespace costs: the namespace with its NIC, then (replicate
    mode) its VIP routes (preparation) and its IPVS table, each step measured once every
    namespace has it. The node's table exists before the first figure. In kernel mode a
    Pod namespace gets nothing but the namespace (and the module's hooks in it)."""
    print(f"\n## Kernel memory per Pod namespace ({services:,} services x {dests} real servers, {pods} "
          f"namespaces, {mode} mode)\n")
    table = build_table(services, dests)
    node = node_backend(kind, nss.node(mode))
    assert node.apply(diff(table, node.read())) == []
    steps = [("", settled())]
    paths = [nss.add() for _ in range(pods)]
    steps.append(("namespace with its NIC", settled()))
    if mode == "replicate":
        for path in paths:
            Preparer(PodNamespace.open(path))(table)
        steps.append(("VIP routes (preparation)", settled()))
        for path in paths:
            report = sync_namespace(path, table, decide(mode), backend_factory=pod_factory(kind))
            assert report.status == "synced" and not report.failed, report.summary()
        steps.append(("IPVS table", settled()))
    else:
        for path in paths:
            assert sync_namespace(path, table, decide(mode)).status == "shared"
    print("| per Pod namespace | Slab | of which unreclaimable | Percpu | MemTotal - MemAvailable |")
    print("|---|---:|---:|---:|---:|")
    rows = [(name, before, after) for (_, before), (name, after) in zip(steps, steps[1:])]
    rows.append(("all", steps[0][1], steps[-1][1]))
    for name, (m0, _), (m1, _) in rows:
        used = (m0["MemAvailable"] - m1["MemAvailable"]) / pods
        out.append({"step": name, "slab_kb": (m1["Slab"] - m0["Slab"]) / pods,
                    "sunreclaim_kb": (m1["SUnreclaim"] - m0["SUnreclaim"]) / pods,
                    "percpu_kb": (m1.get("Percpu", 0) - m0.get("Percpu", 0)) / pods, "used_kb": used})
        print(f"| {name} | {(m1['Slab'] - m0['Slab']) / pods:,.0f} kB | "
              f"{(m1['SUnreclaim'] - m0['SUnreclaim']) / pods:,.0f} kB | "
              f"{(m1.get('Percpu', 0) - m0.get('Percpu', 0)) / pods:,.0f} kB | {used:,.0f} kB |")
    (_, (_, before)), (_, (_, after)) = steps[-2], steps[-1]
    grown = sorted(((b - before.get(c, 0), c) for c, b in after.items()), reverse=True)[:6]
    print(f"\nSlab caches that grew most in the last step ({steps[-1][0]}), per namespace: "
          + ", ".join(f"{c} {d / pods / 1024:,.0f} KiB" for d, c in grown))


def vm(args: argparse.Namespace, argv: list[str], vng_args: Sequence[str] = ()) -> int:
    # with built modules the guest loads only what ip_vs.ko needs; load_built_ipvs does the rest
    modules = (["veth", "nf_conntrack", "nf_defrag_ipv4", "nf_defrag_ipv6", "libcrc32c", "nf_nat"]
               if args.ipvs_modules else ["ip_vs", "ip_vs_rr", "veth"])
    if args.json and not vng_args:  # the guest sees this machine's files read-only, but for --rwdir
        Path(args.json).resolve().parent.mkdir(parents=True, exist_ok=True)
        vng_args = ["--rwdir", str(Path(args.json).resolve().parent)]
    return run_in_vm("share_ns.py", [a for a in argv if a not in ("--vm", "--compare")], memory=args.memory,
                     modules=modules, vng_args=vng_args, timeout=args.vm_timeout)


def compare(args: argparse.Namespace) -> int:
    """Replicate mode, then kernel mode, each in a VM of its own booted back to back;
    then one table of both with ratios (figures from the guests' JSON files)."""
    out = Path(args.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    modules = built_modules()
    common = ["--sizes", args.sizes, "--dests", str(args.dests), "--fanout", args.fanout,
              "--fanout-services", str(args.fanout_services), "--fanout-repeat", str(args.fanout_repeat),
              "--memory-size", args.memory_size,
              "--backend", args.backend, *(f"--only={o}" for o in (args.only or []))]
    runs = {"replicate": ["--mode", "replicate", "--profile", str(out / "fanout-replicate.prof"),
                          *(["--ipvs-modules", modules, "--ipvs-mode", "0"] if args.replicate_ipvs == "built"
                            else [])],
            "kernel": ["--mode", "kernel", "--ipvs-modules", modules, "--ipvs-mode", "2"]}
    loads: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {}
    for mode, extra in runs.items():
        inner = [*common, *extra, "--json", str(out / f"{mode}.json")]
        sub = argparse.Namespace(**{**vars(args), "ipvs_modules": modules if "--ipvs-modules" in extra else None})
        before = os.getloadavg()
        print(f"\n# {mode} mode (load average {before[0]:.2f} {before[1]:.2f} {before[2]:.2f})", flush=True)
        rc = vm(sub, inner, ["--rwdir", str(out)])
        loads[mode] = (before, os.getloadavg())
        if rc != 0:
            print(f"{mode} run failed (exit {rc})", file=sys.stderr)
            return rc
    figures = {mode: json.loads((out / f"{mode}.json").read_text()) for mode in runs}
    compare_report(figures, loads, args)
    return 0


def ratio(a: float, b: float) -> str:
    return f"{a / b:,.0f}x" if b > 0 and a / b >= 10 else f"{a / b:.2f}x" if b > 0 else "n/a"


def compare_report(fig: dict[str, Any], loads: dict[str, Any], args: argparse.Namespace) -> None:
    rep, ker = fig["replicate"], fig["kernel"]
    print(f"\n# Replicate vs kernel mode per Pod ({args.backend} backend; replicate on the "
          f"{'built ip_vs, mode=0' if args.replicate_ipvs == 'built' else 'stock ip_vs'}, kernel on the built "
          "ip_vs, mode=2; each in its own VM, booted back to back)\n")
    for mode, (b, a) in loads.items():
        print(f"load average on the host: {mode} boot {b[0]:.2f} {b[1]:.2f} {b[2]:.2f} -> {a[0]:.2f} {a[1]:.2f} {a[2]:.2f}")
    if rep["attach"] and ker["attach"]:
        print("\n| services | replicate: attach (ops) | kernel: attach (ops) | replicate / kernel | "
              "attach / node program: replicate, kernel |")
        print("|---:|---:|---:|---:|---:|")
        for r, k in zip(rep["attach"], ker["attach"]):
            print(f"| {r['services']:,} | {r['attach']:.3f} s ({r['attach_ops']:,}) | {k['attach']:.4f} s "
                  f"({k['attach_ops']:,}) | {ratio(r['attach'], k['attach'])} | "
                  f"{r['attach'] / r['node_program']:.2f}, {k['attach'] / k['node_program']:.4f} |")
    if rep["fanout"] and ker["fanout"]:
        print("\n| Pod namespaces | replicate: partial sync (ops) | per namespace | the next change | "
              "kernel: partial sync (ops) | the next change | replicate / kernel |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for r, k in zip(rep["fanout"], ker["fanout"]):
            per = f"{r['per_namespace'] * 1000:.1f} ms" if r["namespaces"] else ""
            print(f"| {r['namespaces']} | {r['partial']:.3f} s ({r['operations']}) | {per} | {r['next_partial']:.3f} s "
                  f"| {k['partial']:.3f} s ({k['operations']}) | {k['next_partial']:.3f} s "
                  f"| {ratio(r['partial'], k['partial'])} |")
    if rep["memory"] and ker["memory"]:
        r, k = rep["memory"][-1], ker["memory"][-1]  # the "all" rows
        print(f"\n| kernel memory per Pod namespace ({args.memory_size}) | replicate | kernel | replicate / kernel |")
        print("|---|---:|---:|---:|")
        for key, name in (("slab_kb", "Slab"), ("sunreclaim_kb", "of which unreclaimable"), ("percpu_kb", "Percpu"),
                          ("used_kb", "MemTotal - MemAvailable")):
            print(f"| {name} | {r[key]:,.0f} kB | {k[key]:,.0f} kB | {ratio(r[key], k[key])} |")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,10000", help="virtual services for the attach figure")
    parser.add_argument("--dests", type=int, default=2, help="real servers per virtual service (attach)")
    parser.add_argument("--fanout", default="1,10,25,50", help="attached namespace counts for the fan-out figure")
    parser.add_argument("--fanout-services", type=int, default=200)
    parser.add_argument("--fanout-repeat", type=int, default=0,
                        help="after the two measured changes, this many more (median and min shown: the noise)")
    parser.add_argument("--fanout-rounds", type=int, default=0,
                        help="instead: the linearity figure, this many interleaved rounds of one change per "
                             "count (every count's loop and namespaces exist throughout; with --profile: 3 more "
                             "profiled rounds, one profile per count)")
    parser.add_argument("--backend", choices=["netlink", "ipvsadm"], default="netlink",
                        help="how the node and the Pod namespaces are programmed")
    parser.add_argument("--mode", choices=["replicate", "kernel"], default="replicate",
                        help="Pod namespace mode (kernel: needs --ipvs-modules built by tools/build-ipvs-module)")
    parser.add_argument("--ipvs-modules", metavar="DIR",
                        help="load ip_vs and its modules from DIR (the last line of tools/build-ipvs-module; "
                             "absolute, or relative to the repository) instead of the kernel's own")
    parser.add_argument("--ipvs-mode", type=int, default=None, help="ip_vs mode= for --ipvs-modules "
                        "(default: 2 with --mode kernel, else 0)")
    parser.add_argument("--profile", metavar="FILE", help="cProfile the largest fan-out's partial sync into FILE")
    parser.add_argument("--memory-size", default="10000x10", metavar="SERVICESxPODS",
                        help="the kernel memory figure's table size and Pod namespaces")
    parser.add_argument("--only", choices=["attach", "fanout", "memory"], action="append",
                        help="run only these figures (repeatable; default: all)")
    parser.add_argument("--skip", choices=["attach", "fanout"], default=None)
    parser.add_argument("--vm", action="store_true", help="boot the test VM (vng) and run there")
    parser.add_argument("--memory", default="3G", help="VM memory (with --vm)")
    parser.add_argument("--vm-timeout", type=int, default=5400, help="seconds before a VM is stopped (with --vm)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON to FILE")
    parser.add_argument("--compare", action="store_true",
                        help="boot a VM in replicate mode, then one in kernel mode (the built ip_vs, mode=2), "
                             "and print both with ratios")
    parser.add_argument("--replicate-ipvs", choices=["stock", "built"], default="stock",
                        help="with --compare: replicate mode on the kernel's own ip_vs (default) or the built "
                             "one loaded with mode=0")
    parser.add_argument("--out-dir", default=str(REPO / "build" / "share-ns-compare"),
                        help="with --compare: where the guests write their JSON and the profile")
    args = parser.parse_args(argv)
    if args.compare:
        return compare(args)
    if args.vm:
        return vm(args, argv)
    if args.ipvs_modules:
        load_built_ipvs(args.ipvs_modules, args.ipvs_mode if args.ipvs_mode is not None
                        else 2 if args.mode == "kernel" else 0)
    if os.geteuid() != 0 or not os.path.exists("/proc/net/ip_vs"):
        print("needs root and IPVS (use --vm)", file=sys.stderr)
        return 2
    print(f"kernel {os.uname().release}, {os.cpu_count()} cpus, {args.backend} backend")
    nss = Namespaces()
    figures: dict[str, list[dict[str, Any]]] = {"attach": [], "fanout": [], "memory": []}
    try:
        only = set(args.only or ["attach", "fanout", "memory"]) - {args.skip}
        if "attach" in only:
            attach_bench([int(s) for s in args.sizes.split(",")], args.dests, nss, args.backend, args.mode,
                         figures["attach"])
        if "fanout" in only and args.fanout_rounds:
            fanout_interleaved([int(s) for s in args.fanout.split(",")], args.fanout_services, nss, args.backend,
                               args.mode, figures["fanout"], args.fanout_rounds, args.profile)
        elif "fanout" in only:
            fanout_bench([int(s) for s in args.fanout.split(",")], args.fanout_services, nss, args.backend,
                         args.mode, figures["fanout"], args.profile, args.fanout_repeat)
        if "memory" in only:
            services, pods = (int(x) for x in args.memory_size.split("x"))
            memory_bench(services, pods, args.dests, nss, args.backend, args.mode, figures["memory"])
    finally:
        nss.close()
        if args.json:
            Path(args.json).write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
