"""The netlink backend: IPVS over generic netlink, batched on one socket.

Why it is fast (figures in docs/performance.md): every request is encoded with the
struct-based codec in ``nlcodec`` (pyroute2's message classes are ~90x slower), and
requests are not sent one round trip at a time. The kernel handles a netlink
datagram synchronously inside ``send()``, one message after another, and a failed
message never stops the ones after it. So ``apply`` packs a window of requests into
one datagram, and by the time ``send()`` returns every answer is queued on the
socket. Success acknowledgements are not asked for, except on the last request of
a window: failures always come back as NLMSG_ERROR with the request's sequence
number, and the last request's answer marks the end of the window. That halves the
syscalls and skb allocations of acking everything (measured: see
docs/performance.md). Sequence numbers tie each error to its operation.

Reading: one GET_SERVICE dump, then one GET_DEST dump per service. Dumps cannot be
batched the same way: a socket runs one dump at a time (a second request gets
EBUSY) and a dump only finishes when its reader calls ``recv()`` (the kernel fills
the next part, here the NLMSG_DONE, from inside ``recvmsg``). So each service costs
one ``send`` and two ``recv`` calls, with no other waiting. Destination messages
come back with their connection counts, which graceful termination needs.

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
import operator
import os
import socket
import struct
import threading
from contextlib import contextmanager
from typing import Callable, Iterator, Protocol, Sequence

from svcproxy.ipvs import nlcodec
from svcproxy.ipvs.backend import BackendError
from svcproxy.ipvs.nlcodec import (
    NLM_F_ACK,
    NLM_F_DUMP,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
    DecodeError,
    Encoder,
    Message,
    decode_dest_datagram,
    decode_error,
    decode_service,
    describe_error,
    frame,
    walk,
)
from svcproxy.model import Destination, Operation, OperationResult, ServiceKey, Table, VirtualService

__all__ = ["NetlinkBackend", "NetlinkSocket"]

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
        self.send(frame(nlcodec.GENL_ID_CTRL, NLM_F_REQUEST, seq, nlcodec.family_request()))
        while True:
            data = self.recv()
            for msg in walk(data):
                if msg.seq != seq:
                    continue
                if msg.type == NLMSG_ERROR:
                    code, text = decode_error(data, msg)
                    if code == errno.ENOENT:
                        raise BackendError("IPVS generic netlink family not found: is ip_vs loaded?")
                    if code:
                        raise BackendError(f"generic netlink family lookup failed: {describe_error(None, code, text)}")
                elif msg.type == nlcodec.GENL_ID_CTRL:
                    return nlcodec.decode_family_id(data, msg)

    def transact(
        self, messages: Sequence[bytes], first_seq: int, *, acks: bool, window: int
    ) -> dict[int, tuple[int, str]]:
        """Send complete, numbered messages in windows; return (errno, extack) by
        message index.

        With ``acks`` every message already asks for an acknowledgement and a
        window ends when all have answered. Without, only the window's last message
        is made to ask (its flags are patched here), and its answer, ack or error,
        ends the window: it is queued after the answers to the ones before it.
        """
        window = max(1, min(window, self.rcvbuf // _ANSWER_BUDGET, (self.sndbuf - _SEND_SLACK) // _MAX_MESSAGE))
        errors: dict[int, tuple[int, str]] = {}
        loud = struct.pack("=H", NLM_F_REQUEST | NLM_F_ACK)
        total = len(messages)
        for i in range(0, total, window):
            chunk = list(messages[i : i + window])
            count = len(chunk)
            if not acks:
                chunk[-1] = chunk[-1][:6] + loud + chunk[-1][8:]
            base = (first_seq + i) & 0xFFFFFFFF
            last = count - 1
            self.send(b"".join(chunk))
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
                        errors[i + k] = (code, text)
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
        self.send(nlcodec.get_dests_request(family, seq, ident))
        dests: list[Destination] = []
        while True:
            state = decode_dest_datagram(self.recv(), family, seq, svc_family, dests, names)
            if state == 0:
                return dests
            if state > 0:
                raise _KernelError(state, "")

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


def _socket_in(netns: str, bufsize: int, timeout: float) -> socket.socket:
    """A netlink socket created inside the network namespace at ``netns``.

    setns() changes the namespace of the calling thread only, so a throwaway thread
    does it and creates the socket; the socket keeps that namespace for its life.
    """
    result: list[socket.socket] = []
    failure: list[BaseException] = []

    def enter_and_create() -> None:
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
            result.append(_new_socket(bufsize, timeout))
        except BaseException as exc:  # re-raised in the caller's thread
            failure.append(exc)
        finally:
            os.close(fd)

    worker = threading.Thread(target=enter_and_create, name=f"svcproxy-netns:{netns}", daemon=True)
    worker.start()
    worker.join()
    if failure:
        raise failure[0]
    return result[0]


#: The model's order of real servers (DestKey's: address text, then port).
_DEST_ORDER = operator.attrgetter("address", "port")


class NetlinkBackend:
    """Backend that speaks the IPVS generic-netlink protocol directly.

    ``netns``: a network namespace file to work in (None: this process's own).
    ``acks``: ask for an acknowledgement of every request (slower, same results).
    ``window``: requests per datagram (also capped by the socket buffers).
    ``opener``: makes the socket (tests pass a fake kernel); ``netns`` is then unused.
    """

    def __init__(
        self,
        netns: str | None = None,
        *,
        acks: bool = False,
        window: int = 256,
        bufsize: int = 8 << 20,
        timeout: float = 60.0,
        opener: Callable[[], NetlinkSocket] | None = None,
    ) -> None:
        if window < 1:
            raise ValueError("window must be at least 1")
        self.netns = netns
        self.acks = acks
        self.window = window
        self.bufsize = bufsize
        self.timeout = timeout
        self.opener = opener

    def __repr__(self) -> str:
        return f"NetlinkBackend(netns={self.netns!r}, acks={self.acks}, window={self.window})"

    @contextmanager
    def _channel(self) -> Iterator[_Channel]:
        sock: NetlinkSocket
        try:
            if self.opener is not None:
                sock = self.opener()
            elif self.netns is None:
                sock = _new_socket(self.bufsize, self.timeout)
            else:
                sock = _socket_in(self.netns, self.bufsize, self.timeout)
        except OSError as exc:
            raise BackendError(f"cannot open a generic netlink socket: {exc}") from exc
        try:
            yield _Channel(sock, self.timeout)
        except DecodeError as exc:
            raise BackendError(f"cannot decode the kernel's answer: {exc}") from exc
        finally:
            sock.close()

    def read(self, counts: bool = True) -> Table:
        """The kernel's table, with connection counts (they come with every read;
        ``counts`` exists for call compatibility with the ipvsadm backend)."""
        del counts
        with self._channel() as channel:
            try:
                return self._read(channel)
            except _KernelError as exc:
                if exc.code == errno.EPERM:
                    raise BackendError(f"reading IPVS needs CAP_NET_ADMIN: {exc}") from exc
                raise BackendError(f"reading the IPVS table failed: {exc}") from exc

    def _read(self, channel: _Channel) -> Table:
        listed = [decode_service(data, msg) for data, msg in channel.dump(nlcodec.GET_SERVICE_BODY)]
        encoder = Encoder()
        names: dict[bytes, str] = {}
        services: dict[ServiceKey, VirtualService] = {}
        for vs, family, ident in listed:
            dests = channel.dump_dests(ident or encoder.ident(vs.key).attrs, family, names)
            if dests:
                dests.sort(key=_DEST_ORDER)
                vs = VirtualService(vs.key, vs.scheduler, vs.persistence, vs.flags, tuple(dests))
            services[vs.key] = vs
        return Table(services)

    def apply(self, ops: Sequence[Operation]) -> list[OperationResult]:
        """Apply in order; return the operations the kernel (or the encoder) refused,
        each with a readable reason. A refused operation never stops the others."""
        if not ops:
            return []
        flags = NLM_F_REQUEST | NLM_F_ACK if self.acks else NLM_F_REQUEST
        with self._channel() as channel:
            first = channel.reserve(len(ops))  # refused operations leave harmless gaps
            messages, index, refused = Encoder().messages(ops, channel.family, flags, first)
            errors = channel.transact(messages, first, acks=self.acks, window=self.window) if messages else {}
        results = {i: OperationResult(ops[i], text) for i, text in refused.items()}
        for k, (code, text) in errors.items():
            i = index[k] if index is not None else k
            op = ops[i]
            if code == errno.EPERM:
                raise BackendError(f"changing IPVS needs CAP_NET_ADMIN ({op}: {describe_error(None, code, text)})")
            results[i] = OperationResult(op, describe_error(op.kind, code, text))
        return [results[i] for i in sorted(results)]
