"""What the loop wants the kernel to hold, kept Service by Service between syncs.

A changed Service is released (its virtual services leave the table) and translated
again; nothing else is touched, so a sync costs what changed, not the cluster. A
whole translation is the same steps for every Service, in sorted namespace/name
order, on an emptied table: claims that collide are then decided exactly as a
one-shot translation decides them.
"""

from __future__ import annotations

from collections.abc import Iterable

from svcproxy.kube.objects import NamespacedName
from svcproxy.kube.owners import Owners
from svcproxy.kube.problems import Problem
from svcproxy.kube.translate import ServiceInfo, with_keys
from svcproxy.model import ServiceKey, VirtualService
from svcproxy.node.nat import ServiceNat


def nat_view(info: ServiceInfo, keys: tuple[ServiceKey, ...]) -> ServiceNat:
    """Node plumbing's view of one Service; ``keys``: those that made it into the table."""
    return ServiceNat(keys, info.cluster_ips, info.external_policy_local, info.local_endpoint_ips,
                      info.source_ranges, info.load_balancer_ips)


class DesiredState:
    """The desired table, who owns each of its keys, and each Service's side data."""

    def __init__(self) -> None:
        self.owners = Owners()
        self.info: dict[NamespacedName, ServiceInfo] = {}
        #: Node plumbing's view of each Service. An unchanged Service keeps the same
        #: object across syncs, so plumbing only revisits the ones that changed.
        self.nat: dict[NamespacedName, ServiceNat] = {}
        #: What changed since ``take_touched`` (the gauges follow it, tallies.py):
        #: keys released or claimed, Services released or claimed, and whether the
        #: whole state was rebuilt (then the sets are not kept: everything changed).
        self.touched_keys: set[ServiceKey] = set()
        self.touched_services: set[NamespacedName] = set()
        self.cleared = False

    @property
    def table(self) -> dict[ServiceKey, VirtualService]:
        return self.owners.table

    def clear(self) -> None:
        """Start a whole translation (``nat`` objects stay, to be reused if equal)."""
        self.owners = Owners()
        self.info = {}
        self.cleared = True
        self.touched_keys = set()
        self.touched_services = set()

    def take_touched(self) -> tuple[bool, set[ServiceKey], set[NamespacedName]]:
        """What changed since the last call: (rebuilt, keys, Services); forgotten here."""
        touched = self.cleared, self.touched_keys, self.touched_services
        self.cleared, self.touched_keys, self.touched_services = False, set(), set()
        return touched

    def release(self, service: NamespacedName) -> tuple[ServiceKey, ...]:
        """Take a Service's claims back before it is claimed again; returns its keys."""
        self.info.pop(service, None)
        keys = self.owners.release(service)
        if not self.cleared:
            self.touched_services.add(service)
            self.touched_keys.update(keys)
        return keys

    def remove(self, service: NamespacedName) -> tuple[ServiceKey, ...]:
        """Forget a deleted Service; returns the keys it held."""
        self.nat.pop(service, None)
        return self.release(service)

    def claim(self, service: NamespacedName, vss: Iterable[VirtualService], info: ServiceInfo | None,
              problems: list[Problem]) -> tuple[ServiceKey, ...]:
        """Record a freshly translated (and released) Service; returns the keys it got.
        Claims lost to other Services are appended to ``problems``."""
        keys = self.owners.claim(service, vss, problems)
        if not self.cleared:
            self.touched_services.add(service)
            self.touched_keys.update(keys)
        if info is None:
            self.nat.pop(service, None)
            return keys
        info = with_keys(info, keys)
        self.info[service] = info
        new = nat_view(info, keys)
        old = self.nat.get(service)
        self.nat[service] = old if old == new and old is not None else new
        return keys

    def forget_nat_of_gone(self) -> None:
        """After a whole translation: drop the plumbing view of Services that left."""
        self.nat = {nn: nat for nn, nat in self.nat.items() if nn in self.info}
