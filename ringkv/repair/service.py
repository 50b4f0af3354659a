"""Anti-entropy repair on a node: the shell around ``repair/session.py``.

``RepairService`` runs a repair (``begin`` checks and claims, ``run`` carries
it out range by range), serves its two internode verbs, and runs the built-in
scheduler. For one range it:

1. counts the range's cells (once; later runs reuse the count) to pick the
   tree depth, then builds this node's Merkle tree while every peer builds
   its own (``repair.tree``); trees are built by paged scans off the event
   loop, throttled to ``repair.scan_rate_mib_s``;
2. diffs the trees (``session.pull_plan``) and pulls the cells of the
   sub-ranges where peers differ, from one peer per distinct version, through
   the existing replica ``SCAN`` verb, merging them into the local store by
   last-write-wins;
3. rebuilds its own tree if it pulled anything, and asks each peer to pull
   from this node the sub-ranges where that peer still differs
   (``session.push_plan``, over ``repair.sync``); once every peer has, a
   whole ring range is recorded as repaired here and then, by a second
   ``repair.sync`` with nothing to pull, on every peer.

A range counts as repaired as of when its trees began, less the write
timeout: a write older than that is on every replica that acknowledged it
before the trees were built, so the trees saw it.

Only eventual keyspaces are repaired; transactional keyspaces' replicas are
Paxos groups whose logs keep them in step.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

from ringkv import messages as m
from ringkv.clock import Clock
from ringkv.errors import BadRequest, ProtocolError, RepairRunning, ReplicaDown, RingKVError
from ringkv.hlc import Timestamp
from ringkv.limits import SCAN_ITEM_OVERHEAD_BYTES
from ringkv.net.rpc import Requester
from ringkv.repair.history import RepairHistory
from ringkv.repair.merkle import MerkleBuilder, MerkleTree, TokenRange, TreeMismatch, range_contains, scan_pieces
from ringkv.repair.session import (
    RangeJob,
    RepairSchedule,
    down_peers,
    plan,
    pull_plan,
    push_plan,
    ring_range_of,
    tree_depth,
)
from ringkv.replica.internode import InternodeReplicas
from ringkv.replica.local import LocalReplica
from ringkv.ring import TokenRing
from ringkv.storage.store import LocalStore
from ringkv.versioning import Cell

log = logging.getLogger(__name__)

PAGE_CELLS = 500  # cells per scan page: the unit of work between throttle sleeps
MAX_PAGES = 10_000_000  # bounds every paging loop (5e9 cells)
MIB = 1024 * 1024
# Tree builds served to peers at once; more wait their turn.
SERVED_BUILDS = 2

Fetch = Callable[[tuple[int, bytes | None], int, int], Awaitable[m.ScanReply]]
OnEvent = Callable[[dict[str, Any]], Awaitable[None]]


class RepairService:
    def __init__(
        self,
        node_id: str,
        store: LocalStore,
        replica: LocalReplica,
        history: RepairHistory,
        clock: Clock,
        rng: random.Random,
        *,
        ring: Callable[[], TokenRing],
        keyspaces: Callable[[], Mapping[str, int]],
        is_alive: Callable[[str], bool],
        requester: Callable[[], Requester | None],
        observe: Callable[[Timestamp], Any],
        interval_s: float,
        scheduled: bool,
        scan_rate_mib_s: float,
        request_timeout_s: float,
        in_flight_margin_s: float,
    ) -> None:
        self.node_id = node_id
        self._store = store
        self._replica = replica
        self.history = history
        self._clock = clock
        self._rng = rng
        self._ring = ring
        self._keyspaces = keyspaces  # eventual keyspace -> replication factor
        self._is_alive = is_alive
        self._requester = requester
        self._observe = observe
        self.schedule = RepairSchedule(interval_s)
        self.scheduled = scheduled
        self._rate_bytes_s = scan_rate_mib_s * MIB
        self._timeout_s = request_timeout_s
        self._margin_us = int(in_flight_margin_s * 1_000_000)
        self._served = asyncio.Semaphore(SERVED_BUILDS)
        self._cell_counts: dict[tuple[str, TokenRange], int] = {}
        self._task: asyncio.Task[None] | None = None
        self.current: dict[str, Any] | None = None  # the run in progress
        self.last_run: dict[str, Any] | None = None
        self.totals = {"runs": 0, "ranges_compared": 0, "ranges_differed": 0,
                       "cells_streamed": 0, "ranges_failed": 0}

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        if self.scheduled and self._task is None:
            self._task = asyncio.create_task(self._schedule_loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    # -- running a repair ----------------------------------------------------------

    def begin(self, keyspace: str | None = None, token_range: TokenRange | None = None,
              *, trigger: str = "manual") -> list[RangeJob]:
        """Check a repair may start, and claim the node for it (``run`` releases it).

        Refuses with ``RepairRunning`` while one runs, ``BadRequest`` for an
        unknown keyspace or a range this node holds nothing of, and
        ``ReplicaDown`` naming the replicas that are not alive.
        """
        if self.current is not None:
            raise RepairRunning(
                f"a {self.current['trigger']} repair is already running on {self.node_id} "
                f"({self.current['ranges_done']}/{self.current['ranges_total']} ranges done); "
                "one repair at a time per node", ranges_done=self.current["ranges_done"],
                ranges_total=self.current["ranges_total"])
        try:
            jobs = plan(self._ring(), self.node_id, self._keyspaces(), keyspace=keyspace,
                        token_range=token_range)
        except ValueError as exc:
            raise BadRequest(str(exc), field="keyspace") from None
        if not jobs:
            raise BadRequest(f"node {self.node_id} replicates nothing in range "
                             f"{token_range} of {keyspace or 'any keyspace'}", field="range")
        down = down_peers(jobs, self._is_alive)
        if down:
            raise ReplicaDown(f"cannot repair: replica(s) {', '.join(down)} are down; repair "
                              "needs every replica of the ranges it covers", down=down)
        self._claim(jobs, trigger)
        return jobs

    def _claim(self, jobs: list[RangeJob], trigger: str) -> None:
        self.current = {"trigger": trigger, "started_us": self._clock.wall_us(),
                        "ranges_total": len(jobs), "ranges_done": 0, "ranges_compared": 0,
                        "ranges_differed": 0, "cells_streamed": 0, "ranges_failed": 0,
                        "keyspaces": sorted({job.keyspace for job in jobs})}

    async def run(self, jobs: list[RangeJob], on_event: OnEvent | None = None) -> dict[str, Any]:
        """Repair ``jobs`` one range at a time (after ``begin``); the report at the end.

        A range that fails (a peer unreachable, a timeout) is reported and
        not recorded as repaired; the others go on.
        """
        assert self.current is not None, "begin() first"
        progress = self.current
        started_s = self._clock.monotonic_s()
        failures: list[dict[str, Any]] = []
        try:
            for job in jobs:
                event: dict[str, Any] = {"event": "range", "keyspace": job.keyspace,
                                         "range": list(job.token_range), "peers": list(job.peers)}
                try:
                    differed, cells = await self._repair_range(job)
                except (RingKVError, TreeMismatch, OSError) as exc:
                    message = getattr(exc, "message", None) or str(exc)
                    log.warning("repair of %s %s failed: %s", job.keyspace, job.token_range,
                                message)
                    progress["ranges_failed"] += 1
                    failures.append({"keyspace": job.keyspace, "range": list(job.token_range),
                                     "error": message})
                    event.update(ok=False, error=message)
                else:
                    progress["ranges_compared"] += 1
                    progress["ranges_differed"] += int(differed)
                    progress["cells_streamed"] += cells
                    event.update(ok=True, differed=differed, cells_streamed=cells)
                progress["ranges_done"] += 1
                event.update(done=progress["ranges_done"], total=progress["ranges_total"])
                if on_event is not None:
                    await on_event(event)
        finally:
            self.current = None
            for name in ("ranges_compared", "ranges_differed", "cells_streamed", "ranges_failed"):
                self.totals[name] += progress[name]
            self.totals["runs"] += 1
        report = {**progress, "ok": not failures, "failures": failures[:100],
                  "duration_s": round(self._clock.monotonic_s() - started_s, 3)}
        del report["ranges_done"]
        self.last_run = {**report, "finished_us": self._clock.wall_us()}
        log.info("%s repair: %d ranges compared, %d differed, %d cells streamed, %d failed",
                 report["trigger"], report["ranges_compared"], report["ranges_differed"],
                 report["cells_streamed"], report["ranges_failed"])
        return report

    async def _repair_range(self, job: RangeJob) -> tuple[bool, int]:
        """(whether any replica differed, cells streamed) for one range."""
        began_us = self._clock.wall_us() - self._margin_us
        if not job.peers:  # the only replica: nothing to compare with
            if job.full:
                await self.history.record(job.key, began_us)
            return False, 0
        requester = self._need_requester()
        count_key = (job.keyspace, job.token_range)
        if count_key not in self._cell_counts:
            self._cell_counts[count_key] = await self._count(job.keyspace, job.token_range)
        depth = tree_depth(self._cell_counts[count_key], job.token_range)
        request = m.RepairTreeRequest(job.keyspace, job.token_range, job.ring_range, depth)
        asks = [requester.request(peer, m.REPAIR_TREE, request.to_wire(), self._timeout_s)
                for peer in job.peers]
        results = await asyncio.gather(self._build_tree(job.keyspace, job.token_range, depth),
                                       *asks, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        local = results[0]
        assert isinstance(local, MerkleTree)
        self._cell_counts[count_key] = local.cells
        trees = {peer: MerkleTree.from_wire(wire) for peer, wire in zip(job.peers, results[1:])}
        pulls = pull_plan(local, trees)
        cells = 0
        for peer, ranges in pulls.items():
            cells += await self._pull(peer, job.keyspace, ranges)
        # Rebuilt after pulling, our tree says which peers still lack something.
        merged = await self._build_tree(job.keyspace, job.token_range, depth) if pulls else local
        pushes = push_plan(merged, trees)
        cells += await self._sync_peers(job, {peer: pushes.get(peer, []) for peer in job.peers},
                                        None)
        if job.full:
            # Every replica now holds what any held when the trees were built:
            # only now may any of them count the range as repaired (a peer
            # that recorded it while another's sync failed could purge a
            # tombstone that one still lacks).
            await self.history.record(job.key, began_us)
            await self._sync_peers(job, {peer: [] for peer in job.peers}, began_us)
        return bool(pulls or pushes), cells

    async def _sync_peers(self, job: RangeJob, pieces: dict[str, list[TokenRange]],
                          repaired_at_us: int | None) -> int:
        """Send every peer its ``repair.sync``; the cells they pulled, or the first failure."""
        requester = self._need_requester()
        replies = await asyncio.gather(
            *(requester.request(peer, m.REPAIR_SYNC, m.RepairSyncRequest(
                job.keyspace, job.ring_range, pieces[peer], repaired_at_us).to_wire(),
                self._timeout_s) for peer in job.peers), return_exceptions=True)
        cells = 0
        for reply in replies:
            if isinstance(reply, BaseException):
                raise reply
            if not isinstance(reply, dict) or not isinstance(reply.get("n"), int):
                raise ProtocolError("a repair sync reply must be {n: cells}")
            cells += reply["n"]
        return cells

    def _need_requester(self) -> Requester:
        requester = self._requester()
        if requester is None:
            raise RingKVError("this node has no internode transport to reach its peers")
        return requester

    # -- scanning, trees and streaming ---------------------------------------------------

    async def _pages(self, fetch: Fetch, token_range: TokenRange) -> AsyncIterator[
            list[tuple[int, bytes, Cell]]]:
        """The range's cells in (token, key) range order, a page at a time."""
        for start, end in scan_pieces(token_range):
            after: tuple[int, bytes | None] = (start, None)
            for _ in range(MAX_PAGES):
                reply = await fetch(after, end, PAGE_CELLS)
                for token, _key, _cell in reply.items:
                    if not start < token <= end:
                        raise ProtocolError(f"scan returned token {token} outside ({start}, {end}]")
                if reply.items:
                    yield reply.items
                if not reply.truncated and len(reply.items) < PAGE_CELLS:
                    break
                token, key, _cell = reply.items[-1]
                after = (token, key)

    async def _local_pages(self, keyspace: str, token_range: TokenRange) -> AsyncIterator[
            list[tuple[int, bytes, Cell]]]:
        """Local cells, throttled to scan_rate_mib_s (the scan itself runs off the loop)."""
        async def fetch(after: tuple[int, bytes | None], end: int, limit: int) -> m.ScanReply:
            return await self._replica.scan(keyspace, after, end, limit)

        async for page in self._pages(fetch, token_range):
            yield page
            size = sum(len(k) + len(c.value) + SCAN_ITEM_OVERHEAD_BYTES for _t, k, c in page)
            await self._clock.sleep(size / self._rate_bytes_s)

    async def _count(self, keyspace: str, token_range: TokenRange) -> int:
        count = 0
        async for page in self._local_pages(keyspace, token_range):
            count += len(page)
        return count

    async def _build_tree(self, keyspace: str, token_range: TokenRange, depth: int) -> MerkleTree:
        builder = MerkleBuilder(token_range, depth)
        async for page in self._local_pages(keyspace, token_range):
            for token, key, cell in page:
                builder.add(token, key, cell)
        return builder.finish()

    async def _pull(self, peer: str, keyspace: str, ranges: list[TokenRange]) -> int:
        """Merge ``peer``'s cells in ``ranges`` into the local store; how many came."""
        remote = InternodeReplicas(self._need_requester())

        async def fetch(after: tuple[int, bytes | None], end: int, limit: int) -> m.ScanReply:
            return await remote.scan(peer, keyspace, after, end, limit, self._timeout_s)

        cells = 0
        for token_range in ranges:
            async for page in self._pages(fetch, token_range):
                commits = []
                for token, key, cell in page:
                    self._observe(cell.ts)  # later local writes get later timestamps
                    commits.append(self._store.apply_future(keyspace, token, key, cell))
                await asyncio.gather(*commits)
                cells += len(page)
        return cells

    # -- the serving side --------------------------------------------------------------

    async def handle(self, from_node: str, verb: str, payload: Any) -> Any:
        if verb == m.REPAIR_TREE:
            tree_request = m.RepairTreeRequest.from_wire(payload)
            self._check_same_ring(from_node, tree_request.keyspace, tree_request.ring_range)
            async with self._served:
                try:
                    tree = await self._build_tree(tree_request.keyspace, tree_request.token_range,
                                                  tree_request.depth)
                except ValueError as exc:  # a depth the range cannot take
                    raise ProtocolError(f"cannot build that tree: {exc}") from None
            return tree.to_wire()
        if verb == m.REPAIR_SYNC:
            sync = m.RepairSyncRequest.from_wire(payload)
            self._check_same_ring(from_node, sync.keyspace, sync.ring_range)
            for piece in sync.pieces:
                if not all(range_contains(sync.ring_range, t) or t == sync.ring_range[0]
                           for t in piece):
                    raise ProtocolError(f"sync piece {piece} is outside {sync.ring_range}")
            cells = await self._pull(from_node, sync.keyspace, sync.pieces)
            if sync.repaired_at_us is not None:
                await self.history.record((sync.keyspace, *sync.ring_range), sync.repaired_at_us)
            return {"n": cells}
        raise ProtocolError(f"unknown verb {verb!r}")

    def _check_same_ring(self, from_node: str, keyspace: str, ring_range: TokenRange) -> None:
        """Both ends must see the range, and both as its replicas: otherwise their
        rings differ (a topology change is spreading) and the trees would not line up."""
        keyspaces = self._keyspaces()
        if keyspace not in keyspaces:
            raise ProtocolError(f"{keyspace!r} is not an eventual keyspace here")
        ring = self._ring()
        if not len(ring) or ring_range_of(ring, ring_range[1]) != ring_range:
            raise ProtocolError(f"range {ring_range} is not a range of this node's ring")
        replicas = ring.replicas(ring_range[1], keyspaces[keyspace])
        if self.node_id not in replicas or from_node not in replicas:
            raise ProtocolError(f"this node's ring gives range {ring_range} the replicas "
                                f"{', '.join(replicas)}")

    # -- the built-in scheduler ----------------------------------------------------------

    async def _schedule_loop(self) -> None:
        while True:
            await self._clock.sleep(self.schedule.next_check_s(self._rng))
            try:
                await self.run_due()
            except Exception:  # noqa: BLE001 - the scheduler must not die
                log.exception("scheduled repair failed")

    async def run_due(self) -> dict[str, Any] | None:
        """Repair the ranges that are due and whose replicas are all alive, oldest first."""
        if self.current is not None:
            return None
        try:
            jobs = plan(self._ring(), self.node_id, self._keyspaces())
        except ValueError:
            return None  # not on the ring
        by_key = {job.key: job for job in jobs}
        due = self.schedule.due(list(by_key), self.history.last, self._clock.wall_us())
        ready = [by_key[key] for key in due if all(self._is_alive(p) for p in by_key[key].peers)]
        if len(ready) < len(due):
            log.info("scheduled repair: %d due ranges wait for replicas that are down",
                     len(due) - len(ready))
        if not ready:
            return None
        self._claim(ready, "scheduled")
        return await self.run(ready)

    # -- views ---------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """For /v1/status: the scheduler, the run in progress, the last run, and when
        each range this node replicates was last repaired."""
        now_us = self._clock.wall_us()
        times: dict[str, list[int | None]] = {}
        ranges = []
        for keyspace, start, end, last_us in self.ranges():
            ranges.append({"keyspace": keyspace, "range": [start, end],
                           "last_repaired_us": last_us})
            times.setdefault(keyspace, []).append(last_us)
        keyspaces: dict[str, dict[str, Any]] = {}
        for keyspace, lasts in times.items():
            repaired = [t for t in lasts if t is not None]
            # The oldest repair of the keyspace, once every range has had one.
            oldest = min(repaired) if len(repaired) == len(lasts) else None
            keyspaces[keyspace] = {
                "ranges": len(lasts), "repaired": len(repaired), "oldest_repaired_us": oldest,
                "oldest_age_s": None if oldest is None else round((now_us - oldest) / 1e6, 3)}
        return {
            "scheduled": self.scheduled,
            "interval_s": self.schedule.interval_s,
            "running": None if self.current is None else dict(self.current),
            "last_run": self.last_run,
            "totals": dict(self.totals),
            "keyspaces": keyspaces,
            "ranges": ranges,
        }

    def ranges(self) -> list[tuple[str, int, int, int | None]]:
        """(keyspace, start, end, last repaired wall µs or None) of every range this node
        replicates, on the current ring."""
        try:
            jobs = plan(self._ring(), self.node_id, self._keyspaces())
        except ValueError:
            return []
        return [(job.keyspace, *job.ring_range, self.history.last.get(job.key)) for job in jobs]
