"""Leases and watches over the native protocol under auth, on one in-process node.

The native connection logs in once (its hello); each lease operation is then
checked against the user's grants once its keyspace is known (the body or the
lease id), as over HTTP (``tests/test_leases_auth.py``): write to grant, renew
or revoke, read to look at one; a watch needs read on its keyspace.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from ringkv.door import Door, DoorLimits
from ringkv.net.codec import KIND_REQUEST, FrameDecoder, encode_frame
from ringkv.node import Node
from ringkv.server.idempotency import IdempotencyCache
from ringkv.server.native import NativeServer
from tests.test_auth_api import Call, ShiftedClock, basic, serve


class Conn:
    """A native connection of one user (version 2)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.decoder = FrameDecoder()
        self.next_id = 1

    @classmethod
    async def open(cls, port: int, user: str, password: str) -> Conn:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        conn = cls(reader, writer)
        writer.write(encode_frame(KIND_REQUEST, 0, "hello", {
            "versions": [1, 2], "user": user, "password": password}))
        hello = await conn.frame()
        assert hello.payload["version"] == 2 and hello.payload["user"] == user, hello
        return conn

    async def frame(self) -> Any:
        for _ in range(100):  # bounded: each read waits at most 5 s
            data = await asyncio.wait_for(self.reader.read(65536), 5)
            assert data, "the node closed the connection"
            frames = self.decoder.feed(data)
            if frames:
                assert len(frames) == 1
                return frames[0]
        raise AssertionError("no frame")

    async def call(self, verb: str, **payload: Any) -> tuple[int, Any]:
        request_id = self.next_id
        self.next_id += 1
        self.writer.write(encode_frame(KIND_REQUEST, request_id, verb, payload, version=2))
        frame = await self.frame()
        assert frame.request_id == request_id
        if "body" not in frame.payload:  # a watch's first frame: streaming
            return frame.payload["status"], json.loads(frame.payload["event"])
        return frame.payload["status"], json.loads(frame.payload["body"])

    def close(self) -> None:
        self.writer.close()


def test_native_lease_and_watch_operations_need_the_users_grants(
        capsys: pytest.CaptureFixture[str]) -> None:
    async def scenario(call: Call, node: Node, password: str, clock: ShiftedClock) -> None:
        admin = basic("admin", password)
        for name, permission, keyspace in (("writer", "write", "t"), ("reader", "read", "t"),
                                           ("outsider", "write", "other")):
            status, body, _ = await call("POST", "/v1/auth/users", headers=admin, json={
                "name": name, "password": f"{name}-pw-1",
                "grants": [{"permission": permission, "keyspace": keyspace}]})
            assert status == 201, body
        native = NativeServer(node, Door(DoorLimits.from_config(node.config.limits)),
                              IdempotencyCache(node.clock), node.clock)
        await native.start("127.0.0.1", 0)
        server = native._server
        assert isinstance(server, asyncio.base_events.Server)
        port = server.sockets[0].getsockname()[1]
        writer = await Conn.open(port, "writer", "writer-pw-1")
        reader = await Conn.open(port, "reader", "reader-pw-1")
        outsider = await Conn.open(port, "outsider", "outsider-pw-1")
        try:
            def forbidden(answer: tuple[int, Any], permission: str) -> bool:
                status, body = answer
                return (status, body["error"]["code"], body["error"]["permission"],
                        body["error"]["keyspace"]) == (403, "forbidden", permission, "t")

            assert forbidden(await reader.call("lease_grant", body=b'{"ttl": 30}'), "write")
            status, granted = await writer.call("lease_grant", body=b'{"ttl": 30}')
            assert status == 200 and granted["id"].startswith("t:"), granted
            lease = granted["id"]
            status, body = await writer.call(
                "put", keyspace="t", key="k", body=json.dumps({"value": 1, "lease": lease}).encode())
            assert status == 200, body
            status, shown = await reader.call("lease_info", lease_id=lease)
            assert status == 200 and shown["keys"] == ["k"], shown
            assert forbidden(await outsider.call("lease_info", lease_id=lease), "read")
            assert forbidden(await reader.call("lease_keepalive", lease_id=lease), "write")
            assert forbidden(await reader.call("lease_revoke", lease_id=lease), "write")
            assert forbidden(await outsider.call("watch", keyspace="t", key="k"), "read")
            status, first = await reader.call("watch", keyspace="t", key="k")
            assert status == 200 and first["type"] == "progress", first
            status, body = await writer.call("lease_keepalive", lease_id=lease)
            assert status == 200 and body["remaining_ms"] > 29_000, body
            status, body = await writer.call("lease_revoke", lease_id=lease)
            assert status == 200 and body["deleted"] == ["k"], body
        finally:
            for conn in (writer, reader, outsider):
                conn.close()
            await native.close(drain_s=1.0)

    serve(scenario, capsys)
