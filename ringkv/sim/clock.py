"""Per-node clocks on the loop's virtual time, with offset, drift and steps.

A simulated machine's clock outlives its processes: a restarted node reads
the same (possibly skewed) clock as before, as on a real machine.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from ringkv.clock import Timer
from ringkv.sim.loop import VirtualTimeLoop

EPOCH_US = 1_700_000_000_000_000  # virtual time 0 is this wall-clock instant


class SimClock:
    """``Clock`` for one simulated machine.

    wall = epoch + elapsed * (1 + drift) + offset; ``step_us`` moves the wall
    clock as NTP would. The monotonic clock drifts too, but never steps.

    Waits are measured in this machine's seconds: a clock that runs fast
    (positive drift) ends its timers early in virtual time, as a fast
    oscillator would, so drift reaches timeouts, intervals and leases.
    """

    def __init__(self, loop: VirtualTimeLoop, *, offset_us: int = 0, drift_ppm: float = 0.0) -> None:
        self._loop = loop
        self.offset_us = offset_us
        self.drift_ppm = drift_ppm

    @property
    def drift_ppm(self) -> float:
        return self._drift_ppm

    @drift_ppm.setter
    def drift_ppm(self, drift_ppm: float) -> None:
        self._drift_ppm = drift_ppm
        # How fast this clock runs against virtual time, worked out once: every
        # reading and every timer scales by it.
        self._rate = 1 + drift_ppm * 1e-6

    # The loop's ``time()`` is read as ``_now``: the coordinator asks for the time
    # several times per request.

    def wall_us(self) -> int:
        elapsed_us = self._loop._now * 1_000_000
        return EPOCH_US + int(elapsed_us * self._rate) + self.offset_us

    def monotonic_s(self) -> float:
        return self._loop._now * self._rate

    def step_us(self, delta_us: int) -> None:
        self.offset_us += delta_us

    def _virtual_s(self, delay_s: float) -> float:
        return max(0.0, delay_s) / self._rate

    def call_later(self, delay_s: float, callback: Callable[..., Any], *args: Any) -> Timer:
        # Straight to the loop's timer heap (``_virtual_s`` and ``loop.call_later``
        # written out): every request's deadline is set here.
        loop = self._loop
        return loop._timer(loop._now + max(0.0, delay_s) / self._rate, callback, args, None)

    async def sleep(self, delay_s: float) -> None:
        await asyncio.sleep(self._virtual_s(delay_s))
