"""The agent's side of ``svcproxy-cni``: a root-only unix socket that attaches Pod
network namespaces on request.

Security: the socket is mode 0600 in a directory of its own with mode 0700 (created
if missing; an existing one must belong to the agent's user and is tightened to 0700
only when it holds nothing but the socket), and every connection's peer must be
root or the agent's own user (SO_PEERCRED).

Protocol: line-delimited JSON, any number of requests per connection, each answered
by one line. Requests::

    {"op": "attach", "netns": PATH, "containerId": ID, "ifname": NAME,
     "pod": {"namespace": NS, "name": NAME, "uid": UID, "annotations": {..}},
     "timeout": SECONDS}
    {"op": "detach", "netns": PATH or "", "containerId": ID, "ifname": NAME}
    {"op": "status"}                    # the agent itself
    {"op": "status", "netns": PATH}     # one namespace
    {"op": "cni", "env": {"CNI_COMMAND": .., ...}, "stdin": CONFIG}

The last is what the static plugin (``cni/svcproxy-cni.c``) sends: the whole CNI
invocation, its ``CNI_*`` variables and the network configuration it read on stdin.
The agent runs the plugin's logic (``svcproxy.podns.cni.run``) on it, with its own
handler in place of the socket, and answers ``{"ok": true, "rc": N, "stdout": TEXT,
"stderr": TEXT}``: what the plugin prints and its exit status. So the executable on
the host holds no logic but what it needs when the agent does not answer.

Answers: ``{"ok": true, ...}`` or ``{"ok": false, "error": MESSAGE, "code": N}``
where N is the CNI error code the plugin reports (11: try again later, 3: the
namespace is gone, 4: CNI_NETNS is not a network namespace, 100: the agent could not
attach it, 101: not attached). Other fields: attach -> ``elapsed``, or ``served``
false with a ``message`` under ``--pod-netns-mode off`` (ok: nothing to wait for);
detach -> ``detached`` (false when it was not attached: not an error); status ->
``initialized``, ``attached`` (count; ``message`` "waiting for the first sync" before
the agent's first sync) or ``state`` for one namespace (``programmed``,
``not-served``: ok; ``pending``, ``waiting-first-sync``, ``absent``: not ok).

attach blocks until the namespace's table is programmed (or the request's timeout,
capped by the agent's ``--cni-timeout``, runs out; the namespace then stays attached
and a retried ADD only waits) and is idempotent. Namespaces are named by path, and a
path naming a namespace the agent already serves under another path (same nsfs
inode: /var/run/netns/X and /run/netns/X, or the scan's name) resolves to that one.
A namespace attached through the socket is detached when the last (containerId,
ifname) that attached it is deleted; DEL with an empty netns finds the namespace by
its containerId.
"""

from __future__ import annotations

import errno
import fcntl
import io
import json
import logging
import os
import socket
import socketserver
import stat
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol

from svcproxy.logformat import about
from svcproxy.podns.netns import NamespaceGone, NodeNamespace

from svcproxy.podns import cni
from svcproxy.podns.cni import (
    DEFAULT_SOCKET,
    ERR_ATTACH_FAILED,
    ERR_INVALID_ENV,
    ERR_NOT_ATTACHED,
    ERR_TRY_AGAIN_LATER,
    ERR_UNKNOWN_CONTAINER,
    MAX_LINE,
)

log = logging.getLogger("svcproxy.cni")

__all__ = ["Attacher", "CniServer", "NamespacesAttacher", "PodInfo", "ServerError", "DEFAULT_SOCKET", "check_netns"]

DEFAULT_TIMEOUT = 30.0
#: A connection with no request for this long is closed.
IDLE_TIMEOUT = 60.0
NS_GET_NSTYPE = 0xB703
CLONE_NEWNET = 0x40000000

PROGRAMMED, PENDING, WAITING_FIRST_SYNC, ABSENT = "programmed", "pending", "waiting-first-sync", "absent"
#: --pod-netns-mode off: the agent does not serve Pod namespaces (ADD and CHECK pass).
NOT_SERVED = "not-served"
#: The variables a forwarded CNI invocation may carry (the plugin sends those it has).
CNI_ENV = ("CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS", "CNI_PATH")


class ServerError(OSError):
    """The socket cannot be served (directory, permissions, another agent)."""


class RequestError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class PodInfo:
    namespace: str = ""
    name: str = ""
    uid: str = ""
    annotations: Mapping[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"Pod {self.namespace}/{self.name}" if self.name else "a Pod"


def _about_pod(pod: PodInfo) -> dict[str, Any]:
    """The Pod a log record is about, for JSON logs (nothing when the runtime sent none)."""
    return about("Pod", pod.namespace, pod.name) if pod.name else {}


class Attacher(Protocol):
    """What the server asks of the agent. Namespaces are named by path; ``resolve``
    maps a path to the name the agent already serves that namespace under, if any."""

    def resolve(self, netns: str) -> str:
        ...

    def attach(self, netns: str, pod: PodInfo) -> bool:
        """Start serving the namespace (no-op if served already). False when the agent
        does not serve Pod namespaces at all (--pod-netns-mode off). Raises
        NamespaceGone if it vanished, anything else to refuse."""
        ...

    def wait(self, netns: str, timeout: float) -> bool:
        """True once the namespace's table has been programmed."""
        ...

    def detach(self, netns: str) -> bool:
        """Stop serving it; False if it was not attached."""
        ...

    def state(self, netns: str) -> str:
        """One of PROGRAMMED, PENDING, WAITING_FIRST_SYNC, ABSENT, NOT_SERVED."""
        ...

    def initialized(self) -> bool:
        """Whether the agent has done its first sync (Services listed)."""
        ...

    def attached(self) -> list[str]:
        ...


# --------------------------------------------------------------------------------------
# the agent's attacher


class NamespacesAttacher:
    """The agent's attacher: ``svcproxy.podns.attach.PodNamespaces``, which follows
    ``--pod-netns-mode`` (replicate: a table per namespace; kernel: the node's table,
    so "programmed" means the node's was; off: not served)."""

    def __init__(self, namespaces: Any) -> None:
        self.namespaces = namespaces
        self.proxier = namespaces.proxier

    def resolve(self, netns: str) -> str:
        """A namespace attached under another path (the scan's /run/netns/X when the
        runtime says /var/run/netns/X, say) is the same namespace: same nsfs inode."""
        from svcproxy.podns.attach import netns_id

        try:
            ident = netns_id(netns)
        except Exception:  # gone, or not a namespace: keep the path as given
            return netns
        known = self.namespaces.known()
        if known.get(netns) == ident:
            return netns
        return next((path for path, other in sorted(known.items()) if other == ident), netns)

    def attach(self, netns: str, pod: PodInfo) -> bool:
        from svcproxy.podns.attach import AttachResult

        result = self.namespaces.attach(netns)
        if result is AttachResult.GONE:
            raise NamespaceGone(f"network namespace {netns} is gone")
        if result is AttachResult.NODE:
            raise NodeNamespace(f"{netns} is the node's own network namespace, not a Pod's")
        if result is AttachResult.REFUSED:
            return False
        log.info("CNI: %s network namespace %s (%s)", "serving" if result is AttachResult.ATTACHED
                 else "kernel mode, nothing to attach for", netns, pod, extra=_about_pod(pod))
        return True

    def wait(self, netns: str, timeout: float) -> bool:
        return bool(self.namespaces.wait_attached(netns, timeout))

    def detach(self, netns: str) -> bool:
        return bool(self.namespaces.detach(netns))

    def state(self, netns: str) -> str:
        from svcproxy.podns.mode import Mode

        decision = self.namespaces.decision
        if decision.effective is Mode.OFF:
            return NOT_SERVED
        if decision.shared:
            programmed = self.proxier.node_target.synced.is_set()
        elif netns not in self.proxier.pod_targets:
            return ABSENT
        else:
            programmed = self.proxier.wait_attached(netns, 0)
        if programmed:
            return PROGRAMMED
        return PENDING if self.proxier.initialized else WAITING_FIRST_SYNC

    def initialized(self) -> bool:
        return bool(self.proxier.initialized)

    def attached(self) -> list[str]:
        return sorted(self.namespaces.known())


# --------------------------------------------------------------------------------------
# requests


_nsfs_dev: int | None = None


def check_netns(path: str) -> None:
    """Raise RequestError unless ``path`` is a network namespace file (nsfs)."""
    global _nsfs_dev
    if _nsfs_dev is None:
        _nsfs_dev = os.stat("/proc/self/ns/net").st_dev
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise RequestError(f"network namespace {path} does not exist (the sandbox is gone?)",
                           ERR_UNKNOWN_CONTAINER) from None
    except OSError as exc:
        raise RequestError(f"cannot stat network namespace {path}: {exc.strerror}", ERR_INVALID_ENV) from None
    if st.st_dev != _nsfs_dev or not stat.S_ISREG(st.st_mode):
        raise RequestError(f"{path} is not a network namespace (not an nsfs file)", ERR_INVALID_ENV)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise RequestError(f"cannot open network namespace {path}: {exc.strerror}", ERR_INVALID_ENV) from None
    try:
        kind = fcntl.ioctl(fd, NS_GET_NSTYPE)
    except OSError as exc:
        if exc.errno not in (errno.ENOTTY, errno.EINVAL):  # old kernel: st_dev has to do
            raise RequestError(f"cannot inspect namespace {path}: {exc.strerror}", ERR_INVALID_ENV) from None
        kind = CLONE_NEWNET
    finally:
        os.close(fd)
    if kind != CLONE_NEWNET:
        raise RequestError(f"{path} is a namespace but not a network namespace", ERR_INVALID_ENV)


def _str(doc: Mapping[str, Any], key: str, *, required: bool = False) -> str:
    value = doc.get(key, "")
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise RequestError(f"{key} must be a string", ERR_INVALID_ENV)
    if required and not value:
        raise RequestError(f"{key} is required", ERR_INVALID_ENV)
    return value


@dataclass(frozen=True)
class Request:
    op: str
    netns: str
    container_id: str
    ifname: str
    pod: PodInfo
    timeout: float | None

    @classmethod
    def parse(cls, doc: Any) -> "Request":
        if not isinstance(doc, dict):
            raise RequestError("a request is a JSON object", ERR_INVALID_ENV)
        op = doc.get("op")
        if op not in ("attach", "detach", "status"):
            raise RequestError(f"unknown op {op!r} (attach, detach or status)", ERR_INVALID_ENV)
        netns = _str(doc, "netns", required=op == "attach")
        if netns and not netns.startswith("/"):
            raise RequestError(f"netns must be an absolute path, not {netns!r}", ERR_INVALID_ENV)
        pod_doc = doc.get("pod") or {}
        if not isinstance(pod_doc, dict):
            raise RequestError("pod must be an object", ERR_INVALID_ENV)
        annotations = pod_doc.get("annotations") or {}
        if not isinstance(annotations, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in annotations.items()):
            raise RequestError("pod.annotations must map strings to strings", ERR_INVALID_ENV)
        pod = PodInfo(_str(pod_doc, "namespace"), _str(pod_doc, "name"), _str(pod_doc, "uid"), annotations)
        timeout = doc.get("timeout")
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                    or not 0 <= timeout < 86400):
            raise RequestError("timeout must be a number of seconds", ERR_INVALID_ENV)
        return cls(op, os.path.normpath(netns) if netns else "", _str(doc, "containerId"), _str(doc, "ifname"),
                   pod, float(timeout) if timeout is not None else None)


# --------------------------------------------------------------------------------------
# the server


def _peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])


class _Handler(socketserver.StreamRequestHandler):
    server: "_UnixServer"

    def handle(self) -> None:
        owner: CniServer = self.server.owner
        uid = _peer_uid(self.connection)
        if uid not in (0, os.geteuid()):
            log.warning("refused a CNI socket connection from uid %d", uid)
            self.connection.settimeout(5.0)
            try:  # answer the first request (a client that is still sending sees the answer, not EPIPE)
                self.rfile.readline(MAX_LINE + 1)
                self._send({"ok": False, "error": "permission denied", "code": ERR_INVALID_ENV})
            except OSError:
                pass
            return
        self.connection.settimeout(IDLE_TIMEOUT)
        while not owner.stopping.is_set():
            try:
                line = self.rfile.readline(MAX_LINE + 1)
            except (OSError, socket.timeout):
                return
            if not line:
                return
            if len(line) > MAX_LINE or not line.endswith(b"\n"):
                self._send({"ok": False, "error": "request too long or not terminated by a newline",
                            "code": ERR_INVALID_ENV})
                return
            if not line.strip():
                continue
            try:
                self._send(owner.handle_line(line))
            except OSError:
                return

    def _send(self, answer: Mapping[str, Any]) -> None:
        self.wfile.write(json.dumps(answer, separators=(",", ":")).encode() + b"\n")
        self.wfile.flush()


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    block_on_close = False
    owner: "CniServer"


class CniServer:
    """Serves ``path`` for the CNI plugin; ``start()``, then ``stop()``."""

    def __init__(self, path: str, attacher: Attacher, *, timeout: float = DEFAULT_TIMEOUT,
                 verify_netns: Callable[[str], None] = check_netns,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.path = os.path.abspath(path)
        self.attacher = attacher
        self.timeout = timeout
        self.verify_netns = verify_netns
        self._monotonic = monotonic
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        #: The (containerId, ifname) pairs that attached each namespace through us.
        self._users: dict[str, set[tuple[str, str]]] = {}
        self._server: _UnixServer | None = None
        self._thread: threading.Thread | None = None
        self._inode: tuple[int, int] | None = None

    # --- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        directory = os.path.dirname(self.path)
        self._prepare_directory(directory)
        self._remove_stale()
        server = _UnixServer(self.path, _Handler, bind_and_activate=False)
        server.owner = self
        try:
            server.server_bind()
            os.chmod(self.path, 0o600)
            st = os.stat(self.path)
            self._inode = (st.st_dev, st.st_ino)
            server.server_activate()
        except OSError as exc:
            server.server_close()
            raise ServerError(f"cannot listen on {self.path}: {exc.strerror or exc}") from exc
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="svcproxy-cni-server", daemon=True)
        self._thread.start()
        log.info("serving the CNI plugin on %s", self.path)

    def stop(self) -> None:
        self.stopping.set()
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)
        try:
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self._inode:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        self._server = None

    def __enter__(self) -> "CniServer":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _prepare_directory(self, directory: str) -> None:
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            st = os.lstat(directory)
        except OSError as exc:
            raise ServerError(f"cannot create {directory} for the CNI socket: {exc.strerror or exc}") from exc
        if not stat.S_ISDIR(st.st_mode):
            raise ServerError(f"{directory} is not a directory")
        if st.st_uid != os.geteuid():
            raise ServerError(f"{directory} belongs to uid {st.st_uid}, not to the agent: "
                              "give the CNI socket a directory of its own")
        if st.st_mode & 0o077:
            others = sorted(set(os.listdir(directory)) - {os.path.basename(self.path)})
            if others:
                raise ServerError(f"{directory} is open to other users (mode {stat.S_IMODE(st.st_mode):o}) and "
                                  f"holds other files ({', '.join(others[:3])}): give the CNI socket a "
                                  "directory of its own")
            os.chmod(directory, 0o700)
            log.info("tightened %s to mode 700", directory)

    def _remove_stale(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise ServerError(f"{self.path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(self.path)
        except OSError:
            os.unlink(self.path)  # left by an agent that did not exit cleanly
            return
        finally:
            probe.close()
        raise ServerError(f"another process already serves {self.path} (a second agent?)")

    # --- requests -----------------------------------------------------------------------

    def handle_line(self, line: bytes) -> dict[str, Any]:
        try:
            doc = json.loads(line)
        except ValueError:
            return {"ok": False, "error": "request is not JSON", "code": ERR_INVALID_ENV}
        except RecursionError:  # "[[[[..." within MAX_LINE: deeper than the decoder goes
            return {"ok": False, "error": "request is not JSON (nested too deeply)", "code": ERR_INVALID_ENV}
        if isinstance(doc, dict) and doc.get("op") == "cni":
            return self._invocation(doc)
        return self.handle_doc(doc)

    def handle_doc(self, doc: Any) -> dict[str, Any]:
        """One request, already decoded."""
        try:
            req = Request.parse(doc)
            if req.op == "attach":
                return self._attach(req)
            if req.op == "detach":
                return self._detach(req)
            return self._status(req)
        except RequestError as exc:
            return {"ok": False, "error": str(exc), "code": exc.code}
        except Exception as exc:  # the agent's own failure: answer, log, keep serving
            log.exception("CNI request %s failed", doc.get("op") if isinstance(doc, dict) else "?")
            return {"ok": False, "error": f"internal error: {exc}", "code": ERR_ATTACH_FAILED}

    def _invocation(self, doc: Mapping[str, Any]) -> dict[str, Any]:
        """A whole CNI invocation forwarded by the static plugin: run the plugin's
        logic here, its calls to the agent answered by this server directly."""
        env, stdin = doc.get("env"), doc.get("stdin")
        if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
            return {"ok": False, "error": "env must map names to strings", "code": ERR_INVALID_ENV}
        if not isinstance(stdin, str):
            return {"ok": False, "error": "stdin must be a string", "code": ERR_INVALID_ENV}
        unknown = sorted(set(env) - set(CNI_ENV))
        if unknown:
            return {"ok": False, "error": f"unexpected variables in env: {', '.join(unknown[:5])}",
                    "code": ERR_INVALID_ENV}
        out, err = io.StringIO(), io.StringIO()

        def call(path: str, request: Mapping[str, Any], timeout: float) -> dict[str, Any]:
            return self.handle_doc(dict(request))

        try:
            rc = cni.run(env, io.StringIO(stdin), out, call=call, stderr=err)
        except Exception as exc:  # never leave the runtime without a CNI error
            log.exception("CNI %s failed", env.get("CNI_COMMAND", "?"))
            return {"ok": False, "error": f"internal error: {exc}", "code": ERR_ATTACH_FAILED}
        if rc != 0 or err.getvalue():
            log.info("CNI %s for %s: exit %d %s", env.get("CNI_COMMAND", "?"), env.get("CNI_NETNS") or
                     env.get("CNI_CONTAINERID", "?"), rc, err.getvalue().strip())
        return {"ok": True, "rc": rc, "stdout": out.getvalue(), "stderr": err.getvalue()}

    def _attach(self, req: Request) -> dict[str, Any]:
        start = self._monotonic()
        timeout = self.timeout if req.timeout is None else min(req.timeout, self.timeout)
        self.verify_netns(req.netns)
        name = self.attacher.resolve(req.netns)
        with self._lock:
            # Forget the users of namespaces that vanished without a DEL reaching us.
            for gone in [ns for ns in self._users if ns != name and not os.path.exists(ns)]:
                del self._users[gone]
            self._users.setdefault(name, set()).add((req.container_id, req.ifname))
        try:
            served = self.attacher.attach(name, req.pod)
        except NamespaceGone as exc:
            raise RequestError(f"network namespace {req.netns} is gone: {exc}", ERR_UNKNOWN_CONTAINER) from exc
        except Exception as exc:
            log.error("cannot attach network namespace %s (%s): %s", name, req.pod, exc, extra=_about_pod(req.pod))
            raise RequestError(f"cannot attach {req.netns}: {exc}", ERR_ATTACH_FAILED) from exc
        if not served:
            return {"ok": True, "served": False,
                    "message": "the agent does not serve Pod namespaces (--pod-netns-mode off)"}
        if self.attacher.wait(name, timeout):
            elapsed = self._monotonic() - start
            log.info("network namespace %s (%s) programmed after %.3fs", name, req.pod, elapsed,
                     extra=_about_pod(req.pod))
            return {"ok": True, "elapsed": round(elapsed, 6)}
        state = self.attacher.state(name)
        if state == PROGRAMMED:  # just made it
            return {"ok": True, "elapsed": round(self._monotonic() - start, 6)}
        if state == ABSENT:
            raise RequestError(f"network namespace {req.netns} was detached while its table was being "
                               "programmed (it vanished?)", ERR_UNKNOWN_CONTAINER)
        if state == WAITING_FIRST_SYNC:
            why = "the agent is waiting for the first sync (Services and EndpointSlices not listed yet)"
        else:
            why = "its IPVS table is not programmed yet (see the agent's log)"
        log.warning("CNI attach of %s (%s) timed out after %.1fs: %s", name, req.pod, timeout, why)
        raise RequestError(f"timed out after {timeout:g}s attaching {req.netns}: {why}", ERR_TRY_AGAIN_LATER)

    def _detach(self, req: Request) -> dict[str, Any]:
        user = (req.container_id, req.ifname)
        with self._lock:
            if req.netns:
                name = req.netns if req.netns in self._users else self.attacher.resolve(req.netns)
            else:  # the runtime no longer knows the path: find it by the container
                name = next((ns for ns, users in self._users.items()
                             if any(c == req.container_id for c, _ in users)), "") if req.container_id else ""
            if not name:
                return {"ok": True, "detached": False}
            users = self._users.get(name)
            if users is not None:
                users.discard(user)
                if not req.ifname:
                    users -= {u for u in users if u[0] == req.container_id}
                if users:  # another interface of the Pod still uses it
                    return {"ok": True, "detached": False, "users": len(users)}
                del self._users[name]
        return {"ok": True, "detached": self.attacher.detach(name)}

    def _status(self, req: Request) -> dict[str, Any]:
        initialized = self.attacher.initialized()
        if not req.netns:
            doc: dict[str, Any] = {"ok": True, "initialized": initialized, "attached": len(self.attacher.attached())}
            if not initialized:
                doc["message"] = "waiting for the first sync"
            return doc
        state = self.attacher.state(self.attacher.resolve(req.netns))
        if state in (PROGRAMMED, NOT_SERVED):
            return {"ok": True, "state": state}
        messages = {
            ABSENT: f"network namespace {req.netns} is not attached"
                    + ("" if initialized else " (the agent is waiting for the first sync)"),
            WAITING_FIRST_SYNC: f"network namespace {req.netns}: waiting for the first sync",
            PENDING: f"network namespace {req.netns} is attached but its table is not programmed yet",
        }
        return {"ok": False, "state": state, "error": messages.get(state, state), "code": ERR_NOT_ATTACHED}
