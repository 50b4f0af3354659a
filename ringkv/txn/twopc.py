"""Two-phase commit over Paxos groups (pure).

Spanner §4.2.1 commits a transaction that writes several ranges with
two-phase commit whose coordinator and participants are Paxos groups, not
single machines. That is Gray and Lamport's point in "Consensus on
Transaction Commit": once every decision is logged through a group, a
failed leader is replaced by the group's next one, which finds the state
in the log, so 2PC no longer blocks on a crashed coordinator.

Two state machines, in the shape of ``txn/paxos.py`` and etcd's raft: they
take events and ``now_s`` (the leader's monotonic clock, for timers) and,
where a timestamp is chosen or checked, ``tt`` (``TT.now()``); they return
*effects* for the shell to carry out in order. They read no clock and do
no I/O.

``TwoPCCoordinator`` runs at the leader of the coordinator group (one
participant's group, e.g. that of the first key written)::

    CommitRequest ─► log BeginRecord ─► PrepareRequest to every other participant,
                                        LocalPrepare for its own group's part
      ─► all Vote yes: s = max(every prepare ts, TT.now().latest)
         log DecisionRecord(commit, s, its own group's writes) + CommitWait(s)
      ─► a Vote no, or no full vote by prepare_timeout_s: log DecisionRecord(abort)
      ─► decision logged (and, for a commit, TT.after(s)): Answer the client,
         Decision to every participant, resent until each Acks

``TwoPCParticipant`` runs at each participant group's leader::

    [touch: the client runs operations here; idle_timeout_s of silence aborts]
    PrepareRequest ─► Lock(write keys) ─► locks_granted(prepare ts from Paxos)
      ─► log PreparedRecord ─► Vote yes         (refused/wounded first: Vote no)
    Decision ─► log OutcomeRecord ─► Apply(writes at s) / Release ─► Ack
    prepared with no outcome for inquire_after_s ─► Inquiry to the coordinator

The safety rules (Gray and Lamport §3-4; Spanner §4.2.1, §4.1.3):

* **The coordinator group's own part** (Spanner §4.2.1: "the coordinator
  leader ... logs a commit record through Paxos"). It logs neither a prepare
  nor an outcome: ``LocalPrepare`` takes its locks at the leader, the
  ``DecisionRecord`` carries its writes, which every replica applies at
  ``s`` with the record, and its locks go when the decision is told. Its
  shell must log that record at timestamp ``s`` itself, with ``s`` above
  every timestamp the group handed out before (its safe time then never
  passes ``s`` before the record applies: there is no prepare record to
  hold it back); it passes ``tt`` with ``latest`` raised to that.
* **Log before telling.** Nobody hears a decision (no participant, no
  client) before its ``DecisionRecord`` is logged, and no participant votes
  yes before its ``PreparedRecord`` is logged. A successor leader therefore
  never decides differently from what anyone was told.
* **First decision wins.** A coordinator logs at most one decision per
  transaction while it leads; on recovery the first ``DecisionRecord`` in
  the log is the outcome.
* **Recovery** (``recover``, from the records the group's log holds): a
  coordinator re-sends logged decisions (a commit after commit wait again)
  and re-collects the votes of a begun, undecided transaction by re-sending
  its prepares, deciding as before (commit on a full set of yes votes,
  abort at the deadline). A participant re-takes the locks of each
  prepared, undecided transaction, re-sends its vote, and asks the
  coordinator after ``inquire_after_s`` (cooperative termination).
* **Presumed abort.** A coordinator asked about a transaction it has no
  record of logs an abort for it before answering, so a later commit
  request for it is refused rather than decided the other way.
* **Commit timestamps.** ``s >= max(prepare ts)`` and ``s >= TT.now().latest``
  when deciding, and no commit is answered or announced before ``TT.after(s)``
  (commit wait, §4.1.2).
* **Safe time** (§4.1.3). A prepared, undecided transaction may still
  commit at any ``s >= its prepare ts``, so ``safe_time_bound`` is one below
  the smallest such prepare timestamp: t_safe = min(t_Paxos, t_TM).
* **Wound-wait across ranges.** Each group's lock table wounds younger
  holders; a participant wounded before it prepared votes no, which aborts
  the transaction everywhere. A prepared transaction cannot be wounded.
  ``priority`` travels with every request unchanged, so a retried
  transaction keeps its first priority and ages until it wins.

What the shell provides (the contract the tests' model world keeps):

* ``recover`` on the leader only once its log is complete through every
  slot a predecessor may have had chosen (after its Paxos phase 1), with
  every 2PC record of the group in log order: a compacted log must keep
  them (in the snapshot) while a transaction is unfinished.
* ``log_failed`` only for a proposal that definitely was not chosen; a
  leader whose proposal is in doubt stops leading, and its successor
  recovers.
* The prepare timestamp passed to ``locks_granted`` comes from the group's
  Paxos leader, above every timestamp it has handed out (so above the safe
  time it served); the coordinator group is a participant too, so ``s`` is
  above every timestamp the coordinator had handed out when it prepared.
* An ``OutcomeRecord`` commit applies its writes at ``s`` on every replica
  as the log is applied, although ``s`` may lie below timestamps the group
  applied since the prepare (other keys; safe time held back meanwhile).
* Messages older than ``finished_ttl_s``, and client retries of a commit
  request after it, are dropped: outcomes are remembered that long.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field

from ringkv.txn.truetime import TTInterval
from ringkv.txn.twopc_messages import (
    Ack,
    BeginRecord,
    CommitRequest,
    Decision,
    DecisionRecord,
    Inquiry,
    Message,
    OutcomeRecord,
    Participant,
    PreparedRecord,
    PrepareRequest,
    Priority,
    Record,
    Vote,
    Writes,
)

__all__ = [
    "Timeouts", "Log", "Send", "Lock", "LocalPrepare", "Release", "Apply", "CommitWait", "Answer",
    "Effect",
    "COORDINATOR_MESSAGES", "PARTICIPANT_MESSAGES", "CState", "PState", "TwoPCCoordinator", "TwoPCParticipant",
]


@dataclass(frozen=True)
class Timeouts:
    prepare_timeout_s: float = 5.0  # coordinator: every vote by then, or abort
    resend_s: float = 0.5  # coordinator: resend prepares and decisions to the silent
    inquire_after_s: float = 2.0  # participant: prepared this long with no outcome, ask
    idle_timeout_s: float = 60.0  # participant: txn.idle_timeout_s, a client gone away
    finished_ttl_s: float = 600.0  # both: outcomes kept this long for late duplicates

    def __post_init__(self) -> None:
        for name in ("prepare_timeout_s", "resend_s", "inquire_after_s", "idle_timeout_s",
                     "finished_ttl_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0")


# --- effects: what the shell does, in order ----------------------------------------------


@dataclass(frozen=True)
class Log:
    """Propose ``record`` through this group's Paxos log; call ``logged`` once it is
    chosen, or ``log_failed`` if it definitely was not. (A leader that loses its
    lease with a proposal in doubt stops; its successor calls ``recover``.)"""

    record: Record


@dataclass(frozen=True)
class Send:
    """Send ``message`` to the leader of ``group`` (this group's own included)."""

    group: str
    message: Message


@dataclass(frozen=True)
class Lock:
    """Take exclusive locks on ``keys`` for ``txn_id`` at ``priority`` (wound-wait),
    then call ``locks_granted`` with a prepare timestamp from Paxos, or ``refused``.
    ``recovered``: the transaction is prepared already; install the locks at once,
    not woundable (no other transaction holds locks on a new leader yet)."""

    txn_id: str
    priority: Priority
    keys: tuple[bytes, ...]
    recovered: bool = False


@dataclass(frozen=True)
class Release:
    """Release ``txn_id``'s locks and wake its waiters."""

    txn_id: str


@dataclass(frozen=True)
class Apply:
    """The logged ``OutcomeRecord``'s writes take effect at ``commit_ts_us``.
    Every replica applies them as it applies that log entry; on the leader this
    comes before ``Release``, so no one reads the keys between."""

    txn_id: str
    commit_ts_us: int
    writes: Writes


@dataclass(frozen=True)
class CommitWait:
    """Call ``tick`` once ``TT.after(commit_ts_us)`` holds (commit wait, §4.1.2)."""

    txn_id: str
    commit_ts_us: int


@dataclass(frozen=True)
class LocalPrepare:
    """The coordinator's own group is a participant: take its write locks on
    ``keys`` at this leader (with ``active_here``, the transaction must hold
    its locks here already, from its operations), then call
    ``local_prepared`` with a timestamp from this leader, or
    ``local_refused``. Nothing is logged: the decision record carries this
    group's writes, and a leader that fails before deciding leaves the
    transaction to presumed abort. The locks stay woundable until a commit
    decision is logged (``local_refused`` then, which aborts it): a part
    that could not be wounded before the others voted could deadlock with
    another coordinator's."""

    txn_id: str
    priority: Priority
    keys: tuple[bytes, ...]
    active_here: bool


@dataclass(frozen=True)
class Answer:
    """Answer the client waiting on ``txn_id`` (if any): committed at
    ``commit_ts_us``, or aborted."""

    txn_id: str
    committed: bool
    commit_ts_us: int


Effect = Log | Send | Lock | LocalPrepare | Release | Apply | CommitWait | Answer

# Which role a message is for, at the group it is sent to.
COORDINATOR_MESSAGES = (CommitRequest, Vote, Ack, Inquiry)
PARTICIPANT_MESSAGES = (PrepareRequest, Decision)


@dataclass(frozen=True)
class _Finished:
    commit: bool
    commit_ts_us: int
    prepare_ts_us: int  # the participant's (0 if it never prepared)
    forget_at_s: float


def _forget(finished: dict[str, _Finished], now_s: float) -> None:
    """Drop outcomes past their time. They are added in the order they finish, each
    kept the same ``finished_ttl_s``, so the oldest come first: stop at the first
    still kept (one replaced in place is at worst kept a little longer)."""
    gone = []
    for txn_id, done in finished.items():
        if done.forget_at_s > now_s:
            break
        gone.append(txn_id)
    for txn_id in gone:
        del finished[txn_id]


# --- the coordinator ---------------------------------------------------------------------


class CState(enum.Enum):
    BEGINNING = "beginning"  # BeginRecord proposed
    COLLECTING = "collecting"  # prepares sent, votes coming in
    DECIDING = "deciding"  # DecisionRecord proposed
    DECIDED = "decided"  # DecisionRecord logged: tell everyone (a commit after commit wait)


@dataclass
class _CTxn:
    txn_id: str
    priority: Priority
    participants: tuple[Participant, ...]
    state: CState
    votes: dict[str, int] = field(default_factory=dict)  # group -> prepare ts
    deadline_s: float = 0.0
    resend_at_s: float = 0.0
    commit: bool = False
    commit_ts_us: int = 0
    told: bool = False  # decision sent and client answered
    acked: set[str] = field(default_factory=set)
    retry_log: bool = False  # the decision's proposal failed: decide again on tick

    @property
    def groups(self) -> tuple[str, ...]:
        return tuple(p.group for p in self.participants)

    def own(self, group_id: str) -> Participant | None:
        """The coordinator group's own part in the transaction, if it has one."""
        return next((p for p in self.participants if p.group == group_id), None)


class TwoPCCoordinator:
    """The coordinator role of one group's leader: a table of transactions.

    ``log_begin`` False: the prepares go out at once, with no ``BeginRecord``
    (one Paxos round less before the decision). A leader that fails before
    deciding leaves no trace of the transaction in its group's log, and
    presumed abort covers it: a participant's inquiry makes the next leader
    log an abort, and a client's retry of the request starts it again. What
    was decided is in the log either way, and nobody heard a decision before
    it was logged."""

    def __init__(self, group_id: str, timeouts: Timeouts = Timeouts(), *,
                 log_begin: bool = True) -> None:
        self.group_id = group_id
        self.timeouts = timeouts
        self.log_begin = log_begin
        self._txns: dict[str, _CTxn] = {}
        self._finished: dict[str, _Finished] = {}

    def __len__(self) -> int:
        return len(self._txns)

    def outcome(self, txn_id: str) -> tuple[bool, int] | None:
        """(committed, s) once the decision is logged, else None."""
        txn = self._txns.get(txn_id)
        if txn is not None and txn.state is CState.DECIDED:
            return (txn.commit, txn.commit_ts_us)
        done = self._finished.get(txn_id)
        return None if done is None else (done.commit, done.commit_ts_us)

    # events ---------------------------------------------------------------------------

    def commit(self, request: CommitRequest, now_s: float) -> list[Effect]:
        """A client asks to commit: begin, or answer a retry of a decided one."""
        txn = self._txns.get(request.txn_id)
        done = self._finished.get(request.txn_id)
        if done is not None:
            return [Answer(request.txn_id, done.commit, done.commit_ts_us)]
        if txn is not None:
            if txn.state is CState.DECIDED and txn.told:
                return [Answer(txn.txn_id, txn.commit, txn.commit_ts_us)]
            return []  # in progress: the answer comes when it is decided
        txn = _CTxn(request.txn_id, request.priority, request.participants, CState.BEGINNING)
        self._txns[txn.txn_id] = txn
        if not self.log_begin:
            return self._start_collecting(txn, now_s)
        return [Log(BeginRecord(txn.txn_id, txn.priority, txn.participants))]

    def step(self, msg: Message, now_s: float, tt: TTInterval) -> list[Effect]:
        if isinstance(msg, CommitRequest):
            return self.commit(msg, now_s)
        if isinstance(msg, Vote):
            return self._on_vote(msg, now_s, tt)
        if isinstance(msg, Ack):
            return self._on_ack(msg, now_s)
        if isinstance(msg, Inquiry):
            return self._on_inquiry(msg, now_s)
        return []  # a participant's message: not ours

    def logged(self, record: Record, now_s: float, tt: TTInterval) -> list[Effect]:
        txn = self._txns.get(record.txn_id)
        if txn is None:
            return []
        if isinstance(record, BeginRecord) and txn.state is CState.BEGINNING:
            return self._start_collecting(txn, now_s)
        if isinstance(record, DecisionRecord) and txn.state is CState.DECIDING \
                and (record.commit, record.commit_ts_us) == (txn.commit, txn.commit_ts_us):
            txn.state = CState.DECIDED
            return self._tell(txn, now_s, tt)
        return []

    def log_failed(self, record: Record, now_s: float) -> list[Effect]:
        """``record`` was definitely not chosen (the proposal was refused)."""
        txn = self._txns.get(record.txn_id)
        if txn is None:
            return []
        if isinstance(record, BeginRecord) and txn.state is CState.BEGINNING:
            # Nothing was sent. No answer either: a retry of the request may still
            # begin it, and the client must not have been told "aborted" then.
            del self._txns[txn.txn_id]
            return []
        if isinstance(record, DecisionRecord) and txn.state is CState.DECIDING:
            txn.retry_log = True  # decide again on the next tick, with a fresh TT.now()
        return []

    def local_prepared(self, txn_id: str, prepare_ts_us: int, now_s: float,
                       tt: TTInterval) -> list[Effect]:
        """``LocalPrepare`` got its locks: this group's vote, at ``prepare_ts_us``."""
        return self._on_vote(Vote(txn_id, self.group_id, True, prepare_ts_us), now_s, tt)

    def local_refused(self, txn_id: str, now_s: float, tt: TTInterval) -> list[Effect]:
        """``LocalPrepare`` could not have its locks: this group votes no."""
        return self._on_vote(Vote(txn_id, self.group_id, False, 0), now_s, tt)

    def tick(self, now_s: float, tt: TTInterval) -> list[Effect]:
        out: list[Effect] = []
        for txn in list(self._txns.values()):
            if txn.state is CState.COLLECTING:
                if now_s >= txn.deadline_s:
                    out += self._decide(txn, False, tt)  # the prepare phase did not complete
                elif now_s >= txn.resend_at_s:
                    out += self._send_prepares(txn, now_s, only_silent=True)
            elif txn.state is CState.DECIDING and txn.retry_log:
                txn.retry_log = False
                full = txn.commit and set(txn.votes) == set(txn.groups)
                out += self._decide(txn, full, tt)
            elif txn.state is CState.DECIDED:
                if not txn.told:
                    out += self._tell(txn, now_s, tt)
                elif now_s >= txn.resend_at_s:
                    txn.resend_at_s = now_s + self.timeouts.resend_s
                    out += [Send(g, Decision(txn.txn_id, self.group_id, txn.commit, txn.commit_ts_us))
                            for g in txn.groups if g not in txn.acked and g != self.group_id]
        _forget(self._finished, now_s)
        return out

    def recover(self, records: Iterable[Record], now_s: float, tt: TTInterval) -> list[Effect]:
        """A new leader: rebuild from this group's log and finish every transaction in it."""
        self._txns.clear()
        self._finished.clear()
        for record in records:
            txn = self._txns.get(record.txn_id)
            if isinstance(record, BeginRecord) and txn is None:
                self._txns[record.txn_id] = _CTxn(record.txn_id, record.priority, record.participants,
                                                  CState.COLLECTING)
            elif isinstance(record, DecisionRecord):
                if txn is None:  # a presumed abort: no BeginRecord
                    txn = _CTxn(record.txn_id, (0, record.txn_id),
                                tuple(Participant(g, ()) for g in record.groups), CState.COLLECTING)
                    self._txns[record.txn_id] = txn
                if txn.state is not CState.DECIDED:  # the first decision wins
                    txn.state, txn.commit, txn.commit_ts_us = CState.DECIDED, record.commit, record.commit_ts_us
        out: list[Effect] = []
        for txn in list(self._txns.values()):
            if txn.state is CState.COLLECTING:
                out += self._start_collecting(txn, now_s)
            else:
                if txn.commit:
                    out.append(CommitWait(txn.txn_id, txn.commit_ts_us))
                out += self._tell(txn, now_s, tt)
        return out

    # steps --------------------------------------------------------------------------------

    def _on_vote(self, vote: Vote, now_s: float, tt: TTInterval) -> list[Effect]:
        txn = self._txns.get(vote.txn_id)
        if txn is None or txn.state is not CState.COLLECTING or vote.participant not in txn.groups:
            return []  # late, duplicate, or not ours: the decision stands
        if not vote.prepared:
            return self._decide(txn, False, tt)
        txn.votes[vote.participant] = vote.prepare_ts_us
        if set(txn.votes) == set(txn.groups):
            return self._decide(txn, True, tt)
        return []

    def _on_ack(self, ack: Ack, now_s: float) -> list[Effect]:
        txn = self._txns.get(ack.txn_id)
        if txn is None or txn.state is not CState.DECIDED or not txn.told:
            return []
        txn.acked.add(ack.participant)
        if txn.acked | {self.group_id} >= set(txn.groups):
            del self._txns[txn.txn_id]
            self._finished[txn.txn_id] = _Finished(txn.commit, txn.commit_ts_us, 0,
                                                   now_s + self.timeouts.finished_ttl_s)
        return []

    def _on_inquiry(self, inquiry: Inquiry, now_s: float) -> list[Effect]:
        txn = self._txns.get(inquiry.txn_id)
        if txn is not None:
            if txn.state is CState.DECIDED and txn.told:
                return [Send(inquiry.participant, Decision(txn.txn_id, self.group_id, txn.commit, txn.commit_ts_us))]
            return []  # still deciding: the deadline bounds it, and the decision is sent to all
        done = self._finished.get(inquiry.txn_id)
        if done is not None:
            return [Send(inquiry.participant, Decision(inquiry.txn_id, self.group_id, done.commit, done.commit_ts_us))]
        # Presumed abort, logged first: a later commit request must find it decided.
        txn = _CTxn(inquiry.txn_id, (0, inquiry.txn_id), (Participant(inquiry.participant, ()),),
                    CState.COLLECTING)
        self._txns[txn.txn_id] = txn
        return self._decide(txn, False, None)

    def _start_collecting(self, txn: _CTxn, now_s: float) -> list[Effect]:
        txn.state = CState.COLLECTING
        txn.votes.clear()
        txn.deadline_s = now_s + self.timeouts.prepare_timeout_s
        own = txn.own(self.group_id)
        local: list[Effect] = [] if own is None else [LocalPrepare(
            txn.txn_id, txn.priority, tuple(sorted(k for k, _ in own.writes)), own.active_here)]
        return local + self._send_prepares(txn, now_s, only_silent=False)

    def _send_prepares(self, txn: _CTxn, now_s: float, *, only_silent: bool) -> list[Effect]:
        txn.resend_at_s = now_s + self.timeouts.resend_s
        return [Send(p.group, PrepareRequest(txn.txn_id, self.group_id, txn.priority, p.writes,
                                             p.active_here))
                for p in txn.participants
                if p.group != self.group_id and not (only_silent and p.group in txn.votes)]

    def _commit_ts(self, txn: _CTxn, tt: TTInterval) -> int:
        """Spanner §4.2.1: at least every prepare timestamp and TT.now().latest."""
        return max(max(txn.votes.values()), tt.latest_us)

    def _decide(self, txn: _CTxn, commit: bool, tt: TTInterval | None) -> list[Effect]:
        txn.state = CState.DECIDING
        txn.commit = commit
        txn.commit_ts_us = self._commit_ts(txn, tt) if commit and tt is not None else 0
        own = txn.own(self.group_id)
        writes = own.writes if commit and own is not None else ()
        out: list[Effect] = [Log(DecisionRecord(txn.txn_id, commit, txn.commit_ts_us, txn.groups,
                                                writes))]
        if commit:
            out.append(CommitWait(txn.txn_id, txn.commit_ts_us))  # overlapped with logging
        return out

    def _tell(self, txn: _CTxn, now_s: float, tt: TTInterval) -> list[Effect]:
        """The decision is logged: answer and announce it, a commit only after commit wait."""
        if txn.told or (txn.commit and not tt.after(txn.commit_ts_us)):
            return []
        txn.told = True
        txn.resend_at_s = now_s + self.timeouts.resend_s
        # This group's own writes took effect with the decision record; its locks go
        # now, after commit wait (Spanner §4.2.1: held until then).
        own: list[Effect] = [Release(txn.txn_id)] if self.group_id in txn.groups else []
        out: list[Effect] = [Answer(txn.txn_id, txn.commit, txn.commit_ts_us), *own,
                             *(Send(g, Decision(txn.txn_id, self.group_id, txn.commit,
                                                txn.commit_ts_us))
                               for g in txn.groups if g not in txn.acked and g != self.group_id)]
        if txn.acked | {self.group_id} >= set(txn.groups):  # no other group to hear it
            del self._txns[txn.txn_id]
            self._finished[txn.txn_id] = _Finished(txn.commit, txn.commit_ts_us, 0,
                                                   now_s + self.timeouts.finished_ttl_s)
        return out


# --- the participant ---------------------------------------------------------------------


class PState(enum.Enum):
    ACTIVE = "active"  # the client runs operations here; no commit yet
    LOCKING = "locking"  # PrepareRequest taken: waiting for the write locks
    PREPARING = "preparing"  # PreparedRecord proposed at prepare_ts_us
    PREPARED = "prepared"  # logged and voted yes: only the coordinator decides now
    FINISHING = "finishing"  # OutcomeRecord proposed


@dataclass
class _PTxn:
    txn_id: str
    state: PState
    last_active_s: float = 0.0
    coordinator: str | None = None
    priority: Priority = (0, "")
    writes: Writes = ()
    prepare_ts_us: int = 0
    abort_when_prepared: bool = False  # an abort came while the prepare was being logged
    commit: bool = False
    commit_ts_us: int = 0
    inquire_at_s: float = 0.0
    relog: bool = False  # the outcome's proposal failed: propose it again on tick


class TwoPCParticipant:
    """The participant role of one group's leader: a table of transactions."""

    def __init__(self, group_id: str, timeouts: Timeouts = Timeouts()) -> None:
        self.group_id = group_id
        self.timeouts = timeouts
        self._txns: dict[str, _PTxn] = {}
        self._finished: dict[str, _Finished] = {}

    def __len__(self) -> int:
        return len(self._txns)

    def state(self, txn_id: str) -> PState | None:
        txn = self._txns.get(txn_id)
        return None if txn is None else txn.state

    def outcome(self, txn_id: str) -> tuple[bool, int] | None:
        done = self._finished.get(txn_id)
        return None if done is None else (done.commit, done.commit_ts_us)

    def safe_time_bound(self) -> int | None:
        """t_TM (Spanner §4.1.3): one below the least prepare timestamp of a
        transaction prepared here and not yet applied, or None if there is none."""
        held = [t.prepare_ts_us for t in self._txns.values()
                if t.state in (PState.PREPARING, PState.PREPARED, PState.FINISHING)]
        return min(held) - 1 if held else None

    # events ---------------------------------------------------------------------------

    def touch(self, txn_id: str, now_s: float) -> bool:
        """The client ran an operation of ``txn_id`` here; False if it was aborted."""
        txn = self._txns.get(txn_id)
        if txn is None:
            if txn_id in self._finished:
                return False
            self._txns[txn_id] = _PTxn(txn_id, PState.ACTIVE, last_active_s=now_s)
            return True
        txn.last_active_s = max(txn.last_active_s, now_s)
        return True

    def hand_over(self, txn_id: str) -> bool:
        """The transaction's coordinator is this group (``LocalPrepare``): it takes
        over the locks ``txn_id`` holds here, and this role forgets it (no idle
        abort). False unless it was active here."""
        txn = self._txns.get(txn_id)
        if txn is None or txn.state is not PState.ACTIVE:
            return False
        del self._txns[txn_id]
        return True

    def client_abort(self, txn_id: str, now_s: float) -> list[Effect]:
        """The client gave up before committing."""
        txn = self._txns.get(txn_id)
        if txn is None or txn.state is not PState.ACTIVE:
            return []
        return self._abort_unprepared(txn, now_s)

    def step(self, msg: Message, now_s: float) -> list[Effect]:
        if isinstance(msg, PrepareRequest):
            return self._on_prepare(msg, now_s)
        if isinstance(msg, Decision):
            return self._on_decision(msg, now_s)
        return []  # a coordinator's message: not ours

    def locks_granted(self, txn_id: str, prepare_ts_us: int, now_s: float) -> list[Effect]:
        """Every write lock is held; ``prepare_ts_us`` comes from this group's Paxos
        leader (above every timestamp it has assigned, so above its safe time). The
        shell marks the transaction committing in its lock table: no longer woundable."""
        txn = self._txns.get(txn_id)
        if txn is None or txn.state is not PState.LOCKING:
            return [Release(txn_id)] if txn is None else []  # aborted meanwhile
        if txn.coordinator is None:
            raise AssertionError("a locking transaction knows its coordinator")
        txn.state = PState.PREPARING
        txn.prepare_ts_us = prepare_ts_us
        return [Log(PreparedRecord(txn_id, txn.coordinator, txn.priority, prepare_ts_us, txn.writes))]

    def refused(self, txn_id: str, now_s: float) -> list[Effect]:
        """Wounded by an older transaction, or a lock refused: abort unless prepared."""
        txn = self._txns.get(txn_id)
        if txn is None or txn.state not in (PState.ACTIVE, PState.LOCKING):
            return []  # preparing or prepared: cannot be wounded
        return self._abort_unprepared(txn, now_s)

    def logged(self, record: Record, now_s: float) -> list[Effect]:
        txn = self._txns.get(record.txn_id)
        if txn is None:
            return []
        if isinstance(record, PreparedRecord) and txn.state is PState.PREPARING:
            txn.state = PState.PREPARED
            txn.inquire_at_s = now_s + self.timeouts.inquire_after_s
            if txn.abort_when_prepared:
                return self._finish(txn, False, 0)
            return [self._vote(txn)]
        if isinstance(record, OutcomeRecord) and txn.state is PState.FINISHING:
            del self._txns[txn.txn_id]
            self._finished[txn.txn_id] = _Finished(txn.commit, txn.commit_ts_us, txn.prepare_ts_us,
                                                   now_s + self.timeouts.finished_ttl_s)
            applied: list[Effect] = [Apply(txn.txn_id, txn.commit_ts_us, txn.writes)] if txn.commit else []
            return [*applied, Release(txn.txn_id), Send(self._coordinator(txn), Ack(txn.txn_id, self.group_id))]
        return []

    def log_failed(self, record: Record, now_s: float) -> list[Effect]:
        txn = self._txns.get(record.txn_id)
        if txn is None:
            return []
        if isinstance(record, PreparedRecord) and txn.state is PState.PREPARING:
            return self._abort_unprepared(txn, now_s)  # never voted yes: a no is safe
        if isinstance(record, OutcomeRecord) and txn.state is PState.FINISHING:
            txn.relog = True
        return []

    def tick(self, now_s: float) -> list[Effect]:
        out: list[Effect] = []
        for txn in list(self._txns.values()):
            if txn.state is PState.ACTIVE and now_s - txn.last_active_s >= self.timeouts.idle_timeout_s:
                out += self._abort_unprepared(txn, now_s)  # the client went away
            elif txn.state is PState.PREPARED and now_s >= txn.inquire_at_s:
                txn.inquire_at_s = now_s + self.timeouts.inquire_after_s
                out.append(Send(self._coordinator(txn), Inquiry(txn.txn_id, self.group_id)))
            elif txn.state is PState.FINISHING and txn.relog:
                txn.relog = False
                out.append(Log(OutcomeRecord(txn.txn_id, txn.commit, txn.commit_ts_us,
                                             txn.writes if txn.commit else ())))
        _forget(self._finished, now_s)
        return out

    def recover(self, records: Iterable[Record], now_s: float) -> list[Effect]:
        """A new leader: re-take the locks of every prepared, undecided transaction,
        vote again, and ask its coordinator if the outcome does not come."""
        self._txns.clear()
        self._finished.clear()
        for record in records:
            if isinstance(record, PreparedRecord) and record.txn_id not in self._finished:
                self._txns[record.txn_id] = _PTxn(
                    record.txn_id, PState.PREPARED, coordinator=record.coordinator,
                    priority=record.priority, writes=record.writes, prepare_ts_us=record.prepare_ts_us,
                    inquire_at_s=now_s + self.timeouts.inquire_after_s)
            elif isinstance(record, OutcomeRecord) and record.txn_id not in self._finished:
                prepared = self._txns.pop(record.txn_id, None)
                self._finished[record.txn_id] = _Finished(
                    record.commit, record.commit_ts_us, prepared.prepare_ts_us if prepared else 0,
                    now_s + self.timeouts.finished_ttl_s)
        out: list[Effect] = []
        for txn in self._txns.values():
            out.append(Lock(txn.txn_id, txn.priority, tuple(sorted(k for k, _ in txn.writes)), recovered=True))
            out.append(self._vote(txn))
        return out

    # steps --------------------------------------------------------------------------------

    def _on_prepare(self, req: PrepareRequest, now_s: float) -> list[Effect]:
        done = self._finished.get(req.txn_id)
        if done is not None:  # decided here already: say again what we said
            return [Send(req.coordinator, Vote(req.txn_id, self.group_id, done.commit,
                                               done.prepare_ts_us if done.commit else 0))]
        txn = self._txns.get(req.txn_id)
        if txn is None:
            if req.active_here:  # its locks and reads here are gone (idle abort, new leader)
                self._finished[req.txn_id] = _Finished(False, 0, 0, now_s + self.timeouts.finished_ttl_s)
                return [Send(req.coordinator, Vote(req.txn_id, self.group_id, False, 0))]
            txn = self._txns[req.txn_id] = _PTxn(req.txn_id, PState.ACTIVE)
        if txn.state is PState.ACTIVE:
            txn.state = PState.LOCKING
            txn.coordinator, txn.priority, txn.writes = req.coordinator, req.priority, req.writes
            return [Lock(txn.txn_id, txn.priority, tuple(sorted(k for k, _ in txn.writes)))]
        if txn.state in (PState.PREPARED, PState.FINISHING):
            return [self._vote(txn)]  # our vote may have been lost
        return []  # locking or preparing: the vote follows

    def _on_decision(self, decision: Decision, now_s: float) -> list[Effect]:
        ack = Send(decision.coordinator, Ack(decision.txn_id, self.group_id))
        txn = self._txns.get(decision.txn_id)
        if txn is None:
            if decision.txn_id not in self._finished and not decision.commit:
                # An abort before the prepare (reordered): refuse the prepare if it comes.
                self._finished[decision.txn_id] = _Finished(False, 0, 0, now_s + self.timeouts.finished_ttl_s)
            return [ack]  # decided here already (or never here): nothing left to do
        if txn.state is PState.PREPARED:
            return self._finish(txn, decision.commit, decision.commit_ts_us)
        if txn.state is PState.PREPARING and not decision.commit:
            txn.abort_when_prepared = True
            return []
        if txn.state in (PState.ACTIVE, PState.LOCKING) and not decision.commit:
            return [*self._abort_unprepared(txn, now_s, vote=False), ack]
        return []  # FINISHING: the Ack follows the log; a commit we never voted for cannot come

    def _finish(self, txn: _PTxn, commit: bool, commit_ts_us: int) -> list[Effect]:
        txn.state = PState.FINISHING
        txn.commit, txn.commit_ts_us = commit, commit_ts_us
        return [Log(OutcomeRecord(txn.txn_id, commit, commit_ts_us, txn.writes if commit else ()))]

    def _abort_unprepared(self, txn: _PTxn, now_s: float, *, vote: bool = True) -> list[Effect]:
        del self._txns[txn.txn_id]
        self._finished[txn.txn_id] = _Finished(False, 0, 0, now_s + self.timeouts.finished_ttl_s)
        out: list[Effect] = [Release(txn.txn_id)]
        if vote and txn.coordinator is not None:
            out.append(Send(txn.coordinator, Vote(txn.txn_id, self.group_id, False, 0)))
        return out

    def _vote(self, txn: _PTxn) -> Send:
        return Send(self._coordinator(txn), Vote(txn.txn_id, self.group_id, True, txn.prepare_ts_us))

    @staticmethod
    def _coordinator(txn: _PTxn) -> str:
        if txn.coordinator is None:
            raise AssertionError(f"transaction {txn.txn_id!r} has no coordinator yet")
        return txn.coordinator
