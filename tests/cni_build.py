"""The static ``svcproxy-cni`` (cni/svcproxy-cni.c), built by ``make cni-plugin``
once per test run (make rebuilds it only when the source changed)."""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STATIC_PLUGIN = REPO / "build" / "svcproxy-cni"


@functools.lru_cache(maxsize=None)
def static_plugin() -> Path:
    """Build (if needed) and return build/svcproxy-cni."""
    cp = subprocess.run(["make", "-s", "-C", str(REPO), "cni-plugin"], capture_output=True, text=True)
    assert cp.returncode == 0, f"make cni-plugin failed:\n{cp.stdout}{cp.stderr}"
    assert STATIC_PLUGIN.is_file(), STATIC_PLUGIN
    return STATIC_PLUGIN


def is_static(exe: Path) -> bool:
    with open(exe, "rb") as f:
        return f.read(4) == b"\x7fELF"
