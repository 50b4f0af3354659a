"""The lock recipe on the simulator: contenders, a guarded resource and a nemesis
(issue #17's "a lock is never held by two live clients at once, judged by
fencing tokens seen at a guarded resource").

Each contender is the real ``recipes_aio.AsyncLock`` on a ``SimClient`` (the real
``AsyncClient``, carried over the simulated network to real nodes on virtual
time), in a simulated process of its own with a drifting clock. It loops:
``acquire``; a write ``enter`` to the guarded resource with its fencing token;
the recipe's own ``fenced_put`` into the cluster; a while inside; a write
``exit``; ``check()`` (does it still hold?); ``release``. The guarded resource
is a service outside the cluster, reached over the network too: it keeps the
highest token it accepted, refuses lower ones, and records every write
(token, holder, virtual time, accepted or not).

The nemesis kills nodes (mostly a range's leader) and cuts nodes off
(``coordination.Nemesis``); another pauses a contender (often the holder,
sometimes past its lease's TTL: it must then be refused at the resource or
find its lock lost) or cuts a contender off from every node. What happened is
judged by ``sim/lock_history.py``.

Planted bugs, selected by ``plant`` (the recipe itself is untouched):
``"no_wait"``: contenders take the lock without waiting for the one ahead;
``"no_fence"``: the resource accepts every token.
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

from ringkv.client.recipes_aio import AsyncLock
from ringkv.client.recipes_core import FencingRejected, LockLost
from ringkv.errors import RingKVError
from ringkv.sim.clock import SimClock
from ringkv.sim.cluster import SimCluster
from ringkv.sim.coordination import MAX_DRIFT_PPM, Nemesis, boot_cluster
from ringkv.sim.lock_history import ENTER, EXIT, FencedPut, Hold, ResourceWrite
from ringkv.sim.loop import Process
from ringkv.sim.run import TXN_KEYSPACE
from ringkv.sim.sim_client import SimClient, client_machine

LOCK_NAME = "mx"
RESOURCE_KEY = "mx-res"  # the recipe's fenced_put target, in the cluster
PLANTS = (None, "no_wait", "no_fence")


@dataclass(frozen=True)
class LockSettings:
    seed: int
    contenders: int = 3
    duration_s: float = 20.0  # virtual seconds the contenders loop under faults
    ttl_s: int = 2  # each contender's lease
    hold_s: tuple[float, float] = (0.05, 0.4)  # inside the section, between enter and exit
    acquire_timeout_s: float = 8.0
    call_timeout_s: float = 1.0  # the client's bound on one attempt
    node_faults: bool = True  # kill and cut nodes
    client_faults: bool = True  # pause contenders, cut them off
    plant: str | None = None

    def __post_init__(self) -> None:
        if self.plant not in PLANTS:
            raise ValueError(f"plant must be one of {PLANTS}, got {self.plant!r}")


@dataclass
class LockHistory:
    writes: list[ResourceWrite] = field(default_factory=list)
    holds: list[Hold] = field(default_factory=list)
    fenced: list[FencedPut] = field(default_factory=list)
    faults: list[str] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=dict)
    unexpected: list[str] = field(default_factory=list)

    def figures(self) -> dict[str, int]:
        accepted = [w for w in self.writes if w.accepted]
        handovers = sum(1 for a, b in pairwise(accepted) if a.holder != b.holder)
        return {"acquisitions": len(self.holds), "handovers": handovers,
                "max_token": max((w.token for w in accepted), default=0),
                "accepted": len(accepted), "refused": len(self.writes) - len(accepted),
                "kills": sum(" kill " in f for f in self.faults),
                "pauses": sum(" pause " in f for f in self.faults), **self.stats}


class GuardedResource:
    """A service outside the cluster that takes writes fenced by a token."""

    def __init__(self, cluster: SimCluster, history: LockHistory, *, fence: bool) -> None:
        self.cluster = cluster
        self.history = history
        self.fence = fence  # False: the planted bug "no_fence"
        self.highest: int | None = None

    def _apply(self, token: int, holder: str, event: str, done: asyncio.Future[bool],
               sender: Process) -> None:
        ok = not self.fence or self.highest is None or token >= self.highest
        if ok:
            self.highest = token if self.highest is None else max(self.highest, token)
        self.history.writes.append(ResourceWrite(token, holder, event, self.cluster.loop.time(),
                                                 ok))
        self.cluster.loop.deliver_later(self.cluster.network._one_way_s(), sender.context,
                                        _settle, (done, ok))

    async def write(self, process: Process, token: int, holder: str, event: str) -> bool:
        """Send one write; whether it was accepted. (The write is applied when it
        arrives, whatever its sender does meanwhile: paused, it hears back late.)"""
        loop = self.cluster.loop
        done: asyncio.Future[bool] = loop.create_future()
        loop.deliver_later(self.cluster.network._one_way_s(), self.cluster.network._kernel,
                           self._apply, (token, holder, event, done, process))
        return await done


def _settle(done: asyncio.Future[bool], ok: bool) -> None:
    if not done.done():
        done.set_result(ok)


def plant_no_wait(lock: AsyncLock) -> None:
    """The planted bug: this lock's owner holds as soon as it has queued."""
    queue: Any = getattr(lock, "_queue", None)
    if queue is None or not hasattr(queue, "wait_first"):
        raise RuntimeError("plant no_wait needs AsyncLock._queue.wait_first")

    async def first(*args: Any) -> bool:
        return True

    queue.wait_first = first


class Contender:
    def __init__(self, settings: LockSettings, cluster: SimCluster, index: int,
                 resource: GuardedResource, history: LockHistory) -> None:
        self.settings = settings
        self.cluster = cluster
        self.name = f"c{index}"
        self.resource = resource
        self.history = history
        seed = settings.seed
        rng = random.Random(f"contender:{seed}:{index}")
        self.rng = random.Random(rng.random())
        self.process = Process(self.name)
        self.clock = SimClock(cluster.loop, drift_ppm=rng.uniform(-MAX_DRIFT_PPM, MAX_DRIFT_PPM))
        self.kv = SimClient(cluster, self.name, self.process, self.clock,
                            random.Random(rng.random()), keyspace=TXN_KEYSPACE,
                            timeout_s=settings.call_timeout_s)
        self.holding = False
        self.stop = asyncio.Event()

    def start(self) -> asyncio.Task[None]:
        return self.cluster.loop.create_task(self.run(), context=self.process.context)

    async def run(self) -> None:
        while not self.stop.is_set():  # bounded by stop; every call is bounded
            await self.round()
            await asyncio.sleep(self.rng.uniform(0.0, 0.2))

    async def round(self) -> None:
        settings = self.settings
        loop = self.cluster.loop
        lock = self.kv.lock(LOCK_NAME, keyspace=TXN_KEYSPACE, ttl_s=settings.ttl_s,
                            timeout_s=settings.acquire_timeout_s)
        if settings.plant == "no_wait":
            plant_no_wait(lock)
        try:
            if not await lock.acquire():
                return
        except (RingKVError, LockLost):
            return
        acquired_s = loop.time()
        token = lock.fencing_token
        self.holding = True
        confirmed_s: float | None = None
        try:
            if await self.resource.write(self.process, token, self.name, ENTER):
                try:
                    version = await lock.fenced_put(RESOURCE_KEY, {"holder": self.name})
                    self.history.fenced.append(FencedPut(token, self.name, version))
                except (RingKVError, LockLost, FencingRejected):
                    pass  # refused, lost or unknown: the resource's writes judge the lock
                await asyncio.sleep(self.rng.uniform(*settings.hold_s))
                await self.resource.write(self.process, token, self.name, EXIT)
            # Accepted or refused, does it still hold? (Refused, it must not.)
            checked_s = loop.time()
            try:
                await lock.check()
                confirmed_s = checked_s
            except (RingKVError, LockLost):
                pass
        finally:
            self.holding = False
            self.history.holds.append(Hold(self.name, token, acquired_s, confirmed_s))
        try:
            await lock.release()
        except (RingKVError, LockLost):
            pass


@dataclass
class ClientNemesis:
    """Pauses a contender (often the holder), sometimes past its lease's TTL, or cuts
    one off from every node; one fault at a time."""

    cluster: SimCluster
    contenders: list[Contender]
    rng: random.Random
    ttl_s: int
    log: list[str] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        loop = self.cluster.loop
        while not self.stop.is_set():  # bounded by stop
            await asyncio.sleep(self.rng.uniform(0.5, 2.0))
            if self.stop.is_set():
                return
            holders = [c for c in self.contenders if c.holding]
            victim = self.rng.choice(holders if holders and self.rng.random() < 0.7
                                     else self.contenders)
            hold_s = self.rng.uniform(0.2, 2.5 * self.ttl_s)
            if self.rng.random() < 0.6:
                self.log.append(f"{loop.time():.2f} pause {victim.name} for {hold_s:.2f}s")
                loop.pause(victim.process)
                await asyncio.sleep(hold_s)
                loop.resume(victim.process)
            else:
                links = {link for m in self.cluster.machines for link in (
                    (client_machine(victim.name), m.node_id), (m.node_id, client_machine(victim.name)))}
                self.log.append(f"{loop.time():.2f} cut {victim.name} off for {hold_s:.2f}s")
                self.cluster.network.cut(links)
                await asyncio.sleep(hold_s)
                self.cluster.network.heal(links)


def run_locks(settings: LockSettings) -> LockHistory:
    """Run one simulation of the lock to its end; its history (``lock_history`` judges)."""
    loop, cluster = boot_cluster(settings.seed)
    history = LockHistory()
    resource = GuardedResource(cluster, history, fence=settings.plant != "no_fence")

    async def main() -> None:
        await cluster.boot(60, provision=random.Random(settings.seed))
        contenders = [Contender(settings, cluster, i, resource, history)
                      for i in range(settings.contenders)]
        nemeses: list[Any] = []
        if settings.node_faults:
            nemeses.append(Nemesis(cluster, random.Random(f"nemesis:{settings.seed}"),
                                   max_fault_s=1.5, rest_s=(1.0, 2.5)))
        if settings.client_faults:
            nemeses.append(ClientNemesis(cluster, contenders,
                                         random.Random(f"clients:{settings.seed}"),
                                         settings.ttl_s))
        running = [c.start() for c in contenders]
        faults = [asyncio.ensure_future(n.run()) for n in nemeses]
        await asyncio.sleep(settings.duration_s)
        for nemesis in nemeses:
            nemesis.stop.set()
        if faults:
            await asyncio.wait(faults, timeout=30)
        for contender in contenders:
            contender.stop.set()
        await asyncio.wait(running, timeout=60)
        for task in (*faults, *running):
            if task.done():
                task.result()  # a contender's or nemesis's own bug surfaces here
        history.faults = sorted((f for n in nemeses for f in n.log),
                                key=lambda f: float(f.split()[0]))
        for contender in contenders:
            for name, count in contender.kv.stats.items():
                history.stats[name] = history.stats.get(name, 0) + count
            history.unexpected += contender.kv.unexpected
            loop.crash(contender.process)

    # The nodes' own warnings (a peer down, a leader lost) are expected by the hundred.
    ringkv_log = logging.getLogger("ringkv")
    saved_level = ringkv_log.level
    ringkv_log.setLevel(logging.CRITICAL)
    try:
        loop.run_until_complete(main())
    finally:
        cluster.stop_all()
        loop.dispose()
        ringkv_log.setLevel(saved_level)
    return history
