"""Server-side de-duplication of retried writes (the ``Idempotency-Key`` header).

A client that retries a write after an ambiguous failure (a timeout, a
dropped connection) cannot know whether the first attempt was applied. It
sends the same ``Idempotency-Key`` with every attempt; this node remembers
the response of the first successful attempt and returns that very response
(same timestamp, same receipt) to every repeat, instead of writing again.

Bounded on purpose: at most ``max_entries`` keys and ``max_bytes`` of
remembered response bodies (least recently used go first), each kept
``ttl_s`` seconds on the node's clock. A response larger than
``max_bytes / 16`` (a batch of large reads, say) is not remembered at all: a
repeat of it executes again, which for its writes means the same values
written again under new timestamps. The memory is per node, so a retry must reach the same coordinator to be de-duplicated; the
Python client (``ringkv.client``) retries an ambiguous keyed write on the
node it sent it to. With ``auth.enabled`` each user's keys are its own
(``handlers`` scopes the key by the caller's name): another user sending the
same key executes its own request, and learns nothing of the first.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from ringkv.clock import Clock
from ringkv.errors import BadRequest

HEADER = "Idempotency-Key"
REPLAY_HEADER = "Idempotent-Replayed"
MAX_KEY_CHARS = 128
DEFAULT_MAX_ENTRIES = 100_000
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_TTL_S = 600.0


@dataclass(frozen=True)
class StoredResponse:
    """The first successful response to a keyed request: replayed verbatim to repeats."""

    status: int
    body: bytes
    content_type: str


@dataclass
class _Entry:
    fingerprint: bytes
    expires_at: float
    response: StoredResponse | None = None
    # Set while the first attempt is still running, so a repeat that arrives
    # meanwhile waits for it instead of writing a second time.
    done: asyncio.Event | None = None


def check_key(raw: str) -> str:
    """Validate an ``Idempotency-Key`` header value (1-128 printable ASCII characters)."""
    if not 0 < len(raw) <= MAX_KEY_CHARS or not raw.isascii() or not raw.isprintable():
        raise BadRequest(
            f"{HEADER} must be 1-{MAX_KEY_CHARS} printable ASCII characters", field=HEADER
        )
    return raw


def fingerprint(method: str, path_qs: str, body: bytes) -> bytes:
    """What a key was first used for: a repeat must be the same request."""
    digest = hashlib.blake2b(digest_size=16)
    for part in (method.encode(), path_qs.encode(), body):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.digest()


class IdempotencyCache:
    """Idempotency key -> the first successful response, bounded in size and age."""

    def __init__(
        self,
        clock: Clock,
        *,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        max_bytes: int = DEFAULT_MAX_BYTES,
        ttl_s: float = DEFAULT_TTL_S,
    ) -> None:
        if max_entries < 1 or max_bytes < 16 or ttl_s <= 0:
            raise ValueError("max_entries must be >= 1, max_bytes >= 16 and ttl_s > 0")
        self._clock = clock
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._ttl_s = ttl_s
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._bytes = 0  # of the remembered response bodies

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def size_bytes(self) -> int:
        """Bytes of response bodies remembered now (at most ``max_bytes``)."""
        return self._bytes

    async def run(
        self,
        key: str,
        request_fingerprint: bytes,
        execute: Callable[[], Awaitable[StoredResponse]],
    ) -> tuple[StoredResponse, bool]:
        """Execute the request once per key; returns (response, replayed).

        Only successes (status < 300) are remembered: after a failure the
        key is forgotten, so a retry executes afresh. A key reused for a
        different request is a BadRequest naming the header.
        """
        while True:
            now = self._clock.monotonic_s()
            entry = self._lookup(key, now)
            if entry is None:
                break
            if entry.fingerprint != request_fingerprint:
                raise BadRequest(
                    f"{HEADER} {key!r} was already used for a different request", field=HEADER
                )
            if entry.response is not None:
                return entry.response, True
            assert entry.done is not None
            await entry.done.wait()  # the first attempt is still running; then look again
        entry = _Entry(request_fingerprint, now + self._ttl_s, done=asyncio.Event())
        self._insert(key, entry, now)
        try:
            response = await execute()
        except BaseException:
            self._forget(key, entry)
            raise
        finally:
            assert entry.done is not None
            entry.done.set()
            entry.done = None
        if response.status < 300 and len(response.body) <= self._max_bytes // 16:
            entry.response = response
            self._bytes += len(response.body)
            self._evict(self._clock.monotonic_s())
        else:
            self._forget(key, entry)
        return response, False

    def _lookup(self, key: str, now: float) -> _Entry | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.expires_at <= now and entry.done is None:
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return entry

    def _insert(self, key: str, entry: _Entry, now: float) -> None:
        self._entries[key] = entry
        self._entries.move_to_end(key)
        self._evict(now)

    def _evict(self, now: float) -> None:
        """Drop expired entries from the cold end, then enforce the bounds."""
        while self._entries:
            oldest_key, oldest = next(iter(self._entries.items()))
            within = len(self._entries) <= self._max_entries and self._bytes <= self._max_bytes
            if within and oldest.expires_at > now:
                break
            if oldest.done is not None and within:
                break  # still running and within bounds: keep it
            self._drop(oldest_key)

    def _forget(self, key: str, entry: _Entry) -> None:
        if self._entries.get(key) is entry:
            self._drop(key)

    def _drop(self, key: str) -> None:
        entry = self._entries.pop(key)
        if entry.response is not None:
            self._bytes -= len(entry.response.body)
