"""One Paxos group's shell (ringkv/txn/group.py): three GroupRunners on a bus.

Each runner has its own memory engine (with the crash model: unsynced writes
are lost), MVCC store and drifting ``SimClock``, on the simulator's
virtual-time loop. The bus carries what the runners send through the real
codec: an ``Outbox`` per node, flushed once per loop turn into one coalesced
batch per destination, packed with msgpack and routed with ``route_batch``.
Snapshots travel the same way through ``serve_snapshot``. The LevelDB case
runs on a real asyncio loop, because its fsyncs run off the loop.

Checked: a proposal commits and is applied on every replica (Spanner §4.1.2:
one Paxos write at a timestamp inside the leader's lease); the leader is
killed and another takes over only after the old lease ended (Spanner §4.1,
disjointness), then commits; a runner restarted from its log catches up,
from the log tail or from a snapshot (issue #11 item 3, bounded log); a
proposal a leader change loses is answered aborted (PMS §3: the new leader
fills the slot); garbage is counted and dropped, never fatal.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import pytest

from ringkv.clock import Clock, SystemClock
from ringkv.errors import PeerUnreachable, ProtocolError
from ringkv.ring import token_for
from ringkv.sim.clock import SimClock
from ringkv.sim.loop import VirtualTimeLoop
from ringkv.storage.leveldb import LevelDBEngine
from ringkv.storage.memory import MemoryEngine
from ringkv.txn.group import (
    ABORTED,
    COMMITTED,
    REFUSED,
    UNKNOWN,
    GroupRunner,
    Outcome,
    decide,
    route_batch,
)
from ringkv.txn.mvcc import MvccStore
from ringkv.txn.paxos import (
    LEASE_S,
    Accept,
    Accepted,
    Ballot,
    Committed,
    Entry,
    Heartbeat,
    HeartbeatAck,
    Message,
    Prepare,
    Promise,
)
from ringkv.txn.paxos_log import PaxosLog
from ringkv.txn.paxos_messages import (
    CommitValue,
    Outbox,
    SnapshotPage,
    SnapshotRequest,
    encode_batch,
    encode_message,
)
from ringkv.txn.ranges import Range
from ringkv.txn.truetime import TrueTime

KS = "txn"
GROUP = Range(KS, 0, 0, ("a", "b", "c"))  # the whole ring
DRIFT_PPM = {"a": 150.0, "b": -120.0, "c": 40.0}
LATENCY_S = 0.002


VIOLATIONS: list[str] = []  # persist-before-send breaches seen by any bus in the current test


@pytest.fixture(autouse=True)
def no_violations() -> Any:
    VIOLATIONS.clear()
    yield
    assert VIOLATIONS == []


class DurableView:
    """A memory engine's fsynced records only: what a crash now would leave."""

    def __init__(self, engine: MemoryEngine) -> None:
        self._data = engine._durable

    def scan(self, start: bytes, stop: bytes | None, *, limit: int | None = None) -> Any:
        keys = sorted(k for k in self._data if start <= k and (stop is None or k < stop))
        return iter([(k, self._data[k]) for k in keys[:limit]])


def unbacked(engine: Any, group_id: str, msg: Message) -> str | None:
    """Persist before reply (the PaxosReplica contract): what ``msg`` promises
    or accepts must already be fsynced. Returns what is missing, or None."""
    if not isinstance(engine, MemoryEngine):
        return None
    disk = PaxosLog(DurableView(engine), group_id).load().state  # type: ignore[arg-type]
    floor = disk.snapshot.last_slot if disk.snapshot else 0
    if isinstance(msg, (Promise, Prepare)) or (isinstance(msg, HeartbeatAck) and msg.granted):
        if disk.promised < msg.ballot:
            return f"{type(msg).__name__} {msg.ballot} with {disk.promised} on disk"
    elif isinstance(msg, Accepted):
        for slot in msg.slots:
            held = disk.accepted.get(slot)
            if slot > floor and slot not in disk.chosen and (held is None or held[0] != msg.ballot):
                return f"Accepted {msg.ballot} at {slot} with {held} on disk"
    elif isinstance(msg, Accept):
        for slot, entry in msg.entries:
            if slot > floor and slot not in disk.chosen and disk.accepted.get(slot) != (msg.ballot, entry):
                return f"Accept at {slot} before accepting it on disk"
    return None


def wire(obj: Any) -> Any:
    return msgpack.unpackb(msgpack.packb(obj, use_bin_type=True), raw=False)


@dataclass
class Node:
    node_id: str
    engine: Any
    clock: Clock
    runners: dict[str, GroupRunner] = field(default_factory=dict)  # group id -> runner
    mvcc: MvccStore | None = None  # one per node, over its one engine, shared by its groups
    incarnation: int = 0

    @property
    def runner(self) -> GroupRunner | None:
        return self.runners.get(GROUP.group_id)


@dataclass
class Bus:
    """The in-test network between the nodes' runners."""

    options: dict[str, Any] = field(default_factory=dict)
    nodes: dict[str, Node] = field(default_factory=dict)
    outboxes: dict[str, Outbox] = field(default_factory=dict)
    cut: set[tuple[str, str]] = field(default_factory=set)
    batches: int = 0
    messages: int = 0
    rejected: int = 0
    bytes: int = 0
    snapshots_down: bool = False  # every snapshot fetch fails
    check_durable: bool = True  # check persist-before-send on every message (costs CPU)

    def add(self, node_id: str, engine: Any, clock: Clock) -> Node:
        self.nodes[node_id] = node = Node(node_id, engine, clock)
        self.outboxes[node_id] = Outbox(node_id)
        return node

    def start(self, node_id: str, group: Range = GROUP, **options: Any) -> GroupRunner:
        node = self.nodes[node_id]
        if not node.runners:
            node.incarnation += 1
            node.mvcc = MvccStore(node.engine)
        assert node.mvcc is not None
        runner = GroupRunner(
            node_id, group, engine=node.engine, mvcc=node.mvcc, clock=node.clock,
            truetime=TrueTime(), send=self._sender(node_id), fetch_snapshot=self._fetcher(node_id, group),
            rng=random.Random(f"{node_id}/{node.incarnation}/{group.group_id}"), **{**self.options, **options},
        )
        node.runners[group.group_id] = runner
        runner.start()
        return runner

    def kill(self, node_id: str) -> None:
        """SIGKILL: the node's runners stop, unsynced writes are lost, its traffic stops."""
        node = self.nodes[node_id]
        assert node.runners
        for runner in node.runners.values():
            runner.stop()
        node.runners = {}
        if isinstance(node.engine, MemoryEngine):
            node.engine.crash()

    def runner(self, node_id: str) -> GroupRunner:
        runner = self.nodes[node_id].runner
        assert runner is not None
        return runner

    def _sender(self, src: str) -> Callable[[str, str, Message], None]:
        outbox = self.outboxes[src]

        def send(to: str, group_id: str, msg: Message) -> None:
            if self.check_durable:
                missing = unbacked(self.nodes[src].engine, group_id, msg)
                if missing:
                    VIOLATIONS.append(f"{src} sent {missing}")
            if not outbox:
                asyncio.get_running_loop().call_soon(self._flush, src)
            outbox.add(to, group_id, msg)
        return send

    def _flush(self, src: str) -> None:
        for to, batches in self.outboxes[src].take().items():
            for raw in batches:
                self.batches += 1
                data = msgpack.packb(raw, use_bin_type=True)
                self.bytes += len(data)
                asyncio.get_running_loop().call_later(LATENCY_S, self._deliver, src, to, data)

    def _deliver(self, src: str, to: str, data: bytes) -> None:
        runners = self.nodes[to].runners
        if not runners or (src, to) in self.cut or not self.nodes[src].runners:
            return
        report = route_batch(msgpack.unpackb(data, raw=False), runners, expect_sender=src)
        self.messages += report.delivered
        self.rejected += report.rejected

    def _fetcher(self, src: str, group: Range) -> Callable[[str, SnapshotRequest], Awaitable[SnapshotPage]]:
        async def fetch(to: str, request: SnapshotRequest) -> SnapshotPage:
            await asyncio.sleep(LATENCY_S)
            runner = self.nodes[to].runners.get(group.group_id)
            if runner is None or (src, to) in self.cut or self.snapshots_down:
                raise PeerUnreachable(f"{to} is down", node_id=to)
            page = await runner.serve_snapshot(SnapshotRequest.from_wire(wire(request.to_wire())))
            return SnapshotPage.from_wire(wire(page.to_wire()))
        return fetch


def run(make: Callable[[VirtualTimeLoop], Coroutine[Any, Any, Any]], timeout_s: float = 300.0) -> Any:
    loop = VirtualTimeLoop()
    asyncio.set_event_loop(loop)
    try:
        return loop.run_until_complete(asyncio.wait_for(make(loop), timeout=timeout_s))
    finally:
        asyncio.set_event_loop(None)
        loop.dispose()


def sim_bus(loop: VirtualTimeLoop, **options: Any) -> Bus:
    bus = Bus(options)
    for node_id in GROUP.replicas:
        bus.add(node_id, MemoryEngine(), SimClock(loop, drift_ppm=DRIFT_PPM[node_id]))
    return bus


async def wait_for(condition: Callable[[], Any], within_s: float, what: str, step_s: float = 0.01) -> Any:
    """Poll ``condition`` on the loop's time until it is truthy, at most ``within_s``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while loop.time() < deadline:
        value = condition()
        if value:
            return value
        await asyncio.sleep(step_s)
    raise AssertionError(f"not within {within_s} s: {what}")


def leader_of(bus: Bus) -> GroupRunner | None:
    leaders = [n.runner for n in bus.nodes.values() if n.runner is not None and n.runner.is_leader()]
    assert len(leaders) <= 1, "two leaders under lease at once"
    return leaders[0] if leaders else None


async def commit(bus: Bus, txn_id: str, writes: list[tuple[bytes, bytes | None]],
                 within_s: float = 20.0) -> Outcome:
    """Propose at whoever leads, retrying refusals, until committed."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while loop.time() < deadline:
        leader = leader_of(bus)
        if leader is not None:
            outcome = await leader.propose_future(txn_id, writes)
            if outcome.status == COMMITTED:
                return outcome
        await asyncio.sleep(0.05)
    raise AssertionError(f"{txn_id} not committed within {within_s} s")


def read(node: Node, key: bytes, at_ts_us: int) -> bytes | None:
    assert node.mvcc is not None
    version = node.mvcc.read(KS, key, at_ts_us)
    return None if version is None else version.value


# --- the whole path -----------------------------------------------------------------------------


def test_a_proposal_commits_and_is_applied_on_all_three() -> None:
    """Spanner §4.1.2: a commit is one Paxos write at a timestamp the leader
    assigns inside its lease; every replica applies it at that timestamp."""

    async def main(loop: VirtualTimeLoop) -> None:
        bus = sim_bus(loop)
        for node_id in GROUP.replicas:
            bus.start(node_id)
        leader = await wait_for(lambda: leader_of(bus), 10.0, "a leader")
        outcome = await leader.propose_future("t1", [(b"k1", b"v1"), (b"k2", b"v2")])
        assert outcome.status == COMMITTED, outcome
        assert outcome.commit_ts_us is not None and outcome.slot is not None
        second = await leader.propose_future("t2", [(b"k2", None)])
        assert second.status == COMMITTED and second.commit_ts_us > outcome.commit_ts_us
        await wait_for(lambda: all(n.runner and n.runner.applied_through >= second.slot
                                   for n in bus.nodes.values()), 5.0, "applied everywhere")
        for node in bus.nodes.values():
            assert read(node, b"k1", outcome.commit_ts_us) == b"v1"
            assert read(node, b"k2", outcome.commit_ts_us) == b"v2"
            assert read(node, b"k2", second.commit_ts_us) is None  # the tombstone
            assert read(node, b"k1", outcome.commit_ts_us - 1) is None
            assert node.runner is not None and node.runner.applied_ts_us == second.commit_ts_us
        # A follower refuses, naming the leader.
        follower = next(n.runner for n in bus.nodes.values() if n.runner is not leader)
        assert follower is not None and follower.leader() == leader.node_id
        refused = await follower.propose_future("t3", [(b"k3", b"v")])
        assert (refused.status, refused.reason, refused.leader_hint) == (REFUSED, "not_leader", leader.node_id)
        assert bus.rejected == 0
        # Accepts are fsynced before the Accepted leaves; chosen records alone are not
        # (a crash that loses them loses nothing anyone was told: the restart tests).
        assert 0 < leader.stats.fsyncs < leader.stats.persist_batches

    run(main)


def test_safe_time_never_runs_ahead_of_the_store() -> None:
    """Spanner §4.1.3: a replica serves a snapshot read at ``t`` once its safe time has
    passed ``t``, so safe time may count only commits its MVCC store already holds,
    even between the message that commits an entry and the drain that applies it."""

    async def main(loop: VirtualTimeLoop) -> None:
        bus = sim_bus(loop)
        for node_id in GROUP.replicas:
            bus.start(node_id)
        leader = await wait_for(lambda: leader_of(bus), 10.0, "a leader")
        leader_node = next(n for n in bus.nodes.values() if n.runner is leader)
        ahead: list[str] = []
        deliver = bus._deliver

        def delivered_then_checked(src: str, to: str, data: bytes) -> None:
            deliver(src, to, data)  # steps the replica; its drain runs on a later turn
            node = bus.nodes[to]
            runner = node.runner
            if runner is None or runner is leader:
                return
            safe_us = runner.applied_ts_us
            if read(node, b"k", safe_us) != read(leader_node, b"k", safe_us):
                ahead.append(f"{to}: safe time {safe_us}, store at {runner.applied_through}")

        bus._deliver = delivered_then_checked  # type: ignore[method-assign]
        last = None
        for i in range(5):
            last = await leader.propose_future(f"t{i}", [(b"k", f"v{i}".encode())])
            assert last.status == COMMITTED, last
        assert last is not None and last.commit_ts_us is not None
        await wait_for(lambda: all(n.runner and n.runner.applied_ts_us >= last.commit_ts_us
                                   for n in bus.nodes.values()), 5.0, "applied everywhere")
        assert not ahead, ahead

    run(main)


def test_the_leader_is_killed_and_another_takes_over_after_its_lease() -> None:
    """Spanner §4.1 (disjointness): a new leader's lease starts only after the
    old leader's ended, in true time; then it commits. Figure printed with -s."""
    to_leader: list[float] = []

    async def main(loop: VirtualTimeLoop) -> None:
        bus = sim_bus(loop)
        for node_id in GROUP.replicas:
            bus.start(node_id)
        old = await wait_for(lambda: leader_of(bus), 10.0, "a leader")
        first = await commit(bus, "before", [(b"k", b"1")])
        assert old.replica is not None
        lease = old.replica.lease_interval(old._clock.monotonic_s())
        assert lease is not None
        drift = DRIFT_PPM[old.node_id] * 1e-6
        old_end_true_s = lease[1] / (1 + drift)  # SimClock: monotonic = true * (1 + drift)
        killed_s = loop.time()
        bus.kill(old.node_id)
        new = await wait_for(lambda: leader_of(bus), LEASE_S + 5.0, "a new leader", step_s=0.005)
        took_s = loop.time() - killed_s
        to_leader.append(took_s)
        assert new.node_id != old.node_id
        assert loop.time() >= old_end_true_s, "the new lease began before the old one ended"
        after = await commit(bus, "after", [(b"k", b"2")])
        assert after.commit_ts_us > first.commit_ts_us  # timestamps rise across leaders
        for node in bus.nodes.values():
            if node.runner is not None:
                await wait_for(lambda: node.runner is not None and node.runner.applied_through >= after.slot,
                               5.0, "applied")
                assert read(node, b"k", after.commit_ts_us) == b"2"

    run(main)
    print(f"\nfailover of one group (lease_s={LEASE_S}, virtual s): new leader {to_leader[0]:.2f} s after the kill")
    assert to_leader[0] <= LEASE_S + 2.0


@pytest.mark.parametrize("compact", [False, True], ids=["log-tail", "snapshot"])
def test_a_restarted_runner_catches_up_from_its_log(compact: bool) -> None:
    """A replica restarted from its persisted log (restore, Paxos Made Simple §2.3)
    learns what it missed: from the leader's log tail, or, when the leader
    compacted past it (issue #11 item 3, bounded log), from a snapshot of
    the leader's MVCC state plus the tail."""
    options = {"max_log_slots": 8, "keep_log_slots": 2} if compact else {}

    async def main(loop: VirtualTimeLoop) -> None:
        bus = sim_bus(loop, **options)
        for node_id in GROUP.replicas:
            bus.start(node_id)
        leader = await wait_for(lambda: leader_of(bus), 10.0, "a leader")
        before = [await commit(bus, f"t{i}", [(f"k{i}".encode(), b"old")]) for i in range(3)]
        lagger = next(n for n in GROUP.replicas if n != leader.node_id)
        await wait_for(lambda: bus.runner(lagger).applied_through >= before[-1].slot, 5.0, "applied")
        bus.kill(lagger)  # loses its unsynced applies and applied marker
        missed = [await commit(bus, f"m{i}", [(f"k{i % 5}".encode(), f"new{i}".encode())])
                  for i in range(30)]
        if compact:
            assert leader.stats.compactions >= 2 and leader.log_slots() <= 8 + 2
            # The leader's GC has thinned history below this: the copy must refuse those reads too.
            leader_mvcc = bus.nodes[leader.node_id].mvcc
            assert leader_mvcc is not None
            leader_mvcc.raise_gc_threshold(KS, before[-1].commit_ts_us)
        restarted = bus.start(lagger)
        last = missed[-1]
        await wait_for(lambda: restarted.applied_through >= last.slot, 20.0, "caught up")
        node = bus.nodes[lagger]
        for i in range(5):
            expected = max((m for j, m in enumerate(missed) if j % 5 == i), key=lambda m: m.slot)
            assert read(node, f"k{i}".encode(), last.commit_ts_us) == f"new{missed.index(expected)}".encode()
        if compact:
            assert restarted.stats.snapshots_installed == 1 and restarted.stats.snapshot_records > 0
            assert node.mvcc is not None and node.mvcc.gc_threshold_us(KS) == before[-1].commit_ts_us
            assert read(node, b"k0", before[-1].commit_ts_us) == b"old"  # history the snapshot carries
        else:
            assert read(node, b"k0", before[0].commit_ts_us) == b"old"  # history before the crash too
            assert restarted.stats.snapshots_installed == 0
        # And it takes part again: a new commit reaches it.
        again = await commit(bus, "again", [(b"z", b"1")])
        await wait_for(lambda: restarted.applied_through >= again.slot, 5.0, "applied again")

    run(main)


def test_an_interrupted_snapshot_install_is_fetched_again_after_a_restart() -> None:
    """The applied point moves only once every page is in: a crash mid-install
    installs again on restart rather than serving a half-copied range."""

    async def main(loop: VirtualTimeLoop) -> None:
        bus = sim_bus(loop, max_log_slots=4, keep_log_slots=1)
        for node_id in GROUP.replicas:
            bus.start(node_id)
        leader = await wait_for(lambda: leader_of(bus), 10.0, "a leader")
        lagger = next(n for n in GROUP.replicas if n != leader.node_id)
        bus.kill(lagger)
        done = [await commit(bus, f"t{i}", [(f"k{i}".encode(), b"v")]) for i in range(12)]
        # Nobody serves the snapshot: the lagger records it, cannot fetch it, and is killed.
        bus.snapshots_down = True
        restarted = bus.start(lagger)
        await wait_for(lambda: restarted.stats.snapshot_failures >= 1, 10.0, "a failed fetch")
        assert restarted.applied_through < done[-1].slot
        bus.kill(lagger)
        bus.snapshots_down = False
        restarted = bus.start(lagger)
        await wait_for(lambda: restarted.applied_through >= done[-1].slot, 20.0, "caught up")
        assert restarted.stats.snapshots_installed == 1
        for i in range(12):
            assert read(bus.nodes[lagger], f"k{i}".encode(), done[-1].commit_ts_us) == b"v"

    run(main)


def test_a_proposal_lost_to_a_leader_change_is_answered_aborted() -> None:
    """PMS §3: a new leader that finds a slot empty in its quorum fills it; the old
    leader's proposal there can never be chosen, and its proposer learns so."""

    async def main(loop: VirtualTimeLoop) -> None:
        bus = sim_bus(loop)
        for node_id in GROUP.replicas:
            bus.start(node_id)
        old = await wait_for(lambda: leader_of(bus), 10.0, "a leader")
        await commit(bus, "t0", [(b"k", b"0")])
        others = [n for n in GROUP.replicas if n != old.node_id]
        bus.cut |= {(old.node_id, n) for n in others} | {(n, old.node_id) for n in others}
        lost = old.propose_future("lost", [(b"k", b"lost")], timeout_s=60.0)
        new = await wait_for(lambda: next((bus.runner(n) for n in others if bus.runner(n).is_leader()), None),
                             LEASE_S + 5.0, "a leader on the majority side")
        won = await new.propose_future("won", [(b"k", b"won")])
        assert won.status == COMMITTED
        assert not lost.done()
        bus.cut.clear()
        outcome = await lost
        assert (outcome.status, outcome.reason) == (ABORTED, "lost")
        assert outcome.slot == won.slot
        for node_id in GROUP.replicas:
            await wait_for(lambda: bus.runner(node_id).applied_through >= won.slot, 5.0, "applied")
            assert read(bus.nodes[node_id], b"k", won.commit_ts_us + 10**6) == b"won"

    run(main)


DECIDE_CASES = [
    ("our value, in order: committed", "t", 10, Committed(5, Entry(b"", 10)), CommitValue("t", 10, ()),
     (COMMITTED, "")),
    ("our value, superseded: aborted", "t", 10, Committed(5, Entry(b"", 10), superseded=True),
     CommitValue("t", 10, ()), (ABORTED, "superseded")),
    ("another transaction's value: lost", "t", 10, Committed(5, Entry(b"", 11)), CommitValue("u", 11, ()),
     (ABORTED, "lost")),
    ("our id at another timestamp (a retry): lost", "t", 10, Committed(5, Entry(b"", 12)),
     CommitValue("t", 12, ()), (ABORTED, "lost")),
    ("a no-op filled the slot: lost", "t", 10, Committed(5, Entry(b"", 0, noop=True)), None, (ABORTED, "lost")),
]


@pytest.mark.parametrize("name, txn_id, ts_us, item, value, expected", DECIDE_CASES,
                         ids=[c[0] for c in DECIDE_CASES])
def test_what_a_chosen_slot_means_for_its_proposal(name: str, txn_id: str, ts_us: int, item: Committed,
                                                   value: CommitValue | None, expected: tuple[str, str]) -> None:
    """Paxos log outcomes are definite (issue #11 item 5): the slot decides."""
    assert decide(txn_id, ts_us, item, value) == expected


def test_garbage_is_rejected_and_counted_not_fatal() -> None:
    """Bad input never crashes a node (DESIGN.md): a malformed batch, a malformed
    item, an undecodable message and a message from outside the group are all
    counted and dropped, and the group still commits."""

    async def main(loop: VirtualTimeLoop) -> None:
        bus = sim_bus(loop)
        for node_id in GROUP.replicas:
            bus.start(node_id)
        leader = await wait_for(lambda: leader_of(bus), 10.0, "a leader")
        runners = {GROUP.group_id: leader}
        ballot = leader.replica.ballot if leader.replica else Ballot(1, "a")
        assert route_batch("garbage", runners).rejected == 1
        assert route_batch([1, "b", [["x" * 600, [6]], [GROUP.group_id, [99]]]], runners).rejected == 2
        good = encode_batch("b", [(GROUP.group_id, Heartbeat("b", Ballot(0, ""), 0, 1.0))])
        assert route_batch(good, runners, expect_sender="c").rejected == 1  # spoofed sender
        unknown = route_batch(encode_batch("b", [("txn/404", Heartbeat("b", ballot, 0, 1.0))]), runners)
        assert unknown.unknown_group == 1
        before = leader.stats.rejected
        leader.receive("b", [6, [1, "b"], 0, float("nan")])
        leader.receive("b", {"no": "thing"})
        leader.step(Heartbeat("mallory", Ballot(99, "mallory"), 0, 1.0))  # not a member
        leader.receive("mallory", encode_message(Heartbeat("b", Ballot(99, "mallory"), 0, 1.0)))
        assert leader.stats.rejected == before + 4
        assert leader.is_leader()
        assert (await leader.propose_future("after", [(b"k", b"v")])).status == COMMITTED

    run(main)


def test_stopping_answers_waiting_proposals_unknown() -> None:
    async def main(loop: VirtualTimeLoop) -> None:
        bus = sim_bus(loop)
        for node_id in GROUP.replicas:
            bus.start(node_id)
        leader = await wait_for(lambda: leader_of(bus), 10.0, "a leader")
        bus.cut |= {(leader.node_id, n) for n in GROUP.replicas}
        pending = leader.propose_future("t", [(b"k", b"v")])
        await asyncio.sleep(0.1)
        bus.kill(leader.node_id)
        outcome = await pending
        assert (outcome.status, outcome.reason) == (UNKNOWN, "stopped")
        refused = await leader.propose_future("u", [(b"k", b"v")])
        assert (refused.status, refused.reason) == (REFUSED, "stopped")

    run(main)


def test_a_key_outside_the_group_is_refused_before_proposing() -> None:
    async def main(loop: VirtualTimeLoop) -> None:
        bus = Bus()
        half = Range(KS, 0, 2**62, ("a",))
        node = bus.add("a", MemoryEngine(), SimClock(loop))
        node.mvcc = MvccStore(node.engine)
        runner = GroupRunner("a", half, engine=node.engine, mvcc=node.mvcc, clock=node.clock, truetime=TrueTime(),
                             send=lambda *a: None, fetch_snapshot=bus._fetcher("a", half), rng=random.Random(1))
        runner.start()
        leader = await wait_for(lambda: runner.is_leader(), 10.0, "a one-member group leads itself")
        assert leader
        outside = next(bytes([i]) for i in range(256) if not half.contains(token_for(bytes([i]))))
        with pytest.raises(ProtocolError, match="outside group"):
            runner.propose_future("t", [(outside, b"v")])
        runner.stop()

    run(main)


def test_idle_groups_coalesce_their_heartbeats() -> None:
    """Issue #11 item 2 (CockroachDB's coalesced heartbeats): 30 groups on the same
    three nodes, idle. Their runners tick on one clock, so each node's heartbeats,
    lease renewals and acks leave in one batch per destination per tick. Figure
    printed with -s."""
    groups = 30
    span = 2**64 // groups
    ranges = [Range(KS, -(2**63) + i * span, -(2**63) + (i + 1) * span, GROUP.replicas) for i in range(groups)]
    figures: dict[str, float] = {}

    async def main(loop: VirtualTimeLoop) -> None:
        bus = sim_bus(loop)
        bus.check_durable = False  # a figure: the check's CPU is not the runners'
        for node_id in GROUP.replicas:
            for group in ranges:
                bus.start(node_id, group)

        def all_led() -> bool:
            return all(any(n.runners[g.group_id].is_leader() for n in bus.nodes.values()) for g in ranges)
        await wait_for(all_led, 15.0, "a leader in every group")
        batches, messages, size = bus.batches, bus.messages, bus.bytes
        idle_s = 10.0
        await asyncio.sleep(idle_s)
        assert all_led()
        figures["messages/s"] = (bus.messages - messages) / idle_s
        figures["batches/s"] = (bus.batches - batches) / idle_s
        figures["bytes/s"] = (bus.bytes - size) / idle_s

    run(main)
    per_batch = figures["messages/s"] / figures["batches/s"]
    print(f"\n{groups} idle groups on 3 nodes: {figures['messages/s']:.0f} Paxos messages/s travel in "
          f"{figures['batches/s']:.0f} batches/s ({per_batch:.1f} messages per batch), "
          f"{figures['bytes/s'] / 3 / 1024:.1f} KiB/s sent per node")
    assert per_batch > 2  # uncoalesced, it would be 1


# --- LevelDB, on a real loop (its fsyncs run off the loop) -------------------------------------------


def test_three_runners_on_leveldb_commit_and_restart(tmp_path: Path) -> None:
    """The same path with fsyncs to disk: commit, kill a follower, commit more,
    restart it on its reopened database, and it catches up."""
    fast = {"lease_s": 0.6, "heartbeat_interval_s": 0.1, "election_timeout_s": 0.1, "tick_interval_s": 0.02}

    async def main() -> None:
        bus = Bus(fast)
        clock = SystemClock()
        for node_id in GROUP.replicas:
            bus.add(node_id, LevelDBEngine(tmp_path / node_id), clock)
            bus.start(node_id)
        try:
            await wait_for(lambda: leader_of(bus), 10.0, "a leader")
            first = await commit(bus, "t1", [(b"k", b"1")], within_s=10.0)
            leader = leader_of(bus)
            assert leader is not None
            lagger = next(n for n in GROUP.replicas if n != leader.node_id)
            await wait_for(lambda: bus.runner(lagger).applied_through >= (first.slot or 0), 5.0, "applied")
            bus.kill(lagger)
            bus.nodes[lagger].engine.close()
            later = [await commit(bus, f"t{i}", [(b"k", str(i).encode())], within_s=10.0) for i in range(2, 6)]
            bus.nodes[lagger].engine = LevelDBEngine(tmp_path / lagger)
            restarted = bus.start(lagger)
            await wait_for(lambda: restarted.applied_through >= (later[-1].slot or 0), 10.0, "caught up")
            assert read(bus.nodes[lagger], b"k", later[-1].commit_ts_us or 0) == b"5"
            assert read(bus.nodes[lagger], b"k", first.commit_ts_us or 0) == b"1"
            assert restarted.stats.persist_batches > 0
        finally:
            for node in bus.nodes.values():
                for runner in node.runners.values():
                    runner.stop()
                node.engine.close()

    asyncio.run(asyncio.wait_for(main(), timeout=60))


# --- the figure ------------------------------------------------------------------------------------------


def test_cpu_per_commit_figure() -> None:
    """CPU µs per commit for three runners in one process (memory engines, virtual
    time: the CPU is what the runners, the codec and the bus spend), with one
    proposal at a time and with 32 in flight. Printed with -s; not a timed assertion."""
    figures: dict[str, float] = {}

    async def main(loop: VirtualTimeLoop) -> None:
        bus = sim_bus(loop)
        bus.check_durable = False  # a figure: the check's CPU is not the runners'
        for node_id in GROUP.replicas:
            bus.start(node_id)
        leader = await wait_for(lambda: leader_of(bus), 10.0, "a leader")
        await commit(bus, "warm", [(b"k", b"v")])
        n = 400
        started = time.process_time()
        for i in range(n):
            outcome = await leader.propose_future(f"s{i}", [(f"k{i % 50}".encode(), b"x" * 100)])
            assert outcome.status == COMMITTED
        figures["serial"] = (time.process_time() - started) / n * 1e6
        started = time.process_time()
        for burst in range(n // 32):
            futures = [leader.propose_future(f"p{burst}/{i}", [(f"k{i}".encode(), b"x" * 100)]) for i in range(32)]
            outcomes = await asyncio.gather(*futures)
            assert all(o.status == COMMITTED for o in outcomes)
        figures["pipelined"] = (time.process_time() - started) / (n // 32 * 32) * 1e6
        figures["fsyncs per commit (leader, pipelined)"] = leader.stats.persist_batches / max(1, leader.stats.committed)

    run(main)
    print("\nthree runners in one process, memory engines: CPU per commit "
          f"{figures['serial']:.0f} µs one at a time, {figures['pipelined']:.0f} µs with 32 in flight")
    assert figures["serial"] > 0 and figures["pipelined"] > 0


def test_a_snapshot_carries_prepared_transactions_so_safe_time_stays_held_spanner_4_1_3() -> None:
    """A replica that catches up from a snapshot (the log compacted past it) must
    still know of a transaction prepared before the snapshot and not decided:
    its safe time stays below the prepare timestamp until the outcome applies,
    or a snapshot read there could miss a commit at s >= that timestamp. The
    2PC records travel in the snapshot with the MVCC records."""
    from ringkv.txn.twopc_messages import OutcomeRecord, PreparedRecord

    async def main(loop: VirtualTimeLoop) -> None:
        bus = sim_bus(loop, max_log_slots=8, keep_log_slots=2)
        for node_id in GROUP.replicas:
            bus.start(node_id)
        leader = await wait_for(lambda: leader_of(bus), 10.0, "a leader")
        lagger = next(n for n in GROUP.replicas if n != leader.node_id)
        bus.kill(lagger)
        prepare_ts = leader.assign_now()
        assert prepare_ts is not None
        prepared = PreparedRecord("x1", "other/1", (1, "x1"), prepare_ts, ((b"p", b"1"),))
        outcome = await leader.propose_record(prepared, ts_us=prepare_ts)
        assert outcome.status == COMMITTED, outcome
        for i in range(30):  # past the compaction point: the lagger needs a snapshot
            await commit(bus, f"m{i}", [(f"k{i % 5}".encode(), b"v")])
        assert leader.stats.compactions >= 2
        assert leader.applied_ts_us == prepare_ts - 1, "the leader holds safe time too"
        restarted = bus.start(lagger)
        await wait_for(lambda: restarted.stats.snapshots_installed == 1, 20.0, "a snapshot")
        await wait_for(lambda: restarted.applied_through >= leader.applied_through, 20.0, "caught up")
        assert restarted.records.prepared() == {"x1": prepare_ts}
        assert restarted.applied_ts_us == prepare_ts - 1
        # The outcome applies the writes at s and lets safe time go on.
        s = leader.assign_now()
        assert s is not None
        done = await leader.propose_record(OutcomeRecord("x1", True, s, ((b"p", b"1"),)))
        assert done.status == COMMITTED
        await wait_for(lambda: restarted.applied_ts_us > s, 10.0, "safe time moves on")
        assert read(bus.nodes[lagger], b"p", s) == b"1" and read(bus.nodes[lagger], b"p", s - 1) is None

    run(main)
