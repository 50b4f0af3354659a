"""Ranges of a transactional keyspace (ringkv/txn/ranges.py): Spanner §2.1 shards data
into tablets, one Paxos group each; ringkv's ranges are runs of the ring with one
replica set, and that set is the range's group."""

from __future__ import annotations

import random

import pytest

from ringkv.ring import MAX_TOKEN, MIN_TOKEN, RING_SIZE, TokenRing, token_for
from ringkv.txn.ranges import Range, RangeMap


def random_ring(nodes: int, tokens_each: int, seed: int) -> TokenRing:
    rng = random.Random(seed)
    return TokenRing({f"n{i}": [rng.randint(MIN_TOKEN, MAX_TOKEN) for _ in range(tokens_each)]
                      for i in range(nodes)})


def width(r: Range) -> int:
    return (r.end - r.start) % RING_SIZE or RING_SIZE


def test_three_nodes_with_rf_three_are_one_range_over_the_whole_ring() -> None:
    ring = random_ring(3, 16, seed=1)
    ranges = RangeMap("txn", ring, 3)
    assert len(ranges) == 1
    (only,) = ranges.ranges
    assert only.start == only.end and width(only) == RING_SIZE
    assert set(only.replicas) == {"n0", "n1", "n2"}
    for token in (MIN_TOKEN, 0, MAX_TOKEN, only.end, only.end + 1):
        assert ranges.range_for_token(token) is only and only.contains(token)
    assert only.group_id == f"txn/{only.end}"


@pytest.mark.parametrize("nodes,tokens_each,rf", [(5, 16, 3), (4, 8, 2), (12, 16, 3), (6, 1, 3),
                                                   (2, 4, 1)])
def test_ranges_cover_the_ring_once_and_each_is_served_by_its_replicas(
        nodes: int, tokens_each: int, rf: int) -> None:
    for seed in range(5):
        ring = random_ring(nodes, tokens_each, seed)
        ranges = RangeMap("txn", ring, rf)
        assert 1 <= len(ranges) <= nodes * tokens_each
        assert sum(width(r) for r in ranges.ranges) == RING_SIZE
        # Consecutive ranges meet end to start, and differ in their group (else one run).
        ordered = ranges.ranges
        for a, b in zip(ordered, ordered[1:] + ordered[:1]):
            if len(ordered) > 1:
                assert b.start == a.end
                assert set(a.replicas) != set(b.replicas)
        rng = random.Random(seed)
        probes = [rng.randint(MIN_TOKEN, MAX_TOKEN) for _ in range(500)]
        probes += [t for t, _ in ring.sorted_tokens] + [t + 1 for t, _ in ring.sorted_tokens]
        for token in probes:
            token = min(MAX_TOKEN, token)
            found = ranges.range_for_token(token)
            assert found.contains(token)
            assert sum(r.contains(token) for r in ranges.ranges) == 1
            assert set(found.replicas) == set(ring.replicas(token, rf))


def test_preferred_leaders_spread_over_the_nodes() -> None:
    ranges = RangeMap("txn", random_ring(5, 16, seed=3), 3)
    leaders = {r.replicas[0] for r in ranges.ranges}
    assert leaders == {f"n{i}" for i in range(5)}
    for node in ("n0", "n4"):
        assert ranges.groups_of(node) and all(node in r.replicas for r in ranges.groups_of(node))


def test_keys_are_grouped_by_range_so_cross_range_writes_can_be_named() -> None:
    ranges = RangeMap("txn", random_ring(5, 16, seed=4), 3)
    keys = [f"k{i}".encode() for i in range(50)]
    grouped = ranges.by_range(keys)
    assert sorted(k for ks in grouped.values() for k in ks) == sorted(keys)
    for r, ks in grouped.items():
        assert all(r.contains(token_for(k)) for k in ks)
    assert len(grouped) > 1  # 50 keys over dozens of ranges: a transaction would cross ranges
    assert list(RangeMap("txn", random_ring(3, 16, seed=1), 3).by_range(keys)) == \
        list(RangeMap("txn", random_ring(3, 16, seed=1), 3).ranges)


def test_a_map_needs_nodes() -> None:
    with pytest.raises(ValueError, match="at least one node"):
        RangeMap("txn", TokenRing({}), 3)
