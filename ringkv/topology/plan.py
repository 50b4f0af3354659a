"""What a joining node streams, from whom, and how fast (pure).

``bootstrap_plan`` cuts the future ring into non-wrapping pieces (every
token of today's ring is a token of the future ring, so each piece has one
replica set on both) and keeps, per keyspace, the pieces the joiner will
replicate. Each piece is streamed from one current replica: preferably the
one that *loses* the piece to the joiner (its copy is exactly what the
joiner replaces, as Cassandra's strict bootstrap prefers), else the closest
live one; the others follow as fallbacks if a stream breaks.

``leave_plan`` is the other direction: a leaving node pushes each piece it
replicates to the nodes that gain it.

``remove_plan`` is for a node that died for good (``ringkv removenode``):
each piece it replicated goes to every node that gains the piece on the
ring without it, streamed from the piece's surviving replicas.

``Pacer`` is the throttle: a byte budget per second that says how long to
wait after each page (``streaming.throughput_mib_s``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from ringkv.ring import TokenRing, ring_pieces

MIB = 1024 * 1024


@dataclass(frozen=True)
class StreamRange:
    """One piece to stream: cells of ``keyspace`` with tokens in (start, end]."""

    keyspace: str
    start: int  # exclusive; start < end (never wraps)
    end: int  # inclusive
    sources: tuple[str, ...]  # current replicas in the order to try them
    target: str | None = None  # the node that receives the cells (None: this node)

    def describe(self) -> str:
        to = f" to {self.target}" if self.target else ""
        return f"{self.keyspace} ({self.start}, {self.end}]{to}"


def bootstrap_plan(
    ring: TokenRing,
    future: TokenRing,
    node_id: str,
    replication: Mapping[str, int],
    is_alive: Callable[[str], bool],
    by_proximity: Callable[[Sequence[str]], Sequence[str]],
) -> list[StreamRange]:
    """The pieces ``node_id`` must stream before it owns its ranges on ``future``.

    ``replication`` maps each (eventual-tier) keyspace to its replication
    factor. Sources: the live replicas losing the piece first, then the other
    live current replicas by proximity, then the ones believed down (they
    may come back). Adjacent pieces with the same sources are merged.
    """
    if node_id not in future.node_ids or not len(ring):
        return []
    plan: list[StreamRange] = []
    pieces = ring_pieces(future)
    for keyspace in sorted(replication):
        rf = replication[keyspace]
        for start, end in pieces:
            after = future.replicas(end, rf)
            if node_id not in after:
                continue
            before = [n for n in ring.replicas(end, rf) if n != node_id]
            losing = [n for n in before if n not in after and is_alive(n)]
            others = [n for n in by_proximity([n for n in before if n not in losing])
                      if is_alive(n)]
            down = [n for n in before if n not in losing and n not in others]
            sources = tuple(losing + others + down)
            last = plan[-1] if plan else None
            if (last is not None and last.keyspace == keyspace and last.end == start
                    and last.sources == sources):
                plan[-1] = StreamRange(keyspace, last.start, end, sources)
            else:
                plan.append(StreamRange(keyspace, start, end, sources))
    return plan


def leave_plan(
    ring: TokenRing, future: TokenRing, node_id: str, replication: Mapping[str, int],
) -> list[StreamRange]:
    """What a leaving node streams (Cassandra's decommission): each piece it
    replicates today goes, from its own copy, to every node that replicates
    the piece on ``future`` (the ring without it) and does not today."""
    return _handover(ring, future, node_id, replication, lambda before: (node_id,))


def remove_plan(
    ring: TokenRing, future: TokenRing, dead: str, replication: Mapping[str, int],
    is_alive: Callable[[str], bool], by_proximity: Callable[[Sequence[str]], Sequence[str]],
) -> list[StreamRange]:
    """What ``removenode`` streams for the dead node ``dead`` (Cassandra's
    removenode): each piece ``dead`` replicates on ``ring`` goes to every node
    that replicates it on ``future`` (the ring without ``dead``) and does not
    today. Sources are the piece's surviving replicas, the live ones first
    by proximity; the dead node never is one."""

    def survivors_first(before: Sequence[str]) -> tuple[str, ...]:
        survivors = [n for n in before if n != dead]
        live = [n for n in by_proximity(survivors) if is_alive(n)]
        return tuple(live + [n for n in survivors if n not in live])

    return _handover(ring, future, dead, replication, survivors_first)


def _handover(
    ring: TokenRing, future: TokenRing, departing: str, replication: Mapping[str, int],
    sources_for: Callable[[Sequence[str]], tuple[str, ...]],
) -> list[StreamRange]:
    """Each piece ``departing`` replicates on ``ring``, to every node that
    gains it on ``future``, from ``sources_for(today's replicas)``. Adjacent
    pieces with the same target and sources are merged into one range."""
    if departing not in ring.node_ids:
        return []
    plan: list[StreamRange] = []
    pieces = ring_pieces(ring)
    for keyspace in sorted(replication):
        rf = replication[keyspace]
        for start, end in pieces:
            before = ring.replicas(end, rf)
            if departing not in before:
                continue
            sources = sources_for(before)
            for gainer in future.replicas(end, rf) if len(future) else ():
                if gainer in before:
                    continue
                same = [i for i, r in enumerate(plan) if r.keyspace == keyspace
                        and r.target == gainer and r.end == start and r.sources == sources]
                if same:
                    plan[same[-1]] = StreamRange(keyspace, plan[same[-1]].start, end,
                                                 sources, gainer)
                else:
                    plan.append(StreamRange(keyspace, start, end, sources, gainer))
    return plan


class Pacer:
    """A byte-rate throttle: ``after(now_s, nbytes)`` is how long to wait.

    The budget accrues at ``rate_bytes_per_s``; a page of n bytes spends
    n / rate seconds of it. Idle time earns at most one second of burst, so
    a paused stream does not later run unthrottled.
    """

    def __init__(self, rate_bytes_per_s: float) -> None:
        if rate_bytes_per_s <= 0:
            raise ValueError("the streaming rate must be positive")
        self.rate_bytes_per_s = rate_bytes_per_s
        self._next_s: float | None = None  # when the budget is next clear

    def after(self, now_s: float, nbytes: int) -> float:
        start = now_s - 1.0 if self._next_s is None else max(self._next_s, now_s - 1.0)
        self._next_s = start + nbytes / self.rate_bytes_per_s
        return max(0.0, self._next_s - now_s)


@dataclass
class StreamProgress:
    """How far a node's streaming has got, for /v1/status and metrics."""

    ranges_total: int = 0
    ranges_done: int = 0
    bytes: int = 0
    cells: int = 0
    fallbacks: int = 0  # streams that broke and went on from another replica
    source: str | None = None  # the replica being streamed from now
    started_s: float | None = None
    finished_s: float | None = None
    state: str = "idle"  # idle | waiting_for_ring | streaming | done | failed
    direction: str = "in"  # in: bootstrap (to this node); out: decommission (from it)

    def view(self, now_s: float) -> dict[str, object]:
        elapsed_s = 0.0
        if self.started_s is not None:
            elapsed_s = (self.finished_s if self.finished_s is not None else now_s) - self.started_s
        rate = self.bytes / MIB / elapsed_s if elapsed_s > 0 else 0.0
        return {
            "state": self.state,
            "direction": self.direction,
            "ranges_done": self.ranges_done,
            "ranges_total": self.ranges_total,
            "bytes": self.bytes,
            "cells": self.cells,
            "fallbacks": self.fallbacks,
            "source": self.source,
            "elapsed_s": round(elapsed_s, 3),
            "rate_mib_s": round(rate, 3),
        }
