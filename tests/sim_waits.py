"""Waiting for a condition on the simulator's virtual time, with a deadline."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


async def until(condition: Callable[[], object], what: str, timeout_s: float = 60.0,
                poll_s: float = 0.1) -> None:
    """Return once ``condition()`` is true; fail naming ``what`` after ``timeout_s``."""
    for _ in range(round(timeout_s / poll_s)):
        if condition():
            return
        await asyncio.sleep(poll_s)
    raise AssertionError(f"timed out waiting for {what}")
