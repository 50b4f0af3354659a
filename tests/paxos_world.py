"""A tiny world for whole-group Paxos tests: replicas, a message bus, clocks, faults.

Pure Python on virtual true time, one seed per run. The bus loses, duplicates,
delays (and so reorders) messages and cuts links one way or both; replicas
crash and come back from what they persisted; every node's clock has its own
offset and a rate within the drift bound. Each Ready is carried out as the
shell would: persist (the disk is a ``PersistedState``), check that every
reply is backed by what is now on disk, send, install the snapshot, apply.

The checkers run as the world goes and collect ``violations``:
agreement (no slot committed with two values), validity (every committed value
was proposed), apply order, persist-before-reply, lease disjointness in true
time, and timestamps (each assigned inside its holder's lease, all rising in
true-time order across leaders).
"""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass, field
from typing import Any

from ringkv.txn.paxos import (
    Accept,
    Accepted,
    Committed,
    HeartbeatAck,
    Message,
    PaxosReplica,
    PersistedState,
    Prepare,
    Promise,
    ProposalRefused,
    Ready,
    Reject,
    Role,
)

TICK_S = 0.1
TT_EPSILON_S = 0.002  # each node's TrueTime interval is within this of true time


@dataclass
class Node:
    node_id: str
    offset_s: float
    rate: float
    replica: PaxosReplica | None = None
    disk: PersistedState = field(default_factory=PersistedState)
    incarnation: int = 0
    applied_through: int = 0  # the shell's store: durable, survives crashes
    applied_ts: int = 0  # the highest timestamp the store has applied

    def local(self, true_s: float) -> float:
        return self.offset_s + self.rate * true_s

    def true_of(self, local_s: float) -> float:
        return (local_s - self.offset_s) / self.rate


@dataclass
class Faults:
    loss: float = 0.0
    dup: float = 0.0
    delay_s: float = 0.005  # mean extra delay (exponential)
    cut: set[tuple[str, str]] = field(default_factory=set)  # (src, dst) pairs that drop


class World:
    def __init__(
        self,
        seed: int,
        *,
        size: int = 3,
        replica_cls: type[PaxosReplica] = PaxosReplica,
        drift_ppm: float = 1000.0,
        options: dict[str, float] | None = None,
        check_contract: bool = True,
        compact_every: int = 20,
        extreme_rates: bool = False,
        spares: int = 0,
    ) -> None:
        self.rng = random.Random(seed)
        self.seed = seed
        self.replica_cls = replica_cls
        self.options = {"max_drift_ppm": 1000.0, **(options or {})}
        self.check_contract = check_contract
        self.compact_every = compact_every
        ids = [f"n{i}" for i in range(size + spares)]
        # The group starts as the first ``size`` nodes; spares are there to be added.
        self.initial_members = tuple(ids[:size])
        self.nodes: dict[str, Node] = {}
        for node_id in ids:
            # Rates anywhere within the drift, or (extreme_rates) at either edge of it.
            skew = self.rng.choice([-1, 1]) if extreme_rates else self.rng.uniform(-1, 1)
            rate = 1 + skew * drift_ppm / 1e6
            node = Node(node_id, self.rng.uniform(-1000, 1000), rate)
            node.replica = replica_cls(node_id, [], self.initial_members, **self.options)
            self.nodes[node_id] = node
        self.faults = Faults()
        self.now = 0.0
        self._queue: list[tuple[float, int, str, Any]] = []
        self._seq = 0
        self.proposed: set[bytes] = set()
        self.proposed_at: dict[bytes, float] = {}
        self.committed: dict[int, Committed] = {}  # slot -> what was committed there (by anyone)
        self.commit_time: dict[bytes, float] = {}  # first time a value was applied anywhere
        self.leases: dict[tuple[str, int, float], list[float]] = {}  # (node, inc, start) -> [t0, t1]
        self.last_ts = 0  # the highest timestamp assigned so far, by anyone
        self.violations: list[str] = []
        self.messages_sent = 0
        self.counts: dict[str, int] = {}  # what happened, by kind: for tests that want it exercised
        self.propose_rate = 0.5  # chance per leader tick
        for node_id in ids:
            self._at(self.rng.uniform(0, TICK_S), "tick", (node_id, 0))

    # --- the event loop -------------------------------------------------------------

    def _at(self, when: float, kind: str, payload: Any) -> None:
        self._seq += 1
        heapq.heappush(self._queue, (when, self._seq, kind, payload))

    def run_until(self, end_s: float) -> None:
        while self._queue and self._queue[0][0] <= end_s:
            when, _, kind, payload = heapq.heappop(self._queue)
            self.now = when
            if kind == "tick":
                self._tick(*payload)
            elif kind == "deliver":
                self._deliver(*payload)
            elif kind == "restart":
                self.restart(payload)
            elif kind == "call":
                payload()
        self.now = end_s

    def _tick(self, node_id: str, incarnation: int) -> None:
        node = self.nodes[node_id]
        if node.replica is None or node.incarnation != incarnation:
            return
        self._at(self.now + TICK_S * self.rng.uniform(0.9, 1.1) / node.rate, "tick", (node_id, incarnation))
        local = node.local(self.now)
        replica = node.replica
        self._carry_out(node, replica.tick(local, self.rng))
        if replica.is_leader(local) and self.rng.random() < self.propose_rate:
            self.propose_at(node_id)
        if replica.role is Role.LEADER and self.rng.random() < 0.2:
            # A read timestamp: never logged, must still rise. Asked of a leader
            # whose lease may have lapsed, which must then refuse.
            self._assign(node, local)
        compacted = replica.snapshot.last_slot if replica.snapshot else 0
        if self.compact_every and node.applied_through - compacted > 2 * self.compact_every:
            upto = node.applied_through - self.compact_every
            self._carry_out(node, replica.compact(upto, f"{node_id}/{incarnation}/{upto}"))

    def _deliver(self, dst: str, incarnation: int, msg: Message) -> None:
        node = self.nodes[dst]
        if node.replica is None or node.incarnation != incarnation:
            return  # sent to a process that has since died: its socket is gone
        self._carry_out(node, node.replica.step(msg, node.local(self.now)))

    def count(self, kind: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1

    def send(self, src: str, dst: str, msg: Message) -> None:
        self.messages_sent += 1
        self.count(type(msg).__name__ + (f"/{msg.reason}" if isinstance(msg, Reject) else ""))
        faults = self.faults
        if (src, dst) in faults.cut or self.rng.random() < faults.loss:
            return
        copies = 2 if self.rng.random() < faults.dup else 1
        target = self.nodes[dst]
        for _ in range(copies):
            delay = 0.0005 + self.rng.expovariate(1 / faults.delay_s)
            self._at(self.now + delay, "deliver", (dst, target.incarnation, msg))

    # --- the shell's side of a Ready, and the checkers ---------------------------------

    def _carry_out(self, node: Node, ready: Ready) -> None:
        node.disk.apply(ready.persist)  # fsync
        if self.check_contract:
            self._check_backed(node, ready)
        for out in ready.messages:
            self.send(node.node_id, out.to, out.msg)
        if ready.snapshot is not None:
            if ready.snapshot.last_slot <= node.applied_through:
                self.violations.append(f"{node.node_id}: snapshot at {ready.snapshot.last_slot} is not ahead")
            self.count("snapshot installed")
            node.applied_through = ready.snapshot.last_slot
            node.applied_ts = max(node.applied_ts, ready.snapshot.max_ts_us)
        for item in ready.committed:
            slot, entry = item.slot, item.entry
            if slot != node.applied_through + 1:
                self.violations.append(f"{node.node_id}: applied slot {slot} after {node.applied_through}")
            node.applied_through = slot
            seen = self.committed.setdefault(slot, item)
            if seen != item:
                self.violations.append(f"agreement: slot {slot}: {seen} and {item} ({node.node_id})")
            if entry.noop:
                continue
            if entry.value not in self.proposed:
                self.violations.append(f"validity: {entry.value!r} at {slot} was never proposed")
            if item.superseded:
                self.count("superseded")
                continue
            if entry.ts_us <= node.applied_ts:
                self.violations.append(f"timestamps: {node.node_id} applies {entry.ts_us} after {node.applied_ts}")
            node.applied_ts = entry.ts_us
            self.commit_time.setdefault(entry.value, self.now)
        if node.replica is not None:
            self._record_lease(node)

    def _check_backed(self, node: Node, ready: Ready) -> None:
        """Persist before reply: each promise or accept sent is already on disk."""
        disk = node.disk
        floor = disk.snapshot.last_slot if disk.snapshot else 0
        on_disk = disk.accepted
        for out in ready.messages:
            msg, who = out.msg, node.node_id
            if isinstance(msg, (Promise, Prepare, HeartbeatAck)) and disk.promised < msg.ballot:
                if not isinstance(msg, HeartbeatAck) or msg.granted:
                    name = type(msg).__name__
                    self.violations.append(f"persist: {who} sent {name} {msg.ballot}, disk: {disk.promised}")
            elif isinstance(msg, Accepted):
                for slot in msg.slots:
                    held = on_disk.get(slot)
                    if slot > floor and slot not in disk.chosen and (held is None or held[0] != msg.ballot):
                        self.violations.append(f"persist: {who} sent Accepted {msg.ballot} {slot}, disk: {held}")
            elif isinstance(msg, Accept):
                for slot, entry in msg.entries:
                    if slot > floor and slot not in disk.chosen and on_disk.get(slot) != (msg.ballot, entry):
                        self.violations.append(f"persist: {who} sent Accept {slot} before accepting it")

    def _record_lease(self, node: Node) -> None:
        assert node.replica is not None
        interval = node.replica.lease_interval(node.local(self.now))
        if interval is None:
            return
        key = (node.node_id, node.incarnation, interval[0])
        end = node.true_of(interval[1])
        held = self.leases.get(key)
        if held is None:
            self.leases[key] = [node.true_of(interval[0]), end]
        elif end > held[1]:
            held[1] = end

    def lease_overlaps(self) -> list[str]:
        """Spanner's disjointness invariant, judged in true time."""
        found = []
        items = sorted(self.leases.items(), key=lambda item: item[1][0])
        for i, (key_a, (start_a, end_a)) in enumerate(items):
            for key_b, (start_b, end_b) in items[i + 1:]:
                if start_b >= end_a:
                    break
                if key_a[:2] != key_b[:2]:
                    found.append(f"leases overlap: {key_a[:2]} [{start_a:.3f}, {end_a:.3f}]"
                                 f" and {key_b[:2]} [{start_b:.3f}, {end_b:.3f}]")
        return found

    def _assign(self, node: Node, local: float) -> int | None:
        assert node.replica is not None
        earliest = int((self.now - self.rng.uniform(0, TT_EPSILON_S)) * 1e6)
        latest = int((self.now + self.rng.uniform(0, TT_EPSILON_S)) * 1e6)
        ts = node.replica.assign_ts(local, earliest, latest)
        if ts is None:
            return None
        if ts <= self.last_ts:
            self.violations.append(f"timestamps: {node.node_id} assigned {ts} after {self.last_ts}")
        self.last_ts = max(self.last_ts, ts)
        interval = node.replica.lease_interval(local)
        if interval is None or ts / 1e6 >= node.true_of(interval[1]):
            self.violations.append(f"timestamps: {node.node_id} assigned {ts} outside its lease {interval}")
        return ts

    # --- what tests do to the world --------------------------------------------------------

    def propose_at(self, node_id: str) -> bytes | None:
        node = self.nodes[node_id]
        if node.replica is None:
            return None
        local = node.local(self.now)
        ts = self._assign(node, local)
        if ts is None:
            return None
        value = f"{self.seed}:{len(self.proposed)}".encode()
        try:
            ready = node.replica.propose(value, local, ts_us=ts)
        except ProposalRefused:
            return None
        self.proposed.add(value)
        self.proposed_at[value] = self.now
        self._carry_out(node, ready)
        return value

    def crash(self, node_id: str) -> None:
        node = self.nodes[node_id]
        node.replica = None
        node.incarnation += 1
        self.count("crash")

    def restart(self, node_id: str) -> None:
        node = self.nodes[node_id]
        if node.replica is not None:
            return
        peers = [p for p in self.nodes if p != node_id]
        node.replica = self.replica_cls.restore(
            node_id, peers, node.disk.copy(), node.local(self.now), self.initial_members,
            applied_through=node.applied_through, **self.options,
        )
        self._at(self.now + self.rng.uniform(0, TICK_S), "tick", (node_id, node.incarnation))

    def change_members(self, members: set[str] | frozenset[str]) -> bool:
        """Ask whoever leads to move the group to ``members``; True once proposed."""
        for node in self.nodes.values():
            if node.replica is None or node.replica.role is not Role.LEADER:
                continue
            try:
                ready = node.replica.change_members(members, node.local(self.now))
            except ProposalRefused as refused:
                self.count(f"change refused/{refused.reason}")
                continue
            self.count("change proposed")
            if node.node_id not in members:
                self.count("leader removes itself")
            self._carry_out(node, ready)
            return True
        return False

    def configuration(self) -> frozenset[str] | None:
        """The configuration of the highest committed configuration entry, if any."""
        for slot in sorted(self.committed, reverse=True):
            members = self.committed[slot].entry.members
            if members is not None:
                return frozenset(members)
        return None

    def reconfigure(self, plan: list[frozenset[str]], until_s: float, *, chaos: bool = True) -> int:
        """Drive the group through ``plan`` (one configuration after another)
        until ``until_s``, under random faults when ``chaos``; returns how many
        configurations of the plan were committed."""
        done = 0
        while self.now < until_s:
            if chaos:
                self.chaos(min(until_s, self.now + self.rng.uniform(0.5, 3.0)))
            else:
                self.run_until(min(until_s, self.now + 0.2))
            current = self.configuration()
            if current in plan[done:]:
                done = plan.index(current, done) + 1  # steps may commit between two looks
            if done < len(plan):
                self.change_members(plan[done])
        return done

    def leader(self) -> str | None:
        """A node that leads under a lease now (at most one, if leases are disjoint)."""
        for node in self.nodes.values():
            if node.replica is not None and node.replica.is_leader(node.local(self.now)):
                return node.node_id
        return None

    def heal(self) -> None:
        self.faults = Faults()
        for node_id, node in self.nodes.items():
            if node.replica is None:
                self.restart(node_id)

    def chaos(self, until_s: float) -> None:
        """Random faults until ``until_s``: partitions (one-way too), loss,
        duplication, delay spikes, crashes with restarts."""
        ids = list(self.nodes)
        while self.now < until_s:
            self.run_until(min(until_s, self.now + self.rng.uniform(0.2, 2.5)))
            roll = self.rng.random()
            faults = self.faults
            if roll < 0.15:
                faults.cut = set()
            elif roll < 0.35:
                side = set(self.rng.sample(ids, self.rng.randint(1, len(ids) // 2)))
                faults.cut = {(a, b) for a in ids for b in ids if (a in side) != (b in side)}
            elif roll < 0.45:
                a, b = self.rng.sample(ids, 2)
                faults.cut.add((a, b))  # one way
            elif roll < 0.6:
                faults.loss = self.rng.choice([0.0, 0.05, 0.2, 0.5])
                faults.dup = self.rng.choice([0.0, 0.05, 0.2])
            elif roll < 0.7:
                faults.delay_s = self.rng.choice([0.002, 0.01, 0.05, 0.3])
            elif roll < 0.9:
                victim = self.rng.choice(ids)
                if self.nodes[victim].replica is not None:
                    self.crash(victim)
                    self._at(self.now + self.rng.uniform(0.05, 4.0), "restart", victim)
            else:
                leader = self.leader()
                if leader is not None:  # the interesting one: cut the leader off
                    faults.cut = {(a, b) for a in ids for b in ids if (a == leader) != (b == leader)}

    def isolate_leaders(self, until_s: float) -> int:
        """Cut the current leader off from everyone, again and again, until
        ``until_s``; returns how many times. Each is a leader change where the
        old leader lives on believing in its lease, the case leases exist for."""
        ids = list(self.nodes)
        times = 0
        while self.now < until_s:
            self.run_until(min(until_s, self.now + self.rng.uniform(0.5, 1.5)))
            leader = self.leader()
            if leader is None:
                continue
            times += 1
            self.faults.cut = {(a, b) for a in ids for b in ids if (a == leader) != (b == leader)}
            self.run_until(min(until_s, self.now + self.rng.uniform(2.5, 5.0)))
            self.faults.cut = set()
        return times
