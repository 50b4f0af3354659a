"""``/v1/lease``: session leases on a transactional keyspace, over HTTP (shell).

``POST /v1/lease`` ``{"ttl": s, "keyspace"?}`` grants one;
``POST /v1/lease/{id}/keepalive`` renews it; ``DELETE /v1/lease/{id}`` revokes
it (its keys go at once); ``GET /v1/lease/{id}`` shows its remaining TTL and
its keys. A put attaches a key with ``"lease": id`` in its body
(``handlers.py``). What each does is ``txn/lease_service.py``'s; this module
parses and answers, for HTTP and for the native protocol (its ``lease_*``
operations call ``grant``, ``keepalive``, ``revoke`` and ``show`` below). A
lease id names its keyspace (``<keyspace>:<tag>``), and the caller needs
write permission on it (read, to look at it): checked here, once the
keyspace is known, since it is in the body or the id, not the path.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from ringkv.auth.http import PRINCIPAL
from ringkv.errors import BadRequest
from ringkv.server import validation as v
from ringkv.txn import leases as L

if TYPE_CHECKING:
    from ringkv.node import Node

_GRANT_FIELDS = ("ttl", "keyspace")
# Checks that the caller may call ``route`` on ``keyspace`` (auth.enabled), each front
# end with its own principal: HTTP's request's, the native connection's.
Authorize = Callable[[str, str], Awaitable[None]]


async def grant(node: Node, raw: bytes, authorize: Authorize) -> dict[str, Any]:
    """Grant a lease: ``raw`` is the JSON body ``{"ttl": s, "keyspace"?}``."""
    body = v.parse_json_body(raw) if raw.strip() else {}
    if not isinstance(body, dict):
        raise BadRequest("the body of a lease grant is a JSON object", field="body")
    v.check_fields(body, _GRANT_FIELDS, what="a lease grant")
    if "ttl" not in body:
        raise BadRequest('a lease grant needs "ttl" (seconds)', field="ttl")
    ttl_s = L.check_ttl(body["ttl"], node.config.txn.max_lease_ttl_s)
    named = body.get("keyspace")
    if named is not None and not isinstance(named, str):
        raise BadRequest("keyspace must be a string", field="keyspace")
    keyspace = node.leases.keyspace(named)
    await authorize("lease_grant", keyspace)
    result: dict[str, Any] = await node.leases.grant(keyspace, ttl_s, node.clock.monotonic_s())
    return result


async def _lease(node: Node, raw_id: str, route: str, authorize: Authorize) -> L.LeaseId:
    lease_id = L.parse_id(raw_id, field="id")
    node.leases.keyspace(lease_id.keyspace)
    await authorize(route, lease_id.keyspace)
    return lease_id


async def keepalive(node: Node, raw_id: str, authorize: Authorize) -> dict[str, Any]:
    lease_id = await _lease(node, raw_id, "lease_keepalive", authorize)
    result: dict[str, Any] = await node.leases.keepalive(lease_id, node.clock.monotonic_s())
    return result


async def revoke(node: Node, raw_id: str, authorize: Authorize) -> dict[str, Any]:
    lease_id = await _lease(node, raw_id, "lease_revoke", authorize)
    result: dict[str, Any] = await node.leases.revoke(lease_id, node.clock.monotonic_s())
    return result


async def show(node: Node, raw_id: str, authorize: Authorize) -> dict[str, Any]:
    lease_id = await _lease(node, raw_id, "lease_get", authorize)
    result: dict[str, Any] = await node.leases.show(lease_id, node.clock.monotonic_s())
    return result


def add_routes(app: web.Application, node: Node) -> None:
    def authorizer(request: web.Request) -> Authorize:
        async def authorize(route: str, keyspace: str) -> None:
            if node.auth is not None:  # logged in already, by the middleware
                node.auth.authorize(request[PRINCIPAL], route, keyspace, {}, b"")
        return authorize

    async def grant_route(request: web.Request) -> web.Response:
        return web.json_response(await grant(node, await request.read(), authorizer(request)))

    async def keepalive_route(request: web.Request) -> web.Response:
        return web.json_response(await keepalive(node, request.match_info["lease"],
                                                 authorizer(request)))

    async def revoke_route(request: web.Request) -> web.Response:
        return web.json_response(await revoke(node, request.match_info["lease"],
                                              authorizer(request)))

    async def show_route(request: web.Request) -> web.Response:
        return web.json_response(await show(node, request.match_info["lease"],
                                            authorizer(request)))

    app.router.add_post("/v1/lease", grant_route, name="lease_grant")
    app.router.add_post("/v1/lease/{lease}/keepalive", keepalive_route, name="lease_keepalive")
    app.router.add_delete("/v1/lease/{lease}", revoke_route, name="lease_revoke")
    app.router.add_get("/v1/lease/{lease}", show_route, name="lease_get", allow_head=False)
