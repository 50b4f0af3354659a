"""What an anti-entropy repair does, decided without I/O (pure).

A repair on a node covers the token ranges that node replicates, per
eventual keyspace (Dynamo §4.7; Cassandra's ``nodetool repair`` run on one
node). For each range it compares Merkle trees with every other replica and
then, for the sub-ranges that differ, pulls the peers' cells and makes the
peers pull its own, so that afterwards every replica holds what any of them
held when the trees were built (``versioning.reconcile`` is last-write-wins
and order-free, so merging both ways converges).

Transactional keyspaces are not repaired here: their replicas are Paxos
groups whose logs already make them agree (``txn/``).

This module plans (``plan``), chooses tree depths, turns trees into what to
stream (``pull_plan``, ``push_plan``), schedules (``RepairSchedule``) and answers the
question tombstone GC asks (``repaired_since``). ``repair/service.py``
carries it out.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from ringkv.repair.merkle import (
    MAX_CELLS_PER_LEAF,
    MerkleTree,
    TokenRange,
    depth_for,
    differing_leaves,
    leaf_runs,
    scan_pieces,
)
from ringkv.ring import MAX_TOKEN, MIN_TOKEN, TokenRing

# (keyspace, start_exclusive, end_inclusive) of a ring range: what repair
# history is kept for.
RangeKey = tuple[str, int, int]

# A range is due for its scheduled repair once this share of the interval has
# passed since its last one; with checks at most CHECK_FRACTION * 1.5 of the
# interval apart, a repair starts before the interval is over (so each range
# is repaired at least once per interval while repairs take less than the rest).
DUE_FRACTION = 0.75
CHECK_FRACTION = 1 / 8
MAX_CHECK_S = 300.0


@dataclass(frozen=True)
class RangeJob:
    """One range of one keyspace to compare with its other replicas.

    ``token_range`` is what is compared: the whole ``ring_range`` or, when an
    operator asked for part of the ring, the part of it inside that request.
    Only a job over a whole ring range counts as that range repaired.
    """

    keyspace: str
    token_range: TokenRange
    ring_range: TokenRange
    peers: tuple[str, ...]

    @property
    def full(self) -> bool:
        return self.token_range == self.ring_range

    @property
    def key(self) -> RangeKey:
        return (self.keyspace, *self.ring_range)


def parse_range(text: str) -> TokenRange:
    """``START:END`` (start exclusive, end inclusive, signed tokens) as a range.

    Raises ValueError saying what is wrong.
    """
    parts = text.split(":")
    if len(parts) != 2:
        raise ValueError(f"range must be START:END (two tokens), got {text!r}")
    try:
        start, end = int(parts[0]), int(parts[1])
    except ValueError:
        raise ValueError(f"range must be START:END of integer tokens, got {text!r}") from None
    for token in (start, end):
        if not MIN_TOKEN <= token <= MAX_TOKEN:
            raise ValueError(f"{token} is not a token ({MIN_TOKEN}..{MAX_TOKEN})")
    return start, end


def intersect(a: TokenRange, b: TokenRange) -> list[TokenRange]:
    """The parts of ``a`` inside ``b``, as non-wrapping ranges in ``a``'s order;
    ``[a]`` itself when ``b`` covers all of ``a``."""
    pieces_a = scan_pieces(a)
    out = []
    for s1, e1 in pieces_a:
        for s2, e2 in scan_pieces(b):
            start, end = max(s1, s2), min(e1, e2)
            if start < end:
                out.append((start, end))
    return [a] if out == pieces_a else out


def plan(
    ring: TokenRing,
    node_id: str,
    keyspaces: Mapping[str, int],
    *,
    keyspace: str | None = None,
    token_range: TokenRange | None = None,
) -> list[RangeJob]:
    """The jobs of a repair run on ``node_id``: every range it replicates of
    each eventual keyspace (``keyspaces``: name -> replication factor), or of
    ``keyspace`` only, cut to ``token_range`` when one is given.

    Raises ValueError naming what is wrong (an unknown keyspace, a node off the ring).
    """
    if keyspace is not None and keyspace not in keyspaces:
        raise ValueError(f"keyspace {keyspace!r} is not an eventual keyspace of this cluster "
                         f"(eventual keyspaces: {', '.join(sorted(keyspaces)) or 'none'}; "
                         "transactional keyspaces need no repair: their Paxos logs keep "
                         "replicas in step)")
    if node_id not in ring.node_ids:
        raise ValueError(f"node {node_id} holds no tokens on the ring yet")
    jobs: list[RangeJob] = []
    for name in sorted(keyspaces) if keyspace is None else [keyspace]:
        rf = keyspaces[name]
        for start, end, _primary in ring.ranges():
            replicas = ring.replicas(end, rf)
            if node_id not in replicas:
                continue
            peers = tuple(r for r in replicas if r != node_id)
            parts = [(start, end)] if token_range is None else intersect((start, end), token_range)
            jobs.extend(RangeJob(name, part, (start, end), peers) for part in parts)
    return jobs


def down_peers(jobs: Iterable[RangeJob], is_alive: Callable[[str], bool]) -> list[str]:
    """The replicas the jobs need that are not alive, sorted."""
    return sorted({peer for job in jobs for peer in job.peers if not is_alive(peer)})


def tree_depth(expected_cells: int, token_range: TokenRange) -> int:
    """The depth both sides build their trees at, from the initiator's cell count."""
    return depth_for(expected_cells, MAX_CELLS_PER_LEAF, token_range=token_range)


def pull_plan(local: MerkleTree, peers: Mapping[str, MerkleTree]) -> dict[str, list[TokenRange]]:
    """What to pull from whom: for each leaf where some peer differs from us,
    one peer of each distinct leaf hash (peers whose leaves hash alike hold the
    same cells, so one of them is enough), the first by name. Raises
    ``merkle.TreeMismatch`` if a peer's tree covers another range or depth.
    """
    diffs = {peer: set(differing_leaves(local, peers[peer])) for peer in sorted(peers)}
    chosen: dict[str, list[int]] = {}
    for leaf in sorted(set().union(*diffs.values())):
        hashes: set[bytes] = set()
        for peer, leaves in diffs.items():
            if leaf in leaves and peers[peer].leaves[leaf] not in hashes:
                hashes.add(peers[peer].leaves[leaf])
                chosen.setdefault(peer, []).append(leaf)
    return {peer: leaf_runs(local, leaves) for peer, leaves in chosen.items()}


def push_plan(merged: MerkleTree, peers: Mapping[str, MerkleTree]) -> dict[str, list[TokenRange]]:
    """What each peer must pull back from us: the leaves where our tree, rebuilt
    after the pulls (so holding every distinct version there was), still
    differs from the peer's. Peers that already hold it all get nothing."""
    out = {}
    for peer in sorted(peers):
        leaves = differing_leaves(merged, peers[peer])
        if leaves:
            out[peer] = leaf_runs(merged, leaves)
    return out


def ring_range_of(ring: TokenRing, token: int) -> TokenRange:
    """The ring range (start_exclusive, end_inclusive] that holds ``token``."""
    tokens = [t for t, _ in ring.sorted_tokens]
    if not tokens:
        raise ValueError("the ring is empty")
    i = bisect.bisect_left(tokens, token)
    i = 0 if i == len(tokens) else i
    return tokens[i - 1], tokens[i]


def repaired_since(
    history: Mapping[RangeKey, int], ring: TokenRing, keyspace: str, token: int
) -> int | None:
    """When (wall µs) the range holding ``token`` last began a repair that
    completed with every replica, on the current ring; None if never.

    A repair recorded for a range the ring no longer has does not count: after
    a topology change a range must be repaired again before GC trusts it.
    """
    if not len(ring):
        return None
    return history.get((keyspace, *ring_range_of(ring, token)))


class RepairSchedule:
    """The built-in scheduler's decisions: which ranges are due, and when to look again.

    Every range is repaired at least once per ``interval_s`` (Cassandra needs
    an external scheduler such as Reaper for that; ScyllaDB runs one inside).
    """

    def __init__(self, interval_s: float) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be positive, got {interval_s}")
        self.interval_s = interval_s

    def due(self, keys: Sequence[RangeKey], last: Mapping[RangeKey, int],
            now_us: int) -> list[RangeKey]:
        """The ranges never repaired or last repaired at least DUE_FRACTION of the
        interval ago, oldest first (never-repaired ones before all)."""
        threshold_us = int(self.interval_s * DUE_FRACTION * 1_000_000)
        due = [k for k in keys if k not in last or now_us - last[k] >= threshold_us]
        return sorted(due, key=lambda k: (last.get(k, -1), k))

    def next_check_s(self, rng: random.Random) -> float:
        """Seconds to the next look, jittered so that nodes do not repair in lockstep."""
        base_s = min(self.interval_s * CHECK_FRACTION, MAX_CHECK_S)
        return base_s * rng.uniform(0.5, 1.5)
