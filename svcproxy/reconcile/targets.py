"""One IPVS table kept in sync: the node's, or a Pod namespace's.

Each target has its own image of the kernel table, drains and retries, so one slow or
failing namespace never holds up the others. Pod targets get only the Pod-visible part
of the table and may have a ``prepare`` hook that fits the namespace for IPVS
(sysctls, VIP routes) before operations are applied; the node target's hook is node
plumbing. A sync of a target is: pick what to compare (a fresh kernel read, or the
image kept since the last full sync restricted to what changed), diff, prepare,
soften deletes into drains, apply, and remember what the kernel now holds.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Callable

from svcproxy.diff import Exclusions, apply_ops, diff
from svcproxy.ipvs.backend import Backend, BackendError, TimeoutControl
from svcproxy.ipvs.timeouts import Timeouts, changes
from svcproxy.metrics import Metrics
from svcproxy.model import Operation, ServiceKey, Table
from svcproxy.node.conntrack import ConntrackError, ConntrackTable, clean_stale_flows
from svcproxy.reconcile.draining import Marker, drain
from svcproxy.render import plan_text

log = logging.getLogger("svcproxy.reconcile")


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
    #: Set once the target's table was programmed (what the CNI plugin waits for).
    synced: threading.Event = field(default_factory=threading.Event)
    #: The namespace's conntrack table, for the UDP cleanup (None: not cleaned).
    conntrack: ConntrackTable | None = None

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

    def sync(self, target: Target, desired: Table, *, scope: set[ServiceKey] | None,
             now: float) -> tuple[list[Operation], int]:
        """Bring ``target`` in line with ``desired``; returns the plan and how many
        operations failed. ``scope`` None: against a fresh kernel read; else only the
        virtual services in ``scope`` (the caller adds the target's retries) against
        its image. Backend errors and the prepare hook's exceptions propagate."""
        if scope is None:
            if target.recheck is not None:
                target.recheck()
            actual = target.backend.read()
            ops = diff(desired, actual, self.exclusions)
        else:
            actual = target.actual
            ops = diff(desired, actual, self.exclusions, only=scope)
        if target.prepare is not None and (target.prepare_in_dry_run or not self.dry_run):
            target.prepare(desired)
        if scope is None and self.timeouts:
            self._ensure_timeouts(target, self.timeouts)
        result = self._execute(target, desired, ops, actual, scope, now)
        if target.conntrack is not None:
            self._clean_conntrack(target, target.conntrack, desired, scope)
        return result

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
                 scope: set[ServiceKey] | None, now: float) -> tuple[list[Operation], int]:
        where = "" if not target.pod else f" in Pod namespace {target.name}"
        if self.dry_run:
            if ops:
                log.info("dry run: would apply %d operations%s:\n%s", len(ops), where,
                         plan_text(desired, actual, ops).rstrip())
            target.actual = actual
            return ops, 0
        drained = drain(ops, actual, target.draining, now=now, timeout=self.graceful_timeout, scope=scope)
        target.draining = drained.draining
        ops = drained.operations
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
