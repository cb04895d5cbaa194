"""Pod network namespaces as reconcile targets (replicate mode).

A Pod with a network interface of its own sends its traffic straight out of that
interface, so the node namespace's IPVS table never sees it. On a stock kernel the
answer is to program the Pod-visible part of the table (ClusterIPs, externalIPs,
LoadBalancer IPs) into the Pod's own namespace. ``pod_target`` builds the
``reconcile.Target`` that does it; the reconcile loop keeps it in sync like the
node's table.

Why each piece is the way it is (docs/share-ns.md has the whole story):

* Identity (``netns.py``): every kernel access opens the namespace's path and checks
  that it still names the inode attached; a namespace deleted mid-sync raises
  ``NamespaceGone`` and the loop detaches it quietly.
* Preparation (``prepare``, run by the loop before operations are applied): loopback
  up (IPVS refuses IPv4 real servers with "address not unicast" while lo is down);
  the per-namespace IPVS sysctls kube-proxy sets on the node (a new namespace starts
  from the defaults, and ``conntrack=0`` makes Pod-side ``ctstate INVALID`` drop
  rules eat the replies); and a route for every VIP. The routes point at ``lo`` with
  the Pod's own address as source: the VIP is routable (IPVS only sees routed
  packets), nothing is bound (so source address selection picks the Pod address,
  not the VIP), and a connection IPVS sends back to the Pod itself keeps the
  loopback route and is delivered locally, which a stock kernel does not do when
  the VIP is reached through the NIC (the "Pod reaches itself" pitfall).
* Cost. Preparation remembers what it found and did: when the VIP set is unchanged
  it costs one ``stat``; a changed VIP set costs one ``ip -batch`` process. The
  namespace is read (rtnetlink dumps and sysctl files, from a short-lived thread
  that joined it: no process at all) only at attach and at the first read of its
  table ``recheck_period`` seconds after the last read, so drift is repaired without
  reading it every sync, and a partial sync (one endpoint change fanned out to
  every namespace) never reads any. Program starts are what dominates under load
  (measured: docs/performance.md), hence no shell and no ``ip -j`` for reading.
"""

from __future__ import annotations

import enum
import functools
import ctypes
import socket
import struct
import logging
import os
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence, TypeVar

from svcproxy.ipvs.backend import Backend, BackendError, TimeoutControl
from svcproxy.ipvs.timeouts import Timeouts
from svcproxy.ipvs.ipvsadm import IpvsadmBackend
from svcproxy.model import Family, OpKind, Operation, OperationResult, Table
from svcproxy.node.conntrack import ConntrackError, KernelConntrack, clean_stale_flows
from svcproxy.podns.mode import Mode, ModeDecision
from svcproxy.node.sysctls import kube_proxy_sysctls
from svcproxy.podns.netns import NamespaceGone, NetnsId, NodeNamespace, PodNamespace, netns_id, pod_netns_id
from svcproxy.podns.visible import pod_visible
from svcproxy.reconcile import Proxier, Target

__all__ = [
    "AttachResult",
    "BackendFactory",
    "NetnsId",
    "PodNamespace",
    "PodNamespaces",
    "Preparer",
    "ROUTE_PROTO",
    "Runner",
    "factory_like",
    "ipvsadm_factory",
    "kube_proxy_sysctls",
    "NamespaceReport",
    "sync_namespace",
    "cleanup_namespace",
    "netns_id",
    "pod_target",
    "pod_visible",
]

log = logging.getLogger("svcproxy.podns")

#: Routing protocol number marking svcproxy's VIP routes (0x9c; not in
#: /etc/iproute2/rt_protos). Routes with it are svcproxy's to add and delete.
ROUTE_PROTO = 0x9C
#: Route type per family. IPv4: a unicast route via lo is flagged local by the
#: kernel (RTCF_LOCAL, delivered by ip_local_deliver). IPv6 turns a unicast route
#: via lo into a reject route, so IPv6 VIPs get a route of type local (in the main
#: table, with the Pod address as preferred source; nothing is bound).
ROUTE_TYPE: Mapping[Family, str] = {Family.IPV4: "unicast", Family.IPV6: "local"}
_HOST_PREFIX: Mapping[Family, int] = {Family.IPV4: 32, Family.IPV6: 128}
_SYSCTL_DIR = "/proc/sys/net/ipv4/vs"
_WANTED_SYSCTLS = ("conntrack", "conn_reuse_mode", "expire_nodest_conn", "expire_quiescent_template")

#: How commands are run: ``subprocess.run`` or a test double with its shape (it is
#: also given ``pass_fds``).
Runner = Callable[..., "subprocess.CompletedProcess[str]"]
#: Makes a backend working in a namespace: given a path that names the namespace in
#: this process and in children that inherit descriptor ``fd`` (``/proc/self/fd/N``).
BackendFactory = Callable[[str, int], Backend]


# --------------------------------------------------------------------------------------
# the backend, pinned to one namespace


def ipvsadm_factory(binary: str = "ipvsadm", *, counts: bool = True, runner: Runner = subprocess.run,
                    timeout: float | None = 600.0) -> BackendFactory:
    """ipvsadm under ``nsenter --net=/proc/self/fd/N`` (the descriptor passed on)."""

    def make(path: str, fd: int) -> Backend:
        return IpvsadmBackend(binary, netns=path, runner=functools.partial(runner, pass_fds=(fd,)),
                              timeout=timeout, counts=counts)

    return make


def _netlink_factory(template: Any) -> BackendFactory:
    cls = type(template)

    def make(path: str, fd: int) -> Backend:
        del fd  # the socket is created in this process: /proc/self/fd/N is valid here
        backend: Backend = cls(netns=path, acks=template.acks, window=template.window,
                               bufsize=template.bufsize, timeout=template.timeout)
        return backend

    return make


def factory_like(node_backend: Backend) -> BackendFactory:
    """Pod namespaces are programmed the way the node is: ipvsadm if the node uses
    ipvsadm, netlink if it uses netlink; anything else (test doubles) gets ipvsadm."""
    if isinstance(node_backend, IpvsadmBackend):
        return ipvsadm_factory(node_backend.binary, counts=node_backend.counts, timeout=node_backend.timeout)
    if type(node_backend).__name__ == "NetlinkBackend" and getattr(node_backend, "opener", None) is None:
        return _netlink_factory(node_backend)
    return ipvsadm_factory()


class PinnedBackend:
    """A backend that only ever works in one namespace (see the module docstring)."""

    def __init__(self, ns: PodNamespace, factory: BackendFactory) -> None:
        self.ns = ns
        self.factory = factory

    def __repr__(self) -> str:
        return f"PinnedBackend({self.ns!r})"

    def _call(self, what: Callable[[Backend], Any]) -> Any:
        with self.ns.entered() as (path, fd):
            try:
                return what(self.factory(path, fd))
            except BackendError:
                self.ns.check()  # gone while we worked: not an error
                raise

    def read(self, counts: bool | None = None) -> Table:
        table: Table = self._call(lambda b: b.read(counts))
        return table

    def apply(self, ops: Sequence[Operation]) -> list[OperationResult]:
        failed: list[OperationResult] = self._call(lambda b: b.apply(ops))
        return failed

    def read_timeouts(self) -> Timeouts:
        found: Timeouts = self._call(lambda b: _timeout_control(b).read_timeouts())
        return found

    def set_timeouts(self, timeouts: Timeouts) -> None:
        self._call(lambda b: _timeout_control(b).set_timeouts(timeouts))


def _timeout_control(backend: Backend) -> TimeoutControl:
    if not hasattr(backend, "set_timeouts"):
        raise BackendError(f"{backend!r} cannot set IPVS timeouts")
    return backend  # type: ignore[return-value]


# --------------------------------------------------------------------------------------
# preparation


@dataclass(frozen=True, order=True)
class Route:
    """One route with svcproxy's protocol number, as far as svcproxy cares."""

    dst: str
    type: str = "unicast"
    dev: str = "lo"
    src: str = ""
    table: str = "main"


@dataclass
class NsState:
    """What a namespace has (as read, or as left by the last successful apply)."""

    lo_up: bool
    sources: dict[Family, str]
    routes: set[Route]
    sysctls: dict[str, str]


@dataclass
class _Plan:
    lo_up: bool = False
    sysctls: dict[str, str] = field(default_factory=dict)
    delete: list[Route] = field(default_factory=list)
    add: list[Route] = field(default_factory=list)

    def empty(self) -> bool:
        return not (self.lo_up or self.sysctls or self.delete or self.add)

    def batch(self) -> str:
        lines = ["link set dev lo up"] if self.lo_up else []
        for r in self.delete:
            lines.append(f"route del {r.dst}{'' if '/' in r.dst else _suffix(r.dst)} proto {ROUTE_PROTO}"
                         f" table {r.table}")
        for r in self.add:
            kind = "" if r.type == "unicast" else f"{r.type} "
            lines.append(f"route replace {kind}{r.dst}{_suffix(r.dst)} dev {r.dev} src {r.src}"
                         f" proto {ROUTE_PROTO} table {r.table}")
        return "".join(line + "\n" for line in lines)

    def describe(self) -> str:
        parts = []
        if self.lo_up:
            parts.append("loopback brought up")
        if self.sysctls:
            parts.append("sysctls " + " ".join(f"net.ipv4.vs.{k}={v}" for k, v in sorted(self.sysctls.items())))
        if self.add:
            parts.append(f"{len(self.add)} VIP routes added/replaced")
        if self.delete:
            parts.append(f"{len(self.delete)} stale VIP routes deleted")
        return ", ".join(parts)


def _suffix(address: str) -> str:
    return "/128" if ":" in address else "/32"


# What one rtnetlink dump needs (linux/netlink.h, linux/rtnetlink.h, linux/if_addr.h).
_NETLINK_ROUTE = 0
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_NLM_F_REQUEST, _NLM_F_DUMP = 0x1, 0x300
_RTM_GETLINK, _RTM_GETADDR, _RTM_GETROUTE = 18, 22, 26
_NLMSG = struct.Struct("=IHHII")
_IFINFOMSG = struct.Struct("=BxHiII")
_IFADDRMSG = struct.Struct("=BBBBI")
_RTMSG = struct.Struct("=BBBBBBBBI")
_RTA = struct.Struct("=HH")
_IFLA_IFNAME = 3
_IFA_ADDRESS, _IFA_LOCAL, _IFA_FLAGS = 1, 2, 8
_IFA_F_DADFAILED, _IFA_F_TENTATIVE = 0x08, 0x40
_RTA_DST, _RTA_OIF, _RTA_PREFSRC, _RTA_TABLE = 1, 4, 7, 15
_IFF_UP, _IFF_LOOPBACK = 0x1, 0x8
_RT_SCOPE_UNIVERSE = 0
_ROUTE_TYPES = {1: "unicast", 2: "local", 3: "broadcast", 4: "anycast", 5: "multicast", 6: "blackhole",
                7: "unreachable", 8: "prohibit", 9: "throw", 10: "nat"}
_TABLES = {253: "default", 254: "main", 255: "local"}
_CLONE_NEWNET = 0x40000000


def _attrs(data: bytes, offset: int) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    while offset + 4 <= len(data):
        length, kind = _RTA.unpack_from(data, offset)
        if length < 4:
            break
        out[kind & 0x3FFF] = data[offset + 4 : offset + length]
        offset += (length + 3) & ~3
    return out


def _ip(raw: bytes) -> str:
    return socket.inet_ntop(socket.AF_INET6 if len(raw) == 16 else socket.AF_INET, raw)


def _dump(sock: socket.socket, msg_type: int, body: bytes, seq: int) -> Iterator[bytes]:
    """One rtnetlink dump: the payload of every answer (header stripped)."""
    sock.send(_NLMSG.pack(_NLMSG.size + len(body), msg_type, _NLM_F_REQUEST | _NLM_F_DUMP, seq, 0) + body)
    while True:
        data = sock.recv(1 << 20)
        offset = 0
        while offset + _NLMSG.size <= len(data):
            length, kind, _flags, got_seq, _pid = _NLMSG.unpack_from(data, offset)
            if length < _NLMSG.size:
                return
            payload = data[offset + _NLMSG.size : offset + length]
            offset += (length + 3) & ~3
            if got_seq != seq:
                continue
            if kind == _NLMSG_DONE:
                return
            if kind == _NLMSG_ERROR:
                code = -struct.unpack_from("=i", payload)[0]
                if code:
                    raise OSError(code, f"rtnetlink dump {msg_type}: {os.strerror(code)}")
                return
            yield payload


def read_state_here(sysctl_dir: str = _SYSCTL_DIR) -> NsState:
    """What this thread's network namespace has: loopback state, the Pod's addresses,
    svcproxy's routes (any table, both families) and the IPVS sysctls. Two rtnetlink
    dumps and a few small reads: no process, which matters when there are hundreds
    of namespaces and every program start is expensive."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, _NETLINK_ROUTE) as sock:
        sock.bind((0, 0))
        sock.settimeout(30)
        names: dict[int, str] = {}
        lo_up, loopbacks = False, set()
        for msg in _dump(sock, _RTM_GETLINK, _IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0), 1):
            _fam, _type, index, flags, _change = _IFINFOMSG.unpack_from(msg)
            name = _attrs(msg, _IFINFOMSG.size).get(_IFLA_IFNAME, b"").rstrip(b"\0").decode(errors="replace")
            names[index] = name
            if flags & _IFF_LOOPBACK:
                loopbacks.add(index)
                lo_up = lo_up or bool(flags & _IFF_UP)
        sources: dict[Family, tuple[int, str]] = {}
        for msg in _dump(sock, _RTM_GETADDR, _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0), 2):
            family, _plen, flags8, scope, index = _IFADDRMSG.unpack_from(msg)
            fam = {socket.AF_INET: Family.IPV4, socket.AF_INET6: Family.IPV6}.get(family)
            if fam is None or index in loopbacks or scope != _RT_SCOPE_UNIVERSE:
                continue
            attrs = _attrs(msg, _IFADDRMSG.size)
            flags = struct.unpack("=I", attrs[_IFA_FLAGS])[0] if len(attrs.get(_IFA_FLAGS, b"")) == 4 else flags8
            raw = attrs.get(_IFA_LOCAL) or attrs.get(_IFA_ADDRESS)
            if raw is None or flags & (_IFA_F_TENTATIVE | _IFA_F_DADFAILED):
                continue
            if fam not in sources or index < sources[fam][0]:  # first interface, first address
                sources[fam] = (index, _ip(raw))
        routes: set[Route] = set()
        for msg in _dump(sock, _RTM_GETROUTE, _RTMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0, 0, 0, 0, 0), 3):
            family, dst_len, _src_len, _tos, table8, proto, _scope, rtype, _flags = _RTMSG.unpack_from(msg)
            if proto != ROUTE_PROTO:
                continue
            attrs = _attrs(msg, _RTMSG.size)
            host = 128 if family == socket.AF_INET6 else 32
            dst = _ip(attrs[_RTA_DST]) if _RTA_DST in attrs else ("::" if family == socket.AF_INET6 else "0.0.0.0")
            if dst_len != host:
                dst = f"{dst}/{dst_len}"
            table = struct.unpack("=I", attrs[_RTA_TABLE])[0] if _RTA_TABLE in attrs else table8
            oif = struct.unpack("=i", attrs[_RTA_OIF])[0] if _RTA_OIF in attrs else 0
            routes.add(Route(dst, _ROUTE_TYPES.get(rtype, str(rtype)), names.get(oif, ""),
                             _ip(attrs[_RTA_PREFSRC]) if _RTA_PREFSRC in attrs else "",
                             _TABLES.get(table, str(table))))
    sysctls: dict[str, str] = {}
    for name in _WANTED_SYSCTLS:
        try:
            with open(os.path.join(sysctl_dir, name)) as f:
                sysctls[name] = f.read().strip()
        except OSError:
            continue
    return NsState(lo_up, {f: a for f, (_i, a) in sources.items()}, routes, sysctls)


def write_sysctls_here(values: Mapping[str, str], sysctl_dir: str = _SYSCTL_DIR) -> None:
    """Set IPVS sysctls of this thread's network namespace."""
    for name, value in sorted(values.items()):
        with open(os.path.join(sysctl_dir, name), "w") as f:
            f.write(value + "\n")


_T = TypeVar("_T")


def in_namespace(fd: int, fn: Callable[[], _T]) -> _T:
    """Run ``fn`` in a short-lived thread that joined the namespace open at ``fd``.

    setns() moves only the calling thread, so the rest of the process never changes
    namespace; the thread ends with ``fn`` (it is never reused elsewhere).
    """
    result: list[_T] = []
    failure: list[BaseException] = []

    def work() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.setns(fd, _CLONE_NEWNET) != 0:
                code = ctypes.get_errno()
                raise OSError(code, f"setns: {os.strerror(code)}")
            result.append(fn())
        except BaseException as exc:  # re-raised in the caller's thread
            failure.append(exc)

    worker = threading.Thread(target=work, name="svcproxy-netns-prepare", daemon=True)
    worker.start()
    worker.join()
    if failure:
        raise failure[0]
    return result[0]


class KernelIO:
    """How a Preparer reads a namespace and sets its sysctls: in-process, in a thread
    that joined the namespace. Tests substitute their own."""

    def __init__(self, sysctl_dir: str = _SYSCTL_DIR) -> None:
        self.sysctl_dir = sysctl_dir

    def read(self, fd: int) -> NsState:
        return in_namespace(fd, lambda: read_state_here(self.sysctl_dir))

    def write_sysctls(self, fd: int, values: Mapping[str, str]) -> None:
        in_namespace(fd, lambda: write_sysctls_here(values, self.sysctl_dir))


_last_vips: tuple[Table, dict[Family, frozenset[str]]] | None = None


def vips_of(table: Table) -> dict[Family, frozenset[str]]:
    """The VIPs a table serves, per family (fwmark services have none); shared, not
    to be modified. The answer for the last table asked is kept: the loop hands one
    Pod-visible table per sync to every Pod namespace, and walking all its services
    once per namespace made every change cost Services x Pods."""
    global _last_vips
    last = _last_vips
    if last is not None and last[0] is table:
        return last[1]
    out: dict[Family, set[str]] = {Family.IPV4: set(), Family.IPV6: set()}
    for key in table.services:
        if key.fwmark or not key.address:
            continue
        out[Family.IPV6 if ":" in key.address else Family.IPV4].add(key.address)
    vips = {f: frozenset(v) for f, v in out.items()}
    _last_vips = (table, vips)
    return vips


class Preparer:
    """The ``prepare`` hook of a Pod target: makes the namespace fit for IPVS.

    Idempotent, and cheap when nothing changed (see the module docstring). Raises
    NamespaceGone when the namespace vanished, BackendError when it cannot be made
    fit (loopback or sysctls); a VIP route the kernel refuses (say, an IPv6 source
    address still in DAD) is logged and retried at the next recheck instead: the
    table itself is more important than self-service of one family.
    """

    def __init__(self, ns: PodNamespace, *, runner: Runner = subprocess.run, kernel_release: str | None = None,
                 recheck_period: float = 30.0, clock: Callable[[], float] = time.monotonic,
                 timeout: float = 120.0, sysctl_dir: str = _SYSCTL_DIR, io: KernelIO | None = None) -> None:
        self.ns = ns
        self.sysctl_dir = sysctl_dir
        self.io = io if io is not None else KernelIO(sysctl_dir)
        self.runner = runner
        self.sysctls = kube_proxy_sysctls(kernel_release)
        self.recheck_period = recheck_period
        self.clock = clock
        self.timeout = timeout
        self.state: NsState | None = None
        self.vips: dict[Family, frozenset[str]] | None = None
        self.checked_at = float("-inf")
        self.recheck_due = False
        self.probes = 0
        self.applies = 0
        self._warned: set[str] = set()

    def __call__(self, desired: Table) -> None:
        self.ns.check()
        vips = vips_of(desired)
        due = self.recheck_due
        if self.state is not None and not due and vips == self.vips:
            return
        with self.ns.entered() as (path, fd):
            state = self.state
            if state is None or due:
                state = self._probe(path, fd)
                self.checked_at = self.clock()
                self.recheck_due = False
            plan = self.plan(state, vips)
            if plan.empty():
                self.state, self.vips = state, vips
                return
            ok = self._apply(path, fd, plan)
            if ok:
                self.state = self._after(state, plan)
                self.vips = vips
                log.info("Pod namespace %s prepared: %s", self.ns.path, plan.describe())
                return
            state = self._probe(path, fd)
        self._judge(state, vips)

    def recheck(self) -> None:
        """Called when the loop reads the table afresh: read the namespace again at
        the next call if the last read is ``recheck_period`` old. Other syncs never
        read it: a change fanned out to many namespaces must not wait for rechecks."""
        if self.clock() >= self.checked_at + self.recheck_period:
            self.recheck_due = True

    def plan(self, state: NsState, vips: Mapping[Family, frozenset[str]]) -> _Plan:
        """What to change so that ``state`` fits the VIPs."""
        wanted: set[Route] = set()
        for family, addresses in vips.items():
            src = state.sources.get(family)
            if src is None:
                continue  # the Pod has no address of this family: nothing to route from
            wanted.update(Route(a, ROUTE_TYPE[family], "lo", src) for a in addresses)
        return _Plan(
            lo_up=not state.lo_up,
            sysctls={k: v for k, v in self.sysctls.items() if state.sysctls.get(k) != v},
            delete=sorted(state.routes - wanted, key=lambda r: (r.dst, r.table)),
            add=sorted(wanted - state.routes),
        )

    def clear_routes(self, apply: bool) -> int:
        """Delete svcproxy's VIP routes here (``apply=False``: only count them) and
        nothing else: kernel mode's cleanup, where loopback and sysctls were never set
        by svcproxy. Returns how many there were."""
        with self.ns.entered() as (path, fd):
            plan = _Plan(delete=sorted(self._probe(path, fd).routes, key=lambda r: (r.dst, r.table)))
            if apply and plan.delete:
                proc = self._run(path, fd, ["ip", "-force", "-batch", "-"], stdin=plan.batch())
                if proc.returncode != 0 or proc.stderr.strip():
                    raise BackendError(f"deleting VIP routes in {self.ns.path} failed (exit status "
                                       f"{proc.returncode}): {' '.join(proc.stderr.split())[:500]}")
        return len(plan.delete)

    @staticmethod
    def _after(state: NsState, plan: _Plan) -> NsState:
        routes = (state.routes - set(plan.delete)) | set(plan.add)
        return NsState(True, dict(state.sources), routes, {**state.sysctls, **plan.sysctls})

    def _run(self, path: str, fd: int, argv: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        full = ["nsenter", f"--net={path}", *argv]
        try:
            return self.runner(full, input=stdin, capture_output=True, text=True, check=False,
                               timeout=self.timeout, pass_fds=(fd,))
        except FileNotFoundError as exc:
            raise BackendError(f"cannot run nsenter: {exc}") from exc
        except subprocess.TimeoutExpired as exc:
            raise BackendError(f"preparing {self.ns.path} did not finish in {self.timeout} s") from exc
        except OSError as exc:  # ENOEXEC, EAGAIN, ENOMEM...: the node's trouble, retried later
            raise BackendError(f"cannot run nsenter for {self.ns.path}: {exc.strerror or exc}") from exc

    def _probe(self, path: str, fd: int) -> NsState:
        del path
        self.probes += 1
        try:
            return self.io.read(fd)
        except OSError as exc:
            raise BackendError(f"cannot read namespace {self.ns.path}: {exc}") from exc

    def _apply(self, path: str, fd: int, plan: _Plan) -> bool:
        """sysctls first (in-process), then loopback and routes in one ``ip -batch``."""
        self.applies += 1
        if plan.sysctls:
            try:
                self.io.write_sysctls(fd, plan.sysctls)
            except OSError as exc:
                self._warn_once(f"cannot set IPVS sysctls in Pod namespace {self.ns.path}: {exc}")
                return False
        batch = plan.batch()
        if not batch:
            return True
        proc = self._run(path, fd, ["ip", "-force", "-batch", "-"], stdin=batch)
        if proc.returncode != 0 or proc.stderr.strip():
            self._warn_once(f"preparing Pod namespace {self.ns.path} partly failed "
                            f"(exit status {proc.returncode}): {' '.join(proc.stderr.split())[:500]}")
            return False
        return True

    def _judge(self, state: NsState, vips: Mapping[Family, frozenset[str]]) -> None:
        """After a failed apply: fatal if loopback or sysctls are still wrong, else
        (routes only) carry on and retry at the next recheck."""
        plan = self.plan(state, vips)
        self.state, self.vips = state, dict(vips)
        if plan.lo_up or plan.sysctls:
            self.state = None  # read again next time
            what = "loopback is down" if plan.lo_up else f"sysctls not set: {plan.describe()}"
            missing = "" if state.sysctls else f" ({self.sysctl_dir} missing: is ip_vs loaded?)"
            raise BackendError(f"cannot prepare Pod namespace {self.ns.path}: {what}{missing}")
        if plan.add or plan.delete:
            self._warn_once(f"Pod namespace {self.ns.path}: {plan.describe()} still pending; retrying in "
                            f"{self.recheck_period:g} s (Services work there, self-service may not)")

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            log.warning("%s", message)


def pod_target(path: str, backend_factory: BackendFactory | None = None, *, runner: Runner = subprocess.run,
               kernel_release: str | None = None, recheck_period: float = 30.0,
               clock: Callable[[], float] = time.monotonic, sysctl_dir: str = _SYSCTL_DIR) -> Target:
    """A reconcile target for the namespace at ``path`` (named by its path).

    Raises NamespaceGone if ``path`` does not name a namespace now. ``sysctl_dir``
    is for hosts without IPVS (tests): where the IPVS sysctls are read and written.
    """
    ns = PodNamespace.open(path)
    factory = backend_factory if backend_factory is not None else ipvsadm_factory(runner=runner)
    preparer = Preparer(ns, runner=runner, kernel_release=kernel_release, recheck_period=recheck_period,
                        clock=clock, sysctl_dir=sysctl_dir)
    return Target(path, PinnedBackend(ns, factory), pod=True, prepare=preparer,
                  recheck=preparer.recheck, conntrack=namespace_conntrack(ns))


def namespace_conntrack(ns: PodNamespace) -> KernelConntrack:
    """The Pod namespace's own conntrack table (read and changed from a thread that
    joined it, like its sysctls)."""

    def run(fn: Callable[[], _T]) -> _T:
        with ns.entered() as (_path, fd):
            return in_namespace(fd, fn)

    return KernelConntrack(run)


# --------------------------------------------------------------------------------------
# the front door: what the CNI plugin's server, --pod-netns and the scan call


class AttachResult(str, enum.Enum):
    """Outcome of an attach request."""

    ATTACHED = "attached"  #: replicate mode: the namespace gets (or has) its own table
    SHARED = "shared"  #: kernel mode: the namespace uses the node's table, nothing to do
    REFUSED = "refused"  #: mode off: Pod namespaces are not served
    GONE = "gone"  #: the path does not name a namespace (any more)
    NODE = "node"  #: the node's own namespace: the node's table serves it already


TargetMaker = Callable[[str], Target]


class PodNamespaces:
    """Attach and detach Pod namespaces according to the mode. Thread-safe: the CNI
    server, the scan and the agent's start-up call it from their own threads."""

    def __init__(self, proxier: Proxier, decision: ModeDecision, *, make_target: TargetMaker | None = None,
                 backend_factory: BackendFactory | None = None) -> None:
        self.proxier = proxier
        self.decision = decision
        self._make = make_target or (lambda path: pod_target(path, backend_factory))
        self._lock = threading.Lock()
        self._ids: dict[str, NetnsId] = {}

    def attach(self, path: str) -> AttachResult:
        """Serve the namespace at ``path`` from the next sync on. Idempotent: the same
        namespace again is a no-op; a new namespace under a known path replaces it."""
        if self.decision.effective is Mode.OFF:
            log.info("not attaching Pod namespace %s: --pod-netns-mode off", path)
            return AttachResult.REFUSED
        try:
            ident = pod_netns_id(path)
        except NamespaceGone as exc:
            log.info("not attaching Pod namespace %s: %s", path, exc)
            return AttachResult.GONE
        except NodeNamespace as exc:
            log.warning("not attaching %s", exc)
            self.proxier.metrics.pod_netns_refused.labels("node-namespace").inc()
            return AttachResult.NODE
        if self.decision.shared:
            return AttachResult.SHARED
        with self._lock:
            if self._ids.get(path) == ident and path in self.proxier.pod_targets:
                return AttachResult.ATTACHED
            try:
                target = self._make(path)
            except NamespaceGone as exc:
                log.info("not attaching Pod namespace %s: %s", path, exc)
                return AttachResult.GONE
            except NodeNamespace as exc:  # the path was swapped for the node's since
                log.warning("not attaching %s", exc)
                self.proxier.metrics.pod_netns_refused.labels("node-namespace").inc()
                return AttachResult.NODE
            self._ids[path] = ident
            replaced = self.proxier.detach(path)
            self.proxier.attach(target)
        log.info("%s Pod namespace %s (%s)", "re-attached" if replaced else "attached", path, ident)
        return AttachResult.ATTACHED

    def detach(self, path: str) -> bool:
        """Stop serving ``path`` (its table is left as it is: the namespace is going)."""
        with self._lock:
            self._ids.pop(path, None)
            gone = self.proxier.detach(path)
        if gone:
            log.info("detached Pod namespace %s", path)
        return gone

    def wait_attached(self, path: str, timeout: float) -> bool:
        """Block until the namespace's table was programmed once (kernel mode: until
        the node's table was). False on timeout, or if the namespace is not served."""
        if self.decision.shared:
            return self.proxier.node_target.synced.wait(timeout)
        return self.proxier.wait_attached(path, timeout)

    def known(self) -> dict[str, NetnsId]:
        """Attached namespaces with their identity (ones the loop already dropped as
        gone are forgotten here too)."""
        with self._lock:
            live = set(self.proxier.pod_targets)
            for path in list(self._ids):
                if path not in live:
                    del self._ids[path]
            return dict(self._ids)


# --------------------------------------------------------------------------------------
# one-shot: `svcproxy plan/sync --pod-netns PATH`


@dataclass
class NamespaceReport:
    """What a one-shot sync (or plan) did in one Pod namespace."""

    path: str
    status: str  #: "synced", "planned", "gone", "shared", "refused" or "error"
    desired: Table = field(default_factory=Table)
    actual: Table = field(default_factory=Table)
    operations: list[Operation] = field(default_factory=list)
    failed: list[OperationResult] = field(default_factory=list)
    error: str = ""
    #: --ipvs-*-timeout could not be set there ("" : set, or not asked).
    timeouts_error: str = ""
    #: Stale UDP conntrack entries deleted there, or why that failed.
    conntrack_cleared: int = 0
    conntrack_error: str = ""

    @property
    def applied(self) -> list[Operation]:
        rejected = {id(f.operation) for f in self.failed}
        return [op for op in self.operations if id(op) not in rejected]

    @property
    def ok(self) -> bool:
        """Gone, shared and refused are fine outcomes; failures and errors are not."""
        return self.status != "error" and not self.failed and not self.timeouts_error

    def summary(self) -> str:
        if self.status == "synced":
            cleared = f", {self.conntrack_cleared} stale UDP conntrack entries cleared" if self.conntrack_cleared else ""
            return f"{len(self.applied)} operations applied, {len(self.failed)} failed{cleared}"
        if self.status == "planned":
            return f"{len(self.operations)} operations planned" + (f" ({self.error})" if self.error else "")
        if self.status == "gone":
            return f"gone, skipped ({self.error})"
        if self.status == "shared":
            return "shares the node's table (kernel mode), nothing to program"
        if self.status == "refused":
            return "not served (--pod-netns-mode off)"
        return f"error: {self.error}"


def sync_namespace(path: str, desired: Table, decision: ModeDecision, *, exclusions: Any = None,
                   backend_factory: BackendFactory | None = None, apply: bool = True,
                   make_target: TargetMaker | None = None, timeouts: Timeouts | None = None) -> NamespaceReport:
    """Program (or with ``apply=False`` only plan) one namespace's Pod-visible table.

    ``desired`` is already the Pod-visible part. A namespace that is gone, or goes
    while this runs, is reported as "gone", not as an error.
    """
    from svcproxy.diff import Exclusions, diff

    if decision.effective is Mode.OFF:
        return NamespaceReport(path, "refused", desired)
    if decision.shared:
        return NamespaceReport(path, "shared", desired)
    excl = exclusions if exclusions is not None else Exclusions()
    try:
        target = make_target(path) if make_target is not None else pod_target(path, backend_factory)
        try:
            actual = target.backend.read()
            note = ""
        except BackendError as exc:
            if apply:
                raise
            actual, note = Table(), f"cannot read its table ({exc}); compared with an empty one"
        ops = diff(desired, actual, excl)
        if not apply:
            return NamespaceReport(path, "planned", desired, actual, ops, error=note)
        if target.prepare is not None:
            target.prepare(desired)
        failed = target.backend.apply(ops) if ops else []
        report = NamespaceReport(path, "synced", desired, actual, ops, failed)
        if target.conntrack is not None:
            try:
                report.conntrack_cleared = clean_stale_flows(target.conntrack, desired, None, dry_run=False)[1]
            except ConntrackError as exc:
                report.conntrack_error = str(exc)
        if timeouts is not None:
            try:
                _timeout_control(target.backend).set_timeouts(timeouts)
            except BackendError as exc:
                report.timeouts_error = str(exc)
        return report
    except NamespaceGone as exc:
        return NamespaceReport(path, "gone", desired, error=str(exc))
    except NodeNamespace as exc:
        return NamespaceReport(path, "error", desired, error=str(exc))
    except BackendError as exc:
        return NamespaceReport(path, "error", desired, error=str(exc))


def cleanup_namespace(path: str, decision: ModeDecision, *, exclusions: Any = None,
                      backend_factory: BackendFactory | None = None, apply: bool = True,
                      runner: Runner = subprocess.run) -> tuple[str, bool]:
    """What ``svcproxy cleanup`` does in one Pod namespace: (its report line, ok).

    Only what svcproxy made goes: its virtual services and its VIP routes. Loopback
    and the IPVS sysctls stay as they are (a sync would set them; cleanup is not a
    sync). Kernel mode: the namespace has no IPVS table of its own (svcproxy's
    module refuses its changes with EPERM, and on a module that let it see the
    node's table, deleting from inside the Pod would delete the node's services),
    so no IPVS request is made there at all; only VIP routes left by an earlier
    replicate mode go (routes outlive the ip_vs reload that changed mode).
    """
    verb = "removed" if apply else "would remove"
    try:
        ns = PodNamespace.open(path)
        if decision.shared:
            n = Preparer(ns, runner=runner).clear_routes(apply)
            return f"shares the node's table (kernel mode), no virtual services of its own; {verb} {n} VIP routes", True
        factory = backend_factory if backend_factory is not None else ipvsadm_factory(runner=runner)
        report = sync_namespace(path, Table(), ModeDecision(Mode.REPLICATE, Mode.REPLICATE, "cleanup"),
                                exclusions=exclusions, apply=apply,
                                make_target=lambda p: Target(p, PinnedBackend(ns, factory), pod=True))
        if report.status not in ("synced", "planned"):
            return f"{report.status} {report.error}", report.status != "error"
        n = Preparer(ns, runner=runner).clear_routes(apply)
    except NamespaceGone as exc:
        return f"gone {exc}", True
    except (NodeNamespace, BackendError) as exc:
        return f"error {exc}", False
    services = sum(1 for o in report.operations if o.kind is OpKind.DELETE_SERVICE)
    note = f" ({report.error})" if report.error else ""
    if report.failed:
        note += f"; {len(report.failed)} of them FAILED, first: {report.failed[0].error}"
    return f"{verb} {services} virtual services and {n} VIP routes{note}", not report.failed
