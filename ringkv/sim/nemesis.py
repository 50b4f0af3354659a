"""Nemeses: faults injected while the workload runs, each from the run's seed.

    partition  cut the network: one node isolated, majority/minority halves,
               a ring (each node reaches only its neighbours), or one-way;
               connections stall across the cut and resume when it heals
    crash      process crash (SIGKILL) and restart on the same disk; loses
               the store's pending batch only (see ``cluster``)
    power      machine crash and restart: also loses unsynced engine writes
    pause      SIGSTOP a node for a while, then SIGCONT
    clog       hold all of a node's traffic for a while, then let it through
    skew       clock offsets and drift per node, and clock steps (NTP-like);
               for measuring last-write-wins, not part of the correctness mixes;
               with ``falsetickers`` (the register workload) only that many
               clocks, a minority, skew and step, and the rest keep true time
               (TrueTime's fault model: a majority of truechimers)
    leader     kill, or cut off, the current leader of a transactional range,
               then restart or heal it
    isolate-repeat
               cut the same node off from all others, again and again
               (10-20 s each, 10-25 s healed in between): a long partition
               must not blind the failure detector to the next one

Each nemesis runs as its own loop, so faults of different kinds overlap.
Every fault is healed when its nemesis stops.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

from ringkv.sim.cluster import UP, Machine, SimCluster

NEMESES = ("partition", "crash", "power", "pause", "clog", "skew", "isolate-repeat", "leader")


class FaultLog:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.lines: list[str] = []
        self.count = 0  # faults injected (heals not counted)

    def fault(self, text: str) -> None:
        self.count += 1
        self.note(text)

    def note(self, text: str) -> None:
        self.lines.append(f"{self._loop.time():8.3f} {text}")


async def _pause_unless(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep ``seconds`` (virtual); True if told to stop meanwhile."""
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        return False
    return True


def _partition(rng: random.Random, ids: list[str]) -> tuple[str, set[tuple[str, str]]]:
    """A random partition: its description and the (from, to) links it cuts."""
    shape = rng.choice(("isolate", "halves", "ring", "one-way"))
    nodes = list(ids)
    rng.shuffle(nodes)
    if shape == "isolate":
        alone, rest = nodes[:1], nodes[1:]
        cut = {(a, b) for a in alone for b in rest} | {(b, a) for a in alone for b in rest}
        return f"isolate {alone[0]}", cut
    if shape == "halves":
        minority = nodes[: (len(nodes) - 1) // 2 or 1]
        majority = nodes[len(minority):]
        cut = ({(a, b) for a in minority for b in majority}
               | {(b, a) for a in minority for b in majority})
        return f"split {sorted(minority)} | {sorted(majority)}", cut
    if shape == "ring":
        # Each node reaches only its ring neighbours: every node sees a majority
        # of 3 of 5, but no two nodes see the same one.
        n = len(nodes)
        cut = {(a, b) for i, a in enumerate(nodes) for j, b in enumerate(nodes)
               if i != j and min((i - j) % n, (j - i) % n) > 1}
        return f"ring {nodes}", cut
    victim, rest = nodes[0], nodes[1:]
    if rng.random() < 0.5:
        return f"one-way: {victim} hears no one", {(b, victim) for b in rest}
    return f"one-way: no one hears {victim}", {(victim, b) for b in rest}


class Nemesis:
    def __init__(self, kind: str, cluster: SimCluster, rng: random.Random, log: FaultLog,
                 *, max_skew_s: float = 0.25, falsetickers: int | None = None) -> None:
        if kind not in NEMESES:
            raise ValueError(f"unknown nemesis {kind!r}; expected some of {', '.join(NEMESES)}")
        self.kind = kind
        self.cluster = cluster
        self.rng = rng
        self.log = log
        self.max_skew_s = max_skew_s
        self.falsetickers = falsetickers
        self._skewed: list[Machine] = list(cluster.machines)  # the clocks skew may move
        self._repeat_victim: str | None = None
        # isolate-repeat: (victim, cut at, healed at) per isolation, in virtual seconds.
        self.isolations: list[tuple[str, float, float]] = []

    async def run(self, stop: asyncio.Event) -> None:
        """Inject faults of this kind until ``stop`` is set, then heal."""
        step: Callable[[asyncio.Event], object] = {
            "partition": self._partition, "crash": self._crash, "power": self._crash,
            "pause": self._pause, "clog": self._clog, "skew": self._skew,
            "isolate-repeat": self._isolate_repeat, "leader": self._leader,
        }[self.kind]
        if self.kind == "skew":
            self._initial_skew()
        for _ in range(100_000):  # bounded: each round takes at least a virtual second
            if await _pause_unless(stop, self.rng.uniform(1.0, 6.0)):
                return
            await step(stop)  # type: ignore[misc]

    def _victim(self) -> Machine | None:
        # Not a machine another nemesis is still starting: killing it mid-start
        # would fail that nemesis's restart, not test the node.
        candidates = [m for m in self.cluster.up()
                      if m.start_task is None or m.start_task.done()]
        return self.rng.choice(candidates) if candidates else None

    async def _partition(self, stop: asyncio.Event) -> None:
        network = self.cluster.network
        text, cut = _partition(self.rng, [m.node_id for m in self.cluster.machines])
        network.cut(cut)
        self.log.fault(f"partition: {text}")
        await _pause_unless(stop, self.rng.uniform(2.0, 12.0))
        network.heal(cut)
        self.log.note(f"heal: {text}")

    async def _isolate_repeat(self, stop: asyncio.Event) -> None:
        if self._repeat_victim is None:
            self._repeat_victim = self.rng.choice(self.cluster.machines).node_id
        victim = self._repeat_victim
        others = [m.node_id for m in self.cluster.machines if m.node_id != victim]
        cut = {(victim, b) for b in others} | {(b, victim) for b in others}
        network = self.cluster.network
        network.cut(cut)
        cut_at = network.loop.time()
        self.log.fault(f"partition: isolate {victim} (isolation {len(self.isolations) + 1})")
        await _pause_unless(stop, self.rng.uniform(10.0, 20.0))
        network.heal(cut)
        self.isolations.append((victim, cut_at, network.loop.time()))
        self.log.note(f"heal: isolate {victim}")
        # Long enough for every peer to see it UP again and learn its heartbeat anew.
        await _pause_unless(stop, self.rng.uniform(10.0, 25.0))

    async def _crash(self, stop: asyncio.Event) -> None:
        victim = self._victim()
        if victim is None:
            return
        power = self.kind == "power"
        victim.crash(power=power)
        self.log.fault(f"{'power off' if power else 'kill -9'} {victim.node_id}")
        # Sometimes a supervisor restarts it at once (within the same second), sometimes
        # it stays down long enough for every peer to notice.
        downtime = self.rng.choice((self.rng.uniform(0.05, 1.0), self.rng.uniform(1.0, 10.0)))
        await _pause_unless(stop, downtime)
        await victim.start()
        self.log.note(f"restart {victim.node_id} (incarnation {victim.incarnation})")

    async def _pause(self, stop: asyncio.Event) -> None:
        victim = self._victim()
        if victim is None:
            return
        victim.pause()
        self.log.fault(f"pause {victim.node_id}")
        await _pause_unless(stop, self.rng.uniform(0.5, 8.0))
        if victim.state != UP:
            victim.resume()
        self.log.note(f"resume {victim.node_id}")

    async def _clog(self, stop: asyncio.Event) -> None:
        victim = self.rng.choice(self.cluster.machines)
        seconds = self.rng.uniform(0.2, 4.0)
        network = self.cluster.network
        network.clogged_until[victim.node_id] = network.loop.time() + seconds
        self.log.fault(f"clog {victim.node_id} for {seconds:.2f}s")
        await _pause_unless(stop, seconds)

    async def _leader(self, stop: asyncio.Event) -> None:
        leaders = sorted({m.node_id for m in self.cluster.up() if m.node is not None
                          for g in m.node.txn.groups.values() if g.runner.is_leader()})
        if not leaders:
            return
        victim = self.cluster.by_id(self.rng.choice(leaders))
        if self.rng.random() < 0.5:
            victim.crash()
            self.log.fault(f"kill -9 leader {victim.node_id}")
            await _pause_unless(stop, self.rng.uniform(0.5, 6.0))
            await victim.start()
            self.log.note(f"restart {victim.node_id} (incarnation {victim.incarnation})")
            return
        others = [m.node_id for m in self.cluster.machines if m.node_id != victim.node_id]
        cut = ({(victim.node_id, b) for b in others} | {(b, victim.node_id) for b in others})
        self.cluster.network.cut(cut)
        self.log.fault(f"partition: isolate leader {victim.node_id}")
        await _pause_unless(stop, self.rng.uniform(1.0, 8.0))
        self.cluster.network.heal(cut)
        self.log.note(f"heal: isolate leader {victim.node_id}")

    def _initial_skew(self) -> None:
        if self.falsetickers is not None:
            machines = list(self.cluster.machines)
            self.rng.shuffle(machines)
            self._skewed = machines[:self.falsetickers]
            for machine in self._skewed:
                # Beyond a small offset: a falseticker is far from true time, either way.
                magnitude = self.rng.uniform(self.max_skew_s / 2, self.max_skew_s)
                machine.clock.offset_us = int(self.rng.choice((-1, 1)) * magnitude * 1e6)
                machine.clock.drift_ppm = self.rng.uniform(-200, 200)
                self.log.fault(f"clock {machine.node_id} (falseticker): offset "
                               f"{machine.clock.offset_us / 1e3:+.1f} ms, "
                               f"drift {machine.clock.drift_ppm:+.0f} ppm")
            return
        for machine in self.cluster.machines:
            machine.clock.offset_us = int(self.rng.uniform(-self.max_skew_s, self.max_skew_s) * 1e6)
            machine.clock.drift_ppm = self.rng.uniform(-200, 200)
            self.log.fault(f"clock {machine.node_id}: offset {machine.clock.offset_us / 1e3:+.1f} ms, "
                           f"drift {machine.clock.drift_ppm:+.0f} ppm")

    async def _skew(self, stop: asyncio.Event) -> None:
        # Step to a new offset within the bound, so skew never grows without limit.
        if not self._skewed:
            return
        victim = self.rng.choice(self._skewed)
        target_us = int(self.rng.uniform(-self.max_skew_s, self.max_skew_s) * 1e6)
        step_us = target_us - victim.clock.offset_us
        victim.clock.step_us(step_us)
        self.log.fault(f"clock step {victim.node_id} by {step_us / 1e3:+.1f} ms")
