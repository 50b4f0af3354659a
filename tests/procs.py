"""Test-side names for the process launcher."""

from __future__ import annotations

import json
from http.client import HTTPConnection, HTTPException
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

from ringkv.tools.launcher import NodeProcess, free_port, http, wait_until

REPO = Path(__file__).resolve().parent.parent

# For clusters whose tests check what happens, not how soon membership notices:
# half-second gossip rounds halve a cluster's start-up (each joiner learns the ring
# in rounds) and the time to see a killed node DOWN or a restarted one UP. Tests
# of the failure detector's timing keep the default 1 s.
FAST_GOSSIP = {"timing.gossip_interval_ms": 500}



class KeptConnections:
    """GETs over one kept-alive connection per node, for checks that read thousands
    of keys: ``http`` opens a connection per request (about 1.3 ms a read here, 0.4 ms
    on a kept one). Plain HTTP only; a connection the node closed is opened again
    once (a GET may be repeated)."""

    def __init__(self, timeout_s: float = 10.0) -> None:
        self.timeout_s = timeout_s
        self._open: dict[str, HTTPConnection] = {}

    def get(self, url: str) -> tuple[int, Any]:
        """(status, parsed JSON or text), as ``http("GET", url)`` returns them."""
        parts = urlsplit(url)
        assert parts.scheme == "http" and parts.hostname is not None, url
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        for attempt in range(2):
            conn = self._open.get(parts.netloc)
            if conn is None:
                conn = HTTPConnection(parts.hostname, parts.port, timeout=self.timeout_s)
                self._open[parts.netloc] = conn
            try:
                conn.request("GET", path)
                response = conn.getresponse()
                payload = response.read()
            except (OSError, HTTPException):
                conn.close()
                del self._open[parts.netloc]
                if attempt:
                    raise
                continue
            try:
                return response.status, json.loads(payload)
            except ValueError:
                return response.status, payload.decode(errors="replace")
        raise AssertionError("unreachable")

    def close(self) -> None:
        for conn in self._open.values():
            conn.close()
        self._open.clear()

    def __enter__(self) -> KeptConnections:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()


__all__ = ["FAST_GOSSIP", "REPO", "KeptConnections", "NodeProcess", "free_port", "http",
           "wait_until"]
