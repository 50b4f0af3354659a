"""Per-node clocks on the loop's virtual time, with offset, drift and steps.

A simulated machine's clock outlives its processes: a restarted node reads
the same (possibly skewed) clock as before, as on a real machine.
"""

from __future__ import annotations

from ringkv.sim.loop import VirtualTimeLoop

EPOCH_US = 1_700_000_000_000_000  # virtual time 0 is this wall-clock instant


class SimClock:
    """``Clock`` for one simulated machine.

    wall = epoch + elapsed * (1 + drift) + offset; ``step_us`` moves the wall
    clock as NTP would. The monotonic clock drifts too, but never steps.
    """

    def __init__(self, loop: VirtualTimeLoop, *, offset_us: int = 0, drift_ppm: float = 0.0) -> None:
        self._loop = loop
        self.offset_us = offset_us
        self.drift_ppm = drift_ppm

    def wall_us(self) -> int:
        elapsed_us = self._loop.time() * 1_000_000
        return EPOCH_US + int(elapsed_us * (1 + self.drift_ppm * 1e-6)) + self.offset_us

    def monotonic_s(self) -> float:
        return self._loop.time() * (1 + self.drift_ppm * 1e-6)

    def step_us(self, delta_us: int) -> None:
        self.offset_us += delta_us
