"""What a replica does when a coordinator asks it something.

``LocalReplica`` serves writes, reads, digests and range scans from this
node's ``LocalStore``. The coordinator calls it directly for the node's own
replica; the internode handler calls it for requests from other nodes, so a
local and a remote replica behave exactly alike.
"""

from __future__ import annotations

import asyncio

from ringkv.errors import BadRequest
from ringkv.limits import MAX_SCAN_ITEMS, MAX_SCAN_REPLY_BYTES, SCAN_ITEM_OVERHEAD_BYTES
from ringkv.messages import ScanReply
from ringkv.storage.store import LocalStore
from ringkv.versioning import Cell, check_timestamp


class LocalReplica:
    def __init__(self, store: LocalStore) -> None:
        self.store = store

    def write_future(
        self, keyspace: str, token: int, key: bytes, cell: Cell
    ) -> asyncio.Future[None]:
        """Merge ``cell`` (LWW); the future resolves once the result is committed.

        The cell is visible to reads at once (the store serves pending
        writes); the future is the write's group commit.
        """
        try:
            check_timestamp(cell.ts)
        except ValueError as exc:
            raise BadRequest(str(exc), field="timestamp") from None
        return self.store.apply_future(keyspace, token, key, cell)

    def read(self, keyspace: str, token: int, key: bytes) -> Cell | None:
        return self.store.read(keyspace, token, key)

    async def scan(
        self,
        keyspace: str,
        after: tuple[int, bytes | None],
        end_token: int,
        limit: int,
    ) -> ScanReply:
        """Cells with (token, key) > ``after`` and token <= ``end_token``, in order.

        ``after = (t, None)`` excludes every key of token t. The reply is
        marked truncated when it stops short of ``limit`` for its own bounds.
        Those bounds hold whatever the caller asks: MAX_SCAN_ITEMS items and
        about MAX_SCAN_REPLY_BYTES, so the reply fits one frame (ringkv.limits).
        """
        capped = max(1, min(limit, MAX_SCAN_ITEMS))
        after_token, after_key = after
        if after_key is not None:
            # Finish the keys that share after_token first, then move on.
            same = await self.store.scan(keyspace, after=(after_token, after_key), limit=capped)
            found = [item for item in same if item.token <= end_token][:capped]
        elif after_token >= end_token:
            found = []
        else:
            found = await self.store.scan_range(keyspace, after_token, end_token, limit=capped)
        items: list[tuple[int, bytes, Cell]] = []
        size = 0
        for item in found:
            size += len(item.key) + len(item.cell.value) + SCAN_ITEM_OVERHEAD_BYTES
            if items and size > MAX_SCAN_REPLY_BYTES:
                return ScanReply(items, truncated=True)
            items.append((item.token, item.key, item.cell))
        return ScanReply(items, truncated=len(items) == capped < limit)
