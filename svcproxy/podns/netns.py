"""A Pod's network namespace, named by a path and pinned to the inode behind it.

A namespace is named by a path (/var/run/netns/NAME, /proc/PID/ns/net) and *is* the
nsfs inode behind it. Every kernel access opens the path and checks that the inode is
still the one attached, so a name reused for a new namespace never receives the old
one's operations, and a namespace deleted in the middle of a sync raises
``NamespaceGone``, which the reconcile loop takes as "detach quietly", not as an error.
No descriptor is kept between calls: that would keep a deleted Pod's namespace alive.
"""

from __future__ import annotations

import errno
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from svcproxy.ipvs.backend import BackendError


class NamespaceGone(Exception):
    """A Pod network namespace vanished: detach it quietly, it is not an error."""


class NodeNamespace(ValueError):
    """The path names the node's own network namespace (the agent's), not a Pod's:
    programming it as a Pod's would fight the node's table every sync."""


@dataclass(frozen=True, order=True)
class NetnsId:
    """A network namespace's identity: the nsfs inode behind its file."""

    dev: int
    ino: int

    def __str__(self) -> str:
        return f"net:[{self.ino}]"


def _nsfs_dev() -> int:
    """The device number every nsfs inode shares (this process's own namespace file
    is one); a file with another device number is not a namespace."""
    return os.stat("/proc/self/ns/net").st_dev


def netns_id(path: str) -> NetnsId:
    """The identity of the namespace at ``path``; NamespaceGone if there is none."""
    try:
        st = os.stat(path)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ESTALE):
            raise NamespaceGone(f"{path}: {exc.strerror}") from None
        raise BackendError(f"cannot stat network namespace {path}: {exc.strerror}") from exc
    if st.st_dev != _nsfs_dev():
        # What `ip netns delete` leaves when something still holds the mount point
        # open, or a name that was never a namespace.
        raise NamespaceGone(f"{path} is not a namespace file (any more)")
    return NetnsId(st.st_dev, st.st_ino)


def own_netns() -> NetnsId:
    """The agent's own network namespace (the node's: the agent runs on the host network)."""
    st = os.stat("/proc/self/ns/net")
    return NetnsId(st.st_dev, st.st_ino)


def pod_netns_id(path: str) -> NetnsId:
    """``netns_id``, refusing the node's own namespace (NodeNamespace)."""
    ident = netns_id(path)
    if ident == own_netns():
        raise NodeNamespace(f"{path} is the node's own network namespace, not a Pod's")
    return ident


class PodNamespace:
    """A Pod's network namespace, pinned to the inode it had when attached."""

    def __init__(self, path: str, ident: NetnsId) -> None:
        self.path = path
        self.id = ident

    @classmethod
    def open(cls, path: str) -> "PodNamespace":
        return cls(path, pod_netns_id(path))

    def __repr__(self) -> str:
        return f"PodNamespace({self.path!r}, {self.id})"

    def check(self) -> None:
        """Cheap: NamespaceGone unless the path still names the same namespace."""
        if netns_id(self.path) != self.id:
            raise NamespaceGone(f"{self.path} now names another namespace")

    @contextmanager
    def entered(self) -> Iterator[tuple[str, int]]:
        """An open descriptor of the namespace, checked to be the attached one, as
        (path usable by this process and its children given the fd, fd)."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ESTALE):
                raise NamespaceGone(f"{self.path}: {exc.strerror}") from None
            raise BackendError(f"cannot open network namespace {self.path}: {exc.strerror}") from exc
        try:
            st = os.fstat(fd)
            if NetnsId(st.st_dev, st.st_ino) != self.id:
                raise NamespaceGone(f"{self.path} now names another namespace")
            yield f"/proc/self/fd/{fd}", fd
        finally:
            os.close(fd)
