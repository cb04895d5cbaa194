#!/usr/bin/env python3
"""Benchmark of `svcproxy plan` as a user runs it, against json.load of its own input.

Writes a cluster of N Services (default 10,000) with one EndpointSlice of 10
endpoints each as one JSON List, then times, in this run and on this machine:
  - json.load of that file (the floor: reading the input at all);
  - the whole `svcproxy plan -f FILE -o json` command, a fresh process, against an
    empty table given as --current-file (no kernel involved), output to a file;
  - the same with the text output.
Prints the medians and the ratios to json.load. Figures, not assertions.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.core import endpoint_slice, service  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def median_time(fn: object, repeat: int) -> float:
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()  # type: ignore[operator]
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=10_000)
    parser.add_argument("--endpoints", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cluster = Path(tmp) / "cluster.json"
        items = [obj for i in range(args.services) for obj in (service(i), endpoint_slice(i, endpoints=args.endpoints))]
        cluster.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))
        empty = Path(tmp) / "empty.save"
        empty.write_text("")
        out = Path(tmp) / "plan.out"
        env = {**os.environ, "PYTHONPATH": str(ROOT)}

        def load() -> None:
            with open(cluster, encoding="utf-8") as f:
                json.load(f)

        def plan(output: str) -> None:
            with open(out, "w") as f:
                rc = subprocess.run([sys.executable, "-m", "svcproxy", "plan", "-f", str(cluster), "--node", "node-0",
                                     "--current-file", str(empty), "-o", output], stdout=f,
                                    stderr=subprocess.DEVNULL, env=env).returncode
            if rc != 2:
                raise SystemExit(f"plan exited {rc}, expected 2 (changes pending)")

        floor = median_time(load, args.repeat)
        as_json = median_time(lambda: plan("json"), args.repeat)
        size = out.stat().st_size
        as_text = median_time(lambda: plan("text"), args.repeat)
        mib = cluster.stat().st_size / 2**20
    print(f"plan benchmark: {args.services} Services x {args.endpoints} endpoints "
          f"(input {mib:.1f} MiB JSON; median of {args.repeat})")
    print(f"  json.load of the input          {floor:8.3f} s")
    print(f"  svcproxy plan -o json (command) {as_json:8.3f} s   {as_json / floor:5.1f}x json.load "
          f"(goal 3x; {size / 2**20:.1f} MiB written)")
    print(f"  svcproxy plan -o text (command) {as_text:8.3f} s   {as_text / floor:5.1f}x json.load")


if __name__ == "__main__":
    main()
