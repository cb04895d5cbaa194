"""``python -m svcproxy.podns.install`` (the DaemonSet's install-cni init container)
against temporary CNI directories: what it writes, what it leaves alone, and how it
refuses a node whose configuration it cannot safely extend."""

from __future__ import annotations

import io
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from cni_build import static_plugin
from svcproxy.podns import install as inst
from svcproxy.podns.cni import DEFAULT_SOCKET, SUPPORTED_VERSIONS

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "cni" / "10-eni.conflist"
PLUGIN = "svcproxy-cni"


def eni_conflist(*, ours: bool = False) -> dict[str, Any]:
    """examples/cni/10-eni.conflist with a second plugin, and without our entry unless asked."""
    doc = json.loads(EXAMPLE.read_text())
    host_device, mine = doc["plugins"]
    assert mine["type"] == PLUGIN
    doc["plugins"] = [host_device, {"type": "tuning", "sysctl": {"net.core.somaxconn": "500"}}]
    if ours:
        doc["plugins"].append(mine)
    return dict(doc)


class Node:
    """A node's /opt/cni/bin and /etc/cni/net.d under a temporary directory."""

    def __init__(self, root: Path) -> None:
        self.bin = root / "opt" / "cni" / "bin"
        self.conf = root / "etc" / "cni" / "net.d"
        self.bin.mkdir(parents=True)
        self.conf.mkdir(parents=True)
        (self.bin / "host-device").write_bytes(b"\x7fELF not really\n")
        (self.bin / "host-device").chmod(0o755)

    def write(self, name: str, doc: Any, mode: int = 0o644) -> Path:
        path = self.conf / name
        path.write_text(doc if isinstance(doc, str) else json.dumps(doc, indent=4) + "\n")
        path.chmod(mode)
        return path

    def read(self, name: str) -> Any:
        return json.loads((self.conf / name).read_text())

    def run(self, *args: str) -> tuple[int, str, str]:
        """The installer; the static plugin is the one `make cni-plugin` builds."""
        out, err = io.StringIO(), io.StringIO()
        if not {"--python", "--plugin", "--uninstall"} & set(args):
            args = ("--plugin", str(static_plugin()), *args)
        rc = inst.main(["--bin-dir", str(self.bin), "--conf-dir", str(self.conf), *args], out=out, err=err)
        return rc, out.getvalue(), err.getvalue()

    def listing(self) -> dict[str, tuple[bytes, int, int]]:
        """Every file with its bytes, mode and mtime: what "untouched" is checked against."""
        return {str(p.relative_to(self.bin.parents[2])): (p.read_bytes(), p.stat().st_mode, p.stat().st_mtime_ns)
                for d in (self.bin, self.conf) for p in sorted(d.iterdir())}


@pytest.fixture
def node(tmp_path: Path) -> Node:
    return Node(tmp_path)


def types(doc: dict[str, Any]) -> list[str]:
    return [p["type"] for p in doc["plugins"]]


# --- install --------------------------------------------------------------------------


def test_installs_the_binary_and_appends_the_plugin_last(node: Node) -> None:
    original = eni_conflist()
    node.write("10-eni.conflist", original)
    rc, out, err = node.run()
    assert rc == 0, err
    assert err == ""
    assert f"installed {node.bin / PLUGIN}" in out
    assert f"added {PLUGIN} as the last plugin of {node.conf / '10-eni.conflist'}" in out
    doc = node.read("10-eni.conflist")
    assert types(doc) == ["host-device", "tuning", PLUGIN]
    assert doc["plugins"][:2] == original["plugins"]  # the others, untouched and in order
    assert doc["plugins"][-1] == {"type": PLUGIN, "socket": DEFAULT_SOCKET}
    assert {k: v for k, v in doc.items() if k != "plugins"} == {"cniVersion": "1.0.0", "name": "eni-net"}
    exe = node.bin / PLUGIN
    assert stat.S_IMODE(exe.stat().st_mode) == 0o755
    assert exe.read_bytes() == static_plugin().read_bytes()  # the static plugin, as built
    assert (node.bin / "host-device").read_bytes() == b"\x7fELF not really\n"
    assert sorted(p.name for p in node.conf.iterdir()) == ["10-eni.conflist"]  # no temporary file left


def test_the_installed_file_is_a_working_plugin(node: Node) -> None:
    """Installed with this interpreter (isolated, no site-packages): the copy runs on
    its own, as the container runtime runs it on the host."""
    node.write("10-eni.conflist", eni_conflist())
    rc, _, err = node.run("--python", f"{sys.executable} -IS")
    assert rc == 0, err
    exe = node.bin / PLUGIN
    assert exe.read_text().splitlines()[0] == f"#!{sys.executable} -IS"
    done = subprocess.run([str(exe)], input='{"cniVersion": "1.0.0"}', capture_output=True, text=True,
                          env={"CNI_COMMAND": "VERSION"}, cwd="/", timeout=30)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"cniVersion": "1.0.0", "supportedVersions": list(SUPPORTED_VERSIONS)}
    # ADD without the agent: a CNI error (try again later) naming the socket, not a traceback
    conf = {**node.read("10-eni.conflist")["plugins"][-1], "cniVersion": "1.0.0", "name": "eni-net",
            "socket": str(node.conf / "no-agent.sock"), "prevResult": {"cniVersion": "1.0.0"}}
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "abc", "CNI_NETNS": "/proc/1/ns/net", "CNI_IFNAME": "eth0",
           "CNI_PATH": str(node.bin)}
    done = subprocess.run([str(exe)], input=json.dumps(conf), capture_output=True, text=True, env=env, timeout=30)
    assert done.returncode == 1
    assert json.loads(done.stdout)["code"] == 11 and "no-agent.sock" in json.loads(done.stdout)["msg"]


def test_a_second_run_changes_nothing(node: Node) -> None:
    node.write("10-eni.conflist", eni_conflist())
    assert node.run()[0] == 0
    before = node.listing()
    rc, out, err = node.run()
    assert (rc, err) == (0, "")
    assert f"{node.bin / PLUGIN} is up to date" in out
    assert f"{node.conf / '10-eni.conflist'} already ends with {PLUGIN}" in out
    assert node.listing() == before  # same bytes, modes and mtimes: nothing rewritten


def test_an_existing_entry_is_merged_moved_last_and_deduplicated(node: Node) -> None:
    """A hand-written entry keeps its settings (flags win for what they set), moves to
    the end, and a second copy disappears."""
    doc = eni_conflist()
    handwritten = {"type": PLUGIN, "socket": "/old.sock", "timeout": 12,
                   "selector": {"annotation": "svcproxy.io/share-ns", "value": "true"},
                   "capabilities": {"io.kubernetes.cri.pod-annotations": True}}
    doc["plugins"] = [doc["plugins"][0], handwritten, doc["plugins"][1], {"type": PLUGIN}]
    node.write("10-eni.conflist", doc)
    rc, _, err = node.run("--socket", "/run/svcproxy/cni.sock")
    assert rc == 0, err
    new = node.read("10-eni.conflist")
    assert types(new) == ["host-device", "tuning", PLUGIN]
    assert new["plugins"][-1] == {**handwritten, "socket": "/run/svcproxy/cni.sock"}


def test_selector_and_timeout_flags(node: Node) -> None:
    node.write("10-eni.conflist", eni_conflist())
    rc, _, err = node.run("--select-annotation", "svcproxy.io/share-ns=true", "--plugin-timeout", "20",
                          "--socket", "/var/run/svcproxy/cni.sock")
    assert rc == 0, err
    assert node.read("10-eni.conflist")["plugins"][-1] == {
        "type": PLUGIN, "socket": "/var/run/svcproxy/cni.sock", "timeout": 20,
        "selector": {"annotation": "svcproxy.io/share-ns", "value": "true"},
        "capabilities": {"io.kubernetes.cri.pod-annotations": True},
    }
    # the example conflist's own entry is what these flags produce (key order aside)
    example = json.loads(EXAMPLE.read_text())["plugins"][-1]
    rc, _, err = node.run("--select-annotation", "svcproxy.io/share-ns=true", "--plugin-timeout", "30")
    assert rc == 0, err
    assert node.read("10-eni.conflist")["plugins"][-1] == example
    # back to every Pod: the selector goes, the declared capability may stay
    assert node.run("--select-all")[0] == 0
    assert node.read("10-eni.conflist")["plugins"][-1]["selector"] == "all"
    # a timeout the plugin would refuse is refused before anything is written
    before = node.listing()
    rc, _, err = node.run("--plugin-timeout", "0")
    assert rc == 1 and "would be refused by the plugin" in err and "timeout" in err
    assert node.listing() == before


def test_the_first_conflist_in_lexical_order_is_edited(node: Node) -> None:
    other = eni_conflist()
    other["name"] = "backup"
    node.write("20-backup.conflist", other)
    node.write("10-eni.conflist", eni_conflist())
    node.write("99-loopback.conf", {"cniVersion": "1.0.0", "name": "lo", "type": "loopback"})
    assert node.run()[0] == 0
    assert types(node.read("10-eni.conflist"))[-1] == PLUGIN
    assert PLUGIN not in types(node.read("20-backup.conflist"))
    # --conflist names another one
    rc, out, _ = node.run("--conflist", "20-backup.conflist")
    assert rc == 0 and types(node.read("20-backup.conflist"))[-1] == PLUGIN
    assert "20-backup.conflist" in out


def test_a_single_plugin_conf_the_runtime_loads_first_is_refused(node: Node) -> None:
    """containerd and CRI-O load the first of *.conf, *.conflist, *.json: an entry in
    a conflist behind a .conf would never run."""
    node.write("05-bridge.conf", {"cniVersion": "1.0.0", "name": "br", "type": "bridge"})
    node.write("10-eni.conflist", eni_conflist())
    before = node.listing()
    rc, out, err = node.run()
    assert rc == 1 and out == ""
    assert "05-bridge.conf sorts before 10-eni.conflist" in err and "--conflist" in err
    assert node.listing() == before  # not even the binary
    assert node.run("--conflist", "10-eni.conflist")[0] == 0


@pytest.mark.parametrize("setup", ["empty", "only-conf", "no-dir"])
def test_no_conflist_is_an_error_and_nothing_is_written(node: Node, setup: str) -> None:
    if setup == "only-conf":
        node.write("10-bridge.conf", {"cniVersion": "1.0.0", "name": "br", "type": "bridge"})
    if setup == "no-dir":
        node.conf.rmdir()
    before = node.listing() if setup != "no-dir" else None
    rc, out, err = node.run()
    assert rc == 1 and out == ""
    assert err.startswith("svcproxy-install-cni: error: no conflist")
    assert str(node.conf) in err
    if setup == "only-conf":
        assert "10-bridge.conf" in err
    if before is not None:
        assert node.listing() == before
    assert not (node.bin / PLUGIN).exists()


def test_missing_ok_installs_the_binary_and_warns(node: Node) -> None:
    rc, out, err = node.run("--missing-ok")
    assert rc == 0
    assert (node.bin / PLUGIN).exists() and f"installed {node.bin / PLUGIN}" in out
    assert "warning: no conflist" in err and "not in any network configuration" in err


def test_wait_picks_up_a_conflist_that_appears(node: Node) -> None:
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        if len(slept) == 3:  # the primary CNI writes its conflist while we wait
            node.write("10-eni.conflist", eni_conflist())

    report = inst.install(node.bin, node.conf, wait=30, sleep=sleep)
    assert len(slept) == 3 and all(0 < s <= 1 for s in slept)
    assert types(node.read("10-eni.conflist"))[-1] == PLUGIN
    assert any("added" in line for line in report.lines)
    with pytest.raises(inst.NoConflist):
        inst.install(node.bin, node.conf / "nothing", wait=0.05)


@pytest.mark.parametrize("text, message", [
    ('{"cniVersion": "1.0.0", "name": "eni-net", "plugins": [{"type": "host-device"},]}', "is not valid JSON"),
    ("", "is not valid JSON"),
    ('{"cniVersion": "1.0.0", "name": "eni-net", "plugins": [' + "[" * 100_000, "is not valid JSON"),
    ('["not", "an", "object"]', "is not a JSON object"),
    ('{"cniVersion": "1.0.0", "name": "eni-net", "type": "host-device"}', 'no "plugins" list'),
    ('{"cniVersion": "1.0.0", "name": "eni-net", "plugins": [{"device": "eni1"}]}', 'without a "type"'),
    ('{"cniVersion": "0.2.0", "name": "eni-net", "plugins": [{"type": "host-device"}]}', "cniVersion '0.2.0'"),
    ('{"name": "eni-net", "plugins": [{"type": "host-device"}]}', "cniVersion None"),
    ('{"cniVersion": "1.0.0", "name": "eni net", "plugins": [{"type": "host-device"}]}', "network name 'eni net'"),
    ('{"cniVersion": "1.0.0", "name": "eni-net", "plugins": []}', "no plugin besides svcproxy-cni"),
    ('{"cniVersion": "1.0.0", "name": "eni-net", "plugins": [{"type": "svcproxy-cni"}]}',
     "no plugin besides svcproxy-cni"),
])
def test_a_conflist_that_cannot_be_extended_is_left_untouched(node: Node, text: str, message: str) -> None:
    node.write("10-eni.conflist", text)
    before = node.listing()
    rc, out, err = node.run()
    assert rc == 1 and out == ""
    assert err.startswith("svcproxy-install-cni: error: ") and message in err, err
    assert err.count("\n") == 1  # one line, no traceback
    assert node.listing() == before  # the conflist untouched, and no binary installed


def test_permissions_and_symlinks_are_kept(node: Node, tmp_path: Path) -> None:
    managed = tmp_path / "managed" / "eni.conflist"
    managed.parent.mkdir()
    managed.write_text(json.dumps(eni_conflist()))
    managed.chmod(0o600)
    (node.conf / "10-eni.conflist").symlink_to(managed)
    assert node.run()[0] == 0
    assert (node.conf / "10-eni.conflist").is_symlink()
    assert types(json.loads(managed.read_text()))[-1] == PLUGIN
    assert stat.S_IMODE(managed.stat().st_mode) == 0o600
    assert sorted(p.name for p in managed.parent.iterdir()) == ["eni.conflist"]


def test_an_edit_racing_another_writer_starts_over(node: Node) -> None:
    """The conflist is read again just before the rename: a change made meanwhile (the
    primary CNI rewriting its file) is not lost, the edit is redone on top of it."""
    path = node.write("10-eni.conflist", eni_conflist())
    calls = 0

    def change(doc: dict[str, Any]) -> dict[str, Any]:
        nonlocal calls
        calls += 1
        if calls == 1:
            rewritten = eni_conflist()
            rewritten["plugins"].insert(1, {"type": "portmap", "capabilities": {"portMappings": True}})
            path.write_text(json.dumps(rewritten))
        return inst.with_plugin(doc, DEFAULT_SOCKET)

    assert inst.edit_conflist(path, change) is True
    assert calls == 2
    assert types(node.read("10-eni.conflist")) == ["host-device", "portmap", "tuning", PLUGIN]
    assert sorted(p.name for p in node.conf.iterdir()) == ["10-eni.conflist"]


def test_bad_python_is_refused(node: Node) -> None:
    node.write("10-eni.conflist", eni_conflist())
    before = node.listing()
    rc, _, err = node.run("--python", "python3")
    assert rc == 1 and "absolute interpreter path" in err
    assert node.listing() == before


def test_the_python_plugin_can_still_be_installed(node: Node) -> None:
    node.write("10-eni.conflist", eni_conflist())
    rc, _, err = node.run("--python", "/usr/bin/env python3")
    assert rc == 0, err
    lines = (node.bin / PLUGIN).read_text().splitlines()
    assert lines[0] == "#!/usr/bin/env python3" and lines[1] == inst.MARKER
    # the rest is svcproxy/podns/cni.py itself
    assert "\n".join(lines[2:]) + "\n" == (REPO / "svcproxy" / "podns" / "cni.py").read_text()
    # and the static one replaces it (an installer-written file)
    assert node.run()[0] == 0
    assert (node.bin / PLUGIN).read_bytes() == static_plugin().read_bytes()


def test_a_plugin_that_does_not_answer_version_is_not_installed(node: Node, tmp_path: Path) -> None:
    """The file is run (VERSION) before it replaces the installed one: a broken build
    (here: ours, truncated) leaves the working plugin and the conflist as they were."""
    node.write("10-eni.conflist", eni_conflist())
    assert node.run()[0] == 0
    before = node.listing()
    broken = tmp_path / "svcproxy-cni"
    data = static_plugin().read_bytes()
    broken.write_bytes(data[:64] + inst.STATIC_MARKER)  # an ELF header and our marker, nothing that runs
    broken.chmod(0o755)
    rc, _, err = node.run("--plugin", str(broken))
    assert rc == 1 and ("does not run" in err or "does not answer VERSION" in err), err
    assert node.listing() == before
    assert sorted(p.name for p in node.bin.iterdir()) == ["host-device", PLUGIN]  # no temporary file left
    # a file that is not ours at all is refused before anything runs
    rc, _, err = node.run("--plugin", "/bin/true")
    assert rc == 1 and "not the svcproxy-cni static plugin" in err


def test_an_up_to_date_plugin_is_still_checked(node: Node) -> None:
    node.write("10-eni.conflist", eni_conflist())
    assert node.run()[0] == 0
    (node.bin / PLUGIN).chmod(0o644)  # the same bytes, no longer executable: rewritten
    rc, out, err = node.run()
    assert rc == 0 and f"installed {node.bin / PLUGIN}" in out, err
    rc, out, err = node.run()
    assert rc == 0 and "is up to date" in out, err


# --- uninstall ------------------------------------------------------------------------


def test_uninstall_removes_only_our_entry_and_our_binary(node: Node) -> None:
    original = eni_conflist()
    node.write("10-eni.conflist", original)
    (node.bin / "tuning").write_bytes(b"tuning")
    assert node.run()[0] == 0
    rc, out, err = node.run("--uninstall")
    assert (rc, err) == (0, "")
    assert f"removed {PLUGIN} from {node.conf / '10-eni.conflist'}" in out
    assert f"removed {node.bin / PLUGIN}" in out
    assert node.read("10-eni.conflist") == original
    assert sorted(p.name for p in node.bin.iterdir()) == ["host-device", "tuning"]
    # and again: nothing left to do, not an error
    before = node.listing()
    rc, out, err = node.run("--uninstall")
    assert (rc, err) == (0, "") and "is not there" in out
    assert node.listing() == before


def test_uninstall_cleans_every_conflist_that_names_us(node: Node) -> None:
    other = eni_conflist(ours=True)
    other["name"] = "backup"
    node.write("10-eni.conflist", eni_conflist(ours=True))
    node.write("20-backup.conflist", other)
    assert node.run()[0] == 0
    assert node.run("--uninstall")[0] == 0
    assert PLUGIN not in types(node.read("10-eni.conflist"))
    assert PLUGIN not in types(node.read("20-backup.conflist"))
    assert not (node.bin / PLUGIN).exists()


def test_uninstall_keeps_the_binary_while_a_conflist_uses_it(node: Node) -> None:
    node.write("10-eni.conflist", eni_conflist())
    other = eni_conflist(ours=True)
    other["name"] = "backup"
    node.write("20-backup.conflist", other)
    assert node.run()[0] == 0
    rc, _, err = node.run("--uninstall", "--conflist", "10-eni.conflist")
    assert rc == 0
    assert PLUGIN not in types(node.read("10-eni.conflist"))
    assert (node.bin / PLUGIN).exists()
    assert "left in place" in err and "20-backup.conflist still use it" in err


def test_uninstall_leaves_a_foreign_binary_alone(node: Node) -> None:
    node.write("10-eni.conflist", eni_conflist(ours=True))
    foreign = node.bin / PLUGIN
    foreign.write_text("#!/bin/sh\nexec /usr/local/bin/svcproxy-cni-wrapper\n")
    rc, out, err = node.run("--uninstall")
    assert rc == 0
    assert PLUGIN not in types(node.read("10-eni.conflist"))
    assert foreign.read_text().startswith("#!/bin/sh") and "not written by this installer" in err


def test_uninstall_with_a_malformed_conflist_keeps_the_file_and_the_binary(node: Node) -> None:
    node.write("10-eni.conflist", eni_conflist())
    assert node.run()[0] == 0
    broken = node.write("10-eni.conflist", '{"cniVersion": "1.0.0", "plugins": [')
    before = broken.read_bytes()
    rc, _, err = node.run("--uninstall")
    assert rc == 1
    assert "is not valid JSON" in err and str(broken) in err
    assert broken.read_bytes() == before
    assert (node.bin / PLUGIN).exists()  # it might still be named in there


def test_uninstall_without_a_conflist_removes_the_binary(node: Node) -> None:
    node.write("10-eni.conflist", eni_conflist())
    assert node.run()[0] == 0
    (node.conf / "10-eni.conflist").unlink()
    rc, out, _ = node.run("--uninstall")
    assert rc == 0 and f"removed {node.bin / PLUGIN}" in out


def test_runs_as_a_module() -> None:
    done = subprocess.run([sys.executable, "-m", "svcproxy.podns.install", "--help"], capture_output=True,
                          text=True, timeout=60, cwd=REPO, env={**os.environ, "COLUMNS": "200"})
    assert done.returncode == 0
    for flag in ("--bin-dir", "--conf-dir", "--conflist", "--socket", "--uninstall", "--wait", "--missing-ok"):
        assert flag in done.stdout


# --- --watch: the entry kept when the primary CNI rewrites the conflist ----------------


def keeper(node: Node, lines: list[str], **kw: Any) -> Any:
    from svcproxy.podns.keeper import ConflistKeeper

    return ConflistKeeper(node.conf, None, DEFAULT_SOCKET, say=lines.append, warn=lambda s: lines.append("W " + s),
                          **kw)


def rewrite(node: Node, name: str, doc: Any) -> None:
    """As a primary CNI's installer writes its conflist: a new file renamed over the old."""
    tmp = node.conf / f".{name}.tmp"
    tmp.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    os.replace(tmp, node.conf / name)


def sample(k: Any, name: str, **labels: str) -> float:
    value = k.registry.get_sample_value(name, labels or None)
    return 0.0 if value is None else float(value)


def test_keeper_puts_the_entry_back_after_a_rewrite(node: Node) -> None:
    node.write("10-eni.conflist", eni_conflist())
    assert node.run("--select-annotation", "svcproxy.io/share-ns=true")[0] == 0
    installed = node.read("10-eni.conflist")
    lines: list[str] = []
    k = keeper(node, lines)
    assert k.check_once() == "ok" and lines == []
    assert sample(k, "svcproxy_cni_conflist_entry_present") == 1
    rewrite(node, "10-eni.conflist", eni_conflist())  # the primary CNI restarts: our entry gone
    assert k.check_once() == "repaired"
    assert node.read("10-eni.conflist") == installed  # back, with its selector, last
    assert sample(k, "svcproxy_cni_conflist_repairs_total") == 1
    assert "put svcproxy-cni back" in lines[-1]
    assert k.check_once() == "ok"  # idempotent: nothing rewritten
    mtime = (node.conf / "10-eni.conflist").stat().st_mtime_ns
    assert k.check_once() == "ok" and (node.conf / "10-eni.conflist").stat().st_mtime_ns == mtime
    # a rewrite that copied our entry twice, and not last: one entry, last
    doc = eni_conflist()
    doc["plugins"] = [installed["plugins"][-1], *doc["plugins"], installed["plugins"][-1]]
    rewrite(node, "10-eni.conflist", doc)
    assert k.check_once() == "repaired"
    assert node.read("10-eni.conflist") == installed
    assert sample(k, "svcproxy_cni_conflist_repairs_total") == 2


def test_keeper_leaves_a_bad_or_missing_conflist_alone_and_says_so(node: Node) -> None:
    node.write("10-eni.conflist", eni_conflist())
    assert node.run()[0] == 0
    lines: list[str] = []
    k = keeper(node, lines)
    assert k.check_once() == "ok"
    rewrite(node, "10-eni.conflist", '{"cniVersion": "1.0.0", "plugins": [')  # caught mid-write, say
    raw = (node.conf / "10-eni.conflist").read_bytes()
    assert k.check_once() == "invalid" and k.check_once() == "invalid"
    assert (node.conf / "10-eni.conflist").read_bytes() == raw  # never "repaired" into something else
    assert sample(k, "svcproxy_cni_conflist_problems_total", reason="invalid") == 2
    assert sample(k, "svcproxy_cni_conflist_entry_present") == 0
    assert [line for line in lines if line.startswith("W ")] == [lines[0]]  # logged once, not every look
    assert "is not valid JSON" in lines[0] and "left untouched" in lines[0]
    (node.conf / "10-eni.conflist").unlink()
    assert k.check_once() == "missing"
    assert "no conflist" in lines[-1]
    rewrite(node, "10-eni.conflist", eni_conflist())  # the primary CNI writes it again
    assert k.check_once() == "repaired"
    assert types(node.read("10-eni.conflist")) == ["host-device", "tuning", PLUGIN]
    assert sample(k, "svcproxy_cni_conflist_entry_present") == 1
    assert any("usable again" in line for line in lines)
    assert sorted(p.name for p in node.conf.iterdir()) == ["10-eni.conflist"]  # no temporary file left


def test_watch_runs_until_sigterm(node: Node) -> None:
    """`--watch` as the DaemonSet runs it: a process that installs, keeps the entry
    through a rewrite, and exits 0 on SIGTERM."""
    node.write("10-eni.conflist", eni_conflist())
    proc = subprocess.Popen([sys.executable, "-m", "svcproxy.podns.install", "--bin-dir", str(node.bin),
                             "--conf-dir", str(node.conf), "--plugin", str(static_plugin()), "--watch",
                             "--watch-interval", "0.1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=REPO)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and types(node.read("10-eni.conflist"))[-1] != PLUGIN:
            time.sleep(0.05)
        assert types(node.read("10-eni.conflist")) == ["host-device", "tuning", PLUGIN]
        rewrite(node, "10-eni.conflist", eni_conflist())
        while time.monotonic() < deadline and types(node.read("10-eni.conflist"))[-1] != PLUGIN:
            time.sleep(0.05)
        assert types(node.read("10-eni.conflist")) == ["host-device", "tuning", PLUGIN]
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "put svcproxy-cni back" in out, out
