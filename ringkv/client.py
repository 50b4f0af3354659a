"""The Python client for ringkv: ``Client`` (blocking) and ``AsyncClient`` (asyncio).

    from ringkv.client import Client

    with Client(["http://127.0.0.1:7400"], consistency="QUORUM") as kv:
        kv.put("user:42", {"name": "Ada"}, ttl=3600)
        kv.get("user:42")                     # {'name': 'Ada'}; None when absent
        for record in kv.scan():              # every key, in token order, page by page
            print(record.key, record.value)

What both clients do:

- **Token-aware routing.** The client fetches ``GET /v1/ring``, hashes each
  key with the server's partitioner (``ringkv.ring.token_for``) and sends the
  request to a live replica of the key, so the coordinator serves its own
  copy; any other live node is the fallback. The ring is fetched again every
  ``refresh_interval_s`` seconds, and soon after a connection error or an
  ``Unavailable`` answer.
- **Typed errors.** An error answer is raised as the ``ringkv.errors`` class
  of its code (``Unavailable`` with ``required`` and ``alive``, ``Timeout``
  with ``received``, ``BadRequest`` with ``field`` ...). When no node answers
  at all, ``NoNodeAvailable`` says which nodes were tried and why each failed.
- **Retries only where safe**, at most ``max_retries`` times, with bounded
  exponential backoff and jitter: reads; writes that carry an idempotency key
  (every write does, unless ``idempotent_writes=False``); and any request that
  provably did not run (the connection was refused, or the node answered
  ``Unavailable``, ``Overloaded`` or ``ShuttingDown``). A write whose answer
  was lost is retried *on the same node* with the same ``Idempotency-Key``,
  which that node de-duplicates (``ringkv.server.idempotency``): the retry
  returns the original result and timestamp instead of writing again.
- **Pooled keep-alive connections** and a timeout on every attempt
  (``timeout_s``): a call takes at most about ``(max_retries + 1) *
  timeout_s`` plus the backoff (capped at 1 s per retry).

How it is built: the logic (routing, retries, ring refresh, encoding and
decoding) lives once, in ``_Operations``, as generators that yield the I/O
they need (an HTTP request, a pause) and receive its outcome. ``Client``
performs that I/O with blocking, pooled ``http.client`` connections (so it
also works under gevent, e.g. in locust); ``AsyncClient`` performs it with
aiohttp. Their public methods are generated from ``_Operations`` and carry
its docstrings: ``help(Client.put)`` shows the real signature.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import http.client
import inspect
import itertools
import json
import random
import select
import socket
import threading
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

from ringkv.address import format_address, parse_address
from ringkv.clock import SystemClock
from ringkv.hlc import Timestamp
from ringkv.errors import (
    BadRequest,
    NoNodeAvailable,
    Overloaded,
    RingKVError,
    ShuttingDown,
    Unavailable,
)
from ringkv.quorum import ConsistencyLevel
from ringkv.ring import NodeInfo, TokenRing

__all__ = [
    "AsyncClient",
    "BatchResult",
    "Client",
    "NodeView",
    "Page",
    "Record",
    "WriteResult",
]

T = TypeVar("T")
IDEMPOTENCY_HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
_JSON_HEADERS = {"Content-Type": "application/json", "Accept": "application/json"}
# After a connection error a node is tried last for this long (then as usual).
DOWN_COOLDOWN_S = 5.0
# The soonest a failed or forced ring refresh is tried again.
MIN_REFRESH_GAP_S = 1.0
# Nodes asked for the ring in one refresh before giving up until the next.
MAX_REFRESH_TRIES = 4
# An attempt with less time left than this before its call's deadline is not made.
MIN_ATTEMPT_S = 0.005
# Idle pooled connections are closed after this long: well below the
# server's keep-alive timeout, so a pooled connection is rarely stale.
KEEPALIVE_S = 15.0


# -- what the calls return ---------------------------------------------------


@dataclass(frozen=True)
class Record:
    """A stored value: what ``get_with_meta`` and ``scan`` return.

    ``timestamp`` is the write's hybrid-logical-clock timestamp;
    ``expires_at_us`` is set when the write had a TTL; ``receipt`` says how
    the read was served (replicas asked and answered, read repair) and is
    None for scan items.
    """

    key: str
    value: Any
    timestamp: Timestamp
    expires_at_us: int | None = None
    receipt: dict[str, Any] | None = None


@dataclass(frozen=True)
class WriteResult:
    """The outcome of a put or delete.

    ``replayed`` is True when the node recognised the idempotency key of an
    earlier, already applied attempt and returned that attempt's result.
    """

    timestamp: Timestamp
    receipt: dict[str, Any]
    replayed: bool = False


@dataclass(frozen=True)
class BatchResult:
    """The outcome of one operation in a batch (each succeeds or fails on its own).

    For a get, ``found`` says whether the key exists and ``value`` holds its
    value; ``error`` is the typed error of a failed operation (``ok`` False).
    """

    key: str
    ok: bool
    found: bool | None = None
    value: Any = None
    timestamp: Timestamp | None = None
    error: RingKVError | None = None


@dataclass(frozen=True)
class Page:
    """One page of a scan; pass ``next_page_token`` back to continue (None: the end)."""

    items: list[Record]
    next_page_token: str | None
    receipt: dict[str, Any] | None = None


@dataclass(frozen=True)
class NodeView:
    """One node as the client last saw the ring: its id, URL and liveness."""

    node_id: str
    url: str | None
    up: bool


# -- the I/O the operations ask for -----------------------------------------


@dataclass(frozen=True)
class _Send:
    method: str
    url: str
    body: bytes | None
    headers: Mapping[str, str]
    timeout_s: float


@dataclass(frozen=True)
class _Sleep:
    seconds: float


@dataclass(frozen=True)
class _Emit:
    """A streaming operation hands one item to its consumer."""

    item: Any


@dataclass(frozen=True)
class _Reply:
    status: int
    body: bytes
    headers: Mapping[str, str]


@dataclass(frozen=True)
class _Failure:
    """No HTTP answer. ``kind``: "connect" (never sent), "timeout" or "io" (may have run)."""

    kind: str
    reason: str


_Outcome = _Reply | _Failure | None
# A plan yields I/O effects, receives their outcomes, and returns its result.
_Plan = Generator[_Send | _Sleep | _Emit, _Outcome, T]


@dataclass(frozen=True)
class _Call:
    method: str
    path: str
    body: bytes | None
    routing: tuple[tuple[str, bytes], ...]  # (keyspace, key) pairs, for replica choice
    read: bool
    idempotency_key: str | None = None

    @property
    def repeatable(self) -> bool:
        """Safe to send again even if an earlier attempt ran."""
        return self.read or self.idempotency_key is not None


@dataclass(frozen=True)
class _Topology:
    """An immutable snapshot of the ring as the client knows it (replaced whole)."""

    ring: TokenRing | None
    urls: Mapping[str, str]
    up: Mapping[str, bool]
    replication: Mapping[str, int]


_NO_TOPOLOGY = _Topology(None, {}, {}, {})


def _normalise_url(url: str) -> str:
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) node URL: {url!r}")
    return url


def _url_for(address: str, answered_by: str) -> str:
    """The base URL of a ``host:port`` client address from the ring (ValueError if malformed)."""
    host, port = parse_address(address)
    parts = urlsplit(answered_by)
    if host in ("0.0.0.0", "::"):  # a wildcard bind: reach it the way we reached the ring
        host = parts.hostname or "127.0.0.1"
    return f"{parts.scheme}://{format_address(host, port)}"


def _parse_ring(body: bytes, answered_by: str) -> _Topology:
    data = json.loads(body)
    tokens: dict[str, list[int]] = {}
    infos: dict[str, NodeInfo] = {}
    urls: dict[str, str] = {}
    up: dict[str, bool] = {}
    for node in data["nodes"]:
        node_id = str(node["node_id"])
        tokens[node_id] = [int(t) for t in node["tokens"]]
        infos[node_id] = NodeInfo(node_id, dc=node.get("dc", "dc1"), rack=node.get("rack", "rack1"))
        if node.get("client_address"):
            urls[node_id] = _url_for(str(node["client_address"]), answered_by)
        up[node_id] = bool(node.get("up", True))
    replication = {
        str(name): int(ks["replication_factor"])
        for name, ks in (data.get("keyspaces") or {}).items()
    }
    ring = TokenRing(tokens, infos) if tokens else None
    return _Topology(ring, urls, up, replication)


def _timestamp(raw: Any) -> Timestamp:
    return Timestamp(int(raw[0]), int(raw[1]))


def _json(reply: _Reply) -> Any:
    try:
        return json.loads(reply.body)
    except ValueError:
        raise RingKVError.from_json(None, http_status=reply.status) from None


def _encode_value(value: Any, field: str) -> Any:
    """Check that ``value`` is JSON (no NaN, no sets, ...) before it leaves the client."""
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise BadRequest(f"value is not JSON-serialisable: {exc}", field=field) from None
    return value


def _key_bytes(key: Any, field: str = "key") -> bytes:
    if not isinstance(key, str) or not key:
        raise BadRequest("key must be a non-empty string", field=field)
    try:
        return key.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest("key is not valid UTF-8", field=field) from None


# -- the shared logic ---------------------------------------------------------


class _Operations:
    """Everything the clients do, written once as plans of I/O (see the module docstring)."""

    def __init__(
        self,
        seeds: Sequence[str] | str,
        *,
        keyspace: str = "default",
        consistency: str | ConsistencyLevel | None = None,
        timeout_s: float = 5.0,
        max_retries: int = 3,
        refresh_interval_s: float = 30.0,
        idempotent_writes: bool = True,
        pool_size: int = 32,
        backoff_base_s: float = 0.05,
        backoff_max_s: float = 1.0,
        rng: random.Random | None = None,
    ) -> None:
        """Connect lazily to a cluster through ``seeds`` (one or more node URLs).

        ``keyspace`` and ``consistency`` are the defaults for every call
        (``consistency=None``: each keyspace's own default level).
        ``timeout_s`` bounds every attempt; ``max_retries`` bounds the
        retries of one call, which wait ``backoff_base_s * 2**n`` (at most
        ``backoff_max_s``, with jitter) in between. ``refresh_interval_s``:
        how often the ring is fetched again. ``idempotent_writes``: give every
        write an idempotency key, which makes it safe to retry.
        ``pool_size``: the most keep-alive connections kept per node.
        ``rng``: the randomness behind load spreading and jitter.
        """
        if isinstance(seeds, str):
            seeds = [seeds]
        if not seeds:
            raise ValueError("a client needs at least one seed URL")
        if timeout_s <= 0 or max_retries < 0 or refresh_interval_s <= 0:
            raise ValueError("timeout_s and refresh_interval_s must be > 0, max_retries >= 0")
        self.seeds = [_normalise_url(seed) for seed in seeds]
        self.keyspace = keyspace
        self.consistency = self._level(consistency, write=True, default=None)
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.refresh_interval_s = refresh_interval_s
        self.idempotent_writes = idempotent_writes
        self.pool_size = pool_size
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self._clock = SystemClock()
        self._rng = rng or random.Random()
        self._topology = _NO_TOPOLOGY
        self._stale = True
        self._next_refresh_at = 0.0
        self._last_refresh_attempt = -MIN_REFRESH_GAP_S
        self._refreshing = threading.Lock()  # only ever try-acquired: one refresh at a time
        self._down_until: dict[str, float] = {}

    # ---- public operations (each becomes a Client and an AsyncClient method) ----

    def get(
        self,
        key: str,
        *,
        keyspace: str | None = None,
        consistency: str | ConsistencyLevel | None = None,
    ) -> _Plan[Any]:
        """Read ``key``'s value (any JSON value), or None if the key is absent.

        ``consistency`` (ONE, TWO, THREE, QUORUM, ALL) overrides the client's
        default; ``keyspace`` overrides the client's keyspace.
        """
        record = yield from self.get_with_meta(key, keyspace=keyspace, consistency=consistency)
        return None if record is None else record.value

    def get_with_meta(
        self,
        key: str,
        *,
        keyspace: str | None = None,
        consistency: str | ConsistencyLevel | None = None,
    ) -> _Plan[Record | None]:
        """Read ``key`` as a ``Record`` (value, timestamp, expiry, receipt), or None if absent."""
        keyspace = keyspace or self.keyspace
        call = self._key_call("GET", keyspace, key, consistency, body=None)
        reply = yield from self._execute(call)
        body = _json(reply)
        if reply.status == 404:
            error = RingKVError.from_json(body, http_status=404)
            if "receipt" in error.details:  # the key is absent (not: no such keyspace)
                return None
            raise error
        return Record(
            key=body["key"],
            value=body["value"],
            timestamp=_timestamp(body["timestamp"]),
            expires_at_us=body.get("expires_at_us"),
            receipt=body.get("receipt"),
        )

    def put(
        self,
        key: str,
        value: Any,
        *,
        ttl: int | None = None,
        keyspace: str | None = None,
        consistency: str | ConsistencyLevel | None = None,
        idempotency_key: str | None = None,
    ) -> _Plan[WriteResult]:
        """Write ``value`` (any JSON value) under ``key``; ``ttl`` in whole seconds expires it.

        ``consistency`` may also be ANY. The write carries an idempotency
        key (``idempotency_key``, or a fresh UUID when the client has
        ``idempotent_writes``), so it is retried safely.
        """
        body: dict[str, Any] = {"value": _encode_value(value, "value")}
        if ttl is not None:
            body["ttl"] = ttl
        return (yield from self._write("PUT", keyspace, key, consistency, body, idempotency_key))

    def delete(
        self,
        key: str,
        *,
        keyspace: str | None = None,
        consistency: str | ConsistencyLevel | None = None,
        idempotency_key: str | None = None,
    ) -> _Plan[WriteResult]:
        """Delete ``key`` (writes a tombstone; deleting an absent key succeeds too)."""
        return (yield from self._write("DELETE", keyspace, key, consistency, None, idempotency_key))

    def batch(
        self,
        ops: Sequence[Mapping[str, Any]],
        *,
        consistency: str | ConsistencyLevel | None = None,
        idempotency_key: str | None = None,
    ) -> _Plan[list[BatchResult]]:
        """Run several operations in one request; each succeeds or fails on its own.

        Each op is a mapping like the HTTP API's: ``{"op": "put", "key": "a",
        "value": 1, "ttl": 60}``, ``{"op": "get", "key": "a"}``,
        ``{"op": "delete", "key": "a"}``, each optionally with its own
        ``keyspace`` and ``consistency``. Returns one ``BatchResult`` per op,
        in order. The request goes to the node that replicates most of its keys.
        """
        if not ops:
            raise BadRequest("a batch needs at least one operation", field="ops")
        wire: list[dict[str, Any]] = []
        routing: list[tuple[str, bytes]] = []
        has_writes = False
        for i, op in enumerate(ops):
            if not isinstance(op, Mapping):
                raise BadRequest("each operation must be a mapping", field=f"ops[{i}]")
            item = dict(op)
            item.setdefault("keyspace", self.keyspace)
            routing.append((str(item["keyspace"]), _key_bytes(item.get("key"), f"ops[{i}].key")))
            if "value" in item:
                _encode_value(item["value"], f"ops[{i}].value")
            if "consistency" in item and item["consistency"] is not None:
                level = self._level(item["consistency"], write=item.get("op") != "get",
                                    default=None, field=f"ops[{i}].consistency")
                item["consistency"] = level
            has_writes = has_writes or item.get("op") != "get"
            wire.append(item)
        level = self._level(consistency, write=has_writes, default=self.consistency)
        call = _Call(
            "POST",
            "/v1/batch" + (f"?consistency={level}" if level else ""),
            json.dumps({"ops": wire}).encode(),
            tuple(routing),
            read=not has_writes,
            idempotency_key=self._idempotency_key(idempotency_key) if has_writes else None,
        )
        reply = yield from self._execute(call)
        results = []
        for item in _json(reply)["results"]:
            if item.get("ok"):
                results.append(BatchResult(
                    key=item["key"], ok=True, found=item.get("found"), value=item.get("value"),
                    timestamp=_timestamp(item["timestamp"]) if "timestamp" in item else None,
                ))
            else:
                results.append(BatchResult(
                    key=item["key"], ok=False, error=RingKVError.from_json(item),
                ))
        return results

    def scan_pages(
        self,
        *,
        keyspace: str | None = None,
        consistency: str | ConsistencyLevel | None = None,
        page_size: int = 100,
        page_token: str | None = None,
    ) -> _Plan[None]:
        """Iterate over a keyspace one ``Page`` at a time, in token order.

        Pages are fetched lazily, following ``next_page_token``; pass a
        page's token as ``page_token`` to resume a scan later.
        """
        keyspace = keyspace or self.keyspace
        level = self._level(consistency, write=False, default=self.consistency)
        while True:
            query = [f"limit={int(page_size)}"]
            if page_token is not None:
                query.append(f"page_token={quote(page_token, safe='')}")
            if level:
                query.append(f"consistency={level}")
            path = f"/v1/kv/{quote(keyspace, safe='')}?{'&'.join(query)}"
            reply = yield from self._execute(_Call("GET", path, None, (), read=True))
            if reply.status == 404:
                raise RingKVError.from_json(_json(reply), http_status=404)
            body = _json(reply)
            items = [
                Record(key=i["key"], value=i["value"], timestamp=_timestamp(i["timestamp"]))
                for i in body["items"]
            ]
            page_token = body.get("next_page_token")
            yield _Emit(Page(items, page_token, body.get("receipt")))
            if page_token is None:
                return

    def scan(self, **options: Any) -> _Plan[None]:
        """Iterate over every live key of a keyspace as ``Record``s, in token order.

        Takes the options of ``scan_pages``; fetches ``page_size`` keys per
        request as the iteration goes.
        """
        pages = self.scan_pages(**options)
        outcome: _Outcome = None
        try:
            while True:
                try:
                    effect = pages.send(outcome)
                except StopIteration:
                    return
                if isinstance(effect, _Emit):
                    for record in effect.item.items:
                        yield _Emit(record)
                    outcome = None
                else:
                    outcome = yield effect
        finally:
            pages.close()

    scan.__signature__ = inspect.signature(scan_pages)  # type: ignore[attr-defined]

    def refresh_ring(self) -> _Plan[None]:
        """Fetch the ring now (it is also refreshed by itself, see the class docstring)."""
        yield from self._refresh(force=True)

    # ---- building calls ---------------------------------------------------

    def _level(
        self, level: str | ConsistencyLevel | None, *, write: bool, default: str | None,
        field: str = "consistency",
    ) -> str | None:
        if level is None:
            return None if default == "ANY" and not write else default  # ANY is for writes only
        if isinstance(level, ConsistencyLevel):
            level = level.value
        return ConsistencyLevel.parse(level, write=write, field=field).value

    def _idempotency_key(self, given: str | None) -> str | None:
        if given is not None:
            return given
        return str(uuid.uuid4()) if self.idempotent_writes else None

    def _key_call(
        self, method: str, keyspace: str, key: str, consistency: Any, *,
        body: dict[str, Any] | None, idempotency_key: str | None = None,
    ) -> _Call:
        raw = _key_bytes(key)
        read = method == "GET"
        level = self._level(consistency, write=not read, default=self.consistency)
        # Every reserved character is escaped, and dots too, so that no key
        # (not even "." or "..") is ever read as a path segment to normalise.
        path = f"/v1/kv/{quote(keyspace, safe='')}/{quote(raw, safe='').replace('.', '%2E')}"
        if level:
            path += f"?consistency={level}"
        return _Call(
            method, path, None if body is None else json.dumps(body).encode(),
            ((keyspace, raw),), read=read,
            idempotency_key=None if read else self._idempotency_key(idempotency_key),
        )

    def _write(
        self, method: str, keyspace: str | None, key: str, consistency: Any,
        body: dict[str, Any] | None, idempotency_key: str | None,
    ) -> _Plan[WriteResult]:
        call = self._key_call(method, keyspace or self.keyspace, key, consistency, body=body,
                              idempotency_key=idempotency_key)
        reply = yield from self._execute(call)
        body = _json(reply)
        replayed = reply.headers.get(REPLAYED_HEADER, "").lower() == "true"
        return WriteResult(_timestamp(body["timestamp"]), body["receipt"], replayed)

    # ---- routing ------------------------------------------------------------

    def _usable(self, url: str, now: float) -> bool:
        return self._down_until.get(url, 0.0) <= now

    def _candidates(
        self, routing: Sequence[tuple[str, bytes]], affinity: str | None = None
    ) -> list[str]:
        """Node URLs in the order to try: live replicas, other live nodes, the rest.

        Equally good nodes are shuffled to spread the load, except for a
        call with an ``affinity`` (its idempotency key): rendezvous hashing
        then sends every call with that key to the same node while the ring
        stays the same, because only that node can recognise a repeat.
        """
        topology = self._topology
        now = self._clock.monotonic_s()
        ring = topology.ring
        node_ids = list(ring.node_ids) if ring is not None else []
        if affinity is None:
            self._rng.shuffle(node_ids)
        else:
            node_ids.sort(key=lambda node_id: hashlib.blake2b(
                f"{affinity}\0{node_id}".encode(), digest_size=8).digest())
        preference: Counter[str] = Counter()
        if ring is not None:
            for keyspace, key in routing:
                rf = topology.replication.get(keyspace)
                if rf is not None:
                    preference.update(ring.replicas_for_key(key, rf))

        def rank(node_id: str) -> tuple[int, int]:
            url = topology.urls[node_id]
            live = topology.up.get(node_id, False) and self._usable(url, now)
            return (0 if live else 1, -preference[node_id])

        ordered = sorted((n for n in node_ids if n in topology.urls), key=rank)
        urls = [topology.urls[n] for n in ordered]
        known = set(urls)
        seeds = [seed for seed in self.seeds if seed not in known]
        seeds.sort(key=lambda seed: not self._usable(seed, now))
        return urls + seeds

    def _mark_down(self, url: str) -> None:
        self._down_until[url] = self._clock.monotonic_s() + DOWN_COOLDOWN_S
        self._stale = True

    def _mark_up(self, url: str) -> None:
        if url in self._down_until:
            self._down_until.pop(url, None)

    # ---- the ring -----------------------------------------------------------

    def _refresh(self, *, force: bool = False, deadline_s: float | None = None) -> _Plan[None]:
        """Fetch ``/v1/ring`` from a live node when it is due (one refresh at a time).

        ``deadline_s`` (monotonic): the refresh gives up then, so that it stays
        inside the time bound of the call it runs for.
        """
        now = self._clock.monotonic_s()
        if force or self._stale:
            due = now >= self._last_refresh_attempt + MIN_REFRESH_GAP_S
        else:
            due = now >= self._next_refresh_at
        if not due or not self._refreshing.acquire(blocking=False):
            return  # not due, or another call is refreshing: carry on with the ring we have
        try:
            self._last_refresh_attempt = now
            for url in self._candidates(())[:MAX_REFRESH_TRIES]:
                timeout_s = self._attempt_timeout_s(deadline_s)
                if timeout_s is None:
                    return
                outcome = yield _Send("GET", url + "/v1/ring", None, _JSON_HEADERS, timeout_s)
                if isinstance(outcome, _Failure):
                    if outcome.kind == "connect":
                        self._mark_down(url)
                    continue
                assert outcome is not None
                if outcome.status != 200:
                    continue
                try:
                    topology = _parse_ring(outcome.body, url)
                except (ValueError, KeyError, TypeError):
                    continue
                for node_id, up in topology.up.items():
                    if up and not self._topology.up.get(node_id, True):
                        # The cluster saw it come back: stop avoiding it.
                        self._mark_up(topology.urls.get(node_id, ""))
                self._topology = topology
                self._stale = False
                self._next_refresh_at = self._clock.monotonic_s() + self.refresh_interval_s
                return
        finally:
            self._refreshing.release()

    # ---- sending, with retries ---------------------------------------------------

    def _attempt_timeout_s(self, deadline_s: float | None) -> float | None:
        """``timeout_s``, cut to what is left before ``deadline_s``; None if nothing is."""
        if deadline_s is None:
            return self.timeout_s
        left_s = deadline_s - self._clock.monotonic_s()
        return min(self.timeout_s, left_s) if left_s > MIN_ATTEMPT_S else None

    def _backoff_s(self, retry: int) -> float:
        """Exponential backoff with jitter: base * 2**retry, capped, times 0.5-1."""
        ceiling = min(self.backoff_max_s, self.backoff_base_s * (2 ** retry))
        return ceiling * (0.5 + self._rng.random() / 2)

    def _execute(self, call: _Call) -> _Plan[_Reply]:
        """Send ``call`` until a node answers for good; returns a 2xx (or a get's 404) reply.

        Connection failures (nothing was sent) move on to the next node and
        cost no retry, so every node is tried before ``NoNodeAvailable``.
        Other failures are retried, up to ``max_retries`` times, only when
        that is safe; a repeatable write whose answer was lost is retried on
        the same node, which de-duplicates it by its idempotency key. The whole
        call, ring refresh and connection attempts included, ends by its
        deadline: ``(max_retries + 1) * timeout_s`` plus the longest backoffs.
        """
        deadline_s = self._clock.monotonic_s() + (self.max_retries + 1) * self.timeout_s \
            + self.max_retries * self.backoff_max_s
        yield from self._refresh(deadline_s=deadline_s)
        candidates = self._candidates(call.routing, call.idempotency_key)
        headers = dict(_JSON_HEADERS)
        if call.idempotency_key is not None:
            headers[IDEMPOTENCY_HEADER] = call.idempotency_key
        excluded: set[str] = set()
        tried: list[str] = []
        reasons: list[str] = []
        last_error: RingKVError | None = None
        maybe_applied = False
        retries = 0
        position = 0
        url: str | None = None
        while True:
            if url is None:
                url, position = self._next_url(candidates, excluded, position)
                if url is None:
                    break
            timeout_s = self._attempt_timeout_s(deadline_s)
            if timeout_s is None:
                if last_error is not None:
                    raise last_error
                reasons.append(f"the call's deadline passed after {len(tried)} node(s)")
                raise _no_node(call, tried, reasons, maybe_applied)
            if url not in tried:
                tried.append(url)
            outcome = yield _Send(call.method, url + call.path, call.body, headers, timeout_s)
            assert outcome is not None
            if isinstance(outcome, _Reply):
                self._mark_up(url)
                if outcome.status < 300 or (outcome.status == 404 and call.method == "GET"):
                    return outcome
                error = RingKVError.from_json(_safe_json(outcome.body), http_status=outcome.status)
                last_error = error
                if isinstance(error, Unavailable):
                    self._stale = True  # the node sees replicas down: our ring may be stale
                    excluded.add(url)  # it will say the same again; ask another coordinator
                elif isinstance(error, (Overloaded, ShuttingDown)):
                    pass  # did not run: safe to retry anywhere
                elif outcome.status < 500 or not call.repeatable:
                    raise error
                if retries >= self.max_retries:
                    raise error
                url = None  # retry on the next node
            else:
                reasons.append(f"{url}: {outcome.reason}")
                if outcome.kind == "connect":
                    self._mark_down(url)
                    excluded.add(url)
                    url = None
                    continue  # nothing was sent: try the next node, at no retry cost
                self._stale = True
                maybe_applied = maybe_applied or not call.read
                if not call.repeatable or retries >= self.max_retries:
                    raise _no_node(call, tried, reasons, maybe_applied)
                if call.idempotency_key is None:
                    url = None  # a read: any replica will do
                # else: same node, same key, so the node can de-duplicate it
            retries += 1
            yield _Sleep(min(self._backoff_s(retries - 1),
                             max(0.0, deadline_s - self._clock.monotonic_s())))
        if last_error is not None:
            raise last_error
        raise _no_node(call, tried, reasons, maybe_applied)

    @staticmethod
    def _next_url(
        candidates: list[str], excluded: set[str], position: int
    ) -> tuple[str | None, int]:
        """The next candidate not excluded, cycling through the list."""
        for step in range(len(candidates)):
            url = candidates[(position + step) % len(candidates)]
            if url not in excluded:
                return url, position + step + 1
        return None, position


def _safe_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return body[:200].decode(errors="replace")


def _no_node(call: _Call, tried: list[str], reasons: list[str], maybe_applied: bool) -> NoNodeAvailable:
    what = f"{call.method} {call.path.split('?')[0]}"
    note = " (the write may have been applied)" if maybe_applied else ""
    return NoNodeAvailable(
        f"no ringkv node answered {what}{note}: " + ("; ".join(reasons) or "no nodes to try"),
        tried=tried, reasons=reasons, maybe_applied=maybe_applied,
    )


# -- generating the public methods -------------------------------------------------

_CALLS = ("get", "get_with_meta", "put", "delete", "batch", "refresh_ring")
_STREAMS = ("scan", "scan_pages")


def _operation_method(name: str, *, asynchronous: bool) -> Callable[..., Any]:
    """A public method that runs ``_Operations.<name>``'s plan with the client's I/O."""
    plan_function = getattr(_Operations, name)
    if name in _CALLS:
        def method(self: Any, *args: Any, **kwargs: Any) -> Any:
            return self._call(plan_function(self._ops, *args, **kwargs))
        returns = str(plan_function.__annotations__.get("return", ""))
        returns = returns.removeprefix("_Plan[").removesuffix("]")
        if asynchronous:
            returns = f"Awaitable[{returns}]"
    else:
        def method(self: Any, *args: Any, **kwargs: Any) -> Any:
            return self._stream(plan_function(self._ops, *args, **kwargs))
        item = "Page" if name == "scan_pages" else "Record"
        returns = f"{'AsyncIterator' if asynchronous else 'Iterator'}[{item}]"
    functools.update_wrapper(method, plan_function)
    del method.__wrapped__  # type: ignore[attr-defined]  # the signature below is the public one
    method.__signature__ = inspect.signature(plan_function).replace(  # type: ignore[attr-defined]
        return_annotation=returns
    )
    return method


def _with_operations(cls: type) -> type:
    """Class decorator: add every operation of ``_Operations`` as a public method."""
    for name in _CALLS + _STREAMS:
        method = _operation_method(name, asynchronous=cls.__name__.startswith("Async"))
        method.__qualname__ = f"{cls.__name__}.{name}"
        setattr(cls, name, method)
    return cls


class _Stepper:
    """Steps a plan for a client: iterate over its effects, and set ``outcome`` after each.

    When the plan ends, its result is appended to ``result``; leaving the
    ``with`` block closes the plan (so an abandoned scan releases what it holds).
    """

    def __init__(self, plan: _Plan[Any], result: list[Any]) -> None:
        self._plan = plan
        self._result = result
        self.outcome: _Outcome = None

    def __enter__(self) -> _Stepper:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._plan.close()

    def __iter__(self) -> _Stepper:
        return self

    def __next__(self) -> _Send | _Sleep | _Emit:
        outcome, self.outcome = self.outcome, None
        try:
            return self._plan.send(outcome)
        except StopIteration as done:
            self._result.append(done.value)
            raise StopIteration from None


class _ClientBase:
    """What both clients share: configuration, and the ring as last fetched."""

    def __init__(self, seeds: Sequence[str] | str, **options: Any) -> None:
        self._ops = _Operations(seeds, **options)
        self._pool_size = self._ops.pool_size
        self._setup()

    __init__.__doc__ = _Operations.__init__.__doc__
    __init__.__signature__ = inspect.signature(_Operations.__init__)  # type: ignore[attr-defined]

    def _setup(self) -> None:
        """Per-client I/O state (a connection pool); set up by each subclass."""

    @property
    def keyspace(self) -> str:
        """The keyspace of calls that name none."""
        return self._ops.keyspace

    @property
    def consistency(self) -> str | None:
        """The consistency level of calls that name none (None: the keyspace's default)."""
        return self._ops.consistency

    def nodes(self) -> list[NodeView]:
        """The nodes of the ring as last fetched, with their URL and liveness."""
        topology = self._ops._topology
        if topology.ring is None:
            return []
        return [
            NodeView(node_id, topology.urls.get(node_id), topology.up.get(node_id, False))
            for node_id in topology.ring.node_ids
        ]

    def replicas(self, key: str, *, keyspace: str | None = None) -> list[str]:
        """The node ids that replicate ``key`` per the last fetched ring (empty if unknown)."""
        topology = self._ops._topology
        keyspace = keyspace or self.keyspace
        if topology.ring is None or keyspace not in topology.replication:
            return []
        return list(topology.ring.replicas_for_key(_key_bytes(key), topology.replication[keyspace]))


# -- the blocking client ---------------------------------------------------------------


class _Watchdog:
    """One background thread that cuts off blocking attempts at their deadline.

    A socket timeout bounds each ``recv``, not an attempt: a server that sends
    a byte every little while could hold a call for ever. Each attempt arms the
    watchdog with its deadline; when the deadline passes first, the watchdog
    shuts the socket down, and the blocked read returns at once.
    """

    def __init__(self, clock: SystemClock) -> None:
        self._clock = clock
        self._armed: dict[int, tuple[float, socket.socket]] = {}
        self._ids = itertools.count()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None

    def arm(self, deadline_s: float, sock: socket.socket) -> int:
        with self._wake:
            token = next(self._ids)
            self._armed[token] = (deadline_s, sock)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="ringkv-client-watchdog",
                                                daemon=True)
                self._thread.start()
            self._wake.notify()
            return token

    def disarm(self, token: int) -> None:
        with self._wake:
            self._armed.pop(token, None)

    def _run(self) -> None:
        with self._wake:
            while True:
                now = self._clock.monotonic_s()
                for token, (deadline_s, sock) in list(self._armed.items()):
                    if deadline_s <= now:
                        del self._armed[token]
                        try:
                            sock.shutdown(socket.SHUT_RDWR)
                        except OSError:
                            pass  # already closed
                earliest = min((d for d, _ in self._armed.values()), default=None)
                # Bounded waits: the thread re-checks at least once a second.
                self._wake.wait(timeout=1.0 if earliest is None else min(1.0, earliest - now))


class _ConnectionPool:
    """Keep-alive ``http.client`` connections per node; safe to share between threads."""

    def __init__(self, max_idle_per_node: int) -> None:
        self._max_idle = max_idle_per_node
        self._idle: dict[tuple[str, str, int], list[tuple[http.client.HTTPConnection, float]]] = {}
        self._lock = threading.Lock()
        self._clock = SystemClock()
        self._watchdog = _Watchdog(self._clock)

    def send(self, effect: _Send) -> _Reply | _Failure:
        parts = urlsplit(effect.url)
        scheme, host = parts.scheme, parts.hostname or ""
        port = parts.port or (443 if scheme == "https" else 80)
        origin = (scheme, host, port)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        conn = self._checkout(origin)
        if conn is None:
            factory = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
            conn = factory(host, port, timeout=effect.timeout_s)
            try:
                conn.connect()
            except OSError as exc:
                conn.close()
                return _Failure("connect", f"cannot connect: {exc}")
        assert conn.sock is not None
        conn.sock.settimeout(effect.timeout_s)
        deadline_s = self._clock.monotonic_s() + effect.timeout_s
        watch = self._watchdog.arm(deadline_s, conn.sock)
        try:
            conn.request(effect.method, target, body=effect.body, headers=dict(effect.headers))
            response = conn.getresponse()
            body = response.read()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            if isinstance(exc, TimeoutError) or self._clock.monotonic_s() >= deadline_s:
                return _Failure("timeout", f"no answer within {effect.timeout_s:.3g} s")
            return _Failure("io", f"connection lost: {exc!r}")
        finally:
            self._watchdog.disarm(watch)
        if response.will_close or self._clock.monotonic_s() >= deadline_s:
            conn.close()  # the watchdog may have shut it down just as the answer arrived
        else:
            self._checkin(origin, conn)
        return _Reply(response.status, body, response.msg)  # headers, case-insensitive

    def _checkout(self, origin: tuple[str, str, int]) -> http.client.HTTPConnection | None:
        now = self._clock.monotonic_s()
        while True:
            with self._lock:
                idle = self._idle.get(origin)
                if not idle:
                    return None
                conn, since = idle.pop()
            if now - since < KEEPALIVE_S and not _dropped(conn):
                return conn
            conn.close()

    def _checkin(self, origin: tuple[str, str, int], conn: http.client.HTTPConnection) -> None:
        with self._lock:
            idle = self._idle.setdefault(origin, [])
            if len(idle) < self._max_idle:
                idle.append((conn, self._clock.monotonic_s()))
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn, _ in conns:
                conn.close()


def _dropped(conn: http.client.HTTPConnection) -> bool:
    """An idle keep-alive connection that is readable has been closed by the node."""
    if conn.sock is None:
        return True
    try:
        readable, _, _ = select.select([conn.sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


@_with_operations
class Client(_ClientBase):
    """A blocking ringkv client; safe to share between threads (and greenlets).

    ``Client(["http://127.0.0.1:7400", ...], consistency="QUORUM",
    timeout_s=5.0, max_retries=3)``. Methods: ``get``, ``get_with_meta``,
    ``put``, ``delete``, ``batch``, ``scan``, ``scan_pages``,
    ``refresh_ring``, ``nodes``, ``replicas``; ``close`` (or use ``with``).
    """

    def _setup(self) -> None:
        self._pool = _ConnectionPool(self._pool_size)

    def _perform(self, effect: _Send | _Sleep | _Emit) -> _Outcome:
        if isinstance(effect, _Send):
            return self._pool.send(effect)
        if isinstance(effect, _Sleep):
            self._ops._clock.sleep_s(effect.seconds)
        return None

    def _stream(self, plan: _Plan[Any], result: list[Any] | None = None) -> Iterator[Any]:
        with _Stepper(plan, [] if result is None else result) as steps:
            for effect in steps:
                if isinstance(effect, _Emit):
                    yield effect.item
                steps.outcome = self._perform(effect)

    def _call(self, plan: _Plan[T]) -> T:
        result: list[T] = []
        for _ in self._stream(plan, result):
            raise AssertionError("a call emitted items")  # pragma: no cover
        return result[0]

    def close(self) -> None:
        """Close the pooled connections (the client may still be used; it reconnects)."""
        self._pool.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# -- the asyncio client -----------------------------------------------------------------


@_with_operations
class AsyncClient(_ClientBase):
    """An asyncio ringkv client (aiohttp underneath); use it from one event loop.

    Same constructor and methods as ``Client``, but each call is awaited and
    ``scan``/``scan_pages`` are async iterators. ``await client.close()``, or
    ``async with AsyncClient(...) as kv:``.
    """

    def _setup(self) -> None:
        self._session: Any = None

    async def _perform(self, effect: _Send | _Sleep | _Emit) -> _Outcome:
        if isinstance(effect, _Send):
            return await self._send(effect)
        if isinstance(effect, _Sleep):
            await asyncio.sleep(effect.seconds)
        return None

    async def _stream(
        self, plan: _Plan[Any], result: list[Any] | None = None
    ) -> AsyncIterator[Any]:
        with _Stepper(plan, [] if result is None else result) as steps:
            for effect in steps:
                if isinstance(effect, _Emit):
                    yield effect.item
                steps.outcome = await self._perform(effect)

    async def _call(self, plan: _Plan[T]) -> T:
        result: list[T] = []
        async for _ in self._stream(plan, result):
            raise AssertionError("a call emitted items")  # pragma: no cover
        return result[0]

    async def _send(self, effect: _Send) -> _Reply | _Failure:
        import aiohttp  # only asyncio users pay for it (and locust's gevent never sees it)
        from yarl import URL

        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=0, limit_per_host=self._pool_size, keepalive_timeout=KEEPALIVE_S
            )
            self._session = aiohttp.ClientSession(connector=connector)
        timeout = aiohttp.ClientTimeout(total=effect.timeout_s, sock_connect=effect.timeout_s)
        try:
            async with self._session.request(
                effect.method, URL(effect.url, encoded=True), data=effect.body,
                headers=effect.headers, timeout=timeout,
            ) as response:
                body = await response.read()
                return _Reply(response.status, body, response.headers)
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            return _Failure("connect", f"cannot connect: {exc}")
        except (asyncio.TimeoutError, aiohttp.ServerTimeoutError):
            return _Failure("timeout", f"no answer within {effect.timeout_s:.3g} s")
        except aiohttp.ClientError as exc:
            return _Failure("io", f"connection lost: {exc!r}")

    async def close(self) -> None:
        """Close the pooled connections (the client may still be used; it reconnects)."""
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
