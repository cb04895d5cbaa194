"""The IPVS sysctls kube-proxy sets, for the node's namespace and each Pod's.

A new network namespace starts from the kernel's defaults, so replicate mode sets the
same values in every Pod namespace it programs as node plumbing sets on the node.
"""

from __future__ import annotations

import os


def _kernel_version(release: str) -> tuple[int, int]:
    parts = release.split(".")
    try:
        return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)
    except (IndexError, ValueError):
        return (0, 0)


def kube_proxy_sysctls(release: str | None = None) -> dict[str, str]:
    """The IPVS sysctls kube-proxy's IPVS proxier sets, for this kernel release.

    conntrack=1 keeps NATed packets tracked (replies are not INVALID);
    expire_nodest_conn / expire_quiescent_template end connections and persistence
    templates of deleted or weight-0 real servers; conn_reuse_mode is set to 0 only
    on kernels 4.1 to 5.8 (older ones lack it, 5.9 fixed the 1 s delay it caused:
    kubernetes/kubernetes#93297), as kube-proxy does.
    """
    version = _kernel_version(release if release is not None else os.uname().release)
    wanted = {"conntrack": "1", "expire_nodest_conn": "1", "expire_quiescent_template": "1"}
    if (4, 1) <= version < (5, 9):
        wanted["conn_reuse_mode"] = "0"
    return wanted
