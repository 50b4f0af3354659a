"""Streaming ranges between replicas (shell).

The bootstrap's data path: for each ``StreamRange`` of the plan, page
through a source replica with the ordinary SCAN verb (raw cells,
tombstones included, in (token, key) order) and merge every cell into the
local store (last write wins, so a cell that a pending write brought first
is never overwritten by an older one). A page is applied and committed
before the next is asked for, and the cursor is the last (token, key)
applied: when a source fails (dies, times out, or breaks the link) the
stream goes on from that cursor at the next source, not from the start.

A leaving node runs the same loop the other way round (``leave_plan``):
the source is its own replica and each page is written to the range's
``target`` with the WRITE verb; a failed page is sent again.

Throughput is paced (``plan.Pacer``, ``streaming.throughput_mib_s``) with
``clock.sleep``, so the event loop keeps serving; the source's scan runs
off its loop in the store's reader thread.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Protocol

from ringkv.clock import Clock
from ringkv.errors import RingKVError
from ringkv.limits import SCAN_ITEM_OVERHEAD_BYTES
from ringkv.messages import ScanReply
from ringkv.storage.store import LocalStore
from ringkv.topology.plan import Pacer, StreamProgress, StreamRange
from ringkv.versioning import Cell

log = logging.getLogger(__name__)

# A range is given up on (for this pass) after this many failed pages in a
# row, counting every source; the bootstrap then waits and tries again.
MAX_FAILURES_PER_RANGE = 6
RETRY_BACKOFF_S = 0.5  # the wait after a failed page, doubled per failure (capped)
MAX_RETRY_BACKOFF_S = 5.0


class StreamFailed(Exception):
    """A range could not be streamed from any of its sources."""


class Replicas(Protocol):
    """The replica verbs streaming uses (``replica.router.ReplicaRouter``)."""

    async def scan(
        self, node_id: str, keyspace: str, after: tuple[int, bytes | None], end_token: int,
        limit: int, timeout_s: float,
    ) -> ScanReply: ...

    def write_future(
        self, node_id: str, keyspace: str, token: int, key: bytes, cell: Cell, timeout_s: float
    ) -> asyncio.Future[None]: ...


class Streamer:
    """Streams a plan's ranges into the local store, one page at a time."""

    def __init__(
        self,
        *,
        replicas: Replicas,
        store: LocalStore,
        clock: Clock,
        is_alive: Callable[[str], bool],
        throughput_mib_s: float,
        page_cells: int,
        timeout_s: float,
        progress: StreamProgress,
    ) -> None:
        self._replicas = replicas
        self._store = store
        self._clock = clock
        self._is_alive = is_alive
        self._pacer = Pacer(throughput_mib_s * 1024 * 1024)
        self._page_cells = page_cells
        self._timeout_s = timeout_s
        self.progress = progress
        # Where each range's stream stands: the last (token, key) applied. A
        # range tried again (after StreamFailed) goes on from here.
        self._cursors: dict[StreamRange, tuple[int, bytes | None]] = {}

    async def run(self, plan: Sequence[StreamRange]) -> None:
        """Stream every range of ``plan``, in order; raise StreamFailed if one cannot be."""
        for stream_range in plan:
            await self.stream_range(stream_range)
            self.progress.ranges_done += 1
        self.progress.source = None

    async def stream_range(self, stream_range: StreamRange) -> None:
        keyspace, end = stream_range.keyspace, stream_range.end
        cursor = self._cursors.get(stream_range, (stream_range.start, None))
        sources = list(stream_range.sources)
        if not sources:
            raise StreamFailed(f"range {stream_range.describe()} has no source replica")
        at = 0  # index of the current source
        failures = 0
        while True:
            source = self._next_source(sources, at)
            at = sources.index(source)
            self.progress.source = source
            try:
                reply = await self._replicas.scan(
                    source, keyspace, cursor, end, self._page_cells, self._timeout_s)
                nbytes = await self._apply(stream_range.target, keyspace, reply)
            except (RingKVError, OSError, TimeoutError) as exc:
                failures += 1
                if failures >= MAX_FAILURES_PER_RANGE:
                    raise StreamFailed(
                        f"range {stream_range.describe()}: {failures} pages failed in a row "
                        f"(last from {source}: {exc})") from None
                log.warning("streaming %s from %s broke at token %d (%s); going on from "
                            "the next replica", stream_range.describe(), source, cursor[0], exc)
                self.progress.fallbacks += 1
                at = (at + 1) % len(sources)
                await self._clock.sleep(
                    min(MAX_RETRY_BACKOFF_S, RETRY_BACKOFF_S * 2 ** (failures - 1)))
                continue
            failures = 0
            if reply.items:
                last_token, last_key, _ = reply.items[-1]
                cursor = (last_token, last_key)
                self._cursors[stream_range] = cursor
            delay_s = self._pacer.after(self._clock.monotonic_s(), nbytes)
            if delay_s > 0:
                await self._clock.sleep(delay_s)
            if not reply.items or (not reply.truncated and len(reply.items) < self._page_cells):
                return  # the source's answer covered the rest of the range

    def _next_source(self, sources: list[str], at: int) -> str:
        """The source at ``at``, or the next one believed alive (any, if none is)."""
        for step in range(len(sources)):
            candidate = sources[(at + step) % len(sources)]
            if self._is_alive(candidate):
                return candidate
        return sources[at % len(sources)]

    async def _apply(self, target: str | None, keyspace: str, reply: ScanReply) -> int:
        """Merge a page into the store (or, with a ``target``, write it to that
        replica) and wait for its commit; its size in bytes."""
        commits = []
        nbytes = 0
        for token, key, cell in reply.items:
            if target is None:
                commits.append(self._store.apply_future(keyspace, token, key, cell))
            else:
                commits.append(self._replicas.write_future(
                    target, keyspace, token, key, cell, self._timeout_s))
            nbytes += len(key) + len(cell.value) + SCAN_ITEM_OVERHEAD_BYTES
        if commits:
            await asyncio.gather(*commits)
        self.progress.cells += len(reply.items)
        self.progress.bytes += nbytes
        return nbytes
