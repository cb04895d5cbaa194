"""SIGTERM/SIGINT handling that cannot deadlock, and an agent that stops at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from fakeapi import FakeApiServer

ROOT = Path(__file__).resolve().parent.parent


SCENARIOS = r"""
import signal, sys, threading, time
sys.path.insert(0, sys.argv[1])
from svcproxy.agent import Agent, AgentConfig
from svcproxy.ipvs.backend import MemoryBackend

def agent():
    a = Agent(AgentConfig(node_name="node-a", health_bind="127.0.0.1:0"), MemoryBackend())
    a.install_signal_handlers()
    return a

# 1. SIGTERM delivered to another thread while the main thread sleeps in a long wait.
a = agent()
other = threading.Thread(target=time.sleep, args=(30,), daemon=True)
other.start()
threading.Timer(0.3, lambda: signal.pthread_kill(other.ident, signal.SIGTERM)).start()
start = time.monotonic()
a.stop.wait(20)
print("other-thread", a.stop.is_set(), round(time.monotonic() - start, 1), flush=True)

# 2. Two signals while the main thread holds the stop event's own lock, as it does
#    inside Event.set()/wait(): the handler must not wait for that lock.
a = agent()
with a.stop._cond:
    signal.raise_signal(signal.SIGTERM)
    signal.raise_signal(signal.SIGINT)
    time.sleep(0.3)
print("reentrant", a.stop.wait(5), flush=True)
"""


def test_signals_stop_the_agent_whichever_thread_gets_them_and_never_deadlock() -> None:
    """Run in a child: a handler that deadlocks would hang the test process itself."""
    proc = subprocess.run([sys.executable, "-c", SCENARIOS, str(ROOT)], capture_output=True, text=True, timeout=60)
    lines = proc.stdout.split("\n")
    assert proc.returncode == 0, proc.stderr[-2000:]
    other = next(line for line in lines if line.startswith("other-thread"))
    assert other.split()[1] == "True" and float(other.split()[2]) < 5, other
    assert "reentrant True" in lines


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
