"""Authentication over HTTP (shell): the one check both request paths call, and
the ``/v1/auth`` routes.

``check_http`` is the check: ``api.request_handler``'s key-route fast path
calls it with what it parsed, and ``errors_middleware`` (every other route)
calls ``check_request``, which finds the keyspace in the route's path, query
or body and calls it too. With ``auth.enabled`` false both return at once.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

from aiohttp import hdrs, web

from ringkv.auth import passwords
from ringkv.auth.permissions import Principal, parse_grant
from ringkv.auth.service import AuthService
from ringkv.auth.users import AuthDoc, check_name
from ringkv.errors import BadRequest, NotFound

if TYPE_CHECKING:
    from ringkv.node import Node

PRINCIPAL = web.RequestKey("ringkv.principal", Principal)
# Routes whose keyspace is in the body: the check reads it (aiohttp keeps it for the handler).
_BODY_ROUTES = frozenset({"batch", "txn", "txn_begin"})
_ENCODER = json.JSONEncoder(separators=(",", ":"))


async def check_http(node: Node, route: str, keyspace: str, query: Mapping[str, str],
                     body: bytes, headers: Mapping[str, str], peer: str | None
                     ) -> Principal | None:
    """Authenticate and authorize one HTTP request, or raise the typed error (401, 403, 429)."""
    auth = node.auth
    if auth is None:
        return None
    return await auth.check(route, keyspace, query, body, headers.get(hdrs.AUTHORIZATION),
                            peer or "unknown")


async def check_request(node: Node, request: web.Request, route: str) -> None:
    """``check_http`` for a routed request; its principal is kept on the request."""
    if node.auth is None:
        return
    keyspace = request.match_info.get("keyspace", "")
    if route not in _BODY_ROUTES:
        principal = await check_http(node, route, keyspace, request.query, b"", request.headers,
                                     request.remote)
    else:  # who it is first: a stranger's body is not read
        principal = await node.auth.authenticate(request.headers.get(hdrs.AUTHORIZATION),
                                                 request.remote or "unknown")
        body = await request.read() if request.body_exists else b""
        node.auth.authorize(principal, route, keyspace, request.query, body)
    if principal is not None:
        request[PRINCIPAL] = principal


# -- the /v1/auth routes ---------------------------------------------------------------


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=_ENCODER.encode(body).encode(), status=status,
                        content_type="application/json")


async def _object(request: web.Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.read() or b"{}")
    except (ValueError, RecursionError):
        raise BadRequest("request body is not valid JSON", field="body") from None
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object", field="body")
    return body


def _password(body: Mapping[str, Any]) -> str:
    password = body.get("password")
    problem = passwords.check_password(password)
    if problem is not None:
        raise BadRequest(problem, field="password")
    assert isinstance(password, str)
    return password


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def add_routes(app: web.Application, node: Node) -> None:
    """Register ``/v1/auth``; without ``auth.enabled`` each answers 404 saying so."""

    def service() -> AuthService:
        if node.auth is None:
            raise NotFound("authentication is not enabled on this node (auth.enabled)",
                           reason="auth_disabled")
        return node.auth

    async def token(request: web.Request) -> web.Response:
        answer = await service().issue_token(request.headers.get(hdrs.AUTHORIZATION),
                                             request.remote or "unknown")
        return _json(answer)

    async def whoami(request: web.Request) -> web.Response:
        service()
        principal = request[PRINCIPAL]
        return _json({"user": principal.name, "grants": sorted(principal.grants)})

    async def users(request: web.Request) -> web.Response:
        auth = service()
        auth.may_manage(request[PRINCIPAL], "", "admin")
        doc = await auth.store.current()
        return _json({"users": [] if doc is None else doc.listing()})

    async def add_user(request: web.Request) -> web.Response:
        auth = service()
        auth.may_manage(request[PRINCIPAL], "", "admin")
        body = await _object(request)
        name = check_name(body.get("name"))
        grants = body.get("grants", [])
        if not isinstance(grants, list):
            raise BadRequest("grants must be a list of {permission, keyspace}", field="grants")
        parsed = [parse_grant(g.get("permission"), g.get("keyspace")) if isinstance(g, dict)
                  else parse_grant(None, None) for g in grants]
        hashed = await auth.hash(_password(body))
        doc = await auth.store.change(lambda d: d.with_user(name, hashed, parsed))
        return _json({"ok": True, "user": name, "grants": sorted(doc.user(name).grants)},
                     status=201)

    async def delete_user(request: web.Request) -> web.Response:
        auth = service()
        auth.may_manage(request[PRINCIPAL], "", "admin")
        name = check_name(request.match_info["name"])
        if name == request[PRINCIPAL].name:
            raise BadRequest("a user cannot remove itself", field="name")
        await auth.store.change(lambda d: d.without_user(name))
        return _json({"ok": True, "user": name})

    async def passwd(request: web.Request) -> web.Response:
        auth = service()
        name = check_name(request.match_info["name"])
        auth.may_manage(request[PRINCIPAL], name, None)
        hashed = await auth.hash(_password(await _object(request)))
        await auth.store.change(lambda d: d.with_password(name, hashed))
        return _json({"ok": True, "user": name})

    def grant_route(adding: bool) -> Handler:
        async def handle(request: web.Request) -> web.Response:
            auth = service()
            name = check_name(request.match_info["name"])
            body = await _object(request)
            grant = parse_grant(body.get("permission"), body.get("keyspace"))
            auth.may_manage(request[PRINCIPAL], name, grant)

            def edit(doc: AuthDoc) -> AuthDoc:
                return (doc.with_grants(name, add=[grant]) if adding
                        else doc.with_grants(name, remove=[grant]))

            doc = await auth.store.change(edit)
            return _json({"ok": True, "user": name, "grants": sorted(doc.user(name).grants)})
        return handle

    async def rotate_secret(request: web.Request) -> web.Response:
        auth = service()
        auth.may_manage(request[PRINCIPAL], "", "admin")
        if await request.read():
            raise BadRequest("this call takes no body", field="body")
        return _json(await auth.rotate_secret())

    app.router.add_post("/v1/auth/token", token, name="auth_token")
    app.router.add_post("/v1/auth/secret/rotate", rotate_secret, name="auth_secret_rotate")
    app.router.add_get("/v1/auth/whoami", whoami, name="auth_whoami", allow_head=False)
    app.router.add_get("/v1/auth/users", users, name="auth_users", allow_head=False)
    app.router.add_post("/v1/auth/users", add_user, name="auth_user_add")
    app.router.add_delete("/v1/auth/users/{name}", delete_user, name="auth_user_delete")
    app.router.add_put("/v1/auth/users/{name}/password", passwd, name="auth_passwd")
    app.router.add_post("/v1/auth/users/{name}/grants", grant_route(True), name="auth_grant")
    app.router.add_delete("/v1/auth/users/{name}/grants", grant_route(False), name="auth_revoke")
