"""One shared poll per range for every watch a node serves (shell).

Each (keyspace, range) some live watch spans has one ``RangeFeed``: a loop
that asks the range, every ``txn.watch_poll_ms``, for all its commits in
``(resolved, T]`` (``TxnService`` op ``changes`` over the whole range, as a
prefix watch's poll) and hands the answer to every session subscribed to
it, each keeping its own keys (``server/watch_session.py``). N watchers on
a node thus cost one poll per range per interval, not N. Etcd fans one
event stream out to its watchers and CockroachDB's rangefeed does the same
per range; this is the polling form of it.

A commit does not wait for the next interval where this node replicates its
range: as the range's group applies entries here, ``TxnService`` tells the
hub (``applied``) the newest commit timestamp they wrote and the replica's
safe time, and every feed of that keyspace not yet resolved past the commit
is woken and polls at once (a watch over several ranges delivers a version
once each of its ranges is past it). The woken range polls up to this
replica's safe time, which has passed the commit: it is served here with no
wait for safe time to pass ``TT.now().latest``; the others poll up to
``TT.now().latest`` as on the grid (at their leader, a reservation rather
than a wait). Wakes coalesce: a feed woken while it polls polls once more
right after, however many commits woke it. The grid stays, for ranges this
node does not replicate and for any wake missed, though a grid point less
than an interval after a woken poll is skipped (commits keep the feed
moving; a poll that reads reads the whole range). A woken poll asks for
``(resolved, T]`` like any other, so only when events arrive changes. The
polls of the ranges a commit did not write cost no read of the store: their
replica answers from the newest timestamp written in its range
(``txn/newest_write.py``), at or below ``resolved``.

The feed's answers are contiguous: each starts where the last was
resolved, so a session that has itself offered everything up to there
(``txn/watch.py``'s ``caught_up``) can take them from then on with no gap
and no repeat; the feed keeps its last few answers, so a watch whose own
poll ended a little below the feed's point joins by replaying them. A feed with no subscribers stops polling and is dropped: a
keyspace nobody watches costs nothing. A failed poll is retried next turn;
the sessions see how long it has failed and apply their ``STALL_S``. A
poll refused as ``compacted`` (the feed fell behind garbage collection) or
failing in a way the loop does not expect ends every subscriber's stream.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import TYPE_CHECKING, Any, Protocol

from ringkv.errors import Compacted, RingKVError
from ringkv.txn.service import CHANGES, Op
from ringkv.txn.watch import Change

if TYPE_CHECKING:
    from ringkv.node import Node

log = logging.getLogger(__name__)

PAGE_EVENTS = 1000  # changes one range returns per poll at most (more come next poll)
RECENT_POLLS = 4  # answers a feed keeps, so a watch a little behind can still join it


class Subscriber(Protocol):
    """What a feed needs of a watch session."""

    def feed_batch(self, feed: RangeFeed, changes: list[Change], resolved_us: int) -> None:
        """The range's commits in (the feed's previous resolved point, ``resolved_us``]."""

    def feed_failed(self, exc: BaseException) -> None:
        """The feed cannot go on (``compacted``, or a failure the loop does not expect)."""


class RangeFeed:
    """One range's shared poll and its subscribers."""

    def __init__(self, keyspace: str, range_end: int, at_us: int) -> None:
        self.keyspace = keyspace
        self.range_end = range_end
        self.resolved_us = at_us  # the next poll asks for (resolved_us, T]
        self.subscribers: dict[int, Subscriber] = {}  # by id(): in subscription order
        self.failing_since_s: float | None = None  # the first of the polls failing now
        self.failure: BaseException | None = None  # the last failed poll's error
        self.polls = 0  # polls that succeeded (tests and status)
        self.woken_polls = 0  # of those, the ones a commit applied here started (tests)
        # Pushed by the range's group on this node (``WatchHub.applied``): its safe time
        # here, and the newest commit (in any range of the keyspace) to be resolved past.
        self.safe_us = 0
        self.target_us = 0
        self.pushed = False  # woken since the last poll began: poll now, not on the grid
        self.woken_s: float | None = None  # when the last woken poll began (node's clock)
        self.due = asyncio.Event()  # a wake, or the next grid point
        # The last answers' changes, each from where the one before was resolved: a watch
        # that has offered everything up to ``replay_from_us`` joins with no gap.
        self.recent: deque[tuple[int, list[Change]]] = deque(maxlen=RECENT_POLLS)
        self.task: asyncio.Task[None] | None = None

    @property
    def replay_from_us(self) -> int:
        """Where the kept answers start: everything above it is in them or to come."""
        return self.recent[0][0] if self.recent else self.resolved_us

    def replay(self) -> list[Change]:
        """The kept answers' changes, in the order they came."""
        return [change for _, changes in self.recent for change in changes]


class WatchHub:
    """A node's range feeds, created while some watch spans their range."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.feeds: dict[tuple[str, int], RangeFeed] = {}
        node.txn.on_applied = self.applied

    def applied(self, keyspace: str, range_end: int, written_us: int, safe_us: int) -> None:
        """A range's group applied entries on this node (``TxnService.on_applied``):
        ``written_us``, the newest commit timestamp they wrote (0: none); ``safe_us``,
        the replica's safe time now. Feeds of the keyspace below the commit wake."""
        feed = self.feeds.get((keyspace, range_end))
        if feed is not None:
            feed.safe_us = safe_us
        if written_us == 0:
            return
        for (name, _), other in self.feeds.items():
            if name == keyspace and other.resolved_us < written_us:
                other.target_us = max(other.target_us, written_us)
                other.pushed = True
                other.due.set()

    def subscribe(self, session: Subscriber, keyspace: str, range_end: int) -> RangeFeed:
        """The range's feed, started if no watch had it (its first poll starts at
        ``TT.now().latest``); ``session`` gets its answers from now on."""
        feed = self.feeds.get((keyspace, range_end))
        if feed is None:
            feed = RangeFeed(keyspace, range_end, self.node.txn.snapshot_now_us())
            self.feeds[(keyspace, range_end)] = feed
            feed.task = asyncio.get_running_loop().create_task(self._run(feed))
        feed.subscribers[id(session)] = session
        return feed

    def unsubscribe(self, session: Subscriber, feed: RangeFeed) -> None:
        """``session`` ends; the feed stops with its last subscriber."""
        feed.subscribers.pop(id(session), None)
        if not feed.subscribers:
            self._drop(feed)

    def _drop(self, feed: RangeFeed) -> None:
        if self.feeds.get((feed.keyspace, feed.range_end)) is feed:
            del self.feeds[(feed.keyspace, feed.range_end)]
        if feed.task is not None and feed.task is not asyncio.current_task():
            feed.task.cancel()

    async def _run(self, feed: RangeFeed) -> None:
        node = self.node
        clock = node.clock
        poll_s = node.config.txn.watch_poll_ms / 1000
        timeout_s = node.config.timing.read_timeout_ms / 1000
        while feed.subscribers and not node.draining:  # bounded: ends with its last watch
            turn_s = clock.monotonic_s()
            woken, feed.pushed = feed.pushed, False
            if woken:
                feed.woken_s = turn_s
            elif feed.woken_s is not None and turn_s - feed.woken_s < poll_s:
                # A grid point less than an interval after a woken poll: commits keep
                # the feed moving, so this one is skipped (the next comes if they stop).
                await self._wait(feed, to_grid_s(clock.monotonic_s(), poll_s))
                continue
            # Woken, and this replica's safe time has passed the commit: up to it, served
            # here at once. Else up to TT.now().latest, as on the grid.
            upto_us = (feed.safe_us if woken and feed.safe_us >= feed.target_us
                       else node.txn.snapshot_now_us())
            try:
                changes, resolved_us = await self._poll(feed, upto_us, turn_s, timeout_s)
            except Compacted as exc:
                self._fail(feed, exc)
                return
            except (RingKVError, OSError) as exc:
                # A range electing a leader, a peer down: polled again next turn; the
                # sessions end their streams after STALL_S of it.
                if feed.failing_since_s is None:
                    feed.failing_since_s = turn_s
                feed.failure = exc
                log.debug("watch feed of %s/%s failed: %s", feed.keyspace, feed.range_end, exc)
            except Exception as exc:  # logged, and every stream ends naming it
                log.exception("watch feed of %r failed", feed.keyspace)
                self._fail(feed, exc)
                return
            else:
                feed.failing_since_s = None
                feed.failure = None
                feed.polls += 1
                feed.woken_polls += woken
                if resolved_us > feed.resolved_us:
                    feed.recent.append((feed.resolved_us, changes))
                    feed.resolved_us = resolved_us
                    for session in list(feed.subscribers.values()):
                        session.feed_batch(feed, changes, resolved_us)
            if not feed.pushed:  # woken while polling: once more, right away
                # On one grid for every feed: a watch over several ranges has all of them
                # past a commit after one interval, not after the last of several unaligned.
                await self._wait(feed, to_grid_s(clock.monotonic_s(), poll_s))

    async def _wait(self, feed: RangeFeed, delay_s: float) -> None:
        """Until the next grid point, ``delay_s`` away on the node's clock, or a wake."""
        feed.due.clear()
        if feed.pushed:
            return
        timer = self.node.clock.call_later(delay_s, feed.due.set)
        try:
            await feed.due.wait()
        finally:
            timer.cancel()

    async def _poll(self, feed: RangeFeed, upto_us: int, turn_s: float,
                    timeout_s: float) -> tuple[list[Change], int]:
        txn = self.node.txn
        since_us = feed.resolved_us
        if upto_us <= since_us:
            return [], since_us
        op = Op(CHANGES, feed.keyspace, key=b"", snapshot_ts_us=upto_us, since_us=since_us,
                prefix=True, range_end=feed.range_end, limit=PAGE_EVENTS)
        result: dict[str, Any] = await txn.execute(op, started_s=turn_s, timeout_s=timeout_s)
        resolved_us = max(since_us, min(upto_us, int(result["complete"])))
        changes = [Change(bytes(key), None if value is None else bytes(value), int(ts))
                   for key, value, ts in result["items"]]
        return [c for c in changes if since_us < c.version_us <= resolved_us], resolved_us

    def _fail(self, feed: RangeFeed, exc: BaseException) -> None:
        """The feed's position is lost: every subscriber's stream ends, and the next
        watch of the range starts a new feed."""
        subscribers = list(feed.subscribers.values())
        feed.subscribers.clear()
        self._drop(feed)
        for session in subscribers:
            session.feed_failed(exc)


def to_grid_s(now_s: float, poll_s: float) -> float:
    """How long until the next grid point after ``now_s``: never a float's rounding
    error short of one (a wait that short would not move a virtual clock)."""
    delay_s = poll_s - now_s % poll_s
    return delay_s + poll_s if delay_s < poll_s / 1000 else delay_s


def hub_of(node: Node) -> WatchHub:
    """The node's hub, made on its first watch."""
    hub: WatchHub | None = getattr(node, "watch_hub", None)
    if hub is None:
        hub = WatchHub(node)
        setattr(node, "watch_hub", hub)  # noqa: B010 - a node made without one (tests' fakes)
    return hub
