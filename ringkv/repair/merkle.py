"""Merkle trees over one token range, for anti-entropy repair (pure).

Dynamo §4.7: each node keeps a hash tree per key range; two replicas compare
roots, and where they differ descend to find the leaves that differ, so that
only those key ranges are synchronised and little data moves when replicas
are nearly in step. Cassandra builds such trees for ``nodetool repair``: a
perfect binary tree whose leaves split the range evenly by token, a leaf's
hash covering the rows whose tokens fall in it, built by one scan in token
order (the "validation compaction").

Here a tree covers one ring range ``(start_exclusive, end_inclusive]`` as
``TokenRing.ranges`` gives them: it may wrap past MAX_TOKEN (start > end),
and equal ends are the whole ring. Its depth is at most ``MAX_DEPTH``, so a
tree has at most 2**MAX_DEPTH leaves whatever the data; ``depth_for`` picks
the depth from the number of cells expected, so that a leaf holds about
``max_cells_per_leaf`` of them and a single differing cell costs streaming
one leaf, not the range.

Every leaf covers at least one token (a range narrower than 2**depth
tokens takes a smaller depth), so a leaf's range is never empty and never
reads as the whole ring.

A leaf hashes each of its cells' full identity (key, tombstone or value,
HLC timestamp, expiry) in (token, key) order, the order a storage scan
returns them (``storage/keys.py``). Two replicas that hold the same cells,
however the writes reached them (``versioning.reconcile`` is order-free),
build byte-identical trees; any difference in a value, a timestamp, a
deletion or an expiry changes the leaf that holds the key. An inner node is
hash(left || right). Hashes are BLAKE2b with a 16-byte digest and separate
personalisation for leaves and inner nodes.

``MerkleBuilder`` takes cells one at a time and keeps only the finished
leaf hashes and the one leaf being hashed, so a shell can feed it from a
throttled scan off the event loop. ``diff`` returns the sub-ranges where two
trees of the same range and depth differ, adjacent leaves merged. Trees
cross the internode link as their leaf hashes (``to_wire``/``from_wire``);
the receiver recomputes the inner nodes itself, and ``from_wire`` checks
every field of what a peer sent (``ProtocolError``).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from typing import Any

from ringkv.errors import ProtocolError
from ringkv.limits import MAX_FRAME_BYTES
from ringkv.ring import MAX_TOKEN, MIN_TOKEN, RING_SIZE
from ringkv.versioning import Cell

TokenRange = tuple[int, int]  # (start_exclusive, end_inclusive); equal ends: the whole ring

# Cassandra long capped a repair tree at 2**15 leaves; the same cap keeps a
# tree at 512 KiB of leaf hashes, well inside one internode frame.
MAX_DEPTH = 15
# The default leaf size depth_for aims for: one differing cell makes repair
# stream about this many cells (fewer leaves would stream more, more leaves
# cost a bigger tree to build, send and compare).
MAX_CELLS_PER_LEAF = 16
DIGEST_BYTES = 16
# Bumped whenever what a leaf hashes changes, so trees from nodes that hash
# differently are refused rather than compared as "everything differs".
HASH_VERSION = 1

_LEAF_PERSON = b"ringkv-leaf-v1"
_NODE_PERSON = b"ringkv-node-v1"
# What a leaf hashes per cell: key length, flags, wall_us, logical, expiry,
# value length; then the key and value bytes follow. Length prefixes make the
# concatenation of cells unambiguous.
_CELL_HEAD = struct.Struct(">IBQIQI")
_FLAG_TOMBSTONE = 0x01
_FLAG_EXPIRES = 0x02
# A wire tree is a small map around the leaf hashes; this bounds the map.
_WIRE_ENVELOPE_BYTES = 256

EMPTY_LEAF = hashlib.blake2b(digest_size=DIGEST_BYTES, person=_LEAF_PERSON).digest()

if (1 << MAX_DEPTH) * DIGEST_BYTES + _WIRE_ENVELOPE_BYTES > MAX_FRAME_BYTES // 2:
    # Not ``assert``: ``python -O`` would skip it (as in limits.py).
    raise AssertionError("ringkv.repair.merkle: the deepest tree fits half an internode frame")


class TreeMismatch(ValueError):
    """Two trees cover different ranges or have different depths, so their
    leaves do not line up (for a peer's tree: the two nodes see different rings)."""


def range_width(token_range: TokenRange) -> int:
    """Number of ring points in ``(start, end]``; equal ends are the whole ring."""
    start, end = token_range
    return (end - start) % RING_SIZE or RING_SIZE


def range_contains(token_range: TokenRange, token: int) -> bool:
    start, end = token_range
    if start == end:
        return True
    if start < end:
        return start < token <= end
    return token > start or token <= end  # wraps past MAX_TOKEN


def scan_pieces(token_range: TokenRange) -> list[TokenRange]:
    """The non-wrapping pieces a storage scan reads, in the order the builder takes them.

    A wrapping range is (start, MAX_TOKEN] then [MIN_TOKEN, end]; the second is
    written (MIN_TOKEN, end] as ``storage.keys.range_bounds`` takes it, since no
    key has token MIN_TOKEN (``ring.token_for``).
    """
    _check_range(token_range)
    start, end = token_range
    if start < end:
        return [(start, end)]
    pieces = []
    if start < MAX_TOKEN:
        pieces.append((start, MAX_TOKEN))
    if end > MIN_TOKEN:
        pieces.append((MIN_TOKEN, end))
    return pieces


def depth_for(
    expected_cells: int,
    max_cells_per_leaf: int = MAX_CELLS_PER_LEAF,
    *,
    token_range: TokenRange | None = None,
    max_depth: int = MAX_DEPTH,
) -> int:
    """The smallest depth whose leaves hold at most ``max_cells_per_leaf`` of
    ``expected_cells`` each on average, but at most ``max_depth``, and, given
    ``token_range``, no deeper than leaves of at least one token each.

    Like Cassandra, which sizes a repair tree from the estimated number of
    partitions and caps its depth. Tokens are hashes, so the cells of a leaf
    vary around the average (Poisson); the bound is on the mean.
    """
    if expected_cells < 0:
        raise ValueError(f"expected_cells must be >= 0, got {expected_cells}")
    if max_cells_per_leaf < 1:
        raise ValueError(f"max_cells_per_leaf must be >= 1, got {max_cells_per_leaf}")
    _check_depth(max_depth)
    if token_range is not None:
        _check_range(token_range)
        max_depth = min(max_depth, range_width(token_range).bit_length() - 1)
    depth = 0
    while depth < max_depth and (expected_cells + (1 << depth) - 1) >> depth > max_cells_per_leaf:
        depth += 1  # (n + 2**d - 1) >> d is n / 2**d rounded up
    return depth


def _check_depth(depth: int) -> None:
    if isinstance(depth, bool) or not isinstance(depth, int) or not 0 <= depth <= MAX_DEPTH:
        raise ValueError(f"depth must be an integer in 0..{MAX_DEPTH}, got {depth!r}")


def _check_split(token_range: TokenRange, depth: int) -> int:
    """The range's width, once it is known to be at least one token per leaf."""
    width = range_width(token_range)
    if width < 1 << depth:
        raise ValueError(f"a range of {width} tokens cannot be split into {1 << depth} leaves "
                         "(depth_for with token_range caps the depth)")
    return width


def _check_range(token_range: TokenRange) -> None:
    if not (isinstance(token_range, tuple) and len(token_range) == 2):
        raise ValueError(f"a token range is (start_exclusive, end_inclusive), got {token_range!r}")
    for token in token_range:
        if isinstance(token, bool) or not isinstance(token, int) or not MIN_TOKEN <= token <= MAX_TOKEN:
            raise ValueError(f"{token!r} is not a ring token")


def _signed(point: int) -> int:
    """A point counted from MIN_TOKEN, modulo the ring, as a signed token."""
    return (point - MIN_TOKEN) % RING_SIZE + MIN_TOKEN


def _offset(token_range: TokenRange, token: int) -> int:
    """Where ``token`` sits in the range, 1..width; above width means outside it."""
    return (token - token_range[0]) % RING_SIZE or RING_SIZE


def _leaf_of_offset(offset: int, width: int, leaf_count: int) -> int:
    # Leaf i holds offsets (floor(i*W/L), floor((i+1)*W/L)], so i = ceil(o*L/W) - 1.
    return (offset * leaf_count + width - 1) // width - 1


def _node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.blake2b(left + right, digest_size=DIGEST_BYTES, person=_NODE_PERSON).digest()


class MerkleTree:
    """A finished tree: the range, the depth and the 2**depth leaf hashes, in range order.

    The inner nodes are computed here from the leaves (never taken from a
    peer), level by level: ``_levels[0]`` is the root, ``_levels[depth]`` the leaves.
    ``cells`` is how many cells the tree was built from (for progress and
    reports; it takes no part in comparisons).
    """

    def __init__(self, token_range: TokenRange, depth: int, leaves: Sequence[bytes],
                 cells: int = 0) -> None:
        _check_range(token_range)
        _check_depth(depth)
        if len(leaves) != 1 << depth:
            raise ValueError(f"a tree of depth {depth} has {1 << depth} leaves, got {len(leaves)}")
        if any(not isinstance(leaf, bytes) or len(leaf) != DIGEST_BYTES for leaf in leaves):
            raise ValueError(f"every leaf hash is {DIGEST_BYTES} bytes")
        if isinstance(cells, bool) or not isinstance(cells, int) or cells < 0:
            raise ValueError(f"cells must be a count, got {cells!r}")
        self.range = token_range
        self.depth = depth
        self.cells = cells
        self.width = _check_split(token_range, depth)
        levels = [tuple(leaves)]
        while len(levels[0]) > 1:
            below = levels[0]
            levels.insert(0, tuple(_node_hash(below[i], below[i + 1])
                                   for i in range(0, len(below), 2)))
        self._levels = levels

    @property
    def leaves(self) -> tuple[bytes, ...]:
        return self._levels[-1]

    @property
    def root(self) -> bytes:
        """The hash of the whole range: replicas whose roots agree are in step."""
        return self._levels[0][0]

    @property
    def leaf_count(self) -> int:
        return 1 << self.depth

    def _bound(self, i: int) -> int:
        """Offset where leaf ``i`` starts (exclusive), from the range's start."""
        return i * self.width // self.leaf_count

    def leaf_range(self, i: int) -> TokenRange:
        """Leaf ``i``'s (start_exclusive, end_inclusive]; the leaves split the range
        evenly (widths differ by at most one) and in order."""
        if not 0 <= i < self.leaf_count:
            raise IndexError(f"leaf {i} of {self.leaf_count}")
        start = self.range[0]
        return _signed(start + self._bound(i)), _signed(start + self._bound(i + 1))

    def leaf_index(self, token: int) -> int:
        """The leaf that holds ``token``."""
        offset = _offset(self.range, token)
        if not MIN_TOKEN <= token <= MAX_TOKEN or offset > self.width:
            raise ValueError(f"token {token} is outside the range {self.range}")
        return _leaf_of_offset(offset, self.width, self.leaf_count)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MerkleTree):
            return NotImplemented
        return (self.range, self.depth, self.leaves) == (other.range, other.depth, other.leaves)

    def __hash__(self) -> int:
        return hash((self.range, self.depth, self.root))

    def __repr__(self) -> str:
        return (f"MerkleTree(range={self.range}, depth={self.depth}, cells={self.cells}, "
                f"root={self.root.hex()})")

    # ---- the internode form ------------------------------------------------

    def to_wire(self) -> dict[str, Any]:
        """A msgpack-safe map: the leaf hashes as one bytes string, and what frames them."""
        return {"v": HASH_VERSION, "s": self.range[0], "e": self.range[1], "d": self.depth,
                "n": self.cells, "h": b"".join(self.leaves)}

    @classmethod
    def from_wire(cls, obj: Any) -> MerkleTree:
        """The tree a peer sent. Anything malformed is a ``ProtocolError`` naming what is wrong."""
        if not isinstance(obj, dict):
            raise ProtocolError("merkle tree must be a map")

        def integer(name: str) -> int:
            value = obj.get(name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ProtocolError(f"merkle tree field {name!r} is missing or not an integer")
            return value

        version = integer("v")
        if version != HASH_VERSION:
            raise ProtocolError(f"merkle tree hash version {version} is not {HASH_VERSION}")
        start, end, depth, cells = integer("s"), integer("e"), integer("d"), integer("n")
        for name, token in (("s", start), ("e", end)):
            if not MIN_TOKEN <= token <= MAX_TOKEN:
                raise ProtocolError(f"merkle tree field {name!r} is not a token")
        if not 0 <= depth <= MAX_DEPTH:
            raise ProtocolError(f"merkle tree depth {depth} is outside 0..{MAX_DEPTH}")
        if cells < 0:
            raise ProtocolError("merkle tree field 'n' is negative")
        hashes = obj.get("h")
        if not isinstance(hashes, bytes):
            raise ProtocolError("merkle tree field 'h' is missing or not bytes")
        if len(hashes) != (1 << depth) * DIGEST_BYTES:
            raise ProtocolError(
                f"merkle tree of depth {depth} needs {(1 << depth) * DIGEST_BYTES} bytes of "
                f"leaf hashes, got {len(hashes)}")
        leaves = [hashes[i:i + DIGEST_BYTES] for i in range(0, len(hashes), DIGEST_BYTES)]
        try:
            return cls((start, end), depth, leaves, cells)
        except ValueError as exc:
            raise ProtocolError(f"malformed merkle tree: {exc}") from None


class MerkleBuilder:
    """Builds the tree of one range from its cells, fed in (token, key) range order.

    Range order is token order starting just after ``start``: for a wrapping
    range, the tokens up to MAX_TOKEN come first, then those from MIN_TOKEN
    (``scan_pieces``). Memory is the leaf hashes finished so far plus the
    leaf being hashed, never the cells.
    """

    def __init__(self, token_range: TokenRange, depth: int) -> None:
        _check_range(token_range)
        _check_depth(depth)
        self.range = token_range
        self.depth = depth
        self.cells = 0
        self._width = _check_split(token_range, depth)
        self._leaf_count = 1 << depth
        self._leaves: list[bytes] = []  # finished leaves, 0..len-1
        self._hasher = hashlib.blake2b(digest_size=DIGEST_BYTES, person=_LEAF_PERSON)
        self._last: tuple[int, bytes] | None = None  # (offset, key) of the last cell added
        self._done = False

    def add(self, token: int, key: bytes, cell: Cell) -> None:
        """Hash one stored cell into its leaf. Cells must come in strictly
        increasing (token, key) range order, each key once."""
        if self._done:
            raise ValueError("the tree is finished")
        offset = _offset(self.range, token)
        if not MIN_TOKEN <= token <= MAX_TOKEN or offset > self._width:
            raise ValueError(f"token {token} is outside the range {self.range}")
        place = (offset, key)
        if self._last is not None and place <= self._last:
            raise ValueError(f"cell ({token}, {key!r}) is not after the previous one in range order")
        self._last = place
        leaf = _leaf_of_offset(offset, self._width, self._leaf_count)
        while len(self._leaves) < leaf:  # close the current leaf and any empty ones between
            self._close_leaf()
        flags = (_FLAG_TOMBSTONE if cell.tombstone else 0) | (
            0 if cell.expires_at_us is None else _FLAG_EXPIRES)
        hasher = self._hasher
        hasher.update(_CELL_HEAD.pack(len(key), flags, cell.ts.wall_us, cell.ts.logical,
                                      cell.expires_at_us or 0, len(cell.value)))
        hasher.update(key)
        hasher.update(cell.value)
        self.cells += 1

    def _close_leaf(self) -> None:
        self._leaves.append(self._hasher.digest())
        self._hasher = hashlib.blake2b(digest_size=DIGEST_BYTES, person=_LEAF_PERSON)

    def finish(self) -> MerkleTree:
        if self._done:
            raise ValueError("the tree is finished")
        self._done = True
        while len(self._leaves) < self._leaf_count:
            self._close_leaf()
        return MerkleTree(self.range, self.depth, self._leaves, self.cells)


def build(token_range: TokenRange, depth: int,
          cells: Sequence[tuple[int, bytes, Cell]]) -> MerkleTree:
    """A tree from cells already in range order (tests and small ranges)."""
    builder = MerkleBuilder(token_range, depth)
    for token, key, cell in cells:
        builder.add(token, key, cell)
    return builder.finish()


def diff(a: MerkleTree, b: MerkleTree) -> list[TokenRange]:
    """The sub-ranges where ``a`` and ``b`` differ, in range order, adjacent leaves merged.

    Descends from the root only into differing subtrees (Dynamo §4.7), so
    trees that agree cost one comparison. On the whole ring, a run that
    crosses the range's start is one wrapping range, and all leaves
    differing is the whole ring ``(start, start]``.
    """
    return leaf_runs(a, differing_leaves(a, b))


def differing_leaves(a: MerkleTree, b: MerkleTree) -> list[int]:
    """The indices of the leaves where ``a`` and ``b`` differ, in order, found by
    descending only into differing subtrees."""
    if a.range != b.range or a.depth != b.depth:
        raise TreeMismatch(
            f"trees of range {a.range} depth {a.depth} and range {b.range} depth {b.depth} "
            "cannot be compared")
    differing = [0] if a.root != b.root else []
    for level in range(1, a.depth + 1):
        ours, theirs = a._levels[level], b._levels[level]
        differing = [child for node in differing for child in (2 * node, 2 * node + 1)
                     if ours[child] != theirs[child]]
    return differing


def leaf_runs(tree: MerkleTree, leaves: Sequence[int]) -> list[TokenRange]:
    """The token ranges of ``leaves`` (indices in increasing order), adjacent
    leaves merged into one run; on the whole ring a run may wrap past its start."""
    out: list[TokenRange] = []
    for leaf in leaves:
        start, end = tree.leaf_range(leaf)
        if out and out[-1][1] == start:  # the next leaf: extend the run
            out[-1] = (out[-1][0], end)
        else:
            out.append((start, end))
    if len(out) > 1 and out[-1][1] == out[0][0]:  # only on the whole ring: join across its start
        out[0] = (out.pop()[0], out[0][1])
    return out
