"""The local store: engines, record layout, group commit, TTL and the purge sweep."""

from __future__ import annotations

import asyncio
import random
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
from ringkv.versioning import Cell, encode_cell, reconcile, tombstone

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


# -- writes newer than their slice skip the read -------------------------------------

class CountingEngine(MemoryEngine):
    """A memory engine that counts reads of data records (a write's read of the stored cell)."""

    def __init__(self) -> None:
        super().__init__()
        self.data_reads = 0

    def get(self, key: bytes) -> bytes | None:
        if key.startswith(keys.DATA_PREFIX):
            self.data_reads += 1
        return super().get(key)


FAR_TOKEN = 2**62  # another slice of the token space than token 1


def test_a_write_newer_than_everything_in_its_slice_is_not_read_first() -> None:
    async def scenario() -> None:
        engine = CountingEngine()
        store = LocalStore(engine, ManualClock())
        await store.apply("ks", 1, b"k", Cell(b"1", Timestamp(100)))
        await store.apply("ks", 1, b"k", Cell(b"2", Timestamp(200)))
        assert (engine.data_reads, store.stats.writes_unread) == (0, 2)
        # Older than the slice's newest: read, and it loses to what is stored.
        assert await store.apply("ks", 1, b"k", Cell(b"3", Timestamp(150))) == Cell(
            b"2", Timestamp(200))
        assert engine.data_reads == 1
        # Another key of the same slice, older than the slice's newest: read, and it wins.
        assert await store.apply("ks", 1, b"k2", Cell(b"4", Timestamp(120))) == Cell(
            b"4", Timestamp(120))
        assert engine.data_reads == 2
        # At the same timestamp the tie-break needs the stored cell: read.
        assert await store.apply("ks", 1, b"k", tombstone(Timestamp(200))) == tombstone(
            Timestamp(200))
        assert engine.data_reads == 3
        # Another slice has its own newest: an old write there is not read first.
        await store.apply("ks", FAR_TOKEN, b"f", Cell(b"5", Timestamp(50)))
        assert engine.data_reads == 3 and store.stats.writes_unread == 3
        assert [store.read("ks", t, k) for t, k in ((1, b"k"), (1, b"k2"), (FAR_TOKEN, b"f"))] == [
            tombstone(Timestamp(200)), Cell(b"4", Timestamp(120)), Cell(b"5", Timestamp(50))]
        await store.close()

    run(scenario())


def test_after_a_restart_a_stale_write_still_loses(engine) -> None:
    """The newest timestamp is stored with the cells, so a store opened again knows a
    stale write (a late hint, say) may be older than what is stored, and reads first."""

    async def scenario(path_engine):  # type: ignore[no-untyped-def]
        store = LocalStore(path_engine(), ManualClock(), sync_mode="batch")
        await store.start()
        await store.apply("ks", 1, b"k", Cell(b"2", Timestamp(200)))
        await store.close()
        store = LocalStore(path_engine(), ManualClock())
        await store.start()
        assert await store.apply("ks", FAR_TOKEN, b"k", Cell(b"1", Timestamp(100))) == Cell(
            b"1", Timestamp(100))  # (another slice: nothing newer there, but still checked)
        assert await store.apply("ks", 1, b"k", Cell(b"1", Timestamp(100))) == Cell(
            b"2", Timestamp(200))
        assert store.read("ks", 1, b"k") == Cell(b"2", Timestamp(200))
        assert store.stats.writes_unread == 0
        await store.apply("ks", 1, b"k", Cell(b"3", Timestamp(300)))
        assert store.stats.writes_unread == 1
        await store.close()

    if isinstance(engine, MemoryEngine):
        run(scenario(lambda: engine))
    else:
        path = engine._path if hasattr(engine, "_path") else None
        engine.close()
        assert path is not None
        run(scenario(lambda: LevelDBEngine(path)))


def test_a_data_directory_without_the_record_learns_it_from_a_scan() -> None:
    """Cells written before the newest-timestamp record existed: until the scan in
    ``start`` every write reads first; after it, the record is there and newer writes
    skip the read."""

    async def scenario() -> None:
        engine = CountingEngine()
        engine.write([(keys.data_key("ks", 1, b"k"), encode_cell(Cell(b"9", Timestamp(900)))),
                      (keys.data_key("ks", FAR_TOKEN, b"f"),
                       encode_cell(Cell(b"1", Timestamp(100))))], [], sync=True)
        store = LocalStore(engine, ManualClock())
        # Not started yet: unknown, so even a write to an empty slice is read first.
        assert await store.apply("ks", -FAR_TOKEN, b"n", Cell(b"2", Timestamp(950))) == Cell(
            b"2", Timestamp(950))
        assert await store.apply("ks", 1, b"k", Cell(b"1", Timestamp(500))) == Cell(
            b"9", Timestamp(900))
        assert (engine.data_reads, store.stats.writes_unread) == (2, 0)
        await store.start()
        assert engine.get(keys.NEWEST_KEY) is not None
        # 950 (merged while unknown) bounds every slice, not the scan's 900 alone.
        assert await store.apply("ks", 1, b"k", Cell(b"3", Timestamp(920))) == Cell(
            b"3", Timestamp(920))
        assert store.stats.writes_unread == 0
        await store.apply("ks", 1, b"k", Cell(b"4", Timestamp(1000)))
        assert store.stats.writes_unread == 1
        await store.close()

    run(scenario())


@pytest.mark.parametrize("seed", range(20))
def test_writes_read_first_or_not_end_as_last_write_wins(seed: int) -> None:
    """Random writes (many older than what is stored, ties, tombstones) over keys in two
    slices, with syncs, restarts and crashes between them: every key ends as the LWW join
    of all its writes that reached the disk, whichever of them skipped the read. (A crash
    loses the writes since the last sync, and the newest-timestamp record written with
    them: what it bounds and the bound go together.)"""
    rng = random.Random(seed)

    def open_store(engine: MemoryEngine) -> LocalStore:
        return LocalStore(engine, ManualClock(), sync_mode="periodic",
                          periodic_sync_interval_ms=3_600_000)

    async def scenario() -> None:
        engine = MemoryEngine()
        store = open_store(engine)
        await store.start()
        expected: dict[tuple[int, bytes], Cell | None] = {}
        durable: dict[tuple[int, bytes], Cell | None] = {}
        unread = read_first = 0

        def tally(store: LocalStore) -> None:
            nonlocal unread, read_first
            stats = store.stats
            unread += stats.writes_unread
            read_first += stats.writes_applied + stats.writes_superseded - stats.writes_unread

        places = [(token, key) for token in (1, FAR_TOKEN) for key in (b"a", b"b", b"c")]
        for _ in range(300):
            step = rng.random()
            if step < 0.04:  # a clean restart: close writes everything out
                tally(store)
                await store.close()
                durable = dict(expected)
                store = open_store(engine)
                await store.start()
                continue
            if step < 0.08:  # a crash: what was not synced is gone
                tally(store)
                for task in store._background:
                    task.cancel()
                engine.crash()
                expected = dict(durable)
                store = open_store(engine)
                await store.start()
                continue
            if step < 0.15:
                engine.sync()
                durable = dict(expected)
                continue
            token, key = rng.choice(places)
            ts = Timestamp(rng.randrange(1, 60), rng.randrange(2))
            cell = tombstone(ts) if rng.random() < 0.2 else Cell(b"%d" % rng.randrange(3), ts)
            await store.apply("ks", token, key, cell)
            expected[(token, key)] = reconcile(expected.get((token, key)), cell)
        for (token, key), cell in expected.items():
            assert store.read("ks", token, key) == cell, (token, key)
        tally(store)
        assert unread and read_first, (unread, read_first)  # both paths were taken
        await store.close()

    run(scenario())
