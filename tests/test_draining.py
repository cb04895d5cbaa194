"""Graceful termination as a pure step: a plan in, a plan with drains out."""

from __future__ import annotations

from svcproxy.model import Destination, OpKind, Operation, Protocol, ServiceKey, Table, VirtualService
from svcproxy.reconcile.draining import drain

WEB = ServiceKey(Protocol.TCP, "10.96.0.20", 80)
DNS = ServiceKey(Protocol.UDP, "10.96.0.10", 53)


def kernel(*dests: Destination, key: ServiceKey = WEB) -> Table:
    return Table({key: VirtualService(key, destinations=dests)})


def delete(address: str, key: ServiceKey = WEB) -> Operation:
    return Operation(OpKind.DELETE_DESTINATION, key, destination=Destination(address, 8080))


def test_a_live_tcp_real_server_goes_to_weight_zero_and_is_remembered() -> None:
    out = drain([delete("10.244.1.1")], kernel(Destination("10.244.1.1", 8080, 1, active_conns=3)), {},
                now=50.0, timeout=900.0, scope=None)
    assert [(op.kind, op.destination.weight if op.destination else None) for op in out.operations] == [
        (OpKind.EDIT_DESTINATION, 0)]
    assert out.draining == {(WEB, "10.244.1.1", 8080): 50.0}


def test_a_drain_completes_when_connections_are_gone_or_it_times_out_but_only_on_a_fresh_read() -> None:
    marker = (WEB, "10.244.1.1", 8080)
    idle = kernel(Destination("10.244.1.1", 8080, 0))
    busy = kernel(Destination("10.244.1.1", 8080, 0, active_conns=1))
    assert drain([delete("10.244.1.1")], idle, {marker: 0.0}, now=10.0, timeout=900.0, scope=None).operations \
        == [delete("10.244.1.1")]
    still = drain([delete("10.244.1.1")], busy, {marker: 0.0}, now=10.0, timeout=900.0, scope=None)
    assert still.operations == [] and still.draining == {marker: 0.0}
    assert drain([delete("10.244.1.1")], busy, {marker: 0.0}, now=900.0, timeout=900.0, scope=None).operations \
        == [delete("10.244.1.1")]
    # The image kept between full syncs has stale counts: never complete from it.
    stale = drain([delete("10.244.1.1")], idle, {marker: 0.0}, now=10.0, timeout=900.0, scope={WEB})
    assert stale.operations == [] and stale.draining == {marker: 0.0}


def test_udp_and_deleted_services_and_unknown_real_servers_go_at_once() -> None:
    udp = drain([delete("10.244.2.1", DNS)], kernel(Destination("10.244.2.1", 8080, 1), key=DNS), {},
                now=0.0, timeout=900.0, scope=None)
    assert udp.operations == [delete("10.244.2.1", DNS)] and udp.draining == {}
    whole = [delete("10.244.1.1"), Operation(OpKind.DELETE_SERVICE, WEB)]
    assert drain(whole, kernel(Destination("10.244.1.1", 8080, 1)), {}, now=0.0, timeout=900.0,
                 scope=None).operations == whole
    assert drain([delete("10.244.9.9")], kernel(), {}, now=0.0, timeout=900.0, scope=None).operations == [
        delete("10.244.9.9")]


def test_a_partial_plan_keeps_the_drains_of_services_it_did_not_look_at() -> None:
    other = (DNS, "10.244.2.1", 53)
    out = drain([], kernel(), {other: 5.0, (WEB, "10.244.1.1", 8080): 5.0}, now=6.0, timeout=900.0, scope={WEB})
    assert out.draining == {other: 5.0}
    full = drain([], kernel(), {other: 5.0}, now=6.0, timeout=900.0, scope=None)
    assert full.draining == {}
