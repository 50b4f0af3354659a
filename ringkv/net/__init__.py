"""Internode messaging: msgpack frames over persistent connections.

codec.py (frames, pure), rpc.py (the request core: pending entries, admission,
backoff, error mapping, the Requester protocol), sockets.py (the Network
interface and real TCP), transport.py (the one Transport: connections as
asyncio protocols, handshake, flushing, serving). The simulator supplies its
own Network (ringkv.sim.network) and runs the same Transport.
"""

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
