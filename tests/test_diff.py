"""The diff engine: ordering, edits instead of recreation, exclusions, and the
properties every plan must have (checked with hypothesis)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from svcproxy.diff import Exclusions, PlanError, apply_ops, apply_plan, diff, order
from svcproxy.ipvs.backend import MemoryBackend
from svcproxy.model import (
    Destination,
    Forward,
    OpKind,
    Operation,
    Protocol,
    ServiceKey,
    Table,
    VirtualService,
)

TCP = Protocol.TCP


def vs(addr: str, port: int, *dests: tuple[str, int], sched: str = "rr", proto: Protocol = TCP,
       persistence: int | None = None, weight: int = 1) -> VirtualService:
    return VirtualService(
        ServiceKey(proto, addr, port), sched, persistence,
        destinations=tuple(sorted((Destination(a, p, weight) for a, p in dests), key=lambda d: d.key)),
    )


def kinds(ops: list[Operation]) -> list[str]:
    return [op.kind.value for op in ops]


def test_identical_tables_give_no_operations() -> None:
    t = Table.of([vs("10.96.0.1", 443, ("10.0.0.1", 6443)), vs("fd00::1", 53, ("fd01::5", 53), proto=Protocol.UDP)])
    assert diff(t, t) == []


def test_new_service_is_added_before_its_destinations() -> None:
    desired = Table.of([vs("10.96.0.10", 53, ("10.244.1.2", 53), ("10.244.2.3", 53))])
    ops = diff(desired, Table())
    assert kinds(ops) == ["add-service", "add-destination", "add-destination"]
    assert [op.destination.address for op in ops[1:] if op.destination] == ["10.244.1.2", "10.244.2.3"]


def test_removed_service_deletes_destinations_first() -> None:
    actual = Table.of([vs("10.96.0.10", 53, ("10.244.1.2", 53))])
    assert kinds(diff(Table(), actual)) == ["delete-destination", "delete-service"]


def test_phases_are_global_across_services() -> None:
    actual = Table.of([vs("10.96.0.1", 80, ("10.0.0.1", 80)), vs("10.96.0.2", 80, ("10.0.0.2", 80))])
    desired = Table.of([vs("10.96.0.3", 80, ("10.0.0.3", 80)), vs("10.96.0.2", 80, ("10.0.0.9", 80))])
    ops = diff(desired, actual)
    assert kinds(ops) == [
        "delete-destination",  # 10.96.0.1 -> 10.0.0.1
        "delete-destination",  # 10.96.0.2 -> 10.0.0.2
        "delete-service",  # 10.96.0.1
        "add-service",  # 10.96.0.3
        "add-destination",  # 10.96.0.2 -> 10.0.0.9
        "add-destination",  # 10.96.0.3 -> 10.0.0.3
    ]


def test_scheduler_and_persistence_changes_are_edits() -> None:
    actual = Table.of([vs("10.96.0.1", 80, ("10.0.0.1", 80))])
    desired = Table.of([vs("10.96.0.1", 80, ("10.0.0.1", 80), sched="wlc", persistence=10800)])
    ops = diff(desired, actual)
    assert len(ops) == 1
    assert ops[0].kind is OpKind.EDIT_SERVICE
    assert (ops[0].scheduler, ops[0].persistence) == ("wlc", 10800)


def test_dropping_persistence_is_an_edit_too() -> None:
    actual = Table.of([vs("10.96.0.1", 80, persistence=60)])
    desired = Table.of([vs("10.96.0.1", 80)])
    ops = diff(desired, actual)
    assert [(op.kind, op.persistence) for op in ops] == [(OpKind.EDIT_SERVICE, None)]


def test_weight_and_forward_changes_are_destination_edits() -> None:
    actual = Table.of([vs("10.96.0.1", 80, ("10.0.0.1", 80), weight=0)])
    desired = Table.of([vs("10.96.0.1", 80, ("10.0.0.1", 80))])
    ops = diff(desired, actual)
    assert kinds(ops) == ["edit-destination"]
    assert ops[0].destination is not None and ops[0].destination.weight == 1

    routed = Table.of([VirtualService(ServiceKey(TCP, "10.96.0.1", 80),
                                      destinations=(Destination("10.0.0.1", 80, 1, Forward.ROUTE),))])
    assert kinds(diff(desired, routed)) == ["edit-destination"]


def test_connection_counts_are_not_a_difference() -> None:
    desired = Table.of([vs("10.96.0.1", 80, ("10.0.0.1", 80))])
    busy = Table.of([VirtualService(ServiceKey(TCP, "10.96.0.1", 80),
                                    destinations=(Destination("10.0.0.1", 80, 1, Forward.MASQ, 7, 30),))])
    assert diff(desired, busy) == []


def test_protocol_is_part_of_the_key() -> None:
    actual = Table.of([vs("10.96.0.10", 53, proto=Protocol.UDP)])
    desired = Table.of([vs("10.96.0.10", 53, proto=Protocol.UDP), vs("10.96.0.10", 53, proto=Protocol.TCP)])
    ops = diff(desired, actual)
    assert [(op.kind, op.service.protocol) for op in ops] == [(OpKind.ADD_SERVICE, Protocol.TCP)]


def test_excluded_cidrs_protect_foreign_services_only() -> None:
    foreign_in = vs("192.0.2.10", 80, ("192.0.2.20", 80))
    foreign_out = vs("198.51.100.10", 80)
    ours_in = vs("192.0.2.11", 80, ("10.0.0.1", 80))
    actual = Table.of([foreign_in, foreign_out, vs("192.0.2.11", 80)])
    desired = Table.of([ours_in])
    excl = Exclusions.parse(["192.0.2.0/24", "2001:db8::/32"])
    ops = diff(desired, actual, excl)
    touched = {op.service for op in ops}
    assert foreign_in.key not in touched
    assert foreign_out.key in touched  # outside the exclusion: removed
    assert ours_in.key in touched  # desired services inside the range are still managed
    result = apply_plan(actual, ops)
    assert set(result.services) == {foreign_in.key, ours_in.key}


def test_fwmark_services_are_never_touched() -> None:
    fw = VirtualService(ServiceKey(TCP, "0.0.0.0", 0, fwmark=5), destinations=(Destination("10.0.0.1", 0),))
    assert diff(Table(), Table.of([fw])) == []


def test_ipv6_exclusion_does_not_match_ipv4() -> None:
    excl = Exclusions.parse(["::/0"])
    assert not excl.protects(ServiceKey(TCP, "10.0.0.1", 80))
    assert excl.protects(ServiceKey(TCP, "fd00::1", 80))


def test_only_restricts_the_diff_to_given_services() -> None:
    actual = Table.of([vs("10.96.0.1", 80), vs("10.96.0.2", 80)])
    desired = Table.of([vs("10.96.0.1", 80, ("10.0.0.1", 80))])
    ops = diff(desired, actual, only=[ServiceKey(TCP, "10.96.0.1", 80)])
    assert kinds(ops) == ["add-destination"]


def test_apply_plan_rejects_what_the_kernel_rejects() -> None:
    key = ServiceKey(TCP, "10.96.0.1", 80)
    with pytest.raises(PlanError):
        apply_plan(Table(), [Operation(OpKind.ADD_DESTINATION, key, destination=Destination("10.0.0.1", 80))])
    with pytest.raises(PlanError):
        apply_plan(Table.of([vs("10.96.0.1", 80)]), [Operation(OpKind.ADD_SERVICE, key)])


def test_apply_ops_continues_after_a_failure() -> None:
    key = ServiceKey(TCP, "10.96.0.1", 80)
    bad = Operation(OpKind.DELETE_SERVICE, ServiceKey(TCP, "10.96.0.9", 80))
    good = Operation(OpKind.ADD_SERVICE, key)
    table, failed = apply_ops(Table(), [bad, good])
    assert [f.operation for f in failed] == [bad]
    assert key in table.services


def test_memory_backend_converges_and_reports_failures() -> None:
    backend = MemoryBackend()
    desired = Table.of([vs("10.96.0.1", 80, ("10.0.0.1", 80))])
    assert backend.apply(diff(desired, backend.read())) == []
    assert backend.read() == desired
    assert diff(desired, backend.read()) == []
    failed = backend.apply([Operation(OpKind.ADD_SERVICE, ServiceKey(TCP, "10.96.0.1", 80))])
    assert len(failed) == 1 and "exists" in failed[0].error


# --- properties -------------------------------------------------------------------

_addr4 = st.integers(1, 254).map(lambda i: f"10.96.0.{i}")
_addr6 = st.integers(1, 0xFFFF).map(lambda i: f"fd00::{i:x}")
_vip = st.one_of(_addr4, _addr6)
_dests = st.lists(
    st.tuples(st.integers(1, 30), st.integers(1, 3), st.integers(0, 3), st.sampled_from(list(Forward))),
    max_size=6, unique_by=lambda t: (t[0], t[1]),
)


@st.composite
def services(draw: st.DrawFn) -> VirtualService:
    addr = draw(_vip)
    six = ":" in addr
    key = ServiceKey(draw(st.sampled_from(list(Protocol))), addr, draw(st.sampled_from([53, 80, 443])))
    dests = [
        Destination(f"fd01::{h:x}" if six else f"10.244.0.{h}", 8000 + p, w, fwd)
        for h, p, w, fwd in draw(_dests)
    ]
    return VirtualService(
        key,
        draw(st.sampled_from(["rr", "wrr", "lc", "sh"])),
        draw(st.one_of(st.none(), st.sampled_from([60, 10800]))),
        draw(st.sampled_from([frozenset(), frozenset({"sh-port"})])),
    ).with_destinations(dests)


tables = st.lists(services(), max_size=8, unique_by=lambda s: s.key).map(Table.of)


@settings(max_examples=300, deadline=None)
@given(desired=tables, actual=tables)
def test_applying_the_plan_gives_the_desired_table(desired: Table, actual: Table) -> None:
    ops = diff(desired, actual)
    assert apply_plan(actual, ops) == desired
    assert diff(desired, apply_plan(actual, ops)) == []


@settings(max_examples=200, deadline=None)
@given(table=tables)
def test_diff_of_a_table_with_itself_is_empty(table: Table) -> None:
    assert diff(table, table) == []


@settings(max_examples=200, deadline=None)
@given(desired=tables, actual=tables)
def test_plan_is_ordered_in_phases(desired: Table, actual: Table) -> None:
    ops = diff(desired, actual)
    phase = {"delete-destination": 0, "delete-service": 1, "add-service": 2, "edit-service": 2,
             "add-destination": 3, "edit-destination": 3}
    phases = [phase[op.kind.value] for op in ops]
    assert phases == sorted(phases)
    assert order(list(reversed(ops))) == ops


@settings(max_examples=200, deadline=None)
@given(table=tables, data=st.data())
def test_one_changed_endpoint_costs_one_operation_per_virtual_service(table: Table, data: st.DataObject) -> None:
    """An endpoint shared by several virtual services (one Service, many VIPs) that
    changes address costs exactly one delete and one add in each of them."""
    with_dests = [s for s in table.sorted() if s.destinations]
    if not with_dests:
        return
    chosen = data.draw(st.lists(st.sampled_from(with_dests), min_size=1, unique_by=lambda s: s.key))
    changed = dict(table.services)
    for svc in chosen:
        old = svc.destinations[0]
        new_addr = "fd02::1" if ":" in old.address else "10.245.0.1"
        changed[svc.key] = svc.with_destinations(
            [Destination(new_addr, old.port, old.weight, old.forward), *svc.destinations[1:]]
        )
    ops = diff(Table(changed), table)
    assert len(ops) == 2 * len(chosen)
    assert sorted(op.kind.value for op in ops) == ["add-destination"] * len(chosen) + ["delete-destination"] * len(chosen)
    weight_only = dict(table.services)
    for svc in chosen:
        old = svc.destinations[0]
        weight_only[svc.key] = svc.with_destinations(
            [Destination(old.address, old.port, old.weight + 1, old.forward), *svc.destinations[1:]]
        )
    assert [op.kind for op in diff(Table(weight_only), table)] == [OpKind.EDIT_DESTINATION] * len(chosen)
