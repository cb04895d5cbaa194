"""``svcproxy-install-cni --watch``: keep the ``svcproxy-cni`` entry in the conflist.

Primary CNIs rewrite their conflist when they restart or are reconfigured, writing
only the plugins they know: our entry disappears and Pods started afterwards get no
Services in their own namespace, silently. The keeper looks at the conflist every
``interval`` seconds (a stat and a read: no inotify in the standard library, and a
poll also sees a file replaced by a rename or a directory remounted) and puts the
entry back with the installer's own edit: checked, atomic, idempotent, with the
duplicates collapsed into one last entry. An entry the primary CNI dropped comes back
with the keys it had when last seen (a hand-written selector, say).

A conflist it cannot safely extend (missing, not JSON, another cniVersion) is left
untouched: one log line when the problem starts or changes, a counter, and the
``entry_present`` gauge at 0 until it is fixed.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge

from svcproxy.podns.install import (
    PLUGIN,
    InstallError,
    NoConflist,
    Selector,
    edit_conflist,
    find_conflist,
    parse_conflist,
    with_plugin,
)

OK, REPAIRED = "ok", "repaired"


class ConflistKeeper:
    def __init__(self, conf_dir: Path, conflist: str | None, socket: str, timeout: float | None = None,
                 selector: Selector | None = None, *, say: Callable[[str], None] = print,
                 warn: Callable[[str], None] = print) -> None:
        self.conf_dir, self.conflist = conf_dir, conflist
        self.socket, self.timeout, self.selector = socket, timeout, selector
        self.say, self.warn = say, warn
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.repairs = Counter("svcproxy_cni_conflist_repairs_total",
                               "Times the svcproxy-cni entry was put back into a rewritten conflist", registry=r)
        self.problems = Counter("svcproxy_cni_conflist_problems_total",
                                "Times the conflist was found missing, unusable (left untouched) or unwritable",
                                ["reason"], registry=r)
        self.present = Gauge("svcproxy_cni_conflist_entry_present",
                             "1 while the conflist ends with the svcproxy-cni entry", registry=r)
        #: Our entry as last seen in the file: what comes back when it is dropped.
        self.last_entry: dict[str, Any] | None = None
        self._problem: str | None = None

    def _change(self, doc: dict[str, Any]) -> dict[str, Any]:
        plugins = doc["plugins"]
        if self.last_entry is not None and not any(p.get("type") == PLUGIN for p in plugins):
            doc = {**doc, "plugins": [*plugins, self.last_entry]}
        return with_plugin(doc, self.socket, self.timeout, self.selector)

    def _trouble(self, reason: str, message: str) -> str:
        self.problems.labels(reason).inc()
        self.present.set(0)
        if message != self._problem:
            self.warn(f"conflist: {message}")
            self._problem = message
        return reason

    def check_once(self) -> str:
        """One look: OK, REPAIRED, or the problem's reason (missing, invalid, write)."""
        try:
            path = find_conflist(self.conf_dir, self.conflist)
            text = path.read_text(encoding="utf-8")
            doc = parse_conflist(path, text)
        except NoConflist as exc:
            return self._trouble("missing", str(exc))
        except (InstallError, OSError, UnicodeDecodeError) as exc:
            return self._trouble("invalid", str(exc))
        mine = [p for p in doc["plugins"] if p.get("type") == PLUGIN]
        if mine:
            self.last_entry = dict(mine[-1])
        try:
            changed = edit_conflist(path, self._change)
        except InstallError as exc:
            return self._trouble("write", str(exc))
        self.present.set(1)
        if self._problem is not None:
            self.say(f"conflist {path} is usable again")
            self._problem = None
        if not changed:
            return OK
        self.repairs.inc()
        self.say(f"put {PLUGIN} back as the last plugin of {path} (the file had been rewritten "
                 f"{'without it' if not mine else 'with it out of place or twice'})")
        return REPAIRED

    def run(self, stop: threading.Event, interval: float) -> None:
        """Look every ``interval`` seconds until ``stop`` is set."""
        while True:
            self.check_once()
            if stop.wait(interval):
                return
