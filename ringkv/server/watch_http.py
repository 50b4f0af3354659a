"""``GET /v1/watch/{keyspace}[/{key}]``: a transactional keyspace's commits, streamed (shell).

What to deliver and when is decided in ``txn/watch.py``; this module runs it
for one HTTP request: a poll loop that asks every range the watch spans for
its commits in ``(last, T]`` (``TxnService`` op ``changes``, served like a
snapshot read at ``T``), and a writer that streams the buffered events as
NDJSON or server-sent events. The two meet in a bounded ``WatchBuffer``:
the poll loop stops polling while the buffer is over half full, and a
watcher whose buffer stays that full ``SLOW_S`` is cut off with a last
``watcher_too_slow`` event naming the version to resume from.

A watch whose ``from_version`` is compacted, on a keyspace that is not
transactional, or beyond ``txn.max_watches`` is refused before the stream
starts, with the usual JSON error. Once streaming, failed polls (a range
electing a leader, a peer down) are retried every poll for up to
``STALL_S``; then, or when the node shuts down, the stream ends with an
``error`` event naming ``last_version``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web

from ringkv.clock import Clock
from ringkv.errors import BadRequest, Compacted, Overloaded, RingKVError
from ringkv.server import handlers as h
from ringkv.server import validation as v
from ringkv.txn.service import CHANGES, Op
from ringkv.txn.watch import (
    WATCHER_TOO_SLOW,
    Change,
    Merged,
    Progress,
    RangeAnswer,
    WatchBuffer,
    error_json,
    event_json,
    fit,
    frame,
    merge,
    start_version,
)

if TYPE_CHECKING:
    from ringkv.node import Node
    from ringkv.txn.service import TxnService

log = logging.getLogger(__name__)

PAGE_EVENTS = 1000  # changes one range returns per poll at most (more come next poll)
SLOW_S = 5.0  # a buffer over half full this long: the watcher is too slow, cut off
STALL_S = 30.0  # polls failing this long end the stream (the client resumes elsewhere)
FINAL_WRITE_S = 1.0  # the last event and the end of the stream, written within this
ABORT_AFTER_S = 10.0  # a cut-off connection whose client still reads nothing is dropped
WAKE_S = 1.0  # the writer looks at the buffer at least this often
QUERY = frozenset({"prefix", "from_version", "format"})
NDJSON, SSE = "application/x-ndjson", "text/event-stream"


@dataclass(frozen=True)
class WatchSpec:
    keyspace: str
    key: bytes  # the key, or the prefix (empty: the whole keyspace)
    prefix: bool
    from_version: int | None
    sse: bool


class _Open:
    """The watches open on this node (``txn.max_watches``)."""

    def __init__(self) -> None:
        self.count = 0


def add_routes(app: web.Application, node: Node) -> None:
    """Register the watch routes (read permission on the keyspace)."""
    opened = _Open()

    async def watch(request: web.Request) -> web.StreamResponse:
        spec = parse(request, node)
        limit = node.config.txn.max_watches
        if opened.count >= limit:
            raise Overloaded(f"this node serves {limit} watches already (txn.max_watches); "
                             "try another node or later", reason="max_watches", limit=limit)
        opened.count += 1
        node.txn.stats["watches_open"] = opened.count  # /v1/status shows them
        try:
            return await _Stream(request, node, spec).run()
        finally:
            opened.count -= 1
            node.txn.stats["watches_open"] = opened.count

    app.router.add_get("/v1/watch/{keyspace}/{key:.+}", watch, name="watch", allow_head=False)
    app.router.add_get("/v1/watch/{keyspace}", watch, name="watch_keyspace", allow_head=False)


def parse(request: web.Request, node: Node) -> WatchSpec:
    """The watch a request asks for, or BadRequest naming the field."""
    keyspace = request.match_info["keyspace"]
    h.check_keyspace(node, keyspace)
    if keyspace not in node.txn.keyspaces:
        raise BadRequest(f"keyspace {keyspace!r} is eventual: watches need a transactional "
                         "keyspace", field="keyspace")
    query = request.query
    unknown = sorted(set(query) - QUERY)
    if unknown:
        raise BadRequest(f"unknown parameter {unknown[0]!r}; a watch takes prefix, "
                         "from_version and format", field=unknown[0])
    whole = "key" not in request.match_info
    key = b"" if whole else v.key_after(request.rel_url.raw_path, 3, node.config.limits)
    prefix_text = query.get("prefix", "true" if whole else "false").lower()
    if prefix_text not in ("true", "false", "1", "0"):
        raise BadRequest("prefix must be true or false", field="prefix")
    prefix = prefix_text in ("true", "1")
    if whole and not prefix:
        raise BadRequest("a watch of a whole keyspace is a prefix watch", field="prefix")
    from_text = query.get("from_version")
    if from_text is None and request.headers.get("Last-Event-ID"):
        from_text = request.headers["Last-Event-ID"]  # an EventSource reconnecting
    from_version = (None if from_text is None else
                    v.bounded_int(from_text, field="from_version", low=0, high=2**63 - 1,
                                  default=0))
    fmt = query.get("format")
    if fmt not in (None, "ndjson", "sse"):
        raise BadRequest("format must be ndjson or sse", field="format")
    sse = fmt == "sse" or (fmt is None and SSE in request.headers.get("Accept", ""))
    return WatchSpec(keyspace, key, prefix, from_version, sse)


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


class _Stream:
    """One watch request, from its first poll to the end of its stream."""

    def __init__(self, request: web.Request, node: Node, spec: WatchSpec) -> None:
        self.request = request
        self.node = node
        self.spec = spec
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
        self.cut = False  # too slow: the buffer is dropped, the writer interrupted
        self.buffer: WatchBuffer | None = None

    async def run(self) -> web.StreamResponse:
        spec = self.spec
        started_s = self.clock.monotonic_s()
        start_us = start_version(spec.from_version, self.txn.snapshot_now_us())
        buffer = self.buffer = WatchBuffer(self.max_events, start_us, now_s=started_s)
        # The first poll before the answer starts: a compacted from_version, a range
        # that cannot be read, are plain JSON errors.
        first = await poll(self.txn, spec, self.range_ends, start_us, started_s=started_s,
                           timeout_s=self.timeout_s)
        response = web.StreamResponse(headers={
            "Content-Type": SSE if spec.sse else NDJSON, "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no"})
        await response.prepare(self.request)
        # Where the stream starts: a watcher that must reconnect before any event
        # resumes from here.
        await response.write(frame(event_json(Progress(start_us)), sse=spec.sse,
                                   event_id=start_us))
        self._offer(first)
        writer = asyncio.get_running_loop().create_task(self._guarded(self._writer(response)))
        poller = asyncio.get_running_loop().create_task(self._guarded(self._poller()))
        try:
            await self.stop.wait()
            if not self.cut:  # what is buffered goes out first, within a bound
                await within(self.clock, asyncio.shield(writer), FINAL_WRITE_S)
        finally:
            for task in (writer, poller):
                task.cancel()
            await asyncio.gather(writer, poller, return_exceptions=True)
        await self._finish(response, buffer)
        return response

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
                self.cut = True
                self.txn.stats["watchers_too_slow"] += 1
                self._end(WATCHER_TOO_SLOW, f"the watcher left more than "
                          f"{buffer.max_events // 2} events unread for {SLOW_S:g} s "
                          "(txn.watch_buffer_events); resume from last_version")
                return
            turn_s = self.clock.monotonic_s()
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
                    self.cut = True
                    self.txn.stats["watchers_too_slow"] += 1
                    self._end(WATCHER_TOO_SLOW, "a transaction writes more keys than a watcher "
                              "may buffer (txn.watch_buffer_events)")
                    return
            await self.clock.sleep(max(0.0, turn_s + self.poll_s - self.clock.monotonic_s()))

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

    async def _writer(self, response: web.StreamResponse) -> None:
        buffer = self.buffer
        assert buffer is not None
        sse = self.spec.sse
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
                await response.write(frame(event_json(item), sse=sse, event_id=event_id))
            except (ConnectionError, RuntimeError):
                self.stop.set()  # the client went away
                return
            self.drained.set()

    async def _finish(self, response: web.StreamResponse, buffer: WatchBuffer) -> None:
        """Write the last event (if the node ends the stream) and the end of the
        stream, within a bound; a client that reads nothing has its connection closed."""
        transport = self.request.transport
        try:
            done = True
            if self.final is not None:
                self.final["error"]["last_version"] = buffer.delivered_us
                done = await within(self.clock, response.write(frame(self.final, sse=self.spec.sse)),
                                    FINAL_WRITE_S)
            if done:
                done = await within(self.clock, response.write_eof(), FINAL_WRITE_S)
        except (ConnectionError, RuntimeError):
            return
        if not done and transport is not None:
            # The client reads nothing: what is written reaches it if it ever reads
            # again; the connection is closed, and dropped if it still does not read.
            transport.close()
            self.clock.call_later(ABORT_AFTER_S, transport.abort)
