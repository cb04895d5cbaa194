"""How translation reports input it had to skip or replace: ``Problem`` and its kinds.

A module of its own because every translation step reports through it (the Service
fields, the EndpointSlices, the node) and the steps live in several modules; the
public home stays ``svcproxy.kube.translate``, which re-exports both names.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Every ``Problem.kind`` this package reports; stable, for dashboards and alerts.
PROBLEM_KINDS: frozenset[str] = frozenset(
    {
        "invalid-ip",
        "invalid-port",
        "invalid-value",
        "unknown-protocol",
        "unknown-scheduler",
        "orphan-slice",
        "wrong-family",
        "missing-field",
        "wrong-type",
        "duplicate-service",
        "duplicate-virtual-service",
        "missing-node",
        "unknown-kind",
        "malformed-object",
    }
)


@dataclass(frozen=True)
class Problem:
    """Something in the input that was skipped or replaced by a default."""

    kind: str
    obj: str
    message: str
    severity: str = "error"

    def __str__(self) -> str:
        return f"{self.severity}: {self.obj}: {self.message} [{self.kind}]"
