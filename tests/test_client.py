"""The Python client (ringkv.client) and the server's idempotency-key de-duplication.

The first part runs against one in-process standalone node (memory engine)
served on a real loopback port from a background thread, so that both the
blocking and the asyncio client speak real HTTP to it; tests on the ``node``
fixture run twice, once with the node's native listener (which the clients
then use) and once over HTTP alone. The second part runs
against real node processes (see ``test_cluster.py``).
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from ringkv.client import AsyncClient, Client
from ringkv.client.routing import Router, Topology, parse_ring
from ringkv.clock import ManualClock
from ringkv.config import config_from_dict
from ringkv.client.errors import InvalidArgument
from ringkv.errors import (
    BadRequest,
    NoNodeAvailable,
    NotFound,
    Overloaded,
    RingKVError,
    TooLarge,
    Unavailable,
)
from ringkv.tools.launcher import free_port
from ringkv.tools.local_cluster import LocalCluster, node_view
from ringkv.node import Node
from ringkv.quorum import ConsistencyLevel, block_for
from ringkv.ring import NodeInfo, TokenRing, token_for
from ringkv.door import Door, DoorLimits
from ringkv.server.api import build_app
from ringkv.server.native import NativeServer
from ringkv.server.idempotency import IdempotencyCache, StoredResponse
from tests.procs import http, wait_until
from tests.test_cluster import liveness, make_cluster

DEADLINE_S = 30.0


class InProcessNode:
    """A standalone node and its HTTP API on a loopback port, run by a background loop."""

    def __init__(self, middlewares: list[Callable[..., Any]] | None = None, *,
                 native: bool = False) -> None:
        self.port = free_port()
        # With ``native``, the node also serves the native protocol and names it in
        # /v1/ring, so the clients (native by default) speak it after the first ring.
        self.native_port = free_port() if native else 0
        self.native: NativeServer | None = None
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = config_from_dict({
            "cluster": {"client_port": self.port},
            "storage": {"engine": "memory"},
            "limits": {"max_value_bytes": 4096, "max_scan_page": 100},
            "keyspaces": {
                "default": {"replication_factor": 3, "default_consistency": "QUORUM"},
                "solo": {"replication_factor": 1, "default_consistency": "ONE"},
            },
        })
        self.middlewares = middlewares or []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.node: Node | None = None
        self.server: TestServer | None = None

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=DEADLINE_S)

    def __enter__(self) -> InProcessNode:
        self.thread.start()

        async def start() -> None:
            self.node = Node(self.config, standalone=True)
            await self.node.start()
            cache = IdempotencyCache(self.node.clock)
            if self.native_port:
                self.node.native_address = f"127.0.0.1:{self.native_port}"
                door = Door(DoorLimits.from_config(self.config.limits))
                self.native = NativeServer(self.node, door, cache, self.node.clock)
                await self.native.start("127.0.0.1", self.native_port)
            app = build_app(self.node, cache)
            app.middlewares.extend(self.middlewares)
            self.server = TestServer(app, host="127.0.0.1", port=self.port)
            await self.server.start_server()

        self.run(start())
        return self

    def __exit__(self, *exc_info: object) -> None:
        async def stop() -> None:
            if self.server is not None:
                await self.server.close()
            if self.native is not None:
                await self.native.close(1.0)
            if self.node is not None:
                await self.node.stop()

        try:
            self.run(stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=DEADLINE_S)
            self.loop.close()


@pytest.fixture(params=["native", "http"])
def node(request: pytest.FixtureRequest) -> Iterator[InProcessNode]:
    """One node; the client tests on it run once over each protocol."""
    with InProcessNode(native=request.param == "native") as served:
        yield served


def run_async(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout=DEADLINE_S))


# -- the blocking client ------------------------------------------------------


def test_put_get_delete_round_trip(node: InProcessNode) -> None:
    with Client([node.url], consistency="QUORUM") as kv:
        assert kv.get("absent") is None
        written = kv.put("hello", {"nested": [1, 2.5, None, True]})
        record = kv.get_with_meta("hello")
        assert record is not None and record.value == {"nested": [1, 2.5, None, True]}
        assert record.timestamp == written.timestamp and record.receipt["consistency"] == "QUORUM"
        assert kv.get("hello") == {"nested": [1, 2.5, None, True]}
        kv.delete("hello")
        assert kv.get("hello") is None
        # Which protocol carried the calls: native once the ring named the listener.
        assert bool(kv._native._idle) == bool(node.native_port)
        # keys that need escaping, dots included, survive the trip
        for key in ("a/b/c", "ключ", "sp ace", "..", ".", "100%", "q?x=1&y#z"):
            kv.put(key, key)
            assert kv.get(key) == key


@pytest.mark.parametrize("level", ["ONE", "QUORUM", "ALL"])
def test_every_operation_at_a_level(node: InProcessNode, level: str) -> None:
    with Client(node.url) as kv:
        kv.put(f"k-{level}", 1, consistency=level)
        assert kv.get(f"k-{level}", consistency=level) == 1
        results = kv.batch([{"op": "put", "key": f"b-{level}", "value": 2},
                            {"op": "get", "key": f"b-{level}"}], consistency=level)
        assert [r.ok for r in results] == [True, True]
        assert [r.key for r in list(kv.scan(consistency=level))] != []
        kv.delete(f"k-{level}", consistency=level)
        assert kv.get(f"k-{level}", consistency=level) is None
    # ANY is for writes only: the client says so before sending anything
    with Client(node.url) as kv:
        kv.put("any", 1, consistency="ANY")
        with pytest.raises(InvalidArgument) as refused:
            kv.get("any", consistency="ANY")
        assert refused.value.field == "consistency"


def test_client_default_level_and_per_call_override(node: InProcessNode) -> None:
    with Client(node.url, consistency="ONE") as kv:
        kv.put("lvl", 1)
        assert kv.get_with_meta("lvl").receipt["consistency"] == "ONE"
        assert kv.get_with_meta("lvl", consistency="ALL").receipt["consistency"] == "ALL"
    with Client(node.url) as kv:  # no client default: the keyspace's own
        assert kv.get_with_meta("lvl").receipt["consistency"] == "QUORUM"
        assert kv.get_with_meta("lvl", keyspace="solo") is None


def test_ttl_is_sent(node: InProcessNode) -> None:
    with Client(node.url) as kv:
        kv.put("ttl", "soon gone", ttl=60)
        record = kv.get_with_meta("ttl")
        assert record.expires_at_us == record.timestamp.wall_us + 60_000_000


def test_batch_reports_each_result(node: InProcessNode) -> None:
    with Client(node.url) as kv:
        kv.put("present", "here")
        results = kv.batch([
            {"op": "get", "key": "present"},
            {"op": "get", "key": "missing"},
            {"op": "put", "key": "three", "value": 3, "ttl": 30},
            {"op": "delete", "key": "present"},
            {"op": "put", "key": "solo-key", "value": 1, "keyspace": "solo", "consistency": "ONE"},
        ])
        assert [(r.key, r.ok, r.found, r.value) for r in results[:2]] == [
            ("present", True, True, "here"), ("missing", True, False, None)]
        assert all(r.ok and r.timestamp is not None for r in results[2:])
        assert kv.get("solo-key", keyspace="solo") == 1
        with pytest.raises(BadRequest) as error:
            kv.batch([{"op": "frobnicate", "key": "x"}])
        assert error.value.field == "ops[0].op"


def test_scan_iterates_pages_in_token_order(node: InProcessNode) -> None:
    with Client(node.url) as kv:
        keys = {f"s{i:03d}" for i in range(250)}
        for start in range(0, 250, 100):
            kv.batch([{"op": "put", "key": f"s{i:03d}", "value": i}
                      for i in range(start, min(start + 100, 250))])
        records = list(kv.scan(page_size=100))
        assert {r.key for r in records} == keys
        tokens = [token_for(r.key.encode()) for r in records]
        assert tokens == sorted(tokens)
        pages = list(kv.scan_pages(page_size=100))
        assert [len(p.items) for p in pages] == [100, 100, 50]
        assert pages[-1].next_page_token is None
        resumed = list(kv.scan(page_size=100, page_token=pages[0].next_page_token))
        assert len(resumed) == 150
        # stopping early is fine: the rest is never fetched
        first_two = []
        for record in kv.scan(page_size=10):
            first_two.append(record)
            if len(first_two) == 2:
                break
        assert len(first_two) == 2


def test_errors_are_typed(node: InProcessNode) -> None:
    with Client(node.url, max_retries=1) as kv:
        with pytest.raises(BadRequest) as bad:  # the node's verdict: over its 20 years
            kv.put("k", 1, ttl=10**10)
        assert bad.value.field == "ttl" and bad.value.http_status == 400
        with pytest.raises(TooLarge) as large:
            kv.put("k", "x" * 5000)
        assert large.value.field == "value" and large.value.limit == 4096
        with pytest.raises(NotFound):
            kv.get("k", keyspace="nope")
        with pytest.raises(NotFound):
            list(kv.scan(keyspace="nope"))
        # a one-node ring has one replica: THREE can never be met
        with pytest.raises(Unavailable) as unavailable:
            kv.put("k", 1, consistency="THREE")
        assert (unavailable.value.required, unavailable.value.alive) == (3, 1)
        assert unavailable.value.consistency == "THREE"
        # The client's own refusals, before anything is sent: not a node's errors.
        with pytest.raises(InvalidArgument) as refused:
            kv.put("k", float("nan"))
        assert refused.value.field == "value" and not isinstance(refused.value, RingKVError)
        with pytest.raises(InvalidArgument):
            kv.get("")
        with pytest.raises(InvalidArgument):
            kv.get("k", consistency="MOST")
        with pytest.raises(InvalidArgument):
            kv.put("k", 1, ttl=-1)


def test_no_node_available_names_every_node() -> None:
    dead = [f"http://127.0.0.1:{free_port()}" for _ in range(3)]
    with Client(dead, timeout_s=2.0) as kv:
        with pytest.raises(NoNodeAvailable) as error:
            kv.get("k")
        assert sorted(error.value.tried) == sorted(dead)
        assert "cannot connect" in str(error.value)
        with pytest.raises(NoNodeAvailable) as error:
            kv.put("k", 1)
        assert error.value.maybe_applied is False  # refused connections: nothing was sent


class DrippingServer:
    """A loopback HTTP server that answers every request correctly but sends
    the body one byte at a time, a little under a client's socket timeout apart."""

    def __init__(self, gap_s: float) -> None:
        self.gap_s = gap_s
        self.listener = socket.create_server(("127.0.0.1", free_port()))
        self.listener.settimeout(0.1)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                head = b""
                while b"\r\n\r\n" not in head and len(head) < 65536:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    head += chunk
                if head.startswith(b"GET /v1/ring"):
                    conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n"
                                 b"Connection: close\r\n\r\n")
                    continue
                body = b'{"key":"k","value":1,"timestamp":[1,0]}'
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body))
                for byte in body:
                    if self.stop.wait(self.gap_s):
                        break
                    try:
                        conn.sendall(bytes([byte]))
                    except OSError:
                        break  # the client gave up

    def __enter__(self) -> DrippingServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=10)
        self.listener.close()


def test_a_blocking_call_ends_at_its_timeout_even_when_bytes_keep_coming() -> None:
    """Each byte arrives within the socket timeout, yet the whole answer would
    take far longer than ``timeout_s``: the attempt ends at its deadline."""
    with DrippingServer(gap_s=0.1) as server, \
            Client(server.url, timeout_s=0.5, max_retries=0) as kv:
        with pytest.raises(NoNodeAvailable) as error:
            kv.get("k")
        assert "no answer within" in str(error.value)
        assert error.value.timed_out and not error.value.maybe_applied  # a read: exit 5


def test_a_call_ends_by_its_deadline_even_when_connects_hang() -> None:
    """Black-holed nodes (a full accept backlog: SYNs are dropped, connects time
    out) cost no retries, but they do cost time: the ring refresh and the
    connection attempts all fit in one call deadline, not one timeout each."""
    held: list[socket.socket] = []
    try:
        urls = []
        for _ in range(3):
            listener = socket.create_server(("127.0.0.1", free_port()), backlog=0)
            held.append(listener)
            port = listener.getsockname()[1]
            for _ in range(3):  # fill the backlog; nobody ever accepts
                filler = socket.socket()
                filler.setblocking(False)
                filler.connect_ex(("127.0.0.1", port))
                held.append(filler)
            urls.append(f"http://127.0.0.1:{port}")
        with Client(urls, timeout_s=0.3, max_retries=0) as kv:
            with pytest.raises(NoNodeAvailable) as error:
                kv.get("k")
        assert "deadline passed" in str(error.value) and error.value.timed_out
        assert len(error.value.tried) <= 1  # not every node at a full timeout each
    finally:
        for sock in held:
            sock.close()


def test_a_dead_seed_is_skipped(node: InProcessNode) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    with Client([dead, node.url]) as kv:
        kv.put("k", 1)
        assert kv.get("k") == 1
        assert [view.url for view in kv.nodes()] == [node.url]


# -- the asyncio client -------------------------------------------------------


def test_async_client_does_everything(node: InProcessNode) -> None:
    async def main() -> None:
        async with AsyncClient([node.url], consistency="QUORUM") as kv:
            assert await kv.get("absent") is None
            written = await kv.put("a", [1, 2], ttl=100)
            record = await kv.get_with_meta("a", consistency="ONE")
            assert record.value == [1, 2] and record.timestamp == written.timestamp
            await kv.batch([{"op": "put", "key": f"x{i}", "value": i} for i in range(30)])
            keys = [r.key async for r in kv.scan(page_size=7)]
            assert len(keys) == 31
            pages = [p async for p in kv.scan_pages(page_size=20)]
            assert [len(p.items) for p in pages] == [20, 11]
            await kv.delete("a")
            assert await kv.get("a") is None
            with pytest.raises(Unavailable) as error:
                await kv.get("a", consistency="THREE")
            assert error.value.required == 3
            # many concurrent calls share the pool
            values = await asyncio.gather(*(kv.get(f"x{i}") for i in range(30)))
            assert values == list(range(30))
            assert [v.node_id for v in await kv.nodes()] == [node.node.node_id]
            assert bool(kv._native._conns) == bool(node.native_port)  # pipelined, if native

    run_async(main())


def test_async_no_node_available() -> None:
    async def main() -> None:
        async with AsyncClient([f"http://127.0.0.1:{free_port()}"]) as kv:
            with pytest.raises(NoNodeAvailable):
                await kv.put("k", 1)

    run_async(main())


# -- retries and idempotency -------------------------------------------------------


def test_same_idempotency_key_returns_the_original_result(node: InProcessNode) -> None:
    with Client(node.url) as kv:
        first = kv.put("idem", 1, idempotency_key="op-1")
        again = kv.put("idem", 1, idempotency_key="op-1")
        assert again.timestamp == first.timestamp and again.replayed and not first.replayed
        assert kv.put("idem", 1).timestamp > first.timestamp  # fresh keys: new writes
        with pytest.raises(BadRequest) as error:
            kv.put("idem", 2, idempotency_key="op-1")  # same key, different request
        assert error.value.field == "Idempotency-Key"
        deleted = kv.delete("idem", idempotency_key="op-2")
        assert kv.delete("idem", idempotency_key="op-2").timestamp == deleted.timestamp


def _drop_first_answer(counter: dict[str, int]) -> Callable[..., Any]:
    """Run the first keyed write, then cut the connection instead of answering."""

    @web.middleware
    async def middleware(request: web.Request, handler: Any) -> web.StreamResponse:
        counter["requests"] += 1
        response = await handler(request)
        if request.headers.get("Idempotency-Key") and not counter.get("dropped"):
            counter["dropped"] = 1
            assert request.transport is not None
            request.transport.abort()  # the write happened; the answer is lost
        return response

    return middleware


def test_a_lost_answer_is_retried_and_deduplicated() -> None:
    counter = {"requests": 0}
    with InProcessNode(middlewares=[_drop_first_answer(counter)]) as served:
        with Client(served.url) as kv:
            written = kv.put("lost", "v")
            assert written.replayed  # the retry found the first attempt's result
            stored = kv.get_with_meta("lost")
            assert stored.timestamp == written.timestamp
            writes = served.run(_coordinated_total(served.node))
            assert writes == 2  # one put (not two) and one get were coordinated


async def _coordinated_total(node: Node) -> float:
    text = node.metrics.render().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("ringkv_coordinated_keys_total{"))


def test_async_lost_answer_is_retried_and_deduplicated() -> None:
    counter = {"requests": 0}
    with InProcessNode(middlewares=[_drop_first_answer(counter)]) as served:
        async def main() -> None:
            async with AsyncClient(served.url) as kv:
                written = await kv.put("lost", "v")
                assert written.replayed
                assert (await kv.get_with_meta("lost")).timestamp == written.timestamp

        run_async(main())


def test_a_write_without_idempotency_key_is_not_retried_after_a_lost_answer() -> None:
    counter = {"requests": 0}

    @web.middleware
    async def drop_every_put(request: web.Request, handler: Any) -> web.StreamResponse:
        response = await handler(request)
        if request.method == "PUT":
            counter["requests"] += 1
            assert request.transport is not None
            request.transport.abort()
        return response

    with InProcessNode(middlewares=[drop_every_put]) as served:
        with Client(served.url, idempotent_writes=False) as kv:
            with pytest.raises(NoNodeAvailable) as error:
                kv.put("k", 1)
            assert error.value.maybe_applied and counter["requests"] == 1
        with Client(served.url, max_retries=2) as kv:
            with pytest.raises(NoNodeAvailable):
                kv.put("k", 1)
            assert counter["requests"] == 1 + 3  # retried, boundedly


def test_overloaded_is_retried_with_a_bound() -> None:
    counter = {"requests": 0}

    @web.middleware
    async def overloaded(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path.startswith("/v1/kv/"):
            counter["requests"] += 1
            return web.json_response(Overloaded("queue full").to_json(), status=503)
        return await handler(request)

    with InProcessNode(middlewares=[overloaded]) as served:
        with Client(served.url, max_retries=2) as kv:
            with pytest.raises(Overloaded):
                kv.get("k")
        assert counter["requests"] == 3


def make_router(seeds: list[str]) -> Router:
    return Router(seeds, refresh_interval_s=30.0, rng=random.Random(7))


def test_token_aware_candidates_put_replicas_first() -> None:
    router = make_router(["http://seed:1"])
    tokens = {f"n{i}": [t] for i, t in enumerate((-6 * 10**18, -2 * 10**18, 2 * 10**18, 6 * 10**18))}
    ring = TokenRing(tokens)
    urls = {node_id: f"http://{node_id}:1" for node_id in tokens}
    router.topology = Topology(ring, urls, {n: True for n in tokens}, {"default": 2})
    for i in range(200):
        key = f"key{i}".encode()
        replicas = ring.replicas_for_key(key, 2)
        candidates = router.candidates((("default", key),), now=0.0)
        assert {c.split("//")[1].split(":")[0] for c in candidates[:2]} == set(replicas)
        assert candidates[-1] == "http://seed:1"  # a seed not in the ring is the last resort
    # a replica marked down goes last among the ring's nodes
    key = b"key7"
    down = ring.replicas_for_key(key, 2)[0]
    router.topology = Topology(ring, urls, {n: n != down for n in tokens}, {"default": 2})
    assert router.candidates((("default", key),), now=0.0)[0] == urls[ring.replicas_for_key(key, 2)[1]]
    assert router.candidates((("default", key),), now=0.0)[3] == urls[down]


# -- the server's idempotency cache -------------------------------------------------


def test_idempotency_cache_is_bounded_and_expires() -> None:
    clock = ManualClock()
    cache = IdempotencyCache(clock, max_entries=3, ttl_s=10)
    runs = []

    async def execute() -> StoredResponse:
        runs.append(1)
        return StoredResponse(200, f"r{len(runs)}".encode(), "application/json")

    async def main() -> None:
        first, replayed = await cache.run("a", b"fp", execute)
        assert (first.body, replayed) == (b"r1", False)
        assert await cache.run("a", b"fp", execute) == (first, True)
        for key in "bcd":
            await cache.run(key, b"fp", execute)
        assert len(cache) == 3  # "a" was the least recently used: evicted
        assert (await cache.run("a", b"fp", execute))[1] is False
        clock.advance(11)
        assert (await cache.run("d", b"fp", execute))[1] is False  # expired
        with pytest.raises(BadRequest):
            await cache.run("d", b"other", execute)

    run_async(main())


def test_idempotency_cache_is_bounded_in_bytes() -> None:
    """Responses are remembered within a byte budget, oldest out first; one too
    large for a sixteenth of it is not remembered (a repeat executes again)."""
    cache = IdempotencyCache(ManualClock(), max_bytes=1600)
    runs: list[str] = []

    def sized(key: str, size: int) -> Callable[[], Any]:
        async def execute() -> StoredResponse:
            runs.append(key)
            return StoredResponse(200, b"x" * size, "application/json")
        return execute

    async def main() -> None:
        for key in "abcdefghijkl":
            await cache.run(key, b"fp", sized(key, 100))
            assert cache.size_bytes <= 1600
        assert len(cache) == 12 and cache.size_bytes == 1200
        for key in "mnopq":
            await cache.run(key, b"fp", sized(key, 100))
        assert cache.size_bytes == 1600 and len(cache) == 16  # the 17th pushed out "a", the oldest
        assert (await cache.run("a", b"fp", sized("a", 100)))[1] is False
        assert (await cache.run("q", b"fp", sized("q", 100)))[1] is True
        big = sized("big", 101)
        assert (await cache.run("big", b"fp", big))[1] is False
        assert (await cache.run("big", b"fp", big))[1] is False  # never remembered
        assert runs.count("big") == 2 and cache.size_bytes <= 1600

    run_async(main())


def test_idempotency_cache_makes_a_concurrent_repeat_wait() -> None:
    cache = IdempotencyCache(ManualClock())
    release = asyncio.Event()
    runs = []

    async def slow() -> StoredResponse:
        runs.append(1)
        await release.wait()
        return StoredResponse(200, b"once", "application/json")

    async def main() -> None:
        first = asyncio.create_task(cache.run("k", b"fp", slow))
        second = asyncio.create_task(cache.run("k", b"fp", slow))
        await asyncio.sleep(0)
        release.set()
        assert (await first) == (StoredResponse(200, b"once", "application/json"), False)
        assert (await second)[1] is True and len(runs) == 1

    run_async(main())


def test_failures_are_not_remembered() -> None:
    cache = IdempotencyCache(ManualClock())

    async def fails() -> StoredResponse:
        raise Unavailable("no", consistency="ONE", required=1, alive=0)

    async def works() -> StoredResponse:
        return StoredResponse(200, b"ok", "application/json")

    async def main() -> None:
        with pytest.raises(Unavailable):
            await cache.run("k", b"fp", fails)
        assert await cache.run("k", b"fp", works) == (StoredResponse(200, b"ok", "application/json"), False)

    run_async(main())


def test_the_ring_carries_racks_so_routing_matches_rack_aware_placement() -> None:
    tokens = {f"n{i}": [(i - 2) * 3 * 10**18] for i in range(4)}
    infos = {n: NodeInfo(n, rack=f"r{i % 2}") for i, n in enumerate(tokens)}
    server_ring = TokenRing(tokens, infos)
    body = {"nodes": [{"node_id": n, "client_address": f"0.0.0.0:{7400 + i}", "tokens": t,
                       "up": True, "dc": "dc1", "rack": infos[n].rack}
                      for i, (n, t) in enumerate(tokens.items())],
            "keyspaces": {"default": {"replication_factor": 2}}}
    topology = parse_ring(json.dumps(body).encode(), "http://10.0.0.9:7400")
    assert topology.ring == server_ring
    assert topology.urls["n1"] == "http://10.0.0.9:7401"  # a wildcard bind: the host we used
    for i in range(100):
        key = f"k{i}".encode()
        assert topology.ring.replicas_for_key(key, 2) == server_ring.replicas_for_key(key, 2)


# -- real node processes ---------------------------------------------------------------

SOLO = {"keyspaces.solo": {"replication_factor": 1, "default_consistency": "ONE"}}
FAST_GOSSIP = {"timing.gossip_interval_ms": 250}
LEVELS = ("ONE", "TWO", "THREE", "QUORUM", "ALL")


def coordinated(urls: list[str]) -> dict[str, float]:
    """``ringkv_coordinated_keys_total`` by its replica label, summed over ``urls``."""
    totals = {"true": 0.0, "false": 0.0}
    for url in urls:
        status, text = http("GET", f"{url}/metrics")
        assert status == 200
        for line in text.splitlines():
            for flag in totals:
                if line.startswith(f'ringkv_coordinated_keys_total{{replica="{flag}"}}'):
                    totals[flag] += float(line.rsplit(" ", 1)[1])
    return totals


@pytest.fixture(scope="module")
def shared_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    # Fast gossip: a quicker start-up; these tests check routing and levels, not timing.
    cluster = make_cluster(tmp_path_factory.mktemp("client-cluster"), **SOLO, **FAST_GOSSIP)
    try:
        cluster.up(timeout_s=60)
        yield cluster
    finally:
        cluster.down()


# Dynamo §4.5: a read is sure to see a write only when R + W > N. Each write
# at a level is read back at the weakest level that completes it for RF=3, so
# every level is exercised both as W (left) and as R (right), and ONE/ONE,
# which promises no read-your-writes, is never asked to.
READ_BACK_AT = {"ONE": "ALL", "TWO": "TWO", "THREE": "ONE", "QUORUM": "QUORUM", "ALL": "ONE"}


@pytest.mark.cluster
@pytest.mark.parametrize("level", LEVELS)
def test_cluster_every_operation_at_every_level(shared_cluster: LocalCluster, level: str) -> None:
    prefix = f"lvl-{level}-"
    read = READ_BACK_AT[level]
    rf = 3
    assert block_for(ConsistencyLevel(level), rf) + block_for(ConsistencyLevel(read), rf) > rf
    with Client(shared_cluster.endpoints(), consistency=level) as kv:
        written = kv.put(prefix + "a", {"level": level}, ttl=3600)
        record = kv.get_with_meta(prefix + "a", consistency=read)
        assert record is not None, f"a {level} write not seen by a {read} read"
        assert record.value == {"level": level} and record.timestamp == written.timestamp
        assert record.receipt["consistency"] == read
        assert len(record.receipt["answered"]) >= block_for(ConsistencyLevel(read), rf)
        results = kv.batch([{"op": "put", "key": prefix + f"b{i}", "value": i} for i in range(5)]
                           + [{"op": "get", "key": prefix + "a", "consistency": read}])
        assert all(r.ok for r in results) and results[-1].value == {"level": level}
        scanned = {r.key for r in kv.scan(page_size=7, consistency=read) if r.key.startswith(prefix)}
        assert scanned == {prefix + "a"} | {prefix + f"b{i}" for i in range(5)}
        kv.delete(prefix + "a")
        assert kv.get(prefix + "a", consistency=read) is None
        kv.put(prefix + "any", 1, consistency="ANY")

    async def async_round() -> None:
        async with AsyncClient(shared_cluster.endpoints(), consistency=level) as kv:
            await kv.put(prefix + "async", [level])
            assert await kv.get(prefix + "async", consistency=read) == [level]
            pages = [p async for p in kv.scan_pages(page_size=50, consistency=read)]
            assert any(r.key == prefix + "async" for p in pages for r in p.items)
            await kv.delete(prefix + "async")
            assert await kv.get(prefix + "async", consistency=read) is None

    run_async(async_round())


@pytest.mark.cluster
def test_cluster_token_aware_routing_reaches_a_replica(shared_cluster: LocalCluster) -> None:
    """With RF=1 on 3 nodes only a token-aware client always lands on the key's replica."""
    urls = shared_cluster.endpoints()
    before = coordinated(urls)
    with Client(urls) as kv:
        for i in range(60):
            kv.put(f"route{i}", i, keyspace="solo")
            assert kv.get(f"route{i}", keyspace="solo") == i
        assert len({kv.replicas(f"route{i}", keyspace="solo")[0] for i in range(60)}) == 3

    async def async_round() -> None:
        async with AsyncClient(urls) as kv:
            for i in range(30):
                await kv.put(f"aroute{i}", i, keyspace="solo")

    run_async(async_round())
    after = coordinated(urls)
    assert after["true"] - before["true"] == 150
    assert after["false"] - before["false"] == 0
    # The check can fail: requests sent to one fixed node land on non-replicas.
    for i in range(30):
        assert http("PUT", f"{urls[0]}/v1/kv/solo/fixed{i}", {"value": i})[0] == 200
    assert coordinated(urls)["false"] > after["false"]


@pytest.mark.cluster
def test_cluster_idempotent_retry_returns_the_original_timestamp(
    shared_cluster: LocalCluster,
) -> None:
    with Client(shared_cluster.endpoints()) as kv:
        first = kv.put("idem", "once", idempotency_key="retry-me")
        second = kv.put("idem", "once", idempotency_key="retry-me")
        assert second.replayed and second.timestamp == first.timestamp
        assert kv.get_with_meta("idem").timestamp == first.timestamp
        third = kv.batch([{"op": "put", "key": "idem-b", "value": 1}], idempotency_key="batch-1")
        again = kv.batch([{"op": "put", "key": "idem-b", "value": 1}], idempotency_key="batch-1")
        assert again[0].timestamp == third[0].timestamp


def node_sees(kv: Client, node_id: str) -> bool | None:
    """Make one call (which refreshes the ring when due), then say if ``node_id`` is up."""
    kv.get("probe")
    return {view.node_id: view.up for view in kv.nodes()}.get(node_id)


@pytest.mark.cluster
def test_cluster_ring_refresh_after_a_node_restarts(tmp_path: Path) -> None:
    cluster = make_cluster(tmp_path, **SOLO, **FAST_GOSSIP)
    try:
        cluster.up(timeout_s=60)
        victim = cluster.procs[2]
        urls = cluster.endpoints()
        with Client(urls, refresh_interval_s=0.5, timeout_s=2.0) as kv:
            assert node_sees(kv, victim.node_id) is True
            on_victim = [k for k in (f"v{i}" for i in range(200))
                         if kv.replicas(k, keyspace="solo") == [victim.node_id]][:20]
            assert on_victim
            victim.kill()
            # QUORUM still works with one node down, even for keys the client sent to it
            for i in range(20):
                kv.put(f"during{i}", i)
            wait_until(lambda: node_sees(kv, victim.node_id) is False, timeout_s=30,
                       interval_s=0.1, what="the client's ring to show the node down")
            # Every coordinator must have convicted it too, or one still tries it
            # and times out instead of refusing at once.
            wait_until(lambda: all((node_view(p) or {}).get(victim.node_id, {})
                                   .get("liveness") == "DOWN" for p in cluster.procs[:2]),
                       timeout_s=30, interval_s=0.1, what="every node to show it DOWN")
            with pytest.raises(Unavailable):
                kv.put(on_victim[0], 1, keyspace="solo")  # its only replica is down
            victim.start()
            cluster.wait_all_up(timeout_s=30)
            wait_until(lambda: node_sees(kv, victim.node_id) is True, timeout_s=30,
                       interval_s=0.1, what="the client's ring to show the node up again")
            before = coordinated([victim.url])
            for key in on_victim:
                kv.put(key, "back", keyspace="solo")
            assert coordinated([victim.url])["true"] - before["true"] == len(on_victim)
    finally:
        cluster.down()


@pytest.mark.cluster
def test_cluster_unavailable_with_two_of_three_down(tmp_path: Path) -> None:
    cluster = make_cluster(tmp_path, **FAST_GOSSIP)
    try:
        cluster.up(timeout_s=60)
        survivor, *victims = cluster.procs
        urls = cluster.endpoints()
        with Client(urls, consistency="QUORUM", timeout_s=2.0) as kv:
            kv.put("before", 1)
            for victim in victims:
                victim.kill()
            wait_until(lambda: all(liveness(survivor, v.node_id) == "DOWN" for v in victims),
                       timeout_s=30, interval_s=0.1, what="the survivor to see both nodes DOWN")
            for call in (lambda: kv.put("k", 1), lambda: kv.get("before"),
                         lambda: kv.delete("before")):
                with pytest.raises(Unavailable) as error:
                    call()
                assert (error.value.required, error.value.alive) == (2, 1)
                assert error.value.consistency == "QUORUM" and error.value.http_status == 503
            assert kv.get("before", consistency="ONE") == 1
            kv.put("k", 2, consistency="ONE")
            survivor.kill()
            with pytest.raises(NoNodeAvailable) as gone:
                kv.get("k")
            assert sorted(gone.value.tried) == sorted(urls)
    finally:
        cluster.down()


def test_calls_with_one_idempotency_key_go_to_one_node() -> None:
    router = make_router(["http://seed:1"])
    tokens = {f"n{i}": [(i - 2) * 3 * 10**18] for i in range(5)}
    urls = {node_id: f"http://{node_id}:1" for node_id in tokens}
    router.topology = Topology(TokenRing(tokens), urls, {n: True for n in tokens}, {"default": 3})
    routing = (("default", b"some-key"),)
    firsts = {router.candidates(routing, 0.0, affinity="key-1")[0] for _ in range(20)}
    assert len(firsts) == 1
    spread = {router.candidates(routing, 0.0, affinity=f"key-{i}")[0] for i in range(50)}
    assert len(spread) == 3  # different keys still spread over the key's replicas


def test_a_native_port_that_refuses_falls_back_to_http() -> None:
    """The ring names a native address nobody listens on (a firewall, say): the request
    never went out, so it goes to the same node's HTTP port at once, and stays there."""
    with InProcessNode() as served:
        assert served.node is not None
        dead = free_port()
        served.node.native_address = f"127.0.0.1:{dead}"
        with Client(served.url, max_retries=0) as kv:
            kv.refresh_ring()
            assert kv._ops.router.topology.native[served.url] == ("127.0.0.1", dead)
            kv.put("k", 1)
            assert kv.get("k") == 1
            assert ("127.0.0.1", dead) in kv._native_down and not kv._native._idle

        async def main() -> None:
            async with AsyncClient(served.url, max_retries=0) as kv:
                await kv.refresh_ring()
                assert await kv.get("k") == 1
                assert ("127.0.0.1", dead) in kv._native_down

        run_async(main())
