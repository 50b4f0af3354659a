"""TLS on loopback sockets in one process: the TLS listener (refusals logged with the
peer's address, garbage and silence never stall it), the internode transport over
mutual TLS, and reloading the contexts. Fast: these run in `make test`."""

from __future__ import annotations

import asyncio
import datetime
import logging
import socket
import ssl
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from ringkv.config import TlsConfig, TlsFilesConfig
from ringkv.errors import PeerUnreachable
from ringkv.net.codec import KIND_ONEWAY, PROTOCOL_VERSION, encode_frame
from ringkv.net.sockets import SocketNetwork
from ringkv.net.tls import NodeTls, listen_tls, server_context
from ringkv.net.transport import Transport
from ringkv.tools.certs import init_ca, issue

pytestmark = pytest.mark.timeout(60)

NOW = datetime.datetime.now(datetime.timezone.utc)
HOST = "127.0.0.1"


def run(coro: Any, timeout_s: float = 20.0) -> Any:
    async def bounded() -> Any:
        async with asyncio.timeout(timeout_s):
            return await coro

    return asyncio.run(bounded())


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    init_ca(tmp_path, NOW)
    for name in ("a", "b"):
        issue(tmp_path, name, NOW, hosts=(HOST,))
    issue(tmp_path, "client", NOW, client_only=True)
    other = tmp_path / "other"
    init_ca(other, NOW)
    issue(other, "rogue", NOW, hosts=(HOST,))
    return tmp_path


def files(d: Path, name: str, ca: Path | None) -> TlsFilesConfig:
    return TlsFilesConfig(d / f"{name}.crt", d / f"{name}.key", ca)


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[attr-defined]


def refusals(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "refused a TLS connection from 127.0.0.1:" in r.message]


def test_listener_refuses_garbage_plain_text_and_silence_and_serves_on(
        pki: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="ringkv.net.tls")

    async def body() -> None:
        server = await listen_tls(Echo, HOST, 0, server_context(files(pki, "a", None)),
                                  handshake_timeout_s=0.5, what="test")
        port = server.sockets[0].getsockname()[1]
        loop = asyncio.get_running_loop()
        try:
            for junk in (b"\x00garbage\xff" * 100, b"GET / HTTP/1.1\r\n\r\n",
                         encode_frame(KIND_ONEWAY, 0, "hello", {"cluster": "c", "node_id": "x",
                                                                 "protocol": PROTOCOL_VERSION})):
                reader, writer = await asyncio.open_connection(HOST, port)
                writer.write(junk)
                answer = await reader.read()  # to the end: the listener closes it
                assert answer == b"" or answer[:1] == b"\x15"  # nothing, or a TLS alert
                writer.close()
            # Silent: cut off at the handshake timeout, not held open.
            reader, writer = await asyncio.open_connection(HOST, port)
            started = loop.time()
            assert await reader.read() == b""
            assert loop.time() - started < 5
            writer.close()
            # And a real TLS client is served, its first bytes (sent with the end of the
            # handshake) not lost.
            context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
            for _ in range(5):
                reader, writer = await asyncio.open_connection(HOST, port, ssl=context)
                writer.write(b"ping")
                assert await reader.readexactly(4) == b"ping"
                writer.close()
        finally:
            server.close()

    run(body())
    logged = refusals(caplog)
    assert len(logged) == 4 and all(r.levelno == logging.WARNING for r in logged)
    assert any("no TLS handshake in time" in r.message for r in logged)


def test_internode_mutual_tls_and_a_peer_from_another_ca(
        pki: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    ca = pki / "ca.crt"

    def transport(node_id: str, tls: TlsFilesConfig) -> Transport:
        contexts = NodeTls(TlsConfig(internode=tls))
        network = SocketNetwork(HOST, server_ssl=contexts.internode_server,
                                client_ssl=contexts.internode_client)

        async def handler(frm: str, verb: str, payload: Any) -> Any:
            return {"from": frm, "payload": payload}

        return Transport(node_id, "c", HOST, 0, handler, network=network)

    async def body() -> None:
        a = transport("a", files(pki, "a", ca))
        b = transport("b", files(pki, "b", ca))
        # Trusts our CA, but its certificate comes from another one.
        rogue = transport("rogue", files(pki / "other", "rogue", ca))
        for t in (a, b, rogue):
            await t.start()
        try:
            b.set_peer_address("a", *a.address)
            assert await b.request("a", "echo", 1, 5.0) == {"from": "b", "payload": 1}
            rogue.set_peer_address("a", *a.address)
            with pytest.raises(PeerUnreachable):
                await rogue.request("a", "echo", 2, 5.0)
            a.set_peer_address("rogue", *rogue.address)
            with pytest.raises(PeerUnreachable):  # nor does a accept the rogue as a server
                await a.request("rogue", "echo", 3, 5.0)
        finally:
            for t in (a, b, rogue):
                await t.stop()

    run(body())
    logged = refusals(caplog)
    assert logged and "its certificate does not verify" in logged[0].message


def test_reload_picks_up_new_files_and_keeps_the_old_on_a_bad_one(
        pki: Path, caplog: pytest.LogCaptureFixture) -> None:
    tls = NodeTls(TlsConfig(client=files(pki, "a", None)))
    assert tls.client is not None

    async def serial() -> int:
        server = await listen_tls(Echo, HOST, 0, tls.client, handshake_timeout_s=2, what="t")
        port = server.sockets[0].getsockname()[1]
        context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        try:
            _, writer = await asyncio.open_connection(HOST, port, ssl=context)
            der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
            writer.close()
        finally:
            server.close()
        return x509.load_der_x509_certificate(der).serial_number

    before = run(serial())
    _, _, new = issue(pki, "a", NOW, hosts=(HOST,))
    assert new != before and run(serial()) == before  # nothing changes until a reload
    assert tls.reload() == []
    assert run(serial()) == new
    (pki / "a.key").write_text("garbage")
    errors = tls.reload()
    assert len(errors) == 1 and "tls.client.key_file" in errors[0] and "a.key" in errors[0]
    assert any(r.levelno == logging.ERROR and "kept the old client" in r.message
               for r in caplog.records)
    assert run(serial()) == new


def test_reload_replaces_the_trusted_ca_for_new_connections(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A CA swapped in the files and reloaded is the only one new connections trust: a
    certificate signed only by the old CA is refused on both links, as server and as
    dialler, one signed by the new CA is accepted, and a connection opened before the
    reload goes on (it was verified when it was made)."""
    caplog.set_level(logging.WARNING, logger="ringkv.net.tls")
    old, new, live = tmp_path / "old", tmp_path / "new", tmp_path / "live"
    for ca in (old, new):
        init_ca(ca, NOW)
        for name in ("a", "peer"):
            issue(ca, name, NOW, hosts=(HOST,))
        issue(ca, "client", NOW, client_only=True)
    live.mkdir()

    def install(ca: Path) -> None:
        """Node a's files, from ``ca``: its certificate, its key and the CA it trusts."""
        for name in ("a.crt", "a.key", "ca.crt"):
            (live / name).write_bytes((ca / name).read_bytes())

    install(old)
    both = tmp_path / "both.crt"  # the peers trust either CA: only a's trust is in question
    both.write_bytes((old / "ca.crt").read_bytes() + (new / "ca.crt").read_bytes())
    a_files = files(live, "a", live / "ca.crt")
    tls = NodeTls(TlsConfig(client=a_files, internode=a_files))
    assert tls.client is not None

    def transport(node_id: str, tls_files: TlsFilesConfig, contexts: NodeTls | None = None
                  ) -> Transport:
        contexts = contexts or NodeTls(TlsConfig(internode=tls_files))
        network = SocketNetwork(HOST, server_ssl=contexts.internode_server,
                                client_ssl=contexts.internode_client)

        async def handler(frm: str, verb: str, payload: Any) -> Any:
            return {"from": frm, "payload": payload}

        return Transport(node_id, "c", HOST, 0, handler, network=network)

    async def client_echo(port: int, ca: Path) -> bool:
        """Whether a client with ``ca``'s client certificate is served on ``port``."""
        try:
            reader, writer = await asyncio.open_connection(HOST, port, ssl=_client(ca, both))
            writer.write(b"ping")
            served = await reader.read(4) == b"ping"  # b"": closed after the handshake
            writer.close()
            return served
        except (ssl.SSLError, ConnectionError):
            return False

    async def body() -> None:
        server = await listen_tls(Echo, HOST, 0, tls.client, handshake_timeout_s=2, what="t")
        port = server.sockets[0].getsockname()[1]
        a = transport("a", a_files, tls)
        before = transport("before", files(old, "peer", both))
        started = [a, before]
        for t in started:
            await t.start()
        try:
            assert await client_echo(port, old) and not await client_echo(port, new)
            before.set_peer_address("a", *a.address)
            assert await before.request("a", "echo", 1, 5.0) == {"from": "before", "payload": 1}
            open_client = await asyncio.open_connection(HOST, port, ssl=_client(old, both))

            install(new)
            assert tls.reload() == []

            # The client link: the old CA's client certificate is refused, the new one's served.
            assert await client_echo(port, new) and not await client_echo(port, old)
            # Connections made before the reload go on as they were.
            reader, writer = open_client
            writer.write(b"pong")
            assert await reader.readexactly(4) == b"pong"
            writer.close()
            assert await before.request("a", "echo", 2, 5.0) == {"from": "before", "payload": 2}
            # Internode, new connections: a refuses a peer from the old CA, both when the
            # peer dials it and when it dials the peer, and takes one from the new CA.
            stale = transport("stale", files(old, "peer", both))
            fresh = transport("fresh", files(new, "peer", both))
            for t in (stale, fresh):
                await t.start()
                started.append(t)
            stale.set_peer_address("a", *a.address)
            with pytest.raises(PeerUnreachable):
                await stale.request("a", "echo", 3, 5.0)
            a.set_peer_address("stale", *stale.address)
            with pytest.raises(PeerUnreachable):
                await a.request("stale", "echo", 4, 5.0)
            fresh.set_peer_address("a", *a.address)
            assert await fresh.request("a", "echo", 5, 5.0) == {"from": "fresh", "payload": 5}
            a.set_peer_address("fresh", *fresh.address)
            assert await a.request("fresh", "echo", 6, 5.0) == {"from": "a", "payload": 6}
        finally:
            for t in started:
                await t.stop()
            server.close()

    run(body(), timeout_s=40)
    assert any("its certificate does not verify" in r.message for r in refusals(caplog))


def _client(ca: Path, trusted: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(trusted))
    context.load_cert_chain(ca / "client.crt", ca / "client.key")
    return context
