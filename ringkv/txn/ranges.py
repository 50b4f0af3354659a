"""The ranges of a transactional keyspace, and the Paxos group that serves each (pure).

Spanner shards data into tablets, each replicated by one Paxos group
(Spanner §2.1), and moves a tablet between groups without changing what it
holds; CockroachDB likewise keeps a range's bounds apart from where its
replicas live. ringkv cuts a transactional keyspace's token space into
``count`` fixed, equal slices (the keyspace's ``ranges`` setting, 1 by
default: one group for the whole keyspace), and places each slice's group
on the ring's replicas of the slice's end token.

Fixed bounds are what let the tier move with the ring. A topology change
(join, decommission, removenode, replace) changes which nodes replicate a
slice's end token, never where a slice starts or ends: the slice keeps its
group id (the id names the end token), and its group moves to the new
replicas through its own log, one member at a time (``GroupRunner.move_to``,
driven by ``txn/service.py``). Only an operator changing ``ranges`` on a
keyspace that holds data changes bounds (a split or merge, which is not
built: the service refuses those ranges by name).

More slices spread leaders and load over more nodes; fewer keep more
transactions inside one range, where a commit is one Paxos round instead of
two-phase commit across groups. A range is ``(start, end]`` on
the ring; ``start == end`` is the whole ring. Its ``replicas`` keep the
ring's preference order for its end token, so ``replicas[0]`` (the
preferred leader) differs from slice to slice.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass

from ringkv.config import MAX_RANGES
from ringkv.ring import MAX_TOKEN, MIN_TOKEN, TokenRing, token_for


def slice_ends(count: int) -> list[int]:
    """The end tokens of ``count`` equal slices of the ring, ascending; the last is
    MAX_TOKEN, so the first slice starts there and wraps to MIN_TOKEN."""
    span = MAX_TOKEN - MIN_TOKEN + 1
    return [MIN_TOKEN + span * (i + 1) // count - 1 for i in range(count)]


def slice_of(token: int, count: int) -> int:
    """Which of ``count`` equal slices holds ``token`` (0-based, in ``slice_ends`` order)."""
    return bisect.bisect_left(slice_ends(count), token)


@dataclass(frozen=True)
class Range:
    keyspace: str
    start: int  # exclusive
    end: int  # inclusive; start == end is the whole ring
    replicas: tuple[str, ...]  # the Paxos group, in preference order

    @property
    def group_id(self) -> str:
        """Names the group across nodes: every node derives the same map from the ring."""
        return f"{self.keyspace}/{self.end}"

    def contains(self, token: int) -> bool:
        if self.start == self.end:
            return True
        if self.start < self.end:
            return self.start < token <= self.end
        return token > self.start or token <= self.end  # wraps past the ring's end


class RangeMap:
    """Every range of one keyspace: ``count`` fixed slices of the token space,
    each placed on ``ring``'s ``rf`` replicas of its end token."""

    def __init__(self, keyspace: str, ring: TokenRing, rf: int, count: int = 1) -> None:
        if not len(ring):
            raise ValueError("a range map needs a ring with at least one node")
        if not 1 <= count <= MAX_RANGES:
            raise ValueError(f"a keyspace has 1 to {MAX_RANGES} ranges, not {count}")
        self.keyspace = keyspace
        self.rf = rf
        ends = slice_ends(count)
        ranges = [Range(keyspace, ends[i - 1], end, ring.replicas(end, rf))
                  for i, end in enumerate(ends)]
        self.ranges: tuple[Range, ...] = tuple(ranges)  # by end; the first wraps
        self._ends = list(ends)

    def __len__(self) -> int:
        return len(self.ranges)

    def range_for_token(self, token: int) -> Range:
        # The first range whose end is at or after the token; past the last end,
        # the token belongs to the range that wraps (the first by end).
        i = bisect.bisect_left(self._ends, token)
        return self.ranges[i % len(self.ranges)]

    def range_for_key(self, key: bytes) -> Range:
        return self.range_for_token(token_for(key))

    def by_range(self, keys: Iterable[bytes]) -> dict[Range, list[bytes]]:
        """``keys`` grouped by the range that holds each, in first-seen order."""
        grouped: dict[Range, list[bytes]] = {}
        for key in keys:
            grouped.setdefault(self.range_for_key(key), []).append(key)
        return grouped

    def groups_of(self, node_id: str) -> list[Range]:
        """The ranges whose group ``node_id`` belongs to."""
        return [r for r in self.ranges if node_id in r.replicas]
