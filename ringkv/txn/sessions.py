"""Interactive transactions: one session per transaction, on the node that began it (shell).

``POST /v1/txn/begin`` opens a session here, and the transaction's
operations come back to this node (its id names it). The node is the
transaction's client in Spanner's sense (§4.2.1):

* **Read-write.** A read takes a shared lock at the leader of its key's range
  and reads under it (``tx_lock``, as a one-shot transaction across ranges
  does); the transaction reads its own writes first. A write takes an
  exclusive lock the same way and is buffered here until commit (a prepare
  then finds every lock it needs held, and never waits: see
  ``TwoPCRoles._lock``). ``commit`` runs two-phase
  commit over every range it touched (``txn/twopc_group.py``): a range it
  only read prepares no writes, and so proves its shared locks are still
  held (a range that lost them, to a wound or a new leader, votes no). The
  coordinator is the range of the first write.
* **Read-only** (``read_only``): a snapshot at ``TT.now().latest`` taken at
  begin; every read is served at it by a replica whose safe time has passed
  it (§4.1.4). No locks; ``commit`` only ends it.

A session ends committed, or aborted with the reason every later call names:
``wounded`` (an older transaction needed its locks), ``timeout`` (an
operation or the transaction outlived its deadline), ``condition`` (not used
by sessions themselves: the caller's own), ``client`` (``abort``), ``idle``
(no call for ``txn.idle_timeout_s``), ``leader_changed``, ``aborted`` (the
coordinator decided abort). Aborting releases its locks at every range it
touched; the participants' own idle timeout releases them if that message
is lost.

**Bounds** (FoundationDB keeps a transaction under 10 MB and 5 s): keys
touched (``MAX_KEYS``), buffered write bytes (``MAX_WRITE_BYTES``), lifetime
(``max_duration_s``), open sessions per node (``MAX_SESSIONS``); past one,
413 ``too_large`` or 409 ``aborted`` naming it. One operation at a time per
session: a second one while the first runs is 409 ``in_progress``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from ringkv.clock import Clock
from ringkv.errors import Aborted, NotFound, RingKVError, Timeout, TooLarge
from ringkv.txn.cross_range import Execute, release_locks
from ringkv.txn.ranges import Range, RangeMap
from ringkv.txn.twopc_messages import CommitRequest, Participant

log = logging.getLogger(__name__)

__all__ = ["TxnSessions", "Session", "MAX_KEYS", "MAX_WRITE_BYTES", "MAX_SESSIONS",
           "RETRYABLE_REASONS"]

MAX_KEYS = 10_000  # keys one transaction may read or write
MAX_WRITE_BYTES = 10 * 1024 * 1024  # buffered write bytes (keys and values)
MAX_SESSIONS = 10_000  # open sessions per node
FINISHED_KEPT = 10_000  # ended sessions remembered, to name why they ended
# Why a transaction ended that a rerun from the start may not meet again.
RETRYABLE_REASONS = frozenset({"wounded", "leader_changed", "aborted"})


@dataclass
class Session:
    txn_id: str
    keyspace: str
    read_only: bool
    priority: tuple[int, str]
    started_s: float
    last_used_s: float
    read_ts_us: int | None = None
    writes: dict[bytes, bytes | None] = field(default_factory=dict)
    locked: dict[str, tuple[Range, bytes]] = field(default_factory=dict)  # group -> (range, a key)
    keys: set[bytes] = field(default_factory=set)
    write_bytes: int = 0
    busy: bool = False


class TxnSessions:
    """The open interactive transactions of this node (module notes)."""

    def __init__(self, *, clock: Clock, execute: Execute, range_map: Callable[[str], RangeMap],
                 now_latest_us: Callable[[], int], new_id: Callable[[], str],
                 spawn: Callable[[Awaitable[Any]], None], idle_timeout_s: float,
                 max_duration_s: float) -> None:
        self._clock = clock
        self._execute = execute
        self._range_map = range_map
        self._now_latest_us = now_latest_us
        self._new_id = new_id
        self._spawn = spawn
        self.idle_timeout_s = idle_timeout_s
        self.max_duration_s = max_duration_s
        self._open: dict[str, Session] = {}
        self._ended: dict[str, str] = {}  # txn id -> why it ended (bounded, oldest dropped)
        # txn id -> the user who began it, for as long as the id is open or remembered ended
        self._owners: dict[str, str] = {}
        self.stats = {"begun": 0, "committed": 0, "aborted": 0, "expired": 0}

    def __len__(self) -> int:
        return len(self._open)

    def snapshot_timestamps_us(self) -> list[int]:
        """The snapshots open read-only transactions read at: MVCC GC keeps them readable."""
        return [s.read_ts_us for s in self._open.values() if s.read_ts_us is not None]

    def ended(self, txn_id: str) -> str | None:
        """Why ``txn_id`` ended (``committed``, ``wounded``, ``idle``...), or None
        while it is open or if this node never had it (or forgot it)."""
        return None if txn_id in self._open else self._ended.get(txn_id)

    def owner(self, txn_id: str) -> str | None:
        """The user who began ``txn_id`` (open, or ended and still remembered), or None:
        begun without auth, or never known here. The front ends refuse other users."""
        return self._owners.get(txn_id)

    # -- the calls -------------------------------------------------------------------------

    def begin(self, keyspace: str, *, read_only: bool = False,
              priority_us: int | None = None, owner: str | None = None) -> dict[str, Any]:
        """Open a transaction on ``keyspace`` (which the caller checked is transactional).
        ``priority_us``: the begin time of an earlier attempt this one reruns (its
        answer's ``priority``): wound-wait then treats it as that old, so a rerun
        transaction ages until it wins. ``owner``: the user beginning it (auth.enabled)."""
        if len(self._open) >= MAX_SESSIONS:
            raise TooLarge(f"this node has {MAX_SESSIONS} open transactions; commit or abort "
                           "some first", field="sessions", limit=MAX_SESSIONS)
        self._range_map(keyspace)  # NoLeader while its groups cannot form
        now_s = self._clock.monotonic_s()
        txn_id = self._new_id()
        wall_us = self._clock.wall_us()
        at_us = wall_us if priority_us is None else min(int(priority_us), wall_us)
        session = Session(txn_id, keyspace, read_only, (at_us, txn_id), now_s, now_s)
        if read_only:
            session.read_ts_us = self._now_latest_us()
        self._open[txn_id] = session
        if owner is not None:
            self._owners[txn_id] = owner
        self.stats["begun"] += 1
        answer: dict[str, Any] = {"txn_id": txn_id, "keyspace": keyspace, "read_only": read_only,
                                  "priority": at_us,
                                  "idle_timeout_s": self.idle_timeout_s,
                                  "max_duration_s": self.max_duration_s}
        if read_only:
            answer["read_ts"] = session.read_ts_us
        return answer

    async def get(self, txn_id: str, keyspace: str, key: bytes, deadline_s: float) -> dict[str, Any]:
        """The key as the transaction sees it (its own write first); NotFound if absent."""
        session = self._take(txn_id, keyspace)
        try:
            if key in session.writes:
                value = session.writes[key]
                if value is None:
                    raise NotFound(f"key {key.decode(errors='replace')!r} is deleted in transaction "
                                   f"{txn_id}", id=txn_id)
                return {"key": key, "value": value, "version": None, "own_write": True}
            self._count_key(session, key)
            if session.read_only:
                assert session.read_ts_us is not None
                answer = await self._execute("snapshot_get", keyspace, key,
                                             {"snapshot_ts_us": session.read_ts_us}, deadline_s,
                                             missing_ok=True)
                if not answer:
                    raise NotFound(f"key {key.decode(errors='replace')!r} not found at "
                                   f"{session.read_ts_us} in transaction {txn_id}", id=txn_id)
                return {"key": key, "value": answer["value"], "version": answer["version"]}
            rng = self._range_map(keyspace).range_for_key(key)
            first = rng.group_id not in session.locked
            session.locked.setdefault(rng.group_id, (rng, key))
            answer = await self._execute("tx_lock", keyspace, key, {
                "txn_id": txn_id, "priority": session.priority, "lock_reads": (key,),
                "lock_writes": (), "first": first}, deadline_s)
            _, value, version = answer["reads"][0]
            if value is None:
                raise NotFound(f"key {key.decode(errors='replace')!r} not found in transaction "
                               f"{txn_id}", id=txn_id)
            return {"key": key, "value": value, "version": version}
        except (NotFound, TooLarge):
            raise  # the transaction goes on: an absent key, or one key too many asked for
        except RingKVError as exc:
            self._fail(session, exc)
            raise
        finally:
            self._release(session)

    async def write(self, txn_id: str, keyspace: str, key: bytes, value: bytes | None,
                    deadline_s: float) -> dict[str, Any]:
        """Lock the key and buffer a put (``value``) or a delete (None); it takes
        effect at commit."""
        session = self._take(txn_id, keyspace)
        try:
            if session.read_only:
                raise Aborted(f"transaction {txn_id} is read-only; it cannot write", id=txn_id,
                              reason="read_only")
            self._count_key(session, key)
            old = session.writes.get(key)
            size = len(key) + len(value or b"")
            grown = session.write_bytes + size - (len(key) + len(old or b"") if key in session.writes else 0)
            if grown > MAX_WRITE_BYTES:
                raise TooLarge(f"transaction {txn_id} would buffer {grown} bytes of writes, over the "
                               f"limit of {MAX_WRITE_BYTES}", field="value", limit=MAX_WRITE_BYTES,
                               id=txn_id)
            if key not in session.writes:
                rng = self._range_map(keyspace).range_for_key(key)
                first = rng.group_id not in session.locked
                session.locked.setdefault(rng.group_id, (rng, key))
                try:
                    await self._execute("tx_lock", keyspace, key, {
                        "txn_id": txn_id, "priority": session.priority, "lock_reads": (),
                        "lock_writes": (key,), "first": first}, deadline_s)
                except RingKVError as exc:
                    self._fail(session, exc)
                    raise
            session.writes[key] = value
            session.write_bytes = grown
            return {"ok": True, "id": txn_id, "buffered": len(session.writes)}
        finally:
            self._release(session)

    async def commit(self, txn_id: str, deadline_s: float) -> dict[str, Any]:
        session = self._take(txn_id, None)
        try:
            if session.read_only:
                self._end(session, "committed")
                return {"ok": True, "id": txn_id, "committed": True, "read_ts": session.read_ts_us}
            ranges = self._range_map(session.keyspace)
            writes: dict[str, list[tuple[bytes, bytes | None]]] = {}
            touched: dict[str, tuple[Range, bytes]] = dict(session.locked)
            for key, value in session.writes.items():
                rng = ranges.range_for_key(key)
                writes.setdefault(rng.group_id, []).append((key, value))
                touched.setdefault(rng.group_id, (rng, key))
            if not touched:
                self._end(session, "committed")
                return {"ok": True, "id": txn_id, "committed": True, "commit_ts": None}
            participants = tuple(
                Participant(gid, tuple(writes.get(gid, ())), active_here=gid in session.locked)
                for gid in touched)
            first_write = next(iter(session.writes), None)
            coordinator = (ranges.range_for_key(first_write).group_id if first_write is not None
                           else next(iter(touched)))
            key = touched[coordinator][1]
            answer = await self._execute("tx_commit", session.keyspace, key, {
                "txn_id": txn_id, "commit": CommitRequest(txn_id, session.priority, participants)},
                deadline_s)
            if not answer.get("committed"):
                self._end(session, "aborted", release=False)
                raise Aborted(f"transaction {txn_id} was aborted by its coordinator: a range voted "
                              "no (it was wounded by an older transaction, or lost its locks to a "
                              "new leader)", id=txn_id, reason="aborted")
            self._end(session, "committed", release=False)
            return {"ok": True, "id": txn_id, "committed": True, "commit_ts": answer["commit_ts"],
                    "receipt": {"coordinator": coordinator, "ranges": list(touched)}}
        except Timeout as exc:
            # Asked to commit and heard nothing in time: it may have committed.
            self._end(session, "unknown", release=False)
            raise Timeout(f"transaction {txn_id}'s outcome is not known yet; ask "
                          f"GET /v1/txn/{txn_id}", consistency="SERIAL", received=0, required=1,
                          write=True) from exc
        except Aborted:
            raise
        except RingKVError as exc:
            self._fail(session, exc)
            raise
        finally:
            self._release(session)

    def abort(self, txn_id: str) -> dict[str, Any]:
        session = self._take(txn_id, None)
        self._end(session, "client")
        return {"ok": True, "id": txn_id, "aborted": True}

    def expire(self) -> int:
        """End sessions idle past ``idle_timeout_s`` or alive past ``max_duration_s``."""
        now_s = self._clock.monotonic_s()
        gone = 0
        for session in list(self._open.values()):
            if session.busy:
                continue
            if now_s - session.last_used_s >= self.idle_timeout_s:
                self._end(session, "idle")
            elif now_s - session.started_s >= self.max_duration_s:
                self._end(session, "timeout")
            else:
                continue
            gone += 1
            self.stats["expired"] += 1
        return gone

    # -- helpers -----------------------------------------------------------------------------

    def _take(self, txn_id: str, keyspace: str | None) -> Session:
        session = self._open.get(txn_id)
        if session is None:
            why = self._ended.get(txn_id)
            if why is None:
                raise NotFound(f"no open transaction {txn_id!r} on this node (a transaction's "
                               "calls go to the node that began it)", id=txn_id,
                               reason="unknown_txn")
            if why == "committed":
                raise Aborted(f"transaction {txn_id} has committed already", id=txn_id,
                              reason="committed")
            raise Aborted(f"transaction {txn_id} ended: {_WHY.get(why, why)}", id=txn_id,
                          reason=why)
        if keyspace is not None and keyspace != session.keyspace:
            raise Aborted(f"transaction {txn_id} is on keyspace {session.keyspace!r}, not "
                          f"{keyspace!r}", id=txn_id, reason="keyspace", field="keyspace")
        if session.busy:
            raise Aborted(f"transaction {txn_id} is running another operation; one at a time",
                          id=txn_id, reason="in_progress")
        now_s = self._clock.monotonic_s()
        if now_s - session.started_s >= self.max_duration_s:
            self._end(session, "timeout")
            raise Aborted(f"transaction {txn_id} ended: {_WHY['timeout']}", id=txn_id,
                          reason="timeout")
        session.busy = True
        session.last_used_s = now_s
        return session

    def _release(self, session: Session) -> None:
        session.busy = False
        session.last_used_s = self._clock.monotonic_s()

    def _count_key(self, session: Session, key: bytes) -> None:
        if key not in session.keys and len(session.keys) >= MAX_KEYS:
            raise TooLarge(f"transaction {session.txn_id} touches more than {MAX_KEYS} keys",
                           field="key", limit=MAX_KEYS, id=session.txn_id)
        session.keys.add(key)

    def _fail(self, session: Session, exc: RingKVError) -> None:
        """An operation failed: the transaction ends (its locks may be gone)."""
        reason = exc.details.get("reason") if isinstance(exc, Aborted) else None
        self._end(session, str(reason) if reason in RETRYABLE_REASONS else
                  "timeout" if isinstance(exc, Timeout) else "failed")

    def _end(self, session: Session, why: str, *, release: bool = True) -> None:
        self._open.pop(session.txn_id, None)
        self._ended[session.txn_id] = why
        while len(self._ended) > FINISHED_KEPT:
            forgotten = next(iter(self._ended))
            del self._ended[forgotten]
            self._owners.pop(forgotten, None)
        self.stats["committed" if why == "committed" else "aborted"] += 1
        if release and not session.read_only:
            for _, key in session.locked.values():
                self._spawn(release_locks(self._execute, self._clock, session.keyspace,
                                          session.txn_id, key))


_WHY = {
    "wounded": "wounded by an older transaction that needed its locks",
    "leader_changed": "a range it read changed leaders, and its locks there went with the old one",
    "aborted": "aborted by its coordinator",
    "timeout": "it ran past its deadline",
    "client": "aborted by the client",
    "idle": "idle for longer than txn.idle_timeout_s",
    "failed": "an operation failed",
    "unknown": "its commit's outcome is not known here; ask GET /v1/txn/{id}",
}
