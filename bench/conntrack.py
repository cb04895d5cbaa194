#!/usr/bin/env python3
"""Benchmark: reading a namespace's UDP conntrack entries, svcproxy's ctnetlink reader
against pyroute2's Conntrack (the baseline), in the same run.

A network namespace of its own gets N UDP entries (datagrams from distinct source
ports over loopback; one nftables rule makes conntrack track them), then each reader
dumps them (twice, the best kept) and the seconds and the ratio are printed, with a
kernel-filtered read of the entries to one destination port. Runs on the host (it
needs root, nft and the kernel's conntrack); entries expire after 30 s unanswered,
so N is kept where both reads finish well within that.

    bench/conntrack.py --entries 2000
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from svcproxy.node.conntrack import KernelConntrack  # noqa: E402
from svcproxy.podns.attach import in_namespace  # noqa: E402

RULES = "table inet t {\n chain o {\n type filter hook output priority 0; ct state new accept\n }\n}\n"


def pyroute2_read(fd: int) -> int:
    from pyroute2 import Conntrack  # type: ignore[import-untyped]
    from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple  # type: ignore[import-untyped]

    def read() -> int:
        with Conntrack() as ct:
            return sum(1 for _ in ct.dump_entries(tuple_orig=NFCTAttrTuple(proto=socket.IPPROTO_UDP)))

    return in_namespace(fd, read)


def best(fn, runs: int = 2) -> tuple[float, int]:  # type: ignore[no-untyped-def]
    times, n = [], 0
    for _ in range(runs):
        t = time.perf_counter()
        n = fn()
        times.append(time.perf_counter() - t)
    return min(times), n


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--entries", type=int, default=2000)
    args = p.parse_args()
    name = f"svcproxy-ctbench-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        subprocess.run(["ip", "netns", "exec", name, "nft", "-f", "-"], input=RULES, text=True, check=True)
        fd = os.open(f"/var/run/netns/{name}", os.O_RDONLY)

        def fill() -> None:
            for i in range(args.entries):
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                    s.sendto(b"x", ("127.0.0.1", 5000 + i % 50))

        in_namespace(fd, fill)
        ours = KernelConntrack(lambda fn: in_namespace(fd, fn))
        t_ours, n_ours = best(lambda: len(ours.flows(None)))
        t_one, n_one = best(lambda: len(ours.flows([("127.0.0.1", 5001)])))
        t_base, n_base = best(lambda: pyroute2_read(fd))
        print(f"entries: {args.entries} (load average {os.getloadavg()[0]:.1f})")
        print(f"svcproxy ctnetlink, all UDP:      {t_ours:8.3f} s  {n_ours} entries  "
              f"{1e6 * t_ours / max(n_ours, 1):.0f} us/entry")
        print(f"svcproxy ctnetlink, one port:     {t_one:8.3f} s  {n_one} entries (filtered in the kernel)")
        print(f"pyroute2 Conntrack (baseline):    {t_base:8.3f} s  {n_base} entries  "
              f"{1e6 * t_base / max(n_base, 1):.0f} us/entry")
        print(f"ratio baseline / svcproxy:        {t_base / t_ours:8.1f}x")
        os.close(fd)
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
