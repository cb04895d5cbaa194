"""The sync runner's timing rules with a fake clock, and its loop with real threads."""

from __future__ import annotations

import threading
import time

from svcproxy.reconcile.runner import SyncRunner, SyncSchedule


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def schedule(full: float = 30.0, min_interval: float = 1.0) -> SyncSchedule:
    return SyncSchedule(min_interval=min_interval, full_interval=lambda: full, retry_backoff=1.0, max_backoff=full)


def test_first_sync_is_full_then_full_again_after_the_interval() -> None:
    s = schedule()
    assert s.full_due(100.0)
    s.succeeded(100.0, full=True)
    assert not s.full_due(129.9) and s.full_due(130.0)
    s.succeeded(110.0, full=False)  # a partial sync does not move the next full one
    assert s.next_full() == 130.0 and s.earliest_sync() == 111.0


def test_failures_back_off_doubling_up_to_the_cap_and_reset_on_success() -> None:
    s = schedule(full=5.0)
    delays = [s.failed(0.0) for _ in range(5)]
    assert delays == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert s.retry_at == 5.0 and s.earliest_sync() == 5.0 and s.next_full() == 5.0
    s.succeeded(6.0, full=True)
    assert s.failures == 0 and s.failed(6.0) == 1.0


def test_full_interval_is_read_at_each_decision() -> None:
    interval = [30.0]
    s = SyncSchedule(min_interval=1.0, full_interval=lambda: interval[0], retry_backoff=1.0, max_backoff=30.0)
    s.succeeded(0.0, full=True)
    assert not s.full_due(10.0)
    interval[0] = 10.0  # real servers started draining
    assert s.full_due(10.0)


def run_in_thread(runner: SyncRunner, stop: threading.Event) -> threading.Thread:
    thread = threading.Thread(target=runner.run, args=(stop,), daemon=True)
    thread.start()
    return thread


def test_requests_coalesce_into_one_sync_per_min_interval() -> None:
    syncs: list[float] = []
    s = SyncSchedule(min_interval=0.3, full_interval=lambda: 3600.0, retry_backoff=1.0, max_backoff=3600.0)

    def sync() -> None:
        now = time.monotonic()
        s.succeeded(now, full=not syncs)
        syncs.append(now)

    runner = SyncRunner(s, sync, ready=lambda: True, retrying=lambda: False, monotonic=time.monotonic)
    stop = threading.Event()
    thread = run_in_thread(runner, stop)
    deadline = time.monotonic() + 5
    while not syncs and time.monotonic() < deadline:
        time.sleep(0.01)
    burst_start = time.monotonic()
    for _ in range(50):
        runner.request()
        time.sleep(0.01)
    burst = time.monotonic() - burst_start
    time.sleep(0.5)
    stop.set()
    thread.join(5)
    assert not thread.is_alive()
    # The first sync, then the burst coalesced to one sync per 0.3 s. The bound follows the
    # burst's real length, which a loaded machine stretches well past its 0.5 s.
    assert 2 <= len(syncs) <= 3 + int(burst / 0.3), (burst, syncs)
    assert all(b - a >= 0.29 for a, b in zip(syncs, syncs[1:]))


def test_stop_ends_the_loop_at_once_even_with_the_next_sync_far_away() -> None:
    s = schedule(full=3600.0)
    s.succeeded(time.monotonic(), full=True)
    runner = SyncRunner(s, lambda: None, ready=lambda: True, retrying=lambda: False, monotonic=time.monotonic)
    stop = threading.Event()
    thread = run_in_thread(runner, stop)
    time.sleep(0.2)
    started = time.monotonic()
    stop.set()
    thread.join(5)
    assert not thread.is_alive() and time.monotonic() - started < 1.0


def test_nothing_syncs_before_the_gate_opens() -> None:
    calls: list[int] = []
    ready = threading.Event()
    runner = SyncRunner(schedule(), lambda: calls.append(1), ready=ready.is_set, retrying=lambda: False,
                        monotonic=time.monotonic)
    stop = threading.Event()
    thread = run_in_thread(runner, stop)
    runner.request()
    time.sleep(0.3)
    assert calls == []
    ready.set()
    runner.request()
    deadline = time.monotonic() + 5
    while not calls and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.set()
    thread.join(5)
    assert calls
