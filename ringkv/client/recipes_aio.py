"""The coordination recipes on ``AsyncClient`` (shell): ``AsyncLock``,
``AsyncElection``, ``AsyncGroup`` and ``watch_config``, the same protocol as
``recipes.py`` (decided in ``recipes_core.py``) with awaits. A wait on a watch
is bounded by ``asyncio.wait_for`` on its next event.

    async with kv.lock("jobs") as held:
        await held.fenced_put("jobs/state", "running")
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from ringkv.client import recipes_core as core
from ringkv.client.recipes import DEFAULT_TIMEOUT_S, DEFAULT_TTL_S, MAX_CAS_ATTEMPTS, RECHECK_S
from ringkv.client.recipes_core import Entry, FencingRejected, LockLost, LockTimeout
from ringkv.errors import Compacted, ConditionFailed, RingKVError

if TYPE_CHECKING:
    from ringkv.client.aio import AsyncClient, AsyncLease
    from ringkv.client.watch import WatchEvent

__all__ = ["AsyncElection", "AsyncGroup", "AsyncLock", "watch_config"]


async def _until(events: AsyncIterator[WatchEvent], done: Callable[[WatchEvent], bool],
                 wait_s: float) -> None:
    """Consume ``events`` until one is ``done`` or ``wait_s`` has passed."""
    async def consume() -> None:
        async for event in events:  # bounded by wait_for below
            if done(event):
                return
    try:
        await asyncio.wait_for(consume(), timeout=max(0.0, wait_s))
    except (asyncio.TimeoutError, Compacted):
        pass  # the caller reads again
    finally:
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            await aclose()


class _AsyncQueue:
    def __init__(self, kv: AsyncClient, name: str, keyspace: str) -> None:
        if not isinstance(name, str) or not name or name.startswith("\x00"):
            raise ValueError(f"a recipe name must be a non-empty key, got {name!r}")
        self.kv = kv
        self.name = name
        self.keyspace = keyspace
        self.key = core.queue_key(name)

    async def read(self) -> tuple[list[Entry], dict[str, Any], int]:
        for _ in range(MAX_CAS_ATTEMPTS):
            head = await self.kv.get_versioned(self.key, keyspace=self.keyspace)
            entries = core.parse_queue(head.value if head else None)
            result = await self.kv.txn(self.keyspace, reads=[self.key, *[e.key for e in entries]])
            now = result.reads.get(self.key)
            if (now.version if now else None) != (head.version if head else None):
                continue
            current = {k: (v.version if v else None) for k, v in result.reads.items()}
            alive = core.live(entries, current)
            values = {}
            for e in alive:
                got = result.reads[e.key]
                values[e.key] = got.value if got else None
            return alive, values, int((result.receipt or {}).get("read_ts") or 0)
        raise RingKVError(f"the queue {self.key!r} kept changing while it was read")

    async def change(self, mine: Entry, *, join: bool) -> int | None:
        for _ in range(MAX_CAS_ATTEMPTS):
            head = await self.kv.get_versioned(self.key, keyspace=self.keyspace)
            entries = core.parse_queue(head.value if head else None)
            reads = (await self.kv.txn(self.keyspace, reads=[e.key for e in entries])).reads \
                if entries else {}
            current = {k: (v.version if v else None) for k, v in reads.items()}
            if join:
                after = core.appended(entries, current, mine)
            else:
                after = core.removed(entries, current, mine.key)
                if after == entries:
                    return None
            conditions: list[dict[str, Any]] = [
                {"key": self.key, "version": head.version} if head
                else {"key": self.key, "absent": True}]
            if join:
                conditions.append({"key": mine.key, "version": mine.version})
            try:
                result = await self.kv.txn(self.keyspace, conditions=conditions, writes=[
                    {"op": "put", "key": self.key, "value": core.queue_value(after)}])
            except ConditionFailed as exc:
                if exc.details.get("key") == mine.key:
                    raise LockLost(f"contender key {mine.key!r} vanished before it queued") \
                        from exc
                continue
            return result.commit_ts
        raise RingKVError(f"lost {MAX_CAS_ATTEMPTS} races to change the queue {self.key!r}")

    async def wait_first(self, mine: Entry, deadline_s: float, lease: AsyncLease) -> bool:
        clock = self.kv._clock
        while True:  # bounded by deadline_s
            if lease.lost is not None:
                raise LockLost(f"lease {lease.id} expired while waiting") from lease.lost
            alive, _, read_ts = await self.read()
            ahead = core.ahead_of(alive, mine)
            if ahead is None:
                return True
            remaining_s = deadline_s - clock.monotonic_s()
            if remaining_s <= 0:
                return False
            watch = self.kv.watch(self.keyspace, ahead.key,
                                  from_version=max(ahead.version, read_ts) or None)
            await _until(watch, lambda e: e.version > ahead.version,
                         min(remaining_s, RECHECK_S))


class AsyncLock:
    """``Lock`` on an ``AsyncClient``: ``async with kv.lock(name) as held``, ``await
    acquire(timeout_s=)``, ``await release()``, ``fencing_token``, ``await
    fenced_put(key, value)``, ``await check()``, ``lost``."""

    def __init__(self, kv: AsyncClient, name: str, *, keyspace: str = "txn",
                 ttl_s: int = DEFAULT_TTL_S, timeout_s: float = DEFAULT_TIMEOUT_S,
                 value: Any = None) -> None:
        self._queue = _AsyncQueue(kv, name, keyspace)
        self.kv = kv
        self.name = name
        self.keyspace = keyspace
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s
        self.value = value
        self._lease: AsyncLease | None = None
        self._entry: Entry | None = None
        self._token: int | None = None
        self._held = False

    @property
    def key(self) -> str | None:
        return self._entry.key if self._entry else None

    @property
    def fencing_token(self) -> int:
        if not self._held or self._token is None:
            raise LockLost(f"lock {self.name!r} is not held")
        return self._token

    @property
    def lost(self) -> bool:
        return self._held and self._lease is not None and self._lease.lost is not None

    async def acquire(self, timeout_s: float | None = None) -> bool:
        if self._held:
            raise RuntimeError(f"lock {self.name!r} is already held by this object")
        clock = self.kv._clock
        deadline_s = clock.monotonic_s() + (self.timeout_s if timeout_s is None else timeout_s)
        lease = await (await self.kv.lease(self.ttl_s, keyspace=self.keyspace)).__aenter__()
        self._lease = lease
        try:
            key = core.contender_key(self.name, lease.id)
            try:
                version = (await self.kv.put(key, self.value, keyspace=self.keyspace,
                                             lease=lease, if_absent=True)).version
            except ConditionFailed as exc:
                version = exc.details.get("current_version")
            if not isinstance(version, int):
                raise LockLost(f"contender key {key!r} could not be created")
            self._entry = Entry(key, version)
            token = await self._queue.change(self._entry, join=True)
            assert token is not None
            self._token = token
            if await self._queue.wait_first(self._entry, deadline_s, lease):
                self._held = True
                return True
        except BaseException:
            await self._drop()
            raise
        await self._drop()
        return False

    async def release(self) -> None:
        self._held = False
        await self._drop()

    async def check(self) -> None:
        if self._entry is None or not self._held:
            raise LockLost(f"lock {self.name!r} is not held")
        now = await self.kv.get_versioned(self._entry.key, keyspace=self.keyspace)
        if now is None or now.version != self._entry.version:
            raise LockLost(f"lock {self.name!r} was lost: its key {self._entry.key!r} is gone")

    async def fenced_put(self, key: str, value: Any) -> int:
        token = self.fencing_token
        assert self._entry is not None
        fence = core.fence_key(key)
        for _ in range(MAX_CAS_ATTEMPTS):
            record = await self.kv.get_versioned(fence, keyspace=self.keyspace)
            highest = core.fence_token(record.value if record else None)
            if not core.fencing_allows(token, highest):
                assert highest is not None
                raise FencingRejected(f"token {token} is below {highest}, already accepted "
                                      f"at {key!r}", token=token, highest=highest)
            guard: dict[str, Any] = {"key": fence, "version": record.version} if record \
                else {"key": fence, "absent": True}
            try:
                result = await self.kv.txn(self.keyspace, conditions=[
                    guard, {"key": self._entry.key, "version": self._entry.version}], writes=[
                    {"op": "put", "key": key, "value": value},
                    {"op": "put", "key": fence, "value": core.fence_value(token, self._entry.key)}])
            except ConditionFailed as exc:
                if exc.details.get("key") == self._entry.key:
                    raise LockLost(f"lock {self.name!r} was lost before the fenced write "
                                   f"to {key!r}") from exc
                continue
            assert result.commit_ts is not None
            return result.commit_ts
        raise RingKVError(f"lost {MAX_CAS_ATTEMPTS} races for the fence of {key!r}")

    async def __aenter__(self) -> AsyncLock:
        if not await self.acquire():
            raise LockTimeout(f"lock {self.name!r} not acquired within {self.timeout_s} s")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.release()

    async def _drop(self) -> None:
        lease, self._lease = self._lease, None
        if lease is not None:
            try:
                await lease.__aexit__(None, None, None)
            except RingKVError:
                pass  # the lease expires by itself within its TTL


async def _changes(queue: _AsyncQueue, state: Callable[[list[Entry], dict[str, Any]], Any],
                   timeout_s: float | None) -> AsyncIterator[Any]:
    clock = queue.kv._clock
    deadline_s = None if timeout_s is None else clock.monotonic_s() + timeout_s
    last: Any = object()
    while deadline_s is None or clock.monotonic_s() < deadline_s:
        alive, values, read_ts = await queue.read()
        now = state(alive, values)
        if now != last:
            last = now
            yield now
        wait_s = RECHECK_S if deadline_s is None else min(RECHECK_S,
                                                          deadline_s - clock.monotonic_s())
        watch = queue.kv.watch(queue.keyspace, queue.name + "/", prefix=True,
                               from_version=read_ts or None)
        await _until(watch, lambda e: True, wait_s)


class AsyncElection:
    """``Election`` on an ``AsyncClient``."""

    def __init__(self, kv: AsyncClient, name: str, *, keyspace: str = "txn",
                 ttl_s: int = DEFAULT_TTL_S) -> None:
        self._queue = _AsyncQueue(kv, name, keyspace)
        self.kv = kv
        self.name = name
        self.keyspace = keyspace
        self.ttl_s = ttl_s
        self._lock: AsyncLock | None = None

    @property
    def is_leader(self) -> bool:
        return self._lock is not None and self._lock._held and not self._lock.lost

    @property
    def lock(self) -> AsyncLock | None:
        return self._lock

    async def campaign(self, value: Any, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        lock = AsyncLock(self.kv, self.name, keyspace=self.keyspace, ttl_s=self.ttl_s,
                         timeout_s=timeout_s, value=value)
        if not await lock.acquire(timeout_s):
            raise LockTimeout(f"not elected in {self.name!r} within {timeout_s} s")
        self._lock = lock

    async def resign(self) -> None:
        if self._lock is not None:
            await self._lock.release()
            self._lock = None

    async def leader(self) -> Any:
        alive, values, _ = await self._queue.read()
        first = core.holder(alive)
        return values[first.key] if first else None

    async def observe(self, timeout_s: float | None = None) -> AsyncIterator[Any]:
        async for state in _changes(self._queue, lambda alive, values: (
                (alive[0].key, values[alive[0].key]) if alive else (None, None)), timeout_s):
            yield state[1]


class AsyncGroup:
    """``Group`` on an ``AsyncClient`` (``async with``)."""

    def __init__(self, kv: AsyncClient, name: str, *, keyspace: str = "txn",
                 ttl_s: int = DEFAULT_TTL_S) -> None:
        self._queue = _AsyncQueue(kv, name, keyspace)
        self.kv = kv
        self.name = name
        self.keyspace = keyspace
        self.ttl_s = ttl_s
        self._lease: AsyncLease | None = None

    @property
    def lost(self) -> bool:
        return self._lease is not None and self._lease.lost is not None

    async def join(self, member: str, value: Any = None) -> None:
        if self._lease is None:
            self._lease = await (await self.kv.lease(self.ttl_s, keyspace=self.keyspace)
                                 ).__aenter__()
        key = core.contender_key(self.name, member)
        put = await self.kv.put(key, value, keyspace=self.keyspace, lease=self._lease)
        assert put.version is not None
        await self._queue.change(Entry(key, put.version), join=True)

    async def leave(self, member: str) -> None:
        key = core.contender_key(self.name, member)
        await self.kv.delete(key, keyspace=self.keyspace)
        await self._queue.change(Entry(key, -1), join=False)

    async def members(self) -> dict[str, Any]:
        alive, values, _ = await self._queue.read()
        return {core.member_of(self.name, e.key): values[e.key] for e in alive}

    async def watch_members(self, timeout_s: float | None = None
                            ) -> AsyncIterator[dict[str, Any]]:
        name = self.name
        async for members in _changes(self._queue, lambda alive, values: {
                core.member_of(name, e.key): values[e.key] for e in alive}, timeout_s):
            yield members

    async def close(self) -> None:
        lease, self._lease = self._lease, None
        if lease is not None:
            await lease.__aexit__(None, None, None)

    async def __aenter__(self) -> AsyncGroup:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


async def watch_config(kv: AsyncClient, key: str, *, keyspace: str = "txn",
                       timeout_s: float | None = None) -> AsyncIterator[Any]:
    """``recipes.watch_config`` on an ``AsyncClient``."""
    clock = kv._clock
    deadline_s = None if timeout_s is None else clock.monotonic_s() + timeout_s
    result = await kv.txn(keyspace, reads=[key])
    now = result.reads.get(key)
    at = int((result.receipt or {}).get("read_ts") or 0) or (now.version if now else None)
    yield now.value if now else None
    events = kv.watch(keyspace, key, from_version=at)
    try:
        while deadline_s is None or clock.monotonic_s() < deadline_s:
            wait_s = None if deadline_s is None else deadline_s - clock.monotonic_s()
            try:
                event = await asyncio.wait_for(events.__anext__(), timeout=wait_s)
            except (asyncio.TimeoutError, StopAsyncIteration):
                return
            yield event.value
    finally:
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            await aclose()
