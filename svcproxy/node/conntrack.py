"""The kernel's conntrack table over ctnetlink: UDP flows read and deleted.

Used for the UDP cleanup (svcproxy.node.stale_flows says which flows are stale)
in the node's namespace and in each replicated Pod namespace: every network
namespace has a conntrack table of its own. Reads are filtered in the kernel
(by protocol, and by destination address and port when only a few virtual services
changed: kernels 5.8 and later; older ones send everything and the filter runs
here). Deletes name each entry by its original tuple, as ``conntrack -D`` does.

``run`` decides the namespace: it calls the function it is given, in the node's own
namespace by default, or in a thread that joined a Pod's namespace.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Iterable, Sequence
from typing import Any, Callable, Protocol, TypeVar

from svcproxy.node.ctnetlink import Ctnetlink, Tuple
from svcproxy.node.stale_flows import Backends, Flow, stale, udp_backends
from svcproxy.model import ServiceKey, Table

log = logging.getLogger("svcproxy.conntrack")

T = TypeVar("T")
Runner = Callable[[Callable[[], T]], T]

#: Above this many virtual services a read is one dump of every UDP entry instead
#: of one filtered dump per virtual service.
_PER_KEY_DUMPS = 8


class ConntrackError(OSError):
    """The conntrack table could not be read or changed."""


class ConntrackTable(Protocol):
    def flows(self, keys: Sequence[tuple[str, int]] | None) -> list[Flow]:
        """UDP flows (both families); ``keys``: only those to these (address, port)."""
        ...

    def delete(self, flows: Sequence[Flow]) -> int:
        """Delete the flows' entries; how many were deleted (gone already: not counted)."""
        ...


def _here(fn: Callable[[], T]) -> T:
    return fn()


def _canonical(text: str) -> str:
    return str(ipaddress.ip_address(text))


class KernelConntrack:
    """ConntrackTable over a ctnetlink socket, in the namespace ``run`` picks."""

    def __init__(self, run: Callable[[Callable[[], Any]], Any] = _here) -> None:
        self._run = run

    def flows(self, keys: Sequence[tuple[str, int]] | None) -> list[Flow]:
        found: list[Flow] = self._call(lambda: self._flows_here(keys))
        return found

    def delete(self, flows: Sequence[Flow]) -> int:
        deleted: int = self._call(lambda: self._delete_here(flows))
        return deleted

    def _call(self, fn: Callable[[], T]) -> T:
        try:
            result: T = self._run(fn)
            return result
        except ConntrackError:
            raise
        except (OSError, ValueError) as exc:
            raise ConntrackError(f"conntrack: {exc}") from exc

    @staticmethod
    def _flows_here(keys: Sequence[tuple[str, int]] | None) -> list[Flow]:
        out: list[Flow] = []
        with Ctnetlink() as ct:
            if keys is not None and len(keys) <= _PER_KEY_DUMPS:
                found = [e for addr, port in keys for e in ct.entries(_family(addr), socket.IPPROTO_UDP, (addr, port))]
            else:
                found = [e for fam in (socket.AF_INET, socket.AF_INET6) for e in ct.entries(fam, socket.IPPROTO_UDP)]
        for o, r in found:
            out.append(Flow(_canonical(o.src), _canonical(o.dst), o.sport, o.dport, _canonical(r.src)))
        return out

    @staticmethod
    def _delete_here(flows: Sequence[Flow]) -> int:
        deleted = 0
        with Ctnetlink() as ct:
            for f in flows:
                deleted += ct.delete(_family(f.orig_dst), Tuple(f.orig_src, f.orig_dst, socket.IPPROTO_UDP,
                                                                  f.sport, f.dport))
        return deleted


def _family(address: str) -> int:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def clean_stale_flows(table: ConntrackTable, desired: Table, scope: Iterable[ServiceKey] | None, *,
                      dry_run: bool) -> tuple[list[Flow], int]:
    """Find the stale UDP flows for ``desired``'s virtual services (those in ``scope``,
    None: all) and delete them (a dry run only finds them). Returns the stale flows
    and how many were deleted. Raises ConntrackError."""
    backends: Backends = udp_backends(desired, scope)
    if not backends:
        return [], 0
    keys = None if scope is None else sorted(backends)
    found = stale(table.flows(keys), backends)
    if not found or dry_run:
        return found, 0
    return found, table.delete(found)
