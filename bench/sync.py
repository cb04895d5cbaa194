#!/usr/bin/env python3
"""Benchmark of the whole `svcproxy sync` and `plan` commands against `ipvsadm -R`.

Run with --vm (the test VM: this machine's kernel has no IPVS). For a cluster of N
Services (default 2,000) with one EndpointSlice of 10 endpoints each, it times, as a
user runs them, each in a fresh network namespace (an empty IPVS table):
  - `ipvsadm -R` of a restore file holding exactly the table svcproxy programs (the
    baseline: the tool people use to load a table);
  - `svcproxy sync -f cluster.json` (the default netlink backend), from empty;
  - the same from the YAML file `kubectl get -o yaml` would give;
  - `svcproxy plan -f cluster.json` with nothing to do (the table already in place);
  - `svcproxy sync --backend ipvsadm`, from empty.
Every time is the wall clock of the whole process (start, imports, parsing,
translation, reading and writing the kernel's table), median of --repeat runs,
printed with its ratio to `ipvsadm -R` in the same run. Figures, not assertions.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from core import endpoint_slice, service  # noqa: E402  (bench/core.py)
from vmboot import run_in_vm  # noqa: E402  (bench/vmboot.py)

from svcproxy.diff import diff  # noqa: E402
from svcproxy.ipvs.ipvsadm_render import render  # noqa: E402
from svcproxy.kube.translate import NodeInfo, TranslateConfig, translate  # noqa: E402
from svcproxy.model import Table  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
NODE = "node-0"


def write_inputs(workdir: Path, services: int, endpoints: int) -> tuple[Path, Path, Path, int]:
    items = [obj for i in range(services) for obj in (service(i), endpoint_slice(i, endpoints=endpoints))]
    doc = {"apiVersion": "v1", "kind": "List", "items": items}
    as_json, as_yaml, restore = workdir / "cluster.json", workdir / "cluster.yaml", workdir / "restore.txt"
    as_json.write_text(json.dumps(doc))
    import yaml

    as_yaml.write_text(yaml.dump(doc, Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper)))
    table = translate(doc["items"][0::2], doc["items"][1::2], TranslateConfig(node=NodeInfo(NODE))).table
    ops = diff(table, Table())
    restore.write_text("\n".join(render(ops)) + "\n")
    return as_json, as_yaml, restore, len(ops)


def in_fresh_netns(argv: list[str], *, stdin: Path | None = None, prepare: list[str] | None = None) -> float:
    """Seconds the command takes in a new network namespace (``prepare`` runs first,
    untimed); the namespace is deleted afterwards."""
    name = f"bench-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        # Loopback up, as on any node: IPVS refuses IPv4 real servers while lo is down.
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        if prepare:
            subprocess.run(["ip", "netns", "exec", name, *prepare], check=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
        with open(stdin or "/dev/null", "rb") as f:
            start = time.perf_counter()
            proc = subprocess.run(["ip", "netns", "exec", name, *argv], stdin=f, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE)
            elapsed = time.perf_counter() - start
        if proc.returncode not in (0, 2):  # plan: 2 = changes pending
            raise SystemExit(f"{' '.join(argv[:4])} failed ({proc.returncode}): {proc.stderr.decode()[-500:]}")
        return elapsed
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


def median(repeat: int, fn: Callable[[], float]) -> float:
    return statistics.median(fn() for _ in range(repeat))


def bench(args: argparse.Namespace) -> int:
    svcproxy = [sys.executable, "-m", "svcproxy"]
    common = ["--node", NODE]
    with tempfile.TemporaryDirectory() as tmp:
        as_json, as_yaml, restore, n_ops = write_inputs(Path(tmp), args.services, args.endpoints)
        sync_json = [*svcproxy, "sync", "-f", str(as_json), *common]
        rows = [
            ("ipvsadm -R (baseline)", lambda: in_fresh_netns(["ipvsadm", "-R"], stdin=restore)),
            ("svcproxy sync -f JSON", lambda: in_fresh_netns(sync_json)),
            ("svcproxy sync -f YAML", lambda: in_fresh_netns([*svcproxy, "sync", "-f", str(as_yaml), *common])),
            ("svcproxy plan, nothing to do",
             lambda: in_fresh_netns([*svcproxy, "plan", "-f", str(as_json), *common], prepare=sync_json)),
            ("svcproxy sync --backend ipvsadm",
             lambda: in_fresh_netns([*sync_json[:-2], "--backend", "ipvsadm", *common])),
        ]
        print(f"sync benchmark: {args.services} Services x {args.endpoints} endpoints ({n_ops} operations from an "
              f"empty table), each command in a fresh network namespace, median of {args.repeat}", flush=True)
        base = None
        for label, fn in rows:
            seconds = median(args.repeat, fn)
            base = base or seconds
            print(f"  {label:34} {seconds:8.2f} s   {seconds / base:5.2f}x ipvsadm -R", flush=True)
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=2000)
    parser.add_argument("--endpoints", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--vm", action="store_true", help="boot the test VM (vng) and run there")
    parser.add_argument("--memory", default="2G", help="VM memory (with --vm)")
    args = parser.parse_args(argv)
    if args.vm:
        return run_in_vm("sync.py", [a for a in argv if a != "--vm"], memory=args.memory,
                         modules=["ip_vs", "ip_vs_rr"])
    return bench(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
