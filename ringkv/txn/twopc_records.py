"""What a Paxos group's log holds of two-phase commit, kept beside the log (shell).

A 2PC record (``txn/twopc_messages.py``) is a log entry of its group. Two
things need it after the entry is applied, on every replica:

* **Safe time** (Spanner §4.1.3). A transaction prepared here and not yet
  decided may commit at any ``s`` at or above its prepare timestamp, so a
  replica's safe time is ``min(t_Paxos, t_TM)``: one below the least
  prepare timestamp still undecided. Every replica knows them from its log,
  so every replica, not only the leader, holds its snapshot reads back.
* **Recovery** (``txn/twopc.py``). A new leader rebuilds both roles from the
  group's 2PC records in log order, and the log is compacted: the records
  must outlive their slots.

So each replica, as it applies a record, keeps the latest record per
transaction and role (a decision replaces the begin, an outcome the
prepare) in the engine the log uses, written unsynced before the applied
point like every applied write (a crash that loses it loses the applied
point too, and replay writes it again)::

    y | u8 len(group_id) | group_id | role (c, p) | txn_id -> msgpack [slot, record]

They travel in the group's snapshots with its MVCC records (``GroupRunner``:
a record is inside a snapshot when its slot is). A finished transaction's
record (a decision, an outcome) is kept ``finished_ttl_s`` after it was
applied here, long enough to answer late duplicates, then dropped.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import msgpack

from ringkv.errors import CorruptRecord, ProtocolError
from ringkv.storage.engine import Engine
from ringkv.txn.twopc_messages import (
    BeginRecord,
    DecisionRecord,
    OutcomeRecord,
    PreparedRecord,
    Record,
    decode_record,
    encode_record,
)

__all__ = ["PREFIX", "COORDINATOR", "PARTICIPANT", "TwoPCRecords", "role_of", "group_bounds"]

PREFIX = b"y"
COORDINATOR, PARTICIPANT = b"c", b"p"


def role_of(record: Record) -> bytes:
    return COORDINATOR if isinstance(record, (BeginRecord, DecisionRecord)) else PARTICIPANT


def _group_prefix(group_id: str) -> bytes:
    name = group_id.encode()
    return PREFIX + bytes([len(name)]) + name


def group_bounds(group_id: str) -> tuple[bytes, bytes]:
    """Engine bounds [lo, hi) of one group's records."""
    prefix = _group_prefix(group_id)
    return prefix, prefix + b"\xff"


def _finished(record: Record) -> bool:
    return isinstance(record, (DecisionRecord, OutcomeRecord))


@dataclass
class _Held:
    slot: int
    record: Record
    finished_at_s: float | None  # when a finished record was applied (or loaded) here


class TwoPCRecords:
    """One group's 2PC records on this replica (module notes)."""

    def __init__(self, engine: Engine, group_id: str, finished_ttl_s: float = 600.0) -> None:
        self._engine = engine
        self.group_id = group_id
        self.finished_ttl_s = finished_ttl_s
        self._prefix = _group_prefix(group_id)
        self._held: dict[tuple[bytes, str], _Held] = {}
        self._prepared: dict[str, int] = {}  # txn id -> prepare ts, undecided
        # Finished records in the order they finished: expiry looks at the front only.
        self._finished_order: deque[tuple[float, bytes, str]] = deque()

    def __len__(self) -> int:
        return len(self._held)

    def load(self, now_s: float) -> int:
        """Read what the engine holds (at start, and after a snapshot is installed);
        returns how many records did not decode (skipped)."""
        self._held.clear()
        self._finished_order.clear()
        bad = 0
        lo, hi = group_bounds(self.group_id)
        for key, raw in self._engine.scan(lo, hi):
            try:
                slot, record = decode_value(raw)
                role, txn_id = key[len(self._prefix):len(self._prefix) + 1], key[len(self._prefix) + 1:].decode()
            except (CorruptRecord, UnicodeDecodeError):
                bad += 1
                continue
            self._held[(role, txn_id)] = _Held(slot, record, now_s if _finished(record) else None)
            if _finished(record):
                self._finished_order.append((now_s, role, txn_id))
        self._prepared = {h.record.txn_id: h.record.prepare_ts_us for (role, _), h in self._held.items()
                          if role == PARTICIPANT and isinstance(h.record, PreparedRecord)}
        return bad

    def clear(self) -> None:
        """Forget every record here: a snapshot about to be installed brings the group's."""
        lo, hi = group_bounds(self.group_id)
        keys = [key for key, _ in self._engine.scan(lo, hi)]
        if keys:
            self._engine.write((), keys, sync=False)
        self._held.clear()
        self._prepared.clear()
        self._finished_order.clear()

    def note(self, slot: int, record: Record, now_s: float) -> None:
        """``record`` was applied at ``slot`` here: keep it (unsynced, see notes)."""
        role = role_of(record)
        self._held[(role, record.txn_id)] = _Held(slot, record, now_s if _finished(record) else None)
        if _finished(record):
            self._finished_order.append((now_s, role, record.txn_id))
        if isinstance(record, PreparedRecord):
            self._prepared[record.txn_id] = record.prepare_ts_us
        elif isinstance(record, OutcomeRecord):
            self._prepared.pop(record.txn_id, None)
        self._engine.write([(self._key(role, record.txn_id), encode_value(slot, record))], (),
                           sync=False)

    def records(self, role: bytes) -> list[Record]:
        """One role's records, in log order (what ``recover`` takes)."""
        held = sorted((h.slot, h.record.txn_id, h.record) for (r, _), h in self._held.items()
                      if r == role)
        return [record for _, _, record in held]

    def safe_time_bound(self) -> int | None:
        """t_TM: one below the least prepare timestamp of a transaction prepared
        here and not decided, or None if there is none."""
        return min(self._prepared.values()) - 1 if self._prepared else None

    def prepared(self) -> dict[str, int]:
        """Transactions prepared here and not decided: id -> prepare timestamp."""
        return dict(self._prepared)

    def expire(self, now_s: float) -> int:
        """Drop finished records older than ``finished_ttl_s``; returns how many."""
        old = []
        while self._finished_order and now_s - self._finished_order[0][0] >= self.finished_ttl_s:
            _, role, txn_id = self._finished_order.popleft()
            held = self._held.get((role, txn_id))
            # Only a record still finished since then (a later one replaced it otherwise).
            if held is not None and held.finished_at_s is not None \
                    and now_s - held.finished_at_s >= self.finished_ttl_s:
                del self._held[(role, txn_id)]
                old.append((role, txn_id))
        if old:
            self._engine.write((), [self._key(role, txn) for role, txn in old], sync=False)
        return len(old)

    def _key(self, role: bytes, txn_id: str) -> bytes:
        return self._prefix + role + txn_id.encode()


def encode_value(slot: int, record: Record) -> bytes:
    return msgpack.packb([slot, encode_record(record)], use_bin_type=True)


def decode_value(raw: bytes) -> tuple[int, Record]:
    """(slot, record), or CorruptRecord."""
    try:
        slot, data = msgpack.unpackb(raw, raw=False)
        if not isinstance(slot, int) or slot < 0 or not isinstance(data, bytes):
            raise ValueError("not [slot, record]")
        return slot, decode_record(data)
    except (ValueError, TypeError, msgpack.UnpackException, ProtocolError) as exc:
        raise CorruptRecord(f"unreadable 2PC record: {exc}") from None
