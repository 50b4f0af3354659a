"""A one-shot transaction across ranges, run by the node that took the request (shell).

Spanner §4.2.1: a transaction that touches several Paxos groups is driven by
its client, which reads under locks at each group's leader, then asks one
group to coordinate two-phase commit over all of them. Here the node that
took the request is that client:

1. **Lock and read.** At the leader of every range it touches (in parallel),
   it takes its locks, shared for the keys it reads or tests and exclusive
   for the keys it writes, and reads those keys as committed, under the
   locks (``TwoPCRoles.lock_and_read``). Every operation carries one
   priority, its first start, so wound-wait ages a retried transaction until
   it wins.
2. **Evaluate** its conditions and reads on what it read (``leader.evaluate``),
   as a one-range transaction does. A failed condition (409) or a
   transaction with no writes releases every lock and answers; the reads of
   a read-only one were all held at once, so they are one serializable cut.
3. **Commit.** A ``CommitRequest`` goes to the coordinator group, the range
   of its first write, naming every range it locked as a participant: a
   range it only read prepares no writes but keeps its shared locks until
   the decision (two-phase locking: no lock goes before the commit point).
   The coordinator answers after the decision is logged and, for a commit,
   after commit wait (``txn/twopc.py``).

Each attempt runs under its own id, ``<id>~<random>`` (``~`` is in no
client's id), so that what participants remember of an aborted attempt never
refuses the next; outcomes are recorded under ``<id>``. A transaction
wounded before it asked to commit (or aborted by the coordinator, which
decides abort on a no vote) is aborted everywhere and run again, with its
first priority, up to ``txn.max_conflict_retries`` times within the
request's deadline. One whose commit request went out and got no answer in
time is never run again here: it may have committed. The client hears 504
and asks ``GET /v1/txn/{id}``; a request that names its id is answered from
that record when the id committed already (a retry never commits twice).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from ringkv.clock import Clock
from ringkv.errors import Aborted, NotFound, RingKVError
from ringkv.txn.leader import COMMIT, CONDITION_FAILED, Current, condition_failed, evaluate
from ringkv.txn.ranges import Range
from ringkv.txn.requests import TxnRequest
from ringkv.txn.twopc_messages import CommitRequest, Participant

log = logging.getLogger(__name__)

__all__ = ["CrossRangeTxn", "RETRYABLE", "release_locks"]

RETRYABLE = frozenset({"wounded", "leader_changed", "aborted_by_coordinator"})

# execute(op_kind, keyspace, key, fields, deadline_s) -> the answer of that range's leader
Execute = Callable[..., Awaitable[dict[str, Any]]]


class CrossRangeTxn:
    def __init__(self, execute: Execute, *, clock: Clock, max_retries: int,
                 spawn: Callable[[Awaitable[Any]], None], stats: dict[str, int],
                 now_latest_us: Callable[[], int], rng: random.Random) -> None:
        self._execute = execute
        self._rng = rng
        self._now_latest_us = now_latest_us
        self._clock = clock
        self._max_retries = max_retries
        self._spawn = spawn
        self.stats = stats

    async def run(self, request: TxnRequest, txn_id: str, ranges: dict[Range, list[bytes]],
                  deadline_s: float) -> dict[str, Any]:
        if not request.writes:
            return await self._read_only(request, txn_id, ranges, deadline_s)
        if request.txn_id is not None:
            replayed = await self._committed(request, txn_id, deadline_s)
            if replayed is not None:
                return replayed
        priority = (self._clock.wall_us(), txn_id)
        attempt = 0
        while True:
            attempt_id = f"{txn_id}~{self._rng.getrandbits(32):08x}"
            try:
                answer = await self._attempt(request, attempt_id, priority, ranges, deadline_s)
            except Aborted as exc:
                reason = exc.details.get("reason", "")
                if reason not in RETRYABLE or attempt >= self._max_retries \
                        or self._clock.monotonic_s() >= deadline_s:
                    self.stats["cross_range_aborts"] += 1
                    if reason in RETRYABLE:
                        raise Aborted(f"transaction {txn_id} was aborted {attempt + 1} times by "
                                      f"conflicts or leader changes; last: {exc.message}",
                                      id=txn_id, reason="conflict") from None
                    raise
                attempt += 1
                continue
            answer["id"] = txn_id
            answer["receipt"]["attempts"] = attempt + 1
            return answer

    async def _attempt(self, request: TxnRequest, txn_id: str, priority: tuple[int, str],
                       ranges: dict[Range, list[bytes]], deadline_s: float) -> dict[str, Any]:
        written = {w.key for w in request.writes}
        order = list(ranges)
        try:
            answers = await asyncio.gather(*(
                self._lock(rng, ranges[rng], written, txn_id, priority, deadline_s) for rng in order),
                return_exceptions=True)
            failure = next((a for a in answers if isinstance(a, BaseException)), None)
            if failure is not None:
                raise failure
            current: dict[bytes, Current] = {}
            for answer in answers:
                assert isinstance(answer, dict)
                for key, value, version in answer["reads"]:
                    current[bytes(key)] = Current(value, version)
            verdict = evaluate(request, current)
        except (Exception, asyncio.CancelledError):
            # Every range, not only those that answered: one whose answer was lost
            # on the way may hold locks all the same. (Not on GeneratorExit: a
            # coroutine closed with no loop left cannot start anything.)
            self._abort(request.keyspace, txn_id, ranges, order)
            raise
        reads = [{"key": key, "value": cur.value, "version": cur.version_us}
                 for key, cur in verdict.reads]
        if verdict.kind == CONDITION_FAILED:
            self._abort(request.keyspace, txn_id, ranges, order)
            self.stats["condition_failed"] += 1
            raise condition_failed(verdict, txn_id)
        receipt: dict[str, Any] = {"txn_id": txn_id, "ranges": [r.group_id for r in order]}
        if verdict.kind != COMMIT:
            self._abort(request.keyspace, txn_id, ranges, order)  # read only: release the locks
            return {"ok": True, "committed": False, "reads": reads, "receipt": receipt}
        by_range = {rng: [(k, v) for k, v in verdict.writes if k in set(in_range)]
                    for rng, in_range in ranges.items()}
        coordinator = next(rng for rng in order if by_range[rng])
        participants = tuple(Participant(rng.group_id, tuple(by_range[rng]), active_here=True)
                             for rng in order)
        commit = CommitRequest(txn_id, priority, participants)
        answer = await self._execute("tx_commit", request.keyspace, ranges[coordinator][0],
                                     {"txn_id": txn_id, "commit": commit}, deadline_s)
        if not answer.get("committed"):
            raise Aborted(f"transaction {txn_id} was aborted by its coordinator (a participant "
                          "voted no: wounded, or it lost its locks)", id=txn_id,
                          reason="aborted_by_coordinator")
        self.stats["cross_range_commits"] += 1
        receipt.update(coordinator=coordinator.group_id, commit_ts=answer["commit_ts"])
        return {"ok": True, "committed": True, "commit_ts": answer["commit_ts"], "reads": reads,
                "receipt": receipt}

    async def _committed(self, request: TxnRequest, txn_id: str,
                         deadline_s: float) -> dict[str, Any] | None:
        """The answer of an earlier run of ``txn_id`` that committed, or None."""
        key = (request.writes[0].key if request.writes else request.keys()[0])
        try:
            status = await self._execute("status", request.keyspace, key, {"txn_id": txn_id},
                                         deadline_s)
        except NotFound:
            return None
        if status.get("status") != "committed":
            return None
        return {"ok": True, "id": txn_id, "committed": True, "commit_ts": status["commit_ts"],
                "replayed": True, "reads": [], "receipt": None}

    async def _read_only(self, request: TxnRequest, txn_id: str, ranges: dict[Range, list[bytes]],
                         deadline_s: float) -> dict[str, Any]:
        """Spanner §4.1.4: a read-only transaction reads at ``s_read = TT.now().latest``,
        takes no locks, and is served by any replica whose safe time has passed
        ``s_read`` (a leader reserves it instead of waiting). Every key is read at
        that one timestamp: one consistent cut, whatever the ranges."""
        read_ts_us = self._now_latest_us()
        keys = [key for in_range in ranges.values() for key in in_range]
        answers = await asyncio.gather(*(
            self._execute("snapshot_get", request.keyspace, key, {"snapshot_ts_us": read_ts_us},
                          deadline_s, missing_ok=True) for key in keys))
        current = {key: Current(a.get("value"), a.get("version")) for key, a in zip(keys, answers)}
        verdict = evaluate(request, current)
        if verdict.kind == CONDITION_FAILED:
            self.stats["condition_failed"] += 1
            raise condition_failed(verdict, txn_id)
        reads = [{"key": key, "value": cur.value, "version": cur.version_us}
                 for key, cur in verdict.reads]
        self.stats["read_only_txns"] += 1
        return {"ok": True, "id": txn_id, "committed": False, "reads": reads,
                "receipt": {"txn_id": txn_id, "read_ts": read_ts_us,
                            "ranges": [r.group_id for r in ranges]}}

    async def _lock(self, rng: Range, keys: Sequence[bytes], written: set[bytes], txn_id: str,
                    priority: tuple[int, str], deadline_s: float) -> dict[str, Any]:
        reads = tuple(k for k in keys if k not in written)
        writes = tuple(k for k in keys if k in written)
        return await self._execute("tx_lock", rng.keyspace, keys[0], {
            "txn_id": txn_id, "priority": priority, "lock_reads": reads, "lock_writes": writes,
            "first": True}, deadline_s)

    def _abort(self, keyspace: str, txn_id: str, ranges: dict[Range, list[bytes]],
               which: Sequence[Range]) -> None:
        """Release the transaction's locks at each range, without waiting: a lost
        abort is made good by the participant's idle timeout."""
        for rng in which:
            self._spawn(release_locks(self._execute, self._clock, keyspace, txn_id,
                                      ranges[rng][0]))


async def release_locks(execute: Execute, clock: Clock, keyspace: str, txn_id: str,
                        key: bytes) -> None:
    """Ask the leader of ``key``'s range to drop ``txn_id``'s locks there (best effort:
    a lost abort is made good by that participant's idle timeout)."""
    try:
        await execute("tx_abort", keyspace, key, {"txn_id": txn_id}, clock.monotonic_s() + 2.0)
    except (RingKVError, OSError) as exc:
        log.debug("abort of %s at the range of %r not delivered: %s", txn_id, key[:32], exc)
