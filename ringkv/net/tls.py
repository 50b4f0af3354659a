"""TLS for a node's links: SSL contexts from ``tls.*``, reloaded on SIGHUP, and a
TLS listener that logs every refused handshake with the peer's address.

One context per role, made once and kept: the HTTP site, the native listener
and the internode transport hold these very objects. Each is a ``Reloadable``
that hands every new connection to the context it was last loaded with, and
a reload builds fresh contexts from the files and puts them in place, so the
certificate, the key *and the trusted CAs* a new connection meets are exactly
what the files hold now, without a restart. (Loading new files into a live
context would not do: OpenSSL can add a CA to a context's trusted store but
never take one out, so a replaced CA would go on verifying until a restart.)
Connections already open keep the session and the peer they verified; a
reload does not check them again. A reload checks the files first (the
config's own checks, then the throwaway contexts it builds) and changes
nothing when one of them is bad. To replace a CA without refusing anyone
midway, list both CAs in ``ca_file`` while certificates are reissued, then
the new one alone.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from asyncio.sslproto import SSLProtocol
from collections.abc import Callable
from dataclasses import dataclass

from ringkv.config import TlsConfig, TlsFilesConfig, config_from_dict
from ringkv.errors import ConfigError

log = logging.getLogger(__name__)

MIN_VERSION = ssl.TLSVersion.TLSv1_2
# A client that connects and never finishes its handshake is dropped after this
# long: it holds no slot of the client door meanwhile (admission comes after it).
CLIENT_HANDSHAKE_TIMEOUT_S = 10.0


def server_context(files: TlsFilesConfig) -> ssl.SSLContext:
    """Accepts connections with ``cert_file``; with ``ca_file``, only from peers whose
    certificate chains to it."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MIN_VERSION
    _load(context, files)
    if files.ca_file is not None:
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def internode_client_context(files: TlsFilesConfig) -> ssl.SSLContext:
    """Dials peers: shows ``cert_file`` and requires theirs to chain to ``ca_file``.

    Host names are not checked: peers are dialled at gossiped addresses (behind
    NAT, a proxy, a namespace bridge) that need not be in their certificates;
    that the peer is the node it claims is checked by the handshake's node id,
    and only holders of a certificate from the cluster CA get that far.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = MIN_VERSION
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    _load(context, files)
    return context


def _load(context: ssl.SSLContext, files: TlsFilesConfig) -> None:
    assert files.cert_file is not None and files.key_file is not None
    context.load_cert_chain(files.cert_file, files.key_file)
    if files.ca_file is not None:
        context.load_verify_locations(cafile=files.ca_file)


class Reloadable(ssl.SSLContext):
    """An SSL context whose connections are made by the context it was last loaded
    with (``current``): asyncio's and uvloop's TLS protocols, and ``wrap_socket``,
    all start a connection through ``wrap_bio``/``wrap_socket``, so replacing
    ``current`` changes every new connection and none already open."""

    current: ssl.SSLContext

    def wrap_bio(self, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO,
                 server_side: bool = False, server_hostname: str | bytes | None = None,
                 session: ssl.SSLSession | None = None) -> ssl.SSLObject:
        return self.current.wrap_bio(incoming, outgoing, server_side=server_side,
                                     server_hostname=server_hostname, session=session)

    def wrap_socket(self, sock: socket.socket, server_side: bool = False,
                    do_handshake_on_connect: bool = True, suppress_ragged_eofs: bool = True,
                    server_hostname: str | bytes | None = None,
                    session: ssl.SSLSession | None = None) -> ssl.SSLSocket:
        return self.current.wrap_socket(
            sock, server_side=server_side, do_handshake_on_connect=do_handshake_on_connect,
            suppress_ragged_eofs=suppress_ragged_eofs, server_hostname=server_hostname,
            session=session)


def _reloadable(make: Callable[[TlsFilesConfig], ssl.SSLContext],
                files: TlsFilesConfig) -> Reloadable:
    first = make(files)
    holder = Reloadable(first.protocol)
    # The holder's own settings match what it hands out, for whoever reads them.
    holder.minimum_version = first.minimum_version
    holder.check_hostname = first.check_hostname
    holder.verify_mode = first.verify_mode
    holder.current = first
    return holder


@dataclass
class _Loaded:
    link: str  # "client" or "internode"
    files: TlsFilesConfig
    # Each holder and how a fresh context for it is made from the files.
    holders: list[tuple[Reloadable, Callable[[TlsFilesConfig], ssl.SSLContext]]]


class NodeTls:
    """A node's SSL contexts (None where a link is plain TCP), and their reload."""

    def __init__(self, tls: TlsConfig) -> None:
        self._loaded: list[_Loaded] = []
        self.client: ssl.SSLContext | None = None
        self.internode_server: ssl.SSLContext | None = None
        self.internode_client: ssl.SSLContext | None = None
        if tls.client.enabled:
            client = _reloadable(server_context, tls.client)
            self.client = client
            self._loaded.append(_Loaded("client", tls.client, [(client, server_context)]))
        if tls.internode.enabled:
            server = _reloadable(server_context, tls.internode)
            dialler = _reloadable(internode_client_context, tls.internode)
            self.internode_server, self.internode_client = server, dialler
            self._loaded.append(_Loaded("internode", tls.internode, [
                (server, server_context), (dialler, internode_client_context)]))

    def reload(self) -> list[str]:
        """Read every file again into fresh contexts for new connections; the errors
        (each naming its file).

        A link whose files fail a check keeps its old contexts; the other link
        still reloads.
        """
        errors = []
        for loaded in self._loaded:
            error = _check(loaded.link, loaded.files)
            fresh: list[ssl.SSLContext] = []
            if error is None:
                try:
                    fresh = [make(loaded.files) for _, make in loaded.holders]
                except (OSError, ssl.SSLError) as exc:  # changed since the check
                    error = _files_error(loaded.files, exc)
            if error is not None:
                log.error("TLS reload: kept the old %s certificates: %s", loaded.link, error)
                errors.append(error)
                continue
            for (holder, _), context in zip(loaded.holders, fresh):
                holder.current = context
            log.info("TLS reload: %s certificates reloaded from %s, trusting the CAs in %s "
                     "for new connections", loaded.link, loaded.files.cert_file,
                     loaded.files.ca_file)
        return errors


def _check(link: str, files: TlsFilesConfig) -> str | None:
    """Why the files of ``link`` cannot be loaded now, or None."""
    raw = {name: None if path is None else str(path) for name, path in vars(files).items()}
    try:
        config_from_dict({"tls": {link: raw}}, source="reload")
        _load(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), files)
    except ConfigError as exc:
        return str(exc)
    except (OSError, ssl.SSLError) as exc:
        return _files_error(files, exc)
    return None


def _files_error(files: TlsFilesConfig, exc: Exception) -> str:
    return f"{files.cert_file}, {files.key_file}, {files.ca_file}: {exc}"


# --------------------------------------------------------------------------- #
# Accepting TLS connections                                                    #
# --------------------------------------------------------------------------- #

ProtocolFactory = Callable[[], asyncio.Protocol]


async def listen_tls(
    factory: ProtocolFactory, host: str, port: int, context: ssl.SSLContext, *,
    handshake_timeout_s: float, what: str, reuse_address: bool | None = None,
) -> asyncio.Server:
    """A server whose connections are TLS, driving protocols from ``factory``.

    Unlike ``create_server(ssl=...)``, which drops a failed handshake silently
    (asyncio logs it only in debug mode), every refused handshake is logged at
    WARNING with the peer's address: a certificate from another CA, plain text
    or garbage on a TLS port, or a peer that never finishes (after
    ``handshake_timeout_s``). ``what`` names the listener in that line.
    """
    def accept() -> asyncio.Protocol:
        return _TlsAccept(factory, context, handshake_timeout_s, what)

    return await asyncio.get_running_loop().create_server(
        accept, host, port, reuse_address=reuse_address)


class _TlsAccept(asyncio.Protocol):
    """A freshly accepted TCP connection: hands its transport, at once, to asyncio's TLS
    protocol, which runs the handshake and then gives the decrypted stream to a
    protocol from ``factory``.

    At once, in connection_made, and not through ``loop.start_tls``: under uvloop a
    transport reads as soon as connection_made returns, whatever it was told, so a
    ClientHello could reach this protocol and be lost before start_tls took over.
    """

    def __init__(self, factory: ProtocolFactory, context: ssl.SSLContext, timeout_s: float,
                 what: str) -> None:
        self._factory = factory
        self._context = context
        self._timeout_s = timeout_s
        self._what = what

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        loop = asyncio.get_running_loop()
        peer = transport.get_extra_info("peername")
        waiter = loop.create_future()
        tls = SSLProtocol(loop, self._factory(), self._context, waiter, server_side=True,
                          ssl_handshake_timeout=self._timeout_s)  # type: ignore[arg-type]  # a float works
        transport.set_protocol(tls)
        tls.connection_made(transport)
        waiter.add_done_callback(lambda done: self._handshake_done(done, peer))

    def _handshake_done(self, waiter: asyncio.Future[None], peer: object) -> None:
        if waiter.cancelled():
            return
        exc = waiter.exception()
        if exc is not None:
            log.warning("%s: refused a TLS connection from %s: %s", self._what,
                        _show_peer(peer), _reason(exc))


def _show_peer(peer: object) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = peer[0], peer[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(peer)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"its certificate does not verify ({exc.verify_message})"
    if isinstance(exc, TimeoutError) or "taking longer than" in str(exc):
        return "no TLS handshake in time"
    if isinstance(exc, ConnectionResetError):
        return "it broke off the handshake (does it trust our certificate?)"
    return str(exc) or type(exc).__name__
