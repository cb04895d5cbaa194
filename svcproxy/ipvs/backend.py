"""The narrow interface every IPVS backend implements, and an in-memory one.

The reconcile loop and the CLI only ever see ``Backend``: read the table, apply a
plan, get back the operations that failed. The in-memory backend applies plans with
the same rules the kernel enforces and is what fast tests run against; the real
backends are held to the same contract in the VM.
"""

from __future__ import annotations

from typing import Protocol, Sequence

from svcproxy.diff import apply_ops
from svcproxy.ipvs.timeouts import Timeouts
from svcproxy.model import Operation, OperationResult, Table


class BackendError(RuntimeError):
    """The backend could not run at all (no IPVS, no ipvsadm, no permission)."""


class Backend(Protocol):
    def read(self, counts: bool | None = None) -> Table:
        """The whole table as the kernel has it now.

        Whether real servers carry connection counts is the backend's choice, made
        when it is built (graceful termination needs them; a plain diff does not);
        ``counts`` True or False overrides that choice for one read, None keeps it.
        """
        ...

    def apply(self, ops: Sequence[Operation]) -> list[OperationResult]:
        """Apply operations in order; return the ones that failed (empty on success).

        A failed operation must not stop the ones after it.
        """
        ...


class TimeoutControl(Protocol):
    """What a backend offers for the namespace's IPVS timeouts (both real ones do)."""

    def read_timeouts(self) -> Timeouts: ...

    def set_timeouts(self, timeouts: Timeouts) -> None:
        """Set the non-zero values; zeros leave the kernel's."""
        ...


#: A new namespace's timeouts (the kernel's defaults: tcp 900, tcpfin 120, udp 300).
KERNEL_DEFAULT_TIMEOUTS = Timeouts(900, 120, 300)


class MemoryBackend:
    """A map-backed table that rejects what the kernel would reject."""

    #: A read is one consistent snapshot even while an apply runs in another thread
    #: (the reconcile loop then reads beside its writes: reconcile/sweep.py). The
    #: kernel's is not: a dump resumes by position, so a service deleted during it
    #: can make it skip another.
    consistent_read = True

    def __init__(self, table: Table | None = None) -> None:
        self.table = table if table is not None else Table()
        self.applied: list[Operation] = []
        self.timeouts = KERNEL_DEFAULT_TIMEOUTS

    def read_timeouts(self) -> Timeouts:
        return self.timeouts

    def set_timeouts(self, timeouts: Timeouts) -> None:
        self.timeouts = Timeouts(timeouts.tcp or self.timeouts.tcp, timeouts.tcpfin or self.timeouts.tcpfin,
                                 timeouts.udp or self.timeouts.udp)

    def read(self, counts: bool | None = None) -> Table:
        """The table; it carries whatever counts were put in it."""
        return self.table

    def apply(self, ops: Sequence[Operation]) -> list[OperationResult]:
        self.table, failed = apply_ops(self.table, ops)
        rejected = {id(f.operation) for f in failed}
        self.applied.extend(op for op in ops if id(op) not in rejected)
        return failed
