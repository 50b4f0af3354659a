"""The one clock: for reading time and for waiting.

``SystemClock`` is the only place in ringkv that reads the real time. Every
other module receives a ``Clock`` and both reads and waits through it: timers
(``call_later``), sleeps (``sleep``) and deadlines (``monotonic_s``). In the
deterministic simulator a ``SimClock`` stands in, so a machine's simulated
drift stretches or shrinks its timeouts, gossip intervals and (soon) Paxos
leases and commit wait exactly as a real drifting oscillator would.

A clock's waits run on the running asyncio loop: the real loop in a node, the
virtual-time loop in the simulator.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, Protocol


class Timer(Protocol):
    def cancel(self) -> None: ...


class Clock(Protocol):
    def wall_us(self) -> int:
        """Wall-clock microseconds since the Unix epoch (may jump)."""
        ...

    def monotonic_s(self) -> float:
        """Seconds on a clock that never goes backwards (for timeouts and intervals)."""
        ...

    def call_later(self, delay_s: float, callback: Callable[..., Any], *args: Any) -> Timer:
        """Run ``callback(*args)`` once ``delay_s`` of this clock's seconds have passed."""
        ...

    async def sleep(self, delay_s: float) -> None:
        """Wait ``delay_s`` of this clock's seconds."""
        ...


class SystemClock:
    """The one sanctioned reader of real time."""

    def wall_us(self) -> int:
        return time.time_ns() // 1000

    def monotonic_s(self) -> float:
        return time.monotonic()

    def call_later(self, delay_s: float, callback: Callable[..., Any], *args: Any) -> Timer:
        return asyncio.get_running_loop().call_later(delay_s, callback, *args)

    async def sleep(self, delay_s: float) -> None:
        await asyncio.sleep(delay_s)

    def sleep_s(self, seconds: float) -> None:
        """Block the calling thread (tools and tests only; never on the event loop)."""
        time.sleep(seconds)


class ManualClock:
    """A clock whose readings move only when told to: for unit tests.

    Its waits pass on the running loop's own time (in tests, usually the
    simulator's virtual loop), so code that sleeps still makes progress.
    """

    def __init__(self, wall_us: int = 1_700_000_000_000_000, monotonic_s: float = 0.0) -> None:
        self._wall_us = wall_us
        self._monotonic_s = monotonic_s

    def wall_us(self) -> int:
        return self._wall_us

    def monotonic_s(self) -> float:
        return self._monotonic_s

    def call_later(self, delay_s: float, callback: Callable[..., Any], *args: Any) -> Timer:
        return asyncio.get_running_loop().call_later(delay_s, callback, *args)

    async def sleep(self, delay_s: float) -> None:
        await asyncio.sleep(delay_s)

    def advance(self, seconds: float) -> None:
        self._monotonic_s += seconds
        self._wall_us += int(seconds * 1_000_000)

    def set_wall_us(self, wall_us: int) -> None:
        """Step the wall clock (forwards or backwards), as NTP might."""
        self._wall_us = wall_us
