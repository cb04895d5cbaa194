"""The gauges about the desired table, kept up to date by what each sync changed.

Counting real servers, and the Services with a Local policy and no local endpoint,
by walking the whole desired table after every sync made that fixed part of a small
partial sync grow with the cluster. Here each count is kept as a running total, and
a sync only takes out what the keys and Services it touched counted before and adds
what they count now (``DesiredState`` records what it touched). After a whole
translation, and at every full sync, everything is counted afresh, so a count that
went wrong could not stay wrong past the next full sync.

Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable

from svcproxy.kube.objects import NamespacedName
from svcproxy.kube.translate import ServiceInfo
from svcproxy.model import Family, ServiceKey, VirtualService
from svcproxy.reconcile.desired import DesiredState

#: A ``sync_proxy_rules_no_local_endpoints_total`` series: ("internal" or "external", family).
NoLocal = tuple[str, Family]


def no_local_of(info: ServiceInfo) -> Iterable[NoLocal]:
    """The series one Service counts in (once in each)."""
    for family in info.no_local_internal:
        yield "internal", family
    for family in info.no_local_external:
        yield "external", family


def serves_health_check(info: ServiceInfo) -> bool:
    """A Service this node answers a healthCheckNodePort for."""
    return info.external_policy_local and bool(info.health_check_node_port)


class Tallies:
    """Running totals over the desired table, with what each key and Service added."""

    def __init__(self) -> None:
        self.real_servers = 0
        self.no_local: dict[NoLocal, int] = {(p, f): 0 for p in ("internal", "external") for f in Family}
        #: The Services this node answers a healthCheckNodePort for.
        self.health: dict[NamespacedName, ServiceInfo] = {}
        self._real: dict[ServiceKey, int] = {}
        self._info: dict[NamespacedName, ServiceInfo] = {}

    def recount(self, desired: DesiredState) -> None:
        """Count everything afresh (and forget what was touched: it is counted)."""
        desired.take_touched()
        table = desired.table
        self._real = {key: len(vs.destinations) for key, vs in table.items()}
        self.real_servers = sum(self._real.values())
        self._info = dict(desired.info)
        self.no_local = {series: 0 for series in self.no_local}
        for info in self._info.values():
            for series in no_local_of(info):
                self.no_local[series] += 1
        self.health = {nn: i for nn, i in self._info.items() if serves_health_check(i)}

    def follow(self, desired: DesiredState) -> None:
        """Count what changed since the last call (everything after a rebuild)."""
        rebuilt, keys, services = desired.take_touched()
        if rebuilt:
            self.recount(desired)
            return
        table = desired.table
        for key in keys:
            self._key(key, table.get(key))
        for nn in services:
            self._service(nn, desired.info.get(nn))

    def _key(self, key: ServiceKey, vs: VirtualService | None) -> None:
        self.real_servers -= self._real.pop(key, 0)
        if vs is not None:
            self._real[key] = len(vs.destinations)
            self.real_servers += self._real[key]

    def _service(self, nn: NamespacedName, info: ServiceInfo | None) -> None:
        old = self._info.pop(nn, None)
        if old is not None:
            for series in no_local_of(old):
                self.no_local[series] -= 1
        self.health.pop(nn, None)
        if info is None:
            return
        self._info[nn] = info
        for series in no_local_of(info):
            self.no_local[series] += 1
        if serves_health_check(info):
            self.health[nn] = info
