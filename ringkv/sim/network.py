"""A simulated network of byte streams, on which the real transport runs.

The simulator supplies only the connection (FoundationDB's Sim2Conn idea):
each simulated node runs the production ``ringkv.net.transport.Transport``,
and its ``Network`` (``SimHost``) connects protocols through in-memory
``SimSocket`` pairs instead of TCP. So the real framing and frame decoder,
handshake, flush-per-loop-turn writer, back-pressure, admission, timers and
error mapping run under every seed; nothing of the transport is copied here.

A ``SimSocket`` behaves as an asyncio transport to its protocol:

* bytes arrive in order per direction, after latency plus random jitter
  (and sometimes an extra delay), never reordered within a stream (a slow
  write holds up those behind it, as on TCP); different connections do
  reorder against each other;
* a write may arrive in several pieces, split at seeded points (short
  reads), so the frame decoder reassembles frames across deliveries;
* back-pressure: bytes written but not yet handed to the peer's protocol
  count as buffered; past the high-water mark the writer's protocol gets
  ``pause_writing``, and ``resume_writing`` once delivery brings it under
  the low-water mark (the news takes one latency to come back, like an
  ACK). A paused, partitioned or powered-off peer therefore fills the
  writer's buffer, then its transport's bounded send queue (``Overloaded``).
  ``pause_reading`` holds arrived bytes until ``resume_reading``.

Faults, as a real TCP stack would show them:

* a partition cuts links between machines, per direction. A stream keeps
  its connection (TCP retransmits; nothing is lost or duplicated on a
  stream): bytes reaching a cut link wait there and are delivered, in
  order, once it heals. Requests meanwhile time out on their own timers.
* a clog holds all of a machine's traffic until it ends (bytes arrive late).
* a dial to a machine that is down, unknown or cut off gets no answer (the
  transport's dial timeout ends it); to an address nobody listens on, a
  refusal after one round trip.
* a process crash (its machine up): its kernel resets every connection;
  each peer sees ``connection_lost`` (a reset) once the bytes sent before
  it have arrived.
* a machine crash: silence. Peers keep their connections, and bytes to it
  are never delivered; when the machine boots again, its kernel answers
  the peers' retransmissions with resets.
* ``NetworkConditions.reset``: a write occasionally resets its connection
  (a middlebox or a flaky link), which exercises reconnects; this replaces
  message loss and duplication, which TCP hides.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from math import log
from typing import Any

from ringkv.address import format_address
from ringkv.sim.loop import Process, VirtualTimeLoop

ProtocolFactory = Callable[[], asyncio.Protocol]

STAT_NAMES = (
    "writes",  # write() calls that put bytes on a stream
    "bytes",
    "deliveries",  # data_received calls
    "split_writes",  # writes that arrived in more than one piece
    "held",  # pieces that waited at a cut link
    "write_pauses",  # pause_writing calls (a buffer passed its high-water mark)
    "connects",
    "refused",
    "unanswered_connects",
    "resets",  # connections reset (process crash, reboot or NetworkConditions.reset)
)


@dataclass(frozen=True)
class NetworkConditions:
    latency_s: float = 0.0005  # one-way base delay
    jitter_s: float = 0.0005  # mean of an exponential extra delay per write
    delay: float = 0.0  # probability that a write is held up by up to delay_max_s more
    delay_max_s: float = 0.05
    split: float = 0.25  # probability that a write arrives in several pieces
    min_pieces: int = 2  # (a test may ask for every byte on its own)
    max_pieces: int = 4
    reset: float = 0.0  # probability that a write resets its connection
    high_water_bytes: int = 64 * 1024  # asyncio's default write-buffer limits
    low_water_bytes: int = 16 * 1024

    def __post_init__(self) -> None:
        if not 0 <= self.low_water_bytes <= self.high_water_bytes:
            raise ValueError("need 0 <= low_water_bytes <= high_water_bytes")
        if not 2 <= self.min_pieces <= self.max_pieces:
            raise ValueError("need 2 <= min_pieces <= max_pieces")

    def describe(self) -> str:
        return (f"latency {self.latency_s * 1e3:.2f} ms + jitter {self.jitter_s * 1e3:.2f} ms, "
                f"delayed {self.delay:.2%} (up to {self.delay_max_s * 1e3:.0f} ms), "
                f"split {self.split:.0%} (up to {self.max_pieces} pieces), "
                f"reset {self.reset:.3%} of writes")


class _Marker:
    """What travels on a stream besides bytes: the end of it."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name


_EOF = _Marker("eof")  # a graceful close (FIN)
_RESET = _Marker("reset")  # an abort, or the kernel of a dead process (RST)


class SimSocket:
    """One end of a simulated TCP connection: the asyncio transport its protocol writes to."""

    def __init__(self, network: SimNetwork, process: Process, machine: str,
                 sockname: tuple[str, int], peername: tuple[str, int]) -> None:
        self.network = network
        self.process = process
        self.context = process.context
        self.machine = machine
        self.peer: SimSocket | None = None
        self.protocol: asyncio.Protocol | None = None
        self.closing = False  # close() or abort() called, or the connection is lost
        self.dead = False  # connection_lost delivered, or the process is gone
        self.buffered = 0  # bytes written here not yet handed to the peer's protocol
        self.high_water = network.conditions.high_water_bytes
        self.low_water = network.conditions.low_water_bytes
        self.write_paused = False
        self.read_paused = False
        self.inbox: deque[Any] = deque()  # arrived while reading was paused
        self.held: deque[Any] = deque()  # arrived at a cut link, waiting for it to heal
        self.last_arrival = 0.0  # when what was last written here reaches the peer
        self._extra = {"peername": peername, "sockname": sockname, "socket": None}

    # -- asyncio.Transport ---------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.closing or not data:
            return
        self.buffered += len(data)
        self.network._send(self, data)
        if self.buffered > self.high_water and not self.write_paused and not self.closing:
            self.write_paused = True
            self.network.stats["write_pauses"] += 1
            self.protocol.pause_writing()  # type: ignore[union-attr]

    def writelines(self, chunks: list[bytes]) -> None:
        self.write(b"".join(chunks))

    def can_write_eof(self) -> bool:
        return False

    def close(self) -> None:
        self._end(_EOF, None)

    def abort(self) -> None:
        self._end(_RESET, None)

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._extra.get(name, default)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if high is None:
            high = 4 * low if low is not None else 64 * 1024
        if low is None:
            low = high // 4
        if not 0 <= low <= high:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self.high_water, self.low_water = high, low

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (self.low_water, self.high_water)

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def pause_reading(self) -> None:
        self.read_paused = True

    def resume_reading(self) -> None:
        if self.read_paused:
            self.read_paused = False
            if self.inbox:
                self.network.loop.call_soon(self._drain_inbox, context=self.context)

    def is_reading(self) -> bool:
        return not self.read_paused and not self.closing

    # -- the stream ------------------------------------------------------------

    def _end(self, marker: _Marker, exc: Exception | None) -> None:
        """Close this end: the peer gets ``marker`` after the bytes before it, and
        our protocol hears ``connection_lost`` on the next loop turn (as asyncio does)."""
        if self.closing:
            return
        self.closing = True
        self.network._send(self, marker)
        self.network.loop.call_soon(self._lost, exc, context=self.context)

    def _lost(self, exc: Exception | None) -> None:
        if self.dead:
            return
        self.dead = self.closing = True
        self.network._sockets.pop(self, None)
        if self.protocol is not None:
            self.protocol.connection_lost(exc)

    def _arrive(self, piece: Any) -> None:
        """A piece the peer wrote reaches this machine (runs in our process)."""
        if self.dead:
            return
        network = self.network
        if (self.held or self.read_paused or self.inbox or piece.__class__ is _Marker
                or (network.blocked and (self.peer.machine, self.machine) in network.blocked)):  # type: ignore[union-attr]
            self._arrive_slowly(piece)
            return
        # The common case, inlined (nearly every simulated message passes here).
        network.stats["deliveries"] += 1
        self.protocol.data_received(piece)  # type: ignore[union-attr]
        writer = self.peer
        writer.buffered -= len(piece)  # type: ignore[union-attr]
        if writer.write_paused and writer.buffered <= writer.low_water:  # type: ignore[union-attr]
            self._acknowledge(writer)  # type: ignore[arg-type]

    def _arrive_slowly(self, piece: Any) -> None:
        network = self.network
        if self.held or (network.blocked and (self.peer.machine, self.machine) in network.blocked):  # type: ignore[union-attr]
            self.held.append(piece)  # a cut link: it waits there, and so does all behind it
            network.stats["held"] += 1
            network._stalled[self] = None
            return
        self._take(piece)

    def _take(self, piece: Any) -> None:
        if self.read_paused or self.inbox:
            self.inbox.append(piece)  # asyncio reads nothing, not even the end, while paused
            return
        self._hand(piece)

    def _hand(self, piece: Any) -> None:
        """Give ``piece`` to the protocol: data_received, or connection_lost for an end."""
        if piece.__class__ is _Marker:
            if piece is _RESET:
                self.network.stats["resets"] += 1
            self.closing = True
            self._lost(ConnectionResetError("connection reset by peer") if piece is _RESET else None)
            return
        self.network.stats["deliveries"] += 1
        self.protocol.data_received(piece)  # type: ignore[union-attr]
        writer = self.peer
        writer.buffered -= len(piece)  # type: ignore[union-attr]
        if writer.write_paused and writer.buffered <= writer.low_water:  # type: ignore[union-attr]
            self._acknowledge(writer)  # type: ignore[arg-type]

    def _acknowledge(self, writer: SimSocket) -> None:
        """The writer's buffer drained under its low-water mark: it learns so as
        from an ACK, one latency later."""
        self.network.loop.deliver_later(self.network.conditions.latency_s, writer.context,
                                        writer._resume, ())

    def _drain_inbox(self) -> None:
        inbox = self.inbox
        while inbox and not self.read_paused and not self.dead:
            self._hand(inbox.popleft())

    def _release_held(self) -> None:
        """The link from the peer healed: deliver what waited, in order."""
        network = self.network
        while self.held and not self.dead:
            if (self.peer.machine, self.machine) in network.blocked:  # type: ignore[union-attr]
                network._stalled[self] = None  # cut again before we got to it
                return
            self._take(self.held.popleft())

    def _resume(self) -> None:
        if self.write_paused and not self.dead and self.buffered <= self.low_water:
            self.write_paused = False
            self.protocol.resume_writing()  # type: ignore[union-attr]


class SimListener:
    def __init__(self, network: SimNetwork, process: Process, machine: str, address: str,
                 host: str, port: int, factory: ProtocolFactory) -> None:
        self.network = network
        self.process = process
        self.machine = machine
        self.address_text = address
        self._address = (host, port)
        self.factory = factory

    def close(self) -> None:
        if self.network._listeners.get(self.address_text) is self:
            del self.network._listeners[self.address_text]

    async def wait_closed(self) -> None:
        return None

    def address(self) -> tuple[str, int]:
        return self._address


class SimHost:
    """The ``Network`` (see ``ringkv.net.sockets``) of one process on one machine."""

    def __init__(self, network: SimNetwork, process: Process, machine: str) -> None:
        self.network = network
        self.process = process
        self.machine = machine

    async def listen(self, factory: ProtocolFactory, host: str, port: int) -> SimListener:
        return self.network._listen(self, factory, host, port)

    async def connect(self, factory: ProtocolFactory, host: str, port: int) -> asyncio.Protocol:
        return await self.network._connect(self, factory, host, port)


class SimNetwork:
    def __init__(self, loop: VirtualTimeLoop, rng: random.Random,
                 conditions: NetworkConditions) -> None:
        self.loop = loop
        self.rng = rng
        self.conditions = conditions
        self.machines: dict[str, str] = {}  # "host:port" -> machine (node id) that owns it
        self.machines_down: set[str] = set()  # powered off: silence, not refusals
        self.blocked: set[tuple[str, str]] = set()  # (from machine, to machine) cut; see cut()
        self.clogged_until: dict[str, float] = {}  # machine -> traffic held until then
        self.stats = dict.fromkeys(STAT_NAMES, 0)
        self._listeners: dict[str, SimListener] = {}
        # Dicts as ordered sets: walked when faults strike, in an order that must
        # not depend on object addresses.
        self._sockets: dict[SimSocket, None] = {}
        self._stalled: dict[SimSocket, None] = {}  # sockets holding pieces at a cut link
        self._orphans: dict[str, list[SimSocket]] = {}  # machine down -> peers still connected
        self._kernel = contextvars.Context()  # what no process owns (a SYN in flight)
        self._ports = itertools.count(40000)

    def host(self, process: Process, machine: str) -> SimHost:
        return SimHost(self, process, machine)

    # -- faults ------------------------------------------------------------------

    def cut(self, links: set[tuple[str, str]]) -> None:
        """Cut these (from machine, to machine) links: streams across them stall."""
        self.blocked |= links

    def heal(self, links: set[tuple[str, str]] | None = None) -> None:
        """Reconnect these links (all if None): what waited at them is delivered."""
        if links is None:
            self.blocked.clear()
        else:
            self.blocked -= links
        stalled, self._stalled = self._stalled, {}
        for sock in stalled:
            if sock.dead:
                continue
            if (sock.peer.machine, sock.machine) in self.blocked:  # type: ignore[union-attr]
                self._stalled[sock] = None
            else:
                # Retransmitted: it arrives one latency after the heal.
                self.loop.deliver_later(self.conditions.latency_s, sock.context,
                                        sock._release_held, ())

    def process_died(self, process: Process, *, machine_down: bool) -> None:
        """Every socket of ``process`` is gone. Its kernel resets each connection,
        unless the whole machine went down (then: silence until it boots again)."""
        for address, listener in list(self._listeners.items()):
            if listener.process is process:
                del self._listeners[address]
        for sock in list(self._sockets):
            if sock.process is not process:
                continue
            del self._sockets[sock]
            sock.dead = sock.closing = True
            peer = sock.peer
            if peer is None or peer.dead:
                continue
            if machine_down:
                self._orphans.setdefault(sock.machine, []).append(peer)
            else:
                self._send(sock, _RESET)

    def machine_up(self, machine: str) -> None:
        """A machine boots: its kernel resets the connections its last life left open."""
        self.machines_down.discard(machine)
        for peer in self._orphans.pop(machine, []):
            if not peer.dead:
                self.loop.deliver_later(self.conditions.latency_s, peer.context, peer._take,
                                        (_RESET,))

    # -- connecting ----------------------------------------------------------------

    def _listen(self, host_: SimHost, factory: ProtocolFactory, host: str,
                port: int) -> SimListener:
        address = format_address(host, port)
        if address in self._listeners:
            raise OSError(f"address {address} already in use")
        self.machines.setdefault(address, host_.machine)
        listener = SimListener(self, host_.process, host_.machine, address, host, port, factory)
        self._listeners[address] = listener
        return listener

    def _one_way_s(self) -> float:
        return self.conditions.latency_s + self.rng.expovariate(1 / self.conditions.jitter_s)

    async def _connect(self, dialer: SimHost, factory: ProtocolFactory, host: str,
                       port: int) -> asyncio.Protocol:
        address = format_address(host, port)
        machine = self.machines.get(address)
        connected: asyncio.Future[asyncio.Protocol] = self.loop.create_future()
        if (machine is None or machine in self.machines_down
                or (dialer.machine, machine) in self.blocked
                or (machine, dialer.machine) in self.blocked):
            self.stats["unanswered_connects"] += 1
            return await connected  # no answer: the dialer's own timeout ends this
        self.loop.deliver_later(self._one_way_s(), self._kernel, self._syn,
                                (dialer, factory, address, connected))
        return await connected

    def _syn(self, dialer: SimHost, factory: ProtocolFactory, address: str,
             connected: asyncio.Future[asyncio.Protocol]) -> None:
        """The dial reaches the address's machine."""
        listener = self._listeners.get(address)
        back = self._one_way_s()
        if listener is None:
            self.stats["refused"] += 1
            self.loop.deliver_later(back, dialer.process.context, _refuse, (connected, address))
            return
        host, port = address.rsplit(":", 1)
        client = SimSocket(self, dialer.process, dialer.machine, (dialer.machine, next(self._ports)),
                           (host, int(port)))
        server = SimSocket(self, listener.process, listener.machine, (host, int(port)),
                           client.get_extra_info("sockname"))
        client.peer, server.peer = server, client
        self._sockets[client] = None
        self._sockets[server] = None
        self.stats["connects"] += 1
        # The listener's process accepts when it next runs; the SYN-ACK is on its way.
        self.loop.deliver_later(0.0, listener.process.context, self._accept, (server, listener))
        server.last_arrival = self.loop.time() + back
        self.loop.deliver_later(back, dialer.process.context, self._established,
                                (client, factory, connected))

    @staticmethod
    def _accept(server: SimSocket, listener: SimListener) -> None:
        if server.dead:
            return
        server.protocol = listener.factory()
        server.protocol.connection_made(server)  # type: ignore[arg-type]

    @staticmethod
    def _established(client: SimSocket, factory: ProtocolFactory,
                     connected: asyncio.Future[asyncio.Protocol]) -> None:
        if client.dead:
            if not connected.done():
                connected.set_exception(ConnectionResetError("connection reset during connect"))
            return
        if connected.done():  # the dialer gave up meanwhile
            client.abort()
            return
        client.protocol = factory()
        client.protocol.connection_made(client)  # type: ignore[arg-type]
        connected.set_result(client.protocol)

    # -- carrying bytes ----------------------------------------------------------

    def _send(self, src: SimSocket, data: Any) -> None:
        """Put ``data`` (bytes or an end marker) on the stream from ``src`` to its peer.
        (Every write of every node passes here: the draws are written out rather
        than made through ``expovariate`` and ``uniform``, with the same results.)"""
        dst = src.peer
        if dst is None or dst.dead:
            return  # nobody will read it; the writer's buffer keeps counting it
        loop = self.loop
        random_ = self.rng.random
        conditions = self.conditions
        now = loop._now
        # latency + expovariate(1 / jitter_s)
        arrival = now + conditions.latency_s - log(1.0 - random_()) / (1 / conditions.jitter_s)
        if conditions.delay and random_() < conditions.delay:
            arrival += conditions.delay_max_s * random_()  # uniform(0, delay_max_s)
        if self.clogged_until:
            held = max(self.clogged_until.get(src.machine, 0.0),
                       self.clogged_until.get(dst.machine, 0.0))
            if held > now:
                arrival += held - now
        if arrival < src.last_arrival:
            arrival = src.last_arrival  # a stream never reorders
        if data.__class__ is _Marker:
            src.last_arrival = arrival
            loop.deliver_later(arrival - now, dst.context, dst._arrive, (data,))
            return
        stats = self.stats
        size = len(data)
        stats["writes"] += 1
        stats["bytes"] += size
        if conditions.reset and random_() < conditions.reset:
            # The connection breaks under this write: both ends see a reset.
            src.closing = True
            src.last_arrival = arrival
            loop.deliver_later(arrival - now, dst.context, dst._arrive, (_RESET,))
            loop.call_soon(src._lost, ConnectionResetError("connection reset"),
                           context=src.context)
            return
        if conditions.split and size > 1 and random_() < conditions.split:
            stats["split_writes"] += 1
            fewest = min(conditions.min_pieces, size)
            pieces = fewest + int(random_() * (min(conditions.max_pieces, size) - fewest + 1))
            if pieces == size:
                cuts: Any = range(1, size)  # every byte on its own
            else:
                # pieces - 1 distinct cut points in 1..size-1, each subset as likely
                # as with rng.sample, without its Python-level machinery.
                chosen: set[int] = set()
                while len(chosen) < pieces - 1:
                    chosen.add(1 + int(random_() * (size - 1)))
                cuts = sorted(chosen)
            view = memoryview(data)  # pieces share the write's bytes: no copies
            start = 0
            for end in (*cuts, size):
                loop.deliver_later(arrival - now, dst.context, dst._arrive, (view[start:end],))
                start = end
                arrival += conditions.jitter_s * random_()  # uniform(0, jitter_s)
        else:
            loop.deliver_later(arrival - now, dst.context, dst._arrive, (data,))
        src.last_arrival = arrival


def _refuse(connected: asyncio.Future[asyncio.Protocol], address: str) -> None:
    if not connected.done():
        connected.set_exception(ConnectionRefusedError(f"connection to {address} refused"))
