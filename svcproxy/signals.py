"""SIGTERM and SIGINT to a stop event, without relying on the main thread.

Two ways the obvious handler (``stop.set()`` in a Python signal handler) fails:

- A Python handler runs in the main thread between two bytecodes, which may be in the
  middle of ``Event.set()`` or ``wait()`` on the very event it would set (a second
  SIGTERM during the first one's handling): ``Event.set()`` there waits forever for a
  lock its own thread holds.
- The kernel delivers a process-directed signal to any thread. If it lands on a
  watcher thread, the Python handler only runs once the main thread executes
  bytecode again, and the main thread may be asleep in a long wait.

So the Python handler does nothing, and the interpreter's C-level handler, which runs
in whatever thread got the signal, writes the signal's number to a pipe
(``signal.set_wakeup_fd``); a small thread reads it, logs it and sets the event.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

log = logging.getLogger("svcproxy.agent")


class _Wakeup:
    """The process's one wakeup pipe and its reader: every installed stop event that
    asked for a signal is set when it arrives."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._listeners: list[tuple[threading.Event, frozenset[int]]] = []
        self._pipe: tuple[int, int] | None = None

    def add(self, stop: threading.Event, signums: tuple[signal.Signals, ...]) -> None:
        with self._lock:
            if self._pipe is None:
                self._pipe = self._open()
                threading.Thread(target=self._watch, args=(self._pipe[0],), name="svcproxy-signals",
                                 daemon=True).start()
            for signum in signums:
                signal.signal(signum, _handle)
            self._listeners.append((stop, frozenset(int(s) for s in signums)))

    @staticmethod
    def _open() -> tuple[int, int]:
        read, write = os.pipe()
        os.set_blocking(write, False)
        try:
            previous = signal.set_wakeup_fd(write, warn_on_full_buffer=False)  # ValueError off the main thread
        except ValueError:
            os.close(read)
            os.close(write)
            raise
        if previous != -1:  # an event loop's: replacing it would silently break that loop
            signal.set_wakeup_fd(previous)
            os.close(read)
            os.close(write)
            raise RuntimeError("a signal wakeup fd is already set in this process")
        return read, write

    def _watch(self, read: int) -> None:
        while True:
            data = os.read(read, 64)
            if not data:
                return
            with self._lock:
                listeners = list(self._listeners)
            for signum in data:
                woken = [stop for stop, wanted in listeners if signum in wanted]
                if woken:
                    log.info("received %s, stopping", signal.Signals(signum).name)
                for stop in woken:
                    stop.set()


def _handle(signum: int, _frame: Any) -> None:
    """The Python-level handler: the wakeup pipe already carries the signal."""


_WAKEUP = _Wakeup()


class StopOnSignal:
    """Sets ``stop`` when one of the signals arrives; install in the main thread."""

    def __init__(self, stop: threading.Event) -> None:
        self._stop = stop

    def install(self, signums: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT)) -> None:
        _WAKEUP.add(self._stop, signums)
