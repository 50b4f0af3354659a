"""A simulated network, and the internode transport nodes use on it.

``SimTransport`` has the public API of ``ringkv.net.transport.Transport``
(start, stop, set_peer_address, request, send_oneway) and raises the same
errors in the same situations:

* nobody listening at the address (the process crashed, its machine is up):
  the connect is refused, ``PeerUnreachable``, then a bounded backoff during
  which requests fail fast, as the real transport does;
* the process at the other end dies with requests pending: its kernel resets
  the connection, ``PeerUnreachable(maybe_delivered=True)``;
* no answer (message lost, partition, paused process, machine down): the
  request's own timer fires, ``PeerTimeout``;
* the handler raised: ``RemoteError`` (``Overloaded`` for code "overloaded").

Every message is encoded and decoded with the real frame codec (msgpack), so
nodes never share objects. ``SimNetwork`` delays each message by a base
latency plus random jitter (which reorders messages), drops, duplicates or
delays some further, and applies partitions (per direction, between machines)
and clogs (all traffic of a machine held until the clog ends).
"""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ringkv.errors import (
    Overloaded,
    PeerTimeout,
    PeerUnreachable,
    ProtocolError,
    RingKVError,
    ShuttingDown,
    TooLarge,
)
from ringkv.net.codec import (
    HEADER_BYTES,
    HELLO,
    KIND_ERROR,
    KIND_ONEWAY,
    KIND_REQUEST,
    KIND_RESPONSE,
    Frame,
    FrameDecoder,
    encode_frame,
)
from ringkv.net.rpc import (
    BASE_BACKOFF_S,
    Handler,
    answer_future_of,
    failure_body,
    remote_error as _remote_error,
    settle_answer,
    settled,
)
from ringkv.net.transport import ADDRESS_PEER_PREFIX
from ringkv.sim.loop import Process, VirtualTimeLoop


@dataclass(frozen=True)
class NetworkConditions:
    latency_s: float = 0.0005  # one-way base delay
    jitter_s: float = 0.0005  # mean of an exponential extra delay
    loss: float = 0.0  # probability that a message is dropped
    duplicate: float = 0.0  # probability that a message arrives twice
    delay: float = 0.0  # probability of an extra delay of up to delay_max_s
    delay_max_s: float = 0.05

    def describe(self) -> str:
        return (f"latency {self.latency_s * 1e3:.2f} ms + jitter {self.jitter_s * 1e3:.2f} ms, "
                f"loss {self.loss:.2%}, duplicate {self.duplicate:.2%}, "
                f"delayed {self.delay:.2%} (up to {self.delay_max_s * 1e3:.0f} ms)")


class SimNetwork:
    def __init__(self, loop: VirtualTimeLoop, rng: random.Random,
                 conditions: NetworkConditions) -> None:
        self.loop = loop
        self.rng = rng
        self.conditions = conditions
        self.machines: dict[str, str] = {}  # "host:port" -> machine (node id) that owns it
        self.machines_down: set[str] = set()  # powered off: silence, not refusals
        self.blocked: set[tuple[str, str]] = set()  # (from machine, to machine) cut
        self.clogged_until: dict[str, float] = {}  # machine -> traffic held until then
        self._listeners: dict[str, SimTransport] = {}
        self.stats = dict.fromkeys(
            ("sent", "dropped_partition", "dropped_loss", "duplicated", "refused", "resets"), 0)

    # -- topology ------------------------------------------------------------

    def listen(self, transport: SimTransport) -> None:
        address = transport.address_text
        if address in self._listeners:
            raise OSError(f"address {address} already in use")
        self.machines.setdefault(address, transport.node_id)
        self._listeners[address] = transport

    def unlisten(self, transport: SimTransport) -> None:
        if self._listeners.get(transport.address_text) is transport:
            del self._listeners[transport.address_text]

    def listener(self, address: str) -> SimTransport | None:
        return self._listeners.get(address)

    def process_died(self, transport: SimTransport, *, machine_down: bool) -> None:
        """The process behind ``transport`` is gone. Its kernel resets every
        connection to it, unless the whole machine went down (then: silence)."""
        self.unlisten(transport)
        transport.closed = True
        if machine_down:
            return
        for other in list(self._listeners.values()):
            for request_id, pending in list(other.pending.items()):
                if pending.dst is transport:
                    self.transmit(transport.node_id, other.node_id, other.process,
                                  other.on_reset, request_id)
                    self.stats["resets"] += 1

    # -- carrying messages ------------------------------------------------------

    def transmit(self, src: str, dst: str, process: Process,
                 callback: Callable[..., None], *args: Any) -> None:
        """Run ``callback(*args)`` in ``process`` when the message from machine ``src``
        arrives at machine ``dst``, unless the network loses it."""
        if (src, dst) in self.blocked:
            self.stats["dropped_partition"] += 1
            return
        conditions = self.conditions
        if conditions.loss and self.rng.random() < conditions.loss:
            self.stats["dropped_loss"] += 1
            return
        self.stats["sent"] += 1
        loop = self.loop
        loop.deliver_later(self._delay(src, dst), process.context, callback, args)
        if conditions.duplicate and self.rng.random() < conditions.duplicate:
            self.stats["duplicated"] += 1
            loop.deliver_later(self._delay(src, dst), process.context, callback, args)

    def _delay(self, src: str, dst: str) -> float:
        conditions = self.conditions
        rng = self.rng
        delay = conditions.latency_s + rng.expovariate(1 / conditions.jitter_s)
        if conditions.delay and rng.random() < conditions.delay:
            delay += rng.uniform(0, conditions.delay_max_s)
        if self.clogged_until:
            now = self.loop.time()
            held = max(self.clogged_until.get(src, 0.0), self.clogged_until.get(dst, 0.0))
            if held > now:
                delay += held - now
        return delay


@dataclass
class _Peer:
    address: str
    failures: int = 0  # consecutive refused connects, drives the backoff
    down_until: float = 0.0


@dataclass
class Pending:
    future: asyncio.Future[Any]
    dst: SimTransport | None  # who got the request (None: nobody; it will time out)
    peer_id: str
    verb: str
    convert: Callable[[Any], Any] | None = None  # parses the answer (request_future)


class SimTransport:
    """The internode transport of one node incarnation, on a ``SimNetwork``."""

    def __init__(
        self,
        network: SimNetwork,
        process: Process,
        node_id: str,
        cluster: str,
        host: str,
        port: int,
        handler: Handler,
        *,
        max_frame_bytes: int = 16 * 1024 * 1024,
        max_inflight: int = 10000,
        max_backoff_s: float = 2.0,
    ) -> None:
        self.network = network
        self.process = process
        self.node_id = node_id
        self.cluster = cluster
        self.address_text = f"{host}:{port}"
        self._handler = handler
        self._answer_future = answer_future_of(handler)
        self._max_frame_bytes = max_frame_bytes
        self._max_inflight = max_inflight
        self._max_backoff_s = max_backoff_s
        self._ids = itertools.count(1)
        self._decoder = FrameDecoder(max_frame_bytes)
        self._peers: dict[str, _Peer] = {}
        self.pending: dict[int, Pending] = {}
        self._inflight = 0
        self._tasks: set[asyncio.Task[None]] = set()  # handler tasks, kept from the GC
        self.closed = False

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        if self.closed:
            raise ShuttingDown(f"transport of node {self.node_id} was stopped")
        self.network.listen(self)

    async def stop(self) -> None:
        if self.closed:
            return
        self.network.process_died(self, machine_down=False)  # peers see the connections close
        self._fail_pending(lambda _p: ShuttingDown(f"node {self.node_id} is stopping"))
        for task in list(self._tasks):
            task.cancel()

    def forget_peer(self, node_id: str) -> None:
        if self._peers.pop(node_id, None) is not None:
            self._fail_pending(
                lambda p: PeerUnreachable(f"node {node_id} was forgotten", node_id=node_id,
                                          maybe_delivered=True),
                only_peer=node_id,
            )

    def set_peer_address(self, node_id: str, host: str, port: int) -> None:
        address = f"{host}:{port}"
        peer = self._peers.get(node_id)
        if peer is None:
            self._peers[node_id] = _Peer(address)
            return
        if peer.address == address:
            return
        peer.address, peer.failures, peer.down_until = address, 0, 0.0
        self._fail_pending(
            lambda p: PeerUnreachable(f"address of node {node_id} changed", node_id=node_id,
                                      maybe_delivered=True),
            only_peer=node_id,
        )

    # -- sending -----------------------------------------------------------------

    async def request(self, node_id: str, verb: str, payload: Any, timeout_s: float) -> Any:
        return await self.request_future(node_id, verb, payload, timeout_s)

    def request_future(
        self,
        node_id: str,
        verb: str,
        payload: Any,
        timeout_s: float,
        convert: Callable[[Any], Any] | None = None,
    ) -> asyncio.Future[Any]:
        """As ``Transport.request_future``: the answer as a future, no task needed."""
        if timeout_s <= 0:
            raise ValueError("timeout_s must be > 0")
        if verb == HELLO:
            raise ValueError(f"verb {HELLO!r} is reserved for the handshake")
        peer = self._admit(node_id)
        if len(self.pending) >= self._max_inflight:
            raise Overloaded(f"{len(self.pending)} requests already pending", node_id=node_id)
        request_id = next(self._ids)
        frame = encode_frame(KIND_REQUEST, request_id, verb, payload,
                             max_frame_bytes=self._max_frame_bytes)
        loop = self.network.loop
        future: asyncio.Future[Any] = loop.create_future()
        dst = self._connect(node_id, peer, request_id)
        self.pending[request_id] = Pending(future, dst, node_id, verb, convert)
        if dst is not None:
            self.network.transmit(self.node_id, dst.node_id, dst.process, dst.on_frame,
                                  self, frame)
        timer = loop.call_later(timeout_s, self._expire, request_id, timeout_s)

        def finished(_: asyncio.Future[Any]) -> None:
            timer.cancel()
            self.pending.pop(request_id, None)  # answered, expired, failed or abandoned

        future.add_done_callback(finished)
        return future

    def send_oneway(self, node_id: str, verb: str, payload: Any) -> bool:
        if verb == HELLO:
            raise ValueError(f"verb {HELLO!r} is reserved for the handshake")
        frame = encode_frame(KIND_ONEWAY, 0, verb, payload, max_frame_bytes=self._max_frame_bytes)
        try:
            peer = self._admit(node_id)
        except RingKVError:
            return False
        dst = self._connect(node_id, peer, None)
        if dst is not None:
            self.network.transmit(self.node_id, dst.node_id, dst.process, dst.on_frame,
                                  self, frame)
        return True

    def _admit(self, node_id: str) -> _Peer:
        if self.closed:
            raise ShuttingDown(f"node {self.node_id} is stopping")
        peer = self._peers.get(node_id)
        if peer is None:
            raise PeerUnreachable(f"no address known for node {node_id}", node_id=node_id)
        if self.network.loop.time() < peer.down_until:
            raise PeerUnreachable(
                f"node {node_id} at {peer.address} is unreachable (retrying after backoff)",
                node_id=node_id)
        return peer

    def _connect(self, node_id: str, peer: _Peer, request_id: int | None) -> SimTransport | None:
        """Who answers at the peer's address: a listening transport, or None after
        arranging what the real dialer would see (a refusal, or silence)."""
        network = self.network
        dst = network.listener(peer.address)
        named = not node_id.startswith(ADDRESS_PEER_PREFIX)
        if dst is not None and not (named and dst.node_id != node_id):
            peer.failures, peer.down_until = 0, 0.0
            return dst
        machine = network.machines.get(peer.address)
        if (machine is None or machine in network.machines_down
                or (self.node_id, machine) in network.blocked):
            return None  # no host answers: silence until the request times out
        # A refusal (or a handshake with the wrong node) comes back one round trip later.
        network.stats["refused"] += 1
        network.transmit(machine, self.node_id, self.process, self._refused, node_id, request_id)
        return None

    # -- receiving ---------------------------------------------------------------

    def _decode(self, data: bytes) -> Frame:
        # Each message arrives whole, so the body goes straight to the real
        # decoder's checks, skipping its stream buffering.
        return self._decoder._decode_body(data[HEADER_BYTES:])

    def on_frame(self, src: SimTransport, data: bytes) -> None:
        """A request or one-way frame from ``src`` arrived (runs in our process)."""
        if self.closed:
            return
        frame = self._decode(data)
        if frame.kind == KIND_REQUEST and self._inflight >= self._max_inflight:
            err = Overloaded(f"node {self.node_id} has {self._inflight} requests in flight")
            self._reply(src, frame, KIND_ERROR,
                        {"code": err.code, "message": err.message, "details": {}})
            return
        if frame.kind == KIND_REQUEST and self._answer_future is not None:
            # As the real transport: what the handler can answer at once needs no task.
            try:
                answer = self._answer_future(src.node_id, frame.verb, frame.payload)
            except Exception as exc:  # noqa: BLE001 - answered like a failed handler task
                self._reply(src, frame, KIND_ERROR, failure_body(exc))
                return
            if answer is not None:
                if answer.done():
                    self._respond(src, frame, answer)
                else:
                    self._answer_later(src, frame, answer)
                return
        self._inflight += 1
        self._tasks.add(self.network.loop.create_task(self._serve(src, frame)))

    async def _serve(self, src: SimTransport, frame: Frame) -> None:
        try:
            try:
                result = await self._handler(src.node_id, frame.verb, frame.payload)
            except Exception as exc:  # noqa: BLE001 - every failure is answered
                kind, body = KIND_ERROR, failure_body(exc)
            else:
                kind, body = KIND_RESPONSE, result
        finally:
            self._inflight -= 1
            # The task leaves the set itself: a done callback would cost one more
            # loop callback for every message served. (The loop is named: an
            # abandoned coroutine may run this when no loop is running.)
            self._tasks.discard(asyncio.current_task(self.network.loop))  # type: ignore[arg-type]
        if frame.kind == KIND_REQUEST and not self.closed:
            self._reply(src, frame, kind, body)

    def _answer_later(self, src: SimTransport, frame: Frame, answer: asyncio.Future[Any]) -> None:
        """As the real transport: reply from the future's callback, in flight till then."""
        self._inflight += 1

        def respond(done: asyncio.Future[Any]) -> None:
            self._inflight -= 1
            self._respond(src, frame, done)

        answer.add_done_callback(respond)

    def _respond(self, src: SimTransport, frame: Frame, answer: asyncio.Future[Any]) -> None:
        error, payload = settled(answer, self.node_id)
        if self.closed:
            return
        if error is None:
            self._reply(src, frame, KIND_RESPONSE, payload)
        else:
            self._reply(src, frame, KIND_ERROR, failure_body(error))

    def _reply(self, src: SimTransport, frame: Frame, kind: int, body: Any) -> None:
        try:
            data = encode_frame(kind, frame.request_id, frame.verb, body,
                                max_frame_bytes=self._max_frame_bytes)
        except (ProtocolError, TooLarge) as exc:
            data = encode_frame(KIND_ERROR, frame.request_id, frame.verb,
                                {"code": exc.code, "message": exc.message, "details": {}})
        self.network.transmit(self.node_id, src.node_id, src.process, src.on_response, data)

    def on_response(self, data: bytes) -> None:
        frame = self._decode(data)
        pending = self.pending.pop(frame.request_id, None)
        if pending is None or pending.future.done():
            return  # late: the request timed out, or a duplicate answer
        if frame.kind == KIND_RESPONSE:
            settle_answer(pending.future, frame.payload, pending.convert)
        else:
            pending.future.set_exception(_remote_error(pending.peer_id, frame.verb, frame.payload))

    def on_reset(self, request_id: int) -> None:
        pending = self.pending.pop(request_id, None)
        if pending is not None and not pending.future.done():
            pending.future.set_exception(PeerUnreachable(
                f"connection to node {pending.peer_id} lost: reset by peer",
                node_id=pending.peer_id, maybe_delivered=True))

    def _refused(self, node_id: str, request_id: int | None) -> None:
        peer = self._peers.get(node_id)
        if peer is not None:
            peer.failures += 1
            backoff = min(self._max_backoff_s, BASE_BACKOFF_S * 2 ** min(peer.failures - 1, 30))
            peer.down_until = self.network.loop.time() + backoff
        if request_id is None:
            return
        pending = self.pending.pop(request_id, None)
        if pending is not None and not pending.future.done():
            pending.future.set_exception(PeerUnreachable(
                f"cannot reach node {node_id}: connection refused", node_id=node_id))

    def _expire(self, request_id: int, timeout_s: float) -> None:
        pending = self.pending.pop(request_id, None)
        if pending is not None and not pending.future.done():
            pending.future.set_exception(PeerTimeout(
                f"node {pending.peer_id} did not answer {pending.verb!r} within {timeout_s}s",
                node_id=pending.peer_id, verb=pending.verb, timeout_s=timeout_s))

    def _fail_pending(self, make_error: Callable[[Pending], RingKVError],
                      only_peer: str | None = None) -> None:
        for request_id, pending in list(self.pending.items()):
            if only_peer is not None and pending.peer_id != only_peer:
                continue
            del self.pending[request_id]
            if not pending.future.done():
                pending.future.set_exception(make_error(pending))
