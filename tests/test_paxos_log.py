"""A group's durable Paxos state (ringkv/txn/paxos_log.py).

What a replica persisted comes back exactly as ``PersistedState`` folds the
same records ("Paxos Made Simple" §2.3: an acceptor remembers its promise and
what it accepted across failures), on the memory engine and on LevelDB; a
crash keeps exactly what was synced; compaction deletes the slots at and
below the snapshot and keeps the promise an accept raised; a damaged record
is refused on load.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ringkv.errors import CorruptRecord
from ringkv.storage.leveldb import LevelDBEngine
from ringkv.storage.memory import MemoryEngine
from ringkv.txn.paxos import (
    AcceptRecord,
    Ballot,
    ChosenRecord,
    Entry,
    PersistedState,
    PromiseRecord,
    Record,
    Snapshot,
    SnapshotRecord,
)
from ringkv.txn.paxos_log import PaxosLog, group_prefix

B1, B2, B3 = Ballot(1, "a"), Ballot(2, "b"), Ballot(3, "a")
E = [Entry(f"v{i}".encode(), 100 + i) for i in range(20)]


def fold(records: list[Record]) -> PersistedState:
    state = PersistedState()
    state.apply(records)
    return state


def fresh(engine: MemoryEngine | LevelDBEngine, group_id: str = "ks/1") -> PaxosLog:
    log = PaxosLog(engine, group_id)
    log.load()
    return log


HISTORY: list[list[Record]] = [
    [PromiseRecord(B1)],
    [AcceptRecord(1, B1, E[1]), AcceptRecord(2, B1, E[2])],
    [ChosenRecord(1, E[1]), ChosenRecord(2, E[2])],
    [AcceptRecord(3, B2, E[3])],  # raises the promise without a PromiseRecord
    [PromiseRecord(B3), AcceptRecord(3, B3, E[4]), ChosenRecord(3, E[4])],
    [SnapshotRecord(Snapshot("a", 2, 102))],
    [AcceptRecord(4, B3, E[5]), AcceptRecord(1, B3, E[6])],  # slot 1 is below the snapshot: dropped
    # Membership persists with the log: a configuration entry, then a snapshot naming it.
    [AcceptRecord(5, B3, Entry(b"", 0, noop=True, members=("a", "b", "d"))),
     ChosenRecord(5, Entry(b"", 0, noop=True, members=("a", "b", "d")))],
    [SnapshotRecord(Snapshot("a", 5, 105, ("a", "b", "d")))],
]


@pytest.fixture(params=["memory", "leveldb"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MemoryEngine | LevelDBEngine]:
    eng: MemoryEngine | LevelDBEngine = MemoryEngine() if request.param == "memory" else LevelDBEngine(tmp_path / "db")
    yield eng
    eng.close()


def test_records_round_trip_as_their_fold(engine: MemoryEngine | LevelDBEngine) -> None:
    """PMS §2.3: what was persisted is what restore sees, batch by batch."""
    log = fresh(engine)
    done: list[Record] = []
    for batch in HISTORY:
        log.persist(batch)
        done += batch
        assert PaxosLog(engine, "ks/1").load().state == fold(done), batch


def test_leveldb_reopened_keeps_the_log(tmp_path: Path) -> None:
    engine = LevelDBEngine(tmp_path / "db")
    log = fresh(engine)
    for batch in HISTORY:
        log.persist(batch)
    log.set_applied(3)
    engine.close()
    reopened = LevelDBEngine(tmp_path / "db")
    try:
        loaded = PaxosLog(reopened, "ks/1").load()
        assert loaded.state == fold([r for batch in HISTORY for r in batch])
        assert loaded.applied_through == 3
    finally:
        reopened.close()


def test_a_crash_keeps_exactly_what_was_synced() -> None:
    """Persist before reply: every batch is fsynced; the unsynced applied marker
    written after it is lost by a crash, the records are not."""
    engine = MemoryEngine()
    log = fresh(engine)
    log.persist(HISTORY[0] + HISTORY[1])
    log.set_applied(1)  # unsynced
    engine.crash()
    loaded = PaxosLog(engine, "ks/1").load()
    assert loaded.state == fold(HISTORY[0] + HISTORY[1])
    assert loaded.applied_through == 0
    # The next synced batch makes an earlier unsynced marker durable too (one log, in order).
    log = PaxosLog(engine, "ks/1")
    log.load()
    log.set_applied(1)
    log.persist(HISTORY[2])
    engine.crash()
    assert PaxosLog(engine, "ks/1").load().applied_through == 1


def test_an_unsynced_persist_is_lost_by_a_crash() -> None:
    """The control for the test above: the crash model does lose what was not synced."""
    engine = MemoryEngine()
    log = fresh(engine)
    log.persist(HISTORY[0])
    log.persist(HISTORY[1], sync=False)
    engine.crash()
    assert PaxosLog(engine, "ks/1").load().state == fold(HISTORY[0])


def test_compaction_deletes_the_slots_at_and_below_the_snapshot(engine: MemoryEngine | LevelDBEngine) -> None:
    """Bounded log (issue #11 item 3): the snapshot stands for the slots it covers."""
    log = fresh(engine)
    log.persist([AcceptRecord(s, B1, E[s]) for s in range(1, 11)])
    log.persist([ChosenRecord(s, E[s]) for s in range(1, 11)])
    assert log.slots_on_disk() == 10
    log.persist([SnapshotRecord(Snapshot("a", 7, 107))])
    prefix = group_prefix("ks/1")
    slot_keys = [k for k, _ in engine.scan(prefix + b"A", prefix + b"D")]
    assert len(slot_keys) == 6  # slots 8-10, accepted and chosen
    assert log.slots_on_disk() == 3 and log.stats.deleted == 14
    loaded = PaxosLog(engine, "ks/1").load()
    assert sorted(loaded.state.accepted) == sorted(loaded.state.chosen) == [8, 9, 10]
    assert loaded.state.snapshot == Snapshot("a", 7, 107)
    # An older snapshot changes nothing.
    log.persist([SnapshotRecord(Snapshot("a", 5, 105))])
    assert PaxosLog(engine, "ks/1").load().state.snapshot == Snapshot("a", 7, 107)


def test_compaction_keeps_the_promise_an_accept_raised() -> None:
    """PMS §2.3: an acceptor never forgets its promise, even when the accept that
    raised it is compacted away."""
    engine = MemoryEngine()
    log = fresh(engine)
    log.persist([PromiseRecord(B1), AcceptRecord(1, B2, E[1]), ChosenRecord(1, E[1])])
    log.persist([SnapshotRecord(Snapshot("b", 1, 101))])
    loaded = PaxosLog(engine, "ks/1").load()
    assert loaded.state.accepted == {} and loaded.state.promised == B2


def test_groups_do_not_see_each_other() -> None:
    engine = MemoryEngine()
    one, other = fresh(engine, "ks/1"), fresh(engine, "ks/12")
    one.persist([AcceptRecord(1, B1, E[1])])
    other.persist([PromiseRecord(B2)])
    assert PaxosLog(engine, "ks/1").load().state == fold([AcceptRecord(1, B1, E[1])])
    assert PaxosLog(engine, "ks/12").load().state == fold([PromiseRecord(B2)])
    assert PaxosLog(engine, "ks/2").load().empty


def test_a_damaged_record_is_refused_on_load() -> None:
    engine = MemoryEngine()
    log = fresh(engine)
    log.persist([AcceptRecord(1, B1, E[1])])
    key, record = next(iter(engine.scan(group_prefix("ks/1"), None)))
    engine.write([(key, record[:-1] + bytes([record[-1] ^ 1]))], (), sync=True)
    with pytest.raises(CorruptRecord, match="checksum"):
        PaxosLog(engine, "ks/1").load()
    engine.write([(group_prefix("ks/1") + b"Z", record)], (), sync=True)
    engine.write([(key, record)], (), sync=True)
    with pytest.raises(CorruptRecord, match="unknown Paxos log key"):
        PaxosLog(engine, "ks/1").load()


def test_persist_needs_a_load_first() -> None:
    with pytest.raises(RuntimeError, match="load"):
        PaxosLog(MemoryEngine(), "ks/1").persist([PromiseRecord(B1)])


ballots = st.builds(Ballot, st.integers(0, 5), st.sampled_from(["a", "b", "c"]))
entries = st.builds(Entry, st.binary(max_size=4), st.integers(0, 1000), st.booleans())
small_slots = st.integers(1, 30)
records = st.one_of(
    st.builds(PromiseRecord, ballots),
    st.builds(AcceptRecord, small_slots, ballots, entries),
    st.builds(ChosenRecord, small_slots, entries),
    st.builds(SnapshotRecord, st.builds(Snapshot, st.just("a"), small_slots, st.integers(0, 1000))),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(records, max_size=6), max_size=8), st.integers(0, 8))
def test_any_history_loads_as_its_fold_and_a_crash_keeps_the_synced_part(
        batches: list[list[Record]], synced: int) -> None:
    """The log agrees with PersistedState.apply for any record sequence; after a
    crash, with only the first ``synced`` batches fsynced, it agrees with their fold."""
    engine = MemoryEngine()
    log = fresh(engine)
    for i, batch in enumerate(batches):
        log.persist(batch, sync=i < synced)
        done = [r for b in batches[: i + 1] for r in b]
        assert PaxosLog(engine, "ks/1").load().state == fold(done)
    if synced < len(batches):
        engine.crash()
        kept = [r for b in batches[:synced] for r in b]
        assert PaxosLog(engine, "ks/1").load().state == fold(kept)
