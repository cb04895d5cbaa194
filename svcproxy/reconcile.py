"""The reconcile loop: watched objects in, kernel IPVS table kept equal to them.

Design decisions (see docs/architecture.md):

- Node-local full state. Watch events only update ``ClusterState`` and mark the
  Services they touch as dirty; all kernel work happens in ``sync``.
- Initialized gate. Nothing is programmed until Services and EndpointSlices have both
  been listed once: an agent that starts with half the picture would delete the
  rules of every Service it has not seen yet.
- Two kinds of sync. A *full* sync (the first one, every ``sync_period``, and after a
  Node change) diffs everything against a fresh read of the kernel, so drift is
  repaired. A *partial* sync diffs just the dirty Services' keys against the kernel
  image kept since the last full sync; its cost scales with the change, not with the
  cluster.
- Translation is incremental in both. Only Services whose objects changed are
  translated again; everything is re-translated only when what translation reads
  besides the objects changed (the Node: addresses, zone), on the first sync, or
  while two Services claim the same virtual service (ownership may move). So an idle
  agent's periodic full sync costs a kernel read and a diff, not a translation of
  the whole cluster.
- Bounded frequency. Syncs are at least ``min_sync_period`` apart, so bursts of
  events coalesce into one sync.
- Graceful termination as kube-proxy does it: a removed TCP real server goes to
  weight 0 and is deleted when its connections are gone or after
  ``graceful_timeout``; UDP/SCTP ones are deleted at once. Weight 0 in the kernel for
  a destination we do not want *is* the drain marker, so a restarted agent adopts the
  drains in progress instead of cutting them.
- Failed operations are counted, and the Services they belong to are retried on the
  next sync; nothing raises out of the loop.
"""

from __future__ import annotations

import gc
import logging
import threading
from contextlib import contextmanager, nullcontext
import time
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from svcproxy.diff import Exclusions, apply_ops, diff
from svcproxy.health import HealthCheckServers, HealthCheckTarget, HealthState, node_eligible
from svcproxy.ipvs.backend import Backend, BackendError
from svcproxy.kube.store import Event, Kind
from svcproxy.kube.translate import (
    Problem,
    ServiceInfo,
    TranslateConfig,
    node_info,
    translate,
    translate_service,
)
from svcproxy.metrics import Metrics
from svcproxy.model import Destination, OpKind, Operation, Protocol, ServiceKey, Table, VirtualService
from svcproxy.node.nat import ServiceNat
from svcproxy.render import plan_text

log = logging.getLogger("svcproxy.reconcile")

Clock = Callable[[], float]
NamespacedName = tuple[str, str]
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
TRIGGER_TIME_ANNOTATION = "endpoints.kubernetes.io/last-change-trigger-time"


def _nn(obj: Mapping[str, Any]) -> NamespacedName | None:
    meta = obj.get("metadata")
    if not isinstance(meta, Mapping):
        return None
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        return None
    ns = meta.get("namespace")
    return (ns if isinstance(ns, str) else "", name)


def _slice_service(obj: Mapping[str, Any]) -> NamespacedName | None:
    nn = _nn(obj)
    labels = (obj.get("metadata") or {}).get("labels")
    if nn is None or not isinstance(labels, Mapping):
        return None
    svc = labels.get(SERVICE_NAME_LABEL)
    return (nn[0], svc) if isinstance(svc, str) and svc else None


@dataclass
class ClusterState:
    """The objects the watchers reported, indexed the way translation reads them."""

    node_name: str
    services: dict[NamespacedName, Mapping[str, Any]] = field(default_factory=dict)
    slices: dict[NamespacedName, Mapping[str, Any]] = field(default_factory=dict)
    slices_by_service: dict[NamespacedName, dict[NamespacedName, Mapping[str, Any]]] = field(default_factory=dict)
    node: Mapping[str, Any] | None = None

    def apply(self, kind: Kind, event_type: str, obj: Mapping[str, Any]) -> set[NamespacedName] | None:
        """Record one event; returns the Services it touches, or None for a Node change."""
        nn = _nn(obj)
        if nn is None:
            return set()
        deleted = event_type == "DELETED"
        if kind is Kind.SERVICE:
            if deleted:
                self.services.pop(nn, None)
            else:
                self.services[nn] = obj
            return {nn}
        if kind is Kind.ENDPOINT_SLICE:
            touched: set[NamespacedName] = set()
            old = self.slices.pop(nn, None)
            if old is not None:
                old_svc = _slice_service(old)
                if old_svc is not None:
                    touched.add(old_svc)
                    group = self.slices_by_service.get(old_svc)
                    if group is not None:
                        group.pop(nn, None)
                        if not group:
                            del self.slices_by_service[old_svc]
            if not deleted:
                self.slices[nn] = obj
                svc = _slice_service(obj)
                if svc is not None:
                    touched.add(svc)
                    self.slices_by_service.setdefault(svc, {})[nn] = obj
            return touched
        if nn[1] == self.node_name:
            self.node = None if deleted else obj
        return None

    def slices_of(self, service: NamespacedName) -> list[Mapping[str, Any]]:
        return list(self.slices_by_service.get(service, {}).values())


@dataclass(frozen=True)
class ProxierConfig:
    """Everything the loop needs besides its collaborators."""

    #: Its node's addresses, when given, win over the Node object's (--node-ip).
    translate: TranslateConfig
    node_ips_override: tuple[str, ...] = ()
    exclusions: Exclusions = Exclusions()
    min_sync_period: float = 1.0
    sync_period: float = 30.0
    graceful_timeout: float = 900.0
    #: While real servers drain, full syncs (which read connection counts) run this often.
    drain_check_period: float = 10.0
    dry_run: bool = False
    #: --nodeport-addresses: the node's local addresses for NodePorts, re-read at each
    #: full sync (None: the Node object's addresses, or node_ips_override).
    node_address_source: Callable[[], tuple[str, ...]] | None = None
    #: Also wait for the Node object's first list before programming anything: without
    #: it, a restarted agent would translate NodePorts without the node's addresses and
    #: delete them until the Node arrives (the agent sets this; its sources list Nodes).
    wait_for_node: bool = False
    #: A sync that could not run at all (backend unavailable) is retried after this
    #: many seconds, doubling up to sync_period: never a hot loop.
    retry_backoff: float = 1.0


@dataclass(frozen=True)
class SyncResult:
    full: bool
    operations: tuple[Operation, ...]
    failed: int
    duration: float
    skipped: str | None = None
    #: How many Services were translated for this sync (all of them, or only the
    #: changed ones: see the module docstring).
    translated: int = 0


class NamespaceGone(Exception):
    """A Pod network namespace vanished: detach it quietly, it is not an error."""


@dataclass(eq=False)
class Target:
    """One IPVS table svcproxy keeps in sync: the node's, or a Pod namespace's.

    Each target has its own kernel image, drains and retries, so one slow or failing
    namespace never holds up the others. Pod targets only get the Pod-visible part of
    the table (not NodePorts: those are addressed to the node) and may have a
    ``prepare`` hook that fits the namespace for IPVS (sysctls, VIP routes) before
    operations are applied.
    """

    name: str
    backend: Backend
    pod: bool = False
    prepare: Callable[[Table], None] | None = None
    #: The hook logs instead of changing anything in a dry run, so it runs then too.
    prepare_in_dry_run: bool = False
    actual: Table = field(default_factory=Table)
    retry: set[ServiceKey] = field(default_factory=set)
    draining: dict[tuple[ServiceKey, str, int], float] = field(default_factory=dict)
    needs_full: bool = True
    failures: int = 0
    #: A failing Pod namespace is retried with backoff, not at every sync.
    next_try: float = float("-inf")
    #: Set once the target's table was programmed (what the CNI plugin waits for).
    synced: threading.Event = field(default_factory=threading.Event)


def _parse_trigger_time(text: object) -> float | None:
    if not isinstance(text, str):
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


@contextmanager
def paused_gc() -> Iterator[None]:
    """Keep the cyclic garbage collector out of a full sync.

    Translation, the kernel read and the diff build hundreds of thousands of small
    objects without cycles (refcounting frees them), yet every few hundred allocations
    trigger a collection that walks the whole heap: 30% of a full translate + diff's
    CPU time at 10,000 Services (bench/core.py), half of decoding a netlink read
    (bench/ipvs.py --codec). The collector runs again as soon as the sync is done.
    """
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _service_nat(info: ServiceInfo, keys: tuple[ServiceKey, ...]) -> ServiceNat:
    """``keys``: the Service's keys that made it into the table (duplicates dropped)."""
    return ServiceNat(keys, info.cluster_ips, info.external_policy_local, info.local_endpoint_ips)


class Proxier:
    """Owns the desired table and drives the backend. Thread-safe: watchers call
    ``on_event``/``on_synced`` from their threads, the loop runs in ``run``."""

    def __init__(
        self,
        backend: Backend,
        config: ProxierConfig,
        *,
        metrics: Metrics | None = None,
        health: HealthState | None = None,
        health_checks: HealthCheckServers | None = None,
        clock: Clock = time.time,
        monotonic: Clock = time.monotonic,
    ) -> None:
        self.backend = backend
        self.config = config
        self.metrics = metrics or Metrics()
        self.health = health or HealthState(timeout=2 * config.sync_period, clock=clock)
        self.health_checks = health_checks
        self._clock = clock
        self._monotonic = monotonic
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self.state = ClusterState(node_name=config.translate.node.name)
        self._synced: set[Kind] = set()
        self._dirty: set[NamespacedName] = set()
        self._node_dirty = True
        self._trigger_times: list[float] = []
        # What the last syncs computed and what the kernel is believed to hold.
        self._translate_config = config.translate
        self._desired: dict[ServiceKey, VirtualService] = {}
        self._keys_by_service: dict[NamespacedName, tuple[ServiceKey, ...]] = {}
        self._owner: dict[ServiceKey, NamespacedName] = {}
        self._info: dict[NamespacedName, ServiceInfo] = {}
        #: Node plumbing's view of each Service; an unchanged Service keeps its object
        #: across syncs, so plumbing only revisits the ones that changed.
        self._nat: dict[NamespacedName, ServiceNat] = {}
        self.node_target = Target("node", backend)
        self._targets: dict[str, Target] = {"node": self.node_target}
        self._reported: set[Problem] = set()
        self._last_full = float("-inf")
        self._last_sync = float("-inf")
        self._discovered: tuple[str, ...] = ()
        self._failed_syncs = 0
        self._retry_at = float("-inf")
        #: Everything is translated again at the next sync (first sync, Node changed,
        #: or two Services claimed one virtual service).
        self._translate_all = True
        self.full_syncs = 0
        self.partial_syncs = 0
        self.last_result: SyncResult | None = None

    # --- inputs (watcher threads) --------------------------------------------------

    def on_event(self, kind: Kind, event_type: str, obj: Mapping[str, Any]) -> None:
        with self._lock:
            touched = self.state.apply(kind, event_type, obj)
            if touched is None:
                self._node_dirty = True
            else:
                self._dirty |= touched
            if kind is Kind.SERVICE:
                self.metrics.service_changes.inc()
            elif kind is Kind.ENDPOINT_SLICE:
                self.metrics.endpoint_changes.inc()
                annotations = (obj.get("metadata") or {}).get("annotations")
                if isinstance(annotations, Mapping) and event_type != "DELETED":
                    trigger = _parse_trigger_time(annotations.get(TRIGGER_TIME_ANNOTATION))
                    if trigger is not None:
                        self._trigger_times.append(trigger)
        self.health.queued()
        self.metrics.last_queued.set(self._clock())
        self._wake.set()

    def sink(self, event: Event) -> None:
        """Adapter for the watchers' and file source's ``sink`` callback."""
        self.on_event(event.kind, event.type, event.obj)

    def on_synced(self, kind: Kind) -> None:
        with self._lock:
            self._synced.add(kind)
        self._wake.set()

    @property
    def initialized(self) -> bool:
        wanted = {Kind.SERVICE, Kind.ENDPOINT_SLICE, Kind.NODE} if self.config.wait_for_node else {
            Kind.SERVICE, Kind.ENDPOINT_SLICE}
        with self._lock:
            return wanted <= self._synced

    # --- the loop -------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Sync when woken, at most every min_sync_period, fully every sync_period."""
        while not stop.is_set():
            now = self._monotonic()
            next_full = max(self._last_full + self._full_interval(), self._retry_at)
            if self.initialized:
                timeout = max(0.0, next_full - now)
                with self._lock:
                    pending = any(t.retry or (t.needs_full and t.pod) for t in self._targets.values())
                if pending:
                    timeout = min(timeout, max(self.config.min_sync_period, 1.0))
            else:
                timeout = 1.0
            self._wake.wait(timeout)
            if stop.is_set():
                break
            self._wake.clear()
            if not self.initialized:
                continue
            wait = max(self._last_sync + self.config.min_sync_period, self._retry_at) - self._monotonic()
            if wait > 0 and stop.wait(wait):
                break
            self.sync()

    def sync(self, force_full: bool = False) -> SyncResult:
        """One sync; full when due (or forced), else only the dirty Services."""
        start = self._monotonic()
        if not self.initialized:
            return SyncResult(False, (), 0, 0.0, skipped="waiting for Services and EndpointSlices to sync")
        if self.config.node_address_source is not None and (
                force_full or self._last_full == float("-inf") or start - self._last_full >= self._full_interval()):
            self._discover_node_addresses()
        with self._lock:
            full = (force_full or self._node_dirty or self._last_full == float("-inf")
                    or start - self._last_full >= self._full_interval())
            dirty, self._dirty = self._dirty, set()
            triggers, self._trigger_times = self._trigger_times, []
            node_changed, self._node_dirty = self._node_dirty, False
            if node_changed:
                self._refresh_node()
                self._translate_all = True
            translate_all = full and self._translate_all
            if translate_all:
                self._translate_all = False
            snapshot = self._snapshot(None if translate_all else dirty)
        try:
            with paused_gc() if full else nullcontext():
                if translate_all:
                    result = self._full_sync(snapshot, start)
                else:
                    result = self._partial_sync(snapshot, start, full=full)
        except BackendError as exc:
            self._failed_syncs += 1
            delay = min(self.config.retry_backoff * 2 ** (self._failed_syncs - 1),
                        max(self.config.sync_period, self.config.retry_backoff))
            self._retry_at = self._monotonic() + delay
            log.error("sync failed, will retry in %.0f s: %s", delay, exc)
            self.metrics.sync_errors.inc()
            with self._lock:
                self._dirty |= dirty
                self._node_dirty = self._node_dirty or node_changed
                self._translate_all = self._translate_all or translate_all
            result = SyncResult(full, (), 0, self._monotonic() - start, skipped=str(exc))
            self.last_result = result
            return result
        self._last_sync = start
        self._failed_syncs = 0
        self._retry_at = float("-inf")
        if full:
            self._last_full = start
        self.metrics.sync_duration.observe(result.duration)
        self.metrics.syncs.labels("full" if full else "partial").inc()
        self.metrics.last_sync.set(self._clock())
        now = self._clock()
        for t in triggers:
            self.metrics.network_programming.observe(max(0.0, now - t))
        self.health.updated()
        if full and result.failed == 0 and not self.config.dry_run:
            self.health.set_ready()
        elif full and self.config.dry_run:
            self.health.set_ready()
        self.last_result = result
        return result

    # --- internals ------------------------------------------------------------------

    def _full_interval(self) -> float:
        with self._lock:
            draining = any(t.draining for t in self._targets.values())
        if draining:
            return min(self.config.sync_period, self.config.drain_check_period)
        return self.config.sync_period

    def _discover_node_addresses(self) -> None:
        assert self.config.node_address_source is not None
        try:
            found = tuple(self.config.node_address_source())
        except Exception as exc:  # rtnetlink trouble: keep the addresses we had
            log.error("cannot read the node's addresses for NodePorts (keeping %s): %s",
                      ", ".join(self._discovered) or "none", exc)
            return
        if found == self._discovered:
            return
        if not found:
            log.warning("no local address matches --nodeport-addresses: NodePorts use the Node object's addresses")
        else:
            log.info("NodePorts served on %s (--nodeport-addresses)", ", ".join(found))
        self._discovered = found
        with self._lock:
            self._node_dirty = True

    def _refresh_node(self) -> None:
        """Node labels and addresses feed translation (zone hints, NodePorts)."""
        override = (self.config.node_ips_override or self._discovered
                    or self.config.translate.node.addresses)
        info, problems = node_info(self.state.node_name, self.state.node, override)
        self._count_problems(problems)
        self._translate_config = replace(self._translate_config, node=info)
        self.health.set_node_eligible(node_eligible(self.state.node))

    def _snapshot(self, only: set[NamespacedName] | None) -> dict[NamespacedName, tuple[Mapping[str, Any] | None, list[Mapping[str, Any]]]]:
        names = self.state.services.keys() if only is None else only
        return {nn: (self.state.services.get(nn), self.state.slices_of(nn)) for nn in names}

    def _count_problems(self, problems: Iterable[Problem]) -> None:
        """Log and count each problem once, not again at every full sync."""
        for p in problems:
            if p in self._reported:
                continue
            self._reported.add(p)
            self.metrics.input_problems.labels(p.kind).inc()
            (log.warning if p.severity == "warning" else log.error)("%s", p)

    def _full_sync(self, snapshot: Mapping[NamespacedName, tuple[Mapping[str, Any] | None, list[Mapping[str, Any]]]],
                   start: float) -> SyncResult:
        services = [svc for svc, _ in snapshot.values() if svc is not None]
        slices = [s for _, group in snapshot.values() for s in group]
        with self._lock:
            orphans = [s for nn, group in self.state.slices_by_service.items() if nn not in snapshot for s in group.values()]
        translation = translate(services, slices + orphans, self._translate_config)
        self._reported &= set(translation.problems)
        self._count_problems(translation.problems)
        # While two Services claim one virtual service, deleting or changing the
        # owner must hand it to the other, which only a translation of all does.
        self._translate_all = any(p.kind == "duplicate-virtual-service" for p in translation.problems)
        desired = dict(translation.table.services)
        keys_by_service: dict[NamespacedName, tuple[ServiceKey, ...]] = {}
        for nn, info in translation.services.items():
            keys_by_service[nn] = tuple(k for k in info.keys if k in desired)
        self._desired = desired
        self._keys_by_service = keys_by_service
        self._owner = {k: nn for nn, keys in keys_by_service.items() for k in keys}
        self._info = dict(translation.services)
        old_nat, nat = self._nat, {}
        for nn, info in self._info.items():
            new = _service_nat(info, keys_by_service.get(nn, ()))
            old = old_nat.get(nn)
            nat[nn] = old if old == new and old is not None else new
        self._nat = nat
        self.full_syncs += 1
        return replace(self._sync_targets(start, full=True, changed=None), translated=len(services))

    def _partial_sync(self, snapshot: Mapping[NamespacedName, tuple[Mapping[str, Any] | None, list[Mapping[str, Any]]]],
                      start: float, *, full: bool) -> SyncResult:
        """Translate the changed Services only; then diff their keys (``full``:
        everything) against the kernel."""
        changed: set[ServiceKey] = set()
        translated = 0
        for nn, (svc, slices) in snapshot.items():
            old_keys = self._keys_by_service.pop(nn, ())
            for key in old_keys:
                if self._owner.get(key) == nn:
                    del self._owner[key]
                    self._desired.pop(key, None)
            changed.update(old_keys)
            self._info.pop(nn, None)
            self._nat.pop(nn, None)
            if svc is None:
                continue
            vss, problems, info = translate_service(svc, slices, self._translate_config)
            translated += 1
            self._count_problems(problems)
            kept: list[ServiceKey] = []
            for vs in vss:
                owner = self._owner.get(vs.key)
                if owner is not None and owner != nn:
                    self._translate_all = True
                    self._count_problems([Problem("duplicate-virtual-service", f"Service {nn[0]}/{nn[1]}",
                                                  f"{vs.key} is already provided by Service {owner[0]}/{owner[1]}")])
                    continue
                self._desired[vs.key] = vs
                self._owner[vs.key] = nn
                kept.append(vs.key)
            self._keys_by_service[nn] = tuple(kept)
            changed.update(kept)
            if info is not None:
                self._info[nn] = info
                self._nat[nn] = _service_nat(info, tuple(kept))
        if full:
            # What a translation of everything would also say: slices whose Service
            # does not exist (warnings; only at full syncs, as before, so that the
            # moment between a Service's deletion and its slices' is not reported).
            with self._lock:
                orphans = [s for nn, group in self.state.slices_by_service.items()
                           if nn not in self.state.services for s in group.values()]
            if orphans:
                self._count_problems(translate([], orphans, self._translate_config).problems)
            self.full_syncs += 1
        else:
            self.partial_syncs += 1
        result = self._sync_targets(start, full=full, changed=None if full else changed)
        return replace(result, translated=translated)

    def _pod_visible(self) -> Callable[[ServiceKey], bool]:
        """Pod namespaces get ClusterIPs, externalIPs and LoadBalancer IPs; NodePorts
        are addressed to the node and reach it through the Pod's own NIC."""
        node_addresses = frozenset(self._translate_config.node.addresses)
        return lambda key: key.address not in node_addresses

    def _desired_for(self, target: Target, visible: Callable[[ServiceKey], bool],
                     cache: dict[bool, Table]) -> Table:
        """The node's table, or the Pod-visible part of it; each built once per sync
        and shared by every Pod namespace (not filtered again for each of them)."""
        table = cache.get(target.pod)
        if table is None:
            if target.pod:
                table = Table({k: v for k, v in self._desired.items() if visible(k)})
            else:
                table = Table(self._desired)
            cache[target.pod] = table
        return table

    def _sync_targets(self, start: float, *, full: bool, changed: set[ServiceKey] | None) -> SyncResult:
        """Bring every target in line; the node first (its failure to read aborts the
        sync), then each Pod namespace on its own."""
        visible = self._pod_visible()
        tables: dict[bool, Table] = {}
        all_ops: list[Operation] = []
        failed = 0
        with self._lock:
            targets = list(self._targets.values())
        now = self._monotonic()
        for target in targets:
            if target.pod and target.failures and now < target.next_try:
                continue
            target_full = full or target.needs_full
            try:
                desired = self._desired_for(target, visible, tables)
                if target_full:
                    actual = target.backend.read()
                    ops = diff(desired, actual, self.config.exclusions)
                    scope: set[ServiceKey] | None = None
                else:
                    actual = target.actual
                    scope = set(changed or ()) | target.retry
                    if target.pod:
                        scope = {k for k in scope if visible(k)}
                    ops = diff(desired, actual, self.config.exclusions, only=scope)
                if target.prepare is not None and (target.prepare_in_dry_run or not self.config.dry_run):
                    target.prepare(desired)
                done, bad = self._execute(target, ops, actual, scope)
            except NamespaceGone as exc:
                log.info("Pod namespace %s is gone, detaching: %s", target.name, exc)
                self.detach(target.name)
                continue
            except BackendError:
                if not target.pod:
                    raise
                target.failures += 1
                target.needs_full = True
                target.next_try = now + min(60.0, 2.0 ** target.failures)
                log.exception("cannot sync Pod namespace %s (will retry)", target.name)
                self.metrics.sync_errors.inc()
                failed += 1
                continue
            target.needs_full = False
            target.failures = 0
            all_ops.extend(done)
            failed += bad
            if not bad:
                target.synced.set()
        self._publish()
        return SyncResult(full, tuple(all_ops), failed, self._monotonic() - start)

    def _graceful(self, target: Target, ops: list[Operation], actual: Table,
                  scope: set[ServiceKey] | None) -> list[Operation]:
        """Turn deletes of live TCP real servers into weight-0 drains.

        Drains only complete when ``actual`` was just read from the kernel (``scope``
        None): connection counts in the kernel image kept between full syncs are stale.
        A partial sync only revisits the drains of the services in ``scope``.
        """
        fresh = scope is None
        now = self._monotonic()
        deleted_services = {op.service for op in ops if op.kind is OpKind.DELETE_SERVICE}
        out: list[Operation] = []
        still_draining: dict[tuple[ServiceKey, str, int], float] = {}
        for op in ops:
            dest = op.destination
            if (op.kind is not OpKind.DELETE_DESTINATION or dest is None
                    or op.service.protocol is not Protocol.TCP or op.service in deleted_services):
                out.append(op)
                continue
            vs = actual.services.get(op.service)
            current = vs.destination_map().get(dest.key) if vs is not None else None
            if current is None:
                out.append(op)
                continue
            marker = (op.service, dest.address, dest.port)
            started = target.draining.get(marker, now)
            connections = current.active_conns + current.inactive_conns
            if current.weight == 0 and fresh and (connections == 0 or now - started >= self.config.graceful_timeout):
                out.append(op)  # drained (or timed out): delete now
                continue
            still_draining[marker] = started
            if current.weight != 0:
                out.append(Operation(OpKind.EDIT_DESTINATION, op.service,
                                     destination=Destination(dest.address, dest.port, 0, current.forward)))
        if scope is None:
            target.draining = still_draining
        else:
            kept = {m: t for m, t in target.draining.items() if m[0] not in scope}
            target.draining = {**kept, **still_draining}
        return out

    def _execute(self, target: Target, ops: list[Operation], actual: Table,
                 scope: set[ServiceKey] | None) -> tuple[list[Operation], int]:
        """Apply one target's plan; returns the operations planned and how many failed."""
        if not self.config.dry_run:
            ops = self._graceful(target, ops, actual, scope)
        where = "" if not target.pod else f" in Pod namespace {target.name}"
        if ops and self.config.dry_run:
            log.info("dry run: would apply %d operations%s:\n%s", len(ops), where,
                     plan_text(Table(self._desired), actual, ops).rstrip())
            target.actual = actual
            return ops, 0
        if not ops:
            target.actual = actual
            target.retry = set()
            return ops, 0
        failed = target.backend.apply(ops)
        rejected = {id(f.operation) for f in failed}
        applied = [op for op in ops if id(op) not in rejected]
        target.actual, _ = apply_ops(actual, applied)
        target.retry = {f.operation.service for f in failed}
        for op in applied:
            self.metrics.operations.labels(op.kind.value).inc()
        for f in failed:
            self.metrics.failed_operations.labels(f.operation.kind.value).inc()
            log.error("IPVS operation failed%s (will retry): %s: %s", where, f.operation, f.error)
        log.info("sync%s: %d operations applied, %d failed", where, len(applied), len(failed))
        return ops, len(failed)

    # --- Pod namespaces -------------------------------------------------------------

    def attach(self, target: Target) -> None:
        """Keep another table (a Pod namespace's) in sync from the next sync on."""
        target.pod = True
        target.needs_full = True
        with self._lock:
            self._targets[target.name] = target
        self._wake.set()

    def wait_attached(self, name: str, timeout: float) -> bool:
        """Block until the named target's table has been programmed once."""
        with self._lock:
            target = self._targets.get(name)
        return target is not None and target.synced.wait(timeout)

    def detach(self, name: str) -> bool:
        with self._lock:
            return self._targets.pop(name, None) is not None

    @property
    def pod_targets(self) -> list[str]:
        return sorted(name for name, t in self._targets.items() if t.pod)

    def _publish(self) -> None:
        self.metrics.virtual_servers.set(len(self._desired))
        self.metrics.real_servers.set(sum(len(vs.destinations) for vs in self._desired.values()))
        self.metrics.draining_real_servers.set(len(self.node_target.draining))
        internal = sum(1 for i in self._info.values() if i.internal_policy_local and i.local_endpoints == 0)
        external = sum(1 for i in self._info.values() if i.external_policy_local and i.local_endpoints == 0)
        self.metrics.no_local_endpoints.labels("internal").set(internal)
        self.metrics.no_local_endpoints.labels("external").set(external)
        if self.health_checks is not None:
            targets = {
                HealthCheckTarget(i.namespace, i.name, i.health_check_node_port): i.local_endpoints
                for i in self._info.values()
                if i.external_policy_local and i.health_check_node_port
            }
            for error in self.health_checks.sync(targets):
                log.error("%s", error)

    # --- read-only views for tests and the CLI ---------------------------------------

    def service_nat(self) -> dict[NamespacedName, ServiceNat]:
        """What node plumbing needs, per Service (same object while a Service is unchanged)."""
        with self._lock:
            return dict(self._nat)

    def node_addresses(self) -> tuple[str, ...]:
        return self._translate_config.node.addresses

    @property
    def desired(self) -> Table:
        return Table(dict(self._desired))

    @property
    def draining(self) -> Sequence[tuple[ServiceKey, str, int]]:
        return sorted(self.node_target.draining)
