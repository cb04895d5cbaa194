"""The deployment manifests: valid against the Kubernetes schemas, RBAC no wider than
the agent needs, and the DaemonSet wired the way the agent expects."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from svcproxy.cli import build_parser

MANIFESTS = Path(__file__).resolve().parent.parent / "manifests"


def documents() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted(MANIFESTS.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


@pytest.mark.parametrize("doc", documents(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_manifest_is_valid_against_the_schema(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, "1.33.0", strict=True)


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    files = {p.name for p in MANIFESTS.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files


def test_rbac_is_no_wider_than_needed() -> None:
    role = next(d for d in documents() if d["kind"] == "ClusterRole")
    granted = {(group, resource, verb) for rule in role["rules"] for group in rule["apiGroups"]
               for resource in rule["resources"] for verb in rule["verbs"]}
    needed = {("", r, v) for r in ("services", "nodes") for v in ("get", "list", "watch")}
    needed |= {("discovery.k8s.io", "endpointslices", v) for v in ("get", "list", "watch")}
    needed |= {(g, "events", v) for g in ("", "events.k8s.io") for v in ("create", "patch")}
    assert granted == needed
    assert not any("*" in str(rule) for rule in role["rules"])
    binding = next(d for d in documents() if d["kind"] == "ClusterRoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "svcproxy", "namespace": "svcproxy"}]


def test_daemonset_matches_the_agent(tmp_path: Path) -> None:
    ds = next(d for d in documents() if d["kind"] == "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True and pod["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists"} in pod["tolerations"]
    container = pod["containers"][0]
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    env = {e["name"]: e for e in container["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/var/run/netns"]["mountPropagation"] == "HostToContainer"
    # The command line parses with the agent's own parser, and its config file parses too.
    command = container["command"]
    assert command[0] == "svcproxy"
    args = build_parser().parse_args(command[1:])
    assert args.command == "run" and str(args.config) == "/etc/svcproxy/config.yaml"
    config = next(d for d in documents() if d["kind"] == "ConfigMap")
    settings = yaml.safe_load(config["data"]["config.yaml"])
    from svcproxy.cli import _subparser
    from svcproxy.config import config_tokens

    tmp = tmp_path / "config.yaml"
    tmp.write_text(yaml.safe_dump(settings))
    tokens = config_tokens(_subparser(build_parser(), "run"), tmp, [])
    parsed = build_parser().parse_args(["run", *tokens])
    assert parsed.sync_period == 30 and parsed.health_bind == "0.0.0.0:10256"
