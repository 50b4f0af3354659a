"""Anti-entropy repair (Dynamo §4.7): the pure plan, tree comparison, scheduling,
repair-aware tombstone GC, and RepairService converging replicas in one process."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

from ringkv import messages as m
from ringkv.clock import ManualClock
from ringkv.errors import BadRequest, PeerUnreachable, RepairRunning, ReplicaDown
from ringkv.hlc import Timestamp
from ringkv.repair import merkle
from ringkv.repair.history import RepairHistory
from ringkv.repair.service import RepairService
from ringkv.repair.session import (
    RepairSchedule,
    down_peers,
    intersect,
    parse_range,
    plan,
    repaired_since,
    pull_plan,
    push_plan,
    ring_range_of,
)
from ringkv.replica.local import LocalReplica
from ringkv.ring import MAX_TOKEN, MIN_TOKEN, TokenRing, token_for
from ringkv.storage.memory import MemoryEngine
from ringkv.storage.store import LocalStore
from ringkv.versioning import Cell, tombstone

RING = TokenRing({"a": [-(2**62), 2**62], "b": [-10, 2**61], "c": [0, 2**60]})


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout=30))


# -- the plan --------------------------------------------------------------------


def test_rf3_on_three_nodes_repairs_every_range_with_the_other_two() -> None:
    jobs = plan(RING, "a", {"default": 3})
    assert [job.ring_range for job in jobs] == [(s, e) for s, e, _ in RING.ranges()]
    assert all(job.full and job.peers == tuple(sorted({"b", "c"}, key=lambda n: RING.replicas(
        job.ring_range[1], 3).index(n))) for job in jobs)
    assert {job.key for job in jobs} == {("default", s, e) for s, e, _ in RING.ranges()}


def test_rf1_repairs_only_the_nodes_own_ranges_and_has_no_peers() -> None:
    jobs = plan(RING, "b", {"one": 1})
    assert [job.ring_range for job in jobs] == RING.ranges_for("b", 1)
    assert all(job.peers == () for job in jobs)


def test_a_keyspace_and_a_range_narrow_the_plan() -> None:
    # Ranges (-10, 0] and (0, 2**60] end at c's tokens; with RF 2 b holds them too.
    jobs = plan(RING, "c", {"x": 3, "y": 2}, keyspace="y", token_range=(-5, 5))
    assert [(job.keyspace, job.token_range, job.ring_range, job.peers) for job in jobs] == [
        ("y", (-5, 0), (-10, 0), ("b",)), ("y", (0, 5), (0, 2**60), ("b",))]
    # Part of a ring range: repaired, but not recorded as the range repaired.
    assert not any(job.full for job in jobs)
    assert plan(RING, "a", {"y": 2}, token_range=(-5, 5)) == []  # a holds none of it


def test_bad_input_names_what_is_wrong() -> None:
    with pytest.raises(ValueError, match="not an eventual keyspace.*transactional"):
        plan(RING, "a", {"x": 3}, keyspace="nope")
    with pytest.raises(ValueError, match="holds no tokens"):
        plan(RING, "z", {"x": 3})
    for text, match in (("5", "START:END"), ("a:b", "integer"), (f"0:{MAX_TOKEN + 1}", "token")):
        with pytest.raises(ValueError, match=match):
            parse_range(text)
    assert parse_range("-5:7") == (-5, 7)


def test_intersect_handles_wrapping_ranges() -> None:
    wrapping = (2**62, -(2**62))
    assert intersect(wrapping, (MIN_TOKEN, MIN_TOKEN)) == [wrapping]  # the whole ring covers it
    assert intersect(wrapping, (0, 10)) == []
    assert intersect(wrapping, (2**62 + 5, -(2**62) - 5)) == [
        (2**62 + 5, MAX_TOKEN), (MIN_TOKEN, -(2**62) - 5)]
    assert intersect((0, 100), (50, 200)) == [(50, 100)]


def test_down_peers_are_named() -> None:
    jobs = plan(RING, "a", {"default": 3})
    assert down_peers(jobs, lambda n: n != "c") == ["c"]
    assert down_peers(jobs, lambda n: True) == []


# -- comparing trees -------------------------------------------------------------


def _cells(keys: list[bytes], ts: int = 1) -> list[tuple[int, bytes, Cell]]:
    return sorted((token_for(k), k, Cell(b"v", Timestamp(ts))) for k in keys)


def test_pulls_take_each_distinct_version_once_and_pushes_only_what_peers_lack() -> None:
    whole = (MIN_TOKEN, MIN_TOKEN)
    keys = [b"k%d" % i for i in range(200)]
    base = _cells(keys)
    mine = merkle.build(whole, 4, base)
    # p and q both have an extra key we missed; r has a newer value of k7.
    extra = merkle.build(whole, 4, _cells(keys + [b"extra"]))
    newer = merkle.build(whole, 4, [(t, k, Cell(b"new", Timestamp(9))) if k == b"k7"
                                    else (t, k, c) for t, k, c in base])
    trees = {"p": extra, "q": extra, "r": newer}
    pulls = pull_plan(mine, trees)
    # One copy of "extra" is enough: only p (the first by name) is asked for it.
    assert set(pulls) == {"p", "r"}
    assert [merkle.range_contains(r, token_for(b"extra")) for r in pulls["p"]] == [True]
    assert [merkle.range_contains(r, token_for(b"k7")) for r in pulls["r"]] == [True]
    # After the pulls we hold both; each peer pulls back the leaf it lacks.
    merged_cells = sorted({(t, k): (t, k, c) for t, k, c in _cells(keys + [b"extra"])
                           if k != b"k7"}.values()) + []
    merged = merkle.build(whole, 4, sorted(merged_cells + [
        (token_for(b"k7"), b"k7", Cell(b"new", Timestamp(9)))]))
    pushes = push_plan(merged, trees)
    assert [merkle.range_contains(r, token_for(b"k7")) for r in pushes["p"]] == [True]
    assert pushes["p"] == pushes["q"]
    assert [merkle.range_contains(r, token_for(b"extra")) for r in pushes["r"]] == [True]
    # Replicas in step: nothing either way.
    assert pull_plan(mine, {"p": mine}) == {} and push_plan(mine, {"p": mine}) == {}


def test_trees_that_do_not_line_up_are_refused() -> None:
    whole = (MIN_TOKEN, MIN_TOKEN)
    with pytest.raises(merkle.TreeMismatch):
        pull_plan(merkle.build(whole, 3, []), {"p": merkle.build(whole, 4, [])})


# -- scheduling and GC's question ------------------------------------------------


def test_the_schedule_repairs_every_range_within_the_interval() -> None:
    schedule = RepairSchedule(interval_s=100)
    keys = [("ks", 0, 1), ("ks", 1, 2), ("ks", 2, 3)]
    last = {("ks", 0, 1): 10_000_000, ("ks", 1, 2): 60_000_000}
    # Never repaired first, then the oldest; a range repaired 40 s ago is not due.
    assert schedule.due(keys, last, now_us=100_000_000) == [("ks", 2, 3), ("ks", 0, 1)]
    rng = random.Random(1)
    checks = [schedule.next_check_s(rng) for _ in range(100)]
    assert all(6.25 <= c <= 18.75 for c in checks) and len(set(checks)) > 90  # jittered
    # Due at 75 s, checked within 18.75 s after: before the interval ends.
    assert 100 * 0.75 + max(checks) < 100
    with pytest.raises(ValueError):
        RepairSchedule(0)


def test_repaired_since_reads_the_current_rings_range() -> None:
    token = token_for(b"key")
    key = ("ks", *ring_range_of(RING, token))
    assert merkle.range_contains(key[1:], token)
    assert repaired_since({key: 123}, RING, "ks", token) == 123
    assert repaired_since({key: 123}, RING, "other", token) is None
    # After a topology change the range is another one: not repaired until repaired again.
    moved = RING.with_node("d", [ring_range_of(RING, token)[1] - 1])
    assert repaired_since({key: 123}, moved, "ks", token) is None
    assert repaired_since({}, TokenRing({}), "ks", token) is None


def test_repair_aware_sweep_keeps_a_tombstone_until_its_range_is_repaired() -> None:
    """ScyllaDB's tombstone_gc: repair. The planted bug (GC by age alone, no
    predicate) purges the same tombstone: that is what resurrects data."""
    async def scenario(repaired: dict[tuple[str, int], int] | None) -> tuple[int, int]:
        clock = ManualClock(wall_us=1_000_000_000)
        predicate = None if repaired is None else (lambda ks, t: repaired.get((ks, t)))
        store = LocalStore(MemoryEngine(), clock, gc_grace_s=10, repaired_since=predicate)
        await store.start()
        deleted = tombstone(Timestamp(clock.wall_us()))
        await store.apply("ks", 5, b"k", deleted)
        clock.advance(11)
        first = await store.sweep()
        if repaired is not None:
            repaired[("ks", 5)] = deleted.ts.wall_us + 1  # a repair began after the delete
        second = await store.sweep()
        await store.close()
        return first, second

    assert run(scenario({})) == (0, 1)  # kept until repaired, then purged
    assert run(scenario(None)) == (1, 0)  # age alone: purged at once
    # A repair that began before the delete does not count.
    assert run(scenario({("ks", 5): 1})) == (0, 1)


# -- RepairService in one process --------------------------------------------------


class Net:
    """Routes internode requests between in-process nodes (repair and scan verbs)."""

    def __init__(self) -> None:
        self.nodes: dict[str, FakeNode] = {}
        self.down: set[str] = set()
        self.failing_sync: set[str] = set()  # nodes whose repair.sync fails

    async def request(self, frm: str, to: str, verb: str, payload: Any, timeout_s: float) -> Any:
        if to in self.down:
            raise PeerUnreachable(f"{to} is down", node_id=to)
        node = self.nodes[to]
        if verb == m.REPAIR_SYNC and to in self.failing_sync:
            raise PeerUnreachable(f"{to} broke off the sync", node_id=to)
        if verb == m.SCAN:
            req = m.ScanRequest.from_wire(payload)
            reply = await node.replica.scan(req.keyspace, (req.after_token, req.after_key),
                                            req.end_token, req.limit)
            return reply.to_wire()
        return await node.repair.handle(frm, verb, payload)


class Requester:
    def __init__(self, net: Net, me: str) -> None:
        self.net, self.me = net, me

    async def request(self, node_id: str, verb: str, payload: Any, timeout_s: float) -> Any:
        return await self.net.request(self.me, node_id, verb, payload, timeout_s)


class FakeNode:
    def __init__(self, net: Net, node_id: str, clock: ManualClock, ring: TokenRing) -> None:
        self.store = LocalStore(MemoryEngine(), clock)
        self.replica = LocalReplica(self.store)
        self.history = RepairHistory(self.store)
        self.repair = RepairService(
            node_id, self.store, self.replica, self.history, clock, random.Random(1),
            ring=lambda: ring, keyspaces=lambda: {"ks": 3}, is_alive=lambda n: n not in net.down,
            requester=lambda: Requester(net, node_id),  # type: ignore[arg-type,return-value]
            observe=lambda ts: None, interval_s=100, scheduled=False, scan_rate_mib_s=1000.0,
            request_timeout_s=10, in_flight_margin_s=0)
        net.nodes[node_id] = self

    async def put(self, key: bytes, cell: Cell) -> None:
        await self.store.apply("ks", token_for(key), key, cell)

    def get(self, key: bytes) -> Cell | None:
        return self.store.read("ks", token_for(key), key)


def test_a_repair_makes_three_replicas_hold_the_union_of_their_cells() -> None:
    async def scenario() -> None:
        clock = ManualClock(wall_us=5_000_000)
        net = Net()
        a, b, c = (FakeNode(net, n, clock, RING) for n in "abc")
        for node in (a, b, c):
            await node.store.start()
        for i in range(300):  # written everywhere
            for node in (a, b, c):
                await node.put(b"k%d" % i, Cell(b"v", Timestamp(1)))
        await b.put(b"only-b", Cell(b"b", Timestamp(2)))  # a and c missed it
        await c.put(b"k5", tombstone(Timestamp(3)))  # a and b missed the delete
        await a.put(b"k9", Cell(b"newer", Timestamp(4)))  # b and c missed the update
        jobs = a.repair.begin()
        with pytest.raises(RepairRunning):
            a.repair.begin()
        events: list[dict[str, Any]] = []

        async def on_event(event: dict[str, Any]) -> None:
            events.append(event)

        report = await a.repair.run(jobs, on_event)
        assert report["ok"] and report["ranges_compared"] == len(jobs) == len(events)
        assert 1 <= report["ranges_differed"] <= 3
        # Each difference came to a once and went to the two that lacked it (3 + 6
        # at least; the rest of their leaves came along), far from a full copy.
        assert 9 <= report["cells_streamed"] < 300
        for node in (a, b, c):
            assert node.get(b"only-b") == Cell(b"b", Timestamp(2))
            assert node.get(b"k5") == tombstone(Timestamp(3))
            assert node.get(b"k9") == Cell(b"newer", Timestamp(4))
        # Every replica recorded every ring range as repaired, as of when it began.
        for node in (a, b, c):
            assert set(node.history.last) == {job.key for job in jobs}
            assert set(node.history.last.values()) == {5_000_000}
        # In step now: a second repair streams nothing.
        again = await a.repair.run(a.repair.begin())
        assert (again["ranges_differed"], again["cells_streamed"]) == (0, 0)
        # Refusals: a replica down; a range the node holds nothing of is bad input.
        net.down.add("c")
        with pytest.raises(ReplicaDown) as refused:
            a.repair.begin()
        assert refused.value.down == ["c"]
        with pytest.raises(BadRequest, match="keyspace"):
            a.repair.begin("nope")
        for node in (a, b, c):
            await node.store.close()

    run(scenario())


def test_a_range_whose_peer_fails_is_reported_and_not_recorded() -> None:
    async def scenario() -> None:
        clock = ManualClock()
        net = Net()
        a, _b, _c = (FakeNode(net, n, clock, RING) for n in "abc")
        for node in net.nodes.values():
            await node.store.start()
        jobs = a.repair.begin()
        net.down.add("b")  # goes down after the repair started
        report = await a.repair.run(jobs)
        assert not report["ok"] and report["ranges_failed"] == len(jobs)
        assert "b is down" in report["failures"][0]["error"]
        assert a.history.last == {}
        assert a.repair.current is None  # released: the next repair may start
        for node in net.nodes.values():
            await node.store.close()

    run(scenario())


def test_no_replica_records_a_range_repaired_unless_every_replica_synced() -> None:
    """b synced, c did not: were b to count the range repaired, it could purge a
    tombstone that c still lacks. Nobody records it."""
    async def scenario() -> None:
        clock = ManualClock()
        net = Net()
        a, b, _c = (FakeNode(net, n, clock, RING) for n in "abc")
        for node in net.nodes.values():
            await node.store.start()
        net.failing_sync.add("c")
        report = await a.repair.run(a.repair.begin())
        assert report["ranges_failed"] == report["ranges_total"]
        assert a.history.last == {} and b.history.last == {}
        for node in net.nodes.values():
            await node.store.close()

    run(scenario())


def test_history_survives_a_restart() -> None:
    async def scenario() -> None:
        engine = MemoryEngine()
        store = LocalStore(engine, ManualClock())
        await store.start()
        history = RepairHistory(store)
        await history.record(("ks", -5, 7), 42)
        await history.record(("ks", -5, 7), 41)  # never moves back
        await store.flush()
        again = RepairHistory(store)
        await again.load()
        assert again.last == {("ks", -5, 7): 42}
        await store.close()

    run(scenario())
