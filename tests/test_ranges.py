"""Ranges of a transactional keyspace (ringkv/txn/ranges.py): Spanner §2.1 shards data
into tablets, one Paxos group each, and moves tablets between groups without changing
what they hold. ringkv's ranges are fixed slices of the token space, each placed on the
ring's replicas of its end token, so a topology change moves groups and never cuts one."""

from __future__ import annotations

import random

import pytest

from ringkv.ring import MAX_TOKEN, MIN_TOKEN, RING_SIZE, TokenRing, token_for
from ringkv.txn.ranges import Range, RangeMap, slice_ends


def random_ring(nodes: int, tokens_each: int, seed: int) -> TokenRing:
    rng = random.Random(seed)
    return TokenRing({f"n{i}": [rng.randint(MIN_TOKEN, MAX_TOKEN) for _ in range(tokens_each)]
                      for i in range(nodes)})


def width(r: Range) -> int:
    return (r.end - r.start) % RING_SIZE or RING_SIZE


def test_one_range_by_default_covers_the_whole_ring() -> None:
    ring = random_ring(3, 16, seed=1)
    ranges = RangeMap("txn", ring, 3)
    assert len(ranges) == 1
    (only,) = ranges.ranges
    assert only.start == only.end == MAX_TOKEN and width(only) == RING_SIZE
    assert set(only.replicas) == {"n0", "n1", "n2"}
    for token in (MIN_TOKEN, 0, MAX_TOKEN):
        assert ranges.range_for_token(token) is only and only.contains(token)
    assert only.group_id == f"txn/{MAX_TOKEN}"


@pytest.mark.parametrize("count", [1, 2, 3, 7, 16, 256])
def test_slices_are_equal_cover_the_ring_once_and_end_at_max_token(count: int) -> None:
    ends = slice_ends(count)
    assert len(ends) == count and ends == sorted(ends) and ends[-1] == MAX_TOKEN
    widths = [width(r) for r in RangeMap("txn", random_ring(5, 4, seed=count), 3, count).ranges]
    assert sum(widths) == RING_SIZE and max(widths) - min(widths) <= 1


@pytest.mark.parametrize("nodes,tokens_each,rf,count", [(5, 16, 3, 8), (4, 8, 2, 3),
                                                         (12, 16, 3, 32), (6, 1, 3, 5),
                                                         (2, 4, 1, 2)])
def test_every_token_is_in_one_range_served_by_the_replicas_of_its_end(
        nodes: int, tokens_each: int, rf: int, count: int) -> None:
    for seed in range(5):
        ring = random_ring(nodes, tokens_each, seed)
        ranges = RangeMap("txn", ring, rf, count)
        ordered = ranges.ranges
        for a, b in zip(ordered, ordered[1:] + ordered[:1]):
            assert b.start == a.end  # consecutive ranges meet end to start
        rng = random.Random(seed)
        probes = [rng.randint(MIN_TOKEN, MAX_TOKEN) for _ in range(500)] + slice_ends(count)
        probes += [e + 1 for e in slice_ends(count) if e < MAX_TOKEN] + [MIN_TOKEN]
        for token in probes:
            found = ranges.range_for_token(token)
            assert found.contains(token)
            assert sum(r.contains(token) for r in ranges.ranges) == 1
            assert found.replicas == ring.replicas(found.end, rf)


def test_a_topology_change_moves_groups_and_never_cuts_a_range() -> None:
    """Dynamo §4.9 adds a node: with fixed slices every range keeps its bounds and
    group id, and at most one replica of each changes, the join's one move."""
    ring = random_ring(4, 16, seed=5)
    before = RangeMap("txn", ring, 3, 16)
    joiner = random.Random(9)
    grown = ring.with_node("n9", [joiner.randint(MIN_TOKEN, MAX_TOKEN) for _ in range(16)])
    after = RangeMap("txn", grown, 3, 16)
    assert [(r.start, r.end, r.group_id) for r in before.ranges] == \
        [(r.start, r.end, r.group_id) for r in after.ranges]
    moved = [(a, b) for a, b in zip(before.ranges, after.ranges) if a.replicas != b.replicas]
    assert moved  # the new node takes a share
    for a, b in moved:
        assert len(set(a.replicas) - set(b.replicas)) <= 1
        assert set(b.replicas) - set(a.replicas) <= {"n9"}


def test_preferred_leaders_spread_over_the_nodes() -> None:
    ranges = RangeMap("txn", random_ring(5, 16, seed=3), 3, 32)
    leaders = {r.replicas[0] for r in ranges.ranges}
    assert leaders == {f"n{i}" for i in range(5)}
    for node in ("n0", "n4"):
        assert ranges.groups_of(node) and all(node in r.replicas for r in ranges.groups_of(node))


def test_keys_are_grouped_by_range_so_cross_range_writes_can_be_named() -> None:
    ranges = RangeMap("txn", random_ring(5, 16, seed=4), 3, 8)
    keys = [f"k{i}".encode() for i in range(50)]
    grouped = ranges.by_range(keys)
    assert sorted(k for ks in grouped.values() for k in ks) == sorted(keys)
    for r, ks in grouped.items():
        assert all(r.contains(token_for(k)) for k in ks)
    assert len(grouped) > 1  # 50 keys over 8 ranges: a transaction would cross ranges
    assert list(RangeMap("txn", random_ring(3, 16, seed=1), 3).by_range(keys)) == \
        list(RangeMap("txn", random_ring(3, 16, seed=1), 3).ranges)


def test_a_map_needs_nodes_and_a_bounded_count() -> None:
    with pytest.raises(ValueError, match="at least one node"):
        RangeMap("txn", TokenRing({}), 3)
    for count in (0, 257):
        with pytest.raises(ValueError, match="1 to 256 ranges"):
            RangeMap("txn", random_ring(3, 1, seed=1), 3, count)
