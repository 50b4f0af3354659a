"""Merkle trees for anti-entropy (ringkv/repair/merkle.py): Dynamo §4.7 keeps a
hash tree per key range, so replicas compare roots and descend only where they
differ, and repair moves only the differing leaves' data."""

from __future__ import annotations

import random

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ringkv.errors import ProtocolError
from ringkv.hlc import Timestamp
from ringkv.repair import merkle
from ringkv.repair.merkle import (
    MAX_DEPTH,
    MerkleBuilder,
    MerkleTree,
    TreeMismatch,
    build,
    depth_for,
    diff,
    range_contains,
    range_width,
    scan_pieces,
)
from ringkv.ring import MAX_TOKEN, MIN_TOKEN, RING_SIZE, TokenRing, token_for
from ringkv.versioning import Cell, encode_json_value, reconcile, tombstone

Item = tuple[int, bytes, Cell]


def in_range_order(token_range: tuple[int, int], items: dict[bytes, Cell]) -> list[Item]:
    """Cells as a storage scan of the range returns them: each scan piece in (token, key) order."""
    by_token = sorted((token_for(key), key, cell) for key, cell in items.items())
    out = []
    for start, end in scan_pieces(token_range):
        out += [item for item in by_token if start < item[0] <= end]
    return out


def value(v: object, wall_us: int, expires_at_us: int | None = None) -> Cell:
    return Cell(encode_json_value(v), Timestamp(wall_us), expires_at_us=expires_at_us)


def through_msgpack(obj: object) -> object:
    return msgpack.unpackb(msgpack.packb(obj, use_bin_type=True), raw=False)


WHOLE = (0, 0)
WRAPPING = (2**62, -(2**62))  # (2**62, MAX_TOKEN] then [MIN_TOKEN, -2**62]: half the ring


# ---- identical data, identical trees -------------------------------------

def test_replicas_with_the_same_writes_in_any_order_and_batching_build_identical_trees() -> None:
    """Dynamo §4.7 with Cassandra's LWW cells: replicas that applied the same
    writes (overwrites, deletes, TTLs) in different orders and batches hold the
    same cells, so their trees agree to the byte; one missed write shows."""
    rng = random.Random(7)
    keys = [f"user:{i}".encode() for i in range(300)]
    writes = []
    for n in range(1200):
        key = rng.choice(keys)
        ts = Timestamp(1_000_000 + rng.randrange(5000), rng.randrange(3))
        kind = rng.randrange(4)
        if kind == 0:
            writes.append((key, tombstone(ts)))
        elif kind == 1:
            writes.append((key, Cell(encode_json_value(n), ts, expires_at_us=ts.wall_us + 10**7)))
        else:
            writes.append((key, Cell(encode_json_value({"n": n}), ts)))

    def replica(order: list[tuple[bytes, Cell]], batch_size: int) -> dict[bytes, Cell]:
        stored: dict[bytes, Cell] = {}
        for i in range(0, len(order), batch_size):
            batch: dict[bytes, Cell] = {}
            for key, cell in order[i:i + batch_size]:
                merged = reconcile(batch.get(key), cell)
                assert merged is not None
                batch[key] = merged
            for key, cell in batch.items():
                merged = reconcile(stored.get(key), cell)
                assert merged is not None
                stored[key] = merged
        return stored

    shuffled = writes[:]
    rng.shuffle(shuffled)
    first = replica(writes, 1)
    second = replica(shuffled, 37)
    third = replica(list(reversed(writes)), 500)
    ring = TokenRing({"a": [-(2**61)], "b": [2**61], "c": [2**62 + 12345]})
    depth = depth_for(len(first) // 3, max_cells_per_leaf=4)
    assert depth > 3
    for start, end, _owner in ring.ranges():
        trees = [build((start, end), depth, in_range_order((start, end), stored))
                 for stored in (first, second, third)]
        assert trees[0] == trees[1] == trees[2]
        assert trees[0].root == trees[1].root and trees[0].to_wire() == trees[2].to_wire()
        assert diff(trees[0], trees[1]) == []
        assert trees[0].cells == sum(range_contains((start, end), token_for(k)) for k in first)

    # A replica that missed the winning write of one key differs exactly there.
    key, cell = max(writes, key=lambda w: (w[0] == keys[5], w[1].ts))
    assert first[key] == cell
    missed = replica([w for w in writes if w != (key, cell)], 10)
    assert missed[key] != cell
    full = build(WHOLE, depth, in_range_order(WHOLE, first))
    stale = build(WHOLE, depth, in_range_order(WHOLE, missed))
    assert diff(full, stale) == [full.leaf_range(full.leaf_index(token_for(key)))]


# ---- one changed cell, one leaf ------------------------------------------

BASE = value({"v": 1}, 5_000)


@pytest.mark.parametrize("name, changed", [
    ("value", value({"v": 2}, 5_000)),
    ("wall timestamp", value({"v": 1}, 5_001)),
    ("logical timestamp", Cell(BASE.value, Timestamp(5_000, 1))),
    ("tombstone instead of the value", tombstone(Timestamp(5_000))),
    ("ttl added", value({"v": 1}, 5_000, expires_at_us=9_000)),
    ("ttl changed", value({"v": 1}, 5_000, expires_at_us=9_000)._replace(expires_at_us=9_001)),
    ("missing", None),
])
def test_a_single_changed_cell_shows_in_exactly_its_leaf(name: str, changed: Cell | None) -> None:
    """Dynamo §4.7: replicas that differ in one key disagree in the one leaf
    that covers it; every other leaf, and so most of the range, agrees."""
    keys = [f"k{i}".encode() for i in range(2000)]
    ours = {key: BASE for key in keys}
    if name == "ttl changed":  # the two sides differ only in the expiry
        ours[keys[1234]] = value({"v": 1}, 5_000, expires_at_us=9_000)
    theirs = dict(ours)
    if changed is None:
        del theirs[keys[1234]]
    else:
        theirs[keys[1234]] = changed
    assert theirs != ours
    depth = depth_for(len(keys))
    a = build(WHOLE, depth, in_range_order(WHOLE, ours))
    b = build(WHOLE, depth, in_range_order(WHOLE, theirs))
    leaf = a.leaf_index(token_for(keys[1234]))
    assert [i for i in range(a.leaf_count) if a.leaves[i] != b.leaves[i]] == [leaf]
    assert a.root != b.root
    assert diff(a, b) == [a.leaf_range(leaf)] == diff(b, a)
    assert range_contains(diff(a, b)[0], token_for(keys[1234]))


def test_the_leaf_hash_is_of_the_whole_cell_identity_not_its_stored_bytes() -> None:
    """A tombstone and a value of the same timestamp, and cells whose keys and
    values only move bytes between each other, hash differently."""
    token = 5
    pairs = [
        ((b"ab", Cell(b"c", Timestamp(1))), (b"a", Cell(b"bc", Timestamp(1)))),
        ((b"k", tombstone(Timestamp(1))), (b"k", Cell(b"", Timestamp(1)))),
        ((b"k", Cell(b"1", Timestamp(1), expires_at_us=0)), (b"k", Cell(b"1", Timestamp(1)))),
    ]
    for (key_a, cell_a), (key_b, cell_b) in pairs:
        a = build(WHOLE, 0, [(token, key_a, cell_a)])
        b = build(WHOLE, 0, [(token, key_b, cell_b)])
        assert a.root != b.root, (cell_a, cell_b)


# ---- diff ranges cover exactly the differing tokens -----------------------

@st.composite
def token_ranges(draw: st.DrawFn) -> tuple[int, int]:
    start = draw(st.integers(MIN_TOKEN, MAX_TOKEN))
    # Narrow ranges too, so leaves of a single token and capped depths happen.
    width = draw(st.integers(1, 40) | st.integers(1, RING_SIZE) | st.just(RING_SIZE))
    return start, (start + width - MIN_TOKEN) % RING_SIZE + MIN_TOKEN


CELLS = st.sampled_from([
    value(1, 10), value(1, 11), value("x", 10), Cell(b"1", Timestamp(10, 1)),
    tombstone(Timestamp(10)), tombstone(Timestamp(12)),
    value(1, 10, expires_at_us=50), value(1, 10, expires_at_us=51),
])


@settings(max_examples=300, deadline=None)
@given(data=st.data(), token_range=token_ranges(), depth=st.integers(0, 7))
def test_diff_ranges_hold_every_mutated_token_and_only_ranges_with_one(
        data: st.DataObject, token_range: tuple[int, int], depth: int) -> None:
    """Dynamo §4.7: random cell sets and random mutations (changed, added and
    removed cells) on one side; every mutated token lies in a returned range,
    every returned range holds a mutation, and the ranges lie in the tree's
    range without overlapping."""
    width = range_width(token_range)
    depth = min(depth, depth_for(RING_SIZE, 1, token_range=token_range))
    start = token_range[0]
    # Few distinct offsets, so several keys share a token and leaves share tokens' edges.
    offsets = st.integers(1, width) | st.sampled_from(sorted({1, width, (width + 1) // 2}))
    slots = data.draw(st.lists(st.tuples(offsets, st.binary(min_size=1, max_size=3)),
                               max_size=60, unique=True))
    ours: dict[tuple[int, bytes], Cell] = {
        ((start + offset - MIN_TOKEN) % RING_SIZE + MIN_TOKEN, key): data.draw(CELLS)
        for offset, key in slots}
    theirs = dict(ours)
    if ours:
        for place in data.draw(st.lists(st.sampled_from(sorted(ours)), max_size=5)):
            new = data.draw(CELLS | st.none())  # None: this replica lacks the cell
            if new is None:
                theirs.pop(place, None)
            else:
                theirs[place] = new
    for offset, key in data.draw(st.lists(st.tuples(offsets, st.binary(min_size=1, max_size=3)),
                                          max_size=3)):
        theirs[((start + offset - MIN_TOKEN) % RING_SIZE + MIN_TOKEN, key)] = data.draw(CELLS)
    mutated_tokens = {token for token, key in ours.keys() | theirs.keys()
                      if ours.get((token, key)) != theirs.get((token, key))}

    def tree(cells: dict[tuple[int, bytes], Cell]) -> MerkleTree:
        ordered = sorted(cells, key=lambda p: ((p[0] - start) % RING_SIZE or RING_SIZE, p[1]))
        return build(token_range, depth, [(t, k, cells[(t, k)]) for t, k in ordered])

    a, b = tree(ours), tree(theirs)
    found = diff(a, b)
    assert found == diff(b, a)
    assert (found == []) == (mutated_tokens == set()) == (a.root == b.root)
    for token in mutated_tokens:
        assert any(range_contains(r, token) for r in found), (token, found)
    for r in found:
        assert any(range_contains(r, token) for token in mutated_tokens), (r, mutated_tokens)
    # The ranges are exactly the differing leaves, and each of those holds a mutation.
    differing = {i for i in range(a.leaf_count) if a.leaves[i] != b.leaves[i]}
    covered = {i for i in range(a.leaf_count)
               if any(range_contains(r, a.leaf_range(i)[1]) for r in found)}
    assert covered == differing
    assert all(any(a.leaf_index(token) == i for token in mutated_tokens) for i in differing)
    assert sum(range_width(r) for r in found) <= width
    for i, r in enumerate(found):  # disjoint: no range's end lies in another
        assert all(not range_contains(other, r[1]) for j, other in enumerate(found) if j != i)


def test_adjacent_differing_leaves_merge_and_the_whole_ring_joins_across_its_start() -> None:
    depth = 3
    whole = (-(2**61), -(2**61))  # leaf 0 starts just after -2**61; leaf 7 ends there
    a = build(whole, depth, [])

    def leaf_items(tree: MerkleTree, leaves: list[int]) -> list[Item]:
        """One cell in each of ``leaves``, at the last token the leaf holds."""
        items = [(tree.leaf_range(i)[1], b"k", value(1, 1)) for i in leaves]
        return sorted(items, key=lambda it: (it[0] - whole[0]) % RING_SIZE or RING_SIZE)

    cases = {
        (2, 3, 5): [(a.leaf_range(2)[0], a.leaf_range(3)[1]), a.leaf_range(5)],
        (0, 1, 7): [(a.leaf_range(7)[0], a.leaf_range(1)[1])],
        (0, 6): [a.leaf_range(0), a.leaf_range(6)],
        tuple(range(8)): [whole],
    }
    for leaves, expected in cases.items():
        b = build(whole, depth, leaf_items(a, list(leaves)))
        assert diff(a, b) == expected, leaves
    # On a range that is not the whole ring the first and last leaves are not neighbours.
    part = (0, 800)
    c = build(part, depth, [])
    d = build(part, depth, [(100, b"k", value(1, 1)), (800, b"k", value(1, 1))])
    assert diff(c, d) == [(0, 100), (700, 800)]


# ---- ranges: wrapping, whole ring, even split ------------------------------

@pytest.mark.parametrize("token_range", [
    (0, 2**40), WRAPPING, WHOLE, (MAX_TOKEN, MAX_TOKEN), (MIN_TOKEN, MIN_TOKEN),
    (MAX_TOKEN - 3, MIN_TOKEN + 3), (-5, 5), (MIN_TOKEN, MAX_TOKEN), (MAX_TOKEN, MIN_TOKEN),
])
@pytest.mark.parametrize("depth", [0, 1, 4, MAX_DEPTH])
def test_leaves_split_the_range_evenly_and_in_order(token_range: tuple[int, int], depth: int) -> None:
    depth = min(depth, depth_for(RING_SIZE, 1, token_range=token_range))  # 7 tokens: depth 2
    tree = build(token_range, depth, [])
    width = range_width(token_range)
    ranges = [tree.leaf_range(i) for i in range(tree.leaf_count)]
    assert ranges[0][0] == token_range[0] and ranges[-1][1] == token_range[1]
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    widths = [range_width(r) for r in ranges]
    assert sum(widths) == width
    assert max(widths) - min(widths) <= 1
    probes = [token_range[1], (token_range[0] + 1 - MIN_TOKEN) % RING_SIZE + MIN_TOKEN]
    probes += [r[1] for r in ranges[:: max(1, len(ranges) // 64)]]
    for token in probes:
        leaf = tree.leaf_index(token)
        assert range_contains(tree.leaf_range(leaf), token)


def test_a_wrapping_range_takes_cells_in_scan_order_and_finds_differences_on_both_sides() -> None:
    """The range (2**62, -2**62] wraps: its scan pieces are (2**62, MAX] then
    (MIN, -2**62], and the builder takes cells in that order."""
    assert scan_pieces(WRAPPING) == [(2**62, MAX_TOKEN), (MIN_TOKEN, -(2**62))]
    assert scan_pieces(WHOLE) == [(0, MAX_TOKEN), (MIN_TOKEN, 0)]
    assert scan_pieces((MAX_TOKEN, MAX_TOKEN)) == [(MIN_TOKEN, MAX_TOKEN)]
    assert scan_pieces((5, 9)) == [(5, 9)]
    high, low = (MAX_TOKEN - 10, b"high", value(1, 1)), (MIN_TOKEN + 10, b"low", value(1, 1))
    middle = (2**62 + 2**40, b"mid", value(1, 1))
    a = build(WRAPPING, 6, [middle, high, low])
    b = build(WRAPPING, 6, [middle, (high[0], high[1], value(2, 1)), (low[0], low[1], value(2, 1))])
    found = diff(a, b)
    assert len(found) == 1  # the leaves on either side of MAX -> MIN are neighbours
    (r,) = found
    assert r[0] > r[1]  # the merged range wraps
    assert range_contains(r, high[0]) and range_contains(r, low[0]) and not range_contains(r, middle[0])
    with pytest.raises(ValueError, match="not after"):
        build(WRAPPING, 6, [low, high])  # MIN side before MAX side: not the range's order
    with pytest.raises(ValueError, match="outside"):
        build(WRAPPING, 6, [(0, b"zero", value(1, 1))])
    with pytest.raises(ValueError, match="outside"):
        build(WRAPPING, 6, [(2**62, b"start", value(1, 1))])  # the start is exclusive
    assert build(WRAPPING, 6, [(-(2**62), b"end", value(1, 1))]).cells == 1  # the end is not


def test_the_builder_insists_on_strict_order_and_one_finish() -> None:
    builder = MerkleBuilder(WHOLE, 2)
    builder.add(5, b"b", BASE)
    with pytest.raises(ValueError, match="not after"):
        builder.add(5, b"a", BASE)  # same token, smaller key
    with pytest.raises(ValueError, match="not after"):
        builder.add(5, b"b", BASE)  # the same key twice
    with pytest.raises(ValueError, match="not after"):
        builder.add(4, b"z", BASE)
    builder.add(5, b"c", BASE)
    builder.add(MIN_TOKEN + 1, b"a", BASE)  # past MAX: the whole ring (0, 0] wraps too
    builder.add(0, b"a", BASE)  # the start of a whole-ring range is its last token
    with pytest.raises(ValueError, match="outside"):
        builder.add(MAX_TOKEN + 1, b"a", BASE)
    tree = builder.finish()
    assert tree.cells == 4
    with pytest.raises(ValueError, match="finished"):
        builder.add(1, b"x", BASE)
    with pytest.raises(ValueError, match="finished"):
        builder.finish()


def test_trees_of_different_ranges_or_depths_are_not_compared() -> None:
    base = build(WHOLE, 3, [])
    for other in (build((1, 1), 3, []), build(WRAPPING, 3, []), build(WHOLE, 4, [])):
        with pytest.raises(TreeMismatch):
            diff(base, other)
    assert issubclass(TreeMismatch, ValueError)


# ---- depth -----------------------------------------------------------------

@pytest.mark.parametrize("expected_cells, max_cells_per_leaf, depth", [
    (0, 16, 0), (1, 16, 0), (16, 16, 0), (17, 16, 1), (32, 16, 1), (33, 16, 2),
    (1000, 16, 6), (1024, 1, 10), (1025, 1, 11), (2**15, 1, 15), (2**15 + 1, 1, MAX_DEPTH),
    (10**12, 16, MAX_DEPTH), (10**12, 10**12, 0),
])
def test_depth_for_keeps_leaves_small_and_the_tree_bounded(
        expected_cells: int, max_cells_per_leaf: int, depth: int) -> None:
    """Cassandra sizes a repair tree from the partitions expected, with a capped depth."""
    got = depth_for(expected_cells, max_cells_per_leaf)
    assert got == depth
    if got < MAX_DEPTH:
        assert expected_cells <= (max_cells_per_leaf << got)  # leaves hold the bound on average
        assert got == 0 or expected_cells > (max_cells_per_leaf << (got - 1))  # and no deeper
    assert depth_for(expected_cells, max_cells_per_leaf, max_depth=3) == min(got, 3)


def test_depth_bounds_are_enforced() -> None:
    assert MAX_DEPTH == 15
    assert depth_for(10**9) == MAX_DEPTH == depth_for(10**9, max_cells_per_leaf=1)
    for bad in (-1, MAX_DEPTH + 1, True, 2.0):
        with pytest.raises(ValueError, match="depth"):
            MerkleBuilder(WHOLE, bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="depth"):
            depth_for(10, max_depth=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="expected_cells"):
        depth_for(-1)
    with pytest.raises(ValueError, match="max_cells_per_leaf"):
        depth_for(10, 0)
    for bad_range in ((0, MAX_TOKEN + 1), (MIN_TOKEN - 1, 0), (0,), [0, 1], (True, 1)):
        with pytest.raises(ValueError):
            MerkleBuilder(bad_range, 2)  # type: ignore[arg-type]
    deepest = build(WHOLE, MAX_DEPTH, [(1, b"a", BASE)])
    assert deepest.leaf_count == 2**15 and len(deepest.to_wire()["h"]) == 2**15 * merkle.DIGEST_BYTES


# ---- the internode form ----------------------------------------------------

def test_trees_round_trip_through_msgpack() -> None:
    stored = {f"k{i}".encode(): value(i, i + 1) for i in range(500)}
    for token_range, depth in ((WRAPPING, 5), (WHOLE, 0), (WHOLE, 9), ((MAX_TOKEN - 3, MIN_TOKEN + 3), 2)):
        tree = build(token_range, depth, in_range_order(token_range, stored))
        back = MerkleTree.from_wire(through_msgpack(tree.to_wire()))
        assert back == tree and back.root == tree.root and back.cells == tree.cells
        assert diff(back, tree) == []
    assert len(msgpack.packb(build(WHOLE, 10, []).to_wire(), use_bin_type=True)) < 1024 * 16 + 64


def _good_wire() -> dict[str, object]:
    return build(WRAPPING, 2, [(MAX_TOKEN, b"k", BASE)]).to_wire()


def _with(**changes: object) -> dict[str, object]:
    wire = _good_wire()
    for name, change in changes.items():
        if change is _MISSING:
            del wire[name]
        else:
            wire[name] = change
    return wire


_MISSING = object()
_LEAF = bytes(merkle.DIGEST_BYTES)


@pytest.mark.parametrize("wire, complaint", [
    ([1, 2], "must be a map"),
    (None, "must be a map"),
    (_with(v=_MISSING), "'v'"),
    (_with(v=2), "hash version 2"),
    (_with(s="0"), "'s'"),
    (_with(e=True), "'e'"),
    (_with(s=MAX_TOKEN + 1), "'s' is not a token"),
    (_with(e=MIN_TOKEN - 1), "'e' is not a token"),
    (_with(d=-1), "depth -1"),
    (_with(d=MAX_DEPTH + 1), f"depth {MAX_DEPTH + 1}"),
    (_with(d=2.0), "'d'"),
    (_with(n=-1), "'n' is negative"),
    (_with(n=_MISSING), "'n'"),
    (_with(h=_MISSING), "'h'"),
    (_with(h=[_LEAF] * 4), "'h'"),
    (_with(h="00" * 64), "'h'"),
    (_with(h=_LEAF * 3), "needs 64 bytes"),
    (_with(h=_LEAF * 4 + b"\x00"), "needs 64 bytes"),
    (_with(d=3), "needs 128 bytes"),
    # A range of 3 tokens cannot be split into 4 leaves.
    (_with(s=10, e=13), "cannot be split into 4 leaves"),
])
def test_malformed_trees_from_a_peer_are_protocol_errors(wire: object, complaint: str) -> None:
    with pytest.raises(ProtocolError, match=complaint):
        MerkleTree.from_wire(wire)


def test_a_narrow_range_gets_a_depth_with_a_token_in_every_leaf() -> None:
    """A leaf of no token would read (t, t], the whole ring: depths that need
    one are refused, and depth_for caps the depth at the range's width."""
    narrow = (10, 14)  # four tokens
    assert depth_for(10**6, token_range=narrow) == 2
    assert depth_for(10**6, token_range=(10, 17)) == 2  # 7 tokens: 4 leaves, not 8
    assert depth_for(10**6, token_range=WHOLE) == MAX_DEPTH
    assert depth_for(10**6, token_range=(10, 11)) == 0
    with pytest.raises(ValueError, match="cannot be split into 8 leaves"):
        MerkleBuilder(narrow, 3)
    tree = build(narrow, 2, [(11, b"a", BASE), (14, b"a", BASE)])
    assert [tree.leaf_range(i) for i in range(4)] == [(10, 11), (11, 12), (12, 13), (13, 14)]
    assert tree.leaves[1] == tree.leaves[2] == merkle.EMPTY_LEAF != tree.leaves[0]
    other = build(narrow, 2, [(11, b"a", BASE), (14, b"a", value(9, 9))])
    assert diff(tree, other) == [(13, 14)]
    both = build(narrow, 2, [(11, b"a", value(9, 9)), (12, b"b", BASE), (14, b"a", value(9, 9))])
    assert diff(tree, both) == [(10, 12), (13, 14)]
    assert MerkleTree.from_wire(through_msgpack(tree.to_wire())) == tree
