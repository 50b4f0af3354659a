"""Hybrid logical clock rules (Kulkarni et al. 2014)."""

from __future__ import annotations

from ringkv.clock import ManualClock
from ringkv.hlc import HybridLogicalClock, Timestamp


def test_timestamps_strictly_increase_even_if_the_wall_clock_steps_back() -> None:
    clock = ManualClock(wall_us=1_000)
    hlc = HybridLogicalClock(clock)
    first = hlc.now()
    clock.set_wall_us(500)  # NTP steps the clock backwards
    second = hlc.now()
    third = hlc.now()
    assert first < second < third
    clock.set_wall_us(2_000)
    assert hlc.now() == Timestamp(2_000, 0)


def test_observing_a_future_timestamp_moves_past_it() -> None:
    clock = ManualClock(wall_us=1_000)
    hlc = HybridLogicalClock(clock)
    remote = Timestamp(5_000, 7)
    merged = hlc.observe(remote)
    assert merged > remote
    assert hlc.now() > merged


def test_timestamps_follow_the_wall_clock_when_it_is_ahead() -> None:
    clock = ManualClock(wall_us=1_000)
    hlc = HybridLogicalClock(clock)
    hlc.observe(Timestamp(900, 3))
    assert hlc.last == Timestamp(1_000, 0)
