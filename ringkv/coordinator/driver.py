"""The coordinator: drives a request from plan to answer (Dynamo §4.5).

Any node coordinates any request. The decisions live in pure cores: the
replica plan (``replica_plan``), write acknowledgements (``quorum.
ResponseTracker``), whom a read asks and how its answers resolve
(``read_resolver``), replica ranking and speculative retry (``snitch``), and
scan merging (``scan``). This module only sends what they decide, waits for
answers through futures, and feeds the answers back.

One deadline per request (Cassandra's query start time): it is set when the
request arrives (``started_s``, on the node's clock) and bounds everything
the request does, the digest-mismatch refetch and the blocking read repair
included, so a QUORUM read takes at most its read timeout, not read + read +
write timeouts.

How the coordinator reaches a replica is behind ``ReplicaClient``: this node
is served from its local store, others over the internode transport.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Iterable, Mapping
from functools import partial
from typing import Any, Protocol

from ringkv.clock import Clock
from ringkv.coordinator.read_resolver import Ask, ReadRound, resolve
from ringkv.coordinator.replica_plan import ReplicaPlan, plan_for
from ringkv.coordinator.results import ReadResult, Receipt, ScanPage, WriteResult
from ringkv.coordinator.scan import Item, merge_replies, ring_pieces
from ringkv.coordinator.snitch import Snitch
from ringkv.errors import (
    BadRequest,
    CorruptRecord,
    NotFound,
    RemoteError,
    RingKVError,
    ShuttingDown,
    Timeout,
)
from ringkv.hlc import HybridLogicalClock, Timestamp
from ringkv.keyspaces import KeyspaceSettings
from ringkv.messages import ScanReply
from ringkv.quorum import FAILED, HINTED, OK, PENDING, WON, ConsistencyLevel, ResponseTracker
from ringkv.replica.client import ReplicaClient
from ringkv.ring import MIN_TOKEN, TokenRing, token_for
from ringkv.versioning import Cell, cell_digest

log = logging.getLogger(__name__)


class HintSink(Protocol):
    """Where the coordinator leaves writes for replicas it could not reach."""

    async def store_hint(self, target: str, keyspace: str, token: int, key: bytes, cell: Cell) -> bool:
        """Store a hint durably; False if the hint was not stored (e.g. disabled)."""
        ...


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
        local_read: Callable[[str, int, bytes], Cell | None] | None = None,
        future_ring: Callable[[], TokenRing | None] | None = None,
    ) -> None:
        """``local_read(keyspace, token, key)``: this node's own replica, read at
        once, for reads that need only it (the ONE fast path)."""
        self.node_id = node_id
        self._local_read = local_read
        self._ring = ring
        # The ring once the joins in progress finish (writes also go to the
        # pending replicas on it); None while the topology is settled.
        self._future_ring = future_ring or (lambda: None)
        self._is_alive = is_alive
        self._replicas = replicas
        self._keyspaces = keyspaces
        self._clock = clock
        self._hlc = hlc
        self._hints = hints
        self._read_timeout_s = read_timeout_s
        self._write_timeout_s = write_timeout_s
        self.snitch = Snitch(
            node_id,
            retry_percentile=speculative_retry_percentile,
            retry_min_s=speculative_retry_min_s,
        )
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
        if level is ConsistencyLevel.SERIAL:
            raise BadRequest(f"consistency SERIAL needs a transactional keyspace; {keyspace!r} is "
                             "eventual", field="consistency")
        return plan_for(
            self._ring(),
            keyspace,
            token_for(key),
            settings.replication_factor,
            level,
            self._is_alive,
            write=write,
            future=self._future_ring() if write else None,
        )

    def new_timestamp(self) -> Timestamp:
        return self._hlc.now()

    def _deadline_s(self, started_s: float | None, timeout_s: float) -> float:
        """The request's one deadline, counted from when it arrived."""
        start = self._clock.monotonic_s() if started_s is None else started_s
        return start + timeout_s

    def _remaining_s(self, deadline_s: float) -> float:
        return max(0.0, deadline_s - self._clock.monotonic_s())

    # -- writes --------------------------------------------------------------

    async def write(
        self,
        keyspace: str,
        key: bytes,
        cell: Cell,
        consistency: ConsistencyLevel | None,
        *,
        started_s: float | None = None,
    ) -> WriteResult:
        deadline_s = self._deadline_s(started_s, self._write_timeout_s)
        plan = self.plan(keyspace, key, consistency, write=True)
        timeout_s = self._remaining_s(deadline_s)
        if timeout_s <= 0:
            # It waited out its whole timeout before reaching us: send nothing.
            raise Timeout(
                f"write at {plan.consistency.value} spent its timeout before it was sent",
                consistency=plan.consistency.value,
                required=plan.block_for,
                received=0,
                write=True,
            )
        receipt = Receipt(plan.consistency.value, list(plan.natural), asked=list(plan.live))
        hinted_down: list[str] = []
        if plan.down:
            for target in plan.down:
                if await self._store_hint(target, plan, key, cell):
                    hinted_down.append(target)
            # Storing hints may have taken a moment: still leave the replicas
            # a sliver of time (a timeout must be > 0).
            timeout_s = max(self._remaining_s(deadline_s), 1e-3)
        acks = ResponseTracker(
            [*plan.live, *hinted_down],
            plan.block_for,
            hints_count=plan.consistency is ConsistencyLevel.ANY,
        )
        for target in hinted_down:
            acks.record(target, HINTED)
        # Resolved once the tracker decides (WON or LOST), or at the deadline.
        decided: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        send, token = self._replicas.write_future, plan.token
        for target in plan.live:
            # Every replica, this node's own included, answers through a
            # future (the local one is its group commit): no task per replica.
            answer = send(target, keyspace, token, key, cell, timeout_s)
            answer.add_done_callback(
                partial(self._write_answered, target, plan, key, cell, acks, decided)
            )
        if acks.vote is PENDING:
            timer = self._clock.call_later(timeout_s, _decide, decided)
            try:
                await decided
            finally:
                timer.cancel()
        receipt.answered = list(acks.ok)
        receipt.hints_stored = len(acks.hinted)
        if acks.vote is WON:
            return WriteResult(cell, receipt)
        raise Timeout(
            f"write at {plan.consistency.value} got {len(acks.ok)} of {plan.block_for} "
            f"required acknowledgements in time",
            consistency=plan.consistency.value,
            required=plan.block_for,
            received=len(acks.ok),
            write=True,
        )

    def _write_answered(
        self,
        target: str,
        plan: ReplicaPlan,
        key: bytes,
        cell: Cell,
        acks: ResponseTracker,
        decided: asyncio.Future[None],
        answer: asyncio.Future[None],
    ) -> None:
        error = _error_of(answer, self.node_id)
        if error is None:
            if acks.record(target, OK) is not PENDING:
                _decide(decided)
            return
        if isinstance(error, RingKVError):
            log.debug("write to %s failed: %s", target, error)
        else:
            log.error("write to %s failed unexpectedly", target, exc_info=error)
        if target == self.node_id or self._hints is None:
            # This node's own failed write is not hinted: it has no later replay.
            if acks.record(target, FAILED) is not PENDING:
                _decide(decided)
            return
        # A replica that did not acknowledge gets a hint, even if the client
        # was already answered (Cassandra does the same). The hint is stored
        # before the failure is counted, so that at ANY the answer can count it.
        self._spawn(self._hint_failed_write(target, plan, key, cell, acks, decided))

    async def _hint_failed_write(
        self,
        target: str,
        plan: ReplicaPlan,
        key: bytes,
        cell: Cell,
        acks: ResponseTracker,
        decided: asyncio.Future[None],
    ) -> None:
        hinted = await self._store_hint(target, plan, key, cell)
        if acks.record(target, HINTED if hinted else FAILED) is not PENDING:
            _decide(decided)

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
        self,
        keyspace: str,
        key: bytes,
        consistency: ConsistencyLevel | None,
        *,
        started_s: float | None = None,
    ) -> ReadResult:
        deadline_s = self._deadline_s(started_s, self._read_timeout_s)
        plan = self.plan(keyspace, key, consistency, write=False)
        ordered = self.snitch.by_proximity(plan.live)
        targets = ordered[: plan.block_for]
        spares = ordered[plan.block_for :]
        receipt = Receipt(plan.consistency.value, list(plan.natural), asked=list(targets))
        if self._local_read is not None and targets == [self.node_id]:
            # Fast path: the one replica needed is this node: read it here, no
            # future, no network. If it cannot answer (a corrupt record, say),
            # the general path asks again and falls back to the spare replicas.
            try:
                cell = self._local_read(plan.keyspace, plan.token, key)
            except RingKVError as exc:
                log.debug("local read failed, asking other replicas: %s", exc)
            else:
                receipt.answered = [self.node_id]
                return ReadResult(cell, receipt)
        read = ReadRound(targets, spares, plan.block_for)
        await self._gather(plan, key, read, deadline_s)
        receipt.asked.extend(read.speculative)
        receipt.speculative = list(read.speculative)
        receipt.answered = read.answered
        if read.vote is not WON:
            raise self._read_timeout(plan, len(read.answered), "required responses in time")
        resolution = resolve(read.data, read.digests, read.corrupt)
        if not resolution.resolved:
            # Digest mismatch: fetch full data from every replica that sent a digest.
            fetched = await self._fetch_data(plan, key, resolution.needs_data_from, deadline_s)
            data = {**read.data, **fetched}
            if len(data) < plan.block_for:
                raise self._read_timeout(
                    plan, len(data), "responses: replicas failed during digest resolution"
                )
            resolution = resolve(data, {}, read.corrupt)
        winner = resolution.winner
        if resolution.stale and winner is not None:
            receipt.read_repair = True
            await self._repair(plan, key, winner, resolution.stale, receipt, deadline_s)
        return ReadResult(winner, receipt)

    async def _gather(self, plan: ReplicaPlan, key: bytes, read: ReadRound, deadline_s: float) -> None:
        """Send the round's asks and feed it the answers until it is decided,
        the deadline passes, or nobody is left to answer."""
        clock, snitch, replicas = self._clock, self.snitch, self._replicas
        keyspace, token = plan.keyspace, plan.token
        local_read = self._local_read
        start_s = clock.monotonic_s()
        # answer -> (node, is it a data read, when it was asked)
        asked: dict[asyncio.Future[Any], tuple[str, bool, float]] = {}
        waiting: list[asyncio.Future[Any]] = []  # answers not yet taken in, in launch order
        more: list[Ask] = []  # asks that the answers taken in call for

        def failed(node: str, error: BaseException) -> None:
            if not isinstance(error, RingKVError):
                raise error
            snitch.failed(node, self._read_timeout_s)  # a failure ranks last
            more.extend(read.on_failure(node, corrupt=_is_corrupt_record(error)))

        def launch(asks: Iterable[Ask]) -> None:
            now_s = clock.monotonic_s()
            timeout_s = deadline_s - now_s
            if timeout_s <= 0:
                return  # no time left to ask anyone: the read ends at its deadline
            for node, is_data in asks:
                if node == self.node_id and local_read is not None:
                    # This node's replica answers here and now: no future, no
                    # network. It ranks first (snitch.by_proximity), so its
                    # answer is taken in first, as in launch order.
                    try:
                        cell = local_read(keyspace, token, key)
                    except RingKVError as exc:
                        failed(node, exc)
                        continue
                    snitch.answered(node, now_s, now_s)
                    more.extend(read.on_data(node, cell) if is_data
                                else read.on_digest(node, cell_digest(cell)))
                    continue
                send = replicas.read_future if is_data else replicas.digest_future
                answer = send(node, keyspace, token, key, timeout_s)
                asked[answer] = (node, is_data, now_s)
                waiting.append(answer)

        try:
            launch(read.start())
            while True:
                # Take in what has arrived, in launch order (not completion
                # order), so that the same inputs always give the same run.
                still: list[asyncio.Future[Any]] = []
                for answer in waiting:
                    if not answer.done():
                        still.append(answer)
                        continue
                    node, is_data, asked_at_s = asked[answer]
                    error = _error_of(answer, self.node_id)
                    if error is not None:
                        failed(node, error)
                        continue
                    snitch.answered(node, asked_at_s, clock.monotonic_s())
                    if is_data:
                        more.extend(read.on_data(node, answer.result()))
                    else:
                        more.extend(read.on_digest(node, answer.result()))
                waiting = still
                if more:
                    asks, more = more, []
                    launch(asks)
                if read.vote is not PENDING or not waiting:
                    return
                now_s = clock.monotonic_s()
                if now_s >= deadline_s:
                    return
                wait_s = deadline_s - now_s
                spec_s = snitch.speculate_after_s() if read.can_speculate else None
                if spec_s is not None:
                    wait_s = min(wait_s, max(0.0, start_s + spec_s - now_s))
                if not await self._any_done(waiting, wait_s) and spec_s is not None:
                    # Slower than the speculative threshold: back it up (Dean's hedged request).
                    launch(read.on_slow())
        finally:
            now_s = clock.monotonic_s() if waiting else 0.0
            for answer in waiting:
                if not answer.done():
                    answer.cancel()
                    # It kept us waiting at least this long. Counting that (as
                    # Cassandra's dynamic snitch counts timeouts) stops a replica
                    # that is UP but not answering from being asked first forever.
                    node, _, asked_at_s = asked[answer]
                    snitch.abandoned(node, asked_at_s, now_s)
                elif not answer.cancelled():
                    answer.exception()  # mark retrieved

    async def _fetch_data(
        self, plan: ReplicaPlan, key: bytes, nodes: Iterable[str], deadline_s: float
    ) -> dict[str, Cell | None]:
        """Full data from ``nodes``, within the request's deadline; those that fail are left out."""
        timeout_s = self._remaining_s(deadline_s)
        if timeout_s <= 0:
            return {}
        answers = {
            node: self._replicas.read_future(node, plan.keyspace, plan.token, key, timeout_s)
            for node in nodes
        }
        await self._all_done(list(answers.values()), deadline_s)
        fetched: dict[str, Cell | None] = {}
        for node, answer in answers.items():
            if not answer.done():
                answer.cancel()
                continue
            error = _error_of(answer, self.node_id)
            if error is None:
                fetched[node] = answer.result()
            elif not isinstance(error, RingKVError):
                raise error
        return fetched

    async def _repair(
        self,
        plan: ReplicaPlan,
        key: bytes,
        winner: Cell,
        stale: Iterable[str],
        receipt: Receipt,
        deadline_s: float,
    ) -> None:
        """Blocking read repair: the answer waits until stale replicas hold the winner."""
        timeout_s = self._remaining_s(deadline_s)
        if timeout_s <= 0:
            raise self._read_timeout(
                plan, len(receipt.answered), "responses: no time left for read repair"
            )
        answers = {
            node: self._replicas.write_future(
                node, plan.keyspace, plan.token, key, winner, timeout_s
            )
            for node in stale
        }
        await self._all_done(list(answers.values()), deadline_s)
        for node, answer in answers.items():
            if not answer.done():
                answer.cancel()
                # The repair did not land: without it a later read could go
                # backwards, so this read cannot claim the consistency level.
                raise self._read_timeout(
                    plan, len(receipt.answered), f"responses: read repair to {node} did not finish in time"
                )
            error = _error_of(answer, self.node_id)
            if error is not None:
                if not isinstance(error, RingKVError):
                    raise error
                raise Timeout(
                    f"read repair to {node} failed: {error.message}",
                    consistency=plan.consistency.value,
                    required=plan.block_for,
                    received=len(receipt.answered),
                    write=False,
                )
            receipt.repaired.append(node)

    def _read_timeout(self, plan: ReplicaPlan, received: int, what: str) -> Timeout:
        return Timeout(
            f"read at {plan.consistency.value} got {received} of {plan.block_for} {what}",
            consistency=plan.consistency.value,
            required=plan.block_for,
            received=received,
            write=False,
        )

    # -- waiting -------------------------------------------------------------

    async def _any_done(self, answers: list[asyncio.Future[Any]], timeout_s: float) -> bool:
        """Wait until one of ``answers`` is done or ``timeout_s`` passes; True if one is.

        ``asyncio.wait(..., return_when=FIRST_COMPLETED)`` without its
        generality, on the injected clock: every read waits here.
        """
        woken: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def wake(_: object = None) -> None:
            if not woken.done():
                woken.set_result(None)

        timer = self._clock.call_later(timeout_s, wake)
        for answer in answers:
            answer.add_done_callback(wake)
        try:
            await woken
        finally:
            timer.cancel()
            for answer in answers:
                answer.remove_done_callback(wake)
        return any(answer.done() for answer in answers)

    async def _all_done(self, answers: list[asyncio.Future[Any]], deadline_s: float) -> None:
        """Wait until every answer is done or the deadline passes."""
        pending = [answer for answer in answers if not answer.done()]
        while pending:
            timeout_s = self._remaining_s(deadline_s)
            if timeout_s <= 0 or not await self._any_done(pending, timeout_s):
                return
            pending = [answer for answer in pending if not answer.done()]

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
        if level is ConsistencyLevel.SERIAL:
            raise BadRequest(f"keyspace {keyspace!r} is transactional: scans of it are not "
                             "served yet", field="keyspace")
        ring = self._ring()
        now_us = self._clock.wall_us()
        cursor: tuple[int, bytes | None] = after if after is not None else (MIN_TOKEN, None)
        receipt = Receipt(level.value, [])
        items: list[Item] = []
        for start, end in ring_pieces(ring):
            if end <= cursor[0] and not (end == cursor[0] and cursor[1] is not None):
                continue
            piece_after = cursor if cursor[0] > start else (start, None)
            plan = plan_for(ring, keyspace, end, settings.replication_factor, level,
                            self._is_alive, write=False)
            targets = self.snitch.by_proximity(plan.live)[: plan.block_for]
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
    ) -> tuple[list[Item], tuple[int, bytes] | None]:
        results = await asyncio.gather(
            *(
                self._replicas.scan(node, plan.keyspace, after, end, limit, self._read_timeout_s)
                for node in targets
            ),
            return_exceptions=True,
        )
        replies: list[ScanReply] = []
        for result in results:
            if isinstance(result, BaseException):
                if not isinstance(result, RingKVError):
                    raise result
                continue
            replies.append(result)
        if len(replies) < plan.block_for:
            raise Timeout(
                f"scan at {plan.consistency.value} got {len(replies)} of {plan.block_for} "
                f"required responses in time",
                consistency=plan.consistency.value,
                required=plan.block_for,
                received=len(replies),
                write=False,
            )
        return merge_replies(replies, limit)


def _decide(decided: asyncio.Future[None]) -> None:
    if not decided.done():
        decided.set_result(None)


def _error_of(answer: asyncio.Future[Any], node_id: str) -> BaseException | None:
    """A finished answer's error; a cancelled one means this node is stopping."""
    if answer.cancelled():
        return ShuttingDown(f"node {node_id} is stopping")
    return answer.exception()


def _is_corrupt_record(error: BaseException) -> bool:
    """A replica's own record failed its checksum, here or on a peer."""
    if isinstance(error, CorruptRecord):
        return True
    return isinstance(error, RemoteError) and error.details.get("remote_code") == CorruptRecord.code
