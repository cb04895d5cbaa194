"""When to sync: bounded frequency, periodic full syncs, backoff after failures.

Kept apart from what a sync does so that the timing rules can be read (and tested
with a fake clock) on their own:

- syncs are at least ``min_interval`` apart, so a burst of events coalesces into one;
  the first change after a quiet moment is synced at once (kube-proxy's bounded
  frequency runner does the same). The agent's default, 0.1 s, is a compromise:
  kube-proxy's IPVS mode has no minimum (every change syncs as soon as the previous
  sync ends) and its iptables mode 1 s, which alone puts the p99 of a steady stream
  of changes above 1 s; a sync also has a fixed cost (the gauges walk the desired
  table: milliseconds at 10,000 Services), so at most ten syncs a second bound it
  while a change waits a tenth of a second at most for its turn;
- a *full* sync (a fresh kernel read, which repairs drift) is due every
  ``full_interval()`` (shorter while real servers drain: only a fresh read tells
  when their connections are gone);
- a sync that could not run at all (backend unavailable) is retried after
  ``retry_backoff`` seconds, doubling up to ``max_backoff``: never a hot loop;
- while something waits for a retry (a failed operation, a Pod namespace not yet
  programmed) the loop wakes at least every ``max(min_interval, 1)`` seconds.
"""

from __future__ import annotations

import threading
from typing import Callable

Clock = Callable[[], float]
_NEVER = float("-inf")


class SyncSchedule:
    """The runner's memory of past syncs; every time comes from the injected clock."""

    def __init__(self, *, min_interval: float, full_interval: Callable[[], float],
                 retry_backoff: float, max_backoff: float) -> None:
        self.min_interval = min_interval
        self.full_interval = full_interval
        self.retry_backoff = retry_backoff
        self.max_backoff = max(max_backoff, retry_backoff)
        self.last_sync = _NEVER
        self.last_full = _NEVER
        self.retry_at = _NEVER
        self.failures = 0

    def full_due(self, now: float) -> bool:
        return self.last_full == _NEVER or now - self.last_full >= self.full_interval()

    def next_full(self) -> float:
        return max(self.last_full + self.full_interval(), self.retry_at)

    def earliest_sync(self) -> float:
        return max(self.last_sync + self.min_interval, self.retry_at)

    def succeeded(self, start: float, *, full: bool) -> None:
        # max: a partial sync may have run inside a full sync that started earlier
        self.last_sync = max(self.last_sync, start)
        self.failures = 0
        self.retry_at = _NEVER
        if full:
            self.last_full = start

    def failed(self, now: float) -> float:
        """Record a sync that could not run; returns the delay before the next try."""
        self.failures += 1
        delay: float = min(self.retry_backoff * 2.0 ** (self.failures - 1), self.max_backoff)
        self.retry_at = now + delay
        return delay


class SyncRunner:
    """Runs ``sync`` when requested or due, within the schedule's bounds."""

    def __init__(self, schedule: SyncSchedule, sync: Callable[[], object], *,
                 ready: Callable[[], bool], retrying: Callable[[], bool], monotonic: Clock) -> None:
        self.schedule = schedule
        self._sync = sync
        self._ready = ready
        self._retrying = retrying
        self._monotonic = monotonic
        self._wake = threading.Event()

    def request(self) -> None:
        """Something changed: sync as soon as the schedule allows."""
        self._wake.set()

    def _wake_on(self, stop: threading.Event) -> None:
        stop.wait()
        self._wake.set()

    def _idle_timeout(self) -> float:
        if not self._ready():
            return 1.0
        timeout = max(0.0, self.schedule.next_full() - self._monotonic())
        if self._retrying():
            timeout = min(timeout, max(self.schedule.min_interval, 1.0))
        return timeout

    def run(self, stop: threading.Event) -> None:
        """Until ``stop``: sync when woken, at most every min_interval, fully when due.

        Setting ``stop`` ends the loop at once, not at the next due sync."""
        threading.Thread(target=self._wake_on, args=(stop,), name="svcproxy-stop-watch", daemon=True).start()
        while not stop.is_set():
            self._wake.wait(self._idle_timeout())
            if stop.is_set():
                break
            self._wake.clear()
            if not self._ready():
                continue
            wait = self.schedule.earliest_sync() - self._monotonic()
            if wait > 0 and stop.wait(wait):
                break
            self._sync()
