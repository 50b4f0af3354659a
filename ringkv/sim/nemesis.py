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
    kill-coordinator
               two-phase commit (bank, list-append): wait until a coordinator
               group's leader has sent prepares and not decided, or decided to
               commit while a participant's leader still holds the transaction
               prepared; then kill -9 that leader (between prepare and
               commit), and restart it
    cut-prepared
               two-phase commit: wait until a participant group's leader holds
               a transaction it voted on and has not finished, then cut that
               node off from all others for a while
    isolate-repeat
               cut the same node off from all others, again and again
               (10-20 s each, 10-25 s healed in between): a long partition
               must not blind the failure detector to the next one

Topology changes, each on a node the other nemeses then leave alone
(``Machine.protected``), one at a time (``SimCluster.topology_lock``, as an
operator runs them), and never below ``rf + 1`` nodes on the ring:

    join       start a spare machine as a new node: it takes tokens and
               streams its ranges while the workload runs (Dynamo §4.9)
    decommission
               a live node leaves: LEAVING, streams its ranges out, LEFT, stops
    removenode kill a node for good (power off); a survivor removes it,
               streaming its ranges from the other replicas
    wipe       a node loses its disk for good (power off, never back); a
               spare machine takes its place (``replace_node_id``) and
               streams its ranges from the other replicas

A change the node refuses (409 ``topology_refused``: a node is down, another
change is running) is retried every few seconds, within a bound, then
skipped; each attempt is in the fault log. A change starts only once every
running node agrees on one ring of exactly the members (waited for, bounded),
and none starts after the workload ends; one under way then is finished
(bounded), so the cluster can heal.

Each nemesis runs as its own loop, so faults of different kinds overlap.
Every fault is healed when its nemesis stops.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections.abc import Callable
from typing import Any

from ringkv.address import format_address
from ringkv.errors import TopologyRefused
from ringkv.node import Node
from ringkv.sim.cluster import UP, Machine, SimCluster
from ringkv.txn.twopc import PState
from ringkv.txn.twopc_messages import BeginRecord, DecisionRecord
from ringkv.txn.twopc_records import COORDINATOR

TOPOLOGY = ("join", "decommission", "removenode", "wipe")
TWO_PC = ("kill-coordinator", "cut-prepared")  # aimed at two-phase commit's windows
NEMESES = ("partition", "crash", "power", "pause", "clog", "skew", "isolate-repeat", "leader",
           *TWO_PC, *TOPOLOGY)
WATCH_STEP_S = 0.005  # how often a two-phase-commit nemesis looks for its moment
WATCH_S = 5.0  # how long it looks before giving up this round
TOPOLOGY_TIMEOUT_S = 240.0  # virtual seconds one topology change may take, retries included
RETRY_S = 3.0  # between attempts the node refused
SETTLE_WAIT_S = 60.0  # how long a change waits for one agreed ring before it is skipped


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
                 *, max_skew_s: float = 0.25, falsetickers: int | None = None,
                 rf: int = 3) -> None:
        if kind not in NEMESES:
            raise ValueError(f"unknown nemesis {kind!r}; expected some of {', '.join(NEMESES)}")
        self.kind = kind
        self.cluster = cluster
        self.rng = rng
        self.log = log
        self.max_skew_s = max_skew_s
        self.falsetickers = falsetickers
        self.rf = rf
        self.changes = 0  # topology changes that completed
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
            "kill-coordinator": self._kill_coordinator, "cut-prepared": self._cut_prepared,
            "join": self._join, "decommission": self._decommission,
            "removenode": self._removenode, "wipe": self._wipe,
        }[self.kind]
        if self.kind == "skew":
            self._initial_skew()
        # The two-phase-commit nemeses then wait for their window (WATCH_S at most).
        between = (0.2, 2.0) if self.kind in TWO_PC else (1.0, 6.0)
        for _ in range(100_000):  # bounded: each round takes at least a virtual second
            if await _pause_unless(stop, self.rng.uniform(*between)):
                return
            await step(stop)  # type: ignore[misc]

    def _victim(self) -> Machine | None:
        # Not a machine another nemesis is still starting: killing it mid-start
        # would fail that nemesis's restart, not test the node. Nor one under a
        # topology change.
        candidates = [m for m in self.cluster.up() if not m.protected
                      and (m.start_task is None or m.start_task.done())]
        return self.rng.choice(candidates) if candidates else None

    async def _partition(self, stop: asyncio.Event) -> None:
        network = self.cluster.network
        text, cut = _partition(self.rng, [m.node_id for m in self.cluster.members()])
        network.cut(cut)
        self.log.fault(f"partition: {text}")
        await _pause_unless(stop, self.rng.uniform(2.0, 12.0))
        network.heal(cut)
        self.log.note(f"heal: {text}")

    async def _isolate_repeat(self, stop: asyncio.Event) -> None:
        if self._repeat_victim is None:
            self._repeat_victim = self.rng.choice(self.cluster.members()).node_id
        victim = self._repeat_victim
        others = [m.node_id for m in self.cluster.members() if m.node_id != victim]
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
        victim = self.rng.choice(self.cluster.members())
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
        others = [m.node_id for m in self.cluster.members() if m.node_id != victim.node_id]
        cut = ({(victim.node_id, b) for b in others} | {(b, victim.node_id) for b in others})
        self.cluster.network.cut(cut)
        self.log.fault(f"partition: isolate leader {victim.node_id}")
        await _pause_unless(stop, self.rng.uniform(1.0, 8.0))
        self.cluster.network.heal(cut)
        self.log.note(f"heal: isolate leader {victim.node_id}")

    # -- two-phase commit -------------------------------------------------------

    def _prepared_at(self) -> list[tuple[Machine, str]]:
        """(leader, group) for every participant group whose leader holds a transaction
        it voted on (or is voting on) and has not finished: what its 2PC role holds,
        so a participant that skipped its prepare log shows too."""
        found = []
        for machine in self.cluster.up():
            if machine.node is None:
                continue
            for gid, group in sorted(machine.node.txn.groups.items()):
                roles = group.roles
                if (group.runner.is_leader() and roles is not None
                        and roles.participant.safe_time_bound() is not None):
                    found.append((machine, gid))
        return found

    def _coordinating(self) -> list[tuple[Machine, str]]:
        """(leader, group) for every coordinator group with a transaction in 2PC's
        window: begun (prepares sent) and not decided, or decided to commit while
        some participant's leader still holds it prepared (not yet told)."""
        undecided, untold = [], []
        participants = [group.roles.participant for machine in self.cluster.up()
                        if machine.node is not None for group in machine.node.txn.groups.values()
                        if group.runner.is_leader() and group.roles is not None]
        for machine in self.cluster.up():
            if machine.node is None:
                continue
            for gid, group in sorted(machine.node.txn.groups.items()):
                if not group.runner.is_leader():
                    continue
                for record in group.runner.records.records(COORDINATOR):
                    if isinstance(record, BeginRecord):
                        undecided.append((machine, gid))
                    elif (isinstance(record, DecisionRecord) and record.commit
                          and any(p.state(record.txn_id) is PState.PREPARED
                                  for p in participants)):
                        untold.append((machine, gid))
        return sorted(set(undecided + untold), key=lambda v: (v[0].node_id, v[1]))

    async def _watch(self, stop: asyncio.Event, look: Callable[[], list[Any]]) -> list[Any]:
        """Poll ``look`` every few virtual milliseconds, for a while; what it found."""
        deadline = self.cluster.loop.time() + WATCH_S
        while not stop.is_set() and self.cluster.loop.time() < deadline:
            found = look()
            if found:
                return found
            await asyncio.sleep(WATCH_STEP_S)
        return []

    async def _kill_coordinator(self, stop: asyncio.Event) -> None:
        found = await self._watch(stop, self._coordinating)
        if not found:
            return
        victim, group_id = self.rng.choice(found)
        victim.crash()
        self.log.fault(f"kill -9 {victim.node_id}, leader of coordinator group {group_id} "
                       "between prepare and commit")
        await _pause_unless(stop, self.rng.uniform(0.5, 5.0))
        await victim.start()
        self.log.note(f"restart {victim.node_id} (incarnation {victim.incarnation})")

    async def _cut_prepared(self, stop: asyncio.Event) -> None:
        found = await self._watch(stop, self._prepared_at)
        if not found:
            return
        victim, group_id = self.rng.choice(found)
        others = [m.node_id for m in self.cluster.members() if m.node_id != victim.node_id]
        cut = ({(victim.node_id, b) for b in others} | {(b, victim.node_id) for b in others})
        self.cluster.network.cut(cut)
        self.log.fault(f"partition: isolate {victim.node_id}, leader of participant group "
                       f"{group_id} holding a prepared transaction")
        await _pause_unless(stop, self.rng.uniform(1.0, 6.0))
        self.cluster.network.heal(cut)
        self.log.note(f"heal: isolate {victim.node_id}")

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

    # -- topology ------------------------------------------------------------------

    def _deadline(self) -> float:
        return self.cluster.loop.time() + TOPOLOGY_TIMEOUT_S

    def _ring_agreed(self) -> bool:
        """Every running node sees one ring of exactly the members, with no change
        pending (what an operator checks before the next change)."""
        nodes = [m.node for m in self.cluster.up() if m.node is not None]
        members = sorted(m.node_id for m in self.cluster.members())
        return bool(nodes) and all(
            node.join_state is None and node.future_ring is None and node.ring == nodes[0].ring
            and sorted(node.ring.node_ids) == members for node in nodes)

    async def _ready(self, stop: asyncio.Event, what: str) -> bool:
        """Whether to start a change now: not once the workload is over, and only
        on a settled ring (waited for, bounded; otherwise this round is skipped)."""
        deadline = self.cluster.loop.time() + SETTLE_WAIT_S
        while not stop.is_set():
            if self._ring_agreed():
                return True
            if self.cluster.loop.time() >= deadline:
                self.log.note(f"{what}: skipped (the ring did not settle within "
                              f"{SETTLE_WAIT_S:.0f}s)")
                return False
            await asyncio.sleep(1.0)
        return False

    def _may_shrink(self) -> bool:
        return len(self.cluster.members()) > self.rf + 1

    def _spare(self, replacing: str | None = None) -> Machine | None:
        """The next spare machine, its seeds set to live members (and the node it replaces)."""
        spares = self.cluster.spares()
        seeds = [m for m in self.cluster.up() if not m.protected]
        if not spares or not seeds:
            return None
        spare = spares[0]
        cluster_config = dataclasses.replace(
            spare.config.cluster, replace_node_id=replacing,
            seeds=tuple(format_address(m.config.cluster.listen_host, m.config.cluster.internode_port)
                        for m in seeds[:3]))
        spare.config = dataclasses.replace(spare.config, cluster=cluster_config)
        return spare

    async def _start_new(self, machine: Machine, what: str) -> bool:
        """Start a spare as a new node and wait until it is NORMAL. A start the node
        refuses (a replacement that finds the dead node's heartbeat still moving in
        gossip, say) is tried again on an empty disk, as an operator would; bounded.
        A machine that never made it is retired."""
        machine.protected = True
        deadline = self._deadline()
        while self.cluster.loop.time() < deadline:
            await machine.start(wait_joined=False)
            task = machine.start_task
            assert task is not None
            await asyncio.wait([task], timeout=max(0.0, deadline - self.cluster.loop.time()))
            if not task.done():
                break
            exc = task.exception()
            if exc is None:
                machine.protected = False
                self.changes += 1
                self.log.note(f"{what}: {machine.node_id} is NORMAL")
                return True
            self.log.note(f"{what}: {machine.node_id} failed to start "
                          f"({getattr(exc, 'reason', type(exc).__name__)}); "
                          f"again on an empty disk in {RETRY_S:.0f}s")
            machine.crash(power=True)
            machine.wipe()
            await asyncio.sleep(RETRY_S)
        self.log.note(f"{what}: {machine.node_id} not NORMAL after {TOPOLOGY_TIMEOUT_S:.0f}s; "
                      "given up")
        machine.retire()
        return False

    async def _join(self, stop: asyncio.Event) -> None:
        async with self.cluster.topology_lock:
            if not await self._ready(stop, "join"):
                return
            spare = self._spare()
            if spare is None:
                return
            self.log.fault(f"join {spare.node_id}")
            await self._start_new(spare, "join")

    async def _call_until_accepted(self, stop: asyncio.Event | None, what: str,
                                   pick: Callable[[], Machine | None],
                                   call: Callable[[Node], object],
                                   done: Callable[[], bool] = lambda: False) -> Machine | None:
        """Ask the node ``pick`` names to start a change until it accepts; bounded, and
        given up once ``stop`` is set (None: a change that must finish, e.g. a removal
        of a node already dead). Returns the node that accepted, or None (skipped)."""
        deadline = self._deadline()
        while self.cluster.loop.time() < deadline and not done():
            machine = pick()
            node = None if machine is None else machine.node
            if machine is not None and node is not None and machine.state == UP:
                try:
                    # Inside the node's process, so the change dies with it.
                    await machine.run(_call(call, node))
                    return machine
                except TopologyRefused as exc:
                    self.log.note(f"{what}: {machine.node_id} refused ({exc.reason}); "
                                  f"retry in {RETRY_S:.0f}s")
            if stop is not None and stop.is_set():
                break
            await asyncio.sleep(RETRY_S)
        if not done():
            self.log.note(f"{what}: skipped (refused until the bound)")
        return None

    async def _decommission(self, stop: asyncio.Event) -> None:
        async with self.cluster.topology_lock:
            if not self._may_shrink() or not await self._ready(stop, "decommission"):
                return
            victim = self._victim()
            if victim is None:
                return
            victim.protected = True
            left = asyncio.Event()
            self.log.fault(f"decommission {victim.node_id}")

            def leave(node: Node) -> object:
                node.on_left = left.set
                return node.decommission()

            accepted = await self._call_until_accepted(stop, f"decommission {victim.node_id}",
                                                       lambda: victim, leave)
            if accepted is None:
                victim.protected = False
                return
            deadline = self._deadline()
            while not left.is_set() and self.cluster.loop.time() < deadline:
                node = victim.node
                if node is None or not (node.leaving or node.left):
                    # It crashed, or the leave failed and it went back to NORMAL.
                    self.log.note(f"decommission {victim.node_id}: broke off; it stays")
                    victim.protected = False
                    return
                await asyncio.sleep(0.5)
            if not left.is_set():
                self.log.note(f"decommission {victim.node_id}: not LEFT after "
                              f"{TOPOLOGY_TIMEOUT_S:.0f}s")
                victim.protected = False
                return
            victim.retire()
            self.changes += 1
            self.log.note(f"decommission {victim.node_id}: LEFT, stopped")
            # Its LEFT spreads only during a few gossip rounds before it stops; cut
            # off then, the others keep it LEAVING, as an operator would find it,
            # and remove it as one would.
            deadline = self.cluster.loop.time() + SETTLE_WAIT_S
            while not self._off_every_ring(victim.node_id) and self.cluster.loop.time() < deadline:
                await asyncio.sleep(1.0)
            if not self._off_every_ring(victim.node_id):
                self.log.note(f"decommission {victim.node_id}: still LEAVING on the others' "
                              "rings; removenode it")
                await self._remove(victim.node_id)

    async def _removenode(self, stop: asyncio.Event) -> None:
        async with self.cluster.topology_lock:
            if not self._may_shrink() or not await self._ready(stop, "removenode"):
                return
            victim = self._victim()
            if victim is None:
                return
            victim.crash(power=True)
            victim.retire()
            dead = victim.node_id
            self.log.fault(f"power off {dead} for good; removenode it")
            if await self._remove(dead):
                self.changes += 1

    async def _remove(self, dead: str) -> bool:
        """Have a survivor remove ``dead``, again from another if one breaks off; bounded."""
        deadline = self._deadline()
        coordinator: Machine | None = None
        while self.cluster.loop.time() < deadline:
            if self._off_every_ring(dead):
                by = coordinator.node_id if coordinator is not None else "?"
                self.log.note(f"removenode {dead}: removed (LEFT), run by {by}")
                return True
            node = None if coordinator is None else coordinator.node
            # Running, or done and its LEFT still spreading by gossip: wait.
            running = node is not None and (node.removing == dead
                                             or node.streaming.state == "done")
            if not running:
                coordinator = await self._call_until_accepted(
                    None, f"removenode {dead}", self._victim, lambda node: node.removenode(dead),
                    done=lambda: self._off_every_ring(dead))
                if coordinator is None:
                    continue  # removed meanwhile (checked above), or refused until the bound
                self.log.note(f"removenode {dead}: run by {coordinator.node_id}")
            await asyncio.sleep(1.0)
        self.log.note(f"removenode {dead}: not removed after {TOPOLOGY_TIMEOUT_S:.0f}s")
        return False

    def _off_every_ring(self, dead: str) -> bool:
        """``dead`` is off the one ring every running node agrees on."""
        nodes = [m.node for m in self.cluster.up() if m.node is not None]
        return bool(nodes) and all(dead not in node.ring.node_ids and node.ring == nodes[0].ring
                                   for node in nodes)

    async def _wipe(self, stop: asyncio.Event) -> None:
        async with self.cluster.topology_lock:
            if not self.cluster.spares() or not await self._ready(stop, "wipe"):
                return
            victim = self._victim()
            if victim is None:
                return
            victim.protected = True
            spare = self._spare(replacing=victim.node_id)
            assert spare is not None
            victim.crash(power=True)
            victim.wipe()
            victim.retire()
            self.log.fault(f"wipe {victim.node_id}: its disk is lost; {spare.node_id} replaces it")
            await self._start_new(spare, f"replace {victim.node_id}")


async def _call(call: Callable[[Node], object], node: Node) -> object:
    return call(node)
