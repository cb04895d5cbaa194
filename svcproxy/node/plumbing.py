"""Node-namespace plumbing around the IPVS table: sysctls, the dummy device, masquerade.

``NodePlumbing`` is the reconcile loop's node hook: before each sync's IPVS
operations the loop hands it each Service's addresses (``ServiceNat``) and the node's
own addresses. It keeps three things in line with them, each diffed against what the kernel was last seen to hold and
re-read every ``recheck_period`` seconds:

* the IPVS sysctls kube-proxy sets (and ip_forward, and strict ARP when asked);
* the virtual addresses bound to the dummy device (svcproxy.node.dummy);
* svcproxy's nftables table (svcproxy.node.nat): rebuilt in one transaction when its
  structure is wrong or missing, else patched element by element.

A failure here is logged and counted and retried at the next sync; it never stops
the IPVS table from being programmed (the rules that work keep working). In a dry
run it logs what it would change and changes nothing.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

from svcproxy.node.dummy import DEVICE, AddressChanges, DeviceError, DummyDevice, address_changes
from svcproxy.node.nat import (BIND, SET_TYPES, Delta, Element, ElementIndex, NatConfig, NatElements, ServiceNat,
                               element_script, render_table, rule_comments)
from svcproxy.node.nftables import NftError, Nftables
from svcproxy.node.sysctls import kube_proxy_sysctls

log = logging.getLogger(__name__)

_SYSCTL_ROOT = "/proc/sys"


def node_sysctls(strict_arp: bool, vs_sysctls: Mapping[str, str]) -> dict[str, str]:
    """Sysctl path (under /proc/sys) -> value, as kube-proxy's IPVS mode sets them."""
    wanted = {f"net/ipv4/vs/{k}": v for k, v in vs_sysctls.items()}
    wanted["net/ipv4/ip_forward"] = "1"
    if strict_arp:
        # Do not answer ARP for the virtual addresses bound to the dummy device.
        wanted["net/ipv4/conf/all/arp_ignore"] = "1"
        wanted["net/ipv4/conf/all/arp_announce"] = "2"
    return wanted


@dataclass(frozen=True)
class PlumbingConfig:
    device: str = DEVICE
    #: Bind virtual addresses to the dummy device (off: someone else makes them local).
    bind_addresses: bool = True
    #: None: no nftables table at all (masquerading is done elsewhere, or not needed).
    nat: NatConfig | None = field(default_factory=NatConfig)
    sysctls: bool = True
    strict_arp: bool = False
    recheck_period: float = 60.0
    dry_run: bool = False
    nft: str = "nft"


@dataclass
class PlumbingStats:
    errors: dict[str, int] = field(default_factory=dict)
    changes: dict[str, int] = field(default_factory=dict)

    def error(self, part: str) -> None:
        self.errors[part] = self.errors.get(part, 0) + 1

    def changed(self, part: str, n: int = 1) -> None:
        self.changes[part] = self.changes.get(part, 0) + n


class NodePlumbing:
    def __init__(self, config: PlumbingConfig, *,
                 device: DummyDevice | None = None,
                 nft: Nftables | None = None,
                 vs_sysctls: Mapping[str, str] | None = None,
                 sysctl_root: str = _SYSCTL_ROOT,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.device = device or DummyDevice(config.device)
        self.nft = nft or Nftables(config.nft)
        if vs_sysctls is None:
            vs_sysctls = kube_proxy_sysctls()
        self.sysctls = node_sysctls(config.strict_arp, vs_sysctls) if config.sysctls else {}
        self.sysctl_root = sysctl_root
        self.monotonic = monotonic
        self.stats = PlumbingStats()
        # What the kernel is believed to hold; None = read it at the next call.
        self.index = ElementIndex()
        self._bound: set[str] | None = None
        self._elements: dict[str, set[Element]] | None = None
        self._next_check = float("-inf")
        self._sysctls_done = False

    def sync(self, services: Mapping[Any, ServiceNat], node_addresses: Iterable[str]) -> None:
        """Bring the node in line with the Services' view for plumbing (the reconcile
        loop's node hook; a Service whose ``ServiceNat`` is the same object as last
        time is not looked at again)."""
        now = self.monotonic()
        if now >= self._next_check:
            self._bound = None
            self._elements = None
            self._sysctls_done = False
            self._next_check = now + self.config.recheck_period
        try:
            delta = self.index.update(services, node_addresses)
        except ValueError as exc:  # a malformed address in a ServiceNat: never expected
            self.stats.error("nftables")
            log.error("node plumbing: %s", exc)
            return
        if self.sysctls and not self._sysctls_done:
            self._guard("sysctl", self._sync_sysctls)
        if self.config.bind_addresses:
            self._guard("dummy", lambda: self._sync_addresses(delta))
        if self.config.nat is not None:
            nat = self.config.nat
            self._guard("nftables", lambda: self._sync_nat(delta, nat))

    def _guard(self, part: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except (OSError, DeviceError, NftError, ValueError) as exc:
            self.stats.error(part)
            self._next_check = float("-inf")  # re-read everything next time
            log.error("node plumbing (%s) failed, will retry at the next sync: %s", part, exc)

    # --- sysctls --------------------------------------------------------------------

    def _sync_sysctls(self) -> None:
        failed = False
        for name, value in self.sysctls.items():
            path = os.path.join(self.sysctl_root, name)
            try:
                with open(path) as f:
                    current = f.read().strip()
            except FileNotFoundError:
                log.warning("sysctl %s does not exist on this kernel; skipped", name.replace("/", "."))
                continue
            if current == value:
                continue
            if self.config.dry_run:
                log.info("dry run: would set sysctl %s=%s (now %s)", name.replace("/", "."), value, current)
                continue
            try:
                with open(path, "w") as f:
                    f.write(value)
            except OSError as exc:
                failed = True
                self.stats.error("sysctl")
                log.error("cannot set sysctl %s=%s: %s", name.replace("/", "."), value, exc)
                continue
            self.stats.changed("sysctl")
            log.info("set sysctl %s=%s (was %s)", name.replace("/", "."), value, current)
        self._sysctls_done = not failed

    # --- dummy device ---------------------------------------------------------------

    def _sync_addresses(self, delta: Delta) -> None:
        if self._bound is None:
            want = frozenset(e[0] for e in self.index.current().get(BIND))
            self._bound = set(self.device.addresses())
            changes = address_changes(want, frozenset(self._bound))
        else:
            added, removed = delta.changes.get(BIND, (frozenset(), frozenset()))
            changes = AddressChanges(tuple(sorted(e[0] for e in added if e[0] not in self._bound)),
                                     tuple(sorted(e[0] for e in removed if e[0] in self._bound)))
        if not changes:
            return
        if self.config.dry_run:
            log.info("dry run: would change addresses on %s: %s", self.config.device, _short(changes))
        else:
            failed = self.device.apply(changes)
            for address, error in failed:
                self.stats.error("dummy")
                log.error("cannot change address %s on %s: %s", address, self.config.device, error)
            self.stats.changed("dummy", len(changes.add) + len(changes.delete) - len(failed))
            log.info("addresses on %s: %d bound, %d unbound%s", self.config.device, len(changes.add),
                     len(changes.delete), f", {len(failed)} failed" if failed else "")
            if failed:  # re-read next time rather than guess
                self._bound = None
                self._next_check = float("-inf")
                return
        self._bound.difference_update(changes.delete)
        self._bound.update(changes.add)

    # --- nftables -------------------------------------------------------------------

    def _sync_nat(self, delta: Delta, nat: NatConfig) -> None:
        if self._elements is None:
            want = _nft_sets(self.index.current())
            listing = self.nft.read()
            if listing is None or listing.comments != rule_comments(nat):
                what = "create" if listing is None else "rebuild (structure differs)"
                if self.config.dry_run:
                    log.info("dry run: would %s nftables table inet svcproxy with %d set elements", what, len(want))
                else:
                    self.nft.apply(render_table(nat, want))
                    self.stats.changed("nftables")
                    log.info("nftables table inet svcproxy: %s, %d set elements", what, len(want))
                self._elements = {k: set(v) for k, v in want.sets.items()}
                return
            old, new = listing.elements, want
            self._elements = {k: set(v) for k, v in old.sets.items()}
        else:
            image = self._elements
            old = NatElements({n: frozenset(e for e in removed if e in image.get(n, ()))
                               for n, (_, removed) in delta.changes.items() if n in SET_TYPES})
            new = NatElements({n: frozenset(e for e in added if e not in image.get(n, ()))
                               for n, (added, _) in delta.changes.items() if n in SET_TYPES})
        script = element_script(old, new)
        if not script:
            return
        if self.config.dry_run:
            log.info("dry run: would change nftables set elements:\n%s", script.rstrip())
        else:
            try:
                self.nft.apply(script)
            except NftError:
                self._elements = None  # unknown now: read it back next time
                raise
            n = sum(len(old.get(k)) + len(new.get(k)) for k in SET_TYPES)
            self.stats.changed("nftables", n)
            log.info("nftables: %d set elements changed", n)
        for name in SET_TYPES:
            self._elements.setdefault(name, set()).difference_update(old.get(name) - new.get(name))
            self._elements[name].update(new.get(name))

    # --- cleanup --------------------------------------------------------------------

    def cleanup(self) -> list[tuple[str, bool]]:
        """Remove the dummy device and the nftables table, each on its own: one
        (what happened, succeeded) per part that was there or failed."""
        done: list[tuple[str, bool]] = []
        parts: tuple[tuple[str, Callable[[], bool], Callable[[], bool]], ...] = (
            (f"dummy device {self.config.device}", lambda: self.device.index() is not None, self.device.delete),
            ("nftables table inet svcproxy", lambda: self.nft.read() is not None, self.nft.delete_table),
        )
        for what, present, delete in parts:
            try:
                if self.config.dry_run:
                    if present():
                        done.append((f"would delete {what}", True))
                elif delete():
                    done.append((f"removed {what}", True))
            except (OSError, DeviceError, NftError) as exc:
                done.append((f"{what}: FAILED: {exc}", False))
        return done


def _nft_sets(elements: NatElements) -> NatElements:
    return NatElements({k: v for k, v in elements.sets.items() if k in SET_TYPES})


def _short(changes: AddressChanges, limit: int = 20) -> str:
    text = changes.describe()
    parts = text.split()
    return text if len(parts) <= limit else " ".join(parts[:limit]) + f" ... ({len(parts)} in all)"
