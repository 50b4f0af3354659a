"""How the transactional tier lays out MVCC versions in the engine's key space (pure).

Every version of every key is one engine record. Version keys sort by
keyspace, then token, then key, then commit timestamp *descending*::

    b"m" | u8 len(keyspace) | keyspace | u64 (token + 2**63) | escaped key | u64 (MAX_TS_US - commit_ts_us)

- Token order, as the eventual tier's data keys (``storage/keys.py``, prefix
  ``b"d"``): one token range of one keyspace is one contiguous engine scan.
- The versions of one key are adjacent, newest first (as CockroachDB and
  Bigtable store them), so "the newest version at or below t" is one seek to
  ``key_prefix | (MAX_TS_US - t)``: the first record there, if it still
  belongs to the key, is the answer.
- A key is followed by more bytes (its timestamp), so it must be
  self-delimiting or the versions of ``b"a"`` and ``b"ab"`` (same token)
  would interleave. The escaping is FoundationDB's tuple-layer byte string:
  every 0x00 becomes 0x00 0xFF, and the key ends with 0x00 0x01. The
  encoding keeps byte order and no encoded key is a prefix of another.
  (The terminator is two bytes, not FoundationDB's one, because here a
  timestamp follows it, and its first byte is usually 0xFF.)

Each keyspace's GC threshold (the highest horizon GC has collected at; reads
below it are refused) is its own record::

    b"g" | keyspace  ->  u64 threshold_ts_us

Version records::

    u8 format | u8 flags (bit 0: tombstone) | value | u32 CRC-32 of everything before it

A record that fails its checksum or format check raises ``CorruptRecord``.
"""

from __future__ import annotations

import struct
import zlib
from typing import NamedTuple

from ringkv.errors import CorruptRecord

VERSION_PREFIX = b"m"
GC_THRESHOLD_PREFIX = b"g"

MIN_TOKEN = -(2**63)
MAX_TOKEN = 2**63 - 1
MAX_TS_US = 2**63 - 1  # commit timestamps are microseconds in [0, MAX_TS_US]

_U64 = struct.Struct(">Q")
_TOKEN_OFFSET = 2**63
_ESCAPED_NUL = b"\x00\xff"
_TERMINATOR = b"\x00\x01"
_TERMINATOR_END = b"\x00\x02"  # just past every version of one key (see key_prefix_end)
_TS_BYTES = _U64.size
# prefix byte, keyspace length byte, token, terminator, timestamp
_MIN_VERSION_KEY = 2 + _U64.size + len(_TERMINATOR) + _TS_BYTES

FORMAT_VERSION = 1
_FLAG_TOMBSTONE = 0x01
_HEADER = struct.Struct(">BB")
_CRC = struct.Struct(">I")


class VersionKey(NamedTuple):
    keyspace: str
    token: int
    key: bytes
    commit_ts_us: int


# -- keys ------------------------------------------------------------------


def keyspace_prefix(keyspace: str) -> bytes:
    name = keyspace.encode()
    if len(name) > 255:
        raise ValueError(f"keyspace name longer than 255 bytes: {keyspace[:32]!r}...")
    return VERSION_PREFIX + bytes([len(name)]) + name


def escape_key(key: bytes) -> bytes:
    """The order-keeping, self-delimiting form of ``key``."""
    return key.replace(b"\x00", _ESCAPED_NUL) + _TERMINATOR


def unescape_key(escaped: bytes) -> bytes:
    if not escaped.endswith(_TERMINATOR):
        raise CorruptRecord(f"MVCC key without its terminator: {escaped[:16]!r}")
    body = escaped[: -len(_TERMINATOR)]
    key = body.replace(_ESCAPED_NUL, b"\x00")
    # Every 0x00 in a valid body is followed by 0xFF: one that is not, is damage.
    if body.replace(_ESCAPED_NUL, b"").count(0) != 0:
        raise CorruptRecord(f"MVCC key with a bad escape: {escaped[:16]!r}")
    return key


def token_bound(keyspace: str, token: int) -> bytes:
    """The smallest version key of ``keyspace`` with this token."""
    return keyspace_prefix(keyspace) + _U64.pack(token + _TOKEN_OFFSET)


def key_prefix(keyspace: str, token: int, key: bytes) -> bytes:
    """The prefix every version of one key shares (its version key minus the timestamp)."""
    return token_bound(keyspace, token) + escape_key(key)


def key_prefix_end(prefix: bytes) -> bytes:
    """A bound just past every version of the key whose prefix this is, and
    before every later key (the terminator's last byte 0x01 becomes 0x02,
    below both an escaped 0x00 (0x00 0xFF) and any other byte a longer key
    could continue with)."""
    return prefix[: -len(_TERMINATOR)] + _TERMINATOR_END


def _descending(ts_us: int) -> bytes:
    return _U64.pack(MAX_TS_US - ts_us)


def version_key(keyspace: str, token: int, key: bytes, commit_ts_us: int) -> bytes:
    check_ts(commit_ts_us)
    return key_prefix(keyspace, token, key) + _descending(commit_ts_us)


def seek_key(prefix: bytes, at_ts_us: int) -> bytes:
    """Where the newest version at or below ``at_ts_us`` of the key with this prefix starts.

    Versions newer than ``at_ts_us`` sort before it; the first record at or
    after it, if it is below ``key_prefix_end(prefix)``, is the version a read
    at ``at_ts_us`` sees."""
    if at_ts_us < 0:
        return key_prefix_end(prefix)  # nothing is at or below it
    return prefix + _descending(min(at_ts_us, MAX_TS_US))


def split_version_key(raw: bytes) -> tuple[bytes, int]:
    """(the key's prefix, commit_ts_us) of a version key, without decoding the key."""
    if len(raw) < _MIN_VERSION_KEY or raw[:1] != VERSION_PREFIX:
        raise CorruptRecord(f"not an MVCC version key: {raw[:16]!r}")
    (descending,) = _U64.unpack_from(raw, len(raw) - _TS_BYTES)
    return raw[:-_TS_BYTES], MAX_TS_US - descending


def parse_key_prefix(prefix: bytes) -> tuple[str, int, bytes]:
    """(keyspace, token, key) of a key prefix."""
    if len(prefix) < 2 or prefix[:1] != VERSION_PREFIX:
        raise CorruptRecord(f"not an MVCC key: {prefix[:16]!r}")
    token_at = 2 + prefix[1]
    key_at = token_at + _U64.size
    if len(prefix) < key_at + len(_TERMINATOR):
        raise CorruptRecord(f"truncated MVCC key: {prefix[:16]!r}")
    try:
        keyspace = prefix[2:token_at].decode()
    except UnicodeDecodeError as exc:
        raise CorruptRecord(f"MVCC key with a bad keyspace name: {prefix[:16]!r}") from exc
    (biased,) = _U64.unpack_from(prefix, token_at)
    return keyspace, biased - _TOKEN_OFFSET, unescape_key(prefix[key_at:])


def parse_version_key(raw: bytes) -> VersionKey:
    prefix, commit_ts_us = split_version_key(raw)
    if commit_ts_us < 0:
        raise CorruptRecord(f"MVCC version key with a timestamp out of range: {raw[:16]!r}")
    return VersionKey(*parse_key_prefix(prefix), commit_ts_us)


def keyspace_bounds(keyspace: str) -> tuple[bytes, bytes]:
    """Engine bounds [lo, hi) of every version in ``keyspace``."""
    prefix = keyspace_prefix(keyspace)
    # The last byte of the prefix is a byte of a UTF-8 name (never 0xFF) or
    # the length byte of an empty name (0): bumping it gives the first key
    # after the keyspace.
    return prefix, prefix[:-1] + bytes([prefix[-1] + 1])


def range_bounds(keyspace: str, start_exclusive: int, end_inclusive: int) -> tuple[bytes, bytes]:
    """Engine bounds [lo, hi) of the versions with tokens in (start_exclusive, end_inclusive], not wrapping."""
    _, hi_all = keyspace_bounds(keyspace)
    lo = hi_all if start_exclusive >= MAX_TOKEN else token_bound(keyspace, start_exclusive + 1)
    hi = hi_all if end_inclusive >= MAX_TOKEN else token_bound(keyspace, end_inclusive + 1)
    return lo, max(lo, hi)


def token_range_bounds(keyspace: str, start_exclusive: int, end_inclusive: int
                       ) -> list[tuple[bytes, bytes]]:
    """Engine bounds [lo, hi) of a ring range (start_exclusive, end_inclusive], which
    may wrap past the ring's end (start == end: the whole ring), in key order."""
    if start_exclusive == end_inclusive:
        return [keyspace_bounds(keyspace)]
    if start_exclusive < end_inclusive:
        return [range_bounds(keyspace, start_exclusive, end_inclusive)]
    # (start, MAX] and [MIN, end]: the second sorts first.
    return [range_bounds(keyspace, MIN_TOKEN - 1, end_inclusive),
            range_bounds(keyspace, start_exclusive, MAX_TOKEN)]


def check_ts(ts_us: int) -> None:
    if not 0 <= ts_us <= MAX_TS_US:
        raise ValueError(f"commit timestamp {ts_us} is outside [0, {MAX_TS_US}] microseconds")


def gc_threshold_key(keyspace: str) -> bytes:
    return GC_THRESHOLD_PREFIX + keyspace.encode()


# -- records ---------------------------------------------------------------


def encode_record(value: bytes | None) -> bytes:
    """A version record: ``value``, or a tombstone when it is None."""
    if value is None:
        body = _HEADER.pack(FORMAT_VERSION, _FLAG_TOMBSTONE)
    else:
        body = _HEADER.pack(FORMAT_VERSION, 0) + value
    return body + _CRC.pack(zlib.crc32(body))


def decode_record(record: bytes) -> bytes | None:
    """The value of a version record, or None for a tombstone. Raises CorruptRecord."""
    if len(record) < _HEADER.size + _CRC.size:
        raise CorruptRecord(f"MVCC record too short ({len(record)} bytes)")
    body = record[: -_CRC.size]
    (crc,) = _CRC.unpack_from(record, len(body))
    if zlib.crc32(body) != crc:
        raise CorruptRecord("MVCC record checksum mismatch")
    version, flags = _HEADER.unpack_from(body)
    if version != FORMAT_VERSION or flags & ~_FLAG_TOMBSTONE:
        raise CorruptRecord(f"MVCC record of unknown format {version} (flags {flags:#x})")
    if flags & _FLAG_TOMBSTONE:
        if len(body) != _HEADER.size:
            raise CorruptRecord("MVCC tombstone with a value")
        return None
    return body[_HEADER.size :]


def encode_threshold(ts_us: int) -> bytes:
    check_ts(ts_us)
    body = _U64.pack(ts_us)
    return body + _CRC.pack(zlib.crc32(body))


def decode_threshold(record: bytes) -> int:
    if len(record) != _U64.size + _CRC.size:
        raise CorruptRecord(f"GC threshold record of {len(record)} bytes")
    (crc,) = _CRC.unpack_from(record, _U64.size)
    if zlib.crc32(record[: _U64.size]) != crc:
        raise CorruptRecord("GC threshold checksum mismatch")
    (ts_us,) = _U64.unpack_from(record)
    return int(ts_us)
