"""`python -m bench coordination` (bench/coordination.py): watch latency and lock
acquisitions per second, ringkv beside etcd.

The figures (percentiles, watch latencies from send and from acknowledgment,
the fence that checks tokens and mutual exclusion), the comparison and the
table are pure and tested here directly, the fence against planted faults;
the contender loop runs against in-process locks, one of them broken. One
test runs the bench for real with tiny phases: ringkv and, when an etcd
binary is installed (Debian: apt-get install -y etcd-server), etcd.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from bench.coordination import (
    ETCD,
    RINGKV,
    Fence,
    Holder,
    compare,
    format_row,
    format_table,
    latency_stats,
    lock_figures,
    prefix_range_end,
    run_contenders,
    strictly_increasing,
    watch_figures,
)
from bench.etcd import find_etcd

ROOT = Path(__file__).resolve().parent.parent


def test_latency_stats_are_ms_percentiles_and_zero_when_empty() -> None:
    stats = latency_stats([i / 1000 for i in range(1, 101)])  # 1..100 ms
    assert stats["p50_ms"] == pytest.approx(51.0)  # nearest rank over 100 values
    assert stats["p99_ms"] == pytest.approx(99.0)
    assert stats["max_ms"] == pytest.approx(100.0)
    assert latency_stats([]) == {"p50_ms": 0.0, "p99_ms": 0.0, "max_ms": 0.0}


def test_watch_latency_counts_from_the_send_and_from_the_acknowledgment() -> None:
    # Put i sent at i s, answered 4 ms later, delivered 10 ms after the send; put 2 is
    # answered but never delivered, put 3 fails (never answered) and is not counted.
    sent = {i: float(i) for i in range(4)}
    acked = {i: i + 0.004 for i in range(3)}
    delivered = {0: 0.010, 1: 1.010}
    figures = watch_figures(sent, acked, delivered)
    assert figures["ops"] == 2 and figures["missing"] == 1
    assert figures["p50_ms"] == pytest.approx(10.0) and figures["p99_ms"] == pytest.approx(10.0)
    assert figures["ack_p50_ms"] == pytest.approx(6.0)
    assert figures["ops_per_s"] == pytest.approx(2 / 1.010, abs=0.05)  # first send to last delivery


def test_an_event_that_overtakes_the_answer_has_a_negative_latency_after_ack() -> None:
    # etcd tells its watchers as it applies a put, before the writer reads the answer.
    figures = watch_figures({0: 0.0}, {0: 0.005}, {0: 0.003})
    assert figures["p50_ms"] == pytest.approx(3.0)
    assert figures["ack_p50_ms"] == pytest.approx(-2.0)


def test_the_fence_accepts_rising_tokens_and_catches_stale_ones_and_overlaps() -> None:
    fence = Fence()
    for token in (3, 7, 8):
        fence.enter(token)
        fence.leave()
    assert (fence.stale, fence.overlaps, fence.last_token) == (0, 0, 8)
    assert lock_figures([0.001] * 3, 1.0, fence)["tokens_increasing"] is True
    # Planted: a holder with a token not above the last accepted one (a paused old holder).
    fence.enter(8)
    fence.leave()
    assert fence.stale == 1 and fence.last_token == 8
    assert lock_figures([0.001] * 4, 1.0, fence)["tokens_increasing"] is False
    # Planted: two holders inside at once.
    fence.enter(9)
    fence.enter(10)
    fence.leave()
    fence.leave()
    assert fence.overlaps == 1
    assert strictly_increasing([1, 2, 5]) and not strictly_increasing([1, 2, 2])


def test_lock_figures_rate_and_latency() -> None:
    fence = Fence()
    figures = lock_figures([0.002, 0.004, 0.010, 0.001], 2.0, fence)
    assert figures["ops"] == 4 and figures["ops_per_s"] == pytest.approx(2.0)
    assert figures["p50_ms"] <= figures["p99_ms"] <= figures["max_ms"] == pytest.approx(10.0)


def _mutex_holder(mutex: threading.Lock, tokens: Iterator[int]) -> Holder:
    @contextmanager
    def hold() -> Iterator[int]:
        with mutex:
            yield next(tokens)
    return hold


def test_contenders_take_turns_and_a_broken_lock_is_caught() -> None:
    mutex = threading.Lock()
    tokens = itertools.count(1)
    fence = Fence()
    acquire_s, errors, elapsed_s = run_contenders(
        [_mutex_holder(mutex, tokens) for _ in range(3)], 0.2, fence)
    assert errors == [] and len(acquire_s) > 10 and elapsed_s >= 0.2
    assert lock_figures(acquire_s, elapsed_s, fence)["tokens_increasing"] is True
    assert fence.overlaps == 0

    # Planted: a "lock" that excludes no one and hands out one token to everybody.
    barrier = threading.Barrier(2, timeout=0.5)

    def together() -> None:
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            pass  # the other contender's time is up: alone from here

    @contextmanager
    def broken() -> Iterator[int]:
        together()  # both contenders inside together, while both run
        yield 1
        together()

    fence = Fence()
    acquire_s, errors, elapsed_s = run_contenders([broken, broken], 0.1, fence)
    figures = lock_figures(acquire_s, elapsed_s, fence)
    assert figures["tokens_increasing"] is False and figures["stale_tokens"] > 0


def _watch(system: str, p50: float, p99: float, cpu: float | None) -> dict[str, Any]:
    return {"phase": "watch paced 50/s", "system": system, "kind": "watch", "ops": 100,
            "ops_per_s": 50.0, "p50_ms": p50, "p99_ms": p99, "max_ms": p99 + 1,
            "ack_p50_ms": p50 - 1, "ack_p99_ms": p99 - 1, "missing": 0, "errors": 0,
            "server_cpu_us_per_op": cpu}


def _lock(system: str, ops_per_s: float, cpu: float | None, increasing: bool = True,
          overlaps: int = 0) -> dict[str, Any]:
    return {"phase": "lock C=4", "system": system, "kind": "lock", "ops": int(ops_per_s),
            "ops_per_s": ops_per_s, "p50_ms": 5.0, "p99_ms": 9.0, "max_ms": 12.0,
            "tokens_increasing": increasing, "overlaps": overlaps, "errors": 0,
            "server_cpu_us_per_op": cpu}


def test_compare_gives_latency_and_rate_ratios_side_by_side() -> None:
    records = [_watch(ETCD, 2.0, 4.0, 400.0), _watch(RINGKV, 30.0, 50.0, 800.0),
               _lock(ETCD, 300.0, 3000.0), _lock(RINGKV, 150.0, None)]
    ratios, lines = compare(records)
    assert len(ratios) == len(lines) == 2
    watch, lock = ratios
    assert (watch["p50_ms_ratio"], watch["p99_ms_ratio"], watch["cpu_ratio"]) == (15.0, 12.5, 0.5)
    assert lock["ops_ratio"] == 0.5 and "cpu_ratio" not in lock  # ringkv's CPU unmeasured
    assert "p50 30.0 vs 2.0 ms (15.00x)" in lines[0] and "ops per CPU-second 0.50x" in lines[0]
    assert "acquisitions/s 150.0 vs 300.0 (0.50x)" in lines[1]


def test_no_comparison_for_a_system_alone() -> None:
    assert compare([_watch(RINGKV, 30.0, 50.0, 800.0), _lock(RINGKV, 100.0, 9.0)]) == ([], [])


def test_the_table_flags_a_lock_that_failed_its_checks() -> None:
    table = format_table([_watch(RINGKV, 30.0, 50.0, 800.0), _lock(RINGKV, 100.0, 9.0),
                          _lock(ETCD, 100.0, None, increasing=False, overlaps=2)])
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["phase", "system", "ops"]
    assert "missing 0" in lines[1] and "after ack p50 29.00" in lines[1]
    assert lines[2].endswith("tokens increasing")
    assert "TOKENS NOT INCREASING, 2 OVERLAPS" in lines[3]
    assert format_row(_lock(ETCD, 1.0, None)).split()[8] == "-"  # CPU not measured


def test_prefix_range_end_covers_exactly_the_prefix() -> None:
    assert prefix_range_end(b"watch0/") == b"watch00"
    assert prefix_range_end(b"a\xff") == b"b"
    assert prefix_range_end(b"\xff\xff") == b"\x00"  # etcd: every key


def test_the_bench_measures_watches_and_locks_for_real(tmp_path: Path) -> None:
    etcd = find_etcd(None)
    out = tmp_path / "coordination.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp_path)}
    args = ["--watch-events", "10", "--burst-events", "10", "--lock-duration", "0.5",
            "--contenders", "2", "--ranges", "1", "--out", str(out)]
    if etcd is None:
        args += ["--etcd-bin", str(tmp_path / "no-etcd")]  # ringkv alone, saying why
    proc = subprocess.run([sys.executable, "-m", "bench", "coordination", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    systems = [RINGKV] if etcd is None else [ETCD, RINGKV]
    phases = {(r["phase"], r["system"]): r for r in report["results"]}
    assert set(phases) == {(phase, system) for system in systems
                           for phase in ("watch paced 50/s", "watch burst", "lock C=2")}
    for key, r in phases.items():
        assert r["errors"] == 0 and r["ops"] > 0 and r["ops_per_s"] > 0, (key, r)
        assert 0 < r["p50_ms"] <= r["p99_ms"] <= r["max_ms"], (key, r)
        assert r["server_cpu_us_per_op"] is not None, (key, r)
        if r["kind"] == "watch":
            assert r["ops"] == 10 and r["missing"] == 0, (key, r)
        else:
            assert r["tokens_increasing"] is True and r["overlaps"] == 0, (key, r)
    if etcd is None:
        assert report["etcd_skipped"] and "etcd phases are skipped" in proc.stdout
        assert report["ratios"] == []
    else:
        assert report["etcd"]["version"].startswith("3.")
        assert len(report["ratios"]) == 3
    assert [p.name for p in tmp_path.iterdir()] == ["coordination.json"]  # nothing left
