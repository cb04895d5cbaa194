"""Desired table x actual table -> ordered operations (a plan).

The order is the one kpng's IPVS backend settled on, because each phase only depends
on the ones before it: delete destinations, delete services, add/edit services,
add/edit destinations. Within a phase operations are sorted by key so that the same
inputs always give the same plan (plans are printed, diffed and tested as text).

Settings IPVS can change in place (scheduler, persistence, flags; weight, forwarding)
become edits, never delete+add, because a delete drops the service's connection
table and breaks every open connection through it.

The diff is always taken against what the kernel reports, never against a memory of
what was applied, so drift in the kernel is repaired by the same code path.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

from svcproxy.model import (
    Destination,
    OpKind,
    Operation,
    OperationResult,
    ServiceKey,
    Table,
    VirtualService,
)

_PHASE = {
    OpKind.DELETE_DESTINATION: 0,
    OpKind.DELETE_SERVICE: 1,
    OpKind.ADD_SERVICE: 2,
    OpKind.EDIT_SERVICE: 2,
    OpKind.ADD_DESTINATION: 3,
    OpKind.EDIT_DESTINATION: 3,
}

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Exclusions:
    """Kernel services svcproxy must never touch unless it wants them itself.

    ``cidrs`` mirrors kube-proxy's --ipvs-exclude-cidrs. fwmark services are never
    created by svcproxy and are always left alone: they belong to someone else.
    """

    cidrs: tuple[Network, ...] = ()

    @staticmethod
    def parse(cidrs: Iterable[str]) -> "Exclusions":
        return Exclusions(tuple(ipaddress.ip_network(c.strip(), strict=False) for c in cidrs if c.strip()))

    def protects(self, key: ServiceKey) -> bool:
        if key.fwmark:
            return True
        if not self.cidrs:
            return False
        ip = ipaddress.ip_address(key.address)
        return any(ip.version == net.version and ip in net for net in self.cidrs)


NO_EXCLUSIONS = Exclusions()


def _service_op(kind: OpKind, vs: VirtualService) -> Operation:
    return Operation(kind, vs.key, scheduler=vs.scheduler, persistence=vs.persistence, flags=vs.flags)


def _dest_op(kind: OpKind, key: ServiceKey, dest: Destination) -> Operation:
    return Operation(kind, key, destination=dest)


def diff_service(desired: VirtualService | None, actual: VirtualService | None) -> list[Operation]:
    """Operations that turn one actual virtual service into the desired one (unordered)."""
    ops: list[Operation] = []
    if desired is None:
        if actual is None:
            return ops
        for dest in actual.destinations:
            ops.append(_dest_op(OpKind.DELETE_DESTINATION, actual.key, dest))
        ops.append(_service_op(OpKind.DELETE_SERVICE, actual))
        return ops
    if actual is None:
        ops.append(_service_op(OpKind.ADD_SERVICE, desired))
        for dest in desired.destinations:
            ops.append(_dest_op(OpKind.ADD_DESTINATION, desired.key, dest))
        return ops
    if not desired.settings_equal(actual):
        ops.append(_service_op(OpKind.EDIT_SERVICE, desired))
    have = actual.destination_map()
    want = desired.destination_map()
    for dkey, dest in have.items():
        if dkey not in want:
            ops.append(_dest_op(OpKind.DELETE_DESTINATION, desired.key, dest))
    for dkey, dest in want.items():
        current = have.get(dkey)
        if current is None:
            ops.append(_dest_op(OpKind.ADD_DESTINATION, desired.key, dest))
        elif not dest.settings_equal(current):
            ops.append(_dest_op(OpKind.EDIT_DESTINATION, desired.key, dest))
    return ops


def order(ops: Iterable[Operation]) -> list[Operation]:
    """Sort operations into dependency-safe phases, deterministic within each."""

    def sort_key(op: Operation) -> tuple[int, ServiceKey, str, int, int]:
        dest = op.destination
        return (
            _PHASE[op.kind],
            op.service,
            dest.address if dest else "",
            dest.port if dest else -1,
            0 if op.kind in (OpKind.ADD_SERVICE, OpKind.ADD_DESTINATION) else 1,
        )

    return sorted(ops, key=sort_key)


def diff(
    desired: Table,
    actual: Table,
    exclusions: Exclusions = NO_EXCLUSIONS,
    only: Iterable[ServiceKey] | None = None,
) -> list[Operation]:
    """The ordered plan that turns ``actual`` into ``desired``.

    ``only`` restricts the diff to the given service keys (incremental syncs, where
    just a few Services changed); None compares everything.
    """
    ops: list[Operation] = []
    keys: Iterable[ServiceKey]
    if only is None:
        keys = set(desired.services) | set(actual.services)
    else:
        keys = set(only)
    for key in keys:
        want = desired.services.get(key)
        have = actual.services.get(key)
        if want is None and have is not None and exclusions.protects(key):
            continue
        ops.extend(diff_service(want, have))
    return order(ops)


DestMapGetter = Callable[[ServiceKey], dict[tuple[str, int], Destination]]


class PlanError(ValueError):
    """An operation that does not fit the table it is applied to (kernel-like errors)."""


def apply_plan(table: Table, ops: Sequence[Operation]) -> Table:
    """Apply operations to a table in memory, failing the way the kernel would.

    Used by property tests (applying diff(d, a) to a must give d). Raises PlanError on
    the first operation the kernel would reject.
    """
    result, failed = apply_ops(table, ops, stop_on_error=True)
    if failed:
        raise PlanError(failed[0].error)
    return result


def apply_ops(
    table: Table, ops: Sequence[Operation], *, stop_on_error: bool = False
) -> tuple[Table, list[OperationResult]]:
    """Apply operations in memory; return the new table and the operations rejected.

    A rejected operation leaves the table as it was and, like the kernel behind
    ``ipvsadm -R``, does not stop the ones after it unless ``stop_on_error``.
    """
    services: dict[ServiceKey, VirtualService] = dict(table.services)
    dests: dict[ServiceKey, dict[tuple[str, int], Destination]] = {}

    def dest_map(key: ServiceKey) -> dict[tuple[str, int], Destination]:
        if key not in dests:
            dests[key] = {(d.address, d.port): d for d in services[key].destinations}
        return dests[key]

    failed: list[OperationResult] = []
    for op in ops:
        try:
            _apply_one(services, dest_map, dests, op)
        except PlanError as exc:
            failed.append(OperationResult(op, str(exc)))
            if stop_on_error:
                break
    for key, dmap in dests.items():
        if key in services:
            services[key] = services[key].with_destinations(dmap.values())
    return Table(services), failed


def _apply_one(
    services: dict[ServiceKey, VirtualService],
    dest_map: DestMapGetter,
    dests: dict[ServiceKey, dict[tuple[str, int], Destination]],
    op: Operation,
) -> None:
    key = op.service
    if op.kind is OpKind.ADD_SERVICE:
        if key in services:
            raise PlanError(f"{op}: service already exists")
        services[key] = VirtualService(key, op.scheduler, op.persistence, op.flags)
        dests[key] = {}
        return
    if key not in services:
        raise PlanError(f"{op}: no such service")
    if op.kind is OpKind.EDIT_SERVICE:
        old = services[key]
        services[key] = VirtualService(key, op.scheduler, op.persistence, op.flags, old.destinations)
        return
    if op.kind is OpKind.DELETE_SERVICE:
        del services[key]
        dests.pop(key, None)
        return
    dest = op.destination
    if dest is None:
        raise PlanError(f"{op}: destination operation without a destination")
    dmap = dest_map(key)
    dkey = (dest.address, dest.port)
    if op.kind is OpKind.ADD_DESTINATION:
        if dkey in dmap:
            raise PlanError(f"{op}: destination already exists")
        dmap[dkey] = dest
    elif op.kind is OpKind.EDIT_DESTINATION:
        if dkey not in dmap:
            raise PlanError(f"{op}: no such destination")
        old_dest = dmap[dkey]
        dmap[dkey] = Destination(
            dest.address, dest.port, dest.weight, dest.forward, old_dest.active_conns, old_dest.inactive_conns
        )
    elif op.kind is OpKind.DELETE_DESTINATION:
        if dkey not in dmap:
            raise PlanError(f"{op}: no such destination")
        del dmap[dkey]


def summarize(ops: Sequence[Operation]) -> Mapping[OpKind, int]:
    counts = {kind: 0 for kind in OpKind}
    for op in ops:
        counts[op.kind] += 1
    return counts
