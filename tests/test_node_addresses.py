"""--nodeport-addresses: which local addresses serve NodePorts (svcproxy.node.addresses)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid

import pytest

from svcproxy.node.addresses import NodeAddresses, parse_cidrs, select


def test_select_filters_by_cidr_device_and_scope() -> None:
    pairs = [("eth0", "192.168.1.5"), ("eth0", "fe80::1"), ("kube-ipvs0", "10.96.0.1"), ("eth1", "10.0.0.7"),
             ("eth0", "2001:db8::5"), ("lo", "127.0.0.1"), ("eth0", "192.168.1.5")]
    assert select(pairs, parse_cidrs(["192.168.0.0/16", "2001:db8::/32"])) == ("192.168.1.5", "2001:db8::5")
    everything = parse_cidrs(["0.0.0.0/0", "::/0"])
    # Loopback never: kube-proxy's IPVS mode skips it (IPVS cannot serve NodePorts there).
    assert select(pairs, everything) == ("192.168.1.5", "10.0.0.7", "2001:db8::5")
    assert select([("lo", "127.0.0.1"), ("lo", "::1")], everything, exclude_devices=()) == ()
    assert select(pairs, everything, exclude_devices=("lo", "kube-ipvs0", "eth1")) == ("192.168.1.5", "2001:db8::5")


def test_bad_cidr_is_refused_with_its_text() -> None:
    with pytest.raises(ValueError, match="'10.0.0.0/33' is not a CIDR"):
        parse_cidrs(["10.0.0.0/8", "10.0.0.0/33"])
    with pytest.raises(ValueError, match="at least one CIDR"):
        NodeAddresses([" "])


def test_reads_the_kernel_in_a_namespace_of_its_own() -> None:
    if os.geteuid() != 0 or not shutil.which("ip"):
        pytest.skip("needs root and ip (iproute2)")
    name = f"svcproxy-addr-{uuid.uuid4().hex[:8]}"
    if subprocess.run(["ip", "netns", "add", name], capture_output=True).returncode != 0:
        pytest.skip("cannot create a network namespace here")
    try:
        for cmd in (["link", "set", "lo", "up"], ["addr", "add", "192.168.77.1/32", "dev", "lo"],
                    ["addr", "add", "fd00:77::1/128", "dev", "lo"]):
            subprocess.run(["ip", "netns", "exec", name, "ip", *cmd], check=True)
        code = ("from svcproxy.node.addresses import NodeAddresses as N; "
                "print(N(['192.168.0.0/16', 'fd00::/8'])()); print(N(['0.0.0.0/0'], exclude_devices=['lo'])())")
        out = subprocess.run(["ip", "netns", "exec", name, sys.executable, "-c", code], capture_output=True,
                             text=True, check=True).stdout.splitlines()
        assert out == ["('192.168.77.1', 'fd00:77::1')", "()"]
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)
