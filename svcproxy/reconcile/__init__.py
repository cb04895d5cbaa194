"""The reconcile loop: watched objects in, kernel IPVS tables kept equal to them.

``changes`` records what the watchers report, ``runner`` decides when to sync,
``desired`` keeps the translated table Service by Service, ``targets`` syncs one
table (the node's or a Pod namespace's), ``sweep`` lets changes in between the slices
of a full sync, ``draining`` softens deletes into drains,
and ``proxier`` joins them. See README.md beside this file.
"""

from __future__ import annotations

from svcproxy.gcpause import paused_gc
from svcproxy.reconcile.proxier import NodeHook, Proxier, ProxierConfig, SyncResult
from svcproxy.reconcile.targets import Target

__all__ = ["NodeHook", "Proxier", "ProxierConfig", "SyncResult", "Target", "paused_gc"]
