"""The transaction manager at a group's leader, and where a request goes (pure).

Spanner §4.2.1: a read-write transaction takes its locks at the group's
leader (two-phase locking with wound-wait, ``txn/locks.py``), evaluates its
reads and conditions on the applied state while it holds them, proposes its
writes as one Paxos entry at a timestamp ``s`` the leader assigns, waits
until ``TT.after(s)`` (commit wait, §4.1.2, overlapped with replication),
and only then releases its locks and answers. This module decides each of
those steps; ``txn/service.py`` carries them out.

``TxnManager`` drives the lock table for whole transactions. A transaction
names every key it touches up front (one-shot transactions do), so it asks
for its locks in key order, one at a time: exclusive for a key it writes,
shared for a key it only reads or tests. ``begin``, ``abort`` and ``finish``
return a ``Step``: the transactions that now hold every lock they asked for
(the shell evaluates and proposes them at once, in the same loop turn, so a
ready transaction is committing before anything can wound it) and the
transactions an older one wounded (the shell aborts them, which frees their
locks, and retries them later under their first priority, so they age and
cannot starve; ``Retries`` bounds how often).

``evaluate`` decides a transaction on what it read under its locks: commit
its writes, answer its reads, or fail on the first condition that does not
hold (409 ``condition_failed``, with the key's current value and version).

``route`` decides where a request for a range is served: here (this node
leads, or the request is a snapshot read this replica can serve), forwarded
to the leader (or, from a node outside the group, to a member), waited on
(no leader yet: an election is running), or refused (``MOVING``) when the
caller says the group it holds for the range is not the ring's. While a
group moves to the ring's replicas through its own log, its configuration
serves: the caller passes the ring's replicas followed by the members on
their way out, so a hint naming a leader being removed is still followed.
A range the ring cut differently (a split or merge) is refused by the
service before routing: serving it from the old group beside a new one
would silently split the range's history.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from ringkv.errors import ConditionFailed
from ringkv.txn.locks import LockTable, Mode, Priority, TxnId
from ringkv.txn.requests import Condition, TxnRequest

__all__ = [
    "MAX_CONFLICT_RETRIES", "Step", "TxnManager", "Verdict", "COMMIT", "READ_ONLY",
    "CONDITION_FAILED", "evaluate", "condition_failed", "lock_plan", "Route", "route",
]

MAX_CONFLICT_RETRIES = 8  # txn.max_conflict_retries


class Step(NamedTuple):
    ready: tuple[TxnId, ...]  # hold every lock they asked for: evaluate and propose them now
    wounded: tuple[TxnId, ...]  # wounded by an older transaction: abort them


def lock_plan(reads: Iterable[bytes], writes: Iterable[bytes]) -> list[tuple[bytes, Mode]]:
    """Each key once, in key order: EXCLUSIVE if written, else SHARED.

    One global order is not needed for safety (wound-wait prevents deadlock
    whatever the order) but it makes two transactions over the same keys
    meet at their first common key, so the younger waits before holding
    anything the older needs.
    """
    modes: dict[bytes, Mode] = {key: Mode.SHARED for key in reads}
    for key in writes:
        modes[key] = Mode.EXCLUSIVE
    return sorted(modes.items())


@dataclass
class _Txn:
    priority: Priority
    plan: list[tuple[bytes, Mode]]
    next_lock: int = 0


class TxnManager:
    """Whole transactions over one leader's ``LockTable`` (module notes)."""

    def __init__(self) -> None:
        self.locks = LockTable()
        self._txns: dict[TxnId, _Txn] = {}
        self._committing: set[TxnId] = set()

    def __len__(self) -> int:
        return len(self._txns)

    def __contains__(self, txn: object) -> bool:
        return txn in self._txns

    def begin(self, txn: TxnId, priority: Priority, plan: Sequence[tuple[bytes, Mode]]) -> Step:
        """Start asking for ``plan``'s locks (``lock_plan``)."""
        if txn in self._txns:
            raise ValueError(f"transaction {txn!r} is already running")
        self._txns[txn] = _Txn(priority, list(plan))
        ready: list[TxnId] = []
        wounded: list[TxnId] = []
        self._advance(txn, ready, wounded)
        return Step(tuple(ready), tuple(wounded))

    def extend(self, txn: TxnId, priority: Priority, plan: Sequence[tuple[bytes, Mode]]) -> Step:
        """Ask for more locks for ``txn`` (a transaction across ranges takes them
        operation by operation here, then its write locks at prepare): ``begin``
        for a new one; a lock already held in that mode (or exclusively) is kept."""
        state = self._txns.get(txn)
        if state is None:
            return self.begin(txn, priority, plan)
        if state.next_lock < len(state.plan):
            raise ValueError(f"transaction {txn!r} still waits for a lock")
        state.plan.extend(plan)
        ready: list[TxnId] = []
        wounded: list[TxnId] = []
        self._advance(txn, ready, wounded)
        return Step(tuple(ready), tuple(wounded))

    def start_commit(self, txn: TxnId) -> None:
        """``txn`` holds its locks and is proposing: it can no longer be wounded."""
        self._committing.add(txn)
        self.locks.start_commit(txn)

    def abort(self, txn: TxnId) -> Step:
        """Drop ``txn`` (wounded, refused, or failed a condition) and its locks."""
        return self.finish(txn)

    def finish(self, txn: TxnId) -> Step:
        """``txn`` is done (committed after commit wait, or aborted): release its locks."""
        if self._txns.pop(txn, None) is None:
            return Step((), ())
        self._committing.discard(txn)
        ready: list[TxnId] = []
        wounded: list[TxnId] = []
        for granted in self.locks.release(txn):
            state = self._txns.get(granted.txn)
            if state is None:
                continue
            state.next_lock += 1
            self._advance(granted.txn, ready, wounded)
        return Step(tuple(ready), tuple(w for w in dict.fromkeys(wounded) if w in self._txns))

    def holds_all(self, txn: TxnId) -> bool:
        state = self._txns.get(txn)
        return state is not None and state.next_lock >= len(state.plan)

    def _advance(self, txn: TxnId, ready: list[TxnId], wounded: list[TxnId]) -> None:
        state = self._txns[txn]
        while state.next_lock < len(state.plan):
            key, mode = state.plan[state.next_lock]
            acquired = self.locks.acquire(txn, state.priority, key, mode)
            wounded.extend(w for w in acquired.wound if w not in self._committing)
            if not acquired.granted:
                return  # queued: a release grants it later
            state.next_lock += 1
        ready.append(txn)


@dataclass(frozen=True)
class Retries:
    """How often a wounded transaction is retried before it is answered aborted."""

    max_retries: int = MAX_CONFLICT_RETRIES
    attempts: dict[TxnId, int] = field(default_factory=dict)

    def again(self, txn: TxnId) -> bool:
        """Count one more wound of ``txn``; True while it may run again."""
        self.attempts[txn] = self.attempts.get(txn, 0) + 1
        return self.attempts[txn] <= self.max_retries

    def forget(self, txn: TxnId) -> None:
        self.attempts.pop(txn, None)


# --- deciding a transaction ---------------------------------------------------------------

COMMIT, READ_ONLY, CONDITION_FAILED = "commit", "read_only", "condition_failed"


class Current(NamedTuple):
    """A key's committed state read under the transaction's lock."""

    value: bytes | None
    version_us: int | None


@dataclass(frozen=True)
class Verdict:
    kind: str  # COMMIT, READ_ONLY or CONDITION_FAILED
    writes: tuple[tuple[bytes, bytes | None], ...] = ()
    reads: tuple[tuple[bytes, Current], ...] = ()
    failed: Condition | None = None
    failed_index: int | None = None
    current: Current | None = None


def evaluate(request: TxnRequest, current: Mapping[bytes, Current]) -> Verdict:
    """What the transaction does, given every key's state under its locks.

    Conditions are tested in order and the first that fails decides (409
    ``condition_failed`` names it); otherwise the writes commit together and
    the reads come back as of the same commit timestamp (they were read
    under locks that the commit holds until after its commit wait).
    """
    for i, condition in enumerate(request.conditions):
        state = current.get(condition.key, Current(None, None))
        if not condition.holds(state.value, state.version_us):
            return Verdict(CONDITION_FAILED, failed=condition, failed_index=i, current=state)
    reads = tuple((key, current.get(key, Current(None, None))) for key in request.reads)
    if not request.writes:
        return Verdict(READ_ONLY, reads=reads)
    return Verdict(COMMIT, writes=tuple((w.key, w.value) for w in request.writes), reads=reads)


def condition_failed(verdict: Verdict, txn_id: str) -> ConditionFailed:
    """The 409 ``condition_failed`` for a ``CONDITION_FAILED`` verdict: the key, the
    condition that failed, and what the key holds."""
    failed, current = verdict.failed, verdict.current
    if failed is None or current is None:
        raise ValueError("the verdict is not a failed condition")
    key = failed.key.decode(errors="replace")
    return ConditionFailed(
        f"condition {failed.kind} on key {key!r} does not hold", key=key,
        field=f"conditions[{verdict.failed_index}]",
        current_value=None if current.value is None else json.loads(current.value),
        current_version=current.version_us, id=txn_id)


# --- where a request goes ---------------------------------------------------------------------


class Route(enum.Enum):
    LOCAL = "local"  # serve it here
    FORWARD = "forward"  # send it to ``target``
    WAIT = "wait"  # no leader known yet: wait for the election, then route again
    MOVING = "moving"  # the group held here is not the ring's and cannot move: 503 range_moving


class RouteDecision(NamedTuple):
    route: Route
    target: str | None = None


def route(
    node_id: str,
    replicas: Sequence[str],
    *,
    persisted: Sequence[str] | None,
    leads: bool,
    leader_hint: str | None,
    snapshot_ready: bool = False,
    snapshot_read: bool = False,
    hops: int = 0,
    max_hops: int = 2,
) -> RouteDecision:
    """Where to serve a request for a range served by ``replicas`` (the ring's,
    then a moving group's members on their way out; ``replicas[0]`` is where a
    node outside them forwards).

    ``persisted``: the members of a group this node holds for the range that
    must not serve it (None: none, or one that moves with the ring, which the
    service passes); ``leads``: this node leads the group with a
    live lease; ``leader_hint``: the leader it last heard from (not itself);
    ``snapshot_ready``: this replica's safe time has passed the read's
    timestamp; ``hops``: how often the request was forwarded already (a
    stale hint must not bounce a request between two nodes forever).
    """
    if persisted is not None and set(persisted) != set(replicas):
        return RouteDecision(Route.MOVING)
    member = node_id in replicas
    if snapshot_read and member and (snapshot_ready or leads):
        return RouteDecision(Route.LOCAL)
    if leads:
        return RouteDecision(Route.LOCAL)
    if hops >= max_hops:
        return RouteDecision(Route.WAIT)  # a forwarded request that found no leader: the sender retries
    if leader_hint is not None and leader_hint != node_id and leader_hint in replicas:
        return RouteDecision(Route.FORWARD, leader_hint)
    if not member:
        return RouteDecision(Route.FORWARD, replicas[0])  # the preferred leader: likeliest to lead
    return RouteDecision(Route.WAIT)
