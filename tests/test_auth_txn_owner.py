"""An interactive transaction belongs to the user who began it: one real node process
with auth.enabled, over HTTP and the native protocol.

Checked: another user who learns the id is refused every call of it (read,
put, delete, commit, abort) with 403 ``forbidden`` naming the transaction
(reason ``not_owner``) and nothing of it, also when it replays the owner's
idempotency key; the owner's transaction goes on untouched and commits; a
cluster admin may abort a user's transaction (and only that); the owner then
finds it aborted by the client.
"""

from __future__ import annotations

import base64
import json
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ringkv.client.native import hello_frame
from ringkv.net.codec import KIND_REQUEST, KIND_RESPONSE, Frame, FrameDecoder, encode_frame
from ringkv.tools.launcher import NodeProcess, free_port_block
from ringkv.tools.local_cluster import NO_STREAMING, LocalCluster
from tests.procs import http, wait_until

pytestmark = pytest.mark.cluster

PRINTED = re.compile(r"superuser 'admin' with password (\S+)")


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.fixture
def node(tmp_path: Path) -> Iterator[tuple[NodeProcess, str]]:
    """One node with auth on, and the superuser's password it printed."""
    cluster = LocalCluster(tmp_path, nodes=1, rf=1, base_client_port=free_port_block(1),
                           base_internode_port=free_port_block(1), config_overrides={
                               "auth.enabled": True, "auth.replication_factor": 1})
    try:
        (proc,) = cluster.build()
        proc.extra_args.append(NO_STREAMING)  # a new cluster: nothing to stream
        proc.launch()
        assert proc.log_path is not None
        log_path = proc.log_path
        wait_until(lambda: PRINTED.search(log_path.read_text(errors="replace")),
                   timeout_s=30, interval_s=0.2, what="the superuser's password")
        wait_until(proc._ready, timeout_s=30, what="the node to join")  # noqa: SLF001
        found = PRINTED.search(log_path.read_text(errors="replace"))
        assert found is not None
        yield proc, found.group(1)
    finally:
        cluster.down()


class Native:
    """A native connection logged in as one user."""

    def __init__(self, proc: NodeProcess, user: str, password: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", proc.native_port), timeout=10)
        self.decoder = FrameDecoder(1 << 20)
        self.next_id = 1
        self.sock.sendall(hello_frame(credentials={"user": user, "password": password}))
        hello = self._frame()
        assert (hello.kind, hello.payload.get("user")) == (KIND_RESPONSE, user), hello

    def _frame(self) -> Frame:
        while True:  # each recv is bounded by the socket's timeout
            data = self.sock.recv(65536)
            assert data, "the node closed the connection"
            frames = self.decoder.feed(data)
            if frames:
                assert len(frames) == 1
                return frames[0]

    def call(self, verb: str, **payload: Any) -> tuple[int, Any]:
        request_id = self.next_id
        self.next_id += 1
        self.sock.sendall(encode_frame(KIND_REQUEST, request_id, verb, payload, version=2))
        frame = self._frame()
        assert frame.request_id == request_id, frame
        return frame.payload["status"], json.loads(frame.payload["body"])

    def close(self) -> None:
        self.sock.close()


def refused(answer: tuple[int, Any], txn_id: str) -> bool:
    """403 naming the transaction, and nothing of what it holds."""
    status, body = answer
    error = body["error"]
    return (status == 403 and error["code"] == "forbidden" and error["reason"] == "not_owner"
            and error["id"] == txn_id and "ended" not in error and "key" not in error
            and error["keyspace"] is None and "value" not in json.dumps(body))


def test_a_transaction_is_its_beginners_and_an_admin_may_abort_it(
        node: tuple[NodeProcess, str]) -> None:
    proc, admin_password = node
    admin = basic("admin", admin_password)
    for name in ("alice", "bob"):
        status, body = http("POST", f"{proc.url}/v1/auth/users", {
            "name": name, "password": f"{name}-pw-1",
            "grants": [{"permission": "read", "keyspace": "txn"},
                       {"permission": "write", "keyspace": "txn"}]}, headers=admin)
        assert status == 201, body
    alice, bob = basic("alice", "alice-pw-1"), basic("bob", "bob-pw-1")

    status, began = http("POST", f"{proc.url}/v1/txn/begin", {"keyspace": "txn"}, headers=alice)
    assert status == 200, began
    txn = began["txn_id"]
    base = f"{proc.url}/v1/txn/{txn}"
    status, body = http("PUT", f"{base}/kv/txn/k", {"value": "alice's"},
                        headers={**alice, "Idempotency-Key": "put-1"})
    assert status == 200, body

    # Bob has the id and read and write on the keyspace, and still may do nothing with it.
    for method, path, body in (("GET", "/kv/txn/k", None), ("PUT", "/kv/txn/k", {"value": 2}),
                               ("DELETE", "/kv/txn/k", None), ("POST", "/commit", None),
                               ("POST", "/abort", None)):
        assert refused(http(method, base + path, body, headers=bob), txn), (method, path)
    # Not even by replaying the owner's idempotency key (no replay of alice's answer).
    assert refused(http("PUT", f"{base}/kv/txn/k", {"value": "alice's"},
                        headers={**bob, "Idempotency-Key": "put-1"}), txn)
    native_bob = Native(proc, "bob", "bob-pw-1")
    try:
        for verb, extra in (("txn_get", {"keyspace": "txn", "key": "k"}),
                            ("txn_put", {"keyspace": "txn", "key": "k",
                                         "body": b'{"value": 3}'}),
                            ("txn_commit", {}), ("txn_abort", {})):
            assert refused(native_bob.call(verb, txn_id=txn, **extra), txn), verb
    finally:
        native_bob.close()
    # The admin may abort it, but not read it.
    assert refused(http("GET", f"{base}/kv/txn/k", headers=admin), txn)

    # Alice's transaction went on untouched: her own write, then her commit, over native.
    native_alice = Native(proc, "alice", "alice-pw-1")
    try:
        status, read = native_alice.call("txn_get", txn_id=txn, keyspace="txn", key="k")
        assert (status, read["value"], read.get("own_write")) == (200, "alice's", True), read
        status, done = native_alice.call("txn_commit", txn_id=txn)
        assert (status, done["committed"]) == (200, True), done
    finally:
        native_alice.close()
    status, body = http("GET", f"{proc.url}/v1/kv/txn/k", headers=alice)
    assert (status, body["value"]) == (200, "alice's"), body
    # Ended, it is still alice's: bob learns nothing of how it ended.
    assert refused(http("POST", f"{base}/commit", headers=bob), txn)

    # A cluster admin aborts alice's next transaction; alice finds it aborted.
    status, began = http("POST", f"{proc.url}/v1/txn/begin", {"keyspace": "txn"}, headers=alice)
    assert status == 200, began
    second = f"{proc.url}/v1/txn/{began['txn_id']}"
    status, body = http("PUT", f"{second}/kv/txn/k", {"value": "never"}, headers=alice)
    assert status == 200, body
    status, body = http("POST", f"{second}/abort", headers=admin)
    assert (status, body.get("aborted")) == (200, True), body
    status, body = http("POST", f"{second}/commit", headers=alice)
    assert (status, body["error"]["reason"], body["error"]["ended"]) == (409, "client", "client")
    status, body = http("GET", f"{proc.url}/v1/kv/txn/k", headers=alice)
    assert (status, body["value"]) == (200, "alice's"), body


def test_an_idempotency_key_is_each_users_own(node: tuple[NodeProcess, str]) -> None:
    """Another user's repeat of a key is not answered with the first user's response
    (it is its own write), and a key another user holds is no oracle: bob reusing
    alice's key for a different request is not refused as "already used"."""
    proc, admin_password = node
    admin = basic("admin", admin_password)
    for name in ("alice", "bob"):
        status, body = http("POST", f"{proc.url}/v1/auth/users", {
            "name": name, "password": f"{name}-pw-1",
            "grants": [{"permission": "write", "keyspace": "txn"}]}, headers=admin)
        assert status == 201, body
    alice, bob = basic("alice", "alice-pw-1"), basic("bob", "bob-pw-1")
    url = f"{proc.url}/v1/kv/txn/shared"

    status, first = http("PUT", url, {"value": 1}, headers={**alice, "Idempotency-Key": "same"})
    assert status == 200, first
    status, again = http("PUT", url, {"value": 1}, headers={**alice, "Idempotency-Key": "same"})
    assert (status, again["version"]) == (200, first["version"]), again  # alice's own repeat
    status, bobs = http("PUT", url, {"value": 1}, headers={**bob, "Idempotency-Key": "same"})
    assert status == 200, bobs
    assert bobs["version"] > first["version"], "bob was answered with alice's write"

    status, body = http("PUT", f"{proc.url}/v1/kv/txn/other", {"value": 1},
                        headers={**alice, "Idempotency-Key": "alice-only"})
    assert status == 200, body
    status, body = http("PUT", f"{proc.url}/v1/kv/txn/other", {"value": 2},
                        headers={**bob, "Idempotency-Key": "alice-only"})
    assert status == 200, body
