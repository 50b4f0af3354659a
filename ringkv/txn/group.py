"""``GroupRunner``: the shell that runs one Paxos group's replica on this node.

It feeds a ``PaxosReplica`` (``txn/paxos.py``) what happens: messages
(``step``, or ``receive`` for an undecoded one), time (``tick`` on a timer of
the one clock) and proposals (``propose_future``), and carries out each
``Ready`` in order, as the replica's contract says:

1. persist the records: one engine batch, fsynced (``txn/paxos_log.py``);
2. then hand the messages to ``send(node_id, group_id, message)``, the
   node's (which coalesces them per destination: ``paxos_messages.Outbox``);
3. then install a snapshot, if any, and apply the committed entries in slot
   order to the ``MvccStore``.

Readies queue while a persist is in flight and the next round takes all of
them: one fsync covers every record of the batch (group commit), and every
message still leaves after the records it depends on are on disk. One drain
task at a time does this, so the order holds across rounds.

**Log entries.** A commit is a ``paxos_messages.CommitValue``: the
transaction id, its commit timestamp (the entry's, handed out by
``PaxosReplica.assign_ts`` from ``TT.now()`` inside the leader's lease) and
its writes. An entry delivered ``superseded`` (its timestamp is not above
one applied before it) is not applied, and its proposal is answered
aborted. A value that does not decode is skipped on every replica alike
(the log is the same everywhere) and counted.

**Outcomes.** ``propose_future`` resolves to an ``Outcome``: committed at
``commit_ts_us`` once applied here; aborted when its slot chose another
value (a leader change lost it) or it was superseded; refused when this
node cannot propose (not leader, with a hint; no lease; backlog; clock
uncertain); unknown when the runner stopped, the wait timed out, or a
snapshot jumped over the slot before this node learned it. The slot decides:
a proposal is only ever at one slot.

**Bounded log.** After applying, once more than ``max_log_slots`` applied
slots are held, the runner compacts the log to ``keep_log_slots`` behind
the applied point; the MVCC store is the snapshot, and its handle names this
node. A replica that needs slots below a compaction point gets an
``InstallSnapshot`` and fetches the group's MVCC records at or below the
snapshot's timestamp, page by page, through ``fetch_snapshot(node_id,
SnapshotRequest)`` (the node sends it to the peer's ``serve_snapshot``).
Records after the snapshot's slot are newer than its timestamp (applied
timestamps rise in slot order), so any member that has applied through that
slot can serve it. The store's applied point (``paxos_log``'s ``T``) moves
only once every page is in, so a crash mid-install installs again.

**What is fsynced.** A batch holding a promise, an accept or a snapshot
record is fsynced before its messages leave: replies depend on those. A
batch of chosen records alone is written unsynced. Nothing anyone was told
depends on it: a value is chosen because a quorum accepted it, durably, so a
replica that loses its chosen records in a crash learns them again from the
commit point or a ``CatchUp``, and they reach the disk with the next fsync
anyway. This halves the fsyncs of a commit (accept, then chosen) on every
replica. The applied point is written after the entries it covers (below),
so it never survives a crash that the chosen records it relies on did not.

**Durability order.** The applied point and the applied versions are
written unsynced, in the engine the log uses, before the next fsynced log
batch; a crash loses a suffix of unsynced writes, so it can lose applies
(which restart redoes from the log) but never leave the applied point ahead
of the store. The log, the store and the snapshot installs must therefore
share one engine: the node's.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from ringkv.clock import Clock, Timer
from ringkv.errors import ClockUncertain, CorruptRecord, ProtocolError, RingKVError
from ringkv.ring import token_for
from ringkv.storage.engine import Engine
from ringkv.txn import mvcc_keys
from ringkv.txn.mvcc import MvccStore
from ringkv.txn.newest_write import NewestWrite
from ringkv.txn.paxos import (
    ELECTION_TIMEOUT_S,
    HEARTBEAT_INTERVAL_S,
    Accept,
    ChosenRecord,
    Commit,
    Heartbeat,
    LEASE_S,
    MAX_DRIFT_PPM,
    Committed,
    Message,
    PaxosReplica,
    Prepare,
    ProposalRefused,
    Ready,
    Role,
    Snapshot,
)
from ringkv.txn.paxos_log import PaxosLog
from ringkv.txn.paxos_messages import (
    CommitValue,
    SnapshotPage,
    SnapshotRequest,
    decode_batch,
    decode_commit_value,
    decode_message,
    encode_commit_value,
)
from ringkv.txn.ranges import Range
from ringkv.txn.truetime import TrueTime, TTInterval
from ringkv.txn import twopc_records
from ringkv.txn.twopc_messages import (
    DecisionRecord,
    OutcomeRecord,
    PreparedRecord,
    Record,
    decode_record,
    encode_record,
    is_record,
)
from ringkv.txn.twopc_records import TwoPCRecords

log = logging.getLogger(__name__)

T = TypeVar("T")

TICK_INTERVAL_S = HEARTBEAT_INTERVAL_S / 4  # PaxosReplica.tick's advice
MAX_LOG_SLOTS = 512  # applied slots held before the log is compacted
KEEP_LOG_SLOTS = 128  # slots kept behind the applied point, for followers a little behind
PROPOSE_TIMEOUT_S = 2 * LEASE_S  # a proposal not decided by then is answered unknown
SNAPSHOT_PAGE_ITEMS = 1_000
SNAPSHOT_ATTEMPTS = 8  # sources tried (in turn) before the runner gives up and stops
SNAPSHOT_RETRY_S = 0.2  # first wait between attempts; doubles, up to SNAPSHOT_RETRY_MAX_S
SNAPSHOT_RETRY_MAX_S = 5.0

# Outcome statuses, and reasons.
COMMITTED, ABORTED, REFUSED, UNKNOWN = "committed", "aborted", "refused", "unknown"

SendFn = Callable[[str, str, Message], None]
FetchSnapshotFn = Callable[[str, SnapshotRequest], Awaitable[SnapshotPage]]


@dataclass(frozen=True)
class Outcome:
    """What became of a proposal.

    ``status``: committed (``commit_ts_us`` set; applied here), aborted
    (reason ``lost``: its slot chose another value; ``superseded``), refused
    (``not_leader`` with ``leader_hint`` when known, ``no_lease``,
    ``backlog``, ``stale_ts``, ``clock_uncertain``, ``stopped``) or unknown
    (``timeout``, ``stopped``, ``compacted``: it may or may not have committed).
    """

    status: str
    txn_id: str
    commit_ts_us: int | None = None
    slot: int | None = None
    reason: str = ""
    leader_hint: str | None = None


@dataclass
class GroupStats:
    steps: int = 0
    ticks: int = 0
    rejected: int = 0  # messages that did not decode, or came from outside the group
    persist_batches: int = 0
    fsyncs: int = 0  # persist batches written with fsync
    readies: int = 0
    messages_sent: int = 0
    applied: int = 0  # commits applied to the store
    superseded: int = 0
    bad_entries: int = 0  # chosen values that did not decode or broke the range: skipped
    compactions: int = 0
    snapshots_installed: int = 0
    snapshot_records: int = 0
    snapshot_failures: int = 0
    proposed: int = 0
    committed: int = 0
    aborted: int = 0
    refused: int = 0
    unknown: int = 0
    config_changes: int = 0  # membership changes proposed here as leader
    move_waits: int = 0  # ticks a move waited (a joining node catching up, a change settling)


@dataclass
class _Waiter:
    txn_id: str
    ts_us: int
    future: asyncio.Future[Outcome]
    timer: Timer | None


class SnapshotNotReady(RingKVError):
    """This member cannot serve the asked snapshot: it has not applied through its slot."""

    code = "snapshot_not_ready"
    http_status = 503


class GroupRunner:
    """One group's replica on this node (module docstring). ``start``, then feed it."""

    def __init__(
        self,
        node_id: str,
        group: Range,
        *,
        engine: Engine,
        mvcc: MvccStore,
        clock: Clock,
        truetime: TrueTime,
        send: SendFn,
        fetch_snapshot: FetchSnapshotFn,
        rng: random.Random,
        tick_interval_s: float = TICK_INTERVAL_S,
        max_log_slots: int = MAX_LOG_SLOTS,
        keep_log_slots: int = KEEP_LOG_SLOTS,
        propose_timeout_s: float = PROPOSE_TIMEOUT_S,
        lease_s: float = LEASE_S,
        heartbeat_interval_s: float = HEARTBEAT_INTERVAL_S,
        election_timeout_s: float = ELECTION_TIMEOUT_S,
        max_drift_ppm: float = MAX_DRIFT_PPM,
        on_apply: Callable[[CommitValue], None] | None = None,
        on_record: Callable[[Record, bool], None] | None = None,
        on_applied: Callable[[int], None] | None = None,
        finished_ttl_s: float = 600.0,
        members: Iterable[str] | None = None,
        heard: Iterable[str] = (),
    ) -> None:
        """``on_apply(value)`` runs after each commit is applied to the store,
        in slot order, before the applied point moves past it (the service
        records transaction outcomes there). ``on_record(record, superseded)``
        runs likewise for each two-phase commit record (``txn/twopc_records.py``);
        a superseded one did not take effect (a prepare at a timestamp not above
        one applied before it), on any replica. ``on_applied(written_us)`` runs
        once a batch of entries is applied and the applied point moved, with
        the highest commit timestamp whose writes the batch applied (0: none):
        safe time may have moved (a watch's shared poll is woken by it).

        ``group.replicas`` is where the group should be; ``members`` (default:
        the same) is its configuration before its log says otherwise. When they
        differ the range is moving, and whoever leads moves the group one member
        at a time (``_move``); a node in ``group.replicas`` but not in
        ``members`` joins as a learner. ``heard``: the configuration a joining
        node was told the group has now (it hears that leader before its log
        names it)."""
        initial = frozenset(members) if members is not None else frozenset(group.replicas)
        if node_id not in group.replicas and node_id not in initial:
            raise ValueError(f"{node_id!r} is not a member of group {group.group_id!r}")
        if not 0 <= keep_log_slots < max_log_slots:
            raise ValueError("keep_log_slots must be in [0, max_log_slots)")
        if not 0 < tick_interval_s < heartbeat_interval_s:
            raise ValueError("tick_interval_s must be in (0, heartbeat_interval_s)")
        self.node_id = node_id
        self.group = group
        self.group_id = group.group_id
        self.keyspace = group.keyspace
        self.initial_members = initial
        self.heard = frozenset(heard)
        self._engine = engine
        self._mvcc = mvcc
        self._clock = clock
        self._truetime = truetime
        self._send = send
        self._fetch_snapshot = fetch_snapshot
        self._on_apply = on_apply
        self._on_record = on_record
        self._on_applied = on_applied
        self.records = TwoPCRecords(engine, group.group_id, finished_ttl_s)
        self._rng = rng
        self.tick_interval_s = tick_interval_s
        self.max_log_slots = max_log_slots
        self.keep_log_slots = keep_log_slots
        self.propose_timeout_s = propose_timeout_s
        self._options = {
            "lease_s": lease_s, "heartbeat_interval_s": heartbeat_interval_s,
            "election_timeout_s": election_timeout_s, "max_drift_ppm": max_drift_ppm,
        }
        # The group's MVCC records, then its 2PC records (key order): what a snapshot holds.
        self._bounds = _engine_bounds(group) + [twopc_records.group_bounds(group.group_id)]
        self._log = PaxosLog(engine, self.group_id)
        self.replica: PaxosReplica | None = None
        self.applied_through = 0  # the last slot the store holds (or is being installed)
        # Safe time: the highest timestamp the store holds. The replica's own
        # applied_ts_us runs ahead of it until the drain applies its Ready.
        self._store_ts_us = 0
        # A leader's reserved read timestamp, once it applied everything proposed
        # before the reservation (``advance_safe_time``): nothing applies below it.
        self._reserved_safe_us = 0
        self._installing_through = 0  # a snapshot's slot while its install is in flight
        # The newest commit timestamp written in the range here, when known: a watch's
        # poll above it needs no read of the store (``txn/newest_write.py``).
        self.newest_write = NewestWrite()
        self._queue: list[Ready] = []
        self._drain_task: asyncio.Task[None] | None = None
        self._timer: Timer | None = None
        self._waiting: dict[int, _Waiter] = {}
        self._applied_waiters: list[tuple[int, asyncio.Future[None]]] = []  # (slot, woken)
        self.stopped = True
        self.failed: BaseException | None = None
        self.stats = GroupStats()

    # -- life cycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Load the log, rebuild the replica from it, and start ticking."""
        if not self.stopped:
            raise RuntimeError("already started")
        self.newest_write.forget()  # the store may have been written while stopped
        loaded = self._log.load()
        now_s = self._clock.monotonic_s()
        self.records.load(now_s)
        peers = sorted(self.initial_members - {self.node_id})
        if loaded.empty:
            # Nothing persisted means no promise, so no lease vote was ever granted:
            # every vote raises the promised ballot, and that is persisted first.
            self.replica = PaxosReplica(self.node_id, peers, self.initial_members, **self._options)
        else:
            # The configuration comes back from the log (entries and snapshot).
            self.replica = PaxosReplica.restore(
                self.node_id, peers, loaded.state, now_s, self.initial_members,
                applied_through=loaded.applied_through, **self._options,
            )
        self.applied_through = loaded.applied_through
        snapshot = loaded.state.snapshot
        missing = snapshot is not None and loaded.applied_through < snapshot.last_slot
        self._store_ts_us = 0 if missing else self.replica.applied_ts_us
        self.stopped = False
        self.failed = None
        if snapshot is not None and loaded.applied_through < snapshot.last_slot:
            # The snapshot record is durable but its data never arrived: fetch it
            # before applying anything after it.
            self._enqueue(Ready(snapshot=snapshot))
        self._enqueue(self.replica.tick(now_s, self._rng))  # chosen entries past the applied point
        self._timer = self._clock.call_later(self.tick_interval_s, self._on_tick)

    def stop(self) -> None:
        """Stop at once, as a crash would: nothing more is persisted, sent or applied.
        Proposals still waiting are answered unknown."""
        if self.stopped:
            return
        self.stopped = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._drain_task is not None:
            self._drain_task.cancel()
            self._drain_task = None
        self._queue.clear()
        for slot in list(self._waiting):
            self._resolve(slot, UNKNOWN, "stopped")
        self._wake_applied()

    # -- what the runner is fed ------------------------------------------------------------

    def step(self, msg: Message) -> None:
        """A decoded message from a member of the group."""
        if self.stopped or self.replica is None:
            return
        if msg.sender not in self.known_nodes() or msg.sender == self.node_id:
            self.stats.rejected += 1
            return
        if isinstance(msg, _ASKS_FOR_VOTES) and msg.sender not in self.voters():
            # A node being added is heard for its answers only: one that started the
            # group by itself must not win this node's promise or lease vote.
            self.stats.rejected += 1
            return
        self.stats.steps += 1
        self._enqueue(self.replica.step(msg, self._clock.monotonic_s()))

    def receive(self, sender: str, raw: Any) -> None:
        """An undecoded message from ``sender``: decoded and stepped, or counted and dropped."""
        try:
            msg = decode_message(raw, sender)
        except ProtocolError as exc:
            self._reject(sender, exc)
            return
        self.step(msg)

    def tick(self) -> None:
        """Time passes: heartbeats and lease renewal as leader, elections otherwise."""
        if self.stopped or self.replica is None:
            return
        self.stats.ticks += 1
        now_s = self._clock.monotonic_s()
        self._enqueue(self.replica.tick(now_s, self._rng))
        self._move(now_s)

    # -- membership ------------------------------------------------------------------------------

    @property
    def members(self) -> frozenset[str]:
        """The group's configuration as this replica knows it (from its log)."""
        return self.replica.members if self.replica is not None else self.initial_members

    def known_nodes(self) -> frozenset[str]:
        """Whom this runner hears: the configuration it knows, the one it started
        from, and, while it leads, the nodes it is catching up to add or has just
        removed (their answers only: ``voters`` ask for votes). Not the
        ring's new replicas as such: one that started the group on its own with
        the new replica set as its configuration (one the group never had)
        could otherwise win a phase 1 among them."""
        heard = self.voters()
        replica = self.replica
        if replica is not None and replica.role is Role.LEADER:
            heard |= replica.joining() | replica.departed()
        return heard

    def voters(self) -> frozenset[str]:
        """Whose ballots this runner answers (Prepare, Accept, Heartbeat, Commit):
        the configuration it knows, the one it started from, and the members it was
        told of when it joined (``heard``), never a node only being added."""
        return self.members | self.initial_members | self.heard

    @property
    def moving(self) -> bool:
        return self.members != frozenset(self.group.replicas)

    @property
    def removed(self) -> bool:
        """This node applied a configuration without itself: the runner has nothing left to do."""
        return self.replica is not None and self.replica.removed

    def move_to(self, group: Range) -> None:
        """The ring gives this range (same bounds) other replicas: move there."""
        if (group.start, group.end, group.keyspace) != (self.group.start, self.group.end, self.group.keyspace):
            raise ValueError(f"group {self.group_id} keeps its bounds; {group} has others")
        self.group = group

    def _move(self, now_s: float) -> None:
        """As leader, take one step from the configuration to ``group.replicas``:
        add a new member first (so the group never shrinks below either set),
        then remove an old one, this node last (it steps down when it goes)."""
        replica = self.replica
        if replica is None or not self.moving or not replica.is_leader(now_s):
            return
        target = frozenset(self.group.replicas)
        adding = sorted(target - self.members)
        leaving = sorted(self.members - target, key=lambda n: (n == self.node_id, n))
        step = self.members | {adding[0]} if adding else self.members - {leaving[0]}
        try:
            self._enqueue(replica.change_members(step, now_s))
        except ProposalRefused as exc:
            self.stats.move_waits += 1  # catching the new member up, or the last change settling
            log.debug("group %s: move to %s waits: %s", self.group_id, sorted(step), exc.reason)
            return
        self.stats.config_changes += 1
        log.info("group %s: configuration %s proposed (moving to %s)", self.group_id,
                 ", ".join(sorted(step)), ", ".join(self.group.replicas))

    def _on_tick(self) -> None:
        if self.stopped:
            return
        self._timer = self._clock.call_later(self.tick_interval_s, self._on_tick)
        self.tick()

    def _reject(self, sender: str, exc: ProtocolError) -> None:
        self.stats.rejected += 1  # counted, logged quietly: a peer sending garbage must not flood the log
        log.debug("group %s: dropped a malformed message from %s: %s", self.group_id, sender, exc.message)

    # -- proposing ---------------------------------------------------------------------------

    def propose_future(
        self, txn_id: str, writes: Iterable[tuple[bytes, bytes | None]],
        *, timeout_s: float | None = None, now: TTInterval | None = None,
    ) -> asyncio.Future[Outcome]:
        """Commit ``writes`` (a value, or None to delete) as one log entry, at a
        timestamp this leader assigns; the future gives the ``Outcome``.

        ``now``: ``TT.now()`` as the caller just read it through the fence, in the
        same step (no await since), with the transaction's locks held; the
        timestamp is assigned from it rather than from a second reading.

        A malformed commit (a key outside the group's range, a key twice, an
        oversized value) raises ``ProtocolError`` naming it; every other
        failure is an outcome.
        """
        writes = tuple(writes)
        return self._propose(txn_id, writes, lambda ts_us: encode_commit_value(
            CommitValue(txn_id, ts_us, writes)), timeout_s=timeout_s, now=now)

    def propose_record(self, record: Record, *, ts_us: int | None = None,
                       timeout_s: float | None = None) -> asyncio.Future[Outcome]:
        """Log a two-phase commit record through this group (``txn/twopc.py``'s
        ``Log`` effect); a prepare at its own timestamp, which ``assign_now``
        handed out just before (in the same step). Every replica takes it in as
        it applies it (``on_record``)."""
        writes = getattr(record, "writes", ())
        data = encode_record(record)
        return self._propose(record.txn_id, writes, lambda _ts: data, timeout_s=timeout_s,
                             fixed_ts_us=ts_us)

    def assign_now(self) -> int | None:
        """A timestamp from ``TT.now()`` inside this leader's lease, above every one
        handed out before (Spanner §4.1.1), or None (not leading, clock uncertain)."""
        replica = self.replica
        if self.stopped or replica is None:
            return None
        now_s = self._clock.monotonic_s()
        try:
            interval = self._truetime.check(self._clock.wall_us(), now_s).interval
        except ClockUncertain:
            return None
        if interval is None:
            return None
        return replica.assign_ts(now_s, interval.earliest_us, interval.latest_us)

    def reserve_ts(self, ts_us: int) -> bool:
        """As leader, promise that nothing proposed from now on commits at or below
        ``ts_us`` (``PaxosReplica.reserve_ts``): a snapshot read there then waits
        only for what is proposed already and for prepared transactions."""
        replica = self.replica
        if self.stopped or replica is None:
            return False
        now_s = self._clock.monotonic_s()
        try:
            interval = self._truetime.check(self._clock.wall_us(), now_s).interval
        except ClockUncertain:
            return False
        return interval is not None and replica.reserve_ts(now_s, interval.earliest_us, ts_us)

    def _propose(self, txn_id: str, writes: tuple[tuple[bytes, bytes | None], ...],
                 encode: Callable[[int], bytes], *, timeout_s: float | None,
                 now: TTInterval | None = None, fixed_ts_us: int | None = None,
                 ) -> asyncio.Future[Outcome]:
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        for key, _ in writes:
            if isinstance(key, bytes) and key and not self.group.contains(token_for(key)):
                raise ProtocolError(f"key {key[:32]!r} is outside group {self.group_id}", field="key")
        replica = self.replica
        if self.stopped or replica is None:
            return self._done(future, Outcome(REFUSED, txn_id, reason="stopped"))
        now_s = self._clock.monotonic_s()
        if not replica.is_leader(now_s):
            reason = "not_leader" if replica.role is not Role.LEADER else "no_lease"
            hint = replica.leader_hint if replica.leader_hint != self.node_id else None
            return self._done(future, Outcome(REFUSED, txn_id, reason=reason, leader_hint=hint))
        if fixed_ts_us is not None:
            ts_us: int | None = fixed_ts_us
        else:
            try:
                interval = now if now is not None else self._truetime.check(
                    self._clock.wall_us(), now_s).interval
            except ClockUncertain:
                return self._done(future, Outcome(REFUSED, txn_id, reason="clock_uncertain"))
            if interval is None:  # check() raises first; this keeps the type checker sure
                return self._done(future, Outcome(REFUSED, txn_id, reason="clock_uncertain"))
            ts_us = replica.assign_ts(now_s, interval.earliest_us, interval.latest_us)
        if ts_us is None:
            return self._done(future, Outcome(REFUSED, txn_id, reason="no_lease"))
        value = encode(ts_us)
        try:
            ready = replica.propose(value, now_s, ts_us=ts_us)
        except ProposalRefused as exc:
            return self._done(future, Outcome(REFUSED, txn_id, reason=exc.reason,
                                              leader_hint=exc.leader_hint))
        slot = replica.next_slot - 1
        self._resolve(slot, UNKNOWN, "stale")  # never the case (slots are not reused), but never lost
        timeout = self.propose_timeout_s if timeout_s is None else timeout_s
        timer = self._clock.call_later(timeout, self._resolve, slot, UNKNOWN, "timeout")
        self._waiting[slot] = _Waiter(txn_id, ts_us, future, timer)
        self.stats.proposed += 1
        self._enqueue(ready)
        return future

    def _done(self, future: asyncio.Future[Outcome], outcome: Outcome) -> asyncio.Future[Outcome]:
        self._count(outcome.status)
        future.set_result(outcome)
        return future

    def _count(self, status: str) -> None:
        setattr(self.stats, status, getattr(self.stats, status) + 1)

    def _resolve(self, slot: int, status: str, reason: str = "") -> None:
        waiter = self._waiting.pop(slot, None)
        if waiter is None:
            return
        if waiter.timer is not None:
            waiter.timer.cancel()
        if waiter.future.done():
            return
        ts = waiter.ts_us if status == COMMITTED else None
        hint = None
        if status != COMMITTED and self.replica is not None and self.replica.leader_hint != self.node_id:
            hint = self.replica.leader_hint
        self._count(status)
        waiter.future.set_result(Outcome(status, waiter.txn_id, ts, slot, reason, hint))

    # -- views ---------------------------------------------------------------------------------

    def is_leader(self) -> bool:
        """Leads with phase 1 done and a live lease: may propose and assign timestamps."""
        return self.replica is not None and not self.stopped and self.replica.is_leader(
            self._clock.monotonic_s())

    def leader(self) -> str | None:
        """This node while it leads under a lease, else the leader last heard from (a hint)."""
        if self.replica is None or self.stopped:
            return None
        if self.is_leader():
            return self.node_id
        hint = self.replica.leader_hint
        return hint if hint != self.node_id else None

    def lease_valid(self) -> bool:
        return self.replica is not None and not self.stopped and self.replica.lease_valid(
            self._clock.monotonic_s())

    @property
    def applied_ts_us(self) -> int:
        """This replica's safe time (Spanner §4.1.3): the highest timestamp applied
        to the store here (nothing applied later is older), held one below the
        least prepare timestamp of a transaction prepared and not yet decided
        (t_safe = min(t_Paxos, t_TM)): it may still commit at any s above that."""
        bound = self.records.safe_time_bound()
        safe_us = max(self._store_ts_us, self._reserved_safe_us)
        return safe_us if bound is None else min(safe_us, bound)

    def advance_safe_time(self, ts_us: int) -> None:
        """``ts_us`` was reserved (``reserve_ts``) and everything proposed before the
        reservation is applied here, with no transaction prepared below it: nothing
        will ever be applied here at or below ``ts_us``."""
        self._reserved_safe_us = max(self._reserved_safe_us, ts_us)

    def log_slots(self) -> int:
        """Slot records in the durable log (what compaction bounds)."""
        return self._log.slots_on_disk()

    # -- carrying out Readies --------------------------------------------------------------------

    def _enqueue(self, ready: Ready) -> None:
        if not ready or self.stopped:
            return
        self._queue.append(ready)
        if self._drain_task is None:
            self._drain_task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        try:
            while self._queue and not self.stopped:
                batch, self._queue = self._queue, []
                records = [record for ready in batch for record in ready.persist]
                if records:
                    # Only promises, accepts and snapshots back a reply; a batch of
                    # chosen records alone needs no fsync (module notes).
                    sync = not all(isinstance(record, ChosenRecord) for record in records)
                    if sync:
                        await self._io(self._log.persist, records, sync=True)
                    else:  # an unsynced write only reaches LevelDB's log and memtable: in place
                        self._log.persist(records, sync=False)
                    self.stats.persist_batches += 1
                    self.stats.fsyncs += sync
                    if self.stopped:
                        return  # stopped during the fsync: send nothing
                self.stats.readies += len(batch)
                for ready in batch:
                    for out in ready.messages:
                        self._send(out.to, self.group_id, out.msg)
                    self.stats.messages_sent += len(ready.messages)
                for ready in batch:
                    if ready.snapshot is not None:
                        await self._install(ready.snapshot)
                        if self.stopped:
                            return
                    self._apply(ready.committed)
                self._maybe_compact()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a storage failure: this replica cannot go on safely
            log.exception("group %s on %s failed; stopping it", self.group_id, self.node_id)
            self.failed = exc
            self._drain_task = None
            self.stop()
        finally:
            # Nothing runs between the loop's last check of the queue and here.
            if self._drain_task is asyncio.current_task():
                self._drain_task = None

    def _apply(self, committed: Sequence[Committed]) -> None:
        if not committed:
            return
        before = self.applied_through
        written_us = 0  # the newest commit timestamp whose writes this batch applied
        for item in committed:
            slot, entry = item.slot, item.entry
            if slot <= self.applied_through:
                continue  # already in the store (a snapshot covered it)
            value: CommitValue | Record | None = None
            if entry.noop:
                pass
            elif is_record(entry.value):
                value = self._apply_record(slot, entry.value, entry.ts_us, item.superseded)
                if (not item.superseded and isinstance(value, (OutcomeRecord, DecisionRecord))
                        and value.commit and value.writes):
                    written_us = max(written_us, value.commit_ts_us)
            else:
                value = self._decode(slot, entry.value, entry.ts_us)
                if value is not None and not item.superseded:
                    self._mvcc.apply_now(self.keyspace, dict(value.writes), entry.ts_us, sync=False)
                    self.newest_write.applied(entry.ts_us)
                    self.stats.applied += 1
                    if value.writes:
                        written_us = max(written_us, entry.ts_us)
                    if self._on_apply is not None:
                        self._on_apply(value)
            if item.superseded:
                self.stats.superseded += 1
            if not entry.noop and not item.superseded:
                self._store_ts_us = max(self._store_ts_us, entry.ts_us)
            self.applied_through = slot
            waiter = self._waiting.get(slot)
            if waiter is not None:
                self._resolve(slot, *decide(waiter.txn_id, waiter.ts_us, item, value))
        self._log.set_applied(self.applied_through)
        self._wake_applied()
        if self._on_applied is not None and self.applied_through > before:
            self._on_applied(written_us)

    def _apply_record(self, slot: int, data: bytes, ts_us: int, superseded: bool) -> Record | None:
        """A two-phase commit record, on every replica alike: kept for recovery and
        safe time, and a commit's writes applied at its commit timestamp ``s``
        (which may lie below timestamps applied since its prepare: safe time was
        held below the prepare meanwhile)."""
        try:
            record = decode_record(data)
            for key, _ in getattr(record, "writes", ()):
                if not self.group.contains(token_for(key)):
                    raise ProtocolError(f"key {key[:32]!r} is outside the group's range", field="key")
            if isinstance(record, PreparedRecord) and record.prepare_ts_us != ts_us:
                raise ProtocolError(f"prepare timestamp {record.prepare_ts_us} is not the entry's "
                                    f"{ts_us}", field="record.prepare_ts_us")
            if isinstance(record, DecisionRecord) and record.writes \
                    and record.commit_ts_us != ts_us:
                raise ProtocolError(f"commit timestamp {record.commit_ts_us} is not the entry's "
                                    f"{ts_us}", field="record.commit_ts_us")
        except ProtocolError as exc:
            self.stats.bad_entries += 1
            log.error("group %s: slot %d holds a 2PC record that cannot be applied: %s",
                      self.group_id, slot, exc.message)
            return None
        if not superseded:
            if isinstance(record, (OutcomeRecord, DecisionRecord)) and record.commit and record.writes:
                self._mvcc.apply_now(self.keyspace, dict(record.writes), record.commit_ts_us,
                                     sync=False)
                self.newest_write.applied(record.commit_ts_us)
                self.stats.applied += 1
            self.records.note(slot, record, self._clock.monotonic_s())
        if self._on_record is not None:
            self._on_record(record, superseded)
        return record

    def _decode(self, slot: int, data: bytes, ts_us: int) -> CommitValue | None:
        try:
            value = decode_commit_value(data)
            if value.commit_ts_us != ts_us:
                raise ProtocolError(f"commit timestamp {value.commit_ts_us} is not the entry's {ts_us}",
                                    field="commit.commit_ts_us")
            for key, _ in value.writes:
                if not self.group.contains(token_for(key)):
                    raise ProtocolError(f"key {key[:32]!r} is outside the group's range", field="key")
        except ProtocolError as exc:
            self.stats.bad_entries += 1
            log.error("group %s: slot %d holds a value that cannot be applied: %s", self.group_id,
                      slot, exc.message)
            return None
        return value

    @property
    def installing(self) -> bool:
        """Whether a snapshot's install is in flight (or failed part-way)."""
        return self._installing_through != 0

    def applied(self, slot: int) -> asyncio.Future[None]:
        """A future done once this replica has applied through ``slot`` (or stops)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.applied_through >= slot or self.stopped:
            future.set_result(None)
        else:
            self._applied_waiters.append((slot, future))
        return future

    def _wake_applied(self) -> None:
        if not self._applied_waiters:
            return
        keep = []
        for slot, future in self._applied_waiters:
            if future.done():
                continue
            if slot <= self.applied_through or self.stopped:
                future.set_result(None)
            else:
                keep.append((slot, future))
        self._applied_waiters = keep

    def _maybe_compact(self) -> None:
        replica = self.replica
        if replica is None:
            return
        floor = replica.snapshot.last_slot if replica.snapshot else 0
        if self.applied_through - floor <= self.max_log_slots:
            return
        self.stats.compactions += 1
        self._enqueue(replica.compact(self.applied_through - self.keep_log_slots, self.node_id))

    # -- snapshots ---------------------------------------------------------------------------------

    async def _install(self, snapshot: Snapshot) -> None:
        """Fetch the group's MVCC state at ``snapshot`` from a member that has it."""
        if snapshot.last_slot <= self.applied_through:
            return
        self._installing_through = snapshot.last_slot
        self.newest_write.forget()  # the pages are written past the apply path
        peers = sorted(self.known_nodes() - {self.node_id})
        sources = [snapshot.handle] if snapshot.handle in peers else []
        sources += [peer for peer in peers if peer not in sources]
        if not sources:
            raise RingKVError(f"group {self.group_id}: no member to fetch a snapshot from")
        delay_s = SNAPSHOT_RETRY_S
        for attempt in range(SNAPSHOT_ATTEMPTS):
            source = sources[attempt % len(sources)]
            try:
                threshold_us = await self._fetch_all(source, snapshot)
            except (RingKVError, OSError) as exc:
                self.stats.snapshot_failures += 1
                log.warning("group %s: snapshot through slot %d from %s failed (attempt %d): %s",
                            self.group_id, snapshot.last_slot, source, attempt + 1, exc)
                await self._clock.sleep(delay_s)
                delay_s = min(SNAPSHOT_RETRY_MAX_S, 2 * delay_s)
                if self.stopped:
                    return
                continue
            if threshold_us:
                self._mvcc.raise_gc_threshold(self.keyspace, threshold_us)
            # Synced: the store now holds the snapshot, so restart must not fetch it again.
            await self._io(self._log.set_applied, snapshot.last_slot, sync=True)
            self.applied_through = snapshot.last_slot
            self._store_ts_us = max(self._store_ts_us, snapshot.max_ts_us)
            self.newest_write.forget()  # a read begun during the install missed pages
            self.records.load(self._clock.monotonic_s())  # the snapshot's 2PC records
            self._wake_applied()
            self._installing_through = 0
            self.stats.snapshots_installed += 1
            for slot in [s for s in self._waiting if s <= snapshot.last_slot]:
                self._resolve(slot, UNKNOWN, "compacted")
            return
        raise RingKVError(f"group {self.group_id}: no member served the snapshot through slot "
                          f"{snapshot.last_slot} in {SNAPSHOT_ATTEMPTS} attempts")

    async def _fetch_all(self, source: str, snapshot: Snapshot) -> int:
        self.records.clear()  # the snapshot's own 2PC records replace them
        after: bytes | None = None
        threshold_us = 0
        while not self.stopped:  # bounded: each page moves ``after`` strictly forward
            page = await self._fetch_snapshot(
                source, SnapshotRequest(self.group_id, snapshot, after, SNAPSHOT_PAGE_ITEMS))
            previous = after
            for key, record in page.items:
                self._check_snapshot_record(key, record, previous, snapshot)
                previous = key
            if page.items:
                await self._io(self._engine.write, list(page.items), (), sync=False)
                self.newest_write.forget()
                self.stats.snapshot_records += len(page.items)
            threshold_us = max(threshold_us, page.gc_threshold_us)
            if page.resume_after is None:
                break
            if (after is not None and page.resume_after <= after) or (
                    previous is not None and page.resume_after < previous):
                raise ProtocolError("snapshot page does not move forward", field="resume_after")
            after = page.resume_after
        return threshold_us

    def _check_snapshot_record(self, key: bytes, record: bytes, previous: bytes | None,
                               snapshot: Snapshot) -> None:
        if previous is not None and key <= previous:
            raise ProtocolError("snapshot records out of order", field="items")
        if not any(lo <= key < hi for lo, hi in self._bounds):
            raise ProtocolError(f"snapshot record {key[:32]!r} is outside the group", field="items")
        if key.startswith(twopc_records.PREFIX):
            try:
                slot, _ = twopc_records.decode_value(record)
            except CorruptRecord as exc:
                raise ProtocolError(f"corrupt snapshot record: {exc.message}", field="items") from None
            if slot > snapshot.last_slot:
                raise ProtocolError("snapshot record newer than the snapshot", field="items")
            return
        try:
            _, ts_us = mvcc_keys.split_version_key(key)
            mvcc_keys.decode_record(record)
        except CorruptRecord as exc:
            raise ProtocolError(f"corrupt snapshot record: {exc.message}", field="items") from None
        if ts_us > snapshot.max_ts_us:
            raise ProtocolError("snapshot record newer than the snapshot", field="items")

    async def serve_snapshot(self, request: SnapshotRequest) -> SnapshotPage:
        """A page of this group's MVCC records at or below the snapshot's timestamp."""
        if request.group_id != self.group_id:
            raise ProtocolError(f"group {request.group_id!r} is not {self.group_id!r}", field="group_id")
        if self.stopped or self.applied_through < request.snapshot.last_slot or self._installing_through:
            raise SnapshotNotReady(
                f"{self.node_id} has applied group {self.group_id} through slot {self.applied_through}, "
                f"not {request.snapshot.last_slot}")
        return await self._io(self._snapshot_page, request)

    def _snapshot_page(self, request: SnapshotRequest) -> SnapshotPage:
        max_ts_us = request.snapshot.max_ts_us
        budget = 4 * request.limit  # records examined, newer ones included
        items: list[tuple[bytes, bytes]] = []
        last: bytes | None = None
        for lo, hi in self._bounds:
            start = lo if request.after is None else max(lo, request.after + b"\x00")
            if start >= hi:
                continue
            for key, record in self._engine.scan(start, hi, limit=budget):
                budget -= 1
                last = key
                try:
                    if key.startswith(twopc_records.PREFIX):
                        newer = twopc_records.decode_value(record)[0] > request.snapshot.last_slot
                    else:
                        newer = mvcc_keys.split_version_key(key)[1] > max_ts_us
                except CorruptRecord:
                    newer = True  # not sent; the receiver would refuse it
                if not newer:
                    items.append((key, record))
                if len(items) >= request.limit or budget <= 0:
                    return SnapshotPage(tuple(items), last, self._mvcc.gc_threshold_us(self.keyspace))
        return SnapshotPage(tuple(items), None, self._mvcc.gc_threshold_us(self.keyspace))

    # -- helpers -------------------------------------------------------------------------------------

    async def _io(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """An engine call, off the event loop when the engine may block (an fsync)."""
        if not self._engine.blocking:
            return fn(*args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(None, lambda: fn(*args, **kwargs))


def decide(txn_id: str, ts_us: int, item: Committed,
           value: CommitValue | Record | None) -> tuple[str, str]:
    """(status, reason) of the proposal of ``txn_id`` at ``ts_us``, once its slot is
    chosen as ``item`` (``value``: the chosen value decoded, None for a no-op or
    one that does not decode). A proposal lives at one slot only, so whatever
    that slot chose is final."""
    if value is None or value.txn_id != txn_id or item.entry.ts_us != ts_us:
        return ABORTED, "lost"  # a leader change filled the slot with something else
    if item.superseded:
        return ABORTED, "superseded"
    return COMMITTED, ""


def _engine_bounds(group: Range) -> list[tuple[bytes, bytes]]:
    """The MVCC engine ranges [lo, hi) of a group's tokens, in key order."""
    ks = group.keyspace
    if group.start == group.end:
        return [mvcc_keys.keyspace_bounds(ks)]
    if group.start < group.end:
        return [mvcc_keys.range_bounds(ks, group.start, group.end)]
    # Wraps past the ring's end: (start, MAX] and [MIN, end]; the second sorts first.
    return [mvcc_keys.range_bounds(ks, mvcc_keys.MIN_TOKEN - 1, group.end),
            mvcc_keys.range_bounds(ks, group.start, mvcc_keys.MAX_TOKEN)]


# Messages that carry a ballot and ask the receiver to promise, accept or vote.
_ASKS_FOR_VOTES = (Prepare, Accept, Heartbeat, Commit)


@dataclass
class RouteReport:
    delivered: int = 0
    rejected: int = 0  # malformed items (or the whole batch)
    unknown_group: int = 0


def route_batch(raw: Any, runners: Mapping[str, GroupRunner], *,
                expect_sender: str | None = None) -> RouteReport:
    """Decode a coalesced batch and step each message into its group's runner.

    A malformed envelope drops the batch, a malformed item only itself; both
    are counted, never raised (a peer that talks garbage is not fatal).
    """
    report = RouteReport()
    try:
        batch = decode_batch(raw, expect_sender=expect_sender)
    except ProtocolError as exc:
        report.rejected += 1
        log.warning("dropped a malformed Paxos batch%s: %s",
                    f" from {expect_sender}" if expect_sender else "", exc.message)
        return report
    report.rejected += len(batch.errors)
    for error in batch.errors:
        log.debug("dropped a malformed Paxos message from %s: %s", batch.sender, error.message)
    for group_id, msg in batch.items:
        runner = runners.get(group_id)
        if runner is None:
            report.unknown_group += 1
            continue
        runner.step(msg)
        report.delivered += 1
    return report
