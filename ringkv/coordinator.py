"""The read/write path: any node coordinates any request (Dynamo §4.5).

Writes go to every live replica and are acknowledged once the consistency
level is met. A replica that is down or times out gets a hint. Reads ask one
replica for data and enough others for digests; on a mismatch the
coordinator fetches full data, reconciles, and writes the winner back to the
stale replicas before it answers (blocking read repair), so two successive
QUORUM reads never go backwards.

How the coordinator reaches a replica is behind ``ReplicaClient``: the node
itself is served from its local store, others over the internode transport.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Coroutine, Mapping
from functools import partial
from dataclasses import dataclass, field
from typing import Any, Protocol

from ringkv.clock import Clock
from ringkv.hlc import HybridLogicalClock, Timestamp
from ringkv.errors import (
    BadRequest,
    CorruptRecord,
    NotFound,
    RemoteError,
    RingKVError,
    ShuttingDown,
    Timeout,
)
from ringkv.quorum import ConsistencyLevel
from ringkv.replica import ReplicaClient, soon_of
from ringkv.replica_plan import ReplicaPlan, plan_for
from ringkv.ring import MIN_TOKEN, TokenRing, token_for
from ringkv.versioning import Cell, cell_digest, reconcile

log = logging.getLogger(__name__)

LATENCY_EWMA_WEIGHT = 0.2  # weight of the newest sample in a replica's latency estimate


@dataclass(frozen=True)
class KeyspaceSettings:
    name: str
    replication_factor: int
    default_consistency: ConsistencyLevel


class HintSink(Protocol):
    """Where the coordinator leaves writes for replicas it could not reach."""

    async def store_hint(self, target: str, keyspace: str, token: int, key: bytes, cell: Cell) -> bool:
        """Store a hint durably; False if the hint was not stored (e.g. disabled)."""


@dataclass
class Receipt:
    """What a response reports about how it was served."""

    consistency: str
    replicas: list[str]
    asked: list[str] = field(default_factory=list)
    answered: list[str] = field(default_factory=list)
    hints_stored: int = 0
    read_repair: bool = False
    repaired: list[str] = field(default_factory=list)
    speculative: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return {
            "consistency": self.consistency,
            "replicas": self.replicas,
            "asked": self.asked,
            "answered": self.answered,
            "hints_stored": self.hints_stored,
            "read_repair": self.read_repair,
            "repaired": self.repaired,
            "speculative": self.speculative,
        }


@dataclass(frozen=True)
class WriteResult:
    cell: Cell
    receipt: Receipt


@dataclass(frozen=True)
class ReadResult:
    cell: Cell | None  # the reconciled cell (possibly a tombstone or expired)
    receipt: Receipt


@dataclass(frozen=True)
class ScanPage:
    items: list[tuple[int, bytes, Cell]]  # live cells only, in token order
    next_after: tuple[int, bytes] | None  # cursor for the next page; None at the end
    receipt: Receipt


class _AckTracker:
    """Counts write acknowledgements; ``done`` resolves once the outcome is known.

    ``hints_count``: at ANY, a hint stored for a replica that failed counts
    toward ``block_for`` like an acknowledgement.
    """

    def __init__(self, block_for: int, asked: int, done: asyncio.Future[None], *,
                 hints_count: bool = False) -> None:
        self.block_for = block_for
        self.asked = asked
        self.hints_count = hints_count
        self.acked: list[str] = []
        self.hinted: list[str] = []
        self.responded = 0
        self.done = done
        if asked == 0:
            self.expire()

    def record(self, node: str, *, ok: bool, hinted: bool = False) -> None:
        self.responded += 1
        if ok:
            self.acked.append(node)
        elif hinted:
            self.hinted.append(node)
        counted = len(self.acked) + (len(self.hinted) if self.hints_count else 0)
        if counted >= self.block_for or self.responded >= self.asked:
            self.expire()

    def expire(self) -> None:
        if not self.done.done():
            self.done.set_result(None)


class LatencyWindow:
    """Recent replica read latencies, to decide when to retry speculatively.

    The percentile is recomputed every ``refresh_every`` samples rather than
    on every read: sorting on the hot path would cost more than it saves.
    """

    def __init__(self, size: int = 1000, refresh_every: int = 100) -> None:
        self._samples: deque[float] = deque(maxlen=size)
        self._refresh_every = refresh_every
        self._since_refresh = 0
        self._cached: dict[float, float] = {}

    def record(self, seconds: float) -> None:
        self._samples.append(seconds)
        self._since_refresh += 1
        if self._since_refresh >= self._refresh_every:
            self._since_refresh = 0
            self._cached.clear()

    def percentile(self, pct: float) -> float | None:
        if len(self._samples) < 20:  # too few samples to trust
            return None
        if pct not in self._cached:
            ordered = sorted(self._samples)
            self._cached[pct] = ordered[min(len(ordered) - 1, int(len(ordered) * pct / 100))]
        return self._cached[pct]


class Coordinator:
    def __init__(
        self,
        node_id: str,
        *,
        ring: Callable[[], TokenRing],
        is_alive: Callable[[str], bool],
        replicas: ReplicaClient,
        keyspaces: Callable[[], Mapping[str, KeyspaceSettings]],
        clock: Clock,
        hlc: HybridLogicalClock,
        hints: HintSink | None = None,
        read_timeout_s: float = 2.0,
        write_timeout_s: float = 2.0,
        speculative_retry_percentile: float = 99.0,
        speculative_retry_min_s: float = 0.02,
    ) -> None:
        self.node_id = node_id
        self._ring = ring
        self._is_alive = is_alive
        self._replicas = replicas
        # Requests wait on several replicas at once: through futures, not a task each.
        self._write_soon = soon_of(replicas, "write")
        self._read_soon = soon_of(replicas, "read")
        self._digest_soon = soon_of(replicas, "digest")
        self._keyspaces = keyspaces
        self._clock = clock
        self._hlc = hlc
        self._hints = hints
        self._read_timeout_s = read_timeout_s
        self._write_timeout_s = write_timeout_s
        self._spec_pct = speculative_retry_percentile
        self._spec_min_s = speculative_retry_min_s
        self._replica_latency_s: dict[str, float] = {}
        self._latencies = LatencyWindow()
        # Hints for failed writes are stored after the client may have its
        # answer; keep a reference so they are not garbage collected mid-flight.
        self._background: set[asyncio.Task[None]] = set()

    # -- planning ------------------------------------------------------------

    def keyspace(self, name: str) -> KeyspaceSettings:
        settings = self._keyspaces().get(name)
        if settings is None:
            raise NotFound(f"keyspace {name!r} does not exist", keyspace=name)
        return settings

    def plan(
        self, keyspace: str, key: bytes, consistency: ConsistencyLevel | None, *, write: bool
    ) -> ReplicaPlan:
        settings = self.keyspace(keyspace)
        level = consistency or settings.default_consistency
        if level is ConsistencyLevel.ANY and not write:
            raise BadRequest("consistency ANY is only valid for writes", field="consistency")
        return plan_for(
            self._ring(),
            keyspace,
            token_for(key),
            settings.replication_factor,
            level,
            self._is_alive,
            write=write,
        )

    def new_timestamp(self) -> Timestamp:
        return self._hlc.now()

    # -- writes --------------------------------------------------------------

    async def write(
        self, keyspace: str, key: bytes, cell: Cell, consistency: ConsistencyLevel | None
    ) -> WriteResult:
        plan = self.plan(keyspace, key, consistency, write=True)
        receipt = Receipt(plan.consistency.value, list(plan.natural), asked=list(plan.live))
        for target in plan.down:
            if await self._store_hint(target, plan, key, cell):
                receipt.hints_stored += 1
        loop = asyncio.get_running_loop()
        acks = _AckTracker(plan.block_for, len(plan.live), loop.create_future(),
                           hints_count=plan.consistency is ConsistencyLevel.ANY)
        for target in plan.live:
            # Every replica, this node's own included, answers through a
            # future (the local one is its group commit): no task per replica.
            answer = self._write_soon(
                target, plan.keyspace, plan.token, key, cell, self._write_timeout_s
            )
            answer.add_done_callback(partial(self._write_answered, target, plan, key, cell, acks))
        if not acks.done.done():
            timer = loop.call_later(self._write_timeout_s, acks.expire)
            try:
                await acks.done
            finally:
                timer.cancel()
        receipt.answered = list(acks.acked)
        receipt.hints_stored += len(acks.hinted)
        if len(acks.acked) >= plan.block_for:
            return WriteResult(cell, receipt)
        if plan.consistency is ConsistencyLevel.ANY and receipt.hints_stored > 0:
            return WriteResult(cell, receipt)
        raise Timeout(
            f"write at {plan.consistency.value} got {len(acks.acked)} of {plan.block_for} "
            f"required acknowledgements in time",
            consistency=plan.consistency.value,
            required=plan.block_for,
            received=len(acks.acked),
            write=True,
        )

    def _write_answered(
        self,
        target: str,
        plan: ReplicaPlan,
        key: bytes,
        cell: Cell,
        acks: _AckTracker,
        answer: asyncio.Future[None],
    ) -> None:
        error = (
            ShuttingDown(f"node {self.node_id} is stopping") if answer.cancelled()
            else answer.exception()
        )
        if error is None:
            acks.record(target, ok=True)
            return
        if isinstance(error, RingKVError):
            log.debug("write to %s failed: %s", target, error)
        else:
            log.error("write to %s failed unexpectedly", target, exc_info=error)
        if target == self.node_id or self._hints is None:
            # This node's own failed write is not hinted: it has no later replay.
            acks.record(target, ok=False)
            return
        # A replica that did not acknowledge gets a hint, even if the client
        # was already answered (Cassandra does the same). The hint is stored
        # before the failure is counted, so that at ANY the answer can count it.
        self._spawn(self._hint_failed_write(target, plan, key, cell, acks))

    async def _hint_failed_write(
        self, target: str, plan: ReplicaPlan, key: bytes, cell: Cell, acks: _AckTracker
    ) -> None:
        hinted = await self._store_hint(target, plan, key, cell)
        acks.record(target, ok=False, hinted=hinted)

    async def _store_hint(self, target: str, plan: ReplicaPlan, key: bytes, cell: Cell) -> bool:
        if self._hints is None:
            return False
        try:
            return await self._hints.store_hint(target, plan.keyspace, plan.token, key, cell)
        except RingKVError:
            log.exception("could not store hint for %s", target)
            return False

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- reads ---------------------------------------------------------------

    async def read(
        self, keyspace: str, key: bytes, consistency: ConsistencyLevel | None
    ) -> ReadResult:
        plan = self.plan(keyspace, key, consistency, write=False)
        ordered = self._by_proximity(plan.live)
        targets = ordered[: plan.block_for]
        spares = ordered[plan.block_for :]
        receipt = Receipt(plan.consistency.value, list(plan.natural), asked=list(targets))
        corrupt: list[str] = []
        results = await self._gather_reads(plan, key, targets, spares, receipt, corrupt)
        cells = [cell for _, cell in results]
        winner = None
        for cell in cells:
            winner = reconcile(winner, cell)
        # A replica whose record failed its checksum is stale too: the repair
        # write replaces the corrupt record (LocalStore.apply).
        stale = [node for node, cell in results if cell != winner] + corrupt
        if stale and winner is not None:
            receipt.read_repair = True
            await self._repair(plan, key, winner, stale, receipt)
        return ReadResult(winner, receipt)

    async def _gather_reads(
        self,
        plan: ReplicaPlan,
        key: bytes,
        targets: list[str],
        spares: list[str],
        receipt: Receipt,
        corrupt: list[str],
    ) -> list[tuple[str, Cell | None]]:
        """Data from block_for replicas: one data read, digests from the rest.

        If the digests disagree with the data, fetch full data from every
        replica that answered. A replica that is slower than the speculative
        retry threshold is backed up by a data read to a spare replica.
        Replicas that reported a corrupt record are added to ``corrupt``.
        """
        data_node, digest_nodes = targets[0], targets[1:]
        if targets == [self.node_id]:
            # Fast path: the one replica needed is this node. If it cannot
            # answer (a corrupt record, say), the general path below asks
            # again and falls back to the spare replicas.
            try:
                cell = await self._replicas.read(
                    data_node, plan.keyspace, plan.token, key, self._read_timeout_s
                )
            except RingKVError as exc:
                log.debug("local read failed, asking other replicas: %s", exc)
            else:
                receipt.answered = [data_node]
                return [(data_node, cell)]
        clock = self._clock
        keyspace, token, timeout_s = plan.keyspace, plan.token, self._read_timeout_s
        start = clock.monotonic_s()
        deadline = start + timeout_s
        # answer -> (node, is it a data read, when it was asked)
        asked: dict[asyncio.Future[Any], tuple[str, bool, float]] = {}
        waiting: list[asyncio.Future[Any]] = []  # answers not yet taken in, in launch order
        data: dict[str, Cell | None] = {}
        digests: dict[str, bytes] = {}

        def ask(node: str, is_data: bool) -> None:
            soon = self._read_soon if is_data else self._digest_soon
            answer = soon(node, keyspace, token, key, timeout_s)
            asked[answer] = (node, is_data, clock.monotonic_s())
            waiting.append(answer)

        def ask_spare() -> None:
            node = spares.pop(0)
            receipt.speculative.append(node)
            receipt.asked.append(node)
            ask(node, True)

        speculated = False
        try:
            # This node's own replica answers at once (no task, no network), so
            # it is usually in before the first wait.
            ask(data_node, True)
            for node in digest_nodes:
                ask(node, False)
            while True:
                # Take in what has arrived, in launch order (not completion
                # order), so that the same inputs always give the same run.
                still: list[asyncio.Future[Any]] = []
                for answer in waiting:
                    if not answer.done():
                        still.append(answer)
                        continue
                    node, is_data, asked_at = asked[answer]
                    error = answer.exception()
                    if error is not None:
                        if _is_corrupt_record(error) and node not in corrupt:
                            corrupt.append(node)
                        self._note_latency(node, timeout_s)  # a failure ranks last
                        continue
                    # Timed from its own request: a speculative answer's time
                    # must not include the wait before it was asked, or every
                    # speculation would raise the next threshold.
                    elapsed = clock.monotonic_s() - asked_at
                    self._latencies.record(elapsed)
                    self._note_latency(node, elapsed)
                    if is_data:
                        data[node] = answer.result()
                    else:
                        digests[node] = answer.result()
                waiting = still
                if len(data) + len(digests) >= plan.block_for:
                    break
                if not waiting:
                    # Everyone asked has answered or failed; use a spare if any.
                    if not spares:
                        break
                    ask_spare()
                    continue
                now = clock.monotonic_s()
                if now >= deadline:
                    break
                wait_s = deadline - now
                spec_s = self._speculative_after_s() if spares and not speculated else None
                if spec_s is not None:
                    wait_s = min(wait_s, max(0.0, start + spec_s - now))
                if not await _any_done(waiting, wait_s) and spec_s is not None:
                    # Slower than the speculative threshold: back it up (Dean's hedged request).
                    speculated = True
                    ask_spare()
        finally:
            now = clock.monotonic_s()
            for answer in waiting:
                if not answer.done():
                    answer.cancel()
                    # It kept us waiting at least this long. Counting that (as
                    # Cassandra's dynamic snitch counts timeouts) stops a replica
                    # that is UP but not answering from being asked first forever.
                    self._note_latency(asked[answer][0], now - asked[answer][2])
                elif not answer.cancelled():
                    answer.exception()  # mark retrieved
        answered = len(data) + len(digests)
        receipt.answered = list(data) + list(digests)
        if answered < plan.block_for or not data:
            raise Timeout(
                f"read at {plan.consistency.value} got {answered} of {plan.block_for} "
                f"required responses in time",
                consistency=plan.consistency.value,
                required=plan.block_for,
                received=answered,
                write=False,
            )
        reference = next(iter(data.values()))
        expected = cell_digest(reference) if digests else b""
        mismatched = [node for node, digest in digests.items() if digest != expected] + [
            node for node, cell in data.items() if cell != reference
        ]
        if not mismatched:
            return [(node, reference) for node in receipt.answered]
        # Digest mismatch: fetch full data from every replica that answered.
        full = await asyncio.gather(
            *(
                self._replicas.read(node, plan.keyspace, plan.token, key, self._read_timeout_s)
                for node in digests
            ),
            return_exceptions=True,
        )
        results = list(data.items())
        for node, result in zip(digests, full):
            if isinstance(result, BaseException):
                if not isinstance(result, RingKVError):
                    raise result
                continue
            results.append((node, result))
        if len(results) < plan.block_for:
            raise Timeout(
                f"read at {plan.consistency.value}: replicas failed during digest resolution",
                consistency=plan.consistency.value,
                required=plan.block_for,
                received=len(results),
                write=False,
            )
        return results

    async def _repair(
        self, plan: ReplicaPlan, key: bytes, winner: Cell, stale: list[str], receipt: Receipt
    ) -> None:
        """Blocking read repair: the answer waits until stale replicas hold the winner."""
        outcomes = await asyncio.gather(
            *(
                self._replicas.write(
                    node, plan.keyspace, plan.token, key, winner, self._write_timeout_s
                )
                for node in stale
            ),
            return_exceptions=True,
        )
        for node, outcome in zip(stale, outcomes):
            if isinstance(outcome, BaseException):
                if not isinstance(outcome, RingKVError):
                    raise outcome
                # The repair did not land: without it a later read could go
                # backwards, so this read cannot claim the consistency level.
                raise Timeout(
                    f"read repair to {node} failed: {outcome.message}",
                    consistency=plan.consistency.value,
                    required=plan.block_for,
                    received=len(receipt.answered),
                    write=False,
                )
            receipt.repaired.append(node)

    def _speculative_after_s(self) -> float | None:
        observed = self._latencies.percentile(self._spec_pct)
        if observed is None:
            return None
        return max(observed, self._spec_min_s)

    def _note_latency(self, node: str, seconds: float) -> None:
        """Exponentially weighted read latency per replica (like Cassandra's dynamic snitch)."""
        previous = self._replica_latency_s.get(node)
        self._replica_latency_s[node] = (
            seconds if previous is None else (1 - LATENCY_EWMA_WEIGHT) * previous
            + LATENCY_EWMA_WEIGHT * seconds
        )

    def _by_proximity(self, nodes: tuple[str, ...]) -> list[str]:
        """This node first (no network hop), then the peers that have been fastest."""

        def rank(node: str) -> tuple[int, float]:
            if node == self.node_id:
                return (0, 0.0)
            return (1, self._replica_latency_s.get(node, 0.0))

        return sorted(nodes, key=rank)

    # -- scans ---------------------------------------------------------------

    async def scan(
        self,
        keyspace: str,
        after: tuple[int, bytes] | None,
        limit: int,
        consistency: ConsistencyLevel | None,
    ) -> ScanPage:
        """One page of a keyspace in token order, read at ``consistency``.

        Walks the ring's ranges from the cursor; each range is read from
        block_for of its replicas and merged by LWW. Only ``limit`` cells are
        examined per page, so a page may hold fewer live items than ``limit``
        (tombstones are skipped) while ``next_after`` is still set.
        """
        settings = self.keyspace(keyspace)
        level = consistency or settings.default_consistency
        if level is ConsistencyLevel.ANY:
            raise BadRequest("consistency ANY is only valid for writes", field="consistency")
        ring = self._ring()
        now_us = self._clock.wall_us()
        cursor: tuple[int, bytes | None] = after if after is not None else (MIN_TOKEN, None)
        receipt = Receipt(level.value, [])
        items: list[tuple[int, bytes, Cell]] = []
        for start, end in _ring_pieces(ring):
            if end <= cursor[0] and not (end == cursor[0] and cursor[1] is not None):
                continue
            piece_after = cursor if cursor[0] > start else (start, None)
            plan = plan_for(ring, keyspace, end, settings.replication_factor, level,
                            self._is_alive, write=False)
            targets = self._by_proximity(plan.live)[: plan.block_for]
            for node in targets:
                if node not in receipt.asked:
                    receipt.asked.append(node)
            wanted = limit - len(items)
            merged, horizon = await self._scan_piece(plan, targets, piece_after, end, wanted)
            for token, key, cell in merged[:wanted]:
                if cell.is_live(now_us):
                    items.append((token, key, cell))
            if len(merged) >= wanted:
                last_token, last_key, _ = merged[wanted - 1]
                return ScanPage(items, (last_token, last_key), receipt)
            if horizon is not None:
                # A replica stopped at its own bound: end the page where every
                # replica's answer is complete, and go on from there next time.
                return ScanPage(items, horizon, receipt)
            cursor = (end, None)
        return ScanPage(items, None, receipt)

    async def _scan_piece(
        self,
        plan: ReplicaPlan,
        targets: list[str],
        after: tuple[int, bytes | None],
        end: int,
        limit: int,
    ) -> tuple[list[tuple[int, bytes, Cell]], tuple[int, bytes] | None]:
        """The replicas' cells merged by LWW, and the horizon: the (token, key) up
        to which every replica's answer is complete, or None if all of them
        covered the whole piece. Only cells up to the horizon are returned."""
        results = await asyncio.gather(
            *(
                self._replicas.scan(node, plan.keyspace, after, end, limit, self._read_timeout_s)
                for node in targets
            ),
            return_exceptions=True,
        )
        merged: dict[tuple[int, bytes], Cell] = {}
        horizon: tuple[int, bytes] | None = None
        answered = 0
        for result in results:
            if isinstance(result, BaseException):
                if not isinstance(result, RingKVError):
                    raise result
                continue
            answered += 1
            if result.truncated or len(result.items) >= limit:
                last = result.items[-1][:2]
                horizon = last if horizon is None else min(horizon, last)
            for token, key, cell in result.items:
                merged[(token, key)] = reconcile(merged.get((token, key)), cell)  # type: ignore[assignment]
        if answered < plan.block_for:
            raise Timeout(
                f"scan at {plan.consistency.value} got {answered} of {plan.block_for} "
                f"required responses in time",
                consistency=plan.consistency.value,
                required=plan.block_for,
                received=answered,
                write=False,
            )
        complete = [place for place in sorted(merged) if horizon is None or place <= horizon]
        return [(token, key, merged[(token, key)]) for token, key in complete], horizon


def _is_corrupt_record(error: BaseException) -> bool:
    """A replica's own record failed its checksum, here or on a peer."""
    if isinstance(error, CorruptRecord):
        return True
    return isinstance(error, RemoteError) and error.details.get("remote_code") == CorruptRecord.code


async def _any_done(answers: list[asyncio.Future[Any]], timeout_s: float) -> bool:
    """Wait until one of ``answers`` is done or ``timeout_s`` passes; True if one is.

    ``asyncio.wait(..., return_when=FIRST_COMPLETED)`` without its generality
    (sets, coroutine checks, a done set): every read that waits on a replica
    waits here, once per answer.
    """
    loop = asyncio.get_running_loop()
    woken = loop.create_future()

    def wake(_: object = None) -> None:
        if not woken.done():
            woken.set_result(None)

    timer = loop.call_later(timeout_s, wake)
    for answer in answers:
        answer.add_done_callback(wake)
    try:
        await woken
    finally:
        timer.cancel()
        for answer in answers:
            answer.remove_done_callback(wake)
    return any(answer.done() for answer in answers)


def _ring_pieces(ring: TokenRing) -> list[tuple[int, int]]:
    """The ring's ranges as non-wrapping (start_exclusive, end_inclusive) pieces, in order."""
    pieces = []
    for start, end, _owner in ring.ranges():
        if start < end:
            pieces.append((start, end))
        else:  # the wrapping range, or the whole ring when there is one token
            pieces.append((MIN_TOKEN, end))
            pieces.append((start, 2**63 - 1))
    pieces = [(s, e) for s, e in pieces if s < e]
    return sorted(pieces, key=lambda piece: piece[1])
