"""A lock contender's join against contention: it loses every compare-and-set on the
queue (another contender always changed it first) and must go on trying until its
acquire's deadline, then give up cleanly (None: acquire returns False); a join with
no deadline stops after MAX_CAS_ATTEMPTS. The shells of both clients, over a kv whose
every transaction fails its condition (the queue changed by someone else)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from ringkv.client import recipes, recipes_aio
from ringkv.client import recipes_core as core
from ringkv.errors import ConditionFailed, RingKVError


class SteppingClock:
    """Each reading is 10 ms after the last: the join's loop moves time on."""

    def __init__(self) -> None:
        self.now_s = 100.0

    def monotonic_s(self) -> float:
        self.now_s += 0.01
        return self.now_s


class Contended:
    """A kv whose every join loses: the queue's version moves on each time."""

    def __init__(self) -> None:
        self._clock = SteppingClock()
        self.joins = 0

    def _lost(self, keyspace: str, **plan: Any) -> Any:
        self.joins += 1
        raise ConditionFailed("the queue changed", key=core.queue_key("mx"),
                              current_value=None, current_version=self.joins)


class SyncKv(Contended):
    def txn(self, keyspace: str, **plan: Any) -> Any:
        return self._lost(keyspace, **plan)


class AsyncKv(Contended):
    async def txn(self, keyspace: str, **plan: Any) -> Any:
        return self._lost(keyspace, **plan)


class FakeSession:
    id = "lease-1"

    def _view(self, name: str) -> core.QueueView:
        return core.EMPTY_VIEW

    def _saw(self, name: str, view: core.QueueView) -> None:
        raise AssertionError("no join landed")


def test_a_join_with_a_deadline_keeps_trying_past_max_cas_attempts_then_gives_up() -> None:
    kv = SyncKv()
    queue = recipes._Queue(kv, "mx", "txn")  # type: ignore[arg-type]
    deadline_s = kv._clock.now_s + 2.0  # 200 readings of the stepping clock
    assert queue.enqueue(FakeSession(), "mx/me", 1, deadline_s) is None  # type: ignore[arg-type]
    assert kv.joins > recipes.MAX_CAS_ATTEMPTS
    assert kv._clock.now_s >= deadline_s


def test_a_join_without_a_deadline_stops_after_max_cas_attempts() -> None:
    kv = SyncKv()
    queue = recipes._Queue(kv, "mx", "txn")  # type: ignore[arg-type]
    with pytest.raises(RingKVError, match="races"):
        queue.enqueue(FakeSession(), "mx/me", 1)  # type: ignore[arg-type]
    assert kv.joins == recipes.MAX_CAS_ATTEMPTS


def test_the_async_join_keeps_trying_until_its_deadline_too() -> None:
    kv = AsyncKv()
    queue = recipes_aio._AsyncQueue(kv, "mx", "txn")  # type: ignore[arg-type]
    deadline_s = kv._clock.now_s + 2.0
    joined = asyncio.run(queue.enqueue(FakeSession(), "mx/me", 1, deadline_s))  # type: ignore[arg-type]
    assert joined is None
    assert kv.joins > recipes.MAX_CAS_ATTEMPTS
