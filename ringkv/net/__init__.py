"""Internode messaging: msgpack frames (``codec``, pure) over persistent
connections (``transport``).

This package imports nothing itself, so that importing the pure codec does
not pull in asyncio and sockets.
"""
