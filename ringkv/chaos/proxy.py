"""A fault-injecting TCP proxy for internode links (the nemesis's hands).

Each node gets an inbound proxy: the node listens on its real internode port
and gossips the proxy's address (``cluster.broadcast_internode``), so every
connection a peer opens to it passes through here. Nodes open their
connections from their own listen address, so the source IP of a connection
names the node at the other end, and a *link* is a (source IP, destination
IP) pair of node addresses. Bytes from A to B travel on A's connections to B's
proxy (client to node) and on B's connections to A's proxy (node to client);
a rule for the link A→B applies to both.

Faults, per directed link:

* ``cut``: bytes are stalled, neither forwarded nor dropped (dropping bytes
  mid-stream would corrupt the framing, which no real network does). At most
  ``QUEUE_CHUNKS`` chunks wait per direction; past that the proxy stops
  reading and TCP flow control pushes back on the sender, as a black hole
  would. ``heal`` then forwards what waited, or resets the connections.
* ``delay``: each chunk is held for the given time before it is forwarded
  (order kept, so throughput is not limited by the delay).
* ``reset``: every connection between two nodes is aborted, both sides, with
  a TCP RST.

Usable on its own, from a command; each route is LISTEN=UPSTREAM and fault
commands are read from stdin, one per line (``help`` lists them)::

    python -m ringkv.chaos.proxy 127.0.0.1:9500=127.0.0.1:7500 127.0.0.2:9501=127.0.0.2:7501
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field

from ringkv.address import parse_address
from ringkv.net.transport import reset_on_close

READ_CHUNK = 64 * 1024
QUEUE_CHUNKS = 16  # per direction: at most 1 MiB waits in a stalled direction
MAX_CONNECTIONS = 1000  # per proxy; a runaway reconnect loop cannot exhaust it
CONNECT_TIMEOUT_S = 2.0
_EOF = b""  # queued after the last chunk of a direction


@dataclass
class _Rule:
    cut: bool = False
    delay_s: float = 0.0


@dataclass(eq=False)
class _Connection:
    """One proxied connection: ``src`` dialled the node at ``dst``."""

    src: str
    dst: str
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


class FaultProxy:
    """Forwards ``routes`` (listen (host, port) -> upstream (host, port)) with faults."""

    def __init__(self, routes: dict[tuple[str, int], tuple[str, int]]) -> None:
        self.routes = dict(routes)
        self._rules: dict[tuple[str, str], _Rule] = {}
        self._changed = asyncio.Event()  # replaced on every rule change; waiters re-check
        self._servers: list[asyncio.Server] = []
        self._connections: set[_Connection] = set()
        self.stats = {"accepted": 0, "refused": 0, "resets": 0, "bytes": 0}

    async def start(self) -> None:
        for (host, port), upstream in self.routes.items():
            server = await asyncio.start_server(
                functools.partial(self._accept, upstream=upstream), host, port, limit=READ_CHUNK
            )
            self._servers.append(server)

    async def stop(self) -> None:
        for server in self._servers:
            server.close()
        for conn in list(self._connections):
            self._close(conn, abort=True)
        for server in self._servers:
            await server.wait_closed()

    # -- faults ------------------------------------------------------------------

    def cut(self, src: str, dst: str) -> None:
        """Stall every byte from node address ``src`` to node address ``dst``."""
        self._rule(src, dst).cut = True
        self._notify()

    def delay(self, src: str, dst: str, seconds: float) -> None:
        """Hold each chunk from ``src`` to ``dst`` for ``seconds`` before forwarding it."""
        if seconds < 0:
            raise ValueError("delay must be >= 0")
        self._rule(src, dst).delay_s = seconds
        self._notify()

    def reset(self, a: str, b: str) -> int:
        """Abort (RST) every connection between ``a`` and ``b``, both sides. Returns how many."""
        victims = [c for c in self._connections if {c.src, c.dst} == {a, b}]
        for conn in victims:
            self._close(conn, abort=True)
        self.stats["resets"] += len(victims)
        return len(victims)

    def heal(self, *, reset: bool = False) -> list[tuple[str, str]]:
        """Lift every rule. Stalled bytes flow on, or with ``reset`` their connections
        are reset instead. Returns the links that had a rule."""
        links = sorted(self._rules)
        self._rules.clear()
        if reset:
            for a, b in {tuple(sorted(link)) for link in links}:
                self.reset(a, b)
        self._notify()
        return links

    def rules(self) -> dict[tuple[str, str], tuple[bool, float]]:
        return {link: (rule.cut, rule.delay_s) for link, rule in sorted(self._rules.items())}

    @property
    def connections(self) -> int:
        return len(self._connections)

    def _rule(self, src: str, dst: str) -> _Rule:
        return self._rules.setdefault((src, dst), _Rule())

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    # -- forwarding ----------------------------------------------------------------

    async def _accept(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: tuple[str, int]
    ) -> None:
        peer = writer.get_extra_info("peername")
        if not peer or len(self._connections) >= MAX_CONNECTIONS:
            self.stats["refused"] += 1
            writer.close()
            return
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                up_reader, up_writer = await asyncio.open_connection(*upstream, limit=READ_CHUNK)
        except (OSError, TimeoutError):
            writer.close()  # the node is down: the dialler sees its connection closed
            return
        self.stats["accepted"] += 1
        conn = _Connection(peer[0], upstream[0], writer, up_writer)
        self._connections.add(conn)
        conn.tasks = [
            asyncio.create_task(self._pipe(conn, reader, up_writer, conn.src, conn.dst)),
            asyncio.create_task(self._pipe(conn, up_reader, writer, conn.dst, conn.src)),
        ]

    async def _pipe(
        self,
        conn: _Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        src: str,
        dst: str,
    ) -> None:
        """One direction: a reader task fills a bounded queue, this task drains it
        through the link's rules. EOF or an error ends the whole connection."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(QUEUE_CHUNKS)
        loop = asyncio.get_running_loop()

        async def read() -> None:
            try:
                while data := await reader.read(READ_CHUNK):
                    rule = self._rules.get((src, dst))
                    await queue.put((loop.time() + (rule.delay_s if rule else 0.0), data))
            except OSError:
                pass
            await queue.put((loop.time(), _EOF))

        reading = asyncio.create_task(read())
        try:
            while True:
                due, data = await queue.get()
                await self._wait_for_link(src, dst, due)
                if data == _EOF:
                    break
                writer.write(data)
                await writer.drain()
                self.stats["bytes"] += len(data)
        except OSError:
            pass
        finally:
            reading.cancel()
            self._close(conn, abort=False)

    async def _wait_for_link(self, src: str, dst: str, due: float) -> None:
        """Until the link src→dst is not cut and ``due`` has passed."""
        loop = asyncio.get_running_loop()
        while True:
            rule = self._rules.get((src, dst))
            if rule is not None and rule.cut:
                await self._changed.wait()  # bounded by the nemesis: it always heals
                continue
            if loop.time() >= due:
                return
            await asyncio.sleep(due - loop.time())

    def _close(self, conn: _Connection, *, abort: bool) -> None:
        if conn not in self._connections:
            return
        self._connections.discard(conn)
        current = asyncio.current_task()
        for task in conn.tasks:
            if task is not current:
                task.cancel()
        for writer in (conn.client, conn.upstream):
            if abort:
                _abort(writer)
            else:
                writer.close()


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST rather than a FIN, as a middlebox reset would."""
    reset_on_close(writer.transport)
    writer.transport.abort()


# -- the command -------------------------------------------------------------------

HELP = """commands (addresses are node IPs, as in the routes' upstreams):
  cut SRC DST          stall bytes SRC -> DST
  cut-both A B         stall bytes both ways between A and B
  delay SRC DST SECS   hold each chunk SRC -> DST for SECS
  reset A B            abort every connection between A and B (RST both sides)
  heal [reset]         lift every rule; stalled bytes flow on, or with 'reset' are reset
  status               rules, connections and counters
  quit"""


def apply_command(proxy: FaultProxy, line: str) -> str:
    """Run one text command against ``proxy``; returns the reply line."""
    words = line.split()
    if not words:
        return ""
    name, args = words[0], words[1:]
    try:
        if name == "cut" and len(args) == 2:
            proxy.cut(*args)
        elif name == "cut-both" and len(args) == 2:
            proxy.cut(args[0], args[1])
            proxy.cut(args[1], args[0])
        elif name == "delay" and len(args) == 3:
            proxy.delay(args[0], args[1], float(args[2]))
        elif name == "reset" and len(args) == 2:
            return f"ok reset {proxy.reset(*args)} connections"
        elif name == "heal" and args in ([], ["reset"]):
            return f"ok healed {len(proxy.heal(reset=bool(args)))} links"
        elif name == "status" and not args:
            return f"ok rules={proxy.rules()} connections={proxy.connections} {proxy.stats}"
        elif name == "help":
            return HELP
        else:
            return f"error: cannot understand {line.strip()!r}; try 'help'"
    except ValueError as exc:
        return f"error: {exc}"
    return "ok"


def _parse_routes(specs: Iterable[str]) -> dict[tuple[str, int], tuple[str, int]]:
    routes = {}
    for spec in specs:
        listen, sep, upstream = spec.partition("=")
        if not sep:
            raise ValueError(f"route {spec!r} is not LISTEN=UPSTREAM")
        routes[parse_address(listen)] = parse_address(upstream)
    return routes


async def _serve(routes: dict[tuple[str, int], tuple[str, int]]) -> None:
    proxy = FaultProxy(routes)
    await proxy.start()
    stdin = asyncio.StreamReader()
    loop = asyncio.get_running_loop()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    print(f"proxying {len(routes)} routes; type 'help'", flush=True)
    try:
        while True:  # ends with stdin (so the proxy dies with whoever drives it)
            line = (await stdin.readline()).decode(errors="replace")
            if not line or line.strip() == "quit":
                return
            reply = apply_command(proxy, line)
            if reply:
                print(reply, flush=True)
    finally:
        await proxy.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ringkv.chaos.proxy", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("routes", nargs="+", metavar="LISTEN=UPSTREAM",
                        help="e.g. 127.0.0.1:9500=127.0.0.1:7500")
    args = parser.parse_args(argv)
    try:
        routes = _parse_routes(args.routes)
    except ValueError as exc:
        parser.error(str(exc))
    asyncio.run(_serve(routes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
