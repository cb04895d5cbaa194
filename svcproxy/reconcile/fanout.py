"""Pod namespaces (replicate mode), many at once.

Every Pod namespace holds a copy of the Pod-visible table, so a change costs an
operation per namespace. Planning it once per namespace (a diff, drains, an update of
the namespace's image) cost as much again as the writes, and reading every namespace
at each full sync held every change up for as long as all those reads took. So:

- *One plan for equal tables.* Namespaces whose images are equal (the common case once
  they converged) hold one image object; a sync diffs against it once, softens
  deletes into drains once, updates it once, and writes the same operations to each
  namespace. Each still gets its own prepare, writes, failures and conntrack cleanup.
  Images are compared by value after each sync (``share_images``): a namespace that
  differs (just attached, drifted, a rejected operation, a virtual service of its
  own) is planned alone until it is equal again.
- *Reads one at a time* (the caller schedules them): a namespace that shares an image
  is read and compared with it (``check``); equal means no drift and it stays, else
  it is planned alone against that read. Equal reads of several namespaces in one
  sync (all new and empty, or a restarted agent's) share one plan too (``sync_read``).
- *Drains end together.* A draining real server is deleted from namespaces sharing an
  image once each one's own read has shown it without connections, or at the
  graceful timeout, so that their images stay one.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Callable, Mapping, Sequence

from svcproxy.diff import apply_ops, diff
from svcproxy.model import DestKey, OpKind, Operation, ServiceKey, Table
from svcproxy.reconcile.draining import Marker, drain
from svcproxy.reconcile.targets import Applier, Target
from svcproxy.render import plan_text

log = logging.getLogger("svcproxy.reconcile")

#: One target's sync: the target, the plan applied to it, how many operations failed.
Synced = tuple[Target, list[Operation], int]
#: Where a target's exception goes: it never stops the others.
OnError = Callable[[Target, Exception], None]


def share_images(targets: Sequence[Target], desired: Table) -> None:
    """Let targets whose images are equal hold one object, so that their next syncs
    are planned once. The image to join is the one most of them already hold, or,
    when none is shared yet, the desired table itself (no drains). Compared by value
    (connection counts aside, as everywhere)."""
    held = Counter(id(t.actual) for t in targets)
    if not held:
        return
    most, count = held.most_common(1)[0]
    if count > 1:
        leader = next(t for t in targets if id(t.actual) == most)
        image, drains = leader.actual, leader.draining
    else:
        image, drains = desired, {}
    for target in targets:
        if target.actual is image and target.draining is drains or len(target.actual) != len(image):
            continue
        if target.draining == drains and (target.actual is image or target.actual == image):
            target.actual, target.draining = image, drains


class FanOut:
    """Syncs of Pod namespaces, by the rules of the loop's ``Applier``."""

    def __init__(self, applier: Applier) -> None:
        self.applier = applier

    @staticmethod
    def _read(target: Target) -> Table:
        if target.recheck is not None:
            target.recheck()
        return target.backend.read()

    def check(self, target: Target) -> Table | None:
        """Read a target that shares an image: None if the read equals the image (no
        drift; the drains it shows without connections are noted for the shared
        plan), else the read, to be planned for alone (``sync_read``)."""
        actual = self._read(target)
        if len(actual) != len(target.actual) or actual != target.actual:
            return actual
        for marker in target.draining:
            vs = actual.services.get(marker[0])
            dest = vs.destination_map().get(DestKey(marker[1], marker[2])) if vs is not None else None
            if dest is None or dest.active_conns + dest.inactive_conns == 0:
                target.quiet.add(marker)
        if self.applier.timeouts:
            self.applier._ensure_timeouts(target, self.applier.timeouts)
        return None

    def sync_read(self, targets: Sequence[Target], desired: Table, *, now: float, on_error: OnError,
                  reads: Mapping[Target, Table] | None = None) -> list[Synced]:
        """Sync targets against fresh reads of their tables (``reads``: read just
        before). Equal reads share one plan, unless it deletes real servers:
        connection counts, which decide drains, take no part in equality."""
        plans: list[tuple[Table, list[Operation], list[Table]]] = []  # shareable: read, plan, image after it
        out: list[Synced] = []
        for target in targets:
            try:
                actual = reads[target] if reads and target in reads else self._read(target)
            except Exception as exc:
                on_error(target, exc)
                continue
            for image, ops, after in plans[:3]:  # a bounded search: reads mostly agree
                if len(image) == len(actual) and image == actual:
                    break
            else:
                image, ops, after = actual, diff(desired, actual, self.applier.exclusions), []
                if not any(op.kind is OpKind.DELETE_DESTINATION for op in ops):
                    plans.append((image, ops, after))
            # Written right after its own read: two paths naming one namespace see
            # each other's writes.
            out.extend(self._fan_out([target], desired, ops, image, fresh=True, scope=None, now=now,
                                     on_error=on_error, after=after))
        return out

    def sync_shared(self, targets: Sequence[Target], desired: Table, *, scope: set[ServiceKey] | None,
                    now: float, on_error: OnError) -> list[Synced]:
        """Sync targets holding one image object and one drains object against that
        image: the virtual services in ``scope`` (None: all). One whose writes fail
        in part keeps an image of its own. A single target is a group of one."""
        actual = targets[0].actual
        ops = diff(desired, actual, self.applier.exclusions, only=scope)
        return self._fan_out(targets, desired, ops, actual, fresh=False, scope=scope, now=now,
                             on_error=on_error, settle=True)

    def _settle(self, targets: Sequence[Target], actual: Table, planned: list[Operation],
                still: dict[Marker, float], now: float) -> tuple[list[Operation], dict[Marker, float]]:
        """The drains that end now: every target's read showed them without
        connections, or they timed out. Their deletes go first."""
        timeout = self.applier.graceful_timeout
        quiet = set(still)  # quiet in every target: intersected from the fewest, stops when empty
        for target in sorted(targets, key=lambda t: len(t.quiet)):
            if not quiet:
                break
            quiet &= target.quiet
        ended = [m for m, started in still.items() if now - started >= timeout or (quiet and m in quiet)]
        if not ended:
            return planned, still
        busy = {op.service for op in planned}  # left to the plan this time (it deletes or edits them)
        done: list[Operation] = []
        over: set[Marker] = set()
        for marker in ended:
            if marker[0] in busy:
                continue
            vs = actual.services.get(marker[0])
            dest = vs.destination_map().get(DestKey(marker[1], marker[2])) if vs is not None else None
            if dest is not None and dest.weight == 0:
                done.append(Operation(OpKind.DELETE_DESTINATION, marker[0], destination=dest))
            over.add(marker)  # deleted now, or no longer draining
        for target in targets:
            target.quiet.difference_update(over)
        return done + planned, {m: t for m, t in still.items() if m not in over}

    def _fan_out(self, targets: Sequence[Target], desired: Table, ops: list[Operation], actual: Table, *,
                 fresh: bool, scope: set[ServiceKey] | None, now: float, on_error: OnError,
                 after: list[Table] | None = None, settle: bool = False) -> list[Synced]:
        """The plan ``ops`` (against ``actual``: every target's image, or its read)
        written to each target; the drains and the image after it (kept in
        ``after``) are computed once."""
        applier = self.applier
        if applier.dry_run:
            planned, still = ops, targets[0].draining
        else:
            drained = drain(ops, actual, targets[0].draining, now=now, timeout=applier.graceful_timeout,
                            scope=scope, fresh=fresh)
            planned, still = drained.operations, drained.draining
            if settle:
                planned, still = self._settle(targets, actual, planned, still, now)
        after = [] if after is None else after
        out: list[Synced] = []
        for target in targets:
            try:
                applier._prepare(target, desired)
                if fresh and applier.timeouts:
                    applier._ensure_timeouts(target, applier.timeouts)
                done, bad = self._execute(target, desired, ops, planned, still, actual, after)
                if target.conntrack is not None:
                    applier._clean_conntrack(target, target.conntrack, desired, None if fresh else scope)
            except Exception as exc:
                on_error(target, exc)
                continue
            out.append((target, done, bad))
        return out

    def _execute(self, target: Target, desired: Table, ops: list[Operation], planned: list[Operation],
                 still: dict[Marker, float], actual: Table, after: list[Table]) -> tuple[list[Operation], int]:
        where = f" in Pod namespace {target.name}"
        if self.applier.dry_run:
            if ops:
                log.info("dry run: would apply %d operations%s:\n%s", len(ops), where,
                         plan_text(desired, actual, ops).rstrip())
            target.actual = actual
            return ops, 0
        target.draining = still
        if not planned:
            target.actual = actual
            target.retry = set()
            return planned, 0
        failed = target.backend.apply(planned)
        rejected = {id(f.operation) for f in failed}
        applied = [op for op in planned if id(op) not in rejected]
        if failed:
            target.actual, _ = apply_ops(actual, applied)
        else:
            if not after:
                after.append(apply_ops(actual, applied)[0])
            target.actual = after[0]
        target.retry = {f.operation.service for f in failed}
        metrics = self.applier.metrics
        for kind, count in Counter(op.kind.value for op in applied).items():
            metrics.operations.labels(kind).inc(count)
        for f in failed:
            metrics.failed_operations.labels(f.operation.kind.value).inc()
            log.error("IPVS operation failed%s (will retry): %s: %s", where, f.operation, f.error)
        log.info("sync%s: %d operations applied, %d failed", where, len(applied), len(failed))
        return planned, len(failed)
