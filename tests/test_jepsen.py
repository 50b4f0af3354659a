"""A Jepsen-style run against real processes (ringkv/chaos/run.py): 3 nodes on
127.0.0.1-3 behind fault proxies, 8 QUORUM clients, 45 s of faults (cut links,
one-way cuts, an isolated node, delays, connection resets, SIGKILL + restart,
SIGSTOP + SIGCONT), then heal, a quiet period and final reads.

Dynamo §4.5 with R + W > N: no acknowledged QUORUM write may be lost and no
QUORUM read may return less than a write acknowledged before it began."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import pytest

from ringkv.chaos.run import (
    FAULT_KINDS,
    FAIL,
    INFO,
    OK,
    ChaosRun,
    Op,
    check,
    schedule,
)

SEED = 3


def test_the_schedule_runs_every_fault_kind_one_at_a_time_within_the_run() -> None:
    for seed in range(20):
        faults = schedule(seed, 45.0)
        assert Counter(f.kind for f in faults) == Counter(FAULT_KINDS)
        for fault, following in zip(faults, faults[1:]):
            assert fault.at_s + fault.hold_s < following.at_s
        assert faults[-1].at_s + faults[-1].hold_s <= 44.0
    assert schedule(7, 300.0) == schedule(7, 300.0)
    counts = Counter(f.kind for f in schedule(7, 300.0))
    assert set(counts) == set(FAULT_KINDS)
    assert max(counts.values()) - min(counts.values()) <= 1  # whole rounds before repeats


def w(key: str, value: str, start: float, end: float, ts: int | None, status: str = OK) -> Op:
    return Op(0, "c0", "write", key, value, start, end, status, "n1", "QUORUM",
              ts=None if ts is None else (ts, 0))


def r(key: str, value: str | None, start: float, end: float, ts: int | None,
      final: bool = False) -> Op:
    return Op(0, "final" if final else "c1", "read", key, value, start, end, OK, "n1", "QUORUM",
              final=final, ts=None if ts is None else (ts, 0))


def test_check_finds_lost_stale_and_phantom_reads_and_diverged_replicas() -> None:
    history = [
        w("a", "a1", 0, 1, 10),
        w("a", "a2", 2, 3, 20),
        r("a", "a1", 4, 5, 10),  # stale: a2 was acknowledged before it began
        r("a", "a2", 2.5, 5, 20),
        w("a", "a3", 6, 30, None, INFO),
        r("a", "a3", 7, 8, 30),  # an indeterminate write may show up ...
        r("a", "a2", 9, 10, 20),  # ... but then a later read must not go back
        w("b", "b1", 0, 1, 30),
        r("b", "zz", 2, 3, 5),  # nobody wrote zz
        w("b", "b2", 0, 9, None, INFO),
        r("b", "b2", 10, 11, 40),  # an indeterminate write may show up
        w("c", "c1", 0, 1, None, FAIL),
        r("a", "a1", 20, 21, 10, final=True),  # final: a2 is lost
        r("b", "b2", 20, 21, 40, final=True),
    ]
    verdicts = check(history, {"a": {"n1": ["a1", [10, 0]], "n2": "not_found"},
                               "b": {"n1": ["b2", [40, 0]], "n2": ["b2", [40, 0]]}})
    assert [op.value for op in verdicts.lost] == ["a2"]
    # zz is older than b1 too; the final read of a is stale as well
    assert [op.value for op in verdicts.stale] == ["a1", "a2", "zz", "a1"]
    assert [op.value for op in verdicts.phantom] == ["zz"]
    assert verdicts.unchecked == ["c"]
    assert verdicts.diverged == ["a"]
    assert not verdicts.ok
    assert check([w("a", "a1", 0, 1, 10), r("a", "a1", 2, 3, 10, final=True)]).ok


@pytest.mark.cluster
@pytest.mark.timeout(400)
def test_no_lost_or_stale_quorum_operations_under_faults(tmp_path: Path) -> None:
    chaos = ChaosRun(tmp_path, seed=SEED, duration_s=45.0, clients=8, quiet_s=5.0)
    try:
        report = asyncio.run(chaos.run())
    finally:
        procs = chaos.cluster.procs if chaos.cluster is not None else []
        assert all(p.proc is None or p.proc.poll() is not None for p in procs), "left running"
    summary = report.summary()
    print(summary)
    assert Counter(f.kind for f in report.faults) == Counter(FAULT_KINDS), summary
    outcomes = Counter((op.kind, op.status) for op in report.history)
    assert outcomes["write", OK] > 0 and outcomes["read", OK] > 0, summary
    assert report.verdicts.lost == [], summary
    assert report.verdicts.stale == [], summary
    assert report.verdicts.phantom == [], summary
    assert report.verdicts.unchecked == [], summary
    assert report.verdicts.diverged == [], summary
