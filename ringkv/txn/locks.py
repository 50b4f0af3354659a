"""The lock table of a group leader: two-phase locking with wound-wait (pure).

Spanner's read-write transactions take locks at the leader of each group they
touch (Spanner §4.2.1): shared locks for reads, exclusive locks for writes,
held until the commit is applied or the transaction aborts. Deadlocks are
prevented, not detected, with wound-wait (Rosenkrantz, Stearns and Lewis,
1978), as Spanner does:

* a transaction that asks for a lock held in a conflicting mode by a
  *younger* transaction wounds it: the younger one is aborted (the caller
  aborts it and releases its locks), and the older one gets the lock then;
* a transaction that conflicts with an *older* holder waits.

Waits therefore only ever run from younger to older transactions, so no
cycle (no deadlock) can form. Age is a transaction's ``priority``, smaller is
older; a retried transaction keeps its first priority, so it ages and cannot
starve. A transaction that has started to commit (its commit is being
replicated) can no longer be wounded: an older one waits for it instead,
which is safe because a committing transaction waits for nothing.

Waiters queue oldest first, and a request is granted only when it conflicts
with no holder and no older waiter: an older transaction never waits behind
a younger one (that would let a wait run from older to younger, and close a
cycle), and a stream of younger readers cannot starve an older writer.

The table only decides. ``acquire`` and ``release`` return what happened:
granted or not, which transactions to wound, which waiters now hold their
lock. The shell aborts the wounded and wakes the granted.
"""

from __future__ import annotations

import bisect
import enum
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import NamedTuple

TxnId = Hashable
Priority = tuple[int, str]  # (first start timestamp in µs, transaction id): smaller is older


class Mode(enum.Enum):
    SHARED = "S"
    EXCLUSIVE = "X"


def _compatible(a: Mode, b: Mode) -> bool:
    return a is Mode.SHARED and b is Mode.SHARED


class Acquired(NamedTuple):
    granted: bool  # False: queued until ``release`` grants it (or the txn aborts)
    wound: tuple[TxnId, ...]  # younger holders the caller must abort


class Granted(NamedTuple):
    txn: TxnId
    key: bytes
    mode: Mode


@dataclass
class _Lock:
    holders: dict[TxnId, Mode] = field(default_factory=dict)
    waiting: list[tuple[Priority, TxnId, Mode]] = field(default_factory=list)  # oldest first


class LockTable:
    def __init__(self) -> None:
        self._locks: dict[bytes, _Lock] = {}
        self._priority: dict[TxnId, Priority] = {}
        self._held: dict[TxnId, set[bytes]] = {}
        self._waits: dict[TxnId, bytes] = {}  # the one key a transaction waits for
        self._committing: set[TxnId] = set()

    def __len__(self) -> int:
        """Keys with a holder or a waiter."""
        return len(self._locks)

    def holds(self, txn: TxnId, key: bytes) -> Mode | None:
        lock = self._locks.get(key)
        return None if lock is None else lock.holders.get(txn)

    def acquire(self, txn: TxnId, priority: Priority, key: bytes, mode: Mode) -> Acquired:
        """Ask for ``key`` in ``mode`` (an EXCLUSIVE request upgrades a SHARED hold)."""
        if txn in self._committing:
            raise ValueError(f"transaction {txn!r} is committing: it takes no new locks")
        if txn in self._waits:
            raise ValueError(f"transaction {txn!r} already waits for a lock")
        self._priority.setdefault(txn, priority)
        mine = self._priority[txn]
        lock = self._locks.setdefault(key, _Lock())
        held = lock.holders.get(txn)
        if held is Mode.EXCLUSIVE or held is mode:
            return Acquired(True, ())
        conflicts = [h for h, m in lock.holders.items() if h != txn and not _compatible(m, mode)]
        older_waiter = any(p < mine and not _compatible(m, mode) for p, _, m in lock.waiting)
        if not conflicts and not older_waiter:
            lock.holders[txn] = mode  # new, or SHARED upgraded to EXCLUSIVE
            self._held.setdefault(txn, set()).add(key)
            return Acquired(True, ())
        wound = tuple(h for h in conflicts
                      if self._priority[h] > mine and h not in self._committing)
        bisect.insort(lock.waiting, (mine, txn, mode), key=lambda w: w[0])
        self._waits[txn] = key
        return Acquired(False, wound)

    def start_commit(self, txn: TxnId) -> None:
        """``txn`` holds every lock it needs and is committing: it can no longer be wounded."""
        self._committing.add(txn)

    def release(self, txn: TxnId) -> list[Granted]:
        """Drop every lock and wait of ``txn`` (committed or aborted); returns the
        waiters that hold their lock now, in grant order."""
        self._committing.discard(txn)
        self._priority.pop(txn, None)
        touched = self._held.pop(txn, set())
        waited = self._waits.pop(txn, None)
        if waited is not None:
            lock = self._locks[waited]
            lock.waiting = [w for w in lock.waiting if w[1] != txn]
            touched.add(waited)
        granted: list[Granted] = []
        for key in sorted(touched):
            lock = self._locks[key]
            lock.holders.pop(txn, None)
            granted.extend(self._grant_waiters(key, lock))
            if not lock.holders and not lock.waiting:
                del self._locks[key]
        return granted

    def _grant_waiters(self, key: bytes, lock: _Lock) -> list[Granted]:
        granted = []
        while lock.waiting:
            _, waiter, mode = lock.waiting[0]
            others = [m for h, m in lock.holders.items() if h != waiter]
            if not all(_compatible(m, mode) for m in others):
                break  # oldest first: nobody younger goes before it
            lock.waiting.pop(0)
            del self._waits[waiter]
            lock.holders[waiter] = mode
            self._held.setdefault(waiter, set()).add(key)
            granted.append(Granted(waiter, key, mode))
        return granted
