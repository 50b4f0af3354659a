"""How ringkv lays its records out in the engine's ordered key space.

Data keys sort by keyspace, then token, then key, so that one token range of
one keyspace is one contiguous engine scan: repair, bootstrap streaming and
paged scans all read ranges this way.

    b"d" | u8 len(keyspace) | keyspace | u64 (token + 2**63) | key

Beside them, one record ``b"w"``: the newest cell timestamp ever written
(``LocalStore``), which lets a newer write skip reading the stored cell.

Adding 2**63 maps signed Murmur3 tokens onto unsigned big-endian integers,
whose byte order is their numeric order.
"""

from __future__ import annotations

import struct

from ringkv.errors import CorruptRecord

DATA_PREFIX = b"d"
DATA_END = b"e"  # just past every data key
# The newest cell timestamp this store has written (storage/store.py): u64 wall_us, u32 logical.
NEWEST_KEY = b"w"
_TOKEN = struct.Struct(">Q")
_TOKEN_OFFSET = 2**63
MAX_TOKEN = 2**63 - 1


def keyspace_prefix(keyspace: str) -> bytes:
    name = keyspace.encode()
    return DATA_PREFIX + bytes([len(name)]) + name


def data_key(keyspace: str, token: int, key: bytes) -> bytes:
    return keyspace_prefix(keyspace) + _TOKEN.pack(token + _TOKEN_OFFSET) + key


def parse_data_key(raw: bytes) -> tuple[str, int, bytes]:
    """(keyspace, token, key) of a data key."""
    if len(raw) < 2 or raw[:1] != DATA_PREFIX:
        raise CorruptRecord(f"not a data key: {raw[:16]!r}")
    name_len = raw[1]
    token_at = 2 + name_len
    if len(raw) < token_at + _TOKEN.size:
        raise CorruptRecord(f"truncated data key: {raw[:16]!r}")
    keyspace = raw[2:token_at].decode()
    (biased,) = _TOKEN.unpack_from(raw, token_at)
    return keyspace, biased - _TOKEN_OFFSET, raw[token_at + _TOKEN.size :]


def token_bound(keyspace: str, token: int) -> bytes:
    """The smallest data key of ``keyspace`` with this token."""
    return keyspace_prefix(keyspace) + _TOKEN.pack(token + _TOKEN_OFFSET)


def keyspace_end(keyspace: str) -> bytes:
    """A bound just past every data key of ``keyspace``."""
    # Keyspace names are ASCII, so the last prefix byte is < 0xFF: bumping it
    # gives the first key after the keyspace.
    prefix = keyspace_prefix(keyspace)
    return prefix[:-1] + bytes([prefix[-1] + 1])


def range_bounds(keyspace: str, start_exclusive: int, end_inclusive: int) -> tuple[bytes, bytes]:
    """Engine bounds [lo, hi) for tokens in (start_exclusive, end_inclusive], not wrapping."""
    lo = token_bound(keyspace, start_exclusive + 1)
    hi = keyspace_end(keyspace) if end_inclusive >= MAX_TOKEN else token_bound(keyspace, end_inclusive + 1)
    return lo, hi
