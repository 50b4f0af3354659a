"""Elle's list-append workload on three node processes
(ringkv/chaos/txn_list_append.py): transactions that append unique values to
lists in different ranges, guarded by version conditions, and read others,
while group leaders are SIGKILLed and SIGSTOPped.

Spanner §4.2 (two-phase commit over Paxos groups, commit wait) makes
transactions strictly serializable: the history has no G0, G1a, G1b, G1c,
G-single or G2 cycle even with real-time edges (Adya 1999; Elle, VLDB 2020;
issue #13 §3). The checker is shown to catch doctored reads of the very
history the run produced, and (make soak) a real run whose appends drop their
conditions.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path

import pytest

from ringkv.chaos.txn_list_append import (
    HISTORY_FILE,
    ListAppendReport,
    TxnListAppendRun,
    judge,
)
from ringkv.chaos.txn_run import FAULT_KINDS, schedule
from ringkv.sim.list_append import APPEND, FAIL, OK, READ, Txn

SEED = 2
DURATION_S = 16.0  # two faults, both kinds (SIGSTOP at 3 s, SIGKILL at 10 s): about 27 s in all
RANGES = 4


def test_the_schedule_has_both_faults() -> None:
    assert {f.kind for f in schedule(SEED, DURATION_S)} == set(FAULT_KINDS)


@pytest.fixture(scope="module")
def list_append_run(tmp_path_factory: pytest.TempPathFactory) -> ListAppendReport:
    """One run, shared by the test that judges it and the one that doctors it."""
    run = TxnListAppendRun(tmp_path_factory.mktemp("txn-list-append"), seed=SEED,
                           duration_s=DURATION_S, clients=6, ranges=RANGES)
    try:
        return asyncio.run(run.run())
    finally:
        assert all(p.proc is None or p.proc.poll() is not None for p in run.procs), \
            "left running"


@pytest.mark.cluster
@pytest.mark.timeout(240)
def test_appends_across_ranges_are_strictly_serializable_under_leader_faults(
        list_append_run: ListAppendReport) -> None:
    report = list_append_run
    summary = report.summary()
    print(summary)
    assert {fault.kind for fault, _, _ in report.faults} == set(FAULT_KINDS), summary
    assert len(report.fault_groups) == len(report.faults) >= 2, summary
    counts = report.counts()
    assert counts["append ok"] > 100 and counts["read ok"] > 100, summary  # real work
    assert counts["append ok across ranges"] > 50, summary  # two-phase commits
    assert counts["read ok across ranges"] > 50, summary  # snapshots over several groups
    assert all(report.analysis.edges.get(kind, 0) > 0 for kind in ("ww", "wr", "rw", "rt"))
    assert report.ok, summary
    events = json.loads((report.run_dir / HISTORY_FILE).read_text())
    assert len(events) == 2 * len(report.txns) and {e["f"] for e in events} == {"txn"}


def _doctor(txns: list[Txn], target: Txn, key: str, values: list[object]) -> list[Txn]:
    """``txns`` with ``target``'s read of ``key`` replaced by ``values``."""
    ops = tuple((f, k, list(values)) if f == READ and k == key else (f, k, v)
                for f, k, v in target.ops)
    return [dataclasses.replace(t, ops=ops) if t.id == target.id else t for t in txns]


@pytest.mark.cluster
@pytest.mark.timeout(240)
def test_the_checker_catches_doctored_reads_of_that_history(
        list_append_run: ListAppendReport) -> None:
    """Negative control on the run's own history: the final read made to show a failed
    transaction's append (an aborted read), to skip an element others saw, or to
    lose its last element."""
    report = list_append_run
    txns = list(report.txns)
    final = next(t for t in txns if t.process == "final" and t.status == OK)
    lists = {k: list(v) for f, k, v in final.ops if isinstance(v, list)}
    failed = next((t, k, v) for t in txns if t.status == FAIL
                  for f, k, v in t.ops if f == APPEND)
    _, key, value = failed
    _, verdicts = judge(_doctor(txns, final, key, [*lists[key], value]), report.keys)
    assert not verdicts[0].ok and "G1a" in verdicts[0].summary, verdicts[0].render()

    key = max(lists, key=lambda k: len(lists[k]))
    assert len(lists[key]) >= 3
    skipped = [*lists[key][:1], *lists[key][2:]]
    _, verdicts = judge(_doctor(txns, final, key, skipped), report.keys)
    assert not verdicts[0].ok and "incompatible-order" in verdicts[0].summary, \
        verdicts[0].render()
    # The last append to a list lost: a prefix, so no order disagrees; the final read
    # against the acknowledged appends names it.
    _, verdicts = judge(_doctor(txns, final, key, lists[key][:-1]), report.keys)
    assert not verdicts[1].ok and repr(lists[key][-1]) in verdicts[1].excerpt[0], \
        verdicts[1].render()
    assert all(v.ok for v in judge(txns, report.keys)[1])  # the real one passes


@pytest.mark.cluster
@pytest.mark.soak
@pytest.mark.timeout(300)
def test_unguarded_appends_are_caught(tmp_path: Path) -> None:
    """The real negative control: appends without their version conditions overwrite
    each other's lists, and the reads disagree."""
    run = TxnListAppendRun(tmp_path, seed=SEED, duration_s=DURATION_S, clients=6,
                           ranges=RANGES, unguarded=True)
    try:
        report = asyncio.run(run.run())
    finally:
        assert all(p.proc is None or p.proc.poll() is not None for p in run.procs)
    print(report.summary())
    assert not report.verdicts[0].ok, report.summary()
