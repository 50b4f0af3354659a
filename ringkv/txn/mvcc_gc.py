"""Which MVCC versions garbage collection may remove, and up to when (pure).

A snapshot read at ``t`` sees the newest version at or below ``t`` (Spanner
§4.1). GC is given a horizon ``h`` that no read will go below: the oldest
open snapshot, and never later than ``now - mvcc_gc_s`` (``gc_horizon_us``).
For each key it keeps

- every version above ``h`` (reads above ``h`` may see any of them), and
- the newest version at or below ``h`` (the one a read at ``h`` sees),

and removes every older version: no read at or above ``h`` can see it. When
that kept version is a tombstone and nothing older remains, it goes too: a
read at or above ``h`` that would have seen it reads "absent" either way.

``plan_gc`` decides this for one bounded batch of versions in engine order
(key by key, newest first). A batch may stop in the middle of a key: then it
keeps a tombstone it cannot yet prove is the last version ≤ ``h`` (dropping
it while an older version remained would resurrect that version), and the
next batch resumes at the key's kept version, so the decision is made again
with the same information.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

MVCC_GC_S = 600  # txn.mvcc_gc_s: how long old versions stay readable
GC_BATCH_RECORDS = 1000  # versions one GC call examines, so it never holds the loop for long
_US_PER_S = 1_000_000


def gc_horizon_us(
    now_us: int, open_snapshot_ts_us: Iterable[int], *, mvcc_gc_s: float = MVCC_GC_S
) -> int:
    """The horizon GC may collect up to: ``mvcc_gc_s`` ago, or the oldest open
    snapshot if that is older (a snapshot still open must stay readable)."""
    horizon_us = now_us - int(mvcc_gc_s * _US_PER_S)
    return min(horizon_us, min(open_snapshot_ts_us, default=horizon_us))


class GcCandidate(NamedTuple):
    """One stored version, as GC sees it."""

    raw: bytes  # its engine key
    owner: bytes  # what every version of the same key shares (the key prefix)
    commit_ts_us: int
    tombstone: bool


class GcPlan(NamedTuple):
    deletes: list[bytes]  # engine keys to remove, in one atomic batch
    resume: bytes | None  # the engine key the next batch starts at; None: the scan is complete


def plan_gc(candidates: Sequence[GcCandidate], horizon_ts_us: int, *, reached_end: bool) -> GcPlan:
    """What to delete among ``candidates`` (engine order) for reads at or above the horizon.

    ``reached_end`` says the batch ran to the end of the scanned span, so its
    last key is complete; otherwise more versions of that key may follow.
    """
    deletes: list[bytes] = []
    owner: bytes | None = None
    kept: GcCandidate | None = None  # the current key's newest version at or below the horizon
    for candidate in candidates:
        if candidate.owner != owner:
            if kept is not None and kept.tombstone:
                deletes.append(kept.raw)  # every older version went in this batch or before
            owner, kept = candidate.owner, None
        if candidate.commit_ts_us > horizon_ts_us:
            continue
        if kept is None:
            kept = candidate
        else:
            deletes.append(candidate.raw)  # shadowed by ``kept`` for every read at or above the horizon
    if reached_end or not candidates:
        if kept is not None and kept.tombstone:
            deletes.append(kept.raw)
        return GcPlan(deletes, None)
    # The last key may go on past this batch: start the next one at its kept
    # version (so that one is still known to be the newest at or below the
    # horizon), or after the last version seen, all of them above it.
    resume = kept.raw if kept is not None else candidates[-1].raw + b"\x00"
    return GcPlan(deletes, resume)
