"""The transactional tier moves with the ring (issue #12 §5), in the deterministic
simulator: the real nodes on virtual time, compare-and-set, write and read
clients on a few registers of a transactional keyspace while a fifth node
joins by bootstrap and then decommissions. A range whose bounds stay and whose
replicas change moves its Paxos group through the group's own log, one member at
a time (Paxos Made Simple §3's reconfiguration, Raft §6's one server at a time,
Spanner §4.1's lease disjointness across the change); the history is judged by
the linearizability checker (Herlihy and Wing), and a planted bug (the new
replica starts the group by itself instead of joining it as a learner caught up
through the log) is caught.

The keyspace is cut into RANGES fixed slices (``ranges``), so a join cuts none:
each slice whose end token the new node now replicates moves (the new node in
place of an old replica), the others stay. The decommission undoes it: the
groups move back. Nothing is refused at any point."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
from typing import Any

from ringkv.coordinator import Coordinator
from ringkv.errors import ConditionFailed, RangeMoving, RingKVError
from ringkv.node import Node
from ringkv.ring import allocate_tokens, token_for
from ringkv.sim.cluster import Machine, SimCluster
from ringkv.sim.linearizability import RegisterOp, linearizable
from ringkv.sim.loop import VirtualTimeLoop
from ringkv.sim.network import NetworkConditions, SimNetwork
from ringkv.sim.run import TXN_KEYSPACE, SimSettings, node_configs
from ringkv.txn.ranges import Range, RangeMap
from ringkv.txn.requests import Condition, TxnRequest, Write, comparable_json
from ringkv.txn.service import Op as TxnOp

SEED = 11
OP_TIMEOUT_S = 2.0
CLIENTS = 6
KEYS_PER_RANGE = 2
RANGES = 4  # the transactional keyspace's fixed slices


def _configs() -> list[Any]:
    configs = node_configs(SimSettings(seed=SEED, nodes=5, workload="register"))
    return [dataclasses.replace(
        c, cluster=dataclasses.replace(c.cluster, num_tokens=1),
        keyspaces={**c.keyspaces, TXN_KEYSPACE: dataclasses.replace(c.keyspaces[TXN_KEYSPACE],
                                                                      ranges=RANGES)})
        for c in configs]


class Clients:
    """Compare-and-set, write and read clients on random nodes; the register history."""

    def __init__(self, loop: VirtualTimeLoop, cluster: SimCluster, keys: list[str]) -> None:
        self.loop = loop
        self.cluster = cluster
        self.keys = keys
        self.history: list[RegisterOp] = []
        self.acked: list[tuple[float, str]] = []  # (when, key) of every acknowledged op
        self.refused: list[tuple[float, str]] = []  # 503 range_moving
        self.refusal: RangeMoving | None = None  # the first, to show what it says
        self.errors: dict[str, int] = {}
        self.eligible: set[str] = {"n1", "n2", "n3", "n4"}
        self.stop = asyncio.Event()
        self._ids = 0

    async def run(self, process: str, rng: random.Random) -> None:
        seen: dict[str, Any] = {}
        while not self.stop.is_set():
            key = rng.choice(self.keys)
            machine = self.cluster.by_id(rng.choice(sorted(self.eligible)))
            draw = rng.random()
            kind = "read" if draw < 0.35 else "write" if draw < 0.5 else "cas"
            await self.call(process, machine, kind, key, seen)
            await asyncio.sleep(rng.uniform(0.01, 0.05))

    async def call(self, process: str, machine: Machine, kind: str, key: str,
                   seen: dict[str, Any]) -> None:
        node = machine.node
        if node is None:
            return
        self._ids += 1
        value = f"{process}-{self._ids}"
        start = self.loop.time()
        if kind == "read":
            op = TxnOp("get", TXN_KEYSPACE, key=key.encode())
        else:
            conditions: tuple[Condition, ...] = ()
            if kind == "cas":
                expected = seen.get(key)
                conditions = ((Condition(key.encode(), "absent"),) if expected is None else
                              (Condition(key.encode(), "equals", equals=comparable_json(expected)),))
            op = TxnOp("txn", TXN_KEYSPACE, TxnRequest(
                TXN_KEYSPACE, f"{process}.{self._ids}", (), conditions,
                (Write(key.encode(), json.dumps(value).encode()),)))
        task = machine.run(node.txn.execute(op, started_s=node.clock.monotonic_s(),
                                            timeout_s=OP_TIMEOUT_S))
        await asyncio.wait([task], timeout=OP_TIMEOUT_S + 1.0)
        end = self.loop.time()
        exc = task.exception() if task.done() and not task.cancelled() else None
        if task.done() and not task.cancelled() and exc is None:
            result = task.result()
            self.acked.append((end, key))
            if kind == "read":
                raw = result["reads"][0]["value"]
                read = None if raw is None else json.loads(raw)
                seen[key] = read
                self.history.append(RegisterOp(process, "read", key, read, start, end))
            else:
                seen[key] = value
                self.history.append(RegisterOp(process, kind, key, value, start, end,
                                               _expected(op) if kind == "cas" else None, True))
            return
        name = type(exc).__name__ if exc is not None else "client_timeout"
        self.errors[name] = self.errors.get(name, 0) + 1
        if isinstance(exc, RangeMoving):
            self.refused.append((end, key))  # refused before anything was proposed
            self.refusal = self.refusal or exc
            return
        if kind == "read":
            return  # a failed read tells nothing
        if isinstance(exc, ConditionFailed) and kind == "cas":
            current = exc.details.get("current_value")
            seen[key] = current
            self.history.append(RegisterOp(process, "cas", key, value, start, end, _expected(op),
                                           False))
            return
        # Anything else may or may not have committed: an unknown outcome.
        self.history.append(RegisterOp(process, kind, key, value, start, None,
                                       _expected(op) if kind == "cas" else None,
                                       None if kind == "cas" else True))


def _expected(op: TxnOp) -> Any:
    assert op.request is not None
    condition = op.request.conditions[0]
    return None if condition.kind == "absent" else json.loads(condition.equals)


def _keys_by_range(ranges: RangeMap) -> dict[Range, list[str]]:
    keys: dict[Range, list[str]] = {r: [] for r in ranges.ranges}
    for i in range(10_000):
        key = f"r{i}"
        rng = ranges.range_for_token(token_for(key.encode()))
        if len(keys[rng]) < KEYS_PER_RANGE:
            keys[rng].append(key)
        if all(len(v) == KEYS_PER_RANGE for v in keys.values()):
            break
    return keys


def _leader_config(cluster: SimCluster, group_id: str) -> frozenset[str] | None:
    """The configuration of the group's leader under lease, if one leads now."""
    for machine in cluster.machines:
        node = machine.node
        group = None if node is None else node.txn.groups.get(group_id)
        if group is not None and group.runner.is_leader():
            return group.runner.members
    return None


async def _until(loop: VirtualTimeLoop, condition: Any, what: str, timeout_s: float) -> float:
    deadline = loop.time() + timeout_s
    while loop.time() < deadline:
        if condition():
            return loop.time()
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def run_move(*, join_alone: bool = False) -> dict[str, Any]:
    loop = VirtualTimeLoop()
    network = SimNetwork(loop, random.Random(SEED), NetworkConditions())

    def hook(node: Node) -> None:
        if join_alone and node.node_id == "n5":
            node.txn.faults.join_alone = True

    cluster = SimCluster(loop, network, _configs(), SEED, Coordinator, hook)
    n1, n2, n3, n4, n5 = cluster.machines
    four = [n1, n2, n3, n4]
    figures: dict[str, Any] = {}

    async def main() -> None:
        tokens = allocate_tokens(None, 4, random.Random(SEED))
        for machine, token in zip(four, tokens):
            machine.identity.save_tokens((token,))
        for machine in four:
            await machine.start()

        def one_ring(machines: list[Machine], ids: set[str]) -> bool:
            return all(m.node is not None and set(m.node.ring.node_ids) == ids
                       and all(m.node.is_alive(i) for i in ids) for m in machines)
        await _until(loop, lambda: one_ring(four, {"n1", "n2", "n3", "n4"}), "one ring of four", 60)
        assert n1.node is not None
        before = RangeMap(TXN_KEYSPACE, n1.node.ring, 3, RANGES)
        keys = _keys_by_range(before)
        clients = Clients(loop, cluster, [k for ks in keys.values() for k in ks])
        # Every group formed (and clocks synced) before the clients start: a read of each key.
        for key in clients.keys:
            for _ in range(50):
                task = n1.run(n1.node.txn.execute(TxnOp("get", TXN_KEYSPACE, key=key.encode()),
                                                  started_s=n1.node.clock.monotonic_s(),
                                                  timeout_s=1.0))
                await asyncio.wait([task])
                if not task.exception() or not isinstance(task.exception(), RingKVError):
                    break
                await asyncio.sleep(0.2)
        tasks = [asyncio.ensure_future(clients.run(f"c{i}", random.Random(f"{SEED}/c{i}")))
                 for i in range(CLIENTS)]
        # Long enough that the groups compact their logs (GroupRunner.max_log_slots): a
        # new member then catches up from a snapshot of the store, not from slot 1.
        await _until(loop, lambda: join_alone or all(
            m.node is not None and all(g.runner.stats.compactions for g in m.node.txn.groups.values())
            for m in four), "every group compacted", 120)
        await asyncio.sleep(4.0)

        # -- a fifth node joins (bootstrap) ---------------------------------------------
        join_at = loop.time()
        await n5.start(wait_joined=False)
        assert n5.start_task is not None
        await _until(loop, lambda: n5.start_task is not None and n5.start_task.done(), "n5 NORMAL",
                     120)
        n5.start_task.result()
        normal_at = loop.time()
        five = {"n1", "n2", "n3", "n4", "n5"}
        await _until(loop, lambda: one_ring(cluster.machines, five), "one ring of five", 60)
        clients.eligible.add("n5")
        after = RangeMap(TXN_KEYSPACE, n1.node.ring, 3, RANGES)
        bounds = {(r.start, r.end): r for r in after.ranges}
        moved = {r: bounds[(r.start, r.end)] for r in before.ranges
                 if (r.start, r.end) in bounds and set(bounds[(r.start, r.end)].replicas)
                 != set(r.replicas)}
        cut = [r for r in before.ranges if (r.start, r.end) not in bounds]
        figures["moved_on_join"] = len(moved)
        figures["cut_on_join"] = len(cut)
        assert moved, "the join moved no range: the test would prove nothing"

        def configs_are(targets: dict[str, frozenset[str]]) -> bool:
            return all(_leader_config(cluster, g) == t for g, t in targets.items())
        join_targets = {r.group_id: frozenset(new.replicas) for r, new in moved.items()}
        if not join_alone:
            joined_at = await _until(loop, lambda: configs_are(join_targets),
                                     "the moved groups on their new replicas", 60)
            figures["join_bootstrap_s"] = round(normal_at - join_at, 2)
            figures["join_move_s"] = round(joined_at - normal_at, 2)
        else:
            await asyncio.sleep(10.0)
            joined_at = loop.time()
        await asyncio.sleep(3.0)
        moved_keys = {k for r in moved for k in keys[r]}
        cut_keys = {k for r in cut for k in keys[r]}
        figures["acked_moved_during_join"] = sum(
            1 for when, key in clients.acked if join_at <= when <= joined_at and key in moved_keys)
        figures["refused_cut_during_join"] = sum(
            1 for when, key in clients.refused if when >= join_at and key in cut_keys)
        figures["refused_elsewhere"] = sum(1 for _, key in clients.refused if key not in cut_keys)
        if join_alone:
            clients.stop.set()
            await asyncio.gather(*tasks)
            figures["history"] = clients.history
            return
        # n5 is a member of each moved group and the replica it replaced is not.
        for r, new in moved.items():
            gone = set(r.replicas) - set(new.replicas)
            for node_id in new.replicas:
                node = cluster.by_id(node_id).node
                assert node is not None
                await _until(loop, lambda n=node, g=r.group_id: g in n.txn.groups and
                             n.txn.groups[g].runner.members == frozenset(new.replicas),
                             f"{node_id} in {r.group_id}'s new configuration", 30)
            for node_id in gone:
                node = cluster.by_id(node_id).node
                assert node is not None
                await _until(loop, lambda n=node, g=r.group_id: g not in n.txn.groups,
                             f"{node_id} stopping its removed replica of {r.group_id}", 30)

        # n5 joined each group from the configuration its members named (a learner,
        # caught up through the log), never as a founder of a group of the ring's replicas.
        node5 = n5.node
        assert node5 is not None
        for r in moved:
            assert node5.txn._persisted[r.group_id].replicas == r.replicas
            assert "n5" not in node5.txn._persisted[r.group_id].replicas
        figures["snapshots_installed_by_n5"] = sum(
            node5.txn.groups[r.group_id].runner.stats.snapshots_installed for r in moved)

        # A restart of the new member: it resumes its groups from its record and log.
        n5.crash()
        await n5.start()
        node5 = n5.node
        assert node5 is not None
        for r, new in moved.items():
            await _until(loop, lambda g=r.group_id, t=frozenset(new.replicas): g in node5.txn.groups
                         and node5.txn.groups[g].runner.members == t,
                         f"n5 back in {r.group_id} after a restart", 30)
        figures["refused"] = len(clients.refused)

        # -- n5 decommissions ------------------------------------------------------------
        await _until(loop, lambda: one_ring(cluster.machines, five), "n5 UP again", 60)
        leave_at = loop.time()
        node5.decommission()
        await _until(loop, lambda: node5.left, "n5 LEFT", 120)
        four_ids = {"n1", "n2", "n3", "n4"}
        await _until(loop, lambda: all(m.node is not None and set(m.node.ring.node_ids) == four_ids
                                       for m in four), "n5 off every ring", 60)
        clients.eligible.discard("n5")
        await asyncio.sleep(1.0)
        n5.crash(power=True)  # the process ends once LEFT (``on_left``)
        back = {r.group_id: frozenset(r.replicas) for r in moved}
        left_at = await _until(loop, lambda: configs_are(back),
                               "the moved groups back on their old replicas", 60)
        figures["leave_move_s"] = round(left_at - leave_at, 2)
        figures["acked_moved_during_leave"] = sum(
            1 for when, key in clients.acked if leave_at <= when <= left_at and key in moved_keys)
        await asyncio.sleep(4.0)
        end_at = loop.time()
        clients.stop.set()
        await asyncio.gather(*tasks)
        figures["acked_after_leave"] = sum(1 for when, _ in clients.acked if left_at < when)
        figures["acked_cut_after_leave"] = sum(
            1 for when, key in clients.acked if left_at < when <= end_at and key in cut_keys)
        figures["acked"] = len(clients.acked)
        figures["errors"] = dict(sorted(clients.errors.items()))
        figures["history"] = clients.history

    try:
        loop.run_until_complete(main())
    finally:
        cluster.stop_all()
        loop.dispose()
    return figures


def test_groups_move_with_a_join_and_a_decommission_and_stay_linearizable() -> None:
    figures = run_move()
    history = figures.pop("history")
    verdict = linearizable(history)
    print("txn move:", figures, "ops:", len(history))
    assert verdict.ok, verdict.render()
    assert figures["moved_on_join"] >= 1 and figures["cut_on_join"] == 0  # fixed slices
    # Not vacuous: the moved ranges served while they moved, both ways.
    assert figures["acked_moved_during_join"] > 0
    assert figures["acked_moved_during_leave"] > 0
    assert figures["refused"] == 0 and "RangeMoving" not in figures["errors"]
    assert figures["snapshots_installed_by_n5"] >= figures["moved_on_join"]  # caught up by snapshot


def test_a_new_replica_that_starts_the_group_alone_is_caught() -> None:
    """The planted bug: n5 starts each group it is a new replica of by itself (it
    leads at once, from an empty store) instead of asking the members and joining
    as a learner caught up through the log. The checker must see it."""
    figures = run_move(join_alone=True)
    verdict = linearizable(figures.pop("history"))
    print("join alone:", figures)
    assert not verdict.ok


def test_groups_move_off_a_dead_node_that_is_replaced_and_stay_linearizable() -> None:
    """Cassandra's replace_address: n3 dies and n5 takes its tokens. The ring's
    ranges keep their bounds, so every group n3 was in moves (none is cut): each
    adds n5, caught up as a learner, then removes the dead n3, with a quorum of
    the live members throughout, while the clients keep going."""
    loop = VirtualTimeLoop()
    network = SimNetwork(loop, random.Random(SEED), NetworkConditions())
    configs = [dataclasses.replace(c, cluster=dataclasses.replace(c.cluster, num_tokens=4))
               for c in _configs()]
    configs[4] = dataclasses.replace(
        configs[4], cluster=dataclasses.replace(configs[4].cluster, replace_node_id="n3"))
    cluster = SimCluster(loop, network, configs, SEED, Coordinator)
    n1, n2, n3, n4, n5 = cluster.machines
    four = [n1, n2, n3, n4]
    figures: dict[str, Any] = {}

    async def main() -> None:
        tokens = allocate_tokens(None, 16, random.Random(SEED))
        for i, machine in enumerate(four):
            machine.identity.save_tokens(tuple(tokens[i::4]))
        for machine in four:
            await machine.start()
        ids = {"n1", "n2", "n3", "n4"}
        await _until(loop, lambda: all(m.node is not None and set(m.node.ring.node_ids) == ids
                                       and all(m.node.is_alive(i) for i in ids) for m in four),
                     "one ring of four", 60)
        assert n1.node is not None
        before = RangeMap(TXN_KEYSPACE, n1.node.ring, 3, RANGES)
        keys = _keys_by_range(before)
        clients = Clients(loop, cluster, [k for ks in keys.values() for k in ks])
        tasks = [asyncio.ensure_future(clients.run(f"c{i}", random.Random(f"{SEED}/c{i}")))
                 for i in range(CLIENTS)]
        await asyncio.sleep(4.0)
        clients.eligible.discard("n3")
        n3.crash(power=True)
        node1 = n1.node
        await _until(loop, lambda: not node1.is_alive("n3"), "n3 DOWN", 30)
        start_at = loop.time()
        await n5.start(wait_joined=False)
        assert n5.start_task is not None
        await _until(loop, lambda: n5.start_task is not None and n5.start_task.done(), "n5 NORMAL",
                     120)
        n5.start_task.result()
        live = [n1, n2, n4, n5]
        new_ids = {"n1", "n2", "n4", "n5"}
        await _until(loop, lambda: all(m.node is not None and set(m.node.ring.node_ids) == new_ids
                                       for m in live), "n3 off every ring", 60)
        clients.eligible.add("n5")
        after = RangeMap(TXN_KEYSPACE, node1.ring, 3, RANGES)
        assert {(r.start, r.end) for r in after.ranges} == {(r.start, r.end) for r in before.ranges}
        moved = {r.group_id: frozenset(r.replicas) for r in after.ranges if "n5" in r.replicas}
        figures["groups"], figures["moved"] = len(after), len(moved)
        done_at = await _until(loop, lambda: all(_leader_config(cluster, g) == t
                                                 for g, t in moved.items()),
                               "every group off n3 and on n5", 90)
        figures["replace_move_s"] = round(done_at - start_at, 2)
        moved_keys = {k for r in before.ranges if "n3" in r.replicas for k in keys[r]}
        figures["acked_moved_during"] = sum(1 for when, key in clients.acked
                                            if start_at <= when <= done_at and key in moved_keys)
        await asyncio.sleep(3.0)
        clients.stop.set()
        await asyncio.gather(*tasks)
        figures["acked_after"] = sum(1 for when, _ in clients.acked if when > done_at)
        figures["errors"] = dict(sorted(clients.errors.items()))
        figures["history"] = clients.history

    try:
        loop.run_until_complete(main())
    finally:
        cluster.stop_all()
        loop.dispose()
    history = figures.pop("history")
    verdict = linearizable(history)
    print("txn replace:", figures, "ops:", len(history))
    assert verdict.ok, verdict.render()
    assert figures["moved"] >= 2 and figures["acked_moved_during"] > 0 and figures["acked_after"] > 0
    assert "RangeMoving" not in figures["errors"]  # a replace cuts no range


def test_changing_ranges_over_data_a_group_holds_is_refused_by_name() -> None:
    """Fixed slices never move with the ring; only an operator changing a keyspace's
    ``ranges`` would cut a group that holds keys (a split). Splitting a group is not
    built, so the range answers 503 range_moving naming the split, and serves again
    once the setting is put back."""
    loop = VirtualTimeLoop()
    network = SimNetwork(loop, random.Random(SEED), NetworkConditions())
    configs = node_configs(SimSettings(seed=SEED, nodes=3, workload="register"))
    cluster = SimCluster(loop, network, configs, SEED, Coordinator)

    def with_ranges(count: int) -> None:
        for machine, config in zip(cluster.machines, configs):
            machine.config = dataclasses.replace(config, keyspaces={
                **config.keyspaces,
                TXN_KEYSPACE: dataclasses.replace(config.keyspaces[TXN_KEYSPACE], ranges=count)})

    async def put(key: str) -> Any:
        n1 = cluster.machines[0]
        assert n1.node is not None
        op = TxnOp("txn", TXN_KEYSPACE, TxnRequest(TXN_KEYSPACE, f"put-{key}", (), (),
                                                   (Write(key.encode(), b'"v"'),)))
        for _ in range(50):
            task = n1.run(n1.node.txn.execute(op, started_s=n1.node.clock.monotonic_s(),
                                              timeout_s=OP_TIMEOUT_S))
            await asyncio.wait([task])
            exc = task.exception()
            if exc is None or isinstance(exc, RangeMoving):
                return exc
            await asyncio.sleep(0.2)  # the group is still forming or electing
        raise AssertionError(f"no answer for {key}")

    async def main() -> None:
        for machine in cluster.machines:
            await machine.start()
        assert await put("k1") is None  # one group, holding k1
        for machine in cluster.machines:
            machine.crash()
        with_ranges(2)
        for machine in cluster.machines:
            await machine.start()
        refused = await put("k1")
        assert isinstance(refused, RangeMoving), refused
        assert refused.details["reason"] == "split" and "ranges setting" in refused.message
        for machine in cluster.machines:
            machine.crash()
        with_ranges(1)
        for machine in cluster.machines:
            await machine.start()
        assert await put("k2") is None

    try:
        loop.run_until_complete(main())
    finally:
        cluster.stop_all()
        loop.dispose()
