"""The Jepsen-style run of the transactional tier (ringkv/chaos/txn_run.py): three
node processes, compare-and-set increments on a few counters through random
replicas, while the range's leader is SIGKILLed and SIGSTOPped.

Spanner §4.1 (leader leases, disjoint; commits only inside the lease) and
Paxos Made Simple §2 (a chosen value stays chosen): no acknowledged increment
is lost or applied twice, whatever the leader changes, and the history of
reads and CASes is linearizable (issue #11 §7).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import pytest

from ringkv.chaos.txn_run import FAULT_KINDS, TxnChaosRun, judge_counters, schedule
from ringkv.sim.linearizability import RegisterOp, linearizable

SEED = 1
# make test: two faults, one of each kind (SIGSTOP at 3 s, SIGKILL at 10 s), as the
# bank and list-append runs; make soak: four, each kind twice, so a leader elected
# after a fault is itself killed or paused.
DURATION_S = 16.0
SOAK_DURATION_S = 30.0


def test_the_schedule_alternates_leader_faults_within_the_run() -> None:
    assert [f.kind for f in schedule(SEED, DURATION_S)] == ["pause-leader", "kill-leader"]
    for seed in range(10):
        faults = schedule(seed, SOAK_DURATION_S)
        assert len(faults) >= 3 and set(Counter(f.kind for f in faults)) == set(FAULT_KINDS)
        for fault, following in zip(faults, faults[1:]):
            assert fault.at_s + fault.hold_s < following.at_s and fault.kind != following.kind
        assert faults[-1].at_s + faults[-1].hold_s <= SOAK_DURATION_S - 1.0
    assert schedule(4, 60.0) == schedule(4, 60.0)


@pytest.mark.parametrize("final, ok", [
    (5, True),    # every acknowledged increment, no unknown one landed
    (7, True),    # two of the three unknown ones landed
    (4, False),   # an acknowledged increment is lost
    (9, False),   # more than acknowledged + unknown: an increment applied twice
    (None, False),  # the counter could not be read at the end
])
def test_counter_check(final: int | None, ok: bool) -> None:
    verdict = judge_counters({"c": 5}, {"c": 3}, {"c": final})
    assert verdict.ok is ok, verdict.render()


def test_a_lost_update_is_not_linearizable() -> None:
    """What the negative control (--fault blind-increments) produces: two
    increments from 0 both acknowledged."""
    history = [
        RegisterOp("setup", "cas", "c", 0, 0.0, 0.1, expected=None, ok=True),
        RegisterOp("a", "read", "c", 0, 0.2, 0.3),
        RegisterOp("b", "read", "c", 0, 0.2, 0.3),
        RegisterOp("a", "cas", "c", 1, 0.4, 0.5, expected=0, ok=True),
        RegisterOp("b", "cas", "c", 1, 0.6, 0.7, expected=0, ok=True),
    ]
    assert not linearizable(history).ok
    assert linearizable(history[:4]).ok


@pytest.mark.cluster
@pytest.mark.timeout(240)
@pytest.mark.parametrize("duration_s", [
    pytest.param(DURATION_S, id="each-kind-once"),
    pytest.param(SOAK_DURATION_S, id="each-kind-twice", marks=pytest.mark.soak),
])
def test_cas_counters_survive_leader_kills_and_pauses(tmp_path: Path, duration_s: float) -> None:
    chaos = TxnChaosRun(tmp_path, seed=SEED, duration_s=duration_s, clients=6, counters=3)
    try:
        report = asyncio.run(chaos.run())
    finally:
        assert all(p.proc is None or p.proc.poll() is not None for p in chaos.procs), \
            "left running"
    summary = report.summary()
    print(summary)
    assert {fault.kind for fault, _, _ in report.faults} == set(FAULT_KINDS), summary
    assert sum(report.acked.values()) > 100, summary  # the run did real work
    assert report.ok, summary
