"""The HTTP JSON API of one node, served in-process on the memory engine."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer, make_mocked_request
from yarl import URL

from ringkv.clock import ManualClock
from ringkv.hlc import Timestamp
from ringkv.config import Config, LimitsConfig, config_from_dict
from ringkv.node import Node
from ringkv.coordinator.results import Receipt, WriteResult
from ringkv.server.api import build_app, request_handler
from ringkv.server.handlers import _cell_json, receipt_json, write_answer
from ringkv.versioning import Cell
from ringkv.server.http_protocol import PARSER_FIELD_BYTES, ApiRunner, parser_limits
from ringkv.server.validation import MAX_HEADER_BYTES

Scenario = Callable[[TestClient, Node, ManualClock], Awaitable[None]]


def api_config(**limits: Any) -> Config:
    return config_from_dict(
        {
            "storage": {"engine": "memory"},
            "limits": {"max_key_bytes": 64, "max_value_bytes": 1024, "max_request_bytes": 4096,
                       "max_batch_ops": 10, "max_scan_page": 50, **limits},
            "keyspaces": {
                "default": {"replication_factor": 3, "default_consistency": "QUORUM"},
                "solo": {"replication_factor": 1, "default_consistency": "ONE"},
            },
        }
    )


class ApiTestServer(TestServer):
    """aiohttp's test server, serving through the runner ``ringkv node`` uses (the key
    routes without the router, the door, the parser's errors in JSON)."""

    def __init__(self, app: web.Application, limits: LimitsConfig) -> None:
        super().__init__(app)
        self._limits = limits

    async def _make_runner(self, **kwargs: Any) -> web.BaseRunner:
        return ApiRunner(self.app, self._limits, **kwargs)


def serve(scenario: Scenario, **limits: int) -> None:
    config = api_config(**limits)

    async def main() -> None:
        clock = ManualClock()
        node = Node(config, clock=clock, standalone=True)
        await node.start()
        client = TestClient(ApiTestServer(build_app(node), config.limits))
        await client.start_server()
        try:
            await scenario(client, node, clock)
        finally:
            await client.close()
            await node.stop()

    asyncio.run(asyncio.wait_for(main(), timeout=60))


async def call(client: TestClient, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
    response = await client.request(method, path, **kwargs)
    return response.status, await response.json()


def test_put_get_delete_round_trip() -> None:
    async def scenario(client: TestClient, node: Node, clock: ManualClock) -> None:
        status, body = await call(client, "PUT", "/v1/kv/default/hello", json={"value": "world"})
        assert status == 200 and body["ok"] is True
        assert body["receipt"]["answered"] == [node.node_id]
        status, body = await call(client, "GET", "/v1/kv/default/hello")
        assert status == 200
        assert body["value"] == "world" and body["key"] == "hello"
        assert body["receipt"]["consistency"] == "QUORUM"
        status, body = await call(client, "PUT", "/v1/kv/default/hello",
                                  json={"value": {"nested": [1, 2.5, None, True]}})
        status, body = await call(client, "GET", "/v1/kv/default/hello?consistency=one")
        assert body["value"] == {"nested": [1, 2.5, None, True]}
        status, body = await call(client, "DELETE", "/v1/kv/default/hello")
        assert status == 200
        status, body = await call(client, "GET", "/v1/kv/default/hello")
        assert status == 404 and body["error"]["code"] == "not_found"

    serve(scenario)


def test_keys_may_hold_slashes_and_unicode() -> None:
    async def scenario(client: TestClient, node: Node, clock: ManualClock) -> None:
        for key in ("a/b/c", "ключ", "sp%20ace"):
            status, _ = await call(client, "PUT", f"/v1/kv/default/{key}", json={"value": key})
            assert status == 200
            status, body = await call(client, "GET", f"/v1/kv/default/{key}")
            assert status == 200 and body["value"] == key
        status, body = await call(client, "GET", "/v1/kv/default/sp ace")
        assert status == 200 and body["key"] == "sp ace"

    serve(scenario)


def test_ttl_expires_and_reads_as_absent() -> None:
    async def scenario(client: TestClient, node: Node, clock: ManualClock) -> None:
        await call(client, "PUT", "/v1/kv/default/t", json={"value": 1, "ttl": 5})
        status, body = await call(client, "GET", "/v1/kv/default/t")
        assert status == 200 and "expires_at_us" in body
        clock.advance(6)
        status, _ = await call(client, "GET", "/v1/kv/default/t")
        assert status == 404

    serve(scenario)


def test_ttl_counts_from_the_local_clock_when_the_hlc_runs_ahead() -> None:
    """A peer with a fast clock pushes this node's HLC ahead (the HLC receive
    rule); a TTL must still last its seconds on this node's own clock."""

    async def scenario(client: TestClient, node: Node, clock: ManualClock) -> None:
        node.hlc.observe(Timestamp(clock.wall_us() + 3600 * 1_000_000))  # an hour ahead
        await call(client, "PUT", "/v1/kv/default/t", json={"value": 1, "ttl": 5})
        status, body = await call(client, "GET", "/v1/kv/default/t")
        assert status == 200 and body["expires_at_us"] == clock.wall_us() + 5_000_000
        assert body["timestamp"][0] > clock.wall_us()  # ordered by the HLC all the same
        clock.advance(6)
        status, _ = await call(client, "GET", "/v1/kv/default/t")
        assert status == 404

    serve(scenario)


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "code", "field"),
    [
        ("PUT", "/v1/kv/default/k", {"data": b"{not json"}, 400, "bad_request", "body"),
        ("PUT", "/v1/kv/default/k", {"json": [1, 2]}, 400, "bad_request", "body"),
        ("PUT", "/v1/kv/default/k", {"json": {"valu": 1}}, 400, "bad_request", "value"),
        ("PUT", "/v1/kv/default/k", {"data": b'{"value": NaN}'}, 400, "bad_request", "body"),
        ("PUT", "/v1/kv/default/k", {"json": {"value": 1, "ttl": -1}}, 400, "bad_request", "ttl"),
        ("PUT", "/v1/kv/default/k", {"json": {"value": 1, "ttl": "soon"}}, 400, "bad_request", "ttl"),
        ("PUT", "/v1/kv/default/k?consistency=MOST", {"json": {"value": 1}}, 400, "bad_request",
         "consistency"),
        ("GET", "/v1/kv/default/k?consistency=ANY", {}, 400, "bad_request", "consistency"),
        ("GET", "/v1/kv/default/%FF%FE", {}, 400, "bad_request", "key"),
        ("GET", "/v1/kv/default/" + "k" * 65, {}, 413, "too_large", "key"),
        ("PUT", "/v1/kv/default/k", {"json": {"value": "x" * 2000}}, 413, "too_large", "value"),
        ("PUT", "/v1/kv/default/k", {"data": b'{"value":"' + b"x" * 5000 + b'"}'}, 413,
         "too_large", "body"),
        ("PUT", "/v1/kv/default/k", {"data": b"[" * 1500 + b"]" * 1500}, 400, "bad_request",
         "body"),
        ("GET", "/v1/kv/default?limit=0", {}, 400, "bad_request", "limit"),
        ("GET", "/v1/kv/default?page_token=garbage!", {}, 400, "bad_request", "page_token"),
        ("POST", "/v1/batch", {"json": {"ops": "nope"}}, 400, "bad_request", "ops"),
        ("POST", "/v1/batch", {"json": {"ops": [{"op": "put", "key": "k"}]}}, 400, "bad_request",
         "ops[0].value"),
        ("POST", "/v1/batch", {"json": {"ops": [{"op": "get", "key": "k"}] * 11}}, 413,
         "too_large", "ops"),
    ],
)
def test_bad_input_names_the_field(method, path, kwargs, status, code, field) -> None:
    async def scenario(client: TestClient, node: Node, clock: ManualClock) -> None:
        got_status, body = await call(client, method, path, **kwargs)
        assert (got_status, body["error"]["code"], body["error"].get("field")) == (
            status, code, field,
        ), body

    serve(scenario)


def test_unknown_routes_keyspaces_and_methods_are_json_errors() -> None:
    async def scenario(client: TestClient, node: Node, clock: ManualClock) -> None:
        status, body = await call(client, "GET", "/v1/kv/nope/k")
        assert status == 404 and body["error"]["keyspace"] == "nope"
        status, body = await call(client, "GET", "/nowhere")
        assert status == 404 and body["error"]["code"] == "not_found"
        status, body = await call(client, "PATCH", "/v1/kv/default/k")
        assert status == 405 and body["error"]["code"] == "method_not_allowed"

    serve(scenario)


@pytest.mark.parametrize(
    "method,path,headers,routed",
    [
        ("PUT", "/v1/kv/default/k", {}, False),
        ("GET", "/v1/kv/default/a/b?consistency=ONE", {}, False),
        ("DELETE", "/v1/kv/solo/k", {}, False),
        ("GET", "/v1/kv/nope/k", {}, False),  # an unknown keyspace's 404 is the same either way
        ("GET", "/v1/kv/de%20fault/k", {}, True),  # escapes in the keyspace: the router decodes
        ("GET", "/v1/kv/default/a%0Ab", {}, True),  # a newline the router's pattern refuses
        ("GET", "/v1/kv/default/", {}, False),  # no key: served here too, a 400 naming key
        ("PUT", "/v1/kv/default/k", {"Expect": "100-continue"}, True),
        ("POST", "/v1/kv/default/k", {}, True),
        ("HEAD", "/v1/kv/default/k", {}, True),
        ("GET", "/v1/kv/default", {}, True),
        ("GET", "/v1/status", {}, True),
    ],
)
def test_only_plain_key_requests_skip_the_router(method, path, headers, routed) -> None:
    async def scenario(client: TestClient, node: Node, clock: ManualClock) -> None:
        app = build_app(node)
        seen: list[str] = []

        async def router(request: web.BaseRequest) -> web.StreamResponse:
            seen.append(request.path)
            return web.Response(status=299)

        handle = request_handler(app, router)
        response = await handle(make_mocked_request(method, path, headers=headers, app=app))
        assert (bool(seen), response.status == 299) == (routed, routed), (seen, response.status)

    serve(scenario)


def test_requests_the_router_keeps_are_served_as_before() -> None:
    """What the key routes' fast path hands to the router still gets the router's answer."""

    async def scenario(client: TestClient, node: Node, clock: ManualClock) -> None:
        # Sent as it stands (a client's URL would decode the escape before sending).
        escaped = URL(f"http://{client.host}:{client.port}/v1/kv/de%66ault/k?consistency=ONE",
                      encoded=True)
        async with client.session.put(escaped, json={"value": 7}) as response:
            assert response.status == 200, await response.text()
        status, body = await call(client, "GET", "/v1/kv/default/k?consistency=ONE")
        assert (status, body["value"]) == (200, 7)
        status, body = await call(client, "PUT", "/v1/kv/default/k?consistency=ONE",
                                  json={"value": 8}, headers={"Expect": "100-continue"})
        assert status == 200, body
        status, body = await call(client, "GET", "/v1/kv/default/a%0Ab")
        assert (status, body["error"]["code"]) == (404, "not_found")
        # The keyspace is checked before the key, on either path.
        status, body = await call(client, "GET", "/v1/kv/nope/%FF")
        assert (status, body["error"].get("keyspace")) == (404, "nope"), body

    serve(scenario)


def test_a_chunked_body_over_the_limit_gets_413_on_the_key_routes() -> None:
    """No Content-Length for the door to refuse early: the body read itself stops it, and
    the error names the limit (the fast path has no router match to find the app by)."""

    async def scenario(client: TestClient, node: Node, clock: ManualClock) -> None:
        async def chunks() -> Any:
            for _ in range(10):
                yield b"x" * 1000

        status, body = await call(client, "PUT", "/v1/kv/default/k", data=chunks())
        assert (status, body["error"]["code"], body["error"]["limit"]) == (413, "too_large",
                                                                           4096), body

    serve(scenario)


def test_answers_written_by_hand_match_the_json_encoder() -> None:
    encoder = json.JSONEncoder(separators=(",", ":"))
    receipts = [
        Receipt("ONE", ["n1"], asked=["n1"], answered=["n1"]),
        Receipt("QUORUM", ["a", "b", "c"], asked=["a", "b"], answered=["b"], hints_stored=2,
                read_repair=True, repaired=["a"], speculative=["c"]),
        Receipt("ALL", ["n\u00e9\"\\x"], asked=[], answered=[]),
    ]
    for receipt in receipts:
        assert receipt_json(receipt) == encoder.encode(receipt.to_json())
        cell = Cell(b'{"v":1}', Timestamp(1_700_000_000_000_000, 3))
        assert json.loads(write_answer(WriteResult(cell, receipt)).body) == {
            "ok": True, "timestamp": [1_700_000_000_000_000, 3], "receipt": receipt.to_json()}
        assert write_answer(WriteResult(cell, receipt)).body == encoder.encode(
            {"ok": True, "timestamp": [1_700_000_000_000_000, 3],
             "receipt": receipt.to_json()}).encode()
        for expires in (None, 1_800_000_000_000_000):
            for with_receipt in (receipt, None):
                key = "k\u00e9y/\"q\""
                now_us = 1_799_999_998_500_001  # 1.499999 s before it expires: 1500 ms
                got = _cell_json(key.encode(), cell._replace(expires_at_us=expires), with_receipt,
                                 now_us)
                head: dict[str, Any] = {"key": key, "timestamp": [1_700_000_000_000_000, 3]}
                if expires is not None:
                    head["expires_at_us"] = expires
                    head["ttl_remaining_ms"] = 1500
                if with_receipt is not None:
                    head["receipt"] = with_receipt.to_json()
                assert got == encoder.encode(head).encode()[:-1] + b',"value":{"v":1}}'


def test_unavailable_when_the_level_exceeds_the_replicas() -> None:
    """A one-node ring has one replica: ALL works, THREE cannot (503, required/alive)."""

    async def scenario(client: TestClient, node: Node, clock: ManualClock) -> None:
        status, _ = await call(client, "PUT", "/v1/kv/default/k?consistency=ALL", json={"value": 1})
        assert status == 200
        status, body = await call(client, "PUT", "/v1/kv/default/k?consistency=THREE",
                                  json={"value": 1})
        assert status == 503
        assert body["error"] | {} == body["error"]
        assert (body["error"]["code"], body["error"]["required"], body["error"]["alive"]) == (
            "unavailable", 3, 1,
        )

    serve(scenario)


def test_batch_runs_each_op_and_reports_each_result() -> None:
    async def scenario(client: TestClient, node: Node, clock: ManualClock) -> None:
        ops = [
            {"op": "put", "key": "a", "value": 1},
            {"op": "put", "keyspace": "solo", "key": "b", "value": [2], "ttl": 60},
            {"op": "get", "key": "missing"},
        ]
        status, body = await call(client, "POST", "/v1/batch", json={"ops": ops})
        assert status == 200
        assert [r["ok"] for r in body["results"]] == [True, True, True]
        assert body["results"][2]["found"] is False
        ops = [{"op": "get", "key": "a"}, {"op": "delete", "key": "a"},
               {"op": "get", "keyspace": "solo", "key": "b"}]
        status, body = await call(client, "POST", "/v1/batch?consistency=ONE", json={"ops": ops})
        assert body["results"][0]["value"] == 1
        assert body["results"][2]["value"] == [2]
        status, _ = await call(client, "GET", "/v1/kv/default/a")
        assert status == 404

    serve(scenario)


async def scan_all(client: TestClient, keyspace: str, limit: int) -> tuple[dict[str, Any], int]:
    """Every item of a paged scan, checking that no key comes twice; and the page count."""
    seen: dict[str, Any] = {}
    token = None
    for pages in range(1, 201):  # bounded
        query = f"?limit={limit}" + (f"&page_token={token}" if token else "")
        status, body = await call(client, "GET", f"/v1/kv/{keyspace}{query}")
        assert status == 200, body
        for item in body["items"]:
            assert item["key"] not in seen
            seen[item["key"]] = item["value"]
        token = body["next_page_token"]
        if token is None:
            return seen, pages
    raise AssertionError("the scan never ended")


def test_scan_pages_through_a_keyspace_in_token_order() -> None:
    async def scenario(client: TestClient, node: Node, clock: ManualClock) -> None:
        expected = {f"key-{i}": i for i in range(37)}
        for key, value in expected.items():
            await call(client, "PUT", f"/v1/kv/default/{key}", json={"value": value})
        await call(client, "DELETE", "/v1/kv/default/key-3")
        del expected["key-3"]
        await call(client, "PUT", "/v1/kv/solo/elsewhere", json={"value": 0})
        seen, _ = await scan_all(client, "default", limit=5)
        assert seen == expected

    serve(scenario)


@pytest.mark.parametrize("bound", ["items", "bytes"])
def test_a_scan_stopped_by_a_replica_bound_skips_nothing(
    bound: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replica caps each scan reply (in items, and in bytes so that a reply of
    large values still fits one internode frame); a capped reply is marked, and
    the coordinator ends the page there instead of taking the range as done."""
    import ringkv.replica.local

    if bound == "items":
        monkeypatch.setattr(ringkv.replica.local, "MAX_SCAN_ITEMS", 4)
    else:
        monkeypatch.setattr(ringkv.replica.local, "MAX_SCAN_REPLY_BYTES", 400)

    async def scenario(client: TestClient, node: Node, clock: ManualClock) -> None:
        expected = {f"key-{i}": "v" * 50 for i in range(40)}
        for key, value in expected.items():
            await call(client, "PUT", f"/v1/kv/solo/{key}", json={"value": value})
        seen, pages = await scan_all(client, "solo", limit=20)
        assert seen == expected
        assert pages > 2  # 20 per page would have needed two

    serve(scenario)


def test_status_ring_and_metrics() -> None:
    async def scenario(client: TestClient, node: Node, clock: ManualClock) -> None:
        await call(client, "PUT", "/v1/kv/default/m", json={"value": 1})
        status, body = await call(client, "GET", "/v1/status")
        assert status == 200 and body["nodes"][0]["node_id"] == node.node_id
        assert body["nodes"][0]["owns"] == pytest.approx(1.0)
        status, body = await call(client, "GET", "/v1/ring")
        assert len(body["nodes"][0]["tokens"]) == node.config.cluster.num_tokens
        response = await client.get("/metrics")
        text = await response.text()
        assert 'ringkv_requests_total{consistency="default",op="put",status="200"} 1.0' in text
        assert "ringkv_request_latency_seconds_bucket" in text
        assert "ringkv_storage_bytes" in text

    serve(scenario)


# -- what the HTTP parser refuses (served as ``ringkv node`` serves it) -----------

LoopbackScenario = Callable[[int, Node], Awaitable[None]]


def serve_on_loopback(scenario: LoopbackScenario, **limits: Any) -> None:
    """A real listening server on 127.0.0.1, built by the runner ``ringkv node`` uses."""
    config = api_config(**limits)

    async def main() -> None:
        node = Node(config, clock=ManualClock(), standalone=True)
        await node.start()
        runner = ApiRunner(build_app(node), config.limits, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        try:
            await scenario(runner.addresses[0][1], node)
        finally:
            await runner.cleanup()
            await node.stop()

    asyncio.run(asyncio.wait_for(main(), timeout=20))


async def raw_request(port: int, request: bytes) -> tuple[int, dict[str, str], Any]:
    """Send ``request`` as bytes, unchecked, and read the answer up to the server's close
    (a request the server parsed must say ``Connection: close``).

    The server may answer before it has read the whole request and then close
    the connection, so sending runs beside reading and may fail.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def send() -> None:
        with contextlib.suppress(ConnectionError):
            writer.write(request)
            await writer.drain()

    sending = asyncio.ensure_future(send())
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in filter(None, header_lines):
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        body = await reader.readexactly(int(headers["content-length"]))
        with contextlib.suppress(ConnectionError):  # a reset closes it too
            assert await reader.read() == b"", "the server kept the connection open"
    finally:
        sending.cancel()
        writer.close()
    return int(status_line.split()[1]), headers, json.loads(body)


async def still_serves(port: int) -> None:
    status, _, body = await raw_request(
        port, b"GET /v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status == 200 and body["ok"] is True


LINE_LIMIT_BYTES = parser_limits(api_config().limits)["max_line_size"]


@pytest.mark.parametrize("method", ["GET", "PUT"])
def test_a_key_too_long_for_the_request_line_gets_a_json_414(method: str) -> None:
    """RFC 9110 §15.5.15: 414 URI Too Long, in ringkv's error shape; the message
    names the key path and the key limit, and the connection is closed."""

    async def scenario(port: int, node: Node) -> None:
        key = "k" * 70_000
        body = b'{"value": 1}' if method == "PUT" else b""
        request = (f"{method} /v1/kv/default/{key} HTTP/1.1\r\nHost: x\r\n"
                   f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                   ).encode() + body
        status, headers, answer = await raw_request(port, request)
        error = answer["error"]
        assert (status, error["code"], error["field"], error["limit"]) == (
            414, "too_large", "request_line", LINE_LIMIT_BYTES), answer
        assert "/v1/kv/default/kkk" in error["message"]
        assert "a key may be at most 64 bytes" in error["message"]
        assert headers["content-type"].startswith("application/json")
        assert headers["connection"].lower() == "close"
        await still_serves(port)

    serve_on_loopback(scenario)


def test_a_key_over_its_limit_but_within_the_line_limit_is_named_by_validation() -> None:
    """The parser's line limit leaves room above the key limit, so the API names
    the key and its size (413) rather than the parser refusing the line."""

    async def scenario(port: int, node: Node) -> None:
        key = "%C3%A9" * 1000  # 2,000 bytes of key, 6,000 of request line
        status, _, answer = await raw_request(
            port, f"GET /v1/kv/default/{key} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            .encode())
        error = answer["error"]
        assert (status, error["code"], error["field"], error["limit"], error["size"]) == (
            413, "too_large", "key", 64, 2000), answer

    serve_on_loopback(scenario)


def test_a_request_line_of_a_mebibyte_gets_a_json_414_and_the_node_serves_on() -> None:
    async def scenario(port: int, node: Node) -> None:
        path = "/v1/status?" + "x" * (1 << 20)
        status, _, answer = await raw_request(
            port, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        error = answer["error"]
        assert (status, error["code"], error["field"], error["limit"]) == (
            414, "too_large", "request_line", LINE_LIMIT_BYTES), answer
        assert "/v1/status?xxx" in error["message"] and "key" not in error["message"]
        await still_serves(port)

    serve_on_loopback(scenario)


def test_an_overlong_header_gets_a_json_431_naming_it() -> None:
    """RFC 6585 §5: 431 Request Header Fields Too Large, naming the header."""

    async def scenario(port: int, node: Node) -> None:
        value = "v" * 20_000
        status, headers, answer = await raw_request(
            port, f"GET /v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                  f"X-Big: {value}\r\n\r\n".encode())
        error = answer["error"]
        assert (status, error["code"], error["field"], error["header"], error["limit"],
                error["size"]) == (431, "too_large", "header", "X-Big", MAX_HEADER_BYTES,
                                   len("X-Big") + 20_000), answer
        await still_serves(port)

    serve_on_loopback(scenario)


def test_a_header_over_the_parsers_limit_gets_a_json_431_and_the_connection_closes() -> None:
    async def scenario(port: int, node: Node) -> None:
        value = "v" * (PARSER_FIELD_BYTES + 1)
        status, headers, answer = await raw_request(
            port, f"GET /v1/health HTTP/1.1\r\nHost: x\r\nX-Huge: {value}\r\n\r\n".encode())
        error = answer["error"]
        assert (status, error["code"], error["field"], error["limit"]) == (
            431, "too_large", "header", PARSER_FIELD_BYTES), answer
        assert headers["connection"].lower() == "close"
        await still_serves(port)

    serve_on_loopback(scenario)


def test_a_malformed_request_gets_a_json_400() -> None:
    async def scenario(port: int, node: Node) -> None:
        status, _, answer = await raw_request(port, b"GET /v1/health HTTP/1.1\r\nno colon\r\n\r\n")
        assert (status, answer["error"]["code"], answer["error"]["field"]) == (
            400, "bad_request", "request"), answer
        await still_serves(port)

    serve_on_loopback(scenario)


@pytest.mark.parametrize("request_bytes,reason", [
    (b"GET /v1/kv/default/\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n", "Invalid char in url path"),
    (b"FROB /v1/health HTTP/1.1\r\nHost: x\r\n\r\n", "Invalid method"),
    (b"GET /v1/health HTTP/1.1\r\nHost: x\r\nX-Ctl: a\x01\x7fb\r\n\r\n",
     "Invalid header value char"),
])
def test_a_request_the_parser_refuses_gets_json_without_its_input_echoed_or_a_traceback(
    request_bytes: bytes, reason: str, caplog: pytest.LogCaptureFixture,
) -> None:
    """A raw \\xff in the path, an unknown method, a control character in a header:
    ringkv's 400, naming what is wrong, quoting none of the client's bytes."""

    async def scenario(port: int, node: Node) -> None:
        status, headers, answer = await raw_request(port, request_bytes)
        error = answer["error"]
        assert (status, error["code"], error["field"]) == (400, "bad_request", "request"), answer
        assert reason in error["message"]
        for quoted in ("b'", "\\x", "FROB", "^"):
            assert quoted not in error["message"], error["message"]
        assert headers["content-type"].startswith("application/json")
        await still_serves(port)

    with caplog.at_level("DEBUG"):
        serve_on_loopback(scenario)
    assert [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL") or r.exc_info] == []


def test_at_the_cap_a_new_connection_gets_a_json_503_when_none_can_make_room() -> None:
    """Connections in the middle of an upload are never closed to make room: the new
    one is answered 503 overloaded and closed; once one finishes, others get in."""

    async def scenario(port: int, node: Node) -> None:
        uploads = []
        for _ in range(2):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"PUT /v1/kv/solo/k HTTP/1.1\r\nHost: x\r\nContent-Type: "
                         b"application/json\r\nContent-Length: 12\r\n\r\n{\"val")
            await writer.drain()
            uploads.append((reader, writer))
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        answer = await asyncio.wait_for(reader.read(), timeout=5)  # to the node's close
        writer.close()
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503 "), answer
        error = json.loads(body)["error"]
        assert (error["code"], error["limit"]) == ("overloaded", 2), error
        first_reader, first_writer = uploads[0]
        first_writer.write(b'ue": 1}')
        assert (await asyncio.wait_for(first_reader.readuntil(b"\r\n\r\n"), 5)).startswith(
            b"HTTP/1.1 200 ")
        for _, upload in uploads:
            upload.close()
        await still_serves(port)  # the first upload's connection waits now: it makes room

    serve_on_loopback(scenario, max_client_connections=2)
