#!/usr/bin/env python3
"""The cyclic garbage collector under churn, in-process: what each collection costs.

The real reconcile loop (svcproxy.reconcile.Proxier) on an in-memory kernel table,
fed N Services (default 10,000) of 10 endpoints as the watchers would, then a stream
of partial syncs of C changed EndpointSlices each (default 10: 100 changes/s at the
agent's 0.1 s --min-sync-period), with a full sync every F of them (default 300:
--sync-period 30 at ten syncs a second). The loop's clock is simulated; the CPU is
this process's. Every collection is timed through gc.callbacks, by generation.

Each variant runs in a child process of its own (a fresh heap), one after the other
in the same invocation, so that they can be compared:

- ``none``: the collector as Python sets it up;
- ``agent``: what the agent does after each full sync (svcproxy.gcpause.LongLivedHeap).

With ``--namespaces``, the same with that many Pod namespaces attached, each one the
churn benchmark's simulated kernel table (bench/churn.py), to see where the loop's
time goes per sync.

    bench/churn_gc.py                       # both variants, 3,000 partial syncs each
    bench/churn_gc.py --syncs 6000 --changes 10 --full-every 300
    bench/churn_gc.py --variants agent --namespaces 0,50 --profile /tmp/loop.prof

Figures, not assertions.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

VARIANTS = ("none", "agent")


def quantile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] if s else 0.0


def child(args: argparse.Namespace) -> dict[str, Any]:
    from core import endpoint_slice, service  # bench/core.py

    from svcproxy.gcpause import LongLivedHeap
    from svcproxy.ipvs.backend import MemoryBackend
    from svcproxy.kube.store import Kind
    from svcproxy.kube.translate import NodeInfo, TranslateConfig
    from svcproxy.reconcile import Proxier, ProxierConfig

    collections: list[tuple[int, float]] = []  # (generation, seconds of CPU)
    started: list[float] = []

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started.append(time.process_time())
        elif started:
            collections.append((info["generation"], time.process_time() - started.pop()))

    gc.callbacks.append(on_gc)
    now = [1000.0]
    heap = LongLivedHeap() if args.variant == "agent" else None
    proxier = Proxier(MemoryBackend(), ProxierConfig(translate=TranslateConfig(node=NodeInfo("node-0", ("192.168.0.10",))),
                                                     sync_period=args.full_every * 0.1),
                      after_full_sync=heap.after_full_sync if heap else None, monotonic=lambda: now[0])
    if args.namespaces:
        from churn import recording_backend  # bench/churn.py: its simulated kernel

        from svcproxy.reconcile import Target

        sink = open(os.devnull, "w")
        for k in range(args.namespaces):
            proxier.attach(Target(f"pod-{k}", recording_backend(f"pod-{k}", None, sink)))
    for i in range(args.services):
        proxier.on_event(Kind.SERVICE, "ADDED", service(i))
        proxier.on_event(Kind.ENDPOINT_SLICE, "ADDED", endpoint_slice(i))
    for kind in (Kind.SERVICE, Kind.ENDPOINT_SLICE):
        proxier.on_synced(kind)
    proxier.sync()
    collections.clear()
    generation: dict[int, int] = {}
    partial: list[float] = []
    full: list[float] = []
    rss = [_rss()]
    seq = 0
    profile = None
    if args.profile:
        import cProfile

        profile = cProfile.Profile()
        profile.enable()
    for n in range(args.syncs):
        for _ in range(args.changes):
            i = seq % args.services
            generation[i] = generation.get(i, 0) + 1
            proxier.on_event(Kind.ENDPOINT_SLICE, "MODIFIED", endpoint_slice(i, generation[i]))
            seq = (seq * 7919 + 1) % (args.services * 13)
        now[0] += 0.1
        t = time.process_time()
        result = proxier.sync()
        (full if result.full else partial).append(time.process_time() - t)
        if n == args.syncs // 2:
            rss.append(_rss())
    rss.append(_rss())
    if profile is not None:
        profile.disable()
        profile.dump_stats(f"{args.profile}.{args.variant}.{args.namespaces}")
    gc.callbacks.remove(on_gc)
    by_gen = {g: [s for gg, s in collections if gg == g] for g in range(3)}
    return {"variant": args.variant, "namespaces": args.namespaces, "partial": partial, "full": full,
            "gc": {g: {"n": len(v), "total": sum(v), "max": max(v, default=0.0)} for g, v in by_gen.items()},
            "rss": rss, "frozen": gc.get_freeze_count(),
            "heap_full_collections": heap.full_collections if heap else 0}


def _rss() -> float:
    with open(f"/proc/{os.getpid()}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def report(r: dict[str, Any], base: dict[str, Any] | None) -> None:
    p = r["partial"]
    print(f"{r['variant']:>6}, {r['namespaces']} Pod namespaces: partial syncs {len(p)}: CPU p50 {1e3 * quantile(p, 0.5):.1f} ms, "
          f"p99 {1e3 * quantile(p, 0.99):.1f} ms, max {1e3 * max(p):.0f} ms, total {sum(p):.2f} s; "
          f"full syncs {len(r['full'])}: max {1e3 * max(r['full'], default=0):.0f} ms")
    for g, s in r["gc"].items():
        print(f"        generation {g} collections: {s['n']}, {s['total']:.2f} s CPU in all, slowest {1e3 * s['max']:.1f} ms")
    rss = r["rss"]
    print(f"        RSS after the first sync / halfway / at the end: {' / '.join(f'{x:.0f}' for x in rss)} MB; "
          f"frozen objects at the end {r['frozen']}; full collections by the freezer {r['heap_full_collections']}")
    if base is not None:
        bp = base["partial"]
        print(f"        against {base['variant']}, {base['namespaces']} Pod namespaces: p99 {quantile(p, 0.99) / quantile(bp, 0.99):.2f}x, "
              f"max {max(p) / max(bp):.2f}x, total {sum(p) / sum(bp):.2f}x")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--services", type=int, default=10_000)
    parser.add_argument("--syncs", type=int, default=3000)
    parser.add_argument("--changes", type=int, default=10, help="changed EndpointSlices per partial sync")
    parser.add_argument("--full-every", type=int, default=300, help="a full sync every this many syncs")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--namespaces", default="0", help="Pod namespace counts, e.g. 0,50: every variant with each")
    parser.add_argument("--profile", metavar="PREFIX", help="cProfile the partial syncs into PREFIX.VARIANT.COUNT")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--out", help="the results as JSON")
    args = parser.parse_args()
    if args.variant:
        args.namespaces = int(args.namespaces)
        print(json.dumps(child(args)))
        return 0
    print(f"load {os.getloadavg()[0]:.1f}; {args.services} Services x 10 endpoints, {args.syncs} partial syncs of "
          f"{args.changes} changes, a full sync every {args.full_every}", flush=True)
    results = []
    for variant, count in [(v, k) for k in args.namespaces.split(",") for v in args.variants.split(",")]:
        cmd = [sys.executable, __file__, "--variant", variant, "--services", str(args.services), "--syncs",
               str(args.syncs), "--changes", str(args.changes), "--full-every", str(args.full_every),
               "--namespaces", count] + (["--profile", args.profile] if args.profile else [])
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results.append(json.loads(out.splitlines()[-1]))
        report(results[-1], results[0] if len(results) > 1 else None)
        print(f"        load {os.getloadavg()[0]:.1f}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
