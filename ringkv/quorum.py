"""Consistency levels and how many replicas each one needs (pure).

Dynamo §4.5: a read or write succeeds once R (or W) of the N replicas answer;
R + W > N makes every read quorum overlap every write quorum.
"""

from __future__ import annotations

import enum

from ringkv.errors import BadRequest


class ConsistencyLevel(enum.Enum):
    ANY = "ANY"
    ONE = "ONE"
    TWO = "TWO"
    THREE = "THREE"
    QUORUM = "QUORUM"
    ALL = "ALL"

    @classmethod
    def parse(cls, text: str, *, field: str = "consistency", write: bool) -> ConsistencyLevel:
        """Parse a client-supplied level, naming the field when it is wrong."""
        try:
            level = cls(text.upper())
        except (ValueError, AttributeError):
            names = ", ".join(level.value for level in cls)
            raise BadRequest(
                f"unknown consistency level {text!r}; expected one of {names}", field=field
            ) from None
        if level is cls.ANY and not write:
            raise BadRequest("consistency ANY is only valid for writes", field=field)
        return level


def block_for(level: ConsistencyLevel, replication_factor: int) -> int:
    """How many replica acknowledgements ``level`` needs out of ``replication_factor``.

    ANY needs one acknowledgement, which may be a stored hint. A fixed count
    larger than the replication factor can never be met; callers report that
    as Unavailable.
    """
    if replication_factor < 1:
        raise ValueError("replication_factor must be >= 1")
    if level is ConsistencyLevel.ANY or level is ConsistencyLevel.ONE:
        return 1
    if level is ConsistencyLevel.TWO:
        return 2
    if level is ConsistencyLevel.THREE:
        return 3
    if level is ConsistencyLevel.QUORUM:
        return replication_factor // 2 + 1
    return replication_factor  # ALL
