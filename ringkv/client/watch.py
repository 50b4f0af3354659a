"""A watch as the client holds it (sans-I/O): where to connect, what to deliver,
where to resume after a cut, and when to give up.

The stream (``GET /v1/watch/...``, NDJSON) is a ``progress`` line naming where
it starts, then ``put``/``delete`` events in (version, key) order, with a
``progress`` line when idle, and an ``error`` line when the node ends it.
Every write of one transaction shares a version, so a cut may fall inside
one version's events: ``WatchCore`` resumes after the last version it saw
*whole* (``from_version``: the server sends what is strictly after it) and
drops what it already delivered of the version after it (events come in
(version, key) order, so that is every event at or below the last one
delivered). Nothing is lost, nothing is delivered twice.

A cut (the connection drops, the node shuts down, is cut off as too slow or
cannot poll its ranges, or the stream says nothing for ``SILENT_STREAM_S``, a few
missed progress lines) reconnects, to another node, after a backoff; at most
``max_reconnects`` times in a row without an event or progress in between.
A refusal that another try cannot change (``compacted``, a bad request, no
permission) raises its typed error.

The shells (``blocking.py``, ``aio.py``) open the connection and feed it lines:
an HTTP stream's, or the events of the native protocol's ``watch`` frames,
which carry the same lines.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

from ringkv.client.errors import InvalidArgument, InvalidArgumentType
from ringkv.client.routing import backoff_s, key_text
from ringkv.errors import NoNodeAvailable, ProtocolError, RingKVError

# Status codes a reconnect (to another node, after a pause) may get past.
RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})
# Codes of a stream's last event after which the watch goes on from another node.
RESUMABLE_CODES = frozenset({"watcher_too_slow", "shutting_down", "no_leader", "timeout",
                             "unavailable", "peer_unreachable", "peer_timeout", "overloaded",
                             "clock_uncertain", "range_moving", "remote_error", "internal"})
MAX_RECONNECTS = 10
MAX_WATCH_LINE_BYTES = 8 * 1024 * 1024  # one event: a key and a value at their limits, escaped
# An idle stream carries a progress line this often (the node's cadence: PROGRESS_INTERVAL_S
# of txn/watch.py, which a test keeps equal to this).
PROGRESS_INTERVAL_S = 1.0
# A stream that says nothing for this many progress intervals is taken for a node cut
# off, paused or stuck (silence, no reset): the watch resumes from another node.
MISSED_PROGRESS_LINES = 3
SILENT_STREAM_S = MISSED_PROGRESS_LINES * PROGRESS_INTERVAL_S
WATCH_HEADERS = {"Accept": "application/x-ndjson"}


@dataclass(frozen=True)
class WatchEvent:
    """One committed change: ``type`` "put" or "delete", the key, its JSON value
    (None for a delete), and ``version``, its commit timestamp in microseconds."""

    type: str
    key: str
    value: Any
    version: int


class WatchCore:
    """The state of one watch across its connections."""

    def __init__(self, keyspace: str, key: str, *, prefix: bool, from_version: int | None,
                 rng: random.Random, max_reconnects: int = MAX_RECONNECTS,
                 backoff_base_s: float = 0.05, backoff_max_s: float = 1.0) -> None:
        if from_version is not None and (isinstance(from_version, bool)
                                         or not isinstance(from_version, int)):
            raise InvalidArgumentType("from_version must be an integer version or None",
                                      field="from_version")
        if from_version is not None and from_version < 0:
            raise InvalidArgument(f"from_version must be 0 or more, got {from_version}",
                                  field="from_version")
        if not isinstance(keyspace, str) or not keyspace:
            raise InvalidArgument("keyspace must be a keyspace name", field="keyspace")
        if key:
            key = key_text(key)  # a key the API accepts
        elif not prefix:
            raise InvalidArgument("watch a key, or a prefix (prefix=True; '' is the whole "
                                  "keyspace)", field="key")
        self.keyspace = keyspace
        self.key = key
        self.prefix = prefix
        self.resume_us = from_version  # strictly after this, on the next connection
        self.last: tuple[int, str] | None = None  # the last event delivered
        self.failures = 0  # reconnects in a row without anything received
        self._tried: list[str] = []  # since anything was last received: where, and why not
        self._reasons: list[str] = []
        self.max_reconnects = max_reconnects
        self._rng = rng
        self._backoff = (backoff_base_s, backoff_max_s)

    def routing(self) -> list[tuple[str, bytes]]:
        """The (keyspace, key) whose replicas a client tries first."""
        return [(self.keyspace, self.key.encode())] if self.key else []

    def path(self) -> str:
        """The request's path and query for the next connection."""
        path = f"/v1/watch/{quote(self.keyspace, safe='')}"
        if self.key:
            path += "/" + quote(self.key, safe="")
        query: dict[str, str] = {"prefix": "true" if self.prefix else "false"}
        if self.resume_us is not None:
            query["from_version"] = str(self.resume_us)
        return f"{path}?{urlencode(query)}"

    def native_payload(self) -> dict[str, Any]:
        """The native ``watch`` request's payload for the next connection (the same watch
        as ``path``)."""
        args: dict[str, Any] = {"prefix": self.prefix}
        if self.resume_us is not None:
            args["from_version"] = self.resume_us
        payload: dict[str, Any] = {"keyspace": self.keyspace, "args": args}
        if self.key:
            payload["key"] = self.key
        return payload

    def refused(self, status: int, body: bytes) -> None:
        """The node answered ``status`` instead of a stream: return to reconnect,
        or raise the typed error another try cannot change."""
        try:
            error = RingKVError.from_json(json.loads(body.decode()), http_status=status)
        except (ValueError, UnicodeDecodeError):
            error = ProtocolError(f"watch refused with HTTP {status}", http_status=status)
        if status not in RETRYABLE_STATUS:
            raise error

    def line(self, raw: bytes) -> WatchEvent | None:
        """One line of the stream: the event to deliver, or None (progress, a repeat,
        a blank line). The stream's last event (an error) raises ``StreamEnded`` when
        the watch goes on from another node, or the typed error when it cannot."""
        raw = raw.strip()
        if not raw:
            return None
        try:
            doc = json.loads(raw.decode())
            kind = doc["type"]
            if kind == "error":
                self._ended(doc["error"])
            version = int(doc["version"])
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise ProtocolError(f"malformed watch event {raw[:200]!r}: {exc}") from None
        self.failures = 0
        self._tried, self._reasons = [], []
        if kind == "progress":
            self.resume_us = max(self.resume_us or 0, version)
            return None
        key = str(doc["key"])
        at = (version, key)
        if self.last is not None and at <= self.last:
            return None  # delivered before the cut: the server resent its version
        if self.last is not None and version > self.last[0]:
            self.resume_us = max(self.resume_us or 0, self.last[0])  # that version is whole
        self.last = at
        return WatchEvent(kind, key, doc.get("value"), version)

    def _ended(self, error: Any) -> None:
        code = error.get("code") if isinstance(error, dict) else None
        if code in RESUMABLE_CODES:
            raise StreamEnded(str(code))
        raise RingKVError.from_json({"error": error})

    def next_url(self, candidates: list[str]) -> str:
        """Where the next connection goes: the first of ``candidates`` (best first) not
        tried since the stream last said anything, so that a node that fell silent or
        ended the stream is passed over; once every one has been, they take turns."""
        for url in candidates:
            if url not in self._tried:
                return url
        return candidates[self.failures % len(candidates)]

    def reconnect_pause_s(self, url: str, reason: str) -> float:
        """A connection to ``url`` ended (``reason``): how long to wait before the
        next, or ``NoNodeAvailable`` (its ``last_version``: where a new watch may
        resume) when reconnects keep failing."""
        self.failures += 1
        self._tried.append(url)
        self._reasons.append(f"{url}: {reason}")
        if self.failures > self.max_reconnects:
            error = NoNodeAvailable(
                f"the watch could not be resumed after {self.max_reconnects} reconnects in a "
                f"row: " + "; ".join(self._reasons[-3:]), tried=self._tried,
                reasons=self._reasons)
            error.details["last_version"] = self.resume_us
            raise error
        base_s, max_s = self._backoff
        return backoff_s(self.failures - 1, base_s=base_s, max_s=max_s, rng=self._rng)


class StreamEnded(Exception):
    """The node ended the stream; the watch goes on from another connection."""

