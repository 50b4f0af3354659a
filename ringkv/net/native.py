"""The native client protocol's core (pure): the handshake, and requests from untrusted frames.

Frames are the internode codec's (``net/codec.py``: a u32 length, then the
msgpack array ``[version, kind, request_id, verb, payload]``) on a port of
their own (``cluster.native_port``). ``docs/native-protocol.md`` is the
specification; this module decides, and the shell (``server/native.py``)
only moves bytes.

- Handshake: the client's first frame is a ``hello`` request (id 0) naming
  the versions it speaks, and with ``auth.enabled`` its credentials (``user``
  and ``password``, or ``token``), checked once for the connection; the node
  answers with the version it chose, or a ``KIND_ERROR`` (``protocol_error``
  naming the field, or ``unauthenticated`` / ``too_many_attempts``) and closes.
- Requests: a ``KIND_REQUEST`` whose verb is an operation of the HTTP API
  (``OPERATIONS``) and whose payload is a map: ``keyspace``, ``key``,
  ``txn_id``, ``args`` (the HTTP query parameters), ``body`` (the HTTP
  body's JSON document, as bytes) and ``idempotency_key``. The answer is a
  ``KIND_RESPONSE`` with the same id and verb, payload ``{"status", "body"}``:
  HTTP's status code and JSON document, so error codes and receipts are the
  HTTP API's. Many requests may be in flight; answers come in any order.
- A malformed request whose id is known is answered (status 400, the field
  named) and the connection serves on; a malformed frame is answered with a
  ``KIND_ERROR`` and the connection closes (the stream is out of sync).
- Version 2 (``STREAM_VERSION``) adds the session lease operations (answered
  once, as any) and ``watch``, answered by a stream of response frames of its
  request id (``stream_payload``: one event, and ``more`` until the last), and
  ``watch_cancel``. A connection that chose version 1 is refused them, so a
  client that never asked for version 2 never sees a stream.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ringkv.errors import ProtocolError, RingKVError, TooLarge
from ringkv.net.codec import KIND_REQUEST, KIND_RESPONSE, Frame

NATIVE_VERSION = 1  # the version of the hello frames, before one is chosen
STREAM_VERSION = 2  # adds the session lease operations and the watch stream
VERSIONS = (NATIVE_VERSION, STREAM_VERSION)  # the versions this node speaks, best last
HELLO = "hello"
HELLO_ID = 0
# The gossip application state that tells peers (and, through /v1/ring, clients)
# where a node's native listener is; absent when it has none.
GOSSIP_KEY = "NATIVE_ADDR"

# verb -> the route of the HTTP API it is (its metrics label too).
OPERATIONS: Mapping[str, str] = {
    "get": "get",
    "put": "put",
    "delete": "delete",
    "scan": "scan",
    "batch": "batch",
    "txn": "txn",
    "txn_status": "txn_status",
    "txn_begin": "txn_begin",
    "txn_get": "txn_get",
    "txn_put": "txn_put",
    "txn_delete": "txn_delete",
    "txn_commit": "txn_commit",
    "txn_abort": "txn_abort",
    "status": "status",
    "ring": "ring",
    "health": "health",
    # Version 2: session leases (answered once) and watches (answered by a stream).
    "lease_grant": "lease_grant",
    "lease_keepalive": "lease_keepalive",
    "lease_revoke": "lease_revoke",
    "lease_info": "lease_get",
    "watch": "watch",
    "watch_cancel": "watch_cancel",
}
# The operations a connection may send only once version 2 was chosen: a client of
# version 1 never sends them, so it never sees a stream.
V2_OPERATIONS = frozenset({"lease_grant", "lease_keepalive", "lease_revoke", "lease_info",
                           "watch", "watch_cancel"})
WATCH = "watch"
WATCH_CANCEL = "watch_cancel"
# The args a watch takes (HTTP's query without ``format``: frames are its format).
WATCH_ARGS = frozenset({"prefix", "from_version"})
# What each operation needs in its payload besides args.
_NEEDS_KEY = frozenset({"get", "put", "delete", "txn_get", "txn_put", "txn_delete"})
_NEEDS_KEYSPACE = frozenset({"get", "put", "delete", "scan", "txn_get", "txn_put", "txn_delete",
                             "watch"})
_NEEDS_LEASE_ID = frozenset({"lease_keepalive", "lease_revoke", "lease_info"})
# The calls of one transaction (``txn_status`` too: it names one by id).
_NEEDS_TXN_ID = frozenset({"txn_status", "txn_get", "txn_put", "txn_delete", "txn_commit",
                           "txn_abort"})
_PAYLOAD_FIELDS = frozenset({"keyspace", "key", "txn_id", "args", "body", "idempotency_key",
                             "lease_id", "watch_id"})
MAX_ARGS = 16
MAX_CREDENTIAL_CHARS = 4096
MAX_ARG_CHARS = 4096


@dataclass(frozen=True)
class Hello:
    """The handshake, decided: the version both speak, and the client's credentials
    (``user`` and ``password``, or ``token``; none when it sent none)."""

    version: int
    client: str
    user: str | None = None
    password: str | None = None
    token: str | None = None


@dataclass(frozen=True)
class Request:
    """One operation, its fields type-checked (their values are checked by the API's
    validation, as HTTP's are)."""

    request_id: int
    verb: str
    keyspace: str = ""
    key: str = ""
    txn_id: str = ""
    args: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""
    idempotency_key: str | None = None
    lease_id: str = ""  # the lease of lease_keepalive, lease_revoke, lease_info
    watch_id: int = 0  # the request id of the watch a watch_cancel ends


def hello(frame: Frame) -> Hello:
    """The client's first frame as a ``Hello``, or ``ProtocolError`` naming the field."""
    if frame.kind != KIND_REQUEST or frame.verb != HELLO or frame.request_id != HELLO_ID:
        raise ProtocolError("the first frame must be a hello request with id 0",
                            field="hello", verb=frame.verb[:64])
    payload = frame.payload
    if not isinstance(payload, dict):
        raise ProtocolError("the hello payload must be a map", field="hello")
    offered = payload.get("versions")
    if (not isinstance(offered, list) or not offered or len(offered) > 16
            or any(type(v) is not int for v in offered)):
        raise ProtocolError("versions must be a non-empty list of integers", field="versions")
    common = [v for v in VERSIONS if v in offered]
    if not common:
        raise ProtocolError(
            f"no common protocol version: the client offers {offered}, this node speaks "
            f"{list(VERSIONS)}", field="versions", supported=list(VERSIONS))
    client = payload.get("client", "")
    if not isinstance(client, str):
        raise ProtocolError("client must be a string", field="client")
    credentials: dict[str, str | None] = {}
    for name in ("user", "password", "token"):
        value = payload.get(name)
        if value is not None and (not isinstance(value, str) or len(value) > MAX_CREDENTIAL_CHARS):
            raise ProtocolError(f"{name} must be a string of at most {MAX_CREDENTIAL_CHARS} "
                                "characters", field=name)
        credentials[name] = value
    if (credentials["user"] is None) != (credentials["password"] is None):
        raise ProtocolError("user and password come together", field="password")
    if credentials["token"] is not None and credentials["user"] is not None:
        raise ProtocolError("send user and password, or a token, not both", field="token")
    return Hello(max(common), client[:128], credentials["user"], credentials["password"],
                 credentials["token"])


def hello_answer(chosen: Hello, *, node_id: str, max_frame_bytes: int,
                 max_in_flight: int, user: str | None = None) -> dict[str, Any]:
    answer: dict[str, Any] = {"version": chosen.version, "node_id": node_id,
                              "max_frame_bytes": max_frame_bytes, "max_in_flight": max_in_flight}
    if user is not None:
        answer["user"] = user  # the principal the connection runs as
    return answer


def request(frame: Frame, version: int = NATIVE_VERSION) -> Request:
    """A request frame of a connection speaking ``version`` as a ``Request``, or
    ``ProtocolError`` naming the field."""
    if frame.kind != KIND_REQUEST:
        raise ProtocolError(f"a client sends requests only, not frames of kind {frame.kind}",
                            field="kind")
    if frame.request_id == HELLO_ID:
        raise ProtocolError("request id 0 is the handshake's", field="request_id")
    verb = frame.verb
    if verb not in OPERATIONS:
        raise ProtocolError(f"unknown operation {verb[:64]!r}; one of "
                            f"{', '.join(OPERATIONS)}", field="verb")
    if verb in V2_OPERATIONS and version < STREAM_VERSION:
        raise ProtocolError(f"operation {verb!r} needs protocol version {STREAM_VERSION}; this "
                            f"connection chose {version} in its hello", field="verb",
                            version=version)
    payload = frame.payload
    if payload is None:
        payload = {}
    if not isinstance(payload, dict):
        raise ProtocolError("the payload must be a map", field="payload")
    for name in payload:
        if name not in _PAYLOAD_FIELDS:
            raise ProtocolError(f"unknown field {str(name)[:64]!r}", field=str(name)[:64])
    keyspace = _text(payload, "keyspace", required=verb in _NEEDS_KEYSPACE)
    key = _text(payload, "key", required=verb in _NEEDS_KEY)
    txn_id = _text(payload, "txn_id", required=verb in _NEEDS_TXN_ID)
    body = payload.get("body", b"")
    if not isinstance(body, bytes):
        raise ProtocolError("body must be bytes (a JSON document)", field="body")
    idempotency_key = payload.get("idempotency_key")
    if idempotency_key is not None and not isinstance(idempotency_key, str):
        raise ProtocolError("idempotency_key must be a string", field="idempotency_key")
    lease_id = _text(payload, "lease_id", required=verb in _NEEDS_LEASE_ID)
    watch_id = payload.get("watch_id", 0)
    if (verb == WATCH_CANCEL or "watch_id" in payload) and (type(watch_id) is not int or not 0 < watch_id < 2**64):
        raise ProtocolError("watch_id must be the request id of a watch of this connection",
                            field="watch_id")
    args = _args(payload.get("args"))
    if verb == WATCH:
        unknown = sorted(set(args) - WATCH_ARGS)
        if unknown:
            raise ProtocolError(f"unknown argument {unknown[0]!r}; a watch takes prefix and "
                                "from_version", field=f"args.{unknown[0]}")
    return Request(frame.request_id, verb, keyspace, key, txn_id, args, body, idempotency_key,
                   lease_id, watch_id)


def _text(payload: Mapping[str, Any], name: str, *, required: bool) -> str:
    value = payload.get(name)
    if value is None:
        if required:
            raise ProtocolError(f"{name} is required", field=name)
        return ""
    if not isinstance(value, str) or (required and not value):
        raise ProtocolError(f"{name} must be a non-empty string", field=name)
    return value


def _args(raw: Any) -> Mapping[str, str]:
    """The query parameters: strings, or integers and booleans written as HTTP would."""
    if raw is None:
        return {}
    if not isinstance(raw, dict) or len(raw) > MAX_ARGS:
        raise ProtocolError(f"args must be a map of at most {MAX_ARGS} entries", field="args")
    args: dict[str, str] = {}
    for name, value in raw.items():
        if not isinstance(name, str) or len(name) > 64:
            raise ProtocolError("each args name must be a short string", field="args")
        if isinstance(value, bool):
            value = "true" if value else "false"
        elif type(value) is int:
            value = str(value)
        if not isinstance(value, str) or len(value) > MAX_ARG_CHARS:
            raise ProtocolError(f"args.{name} must be a string or an integer",
                                field=f"args.{name}")
        args[name] = value
    return args


def response_payload(status: int, body: bytes, replayed: bool = False) -> dict[str, Any]:
    if replayed:
        return {"status": status, "body": body, "replayed": True}
    return {"status": status, "body": body}


def stream_payload(event: bytes | None, *, more: bool) -> dict[str, Any]:
    """A frame of a watch's stream: one event (an NDJSON line of the HTTP watch, bytes)
    and whether more frames of the stream follow (false: it is the last)."""
    if event is None:
        return {"status": 200, "more": more}
    return {"status": 200, "event": event, "more": more}


def frame_error(error: ProtocolError, max_frame_bytes: int) -> RingKVError:
    """What a broken frame is answered with: an over-long one as ``too_large`` naming the
    limit, anything else as the protocol error it is."""
    size = error.details.get("size")
    if isinstance(size, int) and size > max_frame_bytes:
        return TooLarge(
            f"frame of {size} bytes; the limit is {max_frame_bytes} bytes "
            "(limits.max_request_bytes)", field="frame", limit=max_frame_bytes, size=size)
    return error


def is_response(frame: Frame) -> bool:
    return frame.kind == KIND_RESPONSE
