"""--config with kube-proxy's own KubeProxyConfiguration: mapped fields become settings,
the others are named in one warning when set, unknown fields and other modes are errors."""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from svcproxy import kubeproxy_config
from svcproxy.cli import _subparser, build_parser, main
from svcproxy.config import ConfigError, _options, config_tokens
from svcproxy.ipvs.backend import MemoryBackend
from svcproxy.kubeproxy_config import go_duration
from svcproxy.model import Table

DATA = Path(__file__).resolve().parent / "data" / "kubeadm-kube-proxy-configmap.yaml"
CLUSTER = '{"apiVersion": "v1", "kind": "List", "items": []}'


def kubeadm_config() -> dict[str, Any]:
    """config.conf of the kubeadm-written ConfigMap, as kube-proxy reads it."""
    configmap = yaml.safe_load(DATA.read_text())
    doc = yaml.safe_load(configmap["data"]["config.conf"])
    assert isinstance(doc, dict)
    return doc


def run_args(tmp_path: Path, doc: dict[str, Any], *cmdline: str) -> tuple[Any, list[str]]:
    """`run --config FILE ...` parsed as main parses it; returns (args, warnings)."""
    path = tmp_path / "config.conf"
    path.write_text(yaml.safe_dump(doc))
    parser = build_parser()
    warnings: list[str] = []
    tokens = config_tokens(_subparser(parser, "run"), path, list(cmdline), warn=warnings.append)
    return parser.parse_args(["run", *tokens, *cmdline]), warnings


class Untouchable(MemoryBackend):
    def read(self, counts: bool | None = None) -> Table:
        raise AssertionError("the kernel was read before the configuration was checked")


def plan(tmp_path: Path, doc: dict[str, Any], backend: MemoryBackend | None = None) -> tuple[int, str]:
    (tmp_path / "c.json").write_text(CLUSTER)
    (tmp_path / "config.conf").write_text(yaml.safe_dump(doc))
    err = io.StringIO()
    code = main(["plan", "-f", str(tmp_path / "c.json"), "--config", str(tmp_path / "config.conf")],
                backend=backend or MemoryBackend(), out=io.StringIO(), err=err)
    return code, err.getvalue()


def test_the_kubeadm_configmap_maps_its_settings_without_a_warning(tmp_path: Path) -> None:
    args, warnings = run_args(tmp_path, kubeadm_config())
    assert warnings == []
    assert args.cluster_cidr == "10.244.0.0/16"
    assert args.kubeconfig == "/var/lib/kube-proxy/kubeconfig.conf"
    # Everything else kubeadm writes is a zero value: svcproxy's defaults stay.
    defaults = build_parser().parse_args(["run"])
    for name in ("sync_period", "min_sync_period", "scheduler", "strict_arp", "masquerade_all", "health_bind",
                 "node", "node_ip", "nodeport_addresses", "exclude_cidrs", "logging_format"):
        assert getattr(args, name) == getattr(defaults, name), name


def test_the_kubeadm_configmap_also_serves_plan(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    code, err = plan(tmp_path, kubeadm_config())
    assert code == 0 and "error" not in err, err
    assert "KubeProxyConfiguration" not in caplog.text


def test_every_mapped_field_becomes_its_setting(tmp_path: Path) -> None:
    doc = kubeadm_config()
    doc.update(bindAddress="192.168.49.2", healthzBindAddress="0.0.0.0:10266", hostnameOverride="node-a",
               nodePortAddresses=["primary"], clusterCIDR="10.244.0.0/16,fd00:10:244::/56")
    doc["ipvs"].update(scheduler="wlc", syncPeriod="1m0s", minSyncPeriod="2s", strictARP=True,
                       excludeCIDRs=["10.200.0.0/16", "10.201.0.0/16"])
    doc["iptables"]["masqueradeAll"] = True
    doc["logging"]["format"] = "json"
    args, warnings = run_args(tmp_path, doc)
    assert warnings == []
    assert (args.node_ip, args.health_bind, args.node, args.nodeport_addresses) == (
        ["192.168.49.2"], "0.0.0.0:10266", "node-a", "primary")
    assert (args.scheduler, args.sync_period, args.min_sync_period, args.strict_arp) == ("wlc", 60.0, 2.0, True)
    assert args.exclude_cidrs == "10.200.0.0/16,10.201.0.0/16" and args.masquerade_all is True
    assert args.cluster_cidr == "10.244.0.0/16,fd00:10:244::/56" and args.logging_format == "json"


def test_the_command_line_wins_over_the_kube_proxy_file(tmp_path: Path) -> None:
    doc = kubeadm_config()
    doc["ipvs"]["scheduler"] = "wlc"
    args, _ = run_args(tmp_path, doc, "--scheduler", "sh", "--cluster-cidr", "10.250.0.0/16")
    assert (args.scheduler, args.cluster_cidr) == ("sh", "10.250.0.0/16")


def test_fields_svcproxy_does_not_implement_are_named_in_one_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    doc = kubeadm_config()
    doc["conntrack"]["maxPerCore"] = 65536
    doc["iptables"]["syncPeriod"] = "10s"
    doc["metricsBindAddress"] = "0.0.0.0:10249"
    doc["featureGates"] = {"SomeGate": True}
    doc["logging"]["verbosity"] = 4
    doc["configSyncPeriod"] = "15m0s"  # kube-proxy's default: not worth a word
    doc["oomScoreAdj"] = -999
    (tmp_path / "c.json").write_text(CLUSTER)
    (tmp_path / "config.conf").write_text(yaml.safe_dump(doc))
    err = io.StringIO()
    code = main(["plan", "-f", str(tmp_path / "c.json"), "--config", str(tmp_path / "config.conf")],
                backend=MemoryBackend(), out=io.StringIO(), err=err)
    lines = [r.getMessage() for r in caplog.records if "KubeProxyConfiguration" in r.getMessage()]
    assert code == 0 and len(lines) == 1, caplog.text
    assert [r.levelname for r in caplog.records if "KubeProxyConfiguration" in r.getMessage()] == ["WARNING"]
    assert lines[0].startswith("KubeProxyConfiguration: svcproxy does not implement ")
    for name in ("conntrack.maxPerCore", "featureGates", "iptables.syncPeriod", "logging.verbosity",
                 "metricsBindAddress"):
        assert name in lines[0]
    assert "configSyncPeriod" not in lines[0] and "oomScoreAdj" not in lines[0]


def test_zero_is_a_setting_where_kube_proxy_defaults_only_an_absent_field() -> None:
    """Fields that are pointers in kube-proxy's Go type get their default only when
    absent: 0, false or 0s there is a choice svcproxy must name. Where kube-proxy
    replaces the zero value by its default, the zero value is not worth a word."""
    doc = kubeadm_config()
    doc["iptables"].update(masqueradeBit=0, localhostNodePorts=False, syncPeriod="0s", minSyncPeriod="0s")
    doc["nftables"] = {"masqueradeBit": 0, "syncPeriod": "0s"}
    doc["conntrack"].update(maxPerCore=0, min=0, tcpEstablishedTimeout="0s", tcpCloseWaitTimeout="0s",
                            udpTimeout="0s", tcpBeLiberal=False)
    doc["oomScoreAdj"] = 0
    doc["clientConnection"].update(qps=0, burst=0, contentType="")
    doc["configSyncPeriod"] = "0s"
    run = set(_options(_subparser(build_parser(), "run")))
    ignored = kubeproxy_config.translate(doc, run).ignored
    assert sorted(ignored) == ["conntrack.maxPerCore", "conntrack.min", "conntrack.tcpCloseWaitTimeout",
                               "conntrack.tcpEstablishedTimeout", "iptables.localhostNodePorts",
                               "iptables.masqueradeBit", "nftables.masqueradeBit", "oomScoreAdj"]
    # their defaults, spelled out, are still not named
    doc["iptables"].update(masqueradeBit=14, localhostNodePorts=True)
    doc["nftables"]["masqueradeBit"] = 14
    doc["conntrack"].update(maxPerCore=32768, min=131072, tcpEstablishedTimeout="24h", tcpCloseWaitTimeout="1h0m0s")
    doc["oomScoreAdj"] = -999
    assert kubeproxy_config.translate(doc, run).ignored == ()


@pytest.mark.parametrize("change, named", [
    ({"ipvs": {"schedular": "rr"}}, "ipvs.schedular"),
    ({"proxyMode": "ipvs"}, "proxyMode"),
    ({"mode": "iptables"}, "mode: 'iptables': svcproxy is an IPVS proxy; mode must be ipvs or empty"),
    ({"mode": "nftables"}, "mode: 'nftables'"),
    ({"ipvs": {"syncPeriod": "soon"}}, "ipvs.syncPeriod: 'soon' is not a duration"),
    ({"ipvs": {"syncPeriod": "1000h"}}, "ipvs.syncPeriod:"),
    ({"ipvs": {"scheduler": "fastest"}}, "ipvs.scheduler: unknown IPVS scheduler 'fastest'"),
    ({"ipvs": {"strictARP": "yes"}}, "ipvs.strictARP: 'yes': must be true or false"),
    ({"ipvs": {"excludeCIDRs": ["10.0.0.0/33"]}}, "ipvs.excludeCIDRs:"),
    ({"ipvs": "fast"}, "ipvs: expected a mapping"),
    ({"clusterCIDR": "pods"}, "clusterCIDR: 'pods' is not a CIDR"),
    ({"healthzBindAddress": "localhost:10256"}, "healthzBindAddress:"),
    ({"bindAddress": "node-a"}, "bindAddress: 'node-a' is not an IP address"),
    ({"nodePortAddresses": ["primary", "10.0.0.0/8"]}, "nodePortAddresses:"),
    ({"nodePortAddresses": "10.0.0.0/8"}, "nodePortAddresses: '10.0.0.0/8' is not a list"),
    ({"logging": {"format": "xml"}}, "logging.format: 'xml' is not one of text, json"),
    ({"apiVersion": "kubeproxy.config.k8s.io/v1alpha2"}, "apiVersion 'kubeproxy.config.k8s.io/v1alpha2'"),
])
def test_bad_input_is_one_error_naming_the_field_and_nothing_runs(
        tmp_path: Path, change: dict[str, Any], named: str) -> None:
    doc = kubeadm_config()
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(doc.get(key), dict):
            doc[key].update(value)
        else:
            doc[key] = value
    code, err = plan(tmp_path, doc, backend=Untouchable())
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1, err
    assert lines[0].startswith("svcproxy: error: configuration file ") and "KubeProxyConfiguration: " in lines[0]
    assert named in lines[0], lines[0]


def test_timeouts_map_where_the_flags_exist_and_are_named_where_they_do_not() -> None:
    doc = kubeadm_config()
    doc["ipvs"].update(tcpTimeout="15m0s", tcpFinTimeout="0s", udpTimeout="5s")
    run = set(_options(_subparser(build_parser(), "run"))) - {"ipvs-tcp-timeout", "ipvs-udp-timeout",
                                                              "ipvs-tcpfin-timeout"}
    with_flags = kubeproxy_config.translate(doc, run | {"ipvs-tcp-timeout", "ipvs-tcpfin-timeout",
                                                        "ipvs-udp-timeout"})
    assert {k: v for k, v in with_flags.settings.items() if "timeout" in k} == {
        "ipvs-tcp-timeout": "900", "ipvs-udp-timeout": "5"}
    assert with_flags.ignored == ()
    without = kubeproxy_config.translate(doc, run)
    assert "ipvs-tcp-timeout" not in without.settings
    assert without.ignored == ("ipvs.tcpTimeout", "ipvs.udpTimeout")  # 0s is the default: not named


@pytest.mark.parametrize("text, seconds", [
    ("0s", 0.0), ("0", 0.0), ("30s", 30.0), ("1m0s", 60.0), ("1h0m0s", 3600.0), ("250ms", 0.25),
    ("1.5h", 5400.0), ("24h0m0s", 86400.0), ("1m30.5s", 90.5),
])
def test_go_durations(text: str, seconds: float) -> None:
    assert go_duration(text) == seconds


@pytest.mark.parametrize("text", ["soon", "30", "1d", "-", "s", 30, None])
def test_bad_go_durations(text: object) -> None:
    with pytest.raises(ValueError):
        go_duration(text)


def test_a_svcproxy_file_is_still_read_as_before(tmp_path: Path) -> None:
    path = tmp_path / "svcproxy.yaml"
    path.write_text("scheduler: wlc\nkind: svcproxy\n")
    with pytest.raises(ConfigError, match="unknown setting"):
        config_tokens(_subparser(build_parser(), "run"), path, [])


@pytest.mark.parametrize("text, key", [
    (f"apiVersion: {kubeproxy_config.API_VERSION}\nkind: KubeProxyConfiguration\nmode: iptables\nmode: ipvs\n",
     "mode"),
    (f"apiVersion: {kubeproxy_config.API_VERSION}\nkind: KubeProxyConfiguration\n"
     "ipvs:\n  strictARP: true\n  scheduler: rr\n  strictARP: false\n", "strictARP"),
])
def test_a_field_written_twice_is_an_error(tmp_path: Path, text: str, key: str) -> None:
    """kube-proxy decodes its file strictly: a duplicated field is an error, not the
    last value silently (which here would let mode: iptables through)."""
    (tmp_path / "c.json").write_text(CLUSTER)
    (tmp_path / "config.conf").write_text(text)
    err = io.StringIO()
    code = main(["plan", "-f", str(tmp_path / "c.json"), "--config", str(tmp_path / "config.conf")],
                backend=Untouchable(), out=io.StringIO(), err=err)
    assert code == 1
    assert err.getvalue().count("\n") == 1 and f"duplicate key {key!r}" in err.getvalue(), err.getvalue()


def test_nodeport_cidrs_are_not_overridden_by_the_bind_address(tmp_path: Path) -> None:
    """kube-proxy serves NodePorts inside nodePortAddresses whatever bindAddress says;
    --node-ip would override the CIDRs, so bindAddress is left out, and said so."""
    doc = kubeadm_config()
    doc.update(bindAddress="10.0.0.5", nodePortAddresses=["192.168.0.0/16"])
    args, warnings = run_args(tmp_path, doc)
    assert args.node_ip == [] and args.nodeport_addresses == "192.168.0.0/16"
    assert len(warnings) == 1 and "bindAddress" in warnings[0]
    doc["nodePortAddresses"] = ["primary"]  # the node's primary IP: bindAddress is that IP
    args, warnings = run_args(tmp_path, doc)
    assert args.node_ip == ["10.0.0.5"] and args.nodeport_addresses == "primary" and warnings == []
    del doc["nodePortAddresses"]
    args, warnings = run_args(tmp_path, doc)
    assert args.node_ip == ["10.0.0.5"] and warnings == []


def test_the_operations_guide_maps_each_field_to_a_flag_this_build_has() -> None:
    """docs/operations.md's KubeProxyConfiguration table: every mapped field is in it
    with its own flag, every flag it names exists, and no row hedges on a flag's
    existence (the table is read by people migrating a cluster)."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "operations.md").read_text()
    section = text.split("### kube-proxy's KubeProxyConfiguration", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    assert rows, "no KubeProxyConfiguration table in docs/operations.md"
    run = set(_options(_subparser(build_parser(), "run")))

    def mapped(schema: dict[str, Any], prefix: str = "") -> dict[str, str]:
        out: dict[str, str] = {}
        for key, rule in schema.items():
            if isinstance(rule, dict):
                out |= mapped(rule, f"{prefix}{key}.")
            elif isinstance(rule, kubeproxy_config.Mapped) and rule.setting is not None:
                out[prefix + key] = rule.setting
        return out

    fields = mapped(dict(kubeproxy_config.FIELDS))
    for name, setting in fields.items():
        row = [r for r in rows if f"`{name}`" in r.split(" | ")[0]]
        assert len(row) == 1, f"{name} is not in the table once: {row}"
        assert f"`--{setting}`" in row[0], row[0]
    for row in rows:
        for flag in re.findall(r"`--([a-z0-9-]+)`", row):
            assert flag in run, f"the table names --{flag}, which `run` does not have: {row}"
        assert "where this build has" not in row, row
