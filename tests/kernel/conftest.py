"""Fixtures for kernel tests (they run inside the VM of tools/vmtest only).

``lab``: a :class:`tests.kernel.netns.Lab` for one test; every namespace and server
made through it is removed after the test.  A session-wide check deletes any
namespace with the helpers' prefix that is left at the end and reports it as an
error, so a leak cannot go unnoticed.
"""

from __future__ import annotations

import os
from typing import Iterator

import pytest

from .netns import DEFAULT_PREFIX, Lab, netns_delete, netns_list


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab() as lab:
        yield lab


def _ours() -> set[str]:
    return {n for n in netns_list() if n.startswith(DEFAULT_PREFIX + "-")}


@pytest.fixture(scope="session", autouse=True)
def _no_leaked_netns() -> Iterator[None]:
    if os.environ.get("SVCPROXY_IN_VM") != "1":  # never touch a host's namespaces
        yield
        return
    before = _ours()
    yield
    leaked = sorted(_ours() - before)
    for n in leaked:
        netns_delete(n)
    assert not leaked, f"kernel tests leaked network namespaces: {leaked}"
