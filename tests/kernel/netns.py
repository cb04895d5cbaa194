"""Helpers for kernel tests: network namespaces, veth pairs, tiny servers, clients.

Everything is plain subprocess + iproute2, with no module-level state: a namespace
is referred to by its name (as in ``ip netns exec NAME``); ``None`` means the
root namespace of the test VM.  :class:`Lab` keeps track of what one test created
and removes all of it on ``close()`` (the ``lab`` fixture in conftest.py does that).

Only use addresses inside namespaces the test creates (10.244.x.x for Pods,
10.96.x.x for VIPs, fd00:: for IPv6); these helpers run inside the test VM only.

This file is also a script, run inside a namespace with ``ip netns exec``::

    python3 netns.py serve --proto http|tcp|udp --port P --text NAME [--bind ADDR]
    python3 netns.py request --proto http|tcp|udp [--count N] [--timeout S] HOST PORT

A server answers every request with a body of at least two lines::

    NAME
    client=10.244.1.2 client_port=40312 server=10.244.2.2 server_port=8080

(``server=`` is the address the connection arrived on, i.e. the backend address
after any DNAT; UDP replies carry only ``client=``/``client_port=`` and then echo
the datagram they received).  ``request`` prints one JSON object per attempt.
"""

from __future__ import annotations

# Only light standard-library imports: this file also runs as a short-lived script
# inside the emulated VM, where every imported module costs real time.
import argparse
import json
import os
import selectors
import signal
import socket
import socketserver
import subprocess
import sys
import time
from dataclasses import dataclass

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Iterable, Sequence

SCRIPT = os.path.abspath(__file__)
# Interpreter for the script side (servers, clients): stdlib only, so use the
# system Python without site-packages (-I -S), which starts fastest in the VM.
HELPER_PYTHON = [
    "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable,
    "-I", "-S", "-B",
]
DEFAULT_PREFIX = "svct"
# Where `ip netns add` puts the namespaces the share-NS tests hand to svcproxy by path.
NETNS_DIR = "/var/run/netns"


@dataclass(frozen=True)
class Pod:
    """A Pod of the share-NS topologies: a named namespace with one address per family."""
    name: str
    ns: str
    ip4: str
    ip6: str

    @property
    def path(self) -> str:
        return f"{NETNS_DIR}/{self.ns}"

# --------------------------------------------------------------------------
# commands


class CommandError(RuntimeError):
    def __init__(self, cmd: Sequence[str], rc: int | None, stdout: str, stderr: str):
        self.cmd, self.rc, self.stdout, self.stderr = list(cmd), rc, stdout, stderr
        what = "timed out" if rc is None else f"exit {rc}"
        super().__init__(
            f"command {what}: {' '.join(cmd)}\n"
            f"--- stdout ---\n{stdout.rstrip()}\n--- stderr ---\n{stderr.rstrip()}"
        )


def ns_cmd(ns: str | None, cmd: Sequence[str]) -> list[str]:
    """``cmd`` wrapped to run inside namespace ``ns`` (as is, if ``ns`` is None):
    ``ip -n NS ...`` for ip itself (one process less), else ``ip netns exec NS ...``."""
    if not ns:
        return list(cmd)
    if cmd[0] == "ip" and cmd[1:2] != ["netns"]:
        return ["ip", "-n", ns, *cmd[1:]]
    return ["ip", "netns", "exec", ns, *cmd]


def run(
    cmd: Sequence[str],
    *,
    ns: str | None = None,
    check: bool = True,
    timeout: float = 60,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` (in ``ns``), capture text output; raise CommandError if it fails."""
    full = ns_cmd(ns, cmd)
    try:
        cp = subprocess.run(
            full, input=input, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        raise CommandError(full, None, out, err) from None
    if check and cp.returncode != 0:
        raise CommandError(full, cp.returncode, cp.stdout, cp.stderr)
    return cp


def unique_name(prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix}-{os.urandom(4).hex()}"


def _ifname(tag: str) -> str:
    name = f"v{os.urandom(4).hex()}{tag}"
    assert len(name) <= 15
    return name


# --------------------------------------------------------------------------
# namespaces, links, addresses


def netns_list() -> list[str]:
    out = run(["ip", "-j", "netns", "list"]).stdout.strip()
    return [e["name"] for e in json.loads(out)] if out else []


def netns_add(name: str | None = None, *, prefix: str = DEFAULT_PREFIX) -> str:
    """Create a namespace (unique name unless given) with loopback up; return its name."""
    name = name or unique_name(prefix)
    run(["ip", "netns", "add", name])
    try:
        link_up(name, "lo")
    except Exception:
        netns_delete(name)
        raise
    return name


def netns_pids(name: str) -> list[int]:
    cp = run(["ip", "netns", "pids", name], check=False)
    return [int(p) for p in cp.stdout.split()] if cp.returncode == 0 else []


def netns_delete(name: str) -> None:
    """Kill every process in the namespace, then delete it; no error if it is gone."""
    for _ in range(3):
        pids = netns_pids(name)
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    if os.path.exists(f"/run/netns/{name}"):
        run(["ip", "netns", "delete", name])


def veth(
    a_ns: str | None,
    b_ns: str | None,
    *,
    a_addrs: Iterable[str] = (),
    b_addrs: Iterable[str] = (),
    a_name: str | None = None,
    b_name: str | None = None,
) -> tuple[str, str]:
    """Create a veth pair with one end in ``a_ns`` and the other in ``b_ns``
    (None = root namespace), both up, with the given CIDRs on each end (see
    :func:`addr_add`). Returns the two interface names. Deleting either namespace
    removes the pair."""
    a_name, b_name = a_name or _ifname("a"), b_name or _ifname("b")
    cmd = ["ip", "link", "add", a_name]
    if a_ns:
        cmd += ["netns", a_ns]
    cmd += ["type", "veth", "peer", "name", b_name]
    if b_ns:
        cmd += ["netns", b_ns]
    run(cmd)
    for ns, dev, addrs in ((a_ns, a_name, a_addrs), (b_ns, b_name, b_addrs)):
        ip_batch(ns, [_addr_add_args(dev, cidr) for cidr in addrs] + [f"link set {dev} up"])
    return a_name, b_name


def ip_batch(ns: str | None, lines: Iterable[str]) -> None:
    """Several ``ip`` commands (``"link set X up"``, ...) in one process, in ``ns``."""
    run(["ip", "-batch", "-"], ns=ns, input="".join(f"{line}\n" for line in lines))


def link_up(ns: str | None, dev: str) -> None:
    run(["ip", "link", "set", dev, "up"], ns=ns)


def is_v6(addr: str) -> bool:
    """True for an IPv6 address or CIDR (anything with a colon)."""
    return ":" in addr


def _addr_add_args(dev: str, cidr: str) -> str:
    return f"addr add {cidr} dev {dev}" + (" nodad" if is_v6(cidr) else "")


def addr_add(ns: str | None, dev: str, cidr: str) -> None:
    """Add ``cidr`` (e.g. 10.244.1.2/24 or fd00::2/64) to ``dev``; IPv6 without DAD
    so it is usable at once."""
    run(["ip", *_addr_add_args(dev, cidr).split()], ns=ns)


def route_add(
    ns: str | None, dst: str, *, via: str | None = None, dev: str | None = None
) -> None:
    """``ip route replace dst [via GW] [dev DEV]``; dst may be ``default``/``default6``."""
    fam = []
    if dst == "default6":
        fam, dst = ["-6"], "default"
    elif via and is_v6(via):
        fam = ["-6"]
    cmd = ["ip", *fam, "route", "replace", dst]
    if via:
        cmd += ["via", via]
    if dev:
        cmd += ["dev", dev]
    run(cmd, ns=ns)


def default_route(ns: str | None, via: str, *, dev: str | None = None) -> None:
    route_add(ns, "default6" if is_v6(via) else "default", via=via, dev=dev)


def sysctl(ns: str | None, key: str, value: str | int, **more: str | int) -> None:
    """Set sysctls in ``ns`` (they are per namespace for net.*), e.g.
    ``sysctl(ns, "net.ipv4.vs.conntrack", 1)``; extra keys with dots as ``__``:
    ``sysctl(ns, "net.ipv4.ip_forward", 1, net__ipv6__conf__all__forwarding=1)``."""
    pairs = [f"{key}={value}"] + [f"{k.replace('__', '.')}={v}" for k, v in more.items()]
    run(["sysctl", "-qw", *pairs], ns=ns)


def sysctl_get(ns: str | None, key: str) -> str:
    return run(["sysctl", "-n", key], ns=ns).stdout.strip()


def wait_until(predicate: Any, timeout: float, what: str, interval: float = 0.5) -> Any:
    """Poll ``predicate`` until it returns something true (returned), or fail after
    ``timeout`` seconds naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def ipvsadm(ns: str | None, *args: str, input: str | None = None) -> str:
    """Run ipvsadm in ``ns``; return its stdout."""
    return run(["ipvsadm", *args], ns=ns, input=input).stdout


# --------------------------------------------------------------------------
# servers and clients (host side)


class Server:
    """A server process started by :func:`start_server`; ``stop()`` or use ``with``."""

    def __init__(self, proc: subprocess.Popen[str], ns: str | None, proto: str,
                 port: int, text: str):
        self.proc, self.ns, self.proto, self.port, self.text = proc, ns, proto, port, text

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=10)
        finally:
            if self.proc.stdout:
                self.proc.stdout.close()

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"Server({self.proto} {self.text!r} ns={self.ns} port={self.port})"


def start_server(
    ns: str | None,
    text: str,
    *,
    port: int = 0,
    proto: str = "http",
    bind: str = "",
    timeout: float = 60,
) -> Server:
    """Start ``netns.py serve`` in ``ns`` and wait until it listens.

    ``port=0`` picks a free port (see ``Server.port``); ``bind=""`` listens on all
    IPv4 and IPv6 addresses. The server answers with ``text`` on its first line."""
    cmd = ns_cmd(ns, [*HELPER_PYTHON, SCRIPT, "serve", "--proto", proto,
                      "--port", str(port), "--text", text, "--bind", bind])
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                proc.kill()
                proc.wait()
                raise RuntimeError(f"server {text!r} in {ns} not ready after {timeout}s: "
                                   f"{''.join(lines)}")
            line = proc.stdout.readline()
            if not line:
                proc.wait()
                raise RuntimeError(f"server {text!r} in {ns} exited "
                                   f"({proc.returncode}): {''.join(lines)}")
            if line.startswith("READY "):
                return Server(proc, ns, proto, int(line.split()[1]), text)
            lines.append(line)


class Reply:
    """One request's outcome, as printed by ``netns.py request``."""

    def __init__(self, ok: bool, text: str = "", body: str = "", source: str = "",
                 error: str = "", info: dict[str, str] | None = None):
        self.ok = ok
        self.text = text  # first line of the answer: the server's --text
        self.body = body  # the whole answer body
        self.source = source  # the client's own address:port, as the client saw it
        self.error = error  # why the request failed (ok=False)
        self.info = info or {}  # client=, client_port=, server=, server_port= (line 2)

    @property
    def client(self) -> str:
        """The client address as the server saw it (after any SNAT)."""
        return self.info.get("client", "")

    @property
    def server(self) -> str:
        """The address the server received on (the backend, after any DNAT)."""
        return self.info.get("server", "")

    def __repr__(self) -> str:
        if not self.ok:
            return f"Reply(ok=False, error={self.error!r})"
        return f"Reply(text={self.text!r}, info={self.info}, source={self.source!r})"


class RequestError(AssertionError):
    pass


def request_many(
    ns: str | None,
    host: str,
    port: int,
    count: int,
    *,
    proto: str = "http",
    timeout: float = 5.0,
    source: str = "",
    payload: str = "ping",
) -> list[Reply]:
    """``count`` requests, each on a new connection, from ``ns`` to host:port; failed
    attempts are returned as ``Reply(ok=False, error=...)`` (never raised).
    ``timeout`` is per attempt; the default is generous because the VM is emulated
    (and may share the machine): pass a short one when expecting failure."""
    cmd = [*HELPER_PYTHON, SCRIPT, "request", "--proto", proto, "--count", str(count),
           "--timeout", str(timeout), "--source", source, "--payload", payload,
           host, str(port)]
    cp = run(cmd, ns=ns, timeout=60 + count * (timeout + 1))
    replies = [Reply(**json.loads(line)) for line in cp.stdout.splitlines() if line]
    if len(replies) != count:
        raise RuntimeError(f"client printed {len(replies)} results, wanted {count}: "
                           f"{cp.stdout}{cp.stderr}")
    return replies


def request(
    ns: str | None,
    host: str,
    port: int,
    *,
    proto: str = "http",
    timeout: float = 5.0,
    source: str = "",
    payload: str = "ping",
    check: bool = True,
) -> Reply:
    """One request from ``ns``; raises RequestError on failure unless ``check=False``."""
    r = request_many(ns, host, port, 1, proto=proto, timeout=timeout, source=source,
                     payload=payload)[0]
    if check and not r.ok:
        raise RequestError(f"{proto} request from {ns} to {host}:{port} failed: {r.error}")
    return r


def curl(ns: str | None, url: str, *, timeout: float = 5.0, check: bool = True,
         extra: Iterable[str] = ()) -> subprocess.CompletedProcess[str]:
    """``curl -sS --max-time T URL`` from ``ns`` (for HTTP servers)."""
    return run(["curl", "-sS", "--noproxy", "*", "--max-time", str(timeout), *extra, url],
               ns=ns, check=check, timeout=timeout + 30)


# --------------------------------------------------------------------------
# Lab: what one test created, removed on close()


class Lab:
    """Tracks namespaces and servers created through it; ``close()`` removes them all
    (servers first, then namespaces, which also kills any process left in them)."""

    def __init__(self, prefix: str = DEFAULT_PREFIX):
        self.prefix = prefix
        self.namespaces: list[str] = []
        self.servers: list[Server] = []

    def netns(self, name: str | None = None) -> str:
        ns = netns_add(name, prefix=self.prefix)
        self.namespaces.append(ns)
        return ns

    def connect(
        self,
        a_ns: str | None,
        b_ns: str | None,
        a_addrs: Iterable[str] = (),
        b_addrs: Iterable[str] = (),
    ) -> tuple[str, str]:
        """veth between a_ns and b_ns (None = root) with the given CIDRs on each end;
        returns the interface names. A veth end in the root namespace goes away when
        the other end's namespace is deleted."""
        return veth(a_ns, b_ns, a_addrs=a_addrs, b_addrs=b_addrs)

    def server(self, ns: str | None, text: str, **kw: Any) -> Server:
        s = start_server(ns, text, **kw)
        self.servers.append(s)
        return s

    def close(self) -> None:
        errors: list[str] = []
        for s in reversed(self.servers):
            try:
                s.stop()
            except Exception as e:  # keep going: never leak the rest
                errors.append(f"{s}: {e}")
        for ns in reversed(self.namespaces):
            try:
                netns_delete(ns)
            except Exception as e:
                errors.append(f"netns {ns}: {e}")
        self.servers.clear()
        self.namespaces.clear()
        if errors:
            raise RuntimeError("lab cleanup failed:\n" + "\n".join(errors))

    def __enter__(self) -> "Lab":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------
# the script side: runs inside a namespace


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if host and is_v6(host) else socket.AF_INET


def _info(client: Any, server: Any = None) -> str:
    s = f"client={client[0]} client_port={client[1]}"
    if server is not None:
        s += f" server={server[0]} server_port={server[1]}"
    return s


def _plain(addr: Any) -> Any:
    """Strip the IPv4-mapped prefix a dual-stack socket reports."""
    host = addr[0]
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    return (host, addr[1])


def _serve(proto: str, bind: str, port: int, text: str) -> None:
    dual = bind == ""
    fam = socket.AF_INET6 if dual or is_v6(bind) else socket.AF_INET
    host = "::" if dual else bind

    class TCPHandler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            sock: socket.socket = self.request
            sock.settimeout(5)
            body = f"{text}\n{_info(_plain(sock.getpeername()), _plain(sock.getsockname()))}\n"
            try:
                if proto == "http":
                    data = b""
                    while b"\r\n\r\n" not in data and len(data) < 65536:
                        chunk = sock.recv(4096)
                        if not chunk:
                            break
                        data += chunk
                    raw = body.encode()
                    sock.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n"
                                 b"Content-Length: %d\r\nConnection: close\r\n\r\n"
                                 % len(raw) + raw)
                else:
                    sock.sendall(body.encode())
                    sock.shutdown(socket.SHUT_WR)
                    while sock.recv(4096):
                        pass
            except OSError:
                pass

    class UDPHandler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            data, sock = self.request
            sock.sendto(f"{text}\n{_info(_plain(self.client_address))}\n".encode() + data,
                        self.client_address)

    base: Any = socketserver.ThreadingUDPServer if proto == "udp" else socketserver.ThreadingTCPServer

    class Srv(base):  # type: ignore[misc]
        address_family = fam
        allow_reuse_address = True
        daemon_threads = True
        request_queue_size = 128

        def server_bind(self) -> None:
            if fam == socket.AF_INET6:
                self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            super().server_bind()

        def handle_error(self, request: Any, client_address: Any) -> None:
            pass

    srv = Srv((host, port), UDPHandler if proto == "udp" else TCPHandler)
    print(f"READY {srv.server_address[1]}", flush=True)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    srv.serve_forever()


def _one_request(proto: str, host: str, port: int, timeout: float, source: str,
                 payload: str) -> dict[str, Any]:
    fam = _family(host)
    res: dict[str, Any] = {"ok": False}
    try:
        with socket.socket(fam, socket.SOCK_DGRAM if proto == "udp" else socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            if source:
                s.bind((source, 0))
            s.connect((host, port))
            src = s.getsockname()
            res["source"] = f"[{src[0]}]:{src[1]}" if ":" in src[0] else f"{src[0]}:{src[1]}"
            if proto == "udp":
                s.send(payload.encode())
                body = s.recv(65536)
            else:
                if proto == "http":
                    s.sendall(f"GET / HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
                chunks = []
                while True:
                    c = s.recv(65536)
                    if not c:
                        break
                    chunks.append(c)
                body = b"".join(chunks)
                if proto == "http":
                    head, sep, body = body.partition(b"\r\n\r\n")
                    if not sep or not head.startswith(b"HTTP/1.0 200"):
                        raise OSError(f"bad HTTP response: {head[:200]!r}")
        text = body.decode(errors="replace")
        lines = text.split("\n")
        res.update(ok=True, body=text, text=lines[0],
                   info=dict(kv.split("=", 1) for kv in (lines[1] if len(lines) > 1 else "").split() if "=" in kv))
        if not lines[0]:
            res.update(ok=False, error="empty reply")
    except (OSError, ValueError) as e:
        res["error"] = f"{type(e).__name__}: {e}"
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="netns.py")
    sub = p.add_subparsers(dest="cmd", required=True)
    sp = sub.add_parser("serve", help="answer every request with --text")
    sp.add_argument("--proto", choices=("http", "tcp", "udp"), default="http")
    sp.add_argument("--port", type=int, default=0)
    sp.add_argument("--text", required=True)
    sp.add_argument("--bind", default="", help="address to listen on; default all v4+v6")
    rp = sub.add_parser("request", help="connect and print one JSON line per attempt")
    rp.add_argument("--proto", choices=("http", "tcp", "udp"), default="http")
    rp.add_argument("--count", type=int, default=1)
    rp.add_argument("--timeout", type=float, default=3.0)
    rp.add_argument("--source", default="")
    rp.add_argument("--payload", default="ping")
    rp.add_argument("host")
    rp.add_argument("port", type=int)
    a = p.parse_args(argv)
    if a.cmd == "serve":
        _serve(a.proto, a.bind, a.port, a.text)
        return 0
    for _ in range(a.count):
        print(json.dumps(_one_request(a.proto, a.host, a.port, a.timeout, a.source,
                                      a.payload)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
