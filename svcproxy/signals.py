"""SIGTERM and SIGINT to a stop event, with no lock taken inside the signal handler.

A Python signal handler runs in the main thread between two bytecodes, which may be in
the middle of ``Event.set()`` or ``Event.wait()`` on the very event it would set (a
second SIGTERM during the first one's handling, or a signal landing while the loop
waits): ``Event.set()`` there waits forever for a lock its own thread holds. So the
handler only writes the signal's number to a pipe (async-signal-safe, never blocks),
and a small thread reads it, logs it and sets the event.
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

    def install(self, signums: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT)) -> None:
        self._thread.start()
        for signum in signums:
            signal.signal(signum, self.handle)

    def handle(self, signum: int, _frame: Any) -> None:
        try:
            os.write(self._write, bytes([signum & 0xFF]))
        except OSError:  # the pipe is full: a stop is already on its way
            pass

    def _watch(self) -> None:
        while True:
            data = os.read(self._read, 64)
            if not data:
                return
            for signum in data:
                try:
                    name = signal.Signals(signum).name
                except ValueError:
                    name = f"signal {signum}"
                log.info("received %s, stopping", name)
            self._stop.set()
