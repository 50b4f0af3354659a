"""Hybrid logical clock rules (Kulkarni et al. 2014), and waiting on the one clock."""

from __future__ import annotations

import pytest

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


def test_a_drifting_machine_waits_in_its_own_seconds() -> None:
    """One clock for reading and for waiting: a simulated machine whose clock
    runs 10% fast ends a one-second timer (and a one-second sleep) after
    1/1.1 s of the world's time, as a fast oscillator would; its monotonic
    clock reads exactly one second at that moment. Leases and commit wait
    will rely on this."""

    from ringkv.sim.clock import SimClock
    from ringkv.sim.loop import VirtualTimeLoop

    loop = VirtualTimeLoop()
    fast = SimClock(loop, drift_ppm=100_000)
    slow = SimClock(loop, drift_ppm=-100_000)
    fired: dict[str, tuple[float, float]] = {}

    async def scenario() -> None:
        done = loop.create_future()
        fast.call_later(1.0, lambda: fired.setdefault("timer", (loop.time(), fast.monotonic_s())))
        slow.call_later(1.0, lambda: done.set_result(None))
        start = loop.time()
        await fast.sleep(1.0)
        fired["sleep"] = (loop.time() - start, fast.monotonic_s())
        await done
        fired["slow"] = (loop.time(), slow.monotonic_s())

    try:
        loop.run_until_complete(scenario())
    finally:
        loop.dispose()
    assert fired["timer"][0] == pytest.approx(1 / 1.1)
    assert fired["timer"][1] == pytest.approx(1.0)
    assert fired["sleep"][0] == pytest.approx(1 / 1.1)
    assert fired["slow"] == (pytest.approx(1 / 0.9), pytest.approx(1.0))
