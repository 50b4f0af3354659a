"""The newest commit timestamp a replica's store holds writes at in its range.

A watch's poll of a range asks for the writes committed in (since, at] once
the replica's safe time has passed ``at``; with no index by timestamp, the
store answers by reading every key of the range. When the newest commit
timestamp whose writes this replica holds in the range is at or below
``since``, the answer is known without reading: nothing, complete through
``at`` (no write at or below ``at`` can still arrive: safe time passed it).

The value is the maximum, not the last: a transaction across ranges applies
its outcome at its commit timestamp, which may lie below a later one-range
commit's. It is known only when every write to the range's MVCC data since
a point passed through the group's apply path: each apply notes its
timestamp here, and one read of the store (``MvccStore.newest_commit``),
begun after tracking began, gives what was there before. Anything else that
writes the range (a snapshot install, page by page) ``forget``s: the value
is unknown again, and a read begun before it is refused (``epoch``). A new
replica (start, restart, a member added) begins unknown.

Pure: no clock, no I/O; the group and ``TxnService`` drive it.
"""

from __future__ import annotations


class NewestWrite:
    """One replica's newest written commit timestamp in its range, or unknown."""

    def __init__(self) -> None:
        self.epoch = 0  # moves on every forget: a read begun before it is refused
        self._applied_us: int | None = None  # newest applied since tracking began; None: not
        self._base_us: int | None = None  # newest in the store when tracking began
        self._reading = False  # a read of the store for the base is in flight

    @property
    def newest_us(self) -> int | None:
        """The newest commit timestamp written in the range, or None when unknown."""
        if self._applied_us is None or self._base_us is None:
            return None
        return max(self._applied_us, self._base_us)

    def nothing_after(self, since_us: int) -> bool:
        """Whether the store certainly holds no write in the range above ``since_us``."""
        newest = self.newest_us
        return newest is not None and newest <= since_us

    def applied(self, commit_ts_us: int) -> None:
        """Writes at ``commit_ts_us`` went through the group's apply path."""
        if self._applied_us is not None and commit_ts_us > self._applied_us:
            self._applied_us = commit_ts_us

    def start(self) -> int | None:
        """Begin tracking, when unknown and no read is in flight: returns the epoch to
        hand ``settle`` once the store's newest timestamp, read from now on, is known."""
        if self._reading or self.newest_us is not None:
            return None
        self._applied_us = 0
        self._base_us = None
        self._reading = True
        return self.epoch

    def settle(self, epoch: int, base_us: int) -> None:
        """The store's newest commit timestamp in the range, read after ``start``
        returned ``epoch``: known from now on, unless something forgot meanwhile."""
        if epoch != self.epoch:
            return
        self._base_us = base_us
        self._reading = False

    def abandon(self, epoch: int) -> None:
        """The read begun at ``epoch`` failed: unknown again."""
        if epoch == self.epoch:
            self.forget()

    def forget(self) -> None:
        """The range's MVCC data was written other than by the apply path: unknown."""
        self.epoch += 1
        self._applied_us = None
        self._base_us = None
        self._reading = False
