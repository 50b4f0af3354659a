"""Bootstrap with streaming (Dynamo §4.9, adding storage nodes: the new node's
ranges are transferred to it from their current replicas; Cassandra's
bootstrap with pending ranges and ``blockFor + pending``)."""

from __future__ import annotations

import asyncio

import pytest

from ringkv.clock import ManualClock
from ringkv.coordinator.replica_plan import plan_for
from ringkv.errors import PeerUnreachable, Unavailable
from ringkv.gossip import state as gs
from ringkv.hlc import Timestamp
from ringkv.membership import JoinPlanner, JoinStep, ring_from_gossip, streaming_joiners
from ringkv.messages import ScanReply
from ringkv.quorum import ConsistencyLevel
from ringkv.ring import (
    MAX_TOKEN,
    MIN_TOKEN,
    NodeInfo,
    TokenRing,
    allocate_tokens,
    token_for,
)
from ringkv.storage.memory import MemoryEngine
from ringkv.storage.store import LocalStore
from ringkv.topology.pending import (
    future_ring,
    joining_from_gossip,
    leaving_from_gossip,
    pending_replicas,
    replacing_from_gossip,
)
from ringkv.topology.plan import (
    Pacer,
    StreamProgress,
    StreamRange,
    bootstrap_plan,
    leave_plan,
    remove_plan,
)
from ringkv.topology.streamer import Streamer, StreamFailed
from ringkv.versioning import Cell

QUORUM = ConsistencyLevel.QUORUM


def three() -> TokenRing:
    return TokenRing({"a": [-(2**62)], "b": [0], "c": [2**62]})


# -- pending ranges (topology.pending) ------------------------------------------


def test_joiners_are_boot_nodes_with_tokens_and_this_node_is_left_out() -> None:
    states = {
        "a": {gs.STATUS: gs.NORMAL, gs.TOKENS: "1"},
        "d": {gs.STATUS: gs.BOOT, gs.TOKENS: "5,7", gs.RACK: "r2"},
        "e": {gs.STATUS: gs.BOOT},  # still learning the ring: no tokens yet
        "me": {gs.STATUS: gs.BOOT, gs.TOKENS: "9"},
    }
    joining = joining_from_gossip(states, "me")
    assert joining == {"d": ((5, 7), NodeInfo("d", rack="r2"))}


def test_no_joiner_means_no_future_ring_and_no_pending_replica() -> None:
    ring = three()
    assert future_ring(ring, {}) is None
    assert pending_replicas(ring.replicas(5, 3), None, 5, 3) == ()


def test_a_joiner_is_pending_exactly_for_the_keys_it_will_replicate() -> None:
    ring = three()
    future = future_ring(ring, {"d": ((2**61,), NodeInfo("d"))})
    assert future is not None and set(future.node_ids) == {"a", "b", "c", "d"}
    for token in range(MIN_TOKEN, MAX_TOKEN, 2**58):
        natural = ring.replicas(token, 2)
        expected = ("d",) if "d" in future.replicas(token, 2) else ()
        assert pending_replicas(natural, future, token, 2) == expected
    # (0, 2**61] is d's primary range at rf 2: d is pending there.
    assert pending_replicas(ring.replicas(2**60, 2), future, 2**60, 2) == ("d",)


def test_a_joiner_token_already_taken_stays_with_its_owner() -> None:
    future = future_ring(three(), {"d": ((0, 7), NodeInfo("d"))})
    assert future is not None and future.tokens_of("d") == (7,) and future.tokens_of("b") == (0,)
    assert future_ring(three(), {"d": ((0,), NodeInfo("d"))}) is None


def test_pending_replicas_add_to_block_for_and_reads_ignore_them() -> None:
    """Cassandra: a write waits for blockFor(CL, natural) + pending acknowledgements."""
    ring = three()
    future = future_ring(ring, {"d": ((2**61,), NodeInfo("d"))})
    token = 2**60
    write = plan_for(ring, "ks", token, 3, QUORUM, lambda n: True, write=True, future=future)
    assert write.pending == ("d",) and write.block_for == 3
    assert set(write.live) == {"a", "b", "c", "d"} and len(write.natural) == 3
    read = plan_for(ring, "ks", token, 3, QUORUM, lambda n: True, write=False, future=future)
    assert read.pending == () and read.block_for == 2 and "d" not in read.live
    one = plan_for(ring, "ks", token, 3, ConsistencyLevel.ONE, lambda n: True, write=True,
                   future=future)
    assert one.block_for == 2


def test_a_down_pending_replica_is_hinted_and_can_make_a_write_unavailable() -> None:
    ring = three()
    future = future_ring(ring, {"d": ((2**61,), NodeInfo("d"))})
    token = 2**60
    plan = plan_for(ring, "ks", token, 3, QUORUM, lambda n: n != "d", write=True, future=future)
    assert plan.down == ("d",) and plan.block_for == 3  # all three natural replicas must ack
    with pytest.raises(Unavailable):
        plan_for(ring, "ks", token, 3, QUORUM, lambda n: n not in ("d", "a"), write=True,
                 future=future)


def test_a_leaving_node_stays_natural_and_the_nodes_taking_over_are_pending() -> None:
    """Cassandra's decommission: LEAVING keeps the node a replica until LEFT; the
    nodes gaining its ranges get the writes too."""
    ring = TokenRing({"a": [-(2**62)], "b": [0], "c": [2**62], "d": [2**61]})
    assert leaving_from_gossip({"b": {gs.STATUS: gs.LEAVING}, "c": {gs.STATUS: gs.NORMAL},
                                "me": {gs.STATUS: gs.LEAVING}}, "me") == {"b"}
    future = future_ring(ring, {}, frozenset({"b"}))
    assert future is not None and "b" not in future.node_ids
    for token in range(MIN_TOKEN, MAX_TOKEN, 2**58):
        natural = ring.replicas(token, 3)
        pending = pending_replicas(natural, future, token, 3)
        if "b" in natural:
            assert len(pending) == 1 and pending[0] not in natural
        else:
            assert pending == ()


# -- the bootstrap plan (topology.plan) -----------------------------------------


def every_token(plan: list[StreamRange], keyspace: str, token: int) -> list[StreamRange]:
    return [r for r in plan if r.keyspace == keyspace and r.start < token <= r.end]


@pytest.mark.parametrize("rf", [1, 2, 3])
def test_the_plan_covers_exactly_the_joiners_new_ranges_from_current_replicas(rf: int) -> None:
    import random

    ring = TokenRing({n: allocate_tokens(None, 4, random.Random(i)) for i, n in enumerate("abc")})
    ring = TokenRing({n: [t + i for t in ts] for i, (n, ts) in
                      enumerate((n, ring.tokens_of(n)) for n in ring.node_ids)})
    tokens = allocate_tokens(ring, 4, random.Random(9), rf=rf)
    future = ring.with_node("d", tokens)
    plan = bootstrap_plan(ring, future, "d", {"ks": rf}, lambda n: True, sorted)
    assert plan and all(r.start < r.end for r in plan)
    for key in range(2000):
        token = token_for(f"k{key}".encode())
        covering = every_token(plan, "ks", token)
        if "d" in future.replicas(token, rf):
            assert len(covering) == 1
            sources = covering[0].sources
            assert set(sources) == set(ring.replicas(token, rf))
            losing = [n for n in ring.replicas(token, rf) if n not in future.replicas(token, rf)]
            assert sources[: len(losing)] == tuple(losing)  # the replica losing it comes first
        else:
            assert covering == []


def test_a_down_source_goes_last_and_proximity_orders_the_rest() -> None:
    ring = three()
    future = ring.with_node("d", [2**61])
    plan = bootstrap_plan(ring, future, "d", {"ks": 3}, lambda n: n != "b",
                          lambda nodes: sorted(nodes, reverse=True))
    for stream_range in plan:
        assert stream_range.sources[-1] == "b"
    # rf 3 on 3 nodes: d takes over (0, 2**61] and every old replica loses part of it.
    assert {r.keyspace for r in plan} == {"ks"}


def test_no_plan_for_the_first_node_or_for_a_node_not_on_the_future_ring() -> None:
    empty = TokenRing({})
    assert bootstrap_plan(empty, empty.with_node("a", [1]), "a", {"ks": 3}, bool, sorted) == []
    assert bootstrap_plan(three(), three(), "d", {"ks": 3}, bool, sorted) == []


@pytest.mark.parametrize("rf", [1, 2, 3])
def test_the_leave_plan_sends_each_range_to_every_node_that_gains_it(rf: int) -> None:
    import random

    ring = TokenRing({n: allocate_tokens(None, 16, random.Random(1))[i::4]
                      for i, n in enumerate("abcd")})
    future = ring.without_node("b")
    plan = leave_plan(ring, future, "b", {"ks": rf})
    assert plan and all(r.sources == ("b",) and r.start < r.end for r in plan)
    for key in range(2000):
        token = token_for(f"k{key}".encode())
        gainers = {n for n in future.replicas(token, rf) if n not in ring.replicas(token, rf)}
        targets = {r.target for r in every_token(plan, "ks", token)}
        assert targets == (gainers if "b" in ring.replicas(token, rf) else set())
    assert leave_plan(ring, future, "z", {"ks": rf}) == []


def four_nodes() -> TokenRing:
    import random

    return TokenRing({n: allocate_tokens(None, 16, random.Random(1))[i::4]
                      for i, n in enumerate("abcd")})


@pytest.mark.parametrize("rf", [1, 2, 3])
def test_the_remove_plan_gives_each_gainer_the_dead_nodes_ranges_from_survivors(rf: int) -> None:
    """Cassandra's removenode: each range the dead node replicated reaches every
    node that gains it, from the surviving replicas, the live ones first."""
    ring = four_nodes()
    future = ring.without_node("b")
    plan = remove_plan(ring, future, "b", {"ks": rf}, lambda n: n != "c",
                       lambda nodes: sorted(nodes, reverse=True))
    assert plan and all(r.start < r.end for r in plan)
    for key in range(2000):
        token = token_for(f"k{key}".encode())
        before = ring.replicas(token, rf)
        gainers = {n for n in future.replicas(token, rf) if n not in before}
        covering = every_token(plan, "ks", token)
        assert {r.target for r in covering} == (gainers if "b" in before else set())
        assert len(covering) == len({r.target for r in covering})  # each cell once per gainer
        for stream_range in covering:
            survivors = [n for n in before if n != "b"]
            assert sorted(stream_range.sources) == sorted(survivors)  # never the dead node
            live = sorted((n for n in survivors if n != "c"), reverse=True)
            assert list(stream_range.sources[: len(live)]) == live  # live first, by proximity
    assert remove_plan(ring, future, "z", {"ks": rf}, bool, sorted) == []


def test_a_replacement_is_pending_exactly_where_the_dead_node_was_a_replica() -> None:
    """Cassandra's replace_address: the new node takes the dead node's tokens, so
    it gains exactly the dead node's ranges and nobody else's change."""
    ring = four_nodes()
    states = {"e": {gs.STATUS: gs.BOOT, gs.TOKENS: gs.format_tokens(ring.tokens_of("b")),
                    gs.REPLACES: "b"},
              "f": {gs.STATUS: gs.NORMAL, gs.REPLACES: "x"},  # done replacing: not a joiner
              "me": {gs.STATUS: gs.BOOT, gs.REPLACES: "c"}}
    assert replacing_from_gossip(states, "me") == {"e": "b"}
    joining = joining_from_gossip(states, "me")
    # Without freeing the dead node's tokens the replacement would gain nothing.
    assert future_ring(ring, joining) is None
    future = future_ring(ring, joining, frozenset({"b"}))
    assert future is not None and future.tokens_of("e") == ring.tokens_of("b")
    assert "b" not in future.node_ids
    for token in range(MIN_TOKEN, MAX_TOKEN, 2**57):
        natural = ring.replicas(token, 3)
        expected = ("e",) if "b" in natural else ()
        assert pending_replicas(natural, future, token, 3) == expected
        assert [n for n in future.replicas(token, 3) if n != "e"] == [
            n for n in natural if n != "b"]


def test_a_normal_replacement_takes_the_dead_node_off_every_ring() -> None:
    """Once the replacement is NORMAL with REPLACES, the dead node (still NORMAL in
    its last gossip, its LEFT not arrived yet) is off the ring and forgotten."""
    ring = four_nodes()
    saved = {"b": {"tokens": list(ring.tokens_of("b")), "dc": "dc1", "rack": "rack1",
                   "internode_addr": "127.0.0.1:2"}}
    states = {n: {gs.STATUS: gs.NORMAL, gs.TOKENS: gs.format_tokens(ring.tokens_of(n))}
              for n in "bcd"}
    states["e"] = {gs.STATUS: gs.BOOT, gs.TOKENS: states["b"][gs.TOKENS], gs.REPLACES: "b"}
    during, peers = ring_from_gossip(states, saved, NodeInfo("a"), ring.tokens_of("a"))
    assert during == ring and "b" in peers  # streaming: the dead node still owns its ranges
    states["e"] = {**states["e"], gs.STATUS: gs.NORMAL}
    after, peers = ring_from_gossip(states, saved, NodeInfo("a"), ring.tokens_of("a"))
    assert set(after.node_ids) == {"a", "c", "d", "e"} and "b" not in peers
    assert after.tokens_of("e") == ring.tokens_of("b")


def test_the_pacer_spends_a_byte_budget_per_second() -> None:
    pacer = Pacer(1000.0)
    assert pacer.after(10.0, 500) == 0.0  # one second of idle burst
    assert pacer.after(10.0, 500) == 0.0
    assert pacer.after(10.0, 1000) == pytest.approx(1.0)
    assert pacer.after(10.5, 500) == pytest.approx(1.0)
    assert pacer.after(100.0, 100) == 0.0  # long idle earns at most a second
    with pytest.raises(ValueError):
        Pacer(0)


def test_progress_reports_rate_over_the_elapsed_time() -> None:
    progress = StreamProgress(ranges_total=4, ranges_done=1, bytes=2 * 1024 * 1024, started_s=10.0)
    view = progress.view(12.0)
    assert view["rate_mib_s"] == 1.0 and view["ranges_done"] == 1 and view["ranges_total"] == 4


# -- joins stay one at a time while one streams (membership) ---------------------


def test_a_streaming_joiner_holds_up_every_new_joiner_and_is_never_passed_over() -> None:
    states = {
        "z": {gs.STATUS: gs.BOOT, gs.TOKENS: "5"},  # streaming, though its id sorts last
        "y": {gs.STATUS: gs.BOOT},
        "a": {gs.STATUS: gs.NORMAL, gs.TOKENS: "1"},
    }
    assert streaming_joiners(states, "m", lambda n: True) == {"z"}
    assert streaming_joiners(states, "m", lambda n: n != "z") == frozenset()
    planner = JoinPlanner(bootstrap_new_cluster=False)
    for _ in range(50):  # far past JOIN_TURN_STALL_ROUNDS
        step = planner.step(known_peers=3, ring_size=1, only_seed_is_self=False,
                            streaming={"z"})
        assert step is JoinStep.WAIT_TURN
    assert planner.passed_over == set()
    assert planner.step(known_peers=2, ring_size=2, only_seed_is_self=False) is JoinStep.DONE


def test_a_removal_under_way_holds_up_every_new_joiner_until_its_coordinator_ends_it() -> None:
    """A removenode's coordinator says REMOVING while it streams a dead node's ranges
    to their new owners; a join planned against that moving ring could miss them
    (Cassandra's consistent range movement: one change at a time)."""
    states = {
        "dead": {gs.STATUS: gs.LEAVING, gs.TOKENS: "5"},  # marked on its behalf
        "a": {gs.STATUS: gs.NORMAL, gs.TOKENS: "1", gs.REMOVING: "dead"},
        "b": {gs.STATUS: gs.NORMAL, gs.TOKENS: "2", gs.REMOVING: ""},
    }
    alive = {"a", "b"}
    assert streaming_joiners(states, "m", alive.__contains__) == {"a"}
    states["a"][gs.REMOVING] = ""  # the removal ended (done, or failed and given up)
    assert streaming_joiners(states, "m", alive.__contains__) == frozenset()
    states["a"][gs.REMOVING] = "dead"
    assert streaming_joiners(states, "m", {"b"}.__contains__) == frozenset()  # a died


def test_removing_is_a_node_id_or_empty_in_gossip() -> None:
    gs.validate_app_state(gs.REMOVING, "node3")
    gs.validate_app_state(gs.REMOVING, "")
    with pytest.raises(ValueError, match="REMOVING must be a node id"):
        gs.validate_app_state(gs.REMOVING, "no spaces allowed")


# -- the streamer: resume at the next source (topology.streamer) -----------------


class FlakyScanner:
    """Serves scans from a dict of cells; ``dies`` sources fail after ``pages_ok`` pages."""

    def __init__(self, cells: dict[tuple[int, bytes], Cell], dies: set[str], pages_ok: int):
        self.cells = dict(sorted(cells.items()))
        self.dies, self.pages_ok = dies, pages_ok
        self.calls: list[tuple[str, tuple[int, bytes | None]]] = []

    async def scan(self, node_id: str, keyspace: str, after: tuple[int, bytes | None],
                   end_token: int, limit: int, timeout_s: float) -> ScanReply:
        self.calls.append((node_id, after))
        if node_id in self.dies and sum(1 for n, _ in self.calls if n == node_id) > self.pages_ok:
            raise PeerUnreachable(f"{node_id} is gone", node_id=node_id)
        token, key = after
        items = [(t, k, c) for (t, k), c in self.cells.items()
                 if (t, k) > (token, key or b"") and (key is not None or t > token)
                 and t <= end_token][:limit]
        return ScanReply(items, truncated=False)

    def write_future(self, node_id: str, keyspace: str, token: int, key: bytes, cell: Cell,
                     timeout_s: float) -> asyncio.Future[None]:
        raise AssertionError("a bootstrap stream writes to its own store only")


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(asyncio.wait_for(coro, timeout=30))


def test_a_broken_stream_resumes_from_the_last_cell_applied_at_the_next_source() -> None:
    async def main() -> None:
        clock = ManualClock()
        store = LocalStore(MemoryEngine(), clock)
        await store.start()
        cells = {(token_for(k), k): Cell(b'"v"', Timestamp(1_000_000, 0), False, None)
                 for k in (f"key{i}".encode() for i in range(100))}
        scanner = FlakyScanner(cells, dies={"a"}, pages_ok=3)
        progress = StreamProgress(ranges_total=1)
        streamer = Streamer(replicas=scanner, store=store, clock=clock, is_alive=lambda n: True,
                            throughput_mib_s=1e6, page_cells=10, timeout_s=1.0, progress=progress)
        task = asyncio.ensure_future(
            streamer.run([StreamRange("ks", MIN_TOKEN, MAX_TOKEN, ("a", "b"))]))
        for _ in range(1000):
            if task.done():
                break
            clock.advance(1.0)
            await asyncio.sleep(0)
        await task
        assert progress.cells == 100 and progress.ranges_done == 1 and progress.fallbacks == 1
        # a served three pages, failed on the fourth; b went on from the 30th cell.
        third = sorted(cells)[29]
        assert scanner.calls[3][0] == "a" and scanner.calls[4] == ("b", third)
        for (token, key) in cells:
            assert store.read("ks", token, key) is not None
        await store.close()

    run(main())


class JumpingClock(ManualClock):
    """A manual clock whose sleeps jump time forward at once: backoffs cost no real time."""

    async def sleep(self, delay_s: float) -> None:
        self.advance(delay_s)
        await asyncio.sleep(0)


def test_a_range_no_source_can_serve_fails_after_a_bound() -> None:
    async def main() -> None:
        clock = JumpingClock()
        store = LocalStore(MemoryEngine(), clock)
        await store.start()
        scanner = FlakyScanner({}, dies={"a", "b"}, pages_ok=0)
        progress = StreamProgress()
        streamer = Streamer(replicas=scanner, store=store, clock=clock, is_alive=lambda n: True,
                            throughput_mib_s=1.0, page_cells=10, timeout_s=1.0,
                            progress=progress)
        with pytest.raises(StreamFailed, match="6 pages failed in a row"):
            await streamer.run([StreamRange("ks", MIN_TOKEN, MAX_TOKEN, ("a", "b"))])
        # Both sources were tried in turn, falling back after each failure but the last.
        assert [n for n, _ in scanner.calls] == ["a", "b"] * 3
        assert progress.fallbacks == 5
        await store.close()

    run(main())


def test_ringkv_status_shows_streaming_progress_only_while_there_is_some() -> None:
    from ringkv.tools.local_cluster import format_status

    status = {"cluster": "c", "node_id": "node4", "nodes": [],
              "streaming": StreamProgress(ranges_total=8, ranges_done=3, bytes=3 * 2**20,
                                          state="streaming", source="node2",
                                          started_s=0.0).view(1.0)}
    text = format_status(status)
    assert "Streaming (node4): streaming, ranges 3/8, 3.0 MiB at 3.0 MiB/s" in text
    status["streaming"] = StreamProgress().view(1.0)
    assert "Streaming" not in format_status(status)
