"""The kernel log as a test oracle: what a test added to it, and whether that is a problem.

A kernel that warns, oopses or leaks while a test runs has failed that test even when
every packet arrived, so the suite reads the log around each test (conftest.py).
``/dev/kmsg`` gives each open file its own cursor: seek to the end before the test,
read what follows after it. That costs two system calls per test, where running
``dmesg`` twice would cost two emulated process starts.

``problems()`` is pure (text in, lines out) so the host suite tests it on captured
kernel output; the VM suite proves the cursor end to end.
"""

from __future__ import annotations

import errno
import os
import re
from typing import Iterable

KMSG = "/dev/kmsg"

#: What makes a kernel log line a failure: the kernel's own wording for warnings, bugs,
#: oopses and leak reports (case matters: "BUG:" is a report, "bug" in prose is not).
#: "leak" is matched as a word on purpose: the kernel uses it only to report one.
PROBLEM_PATTERNS = (
    r"\bWARNING:",                       # WARN_ON(), including refcount_t and list debugging
    r"\bBUG:",                           # BUG: unable to handle page fault, scheduling while atomic, ...
    r"\bkernel BUG at\b",                # BUG_ON()
    r"^BUG [\w.:-]+ \(",                 # SLUB: "BUG ip_vs_conn (Tainted: ...): Objects remaining ..."
    r"\bOops\b",
    r"\bCall Trace:",
    r"\bgeneral protection fault\b",
    r"\bKernel panic\b",
    r"\bkmemleak\b",                     # "kmemleak: N new suspected memory leaks"
    r"\bObjects remaining in\b",         # a module's slab cache destroyed with objects in it
    r"\bunregister_netdevice: waiting for\b",  # a leaked device reference (netns teardown)
    r"\b(UBSAN|KASAN|KFENCE):",
    r"\b[Ll]eak(s|ed)?\b",              # ref_tracker "leaked N references", "memory leak", ...
)
_PROBLEM = re.compile("|".join(f"(?:{p})" for p in PROBLEM_PATTERNS))


def problems(lines: Iterable[str], allow: Iterable[str] = ()) -> list[str]:
    """The lines that show a kernel problem, minus those matching an ``allow`` regex."""
    allowed = [re.compile(a) for a in allow]
    return [line for line in lines
            if _PROBLEM.search(line) and not any(a.search(line) for a in allowed)]


def report(lines: list[str], allow: Iterable[str] = ()) -> str | None:
    """Why a test fails because of what the kernel logged during it (None: it does not)."""
    bad = problems(lines, allow)
    if not bad:
        return None
    first = lines.index(bad[0])
    context = "\n".join(lines[max(0, first - 5):first + 40])
    return (f"the kernel logged {len(bad)} problem line(s) during this test, first: {bad[0]!r}\n"
            f"--- kernel log from there ---\n{context}")


def record_text(record: bytes) -> list[str]:
    """One ``/dev/kmsg`` record (``prio,seq,ts,flags;message`` then `` KEY=value`` lines)
    as its message line(s); the kernel escapes newlines inside a message as ``\\x0a``."""
    text = record.decode("utf-8", "replace").rstrip("\n")
    head, _, rest = text.partition("\n")
    message = head.split(";", 1)[1] if ";" in head else head
    del rest  # the dictionary lines (SUBSYSTEM=, DEVICE=) carry nothing to judge
    return message.replace("\\x0a", "\n").splitlines() or [""]


class KmsgCursor:
    """Everything the kernel logs from construction on, read with ``new_lines()``."""

    def __init__(self, path: str = KMSG) -> None:
        self.fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        os.lseek(self.fd, 0, os.SEEK_END)
        self.lost = 0  # times the ring buffer overwrote records before they were read

    def new_lines(self) -> list[str]:
        """Every line logged since the last call (or construction)."""
        lines: list[str] = []
        while True:
            try:
                record = os.read(self.fd, 8192)
            except BlockingIOError:
                return lines
            except OSError as exc:
                if exc.errno != errno.EPIPE:  # EPIPE: overwritten records; the next read goes on
                    raise
                self.lost += 1
                continue
            if not record:
                return lines
            lines += record_text(record)

    def close(self) -> None:
        os.close(self.fd)
