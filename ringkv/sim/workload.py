"""Concurrent clients writing unique values and reading them back, recorded as a history.

Two workloads. ``Workload`` (eventual): clients call a coordinator's
``Node.put``/``Node.get`` (and, with ``delete_fraction``, ``Node.delete``)
directly, inside that node's process (so a crash or pause of the coordinator
stops the request too), and give up after a client timeout like an HTTP
client would. Clients ask the cluster's current members. Every
value written is unique ("c3-17": client 3's 17th write), so a read names
the write it saw.

``RegisterWorkload`` (``--workload register``): clients read, write and
compare-and-set a few registers of a transactional keyspace through random
nodes' ``TxnService.execute``, each operation a single-key transaction with a
unique id, recorded as ``RegisterOp``s for the linearizability checker. A
failed condition certainly changed nothing; any other error or a timeout
leaves a write's outcome unknown. Clients also make snapshot reads, as the
HTTP API serves them (``?snapshot_ts=`` or ``?max_staleness_ms=``), through
random nodes, followers included; they are judged by
``sim/snapshot_reads.py`` against the commits the history knows of.

Two white-box observers use the simulator's knowledge, through each
``TxnService``'s public ``faults`` hooks: ``CommitObserver`` records, at each
leader, every commit's timestamp and the true (virtual) time at which the
leader answered (Spanner §4.1.2); ``SafeTimeObserver`` records, for every
snapshot read served, its timestamp and the serving replica's safe time at
that moment (§4.1.3).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import random
from collections import Counter
from dataclasses import dataclass
from typing import Any

from ringkv.errors import ConditionFailed, NotFound, RingKVError, Unavailable
from ringkv.node import Node
from ringkv.quorum import ConsistencyLevel
from ringkv.sim.checkers import EXCERPT_LINES, Verdict
from ringkv.sim.clock import EPOCH_US
from ringkv.sim.cluster import CRASHED, OFF, Machine, SimCluster
from ringkv.sim.history import DELETE, FAIL, INFO, OK, Op
from ringkv.sim.linearizability import RegisterOp
from ringkv.sim.snapshot_reads import COMMITTED, FAILED, UNKNOWN, KnownWrite, SnapshotRead
from ringkv.txn.requests import Condition, TxnRequest, Write, comparable_json
from ringkv.txn.service import Op as TxnOp
from ringkv.versioning import encode_json_value


@dataclass(frozen=True)
class WorkloadSpec:
    ops: int
    clients: int
    keys: int
    write_fraction: float
    read_cl: ConsistencyLevel
    write_cl: ConsistencyLevel
    duration_s: float  # virtual seconds the ops are spread over (sets the think time)
    follow_read: float = 0.3  # chance that an acknowledged write is read back at once
    # Share of the writes that are deletes instead (0: none, and no draw for it,
    # so histories without deletes are unchanged).
    delete_fraction: float = 0.0
    client_timeout_s: float = 5.0
    keyspace: str = "default"

    @functools.cached_property
    def key_names(self) -> list[str]:
        return [f"k{i}" for i in range(self.keys)]


class Workload:
    def __init__(self, spec: WorkloadSpec, cluster: SimCluster, seed: int) -> None:
        self.spec = spec
        self.cluster = cluster
        self.loop = cluster.loop
        self.seed = seed
        self.ops: dict[int, Op] = {}  # completed ops by index
        self._open: dict[int, Op] = {}  # invoked, not (yet) answered
        self._next_index = 0
        self.unexpected: list[str] = []  # exceptions that are not ringkv errors: bugs

    # -- running -------------------------------------------------------------

    async def run(self) -> None:
        await asyncio.gather(*(self._client(c) for c in range(self.spec.clients)))

    async def _client(self, cid: int) -> None:
        spec = self.spec
        rng = random.Random(f"{self.seed}/client/{cid}")
        think_s = spec.clients * spec.duration_s / max(1, spec.ops)
        writes = 0
        for _ in range(spec.ops):  # bounded: the shared budget ends it sooner
            await asyncio.sleep(rng.expovariate(1 / think_s))
            if self._next_index >= spec.ops:
                return
            key = rng.choice(spec.key_names)
            machine = rng.choice(self.cluster.members())
            if rng.random() >= spec.write_fraction:
                await self.call(f"c{cid}", machine, "read", key, None, spec.read_cl)
                continue
            if spec.delete_fraction and rng.random() < spec.delete_fraction:
                op = await self.call(f"c{cid}", machine, DELETE, key, None, spec.write_cl)
            else:
                writes += 1
                op = await self.call(f"c{cid}", machine, "write", key, f"c{cid}-{writes}",
                                     spec.write_cl)
            if op.status == OK and rng.random() < spec.follow_read and self._next_index < spec.ops:
                # Read it straight back, elsewhere: the read most likely to see a stale
                # replica, the one a client that writes then reads actually makes.
                machine = rng.choice(self.cluster.members())
                await self.call(f"c{cid}", machine, "read", key, None, spec.read_cl)

    async def final_reads(self, consistency: ConsistencyLevel, attempts: int = 10) -> None:
        """After healing: read every key at ``consistency``, retrying a few times."""
        machines = self.cluster.members()
        for i, key in enumerate(self.spec.key_names):
            for attempt in range(attempts):
                machine = machines[(i + attempt) % len(machines)]
                op = await self.call("final", machine, "read", key, None, consistency, final=True)
                if op.status == OK:
                    break
                await asyncio.sleep(1.0)

    async def call(self, process: str, machine: Machine, kind: str, key: str,
                   value: str | None, consistency: ConsistencyLevel, *, final: bool = False) -> Op:
        index = self._next_index
        self._next_index += 1
        start = self.loop.time()
        invoked = Op(index, process, kind, key, value, start, None, INFO, machine.node_id,
                     consistency.value, None, final)
        if machine.state in (CRASHED, OFF) or machine.node is None:
            # Nobody listens: the connection is refused, so nothing was done.
            return self._record(invoked, FAIL, start, value, "connection refused")
        self._open[index] = invoked
        node = machine.node
        raw_key = key.encode()
        if kind == "write":
            assert value is not None
            coro: Any = node.put(self.spec.keyspace, raw_key, encode_json_value(value), None,
                                 consistency)
        elif kind == DELETE:
            coro = node.delete(self.spec.keyspace, raw_key, consistency)
        else:
            coro = node.get(self.spec.keyspace, raw_key, consistency)
        task = machine.run(coro)
        await wait_for_answer(self.loop, task, self.spec.client_timeout_s)
        if not task.done():
            return self._record(invoked, INFO, None, value, "client timeout")
        exc = task.exception()
        end = self.loop.time()
        if exc is None:
            cell = task.result().cell
            if kind == "read":
                value = None if cell is None or cell.tombstone else cell.json_value()
            ts = None if cell is None else (cell.ts.wall_us, cell.ts.logical)
            return self._record(invoked, OK, end, value, None, ts)
        if not isinstance(exc, RingKVError):
            self.unexpected.append(f"{invoked.line()}: {exc!r}")
        # Unavailable is decided before anything is sent; any other failed write may
        # still have reached a replica, so its outcome is unknown. Reads change nothing.
        certain = isinstance(exc, Unavailable) or kind == "read"
        return self._record(invoked, FAIL if certain else INFO, end, value, type(exc).__name__)

    def _record(self, invoked: Op, status: str, end: float | None, value: str | None,
                error: str | None, ts: tuple[int, int] | None = None) -> Op:
        op = Op(invoked.index, invoked.process, invoked.kind, invoked.key, value, invoked.start,
                end, status, invoked.node, invoked.consistency, error, invoked.final, ts)
        self._open.pop(op.index, None)
        self.ops[op.index] = op
        return op

    def history(self) -> list[Op]:
        """Every op in invocation order; ops still in flight are indeterminate (INFO)."""
        everything = {**self._open, **self.ops}
        return [everything[i] for i in sorted(everything)]


@dataclass(frozen=True)
class RegisterSpec:
    ops: int
    clients: int
    keys: int
    duration_s: float  # virtual seconds the ops are spread over
    read_fraction: float = 0.25  # strong reads
    snapshot_fraction: float = 0.2  # snapshot reads, at a timestamp or with bounded staleness
    write_fraction: float = 0.15  # the rest are compare-and-set
    follow_snapshot: float = 0.3  # chance that an acknowledged write is read back at its commit_ts
    client_timeout_s: float = 3.0
    keyspace: str = "txn"

    @functools.cached_property
    def key_names(self) -> list[str]:
        return [f"r{i}" for i in range(self.keys)]


def true_us(loop: asyncio.AbstractEventLoop) -> int:
    """The simulator's true time in µs (what every truechimer's wall clock reads)."""
    return EPOCH_US + int(loop.time() * 1_000_000)


@dataclass(frozen=True)
class Commit:
    leader: str
    commit_ts_us: int
    answered_true_us: int  # true time when the leader answered (after commit wait)


class CommitObserver:
    """White-box (Spanner §4.1.2): each commit's ``s`` and the true time its leader answered."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.commits: list[Commit] = []

    def attach(self, node: Node) -> None:
        def committed(commit_ts_us: int) -> None:  # called once commit wait (if any) is over
            self.commits.append(Commit(node.node_id, commit_ts_us, true_us(self.loop)))

        node.txn.faults.on_commit = committed

    def verdict(self) -> Verdict:
        """Every commit's timestamp is below the true time at which it was acknowledged."""
        early = [c for c in self.commits if c.commit_ts_us >= c.answered_true_us]
        if not early:
            return Verdict("commit wait", True, f"{len(self.commits)} commits acknowledged after "
                           "their timestamp had passed in true time")
        lines = tuple(f"{c.leader} answered commit at s={c.commit_ts_us} when true time was "
                      f"{c.answered_true_us} ({(c.commit_ts_us - c.answered_true_us) / 1000:.3f} "
                      f"ms early)" for c in early[:EXCERPT_LINES])
        return Verdict("commit wait", False, f"{len(early)} of {len(self.commits)} commits "
                       "acknowledged before true time reached their timestamp", len(early), lines)


@dataclass(frozen=True)
class ServedSnapshot:
    node: str
    group_id: str
    read_ts_us: int
    safe_ts_us: int  # the serving replica's safe time (highest applied timestamp) then


class SafeTimeObserver:
    """White-box (Spanner §4.1.3): every snapshot read is served at or below the
    serving replica's safe time, as the simulator sees that replica's group."""

    def __init__(self) -> None:
        self.served: list[ServedSnapshot] = []

    def attach(self, node: Node) -> None:
        def served(group_id: str, read_ts_us: int) -> None:
            runner = node.txn.groups[group_id].runner
            self.served.append(ServedSnapshot(node.node_id, group_id, read_ts_us,
                                              runner.applied_ts_us))

        node.txn.faults.on_snapshot_read = served

    def verdict(self) -> Verdict:
        unsafe = [s for s in self.served if s.read_ts_us > s.safe_ts_us]
        if not unsafe:
            return Verdict("safe time", True, f"{len(self.served)} snapshot reads served at or "
                           "below the serving replica's safe time")
        lines = tuple(f"{s.node} served {s.group_id} at {s.read_ts_us}, above its safe time "
                      f"{s.safe_ts_us} (by {(s.read_ts_us - s.safe_ts_us) / 1000:.3f} ms)"
                      for s in unsafe[:EXCERPT_LINES])
        return Verdict("safe time", False, f"{len(unsafe)} of {len(self.served)} snapshot reads "
                       "served above the serving replica's safe time", len(unsafe), lines)


class RegisterWorkload:
    def __init__(self, spec: RegisterSpec, cluster: SimCluster, seed: int) -> None:
        self.spec = spec
        self.cluster = cluster
        self.loop = cluster.loop
        self.seed = seed
        self.ops: dict[int, Op] = {}
        self._open: dict[int, tuple[Op, RegisterOp | None]] = {}
        self._registers: dict[int, RegisterOp] = {}
        self._next_index = 0
        self.unexpected: list[str] = []
        self.resolved: Counter[str] = Counter()  # unknown outcomes, as resolve_unknown found
        # What the snapshot-read checker needs: every write asked for, the commit
        # timestamps learned (from acks, outcome queries and strong reads), the
        # writes known not to have committed, and the answered snapshot reads.
        self._written: dict[int, tuple[str, str]] = {}  # index -> (key, value)
        self._commit_ts: dict[int, int] = {}
        self._not_committed: set[int] = set()
        self._observed: dict[tuple[str, str], int] = {}  # (key, value) -> version, strong reads
        self.snapshot_reads: list[SnapshotRead] = []

    async def run(self) -> None:
        await asyncio.gather(*(self._client(c) for c in range(self.spec.clients)))

    async def _client(self, cid: int) -> None:
        spec = self.spec
        rng = random.Random(f"{self.seed}/register/{cid}")
        think_s = spec.clients * spec.duration_s / max(1, spec.ops)
        seen: dict[str, str | None] = {}  # the value this client last saw per key
        learned_ts: list[int] = []  # the last commit timestamp this client learned
        written = 0
        for _ in range(spec.ops):  # bounded: the shared budget ends it sooner
            await asyncio.sleep(rng.expovariate(1 / think_s))
            if self._next_index >= spec.ops:
                return
            key = rng.choice(spec.key_names)
            machine = rng.choice(self.cluster.machines)
            draw = rng.random()
            if draw < spec.read_fraction:
                op = await self.call(f"c{cid}", machine, "read", key)
                if op.status == OK:
                    seen[key] = op.value
                continue
            draw -= spec.read_fraction
            if draw < spec.snapshot_fraction:
                await self.snapshot_read(f"c{cid}", machine, key, rng, learned_ts)
                continue
            written += 1
            kind = "write" if draw < spec.snapshot_fraction + spec.write_fraction else "cas"
            op = await self.call(f"c{cid}", machine, kind, key, f"c{cid}-{written}",
                                 seen.get(key), seen=seen)
            if op.ts is None:
                continue
            learned_ts[:] = [op.ts[0]]
            if rng.random() < spec.follow_snapshot and self._next_index < spec.ops:
                # Read one's own write at its commit timestamp, through any replica:
                # one behind the leader must wait for its safe time to pass it.
                machine = rng.choice(self.cluster.machines)
                await self.snapshot_read(f"c{cid}", machine, key, rng, learned_ts,
                                         at_ts=op.ts[0])

    async def final_reads(self, attempts: int = 10) -> None:
        """After healing: a strong read of every key, retried a few times."""
        machines = self.cluster.machines
        for i, key in enumerate(self.spec.key_names):
            for attempt in range(attempts):
                op = await self.call("final", machines[(i + attempt) % len(machines)], "read", key)
                if op.status == OK:
                    break
                await asyncio.sleep(1.0)

    async def call(self, process: str, machine: Machine, kind: str, key: str,
                   value: str | None = None, expected: str | None = None, *,
                   seen: dict[str, str | None] | None = None) -> Op:
        index = self._next_index
        self._next_index += 1
        start = self.loop.time()
        shown = f"{expected!r}->{value!r}" if kind == "cas" else value
        invoked = Op(index, process, kind, key, shown, start, None, INFO, machine.node_id,
                     "SERIAL", None, process == "final")
        if machine.state in (CRASHED, OFF) or machine.node is None:
            return self._record(invoked, FAIL, start, None, "connection refused")
        node = machine.node
        raw = key.encode()
        spec = self.spec
        txn_id = f"{process}.{index}"
        if kind == "read":
            request = TxnOp("get", spec.keyspace, key=raw)
            pending: RegisterOp | None = None
        else:
            assert value is not None
            conditions: tuple[Condition, ...] = ()
            if kind == "cas":
                conditions = ((Condition(raw, "absent"),) if expected is None else
                              (Condition(raw, "equals", equals=comparable_json(expected)),))
            txn = TxnRequest(spec.keyspace, txn_id, (), conditions,
                             (Write(raw, json.dumps(value).encode()),))
            self._written[index] = (key, value)
            request = TxnOp("txn", spec.keyspace, txn)
            pending = RegisterOp(process, kind, key, value, start, None, expected,
                                 None if kind == "cas" else True)
        if node.txn.clock_status()["fenced"]:
            # What execute does first: a fenced node refuses, doing nothing. (Later, a
            # ClockUncertain may come after a commit, so only this one is certain.)
            return self._record(invoked, FAIL, start, None, "ClockUncertain")
        self._open[index] = (invoked, pending)
        task = await self._execute(machine, request)
        if not task.done():
            return self._record(invoked, INFO, None, pending, "client timeout")
        exc = task.exception()
        end = self.loop.time()
        if exc is None:
            result = task.result()
            if kind == "read":
                raw_value = result["reads"][0]["value"]
                read = None if raw_value is None else json.loads(raw_value)
                version = result["reads"][0].get("version")
                if read is not None and version is not None:
                    self._observed[(key, read)] = int(version)
                return self._record(invoked._replace(value=read), OK, end,
                                    RegisterOp(process, "read", key, read, start, end), None)
            assert pending is not None
            if seen is not None:
                seen[key] = value
            self._commit_ts[index] = int(result["commit_ts"])
            return self._record(invoked, OK, end, RegisterOp(
                process, kind, key, value, start, end, expected, True), None,
                (int(result["commit_ts"]), 0))
        if not isinstance(exc, RingKVError):
            self.unexpected.append(f"{invoked.line()}: {exc!r}")
        if isinstance(exc, ConditionFailed) and kind == "cas":
            current = exc.details.get("current_value")
            if seen is not None:
                seen[key] = current if isinstance(current, str) else None
            return self._record(invoked, FAIL, end, RegisterOp(
                process, kind, key, value, start, end, expected, False), "condition_failed")
        if kind == "read":  # a failed read changed nothing and tells nothing
            return self._record(invoked, FAIL, end, None, type(exc).__name__)
        return self._record(invoked, INFO, end, pending, type(exc).__name__)

    async def snapshot_read(self, process: str, machine: Machine, key: str, rng: random.Random,
                            learned_ts: list[int], *, at_ts: int | None = None) -> Op:
        """A snapshot read as ``GET ...?snapshot_ts=`` or ``?max_staleness_ms=`` makes it:
        at ``at_ts`` if given, else at a commit timestamp this client learned, at the
        asked node's clock (now or up to 300 ms ago), or with bounded staleness;
        any replica with a fresh enough safe time answers, followers included."""
        index = self._next_index
        self._next_index += 1
        start = self.loop.time()
        node = machine.node
        snapshot_ts: int | None = at_ts
        staleness_ms: int | None = None
        draw = rng.random()
        if at_ts is not None:
            pass
        elif draw < 0.25 and learned_ts:
            snapshot_ts = learned_ts[0]
        elif draw < 0.65 and node is not None:
            snapshot_ts = node.clock.wall_us() - rng.choice((0, rng.randrange(300_000)))
        else:
            staleness_ms = rng.choice((250, 1000, 5000))
        asked = (f"snapshot_ts={snapshot_ts}" if snapshot_ts is not None
                 else f"max_staleness_ms={staleness_ms}")
        invoked = Op(index, process, "snapshot", key, None, start, None, INFO, machine.node_id,
                     asked)
        if machine.state in (CRASHED, OFF) or node is None:
            return self._record(invoked, FAIL, start, None, "connection refused")
        if node.txn.clock_status()["fenced"]:
            return self._record(invoked, FAIL, start, None, "ClockUncertain")
        self._open[index] = (invoked, None)
        spec = self.spec
        request = TxnOp("snapshot_get", spec.keyspace, key=key.encode(),
                        snapshot_ts_us=snapshot_ts, max_staleness_ms=staleness_ms)
        task = await self._execute(machine, request)
        if not task.done():
            return self._record(invoked, INFO, None, None, "client timeout")
        exc = task.exception()
        end = self.loop.time()
        if exc is None:
            answer = task.result()
            value = None if answer["value"] is None else json.loads(answer["value"])
            version: int | None = int(answer["version"])
            receipt = answer["receipt"]
        elif isinstance(exc, NotFound) and isinstance(exc.details.get("receipt"), dict):
            value, version, receipt = None, None, exc.details["receipt"]
        else:
            if not isinstance(exc, RingKVError):
                self.unexpected.append(f"{invoked.line()}: {exc!r}")
            return self._record(invoked, FAIL, end, None, type(exc).__name__)
        read_ts = int(receipt["read_ts"])
        self.snapshot_reads.append(SnapshotRead(
            index, process, machine.node_id, key, asked, read_ts, value, version,
            None if staleness_ms is None else staleness_ms * 1000,
            EPOCH_US + int(start * 1_000_000)))
        return self._record(invoked._replace(value=value), OK, end, None, None, (read_ts, 0))

    def known_writes(self) -> list[KnownWrite]:
        """Every write and compare-and-set, with what the history knows of its outcome."""
        writes = []
        for index, (key, value) in sorted(self._written.items()):
            op = self.ops.get(index)
            if index in self._commit_ts:
                writes.append(KnownWrite(key, value, COMMITTED, self._commit_ts[index]))
            elif (key, value) in self._observed:  # a strong read saw it: it committed then
                writes.append(KnownWrite(key, value, COMMITTED, self._observed[(key, value)]))
            elif index in self._not_committed or (op is not None and op.status == FAIL):
                writes.append(KnownWrite(key, value, FAILED))
            else:
                writes.append(KnownWrite(key, value, UNKNOWN))
        return writes

    async def resolve_unknown(self, attempts: int = 5) -> None:
        """After healing, ask for the outcome of every write whose answer never came
        (``GET /v1/txn/{id}``): committed ones took effect before the answer, and
        the not committed ones never will. Unanswered ones stay unknown."""
        machines = self.cluster.machines
        unknown = sorted(i for i, r in self._registers.items() if r.end is None)
        unknown += sorted(i for i, (_, r) in self._open.items() if r is not None)
        for n, index in enumerate(unknown):
            register = self._registers.get(index) or self._open[index][1]
            assert register is not None
            txn_id = f"{register.process}.{index}"
            for attempt in range(attempts):
                machine = machines[(n + attempt) % len(machines)]
                node = machine.node
                if node is None:
                    continue
                request = TxnOp("status", self.spec.keyspace, key=register.key.encode(),
                                txn_id=txn_id)
                task = await self._execute(machine, request)
                if not task.done():
                    continue
                exc = task.exception()
                if exc is None and task.result().get("status") == "committed":
                    self._registers[index] = dataclasses.replace(register, end=self.loop.time(),
                                                                 ok=True)
                    self._commit_ts[index] = int(task.result()["commit_ts"])
                    self.resolved["committed"] += 1
                    break
                if (isinstance(exc, NotFound) and exc.details.get("status") == "not_committed"
                        and exc.details.get("definitive")):
                    self._registers.pop(index, None)
                    self._open.pop(index, None)
                    self._not_committed.add(index)
                    self.resolved["not committed"] += 1
                    break
            else:
                self.resolved["unresolved"] += 1

    async def _execute(self, machine: Machine, request: TxnOp) -> asyncio.Task[Any]:
        """Send ``request`` to ``machine``'s node as a client would: the node's own
        deadline, and the client gives up half a second after it (the task may
        still be running then)."""
        node = machine.node
        assert node is not None
        timeout_s = self.spec.client_timeout_s
        task = machine.run(node.txn.execute(request, started_s=node.clock.monotonic_s(),
                                            timeout_s=timeout_s))
        await wait_for_answer(self.loop, task, timeout_s + 0.5)
        return task

    def _record(self, invoked: Op, status: str, end: float | None, register: RegisterOp | None,
                error: str | None, ts: tuple[int, int] | None = None) -> Op:
        op = Op(invoked.index, invoked.process, invoked.kind, invoked.key, invoked.value,
                invoked.start, end, status, invoked.node, invoked.consistency, error,
                invoked.final, ts)
        self._open.pop(op.index, None)
        self.ops[op.index] = op
        if register is not None:
            self._registers[op.index] = register
        return op

    def history(self) -> list[Op]:
        everything = {**{i: op for i, (op, _) in self._open.items()}, **self.ops}
        return [everything[i] for i in sorted(everything)]

    def register_history(self) -> list[RegisterOp]:
        """What the linearizability checker judges: ops still open at the end are unknown."""
        registers = {**{i: r for i, (_, r) in self._open.items() if r is not None},
                     **self._registers}
        return [registers[i] for i in sorted(registers)]


async def wait_for_answer(loop: asyncio.AbstractEventLoop, task: asyncio.Task[Any],
                timeout_s: float) -> None:
    """Wait for ``task`` at most ``timeout_s``, leaving it running if it is late
    (like a client that gives up on a server that may still act)."""
    woken = loop.create_future()

    def wake(_: object = None) -> None:
        if not woken.done():
            woken.set_result(None)

    def done(_: asyncio.Task[Any]) -> None:  # one callback, not two: there is one per op
        _retrieve(task)
        wake()

    task.add_done_callback(done)
    timer = loop.call_later(timeout_s, wake)
    await woken
    timer.cancel()


def _retrieve(task: asyncio.Task[Any]) -> None:
    """Mark a task's failure as seen, so one the client gave up on is not logged."""
    if not task.cancelled():
        task.exception()
