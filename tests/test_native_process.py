"""The native protocol against real node processes: every operation through the Python
client, pipelined answers out of order, and the door's rules on the native port.

One three-node cluster (RF 3) for the module. Dynamo §4.1's interface (get/put) and
§4.5's quorums, reached through the native listener as through HTTP; Spanner §4.1's
one-shot transactions through it too.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ringkv.client import AsyncClient, Client
from ringkv.net import native
from ringkv.net.codec import KIND_ERROR, KIND_REQUEST, KIND_RESPONSE, Frame, FrameDecoder, encode_frame
from ringkv.tools.launcher import NodeProcess, free_port_block
from ringkv.tools.local_cluster import LocalCluster
from tests.procs import wait_until

pytestmark = pytest.mark.cluster

DEADLINE_S = 10.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    cluster = LocalCluster(tmp_path_factory.mktemp("native"), nodes=3, rf=3,
                           base_client_port=free_port_block(3),
                           base_internode_port=free_port_block(3),
                           config_overrides={"limits.max_request_bytes": 65536,
                                             "limits.max_value_bytes": 4096,
                                             "limits.header_timeout_s": 1.0,
                                             "limits.idle_timeout_s": 1.0})
    try:
        cluster.up(timeout_s=60)
        yield cluster
    finally:
        cluster.down()


class Raw:
    """A hand-driven native connection, to send what a well-behaved client would not."""

    def __init__(self, proc: NodeProcess, *, handshake: bool = True) -> None:
        self.sock = socket.create_connection(("127.0.0.1", proc.native_port), timeout=DEADLINE_S)
        self.decoder = FrameDecoder()
        self.frames: list[Frame] = []
        if handshake:
            self.sock.sendall(encode_frame(KIND_REQUEST, 0, "hello", {"versions": [1]}))
            hello = self.read()
            assert hello.kind == KIND_RESPONSE and hello.payload["version"] == 1

    def read(self) -> Frame:
        while not self.frames:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed")
            self.frames.extend(self.decoder.feed(data))
        return self.frames.pop(0)

    def closed(self) -> bool:
        """Whether the node closed the connection (after any frames it sent)."""
        try:
            return self.sock.recv(65536) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


def request(verb: str, request_id: int, **payload: Any) -> bytes:
    return encode_frame(KIND_REQUEST, request_id, verb, payload)


def body_of(frame: Frame) -> Any:
    return json.loads(frame.payload["body"])


@pytest.mark.parametrize("protocol", ["native", "http"])
def test_every_operation_through_the_client(cluster: LocalCluster, protocol: str) -> None:
    """The same calls, the same results and receipts, over either protocol."""
    p = f"{protocol}-"
    with Client(cluster.endpoints(), consistency="QUORUM", protocol=protocol) as kv:
        kv.refresh_ring()
        written = kv.put(p + "a", {"n": 1})
        record = kv.get_with_meta(p + "a")
        assert record is not None and record.value == {"n": 1}
        assert record.timestamp == written.timestamp
        assert record.receipt["consistency"] == "QUORUM" and len(record.receipt["answered"]) >= 2
        results = kv.batch([{"op": "put", "key": p + "b", "value": 2},
                            {"op": "get", "key": p + "a"}])
        assert [r.ok for r in results] == [True, True] and results[1].value == {"n": 1}
        assert {r.key for r in kv.scan(page_size=3) if r.key.startswith(p)} == {p + "a", p + "b"}
        kv.delete(p + "a")
        assert kv.get(p + "a") is None
        kv.put(p + "t", 1, keyspace="txn")
        done = kv.txn("txn", reads=[p + "t"], writes=[{"op": "put", "key": p + "t", "value": 2}])
        assert done.committed and done.reads[p + "t"].value == 1
        assert kv.txn_status(done.id, keyspace="txn").status == "committed"
        # A repeat of a write under one idempotency key is the first write (its timestamp).
        first = kv.put(p + "idem", 1, idempotency_key=p + "key-1")
        again = kv.put(p + "idem", 1, idempotency_key=p + "key-1")
        assert again.replayed and again.timestamp == first.timestamp
        if protocol == "native":  # every node's native address came with the ring
            assert len(kv._ops.router.topology.native) == 3
            assert kv._native._idle and len(kv._pool._idle) <= 1  # only the first ring fetch
        else:
            assert not kv._native._idle


def test_the_async_client_pipelines_over_native(cluster: LocalCluster) -> None:
    async def run() -> list[Any]:
        async with AsyncClient(cluster.endpoints(), consistency="QUORUM") as kv:
            await kv.refresh_ring()
            await asyncio.gather(*(kv.put(f"async-{i}", i) for i in range(40)))
            values = await asyncio.gather(*(kv.get(f"async-{i}") for i in range(40)))
            assert sum(len(c) for c in kv._native._conns.values()) <= 3 * 2
            return values

    assert asyncio.run(asyncio.wait_for(run(), DEADLINE_S)) == list(range(40))


def test_answers_come_back_out_of_order_by_request_id(cluster: LocalCluster) -> None:
    """A QUORUM write waits on a peer; a health check sent after it on the same
    connection does not, and its answer overtakes the write's."""
    raw = Raw(cluster.procs[0])
    try:
        raw.sock.sendall(
            request("put", 1, keyspace="default", key="ooo", body=b'{"value":1}',
                    args={"consistency": "ALL"})
            + request("health", 2)
            + request("status", 3))
        answers = [raw.read() for _ in range(3)]
        ids = [a.request_id for a in answers]
        assert sorted(ids) == [1, 2, 3] and ids[0] != 1
        by_id = {a.request_id: a for a in answers}
        assert by_id[1].payload["status"] == 200 and body_of(by_id[1])["ok"] is True
        assert body_of(by_id[2])["ok"] is True
        assert {row["node_id"] for row in body_of(by_id[3])["nodes"]} == {"node1", "node2",
                                                                          "node3"}
    finally:
        raw.close()


def test_errors_are_the_http_apis(cluster: LocalCluster) -> None:
    """Same codes and fields; a bad request is answered and the connection serves on."""
    raw = Raw(cluster.procs[1])
    try:
        raw.sock.sendall(request("get", 1, keyspace="nope", key="k"))
        first = raw.read()
        assert first.payload["status"] == 404 and body_of(first)["error"]["code"] == "not_found"
        raw.sock.sendall(request("put", 2, keyspace="default", key="k", body=b"{"))
        second = raw.read()
        assert second.payload["status"] == 400
        assert body_of(second)["error"]["field"] == "body"
        raw.sock.sendall(request("frobnicate", 3))
        third = raw.read()
        assert third.request_id == 3 and body_of(third)["error"]["field"] == "verb"
        raw.sock.sendall(request("get", 4, keyspace="default", key="missing"))
        assert raw.read().payload["status"] == 404
    finally:
        raw.close()


def test_garbage_gets_an_error_frame_and_the_node_keeps_serving(cluster: LocalCluster) -> None:
    proc = cluster.procs[2]
    for blob in (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",  # a length prefix of ~1.2 GB
                 b"\x00\x00\x00\x03abc"):  # not msgpack
        raw = Raw(proc, handshake=False)
        try:
            raw.sock.sendall(blob)
            error = raw.read()
            assert error.kind == KIND_ERROR and error.payload["code"] in ("too_large",
                                                                         "protocol_error")
            assert raw.closed()
        finally:
            raw.close()
    # An unknown version is refused by name.
    raw = Raw(proc, handshake=False)
    try:
        raw.sock.sendall(encode_frame(KIND_REQUEST, 0, "hello", {"versions": [42]}))
        refusal = raw.read()
        assert refusal.kind == KIND_ERROR and refusal.payload["field"] == "versions"
        assert raw.closed()
    finally:
        raw.close()
    # A frame over the limit after the handshake: too_large naming the limit, then closed.
    raw = Raw(proc)
    try:
        raw.sock.sendall(request("put", 1, keyspace="default", key="big",
                                 body=b'{"value":"' + b"x" * 200_000 + b'"}'))
        error = raw.read()
        assert error.kind == KIND_ERROR and error.payload["code"] == "too_large"
        assert error.payload["field"] == "frame" and error.payload["limit"] > 65536
        assert raw.closed()
    finally:
        raw.close()
    with Client([proc.url], consistency="ONE") as kv:
        kv.put("still-serving", 1)
        assert kv.get("still-serving") == 1


def test_the_door_closes_an_idle_connection(cluster: LocalCluster) -> None:
    """limits.idle_timeout_s (1 s here) holds on the native port as on HTTP's."""
    raw = Raw(cluster.procs[0])
    try:
        raw.sock.sendall(request("health", 1))
        assert raw.read().payload["status"] == 200
        raw.sock.settimeout(DEADLINE_S)
        wait_until(raw.closed, timeout_s=DEADLINE_S, what="the idle connection to close")
    finally:
        raw.close()


def test_a_body_over_the_request_limit_is_refused_and_the_connection_serves_on(
        cluster: LocalCluster) -> None:
    raw = Raw(cluster.procs[0])
    try:
        raw.sock.sendall(request("put", 1, keyspace="default", key="k",
                                 body=b'{"value":"' + b"x" * 65_600 + b'"}'))
        answer = raw.read()
        assert answer.payload["status"] == 413
        assert body_of(answer)["error"]["limit"] == 65536
        raw.sock.sendall(request("health", 2))
        assert raw.read().payload["status"] == 200
    finally:
        raw.close()


@pytest.mark.parametrize("protocol", ["native", "http"])
def test_the_benchmark_generators_speak_both_protocols(cluster: LocalCluster,
                                                       protocol: str) -> None:
    """bench cluster's lean generators: the native one pipelines on one link per node."""
    from bench.loadgen import run_load

    result = run_load(protocol, cluster.endpoints(), "/v1/kv/default/{key}?consistency=QUORUM",
                      op="put", concurrency=4, duration_s=0.5, key_count=50, protocol=protocol)
    assert result.ops > 0 and result.errors == 0
