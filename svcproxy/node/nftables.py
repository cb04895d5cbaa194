"""Run nft: read svcproxy's table as JSON, apply a script as one transaction."""

from __future__ import annotations

import subprocess
from typing import Callable

from svcproxy.node.nat import FAMILY, TABLE, Listing, parse_listing

Runner = Callable[..., "subprocess.CompletedProcess[str]"]


class NftError(Exception):
    pass


class Nftables:
    def __init__(self, binary: str = "nft", *, runner: Runner = subprocess.run, timeout: float = 60.0) -> None:
        self.binary = binary
        self.runner = runner
        self.timeout = timeout

    def _run(self, argv: list[str], stdin: str | None = None) -> "subprocess.CompletedProcess[str]":
        try:
            return self.runner([self.binary, *argv], input=stdin, capture_output=True, text=True,
                               timeout=self.timeout, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise NftError(f"{self.binary} {' '.join(argv)}: {exc}") from exc

    def read(self) -> Listing | None:
        """The table as it is, or None when there is none."""
        proc = self._run(["-j", "list", "table", FAMILY, TABLE])
        if proc.returncode != 0:
            if "No such file or directory" in proc.stderr:
                return None
            raise NftError(f"nft list table {FAMILY} {TABLE} failed ({proc.returncode}): {proc.stderr.strip()}")
        try:
            return parse_listing(proc.stdout)
        except (ValueError, KeyError, TypeError) as exc:
            raise NftError(f"cannot parse nft's JSON: {exc}") from exc

    def apply(self, script: str) -> None:
        """One ``nft -f -`` run: the kernel applies all of it or none of it."""
        proc = self._run(["-f", "-"], stdin=script)
        if proc.returncode != 0:
            raise NftError(f"nft -f failed ({proc.returncode}): {proc.stderr.strip()[:2000]}")

    def delete_table(self) -> bool:
        """Remove svcproxy's table; False when there was none."""
        proc = self._run(["delete", "table", FAMILY, TABLE])
        if proc.returncode == 0:
            return True
        if "No such file or directory" in proc.stderr:
            return False
        raise NftError(f"nft delete table failed ({proc.returncode}): {proc.stderr.strip()}")
