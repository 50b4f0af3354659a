"""Deliberately broken coordinators, to prove the checkers catch what they claim to.

They exist only here; the simulator plants one through ``Node``'s
``coordinator_class`` hook (``ringkv sim --fault NAME``), or, for the
broken replicas of ``NODE_FAULTS``, into each ``Node`` before it starts.
Each models a real class of bug. The transactional tier's (``TXN_FAULTS``, for ``--workload
register``, and with ``TWO_PC_FAULTS`` for ``bank`` and ``list-append``) are
planted into a node's ``TxnService`` before it starts, through its public
fault switches (``TxnService.faults``) or its ``truetime``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from ringkv.hlc import Timestamp
from ringkv.coordinator import Coordinator, ReadResult, Receipt, WriteResult
from ringkv.errors import RingKVError
from ringkv.quorum import ConsistencyLevel
from ringkv.coordinator.replica_plan import ReplicaPlan
from ringkv.txn.truetime import CERTAIN, ClockStatus, TrueTime
from ringkv.versioning import Cell, encode_json_value

if TYPE_CHECKING:
    from ringkv.node import Node


class AckWithoutWrite(Coordinator):
    """Acknowledges every third write without sending it anywhere (a dropped write)."""

    _writes = 0  # per instance once incremented; counts writes coordinated

    async def write(self, keyspace: str, key: bytes, cell: Cell,
                    consistency: ConsistencyLevel | None, *,
                    started_s: float | None = None) -> WriteResult:
        self._writes += 1
        if self._writes % 3:
            return await super().write(keyspace, key, cell, consistency)
        plan = self.plan(keyspace, key, consistency, write=True)
        return WriteResult(cell, Receipt(plan.consistency.value, list(plan.natural)))


class AckBeforeWrite(Coordinator):
    """Acknowledges at once and writes a little later (a write-behind buffer)."""

    delay_s = 0.05

    async def write(self, keyspace: str, key: bytes, cell: Cell,
                    consistency: ConsistencyLevel | None, *,
                    started_s: float | None = None) -> WriteResult:
        plan = self.plan(keyspace, key, consistency, write=True)
        self._spawn(self._write_behind(keyspace, key, cell, consistency))
        return WriteResult(cell, Receipt(plan.consistency.value, list(plan.natural)))

    async def _write_behind(self, keyspace: str, key: bytes, cell: Cell,
                            consistency: ConsistencyLevel | None) -> None:
        await self._clock.sleep(self.delay_s)
        try:
            await super().write(keyspace, key, cell, consistency)
        except RingKVError:
            pass  # the client was told long ago that it worked


class BackdatedWrite(Coordinator):
    """Stamps every fifth write half a second in the past (ignores its hybrid clock)."""

    _writes = 0  # per instance once incremented

    async def write(self, keyspace: str, key: bytes, cell: Cell,
                    consistency: ConsistencyLevel | None, *,
                    started_s: float | None = None) -> WriteResult:
        self._writes += 1
        if self._writes % 5 == 0:
            cell = cell._replace(ts=Timestamp(cell.ts.wall_us - 500_000, 0))
        return await super().write(keyspace, key, cell, consistency)


class PhantomRead(Coordinator):
    """Every tenth read returns a corrupted value (a bit flip past the checksums)."""

    _reads = 0  # per instance once incremented

    async def read(self, keyspace: str, key: bytes,
                   consistency: ConsistencyLevel | None, *,
                   started_s: float | None = None) -> ReadResult:
        result = await super().read(keyspace, key, consistency)
        self._reads += 1
        if self._reads % 10 or result.cell is None or result.cell.tombstone:
            return result
        corrupt = encode_json_value(f"{result.cell.json_value()}~")
        return ReadResult(result.cell._replace(value=corrupt), result.receipt)


class NoReadRepair(Coordinator):
    """Reconciles the answer but never writes it back to stale replicas."""

    async def _repair(self, plan: ReplicaPlan, key: bytes, winner: Cell, stale: Iterable[str],
                      receipt: Receipt, deadline_s: float) -> None:
        return None


FAULTS: dict[str, type[Coordinator]] = {
    "ack-without-write": AckWithoutWrite,
    "ack-before-write": AckBeforeWrite,
    "backdated-write": BackdatedWrite,
    "phantom-read": PhantomRead,
    "no-read-repair": NoReadRepair,
}


def purge_tombstones_at_once(node: Node) -> None:
    """Replicas drop a tombstone as soon as their sweep sees it (every second),
    ignoring gc_grace and whether a repair has spread it (a broken
    ``tombstone_gc``): a replica that missed the delete, or a write older than
    it arriving late (a hint, a read repair), brings the deleted value back.
    Reaches into the store's private settings: a planted bug, nothing else."""
    store = node.store
    store._gc_grace_s = 0
    store._repaired_since = None
    store._sweep_interval_s = 1.0


# Broken nodes for the eventual workload: planted into each ``Node`` before it starts.
NODE_FAULTS: dict[str, Callable[[Node], None]] = {
    "purge-tombstones-at-once": purge_tombstones_at_once,
}


def skip_commit_wait(node: Node) -> None:
    """The leader answers as soon as the commit is chosen, without waiting out
    ``TT.after(s)`` (Spanner §4.1.2): a commit timestamp may then still lie in
    the future when the client hears of it."""
    node.txn.faults.skip_commit_wait = True


def snapshot_ignores_safe_time(node: Node) -> None:
    """A replica serves a snapshot read at its timestamp at once, without waiting
    for its safe time to pass it (Spanner §4.1.3): a follower behind the leader,
    or a leader with commits in flight, then misses commits at or below the
    read's timestamp."""
    node.txn.faults.ignore_safe_time = True


class UnfencedTrueTime(TrueTime):
    """TrueTime without the fence: where it would refuse (its clock disagrees with
    the peers', ε is too wide or unknown), the node carries on with its own clock
    (``local ± floor``), as a node with no fence has nothing else to go by."""

    def status(self, local_now_us: int, monotonic_now_s: float) -> ClockStatus:
        status = super().status(local_now_us, monotonic_now_s)
        if status.verdict == CERTAIN:
            return status
        return dataclasses.replace(status, interval=self.local_interval(local_now_us),
                                   verdict=CERTAIN)


def no_fencing(node: Node) -> None:
    tt = node.config.truetime
    node.txn.truetime = UnfencedTrueTime(min_uncertainty_ms=tt.min_uncertainty_ms,
                                         max_drift_ppm=tt.max_drift_ppm,
                                         max_uncertainty_ms=tt.max_uncertainty_ms)


TXN_FAULTS: dict[str, Callable[[Node], None]] = {
    "skip-commit-wait": skip_commit_wait,
    "no-fencing": no_fencing,
    "snapshot-ignores-safe-time": snapshot_ignores_safe_time,
}


def early_lock_release(node: Node) -> None:
    """A participant of two-phase commit lets its locks go as soon as it votes
    yes, before the decision (breaks two-phase locking): another transaction
    then reads and overwrites keys whose new values are about to commit."""
    node.txn.faults.early_lock_release = True


def skip_prepare_log(node: Node) -> None:
    """A participant votes yes without logging its prepare through its Paxos
    group: a new leader knows nothing of the prepared transaction (its locks
    are gone) and no replica's safe time is held back below it (Spanner §4.1.3)."""
    node.txn.faults.skip_prepare_log = True


# Broken participants of two-phase commit, for the bank and list-append workloads
# (which also take every TXN_FAULTS switch).
TWO_PC_FAULTS: dict[str, Callable[[Node], None]] = {
    "early-lock-release": early_lock_release,
    "skip-prepare-log": skip_prepare_log,
}
