"""Internode frame codec (pure: no asyncio, no sockets).

Wire format of one frame::

    u32 big-endian body length | msgpack body

    body = [protocol_version: int, kind: int, request_id: int, verb: str, payload]

``kind`` is one of KIND_REQUEST, KIND_RESPONSE, KIND_ERROR (an error response whose
payload is ``{"code", "message", "details"}``) or KIND_ONEWAY. Responses echo the
request's id and verb. One-way frames (including the handshake ``hello``) use id 0.

The decoder is a trust boundary: every malformed input becomes ``ProtocolError``
(never another exception type), and memory use is bounded by ``max_frame_bytes``
because the length prefix is checked before any body bytes are buffered past it.
"""

from __future__ import annotations

import struct
from typing import Any, NamedTuple

import msgpack

from ringkv.errors import ProtocolError, TooLarge
from ringkv.limits import MAX_FRAME_BYTES

PROTOCOL_VERSION = 1

KIND_REQUEST = 0
KIND_RESPONSE = 1
KIND_ERROR = 2
KIND_ONEWAY = 3
KINDS = frozenset((KIND_REQUEST, KIND_RESPONSE, KIND_ERROR, KIND_ONEWAY))

HELLO = "hello"  # verb of the handshake frame, reserved for the transport

DEFAULT_MAX_FRAME_BYTES = MAX_FRAME_BYTES  # see ringkv.limits for what depends on it
MAX_VERB_LEN = 128
MAX_REQUEST_ID = 2**64 - 1

_HEADER = struct.Struct(">I")
HEADER_BYTES = _HEADER.size
_HEADER_MAX = 2**32 - 1  # what the u32 length prefix can express


class Frame(NamedTuple):
    version: int
    kind: int
    request_id: int
    verb: str
    payload: Any


def encode_frame(
    kind: int,
    request_id: int,
    verb: str,
    payload: Any,
    *,
    version: int = PROTOCOL_VERSION,
    max_frame_bytes: int | None = None,
    packer: msgpack.Packer | None = None,
) -> bytes:
    """Encode one frame, header included.

    ``packer`` (from ``frame_packer``) is reused instead of building one per
    frame, as ``msgpack.packb`` does; it is not thread-safe, so each owner
    (a transport, on its loop's thread) keeps its own.

    Raises ``ValueError`` for a bad kind/id/verb (a caller bug), ``ProtocolError`` when
    the payload is not msgpack-able, and ``TooLarge`` when the body exceeds
    ``max_frame_bytes`` (checked here so we never send a frame the peer must reject,
    which would cost the whole connection). Tuples encode as lists; map keys should be
    str, bytes or int (an array/map key cannot be decoded into a dict key).
    """
    if kind not in KINDS:
        raise ValueError(f"bad frame kind {kind!r}")
    if type(request_id) is not int or not 0 <= request_id <= MAX_REQUEST_ID:
        raise ValueError(f"bad request id {request_id!r}")
    if type(verb) is not str or not verb or len(verb) > MAX_VERB_LEN:
        raise ValueError(f"bad verb {verb!r}")
    try:
        body = (packer or msgpack.Packer(use_bin_type=True)).pack(
            [version, kind, request_id, verb, payload])
    except (TypeError, ValueError, OverflowError) as e:
        raise ProtocolError(
            f"payload for verb {verb!r} is not msgpack-serializable: {e}", verb=verb
        ) from e
    size = len(body)
    limit = max_frame_bytes if max_frame_bytes is not None else _HEADER_MAX
    if size > limit:
        raise TooLarge(
            f"frame for verb {verb!r} is {size} bytes, over the {limit}-byte limit",
            field="payload",
            limit=limit,
            size=size,
        )
    return _HEADER.pack(size) + body


def frame_packer() -> msgpack.Packer:
    """A packer for ``encode_frame(packer=...)``: one per thread that encodes."""
    return msgpack.Packer(use_bin_type=True)


class FrameDecoder:
    """Incremental decoder: feed it bytes as they arrive, get whole frames back.

    After it raises ``ProtocolError`` the stream is out of sync for good, so the
    decoder stays failed; the caller must close the connection.
    """

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        if not 0 < max_frame_bytes <= _HEADER_MAX:
            raise ValueError(f"max_frame_bytes must be in 1..{_HEADER_MAX}")
        self.max_frame_bytes = max_frame_bytes
        self._buf = bytearray()
        self._failed: ProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes held for a frame that has not fully arrived yet."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[Frame]:
        if self._failed is not None:
            raise ProtocolError(f"decoder already failed: {self._failed.message}")
        buf = self._buf
        if not buf and len(data) > HEADER_BYTES:
            # Exactly one whole frame (the usual read): decode it in place.
            (size,) = _HEADER.unpack_from(data, 0)
            if size + HEADER_BYTES == len(data) and 0 < size <= self.max_frame_bytes:
                try:
                    return [self._decode_body(data[HEADER_BYTES:])]
                except ProtocolError as e:
                    self._failed = e
                    raise
        # With nothing buffered (the common case: reads end on frame boundaries),
        # frames are decoded straight from ``data``; only a partial tail is kept.
        if buf:
            buf += data
            source: bytes | bytearray | memoryview = buf
        else:
            source = data
        available = len(source)
        frames: list[Frame] = []
        pos = 0
        try:
            while available - pos >= HEADER_BYTES:
                (size,) = _HEADER.unpack_from(source, pos)
                # Checked before waiting for the body: a hostile length prefix must not
                # make us buffer gigabytes.
                if size > self.max_frame_bytes:
                    raise ProtocolError(
                        f"frame length {size} exceeds limit {self.max_frame_bytes}",
                        size=size,
                        limit=self.max_frame_bytes,
                    )
                if size == 0:
                    raise ProtocolError("empty frame body")
                end = pos + HEADER_BYTES + size
                if available < end:
                    break
                frames.append(self._decode_body(source[pos + HEADER_BYTES : end]))
                pos = end
        except ProtocolError as e:
            self._failed = e
            buf.clear()
            raise
        if source is buf:
            del buf[:pos]
        elif pos < available:
            buf += source[pos:]
        return frames

    def _decode_body(self, body: bytes | bytearray | memoryview) -> Frame:
        n = len(body)
        try:
            # Every limit is tied to this body's size, so nothing inside can claim more
            # elements or bytes than the frame actually carries. strict_map_key=False keeps
            # decode symmetric with encode for int keys; the frame bound caps the work.
            obj = msgpack.unpackb(
                body,
                raw=False,
                use_list=True,
                strict_map_key=False,
                max_str_len=n,
                max_bin_len=n,
                max_array_len=n,
                max_map_len=n // 2,
                max_ext_len=n,
            )
        except Exception as e:  # msgpack raises many types (ValueError, TypeError, ...)
            raise ProtocolError(f"bad msgpack body: {type(e).__name__}: {e}") from e
        if type(obj) is not list or len(obj) != 5:
            raise ProtocolError("frame body must be a 5-element array")
        version, kind, request_id, verb, payload = obj
        # `type(x) is int` rather than isinstance: msgpack booleans must not pass as ints.
        if type(version) is not int:
            raise ProtocolError(f"bad protocol version {version!r}")
        if type(kind) is not int or kind not in KINDS:
            raise ProtocolError(f"bad frame kind {kind!r}")
        if type(request_id) is not int or not 0 <= request_id <= MAX_REQUEST_ID:
            raise ProtocolError(f"bad request id {request_id!r}")
        if type(verb) is not str or not verb or len(verb) > MAX_VERB_LEN:
            raise ProtocolError(f"bad verb {verb!r:.80}")
        # Frame(*obj), without the namedtuple's Python-level __new__: once per frame.
        return tuple.__new__(Frame, obj)
