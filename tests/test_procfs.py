"""/proc/net/ip_vs: the parser (on a file the test VM's kernel wrote) and the
netlink backend's use of it (against the fake kernel of test_netlink_codec)."""

from __future__ import annotations

import logging
import socket
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from svcproxy.ipvs import nlconst, procfs
from svcproxy.ipvs.netlink import NetlinkBackend
from svcproxy.ipvs.nldecode import DecodeError
from svcproxy.model import Destination, Forward, Protocol, ServiceKey, canonical_ip
from test_netlink_codec import DESIRED, FakeKernel

TCP, UDP, SCTP = Protocol.TCP, Protocol.UDP, Protocol.SCTP
MASQ, ROUTE, TUNNEL = Forward.MASQ, Forward.ROUTE, Forward.TUNNEL
D = Destination

#: Written by Linux 6.1 (the test VM's kernel) after these ipvsadm commands:
#: -A -t [fd00::20]:80 -s rr; -a ... -r 10.1.1.1:80 -i
#: -A -t 10.96.0.1:80 -s rr; -a ... -r 10.244.1.5:8080 -m -w 1; -r 10.244.2.7:8080 -m -w 0
#: -A -u 10.96.0.4:53 -s rr -o; -a ... -r 10.244.1.5:53 -m
#: -A -u [fd00::10]:53 -s wlc; -a ... -r [fd00::1:5]:53 -m -w 3
#: -A -t 10.96.0.9:8443 -s rr (no real servers)
#: -A -t 10.96.0.2:443 -s sh -b sh-port,sh-fallback; -a ... -r 192.168.1.2:443 -i -w 256
#: -A --sctp-service 10.96.0.3:9 -s rr -p 60 -M 255.255.255.0; -a ... -r 10.244.3.1:9 -g -w 65535
#: -A -f 7 -s wlc -p 300; -a -f 7 -r 10.0.0.5:0 -g -w 1
#: -A -f 8 -6 -s rr (no real servers)
KERNEL_FILE = (Path(__file__).parent / "data" / "proc_net_ip_vs.txt").read_text()

EXPECTED = {
    ServiceKey(TCP, "fd00::20", 80): [D("10.1.1.1", 80, 1, TUNNEL)],
    ServiceKey(TCP, "10.96.0.1", 80): [D("10.244.2.7", 8080, 0), D("10.244.1.5", 8080, 1)],
    ServiceKey(UDP, "10.96.0.4", 53): [D("10.244.1.5", 53, 1)],
    ServiceKey(UDP, "fd00::10", 53): [D("fd00::1:5", 53, 3)],
    ServiceKey(TCP, "10.96.0.9", 8443): [],
    ServiceKey(TCP, "10.96.0.2", 443): [D("192.168.1.2", 443, 256, TUNNEL)],
    ServiceKey(SCTP, "10.96.0.3", 9): [D("10.244.3.1", 9, 65535, ROUTE)],
    ServiceKey(TCP, "0.0.0.0", 0, 7): [D("10.0.0.5", 0, 1, ROUTE)],
    ServiceKey(TCP, "::", 0, 8): [],
}


def test_the_kernels_file_parses_into_every_service_and_real_server() -> None:
    parsed = procfs.parse(KERNEL_FILE)
    assert parsed == {procfs.label(key): dests for key, dests in EXPECTED.items()}
    assert list(parsed) == [procfs.label(key) for key in EXPECTED]  # the file's order


def test_labels_are_the_files_own_words() -> None:
    lines = [line.split()[:2] for line in KERNEL_FILE.splitlines()[3:] if not line.startswith(" ")]
    assert [list(procfs.label(key)) for key in EXPECTED] == lines


def test_connection_counts_and_the_other_forwarding_names() -> None:
    text = "\n".join([
        *KERNEL_FILE.splitlines()[:3],
        "TCP  0A600001:0050 rr  ",
        "  -> 0AF40105:1F90      Masq    5      1234       987654    ",
        "  -> 0AF40106:1F90      Local   1      0          7         ",
        "  -> [fd00:0000:0000:0000:0000:0000:0001:0005]:1F90      Route   2      3          4         ",
        "",
    ])
    assert procfs.parse(text) == {("TCP", "0A600001:0050"): [
        D("10.244.1.5", 8080, 5, MASQ, 1234, 987654),
        D("10.244.1.6", 8080, 1, MASQ, 0, 7),  # LOCALNODE: masq, as over netlink
        D("fd00::1:5", 8080, 2, ROUTE, 3, 4),
    ]}


def test_an_empty_table() -> None:
    assert procfs.parse("\n".join(KERNEL_FILE.splitlines()[:3]) + "\n") == {}


HEAD = "\n".join(KERNEL_FILE.splitlines()[:3]) + "\n"


@pytest.mark.parametrize("text, message", [
    ("", "expected header"),
    ("IP Virtual Server version 1.2.1 (size=4096)\nProt LocalAddress:Port\n", "expected header"),
    (HEAD + "  -> 0AF40105:1F90      Masq    1      0          0\n", "real server line"),
    (HEAD + "TCP  0A600001:0050 rr\n  -> 0AF40105:1F90      Masq    1      0\n", "real server line"),
    (HEAD + "TCP  0A600001:0050 rr\n  -> 0AF40105:1F90      Bypass  1      0          0\n", "forwarding method"),
    (HEAD + "TCP  0A600001:0050 rr\n  -> 0AF4010:1F90      Masq    1      0          0\n", "bad address"),
    (HEAD + "TCP  0A600001:0050 rr\n  -> 0AF4010Z:1F90      Masq    1      0          0\n", "non-hexadecimal"),
    (HEAD + "TCP  0A600001:0050 rr\n  -> [fd00::zz]:1F90      Masq    1      0          0\n", "illegal IP"),
    (HEAD + "TCP  0A600001:0050 rr\n  -> 0AF40105:1F9      Masq    1      0          0\n", "bad port"),
    (HEAD + "TCP  0A600001:0050 rr\n  -> 0AF40105:1F90      Masq    x      0          0\n", "invalid literal"),
    (HEAD + "TCP  0A600001:0050\n", "service line"),
    (HEAD + "TCP  0A600001:0050 rr\nTCP  0A600001:0050 rr\n", "listed twice"),
])
def test_anything_unexpected_is_a_decode_error(text: str, message: str) -> None:
    with pytest.raises(DecodeError, match=message):
        procfs.parse(text)


# ------------------------------------------------------------------ the backend


class CountingKernel(FakeKernel):
    """The fake kernel, counting GET_DEST dumps, with its table as /proc shows it."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.dest_dumps = 0

    def _dump(self, seq: int, cmd: int, svc_attrs: dict[str, Any]) -> None:
        self.dest_dumps += cmd == nlconst.IPVS_CMD_GET_DEST
        super()._dump(seq, cmd, svc_attrs)

    def proc_text(self) -> str:
        """ip_vs_info_seq_show's output for this table (services in table order,
        real servers newest first, as the kernel lists them)."""
        lines = [HEAD.rstrip("\n")]
        for key in self.order:
            svc = self.services[key]
            if len(key) == 2:
                lines.append(f"FWM  {key[1]:08X} {svc.sched} ")
            elif svc.af == socket.AF_INET6:
                lines.append(f"{({6: 'TCP', 17: 'UDP', 132: 'SCTP'})[key[1]]}  [{_full(key[2])}]:{key[3]:04X} {svc.sched} ")
            else:
                lines.append(f"{({6: 'TCP', 17: 'UDP', 132: 'SCTP'})[key[1]]}  {key[2].hex().upper()}:{key[3]:04X} "
                             f"{svc.sched}  ")
            for d in reversed(list(svc.dests.values())):
                address = (f"[{_full(socket.inet_pton(socket.AF_INET6, d.address))}]" if ":" in d.address
                           else socket.inet_pton(socket.AF_INET, d.address).hex().upper())
                fwd = {MASQ: "Masq", ROUTE: "Route", TUNNEL: "Tunnel"}[d.forward]
                lines.append(f"  -> {address}:{d.port:04X}      {fwd:<7} {d.weight:<6} {d.active_conns:<10} "
                             f"{d.inactive_conns:<10}")
        return "\n".join(lines) + "\n"


def _full(raw: bytes) -> str:
    words = raw.hex()
    return ":".join(words[i : i + 4] for i in range(0, 32, 4))


def _loaded(kernel: CountingKernel) -> CountingKernel:
    from svcproxy.diff import diff
    from svcproxy.model import Table

    assert NetlinkBackend(opener=lambda: kernel).apply(diff(DESIRED, Table())) == []
    kernel.set_conns("10.244.1.5", 8080, 3, 17)
    return kernel


def test_the_backend_reads_real_servers_from_the_file_and_dumps_none() -> None:
    kernel = _loaded(CountingKernel())
    by_dumps = NetlinkBackend(opener=lambda: kernel).read()  # the default with an opener: dumps
    assert kernel.dest_dumps == len(DESIRED)
    kernel.dest_dumps = 0
    by_file = NetlinkBackend(opener=lambda: kernel, proc=kernel.proc_text).read()
    assert kernel.dest_dumps == 0
    assert by_file == by_dumps
    assert by_file.services[ServiceKey(TCP, "10.96.0.10", 80)].destinations[0] == D("10.244.1.5", 8080, 1, MASQ, 3, 17)


@pytest.mark.parametrize("why, spoil", [
    ("TCP 0A6000EE:1F90, which the netlink dump does not", lambda text: text.replace("0A60000E:1F90", "0A6000EE:1F90")),
    ("TCP 0A6000FF:0050, which the netlink dump does not", lambda text: text + "TCP  0A6000FF:0050 rr  \n"),
    ("expected header", lambda text: text[10:]),
    ("No such file", None),
])
def test_the_backend_falls_back_to_dumps_and_warns_once(
    why: str, spoil: Any, caplog: pytest.LogCaptureFixture
) -> None:
    kernel = _loaded(CountingKernel())

    def source() -> str:
        if spoil is None:
            raise FileNotFoundError(2, "No such file or directory", procfs.PATH)
        text: str = spoil(kernel.proc_text())
        return text

    backend = NetlinkBackend(opener=lambda: kernel, proc=source)
    want = NetlinkBackend(opener=lambda: kernel).read()
    kernel.dest_dumps = 0
    with caplog.at_level(logging.DEBUG, logger="svcproxy.ipvs.netlink"):
        assert backend.read() == want
        assert backend.read() == want
    assert kernel.dest_dumps == 2 * len(DESIRED)
    levels = [r.levelno for r in caplog.records if "one dump per service" in r.getMessage()]
    assert levels == [logging.WARNING, logging.DEBUG]
    assert why in caplog.records[0].getMessage()


def test_proc_false_dumps_and_is_the_default_only_with_a_fake_kernel() -> None:
    kernel = _loaded(CountingKernel())
    kernel.dest_dumps = 0
    assert NetlinkBackend(opener=lambda: kernel, proc=False).read() == NetlinkBackend(
        opener=lambda: kernel, proc=kernel.proc_text).read()
    assert kernel.dest_dumps == len(DESIRED)
    assert NetlinkBackend(opener=lambda: kernel).proc is False
    assert NetlinkBackend().proc is True


def test_ipv4_mapped_real_servers_read_as_the_model_writes_them() -> None:
    line = "  -> [0000:0000:0000:0000:0000:ffff:0a00:0001]:1F90      Masq    1      0          0         "
    parsed = procfs.parse(HEAD + "TCP  [fd00:0000:0000:0000:0000:0000:0000:0010]:0050 rr \n" + line + "\n")
    [[dest]] = parsed.values()
    assert dest.address == canonical_ip("::ffff:10.0.0.1") == "::ffff:a00:1"  # as netlink reads it


def test_one_firewall_mark_in_both_families_is_never_joined(caplog: pytest.LogCaptureFixture) -> None:
    """The file writes "FWM  00000007" for both families: whose real servers are whose
    cannot be told, so such a table is read with dumps, even when the file happens to
    list as many services as the dump (one deleted, another added in between)."""
    from svcproxy.diff import diff
    from svcproxy.model import Table, VirtualService

    table = Table.of([
        VirtualService(ServiceKey(TCP, "0.0.0.0", 0, 7), "rr", None, frozenset(), (D("10.244.1.5", 0, 1, ROUTE),)),
        VirtualService(ServiceKey(TCP, "::", 0, 7), "rr", None, frozenset(), (D("fd00::5", 0, 1, ROUTE),)),
        VirtualService(ServiceKey(TCP, "10.96.0.1", 80), "rr", None, frozenset(), (D("10.244.1.6", 80),)),
    ])
    kernel = CountingKernel()
    assert NetlinkBackend(opener=lambda: kernel).apply(diff(table, Table())) == []
    text = kernel.proc_text()
    assert text.count("FWM  00000007") == 2
    first_fwm = text.index("FWM  00000007")
    second_fwm = text.index("FWM  00000007", first_fwm + 1)
    after = text.index("\n", text.index("\n", second_fwm) + 1) + 1  # its line and its real server's
    same_count = text[:second_fwm] + text[after:] + "TCP  0A6000FF:0050 rr  \n"
    one_fwm = text[:second_fwm] + text[after:]  # as a stock kernel's walk may leave one out
    for source, dumps, why in ((text, 3, "listed twice"), (same_count, 3, "which the netlink dump does not"),
                               (one_fwm, 2, "2 of 3 services not listed")):
        kernel.dest_dumps = 0
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="svcproxy.ipvs.netlink"):
            assert NetlinkBackend(opener=lambda: kernel, proc=lambda: source).read() == table
        assert kernel.dest_dumps == dumps
        assert why in caplog.records[-1].getMessage()


def test_services_the_file_leaves_out_are_dumped_and_the_rest_taken_from_it(
        caplog: pytest.LogCaptureFixture) -> None:
    """Where other namespaces have IPVS services, a stock kernel's file leaves some
    of this namespace's services out (its walk restarts each read at a position
    that counted theirs). What it lists is still this namespace's: used; the rest
    is dumped, one service each, and this is no reason for a warning."""
    kernel = _loaded(CountingKernel())
    want = NetlinkBackend(opener=lambda: kernel, proc=False).read()
    text = kernel.proc_text()
    blocks = text.split("\n", 3)[3].replace("\n  ->", "\t  ->").splitlines()
    kept = [block for i, block in enumerate(blocks) if i % 3]  # every third service left out
    partial = "\n".join(text.split("\n", 3)[:3] + [b.replace("\t", "\n") for b in kept]) + "\n"
    kernel.dest_dumps = 0
    with caplog.at_level(logging.DEBUG, logger="svcproxy.ipvs.netlink"):
        assert NetlinkBackend(opener=lambda: kernel, proc=lambda: partial).read() == want
    assert kernel.dest_dumps == len(blocks) - len(kept) > 0
    assert [r.levelno for r in caplog.records] == [logging.DEBUG]


# ------------------------------------------------------------------ the compiled parser


def _generated(services: int, dests: int) -> str:
    """A file as the kernel writes it: IPv4 and IPv6 services and real servers,
    every forwarding name, counts of several widths."""
    lines = [HEAD.rstrip("\n")]
    names = ["Masq", "Local", "Tunnel", "Route"]
    for i in range(services):
        if i % 7 == 3:
            lines.append(f"UDP  [fd00:0000:0000:0000:0000:0000:{i // 65536:04x}:{i % 65536:04x}]:0035 wlc ")
        else:
            lines.append(f"TCP  0A60{i // 256:02X}{i % 256:02X}:{80 + i % 3:04X} rr  ")
        for j in range(dests):
            address = (f"[FD00:0000:0000:0000:0000:0000:{j:04X}:{i % 65536:04x}]" if (i + j) % 11 == 0
                       else f"0A{j:02X}{i // 256 % 256:02X}{i % 256:02X}")
            lines.append(f"  -> {address}:{8000 + j % 4:04X}      {names[(i + j) % 4]:<7} {j:<6} "
                         f"{i * j % 1000:<10} {i:<10}")
    return "\n".join(lines) + "\n"


def _compiled(text: str) -> dict[tuple[str, str], list[Destination]] | None:
    assert procfs._compiled_parse is not None, "svcproxy/ipvs/_nlfast.c is not built"
    return procfs._compiled_parse(text, Destination, procfs._FORWARD_PAIRS, procfs._address)


@pytest.mark.parametrize("text", [KERNEL_FILE, _generated(300, 10), _generated(1, 0), HEAD])
def test_the_compiled_parser_reads_what_the_python_parser_reads(text: str) -> None:
    found = _compiled(text)
    assert found is not None  # it took the file itself
    want = procfs.parse(text, compiled=False)
    assert found == want
    assert [[(d.address, d.port, d.weight, d.forward, d.active_conns, d.inactive_conns) for d in v]
            for v in found.values()] == [[(d.address, d.port, d.weight, d.forward, d.active_conns,
                                           d.inactive_conns) for d in v] for v in want.values()]
    assert list(found) == list(want)  # and in the kernel's order
    assert procfs.parse(text) == want


def test_real_servers_it_makes_are_ordinary_destinations() -> None:
    import dataclasses

    found = _compiled(HEAD + "TCP  0A600001:0050 rr\n  -> 0AF40105:1F90      Local   3      7          9\n")
    assert found is not None
    (dest,) = found[("TCP", "0A600001:0050")]
    assert type(dest) is Destination
    assert dest == D("10.244.1.5", 8080, 3, MASQ) and hash(dest) == hash(D("10.244.1.5", 8080, 3, MASQ))
    assert repr(dest) == repr(D("10.244.1.5", 8080, 3, MASQ, 7, 9))
    assert vars(dest) == vars(D("10.244.1.5", 8080, 3, MASQ, 7, 9))
    with pytest.raises(dataclasses.FrozenInstanceError):
        dest.weight = 4  # type: ignore[misc]


@pytest.mark.parametrize("text", [
    HEAD + "TCP  0A600001:0050 rr\r\n  -> 0AF40105:1F90      Masq    1      0          0\n",  # \r
    HEAD + "TCP  0A600001:0050 rr\n  -> 0AF40105:1F90      Masq    1      0          0\x0b\n",
    HEAD + "TCP  0A600001:0050 rr\n  -> 0AF40105:1F90      Masq    \ufffd      0          0\n",
    HEAD + "TCP  0A600001:0050 rr\n  -> 0AF40105:1F90      Masq    +1      0          0\n",
    HEAD + "TCP  0A600001:0050 rr\n  -> 0AF40105:1F90      Masq    -1      0          0\n",
    HEAD + "TCP  0A600001:0050 rr\n  -> 0AF40105:1F90      Masq    1      0          0   x\n",
    HEAD + "TCP  0A600001:0050 rr\n  -> 0AF40105:1F90      Masq    1      0\n",
    HEAD + "TCP  0A600001:0050 rr\n  -> 0AF40105:1F90      Bypass  1      0          0\n",
    HEAD + "TCP  0A600001:0050 rr\n  -> 0AF4010Z:1F90      Masq    1      0          0\n",
    HEAD + "TCP  0A600001:0050 rr\n  -> 0AF40105:+F90      Masq    1      0          0\n",
    HEAD + "TCP  0A600001:0050 rr\n  -> 0AF40105:1F9      Masq    1      0          0\n",
    HEAD + "TCP  0A600001:0050 rr\n  -> 0AF40105      Masq    1      0          0\n",
    HEAD + "TCP  0A600001:0050 rr\n  -> [fd00::zz]:1F90      Masq    1      0          0\n",
    HEAD + "TCP  0A600001:0050 rr\n  -> 0AF40105:1F90      Masq    1      0          1234567890123456789\n",
    HEAD + "  -> 0AF40105:1F90      Masq    1      0          0\n",
    HEAD + "TCP  0A600001:0050\n",
    HEAD + "TCP  0A600001:0050 rr\nTCP  0A600001:0050 rr\n",
    HEAD + "TCP  0A600001:0050 rr a b c d e f g h\n",
    HEAD + "TCP\ud800 0A600001:0050 rr\n",  # a lone surrogate: no UTF-8 form
    HEAD + "TCP 0A600001:0050 rr \ud800\n",
    HEAD + "TCP 0A600001:0050 rr \xe9\n",
])
def test_anything_else_is_left_to_the_python_parser(text: str) -> None:
    assert _compiled(text) is None
    try:
        want: object = procfs.parse(text, compiled=False)
    except DecodeError as exc:
        want = str(exc)
    try:
        got: object = procfs.parse(text)
    except DecodeError as exc:
        got = str(exc)
    assert got == want


def test_lowercase_hex_and_tabs_are_read_as_python_reads_them() -> None:
    text = HEAD + "TCP\t0a600001:0050 rr\n\t->  0af40105:1f90\tMasq 1 0 0\n\n   \n"
    assert _compiled(text) == procfs.parse(text, compiled=False) == {("TCP", "0a600001:0050"): [D("10.244.1.5", 8080)]}


def test_a_conversion_that_raises_an_interrupt_is_raised() -> None:
    assert procfs._compiled_parse is not None
    text = HEAD + "TCP  0A600001:0050 rr\n  -> [fd00::1]:1F90      Masq    1      0          0\n"

    def interrupted(address: str) -> str:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        procfs._compiled_parse(text, Destination, procfs._FORWARD_PAIRS, interrupted)
    assert procfs._compiled_parse(text, Destination, procfs._FORWARD_PAIRS, lambda a: 1) is None  # type: ignore
    with pytest.raises(TypeError):
        procfs._compiled_parse(text, Destination, (("Masq",),), procfs._address)


def test_the_compiled_parser_keeps_no_reference() -> None:
    """Every reference it takes is given back: the real servers are freed with
    the result, and the Forward members' counts are what they were."""
    import gc
    import sys
    import weakref

    text = _generated(50, 10)
    before = [sys.getrefcount(f) for f in Forward]
    found = _compiled(text)
    assert found is not None
    refs = [weakref.ref(d) for servers in found.values() for d in servers]
    assert len(refs) == 500
    del found
    gc.collect()
    assert [r for r in refs if r() is not None] == []
    assert [sys.getrefcount(f) for f in Forward] == before


_LINES = st.sampled_from([
    "TCP  0A600001:0050 rr  ", "UDP  0A600002:0035 wlc ops ", "FWM  00000007 rr persistent 300 FFFFFFFF",
    "TCP  [fd00:0000:0000:0000:0000:0000:0000:0020]:0050 rr ", "TCP  0A600001:0050", "", "   ", "\t",
    "  -> 0AF40105:1F90      Masq    1      0          0         ",
    "  -> 0AF40106:1F90      Route   0      12         7",
    "  -> 0AF40107:0050      Tunnel  255    0          0",
    "  -> 0AF40108:0050      Local   1      0          0",
    "  -> [FD00:0000:0000:0000:0000:0000:0001:0005]:0035      Masq    3      0          0",
    "  -> [fd00:0000:0000:0000:0000:ffff:0a00:0001]:0035      Masq    3      0          0",
    "  -> 0AF40109:1F90      Bypass  1      0          0",
    "  -> 0AF4010:1F90      Masq    1      0          0",
    "  -> 0AF40105:1F90      Masq    1      0",
    "  -> 0AF40105:1F90      Masq    -1      0          0",
    "  -> 0AF40105:1F90      Masq    1      0          0\r",
    "  -> 0AF40105:1F9      Masq    1      0          0",
])


@settings(max_examples=300, deadline=None)
@given(st.lists(_LINES, max_size=30))
def test_any_file_parses_the_same_compiled_or_not(lines: list[str]) -> None:
    text = HEAD + "\n".join(lines) + "\n"
    outcomes = []
    for compiled in (True, False):
        try:
            outcomes.append(("ok", procfs.parse(text, compiled=compiled)))
        except DecodeError as exc:
            outcomes.append(("refused", str(exc)))
    assert outcomes[0] == outcomes[1]


def test_every_octet_is_written_as_inet_ntop_writes_it() -> None:
    lines = [HEAD + "TCP  0A600001:0050 rr"]
    lines += [f"  -> {(n << shift) & 0xFFFFFFFF:08X}:{n:04X}      Masq    1      0          0"
              for n in range(256) for shift in (0, 8, 16, 24)]
    lines += [f"  -> {n * 0x01010101:08X}:0050      Masq    1      0          0" for n in range(256)]
    text = "\n".join(lines) + "\n"
    found = _compiled(text)
    assert found is not None
    assert found == procfs.parse(text, compiled=False)
    assert [d.address for d in found[("TCP", "0A600001:0050")]][-3:] == ["253.253.253.253", "254.254.254.254",
                                                                         "255.255.255.255"]
