"""The deployment manifests: valid against the Kubernetes schemas, RBAC no wider than
the agent needs, and the DaemonSet wired the way the agent expects."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from cni_build import static_plugin
from svcproxy.cli import build_parser

MANIFESTS = Path(__file__).resolve().parent.parent / "manifests"
#: The base both kustomizations use (manifests/ itself and replace-kube-proxy/).
BASE = MANIFESTS / "base"


def documents() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted(BASE.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


@pytest.mark.parametrize("doc", documents(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_manifest_is_valid_against_the_schema(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, "1.33.0", strict=True)


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    files = {p.name for p in BASE.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files
    assert {p.name for p in MANIFESTS.glob("*.yaml")} == {"kustomization.yaml"}  # the rest is in base/


@pytest.mark.parametrize("directory", ["", "replace-kube-proxy"])
def test_kustomize_renders_what_the_docs_apply(directory: str) -> None:
    """`kubectl apply -k manifests/` and `-k manifests/replace-kube-proxy/` (README):
    rendered by tests/kustomize_render.py, which keeps kustomize's rules on where a
    resource may be (no base containing the kustomization that uses it, no file outside
    its root), and by kubectl's own kustomize where kubectl is installed."""
    import shutil
    import subprocess

    from kustomize_render import render

    objects = render(MANIFESTS / directory)
    assert {o["kind"] for o in objects} >= {"Namespace", "ServiceAccount", "ConfigMap", "DaemonSet"}
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return
    done = subprocess.run([kubectl, "kustomize", str(MANIFESTS / directory)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    rendered = [d for d in yaml.safe_load_all(done.stdout) if d]
    assert sorted((o["kind"], o["metadata"]["name"]) for o in rendered) == \
        sorted((o["kind"], o["metadata"]["name"]) for o in objects)


def test_rbac_is_no_wider_than_needed() -> None:
    role = next(d for d in documents() if d["kind"] == "ClusterRole")
    granted = {(group, resource, verb) for rule in role["rules"] for group in rule["apiGroups"]
               for resource in rule["resources"] for verb in rule["verbs"]}
    needed = {("", r, v) for r in ("services", "nodes") for v in ("get", "list", "watch")}
    needed |= {("discovery.k8s.io", "endpointslices", v) for v in ("get", "list", "watch")}
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


def test_install_cni_init_container(tmp_path: Path) -> None:
    """The init container installs svcproxy-cni from the agent's own image, with the
    host's CNI directories mounted in it alone, before the agent starts; its command
    parses with the installer's parser and, run against stand-ins for those
    directories, does the job."""
    from svcproxy.podns import install
    from svcproxy.podns.cni import DEFAULT_SOCKET

    ds = next(d for d in documents() if d["kind"] == "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    agent = next(c for c in pod["containers"] if c["name"] == "svcproxy")
    (init,) = pod["initContainers"]
    assert init["name"] == "install-cni"
    # An init container (not a native sidecar): it runs to completion before the agent.
    assert "restartPolicy" not in init
    assert sorted(c["name"] for c in pod["containers"]) == ["cni-keeper", "svcproxy"]
    assert init["image"] == agent["image"]
    assert init["securityContext"]["runAsUser"] == 0 and not init["securityContext"].get("privileged")
    # hostPath mounts for the CNI directories, in the init container only.
    volumes = {v["name"]: v for v in pod["volumes"]}
    host_paths = {m["mountPath"]: volumes[m["name"]]["hostPath"]["path"] for m in init["volumeMounts"]}
    assert sorted(host_paths.values()) == ["/etc/cni/net.d", "/opt/cni/bin"]
    assert not any(m.get("readOnly") for m in init["volumeMounts"])
    cni_volumes = {m["name"] for m in init["volumeMounts"]}
    assert not cni_volumes & {m["name"] for m in agent["volumeMounts"]}
    # The command: the installer, pointed at those mounts and at the agent's socket.
    command = init["command"]
    assert command[:3] == ["python", "-m", "svcproxy.podns.install"]
    args = install.build_parser().parse_args(command[3:])
    assert not args.uninstall
    assert host_paths[str(args.bin_dir)] == "/opt/cni/bin"
    assert host_paths[str(args.conf_dir)] == "/etc/cni/net.d"
    assert args.conflist is None  # the runtime's choice: the first *.conflist
    # The plugin runs on the host and dials the socket by its host path: the agent
    # serves it there (its default --cni-socket), in a directory shared with the host.
    assert args.socket == DEFAULT_SOCKET
    agent_args = build_parser().parse_args(agent["command"][1:])
    assert agent_args.cni_socket in (None, DEFAULT_SOCKET)
    socket_dir = str(Path(DEFAULT_SOCKET).parent)
    mount = next(m for m in agent["volumeMounts"] if m["mountPath"] == socket_dir)
    assert volumes[mount["name"]]["hostPath"]["path"] == socket_dir
    # Run it against a fake node: the example conflist without our entry.
    root = tmp_path / "host"
    (root / "opt/cni/bin").mkdir(parents=True)
    (root / "etc/cni/net.d").mkdir(parents=True)
    example = json.loads((MANIFESTS.parent / "examples/cni/10-eni.conflist").read_text())
    example["plugins"] = example["plugins"][:1]
    (root / "etc/cni/net.d/10-eni.conflist").write_text(json.dumps(example))
    local = [str(root / a[len("/host/"):]) if a.startswith("/host/") else a for a in command[3:]]
    static_plugin()  # what the image carries; here: build/svcproxy-cni, the installer's fallback
    assert install.main(local) == 0
    written = json.loads((root / "etc/cni/net.d/10-eni.conflist").read_text())
    assert [p["type"] for p in written["plugins"]] == ["host-device", "svcproxy-cni"]
    assert (root / "opt/cni/bin/svcproxy-cni").stat().st_mode & 0o111


def test_cni_keeper_container() -> None:
    """The container that keeps the entry in the conflist: the installer with --watch,
    the same directories, socket and security context as install-cni, and its own mounts
    of the CNI directories (the agent has none)."""
    from svcproxy.podns import install

    pod = next(d for d in documents() if d["kind"] == "DaemonSet")["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    keeper = next(c for c in pod["containers"] if c["name"] == "cni-keeper")
    assert keeper["image"] == init["image"]
    assert keeper["command"][:3] == ["python", "-m", "svcproxy.podns.install"]
    args = install.build_parser().parse_args(keeper["command"][3:])
    init_args = install.build_parser().parse_args(init["command"][3:])
    assert args.watch and args.missing_ok and not args.uninstall
    assert (args.bin_dir, args.conf_dir, args.socket, args.conflist) == (
        init_args.bin_dir, init_args.conf_dir, init_args.socket, init_args.conflist)
    assert keeper["volumeMounts"] == init["volumeMounts"]
    assert keeper["securityContext"] == init["securityContext"]
    assert keeper["resources"]["limits"]["memory"]


def test_daemonset_takes_kube_proxys_place() -> None:
    """Linux nodes only; no cluster DNS and no iptables lock; a startup probe; requests
    and limits; capabilities instead of a privileged container."""
    ds = next(d for d in documents() if d["kind"] == "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert pod.get("dnsPolicy", "ClusterFirst") == "ClusterFirst"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert not [v for v in volumes.values() if "xtables" in str(v) or "/lib/modules" in str(v)]
    agent = pod["containers"][0]
    assert agent["startupProbe"]["httpGet"]["path"] == "/readyz"
    assert agent["startupProbe"]["periodSeconds"] * agent["startupProbe"]["failureThreshold"] >= 300
    assert "initialDelaySeconds" not in agent["livenessProbe"]
    resources = agent["resources"]
    assert set(resources["requests"]) == {"cpu", "memory"} and "memory" in resources["limits"]
    sc = agent["securityContext"]
    assert not sc.get("privileged") and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN", "SYS_ADMIN"]}
    mounts = {m["mountPath"]: m for m in agent["volumeMounts"]}
    sysctl = mounts["/proc/sys/net"]
    assert not sysctl.get("readOnly") and volumes[sysctl["name"]]["hostPath"]["path"] == "/proc/sys/net"


def test_replace_kube_proxy_overlay() -> None:
    """The migration overlay renders (tests/kustomize_render.py), every object is valid,
    and the DaemonSet runs only on labelled nodes with kube-proxy's kubeconfig, where
    kube-proxy's patch keeps kube-proxy off exactly those nodes."""
    from kustomize_render import render

    overlay = MANIFESTS / "replace-kube-proxy"
    objects = render(overlay)
    for obj in objects:
        kubernetes_validate.validate(obj, "1.33.0", strict=True)
    base = {(d["kind"], d["metadata"]["name"]) for d in documents()}
    assert {(o["kind"], o["metadata"]["name"]) for o in objects} == base | {("ConfigMap", "svcproxy-kubeconfig")}
    ds = next(o for o in objects if o["kind"] == "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux", "svcproxy.io/proxy": "true"}
    agent = pod["containers"][0]
    args = build_parser().parse_args(agent["command"][1:])
    assert str(args.config) == "/etc/svcproxy/config.yaml"
    # --kubeconfig names the generated ConfigMap's file, mounted in the agent's container.
    volumes = {v["name"]: v for v in pod["volumes"]}
    mount = next(m for m in agent["volumeMounts"] if str(args.kubeconfig).startswith(m["mountPath"] + "/"))
    config_map = next(o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "svcproxy-kubeconfig")
    assert volumes[mount["name"]]["configMap"]["name"] == "svcproxy-kubeconfig"
    assert config_map["metadata"]["namespace"] == ds["metadata"]["namespace"]
    kubeconfig = yaml.safe_load(config_map["data"][Path(str(args.kubeconfig)).name])
    # kubeadm's layout: the Pod's own service account token and CA, valid for svcproxy's too.
    user = kubeconfig["users"][0]["user"]
    assert user["tokenFile"] == "/var/run/secrets/kubernetes.io/serviceaccount/token"
    assert kubeconfig["clusters"][0]["cluster"]["server"].startswith("https://")
    # No proxy but this one on the node: the init container must not wait for a conflist
    # that the primary CNI may only write once Services work.
    from svcproxy.podns import install

    (init,) = pod["initContainers"]
    assert install.build_parser().parse_args(init["command"][3:]).missing_ok
    # kube-proxy's side: required node affinity on the absence of the same label.
    patch = yaml.safe_load((overlay / "kube-proxy-affinity.yaml").read_text())
    affinity = patch["spec"]["template"]["spec"]["affinity"]["nodeAffinity"]
    (term,) = affinity["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert term["matchExpressions"] == [{"key": "svcproxy.io/proxy", "operator": "DoesNotExist"}]


def test_overlay_sets_the_image() -> None:
    """The overlay's images: entry reaches every container (install-cni runs the agent's image)."""
    import copy

    from kustomize_render import render

    overlay = MANIFESTS / "replace-kube-proxy"
    kustomization = yaml.safe_load((overlay / "kustomization.yaml").read_text())
    (image,) = kustomization["images"]
    ds = next(o for o in render(overlay) if o["kind"] == "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    want = f"{image['newName']}:{image['newTag']}"
    assert {c["image"] for c in pod["initContainers"] + pod["containers"]} == {want}
    base = next(d for d in documents() if d["kind"] == "DaemonSet")
    moved = {**image, "newName": "registry.example/svcproxy", "newTag": "9.9"}
    from kustomize_render import _retagged

    retagged = _retagged(moved, copy.deepcopy(base))["spec"]["template"]["spec"]
    assert {c["image"] for c in retagged["initContainers"] + retagged["containers"]} == {"registry.example/svcproxy:9.9"}
