"""Root conftest: the ``kernel`` marker and where kernel tests may run.

Kernel tests (marked ``kernel``; everything under tests/kernel/ gets the marker
automatically) need root and a kernel with IPVS.  They run only inside the test VM
started by ``tools/vmtest`` (``make test-kernel``), which sets SVCPROXY_IN_VM=1.

* Outside the VM (``make test-host``) they are collected (so import errors show)
  and skipped.
* Inside the VM nothing is skipped for lack of IPVS: if ip_vs cannot be loaded the
  whole run stops with an error.
"""

from __future__ import annotations

import gc
import os
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

IN_VM = os.environ.get("SVCPROXY_IN_VM") == "1"
KERNEL_DIR = Path(__file__).resolve().parent / "kernel"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "kernel: needs root and a kernel with IPVS; runs only in the VM of tools/vmtest "
        "(make test-kernel). Applied automatically to everything under tests/kernel/.",
    )


def pytest_sessionstart(session: pytest.Session) -> None:
    if not IN_VM:
        return
    if not os.path.exists("/proc/net/ip_vs"):
        subprocess.run(["modprobe", "ip_vs"], check=False)
    if not os.path.exists("/proc/net/ip_vs"):
        pytest.exit("SVCPROXY_IN_VM=1 but IPVS is not available (/proc/net/ip_vs "
                    "missing after modprobe ip_vs): the kernel suite cannot run", 3)
    if os.geteuid() != 0:
        pytest.exit("SVCPROXY_IN_VM=1 but not running as root", 3)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # tryfirst: mark before `-m kernel` deselects, so an unmarked test under
    # tests/kernel/ is still run in the VM instead of silently dropped.
    for item in items:
        if KERNEL_DIR in item.path.resolve().parents:
            item.add_marker(pytest.mark.kernel)
    if IN_VM:
        return
    skip = pytest.mark.skip(reason="kernel test: runs in the VM via tools/vmtest "
                                   "(make test-kernel)")
    for item in items:
        if item.get_closest_marker("kernel"):
            item.add_marker(skip)


@pytest.fixture
def own_netns_as_pod(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let this process's own network namespace stand in for a Pod's: host tests
    attach it (a fake backend does the kernel's part), which the agent refuses for
    the node's namespace. The node's namespace is then one that no path names."""
    from svcproxy.podns import netns

    monkeypatch.setattr(netns, "own_netns", lambda: netns.NetnsId(-1, -1))


@pytest.fixture(autouse=True)
def _heap_unfrozen_after_each_test() -> Iterator[None]:
    """An agent run by a test freezes the collector's heap after its full syncs
    (svcproxy/gcpause.py): the next test starts with nothing frozen."""
    yield
    gc.unfreeze()
