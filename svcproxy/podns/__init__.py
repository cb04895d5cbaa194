"""Share-NS: Services inside Pod network namespaces (docs/share-ns.md).

README.md beside this file lists the modules and their jobs.

Nothing is imported here eagerly: the CNI plugin (``svcproxy.podns.cni``) lives in
this package and must start fast, without the reconcile loop and its dependencies.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AttachResult": "attach",
    "PodNamespaces": "attach",
    "pod_target": "attach",
    "pod_visible": "visible",
    "Mode": "mode",
    "ModeDecision": "mode",
    "ModeError": "mode",
    "decide": "mode",
    "NetnsScanner": "scan",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
