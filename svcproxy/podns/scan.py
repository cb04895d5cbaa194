"""The periodic scan of a namespace directory (``--pod-netns-dir``).

Why a scan besides the CNI plugin: the plugin only sees Pods created while it is
installed and the agent is up. After an agent restart, or on a node where the plugin
was installed after its Pods started, namespaces would stay without Services. The
scan attaches every namespace file in the directory that is not attached yet (or
whose name now points at another namespace: identity is the nsfs inode, so a reused
name is attached afresh), and forgets attached ones that vanished. It is cheap: one
directory listing and one ``stat`` per entry; attaching itself happens in the
reconcile loop. What it cannot do is choose Pods: every namespace in the directory
is attached. Selection by annotation or label happens in the CNI plugin, which is
given the Pod's annotations by the runtime.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass

from svcproxy.ipvs.backend import BackendError
from svcproxy.podns.attach import AttachResult, NetnsId, PodNamespaces
from svcproxy.podns.netns import NamespaceGone, NodeNamespace, pod_netns_id

__all__ = ["NetnsScanner", "ScanResult"]

log = logging.getLogger("svcproxy.podns")


class Unreadable(OSError):
    """The directory exists but cannot be listed."""


@dataclass(frozen=True)
class ScanResult:
    attached: tuple[str, ...] = ()
    detached: tuple[str, ...] = ()


class NetnsScanner:
    """Keeps the namespaces in ``directory`` attached; ``run`` loops until stopped."""

    def __init__(self, directory: str, namespaces: PodNamespaces, period: float = 30.0) -> None:
        self.directory = os.path.abspath(directory)
        self.namespaces = namespaces
        self.period = period
        self.scans = 0
        self._node_paths: set[str] = set()  # handles to the node's own namespace, said once
        self._last_error = ""  # the directory's listing error, said once

    def present(self) -> dict[str, NetnsId]:
        """Namespace files in the directory now (anything else there is skipped).
        Raises Unreadable when the directory exists but cannot be listed."""
        found: dict[str, NetnsId] = {}
        try:
            entries = sorted(os.listdir(self.directory))
        except FileNotFoundError:
            return found  # no namespace was ever created with `ip netns add`: fine
        except OSError as exc:
            raise Unreadable(f"cannot list {self.directory}: {exc.strerror or exc}") from None
        for name in entries:
            path = os.path.join(self.directory, name)
            try:
                found[path] = pod_netns_id(path)
            except (NamespaceGone, BackendError):
                continue
            except NodeNamespace as exc:
                if path not in self._node_paths:
                    self._node_paths.add(path)
                    log.warning("scan of %s: not attaching %s", self.directory, exc)
                    self.namespaces.proxier.metrics.pod_netns_refused.labels("node-namespace").inc()
        return found

    def scan_once(self) -> ScanResult:
        """Attach what appeared, forget what vanished. A directory that cannot be listed
        (not a directory, permissions) changes nothing: its namespaces stay attached,
        with one log line per new error and the failure counted."""
        self.scans += 1
        try:
            present = self.present()
        except Unreadable as exc:
            self.namespaces.proxier.metrics.pod_netns_scan_errors.inc()
            if str(exc) != self._last_error:
                log.error("scan: %s; Pod namespaces found before stay attached, retrying every %gs",
                          exc, self.period)
            self._last_error = str(exc)
            return ScanResult()
        self._last_error = ""
        known = self.namespaces.known()
        attached: list[str] = []
        for path, ident in present.items():
            if known.get(path) == ident:
                continue
            if self.namespaces.attach(path) is AttachResult.ATTACHED:
                attached.append(path)
        detached: list[str] = []
        for path in known:
            if os.path.dirname(path) == self.directory and path not in present:
                if self.namespaces.detach(path):
                    detached.append(path)
        if attached or detached:
            log.info("scan of %s: %d namespaces attached, %d forgotten", self.directory, len(attached),
                     len(detached))
        return ScanResult(tuple(attached), tuple(detached))

    def run(self, stop: threading.Event) -> None:
        """Scan now, then every ``period`` seconds until ``stop`` is set."""
        while not stop.is_set():
            try:
                self.scan_once()
            except Exception:  # never let the scan thread die: the next scan retries
                log.exception("scan of %s failed", self.directory)
            if stop.wait(self.period):
                break

    def start(self, stop: threading.Event) -> threading.Thread:
        thread = threading.Thread(target=self.run, args=(stop,), name="svcproxy-netns-scan", daemon=True)
        thread.start()
        return thread
