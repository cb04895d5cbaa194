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


class StopOnSignal:
    """Sets ``stop`` when one of the signals arrives; install once, in the main thread."""

    def __init__(self, stop: threading.Event) -> None:
        self._stop = stop
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)
        self._thread = threading.Thread(target=self._watch, name="svcproxy-signals", daemon=True)
        self._signums: frozenset[int] = frozenset()

    def install(self, signums: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT)) -> None:
        """From the main thread (the only one that may install handlers)."""
        self._signums = frozenset(int(s) for s in signums)
        self._thread.start()
        signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        for signum in signums:
            signal.signal(signum, self.handle)

    def handle(self, signum: int, _frame: Any) -> None:
        """The Python-level handler: the wakeup pipe already carries the signal."""

    def _watch(self) -> None:
        while True:
            data = os.read(self._read, 64)
            if not data:
                return
            wanted = [n for n in data if n in self._signums]
            for signum in wanted:
                log.info("received %s, stopping", signal.Signals(signum).name)
            if wanted:
                self._stop.set()
