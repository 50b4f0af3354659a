"""One watch of a transactional keyspace's commits, whatever carries it (shell).

What to deliver and when is decided in ``txn/watch.py``; this module runs it
for one watcher: a poll loop that asks every range the watch spans for its
commits in ``(last, T]`` (``TxnService`` op ``changes``, served like a
snapshot read at ``T``) until the watch has caught up with its node's shared
polls of those ranges (``server/watch_hub.py``, one per range for all the
node's watches), which feed it from then on (``txn/watch.py``'s
``caught_up`` and ``Fanin``) while its buffer is at most half full; and a
writer that hands the buffered events, one NDJSON line each, to a
``WatchSink``: HTTP's streamed response (``server/watch_http.py``) or the
native protocol's frames (``server/watch_native.py``). The polls and the
writer meet in a bounded ``WatchBuffer``: a watch over half full leaves the
shared polls, its own stop while the buffer stays that full, and a
watcher whose buffer stays that full ``SLOW_S`` is cut off with a last
``watcher_too_slow`` event naming the version to resume from. A sink whose
transport cannot take more (HTTP's drain, the native connection's write
buffer over its high-water mark) makes its writes wait, so the buffer fills
and the same rule cuts it off.

A watch whose ``from_version`` is compacted, on a keyspace that is not
transactional, or beyond ``txn.max_watches`` (HTTP and native watches
together) is refused before the stream starts, with the usual JSON error.
Once streaming, failed polls (a range electing a leader, a peer down) are
retried every poll for up to ``STALL_S``; then, or when the node shuts down,
the stream ends with an ``error`` event naming ``last_version``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from ringkv.clock import Clock
from ringkv.errors import BadRequest, Compacted, Overloaded, RingKVError
from ringkv.server import handlers as h
from ringkv.server import validation as v
from ringkv.server.watch_hub import PAGE_EVENTS, RangeFeed, hub_of
from ringkv.txn import watch as tw
from ringkv.txn.service import CHANGES, Op
from ringkv.txn.watch import (
    WATCHER_TOO_SLOW,
    Change,
    Fanin,
    Merged,
    Progress,
    RangeAnswer,
    WatchBuffer,
    error_json,
    event_json,
    fit,
    matches,
    merge,
    start_version,
)

if TYPE_CHECKING:
    from ringkv.node import Node
    from ringkv.txn.service import TxnService

log = logging.getLogger(__name__)

SLOW_S = 5.0  # a buffer over half full this long: the watcher is too slow, cut off
STALL_S = 30.0  # polls failing this long end the stream (the client resumes elsewhere)
FINAL_WRITE_S = 1.0  # the last event and the end of the stream, written within this
ABORT_AFTER_S = 10.0  # a cut-off connection whose client still reads nothing is dropped
WAKE_S = 1.0  # the writer looks at the buffer at least this often


@dataclass(frozen=True)
class WatchSpec:
    keyspace: str
    key: bytes  # the key, or the prefix (empty: the whole keyspace)
    prefix: bool
    from_version: int | None
    sse: bool


def watchable(node: Node, keyspace: str) -> None:
    """NotFound, or BadRequest naming the field, unless ``keyspace`` is transactional."""
    h.check_keyspace(node, keyspace)
    if keyspace not in node.txn.keyspaces:
        raise BadRequest(f"keyspace {keyspace!r} is eventual: watches need a transactional "
                         "keyspace", field="keyspace")


def spec(keyspace: str, key: bytes | None, query: Mapping[str, str], *,
         sse: bool = False) -> WatchSpec:
    """The watch asked for on a ``watchable`` keyspace (``key`` None: the whole
    keyspace), or BadRequest naming the field. ``query``: ``prefix`` and
    ``from_version``, as HTTP's query has them."""
    whole = key is None
    prefix_text = query.get("prefix", "true" if whole else "false").lower()
    if prefix_text not in ("true", "false", "1", "0"):
        raise BadRequest("prefix must be true or false", field="prefix")
    prefix = prefix_text in ("true", "1")
    if whole and not prefix:
        raise BadRequest("a watch of a whole keyspace is a prefix watch", field="prefix")
    from_text = query.get("from_version")
    from_version = (None if from_text is None else
                    v.bounded_int(from_text, field="from_version", low=0, high=2**63 - 1,
                                  default=0))
    return WatchSpec(keyspace, key or b"", prefix, from_version, sse)


def take_slot(node: Node) -> None:
    """Count a new watch against ``txn.max_watches``, or refuse it. The count is the one
    /v1/status shows, and both front ends share it."""
    stats = node.txn.stats
    limit = node.config.txn.max_watches
    if stats["watches_open"] >= limit:
        raise Overloaded(f"this node serves {limit} watches already (txn.max_watches); "
                         "try another node or later", reason="max_watches", limit=limit)
    stats["watches_open"] += 1


def give_slot(node: Node) -> None:
    node.txn.stats["watches_open"] -= 1


def range_ends(txn: TxnService, spec: WatchSpec) -> list[int | None]:
    """The ranges a watch polls: every range of the keyspace for a prefix, else the key's
    (None: the op finds it). Shared with the simulator's watcher (``sim/coordination.py``)."""
    if spec.prefix:
        return [r.end for r in txn.range_map(spec.keyspace).ranges]
    return [None]


async def poll(txn: TxnService, spec: WatchSpec, range_ends: list[int | None], since_us: int,
               *, started_s: float, timeout_s: float) -> Merged:
    """Every range's commits in (since_us, now], merged (``txn/watch.py``)."""
    upto_us = txn.snapshot_now_us()
    if upto_us <= since_us:
        return Merged([], since_us)
    ops = [Op(CHANGES, spec.keyspace, key=spec.key, snapshot_ts_us=upto_us, since_us=since_us,
              prefix=spec.prefix, range_end=end, limit=PAGE_EVENTS) for end in range_ends]
    results = await asyncio.gather(
        *(txn.execute(op, started_s=started_s, timeout_s=timeout_s) for op in ops),
        return_exceptions=True)
    answers = []
    for result in results:
        if isinstance(result, BaseException):
            raise result
        changes = [Change(bytes(key), None if value is None else bytes(value), int(ts))
                   for key, value, ts in result["items"]]
        answers.append(RangeAnswer(changes, int(result["complete"])))
    return merge(since_us, upto_us, answers)


async def within(clock: Clock, awaitable: Awaitable[Any], timeout_s: float) -> bool:
    """Await ``awaitable`` for at most ``timeout_s`` on ``clock``: False when it was cut
    short (it is cancelled then). A cancellation of the caller still propagates."""
    task = asyncio.ensure_future(awaitable)
    timer = clock.call_later(max(0.0, timeout_s), task.cancel)
    try:
        await task
        return True
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise
        return False
    finally:
        timer.cancel()


class SinkClosed(Exception):
    """The watcher went away: nothing more can reach it."""


class WatchSink(Protocol):
    """Where one watch's events go: a transport's thin writer."""

    async def begin(self, event: dict[str, Any], event_id: int) -> None:
        """The stream starts with ``event`` (a progress naming where it starts)."""

    async def send(self, event: dict[str, Any], event_id: int | None) -> None:
        """One event (``event_id``: the version a reconnect may resume after, when the
        event completes its version); may wait while the transport is full; raises
        ``SinkClosed`` when the watcher went away."""

    async def end(self, final: dict[str, Any] | None) -> None:
        """The stream ends, with ``final`` (an error event naming ``last_version``) when
        the node ends it; bounded by ``FINAL_WRITE_S`` per write."""


class WatchSession:
    """One watch, from its first poll to the end of its stream."""

    def __init__(self, node: Node, spec: WatchSpec, sink: WatchSink) -> None:
        self.node = node
        self.spec = spec
        self.sink = sink
        self.clock = node.clock
        self.txn = node.txn
        config = node.config
        self.poll_s = config.txn.watch_poll_ms / 1000
        self.timeout_s = config.timing.read_timeout_ms / 1000
        self.max_events = config.txn.watch_buffer_events
        self.range_ends = range_ends(self.txn, spec)
        self.stop = asyncio.Event()
        self.wake = asyncio.Event()  # the writer: something was offered, or the end
        self.drained = asyncio.Event()  # the poll loop: the writer took something
        self.final: dict[str, Any] | None = None  # the last event, when the node ends it
        self.cut = False  # too slow or cancelled: the buffer is dropped, the writer interrupted
        self.buffer: WatchBuffer | None = None
        # Live: the node's shared polls (``server/watch_hub.py``) feed this watch;
        # else (catching up, or too far behind to take them) it polls on its own.
        self.feeds: list[RangeFeed] = []
        self.fanin: Fanin | None = None
        self.live_turns = 0  # times this watch switched to the shared polls (tests)

    def cancel(self) -> None:
        """The watcher asked to stop (the native ``watch_cancel``): no more events, and
        no final error event."""
        self.cut = True
        self.stop.set()
        self.wake.set()

    async def run(self) -> None:
        """Poll and stream until the stream ends. A failure of the first poll (a compacted
        ``from_version``, a range that cannot be read) raises before the stream starts."""
        spec = self.spec
        started_s = self.clock.monotonic_s()
        start_us = start_version(spec.from_version, self.txn.snapshot_now_us())
        buffer = self.buffer = WatchBuffer(self.max_events, start_us, now_s=started_s)
        first = await poll(self.txn, spec, self.range_ends, start_us, started_s=started_s,
                           timeout_s=self.timeout_s)
        hub = hub_of(self.node)
        try:
            for end in self._feed_ends():
                self.feeds.append(hub.subscribe(self, spec.keyspace, end))
            # Where the stream starts: a watcher that must reconnect before any event
            # resumes from here.
            await self.sink.begin(event_json(Progress(start_us)), start_us)
            self._offer(first)
            self._try_live()
            await self._stream(buffer)
        finally:
            for feed in self.feeds:
                hub.unsubscribe(self, feed)

    def _feed_ends(self) -> list[int]:
        """The ranges whose shared polls this watch takes: all of its keyspace's for a
        prefix, the key's own range for a key."""
        ranges = self.txn.range_map(self.spec.keyspace).ranges
        if self.spec.prefix or len(ranges) == 1:
            return [r.end for r in ranges]
        return [self.txn.range_map(self.spec.keyspace).range_for_key(self.spec.key).end]

    async def _stream(self, buffer: WatchBuffer) -> None:
        loop = asyncio.get_running_loop()
        writer = loop.create_task(self._guarded(self._writer()))
        poller = loop.create_task(self._guarded(self._poller()))
        try:
            await self.stop.wait()
            if not self.cut:  # what is buffered goes out first, within a bound
                await within(self.clock, asyncio.shield(writer), FINAL_WRITE_S)
        finally:
            for task in (writer, poller):
                task.cancel()
            await asyncio.gather(writer, poller, return_exceptions=True)
        if self.final is not None:
            self.final["error"]["last_version"] = buffer.delivered_us
        await self.sink.end(self.final)

    async def _guarded(self, work: Awaitable[None]) -> None:
        """Run the poll loop or the writer; a failure of either ends the stream (never a
        handler left waiting, holding a watch slot)."""
        try:
            await work
        except Exception:  # noqa: BLE001 - logged, and the stream ends naming it
            log.exception("watch of %r failed", self.spec.keyspace)
            self._end("internal", "the watch failed on the node; resume from last_version")
        finally:
            self.stop.set()
            self.wake.set()

    def _end(self, code: str, message: str, **details: Any) -> None:
        assert self.buffer is not None
        if not self.stop.is_set():
            self.final = error_json(code, message, self.buffer.delivered_us, **details)
            self.stop.set()
            self.wake.set()

    def feed_batch(self, feed: RangeFeed, changes: list[Change], resolved_us: int) -> None:
        """A shared poll's answer for one range (the hub calls this): taken while live."""
        fanin = self.fanin
        buffer = self.buffer
        if fanin is None or buffer is None or self.stop.is_set():
            return
        spec = self.spec
        fanin.add(self.feeds.index(feed),
                  [c for c in changes if matches(c, spec.key, spec.prefix)], resolved_us)
        self._take_live(fanin, buffer)

    def _take_live(self, fanin: Fanin, buffer: WatchBuffer) -> None:
        """Offer what every range's shared poll has resolved, or fall back to own polls."""
        merged = fanin.take(buffer.offered_us, buffer.room)
        if merged is None:
            if buffer.events == 0:
                self._too_slow("a transaction writes more keys than a watcher may buffer "
                               "(txn.watch_buffer_events)")
            self.fanin = None  # polls on its own, once the writer makes room
            return
        buffer.offer(merged)
        self.wake.set()
        if 2 * buffer.events > buffer.max_events:
            # Too far behind to take the shared polls: it polls on its own from what it
            # has offered, and stops polling while its buffer stays full (SLOW_S).
            self.fanin = None

    def feed_failed(self, exc: BaseException) -> None:
        """A shared poll of one of this watch's ranges cannot go on: the stream ends."""
        if isinstance(exc, RingKVError):
            self._end(exc.code, exc.message, **exc.details)
        else:
            self._end("internal", "the watch failed on the node; resume from last_version")

    def _try_live(self) -> None:
        """Switch to the shared polls once this watch has offered everything up to
        where each of them can replay from, with room in its buffer."""
        buffer = self.buffer
        assert buffer is not None
        if (self.fanin is None and not self.stop.is_set()
                and 2 * buffer.events <= buffer.max_events
                and tw.caught_up(buffer.offered_us, [f.replay_from_us for f in self.feeds])):
            spec = self.spec
            fanin = self.fanin = Fanin(len(self.feeds), buffer.offered_us)
            for index, feed in enumerate(self.feeds):
                fanin.add(index, [c for c in feed.replay() if matches(c, spec.key, spec.prefix)],
                          feed.resolved_us)
            self.live_turns += 1
            self._take_live(fanin, buffer)

    def _stalled(self, now_s: float) -> RangeFeed | None:
        """A shared poll of this watch's ranges failing longer than STALL_S."""
        for feed in self.feeds:
            if feed.failing_since_s is not None and now_s - feed.failing_since_s > STALL_S:
                return feed
        return None

    def _offer(self, merged: Merged) -> bool:
        """Buffer what fits; False when not even the next transaction fits."""
        assert self.buffer is not None
        fitted = fit(merged, self.buffer.room)
        if fitted is None:
            return False
        self.buffer.offer(fitted)
        self.wake.set()
        return True

    async def _poller(self) -> None:
        buffer = self.buffer
        assert buffer is not None
        failing_since_s: float | None = None
        while not self.stop.is_set():  # bounded: ends with the stream, a poll per turn
            if self.node.draining:
                self._end("shutting_down", "the node is shutting down; resume elsewhere")
                return
            if 2 * buffer.events > buffer.max_events and not await self._room():
                self._too_slow(f"the watcher left more than {buffer.max_events // 2} events "
                               f"unread for {SLOW_S:g} s (txn.watch_buffer_events); resume "
                               "from last_version")
                return
            turn_s = self.clock.monotonic_s()
            if self.fanin is not None:  # live: the shared polls feed the buffer
                stalled = self._stalled(turn_s)
                if stalled is not None:
                    exc = stalled.failure
                    code = exc.code if isinstance(exc, RingKVError) else "unavailable"
                    self._end(code, f"no poll of the watch succeeded for {STALL_S:g} s: "
                              f"{exc}; resume from last_version")
                    return
                await self.clock.sleep(self.poll_s)
                continue
            try:
                merged = await poll(self.txn, self.spec, self.range_ends, buffer.offered_us,
                                    started_s=turn_s, timeout_s=self.timeout_s)
            except Compacted as exc:
                self._end(exc.code, exc.message, **exc.details)
                return
            except (RingKVError, OSError) as exc:
                # A range electing a leader, a peer down: polled again next turn.
                failing_since_s = turn_s if failing_since_s is None else failing_since_s
                if turn_s - failing_since_s > STALL_S:
                    code = exc.code if isinstance(exc, RingKVError) else "unavailable"
                    self._end(code, f"no poll of the watch succeeded for {STALL_S:g} s: "
                              f"{exc}; resume from last_version")
                    return
                log.debug("watch poll failed: %s", exc)
            else:
                failing_since_s = None
                if not self._offer(merged) and buffer.events == 0:
                    self._too_slow("a transaction writes more keys than a watcher may buffer "
                                   "(txn.watch_buffer_events)")
                    return
                self._try_live()
                if self.fanin is not None:
                    continue  # live from here: no wait for a poll of its own
            await self.clock.sleep(max(0.0, turn_s + self.poll_s - self.clock.monotonic_s()))

    def _too_slow(self, message: str) -> None:
        if self.stop.is_set():
            return
        self.cut = True
        self.txn.stats["watchers_too_slow"] += 1
        self._end(WATCHER_TOO_SLOW, message)

    async def _room(self) -> bool:
        """Wait (at most SLOW_S) for the buffer to drop to half full."""
        buffer = self.buffer
        assert buffer is not None
        deadline_s = self.clock.monotonic_s() + SLOW_S
        while 2 * buffer.events > buffer.max_events:
            remaining_s = deadline_s - self.clock.monotonic_s()
            if remaining_s <= 0 or self.stop.is_set():
                return False
            self.drained.clear()
            await within(self.clock, self.drained.wait(), min(remaining_s, WAKE_S))
        return True

    async def _writer(self) -> None:
        buffer = self.buffer
        assert buffer is not None
        while True:  # bounded: ends with the stream; waits are bounded by WAKE_S
            item = buffer.pop(self.clock.monotonic_s())
            if item is None:
                if self.stop.is_set():
                    return
                self.wake.clear()
                await within(self.clock, self.wake.wait(), WAKE_S)
                continue
            if isinstance(item, Change):
                event_id = item.version_us if buffer.completes(item) else None
            else:
                event_id = item.version_us
            try:
                await self.sink.send(event_json(item), event_id)
            except SinkClosed:
                self.stop.set()  # the watcher went away
                return
            self.drained.set()
