"""An interactive transaction as the client holds it, and when to run one again (sans I/O).

``Client.transaction`` and ``AsyncClient.transaction`` are thin shells over
``TxnCore``: it begins the transaction on first use (at any node: the
answer names the node, and every later call goes there, over whichever
protocol the client speaks), keeps what the client knows of it (open,
committed, or ended and why), and gives the plan of each call. Leaving a
``with`` block cleanly commits; leaving it by an exception aborts.

``run_transaction`` runs a function in a transaction and runs the whole
function again after an abort that a rerun may not meet again
(``RERUN_REASONS``: wounded by an older transaction, a range's leader
changed, the coordinator decided abort), at most ``max_retries`` times,
with backoff, each rerun begun with the first attempt's priority so that it
ages until it wins (wound-wait). It commits at most once: a commit whose
outcome is unknown (``Timeout``, ``NoNodeAvailable``) is raised, never rerun.

Pure: the plans yield their I/O; the backoff's randomness is the client's.
"""

from __future__ import annotations

from typing import Any

from ringkv.client.operations import UNSET, Operations
from ringkv.client.plan import Plan
from ringkv.client.types import Key, TxnCommit, TxnHandle, Versioned
from ringkv.errors import Aborted, BadRequest, RingKVError

# The abort reasons a rerun from the start may not meet again (the node's
# ``ringkv.txn.sessions.RETRYABLE_REASONS``).
RERUN_REASONS = frozenset({"wounded", "leader_changed", "aborted"})


class TxnCore:
    """One interactive transaction: its handle once begun, and where it stands."""

    def __init__(self, ops: Operations, keyspace: str | None, *, read_only: bool = False,
                 priority: int | None = None) -> None:
        self._ops = ops
        self.keyspace = keyspace  # None: see ``Operations.txn_begin``
        self.read_only = read_only
        self.priority = priority  # to begin with: an earlier attempt's
        self.handle: TxnHandle | None = None
        self.outcome: TxnCommit | None = None
        # Why it ended (committed, aborted, or the node's reason), None while open.
        self.ended: str | None = None

    def begin(self) -> Plan[TxnHandle]:
        """Plan: begin it, unless it has begun."""
        if self.handle is None:
            if self.ended is not None:
                raise BadRequest(f"this transaction has ended ({self.ended})", field="txn")
            self.handle = yield from self._ops.txn_begin(
                self.keyspace, read_only=self.read_only, priority=self.priority)
            self.priority = self.handle.priority
        return self.handle

    def _open(self) -> Plan[TxnHandle]:
        handle = yield from self.begin()
        if self.ended is not None:
            raise Aborted(f"transaction {handle.id} has ended ({self.ended})", id=handle.id,
                          reason=self.ended, ended=self.ended)
        return handle

    def _noting(self, error: RingKVError) -> None:
        """An error of a call: the node says whether the transaction ended with it."""
        ended = error.details.get("ended")
        if isinstance(ended, str):
            self.ended = ended

    def get(self, key: Key) -> Plan[Versioned | None]:
        handle = yield from self._open()
        try:
            return (yield from self._ops.txn_read(handle, key))
        except RingKVError as exc:
            self._noting(exc)
            raise

    def write(self, key: Key, value: Any = UNSET) -> Plan[None]:
        """Plan: a put of ``value``, or a delete (``UNSET``)."""
        handle = yield from self._open()
        try:
            yield from self._ops.txn_write(handle, key, value)
        except RingKVError as exc:
            self._noting(exc)
            raise

    def commit(self) -> Plan[TxnCommit]:
        handle = yield from self._open()
        try:
            self.outcome = yield from self._ops.txn_commit(handle)
        except Aborted as exc:
            if exc.details.get("reason") != "committed":
                self.ended = str(exc.details.get("reason") or exc.code)
                raise
            # A commit sent again after its answer was lost, and no longer remembered
            # as answered: only this commit can have committed it.
            self.outcome = TxnCommit(handle.id, True, None, handle.read_ts)
        except RingKVError as exc:
            # A commit that failed has ended it, whichever way (an unknown outcome too).
            self.ended = str(exc.details.get("ended") or exc.details.get("reason") or exc.code)
            raise
        self.ended = "committed"
        return self.outcome

    def abort(self) -> Plan[None]:
        """Plan: abort it if it is open (a transaction that ended already is left be)."""
        if self.handle is None or self.ended is not None:
            self.ended = self.ended or "client"
            return
        self.ended = "client"
        try:
            yield from self._ops.txn_abort(self.handle)
        except Aborted:
            pass  # it had ended at the node already: nothing is held

    def leave(self, failed: bool) -> Plan[None]:
        """Plan: the end of a ``with`` block: commit, or (``failed``) abort quietly."""
        if not failed:
            if self.ended is None:
                yield from self.commit()
            return
        try:
            yield from self.abort()
        except RingKVError:
            pass  # never hide the block's own exception; the node's idle timeout cleans up


def rerun_pause_s(ops: Operations, error: BaseException, attempt: int,
                  max_retries: int | None) -> float | None:
    """How long to wait before running a transaction's function again after ``error``
    ended attempt ``attempt`` (from 0), or None: raise it. ``max_retries`` None: the
    client's ``txn_retries``."""
    if not isinstance(error, Aborted) or error.details.get("reason") not in RERUN_REASONS:
        return None
    if attempt >= (ops.txn_retries if max_retries is None else max_retries):
        return None
    return ops.backoff(attempt)
