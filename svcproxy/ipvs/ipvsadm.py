"""The ipvsadm backend: read the table with ``ipvsadm -Sn``/``-Ln``, write it with ``-R``.

Why ipvsadm at all: one ``ipvsadm -R`` applies a whole plan in one process, and
its text formats are stable, so this backend is the simple one and the reference
the netlink backend is held to. Parsing is in ``ipvsadm_parse``, rendering in
``ipvsadm_render``; their public names are re-exported here.

What ``ipvsadm -R`` does wrong, and how ``apply`` copes (all observed in the VM,
kernel 6.1.0-56-amd64, ipvsadm 1:1.31-1+b1; see tests/data/ipvsadm/README.md):

* It is not atomic. A line the kernel rejects prints one message on stderr
  ("Service already exists", "No such destination", ...) and the next line runs.
* A line ipvsadm itself rejects (bad scheduler flag, timeout out of range, ...)
  prints one message and ends the whole run with status 2; later lines never run.
  An unknown option after a command is the exception: it prints
  "OPT: unknown option", skips that line and goes on.
* The exit status is that of the last line only.

So a clean run (status 0, empty stderr) means every line was applied. Otherwise the
table is read back and each operation's effect is checked; operations whose effect
is missing are applied again, this time each preceded by a marker line
(``-L --svcproxy-op-N``, which ipvsadm answers with "--svcproxy-op-N: unknown
option" and nothing else), so every stderr line can be tied to exactly one
operation and a run that stops early is resumed after the line that stopped it.
Markers are not used on the first run because they make ``-R`` markedly slower.
"""

from __future__ import annotations

import re
import subprocess
from typing import Callable, Sequence

from svcproxy.ipvs.backend import BackendError
from svcproxy.ipvs.ipvsadm_parse import DEFAULT_PERSISTENCE, DEFAULT_SCHEDULER, ParseError, parse_list, parse_save
from svcproxy.ipvs.ipvsadm_render import render, render_line
from svcproxy.ipvs.timeouts import Timeouts, ipvsadm_args, parse_ipvsadm
from svcproxy.ipvs.rules import MAX_PERSISTENCE, MAX_WEIGHT, NETMASK_PREFIX, OPS_FLAG, PE_PREFIX
from svcproxy.model import DestKey, Destination, OpKind, Operation, OperationResult, ServiceKey, Table

__all__ = [
    "DEFAULT_PERSISTENCE",
    "DEFAULT_SCHEDULER",
    "IpvsadmBackend",
    "MAX_PERSISTENCE",
    "MAX_WEIGHT",
    "NETMASK_PREFIX",
    "OPS_FLAG",
    "PE_PREFIX",
    "ParseError",
    "Runner",
    "parse_list",
    "parse_save",
    "render",
    "render_line",
]

#: How the backend runs commands: ``subprocess.run`` or a test double with its shape.
Runner = Callable[..., "subprocess.CompletedProcess[str]"]

_MARKER_PREFIX = "--svcproxy-op-"
_MARKER_RE = re.compile(r"^--svcproxy-op-(\d+): unknown option$")


# --------------------------------------------------------------------------------------
# checking an operation's effect


class _Effects:
    """Checks operations against a table read back from the kernel."""

    def __init__(self, table: Table) -> None:
        self.table = table
        self._dests: dict[ServiceKey, dict[DestKey, Destination]] = {}

    def dest(self, key: ServiceKey, dkey: DestKey) -> Destination | None:
        dmap = self._dests.get(key)
        if dmap is None:
            vs = self.table.services.get(key)
            dmap = self._dests[key] = vs.destination_map() if vs is not None else {}
        return dmap.get(dkey)

    def in_effect(self, op: Operation) -> bool:
        """Whether the table shows what the operation was meant to do."""
        vs = self.table.services.get(op.service)
        if op.kind is OpKind.DELETE_SERVICE:
            return vs is None
        if op.kind in (OpKind.ADD_SERVICE, OpKind.EDIT_SERVICE):
            return (
                vs is not None
                and vs.scheduler == op.scheduler
                and vs.persistence == op.persistence
                and vs.flags == op.flags
            )
        if op.destination is None:
            return False
        have = self.dest(op.service, op.destination.key)
        if op.kind is OpKind.DELETE_DESTINATION:
            return have is None
        return have is not None and have.settings_equal(op.destination)

    def describe(self, op: Operation) -> str:
        """What the kernel has where the operation pointed, for error messages."""
        vs = self.table.services.get(op.service)
        if vs is None:
            return f"the kernel has no service {op.service}"
        if op.destination is None:
            persistence = "" if vs.persistence is None else f" persistence={vs.persistence}"
            flags = f" flags={','.join(sorted(vs.flags))}" if vs.flags else ""
            return f"the kernel has scheduler={vs.scheduler}{persistence}{flags}"
        have = self.dest(op.service, op.destination.key)
        if have is None:
            return f"the kernel has no real server {op.destination.key}"
        return f"the kernel has weight={have.weight} forward={have.forward.value}"


def _batches(ops: Sequence[Operation]) -> list[list[Operation]]:
    """Split a plan so that, within a batch, no operation can undo what an earlier one
    did. Then the table read after a batch shows each operation's own effect, which is
    what failure attribution relies on. Plans from ``diff()`` are always one batch."""
    batches: list[list[Operation]] = []
    current: list[Operation] = []
    service_ops: set[ServiceKey] = set()
    dest_writes: set[ServiceKey] = set()
    dest_ops: set[tuple[ServiceKey, str, int]] = set()
    for op in ops:
        key = op.service
        if op.kind.is_destination:
            dkey = (key, op.destination.address, op.destination.port) if op.destination else (key, "", -1)
            conflict = dkey in dest_ops
        else:
            conflict = key in service_ops or (
                op.kind in (OpKind.ADD_SERVICE, OpKind.DELETE_SERVICE) and key in dest_writes
            )
        if conflict:
            batches.append(current)
            current, service_ops, dest_writes, dest_ops = [], set(), set(), set()
        current.append(op)
        if op.kind.is_destination:
            dest_ops.add(dkey)
            if op.kind is not OpKind.DELETE_DESTINATION:
                dest_writes.add(key)
        else:
            service_ops.add(key)
    if current:
        batches.append(current)
    return batches


# --------------------------------------------------------------------------------------
# the backend


class IpvsadmBackend:
    """Backend that drives the ``ipvsadm`` binary (optionally inside a network namespace)."""

    def __init__(
        self,
        binary: str = "ipvsadm",
        netns: str | None = None,
        runner: Runner = subprocess.run,
        *,
        timeout: float | None = 600.0,
        counts: bool = False,
    ) -> None:
        self.binary = binary
        #: Default for read(): the agent wants connection counts (graceful termination).
        self.counts = counts
        self.netns = netns
        self.runner = runner
        self.timeout = timeout

    def _argv(self, *args: str) -> list[str]:
        # `ip netns exec` takes only names; nsenter takes any namespace file
        # (/var/run/netns/NAME, /proc/PID/ns/net).
        base = [self.binary, *args]
        return ["nsenter", f"--net={self.netns}", *base] if self.netns else base

    def _run(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        argv = self._argv(*args)
        try:
            proc = self.runner(
                argv, input=stdin, capture_output=True, text=True, check=False, timeout=self.timeout
            )
        except FileNotFoundError as exc:
            raise BackendError(f"cannot run {argv[0]}: not installed ({exc})") from exc
        except PermissionError as exc:
            raise BackendError(f"cannot run {argv[0]}: permission denied ({exc})") from exc
        except subprocess.TimeoutExpired as exc:
            raise BackendError(f"{' '.join(argv[:4])} did not finish in {self.timeout} s") from exc
        except OSError as exc:  # ENOEXEC, EAGAIN, ENOMEM...: a sync that could not run, retried
            raise BackendError(f"cannot run {argv[0]}: {exc.strerror or exc}") from exc
        self._check_environment(argv, proc)
        return proc

    def _check_environment(self, argv: list[str], proc: subprocess.CompletedProcess[str]) -> None:
        """Failures of the environment rather than of an operation: no IPVS in the
        kernel (ipvsadm's "Can't initialize ipvs: ..."), a bad namespace, no root."""
        err = proc.stderr or ""
        if "Can't initialize ipvs" in err:
            raise BackendError(
                f"IPVS is not available ({' '.join(argv)}): {' '.join(err.split())}"
            )
        if self.netns and err.startswith("nsenter:"):
            raise BackendError(f"nsenter --net={self.netns} failed: {err.strip()}")

    def read(self, counts: bool | None = None) -> Table:
        """The kernel's table. With ``counts`` (None: this backend's default), from
        ``-Ln`` (which also carries every setting) so connection counts come from
        the same snapshot; without, from ``-Sn``."""
        if counts is None:
            counts = self.counts
        proc = self._run("-Ln" if counts else "-Sn")
        if proc.returncode != 0:
            raise BackendError(
                f"{' '.join(self._argv('-Ln' if counts else '-Sn'))} failed "
                f"(exit status {proc.returncode}): {proc.stderr.strip()}"
            )
        try:
            return parse_list(proc.stdout) if counts else parse_save(proc.stdout)
        except ParseError as exc:
            raise BackendError(f"cannot parse ipvsadm output: {exc}") from exc

    def read_timeouts(self) -> Timeouts:
        """``ipvsadm -L --timeout``."""
        proc = self._run("-L", "--timeout")
        if proc.returncode != 0:
            raise BackendError(f"ipvsadm -L --timeout failed (exit status {proc.returncode}): {proc.stderr.strip()}")
        try:
            return parse_ipvsadm(proc.stdout)
        except ValueError as exc:
            raise BackendError(str(exc)) from exc

    def set_timeouts(self, timeouts: Timeouts) -> None:
        """``ipvsadm --set TCP TCPFIN UDP`` (zeros leave the kernel's values)."""
        args = ipvsadm_args(timeouts)
        proc = self._run(*args)
        if proc.returncode != 0 or proc.stderr.strip():
            raise BackendError(f"ipvsadm {' '.join(args)} failed (exit status {proc.returncode}): "
                               f"{proc.stderr.strip()}")

    def apply(self, ops: Sequence[Operation]) -> list[OperationResult]:
        """Apply in order; return the operations that did not take effect, each with
        the message ipvsadm printed for it. One bad operation never stops the others."""
        failed: dict[int, OperationResult] = {}
        runnable: list[tuple[Operation, str]] = []
        for op in ops:
            try:
                runnable.append((op, render_line(op)))
            except ValueError as exc:
                failed[id(op)] = OperationResult(op, f"cannot express as an ipvsadm command: {exc}")
        lines = {id(op): line for op, line in runnable}
        for batch in _batches([op for op, _ in runnable]):
            for result in self._apply_batch(batch, lines):
                failed[id(result.operation)] = result
        return [failed[id(op)] for op in ops if id(op) in failed]

    def _apply_batch(self, batch: list[Operation], lines: dict[int, str]) -> list[OperationResult]:
        script = "".join(lines[id(op)] + "\n" for op in batch)
        proc = self._run("-R", stdin=script)
        if proc.returncode == 0 and not proc.stderr.strip():
            return []
        # Not clean: some lines failed, or -R stopped early. Find out which by what
        # the kernel now has, then apply those again one marker-separated line each.
        effects = _Effects(self.read())
        missing = [op for op in batch if not effects.in_effect(op)]
        if not missing:
            return []
        errors = self._apply_marked(missing, lines)
        accepted = [op for op in missing if id(op) not in errors]
        if accepted:
            effects = _Effects(self.read())
            for op in accepted:
                if not effects.in_effect(op):
                    errors[id(op)] = (
                        "ipvsadm accepted it without an error, but it is not in the kernel table"
                        f" afterwards: {effects.describe(op)}"
                    )
        return [OperationResult(op, errors[id(op)]) for op in missing if id(op) in errors]

    def _apply_marked(self, ops: list[Operation], lines: dict[int, str]) -> dict[int, str]:
        """Apply with a marker before each line; return error text by id(op).

        Each marker is a ``-L --svcproxy-op-N`` line: ipvsadm prints
        "--svcproxy-op-N: unknown option" for it and goes on (observed), so stderr
        reads marker, the errors of operation N, marker N+1, ... If ``-R`` stops
        early (a line ipvsadm itself rejects), the rest is applied in another run.
        """
        errors: dict[int, str] = {}
        todo = ops
        while todo:
            script = "".join(f"-L {_MARKER_PREFIX}{i}\n{lines[id(op)]}\n" for i, op in enumerate(todo))
            proc = self._run("-R", stdin=script)
            messages: dict[int, list[str]] = {}
            last = -1
            for raw in proc.stderr.splitlines():
                text = raw.strip()
                if not text:
                    continue
                match = _MARKER_RE.match(text)
                if match and int(match.group(1)) == last + 1:
                    last += 1
                elif last >= 0:
                    messages.setdefault(last, []).append(text)
            if last < 0:
                raise BackendError(
                    "ipvsadm -R did not process the marker lines it is known to accept"
                    f" (exit status {proc.returncode}): {proc.stderr.strip()[:500]!r}"
                )
            for i, lines_for_op in messages.items():
                errors[id(todo[i])] = "; ".join(lines_for_op)
            stopped = last < len(todo) - 1 or proc.returncode not in (0, 255)
            if stopped and last not in messages:
                # ipvsadm ended right after operation `last` started without saying why.
                errors[id(todo[last])] = f"ipvsadm -R stopped on this line (exit status {proc.returncode})"
            elif last == len(todo) - 1 and proc.returncode != 0 and last not in messages:
                errors[id(todo[last])] = f"ipvsadm -R exit status {proc.returncode} on this line"
            todo = todo[last + 1 :]
        return errors

