"""The storage engine protocol: an ordered byte-key map with atomic batches.

Engines know nothing about cells, keyspaces or tokens; ``storage.store``
builds those on top. Two engines exist: LevelDB (``storage.leveldb``, the only
module that imports plyvel) for real nodes, and an in-memory one
(``storage.memory``) for unit tests and the simulator.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol


class EngineView(Protocol):
    """A consistent, read-only view of an engine at one point in time (LevelDB's
    snapshot): writes after it was taken are not in it. Close it when done."""

    def scan(
        self, start: bytes, stop: bytes | None, *, limit: int | None = None
    ) -> Iterator[tuple[bytes, bytes]]:
        """Items with start <= key < stop as they were when the view was taken."""

    def close(self) -> None: ...


class Engine(Protocol):
    # True when calls may block on disk I/O, so the async shell should run
    # them off the event loop. The memory engine is never blocking, which also
    # keeps the simulator single-threaded and deterministic.
    blocking: bool

    def get(self, key: bytes) -> bytes | None: ...

    def write(
        self, puts: Sequence[tuple[bytes, bytes]], deletes: Sequence[bytes], *, sync: bool
    ) -> None:
        """Apply all puts and deletes atomically; with sync=True, durably (fsync)."""

    def scan(
        self, start: bytes, stop: bytes | None, *, limit: int | None = None
    ) -> Iterator[tuple[bytes, bytes]]:
        """Items with start <= key < stop, in key order (stop=None: to the end)."""

    def sync(self) -> None:
        """Make every write so far durable."""

    def size_bytes(self) -> int:
        """Approximate bytes on disk (or in memory)."""

    def close(self) -> None: ...

    def point_in_time(self) -> EngineView:
        """A view of every record as of now (node snapshots copy from one)."""
