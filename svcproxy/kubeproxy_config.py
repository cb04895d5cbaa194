"""kube-proxy's own configuration file (KubeProxyConfiguration, v1alpha1) read as svcproxy settings.

A cluster that runs kube-proxy already has its settings in the ``kube-proxy``
ConfigMap (kubeadm writes it: ``config.conf``). Migrating is simpler and safer when
svcproxy reads that same file than when someone copies the values into flags by
hand. So ``--config`` also takes a KubeProxyConfiguration: every field svcproxy
implements becomes the svcproxy setting of the same meaning (then parsed and checked
exactly like a flag), a field svcproxy does not implement is accepted, and named in
one warning when it holds anything but kube-proxy's default (an operator should know
that a setting no longer applies), and a field kube-proxy does not know is an error,
as is a ``mode`` other than ipvs.

``FIELDS`` describes v1alpha1 field by field; kubeadm writes every field, mostly as a
zero value (``""``, ``0s``, ``null``) meaning "kube-proxy's default".
"""

from __future__ import annotations

import argparse
import ipaddress
import re
from dataclasses import dataclass
from typing import Any, Callable, Collection, Mapping

from svcproxy import flags, logformat
from svcproxy.model import IPVS_SCHEDULERS

API_VERSION = "kubeproxy.config.k8s.io/v1alpha1"
KIND = "KubeProxyConfiguration"


class KubeProxyConfigError(ValueError):
    """A field kube-proxy does not know, a wrong type, or a mode svcproxy cannot run."""


def is_kube_proxy_config(data: object) -> bool:
    return isinstance(data, dict) and data.get("kind") == KIND


# --- values ----------------------------------------------------------------------------

def go_duration(value: object) -> float:
    """Seconds in a Go duration (``1h0m0s``, ``250ms``, ``0``), as Kubernetes writes them.
    Stricter than the flag's parser, which it uses: a unit is required (``0`` aside)."""
    problem = f"{value!r} is not a duration like 30s or 1m0s"
    if not isinstance(value, str):
        raise ValueError(problem)
    text = value.strip()
    if text in ("0", ""):
        return 0.0
    if re.fullmatch(r"\d+(\.\d*)?", text):
        raise ValueError(problem)
    try:
        return flags.go_duration(text)
    except argparse.ArgumentTypeError:
        raise ValueError(problem) from None


def _is_zero(value: object) -> bool:
    """Go's zero value of the field's type, as YAML spells it."""
    return (value == "" or value is False or (value == 0 and not isinstance(value, bool)) or value == []
            or value == {} or (isinstance(value, str) and value in ("0s", "0")))


def _is_default(value: object, defaults: tuple[object, ...], deep: bool = False, zero: bool = True) -> bool:
    """Whether kube-proxy would run with its default here: an absent (null) field, one of
    the ``defaults``, or (``zero``: a field kube-proxy defaults when it holds its zero
    value) a zero value. ``deep``: a mapping whose every value is a default (logging
    options)."""
    if deep and isinstance(value, dict):
        return all(_is_default(v, (), True) for v in value.values())
    if value is None or (zero and _is_zero(value)):
        return True
    for default in defaults:
        if value == default:
            return True
        if isinstance(default, str) and isinstance(value, str) and default[-1:] == "s":
            try:
                return go_duration(value) == go_duration(default)
            except ValueError:
                return False
    return False


# --- the fields --------------------------------------------------------------------------

#: How a mapped field becomes a setting: its value -> the setting's value, or None when
#: the value means "svcproxy's default". ValueError for a value of the wrong kind.
Convert = Callable[[object], Any]


@dataclass(frozen=True)
class Mapped:
    """A field svcproxy implements, as the svcproxy setting (flag) ``setting``."""

    setting: str | None
    convert: Convert


@dataclass(frozen=True)
class Unmapped:
    """A field svcproxy does not implement; these values are kube-proxy's defaults.
    ``zero``: kube-proxy replaces the field's zero value by its default. Fields that
    are pointers in kube-proxy's Go type (defaulted only when absent) set it False:
    there 0, false or 0s is a setting of its own (masqueradeBit 0 is bit 0;
    conntrack.maxPerCore 0 leaves the kernel's limit as it is)."""

    defaults: tuple[object, ...] = ()
    deep: bool = False
    zero: bool = True


def _checked(check: Callable[[str], Any], value: str) -> None:
    """The flag's own check, so a bad value is reported under the field's name."""
    try:
        check(value)
    except argparse.ArgumentTypeError as exc:
        raise ValueError(str(exc)) from None


def _text(setting: str, check: Callable[[str], Any] | None = None, unset: tuple[str, ...] = ("",)) -> Mapped:
    def convert(value: object) -> Any:
        if value is None or value in unset:
            return None
        if not isinstance(value, str):
            raise ValueError(f"{value!r} is not a string")
        if check is not None:
            _checked(check, value)
        return value
    return Mapped(setting, convert)


def _seconds(setting: str, check: Callable[[str], Any]) -> Mapped:
    """A Go duration; 0s (what kubeadm writes) leaves svcproxy's default (for the IPVS
    timeouts: the kernel's value, as in kube-proxy)."""
    def convert(value: object) -> Any:
        if value is None:
            return None
        seconds = go_duration(value)
        if seconds == 0:
            return None
        _checked(check, f"{seconds:g}")
        return f"{seconds:g}"
    return Mapped(setting, convert)


def _flag(setting: str) -> Mapped:
    def convert(value: object) -> Any:
        if value is None or value is False:
            return None
        if value is not True:
            raise ValueError(f"{value!r}: must be true or false")
        return True
    return Mapped(setting, convert)


def _list(setting: str, check: Callable[[str], Any]) -> Mapped:
    def convert(value: object) -> Any:
        if value is None or value == []:
            return None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{value!r} is not a list of strings")
        _checked(check, ",".join(value))
        return list(value)
    return Mapped(setting, convert)


#: kube-proxy's port for healthzBindAddress given as an IP alone.
HEALTHZ_PORT = 10256


def _healthz_bind(value: object) -> Any:
    """healthzBindAddress; an IP alone gets kube-proxy's port, as its defaulting
    (AppendPortIfNeeded) does: ``0.0.0.0`` is ``0.0.0.0:10256``, ``::`` ``[::]:10256``."""
    if isinstance(value, str) and value and "%" not in value:
        try:
            address = ipaddress.ip_address(value)
        except ValueError:
            pass
        else:
            value = f"[{address}]:{HEALTHZ_PORT}" if address.version == 6 else f"{address}:{HEALTHZ_PORT}"
    return _text("health-bind", flags.bind).convert(value)


def _bind_address(value: object) -> Any:
    """kube-proxy's bindAddress overrides its idea of the node's IP (0.0.0.0/:: do not)."""
    if value is None or value in ("", "0.0.0.0", "::"):
        return None
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not an IP address")
    _checked(flags.ip, value)
    return [value]


def _mode(value: object) -> Any:
    if value in (None, "", "ipvs"):
        return None
    raise ValueError(f"{value!r}: svcproxy is an IPVS proxy; mode must be ipvs or empty")


def _scheduler(value: str) -> None:
    if value not in IPVS_SCHEDULERS:
        raise argparse.ArgumentTypeError(f"unknown IPVS scheduler {value!r}")


def _logging_format(value: str) -> None:
    if value not in logformat.FORMATS:
        raise argparse.ArgumentTypeError(f"{value!r} is not one of {', '.join(logformat.FORMATS)}")


_DURATION_ZERO = ("0s",)

FIELDS: Mapping[str, Any] = {
    "apiVersion": Mapped(None, lambda _: None), "kind": Mapped(None, lambda _: None),  # checked first
    "bindAddress": Mapped("node-ip", _bind_address),
    "bindAddressHardFail": Unmapped(),
    "clientConnection": {
        "acceptContentTypes": Unmapped(), "burst": Unmapped((10,)),
        "contentType": Unmapped(("application/vnd.kubernetes.protobuf",)),
        "kubeconfig": _text("kubeconfig"), "qps": Unmapped((5,)),
    },
    "clusterCIDR": _text("cluster-cidr", flags.cidrs),
    "configSyncPeriod": Unmapped(("15m0s",)),
    "conntrack": {
        "maxPerCore": Unmapped((32768,), zero=False), "min": Unmapped((131072,), zero=False), "tcpBeLiberal": Unmapped(),
        "tcpCloseWaitTimeout": Unmapped(("1h0m0s",), zero=False),
        "tcpEstablishedTimeout": Unmapped(("24h0m0s",), zero=False),
        "udpStreamTimeout": Unmapped(), "udpTimeout": Unmapped(),
    },
    "detectLocal": {"bridgeInterface": Unmapped(), "interfaceNamePrefix": Unmapped()},
    "detectLocalMode": Unmapped(("ClusterCIDR",)),
    "enableProfiling": Unmapped(),
    "featureGates": Unmapped(),
    "healthzBindAddress": Mapped("health-bind", _healthz_bind),
    "hostnameOverride": _text("node"),
    "iptables": {
        "localhostNodePorts": Unmapped((True,), zero=False), "masqueradeAll": _flag("masquerade-all"),
        "masqueradeBit": Unmapped((14,), zero=False), "minSyncPeriod": Unmapped(("1s",)), "syncPeriod": Unmapped(("30s",)),
    },
    "ipvs": {
        "excludeCIDRs": _list("exclude-cidrs", flags.cidrs),
        "minSyncPeriod": _seconds("min-sync-period", flags.seconds),
        "scheduler": _text("scheduler", _scheduler), "strictARP": _flag("strict-arp"),
        "syncPeriod": _seconds("sync-period", flags.positive_seconds),
        "tcpFinTimeout": _seconds("ipvs-tcpfin-timeout", flags.ipvs_timeout),
        "tcpTimeout": _seconds("ipvs-tcp-timeout", flags.ipvs_timeout),
        "udpTimeout": _seconds("ipvs-udp-timeout", flags.ipvs_timeout),
    },
    "logging": {
        "format": _text("logging-format", _logging_format),
        "flushFrequency": Unmapped(("5s", 5000000000)), "verbosity": Unmapped(), "vmodule": Unmapped(),
        "options": Unmapped(deep=True), "shutdownTimeout": Unmapped(),
    },
    # kube-proxy appends its port to an address without one (AppendPortIfNeeded).
    "metricsBindAddress": Unmapped(("127.0.0.1:10249", "127.0.0.1")),
    "mode": Mapped(None, _mode),
    "nftables": {
        "masqueradeAll": Unmapped(), "masqueradeBit": Unmapped((14,), zero=False), "minSyncPeriod": Unmapped(("1s",)),
        "syncPeriod": Unmapped(("30s",)),
    },
    "nodePortAddresses": _list("nodeport-addresses", flags.nodeport_addresses),
    "oomScoreAdj": Unmapped((-999,), zero=False),
    "portRange": Unmapped(),
    "showHiddenMetricsForVersion": Unmapped(),
    "winkernel": {
        "enableDSR": Unmapped(), "forwardHealthCheckVip": Unmapped(), "networkName": Unmapped(),
        "rootHnsEndpointName": Unmapped(), "sourceVip": Unmapped(),
    },
    # Removed from kube-proxy, still in ConfigMaps older kubeadm versions wrote.
    "resourceContainer": Unmapped(("/kube-proxy",)), "udpIdleTimeout": Unmapped(("250ms",)),
}

@dataclass(frozen=True)
class Translated:
    """svcproxy settings (flag names without dashes) and the fields left behind."""

    settings: Mapping[str, Any]
    #: Dotted names of fields svcproxy does not implement that hold a non-default value.
    ignored: tuple[str, ...]


def translate(data: Mapping[str, Any], known_settings: Collection[str]) -> Translated:
    """The settings a KubeProxyConfiguration asks for; KubeProxyConfigError for a field
    kube-proxy does not know, a value of the wrong type, or a mode other than ipvs.

    A mapped field whose svcproxy setting this version lacks (``known_settings``) is
    treated as not implemented."""
    if data.get("apiVersion") != API_VERSION:
        raise KubeProxyConfigError(f"apiVersion {data.get('apiVersion')!r}: only {API_VERSION} is read")
    settings: dict[str, Any] = {}
    ignored: list[str] = []
    _walk(data, FIELDS, "", settings, ignored, frozenset(known_settings))
    _nodeport_cidrs_win(settings, ignored)
    _healthz_follows_bind_family(data, settings, known_settings)
    return Translated(settings, tuple(ignored))


def _healthz_follows_bind_family(data: Mapping[str, Any], settings: dict[str, Any],
                                 known: Collection[str]) -> None:
    """kube-proxy's default healthz address is ``[::]:10256`` when bindAddress is an
    IPv6 address (0.0.0.0:10256 otherwise, svcproxy's own default)."""
    bind = data.get("bindAddress")
    if "health-bind" in settings or "health-bind" not in known or not isinstance(bind, str):
        return
    try:
        v6 = ipaddress.ip_address(bind).version == 6
    except ValueError:
        return
    if v6:
        settings["health-bind"] = f"[::]:{HEALTHZ_PORT}"


def _nodeport_cidrs_win(settings: dict[str, Any], ignored: list[str]) -> None:
    """kube-proxy serves NodePorts on the local addresses inside nodePortAddresses'
    CIDRs whatever its bindAddress; svcproxy's --node-ip (bindAddress' setting) would
    override those CIDRs. So with CIDRs, bindAddress has nothing left to do here and
    is named among the ignored fields rather than silently narrowing the NodePorts."""
    cidrs = settings.get("nodeport-addresses")
    if "node-ip" in settings and cidrs and cidrs != [flags.PRIMARY]:
        del settings["node-ip"]
        ignored.append("bindAddress")


def _walk(data: Mapping[str, Any], schema: Mapping[str, Any], prefix: str, settings: dict[str, Any],
          ignored: list[str], known: frozenset[str]) -> None:
    unknown = sorted(prefix + str(k) for k in data if k not in schema)
    if unknown:
        raise KubeProxyConfigError(f"unknown field(s) {', '.join(unknown)} (not in {API_VERSION})")
    for key, value in data.items():
        name, rule = prefix + key, schema[key]
        if isinstance(rule, dict):
            if value is None:
                continue
            if not isinstance(value, dict):
                raise KubeProxyConfigError(f"{name}: expected a mapping, got {type(value).__name__}")
            _walk(value, rule, name + ".", settings, ignored, known)
        elif isinstance(rule, Mapped) and (rule.setting is None or rule.setting in known):
            try:
                converted = rule.convert(value)
            except ValueError as exc:
                raise KubeProxyConfigError(f"{name}: {exc}") from None
            if converted is not None and rule.setting is not None:
                settings[rule.setting] = converted
        elif isinstance(rule, Unmapped):
            if not _is_default(value, rule.defaults, rule.deep, rule.zero):
                ignored.append(name)
        elif not _is_default(value, ()):  # mapped, but this svcproxy lacks the setting
            ignored.append(name)


def warning(ignored: tuple[str, ...]) -> str | None:
    """The one warning naming every field svcproxy leaves behind."""
    if not ignored:
        return None
    return (f"KubeProxyConfiguration: svcproxy does not implement {', '.join(ignored)}; "
            "these settings are ignored (docs/migrating-from-kube-proxy.md)")
