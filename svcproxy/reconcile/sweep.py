"""A full sync taken a slice at a time, so that changes never wait for all of it.

A full sync reads a table from the kernel and compares every virtual service with the
desired table: at 10,000 Services a quarter of a second of CPU, seconds of wall time on
a busy node. Done in one go, every change that arrives meanwhile waits for its end, and
those changes make the tail of the network programming latency. So the comparison goes
a slice of virtual services at a time, and between two slices the loop may apply the
changes that arrived (a partial sync) before it goes on.

Where the node's backend reads a consistent snapshot whatever runs beside it (the
in-memory one; not the kernel's dump, see targets.py), the read itself runs in a helper
thread, so partial syncs may run while it does (they only share the interpreter with it).

Why that stays exact. The read sees each virtual service as it was at some moment
between the sweep's start and the read's end. What was compared but not yet applied is
applied before any partial sync runs. A virtual service a partial sync looks at after
the sweep started is *touched*: the sweep leaves it to the partial sync. Touched
after the read and for the first time, it had no write from the loop since the sweep
started, so the read is what the kernel holds for it: the partial sync compares it
with the read, as the one-go full sync would have (else drift on a Service that
changes during every full sync, or an operation failing because the kept image is
wrong, would never be repaired under steady churn). Touched before the read ended
(the read may or may not show the loop's write) or again, it is compared with the
image of the kernel kept by the operations applied since.
Every other virtual service had no write from the loop since the sweep started and the
same desired value, so comparing what was read with the desired table is what a one-go
full sync would have done. With no partial sync in between, one sweep is one plan,
exactly the one-go full sync's.

Pure: the caller reads the kernel, diffs, applies and keeps the image.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from svcproxy.diff import Phases, new_phases, plan_of, service_sort_key
from svcproxy.model import Operation, ServiceKey, Table


@dataclass
class Sweep:
    """One target's full sync in progress."""

    #: The kernel's table as read for this sweep.
    fresh: Table = field(default_factory=Table)
    #: Keys still to compare, in plan order (popped from the end).
    todo: list[ServiceKey] = field(default_factory=list)
    #: Keys compared, and their plan, not applied yet.
    compared: list[ServiceKey] = field(default_factory=list)
    phases: Phases = field(default_factory=new_phases)
    #: Keys a partial sync looked at since the read: left to partial syncs.
    touched: set[ServiceKey] = field(default_factory=set)
    #: Keys read and neither compared nor touched yet: the read is right for them.
    unseen: set[ServiceKey] = field(default_factory=set)

    @staticmethod
    def start(desired: Table, fresh: Table, image: Table) -> "Sweep":
        sweep = Sweep()
        sweep.load(desired, fresh, image)
        return sweep

    def load(self, desired: Table, fresh: Table, image: Table) -> None:
        """The kernel's table is read: everything desired, in it or in the kept image
        is to be compared (a key only in the image leaves it: the kernel no longer has
        it), except what was touched meanwhile."""
        self.fresh = fresh
        keys = desired.services.keys() | fresh.services.keys() | image.services.keys()
        self.todo = sorted(keys, key=service_sort_key, reverse=True)
        self.unseen = keys - self.touched

    @property
    def finished(self) -> bool:
        return not self.todo

    def next_slice(self, size: int) -> list[ServiceKey]:
        """Up to ``size`` keys not touched since the read, in plan order; they count as
        compared from now on."""
        out: list[ServiceKey] = []
        todo, touched = self.todo, self.touched
        while todo and len(out) < size:
            key = todo.pop()
            if key not in touched:
                out.append(key)
        self.compared.extend(out)
        self.unseen.difference_update(out)
        return out

    def take_compared(self) -> tuple[list[ServiceKey], list[Operation]]:
        """The compared keys and their plan, to be applied now (and forgotten here)."""
        keys, ops = self.compared, plan_of(self.phases)
        self.compared, self.phases = [], new_phases()
        return keys, ops

    def touch(self, keys: set[ServiceKey], image: Table) -> Table:
        """A partial sync is about to look at ``keys``: the sweep leaves them alone.
        Compared keys must have been applied first (see the module docstring).
        Returns the image to compare them with: ``image``, with what was read for
        the keys touched for the first time since the read."""
        assert not self.compared, "apply what the sweep compared before a partial sync"
        self.touched |= keys
        first = keys & self.unseen
        if not first:
            return image
        self.unseen -= first
        merged = dict(image.services)
        for key in first:
            vs = self.fresh.services.get(key)
            if vs is None:
                merged.pop(key, None)
            else:
                merged[key] = vs
        return Table(merged)
