"""The blocking client: ``Client``, over pooled keep-alive ``http.client`` connections.

A shell module: it performs the effects of the plans in ``operations.py``
with blocking sockets, so it also works under gevent (e.g. in locust). A
watchdog thread holds every attempt to its deadline.
"""

from __future__ import annotations

import datetime
import http.client
import itertools
import random
import select
import socket
import ssl
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Generic, Protocol, TypeVar, cast
from urllib.parse import urlsplit

from ringkv.client import native, recipes
from ringkv.client.recipes import DEFAULT_TIMEOUT_S, DEFAULT_TTL_S, Election, Group, Lock, Session
from ringkv.client.base import KEEPALIVE_S, ClientBase
from ringkv.client.native import NativeRequest
from ringkv.client.plan import Effect, Emit, Failure, Outcome, Plan, Reply, Send, Sleep, Stepper
from ringkv.client.operations import GET_MANY_BATCH, UNSET
from ringkv.client.transaction import TxnCore, rerun_pause_s
from ringkv.client.watch import (
    SILENT_STREAM_S,
    MAX_WATCH_LINE_BYTES,
    MAX_RECONNECTS,
    WATCH_HEADERS,
    StreamEnded,
    WatchCore,
    WatchEvent,
)
from ringkv.client.types import (
    BatchResult,
    Key,
    NodeView,
    Page,
    Record,
    TxnCommit,
    TxnHandle,
    TxnResult,
    TxnStatus,
    Versioned,
    WriteResult,
)
from ringkv.clock import SystemClock
from ringkv.errors import ProtocolError, RingKVError
from ringkv.limits import MAX_FRAME_BYTES
from ringkv.net.codec import (
    KIND_REQUEST, KIND_RESPONSE, Frame, FrameDecoder, encode_frame, frame_packer,
)
from ringkv.net.native import STREAM_VERSION
from ringkv.quorum import ConsistencyLevel

T = TypeVar("T")


class Client(ClientBase):
    """A blocking ringkv client; safe to share between threads (and greenlets).

    ``Client(["http://127.0.0.1:7400", ...], consistency="QUORUM",
    timeout_s=5.0, max_retries=3)``. Methods: ``get``, ``get_with_meta``,
    ``exists``, ``ttl_s``, ``get_many``, ``put``, ``delete``, ``batch``, ``scan``,
    ``scan_pages``, ``get_versioned``, ``txn``, ``txn_status``, ``transaction``,
    ``run_transaction`` (the transactional tier), ``lease``, ``watch``, and the
    coordination recipes ``lock``, ``election``, ``group``, ``watch_config``,
    ``refresh_ring``, ``nodes``, ``replicas``; ``close`` (or use ``with``).

    Keys are ``str``, or ``bytes`` that are UTF-8. What a call raises: its own
    refusal of an argument, before anything is sent (``InvalidArgument``, a
    ``ValueError``; ``InvalidArgumentType`` is also a ``TypeError``), or what a
    node answered (a ``RingKVError`` subclass with its ``code`` and
    ``http_status``), or ``NoNodeAvailable`` (see ``ringkv.client.errors``).
    """

    # ---- the calls (each runs the plan of the same name in ``operations.py``) ----

    def get(
        self,
        key: Key,
        *,
        keyspace: str | None = None,
        consistency: str | ConsistencyLevel | None = None,
    ) -> Any:
        """Read ``key``'s value (any JSON value), or None if the key is absent.

        ``consistency`` (ONE, TWO, THREE, QUORUM, ALL) overrides the client's
        default; ``keyspace`` overrides the client's keyspace.
        """
        return self._call(self._ops.get(key, keyspace=keyspace, consistency=consistency))

    def get_with_meta(
        self,
        key: Key,
        *,
        keyspace: str | None = None,
        consistency: str | ConsistencyLevel | None = None,
    ) -> Record | None:
        """Read ``key`` as a ``Record`` (value, timestamp, expiry, receipt), or None if absent."""
        return self._call(self._ops.get_with_meta(
            key, keyspace=keyspace, consistency=consistency,
        ))

    def exists(
        self,
        key: Key,
        *,
        keyspace: str | None = None,
        consistency: str | ConsistencyLevel | None = None,
    ) -> bool:
        """Whether ``key`` holds a live value (a read at ``consistency``, value and all)."""
        return self._call(self._ops.exists(key, keyspace=keyspace, consistency=consistency))

    def ttl_s(
        self,
        key: Key,
        *,
        keyspace: str | None = None,
        consistency: str | ConsistencyLevel | None = None,
    ) -> float | None:
        """The seconds ``key`` has left before it expires, as the answering node counts
        them (ms precision, rounded up); None if it has no TTL. Raises ``NotFound`` if
        the key is absent (or expired)."""
        return self._call(self._ops.ttl_s(key, keyspace=keyspace, consistency=consistency))

    def get_many(
        self,
        keys: Iterable[Key],
        *,
        keyspace: str | None = None,
        consistency: str | ConsistencyLevel | None = None,
        batch_size: int = GET_MANY_BATCH,
    ) -> dict[str, Any]:
        """Read many keys: ``{key: value}`` for those that exist (absent ones are left
        out), through ``POST /v1/batch`` in batches of at most ``batch_size`` keys (fewer
        if the node's ``limits.max_batch_ops`` is lower). Any key's failure raises its
        typed error (e.g. ``Unavailable``)."""
        return self._call(self._ops.get_many(
            keys, keyspace=keyspace, consistency=consistency, batch_size=batch_size,
        ))

    def put(
        self,
        key: Key,
        value: Any,
        *,
        ttl: int | datetime.timedelta | None = None,
        keyspace: str | None = None,
        consistency: str | ConsistencyLevel | None = None,
        idempotency_key: str | None = None,
        if_version: int | None = None,
        if_absent: bool = False,
        if_equals: Any = UNSET,
        txn_id: str | None = None,
        lease: Any = None,
    ) -> WriteResult:
        """Write ``value`` (any JSON value) under ``key``; ``ttl`` (whole seconds: an
        ``int`` or a ``datetime.timedelta``) expires it.

        ``consistency`` may also be ANY. The write carries an idempotency
        key (``idempotency_key``, or a fresh UUID when the client has
        ``idempotent_writes``), so it is retried safely.

        On a transactional keyspace the write is a single-key transaction
        (``version`` in the result is its commit timestamp) and may carry one
        condition: ``if_version`` (the key's version is this), ``if_absent``
        (the key has no value) or ``if_equals`` (its value equals this JSON).
        A condition that does not hold raises ``ConditionFailed`` with
        ``current_value`` and ``current_version``, and is not retried; a
        conflict abort is retried under the same ``txn_id`` (given, or made
        up by the client) up to ``txn_retries`` times.

        ``lease`` (what ``lease()`` returned, or a lease id): attach the key to that
        session lease; it is deleted when the lease expires or is revoked, unless
        a later write (or delete) detached it first.
        """
        return self._call(self._ops.put(
            key, value, ttl=ttl, keyspace=keyspace, consistency=consistency,
            idempotency_key=idempotency_key, if_version=if_version, if_absent=if_absent,
            if_equals=if_equals, txn_id=txn_id, lease=lease,
        ))

    def delete(
        self,
        key: Key,
        *,
        keyspace: str | None = None,
        consistency: str | ConsistencyLevel | None = None,
        idempotency_key: str | None = None,
        if_version: int | None = None,
        if_absent: bool = False,
        if_equals: Any = UNSET,
        txn_id: str | None = None,
    ) -> WriteResult:
        """Delete ``key`` (writes a tombstone; deleting an absent key succeeds too).

        ``consistency``, ``idempotency_key``, the conditions (``if_version``,
        ``if_absent``, ``if_equals``) and ``txn_id`` work as for ``put``.
        """
        return self._call(self._ops.delete(
            key, keyspace=keyspace, consistency=consistency, idempotency_key=idempotency_key,
            if_version=if_version, if_absent=if_absent, if_equals=if_equals, txn_id=txn_id,
        ))

    def get_versioned(
        self,
        key: Key,
        *,
        keyspace: str | None = None,
        snapshot_ts: int | None = None,
        max_staleness_ms: int | None = None,
    ) -> Versioned | None:
        """Read ``key`` of a transactional keyspace as ``Versioned`` (value, version, receipt),
        or None if absent.

        By default a strong read at the range's leader. ``snapshot_ts`` (µs)
        reads the value as of that timestamp, ``max_staleness_ms`` a value at
        most that old; either may be served by any replica whose safe time
        has passed it.
        """
        return self._call(self._ops.get_versioned(
            key, keyspace=keyspace, snapshot_ts=snapshot_ts, max_staleness_ms=max_staleness_ms,
        ))

    def txn(
        self,
        keyspace: str | None = None,
        *,
        reads: Sequence[str] = (),
        conditions: Sequence[Mapping[str, Any]] = (),
        writes: Sequence[Mapping[str, Any]] = (),
        txn_id: str | None = None,
    ) -> TxnResult:
        """Run a one-shot transaction in a transactional keyspace (in one range, or
        across several through two-phase commit).

        ``reads``: keys to read; ``conditions``: ``{"key": k, "version": N}``,
        ``{"key": k, "absent": True}`` or ``{"key": k, "equals": json}``;
        ``writes``: ``{"op": "put", "key": k, "value": v}`` or ``{"op":
        "delete", "key": k}``. Either every write commits and the reads come
        back, all at one timestamp, or nothing is applied: a failed condition
        raises ``ConditionFailed`` (not retried), a conflict abort is retried
        under the same ``txn_id`` up to ``txn_retries`` times and then raises
        ``Aborted``.
        """
        return self._call(self._ops.txn(
            keyspace, reads=reads, conditions=conditions, writes=writes, txn_id=txn_id,
        ))

    def txn_status(
        self, txn_id: str, *, keyspace: str | None = None, key: Key | None = None,
    ) -> TxnStatus:
        """What the leader of a transaction's range knows of ``txn_id``: ``TxnStatus``
        with ``status`` ``committed`` (and ``commit_ts``), ``pending`` or ``not_committed``.

        ``key``: a key the transaction touched (needed when the keyspace has
        more than one range).
        """
        return self._call(self._ops.txn_status(txn_id, keyspace=keyspace, key=key))

    def batch(
        self,
        ops: Sequence[Mapping[str, Any]],
        *,
        consistency: str | ConsistencyLevel | None = None,
        idempotency_key: str | None = None,
    ) -> list[BatchResult]:
        """Run several operations in one request; each succeeds or fails on its own.

        Each op is a mapping like the HTTP API's: ``{"op": "put", "key": "a",
        "value": 1, "ttl": 60}``, ``{"op": "get", "key": "a"}``,
        ``{"op": "delete", "key": "a"}``, each optionally with its own
        ``keyspace`` and ``consistency``. Returns one ``BatchResult`` per op,
        in order. The request goes to the node that replicates most of its keys.
        """
        return self._call(self._ops.batch(
            ops, consistency=consistency, idempotency_key=idempotency_key,
        ))

    def scan(
        self,
        *,
        keyspace: str | None = None,
        consistency: str | ConsistencyLevel | None = None,
        page_size: int = 100,
        page_token: str | None = None,
    ) -> Iterator[Record]:
        """Iterate over every live key of a keyspace as ``Record``s, in token order.

        Takes the options of ``scan_pages``; fetches ``page_size`` keys per
        request as the iteration goes.
        """
        return self._stream(self._ops.scan(
            keyspace=keyspace, consistency=consistency, page_size=page_size,
            page_token=page_token,
        ))

    def scan_pages(
        self,
        *,
        keyspace: str | None = None,
        consistency: str | ConsistencyLevel | None = None,
        page_size: int = 100,
        page_token: str | None = None,
    ) -> Iterator[Page]:
        """Iterate over a keyspace one ``Page`` at a time, in token order.

        Pages are fetched lazily, following ``next_page_token``; pass a
        page's token as ``page_token`` to resume a scan later.
        """
        return self._stream(self._ops.scan_pages(
            keyspace=keyspace, consistency=consistency, page_size=page_size,
            page_token=page_token,
        ))

    def transaction(
        self, keyspace: str | None = None, *, read_only: bool = False,
        priority: int | None = None,
    ) -> Transaction:
        """An interactive transaction on a transactional keyspace, begun on first use.

        ``with kv.transaction("bank") as tx: tx.get(k); tx.put(k, v); tx.delete(k)``
        (on ``AsyncClient``: ``async with``, each call awaited) commits when the
        block ends cleanly and aborts when it raises. Reads see the transaction's
        own writes; writes take effect at commit, across any number of ranges.
        ``keyspace``: the client's keyspace if it is transactional, else the
        cluster's only transactional one. ``read_only``: reads at one snapshot, no
        locks. ``priority``: an earlier attempt's (``tx.priority``), so that a rerun
        keeps its age (wound-wait). Every call goes to the node that began it. A
        conflict ends it with ``Aborted`` (``reason``: ``wounded``,
        ``leader_changed``, ``aborted`` ...); ``run_transaction`` runs a function
        again on such an abort.
        """
        return Transaction(self, TxnCore(self._ops, keyspace, read_only=read_only,
                                         priority=priority))

    def run_transaction(
        self, fn: Callable[[Transaction], T], *, keyspace: str | None = None,
        read_only: bool = False, max_retries: int | None = None,
    ) -> T:
        """Run ``fn(tx)`` in a transaction and commit; returns what ``fn`` returned.

        After an abort a rerun may not meet again (``wounded``, ``leader_changed``,
        ``aborted``) the whole of ``fn`` runs again in a new transaction with the
        first one's priority, at most ``max_retries`` times (default: the client's
        ``txn_retries``), with backoff. It commits at most once: a commit whose
        outcome is unknown (``Timeout``, ``NoNodeAvailable``) is raised, not rerun.
        """
        priority = None
        attempt = 0
        while True:
            tx = self.transaction(keyspace, read_only=read_only, priority=priority)
            try:
                with tx:
                    result = fn(tx)
                return result
            except RingKVError as exc:
                pause_s = rerun_pause_s(self._ops, exc, attempt, max_retries)
                if pause_s is None:
                    raise
            priority = tx.priority
            attempt += 1
            self._clock.sleep_s(pause_s)

    def refresh_ring(self) -> None:
        """Fetch the ring now (it is also fetched every ``refresh_interval_s``, and on failures)."""
        self._call(self._ops.refresh_ring())

    def ensure_ring(self) -> None:
        """Fetch the ring unless it has been; ``NoNodeAvailable`` if no node answers."""
        self._call(self._ops.ensure_ring())

    def nodes(self) -> list[NodeView]:
        """The nodes of the ring, with their URL and liveness, as the client last
        fetched it; the ring is fetched first if it never has been (``NoNodeAvailable``
        if no node answers), so the answer is never an empty list."""
        self.ensure_ring()
        return self._ring_nodes()

    def replicas(self, key: Key, *, keyspace: str | None = None) -> list[str]:
        """The node ids that replicate ``key`` (empty for a keyspace the ring does not
        show); the ring is fetched first if it never has been, as for ``nodes``."""
        self.ensure_ring()
        return self._ring_replicas(key, keyspace)

    def close(self) -> None:
        """Close the pooled connections (the client may still be used; it reconnects) and
        the recipes' own sessions (their leases are revoked; a later lock takes a new one)."""
        recipes.close_default_sessions(self)
        self._pool.close()
        self._native.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ---- session leases (keys that go when their owner stops renewing) -----------

    def lease(self, ttl_s: int, *, keyspace: str | None = None) -> Lease:
        """Grant a session lease of ``ttl_s`` seconds on a transactional keyspace.

        Put keys with ``put(..., lease=lease)``; they are deleted together (one
        transaction) once the lease expires or is revoked. Used as a context
        manager (``async with`` on the asyncio client), it is renewed every third
        of its TTL in the background (a thread; on the asyncio client, a task)
        and revoked on exit.
        """
        answer = self._call(self._ops.lease_grant(ttl_s, keyspace=keyspace))
        return Lease(self, str(answer["id"]), int(answer["ttl"]))

    # ---- coordination recipes (leases + watches; client/recipes*.py) -------------

    def session(self, ttl_s: int = DEFAULT_TTL_S, *, keyspace: str = "txn") -> Session:
        """A session: one lease of ``ttl_s`` renewed in the background, shared by the
        recipes made from it (``session.lock(name)``, ``session.election(name)``,
        ``session.group(name)``), as in etcd's concurrency package. A lock on a
        session costs one transaction to acquire and one delete to release. When the
        lease is lost, every recipe on it is (``LockLost``). ``with`` (``async with``
        on the asyncio client) closes it: the lease is revoked and its keys go.
        ``lock(name)`` without a session uses the client's own session of ``ttl_s``,
        granted on first use (again once lost)."""
        return recipes.Session(self, keyspace=keyspace, ttl_s=ttl_s)

    def lock(self, name: str, *, keyspace: str = "txn", ttl_s: int = DEFAULT_TTL_S,
             timeout_s: float = DEFAULT_TIMEOUT_S) -> Lock:
        """A mutex with fencing tokens on a transactional keyspace (not acquired yet).

        ``with kv.lock("jobs") as held:`` (``async with`` on the asyncio client)
        waits at most ``timeout_s`` for it (``LockTimeout``), then
        ``held.fencing_token`` grows with every later holder and
        ``held.fenced_put(key, value)`` writes only while the lock is held. The
        holder keeps a session lease of ``ttl_s`` alive: if it stops (killed,
        paused past the TTL), the lock passes on and ``held.lost`` /
        ``held.check()`` (``LockLost``) say so.
        """
        return recipes.Lock(self, name, keyspace=keyspace, ttl_s=ttl_s, timeout_s=timeout_s)

    def election(self, name: str, *, keyspace: str = "txn",
                 ttl_s: int = DEFAULT_TTL_S) -> Election:
        """Leader election: ``campaign(value, timeout_s)``, ``leader()``, ``observe()``,
        ``resign()``; a leader that stops renewing its lease (``ttl_s``) is replaced."""
        return recipes.Election(self, name, keyspace=keyspace, ttl_s=ttl_s)

    def group(self, name: str, *, keyspace: str = "txn",
              ttl_s: int = DEFAULT_TTL_S) -> Group:
        """Group membership: ``join(member, value)`` (ephemeral, on a lease of ``ttl_s``),
        ``leave(member)``, ``members()``, ``watch_members()``, ``close()``."""
        return recipes.Group(self, name, keyspace=keyspace, ttl_s=ttl_s)

    def watch_config(self, key: str, *, keyspace: str = "txn",
                     timeout_s: float | None = None) -> Iterator[Any]:
        """A configuration key's value now (None: absent), then every new value in commit
        order with no gap; ends after ``timeout_s`` (None: while the caller iterates)."""
        return recipes.watch_config(self, key, keyspace=keyspace, timeout_s=timeout_s)

    # ---- watches (a transactional keyspace's commits, streamed) ------------------

    def watch(
        self,
        keyspace: str,
        key: str = "",
        *,
        prefix: bool = False,
        from_version: int | None = None,
        max_reconnects: int = MAX_RECONNECTS,
    ) -> Iterator[WatchEvent]:
        """Every commit to ``key`` (or, with ``prefix``, to every key starting with it;
        ``""``: the whole keyspace) of the transactional ``keyspace``, as ``WatchEvent``s
        in commit-timestamp order, for as long as the caller iterates.

        ``from_version``: deliver the commits strictly after this version (a commit
        timestamp, as reads and events report it); None: from now on. A cut
        connection is resumed, from another node if need be, after the last version
        received whole: no event is lost or repeated. ``max_reconnects`` in a row
        without progress raise ``NoNodeAvailable``; a ``from_version`` whose history
        garbage collection has thinned raises ``Compacted`` (``oldest_version``).
        Each connection of the watch is its own: over the native protocol when the
        client's protocol is native and the node speaks version 2, else over HTTP.
        """
        core = WatchCore(keyspace, key, prefix=prefix, from_version=from_version,
                         rng=random.Random(), max_reconnects=max_reconnects,
                         backoff_base_s=self._ops.backoff_base_s,
                         backoff_max_s=self._ops.backoff_max_s)
        while True:  # bounded by core.reconnect_pause_s
            url = core.next_url(self._ops.router.candidates(core.routing(),
                                                             self._clock.monotonic_s()))
            try:
                yield from self._watch_once(core, url)
                reason = "the stream ended"
            except StreamEnded as ended:
                reason = f"the node ended the stream ({ended})"
            except ConnectionRefusedError as exc:
                self._ops.router.mark_down(url, self._clock.monotonic_s())
                reason = f"cannot connect: {exc}"
            except (OSError, http.client.HTTPException) as exc:
                reason = f"connection lost: {exc!r}"
            self._clock.sleep_s(core.reconnect_pause_s(url, reason))

    def _watch_once(self, core: WatchCore, url: str) -> Iterator[WatchEvent]:
        """One connection of a watch: its events until the stream ends. Over the native
        protocol when requests to that node go native (HTTP when its native port refuses
        us, or it speaks only version 1)."""
        address = self._native_address(url)
        if address is not None:
            try:
                yield from self._watch_native(core, address, self._tls_for(url))
                return
            except _NativeRefused:
                self._native_unreachable(address)  # never sent: try the HTTP port
            except _NoStreams:
                pass
        yield from self._watch_http(core, url)

    def _watch_native(self, core: WatchCore, address: tuple[str, int],
                      context: ssl.SSLContext | None) -> Iterator[WatchEvent]:
        """One native connection of a watch (its own): a ``watch`` request, then its frames."""
        try:
            sock = socket.create_connection(address, timeout=SILENT_STREAM_S)
        except OSError as exc:
            raise _NativeRefused(str(exc)) from None
        try:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if context is not None:  # TLS first, then the native handshake inside it
                    sock = context.wrap_socket(sock, server_hostname=address[0])
                sock.sendall(native.hello_frame(credentials=self.credentials))
                frames = _FrameReader(sock)
                version = native.check_hello(frames.next())
            except (OSError, ProtocolError) as exc:
                raise _NativeRefused(repr(exc)) from None
            if version < STREAM_VERSION:
                raise _NoStreams
            sock.sendall(native.watch_frame(1, core.native_payload(), version))
            while True:  # bounded: each frame waits at most SILENT_STREAM_S
                part = native.stream_part(frames.next())
                if part.refusal is not None:
                    core.refused(part.refusal.status, part.refusal.body)
                    return
                if part.event is not None:
                    event = core.line(part.event)
                    if event is not None:
                        yield event
                if not part.more:
                    return
        finally:
            sock.close()

    def _watch_http(self, core: WatchCore, url: str) -> Iterator[WatchEvent]:
        """One HTTP connection of a watch: its NDJSON lines until the stream ends."""
        parts = urlsplit(url)
        host, scheme = parts.hostname or "", parts.scheme
        port = parts.port or (443 if scheme == "https" else 80)
        conn: http.client.HTTPConnection
        if scheme == "https":
            conn = http.client.HTTPSConnection(host, port, timeout=SILENT_STREAM_S,
                                               context=self._tls_for(url))
        else:
            conn = http.client.HTTPConnection(host, port, timeout=SILENT_STREAM_S)
        try:
            conn.request("GET", core.path(), headers={**self._ops.headers, **WATCH_HEADERS})
            response = conn.getresponse()
            if response.status != 200:
                core.refused(response.status, response.read())
                return
            while True:  # bounded: each line waits at most SILENT_STREAM_S
                raw = response.readline(MAX_WATCH_LINE_BYTES)
                if not raw:
                    return
                event = core.line(raw)
                if event is not None:
                    yield event
        finally:
            conn.close()

    # ---- performing the plans' effects ------------------------------------------

    def _setup(self) -> None:
        # The recipes' own sessions (``lock(name)``), by (keyspace, ttl_s); see session().
        self._recipe_sessions: dict[tuple[str, int], recipes.Session] = {}
        self._pool = _ConnectionPool(self._pool_size, self._clock, self._tls_for)
        self._native = _NativePool(self._pool_size, self._clock, self._pool.watchdog,
                                   self.credentials)

    def _perform(self, effect: Effect) -> Outcome:
        if isinstance(effect, Send):
            route = self._native_route(effect)
            if route is not None:
                outcome = self._native.send(route[0], route[1], effect.timeout_s, route[2])
                if outcome is not None and not (isinstance(outcome, Failure)
                                                and outcome.kind == "connect"):
                    return outcome
                if outcome is not None:
                    self._native_unreachable(route[0])  # never sent: try the HTTP port
            return self._pool.send(effect)
        if isinstance(effect, Sleep):
            self._clock.sleep_s(effect.seconds)
        return None

    def _stream(self, plan: Plan[Any], result: list[Any] | None = None) -> Iterator[Any]:
        with Stepper(plan, [] if result is None else result) as steps:
            for effect in steps:
                if isinstance(effect, Emit):
                    yield effect.item
                steps.outcome = self._perform(effect)

    def _call(self, plan: Plan[T]) -> T:
        result: list[T] = []
        for _ in self._stream(plan, result):
            raise AssertionError("a call emitted items")  # pragma: no cover
        return result[0]


class Lease:
    """A session lease of a ``Client`` (``Client.lease``): ``id``, ``ttl_s``,
    ``keepalive()``, ``revoke()``, ``info()``; as a context manager, renewed by a
    background thread until the block ends, then revoked. ``lost`` is set when a
    renewal found the lease expired (its keys are gone)."""

    def __init__(self, client: Client, lease_id: str, ttl_s: int) -> None:
        self.id = lease_id
        self.ttl_s = ttl_s
        self.lost: RingKVError | None = None
        self._client = client
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # When the lease surely expires as far as this client has heard (monotonic;
        # granted just now): a background renewal must be over by then.
        self._expires_at_s = client._clock.monotonic_s() + ttl_s

    def keepalive(self) -> int:
        """Renew it; what it surely has left afterwards (ms). ``LeaseExpired`` when gone."""
        started_s = self._client._clock.monotonic_s()
        return self._renewed(started_s, self._client._call(
            self._client._ops.lease_keepalive(self.id)))

    def _renewed(self, started_s: float, answer: dict[str, Any]) -> int:
        """A renewal sent at ``started_s`` answered: the lease surely lives until then
        plus what the node says it has left."""
        remaining_ms = int(answer["remaining_ms"])
        self._expires_at_s = started_s + remaining_ms / 1000
        return remaining_ms

    def revoke(self) -> list[str]:
        """Revoke it now; the keys that went with it."""
        return list(self._client._call(self._client._ops.lease_revoke(self.id))["deleted"])

    def info(self) -> dict[str, Any]:
        return self._client._call(self._client._ops.lease_info(self.id))

    def __enter__(self) -> Lease:
        self._thread = threading.Thread(target=self._renew, name=f"ringkv-lease-{self.id}",
                                        daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self._client._ops.timeout_s * 2 + 1)
        if self.lost is None:
            try:
                self.revoke()
            except RingKVError as exc:
                if exc.code != "lease_expired":
                    raise

    def _renew(self) -> None:
        interval_s = max(0.1, self.ttl_s / 3)
        clock = self._client._clock
        while not self._stop.wait(interval_s):  # bounded: ends with the block
            started_s = clock.monotonic_s()
            try:
                # Bounded by the TTL, not the client's timeout_s: a silent node leaves
                # time to renew through another before the lease lapses.
                self._renewed(started_s, self._client._call(self._client._ops.lease_keepalive(
                    self.id, ttl_s=self.ttl_s, expires_at_s=self._expires_at_s)))
            except RingKVError as exc:
                if exc.code == "lease_expired":
                    self.lost = exc
                    return
                # A node down, no leader yet: the next renewal tries again, within the TTL.


class Transaction:
    """An interactive transaction of a ``Client`` (``Client.transaction``): use it in a
    ``with`` block, or call ``begin`` and end it with ``commit`` or ``abort``."""

    def __init__(self, client: Client, core: TxnCore) -> None:
        self._client = client
        self._core = core

    @property
    def id(self) -> str | None:
        """The transaction's id (None until it has begun)."""
        return None if self._core.handle is None else self._core.handle.id

    @property
    def priority(self) -> int | None:
        """Its wound-wait priority (µs): pass it to a rerun's ``transaction``."""
        return self._core.priority

    @property
    def handle(self) -> TxnHandle | None:
        """The id, node, priority and snapshot of the begun transaction."""
        return self._core.handle

    @property
    def outcome(self) -> TxnCommit | None:
        """The commit's answer, once committed."""
        return self._core.outcome

    def begin(self) -> TxnHandle:
        """Begin it now (the first call does otherwise)."""
        return self._client._call(self._core.begin())

    def get(self, key: Key) -> Any:
        """``key``'s value as the transaction sees it (its own writes first), or None."""
        got = self._client._call(self._core.get(key))
        return None if got is None else got.value

    def get_versioned(self, key: Key) -> Versioned | None:
        """``key`` with its version (None for the transaction's own write), or None."""
        return self._client._call(self._core.get(key))

    def put(self, key: Key, value: Any) -> None:
        """Lock ``key`` and write ``value`` (any JSON value) at commit."""
        self._client._call(self._core.write(key, value))

    def delete(self, key: Key) -> None:
        """Lock ``key`` and delete it at commit."""
        self._client._call(self._core.write(key))

    def commit(self) -> TxnCommit:
        """Commit (two-phase commit over the ranges it touched); ``Aborted`` if it cannot."""
        return self._client._call(self._core.commit())

    def abort(self) -> None:
        """Abort: nothing of it is applied, and its locks go."""
        self._client._call(self._core.abort())

    def __enter__(self) -> Transaction:
        self.begin()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        self._client._call(self._core.leave(failed=exc_type is not None))


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


class _Closable(Protocol):
    def close(self) -> None: ...


K = TypeVar("K")
C = TypeVar("C", bound=_Closable)


class _IdleConnections(Generic[K, C]):
    """Idle keep-alive connections per node, at most ``max_idle`` each; safe to share
    between threads. One idle past KEEPALIVE_S, or that the node has closed
    (``dropped``), is closed rather than handed out again."""

    def __init__(self, max_idle: int, clock: SystemClock, dropped: Callable[[C], bool]) -> None:
        self._max_idle = max_idle
        self._clock = clock
        self._dropped = dropped
        self._idle: dict[K, list[tuple[C, float]]] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        """How many nodes have an idle connection here."""
        with self._lock:
            return sum(1 for conns in self._idle.values() if conns)

    def take(self, key: K) -> C | None:
        now = self._clock.monotonic_s()
        while True:
            with self._lock:
                idle = self._idle.get(key)
                if not idle:
                    return None
                conn, since = idle.pop()
            if now - since < KEEPALIVE_S and not self._dropped(conn):
                return conn
            conn.close()

    def give(self, key: K, conn: C) -> None:
        with self._lock:
            idle = self._idle.setdefault(key, [])
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


class _ConnectionPool:
    """Keep-alive ``http.client`` connections per node; safe to share between threads."""

    def __init__(self, max_idle_per_node: int, clock: SystemClock,
                 tls_for: Callable[[str], ssl.SSLContext | None]) -> None:
        self._idle: _IdleConnections[tuple[str, str, int], http.client.HTTPConnection] = (
            _IdleConnections(max_idle_per_node, clock, _dropped))
        self._clock = clock
        self._tls_for = tls_for
        self._watchdog = _Watchdog(clock)

    @property
    def watchdog(self) -> _Watchdog:
        return self._watchdog

    def send(self, effect: Send) -> Reply | Failure:
        parts = urlsplit(effect.url)
        scheme, host = parts.scheme, parts.hostname or ""
        port = parts.port or (443 if scheme == "https" else 80)
        origin = (scheme, host, port)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        conn = self._idle.take(origin)
        if conn is None:
            if scheme == "https":
                conn = http.client.HTTPSConnection(host, port, timeout=effect.timeout_s,
                                                   context=self._tls_for(effect.url))
            else:
                conn = http.client.HTTPConnection(host, port, timeout=effect.timeout_s)
            try:
                conn.connect()
            except OSError as exc:
                conn.close()
                return Failure("connect", f"cannot connect: {exc}")
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
                return Failure("timeout", f"no answer within {effect.timeout_s:.3g} s")
            return Failure("io", f"connection lost: {exc!r}")
        finally:
            self._watchdog.disarm(watch)
        if response.will_close or self._clock.monotonic_s() >= deadline_s:
            conn.close()  # the watchdog may have shut it down just as the answer arrived
        else:
            self._idle.give(origin, conn)
        # The message's headers, case-insensitive: an email Message reads as a Mapping.
        return Reply(response.status, body, cast(Mapping[str, str], response.msg))

    def close(self) -> None:
        self._idle.close()


class _NativeConnection:
    """One blocking native-protocol connection: handshaken, one request at a time."""

    def __init__(self, sock: socket.socket, version: int) -> None:
        self.sock = sock
        self.version = version
        self.decoder = FrameDecoder(MAX_FRAME_BYTES)
        self.packer = frame_packer()
        self.next_id = 1

    def close(self) -> None:
        self.sock.close()

    def read_frame(self) -> Frame:
        while True:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("the node closed the connection")
            frames = self.decoder.feed(data)
            if frames:
                if len(frames) > 1:  # one request at a time: a second answer is a bug
                    raise ProtocolError("more answers than requests", field="frame")
                return frames[0]


class _NativePool:
    """Native-protocol connections per node, each used by one request at a time;
    safe to share between threads. (The asyncio client pipelines instead.)"""

    def __init__(self, max_idle_per_node: int, clock: SystemClock, watchdog: _Watchdog,
                 credentials: dict[str, str] | None = None) -> None:
        self._credentials = credentials or {}
        self._idle: _IdleConnections[tuple[str, int], _NativeConnection] = _IdleConnections(
            max_idle_per_node, clock, lambda conn: _readable(conn.sock))
        self._clock = clock
        self._watchdog = watchdog

    def send(self, address: tuple[str, int], request: NativeRequest,
             timeout_s: float, context: ssl.SSLContext | None = None) -> Reply | Failure | None:
        """The answer; or None when the node's protocol version lacks the operation
        (never sent: it goes over HTTP)."""
        conn = self._idle.take(address)
        deadline_s = self._clock.monotonic_s() + timeout_s
        if conn is None:
            try:
                conn = self._connect(address, timeout_s, deadline_s, context)
            except (OSError, ProtocolError) as exc:
                return Failure("connect", f"cannot connect (native): {exc}")
        if conn.version < STREAM_VERSION and native.needs_streams(request):
            self._idle.give(address, conn)
            return None
        conn.sock.settimeout(timeout_s)
        request_id = conn.next_id
        conn.next_id += 1
        watch = self._watchdog.arm(deadline_s, conn.sock)
        try:
            conn.sock.sendall(encode_frame(KIND_REQUEST, request_id, request.verb,
                                           dict(request.payload), version=conn.version,
                                           packer=conn.packer))
            frame = conn.read_frame()
            if frame.request_id != request_id and frame.kind == KIND_RESPONSE:
                raise ProtocolError(f"answer to request {frame.request_id}, not {request_id}",
                                    field="request_id")
            answer = native.reply(frame)
        except (OSError, ProtocolError) as exc:
            conn.close()
            if isinstance(exc, TimeoutError) or self._clock.monotonic_s() >= deadline_s:
                return Failure("timeout", f"no answer within {timeout_s:.3g} s")
            return Failure("io", f"connection lost (native): {exc!r}")
        finally:
            self._watchdog.disarm(watch)
        if self._clock.monotonic_s() >= deadline_s:
            conn.close()  # the watchdog may have shut it down just as the answer arrived
        else:
            self._idle.give(address, conn)
        return answer

    def _connect(self, address: tuple[str, int], timeout_s: float,
                 deadline_s: float, context: ssl.SSLContext | None) -> _NativeConnection:
        sock = socket.create_connection(address, timeout=timeout_s)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            watch = self._watchdog.arm(deadline_s, sock)
            try:
                if context is not None:  # TLS first, then the native handshake inside it
                    sock = context.wrap_socket(sock, server_hostname=address[0])
                sock.sendall(native.hello_frame(credentials=self._credentials))
                conn = _NativeConnection(sock, 0)
                conn.version = native.check_hello(conn.read_frame())
            finally:
                self._watchdog.disarm(watch)
        except BaseException:
            sock.close()
            raise
        return conn

    def close(self) -> None:
        self._idle.close()


class _FrameReader:
    """The frames of a native watch's connection, as they come (many per read)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.decoder = FrameDecoder(MAX_FRAME_BYTES)
        self.frames: deque[Frame] = deque()

    def next(self) -> Frame:
        """The next frame; each read waits at most the socket's timeout."""
        while not self.frames:  # bounded: every recv has the socket's timeout
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("the node closed the connection")
            self.frames.extend(self.decoder.feed(data))
        return self.frames.popleft()


class _NativeRefused(Exception):
    """A native watch's connection or handshake failed: nothing was sent."""


class _NoStreams(Exception):
    """The node chose native protocol version 1: no watch stream; the watch goes over HTTP."""


def _readable(sock: socket.socket) -> bool:
    """An idle connection that is readable was closed (or broken) by the node."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    if readable and isinstance(sock, ssl.SSLSocket):
        # TLS 1.3 sends session tickets after the handshake: readable, yet only
        # TLS records, no data. Read to find out; an idle connection has no data.
        timeout = sock.gettimeout()
        try:
            sock.setblocking(False)
            sock.recv(1)  # data, or b"" (closed): either way not a usable idle connection
            return True
        except ssl.SSLWantReadError:
            return False
        except OSError:
            return True
        finally:
            sock.settimeout(timeout)
    return bool(readable)


def _dropped(conn: http.client.HTTPConnection) -> bool:
    """An idle keep-alive connection that is readable has been closed by the node."""
    return conn.sock is None or _readable(conn.sock)
