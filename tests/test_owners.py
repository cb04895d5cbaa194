"""One rule for virtual services claimed twice, for whole and incremental translation."""

from __future__ import annotations

from svcproxy.kube.owners import Owners
from svcproxy.kube.problems import Problem
from svcproxy.model import Protocol, ServiceKey, VirtualService

VIP = ServiceKey(Protocol.TCP, "198.51.100.7", 80)
OWN = ServiceKey(Protocol.TCP, "10.96.0.1", 80)
A, B = ("default", "alpha"), ("default", "beta")


def test_first_claim_wins_and_the_loser_is_reported_and_left_out() -> None:
    owners, problems = Owners(), []  # type: Owners, list[Problem]
    assert owners.claim(A, [VirtualService(OWN), VirtualService(VIP)], problems) == (OWN, VIP)
    assert owners.claim(B, [VirtualService(VIP, scheduler="wrr")], problems) == ()
    assert owners.table[VIP].scheduler == "rr" and owners.collided
    assert [(p.kind, p.obj, p.severity) for p in problems] == [
        ("duplicate-virtual-service", "Service default/beta", "error")]
    assert "default/alpha" in problems[0].message


def test_a_key_named_twice_by_one_service_keeps_the_first_and_is_no_collision() -> None:
    owners, problems = Owners(), []  # type: Owners, list[Problem]
    first, second = VirtualService(OWN), VirtualService(OWN, scheduler="wrr")
    assert owners.claim(A, [first, second], problems) == (OWN,)
    assert owners.table[OWN] is first and not owners.collided
    assert len(problems) == 1 and "named twice" in problems[0].message


def test_release_frees_the_keys_but_does_not_hand_them_over() -> None:
    owners, problems = Owners(), []  # type: Owners, list[Problem]
    owners.claim(A, [VirtualService(VIP)], problems)
    owners.claim(B, [VirtualService(VIP)], problems)
    assert owners.release(A) == (VIP,) and VIP not in owners.table
    assert owners.release(A) == () and owners.keys_of(B) == ()
    assert owners.claim(A, [VirtualService(VIP)], problems) == (VIP,)
