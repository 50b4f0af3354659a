"""Simulated machines running real ringkv nodes, and what can happen to them.

A ``Machine`` is what survives a process: its disk (a ``MemoryEngine``), its
node identity (tokens and known peers) and its clock. Each start runs a new
``Node`` in a new simulated ``Process`` on that machine.

Process faults, and what each loses:

* ``crash`` (SIGKILL): the process's tasks are abandoned where they stand.
  Writes the ``LocalStore`` had not yet handed to the engine (its pending
  group-commit batch) die with the process; what is in the engine survives,
  as LevelDB's log survives in the OS page cache. Peers see their
  connections reset.
* ``power`` (machine crash): as ``crash``, and the engine also loses every
  write since its last sync (``MemoryEngine.crash()``); peers hear nothing
  until the machine boots again (then resets).

Each node runs the real ``Transport`` on the machine's clock, connected
through ``SimNetwork``'s byte streams (``SimHost`` is its ``Network``).
* ``pause`` (SIGSTOP/SIGCONT): nothing runs until resumed; messages and
  timers wait, then all run late.

Topology (``nemesis``'s join, decommission, removenode and wipe): a cluster
may hold spare machines, ``SPARE`` until a nemesis starts one as a new node;
a machine whose node left the ring for good (decommissioned, removed, or
wiped and replaced) is ``GONE``: never restarted, never asked by clients.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Coroutine
from typing import Any

from ringkv.config import Config
from ringkv.coordinator import Coordinator
from ringkv.net.transport import Transport
from ringkv.identity import MemoryIdentity
from ringkv.node import Node
from ringkv.ring import allocate_tokens, token_for
from ringkv.sim.clock import SimClock
from ringkv.sim.loop import Process, VirtualTimeLoop
from ringkv.sim.network import SimNetwork
from ringkv.storage.memory import MemoryEngine

UP, PAUSED, CRASHED, OFF = "up", "paused", "crashed", "off"
SPARE, GONE = "spare", "gone"  # not yet started; left the cluster for good
START_TIMEOUT_S = 60.0  # virtual seconds a node may take to start


class Machine:
    def __init__(self, loop: VirtualTimeLoop, network: SimNetwork, config: Config, seed: int,
                 coordinator_class: type[Coordinator],
                 node_hook: Callable[[Node], None] | None = None) -> None:
        self.loop = loop
        self.network = network
        self.config = config
        self.node_id = config.cluster.node_id
        self.seed = seed
        self.coordinator_class = coordinator_class
        self.node_hook = node_hook  # sees each new Node before it starts (observers, faults)
        self.clock = SimClock(loop)
        self.engine = MemoryEngine()
        self.identity = MemoryIdentity()
        self.process: Process | None = None
        self.node: Node | None = None
        self.transport: Transport | None = None
        self.start_task: asyncio.Task[Any] | None = None
        self.incarnation = 0
        self.state = OFF
        # Under a topology change a nemesis runs: other nemeses leave it alone.
        self.protected = False

    def run(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run ``coro`` as a task of this machine's current process."""
        assert self.process is not None
        return self.loop.create_task(coro, context=self.process.context)

    async def start(self, *, wait_joined: bool = True) -> None:
        """Boot a new node process on this machine's disk, identity and clock.

        Returns once the node is NORMAL on the ring; with ``wait_joined=False``
        at once (``start_task`` then ends when it is NORMAL).
        """
        self.incarnation += 1
        process = Process(f"{self.node_id}.{self.incarnation}")

        def transport_factory(node_id: str, cluster: str, host: str, port: int,
                              handler: Any) -> Transport:
            self.transport = Transport(node_id, cluster, host, port, handler, clock=self.clock,
                                       network=self.network.host(process, self.node_id))
            return self.transport

        self.network.machine_up(self.node_id)
        self.process = process
        self.node = Node(
            self.config,
            clock=self.clock,
            engine=self.engine,
            rng=random.Random(f"{self.seed}/{self.node_id}/{self.incarnation}"),
            transport_factory=transport_factory,
            identity=self.identity,
            coordinator_class=self.coordinator_class,
        )
        if self.node_hook is not None:
            self.node_hook(self.node)
        self.state = UP
        task = self.start_task = self.run(self.node.start())
        if not wait_joined:
            return
        await asyncio.wait([task], timeout=START_TIMEOUT_S)
        if not task.done():
            raise RuntimeError(f"{self.node_id} did not start within {START_TIMEOUT_S}s")
        task.result()

    def crash(self, *, power: bool = False) -> None:
        assert self.process is not None
        self.loop.crash(self.process)
        self.network.process_died(self.process, machine_down=power)
        if power:
            self.network.machines_down.add(self.node_id)
            self.engine.crash()
        self.node = self.transport = None
        self.state = OFF if power else CRASHED

    def retire(self) -> None:
        """The node left the cluster for good: end its process, never restart it."""
        if self.process is not None and self.state != OFF:
            self.loop.crash(self.process)
            self.network.process_died(self.process, machine_down=True)
            self.network.machines_down.add(self.node_id)
        self.node = self.transport = None
        self.state = GONE
        self.protected = False

    def wipe(self) -> None:
        """The disk is lost: a fresh engine and identity (the process is already gone)."""
        self.engine = MemoryEngine()
        self.identity = MemoryIdentity()

    def pause(self) -> None:
        assert self.process is not None
        self.loop.pause(self.process)
        self.state = PAUSED

    def resume(self) -> None:
        assert self.process is not None
        self.loop.resume(self.process)
        self.state = UP


class SimCluster:
    def __init__(self, loop: VirtualTimeLoop, network: SimNetwork, configs: list[Config],
                 seed: int, coordinator_class: type[Coordinator],
                 node_hook: Callable[[Node], None] | None = None, *, spares: int = 0) -> None:
        self.loop = loop
        self.network = network
        self.machines = [Machine(loop, network, config, seed, coordinator_class, node_hook)
                         for config in configs]
        self.topology_lock = asyncio.Lock()  # one topology change at a time
        # The last ``spares`` machines wait, unstarted, for a nemesis's join or wipe.
        for machine in self.machines[len(self.machines) - spares:] if spares else ():
            machine.state = SPARE

    def members(self) -> list[Machine]:
        """The machines whose nodes belong to the cluster (up or not), in order."""
        return [m for m in self.machines if m.state not in (SPARE, GONE)]

    def spares(self) -> list[Machine]:
        return [m for m in self.machines if m.state == SPARE]

    def by_id(self, node_id: str) -> Machine:
        return next(m for m in self.machines if m.node_id == node_id)

    def up(self) -> list[Machine]:
        return [m for m in self.machines if m.state == UP]

    async def boot(self, timeout_s: float, *, provision: random.Random | None = None,
                   together: bool = False) -> None:
        """Start the nodes, then wait until every node sees every other UP on one ring.

        By default they start one after another, each joining the ring the
        previous ones formed (gossip, then token allocation: the real join).
        With ``together``, every node starts at the same instant and the
        joiners take their tokens in turn (``membership.JoinPlanner``).
        With ``provision``, every node instead starts with tokens already on
        its disk, evenly interleaved at a random rotation (like operators who
        set initial tokens), which skips the join and its cost.
        """
        members = self.members()
        if provision is not None:
            count = len(members)
            num_tokens = members[0].config.cluster.num_tokens
            tokens = allocate_tokens(None, count * num_tokens, provision)  # evenly spaced
            order = list(range(count))
            provision.shuffle(order)  # which node follows which around the ring
            for i, machine in enumerate(members):
                machine.identity.save_tokens(
                    tuple(t for j, t in enumerate(tokens) if order[j % count] == i))
        for machine in members:
            await machine.start(wait_joined=not together)
        if together:
            tasks = [m.start_task for m in members if m.start_task is not None]
            await asyncio.wait(tasks, timeout=timeout_s)
            for task in tasks:
                if not task.done():
                    raise RuntimeError(f"the nodes did not all start within {timeout_s}s")
                task.result()
        await self.wait_settled(timeout_s)

    async def wait_settled(self, timeout_s: float) -> bool:
        """Wait (bounded) until every running node sees all nodes UP on one ring."""
        deadline = self.loop.time() + timeout_s
        while self.loop.time() < deadline:
            if self.settled():
                return True
            await asyncio.sleep(0.5)
        return self.settled()

    def settled(self) -> bool:
        members = self.members()
        nodes = [m.node for m in members if m.state == UP and m.node is not None]
        if len(nodes) != len(members):
            return False
        ids = [m.node_id for m in members]
        ring = nodes[0].ring
        return all(
            node.ring == ring and sorted(node.ring.node_ids) == sorted(ids)
            and all(node.is_alive(other) for other in ids)
            for node in nodes
        )

    async def heal(self) -> None:
        """End every fault: reconnect the network, resume and restart processes.
        (Clocks keep whatever skew they have, as real ones would.)"""
        self.network.heal()
        self.network.clogged_until.clear()
        for machine in self.machines:
            if machine.state == PAUSED:
                machine.resume()
        for machine in self.machines:
            if machine.state in (CRASHED, OFF):
                await machine.start()

    def replicas(self, keyspace: str, keys: list[str], rf: int) -> dict[str, dict[str, object]]:
        """What each natural replica of each key holds locally (for the convergence check)."""
        node = next(m.node for m in self.machines if m.node is not None)
        snapshot: dict[str, dict[str, object]] = {}
        for key in keys:
            raw = key.encode()
            replicas = node.ring.replicas(token_for(raw), rf)
            cells: dict[str, object] = {}
            for node_id in replicas:
                peer = self.by_id(node_id).node
                cell = None if peer is None else peer.read_local(keyspace, raw)
                # A tombstone reads as nothing; it may be purged on one replica
                # before another (after gc_grace and a repair), or never reach a
                # replica that never held the value: all three agree.
                cells[node_id] = None if cell is None or cell.tombstone else (
                    cell.json_value(), tuple(cell.ts))
            snapshot[key] = cells
        return snapshot

    def stop_all(self) -> None:
        """End of the run: abandon every process (nothing more will run)."""
        for machine in self.machines:
            if machine.process is not None:
                self.loop.crash(machine.process)
