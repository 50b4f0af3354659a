"""A range's Paxos group moves from {a,b,c} to {a,b,d} through its own log,
one member at a time (issue #12 §5; Raft §6; Spanner §4.1), with real
GroupRunners on the in-test bus of test_group.py, while a client keeps
doing compare-and-set increments on one key.

The compare-and-set is done at the runner, by one client: at the leader,
once everything it proposed is applied, read the counter and propose
counter + 1 (nothing else writes the key, so the read and the proposal need
no lock). Its history goes to the linearizability checker: no increment
lost (an acknowledged one missing), none doubled (a retry after an unknown
outcome applied on top of the first), and every read consistent."""

from __future__ import annotations

import asyncio

from ringkv.sim.linearizability import RegisterOp, linearizable
from ringkv.sim.loop import VirtualTimeLoop
from ringkv.txn.group import ABORTED, COMMITTED, UNKNOWN, GroupRunner
from ringkv.txn.ranges import Range
from ringkv.storage.memory import MemoryEngine
from ringkv.sim.clock import SimClock
from tests.test_group import GROUP, KS, VIOLATIONS, Bus, leader_of, no_violations, run, sim_bus, wait_for

MOVED = Range(KS, GROUP.start, GROUP.end, ("a", "b", "d"))  # same bounds, so the same group id
KEY = b"counter"

_ = no_violations  # the fixture checks persist-before-send on every message
HISTORY: list[RegisterOp] = []


def leader(bus: Bus) -> GroupRunner | None:
    runners = [node.runner for node in bus.nodes.values() if node.runner is not None]
    leaders = [r for r in runners if r.is_leader()]
    assert len(leaders) <= 1, "two leaders under lease at once"
    return leaders[0] if leaders else None


def settled(runner: GroupRunner) -> bool:
    """Everything this leader proposed is chosen and applied: a read now sees it."""
    replica = runner.replica
    return (replica is not None and not runner._waiting and replica.commit_through == replica.next_slot - 1
            and runner.applied_through == replica.commit_through)


def counter_at(runner: GroupRunner) -> int | None:
    """The counter as of everything applied here (None: never written)."""
    assert runner._mvcc is not None and runner.replica is not None
    version = runner._mvcc.read(KS, KEY, runner.replica.applied_ts_us)
    return None if version is None or version.value is None else int(version.value)


async def increments(bus: Bus, stop: asyncio.Event, history: list[RegisterOp], counts: dict[str, int]) -> None:
    loop = asyncio.get_running_loop()
    i = 0
    while not stop.is_set():
        runner = leader(bus)
        if runner is None or not settled(runner):
            counts["waits"] = counts.get("waits", 0) + 1
            await asyncio.sleep(0.01)
            continue
        start = loop.time()
        seen = counter_at(runner)
        history.append(RegisterOp("client", "read", "k", seen, start, loop.time()))
        i += 1
        new = (seen or 0) + 1
        outcome = await runner.propose_future(f"inc-{i}", [(KEY, str(new).encode())], timeout_s=2.0)
        end = loop.time()
        counts[outcome.status] = counts.get(outcome.status, 0) + 1
        if outcome.status == COMMITTED:
            history.append(RegisterOp("client", "cas", "k", new, start, end, expected=seen, ok=True))
        elif outcome.status == UNKNOWN:
            history.append(RegisterOp("client", "cas", "k", new, start, None, expected=seen, ok=None))
        # refused and aborted: nothing was applied (the checker is told nothing)
        await asyncio.sleep(0.005)


def test_a_group_moves_from_abc_to_abd_under_compare_and_set_increments() -> None:
    async def main(loop: VirtualTimeLoop) -> dict[str, int]:
        bus = sim_bus(loop)
        bus.add("d", MemoryEngine(), SimClock(loop, drift_ppm=-60.0))
        for node_id in GROUP.replicas:
            bus.start(node_id)
        await wait_for(lambda: leader_of(bus), 10.0, "a leader")
        history: list[RegisterOp] = []
        counts: dict[str, int] = {}
        stop = asyncio.Event()
        client = asyncio.ensure_future(increments(bus, stop, history, counts))
        await asyncio.sleep(2.0)
        before = counts.get(COMMITTED, 0)
        # The ring moves the range: d joins as a learner, every runner is told the new replicas.
        bus.start("d", MOVED, members=GROUP.replicas)
        moved_at = loop.time()
        for node_id in ("a", "b", "c"):
            bus.runner(node_id).move_to(MOVED)

        def done() -> bool:
            return all(bus.runner(n).members == frozenset(MOVED.replicas) for n in MOVED.replicas) and \
                bus.runner("c").removed
        await wait_for(done, 30.0, "the group on {a,b,d}, c removed")
        move_s = loop.time() - moved_at
        during = counts.get(COMMITTED, 0) - before
        changes = sum(bus.runner(n).stats.config_changes for n in "abcd")
        bus.kill("c")  # the removed replica's runner is stopped (the service drops it)
        await asyncio.sleep(2.0)
        stop.set()
        await client
        final = await wait_for(lambda: leader(bus), 10.0, "a leader of {a,b,d}")
        await wait_for(lambda: settled(final), 10.0, "the last proposals applied")
        HISTORY[:] = history
        verdict = linearizable(history)
        assert verdict.ok, verdict.render()
        # No lost or doubled increment: the counter is the number of acknowledged
        # increments plus those with unknown outcomes that did land.
        value = counter_at(final) or 0
        acked = counts.get(COMMITTED, 0)
        assert acked <= value <= acked + counts.get(UNKNOWN, 0), (value, counts)
        for node_id in MOVED.replicas:  # every new member holds the same counter
            runner = bus.runner(node_id)

            def applied(r: GroupRunner = runner) -> bool:
                return r.applied_through >= final.applied_through
            await wait_for(applied, 10.0, f"{node_id} applied")
            assert runner.members == frozenset(MOVED.replicas)
            assert (counter_at(runner) or 0) == value
        assert not VIOLATIONS
        assert during > 0, counts  # the group kept committing while it moved
        return {"move_ms": int(move_s * 1000), "during": during, "changes": changes, **counts}

    figures = run(main)
    print("move:", figures)
    assert figures["changes"] == 2  # add d, then remove c: one member at a time


def test_a_new_replica_is_not_heard_before_the_group_adds_it() -> None:
    """A node the ring names but the group's log does not (yet) is heard only
    by a leader catching it up: if it had started the group by itself with
    the ring's replicas as its configuration, it must not win a phase 1."""
    async def main(loop: VirtualTimeLoop) -> None:
        from ringkv.txn.paxos import Ballot, Prepare
        bus = sim_bus(loop)
        for node_id in GROUP.replicas:
            bus.start(node_id)
        lead = await wait_for(lambda: leader_of(bus), 10.0, "a leader")
        follower = next(bus.runner(n) for n in GROUP.replicas if bus.runner(n) is not lead)
        follower.move_to(MOVED)
        before = follower.stats.rejected
        follower.step(Prepare("d", Ballot(99, "d"), 1, 0.0))
        assert follower.stats.rejected == before + 1
        assert "d" not in follower.known_nodes()
    run(main)


def test_a_node_being_added_is_heard_for_its_answers_only() -> None:
    """The leader catching d up hears d's answers (HeartbeatAck, CatchUp), never
    d's ballots: a d that started the group on its own must not win the leader's
    promise or lease vote the moment the leader's own vote lapses (Paxos Made
    Simple §3: a configuration the group never had makes no quorum)."""
    async def main(loop: VirtualTimeLoop) -> None:
        from ringkv.txn.paxos import Ballot, CatchUp, Heartbeat, HeartbeatAck, Prepare
        bus = sim_bus(loop)
        for node_id in GROUP.replicas:
            bus.start(node_id)
        lead = await wait_for(lambda: leader_of(bus), 10.0, "a leader")
        lead.move_to(MOVED)
        await wait_for(lambda: lead.replica is not None and "d" in lead.replica.joining(), 5.0,
                       "the leader catching d up")
        assert "d" in lead.known_nodes() and "d" not in lead.voters()
        for ask in (Prepare("d", Ballot(99, "d"), 1, 0.0), Heartbeat("d", Ballot(99, "d"), 0, 0.0)):
            before = lead.stats.rejected
            lead.step(ask)
            assert lead.stats.rejected == before + 1, ask
        assert lead.is_leader()
        for answer in (HeartbeatAck("d", lead.replica.ballot, 0.0, 0, False), CatchUp("d", 1)):
            before = lead.stats.rejected
            lead.step(answer)
            assert lead.stats.rejected == before, answer
    run(main)
