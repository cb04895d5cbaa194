"""IPVS timeouts (--ipvs-tcp-timeout, --ipvs-tcpfin-timeout, --ipvs-udp-timeout):
the flag values, the netlink and ipvsadm encodings, and the loop setting them at full
syncs (dry run: changes nothing; a failure: logged, counted, the sync goes on)."""

from __future__ import annotations

import argparse
import logging
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest

from svcproxy import flags
from svcproxy.cli import main
from svcproxy.ipvs.backend import KERNEL_DEFAULT_TIMEOUTS, BackendError, MemoryBackend
from svcproxy.ipvs.ipvsadm import IpvsadmBackend
from svcproxy.ipvs.timeouts import (GET_CONFIG_BODY, IPVS_CMD_GET_CONFIG, IPVS_CMD_SET_CONFIG, MAX_SECONDS,
                                    Timeouts, changes, decode_config, ipvsadm_args, parse_ipvsadm,
                                    set_config_body)
from test_cli import run
from test_reconcile import load, make


@pytest.mark.parametrize("text, seconds", [
    ("900s", 900), ("15m", 900), ("1h30m", 5400), ("0", 0), ("0s", 0), ("30", 30), ("1.5s", 1),
    ("2m0.5s", 120), ("1500ms", 1),
])
def test_timeout_flags_take_kube_proxy_durations(text: str, seconds: int) -> None:
    assert flags.ipvs_timeout(text) == seconds


@pytest.mark.parametrize("text", ["-1s", "abc", "0.5s", "", "1d", f"{MAX_SECONDS + 1}s", "15 m"])
def test_bad_timeouts_are_refused_with_a_reason(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        flags.ipvs_timeout(text)


def test_changes_sends_only_what_differs_and_zero_keeps_the_kernels_value() -> None:
    kernel = Timeouts(900, 120, 300)
    assert changes(kernel, Timeouts(0, 0, 0)) is None
    assert changes(kernel, Timeouts(900, 0, 300)) is None
    assert changes(kernel, Timeouts(3600, 0, 300)) == Timeouts(3600, 0, 0)
    assert changes(kernel, Timeouts(0, 30, 60)) == Timeouts(0, 30, 60)
    with pytest.raises(ValueError):
        Timeouts(-1, 0, 0)


def test_netlink_encoding_sends_only_nonzero_attributes_and_decodes_a_reply() -> None:
    body = set_config_body(Timeouts(3600, 0, 60))
    assert body[:4] == struct.pack("=BBH", IPVS_CMD_SET_CONFIG, 1, 0)
    assert body[4:] == struct.pack("=HHI", 8, 4, 3600) + struct.pack("=HHI", 8, 6, 60)
    assert GET_CONFIG_BODY[0] == IPVS_CMD_GET_CONFIG
    reply = struct.pack("=BBH", IPVS_CMD_SET_CONFIG, 1, 0) + b"".join(
        struct.pack("=HHI", 8, a, v) for a, v in ((4, 900), (5, 120), (6, 300)))
    assert decode_config(reply) == Timeouts(900, 120, 300)
    with pytest.raises(ValueError):
        decode_config(reply[:4] + struct.pack("=HH", 40, 4))


def test_ipvsadm_encoding_and_readback() -> None:
    assert ipvsadm_args(Timeouts(3600, 0, 60)) == ["--set", "3600", "0", "60"]
    assert parse_ipvsadm("Timeout (tcp tcpfin udp): 900 120 300\n") == Timeouts(900, 120, 300)
    with pytest.raises(ValueError):
        parse_ipvsadm("IP Virtual Server version 1.2.1\n")


def test_ipvsadm_backend_runs_set_and_reports_its_error() -> None:
    calls: list[list[str]] = []

    def runner(argv: list[str], **_: Any) -> subprocess.CompletedProcess[str]:
        calls.append(argv)
        if "--set" in argv:
            return subprocess.CompletedProcess(argv, 2, "", "Invalid argument\n")
        return subprocess.CompletedProcess(argv, 0, "Timeout (tcp tcpfin udp): 900 120 300\n", "")

    backend = IpvsadmBackend(runner=runner)
    assert backend.read_timeouts() == Timeouts(900, 120, 300)
    with pytest.raises(BackendError, match="--set 10 0 0"):
        backend.set_timeouts(Timeouts(10, 0, 0))
    assert calls == [["ipvsadm", "-L", "--timeout"], ["ipvsadm", "--set", "10", "0", "0"]]


def test_the_loop_sets_timeouts_at_a_full_sync_and_repairs_drift() -> None:
    backend = MemoryBackend()
    p, clock = make(backend, ipvs_timeouts=Timeouts(3600, 0, 60))
    load(p)
    p.sync()
    assert backend.timeouts == Timeouts(3600, 120, 60)
    backend.timeouts = KERNEL_DEFAULT_TIMEOUTS  # someone ran ipvsadm --set
    p.sync(force_full=True)
    assert backend.timeouts == Timeouts(3600, 120, 60)


def test_dry_run_reads_but_never_sets_timeouts(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    backend = MemoryBackend()
    p, _ = make(backend, ipvs_timeouts=Timeouts(3600, 0, 0), dry_run=True)
    load(p)
    p.sync()
    assert backend.timeouts == KERNEL_DEFAULT_TIMEOUTS
    assert "dry run: would set IPVS timeouts: tcp=3600" in caplog.text


class NoTimeouts(MemoryBackend):
    def set_timeouts(self, timeouts: Timeouts) -> None:
        raise BackendError("Operation not permitted")


def test_a_failure_to_set_timeouts_is_counted_and_the_table_still_synced(caplog: pytest.LogCaptureFixture) -> None:
    backend = NoTimeouts()
    p, _ = make(backend, ipvs_timeouts=Timeouts(3600, 0, 0))
    load(p)
    result = p.sync()
    assert result.failed == 0 and len(backend.table.services) == 2
    assert p.metrics.ipvs_timeout_errors._value.get() == 1
    assert "cannot set IPVS timeouts (will retry at the next full sync): Operation not permitted" in caplog.text


@pytest.mark.parametrize("flag", ["--ipvs-tcp-timeout", "--ipvs-tcpfin-timeout", "--ipvs-udp-timeout"])
@pytest.mark.parametrize("command", ["sync", "run"])
def test_a_bad_timeout_flag_is_one_line_naming_it_and_exit_1(flag: str, command: str, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("kind: List\nitems: []\n")
    with pytest.raises(SystemExit) as exited:
        main([command, "-f", str(f), f"{flag}=-5s"], backend=MemoryBackend())
    assert exited.value.code == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"svcproxy {command}: error: argument {flag}") and "-5s" in last


def test_sync_sets_the_timeouts_once(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("kind: List\nitems: []\n")
    backend = MemoryBackend()
    code, out, _ = run(["sync", "-f", str(f), "--ipvs-udp-timeout", "1m"], backend)
    assert code == 0 and backend.timeouts == Timeouts(900, 120, 60)
    assert "IPVS timeouts set: tcp=unchanged tcpfin=unchanged udp=60" in out
    code, out, _ = run(["sync", "-f", str(f), "--ipvs-udp-timeout", "1m"], NoTimeouts())
    assert code == 1 and "FAILED  IPVS timeouts" in out
