"""Judging snapshot reads against the commits a history knows of (pure).

A snapshot read at ``t`` (Spanner §4.1.3: ``?snapshot_ts=``, or a bounded-
staleness read, which the replica answers at a ``t`` it names) must return
exactly the value of the newest committed write to its key with
``commit_ts <= t``, or nothing if there is none. What the history knows:

* a write acknowledged to its client committed, at the ``commit_ts`` it was told;
* a write whose outcome was asked afterwards by its transaction id committed
  (at the timestamp the answer names) or certainly did not;
* a strong read names the commit timestamp of the value it returns, so it
  reveals the commit of a write whose own answer was lost;
* a compare-and-set whose condition failed, or a request refused before it was
  sent, changed nothing.

A write whose outcome stays unknown may or may not have committed: a read may
return it, at the timestamp the read names, provided that is at or below
``t`` and no known commit lies between the two. Every value written is
unique, so a value read names its write.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from ringkv.sim.checkers import EXCERPT_LINES, Verdict

COMMITTED, FAILED, UNKNOWN = "committed", "failed", "unknown"


@dataclass(frozen=True)
class KnownWrite:
    """A write or compare-and-set, as the history knows its outcome."""

    key: str
    value: str
    outcome: str  # COMMITTED, FAILED or UNKNOWN
    commit_ts_us: int | None = None  # known for COMMITTED


@dataclass(frozen=True)
class SnapshotRead:
    """An answered snapshot read: where it was served, at which timestamp, what it saw."""

    index: int
    process: str
    node: str  # the node the client asked
    key: str
    asked: str  # "snapshot_ts=..." or "max_staleness_ms=..."
    read_ts_us: int  # the timestamp the replica served it at (its receipt's read_ts)
    value: str | None  # None: the key had no value at read_ts
    version_us: int | None  # the commit timestamp of the value read, as the replica says
    staleness_us: int | None = None  # a bounded-staleness read's bound
    invoked_true_us: int = 0  # true (simulated) time when the client asked

    def line(self) -> str:
        return (f"#{self.index} {self.process} via {self.node} {self.asked}: {self.key} at "
                f"{self.read_ts_us} -> {self.value!r} (version {self.version_us})")


def check_snapshot_reads(reads: Iterable[SnapshotRead], writes: Iterable[KnownWrite]) -> Verdict:
    """Every snapshot read returned the newest commit at or below its timestamp."""
    by_value: dict[tuple[str, str], KnownWrite] = {}
    commits: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for write in writes:
        by_value[(write.key, write.value)] = write
        if write.outcome == COMMITTED and write.commit_ts_us is not None:
            commits[write.key].append((write.commit_ts_us, write.value))
    for history in commits.values():
        history.sort()
    problems: list[str] = []
    judged = 0
    for read in reads:
        judged += 1
        problem = _judge(read, by_value, commits.get(read.key, []))
        if problem is not None:
            problems.append(f"{read.line()}: {problem}")
    if not problems:
        return Verdict("snapshot reads", True, f"{judged} snapshot reads each returned the "
                       "newest commit at or below their timestamp")
    return Verdict("snapshot reads", False, f"{len(problems)} of {judged} snapshot reads did not "
                   "return the newest commit at or below their timestamp", len(problems),
                   tuple(problems[:EXCERPT_LINES]))


def check_staleness(reads: Iterable[SnapshotRead]) -> Verdict:
    """A bounded-staleness read is served at a timestamp no older than its bound
    before the true time at which it was asked."""
    bounded = [r for r in reads if r.staleness_us is not None]
    stale = [r for r in bounded if r.read_ts_us < r.invoked_true_us - (r.staleness_us or 0)]
    if not stale:
        return Verdict("bounded staleness", True, f"{len(bounded)} bounded-staleness reads "
                       "served within their bound")
    lines = tuple(f"{r.line()}: {(r.invoked_true_us - r.read_ts_us) / 1000:.3f} ms before it "
                  "was asked" for r in stale[:EXCERPT_LINES])
    return Verdict("bounded staleness", False, f"{len(stale)} of {len(bounded)} bounded-"
                   "staleness reads served older than their bound", len(stale), lines)


def _judge(read: SnapshotRead, by_value: dict[tuple[str, str], KnownWrite],
           commits: list[tuple[int, str]]) -> str | None:
    at = bisect.bisect_right(commits, (read.read_ts_us, "\U0010ffff"))
    newest = commits[at - 1] if at else None  # the newest known commit at or below read_ts
    if read.value is None:
        if newest is not None:
            return f"missed {newest[1]!r}, committed at {newest[0]}"
        return None
    write = by_value.get((read.key, read.value))
    if write is None:
        return "a value never written to this key"
    if write.outcome == FAILED:
        return "a write that never committed"
    if write.outcome == COMMITTED:
        ts = write.commit_ts_us
        if read.version_us is not None and read.version_us != ts:
            return f"version {read.version_us}, but that write committed at {ts}"
    else:
        ts = read.version_us  # an unknown outcome: only the read says when it committed
    if ts is None:
        return "a value without a commit timestamp"
    if ts > read.read_ts_us:
        return f"a write committed at {ts}, after the read's timestamp"
    if newest is not None and newest[0] > ts:
        return f"missed {newest[1]!r}, committed at {newest[0]}, newer than what it returned"
    return None
