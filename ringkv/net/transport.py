"""Internode transport: persistent connections carrying msgpack frames.

There is one transport, for real sockets and for the simulator alike: it
opens and accepts connections through a ``Network`` (``ringkv.net.sockets``:
real TCP by default; the simulator passes in-memory byte streams), so the
framing, handshake, back-pressure, admission and error mapping that run in
production are the ones every simulated seed exercises. Its timers
(request deadlines, dial and handshake timeouts, backoff) all run on the
injected ``Clock``.

Shape (one asyncio loop per node):

* Outbound: one ``_Peer`` per remote node id, holding a bounded frame queue, the
  table of pending requests, and at most one live connection. The connection is
  opened lazily on the first send and reused. Each connection is an asyncio
  protocol (``_Conn``): it dispatches frames as they are decoded and writes whatever
  is queued in one ``write`` per loop turn, with no task of its own. Responses come
  back on the same connection and are matched by request id.
* Inbound: the listener accepts connections, completes the handshake (so it knows
  the peer's node id), runs the handler for each request / one-way frame in its own
  task (bounded per connection), or without a task for requests the handler answers
  through ``answer_future``, and writes responses back on that connection.

Failure policy: a bad frame closes only its own connection; a refused or failed
connect puts the peer into a bounded exponential backoff during which requests fail
fast with ``PeerUnreachable``; every queue is bounded and overflow is an immediate
``Overloaded`` (requests) or a counted drop (one-way messages). The request core
(pending table, admission, backoff, error mapping) is ``ringkv.net.rpc``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, NamedTuple, TypeVar, cast

from ringkv.clock import Clock, SystemClock, Timer
from ringkv.errors import (
    Overloaded,
    PeerUnreachable,
    ProtocolError,
    RingKVError,
    ShuttingDown,
    TooLarge,
)
from ringkv.limits import MAX_FRAME_BYTES
from ringkv.net.codec import (
    HELLO,
    KIND_ERROR,
    KIND_ONEWAY,
    KIND_REQUEST,
    KIND_RESPONSE,
    PROTOCOL_VERSION,
    Frame,
    FrameDecoder,
    encode_frame,
    frame_packer,
)
from ringkv.net.rpc import (
    Handler,
    Pending,
    admission_error,
    answer_future_of,
    backoff_s,
    failure_body,
    remote_error,
    settle_answer,
    settled,
    timeout_error,
)
from ringkv.net.sockets import Listener, Network, SocketNetwork, reset_on_close, tune_socket

__all__ = ["ADDRESS_PEER_PREFIX", "Transport", "reset_on_close"]

log = logging.getLogger("ringkv.net")

T = TypeVar("T")

# Peers named with this prefix are addressed by "host:port" before their node id is known.
ADDRESS_PEER_PREFIX = "@"


async def _within(clock: Clock, timeout_s: float, awaitable: Awaitable[T]) -> T:
    """``awaitable``'s result, or TimeoutError once ``timeout_s`` of ``clock``'s seconds
    pass (``asyncio.timeout`` would wait on the loop's time, not the machine's)."""
    inner = asyncio.ensure_future(awaitable)
    expired = False

    def expire() -> None:
        nonlocal expired
        if not inner.done():
            expired = True
            inner.cancel()

    timer = clock.call_later(timeout_s, expire)
    try:
        return await inner
    except asyncio.CancelledError:
        if expired:
            raise TimeoutError(f"not done within {timeout_s}s") from None
        raise
    finally:
        timer.cancel()


WRITE_BATCH_BYTES = 256 * 1024  # flush at least this often so one huge backlog isn't one huge copy

STAT_NAMES = (
    "frames_in",
    "frames_out",
    "bytes_in",
    "bytes_out",
    "requests_sent",
    "responses_received",
    "late_responses",  # answer arrived after its request timed out or was abandoned
    "timeouts",
    "overloaded_local",  # requests refused because a local queue/table was full
    "overloaded_responses",  # requests we answered with Overloaded (too many in flight)
    "dropped_oneway",  # one-way frames we could not queue or lost with a connection
    "dropped_inbound_oneway",  # one-way frames dropped because too many handlers ran
    "handler_errors",
    "protocol_errors",
    "refused_handshakes",
    "handshake_timeouts",
    "connects",
    "connect_failures",
    "reconnects",
    "connections_lost",
    "inbound_accepted",
)


class _Hello(NamedTuple):
    cluster: str
    node_id: str
    protocol: int


def _parse_hello(frame: Frame) -> _Hello:
    p = frame.payload
    if frame.verb != HELLO or frame.kind != KIND_ONEWAY:
        raise ProtocolError(f"expected a hello frame first, got verb {frame.verb!r}")
    if not isinstance(p, dict):
        raise ProtocolError("hello payload must be a map")
    cluster, node_id, protocol = p.get("cluster"), p.get("node_id"), p.get("protocol")
    if type(cluster) is not str or type(node_id) is not str or not node_id:
        raise ProtocolError("hello must carry string cluster and non-empty node_id")
    if type(protocol) is not int:
        raise ProtocolError("hello must carry an integer protocol")
    return _Hello(cluster, node_id, protocol)


class _OutQueue:
    """Bounded FIFO of encoded frames, flushed by the connection attached to it.

    Entries are ``(request_id or None, frame)``: the id lets the flush skip requests
    whose caller already gave up (timed out) instead of sending them late. An
    outbound peer's queue outlives its connections: frames queued while it is
    connecting are sent once a connection is attached.
    """

    __slots__ = ("items", "maxlen", "conn")

    def __init__(self, maxlen: int) -> None:
        self.items: deque[tuple[int | None, bytes]] = deque()
        self.maxlen = maxlen
        self.conn: _Conn | None = None  # the established connection that sends these

    def full(self) -> bool:
        return len(self.items) >= self.maxlen

    def put(self, request_id: int | None, frame: bytes) -> None:
        self.items.append((request_id, frame))
        if self.conn is not None:
            self.conn.schedule_flush()


class _Peer:
    """Outbound state for one remote node id."""

    def __init__(self, node_id: str, host: str, port: int, max_queue: int) -> None:
        self.node_id = node_id
        self.host = host
        self.port = port
        self.out = _OutQueue(max_queue)
        self.pending: dict[int, Pending] = {}
        self.conn: _Conn | None = None
        self.connect_task: asyncio.Task[None] | None = None
        self.failures = 0  # consecutive failed connects, drives the backoff
        self.down_until = 0.0  # monotonic time until which we fail fast
        self.ever_connected = False


class _Conn(asyncio.Protocol):
    """One TCP connection, inbound or outbound, as an asyncio protocol.

    Bytes are decoded and dispatched as they arrive (``data_received``), and
    queued frames are written once per loop turn (``schedule_flush``): no task
    per connection and none per frame, so a request costs two callbacks rather
    than four task wake-ups. The first frame either way is the hello; until
    the handshake is done the connection is not ``established`` and carries
    nothing else.
    """

    def __init__(self, transport: Transport, peer: _Peer | None) -> None:
        self.t = transport
        self.decoder = FrameDecoder(transport._max_frame_bytes)
        self.peer = peer  # set for outbound connections only
        self.outbound = peer is not None
        self.peer_node_id = peer.node_id if peer is not None else "?"
        self.peer_addr: Any = None
        self.sock: asyncio.Transport | None = None
        self.out: _OutQueue | None = None  # set once established
        self.established = False
        self.closed = False
        self.inflight = 0  # requests being answered for this (inbound) connection
        self._loop = asyncio.get_running_loop()
        # Outbound: resolves to the peer's hello frame; frames after it wait in _early.
        self.hello: asyncio.Future[Frame] = self._loop.create_future()
        self._early: list[Frame] = []
        self._hello_timer: Timer | None = None
        self._flush_scheduled = False
        self._reading = False  # in data_received, which then flushes what was queued
        self._flush_wanted = False
        self._write_paused = False
        self._read_paused = False

    # -- asyncio.Protocol --------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, but are one.
        self.sock = transport  # type: ignore[assignment]
        self.peer_addr = transport.get_extra_info("peername")
        tune_socket(transport)
        if not self.outbound:
            self.t._on_inbound_made(self)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        t = self.t
        t._stats["bytes_in"] += len(data)
        try:
            frames = self.decoder.feed(data)
            if not self.established:
                frames = self._handshake_frames(frames)
        except ProtocolError as e:
            self._protocol_error(e)
            return
        if not frames:
            return  # part of a frame: nothing to dispatch or answer yet
        # Answers queued while these frames are dispatched (a local read's) are
        # written together once they all are, without waiting for a loop turn.
        self._reading = True
        try:
            for frame in frames:
                t._on_frame(self, frame)
        except ProtocolError as e:
            self._reading = False
            self._protocol_error(e)
            return
        except Exception:  # a bug in frame dispatch must cost one connection, not the node
            self._reading = False
            log.exception("unexpected error reading from %s at %s", self.peer_node_id, self.peer_addr)
            self.close("internal error in reader", abort=True)
            return
        self._reading = False
        if self._flush_wanted:
            self._flush_wanted = False
            self._flush()
        # Inbound back-pressure: if the peer is not reading our responses, stop
        # reading its requests rather than queue responses without bound.
        if not self.outbound:
            out = self.out
            if out is not None and len(out.items) >= out.maxlen and not self._read_paused:
                self._read_paused = True
                self.sock.pause_reading()  # type: ignore[union-attr]

    def _dispatch(self, frames: list[Frame]) -> bool:
        """Hand frames to the transport; False if that closed the connection."""
        try:
            for frame in frames:
                self.t._on_frame(self, frame)
        except ProtocolError as e:
            self._protocol_error(e)
            return False
        except Exception:  # a bug in frame dispatch must cost one connection, not the node
            log.exception("unexpected error reading from %s at %s", self.peer_node_id, self.peer_addr)
            self.close("internal error in reader", abort=True)
            return False
        return True

    def _protocol_error(self, e: ProtocolError) -> None:
        if not self.established and self.outbound:
            # The dialing coroutine counts and reports it, as a failed connect.
            if not self.hello.done():
                self.hello.set_exception(e)
        else:
            self.t._stats["protocol_errors"] += 1
            if not self.established:
                log.warning("bad handshake from %s, closing: %s", self.peer_addr, e.message)
            else:
                log.warning(
                    "protocol error from node %s at %s, closing that connection: %s",
                    self.peer_node_id, self.peer_addr, e.message,
                )
        self.close(f"protocol error: {e.message}", abort=True)

    def connection_lost(self, exc: Exception | None) -> None:
        self.close("peer closed the connection" if exc is None else f"connection lost: {exc!r}")

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self.schedule_flush()

    # -- handshake ---------------------------------------------------------

    def _handshake_frames(self, frames: list[Frame]) -> list[Frame]:
        """Consume the hello; return the frames that may be dispatched now."""
        if not frames:
            return []
        if self.outbound:
            # The dialing coroutine checks the hello; anything after it waits.
            if not self.hello.done():
                self.hello.set_result(frames[0])
                frames = frames[1:]
            self._early.extend(frames)
            return []
        if self._hello_timer is not None:
            self._hello_timer.cancel()
        if not self.t._on_inbound_hello(self, _parse_hello(frames[0])):
            return []
        return frames[1:]

    def start_hello_timer(self, timeout_s: float) -> None:
        self._hello_timer = self.t._clock.call_later(timeout_s, self._hello_timed_out, timeout_s)

    def _hello_timed_out(self, timeout_s: float) -> None:
        if self.established or self.closed:
            return
        self.t._stats["handshake_timeouts"] += 1
        log.warning("no hello from %s within %.2fs, closing", self.peer_addr, timeout_s)
        self.close("handshake timed out")

    def establish(self, peer_node_id: str, out: _OutQueue) -> None:
        """The handshake passed: carry frames from now on."""
        self.peer_node_id = peer_node_id
        self.out = out
        self.established = True
        out.conn = self
        early, self._early = self._early, []
        if self._dispatch(early) and out.items:
            self.schedule_flush()

    # -- writing -----------------------------------------------------------

    def schedule_flush(self) -> None:
        if self._reading:
            self._flush_wanted = True  # data_received flushes when it is done
            return
        if not self._flush_scheduled and not self.closed:
            self._flush_scheduled = True
            # One callback per loop turn flushes every connection with frames
            # queued (a coordinator's request to three replicas is one, not three).
            to_flush = self.t._to_flush
            if not to_flush:
                self._loop.call_soon(self.t._flush_all)
            to_flush.append(self)

    def _flush(self) -> None:
        """Write everything queued, coalesced into few writes, unless TCP pushes back."""
        self._flush_scheduled = False
        out = self.out
        if self.closed or out is None:
            return
        items = out.items
        stats = self.t._stats
        if len(items) == 1 and not self._write_paused:
            # One frame (the usual case): no batch to build.
            request_id, frame = items.popleft()
            if request_id is not None:  # a request (only a peer's queue holds those)
                waiting = self.peer.pending.get(request_id)  # type: ignore[union-attr]
                if waiting is None or waiting.future.done():
                    return  # its caller gave up already
            try:
                self.sock.write(frame)  # type: ignore[union-attr]
            except (ConnectionError, OSError, RuntimeError) as e:
                self.close(f"write failed: {e!r}")
                return
            stats["frames_out"] += 1
            stats["bytes_out"] += len(frame)
        try:
            while items and not self._write_paused:
                chunks: list[bytes] = []
                size = 0
                while items and size < WRITE_BATCH_BYTES:
                    request_id, frame = items.popleft()
                    if request_id is not None:
                        waiting = self.peer.pending.get(request_id)  # type: ignore[union-attr]
                        if waiting is None or waiting.future.done():
                            continue  # its caller gave up already; don't spend bandwidth on it
                    chunks.append(frame)
                    size += len(frame)
                if chunks:
                    # May call pause_writing() at once, which ends this loop.
                    self.sock.write(chunks[0] if len(chunks) == 1 else b"".join(chunks))  # type: ignore[union-attr]
                    stats["frames_out"] += len(chunks)
                    stats["bytes_out"] += size
        except (ConnectionError, OSError, RuntimeError) as e:
            self.close(f"write failed: {e!r}")
            return
        if self._read_paused and not out.full():
            self._read_paused = False
            self.sock.resume_reading()  # type: ignore[union-attr]

    # -- closing -----------------------------------------------------------

    def close(self, reason: str, *, abort: bool = False) -> None:
        """Idempotent. Closes the socket and tells the transport.

        ``abort`` resets the connection instead of first sending what is
        buffered: after a protocol error the peer gets none of our bandwidth,
        and a peer that stopped reading cannot keep the socket open.
        """
        if self.closed:
            return
        self.closed = True
        if self._hello_timer is not None:
            self._hello_timer.cancel()
        if not self.hello.done():
            self.hello.set_exception(ConnectionError(f"connection closed: {reason}"))
        if not self.hello.cancelled():
            self.hello.exception()  # retrieved: a dial that gave up must not log it
        if self.out is not None and self.out.conn is self:
            self.out.conn = None
        if self.sock is not None:
            if abort:
                reset_on_close(self.sock)
                self.sock.abort()
            else:
                self.sock.close()
        log.debug("closed connection with %s at %s: %s", self.peer_node_id, self.peer_addr, reason)
        self.t._on_conn_closed(self, reason)


class Transport:
    """Request/response and one-way messaging between the nodes of one cluster.

    ``handler(from_node_id, verb, payload)`` serves every incoming request and one-way
    frame; its return value is the response payload. Raising a ``RingKVError`` sends
    that error back (the caller gets ``RemoteError``, or ``Overloaded`` for code
    "overloaded"); any other exception is logged and sent back as code "internal".
    """

    def __init__(
        self,
        node_id: str,
        cluster: str,
        host: str,
        port: int,
        handler: Handler,
        *,
        max_frame_bytes: int = MAX_FRAME_BYTES,
        max_queue: int = 4096,
        connect_timeout_s: float = 2.0,
        handshake_timeout_s: float = 2.0,
        max_backoff_s: float = 2.0,
        max_inflight_per_conn: int = 10000,
        clock: Clock | None = None,
        network: Network | None = None,
    ) -> None:
        """``max_queue`` bounds the frames waiting to be written to one peer, and
        ``max_inflight_per_conn`` the requests pending to one peer (as a caller)
        and those being served for one connection (as a server); past either,
        ``Overloaded``. ``network`` opens and accepts connections (real TCP from
        ``host`` by default; the simulator passes its own)."""
        if not node_id:
            raise ValueError("node_id must be non-empty")
        if max_queue < 1 or max_inflight_per_conn < 1:
            raise ValueError("max_queue and max_inflight_per_conn must be >= 1")
        self.node_id = node_id
        self.cluster = cluster
        self._host = host
        self._port = port
        self._network: Network = network or SocketNetwork(host)
        self._handler = handler
        self._answer_future = answer_future_of(handler)
        self._max_frame_bytes = max_frame_bytes
        self._max_queue = max_queue
        self._connect_timeout_s = connect_timeout_s
        self._handshake_timeout_s = handshake_timeout_s
        self._max_backoff_s = max_backoff_s
        self._max_inflight = max_inflight_per_conn
        # Called with (host, port) when a dial reaches this very node (see _connect).
        self.on_self_dial: Callable[[str, int], None] | None = None
        self._clock = clock or SystemClock()
        self._packer = frame_packer()  # for this transport's loop thread only

        self._hello = encode_frame(
            KIND_ONEWAY,
            0,
            HELLO,
            {"cluster": cluster, "node_id": node_id, "protocol": PROTOCOL_VERSION},
        )
        self._ids = itertools.count(1)  # request id 0 is reserved for one-way frames
        self._listener: Listener | None = None
        self._peers: dict[str, _Peer] = {}
        # Dicts used as ordered sets: stop() walks them, and under simulation the
        # order in which things happen must not depend on object addresses.
        self._inbound: dict[_Conn, None] = {}
        self._handshaking: dict[_Conn, None] = {}
        self._tasks: dict[asyncio.Task[Any], None] = {}  # handler tasks, for stop()
        self._closing = False
        self._stats: dict[str, int] = dict.fromkeys(STAT_NAMES, 0)
        # Connections with frames to write this loop turn (see _Conn.schedule_flush).
        self._to_flush: list[_Conn] = []

    def _flush_all(self) -> None:
        conns, self._to_flush = self._to_flush, []
        for conn in conns:
            conn._flush()

    # ----------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        if self._closing:
            raise ShuttingDown(f"transport of node {self.node_id} was stopped")
        self._listener = await self._network.listen(
            lambda: _Conn(self, None), self._host, self._port
        )

    async def stop(self) -> None:
        """Close the server and every connection; fail pending requests with ShuttingDown."""
        if self._closing:
            return
        self._closing = True
        if self._listener is not None:
            self._listener.close()
        waits: list[Awaitable[Any]] = []
        def stopping() -> RingKVError:
            return ShuttingDown(f"node {self.node_id} is stopping")

        for peer in self._peers.values():
            self._fail_peer(peer, stopping)
            if peer.connect_task is not None:
                peer.connect_task.cancel()
                waits.append(peer.connect_task)
            if peer.conn is not None:
                peer.conn.close("transport stopping")
        for conn in list(self._inbound) + list(self._handshaking):
            conn.close("transport stopping")
        current = asyncio.current_task()
        for task in list(self._tasks):
            if task is not current:  # stop() may be called from a handler
                task.cancel()
                waits.append(task)
        if waits:
            try:
                await _within(self._clock, 5.0, asyncio.wait([asyncio.ensure_future(w) for w in waits]))
            except TimeoutError:
                log.warning("node %s: %d tasks still running after stop", self.node_id, len(waits))
        if self._listener is not None:
            await self._listener.wait_closed()

    @property
    def address(self) -> tuple[str, int]:
        """The (host, port) the server listens on (the real port when started with port 0)."""
        if self._listener is None:
            return (self._host, self._port)
        return self._listener.address()

    @property
    def stats(self) -> dict[str, int]:
        s = dict(self._stats)
        s["peers"] = len(self._peers)
        s["outbound_connections"] = sum(1 for p in self._peers.values() if p.conn is not None)
        s["inbound_connections"] = len(self._inbound)
        s["pending_requests"] = sum(len(p.pending) for p in self._peers.values())
        return s

    def forget_peer(self, node_id: str) -> None:
        """Drop everything about ``node_id``: its connection, queue and pending requests."""
        peer = self._peers.pop(node_id, None)
        if peer is None:
            return
        if peer.connect_task is not None:
            peer.connect_task.cancel()
            peer.connect_task = None
        if peer.conn is not None:
            peer.conn.close("peer forgotten")
        self._fail_peer(peer, lambda: PeerUnreachable(f"node {node_id} was forgotten",
                                                      node_id=node_id, maybe_delivered=True))

    def peer_up(self, node_id: str) -> None:
        """Gossip hears ``node_id`` again: forget the reconnect backoff, so the
        next request dials at once instead of failing fast."""
        peer = self._peers.get(node_id)
        if peer is not None and peer.conn is None:
            peer.failures, peer.down_until = 0, 0.0

    def set_peer_address(self, node_id: str, host: str, port: int) -> None:
        """Where to connect for ``node_id``. A changed address drops the old connection."""
        peer = self._peers.get(node_id)
        if peer is None:
            self._peers[node_id] = _Peer(node_id, host, port, self._max_queue)
            return
        if (peer.host, peer.port) == (host, port):
            return
        peer.host, peer.port = host, port
        peer.failures, peer.down_until = 0, 0.0  # a new address deserves a fresh try
        if peer.connect_task is not None:
            peer.connect_task.cancel()
            peer.connect_task = None
        if peer.conn is not None:
            peer.conn.close("peer address changed")
        self._fail_peer(
            peer,
            lambda: PeerUnreachable(
                f"address of node {node_id} changed", node_id=node_id, maybe_delivered=True
            ),
        )

    # ----------------------------------------------------------------- sending

    async def request(self, node_id: str, verb: str, payload: Any, timeout_s: float) -> Any:
        """Send a request and wait for its response payload.

        Raises PeerTimeout, PeerUnreachable, Overloaded, RemoteError, ShuttingDown, and
        (for a payload we cannot send) ProtocolError or TooLarge.
        """
        return await self.request_future(node_id, verb, payload, timeout_s)

    def request_future(
        self,
        node_id: str,
        verb: str,
        payload: Any,
        timeout_s: float,
        convert: Callable[[Any], Any] | None = None,
    ) -> asyncio.Future[Any]:
        """Send a request; the returned future resolves to its response payload.

        For callers that wait on several answers at once (a coordinator), this
        needs no task per request. What ``request`` raises before sending is
        raised here; the rest arrives through the future. Cancelling the
        future abandons the request: it is not sent if it is still queued.
        ``convert`` parses the payload as it arrives; a ``RingKVError`` it
        raises (a malformed answer) fails the future instead.
        """
        if timeout_s <= 0:
            raise ValueError("timeout_s must be > 0")
        if verb == HELLO:
            raise ValueError(f"verb {HELLO!r} is reserved for the handshake")
        peer = self._admit(node_id, request=True)
        request_id = next(self._ids)
        frame = encode_frame(KIND_REQUEST, request_id, verb, payload,
                             max_frame_bytes=self._max_frame_bytes, packer=self._packer)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        timer = self._clock.call_later(timeout_s, self._expire, peer, request_id, verb, timeout_s)
        # A caller that gives up (cancels) frees its place and timer at once, as an
        # answer would; otherwise they stay until the timeout, and abandoned
        # requests to a slow peer make new ones Overloaded.
        abandoned = partial(self._abandoned, peer, request_id)
        peer.pending[request_id] = Pending(fut, timer, convert, abandoned)
        fut.add_done_callback(abandoned)
        out = peer.out
        out.items.append((request_id, frame))  # _OutQueue.put, inlined on the hottest path
        if out.conn is not None:
            out.conn.schedule_flush()
        self._stats["requests_sent"] += 1
        if out.conn is None:
            self._ensure_connecting(peer)
        return fut

    def send_oneway(self, node_id: str, verb: str, payload: Any) -> bool:
        """Queue a one-way message; never blocks. Returns False (and counts a drop) when
        the peer is unknown, unreachable or its queue is full. A payload we cannot encode
        at all still raises (ProtocolError / TooLarge): that is a caller bug."""
        if verb == HELLO:
            raise ValueError(f"verb {HELLO!r} is reserved for the handshake")
        frame = encode_frame(KIND_ONEWAY, 0, verb, payload, max_frame_bytes=self._max_frame_bytes,
                             packer=self._packer)
        try:
            peer = self._admit(node_id, request=False)
        except RingKVError:
            self._stats["dropped_oneway"] += 1
            return False
        peer.out.put(None, frame)
        self._ensure_connecting(peer)
        return True

    def _admit(self, node_id: str, *, request: bool) -> _Peer:
        """The peer to queue a frame for, or raise why we cannot right now (fast).
        A request also needs a place in the peer's pending table."""
        if self._closing:
            raise ShuttingDown(f"node {self.node_id} is stopping")
        peer = self._peers.get(node_id)
        if peer is None:
            raise PeerUnreachable(f"no address known for node {node_id}", node_id=node_id)
        if (
            peer.conn is None
            and peer.connect_task is None
            and self._clock.monotonic_s() < peer.down_until
        ):
            raise PeerUnreachable(
                f"node {node_id} at {peer.host}:{peer.port} is unreachable "
                f"(retrying after backoff)",
                node_id=node_id,
            )
        pending = len(peer.pending) if request else 0
        queued = len(peer.out.items)
        if pending >= self._max_inflight or queued >= peer.out.maxlen:
            self._stats["overloaded_local"] += 1
            raise admission_error(node_id, pending, self._max_inflight, queued,  # type: ignore[misc]
                                  peer.out.maxlen)
        return peer

    def _abandoned(self, peer: _Peer, request_id: int, fut: asyncio.Future[Any]) -> None:
        if fut.cancelled():
            waiting = peer.pending.pop(request_id, None)
            if waiting is not None:
                waiting.timer.cancel()

    def _expire(self, peer: _Peer, request_id: int, verb: str, timeout_s: float) -> None:
        waiting = peer.pending.pop(request_id, None)
        fut = waiting.future if waiting is not None else None
        if fut is not None and not fut.done():
            self._stats["timeouts"] += 1
            fut.set_exception(timeout_error(peer.node_id, verb, timeout_s))

    def _fail_peer(self, peer: _Peer, make_error: Callable[[], RingKVError]) -> None:
        """Fail every pending request of ``peer`` and drop what is still queued."""
        waiting = list(peer.pending.values())
        peer.pending.clear()  # in place: the connection's flush holds a reference to this dict
        for fut, timer, _convert, _abandoned in waiting:
            timer.cancel()
            if not fut.done():
                fut.set_exception(make_error())  # one instance per waiter: tracebacks differ
        dropped = sum(1 for rid, _ in peer.out.items if rid is None)
        self._stats["dropped_oneway"] += dropped
        peer.out.items.clear()

    # ----------------------------------------------------------------- connecting

    def _ensure_connecting(self, peer: _Peer) -> None:
        if peer.conn is None and peer.connect_task is None:
            peer.connect_task = asyncio.create_task(self._connect(peer))

    async def _connect(self, peer: _Peer) -> None:
        host, port = peer.host, peer.port
        conn: _Conn | None = None
        # Named: a dial abandoned with its simulated process finishes when no loop runs.
        loop = asyncio.get_running_loop()
        try:
            protocol = await _within(
                self._clock, self._connect_timeout_s,
                self._network.connect(lambda: _Conn(self, peer), host, port),
            )
            conn = cast(_Conn, protocol)  # the factory above makes a _Conn
            assert conn is not None and conn.sock is not None
            conn.sock.write(self._hello)
            first = await _within(self._clock, self._handshake_timeout_s, asyncio.shield(conn.hello))
            hello = _parse_hello(first)
            # A peer known only by address (a gossip seed, named "@host:port")
            # may be any node of our cluster; a named peer must be that node.
            expected = None if peer.node_id.startswith(ADDRESS_PEER_PREFIX) else peer.node_id
            refusal = self._refusal(hello, expected_node_id=expected)
            if refusal:
                self._stats["refused_handshakes"] += 1
                log.warning(
                    "refused connection to %s:%s (expected node %s): %s", host, port, peer.node_id, refusal
                )
                if hello.node_id == self.node_id and self.on_self_dial is not None:
                    # This address is this node under another name (a seed list
                    # naming us as localhost, say): tell the node, so that it
                    # stops dialling it and never counts itself twice.
                    self.on_self_dial(host, port)
                raise ConnectionRefusedError(f"handshake refused: {refusal}")
            if conn.closed:
                raise ConnectionError("connection closed during handshake")
        except asyncio.CancelledError:
            if conn is not None:
                conn.close("dial cancelled")
            raise
        except Exception as e:  # refused, timed out, reset, bad hello: all mean "unreachable"
            if conn is not None:
                conn.close(f"dial failed: {e!r}")
            if isinstance(e, ProtocolError):
                self._stats["protocol_errors"] += 1
            self._connect_failed(peer, e)
            return
        finally:
            if peer.connect_task is asyncio.current_task(loop):
                peer.connect_task = None

        self._stats["connects"] += 1
        if peer.ever_connected or peer.failures:
            self._stats["reconnects"] += 1
            log.info("reconnected to node %s at %s:%s", peer.node_id, host, port)
        peer.ever_connected = True
        peer.failures, peer.down_until = 0, 0.0
        peer.conn = conn
        conn.establish(peer.node_id, peer.out)

    def _connect_failed(self, peer: _Peer, error: BaseException) -> None:
        peer.failures += 1
        backoff = backoff_s(peer.failures, self._max_backoff_s)
        peer.down_until = self._clock.monotonic_s() + backoff
        self._stats["connect_failures"] += 1
        # Warn once per outage, not once per retry.
        level = logging.WARNING if peer.failures == 1 else logging.DEBUG
        log.log(
            level,
            "cannot reach node %s at %s:%s (%r); failing fast for %.2fs",
            peer.node_id,
            peer.host,
            peer.port,
            error,
            backoff,
        )
        reason = f"cannot reach node {peer.node_id} at {peer.host}:{peer.port}: {error!r}"
        self._fail_peer(peer, lambda: PeerUnreachable(reason, node_id=peer.node_id))

    def _refusal(self, hello: _Hello, expected_node_id: str | None = None) -> str | None:
        """Why a handshake must be refused, or None."""
        if hello.cluster != self.cluster:
            return (
                f"node {hello.node_id!r} is in cluster {hello.cluster!r}, "
                f"node {self.node_id!r} is in cluster {self.cluster!r}"
            )
        if hello.protocol != PROTOCOL_VERSION:
            return f"node {hello.node_id!r} speaks protocol {hello.protocol}, we speak {PROTOCOL_VERSION}"
        if hello.node_id == self.node_id:
            # Either a second node runs with our id, or a dial to a port nobody
            # listens on was connected to itself by TCP (source port == port).
            return f"the peer says it is {self.node_id!r}, which is this node's own id"
        if expected_node_id is not None and hello.node_id != expected_node_id:
            return f"expected node {expected_node_id!r} but {hello.node_id!r} answered"
        return None

    # ----------------------------------------------------------------- accepting

    def _on_inbound_made(self, conn: _Conn) -> None:
        """A peer connected: it has one deadline to say hello (silent or trickling peers are closed)."""
        if self._closing:
            conn.close("transport stopping")
            return
        self._handshaking[conn] = None
        self._stats["inbound_accepted"] += 1
        conn.start_hello_timer(self._handshake_timeout_s)

    def _on_inbound_hello(self, conn: _Conn, hello: _Hello) -> bool:
        """Check an inbound hello; True if the connection may now carry frames."""
        self._handshaking.pop(conn, None)
        assert conn.sock is not None
        # Answer with our hello even if we will refuse, so the dialer can log
        # exactly which cluster/node it reached.
        conn.sock.write(self._hello)
        refusal = self._refusal(hello)
        if refusal:
            self._stats["refused_handshakes"] += 1
            log.warning("refused connection from %s: %s", conn.peer_addr, refusal)
            conn.close(f"refused: {refusal}")
            return False
        if self._closing:
            conn.close("transport stopping")
            return False
        self._inbound[conn] = None
        conn.establish(hello.node_id, _OutQueue(self._max_queue))
        return True

    # ----------------------------------------------------------------- receiving

    def _on_conn_closed(self, conn: _Conn, reason: str) -> None:
        self._handshaking.pop(conn, None)
        peer = conn.peer
        if peer is None:
            self._inbound.pop(conn, None)
            return
        if peer.conn is conn:
            peer.conn = None
            self._stats["connections_lost"] += 1
            node_id = peer.node_id
            self._fail_peer(
                peer,
                lambda: PeerUnreachable(
                    f"connection to node {node_id} lost: {reason}",
                    node_id=node_id,
                    maybe_delivered=True,
                ),
            )

    def _on_frame(self, conn: _Conn, frame: Frame) -> None:
        """Dispatch one decoded frame. Raises ProtocolError to close the connection."""
        version, kind, request_id, verb, payload = frame
        self._stats["frames_in"] += 1
        if version != PROTOCOL_VERSION:
            raise ProtocolError(f"frame has protocol version {version}")
        if verb == HELLO:
            raise ProtocolError("duplicate hello")
        peer = conn.peer
        if peer is not None:
            # Outbound connections carry only answers to our requests.
            if kind not in (KIND_RESPONSE, KIND_ERROR):
                raise ProtocolError(f"frame kind {kind} on an outbound connection")
            waiting = peer.pending.pop(request_id, None)
            if waiting is None:
                self._stats["late_responses"] += 1
                return
            fut, timer, convert, abandoned = waiting
            timer.cancel()
            if fut.done():  # abandoned by its caller
                self._stats["late_responses"] += 1
                return
            # Answered: nobody can abandon it now, so that callback need not run.
            fut.remove_done_callback(abandoned)
            self._stats["responses_received"] += 1
            if kind == KIND_RESPONSE:
                if convert is None:
                    fut.set_result(payload)
                else:
                    settle_answer(fut, payload, convert)
            else:
                fut.set_exception(remote_error(conn.peer_node_id, verb, payload))
            return
        # Inbound connections carry requests and one-way messages.
        out = conn.out
        assert out is not None  # frames are served on established connections only
        if kind not in (KIND_REQUEST, KIND_ONEWAY):
            raise ProtocolError(f"frame kind {kind} on an inbound connection")
        if conn.inflight >= self._max_inflight:
            if kind == KIND_REQUEST:
                self._stats["overloaded_responses"] += 1
                err = Overloaded(f"node {self.node_id} has {conn.inflight} requests in flight")
                out.put(None, self._error_frame(frame, err.code, err.message, {}))
            else:
                self._stats["dropped_inbound_oneway"] += 1
            return
        if kind == KIND_REQUEST and self._answer_future is not None:
            try:
                answer = self._answer_future(conn.peer_node_id, verb, payload)
            except Exception as e:  # noqa: BLE001 - answered like a failed handler task
                out.put(None, self._failure_frame(conn, frame, e))
                return
            if answer is not None:
                if answer.done():  # a local read: its response frame is written at once
                    self._respond(conn, frame, answer)
                else:
                    self._answer_later(conn, frame, answer)
                return
        conn.inflight += 1
        task = asyncio.create_task(self._serve(conn, frame))
        self._tasks[task] = None
        task.add_done_callback(self._task_done)

    async def _serve(self, conn: _Conn, frame: Frame) -> None:
        """Run the handler for one frame (in its own task) and queue the answer."""
        out = conn.out
        assert out is not None  # frames are served on established connections only
        is_request = frame.kind == KIND_REQUEST
        try:
            try:
                result = await self._handler(conn.peer_node_id, frame.verb, frame.payload)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - every failure is answered
                reply = self._failure_frame(conn, frame, e)
            else:
                reply = self._response_frame(frame, result) if is_request else b""
        finally:
            conn.inflight -= 1
        if is_request and not conn.closed:
            out.put(None, reply)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.pop(task, None)

    def _respond(self, conn: _Conn, frame: Frame, answer: asyncio.Future[Any]) -> None:
        """Queue the response carried by ``answer``, which is done."""
        out = conn.out
        assert out is not None  # frames are served on established connections only
        error, payload = settled(answer, self.node_id)
        if conn.closed:
            return
        if error is None:
            out.put(None, self._response_frame(frame, payload))
        else:
            out.put(None, self._failure_frame(conn, frame, error))

    def _answer_later(self, conn: _Conn, frame: Frame, answer: asyncio.Future[Any]) -> None:
        """Queue the response once ``answer`` resolves; it counts as in flight till then."""
        conn.inflight += 1

        def respond(done: asyncio.Future[Any]) -> None:
            conn.inflight -= 1
            self._respond(conn, frame, done)

        answer.add_done_callback(respond)

    def _failure_frame(self, conn: _Conn, frame: Frame, error: BaseException) -> bytes:
        """The answer to a request whose handler raised."""
        self._stats["handler_errors"] += 1
        if isinstance(error, RingKVError):
            log.debug("handler for %r from %s raised %r", frame.verb, conn.peer_node_id, error)
        else:
            log.error("handler for %r from node %s failed", frame.verb, conn.peer_node_id,
                      exc_info=error)
        body = failure_body(error)
        return self._error_frame(frame, body["code"], body["message"], body["details"])

    def _response_frame(self, frame: Frame, result: Any) -> bytes:
        try:
            return encode_frame(KIND_RESPONSE, frame.request_id, frame.verb, result,
                                max_frame_bytes=self._max_frame_bytes, packer=self._packer)
        except (ProtocolError, TooLarge) as e:
            log.error("cannot send response to %r: %s", frame.verb, e.message)
            return self._error_frame(frame, e.code, e.message, {})

    def _error_frame(self, frame: Frame, code: str, message: str, details: dict[str, Any]) -> bytes:
        body = {"code": code, "message": message, "details": details}
        try:
            return encode_frame(KIND_ERROR, frame.request_id, frame.verb, body,
                                max_frame_bytes=self._max_frame_bytes, packer=self._packer)
        except (ProtocolError, TooLarge):
            # Details that cannot travel are dropped; code and message always can.
            body = {"code": code, "message": message[:4096], "details": {}}
            return encode_frame(KIND_ERROR, frame.request_id, frame.verb, body)
