"""The churn benchmark's own pieces: matching changes with acknowledgements, and
comparing the final tables (the benchmark's verdicts must be able to fail)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from churn import ABSENT, Tracker, compare_tables, digest, histogram_quantile, memory_growth  # noqa: E402


def test_ack_completes_the_change_and_the_ones_it_overtook() -> None:
    t = Tracker()
    t.expect(10.0, "k", 1, ["node"])
    t.expect(10.5, "k", 2, ["node"])
    t.expect(10.6, "other", 3, ["node"])
    t.ack("node", 11.0, "k", 2)  # the loop coalesced the first two changes
    assert t.latencies(0, 100) == [0.5, 1.0]
    assert t.pending() == 1


def test_ack_before_the_write_or_of_another_state_completes_nothing() -> None:
    t = Tracker()
    t.expect(10.0, "k", 1, ["node"])
    t.ack("node", 9.0, "k", 1)  # acknowledged before it was written: an older state
    t.ack("node", 11.0, "k", 7)
    assert t.pending() == 1 and t.latencies(0, 100) == []
    assert t.completed_by(10.0) is None


def test_every_table_must_acknowledge() -> None:
    t = Tracker()
    t.expect(10.0, "k", 1, ["node", "pod-0"])
    t.ack("node", 10.2, "k", 1)
    assert t.pending() == 1
    t.ack("pod-0", 10.4, "k", 1)
    assert t.latencies(0, 100) == [0.40000000000000036]
    assert t.completed_by(10.0) == 10.4


def test_a_deleted_table_is_not_waited_for() -> None:
    t = Tracker()
    t.expect(10.0, "k", 1, ["node", "pod-0"])
    t.ack("node", 10.2, "k", 1)
    t.drop_target("pod-0")
    assert t.pending() == 0 and len(t.latencies(0, 100)) == 1


def test_service_added_and_removed_between_syncs_is_coalesced_away() -> None:
    t = Tracker()
    t.expect(10.0, "new", digest(["10.128.0.1:8080"]), ["node"])
    t.expect(10.1, "new", ABSENT, ["node"])
    assert t.pending() == 0  # nothing will ever be acknowledged for it
    t.settle()
    assert t.coalesced == 2 and t.latencies(0, 100) == []
    # but a removal of a Service the table holds waits for its acknowledgement
    t.ack("node", 11.0, "old", digest(["10.128.0.2:8080"]))
    t.expect(12.0, "old", ABSENT, ["node"])
    assert t.pending() == 1
    t.ack("node", 12.5, "old", ABSENT)
    assert t.pending() == 0 and t.latencies(0, 100) == [0.5]


def test_compare_tables_finds_missing_extra_and_wrong() -> None:
    desired = {"tcp://10.96.0.1:80": ["10.128.0.1:8080", "10.128.0.2:8080"], "tcp://10.96.0.2:80": []}
    assert compare_tables(desired, {"tcp://10.96.0.1:80": ["10.128.0.1:8080@1", "10.128.0.2:8080@1"],
                                    "tcp://10.96.0.2:80": []}) == []
    problems = compare_tables(desired, {"tcp://10.96.0.1:80": ["10.128.0.1:8080@1", "10.128.0.2:8080@0"],
                                        "tcp://10.96.0.3:80": []})
    assert problems == ["missing virtual service tcp://10.96.0.2:80",
                        "extra virtual service tcp://10.96.0.3:80 (0 real servers)",
                        "tcp://10.96.0.1:80: missing or wrong real server 10.128.0.2:8080@1",
                        "tcp://10.96.0.1:80: extra or wrong real server 10.128.0.2:8080@0"]


def test_digest_ignores_order() -> None:
    assert digest(["a:1", "b:1"]) == digest(["b:1", "a:1"]) != digest(["a:1"])


def test_histogram_quantile_interpolates_like_prometheus() -> None:
    buckets = [(0.25, 50.0), (0.5, 90.0), (1.0, 100.0), (float("inf"), 100.0)]
    assert histogram_quantile(buckets, 0.5) == 0.25
    assert abs(histogram_quantile(buckets, 0.99) - 0.95) < 1e-9


def test_memory_growth_leaves_out_the_warm_up_but_not_a_trend() -> None:
    warm_then_flat = [(float(t), 100.0 + min(t, 300) / 10, 0.0, 0.0) for t in range(0, 1801, 10)]
    g = memory_growth(warm_then_flat, 300)
    assert round(g["from_start"], 3) == 0.3 and g["after_warmup"] == 0.0 and g["slope_mb_per_hour"] == 0.0
    leaking = [(t, r + max(0.0, t - 300) / 360, c, p) for t, r, c, p in warm_then_flat]  # +10 MB per hour
    g = memory_growth(leaking, 300)
    assert round(g["slope_mb_per_hour"], 6) == 10.0 and g["after_warmup"] > 0.03


def test_the_benchmark_runs_the_agent_at_svcproxy_runs_default_min_sync_period() -> None:
    """It measures what a user runs: not a --min-sync-period of its own."""
    from churn import options

    from svcproxy.cli import build_parser

    assert options([])[0].min_sync_periods == [build_parser().parse_args(["run"]).min_sync_period]
    assert options(["--min-sync-period", "1,0.1"])[0].min_sync_periods == [1.0, 0.1]
