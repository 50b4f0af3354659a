"""LevelDB engine, through plyvel. The only module in ringkv that imports plyvel.

plyvel releases the GIL around LevelDB calls, so the async shell can run
writes and long scans in a worker thread without stalling the event loop.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import plyvel

from ringkv.errors import StorageError

# A tiny record written with sync=True to force LevelDB's log to disk: LevelDB
# has no standalone fsync call, but a synced write flushes every earlier write
# in the same log.
_SYNC_MARKER_KEY = b"\x00sync"


class LevelDBEngine:
    blocking = True

    def __init__(self, path: Path, *, cache_mb: int = 64, write_buffer_mb: int = 16) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self._path = path
        try:
            self._db = plyvel.DB(
                str(path),
                create_if_missing=True,
                lru_cache_size=cache_mb * 1024 * 1024,
                write_buffer_size=write_buffer_mb * 1024 * 1024,
                paranoid_checks=True,
            )
        except plyvel.Error as exc:
            raise StorageError(f"cannot open LevelDB at {path}: {exc}") from exc

    def get(self, key: bytes) -> bytes | None:
        try:
            return self._db.get(key)
        except (plyvel.Error, RuntimeError) as exc:
            raise StorageError(f"LevelDB get failed: {exc}") from exc

    def write(
        self, puts: Sequence[tuple[bytes, bytes]], deletes: Sequence[bytes], *, sync: bool
    ) -> None:
        try:
            with self._db.write_batch(sync=sync) as batch:
                for key in deletes:
                    batch.delete(key)
                for key, value in puts:
                    batch.put(key, value)
        except (plyvel.Error, RuntimeError) as exc:
            raise StorageError(f"LevelDB write failed: {exc}") from exc

    def scan(
        self, start: bytes, stop: bytes | None, *, limit: int | None = None
    ) -> Iterator[tuple[bytes, bytes]]:
        try:
            with self._db.iterator(start=start, stop=stop) as it:
                for count, item in enumerate(it):
                    if limit is not None and count >= limit:
                        return
                    yield item
        except (plyvel.Error, RuntimeError) as exc:
            raise StorageError(f"LevelDB scan failed: {exc}") from exc

    def sync(self) -> None:
        try:
            self._db.put(_SYNC_MARKER_KEY, b"", sync=True)
        except (plyvel.Error, RuntimeError) as exc:
            raise StorageError(f"LevelDB sync failed: {exc}") from exc

    def size_bytes(self) -> int:
        total = 0
        with os.scandir(self._path) as entries:
            for entry in entries:
                if entry.is_file(follow_symlinks=False):
                    total += entry.stat().st_size
        return total

    def point_in_time(self) -> LevelDBView:
        try:
            return LevelDBView(self._db.snapshot())
        except (plyvel.Error, RuntimeError) as exc:
            raise StorageError(f"LevelDB snapshot failed: {exc}") from exc

    def close(self) -> None:
        if not self._db.closed:
            self._db.close()


class LevelDBView:
    """A LevelDB snapshot: reads see the database as it was when it was taken,
    whatever is written meanwhile (LevelDB keeps the versions it needs)."""

    def __init__(self, snapshot: plyvel.Snapshot) -> None:
        self._snapshot = snapshot

    def scan(
        self, start: bytes, stop: bytes | None, *, limit: int | None = None
    ) -> Iterator[tuple[bytes, bytes]]:
        try:
            with self._snapshot.iterator(start=start, stop=stop) as it:
                for count, item in enumerate(it):
                    if limit is not None and count >= limit:
                        return
                    yield item
        except (plyvel.Error, RuntimeError) as exc:
            raise StorageError(f"LevelDB snapshot scan failed: {exc}") from exc

    def close(self) -> None:
        self._snapshot.close()
