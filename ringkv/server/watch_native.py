"""A watch over the native protocol (shell): the ``watch`` operation's stream of frames.

The watch itself is ``server/watch_session.py``'s, the same as HTTP's; this
module is its native sink. Each event goes out as a response frame with the
watch's request id, payload ``{"status": 200, "event": <the NDJSON line HTTP
would send>, "more": true}``; the last frame has ``"more": false`` (and the
node's final error event, when the node ended the stream). A refusal before
the stream starts is an ordinary answer (``{"status", "body"}``, no
``more``). ``watch_cancel`` ends one watch; closing the connection ends them
all. ``docs/native-protocol.md`` specifies the frames.

Back-pressure: the connection's transport tells it when its write buffer is
over the high-water mark (``pause_writing``); the sink's writes wait until
it drains, so the session's buffer fills and its ``SLOW_S`` rule cuts the
watcher off with ``watcher_too_slow``, as HTTP's drain does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

from ringkv.clock import Clock
from ringkv.errors import Overloaded, ProtocolError
from ringkv.server import watch_session as ws
from ringkv.txn.watch import frame

if TYPE_CHECKING:
    from ringkv.node import Node

MAX_WATCHES_PER_CONNECTION = 16  # a connection's watches; txn.max_watches bounds the node's


class StreamTarget(Protocol):
    """What a native sink needs of its connection (``server/native.py``)."""

    watches: dict[int, ws.WatchSession]
    writable: asyncio.Event  # set while the transport takes more (not over its high-water mark)

    @property
    def is_closed(self) -> bool: ...

    def write_stream(self, request_id: int, event: bytes | None, *, more: bool) -> None: ...

    def close_unread(self) -> None: ...


class NativeSink:
    """One watch's events as frames of its request id."""

    def __init__(self, conn: StreamTarget, request_id: int, clock: Clock) -> None:
        self.conn = conn
        self.request_id = request_id
        self.clock = clock

    async def begin(self, event: dict[str, Any], event_id: int) -> None:
        if self.conn.is_closed:
            raise ws.SinkClosed
        self.conn.write_stream(self.request_id, frame(event, sse=False), more=True)

    async def send(self, event: dict[str, Any], event_id: int | None) -> None:
        # Written at once, then wait for room, as HTTP's write then drain: an event the
        # session popped is always on its way (the final event's last_version counts it).
        conn = self.conn
        if conn.is_closed:
            raise ws.SinkClosed
        conn.write_stream(self.request_id, frame(event, sse=False), more=True)
        while not conn.writable.is_set():  # bounded: the session cuts a watcher off by SLOW_S
            if conn.is_closed:
                raise ws.SinkClosed
            await ws.within(self.clock, conn.writable.wait(), ws.WAKE_S)

    async def end(self, final: dict[str, Any] | None) -> None:
        conn = self.conn
        if conn.is_closed:
            return
        conn.write_stream(self.request_id, None if final is None else frame(final, sse=False),
                          more=False)
        if final is not None and not conn.writable.is_set():
            # A client that reads nothing: as HTTP, its connection is closed (what is
            # written reaches it if it reads again) rather than kept filling.
            if not await ws.within(self.clock, conn.writable.wait(), ws.FINAL_WRITE_S):
                conn.close_unread()


async def serve(node: Node, conn: StreamTarget, request_id: int, keyspace: str,
                key: bytes | None, args: Mapping[str, str]) -> None:
    """Run one native watch to its end. Raises (before the stream starts) what refuses it:
    the caller answers that as any operation's error."""
    ws.watchable(node, keyspace)
    spec = ws.spec(keyspace, key, args)
    if request_id in conn.watches:
        raise ProtocolError(f"request id {request_id} names a watch of this connection that "
                            "is still open", field="request_id")
    if len(conn.watches) >= MAX_WATCHES_PER_CONNECTION:
        raise Overloaded(f"this connection has {MAX_WATCHES_PER_CONNECTION} watches open, its "
                         "limit; cancel one, or open another connection",
                         reason="max_watches_per_connection", limit=MAX_WATCHES_PER_CONNECTION)
    ws.take_slot(node)
    session = ws.WatchSession(node, spec, NativeSink(conn, request_id, node.clock))
    conn.watches[request_id] = session
    try:
        await session.run()
    except ws.SinkClosed:
        return  # the connection closed before the stream began: nobody to answer
    finally:
        conn.watches.pop(request_id, None)
        ws.give_slot(node)
