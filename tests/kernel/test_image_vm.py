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

Shown, on a node that has not loaded ip_vs (this file unloads it, and loads it again
after): install-cni installs the image's static plugin, which answers VERSION, into a
node's conflist, and cni-keeper keeps running beside the agent; the agent starts while
the node's modprobe fails (as on a kernel without IPVS): it logs one line saying so,
stays unready and changes nothing; once modprobe works, the same agent, with
NET_ADMIN and SYS_ADMIN only (no SYS_MODULE), becomes ready because the kernel loads
ip_vs and its scheduler itself when asked for them; it programs the table, the dummy
device, nftables and sysctls (through the mounted /proc/sys/net), and a ClusterIP
answers from the client namespace; the kubelet rotates the service account token
(kube-proxy's kubeconfig names it by tokenFile) and the fake API server then takes only
the new one: a Service added after that reaches the table; a runtime's CNI ADD through
the installed plugin (host-device, then svcproxy-cni forwarding to the containerised
agent's socket) gives a Pod namespace with a NIC of its own a working ClusterIP;
SIGTERM ends the agent with status 0 and the table as it was. One test, so that the
kernel suite pays for one set of namespaces and one agent start.

Simulated: the kubelet (this file and tests/podspec.py make what it would ask the
runtime for, without cgroups or seccomp; the token volume is written as its atomic
writer does), the API server, and a kernel without IPVS (kernel.modprobe pointed at
/bin/false).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from kustomize_render import render
from podspec import SERVICE_ACCOUNT_DIR, oci_config, write_projected

from .netns import NETNS_DIR, Lab, curl, ip_batch, ipvsadm, ns_cmd, request_many, run, sysctl_get, wait_until
from .test_agent_vm import (ECHO_PORT, ECHO_VIP, START_TIMEOUT, VIP, FakeApi, Procs, cluster,  # noqa: F401
                            guest_state, procs)
from .test_cni_vm import REFERENCE_PLUGINS
from .test_cni_vm import Runtime as CniRuntime
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

    def bundle(self, pod: dict[str, Any], name: str, container: str | None = None, **kw: Any) -> Path:
        """config.json for ``container`` (default: ``name``) of ``pod``, run as ``name``."""
        bundle = self.tmp / f"bundle-{name}"
        bundle.mkdir()
        config = oci_config(pod, container or name, rootfs=self.rootfs, image=self.image_config,
                            node_name=NODE, **kw)
        # The kubelet makes missing DirectoryOrCreate hostPaths (/run/svcproxy, ...).
        for v in pod.get("volumes", []):
            if v.get("hostPath", {}).get("type") == "DirectoryOrCreate":
                path = v["hostPath"]["path"]
                Path(kw.get("host_paths", {}).get(path, path)).mkdir(parents=True, exist_ok=True)
        (bundle / "config.json").write_text(json.dumps(config, indent=1))
        return bundle

    def command(self, *args: str) -> list[str]:
        # nsenter --net, not `ip netns exec`: a runtime on a node runs in the node's
        # mount namespace, where the agent's HostToContainer bind of /var/run/netns is
        # taken from; `ip netns exec` would give crun a mount namespace of its own.
        return ["nsenter", f"--net={NETNS_DIR}/{self.ns}", "crun", "--root", CRUN_ROOT,
                "--cgroup-manager=disabled", *args]

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


@contextlib.contextmanager
def kernel_modprobe(path: str) -> Iterator[None]:
    """The program the kernel runs to load a module it is asked for (kernel.modprobe)."""
    knob = Path("/proc/sys/kernel/modprobe")
    before = knob.read_text().strip()
    knob.write_text(path)
    try:
        yield
    finally:
        knob.write_text(before)


def ipvs_modules() -> list[str]:
    lines = Path("/proc/modules").read_text().splitlines()
    return [line.split()[0] for line in lines if line.startswith("ip_vs")]


@pytest.fixture
def ipvs_unloaded(image: Path) -> Iterator[None]:
    """A node that has not loaded ip_vs (tools/vmtest loads it for the other tests):
    the schedulers, then ip_vs itself, are unloaded here and loaded again afterwards."""
    loaded = ipvs_modules()

    def unload() -> bool:
        # Services in namespaces that are still being torn down hold their schedulers.
        for m in sorted(ipvs_modules(), key=lambda m: m == "ip_vs"):
            subprocess.run(["rmmod", m], capture_output=True)
        return not ipvs_modules()

    wait_until(unload, 120, f"rmmod of {loaded}", interval=2.0)
    assert not Path("/sys/module/ip_vs").exists()
    try:
        yield
    finally:
        for m in loaded:
            subprocess.run(["modprobe", m], capture_output=True)


def daemonset_pod() -> tuple[dict[str, Any], dict[str, Any]]:
    """The overlay's DaemonSet Pod spec and its ConfigMaps by name."""
    objects = render(OVERLAY)
    ds = next(o for o in objects if o["kind"] == "DaemonSet")
    maps = {o["metadata"]["name"]: o["data"] for o in objects if o["kind"] == "ConfigMap"}
    return ds["spec"]["template"]["spec"], maps


class Node:
    """What the kubelet gives the DaemonSet's containers on "the node" (the client
    namespace): ConfigMap directories, the service account token volume, stand-ins for
    /opt/cni/bin and /etc/cni/net.d with a primary conflist, and the fake API server
    in place of the cluster's, requiring the token the volume holds."""

    def __init__(self, net: Net, client: Client, procs: Procs, tmp: Path, eni: str) -> None:
        self.ns, self.tmp = client.ns, tmp
        self.pod, maps = daemonset_pod()
        assert self.pod["hostNetwork"] is True
        self.api = FakeApi(procs, client.ns, tmp / "state.json", cluster(net, ("pod-a", "pod-b")))
        self.server = json.loads(self.api.kubeconfig.read_text())["clusters"][0]["cluster"]["server"]
        self.service_account = tmp / "serviceaccount"
        self.service_account.mkdir()
        self.rotate("token-1")
        self.config_maps = self._config_map_dirs(maps)
        self.host_paths = self._cni_dirs(eni)

    def control(self, action: str) -> None:
        """The fake API server's fault and control endpoint (tests/fakeapi.py)."""
        curl(self.ns, f"{self.server}/fake/{action}", extra=["-X", "POST"])

    def rotate(self, token: str) -> None:
        """The kubelet rotates the projected token; the API server takes only the new one."""
        write_projected(self.service_account, {"token": token, "namespace": "svcproxy", "ca.crt": ""})
        self.control(f"token?value={token}")

    def bundle_kw(self) -> dict[str, Any]:
        return {"config_maps": self.config_maps, "host_paths": self.host_paths,
                "service_account": str(self.service_account)}

    def _config_map_dirs(self, maps: dict[str, dict[str, str]]) -> dict[str, str]:
        """A directory per ConfigMap, as the kubelet writes them. kube-proxy's kubeconfig
        (what the migration's first step copies in) names the fake API server, and, as
        kubeadm writes it, the projected token by tokenFile."""
        kubeconfig = json.loads(self.api.kubeconfig.read_text())
        kubeconfig["users"][0]["user"] = {"tokenFile": f"{SERVICE_ACCOUNT_DIR}/token"}
        dirs = {}
        for name, data in maps.items():
            d = self.tmp / f"configmap-{name}"
            d.mkdir()
            for key, text in data.items():
                (d / key).write_text(json.dumps(kubeconfig) if key == "kubeconfig.conf" else text)
            dirs[name] = str(d)
        return dirs

    def _cni_dirs(self, eni: str) -> dict[str, str]:
        bin_dir, conf_dir = self.tmp / "opt-cni-bin", self.tmp / "etc-cni-net.d"
        bin_dir.mkdir()
        conf_dir.mkdir()
        example = json.loads((REPO / "examples/cni/10-eni.conflist").read_text())
        example["plugins"] = example["plugins"][:1]
        example["plugins"][0]["device"] = eni
        (conf_dir / "10-eni.conflist").write_text(json.dumps(example))
        return {"/opt/cni/bin": str(bin_dir), "/etc/cni/net.d": str(conf_dir)}

    def conflist(self) -> dict[str, Any]:
        return dict(json.loads((Path(self.host_paths["/etc/cni/net.d"]) / "10-eni.conflist").read_text()))

    def plugin(self) -> Path:
        return Path(self.host_paths["/opt/cni/bin"]) / "svcproxy-cni"


def cap_eff(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("CapEff:")).split()[1], 16)


def get(ns: str, url: str) -> tuple[int, str]:
    cp = curl(ns, url, check=False, extra=["-w", "\n%{http_code}"])
    body, _, code = cp.stdout.rpartition("\n")
    return (int(code) if code.isdigit() else 0), body


def install_cni(runtime: Runtime, node: Node, procs: Procs) -> None:
    """install-cni, to completion, as the init container: the image's static plugin,
    answering VERSION, in the node's conflist."""
    (init,) = node.pod["initContainers"]
    bundle = runtime.bundle(node.pod, init["name"], **node.bundle_kw())
    log = node.tmp / "install-cni.log"
    rc = runtime.start(procs, bundle, init["name"], log).wait(timeout=START_TIMEOUT)
    assert rc == 0, log.read_text()
    conflist = node.conflist()
    assert [p["type"] for p in conflist["plugins"]] == ["host-device", "svcproxy-cni"]
    version = subprocess.run([str(node.plugin())], input=json.dumps({"cniVersion": conflist["cniVersion"]}),
                             env={"CNI_COMMAND": "VERSION", "PATH": "/usr/bin:/bin"},
                             capture_output=True, text=True, timeout=60)
    assert version.returncode == 0, version.stderr
    assert conflist["cniVersion"] in json.loads(version.stdout)["supportedVersions"]
    # The static plugin the image carries, byte for byte: it runs without anything on the node.
    assert node.plugin().read_bytes() == (Path(runtime.rootfs) / "usr/lib/svcproxy/svcproxy-cni").read_bytes()
    assert b"/lib64/ld-linux" not in node.plugin().read_bytes()[:4096]  # no program interpreter


def start_agent(runtime: Runtime, node: Node, procs: Procs, name: str) -> tuple[subprocess.Popen[Any], Path]:
    bundle = runtime.bundle(node.pod, name, "svcproxy", **node.bundle_kw())
    log = node.tmp / f"{name}.log"
    return runtime.start(procs, bundle, name, log), log


def wait_ready(node: Node, proc: subprocess.Popen[Any], log: Path) -> None:
    probe = next(c for c in node.pod["containers"] if c["name"] == "svcproxy")["startupProbe"]["httpGet"]

    def ready() -> bool:
        assert proc.poll() is None, f"the agent's container exited ({proc.returncode}):\n{log.read_text()}"
        return get(node.ns, f"http://{probe['host']}:{probe['port']}{probe['path']}")[0] == 200

    t0 = time.monotonic()
    try:
        wait_until(ready, START_TIMEOUT, "the containerised agent's /readyz 200", interval=1.0)
    except AssertionError as e:
        raise AssertionError(f"{e}\n--- agent log ---\n{log.read_text()[-5000:]}\n{guest_state()}") from None
    print(f"containerised agent ready after {time.monotonic() - t0:.1f}s")


NO_IPVS = ("IPVS generic netlink family not found: the ip_vs module is not loaded and the kernel "
           "could not load it (on the node: modprobe ip_vs)")


def test_image_runs_as_the_daemonset(net: Net, client: Client, procs: Procs, runtime: Runtime, lab: Lab,
                                     ipvs_unloaded: None, tmp_path: Path) -> None:
    eni = f"eni{os.urandom(3).hex()}"
    node = Node(net, client, procs, tmp_path, eni)
    install_cni(runtime, node, procs)
    # The Pod's other containers start with the agent: cni-keeper watches the conflist.
    kept = {}
    for c in [c for c in node.pod["containers"] if c["name"] != "svcproxy"]:
        bundle = runtime.bundle(node.pod, c["name"], **node.bundle_kw())
        kept[c["name"]] = runtime.start(procs, bundle, c["name"], tmp_path / f"{c['name']}.log")

    # The agent, first on a node whose kernel cannot load ip_vs (its modprobe fails, as
    # with a kernel built without IPVS): it says so in one line, stays unready and
    # loads nothing.
    with kernel_modprobe("/bin/false"):
        proc, log = start_agent(runtime, node, procs, "svcproxy")
        wait_until(lambda: NO_IPVS in log.read_text() or proc.poll() is not None, START_TIMEOUT,
                   "the agent's line about ip_vs", interval=1.0)
        text = log.read_text()
        assert proc.poll() is None, f"the agent exited ({proc.returncode}):\n{text}"
        assert get(client.ns, "http://127.0.0.1:10256/readyz")[0] != 200
        # Nothing loaded, so no table anywhere (ipvsadm is not asked: it runs modprobe itself).
        assert not Path("/sys/module/ip_vs").exists()
    errors = [line for line in text.splitlines() if "ERROR" in line or "Traceback" in line]
    assert errors and all(NO_IPVS in line for line in errors), text
    # Then the node's modprobe works (the module installed, not loaded; its
    # net.ipv4.vs.conntrack will start at 0: the agent sets it to 1): the same agent,
    # still retrying, gets ip_vs loaded by the kernel and becomes ready without a restart.
    wait_ready(node, proc, log)
    # No SYS_MODULE: the kernel loaded ip_vs itself when the agent asked for its family.
    assert cap_eff(runtime.pid("svcproxy")) == (1 << CAP_NET_ADMIN) | (1 << CAP_SYS_ADMIN)
    assert Path("/sys/module/ip_vs").exists() and Path("/sys/module/ip_vs_rr").exists()
    assert answered(request_many(client.ns, VIP, 80, 6)) == {"pod-a": 3, "pod-b": 3}
    check_node_plumbing(client, log)

    token_rotation(node, net, client)
    cni_add_through_the_installed_plugin(node, net, client, lab, eni)

    # SIGTERM (what the kubelet sends first): exit 0, the table untouched.
    saved = ipvsadm(client.ns, "-Sn")
    subprocess.run(runtime.command("kill", "svcproxy", "TERM"), check=True)
    assert proc.wait(timeout=120) == 0, log.read_text()
    assert "IPVS rules left in place" in log.read_text()
    assert ipvsadm(client.ns, "-Sn") == saved
    assert answered(request_many(client.ns, VIP, 80, 4)) == {"pod-a": 2, "pod-b": 2}
    for name, p in kept.items():
        assert p.poll() is None, f"{name} exited ({p.returncode}):\n{(tmp_path / f'{name}.log').read_text()}"


def check_node_plumbing(client: Client, log: Path) -> None:
    """The table, the dummy device, nftables and sysctls (through the mounted /proc/sys/net)."""
    assert sysctl_get(client.ns, "net.ipv4.vs.conntrack") == "1"
    assert VIP in subprocess.run(ns_cmd(client.ns, ["ip", "-o", "addr", "show", "kube-ipvs0"]),
                                 capture_output=True, text=True, check=True).stdout
    nft = subprocess.run(ns_cmd(client.ns, ["nft", "list", "table", "inet", "svcproxy"]), capture_output=True, text=True)
    assert nft.returncode == 0, nft.stderr
    code, metrics = get(client.ns, "http://127.0.0.1:10256/metrics")
    assert code == 200, metrics
    for part in ("sysctl", "dummy", "nftables"):
        assert f'svcproxy_node_plumbing_errors_total{{part="{part}"}} 0.0' in metrics, metrics
        assert f'svcproxy_node_plumbing_changes_total{{part="{part}"}} 0.0' not in metrics, metrics
    assert "IPVS operation failed" not in log.read_text()


def token_rotation(node: Node, net: Net, client: Client) -> None:
    """The kubelet rotates the token; the API server refuses the old one from then on and
    ends the open watches: a Service added after that reaches the table only if the
    agent's new requests carry the new token, read from the file."""
    node.rotate("token-2")
    node.control("drop")
    node.api.set(cluster(net, ("pod-a", "pod-b"), echo_pods=("pod-c",)))
    wait_until(lambda: f"TCP  {ECHO_VIP}:{ECHO_PORT}" in ipvsadm(client.ns, "-Ln"), 180,
               "the Service added after the token's rotation in the table", interval=1.0)


def cni_add_through_the_installed_plugin(node: Node, net: Net, client: Client, lab: Lab, eni: str) -> None:
    """A Pod with a NIC of its own, set up by the node's conflist as a runtime (libcni)
    runs it: host-device and the svcproxy-cni that install-cni installed, which forwards
    to the containerised agent's socket. The "ENI" is a veth whose other end is on the
    router, so the Pod's packets never pass the node's namespace: the ClusterIP answers
    only through the table the agent programmed in the Pod's own namespace."""
    run(["ip", "link", "add", eni, "netns", client.ns, "type", "veth", "peer", "name", eni + "p",
         "netns", net.router])
    ip_batch(net.router, [f"addr add 10.0.2.1/24 dev {eni}p", f"link set {eni}p up"])
    pod_ns = lab.netns()
    cni = CniRuntime(client.ns, node.conflist(), [REFERENCE_PLUGINS, node.plugin().parent],
                     container_id=os.urandom(16).hex(), netns=f"{NETNS_DIR}/{pod_ns}",
                     pod=("shop", pod_ns, os.urandom(8).hex()))
    assert cni.find("svcproxy-cni") == node.plugin()
    result = cni.add()
    assert [ip["address"] for ip in result["ips"]] == ["10.0.2.10/24"]
    assert f"TCP  {VIP}:80 rr" in ipvsadm(pod_ns, "-Ln")
    assert answered(request_many(pod_ns, VIP, 80, 4)) == {"pod-a": 2, "pod-b": 2}
    cni.delete()  # the agent lets the namespace go; host-device moves the "ENI" back
    run(["ip", "link", "show", eni], ns=client.ns)
