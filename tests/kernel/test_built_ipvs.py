"""Which IPVS the VM runs. ``make test`` boots extra VMs with svcproxy's own IPVS
modules (kernel/, built by tools/build-ipvs-module) instead of Debian's; tools/vmtest
tells the guest with VMTEST_IPVS_MODULES (their directory, empty for the stock ones)
and VMTEST_IPVS_MODE (the ``mode`` ip_vs was loaded with). Every other test of such a
boot is only worth something if those modules really are the ones loaded, in that
mode, with no stock IPVS module next to them: this checks it. In a boot with the
stock modules it checks the opposite.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.kernel

EXPECT = os.environ.get("VMTEST_IPVS_MODE", "0") if os.environ.get("VMTEST_IPVS_MODULES") else None


def ipvs_modules() -> dict[str, str]:
    """Loaded IPVS modules and their taint flags ("O": built out of tree)."""
    return {m.name: (m / "taint").read_text().strip() for m in Path("/sys/module").glob("ip_vs*")
            if (m / "taint").exists()}


def test_the_ipvs_modules_loaded_are_the_ones_this_boot_is_for() -> None:
    loaded = ipvs_modules()
    assert "ip_vs" in loaded and "ip_vs_rr" in loaded, loaded
    mode = Path("/sys/module/ip_vs/parameters/mode")
    if EXPECT is None:
        assert not mode.exists(), "a share-namespace ip_vs is loaded, but this boot is for the stock one"
        assert not any("O" in t for t in loaded.values()), loaded
        return
    assert mode.read_text().strip() == EXPECT
    stock = [m for m, taint in loaded.items() if "O" not in taint]
    assert not stock, f"stock IPVS modules loaded next to the built ip_vs: {stock}"
