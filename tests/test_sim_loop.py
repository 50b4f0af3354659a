"""The simulator's loop after a run: what an abandoned coroutine does when it is
collected late must not raise into the test run (nor run at all)."""

from __future__ import annotations

import asyncio

import pytest

from ringkv.sim.loop import VirtualTimeLoop


def test_after_dispose_a_late_callback_is_dropped_and_before_it_closing_is_still_strict() -> None:
    ran: list[str] = []
    loop = VirtualTimeLoop()
    loop.dispose()
    loop.call_soon(ran.append, "late")  # a finally block of a coroutine collected now
    assert ran == []

    closed = VirtualTimeLoop()
    closed.close()  # closed without dispose: a bug in the caller, so it still raises
    with pytest.raises(RuntimeError, match="Event loop is closed"):
        closed.call_soon(ran.append, "late")


def test_a_coroutine_abandoned_mid_wait_finishes_quietly_after_dispose() -> None:
    loop = VirtualTimeLoop()
    cleaned: list[bool] = []

    async def waits_forever() -> None:
        future = loop.create_future()
        try:
            await future
        finally:
            future.cancel()  # schedules callbacks: the loop is gone by then
            cleaned.append(True)

    task = loop.create_task(waits_forever())
    loop.run_until_complete(asyncio.sleep(1.0))
    assert not task.done()
    loop.dispose()
    coro = task.get_coro()
    del task
    coro.close()  # what the garbage collector does to an abandoned coroutine
    assert cleaned == [True]
