"""The ring derived from gossip state (Dynamo §4.8: membership and the ring;
Cassandra's TokenMetadata and system.peers)."""

from __future__ import annotations

import pytest

from ringkv.gossip import state as gs
from ringkv.membership import ring_from_gossip
from ringkv.ring import NodeInfo

ME = NodeInfo("a")


def states(**nodes: dict[str, str]) -> dict[str, dict[str, str]]:
    return {node_id: values for node_id, values in nodes.items()}


def normal(tokens: str, **extra: str) -> dict[str, str]:
    return {gs.STATUS: gs.NORMAL, gs.TOKENS: tokens, **extra}


def test_normal_nodes_with_tokens_are_on_the_ring() -> None:
    ring, peers = ring_from_gossip(
        states(b=normal("10,20", **{gs.DC: "dc2", gs.RACK: "r9", gs.INTERNODE_ADDR: "h:1"})),
        {}, ME, [5],
    )
    assert ring.node_ids == ("a", "b")
    assert ring.tokens_of("b") == (10, 20)
    assert ring.info("b") == NodeInfo("b", dc="dc2", rack="r9")
    assert peers == {"b": {"tokens": [10, 20], "dc": "dc2", "rack": "r9", "internode_addr": "h:1"}}


def test_booting_nodes_and_nodes_without_tokens_are_not_owners() -> None:
    ring, peers = ring_from_gossip(
        states(b={gs.STATUS: gs.BOOT, gs.TOKENS: "10"}, c=normal(""), d={gs.TOKENS: "30"}),
        {}, ME, [5],
    )
    assert set(ring.node_ids) == {"a"} and peers == {}


def test_a_node_without_tokens_is_not_on_its_own_ring() -> None:
    ring, _ = ring_from_gossip(states(b=normal("10")), {}, ME, [])
    assert set(ring.node_ids) == {"b"}


def test_saved_peers_stay_until_gossip_says_they_left() -> None:
    """A restarted node is never alone: peers from its last run stay on the ring."""
    saved = {"b": {"tokens": [10], "dc": "dc1", "rack": "rack1", "internode_addr": "h:1"}}
    ring, peers = ring_from_gossip({}, saved, ME, [5])
    assert set(ring.node_ids) == {"a", "b"} and peers == saved
    ring, peers = ring_from_gossip(states(b={gs.STATUS: gs.LEFT}), saved, ME, [5])
    assert set(ring.node_ids) == {"a"} and peers == {}


def test_gossip_overrides_what_was_saved() -> None:
    saved = {"b": {"tokens": [10], "dc": "dc1", "rack": "rack1", "internode_addr": "h:1"}}
    _, peers = ring_from_gossip(states(b=normal("11", **{gs.INTERNODE_ADDR: "h:2"})), saved, ME, [5])
    assert peers["b"]["tokens"] == [11] and peers["b"]["internode_addr"] == "h:2"


def test_a_token_claimed_twice_goes_to_the_first_node_by_id() -> None:
    """Every node must build the same ring from the same states."""
    ring, _ = ring_from_gossip(states(c=normal("10,30"), b=normal("10,20")), {}, ME, [5])
    assert list(ring.tokens_of("b")) == [10, 20] and list(ring.tokens_of("c")) == [30]
    ring, _ = ring_from_gossip(states(b=normal("5")), {}, ME, [5])
    assert set(ring.node_ids) == {"a"}  # b's only token was a's: b is off the ring


def test_this_nodes_own_gossip_entry_is_ignored() -> None:
    ring, peers = ring_from_gossip(states(a=normal("99")), {}, ME, [5])
    assert list(ring.tokens_of("a")) == [5] and peers == {}


# -- joining (Cassandra refuses to start a node that reaches no seed) --

from ringkv.membership import (  # noqa: E402
    JOIN_LEARN_ROUNDS,
    JOINING,
    SEED_RETRY_MAX_INTERVALS,
    WAITING_FOR_SEEDS,
    JoinPlanner,
)


def steps(planner: JoinPlanner, rounds: list[tuple[int, int, bool]]) -> list[tuple[str, int]]:
    """(step, next wait in intervals) for each (known peers, ring size, only seed is self)."""
    out = []
    for known, ring, only_self in rounds:
        step = planner.step(known_peers=known, ring_size=ring, only_seed_is_self=only_self)
        out.append((step.value, planner.delay_intervals))
    return out


def test_a_node_that_is_its_own_only_seed_starts_at_once() -> None:
    assert steps(JoinPlanner(bootstrap_new_cluster=False), [(0, 0, True)]) == [("done", 1)]


def test_a_node_that_hears_a_ring_is_done_once_every_node_heard_of_is_on_it() -> None:
    planner = JoinPlanner(bootstrap_new_cluster=False)
    assert steps(planner, [(0, 0, False), (2, 1, False), (2, 2, False)]) == [
        ("learn", 1), ("learn", 1), ("done", 1)]


def test_a_new_node_that_reaches_no_seed_waits_with_a_bounded_backoff() -> None:
    """It used to go NORMAL alone after the learning rounds."""
    planner = JoinPlanner(bootstrap_new_cluster=False)
    silent = [(0, 0, False)] * (JOIN_LEARN_ROUNDS + 5)
    got = steps(planner, silent)
    assert got[:JOIN_LEARN_ROUNDS] == [("learn", 1)] * JOIN_LEARN_ROUNDS
    assert [step for step, _ in got[JOIN_LEARN_ROUNDS:]] == ["wait"] * 5
    assert [wait for _, wait in got[JOIN_LEARN_ROUNDS:]] == [2, 4, 8, 8, 8]
    assert planner.state == WAITING_FOR_SEEDS
    assert max(wait for _, wait in got) == SEED_RETRY_MAX_INTERVALS


def test_once_a_seed_answers_it_learns_the_ring_for_a_few_more_rounds() -> None:
    planner = JoinPlanner(bootstrap_new_cluster=False)
    steps(planner, [(0, 0, False)] * (JOIN_LEARN_ROUNDS + 2))
    got = steps(planner, [(3, 0, False)] * (JOIN_LEARN_ROUNDS + 1))
    assert planner.state == JOINING
    assert got == [("learn", 1)] * JOIN_LEARN_ROUNDS + [("done", 1)]


def test_bootstrap_new_cluster_starts_alone_after_the_learning_rounds() -> None:
    planner = JoinPlanner(bootstrap_new_cluster=True)
    got = steps(planner, [(0, 0, False)] * (JOIN_LEARN_ROUNDS + 1))
    assert got[-1] == ("start_alone", 1)


# -- nodes that join at once take turns (issue #10: token allocation under concurrent starts) --

from ringkv.membership import JOIN_TURN_STALL_ROUNDS, joiners_ahead  # noqa: E402

BOOT = {gs.STATUS: gs.BOOT}


def test_joiners_ahead_are_live_nodes_before_this_one_still_without_tokens() -> None:
    """Cassandra has nodes join one at a time; here the order is by node id."""
    table = states(
        a=BOOT,                                   # before c, joining, live: ahead
        b={gs.STATUS: gs.BOOT, gs.TOKENS: "10"},  # has tokens already (a pending owner)
        bb=normal("20"),                          # on the ring
        ba=BOOT,                                  # joining, but the failure detector convicted it
        c=BOOT,                                   # this node
        d=BOOT,                                   # after c: c goes first
    )
    alive = {"a", "b", "bb", "c", "d"}
    assert joiners_ahead(table, "c", alive.__contains__) == {"a"}
    assert joiners_ahead(table, "d", alive.__contains__) == {"a", "c"}
    assert joiners_ahead(table, "a", alive.__contains__) == set()
    assert joiners_ahead(table, "c", lambda node_id: True) == {"a", "ba"}


def turn(planner: JoinPlanner, ahead: set[str], known: int = 4, ring: int = 1) -> str:
    return planner.step(known_peers=known, ring_size=ring, only_seed_is_self=False,
                        joiners_ahead=ahead).value


def learned() -> JoinPlanner:
    """A planner whose learning rounds are over (the ring is known)."""
    planner = JoinPlanner(bootstrap_new_cluster=False)
    assert {turn(planner, set()) for _ in range(JOIN_LEARN_ROUNDS)} == {"learn"}
    return planner


def test_a_node_waits_its_turn_until_no_joiner_ahead_is_without_tokens() -> None:
    planner = learned()
    got = [turn(planner, ahead) for ahead in ({"a", "b"}, {"a", "b"}, {"b"}, {"b"}, set())]
    assert got == ["wait_turn"] * 4 + ["done"]
    assert planner.delay_intervals == 1 and planner.state == JOINING and not planner.passed_over


def test_the_first_joiner_in_line_waits_for_nobody() -> None:
    assert turn(learned(), set()) == "done"


def test_learning_comes_first_even_with_joiners_ahead() -> None:
    planner = JoinPlanner(bootstrap_new_cluster=False)
    got = [turn(planner, {"a"}) for _ in range(JOIN_LEARN_ROUNDS)]
    assert got == ["learn"] * JOIN_LEARN_ROUNDS
    assert turn(planner, {"a"}) == "wait_turn"


def test_a_seed_alone_so_far_still_lets_a_joiner_ahead_go_first() -> None:
    planner = JoinPlanner(bootstrap_new_cluster=False)
    step = planner.step(known_peers=0, ring_size=0, only_seed_is_self=True, joiners_ahead=())
    assert step.value == "done"
    planner = JoinPlanner(bootstrap_new_cluster=False)
    step = planner.step(known_peers=0, ring_size=0, only_seed_is_self=True, joiners_ahead={"a"})
    assert step.value == "wait_turn"


def test_a_stuck_joiner_ahead_is_passed_over_after_the_bound() -> None:
    """Nothing waits forever: with no progress for JOIN_TURN_STALL_ROUNDS rounds the
    first joiner in line is passed over for good, and the next one gets its own bound."""
    planner = learned()
    stuck = [turn(planner, {"a", "b"}) for _ in range(JOIN_TURN_STALL_ROUNDS)]
    assert stuck == ["wait_turn"] * JOIN_TURN_STALL_ROUNDS and not planner.passed_over
    assert turn(planner, {"a", "b"}) == "wait_turn"  # a passed over; b still waited for
    assert planner.passed_over == {"a"} and planner.ahead == {"b"}
    got = [turn(planner, {"a", "b"}) for _ in range(JOIN_TURN_STALL_ROUNDS)]
    assert got == ["wait_turn"] * (JOIN_TURN_STALL_ROUNDS - 1) + ["done"]
    assert planner.passed_over == {"a", "b"}


def test_progress_restarts_the_bound() -> None:
    planner = learned()
    for ahead in ({"a", "b", "c"}, {"b", "c"}, {"c"}):
        got = [turn(planner, ahead) for _ in range(JOIN_TURN_STALL_ROUNDS)]
        assert got == ["wait_turn"] * JOIN_TURN_STALL_ROUNDS
    assert not planner.passed_over
    assert turn(planner, set()) == "done"


@pytest.mark.parametrize("spread_rounds", [0, 1, 3])
def test_joiners_started_at_once_take_tokens_one_at_a_time_in_order(spread_rounds: int) -> None:
    """Twelve planners in one world: a node's tokens reach the others ``spread_rounds``
    rounds after it takes them. Each takes tokens only once every node before it
    has, and knows their tokens (so it allocates against a ring that holds them)."""
    ids = [f"n{i:02}" for i in range(12)]
    planners = {node_id: JoinPlanner(bootstrap_new_cluster=False) for node_id in ids}
    done_at: dict[str, int] = {}
    for now in range(500):
        if len(done_at) == len(ids):
            break
        visible = {node_id for node_id, at in done_at.items() if at + spread_rounds < now}
        for node_id in ids:
            if node_id in done_at:
                continue
            world = {other: (normal("1") if other in visible else BOOT) for other in ids}
            ahead = joiners_ahead(world, node_id, lambda other: True)
            step = planners[node_id].step(known_peers=len(ids) - 1, ring_size=len(visible),
                                          only_seed_is_self=False, joiners_ahead=ahead)
            if step.value == "done":
                assert visible >= {other for other in ids if other < node_id}
                done_at[node_id] = now
    assert sorted(done_at, key=done_at.__getitem__) == ids
    assert len(set(done_at.values())) == len(ids)  # one at a time
    assert not any(planner.passed_over for planner in planners.values())
