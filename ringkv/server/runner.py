"""Runs one node process: ordered start-up, and a clean shutdown on SIGTERM/SIGINT.

SIGHUP rereads the TLS certificates, keys and CAs (``tls.*``) into the
contexts every listener and dialler holds, so they rotate without a restart.

Start-up raises the open-files limit first, and sizes the client door to fit
in it, so that clients can never take the descriptors LevelDB needs.
Shutdown order matters for durability: stop accepting connections, let the
requests in flight finish (bounded by shutdown_drain_timeout_s), and only
then flush and close the storage engine.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import ssl
from collections.abc import Awaitable

from aiohttp import web

from ringkv.config import Config
from ringkv.door import Door, DoorLimits, file_plan
from ringkv.net.tls import CLIENT_HANDSHAKE_TIMEOUT_S, NodeTls, listen_tls
from ringkv.node import Node, listen_failed
from ringkv.server.api import build_app
from ringkv.server.guard import DoorCollector, raise_open_files_limit
from ringkv.server.http_protocol import ApiRunner
from ringkv.server.idempotency import IdempotencyCache
from ringkv.server.native import NativeServer

log = logging.getLogger(__name__)


def install_event_loop_policy() -> str:
    """Use uvloop when it is installed (the ``fast`` extra); report which loop runs."""
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


async def serve(config: Config, stop: asyncio.Event | None = None) -> None:
    """Start a node, serve until ``stop`` is set or a signal arrives, then shut down."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    door = open_door(config)
    tls = NodeTls(config.tls)
    loop.add_signal_handler(signal.SIGHUP, tls.reload)
    node = Node(config)
    node.tls = tls
    node.on_left = stop.set  # decommissioned: LEFT the ring, so the process ends
    node.native_address = config.cluster.native_address  # gossiped: clients find it
    try:
        # Gossip waits until every listener is bound (node.announce below): a node
        # that stops because a port is taken must leave no row in others' status.
        await node.open(announce=False)
    except BaseException:
        await node.stop()  # closes the storage it opened
        raise
    # What start-up built lives as long as the process: out of the collector's way, its
    # full collections need not walk it again and again (about a third of GC time).
    gc.collect()
    gc.freeze()
    node.metrics.registry.register(DoorCollector(door))
    cache = IdempotencyCache(node.clock)  # one for both front ends
    native = NativeServer(node, door, cache, node.clock, ssl_context=tls.client)
    runner = ApiRunner(
        build_app(node, cache),
        config.limits,
        door=door,
        access_log=None,
        handle_signals=False,
        shutdown_timeout=config.timing.shutdown_drain_timeout_s,
    )
    await runner.setup()
    site: web.BaseSite
    if tls.client is not None:
        site = TlsSite(runner, config.cluster.listen_host, config.cluster.client_port, tls.client)
    else:
        site = web.TCPSite(
            runner, config.cluster.listen_host, config.cluster.client_port, reuse_address=True
        )
    scheme = "https" if tls.client is not None else "http"
    try:
        # Serve before joining: while a new node waits for its seeds,
        # /v1/status says why and client requests get 503 not_joined.
        host = config.cluster.listen_host
        await _listen(node, site.start(), "cluster.client_port", "client API", host,
                      config.cluster.client_port)
        if config.cluster.native_port:
            await _listen(node, native.start(host, config.cluster.native_port),
                          "cluster.native_port", "native protocol", host,
                          config.cluster.native_port)
        await node.announce()
        if await _joined_or_stopped(node, stop):
            # A line tools and tests wait for: the node is ready for clients.
            print(
                f"ringkv node {node.node_id} listening on "
                f"{scheme}://{config.cluster.client_address}",
                flush=True,
            )
            await stop.wait()
        log.info("shutting down node %s", node.node_id)
    finally:
        # From now on, a request that still arrives on an open connection is told
        # shutting_down (the client goes to another replica) rather than started
        # and then cut off when the drain ends.
        node.draining = True
        native.stop_accepting()
        await runner.cleanup()  # stops accepting, then drains in-flight requests
        await native.close(config.timing.shutdown_drain_timeout_s)
        await node.stop()  # then flushes and closes storage


class TlsSite(web.BaseSite):
    """The HTTPS API: aiohttp's TCP site, but accepting through ``listen_tls`` so that a
    refused handshake (plain HTTP, a client certificate from another CA) is logged with
    the client's address, and a handshake that never ends is cut off."""

    __slots__ = ("_host", "_port")

    def __init__(self, runner: web.BaseRunner, host: str, port: int,
                 context: ssl.SSLContext) -> None:
        super().__init__(runner, ssl_context=context)
        self._host, self._port = host, port

    @property
    def name(self) -> str:
        return f"https://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None and self._ssl_context is not None
        self._server = await listen_tls(
            server, self._host, self._port, self._ssl_context,
            handshake_timeout_s=CLIENT_HANDSHAKE_TIMEOUT_S, what="client API",
            reuse_address=True)


async def _listen(node: Node, start: Awaitable[None], field: str, what: str, host: str,
                  port: int) -> None:
    """Bind one listener; a port that is taken (or an address this host does not
    have) stops the node with one line naming the port and the cause."""
    try:
        await start
    except OSError as exc:
        raise listen_failed(node.node_id, field, what, host, port, exc) from None


def open_door(config: Config) -> Door:
    """The client door every client listener of this process shares, its cap fitted
    to the open-files limit (raised first to the hard limit)."""
    plan = file_plan(raise_open_files_limit(), config.limits.max_client_connections,
                     leveldb=config.storage.engine == "leveldb")
    warning = plan.warning()
    if warning:
        log.warning("%s", warning)
    return Door(DoorLimits.from_config(config.limits, max_connections=plan.client_connections))


async def _joined_or_stopped(node: Node, stop: asyncio.Event) -> bool:
    """Run ``node.join()`` until it ends (True) or ``stop`` is set first (False)."""
    join = asyncio.ensure_future(node.join())
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait((join, stopped), return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        if not join.done():
            join.cancel()
            await asyncio.gather(join, return_exceptions=True)
    if join.cancelled():
        return False
    join.result()  # a failed join raises here
    return True
