"""Hinted handoff (Dynamo §4.6): durable hints, ordered throttled replay, expiry."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from ringkv.clock import ManualClock
from ringkv.hlc import HybridLogicalClock, Timestamp
from ringkv.errors import PeerUnreachable
from ringkv.repair.hints import HintReplayer, HintStore
from ringkv.storage.leveldb import LevelDBEngine
from ringkv.storage.memory import MemoryEngine
from ringkv.storage.store import LocalStore
from ringkv.versioning import Cell


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=30))


def make(engine, clock: ManualClock, window_s: int = 3600) -> tuple[LocalStore, HintStore]:
    store = LocalStore(engine, clock)
    return store, HintStore(store, HybridLogicalClock(clock), clock, max_hint_window_s=window_s)


def test_hints_replay_oldest_first_and_are_deleted_once_delivered() -> None:
    async def scenario() -> None:
        clock = ManualClock()
        store, hints = make(MemoryEngine(), clock)
        await store.start()
        for i in range(5):
            assert await hints.store_hint("n2", "ks", i, b"k%d" % i, Cell(b"%d" % i, Timestamp(i)))
        await hints.store_hint("n3", "ks", 9, b"other", Cell(b"9", Timestamp(9)))
        delivered: list[tuple[str, bytes]] = []

        async def deliver(target, keyspace, token, key, cell):
            delivered.append((target, key))

        replayer = HintReplayer(hints, deliver, lambda node: True, rate_per_s=10_000)
        assert await replayer.replay("n2") == 5
        assert delivered == [("n2", b"k%d" % i) for i in range(5)]
        assert await hints.count("n2") == 0
        assert await hints.count("n3") == 1  # other targets untouched
        await store.close()

    run(scenario())


def test_replay_stops_at_the_first_failure_and_keeps_the_rest() -> None:
    async def scenario() -> None:
        clock = ManualClock()
        store, hints = make(MemoryEngine(), clock)
        await store.start()
        for i in range(4):
            await hints.store_hint("n2", "ks", i, b"k%d" % i, Cell(b"1", Timestamp(i)))
        calls = 0

        async def flaky(target, keyspace, token, key, cell):
            nonlocal calls
            calls += 1
            if calls == 3:
                raise PeerUnreachable("gone again", node_id=target)

        replayer = HintReplayer(hints, flaky, lambda node: True, rate_per_s=10_000)
        assert await replayer.replay("n2") == 2
        assert await hints.count("n2") == 2
        assert hints.stats.failed_replays == 1
        await store.close()

    run(scenario())


def test_hints_older_than_the_window_are_dropped_and_counted() -> None:
    async def scenario() -> None:
        clock = ManualClock()
        store, hints = make(MemoryEngine(), clock, window_s=60)
        await store.start()
        await hints.store_hint("n2", "ks", 1, b"old", Cell(b"1", Timestamp(1)))
        clock.advance(61)
        await hints.store_hint("n2", "ks", 2, b"new", Cell(b"1", Timestamp(2)))
        delivered: list[bytes] = []

        async def deliver(target, keyspace, token, key, cell):
            delivered.append(key)

        expired: list[int] = []
        replayer = HintReplayer(hints, deliver, lambda node: True, rate_per_s=10_000,
                                on_expired=expired.append)
        await replayer.replay("n2")
        assert delivered == [b"new"]
        assert hints.stats.expired == 1 and expired == [1]
        await store.close()

    run(scenario())


def test_a_hint_older_than_gc_grace_is_never_replayed() -> None:
    """Its write may have been deleted since, and the tombstone purged after
    gc_grace: replaying it would resurrect the value. The window is longer
    here, so only gc_grace can stop it (without it, the hint is replayed)."""
    async def scenario(gc_grace_s: int | None) -> list[bytes]:
        clock = ManualClock()
        store = LocalStore(MemoryEngine(), clock)
        hints = HintStore(store, HybridLogicalClock(clock), clock, max_hint_window_s=3600,
                          gc_grace_s=gc_grace_s)
        await store.start()
        await hints.store_hint("n2", "ks", 1, b"old", Cell(b"1", Timestamp(1)))
        clock.advance(31)
        await hints.store_hint("n2", "ks", 2, b"new", Cell(b"1", Timestamp(2)))
        delivered: list[bytes] = []

        async def deliver(target, keyspace, token, key, cell):
            delivered.append(key)

        await HintReplayer(hints, deliver, lambda node: True, rate_per_s=10_000).replay("n2")
        assert await hints.count("n2") == 0  # delivered or dropped, none left
        await store.close()
        return delivered

    assert run(scenario(gc_grace_s=30)) == [b"new"]
    assert run(scenario(gc_grace_s=None)) == [b"old", b"new"]


def test_the_hints_for_a_node_that_left_the_ring_are_all_dropped() -> None:
    """A removed or replaced node never comes back: its hints go, page by page."""
    async def scenario() -> None:
        store, hints = make(MemoryEngine(), ManualClock())
        await store.start()
        for i in range(25):
            assert await hints.store_hint("gone", "ks", i, b"k%d" % i, Cell(b"v", Timestamp(i)))
        await hints.store_hint("n3", "ks", 9, b"other", Cell(b"9", Timestamp(9)))
        assert await hints.drop_target("gone", page=10) == 25
        assert await hints.count("gone") == 0 and "gone" not in hints.targets
        assert await hints.count("n3") == 1  # other targets untouched
        await store.close()

    run(scenario())


def test_a_zero_window_disables_hints() -> None:
    async def scenario() -> None:
        store, hints = make(MemoryEngine(), ManualClock(), window_s=0)
        await store.start()
        assert not await hints.store_hint("n2", "ks", 1, b"k", Cell(b"1", Timestamp(1)))
        await store.close()

    run(scenario())


def test_hints_survive_a_restart(tmp_path: Path) -> None:
    async def write() -> None:
        store, hints = make(LevelDBEngine(tmp_path / "db"), ManualClock())
        await store.start()
        await hints.store_hint("node-b", "ks", 1, b"k", Cell(b"1", Timestamp(1)))
        await store.close()

    async def reload() -> tuple[set[str], int]:
        store, hints = make(LevelDBEngine(tmp_path / "db"), ManualClock())
        await store.start()
        await hints.load()
        try:
            return hints.targets, await hints.count("node-b")
        finally:
            await store.close()

    run(write())
    assert run(reload()) == ({"node-b"}, 1)


class HeldScanEngine(MemoryEngine):
    """Scans like LevelDB, in a worker thread, from a snapshot taken when the
    scan starts; the test decides when the scan returns."""

    blocking = True

    def __init__(self) -> None:
        super().__init__()
        self.scanning = threading.Event()
        self.release = threading.Event()
        self.hold = False

    def scan(self, start, stop, *, limit=None):  # type: ignore[no-untyped-def]
        items = list(super().scan(start, stop, limit=limit))
        if self.hold:
            self.scanning.set()
            assert self.release.wait(timeout=10), "the test never released the scan"
        return iter(items)


def test_a_hint_stored_while_a_scan_finds_none_is_not_forgotten() -> None:
    """A replay's last, empty scan races a write that times out and stores a
    new hint: the target must stay known, or that hint waits for a restart."""

    async def scenario() -> None:
        engine = HeldScanEngine()
        clock = ManualClock()
        store, hints = make(engine, clock)
        await store.start()
        await hints.store_hint("n2", "ks", 1, b"a", Cell(b"1", Timestamp(1)))
        await hints.delete(await hints.oldest("n2", 10))  # replayed; "n2" still known
        engine.hold = True
        empty_scan = asyncio.ensure_future(hints.oldest("n2", 10))
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(None, engine.scanning.wait, 10)
        await hints.store_hint("n2", "ks", 2, b"b", Cell(b"2", Timestamp(2)))
        engine.release.set()
        assert await empty_scan == []
        engine.hold = False
        assert "n2" in hints.targets
        delivered: list[bytes] = []

        async def deliver(target, keyspace, token, key, cell):
            delivered.append(key)

        replayer = HintReplayer(hints, deliver, lambda node: True, rate_per_s=10_000)
        assert await replayer.replay("n2") == 1 and delivered == [b"b"]
        assert await hints.oldest("n2", 10) == [] and "n2" not in hints.targets
        await replayer.stop()
        await store.close()

    run(scenario())


def test_the_hint_window_closes_for_a_replica_down_too_long() -> None:
    """Cassandra's max_hint_window: a replica DOWN for longer gets no more hints
    (repair brings it up to date); one that only failed a write, or came back,
    gets them again."""
    from ringkv.repair.hint_window import HintWindow

    window = HintWindow(max_hint_window_s=10.0)
    assert window.accepts("n2", now_s=0.0)  # UP, failed one write
    window.down("n2", now_s=100.0)
    window.down("n2", now_s=105.0)  # a repeated DOWN report does not restart the window
    assert window.accepts("n2", now_s=110.0)
    assert not window.accepts("n2", now_s=110.5)
    window.up("n2")
    assert window.accepts("n2", now_s=500.0)
