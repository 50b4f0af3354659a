"""The token ring: Murmur3 tokens, vnodes, replica placement, token allocation (pure).

Dynamo §4.2 (consistent hashing): the output range of a hash function is a
ring; each node owns the keys between its predecessor's token and its own.
With virtual nodes (many tokens per node) a node's load is the sum of many
small ranges, and a joining node takes a little from many nodes instead of a
lot from one. Dynamo §4.3: a key is stored on the first N distinct nodes
clockwise from its token (its "preference list").

Token space: signed 64-bit integers, as in Cassandra's Murmur3Partitioner.
A range is ``(start, end]`` (start exclusive, end inclusive) and is owned by
the node holding token ``end``; the range that crosses MAX_TOKEN -> MIN_TOKEN
has ``start > end``. With a single token in the ring, the one range
``(t, t]`` is the whole ring.

This module is pure: no I/O, no clock, and no unseeded randomness (callers
pass a ``random.Random``), so the simulator can run it deterministically.
"""

from __future__ import annotations

import bisect
import random
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import mmh3

MIN_TOKEN = -(2**63)
MAX_TOKEN = 2**63 - 1
RING_SIZE = 2**64  # number of points on the ring; widths are measured in these


def token_for(key: bytes) -> int:
    """The ring token of ``key``, exactly as Cassandra's Murmur3Partitioner.getToken.

    That is the first 64 bits (h1) of Cassandra's MurmurHash.hash3_x64_128
    with seed 0, read as a signed long, with two special cases taken from
    Cassandra:

    - MIN_TOKEN is the "before everything" sentinel (a range ``(MIN_TOKEN, x]``
      selects all tokens up to x), so a non-empty key hashing to it is moved
      to MAX_TOKEN (Cassandra's ``normalize``).
    - The empty key is MIN_TOKEN itself, without hashing. Scans start after
      MIN_TOKEN and would never return such a key, so ringkv, like Cassandra,
      refuses empty keys where they enter (``ringkv.server.validation.check_key``);
      the value is kept only so that tokens agree with Cassandra tooling.

    Cassandra's hash differs from reference MurmurHash3 (and from ``mmh3``) in
    one place: the tail (the last ``len % 16`` bytes) is read as signed Java
    bytes, each sign-extended to 64 bits before it is shifted, so a tail byte
    >= 0x80 changes the result. Keys whose tail is ASCII hash the same either
    way and go through ``mmh3`` (C); only the others take the pure-Python path.
    """
    if not key:
        return MIN_TOKEN
    tail_len = len(key) & 15
    if key[len(key) - tail_len :].isascii():
        token = mmh3.hash64(key, signed=True)[0]
    else:
        token = _cassandra_hash3_x64_128_h1(key)
    return MAX_TOKEN if token == MIN_TOKEN else token


_MASK_64 = 2**64 - 1
_C1 = 0x87C37B91114253D5
_C2 = 0x4CF5AD432745937F
_BLOCKS = struct.Struct("<QQ")  # a 16-byte body block: two little-endian unsigned longs


def _rotl64(value: int, shift: int) -> int:
    return ((value << shift) | (value >> (64 - shift))) & _MASK_64


def _fmix64(k: int) -> int:
    k ^= k >> 33
    k = (k * 0xFF51AFD7ED558CCD) & _MASK_64
    k ^= k >> 33
    k = (k * 0xC4CEB9FE1A85EC53) & _MASK_64
    return k ^ (k >> 33)


def _cassandra_hash3_x64_128_h1(key: bytes) -> int:
    """h1 of Cassandra's MurmurHash.hash3_x64_128(key, seed=0), as a signed 64-bit int.

    Python ints do not wrap, so every step masks to 64 bits; the result is
    turned back into Java's signed long at the end.
    """
    length = len(key)
    body_len = length - (length & 15)
    h1 = h2 = 0
    for k1, k2 in _BLOCKS.iter_unpack(key[:body_len]):  # body bytes are read unsigned
        k1 = (_rotl64((k1 * _C1) & _MASK_64, 31) * _C2) & _MASK_64
        h1 ^= k1
        h1 = (_rotl64(h1, 27) + h2) & _MASK_64
        h1 = (h1 * 5 + 0x52DCE729) & _MASK_64
        k2 = (_rotl64((k2 * _C2) & _MASK_64, 33) * _C1) & _MASK_64
        h2 ^= k2
        h2 = (_rotl64(h2, 31) + h1) & _MASK_64
        h2 = (h2 * 5 + 0x38495AB5) & _MASK_64

    # Tail: Java's ByteBuffer.get returns a signed byte, and ``(long) b << n``
    # sign-extends it, so a byte >= 0x80 also sets every bit above its own.
    k1 = k2 = 0
    for i, byte in enumerate(key[body_len:]):
        signed = byte - 256 if byte >= 0x80 else byte
        if i < 8:
            k1 ^= (signed << (8 * i)) & _MASK_64
        else:
            k2 ^= (signed << (8 * (i - 8))) & _MASK_64
    tail_len = length - body_len
    if tail_len > 8:
        h2 ^= (_rotl64((k2 * _C2) & _MASK_64, 33) * _C1) & _MASK_64
    if tail_len > 0:
        h1 ^= (_rotl64((k1 * _C1) & _MASK_64, 31) * _C2) & _MASK_64

    # Java's ``h ^= length`` widens the int length to a long: a plain XOR for any real length.
    h1 ^= length
    h2 ^= length
    h1 = (h1 + h2) & _MASK_64
    h2 = (h2 + h1) & _MASK_64
    h1 = (_fmix64(h1) + _fmix64(h2)) & _MASK_64
    return h1 - 2**64 if h1 >= 2**63 else h1


@dataclass(frozen=True)
class NodeInfo:
    node_id: str
    dc: str = "dc1"
    rack: str = "rack1"


def _width(start: int, end: int) -> int:
    """Number of ring points in ``(start, end]``; equal ends mean the whole ring."""
    return (end - start) % RING_SIZE or RING_SIZE


class TokenRing:
    """An immutable token -> node map. Build a new one on every topology change.

    Replica placement is SimpleStrategy (first ``rf`` distinct nodes
    clockwise) while every node sits in the same (dc, rack). As soon as two
    nodes differ in (dc, rack), placement becomes rack-aware like Cassandra's
    NetworkTopologyStrategy inside one DC: the walk prefers nodes in racks
    that hold no replica yet, and only once every rack holds one does it fill
    up with the skipped nodes, in clockwise order. A rack is identified by the
    (dc, rack) pair, so "rack1" in two DCs counts as two racks.
    """

    def __init__(
        self,
        tokens: Mapping[str, Sequence[int]],
        nodes: Mapping[str, NodeInfo] | None = None,
    ) -> None:
        nodes = nodes or {}
        for node_id, info in nodes.items():
            if node_id not in tokens:
                raise ValueError(f"node {node_id!r} has info but no tokens")
            if info.node_id != node_id:
                raise ValueError(f"info for {node_id!r} names node {info.node_id!r}")

        owner_of: dict[int, str] = {}
        self._tokens: dict[str, tuple[int, ...]] = {}
        for node_id in sorted(tokens):
            node_tokens = tuple(sorted(tokens[node_id]))
            if not node_tokens:
                raise ValueError(f"node {node_id!r} has no tokens")
            for token in node_tokens:
                if not MIN_TOKEN <= token <= MAX_TOKEN:
                    raise ValueError(f"token {token} of {node_id!r} is outside the 64-bit ring")
                if token in owner_of:
                    raise ValueError(
                        f"token {token} is claimed by both {owner_of[token]!r} and {node_id!r}"
                    )
                owner_of[token] = node_id
            self._tokens[node_id] = node_tokens
        self._nodes: dict[str, NodeInfo] = {
            node_id: nodes.get(node_id, NodeInfo(node_id)) for node_id in self._tokens
        }

        # Parallel sorted lists: bisect on _token_list finds a range index in O(log T).
        self._sorted = tuple(sorted(owner_of.items()))
        self._token_list = [token for token, _ in self._sorted]
        self._owners = [owner for _, owner in self._sorted]
        self._rack_aware = len({(i.dc, i.rack) for i in self._nodes.values()}) > 1
        # rf -> replica tuple of every range (index i = range ending at _token_list[i]).
        # Filled lazily; the ring never changes, so entries never go stale.
        self._replica_cache: dict[int, list[tuple[str, ...]]] = {}

    # ---- plain accessors -------------------------------------------------

    @property
    def node_ids(self) -> tuple[str, ...]:
        return tuple(self._tokens)  # built in sorted order

    @property
    def sorted_tokens(self) -> tuple[tuple[int, str], ...]:
        """(token, owner) pairs sorted by token."""
        return self._sorted

    def tokens_of(self, node_id: str) -> tuple[int, ...]:
        return self._tokens[node_id]

    def info(self, node_id: str) -> NodeInfo:
        return self._nodes[node_id]

    def __len__(self) -> int:
        return len(self._tokens)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TokenRing):
            return NotImplemented
        return self._tokens == other._tokens and self._nodes == other._nodes

    def __hash__(self) -> int:
        return hash((frozenset(self._tokens.items()), frozenset(self._nodes.items())))

    def __repr__(self) -> str:
        return f"TokenRing(nodes={len(self)}, tokens={len(self._token_list)})"

    # ---- lookups (hot path) ----------------------------------------------

    def _range_index(self, token: int) -> int:
        """Index of the range containing ``token``: the first ring token >= token, wrapping."""
        if not self._token_list:
            raise ValueError("the ring is empty")
        i = bisect.bisect_left(self._token_list, token)
        return 0 if i == len(self._token_list) else i

    def primary(self, token: int) -> str:
        return self._owners[self._range_index(token)]

    def replicas(self, token: int, rf: int) -> tuple[str, ...]:
        """The preference list for ``token``: min(rf, nodes) distinct nodes, primary first."""
        return self._replica_table(rf)[self._range_index(token)]

    def replicas_for_key(self, key: bytes, rf: int) -> tuple[str, ...]:
        return self.replicas(token_for(key), rf)

    def _replica_table(self, rf: int) -> list[tuple[str, ...]]:
        if rf < 1:
            raise ValueError(f"replication factor must be >= 1, got {rf}")
        rf = min(rf, len(self._tokens))  # rf 5 on 3 nodes means "all 3"
        table = self._replica_cache.get(rf)
        if table is None:
            walk = self._walk_rack_aware if self._rack_aware else self._walk_simple
            table = [walk(i, rf) for i in range(len(self._token_list))]
            self._replica_cache[rf] = table
        return table

    def _walk_simple(self, start: int, rf: int) -> tuple[str, ...]:
        """SimpleStrategy: distinct owners clockwise from ``start`` (Dynamo §4.3)."""
        chosen: list[str] = []
        n = len(self._owners)
        for step in range(n):
            owner = self._owners[(start + step) % n]
            if owner not in chosen:
                chosen.append(owner)
                if len(chosen) == rf:
                    break
        return tuple(chosen)

    def _walk_rack_aware(self, start: int, rf: int) -> tuple[str, ...]:
        """NetworkTopologyStrategy within one DC: one replica per rack before any repeats.

        Why: a rack shares power and a switch, so replicas in distinct racks
        survive a rack failure. Nodes passed over because their rack already
        holds a replica are remembered, and used (clockwise order) once every
        rack holds one, so the result is still min(rf, nodes) nodes.
        """
        rack_count = len({(i.dc, i.rack) for i in self._nodes.values()})
        chosen: list[str] = []
        racks_used: set[tuple[str, str]] = set()
        skipped: list[str] = []
        n = len(self._owners)
        for step in range(n):
            owner = self._owners[(start + step) % n]
            if owner in chosen or owner in skipped:
                continue  # another vnode of a node we already placed or skipped
            info = self._nodes[owner]
            rack = (info.dc, info.rack)
            if len(racks_used) == rack_count:
                chosen.append(owner)  # every rack holds a replica: any node will do
            elif rack in racks_used:
                skipped.append(owner)
            else:
                racks_used.add(rack)
                chosen.append(owner)
                if len(racks_used) == rack_count:
                    # All racks covered: the nodes passed over come next, in clockwise order.
                    while skipped and len(chosen) < rf:
                        chosen.append(skipped.pop(0))
            if len(chosen) == rf:
                break
        return tuple(chosen)

    # ---- ranges and ownership --------------------------------------------

    def ranges(self) -> list[tuple[int, int, str]]:
        """(start_exclusive, end_inclusive, primary) for every range, covering the ring once.

        ``ranges()[i]`` ends at ``sorted_tokens[i]``; entry 0 is the wrapping
        range (start > end), or (t, t) = the whole ring if there is one token.
        """
        tokens = self._token_list
        return [(tokens[i - 1], tokens[i], self._owners[i]) for i in range(len(tokens))]

    def ownership(self, rf: int = 1) -> dict[str, float]:
        """Fraction of the token space each node replicates (sums to min(rf, nodes))."""
        points = {node_id: 0 for node_id in self._tokens}
        if not self._token_list:
            return {}
        table = self._replica_table(rf)
        for i, (start, end, _) in enumerate(self.ranges()):
            width = _width(start, end)
            for node_id in table[i]:
                points[node_id] += width
        # Integer sums first: exact, then one division per node.
        return {node_id: p / RING_SIZE for node_id, p in points.items()}

    def ranges_for(self, node_id: str, rf: int) -> list[tuple[int, int]]:
        """The (start_exclusive, end_inclusive) ranges ``node_id`` holds a replica of."""
        if node_id not in self._tokens:
            raise KeyError(node_id)
        table = self._replica_table(rf)
        return [(start, end) for i, (start, end, _) in enumerate(self.ranges()) if node_id in table[i]]

    # ---- topology changes ------------------------------------------------

    def with_node(
        self, node_id: str, tokens: Sequence[int], info: NodeInfo | None = None
    ) -> TokenRing:
        """A ring where ``node_id`` owns exactly ``tokens`` (added, or moved if present)."""
        all_tokens: dict[str, Sequence[int]] = dict(self._tokens)
        all_tokens[node_id] = tokens
        nodes = dict(self._nodes)
        if info is not None:
            nodes[node_id] = info
        elif node_id not in nodes:
            nodes[node_id] = NodeInfo(node_id)
        return TokenRing(all_tokens, nodes)

    def without_node(self, node_id: str) -> TokenRing:
        if node_id not in self._tokens:
            raise KeyError(node_id)
        tokens = {n: t for n, t in self._tokens.items() if n != node_id}
        nodes = {n: i for n, i in self._nodes.items() if n != node_id}
        return TokenRing(tokens, nodes)


def ring_pieces(ring: TokenRing) -> list[tuple[int, int]]:
    """The ring's ranges as non-wrapping (start_exclusive, end_inclusive) pieces, in order."""
    pieces = []
    for start, end, _owner in ring.ranges():
        if start < end:
            pieces.append((start, end))
        else:  # the wrapping range, or the whole ring when there is one token
            pieces.append((MIN_TOKEN, end))
            pieces.append((start, MAX_TOKEN))
    pieces = [(s, e) for s, e in pieces if s < e]
    return sorted(pieces, key=lambda piece: piece[1])


# ---- token allocation ----------------------------------------------------

# Relative weight of the "keep ranges evenly sized" term against the node-load
# terms. Without it the greedy choice is chaotic: it leaves slivers and giant
# ranges that later joins cannot split well (measured: rf=3 max/mean up to
# ~1.4 at 12 nodes). 0.1 was the best of the values tried (0.03 .. 1.0).
_RANGE_SIZE_WEIGHT = 0.1
# After the greedy pass, each new token is taken out and put back at its best
# spot this many times at most (fixes choices made early with little context).
_REFINE_ROUNDS = 2
_NEW = None  # owner marker for the joining node's tokens inside the allocator


def allocate_tokens(
    ring: TokenRing | None, num_tokens: int, rng: random.Random, *, rf: int = 3
) -> list[int]:
    """Tokens (sorted) for a NEW node joining ``ring``, keeping ownership balanced.

    The first node gets evenly spaced tokens at a random rotation (the only
    use of ``rng``). A later node only splits existing ranges, so every key
    that moves moves to the new node (Dynamo §4.2), and about 1/n of them do.
    Where to split is chosen to balance both primary ownership and the
    ownership replicated at ``rf`` under SimpleStrategy (like Cassandra's
    allocate_tokens_for_local_replication_factor; racks are not considered).
    """
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
    if rf < 1:
        raise ValueError(f"replication factor must be >= 1, got {rf}")
    if ring is None or len(ring) == 0:
        step = RING_SIZE // num_tokens
        offset = rng.randrange(RING_SIZE)
        return sorted(MIN_TOKEN + (offset + k * step) % RING_SIZE for k in range(num_tokens))
    return sorted(_Allocator(ring, num_tokens, rf).run())


class _Allocator:
    """Greedy split placement for one joining node.

    Objective (smaller is better), with loads measured after the join:
      sum over nodes of (primary load - 1/n)^2 / (1/n)^2
      + sum over nodes of (rf load - rf/n)^2 / (rf/n)^2
      + _RANGE_SIZE_WEIGHT * mean over ranges of (width - ideal width)^2 / ideal^2
    While the new node still has tokens to place, its own targets are scaled
    by the fraction of its tokens placed so far, so early tokens do not grab
    too much.

    Each token goes inside one existing range (a, b] of an old node at a + x,
    the new node taking (a, a + x]. For a given range only a few nodes' loads
    change, and they change linearly in x, so the objective is a parabola in
    x: its minimum is computed directly and the best range wins. Cost per
    token is O(total tokens * rf).
    """

    def __init__(self, ring: TokenRing, num_tokens: int, rf: int) -> None:
        self.num_tokens = num_tokens
        self.tokens = [token for token, _ in ring.sorted_tokens]
        self.owners: list[str | None] = [owner for _, owner in ring.sorted_tokens]
        self.old_nodes = ring.node_ids
        n = len(self.old_nodes) + 1
        self.rf = min(rf, n)
        self.target_1 = RING_SIZE / n
        self.target_rf = RING_SIZE * self.rf / n
        self.ideal_width = self.target_1 / num_tokens
        # Weights turning squared point counts into squared relative deviations.
        self.w_1 = 1 / self.target_1**2
        self.w_rf = 1 / self.target_rf**2
        self.w_width = _RANGE_SIZE_WEIGHT / self.ideal_width**2 / num_tokens

    def run(self) -> list[int]:
        placed = []
        for k in range(self.num_tokens):
            token = self._best_token(placed_fraction=(k + 1) / self.num_tokens)
            self._insert(token)
            placed.append(token)
        for _ in range(_REFINE_ROUNDS):
            moved = False
            for k, old in enumerate(placed):
                self._remove(old)
                token = self._best_token(placed_fraction=1.0)
                self._insert(token)
                placed[k] = token
                moved |= token != old
            if not moved:
                break
        return placed

    def _insert(self, token: int) -> None:
        i = bisect.bisect_left(self.tokens, token)
        self.tokens.insert(i, token)
        self.owners.insert(i, _NEW)

    def _remove(self, token: int) -> None:
        i = bisect.bisect_left(self.tokens, token)
        del self.tokens[i]
        del self.owners[i]

    def _replica_sets(self) -> list[tuple[str | None, ...]]:
        """SimpleStrategy replicas of each range, in walk order (last = first to drop out)."""
        n = len(self.owners)
        out = []
        for i in range(n):
            chosen: list[str | None] = []
            for step in range(n):
                owner = self.owners[(i + step) % n]
                if owner not in chosen:
                    chosen.append(owner)
                    if len(chosen) == self.rf:
                        break
            out.append(tuple(chosen))
        return out

    def _best_token(self, placed_fraction: float) -> int:
        tokens, owners, rf = self.tokens, self.owners, self.rf
        count = len(tokens)
        widths = [_width(tokens[i - 1], tokens[i]) for i in range(count)]
        replica_sets = self._replica_sets()

        # Current deviation of every node's load from its target.
        # Keyed by node id, and by _NEW (None) for the joining node.
        dev_1: dict[str | None, float] = {node: -self.target_1 for node in self.old_nodes}
        dev_rf: dict[str | None, float] = {node: -self.target_rf for node in self.old_nodes}
        dev_1[_NEW] = -self.target_1 * placed_fraction
        dev_rf[_NEW] = -self.target_rf * placed_fraction
        for i in range(count):
            dev_1[owners[i]] += widths[i]
            for node in replica_sets[i]:
                dev_rf[node] += widths[i]

        best: tuple[float, int, int] | None = None
        for i in range(count):
            width = widths[i]
            if width < 2 or owners[i] is _NEW:
                continue  # nothing strictly inside, or splitting our own range gains nothing
            # Replicated load changes that do not depend on x: earlier ranges whose
            # replica walk passes the new token now include the new node, which
            # pushes out their last replica.
            fixed: dict[str | None, int] = {}
            seen: set[str | None] = set()
            for back in range(1, count):
                j = (i - back) % count
                seen.add(owners[j])
                if len(seen) >= rf:
                    break  # range j's walk ends before reaching the new token
                if _NEW in replica_sets[j]:
                    continue
                fixed[_NEW] = fixed.get(_NEW, 0) + widths[j]
                if len(replica_sets[j]) == rf:
                    last = replica_sets[j][-1]
                    fixed[last] = fixed.get(last, 0) - widths[j]
            # Changes proportional to x: the new range (a, a+x] moves from the
            # owner to the new node (primary) and from the last replica to the
            # new node (replicated, unless the new node already replicates it).
            slope_1 = {_NEW: 1, owners[i]: -1}
            slope_rf: dict[str | None, int] = {}
            if _NEW not in replica_sets[i]:
                slope_rf[_NEW] = 1
                if len(replica_sets[i]) == rf:
                    last = replica_sets[i][-1]
                    slope_rf[last] = slope_rf.get(last, 0) - 1
            # In a fixed order (the joiner first, then by node id): float sums in
            # a set's order, which follows string hashing (PYTHONHASHSEED), round
            # differently and could pick other tokens in another process.
            touched_rf = sorted(set(fixed) | set(slope_rf), key=lambda n: (n is not None, n or ""))

            # Minimum of the parabola: f'(x) = 2 * (sum_c w*c*offset + x * sum_c w*c^2).
            # Range-size term: (x - I)^2 + (width - x - I)^2, derivative 4x - 2*width.
            linear = -self.w_width * width
            quadratic = 2 * self.w_width
            for node, c in slope_1.items():
                linear += self.w_1 * c * dev_1[node]
                quadratic += self.w_1 * c * c
            for node in touched_rf:
                c = slope_rf.get(node, 0)
                linear += self.w_rf * c * (dev_rf[node] + fixed.get(node, 0))
                quadratic += self.w_rf * c * c
            x = int(min(max(-linear / quadratic, 1), width - 1))  # strictly inside: no duplicates

            ideal = self.ideal_width
            delta = self.w_width * (
                (x - ideal) ** 2 + (width - x - ideal) ** 2 - (width - ideal) ** 2
            )
            for node, c in slope_1.items():
                delta += self.w_1 * ((dev_1[node] + c * x) ** 2 - dev_1[node] ** 2)
            for node in touched_rf:
                after = dev_rf[node] + fixed.get(node, 0) + slope_rf.get(node, 0) * x
                delta += self.w_rf * (after**2 - dev_rf[node] ** 2)
            if best is None or delta < best[0]:
                best = (delta, i, x)

        if best is None:
            raise ValueError("no range is wide enough to split")
        _, i, x = best
        # (a + x) may cross MAX_TOKEN inside the wrapping range: map back into range.
        return (tokens[i - 1] + x - MIN_TOKEN) % RING_SIZE + MIN_TOKEN
