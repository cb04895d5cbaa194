"""The gauges about the desired table follow each partial sync's changes (not a walk
of the whole table) and always equal a count of the whole table afresh."""

from __future__ import annotations

import random
from typing import Any

from prometheus_client import CollectorRegistry

from svcproxy.health import HealthCheckServers, HealthCheckTarget, HealthState
from svcproxy.kube.store import Kind
from svcproxy.model import Family
from svcproxy.reconcile import Proxier

from test_reconcile import eps, make, service


def gauges(registry: CollectorRegistry) -> dict[str, float]:
    """The published values of the gauges the tallies feed."""
    out: dict[str, float] = {}
    for name in ("svcproxy_virtual_servers", "svcproxy_real_servers"):
        out[name] = registry.get_sample_value(name) or 0.0
    for policy in ("internal", "external"):
        for family in ("IPv4", "IPv6"):
            value = registry.get_sample_value("svcproxy_sync_proxy_rules_no_local_endpoints_total",
                                              {"traffic_policy": policy, "ip_family": family})
            out[f"no_local/{policy}/{family}"] = value if value is not None else -1.0
    return out


def recount(p: Proxier) -> dict[str, float]:
    """The same gauges counted over the whole desired state, as every sync once did."""
    table, infos = p._desired.table, list(p._desired.info.values())
    out = {"svcproxy_virtual_servers": float(len(table)),
           "svcproxy_real_servers": float(sum(len(vs.destinations) for vs in table.values()))}
    for family in Family:
        out[f"no_local/internal/{family.value}"] = float(sum(1 for i in infos if family in i.no_local_internal))
        out[f"no_local/external/{family.value}"] = float(sum(1 for i in infos if family in i.no_local_external))
    return out


def health_targets(p: Proxier) -> dict[HealthCheckTarget, int]:
    """The healthCheckNodePort servers the whole desired state asks for."""
    return {HealthCheckTarget(i.namespace, i.name, i.health_check_node_port): i.local_endpoints
            for i in p._desired.info.values() if i.external_policy_local and i.health_check_node_port}


class RecordingChecks(HealthCheckServers):
    """The real servers' bookkeeping, without binding ports: what the loop asked for."""

    def __init__(self) -> None:
        super().__init__(HealthState(timeout=60))
        self.asked: dict[HealthCheckTarget, int] = {}

    def sync(self, targets: Any) -> list[str]:
        self.asked = dict(targets)
        return []


def random_service(rng: random.Random, i: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Service ``s{i}`` in one of a few shapes (ClusterIP, NodePort or LoadBalancer with a
    Local policy, internal Local, one or two ports, TCP or UDP), with its slice: endpoints
    here, elsewhere, both, or none."""
    ip = f"10.96.{i // 200}.{i % 200 + 1}"
    ports = [("p0", 80, rng.choice(["TCP", "UDP"]))] + ([("p1", 443, "TCP")] if rng.random() < 0.3 else [])
    spec: dict[str, Any] = {}
    shape = rng.choice(["plain", "nodeport-local", "lb-local", "internal-local"])
    if shape == "nodeport-local":
        spec = {"type": "NodePort", "externalTrafficPolicy": "Local",
                "ports": [{"name": n, "port": pt, "protocol": pr, "nodePort": 30000 + 2 * i + k}
                          for k, (n, pt, pr) in enumerate(ports)]}
    elif shape == "lb-local":
        spec = {"type": "LoadBalancer", "externalTrafficPolicy": "Local", "healthCheckNodePort": 32000 + i,
                "ports": [{"name": n, "port": pt, "protocol": pr, "nodePort": 30000 + 2 * i + k}
                          for k, (n, pt, pr) in enumerate(ports)]}
    elif shape == "internal-local":
        spec = {"internalTrafficPolicy": "Local"}
    svc = service(f"s{i}", ip, *ports, **spec)
    here = [f"10.244.1.{(i * 7 + k) % 250 + 1}" for k in range(rng.randint(0, 3))]
    there = [f"10.244.2.{(i * 5 + k) % 250 + 1}" for k in range(rng.randint(0, 4))]
    slice_ = eps(f"s{i}", here, *[(n, 8000 + pt, pr) for n, pt, pr in ports])
    slice_["endpoints"] += eps(f"s{i}", there, ("x", 1, "TCP"), node="node-b")["endpoints"]
    return svc, slice_


def churn(p: Proxier, rng: random.Random, live: dict[int, bool], *, changes: int) -> None:
    """Record ``changes`` random changes: Services added, changed (spec or endpoints), removed."""
    for _ in range(changes):
        i = rng.randrange(40)
        svc, slice_ = random_service(rng, i)
        if i not in live:
            p.on_event(Kind.SERVICE, "ADDED", svc)
            p.on_event(Kind.ENDPOINT_SLICE, "ADDED", slice_)
            live[i] = True
        elif rng.random() < 0.25:
            p.on_event(Kind.SERVICE, "DELETED", svc)
            p.on_event(Kind.ENDPOINT_SLICE, "DELETED", slice_)
            del live[i]
        elif rng.random() < 0.5:
            p.on_event(Kind.ENDPOINT_SLICE, "MODIFIED", slice_)
        else:
            p.on_event(Kind.SERVICE, "MODIFIED", svc)


def test_gauges_equal_a_recount_after_partial_syncs_that_add_change_and_remove() -> None:
    rng = random.Random(20261208)
    checks = RecordingChecks()
    p, clock = make(sync_period=1e9, drain_check_period=1e9)  # every sync below but the first is partial
    p.health_checks = checks
    live: dict[int, bool] = {}
    churn(p, rng, live, changes=20)
    p.on_synced(Kind.SERVICE)
    p.on_synced(Kind.ENDPOINT_SLICE)
    assert p.sync().full
    seen: dict[str, set[float]] = {}
    served: set[HealthCheckTarget] = set()
    for _ in range(150):
        churn(p, rng, live, changes=rng.randint(1, 4))
        clock.t += 1
        result = p.sync()
        assert not result.full and result.skipped is None
        published = gauges(p.metrics.registry)
        assert published == recount(p)
        assert checks.asked == health_targets(p)
        for name, value in published.items():
            seen.setdefault(name, set()).add(value)
        served |= checks.asked.keys()
    # Every IPv4 gauge went through several values and the health checks through
    # several Services, so the checks above compared real counts, not zeros.
    assert all(len(seen[name]) >= 3 for name in seen if "IPv6" not in name), seen
    assert len(served) >= 3


def test_a_full_sync_counts_everything_afresh() -> None:
    """A count gone wrong (here on purpose) stays wrong through partial syncs that do
    not touch it, and is repaired by the next full sync."""
    rng = random.Random(7)
    p, clock = make(sync_period=30)
    live: dict[int, bool] = {}
    churn(p, rng, live, changes=30)
    p.on_synced(Kind.SERVICE)
    p.on_synced(Kind.ENDPOINT_SLICE)
    p.sync()
    right = recount(p)["svcproxy_real_servers"]
    p._tallies.real_servers += 5
    clock.t += 1
    p.request_sync()
    assert not p.sync().full
    assert gauges(p.metrics.registry)["svcproxy_real_servers"] == right + 5
    clock.t += 30
    assert p.sync().full
    assert gauges(p.metrics.registry)["svcproxy_real_servers"] == right
