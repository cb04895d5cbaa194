#!/usr/bin/env python3
"""Benchmark of the pure core: translate + diff at cluster scale, on the host.

Synthetic cluster: N Services (default 10,000) with one TCP port each and one
EndpointSlice of 10 ready endpoints each. Prints the time to translate + diff from
scratch (against an empty kernel table), the time to handle one changed
EndpointSlice (re-translate that Service alone and diff only its keys), and the
process's peak resident memory. Figures, not assertions: run `make bench`.
"""

from __future__ import annotations

import argparse
import gc
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from svcproxy.diff import diff  # noqa: E402
from svcproxy.reconcile import paused_gc  # noqa: E402
from svcproxy.kube.translate import NodeInfo, TranslateConfig, translate, translate_service  # noqa: E402
from svcproxy.model import Destination, Table, VirtualService  # noqa: E402


def service(i: int) -> dict[str, Any]:
    ip = f"10.96.{i // 250}.{i % 250 + 1}"
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": f"svc-{i}", "namespace": "bench", "uid": f"uid-{i}", "resourceVersion": str(i)},
        "spec": {"type": "ClusterIP", "clusterIP": ip, "clusterIPs": [ip], "ipFamilies": ["IPv4"],
                 "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}],
                 "sessionAffinity": "None", "internalTrafficPolicy": "Cluster"},
        "status": {"loadBalancer": {}},
    }


def endpoint_slice(i: int, generation: int = 0, endpoints: int = 10) -> dict[str, Any]:
    base = (i * endpoints + generation) % (250 * 250 * 4)
    return {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
        "metadata": {"name": f"svc-{i}-abcde", "namespace": "bench",
                     "labels": {"kubernetes.io/service-name": f"svc-{i}",
                                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [
            {"addresses": [f"10.{244 + (base + j) // 62500}.{(base + j) // 250 % 250}.{(base + j) % 250 + 1}"],
             "conditions": {"ready": True, "serving": True, "terminating": False},
             "nodeName": f"node-{j % 50}"}
            for j in range(endpoints)
        ],
    }


def timed(fn: Any, repeat: int, clock: Any = time.perf_counter, pause_gc: bool = False) -> tuple[float, Any]:
    """Median over ``repeat`` runs; ``pause_gc``: as the agent's full syncs run (paused_gc)."""
    samples, result = [], None
    for _ in range(repeat):
        gc.collect()
        start = clock()
        if pause_gc:
            with paused_gc():
                result = fn()
        else:
            result = fn()
        samples.append(clock() - start)
    return statistics.median(samples), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--services", type=int, default=10_000)
    parser.add_argument("--endpoints", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    services = [service(i) for i in range(args.services)]
    slices = [endpoint_slice(i, endpoints=args.endpoints) for i in range(args.services)]
    config = TranslateConfig(node=NodeInfo(name="node-0", addresses=("192.168.0.10",)))

    t_translate, translation = timed(lambda: translate(services, slices, config), args.repeat, pause_gc=True)
    desired = translation.table
    t_diff, ops = timed(lambda: diff(desired, Table()), args.repeat, pause_gc=True)
    # The same with the collector running, and both in CPU time (less sensitive to
    # other load on the machine than wall time).
    both = lambda: diff(translate(services, slices, config).table, Table())  # noqa: E731
    cpu_paused, _ = timed(both, args.repeat, time.process_time, pause_gc=True)
    cpu_gc, _ = timed(both, args.repeat, time.process_time)
    # What a full sync compares with: the kernel's table as read back, equal values in
    # distinct objects (so no identity shortcut applies).
    kernel = Table({k: VirtualService(vs.key, vs.scheduler, vs.persistence, vs.flags,
                                      tuple(Destination(d.address, d.port, d.weight, d.forward, 0, 0)
                                            for d in vs.destinations))
                    for k, vs in desired.services.items()})
    t_nochange, noop = timed(lambda: diff(desired, kernel), args.repeat)

    # One changed EndpointSlice: one endpoint replaced in Service 4242 (or the middle one).
    target = min(4242, args.services - 1)
    changed_slice = endpoint_slice(target, generation=1, endpoints=args.endpoints)

    def one_change() -> int:
        vss, _problems, _info = translate_service(services[target], [changed_slice], config)
        new = dict(desired.services)
        for vs in vss:
            new[vs.key] = vs
        return len(diff(Table(new), desired, only=[vs.key for vs in vss]))

    t_one, one_ops = timed(one_change, max(args.repeat, 20))
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    total = t_translate + t_diff
    print(f"core benchmark: {args.services} Services x {args.endpoints} endpoints "
          f"({len(desired)} virtual services, {desired.destination_count()} real servers)")
    print(f"  translate from scratch        {t_translate * 1000:9.1f} ms")
    print(f"  diff against empty kernel     {t_diff * 1000:9.1f} ms   ({len(ops)} operations)")
    print(f"  translate + diff from scratch {total * 1000:9.1f} ms   (goal < 1000 ms: {total / 1.0:.2f}x of budget)")
    print(f"    in CPU time, gc paused      {cpu_paused * 1000:9.1f} ms   (as the agent's full syncs run)")
    print(f"    in CPU time, gc running     {cpu_gc * 1000:9.1f} ms   (paused / running: {cpu_paused / cpu_gc:.2f})")
    print(f"  diff, kernel already in sync  {t_nochange * 1000:9.1f} ms   ({len(noop)} operations)")
    print(f"  one changed EndpointSlice     {t_one * 1000:9.3f} ms   ({one_ops} operations; "
          f"{t_one / total * 100:.3f}% of a full translate + diff)")
    print(f"  peak resident memory          {peak_mb:9.1f} MB")


if __name__ == "__main__":
    main()
