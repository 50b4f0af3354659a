"""The bank checker: cross-range transfers conserve money (Jepsen's bank workload).

Under snapshot isolation or stronger (Adya's PL-SI and PL-3, "Weak Consistency",
1999; Spanner §4.1 for snapshot reads), a read-only snapshot sees each transfer
whole or not at all, so every snapshot of all accounts sums to the starting total,
and no balance goes negative. A clean history passes; a snapshot that sees half a
transfer (Adya's read skew, G-single) and a negative balance are caught.
"""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from ringkv.sim.bank import FAIL, INFO, OK, Snapshot, Transfer, check

INITIAL = {"a": 10, "b": 10, "c": 10}


def serial_bank(rng: random.Random) -> tuple[list[Transfer], list[Snapshot]]:
    """Transfers applied one at a time; each snapshot reads a state between them."""
    balances = dict(INITIAL)
    transfers: list[Transfer] = []
    snapshots: list[Snapshot] = []
    t = 0.0
    for i in range(400):
        t += 1.0
        if rng.random() < 0.6:
            src, dst = rng.sample(sorted(balances), 2)
            amount = rng.randint(1, 5)
            status = rng.choice((OK, OK, OK, FAIL, INFO))
            if balances[src] < amount:
                status = FAIL  # would overdraw: aborted
            if status == OK or (status == INFO and rng.random() < 0.5):
                balances[src] -= amount
                balances[dst] += amount
            transfers.append(Transfer(i, f"c{i % 4}", src, dst, amount, status, t - 0.5,
                                      None if status == INFO else t + 0.5))
        else:
            snapshots.append(Snapshot(i, f"c{i % 4}", dict(balances), OK, t - 0.5, t + 0.5))
    return transfers, snapshots


def test_a_serial_bank_history_passes() -> None:
    transfers, snapshots = serial_bank(random.Random(3))
    assert len(snapshots) > 100
    assert check(INITIAL, transfers, snapshots) == []


def test_half_transfers_planted_in_random_histories_are_caught() -> None:
    """Mutation: one snapshot in each history sees only the debit of a transfer."""
    for seed in range(40):
        rng = random.Random(seed)
        transfers, snapshots = serial_bank(rng)
        victim = rng.randrange(len(snapshots))
        balances = dict(snapshots[victim].balances)
        account = rng.choice(sorted(balances))
        balances[account] -= rng.randint(1, 5)
        planted = replace(snapshots[victim], balances=balances)
        snapshots[victim] = planted
        found = check(INITIAL, transfers, snapshots)
        assert [x.index for x in found if x.kind == "wrong-total"] == [planted.index], seed


def test_a_snapshot_that_sees_half_a_transfer_is_caught() -> None:
    """Read skew: the debit of a -> b is seen, the credit is not."""
    move = Transfer(1, "c1", "a", "b", 4, OK, 1.0, 2.0)
    half = Snapshot(2, "c2", {"a": 6, "b": 10, "c": 10}, OK, 1.5, 1.8)
    whole = Snapshot(3, "c3", {"a": 6, "b": 14, "c": 10}, OK, 3.0, 3.1)
    found = check(INITIAL, [move], [half, whole])
    assert [(x.kind, x.index) for x in found] == [("wrong-total", 2)]
    text = found[0].render()
    assert "sum to 26, not 30 (-4)" in text
    assert "transfer 4 a -> b" in text  # the overlapping transfer is named


def test_a_negative_balance_is_caught() -> None:
    """Two transfers that each fit but together overdraw a (a lost update)."""
    moves = [Transfer(1, "c1", "a", "b", 8, OK, 0.0, 1.0),
             Transfer(2, "c2", "a", "c", 8, OK, 0.0, 1.0)]
    snap = Snapshot(3, "c3", {"a": -6, "b": 18, "c": 18}, OK, 2.0, 2.5)
    found = check(INITIAL, moves, [snap])
    assert [x.kind for x in found] == ["negative-balance"]
    assert "a = -6" in found[0].detail


def test_a_subset_is_judged_on_its_sum_only_where_its_total_is_known() -> None:
    subset = Snapshot(1, "c1", {"a": 12, "b": 5}, OK, 0.0, 1.0)
    assert check(INITIAL, [], [subset]) == []  # total unknown: signs only
    known = Snapshot(2, "c1", {"a": 12, "b": 5}, OK, 0.0, 1.0, total=20)
    assert [x.kind for x in check(INITIAL, [], [known])] == ["wrong-total"]
    negative = Snapshot(3, "c1", {"a": -1}, OK, 0.0, 1.0)
    assert [x.kind for x in check(INITIAL, [], [negative])] == ["negative-balance"]


def test_snapshots_without_an_answer_and_unknown_accounts() -> None:
    failed = Snapshot(1, "c1", {}, FAIL, 0.0, 1.0)
    pending = Snapshot(2, "c1", {}, INFO, 0.0)
    stray = Snapshot(3, "c1", {"a": 10, "b": 10, "c": 10, "z": 0}, OK, 0.0, 1.0)
    assert [x.kind for x in check(INITIAL, [], [failed, pending, stray])] == ["unknown-account"]


def test_malformed_transfers_are_refused() -> None:
    with pytest.raises(ValueError, match="between"):
        check(INITIAL, [Transfer(1, "c1", "a", "a", 1, OK, 0.0, 1.0)], [])
    with pytest.raises(ValueError, match="of 0"):
        check(INITIAL, [Transfer(1, "c1", "a", "b", 0, OK, 0.0, 1.0)], [])
