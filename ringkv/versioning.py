"""Cells, their binary record format, and last-write-wins reconciliation (pure).

A cell is what one replica stores for one key: a JSON value (kept as the
UTF-8 bytes of its canonical encoding), an HLC write timestamp, a tombstone
flag and an optional expiry. Replicas converge because ``reconcile`` is a
deterministic join: commutative, associative and idempotent, so the order in
which writes arrive never matters (Dynamo §4.4, with Cassandra's LWW cells
instead of vector clocks).

Record format, version 1 (big-endian)::

    u8  format version (1)
    u8  flags: bit 0 tombstone, bit 1 has expiry
    u64 wall_us    \\ HLC write timestamp
    u32 logical    /
    u64 expires_at_us   (only when the expiry flag is set)
    ... value bytes     (empty for a tombstone)
    u32 CRC-32 of everything before it

A record that fails its checksum or format check raises ``CorruptRecord``;
it is never returned as data.
"""

from __future__ import annotations

import hashlib
import json
import struct
import zlib
from typing import Any, NamedTuple

from ringkv.hlc import MAX_LOGICAL, MAX_WALL_US, Timestamp
from ringkv.errors import CorruptRecord

FORMAT_VERSION = 1
_FLAG_TOMBSTONE = 0x01
_FLAG_EXPIRES = 0x02
_HEADER = struct.Struct(">BBQI")
_EXPIRY = struct.Struct(">Q")
_CRC = struct.Struct(">I")
_HEADER_BYTES, _CRC_BYTES = _HEADER.size, _CRC.size
_MIN_RECORD = _HEADER_BYTES + _CRC_BYTES
_UNKNOWN_FLAGS = ~(_FLAG_TOMBSTONE | _FLAG_EXPIRES)


class Cell(NamedTuple):
    """One replica's value for one key. A named tuple (immutable, as a value must
    be) rather than a frozen dataclass, whose __init__ costs a setattr call per
    field: cells are built for every read and every write a replica serves."""

    value: bytes  # canonical JSON bytes; b"" for a tombstone
    ts: Timestamp
    tombstone: bool = False
    expires_at_us: int | None = None

    def is_live(self, now_us: int) -> bool:
        """A cell is readable data unless it is a tombstone or has expired."""
        if self.tombstone:
            return False
        return self.expires_at_us is None or now_us < self.expires_at_us

    def is_purgeable(self, now_us: int, gc_grace_s: int) -> bool:
        """Tombstones and expired cells may be dropped once gc_grace has passed.

        Waiting gc_grace (Cassandra's gc_grace_seconds) gives repair time to
        spread the deletion everywhere before the marker itself goes away;
        purging earlier would let a stale replica resurrect the value.
        """
        grace_us = gc_grace_s * 1_000_000
        if self.tombstone:
            return now_us >= self.ts.wall_us + grace_us
        if self.expires_at_us is not None:
            return now_us >= self.expires_at_us + grace_us
        return False

    def json_value(self) -> Any:
        return json.loads(self.value)


def tombstone(ts: Timestamp) -> Cell:
    return Cell(value=b"", ts=ts, tombstone=True)


# One shared encoder: json.dumps with options builds a new encoder per call.
_CANONICAL = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def encode_json_value(value: Any) -> bytes:
    """Canonical JSON bytes, so that equal values have equal bytes on every replica."""
    return _CANONICAL.encode(value).encode()


def reconcile(a: Cell | None, b: Cell | None) -> Cell | None:
    """Last write wins; ties are broken the same way on every replica.

    At equal timestamps a tombstone beats a value (a delete is never lost to a
    concurrent write with the same timestamp), then a later expiry wins, then
    the larger value bytes win, as in Cassandra.
    """
    if a is None:
        return b
    if b is None:
        return a
    return a if _rank(a) >= _rank(b) else b


def _rank(cell: Cell) -> tuple[Timestamp, bool, int, bytes]:
    # No expiry means "lives forever", which outranks any finite expiry.
    expiry = MAX_WALL_US if cell.expires_at_us is None else cell.expires_at_us
    return (cell.ts, cell.tombstone, expiry, cell.value)


def encode_cell(cell: Cell) -> bytes:
    value, (wall_us, logical), tombstone, expires_at_us = cell
    flags = _FLAG_TOMBSTONE if tombstone else 0
    if expires_at_us is None:
        body = _HEADER.pack(FORMAT_VERSION, flags, wall_us, logical) + value
    else:
        body = (_HEADER.pack(FORMAT_VERSION, flags | _FLAG_EXPIRES, wall_us, logical)
                + _EXPIRY.pack(expires_at_us) + value)
    return body + _CRC.pack(zlib.crc32(body))


def decode_cell(record: bytes) -> Cell:
    if len(record) < _MIN_RECORD:
        raise CorruptRecord(f"record too short ({len(record)} bytes)")
    body = record[:-_CRC_BYTES]
    if zlib.crc32(body) != _CRC.unpack_from(record, len(body))[0]:
        raise CorruptRecord("record checksum mismatch")
    version, flags, wall_us, logical = _HEADER.unpack_from(body)
    if version != FORMAT_VERSION:
        raise CorruptRecord(f"unknown record format version {version}")
    if flags & _UNKNOWN_FLAGS:
        raise CorruptRecord(f"unknown record flags {flags:#x}")
    offset = _HEADER_BYTES
    expires_at_us = None
    if flags & _FLAG_EXPIRES:
        if len(body) < offset + _EXPIRY.size:
            raise CorruptRecord("record truncated in expiry")
        (expires_at_us,) = _EXPIRY.unpack_from(body, offset)
        offset += _EXPIRY.size
    value = bytes(body[offset:])
    is_tombstone = bool(flags & _FLAG_TOMBSTONE)
    if is_tombstone and value:
        raise CorruptRecord("tombstone record carries a value")
    return Cell(value, Timestamp(wall_us, logical), is_tombstone, expires_at_us)


def check_timestamp(ts: Timestamp) -> None:
    """Raise ValueError if ``ts`` cannot be stored in the record format."""
    if not (0 <= ts.wall_us <= MAX_WALL_US and 0 <= ts.logical <= MAX_LOGICAL):
        raise ValueError(f"timestamp out of range: {ts}")


def cell_digest(cell: Cell | None) -> bytes:
    """What a digest read returns: equal cells give equal digests (Dynamo §4.5)."""
    if cell is None:
        return b""
    return hashlib.blake2b(encode_cell(cell), digest_size=16).digest()
