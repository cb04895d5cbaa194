"""The cyclic garbage collector kept out of the big one-shot computations.

Translation, a kernel read, the diff and rendering a plan build hundreds of thousands
of small objects without cycles (reference counting frees them), yet every few hundred
allocations trigger a collection that walks the whole heap: a large share of a full
sync's CPU time (docs/performance.md). The agent's full syncs and the one-shot
commands pause it; it runs again as soon as the work is done.
"""

from __future__ import annotations

import gc
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
