"""``python -m svcproxy.podns.install``: put the ``svcproxy-cni`` plugin on a node.

The DaemonSet's ``install-cni`` init container runs this with the node's CNI
directories mounted from the host. It does two things, in this order:

1. Copies the plugin into the CNI binary directory (``/opt/cni/bin``). The container
   runtime runs it on the host, outside the agent's image, so by default it is the
   static executable built from ``cni/svcproxy-cni.c`` (``make cni-plugin``; the
   image carries it as ``/usr/lib/svcproxy/svcproxy-cni``, ``--plugin`` names
   another): it needs nothing on the node, forwards each invocation to the agent's
   socket and relays the answer. ``--python INTERPRETER`` installs the Python plugin
   instead (``svcproxy/podns/cni.py`` behind a ``#!`` line; the node then needs a
   python3, 3.7 or later). The file is checked before it replaces the installed one
   and once more in place: it must answer CNI ``VERSION`` with the conflist's
   ``cniVersion`` among its supported versions, or nothing else is changed and the
   exit status is 1.
2. Appends an entry ``{"type": "svcproxy-cni", "socket": ...}`` as the **last**
   plugin of the node's conflist (``/etc/cni/net.d``): the plugin is chained after
   the plugin that gives the Pod its network, and passes that plugin's result
   through.

Design decisions:

- Which conflist: the first ``*.conflist`` in lexical order (``--conflist`` names
  another), because that is the file containerd and CRI-O load. If a single-plugin
  ``*.conf`` or ``*.json`` sorts before it, the runtime loads *that* file and our
  entry would never run: refused, unless ``--conflist`` says which file to edit.
- Never break the conflist. The file is parsed and checked before anything is
  written (JSON object, a non-empty ``plugins`` list of objects with a ``type``, a
  ``cniVersion`` and network ``name`` the plugin accepts: otherwise every Pod ADD
  would fail with the plugin's error). On any problem the file is left untouched
  and the exit status is 1 with one line saying what is wrong. Writes go to a
  temporary file in the same directory (named ``*.svcproxy-tmp``, an extension the
  runtime does not load), fsynced, with the original's permissions, then renamed
  over the original; just before the rename the original is read again, and if
  someone else changed it meanwhile the whole edit starts over. A changed conflist is
  written back as JSON with two-space indentation, keys in their original order.
- Idempotent. A conflist that already ends with the wanted entry, and a binary with
  the same bytes, are not rewritten (no spurious change events for the runtime). An
  existing ``svcproxy-cni`` entry is merged with the flags (keys given by flags win,
  others, such as a hand-written ``selector``, are kept) and moved to the end;
  duplicates collapse into one.
- ``--watch`` keeps the entry there: primary CNIs (Calico's, Cilium's installers)
  rewrite their conflist when they restart or reconfigure, dropping plugins they did
  not write. The installer then keeps running, polls the conflist and puts the entry
  back (the same atomic, checked edit), logging one line per repair or problem and
  counting them in metrics (``--metrics-bind``).
- Binary before conflist on install, conflist before binary on ``--uninstall``: a
  conflist never names a plugin that is not there. Install checks the conflist before
  it writes the binary, so a run that fails changes nothing. Uninstall removes our
  entries (``type: svcproxy-cni``) and nothing else, from ``--conflist`` or else from
  every configuration file in the directory, then the binary only if it carries our
  marker line and no configuration file still uses it.
- ``--wait SECONDS`` polls for a conflist to appear: on a new node the primary CNI
  often writes its conflist a little after the DaemonSets start. Without a conflist
  after the wait the exit status is 1 (the kubelet retries the init container), or
  0 with a warning under ``--missing-ok``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NoReturn, Sequence, TextIO

from svcproxy import flags
from svcproxy.podns import cni

__all__ = [
    "DEFAULT_BIN_DIR",
    "DEFAULT_CONF_DIR",
    "DEFAULT_PYTHON",
    "InstallError",
    "MARKER",
    "PLUGIN",
    "Selector",
    "build_parser",
    "find_conflist",
    "install",
    "main",
    "plugin_bytes",
    "uninstall",
]

PLUGIN = cni.PLUGIN
DEFAULT_BIN_DIR = "/opt/cni/bin"
DEFAULT_CONF_DIR = "/etc/cni/net.d"
DEFAULT_PYTHON = "/usr/bin/env python3"
#: Where the image carries the static plugin (``make cni-plugin`` builds it as
#: build/svcproxy-cni in a source tree, which is used when this path is missing).
DEFAULT_PLUGIN = "/usr/lib/svcproxy/svcproxy-cni"
#: Bytes the static plugin carries (cni/svcproxy-cni.c): what ``--uninstall`` looks for.
STATIC_MARKER = b"svcproxy-cni static plugin, installed by svcproxy.podns.install"
#: How long the installed plugin may take to answer VERSION.
VERIFY_TIMEOUT = 10.0
#: The second line of an installed plugin: what ``--uninstall`` looks for before it
#: deletes a file named svcproxy-cni.
MARKER = "# svcproxy-cni, installed by svcproxy.podns.install: do not edit (rewritten at every install)"
#: Extensions libcni (containerd, CRI-O) loads from the configuration directory.
CONF_EXTENSIONS = (".conf", ".conflist", ".json")
TMP_SUFFIX = ".svcproxy-tmp"
#: How often an edit is started over when the file changes under us.
ATTEMPTS = 5


class InstallError(Exception):
    """Something is wrong with the node's CNI setup; nothing was changed by the step
    that raised it."""


class NoConflist(InstallError):
    """There is no conflist (yet) to add the plugin to."""


# --------------------------------------------------------------------------------------
# the plugin executable


def plugin_bytes(python: str = DEFAULT_PYTHON) -> bytes:
    """The executable: ``#!PYTHON``, our marker, then svcproxy/podns/cni.py as is."""
    python = python.strip()
    if not python.startswith("/") or "\n" in python:
        raise InstallError(f"--python must be an absolute interpreter path (with arguments), not {python!r}")
    source = Path(cni.__file__).read_text(encoding="utf-8")
    if source.startswith("#!"):
        source = source.split("\n", 1)[1]
    return f"#!{python}\n{MARKER}\n{source}".encode()


def default_plugin() -> Path:
    """The static plugin: the image's, else this source tree's build/svcproxy-cni."""
    candidates = [Path(DEFAULT_PLUGIN), Path(cni.__file__).resolve().parents[2] / "build" / PLUGIN]
    for path in candidates:
        if path.is_file():
            return path
    raise InstallError(f"no static svcproxy-cni at {' or '.join(map(str, candidates))}: build it with "
                       "`make cni-plugin`, or name it with --plugin")


def static_plugin_bytes(path: Path) -> bytes:
    """The static plugin's bytes, refused unless they are an executable of ours."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InstallError(f"cannot read the plugin {path}: {exc.strerror or exc}") from None
    if not data.startswith(b"\x7fELF") or STATIC_MARKER not in data:
        raise InstallError(f"{path} is not the svcproxy-cni static plugin (built by `make cni-plugin`)")
    return data


def verify_plugin(path: Path, version: str) -> None:
    """Run ``path`` as a runtime runs it for VERSION; raise InstallError unless it
    answers with ``version`` among its supported versions."""
    try:
        done = subprocess.run([str(path)], input=json.dumps({"cniVersion": version}).encode(),
                              env={"CNI_COMMAND": "VERSION", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
                              capture_output=True, timeout=VERIFY_TIMEOUT, cwd="/")
    except subprocess.TimeoutExpired:
        raise InstallError(f"{path} did not answer VERSION within {VERIFY_TIMEOUT:g}s") from None
    except OSError as exc:
        raise InstallError(f"{path} does not run: {exc.strerror or exc}") from None
    answer = done.stdout.decode(errors="replace").strip()
    try:
        supported = json.loads(answer)["supportedVersions"]
    except (ValueError, KeyError, TypeError):
        supported = None
    if done.returncode != 0 or not isinstance(supported, list) or version not in supported:
        why = done.stderr.decode(errors="replace").strip()[-300:] or answer[:300] or "no output"
        raise InstallError(f"{path} does not answer VERSION with {version} among its versions "
                           f"(exit {done.returncode}): {why}")


def install_binary(bin_dir: Path, data: bytes, version: str = cni.LATEST) -> bool:
    """Write ``bin_dir/svcproxy-cni``, checked with VERSION before it replaces the
    installed file and after; False when it already had these bytes (checked too)."""
    if not bin_dir.is_dir():
        raise InstallError(f"CNI binary directory {bin_dir} does not exist")
    target = bin_dir / PLUGIN
    try:
        if target.is_file() and not target.is_symlink() and target.read_bytes() == data \
                and os.stat(target).st_mode & 0o777 == 0o755:
            verify_plugin(target, version)
            return False
    except OSError:
        pass
    _write_atomic(target, data, 0o755, verify=lambda tmp: verify_plugin(tmp, version))
    verify_plugin(target, version)
    return True


def ours(path: Path) -> bool:
    """Whether ``path`` is a plugin file this installer wrote (static or Python)."""
    try:
        with open(path, "rb") as f:
            data = f.read(8 << 20)
    except OSError:
        return False
    if data.startswith(b"\x7fELF"):
        return STATIC_MARKER in data
    lines = data[:4096].split(b"\n", 2)
    return len(lines) > 1 and lines[0].startswith(b"#!") and lines[1] == MARKER.encode()


# --------------------------------------------------------------------------------------
# the conflist


@dataclass(frozen=True)
class Selector:
    """``--select-all`` / ``--select-annotation KEY[=VALUE]``; None: keep what is there."""

    value: Any  # "all" or {"annotation": KEY[, "value": VALUE]}

    @staticmethod
    def annotation(text: str) -> "Selector":
        key, sep, value = text.partition("=")
        if not key:
            raise argparse.ArgumentTypeError("expected KEY or KEY=VALUE")
        return Selector({"annotation": key, **({"value": value} if sep else {})})


def find_conflist(conf_dir: Path, name: str | None = None) -> Path:
    """The conflist to edit: ``name`` (in ``conf_dir`` unless a path), else the first
    ``*.conflist`` in lexical order, provided the runtime would load that one."""
    if name:
        path = Path(name) if "/" in name else conf_dir / name
        if not path.is_file():
            raise NoConflist(f"no conflist: {path} does not exist")
        return path
    files = [p.name for p in config_files(conf_dir)]
    lists = [f for f in files if f.endswith(".conflist")]
    if not lists:
        found = f" (only {', '.join(files)}: single-plugin configurations cannot chain svcproxy-cni)" if files else ""
        raise NoConflist(f"no conflist: no *.conflist file in {conf_dir}{found}")
    before = [f for f in files if f < lists[0]]
    if before:
        raise InstallError(
            f"{conf_dir / before[0]} sorts before {lists[0]}, so the container runtime loads it instead and "
            f"svcproxy-cni would never run; name the file to edit with --conflist, or convert "
            f"{before[0]} into a conflist")
    return conf_dir / lists[0]


def config_files(conf_dir: Path) -> list[Path]:
    """The files the runtime would consider, in the order it considers them."""
    if not conf_dir.is_dir():
        raise NoConflist(f"no conflist: CNI configuration directory {conf_dir} does not exist")
    return sorted((p for p in conf_dir.iterdir() if p.name.endswith(CONF_EXTENSIONS) and p.is_file()),
                  key=lambda p: p.name)


def parse_conflist(path: Path, text: str, *, strict: bool = True) -> dict[str, Any]:
    """The conflist's JSON, checked (``strict``) so that appending svcproxy-cni cannot
    break it; otherwise only checked to be a JSON object (removing our entry)."""
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise InstallError(f"{path} is not valid JSON ({exc}); left untouched") from None
    except RecursionError:
        raise InstallError(f"{path} is not valid JSON (nested too deeply); left untouched") from None
    if not isinstance(doc, dict):
        raise InstallError(f"{path} is not a JSON object; left untouched")
    if not strict:
        return doc
    plugins = doc.get("plugins")
    if not isinstance(plugins, list) or not all(isinstance(p, dict) for p in plugins):
        raise InstallError(f"{path} has no \"plugins\" list of objects; left untouched")
    if not all(isinstance(p.get("type"), str) and p["type"] for p in plugins):
        raise InstallError(f"{path} has a plugin without a \"type\"; left untouched")
    version = doc.get("cniVersion")
    if version not in cni.SUPPORTED_VERSIONS:
        raise InstallError(f"{path} has cniVersion {version!r}; svcproxy-cni speaks "
                           f"{', '.join(cni.SUPPORTED_VERSIONS)}; left untouched")
    name = doc.get("name")
    if not isinstance(name, str) or not cni.valid_id(name):
        raise InstallError(f"{path} has network name {name!r}, which svcproxy-cni would refuse; left untouched")
    return doc


def _entry(old: dict[str, Any] | None, socket: str, timeout: float | None, selector: Selector | None) -> dict[str, Any]:
    entry: dict[str, Any] = {"type": PLUGIN}
    entry.update((k, v) for k, v in (old or {}).items() if k != "type")
    entry["socket"] = socket
    if timeout is not None:
        entry["timeout"] = int(timeout) if float(timeout).is_integer() else timeout
    if selector is not None:
        entry["selector"] = selector.value
    if entry.get("selector", "all") != "all":
        caps = entry.get("capabilities")
        caps = dict(caps) if isinstance(caps, dict) else {}
        caps[cni.ANNOTATIONS_CAPABILITY] = True
        entry["capabilities"] = caps
    # The plugin's own validation: an entry it would refuse must never be written.
    try:
        cni.Config({"cniVersion": cni.LATEST, "name": "check", **entry})
    except cni.CniError as exc:
        raise InstallError(f"the svcproxy-cni entry would be refused by the plugin: {exc.msg}"
                           f"{': ' + exc.details if exc.details else ''}") from None
    return entry


def with_plugin(doc: dict[str, Any], socket: str, timeout: float | None = None,
                selector: Selector | None = None) -> dict[str, Any]:
    """The conflist with one svcproxy-cni entry, last."""
    plugins = doc["plugins"]
    mine = [p for p in plugins if p.get("type") == PLUGIN]
    others = [p for p in plugins if p.get("type") != PLUGIN]
    if not others:
        raise InstallError("the conflist has no plugin besides svcproxy-cni to chain after")
    old: dict[str, Any] = {}
    for p in mine:
        old.update(p)
    return {**doc, "plugins": [*others, _entry(old if mine else None, socket, timeout, selector)]}


def without_plugin(doc: dict[str, Any]) -> dict[str, Any]:
    """The configuration without svcproxy-cni entries (a single-plugin one unchanged)."""
    plugins = doc.get("plugins")
    if not isinstance(plugins, list):
        return doc
    return {**doc, "plugins": [p for p in plugins if not (isinstance(p, dict) and p.get("type") == PLUGIN)]}


def render(doc: dict[str, Any]) -> bytes:
    return (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode()


def _write_atomic(path: Path, data: bytes, mode: int, *, owner: tuple[int, int] | None = None,
                  check: Callable[[], None] | None = None,
                  verify: Callable[[Path], None] | None = None) -> None:
    """Write through a temporary file in the same directory and a rename. ``verify``
    (given the temporary file) and ``check`` run just before the rename and may
    raise to abandon the write."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            if owner is not None and owner != (os.geteuid(), os.getegid()):
                try:
                    os.fchown(f.fileno(), *owner)
                except PermissionError:
                    pass  # not root: the file is ours, with the original's permissions
            os.fsync(f.fileno())
        if verify is not None:
            verify(Path(tmp))
        if check is not None:
            check()
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


class _Changed(Exception):
    """The file changed while we were editing it: start over."""


def edit_conflist(path: Path, change: Callable[[dict[str, Any]], dict[str, Any]], *, strict: bool = True) -> bool:
    """Apply ``change`` to the conflist; False when it was already as wanted."""
    real = Path(os.path.realpath(path))  # a symlinked conflist: edit its target
    for _ in range(ATTEMPTS):
        try:
            raw = real.read_bytes()
            st = os.stat(real)
        except OSError as exc:
            raise InstallError(f"cannot read {path}: {exc.strerror or exc}") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise InstallError(f"{path} is not UTF-8 text; left untouched") from None
        doc = parse_conflist(path, text, strict=strict)
        new = change(doc)
        if new == doc:
            return False

        def unchanged() -> None:
            if real.read_bytes() != raw:
                raise _Changed()

        try:
            _write_atomic(real, render(new), st.st_mode & 0o7777, owner=(st.st_uid, st.st_gid), check=unchanged)
        except _Changed:
            time.sleep(0.05)
            continue
        except OSError as exc:
            raise InstallError(f"cannot write {path}: {exc.strerror or exc}") from None
        return True
    raise InstallError(f"{path} kept changing while being edited ({ATTEMPTS} attempts); left as it is")


def uses_plugin(conf_dir: Path) -> list[Path]:
    """Configuration files in ``conf_dir`` that still name svcproxy-cni."""
    found: list[Path] = []
    try:
        files = config_files(conf_dir)
    except NoConflist:
        return found
    for p in files:
        try:
            doc = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            continue
        entries = doc.get("plugins") if isinstance(doc, dict) else None
        entries = entries if isinstance(entries, list) else [doc]
        if any(isinstance(e, dict) and e.get("type") == PLUGIN for e in entries):
            found.append(p)
    return found


# --------------------------------------------------------------------------------------
# the two commands


@dataclass
class Report:
    lines: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    #: Problems that make the exit status 1 after the rest was done.
    errors: list[str] = field(default_factory=list)

    def say(self, line: str) -> None:
        self.lines.append(line)


def wait_for_conflist(conf_dir: Path, name: str | None, wait: float, *,
                      sleep: Callable[[float], None] = time.sleep,
                      monotonic: Callable[[], float] = time.monotonic) -> Path:
    deadline = monotonic() + wait
    while True:
        try:
            return find_conflist(conf_dir, name)
        except NoConflist:
            if monotonic() >= deadline:
                raise
        sleep(min(1.0, max(0.0, deadline - monotonic())))


def install(bin_dir: Path, conf_dir: Path, *, conflist: str | None = None, socket: str = cni.DEFAULT_SOCKET,
            timeout: float | None = None, selector: Selector | None = None, python: str | None = None,
            plugin: Path | None = None, wait: float = 0.0, missing_ok: bool = False,
            sleep: Callable[[float], None] = time.sleep) -> Report:
    """Install the static plugin (``plugin``, else the default one) or, with
    ``python``, the Python plugin; then add its entry to the conflist."""
    report = Report()
    # Check everything that can be checked before writing anything.
    _entry(None, socket, timeout, selector)
    data = plugin_bytes(python) if python is not None else static_plugin_bytes(plugin or default_plugin())
    version = cni.LATEST
    try:
        path: Path | None = wait_for_conflist(conf_dir, conflist, wait, sleep=sleep)
    except NoConflist as exc:
        if not missing_ok:
            raise
        path = None
        report.warnings.append(f"{exc}; svcproxy-cni is installed but not in any network configuration "
                               "(Pods on this node get no Services in their own namespace until the next install)")
    if path is not None:  # refuse a conflist we cannot extend before writing anything
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InstallError(f"cannot read {path}: {exc}") from None
        doc = parse_conflist(path, text)
        with_plugin(doc, socket, timeout, selector)
        version = doc["cniVersion"]
    if install_binary(bin_dir, data, version):
        report.say(f"installed {bin_dir / PLUGIN}")
    else:
        report.say(f"{bin_dir / PLUGIN} is up to date")
    if path is not None:
        if edit_conflist(path, lambda doc: with_plugin(doc, socket, timeout, selector)):
            report.say(f"added {PLUGIN} as the last plugin of {path}")
        else:
            report.say(f"{path} already ends with {PLUGIN}")
    return report


def uninstall(bin_dir: Path, conf_dir: Path, *, conflist: str | None = None) -> Report:
    """Remove our entries (from ``conflist``, else from every configuration file in
    ``conf_dir``), then our binary if nothing uses it any more."""
    report = Report()
    if conflist:
        paths = [find_conflist(conf_dir, conflist)]
    else:
        try:
            paths = config_files(conf_dir)
        except NoConflist as exc:
            paths = []
            report.say(f"{exc}: no entry to remove")
    for path in paths:
        try:
            if edit_conflist(path, without_plugin, strict=False):
                report.say(f"removed {PLUGIN} from {path}")
        except InstallError as exc:
            report.errors.append(str(exc))
    binary = bin_dir / PLUGIN
    if not os.path.lexists(binary):
        report.say(f"{binary} is not there")
    elif not ours(binary):
        report.warnings.append(f"{binary} was not written by this installer: left in place")
    elif report.errors:
        report.warnings.append(f"{binary} left in place: a configuration file could not be checked")
    elif uses_plugin(conf_dir):
        still = ", ".join(map(str, uses_plugin(conf_dir)))
        report.warnings.append(f"{binary} left in place: {still} still use it")
    else:
        try:
            binary.unlink()
        except OSError as exc:
            raise InstallError(f"cannot remove {binary}: {exc.strerror or exc}") from None
        report.say(f"removed {binary}")
    return report


# --------------------------------------------------------------------------------------
# command line


def _seconds(text: str) -> float:
    try:
        value = float(text.rstrip("s"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag exits 1 like every other error (argparse's own is 2)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(1, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="svcproxy-install-cni",
        description="Install the svcproxy-cni chained plugin on this node: copy it into the CNI binary "
                    "directory and append it as the last plugin of the node's conflist (or remove both).")
    p.add_argument("--bin-dir", type=Path, default=Path(DEFAULT_BIN_DIR),
                   help=f"CNI binary directory (default {DEFAULT_BIN_DIR})")
    p.add_argument("--conf-dir", type=Path, default=Path(DEFAULT_CONF_DIR),
                   help=f"CNI configuration directory (default {DEFAULT_CONF_DIR})")
    p.add_argument("--conflist", default=None, metavar="NAME",
                   help="the conflist to edit, a file name in --conf-dir or a path (default: the first "
                        "*.conflist in lexical order, the one the container runtime loads)")
    p.add_argument("--socket", default=cni.DEFAULT_SOCKET, metavar="PATH",
                   help=f"the agent's socket, as the host sees it, written into the plugin's entry "
                        f"(default {cni.DEFAULT_SOCKET})")
    p.add_argument("--plugin-timeout", type=_seconds, default=None, metavar="SECONDS",
                   help="seconds an ADD waits for the agent (entry key `timeout`; default: keep the entry's, "
                        f"else the plugin's {cni.DEFAULT_TIMEOUT:g})")
    select = p.add_mutually_exclusive_group()
    select.add_argument("--select-all", dest="selector", action="store_const", const=Selector("all"),
                        help="every Pod's namespace is attached (the plugin's default)")
    select.add_argument("--select-annotation", dest="selector", type=Selector.annotation, metavar="KEY[=VALUE]",
                        help="only Pods with this annotation (equal to VALUE, when given); declares the "
                             f"{cni.ANNOTATIONS_CAPABILITY} capability (default: keep the entry's selector)")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--plugin", type=Path, default=None, metavar="PATH",
                      help=f"the static plugin to install (default {DEFAULT_PLUGIN}, else build/{PLUGIN} "
                           "in a source tree)")
    kind.add_argument("--python", default=None, metavar="INTERPRETER",
                      help="install the Python plugin instead, with this #! line: the host's Python 3.7+ "
                           f"(e.g. '{DEFAULT_PYTHON}')")
    p.add_argument("--watch", action="store_true",
                   help="after installing, keep running: put the entry back whenever the conflist is rewritten "
                        "without it")
    p.add_argument("--watch-interval", type=_seconds, default=2.0, metavar="SECONDS",
                   help="how often --watch looks at the conflist (default 2)")
    p.add_argument("--metrics-bind", default=None, metavar="HOST:PORT", type=flags.bind,
                   help="with --watch: serve its Prometheus metrics here (default: none)")
    p.add_argument("--wait", type=_seconds, default=0.0, metavar="SECONDS",
                   help="wait up to this long for a conflist to appear (default 0)")
    p.add_argument("--missing-ok", action="store_true",
                   help="no conflist (after --wait): install the binary, warn, and exit 0 instead of 1")
    p.add_argument("--uninstall", action="store_true",
                   help="remove our entry from the conflist, then our binary (if no configuration uses it)")
    return p


def main(argv: Sequence[str] | None = None, *, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    args = build_parser().parse_args(argv)
    prog = "svcproxy-install-cni"
    try:
        if args.uninstall:
            report = uninstall(args.bin_dir, args.conf_dir, conflist=args.conflist)
        else:
            report = install(args.bin_dir, args.conf_dir, conflist=args.conflist, socket=args.socket,
                             timeout=args.plugin_timeout, selector=args.selector, python=args.python,
                             plugin=args.plugin, wait=args.wait, missing_ok=args.missing_ok)
    except InstallError as exc:
        err.write(f"{prog}: error: {exc}\n")
        return 1
    except OSError as exc:
        err.write(f"{prog}: error: {exc}\n")
        return 1
    for line in report.lines:
        out.write(f"{prog}: {line}\n")
    for line in report.warnings:
        err.write(f"{prog}: warning: {line}\n")
    for line in report.errors:
        err.write(f"{prog}: error: {line}\n")
    if report.errors or not args.watch or args.uninstall:
        return 1 if report.errors else 0
    return watch(args, out, err)


def watch(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """--watch: keep the entry in the conflist until SIGTERM or SIGINT."""
    import signal
    import threading

    from svcproxy.podns.keeper import ConflistKeeper

    prog = "svcproxy-install-cni"

    def say(line: str) -> None:
        out.write(f"{prog}: {line}\n")
        out.flush()

    def warn(line: str) -> None:
        err.write(f"{prog}: warning: {line}\n")
        err.flush()

    keeper = ConflistKeeper(args.conf_dir, args.conflist, args.socket, args.plugin_timeout, args.selector,
                            say=say, warn=warn)
    if args.metrics_bind:
        from prometheus_client import start_http_server

        host, _, port = args.metrics_bind.rpartition(":")
        try:
            start_http_server(int(port), addr=host.strip("[]") or "0.0.0.0", registry=keeper.registry)
        except (ValueError, OSError) as exc:
            err.write(f"{prog}: error: --metrics-bind {args.metrics_bind}: {exc}\n")
            return 1
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    say(f"watching {args.conflist or args.conf_dir} every {args.watch_interval:g}s")
    keeper.run(stop, max(args.watch_interval, 0.05))
    return 0


if __name__ == "__main__":
    sys.exit(main())
