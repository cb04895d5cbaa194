"""``--pod-netns-mode``: how Services reach Pods that own a network interface.

Why a mode at all: a share-namespace ``ip_vs`` (svcproxy's own module, built from
kernel/ by tools/build-ipvs-module for a stock kernel, or the TencentOS kernel's) can
be loaded with ``mode=2``, and then every network namespace uses the node's IPVS
table. A stock kernel has one IPVS table per namespace, so the Pod-visible part of
the table must be replicated into each Pod's namespace. ``auto`` picks whichever the
running kernel supports, so one DaemonSet manifest fits both kinds of node.

Replicate mode is refused on a share-namespace ``ip_vs``: a Pod namespace's own table
is not used there (svcproxy's module refuses changes from it with EPERM; a module
that let it see the node's table would have the Pod-visible sync delete NodePorts).

The module parameter is read-only after load and has no sysctl, so reading
``/sys/module/ip_vs/parameters/mode`` once at start is enough, once ``ip_vs`` is
loaded: where it is not yet, the first IPVS request loads it (with the node's
modprobe options, mode=2 among them), so ``decide_loaded`` makes that request first. The path is a
parameter everywhere so host tests can point it at a file of their own.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

__all__ = [
    "IP_VS_MODE_PARAM",
    "KernelShareState",
    "Mode",
    "ModeDecision",
    "ModeError",
    "SHARE_NS_MODE",
    "decide",
    "decide_loaded",
    "read_kernel_share",
]

log = logging.getLogger("svcproxy.podns")

#: Where a share-namespace ``ip_vs`` module shows its ``mode`` parameter.
IP_VS_MODE_PARAM = "/sys/module/ip_vs/parameters/mode"
#: ``mode`` value of share-namespace IPVS (0 = stock behaviour; TencentOS also has 1, an eBPF variant).
SHARE_NS_MODE = "2"


class Mode(str, enum.Enum):
    """What ``--pod-netns-mode`` accepts; ``decide`` turns AUTO into one of the others."""

    AUTO = "auto"
    KERNEL = "kernel"
    REPLICATE = "replicate"
    OFF = "off"


class ModeError(RuntimeError):
    """``kernel`` was asked for and the running kernel does not share IPVS tables, or
    ``replicate`` was asked for and it does."""


@dataclass(frozen=True)
class KernelShareState:
    """What the module parameter file says (``available``: it reads ``2``)."""

    available: bool
    detail: str


def read_kernel_share(param: str | Path = IP_VS_MODE_PARAM) -> KernelShareState:
    """Read the ``ip_vs`` ``mode`` parameter. A missing file is the normal case on a
    stock kernel (the parameter does not exist) or when ip_vs is not loaded yet."""
    path = Path(param)
    try:
        value = path.read_text().strip()
    except FileNotFoundError:
        return KernelShareState(False, f"{path} does not exist (stock ip_vs: no share-namespace mode, "
                                       "or ip_vs not loaded)")
    except OSError as exc:
        return KernelShareState(False, f"cannot read {path}: {exc.strerror or exc}")
    if value == SHARE_NS_MODE:
        return KernelShareState(True, f"{path} reads {value!r}: ip_vs shares the node's table with every namespace")
    return KernelShareState(False, f"{path} reads {value!r}, not {SHARE_NS_MODE!r} (share-namespace mode is "
                                   f"chosen at load time: modprobe ip_vs mode={SHARE_NS_MODE})")


@dataclass(frozen=True)
class ModeDecision:
    """The mode in force (never AUTO) and why, for the start-up log line."""

    requested: Mode
    effective: Mode
    reason: str

    @property
    def replicate(self) -> bool:
        """Pod namespaces get tables of their own."""
        return self.effective is Mode.REPLICATE

    @property
    def shared(self) -> bool:
        """The kernel serves every namespace from the node's table."""
        return self.effective is Mode.KERNEL

    def describe(self) -> str:
        what = {
            Mode.KERNEL: "kernel: programming the node table only; every Pod namespace shares it",
            Mode.REPLICATE: "replicate: the Pod-visible table is programmed into each attached Pod namespace",
            Mode.OFF: "off: node namespace only; Pod namespaces are not attached",
        }[self.effective]
        auto = " (auto)" if self.requested is Mode.AUTO else ""
        return f"Pod network namespace mode {what}{auto}; {self.reason}"


def decide(requested: Mode | str, param: str | Path = IP_VS_MODE_PARAM) -> ModeDecision:
    """Resolve the requested mode against the running kernel.

    Raises ModeError for ``kernel`` on a kernel without share-namespace IPVS: running
    on would leave every Pod with its own NIC without Services, silently. Raises it
    for ``replicate`` on one with it: see the module docstring.
    """
    mode = Mode(requested)
    if mode is Mode.OFF:
        return ModeDecision(mode, Mode.OFF, "requested")
    state = read_kernel_share(param)
    if mode is Mode.KERNEL:
        if not state.available:
            raise ModeError(f"--pod-netns-mode kernel needs the share-namespace ip_vs loaded with "
                            f"mode={SHARE_NS_MODE} (svcproxy's module: kernel/, tools/build-ipvs-module; "
                            f"or the TencentOS kernel's), but {state.detail}")
        return ModeDecision(mode, Mode.KERNEL, state.detail)
    if mode is Mode.REPLICATE:
        if state.available:
            raise ModeError(f"--pod-netns-mode replicate cannot work here: {state.detail}, so Pod "
                            "namespaces have no IPVS table of their own (use kernel or auto)")
        return ModeDecision(mode, Mode.REPLICATE, "requested")
    if state.available:
        return ModeDecision(mode, Mode.KERNEL, state.detail)
    return ModeDecision(mode, Mode.REPLICATE, state.detail)


def decide_loaded(requested: Mode | str, param: str | Path, load: Callable[[], object]) -> ModeDecision:
    """``decide``, after ``load()`` (a read of the node's IPVS table) where the module
    whose parameter ``param`` is has not been loaded yet: deciding before would take a
    share-namespace ip_vs that is about to be loaded for a stock one. ``load``'s errors
    are left to the sync that follows to report."""
    module = Path(param).parent.parent
    if requested != Mode.OFF and not module.exists():
        try:
            load()
        except Exception as exc:  # noqa: BLE001 - the first sync reports it properly
            log.debug("reading the IPVS table to load %s: %s", module.name, exc)
    return decide(requested, param)
