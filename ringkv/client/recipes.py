"""ZooKeeper's coordination recipes on the blocking ``Client`` (shell): a mutex
with fencing tokens, leader election, group membership and a configuration
watch, built as etcd's concurrency package builds them, from session leases,
compare-and-set and watches. What they decide lives in ``recipes_core.py``.

    with kv.lock("jobs", keyspace="txn", ttl_s=10) as held:
        held.fenced_put("jobs/state", "running")   # refused once the lock is lost
        print(held.fencing_token)

    with kv.session(ttl_s=10) as session:          # one lease for many recipes
        with session.lock("a"), session.lock("b"):
            ...

Every wait is bounded (``timeout_s``); a waiter watches the key of the
contender just ahead of it and checks its deadline at each progress line the
watch sends (one a second when idle).
"""

from __future__ import annotations

import http.client
import random
import threading
from collections.abc import Generator, Iterator
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ringkv.client import recipes_core as core
from ringkv.client.recipes_core import Entry, FencingRejected, LockLost, LockTimeout
from ringkv.client.watch import (
    MAX_RECONNECTS,
    SILENT_STREAM_S,
    WATCH_HEADERS,
    StreamEnded,
    WatchCore,
    WatchEvent,
)
from ringkv.errors import Compacted, ConditionFailed, LeaseExpired, RingKVError

if TYPE_CHECKING:
    from ringkv.client.blocking import Client

__all__ = ["Election", "FencingRejected", "Group", "Lock", "LockLost", "LockTimeout",
           "Session", "watch_config"]

DEFAULT_TTL_S = 10
DEFAULT_TIMEOUT_S = 30.0
MAX_CAS_ATTEMPTS = 50  # queue appends racing other contenders
RECHECK_S = 5.0  # a waiter reads the queue again this often even without an event


# ---- a watch that also yields at each progress line (so a waiter can keep deadlines) ----

def _ticks(kv: Client, keyspace: str, key: str, *, prefix: bool,
           from_version: int | None) -> Generator[WatchEvent | None, None, None]:
    """``kv.watch``'s events, and None at each progress line and reconnect."""
    watch = WatchCore(keyspace, key, prefix=prefix, from_version=from_version,
                      rng=random.Random(), max_reconnects=MAX_RECONNECTS,
                      backoff_base_s=kv._ops.backoff_base_s, backoff_max_s=kv._ops.backoff_max_s)
    while True:  # bounded by watch.reconnect_pause_s
        url = watch.next_url(kv._ops.router.candidates(watch.routing(),
                                                        kv._clock.monotonic_s()))
        try:
            yield from _ticks_once(kv, watch, url)
            reason = "the stream ended"
        except StreamEnded as ended:
            reason = f"the node ended the stream ({ended})"
        except ConnectionRefusedError as exc:
            kv._ops.router.mark_down(url, kv._clock.monotonic_s())
            reason = f"cannot connect: {exc}"
        except (OSError, http.client.HTTPException) as exc:
            reason = f"connection lost: {exc!r}"
        yield None
        kv._clock.sleep_s(watch.reconnect_pause_s(url, reason))


def _ticks_once(kv: Client, watch: WatchCore, url: str) -> Iterator[WatchEvent | None]:
    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
    conn: http.client.HTTPConnection
    if parts.scheme == "https":
        conn = http.client.HTTPSConnection(host, port, timeout=SILENT_STREAM_S,
                                           context=kv._tls_for(url))
    else:
        conn = http.client.HTTPConnection(host, port, timeout=SILENT_STREAM_S)
    try:
        conn.request("GET", watch.path(), headers={**kv._ops.headers, **WATCH_HEADERS})
        response = conn.getresponse()
        if response.status != 200:
            watch.refused(response.status, response.read())
            return
        while True:  # bounded: each line waits at most SILENT_STREAM_S
            raw = response.readline(8 * 1024 * 1024)
            if not raw:
                return
            yield watch.line(raw)
    finally:
        conn.close()


# ---- sessions: one lease shared by recipes -----------------------------------------

class Session:
    """A session (``Client.session``), as etcd's concurrency package has: one lease of
    ``ttl_s``, renewed in the background, that the locks, elections and groups made
    from it (``session.lock(name)``, ...) attach their keys to. A lock's acquisition
    is then one transaction, and its release one delete: no lease is granted or
    revoked per acquisition. When the lease is lost (the process paused past the TTL,
    cut off, or the lease revoked), every recipe on it is lost at once (``lost``,
    ``LockLost``); ``close()`` revokes it (every key on it goes).

        with kv.session(ttl_s=10) as session:
            with session.lock("jobs") as held:
                held.fenced_put("jobs/state", "running")
    """

    def __init__(self, kv: Client, *, keyspace: str = "txn", ttl_s: int = DEFAULT_TTL_S) -> None:
        self.kv = kv
        self.keyspace = keyspace
        self.ttl_s = ttl_s
        self.lease = kv.lease(ttl_s, keyspace=keyspace).__enter__()
        self._mutex = threading.Lock()
        self._owners: dict[str, set[str]] = {}  # name -> owners contending under it now
        self._views: dict[str, core.QueueView] = {}  # name -> the queue as last seen
        self._closed = False

    @property
    def id(self) -> str:
        return self.lease.id

    @property
    def lost(self) -> bool:
        """True once the lease is known gone (or the session closed): its keys are gone."""
        return self._closed or self.lease.lost is not None

    def lock(self, name: str, *, timeout_s: float = DEFAULT_TIMEOUT_S, value: Any = None) -> Lock:
        return Lock(self.kv, name, keyspace=self.keyspace, ttl_s=self.ttl_s,
                    timeout_s=timeout_s, value=value, session=self)

    def election(self, name: str) -> Election:
        return Election(self.kv, name, keyspace=self.keyspace, ttl_s=self.ttl_s, session=self)

    def group(self, name: str) -> Group:
        return Group(self.kv, name, keyspace=self.keyspace, ttl_s=self.ttl_s, session=self)

    def close(self) -> None:
        """Revoke the lease: every key of every recipe on it goes at once."""
        with self._mutex:
            if self._closed:
                return
            self._closed = True
        try:
            self.lease.__exit__(None, None, None)  # stops renewing, revokes
        except RingKVError:
            pass  # unreachable: the lease expires by itself within its TTL

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- what the recipes keep here ------------------------------------------------

    def _check(self) -> None:
        if self.lost:
            raise LockLost(f"session {self.id} is lost (its lease expired or was revoked)") \
                from self.lease.lost

    def _claim(self, name: str) -> str:
        """A contender key under ``name`` no other recipe of this session uses now."""
        with self._mutex:
            taken = self._owners.setdefault(name, set())
            owner = core.session_owner(self.id, taken)
            taken.add(owner)
            return core.contender_key(name, owner)

    def _unclaim(self, name: str, key: str) -> None:
        with self._mutex:
            self._owners.get(name, set()).discard(core.member_of(name, key))

    def _view(self, name: str) -> core.QueueView:
        with self._mutex:
            return self._views.get(name, core.EMPTY_VIEW)

    def _saw(self, name: str, view: core.QueueView) -> None:
        with self._mutex:
            known = self._views.get(name)
            if known is None or (known.version or 0) <= (view.version or 0):
                self._views[name] = view

    def _abandon(self, key: str) -> None:
        """A key whose fate is unknown (a write failed midway, a delete failed): end the
        session, so that the key goes with its lease within the TTL instead of holding
        a place for as long as the session is renewed."""
        try:
            self.kv.delete(key, keyspace=self.keyspace)
            return
        except RingKVError:
            pass
        self.close()


def default_session(kv: Client, keyspace: str, ttl_s: int) -> Session:
    """The client's own session for ``keyspace`` and ``ttl_s`` (``kv.lock(name)``),
    granted on first use, and again after it was lost."""
    sessions: dict[tuple[str, int], Session] = kv._recipe_sessions
    with _DEFAULTS:
        session = sessions.get((keyspace, ttl_s))
        if session is None or session.lost:
            session = sessions[(keyspace, ttl_s)] = Session(kv, keyspace=keyspace, ttl_s=ttl_s)
        return session


def close_default_sessions(kv: Client) -> None:
    with _DEFAULTS:
        sessions = list(kv._recipe_sessions.values())
        kv._recipe_sessions.clear()
    for session in sessions:
        session.close()


_DEFAULTS = threading.Lock()


# ---- the queue of contenders under one name ---------------------------------------

class _Queue:
    """The queue key ``<name>`` and its contenders' ephemeral keys (recipes_core)."""

    def __init__(self, kv: Client, name: str, keyspace: str) -> None:
        if not isinstance(name, str) or not name or name.startswith("\x00"):
            raise ValueError(f"a recipe name must be a non-empty key, got {name!r}")
        self.kv = kv
        self.name = name
        self.keyspace = keyspace
        self.key = core.queue_key(name)

    def read(self) -> tuple[list[Entry], int | None, dict[str, Any], int]:
        """The entries, the queue's version, each live entry's value and the read's
        timestamp, all at one snapshot."""
        for _ in range(MAX_CAS_ATTEMPTS):
            head = self.kv.get_versioned(self.key, keyspace=self.keyspace)
            entries = core.parse_queue(head.value if head else None,
                                       head.version if head else None)
            result = self.kv.txn(self.keyspace, reads=[self.key, *[e.key for e in entries]])
            now = result.reads.get(self.key)
            if (now.version if now else None) != (head.version if head else None):
                continue  # someone queued meanwhile: read again
            current = {k: (v.version if v else None) for k, v in result.reads.items()}
            alive = core.live(entries, current)
            values: dict[str, Any] = {}
            for entry in alive:  # live: read at this snapshot with its creation version
                got = result.reads.get(entry.key)
                values[entry.key] = got.value if got else None
            read_ts = int((result.receipt or {}).get("read_ts") or 0)
            return alive, (head.version if head else None), values, read_ts
        raise RingKVError(f"the queue {self.key!r} kept changing while it was read")

    def _versions(self, keys: list[str]) -> tuple[dict[str, int | None], int]:
        result = self.kv.txn(self.keyspace, reads=keys)
        return ({k: (v.version if v else None) for k, v in result.reads.items()},
                int((result.receipt or {}).get("read_ts") or 0))

    def enqueue(self, session: Session, key: str, value: Any, deadline_s: float | None = None
                ) -> tuple[Entry, list[Entry], int] | None:
        """Create ``key`` on the session's lease and append it, in one transaction
        (``recipes_core.join_request``): its entry, the live entries ahead of it, and
        the timestamp they were seen live at; None when ``deadline_s`` passed while
        other contenders kept changing the queue first. ``LeaseExpired`` when the lease
        is gone."""
        view = session._view(self.name)
        lost_races = 0
        while True:  # bounded by core.keep_joining (the deadline, or MAX_CAS_ATTEMPTS)
            plan = core.join_request(self.name, key, value, session.id, view)
            try:
                result = self.kv.txn(self.keyspace, **plan)
            except ConditionFailed as exc:
                lost_races += 1
                if not core.keep_joining(lost_races, MAX_CAS_ATTEMPTS,
                                         self.kv._clock.monotonic_s(), deadline_s):
                    if deadline_s is not None:
                        return None
                    raise RingKVError(f"lost {MAX_CAS_ATTEMPTS} races to join the queue "
                                      f"{self.key!r}") from exc
                view = self._fresh_view(exc)  # another contender changed it: plan again
                continue
            assert result.commit_ts is not None
            seen_at = result.commit_ts
            current = {k: (v.version if v else None) for k, v in result.reads.items()}
            if result.replayed or not core.join_answered(plan["reads"], current):
                # An answer lost and replayed without reads: read them (and our own key) now.
                current, seen_at = self._versions([*plan["reads"], key])
            mine, ahead, after = core.after_join(view, key, result.commit_ts, current)
            session._saw(self.name, after)
            return mine, ahead, seen_at

    def _fresh_view(self, exc: ConditionFailed) -> core.QueueView:
        """The queue as the failed condition found it (its answer names the queue's value
        and version), or as read now."""
        if exc.details.get("key") == self.key and "current_version" in exc.details:
            return core.view_of(exc.details.get("current_value"),
                                exc.details.get("current_version"))
        head = self.kv.txn(self.keyspace, reads=[self.key]).reads.get(self.key)
        return core.view_of(head.value if head else None, head.version if head else None)

    def leave(self, key: str) -> None:
        """Take ``key``'s entry off the queue (a compare-and-set), with the dead ones."""
        for _ in range(MAX_CAS_ATTEMPTS):
            head = self.kv.get_versioned(self.key, keyspace=self.keyspace)
            entries = core.parse_queue(head.value if head else None,
                                       head.version if head else None)
            reads = self.kv.txn(self.keyspace, reads=[e.key for e in entries]).reads \
                if entries else {}
            current = {k: (v.version if v else None) for k, v in reads.items()}
            after = core.removed(entries, current, key)
            if head is None or after == entries:
                return
            try:
                self.kv.txn(self.keyspace, conditions=[{"key": self.key, "version": head.version}],
                            writes=[{"op": "put", "key": self.key,
                                     "value": core.queue_value(after)}])
            except ConditionFailed:
                continue  # another contender changed the queue first
            return
        raise RingKVError(f"lost {MAX_CAS_ATTEMPTS} races to change the queue {self.key!r}")

    def wait_first(self, mine: Entry, ahead: list[Entry], seen_at: int, deadline_s: float,
                   session: Session) -> bool:
        """Block until no entry ahead of ``mine`` is live (True) or the deadline (False).
        Raises ``LockLost`` when ``mine`` dies meanwhile (or the session is lost)."""
        clock = self.kv._clock
        while True:  # bounded by deadline_s
            session._check()
            if not ahead:
                return True
            if clock.monotonic_s() >= deadline_s:
                return False
            # Watch the one just ahead (from when it was seen live: no gap) until it goes.
            last = ahead[-1]
            recheck_s = clock.monotonic_s() + RECHECK_S
            ticks = _ticks(self.kv, self.keyspace, last.key, prefix=False,
                           from_version=max(last.version, seen_at) or None)
            try:
                for event in ticks:
                    if event is not None and event.version > last.version:
                        break  # deleted (or overwritten): decide again
                    now = clock.monotonic_s()
                    if now >= deadline_s or now >= recheck_s or session.lost:
                        break
            except Compacted:
                pass  # held for longer than history is kept: the read below decides
            finally:
                ticks.close()
            # Only the keys ahead and ours decide: the entries ahead never gain a member.
            current, seen_at = self._recheck(session, ahead, mine)
            ahead = core.still_ahead(ahead, mine, current)

    def _recheck(self, session: Session, ahead: list[Entry],
                 mine: Entry) -> tuple[dict[str, int | None], int]:
        """The versions of the keys ahead and ours, at one snapshot, and its timestamp; the
        queue key is read in it too, for the session's view (``recipes_core.view_read``):
        once this contender has held and released, its next join plans from it."""
        result = self.kv.txn(self.keyspace, reads=[*(e.key for e in ahead), mine.key, self.key])
        current = {k: (v.version if v else None) for k, v in result.reads.items()
                   if k != self.key}
        head = result.reads.get(self.key)
        session._saw(self.name, core.view_read(head.value if head else None,
                                               head.version if head else None, current))
        return current, int((result.receipt or {}).get("read_ts") or 0)


# ---- the mutex -------------------------------------------------------------------

class Lock:
    """A mutex with fencing tokens (``Client.lock``, ``Session.lock``).

    ``with kv.lock("jobs") as held:`` acquires it (``LockTimeout`` after
    ``timeout_s``) and releases it at the end; or ``acquire(timeout_s=)`` (True
    when acquired) and ``release()``. While held: ``fencing_token`` (larger for
    every later holder), ``fenced_put(key, value)`` (a write that lands only
    while the lock is held and no newer holder has written), ``check()``
    (``LockLost`` if the lease expired) and ``lost``.

    Its key lives on a session's lease: the session it was made from, or the
    client's own session of ``ttl_s`` (granted on first use, and again once lost).
    """

    def __init__(self, kv: Client, name: str, *, keyspace: str = "txn",
                 ttl_s: int = DEFAULT_TTL_S, timeout_s: float = DEFAULT_TIMEOUT_S,
                 value: Any = None, session: Session | None = None) -> None:
        self._queue = _Queue(kv, name, keyspace)
        self.kv = kv
        self.name = name
        self.keyspace = keyspace
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s
        self.value = value
        self._given = session
        self._session: Session | None = None  # the session of the current contention
        self._key: str | None = None
        self._entry: Entry | None = None
        self._token: int | None = None
        self._held = False

    @property
    def key(self) -> str | None:
        """This contender's ephemeral key, ``<name>/<lease id>``, once it contends."""
        return self._key

    @property
    def fencing_token(self) -> int:
        if not self._held or self._token is None:
            raise LockLost(f"lock {self.name!r} is not held")
        return self._token

    @property
    def lost(self) -> bool:
        """True once the lock is known lost (a renewal found the lease expired)."""
        return self._held and self._session is not None and self._session.lost

    def acquire(self, timeout_s: float | None = None) -> bool:
        """Wait at most ``timeout_s`` (the lock's default when None) to hold it."""
        if self._held:
            raise RuntimeError(f"lock {self.name!r} is already held by this object")
        clock = self.kv._clock
        deadline_s = clock.monotonic_s() + (self.timeout_s if timeout_s is None else timeout_s)
        for attempt in range(2):  # a lost default session is replaced once
            session = self._given or default_session(self.kv, self.keyspace, self.ttl_s)
            session._check()
            self._session = session
            self._key = session._claim(self.name)
            try:
                joined = self._queue.enqueue(session, self._key, self.value, deadline_s)
            except LeaseExpired as exc:
                session._unclaim(self.name, self._key)
                self._key = None
                session.close()  # lost: the next use of a default session makes a new one
                if self._given is not None or attempt:
                    raise LockLost(f"session {session.id} is lost") from exc
                continue
            except BaseException:
                self._drop()
                raise
            break
        if joined is None:  # the deadline passed while others kept winning the queue
            self._drop()
            return False
        mine, ahead, seen_at = joined
        self._entry, self._token = mine, mine.version
        try:
            if self._queue.wait_first(mine, ahead, seen_at, deadline_s, session):
                self._held = True
                return True
        except BaseException:
            self._drop()
            raise
        self._drop()
        return False

    def release(self) -> None:
        """Let it go: delete its key (the next waiter's watch fires). The session's
        lease lives on for the session's other recipes and the next acquisition."""
        self._held = False
        self._drop()

    def check(self) -> None:
        """Raise ``LockLost`` unless this contender's key is still live (a strong read)."""
        if self._entry is None or not self._held:
            raise LockLost(f"lock {self.name!r} is not held")
        now = self.kv.get_versioned(self._entry.key, keyspace=self.keyspace)
        if now is None or now.version != self._entry.version:
            raise LockLost(f"lock {self.name!r} was lost: its key {self._entry.key!r} is gone")

    def fenced_put(self, key: str, value: Any) -> int:
        """Write ``value`` under ``key`` fenced by this holder's token, in one transaction
        conditioned on the key's fence record (``<key>.fence``: no higher token
        accepted yet) and on this contender's key being live. Returns the commit
        version. ``FencingRejected`` when a newer holder has written; ``LockLost``
        when the lease expired (a paused holder, resumed, cannot write)."""
        token = self.fencing_token
        assert self._entry is not None
        fence = core.fence_key(key)
        for _ in range(MAX_CAS_ATTEMPTS):
            record = self.kv.get_versioned(fence, keyspace=self.keyspace)
            highest = core.fence_token(record.value if record else None)
            if not core.fencing_allows(token, highest):
                assert highest is not None
                raise FencingRejected(f"token {token} is below {highest}, already accepted "
                                      f"at {key!r}", token=token, highest=highest)
            guard: dict[str, Any] = {"key": fence, "version": record.version} if record \
                else {"key": fence, "absent": True}
            try:
                result = self.kv.txn(self.keyspace, conditions=[
                    guard, {"key": self._entry.key, "version": self._entry.version}], writes=[
                    {"op": "put", "key": key, "value": value},
                    {"op": "put", "key": fence, "value": core.fence_value(token, self._entry.key)}])
            except ConditionFailed as exc:
                if exc.details.get("key") == self._entry.key:
                    raise LockLost(f"lock {self.name!r} was lost before the fenced write "
                                   f"to {key!r}") from exc
                continue  # another write to the fence record came first: look again
            assert result.commit_ts is not None
            return result.commit_ts
        raise RingKVError(f"lost {MAX_CAS_ATTEMPTS} races for the fence of {key!r}")

    def __enter__(self) -> Lock:
        if not self.acquire():
            raise LockTimeout(f"lock {self.name!r} not acquired within {self.timeout_s} s")
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def _drop(self) -> None:
        # Delete the key; its queue entry is left behind, dead, skipped by every reader
        # and pruned by the next append that saw it dead (one round trip per release).
        session, key, self._key, self._entry = self._session, self._key, None, None
        if session is None or key is None:
            return
        try:
            if not session.lost:
                try:
                    self.kv.delete(key, keyspace=self.keyspace)
                except RingKVError:
                    session._abandon(key)
                session._saw(self.name, core.without(session._view(self.name), key))
        finally:
            session._unclaim(self.name, key)


# ---- leader election ---------------------------------------------------------------

class Election:
    """Leader election (``Client.election``, ``Session.election``): ``campaign(value)``
    blocks until this candidate leads (the first live one, as for the lock);
    ``leader()`` is the current leader's value, ``observe()`` each new one;
    ``resign()`` steps down."""

    def __init__(self, kv: Client, name: str, *, keyspace: str = "txn",
                 ttl_s: int = DEFAULT_TTL_S, session: Session | None = None) -> None:
        self._queue = _Queue(kv, name, keyspace)
        self.kv = kv
        self.name = name
        self.keyspace = keyspace
        self.ttl_s = ttl_s
        self._session = session
        self._lock: Lock | None = None

    @property
    def is_leader(self) -> bool:
        return self._lock is not None and self._lock._held and not self._lock.lost

    @property
    def lock(self) -> Lock | None:
        """The candidacy while leading: its ``fencing_token``, ``fenced_put`` and ``lost``."""
        return self._lock

    def campaign(self, value: Any, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        """Stand with ``value`` until elected; ``LockTimeout`` after ``timeout_s``."""
        lock = Lock(self.kv, self.name, keyspace=self.keyspace, ttl_s=self.ttl_s,
                    timeout_s=timeout_s, value=value, session=self._session)
        if not lock.acquire(timeout_s):
            raise LockTimeout(f"not elected in {self.name!r} within {timeout_s} s")
        self._lock = lock

    def resign(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def leader(self) -> Any:
        """The current leader's value (None when nobody leads)."""
        alive, _, values, _ = self._queue.read()
        first = core.holder(alive)
        return values[first.key] if first else None

    def observe(self, timeout_s: float | None = None) -> Iterator[Any]:
        """The leader's value now, then each time another leader takes over (None while
        nobody leads); ends after ``timeout_s`` (None: as long as the caller iterates)."""
        yield from _changes(self._queue, lambda alive, values: (
            (alive[0].key, values[alive[0].key]) if alive else (None, None)), timeout_s,
            project=lambda state: state[1])


def _changes(queue: _Queue, state: Any, timeout_s: float | None,
             project: Any = lambda s: s) -> Iterator[Any]:
    """``state(live, values)`` now and at each change, watching the prefix ``<name>/``
    (every contender key) from the snapshot read, so no change is missed."""
    clock = queue.kv._clock
    deadline_s = None if timeout_s is None else clock.monotonic_s() + timeout_s
    last: Any = object()
    while deadline_s is None or clock.monotonic_s() < deadline_s:
        alive, _, values, read_ts = queue.read()
        now = state(alive, values)
        if now != last:
            last = now
            yield project(now)
        ticks = _ticks(queue.kv, queue.keyspace, queue.name + "/", prefix=True,
                       from_version=read_ts or None)
        recheck_s = clock.monotonic_s() + RECHECK_S
        try:
            for event in ticks:
                if event is not None and event.version > read_ts:
                    break
                t = clock.monotonic_s()
                if (deadline_s is not None and t >= deadline_s) or t >= recheck_s:
                    break
        except Compacted:
            pass
        finally:
            ticks.close()


# ---- group membership --------------------------------------------------------------

class Group:
    """Group membership (``Client.group``, ``Session.group``): ``join(member, value)``
    puts the ephemeral key ``<name>/<member>`` on the session's lease (renewed in the
    background) and queues it, in one transaction; ``leave(member)``;
    ``members()`` a snapshot ``{member: value}``; ``watch_members()`` each
    membership as it changes; ``close()`` leaves every member this object joined."""

    def __init__(self, kv: Client, name: str, *, keyspace: str = "txn",
                 ttl_s: int = DEFAULT_TTL_S, session: Session | None = None) -> None:
        self._queue = _Queue(kv, name, keyspace)
        self.kv = kv
        self.name = name
        self.keyspace = keyspace
        self.ttl_s = ttl_s
        self._given = session
        self._joined: dict[str, Session] = {}  # member -> the session its key is on

    @property
    def lost(self) -> bool:
        """True once the session of a member this object joined is lost."""
        return any(session.lost for session in self._joined.values())

    def join(self, member: str, value: Any = None) -> None:
        key = core.contender_key(self.name, member)
        session = self._given or default_session(self.kv, self.keyspace, self.ttl_s)
        session._check()
        try:
            self._queue.enqueue(session, key, value)
        except LeaseExpired as exc:
            session.close()
            raise LockLost(f"session {session.id} is lost") from exc
        self._joined[member] = session

    def leave(self, member: str) -> None:
        key = core.contender_key(self.name, member)
        self._joined.pop(member, None)
        self.kv.delete(key, keyspace=self.keyspace)
        self._queue.leave(key)

    def members(self) -> dict[str, Any]:
        alive, _, values, _ = self._queue.read()
        return {core.member_of(self.name, e.key): values[e.key] for e in alive}

    def watch_members(self, timeout_s: float | None = None) -> Iterator[dict[str, Any]]:
        """The members now, then each new membership; ends after ``timeout_s``."""
        name = self.name
        yield from _changes(self._queue, lambda alive, values: {
            core.member_of(name, e.key): values[e.key] for e in alive}, timeout_s)

    def close(self) -> None:
        """Every member this object joined leaves (their keys go in one transaction)."""
        joined, self._joined = self._joined, {}
        live = [member for member, session in joined.items() if not session.lost]
        if live:
            self.kv.txn(self.keyspace, writes=[
                {"op": "delete", "key": core.contender_key(self.name, m)} for m in live])

    def __enter__(self) -> Group:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# ---- configuration -----------------------------------------------------------------

def watch_config(kv: Client, key: str, *, keyspace: str = "txn",
                 timeout_s: float | None = None) -> Iterator[Any]:
    """A configuration key's value now (None: absent), then each new value in commit
    order, with no gap: read at version V, then watch from V."""
    clock = kv._clock
    deadline_s = None if timeout_s is None else clock.monotonic_s() + timeout_s
    result = kv.txn(keyspace, reads=[key])
    now = result.reads.get(key)
    at = int((result.receipt or {}).get("read_ts") or 0) or (now.version if now else None)
    yield now.value if now else None
    ticks = _ticks(kv, keyspace, key, prefix=False, from_version=at)
    try:
        for event in ticks:
            if event is not None:
                yield event.value
            if deadline_s is not None and clock.monotonic_s() >= deadline_s:
                return
    finally:
        ticks.close()
