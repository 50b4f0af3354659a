"""Authentication and authorization through the HTTP API of one in-process node
(auth.enabled; the users in the transactional keyspace system_auth).

Checked: the superuser is created once with a generated password, printed
once, and works; a request without credentials gets 401 unauthenticated
with a WWW-Authenticate challenge, a wrong password 401 too; a user granted
``read`` on one keyspace reads it but gets 403 forbidden naming ``write``
when it writes, and ``read`` on another keyspace; the grant opens the door
and the revoke shuts it; tokens from POST /v1/auth/token work until they
expire and stop at a password change; an address that failed too often gets
429 with Retry-After, even with the right password; the failures are in
/metrics.
"""

from __future__ import annotations

import asyncio
import base64
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiohttp import ClientSession, web

from ringkv.auth.permissions import Principal
from ringkv.clock import SystemClock
from ringkv.errors import Unauthenticated
from ringkv.config import config_from_dict
from ringkv.node import Node
from ringkv.server.api import build_app
from ringkv.server.http_protocol import ApiRunner

Call = Callable[..., Awaitable[tuple[int, Any, Any]]]
PRINTED = re.compile(r"superuser 'admin' with password (\S+)")


class ShiftedClock(SystemClock):
    """The real clock, its wall time movable forward (token expiry)."""

    def __init__(self) -> None:
        self.shift_us = 0

    def wall_us(self) -> int:
        return super().wall_us() + self.shift_us


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@asynccontextmanager
async def listening(node: Node) -> AsyncIterator[ClientSession]:
    """The node's own HTTP listener (the lean key path included) and a client of it."""
    runner = ApiRunner(build_app(node), node.config.limits, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server = site._server
    assert isinstance(server, asyncio.base_events.Server)
    port = server.sockets[0].getsockname()[1]
    session = ClientSession(base_url=f"http://127.0.0.1:{port}")
    try:
        yield session
    finally:
        await session.close()
        await runner.cleanup()


def serve(scenario: Callable[[Call, Node, str, ShiftedClock], Awaitable[None]],
          capsys: pytest.CaptureFixture[str], **auth: Any) -> None:
    config = config_from_dict({
        "storage": {"engine": "memory"},
        "keyspaces": {"default": {"replication_factor": 1, "default_consistency": "ONE"},
                      "other": {"replication_factor": 1, "default_consistency": "ONE"},
                      "t": {"replication_factor": 1, "tier": "transactional"}},
        "auth": {"enabled": True, "replication_factor": 1, **auth},
    })
    clock = ShiftedClock()

    async def main() -> None:
        node = Node(config, clock=clock, standalone=True)
        await node.start()
        try:
            async with listening(node) as client:
                await run(client, node)
        finally:
            await node.stop()

    async def run(client: ClientSession, node: Node) -> None:
        async def call(method: str, path: str, **kwargs: Any) -> tuple[int, Any, Any]:
            response = await client.request(method, path, **kwargs)
            body = await response.json() if response.content_type == "application/json" \
                else await response.text()
            return response.status, body, response.headers

        assert node.auth is not None
        deadline = clock.monotonic_s() + 20
        while not node.auth.superuser_created:
            assert clock.monotonic_s() < deadline, "the superuser was not created"
            await asyncio.sleep(0.02)
        printed = PRINTED.findall(capsys.readouterr().out)
        assert len(printed) == 1, printed
        await scenario(call, node, printed[0], clock)

    asyncio.run(asyncio.wait_for(main(), timeout=60))


def test_superuser_users_grants_and_refusals(capsys: pytest.CaptureFixture[str]) -> None:
    async def scenario(call: Call, node: Node, password: str, clock: ShiftedClock) -> None:
        admin = basic("admin", password)
        # No credentials: 401 with a challenge; the health probe stays open.
        status, body, headers = await call("PUT", "/v1/kv/default/a", json={"value": 1})
        assert (status, body["error"]["code"]) == (401, "unauthenticated"), body
        assert headers["WWW-Authenticate"].startswith("Basic")
        status, body, _ = await call("GET", "/v1/status")
        assert (status, body["error"]["reason"]) == (401, "missing")
        assert (await call("GET", "/v1/health"))[0] == 200
        status, body, _ = await call("GET", "/v1/kv/default/a", headers=basic("admin", "wrong-pw"))
        assert (status, body["error"]["reason"]) == (401, "bad_credentials")
        # The superuser works everywhere.
        assert (await call("PUT", "/v1/kv/default/a", json={"value": 1}, headers=admin))[0] == 200
        assert (await call("GET", "/v1/status", headers=admin))[0] == 200
        # A reader of default.
        status, body, _ = await call("POST", "/v1/auth/users", headers=admin, json={
            "name": "reader", "password": "reader-pw-1",
            "grants": [{"permission": "read", "keyspace": "default"}]})
        assert status == 201, body
        reader = basic("reader", "reader-pw-1")
        status, body, _ = await call("GET", "/v1/kv/default/a", headers=reader)
        assert (status, body["value"]) == (200, 1)
        status, body, _ = await call("PUT", "/v1/kv/default/a", json={"value": 2}, headers=reader)
        assert (status, body["error"]["code"], body["error"]["permission"],
                body["error"]["keyspace"]) == (403, "forbidden", "write", "default"), body
        status, body, _ = await call("GET", "/v1/kv/other/a", headers=reader)
        assert (status, body["error"]["permission"], body["error"]["keyspace"]) == \
            (403, "read", "other")
        status, body, _ = await call("POST", "/v1/batch", headers=reader, json={
            "ops": [{"op": "get", "key": "a"}, {"op": "put", "key": "b", "value": 1}]})
        assert (status, body["error"]["permission"]) == (403, "write"), body
        status, body, _ = await call("GET", "/v1/status", headers=reader)
        assert (status, body["error"]["permission"], body["error"]["keyspace"]) == \
            (403, "admin", None)
        assert (await call("GET", "/v1/ring", headers=reader))[0] == 200
        # The API's description is for any user; without a login it is still a 401.
        assert (await call("GET", "/v1/openapi.json", headers=reader))[0] == 200
        assert (await call("GET", "/v1/openapi.json"))[0] == 401
        status, body, _ = await call("GET", "/v1/auth/whoami", headers=reader)
        assert (status, body) == (200, {"user": "reader", "grants": ["read:default"]})
        status, body, _ = await call("GET", "/v1/kv/system_auth/users", headers=admin)
        assert status == 403, body
        # Granting write opens the door; revoking shuts it again.
        status, body, _ = await call("POST", "/v1/auth/users/reader/grants", headers=admin,
                                     json={"permission": "write", "keyspace": "default"})
        assert (status, body["grants"]) == (200, ["read:default", "write:default"]), body
        assert (await call("PUT", "/v1/kv/default/a", json={"value": 2}, headers=reader))[0] == 200
        status, body, _ = await call("DELETE", "/v1/auth/users/reader/grants", headers=admin,
                                     json={"permission": "write", "keyspace": "default"})
        assert status == 200, body
        node.auth.store._cached = None  # noqa: SLF001 - the cache would keep it for cache_ttl_s
        status, body, _ = await call("PUT", "/v1/kv/default/a", json={"value": 3}, headers=reader)
        assert status == 403, body
        # A transaction needs what it does: reading t is not enough to write it.
        await call("POST", "/v1/auth/users/reader/grants", headers=admin,
                   json={"permission": "read", "keyspace": "t"})
        node.auth.store._cached = None  # noqa: SLF001
        status, body, _ = await call("POST", "/v1/txn", headers=reader, json={
            "keyspace": "t", "writes": [{"op": "put", "key": "x", "value": 1}]})
        assert (status, body["error"]["permission"]) == (403, "write"), body
        # Users are listed for an admin only; a user may change its own password.
        status, body, _ = await call("GET", "/v1/auth/users", headers=admin)
        assert [u["name"] for u in body["users"]] == ["admin", "reader"]
        assert (await call("GET", "/v1/auth/users", headers=reader))[0] == 403
        status, body, _ = await call("PUT", "/v1/auth/users/reader/password", headers=reader,
                                     json={"password": "reader-pw-2"})
        assert status == 200, body
        assert (await call("GET", "/v1/kv/default/a", headers=reader))[0] == 401
        reader = basic("reader", "reader-pw-2")
        assert (await call("GET", "/v1/kv/default/a", headers=reader))[0] == 200
        status, body, _ = await call("PUT", "/v1/auth/users/admin/password", headers=reader,
                                     json={"password": "taken-over"})
        assert (status, body["error"]["permission"]) == (403, "admin"), body
        # A connection that logged in before the change (the native hello) is done.
        with pytest.raises(Unauthenticated) as ended:
            await node.auth.authorize_session(Principal("reader", frozenset(), 1), "get",
                                              "default", {}, b"")
        assert ended.value.reason == "credentials_changed"
        # Bad input names the field.
        for body, field in (({"name": "x", "password": "short"}, "password"),
                            ({"name": "bad name", "password": "long-enough"}, "name"),
                            ({"name": "reader", "password": "long-enough"}, "name"),
                            ({"name": "y", "password": "long-enough",
                              "grants": [{"permission": "own"}]}, "permission")):
            status, answer, _ = await call("POST", "/v1/auth/users", headers=admin, json=body)
            assert (status, answer["error"]["field"]) == (400, field), answer
        status, answer, _ = await call("POST", "/v1/auth/users/reader/grants", headers=admin,
                                       json={"permission": "read"})
        assert (status, answer["error"]["field"]) == (400, "keyspace"), answer
        status, answer, _ = await call("DELETE", "/v1/auth/users/nobody", headers=admin)
        assert status == 404, answer
        # A user added elsewhere logs in here at once: a miss is read again at the leader.
        before = node.auth.store._cached  # noqa: SLF001 - this node's view before the add
        assert (await call("POST", "/v1/auth/users", headers=admin, json={
            "name": "late", "password": "late-pw-1"}))[0] == 201
        node.auth.store._cached = before  # noqa: SLF001 - as if added at another node
        node.auth.store._cached_at_s = clock.monotonic_s()  # noqa: SLF001
        status, body, _ = await call("GET", "/v1/ring", headers=basic("late", "late-pw-1"))
        assert status == 200, body
        # The failures are counted.
        _, metrics, _ = await call("GET", "/metrics", headers=admin)
        assert re.search(r'ringkv_auth_failures_total\{reason="missing"\} [1-9]', metrics)
        assert re.search(r"ringkv_auth_forbidden_total [1-9]", metrics)

    serve(scenario, capsys)


def test_tokens_expire_and_die_with_the_password(capsys: pytest.CaptureFixture[str]) -> None:
    async def scenario(call: Call, node: Node, password: str, clock: ShiftedClock) -> None:
        admin = basic("admin", password)
        status, body, _ = await call("POST", "/v1/auth/token", headers=admin)
        assert status == 200 and body["token_type"] == "Bearer", body
        assert body["expires_in_s"] == 60
        bearer = {"Authorization": f"Bearer {body['token']}"}
        assert (await call("GET", "/v1/status", headers=bearer))[0] == 200
        status, body2, _ = await call("POST", "/v1/auth/token", headers=bearer)
        assert status == 401, body2  # a token does not buy another
        clock.shift_us = 61 * 1_000_000
        status, body, _ = await call("GET", "/v1/status", headers=bearer)
        assert (status, body["error"]["reason"]) == (401, "expired_token")
        clock.shift_us = 0
        forged = body2 = {"Authorization": f"Bearer {bearer['Authorization'][7:-2]}xx"}
        status, body, _ = await call("GET", "/v1/status", headers=forged)
        assert (status, body["error"]["reason"]) == (401, "bad_token")
        # A password change retires the tokens issued before it.
        await call("PUT", "/v1/auth/users/admin/password", headers=admin,
                   json={"password": "new-admin-pw"})
        node.auth.store._cached = None  # noqa: SLF001
        status, body, _ = await call("GET", "/v1/status", headers=bearer)
        assert (status, body["error"]["reason"]) == (401, "bad_token"), body

    serve(scenario, capsys, token_ttl_s=60)


def test_failed_logins_are_rate_limited(capsys: pytest.CaptureFixture[str]) -> None:
    async def scenario(call: Call, node: Node, password: str, clock: ShiftedClock) -> None:
        for _ in range(3):
            status, _, _ = await call("GET", "/v1/ring", headers=basic("admin", "guess-pw"))
            assert status == 401
        status, body, headers = await call("GET", "/v1/ring", headers=basic("admin", password))
        assert (status, body["error"]["code"]) == (429, "too_many_attempts"), body
        assert int(headers["Retry-After"]) >= 1
        # Tokens come back at login_refill_per_s: then the right password works.
        deadline = clock.monotonic_s() + 10
        while (await call("GET", "/v1/ring", headers=basic("admin", password)))[0] != 200:
            assert clock.monotonic_s() < deadline, "the limit never lifted"
            await asyncio.sleep(0.05)

    serve(scenario, capsys, login_burst=3, login_refill_per_s=2.0)


def test_the_auth_routes_say_when_auth_is_off() -> None:
    config = config_from_dict({"storage": {"engine": "memory"}, "keyspaces": {
        "default": {"replication_factor": 1, "default_consistency": "ONE"}}})

    async def main() -> None:
        node = Node(config, clock=SystemClock(), standalone=True)
        await node.start()
        try:
            async with listening(node) as client:
                response = await client.post("/v1/auth/token",
                                             headers=basic("admin", "whatever"))
                body = await response.json()
                assert (response.status, body["error"]["reason"]) == (404, "auth_disabled")
                response = await client.put("/v1/kv/default/a", json={"value": 1})
                assert response.status == 200  # open: no credentials needed
        finally:
            await node.stop()

    asyncio.run(asyncio.wait_for(main(), timeout=30))


def test_a_transaction_begun_without_a_keyspace_takes_the_users_one_not_system_auth(
        capsys: pytest.CaptureFixture[str]) -> None:
    async def scenario(call: Call, node: Node, password: str, clock: ShiftedClock) -> None:
        status, began, _ = await call("POST", "/v1/txn/begin", headers=basic("admin", password))
        assert (status, began.get("keyspace")) == (200, "t"), began
        status, _, _ = await call("POST", f"/v1/txn/{began['txn_id']}/abort",
                                  headers=basic("admin", password))
        assert status == 200

    serve(scenario, capsys)


def test_a_token_from_a_rotation_newer_than_the_cache_is_checked_at_the_store(
        capsys: pytest.CaptureFixture[str]) -> None:
    """Another node rotated the secret and signed a token with it; this node's cache
    (60 s here) still holds the old secret: it reads the store once and accepts it."""
    from ringkv.auth import tokens
    from ringkv.auth.store import AuthStore

    async def scenario(call: Call, node: Node, password: str, clock: ShiftedClock) -> None:
        admin = basic("admin", password)
        assert (await call("GET", "/v1/auth/whoami", headers=admin))[0] == 200  # cached now
        assert node.auth is not None and node.auth.store.cached
        elsewhere = AuthStore(node.txn, clock, cache_ttl_s=0, timeout_s=5)  # another node's
        doc = await elsewhere.change(lambda d: d.with_rotated_secret(b"r" * 32, keep=2))
        claims = tokens.TokenClaims("admin", doc.user("admin").generation,
                                    clock.wall_us() + 60_000_000)
        token = tokens.issue(doc.secret, claims, doc.secret_generation)
        assert node.auth.store.cached  # still the old document, without the new secret
        status, body, _ = await call("GET", "/v1/auth/whoami",
                                     headers={"Authorization": f"Bearer {token}"})
        assert (status, body.get("user")) == (200, "admin"), body
        # A generation the store does not hold either is refused as any bad token.
        forged = tokens.issue(b"x" * 32, claims, doc.secret_generation + 1)
        status, body, _ = await call("GET", "/v1/auth/whoami",
                                     headers={"Authorization": f"Bearer {forged}"})
        assert (status, body["error"]["reason"]) == (401, "bad_token"), body

    serve(scenario, capsys, cache_ttl_s=60)
