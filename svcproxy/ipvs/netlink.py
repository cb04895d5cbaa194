"""The netlink backend: IPVS over generic netlink, batched on one socket.

Why it is fast (figures in docs/performance.md): every request is encoded with the
struct-based codec (``nlencode``; pyroute2's message classes are far slower), and
requests are not sent one round trip at a time. The kernel handles a netlink
datagram synchronously inside ``send()``, one message after another, and a failed
message never stops the ones after it. So ``apply`` packs a window of requests into
one datagram, and by the time ``send()`` returns every answer is queued on the
socket. ``send()`` releases the GIL while the kernel works, so for large plans a
helper thread encodes the next windows meanwhile: encoding overlaps the kernel's
own work instead of adding to it. Success acknowledgements are not asked for,
except on the last request of a window: failures always come back as NLMSG_ERROR with the request's sequence
number, and the last request's answer marks the end of the window. That halves the
syscalls and skb allocations of acking everything. Sequence numbers tie each error to its operation.

Reading: one GET_SERVICE dump gives every service with all its settings. Real
servers come from /proc/net/ip_vs (``procfs``), which lists all of them, connection
counts included, in a few large reads. Over netlink they would take one GET_DEST
dump per service, and dumps cannot be batched the way requests are: a socket runs
one dump at a time (a second request gets EBUSY) and a dump only finishes when its
reader calls ``recv()`` (the kernel fills the next part, here the NLMSG_DONE, from
inside ``recvmsg``), so each service costs one ``send`` and two ``recv`` calls.
The dump stays the authority on which services exist: the file gives the real
servers of the dumped services it lists (what it lists is always the reading
namespace's own, but on a stock kernel it may leave some out where other
namespaces have IPVS services too: ``NetlinkBackend._from_file``), and the others
are dumped one by one. The whole file is set aside, and every service dumped, when
it is missing, cannot be parsed, or lists a service the dump does not (the table
changed between the two reads): the file only ever saves time.

Namespaces: with ``netns`` (a path such as /var/run/netns/NAME or
/proc/PID/ns/net), the socket is created by a short-lived thread that first joins
that namespace; a netlink socket stays bound to the namespace it was created in,
and the rest of the process never changes namespace. A socket is opened per
``read``/``apply`` call and closed after: holding one would keep a deleted Pod's
namespace alive, and the IPVS family id may change when the module is reloaded.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import operator
import os
import queue
import socket
import struct
import threading
from collections import Counter
from contextlib import contextmanager
from typing import Any, Callable, Generator, Iterator, NamedTuple, Protocol, Sequence, TypeVar

from svcproxy.ipvs import procfs
from svcproxy.ipvs.backend import BackendError
from svcproxy.ipvs.nlconst import GENL_ID_CTRL, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR
from svcproxy.ipvs.nldecode import (
    DecodedService,
    DecodeError,
    Message,
    decode_dest_datagram,
    decode_error,
    decode_family_id,
    decode_service,
    walk,
)
from svcproxy.ipvs.nlencode import GET_SERVICE_BODY, Encoder, family_request, frame, get_dests_request
from svcproxy.ipvs.nlerrors import describe_error
from svcproxy.ipvs.timeouts import GET_CONFIG_BODY, Timeouts, decode_config, set_config_body
from svcproxy.model import Destination, Operation, OperationResult, ServiceKey, Table, VirtualService

__all__ = ["NetlinkBackend", "NetlinkSocket"]

log = logging.getLogger(__name__)

NETLINK_GENERIC = 16
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10
NETLINK_EXT_ACK = 11
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33
CLONE_NEWNET = 0x40000000

#: Kernel-side memory one queued answer can take (an error skb's truesize is about
#: 1 KiB); windows are capped so that a window of failures fits the receive buffer.
_ANSWER_BUDGET = 2048
#: A datagram may not exceed the send buffer (minus a little); keep well below it.
_SEND_SLACK = 4096
#: More than any one request takes (the largest, NEW_SERVICE with a persistence
#: engine, is under 150 bytes): bounds a window's datagram size.
_MAX_MESSAGE = 256
_RECV_SIZE = 1 << 16  # dump parts are at most 32 KiB
#: Plans of at least this many windows are encoded by a helper thread, this many
#: windows ahead of the sender at most (smaller plans: no thread, nothing to hide).
_PREFETCH_MIN_WINDOWS = 3
_PREFETCH_DEPTH = 4
_LOUD = struct.pack("=H", NLM_F_REQUEST | NLM_F_ACK)

T = TypeVar("T")


class NetlinkSocket(Protocol):
    """What the backend uses of a socket (``socket.socket``, or a test double)."""

    def send(self, data: bytes, /) -> int: ...

    def recv_into(self, buffer: bytearray, nbytes: int, flags: int, /) -> int: ...

    def getsockopt(self, level: int, option: int, /) -> int: ...

    def close(self) -> None: ...


class _KernelError(Exception):
    """An NLMSG_ERROR answering a request that must not fail (family lookup, dumps)."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(describe_error(None, code, text))
        self.code = code


class _Channel:
    """One generic-netlink socket with the IPVS family resolved on it."""

    def __init__(self, sock: NetlinkSocket, timeout: float) -> None:
        self.sock = sock
        self.timeout = timeout
        self.buf = bytearray(_RECV_SIZE)
        self.recv_size = _RECV_SIZE
        self.seq = 0
        self.rcvbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        self.sndbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        self.family = self._resolve_family()

    def next_seq(self) -> int:
        self.seq = (self.seq + 1) & 0xFFFFFFFF
        return self.seq

    def recv(self) -> bytes:
        try:
            n = self.sock.recv_into(self.buf, self.recv_size, socket.MSG_TRUNC)
        except BlockingIOError:
            raise BackendError(f"no answer from the kernel within {self.timeout:g} s") from None
        except OSError as exc:
            if exc.errno == errno.ENOBUFS:
                # Answers were dropped: which operations failed is unknown.
                raise BackendError(
                    "netlink receive buffer overflowed (answers lost); the sync must be retried"
                ) from exc
            raise BackendError(f"netlink recv failed: {exc}") from exc
        if n > self.recv_size:  # MSG_TRUNC: the real length of a datagram cut short
            raise DecodeError(f"a {n}-byte datagram does not fit the {self.recv_size}-byte buffer")
        return bytes(self.buf[:n])

    def send(self, data: bytes) -> None:
        try:
            self.sock.send(data)
        except OSError as exc:
            raise BackendError(f"netlink send of {len(data)} bytes failed: {exc}") from exc

    def _resolve_family(self) -> int:
        seq = self.next_seq()
        self.send(frame(GENL_ID_CTRL, NLM_F_REQUEST, seq, family_request()))
        while True:
            data = self.recv()
            for msg in walk(data):
                if msg.seq != seq:
                    continue
                if msg.type == NLMSG_ERROR:
                    code, text = decode_error(data, msg)
                    if code == errno.ENOENT:
                        # The kernel has just asked its modprobe for ip_vs (the module's
                        # genl alias) and found none: no container capability is involved.
                        raise BackendError("IPVS generic netlink family not found: the ip_vs module is not "
                                           "loaded and the kernel could not load it (on the node: modprobe ip_vs)")
                    if code:
                        raise BackendError(f"generic netlink family lookup failed: {describe_error(None, code, text)}")
                elif msg.type == GENL_ID_CTRL:
                    return decode_family_id(data, msg)

    def window_size(self, requested: int) -> int:
        """Requests per datagram: as asked, but a window of failures must fit the
        receive buffer and a datagram the send buffer."""
        return max(1, min(requested, self.rcvbuf // _ANSWER_BUDGET, (self.sndbuf - _SEND_SLACK) // _MAX_MESSAGE))

    def exchange(self, messages: list[bytes], base: int, *, acks: bool) -> dict[int, tuple[int, str]]:
        """Send one window of complete messages numbered from ``base`` as one
        datagram; return (errno, extack) by message index.

        With ``acks`` every message already asks for an acknowledgement and the
        window ends when all have answered. Without, only the last message is made
        to ask (its flags are patched here, in the list given), and its answer, ack
        or error, ends the window: it is queued after the answers to the others.
        """
        count = len(messages)
        last = count - 1
        if not acks:
            messages[last] = messages[last][:6] + _LOUD + messages[last][8:]
        self.send(b"".join(messages))
        errors: dict[int, tuple[int, str]] = {}
        pending = count if acks else 1
        while pending:
            data = self.recv()
            for msg in walk(data):
                if msg.type != NLMSG_ERROR:
                    continue
                k = (msg.seq - base) & 0xFFFFFFFF
                if k >= count:
                    continue  # not ours (a stale answer)
                code, text = decode_error(data, msg)
                if code:
                    errors[k] = (code, text)
                if acks or k == last:
                    pending -= 1
        return errors

    def reserve(self, count: int) -> int:
        """The first of ``count`` consecutive sequence numbers, now taken."""
        first = (self.seq + 1) & 0xFFFFFFFF
        self.seq = (self.seq + count) & 0xFFFFFFFF
        return first

    def dump_dests(self, ident: bytes, svc_family: int, names: dict[bytes, str]) -> list[Destination]:
        """The real servers of one service (a GET_DEST dump), decoded as they come."""
        seq = self.next_seq()
        family = self.family
        self.send(get_dests_request(family, seq, ident))
        dests: list[Destination] = []
        while True:
            state = decode_dest_datagram(self.recv(), family, seq, svc_family, dests, names)
            if state == 0:
                return dests
            if state > 0:
                raise _KernelError(state, "")

    def command(self, body: bytes) -> bytes | None:
        """One request that is not a dump, acknowledged: the payload of its reply
        message (None when it has none, as for a SET)."""
        seq = self.next_seq()
        self.send(frame(self.family, NLM_F_REQUEST | NLM_F_ACK, seq, body))
        reply: bytes | None = None
        while True:
            data = self.recv()
            for msg in walk(data):
                if msg.seq != seq:
                    continue
                if msg.type == self.family:
                    reply = data[msg.start:msg.end]
                elif msg.type == NLMSG_ERROR:
                    code, text = decode_error(data, msg)
                    if code:
                        raise _KernelError(code, text)
                    return reply

    def dump(self, body: bytes) -> Iterator[tuple[bytes, Message]]:
        """The family messages of one dump request, in order."""
        seq = self.next_seq()
        family = self.family
        self.send(frame(family, NLM_F_REQUEST | NLM_F_DUMP, seq, body))
        while True:
            data = self.recv()
            for msg in walk(data):
                if msg.seq != seq:
                    continue
                mtype = msg.type
                if mtype == family:
                    yield data, msg
                elif mtype == NLMSG_DONE:
                    if msg.end - msg.start >= 4:
                        code = -struct.unpack_from("=i", data, msg.start)[0]
                        if code > 0:
                            raise _KernelError(code, "")
                    return
                elif mtype == NLMSG_ERROR:
                    code, text = decode_error(data, msg)
                    raise _KernelError(code, text)


class _Window(NamedTuple):
    """One datagram's worth of encoded operations."""

    start: int  # index in the plan of the window's first operation
    messages: list[bytes]
    owners: list[int] | None  # each message's operation, from ``start`` (None: one per operation)
    refused: dict[int, str]  # operations the encoder refused, from ``start``
    first_seq: int


def _encode_windows(ops: Sequence[Operation], family: int, flags: int, first_seq: int,
                    size: int, compiled: bool = True) -> Generator[_Window, None, None]:
    encoder = Encoder(compiled=compiled)
    seq = first_seq
    for start in range(0, len(ops), size):
        messages, index, refused = encoder.messages(ops[start : start + size], family, flags, seq)
        yield _Window(start, messages, index, refused, seq)
        seq = (seq + len(messages)) & 0xFFFFFFFF


def _prefetched(items: Iterator[T], depth: int) -> Generator[T, None, None]:
    """``items``, produced by a helper thread up to ``depth`` ahead of the consumer.

    The kernel handles a window inside ``send()``, with the GIL released, so the
    helper encodes the next windows meanwhile. Its exceptions are raised here; when
    the consumer stops early (close()), the helper is stopped and joined.
    """
    slots: queue.Queue[tuple[bool, Any]] = queue.Queue(depth)
    stop = threading.Event()

    def put(item: tuple[bool, Any]) -> bool:
        while not stop.is_set():
            try:
                slots.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((True, item)):
                    return
        except BaseException as exc:  # re-raised in the consumer's thread
            put((False, exc))
            return
        put((False, None))

    worker = threading.Thread(target=produce, name="svcproxy-netlink-encode", daemon=True)
    worker.start()
    try:
        while True:
            ok, value = slots.get()
            if ok:
                yield value
            elif value is None:
                return
            else:
                raise value
    finally:
        stop.set()
        worker.join()


def _set_buffer(sock: socket.socket, force: int, plain: int, size: int) -> None:
    """Ask for ``size`` bytes, past the sysctl limit if allowed (CAP_NET_ADMIN)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, force, size)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, plain, size)


def _new_socket(bufsize: int, timeout: float) -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_GENERIC)
    try:
        sock.bind((0, 0))
        for option in (NETLINK_CAP_ACK, NETLINK_EXT_ACK):  # kernel 4.2+ / 4.12+; optional
            try:
                sock.setsockopt(SOL_NETLINK, option, 1)
            except OSError:
                pass
        _set_buffer(sock, SO_RCVBUFFORCE, socket.SO_RCVBUF, bufsize)
        _set_buffer(sock, SO_SNDBUFFORCE, socket.SO_SNDBUF, bufsize)
        # A kernel-side receive timeout keeps the socket blocking (a Python-level
        # timeout would poll() before every recv, doubling the syscalls).
        seconds = int(timeout)
        sock.setsockopt(
            socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("@ll", seconds, int((timeout - seconds) * 1e6))
        )
    except BaseException:
        sock.close()
        raise
    return sock


def _in_netns(netns: str, fn: Callable[[], T]) -> T:
    """``fn()`` run by a throwaway thread that has joined the network namespace at
    ``netns`` (setns() changes the namespace of the calling thread only). A socket
    or file it opens keeps that namespace for its life."""
    result: list[T] = []
    failure: list[BaseException] = []

    def enter_and_run() -> None:
        try:
            fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            failure.append(BackendError(f"cannot open network namespace {netns}: {exc.strerror}"))
            return
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.setns(fd, CLONE_NEWNET) != 0:
                code = ctypes.get_errno()
                failure.append(BackendError(f"cannot enter network namespace {netns}: {os.strerror(code)}"))
                return
            result.append(fn())
        except BaseException as exc:  # re-raised in the caller's thread
            failure.append(exc)
        finally:
            os.close(fd)

    worker = threading.Thread(target=enter_and_run, name=f"svcproxy-netns:{netns}", daemon=True)
    worker.start()
    worker.join()
    if failure:
        raise failure[0]
    return result[0]


def _read_proc_file() -> str:
    with open(procfs.PATH, "rb", buffering=0) as file:
        return procfs.read(file)


#: The model's order of real servers (DestKey's: address text, then port).
_DEST_ORDER = operator.attrgetter("address", "port")


def _with_sorted(vs: VirtualService, dests: list[Destination]) -> VirtualService:
    """``vs`` with the real servers read for it, in the model's order (sorted in
    place; VirtualService.with_destinations would also build a DestKey and a dict
    entry per server, for servers the kernel already keeps unique)."""
    if not dests:
        return vs
    dests.sort(key=_DEST_ORDER)
    return VirtualService(vs.key, vs.scheduler, vs.persistence, vs.flags, tuple(dests))


class NetlinkBackend:
    """Backend that speaks the IPVS generic-netlink protocol directly.

    ``netns``: a network namespace file to work in (None: this process's own).
    ``acks``: ask for an acknowledgement of every request (slower, same results).
    ``window``: requests per datagram (also capped by the socket buffers).
    ``prefetch``: encode large plans in a helper thread while the kernel works.
    ``compiled``: encode, and parse /proc/net/ip_vs, with the compiled loops where
    they are built (False: Python only, the reference; for comparisons).
    ``opener``: makes the socket (tests pass a fake kernel); ``netns`` is then unused.
    ``proc``: where ``read`` takes real servers from: True, /proc/net/ip_vs of the
    namespace; False, a GET_DEST dump per service; or a function returning the
    file's text (tests). Default: True, but False with an ``opener``.
    """

    def __init__(
        self,
        netns: str | None = None,
        *,
        acks: bool = False,
        window: int = 4096,
        bufsize: int = 8 << 20,
        timeout: float = 60.0,
        prefetch: bool = True,
        compiled: bool = True,
        opener: Callable[[], NetlinkSocket] | None = None,
        proc: bool | Callable[[], str] | None = None,
    ) -> None:
        if window < 1:
            raise ValueError("window must be at least 1")
        self.netns = netns
        self.acks = acks
        self.window = window
        self.bufsize = bufsize
        self.timeout = timeout
        self.prefetch = prefetch
        self.compiled = compiled
        self.opener = opener
        self.proc: bool | Callable[[], str] = opener is None if proc is None else proc
        self._proc_warned = False

    def __repr__(self) -> str:
        return (f"NetlinkBackend(netns={self.netns!r}, acks={self.acks}, window={self.window}, "
                f"prefetch={self.prefetch})")

    @contextmanager
    def _channel(self) -> Iterator[_Channel]:
        sock: NetlinkSocket
        try:
            if self.opener is not None:
                sock = self.opener()
            elif self.netns is None:
                sock = _new_socket(self.bufsize, self.timeout)
            else:
                sock = _in_netns(self.netns, lambda: _new_socket(self.bufsize, self.timeout))
        except OSError as exc:
            raise BackendError(f"cannot open a generic netlink socket: {exc}") from exc
        try:
            yield _Channel(sock, self.timeout)
        except DecodeError as exc:
            raise BackendError(f"cannot decode the kernel's answer: {exc}") from exc
        finally:
            sock.close()

    def read(self, counts: bool | None = None) -> Table:
        """The kernel's table, always with connection counts: they come with every
        read, so ``counts`` (taken as every backend takes it) changes nothing here."""
        del counts
        with self._channel() as channel:
            try:
                return self._read(channel)
            except _KernelError as exc:
                if exc.code == errno.EPERM:
                    raise BackendError(f"reading IPVS needs CAP_NET_ADMIN: {exc}") from exc
                raise BackendError(f"reading the IPVS table failed: {exc}") from exc

    def _read(self, channel: _Channel) -> Table:
        settings: dict[Any, Any] = {}
        listed = [decode_service(data, msg, settings) for data, msg in channel.dump(GET_SERVICE_BODY)]
        found = self._from_file(listed) if self.proc is not False and listed else None
        encoder = Encoder()
        names: dict[bytes, str] = {}
        services: dict[ServiceKey, VirtualService] = {}
        dumped = 0
        for vs, family, ident in listed:
            dests = found.pop(vs.key, None) if found is not None else None
            if dests is None:
                dests = channel.dump_dests(ident or encoder.ident(vs.key).attrs, family, names)
                dumped += 1
            services[vs.key] = _with_sorted(vs, dests)
        if found is not None and dumped:
            log.debug("%d of %d services not listed in %s (other namespaces' services make a stock kernel's "
                      "walk of it skip some): read with one dump each", dumped, len(listed), procfs.PATH)
        return Table(services)

    def _from_file(self, listed: list[DecodedService]) -> dict[ServiceKey, list[Destination]] | None:
        """Real servers of the dumped services that /proc/net/ip_vs lists, by key; None
        when the file cannot be used this time (the caller dumps every service).

        What the file lists is this namespace's own: the kernel prints a service only
        if it belongs to the namespace of the reader. It may leave some out: on a
        stock kernel the walk behind the file also steps over other namespaces'
        services and counts them, and each ``read`` restarts at a position that
        counts them, skipping as many of this namespace's services. Those are
        dumped by the caller. A label the dump does not have (the table changed
        between the two reads) makes the whole file unusable."""
        try:
            if callable(self.proc):
                text = self.proc()
            elif self.netns is None:
                text = _read_proc_file()
            else:
                text = _in_netns(self.netns, _read_proc_file)
            servers = procfs.parse(text, compiled=self.compiled)
        except (OSError, BackendError, DecodeError) as exc:
            self._proc_unusable(f"{exc}")
            return None
        labels = [procfs.label(vs.key) for vs, _, _ in listed]
        known = set(labels)
        stray = next((label for label in servers if label not in known), None)
        if stray is not None:
            self._proc_unusable(f"it lists {' '.join(stray)}, which the netlink dump does not")
            return None
        shared = {label for label, n in Counter(labels).items() if n > 1} if len(known) != len(labels) else set()
        # An IPv4 and an IPv6 service of one firewall mark share a label: whose real
        # servers are whose cannot be told, so both are dumped.
        return {vs.key: servers[label] for (vs, _, _), label in zip(listed, labels)
                if label in servers and label not in shared}

    def _proc_unusable(self, why: str) -> None:
        # A warning the first time (a missing or unexpected file stays so); a
        # table that changed between the two reads is normal, hence debug after.
        level = logging.DEBUG if self._proc_warned else logging.WARNING
        self._proc_warned = True
        log.log(level, "reading real servers over netlink, one dump per service (slower): %s: %s",
                procfs.PATH, why)

    def read_timeouts(self) -> Timeouts:
        """The namespace's IPVS timeouts (IPVS_CMD_GET_CONFIG)."""
        with self._channel() as channel:
            try:
                payload = channel.command(GET_CONFIG_BODY)
            except _KernelError as exc:
                raise BackendError(f"reading the IPVS timeouts failed: {exc}") from exc
        if payload is None:
            raise BackendError("the kernel sent no IPVS configuration")
        try:
            return decode_config(payload)
        except ValueError as exc:
            raise BackendError(f"cannot decode the IPVS configuration: {exc}") from exc

    def set_timeouts(self, timeouts: Timeouts) -> None:
        """Set the non-zero timeouts (IPVS_CMD_SET_CONFIG; zeros leave the kernel's)."""
        with self._channel() as channel:
            try:
                channel.command(set_config_body(timeouts))
            except _KernelError as exc:
                raise BackendError(f"setting the IPVS timeouts ({timeouts.describe()}) failed: {exc}") from exc

    def apply(self, ops: Sequence[Operation]) -> list[OperationResult]:
        """Apply in order; return the operations the kernel (or the encoder) refused,
        each with a readable reason. A refused operation never stops the others."""
        if not ops:
            return []
        flags = NLM_F_REQUEST | NLM_F_ACK if self.acks else NLM_F_REQUEST
        results: dict[int, OperationResult] = {}
        with self._channel() as channel:
            size = channel.window_size(self.window)
            first = channel.reserve(len(ops))  # refused operations leave harmless gaps
            windows = _encode_windows(ops, channel.family, flags, first, size, self.compiled)
            if self.prefetch and len(ops) >= _PREFETCH_MIN_WINDOWS * size:
                windows = _prefetched(windows, _PREFETCH_DEPTH)
            try:
                for w in windows:
                    for k, text in w.refused.items():
                        results[w.start + k] = OperationResult(ops[w.start + k], text)
                    if not w.messages:
                        continue
                    for k, (code, text) in channel.exchange(w.messages, w.first_seq, acks=self.acks).items():
                        i = w.start + (w.owners[k] if w.owners is not None else k)
                        op = ops[i]
                        if code == errno.EPERM:
                            raise BackendError(
                                f"changing IPVS needs CAP_NET_ADMIN ({op}: {describe_error(None, code, text)})")
                        results[i] = OperationResult(op, describe_error(op.kind, code, text))
            finally:
                windows.close()  # stops the helper thread, if there is one
        return [results[i] for i in sorted(results)]
