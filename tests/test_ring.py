"""Tests for ringkv.ring: tokens, replica placement, ranges, ownership, allocation."""

from __future__ import annotations

import ast
import functools
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ringkv import ring as ring_module
from ringkv.ring import (
    MAX_TOKEN,
    MIN_TOKEN,
    NodeInfo,
    TokenRing,
    allocate_tokens,
    token_for,
)

RING_SIZE = 2**64
SEEDS = range(5)
NUM_TOKENS = 16
MAX_NODES = 12


def in_range(token: int, start: int, end: int) -> bool:
    """Is ``token`` in the ring range (start, end]? (start >= end: it wraps.)"""
    if start < end:
        return start < token <= end
    return token > start or token <= end


def width(start: int, end: int) -> int:
    return (end - start) % RING_SIZE or RING_SIZE


# ---- hypothesis strategies ------------------------------------------------

tokens_st = st.integers(min_value=MIN_TOKEN, max_value=MAX_TOKEN)


@st.composite
def rings(draw, max_nodes: int = 8, max_racks: int = 1) -> TokenRing:
    """A ring of 1..max_nodes nodes, 1..4 random tokens each, racks drawn from max_racks."""
    n = draw(st.integers(1, max_nodes))
    per_node = [draw(st.integers(1, 4)) for _ in range(n)]
    all_tokens = draw(st.lists(tokens_st, min_size=sum(per_node), max_size=sum(per_node), unique=True))
    tokens, nodes, pos = {}, {}, 0
    for i, count in enumerate(per_node):
        node_id = f"n{i}"
        tokens[node_id] = all_tokens[pos : pos + count]
        pos += count
        nodes[node_id] = NodeInfo(node_id, rack=f"r{draw(st.integers(0, max_racks - 1))}")
    return TokenRing(tokens, nodes)


# ---- purity -----------------------------------------------------------------


def test_module_is_pure():
    """The ring must run in the deterministic simulator: no I/O, clock or global randomness."""
    tree = ast.parse(Path(ring_module.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert not imported & {"asyncio", "aiohttp", "plyvel", "socket", "time"}
    # `random` may only be used for the random.Random type, never its global functions.
    uses = {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "random"
    }
    assert uses <= {"Random"}


# ---- token_for -----------------------------------------------------------------


@pytest.mark.parametrize(
    "key, token",
    [
        # Pinned from mmh3.hash64(key, signed=True)[0]; must never change,
        # or every stored key would land on the wrong replicas.
        (b"", 0),
        (b"foo", -2129773440516405919),
        (b"hello", -3758069500696749310),
        (b"user:42", -3674646904862786968),
    ],
)
def test_token_for_is_stable(key, token):
    assert token_for(key) == token


@given(st.binary(max_size=64))
def test_token_for_is_in_range(key):
    assert MIN_TOKEN <= token_for(key) <= MAX_TOKEN
    assert token_for(key) != MIN_TOKEN


def test_token_for_maps_min_token_to_max(monkeypatch):
    """Cassandra reserves MIN_TOKEN as a sentinel; a key hashing to it goes to MAX_TOKEN."""
    monkeypatch.setattr(ring_module.mmh3, "hash64", lambda key, signed: (MIN_TOKEN, 0))
    assert token_for(b"x") == MAX_TOKEN


# ---- construction ------------------------------------------------------------


def test_accessors():
    ring = TokenRing({"b": [30, 10], "a": [20]}, {"b": NodeInfo("b", rack="r2")})
    assert ring.node_ids == ("a", "b")
    assert ring.tokens_of("b") == (10, 30)
    assert ring.sorted_tokens == ((10, "b"), (20, "a"), (30, "b"))
    assert ring.info("a") == NodeInfo("a")
    assert ring.info("b").rack == "r2"
    assert len(ring) == 2
    assert len(TokenRing({})) == 0


@pytest.mark.parametrize(
    "tokens, nodes, message",
    [
        ({"a": [1], "b": [1]}, None, "claimed by both"),
        ({"a": []}, None, "no tokens"),
        ({"a": [MAX_TOKEN + 1]}, None, "outside"),
        ({"a": [1]}, {"z": NodeInfo("z")}, "no tokens"),
        ({"a": [1]}, {"a": NodeInfo("b")}, "names node"),
    ],
)
def test_invalid_rings_are_rejected(tokens, nodes, message):
    with pytest.raises(ValueError, match=message):
        TokenRing(tokens, nodes)


def test_equality_is_by_content():
    assert TokenRing({"a": [1, 2], "b": [3]}) == TokenRing({"b": [3], "a": [2, 1]})
    assert hash(TokenRing({"a": [1]})) == hash(TokenRing({"a": [1]}))
    assert TokenRing({"a": [1]}) != TokenRing({"a": [2]})
    assert TokenRing({"a": [1]}) != TokenRing({"a": [1]}, {"a": NodeInfo("a", rack="r9")})


def test_empty_ring_has_no_owner():
    with pytest.raises(ValueError, match="empty"):
        TokenRing({}).primary(0)


# ---- primary and replicas ------------------------------------------------------

# Three nodes, one token each: a owns (30, 10], b owns (10, 20], c owns (20, 30].
SMALL = TokenRing({"a": [10], "b": [20], "c": [30]})


@pytest.mark.parametrize(
    "token, primary, replicas_rf2",
    [
        (10, "a", ("a", "b")),  # a range's end token belongs to it (end inclusive)
        (11, "b", ("b", "c")),
        (20, "b", ("b", "c")),
        (25, "c", ("c", "a")),  # wraps past the last token
        (31, "a", ("a", "b")),  # after the last token: wraps to the first
        (MAX_TOKEN, "a", ("a", "b")),
        (MIN_TOKEN, "a", ("a", "b")),
    ],
)
def test_primary_and_replicas_table(token, primary, replicas_rf2):
    """Dynamo §4.2/§4.3: a key belongs to the first node clockwise, then its successors."""
    assert SMALL.primary(token) == primary
    assert SMALL.replicas(token, 2) == replicas_rf2


def test_replicas_rf_larger_than_cluster_returns_every_node():
    assert SMALL.replicas(15, 5) == ("b", "c", "a")


def test_replicas_rejects_bad_rf():
    with pytest.raises(ValueError):
        SMALL.replicas(0, 0)


def test_replicas_skip_further_vnodes_of_chosen_nodes():
    ring = TokenRing({"a": [10, 20], "b": [30]})
    assert ring.replicas(5, 2) == ("a", "b")


def test_replicas_for_key_uses_token_for():
    key = b"user:42"
    assert SMALL.replicas_for_key(key, 2) == SMALL.replicas(token_for(key), 2)


@settings(max_examples=200)
@given(rings(), tokens_st, st.integers(1, 5))
def test_replicas_properties(ring, token, rf):
    """Dynamo §4.3: the preference list is min(rf, n) distinct nodes, starting at the primary."""
    replicas = ring.replicas(token, rf)
    assert len(replicas) == min(rf, len(ring))
    assert len(set(replicas)) == len(replicas)
    assert replicas[0] == ring.primary(token)
    # Simple strategy: the clockwise walk order of first appearances.
    walk = [owner for t, owner in ring.sorted_tokens if t >= token]
    walk += [owner for t, owner in ring.sorted_tokens if t < token]
    assert replicas == tuple(dict.fromkeys(walk))[: len(replicas)]


# ---- rack-aware placement ----------------------------------------------------


def racks_of(ring: TokenRing, replicas) -> list[str]:
    return [ring.info(n).rack for n in replicas]


def test_rack_aware_table():
    # Clockwise: a(r1) b(r1) c(r2) d(r2) e(r3)
    infos = {"a": "r1", "b": "r1", "c": "r2", "d": "r2", "e": "r3"}
    ring = TokenRing(
        {node: [10 * (i + 1)] for i, node in enumerate(infos)},
        {node: NodeInfo(node, rack=rack) for node, rack in infos.items()},
    )
    assert ring.replicas(10, 2) == ("a", "c")  # b skipped: rack r1 already used
    assert ring.replicas(10, 3) == ("a", "c", "e")
    # All racks used after a, c, e: skipped nodes fill in clockwise order (b before d).
    assert ring.replicas(10, 4) == ("a", "c", "e", "b")
    assert ring.replicas(10, 5) == ("a", "c", "e", "b", "d")
    assert ring.replicas(45, 3) == ("e", "a", "c")


def test_racks_in_different_dcs_are_different_racks():
    ring = TokenRing(
        {"a": [10], "b": [20], "c": [30]},
        {"a": NodeInfo("a"), "b": NodeInfo("b"), "c": NodeInfo("c", dc="dc2")},
    )
    assert ring.replicas(10, 2) == ("a", "c")


@settings(max_examples=200)
@given(rings(max_racks=4), tokens_st, st.integers(1, 5))
def test_rack_aware_spreads_replicas(ring, token, rf):
    """With >= rf racks every replica is in its own rack; otherwise every rack is used."""
    replicas = ring.replicas(token, rf)
    assert len(replicas) == min(rf, len(ring))
    assert len(set(replicas)) == len(replicas)
    assert replicas[0] == ring.primary(token)
    rack_count = len({ring.info(n).rack for n in ring.node_ids})
    assert len(set(racks_of(ring, replicas))) == min(len(replicas), rack_count)


# ---- ranges and ownership -----------------------------------------------------


@settings(max_examples=100)
@given(rings(), st.lists(tokens_st, max_size=20))
def test_ranges_cover_the_ring_exactly_once(ring, probes):
    ranges = ring.ranges()
    assert sum(width(start, end) for start, end, _ in ranges) == RING_SIZE
    assert [end for _, end, _ in ranges] == [t for t, _ in ring.sorted_tokens]
    for token in probes + [MIN_TOKEN, MAX_TOKEN]:
        holders = [owner for start, end, owner in ranges if in_range(token, start, end)]
        assert holders == [ring.primary(token)]


def test_ranges_table():
    assert SMALL.ranges() == [(30, 10, "a"), (10, 20, "b"), (20, 30, "c")]
    assert TokenRing({"a": [5]}).ranges() == [(5, 5, "a")]  # one token: the whole ring


@settings(max_examples=100)
@given(rings(max_racks=3), st.integers(1, 4))
def test_ownership_sums(ring, rf):
    assert sum(ring.ownership().values()) == pytest.approx(1.0)
    assert sum(ring.ownership(rf).values()) == pytest.approx(min(rf, len(ring)))
    assert set(ring.ownership(rf)) == set(ring.node_ids)


@settings(max_examples=100)
@given(rings(max_racks=3), st.integers(1, 4), st.lists(tokens_st, max_size=10))
def test_ranges_for_agrees_with_replicas(ring, rf, probes):
    for node_id in ring.node_ids:
        mine = ring.ranges_for(node_id, rf)
        assert sum(width(s, e) for s, e in mine) / RING_SIZE == pytest.approx(
            ring.ownership(rf)[node_id]
        )
        for token in probes:
            covered = any(in_range(token, s, e) for s, e in mine)
            assert covered == (node_id in ring.replicas(token, rf))


def test_ownership_table():
    ring = TokenRing({"a": [0], "b": [2**62]})
    # b owns (0, 2**62]: a quarter of the ring.
    assert ring.ownership() == {"a": 0.75, "b": 0.25}
    assert ring.ownership(2) == {"a": 1.0, "b": 1.0}
    assert ring.ranges_for("b", 1) == [(0, 2**62)]


# ---- topology changes -------------------------------------------------------


@settings(max_examples=100)
@given(rings(max_nodes=6, max_racks=2))
def test_without_with_node_round_trip(ring):
    node_id = ring.node_ids[0]
    smaller = ring.without_node(node_id)
    assert node_id not in smaller.node_ids and len(smaller) == len(ring) - 1
    assert smaller.with_node(node_id, ring.tokens_of(node_id), ring.info(node_id)) == ring


def test_with_node_moves_an_existing_node_and_keeps_its_info():
    ring = TokenRing({"a": [1], "b": [2]}, {"a": NodeInfo("a", rack="r7")})
    moved = ring.with_node("a", [5, 6])
    assert moved.tokens_of("a") == (5, 6) and moved.info("a").rack == "r7"
    with pytest.raises(ValueError, match="claimed by both"):
        ring.with_node("c", [2])
    with pytest.raises(KeyError):
        ring.without_node("zz")


def test_replica_cache_does_not_leak_between_rings():
    bigger = SMALL.with_node("d", [15])
    assert SMALL.replicas(15, 2) == ("b", "c")
    assert bigger.replicas(15, 2) == ("d", "b")


# ---- token allocation -------------------------------------------------------


@functools.cache
def grown_rings(seed: int) -> tuple[TokenRing, ...]:
    """Rings of 1..MAX_NODES nodes, each node added with allocate_tokens (cached: shared by tests)."""
    rng = random.Random(seed)
    ring = TokenRing({})
    out = []
    for n in range(1, MAX_NODES + 1):
        ring = ring.with_node(f"n{n:02d}", allocate_tokens(ring, NUM_TOKENS, rng))
        out.append(ring)
    return tuple(out)


def max_over_mean(ring: TokenRing, rf: int) -> float:
    ownership = ring.ownership(rf)
    return max(ownership.values()) / (min(rf, len(ring)) / len(ring))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("rf", [1, 3])
def test_allocation_keeps_ownership_balanced(seed, rf):
    """Dynamo §4.2 (vnodes): the most loaded node owns at most 1.25x its fair share."""
    for ring in grown_rings(seed)[2:]:  # 3 .. MAX_NODES nodes
        assert max_over_mean(ring, rf) <= 1.25, (len(ring), ring.ownership(rf))


@pytest.mark.parametrize("seed", SEEDS)
def test_allocation_balances_an_unbalanced_start(seed):
    """Nodes joining a randomly tokenized ring still bring it within 1.25x (rf=1 and 3)."""
    rng = random.Random(seed)
    ring = TokenRing(
        {f"r{i}": [rng.randint(MIN_TOKEN, MAX_TOKEN) for _ in range(NUM_TOKENS)] for i in range(3)}
    )
    for n in range(4, 9):
        ring = ring.with_node(f"n{n}", allocate_tokens(ring, NUM_TOKENS, rng))
        if n >= 6:
            assert max_over_mean(ring, 1) <= 1.25 and max_over_mean(ring, 3) <= 1.25


@pytest.mark.parametrize("seed", SEEDS)
def test_adding_a_node_moves_only_its_share(seed):
    """Dynamo §4.2: a new node takes about 1/(n+1) of the key space, all from others to it."""
    rings_ = grown_rings(seed)
    for old, new in zip(rings_, rings_[1:]):
        (joined,) = set(new.node_ids) - set(old.node_ids)
        # Between consecutive points of either ring the primary owner is constant.
        points = sorted({t for t, _ in old.sorted_tokens} | {t for t, _ in new.sorted_tokens})
        moved = 0
        for start, end in zip([points[-1]] + points[:-1], points):
            before, after = old.primary(end), new.primary(end)
            if before != after:
                assert after == joined, "keys moved between old nodes"
                moved += width(start, end)
        assert moved / RING_SIZE <= 1.3 / len(new)


@pytest.mark.parametrize("num_tokens", [1, 4, 16, 64])
def test_allocated_tokens_are_valid(num_tokens):
    rng = random.Random(7)
    ring = None
    for n in range(4):
        tokens = allocate_tokens(ring, num_tokens, rng)
        assert len(tokens) == len(set(tokens)) == num_tokens
        assert all(MIN_TOKEN <= t <= MAX_TOKEN for t in tokens)
        assert tokens == sorted(tokens)
        # with_node raises on a token already in the ring: no duplicates allowed.
        ring = (ring or TokenRing({})).with_node(f"n{n}", tokens)


def test_first_node_tokens_are_evenly_spaced():
    tokens = allocate_tokens(None, 8, random.Random(1))
    gaps = {width(a, b) for a, b in zip(tokens, tokens[1:] + tokens[:1])}
    assert gaps == {RING_SIZE // 8}


def test_allocation_is_deterministic_for_a_seed():
    assert grown_rings(0)[-1] == grown_rings.__wrapped__(0)[-1]
    first = [allocate_tokens(None, 16, random.Random(s)) for s in (1, 2)]
    assert first[0] != first[1]


def test_allocation_rejects_bad_arguments():
    with pytest.raises(ValueError):
        allocate_tokens(None, 0, random.Random(0))
    with pytest.raises(ValueError):
        allocate_tokens(SMALL, 4, random.Random(0), rf=0)
