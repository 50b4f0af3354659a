"""Hinted handoff (Dynamo §4.6): writes kept for replicas that missed them.

When a replica is down or does not acknowledge a write in time, the
coordinator stores a hint: the write plus the replica it was meant for. Hints
are records in the node's own LevelDB, committed with the same group commit
as data, so they survive a restart. When gossip reports the replica UP again,
its hints are replayed to it, throttled, oldest first, and deleted once
acknowledged. Hints older than ``max_hint_window_s`` are dropped (and
counted): by then anti-entropy repair, not a hint, is the right tool. So are
hints older than ``gc_grace_s``, whatever the window: the tombstones that
superseded such a hint's write may already be purged, and replaying it would
bring the deleted value back.

Record layout::

    key   = b"h" | u8 len(target) | target | u64 wall_us | u32 logical   (HLC: unique, ordered)
    value = msgpack [keyspace, token, key, cell record]
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import msgpack

from ringkv.clock import Clock
from ringkv.hlc import HybridLogicalClock
from ringkv.errors import CorruptRecord, RingKVError
from ringkv.storage.store import LocalStore
from ringkv.versioning import Cell, decode_cell, encode_cell

log = logging.getLogger(__name__)

PREFIX = b"h"
_STAMP = struct.Struct(">QI")


def _target_prefix(target: str) -> bytes:
    name = target.encode()
    return PREFIX + bytes([len(name)]) + name


def _prefix_end(prefix: bytes) -> bytes:
    return prefix[:-1] + bytes([prefix[-1] + 1])


@dataclass(frozen=True)
class Hint:
    raw_key: bytes
    target: str
    created_us: int
    keyspace: str
    token: int
    key: bytes
    cell: Cell


@dataclass
class HintStats:
    stored: int = 0
    replayed: int = 0
    expired: int = 0
    failed_replays: int = 0


class HintStore:
    def __init__(
        self, store: LocalStore, hlc: HybridLogicalClock, clock: Clock, *, max_hint_window_s: int,
        gc_grace_s: int | None = None,
    ) -> None:
        self._store = store
        self._hlc = hlc
        self._clock = clock
        self.clock = clock  # the replayer waits on it too
        self.max_hint_window_s = max_hint_window_s
        self.gc_grace_s = gc_grace_s
        self.targets: set[str] = set()  # nodes that may have hints waiting
        # Bumped by every hint stored, so that a scan that found nothing while a
        # new hint was being stored does not forget the target (see ``oldest``).
        self._stored_version: dict[str, int] = {}
        self.stats = HintStats()

    async def load(self) -> None:
        """Find which targets have hints left from before a restart."""
        start = PREFIX
        for _ in range(100_000):  # bounded: one step per distinct target
            items = await self._store.scan_raw(start, _prefix_end(PREFIX), limit=1)
            if not items:
                return
            raw = items[0][0]
            name_len = raw[1]
            target = raw[2 : 2 + name_len].decode()
            self.targets.add(target)
            start = _prefix_end(_target_prefix(target))

    async def store_hint(
        self, target: str, keyspace: str, token: int, key: bytes, cell: Cell
    ) -> bool:
        if self.max_hint_window_s == 0:
            return False  # hints disabled
        stamp = self._hlc.now()
        raw = _target_prefix(target) + _STAMP.pack(stamp.wall_us, stamp.logical)
        value = msgpack.packb([keyspace, token, key, encode_cell(cell)], use_bin_type=True)
        await self._store.write_raw([(raw, value)], [])
        self._stored_version[target] = self._stored_version.get(target, 0) + 1
        self.targets.add(target)
        self.stats.stored += 1
        return True

    async def oldest(self, target: str, limit: int) -> list[Hint]:
        prefix = _target_prefix(target)
        version = self._stored_version.get(target, 0)
        items = await self._store.scan_raw(prefix, _prefix_end(prefix), limit=limit)
        hints = []
        for raw, value in items:
            try:
                hints.append(_decode(raw, target, value))
            except (CorruptRecord, ValueError, TypeError, msgpack.UnpackException) as exc:
                log.error("dropping corrupt hint for %s: %s", target, exc)
                await self._store.write_raw([], [raw])
        if not items and self._stored_version.get(target, 0) == version:
            self.targets.discard(target)
        return hints

    async def delete(self, hints: list[Hint]) -> None:
        if hints:
            await self._store.write_raw([], [hint.raw_key for hint in hints])

    async def drop_target(self, target: str, page: int = 1000) -> int:
        """Delete every hint kept for ``target`` (a node that left the ring)."""
        dropped = 0
        for _ in range(100_000):  # bounded: one step per page of hints
            hints = await self.oldest(target, page)
            if not hints:
                break
            await self.delete(hints)
            dropped += len(hints)
        self.targets.discard(target)
        return dropped

    def is_expired(self, hint: Hint) -> bool:
        """Past the hint window, or older than gc_grace (never replayed: see above)."""
        limit_s = self.max_hint_window_s
        if self.gc_grace_s is not None:
            limit_s = min(limit_s, self.gc_grace_s)
        return self._clock.wall_us() - hint.created_us > limit_s * 1_000_000

    async def count(self, target: str, limit: int = 1_000_000) -> int:
        prefix = _target_prefix(target)
        return len(await self._store.scan_raw(prefix, _prefix_end(prefix), limit=limit))


def _decode(raw: bytes, target: str, value: bytes) -> Hint:
    keyspace, token, key, record = msgpack.unpackb(value, raw=False)
    wall_us, _logical = _STAMP.unpack(raw[-_STAMP.size :])
    if not isinstance(keyspace, str) or not isinstance(token, int) or not isinstance(key, bytes):
        raise ValueError("malformed hint")
    return Hint(raw, target, wall_us, keyspace, token, key, decode_cell(record))


Deliver = Callable[[str, str, int, bytes, Cell], Awaitable[None]]


class HintReplayer:
    """Replays a target's hints when it is UP, throttled to ``rate_per_s`` hints per second."""

    def __init__(
        self,
        hints: HintStore,
        deliver: Deliver,
        is_alive: Callable[[str], bool],
        *,
        rate_per_s: int,
        batch_size: int = 100,
        on_replayed: Callable[[int], None] | None = None,
        on_expired: Callable[[int], None] | None = None,
    ) -> None:
        self._hints = hints
        self._deliver = deliver
        self._is_alive = is_alive
        self._rate_per_s = max(1, rate_per_s)
        self._batch_size = batch_size
        self._on_replayed = on_replayed
        self._on_expired = on_expired
        self._running: dict[str, asyncio.Task[int]] = {}

    def kick(self, target: str) -> None:
        """Start replaying ``target``'s hints unless a replay is already running."""
        if target not in self._hints.targets:
            return
        task = self._running.get(target)
        if task is None or task.done():
            self._running[target] = asyncio.create_task(self.replay(target))

    def kick_all(self) -> None:
        for target in sorted(self._hints.targets):  # a fixed order: runs replay exactly
            if self._is_alive(target):
                self.kick(target)

    async def stop(self) -> None:
        tasks = list(self._running.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def drop_expired(self, target: str) -> int:
        """Delete ``target``'s hints that outlived the window, oldest first (bounded)."""
        dropped = 0
        for _ in range(10_000):  # bounded; each round looks at one batch
            batch = await self._hints.oldest(target, self._batch_size)
            expired = [hint for hint in batch if self._hints.is_expired(hint)]
            await self._hints.delete(expired)
            dropped += len(expired)
            if len(expired) < len(batch) or not batch:
                break
        self._hints.stats.expired += dropped
        if self._on_expired and dropped:
            self._on_expired(dropped)
        return dropped

    async def replay(self, target: str) -> int:
        """Deliver ``target``'s hints oldest first. Stops at the first failure."""
        delivered = 0
        for _ in range(1_000_000):  # bounded; each round consumes a batch
            if not self._is_alive(target):
                break
            batch = await self._hints.oldest(target, self._batch_size)
            if not batch:
                break
            done: list[Hint] = []
            expired = [hint for hint in batch if self._hints.is_expired(hint)]
            failed = False
            for hint in batch:
                if hint in expired:
                    continue
                try:
                    await self._deliver(target, hint.keyspace, hint.token, hint.key, hint.cell)
                except RingKVError as exc:
                    log.info("hint replay to %s paused: %s", target, exc)
                    self._hints.stats.failed_replays += 1
                    failed = True
                    break
                done.append(hint)
            await self._hints.delete(done + expired)
            delivered += len(done)
            self._hints.stats.replayed += len(done)
            self._hints.stats.expired += len(expired)
            if self._on_replayed and done:
                self._on_replayed(len(done))
            if self._on_expired and expired:
                self._on_expired(len(expired))
            if failed:
                break
            await self._hints.clock.sleep(len(done) / self._rate_per_s)  # the throttle
        if delivered:
            log.info("replayed %d hints to %s", delivered, target)
        return delivered
