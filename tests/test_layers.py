"""The pure core imports nothing that does I/O: checked on the source, like an import contract.

Everything that decides what the table should be (objects -> desired table -> plan, and
the loop's pure steps) must be testable in memory and must never reach the kernel, the
network or the clock by accident. A module listed here may import only the standard
library's pure modules and other modules listed here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

PURE = {
    "svcproxy.model",
    "svcproxy.diff",
    "svcproxy.render",
    "svcproxy.kube.objects",
    "svcproxy.kube.owners",
    "svcproxy.kube.problems",
    "svcproxy.kube.endpoints",
    "svcproxy.kube.service_spec",
    "svcproxy.kube.slice_endpoints",
    "svcproxy.kube.translate",
    "svcproxy.kube.store",
    "svcproxy.node.nat",
    "svcproxy.podns.visible",
    "svcproxy.reconcile.draining",
    "svcproxy.reconcile.desired",
    "svcproxy.reconcile.sweep",
    "svcproxy.reconcile.tallies",
    "svcproxy.node.stale_flows",
}
STDLIB_PURE = {
    "__future__", "collections", "collections.abc", "dataclasses", "enum", "functools", "hashlib",
    "ipaddress", "json", "json.encoder", "operator", "re", "typing",
}


def module_path(name: str) -> Path:
    return ROOT / (name.replace(".", "/") + ".py")


def imports_of(name: str) -> set[str]:
    return imports_in(module_path(name).read_text())


def impure(imports: set[str]) -> list[str]:
    return sorted(m for m in imports if m not in PURE and m not in STDLIB_PURE)


def imports_in(source: str) -> set[str]:
    tree = ast.parse(source)
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None and node.level == 0:
            found.add(node.module)
    return found


@pytest.mark.parametrize("name", sorted(n for n in PURE if module_path(n).exists()))
def test_pure_modules_import_only_pure_modules(name: str) -> None:
    bad = impure(imports_of(name))
    assert not bad, f"{name} imports {bad}: the pure core must not reach I/O"


def test_the_contract_names_real_modules() -> None:
    assert sum(module_path(n).exists() for n in PURE) >= 12


def test_the_check_catches_an_impure_import() -> None:
    """The check itself can fail: imports of subprocess or of a backend are flagged."""
    source = "import subprocess\nfrom svcproxy.ipvs.netlink import NetlinkBackend\nfrom svcproxy.model import Table\n"
    assert impure(imports_in(source)) == ["subprocess", "svcproxy.ipvs.netlink"]
