"""One Paxos group's durable state, in the node's engine under its own prefix (shell).

``PaxosReplica`` hands the shell records to make durable before it sends
anything (``Ready.persist``). This module writes them, each call one atomic
engine batch with fsync, and reads them back as the ``PersistedState``
``PaxosReplica.restore`` takes. Layout, per group::

    b"p" | u8 len(group_id) | group_id | b"A" | u64 slot   accepted: [ballot, entry]
                                       | b"C" | u64 slot   chosen: entry
                                       | b"P"              promised ballot
                                       | b"S"              snapshot (the compaction point)
                                       | b"T"              applied through: u64 slot

(``b"p"`` is free: ``d`` holds the eventual tier's data, ``h`` hints, ``m``
and ``g`` MVCC versions and GC thresholds.) Slots are big-endian, so a
group's slots scan in order. Each record is ``u8 format | msgpack | u32 CRC``;
one that fails its check raises ``CorruptRecord`` on load, because a Paxos
log with a hole in it must not vote.

What is written is the fold ``PersistedState.apply`` defines, with one
care: an accept raises the promised ballot, and the accept itself is
deleted by compaction, so every raise is also written to ``P``. A snapshot
record deletes the group's accepted and chosen slots at and below it, in
the same batch (the log stays bounded).

``T``, the last slot applied to the MVCC store, is not a Paxos record. The
shell writes it unsynced after the applies it covers, in the same engine, so
a crash (which loses a suffix of the unsynced writes) never leaves it ahead
of the store, and the next fsync of the log makes it durable. Restore starts
applying after it: re-applying older entries could bring back versions GC has
since dropped.

Calls are synchronous; the group shell runs them off the event loop when the
engine blocks. ``persist(sync=False)`` is for batches nothing sent depends
on (chosen records alone: see ``group.py``).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack

from ringkv.errors import CorruptRecord, ProtocolError
from ringkv.storage.engine import Engine
from ringkv.txn.paxos import (
    ZERO_BALLOT,
    AcceptRecord,
    Ballot,
    ChosenRecord,
    Entry,
    PersistedState,
    PromiseRecord,
    Record,
    Snapshot,
    SnapshotRecord,
)
from ringkv.txn.paxos_messages import (
    decode_ballot,
    decode_entry,
    decode_snapshot,
    encode_ballot,
    encode_entry,
    encode_snapshot,
)

__all__ = ["PREFIX", "LoadedLog", "LogStats", "PaxosLog", "group_prefix"]

PREFIX = b"p"
ACCEPTED, CHOSEN, PROMISED, SNAPSHOT, APPLIED = b"A", b"C", b"P", b"S", b"T"
FORMAT = 1
_SLOT = struct.Struct(">Q")
_CRC = struct.Struct(">I")


def group_prefix(group_id: str) -> bytes:
    name = group_id.encode()
    if not 0 < len(name) <= 255:
        raise ValueError(f"a group id is 1..255 bytes, got {len(name)}")
    return PREFIX + bytes([len(name)]) + name


def _pack(obj: Any) -> bytes:
    body = bytes([FORMAT]) + msgpack.packb(obj, use_bin_type=True)
    return body + _CRC.pack(zlib.crc32(body))


def _unpack(record: bytes, what: str) -> Any:
    if len(record) < 1 + _CRC.size:
        raise CorruptRecord(f"Paxos log {what} record too short ({len(record)} bytes)")
    body = record[: -_CRC.size]
    if zlib.crc32(body) != _CRC.unpack_from(record, len(body))[0]:
        raise CorruptRecord(f"Paxos log {what} record checksum mismatch")
    if body[0] != FORMAT:
        raise CorruptRecord(f"Paxos log {what} record of unknown format {body[0]}")
    try:
        return msgpack.unpackb(body[1:], raw=False, use_list=True)
    except Exception as exc:  # msgpack raises many types
        raise CorruptRecord(f"Paxos log {what} record is not msgpack: {exc}") from None


@dataclass
class LoadedLog:
    state: PersistedState
    applied_through: int  # the last slot the MVCC store holds (0: none yet)

    @property
    def empty(self) -> bool:
        """Nothing was ever persisted: this replica never promised or voted."""
        s = self.state
        return s.promised == ZERO_BALLOT and not s.accepted and not s.chosen and s.snapshot is None


@dataclass
class LogStats:
    batches: int = 0
    records: int = 0
    deleted: int = 0  # slot records removed by compaction


@dataclass
class _Index:
    """What is on disk, kept in memory so a batch knows what to write and delete."""

    promised: Ballot = ZERO_BALLOT
    snapshot_slot: int = 0
    accepted: set[int] = field(default_factory=set)
    chosen: set[int] = field(default_factory=set)


class PaxosLog:
    """The durable log of one group on this node. ``load`` once, then ``persist``."""

    def __init__(self, engine: Engine, group_id: str) -> None:
        self._engine = engine
        self.group_id = group_id
        self._prefix = group_prefix(group_id)
        self._index: _Index | None = None
        self.stats = LogStats()

    def _key(self, kind: bytes, slot: int | None = None) -> bytes:
        return self._prefix + kind + (b"" if slot is None else _SLOT.pack(slot))

    # -- reading back ------------------------------------------------------

    def load(self) -> LoadedLog:
        """Everything persisted for this group, folded; ``CorruptRecord`` if damaged."""
        state = PersistedState()
        index = _Index()
        applied = 0
        accepted: dict[int, tuple[Ballot, Entry]] = {}
        chosen: dict[int, Entry] = {}
        start = len(self._prefix)
        for raw, record in self._engine.scan(self._prefix, self._prefix + b"\xff"):
            kind, rest = raw[start:start + 1], raw[start + 1:]
            try:
                if kind in (ACCEPTED, CHOSEN):
                    if len(rest) != _SLOT.size:
                        raise CorruptRecord(f"Paxos log key with a bad slot: {raw[:64]!r}")
                    (slot,) = _SLOT.unpack(rest)
                    if kind == ACCEPTED:
                        ballot_raw, entry_raw = _unpack(record, "accepted")
                        accepted[slot] = (decode_ballot(ballot_raw), decode_entry(entry_raw))
                    else:
                        chosen[slot] = decode_entry(_unpack(record, "chosen"))
                elif rest:
                    raise CorruptRecord(f"unknown Paxos log key {raw[:64]!r}")
                elif kind == PROMISED:
                    state.promised = decode_ballot(_unpack(record, "promised"))
                elif kind == SNAPSHOT:
                    state.snapshot = decode_snapshot(_unpack(record, "snapshot"))
                elif kind == APPLIED:
                    applied = _unpack(record, "applied")
                    if type(applied) is not int or applied < 0:
                        raise CorruptRecord(f"Paxos log applied marker {applied!r}")
                else:
                    raise CorruptRecord(f"unknown Paxos log key {raw[:64]!r}")
            except (ProtocolError, ValueError, TypeError) as exc:
                raise CorruptRecord(f"damaged Paxos log record at {raw[:64]!r}: {exc}") from None
        floor = state.snapshot.last_slot if state.snapshot else 0
        state.accepted = {s: v for s, v in sorted(accepted.items()) if s > floor}
        state.chosen = {s: v for s, v in sorted(chosen.items()) if s > floor}
        for ballot, _ in state.accepted.values():
            state.promised = max(state.promised, ballot)
        index.promised = state.promised
        index.snapshot_slot = floor
        index.accepted = set(state.accepted)
        index.chosen = set(state.chosen)
        self._index = index
        return LoadedLog(state, applied)

    # -- writing -----------------------------------------------------------

    def persist(self, records: Sequence[Record], *, sync: bool = True) -> None:
        """Write ``records`` (in order, as ``PersistedState.apply`` folds them) as
        one engine batch, fsynced. After a ``StorageError`` the log must be loaded again."""
        index = self._index
        if index is None:
            raise RuntimeError("PaxosLog.load() must run before persist()")
        ops: dict[bytes, bytes | None] = {}  # key -> record, or None to delete; last one wins
        for record in records:
            if isinstance(record, (PromiseRecord, AcceptRecord)) and record.ballot > index.promised:
                index.promised = record.ballot
                ops[self._key(PROMISED)] = _pack(encode_ballot(record.ballot))
            if isinstance(record, AcceptRecord):
                if record.slot > index.snapshot_slot:
                    index.accepted.add(record.slot)
                    ops[self._key(ACCEPTED, record.slot)] = _pack(
                        [encode_ballot(record.ballot), encode_entry(record.entry)])
            elif isinstance(record, ChosenRecord):
                if record.slot > index.snapshot_slot:
                    index.chosen.add(record.slot)
                    ops[self._key(CHOSEN, record.slot)] = _pack(encode_entry(record.entry))
            elif isinstance(record, SnapshotRecord):
                self._compact(record.snapshot, index, ops)
        if not ops:
            return
        puts = [(key, value) for key, value in ops.items() if value is not None]
        deletes = [key for key, value in ops.items() if value is None]
        self._index = None  # until the write is known to have happened
        self._engine.write(puts, deletes, sync=sync)
        self._index = index
        self.stats.batches += 1
        self.stats.records += len(records)
        self.stats.deleted += len(deletes)

    def _compact(self, snapshot: Snapshot, index: _Index, ops: dict[bytes, bytes | None]) -> None:
        last = snapshot.last_slot
        if last <= index.snapshot_slot:
            return
        index.snapshot_slot = last
        ops[self._key(SNAPSHOT)] = _pack(encode_snapshot(snapshot))
        for kind, slots in ((ACCEPTED, index.accepted), (CHOSEN, index.chosen)):
            for slot in [s for s in slots if s <= last]:
                slots.discard(slot)
                ops[self._key(kind, slot)] = None

    def set_applied(self, slot: int, *, sync: bool = False) -> None:
        """Record that the MVCC store holds every slot through ``slot`` (module notes)."""
        self._engine.write([(self._key(APPLIED), _pack(slot))], (), sync=sync)

    def slots_on_disk(self) -> int:
        """Accepted and chosen slot records held: what compaction bounds."""
        index = self._index
        return 0 if index is None else len(index.accepted | index.chosen)
