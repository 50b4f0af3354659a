"""The client-facing HTTP JSON API (aiohttp).

Handlers only parse and validate input, call the coordinator, and render
JSON. Every error leaves as ``{"error": {"code", "message", ...}}`` with a
stable code and status (see ``ringkv.errors``); the ``errors`` middleware is
the boundary where aiohttp's own exceptions are mapped into that shape too.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import TYPE_CHECKING, Any

from aiohttp import web

from ringkv.errors import (
    BadRequest,
    MethodNotAllowed,
    NotFound,
    RingKVError,
    ShuttingDown,
    TooLarge,
)
from ringkv.metrics import CONTENT_TYPE
from ringkv.quorum import ConsistencyLevel
from ringkv.server import idempotency
from ringkv.server import validation as v
from ringkv.repair.session import parse_range
from ringkv.server.status import cluster_status, ring_view
from ringkv.server import txn_validation as tv
from ringkv.txn.requests import Condition, TxnRequest, Write
from ringkv.txn.service import Op
from ringkv.versioning import Cell

if TYPE_CHECKING:
    from ringkv.node import Node

log = logging.getLogger(__name__)

NODE_KEY: web.AppKey[Node] = web.AppKey("node")
IDEMPOTENCY_KEY: web.AppKey[idempotency.IdempotencyCache] = web.AppKey("idempotency")
BATCH_OPS = ("put", "get", "delete")


_ENCODER = json.JSONEncoder(separators=(",", ":"))


def json_response(body: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=_ENCODER.encode(body).encode(),
        status=status,
        content_type="application/json",
    )


def error_response(error: RingKVError) -> web.Response:
    return json_response(error.to_json(), status=error.http_status)


def _map_http_exception(exc: web.HTTPException, request: web.Request) -> RingKVError:
    if exc.status == 404:
        return NotFound(f"no such endpoint: {request.path}", path=request.path)
    if exc.status == 405:
        return MethodNotAllowed(
            f"method {request.method} is not allowed on {request.path}", method=request.method
        )
    if exc.status == 413:
        limit = request.app[NODE_KEY].config.limits.max_request_bytes
        return TooLarge(
            f"request body exceeds the limit of {limit} bytes", field="body", limit=limit
        )
    return BadRequest(exc.reason or "bad request", field="request")


CLIENT_CLOSED_STATUS = 499  # nginx's "client closed request"; never reaches a client
# When the request arrived, on the node's clock (a typed request key).
STARTED_S = web.RequestKey("ringkv.started_s", float)
# What a node that is not on the ring yet still answers: how it sees the
# cluster and why it has not joined. Everything else (data, and health, so
# that load balancers and tools wait) gets 503 not_joined.
SERVED_BEFORE_JOINING = frozenset({"status", "ring", "metrics"})


@web.middleware
async def errors_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Map every failure to the JSON error shape, and record request metrics."""
    node = request.app[NODE_KEY]
    started = node.clock.monotonic_s()
    # The request's one deadline counts from here (Cassandra's query start time).
    request[STARTED_S] = started
    route = request.match_info.route.name or "unknown"
    level = _metric_level(request.query.get("consistency"))
    try:
        if node.draining:
            raise ShuttingDown("the node is shutting down")
        if route not in SERVED_BEFORE_JOINING:
            node.require_joined()
        v.check_headers(request.raw_headers)
        response = await handler(request)
    except RingKVError as exc:
        response = error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = error_response(_map_http_exception(exc, request))
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - the boundary: log it, never crash the node
        if isinstance(exc, ConnectionError) and request.transport is None:
            # The connection is gone mid-request: the client left (the door counts it
            # as client_closed) or the door closed it. No failure of ours, and nobody
            # is left to answer.
            log.debug("the connection closed during %s %s", request.method, request.path)
            return web.Response(status=CLIENT_CLOSED_STATUS)  # never sent
        log.exception("unhandled error serving %s %s", request.method, request.path)
        response = json_response(
            {"error": {"code": "internal", "message": "internal server error"}}, status=500
        )
    node.metrics.observe_request(route, level, response.status, node.clock.monotonic_s() - started)
    return response


_LEVEL_NAMES = frozenset(level.value for level in ConsistencyLevel)


def _metric_level(text: str | None) -> str:
    """A bounded label value: clients must not be able to mint new time series."""
    if not text:
        return "default"
    upper = text.upper()
    return upper if upper in _LEVEL_NAMES else "invalid"


# -- single keys -------------------------------------------------------------


def _cell_json(key: bytes, cell: Cell, receipt: dict[str, Any] | None) -> bytes:
    """Render a cell without decoding and re-encoding its (canonical JSON) value."""
    head: dict[str, Any] = {"key": key.decode(), "timestamp": cell.ts.to_json()}
    if cell.expires_at_us is not None:
        head["expires_at_us"] = cell.expires_at_us
    if receipt is not None:
        head["receipt"] = receipt
    encoded = _ENCODER.encode(head).encode()
    return encoded[:-1] + b',"value":' + cell.value + b"}"


async def _json_object(request: web.Request) -> dict[str, Any]:
    body = v.parse_json_body(await request.read())
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object", field="body")
    return body


def _keyspace(request: web.Request) -> str:
    name = request.match_info["keyspace"]
    request.app[NODE_KEY].coordinator.keyspace(name)  # raises NotFound
    return name


def _deduplicated(handler: Any) -> Any:
    """Run a write handler once per ``Idempotency-Key``; repeats get the first response."""

    async def wrapper(request: web.Request) -> web.Response:
        raw_key = request.headers.get(idempotency.HEADER)
        if raw_key is None:
            return await handler(request)
        key = idempotency.check_key(raw_key)
        fingerprint = idempotency.fingerprint(
            request.method, request.rel_url.raw_path_qs, await request.read()
        )

        async def execute() -> idempotency.StoredResponse:
            response = await handler(request)
            return idempotency.StoredResponse(
                response.status, bytes(response.body), response.content_type
            )

        stored, replayed = await request.app[IDEMPOTENCY_KEY].run(key, fingerprint, execute)
        response = web.Response(
            body=stored.body, status=stored.status, content_type=stored.content_type
        )
        if replayed:
            response.headers[idempotency.REPLAY_HEADER] = "true"
        return response

    wrapper.__name__ = handler.__name__
    wrapper.__doc__ = handler.__doc__
    return wrapper


@_deduplicated
async def put_key(request: web.Request) -> web.Response:
    node = request.app[NODE_KEY]
    keyspace = _keyspace(request)
    key = v.key_from_path(request.rel_url.raw_path, node.config.limits)
    body = await _json_object(request)
    if "value" not in body:
        raise BadRequest('body must have a "value" field', field="value")
    value = v.value_bytes(body["value"], node.config.limits, field="value")
    if _transactional(node, keyspace):
        return await _txn_write(request, keyspace, key, value, body)
    _no_condition(body, keyspace)
    ttl = v.ttl_s(body.get("ttl", request.query.get("ttl")), field="ttl")
    level = v.consistency(request.query.get("consistency"), write=True)
    result = await node.put(keyspace, key, value, ttl, level, started_s=request[STARTED_S])
    return json_response(
        {"ok": True, "timestamp": result.cell.ts.to_json(), "receipt": result.receipt.to_json()}
    )


async def get_key(request: web.Request) -> web.Response:
    node = request.app[NODE_KEY]
    keyspace = _keyspace(request)
    key = v.key_from_path(request.rel_url.raw_path, node.config.limits)
    if _transactional(node, keyspace):
        return await _txn_get(request, keyspace, key)
    for name in ("snapshot_ts", "max_staleness_ms"):
        if name in request.query:
            raise BadRequest(f"{name} needs a transactional keyspace; {keyspace!r} is eventual",
                             field=name)
    if request.query.get("local", "").lower() in ("1", "true", "yes"):
        cell = node.read_local(keyspace, key)
        receipt = None
    else:
        level = v.consistency(request.query.get("consistency"), write=False)
        result = await node.get(keyspace, key, level, started_s=request[STARTED_S])
        cell, receipt = result.cell, result.receipt.to_json()
    if cell is None or not cell.is_live(node.clock.wall_us()):
        raise NotFound(f"key {key.decode()!r} not found in {keyspace!r}", receipt=receipt)
    return web.Response(body=_cell_json(key, cell, receipt), content_type="application/json")


@_deduplicated
async def delete_key(request: web.Request) -> web.Response:
    node = request.app[NODE_KEY]
    keyspace = _keyspace(request)
    key = v.key_from_path(request.rel_url.raw_path, node.config.limits)
    body = await _json_object(request) if await request.read() else {}
    if _transactional(node, keyspace):
        return await _txn_write(request, keyspace, key, None, body)
    _no_condition(body, keyspace)
    level = v.consistency(request.query.get("consistency"), write=True)
    result = await node.delete(keyspace, key, level, started_s=request[STARTED_S])
    return json_response(
        {"ok": True, "timestamp": result.cell.ts.to_json(), "receipt": result.receipt.to_json()}
    )


# -- batches and scans -------------------------------------------------------


@_deduplicated
async def batch(request: web.Request) -> web.Response:
    """Several independent operations in one request (not atomic, like an unlogged batch)."""
    node = request.app[NODE_KEY]
    limits = node.config.limits
    body = await _json_object(request)
    ops = body.get("ops")
    if not isinstance(ops, list) or not ops:
        raise BadRequest('"ops" must be a non-empty list', field="ops")
    if len(ops) > limits.max_batch_ops:
        raise TooLarge(
            f"batch has {len(ops)} operations; the limit is {limits.max_batch_ops}",
            field="ops",
            limit=limits.max_batch_ops,
            size=len(ops),
        )
    default_level = request.query.get("consistency")
    # Validate everything before running anything, so a bad op fails the
    # whole request instead of leaving half of it applied.
    planned = [_plan_batch_op(node, i, op, default_level) for i, op in enumerate(ops)]
    results = await asyncio.gather(*(_run_batch_op(node, op) for op in planned))
    return json_response({"results": results})


def _plan_batch_op(node: Node, index: int, op: Any, default_level: str | None) -> dict[str, Any]:
    where = f"ops[{index}]"
    if not isinstance(op, dict):
        raise BadRequest("each operation must be a JSON object", field=where)
    kind = op.get("op")
    if kind not in BATCH_OPS:
        raise BadRequest(f"op must be one of {', '.join(BATCH_OPS)}", field=f"{where}.op")
    keyspace = op.get("keyspace", "default")
    if not isinstance(keyspace, str):
        raise BadRequest("keyspace must be a string", field=f"{where}.keyspace")
    node.coordinator.keyspace(keyspace)
    if _transactional(node, keyspace):
        raise BadRequest(f"keyspace {keyspace!r} is transactional: a batch is not atomic; use "
                         "POST /v1/txn", field=f"{where}.keyspace")
    planned = {
        "op": kind,
        "keyspace": keyspace,
        "key": v.key_from_json(op.get("key"), node.config.limits, field=f"{where}.key"),
        "consistency": v.consistency(
            op.get("consistency", default_level), write=kind != "get", field=f"{where}.consistency"
        ),
    }
    if kind == "put":
        if "value" not in op:
            raise BadRequest('a put needs a "value"', field=f"{where}.value")
        planned["value"] = v.value_bytes(op["value"], node.config.limits, field=f"{where}.value")
        planned["ttl"] = v.ttl_s(op.get("ttl"), field=f"{where}.ttl")
    return planned


async def _run_batch_op(node: Node, op: dict[str, Any]) -> dict[str, Any]:
    key: bytes = op["key"]
    try:
        if op["op"] == "put":
            result = await node.put(op["keyspace"], key, op["value"], op["ttl"], op["consistency"])
            return {"ok": True, "key": key.decode(), "timestamp": result.cell.ts.to_json()}
        if op["op"] == "delete":
            result = await node.delete(op["keyspace"], key, op["consistency"])
            return {"ok": True, "key": key.decode(), "timestamp": result.cell.ts.to_json()}
        read = await node.get(op["keyspace"], key, op["consistency"])
        cell = read.cell
        if cell is None or not cell.is_live(node.clock.wall_us()):
            return {"ok": True, "key": key.decode(), "found": False}
        return {
            "ok": True,
            "key": key.decode(),
            "found": True,
            "value": cell.json_value(),
            "timestamp": cell.ts.to_json(),
        }
    except RingKVError as exc:
        return {"ok": False, "key": key.decode(), **exc.to_json()}


async def scan(request: web.Request) -> web.Response:
    node = request.app[NODE_KEY]
    keyspace = _keyspace(request)
    if _transactional(node, keyspace):
        raise BadRequest(f"keyspace {keyspace!r} is transactional: scans of it are not served "
                         "yet", field="keyspace")
    limit = v.bounded_int(
        request.query.get("limit"),
        field="limit",
        low=1,
        high=node.config.limits.max_scan_page,
        default=min(100, node.config.limits.max_scan_page),
    )
    after = v.decode_page_token(request.query.get("page_token"))
    level = v.consistency(request.query.get("consistency"), write=False)
    page = await node.coordinator.scan(keyspace, after, limit, level)
    items = [
        {"key": key.decode(), "value": cell.json_value(), "timestamp": cell.ts.to_json()}
        for _token, key, cell in page.items
    ]
    return json_response(
        {
            "items": items,
            "next_page_token": v.encode_page_token(page.next_after),
            "receipt": page.receipt.to_json(),
        }
    )


# -- the transactional tier -------------------------------------------------


def _transactional(node: Node, keyspace: str) -> bool:
    return keyspace in node.txn.keyspaces


def _no_condition(body: dict[str, Any], keyspace: str) -> None:
    if "if" in body:
        raise BadRequest(f'a condition ("if") needs a transactional keyspace; {keyspace!r} is '
                         "eventual", field="if")


def _serial(request: web.Request) -> None:
    """SERIAL (the default) is the only level of a transactional keyspace."""
    level = request.query.get("consistency")
    if level and level.upper() != ConsistencyLevel.SERIAL.value:
        raise BadRequest(f"consistency {level!r} is an eventual level; a transactional keyspace "
                         "is SERIAL only", field="consistency")


def _txn_timeout_s(node: Node) -> float:
    return node.config.timing.write_timeout_ms / 1000


def _json_value(raw: Any) -> Any:
    return None if raw is None else json.loads(raw)


def _txn_reads(reads: Any) -> list[dict[str, Any]]:
    return [{"key": bytes(r["key"]).decode(), "found": r["value"] is not None,
             "value": _json_value(r["value"]), "version": r["version"]} for r in reads or ()]


async def _txn_write(request: web.Request, keyspace: str, key: bytes, value: bytes | None,
                     body: dict[str, Any]) -> web.Response:
    node = request.app[NODE_KEY]
    _serial(request)
    unknown = sorted(set(body) - {"value", "if", "id"})
    if unknown or "ttl" in request.query:
        name = unknown[0] if unknown else "ttl"
        raise BadRequest(f"{name!r} is not accepted on a transactional keyspace", field=name)
    if value is None and "value" in body:
        raise BadRequest("a delete takes no value", field="value")
    conditions: tuple[Condition, ...] = ()
    if "if" in body:
        conditions = (tv.parse_condition(body["if"], key, node.config.limits, field="if"),)
    txn_id = body.get("id")
    if txn_id is not None and (not isinstance(txn_id, str) or not tv.TXN_ID.match(txn_id)):
        raise BadRequest("id must be 1-64 characters of letters, digits and . _ : -", field="id")
    txn = TxnRequest(keyspace, txn_id, (), conditions, (Write(key, value),))
    result = await node.txn.execute(Op("txn", keyspace, txn), started_s=request[STARTED_S],
                                    timeout_s=_txn_timeout_s(node))
    return json_response({"ok": True, "id": result["id"], "version": result["commit_ts"],
                          "commit_ts": result["commit_ts"], "receipt": result.get("receipt")})


def _query_int(request: web.Request, name: str, high: int) -> int | None:
    if name not in request.query:
        return None
    return v.bounded_int(request.query[name], field=name, low=0, high=high, default=0)


async def _txn_get(request: web.Request, keyspace: str, key: bytes) -> web.Response:
    node = request.app[NODE_KEY]
    _serial(request)
    snapshot_ts = _query_int(request, "snapshot_ts", 2**63 - 1)
    staleness_ms = _query_int(request, "max_staleness_ms", 86_400_000)
    if snapshot_ts is not None and staleness_ms is not None:
        raise BadRequest("give snapshot_ts or max_staleness_ms, not both", field="snapshot_ts")
    if snapshot_ts is not None or staleness_ms is not None:
        op = Op("snapshot_get", keyspace, key=key, snapshot_ts_us=snapshot_ts,
                max_staleness_ms=staleness_ms)
        result = await node.txn.execute(op, started_s=request[STARTED_S],
                                        timeout_s=node.config.timing.read_timeout_ms / 1000)
        return _versioned_json(key, result["value"], result["version"], result["receipt"])
    result = await node.txn.execute(Op("get", keyspace, key=key), started_s=request[STARTED_S],
                                    timeout_s=node.config.timing.read_timeout_ms / 1000)
    read = result["reads"][0]
    if read["value"] is None:
        raise NotFound(f"key {key.decode()!r} not found in {keyspace!r}",
                       receipt=result["receipt"])
    return _versioned_json(key, read["value"], read["version"], result["receipt"])


def _versioned_json(key: bytes, value: bytes, version: int, receipt: Any) -> web.Response:
    """A transactional read's answer; the stored value is canonical JSON already, so it is
    spliced in rather than decoded and encoded again (as ``_cell_json`` does)."""
    head = _ENCODER.encode({"key": key.decode(), "version": version, "receipt": receipt})
    return web.Response(body=head.encode()[:-1] + b',"value":' + bytes(value) + b"}",
                        content_type="application/json")


@_deduplicated
async def post_txn(request: web.Request) -> web.Response:
    """A one-shot transaction in one range: reads, conditions and writes at one timestamp."""
    node = request.app[NODE_KEY]
    body = v.parse_json_body(await request.read())
    txn = tv.parse_txn(body, node.config.limits)
    node.coordinator.keyspace(txn.keyspace)  # raises NotFound
    if not _transactional(node, txn.keyspace):
        raise BadRequest(f"keyspace {txn.keyspace!r} is eventual: transactions need a "
                         "transactional keyspace", field="keyspace")
    result = await node.txn.execute(Op("txn", txn.keyspace, txn), started_s=request[STARTED_S],
                                    timeout_s=_txn_timeout_s(node))
    answer = {"ok": True, "id": result["id"], "committed": result["committed"],
              "reads": _txn_reads(result.get("reads")), "receipt": result.get("receipt")}
    if result.get("commit_ts") is not None:
        answer["commit_ts"] = result["commit_ts"]
    return json_response(answer)


async def get_txn(request: web.Request) -> web.Response:
    """A transaction's definite outcome: committed (with its timestamp), or 404 not committed."""
    node = request.app[NODE_KEY]
    txn_id = request.match_info["txn_id"]
    if not tv.TXN_ID.match(txn_id):
        raise BadRequest("id must be 1-64 characters of letters, digits and . _ : -", field="id")
    keyspace = request.query.get("keyspace")
    if not keyspace:
        raise BadRequest("keyspace is required (the transaction's keyspace)", field="keyspace")
    node.coordinator.keyspace(keyspace)
    if not _transactional(node, keyspace):
        raise BadRequest(f"keyspace {keyspace!r} is eventual", field="keyspace")
    raw_key = request.query.get("key")
    if raw_key is None:
        ranges = node.txn.range_map(keyspace)
        if len(ranges) > 1:
            raise BadRequest(f"keyspace {keyspace!r} has {len(ranges)} ranges: name a key the "
                             "transaction touched", field="key")
        key = b""
    else:
        key = v.key_from_json(raw_key, node.config.limits, field="key")
    op = Op("status", keyspace, key=key, txn_id=txn_id)
    result = await node.txn.execute(op, started_s=request[STARTED_S],
                                    timeout_s=node.config.timing.read_timeout_ms / 1000)
    return json_response(result)


# -- cluster information -----------------------------------------------------


async def status(request: web.Request) -> web.Response:
    return json_response(cluster_status(request.app[NODE_KEY]))


async def ring(request: web.Request) -> web.Response:
    return json_response(ring_view(request.app[NODE_KEY]))


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


async def health(request: web.Request) -> web.Response:
    return json_response({"ok": True, "node_id": request.app[NODE_KEY].node_id})


def build_app(node: Node) -> web.Application:
    app = web.Application(
        middlewares=[errors_middleware], client_max_size=node.config.limits.max_request_bytes
    )
    app[NODE_KEY] = node
    app[IDEMPOTENCY_KEY] = idempotency.IdempotencyCache(node.clock)
    key_path = "/v1/kv/{keyspace}/{key:.+}"
    app.router.add_put(key_path, put_key, name="put")
    app.router.add_get(key_path, get_key, name="get", allow_head=False)
    app.router.add_delete(key_path, delete_key, name="delete")
    app.router.add_get("/v1/kv/{keyspace}", scan, name="scan", allow_head=False)
    app.router.add_post("/v1/batch", batch, name="batch")
    app.router.add_post("/v1/txn", post_txn, name="txn")
    app.router.add_get("/v1/txn/{txn_id}", get_txn, name="txn_status", allow_head=False)
    app.router.add_get("/v1/status", status, name="status", allow_head=False)
    app.router.add_get("/v1/ring", ring, name="ring", allow_head=False)
    app.router.add_get("/v1/health", health, name="health", allow_head=False)
    app.router.add_post("/v1/decommission", decommission, name="decommission")
    app.router.add_get("/metrics", metrics, name="metrics", allow_head=False)
    app.router.add_post("/v1/admin/repair", post_repair, name="repair")
    app.router.add_get("/v1/admin/repair", get_repair, name="repair_status", allow_head=False)
    return app
