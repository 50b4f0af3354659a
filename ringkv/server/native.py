"""The native protocol's listener (shell): frames in, the API's operations run, frames out.

One asyncio ``Protocol`` per connection (no task per connection): it feeds
bytes to the codec's decoder, lets ``net/native.py`` decide the handshake
and each request, runs the operation (``server/handlers.py``, the same as
HTTP's) in a task of its own, and writes the answers as they come, in any
order, gathered into one write per loop turn. At most ``MAX_IN_FLIGHT``
requests run per connection; the rest wait in arrival order, and the
connection stops reading until they have started (back-pressure, not an
error).

The client door (``door.py``) holds it as it holds HTTP's connections: the
connection cap shared with HTTP, a frame's length prefix read as the
"head" (header timeout), the idle timeout between requests, and a frame
over the size limit answered with ``too_large`` naming the limit, then
closed. A watch (protocol version 2, ``server/watch_native.py``) is one
request answered by a stream of frames: it stays unanswered for the door
until its last frame, so, like a streaming HTTP response, it keeps the idle
timeout off (and its connection out of those the cap may evict) while it
streams; closing the connection ends its watches.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import deque
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, cast

from ringkv.auth.permissions import Principal
from ringkv.clock import Clock
from ringkv.door import CLIENT_CLOSED, TOO_LARGE, Connection, Door, Expiry
from ringkv.errors import ProtocolError, RingKVError
from ringkv.net import native as core
from ringkv.net.tls import CLIENT_HANDSHAKE_TIMEOUT_S, listen_tls
from ringkv.net.codec import (
    KIND_ERROR, KIND_RESPONSE, Frame, FrameDecoder, encode_frame, frame_packer,
)
from ringkv.server import handlers as h
from ringkv.server import lease_http, watch_native
from ringkv.server import validation as v
from ringkv.server.watch_session import ABORT_AFTER_S, WatchSession
from ringkv.server.guard import DeadlineTimer, Guest
from ringkv.server.idempotency import IdempotencyCache

if TYPE_CHECKING:
    from ringkv.auth.service import AuthService
    from ringkv.node import Node

log = logging.getLogger(__name__)

MAX_IN_FLIGHT = 256  # requests running at once on one connection
FRAME_OVERHEAD_BYTES = 64 * 1024  # the envelope and the fields around a body of the limit
FLUSH_BYTES = 64 * 1024  # answers gathered for one write per loop turn, at most about this


class NativeServer:
    """What every native connection of a node shares."""

    def __init__(self, node: Node, door: Door, cache: IdempotencyCache, clock: Clock, *,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.node = node
        # auth.enabled: the node's checks (a stand-in node without the attribute has none).
        self.auth: AuthService | None = getattr(node, "auth", None)
        self.ssl_context = ssl_context  # tls.client: TLS before the native handshake
        self.door = door
        self.cache = cache
        self.clock = clock
        self.max_body_bytes = node.config.limits.max_request_bytes
        self.max_frame_bytes = self.max_body_bytes + FRAME_OVERHEAD_BYTES
        self.connections: set[NativeConnection] = set()
        self._server: asyncio.AbstractServer | None = None

    async def start(self, host: str, port: int) -> None:
        if self.ssl_context is not None:
            self._server = await listen_tls(
                lambda: NativeConnection(self), host, port, self.ssl_context,
                handshake_timeout_s=CLIENT_HANDSHAKE_TIMEOUT_S, what="native protocol",
                reuse_address=True)
            return
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: NativeConnection(self), host, port, reuse_address=True)

    def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()

    async def close(self, drain_s: float) -> None:
        """Stop accepting, let the requests in flight finish (at most ``drain_s``), close."""
        self.stop_accepting()
        deadline = self.clock.monotonic_s() + drain_s
        while any(c.tasks for c in self.connections) and self.clock.monotonic_s() < deadline:
            await self.clock.sleep(0.01)
        for connection in list(self.connections):
            connection.close()
        if self._server is not None:
            await self._server.wait_closed()


class NativeConnection(asyncio.Protocol):
    """One client connection speaking the native protocol."""

    def __init__(self, server: NativeServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.decoder = FrameDecoder(server.max_frame_bytes)
        self.packer = frame_packer()
        self.version: int | None = None  # None until the handshake
        self.tasks: set[asyncio.Task[None]] = set()
        self._out: list[bytes] = []
        self._out_bytes = 0
        self._flush_scheduled = False
        self._paused = False
        self._closing = False
        self._backlog: deque[Frame] = deque()  # requests arrived, not started yet
        self._visit: Connection | None = None
        self._deadline: DeadlineTimer | None = None
        # auth.enabled: who the hello proved this connection is; requests wait for it.
        self.principal: Principal | None = None
        self._authenticating = False
        self.watches: dict[int, WatchSession] = {}  # by the request id of each watch
        self.writable = asyncio.Event()  # cleared while the transport is over its high water
        self.writable.set()

    # -- the connection ------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        server = self.server
        now = server.clock.monotonic_s()
        admission = server.door.admit(self, now)
        if admission.evict is not None:  # of this listener or HTTP's
            cast(Guest, admission.evict.owner).door_close(admission.evict_error)
        if admission.connection is None:
            assert admission.refusal is not None
            self._send_error(0, admission.refusal)
            self.close()
            return
        self._visit = admission.connection
        server.connections.add(self)
        self._deadline = DeadlineTimer(admission.connection, server.clock, self._expired)
        self._deadline.update(now)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.server.connections.discard(self)
        for session in list(self.watches.values()):
            session.cancel()  # each frees its slot as its task ends
        self.writable.set()  # a writer waiting for room finds the connection closed
        if self._visit is not None and self._visit.lost() == CLIENT_CLOSED:
            log.debug("a native client went away mid-request")
        if self._deadline is not None:
            self._deadline.cancel()
        self.transport = None
        self._closing = True

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    @property
    def is_closed(self) -> bool:
        return self.transport is None or self._closing

    def data_received(self, data: bytes) -> None:
        visit = self._visit
        if visit is None or not visit.is_open or self._closing:
            return
        try:
            frames = self.decoder.feed(data)
        except ProtocolError as exc:
            self._fail(core.frame_error(exc, self.server.max_frame_bytes))
            return
        for frame in frames:
            visit.request_complete()  # arrived whole (the hello counts as a request too)
            if self.version is None and not self._backlog:
                self._handshake(frame)
                if self._closing:
                    return
            else:
                self._backlog.append(frame)
        self._run_backlog()
        if self.decoder.buffered and visit.is_open:
            now = self.server.clock.monotonic_s()
            visit.head_started(now)  # part of a frame: the header timeout runs
            assert self._deadline is not None
            self._deadline.update(now)

    def _run_backlog(self) -> None:
        """Start the requests that arrived, at most MAX_IN_FLIGHT at once; while some
        wait their turn, read no more from the client (back-pressure)."""
        backlog = self._backlog
        while (backlog and len(self.tasks) < MAX_IN_FLIGHT and not self._closing
               and not self._authenticating):
            frame = backlog.popleft()
            try:
                request = core.request(frame, self.version or core.NATIVE_VERSION)
            except ProtocolError as exc:
                self._answer(frame.request_id, frame.verb, h.error_answer(exc))
                continue
            if request.verb == core.WATCH_CANCEL:  # the connection's own: answered at once
                self._cancel_watch(request)
                continue
            self._start(request)
        transport = self.transport
        if transport is None or self._closing:
            return
        if backlog and not self._paused:
            self._paused = True
            transport.pause_reading()
        elif self._paused and not backlog and len(self.tasks) < MAX_IN_FLIGHT // 2:
            self._paused = False
            transport.resume_reading()

    def _handshake(self, frame: Frame) -> None:
        try:
            chosen = core.hello(frame)
        except ProtocolError as exc:
            self._fail(exc)
            return
        self.version = chosen.version
        if self.server.auth is not None:
            # Requests that come meanwhile wait in the backlog until the login is decided.
            self._authenticating = True
            self._start_task(self._login(chosen))
            return
        self._welcome(chosen)

    def _welcome(self, chosen: core.Hello) -> None:
        server = self.server
        self._write(encode_frame(KIND_RESPONSE, core.HELLO_ID, core.HELLO, core.hello_answer(
            chosen, node_id=server.node.node_id, max_frame_bytes=server.max_frame_bytes,
            max_in_flight=MAX_IN_FLIGHT, user=None if self.principal is None
            else self.principal.name), version=chosen.version, packer=self.packer))
        self._answered()

    async def _login(self, chosen: core.Hello) -> None:
        """Check the hello's credentials once for the connection (auth.enabled)."""
        auth = self.server.auth
        assert auth is not None
        peer = self.transport.get_extra_info("peername") if self.transport else None
        address = str(peer[0]) if isinstance(peer, tuple) and peer else "unknown"
        try:
            if chosen.token is not None:
                self.principal = await auth.check_token(chosen.token, address)
            elif chosen.user is not None and chosen.password is not None:
                self.principal = await auth.check_password(chosen.user, chosen.password, address)
            else:
                self.principal = await auth.authenticate(None, address)
        except RingKVError as exc:
            self._fail(exc)
            return
        except Exception:  # noqa: BLE001 - the boundary: log it, close, never hang the hello
            log.exception("unhandled error checking a native hello's credentials")
            self._fail(RingKVError("internal server error"))
            return
        self._authenticating = False
        self._welcome(chosen)
        self._run_backlog()

    def _answered(self) -> None:
        visit = self._visit
        if visit is not None and self._deadline is not None:
            now = self.server.clock.monotonic_s()
            self._deadline.update_to(visit.answered(now), now)

    # -- running requests ----------------------------------------------------

    def _start(self, request: core.Request) -> None:
        self._start_task(self._run(request))

    def _start_task(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self.tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if self._paused:
            self._run_backlog()

    async def _run(self, request: core.Request) -> None:
        server = self.server
        node = server.node
        clock = server.clock
        started = clock.monotonic_s()
        route = core.OPERATIONS[request.verb]
        args = request.args
        principal = None
        try:
            h.admit(node, route)
            if server.auth is not None:  # the hello proved who; this asks what it may do
                principal = await server.auth.authorize_session(
                    self.principal, route, request.keyspace, args, request.body)
            too_large = server.door.body_too_large(len(request.body))
            if too_large is not None:
                raise too_large
            key = (v.key_from_json(request.key, node.config.limits, field="key")
                   if request.key else b"")
            if request.verb == core.WATCH:
                await watch_native.serve(node, self, request.request_id, request.keyspace,
                                         key or None, args)
                return  # its frames answered it
            if request.verb == "lease_grant":
                result = h.answer(await lease_http.grant(node, request.body, self._authorize))
            elif request.verb in _LEASE_ROUTES:
                result = h.answer(await _LEASE_ROUTES[request.verb](node, request.lease_id,
                                                                    self._authorize))
            else:
                call = h.ApiCall(node, started, request.keyspace, key, args, request.body,
                                 request.idempotency_key, txn_id=request.txn_id,
                                 cache=server.cache, principal=principal)
                if request.idempotency_key is not None:  # what a repeat must match
                    call.fingerprint_method = request.verb
                    call.fingerprint_target = (
                        f"{request.keyspace}/{request.key}?txn={request.txn_id}"
                        f"&{sorted(args.items())}")
                result = await _ROUTES[request.verb](call)
        except RingKVError as exc:
            result = h.error_answer(exc)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - the boundary: log it, never crash the node
            log.exception("unhandled error serving native %s", request.verb)
            result = h.INTERNAL_ERROR
        node.metrics.observe_request(route, h.metric_level(args.get("consistency")),
                                     result.status, clock.monotonic_s() - started)
        self._answer(request.request_id, request.verb, result)

    async def _authorize(self, route: str, keyspace: str) -> None:
        """A lease operation's check, once its keyspace is known (from the body or the id)."""
        if self.server.auth is not None:
            await self.server.auth.authorize_session(self.principal, route, keyspace, {}, b"")

    # -- watches -----------------------------------------------------------------

    def write_stream(self, request_id: int, event: bytes | None, *, more: bool) -> None:
        """A frame of a watch's stream; the last (``more`` false) answers the request."""
        if self.transport is None:
            return
        self._write(encode_frame(KIND_RESPONSE, request_id, core.WATCH,
                                 core.stream_payload(event, more=more),
                                 version=self.version or core.NATIVE_VERSION, packer=self.packer))
        if not more:
            self._answered()

    def _cancel_watch(self, request: core.Request) -> None:
        """``watch_cancel``: end the watch of that request id (its last frame follows)."""
        session = self.watches.get(request.watch_id)
        if session is not None:
            session.cancel()
        self._answer(request.request_id, request.verb,
                     h.answer({"cancelled": session is not None, "watch_id": request.watch_id}))

    def close_unread(self) -> None:
        """A watcher's client reads nothing: close, and drop it if it still reads nothing."""
        transport = self.transport
        self.close()
        if transport is not None:
            self.server.clock.call_later(ABORT_AFTER_S, transport.abort)

    def _answer(self, request_id: int, verb: str, result: h.Answer) -> None:
        if self.transport is None:
            return
        try:
            frame = encode_frame(KIND_RESPONSE, request_id, verb,
                                 core.response_payload(*result),
                                 version=self.version or core.NATIVE_VERSION, packer=self.packer)
        except RingKVError as exc:  # an answer over the frame limit
            frame = encode_frame(KIND_RESPONSE, request_id, verb,
                                 core.response_payload(*h.error_answer(exc)),
                                 version=self.version or core.NATIVE_VERSION, packer=self.packer)
        self._write(frame)
        self._answered()

    # -- writing and closing ---------------------------------------------------

    def _write(self, frame: bytes) -> None:
        self._out.append(frame)
        self._out_bytes += len(frame)
        if self._out_bytes >= FLUSH_BYTES:
            # A watch's burst of events: out now, so the transport's high-water mark
            # (pause_writing) holds back the next ones instead of a list growing here.
            self._flush()
            return
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        out, self._out = self._out, []
        self._out_bytes = 0
        if self.transport is not None and out:
            self.transport.write(b"".join(out) if len(out) > 1 else out[0])

    def _send_error(self, request_id: int, error: RingKVError) -> None:
        """A ``KIND_ERROR`` frame: the connection is about to close."""
        if self.transport is None:
            return
        self._flush()
        self.transport.write(encode_frame(KIND_ERROR, request_id, "error", error.to_json()["error"],
                                          version=self.version or core.NATIVE_VERSION))

    def _fail(self, error: RingKVError) -> None:
        log.debug("closing a native connection: %s", error.message)
        if self._visit is not None and error.code == "too_large":
            self._visit.closing(TOO_LARGE)
        self._send_error(0, error)
        self.close()

    def _expired(self, expiry: Expiry) -> None:
        assert self._visit is not None
        self._visit.closing(expiry.reason)
        self.door_close(expiry.error)

    def door_close(self, error: RingKVError | None) -> None:
        """The door closes this connection (a deadline, or room for another)."""
        if error is not None:
            self._send_error(0, error)
        self.close()

    def close(self) -> None:
        self._closing = True
        if self.transport is not None:
            self._flush()
            self.transport.close()
        for task in list(self.tasks):
            task.cancel()


_ROUTES = {
    "get": h.get_key,
    "put": h.put_key,
    "delete": h.delete_key,
    "scan": h.scan,
    "batch": h.batch,
    "txn": h.post_txn,
    "txn_status": h.get_txn,
    "txn_begin": h.txn_begin,
    "txn_get": h.txn_get,
    "txn_put": h.txn_put,
    "txn_delete": h.txn_delete,
    "txn_commit": h.txn_commit,
    "txn_abort": h.txn_abort,
    "status": h.status,
    "ring": h.ring,
    "health": h.health,
}
# The lease operations on a lease id (``server/lease_http.py``'s, as HTTP's routes call
# them; lease_grant, which takes the body, too).
_LEASE_ROUTES = {
    "lease_keepalive": lease_http.keepalive,
    "lease_revoke": lease_http.revoke,
    "lease_info": lease_http.show,
}
