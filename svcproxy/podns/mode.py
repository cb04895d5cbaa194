"""``--pod-netns-mode``: how Services reach Pods that own a network interface.

Why a mode at all: on the TencentOS kernel the ``ip_vs`` module can be loaded with
``mode=2`` ("share namespace"), and then every network namespace uses the node's
IPVS table; programming Pod namespaces there would be wasted work at best. A stock
kernel has one IPVS table per namespace, so the Pod-visible part of the table must
be replicated into each Pod's namespace. ``auto`` picks whichever the running kernel
supports, so one DaemonSet manifest fits both kinds of node.

The module parameter is read-only after load and has no sysctl, so reading
``/sys/module/ip_vs/parameters/mode`` once at start is enough. The path is a
parameter everywhere so tests can point it at a file of their own (the patched
kernel is not available to test against).
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "IP_VS_MODE_PARAM",
    "KernelShareState",
    "Mode",
    "ModeDecision",
    "ModeError",
    "SHARE_NS_MODE",
    "decide",
    "read_kernel_share",
]

log = logging.getLogger("svcproxy.podns")

#: Where the TencentOS ``ip_vs`` module shows its ``mode`` parameter.
IP_VS_MODE_PARAM = "/sys/module/ip_vs/parameters/mode"
#: ``mode`` value of the share-namespace kernel (0 = original IPVS, 1 = eBPF variant).
SHARE_NS_MODE = "2"


class Mode(str, enum.Enum):
    """What ``--pod-netns-mode`` accepts; ``decide`` turns AUTO into one of the others."""

    AUTO = "auto"
    KERNEL = "kernel"
    REPLICATE = "replicate"
    OFF = "off"


class ModeError(RuntimeError):
    """``kernel`` was asked for and the running kernel does not share IPVS tables."""


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
    on would leave every Pod with its own NIC without Services, silently.
    """
    mode = Mode(requested)
    if mode is Mode.OFF:
        return ModeDecision(mode, Mode.OFF, "requested")
    state = read_kernel_share(param)
    if mode is Mode.KERNEL:
        if not state.available:
            raise ModeError(f"--pod-netns-mode kernel needs the share-namespace ip_vs (TencentOS, "
                            f"mode={SHARE_NS_MODE}), but {state.detail}")
        return ModeDecision(mode, Mode.KERNEL, state.detail)
    if mode is Mode.REPLICATE:
        return ModeDecision(mode, Mode.REPLICATE, "requested" + ("" if not state.available else
                                                               f" (note: {state.detail})"))
    if state.available:
        return ModeDecision(mode, Mode.KERNEL, state.detail)
    return ModeDecision(mode, Mode.REPLICATE, state.detail)
