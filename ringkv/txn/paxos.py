"""Multi-Paxos with leader leases for one group (pure).

One range's RF replicas form a group, and each runs a ``PaxosReplica``:
acceptor, learner and, while it leads, proposer. It is shaped like etcd
raft. The shell feeds it messages (``step``), time (``tick``) and proposals
(``propose``), and every call returns a ``Ready`` that the shell carries out
in this order:

1. ``persist``: write these records durably (fsync) first;
2. ``messages``: send these, only once ``persist`` is on disk;
3. ``snapshot`` (if any): install it, then apply ``committed`` in slot order
   (skipping no-ops and superseded entries, below).

Persist before reply. A promise, an accepted, a lease grant that raises the
promised ballot, a candidate's Prepare (it promised itself) and a leader's
Accept (it accepted its own value) each leave in the same Ready as the
record they depend on. A crash after the fsync and before the send loses
only messages, which Paxos tolerates; a crash before it sends nothing.
Python Paxos and Raft libraries have lost committed data exactly here.

Paxos (Paxos Made Simple §2-3; Spanner §2.2). Ballots ``(round, node_id)``
are totally ordered. A candidate runs phase 1 once for every slot it has
not seen chosen (``Prepare.from_slot``): each promise returns the
acceptor's accepted values from that slot on. It re-proposes the
highest-ballot value of each slot and fills gaps with no-ops. As leader it
then runs only phase 2, one Accept per new slot, until a higher ballot
appears. Followers learn chosen slots from ``Commit`` (and the commit point
on heartbeats and accepts): a slot is chosen with the value they accepted
at the leader's ballot. Anything else they fetch with ``CatchUp``, and
receive as ``Learn`` or, below the compaction point, ``InstallSnapshot``.

Leases (Spanner §4.1, the disjointness invariant). A voter's lease vote
belongs to a node, not a ballot. A Promise or a granted ``HeartbeatAck``
is a vote for the ballot's node that lasts ``lease_s`` from the moment the
voter granted it, by the voter's own clock. While that vote lives, the voter
promises no ballot of any other node and grants no vote to any other node.
It may promise a higher ballot of the same node, so a leader can bump its
ballot without losing its lease.

The holder measures each vote from when it sent the request, which is
before the grant. It counts the vote as lasting
``lease_s * (1 - rho) / (1 + rho)``, where ``rho = max_drift_ppm / 1e6``
bounds every clock's rate error. Its clock, running at most ``1 - rho``
slow, then reaches that end no later in true time than ``lease_s / (1 + rho)``
after the send. That is no later than the voter's own expiry, since the
voter's clock runs at most ``1 + rho`` fast. The lease lasts while a
quorum of votes does (the quorum-th latest end), and heartbeats every
``heartbeat_interval_s`` renew it. A new leader needs a vote from a voter
of that quorum, so its lease begins after the old one ended in true time.

While its lease holds, the leader is also the only writer. Another node's
ballot needs a quorum of promises, and one of them must come from a voter
holding a live vote for the leader, which refuses it (``_on_prepare``).

Restart: lease votes are not persisted (renewing them would cost an fsync
per heartbeat per group). A restored replica waits ``lease_s`` by its own
clock before it votes, promises or stands for election, since it may have
forgotten a vote. The same wait orders a restarted leader's new lease after
the lease it held before the crash. Ballots, accepted values and chosen
values are persisted.

Timestamps (Spanner §4.1.1). Every entry carries ``ts_us``. ``assign_ts``
hands out a timestamp only while the lease holds, at least
``TT.now().latest`` and above every timestamp assigned or logged so far.
It also keeps the timestamp below the lease's end in true time, which is
at least ``earliest + remaining / (1 + rho)``. The next leader's lease starts
after that end, and its timestamps are at least its own ``TT.now().latest``,
so timestamps rise across leaders, including ones handed out for reads and
never logged. Each replica also keeps ``max_assigned_ts`` from its log and
snapshot, so a new leader starts above every logged timestamp it has seen.

Applied timestamps rise in slot order. Multi-Paxos can still choose an old
leader's value late. Suppose leader A proposed it at slot 7 and only A
accepted it. Leader B's phase 1 did not see it, so B wrote newer entries at
slots 5 and 6. Leader C's phase 1 then sees slot 7 only at A's ballot. It
cannot tell that value from one that was chosen, so it must re-propose it.
Its timestamp is then below entries applied before it, at slots 5 and 6. So
an entry whose timestamp is not above every timestamp applied before it is
delivered ``superseded``. The shell does not apply it, and answers its
proposer "aborted". The rule depends only on the log, so every replica
decides the same. ``applied_ts_us``, the highest applied timestamp, is then
a safe time for reads at any replica: nothing applied later is older.

Membership (Paxos Made Simple §3; Lamport, "Reconfiguring a State Machine",
with alpha = 1; Raft §6's one server at a time). A configuration is a log
entry (``Entry.members``, a no-op to the shell). It takes effect when it is
*chosen and every slot before it is known*: it governs the slots after it,
while the slot holding it was decided by the configuration before. So each
slot is a single-decree Paxos instance among the configuration the chosen
prefix names. Three rules keep Multi-Paxos's one phase 1 for many slots
inside that:

1. A phase 1 is run with a quorum of the configuration at the candidate's
   commit point and covers slots only up to the first configuration entry
   after it (one it knows chosen, or one a promise returned). The leader
   re-proposes through that slot and nothing beyond until it is chosen; then
   it runs phase 1 again, with a new ballot, among the new members. A value
   chosen at a slot was accepted by a quorum of that slot's configuration,
   and by induction on slots every phase 1 that covers the slot used a
   quorum of that same configuration, so the two intersect (PMS §2.2).
2. No lease while a configuration entry in the window is unchosen
   (``lease_valid``). A candidate that missed changes runs phase 1 in a
   configuration that is no longer current. Any later configuration was
   chosen by a quorum of the one it knows, which its quorum meets, so it finds
   the entry in its window and holds no lease until it has caught up through
   every change. Hence leases are held only under the newest chosen
   configuration, or the one it replaces while a change is in flight, and
   quorums of those two intersect: lease disjointness holds across the change.
3. One member at a time, and the next change only once the previous one is
   chosen and the lease counted under the configuration before it has ended.
   When a configuration takes effect, the leader recounts its lease from the
   new members' votes only, which may end it sooner. The timestamps it handed
   out under the old count stay safe, because a quorum of the old members
   still holds live votes for it and, with one member changed, every quorum of
   the new configuration contains one of them, so no other node can lead
   before the old count ends. Two changes on, that would no longer hold,
   hence the wait (``_change_not_before_s``, at most one lease).

A joining node starts outside the configuration (``members``): the leader
sends it heartbeats and catches it up with the snapshot and the log tail,
and adds it only once it acknowledged a commit point within a Learn batch of
the leader's, since it counts towards quorums from then on. A node that
applies a configuration without itself stops standing, voting and
accepting (it still answers heartbeats, unvoted, with how far behind it is,
so it can be added back); a leader that removed itself steps down, and the
others wait out its votes as after any leader change. The Commit of the
entry that removes a node goes to the new members only, so leaders keep
heartbeating a removed node until it acknowledges that slot (``departed``). An acceptor answers a proposer outside
the configuration it knows, which may lead one it has not learned yet;
acceptor safety does not depend on who proposes. The configuration persists
with the log: entries are records, and a snapshot names the configuration
after its last slot (``Snapshot.members``).

Bounded log. Once the shell has applied entries through a slot, it calls
``compact(slot, handle)`` with a handle to its MVCC state at that slot.
A replica asking for slots at or below the compaction point is sent
``InstallSnapshot`` with that handle. The shell moves the data and
installs it before it applies the entries that follow.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Union

from ringkv.quorum import Response, ResponseTracker, Vote

if TYPE_CHECKING:
    import random

__all__ = [
    "LEASE_S", "HEARTBEAT_INTERVAL_S", "ELECTION_TIMEOUT_S", "MAX_DRIFT_PPM", "LEARN_BATCH",
    "MAX_UNCHOSEN_SLOTS", "RESEND_BATCH", "Role", "Ballot", "ZERO_BALLOT", "Entry", "NOOP", "Snapshot",
    "PromiseRecord", "AcceptRecord", "ChosenRecord", "SnapshotRecord", "Record", "Committed",
    "PersistedState",
    "AcceptedSlot", "Prepare", "Promise", "Accept", "Accepted", "Reject", "Heartbeat",
    "HeartbeatAck", "Commit", "CatchUp", "Learn", "InstallSnapshot", "Message", "Outgoing",
    "Ready", "ProposalRefused", "PaxosReplica",
]

LEASE_S = 2.0  # txn.lease_s (Spanner uses 10 s)
HEARTBEAT_INTERVAL_S = 0.5  # lease renewals and the commit point, four per lease
ELECTION_TIMEOUT_S = 0.5  # randomized in [t, 2t) after silence, [0, t) after a vote expires
MAX_DRIFT_PPM = 200.0  # bound on any clock's rate error (truetime.max_drift_ppm)
LEARN_BATCH = 64  # chosen entries per Learn message
MAX_UNCHOSEN_SLOTS = 1024  # proposals in flight at the leader before it refuses more
RESEND_BATCH = 64  # unchosen slots re-sent per heartbeat to replicas that did not accept
DEPARTED_BEATS = 40  # heartbeats a removed node is sent to learn it (20 s at the default pace)


class Role(enum.Enum):
    FOLLOWER = "follower"
    CANDIDATE = "candidate"  # phase 1 in flight
    LEADER = "leader"  # phase 1 done: phase 2 only


@dataclass(frozen=True, order=True, slots=True)
class Ballot:
    """A proposal number, ordered by round and then node id."""

    round: int
    node_id: str


ZERO_BALLOT = Ballot(0, "")


@dataclass(frozen=True, slots=True)
class Entry:
    """One log entry: the shell's opaque value and its timestamp (µs)."""

    value: bytes
    ts_us: int
    noop: bool = False
    # A configuration entry (noop to the shell): the group's members for every
    # slot after this one, once this slot is chosen (see "Membership").
    members: tuple[str, ...] | None = None


NOOP = Entry(b"", 0, noop=True)  # fills a slot no value was found for on a leader change


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The applied state through ``last_slot``, as an opaque handle the shell can fetch."""

    handle: str
    last_slot: int
    max_ts_us: int  # the highest timestamp at or below last_slot
    members: tuple[str, ...] | None = None  # the configuration in force after last_slot


# --- records: what the shell persists, in order, before sending ------------------


@dataclass(frozen=True, slots=True)
class PromiseRecord:
    ballot: Ballot


@dataclass(frozen=True, slots=True)
class AcceptRecord:
    slot: int
    ballot: Ballot
    entry: Entry


@dataclass(frozen=True, slots=True)
class ChosenRecord:
    slot: int
    entry: Entry


@dataclass(frozen=True, slots=True)
class SnapshotRecord:
    """The log at and below ``snapshot.last_slot`` is dropped; the snapshot stands for it."""

    snapshot: Snapshot


Record = Union[PromiseRecord, AcceptRecord, ChosenRecord, SnapshotRecord]


@dataclass(frozen=True, slots=True)
class Committed:
    """A chosen entry for the shell to apply, in slot order. Do not apply a
    no-op; do not apply a superseded entry either (its timestamp is not above
    one applied before it) and report its proposal aborted."""

    slot: int
    entry: Entry
    superseded: bool = False


@dataclass
class PersistedState:
    """What survives a crash: the fold of every record persisted, in order.

    The shell may store records however it likes (LevelDB keys per slot, say)
    as long as reading them back gives this; tests fold records straight in.
    """

    promised: Ballot = ZERO_BALLOT
    accepted: dict[int, tuple[Ballot, Entry]] = field(default_factory=dict)
    chosen: dict[int, Entry] = field(default_factory=dict)
    snapshot: Snapshot | None = None

    def apply(self, records: Iterable[Record]) -> None:
        for record in records:
            if isinstance(record, PromiseRecord):
                self.promised = max(self.promised, record.ballot)
            elif isinstance(record, AcceptRecord):
                self.promised = max(self.promised, record.ballot)
                if self.snapshot is None or record.slot > self.snapshot.last_slot:
                    self.accepted[record.slot] = (record.ballot, record.entry)
            elif isinstance(record, ChosenRecord):
                if self.snapshot is None or record.slot > self.snapshot.last_slot:
                    self.chosen[record.slot] = record.entry
            else:
                snapshot = record.snapshot
                if self.snapshot is None or snapshot.last_slot > self.snapshot.last_slot:
                    self.snapshot = snapshot
                    last = snapshot.last_slot
                    self.accepted = {s: v for s, v in self.accepted.items() if s > last}
                    self.chosen = {s: v for s, v in self.chosen.items() if s > last}

    def copy(self) -> PersistedState:
        return PersistedState(self.promised, dict(self.accepted), dict(self.chosen), self.snapshot)


# --- messages ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AcceptedSlot:
    slot: int
    ballot: Ballot
    entry: Entry


@dataclass(frozen=True, slots=True)
class Prepare:
    """Phase 1a for every slot from ``from_slot`` on; also asks for a lease vote."""

    sender: str
    ballot: Ballot
    from_slot: int
    sent_s: float  # the candidate's clock, echoed back: the vote began after it


@dataclass(frozen=True, slots=True)
class Promise:
    """Phase 1b, and a lease vote for the ballot's node."""

    sender: str
    ballot: Ballot
    accepted: tuple[AcceptedSlot, ...]
    sent_s: float


@dataclass(frozen=True, slots=True)
class Accept:
    """Phase 2a for one or more slots, with the leader's commit point."""

    sender: str
    ballot: Ballot
    entries: tuple[tuple[int, Entry], ...]
    commit_through: int


@dataclass(frozen=True, slots=True)
class Accepted:
    sender: str
    ballot: Ballot
    slots: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Reject:
    """A Prepare, Accept or Heartbeat refused. reason: "ballot" (``promised``
    is higher), "lease" (a vote for another node still lives), "restart"
    (waiting out a lease after a restart) or "snapshot" (the Prepare asked for
    compacted slots; an InstallSnapshot goes with it). ``retry_after_s``: when
    the refusal may lift, by the refuser's clock."""

    sender: str
    ballot: Ballot
    promised: Ballot
    reason: str
    retry_after_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """The leader's lease renewal (a request for a vote) and its commit point."""

    sender: str
    ballot: Ballot
    commit_through: int
    sent_s: float


@dataclass(frozen=True, slots=True)
class HeartbeatAck:
    sender: str
    ballot: Ballot
    sent_s: float
    commit_through: int  # the follower's, so the leader can send what it lacks
    granted: bool  # the lease vote was (re)granted


@dataclass(frozen=True, slots=True)
class Commit:
    """Every slot up to ``commit_through`` is chosen; where a follower accepted
    a value at ``ballot``, that value is the chosen one."""

    sender: str
    ballot: Ballot
    commit_through: int


@dataclass(frozen=True, slots=True)
class CatchUp:
    """A replica behind asks for chosen entries from ``from_slot``."""

    sender: str
    from_slot: int


@dataclass(frozen=True, slots=True)
class Learn:
    sender: str
    entries: tuple[tuple[int, Entry], ...]  # chosen values


@dataclass(frozen=True, slots=True)
class InstallSnapshot:
    """The asked-for slots are compacted: fetch this snapshot instead."""

    sender: str
    ballot: Ballot
    snapshot: Snapshot


Message = Union[
    Prepare, Promise, Accept, Accepted, Reject, Heartbeat, HeartbeatAck, Commit, CatchUp, Learn,
    InstallSnapshot,
]


@dataclass(frozen=True, slots=True)
class Outgoing:
    to: str
    msg: Message


@dataclass
class Ready:
    """What to do, in order: persist (fsync), then send, then install and apply."""

    persist: list[Record] = field(default_factory=list)
    messages: list[Outgoing] = field(default_factory=list)
    snapshot: Snapshot | None = None
    committed: list[Committed] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.persist or self.messages or self.snapshot or self.committed)


class ProposalRefused(Exception):
    """``propose`` cannot take the value here. reason: not_leader, no_lease,
    backlog or stale_ts; ``leader_hint`` names the leader when one is known."""

    def __init__(self, reason: str, leader_hint: str | None = None) -> None:
        super().__init__(f"proposal refused: {reason}" + (f" (leader {leader_hint})" if leader_hint else ""))
        self.reason = reason
        self.leader_hint = leader_hint


class PaxosReplica:
    """One replica of one Paxos group (see the module docstring).

    ``peers`` are the group's other members. Slots count from 1;
    ``commit_through`` is the highest slot such that it and every slot below
    it are known chosen.
    """

    def __init__(
        self,
        node_id: str,
        peers: Iterable[str],
        members: Iterable[str] | None = None,
        /,
        *,
        lease_s: float = LEASE_S,
        heartbeat_interval_s: float = HEARTBEAT_INTERVAL_S,
        election_timeout_s: float = ELECTION_TIMEOUT_S,
        max_drift_ppm: float = MAX_DRIFT_PPM,
    ) -> None:
        self.node_id = node_id
        # The configuration before any configuration entry: ``members`` when
        # given (a new node starts as a learner, outside it), else this node
        # and its peers.
        self.initial_members = frozenset(members) if members is not None else frozenset((node_id, *peers))
        if not self.initial_members:
            raise ValueError("a group needs at least one member")
        self.peers: tuple[str, ...] = ()
        self.members: frozenset[str] = frozenset()
        self.quorum = 1
        self._set_members(self.initial_members)
        if not 0 < heartbeat_interval_s < lease_s:
            raise ValueError("heartbeat_interval_s must be in (0, lease_s): renewals come before the end")
        if not 0 <= max_drift_ppm < 1e6:
            raise ValueError("max_drift_ppm must be in [0, 1e6)")
        if election_timeout_s <= 0:
            raise ValueError("election_timeout_s must be > 0")
        self.lease_s = lease_s
        self.heartbeat_interval_s = heartbeat_interval_s
        self.election_timeout_s = election_timeout_s
        self.rho = max_drift_ppm / 1e6
        # How long the holder counts a vote, from its send time (module docstring).
        self.vote_credit_s = lease_s * (1 - self.rho) / (1 + self.rho)

        # Acceptor and learner state (persisted).
        self.promised = ZERO_BALLOT
        self.accepted: dict[int, tuple[Ballot, Entry]] = {}
        self.chosen: dict[int, Entry] = {}
        self.snapshot: Snapshot | None = None
        self.commit_through = 0
        self.applied_through = 0  # handed to the shell in Ready.committed
        self.applied_ts_us = 0  # the highest timestamp applied (superseded entries excepted)
        self.max_log_ts = 0  # the highest timestamp in the log (or snapshot) seen here
        self.max_assigned_ts = 0  # that, or a higher one assign_ts handed out

        # Lease votes this replica granted (not persisted: see the restart rule).
        self.vote_node: str | None = None
        self.vote_expires_s = float("-inf")
        self.restart_until_s = float("-inf")

        # Proposer state.
        self.role = Role.FOLLOWER
        self.ballot = ZERO_BALLOT  # the ballot this node last stood with
        self._seen_round = 0  # the highest round heard of: the next ballot goes above it
        self.leader_hint: str | None = None
        self.next_slot = 1
        self._tracker: ResponseTracker | None = None
        self._recovered: dict[int, tuple[Ballot, Entry]] = {}
        self._candidate_deadline_s = float("inf")
        self._inflight: dict[int, tuple[Entry, set[str]]] = {}
        self._vote_ends: dict[str, float] = {}  # voter -> when we count its vote lapsed
        self._lease_start_s: float | None = None
        self._lease_end_s = float("-inf")
        self._next_heartbeat_s = float("-inf")

        # Membership (see "Membership" in the module docstring).
        self.removed = False  # applied a configuration that removed this node: votes no more
        self._config_slot: int | None = None  # an unchosen configuration entry in our window
        self._config_changed = False  # settled, with the time, at the end of the entry point
        self._change_not_before_s = float("-inf")  # the lease counted under the previous config ends
        self._learners: dict[str, int] = {}  # joining node -> how far behind it acknowledged being (-1: unheard)
        # Removed node -> (the slot of the configuration that removed it, heartbeats
        # left): a leader sends it heartbeats until it acknowledges that slot (it may
        # have missed the entry), or DEPARTED_BEATS went unanswered (it is gone).
        self._departed: dict[str, tuple[int, int]] = {}
        self._last_beat = (float("nan"), 0)  # (sent_s, our commit point then) of the last heartbeat

        # Election timer: drawn in tick (the only call with an rng).
        self._last_contact_s: float | None = None
        self._not_before_s = float("-inf")
        self._redraw = True
        self._timeout_s = election_timeout_s
        self._jitter_s = 0.0

        self._ready = Ready()

    # --- restart ------------------------------------------------------------------

    @classmethod
    def restore(
        cls,
        node_id: str,
        peers: Iterable[str],
        state: PersistedState,
        now_s: float,
        members: Iterable[str] | None = None,
        /,
        *,
        applied_through: int | None = None,
        **options: float,
    ) -> PaxosReplica:
        """A replica rebuilt from what was persisted, at local time ``now_s``.

        It votes for nobody (itself included) until ``now_s + lease_s``: it
        may have granted a lease vote it no longer remembers.
        ``applied_through``: the last slot the shell's store has applied
        (default: the snapshot's); later chosen entries come back in the next Ready.
        """
        replica = cls(node_id, peers, members, **options)
        if state.snapshot is not None and state.snapshot.members is not None:
            replica._set_members(state.snapshot.members)
        replica.promised = state.promised
        replica.ballot = state.promised if state.promised.node_id == node_id else ZERO_BALLOT
        replica.accepted = dict(state.accepted)
        replica.chosen = dict(state.chosen)
        replica.snapshot = state.snapshot
        base = state.snapshot.last_slot if state.snapshot else 0
        replica.commit_through = base
        replica.applied_through = max(base, applied_through or 0)
        # Superseded entries are older than one applied before them, so the
        # highest timestamp at or below a slot is the highest applied one.
        replica.applied_ts_us = max(
            [state.snapshot.max_ts_us if state.snapshot else 0]
            + [e.ts_us for slot, e in state.chosen.items() if slot <= replica.applied_through and not e.noop]
        )
        replica.max_log_ts = replica.max_assigned_ts = max(
            [state.snapshot.max_ts_us if state.snapshot else 0]
            + [entry.ts_us for _, entry in state.accepted.values()]
            + [entry.ts_us for entry in state.chosen.values()]
        )
        replica.next_slot = max([base, *state.accepted, *state.chosen]) + 1
        replica.restart_until_s = now_s + replica.lease_s
        replica._last_contact_s = now_s
        replica._advance_commit()  # replays configuration entries too
        replica._config_changed = False
        return replica

    # --- the three entry points -----------------------------------------------------

    def step(self, msg: Message, now_s: float) -> Ready:
        """Take one message from a member of the group."""
        # Any sender is heard, not only members: a lagging member must hear a
        # leader added after the configuration it knows. Accepting from anyone
        # is safe (acceptor safety does not depend on the proposer's identity);
        # membership matters where quorums are counted.
        if msg.sender == self.node_id:
            return self._take_ready()
        if isinstance(msg, _FROM_BALLOT_OWNER) and msg.ballot.node_id != msg.sender:
            return self._take_ready()  # only a ballot's owner proposes with it
        if self._last_contact_s is None:
            self._last_contact_s = now_s
        handler = _HANDLERS[type(msg)]
        handler(self, msg, now_s)
        self._settle_config(now_s)
        return self._take_ready()

    def tick(self, now_s: float, rng: random.Random) -> Ready:
        """Heartbeats and lease renewal as leader, elections otherwise; call often
        (every heartbeat_interval_s / 4, say)."""
        if self._last_contact_s is None:
            self._last_contact_s = now_s
        if self._redraw:
            self._timeout_s = rng.uniform(self.election_timeout_s, 2 * self.election_timeout_s)
            self._jitter_s = rng.uniform(0, self.election_timeout_s)
            self._redraw = False
        if self.role is Role.LEADER:
            if now_s >= self._next_heartbeat_s:
                self._heartbeat(now_s)
        elif self.role is Role.CANDIDATE:
            if now_s >= self._candidate_deadline_s:
                self._become_follower(now_s)  # phase 1 stalled: stand again, with a new ballot
                self._not_before_s = now_s + rng.uniform(0, self.election_timeout_s)
        elif self.node_id in self.members and now_s >= self.election_due_s():
            timeout_s = rng.uniform(self.election_timeout_s, 2 * self.election_timeout_s)
            self._start_phase1(now_s, now_s + timeout_s)
        self._settle_config(now_s)
        return self._take_ready()

    def propose(self, value: bytes, now_s: float, *, ts_us: int) -> Ready:
        """Propose ``value`` at timestamp ``ts_us`` (from ``assign_ts``) for the next slot.

        Raises ProposalRefused unless this replica leads with a valid lease.
        """
        if self.role is not Role.LEADER:
            hint = self.leader_hint if self.leader_hint != self.node_id else None
            raise ProposalRefused("not_leader", hint)
        if self._config_slot is not None:
            raise ProposalRefused("config_change")
        if not self.lease_valid(now_s):
            raise ProposalRefused("no_lease")
        if len(self._inflight) >= MAX_UNCHOSEN_SLOTS:
            raise ProposalRefused("backlog")
        if ts_us <= self.max_log_ts:
            raise ProposalRefused("stale_ts")
        slot = self.next_slot
        self.next_slot += 1
        self._propose_at(slot, Entry(value, ts_us))
        self._send_accepts([slot], self.peers)
        self._check_chosen([slot])
        self._settle_config(now_s)
        return self._take_ready()

    def change_members(self, members: Iterable[str], now_s: float) -> Ready:
        """Propose the configuration ``members``: this one plus or minus one node.

        Raises ProposalRefused: not_leader / no_lease as ``propose``;
        config_change while an earlier change is not chosen yet or the lease
        counted under the configuration before it may still live; bad_config
        unless exactly one node is added or removed; catching_up while a node
        being added is behind our commit point (it is sent the snapshot and
        log tail with the next heartbeats: ask again).
        """
        target = frozenset(members)
        if self.role is not Role.LEADER:
            hint = self.leader_hint if self.leader_hint != self.node_id else None
            raise ProposalRefused("not_leader", hint)
        if self._config_slot is not None or now_s < self._change_not_before_s:
            raise ProposalRefused("config_change")
        if not self.lease_valid(now_s):
            raise ProposalRefused("no_lease")
        if len(target ^ self.members) != 1:
            raise ProposalRefused("bad_config")
        for joining in target - self.members:
            # It counts towards quorums once added, so it must hold the log first:
            # answering our last heartbeat, it was within one Learn batch of us.
            lag = self._learners.setdefault(joining, -1)
            if lag < 0 or lag > LEARN_BATCH:
                raise ProposalRefused("catching_up")
        self._propose_config(target)
        self._settle_config(now_s)
        return self._take_ready()

    def joining(self) -> frozenset[str]:
        """Nodes this leader is catching up to add (it sends them heartbeats)."""
        return frozenset(self._learners)

    def departed(self) -> frozenset[str]:
        """Removed nodes not yet known to have learned it (a leader heartbeats them)."""
        return frozenset(self._departed)

    def _propose_config(self, target: frozenset[str]) -> None:
        slot = self.next_slot
        self.next_slot += 1
        self._config_slot = slot
        self._propose_at(slot, Entry(b"", 0, noop=True, members=tuple(sorted(target))))
        self._send_accepts([slot], self.peers)
        self._check_chosen([slot])

    # --- leases and timestamps --------------------------------------------------------

    def lease_valid(self, now_s: float) -> bool:
        """This node holds the group's lease at local time ``now_s`` (never while
        a configuration entry in its window is unchosen: see "Membership")."""
        return self._lease_start_s is not None and now_s < self._lease_end_s and self._config_slot is None

    def lease_interval(self, now_s: float) -> tuple[float, float] | None:
        """(start, end) of the lease held at ``now_s``, in this node's clock, or None."""
        if self._lease_start_s is None or not self.lease_valid(now_s):
            return None
        return (self._lease_start_s, self._lease_end_s)

    def is_leader(self, now_s: float) -> bool:
        """Leads, with phase 1 done and the lease held: may propose and assign timestamps."""
        return self.role is Role.LEADER and self.lease_valid(now_s)

    def assign_ts(self, now_s: float, tt_earliest_us: int, tt_latest_us: int) -> int | None:
        """A timestamp for a write or a read, from ``TT.now()`` taken at ``now_s``
        (Spanner §4.1.1), or None when this node does not lead under a lease or
        the lease ends too soon (renewal will fix it)."""
        if not self.is_leader(now_s):
            return None
        ts_us = max(tt_latest_us, self.max_assigned_ts + 1)
        # The lease ends, in true time, no earlier than this (clocks run at most 1 + rho fast).
        bound_us = tt_earliest_us + int((self._lease_end_s - now_s) / (1 + self.rho) * 1e6)
        if ts_us >= bound_us:
            return None
        self.max_assigned_ts = ts_us
        return ts_us

    def reserve_ts(self, now_s: float, tt_earliest_us: int, ts_us: int) -> bool:
        """A read at ``ts_us`` is served by this leader: every timestamp handed out
        from now on is above it (Spanner §4.1.3: the leader's own writes then
        cannot land below a read it served). False when this node does not lead
        under a lease that covers ``ts_us`` (a successor's timestamps are above
        the lease's end, so a reservation inside it binds them too)."""
        if not self.is_leader(now_s):
            return False
        bound_us = tt_earliest_us + int((self._lease_end_s - now_s) / (1 + self.rho) * 1e6)
        if ts_us >= bound_us:
            return False
        self.max_assigned_ts = max(self.max_assigned_ts, ts_us)
        return True

    def election_due_s(self) -> float:
        """When a follower stands for election: after silence from the leader for a
        randomized timeout, and not before a vote it holds for another node
        (plus jitter), a refusal's retry time or its post-restart wait ends."""
        contact = self._last_contact_s if self._last_contact_s is not None else float("inf")
        due = max(contact + self._timeout_s, self._not_before_s, self.restart_until_s)
        if self.vote_node is not None and self.vote_node != self.node_id:
            due = max(due, self.vote_expires_s + self._jitter_s)
        return due

    # --- the bounded log ------------------------------------------------------------------

    def compact(self, up_to_slot: int, handle: str) -> Ready:
        """The shell has applied every slot through ``up_to_slot`` and can serve its
        state at that slot as ``handle``: drop the log there and below."""
        if up_to_slot > self.applied_through:
            raise ValueError(f"slot {up_to_slot} is not applied yet (applied through {self.applied_through})")
        if self.snapshot is not None and up_to_slot <= self.snapshot.last_slot:
            return self._take_ready()
        max_ts = max(
            [self.snapshot.max_ts_us if self.snapshot else 0]
            + [entry.ts_us for slot, entry in self.chosen.items() if slot <= up_to_slot]
        )
        members = tuple(sorted(self._config_at(up_to_slot)))
        self._adopt_snapshot(Snapshot(handle, up_to_slot, max_ts, members))
        return self._take_ready()

    def log_size(self) -> int:
        """Slots held in memory (accepted or chosen): what compaction bounds."""
        return len(self.accepted.keys() | self.chosen.keys())

    # --- internals: ready, persistence, votes ---------------------------------------------

    def _take_ready(self) -> Ready:
        ready, self._ready = self._ready, Ready()
        return ready

    def _persist(self, record: Record) -> None:
        self._ready.persist.append(record)

    def _send(self, to: str, msg: Message) -> None:
        self._ready.messages.append(Outgoing(to, msg))

    def _broadcast(self, msg: Message) -> None:
        for peer in self.peers:
            self._send(peer, msg)

    def _raise_promise(self, ballot: Ballot) -> None:
        if ballot > self.promised:
            self.promised = ballot
            self._persist(PromiseRecord(ballot))

    def _can_vote(self, node: str, now_s: float) -> bool:
        """May this replica grant a lease vote (and so a promise) to ``node`` now?"""
        if now_s < self.restart_until_s:
            return False
        return self.vote_node is None or self.vote_node == node or now_s >= self.vote_expires_s

    def _refusal(self, now_s: float) -> tuple[str, float]:
        if now_s < self.restart_until_s:
            return "restart", self.restart_until_s - now_s
        return "lease", max(0.0, self.vote_expires_s - now_s)

    def _grant_vote(self, node: str, now_s: float) -> None:
        if self.vote_node == node:
            self.vote_expires_s = max(self.vote_expires_s, now_s + self.lease_s)
        else:
            self.vote_node, self.vote_expires_s = node, now_s + self.lease_s

    def _count_vote(self, voter: str, sent_s: float, now_s: float) -> None:
        if voter not in self.members:
            return  # a learner's or a removed node's vote counts for nothing
        # A vote starts after we asked for it; an echoed time from our future is not believed.
        credit_end = min(sent_s, now_s) + self.vote_credit_s
        self._vote_ends[voter] = max(self._vote_ends.get(voter, float("-inf")), credit_end)
        ends = sorted(self._vote_ends.values(), reverse=True)
        end = ends[self.quorum - 1] if len(ends) >= self.quorum else float("-inf")
        if end <= now_s:
            return
        if self._lease_start_s is None or now_s >= self._lease_end_s:
            self._lease_start_s = now_s  # a new lease: the old one (if any) had lapsed
        self._lease_end_s = max(self._lease_end_s, end)

    def _recount_lease(self, now_s: float) -> None:
        """The configuration changed: the lease is what a quorum of the new
        members' live votes gives, which may end sooner (never later)."""
        self._vote_ends = {v: end for v, end in self._vote_ends.items() if v in self.members}
        ends = sorted(self._vote_ends.values(), reverse=True)
        end = ends[self.quorum - 1] if len(ends) >= self.quorum else float("-inf")
        if end <= now_s or self._lease_start_s is None:
            self._lease_start_s = None
            self._lease_end_s = float("-inf")
        else:
            self._lease_end_s = min(self._lease_end_s, end)

    def _set_members(self, members: Iterable[str]) -> None:
        self.members = frozenset(members)
        self.peers = tuple(sorted(self.members - {self.node_id}))
        self.quorum = len(self.members) // 2 + 1

    def _config_at(self, slot: int) -> frozenset[str]:
        """The configuration in force after ``slot`` (which must be chosen and known)."""
        floor = self.snapshot.last_slot if self.snapshot else 0
        for s in range(slot, floor, -1):
            members = self.chosen[s].members
            if members is not None:
                return frozenset(members)
        if self.snapshot is not None and self.snapshot.members is not None:
            return frozenset(self.snapshot.members)
        return self.initial_members

    def _apply_config(self, members: Iterable[str], slot: int) -> None:
        """A configuration entry is chosen and every slot before it known: it
        governs every slot after it (see "Membership")."""
        target = frozenset(members)
        if target == self.members:
            return
        was_member = self.node_id in self.members
        previous = self.members
        self._set_members(target)
        if was_member and self.node_id not in target:
            self.removed = True
        elif self.node_id in target:
            self.removed = False
        for node in target:
            self._learners.pop(node, None)
            self._departed.pop(node, None)
        for node in previous - target - {self.node_id}:
            self._departed[node] = (slot, DEPARTED_BEATS)
        self._config_changed = True

    def _settle_config(self, now_s: float) -> None:
        """After an entry point: act on a configuration that took effect in it."""
        if self._config_slot is not None and self.commit_through >= self._config_slot:
            self._config_slot = None
        if not self._config_changed:
            return
        self._config_changed = False
        if self.role is Role.FOLLOWER:
            return
        if self.node_id not in self.members:
            self._become_follower(now_s)  # removed itself: steps down (its votes lapse)
            return
        # Our lease votes were counted under the old configuration; no next
        # change until that count has ended (see "Membership").
        self._change_not_before_s = max(self._change_not_before_s, self._lease_end_s)
        self._recount_lease(now_s)
        # Phase 1 covered slots up to the configuration entry only: run it again
        # with a quorum of the new members for the slots after it.
        self._start_phase1(now_s, now_s + 2 * self.election_timeout_s)
        if self.role is not Role.CANDIDATE and self.role is not Role.LEADER:
            self._become_follower(now_s)

    def _drop_lease(self) -> None:
        self._vote_ends.clear()
        self._lease_start_s = None
        self._lease_end_s = float("-inf")

    def _contact(self, leader: str, now_s: float) -> None:
        self.leader_hint = leader
        self._last_contact_s = now_s
        self._redraw = True

    def _note_ts(self, ts_us: int) -> None:
        if ts_us > self.max_log_ts:
            self.max_log_ts = ts_us
        if ts_us > self.max_assigned_ts:
            self.max_assigned_ts = ts_us

    # --- internals: roles ---------------------------------------------------------------

    def _become_follower(self, now_s: float) -> None:
        self.role = Role.FOLLOWER
        self._tracker = None
        self._recovered = {}
        self._inflight.clear()
        self._candidate_deadline_s = float("inf")
        self._config_slot = None
        self._drop_lease()
        self._last_contact_s = now_s
        self._redraw = True

    def _start_phase1(self, now_s: float, deadline_s: float) -> None:
        """Stand for election (or, as leader, move to a higher ballot)."""
        if not self._can_vote(self.node_id, now_s):
            return
        if self.role is Role.FOLLOWER:
            self._drop_lease()
        ballot = Ballot(max(self.promised.round, self.ballot.round, self._seen_round) + 1, self.node_id)
        self.ballot = ballot
        self._raise_promise(ballot)  # persisted with the Prepare that depends on it
        self.role = Role.CANDIDATE
        self._candidate_deadline_s = deadline_s
        self._inflight.clear()
        self._config_slot = None
        from_slot = self.commit_through + 1
        self._recovered = {s: v for s, v in self.accepted.items() if s >= from_slot}
        self._tracker = ResponseTracker(self.members, self.quorum)
        self._broadcast(Prepare(self.node_id, ballot, from_slot, now_s))
        if self._tracker.record(self.node_id, Response.OK) is Vote.WON:
            self._become_leader(now_s)

    def _become_leader(self, now_s: float) -> None:
        """Phase 1 won: re-propose what the quorum accepted, no-ops in the gaps."""
        self.role = Role.LEADER
        self._tracker = None
        self._candidate_deadline_s = float("inf")
        self.leader_hint = self.node_id
        if self._can_vote(self.node_id, now_s):
            self._grant_vote(self.node_id, now_s)
            self._count_vote(self.node_id, now_s, now_s)
        top = max([self.commit_through, *self._recovered, *self.chosen])
        # Our quorum is one of the configuration at the commit point, so phase 1
        # holds only up to the first configuration entry after it: re-propose
        # through there, and nothing beyond until it is chosen ("Membership").
        for slot in range(self.commit_through + 1, top + 1):
            held = self._recovered.get(slot)
            here = self.chosen.get(slot) or (held[1] if held else None)
            if here is not None and here.members is not None:
                top = slot
                self._config_slot = slot
                break
        slots = []
        for slot in range(self.commit_through + 1, top + 1):
            if slot in self.chosen:
                continue
            found = self._recovered.get(slot)
            self._propose_at(slot, found[1] if found else NOOP)
            slots.append(slot)
        self._recovered = {}
        self.next_slot = top + 1
        self._not_before_s = float("-inf")
        self._send_accepts(slots, self.peers)
        self._check_chosen(slots)
        self._heartbeat(now_s, resend=False)

    def _propose_at(self, slot: int, entry: Entry) -> None:
        self.accepted[slot] = (self.ballot, entry)
        self._persist(AcceptRecord(slot, self.ballot, entry))
        self._note_ts(entry.ts_us)
        self._inflight[slot] = (entry, {self.node_id})

    def _send_accepts(self, slots: list[int], to: Iterable[str]) -> None:
        if not slots:
            return
        entries = tuple((slot, self._inflight[slot][0]) for slot in slots if slot in self._inflight)
        for start in range(0, len(entries), LEARN_BATCH):
            msg = Accept(self.node_id, self.ballot, entries[start:start + LEARN_BATCH], self.commit_through)
            for peer in to:
                self._send(peer, msg)

    def _heartbeat(self, now_s: float, *, resend: bool = True) -> None:
        self._next_heartbeat_s = now_s + self.heartbeat_interval_s
        if self._can_vote(self.node_id, now_s):
            self._grant_vote(self.node_id, now_s)
            self._count_vote(self.node_id, now_s, now_s)
        beat = Heartbeat(self.node_id, self.ballot, self.commit_through, now_s)
        self._last_beat = (now_s, self.commit_through)
        self._broadcast(beat)
        for learner in self._learners:
            self._send(learner, beat)  # its acks tell us how far to catch it up
        for node, (slot, left) in list(self._departed.items()):
            self._send(node, beat)  # until it has learned it was removed
            if left <= 1:
                del self._departed[node]
            else:
                self._departed[node] = (slot, left - 1)
        if not resend:
            return
        # Re-send what is not chosen yet to whoever has not accepted it (messages get lost).
        for slot in sorted(self._inflight)[:RESEND_BATCH]:
            entry, acks = self._inflight[slot]
            missing = [peer for peer in self.peers if peer not in acks]
            msg = Accept(self.node_id, self.ballot, ((slot, entry),), self.commit_through)
            for peer in missing:
                self._send(peer, msg)

    def _check_chosen(self, slots: Iterable[int]) -> None:
        newly = False
        for slot in slots:
            held = self._inflight.get(slot)
            if held is not None and len(held[1] & self.members) >= self.quorum:
                del self._inflight[slot]
                self._choose(slot, held[0])
                newly = True
        if newly and self._advance_commit():
            self._broadcast(Commit(self.node_id, self.ballot, self.commit_through))

    # --- internals: learning ---------------------------------------------------------------

    def _choose(self, slot: int, entry: Entry) -> None:
        if slot <= self.commit_through or slot in self.chosen:
            return
        self.chosen[slot] = entry
        self._persist(ChosenRecord(slot, entry))
        self._note_ts(entry.ts_us)

    def _advance_commit(self) -> bool:
        before = self.commit_through
        while self.commit_through + 1 in self.chosen:
            self.commit_through += 1
            members = self.chosen[self.commit_through].members
            if members is not None:
                self._apply_config(members, self.commit_through)
        while self.applied_through < self.commit_through:
            self.applied_through += 1
            entry = self.chosen[self.applied_through]
            superseded = not entry.noop and entry.ts_us <= self.applied_ts_us
            if not entry.noop and not superseded:
                self.applied_ts_us = entry.ts_us
            self._ready.committed.append(Committed(self.applied_through, entry, superseded))
        return self.commit_through > before

    def _learn_commit_point(self, ballot: Ballot, through: int) -> None:
        """Slots up to ``through`` are chosen; those accepted at ``ballot`` hold the value."""
        slot = self.commit_through + 1
        while slot <= through:  # up to the first slot it cannot settle: the commit point stops there
            held = self.accepted.get(slot)
            if slot not in self.chosen:
                if held is None or held[0] != ballot:
                    break
                self._choose(slot, held[1])
            slot += 1
        self._advance_commit()

    def _adopt_snapshot(self, snapshot: Snapshot) -> None:
        last = snapshot.last_slot
        self.snapshot = snapshot
        self._persist(SnapshotRecord(snapshot))
        self.accepted = {s: v for s, v in self.accepted.items() if s > last}
        self.chosen = {s: v for s, v in self.chosen.items() if s > last}
        self._recovered = {s: v for s, v in self._recovered.items() if s > last}
        for slot in [s for s in self._inflight if s <= last]:
            del self._inflight[slot]
        self._note_ts(snapshot.max_ts_us)
        self.next_slot = max(self.next_slot, last + 1)
        if last > self.commit_through:
            self.commit_through = last
            if snapshot.members is not None:
                self._apply_config(snapshot.members, last)
        if last > self.applied_through:
            self.applied_through = last
            self.applied_ts_us = max(self.applied_ts_us, snapshot.max_ts_us)
            self._ready.snapshot = snapshot
            self._ready.committed.clear()  # the snapshot covers them
        self._advance_commit()

    def _catch_up(self, to: str, from_slot: int) -> None:
        """Send ``to`` what it lacks from ``from_slot``: chosen entries, or the snapshot."""
        if self.snapshot is not None and from_slot <= self.snapshot.last_slot:
            self._send(to, InstallSnapshot(self.node_id, self.ballot, self.snapshot))
            return
        entries = []
        for slot in range(from_slot, min(self.commit_through, from_slot + LEARN_BATCH - 1) + 1):
            entry = self.chosen.get(slot)
            if entry is None:
                break
            entries.append((slot, entry))
        if entries:
            self._send(to, Learn(self.node_id, tuple(entries)))

    # --- handlers ------------------------------------------------------------------------

    def _on_prepare(self, m: Prepare, now_s: float) -> None:
        if self.removed:
            return  # removed from the group: votes and accepts no more
        if self.snapshot is not None and m.from_slot <= self.snapshot.last_slot:
            # Our accepted values there are compacted away; the candidate must catch up first.
            self._send(m.sender, InstallSnapshot(self.node_id, self.ballot, self.snapshot))
            self._send(m.sender, Reject(self.node_id, m.ballot, self.promised, "snapshot"))
            return
        if m.ballot < self.promised:
            self._send(m.sender, Reject(self.node_id, m.ballot, self.promised, "ballot"))
            return
        if not self._can_vote(m.ballot.node_id, now_s):
            reason, retry = self._refusal(now_s)
            self._send(m.sender, Reject(self.node_id, m.ballot, self.promised, reason, retry))
            return
        self._raise_promise(m.ballot)
        self._grant_vote(m.ballot.node_id, now_s)
        if self.role is not Role.FOLLOWER and m.ballot.node_id != self.node_id:
            self._become_follower(now_s)
        self._contact(m.ballot.node_id, now_s)
        accepted = tuple(
            AcceptedSlot(slot, ballot, entry)
            for slot, (ballot, entry) in sorted(self.accepted.items())
            if slot >= m.from_slot
        )
        self._send(m.sender, Promise(self.node_id, m.ballot, accepted, m.sent_s))

    def _on_promise(self, m: Promise, now_s: float) -> None:
        if m.ballot != self.ballot or self.role is Role.FOLLOWER:
            return
        self._count_vote(m.sender, m.sent_s, now_s)
        if self.role is not Role.CANDIDATE or self._tracker is None:
            return
        for item in m.accepted:
            if item.slot <= self.commit_through:
                continue
            held = self._recovered.get(item.slot)
            if held is None or item.ballot > held[0]:
                self._recovered[item.slot] = (item.ballot, item.entry)
            self._note_ts(item.entry.ts_us)
        if self._tracker.record(m.sender, Response.OK) is Vote.WON:
            self._become_leader(now_s)

    def _on_reject(self, m: Reject, now_s: float) -> None:
        if m.ballot != self.ballot or self.role is Role.FOLLOWER:
            return
        if m.promised > self.ballot:
            self._seen_round = max(self._seen_round, m.promised.round)
            if self.role is Role.LEADER and self.lease_valid(now_s):
                # No other node can lead while our lease holds: a stale candidate's
                # ballot. Move above it, keeping the lease (votes are per node).
                self._start_phase1(now_s, now_s + 2 * self.election_timeout_s)
            else:
                self._become_follower(now_s)
            return
        if self.role is Role.CANDIDATE and self._tracker is not None:
            self._not_before_s = max(self._not_before_s, now_s + m.retry_after_s)
            if self._tracker.record(m.sender, Response.FAILED) is Vote.LOST:
                self._become_follower(now_s)
                self._not_before_s = now_s + m.retry_after_s

    def _on_accept(self, m: Accept, now_s: float) -> None:
        if self.removed:
            return  # removed from the group: votes and accepts no more
        if m.ballot < self.promised:
            self._send(m.sender, Reject(self.node_id, m.ballot, self.promised, "ballot"))
            return
        raised = m.ballot > self.promised
        self.promised = m.ballot  # persisted by an AcceptRecord (it carries the ballot) or below
        if self.role is not Role.FOLLOWER and m.ballot.node_id != self.node_id:
            self._become_follower(now_s)
        self._contact(m.ballot.node_id, now_s)
        floor = self.snapshot.last_slot if self.snapshot else 0
        slots = []
        for slot, entry in m.entries:
            if slot > floor and slot not in self.chosen:
                self.accepted[slot] = (m.ballot, entry)
                self._persist(AcceptRecord(slot, m.ballot, entry))
                self._note_ts(entry.ts_us)
                raised = False
            slots.append(slot)
        if raised:
            self._persist(PromiseRecord(m.ballot))
        self._send(m.sender, Accepted(self.node_id, m.ballot, tuple(slots)))
        self._learn_commit_point(m.ballot, m.commit_through)

    def _on_accepted(self, m: Accepted, now_s: float) -> None:
        if self.role is not Role.LEADER or m.ballot != self.ballot:
            return
        for slot in m.slots:
            held = self._inflight.get(slot)
            if held is not None:
                held[1].add(m.sender)
        self._check_chosen(m.slots)

    def _on_heartbeat(self, m: Heartbeat, now_s: float) -> None:
        if self.removed:
            # Removed from the group: no vote, no promise, but an answer that says
            # how far behind it is, so a leader adding it back can catch it up.
            self._send(m.sender, HeartbeatAck(self.node_id, m.ballot, m.sent_s, self.commit_through,
                                              False))
            return
        if m.ballot < self.promised:
            self._send(m.sender, Reject(self.node_id, m.ballot, self.promised, "ballot"))
            return
        granted = self._can_vote(m.ballot.node_id, now_s)
        if granted:
            self._raise_promise(m.ballot)
            self._grant_vote(m.ballot.node_id, now_s)
        if self.role is not Role.FOLLOWER and m.ballot.node_id != self.node_id:
            self._become_follower(now_s)
        self._contact(m.ballot.node_id, now_s)
        self._learn_commit_point(m.ballot, m.commit_through)
        self._send(m.sender, HeartbeatAck(self.node_id, m.ballot, m.sent_s, self.commit_through, granted))

    def _on_heartbeat_ack(self, m: HeartbeatAck, now_s: float) -> None:
        if self.role is not Role.LEADER or m.ballot != self.ballot:
            return
        if m.granted:
            self._count_vote(m.sender, m.sent_s, now_s)
        if m.sender in self._learners and m.sent_s == self._last_beat[0]:
            self._learners[m.sender] = max(0, self._last_beat[1] - m.commit_through)
        if m.sender in self._departed and self._departed[m.sender][0] <= m.commit_through:
            del self._departed[m.sender]  # it knows it was removed
        if m.commit_through < self.commit_through:
            self._catch_up(m.sender, m.commit_through + 1)

    def _on_commit(self, m: Commit, now_s: float) -> None:
        self._learn_commit_point(m.ballot, m.commit_through)
        if self.commit_through < m.commit_through:
            self._send(m.sender, CatchUp(self.node_id, self.commit_through + 1))

    def _on_catch_up(self, m: CatchUp, now_s: float) -> None:
        self._catch_up(m.sender, m.from_slot)

    def _on_learn(self, m: Learn, now_s: float) -> None:
        for slot, entry in m.entries:
            self._choose(slot, entry)
        self._advance_commit()
        if len(m.entries) >= LEARN_BATCH and self.commit_through >= m.entries[-1][0]:
            # A full batch: there may be more. Pull the next one now rather than
            # a heartbeat later, so a joining node outruns the leader's load.
            self._send(m.sender, CatchUp(self.node_id, self.commit_through + 1))

    def _on_install_snapshot(self, m: InstallSnapshot, now_s: float) -> None:
        if m.snapshot.last_slot > self.commit_through:
            self._adopt_snapshot(m.snapshot)


_FROM_BALLOT_OWNER = (Prepare, Accept, Heartbeat, Commit)

_HANDLERS: dict[type, Callable[[PaxosReplica, Any, float], None]] = {
    Prepare: PaxosReplica._on_prepare,
    Promise: PaxosReplica._on_promise,
    Accept: PaxosReplica._on_accept,
    Accepted: PaxosReplica._on_accepted,
    Reject: PaxosReplica._on_reject,
    Heartbeat: PaxosReplica._on_heartbeat,
    HeartbeatAck: PaxosReplica._on_heartbeat_ack,
    Commit: PaxosReplica._on_commit,
    CatchUp: PaxosReplica._on_catch_up,
    Learn: PaxosReplica._on_learn,
    InstallSnapshot: PaxosReplica._on_install_snapshot,
}
