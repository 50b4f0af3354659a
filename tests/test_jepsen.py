"""A Jepsen-style run against real processes (ringkv/chaos/run.py): 3 nodes on
127.0.0.1-3 behind fault proxies, 8 QUORUM clients, 30 s of faults (cut links,
one-way cuts, an isolated node, delays, connection resets, SIGKILL + restart,
SIGSTOP + SIGCONT), then heal, a quiet period and final reads.

Dynamo §4.5 with R + W > N: no acknowledged QUORUM write may be lost and no
QUORUM read may return less than a write acknowledged before it began. The
history is judged by the simulator's checkers (ringkv/sim/checkers.py)."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import pytest

from ringkv.chaos.run import FAULT_KINDS, ChaosRun, schedule
from ringkv.sim.history import OK

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


@pytest.mark.cluster
@pytest.mark.timeout(400)
def test_no_lost_or_stale_quorum_operations_under_faults(tmp_path: Path) -> None:
    # A short quiet period: the final reads at ALL repair every replica before the
    # replicas are compared (blocking read repair), so no check waits on hint replay.
    chaos = ChaosRun(tmp_path, seed=SEED, duration_s=30.0, clients=8, quiet_s=1.0)
    try:
        report = asyncio.run(chaos.run())
    finally:
        procs = chaos.cluster.procs if chaos.cluster is not None else []
        assert all(p.proc is None or p.proc.poll() is not None for p in procs), "left running"
    summary = report.summary()
    print(summary)
    assert Counter(f.kind for f in report.faults) == Counter(FAULT_KINDS), summary
    outcomes = Counter((op.kind, op.status) for op in report.history if not op.final)
    assert outcomes["write", OK] > 0 and outcomes["read", OK] > 0, summary
    # The simulator's checkers judge the history (ringkv/sim/checkers.py).
    assert report.verdict("lost acknowledged writes").ok, summary
    assert report.verdict("stale reads").ok, summary
    assert report.ok, summary
