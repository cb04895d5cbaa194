"""The Proxier: joins change tracking, translation, the targets and the runner.

Watch events only update the tracker; all kernel work happens in ``sync``, which
takes the changes at once and decides between two kinds of sync:

- *full* (the first one, every ``sync_period``, after a Node change): every target
  is diffed against a fresh read of its kernel table, so drift is repaired. The
  comparison goes a slice at a time (``sweep.py``): Services that change meanwhile
  get a partial sync between two slices instead of waiting for the end;
- *partial*: only the changed Services' keys are diffed, against the image of the
  kernel table kept since the last full sync; its cost scales with the change.

Translation is incremental in both: only changed Services are translated again.
Everything is translated again only on the first sync, after a Node change (node
addresses and zone feed translation), and while two Services claim the same virtual
service (the claim may have to move). Failed operations are counted and their
virtual services retried at the next sync; nothing raises out of the loop.
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence

from svcproxy.diff import Exclusions
from svcproxy.gcpause import paused_gc
from svcproxy.health import HealthCheckServers, HealthCheckTarget, HealthState, node_eligible
from svcproxy.ipvs.backend import Backend, BackendError
from svcproxy.ipvs.timeouts import Timeouts
from svcproxy.kube.objects import NamespacedName
from svcproxy.kube.store import Event, Kind
from svcproxy.kube.translate import Problem, TranslateConfig, node_info, translate, translate_service
from svcproxy.logformat import about_display_name
from svcproxy.metrics import Metrics
from svcproxy.model import Operation, ServiceKey, Table, VirtualService
from svcproxy.node.conntrack import ConntrackTable
from svcproxy.node.nat import ServiceNat
from svcproxy.podns.netns import NamespaceGone
from svcproxy.podns.visible import visible_in_pods
from svcproxy.reconcile.changes import Changes, ChangeTracker, ClusterState, Snapshot
from svcproxy.reconcile.desired import DesiredState
from svcproxy.reconcile.runner import Clock, SyncRunner, SyncSchedule
from svcproxy.reconcile.fanout import FanOut, Synced, share_images
from svcproxy.reconcile.tallies import Tallies
from svcproxy.reconcile.targets import Applier, Target

log = logging.getLogger("svcproxy.reconcile")


class NodeHook(Protocol):
    """Node plumbing, run before the node target's operations (also in a dry run,
    where it only logs)."""

    def sync(self, services: Mapping[Any, ServiceNat], node_addresses: Iterable[str]) -> None: ...


@dataclass(frozen=True)
class ProxierConfig:
    """Everything the loop needs besides its collaborators."""

    translate: TranslateConfig
    #: Its node's addresses, when given, win over the Node object's (--node-ip).
    node_ips_override: tuple[str, ...] = ()
    exclusions: Exclusions = Exclusions()
    #: Why 0.1 s: see the runner's docstring.
    min_sync_period: float = 0.1
    sync_period: float = 30.0
    graceful_timeout: float = 900.0
    #: While real servers drain, full syncs (which read connection counts) run at least
    #: this often. Not shorter by default: under steady endpoint churn something always
    #: drains, and each full sync reads and compares the whole table (kube-proxy checks
    #: its drains once a minute).
    drain_check_period: float = 30.0
    dry_run: bool = False
    #: --nodeport-addresses: the node's local addresses for NodePorts, re-read at each
    #: full sync (None: the Node object's addresses, or node_ips_override).
    node_address_source: Callable[[], tuple[str, ...]] | None = None
    #: --nodeport-addresses primary: NodePorts on the node's primary IP of each family.
    primary_node_ips: bool = False
    #: Also wait for the Node object's first list before programming anything: without
    #: it, a restarted agent would translate NodePorts without the node's addresses and
    #: delete them until the Node arrives (the agent sets this; its sources list Nodes).
    wait_for_node: bool = False
    #: A sync that could not run at all (backend unavailable) is retried after this
    #: many seconds, doubling up to sync_period: never a hot loop.
    retry_backoff: float = 1.0
    #: --ipvs-tcp-timeout and friends (None: the kernel's timeouts are left alone).
    ipvs_timeouts: Timeouts | None = None
    #: A Pod namespace's table is read afresh (drift repaired) ``sync_period`` after its
    #: last read, but the loop reads at most one namespace that way every this many
    #: seconds, never in the node's full sync: a read costs about what the node's
    #: full sync does, and reading every namespace at once held every change up for
    #: as long as all those reads took (reconcile/fanout.py).
    pod_read_interval: float = 5.0


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
    #: The changes' programming latency was observed during the sync (a full sync
    #: applies the changes it took before it reads the kernel).
    triggers_observed: bool = False


class Proxier:
    """Owns the desired table and drives the targets. Thread-safe: watchers call
    ``on_event``/``on_synced`` from their threads, the loop runs in ``run``."""

    def __init__(
        self,
        backend: Backend,
        config: ProxierConfig,
        *,
        metrics: Metrics | None = None,
        health: HealthState | None = None,
        health_checks: HealthCheckServers | None = None,
        node_hook: NodeHook | None = None,
        node_conntrack: ConntrackTable | None = None,
        after_full_sync: Callable[[], None] | None = None,
        clock: Clock = time.time,
        monotonic: Clock = time.monotonic,
    ) -> None:
        self.backend = backend
        self.config = config
        self.metrics = metrics or Metrics()
        self.health = health or HealthState(timeout=2 * config.sync_period, clock=clock)
        self.health_checks = health_checks
        #: Run after each full sync that ran (the agent's collector policy, gcpause.py).
        self._after_full_sync = after_full_sync
        self._clock = clock
        self._monotonic = monotonic
        self.changes = ChangeTracker(config.translate.node.name, wait_for_node=config.wait_for_node)
        self.schedule = SyncSchedule(min_interval=config.min_sync_period, full_interval=self._full_interval,
                                     retry_backoff=config.retry_backoff, max_backoff=config.sync_period)
        self.runner = SyncRunner(self.schedule, lambda: self.sync(), ready=lambda: self.initialized,
                                 retrying=self._retrying, monotonic=monotonic)
        self.applier = Applier(config.exclusions, config.dry_run, config.graceful_timeout, self.metrics,
                               timeouts=config.ipvs_timeouts)
        self.fanout = FanOut(self.applier)
        #: No Pod namespace is read for its periodic check before this (monotonic) time.
        self._next_pod_read = float("-inf")
        #: Set by ``sync(force_full=True)``: every Pod namespace is read too.
        self._read_every_pod = False
        self._translate_config = config.translate
        self._desired = DesiredState()
        self._tallies = Tallies()
        self.node_target = Target("node", backend, prepare=self._node_prepare(node_hook), prepare_in_dry_run=True,
                                  conntrack=node_conntrack)
        self._targets: dict[str, Target] = {"node": self.node_target}
        self._reported: set[Problem] = set()
        #: The Pod-visible part of the desired table (None: to be filtered afresh), kept
        #: up to date key by key (``_pod_table``), for the node addresses it was filtered for.
        self._pod_desired: dict[ServiceKey, VirtualService] | None = None
        self._pod_dirty: set[ServiceKey] = set()
        self._pod_addresses: tuple[str, ...] = ()
        self._discovered: tuple[str, ...] = ()
        #: Everything is translated again at the next full sync: first sync, Node changed.
        self._translate_all = True
        self.full_syncs = 0
        self.partial_syncs = 0
        self.last_result: SyncResult | None = None
        #: A partial sync inside a full one failed: no more of them in this full sync,
        #: and the node is read afresh at the next sync.
        self._nested_failed = False
        #: When the sync in progress started: a partial sync nested in a full one keeps
        #: --min-sync-period from there too.
        self._sync_started = float("-inf")

    def _node_prepare(self, hook: NodeHook | None) -> Callable[[Table], None] | None:
        if hook is None:
            return None
        return lambda _desired: hook.sync(self._desired.nat, self._translate_config.node.addresses)

    @property
    def state(self) -> ClusterState:
        return self.changes.state

    # --- inputs (watcher threads) --------------------------------------------------

    def on_event(self, kind: Kind, event_type: str, obj: Mapping[str, Any]) -> None:
        self.changes.record(kind, event_type, obj)
        if kind is Kind.SERVICE:
            self.metrics.service_changes.inc()
        elif kind is Kind.ENDPOINT_SLICE:
            self.metrics.endpoint_changes.inc()
        self.health.queued()
        self.metrics.last_queued.set(self._clock())
        self.runner.request()

    def sink(self, event: Event) -> None:
        """Adapter for the watchers' and file source's ``sink`` callback."""
        self.on_event(event.kind, event.type, event.obj)

    def on_synced(self, kind: Kind) -> None:
        self.changes.listed(kind)
        self.runner.request()

    def request_sync(self) -> None:
        """Sync as soon as the schedule allows, even with no change recorded."""
        self.runner.request()

    @property
    def initialized(self) -> bool:
        return self.changes.initialized

    # --- the loop -------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Sync when woken, at most every min_sync_period, fully every sync_period."""
        self.runner.run(stop)

    def _retrying(self) -> bool:
        with self.changes.lock:
            pods = [t for t in self._targets.values() if t.pod]
            return (any(t.retry or (t.needs_full and t.pod) for t in self._targets.values())
                    or self._pod_read_due(pods, self._monotonic(), spaced=False) is not None)

    def _full_interval(self) -> float:
        with self.changes.lock:
            draining = any(t.draining for t in self._targets.values())
        if draining:
            return min(self.config.sync_period, self.config.drain_check_period)
        return self.config.sync_period

    def sync(self, force_full: bool = False) -> SyncResult:
        """One sync; full when due (or forced), else only the changed Services."""
        start = self._sync_started = self._monotonic()
        if not self.initialized:
            return SyncResult(False, (), 0, 0.0, skipped="waiting for Services and EndpointSlices to sync")
        if self.config.node_address_source is not None and (force_full or self.schedule.full_due(start)):
            self._discover_node_addresses()
        with self.changes.lock:
            full = force_full or self.changes.node_changed or self.schedule.full_due(start)
            changes = self.changes.take()
            if changes.node:
                self._refresh_node()
                self._translate_all = True
            # While two Services claim one virtual service, deleting or changing the
            # owner must hand it to the other, which only translating everything does.
            everything = full and (self._translate_all or self._desired.owners.collided)
            if everything:
                self._translate_all = False
            snapshot = self.state.snapshot(None if everything else set(changes.services))
        self._read_every_pod = force_full
        try:
            with paused_gc() if full else nullcontext():
                result = self._sync(snapshot, start, full=full, everything=everything, triggers=changes.triggers)
        except BackendError as exc:
            return self._sync_failed(exc, changes, start, full=full, everything=everything)
        except Exception as exc:  # a bug, or a collaborator's: never end the loop, retry later
            log.exception("sync failed unexpectedly")
            return self._sync_failed(exc, changes, start, full=full, everything=everything)
        if self._nested_failed:
            self._nested_failed = False
            self.node_target.needs_full = True
        self.schedule.succeeded(start, full=full)
        self._observe(result, changes)
        self.last_result = result
        if full and self._after_full_sync is not None:
            self._after_full_sync()
        return result

    def _sync_failed(self, exc: Exception, changes: Changes, start: float, *, full: bool,
                     everything: bool) -> SyncResult:
        """The node's table could not be read or written at all: retry with backoff."""
        delay = self.schedule.failed(self._monotonic())
        self._nested_failed = False
        log.error("sync failed, will retry in %.0f s: %s", delay, exc)
        self.metrics.sync_errors.inc()
        self.changes.put_back(changes)
        # The desired state already moved on (a deleted Service's keys are gone from
        # it), so the retry must compare everything with a fresh read of the kernel.
        self.node_target.needs_full = True
        self._translate_all = self._translate_all or everything
        result = SyncResult(full, (), 0, self._monotonic() - start, skipped=str(exc))
        self.last_result = result
        return result

    def _programmed(self, triggers: Iterable[float]) -> None:
        """Changes (by their trigger times) that just reached every table."""
        now = self._clock()
        for t in triggers:
            self.metrics.network_programming.observe(max(0.0, now - t))

    def _observe(self, result: SyncResult, changes: Changes) -> None:
        """Metrics and health after a sync that ran."""
        self.metrics.sync_duration.observe(result.duration)
        self.metrics.syncs.labels("full" if result.full else "partial").inc()
        self.metrics.last_sync.set(self._clock())
        if not result.triggers_observed:
            self._programmed(changes.triggers)
        self.health.updated()
        if result.full and (result.failed == 0 or self.config.dry_run):
            if not self.health.ready:
                log.info("ready: first full sync done in %.2f s, %d virtual services%s", result.duration,
                         len(self._desired.table), " (dry run)" if self.config.dry_run else "")
            self.health.set_ready()

    # --- translation ----------------------------------------------------------------

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
        self.changes.node_dirty()

    def _refresh_node(self) -> None:
        """Node labels and addresses feed translation (zone hints, NodePorts)."""
        override = (self.config.node_ips_override or self._discovered
                    or self.config.translate.node.addresses)
        info, problems = node_info(self.state.node_name, self.state.node, override,
                                   primary=self.config.primary_node_ips)
        self._count_problems(problems)
        self._translate_config = replace(self._translate_config, node=info)
        self.health.set_node_eligible(node_eligible(self.state.node))

    def _count_problems(self, problems: Iterable[Problem]) -> None:
        """Log and count each problem once, not again at every full sync."""
        for p in problems:
            if p in self._reported:
                continue
            self._reported.add(p)
            self.metrics.input_problems.labels(p.kind).inc()
            (log.warning if p.severity == "warning" else log.error)("%s", p, extra=about_display_name(p.obj))

    def _translate(self, snapshot: Snapshot, *, everything: bool) -> tuple[set[ServiceKey], list[Problem], int]:
        """Translate the snapshot's Services into the desired state; returns the keys
        that may have changed, the problems found and how many Services were translated.

        Every changed Service lets its claims go before any claims again (in sorted
        order), so a virtual service moving from one Service to another in one batch
        is not lost; a Service that lost a claim on a key freed here claims again too.
        """
        desired = self._desired
        if everything:
            desired.clear()
        changed: set[ServiceKey] = set()
        for nn, (svc, _slices) in snapshot.items():
            changed.update(desired.remove(nn) if svc is None else desired.release(nn))
        waiting = desired.owners.losers(changed) - snapshot.keys()
        if waiting:
            with self.changes.lock:
                snapshot = {**snapshot, **self.state.snapshot(waiting)}
            for nn in waiting:
                changed.update(desired.release(nn))
        problems: list[Problem] = []
        config = self._translate_config
        translated = 0
        for nn in sorted(snapshot):
            svc, slices = snapshot[nn]
            if svc is not None:
                vss, found, info = translate_service(svc, slices, config)
                changed.update(desired.claim(nn, vss, info, found))
                problems.extend(found)
                translated += 1
        if everything:
            desired.forget_nat_of_gone()
            self._pod_desired = None
        self._pod_dirty |= changed
        return changed, problems, translated

    def _sync(self, snapshot: Snapshot, start: float, *, full: bool, everything: bool,
              triggers: tuple[float, ...] = ()) -> SyncResult:
        """Translate what changed (``everything``: all), then bring the targets in line."""
        changed, problems, translated = self._translate(snapshot, everything=everything)
        if full:
            # What a whole translation also says: slices whose Service does not exist
            # (only at full syncs, so that the moment between a Service's deletion
            # and its slices' is not reported).
            with self.changes.lock:
                orphans = self.state.orphan_slices()
            if orphans:
                problems.extend(translate([], orphans, self._translate_config).problems)
        if everything:
            self._reported &= set(problems)
        self._count_problems(problems)
        if full:
            self.full_syncs += 1
        else:
            self.partial_syncs += 1
        if not (full and changed and not everything):
            result = self._sync_targets(start, full=full, changed=None if full else changed)
            return replace(result, translated=translated)
        # The changes this full sync took go first, against the kept images: else they
        # would wait for the kernel read and for their slice of the comparison.
        early = self._sync_targets(start, full=False, changed=changed, within_full=True)
        self._programmed(triggers)
        result = self._sync_targets(start, full=True, changed=None)
        return replace(result, operations=early.operations + result.operations, failed=early.failed + result.failed,
                       translated=translated, triggers_observed=True)

    # --- targets --------------------------------------------------------------------

    def _sync_targets(self, start: float, *, full: bool, changed: set[ServiceKey] | None,
                      within_full: bool = False) -> SyncResult:
        """Bring every target in line; the node first (its failure to read aborts the
        sync), then the Pod namespaces, each failing on its own. ``within_full``: a
        partial sync between two slices of a full one, for the targets whose image is
        known."""
        node_table = Table(self._desired.table)
        all_ops: list[Operation] = []
        failed = 0
        with self.changes.lock:
            targets = list(self._targets.values())
        now = self._monotonic()
        for target in targets:
            if target.pod:
                continue  # below, all together
            if within_full and target.needs_full and target.sweep is None:
                continue  # read afresh later in this full sync, or at the next sync
            scope: set[ServiceKey] | None = None
            if within_full or not (full or target.needs_full):
                scope = set(changed or ()) | target.retry
            done, bad = self.applier.sync(target, node_table, scope=scope, now=self._monotonic(),
                                          between=self._between)
            failed += _synced(target, done, bad, all_ops)
        pods = [t for t in targets if t.pod and not (t.failures and now < t.next_try)
                and not (within_full and t.needs_full)]  # read afresh later in this full sync
        if pods:
            done, bad = self._sync_pods(pods, full=full, changed=changed, now=now, within_full=within_full)
            all_ops.extend(done)
            failed += bad
        else:  # nothing keeps the Pod-visible table up to date meanwhile: filtered afresh when needed
            self._pod_desired = None
            self._pod_dirty = set()
        self._publish(full=full)
        return SyncResult(full, tuple(all_ops), failed, self._monotonic() - start)

    def _between(self, apply_compared: Callable[[], None]) -> None:
        """Between two slices of a full sync (reconcile/sweep.py): when Services changed
        and the schedule allows a sync, apply what the full sync compared so far, then
        the changes, so that they never wait for the whole comparison."""
        if self._nested_failed or not self.changes.services_pending:
            return
        earliest = max(self.schedule.earliest_sync(), self._sync_started + self.config.min_sync_period)
        if self._monotonic() < earliest:
            return
        apply_compared()
        self._partial_within_full()

    def _partial_within_full(self) -> None:
        start = self._monotonic()
        with self.changes.lock:
            changes = self.changes.take(services_only=True)
            snapshot = self.state.snapshot(set(changes.services))
        try:
            changed, problems, translated = self._translate(snapshot, everything=False)
            self._count_problems(problems)
            self.partial_syncs += 1
            result = self._sync_targets(start, full=False, changed=changed, within_full=True)
        except Exception as exc:  # the full sync goes on; the next sync reads the node afresh
            log.error("partial sync during a full sync failed (will retry): %s", exc)
            self.metrics.sync_errors.inc()
            self.changes.put_back(changes)
            self._nested_failed = True
            return
        self.schedule.succeeded(start, full=False)
        self._observe(replace(result, translated=translated), changes)

    # --- Pod namespaces (reconcile/fanout.py) ------------------------------------------

    def _pod_read_due(self, pods: Sequence[Target], now: float, *, spaced: bool = True) -> Target | None:
        """The Pod namespace whose periodic read is due (the one read longest ago);
        ``spaced``: None until ``pod_read_interval`` has passed since the last one."""
        if spaced and now < self._next_pod_read:
            return None
        due = [t for t in pods if not t.failures and now - t.read_at >= self.config.sync_period]
        return min(due, key=lambda t: t.read_at, default=None)

    def _sync_pods(self, pods: list[Target], *, full: bool, changed: set[ServiceKey] | None, now: float,
                   within_full: bool) -> tuple[list[Operation], int]:
        """The Pod namespaces: read those just attached or failed (and all of them
        when forced), check the one whose periodic read is due, then one plan for
        each set holding one image, and one for each with retries."""
        visible = visible_in_pods(self._translate_config.node.addresses)
        desired = self._pod_table()
        scope = None if full else {k for k in changed or () if visible(k)}
        results: list[Synced] = []
        failed = 0

        def on_error(target: Target, exc: Exception) -> None:
            nonlocal failed
            failed += self._pod_failed(target, exc, now)

        fresh = set() if within_full else {t for t in pods if t.needs_full or self._read_every_pod}
        due = None if full or within_full else self._pod_read_due([t for t in pods if t not in fresh], now)
        reads: dict[Target, Table] = {}
        if due is not None:
            self._next_pod_read = now + self.config.pod_read_interval
            try:
                with paused_gc():  # a read is a full sync's work
                    read = None if due.retry else self.fanout.check(due)
            except Exception as exc:
                on_error(due, exc)
                pods = [t for t in pods if t is not due]
            else:
                due.read_at = now
                if due.retry or read is not None:  # retrying, or drifted: planned alone
                    fresh.add(due)
                if read is not None:
                    reads[due] = read
        groups: dict[tuple[int, int], list[Target]] = {}
        for target in pods:
            if target not in fresh:
                key = (id(target), 0) if target.retry else (id(target.actual), id(target.draining))
                groups.setdefault(key, []).append(target)
        with paused_gc() if fresh else nullcontext():
            synced = self.fanout.sync_read([t for t in pods if t in fresh], desired, now=now, on_error=on_error,
                                           reads=reads)
        for target, _done, _bad in synced:
            target.read_at = now
        results.extend(synced)
        for group in groups.values():
            retry = {k for k in group[0].retry if visible(k)}  # alone when it has any
            results.extend(self.fanout.sync_shared(group, desired, scope=None if scope is None else scope | retry,
                                                   now=now, on_error=on_error))
        all_ops: list[Operation] = []
        for target, done, bad in results:
            failed += _synced(target, done, bad, all_ops)
        share_images([t for t, _done, bad in results if not bad], desired)
        return all_ops, failed

    def _pod_table(self) -> Table:
        """The Pod-visible part of the desired table. Filtering all of it at every sync
        cost more than the rest of a small partial sync with Pod namespaces attached; so
        it is filtered afresh only after a whole translation or a change of the node's
        addresses, else only the keys translation changed since are updated."""
        addresses = self._translate_config.node.addresses
        table = self._desired.table
        visible = visible_in_pods(addresses)
        if self._pod_desired is None or self._pod_addresses != addresses:
            self._pod_desired = {k: v for k, v in table.items() if visible(k)}
            self._pod_addresses = addresses
        else:
            for key in self._pod_dirty:
                vs = table.get(key)
                if vs is not None and visible(key):
                    self._pod_desired[key] = vs
                else:
                    self._pod_desired.pop(key, None)
        self._pod_dirty = set()
        return Table(dict(self._pod_desired))  # a copy: targets may keep it as their image

    def _pod_failed(self, target: Target, exc: Exception, now: float) -> int:
        """A Pod namespace that could not be synced: detached if it is gone, else
        retried with backoff. Returns 1 if it counts as a failure."""
        if isinstance(exc, NamespaceGone):
            log.info("Pod namespace %s is gone, detaching: %s", target.name, exc)
            self.detach(target.name, only=target)  # not a new namespace attached there since
            return 0
        # One namespace's trouble (a backend error, a program that would not start)
        # never stops the node's table or the other namespaces.
        target.failed(now)
        log.error("cannot sync Pod namespace %s (will retry)", target.name, exc_info=exc)
        self.metrics.sync_errors.inc()
        return 1

    def attach(self, target: Target) -> None:
        """Keep another table (a Pod namespace's) in sync from the next sync on."""
        target.pod = True
        target.needs_full = True
        with self.changes.lock:
            self._targets[target.name] = target
        self.runner.request()

    def wait_attached(self, name: str, timeout: float) -> bool:
        """Block until the named target's table has been programmed once."""
        with self.changes.lock:
            target = self._targets.get(name)
        return target is not None and target.synced.wait(timeout)

    def detach(self, name: str, *, only: Target | None = None) -> bool:
        """Stop syncing the named target (``only``: if it is still that one)."""
        with self.changes.lock:
            current = self._targets.get(name)
            if current is None or (only is not None and current is not only):
                return False
            del self._targets[name]
            return True

    @property
    def pod_targets(self) -> list[str]:
        return sorted(name for name, t in self._targets.items() if t.pod)

    def _publish(self, *, full: bool) -> None:
        """The gauges about the desired table (counted afresh at full syncs, else by
        what changed: tallies.py) and the healthCheckNodePort servers."""
        desired, tallies = self._desired, self._tallies
        if full:
            tallies.recount(desired)
        else:
            tallies.follow(desired)
        self.metrics.virtual_servers.set(len(desired.table))
        self.metrics.real_servers.set(tallies.real_servers)
        self.metrics.draining_real_servers.set(len(self.node_target.draining))
        for (policy, family), count in tallies.no_local.items():
            self.metrics.no_local_endpoints.labels(policy, family.value).set(count)
        if self.health_checks is not None:
            targets = {
                HealthCheckTarget(i.namespace, i.name, i.health_check_node_port): i.local_endpoints
                for i in tallies.health.values()
                if i.health_check_node_port  # always (tallies.serves_health_check): for the type checker
            }
            for error in self.health_checks.sync(targets):
                log.error("%s", error)

    # --- read-only views for tests and the CLI ---------------------------------------

    def service_nat(self) -> dict[NamespacedName, ServiceNat]:
        """What node plumbing needs, per Service (same object while a Service is unchanged)."""
        with self.changes.lock:
            return dict(self._desired.nat)

    def node_addresses(self) -> tuple[str, ...]:
        return self._translate_config.node.addresses

    @property
    def desired(self) -> Table:
        return Table(dict(self._desired.table))

    @property
    def draining(self) -> Sequence[tuple[ServiceKey, str, int]]:
        return sorted(self.node_target.draining)


def _synced(target: Target, done: Sequence[Operation], bad: int, all_ops: list[Operation]) -> int:
    """Record that ``target`` went through a sync (its operations added to ``all_ops``);
    returns the number of operations it refused."""
    target.needs_full = False
    target.failures = 0
    all_ops.extend(done)
    if not bad:
        target.synced.set()
    return bad
