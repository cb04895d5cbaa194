"""``svcproxy-cni``: the chained CNI plugin that makes a Pod's Services work before
its containers start.

A runtime runs it after the plugin that gives the Pod its network (in the ENI mode,
``host-device`` moving the Pod's own NIC into its namespace). On ADD it asks the node
agent (``svcproxy run``) over a root-only unix socket to attach the new network
namespace, waits until the agent answers that the namespace's IPVS table is
programmed, and passes the previous plugin's result through. If the agent does not
answer in time, ADD fails with CNI error 11 ("try again later"): the kubelet tears
the sandbox down and retries, so a Pod never runs with Services that do not work.

Speaks CNI spec 0.3.0 to 1.1.0, following these rules of the specification:

- ADD: needs ``prevResult`` ("must be called as chained plugin" otherwise) and prints
  it back unchanged except for ``cniVersion`` (the config's).
- DEL: always succeeds unless the input is malformed: the namespace may be gone,
  ``CNI_NETNS`` empty, ``prevResult`` missing, the DEL repeated, the agent down (the
  agent drops a namespace that is gone at its next sync, and its scan forgets them).
- CHECK: succeeds when the agent reports the namespace attached and programmed.
- VERSION, STATUS (1.1: error 50 when the agent is unreachable), GC (1.1: succeeds
  and does nothing: the agent keys attachments by namespace and forgets a namespace
  when DEL reaches it or when its scan finds the namespace gone, so there is nothing
  for GC to collect that the agent does not already collect; detaching namespaces
  missing from ``cni.dev/valid-attachments`` would race with ADDs in flight).

Network configuration keys (all optional)::

    {"type": "svcproxy-cni",
     "socket": "/run/svcproxy/cni.sock",   # the agent's socket
     "timeout": 30,                        # seconds to wait for the agent's answer
                                           # (it is asked to answer up to 1s earlier)
     "selector": "all"                     # or {"annotation": KEY[, "value": VALUE]}
     "capabilities": {"io.kubernetes.cri.pod-annotations": true}}

``selector`` chooses the Pods whose namespace gets the Service table: ``"all"``, or
the Pods with annotation KEY (equal to VALUE, when given). Pod annotations come from
the runtime through the ``io.kubernetes.cri.pod-annotations`` capability, which the
conflist must declare for an annotation selector. A Pod that is not selected is
passed through without contacting the agent.

The agent's protocol (one JSON object per line, each answered by one line)::

    -> {"op": "attach"|"detach"|"status", "netns": PATH, "containerId": ID,
        "ifname": NAME, "pod": {"namespace", "name", "uid", "annotations"},
        "timeout": SECONDS}
    <- {"ok": true|false, "error": MESSAGE, "code": CNI_CODE, ...}

Runs on every Pod start: it imports nothing but the standard library.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable, Mapping, NoReturn, TextIO

    #: How a command reaches the agent: ``call_agent`` over the socket, or (inside the
    #: agent, for the static plugin's forwarded requests) the server's own handler.
    Caller = Callable[[str, Mapping[str, Any], float], dict[str, Any]]

PLUGIN = "svcproxy-cni"
SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
LATEST = SUPPORTED_VERSIONS[-1]
DEFAULT_SOCKET = "/run/svcproxy/cni.sock"
DEFAULT_TIMEOUT = 30.0
#: DEL must not hold up a Pod's teardown for long: detaching is immediate on the agent.
DEL_TIMEOUT = 10.0
ANNOTATIONS_CAPABILITY = "io.kubernetes.cri.pod-annotations"
#: A request line (and an answer) is at most this long.
MAX_LINE = 1 << 20

# CNI error codes (spec 1.0/1.1) and ours (100+).
ERR_INCOMPATIBLE_VERSION = 1
ERR_UNSUPPORTED_FIELD = 2
ERR_UNKNOWN_CONTAINER = 3
ERR_INVALID_ENV = 4
ERR_IO = 5
ERR_DECODE = 6
ERR_INVALID_CONFIG = 7
ERR_TRY_AGAIN_LATER = 11
ERR_NOT_AVAILABLE = 50
#: The agent could not attach the namespace (its log says why).
ERR_ATTACH_FAILED = 100
#: CHECK: the agent does not have the namespace attached and programmed.
ERR_NOT_ATTACHED = 101

_ALNUM = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
_ID_CHARS = _ALNUM | frozenset("_.-")


def valid_id(text: str) -> bool:
    """``^[a-zA-Z0-9][a-zA-Z0-9_.\\-]*$``: container IDs and network names (no ``re``:
    the plugin starts on every Pod start)."""
    return bool(text) and text[0] in _ALNUM and all(c in _ID_CHARS for c in text)


class CniError(Exception):
    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code, self.msg, self.details = code, msg, details
        #: The config's cniVersion, once known (errors are reported in it).
        self.version: str | None = None

    def json(self, version: str) -> dict[str, Any]:
        doc: dict[str, Any] = {"cniVersion": version, "code": self.code, "msg": self.msg}
        if self.details:
            doc["details"] = self.details
        return doc


def log(msg: str, stream: TextIO | None = None) -> None:
    (stream or sys.stderr).write(f"{PLUGIN}: {msg}\n")


def _version_tuple(v: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in v.split("."))
    except ValueError:
        return (0,)


# --------------------------------------------------------------------------------------
# inputs


def validate_ifname(name: str) -> None:
    """The rules of the reference ``utils.ValidateInterfaceName``."""
    if not name:
        raise CniError(ERR_INVALID_ENV, "interface name is empty")
    if len(name) > 15:
        raise CniError(ERR_INVALID_ENV, "interface name is too long", f"interface name should be less than 16 characters: {name}")
    if name in (".", ".."):
        raise CniError(ERR_INVALID_ENV, "interface name is . or ..", name)
    if any(c in name for c in "/:") or any(c.isspace() for c in name):
        raise CniError(ERR_INVALID_ENV, "interface name contains / or : or whitespace characters", name)


def parse_cni_args(text: str) -> dict[str, str]:
    """``K=V;K=V`` (runtimes add keys in any order); pairs without ``=`` are skipped:
    nothing here depends on them and DEL must not fail over them."""
    out: dict[str, str] = {}
    for pair in text.split(";"):
        key, sep, value = pair.partition("=")
        if sep and key.strip():
            out[key.strip()] = value.strip()
    return out


REQUIRED_ENV = {
    "ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
    "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
    "DEL": ("CNI_CONTAINERID", "CNI_IFNAME", "CNI_PATH"),
    "VERSION": (),
    "STATUS": (),
    "GC": (),
}


def check_env(command: str, env: Mapping[str, str]) -> None:
    missing = [k for k in REQUIRED_ENV[command] if not env.get(k)]
    if missing:
        raise CniError(ERR_INVALID_ENV, f"required env variables [{','.join(missing)}] missing")
    if command in ("ADD", "CHECK", "DEL"):
        if not valid_id(env["CNI_CONTAINERID"]):
            raise CniError(ERR_INVALID_ENV, "invalid characters in containerID", env["CNI_CONTAINERID"])
        validate_ifname(env["CNI_IFNAME"])
        netns = env.get("CNI_NETNS", "")
        if netns and not netns.startswith("/"):
            raise CniError(ERR_INVALID_ENV, f"CNI_NETNS must be an absolute path, not {netns!r}")


class Config:
    """The network configuration on stdin, validated."""

    def __init__(self, doc: Mapping[str, Any]) -> None:
        self.doc = doc
        version = doc.get("cniVersion")
        if not isinstance(version, str) or not version:
            raise CniError(ERR_INVALID_CONFIG, "cniVersion missing from the network configuration")
        self.version = version
        if version not in SUPPORTED_VERSIONS:
            raise CniError(ERR_INCOMPATIBLE_VERSION, "incompatible CNI versions",
                           f"config is \"{version}\", plugin supports {list(SUPPORTED_VERSIONS)}")
        name = doc.get("name")
        if not isinstance(name, str) or not valid_id(name):
            raise CniError(ERR_INVALID_CONFIG, f"invalid network name {name!r}")
        self.socket = doc.get("socket", DEFAULT_SOCKET)
        if not isinstance(self.socket, str) or not self.socket.startswith("/"):
            raise CniError(ERR_INVALID_CONFIG, f"socket must be an absolute path, not {self.socket!r}")
        timeout = doc.get("timeout", DEFAULT_TIMEOUT)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= 3600:
            raise CniError(ERR_INVALID_CONFIG, f"timeout must be a number of seconds in (0, 3600], not {timeout!r}")
        self.timeout = float(timeout)
        self.selector = parse_selector(doc.get("selector", "all"))
        prev = doc.get("prevResult")
        if prev is not None and not isinstance(prev, dict):
            raise CniError(ERR_DECODE, "prevResult is not a JSON object")
        self.prev_result: dict[str, Any] | None = prev
        runtime = doc.get("runtimeConfig")
        if runtime is not None and not isinstance(runtime, dict):
            raise CniError(ERR_INVALID_CONFIG, "runtimeConfig is not a JSON object")
        self.runtime_config: dict[str, Any] = runtime or {}

    def at_least(self, version: str) -> bool:
        return _version_tuple(self.version) >= _version_tuple(version)

    def annotations(self) -> dict[str, str] | None:
        """The Pod's annotations, or None when the runtime passed none (the conflist
        does not declare the capability, or the runtime does not support it)."""
        value = self.runtime_config.get(ANNOTATIONS_CAPABILITY)
        if not isinstance(value, dict):
            return None
        return {str(k): str(v) for k, v in value.items()}


def parse_selector(value: Any) -> tuple[str, str | None] | None:
    """None for "all"; (key, value or None) for an annotation selector."""
    if value == "all":
        return None
    if isinstance(value, dict) and set(value) <= {"annotation", "value"}:
        key = value.get("annotation")
        want = value.get("value")
        if isinstance(key, str) and key and (want is None or isinstance(want, str)):
            return (key, want)
    raise CniError(ERR_INVALID_CONFIG, "invalid selector",
                   f'selector must be "all" or {{"annotation": KEY, "value": VALUE}}, not {json.dumps(value)}')


def selected(config: Config) -> bool:
    if config.selector is None:
        return True
    key, want = config.selector
    annotations = config.annotations()
    if annotations is None:
        raise CniError(ERR_INVALID_CONFIG, f"selector by annotation {key!r} needs the Pod's annotations",
                       f'declare "capabilities": {{"{ANNOTATIONS_CAPABILITY}": true}} for {PLUGIN} in the conflist')
    if key not in annotations:
        return False
    return want is None or annotations[key] == want


def read_stdin(stdin: TextIO) -> str:
    """The network configuration, at most MAX_LINE characters (the static plugin's and
    the agent's limit): a runtime never sends that much, and reading without a bound
    would take whatever memory a runaway writer fills the pipe with."""
    text = stdin.read(MAX_LINE + 1)
    if len(text) > MAX_LINE:
        raise CniError(ERR_DECODE, "cannot decode the network configuration", "larger than 1 MiB")
    return text


def read_config(stdin: TextIO) -> Config:
    text = read_stdin(stdin)
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise CniError(ERR_DECODE, "cannot decode the network configuration", str(exc)) from None
    except RecursionError:  # the static plugin's tokenizer has no depth limit to stop it
        raise CniError(ERR_DECODE, "cannot decode the network configuration", "nested too deeply") from None
    if not isinstance(doc, dict):
        raise CniError(ERR_DECODE, "the network configuration is not a JSON object")
    try:
        return Config(doc)
    except CniError as exc:
        if doc.get("cniVersion") in SUPPORTED_VERSIONS:
            exc.version = doc["cniVersion"]
        raise


# --------------------------------------------------------------------------------------
# the agent


class Unreachable(Exception):
    """The agent did not answer (no socket, refused, timed out, hung up)."""


def call_agent(path: str, request: Mapping[str, Any], timeout: float) -> dict[str, Any]:
    """Send one request; return the answer. Raises Unreachable."""
    deadline = time.monotonic() + timeout
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except FileNotFoundError:
            raise Unreachable(f"no agent socket at {path} (is the svcproxy agent running on this node?)") from None
        except ConnectionRefusedError:
            raise Unreachable(f"the agent socket {path} refuses connections (the svcproxy agent is not running)") from None
        except PermissionError:
            raise Unreachable(f"permission denied on the agent socket {path} (the plugin must run as root)") from None
        except OSError as exc:
            raise Unreachable(f"cannot connect to the agent socket {path}: {exc.strerror or exc}") from None
        try:
            sock.sendall(json.dumps(request, separators=(",", ":")).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise socket.timeout()
                sock.settimeout(left)
                chunk = sock.recv(65536)
                if not chunk:
                    raise Unreachable(f"the agent closed the connection on {path} without answering")
                data += chunk
                if len(data) > MAX_LINE:
                    raise Unreachable(f"the agent's answer on {path} is too long")
        except socket.timeout:
            raise Unreachable(f"the agent did not answer within {timeout:g}s on {path}") from None
        except OSError as exc:
            raise Unreachable(f"lost the connection to the agent on {path}: {exc.strerror or exc}") from None
    finally:
        sock.close()
    try:
        answer = json.loads(data)
    except ValueError:
        raise Unreachable(f"the agent's answer on {path} is not JSON: {data[:200]!r}") from None
    if not isinstance(answer, dict) or not isinstance(answer.get("ok"), bool):
        raise Unreachable(f"the agent's answer on {path} is malformed: {data[:200]!r}")
    return answer


def pod_request(op: str, env: Mapping[str, str], config: Config, timeout: float) -> dict[str, Any]:
    args = parse_cni_args(env.get("CNI_ARGS", ""))
    return {
        "op": op,
        "netns": env.get("CNI_NETNS", ""),
        "containerId": env.get("CNI_CONTAINERID", ""),
        "ifname": env.get("CNI_IFNAME", ""),
        "pod": {
            "namespace": args.get("K8S_POD_NAMESPACE", ""),
            "name": args.get("K8S_POD_NAME", ""),
            "uid": args.get("K8S_POD_UID", ""),
            "annotations": config.annotations() or {},
        },
        # The agent answers a little before we give up, with its own reason.
        "timeout": timeout - min(1.0, timeout / 2),
    }


def _pod_name(env: Mapping[str, str]) -> str:
    args = parse_cni_args(env.get("CNI_ARGS", ""))
    if args.get("K8S_POD_NAME"):
        return f"Pod {args.get('K8S_POD_NAMESPACE', '')}/{args['K8S_POD_NAME']}"
    return f"container {env.get('CNI_CONTAINERID', '')}"


# --------------------------------------------------------------------------------------
# commands


def passthrough(config: Config) -> dict[str, Any]:
    assert config.prev_result is not None
    result = {"cniVersion": config.version}
    result.update((k, v) for k, v in config.prev_result.items() if k != "cniVersion")
    return result


def require_prev_result(config: Config) -> None:
    if config.prev_result is None:
        raise CniError(ERR_INVALID_CONFIG, "must be called as chained plugin",
                       "prevResult is missing: put svcproxy-cni after the plugin that sets up the Pod's interface")


def cmd_add(env: Mapping[str, str], config: Config, call: Caller = call_agent) -> dict[str, Any]:
    require_prev_result(config)
    if not selected(config):
        return passthrough(config)
    request = pod_request("attach", env, config, config.timeout)
    try:
        answer = call(config.socket, request, config.timeout)
    except Unreachable as exc:
        raise CniError(ERR_TRY_AGAIN_LATER, f"svcproxy agent unavailable: {exc}",
                       f"the Services of {_pod_name(env)} cannot be programmed in {env['CNI_NETNS']} yet") from None
    if not answer["ok"]:
        code = answer.get("code")
        if not isinstance(code, int) or isinstance(code, bool) or code <= 0:
            code = ERR_TRY_AGAIN_LATER
        raise CniError(code, f"svcproxy agent: {answer.get('error') or 'attach failed'}",
                       f"{_pod_name(env)}, network namespace {env['CNI_NETNS']}")
    return passthrough(config)


def cmd_del(env: Mapping[str, str], config: Config, call: Caller = call_agent,
            stderr: TextIO | None = None) -> None:
    if not env.get("CNI_NETNS") and not env.get("CNI_CONTAINERID"):
        return
    timeout = min(config.timeout, DEL_TIMEOUT)
    try:
        answer = call(config.socket, pod_request("detach", env, config, timeout), timeout)
    except Unreachable as exc:
        # The agent's periodic scan forgets namespaces that vanished: nothing is lost.
        log(f"DEL {_pod_name(env)}: {exc}; the agent will forget the namespace when it is gone", stderr)
        return
    if not answer["ok"]:
        log(f"DEL {_pod_name(env)}: the agent answered: {answer.get('error')}", stderr)


def cmd_check(env: Mapping[str, str], config: Config, call: Caller = call_agent) -> None:
    if not config.at_least("0.4.0"):
        raise CniError(ERR_INCOMPATIBLE_VERSION, "config version does not allow CHECK", config.version)
    require_prev_result(config)
    if not selected(config):
        return
    try:
        answer = call(config.socket, pod_request("status", env, config, config.timeout), config.timeout)
    except Unreachable as exc:
        raise CniError(ERR_TRY_AGAIN_LATER, f"svcproxy agent unavailable: {exc}") from None
    if not answer["ok"]:
        raise CniError(ERR_NOT_ATTACHED, f"svcproxy agent: {answer.get('error') or 'namespace not programmed'}",
                       f"{_pod_name(env)}, network namespace {env['CNI_NETNS']}")


def cmd_status(config: Config, call: Caller = call_agent, stderr: TextIO | None = None) -> None:
    if not config.at_least("1.1.0"):
        raise CniError(ERR_INCOMPATIBLE_VERSION, "config version does not allow STATUS", config.version)
    timeout = min(config.timeout, DEL_TIMEOUT)
    try:
        answer = call(config.socket, {"op": "status"}, timeout)
    except Unreachable as exc:
        raise CniError(ERR_NOT_AVAILABLE, f"plugin not available: svcproxy agent unreachable: {exc}") from None
    if not answer["ok"]:
        raise CniError(ERR_NOT_AVAILABLE, f"plugin not available: svcproxy agent: {answer.get('error')}")
    if answer.get("initialized") is False:
        log("the agent is up but has not listed Services yet: ADD will wait for its first sync", stderr)


def cmd_gc(config: Config) -> None:
    if not config.at_least("1.1.0"):
        raise CniError(ERR_INCOMPATIBLE_VERSION, "config version does not allow GC", config.version)
    # Nothing to collect: see the module docstring.


def cmd_version(stdin: TextIO) -> dict[str, Any]:
    version = LATEST
    try:
        doc = json.loads(read_stdin(stdin) or "{}")
    except (ValueError, RecursionError, CniError):  # VERSION answers whatever the configuration is
        doc = {}
    if isinstance(doc, dict) and doc.get("cniVersion") in SUPPORTED_VERSIONS:
        version = doc["cniVersion"]
    return {"cniVersion": version, "supportedVersions": list(SUPPORTED_VERSIONS)}


def run(env: Mapping[str, str], stdin: TextIO, stdout: TextIO, *, call: Caller = call_agent,
        stderr: TextIO | None = None) -> int:
    """One plugin invocation; returns the exit status. The agent runs this too, with
    its own handler as ``call``, for the requests the static plugin forwards."""
    version = LATEST
    try:
        command = env.get("CNI_COMMAND", "")
        if not command:
            raise CniError(ERR_INVALID_ENV, "required env variables [CNI_COMMAND] missing")
        if command not in REQUIRED_ENV:
            raise CniError(ERR_INVALID_ENV, f"unknown CNI_COMMAND: {command}")
        check_env(command, env)
        if command == "VERSION":
            json.dump(cmd_version(stdin), stdout)
            stdout.write("\n")
            return 0
        config = read_config(stdin)
        version = config.version
        if command == "ADD":
            json.dump(cmd_add(env, config, call), stdout)
            stdout.write("\n")
        elif command == "DEL":
            cmd_del(env, config, call, stderr)
        elif command == "CHECK":
            cmd_check(env, config, call)
        elif command == "STATUS":
            cmd_status(config, call, stderr)
        else:
            cmd_gc(config)
        return 0
    except CniError as exc:
        json.dump(exc.json(exc.version or version), stdout)
        stdout.write("\n")
        log(f"{env.get('CNI_COMMAND', '?')} failed: {exc.msg}{': ' + exc.details if exc.details else ''}", stderr)
        return 1


def main() -> NoReturn:
    try:
        rc = run(os.environ, sys.stdin, sys.stdout)
    except Exception as exc:  # never leave the runtime without a CNI error
        json.dump(CniError(999, f"{PLUGIN}: internal error: {exc!r}").json(LATEST), sys.stdout)
        sys.stdout.write("\n")
        rc = 1
    sys.stdout.flush()
    sys.exit(rc)


if __name__ == "__main__":
    main()
