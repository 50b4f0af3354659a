"""What aiohttp's HTTP parser rejects gets ringkv's JSON error too.

The API middleware never sees a request the parser refused (a request line
or header over the parser's limits, a malformed request): aiohttp answers
those itself, in plain text, and offers no hook for them (aiohttp issue
#3287). So the node serves the API through ``ApiRunner``, whose connections
are ``ApiRequestHandler``s: the same protocol with a ``handle_error`` that
answers in JSON and closes the connection, as aiohttp's own does.

The parser's limits sit above ringkv's own, so that the API's validation
sees and names what is too large: every key up to ``max_key_bytes`` fits in
the request line even percent-encoded, with room for the rest, and a header
up to ``PARSER_FIELD_BYTES`` reaches the middleware, which names any header
over ``MAX_HEADER_BYTES``. Only input beyond even that stops at the parser.
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong

from ringkv.config import LimitsConfig
from ringkv.errors import BadRequest, HeaderTooLarge, RequestLineTooLong, RingKVError
from ringkv.server.api import error_response
from ringkv.server.validation import KV_PREFIX, MAX_HEADER_BYTES

log = logging.getLogger(__name__)

PARSER_FIELD_BYTES = 32768  # one header, at the parser; the API's limit is MAX_HEADER_BYTES
REQUEST_LINE_SPARE_BYTES = 8190  # method, keyspace, query: aiohttp's default line limit
SHOWN_BYTES = 60  # of an overlong line, quoted in the error
assert PARSER_FIELD_BYTES > MAX_HEADER_BYTES, "the API must see, and name, an overlong header"


def parser_limits(limits: LimitsConfig) -> dict[str, int]:
    """aiohttp's ``max_line_size`` and ``max_field_size`` for these limits."""
    line_bytes = 3 * limits.max_key_bytes + REQUEST_LINE_SPARE_BYTES  # %XX per key byte
    if line_bytes == PARSER_FIELD_BYTES:
        line_bytes += 1  # handle_error tells the two apart by the limit the parser names
    return {"max_line_size": line_bytes, "max_field_size": PARSER_FIELD_BYTES}


def parse_error(exc: BaseException | None, *, line_bytes: int, field_bytes: int,
                max_key_bytes: int) -> RingKVError:
    """The ringkv error for what aiohttp's parser raised (``None``: no parse error)."""
    if isinstance(exc, LineTooLong):
        line, limit = exc.args[0], exc.args[1]
        raw = bytes(line) if isinstance(line, (bytes, bytearray)) else str(line).encode()
        start = raw[:SHOWN_BYTES]
        shown = start.decode("utf-8", "backslashreplace") + "..."
        if limit == field_bytes:
            return HeaderTooLarge(f"a request header is over {field_bytes} bytes (it starts "
                                  f"{shown})", header=None, limit=field_bytes)
        if limit == line_bytes:
            # The C parser quotes the target, the pure-Python one the whole line.
            if start.split(b" ", 1)[-1].startswith(KV_PREFIX.encode()):
                hint = f"; a key may be at most {max_key_bytes} bytes"
            else:
                hint = ""
            return RequestLineTooLong(
                f"the request line is over {line_bytes} bytes (it starts {shown}){hint}",
                limit=line_bytes,
            )
    if isinstance(exc, HttpProcessingError):
        return BadRequest(f"malformed HTTP request: {exc.message}", field="request")
    return RingKVError("internal server error")


class ApiRequestHandler(web.RequestHandler):
    """aiohttp's connection protocol, with the parser's errors answered in JSON."""

    __slots__ = ("max_key_bytes",)

    def __init__(self, manager: web.Server, *, max_key_bytes: int, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self.max_key_bytes = max_key_bytes  # named when a key path is over the line limit

    def handle_error(self, request: web.BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if request.writer.output_size > 0:  # a response is half sent: only closing is left
            return super().handle_error(request, status, exc, message)
        error = parse_error(exc if status != 500 else None, line_bytes=self.max_line_size,
                            field_bytes=self.max_field_size, max_key_bytes=self.max_key_bytes)
        if error.http_status == 500:
            log.error("unhandled error serving a request", exc_info=exc)
        else:  # the client's mistake: no traceback
            log.debug("rejected a request the HTTP parser refused: %s", error.message)
        response = error_response(error)
        response.force_close()
        # Said outright: the answer goes out as HTTP/1.0 (the request was never parsed).
        response.headers["Connection"] = "close"
        return response


class _ApiServer(web.Server):
    def __init__(self, plain: web.Server, max_key_bytes: int) -> None:
        super().__init__(plain.request_handler, request_factory=plain.request_factory,
                         handler_cancellation=plain.handler_cancellation, loop=plain._loop,
                         **plain._kwargs)
        self.max_key_bytes = max_key_bytes

    def __call__(self) -> web.RequestHandler:
        # web.Server builds its RequestHandler itself, so build the subclass as it does.
        return ApiRequestHandler(self, loop=self._loop, max_key_bytes=self.max_key_bytes,
                                 **self._kwargs)


class ApiRunner(web.AppRunner):
    """``web.AppRunner`` for the API: parser limits above ringkv's, JSON parse errors."""

    __slots__ = ("_max_key_bytes",)

    def __init__(self, app: web.Application, limits: LimitsConfig, **kwargs: Any) -> None:
        kwargs.update(parser_limits(limits))  # handed on to every connection's parser
        super().__init__(app, **kwargs)
        self._max_key_bytes = limits.max_key_bytes

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()  # starts and freezes the application
        return _ApiServer(plain, self._max_key_bytes)
