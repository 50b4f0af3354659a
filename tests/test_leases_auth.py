"""Session leases under auth, on one in-process node (``server/lease_http.py``).

The lease routes name their keyspace in the body or in the lease id, not the
path, so the handler checks the permission once it knows it: write to grant,
renew or revoke a lease, read to look at one; without credentials, 401.
"""

from __future__ import annotations

from typing import Any

import pytest

from ringkv.node import Node
from tests.test_auth_api import Call, ShiftedClock, basic, serve


def test_lease_routes_need_write_on_the_leases_keyspace(
        capsys: pytest.CaptureFixture[str]) -> None:
    async def scenario(call: Call, node: Node, password: str, clock: ShiftedClock) -> None:
        admin = basic("admin", password)
        for name, permission in (("writer", "write"), ("reader", "read")):
            status, body, _ = await call("POST", "/v1/auth/users", headers=admin, json={
                "name": name, "password": f"{name}-pw-1",
                "grants": [{"permission": permission, "keyspace": "t"}]})
            assert status == 201, body
        writer, reader = basic("writer", "writer-pw-1"), basic("reader", "reader-pw-1")

        def refused(answer: tuple[int, Any, Any], permission: str) -> bool:
            status, body, _ = answer
            return (status, body["error"]["code"], body["error"]["permission"],
                    body["error"]["keyspace"]) == (403, "forbidden", permission, "t")

        status, body, _ = await call("POST", "/v1/lease", json={"ttl": 30})
        assert status == 401, body
        # The keyspace left out: the only transactional one (not system_auth) is checked.
        assert refused(await call("POST", "/v1/lease", json={"ttl": 30}, headers=reader), "write")
        status, granted, _ = await call("POST", "/v1/lease", json={"ttl": 30}, headers=writer)
        assert status == 200 and granted["id"].startswith("t:"), granted
        lease = granted["id"]
        status, body, _ = await call("PUT", "/v1/kv/t/k", json={"value": 1, "lease": lease},
                                     headers=writer)
        assert status == 200 and body["lease"] == lease, body
        status, shown, _ = await call("GET", f"/v1/lease/{lease}", headers=reader)
        assert status == 200 and shown["keys"] == ["k"], shown
        assert refused(await call("POST", f"/v1/lease/{lease}/keepalive", headers=reader),
                       "write")
        assert refused(await call("DELETE", f"/v1/lease/{lease}", headers=reader), "write")
        status, body, _ = await call("POST", f"/v1/lease/{lease}/keepalive", headers=writer)
        assert status == 200 and body["remaining_ms"] > 29_000, body
        status, body, _ = await call("DELETE", f"/v1/lease/{lease}", headers=writer)
        assert status == 200 and body["deleted"] == ["k"], body
        assert (await call("GET", "/v1/kv/t/k", headers=reader))[0] == 404
        # system_auth holds no leases.
        status, body, _ = await call("POST", "/v1/lease", headers=admin,
                                     json={"ttl": 30, "keyspace": "system_auth"})
        assert status == 400 and body["error"]["field"] == "keyspace", body

    serve(scenario, capsys)
