"""The key routes' lean HTTP path (``server/lean_http.py``), over raw sockets.

GET, PUT and DELETE of a key are answered by the connection protocol itself,
the rest by aiohttp: the answers must stay in request order on a connection,
honour keep-alive, Connection: close and HTTP/1.0, keep the client door's
accounting, and be the same statuses and bodies aiohttp's path gives.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiohttp import web

from ringkv.clock import ManualClock
from ringkv.config import Config, config_from_dict
from ringkv.coordinator.results import Receipt
from ringkv.node import Node
from ringkv.server import handlers
from ringkv.server import http_protocol
from ringkv.server.api import build_app
from ringkv.server.handlers import receipt_json
from ringkv.server.http_protocol import ApiRunner

TIMEOUT_S = 10.0


def lean_config() -> Config:
    return config_from_dict({
        "storage": {"engine": "memory"},
        "limits": {"max_key_bytes": 64, "max_value_bytes": 1024, "max_request_bytes": 4096},
        "keyspaces": {"default": {"replication_factor": 1, "default_consistency": "ONE"}},
    })


class Served:
    """A node's HTTP API on loopback, and how many requests the lean path served."""

    def __init__(self, node: Node, runner: ApiRunner, port: int) -> None:
        self.node = node
        self.runner = runner
        self.port = port
        self.lean_served = 0

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.wait_for(asyncio.open_connection("127.0.0.1", self.port),
                                      TIMEOUT_S)


@asynccontextmanager
async def serving(monkeypatch: pytest.MonkeyPatch, *, lean: bool = True
                  ) -> AsyncIterator[Served]:
    node = Node(lean_config(), clock=ManualClock(), standalone=True)
    await node.start()
    runner = ApiRunner(build_app(node), node.config.limits, lean=lean, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server = site._server
    assert isinstance(server, asyncio.base_events.Server)
    served = Served(node, runner, server.sockets[0].getsockname()[1])
    serve = http_protocol.serve

    async def counted(*args: Any) -> Any:
        served.lean_served += 1
        return await serve(*args)

    monkeypatch.setattr(http_protocol, "serve", counted)
    try:
        yield served
    finally:
        await runner.cleanup()
        await node.stop()


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), timeout=60))


class Response:
    def __init__(self, status_line: str, headers: dict[str, str], body: bytes) -> None:
        self.status_line = status_line
        self.status = int(status_line.split(" ")[1])
        self.headers = headers  # names lower-cased
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)


async def read_response(reader: asyncio.StreamReader) -> Response:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT_S)
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])),
                                  TIMEOUT_S)
    return Response(lines[0], headers, body)


async def at_eof(reader: asyncio.StreamReader) -> bool:
    """The server closed the connection (and sent nothing more)."""
    return await asyncio.wait_for(reader.read(1), TIMEOUT_S) == b""


def put(path: str, value: Any, *, extra: str = "", version: str = "1.1") -> bytes:
    body = json.dumps({"value": value}).encode()
    return (f"PUT {path} HTTP/{version}\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{extra}\r\n").encode() + body


def put_body(path: str, body: dict[str, Any]) -> bytes:
    """A PUT whose whole JSON body is ``body``."""
    raw = json.dumps(body).encode()
    return (f"PUT {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(raw)}\r\n\r\n").encode() + raw


def get(path: str, *, extra: str = "", version: str = "1.1") -> bytes:
    return f"GET {path} HTTP/{version}\r\nHost: x\r\n{extra}\r\n".encode()


def delete(path: str) -> bytes:
    return f"DELETE {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()


async def warmed(served: Served) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection past its first request (aiohttp's task, which serves a connection's
    first request, now waits: the lean path takes the key requests from here on)."""
    reader, writer = await served.connect()
    writer.write(get("/v1/health"))
    assert (await read_response(reader)).status == 200
    return reader, writer


def test_pipelined_key_and_other_requests_on_one_socket_are_answered_in_order(
        monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario() -> None:
        async with serving(monkeypatch) as served:
            reader, writer = await warmed(served)
            writer.write(b"".join([
                put("/v1/kv/default/a", 1),
                get("/v1/kv/default/a"),
                get("/v1/status"),  # aiohttp's, behind a lean answer
                put("/v1/kv/default/b", 2),  # lean again, behind aiohttp's
                get("/v1/kv/default?limit=10"),  # a scan: aiohttp's
                get("/v1/kv/default/b"),
                delete("/v1/kv/default/a"),
                get("/v1/kv/default/a"),
                get("/v1/kv/default/missing"),
            ]))
            answers = [await read_response(reader) for _ in range(9)]
            assert [a.status for a in answers] == [200, 200, 200, 200, 200, 200, 200, 404, 404]
            assert answers[1].json()["value"] == 1
            assert answers[2].json()["node_id"] == served.node.node_id
            assert [item["key"] for item in answers[4].json()["items"]] == ["a", "b"]
            assert answers[5].json()["value"] == 2
            assert answers[7].json()["error"]["code"] == "not_found"
            assert served.lean_served >= 2  # some went the lean way (and the rest in order)
            # The connection stays usable, and lean, afterwards.
            before = served.lean_served
            writer.write(get("/v1/kv/default/b"))
            assert (await read_response(reader)).json()["value"] == 2
            assert served.lean_served == before + 1
            writer.close()

    run(scenario)


def test_many_pipelined_key_requests_past_the_parser_queue_are_all_answered_in_order(
        monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario() -> None:
        async with serving(monkeypatch) as served:
            reader, writer = await warmed(served)
            count = 200  # far past aiohttp's 32 queued messages: reading pauses, resumes
            writer.write(b"".join(put(f"/v1/kv/default/k{i}", i) for i in range(count)))
            writer.write(b"".join(get(f"/v1/kv/default/k{i}") for i in range(count)))
            for _ in range(count):
                assert (await read_response(reader)).status == 200
            values = [(await read_response(reader)).json()["value"] for _ in range(count)]
            assert values == list(range(count))
            assert served.lean_served >= count
            writer.close()

    run(scenario)


def test_keep_alive_and_connection_close(monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario() -> None:
        async with serving(monkeypatch) as served:
            reader, writer = await warmed(served)
            writer.write(put("/v1/kv/default/k", "v"))
            kept = await read_response(reader)
            assert kept.status_line == "HTTP/1.1 200 OK" and "connection" not in kept.headers
            assert kept.headers["content-type"] == "application/json"
            assert "date" in kept.headers
            before = served.lean_served
            writer.write(get("/v1/kv/default/k", extra="Connection: close\r\n"))
            closing = await read_response(reader)
            assert closing.json()["value"] == "v"
            assert closing.headers["connection"] == "close"
            assert served.lean_served == before + 1
            assert await at_eof(reader)
            writer.close()

    run(scenario)


def test_http_1_0_closes_unless_asked_to_keep_alive(monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario() -> None:
        async with serving(monkeypatch) as served:
            reader, writer = await warmed(served)
            writer.write(put("/v1/kv/default/k", 7))
            assert (await read_response(reader)).status == 200
            writer.write(get("/v1/kv/default/k", version="1.0",
                             extra="Connection: keep-alive\r\n"))
            kept = await read_response(reader)
            assert kept.status_line == "HTTP/1.0 200 OK"
            assert kept.headers["connection"] == "keep-alive" and kept.json()["value"] == 7
            writer.write(get("/v1/kv/default/k", version="1.0"))
            last = await read_response(reader)
            assert last.status_line == "HTTP/1.0 200 OK" and "connection" not in last.headers
            assert last.json()["value"] == 7
            assert await at_eof(reader)
            assert served.lean_served >= 3
            writer.close()

    run(scenario)


def test_a_client_leaving_mid_request_counts_as_client_closed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario() -> None:
        async with serving(monkeypatch) as served:
            node = served.node
            door = served.runner.door
            gate = asyncio.Event()
            arrived = asyncio.Event()
            finished = asyncio.Event()
            real_put = node.put

            async def slow_put(*args: Any, **kwargs: Any) -> Any:
                arrived.set()
                await gate.wait()
                try:
                    return await real_put(*args, **kwargs)
                finally:
                    finished.set()

            monkeypatch.setattr(node, "put", slow_put)
            reader, writer = await warmed(served)
            writer.write(put("/v1/kv/default/k", 1) + get("/v1/status"))
            await asyncio.wait_for(arrived.wait(), TIMEOUT_S)
            assert served.lean_served == 1
            writer.close()
            await asyncio.wait_for(writer.wait_closed(), TIMEOUT_S)

            async def counted() -> None:
                while door.closed.get("client_closed", 0) < 1:
                    await asyncio.sleep(0.01)

            await asyncio.wait_for(counted(), TIMEOUT_S)
            gate.set()  # the write finishes with nobody to answer; nothing breaks
            await asyncio.wait_for(finished.wait(), TIMEOUT_S)
            assert door.open_count == 0
            # The node serves on.
            reader, writer = await warmed(served)
            writer.write(get("/v1/kv/default/k"))
            assert (await read_response(reader)).json()["value"] == 1
            writer.close()

    run(scenario)


def test_a_declared_oversized_body_is_refused_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario() -> None:
        async with serving(monkeypatch) as served:
            reader, writer = await warmed(served)
            writer.write(put("/v1/kv/default/k", 1))
            assert (await read_response(reader)).status == 200
            # The head only: the answer comes before any of the body is sent.
            writer.write(b"PUT /v1/kv/default/k HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Length: 100000\r\n\r\n")
            refused = await read_response(reader)
            assert refused.status == 413 and refused.json()["error"]["code"] == "too_large"
            assert refused.json()["error"]["limit"] == 4096
            assert await at_eof(reader)
            assert served.runner.door.closed.get("too_large") == 1
            writer.close()

    run(scenario)


def test_an_idempotent_repeat_is_answered_with_the_replay_header(
        monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario() -> None:
        async with serving(monkeypatch) as served:
            reader, writer = await warmed(served)
            request = put("/v1/kv/default/k", 1, extra="Idempotency-Key: abc-1\r\n")
            writer.write(request)
            first = await read_response(reader)
            writer.write(request)
            again = await read_response(reader)
            assert first.status == again.status == 200
            assert "idempotent-replayed" not in first.headers
            assert again.headers["idempotent-replayed"] == "true"
            assert again.body == first.body
            assert served.lean_served == 2
            writer.close()

    run(scenario)


# Each request of the comparison, and what it shows.
SAME_AS_AIOHTTP = [
    put("/v1/kv/default/k", {"a": [1, 2.5, None]}),  # put
    get("/v1/kv/default/k"),  # get
    get("/v1/kv/default/k?consistency=one"),
    get("/v1/kv/default/nope"),  # not found
    delete("/v1/kv/default/k"),  # delete
    get("/v1/kv/default/k"),  # deleted
    get("/v1/kv/default/k?consistency=BOGUS"),  # bad consistency
    get("/v1/kv/default/" + "x" * 65),  # bad key: over max_key_bytes
    get("/v1/kv/default/%FF"),  # bad key: not UTF-8
    get("/v1/kv/nosuch/k"),  # no such keyspace
    b"PUT /v1/kv/default/j HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nnot j",  # bad JSON
    b"PUT /v1/kv/default/j HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n[]",  # not an object
    b"PUT /v1/kv/default/c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"c\r\n{\"value\": 3}\r\n0\r\n\r\n",  # a chunked body
    b"PUT /v1/kv/default/big HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"1001\r\n" + b" " * 4097 + b"\r\n0\r\n\r\n",  # a chunked body over max_request_bytes
    put("/v1/kv/default/ttl", 1, extra="X-Long: " + "y" * 9000 + "\r\n"),  # header too large
    get("/v1/kv/default/c"),
    # Strictness (issue #16 §6): the same 400s, naming the same field, on both paths.
    get("/v1/kv/default/c?consistency=ONE&consistency=FOO"),  # a repeated parameter
    get("/v1/kv/default/c?consistency=ONE&consistency=ONE"),  # repeated, even if equal
    put("/v1/kv/default/", 1),  # an empty key
    get("/v1/kv/default/"),
    delete("/v1/kv/default/"),
    put_body("/v1/kv/default/t", {"value": 1, "ttl": "10"}),  # ttl: a string
    put_body("/v1/kv/default/t", {"value": 1, "ttl": 1.5}),  # ttl: a float
    put_body("/v1/kv/default/t", {"value": 1, "ttl": True}),  # ttl: a boolean
    put("/v1/kv/default/t?ttl=1_0", 1),  # ttl in the query: not digits
    put_body("/v1/kv/default/t", {"value": 1, "colour": "red"}),  # an unknown field
    put_body("/v1/kv/default/t", {"value": 1, "ttl": 5}),
    get("/v1/kv/default/t"),  # with expires_at_us and ttl_remaining_ms
]


async def answers_to(served: Served, requests: list[bytes]) -> list[tuple[int, str, bytes]]:
    reader, writer = await warmed(served)
    answers = []
    for request in requests:  # one at a time: each is answered before the next is sent
        writer.write(request)
        answer = await read_response(reader)
        answers.append((answer.status, answer.headers["content-type"], answer.body))
    writer.close()
    return answers


def test_the_answers_are_the_same_as_aiohttp_gives(monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario() -> None:
        async with serving(monkeypatch, lean=False) as plain:
            expected = await answers_to(plain, SAME_AS_AIOHTTP)
            assert plain.lean_served == 0
        async with serving(monkeypatch, lean=True) as lean:
            answers = await answers_to(lean, SAME_AS_AIOHTTP)
            assert lean.lean_served == len(SAME_AS_AIOHTTP)
        for request, want, got in zip(SAME_AS_AIOHTTP, expected, answers):
            assert got == want, request[:60]
        statuses = [status for status, _, _ in answers]
        assert statuses == [200, 200, 200, 404, 200, 404, 400, 413, 400, 404, 400, 400, 200,
                            413, 431, 200] + [400] * 10 + [200, 200]
        fields = [json.loads(body)["error"]["field"] for _, _, body in answers[16:26]]
        assert fields == ["consistency", "consistency", "key", "key", "key",
                          "ttl", "ttl", "ttl", "ttl", "colour"]
        assert json.loads(answers[-1][2])["ttl_remaining_ms"] == 5000  # the clock stood still

    run(scenario)


def test_receipts_written_once_are_each_their_own_and_the_cache_stays_bounded() -> None:
    encoder = json.JSONEncoder(separators=(",", ":"))
    # Receipts alike but for one field each, and names that only differ by where
    # a list ends: no two may share a cached text.
    receipts = [
        Receipt("ONE", ["a", "b"], asked=["a"], answered=["a"]),
        Receipt("ONE", ["a", "b"], asked=["a"], answered=[]),
        Receipt("ONE", ["a"], asked=["b", "a"], answered=["a"]),
        Receipt("ONE", ["a", "b"], asked=["a"], answered=["a"], hints_stored=1),
        Receipt("ONE", ["a", "b"], asked=["a"], answered=["a"], read_repair=True),
        Receipt("ONE", ["a", "b"], asked=["a"], answered=["a"], repaired=["b"]),
        Receipt("ONE", ["a", "b"], asked=["a"], answered=["a"], speculative=["b"]),
        Receipt("QUORUM", ["a", "b"], asked=["a"], answered=["a"]),
    ]
    for _ in range(2):  # written, then from the cache
        for receipt in receipts:
            assert receipt_json(receipt) == encoder.encode(receipt.to_json())
    for index in range(handlers._RECEIPTS_MAX + 10):
        receipt = Receipt("ONE", [f"n{index}"], asked=[f"n{index}"], answered=[])
        assert receipt_json(receipt) == encoder.encode(receipt.to_json())
        assert len(handlers._RECEIPTS) <= handlers._RECEIPTS_MAX


def held_gets(node: Any, monkeypatch: pytest.MonkeyPatch) -> tuple[asyncio.Event, asyncio.Event]:
    """Make the node's reads wait: ``arrived`` is set as one starts, and it goes on
    once ``gate`` is set."""
    gate, arrived = asyncio.Event(), asyncio.Event()
    real_get = node.get

    async def slow_get(*args: Any, **kwargs: Any) -> Any:
        arrived.set()
        await gate.wait()
        return await real_get(*args, **kwargs)

    monkeypatch.setattr(node, "get", slow_get)
    return gate, arrived


def test_a_request_held_behind_a_lean_one_with_its_body_arriving_late_is_answered(
        monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario() -> None:
        async with serving(monkeypatch) as served:
            node = served.node
            real_get = node.get
            gate, arrived = held_gets(node, monkeypatch)
            reader, writer = await warmed(served)
            whole = put("/v1/kv/default/late", "v")
            head, body = whole[:-5], whole[-5:]
            writer.write(get("/v1/kv/default/nope") + head)  # a lean get, then a put's head
            await writer.drain()
            await asyncio.wait_for(arrived.wait(), TIMEOUT_S)
            writer.write(body)  # the held put's body completes while the get still runs
            await writer.drain()
            gate.set()
            assert (await read_response(reader)).status == 404
            assert (await read_response(reader)).status == 200
            monkeypatch.setattr(node, "get", real_get)
            writer.write(get("/v1/kv/default/late"))
            assert (await read_response(reader)).json()["value"] == "v"
            writer.close()

    run(scenario)


def test_stopping_the_server_lets_a_lean_request_in_flight_answer_first(
        monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario() -> None:
        async with serving(monkeypatch) as served:
            node = served.node
            gate, arrived = held_gets(node, monkeypatch)
            reader, writer = await warmed(served)
            writer.write(get("/v1/kv/default/k"))
            await asyncio.wait_for(arrived.wait(), TIMEOUT_S)
            assert served.lean_served == 1
            stopping = asyncio.ensure_future(served.runner.cleanup())

            async def refused() -> None:  # the listener has stopped: the shutdown is under way
                while True:
                    try:
                        _, probe = await served.connect()
                    except OSError:
                        return
                    probe.close()

            await asyncio.wait_for(refused(), TIMEOUT_S)
            assert not stopping.done()  # waiting for the request in flight
            gate.set()
            answer = await read_response(reader)
            assert answer.status == 404 and answer.json()["error"]["code"] == "not_found"
            await asyncio.wait_for(stopping, TIMEOUT_S)
            writer.close()

    run(scenario)
