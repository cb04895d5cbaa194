"""SIGTERM/SIGINT handling that cannot deadlock, and an agent that stops at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from fakeapi import FakeApiServer
from svcproxy.agent import Agent, AgentConfig
from svcproxy.ipvs.backend import MemoryBackend

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def restore_signals() -> Iterator[None]:
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def test_the_handler_returns_while_the_stop_events_lock_is_held(restore_signals: None) -> None:
    """What a second signal landing inside the first one's Event.set() looks like: the
    event's lock is held. The handler must not wait for it."""
    agent = Agent(AgentConfig(node_name="node-a", health_bind="127.0.0.1:0"), MemoryBackend())
    agent.install_signal_handlers()
    handler = signal.getsignal(signal.SIGTERM)
    assert callable(handler)
    lock = agent.stop._cond  # type: ignore[attr-defined]
    with lock:
        caller = threading.Thread(target=handler, args=(signal.SIGTERM, None), daemon=True)
        caller.start()
        caller.join(2)
        assert not caller.is_alive(), "the signal handler blocked on the stop event's lock"
        handler(signal.SIGINT, None)  # a second one, re-entering
    assert agent.stop.wait(5)


def test_sigterm_ends_the_agent_at_once_even_between_far_apart_syncs(tmp_path: Path) -> None:
    """With --sync-period 600 the loop sleeps until the next full sync (an API server
    with nothing to change; a stand-in ipvsadm lists an empty table);
    SIGTERM, and a burst of SIGTERM and SIGINT, must end it within seconds, every time."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    ipvsadm = tmp_path / "ipvsadm"
    ipvsadm.write_text(f"#!/bin/sh\ncat {ROOT / 'tests/data/ipvsadm/list_empty.txt'}\n")
    ipvsadm.chmod(0o755)
    with FakeApiServer() as fake:
        fake.apply({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a"}})
        kubeconfig = fake.write_kubeconfig(tmp_path / "kubeconfig")
        for burst in (1, 2, 5):
            proc = subprocess.Popen(
                [sys.executable, "-m", "svcproxy", "run", "--kubeconfig", str(kubeconfig), "--node", "node-a",
                 "--dry-run", "--sync-period", "600", "--health-bind", "127.0.0.1:0", "--cni-socket", "",
                 "--node-plumbing", "off", "--pod-netns-mode", "off", "--backend", "ipvsadm",
                 "--ipvsadm", str(ipvsadm)],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
            try:
                assert _wait_for_line(proc, "ready", 30), "the agent never became ready"
                time.sleep(0.5)
                started = time.monotonic()
                for i in range(burst):
                    proc.send_signal(signal.SIGTERM if i % 2 == 0 else signal.SIGINT)
                proc.wait(10)
                assert time.monotonic() - started < 10
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()


def _wait_for_line(proc: subprocess.Popen[Any], word: str, timeout: float) -> bool:
    assert proc.stdout is not None
    found = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if word in line:
                found.set()

    threading.Thread(target=read, daemon=True).start()
    return found.wait(timeout)
