"""The client-facing HTTP JSON API (aiohttp).

Handlers turn an HTTP request into an ``ApiCall`` and run the operation of
its route (``handlers.py``, which the native protocol runs too). Every
error leaves as ``{"error": {"code", "message", ...}}`` with a stable code
and status (see ``ringkv.errors``); the ``errors`` middleware is
the boundary where aiohttp's own exceptions are mapped into that shape too.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import hdrs, web

from ringkv.auth import http as auth_http
from ringkv.errors import (
    BadRequest,
    MethodNotAllowed,
    NotFound,
    RingKVError,
    TooLarge,
)
from ringkv.metrics import CONTENT_TYPE
from ringkv.server import handlers as h
from ringkv.server import idempotency
from ringkv.server import openapi
from ringkv.server import validation as v
from ringkv.server.dashboard import routes as dashboard
from ringkv.server import lease_http, watch_http
from ringkv.server.validation import KV_PREFIX
from ringkv.repair.session import parse_range
from ringkv.storage.snapshot_manifest import check_name as check_snapshot_name
from ringkv.storage.snapshot_manifest import default_name as default_snapshot_name

if TYPE_CHECKING:
    from ringkv.node import Node

log = logging.getLogger(__name__)

NODE_KEY: web.AppKey[Node] = web.AppKey("node")
IDEMPOTENCY_KEY: web.AppKey[idempotency.IdempotencyCache] = web.AppKey("idempotency")
# The API's OpenAPI document (openapi.py), encoded once: it depends on the config only.
OPENAPI_KEY: web.AppKey[bytes] = web.AppKey("openapi")


_ENCODER = json.JSONEncoder(separators=(",", ":"))


def json_response(body: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=_ENCODER.encode(body).encode(),
        status=status,
        content_type="application/json",
    )


def error_response(error: RingKVError) -> web.Response:
    response = json_response(error.to_json(), status=error.http_status)
    response.headers.update(error.http_headers())  # a 401's challenge, a 429's Retry-After
    return response


def _map_http_exception(exc: web.HTTPException, request: web.BaseRequest,
                        node: Node) -> RingKVError:
    if exc.status == 404:
        return NotFound(f"no such endpoint: {request.path}", path=request.path)
    if exc.status == 405:
        return MethodNotAllowed(
            f"method {request.method} is not allowed on {request.path}", method=request.method
        )
    if exc.status == 413:
        limit = node.config.limits.max_request_bytes
        return TooLarge(
            f"request body exceeds the limit of {limit} bytes", field="body", limit=limit
        )
    return BadRequest(exc.reason or "bad request", field="request")


CLIENT_CLOSED_STATUS = 499  # nginx's "client closed request"; never reaches a client
# When the request arrived, on the node's clock (a typed request key).
STARTED_S = web.RequestKey("ringkv.started_s", float)
SERVED_BEFORE_JOINING = h.SERVED_BEFORE_JOINING


@web.middleware
async def errors_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Map every failure to the JSON error shape, and record request metrics."""
    node = request.app[NODE_KEY]
    started = node.clock.monotonic_s()
    # The request's one deadline counts from here (Cassandra's query start time).
    request[STARTED_S] = started
    route = request.match_info.route.name or "unknown"
    try:
        h.admit(node, route)
        v.check_headers(request.raw_headers)
        v.check_query(request.query)
        await auth_http.check_request(node, request, route)
        response = await handler(request)
    except BaseException as exc:  # noqa: BLE001 - mapped (or raised again) by _failed
        response = _failed(exc, request, node)
    node.metrics.observe_request(route, h.metric_level(request.query.get("consistency")),
                                 response.status, node.clock.monotonic_s() - started)
    return response


def _failed(exc: BaseException, request: web.BaseRequest, node: Node) -> web.StreamResponse:
    """The answer to a request whose handling raised ``exc`` (the API's boundary):
    ringkv's errors and aiohttp's HTTP errors as JSON, anything else a logged 500."""
    if isinstance(exc, RingKVError):
        return error_response(exc)
    if isinstance(exc, web.HTTPException):
        if exc.status < 400:
            raise exc
        return error_response(_map_http_exception(exc, request, node))
    if not isinstance(exc, Exception):  # cancellation, and what stops the process
        raise exc
    if isinstance(exc, ConnectionError) and request.transport is None:
        # The connection is gone mid-request: the client left (the door counts it
        # as client_closed) or the door closed it. No failure of ours, and nobody
        # is left to answer.
        log.debug("the connection closed during %s %s", request.method, request.path)
        return web.Response(status=CLIENT_CLOSED_STATUS)  # never sent
    log.exception("unhandled error serving %s %s", request.method, request.path,
                  exc_info=exc)
    return json_response(
        {"error": {"code": "internal", "message": "internal server error"}}, status=500
    )


# -- the key routes, without the router ----------------------------------------

# Method -> (route name, operation, whether a body is read). These three carry
# nearly all of a node's client traffic, so they skip aiohttp's router and its
# middleware chain: ``request_handler`` tells them from the raw target alone and
# runs them here, with the same checks, errors and metrics as the middleware.
KeyRoute = tuple[str, h.Operation, bool]  # route name, operation, whether a body is read
_KEY_ROUTES: dict[str, KeyRoute] = {
    "PUT": ("put", h.put_key, True),
    "GET": ("get", h.get_key, False),
    "DELETE": ("delete", h.delete_key, True),
}
# A keyspace segment the router would match as it stands (no percent-escape to
# decode, nothing its ``{keyspace}`` pattern refuses); any other goes to the router.
_PLAIN_KEYSPACE = re.compile(r"[A-Za-z0-9_.~-]+")
Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


def key_route(method: str, raw_path: str, expect: bool) -> tuple[KeyRoute, str] | None:
    """The key route a request is for and its keyspace, from the method and raw path
    alone (``expect``: it has an Expect header); None: the router's to serve."""
    route = _KEY_ROUTES.get(method)
    if route is None or not raw_path.startswith(KV_PREFIX):
        return None
    keyspace, slash, raw_key = raw_path[len(KV_PREFIX):].partition("/")
    # The router's key pattern (``.*``) matches no newline, and an Expect
    # header wants the router's 100-continue: both stay with the router. An empty
    # key is served here too: its 400 names ``key`` (``validation.key_from_path``).
    if (not slash or "%0a" in raw_key or "%0A" in raw_key
            or not _PLAIN_KEYSPACE.fullmatch(keyspace) or expect):
        return None
    return route, keyspace


def request_handler(app: web.Application, routed: Handler) -> Handler:
    """The API's request handler: the key routes served here directly, the rest
    through ``routed`` (the application's router and middleware)."""
    node = app[NODE_KEY]
    cache = app[IDEMPOTENCY_KEY]
    clock = node.clock
    limits = node.config.limits
    metrics = node.metrics

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        raw_path = request.rel_url.raw_path
        found = key_route(request.method, raw_path, hdrs.EXPECT in request.headers)
        if found is None:
            return await routed(request)
        (name, operation, has_body), keyspace = found
        started = clock.monotonic_s()  # the request's one deadline counts from here
        try:
            h.admit(node, name)
            v.check_headers(request.raw_headers)
            v.check_query(request.query)
            principal = None
            if node.auth is not None:
                principal = await auth_http.check_http(node, name, keyspace, request.query,
                                                       b"", request.headers, request.remote)
            h.check_keyspace(node, keyspace)
            key = v.key_from_path(raw_path, limits)
            body = await request.read() if has_body and request.body_exists else b""
            call = h.ApiCall(node, started, keyspace, key, request.query, body,
                             request.headers.get(idempotency.HEADER), cache=cache,
                             principal=principal)
            if call.idempotency_key is not None:  # what a repeat must match
                call.fingerprint_method = request.method
                call.fingerprint_target = request.rel_url.raw_path_qs
            response: web.StreamResponse = _response(await operation(call))
        except BaseException as exc:  # noqa: BLE001 - mapped (or raised again) by _failed
            response = _failed(exc, request, node)
        metrics.observe_request(name, h.metric_level(request.query.get("consistency")),
                                response.status, clock.monotonic_s() - started)
        return response

    return handle


# -- the operations (``handlers.py``), from HTTP -------------------------------


def _call(request: web.Request, *, keyspace: str = "", key: bytes = b"",
          body: bytes = b"") -> h.ApiCall:
    app = request.app
    call = h.ApiCall(app[NODE_KEY], request[STARTED_S], keyspace=keyspace, key=key,
                     query=request.query, body=body,
                     idempotency_key=request.headers.get(idempotency.HEADER),
                     cache=app[IDEMPOTENCY_KEY], principal=request.get(auth_http.PRINCIPAL))
    if call.idempotency_key is not None:  # what a repeat must match
        call.fingerprint_method = request.method
        call.fingerprint_target = request.rel_url.raw_path_qs
    return call


def _response(result: h.Answer) -> web.Response:
    response = web.Response(body=result.body, status=result.status,
                            content_type="application/json")
    if result.replayed:
        response.headers[idempotency.REPLAY_HEADER] = "true"
    return response


def _key_call(request: web.Request, body: bytes = b"") -> h.ApiCall:
    node = request.app[NODE_KEY]
    return _call(request, keyspace=request.match_info["keyspace"],
                 key=v.key_from_path(request.rel_url.raw_path, node.config.limits), body=body)


async def _json_object(request: web.Request) -> dict[str, Any]:
    body = v.parse_json_body(await request.read())
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object", field="body")
    return body


async def put_key(request: web.Request) -> web.Response:
    h.check_keyspace(request.app[NODE_KEY], request.match_info["keyspace"])
    return _response(await h.put_key(_key_call(request, await request.read())))


async def get_key(request: web.Request) -> web.Response:
    h.check_keyspace(request.app[NODE_KEY], request.match_info["keyspace"])
    return _response(await h.get_key(_key_call(request)))


async def delete_key(request: web.Request) -> web.Response:
    h.check_keyspace(request.app[NODE_KEY], request.match_info["keyspace"])
    return _response(await h.delete_key(_key_call(request, await request.read())))


async def batch(request: web.Request) -> web.Response:
    return _response(await h.batch(_call(request, body=await request.read())))


async def scan(request: web.Request) -> web.Response:
    return _response(await h.scan(_call(request, keyspace=request.match_info["keyspace"])))


async def post_txn(request: web.Request) -> web.Response:
    return _response(await h.post_txn(_call(request, body=await request.read())))


async def get_txn(request: web.Request) -> web.Response:
    call = _call(request)
    call.txn_id = request.match_info["txn_id"]
    return _response(await h.get_txn(call))


def _txn_call(request: web.Request, body: bytes = b"", *, key: bool = False) -> h.ApiCall:
    """A call of an interactive transaction: ``/v1/txn/{txn_id}/...``."""
    call = _call(request, body=body)
    call.txn_id = request.match_info["txn_id"]
    if key:
        call.keyspace = request.match_info["keyspace"]
        # /v1/txn/{txn_id}/kv/{keyspace}/{key}: the key follows five segments.
        call.key = v.key_after(request.rel_url.raw_path, 5,
                               request.app[NODE_KEY].config.limits)
    return call


async def txn_begin(request: web.Request) -> web.Response:
    return _response(await h.txn_begin(_call(request, body=await request.read())))


async def txn_get(request: web.Request) -> web.Response:
    return _response(await h.txn_get(_txn_call(request, key=True)))


async def txn_put(request: web.Request) -> web.Response:
    return _response(await h.txn_put(_txn_call(request, await request.read(), key=True)))


async def txn_delete(request: web.Request) -> web.Response:
    return _response(await h.txn_delete(_txn_call(request, await request.read(), key=True)))


async def txn_commit(request: web.Request) -> web.Response:
    return _response(await h.txn_commit(_txn_call(request, await request.read())))


async def txn_abort(request: web.Request) -> web.Response:
    return _response(await h.txn_abort(_txn_call(request, await request.read())))


# -- cluster information -----------------------------------------------------


async def status(request: web.Request) -> web.Response:
    return _response(await h.status(_call(request)))


async def ring(request: web.Request) -> web.Response:
    return _response(await h.ring(_call(request)))


async def metrics(request: web.Request) -> web.Response:
    body = request.app[NODE_KEY].metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def post_repair(request: web.Request) -> web.StreamResponse:
    """Run an anti-entropy repair on this node (``ringkv repair``).

    Refusals (a repair running, a replica down, bad input) are plain JSON
    errors. Once the repair starts, the answer streams one JSON line per
    event: ``start``, one ``range`` per range done, then ``done`` with the
    report (ranges compared, ranges that differed, cells streamed).
    """
    node = request.app[NODE_KEY]
    node.require_joined()
    body = await _json_object(request) if request.can_read_body else {}
    unknown = sorted(set(body) - {"keyspace", "range"})
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r}; a repair takes keyspace and range",
                         field=unknown[0])
    keyspace = body.get("keyspace")
    if keyspace is not None and not isinstance(keyspace, str):
        raise BadRequest("keyspace must be a string", field="keyspace")
    token_range = None
    if body.get("range") is not None:
        if not isinstance(body["range"], str):
            raise BadRequest("range must be a string START:END", field="range")
        try:
            token_range = parse_range(body["range"])
        except ValueError as exc:
            raise BadRequest(str(exc), field="range") from None
    jobs = node.repair.begin(keyspace, token_range)  # claims the node, or refuses
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})

    async def emit(event: dict[str, Any]) -> None:
        try:
            await response.write(_ENCODER.encode(event).encode() + b"\n")
        except (ConnectionError, RuntimeError):
            pass  # the client went away; the repair goes on

    try:
        await response.prepare(request)
        await emit({"event": "start", "node_id": node.node_id, "ranges": len(jobs),
                    "keyspaces": sorted({job.keyspace for job in jobs})})
    except BaseException:
        node.repair.current = None  # never started: release the claim
        raise
    report = await node.repair.run(jobs, on_event=emit)
    await emit({"event": "done", **report})
    try:
        await response.write_eof()
    except (ConnectionError, RuntimeError):
        pass
    return response


async def get_repair(request: web.Request) -> web.Response:
    return json_response(request.app[NODE_KEY].repair.status())
async def decommission(request: web.Request) -> web.Response:
    """Start this node's decommission; its progress is in /v1/status ``streaming``."""
    return json_response({"node_id": request.app[NODE_KEY].node_id,
                          "streaming": request.app[NODE_KEY].decommission()}, status=202)


async def removenode(request: web.Request) -> web.Response:
    """Remove a dead node (body ``{"node_id": ...}``), coordinated by this node;
    progress is in /v1/status ``streaming``."""
    body = await _json_object(request)
    v.check_fields(body, ("node_id",), what="a removenode")
    dead = body.get("node_id")
    if not isinstance(dead, str) or not dead:
        raise BadRequest('the body must be {"node_id": "<the dead node\'s id>"}',
                         field="node_id")
    node = request.app[NODE_KEY]
    return json_response({"node_id": node.node_id, "streaming": node.removenode(dead)},
                         status=202)


async def openapi_document(request: web.Request) -> web.Response:
    return web.Response(body=request.app[OPENAPI_KEY], content_type="application/json")


# -- snapshots -----------------------------------------------------------------


async def snapshot_create(request: web.Request) -> web.Response:
    """Take a snapshot of this node (body ``{"name": ...}``, the name optional);
    answers 201 with its manifest once it is on disk."""
    node = request.app[NODE_KEY]
    body = await _json_object(request) if request.can_read_body else {}
    unknown = sorted(set(body) - {"name"})
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r}; a snapshot takes a name",
                         field=unknown[0])
    name = body.get("name")
    if name is None:
        name = default_snapshot_name(node.clock.wall_us())
    manifest = await node.snapshots.create(check_snapshot_name(name))
    return json_response(manifest.to_json(), status=201)


async def snapshot_list(request: web.Request) -> web.Response:
    node = request.app[NODE_KEY]
    return json_response({"node_id": node.node_id, "running": node.snapshots.running,
                          "snapshots": node.snapshots.list()})


async def snapshot_delete(request: web.Request) -> web.Response:
    node = request.app[NODE_KEY]
    name = check_snapshot_name(request.match_info["name"])
    await node.snapshots.delete(name)
    return json_response({"node_id": node.node_id, "deleted": name})


async def health(request: web.Request) -> web.Response:
    return _response(await h.health(_call(request)))


def build_app(node: Node, cache: idempotency.IdempotencyCache | None = None
              ) -> web.Application:
    """The HTTP API of ``node``; ``cache``: the idempotency cache it shares with the
    node's other front ends (a new one when None)."""
    app = web.Application(
        middlewares=[errors_middleware], client_max_size=node.config.limits.max_request_bytes
    )
    app[NODE_KEY] = node
    app[IDEMPOTENCY_KEY] = cache or idempotency.IdempotencyCache(node.clock)
    # ``.*``: an empty key reaches the handler, whose 400 names ``key`` (not a 404).
    key_path = "/v1/kv/{keyspace}/{key:.*}"
    app.router.add_put(key_path, put_key, name="put")
    app.router.add_get(key_path, get_key, name="get", allow_head=False)
    app.router.add_delete(key_path, delete_key, name="delete")
    app.router.add_get("/v1/kv/{keyspace}", scan, name="scan", allow_head=False)
    app.router.add_post("/v1/batch", batch, name="batch")
    app.router.add_post("/v1/txn", post_txn, name="txn")
    app.router.add_get("/v1/txn/{txn_id}", get_txn, name="txn_status", allow_head=False)
    # Interactive transactions: begun here, their calls come back to this node.
    app.router.add_post("/v1/txn/begin", txn_begin, name="txn_begin")
    txn_key_path = "/v1/txn/{txn_id}/kv/{keyspace}/{key:.*}"
    app.router.add_get(txn_key_path, txn_get, name="txn_get", allow_head=False)
    app.router.add_put(txn_key_path, txn_put, name="txn_put")
    app.router.add_delete(txn_key_path, txn_delete, name="txn_delete")
    app.router.add_post("/v1/txn/{txn_id}/commit", txn_commit, name="txn_commit")
    app.router.add_post("/v1/txn/{txn_id}/abort", txn_abort, name="txn_abort")
    app.router.add_get("/v1/status", status, name="status", allow_head=False)
    app.router.add_get("/v1/ring", ring, name="ring", allow_head=False)
    app.router.add_get("/v1/health", health, name="health", allow_head=False)
    app.router.add_post("/v1/decommission", decommission, name="decommission")
    app.router.add_post("/v1/removenode", removenode, name="removenode")
    app.router.add_get("/metrics", metrics, name="metrics", allow_head=False)
    app.router.add_post("/v1/admin/repair", post_repair, name="repair")
    app.router.add_get("/v1/admin/repair", get_repair, name="repair_status", allow_head=False)
    app.router.add_post("/v1/snapshots", snapshot_create, name="snapshot_create")
    app.router.add_get("/v1/snapshots", snapshot_list, name="snapshot_list", allow_head=False)
    app.router.add_delete("/v1/snapshots/{name}", snapshot_delete, name="snapshot_delete")
    app[OPENAPI_KEY] = _ENCODER.encode(openapi.build_spec(node.config.limits)).encode()
    app.router.add_get(openapi.PATH, openapi_document, name="openapi", allow_head=False)
    auth_http.add_routes(app, node)
    dashboard.add_routes(app, node)  # /ui and /v1/dashboard/*
    watch_http.add_routes(app, node)
    lease_http.add_routes(app, node)  # /v1/lease
    return app
