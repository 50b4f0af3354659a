"""The ranges of a transactional keyspace, and the Paxos group that serves each (pure).

Spanner shards data into tablets, each replicated by one Paxos group
(Spanner §2.1). ringkv splits a transactional keyspace's token space along
the ring: a range is a maximal run of consecutive ring ranges (vnode ranges)
whose replicas are the same set of nodes, and those nodes are the range's
Paxos group. Merging runs keeps the number of groups near the number of
distinct replica sets rather than the number of vnodes: three nodes with
RF 3 have one range (the whole ring, one group), five nodes with 16 tokens
each have a few dozen. Fewer groups mean fewer leaders, leases and
heartbeats, and fewer transactions that cross ranges.

A range is ``(start, end]`` on the ring, as ``TokenRing.ranges`` gives them;
``start == end`` is the whole ring. Its ``replicas`` keep the ring's
preference order of its first vnode range, so ``replicas[0]`` (the preferred
leader) differs from range to range and leadership spreads over the nodes.

Ranges follow the ring: a topology change gives a new ``RangeMap``. A range
whose bounds stay and whose replicas change keeps its group id (the id names
the end token), and its group moves there through its own log
(``GroupRunner.move_to``, driven by ``txn/service.py``); a range whose
bounds change (a new node's token cuts it, a leaving node's token joins two)
needs a split or merge, which is not built: the service refuses it. With
vnodes most ranges of a join or decommission are cut; a replace keeps every
token, so every range it touches moves.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass

from ringkv.ring import TokenRing, token_for


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
    """Every range of one keyspace, for one ring and replication factor."""

    def __init__(self, keyspace: str, ring: TokenRing, rf: int) -> None:
        if not len(ring):
            raise ValueError("a range map needs a ring with at least one node")
        self.keyspace = keyspace
        self.rf = rf
        vnodes = [(start, end, ring.replicas(end, rf)) for start, end, _ in ring.ranges()]
        runs: list[list[tuple[int, int, tuple[str, ...]]]] = []
        for vnode in vnodes:
            if runs and set(runs[-1][-1][2]) == set(vnode[2]):
                runs[-1].append(vnode)
            else:
                runs.append([vnode])
        if len(runs) > 1 and set(runs[0][0][2]) == set(runs[-1][-1][2]):
            runs[0] = runs.pop() + runs[0]  # the run across the ring's end is one range
        ranges = [Range(keyspace, run[0][0], run[-1][1], run[0][2]) for run in runs]
        if len(ranges) == 1:
            only = ranges[0]
            ranges = [Range(keyspace, only.end, only.end, only.replicas)]  # the whole ring
        self.ranges: tuple[Range, ...] = tuple(sorted(ranges, key=lambda r: r.end))
        self._ends = [r.end for r in self.ranges]

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
