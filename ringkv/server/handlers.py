"""The client API's operations, once for every front end (the HTTP API and the native protocol).

A front end turns what arrived into an ``ApiCall`` (the keyspace and key,
the query parameters as strings, the JSON body as bytes, the idempotency
key, when the request arrived), runs the operation of its route, and sends
the ``Answer`` back in its own framing: an HTTP response, or a native
frame. So the validation, the node methods called, the error codes and the
receipts are the same whichever way a client came in.

A shell module (it awaits the node); the validation it calls is pure.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from json.encoder import encode_basestring_ascii
from typing import TYPE_CHECKING, Any, NamedTuple

from ringkv.auth.permissions import ADMIN, Principal
from ringkv.config import AUTH_KEYSPACE
from ringkv.errors import (
    BadRequest, Forbidden, NotFound, RingKVError, ShuttingDown, TooLarge,
)
from ringkv.coordinator.results import Receipt, WriteResult
from ringkv.quorum import ConsistencyLevel
from ringkv.server import idempotency
from ringkv.server import txn_validation as tv
from ringkv.server import validation as v
from ringkv.server.status import client_address, cluster_status, ring_view
from ringkv.txn.lease_service import lease_of
from ringkv.txn.requests import Condition, TxnRequest, Write
from ringkv.txn.service import Op
from ringkv.versioning import Cell

if TYPE_CHECKING:
    from ringkv.node import Node

BATCH_OPS = v.BATCH_OPS
# The fields each kind of batch operation takes; any other is refused, named.
_BATCH_OP_FIELDS = {
    "put": ("op", "keyspace", "key", "value", "ttl", "consistency"),
    "get": ("op", "keyspace", "key", "consistency"),
    "delete": ("op", "keyspace", "key", "consistency"),
}
# What a node that is not on the ring yet still answers: how it sees the
# cluster and why it has not joined (status, ring, metrics, and the dashboard
# that shows them, where an operator looks first), and the API's description.
# Everything else (data, and health, so that load balancers and tools wait)
# gets 503 not_joined.
SERVED_BEFORE_JOINING = frozenset({"status", "ring", "metrics", "openapi", "ui", "ui_slash",
                                   "ui_file", "dashboard_node", "dashboard_cluster"})

_ENCODER = json.JSONEncoder(separators=(",", ":"))


@dataclass(slots=True)
class ApiCall:
    """One client request, whichever front end it came through."""

    node: Node
    started_s: float  # when it arrived: the request's one deadline counts from here
    keyspace: str = ""
    key: bytes = b""
    query: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""
    idempotency_key: str | None = None
    # What makes two requests "the same" for the idempotency cache: the front
    # end's method and target (HTTP: method and path with query).
    fingerprint_method: str = ""
    fingerprint_target: str = ""
    txn_id: str = ""
    # The node's idempotency cache, one for every front end.
    cache: idempotency.IdempotencyCache | None = None
    # Who is asking (auth.enabled), with the grants it holds now; None without auth.
    principal: Principal | None = None


class Answer(NamedTuple):
    """An operation's answer: a status (HTTP's numbers) and a JSON document."""

    status: int
    body: bytes
    replayed: bool = False


def answer(body: Any, status: int = 200) -> Answer:
    return Answer(status, _ENCODER.encode(body).encode())


def error_answer(error: RingKVError) -> Answer:
    return answer(error.to_json(), error.http_status)


INTERNAL_ERROR = Answer(500, b'{"error":{"code":"internal","message":"internal server error"}}')


def admit(node: Node, route: str) -> None:
    """What every front end checks before an operation runs."""
    if node.draining:
        raise ShuttingDown("the node is shutting down")
    if route not in SERVED_BEFORE_JOINING:
        node.require_joined()


def metric_level(text: str | None) -> str:
    """A bounded label value: clients must not be able to mint new time series."""
    if not text:
        return "default"
    upper = text.upper()
    return upper if upper in _LEVEL_NAMES else "invalid"


_LEVEL_NAMES = frozenset(level.value for level in ConsistencyLevel)


# -- single keys -------------------------------------------------------------


# The answers every key request gets are written out by hand: the same bytes as
# _ENCODER gives (tests/test_api.py checks), in about half its time.
_STR = encode_basestring_ascii  # a JSON string, as _ENCODER (ensure_ascii) writes it


def _names_json(names: list[str]) -> str:
    return "[" + ",".join(map(_STR, names)) + "]"


# Receipts repeat (the same replicas asked and answering, request after request):
# each is written out once. Bounded: emptied when full (node ids are few).
_RECEIPTS: dict[tuple[object, ...], str] = {}
_RECEIPTS_MAX = 4096


def receipt_json(receipt: Receipt) -> str:
    """``receipt.to_json()`` as compact JSON."""
    key = (receipt.consistency, tuple(receipt.replicas), tuple(receipt.asked),
           tuple(receipt.answered), receipt.hints_stored, receipt.read_repair,
           tuple(receipt.repaired), tuple(receipt.speculative))
    text = _RECEIPTS.get(key)
    if text is None:
        text = (
            f'{{"consistency":{_STR(receipt.consistency)},'
            f'"replicas":{_names_json(receipt.replicas)},'
            f'"asked":{_names_json(receipt.asked)},"answered":{_names_json(receipt.answered)},'
            f'"hints_stored":{int(receipt.hints_stored)},'
            f'"read_repair":{"true" if receipt.read_repair else "false"},'
            f'"repaired":{_names_json(receipt.repaired)},'
            f'"speculative":{_names_json(receipt.speculative)}}}'
        )
        if len(_RECEIPTS) >= _RECEIPTS_MAX:
            _RECEIPTS.clear()
        _RECEIPTS[key] = text
    return text


def write_answer(result: WriteResult) -> Answer:
    """A put's or delete's answer: ok, the write's timestamp and its receipt."""
    wall_us, logical = result.cell.ts
    return Answer(200, f'{{"ok":true,"timestamp":[{int(wall_us)},{int(logical)}],'
                       f'"receipt":{receipt_json(result.receipt)}}}'.encode())


def _cell_json(key: bytes, cell: Cell, receipt: Receipt | None, now_us: int) -> bytes:
    """Render a cell without decoding and re-encoding its (canonical JSON) value.

    A cell with a TTL carries ``expires_at_us`` (on the clock of the node that took
    the write) and ``ttl_remaining_ms``, counted on this node's clock at ``now_us``
    and rounded up (a live cell never shows 0), so a client need not trust its own
    clock to tell how long the key has left."""
    wall_us, logical = cell.ts
    head = f'{{"key":{_STR(key.decode())},"timestamp":[{int(wall_us)},{int(logical)}]'
    if cell.expires_at_us is not None:
        expires_us = int(cell.expires_at_us)
        remaining_ms = max(0, -((now_us - expires_us) // 1000))  # ceil((expires - now) / 1000)
        head += f',"expires_at_us":{expires_us},"ttl_remaining_ms":{remaining_ms}'
    if receipt is not None:
        head += f',"receipt":{receipt_json(receipt)}'
    return head.encode() + b',"value":' + cell.value + b"}"


def _json_object(call: ApiCall) -> dict[str, Any]:
    body = v.parse_json_body(call.body)
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object", field="body")
    return body


def check_keyspace(node: Node, name: str) -> str:
    node.coordinator.keyspace(name)  # raises NotFound
    return name


Operation = Callable[[ApiCall], Awaitable[Answer]]


def _deduplicated(handler: Operation) -> Operation:
    """Run a write once per idempotency key; repeats get the first answer.

    Without a key the wrapper hands back the handler's own coroutine: no frame
    of its own on every write."""

    def wrapper(call: ApiCall) -> Awaitable[Answer]:
        if call.idempotency_key is None or call.cache is None:
            return handler(call)
        return _run_once(handler, call, call.cache, call.idempotency_key)

    wrapper.__name__ = handler.__name__
    wrapper.__doc__ = handler.__doc__
    return wrapper


async def _run_once(handler: Operation, call: ApiCall, cache: idempotency.IdempotencyCache,
                    idempotency_key: str) -> Answer:
    key = idempotency.check_key(idempotency_key)
    if call.principal is not None:
        # Keys are each user's own: another user who sends the same key neither gets
        # this user's answer nor learns that the key was used.
        key = f"{call.principal.name}\x00{key}"
    fingerprint = idempotency.fingerprint(
        call.fingerprint_method, call.fingerprint_target, call.body)

    async def execute() -> idempotency.StoredResponse:
        result = await handler(call)
        return idempotency.StoredResponse(result.status, result.body, "application/json")

    stored, replayed = await cache.run(key, fingerprint, execute)
    return Answer(stored.status, stored.body, replayed)


@_deduplicated
async def put_key(call: ApiCall) -> Answer:
    node = call.node
    keyspace = check_keyspace(node, call.keyspace)
    body = _json_object(call)
    if "value" not in body:
        raise BadRequest('body must have a "value" field', field="value")
    value = v.value_bytes(body["value"], node.config.limits, field="value")
    if _transactional(node, keyspace):
        return await _txn_write(call, keyspace, call.key, value, body)
    _no_condition(body, keyspace)
    v.check_fields(body, _PUT_FIELDS, what="a put")
    ttl = _put_ttl(body, call.query)
    level = v.consistency(call.query.get("consistency"), write=True)
    result = await node.put(keyspace, call.key, value, ttl, level, started_s=call.started_s)
    return write_answer(result)


async def get_key(call: ApiCall) -> Answer:
    node = call.node
    keyspace = check_keyspace(node, call.keyspace)
    key = call.key
    if _transactional(node, keyspace):
        return await _txn_get(call, keyspace, key)
    for name in ("snapshot_ts", "max_staleness_ms"):
        if name in call.query:
            raise BadRequest(f"{name} needs a transactional keyspace; {keyspace!r} is eventual",
                             field=name)
    receipt: Receipt | None
    if call.query.get("local", "").lower() in ("1", "true", "yes"):
        cell = node.read_local(keyspace, key)
        receipt = None
    else:
        level = v.consistency(call.query.get("consistency"), write=False)
        result = await node.get(keyspace, key, level, started_s=call.started_s)
        cell, receipt = result.cell, result.receipt
    now_us = node.clock.wall_us()
    if cell is None or not cell.is_live(now_us):
        raise NotFound(f"key {key.decode()!r} not found in {keyspace!r}",
                       receipt=None if receipt is None else receipt.to_json())
    return Answer(200, _cell_json(key, cell, receipt, now_us))


@_deduplicated
async def delete_key(call: ApiCall) -> Answer:
    node = call.node
    keyspace = check_keyspace(node, call.keyspace)
    body = _json_object(call) if call.body else {}
    if _transactional(node, keyspace):
        return await _txn_write(call, keyspace, call.key, None, body)
    _no_condition(body, keyspace)
    v.check_fields(body, (), what="a delete on an eventual keyspace")
    level = v.consistency(call.query.get("consistency"), write=True)
    result = await node.delete(keyspace, call.key, level, started_s=call.started_s)
    return write_answer(result)


# -- batches and scans -------------------------------------------------------


@_deduplicated
async def batch(call: ApiCall) -> Answer:
    """Several independent operations in one request (not atomic, like an unlogged batch)."""
    node = call.node
    limits = node.config.limits
    body = _json_object(call)
    v.check_fields(body, ("ops",), what="a batch")
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
    default_level = call.query.get("consistency")
    # The request's level is checked even when every op names its own: a bad
    # ?consistency= is refused, not ignored (ANY is refused per get).
    v.consistency(default_level, write=True)
    # Validate everything before running anything, so a bad op fails the
    # whole request instead of leaving half of it applied.
    planned = [_plan_batch_op(node, i, op, default_level) for i, op in enumerate(ops)]
    results = await asyncio.gather(*(_run_batch_op(node, op) for op in planned))
    return answer({"results": results})


def _plan_batch_op(node: Node, index: int, op: Any, default_level: str | None) -> dict[str, Any]:
    where = f"ops[{index}]"
    if not isinstance(op, dict):
        raise BadRequest("each operation must be a JSON object", field=where)
    kind = op.get("op")
    if kind not in BATCH_OPS:
        raise BadRequest(f"op must be one of {', '.join(BATCH_OPS)}", field=f"{where}.op")
    v.check_fields(op, _BATCH_OP_FIELDS[kind], what=f"a batch {kind}", where=where)
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


async def scan(call: ApiCall) -> Answer:
    node = call.node
    keyspace = check_keyspace(node, call.keyspace)
    if _transactional(node, keyspace):
        raise BadRequest(f"keyspace {keyspace!r} is transactional: scans of it are not served "
                         "yet", field="keyspace")
    limit = v.bounded_int(
        call.query.get("limit"),
        field="limit",
        low=1,
        high=node.config.limits.max_scan_page,
        default=min(100, node.config.limits.max_scan_page),
    )
    after = v.decode_page_token(call.query.get("page_token"))
    level = v.consistency(call.query.get("consistency"), write=False)
    page = await node.coordinator.scan(keyspace, after, limit, level)
    items = [
        {"key": key.decode(), "value": cell.json_value(), "timestamp": cell.ts.to_json()}
        for _token, key, cell in page.items
    ]
    return answer(
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
    if "id" in body:
        raise BadRequest(f'a transaction id ("id") needs a transactional keyspace; {keyspace!r} '
                         "is eventual", field="id")


_PUT_FIELDS = ("value", "ttl")


def _put_ttl(body: dict[str, Any], query: Mapping[str, str]) -> int | None:
    """A put's TTL: the body's ``ttl`` (a JSON integer) or the query's (digits), not both."""
    if "ttl" in query:
        if "ttl" in body:
            raise BadRequest("ttl is given both in the body and in the query; give it once",
                             field="ttl")
        return v.ttl_from_query(query["ttl"])
    return v.ttl_s(body.get("ttl"), field="ttl")


def _serial(call: ApiCall) -> None:
    """SERIAL (the default) is the only level of a transactional keyspace."""
    level = call.query.get("consistency")
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


async def _txn_write(call: ApiCall, keyspace: str, key: bytes, value: bytes | None,
                     body: dict[str, Any]) -> Answer:
    node = call.node
    _serial(call)
    unknown = sorted(set(body) - {"value", "if", "id", "lease"})
    if unknown or "ttl" in call.query:
        name = unknown[0] if unknown else "ttl"
        raise BadRequest(f"{name!r} is not accepted on a transactional keyspace", field=name)
    if value is None and "value" in body:
        raise BadRequest("a delete takes no value", field="value")
    tv.check_not_reserved(key, field="key")
    conditions: tuple[Condition, ...] = ()
    if "if" in body:
        conditions = (tv.parse_condition(body["if"], key, node.config.limits, field="if"),)
    txn_id = body.get("id")
    if txn_id is not None and (not isinstance(txn_id, str) or not tv.TXN_ID.match(txn_id)):
        raise BadRequest("id must be 1-64 characters of letters, digits and . _ : -", field="id")
    lease = lease_of(body)
    if lease is not None:
        if value is None:
            raise BadRequest("a delete takes no lease (it detaches the key)", field="lease")
        if txn_id is not None:
            raise BadRequest("a put attached to a lease takes no id", field="id")
        result = await node.leases.put(keyspace, key, value, lease, conditions, call.started_s)
        return answer({"ok": True, "id": result["id"], "version": result["commit_ts"],
                       "commit_ts": result["commit_ts"], "lease": str(lease),
                       "receipt": result.get("receipt")})
    txn = TxnRequest(keyspace, txn_id, (), conditions, (Write(key, value),))
    result = await node.txn.execute(Op("txn", keyspace, txn), started_s=call.started_s,
                                    timeout_s=_txn_timeout_s(node))
    return answer({"ok": True, "id": result["id"], "version": result["commit_ts"],
                   "commit_ts": result["commit_ts"], "receipt": result.get("receipt")})


def _query_int(call: ApiCall, name: str, high: int) -> int | None:
    if name not in call.query:
        return None
    return v.bounded_int(call.query[name], field=name, low=0, high=high, default=0)


async def _txn_get(call: ApiCall, keyspace: str, key: bytes) -> Answer:
    node = call.node
    _serial(call)
    snapshot_ts = _query_int(call, "snapshot_ts", v.MAX_TIMESTAMP_US)
    staleness_ms = _query_int(call, "max_staleness_ms", v.MAX_STALENESS_MS)
    if snapshot_ts is not None and staleness_ms is not None:
        raise BadRequest("give snapshot_ts or max_staleness_ms, not both", field="snapshot_ts")
    if snapshot_ts is not None or staleness_ms is not None:
        op = Op("snapshot_get", keyspace, key=key, snapshot_ts_us=snapshot_ts,
                max_staleness_ms=staleness_ms)
        result = await node.txn.execute(op, started_s=call.started_s,
                                        timeout_s=node.config.timing.read_timeout_ms / 1000)
        return _versioned_json(key, result["value"], result["version"], result["receipt"])
    result = await node.txn.execute(Op("get", keyspace, key=key), started_s=call.started_s,
                                    timeout_s=node.config.timing.read_timeout_ms / 1000)
    read = result["reads"][0]
    if read["value"] is None:
        raise NotFound(f"key {key.decode()!r} not found in {keyspace!r}",
                       receipt=result["receipt"])
    return _versioned_json(key, read["value"], read["version"], result["receipt"])


def _versioned_json(key: bytes, value: bytes, version: int, receipt: Any) -> Answer:
    """A transactional read's answer; the stored value is canonical JSON already, so it is
    spliced in rather than decoded and encoded again (as ``_cell_json`` does)."""
    head = _ENCODER.encode({"key": key.decode(), "version": version, "receipt": receipt})
    return Answer(200, head.encode()[:-1] + b',"value":' + bytes(value) + b"}")


@_deduplicated
async def post_txn(call: ApiCall) -> Answer:
    """A one-shot transaction in one range: reads, conditions and writes at one timestamp."""
    node = call.node
    body = v.parse_json_body(call.body)
    txn = tv.parse_txn(body, node.config.limits)
    node.coordinator.keyspace(txn.keyspace)  # raises NotFound
    if not _transactional(node, txn.keyspace):
        raise BadRequest(f"keyspace {txn.keyspace!r} is eventual: transactions need a "
                         "transactional keyspace", field="keyspace")
    result = await node.txn.execute(Op("txn", txn.keyspace, txn), started_s=call.started_s,
                                    timeout_s=_txn_timeout_s(node))
    reply = {"ok": True, "id": result["id"], "committed": result["committed"],
             "reads": _txn_reads(result.get("reads")), "receipt": result.get("receipt")}
    if result.get("commit_ts") is not None:
        reply["commit_ts"] = result["commit_ts"]
    if result.get("replayed"):
        # An earlier attempt under this id committed: this answer has no reads, and a
        # client must not take the empty list for what the transaction read.
        reply["replayed"] = True
    return answer(reply)


async def get_txn(call: ApiCall) -> Answer:
    """A transaction's definite outcome: committed (with its timestamp), or 404 not committed."""
    node = call.node
    txn_id = call.txn_id
    if not tv.TXN_ID.match(txn_id):
        raise BadRequest("id must be 1-64 characters of letters, digits and . _ : -", field="id")
    keyspace = call.query.get("keyspace")
    if not keyspace:
        raise BadRequest("keyspace is required (the transaction's keyspace)", field="keyspace")
    node.coordinator.keyspace(keyspace)
    if not _transactional(node, keyspace):
        raise BadRequest(f"keyspace {keyspace!r} is eventual", field="keyspace")
    raw_key = call.query.get("key")
    if raw_key is None:
        ranges = node.txn.range_map(keyspace)
        if len(ranges) > 1:
            raise BadRequest(f"keyspace {keyspace!r} has {len(ranges)} ranges: name a key the "
                             "transaction touched", field="key")
        key = b""
    else:
        key = v.key_from_json(raw_key, node.config.limits, field="key")
    op = Op("status", keyspace, key=key, txn_id=txn_id)
    result = await node.txn.execute(op, started_s=call.started_s,
                                    timeout_s=node.config.timing.read_timeout_ms / 1000)
    return answer(result)


# -- interactive transactions (txn/sessions.py) ------------------------------
#
# A transaction lives on the node that began it (its id names that node): a
# call for one that lives elsewhere is answered 404 ``other_node`` naming the
# node and its address, not forwarded (a client sends a transaction's calls to
# the node that began it). Every error of these calls names the transaction
# (``id``) and whether it has ended (``ended``: why, or null while it is open).
#
# With auth.enabled a transaction belongs to the user who began it: another
# user's call is 403 ``forbidden`` (reason ``not_owner``) naming the transaction
# and nothing of it (not its state, keyspace or keys), before any idempotency
# replay could hand back the owner's answer. A cluster admin may abort anyone's
# (as CockroachDB's admin cancels any session), and nothing more.


def _session(call: ApiCall, *, admin_may: bool = False) -> str:
    """The transaction id of the call, if it can live on this node and the caller may use
    it (``admin_may``: a cluster admin may, whoever began it)."""
    node = call.node
    txn_id = tv.check_txn_id(call.txn_id)
    owner = tv.session_node(txn_id)
    if owner is None:
        raise NotFound(f"{txn_id!r} is not the id of an interactive transaction (POST "
                       "/v1/txn/begin gives one)", id=txn_id, reason="unknown_txn", ended=None)
    if owner != node.node_id:
        raise NotFound(f"transaction {txn_id} lives on node {owner}, not on {node.node_id}: "
                       "send its calls to the node that began it", id=txn_id,
                       reason="other_node", node_id=owner,
                       address=client_address(node, owner), ended=None)
    _check_owner(call, txn_id, admin_may=admin_may)
    return txn_id


def _check_owner(call: ApiCall, txn_id: str, *, admin_may: bool) -> None:
    principal = call.principal
    if principal is None:  # auth is off
        return
    user = call.node.txn.sessions.owner(txn_id)
    if user is None or user == principal.name:  # unknown here: the call says so itself
        return
    if admin_may and ADMIN in principal.grants:
        return
    call.node.metrics.auth_forbidden.inc()
    raise Forbidden(f"transaction {txn_id} was begun by another user: only that user may "
                    "use it" + (", and a cluster admin abort it" if admin_may else ""),
                    permission="owner", keyspace=None, user=principal.name, id=txn_id,
                    reason="not_owner")


def _owned(handler: Operation, *, admin_may: bool = False) -> Operation:
    """Check the caller may use the call's transaction, then run ``handler`` (which may
    replay an earlier answer by idempotency key: the check comes first)."""

    async def wrapper(call: ApiCall) -> Answer:
        _session(call, admin_may=admin_may)
        return await handler(call)

    wrapper.__name__ = handler.__name__
    wrapper.__doc__ = handler.__doc__
    return wrapper


def _txn_keyspace(call: ApiCall) -> str:
    node = call.node
    keyspace = check_keyspace(node, call.keyspace)
    if not _transactional(node, keyspace):
        raise BadRequest(f"keyspace {keyspace!r} is eventual: transactions need a "
                         "transactional keyspace", field="keyspace")
    return keyspace


def _ended(node: Node, txn_id: str) -> str | None:
    """Why the transaction ended, or None while it is open (or unknown here)."""
    return node.txn.sessions.ended(txn_id)


async def _in_txn(call: ApiCall, txn_id: str, work: Awaitable[dict[str, Any]]) -> dict[str, Any]:
    """Run a call of the transaction; its error names the transaction and its state."""
    try:
        return await work
    except RingKVError as exc:
        exc.details.setdefault("id", txn_id)
        exc.details["ended"] = _ended(call.node, txn_id)
        raise


@_deduplicated
async def txn_begin(call: ApiCall) -> Answer:
    """Open an interactive transaction on this node; its calls come back here."""
    node = call.node
    begin = tv.parse_begin(v.parse_json_body(call.body) if call.body.strip() else {})
    keyspace = begin.keyspace
    if keyspace is None:
        # The system's own keyspace (auth.enabled) is never the one a client means.
        transactional = sorted(ks for ks in node.txn.keyspaces if ks != AUTH_KEYSPACE)
        if len(transactional) != 1:
            raise BadRequest("keyspace is required: this cluster has "
                             f"{len(transactional)} transactional keyspaces "
                             f"({', '.join(transactional) or 'none'})", field="keyspace")
        keyspace = transactional[0]
    call.keyspace = keyspace
    _txn_keyspace(call)
    began = node.txn.sessions.begin(
        keyspace, read_only=begin.read_only, priority_us=begin.priority_us,
        owner=None if call.principal is None else call.principal.name)
    return answer({"ok": True, **began, "node_id": node.node_id})


@_owned
@_deduplicated
async def txn_get(call: ApiCall) -> Answer:
    """A key as the transaction sees it: its own write, else the value under a shared lock
    (a read-only one: at its snapshot)."""
    node = call.node
    txn_id = _session(call)
    keyspace = _txn_keyspace(call)
    key = call.key
    deadline_s = call.started_s + node.config.timing.read_timeout_ms / 1000
    try:
        read = await _in_txn(call, txn_id,
                             node.txn.sessions.get(txn_id, keyspace, key, deadline_s))
    except NotFound as exc:
        if exc.details.get("reason") is None:  # the key holds nothing: the txn goes on
            exc.details.update(key=key.decode(), found=False)
        raise
    head: dict[str, Any] = {"id": txn_id, "key": key.decode(), "version": read["version"]}
    if read.get("own_write"):
        head["own_write"] = True
    encoded = _ENCODER.encode(head).encode()
    return Answer(200, encoded[:-1] + b',"value":' + bytes(read["value"]) + b"}")


async def _session_write(call: ApiCall, value: bytes | None) -> Answer:
    node = call.node
    txn_id = _session(call)
    keyspace = _txn_keyspace(call)
    tv.check_not_reserved(call.key, field="key")
    deadline_s = call.started_s + _txn_timeout_s(node)
    result = await _in_txn(call, txn_id, node.txn.sessions.write(
        txn_id, keyspace, call.key, value, deadline_s))
    return answer(result)


@_owned
@_deduplicated
async def txn_put(call: ApiCall) -> Answer:
    """Lock the key and buffer a put; it takes effect at commit."""
    body = _json_object(call)
    unknown = sorted(set(body) - {"value"})
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r}; a put in a transaction takes value",
                         field=unknown[0])
    if "value" not in body:
        raise BadRequest('body must have a "value" field', field="value")
    return await _session_write(call, v.value_bytes(body["value"], call.node.config.limits,
                                                    field="value"))


@_owned
@_deduplicated
async def txn_delete(call: ApiCall) -> Answer:
    """Lock the key and buffer a delete; it takes effect at commit."""
    body = _json_object(call) if call.body.strip() else {}
    if body:
        name = min(body)
        raise BadRequest(f"a delete in a transaction takes no body ({name!r})", field=name)
    return await _session_write(call, None)


def _no_body(call: ApiCall) -> None:
    body = _json_object(call) if call.body.strip() else {}
    if body:
        name = min(body)
        raise BadRequest(f"unknown field {name!r}; this call takes no body", field=name)


@_owned
@_deduplicated
async def txn_commit(call: ApiCall) -> Answer:
    """Commit: two-phase commit over every range the transaction touched (a read-only
    one just ends). A 504 ``timeout`` means the outcome is not known yet."""
    node = call.node
    txn_id = _session(call)
    _no_body(call)
    deadline_s = call.started_s + _txn_timeout_s(node)
    result = await _in_txn(call, txn_id, node.txn.sessions.commit(txn_id, deadline_s))
    return answer(result)


@functools.partial(_owned, admin_may=True)
@_deduplicated
async def txn_abort(call: ApiCall) -> Answer:
    """Abort: the transaction's locks are released and nothing of it is applied."""
    node = call.node
    txn_id = _session(call, admin_may=True)
    _no_body(call)

    async def abort() -> dict[str, Any]:
        return node.txn.sessions.abort(txn_id)

    return answer(await _in_txn(call, txn_id, abort()))


# -- cluster information -----------------------------------------------------


async def status(call: ApiCall) -> Answer:
    return answer(cluster_status(call.node))


async def ring(call: ApiCall) -> Answer:
    return answer(ring_view(call.node))


async def health(call: ApiCall) -> Answer:
    return answer({"ok": True, "node_id": call.node.node_id})
