"""The HTTP API's contract: an OpenAPI 3.1 document, built in code (``GET /v1/openapi.json``).

Pure (it imports no I/O module, directly or not): a function of the node's limits. What can be derived is derived, so
the document cannot drift from the code that decides: the consistency
levels come from ``quorum.ConsistencyLevel``, every error response's codes
and statuses from ``errors.py``'s typed errors (grouped by their HTTP
status), the bounds from ``LimitsConfig`` and the validators' constants.
tests/test_openapi.py checks that every route the aiohttp app registers is
described here, and a live node is fuzzed against this document with
schemathesis (tests/test_openapi_live.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from ringkv.auth.passwords import MAX_PASSWORD_CHARS, MIN_PASSWORD_CHARS
from ringkv.auth.permissions import ADMIN, KEYSPACE_NAME, PERMISSIONS, SYSTEM_KEYSPACE
from ringkv.auth.users import USER_NAME
from ringkv.config import LimitsConfig
from ringkv.errors import (
    Aborted,
    BadRequest,
    ClockUncertain,
    Compacted,
    ConditionFailed,
    CorruptRecord,
    CrossRange,
    Forbidden,
    HeaderTooLarge,
    LeaseExpired,
    MethodNotAllowed,
    NoLeader,
    NotFound,
    NotJoined,
    Overloaded,
    PeerTimeout,
    PeerUnreachable,
    RangeMoving,
    RemoteError,
    RepairRunning,
    ReplicaDown,
    RequestLineTooLong,
    RequestTimeout,
    RingKVError,
    ShuttingDown,
    SnapshotRefused,
    SnapshotTooOld,
    StorageError,
    Timeout,
    TooLarge,
    TooManyAttempts,
    TopologyRefused,
    Unauthenticated,
    Unavailable,
)
from ringkv.quorum import ConsistencyLevel
from ringkv.server.txn_validation import MAX_PRIORITY_US, TXN_ID
from ringkv.server.validation import (
    BATCH_OPS,
    MAX_STALENESS_MS,
    MAX_TIMESTAMP_US,
    MAX_TTL_S,
)
from ringkv.storage.snapshot_manifest import _NAME as SNAPSHOT_NAME
from ringkv.storage.snapshot_manifest import MAX_NAME_LENGTH as MAX_SNAPSHOT_NAME_CHARS
from ringkv.txn.leases import LEASE_ID_PATTERN
from ringkv.txn.requests import CONDITION_KINDS

# idempotency.py's header names and key bound, written out here because that module
# holds the (asyncio) cache and this one stays pure; tests/test_openapi.py checks both agree.
IDEMPOTENCY_HEADER = "Idempotency-Key"
REPLAY_HEADER = "Idempotent-Replayed"
MAX_IDEMPOTENCY_KEY_CHARS = 128

OPENAPI_VERSION = "3.1.0"
PATH = "/v1/openapi.json"
# Prometheus' text exposition format (what ``/metrics`` sends, parameters aside).
METRICS_MEDIA_TYPE = "text/plain"
NDJSON = "application/x-ndjson"
JSON = "application/json"


# -- errors: each status with the codes an operation may answer there ----------------


class _Internal(RingKVError):
    """An unexpected failure inside the node (logged there); the request may have been applied."""


# Every route may meet these: the client door and the HTTP parser (a request that
# is too slow, too long a request line or header), a node shutting down or over
# its connection cap, an unexpected failure, and (with auth.enabled) the checks.
COMMON_ERRORS: tuple[type[RingKVError], ...] = (
    BadRequest, RequestTimeout, RequestLineTooLong, HeaderTooLarge, ShuttingDown, Overloaded,
    Unauthenticated, Forbidden, TooManyAttempts, _Internal,
)
# What a node answers before it is on the ring (all but status, ring, metrics, openapi).
JOINED = (NotJoined,)
BODY_ERRORS = (TooLarge,)  # a body over limits.max_request_bytes, a value over its limit
EVENTUAL_ERRORS = (NotFound, Unavailable, Timeout, StorageError, CorruptRecord)
TXN_ERRORS = (NotFound, ConditionFailed, Aborted, CrossRange, SnapshotTooOld, ClockUncertain,
              RangeMoving, NoLeader, Unavailable, Timeout, PeerUnreachable, PeerTimeout,
              RemoteError, StorageError, CorruptRecord)
TOPOLOGY_ERRORS = (TopologyRefused,)
LEASE_ERRORS = (LeaseExpired, Overloaded, *TXN_ERRORS)
SNAPSHOT_ERRORS = (SnapshotRefused, StorageError)
# Every code a client of the HTTP API can meet (a method a path does not take: 405).
ALL_ERRORS = (*COMMON_ERRORS, *JOINED, *BODY_ERRORS, *EVENTUAL_ERRORS, *TXN_ERRORS,
              *TOPOLOGY_ERRORS, *SNAPSHOT_ERRORS, LeaseExpired, RepairRunning, ReplicaDown, MethodNotAllowed)


def _doc_line(cls: type[RingKVError]) -> str:
    doc = cls.__doc__ if cls.__doc__ != RingKVError.__doc__ else None
    return " ".join((doc or _MEANINGS.get(cls.code, cls.__name__)).split("\n\n")[0].split())


# The typed errors without a docstring of their own.
_MEANINGS = {
    "not_found": "No such key, keyspace, transaction or endpoint (details say which).",
    "method_not_allowed": "The path does not take this method.",
    "shutting_down": "The node is draining before it stops; try another node.",
}


def error_codes(classes: Iterable[type[RingKVError]]) -> dict[int, list[tuple[str, str]]]:
    """HTTP status -> (code, what it means) of ``classes``, from errors.py."""
    by_status: dict[int, dict[str, str]] = {}
    for cls in classes:
        by_status.setdefault(cls.http_status, {}).setdefault(cls.code, _doc_line(cls))
    return {status: sorted(codes.items()) for status, codes in sorted(by_status.items())}


def _error_response(codes: Sequence[tuple[str, str]]) -> dict[str, Any]:
    return {  # what each code means is said once, in the ErrorInfo schema
        "description": "An error: " + ", ".join(f"`{code}`" for code, _ in codes),
        "content": {JSON: {"schema": {
            "type": "object",
            "required": ["error"],
            "additionalProperties": False,
            "properties": {"error": {
                "allOf": [{"$ref": "#/components/schemas/ErrorInfo"}],
                "properties": {"code": {"enum": [code for code, _ in codes]}},
            }},
        }}},
    }


# -- shared schemas ---------------------------------------------------------------------


def _levels(write: bool) -> list[str]:
    names = [level.value for level in ConsistencyLevel
             if write or level is not ConsistencyLevel.ANY]
    # validation.consistency: either case, and an empty value is the default level.
    return names + [name.lower() for name in names] + [""]


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _object(properties: dict[str, Any], required: Sequence[str] = (), *,
            closed: bool = True) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        schema["required"] = list(required)
    if closed:  # the server names an unknown field in a 400
        schema["additionalProperties"] = False
    return schema


def _schemas(limits: LimitsConfig) -> dict[str, Any]:
    names = {"type": "array", "items": {"type": "string"}}
    timestamp = {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 2,
                 "description": "a hybrid logical clock timestamp: [wall µs, logical]"}
    key = {"type": "string", "minLength": 1,
           "description": f"1 to {limits.max_key_bytes} bytes of UTF-8"}
    ttl = {"type": "integer", "minimum": 0, "maximum": MAX_TTL_S,
           "description": "seconds the value lives (0: for ever); a JSON integer"}
    condition_kinds = {
        "version": {"type": "integer", "minimum": 0,
                    "description": "the key's commit timestamp (µs) must be this"},
        "absent": {"const": True, "description": "the key must hold nothing"},
        "equals": {"description": "the key must hold this JSON value"},
    }
    assert set(condition_kinds) == set(CONDITION_KINDS)

    def condition(with_key: bool) -> dict[str, Any]:
        extra = {"key": key} if with_key else {}
        return {"oneOf": [
            _object({**extra, kind: schema}, [*extra, kind])
            for kind, schema in condition_kinds.items()
        ]}

    def batch_op(kind: str) -> dict[str, Any]:
        properties: dict[str, Any] = {
            "op": {"const": kind}, "key": key, "keyspace": _ref("KeyspaceName"),
            "consistency": {"type": "string", "enum": _levels(write=kind != "get")},
        }
        required = ["op", "key"]
        if kind == "put":
            properties.update(value=_ref("Value"), ttl=ttl)
            required.append("value")
        return _object(properties, required)

    assert set(BATCH_OPS) == {"put", "get", "delete"}
    return {
        "ErrorInfo": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {
                "code": {"type": "string", "description": "stable; what each means:\n" + "\n".join(
                    f"* `{code}` ({status}): {meaning}"
                    for status, codes in error_codes(ALL_ERRORS).items()
                    for code, meaning in codes)},
                "message": {"type": "string"},
                "field": {"type": "string", "description": "the input that is wrong"},
            },
            "additionalProperties": True,
            "description": "code and message, and the error's details (field, limit, ...)",
        },
        "Value": {"description": "any JSON value"},
        "Key": key,
        "KeyspaceName": {"type": "string", "pattern": f"^{KEYSPACE_NAME.pattern}$"},
        "TxnId": {"type": "string", "pattern": TXN_ID.pattern},
        "LeaseId": {"type": "string", "pattern": LEASE_ID_PATTERN,
                    "description": "<keyspace>:<16 hex digits>, as POST /v1/lease answers"},
        "Timestamp": timestamp,
        "Ttl": ttl,
        "Receipt": {
            "type": "object",
            "required": ["consistency", "replicas", "asked", "answered"],
            "properties": {
                "consistency": {"type": "string"}, "replicas": names, "asked": names,
                "answered": names, "hints_stored": {"type": "integer"},
                "read_repair": {"type": "boolean"}, "repaired": names, "speculative": names,
            },
        },
        "TxnReceipt": {"type": ["object", "null"]},
        "WriteResult": _object({
            "ok": {"const": True}, "timestamp": _ref("Timestamp"), "receipt": _ref("Receipt"),
        }, ["ok", "timestamp", "receipt"]),
        "TxnWriteResult": _object({
            "ok": {"const": True}, "id": _ref("TxnId"), "version": {"type": "integer"},
            "commit_ts": {"type": "integer"}, "receipt": _ref("TxnReceipt"),
            "lease": _ref("LeaseId"),
        }, ["ok", "id", "commit_ts"]),
        "Cell": _object({
            "key": {"type": "string"}, "timestamp": _ref("Timestamp"),
            "expires_at_us": {"type": "integer"},
            "ttl_remaining_ms": {"type": "integer", "minimum": 1,
                                 "description": "with a TTL: what the key has left as the "
                                                "answering node counts it, rounded up"},
            "receipt": _ref("Receipt"), "value": _ref("Value"),
        }, ["key", "timestamp", "value"]),
        "VersionedValue": _object({
            "key": {"type": "string"}, "version": {"type": ["integer", "null"]},
            "receipt": _ref("TxnReceipt"), "value": _ref("Value"),
        }, ["key", "version", "value"]),
        "PutBody": _object({
            "value": _ref("Value"), "ttl": ttl,
            "if": condition(with_key=False), "id": _ref("TxnId"), "lease": _ref("LeaseId"),
        }, ["value"]) | {
            "description": "ttl: an eventual keyspace only; if, id and lease (attach the key "
                           "to a session lease; not with id): a transactional one (any other "
                           "field is refused, named)"},
        "DeleteBody": _object({"if": condition(with_key=False), "id": _ref("TxnId")}) | {
            "description": "if and id: a transactional keyspace only"},
        "BatchBody": _object({"ops": {
            "type": "array", "minItems": 1, "maxItems": limits.max_batch_ops,
            "items": {"oneOf": [batch_op(kind) for kind in BATCH_OPS]},
        }}, ["ops"]),
        "BatchResult": {"oneOf": [
            _object({"ok": {"const": True}, "key": {"type": "string"},
                     "timestamp": _ref("Timestamp")}, ["ok", "key", "timestamp"]),
            _object({"ok": {"const": True}, "key": {"type": "string"},
                     "found": {"const": False}}, ["ok", "key", "found"]),
            _object({"ok": {"const": True}, "key": {"type": "string"}, "found": {"const": True},
                     "value": _ref("Value"), "timestamp": _ref("Timestamp")},
                    ["ok", "key", "found", "value", "timestamp"]),
            _object({"ok": {"const": False}, "key": {"type": "string"},
                     "error": _ref("ErrorInfo")}, ["ok", "key", "error"]),
        ]},
        "TxnBody": _object({
            "keyspace": {"type": "string", "minLength": 1},
            "id": _ref("TxnId"),
            "reads": {"type": "array", "items": key},
            "conditions": {"type": "array", "items": condition(with_key=True)},
            "writes": {"type": "array", "items": {"oneOf": [
                _object({"op": {"const": "put"}, "key": key, "value": _ref("Value"),
                         "lease": _ref("LeaseId")}, ["op", "key", "value"])
                | {"description": "lease: attach the key to that session lease (of the "
                                  "transaction's keyspace), as a single put's lease does"},
                _object({"op": {"const": "delete"}, "key": key}, ["op", "key"]),
            ]}},
        }, ["keyspace"]) | {"description": "reads, conditions and writes: at least one of them "
                                           f"non-empty, {limits.max_batch_ops} keys at most"},
        "TxnRead": _object({"key": {"type": "string"}, "found": {"type": "boolean"},
                            "value": _ref("Value"), "version": {"type": ["integer", "null"]}},
                           ["key", "found", "value", "version"]),
        "BeginBody": _object({
            "keyspace": {"type": "string", "minLength": 1},
            "read_only": {"type": "boolean"},
            "priority": {"type": "integer", "minimum": 0, "maximum": MAX_PRIORITY_US},
        }),
        "TxnPutBody": _object({"value": _ref("Value")}, ["value"]),
        "EmptyBody": _object({}),
        "Grant": _object({
            "permission": {"enum": list(PERMISSIONS)},
            "keyspace": {"anyOf": [{"allOf": [_ref("KeyspaceName"),
                                              {"not": {"const": SYSTEM_KEYSPACE}}]},
                                   {"type": "null"}],
                         "description": "null or left out: cluster-wide (admin only); "
                                        f"{SYSTEM_KEYSPACE} takes no grants"},
        }, ["permission"], closed=False) | {
            # Only admin is also cluster-wide: read and write name their keyspace.
            "if": {"properties": {"permission": {"const": ADMIN}}},
            "else": {"required": ["keyspace"],
                     "properties": {"keyspace": {"type": "string"}}},
        },
        "UserName": {"type": "string", "pattern": f"^{USER_NAME.pattern}$"},
        "SnapshotName": {"type": "string", "minLength": 1,
                         "maxLength": MAX_SNAPSHOT_NAME_CHARS,
                         "pattern": f"^{SNAPSHOT_NAME.pattern}$"},
        "Password": {"type": "string", "minLength": MIN_PASSWORD_CHARS,
                     "maxLength": MAX_PASSWORD_CHARS},
        "AnyObject": {"type": "object"},
    }


# -- operations ---------------------------------------------------------------------------


def _param(name: str, where: str, schema: dict[str, Any], description: str,
           required: bool = False) -> dict[str, Any]:
    return {"name": name, "in": where, "required": required or where == "path",
            "schema": schema, "description": description}


def _consistency(write: bool) -> dict[str, Any]:
    return _param("consistency", "query", {"type": "string", "enum": _levels(write)},
                  "the consistency level (any case; the keyspace's default when left out or "
                  "empty; a "
                  "transactional keyspace takes SERIAL only)"
                  + ("" if write else "; ANY is for writes only"))


KEYSPACE_PATH = _param("keyspace", "path", _ref("KeyspaceName"), "the keyspace")
KEY_PATH = _param("key", "path", {"type": "string", "minLength": 1},
                  "the key, percent-encoded UTF-8 (it may contain /)")
TXN_ID_PATH = _param("txn_id", "path", _ref("TxnId"), "the transaction's id")
USER_PATH = _param("name", "path", _ref("UserName"), "the user")
IDEMPOTENCY = _param(IDEMPOTENCY_HEADER, "header",
                     {"type": "string", "pattern": f"^[ -~]{{1,{MAX_IDEMPOTENCY_KEY_CHARS}}}$"},
                     "a retry with the same key gets the first success's answer once more "
                     f"(with {REPLAY_HEADER}: true); reused for another request: 400")


def _json_body(schema: dict[str, Any], required: bool = True) -> dict[str, Any]:
    return {"required": required, "content": {JSON: {"schema": schema}}}


def _ok(schema: dict[str, Any], description: str = "done", status: int = 200,
        media_type: str = JSON) -> dict[str, Any]:
    return {str(status): {"description": description,
                          "content": {media_type: {"schema": schema}}}}


def _operation(route: str, summary: str, *, params: Sequence[dict[str, Any]] = (),
               body: dict[str, Any] | None = None, ok: dict[str, Any],
               errors: Iterable[type[RingKVError]] = (), joined: bool = True,
               tags: Sequence[str] = ()) -> dict[str, Any]:
    classes = [*COMMON_ERRORS, *(JOINED if joined else ()), *errors]
    if body is not None:
        classes += BODY_ERRORS
    if any(p["in"] == "path" for p in params):
        classes.append(NotFound)  # a path the router does not match (a key with a newline)
    responses = dict(ok)
    for status, codes in error_codes(classes).items():
        responses[str(status)] = _error_response(codes)
    operation: dict[str, Any] = {"operationId": route, "summary": summary,
                                 "tags": list(tags), "responses": responses}
    if params:
        operation["parameters"] = list(params)
    if body is not None:
        operation["requestBody"] = body
    return operation


def _watch_operations(tags: Sequence[str]) -> dict[str, dict[str, dict[str, Any]]]:
    """``GET /v1/watch/...`` (``server/watch_http.py``): a stream of commits."""
    event = _object({"type": {"enum": ["put", "delete", "progress", "error"]},
                     "key": {"type": "string"}, "value": _ref("Value"),
                     "version": {"type": "integer"}, "error": _ref("AnyObject")},
                    ["type"], closed=False)
    streams = {"200": {"description": (
        "one event a line: progress (where the stream starts, then each second when "
        "idle), put and delete in (version, key) order; an error event (watcher_too_slow, "
        "shutting_down, compacted ...) with last_version ends a stream the node ends"),
        "content": {NDJSON: {"schema": event},
                    "text/event-stream": {"schema": {"type": "string"}}}}}
    params = [_param("prefix", "query", {"type": "string", "enum": ["true", "false", "1", "0"]},
                     "every key starting with the path's key"),
              _param("from_version", "query",
                     {"type": "integer", "minimum": 0, "maximum": MAX_TIMESTAMP_US},
                     "the commits strictly after this version (µs); absent: from now"),
              _param("format", "query", {"type": "string", "enum": ["ndjson", "sse"]},
                     "ndjson (the default) or sse (as Accept: text/event-stream)"),
              _param("Last-Event-ID", "header", {"type": "string"},
                     "an EventSource reconnecting: from_version when that is absent")]
    errors = [Compacted, *TXN_ERRORS]
    return {
        "/v1/watch/{keyspace}/{key}": {"get": _operation(
            "watch", "Stream the commits to a key (or a prefix) of a transactional keyspace",
            params=[KEYSPACE_PATH, KEY_PATH, *params], ok=streams, errors=errors, tags=tags)},
        "/v1/watch/{keyspace}": {"get": _operation(
            "watch_keyspace", "Stream every commit to a transactional keyspace",
            params=[KEYSPACE_PATH, *params], ok=streams, errors=errors, tags=tags)},
    }


def _lease_operations(tags: Sequence[str]) -> dict[str, dict[str, dict[str, Any]]]:
    """``/v1/lease`` (``server/lease_http.py``): session leases on a transactional keyspace."""
    lease_path = _param("lease", "path", _ref("LeaseId"), "the lease's id")
    granted = _object({"ok": {"const": True}, "id": _ref("LeaseId"), "ttl": {"type": "integer"},
                       "version": {"type": "integer"}}, ["ok", "id", "ttl"])
    renewed = _object({"ok": {"const": True}, "id": _ref("LeaseId"), "ttl": {"type": "integer"},
                       "version": {"type": "integer"}, "remaining_ms": {"type": "integer"}},
                      ["ok", "id", "ttl", "remaining_ms"])
    revoked = _object({"ok": {"const": True}, "revoked": {"const": True}, "id": _ref("LeaseId"),
                       "version": {"type": "integer"},
                       "deleted": {"type": "array", "items": {"type": "string"}}},
                      ["ok", "id", "deleted"])
    shown = _object({"id": _ref("LeaseId"), "ttl": {"type": "integer"},
                     "version": {"type": "integer"}, "expires_at": {"type": "integer"},
                     "remaining_ms": {"type": "integer"}, "expired": {"type": "boolean"},
                     "keys": {"type": "array", "items": {"type": "string"}}},
                    ["id", "ttl", "remaining_ms", "keys"])
    grant_body = _object({"ttl": {"type": "integer", "minimum": 1},
                          "keyspace": _ref("KeyspaceName")}, ["ttl"]) | {
        "description": "ttl: seconds (at most txn.max_lease_ttl_s); keyspace: a transactional "
                       "one (may be left out when there is only one)"}
    return {
        "/v1/lease": {"post": _operation(
            "lease_grant", "Grant a session lease: keys put with it go when it expires",
            body=_json_body(grant_body), ok=_ok(granted, "its id and TTL"),
            errors=LEASE_ERRORS, tags=tags)},
        "/v1/lease/{lease}/keepalive": {"post": _operation(
            "lease_keepalive", "Renew a lease: it expires TTL seconds after this commit",
            params=[lease_path], ok=_ok(renewed, "renewed"), errors=LEASE_ERRORS, tags=tags)},
        "/v1/lease/{lease}": {
            "delete": _operation(
                "lease_revoke", "Revoke a lease: its keys are deleted now, in one transaction",
                params=[lease_path], ok=_ok(revoked, "revoked; the keys it deleted"),
                errors=LEASE_ERRORS, tags=tags),
            "get": _operation(
                "lease_get", "A lease's remaining TTL and the keys still attached to it",
                params=[lease_path], ok=_ok(shown, "the lease"), errors=LEASE_ERRORS,
                tags=tags)},
    }


def _operations(limits: LimitsConfig) -> dict[str, dict[str, dict[str, Any]]]:
    """path -> method -> operation; operationId is the aiohttp route's name."""
    kv, txn, cluster, admin, auth = ["kv"], ["txn"], ["cluster"], ["admin"], ["auth"]
    dashboard = ["dashboard"]
    page = _ok({"type": "string"}, "the page (HTML)", media_type="text/html")
    dashboard_node = _object({"node_id": {"type": "string"}, "wall_ms": {"type": "integer"},
                              "history": _ref("AnyObject"), "hints": _ref("AnyObject"),
                              "repair": _ref("AnyObject"),
                              "transactional": {"type": ["object", "null"]}},
                             ["node_id", "wall_ms", "history", "hints", "repair",
                              "transactional"], closed=False)
    key_params = [KEYSPACE_PATH, KEY_PATH]
    write_ok = _ok({"anyOf": [_ref("WriteResult"), _ref("TxnWriteResult")]},
                   "written: its timestamp and receipt (a transactional keyspace: its commit)")
    txn_write_ok = _ok(_object({"ok": {"const": True}, "id": _ref("TxnId"),
                                "buffered": {"type": "integer"}}, ["ok", "id", "buffered"]),
                       "locked and buffered until commit")
    no_body = _json_body(_ref("EmptyBody"), required=False)
    streaming = _object({"node_id": {"type": "string"}, "streaming": {}}, ["node_id"],
                        closed=False)
    user_ok = _object({"ok": {"const": True}, "user": {"type": "string"},
                       "grants": {"type": "array", "items": {"type": "string"}}},
                      ["ok", "user"])
    return {
        "/v1/kv/{keyspace}/{key}": {
            "put": _operation(
                "put", "Write a key's value",
                params=[*key_params, _consistency(write=True),
                        _param("ttl", "query", _ref("Ttl"), "as the body's ttl"), IDEMPOTENCY],
                body=_json_body(_ref("PutBody")), ok=write_ok,
                errors=[*EVENTUAL_ERRORS, *TXN_ERRORS, LeaseExpired], tags=kv),
            "get": _operation(
                "get", "Read a key",
                params=[*key_params, _consistency(write=False),
                        _param("local", "query", {"type": "string"},
                               "1, true or yes: this node's own copy, no quorum"),
                        _param("snapshot_ts", "query",
                               {"type": "integer", "minimum": 0, "maximum": MAX_TIMESTAMP_US},
                               "a transactional keyspace: read at this timestamp (µs)"),
                        _param("max_staleness_ms", "query",
                               {"type": "integer", "minimum": 0, "maximum": MAX_STALENESS_MS},
                               "a transactional keyspace: a snapshot at most this old")],
                ok=_ok({"anyOf": [_ref("Cell"), _ref("VersionedValue")]}, "the value"),
                errors=[*EVENTUAL_ERRORS, *TXN_ERRORS], tags=kv),
            "delete": _operation(
                "delete", "Delete a key (a tombstone)",
                params=[*key_params, _consistency(write=True), IDEMPOTENCY],
                body=_json_body(_ref("DeleteBody"), required=False), ok=write_ok,
                errors=[*EVENTUAL_ERRORS, *TXN_ERRORS], tags=kv),
        },
        "/v1/kv/{keyspace}": {"get": _operation(
            "scan", "Page through an eventual keyspace in token order",
            params=[KEYSPACE_PATH, _consistency(write=False),
                    _param("limit", "query",
                           {"type": "integer", "minimum": 1, "maximum": limits.max_scan_page},
                           "items per page"),
                    _param("page_token", "query", {"type": "string"},
                           "the previous page's next_page_token")],
            ok=_ok(_object({
                "items": {"type": "array", "items": _object({
                    "key": {"type": "string"}, "value": _ref("Value"),
                    "timestamp": _ref("Timestamp")}, ["key", "value", "timestamp"])},
                "next_page_token": {"type": ["string", "null"]},
                "receipt": _ref("Receipt"),
            }, ["items", "next_page_token", "receipt"]), "a page"),
            errors=EVENTUAL_ERRORS, tags=kv)},
        "/v1/batch": {"post": _operation(
            "batch", "Several independent operations (not atomic)",
            params=[_consistency(write=True), IDEMPOTENCY], body=_json_body(_ref("BatchBody")),
            ok=_ok(_object({"results": {"type": "array", "items": _ref("BatchResult")}},
                           ["results"]), "each operation's result, in order"),
            errors=EVENTUAL_ERRORS, tags=kv)},
        "/v1/txn": {"post": _operation(
            "txn", "A one-shot transaction: reads, conditions and writes at one timestamp",
            params=[IDEMPOTENCY], body=_json_body(_ref("TxnBody")),
            ok=_ok(_object({
                "ok": {"const": True}, "id": _ref("TxnId"), "committed": {"type": "boolean"},
                "reads": {"type": "array", "items": _ref("TxnRead")},
                "receipt": _ref("TxnReceipt"), "commit_ts": {"type": "integer"},
                "replayed": {"const": True, "description": "an earlier attempt under this id "
                             "committed; its reads are not returned"},
            }, ["ok", "id", "committed", "reads"]), "committed, or its conditions failed"),
            errors=TXN_ERRORS, tags=txn)},
        "/v1/txn/{txn_id}": {"get": _operation(
            "txn_status", "A transaction's definite outcome",
            params=[TXN_ID_PATH,
                    _param("keyspace", "query", {"type": "string", "minLength": 1},
                           "the transaction's keyspace", required=True),
                    _param("key", "query", {"type": "string", "minLength": 1},
                           "a key it touched (needed when the keyspace has several ranges)")],
            ok=_ok(_object({"id": {"type": "string"}, "status": {"type": "string"},
                            "commit_ts": {"type": ["integer", "null"]},
                            "range": {}}, ["id", "status"], closed=False), "its status"),
            errors=TXN_ERRORS, tags=txn)},
        **_watch_operations(txn),
        **_lease_operations(txn),
        "/v1/txn/begin": {"post": _operation(
            "txn_begin", "Begin an interactive transaction on this node",
            params=[IDEMPOTENCY], body=_json_body(_ref("BeginBody"), required=False),
            ok=_ok(_object({"ok": {"const": True}, "txn_id": _ref("TxnId"),
                            "keyspace": {"type": "string"}, "read_only": {"type": "boolean"},
                            "priority": {"type": "integer"}, "node_id": {"type": "string"}},
                           ["ok", "txn_id", "keyspace", "read_only", "node_id"], closed=False),
                   "its id: send its calls to this node"),
            errors=[*TXN_ERRORS, TooLarge], tags=txn)},
        "/v1/txn/{txn_id}/kv/{keyspace}/{key}": {
            "get": _operation(
                "txn_get", "Read a key in the transaction",
                params=[TXN_ID_PATH, *key_params, IDEMPOTENCY],
                ok=_ok(_object({"id": _ref("TxnId"), "key": {"type": "string"},
                                "version": {"type": ["integer", "null"]},
                                "own_write": {"const": True}, "value": _ref("Value")},
                               ["id", "key", "version", "value"]), "the value it sees"),
                errors=TXN_ERRORS, tags=txn),
            "put": _operation(
                "txn_put", "Lock a key and buffer a put",
                params=[TXN_ID_PATH, *key_params, IDEMPOTENCY],
                body=_json_body(_ref("TxnPutBody")), ok=txn_write_ok,
                errors=TXN_ERRORS, tags=txn),
            "delete": _operation(
                "txn_delete", "Lock a key and buffer a delete",
                params=[TXN_ID_PATH, *key_params, IDEMPOTENCY], body=no_body,
                ok=txn_write_ok, errors=TXN_ERRORS, tags=txn),
        },
        "/v1/txn/{txn_id}/commit": {"post": _operation(
            "txn_commit", "Commit (two-phase commit over the ranges it touched)",
            params=[TXN_ID_PATH, IDEMPOTENCY], body=no_body,
            ok=_ok(_object({"ok": {"const": True}, "id": _ref("TxnId"),
                            "committed": {"const": True}}, ["ok", "id", "committed"],
                           closed=False), "committed"),
            errors=TXN_ERRORS, tags=txn)},
        "/v1/txn/{txn_id}/abort": {"post": _operation(
            "txn_abort", "Abort: release its locks, apply nothing",
            params=[TXN_ID_PATH, IDEMPOTENCY], body=no_body,
            ok=_ok(_object({"ok": {"const": True}, "id": _ref("TxnId"),
                            "aborted": {"const": True}}, ["ok", "id", "aborted"]), "aborted"),
            errors=TXN_ERRORS, tags=txn)},
        "/v1/status": {"get": _operation(
            "status", "The cluster as this node sees it (nodetool status)", joined=False,
            ok=_ok(_object({
                "node_id": {"type": "string"}, "cluster": {"type": "string"},
                "joining": {"type": ["object", "null"]}, "streaming": {},
                "nodes": {"type": "array", "items": _object({
                    "node_id": {"type": "string"}, "address": {"type": ["string", "null"]},
                    "liveness": {"type": "string"}, "status": {"type": "string"},
                    "load_bytes": {"type": "integer"}, "tokens": {"type": "integer"},
                    "owns": {"type": "number"}, "dc": {"type": ["string", "null"]},
                    "rack": {"type": ["string", "null"]}, "phi": {"type": ["number", "null"]},
                }, ["node_id", "liveness", "status"])},
                "keyspaces": {}, "storage": _ref("AnyObject"), "hints": _ref("AnyObject"),
                "repair": _ref("AnyObject"), "transactional": _ref("AnyObject"),
            }, ["node_id", "cluster", "nodes", "keyspaces"]), "one row per node"),
            tags=cluster)},
        "/v1/ring": {"get": _operation(
            "ring", "The ring: tokens and addresses, for token-aware clients", joined=False,
            ok=_ok(_object({
                "partitioner": {"const": "murmur3"},
                "nodes": {"type": "array", "items": _object({
                    "node_id": {"type": "string"},
                    "client_address": {"type": ["string", "null"]},
                    "native_address": {"type": ["string", "null"]},
                    "tokens": {"type": "array", "items": {"type": "integer"}},
                    "up": {"type": "boolean"}, "dc": {"type": ["string", "null"]},
                    "rack": {"type": ["string", "null"]},
                }, ["node_id", "tokens", "up"])},
                "keyspaces": {},
            }, ["partitioner", "nodes", "keyspaces"]), "the ring"), tags=cluster)},
        "/v1/health": {"get": _operation(
            "health", "Liveness: 200 once the node serves clients",
            ok=_ok(_object({"ok": {"const": True}, "node_id": {"type": "string"}},
                           ["ok", "node_id"]), "serving"), tags=cluster)},
        "/metrics": {"get": _operation(
            "metrics", "Prometheus metrics (text exposition format)", joined=False,
            ok=_ok({"type": "string"}, "the metrics", media_type=METRICS_MEDIA_TYPE),
            tags=cluster)},
        PATH: {"get": _operation(
            "openapi", "This document", joined=False,
            ok=_ok(_ref("AnyObject"), "the OpenAPI document"), tags=cluster)},
        "/v1/decommission": {"post": _operation(
            "decommission", "Start this node's decommission (progress: /v1/status)",
            ok=_ok(streaming, "started", status=202), errors=TOPOLOGY_ERRORS, tags=admin)},
        "/v1/removenode": {"post": _operation(
            "removenode", "Remove a dead node, coordinated by this node",
            body=_json_body(_object({"node_id": {"type": "string", "minLength": 1}},
                                    ["node_id"], closed=False)),
            ok=_ok(streaming, "started", status=202), errors=TOPOLOGY_ERRORS, tags=admin)},
        "/v1/admin/repair": {
            "post": _operation(
                "repair", "Run an anti-entropy repair on this node",
                body=_json_body(_object({
                    "keyspace": {"type": ["string", "null"],
                                 "description": "one keyspace (null or left out: all)"},
                    "range": {"type": ["string", "null"],
                              "description": "START:END tokens (null or left out: every "
                                             "range this node replicates)"},
                }), required=False),
                ok=_ok({"type": "string"}, "one JSON line per event: start, one range per "
                       "range repaired, done with the report", media_type=NDJSON),
                errors=[RepairRunning, ReplicaDown, NotFound, Unavailable, Timeout,
                        PeerUnreachable, PeerTimeout, RemoteError, StorageError], tags=admin),
            "get": _operation(
                "repair_status", "The repair scheduler, the run in progress, the last run",
                ok=_ok(_ref("AnyObject"), "the repair status"), tags=admin),
        },
        "/v1/snapshots": {
            "post": _operation(
                "snapshot_create", "Take a snapshot of this node's eventual tier",
                body=_json_body(_object({"name": {
                    "anyOf": [_ref("SnapshotName"), {"type": "null"}],
                    "description": "null or left out: snapshot-<UTC time>"}}), required=False),
                ok=_ok(_object({"name": {"type": "string"}, "node_id": {"type": "string"}},
                               ["name", "node_id"], closed=False),
                       "its manifest, once it is on disk", status=201),
                errors=SNAPSHOT_ERRORS, tags=admin),
            "get": _operation(
                "snapshot_list", "The snapshots on this node, oldest first",
                ok=_ok(_object({"node_id": {"type": "string"},
                                "running": {"type": ["string", "null"]},
                                "snapshots": {"type": "array", "items": _ref("AnyObject")}},
                               ["node_id", "running", "snapshots"]), "the snapshots"),
                tags=admin),
        },
        "/v1/snapshots/{name}": {"delete": _operation(
            "snapshot_delete", "Delete a snapshot of this node",
            params=[_param("name", "path", _ref("SnapshotName"), "the snapshot")],
            ok=_ok(_object({"node_id": {"type": "string"}, "deleted": {"type": "string"}},
                           ["node_id", "deleted"]), "deleted"),
            errors=SNAPSHOT_ERRORS, tags=admin)},
        # The web dashboard (ringkv/server/dashboard): its page and the JSON it polls.
        "/ui": {"get": _operation("ui", "The web dashboard's page", ok=page, tags=dashboard)},
        "/ui/": {"get": _operation("ui_slash", "The web dashboard's page", ok=page,
                                   tags=dashboard)},
        "/ui/{name}": {"get": _operation(
            "ui_file", "One file of the web dashboard",
            params=[_param("name", "path",
                           {"type": "string", "enum": ["index.html", "dashboard.js",
                                                       "dashboard.css"]},
                           "the file")],
            ok={"200": {"description": "the file",
                        "content": {media: {"schema": {"type": "string"}}
                                    for media in ("text/html", "application/javascript", "text/css")}}},
            tags=dashboard)},
        "/v1/dashboard/node": {"get": _operation(
            "dashboard_node", "This node's request history (5 minutes, a sample a second), "
            "hints, last repair and transactional groups",
            ok=_ok(dashboard_node, "this node's view"), tags=dashboard)},
        "/v1/dashboard/cluster": {"get": _operation(
            "dashboard_cluster", "Every node's /v1/dashboard/node, gathered by this node "
            "(1.5 s per peer; an unreachable peer is named with its error)",
            ok=_ok(_object({"node_id": {"type": "string"},
                            "nodes": {"type": "object", "additionalProperties": _ref("AnyObject")}},
                           ["node_id", "nodes"]), "every node's view"), tags=dashboard)},
        "/v1/auth/token": {"post": _operation(
            "auth_token", "A bearer token for the HTTP Basic credentials sent",
            ok=_ok(_object({"token": {"type": "string"}, "token_type": {"const": "Bearer"}},
                           ["token", "token_type"], closed=False), "a token"),
            errors=[NotFound], tags=auth)},
        "/v1/auth/secret/rotate": {"post": _operation(
            "auth_secret_rotate", "Rotate the token secret (cluster admin): a new one signs; "
            "the one it replaces and auth.previous_secrets - 1 before it still verify "
            "their tokens; older ones are retired (their tokens get 401 retired_secret)",
            ok=_ok(_object({"ok": {"const": True},
                            "secret_generation": {"type": "integer", "minimum": 2},
                            "previous_generations": {"type": "array",
                                                     "items": {"type": "integer"}}},
                           ["ok", "secret_generation", "previous_generations"]),
                   "rotated"),
            errors=[NotFound, Aborted], tags=auth)},
        "/v1/auth/whoami": {"get": _operation(
            "auth_whoami", "The caller and its grants",
            ok=_ok(_object({"user": {"type": "string"},
                            "grants": {"type": "array", "items": {"type": "string"}}},
                           ["user", "grants"]), "the caller"),
            errors=[NotFound], tags=auth)},
        "/v1/auth/users": {
            "get": _operation(
                "auth_users", "Every user",
                ok=_ok(_object({"users": {"type": "array", "items": _ref("AnyObject")}},
                               ["users"]), "the users"),
                errors=[NotFound], tags=auth),
            "post": _operation(
                "auth_user_add", "Add a user (or replace its password and grants)",
                body=_json_body(_object({"name": _ref("UserName"), "password": _ref("Password"),
                                         "grants": {"type": "array", "items": _ref("Grant")}},
                                        ["name", "password"], closed=False)),
                ok=_ok(user_ok, "added", status=201), errors=[NotFound, Aborted], tags=auth),
        },
        "/v1/auth/users/{name}": {"delete": _operation(
            "auth_user_delete", "Remove a user", params=[USER_PATH],
            ok=_ok(user_ok, "removed"), errors=[NotFound, Aborted], tags=auth)},
        "/v1/auth/users/{name}/password": {"put": _operation(
            "auth_passwd", "Set a user's password", params=[USER_PATH],
            body=_json_body(_object({"password": _ref("Password")}, ["password"],
                                    closed=False)),
            ok=_ok(user_ok, "set"), errors=[NotFound, Aborted], tags=auth)},
        "/v1/auth/users/{name}/grants": {
            method: _operation(
                route, summary, params=[USER_PATH], body=_json_body(_ref("Grant")),
                ok=_ok(user_ok, "done"), errors=[NotFound, Aborted], tags=auth)
            for method, route, summary in (("post", "auth_grant", "Grant a permission"),
                                           ("delete", "auth_revoke", "Revoke a permission"))
        },
    }


def _shared_errors(paths: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """Move each error response into components.responses, once per status and codes
    (operations share most of theirs), and point the operations at it."""
    shared: dict[str, Any] = {}
    for methods in paths.values():
        for operation in methods.values():
            for status, response in operation["responses"].items():
                if int(status) < 400:
                    continue
                codes = response["content"][JSON]["schema"]["properties"]["error"][
                    "properties"]["code"]["enum"]
                name = f"Error{status}_" + "_".join(codes)
                shared.setdefault(name, response)
                operation["responses"][status] = {"$ref": f"#/components/responses/{name}"}
    return dict(sorted(shared.items()))


def build_spec(limits: LimitsConfig, *, version: str = "0.1.0") -> dict[str, Any]:
    """The OpenAPI document of a node with ``limits``."""
    paths = _operations(limits)
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "ringkv HTTP API",
            "version": version,
            "description": (
                "Every error is a JSON body {\"error\": {\"code\", \"message\", ...details}} "
                "with a stable code and HTTP status (ringkv/errors.py); each operation lists "
                "the codes it may answer. A node answers 503 not_joined until it is on the "
                "ring (except /v1/status, /v1/ring, /metrics and this document). With "
                "auth.enabled, send HTTP Basic credentials or a bearer token from "
                "POST /v1/auth/token; without it, the /v1/auth routes answer 404."),
            "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
        },
        "paths": paths,
        "components": {
            "responses": _shared_errors(paths),
            "schemas": _schemas(limits),
            "securitySchemes": {
                "basic": {"type": "http", "scheme": "basic"},
                "bearer": {"type": "http", "scheme": "bearer"},
            },
        },
        # Credentials are needed only with auth.enabled (and not for health or a login).
        "security": [{}, {"basic": []}, {"bearer": []}],
    }
