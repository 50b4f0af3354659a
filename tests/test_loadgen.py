"""The benchmark load generator's lean HTTP/1.1 connection (bench/loadgen.py).

It reads only the status line and Content-Length, so these tests pin down
that it keeps a connection alive across requests, reads each body whole
(the next response must not start mid-body), follows ``Connection: close``,
and reports a failed exchange as status 0 instead of raising.
"""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from bench.loadgen import _Connection, _Target
from ringkv.tools.launcher import free_port


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=30))


async def serve(app: web.Application) -> TestServer:
    server = TestServer(app, host="127.0.0.1", port=free_port())
    await server.start_server()
    return server


def test_keep_alive_requests_read_each_body_whole() -> None:
    peers: set[object] = set()

    async def put(request: web.Request) -> web.Response:
        peers.add(request.transport.get_extra_info("peername"))
        body = await request.read()
        return web.json_response({"echo": body.decode(), "pad": "x" * 5000})

    async def missing(request: web.Request) -> web.Response:
        return web.json_response({"error": "nope"}, status=404)

    async def body() -> None:
        app = web.Application()
        app.router.add_put("/v1/kv/{key}", put)
        app.router.add_get("/v1/kv/{key}", missing)
        server = await serve(app)
        conn = _Connection(_Target.parse(f"http://127.0.0.1:{server.port}"))
        try:
            payload = b'{"value": 1}'
            head = (f"PUT /v1/kv/a HTTP/1.1\r\nHost: x\r\nContent-Length: {len(payload)}\r\n\r\n"
                    .encode())
            statuses = [await conn.request(head + payload) for _ in range(20)]
            statuses.append(await conn.request(b"GET /v1/kv/a HTTP/1.1\r\nHost: x\r\n\r\n"))
        finally:
            conn.close()
            await server.close()
        assert statuses == [200] * 20 + [404]
        assert len(peers) == 1  # one connection carried every request

    run(body())


def test_connection_close_and_a_dead_server() -> None:
    async def closing(request: web.Request) -> web.Response:
        return web.Response(text="bye", headers={"Connection": "close"})

    async def body() -> None:
        app = web.Application()
        app.router.add_get("/", closing)
        server = await serve(app)
        target = _Target.parse(f"http://127.0.0.1:{server.port}")
        conn = _Connection(target)
        request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
        try:
            assert await conn.request(request) == 200
            assert await conn.request(request) == 200  # reconnects after the close
        finally:
            conn.close()
            await server.close()
        assert await _Connection(target).request(request) == 0  # nobody listens now

    run(body())


def test_targets_must_be_http_urls() -> None:
    assert _Target.parse("http://127.0.0.1:7400/base/") == _Target("127.0.0.1", 7400, "/base")
    assert _Target.parse("https://127.0.0.1:7400") == _Target("127.0.0.1", 7400, "")  # --tls
    for bad in ("ftp://127.0.0.1:7400", "127.0.0.1:7400"):
        with pytest.raises(ValueError, match="http://"):
            _Target.parse(bad)
