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
    return Operation(kind, vs.key, vs.scheduler, vs.persistence, vs.flags)


def _dest_key(dest: Destination) -> tuple[str, int]:
    return (dest.address, dest.port)


def service_sort_key(key: ServiceKey) -> tuple[str, str, int, int]:
    """The same order as ServiceKey's own (dataclass order=True), without its slow __lt__."""
    return (key.protocol.value, key.address, key.port, key.fwmark)


_service_sort_key = service_sort_key

#: A plan being built: its four phases (see the module docstring), each in key order.
Phases = list[list[Operation]]


def new_phases() -> Phases:
    return [[], [], [], []]


def plan_of(phases: Phases) -> list[Operation]:
    return [op for phase in phases for op in phase]


def _diff_into(phases: list[list[Operation]], desired: VirtualService | None, actual: VirtualService | None) -> None:
    """Append the operations for one virtual service to the four phase lists.

    Destinations are visited in key order, so that with services visited in key
    order the concatenated phases come out already sorted: no global sort needed.
    """
    dels, svc_dels, svc_sets, dest_sets = phases
    if desired is None:
        if actual is None:
            return
        key = actual.key
        for dest in sorted(actual.destinations, key=_dest_key):
            dels.append(Operation(OpKind.DELETE_DESTINATION, key, "rr", None, _NO_FLAGS, dest))
        svc_dels.append(_service_op(OpKind.DELETE_SERVICE, actual))
        return
    key = desired.key
    if actual is None:
        svc_sets.append(_service_op(OpKind.ADD_SERVICE, desired))
        for dest in sorted(desired.destinations, key=_dest_key):
            dest_sets.append(Operation(OpKind.ADD_DESTINATION, key, "rr", None, _NO_FLAGS, dest))
        return
    if not desired.settings_equal(actual):
        svc_sets.append(_service_op(OpKind.EDIT_SERVICE, desired))
    if desired.destinations == actual.destinations:
        return
    have = {(d.address, d.port): d for d in actual.destinations}
    want = {(d.address, d.port): d for d in desired.destinations}
    for dkey in sorted(have.keys() - want.keys()):
        dels.append(Operation(OpKind.DELETE_DESTINATION, key, "rr", None, _NO_FLAGS, have[dkey]))
    for dkey in sorted(want):
        dest = want[dkey]
        current = have.get(dkey)
        if current is None:
            dest_sets.append(Operation(OpKind.ADD_DESTINATION, key, "rr", None, _NO_FLAGS, dest))
        elif not dest.settings_equal(current):
            dest_sets.append(Operation(OpKind.EDIT_DESTINATION, key, "rr", None, _NO_FLAGS, dest))


_NO_FLAGS: frozenset[str] = frozenset()


def diff_service(desired: VirtualService | None, actual: VirtualService | None) -> list[Operation]:
    """Operations that turn one actual virtual service into the desired one, ordered."""
    phases: list[list[Operation]] = [[], [], [], []]
    _diff_into(phases, desired, actual)
    return [op for phase in phases for op in phase]


def order(ops: Iterable[Operation]) -> list[Operation]:
    """Sort operations into dependency-safe phases, deterministic within each."""

    def sort_key(op: Operation) -> tuple[int, tuple[str, str, int, int], str, int]:
        dest = op.destination
        return (
            _PHASE[op.kind],
            _service_sort_key(op.service),
            dest.address if dest else "",
            dest.port if dest else -1,
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
    keys: Iterable[ServiceKey]
    if only is None:
        keys = desired.services.keys() | actual.services.keys()
    else:
        keys = set(only)
    phases = new_phases()
    extend_plan(phases, desired, actual, sorted(keys, key=_service_sort_key), exclusions)
    return plan_of(phases)


def extend_plan(phases: Phases, desired: Table, actual: Table, keys: Iterable[ServiceKey],
                exclusions: Exclusions = NO_EXCLUSIONS) -> None:
    """Add the operations for ``keys`` (in key order, after any key already planned)
    to ``phases``: a plan built a slice of keys at a time is the same as one diff."""
    want_get, have_get = desired.services.get, actual.services.get
    for key in keys:
        want = want_get(key)
        have = have_get(key)
        if want is None and have is not None and exclusions.protects(key):
            continue
        if want is not None and want is have:
            continue
        _diff_into(phases, want, have)


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
