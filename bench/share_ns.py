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
  (``Proxier.sync``, a partial sync) with 0, 1, 10 and 50 attached namespaces.
* Kernel memory per Pod namespace (slab, percpu, MemAvailable deltas) at 10,000
  services x 10 namespaces: the namespace with its NIC, its VIP routes, its table.

Tables are programmed over netlink (``--backend ipvsadm``: with ipvsadm). Runs as
root where IPVS exists, in namespaces of its own (replicate mode leaves the VM's root
namespace alone)::

    bench/share_ns.py --vm                          # boots the VM (virtme-ng, emulated)
    bench/share_ns.py --vm --sizes 1000,2000        # smaller
    bench/share_ns.py --vm --only fanout --profile /tmp/fanout.prof   # cProfile of the 50-namespace sync
    bench/share_ns.py --vm --mode kernel --ipvs-modules "$(tools/build-ipvs-module | tail -n 1)"
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable

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
from vmboot import run_in_vm  # noqa: E402  (bench/vmboot.py)

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
        if mode == "kernel":
            self.flush_root = True
            return None
        return self.add(nic=False)

    def close(self) -> None:
        if self.flush_root:
            subprocess.run(["ipvsadm", "-C"], capture_output=True)
        for name in self.names:
            subprocess.run(["ip", "netns", "delete", name], capture_output=True)


def attach_bench(sizes: list[int], dests: int, nss: Namespaces, kind: str, mode: str) -> None:
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
        print(f"| {n:,} | {t_node:.2f} s ({node_ops:,} ops) | {t_steady:.2f} s | {t_attach:.2f} s "
              f"({len(report.operations):,} ops) | {t_prep:.2f} s | {t_readopt:.2f} s | "
              f"{t_attach / t_node:.2f} | {t_attach / t_steady:.2f} |", flush=True)


def fanout_bench(counts: list[int], services: int, nss: Namespaces, kind: str, mode: str,
                 profile: str | None = None) -> None:
    from k8s_objects import endpoint, endpoint_slice, node, service, slice_port, svc_port

    from svcproxy.kube.store import Kind
    from svcproxy.kube.translate import NodeInfo, TranslateConfig
    from svcproxy.podns.attach import AttachResult, PodNamespaces
    from svcproxy.reconcile import Proxier, ProxierConfig

    decision = decide(mode)
    print(f"\n## Fan-out of one endpoint change ({services} Services x 2 endpoints; one real server added; "
          f"{mode} mode)\n")
    print("| attached namespaces | partial sync | operations | per namespace (over 0 attached) | full sync before it |")
    print("|---:|---:|---:|---:|---:|")
    node_path = nss.node(mode)
    pods = [nss.add() for _ in range(max(counts))]
    objs: list[dict[str, Any]] = [node("node-a")]
    for i in range(services):
        objs.append(service(f"s{i}", cluster_ips=(f"10.96.{i // 250}.{i % 250 + 1}",),
                            ports=[svc_port("http", 80, target_port=8080)]))
        objs.append(endpoint_slice(f"s{i}", ports=[slice_port("http", 8080)],
                                   endpoints=[endpoint(f"10.244.{i // 100}.{(i % 100) * 2 + j + 1}")
                                              for j in range(2)]))
    kinds = {"Node": Kind.NODE, "Service": Kind.SERVICE, "EndpointSlice": Kind.ENDPOINT_SLICE}
    base: float | None = None
    for round_, k in enumerate([0, *counts]):
        proxier = Proxier(node_backend(kind, node_path),
                          # no time-based full syncs: the measured sync must be the partial one
                          ProxierConfig(translate=TranslateConfig(node=NodeInfo("node-a", ("192.168.49.2",))),
                                        sync_period=1e9, drain_check_period=1e9))
        for obj in objs:
            proxier.on_event(kinds[obj["kind"]], "ADDED", obj)
        proxier.on_synced(Kind.SERVICE)
        proxier.on_synced(Kind.ENDPOINT_SLICE)
        attacher = PodNamespaces(proxier, decision, make_target=lambda p: pod_target(p, pod_factory(kind)))
        for path in pods[:k]:
            assert attacher.attach(path) in (AttachResult.ATTACHED, AttachResult.SHARED)
        t_first, first = timed(lambda: proxier.sync(force_full=True))
        assert first.failed == 0, first
        # one real server added to one Service (another one each round, so earlier
        # rounds' changes never show up in this round's measured partial sync)
        i = round_
        changed = endpoint_slice(f"s{i}", ports=[slice_port("http", 8080)],
                                 endpoints=[endpoint(f"10.244.{i // 100}.{(i % 100) * 2 + j + 1}") for j in range(2)]
                                 + [endpoint(f"10.244.250.{i + 1}")])
        proxier.on_event(Kind.ENDPOINT_SLICE, "MODIFIED", changed)
        if profile and k == max(counts):
            import cProfile
            import pstats
            prof = cProfile.Profile()
            t, result = timed(lambda: prof.runcall(proxier.sync))
            prof.dump_stats(profile)
            pstats.Stats(prof).sort_stats("cumulative").print_stats(25)
        else:
            t, result = timed(proxier.sync)
        assert not result.full and result.failed == 0, result
        assert len(result.operations) == (1 if decision.shared else k + 1), result.operations
        if base is None:
            base = t
        per = "" if k == 0 else f"{(t - base) / k * 1000:.1f} ms"
        print(f"| {k} | {t:.3f} s | {len(result.operations)} | {per} | {t_first:.1f} s |", flush=True)


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


def memory_bench(services: int, pods: int, dests: int, nss: Namespaces, kind: str, mode: str) -> None:
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
        print(f"| {name} | {(m1['Slab'] - m0['Slab']) / pods:,.0f} kB | "
              f"{(m1['SUnreclaim'] - m0['SUnreclaim']) / pods:,.0f} kB | "
              f"{(m1.get('Percpu', 0) - m0.get('Percpu', 0)) / pods:,.0f} kB | {used:,.0f} kB |")
    (_, (_, before)), (_, (_, after)) = steps[-2], steps[-1]
    grown = sorted(((b - before.get(c, 0), c) for c, b in after.items()), reverse=True)[:6]
    print(f"\nSlab caches that grew most in the last step ({steps[-1][0]}), per namespace: "
          + ", ".join(f"{c} {d / pods / 1024:,.0f} KiB" for d, c in grown))


def vm(args: argparse.Namespace, argv: list[str]) -> int:
    # with built modules the guest loads only what ip_vs.ko needs; load_built_ipvs does the rest
    modules = (["veth", "nf_conntrack", "nf_defrag_ipv4", "nf_defrag_ipv6", "libcrc32c", "nf_nat"]
               if args.ipvs_modules else ["ip_vs", "ip_vs_rr", "veth"])
    return run_in_vm("share_ns.py", [a for a in argv if a != "--vm"], memory=args.memory, modules=modules)


def load_built_ipvs(directory: str, mode: int) -> None:
    """ip_vs.ko with ``mode``, then every other IPVS module of the same build."""
    subprocess.run(["insmod", f"{directory}/ip_vs.ko", f"mode={mode}"], check=True)
    for ko in sorted(Path(directory).glob("ip_vs_*.ko")):
        subprocess.run(["insmod", str(ko)], check=False)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,10000", help="virtual services for the attach figure")
    parser.add_argument("--dests", type=int, default=2, help="real servers per virtual service (attach)")
    parser.add_argument("--fanout", default="1,10,50", help="attached namespace counts for the fan-out figure")
    parser.add_argument("--fanout-services", type=int, default=200)
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
    parser.add_argument("--memory", default="2G", help="VM memory (with --vm)")
    args = parser.parse_args(argv)
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
    try:
        only = set(args.only or ["attach", "fanout", "memory"]) - {args.skip}
        if "attach" in only:
            attach_bench([int(s) for s in args.sizes.split(",")], args.dests, nss, args.backend, args.mode)
        if "fanout" in only:
            fanout_bench([int(s) for s in args.fanout.split(",")], args.fanout_services, nss, args.backend,
                         args.mode, args.profile)
        if "memory" in only:
            services, pods = (int(x) for x in args.memory_size.split("x"))
            memory_bench(services, pods, args.dests, nss, args.backend, args.mode)
    finally:
        nss.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
