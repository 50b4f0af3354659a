"""The fault proxy (ringkv/chaos/proxy.py) on loopback: forwarding, cuts that stall
without losing a byte, bounded buffering, delays, resets, and its command."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from typing import Any

import pytest

from ringkv.chaos.proxy import FaultProxy, apply_command
from tests.procs import REPO, free_port

pytestmark = pytest.mark.timeout(60)

A, B = "127.0.0.2", "127.0.0.3"  # A dials B through B's proxy


def run(coro: Any, timeout_s: float = 20.0) -> Any:
    async def bounded() -> Any:
        async with asyncio.timeout(timeout_s):
            return await coro

    return asyncio.run(bounded())


class Setup:
    """B's node (an echo-less server that keeps what it reads), B's proxy, and a dialler at A."""

    async def __aenter__(self) -> Setup:
        self.accepted: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = (
            asyncio.Queue()
        )
        self.server = await asyncio.start_server(
            lambda r, w: self.accepted.put_nowait((r, w)), B, 0
        )
        upstream = self.server.sockets[0].getsockname()[:2]
        self.proxy = FaultProxy({(B, 0): upstream})
        await self.proxy.start()
        self.proxy_port = self.proxy._servers[0].sockets[0].getsockname()[1]
        return self

    async def dial(self) -> tuple[Any, Any, Any, Any]:
        """(A's reader, A's writer, B's reader, B's writer) of one proxied connection."""
        before = self.proxy.connections
        reader, writer = await asyncio.open_connection(B, self.proxy_port, local_addr=(A, 0))
        node_reader, node_writer = await self.accepted.get()
        for _ in range(500):  # the proxy registers it once its upstream connect returns
            if self.proxy.connections > before:
                return reader, writer, node_reader, node_writer
            await asyncio.sleep(0.01)
        raise AssertionError("the proxy never registered the connection")

    async def __aexit__(self, *exc: object) -> None:
        await self.proxy.stop()
        self.server.close()


async def reset_by_peer(reader: asyncio.StreamReader) -> bool:
    try:
        return await reader.read(1) == b""
    except ConnectionResetError:
        return True


async def nothing_arrives(reader: asyncio.StreamReader, wait_s: float = 0.3) -> bool:
    try:
        await asyncio.wait_for(reader.read(1), wait_s)
    except TimeoutError:
        return True
    return False


def test_forwards_both_ways_and_names_the_link_by_source_ip() -> None:
    async def body() -> None:
        async with Setup() as s:
            reader, writer, node_reader, node_writer = await s.dial()
            writer.write(b"ping")
            assert await node_reader.readexactly(4) == b"ping"
            node_writer.write(b"pong")
            assert await reader.readexactly(4) == b"pong"
            [conn] = s.proxy._connections
            assert (conn.src, conn.dst) == (A, B)

    run(body())


def test_a_one_way_cut_stalls_that_direction_and_heal_forwards_every_byte() -> None:
    async def body() -> None:
        async with Setup() as s:
            reader, writer, node_reader, node_writer = await s.dial()
            s.proxy.cut(A, B)
            writer.write(b"request-1")
            node_writer.write(b"answers flow")  # B -> A is not cut
            assert await reader.readexactly(12) == b"answers flow"
            assert await nothing_arrives(node_reader)
            writer.write(b"|request-2")
            assert s.proxy.heal() == [(A, B)]
            assert await node_reader.readexactly(19) == b"request-1|request-2"

    run(body())


def test_a_cut_applies_to_answers_on_the_other_nodes_connections() -> None:
    """Bytes B -> A travel as answers on A's connection to B: cut(B, A) stalls them."""

    async def body() -> None:
        async with Setup() as s:
            reader, writer, node_reader, node_writer = await s.dial()
            s.proxy.cut(B, A)
            writer.write(b"q")
            assert await node_reader.readexactly(1) == b"q"
            node_writer.write(b"answer")
            assert await nothing_arrives(reader)
            s.proxy.heal()
            assert await reader.readexactly(6) == b"answer"

    run(body())


def test_a_cut_buffers_a_bounded_amount_then_pushes_back_on_the_sender() -> None:
    async def body() -> None:
        async with Setup() as s:
            reader, writer, node_reader, node_writer = await s.dial()
            s.proxy.cut(A, B)
            chunk = bytes(range(256)) * 256  # 64 KiB
            sent = 0
            for _ in range(1000):  # at most 64 MiB; the proxy holds 1 MiB, the kernel some
                writer.write(chunk)
                try:
                    await asyncio.wait_for(writer.drain(), 0.5)
                except TimeoutError:
                    break
                sent += 1
            assert sent < 1000, "the sender was never pushed back"
            s.proxy.heal()
            received = await node_reader.readexactly((sent + 1) * len(chunk))
            assert received == chunk * (sent + 1)

    run(body())


def test_delay_holds_chunks_in_order() -> None:
    async def body() -> None:
        async with Setup() as s:
            reader, writer, node_reader, node_writer = await s.dial()
            s.proxy.delay(A, B, 30.0)
            writer.write(b"late")
            assert await nothing_arrives(node_reader)
            s.proxy.delay(A, B, 0.05)
            for i in range(20):
                writer.write(b"%02d" % i)
                await writer.drain()
            s.proxy.heal(reset=True)  # the 30 s chunk never arrives: its connection is reset
            assert await reset_by_peer(node_reader)

            reader, writer, node_reader, node_writer = await s.dial()
            s.proxy.delay(A, B, 0.05)
            for i in range(20):
                writer.write(b"%02d" % i)
                await writer.drain()
            expected = b"".join(b"%02d" % i for i in range(20))
            assert await node_reader.readexactly(40) == expected

    run(body())


def test_reset_aborts_both_sides() -> None:
    async def body() -> None:
        async with Setup() as s:
            reader, writer, node_reader, node_writer = await s.dial()
            assert s.proxy.reset(B, A) == 1
            assert s.proxy.connections == 0
            with pytest.raises(ConnectionResetError):
                await reader.read(1)
            with pytest.raises(ConnectionResetError):
                await node_reader.read(1)

    run(body())


def test_a_dead_upstream_closes_the_diallers_connection() -> None:
    async def body() -> None:
        async with Setup() as s:
            s.server.close()
            await s.server.wait_closed()
            reader, writer = await asyncio.open_connection(B, s.proxy_port, local_addr=(A, 0))
            assert await reader.read() == b""

    run(body())


def test_commands() -> None:
    async def body() -> None:
        proxy = FaultProxy({})
        assert apply_command(proxy, "cut-both 127.0.0.1 127.0.0.2") == "ok"
        assert apply_command(proxy, "delay 127.0.0.1 127.0.0.3 0.25") == "ok"
        assert proxy.rules() == {
            ("127.0.0.1", "127.0.0.2"): (True, 0.0),
            ("127.0.0.1", "127.0.0.3"): (False, 0.25),
            ("127.0.0.2", "127.0.0.1"): (True, 0.0),
        }
        assert apply_command(proxy, "heal") == "ok healed 3 links"
        assert apply_command(proxy, "delay a b -1") == "error: delay must be >= 0"
        assert apply_command(proxy, "cut a").startswith("error: cannot understand")

    run(body())


def test_the_command_proxies_and_takes_commands_on_stdin() -> None:
    import socket

    proxy_port = free_port(B)
    upstream = socket.create_server((B, 0))
    proc = subprocess.Popen(
        [sys.executable, "-m", "ringkv.chaos.proxy",
         f"{B}:{proxy_port}={B}:{upstream.getsockname()[1]}"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO,
    )
    try:
        assert "proxying 1 routes" in proc.stdout.readline()
        proc.stdin.write("cut 127.0.0.2 127.0.0.3\nstatus\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == "ok\n"
        assert "('127.0.0.2', '127.0.0.3'): (True, 0.0)" in proc.stdout.readline()
        with socket.create_connection((B, proxy_port), timeout=5) as client:
            upstream.settimeout(5)
            node, _ = upstream.accept()
            node.sendall(b"hi")
            assert client.recv(2) == b"hi"  # B -> A is not cut
            node.close()
        proc.stdin.close()  # stdin closed: the proxy exits
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        upstream.close()
