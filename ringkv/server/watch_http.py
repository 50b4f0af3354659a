"""``GET /v1/watch/{keyspace}[/{key}]``: a transactional keyspace's commits, streamed over
HTTP (shell).

The watch itself (the poll loop, the bounded buffer, the too-slow cut-off,
the stall bound, the last event) is ``server/watch_session.py``'s, shared
with the native protocol's watches (``server/watch_native.py``); this module
parses the request and writes the events as NDJSON lines or server-sent
events. A refusal before the stream starts (a compacted ``from_version``, an
eventual keyspace, ``txn.max_watches`` reached) is the usual JSON error.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aiohttp import web

from ringkv.errors import BadRequest
from ringkv.server import validation as v
from ringkv.server import watch_session as ws
from ringkv.server.watch_session import (  # noqa: F401 - the names other modules use here
    PAGE_EVENTS,
    WatchSpec,
    poll,
    range_ends,
    within,
)
from ringkv.txn.watch import frame

if TYPE_CHECKING:
    from ringkv.node import Node

QUERY = frozenset({"prefix", "from_version", "format"})
NDJSON, SSE = "application/x-ndjson", "text/event-stream"


def add_routes(app: web.Application, node: Node) -> None:
    """Register the watch routes (read permission on the keyspace)."""

    async def watch(request: web.Request) -> web.StreamResponse:
        spec = parse(request, node)
        ws.take_slot(node)
        try:
            sink = HttpSink(request, node, spec.sse)
            await ws.WatchSession(node, spec, sink).run()
            assert sink.response is not None
            return sink.response
        finally:
            ws.give_slot(node)

    app.router.add_get("/v1/watch/{keyspace}/{key:.+}", watch, name="watch", allow_head=False)
    app.router.add_get("/v1/watch/{keyspace}", watch, name="watch_keyspace", allow_head=False)


def parse(request: web.Request, node: Node) -> WatchSpec:
    """The watch a request asks for, or BadRequest naming the field."""
    keyspace = request.match_info["keyspace"]
    ws.watchable(node, keyspace)
    query = request.query
    unknown = sorted(set(query) - QUERY)
    if unknown:
        raise BadRequest(f"unknown parameter {unknown[0]!r}; a watch takes prefix, "
                         "from_version and format", field=unknown[0])
    fmt = query.get("format")
    if fmt not in (None, "ndjson", "sse"):
        raise BadRequest("format must be ndjson or sse", field="format")
    sse = fmt == "sse" or (fmt is None and SSE in request.headers.get("Accept", ""))
    whole = "key" not in request.match_info
    args = {name: query[name] for name in ("prefix", "from_version") if name in query}
    if "from_version" not in args and request.headers.get("Last-Event-ID"):
        args["from_version"] = request.headers["Last-Event-ID"]  # an EventSource reconnecting
    key = None if whole else v.key_after(request.rel_url.raw_path, 3, node.config.limits)
    return ws.spec(keyspace, key, args, sse=sse)


class HttpSink:
    """A watch's events as a streamed HTTP response."""

    def __init__(self, request: web.Request, node: Node, sse: bool) -> None:
        self.request = request
        self.clock = node.clock
        self.sse = sse
        self.response: web.StreamResponse | None = None

    async def begin(self, event: dict[str, Any], event_id: int) -> None:
        response = self.response = web.StreamResponse(headers={
            "Content-Type": SSE if self.sse else NDJSON, "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no"})
        await response.prepare(self.request)
        await response.write(frame(event, sse=self.sse, event_id=event_id))

    async def send(self, event: dict[str, Any], event_id: int | None) -> None:
        assert self.response is not None
        try:  # waits while the client does not read (aiohttp's drain)
            await self.response.write(frame(event, sse=self.sse, event_id=event_id))
        except (ConnectionError, RuntimeError):
            raise ws.SinkClosed from None

    async def end(self, final: dict[str, Any] | None) -> None:
        """Write the last event (if the node ends the stream) and the end of the
        stream, within a bound; a client that reads nothing has its connection closed."""
        response = self.response
        assert response is not None
        transport = self.request.transport
        try:
            done = True
            if final is not None:
                done = await within(self.clock, response.write(frame(final, sse=self.sse)),
                                    ws.FINAL_WRITE_S)
            if done:
                done = await within(self.clock, response.write_eof(), ws.FINAL_WRITE_S)
        except (ConnectionError, RuntimeError):
            return
        if not done and transport is not None:
            # The client reads nothing: what is written reaches it if it ever reads
            # again; the connection is closed, and dropped if it still does not read.
            transport.close()
            self.clock.call_later(ws.ABORT_AFTER_S, transport.abort)
