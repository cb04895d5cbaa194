"""The kernel suite's log check (tests/kernel/kmsg.py) on captured kernel output.

The VM suite proves the /dev/kmsg cursor end to end (tests/kernel/test_harness.py);
here the judging is tested on the kernel's own wording, so a pattern that stopped
matching (or started matching ordinary boot and module messages) shows on the host.
"""

from __future__ import annotations

import pytest

from kernel import kmsg  # tests/kernel (tests/ is on sys.path: it has no __init__.py)

# Lines a clean run of the suite logs (stock and out-of-tree IPVS, namespaces, veth).
BENIGN = """\
IPVS: Registered protocols (TCP, UDP, SCTP, AH, ESP)
IPVS: Connection hash table configured (size=4096, memory=32Kbytes)
IPVS: ipvs loaded.
IPVS: [rr] scheduler registered.
IPVS: Creating netns size=2048 id=3
IPVS: stopping master sync thread 1234 ...
ip_vs: loading out-of-tree module taints kernel.
ip_vs: module verification failed: signature and/or required key missing - tainting kernel
IPVS: ipvs unloaded.
svct-a1b2: entered promiscuous mode
br0: port 1(vb1) entered forwarding state
IPv6: ADDRCONF(NETDEV_CHANGE): va1: link becomes ready
nf_conntrack: default automatic helper assignment has been turned off for security reasons
IPVS: rr: TCP 10.96.0.10:80 - no destination available
""".splitlines()

# A WARN_ON() splat as 6.1 prints it (shortened in the middle).
WARN_SPLAT = """\
------------[ cut here ]------------
WARNING: CPU: 1 PID: 812 at net/netfilter/ipvs/ip_vs_conn.c:1195 ip_vs_conn_net_cleanup+0x5a/0x70 [ip_vs]
Modules linked in: ip_vs_rr(OE) ip_vs(OE) nf_conntrack veth bridge
CPU: 1 PID: 812 Comm: ip Tainted: G           OE      6.1.0-57-amd64 #1  Debian 6.1.192-3
RIP: 0010:ip_vs_conn_net_cleanup+0x5a/0x70 [ip_vs]
Call Trace:
 <TASK>
 ops_exit_list+0x30/0x70
 cleanup_net+0x219/0x3b0
 </TASK>
---[ end trace 0000000000000000 ]---
""".splitlines()

OOPS = """\
BUG: kernel NULL pointer dereference, address: 0000000000000010
#PF: supervisor read access in kernel mode
Oops: 0000 [#1] PREEMPT SMP NOPTI
""".splitlines()

SLAB_LEAK = [
    "=============================================================================",
    "BUG ip_vs_conn (Tainted: G           OE     ): Objects remaining in ip_vs_conn on __kmem_cache_shutdown()",
    "-----------------------------------------------------------------------------",
    "kmem_cache_destroy ip_vs_conn: Slab cache still has objects when called from ip_vs_conn_cleanup+0x2a/0x40",
]

OTHER_REPORTS = [
    "kernel BUG at net/core/dev.c:10873!",
    "unregister_netdevice: waiting for lo to become free. Usage count = 2",
    "kmemleak: 3 new suspected memory leaks (see /sys/kernel/debug/kmemleak)",
    "leaked reference.",  # ref_tracker's report when a namespace goes with references held
    "general protection fault, probably for non-canonical address 0xdead000000000122: 0000 [#1] SMP NOPTI",
    "UBSAN: shift-out-of-bounds in net/netfilter/ipvs/ip_vs_conn.c:1410:27",
]


def test_benign_lines_pass() -> None:
    assert kmsg.problems(BENIGN) == []


def test_warning_splat_is_caught_by_its_warning_and_call_trace_lines() -> None:
    assert kmsg.problems(BENIGN + WARN_SPLAT) == [WARN_SPLAT[1], "Call Trace:"]


def test_oops_and_bug() -> None:
    assert kmsg.problems(OOPS) == [OOPS[0], OOPS[2]]


def test_slab_objects_remaining_after_module_unload() -> None:
    assert kmsg.problems(SLAB_LEAK) == [SLAB_LEAK[1]]


@pytest.mark.parametrize("line", OTHER_REPORTS)
def test_other_reports(line: str) -> None:
    assert kmsg.problems([line]) == [line]


def test_allow_drops_only_matching_lines() -> None:
    lines = ["WARNING: svcproxy-selftest provoked", *WARN_SPLAT]
    assert kmsg.problems(lines, allow=[r"svcproxy-selftest"]) == [WARN_SPLAT[1], "Call Trace:"]


def test_record_text_parses_kmsg_records() -> None:
    record = (b"4,1234,5678901,-;WARNING: CPU: 0 PID: 1 at x.c:1 f+0x0/0x1\n"
              b" SUBSYSTEM=net\n DEVICE=n2\n")
    assert kmsg.record_text(record) == ["WARNING: CPU: 0 PID: 1 at x.c:1 f+0x0/0x1"]
    assert kmsg.record_text(b"6,1,2,c;first\\x0asecond\n") == ["first", "second"]
    assert kmsg.record_text(b"6,1,2,-;\n") == [""]


def test_report_names_the_first_problem_with_context() -> None:
    assert kmsg.report(BENIGN) is None
    text = kmsg.report(BENIGN + WARN_SPLAT)
    assert text is not None
    assert text.startswith(f"the kernel logged 2 problem line(s) during this test, first: {WARN_SPLAT[1]!r}")
    assert BENIGN[-1] in text and "ops_exit_list" in text
