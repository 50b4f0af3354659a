"""When each range was last repaired, kept in the node's own LevelDB.

Tombstone GC asks it (``session.repaired_since``) and the scheduler and
``/v1/status`` read it, so it survives restarts: a node that forgot its
repairs would keep tombstones until the next repair (safe, but wasteful);
one that invented them would purge too early, so only a repair that
completed with every replica records a time.

Record layout (``a`` for anti-entropy; ``d`` data, ``h`` hints and the
transactional tier's ``p m g r x`` are taken)::

    key   = b"a" | u8 len(keyspace) | keyspace | u64 (start + 2**63) | u64 (end + 2**63)
    value = u64 wall_us when the repair began
"""

from __future__ import annotations

import logging
import struct

from ringkv.repair.session import RangeKey
from ringkv.storage.store import LocalStore

log = logging.getLogger(__name__)

PREFIX = b"a"
_TOKENS = struct.Struct(">QQ")
_WALL = struct.Struct(">Q")
_OFFSET = 2**63
# More ranges than any ring holds (256 tokens x 1,000 nodes x keyspaces).
MAX_RECORDS = 1_000_000


def _key(key: RangeKey) -> bytes:
    keyspace, start, end = key
    name = keyspace.encode()
    return PREFIX + bytes([len(name)]) + name + _TOKENS.pack(start + _OFFSET, end + _OFFSET)


def _parse(raw: bytes, value: bytes) -> tuple[RangeKey, int]:
    name_len = raw[1]
    keyspace = raw[2:2 + name_len].decode()
    start, end = _TOKENS.unpack(raw[2 + name_len:])
    (wall_us,) = _WALL.unpack(value)
    return (keyspace, start - _OFFSET, end - _OFFSET), wall_us


class RepairHistory:
    def __init__(self, store: LocalStore) -> None:
        self._store = store
        self.last: dict[RangeKey, int] = {}

    async def load(self) -> None:
        items = await self._store.scan_raw(PREFIX, bytes([PREFIX[0] + 1]), limit=MAX_RECORDS)
        for raw, value in items:
            try:
                key, wall_us = _parse(raw, value)
            except (IndexError, struct.error, UnicodeDecodeError):
                log.error("ignoring a corrupt repair-history record %r", raw[:64])
                continue
            self.last[key] = wall_us

    async def record(self, key: RangeKey, wall_us: int) -> None:
        """The range was repaired with every replica, as of ``wall_us`` (never moves back)."""
        if self.last.get(key, -1) >= wall_us:
            return
        self.last[key] = wall_us
        await self._store.write_raw([(_key(key), _WALL.pack(wall_us))], [])
