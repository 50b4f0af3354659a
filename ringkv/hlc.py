"""Hybrid logical clock (HLC) timestamps (pure).

HLC (Kulkarni et al., "Logical Physical Clocks", 2014): a timestamp is
(wall_us, logical). It never goes backwards on one node, stays close to the
wall clock, and moves past any timestamp the node has observed, so causally
later writes get larger timestamps even across nodes with skewed clocks.

The wall clock is passed in (anything with ``wall_us()``, normally the node's
``Clock``), so this module reads no time of its own.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol


class WallClock(Protocol):
    def wall_us(self) -> int:
        """Wall-clock microseconds since the Unix epoch (may jump)."""
        ...


class Timestamp(NamedTuple):
    """An HLC timestamp. Tuple order is timestamp order."""

    wall_us: int
    logical: int = 0

    def to_json(self) -> list[int]:
        return [self.wall_us, self.logical]


# Bounds that the cell codec can represent (u64 wall, u32 logical).
MAX_WALL_US = 2**64 - 1
MAX_LOGICAL = 2**32 - 1


class HybridLogicalClock:
    """Issues strictly increasing timestamps and absorbs timestamps seen from peers."""

    def __init__(self, clock: WallClock) -> None:
        self._clock = clock
        self._last = Timestamp(0, 0)

    @property
    def last(self) -> Timestamp:
        return self._last

    def now(self) -> Timestamp:
        """A new timestamp, greater than every one issued or observed before."""
        wall = self._clock.wall_us()
        last = self._last
        if wall > last.wall_us:
            ts = Timestamp(wall, 0)
        else:
            ts = self._bump(last)
        self._last = ts
        return ts

    def observe(self, remote: Timestamp) -> Timestamp:
        """Merge a timestamp received from elsewhere (HLC receive rule)."""
        wall = self._clock.wall_us()
        last = self._last
        high = max(last, remote)
        if wall > high.wall_us:
            ts = Timestamp(wall, 0)
        else:
            ts = self._bump(high)
        self._last = ts
        return ts

    @staticmethod
    def _bump(ts: Timestamp) -> Timestamp:
        if ts.logical >= MAX_LOGICAL:
            return Timestamp(ts.wall_us + 1, 0)
        return Timestamp(ts.wall_us, ts.logical + 1)
