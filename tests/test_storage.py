"""The local store: engines, record layout, group commit, TTL and the purge sweep."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from ringkv.clock import ManualClock
from ringkv.hlc import Timestamp
from ringkv.errors import CorruptRecord, StorageError
from ringkv.storage import keys
from ringkv.storage.leveldb import LevelDBEngine
from ringkv.storage.memory import MemoryEngine
from ringkv.storage.store import LocalStore
from ringkv.versioning import Cell, tombstone

SECOND_US = 1_000_000


@pytest.fixture(params=["memory", "leveldb"])
def engine(request: pytest.FixtureRequest, tmp_path: Path):
    if request.param == "memory":
        engine = MemoryEngine()
    else:
        engine = LevelDBEngine(tmp_path / "db")
    yield engine
    engine.close()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=30))


def test_data_keys_sort_by_keyspace_then_token_then_key() -> None:
    ordered = [
        ("a", -(2**63) + 1, b"z"),
        ("a", -5, b"a"),
        ("a", -5, b"b"),
        ("a", 0, b""),
        ("a", 2**63 - 1, b"a"),
        ("b", -(2**63) + 1, b"a"),
    ]
    encoded = [keys.data_key(*item) for item in ordered]
    assert encoded == sorted(encoded)
    assert [keys.parse_data_key(raw) for raw in encoded] == ordered
    for raw in encoded[:5]:
        assert keys.keyspace_prefix("a") <= raw < keys.keyspace_end("a")


def test_write_then_read_and_lww(engine) -> None:
    async def scenario() -> None:
        store = LocalStore(engine, ManualClock())
        await store.start()
        new = Cell(b'"new"', Timestamp(20))
        old = Cell(b'"old"', Timestamp(10))
        assert await store.apply("ks", 1, b"k", new) == new
        # An older write that arrives later never overwrites the newer one.
        assert await store.apply("ks", 1, b"k", old) == new
        assert store.read("ks", 1, b"k") == new
        assert store.read("ks", 1, b"other") is None
        assert store.stats.writes_superseded == 1
        await store.close()

    run(scenario())


def test_writes_in_one_loop_turn_share_one_batch(engine) -> None:
    """Group commit: concurrent writes become a single engine batch."""

    async def scenario() -> None:
        store = LocalStore(engine, ManualClock(), sync_mode="batch")
        await store.start()
        cells = [Cell(b"%d" % i, Timestamp(i + 1)) for i in range(50)]
        await asyncio.gather(*(store.apply("ks", i, b"k%d" % i, c) for i, c in enumerate(cells)))
        assert store.stats.batches == 1
        assert store.stats.syncs == 1
        assert all(store.read("ks", i, b"k%d" % i) == c for i, c in enumerate(cells))
        await store.close()

    run(scenario())


def test_batch_mode_survives_a_crash_of_unsynced_state() -> None:
    """In batch mode a write is acknowledged only after its batch is fsynced."""

    async def scenario() -> MemoryEngine:
        engine = MemoryEngine()
        store = LocalStore(engine, ManualClock(), sync_mode="batch")
        await store.start()
        await store.apply("ks", 1, b"k", Cell(b"1", Timestamp(1)))
        return engine

    engine = run(scenario())
    engine.crash()
    assert engine.get(keys.data_key("ks", 1, b"k")) is not None


def test_reads_see_writes_that_are_still_being_flushed() -> None:
    async def scenario() -> None:
        store = LocalStore(MemoryEngine(), ManualClock())
        await store.start()
        cell = Cell(b"1", Timestamp(5))
        task = asyncio.ensure_future(store.apply("ks", 7, b"k", cell))
        await asyncio.sleep(0)  # the write is pending, not yet in the engine
        assert store.read("ks", 7, b"k") == cell
        await task
        await store.close()

    run(scenario())


def test_corrupt_record_is_reported_not_returned(engine) -> None:
    async def scenario() -> None:
        store = LocalStore(engine, ManualClock())
        await store.start()
        await store.apply("ks", 1, b"k", Cell(b"1", Timestamp(1)))
        await store.apply("ks", 2, b"j", Cell(b"2", Timestamp(1)))
        raw = keys.data_key("ks", 1, b"k")
        record = bytearray(engine.get(raw))
        record[-6] ^= 0xFF
        engine.write([(raw, bytes(record))], [], sync=False)
        with pytest.raises(CorruptRecord):
            store.read("ks", 1, b"k")
        page = await store.scan("ks", after=None, limit=10)
        assert [item.key for item in page] == [b"j"]
        assert store.stats.corrupt_records == 2
        # A fresh write (e.g. from repair) replaces the corrupt record.
        healed = Cell(b"3", Timestamp(9))
        await store.apply("ks", 1, b"k", healed)
        assert store.read("ks", 1, b"k") == healed
        await store.close()

    run(scenario())


def test_scan_in_token_order_with_paging_and_ranges(engine) -> None:
    async def scenario() -> None:
        store = LocalStore(engine, ManualClock())
        await store.start()
        tokens = [-100, -50, -50, 0, 75, 2**63 - 1]
        names = [b"a", b"b", b"c", b"d", b"e", b"f"]
        for token, name in zip(tokens, names):
            await store.apply("ks", token, name, Cell(b"1", Timestamp(1)))
        await store.apply("other", 0, b"x", Cell(b"1", Timestamp(1)))
        first = await store.scan("ks", after=None, limit=2)
        assert [(i.token, i.key) for i in first] == [(-100, b"a"), (-50, b"b")]
        rest = await store.scan("ks", after=(-50, b"b"), limit=10)
        assert [i.key for i in rest] == [b"c", b"d", b"e", b"f"]
        in_range = await store.scan_range("ks", -50, 75)
        assert [i.key for i in in_range] == [b"d", b"e"]
        to_end = await store.scan_range("ks", 75, 2**63 - 1)
        assert [i.key for i in to_end] == [b"f"]
        await store.close()

    run(scenario())


def test_sweep_purges_only_after_gc_grace_and_keeps_new_writes() -> None:
    async def scenario() -> None:
        clock = ManualClock(wall_us=1_000 * SECOND_US)
        store = LocalStore(MemoryEngine(), clock, gc_grace_s=10)
        await store.start()
        now = clock.wall_us()
        await store.apply("ks", 1, b"deleted", tombstone(Timestamp(now)))
        await store.apply("ks", 2, b"expired", Cell(b"1", Timestamp(now), expires_at_us=now + 1))
        await store.apply("ks", 3, b"live", Cell(b"1", Timestamp(now)))
        assert await store.sweep() == 0  # within gc_grace: nothing goes
        clock.advance(11)
        assert await store.sweep() == 2
        assert store.read("ks", 1, b"deleted") is None
        assert store.read("ks", 2, b"expired") is None
        assert store.read("ks", 3, b"live") is not None
        await store.close()

    run(scenario())


def test_leveldb_data_survives_reopen(tmp_path: Path) -> None:
    async def write() -> None:
        store = LocalStore(LevelDBEngine(tmp_path / "db"), ManualClock(), sync_mode="batch")
        await store.start()
        await store.apply("ks", 1, b"k", Cell(b'"v"', Timestamp(1)))
        await store.close()

    async def read() -> Cell | None:
        store = LocalStore(LevelDBEngine(tmp_path / "db"), ManualClock())
        await store.start()
        try:
            return store.read("ks", 1, b"k")
        finally:
            await store.close()

    run(write())
    assert run(read()) == Cell(b'"v"', Timestamp(1))


class HeldEngine(MemoryEngine):
    """A memory engine that blocks like LevelDB: each write waits, in its worker
    thread, until the test releases it, then fails if told to (a full disk)."""

    blocking = True

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()
        self.fail = False

    def write(self, puts, deletes, *, sync):  # type: ignore[no-untyped-def]
        self.entered.set()
        assert self.release.wait(timeout=10), "the test never released the write"
        if self.fail:
            raise StorageError("disk I/O error")
        return super().write(puts, deletes, sync=sync)


@pytest.mark.parametrize("batch_fails", [True, False])
def test_a_write_beaten_by_the_batch_in_flight_shares_its_fate(batch_fails: bool) -> None:
    """An older write that loses to a cell still being fsynced must not be
    acknowledged if that fsync fails: then neither cell reached the disk."""

    async def scenario() -> None:
        engine = HeldEngine()
        engine.fail = batch_fails
        store = LocalStore(engine, ManualClock(), sync_mode="batch")
        newer, older = Cell(b'"new"', Timestamp(200)), Cell(b'"old"', Timestamp(100))
        first = asyncio.ensure_future(store.apply("ks", 1, b"k", newer))
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(None, engine.entered.wait, 10)  # newer is in flight
        second = asyncio.ensure_future(store.apply("ks", 1, b"k", older))
        await asyncio.sleep(0)  # the older write reconciles against the batch in flight
        engine.release.set()
        outcomes = await asyncio.gather(first, second, return_exceptions=True)
        if batch_fails:
            assert all(isinstance(o, StorageError) for o in outcomes), outcomes
            assert store.read("ks", 1, b"k") is None
        else:
            assert outcomes == [newer, newer]
            assert store.read("ks", 1, b"k") == newer

    run(scenario())
