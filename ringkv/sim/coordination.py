"""Watches and session leases on the simulator: a watcher, writers, a lease owner and a
nemesis, run by real nodes on virtual time (issue #17's simulator checks).

The watcher runs the HTTP watch's own poll (``server/watch_http.poll``: the
``changes`` op at every range, merged by ``txn/watch.merge``) into a
``WatchBuffer`` as the stream does, on one node, and at random points
"reconnects": reads only part of what is buffered (perhaps part of one
transaction's events), then starts again on another node from the last
version it received whole, dropping repeats of that version as the client
does (``plant="resume_now"``: a reconnect from the node's now instead, a
client bug the checker must catch). Writers commit transactions (one key, or two in
different ranges) with values no other write has; the nemesis kills a node
(often a range's leader) and restarts it, or cuts one node off for a while.
A lease owner grants a lease, attaches keys and renews it through the lease
routes' own calls (``txn/lease_service.py``); the real sweeper deletes the
keys once it stops. What happened is judged by ``sim/watch_stream.py``.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from ringkv.config import Config
from ringkv.coordinator import Coordinator
from ringkv.errors import RingKVError
from ringkv.server.watch_http import PAGE_EVENTS, WatchSpec, poll, range_ends
from ringkv.sim.cluster import UP, Machine, SimCluster
from ringkv.sim.loop import VirtualTimeLoop
from ringkv.sim.network import NetworkConditions, SimNetwork
from ringkv.sim.run import TXN_KEYSPACE, SimSettings, node_configs
from ringkv.sim.txn_client import keys_across_ranges
from ringkv.txn import leases as L
from ringkv.txn.requests import TxnRequest, Write
from ringkv.txn.service import CHANGES, Op
from ringkv.txn.watch import Change, WatchBuffer, fit

RANGES = 4
CALL_S = 2.0  # a client's bound on one call (its outcome is unknown past it)
POLL_S = 0.05  # the watcher's turn, as txn.watch_poll_ms
MAX_DRIFT_PPM = 100  # clocks drift within the configured bound (truetime.max_drift_ppm 200)


def configs(seed: int, nodes: int = 3) -> list[Config]:
    """Nodes with one transactional keyspace in RANGES ranges."""
    return node_configs(SimSettings(seed=seed, nodes=nodes, workload="list-append",
                                    ranges=RANGES))


def boot_cluster(seed: int, nodes: int = 3) -> tuple[VirtualTimeLoop, SimCluster]:
    loop = VirtualTimeLoop()
    network = SimNetwork(loop, random.Random(seed), NetworkConditions())
    cluster = SimCluster(loop, network, configs(seed, nodes), seed, Coordinator)
    rng = random.Random(f"drift:{seed}")
    for machine in cluster.machines:  # drift within the bound TrueTime is configured for
        machine.clock.drift_ppm = rng.uniform(-MAX_DRIFT_PPM, MAX_DRIFT_PPM)
    return loop, cluster


async def call(machine: Machine, coro: Coroutine[Any, Any, Any],
               timeout_s: float = CALL_S) -> tuple[bool, Any]:
    """Run ``coro`` in ``machine``'s process, bounded: (True, result), or (False, the
    exception or None when it did not end in time, e.g. the process was killed)."""
    task = machine.run(coro)
    await asyncio.wait([task], timeout=timeout_s)
    if not task.done():
        task.cancel()
        return False, None
    if task.cancelled():
        return False, None
    exc = task.exception()
    return (False, exc) if exc is not None else (True, task.result())


def up_machine(cluster: SimCluster, rng: random.Random,
               avoid: Machine | None = None) -> Machine | None:
    choices = [m for m in cluster.machines if m.state == UP and m.node is not None
               and m is not avoid]
    return rng.choice(choices) if choices else None


# -- writers -------------------------------------------------------------------------------


@dataclass
class Writes:
    """What the writers committed: (key, value) -> commit version, or unknown."""

    acked: dict[tuple[bytes, bytes], int] = field(default_factory=dict)
    unknown: set[tuple[bytes, bytes]] = field(default_factory=set)


async def writer(cluster: SimCluster, name: str, keys: list[str], rng: random.Random,
                 writes: Writes, stop: asyncio.Event) -> None:
    n = 0
    while not stop.is_set():  # bounded by stop; each call bounded by CALL_S
        await asyncio.sleep(rng.uniform(0.02, 0.1))
        machine = up_machine(cluster, rng)
        if machine is None or machine.node is None:
            continue
        n += 1
        first = rng.randrange(len(keys))
        picked = [keys[first]] if rng.random() < 0.5 else [
            keys[first], keys[(first + 1) % len(keys)]]  # neighbours: different ranges
        mine = [(k.encode(), json.dumps(f"{name}-{n}-{k}").encode()) for k in picked]
        # Every other write sends no id, as a plain HTTP put does: the node names it where
        # it arrives, so a forward it retries after a timeout is never committed twice.
        request = TxnRequest(TXN_KEYSPACE, None if n % 2 else f"{name}.{n}", (), (),
                             tuple(Write(k, v) for k, v in mine))
        node = machine.node
        ok, answer = await call(machine, node.txn.execute(
            Op("txn", TXN_KEYSPACE, request), started_s=node.clock.monotonic_s(),
            timeout_s=CALL_S))
        for write in mine:
            if ok:
                writes.acked[write] = int(answer["commit_ts"])
            else:
                writes.unknown.add(write)  # it may have committed: at most once then


# -- the watcher ---------------------------------------------------------------------------


class SimWatcher:
    """One client's watch of a prefix, across reconnects to other nodes."""

    def __init__(self, cluster: SimCluster, rng: random.Random, prefix: bytes = b"",
                 *, reconnect_s: float = 1.5, plant: str | None = None) -> None:
        self.cluster = cluster
        self.rng = rng
        self.spec = WatchSpec(TXN_KEYSPACE, prefix, True, None, False)
        self.reconnect_s = reconnect_s  # the mean time between reconnects
        self.plant = plant  # "resume_now": a planted client bug the checker must catch
        self.delivered: list[Change] = []
        self.start_us: int | None = None
        self.resume_us = 0  # the last version received whole
        self.reconnects = 0
        self.partial_cuts = 0  # repeats dropped after a reconnect in mid-version
        self.stop = asyncio.Event()
        self._partial: set[tuple[int, bytes]] = set()  # events seen past resume_us

    def _take(self, item: Change, buffer: WatchBuffer) -> None:
        at = (item.version_us, item.key)
        if at in self._partial:  # a repeat after a reconnect mid-version: dropped
            self.partial_cuts += 1
        else:
            self.delivered.append(item)
            self._partial.add(at)
        if buffer.completes(item):
            self._partial = {p for p in self._partial if p[0] > buffer.delivered_us}
        self.resume_us = max(self.resume_us, buffer.delivered_us)

    async def run(self) -> None:
        while not self.stop.is_set():  # one connection per turn; bounded by stop
            machine = up_machine(self.cluster, self.rng)
            if machine is None or machine.node is None:
                await asyncio.sleep(POLL_S)
                continue
            await self._connection(machine)

    async def _connection(self, machine: Machine) -> None:
        node = machine.node
        assert node is not None
        if self.start_us is None or self.plant == "resume_now":
            ok, now_us = await call(machine, self._now(machine))
            if not ok:
                return
            if self.start_us is None:
                self.start_us = int(now_us)
            # The planted bug: a reconnect without from_version starts from now.
            self.resume_us = int(now_us)
        buffer = WatchBuffer(PAGE_EVENTS * 4, self.resume_us, now_s=node.clock.monotonic_s())
        try:
            ends = range_ends(node.txn, self.spec)
        except RingKVError:  # a node just started knows no ring yet: another node
            await asyncio.sleep(POLL_S)
            return
        loop = asyncio.get_running_loop()
        until_s = loop.time() + self.rng.expovariate(1 / self.reconnect_s)
        while not self.stop.is_set():  # bounded by until_s
            last = loop.time() + POLL_S >= until_s
            if machine.node is not node:
                break  # the node died: connect to another
            ok, merged = await call(machine, poll(
                node.txn, self.spec, ends, buffer.offered_us, started_s=node.clock.monotonic_s(),
                timeout_s=CALL_S))
            if ok:
                fitted = fit(merged, buffer.room)
                if fitted is not None:
                    buffer.offer(fitted)
                # The last turn reads only part of what is buffered (the connection is
                # cut, maybe in the middle of a transaction's events).
                budget = self.rng.randrange(buffer.events + 1) if last else buffer.events + 1
                while budget > 0 and (item := buffer.pop(node.clock.monotonic_s())) is not None:
                    if isinstance(item, Change):
                        budget -= 1
                        self._take(item, buffer)
                self.resume_us = max(self.resume_us, buffer.delivered_us)
            if last:
                break
            await asyncio.sleep(POLL_S)
        self.reconnects += 1

    @staticmethod
    async def _now(machine: Machine) -> int:
        assert machine.node is not None
        return machine.node.txn.snapshot_now_us()


# -- the nemesis ---------------------------------------------------------------------------


@dataclass
class Nemesis:
    """One fault at a time (a majority stays up): kill a node and restart it, or cut one
    node off from the others and heal."""

    cluster: SimCluster
    rng: random.Random
    max_fault_s: float = 2.0
    rest_s: tuple[float, float] = (0.5, 1.5)  # between one fault's end and the next
    log: list[str] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self.stop.is_set():  # bounded by stop
            await asyncio.sleep(self.rng.uniform(*self.rest_s))
            victims = [m for m in self.cluster.machines if m.state == UP]
            if not victims or self.stop.is_set():
                continue
            leaders = [m for m in victims if m.node is not None and any(
                g.runner.is_leader() for g in m.node.txn.groups.values())]
            victim = self.rng.choice(leaders if leaders and self.rng.random() < 0.7 else victims)
            hold_s = self.rng.uniform(0.3, self.max_fault_s)
            if self.rng.random() < 0.5:
                self.log.append(f"{loop.time():.2f} kill {victim.node_id} for {hold_s:.2f}s")
                victim.crash()
                await asyncio.sleep(hold_s)
                await victim.start()
            else:
                others = [m.node_id for m in self.cluster.machines if m is not victim]
                links = {(a, b) for o in others for a, b in
                         ((victim.node_id, o), (o, victim.node_id))}
                self.log.append(f"{loop.time():.2f} cut {victim.node_id} off for {hold_s:.2f}s")
                self.cluster.network.cut(links)
                await asyncio.sleep(hold_s)
                self.cluster.network.heal(links)


# -- the lease owner -----------------------------------------------------------------------


@dataclass
class LeaseOwner:
    """Grants a lease, attaches keys, renews it every ``renew_s`` through any node up
    (as a client with several endpoints), until ``stop``: then it is dead."""

    cluster: SimCluster
    rng: random.Random
    ttl_s: int
    renew_s: float
    keys: list[bytes] = field(default_factory=list)
    lease: L.LeaseId | None = None
    renewed_us: int = 0  # the commit version of its last acknowledged renewal or attach
    renewed_at_s: float = 0.0  # when (virtual time) the owner heard of it
    refusals: list[str] = field(default_factory=list)  # lease_expired answers: never, alive
    machine: Machine | None = None  # the node it talked to last
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def _on_any(self, make: Any) -> Any:
        """Call on an up node until one answers (bounded: the owner's own deadline)."""
        for _ in range(50):
            machine = up_machine(self.cluster, self.rng)
            if machine is not None and machine.node is not None:
                node = machine.node
                ok, answer = await call(machine, make(node))
                if ok:
                    return answer
                if getattr(answer, "code", None) == "lease_expired":
                    self.refusals.append(str(answer))
                    raise answer
            await asyncio.sleep(0.1)
        raise AssertionError("no node answered the lease owner in 50 tries")

    async def start(self, count: int) -> None:
        loop = asyncio.get_running_loop()
        granted = await self._on_any(lambda node: node.leases.grant(
            TXN_KEYSPACE, self.ttl_s, node.clock.monotonic_s()))
        self.lease = L.parse_id(granted["id"])
        self.renewed_us, self.renewed_at_s = int(granted["version"]), loop.time()
        for i in range(count):
            key = f"eph/{self.lease.tag}/{i}".encode()
            lease = self.lease
            await self._on_any(lambda node, key=key: node.leases.put(
                TXN_KEYSPACE, key, json.dumps(i).encode(), lease, (), node.clock.monotonic_s()))
            self.keys.append(key)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        assert self.lease is not None
        lease = self.lease
        while not self.stop.is_set():  # bounded by stop
            await asyncio.sleep(self.renew_s)
            if self.stop.is_set():
                return
            machine = up_machine(self.cluster, self.rng)
            if machine is None or machine.node is None:
                continue
            node = machine.node
            self.machine = machine
            ok, answer = await call(machine, node.leases.keepalive(
                lease, node.clock.monotonic_s()), timeout_s=self.renew_s)
            if ok and not self.stop.is_set():
                self.renewed_us, self.renewed_at_s = int(answer["version"]), loop.time()
            elif getattr(answer, "code", None) == "lease_expired":
                self.refusals.append(str(answer))


async def lease_deadline_us(cluster: SimCluster, lease: L.LeaseId, since_us: int,
                            rng: random.Random) -> int | None:
    """The deadline the lease's record had when it was deleted: its last version's
    (a keepalive whose answer the owner lost counts too), read from the record's
    committed history through the watch's own ``changes`` op. None: never deleted."""
    key = L.record_key(lease)
    for _ in range(50):  # bounded: a node answers once the cluster is whole again
        machine = up_machine(cluster, rng)
        if machine is not None and machine.node is not None:
            node = machine.node
            ok, answer = await call(machine, node.txn.execute(
                Op(CHANGES, TXN_KEYSPACE, key=key, snapshot_ts_us=node.txn.snapshot_now_us(),
                   since_us=since_us, limit=PAGE_EVENTS),
                started_s=node.clock.monotonic_s(), timeout_s=CALL_S))
            if ok:
                last: tuple[bytes, int] | None = None
                for _key, value, version in answer["items"]:
                    if value is None:
                        return None if last is None else L.expires_at_us(
                            L.decode_record(last[0]), last[1])
                    last = (bytes(value), int(version))
                return None
        await asyncio.sleep(0.1)
    raise AssertionError("no node read the lease record's history in 50 tries")


def data_keys(count: int) -> list[str]:
    return keys_across_ranges("w", count, RANGES)
