"""Which Service provides each virtual service: the one rule for claims that collide.

Two Services can name the same virtual service (the same externalIP and port, say),
and one Service can name one twice (an externalIP equal to its own ClusterIP). The
API server does not forbid either. The first claim keeps the virtual service and
every later one is reported and left out, so a whole translation (Services claimed
in sorted namespace/name order) and the reconcile loop's incremental one (a changed
Service released and claimed again) agree on what is programmed.

Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable

from svcproxy.kube.objects import NamespacedName
from svcproxy.kube.problems import Problem
from svcproxy.model import ServiceKey, VirtualService


def duplicate(service: NamespacedName, key: ServiceKey, owner: NamespacedName) -> Problem:
    """The problem reported for a claim that lost."""
    what = f"Service {service[0]}/{service[1]}"
    if owner == service:
        return Problem("duplicate-virtual-service", what, f"{key} is named twice: the first is kept", "warning")
    return Problem("duplicate-virtual-service", what,
                   f"{key} already belongs to Service {owner[0]}/{owner[1]}: not programmed")


class Owners:
    """Virtual services by key, each with the Service that owns it."""

    def __init__(self) -> None:
        #: The claimed virtual services: the desired table.
        self.table: dict[ServiceKey, VirtualService] = {}
        self._owner: dict[ServiceKey, NamespacedName] = {}
        self._keys: dict[NamespacedName, tuple[ServiceKey, ...]] = {}
        #: A claim was lost to another Service since these owners were made.
        self.collided = False
        #: Who lost a claim on each key (to claim again when the owner lets it go).
        self._losers: dict[ServiceKey, set[NamespacedName]] = {}

    def claim(self, service: NamespacedName, vss: Iterable[VirtualService],
              problems: list[Problem]) -> tuple[ServiceKey, ...]:
        """Take every free key of ``vss`` for ``service``; returns the keys it got.

        ``service`` must hold no claims (``release`` it first); each lost claim is
        appended to ``problems``.
        """
        table, owners = self.table, self._owner
        kept: list[ServiceKey] = []
        for vs in vss:
            key = vs.key
            owner = owners.get(key)
            if owner is not None:
                problems.append(duplicate(service, key, owner))
                if owner != service:
                    self.collided = True
                    self._losers.setdefault(key, set()).add(service)
                continue
            table[key] = vs
            owners[key] = service
            kept.append(key)
        keys = tuple(kept)
        self._keys[service] = keys
        return keys

    def release(self, service: NamespacedName) -> tuple[ServiceKey, ...]:
        """Give up every key ``service`` holds; returns them."""
        keys = self._keys.pop(service, ())
        for key in keys:
            del self._owner[key]
            del self.table[key]
        return keys

    def keys_of(self, service: NamespacedName) -> tuple[ServiceKey, ...]:
        return self._keys.get(service, ())

    def losers(self, keys: Iterable[ServiceKey]) -> set[NamespacedName]:
        """The Services that lost a claim on any of ``keys`` (and may claim them now);
        they are forgotten here, as they are about to claim again."""
        found: set[NamespacedName] = set()
        for key in keys:
            found |= self._losers.pop(key, set())
        return found
