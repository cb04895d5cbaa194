"""tests/podspec.py: the OCI configuration the kernel suite runs the image with is the
one a kubelet with containerd would ask for, for the DaemonSet's containers."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from podspec import capabilities, oci_config

DAEMONSET = Path(__file__).resolve().parent.parent / "manifests" / "base" / "daemonset.yaml"
IMAGE = {"Entrypoint": ["svcproxy"], "Cmd": ["run"], "Env": ["PATH=/opt/svcproxy/bin:/usr/bin"], "WorkingDir": "/"}


def pod() -> dict:  # type: ignore[type-arg]
    spec: dict = yaml.safe_load(DAEMONSET.read_text())["spec"]["template"]["spec"]  # type: ignore[type-arg]
    return spec


def test_agent_container() -> None:
    spec = pod()
    config = oci_config(spec, "svcproxy", rootfs="/r", image=IMAGE, node_name="n1",
                        config_maps={"svcproxy": "/cm/svcproxy"}, host_paths={"/opt/cni/bin": "/tmp/bin"})
    process = config["process"]
    assert process["args"] == spec["containers"][0]["command"]  # command replaces the entrypoint and cmd
    assert "NODE_NAME=n1" in process["env"] and "PATH=/opt/svcproxy/bin:/usr/bin" in process["env"]
    assert process["capabilities"]["effective"] == ["CAP_NET_ADMIN", "CAP_SYS_ADMIN"]
    assert config["root"] == {"path": "/r", "readonly": True}
    assert "network" not in {n["type"] for n in config["linux"]["namespaces"]}  # hostNetwork
    assert "/proc/sys" in config["linux"]["readonlyPaths"]
    mounts = {m["destination"]: m for m in config["mounts"]}
    assert mounts["/proc/sys/net"]["source"] == "/proc/sys/net" and "rw" in mounts["/proc/sys/net"]["options"]
    assert mounts["/etc/svcproxy"]["source"] == "/cm/svcproxy" and "ro" in mounts["/etc/svcproxy"]["options"]
    assert "rslave" in mounts["/var/run/netns"]["options"]  # HostToContainer
    # as containerd does: else the root is made private and the bind sees no new namespace
    assert config["linux"]["rootfsPropagation"] == "rslave"


def test_install_cni_container_uses_stand_ins() -> None:
    config = oci_config(pod(), "install-cni", rootfs="/r", image=IMAGE, node_name="n1", config_maps={},
                        host_paths={"/opt/cni/bin": "/tmp/bin", "/etc/cni/net.d": "/tmp/conf"})
    mounts = {m["destination"]: m["source"] for m in config["mounts"] if m["type"] == "bind"}
    assert mounts == {"/host/opt/cni/bin": "/tmp/bin", "/host/etc/cni/net.d": "/tmp/conf"}
    assert config["process"]["capabilities"]["effective"] == []
    assert config["process"]["noNewPrivileges"] is True
    assert "rootfsPropagation" not in config["linux"]  # no HostToContainer mount


def test_capabilities_follow_containerd() -> None:
    assert "CAP_NET_RAW" in capabilities({})
    assert "CAP_NET_RAW" not in capabilities({"capabilities": {"drop": ["NET_RAW"]}})
    assert capabilities({"capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN"]}}) == ["CAP_NET_ADMIN"]


def test_privileged_is_refused() -> None:
    spec = pod()
    spec["containers"][0]["securityContext"] = {"privileged": True}
    with pytest.raises(ValueError, match="privileged"):
        oci_config(spec, "svcproxy", rootfs="/r", image=IMAGE, node_name="n1", config_maps={"svcproxy": "/c"})


def test_service_account_token_is_mounted_read_only_unless_turned_off() -> None:
    spec = pod()
    config = oci_config(spec, "svcproxy", rootfs="/r", image=IMAGE, node_name="n1",
                        config_maps={"svcproxy": "/c"}, service_account="/sa")
    mounts = {m["destination"]: m for m in config["mounts"]}
    token = mounts["/var/run/secrets/kubernetes.io/serviceaccount"]
    assert token["source"] == "/sa" and "ro" in token["options"]
    spec["automountServiceAccountToken"] = False
    config = oci_config(spec, "svcproxy", rootfs="/r", image=IMAGE, node_name="n1",
                        config_maps={"svcproxy": "/c"}, service_account="/sa")
    assert "/var/run/secrets/kubernetes.io/serviceaccount" not in {m["destination"] for m in config["mounts"]}
