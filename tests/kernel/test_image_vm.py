"""The agent's image, run in the VM the way the DaemonSet runs it.

tools/image builds the image from the Dockerfile (buildah, on a Debian base made with
mmdebstrap) and unpacks its root filesystem; `make test-kernel` passes its directory
as SVCPROXY_IMAGE. Here crun runs that root filesystem with the OCI configuration a
kubelet with containerd would make from the migration overlay's DaemonSet
(manifests/replace-kube-proxy, rendered by tests/kustomize_render.py; translated by
tests/podspec.py): the same command and arguments, env, mounts, host network,
capabilities and read-only root. "The node" is the client namespace of
test_traffic.py's topology: the containers run in it as host-network Pods run in the
node's, and reach the fake API server on its 127.0.0.1 through the kubeconfig that
stands in for kube-proxy's.

Shown: install-cni installs the image's static plugin, which answers VERSION, into a
node's conflist, and cni-keeper keeps running beside the agent;
the agent, with NET_ADMIN and SYS_ADMIN only, becomes ready (/readyz 200), programs
the table, the dummy device, nftables and sysctls (through the mounted /proc/sys/net),
and a ClusterIP answers from the client namespace; SIGTERM ends it with status 0 and
the table as it was. Simulated: the kubelet (this file and tests/podspec.py make what
it would ask the runtime for, without cgroups, seccomp or the service account token)
and the API server.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from kustomize_render import render
from podspec import oci_config

from .netns import curl, ipvsadm, ns_cmd, request_many, sysctl, sysctl_get, wait_until
from .test_agent_vm import START_TIMEOUT, VIP, FakeApi, Procs, cluster, guest_state, procs  # noqa: F401
from .test_traffic import Client, Net, answered, client, net  # noqa: F401 (fixtures)

pytestmark = pytest.mark.kernel

REPO = Path(__file__).resolve().parents[2]
OVERLAY = REPO / "manifests" / "replace-kube-proxy"
NODE = "node-a"
CRUN_ROOT = "/run/svcproxy-test-crun"
#: Capability bits (linux/capability.h) of what the DaemonSet adds.
CAP_NET_ADMIN, CAP_SYS_ADMIN = 12, 21


@pytest.fixture
def image() -> Path:
    where = os.environ.get("SVCPROXY_IMAGE")
    if not where:
        pytest.skip("SVCPROXY_IMAGE is not set: `make test-kernel` builds the image with tools/image and sets it")
    path = Path(where)
    assert (path / "done").exists(), f"{path}: not a complete tools/image result"
    return path


class Runtime:
    """crun with a state directory of its own; every container it started is deleted."""

    def __init__(self, ns: str, image: Path, tmp: Path) -> None:
        self.ns, self.tmp = ns, tmp
        self.rootfs = str(image / "rootfs")
        self.image_config = json.loads((image / "image.json").read_text())
        self.names: list[str] = []

    def bundle(self, pod: dict[str, Any], name: str, **kw: Any) -> Path:
        bundle = self.tmp / f"bundle-{name}"
        bundle.mkdir()
        config = oci_config(pod, name, rootfs=self.rootfs, image=self.image_config, node_name=NODE, **kw)
        # The kubelet makes missing DirectoryOrCreate hostPaths (/run/svcproxy, ...).
        for v in pod.get("volumes", []):
            if v.get("hostPath", {}).get("type") == "DirectoryOrCreate":
                path = v["hostPath"]["path"]
                Path(kw.get("host_paths", {}).get(path, path)).mkdir(parents=True, exist_ok=True)
        (bundle / "config.json").write_text(json.dumps(config, indent=1))
        return bundle

    def command(self, *args: str) -> list[str]:
        # `ip netns exec` gives the command a fresh /sys without the cgroup file system,
        # which crun looks at even when it is told to manage no cgroups.
        script = 'mountpoint -q /sys/fs/cgroup || mount -t cgroup2 cgroup2 /sys/fs/cgroup; exec crun "$@"'
        return ns_cmd(self.ns, ["sh", "-c", script, "crun", "--root", CRUN_ROOT, "--cgroup-manager=disabled", *args])

    def start(self, procs: Procs, bundle: Path, name: str, log: Path) -> subprocess.Popen[Any]:
        self.names.append(name)
        with open(log, "w") as f:
            return procs.popen(self.command("run", "--bundle", str(bundle), name),
                               stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT)

    def pid(self, name: str) -> int:
        state = subprocess.run(self.command("state", name), capture_output=True, text=True, check=True)
        return int(json.loads(state.stdout)["pid"])

    def close(self) -> None:
        for name in self.names:
            subprocess.run(self.command("delete", "--force", name), capture_output=True)


@pytest.fixture
def runtime(client: Client, image: Path, tmp_path: Path) -> Iterator[Runtime]:
    rt = Runtime(client.ns, image, tmp_path)
    try:
        yield rt
    finally:
        rt.close()


def daemonset_pod() -> tuple[dict[str, Any], dict[str, Any]]:
    """The overlay's DaemonSet Pod spec and its ConfigMaps by name."""
    objects = render(OVERLAY)
    ds = next(o for o in objects if o["kind"] == "DaemonSet")
    maps = {o["metadata"]["name"]: o["data"] for o in objects if o["kind"] == "ConfigMap"}
    return ds["spec"]["template"]["spec"], maps


def config_map_dirs(maps: dict[str, dict[str, str]], tmp: Path, kubeconfig: Path) -> dict[str, str]:
    """A directory per ConfigMap, as the kubelet writes them; kube-proxy's kubeconfig is
    replaced by the fake API server's (what the migration's first step copies in)."""
    dirs = {}
    for name, data in maps.items():
        d = tmp / f"configmap-{name}"
        d.mkdir()
        for key, text in data.items():
            (d / key).write_text(kubeconfig.read_text() if key == "kubeconfig.conf" else text)
        dirs[name] = str(d)
    return dirs


def node_cni_dirs(tmp: Path) -> dict[str, str]:
    """Stand-ins for the node's /opt/cni/bin and /etc/cni/net.d, with a primary conflist."""
    bin_dir, conf_dir = tmp / "opt-cni-bin", tmp / "etc-cni-net.d"
    bin_dir.mkdir()
    conf_dir.mkdir()
    example = json.loads((REPO / "examples/cni/10-eni.conflist").read_text())
    example["plugins"] = example["plugins"][:1]
    (conf_dir / "10-eni.conflist").write_text(json.dumps(example))
    return {"/opt/cni/bin": str(bin_dir), "/etc/cni/net.d": str(conf_dir)}


def cap_eff(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("CapEff:")).split()[1], 16)


def test_image_runs_as_the_daemonset(net: Net, client: Client, procs: Procs, runtime: Runtime,
                                     tmp_path: Path) -> None:
    pod, maps = daemonset_pod()
    assert pod["hostNetwork"] is True
    api = FakeApi(procs, client.ns, tmp_path / "state.json", cluster(net, ("pod-a", "pod-b")))
    config_maps = config_map_dirs(maps, tmp_path, api.kubeconfig)
    host_paths = node_cni_dirs(tmp_path)

    # install-cni, to completion, before the agent (as an init container).
    (init,) = pod["initContainers"]
    bundle = runtime.bundle(pod, init["name"], config_maps=config_maps, host_paths=host_paths)
    log = tmp_path / "install-cni.log"
    rc = runtime.start(procs, bundle, init["name"], log).wait(timeout=START_TIMEOUT)
    assert rc == 0, log.read_text()
    conflist = json.loads((Path(host_paths["/etc/cni/net.d"]) / "10-eni.conflist").read_text())
    assert [p["type"] for p in conflist["plugins"]] == ["host-device", "svcproxy-cni"]
    plugin = Path(host_paths["/opt/cni/bin"]) / "svcproxy-cni"
    version = subprocess.run([str(plugin)], input=json.dumps({"cniVersion": conflist["cniVersion"]}),
                             env={"CNI_COMMAND": "VERSION", "PATH": "/usr/bin:/bin"},
                             capture_output=True, text=True, timeout=60)
    assert version.returncode == 0, version.stderr
    assert conflist["cniVersion"] in json.loads(version.stdout)["supportedVersions"]
    # The static plugin the image carries, byte for byte: it runs without anything on the node.
    assert plugin.read_bytes() == (Path(runtime.rootfs) / "usr/lib/svcproxy/svcproxy-cni").read_bytes()
    assert b"/lib64/ld-linux" not in plugin.read_bytes()[:4096]  # no program interpreter

    # The Pod's other containers start with the agent: cni-keeper watches the conflist.
    keepers = [c for c in pod["containers"] if c["name"] != "svcproxy"]
    kept = {}
    for c in keepers:
        bundle = runtime.bundle(pod, c["name"], config_maps=config_maps, host_paths=host_paths)
        kept[c["name"]] = runtime.start(procs, bundle, c["name"], tmp_path / f"{c['name']}.log")

    # The agent: sysctls it sets start elsewhere, to show it writes them.
    sysctl(client.ns, "net.ipv4.vs.conntrack", 0)
    agent = next(c for c in pod["containers"] if c["name"] == "svcproxy")
    bundle = runtime.bundle(pod, agent["name"], config_maps=config_maps, host_paths=host_paths)
    log = tmp_path / "agent.log"
    proc = runtime.start(procs, bundle, agent["name"], log)
    probe = agent["startupProbe"]["httpGet"]

    def ready() -> bool:
        assert proc.poll() is None, f"the agent's container exited ({proc.returncode}):\n{log.read_text()}"
        cp = curl(client.ns, f"http://{probe['host']}:{probe['port']}{probe['path']}", check=False,
                  extra=["-w", "\n%{http_code}"])
        return cp.stdout.endswith("\n200")

    t0 = time.monotonic()
    try:
        wait_until(ready, START_TIMEOUT, "the containerised agent's /readyz 200", interval=1.0)
    except AssertionError as e:
        raise AssertionError(f"{e}\n--- agent log ---\n{log.read_text()[-5000:]}\n{guest_state()}") from None
    print(f"containerised agent ready after {time.monotonic() - t0:.1f}s")
    pid = runtime.pid(agent["name"])
    assert cap_eff(pid) == (1 << CAP_NET_ADMIN) | (1 << CAP_SYS_ADMIN)
    assert answered(request_many(client.ns, VIP, 80, 6)) == {"pod-a": 3, "pod-b": 3}
    assert sysctl_get(client.ns, "net.ipv4.vs.conntrack") == "1"
    assert VIP in subprocess.run(ns_cmd(client.ns, ["ip", "-o", "addr", "show", "kube-ipvs0"]),
                                 capture_output=True, text=True, check=True).stdout
    nft = subprocess.run(ns_cmd(client.ns, ["nft", "list", "table", "inet", "svcproxy"]), capture_output=True, text=True)
    assert nft.returncode == 0, nft.stderr
    metrics = curl(client.ns, f"http://127.0.0.1:{probe['port']}/metrics").stdout
    for part in ("sysctl", "dummy", "nftables"):
        assert f'svcproxy_node_plumbing_errors_total{{part="{part}"}} 0.0' in metrics, metrics
        assert f'svcproxy_node_plumbing_changes_total{{part="{part}"}} 0.0' not in metrics, metrics
    assert "IPVS operation failed" not in log.read_text()

    # SIGTERM (what the kubelet sends first): exit 0, the table untouched.
    saved = ipvsadm(client.ns, "-Sn")
    subprocess.run(runtime.command("kill", agent["name"], "TERM"), check=True)
    assert proc.wait(timeout=120) == 0, log.read_text()
    assert "IPVS rules left in place" in log.read_text()
    assert ipvsadm(client.ns, "-Sn") == saved
    assert answered(request_many(client.ns, VIP, 80, 4)) == {"pod-a": 2, "pod-b": 2}
    for name, p in kept.items():
        assert p.poll() is None, f"{name} exited ({p.returncode}):\n{(tmp_path / f'{name}.log').read_text()}"
