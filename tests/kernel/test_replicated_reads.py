"""Reading one namespace's IPVS table while other namespaces hold replicas of it.

Replicate mode programs the same virtual services (same addresses and ports) into
the node's namespace and into every Pod namespace; their real servers differ while
a change is being fanned out. The IPVS service table is one hash shared by every
namespace. A stock kernel's /proc/net/ip_vs prints only the reading namespace's
services, but the walk behind it steps over the others' and counts them, so each
read() of the file restarts at a position that skips some of this namespace's
services. A read must still give exactly this namespace's table, and should take
from the file what it lists instead of dumping every service.
"""

from __future__ import annotations

import os
from typing import Any, Iterator

import pytest

from svcproxy.diff import diff
from svcproxy.ipvs import procfs
from svcproxy.ipvs.netlink import NetlinkBackend, _in_netns, _new_socket, _read_proc_file
from svcproxy.ipvs.nlconst import NLM_F_DUMP
from svcproxy.model import Table

from .backend_contract import TCP, D, make_netns, vs
from .netns import netns_delete

pytestmark = pytest.mark.kernel

NAMESPACES = 6
#: (services, real servers per service): a few services filling a page of the file,
#: and a table of several pages.
SHAPES = [(4, 14), (40, 3)]
_MODE = "/sys/module/ip_vs/parameters/mode"
#: svcproxy's patched module walks only the reading namespace's services.
PATCHED = os.path.exists(_MODE)


def replica(k: int, services: int, dests: int) -> Table:
    """Namespace ``k``'s copy: the same virtual services as every namespace, real
    servers of its own (what a namespace that lags behind, or leads, looks like)."""
    return Table.of(
        vs(TCP, f"10.96.0.{i + 1}", 80, "rr", *(D(f"10.{110 + k}.{i}.{j + 1}", 8080) for j in range(dests)))
        for i in range(services)
    )


@pytest.fixture(scope="module")
def namespaces() -> Iterator[list[str]]:
    if PATCHED and open(_MODE).read().strip() == "2":
        pytest.skip("ip_vs mode=2: Pod namespaces share the node's table")
    names = [make_netns("svcproxy-replica") for _ in range(NAMESPACES)]
    try:
        yield [f"/var/run/netns/{name}" for name in names]
    finally:
        for name in names:
            netns_delete(name)


def program(paths: list[str], services: int, dests: int) -> list[Table]:
    tables = [replica(k, services, dests) for k in range(len(paths))]
    for path, table in zip(paths, tables):
        backend = NetlinkBackend(netns=path, proc=False)
        assert backend.apply(diff(table, backend.read())) == []
    return tables


class CountingSocket:
    """A real netlink socket in a namespace that counts the dump requests sent on it."""

    def __init__(self, path: str) -> None:
        self.sock = _in_netns(path, lambda: _new_socket(8 << 20, 60.0))
        self.dumps = 0

    def send(self, data: bytes, /) -> int:
        if int.from_bytes(data[6:8], "little") & NLM_F_DUMP == NLM_F_DUMP:
            self.dumps += 1
        return self.sock.send(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)


def test_the_file_lists_only_the_namespaces_own_services(namespaces: list[str]) -> None:
    """What the reader relies on: every service the file lists, with its real
    servers, is the reading namespace's own; on a stock kernel it leaves some out."""
    tables = program(namespaces, *SHAPES[1])
    left_out = 0
    for path, table in zip(namespaces, tables):
        listed = procfs.parse(_in_netns(path, _read_proc_file))
        own = {procfs.label(key): set(service.destinations) for key, service in table.services.items()}
        for label, dests in listed.items():
            assert set(dests) == own[label], f"{path}: {' '.join(label)} is not this namespace's"
        left_out += len(own) - len(listed)
    if PATCHED:
        assert left_out == 0
    else:
        assert left_out > 0, "the stock walk left nothing out: this test no longer shows what it is for"


@pytest.mark.parametrize("services,dests", SHAPES)
def test_each_namespace_reads_its_own_table(namespaces: list[str], services: int, dests: int) -> None:
    """Exactly its own table, with real servers from the file where it lists them:
    fewer dumps than services (one GET_SERVICE dump, then one GET_DEST dump per
    service the file left out)."""
    tables = program(namespaces, services, dests)
    for k, (path, table) in enumerate(zip(namespaces, tables)):
        assert NetlinkBackend(netns=path, proc=False).read() == table  # the dumps: the kernel's truth
        sock = CountingSocket(path)
        assert NetlinkBackend(netns=path, opener=lambda: sock, proc=True).read() == table
        assert sock.dumps < 1 + services, f"namespace {k}: every service dumped"


def test_a_sync_of_a_lagging_namespace_sees_what_it_has(namespaces: list[str]) -> None:
    """The node's copy moves on first; the Pod namespace still has the old real
    servers. Its read must show the old ones (so the diff brings it along), never
    the node's (which would make the diff empty and leave it behind for good)."""
    services, dests = SHAPES[0]
    old = program(namespaces, services, dests)
    new = replica(0, services, dests + 1)
    node = NetlinkBackend(netns=namespaces[0])
    assert node.apply(diff(new, node.read())) == []
    for k, path in enumerate(namespaces[1:], 1):
        pod = NetlinkBackend(netns=path)
        ops = diff(new, pod.read())
        assert pod.apply(ops) == []
        assert NetlinkBackend(netns=path, proc=False).read() == new, f"namespace {k} was left behind"
        assert old[k] != new
