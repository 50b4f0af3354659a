"""Tests for ringkv.ring: tokens, replica placement, ranges, ownership, allocation."""

from __future__ import annotations

import ast
import functools
import random
from pathlib import Path

import mmh3
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ringkv import ring as ring_module
from ringkv.config import LimitsConfig
from ringkv.errors import BadRequest
from ringkv.ring import (
    MAX_TOKEN,
    MIN_TOKEN,
    NodeInfo,
    TokenRing,
    allocate_tokens,
    token_for,
)
from ringkv.server.validation import check_key, key_from_json

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


# Golden tokens: Cassandra's Murmur3Partitioner.getToken, computed from its
# source (utils/MurmurHash.hash3_x64_128, dht/Murmur3Partitioner.getToken) by
# a Java transcription run on the JDK, and cross-checked against the DataStax
# driver's murmur3 (C). They must never change, or stored keys would sit on
# the wrong replicas. Rows: ASCII keys of every tail length (len % 16) 0..16;
# every tail length with bytes >= 0x80 after an ASCII body; all-high-byte
# keys; UTF-8 keys; a non-ASCII body with an ASCII tail.
CASSANDRA_TOKENS = [
        (b'foo', -2129773440516405919),
        (b'hello', -3758069500696749310),
        (b'user:42', -3674646904862786968),
        (b'a', -8839064797231613815),
        (b'ab', -7815133031266706642),
        (b'abc', -5434086359492102041),
        (b'abcd', -5153323217664422577),
        (b'abcde', 2321271983248423864),
        (b'abcdef', -1982280103179862187),
        (b'abcdefg', -6427428730009885543),
        (b'abcdefgh', -3708139591217214462),
        (b'abcdefghi', 380484692874131812),
        (b'abcdefghij', -5277837174909203303),
        (b'abcdefghijk', -6298899011365987070),
        (b'abcdefghijkl', -8145996112604765804),
        (b'abcdefghijklm', 1605577856027523699),
        (b'abcdefghijklmn', -7939682693950507552),
        (b'abcdefghijklmno', -8449275918290243589),
        (b'abcdefghijklmnop', -4266531025627334877),
        (b'kkkkkkkkkkkkkkkk', 366243685468693092),
        (b'kkkkkkkkkkkkkkkk\x80', -2478430299069532083),
        (b'kkkkkkkkkkkkkkkk\x80\x81', -3129810046859997545),
        (b'kkkkkkkkkkkkkkkk\x80\x81\x82', 7108805945674877282),
        (b'kkkkkkkkkkkkkkkk\x80\x81\x82\x83', 1376543011196128120),
        (b'kkkkkkkkkkkkkkkk\x80\x81\x82\x83\x84', 3527925292505459766),
        (b'kkkkkkkkkkkkkkkk\x80\x81\x82\x83\x84\x85', -4533427610063940112),
        (b'kkkkkkkkkkkkkkkk\x80\x81\x82\x83\x84\x85\x86', -7368535700264903082),
        (b'kkkkkkkkkkkkkkkk\x80\x81\x82\x83\x84\x85\x86\x87', -6163720351853506521),
        (b'kkkkkkkkkkkkkkkk\x80\x81\x82\x83\x84\x85\x86\x87\x88', 6821365091052139002),
        (b'kkkkkkkkkkkkkkkk\x80\x81\x82\x83\x84\x85\x86\x87\x88\x89', 1614636139630964110),
        (b'kkkkkkkkkkkkkkkk\x80\x81\x82\x83\x84\x85\x86\x87\x88\x89\x8a', 2731039987624597109),
        (b'kkkkkkkkkkkkkkkk\x80\x81\x82\x83\x84\x85\x86\x87\x88\x89\x8a\x8b', -6472956384418978743),
        (b'kkkkkkkkkkkkkkkk\x80\x81\x82\x83\x84\x85\x86\x87\x88\x89\x8a\x8b\x8c', -5774851743447089113),
        (b'kkkkkkkkkkkkkkkk\x80\x81\x82\x83\x84\x85\x86\x87\x88\x89\x8a\x8b\x8c\x8d', -8971072456842465132),
        (b'kkkkkkkkkkkkkkkk\x80\x81\x82\x83\x84\x85\x86\x87\x88\x89\x8a\x8b\x8c\x8d\x8e', 8111973195381618604),
        (b'\xef', 8940581528398360514),
        (b'\xee\xef', -6799765485727031335),
        (b'\xed\xee\xef', 1319596367854568913),
        (b'\xec\xed\xee\xef', -3336568777852545485),
        (b'\xeb\xec\xed\xee\xef', 1862811984943558892),
        (b'\xea\xeb\xec\xed\xee\xef', 7793010535232046715),
        (b'\xe9\xea\xeb\xec\xed\xee\xef', -6278180021130436851),
        (b'\xe8\xe9\xea\xeb\xec\xed\xee\xef', -8506056603516411696),
        (b'\xe7\xe8\xe9\xea\xeb\xec\xed\xee\xef', -7276957159198540755),
        (b'\xe6\xe7\xe8\xe9\xea\xeb\xec\xed\xee\xef', -6269579526664977440),
        (b'\xe5\xe6\xe7\xe8\xe9\xea\xeb\xec\xed\xee\xef', -8731525477616249118),
        (b'\xe4\xe5\xe6\xe7\xe8\xe9\xea\xeb\xec\xed\xee\xef', 8215748730246110470),
        (b'\xe3\xe4\xe5\xe6\xe7\xe8\xe9\xea\xeb\xec\xed\xee\xef', 6728120799450217500),
        (b'\xe2\xe3\xe4\xe5\xe6\xe7\xe8\xe9\xea\xeb\xec\xed\xee\xef', -127114211976959741),
        (b'\xe1\xe2\xe3\xe4\xe5\xe6\xe7\xe8\xe9\xea\xeb\xec\xed\xee\xef', 3518885431160398817),
        ("café".encode(), -5777272221172978824),
        ("ключ".encode(), 1182936647932017555),
        ("日本".encode(), -7507319893842418264),
        ("user:ключ-日本-café".encode(), -999091597739951327),
        ("日本語のキー:abc".encode(), 6090613798370671351),
        ("ключ-0123456789".encode(), -3675273811113310798),
        (b'\x80', -5284281814142962636),
        (b'\xff', -4442228696663692417),
        (b'\x7f\x80', 66678688558852036),
        (b'\xf0\xf1\xf2\xf3\xf4\xf5\xf6\xf7\xf8\xf9\xfa\xfb\xfc\xfd\xfe\xff', -9084739235461062116),
        (b'\xf0\xf1\xf2\xf3\xf4\xf5\xf6\xf7\xf8\xf9\xfa\xfb\xfc\xfd\xfe\xff\xff', 9026743292056184257),
]


@pytest.mark.parametrize("key, token", CASSANDRA_TOKENS)
def test_token_for_matches_cassandra(key, token):
    assert token_for(key) == token


def test_golden_table_covers_the_signed_tail_bytes():
    """The table must exercise the one place Cassandra's hash differs from
    reference MurmurHash3: a tail byte >= 0x80 is sign-extended (Java bytes are
    signed). Every tail length 1..15 must appear with such a byte, and for
    those rows the reference hash (mmh3) must give a different answer."""
    tail_lengths = set()
    for key, token in CASSANDRA_TOKENS:
        tail = key[len(key) - (len(key) & 15) :]
        if not tail.isascii():
            tail_lengths.add(len(tail))
            assert mmh3.hash64(key, signed=True)[0] != token
        else:
            assert mmh3.hash64(key, signed=True)[0] == token
    assert tail_lengths == set(range(1, 16))


def test_empty_key_is_min_token_and_refused_by_the_api():
    """Cassandra's getToken gives an empty key MINIMUM without hashing it. Scans
    start after MIN_TOKEN and would never return it, so the API refuses empty
    keys (as CQL refuses empty partition keys) before they reach the ring."""
    assert token_for(b"") == MIN_TOKEN
    limits = LimitsConfig()
    with pytest.raises(BadRequest) as raised:
        check_key(b"", limits, field="key")
    assert raised.value.field == "key"
    with pytest.raises(BadRequest):
        key_from_json("", limits, field="key")


@given(st.binary(min_size=1, max_size=64))
def test_token_for_is_in_range(key):
    assert MIN_TOKEN < token_for(key) <= MAX_TOKEN


@given(st.binary(max_size=80))
def test_pure_hash_agrees_with_mmh3_when_the_tail_is_ascii(key):
    """Two independent implementations: with the tail's high bits cleared the
    signed and unsigned readings are the same, so the pure-Python hash must
    equal mmh3's reference hash, for any body."""
    tail_at = len(key) - (len(key) & 15)
    key = key[:tail_at] + bytes(b & 0x7F for b in key[tail_at:])
    assert ring_module._cassandra_hash3_x64_128_h1(key) == mmh3.hash64(key, signed=True)[0]


def test_token_for_maps_min_token_to_max(monkeypatch):
    """Cassandra's normalize: MIN_TOKEN is the sentinel, so a non-empty key hashing to it goes to MAX_TOKEN."""
    monkeypatch.setattr(ring_module.mmh3, "hash64", lambda key, signed: (MIN_TOKEN, 0))
    assert token_for(b"x") == MAX_TOKEN
    monkeypatch.setattr(ring_module, "_cassandra_hash3_x64_128_h1", lambda key: MIN_TOKEN)
    assert token_for("café".encode()) == MAX_TOKEN


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
