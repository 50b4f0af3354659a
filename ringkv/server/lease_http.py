"""``/v1/lease``: session leases on a transactional keyspace, over HTTP (shell).

``POST /v1/lease`` ``{"ttl": s, "keyspace"?}`` grants one;
``POST /v1/lease/{id}/keepalive`` renews it; ``DELETE /v1/lease/{id}`` revokes
it (its keys go at once); ``GET /v1/lease/{id}`` shows its remaining TTL and
its keys. A put attaches a key with ``"lease": id`` in its body
(``handlers.py``). What each does is ``txn/lease_service.py``'s; this module
parses and answers. A lease id names its keyspace (``<keyspace>:<tag>``), and
the caller needs write permission on it (read, to look at it): checked here,
once the keyspace is known, since it is in the body or the id, not the path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aiohttp import web

from ringkv.auth.http import PRINCIPAL
from ringkv.errors import BadRequest
from ringkv.server import validation as v
from ringkv.txn import leases as L

if TYPE_CHECKING:
    from ringkv.node import Node

_GRANT_FIELDS = ("ttl", "keyspace")


def _authorize(request: web.Request, node: Node, route: str, keyspace: str) -> None:
    if node.auth is not None:
        node.auth.authorize(request[PRINCIPAL], route, keyspace, {}, b"")  # logged in already


def _json(body: Any, status: int = 200) -> web.Response:
    return web.json_response(body, status=status)


def add_routes(app: web.Application, node: Node) -> None:
    def lease(request: web.Request, route: str) -> L.LeaseId:
        lease_id = L.parse_id(request.match_info["lease"], field="id")
        node.leases.keyspace(lease_id.keyspace)
        _authorize(request, node, route, lease_id.keyspace)
        return lease_id

    async def grant(request: web.Request) -> web.Response:
        raw = await request.read()
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
        _authorize(request, node, "lease_grant", keyspace)
        return _json(await node.leases.grant(keyspace, ttl_s, node.clock.monotonic_s()))

    async def keepalive(request: web.Request) -> web.Response:
        lease_id = lease(request, "lease_keepalive")
        return _json(await node.leases.keepalive(lease_id, node.clock.monotonic_s()))

    async def revoke(request: web.Request) -> web.Response:
        lease_id = lease(request, "lease_revoke")
        return _json(await node.leases.revoke(lease_id, node.clock.monotonic_s()))

    async def show(request: web.Request) -> web.Response:
        lease_id = lease(request, "lease_get")
        return _json(await node.leases.show(lease_id, node.clock.monotonic_s()))

    app.router.add_post("/v1/lease", grant, name="lease_grant")
    app.router.add_post("/v1/lease/{lease}/keepalive", keepalive, name="lease_keepalive")
    app.router.add_delete("/v1/lease/{lease}", revoke, name="lease_revoke")
    app.router.add_get("/v1/lease/{lease}", show, name="lease_get", allow_head=False)
