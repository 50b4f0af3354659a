"""The MVCC store: snapshot reads at a timestamp (Spanner §4.1), atomic
multi-key applies at one commit timestamp, tombstones, token-order scans, and
garbage collection that never takes what a read at or above its horizon sees."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from ringkv.clock import ManualClock
from ringkv.errors import BY_CODE, CorruptRecord, SnapshotTooOld
from ringkv.hlc import Timestamp
from ringkv.ring import token_for
from ringkv.storage.engine import Engine
from ringkv.storage.leveldb import LevelDBEngine
from ringkv.storage.memory import MemoryEngine
from ringkv.storage.store import LocalStore
from ringkv.txn import mvcc_keys
from ringkv.txn.mvcc import NEXTS_BEFORE_SEEK, MvccItem, MvccStore, ScanPage, Version
from ringkv.txn.mvcc_gc import gc_horizon_us
from ringkv.versioning import tombstone

MIN_TOKEN, MAX_TOKEN = mvcc_keys.MIN_TOKEN, mvcc_keys.MAX_TOKEN


@pytest.fixture(params=["memory", "leveldb"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    engine: Engine = MemoryEngine() if request.param == "memory" else LevelDBEngine(tmp_path / "db")
    yield engine
    engine.close()


class SpyEngine:
    """An engine that counts what the store asks of it."""

    def __init__(self, inner: Engine) -> None:
        self.inner = inner
        self.blocking = inner.blocking
        self.writes: list[tuple[list[tuple[bytes, bytes]], list[bytes], bool]] = []
        self.scans = 0
        self.records_read = 0

    def get(self, key: bytes) -> bytes | None:
        return self.inner.get(key)

    def write(self, puts: Sequence[tuple[bytes, bytes]], deletes: Sequence[bytes], *, sync: bool) -> None:
        self.writes.append((list(puts), list(deletes), sync))
        self.inner.write(puts, deletes, sync=sync)

    def scan(self, start: bytes, stop: bytes | None, *, limit: int | None = None) -> Iterator[tuple[bytes, bytes]]:
        self.scans += 1
        for item in self.inner.scan(start, stop, limit=limit):
            self.records_read += 1
            yield item

    def sync(self) -> None:
        self.inner.sync()

    def size_bytes(self) -> int:
        return self.inner.size_bytes()

    def close(self) -> None:
        self.inner.close()


def in_token_order(keys: list[bytes]) -> list[bytes]:
    return sorted(keys, key=lambda k: (token_for(k), k))


# -- reads at a timestamp ---------------------------------------------------


def test_a_snapshot_read_sees_the_newest_version_at_or_below_its_timestamp(engine) -> None:
    """Spanner §4.1: a read at t returns the newest version with commit_ts <= t."""
    store = MvccStore(engine)
    store.apply_now("ks", {b"k": b"v10"}, 10)
    store.apply_now("ks", {b"k": b"v20"}, 20)
    store.apply_now("ks", {b"k": None}, 30)
    store.apply_now("ks", {b"k": b"v40"}, 40)
    table = [
        (0, None), (9, None), (10, (b"v10", 10)), (19, (b"v10", 10)), (20, (b"v20", 20)),
        (29, (b"v20", 20)), (30, None), (39, None), (40, (b"v40", 40)), (2**63 - 1, (b"v40", 40)),
        (2**70, (b"v40", 40)),
    ]
    for at_ts, expected in table:
        assert store.read("ks", b"k", at_ts) == expected, at_ts
    assert store.read("ks", b"other", 50) is None
    with pytest.raises(ValueError, match="below zero"):
        store.read("ks", b"k", -1)
    assert store.read("other", b"k", 50) is None


def test_tombstones_read_as_absent_but_keep_their_version(engine) -> None:
    store = MvccStore(engine)
    store.apply_now("ks", {b"k": b"v"}, 10)
    store.apply_now("ks", {b"k": None}, 20)
    assert store.read("ks", b"k", 25) is None
    assert store.read_version("ks", b"k", 25) == Version(None, 20)
    assert store.latest_version("ks", b"k") == Version(None, 20)
    assert store.read_version("ks", b"k", 15) == Version(b"v", 10)
    assert store.latest_version("ks", b"never") is None


def test_keys_that_extend_one_another_keep_their_own_versions(engine) -> None:
    """The escaped key layout: versions of b"a" and b"a\\x00..." never mix."""
    store = MvccStore(engine)
    for ts, key in enumerate([b"a", b"a\x00", b"a\x00\x00", b"a\x01", b"ab", b"a\xff"], start=1):
        store.apply_now("ks", {key: key}, ts)
        store.apply_now("ks", {key: key + b"!"}, ts + 100)
    for ts, key in enumerate([b"a", b"a\x00", b"a\x00\x00", b"a\x01", b"ab", b"a\xff"], start=1):
        assert store.read("ks", key, 99) == (key, ts)
        assert store.read("ks", key, 1000) == (key + b"!", ts + 100)


# -- atomic applies ---------------------------------------------------------


def test_apply_writes_every_key_in_one_batch_at_one_timestamp(engine) -> None:
    spy = SpyEngine(engine)
    store = MvccStore(spy)
    store.apply_now("ks", {b"a": b"1", b"b": b"2", b"c": None}, 50, sync=True)
    assert len(spy.writes) == 1
    puts, deletes, sync = spy.writes[0]
    assert len(puts) == 3 and deletes == [] and sync is True
    assert {mvcc_keys.parse_version_key(raw).commit_ts_us for raw, _ in puts} == {50}
    assert store.read("ks", b"a", 50) == (b"1", 50)
    assert store.read("ks", b"b", 50) == (b"2", 50)
    assert store.read_version("ks", b"c", 50) == Version(None, 50)
    assert store.stats.batches == 1 and store.stats.syncs == 1 and store.stats.versions_written == 3
    store.apply_now("ks", {}, 60)
    assert len(spy.writes) == 1  # nothing to write


def test_a_crash_keeps_all_of_a_synced_apply_and_none_of_an_unsynced_one() -> None:
    engine = MemoryEngine()
    store = MvccStore(engine)
    store.apply_now("ks", {b"a": b"1", b"b": b"1"}, 10, sync=True)
    store.apply_now("ks", {b"a": b"2", b"b": b"2"}, 20, sync=False)
    engine.crash()
    store = MvccStore(engine)
    assert [store.read("ks", k, 30) for k in (b"a", b"b")] == [(b"1", 10), (b"1", 10)]


def test_async_apply_runs_off_the_loop_and_is_durable_across_reopen(tmp_path: Path) -> None:
    async def scenario() -> None:
        engine = LevelDBEngine(tmp_path / "db")
        store = MvccStore(engine)
        await asyncio.gather(
            *(store.apply("ks", {b"k%d" % i: b"v%d" % i, b"shared": b"%d" % i}, 100 + i) for i in range(20))
        )
        assert store.stats.syncs == 20
        engine.close()

    asyncio.run(asyncio.wait_for(scenario(), timeout=30))
    reopened = LevelDBEngine(tmp_path / "db")
    try:
        store = MvccStore(reopened)
        assert store.read("ks", b"k7", 200) == (b"v7", 107)
        assert store.read("ks", b"shared", 200) == (b"19", 119)
        assert store.read("ks", b"shared", 110) == (b"10", 110)
    finally:
        reopened.close()


def test_reapplying_an_entry_is_harmless(engine) -> None:
    """A log replayed after a crash applies its entries again."""
    store = MvccStore(engine)
    for _ in range(2):
        store.apply_now("ks", {b"k": b"v"}, 10)
    assert len(list(engine.scan(*mvcc_keys.keyspace_bounds("ks")))) == 1


@pytest.mark.parametrize(
    ("entries", "ts", "error"),
    [({b"": b"v"}, 1, "empty key"), ({b"k": b"v"}, -1, "commit timestamp"), ({b"k": b"v"}, 2**63, "commit timestamp")],
)
def test_bad_applies_are_refused_before_writing(engine, entries, ts: int, error: str) -> None:
    store = MvccStore(engine)
    with pytest.raises(ValueError, match=error):
        store.apply_now("ks", entries, ts)
    assert list(engine.scan(b"m", b"n")) == []


# -- scans --------------------------------------------------------------------


def test_scan_returns_what_a_read_at_t_sees_in_token_order(engine) -> None:
    """Spanner §4.1 over a range: every key's newest version at or below t, tombstones left out."""
    store = MvccStore(engine)
    keys = [b"key%d" % i for i in range(30)]
    store.apply_now("ks", {k: b"old" for k in keys}, 10)
    store.apply_now("ks", {k: None for k in keys[::3]}, 20)
    store.apply_now("ks", {k: b"new" for k in keys[::2]}, 30)
    store.apply_now("other", {k: b"x" for k in keys}, 15)

    async def scan_at(at_ts: int) -> ScanPage:
        return await store.scan("ks", MIN_TOKEN, MAX_TOKEN, at_ts, limit=100)

    page = asyncio.run(scan_at(25))
    assert page.resume_after is None
    expected = [k for k in in_token_order(keys) if k not in keys[::3]]
    assert [item.key for item in page.items] == expected
    assert all(item == MvccItem(token_for(item.key), item.key, b"old", 10) for item in page.items)
    at_30 = asyncio.run(scan_at(30)).items
    assert {item.key: (item.value, item.commit_ts_us) for item in at_30} == {
        k: ((b"new", 30) if k in keys[::2] else (b"old", 10))
        for k in keys if k in keys[::2] or k not in keys[::3]
    }
    assert asyncio.run(scan_at(5)).items == []


def test_scan_covers_start_exclusive_end_inclusive(engine) -> None:
    store = MvccStore(engine)
    keys = in_token_order([b"key%d" % i for i in range(40)])
    store.apply_now("ks", {k: k for k in keys}, 10)
    tokens = [token_for(k) for k in keys]
    start, end = tokens[9], tokens[29]
    page = store.scan_now("ks", start, end, 10, limit=100)
    assert [item.key for item in page.items] == keys[10:30]


@pytest.mark.parametrize(("limit", "max_examined"), [(1, 10_000), (3, 10_000), (100, 20), (2, 25)])
def test_scan_pages_resume_after_their_last_key_and_add_up_to_the_whole(
    engine, limit: int, max_examined: int
) -> None:
    rng = random.Random(limit * 1000 + max_examined)
    store = MvccStore(engine)
    keys = [b"k%d" % i for i in range(25)]
    for ts in range(1, 40):
        store.apply_now("ks", {k: (None if rng.random() < 0.3 else b"%d" % ts) for k in rng.sample(keys, 4)}, ts)
    at_ts = 30
    expected = [
        (k, version) for k in in_token_order(keys) if (version := store.read("ks", k, at_ts)) is not None
    ]
    got: list[tuple[bytes, Version]] = []
    after = None
    for _ in range(200):
        page = store.scan_now("ks", MIN_TOKEN, MAX_TOKEN, at_ts, limit=limit, after=after, max_examined=max_examined)
        assert len(page.items) <= limit
        got += [(item.key, Version(item.value, item.commit_ts_us)) for item in page.items]
        if page.resume_after is None:
            break
        assert page.resume_after != after, "a page made no progress"
        after = page.resume_after
    assert got == expected


def test_scan_pages_progress_over_keys_with_nothing_visible(engine) -> None:
    """Keys written only after t are passed over, and a page spent on them
    still resumes past them (no page repeats the last one)."""
    store = MvccStore(engine)
    keys = [b"k%d" % i for i in range(40)]
    for ts in range(100, 103):
        store.apply_now("ks", {k: b"late" for k in keys}, ts)
    store.apply_now("ks", {b"early": b"e"}, 1)
    after, pages, found = None, 0, []
    while True:
        page = store.scan_now("ks", MIN_TOKEN, MAX_TOKEN, 50, limit=10, after=after, max_examined=20)
        pages += 1
        found += [item.key for item in page.items]
        if page.resume_after is None:
            break
        assert page.resume_after != after and pages < 100
        after = page.resume_after
    assert found == [b"early"]
    assert pages >= (3 * 41) // 20


def test_scan_seeks_past_many_versions_instead_of_stepping_over_them(engine) -> None:
    """A hot key with many versions newer than t costs a seek, not a walk."""
    spy = SpyEngine(engine)
    store = MvccStore(spy)
    store.apply_now("ks", {b"hot": b"old", b"cold": b"c"}, 1)
    for ts in range(2, 500):
        store.apply_now("ks", {b"hot": b"%d" % ts}, ts)
    spy.records_read = 0
    page = store.scan_now("ks", MIN_TOKEN, MAX_TOKEN, 1, limit=10)
    assert sorted(item.key for item in page.items) == [b"cold", b"hot"]
    assert spy.records_read <= 3 * (NEXTS_BEFORE_SEEK + 2)
    spy.records_read = 0
    page = store.scan_now("ks", MIN_TOKEN, MAX_TOKEN, 1000, limit=10)
    assert {item.key: item.value for item in page.items} == {b"hot": b"499", b"cold": b"c"}
    assert spy.records_read <= 3 * (NEXTS_BEFORE_SEEK + 2)


def test_scan_arguments_are_checked(engine) -> None:
    store = MvccStore(engine)
    with pytest.raises(ValueError, match="limit"):
        store.scan_now("ks", MIN_TOKEN, MAX_TOKEN, 1, limit=0)
    with pytest.raises(ValueError, match="max_examined"):
        store.scan_now("ks", MIN_TOKEN, MAX_TOKEN, 1, limit=1, max_examined=3)


# -- corruption -------------------------------------------------------------


def test_a_corrupt_version_is_reported_never_returned(engine) -> None:
    store = MvccStore(engine)
    store.apply_now("ks", {b"good": b"g", b"bad": b"b"}, 10)
    raw = mvcc_keys.version_key("ks", token_for(b"bad"), b"bad", 10)
    engine.write([(raw, b"\x01\x00garbage")], [], sync=True)
    with pytest.raises(CorruptRecord):
        store.read("ks", b"bad", 10)
    page = store.scan_now("ks", MIN_TOKEN, MAX_TOKEN, 10, limit=10)
    assert [item.key for item in page.items] == [b"good"]
    assert store.stats.corrupt_records == 2


# -- sharing the engine with the eventual tier --------------------------------


def test_mvcc_records_stay_out_of_the_eventual_tiers_scans_and_sweep(engine) -> None:
    async def scenario() -> None:
        clock = ManualClock()
        local = LocalStore(engine, clock, gc_grace_s=0)
        await local.start()
        mvcc = MvccStore(engine)
        await mvcc.apply("ks", {b"k": b"v", b"gone": None}, 10)
        await local.apply("ks", token_for(b"t"), b"t", tombstone(Timestamp(1)))
        assert [c.key for c in await local.scan("ks", after=None, limit=100)] == [b"t"]
        clock.advance(10)
        assert await local.sweep() == 1
        assert mvcc.read("ks", b"k", 10) == (b"v", 10)
        assert mvcc.read_version("ks", b"gone", 10) == Version(None, 10)
        await local.close()

    asyncio.run(asyncio.wait_for(scenario(), timeout=30))


# -- garbage collection -----------------------------------------------------


def stored_versions(engine: Engine, keyspace: str) -> list[mvcc_keys.VersionKey]:
    return [mvcc_keys.parse_version_key(raw) for raw, _ in engine.scan(*mvcc_keys.keyspace_bounds(keyspace))]


def gc_to_the_end(store: MvccStore, keyspace: str, horizon: int, max_records: int) -> int:
    for calls in range(1, 10_000):
        if not store.gc(keyspace, horizon, max_records=max_records).more:
            return calls
    raise AssertionError("GC did not finish")


def test_gc_keeps_what_reads_at_or_above_the_horizon_see(engine) -> None:
    store = MvccStore(engine)
    for ts, value in [(10, b"a"), (20, b"b"), (30, b"c"), (40, b"d")]:
        store.apply_now("ks", {b"k": value}, ts)
    store.apply_now("ks", {b"dead": b"x"}, 10)
    store.apply_now("ks", {b"dead": None}, 20)
    gc_to_the_end(store, "ks", 25, max_records=1000)
    assert [(v.key, v.commit_ts_us) for v in stored_versions(engine, "ks")] == sorted(
        [(b"k", 40), (b"k", 30), (b"k", 20)], key=lambda kv: (token_for(kv[0]), kv[0], -kv[1])
    )
    assert [store.read("ks", b"k", t) for t in (25, 30, 45)] == [(b"b", 20), (b"c", 30), (b"d", 40)]
    assert store.read_version("ks", b"dead", 25) is None  # the deleted key is gone entirely


def test_reads_below_the_gc_threshold_are_refused_even_after_a_restart(tmp_path: Path) -> None:
    engine = LevelDBEngine(tmp_path / "db")
    store = MvccStore(engine)
    store.apply_now("ks", {b"k": b"a"}, 10)
    store.apply_now("ks", {b"k": b"b"}, 20)
    assert store.gc_threshold_us("ks") == 0
    store.gc("ks", 25)
    assert store.gc_threshold_us("ks") == 25
    engine.close()
    engine = LevelDBEngine(tmp_path / "db")
    try:
        store = MvccStore(engine)
        assert store.read("ks", b"k", 25) == (b"b", 20)
        for read in (
            lambda: store.read("ks", b"k", 24),
            lambda: store.scan_now("ks", MIN_TOKEN, MAX_TOKEN, 15, limit=10),
        ):
            with pytest.raises(SnapshotTooOld) as caught:
                read()
            assert caught.value.details["gc_threshold_ts"] == 25
        assert store.read("other", b"k", 1) is None  # thresholds are per keyspace
        # A later GC at a lower horizon never lowers the threshold.
        store.apply_now("ks", {b"k": b"c"}, 30)
        store.gc("ks", 30)
        store.gc("ks", 5)
        assert store.gc_threshold_us("ks") == 30
    finally:
        engine.close()
    assert BY_CODE["snapshot_too_old"] is SnapshotTooOld and SnapshotTooOld.http_status == 400


def test_a_raised_gc_threshold_refuses_older_reads_and_never_lowers(tmp_path: Path) -> None:
    """A Paxos snapshot copied from a peer whose GC thinned its history carries the
    peer's threshold: reads below it are refused here too (Spanner §4.1.3)."""
    engine = LevelDBEngine(tmp_path / "db")
    store = MvccStore(engine)
    store.apply_now("ks", {b"k": b"a"}, 10)
    store.raise_gc_threshold("ks", 15)
    store.raise_gc_threshold("ks", 12)  # lower: ignored
    assert store.gc_threshold_us("ks") == 15
    with pytest.raises(SnapshotTooOld):
        store.read("ks", b"k", 14)
    assert store.read("ks", b"k", 15) == (b"a", 10)
    engine.sync()  # the installer syncs once the snapshot is in
    engine.close()
    engine = LevelDBEngine(tmp_path / "db")
    try:
        assert MvccStore(engine).gc_threshold_us("ks") == 15
    finally:
        engine.close()


def test_gc_batches_are_bounded_and_a_pass_finishes(engine) -> None:
    """Each call examines at most max_records versions with one engine scan
    and at most one write, so it holds the event loop for a bounded time."""
    spy = SpyEngine(engine)
    store = MvccStore(spy)
    for ts in range(1, 51):
        store.apply_now("ks", {b"hot": b"%d" % ts, b"k%d" % (ts % 7): b"x"}, ts)
    total = len(stored_versions(engine, "ks"))
    spy.writes.clear()
    spy.scans = spy.records_read = 0
    calls = 0
    while True:
        scans, reads, writes = spy.scans, spy.records_read, len(spy.writes)
        result = store.gc("ks", 100, max_records=5)
        calls += 1
        assert result.examined <= 5
        assert (spy.scans - scans, spy.records_read - reads) == (1, result.examined)
        assert len(spy.writes) - writes <= 1
        if not result.more:
            break
        assert calls < 200
    assert calls >= total // 5
    assert [v.key for v in stored_versions(engine, "ks")] == in_token_order([b"hot"] + [b"k%d" % i for i in range(7)])
    assert store.stats.gc_deleted == total - 8
    with pytest.raises(ValueError, match="max_records"):
        store.gc("ks", 100, max_records=1)


def test_gc_never_drops_a_tombstone_while_an_older_version_remains(engine) -> None:
    """A batch that ends inside a key keeps its tombstone: the older version
    left for the next batch must not show through in between."""
    store = MvccStore(engine)
    store.apply_now("ks", {b"k": b"old"}, 10)
    store.apply_now("ks", {b"k": b"older?"}, 20)
    store.apply_now("ks", {b"k": None}, 30)
    result = store.gc("ks", 40, max_records=2)  # sees the tombstone and the version at 20
    assert result.more
    assert store.read("ks", b"k", 40) is None
    assert store.read_version("ks", b"k", 40) == Version(None, 30)
    gc_to_the_end(store, "ks", 40, max_records=2)
    assert stored_versions(engine, "ks") == []
    assert store.read("ks", b"k", 40) is None


@pytest.mark.parametrize("seed", range(12))
def test_gc_never_changes_a_read_at_or_above_its_horizon_randomized(engine, seed: int) -> None:
    """A model test: random applies (values and tombstones, several keys at one
    commit timestamp) interleaved with bounded GC batches at a horizon that
    follows gc_horizon_us over random open snapshots. After every step, every
    snapshot read at or above the GC threshold (Spanner §4.1) and every scan
    answer as the dict-of-lists model says, and reads below it are refused."""
    rng = random.Random(seed)
    store = MvccStore(engine)
    keys = [b"key%d" % i for i in range(8)]
    model: dict[bytes, list[tuple[int, bytes | None]]] = {k: [] for k in keys}  # (ts, value), oldest first

    def visible(key: bytes, at_ts: int) -> tuple[int, bytes | None] | None:
        below = [v for v in model[key] if v[0] <= at_ts]
        return below[-1] if below else None

    now = 0
    horizon = 0
    gc_s = 0.00005  # 50 us: the horizon trails "now" by 50 timestamps
    for step in range(150):
        now += rng.randint(1, 6)
        if rng.random() < 0.6:
            entries = {k: (None if rng.random() < 0.25 else b"v%d" % now) for k in rng.sample(keys, rng.randint(1, 3))}
            store.apply_now("ks", entries, now, sync=False)
            for k, v in entries.items():
                model[k].append((now, v))
        else:
            snapshots = rng.sample(range(max(0, now - 80), now + 1), rng.randint(0, 2))
            horizon = max(horizon, gc_horizon_us(now, snapshots, mvcc_gc_s=gc_s), 0)
            store.gc("ks", horizon, max_records=rng.randint(2, 6))
        threshold = store.gc_threshold_us("ks")
        assert threshold <= horizon
        stamps = {t for vs in model.values() for t, _ in vs if t >= threshold}
        for at_ts in sorted(stamps | {threshold, now + 1} | {rng.randint(threshold, now + 1) for _ in range(3)}):
            for k in keys:
                seen = visible(k, at_ts)
                got = store.read_version("ks", k, at_ts)
                if seen is None or seen[1] is None:
                    # Absent either way; a tombstone GC dropped reads as no version.
                    assert got is None or (got.value is None and got.commit_ts_us == seen[0]), (step, k, at_ts)  # type: ignore[index]
                else:
                    assert got == Version(seen[1], seen[0]), (step, k, at_ts)
            if at_ts == now + 1 or rng.random() < 0.2:
                page = store.scan_now("ks", MIN_TOKEN, MAX_TOKEN, at_ts, limit=100)
                want = [(k, visible(k, at_ts)) for k in in_token_order(keys)]
                assert [(i.key, (i.commit_ts_us, i.value)) for i in page.items] == [
                    (k, v) for k, v in want if v is not None and v[1] is not None
                ]
        if threshold > 0:
            with pytest.raises(SnapshotTooOld):
                store.read("ks", keys[0], threshold - 1)
    # A full pass leaves, per key, the versions above the horizon and the live one a read there sees.
    gc_to_the_end(store, "ks", horizon, max_records=3)  # the pass under way
    gc_to_the_end(store, "ks", horizon, max_records=3)  # and one whole pass
    left = stored_versions(engine, "ks")
    for k in keys:
        seen = visible(k, horizon)
        keep = [t for t, _ in model[k] if t > horizon] + ([seen[0]] if seen and seen[1] is not None else [])
        assert sorted(v.commit_ts_us for v in left if v.key == k) == sorted(keep), k
