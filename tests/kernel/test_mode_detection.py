"""``--pod-netns-mode`` decided against the IPVS the VM really runs.

svcproxy reads ``/sys/module/ip_vs/parameters/mode`` to choose between kernel mode
(the share-namespace ip_vs loaded with ``mode=2``) and replicate mode. The file only
exists once ip_vs is loaded, and on a node ip_vs is often loaded by svcproxy's own
first IPVS request (the kernel's module autoload, with the node's modprobe
configuration: ``options ip_vs mode=2``). So the mode must be read after that
request, never before: reading first would take a share-namespace node for a stock
one. These tests run in every boot (stock IPVS; the built module with ``mode=0``;
with ``mode=2``) and expect what that IPVS supports:

- ``auto`` with ip_vs not loaded: svcproxy's first request loads it (in the built
  boots through a modprobe configuration that loads the built module with the boot's
  mode, as a node's modprobe.d would), and only then is the mode decided: kernel on
  mode 2 (the Pod namespace untouched), replicate on mode 0 and on the stock module
  (the Pod namespace programmed);
- the mode that cannot work is refused with one line on stderr and exit status 1,
  nothing changed: ``kernel`` where ip_vs does not share its table, ``replicate``
  where it does.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Iterator

import pytest

from k8s_objects import endpoint, endpoint_slice, node, service, slice_port, svc_port

from .netns import NETNS_DIR, Lab, ipvsadm, run, wait_until

pytestmark = pytest.mark.kernel

SVCPROXY = [sys.executable, "-m", "svcproxy"]
MODE_PARAM = Path("/sys/module/ip_vs/parameters/mode")
BUILT = os.environ.get("VMTEST_IPVS_MODULES", "")
# What this boot's ip_vs was loaded with: None for the kernel's own module (no parameter).
BOOT_MODE = os.environ.get("VMTEST_IPVS_MODE", "0") if BUILT else None
KERNEL_MODPROBE = Path("/proc/sys/kernel/modprobe")
VIP = "10.96.0.40"


def ipvs_modules() -> list[str]:
    """Loaded IPVS modules, helpers first (the order they can be unloaded in)."""
    names = [line.split()[0] for line in Path("/proc/modules").read_text().splitlines()]
    ours = [n for n in names if n.startswith("ip_vs") or n == "xt_ipvs"]
    return sorted(ours, key=lambda n: n == "ip_vs")


def write_cluster(path: Path) -> Path:
    """One Service (TCP 80 -> 8080) with one endpoint."""
    objs = [node("node-a"),
            service("web", cluster_ips=(VIP,), ports=[svc_port("http", 80, target_port=8080)]),
            endpoint_slice("web", "web-v4", ports=[slice_port("http", 8080)],
                           endpoints=[endpoint("10.244.9.2", pod="web-0")])]
    path.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": objs}))
    return path


def svcproxy(*args: str) -> tuple[int, str, str]:
    cp = run([*SVCPROXY, *args], check=False, timeout=900)
    return cp.returncode, cp.stdout, cp.stderr


@pytest.fixture
def pod(lab: Lab) -> str:
    """A Pod namespace with a NIC of its own (a veth) and an address, by path."""
    ns, peer = lab.netns(), lab.netns()
    lab.connect(ns, peer, ["10.244.8.2/24"], ["10.244.8.1/24"])
    return f"{NETNS_DIR}/{ns}"


@pytest.fixture
def ipvs_unloaded(tmp_path: Path) -> Iterator[None]:
    """No IPVS module loaded; the kernel's module autoload set up to load what this
    boot runs. Afterwards the modules that were loaded are loaded again."""
    before = ipvs_modules()
    modprobe = KERNEL_MODPROBE.read_text().strip()
    ipvsadm(None, "-C")  # a service holds its scheduler module

    def unloaded() -> bool:  # a namespace deleted by an earlier test may still be going (its services too)
        run(["rmmod", *ipvs_modules()], check=False)
        return not ipvs_modules()

    wait_until(unloaded, 60, f"rmmod {' '.join(before)}")
    if BUILT:  # what dkms + "options ip_vs mode=N" give a node, for the modules of this boot
        conf = tmp_path / "modprobe.conf"
        conf.write_text("".join(f"install {ko.stem} /sbin/insmod {ko}{' mode=' + str(BOOT_MODE) if ko.stem == 'ip_vs' else ''}\n"
                                for ko in sorted(Path(BUILT).glob("*.ko"))))
        wrapper = tmp_path / "modprobe"
        wrapper.write_text(f"#!/bin/sh\nexec {modprobe} -C {conf} \"$@\"\n")
        wrapper.chmod(0o755)
        KERNEL_MODPROBE.write_text(str(wrapper))
    try:
        yield
    finally:
        KERNEL_MODPROBE.write_text(modprobe)
        ipvsadm(None, "-C")
        loaded = set(ipvs_modules())
        for m in reversed(before):  # ip_vs first
            if m in loaded:
                continue
            if BUILT:
                args = [f"mode={BOOT_MODE}"] if m == "ip_vs" else []
                run(["insmod", f"{BUILT}/{m}.ko", *args])
            else:
                run(["modprobe", m])
        assert sorted(ipvs_modules()) == sorted(before)


def test_auto_reads_the_mode_after_its_first_request_loaded_ip_vs(ipvs_unloaded: None, pod: str,
                                                                   tmp_path: Path) -> None:
    rc, out, err = svcproxy("sync", "-f", str(write_cluster(tmp_path / "c.json")), "--node", "node-a",
                            "--pod-netns", pod)

    assert ipvs_modules(), "svcproxy's first IPVS request did not load ip_vs"
    if BOOT_MODE is None:
        assert not MODE_PARAM.exists()
    else:
        assert MODE_PARAM.read_text().strip() == BOOT_MODE
        assert "O" in Path("/sys/module/ip_vs/taint").read_text(), "not the built ip_vs"
    assert rc == 0, out + err
    assert f"{VIP}:80" in ipvsadm(None, "-Sn")
    pod_table = run(["nsenter", f"--net={pod}", "ipvsadm", "-Sn"]).stdout
    if BOOT_MODE == "2":
        assert "Pod network namespace mode kernel: programming the node table only" in err, err
        assert f"{MODE_PARAM} reads '2'" in err and "(auto)" in err, err
        assert f"sync netns {pod}: shares the node's table (kernel mode), nothing to program" in out, out
        assert pod_table == ""
    else:
        assert "Pod network namespace mode replicate" in err and "(auto)" in err, err
        said = f"{MODE_PARAM} reads '0'" if BOOT_MODE == "0" else f"{MODE_PARAM} does not exist"
        assert said in err, err
        assert f"sync netns {pod}: 2 operations applied, 0 failed" in out, out
        assert f"{VIP}:80" in pod_table


def test_the_mode_that_cannot_work_here_is_refused(pod: str, tmp_path: Path) -> None:
    """kernel where ip_vs has its tables per namespace, replicate where it shares one:
    one line, exit 1, and neither the node's table nor the Pod's changed."""
    ipvsadm(None, "-C")
    ipvsadm(None, "-A", "-t", "10.96.0.41:80", "-s", "rr")  # something that a sync would delete
    try:
        before = ipvsadm(None, "-Sn")
        refused = "replicate" if BOOT_MODE == "2" else "kernel"
        rc, out, err = svcproxy("sync", "-f", str(write_cluster(tmp_path / "c.json")), "--node", "node-a",
                                "--pod-netns", pod, "--pod-netns-mode", refused)
        assert rc == 1, out + err
        assert out == ""
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"svcproxy: error: --pod-netns-mode {refused} "), err
        if refused == "replicate":
            assert "cannot work here" in err and f"{MODE_PARAM} reads '2'" in err, err
        else:
            assert "needs the share-namespace ip_vs loaded with mode=2" in err, err
            assert (f"{MODE_PARAM} reads '0'" if BOOT_MODE == "0" else f"{MODE_PARAM} does not exist") in err, err
        assert ipvsadm(None, "-Sn") == before
        assert run(["nsenter", f"--net={pod}", "ipvsadm", "-Sn"]).stdout == ""
        assert run(["ip", "route", "show", "table", "all", "proto", "0x9c"], ns=Path(pod).name).stdout == ""
    finally:
        ipvsadm(None, "-C")
