"""Consistency levels and how many replicas each one needs (pure).

Dynamo §4.5: a read or write succeeds once R (or W) of the N replicas answer;
R + W > N makes every read quorum overlap every write quorum.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable

from ringkv.errors import BadRequest


class ConsistencyLevel(enum.Enum):
    ANY = "ANY"
    ONE = "ONE"
    TWO = "TWO"
    THREE = "THREE"
    QUORUM = "QUORUM"
    ALL = "ALL"
    # The transactional tier's one level: Paxos groups, strictly serializable.
    SERIAL = "SERIAL"

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
    return _NEEDED[level](replication_factor)


# A table rather than a chain of ``level is ConsistencyLevel.X`` tests: every
# request asks, and each enum member read off its class is slow (see below).
_NEEDED: dict[ConsistencyLevel, Callable[[int], int]] = {
    ConsistencyLevel.ANY: lambda rf: 1,
    ConsistencyLevel.ONE: lambda rf: 1,
    ConsistencyLevel.TWO: lambda rf: 2,
    ConsistencyLevel.THREE: lambda rf: 3,
    ConsistencyLevel.QUORUM: lambda rf: rf // 2 + 1,
    ConsistencyLevel.SERIAL: lambda rf: rf // 2 + 1,
    ConsistencyLevel.ALL: lambda rf: rf,
}
if set(_NEEDED) != set(ConsistencyLevel):  # checked at import: every level says what it needs
    raise AssertionError("block_for's table does not cover every consistency level")


class Vote(enum.Enum):
    """Where a quorum stands (etcd raft's ``quorum.VoteResult``)."""

    PENDING = "pending"  # not decided: enough replicas may still answer
    WON = "won"  # enough replicas answered
    LOST = "lost"  # too few replicas can still answer for it ever to be won


class Response(enum.Enum):
    """One replica's answer, as a quorum counts it."""

    OK = "ok"
    FAILED = "failed"
    HINTED = "hinted"  # failed, but a hint for it was stored on the coordinator


# The members under plain names, for the paths that every request takes: on
# Python 3.11, reading a member off its enum (``Vote.WON``) goes through
# ``EnumType.__getattr__``'s hook, about ten times the cost of reading a global.
PENDING, WON, LOST = Vote.PENDING, Vote.WON, Vote.LOST
OK, FAILED, HINTED = Response.OK, Response.FAILED, Response.HINTED


class ResponseTracker:
    """Counts replica responses toward ``block_for`` (pure).

    The coordinator's write path, its read path and (next) Paxos phases all
    ask a set of replicas and need ``block_for`` of them. ``record`` takes one
    response and says where the quorum stands: WON once ``block_for`` count,
    LOST as soon as too few replicas are left to get there, PENDING between.
    A response from a replica that was not asked, or a second response from
    one that was (the network may duplicate), changes nothing.

    ``hints_count``: at ANY, a stored hint counts like an acknowledgement
    (Cassandra's ``WriteType``/ANY semantics).
    """

    __slots__ = ("block_for", "hints_count", "ok", "failed", "hinted", "outstanding", "vote")

    def __init__(self, asked: Iterable[str], block_for: int, *, hints_count: bool = False) -> None:
        if block_for < 0:
            raise ValueError("block_for must be >= 0")
        self.block_for = block_for
        self.hints_count = hints_count
        self.ok: list[str] = []
        self.failed: list[str] = []
        self.hinted: list[str] = []
        # Asked and not yet answered. Read it, never change it: ``ask`` and
        # ``record`` keep it and ``vote`` in step.
        self.outstanding: set[str] = set(asked)
        # Kept current by every change rather than computed on every look:
        # the coordinator asks after each response, on every request.
        self.vote: Vote = self._tally()

    def ask(self, node: str) -> Vote:
        """One more replica was asked (a spare, say): its answer can count too."""
        if node not in self.ok and node not in self.failed and node not in self.hinted:
            self.outstanding.add(node)
            self.vote = self._tally()
        return self.vote

    def record(self, node: str, response: Response) -> Vote:
        outstanding = self.outstanding
        if node not in outstanding:
            return self.vote
        outstanding.discard(node)
        if response is OK:
            self.ok.append(node)
        elif response is HINTED:
            self.hinted.append(node)
        else:
            self.failed.append(node)
        # _tally, written out: this runs for every replica's answer.
        counted = len(self.ok) + (len(self.hinted) if self.hints_count else 0)
        block_for = self.block_for
        if counted >= block_for:
            vote = WON
        elif counted + len(outstanding) < block_for:
            vote = LOST
        else:
            vote = PENDING
        self.vote = vote
        return vote

    def _tally(self) -> Vote:
        counted = len(self.ok) + (len(self.hinted) if self.hints_count else 0)
        if counted >= self.block_for:
            return WON
        if counted + len(self.outstanding) < self.block_for:
            return LOST
        return PENDING
