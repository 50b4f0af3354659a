"""Internode messaging: msgpack frames over persistent asyncio TCP connections."""

from ringkv.net.codec import (
    KIND_ERROR,
    KIND_ONEWAY,
    KIND_REQUEST,
    KIND_RESPONSE,
    PROTOCOL_VERSION,
    Frame,
    FrameDecoder,
    encode_frame,
)
from ringkv.net.transport import Transport

__all__ = [
    "KIND_ERROR",
    "KIND_ONEWAY",
    "KIND_REQUEST",
    "KIND_RESPONSE",
    "PROTOCOL_VERSION",
    "Frame",
    "FrameDecoder",
    "Transport",
    "encode_frame",
]
