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
from svcproxy.ipvs.backend import Backend
from svcproxy.metrics import Metrics
from svcproxy.model import Operation, ServiceKey, Table
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

    def sync(self, target: Target, desired: Table, *, scope: set[ServiceKey] | None,
             now: float) -> tuple[list[Operation], int]:
        """Bring ``target`` in line with ``desired``; returns the plan and how many
        operations failed. ``scope`` None: against a fresh kernel read; else only the
        virtual services in ``scope`` (the caller adds the target's retries) against
        its image. Backend errors and the prepare hook's exceptions propagate."""
        if scope is None:
            actual = target.backend.read()
            ops = diff(desired, actual, self.exclusions)
        else:
            actual = target.actual
            ops = diff(desired, actual, self.exclusions, only=scope)
        if target.prepare is not None and (target.prepare_in_dry_run or not self.dry_run):
            target.prepare(desired)
        return self._execute(target, desired, ops, actual, scope, now)

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
