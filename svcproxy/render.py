"""Plans as people and programs read them: a table diff in text, and JSON.

Pure formatting, no I/O: the CLI and the agent's dry-run log print the same text.
Virtual services are listed in numeric address order (IPv4 before IPv6), then port,
then protocol, so a Service's TCP and UDP ports stand together; where the caller
knows them, each line names the Service ports it serves (``namespace/name:port``
and the kind: ClusterIP, NodePort, externalIP, LoadBalancer). The JSON document has
a ``version`` that changes only when a field changes meaning or goes away.
"""

from __future__ import annotations

import ipaddress
import json
from collections import defaultdict
from json.encoder import c_make_encoder, encode_basestring_ascii  # type: ignore[attr-defined]
from typing import Any, Callable, Mapping, Sequence

from svcproxy.diff import summarize
from svcproxy.kube.translate import Origin
from svcproxy.model import Destination, OpKind, Operation, ServiceKey, Table, VirtualService

#: The JSON document's version (``plan -o json``, ``sync -o json``).
JSON_VERSION = 1
Origins = Mapping[ServiceKey, Sequence[Origin]]
_NO_ORIGINS: Origins = {}

_GREEN, _RED, _YELLOW, _BOLD, _RESET = "\033[32m", "\033[31m", "\033[33m", "\033[1m", "\033[0m"


def key_json(key: ServiceKey) -> dict[str, Any]:
    doc: dict[str, Any] = {"protocol": key.protocol.value, "address": key.address, "port": key.port}
    if key.fwmark:
        doc["fwmark"] = key.fwmark
    return doc


def destination_json(dest: Destination) -> dict[str, Any]:
    return {"address": dest.address, "port": dest.port, "weight": dest.weight, "forward": dest.forward.value}


def address_order(key: ServiceKey) -> tuple[int, int, int, str]:
    """Numeric address (IPv4 first), port, protocol; fwmark services last."""
    if key.fwmark:
        return (2, key.fwmark, 0, "")
    ip = ipaddress.ip_address(key.address)
    return (0 if ip.version == 4 else 1, int(ip), key.port, key.protocol.value)


def origin_json(origin: Origin) -> dict[str, str]:
    return {"namespace": origin.namespace, "name": origin.name, "port": origin.port, "kind": origin.kind}


def service_json(vs: VirtualService, origins: Sequence[Origin] = ()) -> dict[str, Any]:
    doc = key_json(vs.key)
    doc.update(scheduler=vs.scheduler, persistence=vs.persistence)
    if vs.flags:
        doc["flags"] = sorted(vs.flags)
    doc["origin"] = [origin_json(o) for o in origins]
    doc["destinations"] = [destination_json(d) for d in vs.destinations]
    return doc


def operation_json(op: Operation, service: dict[str, Any] | None = None) -> dict[str, Any]:
    """``service``: the key's JSON when the caller already has it (shared, not copied)."""
    doc: dict[str, Any] = {"op": op.kind.value, "service": service if service is not None else key_json(op.service)}
    dest = op.destination
    if dest is not None:
        doc["destination"] = {"address": dest.address, "port": dest.port}
        if op.kind is not OpKind.DELETE_DESTINATION:
            doc["weight"] = dest.weight
            doc["forward"] = dest.forward.value
    elif op.kind is not OpKind.DELETE_SERVICE:
        doc["scheduler"] = op.scheduler
        doc["persistence"] = op.persistence
        if op.flags:
            doc["flags"] = sorted(op.flags)
    return doc


def plan_json(desired: Table, ops: Sequence[Operation], origins: Origins = _NO_ORIGINS) -> dict[str, Any]:
    services = sorted(desired.services.values(), key=lambda vs: address_order(vs.key))
    keys: dict[ServiceKey, dict[str, Any]] = {}
    operations = []
    for op in ops:
        key = keys.get(op.service)
        if key is None:
            key = keys[op.service] = key_json(op.service)
        operations.append(operation_json(op, key))
    return {
        "version": JSON_VERSION,
        "services": [service_json(vs, origins.get(vs.key, ())) for vs in services],
        "operations": operations,
    }


def json_text(doc: Mapping[str, Any]) -> str:
    """``doc`` as JSON text, one list item per line: readable, yet written by the C
    encoder (the standard library's indenting encoder is pure Python) in one piece."""
    parts = ["{"]
    for i, (name, value) in enumerate(doc.items()):
        head = f"{',' if i else ''}\n  {json.dumps(name)}: "
        parts.append(head + (_lines([_compact(item) for item in value]) if isinstance(value, list)
                             else _compact(value)))
    parts.append("\n}\n")
    return "".join(parts)


def plan_json_text(desired: Table, ops: Sequence[Operation], origins: Origins = _NO_ORIGINS,
                   extra: Mapping[str, Any] | None = None) -> str:
    """``json_text(plan_json(...) | extra)``, byte for byte, written without building the
    document: at 10,000 Services a plan has over 100,000 items, and making a dict of
    each just to encode it cost more than translating the cluster."""
    keys: dict[ServiceKey, str] = {}
    services = sorted(desired.services.values(), key=lambda vs: address_order(vs.key))
    parts = [f'{{\n  "version": {JSON_VERSION},\n  "services": ']
    parts.append(_lines([_service_text(vs, origins.get(vs.key, ()), keys) for vs in services]))
    parts.append(',\n  "operations": ')
    parts.append(_lines([_operation_text(op, keys) for op in ops]))
    for name, value in (extra or {}).items():
        parts.append(f",\n  {json.dumps(name)}: "
                     + (_lines([_compact(v) for v in value]) if isinstance(value, list) else _compact(value)))
    parts.append("\n}\n")
    return "".join(parts)


def _lines(items: list[str]) -> str:
    """A list of encoded items, one per line (as ``json_text`` writes lists)."""
    return "[\n    " + _ITEM_SEP.join(items) + "\n  ]" if items else "[]"


_ITEM_SEP = ",\n    "


def _key_text(key: ServiceKey, keys: dict[ServiceKey, str]) -> str:
    text = keys.get(key)
    if text is None:
        text = f'{{"protocol": "{key.protocol.value}", "address": "{key.address}", "port": {key.port}'
        text = keys[key] = text + (f', "fwmark": {key.fwmark}}}' if key.fwmark else "}")
    return text


def _service_text(vs: VirtualService, origins: Sequence[Origin], keys: dict[ServiceKey, str]) -> str:
    persistence = "null" if vs.persistence is None else str(vs.persistence)
    text = f'{_key_text(vs.key, keys)[:-1]}, "scheduler": {_str(vs.scheduler)}, "persistence": {persistence}'
    if vs.flags:
        text += f', "flags": [{", ".join(map(_str, sorted(vs.flags)))}]'
    named = ", ".join(f'{{"namespace": {_str(o.namespace)}, "name": {_str(o.name)}, "port": {_str(o.port)}, '
                      f'"kind": {_str(o.kind)}}}' for o in origins)
    dests = ", ".join(f'{{"address": "{d.address}", "port": {d.port}, "weight": {d.weight}, '
                      f'"forward": "{d.forward.value}"}}' for d in vs.destinations)
    return f'{text}, "origin": [{named}], "destinations": [{dests}]}}'


def _operation_text(op: Operation, keys: dict[ServiceKey, str]) -> str:
    text = f'{{"op": "{op.kind.value}", "service": {_key_text(op.service, keys)}'
    dest = op.destination
    if dest is not None:
        text += f', "destination": {{"address": "{dest.address}", "port": {dest.port}}}'
        if op.kind is not OpKind.DELETE_DESTINATION:
            text += f', "weight": {dest.weight}, "forward": "{dest.forward.value}"'
    elif op.kind is not OpKind.DELETE_SERVICE:
        persistence = "null" if op.persistence is None else str(op.persistence)
        text += f', "scheduler": {_str(op.scheduler)}, "persistence": {persistence}'
        if op.flags:
            text += f', "flags": [{", ".join(map(_str, sorted(op.flags)))}]'
    return text + "}"


def _not_serializable(value: object) -> object:
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _compact_encoder() -> Callable[[object], str]:
    """One JSON value on one line. The C encoder made once and called per value: the
    public ``JSONEncoder.encode`` builds a new one on every call."""
    if c_make_encoder is None:  # an interpreter without the accelerator
        return json.JSONEncoder(separators=(", ", ": ")).encode
    encode = c_make_encoder(None, _not_serializable, encode_basestring_ascii, None, ": ", ", ",
                            False, False, True)
    return lambda value: "".join(encode(value, 0))


_compact = _compact_encoder()
#: A JSON string, quoted and escaped (addresses, ports and enum values need neither:
#: they are canonical ASCII without quotes or backslashes, so they are written as is).
_str: Callable[[str], str] = encode_basestring_ascii


def _service_label(key: ServiceKey) -> str:
    if key.fwmark:
        return f"FWM  {key.fwmark} {key.family.value}"
    host = f"[{key.address}]" if ":" in key.address else key.address
    return f"{key.protocol.value:<4} {host}:{key.port}"


def _settings(scheduler: str, persistence: int | None, flags: frozenset[str]) -> str:
    text = scheduler
    if persistence is not None:
        text += f" persistent {persistence}"
    if flags:
        text += f" flags {','.join(sorted(flags))}"
    return text


def _dest_text(dest: Destination) -> str:
    host = f"[{dest.address}]" if ":" in dest.address else dest.address
    return f"-> {host}:{dest.port}  {dest.forward.value} weight {dest.weight}"


def plan_text(desired: Table, actual: Table, ops: Sequence[Operation], *, color: bool = False,
              origins: Origins = _NO_ORIGINS) -> str:
    """A diff of the two tables restricted to what the plan changes, then a summary."""

    def paint(code: str, text: str) -> str:
        return f"{code}{text}{_RESET}" if color else text

    by_service: dict[ServiceKey, list[Operation]] = defaultdict(list)
    for op in ops:
        by_service[op.service].append(op)
    lines: list[str] = []
    for key in sorted(by_service, key=address_order):
        service_ops = by_service[key]
        kinds = {op.kind for op in service_ops}
        before = actual.services.get(key)
        after = desired.services.get(key)
        label = _service_label(key)
        if OpKind.ADD_SERVICE in kinds and after is not None:
            lines.append(paint(_GREEN, f"+ {label}  {_settings(after.scheduler, after.persistence, after.flags)}"))
        elif OpKind.DELETE_SERVICE in kinds and before is not None:
            lines.append(paint(_RED, f"- {label}  {_settings(before.scheduler, before.persistence, before.flags)}"))
        elif OpKind.EDIT_SERVICE in kinds and before is not None and after is not None:
            old = _settings(before.scheduler, before.persistence, before.flags)
            new = _settings(after.scheduler, after.persistence, after.flags)
            lines.append(paint(_YELLOW, f"~ {label}  {old} => {new}"))
        else:
            lines.append(paint(_BOLD, f"  {label}") if color else f"  {label}")
        named = origins.get(key)
        if named:
            lines[-1] += "  # " + ", ".join(map(str, named))
        old_dests = before.destination_map() if before is not None else {}
        for op in service_ops:
            dest = op.destination
            if dest is None:
                continue
            if op.kind is OpKind.ADD_DESTINATION:
                lines.append(paint(_GREEN, f"+   {_dest_text(dest)}"))
            elif op.kind is OpKind.DELETE_DESTINATION:
                lines.append(paint(_RED, f"-   {_dest_text(old_dests.get(dest.key, dest))}"))
            else:
                was = old_dests.get(dest.key)
                change = _dest_text(dest)
                if was is not None:
                    change += f"  (was {was.forward.value} weight {was.weight})"
                lines.append(paint(_YELLOW, f"~   {change}"))
    lines.append(summary_line(desired, ops))
    return "\n".join(lines) + "\n"


def summary_line(desired: Table, ops: Sequence[Operation]) -> str:
    size = f"{len(desired)} virtual services, {desired.destination_count()} real servers desired"
    if not ops:
        return f"No changes: the kernel already matches ({size})."
    c = summarize(ops)
    return (
        f"Plan: {len(ops)} operations: virtual services {c[OpKind.ADD_SERVICE]} to add, "
        f"{c[OpKind.EDIT_SERVICE]} to change, {c[OpKind.DELETE_SERVICE]} to delete; real servers "
        f"{c[OpKind.ADD_DESTINATION]} to add, {c[OpKind.EDIT_DESTINATION]} to change, "
        f"{c[OpKind.DELETE_DESTINATION]} to delete ({size})."
    )
