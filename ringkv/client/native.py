"""The client's side of the native protocol (``net/native.py``), sans I/O.

The plans (``operations.py``) speak in HTTP requests (``Send``); a request
for a node whose native address the ring named is carried over the native
protocol instead: ``to_native`` turns the ``Send`` into an operation and its
payload, and ``reply`` turns the answer back into the ``Reply`` the plan
expects. The status, the JSON document and the replay flag are the HTTP
API's, so the plans decode both the same way.

A watch (protocol version 2) is not a plan's request: the shells send
``watch_frame`` on a connection of its own and read its answer with
``stream_part``, feeding each event line to ``WatchCore`` (``watch.py``).

Pure: no sockets, no event loop.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from ringkv.client.plan import Reply, Send
from ringkv.errors import ProtocolError, RingKVError
from ringkv.net.codec import KIND_REQUEST, KIND_RESPONSE, Frame, encode_frame
from ringkv.net.native import (
    HELLO, HELLO_ID, NATIVE_VERSION, STREAM_VERSION, V2_OPERATIONS, VERSIONS, WATCH,
)

IDEMPOTENCY_HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
_FIXED = {("GET", "/v1/status"): "status", ("GET", "/v1/ring"): "ring",
          ("GET", "/v1/health"): "health", ("POST", "/v1/batch"): "batch",
          ("POST", "/v1/txn"): "txn"}
_KEY_VERBS = {"GET": "get", "PUT": "put", "DELETE": "delete"}


@dataclass(frozen=True)
class NativeRequest:
    base_url: str  # the node, as the ring names it
    verb: str
    payload: Mapping[str, Any]


def base_url(url: str) -> str:
    """The node part of a request URL (``http://host:port``)."""
    cut = url.find("/v1/")
    return url if cut < 0 else url[:cut]


def to_native(send: Send) -> NativeRequest | None:
    """The native operation for an HTTP request of the plans, or None (no such operation:
    the request goes over HTTP)."""
    parts = urlsplit(send.url)
    path = parts.path
    base = f"{parts.scheme}://{parts.netloc}"
    payload: dict[str, Any] = {}
    verb = _FIXED.get((send.method, path))
    if verb is None:
        if path.startswith("/v1/kv/"):
            keyspace, slash, raw_key = path[len("/v1/kv/"):].partition("/")
            payload["keyspace"] = unquote(keyspace)
            if slash:
                verb = _KEY_VERBS.get(send.method)
                payload["key"] = unquote(raw_key, errors="strict")
            elif send.method == "GET":
                verb = "scan"
        elif path == "/v1/txn/begin" and send.method == "POST":
            verb = "txn_begin"
        elif path == "/v1/lease" and send.method == "POST":
            verb = "lease_grant"
        elif path.startswith("/v1/lease/"):
            verb = _lease_call(send.method, path[len("/v1/lease/"):], payload)
        elif path.startswith("/v1/txn/"):
            verb = _txn_call(send.method, path[len("/v1/txn/"):], payload)
        if verb is None:
            return None
    if parts.query:
        payload["args"] = dict(parse_qsl(parts.query, keep_blank_values=True))
    if send.body:
        payload["body"] = send.body
    idempotency_key = send.headers.get(IDEMPOTENCY_HEADER)
    if idempotency_key is not None:
        payload["idempotency_key"] = idempotency_key
    return NativeRequest(base, verb, payload)


def _txn_call(method: str, rest: str, payload: dict[str, Any]) -> str | None:
    """The verb of ``/v1/txn/{txn_id}[/...]`` (filling in ``payload``), or None."""
    txn_id, slash, tail = rest.partition("/")
    payload["txn_id"] = unquote(txn_id)
    if not slash:
        return "txn_status" if method == "GET" else None
    if tail in ("commit", "abort"):
        return f"txn_{tail}" if method == "POST" else None
    if tail.startswith("kv/"):
        keyspace, slash, raw_key = tail[len("kv/"):].partition("/")
        verb = _KEY_VERBS.get(method)
        if not slash or verb is None:
            return None
        payload["keyspace"] = unquote(keyspace)
        payload["key"] = unquote(raw_key, errors="strict")
        return f"txn_{verb}"
    return None


def _lease_call(method: str, rest: str, payload: dict[str, Any]) -> str | None:
    """The verb of ``/v1/lease/{id}[/keepalive]`` (filling in ``payload``), or None."""
    lease_id, slash, tail = rest.partition("/")
    payload["lease_id"] = unquote(lease_id, errors="strict")
    if not slash:
        return {"GET": "lease_info", "DELETE": "lease_revoke"}.get(method)
    return "lease_keepalive" if tail == "keepalive" and method == "POST" else None


def needs_streams(request: NativeRequest) -> bool:
    """Whether the operation needs protocol version 2 (a connection that chose 1, to a
    node of an older release, cannot carry it: it goes over HTTP)."""
    return request.verb in V2_OPERATIONS


def watch_frame(request_id: int, payload: Mapping[str, Any], version: int) -> bytes:
    """A ``watch`` request (``WatchCore.native_payload``): answered by a stream of frames."""
    return encode_frame(KIND_REQUEST, request_id, WATCH, dict(payload), version=version)


@dataclass(frozen=True)
class StreamPart:
    """One frame of a watch's answer: an event (an NDJSON line of the HTTP watch) and
    whether more follow; or ``refusal``, the node's answer when it refused the watch."""

    event: bytes | None
    more: bool
    refusal: Reply | None = None


def stream_part(frame: Frame) -> StreamPart:
    """A frame answering a ``watch``, or ``ProtocolError``."""
    payload = frame.payload
    if frame.kind != KIND_RESPONSE or not isinstance(payload, dict):
        raise _refusal(frame, "the node answered the watch with an error frame")
    if "body" in payload:  # an ordinary answer: the watch was refused (or failed) whole
        return StreamPart(None, False, reply(frame))
    event = payload.get("event")
    more = payload.get("more")
    if payload.get("status") != 200 or not isinstance(more, bool) or not (
            event is None or isinstance(event, bytes)):
        raise ProtocolError("a watch frame needs status 200, bytes event and boolean more",
                            field="payload")
    return StreamPart(event, more)


def hello_frame(client: str = "ringkv-python", credentials: Mapping[str, str] | None = None
                ) -> bytes:
    """The handshake; ``credentials``: ``user`` and ``password``, or ``token`` (auth.enabled)."""
    return encode_frame(KIND_REQUEST, HELLO_ID, HELLO,
                        {"versions": list(VERSIONS), "client": client, **(credentials or {})},
                        version=NATIVE_VERSION)


# Refusals of the hello that are the caller's to see as they are, not a broken connection.
_LOGIN_REFUSALS = frozenset({"unauthenticated", "too_many_attempts"})


def check_hello(frame: Frame) -> int:
    """The version the node chose; the typed error when it refused the credentials;
    else ``ProtocolError`` (a refusal, or a bad answer)."""
    if frame.kind != KIND_RESPONSE or frame.verb != HELLO:
        payload = frame.payload if isinstance(frame.payload, dict) else {}
        if payload.get("code") in _LOGIN_REFUSALS:
            raise RingKVError.from_json({"error": payload})
        raise _refusal(frame, "the node did not accept the handshake")
    payload = frame.payload
    version = payload.get("version") if isinstance(payload, dict) else None
    if version not in VERSIONS:
        raise ProtocolError(f"the node chose protocol version {version!r}", field="version")
    return int(version)


def reply(frame: Frame) -> Reply:
    """A response frame as the ``Reply`` the plans decode."""
    payload = frame.payload
    if frame.kind != KIND_RESPONSE or not isinstance(payload, dict):
        raise _refusal(frame, "the node answered with an error frame")
    status = payload.get("status")
    body = payload.get("body")
    if type(status) is not int or not isinstance(body, bytes):
        raise ProtocolError("a response needs an integer status and bytes body", field="payload")
    headers = {REPLAYED_HEADER: "true"} if payload.get("replayed") else {}
    return Reply(status, body, headers)


def _refusal(frame: Frame, what: str) -> ProtocolError:
    payload = frame.payload if isinstance(frame.payload, dict) else {}
    return ProtocolError(f"{what}: {payload.get('code', '?')}: {payload.get('message', '')}",
                         field="frame")
