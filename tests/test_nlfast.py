"""The compiled encoder loop (svcproxy/ipvs/_nlfast.c) against the Python encoder.

The Python encoder (Encoder(compiled=False), the one encode() also uses) is the
reference, itself checked against pyroute2 in test_netlink_codec.py. The compiled loop must give the
same bytes, the same owners and the same refusals for every input, and must hand
anything it does not encode back to Python rather than guess.
"""

from __future__ import annotations

import gc
import random
import socket
import weakref

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from svcproxy.ipvs import nlconst, nlencode, rules
from svcproxy.ipvs.nlencode import Encoder
from svcproxy.model import Destination, Forward, OpKind, Operation, Protocol, ServiceKey

from test_netlink_codec import EDGE_DESTINATION_OPS, FAMILY, REFUSED

TCP, UDP = Protocol.TCP, Protocol.UDP
ADD, EDIT = OpKind.ADD_DESTINATION, OpKind.EDIT_DESTINATION
MASQ = Forward.MASQ
FLAGS = nlconst.NLM_F_REQUEST


def test_the_compiled_loop_is_built() -> None:
    """`pip install -e .` (make's venv) builds it; without it the agent still works,
    at about half the apply speed, so a suite without it must say so."""
    assert nlencode.COMPILED, "svcproxy/ipvs/_nlfast.c is not built: run `pip install -e .` with a C compiler"


def both(ops: list[Operation], first_seq: int = 1, flags: int = FLAGS) -> tuple[object, object]:
    return (Encoder(compiled=True).messages(ops, FAMILY, flags, first_seq),
            Encoder(compiled=False).messages(ops, FAMILY, flags, first_seq))


def services_ops(n: int, dests: int) -> list[Operation]:
    """A full apply's shape: every service, then every real server."""
    keys = [ServiceKey(TCP if i % 3 else UDP, f"10.96.{i // 250}.{i % 250 + 1}", 80 + i % 7) for i in range(n)]
    return ([Operation(OpKind.ADD_SERVICE, key, "rr") for key in keys]
            + [Operation(ADD if j % 4 else EDIT, key, destination=Destination(f"10.1.{i % 250}.{j + 1}", 8000 + j, j))
               for i, key in enumerate(keys) for j in range(dests)])


def test_a_full_apply_is_the_same_bytes() -> None:
    ops = services_ops(300, 10)
    compiled, python = both(ops, 77)
    assert compiled == python
    assert len(compiled[0]) == len(ops) and compiled[1] is None  # type: ignore[index]


def call(ops: list[object], start: int, seq: int, out: list[bytes], encoder: Encoder | None = None) -> tuple[int, int]:
    """The compiled loop itself, as Encoder.messages calls it."""
    assert nlencode._compiled_encode is not None
    context = (encoder or Encoder())._compiled_context(FAMILY, FLAGS)
    return nlencode._compiled_encode(ops, start, seq, out, context)


def test_the_compiled_loop_encodes_a_full_apply_itself() -> None:
    """It is not merely handing everything back: once the Python encoder has
    encoded the plan's two settings (a TCP and a UDP service), the compiled loop
    takes every operation of a full apply in one call."""
    ops = services_ops(300, 10)
    want = Encoder(compiled=False).messages(ops, FAMILY, FLAGS, 5)[0]
    encoder = Encoder()
    out: list[bytes] = []
    assert call(ops, 0, 5, out, encoder) == (0, 5)  # no settings cached yet: Python's turn
    for op in ops[:2]:
        encoder._service_settings(op, socket.AF_INET)
    assert call(ops, 0, 5, out, encoder) == (len(ops), 5 + len(ops))
    assert out == want


@pytest.mark.parametrize("first_seq", [1, 2**32 - 3, 2**32 - 500, 2**32 + 5, 0])
def test_edge_destinations_as_a_batch_shuffled_and_one_at_a_time(first_seq: int) -> None:
    ops = list(EDGE_DESTINATION_OPS)
    assert both(ops, first_seq)[0] == both(ops, first_seq)[1]
    random.Random(first_seq).shuffle(ops)
    compiled, python = both(ops, first_seq)
    assert compiled == python
    assert python[2]  # type: ignore[index]  # refusals are in the mix
    for op in EDGE_DESTINATION_OPS[:: 7]:
        assert both([op], first_seq)[0] == both([op], first_seq)[1]


def test_refusals_between_good_servers_keep_their_indexes() -> None:
    good = services_ops(3, 4)[3:]
    ops = [*good[:5], *[op for op, _ in REFUSED], *good[5:], *[op for op, _ in REFUSED[::-1]]]
    compiled, python = both(ops, 9)
    assert compiled == python
    assert len(python[2]) == 2 * len(REFUSED)  # type: ignore[index, arg-type]


def test_what_it_stops_at() -> None:
    """It returns the index of the first operation it does not encode, and leaves
    that one to Python: each kind of difference on its own."""
    svc = ServiceKey(TCP, "10.0.0.1", 80)
    good = Operation(ADD, svc, destination=Destination("10.1.0.1", 80))
    good_service = Operation(OpKind.ADD_SERVICE, ServiceKey(TCP, "10.0.0.2", 80), "rr")

    class Odd:  # an object with none of an Operation's attributes
        pass

    others: list[object] = [
        Operation(OpKind.DELETE_DESTINATION, svc, destination=Destination("10.1.0.1", 80)),
        Operation(OpKind.DELETE_SERVICE, svc),
        Operation(ADD, svc),  # no destination
        Operation(ADD, svc, destination=Destination("10.1.0.1", 80, 1, Forward.ROUTE)),
        Operation(ADD, svc, destination=Destination("fd00::1", 80)),
        Operation(ADD, svc, destination=Destination("10.1.0.1\x00", 80)),
        Operation(ADD, svc, destination=Destination("10.1.0.1", 65536)),
        Operation(ADD, svc, destination=Destination("10.1.0.1", -1)),
        Operation(ADD, svc, destination=Destination("10.1.0.1", 80, rules.MAX_WEIGHT + 1)),
        Operation(ADD, svc, destination=Destination("10.1.0.1", 80, -1)),
        Operation(ADD, svc, destination=Destination("10.1.0.1", 80, 2**70)),
        Operation(ADD, svc, destination=Destination("10.1.0.1", 80.0)),  # type: ignore[arg-type]
        Operation(ADD, svc, destination=Destination(b"10.1.0.1", 80)),  # type: ignore[arg-type]
        Operation(ADD, ServiceKey(TCP, "fd00::1", 80), destination=Destination("10.1.0.1", 80)),  # an IPv6 service
        Operation(ADD, ServiceKey(TCP, "0.0.0.0", 0, 7), destination=Destination("10.1.0.1", 80)),  # fwmark
        Operation(ADD, ServiceKey(TCP, "10.0.0.300", 80), destination=Destination("10.1.0.1", 80)),
        Operation(ADD, ServiceKey("TCP", "10.0.0.1", 80), destination=Destination("10.1.0.1", 80)),  # type: ignore[arg-type]
        Operation(OpKind.ADD_SERVICE, svc, "wlc"),  # settings not cached
        Operation(OpKind.ADD_SERVICE, ServiceKey(TCP, "10.0.0.1", 70000), "rr"),
        Operation(OpKind.ADD_SERVICE, ServiceKey(TCP, "0.0.0.0", 0, 7), "rr"),
        Operation(OpKind.ADD_SERVICE, svc, "rr", None, {"unhashable"}),  # type: ignore[arg-type]
        Odd(),
    ]
    encoder = Encoder()
    encoder._service_settings(good_service, socket.AF_INET)
    for other in others:
        out: list[bytes] = []
        assert call([good, good_service, other, good], 0, 10, out, encoder) == (2, 12), other
        assert len(out) == 2
        # and from a start index, past it
        assert call([good, good_service, other, good], 3, 10, [], encoder) == (4, 11)


def test_interrupts_and_memory_errors_are_raised_ordinary_errors_left_to_python() -> None:
    """An ordinary exception from an attribute is the Python path's to meet again;
    KeyboardInterrupt, SystemExit and MemoryError stop the encoding at once."""
    svc = ServiceKey(TCP, "10.0.0.1", 80)

    def raising(exc: BaseException) -> object:
        class Dest:
            address, port, weight, forward = "10.1.0.1", 80, 1, MASQ

            @property
            def destination(self) -> object:
                raise exc

        op = Dest()
        op.kind, op.service = ADD, svc  # type: ignore[attr-defined]
        return op

    good = Operation(ADD, svc, destination=Destination("10.1.0.1", 80))
    assert call([good, raising(LookupError("x")), good], 0, 1, []) == (1, 2)
    for exc in (KeyboardInterrupt(), SystemExit(3), MemoryError()):
        with pytest.raises(type(exc)):
            call([good, raising(exc), good], 0, 1, [])


def test_subclasses_of_int_and_str_are_left_to_python() -> None:
    """Python packs an int subclass through its own methods: not the compiled
    loop's business."""
    class Port(int):
        pass

    class Text(str):
        pass

    svc = ServiceKey(TCP, "10.0.0.1", 80)
    for dest in (Destination("10.1.0.1", Port(80)), Destination(Text("10.1.0.1"), 80),
                 Destination("10.1.0.1", 80, Port(3))):
        assert call([Operation(ADD, svc, destination=dest)], 0, 1, []) == (0, 1)
        assert both([Operation(ADD, svc, destination=dest)])[0] == both([Operation(ADD, svc, destination=dest)])[1]
    bool_port = Operation(ADD, svc, destination=Destination("10.1.0.1", True))  # bool is packed as 1 by both
    assert call([bool_port], 0, 1, []) == (1, 2)
    assert both([bool_port])[0] == both([bool_port])[1]


def test_errors_of_the_caller_are_raised_not_hidden() -> None:
    assert nlencode._compiled_encode is not None
    ops = [Operation(ADD, ServiceKey(TCP, "10.0.0.1", 80), destination=Destination("10.1.0.1", 80))]
    context = Encoder()._compiled_context(FAMILY, FLAGS)
    encode = nlencode._compiled_encode
    with pytest.raises(ValueError, match="negative start"):
        encode(ops, -1, 1, [], context)
    with pytest.raises(TypeError):
        encode(tuple(ops), 0, 1, [], context)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        encode(ops, 0, 1, [], context[:-1])
    for seq in (-1, 2**32, 2**64 + 1):
        with pytest.raises((ValueError, OverflowError)):
            encode(ops, 0, seq, [], context)
    assert encode(ops, 0, 2**32 - 1, [], context) == (1, 2**32)
    for k, bad in [(14, b"x" * 43), (15, b"x" * 9), (16, b"x" * 19), (17, b"x" * 25), (12, (b"1234",)),
                   (13, (b"1234", b"123")), (6, (6, 17)), (6, (6, 17, 2**16)), (18, -1), (18, 2**32),
                   (9, 2**16), (9, 2**32 + 0x1E), (10, -1), (11, 2**16)]:
        broken = list(context)
        broken[k] = bad
        with pytest.raises((ValueError, TypeError)):
            encode(ops, 0, 1, [], tuple(broken))
    assert encode(ops, 0, 1, [], context) == (1, 2)  # the context itself is fine


def test_nothing_it_touches_is_leaked() -> None:
    """Every reference it takes is given back: the operations, their services and
    real servers are freed once the caller drops them (a leaked reference would
    keep 100,000 objects per full apply alive)."""
    ops = services_ops(20, 10)
    refs = [weakref.ref(o) for op in ops for o in (op, op.service, op.destination) if o is not None]
    messages = Encoder().messages(ops, FAMILY, FLAGS, 1)[0]
    assert len(messages) == len(ops)
    del ops
    gc.collect()
    assert [r for r in refs if r() is not None] == []


def test_services_of_every_kind_encode_the_same_compiled_or_not() -> None:
    keys = [ServiceKey(TCP, "10.0.0.1", 80), ServiceKey(UDP, "fd00::1", 53), ServiceKey(Protocol.SCTP, "10.0.0.2", 9),
            ServiceKey(TCP, "0.0.0.0", 0, 7), ServiceKey(UDP, "::", 0, 9), ServiceKey(TCP, "10.0.0.1", 0),
            ServiceKey(TCP, "10.0.0.1", 65536), ServiceKey(TCP, "10.0.0.300", 80), ServiceKey(TCP, "10.0.0.1\x00", 80),
            ServiceKey(TCP, "::ffff:10.0.0.1", 80), ServiceKey("TCP", "10.0.0.1", 80)]  # type: ignore[arg-type]
    settings = [("rr", None, frozenset()), ("wlc", 300, frozenset()), ("sh", 60, frozenset({"sh-port", "sh-fallback"})),
                ("rr", 10, frozenset({"netmask=255.255.255.0"})), ("rr", None, frozenset({"ops"})),
                ("nope!", None, frozenset()), ("rr", 0, frozenset()), ("rr", None, frozenset({"bogus"})),
                ("rr", 10, frozenset({"pe=sip"})), ("rr", 10, frozenset({"netmask=64"}))]
    ops = [Operation(kind, key, sched, persistence, flags)
           for kind in (OpKind.ADD_SERVICE, OpKind.EDIT_SERVICE) for sched, persistence, flags in settings
           for key in keys]
    compiled, python = both(ops + ops, 3)  # twice: the second time every good setting is cached
    assert compiled == python
    assert python[2]  # type: ignore[index]  # refusals are in the mix
    random.Random(1).shuffle(ops)
    assert both(ops + ops, 2**32 - 100)[0] == both(ops + ops, 2**32 - 100)[1]


def test_udp_only_settings_are_compiled_too() -> None:
    """One-packet scheduling is for UDP only: its settings are cached under "UDP",
    and the compiled loop must look them up the same way."""
    ops = [Operation(OpKind.ADD_SERVICE, ServiceKey(UDP, f"10.0.0.{n}", 53), "rr", None, frozenset({"ops"}))
           for n in range(1, 6)]
    encoder = Encoder()
    encoder._service_settings(ops[0], socket.AF_INET)
    out: list[bytes] = []
    assert call(ops, 0, 1, out, encoder) == (5, 6)
    assert out == Encoder(compiled=False).messages(ops, FAMILY, FLAGS, 1)[0]


def test_no_reference_to_a_service_setting_is_kept() -> None:
    """The scheduler, persistence and flags objects (shared by many services) are
    given back too: their reference counts are what they were."""
    import sys

    sched, persistence, flags = "".join(["s", "h"]), int("12345"), frozenset({"sh-port"})
    ops = [Operation(OpKind.ADD_SERVICE, ServiceKey(TCP, f"10.0.{n // 250}.{n % 250}", 80), sched, persistence, flags)
           for n in range(500)]
    encoder = Encoder()
    encoder._service_settings(ops[0], socket.AF_INET)
    before = [sys.getrefcount(x) for x in (sched, persistence, flags)]
    out: list[bytes] = []
    assert call(ops, 0, 1, out, encoder) == (500, 501)
    assert [sys.getrefcount(x) for x in (sched, persistence, flags)] == before


_ADDRESSES = st.one_of(
    st.sampled_from(["10.1.0.1", "10.1.0.255", "0.0.0.0", "255.255.255.255", "fd00::5", "::ffff:10.1.0.2",
                     "10.1.0.300", "", "1.2.3", "01.2.3.4", " 10.1.0.3", "10.1.0.3 ", "10.1.0.1\x00", "é"]),
    st.text(alphabet="0123456789.:abcdef", max_size=16),
)
_DESTS = st.builds(Destination, _ADDRESSES, st.integers(-2, 70000) | st.sampled_from([0, 65535, 65536]),
                   st.integers(-2, 2**33) | st.sampled_from([0, rules.MAX_WEIGHT, rules.MAX_WEIGHT + 1]),
                   st.sampled_from(list(Forward)))
_SERVICES = st.sampled_from([ServiceKey(TCP, "10.0.0.1", 80), ServiceKey(UDP, "10.0.0.2", 53),
                             ServiceKey(TCP, "fd00::1", 80), ServiceKey(TCP, "0.0.0.0", 0, 7),
                             ServiceKey(TCP, "10.0.0.300", 80), ServiceKey(TCP, "10.0.0.1", 70000),
                             ServiceKey(Protocol.SCTP, "10.0.0.3", 0), ServiceKey(UDP, "fd00::2", 0)])
_OPS = st.one_of(
    st.builds(Operation, st.sampled_from([ADD, EDIT]), _SERVICES, destination=_DESTS),
    st.builds(Operation, st.sampled_from([ADD, EDIT, OpKind.DELETE_DESTINATION]), _SERVICES,
              destination=st.none() | _DESTS),
    st.builds(Operation, st.sampled_from([OpKind.ADD_SERVICE, OpKind.EDIT_SERVICE, OpKind.DELETE_SERVICE]),
              _SERVICES, st.sampled_from(["rr", "wlc", "sh", "nope"]), st.sampled_from([None, 0, 1, 300, 2**32]),
              st.sampled_from([frozenset(), frozenset({"ops"}), frozenset({"sh-port"}),
                               frozenset({"netmask=255.255.0.0"}), frozenset({"pe=sip"}), frozenset({"bogus"})])),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_OPS, max_size=40), st.sampled_from([1, 2**32 - 5, 2**32 - 40]))
def test_any_plan_encodes_the_same_compiled_or_not(ops: list[Operation], first_seq: int) -> None:
    outcomes = []
    for compiled in (True, False):
        try:
            outcomes.append(("ok", Encoder(compiled=compiled).messages(ops, FAMILY, FLAGS, first_seq)))
        except Exception as exc:  # the same exception either way (a non-EncodeError is a caller's bug)
            outcomes.append(("raised", (type(exc), str(exc))))
    assert outcomes[0] == outcomes[1]
