"""Graceful termination, as kube-proxy's IPVS mode does it: a plan in, a gentler plan out.

A TCP real server that should go away still carries connections, so instead of
deleting it the plan sets its weight to 0 (no new connections) and deletes it once
its connections are gone or ``timeout`` seconds have passed. UDP and SCTP real
servers, and those of a virtual service deleted as a whole, go at once.

Weight 0 in the kernel for a real server that is no longer wanted *is* the drain
marker, so a restarted agent adopts the drains in progress instead of cutting them.
Drains only complete against a table just read from the kernel: connection counts
in the image kept between full syncs are stale.

Pure: the caller keeps the drain start times and passes the clock's reading in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from svcproxy.model import Destination, OpKind, Operation, Protocol, ServiceKey, Table

#: One draining real server: its virtual service, address and port.
Marker = tuple[ServiceKey, str, int]


@dataclass(frozen=True)
class Drained:
    """The plan to apply and the real servers still draining after it."""

    operations: list[Operation]
    draining: dict[Marker, float]


def drain(ops: Sequence[Operation], actual: Table, draining: Mapping[Marker, float], *,
          now: float, timeout: float, scope: set[ServiceKey] | None, fresh: bool | None = None) -> Drained:
    """Turn deletes of live TCP real servers into weight-0 edits.

    ``actual`` is what the plan was computed against; ``scope`` the virtual services
    looked at (drains elsewhere are kept as they are; None: all). Drains may complete
    only when ``actual`` was just read from the kernel: ``fresh``, which defaults to
    ``scope`` being None (a partial sync compares with the kept image).
    """
    fresh = scope is None if fresh is None else fresh
    deleted_services = {op.service for op in ops if op.kind is OpKind.DELETE_SERVICE}
    out: list[Operation] = []
    still: dict[Marker, float] = {}
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
        started = draining.get(marker, now)
        connections = current.active_conns + current.inactive_conns
        if current.weight == 0 and fresh and (connections == 0 or now - started >= timeout):
            out.append(op)  # drained (or timed out): delete now
            continue
        still[marker] = started
        if current.weight != 0:
            out.append(Operation(OpKind.EDIT_DESTINATION, op.service,
                                 destination=Destination(dest.address, dest.port, 0, current.forward)))
    if scope is not None:
        kept = {m: t for m, t in draining.items() if m[0] not in scope}
        still = {**kept, **still}
    return Drained(out, still)
