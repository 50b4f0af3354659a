"""A client history: what each client asked, when, and what it was told (pure).

The same record serves the simulator and a real-process test: ``start`` and
``end`` are seconds on one clock that all clients share (the test's, never a
node's), and every written value is unique per key, so a value read names
the write that produced it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import NamedTuple

OK = "ok"  # acknowledged / answered
FAIL = "fail"  # certainly had no effect (e.g. Unavailable: nothing was sent)
INFO = "info"  # outcome unknown (timeout, coordinator died, still in flight at the end)
DELETE = "delete"  # a write of "absent" (a tombstone); its value is None


class Op(NamedTuple):
    """One client operation. A named tuple, not a frozen dataclass (whose __init__
    makes a setattr call per field): the simulator records two per operation."""

    index: int  # type: ignore[assignment]  # shadows tuple.index(), which nothing calls
    process: str  # the client ("c3"), or "final" for the reads after healing
    kind: str  # "write", "delete" or "read"
    key: str
    value: str | None  # write: the value written; read: the value returned (None: absent)
    start: float
    end: float | None  # None: no answer ever came
    status: str  # OK, FAIL or INFO
    node: str  # the coordinator asked
    consistency: str
    error: str | None = None
    final: bool = False
    # The server's timestamp (wall_us, logical): of the write, or of the cell read.
    # Checkers judge order by start/end, never by this; it explains LWW outcomes.
    ts: tuple[int, int] | None = None

    def line(self) -> str:
        end = "    ..." if self.end is None else f"{self.end:8.3f}"
        what = f"{self.kind:5} {self.key} {self.value!r}"
        tail = f" ({self.error})" if self.error else ""
        if self.ts is not None:
            tail += f" ts {self.ts[0]}.{self.ts[1]}"
        return (f"#{self.index:<5} {self.start:8.3f}-{end} {self.process:>5} {self.status:4} "
                f"{what} via {self.node} at {self.consistency}{tail}")


def history_hash(ops: Iterable[Op], extra: Iterable[str] = ()) -> str:
    """A digest of the whole history (and e.g. the fault log): same run, same hash."""
    digest = hashlib.sha256()
    for op in ops:
        digest.update(repr((op.index, op.process, op.kind, op.key, op.value, op.start, op.end,
                            op.status, op.node, op.consistency, op.error, op.final,
                            op.ts)).encode())
    for line in extra:
        digest.update(line.encode())
    return digest.hexdigest()[:16]
