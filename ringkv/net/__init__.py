"""Internode messaging: msgpack frames over persistent connections.

codec.py (frames, pure), rpc.py (the request core: pending entries, admission,
backoff, error mapping, the Requester protocol), sockets.py (the Network
interface and real TCP), transport.py (the one Transport: connections as
asyncio protocols, handshake, flushing, serving). The simulator supplies its
own Network (ringkv.sim.network) and runs the same Transport.

This package imports nothing itself, so that importing the pure codec does
not pull in asyncio and sockets.
"""
