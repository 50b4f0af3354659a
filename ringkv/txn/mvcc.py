"""The transactional tier's multi-version store: (keyspace, token, key, commit_ts) -> value | tombstone.

A Paxos group folds each committed write into this store at its commit
timestamp; reads at a timestamp ``t`` see the newest version at or below
``t`` and need no lock (Spanner §4.1: snapshot reads, served wherever the
safe time has passed ``t``, which is the caller's to check). The layout is
``mvcc_keys``: versions of one key adjacent and newest first, in token
order, under their own prefix in the node's one engine, beside the
eventual tier's data. The store does not own the engine; whoever opened it
closes it.

Writes follow ``storage.store``'s conventions: one atomic engine batch per
commit timestamp, fsynced when asked, and run off the event loop when the
engine may block (``apply``; ``apply_now`` is the same write, in place).
Point reads are one engine seek and stay on the loop, as ``LocalStore.read``
does; ``scan`` runs off the loop like ``LocalStore.scan``.

Garbage collection (``gc``, decided by ``mvcc_gc.plan_gc``) removes versions
no read at or above its horizon can see, a bounded batch per call. Each
batch that deletes anything also records the keyspace's GC threshold (the
highest horizon collected at) in the same engine batch, and reads below the
threshold raise ``SnapshotTooOld`` instead of answering from a history that
has been thinned: CockroachDB's GC threshold, kept across restarts.

Versions of one key must be applied in commit-timestamp order (a Paxos log
applies them in order): GC may drop a tombstone at or below its horizon, and
a version older than that tombstone applied afterwards would show through.
Re-applying the same entry at the same timestamp is harmless (the record is
rewritten as it was), so a log replayed after a crash can apply again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NamedTuple, TypeVar

from ringkv.errors import Compacted, CorruptRecord, SnapshotTooOld
from ringkv.ring import token_for
from ringkv.storage.engine import Engine
from ringkv.txn import mvcc_keys
from ringkv.txn.mvcc_gc import GC_BATCH_RECORDS, GcCandidate, plan_gc

log = logging.getLogger(__name__)

T = TypeVar("T")

# A page of changes (a watch's poll of one range) holds about this much at most: a
# whole transaction always fits (its request is at most limits.max_request_bytes),
# and the page stays well below an internode frame (ringkv.limits.MAX_FRAME_BYTES).
CHANGES_MAX_BYTES = 8 * 1024 * 1024
SCAN_MAX_EXAMINED = 10_000  # records and seeks one scan page may spend, whatever it finds
# Versions a scan steps over within one key before it seeks past them instead
# (CockroachDB's scanner does the same: next a few times, then seek).
NEXTS_BEFORE_SEEK = 8
_MIN_SCAN_EXAMINED = 2 * NEXTS_BEFORE_SEEK + 4  # enough to finish at least one key


class Version(NamedTuple):
    """One version of a key: its value, or None for a tombstone, and its commit timestamp."""

    value: bytes | None
    commit_ts_us: int


class MvccItem(NamedTuple):
    token: int
    key: bytes
    value: bytes
    commit_ts_us: int


class ScanPage(NamedTuple):
    items: list[MvccItem]
    # (token, key) to pass as ``after`` for the next page; None: the range is done.
    resume_after: tuple[int, bytes] | None


class ChangeItem(NamedTuple):
    """One committed write, as a watch sees it: ``value`` None is a delete."""

    key: bytes
    value: bytes | None
    commit_ts_us: int


class ChangesPage(NamedTuple):
    # The changes with commit timestamps in (since, complete_through_us], all of them,
    # in (commit_ts_us, key) order.
    items: list[ChangeItem]
    complete_through_us: int


class GcResult(NamedTuple):
    deleted: int
    examined: int
    more: bool  # call again (after yielding to the loop) to go on


@dataclass
class MvccStats:
    versions_written: int = 0
    batches: int = 0
    syncs: int = 0
    gc_examined: int = 0
    gc_deleted: int = 0
    corrupt_records: int = 0


def _page_cut(found: list[tuple[int, bytes, bytes | None]], limit: int, max_bytes: int) -> int:
    """How many of ``found`` (sorted) one page holds: at most ``limit`` and
    ``max_bytes``, but never fewer than the first version's writes (one
    transaction: a page that cut it would never move past it)."""
    size = 0
    for i, (ts_us, key, value) in enumerate(found):
        size += len(key) + (0 if value is None else len(value))
        if (i >= limit or size > max_bytes) and ts_us != found[0][0]:
            return i
    return len(found)


class MvccStore:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._write_lock = asyncio.Lock()  # applies reach the engine in call order
        self._thresholds: dict[str, int] = {}  # keyspace -> GC threshold, read once
        self._gc_cursors: dict[str, bytes] = {}  # keyspace -> where the next GC batch starts
        self.stats = MvccStats()

    # -- reads -------------------------------------------------------------

    def read(self, keyspace: str, key: bytes, at_ts_us: int) -> Version | None:
        """The value a snapshot read at ``at_ts_us`` sees (never a tombstone), or None.

        Raises ``SnapshotTooOld`` below the GC threshold, ``CorruptRecord``
        when the version it would return is damaged.
        """
        version = self.read_version(keyspace, key, at_ts_us)
        return None if version is None or version.value is None else version

    def read_version(self, keyspace: str, key: bytes, at_ts_us: int) -> Version | None:
        """The newest version at or below ``at_ts_us``, tombstones included: one seek."""
        self._check_readable(keyspace, at_ts_us)
        prefix = mvcc_keys.key_prefix(keyspace, token_for(key), key)
        for raw, record in self._engine.scan(
            mvcc_keys.seek_key(prefix, at_ts_us), mvcc_keys.key_prefix_end(prefix), limit=1
        ):
            return Version(self._decode(raw, record), mvcc_keys.split_version_key(raw)[1])
        return None

    def latest_version(self, keyspace: str, key: bytes) -> Version | None:
        """The newest version of ``key`` whatever its timestamp, tombstone included (for
        compare-and-set). A tombstone GC has dropped reads as None, which is "absent" too."""
        return self.read_version(keyspace, key, mvcc_keys.MAX_TS_US)

    async def scan(
        self,
        keyspace: str,
        start_exclusive: int,
        end_inclusive: int,
        at_ts_us: int,
        *,
        limit: int,
        after: tuple[int, bytes] | None = None,
        max_examined: int = SCAN_MAX_EXAMINED,
    ) -> ScanPage:
        """``scan_now``, off the event loop when the engine may block."""
        return await self._run(
            lambda: self.scan_now(
                keyspace, start_exclusive, end_inclusive, at_ts_us,
                limit=limit, after=after, max_examined=max_examined,
            )
        )

    def scan_now(
        self,
        keyspace: str,
        start_exclusive: int,
        end_inclusive: int,
        at_ts_us: int,
        *,
        limit: int,
        after: tuple[int, bytes] | None = None,
        max_examined: int = SCAN_MAX_EXAMINED,
    ) -> ScanPage:
        """Live values a snapshot read at ``at_ts_us`` sees, for tokens in
        (start_exclusive, end_inclusive] (not wrapping), in token order, after
        (token, key) ``after``: at most ``limit`` of them, for at most
        ``max_examined`` records and seeks. Corrupt records are skipped and counted.
        """
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        if max_examined < _MIN_SCAN_EXAMINED:
            raise ValueError(f"max_examined must be at least {_MIN_SCAN_EXAMINED}, got {max_examined}")
        self._check_readable(keyspace, at_ts_us)
        lo, hi = mvcc_keys.range_bounds(keyspace, start_exclusive, end_inclusive)
        if after is not None:
            lo = max(lo, mvcc_keys.key_prefix_end(mvcc_keys.key_prefix(keyspace, *after)))
        at_us = min(at_ts_us, mvcc_keys.MAX_TS_US)
        items: list[MvccItem] = []
        examined = 0
        owner: bytes | None = None  # the key being looked at
        resolved = False  # its visible version is decided
        skipped = 0  # records of it stepped over since the last decision
        done: bytes | None = None  # the last key whose visible version is decided
        position = lo
        while True:  # bounded: each round spends a seek and at least one record of max_examined
            seek_to: bytes | None = None
            for raw, record in self._engine.scan(position, hi, limit=max_examined - examined):
                examined += 1
                try:
                    prefix, ts_us = mvcc_keys.split_version_key(raw)
                except CorruptRecord:
                    self._count_corrupt(raw)
                else:
                    if prefix != owner:
                        if owner is not None:
                            done = owner  # none of its versions was at or below at_ts_us
                        owner, resolved, skipped = prefix, False, 0
                    if not resolved and ts_us <= at_us:
                        resolved, skipped, done = True, 0, prefix
                        item = self._scan_item(raw, prefix, ts_us, record)
                        if item is not None:
                            items.append(item)
                    else:
                        skipped += 1
                        if skipped > NEXTS_BEFORE_SEEK:
                            # Many versions to step over: seek past them instead.
                            seek_to = (
                                mvcc_keys.key_prefix_end(prefix)
                                if resolved
                                else mvcc_keys.seek_key(prefix, at_us)
                            )
                if seek_to is not None or len(items) >= limit or examined >= max_examined:
                    break
            else:
                if examined < max_examined:
                    return ScanPage(items, None)  # the engine ran out: the range is done
            if seek_to is None or len(items) >= limit or examined >= max_examined:
                break
            position = seek_to
            examined += 1  # a seek costs about what a step does
        if done is None:
            # max_examined >= _MIN_SCAN_EXAMINED decides at least one key,
            # unless every record in the page had a damaged engine key.
            raise CorruptRecord(f"a scan of {keyspace!r} met only damaged MVCC keys")
        _, token, key = mvcc_keys.parse_key_prefix(done)
        return ScanPage(items, (token, key))

    # -- changes (watches) -------------------------------------------------

    async def changes(self, keyspace: str, start_exclusive: int, end_inclusive: int,
                      since_us: int, upto_us: int, *, prefix: bytes = b"",
                      exact: bytes | None = None, limit: int,
                      max_bytes: int = CHANGES_MAX_BYTES) -> ChangesPage:
        """``changes_now``, off the event loop when the engine may block."""
        return await self._run(
            lambda: self.changes_now(keyspace, start_exclusive, end_inclusive, since_us, upto_us,
                                     prefix=prefix, exact=exact, limit=limit,
                                     max_bytes=max_bytes))

    def changes_now(self, keyspace: str, start_exclusive: int, end_inclusive: int,
                    since_us: int, upto_us: int, *, prefix: bytes = b"",
                    exact: bytes | None = None, limit: int,
                    max_bytes: int = CHANGES_MAX_BYTES) -> ChangesPage:
        """Every version committed in (since_us, upto_us] of the keys starting with
        ``prefix`` (or of the one key ``exact``) whose tokens are in
        (start_exclusive, end_inclusive] (a ring range: it may wrap): puts and tombstones, ordered by
        (commit_ts_us, key).

        At most ``limit`` of them and ``max_bytes`` of keys and values (but
        always the first transaction whole): when there are more, the page holds the ones
        with the lowest timestamps and ``complete_through_us`` says up to where it
        is complete (every change at or below it is in the page). Raises
        ``Compacted`` when GC has collected above ``since_us``: a version above
        it may be gone. The caller checks that the store has applied everything
        up to ``upto_us`` (safe time). Each key costs one or two seeks, plus its
        versions in the window: no index by timestamp is kept (it would have to
        travel with Paxos snapshots), so a prefix watch's cost grows with the
        keys of the range.
        """
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        if since_us < 0:
            raise ValueError(f"since_us {since_us} is below zero")
        self.check_changes_since(keyspace, since_us)
        upto_us = min(upto_us, mvcc_keys.MAX_TS_US)
        if upto_us <= since_us:
            return ChangesPage([], max(since_us, upto_us))
        found: list[tuple[int, bytes, bytes | None]] = []
        if exact is not None:
            self._key_changes(mvcc_keys.key_prefix(keyspace, token_for(exact), exact), exact,
                              since_us, upto_us, found)
        else:
            for lo, hi in mvcc_keys.token_range_bounds(keyspace, start_exclusive, end_inclusive):
                position = lo
                while position < hi:  # bounded: each round moves past a key (or a damaged record)
                    head = next(iter(self._engine.scan(position, hi, limit=1)), None)
                    if head is None:
                        break
                    raw = head[0]
                    try:
                        owner, _ = mvcc_keys.split_version_key(raw)
                        _, _, key = mvcc_keys.parse_key_prefix(owner)
                    except CorruptRecord:
                        self._count_corrupt(raw)
                        position = raw + b"\x00"
                        continue
                    if key.startswith(prefix):
                        self._key_changes(owner, key, since_us, upto_us, found)
                        if len(found) > 2 * limit + 2:  # memory stays bounded: keep the lowest
                            found.sort(key=lambda change: (change[0], change[1]))
                            first_us = found[0][0]
                            del found[max(limit + 1, sum(c[0] == first_us for c in found)):]
                    position = mvcc_keys.key_prefix_end(owner)
        found.sort(key=lambda change: (change[0], change[1]))
        complete_us = upto_us
        cut = _page_cut(found, limit, max_bytes)
        if cut < len(found):
            # Everything below the first version left out is in the page; that
            # version's other writes (one transaction) go together next time.
            complete_us = found[cut][0] - 1
            found = [change for change in found[:cut] if change[0] <= complete_us]
        return ChangesPage([ChangeItem(key, value, ts) for ts, key, value in found],
                           max(complete_us, since_us))

    def check_changes_since(self, keyspace: str, since_us: int) -> None:
        """Raises ``Compacted`` when GC has collected above ``since_us``: a change
        after it may be gone (``changes``, and an answer known without reading)."""
        threshold_us = self._threshold(keyspace)
        if since_us < threshold_us:
            raise Compacted(
                f"changes of {keyspace!r} after {since_us} are compacted: versions at or below "
                f"{threshold_us} have been garbage-collected (txn.mvcc_gc_s)",
                from_version=since_us, oldest_version=threshold_us)

    async def newest_commit(self, keyspace: str, start_exclusive: int,
                            end_inclusive: int) -> int:
        """``newest_commit_now``, off the event loop when the engine may block."""
        return await self._run(
            lambda: self.newest_commit_now(keyspace, start_exclusive, end_inclusive))

    def newest_commit_now(self, keyspace: str, start_exclusive: int, end_inclusive: int) -> int:
        """The newest commit timestamp of any version (a put or a tombstone) whose key's
        token is in (start_exclusive, end_inclusive], 0 for none: one seek per key, as its
        versions are stored newest first. A damaged record counts as written at the
        newest timestamp there is (its own is unknown)."""
        newest_us = 0
        for lo, hi in mvcc_keys.token_range_bounds(keyspace, start_exclusive, end_inclusive):
            position = lo
            while position < hi:  # bounded: each round moves past a key (or a damaged record)
                head = next(iter(self._engine.scan(position, hi, limit=1)), None)
                if head is None:
                    break
                raw = head[0]
                try:
                    owner, ts_us = mvcc_keys.split_version_key(raw)
                except CorruptRecord:
                    self._count_corrupt(raw)
                    return mvcc_keys.MAX_TS_US
                newest_us = max(newest_us, ts_us)
                position = mvcc_keys.key_prefix_end(owner)
        return newest_us

    def _key_changes(self, owner: bytes, key: bytes, since_us: int, upto_us: int,
                     found: list[tuple[int, bytes, bytes | None]]) -> None:
        """The versions of one key in (since_us, upto_us], appended to ``found``:
        they lie between two seeks (newest first)."""
        for raw, record in self._engine.scan(mvcc_keys.seek_key(owner, upto_us),
                                             mvcc_keys.seek_key(owner, since_us)):
            try:
                _, ts_us = mvcc_keys.split_version_key(raw)
                value = mvcc_keys.decode_record(record)
            except CorruptRecord:
                self._count_corrupt(raw)
                continue
            found.append((ts_us, key, value))

    def _scan_item(self, raw: bytes, prefix: bytes, ts_us: int, record: bytes) -> MvccItem | None:
        try:
            value = mvcc_keys.decode_record(record)
            if value is None:
                return None
            _, token, key = mvcc_keys.parse_key_prefix(prefix)
        except CorruptRecord:
            self._count_corrupt(raw)
            return None
        return MvccItem(token, key, value, ts_us)

    # -- writes ------------------------------------------------------------

    async def apply(
        self,
        keyspace: str,
        entries: Mapping[bytes, bytes | None],
        commit_ts_us: int,
        *,
        sync: bool = True,
    ) -> None:
        """Write every entry (a value, or None to delete) at ``commit_ts_us``, atomically.

        One engine batch, fsynced when ``sync``. An fsync on a blocking engine
        runs off the event loop (an unsynced write only reaches LevelDB's log
        and memtable, cheaper in place), and applies reach the engine in the
        order they were called.
        """
        async with self._write_lock:
            if sync and self._engine.blocking:
                await self._run(self.apply_now, keyspace, entries, commit_ts_us, sync=True)
            else:
                self.apply_now(keyspace, entries, commit_ts_us, sync=sync)

    def apply_now(
        self,
        keyspace: str,
        entries: Mapping[bytes, bytes | None],
        commit_ts_us: int,
        *,
        sync: bool = True,
    ) -> None:
        """``apply`` in place: for callers off the loop, or on a non-blocking engine."""
        mvcc_keys.check_ts(commit_ts_us)
        puts = []
        for key, value in entries.items():
            if not key:
                # The empty key's token is MIN_TOKEN, which no (start, end] range includes.
                raise ValueError("the empty key cannot be stored")
            puts.append(
                (
                    mvcc_keys.version_key(keyspace, token_for(key), key, commit_ts_us),
                    mvcc_keys.encode_record(value),
                )
            )
        if not puts:
            return
        self._engine.write(puts, (), sync=sync)
        self.stats.versions_written += len(puts)
        self.stats.batches += 1
        if sync:
            self.stats.syncs += 1

    # -- garbage collection ------------------------------------------------

    def gc(
        self, keyspace: str, horizon_ts_us: int, *, max_records: int = GC_BATCH_RECORDS
    ) -> GcResult:
        """Remove, from at most ``max_records`` versions of ``keyspace``, those no
        read at or above ``horizon_ts_us`` can see (see ``mvcc_gc``).

        Each call goes on where the last one stopped; ``more`` says the pass
        over the keyspace is not finished. The caller yields to the event loop
        between calls. Reads below the horizon are refused from then on.
        """
        if max_records < 2:
            raise ValueError(f"max_records must be at least 2, got {max_records}")
        mvcc_keys.check_ts(horizon_ts_us)
        lo, hi = mvcc_keys.keyspace_bounds(keyspace)
        start = max(lo, self._gc_cursors.get(keyspace, lo))
        items = list(self._engine.scan(start, hi, limit=max_records))
        candidates = []
        for raw, record in items:
            try:
                owner, ts_us = mvcc_keys.split_version_key(raw)
            except CorruptRecord:
                self._count_corrupt(raw)
                continue  # not a version GC can reason about: left alone
            try:
                tombstone = mvcc_keys.decode_record(record) is None
            except CorruptRecord:
                self._count_corrupt(raw)
                tombstone = False  # never lets a tombstone-drop go through
            candidates.append(GcCandidate(raw, owner, ts_us, tombstone))
        plan = plan_gc(candidates, horizon_ts_us, reached_end=len(items) < max_records)
        threshold_us = self._threshold(keyspace)
        if plan.deletes:
            puts = []
            if horizon_ts_us > threshold_us:
                # In the same batch as the deletes: no read can see the thinned
                # history without being refused, even after a crash.
                puts.append(
                    (mvcc_keys.gc_threshold_key(keyspace), mvcc_keys.encode_threshold(horizon_ts_us))
                )
            # Unsynced: a lost GC batch only brings back versions no read needs.
            self._engine.write(puts, plan.deletes, sync=False)
            if puts:
                self._thresholds[keyspace] = horizon_ts_us
        if plan.resume is None:
            self._gc_cursors.pop(keyspace, None)
        else:
            self._gc_cursors[keyspace] = plan.resume
        self.stats.gc_examined += len(items)
        self.stats.gc_deleted += len(plan.deletes)
        return GcResult(len(plan.deletes), len(items), plan.resume is not None)

    def gc_threshold_us(self, keyspace: str) -> int:
        """Reads of ``keyspace`` below this timestamp are refused (0: nothing collected yet)."""
        return self._threshold(keyspace)

    def raise_gc_threshold(self, keyspace: str, threshold_us: int) -> None:
        """Refuse reads of ``keyspace`` below ``threshold_us`` from now on: versions
        installed from a peer whose GC has thinned the history below it (a Paxos
        snapshot) cannot answer them. Unsynced, like a GC batch: the caller syncs."""
        mvcc_keys.check_ts(threshold_us)
        if threshold_us <= self._threshold(keyspace):
            return
        self._engine.write(
            [(mvcc_keys.gc_threshold_key(keyspace), mvcc_keys.encode_threshold(threshold_us))], (),
            sync=False,
        )
        self._thresholds[keyspace] = threshold_us

    # -- helpers -----------------------------------------------------------

    def _threshold(self, keyspace: str) -> int:
        threshold_us = self._thresholds.get(keyspace)
        if threshold_us is None:
            record = self._engine.get(mvcc_keys.gc_threshold_key(keyspace))
            threshold_us = 0 if record is None else mvcc_keys.decode_threshold(record)
            self._thresholds[keyspace] = threshold_us
        return threshold_us

    def _check_readable(self, keyspace: str, at_ts_us: int) -> None:
        if at_ts_us < 0:
            raise ValueError(f"read timestamp {at_ts_us} is below zero")
        threshold_us = self._threshold(keyspace)
        if at_ts_us < threshold_us:
            raise SnapshotTooOld(
                f"cannot read {keyspace!r} at {at_ts_us}: versions below {threshold_us} "
                "have been garbage-collected",
                snapshot_ts=at_ts_us,
                gc_threshold_ts=threshold_us,
            )

    def _decode(self, raw: bytes, record: bytes) -> bytes | None:
        try:
            return mvcc_keys.decode_record(record)
        except CorruptRecord:
            self._count_corrupt(raw)
            raise

    def _count_corrupt(self, raw: bytes) -> None:
        self.stats.corrupt_records += 1
        log.error("corrupt MVCC record at key %r", raw[:64])

    async def _run(self, fn: Callable[..., T], *args: object, **kwargs: object) -> T:
        """Run an engine call off the event loop when it may block on I/O."""
        if not self._engine.blocking:
            return fn(*args, **kwargs)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, lambda: fn(*args, **kwargs))
