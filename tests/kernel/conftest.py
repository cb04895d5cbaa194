"""Fixtures for kernel tests (they run inside the VM of tools/vmtest only).

``lab``: a :class:`tests.kernel.netns.Lab` for one test; every namespace and server
made through it is removed after the test.  A session-wide check deletes any
namespace with the helpers' prefix that is left at the end and reports it as an
error, so a leak cannot go unnoticed.

Every kernel test also fails (an error at its teardown) if the kernel logged a
warning, BUG, oops, call trace or leak report while it ran, its fixtures included
(kmsg.py says what counts). A test that provokes such a line on purpose names it:
``@pytest.mark.kmsg_allow(REGEX, ...)``.

In the VM every test (its fixtures included) has a time budget,
SVCPROXY_TEST_TIMEOUT seconds (default 1500; 0 = none): a test that hangs fails
with TestTimeout instead of eating the whole run's timeout.
"""

from __future__ import annotations

import os
import signal
from types import FrameType
from typing import Iterator

import pytest

from . import kmsg
from .netns import DEFAULT_PREFIX, Lab, netns_delete, netns_list

IN_VM = os.environ.get("SVCPROXY_IN_VM") == "1"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "kmsg_allow(*regex): kernel log lines this test provokes on "
                                       "purpose; the kernel-log check ignores lines matching one")


# First of the function-scoped autouse fixtures, so its teardown runs last and the
# other fixtures' teardown (namespaces deleted, modules unloaded) is inside its window.
@pytest.fixture(autouse=True)
def _kernel_log_clean(request: pytest.FixtureRequest) -> Iterator[None]:
    if not IN_VM:
        yield
        return
    cursor = kmsg.KmsgCursor()
    try:
        yield
        lines = cursor.new_lines()
    finally:
        cursor.close()
    allow = [a for m in request.node.iter_markers("kmsg_allow") for a in m.args]
    failure = kmsg.report(lines, allow)
    if failure:
        pytest.fail(failure, pytrace=False)


class TestTimeout(BaseException):
    """Raised by SIGALRM; a BaseException so `except Exception` retry loops in
    tests cannot swallow it."""

    __test__ = False  # not a test class


@pytest.fixture(autouse=True)
def _test_time_budget(request: pytest.FixtureRequest) -> Iterator[None]:
    budget = int(os.environ.get("SVCPROXY_TEST_TIMEOUT", "1500"))
    if not IN_VM or budget <= 0:
        yield
        return

    def expired(signum: int, frame: FrameType | None) -> None:
        raise TestTimeout(f"{request.node.nodeid} took longer than {budget}s "
                          "(SVCPROXY_TEST_TIMEOUT)")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(budget)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab() as lab:
        yield lab


def _ours() -> set[str]:
    return {n for n in netns_list() if n.startswith(DEFAULT_PREFIX + "-")}


@pytest.fixture(scope="session", autouse=True)
def _no_leaked_netns() -> Iterator[None]:
    if not IN_VM:  # never touch a host's namespaces
        yield
        return
    before = _ours()
    yield
    leaked = sorted(_ours() - before)
    for n in leaked:
        netns_delete(n)
    assert not leaked, f"kernel tests leaked network namespaces: {leaked}"
