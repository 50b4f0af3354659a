"""Jepsen's bank workload on three node processes (ringkv/chaos/txn_bank.py):
transfers between accounts in different ranges, each a two-phase commit over
the ranges' Paxos groups, and read-only audits of every account, while group
leaders are SIGKILLed and SIGSTOPped.

Spanner §4.2.1 (a transaction commits in every range or in none) and §4.1.4
(a read-only transaction at TT.now().latest sees a consistent cut): every
audit sums to the starting total and no balance is negative (issue #13 §3).
The checker is shown to catch a doctored read of the very history the run
produced, and (make soak) a real run whose transfers drop their conditions.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path

import pytest

from ringkv.chaos.txn_bank import (
    HISTORY_FILE,
    BankReport,
    TxnBankRun,
    full_snapshots,
    judge,
)
from ringkv.chaos.txn_run import (
    FAULT_KINDS,
    judge_version_conditions,
    keys_across_ranges,
    schedule,
)
from ringkv.ring import token_for
from ringkv.sim.bank import OK
from ringkv.txn.ranges import slice_of

SEED = 1
DURATION_S = 16.0  # two faults, both kinds (SIGSTOP at 3 s, SIGKILL at 10 s): about 27 s in all
RANGES = 4


def test_accounts_fill_every_range() -> None:
    accounts = keys_across_ranges("acct", RANGES, 2)
    assert len(set(accounts)) == 2 * RANGES
    slices = [slice_of(token_for(a.encode()), RANGES) for a in accounts]
    assert sorted(slices) == sorted(list(range(RANGES)) * 2)
    assert {f.kind for f in schedule(SEED, DURATION_S)} == set(FAULT_KINDS)


def _transfer(txn_id: str, status: str, *versions: tuple[str, int]) -> dict[str, object]:
    return {"txn_id": txn_id, "status": status,
            "conditions": [{"key": key, "version": v} for key, v in versions]}


def test_two_committed_transfers_over_one_version_are_a_lost_update() -> None:
    ok = judge_version_conditions([_transfer("t1", "ok", ("a", 10), ("b", 11)),
                           _transfer("t2", "ok", ("a", 12), ("b", 11 + 1)),
                           _transfer("t3", "fail", ("a", 10), ("c", 5)),
                           _transfer("t4", "info", ("a", 10), ("c", 5))], "transfer")
    assert ok.ok, ok.render()
    lost = judge_version_conditions([_transfer("t1", "ok", ("a", 10), ("b", 11)),
                                     _transfer("t2", "ok", ("a", 10), ("c", 5))], "transfer")
    assert not lost.ok and lost.count == 1 and "a version 10: t1" in lost.excerpt[0], \
        lost.render()


@pytest.fixture(scope="module")
def bank_run(tmp_path_factory: pytest.TempPathFactory) -> BankReport:
    """One run, shared by the test that judges it and the one that doctors it."""
    run = TxnBankRun(tmp_path_factory.mktemp("txn-bank"), seed=SEED, duration_s=DURATION_S,
                     clients=6, ranges=RANGES)
    try:
        return asyncio.run(run.run())
    finally:
        assert all(p.proc is None or p.proc.poll() is not None for p in run.procs), \
            "left running"


@pytest.mark.cluster
@pytest.mark.timeout(240)
def test_transfers_across_ranges_keep_the_total_under_leader_faults(bank_run: BankReport) -> None:
    report = bank_run
    summary = report.summary()
    print(summary)
    # The faults happened, each to a group's leader.
    assert {fault.kind for fault, _, _ in report.faults} == set(FAULT_KINDS), summary
    assert len(report.fault_groups) == len(report.faults) >= 2, summary
    counts = report.counts()
    assert counts["transfer ok"] > 100 and counts["audit ok"] > 50, summary  # real work
    assert counts["transfer ok across ranges"] > 50, summary  # two-phase commits
    assert report.ok, summary
    # The Jepsen history: an invocation and a completion for every operation.
    events = json.loads((report.run_dir / HISTORY_FILE).read_text())
    assert len(events) == 2 * (len(report.transfers) + len(report.snapshots))
    assert {e["f"] for e in events} == {"transfer", "read"}


@pytest.mark.cluster
@pytest.mark.timeout(240)
def test_the_checker_catches_a_doctored_read_of_that_history(bank_run: BankReport) -> None:
    """Negative control on the run's own history: one audit that saw a unit more, and
    one two-account read that saw an overdraft, are each caught."""
    report = bank_run
    snapshots = list(report.snapshots)
    audit = full_snapshots(report.initial, snapshots)[len(snapshots) // 100]
    at = snapshots.index(audit)
    account = sorted(audit.balances)[0]
    more = dict(audit.balances, **{account: audit.balances[account] + 1})
    doctored = [*snapshots[:at], dataclasses.replace(audit, balances=more), *snapshots[at + 1:]]
    verdicts = judge(report.initial, report.transfers, doctored)
    assert not verdicts[0].ok and "wrong-total" in "\n".join(verdicts[0].excerpt), verdicts[0]

    pair = next(s for s in snapshots if s.status == OK and len(s.balances) == 2)
    at = snapshots.index(pair)
    account = sorted(pair.balances)[0]
    overdrawn = dict(pair.balances, **{account: -1})
    doctored = [*snapshots[:at], dataclasses.replace(pair, balances=overdrawn),
                *snapshots[at + 1:]]
    verdicts = judge(report.initial, report.transfers, doctored)
    assert not verdicts[0].ok and "negative-balance" in "\n".join(verdicts[0].excerpt)
    assert judge(report.initial, report.transfers, snapshots)[0].ok  # the real one passes


@pytest.mark.cluster
@pytest.mark.soak
@pytest.mark.timeout(300)
def test_unguarded_transfers_are_caught(tmp_path: Path) -> None:
    """The real negative control: transfers without their version conditions lose
    updates, and the audits see money made or destroyed."""
    run = TxnBankRun(tmp_path, seed=SEED, duration_s=DURATION_S, clients=6, ranges=RANGES,
                     unguarded=True)
    try:
        report = asyncio.run(run.run())
    finally:
        assert all(p.proc is None or p.proc.poll() is not None for p in run.procs)
    print(report.summary())
    assert not report.verdicts[0].ok, report.summary()
