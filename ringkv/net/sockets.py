"""How the transport opens and accepts connections: the ``Network`` interface, and real TCP.

``Transport`` never calls ``loop.create_connection`` or ``create_server``
itself: it asks a ``Network``. ``SocketNetwork`` is the real one (TCP through
the running loop); the simulator's (``ringkv.sim.network``) connects
protocols through in-memory byte streams instead, so the same framing,
handshake, back-pressure and error handling run under simulation.

Either way a connection is an asyncio protocol driven through an
asyncio-transport-like object (write, close, abort, pause/resume_reading,
get_extra_info, ...), which calls its connection_made, data_received,
connection_lost, pause_writing and resume_writing.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
import struct
from collections.abc import Callable
from typing import Protocol

ProtocolFactory = Callable[[], asyncio.Protocol]


class Listener(Protocol):
    def close(self) -> None: ...

    async def wait_closed(self) -> None: ...

    def address(self) -> tuple[str, int]:
        """The (host, port) it listens on (the real port when asked for port 0)."""
        ...


class Network(Protocol):
    async def listen(self, factory: ProtocolFactory, host: str, port: int) -> Listener:
        """Accept connections at (host, port), each driving a protocol from ``factory``."""
        ...

    async def connect(self, factory: ProtocolFactory, host: str, port: int) -> asyncio.Protocol:
        """Open a connection to (host, port); the connected protocol. Raises
        ``OSError`` (refused, reset, ...); may never return (the caller times it out)."""
        ...


class _Server:
    def __init__(self, server: asyncio.Server, host: str, port: int) -> None:
        self._server = server
        self._host, self._port = host, port

    def close(self) -> None:
        self._server.close()

    async def wait_closed(self) -> None:
        await self._server.wait_closed()

    def address(self) -> tuple[str, int]:
        if not self._server.sockets:
            return (self._host, self._port)
        host, port = self._server.sockets[0].getsockname()[:2]
        return (host, port)


class SocketNetwork:
    """Real TCP. Outbound connections leave from ``source_host`` when it is an address.

    With ``server_ssl`` and ``client_ssl`` (``ringkv.net.tls``: mutual TLS,
    ``tls.internode``) every connection is TLS: accepted ones must show a
    certificate the server context trusts (a refused handshake is logged with
    the peer's address), dialled ones must show one the client context trusts.
    Either way the handshake ends within ``handshake_timeout_s``.
    """

    def __init__(self, source_host: str, *, server_ssl: ssl.SSLContext | None = None,
                 client_ssl: ssl.SSLContext | None = None,
                 handshake_timeout_s: float = 2.0) -> None:
        self._source = source_address(source_host)
        self._server_ssl = server_ssl
        self._client_ssl = client_ssl
        self._handshake_timeout_s = handshake_timeout_s

    async def listen(self, factory: ProtocolFactory, host: str, port: int) -> Listener:
        if self._server_ssl is not None:
            from ringkv.net.tls import listen_tls

            server = await listen_tls(factory, host, port, self._server_ssl,
                                      handshake_timeout_s=self._handshake_timeout_s,
                                      what="internode")
        else:
            server = await asyncio.get_running_loop().create_server(factory, host, port)
        return _Server(server, host, port)

    async def connect(self, factory: ProtocolFactory, host: str, port: int) -> asyncio.Protocol:
        if self._client_ssl is not None:
            _, protocol = await asyncio.get_running_loop().create_connection(
                factory, host, port, local_addr=self._source, ssl=self._client_ssl,
                server_hostname=host, ssl_handshake_timeout=self._handshake_timeout_s)
            return protocol
        _, protocol = await asyncio.get_running_loop().create_connection(
            factory, host, port, local_addr=self._source
        )
        return protocol


def source_address(host: str) -> tuple[str, int] | None:
    """Where outbound connections leave from: the listen address, if it is one.

    Leaving from the address we listen on makes a connection's source name
    the node (Cassandra does the same), which per-node firewall rules and the
    fault proxy rely on. A wildcard or a host name leaves it to the OS.
    """
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    return None if address.is_unspecified else (host, 0)


# Connection liveness on real sockets. A link that drops packets leaves a
# plain TCP connection in retransmission backoff for minutes after the network
# heals (seen on namespace hosts: 45 s of failed writes after a 60 s cut,
# `ss` showing timer:(on,37sec,8)). TCP_USER_TIMEOUT closes a connection whose
# sent data stays unacknowledged this long, so it is redialled instead; TCP
# keepalive finds a dead peer on an idle connection (5 s idle, then 3 probes
# 2 s apart).
USER_TIMEOUT_MS = 10_000
KEEPALIVE_IDLE_S = 5
KEEPALIVE_INTERVAL_S = 2
KEEPALIVE_PROBES = 3


def tune_socket(transport: asyncio.BaseTransport) -> None:
    """No Nagle delay, and the liveness bounds above (where the OS has them)."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    options = [
        (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),
        (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
    ]
    for name, value in (("TCP_KEEPIDLE", KEEPALIVE_IDLE_S), ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL_S),
                        ("TCP_KEEPCNT", KEEPALIVE_PROBES), ("TCP_USER_TIMEOUT", USER_TIMEOUT_MS)):
        if hasattr(socket, name):  # Linux names; other systems keep their defaults
            options.append((socket.IPPROTO_TCP, getattr(socket, name), value))
    for level, option, value in options:
        try:
            sock.setsockopt(level, option, value)
        except OSError:
            pass


def reset_on_close(transport: asyncio.BaseTransport) -> None:
    """Make closing the socket send a reset, dropping what the kernel still holds to send.

    A plain close lets the kernel deliver its send queue first (megabytes, to a
    peer that may never read it); SO_LINGER with a zero timeout discards it.
    """
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
