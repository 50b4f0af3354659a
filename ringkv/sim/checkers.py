"""Checkers over a recorded client history (pure functions).

They need only ``Op`` records (see ``history``) and, for convergence, a
snapshot of what every replica holds, so a real-process Jepsen-style test can
use them as they are. Each returns a ``Verdict`` carrying an excerpt of the
history that shows the problem.

Order is judged by real time, never by the timestamps the servers chose
(clock skew could make those lie): write ``f`` certainly precedes write ``w``
when ``f`` was acknowledged before ``w`` began. A write whose outcome is
unknown may take effect at any time after it began, so it precedes nothing.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ringkv.sim.history import DELETE, FAIL, OK, Op

EXCERPT_LINES = 12
MUTATIONS = ("write", DELETE)
NOT_PROMISED = "; not promised by these settings, so measured, not judged"


def _ended(op: Op) -> float:
    """When ``op`` ended; only operations that ended are ever asked."""
    assert op.end is not None, f"operation #{op.index} has not ended"
    return op.end


@dataclass(frozen=True)
class Verdict:
    name: str
    ok: bool
    summary: str
    count: int = 0  # how many offending items
    excerpt: tuple[str, ...] = ()

    def render(self) -> str:
        head = f"{self.name}: {'ok' if self.ok else 'FAILED'} - {self.summary}"
        return "\n".join([head, *(f"    {line}" for line in self.excerpt)])


def _writes_by_key(history: Sequence[Op]) -> dict[str, dict[str, Op]]:
    """Each key's writes by the (unique) value they wrote; deletes are not here."""
    writes: dict[str, dict[str, Op]] = {}
    for op in history:
        if op.kind == "write":
            writes.setdefault(op.key, {})[op.value or ""] = op
    return writes


def _deletes_by_key(history: Sequence[Op]) -> dict[str, list[Op]]:
    deletes: dict[str, list[Op]] = {}
    for op in history:
        if op.kind == DELETE:
            deletes.setdefault(op.key, []).append(op)
    return deletes


def _acked_mutations(writes: Mapping[str, Op], deletes: Sequence[Op]) -> _AckedWrites:
    """A key's writes and deletes: a delete is a write of "absent"."""
    return _AckedWrites([*writes.values(), *deletes])


def _floor(read: Op, writes: Mapping[str, Op], deletes: Sequence[Op]) -> float:
    """When the value ``read`` returned was certainly in effect: the ack of the write
    that produced it; for "absent", the latest such moment of any delete that had
    begun before the read ended (or never, -inf, if none: the initial absence).
    An acknowledged write or delete that began after this was missed by the read."""
    if read.value is not None:
        source = writes.get(read.value)
        return -math.inf if source is None else _acked_end(source)
    floor = -math.inf
    for delete in deletes:
        if delete.status != FAIL and (read.end is None or delete.start <= read.end):
            floor = max(floor, _acked_end(delete))
    return floor


def _acked_end(write: Op) -> float:
    """When ``write`` was certainly in effect: its ack, or never (inf) if unacknowledged."""
    return write.end if write.status == OK and write.end is not None else math.inf


class _AckedWrites:
    """Acknowledged writes of one key, to ask: which ended before t and began after s?"""

    def __init__(self, writes: Sequence[Op]) -> None:
        acked = sorted((w for w in writes if w.status == OK and w.end is not None),
                       key=lambda w: (w.end, w.index))
        self.writes = acked
        self.ends = [_ended(w) for w in acked]
        # latest[i]: the write with the latest start among acked[: i + 1]
        self.latest: list[Op] = []
        for write in acked:
            best = self.latest[-1] if self.latest else None
            self.latest.append(write if best is None or write.start > best.start else best)

    def latest_before(self, t: float) -> Op | None:
        """The acked write that ended before ``t`` and began last."""
        i = bisect.bisect_left(self.ends, t)
        return self.latest[i - 1] if i else None

    def all_before(self, t: float) -> list[Op]:
        return self.writes[: bisect.bisect_left(self.ends, t)]


def _missed(read: Op, floor: float, acked: _AckedWrites) -> list[Op]:
    """Acked writes (and deletes) that ``read`` should have seen (they ended before it
    began, and the value it returned certainly came before them), all of them."""
    return [w for w in acked.all_before(read.start) if w.start > floor]


def _excerpt(groups: Sequence[Sequence[Op]]) -> tuple[str, ...]:
    lines: list[str] = []
    for group in groups:
        if len(lines) >= EXCERPT_LINES:
            break
        lines.extend(op.line() for op in sorted(group, key=lambda op: op.index))
        lines.append("--")
    return tuple(lines[:EXCERPT_LINES])


def lost_writes(history: Sequence[Op], *, promised: bool = True) -> Verdict:
    """(a) Every acknowledged write is visible to the final reads after healing.

    A final read (``Op.final``, at ALL after faults healed) misses ``w`` if it
    returned nothing or a value written certainly before ``w``. Keys that were
    written but have no successful final read are reported as unchecked. With
    ``promised=False`` (e.g. skewed clocks) losses are counted, not judged.
    """
    writes = _writes_by_key(history)
    deletes = _deletes_by_key(history)
    final_reads = [op for op in history if op.final and op.kind == "read" and op.status == OK]
    read_keys = {op.key for op in final_reads}
    lost: dict[int, tuple[Op, Op]] = {}
    for read in final_reads:
        key_writes, key_deletes = writes.get(read.key, {}), deletes.get(read.key, [])
        acked = _acked_mutations(key_writes, key_deletes)
        for write in _missed(read, _floor(read, key_writes, key_deletes), acked):
            lost.setdefault(write.index, (write, read))
    mutated = {key: [*ws.values(), *deletes.get(key, [])] for key, ws in writes.items()}
    for key, ds in deletes.items():
        mutated.setdefault(key, list(ds))
    unchecked = sorted(key for key, ops in mutated.items()
                       if key not in read_keys and any(op.status == OK for op in ops))
    n_acked = sum(1 for op in history if op.kind in MUTATIONS and op.status == OK)
    if unchecked:
        return Verdict("lost acknowledged writes", False,
                       f"no final read succeeded for {len(unchecked)} key(s): {unchecked[:5]}",
                       len(unchecked))
    if not lost:
        return Verdict("lost acknowledged writes", True,
                       f"0 of {n_acked} acknowledged writes lost")
    groups = [(write, read) for write, read in sorted(lost.values(), key=lambda p: p[0].index)]
    summary = f"{len(lost)} of {n_acked} acknowledged writes lost"
    if not promised:
        return Verdict("lost acknowledged writes", True, summary + NOT_PROMISED, len(lost),
                       _excerpt(groups[:3]))
    return Verdict("lost acknowledged writes", False,
                   summary + " (each write, then the final read that misses it)",
                   len(lost), _excerpt(groups))


def stale_reads(history: Sequence[Op], *, promised: bool) -> Verdict:
    """(b) No read returns a value older than a write acknowledged before it began.

    A promise only where read and write quorums overlap (R + W > N) and clocks
    are synchronized; otherwise (``promised=False``) stale reads are counted,
    as a measurement, and the verdict is ok.
    """
    writes = _writes_by_key(history)
    deletes = _deletes_by_key(history)
    acked = {key: _acked_mutations(writes.get(key, {}), deletes.get(key, []))
             for key in writes.keys() | deletes.keys()}
    reads = [op for op in history if op.kind == "read" and op.status == OK and not op.final]
    stale: list[tuple[Op, ...]] = []
    for read in reads:
        key_writes = writes.get(read.key, {})
        newest = acked[read.key].latest_before(read.start) if read.key in acked else None
        if newest is None:
            continue
        source = key_writes.get(read.value) if read.value is not None else None
        floor = _floor(read, key_writes, deletes.get(read.key, []))
        if newest.start > floor:
            stale.append((newest, *(() if source is None else (source,)), read))
    summary = f"{len(stale)} of {len(reads)} reads stale ({_rate(len(stale), len(reads))})"
    if not promised:
        return Verdict("stale reads", True, summary + NOT_PROMISED,
                       len(stale), _excerpt(stale[:3]))
    if stale:
        return Verdict("stale reads", False,
                       summary + " (the write returned, the acked write missed, the read)",
                       len(stale), _excerpt(stale))
    return Verdict("stale reads", True, summary)


def phantom_reads(history: Sequence[Op]) -> Verdict:
    """(c) Every value read was written to that key, by a write that had begun and
    that was not refused outright."""
    writes = _writes_by_key(history)
    bad: list[tuple[Op, ...]] = []
    reads = [op for op in history if op.kind == "read" and op.status == OK]
    for read in reads:
        if read.value is None:
            continue
        source = writes.get(read.key, {}).get(read.value)
        if source is None or source.status == FAIL:
            bad.append((read,) if source is None else (source, read))
        elif read.end is not None and source.start > read.end:
            bad.append((read, source))  # read a value before anyone wrote it
    if bad:
        return Verdict("reads of values never written", False,
                       f"{len(bad)} of {len(reads)} reads returned a value never written",
                       len(bad), _excerpt(bad))
    return Verdict("reads of values never written", True, f"0 of {len(reads)} reads")


def discarded_writes(history: Sequence[Op], *, promised: bool) -> Verdict:
    """(e) No acknowledged write loses, by last-write-wins, to a write that was
    acknowledged before it began. Uses the servers' timestamps (``Op.ts``).

    Such a write is gone the moment a replica holds both: reads never return it.
    With synchronized clocks hybrid logical clocks rule it out; with skewed
    clocks it is the known limit of LWW, counted as a measurement.
    """
    discarded: list[tuple[Op, Op]] = []
    acked_total = 0
    by_key: dict[str, list[Op]] = {}
    for op in history:
        if op.kind in MUTATIONS and op.status == OK and op.end is not None and op.ts is not None:
            by_key.setdefault(op.key, []).append(op)
            acked_total += 1
    for writes in by_key.values():
        writes.sort(key=lambda w: (w.end, w.index))
        ends = [_ended(w) for w in writes]
        highest: list[Op] = []  # highest[i]: the largest timestamp among writes[: i + 1]
        for write in writes:
            best = highest[-1] if highest else None
            highest.append(write if best is None or write.ts > best.ts else best)  # type: ignore[operator]
        for write in writes:
            i = bisect.bisect_left(ends, write.start)
            if i and highest[i - 1].ts > write.ts:  # type: ignore[operator]
                discarded.append((highest[i - 1], write))
    summary = (f"{len(discarded)} of {acked_total} acknowledged writes discarded by an "
               f"earlier write with a later timestamp")
    if discarded and promised:
        return Verdict("writes discarded by LWW", False, summary, len(discarded),
                       _excerpt(discarded))
    note = "" if promised else NOT_PROMISED
    return Verdict("writes discarded by LWW", True, summary + note, len(discarded),
                   _excerpt(discarded[:3]) if discarded else ())


def resurrected_reads(history: Sequence[Op], *, promised: bool,
                      final_promised: bool = True) -> Verdict:
    """(f) No read returns a value after its deletion was acknowledged.

    A read resurrects when it began after a delete of its key was acknowledged,
    and returned a value whose write was acknowledged before that delete began
    (so the delete certainly came after it; values are unique, so no later write
    of the same value exists). The final reads (at ALL, after healing) are judged
    whenever no acknowledged write may be lost (``final_promised``): a deletion
    undone for good. The clients' reads are judged where reads are promised
    fresh (``promised``); elsewhere such a read is counted as a measurement.
    """
    writes = _writes_by_key(history)
    deletes = {key: _AckedWrites(ds) for key, ds in _deletes_by_key(history).items()}
    reads = [op for op in history if op.kind == "read" and op.status == OK
             and op.value is not None and op.key in deletes]
    found: list[tuple[Op, Op, Op]] = []
    for read in reads:
        source = writes.get(read.key, {}).get(read.value or "")
        if source is None or source.status != OK:
            continue  # phantom (another checker), or its write may have landed any time
        delete = deletes[read.key].latest_before(read.start)
        if delete is not None and delete.start > _acked_end(source):
            found.append((source, delete, read))
    judged = [f for f in found if (promised if not f[2].final else final_promised)]
    n_deleted = sum(1 for op in history if op.kind == DELETE and op.status == OK)
    summary = (f"{len(found)} of {len(reads)} reads of a key with acknowledged deletes "
               f"returned a value deleted before they began ({n_deleted} deletes acknowledged)")
    if judged:
        return Verdict("resurrected values", False,
                       summary + " (the write, the delete acknowledged after it, the read)",
                       len(found), _excerpt(found))
    note = NOT_PROMISED if found else ""
    return Verdict("resurrected values", True, summary + note, len(found), _excerpt(found[:3]))


def convergence(replicas: Mapping[str, Mapping[str, object]]) -> Verdict:
    """(d) After healing, every replica of every key holds the same cell.

    ``replicas`` maps key -> {node: what that node's replica holds (None: nothing)}.
    """
    diverged = [key for key in sorted(replicas) if len(set(map(repr, replicas[key].values()))) > 1]
    if not diverged:
        return Verdict("replicas converged", True, f"{len(replicas)} keys identical on every replica")
    lines = []
    for key in diverged[:4]:
        lines.append(f"key {key}:")
        lines.extend(f"  {node}: {cell!r}" for node, cell in sorted(replicas[key].items()))
    return Verdict("replicas converged", False,
                   f"{len(diverged)} of {len(replicas)} keys differ between replicas",
                   len(diverged), tuple(lines[:EXCERPT_LINES]))


def _rate(part: int, whole: int) -> str:
    return f"{100 * part / whole:.2f}%" if whole else "n/a"
