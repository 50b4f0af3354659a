"""The coordination recipes on ``AsyncClient`` (shell): ``AsyncSession``, ``AsyncLock``,
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
from ringkv.errors import Compacted, ConditionFailed, LeaseExpired, RingKVError

if TYPE_CHECKING:
    from ringkv.client.aio import AsyncClient, AsyncLease
    from ringkv.client.watch import WatchEvent

__all__ = ["AsyncElection", "AsyncGroup", "AsyncLock", "AsyncSession", "watch_config"]


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


class AsyncSession:
    """``Session`` on an ``AsyncClient`` (``AsyncClient.session``): ``async with
    kv.session(ttl_s=10) as session:`` grants its lease (renewed by a task) and
    revokes it at the end; ``session.lock(name)``, ``session.election(name)``,
    ``session.group(name)`` share it. A recipe on a session not yet open opens it."""

    def __init__(self, kv: AsyncClient, *, keyspace: str = "txn",
                 ttl_s: int = DEFAULT_TTL_S) -> None:
        self.kv = kv
        self.keyspace = keyspace
        self.ttl_s = ttl_s
        self.lease: AsyncLease | None = None
        self._opening = asyncio.Lock()
        self._owners: dict[str, set[str]] = {}
        self._views: dict[str, core.QueueView] = {}
        self._closed = False

    @property
    def id(self) -> str:
        if self.lease is None:
            raise RuntimeError("the session is not open yet")
        return self.lease.id

    @property
    def lost(self) -> bool:
        return self._closed or (self.lease is not None and self.lease.lost is not None)

    async def open(self) -> AsyncSession:
        """Grant the lease and start renewing it (once; later calls return at once)."""
        async with self._opening:
            if self.lease is None and not self._closed:
                lease = await self.kv.lease(self.ttl_s, keyspace=self.keyspace)
                self.lease = await lease.__aenter__()
        return self

    def lock(self, name: str, *, timeout_s: float = DEFAULT_TIMEOUT_S,
             value: Any = None) -> AsyncLock:
        return AsyncLock(self.kv, name, keyspace=self.keyspace, ttl_s=self.ttl_s,
                         timeout_s=timeout_s, value=value, session=self)

    def election(self, name: str) -> AsyncElection:
        return AsyncElection(self.kv, name, keyspace=self.keyspace, ttl_s=self.ttl_s,
                             session=self)

    def group(self, name: str) -> AsyncGroup:
        return AsyncGroup(self.kv, name, keyspace=self.keyspace, ttl_s=self.ttl_s, session=self)

    async def close(self) -> None:
        """Revoke the lease: every key of every recipe on it goes at once."""
        if self._closed:
            return
        self._closed = True
        lease = self.lease  # kept: its id names the session in errors
        if lease is not None:
            try:
                await lease.__aexit__(None, None, None)
            except RingKVError:
                pass  # the lease expires by itself within its TTL

    async def __aenter__(self) -> AsyncSession:
        return await self.open()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- what the recipes keep here (as ``Session``; one event loop, no mutex) -------

    async def _ready(self) -> None:
        await self.open()
        if self.lost:
            raise LockLost(f"session {self.lease.id if self.lease else '?'} is lost (its "
                           "lease expired or was revoked)")

    def _claim(self, name: str) -> str:
        taken = self._owners.setdefault(name, set())
        owner = core.session_owner(self.id, taken)
        taken.add(owner)
        return core.contender_key(name, owner)

    def _unclaim(self, name: str, key: str) -> None:
        self._owners.get(name, set()).discard(core.member_of(name, key))

    def _view(self, name: str) -> core.QueueView:
        return self._views.get(name, core.EMPTY_VIEW)

    def _saw(self, name: str, view: core.QueueView) -> None:
        known = self._views.get(name)
        if known is None or (known.version or 0) <= (view.version or 0):
            self._views[name] = view

    async def _abandon(self, key: str) -> None:
        """A key whose fate is unknown: delete it, or end the session (see ``Session``)."""
        try:
            await self.kv.delete(key, keyspace=self.keyspace)
            return
        except RingKVError:
            pass
        await self.close()


async def default_session(kv: AsyncClient, keyspace: str, ttl_s: int) -> AsyncSession:
    """The client's own session for ``keyspace`` and ``ttl_s``, as ``recipes.default_session``."""
    sessions: dict[tuple[str, int], AsyncSession] = kv._recipe_sessions
    session = sessions.get((keyspace, ttl_s))
    if session is None or session.lost:
        session = sessions[(keyspace, ttl_s)] = AsyncSession(kv, keyspace=keyspace, ttl_s=ttl_s)
    await session.open()
    return session


async def close_default_sessions(kv: AsyncClient) -> None:
    sessions = list(kv._recipe_sessions.values())
    kv._recipe_sessions.clear()
    for session in sessions:
        await session.close()


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
            entries = core.parse_queue(head.value if head else None,
                                       head.version if head else None)
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

    async def _versions(self, keys: list[str]) -> tuple[dict[str, int | None], int]:
        result = await self.kv.txn(self.keyspace, reads=keys)
        return ({k: (v.version if v else None) for k, v in result.reads.items()},
                int((result.receipt or {}).get("read_ts") or 0))

    async def enqueue(self, session: AsyncSession, key: str, value: Any,
                      deadline_s: float | None = None
                      ) -> tuple[Entry, list[Entry], int] | None:
        """``_Queue.enqueue``: create ``key`` on the session's lease and queue it, in one
        transaction; None when ``deadline_s`` passed first."""
        view = session._view(self.name)
        lost_races = 0
        while True:  # bounded by core.keep_joining (the deadline, or MAX_CAS_ATTEMPTS)
            plan = core.join_request(self.name, key, value, session.id, view)
            try:
                result = await self.kv.txn(self.keyspace, **plan)
            except ConditionFailed as exc:
                lost_races += 1
                if not core.keep_joining(lost_races, MAX_CAS_ATTEMPTS,
                                         self.kv._clock.monotonic_s(), deadline_s):
                    if deadline_s is not None:
                        return None
                    raise RingKVError(f"lost {MAX_CAS_ATTEMPTS} races to join the queue "
                                      f"{self.key!r}") from exc
                view = await self._fresh_view(exc)
                continue
            assert result.commit_ts is not None
            seen_at = result.commit_ts
            current = {k: (v.version if v else None) for k, v in result.reads.items()}
            if result.replayed or not core.join_answered(plan["reads"], current):
                # An answer lost and replayed without reads: read them (and our own key) now.
                current, seen_at = await self._versions([*plan["reads"], key])
            mine, ahead, after = core.after_join(view, key, result.commit_ts, current)
            session._saw(self.name, after)
            return mine, ahead, seen_at

    async def _fresh_view(self, exc: ConditionFailed) -> core.QueueView:
        """The queue as the failed condition found it, or as read now."""
        if exc.details.get("key") == self.key and "current_version" in exc.details:
            return core.view_of(exc.details.get("current_value"),
                                exc.details.get("current_version"))
        head = (await self.kv.txn(self.keyspace, reads=[self.key])).reads.get(self.key)
        return core.view_of(head.value if head else None, head.version if head else None)

    async def leave(self, key: str) -> None:
        for _ in range(MAX_CAS_ATTEMPTS):
            head = await self.kv.get_versioned(self.key, keyspace=self.keyspace)
            entries = core.parse_queue(head.value if head else None,
                                       head.version if head else None)
            reads = (await self.kv.txn(self.keyspace, reads=[e.key for e in entries])).reads \
                if entries else {}
            current = {k: (v.version if v else None) for k, v in reads.items()}
            after = core.removed(entries, current, key)
            if head is None or after == entries:
                return
            try:
                await self.kv.txn(self.keyspace,
                                  conditions=[{"key": self.key, "version": head.version}],
                                  writes=[{"op": "put", "key": self.key,
                                           "value": core.queue_value(after)}])
            except ConditionFailed:
                continue
            return
        raise RingKVError(f"lost {MAX_CAS_ATTEMPTS} races to change the queue {self.key!r}")

    async def wait_first(self, mine: Entry, ahead: list[Entry], seen_at: int,
                         deadline_s: float, session: AsyncSession) -> bool:
        clock = self.kv._clock
        while True:  # bounded by deadline_s
            await session._ready()
            if not ahead:
                return True
            remaining_s = deadline_s - clock.monotonic_s()
            if remaining_s <= 0:
                return False
            last = ahead[-1]
            watch = self.kv.watch(self.keyspace, last.key,
                                  from_version=max(last.version, seen_at) or None)
            await _until(watch, lambda e: e.version > last.version,
                         min(remaining_s, RECHECK_S))
            current, seen_at = await self._recheck(session, ahead, mine)
            ahead = core.still_ahead(ahead, mine, current)

    async def _recheck(self, session: AsyncSession, ahead: list[Entry],
                       mine: Entry) -> tuple[dict[str, int | None], int]:
        """``_Queue._recheck``: the keys ahead and ours at one snapshot, and the queue for
        the session's view."""
        result = await self.kv.txn(self.keyspace,
                                   reads=[*(e.key for e in ahead), mine.key, self.key])
        current = {k: (v.version if v else None) for k, v in result.reads.items()
                   if k != self.key}
        head = result.reads.get(self.key)
        session._saw(self.name, core.view_read(head.value if head else None,
                                               head.version if head else None, current))
        return current, int((result.receipt or {}).get("read_ts") or 0)


class AsyncLock:
    """``Lock`` on an ``AsyncClient``: ``async with kv.lock(name) as held``, ``await
    acquire(timeout_s=)``, ``await release()``, ``fencing_token``, ``await
    fenced_put(key, value)``, ``await check()``, ``lost``."""

    def __init__(self, kv: AsyncClient, name: str, *, keyspace: str = "txn",
                 ttl_s: int = DEFAULT_TTL_S, timeout_s: float = DEFAULT_TIMEOUT_S,
                 value: Any = None, session: AsyncSession | None = None) -> None:
        self._queue = _AsyncQueue(kv, name, keyspace)
        self.kv = kv
        self.name = name
        self.keyspace = keyspace
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s
        self.value = value
        self._given = session
        self._session: AsyncSession | None = None
        self._key: str | None = None
        self._entry: Entry | None = None
        self._token: int | None = None
        self._held = False

    @property
    def key(self) -> str | None:
        return self._key

    @property
    def fencing_token(self) -> int:
        if not self._held or self._token is None:
            raise LockLost(f"lock {self.name!r} is not held")
        return self._token

    @property
    def lost(self) -> bool:
        return self._held and self._session is not None and self._session.lost

    async def acquire(self, timeout_s: float | None = None) -> bool:
        if self._held:
            raise RuntimeError(f"lock {self.name!r} is already held by this object")
        clock = self.kv._clock
        deadline_s = clock.monotonic_s() + (self.timeout_s if timeout_s is None else timeout_s)
        for attempt in range(2):  # a lost default session is replaced once
            if self._given is not None:
                session = self._given
            else:
                session = await default_session(self.kv, self.keyspace, self.ttl_s)
            await session._ready()
            self._session = session
            self._key = session._claim(self.name)
            try:
                joined = await self._queue.enqueue(session, self._key, self.value, deadline_s)
            except LeaseExpired as exc:
                session._unclaim(self.name, self._key)
                self._key = None
                await session.close()
                if self._given is not None or attempt:
                    raise LockLost(f"session {session.id} is lost") from exc
                continue
            except BaseException:
                await self._drop()
                raise
            break
        if joined is None:  # the deadline passed while others kept winning the queue
            await self._drop()
            return False
        mine, ahead, seen_at = joined
        self._entry, self._token = mine, mine.version
        try:
            if await self._queue.wait_first(mine, ahead, seen_at, deadline_s, session):
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
        # Delete the key (not the session's lease); its dead entry is pruned later.
        session, key, self._key, self._entry = self._session, self._key, None, None
        if session is None or key is None:
            return
        try:
            if not session.lost:
                try:
                    await self.kv.delete(key, keyspace=self.keyspace)
                except RingKVError:
                    await session._abandon(key)
                session._saw(self.name, core.without(session._view(self.name), key))
        finally:
            session._unclaim(self.name, key)


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
                 ttl_s: int = DEFAULT_TTL_S, session: AsyncSession | None = None) -> None:
        self._queue = _AsyncQueue(kv, name, keyspace)
        self.kv = kv
        self.name = name
        self.keyspace = keyspace
        self.ttl_s = ttl_s
        self._session = session
        self._lock: AsyncLock | None = None

    @property
    def is_leader(self) -> bool:
        return self._lock is not None and self._lock._held and not self._lock.lost

    @property
    def lock(self) -> AsyncLock | None:
        return self._lock

    async def campaign(self, value: Any, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        lock = AsyncLock(self.kv, self.name, keyspace=self.keyspace, ttl_s=self.ttl_s,
                         timeout_s=timeout_s, value=value, session=self._session)
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
                 ttl_s: int = DEFAULT_TTL_S, session: AsyncSession | None = None) -> None:
        self._queue = _AsyncQueue(kv, name, keyspace)
        self.kv = kv
        self.name = name
        self.keyspace = keyspace
        self.ttl_s = ttl_s
        self._given = session
        self._joined: dict[str, AsyncSession] = {}

    @property
    def lost(self) -> bool:
        return any(session.lost for session in self._joined.values())

    async def join(self, member: str, value: Any = None) -> None:
        key = core.contender_key(self.name, member)
        if self._given is not None:
            session = self._given
        else:
            session = await default_session(self.kv, self.keyspace, self.ttl_s)
        await session._ready()
        try:
            await self._queue.enqueue(session, key, value)
        except LeaseExpired as exc:
            await session.close()
            raise LockLost(f"session {session.id} is lost") from exc
        self._joined[member] = session

    async def leave(self, member: str) -> None:
        key = core.contender_key(self.name, member)
        self._joined.pop(member, None)
        await self.kv.delete(key, keyspace=self.keyspace)
        await self._queue.leave(key)

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
        joined, self._joined = self._joined, {}
        live = [member for member, session in joined.items() if not session.lost]
        if live:
            await self.kv.txn(self.keyspace, writes=[
                {"op": "delete", "key": core.contender_key(self.name, m)} for m in live])

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
