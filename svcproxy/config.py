"""The configuration file: the same keys as the command-line flags; flags win.

The DaemonSet mounts a ConfigMap holding this file, so that operators change settings
without editing the container's arguments. Keys are the long flag names without the
dashes in front (``sync-period: 30``; ``sync_period`` works too). A key with no value
(``node:``, ``node: null``) is not set: the flag keeps its default, as if the key were
absent (it never becomes the text "None"). The file is turned
into flag tokens placed before the ones given on the command line, so every value goes
through exactly the same parsing and validation as a flag, and a flag given on the
command line overrides the file (a list flag given there replaces the file's list).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable, Collection, Sequence

from svcproxy import kubeproxy_config, safe_yaml


class ConfigError(ValueError):
    """The configuration file is unreadable, not a mapping, or has unknown keys."""


def _options(sub: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {
        opt[2:]: action
        for action in sub._actions  # argparse keeps no public list of its actions
        for opt in action.option_strings
        if opt.startswith("--") and not (isinstance(action, argparse.BooleanOptionalAction)
                                         and opt.startswith("--no-"))
    }


def config_tokens(sub: argparse.ArgumentParser, path: str | Path, given: Sequence[str],
                  other_keys: Collection[str] = (), warn: Callable[[str], object] | None = None) -> list[str]:
    """Flag tokens for the settings in ``path``, skipping those given on the command line.

    Keys in ``other_keys`` (flags of the other subcommands) are skipped, so the agent's
    file also serves ``plan``/``sync --config``; anything else unknown is an error.
    A kube-proxy KubeProxyConfiguration is read as the settings it maps to
    (svcproxy/kubeproxy_config.py); ``warn`` gets the one line naming what it ignores.
    """
    try:
        data = safe_yaml.load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, safe_yaml.YamlError) as exc:
        raise ConfigError(f"cannot read configuration file {path}: {exc}") from exc
    if data is None:
        return []
    if not isinstance(data, dict):
        raise ConfigError(f"configuration file {path}: expected a mapping of settings, got {type(data).__name__}")
    options = _options(sub)
    if kubeproxy_config.is_kube_proxy_config(data):
        data = _from_kube_proxy(data, path, set(options) | set(other_keys), warn)
    explicit = {tok.split("=", 1)[0][2:] for tok in given if tok.startswith("--")}
    tokens: list[str] = []
    unknown = []
    for raw_key, value in data.items():
        key = str(raw_key).replace("_", "-")
        if key in ("config", "help"):
            unknown.append(str(raw_key))
            continue
        action = options.get(key)
        if action is None:
            if key not in other_keys:
                unknown.append(str(raw_key))
            continue
        if key in explicit or value is None:
            continue
        flag = f"--{key}"
        if isinstance(action, argparse.BooleanOptionalAction):
            # --x / --no-x: the command line can switch off what the file switches on.
            if not isinstance(value, bool):
                raise ConfigError(f"configuration file {path}: {raw_key} must be true or false")
            if f"no-{key}" not in explicit:
                tokens.append(flag if value else f"--no-{key}")
        elif isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            if not isinstance(value, bool):
                raise ConfigError(f"configuration file {path}: {raw_key} must be true or false")
            if value == isinstance(action, argparse._StoreTrueAction):
                tokens.append(flag)
        elif isinstance(action, argparse._AppendAction):
            values: list[Any] = value if isinstance(value, list) else [value]
            for item in values:
                tokens += [flag, _scalar(item)]
        else:
            tokens += [flag, ",".join(_scalar(v) for v in value) if isinstance(value, list) else _scalar(value)]
    if unknown:
        raise ConfigError(
            f"configuration file {path}: unknown setting(s) {', '.join(sorted(unknown))}; "
            f"known: {', '.join(sorted(k for k in options if k not in ('config', 'help')))}"
        )
    return tokens


def _from_kube_proxy(data: dict[str, Any], path: str | Path, known: Collection[str],
                     warn: Callable[[str], object] | None) -> dict[str, Any]:
    try:
        translated = kubeproxy_config.translate(data, known)
    except kubeproxy_config.KubeProxyConfigError as exc:
        raise ConfigError(f"configuration file {path}: {kubeproxy_config.KIND}: {exc}") from None
    message = kubeproxy_config.warning(translated.ignored)
    if message is not None and warn is not None:
        warn(message)
    return dict(translated.settings)


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
