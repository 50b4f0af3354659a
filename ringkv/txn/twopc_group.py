"""Two-phase commit at one group's leader on this node (shell).

``GroupLocks`` is the leader's lock table for the group (``txn/leader.py``'s
``TxnManager``, wound-wait), shared by one-range transactions and the
transactions across ranges, so the two exclude each other key by key. A
caller asks for locks with a callback that hears "ready" or "wounded";
a transaction wounded while it waits for nothing (one across ranges, between
its operations) is reported to ``on_wounded``.

``TwoPCRoles`` runs the pure coordinator and participant of ``txn/twopc.py``
for the group while this node leads it, and carries out their effects:

* ``Log``: ``GroupRunner.propose_record`` (a prepare at the timestamp
  ``assign_now`` handed out in the same step). A record takes effect when the
  group applies it (``on_record``: ``logged``, or ``log_failed`` for a prepare
  superseded there); a proposal refused at once is ``log_failed`` at once.
* ``Send``: to the group's leader, wherever it is (the service's ``send``).
* ``Lock``: exclusive locks in ``GroupLocks``; granted, the transaction is
  committing (no longer woundable) and gets its prepare timestamp.
* ``Release``: the locks go, and their waiters wake.
* ``Apply``: nothing here. Every replica applies a logged outcome's writes as
  it applies the entry (``GroupRunner``).
* ``CommitWait``: a tick once ``TT.after(s)`` (Spanner §4.1.2).
* ``Answer``: the waiting commit request hears the outcome.

**Leading.** The roles start only once this node leads the group under a
lease and has applied every slot its phase 1 found (``recover``'s contract:
the log is complete), and then recover from the group's 2PC records
(``txn/twopc_records.py``). The coordinator logs no begin record
(``log_begin=False``): its prepares go out at once, and a transaction a
failed leader had not decided is presumed aborted (the session's retry of
its commit request starts it again). They stop when the lease lapses or the ballot
changes: their state is dropped and the locks of their transactions are
released (a prepared transaction's locks come back with the next leader's
``recover``; an active one's are gone, and its prepare votes no).

**Operations of a transaction across ranges** (``lock_and_read``): the
session that runs the transaction (``txn/cross_range.py``) takes its locks
and reads its keys here, one operation per range, under its first priority.
A later operation of a transaction this participant does not know (a new
leader, an idle abort) is refused: the locks it held are gone.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from ringkv.clock import Clock
from ringkv.errors import Aborted, ClockUncertain, NoLeader, Timeout
from ringkv.txn.group import REFUSED, GroupRunner, Outcome
from ringkv.txn.leader import Current, Step, TxnManager, lock_plan
from ringkv.txn.locks import Mode
from ringkv.txn.mvcc import MvccStore
from ringkv.txn.truetime import TrueTime, TTInterval
from ringkv.txn.twopc import (
    COORDINATOR_MESSAGES,
    Answer,
    Apply,
    CommitWait,
    Effect,
    LocalPrepare,
    Lock,
    Log,
    PState,
    Release,
    Send,
    Timeouts,
    TwoPCCoordinator,
    TwoPCParticipant,
)
from ringkv.txn.twopc_messages import (
    BeginRecord,
    CommitRequest,
    DecisionRecord,
    Message,
    PreparedRecord,
    Priority,
    Record,
    Vote,
)
from ringkv.txn.twopc_records import COORDINATOR, PARTICIPANT

log = logging.getLogger(__name__)

__all__ = ["GroupLocks", "TwoPCRoles", "READY", "WOUNDED", "LOST"]

READY, WOUNDED, LOST, TIMEOUT = "ready", "wounded", "lost", "timeout"
WAIT_STEP_S = 0.005  # polling step while the roles recover, within the deadline
COMMIT_WAIT_ROUNDS = 100  # commit-wait timers per decision before the periodic tick takes over
# TT.now() while the clock is uncertain, for what decides nothing (a record logged, a
# no vote): nothing is after(s) in it. Never for a yes vote: s would be taken from it.
_NEVER = TTInterval(0, 2**62)

Woken = Callable[[str], None]


class GroupLocks:
    """The leader's lock table for one group (module notes)."""

    def __init__(self) -> None:
        self.manager = TxnManager()
        self._waiters: dict[str, Woken] = {}
        self.on_wounded: Callable[[str], None] | None = None

    def __len__(self) -> int:
        return len(self.manager.locks)

    def ask(self, txn_id: str, priority: Priority, plan: Sequence[tuple[bytes, Mode]],
            woken: Woken, *, wait: bool = True) -> bool:
        """Ask for ``plan``'s locks (more of them, for a transaction holding some);
        ``woken`` hears READY once all are held, or WOUNDED. ``wait`` False: unless
        they are all granted at once, the transaction is aborted here (every lock
        it holds released) and ``woken`` hears nothing. True when granted at once."""
        self._waiters[txn_id] = woken
        try:
            step = self.manager.extend(txn_id, priority, plan)
        except ValueError:
            self._waiters.pop(txn_id, None)
            raise
        granted = txn_id in step.ready
        if not granted and not wait:
            self._waiters.pop(txn_id, None)
            self.apply(step)  # its wounds stand: the wounded lost nothing they may keep
            self.apply(self.manager.abort(txn_id))
            return False
        self.apply(step)
        return granted

    def start_commit(self, txn_id: str) -> None:
        self.manager.start_commit(txn_id)

    def finish(self, txn_id: str) -> None:
        """Release ``txn_id``'s locks (committed, or aborted): its waiter hears nothing."""
        self._waiters.pop(txn_id, None)
        self.apply(self.manager.finish(txn_id))

    def apply(self, step: Step) -> None:
        """Wake the ready, abort the wounded (which frees their locks: more may wake)."""
        pending = [step]
        while pending:
            ready, wounded = pending.pop()
            for txn in ready:
                waiter = self._waiters.pop(str(txn), None)
                if waiter is not None:
                    waiter(READY)
            for txn in wounded:
                waiter = self._waiters.pop(str(txn), None)
                pending.append(self.manager.abort(txn))
                if waiter is not None:
                    waiter(WOUNDED)
                elif self.on_wounded is not None:
                    self.on_wounded(str(txn))


class TwoPCRoles:
    """The coordinator and participant of one group at this node (module notes)."""

    def __init__(
        self,
        runner: GroupRunner,
        locks: GroupLocks,
        *,
        mvcc: MvccStore,
        clock: Clock,
        truetime: TrueTime,
        send: Callable[[str, Message], None],
        caught_up: Callable[[GroupRunner, float], Awaitable[None]],
        timeouts: Timeouts,
        faults: Any = None,
    ) -> None:
        """``faults``: the service's ``TxnFaults`` (planted bugs for the checkers)."""
        self.runner = runner
        self.group_id = runner.group_id
        self.locks = locks
        self._mvcc = mvcc
        self._clock = clock
        self._truetime = truetime
        self._send = send
        self._caught_up = caught_up
        self.timeouts = timeouts
        self._faults = faults
        self.coordinator = TwoPCCoordinator(self.group_id, timeouts, log_begin=False)
        self.participant = TwoPCParticipant(self.group_id, timeouts)
        self.ballot: Any = None  # the ballot the roles run under; None: not running
        self._recover_through: int | None = None
        self._answers: dict[str, asyncio.Future[tuple[bool, int] | None]] = {}
        self._txns: set[str] = set()  # transactions holding locks here through 2PC
        self._local: set[str] = set()  # ... as this coordinator's own part (LocalPrepare)
        self.stats = {"recoveries": 0, "stepped_down": 0, "logged": 0, "log_failed": 0}
        locks.on_wounded = self._wounded

    @property
    def active(self) -> bool:
        return self.ballot is not None

    # -- leading ------------------------------------------------------------------------------

    def tick(self) -> None:
        """Start (recover) or stop with the lead, then time passes for both roles."""
        runner, replica = self.runner, self.runner.replica
        leads = replica is not None and runner.is_leader()
        if self.ballot is not None and (replica is None or not leads or replica.ballot != self.ballot):
            self._step_down()
        now_s = self._clock.monotonic_s()
        if self.ballot is None:
            if not leads or replica is None:
                self._recover_through = None
                return
            if self._recover_through is None:
                self._recover_through = replica.next_slot - 1
            if runner.applied_through < self._recover_through:
                return  # the log is not complete here yet
            tt = self._tt()
            if tt is None:
                return
            self.ballot = replica.ballot
            self._recover_through = None
            self.stats["recoveries"] += 1
            self._run(self.coordinator.recover(runner.records.records(COORDINATOR), now_s, tt))
            self._run(self.participant.recover(runner.records.records(PARTICIPANT), now_s))
            return
        tt = self._tt()
        if tt is not None:
            self._run(self.coordinator.tick(now_s, tt))
        self._run(self.participant.tick(now_s))

    def stop(self) -> None:
        if self.ballot is not None:
            self._step_down()

    def _step_down(self) -> None:
        self.stats["stepped_down"] += 1
        self.ballot = None
        self._recover_through = None
        for future in self._answers.values():
            if not future.done():
                future.set_result(None)  # unknown: the next leader finishes it
        self._answers.clear()
        for txn in sorted(self._txns):
            self.locks.finish(txn)
        self._txns.clear()
        self._local.clear()
        self.coordinator = TwoPCCoordinator(self.group_id, self.timeouts, log_begin=False)
        self.participant = TwoPCParticipant(self.group_id, self.timeouts)

    def _tt(self) -> TTInterval | None:
        """``TT.now()`` for the roles, with ``latest`` raised above every timestamp
        this leader handed out: a commit timestamp chosen from it is above them
        all, so the decision record, logged at ``s``, is the first entry at or
        above ``s`` in this group's log (``txn/twopc.py``: the coordinator's own part)."""
        try:
            tt = self._truetime.now(self._clock.wall_us(), self._clock.monotonic_s())
        except ClockUncertain:
            return None
        replica = self.runner.replica
        floor_us = 0 if replica is None else replica.max_assigned_ts + 1
        return tt if tt.latest_us >= floor_us else TTInterval(tt.earliest_us, floor_us)

    # -- what the roles are fed -----------------------------------------------------------------

    def step(self, msg: Message) -> None:
        """A 2PC message for this group (dropped unless the roles run: it is resent)."""
        if self.ballot is None:
            return
        now_s = self._clock.monotonic_s()
        if isinstance(msg, COORDINATOR_MESSAGES):
            tt = self._tt()
            if tt is None:
                return  # a vote decides with TT.now(): the prepare is resent, so is the vote
            self._run(self.coordinator.step(msg, now_s, tt))
        else:
            self._run(self.participant.step(msg, now_s))

    def on_record(self, record: Record, superseded: bool) -> None:
        """The group applied ``record`` (every replica calls this; the leader acts)."""
        if self.ballot is None:
            return
        now_s = self._clock.monotonic_s()
        coordinator = isinstance(record, (BeginRecord, DecisionRecord))
        if superseded:
            self.stats["log_failed"] += 1
            self._run(self.coordinator.log_failed(record, now_s) if coordinator
                      else self.participant.log_failed(record, now_s))
            return
        self.stats["logged"] += 1
        if coordinator:
            self._run(self.coordinator.logged(record, now_s, self._tt() or _NEVER))
        else:
            self._run(self.participant.logged(record, now_s))

    # -- a transaction's operations --------------------------------------------------------------

    async def lock_and_read(self, txn_id: str, priority: Priority, reads: Sequence[bytes],
                            writes: Sequence[bytes], *, first: bool,
                            deadline_s: float) -> list[tuple[bytes, Current]]:
        """Take ``txn_id``'s locks on these keys (shared to read, exclusive to write)
        and read every one of them as committed, under the locks."""
        await self.until_active(deadline_s)
        now_s = self._clock.monotonic_s()
        participant = self.participant
        if not first and participant.state(txn_id) is None:
            if participant.outcome(txn_id) is not None:
                raise Aborted(f"transaction {txn_id} was aborted in range {self.group_id} "
                              "(wounded by an older transaction, or idle too long)", id=txn_id,
                              reason="wounded")
            raise Aborted(f"transaction {txn_id} lost its locks in range {self.group_id} "
                          "(a new leader, or it was idle too long)", id=txn_id,
                          reason="leader_changed")
        if not participant.touch(txn_id, now_s):
            raise Aborted(f"transaction {txn_id} was aborted in range {self.group_id} (wounded by "
                          "an older transaction, or idle too long)", id=txn_id, reason="wounded")
        if participant.state(txn_id) is not PState.ACTIVE:
            raise Aborted(f"transaction {txn_id} is committing in range {self.group_id}",
                          id=txn_id, reason="in_progress")
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        ballot = self.ballot
        self._txns.add(txn_id)
        try:
            self.locks.ask(txn_id, priority, lock_plan(reads, writes),
                           functools.partial(self._op_woken, ballot, txn_id, future))
        except ValueError:
            raise Aborted(f"transaction {txn_id} already waits for a lock in range {self.group_id}",
                          id=txn_id, reason="in_progress") from None
        timer = None
        if not future.done():
            timer = self._clock.call_later(max(0.0, deadline_s - self._clock.monotonic_s()),
                                           _settle, future, TIMEOUT)
        try:
            state = await future
        finally:
            if timer is not None:
                timer.cancel()
        if state == TIMEOUT:
            self.abort(txn_id)
            raise Timeout(f"transaction {txn_id} waited for locks in range {self.group_id} past "
                          "its deadline", consistency="SERIAL", received=0, required=1, write=True)
        if state != READY:
            raise Aborted(f"transaction {txn_id} was wounded by an older transaction in range "
                          f"{self.group_id}", id=txn_id, reason="wounded")
        await self._caught_up(self.runner, deadline_s)
        if self.ballot != ballot or participant is not self.participant:
            raise Aborted(f"transaction {txn_id} lost its locks in range {self.group_id} "
                          "(a new leader)", id=txn_id, reason="leader_changed")
        out: list[tuple[bytes, Current]] = []
        for key in dict.fromkeys([*reads, *writes]):
            version = self._mvcc.latest_version(self.runner.keyspace, key)
            out.append((key, Current(None, None) if version is None or version.value is None
                        else Current(version.value, version.commit_ts_us)))
        return out

    def abort(self, txn_id: str) -> None:
        """The session gave up before committing: release what it holds here."""
        if self.ballot is not None:
            self._run(self.participant.client_abort(txn_id, self._clock.monotonic_s()))

    async def commit(self, request: CommitRequest, deadline_s: float) -> tuple[bool, int] | None:
        """Coordinate ``request`` (this group is its coordinator): (committed, s) once
        decided and, for a commit, past commit wait; None if not known in time."""
        await self.until_active(deadline_s)
        ballot = self.ballot
        future = self._answers.get(request.txn_id)
        if future is None or future.done():
            future = self._answers[request.txn_id] = asyncio.get_running_loop().create_future()
        self._run(self.coordinator.commit(request, self._clock.monotonic_s()))
        if future.done():
            return future.result()
        remaining_s = max(0.0, deadline_s - self._clock.monotonic_s())
        try:
            outcome = await self._wait(future, remaining_s)
            if outcome is None and self.ballot != ballot:
                # This leader stepped down: the group's next one has the decision if
                # one was logged, and otherwise takes the request again (presumed abort).
                raise NoLeader(f"{self.runner.node_id} stopped leading range {self.group_id} "
                               f"while coordinating {request.txn_id}", range=self.group_id,
                               reason="leader_changed")
            return outcome
        finally:
            if self._answers.get(request.txn_id) is future and future.done():
                self._answers.pop(request.txn_id, None)

    async def _wait(self, future: asyncio.Future[tuple[bool, int] | None],
                    timeout_s: float) -> tuple[bool, int] | None:
        """The outcome, or None after ``timeout_s`` on the one clock."""
        timer = self._clock.call_later(timeout_s, _settle, future, None)
        try:
            return await future
        finally:
            timer.cancel()

    async def until_active(self, deadline_s: float) -> None:
        """Until the roles run here (recovered: every prepared transaction's locks
        are back); NoLeader if this node does not lead, or not in time."""
        while self.ballot is None:
            if not self.runner.is_leader():
                raise NoLeader(f"{self.runner.node_id} does not lead range {self.group_id}",
                               range=self.group_id)
            self.tick()
            if self.ballot is not None:
                break
            if self._clock.monotonic_s() + WAIT_STEP_S >= deadline_s:
                raise NoLeader(f"the leader of range {self.group_id} did not finish recovering "
                               "within the deadline", range=self.group_id, reason="no_leader")
            await self._clock.sleep(WAIT_STEP_S)

    def _op_woken(self, ballot: Any, txn_id: str, future: asyncio.Future[str], state: str) -> None:
        if state == WOUNDED and ballot == self.ballot:
            self._run(self.participant.refused(txn_id, self._clock.monotonic_s()))
        _settle(future, state)

    def _wounded(self, txn_id: str) -> None:
        if self.ballot is None or txn_id not in self._txns:
            return
        now_s = self._clock.monotonic_s()
        if txn_id in self._local:  # this coordinator's own part, not decided yet
            self._local.discard(txn_id)
            self._txns.discard(txn_id)
            self._run(self.coordinator.local_refused(txn_id, now_s, self._tt() or _NEVER))
            return
        self._run(self.participant.refused(txn_id, now_s))

    # -- carrying out effects -------------------------------------------------------------------

    def _run(self, effects: list[Effect]) -> None:
        for effect in effects:
            if isinstance(effect, Log):
                self._log(effect.record)
            elif isinstance(effect, Send):
                self._send(effect.group, effect.message)
                if (isinstance(effect.message, Vote) and effect.message.prepared
                        and getattr(self._faults, "early_lock_release", False)):
                    self.locks.finish(effect.message.txn_id)  # planted bug: before the decision
            elif isinstance(effect, Lock):
                self._lock(effect)
            elif isinstance(effect, Release):
                self._txns.discard(effect.txn_id)
                self._local.discard(effect.txn_id)
                self.locks.finish(effect.txn_id)
            elif isinstance(effect, LocalPrepare):
                self._local_prepare(effect)
            elif isinstance(effect, Apply):
                pass  # applied by every replica with the entry (GroupRunner)
            elif isinstance(effect, CommitWait):
                self._after(effect.commit_ts_us, self.ballot, 0)
            elif isinstance(effect, Answer):
                future = self._answers.get(effect.txn_id)
                if future is not None and not future.done():
                    future.set_result((effect.committed, effect.commit_ts_us))

    def _after(self, commit_ts_us: int, ballot: Any, rounds: int) -> None:
        """Commit wait (Spanner §4.1.2): tick once ``TT.after(s)`` holds, asking TrueTime
        again after each wait (new samples move the interval). Bounded; the roles'
        periodic tick covers what is left, and an uncertain clock."""
        if ballot != self.ballot:
            return
        try:
            wait_us = self._truetime.wait_until_after(commit_ts_us, self._clock.wall_us(),
                                                      self._clock.monotonic_s())
        except ClockUncertain:
            return
        if wait_us > 0 and rounds < COMMIT_WAIT_ROUNDS:
            self._clock.call_later(wait_us / 1_000_000, self._after, commit_ts_us, ballot,
                                   rounds + 1)
            return
        self.tick()

    def _log(self, record: Record) -> None:
        if isinstance(record, PreparedRecord) and getattr(self._faults, "skip_prepare_log", False):
            # Planted bug: act as if the prepare were logged, and vote yes.
            self._run(self.participant.logged(record, self._clock.monotonic_s()))
            return
        ts_us = record.prepare_ts_us if isinstance(record, PreparedRecord) else None
        if isinstance(record, DecisionRecord) and record.commit:
            if record.txn_id in self._local:
                self.locks.start_commit(record.txn_id)  # decided: no longer woundable
            # Logged at s itself, and nothing handed out later is at or below it.
            if not self.runner.reserve_ts(record.commit_ts_us):
                self.stats["log_failed"] += 1
                self._run(self.coordinator.log_failed(record, self._clock.monotonic_s()))
                return
            ts_us = record.commit_ts_us
        future = self.runner.propose_record(record, ts_us=ts_us)
        future.add_done_callback(functools.partial(self._log_done, self.ballot, record))

    def _log_done(self, ballot: Any, record: Record, future: asyncio.Future[Outcome]) -> None:
        if ballot != self.ballot or future.cancelled():
            return
        if future.result().status == REFUSED:
            self.stats["log_failed"] += 1
            now_s = self._clock.monotonic_s()
            self._run(self.coordinator.log_failed(record, now_s)
                      if isinstance(record, (BeginRecord, DecisionRecord))
                      else self.participant.log_failed(record, now_s))

    def _local_prepare(self, effect: LocalPrepare) -> None:
        """This group's own part of a transaction it coordinates: its write locks
        now, without waiting (held already if it ran operations here), woundable
        until the decision; then its vote."""
        now_s = self._clock.monotonic_s()
        txn_id = effect.txn_id
        if effect.active_here and not self.participant.hand_over(txn_id):
            self._run(self.coordinator.local_refused(txn_id, now_s, self._tt() or _NEVER))
            return
        self._txns.add(txn_id)
        plan = [(key, Mode.EXCLUSIVE) for key in effect.keys]
        try:
            granted = self.locks.ask(txn_id, effect.priority, plan, _ignore, wait=False)
        except ValueError:
            granted = False
        ts_us = self.runner.assign_now() if granted else None
        tt = self._tt()  # a vote may decide: with a real TT.now() only, never _NEVER
        if ts_us is None or tt is None:
            self._txns.discard(txn_id)
            self.locks.finish(txn_id)
            self._run(self.coordinator.local_refused(txn_id, now_s, self._tt() or _NEVER))
            return
        self._local.add(txn_id)
        self._run(self.coordinator.local_prepared(txn_id, ts_us, now_s, tt))

    def _lock(self, effect: Lock) -> None:
        """A prepare's write locks. The transaction took them (and its read locks)
        while it ran, so they are granted at once unless it lost them; a prepare
        never waits: a prepared transaction cannot be wounded, so one waiting
        here behind an older transaction that waits for it elsewhere would be
        a deadlock wound-wait cannot break. It votes no instead."""
        self._txns.add(effect.txn_id)
        plan = [(key, Mode.EXCLUSIVE) for key in effect.keys]
        try:
            granted = self.locks.ask(effect.txn_id, effect.priority, plan,
                                     functools.partial(self._prepare_locked, self.ballot, effect),
                                     wait=effect.recovered)
        except ValueError:  # still waiting for an operation's lock: it cannot prepare now
            granted = False
        if not granted and not effect.recovered:
            self._run(self.participant.refused(effect.txn_id, self._clock.monotonic_s()))

    def _prepare_locked(self, ballot: Any, effect: Lock, state: str) -> None:
        if ballot != self.ballot:
            return
        now_s = self._clock.monotonic_s()
        if state != READY:
            self._run(self.participant.refused(effect.txn_id, now_s))
            return
        self.locks.start_commit(effect.txn_id)  # prepared: no longer woundable
        if effect.recovered:
            return
        ts_us = self.runner.assign_now()
        if ts_us is None:
            self._run(self.participant.refused(effect.txn_id, now_s))
            return
        self._run(self.participant.locks_granted(effect.txn_id, ts_us, now_s))


def _ignore(_state: str) -> None:
    """A lock request answered at once (``wait=False``): later wounds go to ``on_wounded``."""


def _settle(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)
