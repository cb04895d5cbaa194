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
from typing import Any, Mapping, Sequence

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


def operation_json(op: Operation) -> dict[str, Any]:
    doc: dict[str, Any] = {"op": op.kind.value, "service": key_json(op.service)}
    if op.destination is not None:
        doc["destination"] = {"address": op.destination.address, "port": op.destination.port}
        if op.kind is not OpKind.DELETE_DESTINATION:
            doc["weight"] = op.destination.weight
            doc["forward"] = op.destination.forward.value
    elif op.kind is not OpKind.DELETE_SERVICE:
        doc["scheduler"] = op.scheduler
        doc["persistence"] = op.persistence
        if op.flags:
            doc["flags"] = sorted(op.flags)
    return doc


def plan_json(desired: Table, ops: Sequence[Operation], origins: Origins = _NO_ORIGINS) -> dict[str, Any]:
    services = sorted(desired.services.values(), key=lambda vs: address_order(vs.key))
    return {
        "version": JSON_VERSION,
        "services": [service_json(vs, origins.get(vs.key, ())) for vs in services],
        "operations": [operation_json(op) for op in ops],
    }


def json_text(doc: Mapping[str, Any]) -> str:
    """``doc`` as JSON text, one list item per line: readable, yet written by the C
    encoder (the standard library's indenting encoder is pure Python) in one piece."""
    parts = ["{"]
    for i, (name, value) in enumerate(doc.items()):
        head = f"{',' if i else ''}\n  {json.dumps(name)}: "
        if isinstance(value, list) and value:
            items = ",\n    ".join(map(_compact, value))
            parts.append(f"{head}[\n    {items}\n  ]")
        else:
            parts.append(head + _compact(value))
    parts.append("\n}\n")
    return "".join(parts)


_compact = json.JSONEncoder(separators=(", ", ": ")).encode


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
