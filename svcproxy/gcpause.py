"""The cyclic garbage collector kept out of the big one-shot computations.

Translation, a kernel read, the diff and rendering a plan build hundreds of thousands
of small objects without cycles (reference counting frees them), yet every few hundred
allocations trigger a collection that walks the whole heap: a large share of a full
sync's CPU time (docs/performance.md). The agent's full syncs and the one-shot
commands pause it; it runs again as soon as the work is done.
"""

from __future__ import annotations

import gc
import sys
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def paused_gc() -> Iterator[None]:
    """Disable the cyclic collector for the block (restored as it was after it)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


class LongLivedHeap:
    """Keeps the cyclic collector's full collections off the model of the cluster.

    Why: at 10,000 Services the agent holds some 600,000 container objects that live
    for minutes (the watched objects, the desired table, the images of the kernel
    tables). Under churn every partial sync leaves a few new long-lived objects behind,
    and every so many of them Python runs a full collection that walks the whole heap:
    tenths of a second of CPU during which every change waits, the tail of the
    programming latency (docs/performance.md). ``gc.freeze()`` moves every object alive
    into a permanent generation that collections skip, so they only walk what was
    allocated since.

    Called after each full sync (the agent wires it to the loop), when that graph is
    complete: it first collects what is not frozen (cheap: only what was allocated
    since the last freeze, so garbage cycles of that time are not frozen), then
    freezes again, so that what churn built since the last freeze is exempt too.

    Memory: a frozen object that dies is still freed by reference counting, as almost
    all of this graph is (frozen dataclasses, tuples, dicts without cycles). Only a
    cycle frozen while alive and dead later escapes the collector; those are bounded:
    when the memory blocks Python holds (``sys.getallocatedblocks()``, every object
    alive, frozen or not, a few milliseconds to count where counting the frozen
    objects walks them all) have grown by more than ``growth`` since the last full
    collection, the heap is unfrozen and collected in full once, then frozen again (a
    full collection's cost, as rare as that growth).
    """

    def __init__(self, growth: float = 0.25) -> None:
        self.growth = growth
        #: The allocated blocks right after the last full collection (None: none yet).
        self.baseline: int | None = None
        self.full_collections = 0

    def after_full_sync(self) -> None:
        gc.collect()
        gc.freeze()
        blocks = sys.getallocatedblocks()
        if self.baseline is not None:
            if blocks <= self.baseline * (1 + self.growth):
                return
            gc.unfreeze()
            gc.collect()
            gc.freeze()
            blocks = sys.getallocatedblocks()
        self.full_collections += 1  # the first call's collection walked everything too
        self.baseline = blocks
