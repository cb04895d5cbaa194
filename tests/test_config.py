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


def test_the_agents_file_also_serves_plan_and_sync(tmp_path: Path) -> None:
    """Keys of other subcommands (run's sync-period, say) are skipped, typos are not."""
    from svcproxy.cli import main

    cluster = tmp_path / "c.json"
    cluster.write_text('{"apiVersion": "v1", "kind": "List", "items": []}')
    conf = tmp_path / "config.yaml"
    conf.write_text("sync-period: 30s\nnode-plumbing: 'on'\nexclude-cidrs: [10.200.0.0/16]\n")
    out, err = io.StringIO(), io.StringIO()
    rc = main(["plan", "--config", str(conf), "-f", str(cluster), "--node", "node-a", "--current-file",
               str(_empty_dump(tmp_path))], out=out, err=err)
    assert rc == 0, err.getvalue()
    conf.write_text("sync-perod: 30s\n")
    err = io.StringIO()
    assert main(["plan", "--config", str(conf), "-f", str(cluster)], out=io.StringIO(), err=err) == 1
    assert "unknown setting(s) sync-perod" in err.getvalue()


def _empty_dump(tmp_path: Path) -> Path:
    p = tmp_path / "saved"
    p.write_text("")
    return p


def test_a_switch_set_in_the_file_can_be_switched_off_on_the_command_line(tmp_path: Path) -> None:
    from svcproxy.cli import _subparser, build_parser
    from svcproxy.config import config_tokens

    conf = tmp_path / "config.yaml"
    conf.write_text("masquerade-all: true\nstrict-arp: false\n")
    parser = build_parser()
    run = _subparser(parser, "run")
    assert config_tokens(run, conf, []) == ["--masquerade-all", "--no-strict-arp"]
    given = ["--no-masquerade-all"]
    tokens = config_tokens(run, conf, given)
    assert tokens == ["--no-strict-arp"]
    args = parser.parse_args(["run", *tokens, *given])
    assert args.masquerade_all is False and args.strict_arp is False
