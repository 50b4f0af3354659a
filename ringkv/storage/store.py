"""A replica's local store: cells in token order, with group commit.

This is the asyncio shell around an ``Engine``. Writes that arrive during one
event-loop turn are reconciled against what is stored and written as a single
engine batch (group commit). A write newer than anything ever stored in its
slice of the token space wins without reading the stored cell (see
``_merge``); only a write that may be older is reconciled against it. In
``batch`` sync mode that batch is fsynced before any write in it is
acknowledged; in ``periodic`` mode writes are acknowledged once they are in
the engine's log, and a background task fsyncs every interval. Only one
batch is in flight at a time, so batches reach the disk in the order they
were formed, and later writes queue up behind it — the busier the node, the
bigger (and cheaper per write) the batches.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from ringkv.clock import Clock
from ringkv.errors import CorruptRecord, Overloaded, ShuttingDown, StorageError
from ringkv.hlc import MAX_LOGICAL, MAX_WALL_US, Timestamp
from ringkv.storage import keys
from ringkv.storage.engine import Engine
from ringkv.versioning import Cell, decode_cell, encode_cell, reconcile

log = logging.getLogger(__name__)

T = TypeVar("T")

SYNC_MODES = ("periodic", "batch")

# The newest cell timestamp per slice of the token space (the top bits of the
# token): a write newer than its slice's can have nothing newer stored, so it
# needs no read. 4,096 slices keep concurrent writes to different keys apart.
NEWEST_SLICE_BITS = 12
_SLICE_SHIFT = 64 - NEWEST_SLICE_BITS
_SLICE_MASK = (1 << NEWEST_SLICE_BITS) - 1
_NOTHING = Timestamp(0, 0)  # every real write is newer (HLC wall time is never 0)
_UNKNOWN = Timestamp(MAX_WALL_US, MAX_LOGICAL)  # no write is newer: read before every write
_NEWEST = struct.Struct(">QI")


@dataclass(frozen=True, slots=True)
class StoredCell:
    keyspace: str
    token: int
    key: bytes
    cell: Cell


@dataclass
class StoreStats:
    writes_applied: int = 0
    writes_superseded: int = 0  # arrived older than what was stored, so dropped (LWW)
    # Applied without reading the stored cell: newer than anything stored in their slice.
    writes_unread: int = 0
    batches: int = 0
    syncs: int = 0
    corrupt_records: int = 0
    purged: int = 0
    # Purgeable by age, but kept: their range has not been repaired since they
    # were written (repair-aware GC); counted once per sweep that keeps them.
    purges_awaiting_repair: int = 0


class LocalStore:
    def __init__(
        self,
        engine: Engine,
        clock: Clock,
        *,
        sync_mode: str = "periodic",
        periodic_sync_interval_ms: int = 1000,
        gc_grace_s: int = 864000,
        sweep_interval_s: float = 3600.0,
        max_pending_writes: int = 10_000,
        sweep_chunk: int = 1000,
        repaired_since: Callable[[str, int], int | None] | None = None,
    ) -> None:
        """``repaired_since(keyspace, token)``: when (wall µs) the range holding
        the token last began a repair that completed with every replica, or
        None. Given, the sweep is repair-aware (``_repaired_after``)."""
        if sync_mode not in SYNC_MODES:
            raise ValueError(f"sync_mode must be one of {SYNC_MODES}, got {sync_mode!r}")
        self._engine = engine
        self._clock = clock
        self._sync_mode = sync_mode
        self._sync_interval_s = periodic_sync_interval_ms / 1000
        self._gc_grace_s = gc_grace_s
        self._sweep_interval_s = sweep_interval_s
        self._max_pending_writes = max_pending_writes
        self._sweep_chunk = sweep_chunk
        self._repaired_since = repaired_since
        # Writes not yet handed to the engine: raw key -> winning cell, or None
        # for a purge. Reads look here first, then at the batch being written.
        self._pending: dict[bytes, Cell | bytes | None] = {}
        self._waiters: list[asyncio.Future[None]] = []
        self._flushing: dict[bytes, Cell | bytes | None] = {}
        self._flushing_waiters: list[asyncio.Future[None]] = []  # share that batch's fate
        self._flush_task: asyncio.Task[None] | None = None
        self._background: list[asyncio.Task[None]] = []
        self._closed = False
        self.stats = StoreStats()
        # The newest timestamp merged into each slice, and over all of them; the
        # latter is written with every batch that raises it (the same atomic
        # engine write as its cells), so after a restart it bounds every stored
        # cell, and each slice starts from it. A data directory written before
        # the record existed gets it from a scan in ``start`` (until then every
        # write reads first, as before).
        record = engine.get(keys.NEWEST_KEY)
        if record is not None:
            newest = Timestamp(*_NEWEST.unpack(record))
        elif next(iter(engine.scan(keys.DATA_PREFIX, keys.DATA_END, limit=1)), None) is None:
            newest = _NOTHING
        else:
            newest = _UNKNOWN
        self._newest_all = self._newest_stored = newest
        self._newest: list[Timestamp] = [newest] * (1 << NEWEST_SLICE_BITS)
        self._merged_unknown = _NOTHING  # the newest write merged while that was unknown

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        if self._newest_all is _UNKNOWN:
            await self._learn_newest()
        if self._sync_mode == "periodic":
            self._background.append(asyncio.create_task(self._periodic_sync_loop()))
        self._background.append(asyncio.create_task(self._sweep_loop()))

    async def close(self) -> None:
        """Write out everything pending, fsync, and close the engine."""
        if self._closed:
            return
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await self.flush()
        self._closed = True
        await self._run(self._engine.sync)
        self._engine.close()

    async def _learn_newest(self) -> None:
        """The newest stored timestamp, from a scan of every data record (once, for a
        data directory from before the record was kept), made durable at once."""
        newest = _NOTHING
        start = keys.DATA_PREFIX
        while True:
            items = await self._run(
                lambda s=start: list(self._engine.scan(s, keys.DATA_END, limit=self._sweep_chunk))
            )
            if not items:
                break
            for _raw, record in items:
                try:
                    newest = max(newest, decode_cell(record).ts)
                except CorruptRecord:
                    continue  # replaced by any write to it, read or not
            start = items[-1][0] + b"\x00"
        # Writes merged meanwhile (each read first) may not have reached the scan.
        newest = max(newest, self._merged_unknown)
        await self._run(self._engine.write, [(keys.NEWEST_KEY, _NEWEST.pack(*newest))], [],
                        sync=True)
        self._newest_stored = newest
        # And some more may have come while that was written: the next batch records them.
        newest = max(newest, self._merged_unknown)
        self._newest_all = newest
        self._newest = [newest] * (1 << NEWEST_SLICE_BITS)
        log.info("learned the newest stored cell timestamp from a scan: %s", newest)

    # -- reads -------------------------------------------------------------

    def read(self, keyspace: str, token: int, key: bytes) -> Cell | None:
        """The stored cell (live or not), or None. Raises CorruptRecord."""
        return self._current(keys.data_key(keyspace, token, key))

    def _current(self, raw: bytes) -> Cell | None:
        if raw in self._pending:
            return self._pending[raw]  # type: ignore[return-value]  # data keys hold cells
        if raw in self._flushing:
            return self._flushing[raw]  # type: ignore[return-value]
        self._check_open()
        record = self._engine.get(raw)
        if record is None:
            return None
        try:
            return decode_cell(record)
        except CorruptRecord:
            self.stats.corrupt_records += 1
            log.error("corrupt record at key %r", raw[:64])
            raise

    async def scan(
        self, keyspace: str, *, after: tuple[int, bytes] | None, limit: int
    ) -> list[StoredCell]:
        """Up to ``limit`` stored cells of ``keyspace`` in token order, after (token, key).

        Corrupt records are skipped (and counted), never returned as data.
        """
        await self.flush()
        if after is None:
            start = keys.keyspace_prefix(keyspace)
        else:
            start = keys.data_key(keyspace, after[0], after[1]) + b"\x00"
        stop = keys.keyspace_end(keyspace)
        items = await self._run(lambda: list(self._engine.scan(start, stop, limit=limit)))
        return self._decode_items(items)

    async def scan_range(
        self, keyspace: str, start_exclusive: int, end_inclusive: int, *, limit: int | None = None
    ) -> list[StoredCell]:
        """Stored cells with tokens in (start_exclusive, end_inclusive], not wrapping."""
        await self.flush()
        lo, hi = keys.range_bounds(keyspace, start_exclusive, end_inclusive)
        items = await self._run(lambda: list(self._engine.scan(lo, hi, limit=limit)))
        return self._decode_items(items)

    def _decode_items(self, items: Sequence[tuple[bytes, bytes]]) -> list[StoredCell]:
        out = []
        for raw, record in items:
            try:
                keyspace, token, key = keys.parse_data_key(raw)
                out.append(StoredCell(keyspace, token, key, decode_cell(record)))
            except CorruptRecord:
                self.stats.corrupt_records += 1
                log.error("skipping corrupt record at key %r", raw[:64])
        return out

    # -- writes ------------------------------------------------------------

    async def apply(self, keyspace: str, token: int, key: bytes, cell: Cell) -> Cell:
        """Merge ``cell`` into the store (LWW) and wait until it is committed.

        Returns the cell that is stored afterwards: ``cell`` itself, or a newer
        one that was already there. Either way, once this returns, the stored
        state includes ``cell``'s effect with the durability of the sync mode.
        """
        winner, committed = self._merge(keyspace, token, key, cell)
        await committed
        return winner

    def apply_future(
        self, keyspace: str, token: int, key: bytes, cell: Cell
    ) -> asyncio.Future[None]:
        """``apply`` without the wait: a future that resolves (or fails) once
        the merged result is committed. For callers that answer from a
        callback rather than a task of their own."""
        return self._merge(keyspace, token, key, cell)[1]

    def _merge(
        self, keyspace: str, token: int, key: bytes, cell: Cell
    ) -> tuple[Cell, asyncio.Future[None]]:
        """The stored winner now, and the future of its commit."""
        self._check_open()
        if len(self._waiters) + len(self._flushing_waiters) >= self._max_pending_writes:
            raise Overloaded(
                "storage write queue is full", limit=self._max_pending_writes
            )
        raw = keys.data_key(keyspace, token, key)
        ts = cell.ts
        newest = self._newest
        slice_ = (token >> _SLICE_SHIFT) & _SLICE_MASK
        if ts > newest[slice_]:
            # Newer than every cell ever stored in this slice (pending ones too): it
            # wins against whatever is stored, so that is not read (Cassandra reads
            # nothing before a write; this reads only when the write may be older).
            newest[slice_] = ts
            if ts > self._newest_all:
                self._newest_all = ts
            self._pending[raw] = cell
            self.stats.writes_applied += 1
            self.stats.writes_unread += 1
            return cell, self._enqueue_commit()
        if newest[slice_] is _UNKNOWN and ts > self._merged_unknown:
            self._merged_unknown = ts  # for the bound learned when the scan ends
        try:
            current = self._current(raw)
        except CorruptRecord:
            # A corrupt record can never be returned, so the incoming write
            # replaces it; that is how repair heals a corrupt replica.
            current = None
        winner = reconcile(current, cell)
        assert winner is not None
        if winner is cell and winner != current:
            self._pending[raw] = cell
            self.stats.writes_applied += 1
        else:
            self.stats.writes_superseded += 1
            if raw not in self._pending and raw in self._flushing:
                # What beat this write is in the batch being written now; if
                # that batch fails, neither reached the disk, so this write
                # must fail with it rather than be acknowledged by a later one.
                return winner, self._join_in_flight_batch()
        return winner, self._enqueue_commit()

    async def write_raw(self, puts: Sequence[tuple[bytes, bytes]], deletes: Sequence[bytes]) -> None:
        """Commit records outside the data key space (hints, metadata) with group commit."""
        self._check_open()
        if len(self._waiters) >= self._max_pending_writes:
            raise Overloaded("storage write queue is full", limit=self._max_pending_writes)
        for raw in deletes:
            self._pending[raw] = None
        for raw, record in puts:
            self._pending[raw] = record
        await self._enqueue_commit()

    async def scan_raw(
        self, start: bytes, stop: bytes, *, limit: int
    ) -> list[tuple[bytes, bytes]]:
        """Committed records in [start, stop), off the event loop."""
        await self.flush()
        return await self._run(lambda: list(self._engine.scan(start, stop, limit=limit)))

    def _enqueue_commit(self) -> asyncio.Future[None]:
        """A future that resolves once the next batch is committed. (A plain function
        handing back the future, not a coroutine: one frame fewer on every write.)"""
        # Even a superseded write waits for the next batch: the newer cell
        # that beat it may itself still be waiting to reach the disk.
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        self._waiters.append(waiter)
        if self._flush_task is None or self._flush_task.done():
            self._flush_task = loop.create_task(self._flush_loop())
        return waiter

    def _join_in_flight_batch(self) -> asyncio.Future[None]:
        """A future that resolves with the batch being written now (its fate, too)."""
        waiter = asyncio.get_running_loop().create_future()
        self._flushing_waiters.append(waiter)
        return waiter

    async def flush(self) -> None:
        """Wait until every write accepted so far has been handed to the engine."""
        if self._pending or self._waiters or (self._flush_task and not self._flush_task.done()):
            await self._enqueue_commit()

    async def _flush_loop(self) -> None:
        while self._waiters:
            batch, waiters = self._pending, self._waiters
            self._pending, self._waiters = {}, []
            self._flushing, self._flushing_waiters = batch, waiters
            puts = [
                (raw, encode_cell(item) if isinstance(item, Cell) else item)
                for raw, item in batch.items()
                if item is not None
            ]
            deletes = [raw for raw, item in batch.items() if item is None]
            newest = self._newest_all
            recorded = newest > self._newest_stored and newest is not _UNKNOWN
            if recorded:
                # With the cells it bounds, in the same atomic write.
                puts.append((keys.NEWEST_KEY, _NEWEST.pack(*newest)))
            sync = self._sync_mode == "batch"
            try:
                if sync and (puts or deletes):
                    await self._run(self._engine.write, puts, deletes, sync=True)
                    self.stats.syncs += 1
                elif puts or deletes:
                    # An unsynced write only appends to LevelDB's log and
                    # memtable: cheaper inline than a hop to a worker thread.
                    self._engine.write(puts, deletes, sync=False)
                if puts or deletes:
                    self.stats.batches += 1
                if recorded:
                    self._newest_stored = max(self._newest_stored, newest)
            except Exception as exc:  # noqa: BLE001 - every waiter must hear about it
                error = exc if isinstance(exc, StorageError) else StorageError(str(exc))
                for waiter in waiters:
                    if not waiter.done():
                        waiter.set_exception(error)
            else:
                for waiter in waiters:
                    if not waiter.done():
                        waiter.set_result(None)
            finally:
                self._flushing, self._flushing_waiters = {}, []

    # -- background work ---------------------------------------------------

    async def _periodic_sync_loop(self) -> None:
        while True:
            await self._clock.sleep(self._sync_interval_s)
            try:
                await self._run(self._engine.sync)
                self.stats.syncs += 1
            except StorageError:
                log.exception("periodic sync failed")

    async def _sweep_loop(self) -> None:
        while True:
            await self._clock.sleep(self._sweep_interval_s)
            try:
                await self.sweep()
            except StorageError:
                log.exception("tombstone sweep failed")

    async def sweep(self) -> int:
        """Purge tombstones and expired cells older than gc_grace. Returns how many.

        Scans in chunks off the event loop, and re-checks each cell just before
        deleting it, so a write that lands during the sweep is never lost.
        """
        purged = 0
        start = keys.DATA_PREFIX
        stop = bytes([keys.DATA_PREFIX[0] + 1])
        while True:
            items = await self._run(
                lambda s=start: list(self._engine.scan(s, stop, limit=self._sweep_chunk))
            )
            if not items:
                return purged
            now_us = self._clock.wall_us()
            doomed = []
            for raw, record in items:
                try:
                    cell = decode_cell(record)
                except CorruptRecord:
                    continue
                if cell.is_purgeable(now_us, self._gc_grace_s):
                    if self._repaired_after(raw, cell):
                        doomed.append((raw, cell))
                    else:
                        self.stats.purges_awaiting_repair += 1
            for raw, cell in doomed:
                try:
                    still_there = self._current(raw) == cell
                except CorruptRecord:
                    still_there = False
                if still_there:
                    self._pending[raw] = None
                    purged += 1
                    self.stats.purged += 1
            if doomed:
                await self._enqueue_commit()
            start = items[-1][0] + b"\x00"

    def _repaired_after(self, raw: bytes, cell: Cell) -> bool:
        """Repair-aware GC (ScyllaDB's ``tombstone_gc: repair``): a tombstone or
        expired cell goes only once a repair of its range began after it was
        written, so every replica holds it (or newer) and no replica that
        missed the delete can bring the old value back."""
        if self._repaired_since is None:
            return True  # GC by age alone
        keyspace, token, _key = keys.parse_data_key(raw)
        since = self._repaired_since(keyspace, token)
        return since is not None and since > cell.ts.wall_us

    # -- helpers -----------------------------------------------------------

    def size_bytes(self) -> int:
        return self._engine.size_bytes()

    def _check_open(self) -> None:
        if self._closed:
            raise ShuttingDown("the local store is closed")

    async def _run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run an engine call off the event loop when it may block on I/O."""
        if not self._engine.blocking:
            return fn(*args, **kwargs)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, lambda: fn(*args, **kwargs))
