#!/usr/bin/env python3
"""Benchmark of the agent under churn: network programming latency, memory, nothing lost.

The agent (svcproxy.agent.Agent: the real watchers through the official client, the
real reconcile loop, the health/metrics server) runs in a child process against
tests/fakeapi.py on loopback, loaded with N Services (default 10,000) of M endpoints
each (default 10). This process then changes the cluster at a steady rate: endpoints
replaced, Services scaled up and down, Services added and removed, each change one
write (an EndpointSlice, or a Service with its slice) to the fake API server.

What is simulated: the API server, and the kernel. The agent's backend is an
in-memory table (reads build new objects, as a decoded kernel read does); after each
applied plan it writes, for every virtual service the plan touched, the time and a
digest of the real servers now in the table to a log this process follows. Pod
namespaces are in-memory tables too, attached to the loop as the replicate mode
attaches real ones (no network namespace, no sysctls, no routes: only the tables).

Latency is measured by the benchmark's own clock: from the moment a change is
written to the API server until the backend acknowledges (its apply returned) a
table in which that Service's virtual service holds exactly the real servers the
change asked for, in every table (the node's and each Pod namespace's). A change
overtaken by a later one of the same Service before a sync counts as programmed
when the later state is (the loop coalesces; kube-proxy's metric counts the same
way). Printed next to it: what the agent's own svcproxy_network_programming_
duration_seconds histogram says (from the EndpointSlices' last-change-trigger-time
annotation, which this benchmark sets as the EndpointSlice controller does).

At the end of each agent's run the churn stops, the loop catches up, one more full
sync runs, the agent is stopped, runs one sync that reads every table (so that what
still drains ends), dumps its tables and they are compared with the cluster this
process wrote: a missing, extra or different virtual service or real server is a
failure, printed loudly, and the exit status is 1.

    bench/churn.py                                  # 10,000 x 10 at 10, 100, 1,000/s; 0, 10, 50 namespaces
    bench/churn.py --rates 100 --duration 20 --namespaces 0 --services 2000
    bench/churn.py --faults-only                    # API server restart, 410s, stalled watch, netns gone
    bench/churn.py --soak 1800 --soak-only          # memory at 100 changes/s for 30 minutes
    bench/churn.py --plot results.json              # CDFs and memory into docs/
    bench/churn.py --namespaces 0 --baseline ../old  # the agent of another checkout first
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import zlib
from collections import deque
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))

NODE = "node-0"
TARGET_PORT = 8080
ABSENT = -1  # digest of a virtual service that is not in the table
TRIGGER = "endpoints.kubernetes.io/last-change-trigger-time"


# ----------------------------------------------------------------------------- pure pieces


def digest(dests: Iterable[str]) -> int:
    """The same number on both sides for the same set of "address:port" real servers."""
    return zlib.crc32(",".join(sorted(dests)).encode())


@dataclass
class _Change:
    written: float
    waiting: int  # tables that have not acknowledged it yet
    acked: float = 0.0


class Tracker:
    """Matches changes written to the API server with the tables' acknowledgements.

    Thread-safe. Each change expects one state of one virtual service in each of the
    given tables; an acknowledgement of a state at time t completes the newest
    change written before t that expects that state, and every older change of the
    same virtual service in that table (overtaken: the loop coalesced them).

    A Service added and removed before any sync programmed it leaves no trace in the
    table, so no acknowledgement comes: its changes are *coalesced away*, counted
    apart and not waited for (the final table comparison checks the outcome)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._pending: dict[str, dict[str, deque[tuple[float, int, int]]]] = {}
        self._present: dict[str, set[str]] = {}  # per table: virtual services acknowledged present
        self.coalesced = 0
        self._changes: list[_Change] = []
        self.done: list[tuple[float, float]] = []  # (written, latency), in completion order

    def expect(self, written: float, key: str, state: int, targets: Sequence[str]) -> int:
        with self.lock:
            cid = len(self._changes)
            self._changes.append(_Change(written, len(targets)))
            for target in targets:
                self._pending.setdefault(target, {}).setdefault(key, deque()).append((written, state, cid))
            return cid

    def ack(self, target: str, t: float, key: str, state: int) -> None:
        with self.lock:
            present = self._present.setdefault(target, set())
            if state == ABSENT:
                present.discard(key)
            else:
                present.add(key)
            queue = self._pending.get(target, {}).get(key)
            if not queue:
                return
            match = -1
            for i, (written, expected, _cid) in enumerate(queue):
                if written > t:
                    break
                if expected == state:
                    match = i
            for _ in range(match + 1):
                self._complete(queue.popleft()[2], t)
            if not queue:
                del self._pending[target][key]

    def _complete(self, cid: int, t: float) -> None:
        change = self._changes[cid]
        change.waiting -= 1
        change.acked = max(change.acked, t)
        if change.waiting == 0:
            self.done.append((change.written, change.acked - change.written))

    def drop_target(self, target: str) -> None:
        """A table that went away (a deleted Pod namespace): nothing waits for it."""
        with self.lock:
            for queue in self._pending.pop(target, {}).values():
                for _written, _state, cid in queue:
                    change = self._changes[cid]
                    change.waiting -= 1
                    if change.waiting == 0:
                        self.done.append((change.written, change.acked - change.written))

    def _vanished(self, target: str, key: str, queue: deque[tuple[float, int, int]]) -> bool:
        return queue[-1][1] == ABSENT and key not in self._present.get(target, ())

    def pending(self) -> int:
        """Changes still waiting for a table, not counting those that look coalesced away."""
        with self.lock:
            skip = {cid for target, keys in self._pending.items() for key, queue in keys.items()
                    if self._vanished(target, key, queue) for _w, _s, cid in queue}
            return sum(1 for cid, c in enumerate(self._changes) if c.waiting > 0 and cid not in skip)

    def settle(self) -> None:
        """At the end: what is coalesced away stops waiting (and is counted)."""
        with self.lock:
            for target, keys in self._pending.items():
                for key in [k for k, q in keys.items() if self._vanished(target, k, q)]:
                    for _written, _state, cid in keys.pop(key):
                        change = self._changes[cid]
                        change.waiting -= 1
                        if change.waiting == 0:
                            self.coalesced += 1

    def waiting(self, limit: int = 20) -> list[str]:
        """The changes still waiting, for the failure report."""
        with self.lock:
            out = [f"{key} written at {written:.3f} still waits for {target}"
                   for target, keys in self._pending.items() for key, queue in keys.items()
                   for written, _state, _cid in queue]
            return out[:limit]

    def oldest_pending(self) -> float | None:
        with self.lock:
            return min((c.written for c in self._changes if c.waiting > 0), default=None)

    def latencies(self, start: float, end: float) -> list[float]:
        """Latencies of the changes written in [start, end)."""
        with self.lock:
            return sorted(lat for written, lat in self.done if start <= written < end)

    def completed_by(self, written_until: float) -> float | None:
        """When every change written up to ``written_until`` was programmed (None: not yet)."""
        with self.lock:
            last = 0.0
            for c in self._changes:
                if c.written > written_until:
                    continue
                if c.waiting > 0:
                    return None
                last = max(last, c.acked)
            return last


def compare_tables(desired: Mapping[str, Sequence[str]], actual: Mapping[str, Sequence[str]]) -> list[str]:
    """Differences between the wanted table (virtual service -> "address:port" real
    servers, weight 1) and a dumped one (-> "address:port@weight"); empty: equal."""
    problems: list[str] = []
    for key in sorted(desired.keys() - actual.keys()):
        problems.append(f"missing virtual service {key}")
    for key in sorted(actual.keys() - desired.keys()):
        problems.append(f"extra virtual service {key} ({len(actual[key])} real servers)")
    for key in sorted(desired.keys() & actual.keys()):
        want = {f"{d}@1" for d in desired[key]}
        have = set(actual[key])
        for d in sorted(want - have):
            problems.append(f"{key}: missing or wrong real server {d}")
        for d in sorted(have - want):
            problems.append(f"{key}: extra or wrong real server {d}")
    return problems


def quantile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def histogram_quantile(buckets: Sequence[tuple[float, float]], q: float) -> float:
    """Prometheus' histogram_quantile over cumulative (upper bound, count) pairs."""
    if not buckets or buckets[-1][1] <= 0:
        return float("nan")
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if upper == float("inf"):
                return lower
            return lower + (upper - lower) * ((rank - below) / (count - below) if count > below else 0)
        lower, below = upper, count
    return lower


# ----------------------------------------------------------------------------- child: the agent


def child(args: argparse.Namespace) -> int:
    import logging

    from svcproxy.agent import Agent, AgentConfig
    from svcproxy.reconcile import Target

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("svcproxy.agent").setLevel(logging.INFO)
    ack_log = open(args.ack_log, "a", buffering=1 << 16)
    kernel = args.kernel == "netlink"
    node = netlink_recording_backend("node", None, ack_log) if kernel else recording_backend("node", None, ack_log)
    config = AgentConfig(node_name=NODE, kubeconfig=args.kubeconfig, sync_period=args.sync_period,
                         min_sync_period=args.min_sync_period, health_bind="127.0.0.1:0",
                         healthcheck_bind_host="127.0.0.1", watch_idle_timeout=args.watch_idle_timeout)
    agent = Agent(config, node)
    if args.drain_check_period:  # what full syncs ran at while real servers drain, before it was changed
        agent.proxier.config = replace(agent.proxier.config, drain_check_period=float(args.drain_check_period))
    pods = {}
    for i in range(int(args.pod_tables)):
        name = f"pod-{i}"
        marker = Path(args.ns_dir) / name
        marker.touch()
        pods[name] = (netlink_recording_backend(name, new_netns(f"{args.label}-{name}"), ack_log) if kernel
                      else recording_backend(name, marker, ack_log))
        agent.proxier.attach(Target(name, pods[name]))
    agent.install_signal_handlers()
    if args.mem_log:
        if os.environ.get("CHURN_TRACEMALLOC"):
            # In this thread, after the heavy imports: traced, they take many minutes;
            # started in another thread during an import, it broke the import.
            import tracemalloc

            import kubernetes.client

            kubernetes.client.CoreV1Api, kubernetes.client.DiscoveryV1Api  # imported on first use

            tracemalloc.start(int(os.environ["CHURN_TRACEMALLOC"]))
        threading.Thread(target=memory_trace, args=(args.mem_log, args.mem_trace, agent.stop),
                         name="mem-trace", daemon=True).start()
    status = agent.run()
    # Pod namespaces are read one at a time and their drains end together: one sync
    # reading every table ends what still drains, so that the tables can be compared.
    agent.proxier.sync(force_full=True)
    ack_log.close()
    if kernel:  # the real tables, read by ipvsadm (not by the agent's own decoder)
        tables = {"node": kernel_dump(None)}
        tables.update({name: kernel_dump(b.netns) for name, b in pods.items()})
    else:
        tables = {"node": dump(node.table)}
        tables.update({name: dump(b.table) for name, b in pods.items() if (Path(args.ns_dir) / name).exists()})
    Path(args.dump).write_text(json.dumps(tables))
    return status


def memory_trace(path: str, period: float, stop: threading.Event) -> None:
    """Diagnostics for memory growth (``--mem-trace``): every ``period`` seconds one JSON
    line with the resident memory, the blocks Python's allocator holds, the collector's
    counts and the number of live container objects per type (a leak is a type that keeps
    growing; RSS growing while the blocks do not is the allocator keeping freed arenas);
    with tracemalloc on, a snapshot per line for ``--mem-trace-diff``."""
    import gc
    import tracemalloc
    from collections import Counter

    from agent import proc_mem

    t0, n = time.time(), 0
    with open(path, "a") as out:
        while not stop.wait(period if n else min(period, 60.0)):
            types = Counter(type(o).__name__ for o in gc.get_objects())
            line: dict[str, Any] = {"t": time.time() - t0, "rss": proc_mem(os.getpid())[0],
                                    "blocks": sys.getallocatedblocks(), "gc_count": gc.get_count(),
                                    "gc_stats": gc.get_stats(), "types": dict(types.most_common(40))}
            if tracemalloc.is_tracing():
                snap = f"{path}.{n}.snap"
                tracemalloc.take_snapshot().dump(snap)
                line["snapshot"], line["traced"] = snap, tracemalloc.get_traced_memory()
            out.write(json.dumps(line) + "\n")
            out.flush()
            n += 1


def memory_diff(before: str, after: str, top: int = 12) -> int:
    """Where the memory that grew between two ``--mem-trace`` snapshots was allocated."""
    import tracemalloc

    old, new = tracemalloc.Snapshot.load(before), tracemalloc.Snapshot.load(after)
    for stat in new.compare_to(old, "traceback")[:top]:
        print(f"{stat.size_diff / 1024:+.0f} KiB in {stat.count_diff:+d} blocks (now {stat.size / 1024:.0f} KiB):")
        for line in stat.traceback.format(most_recent_first=True)[:16]:
            print("    " + line)
    return 0


def dump(table: Any) -> dict[str, list[str]]:
    return {str(key): [f"{d.address}:{d.port}@{d.weight}" for d in vs.destinations]
            for key, vs in table.services.items()}


def recording_backend(name: str, marker: Path | None, ack_log: Any) -> Any:
    """The simulated kernel: an in-memory table that logs what each plan left behind.

    Operations are applied in place, so an apply costs what its operations do (as in
    the kernel), not a copy of the whole table: every table's apply runs in the
    agent's process here, once per Pod namespace, which a real kernel's would not.
    The node's table is read in a helper thread while the loop writes (as a kernel
    allows): a read takes a snapshot of the mapping under a lock, then builds the
    objects outside it."""
    from svcproxy.diff import PlanError, _apply_one
    from svcproxy.ipvs.backend import MemoryBackend
    from svcproxy.model import Destination, Operation, OperationResult, ServiceKey, Table, VirtualService
    from svcproxy.podns.netns import NamespaceGone

    class RecordingBackend(MemoryBackend):
        def __init__(self) -> None:
            self.lock = threading.Lock()
            super().__init__()
            self.services: dict[ServiceKey, VirtualService] = {}

        @property  # type: ignore[override]
        def table(self) -> Table:
            return Table(self.services)

        @table.setter
        def table(self, value: Table) -> None:
            with self.lock:
                self.services = dict(value.services)

        def _check(self) -> None:
            if marker is not None and not marker.exists():
                ack_log.write(f"G {time.time():.6f} {name}\n")
                ack_log.flush()
                raise NamespaceGone(f"{marker} is gone")

        def read(self, counts: bool | None = None) -> Table:
            self._check()
            with self.lock:
                items = list(self.services.items())
            return Table({k: VirtualService(vs.key, vs.scheduler, vs.persistence, vs.flags,
                                            tuple(Destination(d.address, d.port, d.weight, d.forward, 0, 0)
                                                  for d in vs.destinations))
                          for k, vs in items})

        def apply(self, ops: Sequence[Operation]) -> list[OperationResult]:
            self._check()
            services = self.services  # the table itself, changed in place as the kernel's is
            dests: dict[ServiceKey, dict[Any, Destination]] = {}

            def dest_map(key: ServiceKey) -> dict[Any, Destination]:
                if key not in dests:
                    dests[key] = {(d.address, d.port): d for d in services[key].destinations}
                return dests[key]

            failed = []
            with self.lock:
                for op in ops:  # what diff.apply_ops does, without copying the table first
                    try:
                        _apply_one(services, dest_map, dests, op)
                    except PlanError as exc:
                        failed.append(OperationResult(op, str(exc)))
                for key, dmap in dests.items():
                    if key in services:
                        services[key] = services[key].with_destinations(dmap.values())
            log_states(ack_log, name, time.time(), ops, services)
            return failed

    return RecordingBackend()


def log_states(ack_log: Any, name: str, t: float, ops: Sequence[Any], services: Mapping[Any, Any]) -> None:
    """One line of the log the benchmark follows: the table, the time, the plan's size,
    and the state (digest of the real servers with weight) of every virtual service it touched."""
    states = []
    for key in {op.service for op in ops}:
        vs = services.get(key)
        state = ABSENT if vs is None else digest(f"{d.address}:{d.port}" for d in vs.destinations if d.weight > 0)
        states.append(f"{key}={state}")
    ack_log.write(f"{name} {t:.6f} {len(ops)} {' '.join(states)}\n")
    ack_log.flush()


def netlink_recording_backend(name: str, netns: str | None, ack_log: Any) -> Any:
    """The real kernel (``--kernel netlink``, in the VM): the agent's own netlink backend,
    which after each apply logs the states of the virtual services the plan touched as the
    kernel acknowledged them. Those come from an image kept here: the table read from
    the kernel at the start, with every operation the kernel did not refuse applied to
    it since (a read per plan would cost the agent more than the plan; the agent's own
    reads may run beside its applies, so they are not taken in); the tables read back
    with ipvsadm at the end check the outcome against the kernel itself."""
    from svcproxy.diff import apply_ops
    from svcproxy.ipvs.netlink import NetlinkBackend
    from svcproxy.model import Operation, OperationResult, Table

    class RecordingNetlink(NetlinkBackend):
        def __init__(self) -> None:
            super().__init__(netns)
            self.image: Table = super().read()
            self.lock = threading.Lock()

        def apply(self, ops: Sequence[Operation]) -> list[OperationResult]:
            failed = super().apply(ops)
            t = time.time()
            refused = {id(r.operation) for r in failed}
            with self.lock:
                self.image = apply_ops(self.image, [op for op in ops if id(op) not in refused])[0]
                log_states(ack_log, name, t, ops, self.image.services)
            return failed

    return RecordingNetlink()


def new_netns(name: str) -> str:
    """A fresh network namespace (in the VM) standing for a Pod's: only its IPVS table is used."""
    subprocess.run(["ip", "netns", "add", name], check=True)
    # With no address at all the namespace has no local routing table, and IPVS then
    # refuses every real server (EINVAL: it takes the address for a broadcast one).
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
    return f"/run/netns/{name}"


def kernel_dump(netns: str | None) -> dict[str, list[str]]:
    """A namespace's IPVS table as ``ipvsadm -Sn`` prints it."""
    from svcproxy.ipvs.ipvsadm_parse import parse_save

    cmd = ["ipvsadm", "-Sn"] if netns is None else ["ip", "netns", "exec", Path(netns).name, "ipvsadm", "-Sn"]
    return dump(parse_save(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout))


# ----------------------------------------------------------------------------- the cluster


@dataclass
class Svc:
    name: str
    ip: str
    endpoints: list[str]

    @property
    def key(self) -> str:
        return f"tcp://{self.ip}:80"

    def state(self) -> int:
        return digest(f"{a}:{TARGET_PORT}" for a in self.endpoints)


def _stamp(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def service_object(svc: Svc) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": svc.name, "namespace": "churn"},
            "spec": {"type": "ClusterIP", "clusterIP": svc.ip, "clusterIPs": [svc.ip], "ipFamilies": ["IPv4"],
                     "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": TARGET_PORT}],
                     "sessionAffinity": "None", "internalTrafficPolicy": "Cluster"}}


def slice_object(svc: Svc, trigger: float | None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": f"{svc.name}-abcde", "namespace": "churn",
                            "labels": {"kubernetes.io/service-name": svc.name,
                                       "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}}
    if trigger is not None:
        meta["annotations"] = {TRIGGER: _stamp(trigger)}
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": meta, "ports": [{"name": "http", "port": TARGET_PORT, "protocol": "TCP"}],
            "endpoints": [{"addresses": [a], "conditions": {"ready": True, "serving": True, "terminating": False},
                           "nodeName": f"node-{i % 50}"} for i, a in enumerate(svc.endpoints)]}


#: Kinds of change and their shares of the churn.
CHANGE_KINDS = (("replace", 0.4), ("scale-up", 0.2), ("scale-down", 0.2), ("add", 0.1), ("remove", 0.1))
MAX_ENDPOINTS = 20


class Cluster:
    """What this process wrote to the API server: the desired tables follow from it.
    Addresses are never reused, so a Service never goes back to an earlier state."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.services: dict[str, Svc] = {}
        self._names: list[str] = []
        self._index: dict[str, int] = {}
        self._next_service = 0
        self._next_endpoint = 0

    def _address(self) -> str:
        n, self._next_endpoint = self._next_endpoint, self._next_endpoint + 1
        return f"10.{128 + n // 62500}.{n // 250 % 250}.{n % 250 + 1}"

    def new_service(self, endpoints: int) -> Svc:
        n, self._next_service = self._next_service, self._next_service + 1
        svc = Svc(f"svc-{n}", f"10.{96 + n // 62500}.{n // 250 % 250}.{n % 250 + 1}",
                  [self._address() for _ in range(endpoints)])
        self.services[svc.name] = svc
        self._index[svc.name] = len(self._names)
        self._names.append(svc.name)
        return svc

    def _pick(self) -> Svc:
        return self.services[self._names[self.rng.randrange(len(self._names))]]

    def _forget(self, svc: Svc) -> None:
        del self.services[svc.name]
        i = self._index.pop(svc.name)
        last = self._names.pop()
        if last != svc.name:
            self._names[i] = last
            self._index[last] = i

    def change(self, endpoints: int) -> tuple[str, Svc, Callable[[Any, float], None]]:
        """One random change: its kind, the Service, and how to write it."""
        kind = self.rng.choices([k for k, _ in CHANGE_KINDS], [w for _, w in CHANGE_KINDS])[0]
        if kind == "add":
            svc = self.new_service(endpoints)
            return kind, svc, lambda server, t: (server.apply(service_object(svc)),
                                                 server.apply(slice_object(svc, t)))[-1]
        svc = self._pick()
        if kind == "remove" and len(self._names) > 1:
            self._forget(svc)
            return kind, svc, lambda server, t: (server.delete("EndpointSlice", "churn", f"{svc.name}-abcde"),
                                                 server.delete("Service", "churn", svc.name))[-1]
        if (kind == "remove" or kind == "scale-up" and len(svc.endpoints) >= MAX_ENDPOINTS
                or kind == "scale-down" and len(svc.endpoints) <= 1):
            kind = "replace"
        if kind == "replace":
            svc.endpoints = svc.endpoints[1:] + [self._address()]
        elif kind == "scale-up":
            svc.endpoints = svc.endpoints + [self._address()]
        else:
            svc.endpoints = svc.endpoints[1:]
        obj = slice_object(svc, None)
        return kind, svc, lambda server, t: server.apply(_with_trigger(obj, t))

    def desired(self) -> dict[str, list[str]]:
        return {svc.key: [f"{a}:{TARGET_PORT}" for a in svc.endpoints] for svc in self.services.values()}


def _with_trigger(obj: dict[str, Any], t: float) -> dict[str, Any]:
    obj["metadata"]["annotations"] = {TRIGGER: _stamp(t)}
    return obj


# ----------------------------------------------------------------------------- parent: following the agent


class AckReader(threading.Thread):
    """Follows the agent's log of acknowledged plans and feeds the tracker."""

    def __init__(self, path: Path, tracker: Tracker) -> None:
        super().__init__(name="ack-reader", daemon=True)
        self.path = path
        self.tracker = tracker
        self.batches: list[tuple[float, int, int]] = []  # node target: (time, operations, services)
        self.gone: dict[str, float] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        with self.path.open() as log:
            partial = ""
            while True:
                chunk = log.read()
                if not chunk:
                    if self.stop.is_set():
                        return
                    time.sleep(0.02)
                    continue
                lines = (partial + chunk).split("\n")
                partial = lines.pop()
                for line in lines:
                    self.handle(line)

    def handle(self, line: str) -> None:
        fields = line.split(" ")
        if fields[0] == "G":
            self.gone.setdefault(fields[2], float(fields[1]))
            self.tracker.drop_target(fields[2])
            return
        target, t = fields[0], float(fields[1])
        if target == "node":
            self.batches.append((t, int(fields[2]), len(fields) - 3))
        for pair in fields[3:]:
            key, _, state = pair.rpartition("=")
            self.tracker.ack(target, t, key, int(state))


def _agent_child() -> type:
    from agent import Child  # bench/agent.py: how an agent child is started and watched

    return Child


class AgentProcess(_agent_child()):  # type: ignore[misc]
    """The agent in a child process, its health/metrics port, CPU and memory."""

    def __init__(self, args: argparse.Namespace, kubeconfig: str, workdir: Path, namespaces: int, label: str,
                 variant: "Variant") -> None:
        self.ack_log = workdir / f"{label}.acks"
        self.ack_log.write_text("")
        self.dump = workdir / f"{label}.tables.json"
        self.ns_dir = workdir / f"{label}.netns"
        self.ns_dir.mkdir()
        self.namespaces = namespaces
        self.log = workdir / f"{label}.log"
        script = str(Path(variant.repo) / "bench" / "churn.py") if variant.repo else __file__
        cmd = [sys.executable, script, "--child", "--kubeconfig", kubeconfig, "--ack-log", str(self.ack_log),
               "--dump", str(self.dump), "--ns-dir", str(self.ns_dir), "--pod-tables", str(namespaces),
               "--sync-period", str(args.sync_period), "--min-sync-period", str(variant.min_sync_period),
               "--watch-idle-timeout", str(args.watch_idle_timeout), "--kernel", args.kernel, "--label", label]
        if variant.drain_check_period is not None:
            cmd += ["--drain-check-period", str(variant.drain_check_period)]
        if args.mem_trace:
            cmd += ["--mem-trace", str(args.mem_trace), "--mem-log", str(workdir / f"{label}.mem")]
        self.started = time.monotonic()
        self.port = 0
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self.log.open("w"))
        self.pid = self.proc.pid

    def wait_ready(self, timeout: float = 1800) -> float:
        """Like bench/agent.py's, but patient: on a busy machine the health server may
        take longer than a plain request's timeout to answer, and in the VM the imports
        alone take minutes."""
        self.wait_port(timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._get("/readyz", quiet=True)[0] == 200:
                return time.monotonic() - self.started
            if self.proc.poll() is not None:
                raise SystemExit(f"agent exited ({self.proc.returncode}):\n{self.log.read_text()[-3000:]}")
            time.sleep(0.2)
        raise SystemExit("agent not ready in time")

    def _get(self, path: str, quiet: bool = False) -> tuple[int, str]:
        for attempt in range(10):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=60) as resp:
                    return resp.status, resp.read().decode()
            except urllib.error.HTTPError as exc:
                return exc.code, ""
            except OSError:
                if quiet:
                    return 0, ""
                time.sleep(1 + attempt)
        raise SystemExit(f"the agent's {path} did not answer")

    def metrics(self) -> str:
        return self._get("/metrics")[1]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def cpu(self) -> float:
        from agent import proc_cpu

        return proc_cpu(self.pid)

    def rss(self) -> float:
        from agent import proc_mem

        return proc_mem(self.pid)[0]

    def dump_tables(self) -> dict[str, dict[str, list[str]]]:
        """Stop the agent; it writes its tables on the way out, after a sync that reads
        every table: with 50 namespaces on a loaded machine that took over 300 s."""
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(300 + 30 * self.namespaces)
        if self.proc.returncode != 0:
            raise SystemExit(f"agent exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
        tables: dict[str, dict[str, list[str]]] = json.loads(self.dump.read_text())
        return tables


def scrape(text: str) -> dict[str, Any]:
    """The figures taken from the agent's /metrics at a phase's start and end."""
    buckets: list[tuple[float, float]] = []
    out: dict[str, Any] = {"full": 0.0, "partial": 0.0, "count": 0.0, "sum": 0.0}
    name = "svcproxy_network_programming_duration_seconds"
    for line in text.splitlines():
        if line.startswith(name + "_bucket"):
            le = re.search(r'le="([^"]+)"', line).group(1)  # type: ignore[union-attr]
            buckets.append((float(le), float(line.rsplit(" ", 1)[1])))
        elif line.startswith(name + "_count"):
            out["count"] = float(line.rsplit(" ", 1)[1])
        elif line.startswith(name + "_sum"):
            out["sum"] = float(line.rsplit(" ", 1)[1])
        elif line.startswith('svcproxy_syncs_total{mode="full"}'):
            out["full"] = float(line.rsplit(" ", 1)[1])
        elif line.startswith('svcproxy_syncs_total{mode="partial"}'):
            out["partial"] = float(line.rsplit(" ", 1)[1])
    out["buckets"] = buckets
    return out


def metric_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    buckets = [(le, c - dict(before["buckets"]).get(le, 0.0)) for le, c in after["buckets"]]
    return {"full": after["full"] - before["full"], "partial": after["partial"] - before["partial"],
            "count": after["count"] - before["count"], "sum": after["sum"] - before["sum"], "buckets": buckets}


class Sampler(threading.Thread):
    """The agent's resident memory and CPU every ``period`` seconds."""

    def __init__(self, agent: AgentProcess, period: float) -> None:
        super().__init__(name="sampler", daemon=True)
        self.agent, self.period = agent, period
        self.samples: list[tuple[float, float, float, float]] = []  # (time, RSS MB, CPU s, pending)
        self.tracker: Tracker | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.period):
            try:
                pending = float(self.tracker.pending()) if self.tracker is not None else 0.0
                self.samples.append((time.time(), self.agent.rss(), self.agent.cpu(), pending))
            except (OSError, AttributeError):
                return


# ----------------------------------------------------------------------------- parent: churn


@dataclass
class Run:
    """One agent (one count of Pod namespaces) and everything around it."""

    args: argparse.Namespace
    server: Any
    cluster: Cluster
    agent: AgentProcess
    tracker: Tracker
    reader: AckReader
    sampler: Sampler
    targets: list[str]
    phases: list[dict[str, Any]] = field(default_factory=list)

    def churn(self, rate: float, seconds: float, during: Callable[[float], None] | None = None) -> tuple[float, int]:
        """Changes at ``rate`` per second for ``seconds``; ``during`` is called with the
        elapsed time about every second (faults). Returns the start time and count."""
        interval = 1.0 / rate
        start = time.time()
        t0 = time.monotonic()
        n, next_call = 0, 1.0
        while True:
            elapsed = time.monotonic() - t0
            if elapsed >= seconds:
                return start, n
            if during is not None and elapsed >= next_call:
                during(elapsed)
                next_call += 1.0
            ahead = n * interval - elapsed
            if ahead > 0:
                time.sleep(min(ahead, 0.05))
                continue
            self.one_change()
            n += 1

    def one_change(self) -> None:
        kind, svc, write = self.cluster.change(self.args.endpoints)
        written = time.time()
        self.tracker.expect(written, svc.key, ABSENT if kind == "remove" else svc.state(), list(self.targets))
        write(self.server, written)

    def catch_up(self, timeout: float) -> float | None:
        """Seconds until nothing waits (None: still waiting after ``timeout``)."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.tracker.pending() == 0:
                return time.monotonic() - t0
            time.sleep(0.05)
        return None

    def phase(self, label: str, rate: float, seconds: float) -> dict[str, Any]:
        """One rate for ``seconds``, then the catch-up; figures printed and kept."""
        m0, cpu0, rss0, load0 = scrape(self.agent.metrics()), self.agent.cpu(), self.agent.rss(), os.getloadavg()
        start, n = self.churn(rate, seconds)
        end = time.time()
        m1, cpu1, rss1, load1 = scrape(self.agent.metrics()), self.agent.cpu(), self.agent.rss(), os.getloadavg()
        backlog = self.tracker.pending()
        caught_up = self.catch_up(self.args.catch_up)
        metric = metric_delta(m0, scrape(self.agent.metrics()))  # observations of the late changes too
        metric.update(full=m1["full"] - m0["full"], partial=m1["partial"] - m0["partial"])
        result = summarize(label, rate, start, end, n, self, metric)
        result.update(cpu=(cpu1 - cpu0) / (end - start), rss_start=rss0, rss_end=rss1,
                      load_start=load0[0], load_end=load1[0], backlog_at_end=backlog, catch_up=caught_up)
        print_phase(result)
        self.phases.append(result)
        return result


def summarize(label: str, rate: float, start: float, end: float, n: int, run: Run,
              metric: dict[str, Any]) -> dict[str, Any]:
    lat = run.tracker.latencies(start, end)
    half = start + (end - start) / 2
    first, second = run.tracker.latencies(start, half), run.tracker.latencies(half, end)
    batches = [b for b in run.reader.batches if start <= b[0] < end + 60]
    sizes = sorted(b[1] for b in batches)
    services = sorted(b[2] for b in batches)
    span = end - start
    return {"label": label, "rate": rate, "achieved": n / span, "seconds": span, "changes": n,
            "programmed": len(lat), "latencies": lat,
            "p50": quantile(lat, 0.5), "p99": quantile(lat, 0.99), "max": lat[-1] if lat else float("nan"),
            "p99_first_half": quantile(first, 0.99), "p99_second_half": quantile(second, 0.99),
            "metric_count": metric["count"], "metric_mean": metric["sum"] / metric["count"] if metric["count"] else
            float("nan"), "metric_p50": histogram_quantile(metric["buckets"], 0.5),
            "metric_p99": histogram_quantile(metric["buckets"], 0.99),
            "syncs_per_s": (metric["full"] + metric["partial"]) / span, "full_syncs": metric["full"],
            "batches": len(batches), "ops_p50": quantile(sizes, 0.5), "ops_max": sizes[-1] if sizes else 0,
            "services_p50": quantile(services, 0.5), "services_max": services[-1] if services else 0}


def print_phase(r: dict[str, Any]) -> None:
    print(f"  {r['label']}: {r['changes']} changes in {r['seconds']:.0f} s ({r['achieved']:.0f}/s); "
          f"latency p50 {r['p50']:.3f} s, p99 {r['p99']:.3f} s, max {r['max']:.3f} s "
          f"(p99 first half {r['p99_first_half']:.3f} s, second half {r['p99_second_half']:.3f} s)", flush=True)
    print(f"      metric network_programming_duration_seconds: {r['metric_count']:.0f} observations, "
          f"mean {r['metric_mean']:.3f} s, p50 ~{r['metric_p50']:.3f} s, p99 ~{r['metric_p99']:.3f} s "
          f"(bucket interpolation)", flush=True)
    caught = "never" if r["catch_up"] is None else f"{r['catch_up']:.1f} s"
    print(f"      syncs {r['syncs_per_s']:.2f}/s ({r['full_syncs']:.0f} full), node plans applied {r['batches']}: "
          f"{r['ops_p50']:.0f} operations p50 / {r['ops_max']} max, {r['services_p50']:.0f} / {r['services_max']} "
          f"virtual services; agent CPU {100 * r['cpu']:.0f}% of a core "
          f"({r['cpu'] * r['seconds'] / max(1, r['changes']) * 1000:.2f} s per 1,000 changes); RSS {r['rss_start']:.0f} -> "
          f"{r['rss_end']:.0f} MB; backlog at the end {r['backlog_at_end']} changes, caught up in {caught}; "
          f"load {r['load_start']:.1f} -> {r['load_end']:.1f}", flush=True)


@dataclass(frozen=True)
class Variant:
    """How one agent is run: its --min-sync-period, and the drain check period
    patched in (None: the agent's own)."""

    min_sync_period: float
    drain_check_period: float | None = None
    #: Another checkout whose agent runs instead (--baseline): its bench/churn.py child.
    repo: str | None = None

    @property
    def slug(self) -> str:
        """For file names."""
        return re.sub(r"[^A-Za-z0-9.]+", "-", self.name.replace(str(self.repo), "")).strip("-")

    @property
    def name(self) -> str:
        text = f"--min-sync-period {self.min_sync_period:g}"
        if self.repo is not None:
            text = f"baseline {self.repo}, {text}"
        if self.drain_check_period is not None:
            text += f", drain checks every {self.drain_check_period:g} s"
        return text


def start_run(args: argparse.Namespace, server: Any, cluster: Cluster, kubeconfig: str, workdir: Path,
              namespaces: int, label: str, variant: "Variant") -> tuple[Run, float]:
    agent = AgentProcess(args, kubeconfig, workdir, namespaces, label, variant)
    AGENTS.append(agent)
    tracker = Tracker()
    reader = AckReader(agent.ack_log, tracker)
    reader.start()
    ready = agent.wait_ready()
    sampler = Sampler(agent, args.sample_period)
    sampler.tracker = tracker
    sampler.start()
    targets = ["node"] + [f"pod-{i}" for i in range(namespaces)]
    run = Run(args, server, cluster, agent, tracker, reader, sampler, targets)
    print(f"  agent with {namespaces} Pod namespaces ({variant.name}): ready after {ready:.1f} s ({agent.cpu():.1f} s CPU), "
          f"RSS {agent.rss():.0f} MB; load {os.getloadavg()[0]:.1f}", flush=True)
    time.sleep(args.settle)
    return run, ready


def finish(run: Run) -> list[str]:
    """Stop, let the loop catch up and run two more full syncs, compare every table.

    Two: the first may have started before the catch-up ended, and real servers a
    later partial sync set to weight 0 (drains) only go at a full sync that reads the
    kernel after them."""
    caught_up = run.catch_up(run.args.catch_up)
    run.tracker.settle()
    full0 = scrape(run.agent.metrics())["full"]
    deadline = time.monotonic() + 2 * run.args.sync_period + 60
    while scrape(run.agent.metrics())["full"] < full0 + 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    rss = run.agent.rss()
    tables = run.agent.dump_tables()
    run.sampler.stop.set()
    run.reader.stop.set()
    run.reader.join(30)
    desired = run.cluster.desired()
    problems = [] if run.tracker.pending() == 0 else [f"{run.tracker.pending()} changes never programmed"]
    problems.extend(run.tracker.waiting())
    for name in run.targets:
        if name not in tables:
            problems.append(f"table {name} was not dumped")
            continue
        problems.extend(f"{name}: {p}" for p in compare_tables(desired, tables[name]))
    for name in tables.keys() - set(run.targets):
        problems.append(f"table {name} should be gone")
    if problems:
        print(f"\n  !!!!! FAILURE: {len(problems)} differences between the tables and the cluster !!!!!", flush=True)
        for p in problems[:50]:
            print(f"  !!!!! {p}", flush=True)
    else:
        print(f"  final tables ({len(run.targets)}: {', '.join(run.targets[:3])}{' ...' if len(run.targets) > 3 else ''}) "
              f"equal the cluster: {len(desired)} virtual services, "
              f"{sum(len(d) for d in desired.values())} real servers each; RSS at the end {rss:.0f} MB; "
              f"{run.tracker.coalesced} changes coalesced away (Services added and removed between two syncs)",
              flush=True)
    return problems


# ----------------------------------------------------------------------------- faults


def restart(server: Any, seconds: float) -> float:
    server.down(seconds)
    return seconds


def gone_410(server: Any, seconds: float) -> float:
    """Three compactions a second apart, each followed by dropped watches: every
    watcher resumes from a resourceVersion the server no longer has (410) and lists again."""
    for i in range(3):
        server.compact()
        server.drop_watches()
        if i < 2:
            time.sleep(1.0)
    return 2.0


def stall(server: Any, seconds: float) -> float:
    server.stall(seconds)
    return seconds


def faults(run: Run) -> list[dict[str, Any]]:
    """Each fault in the middle of churn at --fault-rate: the changes written up to its
    end must all be programmed; convergence = how long after its end that took."""
    args, out = run.args, []
    window = args.fault_window
    plan: list[tuple[str, Callable[[], float], float]] = [
        ("API server restarted (down 3 s)", lambda: restart(run.server, 3.0), window),
        ("burst of 410s (history compacted 3 times, watches dropped)", lambda: gone_410(run.server, 0), window),
        (f"watch stalled (open streams silent for good, new requests hang 5 s; the agent's "
         f"--watch-idle-timeout {args.watch_idle_timeout:g} s)",
         lambda: stall(run.server, 5.0), max(window, args.watch_idle_timeout + 20)),
    ]
    if len(run.targets) > 1:
        plan.append(("Pod namespace deleted", lambda: delete_namespace(run, run.targets[-1]), window))
    for name, inject, seconds in plan:
        run.churn(args.fault_rate, 5)
        start = time.time()
        box: dict[str, float] = {}
        thread = threading.Thread(target=lambda: box.update(d=inject()), daemon=True)
        thread.start()
        run.churn(args.fault_rate, seconds)
        thread.join()
        out.append({"fault": name, "start": start, "end": start + box["d"]})
    run.catch_up(args.catch_up)
    run.tracker.settle()
    for f in out:
        done = run.tracker.completed_by(f["end"])
        f["convergence"] = None if done is None else max(0.0, done - f["end"])
        lat = run.tracker.latencies(f["start"] - 5, f["end"] + 1)
        f["max_latency"] = lat[-1] if lat else float("nan")
        if f["fault"] == "Pod namespace deleted":
            f["detached_after"] = next(iter(run.reader.gone.values()), float("nan")) - f["start"]
        conv = "NOT CONVERGED" if f["convergence"] is None else f"{f['convergence']:.2f} s"
        extra = f"; the namespace detached {f['detached_after']:.2f} s after" if "detached_after" in f else ""
        print(f"  fault: {f['fault']}: every change written before its end programmed {conv} after its end; "
              f"worst latency of a change written during it {f['max_latency']:.2f} s{extra}", flush=True)
    return out


def delete_namespace(run: Run, name: str) -> float:
    run.targets.remove(name)
    (run.agent.ns_dir / name).unlink()
    return 0.0


def memory_growth(samples: Sequence[Sequence[float]], warmup: float) -> dict[str, float]:
    """How the resident memory moved over a soak, from (time, RSS MB, ...) samples.

    ``from_start``: the last sample against the first (taken when churn began, so it
    includes the warm-up: the heap growing to what a busy loop needs). ``after_warmup``:
    the last sample against the first one ``warmup`` seconds in; ``slope``: the least-
    squares trend over that same stretch, in MB per hour (a leak is a trend that stays)."""
    if len(samples) < 2:
        return {"from_start": float("nan"), "after_warmup": float("nan"), "slope_mb_per_hour": float("nan"),
                "rss_at_warmup": float("nan")}
    warm = [(s[0], s[1]) for s in samples if s[0] >= samples[0][0] + warmup]
    out = {"from_start": (samples[-1][1] - samples[0][1]) / samples[0][1], "after_warmup": float("nan"),
           "slope_mb_per_hour": float("nan"), "rss_at_warmup": warm[0][1] if warm else float("nan")}
    if len(warm) > 1:
        out["after_warmup"] = (warm[-1][1] - warm[0][1]) / warm[0][1]
        mt = sum(t for t, _ in warm) / len(warm)
        mr = sum(r for _, r in warm) / len(warm)
        var = sum((t - mt) ** 2 for t, _ in warm)
        out["slope_mb_per_hour"] = 3600 * sum((t - mt) * (r - mr) for t, r in warm) / var if var else 0.0
    return out


def soak(run: Run, seconds: float) -> dict[str, Any]:
    """--soak seconds at --soak-rate: the agent's memory over time."""
    start_samples = len(run.sampler.samples)
    result = run.phase(f"soak {seconds:.0f} s", run.args.soak_rate, seconds)
    samples = run.sampler.samples[start_samples:]
    rss = [s[1] for s in samples]
    growth = memory_growth(samples, run.args.soak_warmup)
    soak_result = {"samples": samples, "rss_start": result["rss_start"], "rss_end": result["rss_end"],
                   "rss_max": max(rss) if rss else float("nan"), "warmup": run.args.soak_warmup,
                   "growth": (result["rss_end"] - result["rss_start"]) / result["rss_start"], **growth,
                   "p99": result["p99"], "latencies": result["latencies"]}
    print(f"  soak: RSS {soak_result['rss_start']:.0f} -> {soak_result['rss_end']:.0f} MB "
          f"({100 * soak_result['growth']:+.1f}%), peak {soak_result['rss_max']:.0f} MB; after the first "
          f"{run.args.soak_warmup:g} s (warm-up): {soak_result['rss_at_warmup']:.0f} -> {rss[-1] if rss else 0:.0f} MB "
          f"({100 * growth['after_warmup']:+.1f}%), trend {growth['slope_mb_per_hour']:+.1f} MB per hour", flush=True)
    return soak_result


# ----------------------------------------------------------------------------- main


#: Every agent started, killed if this process ends early.
AGENTS: list[AgentProcess] = []


def parent(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the agents are killed too
    try:
        return _parent(args)
    finally:
        for agent in AGENTS:
            agent.kill()


def _parent(args: argparse.Namespace) -> int:
    from fakeapi import FakeApiServer

    server = FakeApiServer(history_limit=args.history, bookmark_interval=60).start()
    cluster = Cluster(random.Random(args.seed))
    t = time.monotonic()
    for _ in range(args.services):
        svc = cluster.new_service(args.endpoints)
        server.apply(service_object(svc))
        server.apply(slice_object(svc, None))
    server.apply({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE, "labels": {}},
                  "status": {"addresses": [{"type": "InternalIP", "address": "192.168.0.10"}]}})
    print(f"churn benchmark: {args.services} Services x {args.endpoints} endpoints on the fake API server "
          f"({time.monotonic() - t:.1f} s to load); rates {args.rates} changes/s for {args.duration:g} s each; "
          f"Pod namespaces {args.namespaces}; --min-sync-period {args.min_sync_periods} --sync-period "
          f"{args.sync_period:g}; load {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
    results: dict[str, Any] = {"args": {k: v for k, v in vars(args).items() if k != "plot"}, "runs": []}
    failed = False
    with tempfile.TemporaryDirectory(prefix="svcproxy-bench-churn-") as tmp:
        workdir = Path(args.keep or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        kubeconfig = server.write_kubeconfig(workdir / "kubeconfig")
        variants = [Variant(msp, dcp) for msp in args.min_sync_periods for dcp in args.drain_check_periods]
        if args.baseline:
            variants.insert(0, Variant(args.min_sync_periods[0], args.drain_check_periods[0], repo=args.baseline))
        several = len(variants) > 1
        runs: list[tuple[str, int, Variant]] = [(f"ns{k}" + (f"-{v.slug}" if several else ""), k, v)
                                                for v in variants for k in args.namespaces]
        if args.faults:
            runs.append(("faults", args.fault_namespaces, variants[0]))
        for label, k, variant in runs:
            run, ready = start_run(args, server, cluster, kubeconfig, workdir, k, label, variant)
            entry: dict[str, Any] = {"label": label, "namespaces": k, "variant": variant.name, "ready": ready,
                                     "phases": run.phases}
            if label == "faults":
                entry["faults"] = faults(run)
            else:
                for rate in args.rates:
                    run.phase(f"{k} Pod namespaces, {rate:g} changes/s"
                              + (f", {variant.name}" if several else ""), rate, args.duration)
                if args.soak and k == args.namespaces[0]:
                    entry["soak"] = soak(run, args.soak)
            entry["problems"] = finish(run)
            entry["samples"] = run.sampler.samples
            failed = failed or bool(entry["problems"])
            results["runs"].append(entry)
            if args.out:  # after each agent: a run cut short still leaves what it measured
                Path(args.out).write_text(json.dumps(results))
    server.stop()
    print_ratios(results)
    if args.out:
        Path(args.out).write_text(json.dumps(results, default=_rounded))
        print(f"  results in {args.out}")
    if failed:
        print("\n  !!!!! FAILED: a table did not equal the cluster (see above) !!!!!", flush=True)
    return 1 if failed else 0


def _rounded(value: Any) -> Any:
    return value


def print_ratios(results: dict[str, Any]) -> None:
    """Each namespace count against node only, rate by rate, from this run."""
    print()
    runs = [r for r in results["runs"] if r["label"].startswith("ns")]
    names = list(dict.fromkeys(r["variant"] for r in runs))
    for name in names:
        _ratios([r for r in runs if r["variant"] == name])
    for first in (r for r in runs if r["variant"] == names[0]):
        for other in (r for r in runs if r["variant"] != names[0] and r["namespaces"] == first["namespaces"]):
            for phase, match in zip(first["phases"], other["phases"]):
                print(f"  {phase['rate']:g} changes/s, {first['namespaces']} Pod namespaces: {other['variant']} "
                      f"p50/p99 {match['p50']:.3f}/{match['p99']:.3f} s, agent CPU {100 * match['cpu']:.0f}% of a core "
                      f"vs {first['variant']} {phase['p50']:.3f}/{phase['p99']:.3f} s, {100 * phase['cpu']:.0f}%")


def _ratios(runs: list[dict[str, Any]]) -> None:
    base = next((r for r in runs if r["namespaces"] == 0), None)
    if base is None:
        return
    for phase in base["phases"]:
        for other in runs:
            if other is base:
                continue
            match = next((p for p in other["phases"] if p["rate"] == phase["rate"] and
                          not p["label"].startswith("soak")), None)
            if match is not None and phase["p99"] > 0:
                print(f"  {phase['rate']:g} changes/s: p99 with {other['namespaces']} Pod namespaces "
                      f"{match['p99']:.3f} s vs node only {phase['p99']:.3f} s ({match['p99'] / phase['p99']:.2f}x)")


def rates(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def counts(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def agent_min_sync_period() -> float:
    """What `svcproxy run` syncs at when the flag is not given: the benchmark's default,
    so that it measures the agent a user runs."""
    from svcproxy.cli import build_parser

    return float(build_parser().parse_args(["run"]).min_sync_period)


def options(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, argparse.ArgumentParser]:
    """The command line, with the defaults that depend on the agent filled in."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--services", type=int, default=10_000)
    parser.add_argument("--endpoints", type=int, default=10)
    parser.add_argument("--rates", type=rates, default=[10.0, 100.0, 1000.0], help="changes per second, e.g. 10,100")
    parser.add_argument("--duration", type=float, default=180.0, help="seconds of churn per rate")
    parser.add_argument("--namespaces", type=counts, default=[0, 10, 50], help="Pod namespace counts, e.g. 0,50")
    parser.add_argument("--faults", action="store_true", help="also the fault run")
    parser.add_argument("--faults-only", action="store_true", help="only the fault run")
    parser.add_argument("--fault-rate", type=float, default=100.0)
    parser.add_argument("--fault-window", type=float, default=25.0, help="seconds of churn after each fault")
    parser.add_argument("--fault-namespaces", type=int, default=2)
    parser.add_argument("--soak", type=float, default=0.0, help="seconds of soak after the first count's rates")
    parser.add_argument("--soak-rate", type=float, default=100.0)
    parser.add_argument("--soak-warmup", type=float, default=300.0,
                        help="seconds of the soak left out of its growth after the warm-up")
    parser.add_argument("--sync-period", type=float, default=30.0)
    parser.add_argument("--min-sync-period", type=rates, default=None, dest="min_sync_periods",
                        help="the agent's (default: svcproxy run's own); several, e.g. 1,0.1: one agent each, "
                             "in this order")
    parser.add_argument("--drain-check-period", type=rates, default=None, dest="drain_check_periods",
                        help="patched into the agent (default: the agent's own); several: one agent each")
    parser.add_argument("--baseline", metavar="CHECKOUT",
                        help="first run the agent of another checkout (e.g. a git worktree of an older commit) "
                             "with the first --min-sync-period, as the baseline of the same run")
    parser.add_argument("--watch-idle-timeout", type=float, default=65.0, help="the agent's (its default)")
    parser.add_argument("--catch-up", type=float, default=120.0, help="seconds the loop may take to catch up")
    parser.add_argument("--settle", type=float, default=3.0)
    parser.add_argument("--sample-period", type=float, default=5.0)
    parser.add_argument("--history", type=int, default=20_000, help="the fake API server's watch history")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep", metavar="DIR", help="keep the agents' logs and tables in DIR")
    parser.add_argument("--out", help="write the results (with every latency) as JSON")
    parser.add_argument("--plot", metavar="RESULTS", nargs="+", help="draw PNGs into docs/ from results files")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--vm", action="store_true", help="boot the test VM and run there with --kernel netlink")
    parser.add_argument("--memory", default="2G", help="VM memory (with --vm)")
    parser.add_argument("--vm-timeout", type=int, default=3600, help="seconds before the VM is stopped (with --vm)")
    parser.add_argument("--kernel", choices=["memory", "netlink"], default="memory",
                        help="the agent's kernel: an in-memory table (default), or this kernel's IPVS over "
                             "netlink (root, ip_vs loaded: the VM)")
    parser.add_argument("--mem-trace", type=float, default=0.0, metavar="SECONDS",
                        help="diagnostics: the agent writes its allocator's and collector's figures and live "
                             "objects per type every SECONDS to AGENT.mem (with CHURN_TRACEMALLOC=N in the "
                             "environment, tracemalloc snapshots of N frames too)")
    parser.add_argument("--mem-trace-diff", nargs=2, metavar=("BEFORE", "AFTER"),
                        help="where the memory that grew between two tracemalloc snapshots was allocated")
    for hidden in ("--kubeconfig", "--ack-log", "--dump", "--ns-dir", "--pod-tables", "--mem-log", "--label"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.child:
        args.min_sync_periods = args.min_sync_periods or [agent_min_sync_period()]
        args.drain_check_periods = args.drain_check_periods or [None]
    return args, parser


def main(argv: Sequence[str] | None = None) -> int:
    args, parser = options(argv)
    if args.child:
        args.min_sync_period = args.min_sync_periods[0]
        args.drain_check_period = (args.drain_check_periods or [None])[0]
        return child(args)
    if args.plot:
        from churn_plot import plot  # bench/churn_plot.py: matplotlib only there

        return plot(args.plot, REPO / "docs")
    if args.mem_trace_diff:
        return memory_diff(*args.mem_trace_diff)
    if args.vm:
        return in_vm(args, list(sys.argv[1:] if argv is None else argv))
    if args.kernel == "netlink" and (args.faults or args.faults_only):
        parser.error("--faults with --kernel netlink: the faults run on the host only")
    if args.kernel == "netlink" and os.geteuid() != 0:
        parser.error("--kernel netlink needs root and IPVS: use --vm")
    if args.faults_only:
        args.faults, args.namespaces, args.rates = True, [], []
    return parent(args)


def in_vm(args: argparse.Namespace, argv: list[str]) -> int:
    """This benchmark, whole (API server, writer, agent), in the test VM against its real
    kernel; --out and --keep are written through to this machine."""
    from vmboot import run_in_vm  # bench/vmboot.py

    inner, writable = [], []
    words = iter(argv)
    for word in words:
        name, eq, value = word.partition("=")
        if word == "--vm":
            continue
        if name in ("--out", "--keep"):
            path = Path(value if eq else next(words)).resolve()
            target = path if name == "--keep" else path.parent
            target.mkdir(parents=True, exist_ok=True)
            writable.append(str(target))
            inner += [name, str(path)]
            continue
        inner.append(word)
    vng_args = [w for d in dict.fromkeys(writable) for w in ("--rwdir", d)]
    # Compiled here: the guest writes no .pyc files, and compiling there, emulated, takes minutes.
    subprocess.run([sys.executable, "-m", "compileall", "-q", "-j", "0", str(REPO / "svcproxy"),
                    str(REPO / "tests"), str(REPO / "bench"), sys.prefix], capture_output=True)
    return run_in_vm("churn.py", inner + ["--kernel", "netlink"], memory=args.memory, modules=["ip_vs", "ip_vs_rr"],
                     vng_args=vng_args, timeout=args.vm_timeout)


if __name__ == "__main__":
    sys.exit(main())
