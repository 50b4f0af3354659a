"""Clocks and hybrid logical clock (HLC) timestamps.

``SystemClock`` is the only place in ringkv that reads the real time. Every
other module receives a ``Clock`` so the deterministic simulator can run the
same code on virtual time.

HLC (Kulkarni et al., "Logical Physical Clocks", 2014): a timestamp is
(wall_us, logical). It never goes backwards on one node, stays close to the
wall clock, and moves past any timestamp the node has observed, so causally
later writes get larger timestamps even across nodes with skewed clocks.
"""

from __future__ import annotations

import time
from typing import NamedTuple, Protocol


class Clock(Protocol):
    def wall_us(self) -> int:
        """Wall-clock microseconds since the Unix epoch (may jump)."""

    def monotonic_s(self) -> float:
        """Seconds on a clock that never goes backwards (for timeouts and intervals)."""


class SystemClock:
    """The one sanctioned reader of real time."""

    def wall_us(self) -> int:
        return time.time_ns() // 1000

    def monotonic_s(self) -> float:
        return time.monotonic()

    def sleep_s(self, seconds: float) -> None:
        """Block the calling thread (tools and tests only; never on the event loop)."""
        time.sleep(seconds)


class ManualClock:
    """A clock that moves only when told to: for tests and the simulator."""

    def __init__(self, wall_us: int = 1_700_000_000_000_000, monotonic_s: float = 0.0) -> None:
        self._wall_us = wall_us
        self._monotonic_s = monotonic_s

    def wall_us(self) -> int:
        return self._wall_us

    def monotonic_s(self) -> float:
        return self._monotonic_s

    def advance(self, seconds: float) -> None:
        self._monotonic_s += seconds
        self._wall_us += int(seconds * 1_000_000)

    def set_wall_us(self, wall_us: int) -> None:
        """Step the wall clock (forwards or backwards), as NTP might."""
        self._wall_us = wall_us


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

    def __init__(self, clock: Clock) -> None:
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
