"""Size limits that depend on each other, in one place, with their relations checked (pure).

Every internode message is one frame of at most MAX_FRAME_BYTES, so every
other size bound that ends up in a frame is derived from it:

- a write (or read reply, read repair, hint replay) carries one cell: the
  largest value and the largest key, plus the message around them, must fit
  one frame, or a value the API accepted could never reach its replicas;
- a scan reply is cut by the replica at MAX_SCAN_REPLY_BYTES (by its own
  estimate of the encoded size) and MAX_SCAN_ITEMS, and must fit one frame
  with room to spare, because the estimate is an estimate.

The relations are checked when this module is imported (the way TigerBeetle
asserts relations between its constants at compile time), so changing one
number without the others fails at once, not under load.
``tests/test_limits.py`` checks the envelope estimates against real frames.
"""

from __future__ import annotations

# One internode frame (the body after the 4-byte length prefix).
MAX_FRAME_BYTES = 16 * 1024 * 1024
_FRAME_LENGTH_PREFIX_MAX = 2**32 - 1  # what the codec's u32 length prefix can say

# The highest limits.max_key_bytes / limits.max_value_bytes config accepts
# (the defaults, far lower, live in ringkv.config.LimitsConfig). Keys are
# counted in UTF-8 bytes, values in bytes of their JSON encoding.
MAX_KEY_BYTES = 65535
MAX_VALUE_BYTES = 15 * 1024 * 1024

# Everything in a one-cell message but the key and the value: frame header
# fields, the verb (codec.MAX_VERB_LEN = 128), the keyspace name (at most 255
# bytes on the wire), the token, the cell's header, expiry and CRC, and the
# msgpack type bytes. About 450 bytes at worst; this leaves generous room.
WRITE_ENVELOPE_BYTES = 4096

# A scan reply, bounded by the replica whatever the caller asks for.
MAX_SCAN_ITEMS = 10_000
MAX_SCAN_REPLY_BYTES = 8 * 1024 * 1024
# The replica's estimate of one scan item beyond its key and value: token,
# cell header, expiry, CRC, msgpack type bytes (about 45 bytes at most).
SCAN_ITEM_OVERHEAD_BYTES = 64


def _check(holds: bool, relation: str) -> None:
    # Not ``assert``: ``python -O`` would skip it, and these cost nothing.
    if not holds:
        raise AssertionError(f"ringkv.limits: {relation} does not hold")


_check(0 < MAX_FRAME_BYTES <= _FRAME_LENGTH_PREFIX_MAX, "MAX_FRAME_BYTES fits the u32 length prefix")
_check(
    MAX_KEY_BYTES + MAX_VALUE_BYTES + WRITE_ENVELOPE_BYTES <= MAX_FRAME_BYTES,
    "the largest key and value with their write envelope fit one frame",
)
# The replica stops before the item that would cross MAX_SCAN_REPLY_BYTES,
# unless it is the first: so a reply is at most MAX_SCAN_REPLY_BYTES by
# estimate, or one item, which the write relation above already fits.
_check(
    MAX_SCAN_REPLY_BYTES <= MAX_FRAME_BYTES // 2,
    "a full scan reply fills at most half a frame (room for its envelope and the estimate's error)",
)
_check(
    MAX_KEY_BYTES + MAX_VALUE_BYTES + SCAN_ITEM_OVERHEAD_BYTES + WRITE_ENVELOPE_BYTES
    <= MAX_FRAME_BYTES,
    "a scan reply of one largest item fits one frame",
)
_check(
    MAX_SCAN_ITEMS * SCAN_ITEM_OVERHEAD_BYTES <= MAX_SCAN_REPLY_BYTES,
    "MAX_SCAN_ITEMS empty items fit the scan byte budget",
)
