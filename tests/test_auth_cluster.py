"""Authentication across three real node processes (auth.enabled, the user store
a Paxos group of three in ``system_auth``).

Checked: exactly one node creates the superuser and prints its password
(put-if-absent through the transactional tier); a user added with
``ringkv user add`` through one node logs in at the others, and a grant
through another node reaches them; a token issued by one node works at
another; the native handshake refuses a hello without credentials
(``unauthenticated``) and accepts one with them; the Python client (native
and HTTP) logs in with user and password, and gets ``Forbidden`` naming the
permission it lacks.
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ringkv.client import AsyncClient, Client
from ringkv.client.native import hello_frame
from ringkv.errors import Forbidden, Unauthenticated
from ringkv.net.codec import KIND_ERROR, KIND_RESPONSE, Frame, FrameDecoder
from ringkv.tools.launcher import NodeProcess, free_port_block
from ringkv.tools.local_cluster import NO_STREAMING, LocalCluster
from tests.procs import REPO, http, wait_until

pytestmark = pytest.mark.cluster

PRINTED = re.compile(r"superuser 'admin' with password (\S+)")


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.fixture
def procs(tmp_path: Path):
    cluster = LocalCluster(tmp_path, nodes=3, rf=3, base_client_port=free_port_block(3),
                           base_internode_port=free_port_block(3), config_overrides={
                               "auth.enabled": True, "auth.cache_ttl_s": 0.5})
    try:
        for proc in cluster.build():
            proc.extra_args.append(NO_STREAMING)  # a new cluster: nothing to stream
            proc.launch()
        for proc in cluster.procs:
            # /v1/health is open with auth on: it answers 200 once the node is NORMAL.
            wait_until(proc._ready, timeout_s=30, what=f"{proc.node_id} to join")  # noqa: SLF001
        yield cluster.procs
    finally:
        cluster.down()


def printed(procs: list[NodeProcess]) -> list[tuple[str, str]]:
    found = []
    for proc in procs:
        assert proc.log_path is not None
        for password in PRINTED.findall(proc.log_path.read_text(errors="replace")):
            found.append((proc.node_id, password))
    return found


def ringkv_user(proc: NodeProcess, password: str, *args: str, new_password: str | None = None
                ) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RINGKV_PASSWORD": password, "PYTHONPATH": str(REPO)}
    if new_password is not None:
        env["RINGKV_NEW_PASSWORD"] = new_password
    return subprocess.run([sys.executable, "-m", "ringkv.cli", "user", *args, "--url", proc.url],
                          env=env, capture_output=True, text=True, timeout=30, check=False)


def native_hello(proc: NodeProcess, credentials: dict[str, str] | None) -> Frame:
    with socket.create_connection(("127.0.0.1", proc.native_port), timeout=10) as sock:
        sock.sendall(hello_frame(credentials=credentials))
        decoder = FrameDecoder(1 << 20)
        while True:
            data = sock.recv(65536)
            assert data, "the node closed the connection without an answer"
            frames = decoder.feed(data)
            if frames:
                return frames[0]


def test_users_log_in_at_every_node(procs: list[NodeProcess]) -> None:
    a, b, c = procs
    wait_until(lambda: printed(procs), timeout_s=30, interval_s=0.2,
               what="a node to create the superuser")
    admin_password = printed(procs)[0][1]
    admin = basic("admin", admin_password)
    # Added through a, the user logs in at b and c.
    done = ringkv_user(a, admin_password, "add", "alice", "--grant", "read:default",
                       new_password="alice-pw-1")
    assert done.returncode == 0, done.stderr
    alice = basic("alice", "alice-pw-1")
    for proc in (b, c):
        status, body = http("GET", f"{proc.url}/v1/kv/default/k", headers=alice)
        assert status == 404, body  # authorized: the key just does not exist
        status, body = http("PUT", f"{proc.url}/v1/kv/default/k", {"value": 1}, headers=alice)
        assert (status, body["error"]["permission"]) == (403, "write"), body
    status, body = http("GET", f"{b.url}/v1/kv/default/k")
    assert (status, body["error"]["code"]) == (401, "unauthenticated")
    # A token from c works at a.
    status, token = http("POST", f"{c.url}/v1/auth/token", headers=alice)
    assert status == 200, token
    status, _ = http("GET", f"{a.url}/v1/ring", headers={"Authorization": f"Bearer {token['token']}"})
    assert status == 200
    # The native handshake: refused without credentials, accepted with them.
    refused = native_hello(a, None)
    assert (refused.kind, refused.payload["code"]) == (KIND_ERROR, "unauthenticated"), refused
    accepted = native_hello(b, {"user": "alice", "password": "alice-pw-1"})
    assert (accepted.kind, accepted.payload.get("user")) == (KIND_RESPONSE, "alice"), accepted
    # The client logs in over both protocols, and is told what it lacks.
    for protocol in ("native", "http"):
        with Client([b.url], user="alice", password="alice-pw-1", protocol=protocol,
                    consistency="QUORUM") as client:
            assert client.get("k") is None
            with pytest.raises(Forbidden) as refusal:
                client.put("k", protocol)
            assert (refusal.value.permission, refusal.value.keyspace) == ("write", "default")
    async def with_token() -> Any:
        async with AsyncClient([c.url], token=token["token"]) as client:
            return await client.get("k")

    assert asyncio.run(asyncio.wait_for(with_token(), timeout=30)) is None
    with pytest.raises(Unauthenticated):
        with Client([a.url], user="alice", password="not-hers", max_retries=0) as client:
            client.get("k")
    # A grant through c reaches b (within auth.cache_ttl_s).
    done = ringkv_user(c, admin_password, "grant", "alice", "write", "--keyspace", "default")
    assert done.returncode == 0, done.stderr
    with Client([b.url], user="alice", password="alice-pw-1") as client:
        def wrote() -> bool:
            try:
                client.put("k", "granted")
            except Forbidden:
                return False
            return True
        wait_until(wrote, timeout_s=10, what="the grant to reach b")
        assert client.get("k") == "granted"
    listed = ringkv_user(b, admin_password, "list")
    assert listed.returncode == 0, listed.stderr
    assert re.search(r"alice\s+read:default, write:default", listed.stdout), listed.stdout
    assert (http("GET", f"{a.url}/v1/status", headers=admin))[0] == 200
    # One node created the superuser, and printed its password once.
    assert len(printed(procs)) == 1, printed(procs)
    # The operator commands log in from the environment; without it they are told why.
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RINGKV_PASSWORD", None)
    env.pop("RINGKV_TOKEN", None)
    refused_status = subprocess.run([sys.executable, "-m", "ringkv.cli", "status", "--url", a.url],
                                    env=env, capture_output=True, text=True, timeout=30)
    assert refused_status.returncode == 1 and "401" in refused_status.stderr, refused_status
    shown = subprocess.run([sys.executable, "-m", "ringkv.cli", "status", "--url", a.url],
                           env={**env, "RINGKV_PASSWORD": admin_password},
                           capture_output=True, text=True, timeout=30)
    assert shown.returncode == 0 and "node1" in shown.stdout, shown
