"""What a client may ask of a transactional keyspace (pure types).

A condition on a key (issue #11, §6): ``version`` (the key holds a value
committed at that timestamp), ``absent`` (it holds nothing) or ``equals``
(it holds an equal JSON value: object keys in any order, numbers and types
exact, so 1 is not 1.0 and not true); a write (a put or a
delete); a one-shot transaction of reads, conditions and writes, with an
optional id the client chose so that a retry names the same transaction. A put
may name a session lease, to which its key is attached.
The HTTP layer builds these from JSON (``server/txn_validation.py``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

CONDITION_KINDS = ("version", "absent", "equals")
_SORTED = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False,
                           sort_keys=True)


def comparable_json(value: Any) -> bytes:
    """JSON with object keys sorted: equal values give equal bytes, whatever the key order."""
    return _SORTED.encode(value).encode()


@dataclass(frozen=True)
class Condition:
    key: bytes
    kind: str  # one of CONDITION_KINDS
    version_us: int | None = None
    equals: bytes | None = None  # comparable_json of the expected value

    def holds(self, value: bytes | None, version_us: int | None) -> bool:
        """Whether the key's committed state (``value`` None: nothing) meets it."""
        if self.kind == "absent":
            return value is None
        if self.kind == "version":
            return value is not None and version_us == self.version_us
        return value is not None and comparable_json(json.loads(value)) == self.equals


@dataclass(frozen=True)
class Write:
    key: bytes
    value: bytes | None  # None: delete
    # A put attached to this session lease (its id, ``<keyspace>:<tag>``): the lease
    # service adds the lease record's condition and write before the transaction runs
    # (``txn/leases.py``, ``leased_txn``), so no write that reaches a leader has one.
    lease: str | None = None


@dataclass(frozen=True)
class TxnRequest:
    keyspace: str
    txn_id: str | None
    reads: tuple[bytes, ...]
    conditions: tuple[Condition, ...]
    writes: tuple[Write, ...]

    def keys(self) -> list[bytes]:
        """Every key it touches, each once, in the order first named."""
        named = [*self.reads, *(c.key for c in self.conditions), *(w.key for w in self.writes)]
        return list(dict.fromkeys(named))
