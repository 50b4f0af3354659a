"""What aiohttp's HTTP parser rejects gets ringkv's JSON error too.

The API middleware never sees a request the parser refused (a request line
or header over the parser's limits, a malformed request): aiohttp answers
those itself, in plain text, and offers no hook for them (aiohttp issue
#3287). So the node serves the API through ``ApiRunner``, whose connections
are ``ApiRequestHandler``s: the same protocol with a ``handle_error`` that
answers in JSON and closes the connection, as aiohttp's own does.

The parser's limits sit above ringkv's own, so that the API's validation
sees and names what is too large: every key up to ``max_key_bytes`` fits in
the request line even percent-encoded, with room for the rest, and a header
up to ``PARSER_FIELD_BYTES`` reaches the middleware, which names any header
over ``MAX_HEADER_BYTES``. Only input beyond even that stops at the parser.

Each connection also passes the client door (``ringkv.door``, with
``server/guard.py``): it is admitted under the connection cap (or takes an
idle connection's place, or gets 503 ``overloaded``), its request head and
body must arrive in time (else 408), it may idle only so long, and a body
declared over ``max_request_bytes`` gets 413 before any of it is read.

The connection parses as aiohttp does, then serves GET, PUT and DELETE of a
key itself (``lean_http``) whenever aiohttp's task is idle: no request or
response object, no wake-up of that task, one write per answer. One such
request runs at a time per connection; whatever arrives behind it waits
(``_held``) so that answers keep request order, and anything else (or a key
request with its body still arriving) goes to aiohttp's queue as before.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import deque
from collections.abc import Sequence
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, cast

from aiohttp import web
from aiohttp.http import RawRequestMessage
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from aiohttp.web_protocol import _ErrInfo

from ringkv.clock import Clock
from ringkv.config import LimitsConfig
from ringkv.door import CLIENT_CLOSED, TOO_LARGE, Connection, Door, DoorLimits, Expiry
from ringkv.errors import BadRequest, HeaderTooLarge, RequestLineTooLong, RingKVError
from ringkv.server.api import IDEMPOTENCY_KEY, NODE_KEY, error_response, request_handler
from ringkv.server.guard import DeadlineTimer, Guest
from ringkv.server.idempotency import IdempotencyCache
from ringkv.server.lean_http import LeanTarget, lean_target, response_bytes, serve
from ringkv.server.validation import KV_PREFIX, MAX_HEADER_BYTES

if TYPE_CHECKING:
    from ringkv.node import Node

log = logging.getLogger(__name__)

_Message = tuple[Any, StreamReader]  # (a RawRequestMessage or _ErrInfo, its payload)
PARSER_FIELD_BYTES = 32768  # one header, at the parser; the API's limit is MAX_HEADER_BYTES
REQUEST_LINE_SPARE_BYTES = 8190  # method, keyspace, query: aiohttp's default line limit
SHOWN_BYTES = 60  # of an overlong line, quoted in the error
assert PARSER_FIELD_BYTES > MAX_HEADER_BYTES, "the API must see, and name, an overlong header"


def parser_limits(limits: LimitsConfig) -> dict[str, int]:
    """aiohttp's ``max_line_size`` and ``max_field_size`` for these limits."""
    line_bytes = 3 * limits.max_key_bytes + REQUEST_LINE_SPARE_BYTES  # %XX per key byte
    if line_bytes == PARSER_FIELD_BYTES:
        line_bytes += 1  # handle_error tells the two apart by the limit the parser names
    return {"max_line_size": line_bytes, "max_field_size": PARSER_FIELD_BYTES}


def parse_error(exc: BaseException | None, *, line_bytes: int, field_bytes: int,
                max_key_bytes: int) -> RingKVError:
    """The ringkv error for what aiohttp's parser raised (``None``: no parse error)."""
    if isinstance(exc, LineTooLong):
        line, limit = exc.args[0], exc.args[1]
        raw = bytes(line) if isinstance(line, (bytes, bytearray)) else str(line).encode()
        start = raw[:SHOWN_BYTES]
        shown = start.decode("utf-8", "backslashreplace") + "..."
        if limit == field_bytes:
            return HeaderTooLarge(f"a request header is over {field_bytes} bytes (it starts "
                                  f"{shown})", header=None, limit=field_bytes)
        if limit == line_bytes:
            # The C parser quotes the target, the pure-Python one the whole line.
            if start.split(b" ", 1)[-1].startswith(KV_PREFIX.encode()):
                hint = f"; a key may be at most {max_key_bytes} bytes"
            else:
                hint = ""
            return RequestLineTooLong(
                f"the request line is over {line_bytes} bytes (it starts {shown}){hint}",
                limit=line_bytes,
            )
    if isinstance(exc, RingKVError):  # the door's own answer (413 for a declared body)
        return exc
    if isinstance(exc, HttpProcessingError):
        return BadRequest(f"malformed HTTP request: {_reason(exc.message)}", field="request")
    return RingKVError("internal server error")


def _reason(message: str) -> str:
    """The parser's reason without the input it quotes (``b'...'`` and a ``^`` under it):
    a client's bytes are not echoed back, nor into the log."""
    kept = []
    for line in message.splitlines():
        line = line.strip()
        if not line or line.startswith(("b'", 'b"')) or set(line) <= {"^", "~", " "}:
            continue
        kept.append(line.rstrip(":"))
    text = ": ".join(kept) or "unparsable request"
    return text[:SHOWN_BYTES * 2].encode("ascii", "backslashreplace").decode("ascii")


def raw_error_response(error: RingKVError) -> bytes:
    """``error`` as a whole HTTP/1.1 response that closes the connection, for answers
    written straight to the transport (no request was parsed, or it is past helping)."""
    body = json.dumps(error.to_json(), separators=(",", ":")).encode()
    status = HTTPStatus(error.http_status)
    head = (f"HTTP/1.1 {status.value} {status.phrase}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    return head.encode("ascii") + body


class ApiRequestHandler(web.RequestHandler):
    """aiohttp's connection protocol, with the parser's errors answered in JSON, and
    the client door: admission under the cap, read deadlines, early 413."""

    __slots__ = ("max_key_bytes", "_door", "_clock", "_visit", "_deadline", "_body", "_node",
                 "_idempotency", "_lean", "_lean_task", "_held")

    def __init__(self, manager: web.Server, *, max_key_bytes: int, door: Door, clock: Clock,
                 node: Node, cache: IdempotencyCache, lean: bool = True,
                 **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self.max_key_bytes = max_key_bytes  # named when a key path is over the line limit
        self._door = door
        self._clock = clock
        self._visit: Connection | None = None  # None: refused at the cap
        self._deadline: DeadlineTimer | None = None
        self._body: StreamReader | None = None  # the body still arriving, if one is
        self._node = node
        self._idempotency = cache
        self._lean = lean  # False: every request through aiohttp (for comparison)
        self._lean_task: asyncio.Task[None] | None = None  # the key request in flight
        # Requests that arrived behind it, in order (its answer goes first).
        self._held: deque[_Message] = deque()

    # -- the door ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        now = self._clock.monotonic_s()
        admission = self._door.admit(self, now)
        if admission.evict is not None:  # of this listener or another
            cast(Guest, admission.evict.owner).door_close(admission.evict_error)
        if admission.connection is None:
            # Refused before aiohttp sees it: nothing else runs for this connection.
            assert admission.refusal is not None
            log.debug("refused a client connection: %s", admission.refusal.message)
            cast(asyncio.Transport, transport).write(raw_error_response(admission.refusal))
            transport.close()
            return
        self._visit = admission.connection
        super().connection_made(transport)
        self._deadline = DeadlineTimer(admission.connection, self._clock, self._expired)
        self._deadline.update(now)

    def data_received(self, data: bytes) -> None:
        visit = self._visit
        if visit is None or not visit.is_open:
            return  # refused, or being closed: read nothing more
        if self._force_close or self._close:
            return  # as aiohttp: nothing more is parsed
        parser = self._parser
        if parser is None or self._payload_parser is not None or self._upgraded:
            web.RequestHandler.data_received(self, data)  # (no such route in the API)
            return
        body = self._body
        queued = len(self._held) + len(self._messages)  # parsed, not yet taken up
        # aiohttp's own parse step, the messages then dispatched here (the lean path).
        messages: Sequence[_Message]
        try:
            messages, upgraded, tail = parser.feed_data(data)
        except HttpProcessingError as exc:
            messages = [(_ErrInfo(status=400, exc=exc, message=exc.message), EMPTY_PAYLOAD)]
            upgraded, tail = False, b""
        if upgraded:
            self._upgraded = True
            if tail:
                self._message_tail = tail
        if body is not None:
            self._body_arrived(body, visit)
            if body.is_eof():  # pipelined behind it
                for index in range(len(messages)):
                    messages = self._head_then_body(messages, index, visit)
        elif messages:  # whole heads arrived
            for index in range(len(messages)):
                payload = messages[index][1]
                if payload is EMPTY_PAYLOAD or payload.is_eof():  # no body, or all of it
                    visit.request_complete()  # the deadline only moved off: no update
                else:
                    messages = self._head_then_body(messages, index, visit)
        elif data:
            now = self._clock.monotonic_s()
            visit.head_started(now)
            self._update_deadline(now)
        if not self._buffer_paused and queued + len(messages) >= self._max_msg_queue_size:
            # The parser stopped at its queue limit and keeps the rest of ``data``
            # (even if the lean path took one up at once): read no more until
            # the queue drains (``_next_held``, or aiohttp's task), which parses it.
            self._pause_reading_for_buffer()
        for message, payload in messages:
            self._dispatch(message, payload)

    # -- the lean path: key requests served without aiohttp's request machinery --

    def _dispatch(self, message: Any, payload: StreamReader) -> None:
        """A parsed request, in order: served here (``lean_http``), held behind
        the lean request in flight, or queued for aiohttp's task."""
        self._request_count += 1
        if self._lean_task is not None or self._held:
            self._held.append((message, payload))  # answers go out in request order
            return
        if self._lean and not isinstance(message, _ErrInfo) and self._aiohttp_idle():
            target = lean_target(message, payload)
            if target is not None:
                self._serve_lean(message, payload, target)
                return
        self._to_aiohttp(message, payload)

    def _aiohttp_idle(self) -> bool:
        """aiohttp's task waits for a request, with none queued or being answered."""
        waiter = self._waiter
        return waiter is not None and not waiter.done() and not self._messages

    def _to_aiohttp(self, message: Any, payload: StreamReader) -> None:
        """Queue a request for aiohttp's task, as aiohttp's data_received does."""
        self._messages.append((message, payload))
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if not self._buffer_paused and len(self._messages) >= self._max_msg_queue_size:
            self._pause_reading_for_buffer()

    def _serve_lean(self, message: RawRequestMessage, payload: StreamReader,
                    target: LeanTarget) -> None:
        assert self._parser is not None
        self._parser.message_consumed()  # as aiohttp's task does as it takes a message
        # The request's one deadline counts from here (as the middleware's).
        started = self._clock.monotonic_s()
        self._lean_task = self._loop.create_task(
            self._lean_request(message, payload, target, started))

    async def _lean_request(self, message: RawRequestMessage, payload: StreamReader,
                            target: LeanTarget, started_s: float) -> None:
        try:
            answer, headers = await serve(self._node, self._idempotency, message, payload,
                                          target, started_s, self._gone, self._peer_host())
        finally:
            self._lean_task = None
        transport = self.transport
        if transport is None:
            return  # gone: connection_lost has done the door's accounting
        keep_alive = not message.should_close
        transport.write(response_bytes(message, answer, keep_alive, headers))
        self._lean_answered()
        if not keep_alive:
            self.force_close()  # what was written still goes out first
            return
        if self._paused and self._held:
            # The client reads slower than it sends: as aiohttp's writer does,
            # answer no more until what was written drains.
            self._lean_task = asyncio.current_task()
            try:
                await self._drain_helper()
            except ConnectionError:
                return  # gone
            finally:
                self._lean_task = None
            if self.transport is None:
                return
        self._next_held()

    def _gone(self) -> bool:
        return self.transport is None

    def _peer_host(self) -> str | None:
        """The client's address, as aiohttp's ``request.remote`` gives it."""
        peer = self.peername
        return peer[0] if isinstance(peer, tuple) else peer

    def _lean_answered(self) -> None:
        """As ``log_access`` for aiohttp's answers: the door's "answered"."""
        visit = self._visit
        assert visit is not None and self._deadline is not None
        now = self._clock.monotonic_s()
        self._deadline.update_to(visit.answered(now), now)
        # aiohttp's own idle timer (a backstop) counts from its last answer: put it off.
        # (Its deadline is on its loop's clock.)
        self._next_keepalive_close_time = self._loop.time() + self._keepalive_timeout

    def resume_reading(self, resume_parser: bool = True) -> None:
        # aiohttp's body reader calls this as every body ends and at every read of
        # one; with reading not paused for flow control there is nothing to resume,
        # nor any input the parser holds back for it (what it holds at its queue
        # limit waits for ``_resume_reading_if_drained``), so skip the re-parse.
        if self._reading_paused:
            web.RequestHandler.resume_reading(self, resume_parser)

    def _resume_reading_if_drained(self) -> None:
        # aiohttp's, counting the held requests too: reading resumes only once the
        # parser has room for what it kept (else it would wait for bytes that never come).
        if self._message_tail and len(self._message_tail) >= self._read_bufsize:
            return
        if not self._upgraded:
            self.data_received(b"")
            if len(self._held) + len(self._messages) >= self._max_msg_queue_size:
                return
        self._resume_reading_for_buffer()

    def _next_held(self) -> None:
        """The lean request in flight is answered: on to the next held one, if any."""
        held = self._held
        while held and not (self._force_close or self._close):
            message, payload = held.popleft()
            if not isinstance(message, _ErrInfo) and self._aiohttp_idle():
                target = lean_target(message, payload)
                if target is not None:
                    self._serve_lean(message, payload, target)
                    break
            # aiohttp takes this one and, behind it, all the rest, in order.
            self._to_aiohttp(message, payload)
            while held:
                self._to_aiohttp(*held.popleft())
        if self._buffer_paused and len(held) + len(self._messages) <= self._msg_queue_resume_size:
            self._resume_reading_if_drained()  # parses what the pause left buffered

    def _body_arrived(self, body: StreamReader, visit: Connection) -> None:
        visit.body_received(body.total_bytes)
        if body.is_eof():
            self._body = None
            visit.body_complete(self._clock.monotonic_s())
        self._update_deadline(self._clock.monotonic_s())

    def _head_then_body(self, messages: Sequence[_Message], index: int,
                        visit: Connection) -> Sequence[_Message]:
        """A head arrived: with its body whole, or a body to wait for (or refuse).
        Returns ``messages``, the request replaced by its 413 if it is refused."""
        message, payload = messages[index]
        if payload is EMPTY_PAYLOAD or payload.is_eof():
            visit.request_complete()
            return messages
        assert not isinstance(message, _ErrInfo)  # a parse error has no body
        declared = message.headers.get("Content-Length")
        error = self._door.body_too_large(int(declared)) if declared is not None else None
        if error is not None:
            # Answered before any more of the body is read; then the connection closes.
            visit.closing(TOO_LARGE)
            messages = list(messages)
            messages[index] = (_ErrInfo(status=error.http_status, exc=error,
                                        message=error.message), EMPTY_PAYLOAD)
            visit.request_complete()
            return messages
        now = self._clock.monotonic_s()
        visit.head_complete(now)
        visit.body_received(payload.total_bytes)
        self._body = payload
        self._update_deadline(now)
        return messages

    def _update_deadline(self, now: float) -> None:
        assert self._deadline is not None
        self._deadline.update(now)

    def log_access(self, request: web.BaseRequest, response: web.StreamResponse,
                   time: float | None) -> None:
        # aiohttp calls this once per request, as its answer is written (or fails to
        # be): the door's "answered", without a coroutine of its own.
        if self._logging_enabled:
            web.RequestHandler.log_access(self, request, response, time)
        visit = self._visit
        if visit is not None and self._deadline is not None:
            now = self._clock.monotonic_s()
            self._deadline.update_to(visit.answered(now), now)

    def _answering(self) -> bool:
        """A response is being written: the handler has returned, its answer not yet
        (aiohttp clears the current request when the handler returns)."""
        return self._request_in_progress and self._current_request is None

    def _expired(self, expiry: Expiry) -> None:
        assert self._visit is not None
        log.debug("closing a client connection from %s: %s", self.peername, expiry.reason)
        self._visit.closing(expiry.reason)
        self.door_close(expiry.error)

    def door_close(self, error: RingKVError | None) -> None:
        """Answer ``error`` unless a response is under way, then close at once."""
        transport = self.transport
        if transport is None:
            return
        if error is not None and not self._answering():
            transport.write(raw_error_response(error))
        self.force_close()

    def connection_lost(self, exc: BaseException | None) -> None:
        visit = self._visit
        if visit is None:
            return  # refused: aiohttp never took it on
        if visit.lost() == CLIENT_CLOSED:
            log.debug("client %s went away mid-request", self.peername)
        if self._deadline is not None:
            self._deadline.cancel()
        self._body = None
        self._held.clear()  # nobody is left to answer (a lean request in flight finds so)
        super().connection_lost(exc)

    async def shutdown(self, timeout: float | None = 15.0) -> None:
        # aiohttp waits for its own request in progress; a lean one is waited for too,
        # so that its answer goes out before the connection closes.
        task = self._lean_task
        if task is not None and not task.done():
            self._close = True  # nothing more is parsed or started
            await asyncio.wait({task}, timeout=timeout)
        await super().shutdown(timeout)

    def handle_error(self, request: web.BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if request.writer.output_size > 0:  # a response is half sent: only closing is left
            return super().handle_error(request, status, exc, message)
        error = parse_error(exc if status != 500 else None, line_bytes=self.max_line_size,
                            field_bytes=self.max_field_size, max_key_bytes=self.max_key_bytes)
        if error.http_status == 500:
            log.error("unhandled error serving a request", exc_info=exc)
        else:  # the client's mistake: no traceback
            log.debug("refused a request before it reached the API: %s", error.message)
        response = error_response(error)
        response.force_close()
        # Said outright: the answer goes out as HTTP/1.0 (the request was never parsed).
        response.headers["Connection"] = "close"
        return response


class _ApiServer(web.Server):
    def __init__(self, plain: web.Server, app: web.Application, max_key_bytes: int, door: Door,
                 clock: Clock, lean: bool) -> None:
        # The key routes are served without the router (``api.request_handler``).
        super().__init__(request_handler(app, plain.request_handler),
                         request_factory=plain.request_factory,
                         handler_cancellation=plain.handler_cancellation, loop=plain._loop,
                         **plain._kwargs)
        self.max_key_bytes = max_key_bytes
        self.door = door
        self.clock = clock
        self.node = app[NODE_KEY]
        self.cache = app[IDEMPOTENCY_KEY]
        self.lean = lean

    def __call__(self) -> web.RequestHandler:
        # web.Server builds its RequestHandler itself, so build the subclass as it does.
        return ApiRequestHandler(self, loop=self._loop, max_key_bytes=self.max_key_bytes,
                                 door=self.door, clock=self.clock, node=self.node,
                                 cache=self.cache, lean=self.lean, **self._kwargs)


class ApiRunner(web.AppRunner):
    """``web.AppRunner`` for the API: parser limits above ringkv's, JSON parse errors,
    and the client door (``door``: shared with the node's other client listeners;
    None: one of this runner's own, from ``limits``)."""

    __slots__ = ("_max_key_bytes", "door", "_lean")

    def __init__(self, app: web.Application, limits: LimitsConfig, *, door: Door | None = None,
                 lean: bool = True, **kwargs: Any) -> None:
        kwargs.update(parser_limits(limits))  # handed on to every connection's parser
        # aiohttp's own idle timer is only a backstop: the door closes idle connections.
        kwargs.setdefault("keepalive_timeout", 2 * limits.idle_timeout_s)
        super().__init__(app, **kwargs)
        self._max_key_bytes = limits.max_key_bytes
        self.door = door if door is not None else Door(DoorLimits.from_config(limits))
        self._lean = lean  # the key routes' lean path (``lean_http``); False: all via aiohttp

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()  # starts and freezes the application
        clock = self.app[NODE_KEY].clock
        return _ApiServer(plain, self.app, self._max_key_bytes, self.door, clock, self._lean)
