"""``TxnService``: the transactional tier on one node (shell).

It carries out what the pure cores decide, for every transactional keyspace:

* **Clock sync.** Every ``sync_interval_ms`` the node pings each ring peer
  (verb ``txn.ping``): it sends at ``t0`` (wall clock), the peer answers with
  its wall clock at receipt and reply (``t1``, ``t2``), and ``t3`` is ``t0``
  plus the elapsed *monotonic* time, so a wall-clock step mid-ping cannot
  corrupt the sample (``txn/truetime.py``). Samples feed the one
  ``TrueTime``, whose peers are the ring's other nodes.
* **Groups.** A ``RangeMap`` per keyspace from the ring (``txn/ranges.py``),
  and a ``GroupRunner`` per range this node replicates, created lazily: on
  the first request for the range, or the first Paxos batch for it. A node
  without a record of the group first asks the range's other replicas
  (verb ``txn.group``): if one holds it, the node joins it from the
  configuration they name (as a learner when it is not in it), and it forms
  a new group with the ring's replicas only once every other replica said
  it holds none. A group's bounds and first configuration are persisted
  with it (prefix ``r``); its log says what followed. Groups are only
  formed once the ring has the keyspace's replication factor of nodes, so a
  node that has not yet heard of its peers never persists a group of one.
* **Moving with the ring** (issue #12 §5). When the ring gives a range the
  same bounds and other replicas (a node joins, decommissions, is removed
  or replaced), the group moves there through its own log: ``_reconcile``
  hands every runner the ring's replicas (``GroupRunner.move_to``) and
  whoever leads adds the new replica, once it is caught up as a learner,
  then removes the old one, one member at a time (``txn/paxos.py``,
  "Membership"). Operations go on meanwhile, served by the group's
  configuration of the moment. A removed member stops its runner once it
  has learned the removal (its record and log stay: a node added back
  resumes from them, never from nothing). Ranges are fixed slices
  (``txn/ranges.py``), so the ring never cuts one; only a change of the
  keyspace's ``ranges`` setting over data a group holds does (a split or a
  merge), and such a range is refused with 503 ``range_moving``, ``reason``
  ``split`` or ``merge``: splitting and merging groups is not built.
* **Paxos traffic.** Every group's messages go through one ``Outbox``,
  flushed once per loop turn: one coalesced one-way ``txn.paxos`` batch per
  destination; an incoming batch must come from the peer the connection
  authenticated (``expect_sender``). Snapshots travel as ``txn.snapshot``
  requests served by ``GroupRunner.serve_snapshot``.
* **Operations** (``execute``), each with the request's one deadline:
  ``txn/leader.py``'s ``route`` decides where (here, the leader over
  ``txn.op``, or wait for an election; a split or merge is refused first); at the leader,
  ``TxnManager`` takes the locks (wound-wait), ``evaluate`` decides,
  ``GroupRunner.propose_future`` commits at a timestamp ``s`` inside the
  lease, and commit wait holds the answer and the locks until
  ``TT.after(s)`` (Spanner §4.1.2). Strong reads take shared locks at the
  leader, under a live lease, once every slot it has proposed is applied.
  Snapshot reads are served by any replica whose safe time (the highest
  applied timestamp) has passed the read's timestamp; an idle leader
  proposes an empty commit every ``safe_time_interval_ms`` so safe time
  keeps moving (Spanner §4.1.3).
* **Transactions across ranges** (issue #13 §1): the node that took one runs
  it (``txn/cross_range.py``): ``tx_lock`` operations at each range's leader,
  then ``tx_commit`` at the coordinator group's leader, where
  ``txn/twopc_group.py`` runs two-phase commit over the groups; their
  messages travel one-way as ``txn.2pc`` to a group's leader (forwarded at
  most ``MAX_HOPS`` times, else dropped: the 2PC cores resend). A group's
  2PC records (``txn/twopc_records.py``) hold its replicas' safe time below
  every prepared, undecided transaction. A snapshot read at a timestamp at
  a leader reserves the timestamp (nothing commits at or below it from then
  on) instead of waiting for safe time to pass it.
* **Outcomes.** Each applied commit records its transaction id and
  timestamp (prefix ``x``, written unsynced before the group's applied
  point, like the applied versions themselves, so replay after a crash
  writes it again). ``status`` answers committed from that record, and
  "not committed" only at the leader once every slot it has proposed is
  applied: no earlier attempt of that id can be chosen after that.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import itertools
import logging
import random
import struct
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack

from ringkv.clock import Clock, Timer
from ringkv.config import TRANSACTIONAL, Config
from ringkv.errors import (
    Aborted,
    BadRequest,
    ClockUncertain,
    CrossRange,
    NoLeader,
    NotFound,
    PeerTimeout,
    PeerUnreachable,
    ProtocolError,
    RangeMoving,
    RemoteError,
    RingKVError,
    Overloaded,
    Timeout,
    BY_CODE,
)
from ringkv.ring import TokenRing
from ringkv.storage.engine import Engine
from ringkv.txn.cross_range import CrossRangeTxn
from ringkv.txn.sessions import TxnSessions
from ringkv.txn.group import (
    ABORTED,
    COMMITTED,
    REFUSED,
    GroupRunner,
    HEARTBEAT_INTERVAL_S,
)
from ringkv.txn.leader import (
    condition_failed,
    CONDITION_FAILED,
    COMMIT,
    Current,
    Retries,
    Route,
    TxnManager,
    evaluate,
    lock_plan,
    route,
)
from ringkv.txn.mvcc import MvccStore
from ringkv.txn.mvcc_gc import gc_horizon_us
from ringkv.txn.paxos_messages import (
    CommitValue,
    Outbox,
    SnapshotPage,
    SnapshotRequest,
    decode_batch,
)
from ringkv.txn.ranges import Range, RangeMap
from ringkv.txn.requests import Condition, TxnRequest, Write
from ringkv.txn.truetime import TrueTime, TTInterval, ntp_sample
from ringkv.txn.twopc import Timeouts
from ringkv.txn.twopc_group import READY, GroupLocks, TwoPCRoles
from ringkv.txn.twopc_messages import (
    CommitRequest,
    DecisionRecord,
    Message as TwoPCMessage,
    OutcomeRecord,
    Record,
    decode_message as decode_2pc,
    encode_message as encode_2pc,
)

log = logging.getLogger(__name__)

PING, PAXOS, SNAPSHOT, OP = "txn.ping", "txn.paxos", "txn.snapshot", "txn.op"
GROUP = "txn.group"  # does the peer hold a group, and from which configuration?
TWOPC = "txn.2pc"  # a two-phase commit message for a group's leader (one-way)
VERBS = frozenset({PING, PAXOS, SNAPSHOT, OP, GROUP, TWOPC})
TWOPC_TICK_S = 0.1  # the 2PC roles' timers (resends, inquiries, idle aborts) and leadership
FINISHED_TTL_S = 60.0  # 2PC outcomes remembered this long for late duplicates
# r | u8 len(group_id) | group_id -> msgpack [start, end, initial members, heard]: the
# configuration the group started from here (its log says what followed) and, for a
# node that joined a running group, the members it was told the group had then.
MEMBERS_PREFIX = b"r"
GROUP_ASK_TIMEOUT_S = 0.5  # per peer asked whether it holds a group (``_obtain``)
OUTCOME_PREFIX = b"x"  # x | u8 len(group_id) | group_id | txn_id -> u64 commit ts
# The commit timestamp below which outcome records have expired here (absent: none have).
OUTCOMES_EXPIRED_KEY = OUTCOME_PREFIX + b"\x00"  # no group id is empty: no record's key
GC_INTERVAL_MAX_S = 60.0  # a GC pass at least this often (more often when txn.mvcc_gc_s is short)
OUTCOME_BATCH = 1000  # outcome records one expiry step examines, between turns of the loop
SAFE_TIME_TXN = "~safe"  # the empty commits that advance safe time ('~' is no client id's)
PING_TIMEOUT_S = 1.0
WAIT_STEP_S = 0.005  # polling step while waiting for a leader or for applies, within the deadline
LEADER_WAIT_STEP_S = 0.05
MAX_HOPS = 2
CHANGES = "changes"  # a watch's poll: served like a snapshot read (``_changes``)
SNAPSHOT_KINDS = frozenset({"snapshot_get", CHANGES})
_TS = struct.Struct(">Q")


def _group_key(prefix: bytes, group_id: str) -> bytes:
    name = group_id.encode()
    return prefix + bytes([len(name)]) + name


@dataclass
class _Running:
    """A transaction at this leader: its future resolves "ready" or "wounded"."""

    future: asyncio.Future[str]


@dataclass
class _Group:
    runner: GroupRunner
    locks: GroupLocks = field(default_factory=GroupLocks)
    roles: TwoPCRoles | None = None  # two-phase commit while this node leads the group
    running: dict[str, _Running] = field(default_factory=dict)
    last_safe_propose_s: float = 0.0


@dataclass
class TxnFaults:
    """Where the simulator and tests watch and break the tier; production passes none.

    ``join_alone``: a node the ring makes a new replica of a range starts the
    range's group by itself, from what it holds, instead of asking the members
    for the group and joining it as a learner caught up through the log (a
    new member that elects itself alone: breaks single-key linearizability
    across a range movement).

    ``skip_commit_wait``: answer a commit once it is chosen, without waiting out
    ``TT.after(s)`` (breaks Spanner §4.1.2). ``ignore_safe_time``: serve a
    snapshot read at its timestamp at once, as if this replica's safe time had
    passed it (breaks §4.1.3). ``on_commit(commit_ts_us)``: a commit is being
    answered, after commit wait. ``on_snapshot_read(group_id, read_ts_us)``: a
    snapshot read is being served at ``read_ts_us``, in the same step as the read.

    Two-phase commit (``txn/twopc_group.py``): ``early_lock_release``: a
    participant releases its locks as soon as it votes yes, before the
    decision (breaks two-phase locking: others read and write around a
    transaction that may still commit). ``skip_prepare_log``: a participant
    votes yes without logging its prepare through Paxos (a new leader knows
    nothing of it, and replicas' safe time is not held back).
    """

    skip_commit_wait: bool = False
    ignore_safe_time: bool = False
    join_alone: bool = False
    early_lock_release: bool = False
    skip_prepare_log: bool = False
    on_commit: Callable[[int], None] | None = None
    on_snapshot_read: Callable[[str, int], None] | None = None


@dataclass(frozen=True)
class Op:
    """One transactional operation, as it travels to the leader."""

    kind: str  # get, snapshot_get, changes, txn, status
    keyspace: str
    request: TxnRequest | None = None
    key: bytes = b""
    snapshot_ts_us: int | None = None
    max_staleness_ms: int | None = None
    txn_id: str | None = None
    # A transaction across ranges, at one of its ranges (kinds tx_lock, tx_commit, tx_abort):
    priority: tuple[int, str] | None = None  # its first priority (wound-wait)
    lock_reads: tuple[bytes, ...] = ()  # tx_lock: keys to read under shared locks
    lock_writes: tuple[bytes, ...] = ()  # tx_lock: keys it will write (exclusive locks)
    first: bool = True  # tx_lock: its first operation in this range
    commit: CommitRequest | None = None  # tx_commit: for the coordinator group
    # changes (a watch's poll, ``txn/watch.py``): the committed writes in
    # (since_us, snapshot_ts_us] of ``key`` or, with ``prefix``, of every key that
    # starts with it in the range ending at ``range_end``; at most ``limit``.
    since_us: int = 0
    prefix: bool = False
    range_end: int | None = None
    limit: int = 0
    # A txn whose id this node named on arrival: it is new, so a leader here need not
    # look for an earlier commit of it. Never on the wire: a forward may be a retry.
    id_named_here: bool = False

    def to_wire(self, hops: int, timeout_s: float) -> dict[str, Any]:
        wire: dict[str, Any] = {"k": self.kind, "ks": self.keyspace, "h": hops, "t": timeout_s,
                                "key": self.key, "sts": self.snapshot_ts_us,
                                "stale": self.max_staleness_ms, "id": self.txn_id}
        if self.priority is not None:
            wire.update(pr=list(self.priority), lr=list(self.lock_reads),
                        lw=list(self.lock_writes), f=self.first)
        if self.commit is not None:
            wire["cm"] = encode_2pc(self.commit)
        if self.kind == CHANGES:
            wire["ch"] = [self.since_us, self.prefix, self.range_end, self.limit]
        if self.request is not None:
            r = self.request
            wire["req"] = {
                "id": r.txn_id, "reads": list(r.reads),
                "conds": [[c.key, c.kind, c.version_us, c.equals] for c in r.conditions],
                "writes": [[w.key, w.value] for w in r.writes],
            }
        return wire

    @staticmethod
    def from_wire(raw: Any) -> tuple[Op, int, float]:
        try:
            req = None
            if raw.get("req") is not None:
                r = raw["req"]
                req = TxnRequest(
                    raw["ks"], r["id"], tuple(bytes(k) for k in r["reads"]),
                    tuple(Condition(bytes(c[0]), str(c[1]), c[2], c[3]) for c in r["conds"]),
                    tuple(Write(bytes(w[0]), w[1]) for w in r["writes"]))
            extra: dict[str, Any] = {}
            if raw.get("pr") is not None:
                at_us, first_id = raw["pr"]
                extra.update(priority=(int(at_us), str(first_id)),
                             lock_reads=tuple(bytes(k) for k in raw["lr"]),
                             lock_writes=tuple(bytes(k) for k in raw["lw"]), first=bool(raw["f"]))
            if raw.get("cm") is not None:
                commit = decode_2pc(raw["cm"])
                if not isinstance(commit, CommitRequest):
                    raise ValueError("cm is not a commit request")
                extra["commit"] = commit
            if raw.get("ch") is not None:
                since_us, prefix, range_end, limit = raw["ch"]
                extra.update(since_us=int(since_us), prefix=bool(prefix), limit=int(limit),
                             range_end=None if range_end is None else int(range_end))
            op = Op(str(raw["k"]), str(raw["ks"]), req, bytes(raw["key"]), raw["sts"],
                    raw["stale"], raw["id"], **extra)
            return op, int(raw["h"]), float(raw["t"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ProtocolError(f"malformed transactional operation: {exc}", field="op") from None


class TxnService:
    def __init__(
        self,
        node_id: str,
        config: Config,
        *,
        clock: Clock,
        engine: Engine,
        rng: random.Random,
        ring: Callable[[], TokenRing],
        transport: Callable[[], Any],
        faults: TxnFaults | None = None,
    ) -> None:
        self.node_id = node_id
        self.faults = faults or TxnFaults()
        self.config = config
        self.keyspaces = {name: ks.replication_factor for name, ks in config.keyspaces.items()
                          if ks.tier == TRANSACTIONAL}
        self._clock = clock
        self._engine = engine
        self._rng = rng
        self._ring = ring
        self._transport = transport
        tt = config.truetime
        self.truetime = TrueTime(min_uncertainty_ms=tt.min_uncertainty_ms,
                                 max_drift_ppm=tt.max_drift_ppm,
                                 max_uncertainty_ms=tt.max_uncertainty_ms)
        self.mvcc = MvccStore(engine)
        self.outbox = Outbox(node_id)
        self._flush_scheduled = False
        self.groups: dict[str, _Group] = {}
        self._maps: dict[str, tuple[TokenRing, RangeMap]] = {}
        self._persisted: dict[str, Range] = {}  # group id -> its bounds and initial members here
        self._heard: dict[str, tuple[str, ...]] = {}  # group id -> members told of on joining
        self._obtaining: dict[str, asyncio.Future[_Group]] = {}  # asking the peers, per group
        self._retries = Retries(config.txn.max_conflict_retries)
        self._ids = itertools.count(1)
        self._ping_timer: Timer | None = None
        self._safe_timer: Timer | None = None
        self._twopc_timer: Timer | None = None
        self._gc_timer: Timer | None = None
        self._collecting = False
        self.twopc_timeouts = Timeouts(idle_timeout_s=config.txn.idle_timeout_s,
                                       finished_ttl_s=FINISHED_TTL_S)
        self._tasks: set[asyncio.Task[Any]] = set()
        self.stopped = True
        self.stats = {"commits": 0, "aborts": 0, "condition_failed": 0, "forwarded": 0,
                      "strong_reads": 0, "snapshot_reads": 0, "pings": 0, "ping_failures": 0,
                      "wounded": 0, "batches_rejected": 0, "commit_wait_us": 0,
                      "cross_range_commits": 0, "cross_range_aborts": 0, "twopc_rejected": 0,
                      "read_only_txns": 0, "gc_versions_deleted": 0, "outcomes_expired": 0,
                      "watch_polls": 0, "watch_polls_unread": 0, "watches_open": 0,
                      "watchers_too_slow": 0}
        self._cross = CrossRangeTxn(self._execute_at, clock=clock,
                                    max_retries=config.txn.max_conflict_retries,
                                    spawn=self._spawn, stats=self.stats,
                                    now_latest_us=lambda: self._fenced_now().latest_us,
                                    rng=random.Random(rng.getrandbits(64)))
        self.sessions = TxnSessions(clock=clock, execute=self._execute_at, range_map=self.range_map,
                                    now_latest_us=lambda: self._fenced_now().latest_us,
                                    new_id=self.new_txn_id, spawn=self._spawn,
                                    idle_timeout_s=config.txn.idle_timeout_s,
                                    max_duration_s=config.txn.max_duration_s)
        # Set by the lease service: it runs a transaction whose puts name a lease,
        # after adding the lease records' conditions and writes (txn/lease_service.py).
        self.lease_writes: Callable[[TxnRequest, float, float],
                                    Awaitable[dict[str, Any]]] | None = None
        # Set by the node's watch hub (server/watch_hub.py): told, as a group applies
        # entries here, (keyspace, range end, the newest commit timestamp whose writes
        # they applied or 0, this replica's safe time), so a shared poll runs at once.
        self.on_applied: Callable[[str, int, int, int], None] | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.keyspaces)

    # -- life cycle ------------------------------------------------------------------------

    def start(self) -> None:
        if not self.enabled or not self.stopped:
            return
        self.stopped = False
        for raw_key, raw in self._engine.scan(MEMBERS_PREFIX, MEMBERS_PREFIX + b"\xff"):
            try:
                name_len = raw_key[1]
                group_id = raw_key[2:2 + name_len].decode()
                start, end, replicas, *rest = msgpack.unpackb(raw, raw=False)
                keyspace = group_id.rsplit("/", 1)[0]
                self._persisted[group_id] = Range(keyspace, int(start), int(end), tuple(replicas))
                if rest:
                    self._heard[group_id] = tuple(rest[0])
            except (ValueError, IndexError, TypeError, UnicodeDecodeError) as exc:
                log.error("unreadable group membership record %r: %s", raw_key[:64], exc)
        self._schedule_ping(0.0)
        interval_s = self.config.txn.safe_time_interval_ms / 1000
        self._safe_timer = self._clock.call_later(interval_s, self._safe_time_tick)
        self._twopc_timer = self._clock.call_later(TWOPC_TICK_S, self._twopc_tick)
        self._gc_timer = self._clock.call_later(self._gc_interval_s(), self._gc_tick)

    def stop(self) -> None:
        self.stopped = True
        for timer in (self._ping_timer, self._safe_timer, self._twopc_timer, self._gc_timer):
            if timer is not None:
                timer.cancel()
        for group in self.groups.values():
            if group.roles is not None:
                group.roles.stop()
            group.runner.stop()
        for task in list(self._tasks):
            task.cancel()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- clock sync ------------------------------------------------------------------------

    def _peers(self) -> list[str]:
        return [n for n in self._ring().node_ids if n != self.node_id]

    def _schedule_ping(self, delay_s: float) -> None:
        if not self.stopped:
            self._ping_timer = self._clock.call_later(delay_s, self._ping_round)

    def _ping_round(self) -> None:
        if self.stopped:
            return
        self._schedule_ping(self.config.truetime.sync_interval_ms / 1000)
        peers = self._peers()
        self.truetime.set_peers(peers)
        if self._transport() is None:
            return
        for peer in peers:
            self._spawn(self._ping(peer))

    async def _ping(self, peer: str) -> None:
        transport = self._transport()
        t0_us = self._clock.wall_us()
        m0_s = self._clock.monotonic_s()
        try:
            answer = await transport.request(peer, PING, {"t0": t0_us}, PING_TIMEOUT_S)
            t1_us, t2_us = int(answer["t1"]), int(answer["t2"])
        except (RingKVError, OSError, KeyError, TypeError, ValueError):
            self.stats["ping_failures"] += 1
            return
        m3_s = self._clock.monotonic_s()
        t3_us = t0_us + int((m3_s - m0_s) * 1_000_000)
        try:
            sample = ntp_sample(t0_us, t1_us, t2_us, t3_us)
        except ValueError:
            self.stats["ping_failures"] += 1
            return
        self.truetime.record(peer, sample, m3_s)
        self.stats["pings"] += 1

    def clock_status(self) -> dict[str, Any]:
        status = self.truetime.status(self._clock.wall_us(), self._clock.monotonic_s())
        out = status.to_json()
        out["fenced"] = status.uncertain
        if status.uncertain:
            out["why"] = status.reason
        return out

    def _fence(self) -> int:
        """ε in µs, or ClockUncertain (503 clock_uncertain) while TrueTime fences this node."""
        return self._fenced_now().epsilon_us

    def _fenced_now(self) -> TTInterval:
        """``TT.now()``, or ClockUncertain while TrueTime fences this node. Each call
        combines every peer's samples (Marzullo): a request asks once and passes it on."""
        status = self.truetime.check(self._clock.wall_us(), self._clock.monotonic_s())
        if status.interval is None:  # check() raises first; this keeps the type checker sure
            raise status.error()
        return status.interval

    def tt_now(self) -> TTInterval:
        """``TT.now()`` (ClockUncertain while TrueTime fences this node)."""
        return self._fenced_now()

    def leads(self, keyspace: str, key: bytes) -> bool:
        """This node leads the range of ``key`` now (with a live Paxos lease)."""
        group = self.groups.get(self.range_of(keyspace, [key]).group_id)
        return group is not None and group.runner.is_leader()

    # -- groups ----------------------------------------------------------------------------

    def range_map(self, keyspace: str) -> RangeMap:
        ring = self._ring()
        cached = self._maps.get(keyspace)
        if cached is not None and cached[0] is ring:
            return cached[1]
        rf = self.keyspaces[keyspace]
        if len(ring) < rf:
            raise NoLeader(f"the ring has {len(ring)} nodes, fewer than keyspace {keyspace!r}'s "
                           f"replication_factor {rf}: its Paxos groups are not formed yet",
                           reason="ring_too_small")
        ranges = RangeMap(keyspace, ring, rf, self.config.keyspaces[keyspace].ranges)
        self._maps[keyspace] = (ring, ranges)
        return ranges

    def _refusal(self, rng: Range) -> RangeMoving | None:
        """Why ``rng`` cannot be served here: a group persisted here covers part of it
        with other bounds (the keyspace's ``ranges`` changed: a split or a merge,
        which is not built). A group with the same bounds and other replicas moves."""
        for old in self._persisted.values():
            if old.keyspace != rng.keyspace or (old.start, old.end) == (rng.start, rng.end):
                continue
            if old.contains(rng.end) or rng.contains(old.end):
                return _split_or_merge(rng, old)
        return None

    def _ensure(self, rng: Range, *, initial: Sequence[str] | None = None,
                heard: Sequence[str] = ()) -> _Group:
        """The group of ``rng`` on this node, started from its persisted record, or
        else formed from ``initial`` (default: the ring's replicas, a new group)."""
        group = self.groups.get(rng.group_id)
        if group is not None:
            return group
        refusal = self._refusal(rng)
        if refusal is not None:
            raise refusal
        record = self._persisted.get(rng.group_id)
        if record is None:
            members = tuple(rng.replicas if initial is None else initial)
            value = [rng.start, rng.end, list(members)] + ([list(heard)] if heard else [])
            self._engine.write([(_group_key(MEMBERS_PREFIX, rng.group_id),
                                 msgpack.packb(value, use_bin_type=True))], (), sync=True)
            record = self._persisted[rng.group_id] = Range(rng.keyspace, rng.start, rng.end, members)
            if heard:
                self._heard[rng.group_id] = tuple(heard)
        lease_s = self.config.txn.lease_s
        runner = GroupRunner(
            self.node_id, rng, engine=self._engine, mvcc=self.mvcc, clock=self._clock,
            truetime=self.truetime, send=self._send, fetch_snapshot=self._fetch_snapshot,
            rng=random.Random(self._rng.getrandbits(64)), lease_s=lease_s,
            heartbeat_interval_s=min(HEARTBEAT_INTERVAL_S, lease_s / 4),
            tick_interval_s=min(HEARTBEAT_INTERVAL_S, lease_s / 4) / 4,
            max_drift_ppm=self.config.truetime.max_drift_ppm,
            on_apply=functools.partial(self._record_outcome, rng.group_id),
            on_record=functools.partial(self._on_record, rng.group_id),
            on_applied=functools.partial(self._applied, rng.group_id),
            finished_ttl_s=FINISHED_TTL_S,
            members=record.replicas, heard=self._heard.get(rng.group_id, ()),
        )
        group = _Group(runner)
        group.roles = TwoPCRoles(runner, group.locks, mvcc=self.mvcc, clock=self._clock,
                                 truetime=self.truetime, send=self._send_2pc,
                                 caught_up=self._caught_up, timeouts=self.twopc_timeouts,
                                 faults=self.faults)
        self.groups[rng.group_id] = group
        runner.start()
        log.info("group %s started on %s (replicas %s, configuration %s)", rng.group_id,
                 self.node_id, ", ".join(rng.replicas), ", ".join(sorted(runner.members)))
        return group

    async def _obtain(self, rng: Range) -> _Group:
        """The group of ``rng``, for a replica the ring names: its own, or else the
        one the other replicas hold (joined as a learner from the configuration they
        name), or else a new group once a majority of the ring's replicas (this
        one included) hold no record of it and none answered that it holds it.

        A node the ring makes a new replica of a running group must never start
        that group by itself with the ring's replicas as its configuration, one
        the group never had: it could win a phase 1 among them that misses what
        the group chose."""
        group = self.groups.get(rng.group_id)
        if group is not None or rng.group_id in self._persisted or self.faults.join_alone:
            initial = (self.node_id,) if self.faults.join_alone else None
            return group or self._ensure(rng, initial=initial)
        refusal = self._refusal(rng)
        if refusal is not None:
            raise refusal
        pending = self._obtaining.get(rng.group_id)
        if pending is None:
            pending = asyncio.get_running_loop().create_future()
            self._obtaining[rng.group_id] = pending
            self._spawn(self._ask_peers(rng, pending))
        return await asyncio.shield(pending)

    async def _ask_peers(self, rng: Range, result: asyncio.Future[_Group]) -> None:
        try:
            peers = [n for n in rng.replicas if n != self.node_id]
            answers = await asyncio.gather(*(self._ask(peer, rng) for peer in peers))
            held = [a for a in answers if a is not None and a.get("has")]
            if held:
                answer = held[0]
                for other in held:
                    if (int(other["start"]), int(other["end"])) != (rng.start, rng.end):
                        raise _split_or_merge(rng, Range(rng.keyspace, int(other["start"]),
                                                         int(other["end"]), ()))
                # Every holder started from the same first configuration (by induction:
                # the group's founders, or one that joined this way); whom to hear is
                # what any of them knows of the configuration now.
                heard = sorted({str(n) for other in held for n in other["members"]})
                group = self._ensure(rng, initial=[str(n) for n in answer["initial"]],
                                     heard=heard)
            elif any(a is not None and a.get("overlap") for a in answers):
                raise RangeMoving(f"range {rng.group_id} is being cut differently by the ring; "
                                  "moving a group across a split or merge is not built",
                                  range=rng.group_id, reason="split_or_merge")
            elif 1 + sum(a is not None for a in answers) <= len(rng.replicas) // 2:
                raise NoLeader(f"range {rng.group_id}: too few replicas answered whether they "
                               "hold its group", range=rng.group_id, reason="no_leader")
            else:
                # A majority holds no record: a new group. A member of a running group
                # holds a record from the first message it heard, and a move changes one
                # replica at a time, so the members that stay hold one: this errs only if
                # one of them is down now and the other never heard from its group.
                group = self._ensure(rng)
            if not result.done():
                result.set_result(group)
        except Exception as exc:  # noqa: BLE001 - handed to every waiter
            if not result.done():
                result.set_exception(exc)
                result.exception()  # retrieved here too: no waiter is a fine outcome
        finally:
            self._obtaining.pop(rng.group_id, None)

    async def _ask(self, peer: str, rng: Range) -> dict[str, Any] | None:
        transport = self._transport()
        if transport is None:
            return None
        try:
            answer = await transport.request(
                peer, GROUP, {"g": rng.group_id, "s": rng.start, "e": rng.end},
                GROUP_ASK_TIMEOUT_S)
        except (RingKVError, OSError):
            return None
        return answer if isinstance(answer, dict) else None

    def _group_answer(self, payload: Any) -> dict[str, Any]:
        """What this node holds of the group a peer asks about (``_obtain``)."""
        try:
            group_id, start, end = str(payload["g"]), int(payload["s"]), int(payload["e"])
        except (KeyError, TypeError, ValueError):
            raise ProtocolError("malformed group question", field="g") from None
        record = self._persisted.get(group_id)
        if record is not None:
            group = self.groups.get(group_id)
            members = group.runner.members if group is not None else frozenset(record.replicas)
            return {"has": True, "start": record.start, "end": record.end,
                    "initial": list(record.replicas), "members": sorted(members)}
        keyspace = group_id.rsplit("/", 1)[0]
        overlap = self._refusal(Range(keyspace, start, end, ()))
        return {"has": False, "overlap": overlap is not None}

    def _reconcile(self) -> None:
        """Each group follows the ring: one whose range keeps its bounds and has other
        replicas moves there through its own log (``GroupRunner.move_to``, carried
        out by whoever leads); a runner its group removed stops (its record and log
        stay, so a node added back later resumes from them, never from nothing)."""
        maps: dict[str, dict[str, Range]] = {}
        for group_id, group in list(self.groups.items()):
            runner = group.runner
            if runner.removed and self.node_id not in runner.group.replicas:
                if group.roles is not None:
                    group.roles.stop()
                runner.stop()
                del self.groups[group_id]
                log.info("group %s: %s was removed from it; stopped", group_id, self.node_id)
                continue
            keyspace = runner.keyspace
            if keyspace not in maps:
                try:
                    maps[keyspace] = {r.group_id: r for r in self.range_map(keyspace).ranges}
                except RingKVError:
                    maps[keyspace] = {}
            rng = maps[keyspace].get(group_id)
            if rng is None or (rng.start, rng.end) != (runner.group.start, runner.group.end):
                continue  # cut differently: refused (``_refusal``)
            if set(rng.replicas) != set(runner.group.replicas) or rng.replicas != runner.group.replicas:
                if set(rng.replicas) != set(runner.group.replicas):
                    log.info("group %s moves from %s to %s", group_id,
                             ", ".join(sorted(runner.members)), ", ".join(rng.replicas))
                runner.move_to(rng)

    def _record_outcome(self, group_id: str, value: CommitValue) -> None:
        if value.txn_id.startswith("~"):
            return
        key = _group_key(OUTCOME_PREFIX, group_id) + value.txn_id.encode()
        self._engine.write([(key, _TS.pack(value.commit_ts_us))], (), sync=False)

    def _applied(self, group_id: str, written_us: int) -> None:
        group = self.groups.get(group_id)
        if self.on_applied is None or group is None:
            return
        runner = group.runner
        self.on_applied(runner.keyspace, runner.group.end, written_us, runner.applied_ts_us)

    def _on_record(self, group_id: str, record: Record, superseded: bool) -> None:
        """A group applied a 2PC record: a commit's outcome is kept like a one-range
        commit's (``status``), and the leader's roles hear of it."""
        if not superseded and isinstance(record, (DecisionRecord, OutcomeRecord)) and record.commit:
            # Under the transaction's id, not its attempt's (txn/cross_range.py).
            txn_id = record.txn_id.split("~", 1)[0]
            key = _group_key(OUTCOME_PREFIX, group_id) + txn_id.encode()
            self._engine.write([(key, _TS.pack(record.commit_ts_us))], (), sync=False)
        group = self.groups.get(group_id)
        if group is not None and group.roles is not None:
            group.roles.on_record(record, superseded)

    def _twopc_tick(self) -> None:
        if self.stopped:
            return
        self._twopc_timer = self._clock.call_later(TWOPC_TICK_S, self._twopc_tick)
        now_s = self._clock.monotonic_s()
        for group in list(self.groups.values()):
            if group.roles is not None:
                group.roles.tick()
            group.runner.records.expire(now_s)
        self.sessions.expire()

    # -- garbage collection ----------------------------------------------------------------

    def _gc_interval_s(self) -> float:
        return min(GC_INTERVAL_MAX_S, max(1.0, self.config.txn.mvcc_gc_s / 4))

    def _gc_tick(self) -> None:
        if self.stopped:
            return
        self._gc_timer = self._clock.call_later(self._gc_interval_s(), self._gc_tick)
        if not self._collecting:  # a pass still going (a large keyspace) is not doubled
            self._collecting = True
            self._spawn(self._collect())

    async def _collect(self) -> None:
        """One pass of MVCC garbage collection over every transactional keyspace,
        then of the expired outcome records, in bounded steps between loop turns.

        Versions stay readable for ``txn.mvcc_gc_s`` of true time (CockroachDB's
        ``gc.ttlseconds``), and longer for a snapshot still in use here: an open
        read-only transaction's, or a prepared transaction's (it may still commit
        at its prepare timestamp, §4.2.1). A read below what was collected is
        refused by name (``MvccStore.read``), never answered from a thinned history.
        """
        try:
            try:
                earliest_us = self._fenced_now().earliest_us  # true time is at least this
            except RingKVError:
                return  # no trusted clock: nothing is collected until there is one
            held = self.sessions.snapshot_timestamps_us()
            for group in self.groups.values():
                bound = group.runner.records.safe_time_bound()
                if bound is not None:
                    held.append(bound)
            horizon_us = gc_horizon_us(earliest_us, held, mvcc_gc_s=self.config.txn.mvcc_gc_s)
            for keyspace in self.keyspaces:
                while not self.stopped:
                    result = self.mvcc.gc(keyspace, horizon_us)
                    self.stats["gc_versions_deleted"] += result.deleted
                    if not result.more:
                        break
                    await self._clock.sleep(0)
            await self._expire_outcomes(
                earliest_us - self.config.txn.outcome_retention_s * 1_000_000)
        finally:
            self._collecting = False

    async def _expire_outcomes(self, before_us: int) -> None:
        """Drop the outcome records of transactions committed before ``before_us``:
        like idempotency keys, they answer a retry only for so long."""
        start, end = OUTCOMES_EXPIRED_KEY + b"\x00", OUTCOME_PREFIX + b"\xff"
        while not self.stopped:
            batch = list(self._engine.scan(start, end, limit=OUTCOME_BATCH))
            expired = []
            for key, raw in batch:
                try:
                    committed_us = _TS.unpack(raw)[0]
                except struct.error:
                    committed_us = 0  # unreadable: nothing can be answered from it
                if committed_us < before_us:
                    expired.append(key)
            if expired:
                # Said in the same batch: no status answer claims "never committed" for
                # a transaction whose record is gone (``_status``).
                marker = [(OUTCOMES_EXPIRED_KEY, _TS.pack(before_us))]
                self._engine.write(marker, expired, sync=False)  # lost: kept a while longer
                self.stats["outcomes_expired"] += len(expired)
            if len(batch) < OUTCOME_BATCH:
                return
            start = batch[-1][0] + b"\x00"
            await self._clock.sleep(0)

    def _send_2pc(self, group_id: str, msg: TwoPCMessage, hops: int = 0) -> None:
        """To the leader of ``group_id``: here at once (next loop turn), or the leader
        this node last heard of, or else a replica of the range (which forwards)."""
        group = self.groups.get(group_id)
        if group is not None and group.roles is not None and group.roles.active:
            asyncio.get_running_loop().call_soon(group.roles.step, msg)
            return
        transport = self._transport()
        if transport is None or hops > MAX_HOPS:
            return
        target = group.runner.leader() if group is not None else None
        if target is None or target == self.node_id:
            rng = self._range_by_id(group_id)
            others = [] if rng is None else [n for n in rng.replicas if n != self.node_id]
            if not others:
                return  # dropped: the sender resends
            target = others[hops % len(others)]
        transport.send_oneway(target, TWOPC, {"g": group_id, "m": encode_2pc(msg), "h": hops})

    def _on_2pc(self, from_node: str, payload: Any) -> None:
        try:
            group_id, hops = str(payload["g"]), int(payload["h"])
            msg = decode_2pc(payload["m"])
        except (KeyError, TypeError, ValueError, ProtocolError) as exc:
            self.stats["twopc_rejected"] += 1
            log.debug("dropped a malformed 2PC message from %s: %s", from_node, exc)
            return
        group = self.groups.get(group_id)
        if group is not None and group.roles is not None and group.roles.active:
            group.roles.step(msg)
            return
        if group is None:
            self._group_for_id(group_id)  # a replica that has not started it yet
        self._send_2pc(group_id, msg, hops + 1)  # on to the group's leader

    def _range_by_id(self, group_id: str) -> Range | None:
        keyspace = group_id.rsplit("/", 1)[0]
        if keyspace not in self.keyspaces:
            return None
        try:
            return next((r for r in self.range_map(keyspace).ranges if r.group_id == group_id), None)
        except RingKVError:
            return None

    def _committed_ts(self, group_id: str, txn_id: str) -> int | None:
        raw = self._engine.get(_group_key(OUTCOME_PREFIX, group_id) + txn_id.encode())
        return None if raw is None else int(_TS.unpack(raw)[0])

    def _send(self, to: str, group_id: str, msg: Any) -> None:
        self.outbox.add(to, group_id, msg)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        transport = self._transport()
        for to, batches in self.outbox.take().items():
            if transport is None:
                continue
            for batch in batches:
                transport.send_oneway(to, PAXOS, batch)

    async def _fetch_snapshot(self, node_id: str, request: Any) -> Any:
        transport = self._transport()
        if transport is None:
            raise PeerUnreachable("no transport", node_id=node_id)
        raw = await transport.request(node_id, SNAPSHOT, request.to_wire(), 10.0)
        return SnapshotPage.from_wire(raw)

    def _safe_time_tick(self) -> None:
        """Idle leaders propose an empty commit so followers' safe time moves (§4.1.3)."""
        if self.stopped:
            return
        interval_s = self.config.txn.safe_time_interval_ms / 1000
        self._safe_timer = self._clock.call_later(interval_s, self._safe_time_tick)
        self._reconcile()
        now_s = self._clock.monotonic_s()
        for group in self.groups.values():
            runner = group.runner
            if not runner.is_leader() or now_s - group.last_safe_propose_s < interval_s:
                continue
            try:
                interval = self.truetime.now(self._clock.wall_us(), now_s)
            except ClockUncertain:
                return
            if interval.earliest_us - runner.applied_ts_us < interval_s * 1_000_000:
                continue  # commits keep it moving
            group.last_safe_propose_s = now_s
            runner.propose_future(SAFE_TIME_TXN, ())

    # -- the internode verbs ------------------------------------------------------------------

    async def handle(self, from_node: str, verb: str, payload: Any) -> Any:
        if verb == PING:
            now_us = self._clock.wall_us()
            return {"t1": now_us, "t2": self._clock.wall_us()}
        if not self.enabled:
            raise ProtocolError(f"this node serves no transactional keyspace ({verb!r})")
        if verb == PAXOS:
            self._on_batch(from_node, payload)
            return None
        if verb == GROUP:
            return self._group_answer(payload)
        if verb == TWOPC:
            self._on_2pc(from_node, payload)
            return None
        if verb == SNAPSHOT:
            request = SnapshotRequest.from_wire(payload)
            group = self.groups.get(request.group_id)
            if group is None:
                raise NotFound(f"group {request.group_id!r} does not run here")
            return (await group.runner.serve_snapshot(request)).to_wire()
        if verb == OP:
            op, hops, timeout_s = Op.from_wire(payload)
            started_s = self._clock.monotonic_s()
            return await self.execute(op, started_s=started_s, timeout_s=min(timeout_s, 60.0),
                                      hops=hops)
        raise ProtocolError(f"unknown verb {verb!r}")

    def _on_batch(self, from_node: str, raw: Any) -> None:
        try:
            batch = decode_batch(raw, expect_sender=from_node)
        except ProtocolError as exc:
            self.stats["batches_rejected"] += 1
            log.warning("dropped a malformed Paxos batch from %s: %s", from_node, exc.message)
            return
        for group_id, msg in batch.items:
            group = self.groups.get(group_id)
            if group is None:
                group = self._group_for_id(group_id)
                if group is None:
                    continue
            group.runner.step(msg)

    def _group_for_id(self, group_id: str) -> _Group | None:
        """The group a Paxos message names, if this node is one of its ring replicas:
        started from its record at once; else asked for (``_obtain``), and this
        message dropped (the sender repeats itself)."""
        keyspace = group_id.rsplit("/", 1)[0]
        if keyspace not in self.keyspaces:
            return None
        try:
            ranges = self.range_map(keyspace)
        except RingKVError:
            return None
        for rng in ranges.groups_of(self.node_id):
            if rng.group_id != group_id:
                continue
            if group_id in self._persisted:
                try:
                    return self._ensure(rng)
                except RingKVError:
                    return None
            if group_id not in self._obtaining:
                self._spawn(self._obtain_quietly(rng))
        return None

    async def _obtain_quietly(self, rng: Range) -> None:
        try:
            await self._obtain(rng)
        except RingKVError as exc:
            log.debug("group %s not obtained on %s: %s", rng.group_id, self.node_id, exc)

    # -- operations ---------------------------------------------------------------------------

    def new_txn_id(self) -> str:
        return f"{self.node_id}:{next(self._ids)}:{self._rng.getrandbits(32):08x}"

    async def _execute_at(self, kind: str, keyspace: str, key: bytes, fields: dict[str, Any],
                          deadline_s: float, *, missing_ok: bool = False) -> dict[str, Any]:
        """One operation of a transaction across ranges, at the leader of ``key``'s
        range (a snapshot read: at a replica that can serve it). ``missing_ok``: a key
        that holds nothing answers ``{}`` instead of raising NotFound."""
        started_s = self._clock.monotonic_s()
        try:
            return await self.execute(Op(kind, keyspace, key=key, **fields), started_s=started_s,
                                      timeout_s=max(0.001, deadline_s - started_s))
        except NotFound as exc:
            if not missing_ok or "receipt" not in exc.details:
                raise
            return {}

    def range_of(self, keyspace: str, keys: Sequence[bytes], *, field: str = "keys") -> Range:
        grouped = self.range_map(keyspace).by_range(keys)
        if len(grouped) > 1:
            names = {r.group_id: [k.decode(errors="replace") for k in ks] for r, ks in grouped.items()}
            raise CrossRange(f"the keys fall in more than one range: {names}", field=field,
                             keys=names)
        return next(iter(grouped))

    async def execute(self, op: Op, *, started_s: float, timeout_s: float,
                      hops: int = 0) -> dict[str, Any]:
        """Serve ``op`` here or where ``route`` says, within the one deadline."""
        if op.keyspace not in self.keyspaces:
            raise NotFound(f"keyspace {op.keyspace!r} is not transactional", keyspace=op.keyspace)
        deadline_s = started_s + timeout_s
        if (op.kind == "txn" and op.request is not None
                and any(w.lease is not None for w in op.request.writes)):
            if self.lease_writes is None or hops:
                raise BadRequest("this node attaches no keys to leases", field="writes")
            return await self.lease_writes(op.request, started_s, timeout_s)
        now = self._fenced_now()
        if op.kind == "txn" and op.request is not None and hops == 0:
            txn_id = op.request.txn_id or self.new_txn_id()
            grouped = self.range_map(op.keyspace).by_range(op.request.keys())
            if len(grouped) > 1:
                # Run from here, never forwarded: an id named here is new, and only a
                # client's own id may name an earlier attempt worth looking up.
                return await self._cross.run(op.request, txn_id, grouped, deadline_s)
            if op.request.txn_id is None:
                # Named once, where it arrived: a forward retried after a timeout carries
                # the same id, so a leader that already committed it answers that commit
                # instead of committing it a second time.
                op = dataclasses.replace(op, id_named_here=True, request=dataclasses.replace(
                    op.request, txn_id=txn_id))
        keys = [op.key] if op.request is None else op.request.keys()
        if op.kind == CHANGES and op.prefix:
            rng = self._range_ending(op.keyspace, op.range_end)
        else:
            rng = self.range_of(op.keyspace, keys)
        snapshot = op.kind in SNAPSHOT_KINDS
        failed: set[str] = set()
        # A write forwarded and never answered (a timeout, or our own attempt still
        # running at the leader) may have committed: at the deadline its outcome is
        # unknown, a 504, never the 503 that says nothing was done.
        unanswered_by: str | None = None
        while True:
            refusal = self._refusal(rng)
            if refusal is not None:
                raise refusal
            group = self.groups.get(rng.group_id)
            if group is None and self.node_id in rng.replicas:
                try:
                    group = await self._obtain(rng)
                except NoLeader:
                    group = None  # a replica did not answer: wait and ask again
            runner = None if group is None else group.runner
            # While the group moves, its configuration serves: the ring's replicas
            # first (replicas[0] is where an outsider forwards), then the members
            # on their way out, who may still lead.
            serving = tuple(rng.replicas)
            if runner is not None:
                serving += tuple(sorted(runner.members - set(rng.replicas)))
            member = self.node_id in serving
            decision = route(
                self.node_id, serving, persisted=None,
                leads=runner is not None and runner.is_leader(),
                leader_hint=None if runner is None else runner.leader(),
                snapshot_ready=runner is not None and self._snapshot_ready(runner, op, now),
                snapshot_read=snapshot, hops=hops, max_hops=MAX_HOPS)
            if decision.route is Route.LOCAL:
                assert group is not None
                return await self._serve(group, rng, op, deadline_s, now)
            remaining_s = deadline_s - self._clock.monotonic_s()
            target = decision.target
            if target is not None and not member and target in failed:
                # An outsider tries the other members in turn (the first may be down).
                target = next((r for r in serving if r not in failed), target)
            if decision.route is Route.FORWARD and target is not None and remaining_s > 0:
                if op.id_named_here:  # once sent, a later attempt here may be a retry
                    op = dataclasses.replace(op, id_named_here=False)
                try:
                    return await self._forward(target, op, hops + 1, remaining_s)
                except (NoLeader, PeerUnreachable, PeerTimeout, Overloaded) as exc:
                    if hops > 0:
                        raise
                    if isinstance(exc, PeerTimeout):
                        unanswered_by = target
                    failed.add(target)
                    if len(failed) >= len(serving):
                        failed.clear()
                    log.debug("forward to %s failed: %s", target, exc)
                except Aborted as exc:
                    # Our own earlier attempt of this transaction still runs at the leader
                    # (its answer was lost to a timeout): it is no refusal, and its outcome
                    # is known once it ends; ask again until the deadline.
                    if hops > 0 or exc.details.get("reason") != "in_progress":
                        raise
                    unanswered_by = target
                    log.debug("transaction still running at %s: %s", target, exc)
            elif hops > 0 and not member:
                raise NoLeader(f"range {rng.group_id} has no leader here", range=rng.group_id)
            if hops > 0 and decision.route is Route.WAIT:
                raise NoLeader(f"{self.node_id} does not lead range {rng.group_id}",
                               range=rng.group_id)
            if self._clock.monotonic_s() + LEADER_WAIT_STEP_S >= deadline_s:
                if unanswered_by is not None and op.request is not None and op.request.writes:
                    named = op.request.txn_id
                    raise Timeout(
                        f"transaction {named}'s outcome is not known: {unanswered_by}, where it "
                        f"was sent, did not answer within the deadline ({timeout_s:.3f} s); ask "
                        f"GET /v1/txn/{named}", consistency="SERIAL", received=0, required=1,
                        write=True)
                raise NoLeader(f"range {rng.group_id} has no leader within the deadline "
                               f"({timeout_s:.3f} s)", range=rng.group_id, reason="no_leader")
            await self._clock.sleep(LEADER_WAIT_STEP_S)
            now = self.truetime.now(self._clock.wall_us(), self._clock.monotonic_s())

    async def _forward(self, target: str, op: Op, hops: int, remaining_s: float) -> dict[str, Any]:
        transport = self._transport()
        if transport is None:
            raise PeerUnreachable("no transport", node_id=target)
        self.stats["forwarded"] += 1
        try:
            answer = await transport.request(target, OP, op.to_wire(hops, remaining_s), remaining_s)
        except RemoteError as exc:
            raise _rebuild(exc) from None
        if not isinstance(answer, dict):
            raise ProtocolError("malformed answer to a transactional operation", field="answer")
        return answer

    def _range_ending(self, keyspace: str, end: int | None) -> Range:
        for rng in self.range_map(keyspace).ranges:
            if rng.end == end:
                return rng
        raise ProtocolError(f"keyspace {keyspace!r} has no range ending at {end}",
                            field="range_end")

    def _snapshot_ready(self, runner: GroupRunner, op: Op, now: TTInterval) -> bool:
        if op.kind not in SNAPSHOT_KINDS:
            return False
        return self.faults.ignore_safe_time or runner.applied_ts_us >= self._snapshot_ts(op, now)

    @staticmethod
    def _snapshot_ts(op: Op, now: TTInterval) -> int:
        """The timestamp a snapshot read must see: its own, or ``TT.now()`` minus its staleness."""
        if op.snapshot_ts_us is not None:
            return op.snapshot_ts_us
        staleness_us = (op.max_staleness_ms or 0) * 1000
        return now.latest_us - staleness_us

    async def _serve(self, group: _Group, rng: Range, op: Op, deadline_s: float,
                     now: TTInterval) -> dict[str, Any]:
        if op.kind == "snapshot_get":
            return await self._snapshot_get(group, op, deadline_s, now)
        if op.kind == CHANGES:
            return await self._changes(group, rng, op, deadline_s, now)
        if op.kind == "status":
            assert op.txn_id is not None
            return await self._status(group, op.txn_id, deadline_s)
        if op.kind in ("tx_lock", "tx_commit", "tx_abort"):
            return await self._serve_cross(group, op, deadline_s)
        if group.roles is not None:
            # A new leader takes no lock before its 2PC roles have recovered: until
            # then the lock table lacks the locks of transactions prepared here,
            # and a read could miss one that committed in its other ranges.
            await group.roles.until_active(deadline_s)
        if op.kind == "get":
            request = TxnRequest(op.keyspace, None, (op.key,), (), ())
            answer = await self._run(group, rng, request, deadline_s)
            self.stats["strong_reads"] += 1
            return answer
        assert op.request is not None
        return await self._run(group, rng, op.request, deadline_s,
                               may_be_retry=not op.id_named_here)

    async def _serve_cross(self, group: _Group, op: Op, deadline_s: float) -> dict[str, Any]:
        """An operation of a transaction across ranges, at this range's leader."""
        roles = group.roles
        if roles is None or not op.txn_id:
            raise ProtocolError(f"{op.kind} names no transaction", field="id")
        if op.kind == "tx_abort":
            roles.abort(op.txn_id)
            return {"ok": True}
        if op.kind == "tx_lock":
            if op.priority is None:
                raise ProtocolError("tx_lock carries no priority", field="pr")
            reads = await roles.lock_and_read(op.txn_id, op.priority, op.lock_reads,
                                              op.lock_writes, first=op.first,
                                              deadline_s=deadline_s)
            return {"reads": [[key, cur.value, cur.version_us] for key, cur in reads],
                    "leader": self.node_id}
        if op.commit is None or op.commit.txn_id != op.txn_id:
            raise ProtocolError("tx_commit carries no commit request for its transaction",
                                field="cm")
        outcome = await roles.commit(op.commit, deadline_s)
        if outcome is None:
            raise Timeout(f"transaction {op.txn_id}'s outcome is not known yet (its coordinator, "
                          f"range {group.runner.group_id}, did not decide in time); ask "
                          f"GET /v1/txn/{op.txn_id}", consistency="SERIAL", received=0,
                          required=1, write=True)
        committed, commit_ts = outcome
        return {"committed": committed, "commit_ts": commit_ts if committed else None,
                "coordinator": group.runner.group_id}

    async def _snapshot_get(self, group: _Group, op: Op, deadline_s: float,
                            now: TTInterval) -> dict[str, Any]:
        runner = group.runner
        at_us = await self._snapshot_at(group, op, deadline_s, now)
        version = self.mvcc.read(op.keyspace, op.key, at_us)
        self.stats["snapshot_reads"] += 1
        receipt = {"replica": self.node_id, "read_ts": at_us, "safe_ts": runner.applied_ts_us,
                   "range": runner.group_id}
        if version is None:
            raise NotFound(f"key {op.key.decode(errors='replace')!r} not found in "
                           f"{op.keyspace!r} at {at_us}", receipt=receipt)
        return {"key": op.key, "value": version.value, "version": version.commit_ts_us,
                "receipt": receipt}

    async def _changes(self, group: _Group, rng: Range, op: Op, deadline_s: float,
                       now: TTInterval) -> dict[str, Any]:
        """A watch's poll: the committed writes in (since, at] once this replica's
        safe time has passed ``at``, so no write at or below it is still to come."""
        if op.snapshot_ts_us is None or op.limit < 1:
            raise ProtocolError("a changes operation names its timestamp and limit",
                                field="sts")
        at_us = await self._snapshot_at(group, op, deadline_s, now)
        runner = group.runner
        newest = runner.newest_write
        if newest.nothing_after(op.since_us):
            # Nothing written in the range here above ``since``, and safe time passed
            # ``at``: the answer is known without reading every key of the range.
            self.mvcc.check_changes_since(op.keyspace, op.since_us)
            self.stats["watch_polls"] += 1
            self.stats["watch_polls_unread"] += 1
            return {"items": [], "complete": max(op.since_us, at_us), "replica": self.node_id,
                    "range": runner.group_id}
        epoch = None if runner.installing else newest.start()
        if epoch is not None:
            # Once: what the store held before the apply path's notes began.
            try:
                base_us = await self.mvcc.newest_commit(op.keyspace, rng.start, rng.end)
            except BaseException:
                newest.abandon(epoch)
                raise
            newest.settle(epoch, base_us)
        page = await self.mvcc.changes(
            op.keyspace, rng.start, rng.end, op.since_us, at_us,
            prefix=op.key if op.prefix else b"", exact=None if op.prefix else op.key,
            limit=op.limit)
        self.stats["watch_polls"] += 1
        return {"items": [[item.key, item.value, item.commit_ts_us] for item in page.items],
                "complete": page.complete_through_us, "replica": self.node_id,
                "range": group.runner.group_id}

    def snapshot_now_us(self) -> int:
        """A timestamp no commit answered so far is above (``TT.now().latest``): a watch
        reads up to it. Raises ClockUncertain while TrueTime fences this node."""
        return self._fenced_now().latest_us

    async def _snapshot_at(self, group: _Group, op: Op, deadline_s: float,
                           now: TTInterval) -> int:
        """The timestamp a snapshot read of ``op`` is served at, once this replica
        may serve it there: everything committed at or below it is applied here."""
        runner = group.runner
        if op.snapshot_ts_us is not None:
            at_us = op.snapshot_ts_us
        elif runner.is_leader():
            # The freshest safe time there is, but never older than the bound allows
            # (a new leader's may be): then wait for safe time to reach the bound.
            at_us = max(runner.applied_ts_us, self._snapshot_ts(op, now))
        else:
            at_us = runner.applied_ts_us
            if at_us < self._snapshot_ts(op, now):
                raise NoLeader("this replica's safe time is older than max_staleness_ms allows",
                               reason="stale")
        reserved = runner.applied_ts_us < at_us and runner.is_leader() and runner.reserve_ts(at_us)
        if reserved:
            # A leader need not wait for safe time to pass a timestamp by itself: once
            # nothing new can commit at or below it, what is proposed already (and
            # any prepared transaction below it) is all the read waits for.
            await self._caught_up(runner, deadline_s)
            while not self.faults.ignore_safe_time:
                bound = runner.records.safe_time_bound()
                if bound is None or bound >= at_us:
                    runner.advance_safe_time(at_us)
                    break
                if self._clock.monotonic_s() + WAIT_STEP_S >= deadline_s:
                    raise Timeout(f"a transaction prepared below {at_us} was not decided within "
                                  "the deadline", consistency="SERIAL", received=0, required=1,
                                  write=True)
                await self._clock.sleep(WAIT_STEP_S)
        while not reserved and runner.applied_ts_us < at_us and not self.faults.ignore_safe_time:
            if self._clock.monotonic_s() + WAIT_STEP_S >= deadline_s:
                raise Timeout(f"safe time did not reach {at_us} within the deadline",
                              consistency="SERIAL", received=0, required=1, write=True)
            await self._clock.sleep(WAIT_STEP_S)
        if self.faults.on_snapshot_read is not None:
            self.faults.on_snapshot_read(runner.group_id, at_us)
        return at_us

    async def _caught_up(self, runner: GroupRunner, deadline_s: float) -> None:
        """Wait until every slot this leader has proposed is applied here."""
        replica = runner.replica
        target = 0 if replica is None else replica.next_slot - 1
        if runner.applied_through >= target:
            return
        applied = runner.applied(target)
        timer = self._clock.call_later(max(0.0, deadline_s - self._clock.monotonic_s()),
                                       _settle_none, applied)
        try:
            await applied
        finally:
            timer.cancel()
        if runner.applied_through < target:
            raise Timeout("the leader did not apply its log within the deadline",
                          consistency="SERIAL", received=0, required=1, write=True)

    async def _status(self, group: _Group, txn_id: str, deadline_s: float) -> dict[str, Any]:
        runner = group.runner
        ts = self._committed_ts(runner.group_id, txn_id)
        if ts is not None:
            return {"id": txn_id, "status": "committed", "commit_ts": ts, "range": runner.group_id}
        if txn_id in group.running:
            return {"id": txn_id, "status": "pending", "range": runner.group_id}
        await self._caught_up(runner, deadline_s)
        ts = self._committed_ts(runner.group_id, txn_id)
        if ts is not None:
            return {"id": txn_id, "status": "committed", "commit_ts": ts, "range": runner.group_id}
        raw = self._engine.get(OUTCOMES_EXPIRED_KEY)
        expired_before_us = 0 if raw is None else int(_TS.unpack(raw)[0])
        definitive = runner.stats.snapshots_installed == 0 and expired_before_us == 0
        if runner.stats.snapshots_installed:
            why = " (this leader installed a snapshot and may not know older transactions)"
        elif expired_before_us:
            why = (f" since {expired_before_us} (the records of older commits have expired: "
                   "txn.outcome_retention_s)")
        else:
            why = ""
        raise NotFound(f"transaction {txn_id!r} has not committed in range {runner.group_id}"
                       + why, id=txn_id, status="not_committed", definitive=definitive)

    async def _run(self, group: _Group, rng: Range, request: TxnRequest,
                   deadline_s: float, *, may_be_retry: bool = True) -> dict[str, Any]:
        """One transaction at this leader: lock, evaluate, propose, commit wait, release."""
        runner = group.runner
        txn_id = request.txn_id or self.new_txn_id()
        may_be_retry = may_be_retry and request.txn_id is not None
        if may_be_retry:
            ts = self._committed_ts(runner.group_id, txn_id)
            if ts is not None:  # a retry of a transaction that committed: never twice
                return {"ok": True, "id": txn_id, "committed": True, "commit_ts": ts,
                        "replayed": True}
        if txn_id in group.running:
            raise Aborted(f"transaction {txn_id!r} is already running", id=txn_id,
                          reason="in_progress")
        priority = (self._clock.wall_us(), txn_id)
        plan = lock_plan([*request.reads, *(c.key for c in request.conditions)],
                         [w.key for w in request.writes])
        try:
            while True:
                running = _Running(asyncio.get_running_loop().create_future())
                group.running[txn_id] = running
                group.locks.ask(txn_id, priority, plan,
                                functools.partial(_one_shot_woken, group.locks, txn_id, running.future))
                timer = None
                if not running.future.done():  # no timer when the locks were free at once
                    remaining_s = max(0.0, deadline_s - self._clock.monotonic_s())
                    timer = self._clock.call_later(remaining_s, _settle, running.future,
                                                   "timeout")
                try:
                    state = await running.future
                finally:
                    if timer is not None:
                        timer.cancel()
                if state == "timeout":
                    group.locks.finish(txn_id)
                    raise Timeout(f"transaction {txn_id} waited for locks past its deadline",
                                  consistency="SERIAL", received=0, required=1, write=True)
                if state == "ready":
                    break
                self.stats["wounded"] += 1
                if not self._retries.again(txn_id):
                    raise Aborted(f"transaction {txn_id} was wounded by older transactions "
                                  f"{self._retries.max_retries + 1} times", id=txn_id,
                                  reason="conflict")
            try:
                return await self._locked(group, runner, request, txn_id, deadline_s,
                                          may_be_retry=may_be_retry)
            finally:
                group.locks.finish(txn_id)
        finally:
            self._retries.forget(txn_id)
            group.running.pop(txn_id, None)

    async def _locked(self, group: _Group, runner: GroupRunner, request: TxnRequest, txn_id: str,
                      deadline_s: float, *, may_be_retry: bool = True) -> dict[str, Any]:
        if not runner.is_leader():
            raise NoLeader(f"{self.node_id} lost the lease of range {runner.group_id}",
                           range=runner.group_id)
        await self._caught_up(runner, deadline_s)
        if may_be_retry:
            # Checked again now that this leader has applied its predecessors' log: a
            # retry forwarded to a new leader may find its own first attempt committed
            # there, and must answer that, not fail its condition on its own write.
            ts = self._committed_ts(runner.group_id, txn_id)
            if ts is not None:
                return {"ok": True, "id": txn_id, "committed": True, "commit_ts": ts,
                        "replayed": True}
        current: dict[bytes, Current] = {}
        for key in dict.fromkeys([*request.reads, *(c.key for c in request.conditions)]):
            version = self.mvcc.latest_version(request.keyspace, key)
            current[key] = (Current(None, None) if version is None or version.value is None
                            else Current(version.value, version.commit_ts_us))
        verdict = evaluate(request, current)
        now = self._fenced_now()
        epsilon_us = now.epsilon_us
        receipt: dict[str, Any] = {"leader": self.node_id, "range": runner.group_id,
                                   "epsilon_us": epsilon_us, "txn_id": txn_id}
        reads = [{"key": key, "value": cur.value, "version": cur.version_us}
                 for key, cur in verdict.reads]
        if verdict.kind == CONDITION_FAILED:
            self.stats["condition_failed"] += 1
            raise condition_failed(verdict, txn_id)
        if verdict.kind != COMMIT:
            # A read under shared locks: what is applied here, with a live lease, is the
            # latest committed state (writers hold exclusive locks through commit wait).
            if not runner.is_leader():
                raise NoLeader(f"{self.node_id} lost the lease of range {runner.group_id}",
                               range=runner.group_id)
            receipt["read_ts"] = runner.applied_ts_us
            return {"ok": True, "id": txn_id, "committed": False, "reads": reads,
                    "receipt": receipt}
        remaining_s = deadline_s - self._clock.monotonic_s()
        if remaining_s <= 0:
            raise Timeout(f"transaction {txn_id} reached its deadline before proposing",
                          consistency="SERIAL", received=0, required=1, write=True)
        outcome = await runner.propose_future(txn_id, verdict.writes, timeout_s=remaining_s,
                                              now=now)
        if outcome.status == REFUSED:
            if outcome.reason == "clock_uncertain":
                self._fence()
            raise NoLeader(f"range {runner.group_id} refused the commit ({outcome.reason})",
                           range=runner.group_id, reason=outcome.reason)
        if outcome.status == ABORTED:
            self.stats["aborts"] += 1
            raise Aborted(f"transaction {txn_id} did not commit ({outcome.reason})", id=txn_id,
                          reason=outcome.reason)
        if outcome.status != COMMITTED or outcome.commit_ts_us is None:
            raise Timeout(f"transaction {txn_id}'s outcome is not known yet ({outcome.reason}); "
                          f"ask GET /v1/txn/{txn_id}", consistency="SERIAL", received=0,
                          required=1, write=True)
        commit_ts = outcome.commit_ts_us
        waited_s = (0.0 if self.faults.skip_commit_wait else
                    await self._commit_wait(commit_ts, deadline_s))
        if self.faults.on_commit is not None:
            self.faults.on_commit(commit_ts)
        self.stats["commits"] += 1
        self.stats["commit_wait_us"] += int(waited_s * 1_000_000)
        receipt.update(commit_ts=commit_ts, commit_wait_ms=round(waited_s * 1000, 3))
        return {"ok": True, "id": txn_id, "committed": True, "commit_ts": commit_ts,
                "reads": reads, "receipt": receipt}

    async def _commit_wait(self, commit_ts_us: int, deadline_s: float) -> float:
        """Spanner §4.1.2: hold the answer (and the locks) until ``TT.after(s)``."""
        started_s = self._clock.monotonic_s()
        for _ in range(10_000):  # bounded: each round sleeps the computed wait
            wait_us = self.truetime.wait_until_after(commit_ts_us, self._clock.wall_us(),
                                                     self._clock.monotonic_s())
            if wait_us <= 0:
                return self._clock.monotonic_s() - started_s
            await self._clock.sleep(wait_us / 1_000_000)
        raise Timeout(f"commit wait for {commit_ts_us} did not end", consistency="SERIAL",
                      received=0, required=1, write=True)

    # -- views -----------------------------------------------------------------------------

    def status_view(self) -> dict[str, Any]:
        groups = {}
        for gid, group in sorted(self.groups.items()):
            runner = group.runner
            groups[gid] = {"replicas": list(runner.group.replicas),
                           "members": sorted(runner.members), "moving": runner.moving,
                           "leader": runner.leader(),
                           "leads": runner.is_leader(), "applied_through": runner.applied_through,
                           "safe_ts": runner.applied_ts_us, "locks": len(group.locks),
                           "prepared": len(runner.records.prepared()),
                           # Group commit at work: fsyncs and persist batches per applied commit.
                           "applied": runner.stats.applied, "fsyncs": runner.stats.fsyncs,
                           "persist_batches": runner.stats.persist_batches}
        return {"truetime": self.clock_status(), "groups": groups, "stats": dict(self.stats)}


def _split_or_merge(rng: Range, old: Range) -> RangeMoving:
    kind = "split" if (old.start == old.end or
                       (old.contains(rng.end) and old.contains(rng.start + 1))) else "merge"
    return RangeMoving(
        f"range {rng.group_id} ({rng.start}, {rng.end}] is cut differently from the Paxos "
        f"group {old.group_id} ({old.start}, {old.end}] that holds its keys: the keyspace's "
        f"ranges setting changed, which {'splits' if kind == 'split' else 'merges'} ranges, "
        "and splitting or merging a Paxos group is not built (set ranges back)",
        range=rng.group_id, group=old.group_id, reason=kind)


def _settle(future: asyncio.Future[str], value: str) -> None:
    if not future.done():
        future.set_result(value)


def _settle_none(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _one_shot_woken(locks: GroupLocks, txn_id: str, future: asyncio.Future[str], state: str) -> None:
    """A one-range transaction holds its locks (committing from now: it cannot be
    wounded, and it evaluates and proposes at once), or was wounded waiting."""
    if state == READY:
        locks.start_commit(txn_id)
    _settle(future, state)


def _rebuild(exc: RemoteError) -> RingKVError:
    """The peer's typed error, as if raised here (a forwarded operation's answer)."""
    code = getattr(exc, "remote_code", "")
    if code not in BY_CODE or code in ("remote_error", "protocol_error"):
        return exc
    details = dict(getattr(exc, "remote_details", {}) or {})
    return RingKVError.from_json(
        {"error": {"code": code, "message": getattr(exc, "remote_message", exc.message),
                   **details}})


__all__ = ["TxnService", "TxnFaults", "Op", "VERBS"]
