"""The configuration file: same keys as the flags, flags win, bad files are errors."""

from __future__ import annotations

import io
import json
from pathlib import Path

from svcproxy.cli import main
from svcproxy.ipvs.backend import MemoryBackend

CLUSTER = """\
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec: {clusterIP: 10.96.0.20, clusterIPs: [10.96.0.20, "fd00::20"], ipFamilies: [IPv4, IPv6],
       ports: [{name: http, port: 80, protocol: TCP}]}
"""


def plan(tmp_path: Path, config: str, *extra: str) -> tuple[int, str, str]:
    (tmp_path / "c.yaml").write_text(CLUSTER)
    (tmp_path / "svcproxy.yaml").write_text(config)
    out, err = io.StringIO(), io.StringIO()
    code = main(["plan", "-f", str(tmp_path / "c.yaml"), "-o", "json", "--config", str(tmp_path / "svcproxy.yaml"),
                 *extra], backend=MemoryBackend(), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def test_config_file_sets_flags(tmp_path: Path) -> None:
    code, out, _ = plan(tmp_path, "scheduler: wlc\nip-families: IPv6\n")
    assert code == 2
    services = json.loads(out)["services"]
    assert [(s["address"], s["scheduler"]) for s in services] == [("fd00::20", "wlc")]


def test_flags_override_the_file_and_underscores_work(tmp_path: Path) -> None:
    code, out, _ = plan(tmp_path, "scheduler: wlc\nip_families: [IPv4, IPv6]\n", "--scheduler", "sh")
    assert code == 2
    assert {s["scheduler"] for s in json.loads(out)["services"]} == {"sh"}
    assert len(json.loads(out)["services"]) == 2


def test_unknown_keys_and_bad_files_are_errors(tmp_path: Path) -> None:
    code, _, err = plan(tmp_path, "schedular: wlc\n")
    assert code == 1 and "unknown setting(s) schedular" in err and "scheduler" in err
    code, _, err = plan(tmp_path, "- a list\n")
    assert code == 1 and "expected a mapping" in err
    code, _, err = plan(tmp_path, "verbose: maybe\n")
    assert code == 1 and "true or false" in err
