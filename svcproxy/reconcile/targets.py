"""One IPVS table kept in sync: the node's, or a Pod namespace's.

Each target has its own image of the kernel table, drains and retries, so one slow or
failing namespace never holds up the others. Pod targets get only the Pod-visible part
of the table and may have a ``prepare`` hook that fits the namespace for IPVS
(sysctls, VIP routes) before operations are applied; the node target's hook is node
plumbing. A sync of a target is: pick what to compare (a fresh kernel read, or the
image kept since the last full sync restricted to what changed), diff, prepare,
soften deletes into drains, apply, and remember what the kernel now holds. A full
sync compares a slice of the table at a time and lets the loop apply changes in
between (sweep.py).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

from svcproxy.diff import Exclusions, apply_ops, diff, extend_plan
from svcproxy.ipvs.backend import Backend, BackendError, TimeoutControl
from svcproxy.ipvs.timeouts import Timeouts, changes
from svcproxy.metrics import Metrics
from svcproxy.model import Operation, ServiceKey, Table
from svcproxy.node.conntrack import ConntrackError, ConntrackTable, clean_stale_flows
from svcproxy.reconcile.draining import Marker, drain
from svcproxy.reconcile.sweep import Sweep
from svcproxy.render import plan_text

log = logging.getLogger("svcproxy.reconcile")

#: Called between two slices of a full sync with what applies the slices compared so
#: far: the loop calls that, then a partial sync, when changes wait (sweep.py).
Between = Callable[[Callable[[], None]], None]


@dataclass(eq=False)
class Target:
    """A table and what the loop knows about it between syncs."""

    name: str
    backend: Backend
    pod: bool = False
    prepare: Callable[[Table], None] | None = None
    #: Called at full syncs before ``prepare``: lets the hook re-read what it keeps
    #: an image of (partial syncs, the fan-out of a change, never wait for that).
    recheck: Callable[[], None] | None = None
    #: The hook logs instead of changing anything in a dry run, so it runs then too.
    prepare_in_dry_run: bool = False
    actual: Table = field(default_factory=Table)
    retry: set[ServiceKey] = field(default_factory=set)
    draining: dict[Marker, float] = field(default_factory=dict)
    needs_full: bool = True
    failures: int = 0
    #: A failing Pod namespace is retried with backoff, not at every sync.
    next_try: float = float("-inf")
    #: When the table was last read afresh (the loop's monotonic clock; Pod namespaces).
    read_at: float = float("-inf")
    #: Drains its last read showed without connections (reconcile/fanout.py).
    quiet: set[Marker] = field(default_factory=set)
    #: Set once the target's table was programmed (what the CNI plugin waits for).
    synced: threading.Event = field(default_factory=threading.Event)
    #: The namespace's conntrack table, for the UDP cleanup (None: not cleaned).
    conntrack: ConntrackTable | None = None
    #: The full sync in progress, while it lets partial syncs in (sweep.py).
    sweep: Sweep | None = None

    def failed(self, now: float) -> None:
        """A Pod namespace that could not be synced: read it afresh, later."""
        self.failures += 1
        self.needs_full = True
        self.next_try = now + min(60.0, 2.0 ** self.failures)


@dataclass(frozen=True)
class Applier:
    """How targets are synced: the same rules for every target of one loop."""

    exclusions: Exclusions
    dry_run: bool
    graceful_timeout: float
    metrics: Metrics
    #: --ipvs-*-timeout: checked at every full sync of every target (None: left alone).
    timeouts: Timeouts | None = None
    #: Virtual services a full sync compares between two chances for a partial sync.
    slice_size: int = 500

    def sync(self, target: Target, desired: Table, *, scope: set[ServiceKey] | None, now: float,
             between: Between | None = None) -> tuple[list[Operation], int]:
        """Bring ``target`` in line with ``desired``; returns the plan and how many
        operations failed. ``scope`` None: against a fresh kernel read, a slice at a
        time, calling ``between`` after each (see sweep.py); else only the virtual
        services in ``scope`` (the caller adds the target's retries) against its
        image. Backend errors and the prepare hook's exceptions propagate."""
        if scope is None:
            return self._full(target, desired, now=now, between=between)
        if target.sweep is not None:
            target.actual = target.sweep.touch(scope, target.actual)
        actual = target.actual
        ops = diff(desired, actual, self.exclusions, only=scope)
        self._prepare(target, desired)
        result = self._execute(target, desired, ops, actual, scope, now, fresh=False)
        if target.conntrack is not None:
            self._clean_conntrack(target, target.conntrack, desired, scope)
        return result

    def _prepare(self, target: Target, desired: Table) -> None:
        if target.prepare is not None and (target.prepare_in_dry_run or not self.dry_run):
            target.prepare(desired)

    def _full(self, target: Target, desired: Table, *, now: float,
              between: Between | None) -> tuple[list[Operation], int]:
        """Read the kernel, then compare and apply a slice at a time (sweep.py)."""
        if target.recheck is not None:
            target.recheck()
        sweep = target.sweep = Sweep()  # counts touched keys from before the read on
        try:
            fresh = self._read(target, between)
        except BaseException:
            target.sweep = None
            raise
        self._prepare(target, desired)
        if self.timeouts:
            self._ensure_timeouts(target, self.timeouts)
        sweep.load(desired, fresh, target.actual)
        done: list[Operation] = []
        failed = 0

        def apply_compared() -> None:
            nonlocal failed
            ops, bad = self._apply_compared(target, sweep, desired, now)
            done.extend(ops)
            failed += bad

        try:
            while not sweep.finished:
                extend_plan(sweep.phases, desired, fresh, sweep.next_slice(self.slice_size), self.exclusions)
                if between is not None and not sweep.finished:
                    between(apply_compared)
            apply_compared()
        finally:
            target.sweep = None
        if target.conntrack is not None:
            self._clean_conntrack(target, target.conntrack, desired, None)
        return done, failed

    @staticmethod
    def _read(target: Target, between: Between | None) -> Table:
        """The kernel's table. Where the node's backend reads a consistent snapshot
        whatever runs beside it (``consistent_read``), the read runs in a helper
        thread while the loop lets changes in (``between``): a read of a big table
        takes seconds of wall time on a busy node (sweep.py says why the result is
        exact). The kernel's own dump is not such a snapshot (it resumes by position:
        a service deleted during it can make it skip another, which the comparison
        would then try to add again), so the netlink and ipvsadm backends, and Pod
        namespaces, are read in the loop's thread."""
        if between is None or target.pod or not getattr(target.backend, "consistent_read", False):
            return target.backend.read()
        box: dict[str, Any] = {}

        def read() -> None:
            try:
                box["table"] = target.backend.read()
            except BaseException as exc:  # handed to the loop's thread below
                box["error"] = exc

        reader = threading.Thread(target=read, name="svcproxy-read", daemon=True)
        reader.start()
        while reader.is_alive():
            reader.join(0.05)
            if reader.is_alive():
                between(_nothing_compared)
        if "error" in box:
            raise box["error"]
        table: Table = box["table"]
        return table

    def _apply_compared(self, target: Target, sweep: Sweep, desired: Table,
                        now: float) -> tuple[list[Operation], int]:
        keys, ops = sweep.take_compared()
        if not keys:
            return [], 0
        fresh, wanted = sweep.fresh.services, desired.services
        planned = {op.service for op in ops}
        # Where the kernel already holds what is desired, the image keeps the desired
        # object, not the one just read: the next diffs see identical objects, and
        # the read's hundred thousand objects die here instead of filling the
        # collector's oldest generation at every full sync.
        part = Table({k: vs if k in planned else wanted.get(k, vs)
                      for k in keys if (vs := fresh.get(k)) is not None})
        return self._execute(target, desired, ops, part, set(keys), now, fresh=True)

    def _clean_conntrack(self, target: Target, table: ConntrackTable, desired: Table,
                         scope: set[ServiceKey] | None) -> None:
        """After the operations: delete the UDP conntrack entries that keep clients on a
        real server that is gone or in the black hole of a service that had none
        (svcproxy/node/stale_flows.py). Errors are logged and counted; the next
        full sync looks again."""
        where = "" if not target.pod else f" in Pod namespace {target.name}"
        try:
            found, deleted = clean_stale_flows(table, desired, scope, dry_run=self.dry_run)
        except ConntrackError as exc:
            self.metrics.conntrack_errors.inc()
            log.error("UDP conntrack cleanup failed%s (will retry at the next full sync): %s", where, exc)
            return
        if not found:
            return
        shown = "; ".join(str(f) for f in found[:10]) + (f"; ... ({len(found)} in all)" if len(found) > 10 else "")
        if self.dry_run:
            log.info("dry run: would clear %d stale UDP conntrack entries%s: %s", len(found), where, shown)
            return
        self.metrics.conntrack_deleted.inc(deleted)
        log.info("cleared %d stale UDP conntrack entries%s: %s", deleted, where, shown)

    def _ensure_timeouts(self, target: Target, wanted: Timeouts) -> None:
        """The target's IPVS timeouts as asked. A failure is logged and counted and
        retried at the next full sync: it never stops the table's sync."""
        where = "" if not target.pod else f" in Pod namespace {target.name}"
        try:
            control: TimeoutControl = target.backend  # type: ignore[assignment]
            current = control.read_timeouts()
            todo = changes(current, wanted)
            if todo is None:
                return
            if self.dry_run:
                log.info("dry run: would set IPVS timeouts%s: %s (now tcp=%d tcpfin=%d udp=%d)", where,
                         todo.describe(), current.tcp, current.tcpfin, current.udp)
                return
            control.set_timeouts(todo)
        except (BackendError, OSError, AttributeError) as exc:
            self.metrics.ipvs_timeout_errors.inc()
            log.error("cannot set IPVS timeouts%s (will retry at the next full sync): %s", where, exc)
            return
        log.info("IPVS timeouts set%s: %s", where, todo.describe())

    def _execute(self, target: Target, desired: Table, ops: list[Operation], actual: Table,
                 scope: set[ServiceKey], now: float, *, fresh: bool) -> tuple[list[Operation], int]:
        """Apply ``ops`` (computed for the keys in ``scope`` against ``actual``: the
        target's whole image, or when ``fresh`` a kernel read of just those keys) and
        remember what the kernel now holds for them."""
        where = "" if not target.pod else f" in Pod namespace {target.name}"
        if self.dry_run:
            if ops:
                log.info("dry run: would apply %d operations%s:\n%s", len(ops), where,
                         plan_text(desired, actual, ops).rstrip())
            _remember(target, actual, scope, set(), whole=not fresh)
            return ops, 0
        drained = drain(ops, actual, target.draining, now=now, timeout=self.graceful_timeout, scope=scope,
                        fresh=fresh)
        target.draining = drained.draining
        ops = drained.operations
        if not ops:
            _remember(target, actual, scope, set(), whole=not fresh)
            return ops, 0
        failed = target.backend.apply(ops)
        rejected = {id(f.operation) for f in failed}
        applied = [op for op in ops if id(op) not in rejected]
        after, _ = apply_ops(actual, applied)
        _remember(target, after, scope, {f.operation.service for f in failed}, whole=not fresh)
        for op in applied:
            self.metrics.operations.labels(op.kind.value).inc()
        for f in failed:
            self.metrics.failed_operations.labels(f.operation.kind.value).inc()
            log.error("IPVS operation failed%s (will retry): %s: %s", where, f.operation, f.error)
        log.info("sync%s: %d operations applied, %d failed", where, len(applied), len(failed))
        return ops, len(failed)


def _nothing_compared() -> None:
    """While the kernel is read, nothing is compared yet: nothing to apply first."""


def _remember(target: Target, after: Table, scope: set[ServiceKey], failed: set[ServiceKey], *,
              whole: bool) -> None:
    """What the kernel holds for ``scope`` now: ``after`` (the whole image when
    ``whole``, else only ``scope``'s part of it, merged in). Failed keys are retried."""
    if whole:
        target.actual = after
    else:
        merged = dict(target.actual.services)
        for key in scope:
            merged.pop(key, None)
        merged.update(after.services)
        target.actual = Table(merged)
    target.retry = (target.retry - scope) | failed
