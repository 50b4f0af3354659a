"""Concurrent clients writing unique values and reading them back, recorded as a history.

Clients call a coordinator's ``Node.put``/``Node.get`` directly, inside that
node's process (so a crash or pause of the coordinator stops the request
too), and give up after a client timeout like an HTTP client would. Every
value written is unique ("c3-17": client 3's 17th write), so a read names
the write it saw.
"""

from __future__ import annotations

import asyncio
import functools
import random
from dataclasses import dataclass
from typing import Any

from ringkv.errors import RingKVError, Unavailable
from ringkv.quorum import ConsistencyLevel
from ringkv.sim.cluster import CRASHED, OFF, Machine, SimCluster
from ringkv.sim.history import FAIL, INFO, OK, Op
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
            machine = rng.choice(self.cluster.machines)
            if rng.random() >= spec.write_fraction:
                await self.call(f"c{cid}", machine, "read", key, None, spec.read_cl)
                continue
            writes += 1
            op = await self.call(f"c{cid}", machine, "write", key, f"c{cid}-{writes}",
                                 spec.write_cl)
            if op.status == OK and rng.random() < spec.follow_read and self._next_index < spec.ops:
                # Read it straight back, elsewhere: the read most likely to see a stale
                # replica, the one a client that writes then reads actually makes.
                machine = rng.choice(self.cluster.machines)
                await self.call(f"c{cid}", machine, "read", key, None, spec.read_cl)

    async def final_reads(self, consistency: ConsistencyLevel, attempts: int = 10) -> None:
        """After healing: read every key at ``consistency``, retrying a few times."""
        machines = self.cluster.machines
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
        else:
            coro = node.get(self.spec.keyspace, raw_key, consistency)
        task = machine.run(coro)
        await self._wait(task, self.spec.client_timeout_s)
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

    async def _wait(self, task: asyncio.Task[Any], timeout_s: float) -> None:
        """Wait for ``task`` at most ``timeout_s``, leaving it running if it is late
        (like a client that gives up on a server that may still act)."""
        woken = self.loop.create_future()

        def wake(_: object = None) -> None:
            if not woken.done():
                woken.set_result(None)

        def done(_: asyncio.Task[Any]) -> None:  # one callback, not two: there is one per op
            _retrieve(task)
            wake()

        task.add_done_callback(done)
        timer = self.loop.call_later(timeout_s, wake)
        await woken
        timer.cancel()

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


def _retrieve(task: asyncio.Task[Any]) -> None:
    """Mark a task's failure as seen, so one the client gave up on is not logged."""
    if not task.cancelled():
        task.exception()
