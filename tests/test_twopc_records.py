"""A group's two-phase commit records on a replica (txn/twopc_records.py).

Spanner §4.1.3: a replica's safe time is min(t_Paxos, t_TM), where t_TM is one
below the least prepare timestamp of a transaction prepared here and not yet
decided; the records outlive the log's compaction (a new leader recovers from
them), come back after a restart, and finished ones go after their TTL.
"""

from __future__ import annotations

from ringkv.storage.memory import MemoryEngine
from ringkv.txn.twopc_messages import DecisionRecord, OutcomeRecord, PreparedRecord
from ringkv.txn.twopc_records import COORDINATOR, PARTICIPANT, TwoPCRecords, group_bounds

W = ((b"k", b"v"),)


def test_prepared_transactions_hold_safe_time_until_their_outcome_spanner_4_1_3() -> None:
    records = TwoPCRecords(MemoryEngine(), "ks/1", finished_ttl_s=10.0)
    assert records.safe_time_bound() is None
    records.note(5, PreparedRecord("a", "ks/2", (1, "a"), 300, W), now_s=0.0)
    records.note(6, PreparedRecord("b", "ks/2", (2, "b"), 200, W), now_s=0.0)
    assert records.safe_time_bound() == 199
    records.note(7, OutcomeRecord("b", True, 400, W), now_s=1.0)
    assert records.safe_time_bound() == 299
    records.note(8, OutcomeRecord("a", False, 0, ()), now_s=1.0)
    assert records.safe_time_bound() is None
    assert records.prepared() == {}


def test_records_come_back_after_a_restart_in_log_order() -> None:
    engine = MemoryEngine()
    records = TwoPCRecords(engine, "ks/1")
    records.note(9, DecisionRecord("x", True, 50, ("ks/1", "ks/2")), now_s=0.0)
    records.note(4, PreparedRecord("y", "ks/2", (1, "y"), 30, W), now_s=0.0)
    again = TwoPCRecords(engine, "ks/1")
    assert again.load(now_s=0.0) == 0
    assert [r.txn_id for r in again.records(COORDINATOR)] == ["x"]
    assert [r.txn_id for r in again.records(PARTICIPANT)] == ["y"]
    assert again.safe_time_bound() == 29
    # Another group's records are not this one's.
    assert TwoPCRecords(engine, "ks/2").load(now_s=0.0) == 0
    assert len(TwoPCRecords(engine, "ks/2")) == 0


def test_finished_records_expire_after_their_ttl_and_undecided_ones_never() -> None:
    engine = MemoryEngine()
    records = TwoPCRecords(engine, "ks/1", finished_ttl_s=10.0)
    records.note(1, PreparedRecord("p", "ks/2", (1, "p"), 10, W), now_s=0.0)
    records.note(2, DecisionRecord("d", False, 0, ("ks/1",)), now_s=0.0)
    records.note(3, PreparedRecord("o", "ks/2", (1, "o"), 11, W), now_s=0.0)
    records.note(4, OutcomeRecord("o", True, 20, W), now_s=5.0)
    assert records.expire(now_s=9.9) == 0
    assert records.expire(now_s=10.0) == 1  # the decision, finished at 0
    assert records.expire(now_s=15.0) == 1  # the outcome, finished at 5
    assert records.expire(now_s=1_000.0) == 0  # a prepared transaction stays
    assert len(records) == 1 and records.safe_time_bound() == 9
    lo, hi = group_bounds("ks/1")
    assert len(list(engine.scan(lo, hi))) == 1


def test_clear_forgets_everything_before_a_snapshot_install() -> None:
    engine = MemoryEngine()
    records = TwoPCRecords(engine, "ks/1")
    records.note(1, PreparedRecord("p", "ks/2", (1, "p"), 10, W), now_s=0.0)
    records.clear()
    assert records.safe_time_bound() is None and len(records) == 0
    lo, hi = group_bounds("ks/1")
    assert list(engine.scan(lo, hi)) == []
