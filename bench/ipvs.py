#!/usr/bin/env python3
"""Benchmark of the IPVS backends against a real kernel: netlink vs ipvsadm.

N virtual services x M real servers (default 10,000 x 10, i.e. 110,000 operations
from an empty table). For the netlink backend, the ipvsadm backend and two
baselines, all in the same run so that ratios are meaningful:

* full apply from an empty table: ``ipvsadm -R`` on prebuilt text (baseline),
  IpvsadmBackend.apply, requests encoded beforehand and piped through one socket
  in windows of 256 and of the backend's default window (the floor: what the kernel
  itself costs, with and without
  acknowledgements), NetlinkBackend.apply (acks on every request, encoding inline
  instead of in a helper thread, and the default: only the last of each window asks,
  the next windows are encoded while the kernel works);
* full read: ``ipvsadm -Sn`` alone, ``-Sn`` + parse (IpvsadmBackend.read),
  ``-Ln`` + parse (read(counts=True), the one with connection counts),
  NetlinkBackend.read (always with counts; real servers from /proc/net/ip_vs), and
  the same with proc=False (one GET_DEST dump per service, its fallback);
* a 1% change (1% of the services each lose a real server, gain one and change a
  weight): apply alone, and read + diff + apply (what a full sync costs).

Runs as root where IPVS exists; it flushes the IPVS table of its namespace, so use
the throwaway VM::

    bench/ipvs.py --vm                       # boots the VM (virtme-ng, emulated)
    bench/ipvs.py --vm --services 2000       # smaller
    bench/ipvs.py --codec                    # host only: encoder/decoder speed

``--vm`` runs this script inside ``vng --disable-kvm`` (software emulation, where
Python is 10-30x slower than on the host: compare ratios, not seconds).
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import inspect
import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from svcproxy.diff import diff  # noqa: E402
from svcproxy.ipvs import nlconst, nldecode, nlencode, procfs  # noqa: E402
from svcproxy.ipvs.ipvsadm import IpvsadmBackend, parse_list, parse_save, render  # noqa: E402
from svcproxy.ipvs.netlink import NetlinkBackend, _Channel, _new_socket  # noqa: E402
from svcproxy.model import Destination, OpKind, Operation, Protocol, ServiceKey, Table, VirtualService  # noqa: E402
from svcproxy.reconcile import paused_gc  # noqa: E402
from vmboot import run_in_vm  # noqa: E402  (bench/vmboot.py)


CLONE_NEWNET = 0x40000000
#: NetlinkBackend's own default window (requests per datagram).
DEFAULT_WINDOW: int = inspect.signature(NetlinkBackend).parameters["window"].default


def build_table(services: int, dests: int) -> Table:
    out = []
    for i in range(services):
        key = ServiceKey(Protocol.TCP, f"10.96.{i // 250}.{i % 250 + 1}", 80)
        ds = []
        for j in range(dests):
            n = i * dests + j
            ds.append(Destination(f"10.{100 + n // 62500}.{n // 250 % 250}.{n % 250 + 1}", 8080))
        out.append(VirtualService(key, "rr", None, frozenset(), tuple(sorted(ds, key=lambda d: d.key))))
    return Table.of(out)


def changed(table: Table, percent: float) -> Table:
    """1% of the services (spread evenly): one real server gone, one new, one weight changed."""
    services = dict(table.services)
    keys = sorted(services)
    step = max(1, round(100 / percent))
    for n, key in enumerate(keys[::step]):
        vs = services[key]
        dests = list(vs.destinations)
        if dests:
            dests.pop(0)
        if dests:
            d = dests[0]
            dests[0] = Destination(d.address, d.port, d.weight + 1, d.forward)
        dests.append(Destination(f"10.99.{n // 250 % 250}.{n % 250 + 1}", 8080))
        services[key] = vs.with_destinations(dests)
    return Table(services)


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


# ----------------------------------------------------------------------------- the floor


def floor_apply(ops: list[Operation], *, acks: bool, window: int = 256) -> Callable[[], int]:
    """Requests encoded and packed into datagrams beforehand; the returned function
    only sends them and reads the answers (the least any backend can do)."""
    sock = _new_socket(8 << 20, 60.0)
    channel = _Channel(sock, 60.0)
    family = channel.family
    encoder = nlencode.Encoder()
    bodies = [encoder.encode(op) for op in ops]
    grams: list[tuple[bytes, int, int]] = []  # datagram, answers expected, last seq
    seq = 1000
    for i in range(0, len(bodies), window):
        chunk = bodies[i : i + window]
        parts = []
        for k, body in enumerate(chunk):
            loud = acks or k == len(chunk) - 1
            flags = nlconst.NLM_F_REQUEST | (nlconst.NLM_F_ACK if loud else 0)
            parts.append(nlencode.frame(family, flags, seq + k, body))
        grams.append((b"".join(parts), len(chunk) if acks else 1, seq + len(chunk) - 1))
        seq += len(chunk)

    def run() -> int:
        errors = 0
        buf = bytearray(1 << 16)
        unpack = struct.unpack_from
        try:
            for data, expected, last in grams:
                sock.send(data)
                while expected:
                    n = sock.recv_into(buf)
                    off = 0
                    while off < n:
                        length, mtype, _, mseq, _ = unpack("=IHHII", buf, off)
                        if mtype == nlconst.NLMSG_ERROR:
                            if unpack("=i", buf, off + 16)[0]:
                                errors += 1
                            if acks or mseq == last:
                                expected -= 1
                        off += (length + 3) & ~3
        finally:
            sock.close()
        return errors

    return run


# ----------------------------------------------------------------------------- report


class Report:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, float]] = []

    def add(self, section: str, name: str, seconds: float) -> None:
        self.rows.append((section, name, seconds))
        print(f"  {section:<7} {name:<44} {seconds:9.2f} s", flush=True)

    def get(self, section: str, name: str) -> float:
        return next(s for sec, n, s in self.rows if sec == section and n == name)

    def table(self, base: dict[str, str]) -> str:
        lines = [
            f"| {'':<7} | {'method':<46} | {'seconds':>8} | {'vs baseline':>11} |",
            f"|{'-' * 9}|{'-' * 48}|{'-' * 9}:|{'-' * 12}:|",
        ]
        for section, name, seconds in self.rows:
            ref = self.get(section, base[section])
            ratio = f"{ref / seconds:.2f}x" if seconds > 0 else "-"
            lines.append(f"| {section:<7} | {name:<46} | {seconds:8.2f} | {ratio:>11} |")
        return "\n".join(lines)


class Namespaces:
    """Fresh network namespaces for the measurements, entered by this thread.

    Each full apply runs in a new namespace because a deleted real server stays in
    its namespace's "trash" list for a minute or two, and every add scans that
    list: after a flush of 100,000 servers the next full apply is several times
    slower (seen in the VM). Namespaces are kept (an fd each) until the end, so the
    kernel does not clean them up in the background during a later measurement.
    """

    def __init__(self) -> None:
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.kept: list[int] = []

    def fresh(self) -> None:
        if self.libc.unshare(CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET) failed")
        self.kept.append(os.open("/proc/thread-self/ns/net", os.O_RDONLY))
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
        # Kernel 6.1 recomputes every service's and real server's rate estimator in a
        # timer every 2 s: with 110,000 of them that is background load, growing
        # with the table, that belongs to neither backend. Off for the measurements.
        subprocess.run(["sysctl", "-qw", "net.ipv4.vs.run_estimation=0"], check=False)

    def close(self) -> None:
        for fd in self.kept:
            os.close(fd)


def gc_paused(fn: Callable[[], object]) -> object:
    with paused_gc():
        return fn()


def best(repeat: int, fn: Callable[[], object], clock: Callable[[], float] = time.perf_counter) -> tuple[float, object]:
    """The fastest of ``repeat`` runs (the VM shares the machine: the minimum is
    the least disturbed one)."""
    times, result = [], None
    for _ in range(repeat):
        start = clock()
        result = fn()
        times.append(clock() - start)
    return min(times), result


def kernel_bench(args: argparse.Namespace) -> int:
    if os.geteuid() != 0 or not os.path.exists("/proc/net/ip_vs"):
        print("needs root and IPVS (modprobe ip_vs): run with --vm", file=sys.stderr)
        return 2
    n_ops = args.services * (1 + args.dests)
    print(f"kernel {os.uname().release}, {os.cpu_count()} cpus; {args.services} services x {args.dests} real servers"
          f" = {n_ops} operations; best of {args.repeat}", flush=True)
    table = build_table(args.services, args.dests)
    plan = diff(table, Table())
    text = "".join(line + "\n" for line in render(plan))
    report = Report()
    namespaces = Namespaces()
    windows = [int(w) for w in args.windows.split(",")]

    def check(what: str, want: Table) -> None:
        got = NetlinkBackend().read()
        if got != want:
            raise SystemExit(f"{what}: the kernel table is not the desired one ({len(got)} services)")

    # ---- full apply, each run in a fresh namespace
    applies: list[tuple[str, Callable[[], Callable[[], object]]]] = [
        ("ipvsadm -R (prebuilt text)",
         lambda: lambda: subprocess.run(["ipvsadm", "-R"], input=text, text=True, check=True)),
        ("IpvsadmBackend.apply", lambda: lambda: IpvsadmBackend().apply(plan)),
        ("floor: pre-encoded, ack every request", lambda: floor_apply(plan, acks=True)),
        ("floor: pre-encoded, ack last of window", lambda: floor_apply(plan, acks=False)),
        (f"floor: pre-encoded, ack last of window, window={DEFAULT_WINDOW}",
         lambda: floor_apply(plan, acks=False, window=DEFAULT_WINDOW)),
        ("NetlinkBackend.apply acks=True", lambda: lambda: NetlinkBackend(acks=True).apply(plan)),
        ("NetlinkBackend.apply prefetch=False (encode inline)",
         lambda: lambda: NetlinkBackend(prefetch=False).apply(plan)),
    ]
    def netlink_apply(window: int) -> Callable[[], Callable[[], object]]:
        return lambda: lambda: NetlinkBackend(window=window).apply(plan)

    for w in windows:
        label = "NetlinkBackend.apply (default)" if w == DEFAULT_WINDOW else f"NetlinkBackend.apply window={w}"
        applies.append((label, netlink_apply(w)))
    applies += [
        ("NetlinkBackend.apply compiled=False (Python encoder)",
         lambda: lambda: NetlinkBackend(compiled=False).apply(plan)),
        # As the agent's full syncs run it: with the cyclic GC paused (reconcile.paused_gc).
        ("NetlinkBackend.apply, GC paused (as in the agent)",
         lambda: lambda: gc_paused(lambda: NetlinkBackend().apply(plan))),
        ("NetlinkBackend.apply prefetch=False, GC paused",
         lambda: lambda: gc_paused(lambda: NetlinkBackend(prefetch=False).apply(plan))),
    ]
    for name, make in applies:
        times = []
        for rep in range(args.repeat):
            namespaces.fresh()
            fn = make()
            seconds, result = timed(fn)
            if result not in (None, [], 0) and not hasattr(result, "returncode"):
                raise SystemExit(f"{name}: failures: {str(result)[:500]}")
            check(name, table)
            times.append(seconds)
            if name != applies[-1][0] or rep < args.repeat - 1:
                subprocess.run(["ipvsadm", "-C"], check=True)  # free it; keep the last table for the reads
        report.add("apply", name, min(times))
    family = _Channel(_new_socket(1 << 20, 10.0), 10.0).family
    def encode_plan(compiled: bool) -> Callable[[], object]:
        return lambda: nlencode.Encoder(compiled=compiled).messages(plan, family, nlconst.NLM_F_REQUEST, 1)

    for label, fn in [
        ("(encoding alone, no kernel: Encoder.messages)", encode_plan(True)),
        ("(encoding alone, GC paused)", lambda: gc_paused(encode_plan(True))),
        ("(encoding alone, Python encoder: compiled=False)", encode_plan(False)),
    ]:
        seconds, _ = best(args.repeat, fn)
        report.add("apply", label, seconds)

    # ---- full read (the table of the last apply is in place)
    outputs: dict[str, str] = {}

    def ipvsadm_text(flag: str) -> None:
        outputs[flag] = subprocess.run(["ipvsadm", flag], capture_output=True, text=True, check=True).stdout

    reads: list[tuple[str, Callable[[], object]]] = [
        ("ipvsadm -Sn (no parsing)", lambda: ipvsadm_text("-Sn")),
        ("parse_save of that output (no ipvsadm)", lambda: parse_save(outputs["-Sn"])),
        ("IpvsadmBackend.read (-Sn + parse)", lambda: IpvsadmBackend().read()),
        ("ipvsadm -Ln (no parsing)", lambda: ipvsadm_text("-Ln")),
        ("IpvsadmBackend.read(counts=True) (-Ln + parse)", lambda: IpvsadmBackend().read(counts=True)),
        ("NetlinkBackend.read (with counts)", lambda: NetlinkBackend().read()),
        ("NetlinkBackend.read proc=False (a GET_DEST dump per service)", lambda: NetlinkBackend(proc=False).read()),
        ("NetlinkBackend.read compiled=False (/proc parsed in Python)", lambda: NetlinkBackend(compiled=False).read()),
        # As the agent's full syncs run them: with the cyclic GC paused (reconcile.paused_gc).
        ("IpvsadmBackend.read (-Sn + parse), GC paused", lambda: gc_paused(IpvsadmBackend().read)),
        ("IpvsadmBackend.read(counts=True), GC paused", lambda: gc_paused(lambda: IpvsadmBackend().read(counts=True))),
        ("NetlinkBackend.read, GC paused (as in the agent)", lambda: gc_paused(NetlinkBackend().read)),
    ]
    for name, fn in reads:
        seconds, result = best(args.repeat, fn)
        if isinstance(result, Table) and result != table:
            raise SystemExit(f"{name}: read a different table")
        report.add("read", name, seconds)
    assert parse_list(outputs["-Ln"]) == table

    # ---- a 1% change, applied and reverted in the same namespace
    new = changed(table, args.change)
    change_plan = diff(new, table)
    back_plan = diff(table, new)
    kinds = {k.value: sum(1 for op in change_plan if op.kind is k) for k in OpKind}
    print(f"  change: {len(change_plan)} operations ({', '.join(f'{v} {k}' for k, v in kinds.items() if v)})",
          flush=True)
    change_text = "".join(line + "\n" for line in render(change_plan))

    def revert() -> None:
        if NetlinkBackend().apply(back_plan):
            raise SystemExit("revert failed")

    changes: list[tuple[str, Callable[[], object]]] = [
        ("ipvsadm -R (prebuilt text)", lambda: subprocess.run(["ipvsadm", "-R"], input=change_text, text=True,
                                                                check=True)),
        ("IpvsadmBackend.apply", lambda: IpvsadmBackend().apply(change_plan)),
        ("NetlinkBackend.apply", lambda: NetlinkBackend().apply(change_plan)),
        ("ipvsadm sync: read + diff + apply", lambda: IpvsadmBackend().apply(diff(new, IpvsadmBackend().read()))),
        ("netlink sync: read + diff + apply", lambda: NetlinkBackend().apply(diff(new, NetlinkBackend().read()))),
    ]
    for name, fn in changes:
        times = []
        for _ in range(args.repeat):
            seconds, result = timed(fn)
            if result not in (None, []) and not hasattr(result, "returncode"):
                raise SystemExit(f"{name}: failures: {str(result)[:500]}")
            check(name, new)
            revert()
            times.append(seconds)
        report.add("change", name, min(times))
    subprocess.run(["ipvsadm", "-C"], check=True)
    namespaces.close()

    base = {"apply": "ipvsadm -R (prebuilt text)", "read": "IpvsadmBackend.read (-Sn + parse)",
            "change": "ipvsadm -R (prebuilt text)"}
    print()
    print(f"{args.services} x {args.dests} ({n_ops} operations), best of {args.repeat}; "
          "ratio = baseline seconds / seconds (baselines: apply and change: ipvsadm -R, read: IpvsadmBackend.read)")
    print(report.table(base))
    print()
    default = ("NetlinkBackend.apply (default)" if DEFAULT_WINDOW in windows
               else f"NetlinkBackend.apply window={windows[0]}")
    nl_apply = report.get("apply", default)
    r_apply = report.get("apply", "ipvsadm -R (prebuilt text)")
    floor_noack = report.get("apply", "floor: pre-encoded, ack last of window")
    floor_default = report.get("apply", f"floor: pre-encoded, ack last of window, window={DEFAULT_WINDOW}")
    floor_ack = report.get("apply", "floor: pre-encoded, ack every request")
    encoding = report.get("apply", "(encoding alone, no kernel: Encoder.messages)")
    nl_read = report.get("read", "NetlinkBackend.read (with counts)")
    sn_read = report.get("read", "IpvsadmBackend.read (-Sn + parse)")
    nl_read_p = report.get("read", "NetlinkBackend.read, GC paused (as in the agent)")
    sn_read_p = report.get("read", "IpvsadmBackend.read (-Sn + parse), GC paused")
    ln_read_p = report.get("read", "IpvsadmBackend.read(counts=True), GC paused")
    nl_dumps = report.get("read", "NetlinkBackend.read proc=False (a GET_DEST dump per service)")
    nl_change = report.get("change", "NetlinkBackend.apply")
    nl_acks = report.get("apply", "NetlinkBackend.apply acks=True")
    nl_inline = report.get("apply", "NetlinkBackend.apply prefetch=False (encode inline)")
    nl_paused = report.get("apply", "NetlinkBackend.apply, GC paused (as in the agent)")
    nl_inline_paused = report.get("apply", "NetlinkBackend.apply prefetch=False, GC paused")
    nl_python = report.get("apply", "NetlinkBackend.apply compiled=False (Python encoder)")
    floor_best = min(floor_noack, floor_default)
    goals = [
        ("full apply >= 2x faster than ipvsadm -R (x)", r_apply / nl_apply, r_apply / nl_apply >= 2),
        ("full apply within 1.3x of the floor, same ack mode, windows of 256 (x)", nl_apply / floor_noack,
         nl_apply / floor_noack <= 1.3),
        (f"   ... of the floor in windows of {DEFAULT_WINDOW}, as the backend sends them (x)",
         nl_apply / floor_default, nl_apply / floor_default <= 1.3),
        ("   ... of the floor plus encoding alone (x)", nl_apply / (floor_noack + encoding),
         nl_apply / (floor_noack + encoding) <= 1.3),
        ("   ... with the GC paused, as the agent's full syncs apply, vs the faster floor (x)",
         nl_paused / floor_best, nl_paused / floor_best <= 1.3),
        ("   ... the same with encoding inline (no helper thread) (x)", nl_inline_paused / floor_best,
         nl_inline_paused / floor_best <= 1.3),
        ("full read >= 2x faster than ipvsadm -Sn + parse (x)", sn_read / nl_read, sn_read / nl_read >= 2),
        ("   ... both with the GC paused, as the agent reads (x)", sn_read_p / nl_read_p, sn_read_p / nl_read_p >= 2),
        ("   ... against -Ln + parse (counts, what the agent needs), GC paused (x)", ln_read_p / nl_read_p,
         ln_read_p / nl_read_p >= 2),
        ("1% change ~1% of a full apply (%)", 100 * nl_change / nl_apply, nl_change / nl_apply <= 0.02),
    ]
    for text_, value, ok in goals:
        print(f"  {'OK  ' if ok else 'MISS'} {text_}: {value:.2f}")
    print(f"  encoding in a helper thread while the kernel works: {nl_inline / nl_apply:.2f}x faster than inline "
          f"({nl_inline:.2f} s vs {nl_apply:.2f} s)")
    print(f"  the compiled encoder loop ({'built' if nlencode.COMPILED else 'NOT BUILT'}): apply {nl_python / nl_apply:.2f}x "
          f"faster than with the Python encoder ({nl_apply:.2f} s vs {nl_python:.2f} s)")
    nl_read_python = report.get("read", "NetlinkBackend.read compiled=False (/proc parsed in Python)")
    print(f"  the compiled /proc parser: read {nl_read_python / nl_read:.2f}x faster than parsing in Python "
          f"({nl_read:.2f} s vs {nl_read_python:.2f} s)")
    print(f"  real servers from /proc/net/ip_vs: the read is {nl_dumps / nl_read:.2f}x faster than with a "
          f"GET_DEST dump per service ({nl_read:.2f} s vs {nl_dumps:.2f} s)")
    print(f"  acks: asking only the last of each window is {floor_ack / floor_noack:.2f}x faster at the floor, "
          f"{nl_acks / nl_apply:.2f}x faster for the backend")
    return 0


# ----------------------------------------------------------------------------- host codec


def kernel_dest_message(seq: int, family: int, dest: Destination) -> bytes:
    """A GET_DEST reply laid out exactly as ip_vs_genl_fill_dest (6.1) writes it."""
    def u32(t: int, v: int) -> bytes:
        return struct.pack("=HHI", 8, t, v)

    stats = struct.pack("=HH", 4 + 10 * 8, 10) + b"".join(u32(t, 0) for t in range(1, 11))
    stats64 = struct.pack("=HH", 4 + 10 * 12, 12) + b"".join(struct.pack("=HHQ", 12, t, 0) for t in range(1, 11))
    attrs = (struct.pack("=HH", 20, 1) + socket.inet_aton(dest.address) + bytes(12)
             + struct.pack("=HH", 6, 2) + dest.port.to_bytes(2, "big") + b"\0\0"
             + u32(3, 0) + u32(4, dest.weight) + struct.pack("=HHB3x", 5, 13, 0) + struct.pack("=HHH2x", 6, 14, 0)
             + struct.pack("=HHH2x", 6, 15, 0) + u32(5, 0) + u32(6, 0) + u32(7, 1) + u32(8, 2) + u32(9, 0)
             + struct.pack("=HHH2x", 6, 11, socket.AF_INET) + stats + stats64)
    body = struct.pack("=BBH", nlconst.IPVS_CMD_NEW_DEST, 1, 0) + struct.pack("=HH", 4 + len(attrs), 2) + attrs
    return nlencode.frame(family, nlconst.NLM_F_MULTI, seq, body)


def proc_text(table: Table) -> str:
    """``table`` as the kernel writes /proc/net/ip_vs (IPv4, no persistence)."""
    lines = ["IP Virtual Server version 1.2.1 (size=4096)", "Prot LocalAddress:Port Scheduler Flags",
             "  -> RemoteAddress:Port Forward Weight ActiveConn InActConn"]
    for vs in table.sorted():
        protocol, address = procfs.label(vs.key)
        lines.append(f"{protocol}  {address} {vs.scheduler}  ")
        for d in vs.destinations:
            lines.append(f"  -> {socket.inet_aton(d.address).hex().upper()}:{d.port:04X}      Masq    "
                         f"{d.weight:<6} {d.active_conns:<10} {d.inactive_conns:<10}")
    return "\n".join(lines) + "\n"


def kernel_service_message(seq: int, family: int, key: ServiceKey, sched: str) -> bytes:
    """A GET_SERVICE reply laid out as ip_vs_genl_fill_service (6.1) writes it for
    an IPv4 service (the address is always 16 bytes) without persistence."""
    def u32(t: int, v: int) -> bytes:
        return struct.pack("=HHI", 8, t, v)

    name = sched.encode() + b"\0"
    stats = struct.pack("=HH", 4 + 10 * 8, 10) + b"".join(u32(t, 0) for t in range(1, 11))
    stats64 = struct.pack("=HH", 4 + 10 * 12, 12) + b"".join(struct.pack("=HHQ", 12, t, 0) for t in range(1, 11))
    attrs = (struct.pack("=HHH2x", 6, 1, socket.AF_INET) + struct.pack("=HHH2x", 6, 2, socket.IPPROTO_TCP)
             + struct.pack("=HH", 20, 3) + socket.inet_aton(key.address) + bytes(12)
             + struct.pack("=HH", 6, 4) + key.port.to_bytes(2, "big") + b"\0\0"
             + struct.pack("=HH", 4 + len(name), 6) + name + bytes(-len(name) & 3)
             + struct.pack("=HHII", 12, 7, nlconst.IP_VS_SVC_F_HASHED, 0xFFFFFFFF) + u32(8, 0)
             + struct.pack("=HH4s", 8, 9, b"\xff" * 4) + stats + stats64)
    body = struct.pack("=BBH", nlconst.IPVS_CMD_NEW_SERVICE, 1, 0) + struct.pack("=HH", 4 + len(attrs), 1) + attrs
    return nlencode.frame(family, nlconst.NLM_F_MULTI, seq, body)


def codec_bench(args: argparse.Namespace) -> int:
    """What the backend's own Python costs, without a kernel: encoding a full plan
    (Encoder.messages, as apply does) and decoding a full read's real servers
    (decode_dest_datagram over kernel-shaped datagrams, as read does)."""
    table = build_table(args.services, args.dests)
    plan = diff(table, Table())
    family = 30
    seq = 7
    size = len(kernel_dest_message(seq, family, Destination("10.0.0.1", 1)))
    per = 32768 // size  # the kernel packs a dump into datagrams of up to 32 KiB
    messages = b"".join(kernel_dest_message(seq, family, d) for vs in table.sorted() for d in vs.destinations)
    grams = [messages[i * size : (i + per) * size] for i in range(0, len(messages) // size, per)]
    text = "".join(line + "\n" for line in render(plan))
    proc = proc_text(table)
    service_grams = [kernel_service_message(seq, family, vs.key, vs.scheduler) for vs in table.sorted()]

    def decode_services() -> list[nldecode.DecodedService]:
        settings: dict[Any, Any] = {}
        return [nldecode.decode_service(gram, nldecode.Message(family, 0, seq, 16, len(gram)), settings)
                for gram in service_grams]

    def decode() -> list[Destination]:
        out: list[Destination] = []
        for gram in grams:
            nldecode.decode_dest_datagram(gram, family, seq, socket.AF_INET, out)
        return out

    # CPU time of this process: the host is shared, and this is about our own cost.
    cpu = time.process_time
    enc, encoded = best(args.repeat, lambda: nlencode.Encoder().messages(plan, family, nlconst.NLM_F_REQUEST, 1), cpu)
    enc_py, encoded_py = best(
        args.repeat, lambda: nlencode.Encoder(compiled=False).messages(plan, family, nlconst.NLM_F_REQUEST, 1), cpu)
    assert encoded == encoded_py
    dec, got = best(args.repeat, decode, cpu)
    dec_paused, _ = best(args.repeat, lambda: gc_paused(decode), cpu)
    parse, _ = best(args.repeat, lambda: parse_save(text), cpu)
    proc_paused, parsed = best(args.repeat, lambda: gc_paused(lambda: procfs.parse(proc)), cpu)
    proc_running, _ = best(args.repeat, lambda: procfs.parse(proc), cpu)
    proc_python, parsed_python = best(args.repeat, lambda: gc_paused(lambda: procfs.parse(proc, compiled=False)), cpu)
    assert parsed == parsed_python
    services_paused, listed = best(args.repeat, lambda: gc_paused(decode_services), cpu)
    assert isinstance(listed, list) and [d.service for d in listed] == [vs.with_destinations(()) for vs in table.sorted()]
    assert isinstance(got, list) and len(got) == table.destination_count()
    assert isinstance(parsed, dict) and sum(map(len, parsed.values())) == len(got)
    print(f"host codec, {args.services} x {args.dests}, best of {args.repeat} (CPU time):")
    print(f"  encode {len(plan)} requests (Encoder.messages, compiled loop {'built' if nlencode.COMPILED else 'MISSING'}): "
          f"{enc:.3f} s ({1e6 * enc / len(plan):.2f} us each)")
    print(f"    the same in Python only (compiled=False): {enc_py:.3f} s ({1e6 * enc_py / len(plan):.2f} us each, "
          f"{enc_py / enc:.1f}x)")
    print(f"  decode {len(got)} real servers (decode_dest_datagram): {dec:.3f} s ({1e6 * dec / len(got):.2f} us each)")
    print(f"    the same with the GC paused (as the agent's full syncs read): {dec_paused:.3f} s "
          f"({1e6 * dec_paused / len(got):.2f} us each)")
    print(f"  the same real servers from /proc/net/ip_vs text (procfs.parse, compiled), GC paused: {proc_paused:.3f} s "
          f"({1e6 * proc_paused / len(got):.2f} us each); GC running: {proc_running:.3f} s")
    print(f"    the same in Python only (compiled=False), GC paused: {proc_python:.3f} s "
          f"({1e6 * proc_python / len(got):.2f} us each, {proc_python / proc_paused:.1f}x)")
    print(f"    (GET_DEST decode, GC paused, takes {dec_paused / proc_paused:.1f}x the compiled parse)")
    print(f"  decode {len(listed)} services (decode_service), GC paused: {services_paused:.3f} s "
          f"({1e6 * services_paused / len(listed):.2f} us each)")
    print(f"  for comparison, parse_save of the same table's ipvsadm -Sn text: {parse:.3f} s "
          f"({1e6 * parse / len(plan):.2f} us a line)")
    return 0


# ----------------------------------------------------------------------------- the VM


def vm(args: argparse.Namespace, argv: list[str]) -> int:
    return run_in_vm("ipvs.py", [a for a in argv if a != "--vm"], memory=args.memory, modules=["ip_vs", "ip_vs_rr"])


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--services", type=int, default=10000)
    parser.add_argument("--dests", type=int, default=10)
    parser.add_argument("--change", type=float, default=1.0, help="percent of services changed (default 1)")
    parser.add_argument("--windows", default=f"{DEFAULT_WINDOW},256",
                        help=f"netlink windows to run, comma-separated ({DEFAULT_WINDOW} = the default)")
    parser.add_argument("--vm", action="store_true", help="boot the test VM (vng) and run there")
    parser.add_argument("--memory", default="2G", help="VM memory (with --vm)")
    parser.add_argument("--codec", action="store_true", help="host only: encoder/decoder speed")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions (--codec)")
    args = parser.parse_args(argv)
    if args.vm:
        return vm(args, argv)
    if args.codec:
        return codec_bench(args)
    try:
        return kernel_bench(args)
    except OSError as exc:
        if exc.errno == errno.EPERM:
            print("needs root", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
