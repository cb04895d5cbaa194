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
        if "fanout" in only:
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
