#!/usr/bin/env python3
"""Benchmark of the whole agent at cluster scale on the host: memory and idle CPU.

The agent (svcproxy.agent.Agent, the code `svcproxy run` runs: real watchers through
the official client, the reconcile loop, the health/metrics server) runs in a child
process against tests/fakeapi.py on loopback, which serves N Services with one
EndpointSlice of M endpoints each (default 10,000 x 10) and this node's Node object.
Printed, all from the same run:

* start: seconds from process start until /readyz answers 200 (lists done, first
  full sync programmed), and the CPU it took;
* resident memory after the first sync and its peak (VmRSS/VmHWM of the child);
* idle: CPU per second while nothing changes, over a window of several periodic full
  syncs, and CPU per full sync;
* the baseline, in a second child started the same way: the same idle window with
  every full sync translating the whole cluster again (what full syncs did before
  translation became incremental), patched in by this script only.

What is simulated: the API server (tests/fakeapi.py) and the kernel. This machine has
no IPVS, so the agent's backend is an in-memory table whose read returns a fresh copy
(new objects, as a kernel read decodes them). The kernel read's own cost is not in
these figures: bench/ipvs.py measures it (`--codec` for the decoder on the host, `--vm`
against a real kernel).

    bench/agent.py                                  # 10,000 x 10, sync period 10 s
    bench/agent.py --services 2000 --idle 30
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))

TICK = os.sysconf("SC_CLK_TCK")
NODE = "node-0"


# ----------------------------------------------------------------------------- child


def child(args: argparse.Namespace) -> int:
    import logging

    from svcproxy.agent import Agent, AgentConfig
    from svcproxy.ipvs.backend import MemoryBackend
    from svcproxy.model import Destination, Table, VirtualService

    class CopyingBackend(MemoryBackend):
        """Reads return equal values in new objects, like a kernel read; applied
        operations are not kept (MemoryBackend keeps them for tests)."""

        def read(self, counts: bool | None = None) -> Table:
            return Table({k: VirtualService(vs.key, vs.scheduler, vs.persistence, vs.flags,
                                            tuple(Destination(d.address, d.port, d.weight, d.forward, 0, 0)
                                                  for d in vs.destinations))
                          for k, vs in self.table.services.items()})

        def apply(self, ops: Any) -> Any:
            failed = super().apply(ops)
            self.applied.clear()
            return failed

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = AgentConfig(node_name=NODE, kubeconfig=args.kubeconfig, sync_period=args.sync_period,
                         health_bind="127.0.0.1:0", healthcheck_bind_host="127.0.0.1")
    agent = Agent(config, CopyingBackend())
    if args.retranslate:
        proxier = agent.proxier
        original = proxier.sync

        def sync(force_full: bool = False) -> Any:
            proxier._translate_all = True  # the baseline: every full sync translates everything
            return original(force_full)

        proxier.sync = sync  # type: ignore[method-assign]
    agent.install_signal_handlers()
    return agent.run()


# ----------------------------------------------------------------------------- parent


def proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def proc_mem(pid: int) -> tuple[float, float]:
    text = Path(f"/proc/{pid}/status").read_text()
    rss = int(re.search(r"VmRSS:\s+(\d+)", text).group(1)) / 1024  # type: ignore[union-attr]
    hwm = int(re.search(r"VmHWM:\s+(\d+)", text).group(1)) / 1024  # type: ignore[union-attr]
    return rss, hwm


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, ""


def metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name):
            total += float(line.rsplit(" ", 1)[1])
    return total


class Child:
    def __init__(self, kubeconfig: str, sync_period: float, retranslate: bool, log: Path) -> None:
        cmd = [sys.executable, __file__, "--child", "--kubeconfig", kubeconfig, "--sync-period", str(sync_period)]
        if retranslate:
            cmd.append("--retranslate")
        self.log = log
        self.started = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log.open("w"))
        self.port = 0

    def wait_port(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(r"health and metrics on [^:]+:(\d+)", self.log.read_text())
            if found:
                self.port = int(found.group(1))
                return
            if self.proc.poll() is not None:
                raise SystemExit(f"agent exited ({self.proc.returncode}):\n{self.log.read_text()[-3000:]}")
            time.sleep(0.05)
        raise SystemExit("agent did not start its health server")

    def wait_ready(self, timeout: float = 600) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if get(f"http://127.0.0.1:{self.port}/readyz")[0] == 200:
                return time.monotonic() - self.started
            if self.proc.poll() is not None:
                raise SystemExit(f"agent exited ({self.proc.returncode}):\n{self.log.read_text()[-3000:]}")
            time.sleep(0.1)
        raise SystemExit("agent not ready in time")

    def metrics(self) -> str:
        return get(f"http://127.0.0.1:{self.port}/metrics")[1]

    def full_syncs(self) -> float:
        return metric(self.metrics(), 'svcproxy_syncs_total{mode="full"}')

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def measure(label: str, kubeconfig: str, args: argparse.Namespace, retranslate: bool, workdir: Path) -> dict[str, float]:
    child_ = Child(kubeconfig, args.sync_period, retranslate, workdir / f"{label}.log")
    try:
        child_.wait_port()
        ready = child_.wait_ready()
        start_cpu = proc_cpu(child_.proc.pid)
        rss, hwm = proc_mem(child_.proc.pid)
        time.sleep(args.settle)  # past the first sync's aftermath
        cpu0, t0, syncs0 = proc_cpu(child_.proc.pid), time.monotonic(), child_.full_syncs()
        time.sleep(args.idle)
        cpu1, t1, syncs1 = proc_cpu(child_.proc.pid), time.monotonic(), child_.full_syncs()
        rss_after, hwm_after = proc_mem(child_.proc.pid)
        text = child_.metrics()
        if metric(text, "svcproxy_real_servers") != args.services * args.endpoints:
            raise SystemExit(f"{label}: the agent's table is not the cluster's:\n{text[:2000]}")
    finally:
        child_.stop()
    idle_cpu = cpu1 - cpu0
    syncs = syncs1 - syncs0
    result = {"ready": ready, "start_cpu": start_cpu, "rss": rss, "hwm": hwm, "rss_after": rss_after,
              "hwm_after": hwm_after, "idle_cpu_per_s": idle_cpu / (t1 - t0), "syncs": syncs,
              "cpu_per_full_sync": idle_cpu / syncs if syncs else float("nan")}
    print(f"  {label}: ready after {ready:.1f} s ({start_cpu:.1f} s CPU); RSS {rss:.0f} MB (peak {hwm:.0f} MB); "
          f"idle {t1 - t0:.0f} s: {syncs:.0f} full syncs, {idle_cpu:.2f} s CPU "
          f"= {100 * result['idle_cpu_per_s']:.2f}% of a core, {1000 * result['cpu_per_full_sync']:.0f} ms per "
          f"full sync; RSS after {rss_after:.0f} MB (peak {hwm_after:.0f} MB)", flush=True)
    return result


def parent(args: argparse.Namespace) -> int:
    from core import endpoint_slice, service  # bench/core.py's synthetic cluster
    from fakeapi import FakeApiServer

    server = FakeApiServer(history_limit=1000, bookmark_interval=60).start()
    t = time.monotonic()
    for i in range(args.services):
        server.apply(service(i))
        server.apply(endpoint_slice(i, endpoints=args.endpoints))
    server.apply({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE, "labels": {}},
                  "status": {"addresses": [{"type": "InternalIP", "address": "192.168.0.10"}]}})
    print(f"agent benchmark: {args.services} Services x {args.endpoints} endpoints on the fake API server "
          f"({time.monotonic() - t:.1f} s to load); sync period {args.sync_period:g} s, idle window {args.idle:g} s",
          flush=True)
    with tempfile.TemporaryDirectory(prefix="svcproxy-bench-agent-") as tmp:
        workdir = Path(tmp)
        kubeconfig = server.write_kubeconfig(workdir / "kubeconfig")
        now = measure("incremental (svcproxy as it is)", kubeconfig, args, False, workdir)
        before = measure("baseline: full syncs translate everything", kubeconfig, args, True, workdir)
    server.stop()
    print()
    print(f"  idle CPU: {100 * now['idle_cpu_per_s']:.2f}% of a core vs {100 * before['idle_cpu_per_s']:.2f}% "
          f"({now['idle_cpu_per_s'] / before['idle_cpu_per_s']:.2f}x); per full sync "
          f"{1000 * now['cpu_per_full_sync']:.0f} ms vs {1000 * before['cpu_per_full_sync']:.0f} ms")
    print(f"  at the default --sync-period 30 s that is {100 * now['cpu_per_full_sync'] / 30:.2f}% of a core "
          f"(baseline {100 * before['cpu_per_full_sync'] / 30:.2f}%); the read is simulated (building the objects "
          "a decoded read builds), the kernel's own time is not in it: see bench/ipvs.py")
    print(f"  resident memory: {now['rss_after']:.0f} MB, peak {now['hwm_after']:.0f} MB (goal < 300 MB)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--services", type=int, default=10_000)
    parser.add_argument("--endpoints", type=int, default=10)
    parser.add_argument("--sync-period", type=float, default=10.0)
    parser.add_argument("--idle", type=float, default=60.0, help="seconds of the idle window")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds between ready and the idle window")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--kubeconfig", help=argparse.SUPPRESS)
    parser.add_argument("--retranslate", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    return child(args) if args.child else parent(args)


if __name__ == "__main__":
    sys.exit(main())
