"""In-memory engine: an ordered dict on a sorted key list. For tests and the simulator.

It can also model a crash: ``crash()`` throws away every write that was not
synced, which is exactly what a real crash loses in periodic sync mode.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence


class MemoryEngine:
    blocking = False

    def __init__(self) -> None:
        self._data: dict[bytes, bytes] = {}
        self._keys: list[bytes] = []
        # Writes since the last sync, oldest first, so a crash can undo them.
        self._unsynced: list[tuple[Sequence[tuple[bytes, bytes]], Sequence[bytes]]] = []
        self._durable: dict[bytes, bytes] = {}

    def get(self, key: bytes) -> bytes | None:
        return self._data.get(key)

    def write(
        self, puts: Sequence[tuple[bytes, bytes]], deletes: Sequence[bytes], *, sync: bool
    ) -> None:
        for key in deletes:
            self._delete(key)
        for key, value in puts:
            if key not in self._data:
                bisect.insort(self._keys, key)
            self._data[key] = value
        self._unsynced.append((list(puts), list(deletes)))
        if sync:
            self.sync()

    def _delete(self, key: bytes) -> None:
        if key in self._data:
            del self._data[key]
            index = bisect.bisect_left(self._keys, key)
            del self._keys[index]

    def scan(
        self, start: bytes, stop: bytes | None, *, limit: int | None = None
    ) -> Iterator[tuple[bytes, bytes]]:
        index = bisect.bisect_left(self._keys, start)
        end = len(self._keys) if stop is None else bisect.bisect_left(self._keys, stop)
        if limit is not None:
            end = min(end, index + limit)
        # Snapshot the slice so writes during iteration cannot confuse it.
        for key in self._keys[index:end]:
            yield key, self._data[key]

    def sync(self) -> None:
        for puts, deletes in self._unsynced:
            for key in deletes:
                self._durable.pop(key, None)
            for key, value in puts:
                self._durable[key] = value
        self._unsynced.clear()

    def crash(self) -> None:
        """Lose every unsynced write, as a process crash would."""
        self._unsynced.clear()
        self._data = dict(self._durable)
        self._keys = sorted(self._data)

    def size_bytes(self) -> int:
        return sum(len(k) + len(v) for k, v in self._data.items())

    def point_in_time(self) -> MemoryView:
        return MemoryView(sorted(self._data.items()))

    def close(self) -> None:
        pass


class MemoryView:
    """A copy of the memory engine's records at one point in time."""

    def __init__(self, items: list[tuple[bytes, bytes]]) -> None:
        self._items = items
        self._keys = [key for key, _ in items]

    def scan(
        self, start: bytes, stop: bytes | None, *, limit: int | None = None
    ) -> Iterator[tuple[bytes, bytes]]:
        index = bisect.bisect_left(self._keys, start)
        end = len(self._keys) if stop is None else bisect.bisect_left(self._keys, stop)
        if limit is not None:
            end = min(end, index + limit)
        yield from self._items[index:end]

    def close(self) -> None:
        self._items, self._keys = [], []
