"""The key routes answered straight from aiohttp's parsed message.

GET, PUT and DELETE of ``/v1/kv/{keyspace}/{key}`` carry nearly all of a
node's client traffic. ``http_protocol.ApiRequestHandler`` serves them from
the message aiohttp's C parser yields, without aiohttp's request object,
response object, writer and per-request wake-ups of the connection's task:
``serve`` runs the operation (the same checks, errors and metrics as
``api.request_handler``) and ``response_bytes`` writes its answer as one
preformatted HTTP/1.x response. Everything else, and any request this path
cannot take whole, stays with aiohttp (``lean_target`` says which).
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

from aiohttp import hdrs
from aiohttp.helpers import rfc822_formatted_time
from aiohttp.http import SERVER_SOFTWARE, HttpVersion11, RawRequestMessage
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from multidict import MultiDict, MultiDictProxy

from ringkv.auth import http as auth_http
from ringkv.errors import RingKVError, TooLarge
from ringkv.server import handlers as h
from ringkv.server import idempotency
from ringkv.server import validation as v
from ringkv.server.api import CLIENT_CLOSED_STATUS, key_route

if TYPE_CHECKING:
    from ringkv.node import Node

log = logging.getLogger(__name__)

_NOT_SENT = h.Answer(CLIENT_CLOSED_STATUS, b"")
_NO_QUERY: MultiDictProxy[str] = MultiDictProxy(MultiDict())


class LeanTarget(NamedTuple):
    """A key request this path serves: its route and where it points."""

    name: str  # the route's name, for metrics
    operation: h.Operation
    has_body: bool  # whether the operation reads a body
    keyspace: str
    raw_path: str


def lean_target(message: RawRequestMessage, payload: StreamReader) -> LeanTarget | None:
    """What ``message`` asks of a key route, if this path can serve it now: a key
    route the router would match (``api.key_route``), and its body, if it has one,
    all arrived. None: aiohttp serves it."""
    if not payload.is_eof():
        return None  # still arriving: aiohttp reads it, under the door's deadlines
    raw_path = message.url.raw_path
    found = key_route(message.method, raw_path, hdrs.EXPECT in message.headers)
    if found is None:
        return None
    (name, operation, has_body), keyspace = found
    return LeanTarget(name, operation, has_body, keyspace, raw_path)


async def serve(node: Node, cache: idempotency.IdempotencyCache, message: RawRequestMessage,
                payload: StreamReader, target: LeanTarget, started_s: float,
                gone: Callable[[], bool], peer: str | None
                ) -> tuple[h.Answer, dict[str, str]]:
    """Run ``target``'s operation; its answer, errors included (as ``api._failed``
    maps them: ringkv's errors as their JSON, anything else a logged 500; ``gone``:
    whether the connection has closed), and the headers an error adds (a 401's
    challenge, a 429's Retry-After). ``peer``: the client's address, for the
    failed-login limit."""
    query = message.url.query if "?" in message.path else _NO_QUERY
    headers: dict[str, str] = {}
    try:
        h.admit(node, target.name)
        v.check_headers(message.raw_headers)
        if query is not _NO_QUERY:
            v.check_query(query)
        # Before anything else is read or done: the same check as every other route.
        principal = None
        if node.auth is not None:  # (no coroutine per request when auth is off)
            principal = await auth_http.check_http(node, target.name, target.keyspace, query,
                                                   b"", message.headers, peer)
        h.check_keyspace(node, target.keyspace)
        key = v.key_from_path(target.raw_path, node.config.limits)
        body = b""
        if target.has_body and payload is not EMPTY_PAYLOAD:
            body = payload.read_nowait(-1)  # all of it has arrived (``lean_target``)
            limit = node.config.limits.max_request_bytes
            if len(body) > limit:  # a chunked body; aiohttp's request.read() refuses it so
                raise TooLarge(f"request body exceeds the limit of {limit} bytes",
                               field="body", limit=limit)
        call = h.ApiCall(node, started_s, target.keyspace, key, query, body,
                         message.headers.get(idempotency.HEADER), cache=cache,
                         principal=principal)
        if call.idempotency_key is not None:  # what a repeat must match
            call.fingerprint_method = message.method
            call.fingerprint_target = message.url.raw_path_qs
        answer = await target.operation(call)
    except RingKVError as exc:
        answer = h.error_answer(exc)
        headers = exc.http_headers()
    except Exception as exc:  # noqa: BLE001 - the API's boundary: a logged 500
        if isinstance(exc, ConnectionError) and gone():
            # The client left or the door closed it: nobody is left to answer.
            log.debug("the connection closed during %s %s", message.method, target.raw_path)
            answer = _NOT_SENT
        else:
            log.exception("unhandled error serving %s %s", message.method, target.raw_path,
                          exc_info=exc)
            answer = h.INTERNAL_ERROR
    node.metrics.observe_request(target.name, h.metric_level(query.get("consistency")),
                                 answer.status, node.clock.monotonic_s() - started_s)
    return answer, headers


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


# Everything up to the length, per status, for HTTP/1.1 (the usual case).
_HEADS_11: dict[int, bytes] = {
    status.value: (f"HTTP/1.1 {status.value} {status.phrase}\r\n"
                   f"Content-Type: application/json\r\nServer: {SERVER_SOFTWARE}\r\n"
                   f"Content-Length: ").encode("latin-1")
    for status in HTTPStatus
}
_REPLAYED = f"{idempotency.REPLAY_HEADER}: true\r\n".encode("latin-1")


def response_bytes(message: RawRequestMessage, answer: h.Answer, keep_alive: bool,
                   headers: dict[str, str] | None = None) -> bytes:
    """``answer`` as a whole HTTP response to ``message``, with the headers aiohttp
    would send (Content-Type, Content-Length, Date, Server, Connection as the
    request's version and wish ask, the idempotency replay header) and ``headers``."""
    version = message.version
    head = _HEADS_11.get(answer.status) if version == HttpVersion11 else None
    if head is None:
        head = (f"HTTP/{version[0]}.{version[1]} {answer.status} {_reason(answer.status)}\r\n"
                f"Content-Type: application/json\r\nServer: {SERVER_SOFTWARE}\r\n"
                f"Content-Length: ").encode("latin-1")
    if keep_alive:
        connection = b"" if version == HttpVersion11 else b"Connection: keep-alive\r\n"
    else:
        connection = b"Connection: close\r\n" if version == HttpVersion11 else b""
    if answer.replayed:
        connection += _REPLAYED
    if headers:
        connection += "".join(f"{k}: {v}\r\n" for k, v in headers.items()).encode("latin-1")
    return b"%s%d\r\nDate: %s\r\n%s\r\n%s" % (head, len(answer.body),
                                              rfc822_formatted_time().encode("latin-1"),
                                              connection, answer.body)


