"""Plans as people and programs read them: a table diff in text, and JSON.

Pure formatting, no I/O: the CLI and the agent's dry-run log print the same text.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Sequence

from svcproxy.diff import summarize
from svcproxy.model import Destination, OpKind, Operation, ServiceKey, Table, VirtualService

_GREEN, _RED, _YELLOW, _BOLD, _RESET = "\033[32m", "\033[31m", "\033[33m", "\033[1m", "\033[0m"


def key_json(key: ServiceKey) -> dict[str, Any]:
    doc: dict[str, Any] = {"protocol": key.protocol.value, "address": key.address, "port": key.port}
    if key.fwmark:
        doc["fwmark"] = key.fwmark
    return doc


def destination_json(dest: Destination) -> dict[str, Any]:
    return {"address": dest.address, "port": dest.port, "weight": dest.weight, "forward": dest.forward.value}


def service_json(vs: VirtualService) -> dict[str, Any]:
    doc = key_json(vs.key)
    doc.update(scheduler=vs.scheduler, persistence=vs.persistence)
    if vs.flags:
        doc["flags"] = sorted(vs.flags)
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


def plan_json(desired: Table, ops: Sequence[Operation]) -> dict[str, Any]:
    return {
        "services": [service_json(vs) for vs in desired.sorted()],
        "operations": [operation_json(op) for op in ops],
    }


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


def plan_text(desired: Table, actual: Table, ops: Sequence[Operation], *, color: bool = False) -> str:
    """A diff of the two tables restricted to what the plan changes, then a summary."""

    def paint(code: str, text: str) -> str:
        return f"{code}{text}{_RESET}" if color else text

    by_service: dict[ServiceKey, list[Operation]] = defaultdict(list)
    for op in ops:
        by_service[op.service].append(op)
    lines: list[str] = []
    for key in sorted(by_service):
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
