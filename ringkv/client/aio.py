"""The asyncio client: ``AsyncClient``, over aiohttp.

A shell module: it performs the effects of the plans in ``operations.py`` on
the running event loop. aiohttp is imported on first use, so blocking users
(and locust's gevent) never load it.
"""

from __future__ import annotations

import asyncio
import datetime
import random
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

from ringkv.client import native, recipes_aio
from ringkv.client.recipes import DEFAULT_TIMEOUT_S, DEFAULT_TTL_S
from ringkv.client.recipes_aio import AsyncElection, AsyncGroup, AsyncLock, AsyncSession
from ringkv.client.base import KEEPALIVE_S, NATIVE_CONNECTIONS_PER_NODE, ClientBase
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
from ringkv.errors import NoNodeAvailable, ProtocolError, RingKVError
from ringkv.limits import MAX_FRAME_BYTES
from ringkv.net.codec import KIND_REQUEST, Frame, FrameDecoder, encode_frame, frame_packer
from ringkv.net.native import STREAM_VERSION
from ringkv.quorum import ConsistencyLevel

T = TypeVar("T")
# A native watch's connection reads ahead at most about this much (the stream reader's
# limit), then lets TCP push back on the node, which cuts a watcher that lags too long.
NATIVE_READ_LIMIT_BYTES = 256 * 1024


class AsyncClient(ClientBase):
    """An asyncio ringkv client (aiohttp underneath); use it from one event loop.

    Same constructor and methods as ``Client``, but each call is awaited and
    ``scan``/``scan_pages`` are async iterators. ``await client.close()``, or
    ``async with AsyncClient(...) as kv:``, which fetches the ring on entry
    (``await kv.nodes()`` and ``await kv.replicas(key)`` fetch it themselves
    when it never was, as ``Client``'s do).
    """

    _session: Any  # an aiohttp.ClientSession, made by the first call that needs one

    # ---- the calls (each runs the plan of the same name in ``operations.py``) ----

    async def get(
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
        return await self._call(self._ops.get(key, keyspace=keyspace, consistency=consistency))

    async def get_with_meta(
        self,
        key: Key,
        *,
        keyspace: str | None = None,
        consistency: str | ConsistencyLevel | None = None,
    ) -> Record | None:
        """Read ``key`` as a ``Record`` (value, timestamp, expiry, receipt), or None if absent."""
        return await self._call(self._ops.get_with_meta(
            key, keyspace=keyspace, consistency=consistency,
        ))

    async def exists(
        self,
        key: Key,
        *,
        keyspace: str | None = None,
        consistency: str | ConsistencyLevel | None = None,
    ) -> bool:
        """Whether ``key`` holds a live value (a read at ``consistency``, value and all)."""
        return await self._call(self._ops.exists(key, keyspace=keyspace, consistency=consistency))

    async def ttl_s(
        self,
        key: Key,
        *,
        keyspace: str | None = None,
        consistency: str | ConsistencyLevel | None = None,
    ) -> float | None:
        """The seconds ``key`` has left before it expires, as the answering node counts
        them (ms precision, rounded up); None if it has no TTL. Raises ``NotFound`` if
        the key is absent (or expired)."""
        return await self._call(self._ops.ttl_s(key, keyspace=keyspace, consistency=consistency))

    async def get_many(
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
        return await self._call(self._ops.get_many(
            keys, keyspace=keyspace, consistency=consistency, batch_size=batch_size,
        ))

    async def put(
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
        return await self._call(self._ops.put(
            key, value, ttl=ttl, keyspace=keyspace, consistency=consistency,
            idempotency_key=idempotency_key, if_version=if_version, if_absent=if_absent,
            if_equals=if_equals, txn_id=txn_id, lease=lease,
        ))

    async def delete(
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
        return await self._call(self._ops.delete(
            key, keyspace=keyspace, consistency=consistency, idempotency_key=idempotency_key,
            if_version=if_version, if_absent=if_absent, if_equals=if_equals, txn_id=txn_id,
        ))

    async def get_versioned(
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
        return await self._call(self._ops.get_versioned(
            key, keyspace=keyspace, snapshot_ts=snapshot_ts, max_staleness_ms=max_staleness_ms,
        ))

    async def txn(
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
        return await self._call(self._ops.txn(
            keyspace, reads=reads, conditions=conditions, writes=writes, txn_id=txn_id,
        ))

    async def txn_status(
        self, txn_id: str, *, keyspace: str | None = None, key: Key | None = None,
    ) -> TxnStatus:
        """What the leader of a transaction's range knows of ``txn_id``: ``TxnStatus``
        with ``status`` ``committed`` (and ``commit_ts``), ``pending`` or ``not_committed``.

        ``key``: a key the transaction touched (needed when the keyspace has
        more than one range).
        """
        return await self._call(self._ops.txn_status(txn_id, keyspace=keyspace, key=key))

    async def batch(
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
        return await self._call(self._ops.batch(
            ops, consistency=consistency, idempotency_key=idempotency_key,
        ))

    def scan(
        self,
        *,
        keyspace: str | None = None,
        consistency: str | ConsistencyLevel | None = None,
        page_size: int = 100,
        page_token: str | None = None,
    ) -> AsyncIterator[Record]:
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
    ) -> AsyncIterator[Page]:
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
    ) -> AsyncTransaction:
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
        return AsyncTransaction(self, TxnCore(self._ops, keyspace, read_only=read_only,
                                              priority=priority))

    async def run_transaction(
        self, fn: Callable[[AsyncTransaction], Awaitable[T]], *, keyspace: str | None = None,
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
                async with tx:
                    result = await fn(tx)
                return result
            except RingKVError as exc:
                pause_s = rerun_pause_s(self._ops, exc, attempt, max_retries)
                if pause_s is None:
                    raise
            priority = tx.priority
            attempt += 1
            await asyncio.sleep(pause_s)

    async def refresh_ring(self) -> None:
        """Fetch the ring now (it is also fetched every ``refresh_interval_s``, and on failures)."""
        await self._call(self._ops.refresh_ring())

    async def ensure_ring(self) -> None:
        """Fetch the ring unless it has been; ``NoNodeAvailable`` if no node answers."""
        await self._call(self._ops.ensure_ring())

    async def nodes(self) -> list[NodeView]:
        """The nodes of the ring, with their URL and liveness, as the client last
        fetched it; the ring is fetched first if it never has been (``NoNodeAvailable``
        if no node answers), so the answer is never an empty list."""
        await self.ensure_ring()
        return self._ring_nodes()

    async def replicas(self, key: Key, *, keyspace: str | None = None) -> list[str]:
        """The node ids that replicate ``key`` (empty for a keyspace the ring does not
        show); the ring is fetched first if it never has been, as for ``nodes``."""
        await self.ensure_ring()
        return self._ring_replicas(key, keyspace)

    async def close(self) -> None:
        """Close the pooled connections (the client may still be used; it reconnects) and
        the recipes' own sessions (their leases are revoked; a later lock takes a new one)."""
        await recipes_aio.close_default_sessions(self)
        session, self._session = self._session, None
        self._native.close()
        if session is not None:
            await session.close()

    async def __aenter__(self) -> AsyncClient:
        # The ring now, so that the first calls route well from the start (a cluster
        # that does not answer yet is no error here: each call retries it).
        try:
            await self.ensure_ring()
        except NoNodeAvailable:
            pass
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # ---- session leases (keys that go when their owner stops renewing) -----------

    async def lease(self, ttl_s: int, *, keyspace: str | None = None) -> AsyncLease:
        """Grant a session lease of ``ttl_s`` seconds on a transactional keyspace.

        Put keys with ``put(..., lease=lease)``; they are deleted together (one
        transaction) once the lease expires or is revoked. Used as a context
        manager (``async with`` on the asyncio client), it is renewed every third
        of its TTL in the background (a thread; on the asyncio client, a task)
        and revoked on exit.
        """
        answer = await self._call(self._ops.lease_grant(ttl_s, keyspace=keyspace))
        return AsyncLease(self, str(answer["id"]), int(answer["ttl"]))

    # ---- coordination recipes (leases + watches; client/recipes*.py) -------------

    def session(self, ttl_s: int = DEFAULT_TTL_S, *,
                keyspace: str = "txn") -> AsyncSession:
        """A session: one lease of ``ttl_s`` renewed in the background, shared by the
        recipes made from it (``session.lock(name)``, ``session.election(name)``,
        ``session.group(name)``), as in etcd's concurrency package. A lock on a
        session costs one transaction to acquire and one delete to release. When the
        lease is lost, every recipe on it is (``LockLost``). ``with`` (``async with``
        on the asyncio client) closes it: the lease is revoked and its keys go.
        ``lock(name)`` without a session uses the client's own session of ``ttl_s``,
        granted on first use (again once lost)."""
        return recipes_aio.AsyncSession(self, keyspace=keyspace, ttl_s=ttl_s)

    def lock(self, name: str, *, keyspace: str = "txn", ttl_s: int = DEFAULT_TTL_S,
             timeout_s: float = DEFAULT_TIMEOUT_S) -> AsyncLock:
        """A mutex with fencing tokens on a transactional keyspace (not acquired yet).

        ``with kv.lock("jobs") as held:`` (``async with`` on the asyncio client)
        waits at most ``timeout_s`` for it (``LockTimeout``), then
        ``held.fencing_token`` grows with every later holder and
        ``held.fenced_put(key, value)`` writes only while the lock is held. The
        holder keeps a session lease of ``ttl_s`` alive: if it stops (killed,
        paused past the TTL), the lock passes on and ``held.lost`` /
        ``held.check()`` (``LockLost``) say so.
        """
        return recipes_aio.AsyncLock(self, name, keyspace=keyspace, ttl_s=ttl_s, timeout_s=timeout_s)

    def election(self, name: str, *, keyspace: str = "txn",
                 ttl_s: int = DEFAULT_TTL_S) -> AsyncElection:
        """Leader election: ``campaign(value, timeout_s)``, ``leader()``, ``observe()``,
        ``resign()``; a leader that stops renewing its lease (``ttl_s``) is replaced."""
        return recipes_aio.AsyncElection(self, name, keyspace=keyspace, ttl_s=ttl_s)

    def group(self, name: str, *, keyspace: str = "txn",
              ttl_s: int = DEFAULT_TTL_S) -> AsyncGroup:
        """Group membership: ``join(member, value)`` (ephemeral, on a lease of ``ttl_s``),
        ``leave(member)``, ``members()``, ``watch_members()``, ``close()``."""
        return recipes_aio.AsyncGroup(self, name, keyspace=keyspace, ttl_s=ttl_s)

    def watch_config(self, key: str, *, keyspace: str = "txn",
                     timeout_s: float | None = None) -> AsyncIterator[Any]:
        """A configuration key's value now (None: absent), then every new value in commit
        order with no gap; ends after ``timeout_s`` (None: while the caller iterates)."""
        return recipes_aio.watch_config(self, key, keyspace=keyspace, timeout_s=timeout_s)

    # ---- watches (a transactional keyspace's commits, streamed) ------------------

    async def watch(
        self,
        keyspace: str,
        key: str = "",
        *,
        prefix: bool = False,
        from_version: int | None = None,
        max_reconnects: int = MAX_RECONNECTS,
    ) -> AsyncIterator[WatchEvent]:
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
                         rng=self._watch_rng(), max_reconnects=max_reconnects,
                         backoff_base_s=self._ops.backoff_base_s,
                         backoff_max_s=self._ops.backoff_max_s)
        while True:  # bounded by core.reconnect_pause_s
            url = core.next_url(self._ops.router.candidates(core.routing(),
                                                             self._clock.monotonic_s()))
            reason = "the stream ended"
            try:
                async for event in self._watch_once(core, url):
                    yield event
            except StreamEnded as ended:
                reason = f"the node ended the stream ({ended})"
            except WatchConnectError as exc:
                self._ops.router.mark_down(url, self._clock.monotonic_s())
                reason = str(exc)
            except (OSError, asyncio.TimeoutError, WatchIOError) as exc:
                reason = f"connection lost: {exc!r}"
            await asyncio.sleep(core.reconnect_pause_s(url, reason))

    def _watch_rng(self) -> random.Random:
        """The randomness of a watch's reconnect pauses (the simulator's client seeds it)."""
        return random.Random()

    async def _watch_once(self, core: WatchCore, url: str) -> AsyncIterator[WatchEvent]:
        """One connection of a watch (its own, outside the pool): its events until the
        stream ends. Over the native protocol when requests to that node go native
        (HTTP when its native port refuses us, or it speaks only version 1)."""
        address = self._native_address(url)
        if address is not None:
            try:
                async for event in self._watch_native(core, address, self._tls_for(url)):
                    yield event
                return
            except WatchConnectError:
                self._native_unreachable(address)  # never sent: try the HTTP port
            except _NoStreams:
                pass
        async for event in self._watch_http(core, url):
            yield event

    async def _watch_native(self, core: WatchCore, address: tuple[str, int],
                            context: ssl.SSLContext | None) -> AsyncIterator[WatchEvent]:
        """One native connection of a watch: a ``watch`` request, then its frames."""
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(
                address[0], address[1], ssl=context,
                server_hostname=address[0] if context else None,
                limit=NATIVE_READ_LIMIT_BYTES), SILENT_STREAM_S)
        except (OSError, asyncio.TimeoutError) as exc:
            raise WatchConnectError(f"cannot connect (native): {exc!r}") from None
        try:
            try:
                writer.write(native.hello_frame(credentials=self.credentials))
                version = native.check_hello(await _read_frame(reader))
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError,
                    ProtocolError) as exc:
                raise WatchConnectError(f"native handshake failed: {exc!r}") from None
            if version < STREAM_VERSION:
                raise _NoStreams
            writer.write(native.watch_frame(1, core.native_payload(), version))
            while True:  # bounded: each frame waits at most SILENT_STREAM_S
                part = native.stream_part(await _read_frame(reader))
                if part.refusal is not None:
                    core.refused(part.refusal.status, part.refusal.body)
                    return
                if part.event is not None:
                    event = core.line(part.event)
                    if event is not None:
                        yield event
                if not part.more:
                    return
        except asyncio.IncompleteReadError as exc:
            raise WatchIOError(f"the node closed the connection: {exc!r}") from None
        finally:
            writer.close()

    async def _watch_http(self, core: WatchCore, url: str) -> AsyncIterator[WatchEvent]:
        """One HTTP connection of a watch: its NDJSON lines until the stream ends."""
        import aiohttp
        from yarl import URL

        timeout = aiohttp.ClientTimeout(total=None, sock_connect=SILENT_STREAM_S,
                                        sock_read=SILENT_STREAM_S)
        connector = aiohttp.TCPConnector(
            limit=1, ssl=self.ssl_context if self.ssl_context is not None else True)
        try:
            async with aiohttp.ClientSession(connector=connector, timeout=timeout,
                                             read_bufsize=MAX_WATCH_LINE_BYTES // 2) as session:
                async with session.get(URL(url + core.path(), encoded=True),
                                       headers={**self._ops.headers, **WATCH_HEADERS}) as response:
                    if response.status != 200:
                        core.refused(response.status, await response.read())
                        return
                    while True:  # bounded: each line waits at most SILENT_STREAM_S
                        raw = await response.content.readline()
                        if not raw:
                            return
                        event = core.line(raw)
                        if event is not None:
                            yield event
        except aiohttp.ClientConnectorError as exc:
            raise WatchConnectError(f"cannot connect: {exc}") from None
        except aiohttp.ClientError as exc:
            raise WatchIOError(repr(exc)) from None
        except ValueError as exc:  # aiohttp: a line over its buffer
            raise ProtocolError(f"watch event over {MAX_WATCH_LINE_BYTES} bytes: {exc}") from None

    # ---- performing the plans' effects ------------------------------------------

    def _setup(self) -> None:
        self._session = None
        # The recipes' own sessions (``lock(name)``), by (keyspace, ttl_s); see session().
        self._recipe_sessions: dict[tuple[str, int], recipes_aio.AsyncSession] = {}
        self._native = _NativePool(min(self._pool_size, NATIVE_CONNECTIONS_PER_NODE),
                                   self.credentials)

    async def _perform(self, effect: Effect) -> Outcome:
        if isinstance(effect, Send):
            route = self._native_route(effect)
            if route is not None:
                outcome = await self._native.send(route[0], route[1], effect.timeout_s, route[2])
                if outcome is not None and not (isinstance(outcome, Failure)
                                                and outcome.kind == "connect"):
                    return outcome
                if outcome is not None:
                    self._native_unreachable(route[0])  # never sent: try the HTTP port
            return await self._send(effect)
        if isinstance(effect, Sleep):
            await asyncio.sleep(effect.seconds)
        return None

    async def _stream(
        self, plan: Plan[Any], result: list[Any] | None = None
    ) -> AsyncIterator[Any]:
        with Stepper(plan, [] if result is None else result) as steps:
            for effect in steps:
                if isinstance(effect, Emit):
                    yield effect.item
                steps.outcome = await self._perform(effect)

    async def _call(self, plan: Plan[T]) -> T:
        result: list[T] = []
        async for _ in self._stream(plan, result):
            raise AssertionError("a call emitted items")  # pragma: no cover
        return result[0]

    async def _send(self, effect: Send) -> Reply | Failure:
        import aiohttp  # only asyncio users pay for it (and locust's gevent never sees it)
        from yarl import URL

        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=0, limit_per_host=self._pool_size, keepalive_timeout=KEEPALIVE_S,
                # https:// nodes: our CA bundle and certificate (True: the defaults)
                ssl=self.ssl_context if self.ssl_context is not None else True,
            )
            self._session = aiohttp.ClientSession(connector=connector)
        timeout = aiohttp.ClientTimeout(total=effect.timeout_s, sock_connect=effect.timeout_s)
        try:
            async with self._session.request(
                effect.method, URL(effect.url, encoded=True), data=effect.body,
                headers=effect.headers, timeout=timeout,
            ) as response:
                body = await response.read()
                return Reply(response.status, body, response.headers)
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            return Failure("connect", f"cannot connect: {exc}")
        except (asyncio.TimeoutError, aiohttp.ServerTimeoutError):
            return Failure("timeout", f"no answer within {effect.timeout_s:.3g} s")
        except aiohttp.ClientError as exc:
            return Failure("io", f"connection lost: {exc!r}")


async def _read_frame(reader: asyncio.StreamReader) -> Frame:
    """One frame of a native watch's connection, within SILENT_STREAM_S."""
    head = await asyncio.wait_for(reader.readexactly(4), SILENT_STREAM_S)
    size = int.from_bytes(head, "big")
    if size > MAX_FRAME_BYTES:
        raise ProtocolError(f"a frame of {size} bytes, over {MAX_FRAME_BYTES}", field="frame")
    body = await asyncio.wait_for(reader.readexactly(size), SILENT_STREAM_S)
    return FrameDecoder(MAX_FRAME_BYTES).feed(head + body)[0]


class _NoStreams(Exception):
    """The node chose native protocol version 1: no watch stream; the watch goes over HTTP."""


class WatchConnectError(Exception):
    """A watch's connection was refused."""


class WatchIOError(Exception):
    """A watch's connection failed once open."""


class AsyncLease:
    """A session lease of an ``AsyncClient`` (``AsyncClient.lease``), as ``Lease`` is of a
    ``Client``; the renewals run in a task."""

    def __init__(self, client: AsyncClient, lease_id: str, ttl_s: int) -> None:
        self.id = lease_id
        self.ttl_s = ttl_s
        self.lost: RingKVError | None = None
        self._client = client
        self._task: asyncio.Task[None] | None = None
        # When the lease surely expires as far as this client has heard (monotonic;
        # granted just now): a background renewal must be over by then.
        self._expires_at_s = client._clock.monotonic_s() + ttl_s

    async def keepalive(self) -> int:
        started_s = self._client._clock.monotonic_s()
        return self._renewed(started_s, await self._client._call(
            self._client._ops.lease_keepalive(self.id)))

    def _renewed(self, started_s: float, answer: dict[str, Any]) -> int:
        """A renewal sent at ``started_s`` answered: the lease surely lives until then
        plus what the node says it has left."""
        remaining_ms = int(answer["remaining_ms"])
        self._expires_at_s = started_s + remaining_ms / 1000
        return remaining_ms

    async def revoke(self) -> list[str]:
        return list((await self._client._call(self._client._ops.lease_revoke(self.id)))["deleted"])

    async def info(self) -> dict[str, Any]:
        return await self._client._call(self._client._ops.lease_info(self.id))

    async def __aenter__(self) -> AsyncLease:
        self._task = asyncio.get_running_loop().create_task(self._renew())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.lost is None:
            try:
                await self.revoke()
            except RingKVError as exc:
                if exc.code != "lease_expired":
                    raise

    async def _renew(self) -> None:
        interval_s = max(0.1, self.ttl_s / 3)
        clock = self._client._clock
        while True:  # bounded: cancelled when the block ends
            await clock.sleep(interval_s)
            started_s = clock.monotonic_s()
            try:
                # Bounded by the TTL, not the client's timeout_s: a silent node leaves
                # time to renew through another before the lease lapses.
                self._renewed(started_s, await self._client._call(
                    self._client._ops.lease_keepalive(
                        self.id, ttl_s=self.ttl_s, expires_at_s=self._expires_at_s)))
            except RingKVError as exc:
                if exc.code == "lease_expired":
                    self.lost = exc
                    return


class AsyncTransaction:
    """An interactive transaction of an ``AsyncClient`` (``AsyncClient.transaction``): use
    it in an ``async with`` block, or await ``begin`` and end it with ``commit`` or
    ``abort``. The same calls as the blocking client's ``Transaction``, awaited."""

    def __init__(self, client: AsyncClient, core: TxnCore) -> None:
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

    async def begin(self) -> TxnHandle:
        """Begin it now (the first call does otherwise)."""
        return await self._client._call(self._core.begin())

    async def get(self, key: Key) -> Any:
        """``key``'s value as the transaction sees it (its own writes first), or None."""
        got = await self._client._call(self._core.get(key))
        return None if got is None else got.value

    async def get_versioned(self, key: Key) -> Versioned | None:
        """``key`` with its version (None for the transaction's own write), or None."""
        return await self._client._call(self._core.get(key))

    async def put(self, key: Key, value: Any) -> None:
        """Lock ``key`` and write ``value`` (any JSON value) at commit."""
        await self._client._call(self._core.write(key, value))

    async def delete(self, key: Key) -> None:
        """Lock ``key`` and delete it at commit."""
        await self._client._call(self._core.write(key))

    async def commit(self) -> TxnCommit:
        """Commit (two-phase commit over the ranges it touched); ``Aborted`` if it cannot."""
        return await self._client._call(self._core.commit())

    async def abort(self) -> None:
        """Abort: nothing of it is applied, and its locks go."""
        await self._client._call(self._core.abort())

    async def __aenter__(self) -> AsyncTransaction:
        await self.begin()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        await self._client._call(self._core.leave(failed=exc_type is not None))


class _NativeConnection(asyncio.Protocol):
    """One pipelined native-protocol connection: many requests in flight, answers
    matched to them by request id, in whatever order they come."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.decoder = FrameDecoder(MAX_FRAME_BYTES)
        self.packer = frame_packer()
        self.version = 0
        self.next_id = 1
        self.pending: dict[int, asyncio.Future[Frame]] = {}
        self.hello: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        self.lost: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            frames = self.decoder.feed(data)
        except ProtocolError as exc:
            self._fail(exc)
            return
        for frame in frames:
            if not self.hello.done():
                self.hello.set_result(frame)
                continue
            future = self.pending.pop(frame.request_id, None)
            if future is not None and not future.done():
                future.set_result(frame)
            elif frame.request_id == 0:  # an error frame for the connection: it closes
                self._fail(ConnectionError(f"the node closed the connection: {frame.payload}"))

    def connection_lost(self, exc: BaseException | None) -> None:
        self._fail(exc or ConnectionError("the node closed the connection"))

    def _fail(self, exc: BaseException) -> None:
        self.lost = exc
        if self.transport is not None:
            self.transport.close()
        if not self.hello.done():
            self.hello.set_exception(exc)
        pending, self.pending = self.pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(exc)

    def request(self, request: NativeRequest) -> tuple[int, asyncio.Future[Frame]]:
        assert self.transport is not None
        request_id = self.next_id
        self.next_id += 1
        future: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        self.pending[request_id] = future
        self.transport.write(encode_frame(KIND_REQUEST, request_id, request.verb,
                                          dict(request.payload), version=self.version,
                                          packer=self.packer))
        return request_id, future

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class _NativePool:
    """A few pipelined native connections per node, opened on first use."""

    def __init__(self, per_node: int, credentials: dict[str, str] | None = None) -> None:
        self._credentials = credentials or {}
        self._per_node = max(1, per_node)
        self._conns: dict[tuple[str, int], list[_NativeConnection]] = {}
        self._connecting: dict[tuple[str, int], asyncio.Future[_NativeConnection]] = {}
        self._turn = 0

    async def _connection(self, address: tuple[str, int], timeout_s: float,
                          context: ssl.SSLContext | None) -> _NativeConnection:
        conns = self._conns.setdefault(address, [])
        conns[:] = [c for c in conns if c.lost is None]
        connecting = self._connecting.get(address)
        if len(conns) >= self._per_node or (conns and connecting is not None):
            self._turn += 1
            return conns[self._turn % len(conns)]
        if connecting is not None:  # the first connection is on its way: share it
            return await asyncio.shield(connecting)
        connecting = asyncio.ensure_future(self._connect(address, timeout_s, context))
        self._connecting[address] = connecting
        try:
            conn = await asyncio.shield(connecting)
        finally:
            self._connecting.pop(address, None)
        self._conns.setdefault(address, []).append(conn)
        return conn

    async def _connect(self, address: tuple[str, int], timeout_s: float,
                       context: ssl.SSLContext | None) -> _NativeConnection:
        loop = asyncio.get_running_loop()
        # With a context, TLS first (a node serving HTTPS serves it here too), then
        # the native handshake inside it.
        _, conn = await asyncio.wait_for(
            loop.create_connection(_NativeConnection, address[0], address[1], ssl=context,
                                   server_hostname=address[0] if context else None),
            timeout_s)
        try:
            assert conn.transport is not None
            conn.transport.write(native.hello_frame(credentials=self._credentials))
            conn.version = native.check_hello(await asyncio.wait_for(conn.hello, timeout_s))
        except BaseException:
            conn.close()
            raise
        return conn

    async def send(self, address: tuple[str, int], request: NativeRequest,
                   timeout_s: float, context: ssl.SSLContext | None = None
                   ) -> Reply | Failure | None:
        """The answer; or None when the node's protocol version lacks the operation
        (never sent: it goes over HTTP)."""
        try:
            conn = await self._connection(address, timeout_s, context)
        except (OSError, asyncio.TimeoutError, ProtocolError, ConnectionError) as exc:
            return Failure("connect", f"cannot connect (native): {exc!r}")
        if conn.lost is not None:
            return Failure("connect", f"cannot connect (native): {conn.lost!r}")
        if conn.version < STREAM_VERSION and native.needs_streams(request):
            return None
        request_id, future = conn.request(request)
        try:
            frame = await asyncio.wait_for(future, timeout_s)
            return native.reply(frame)
        except asyncio.TimeoutError:
            conn.pending.pop(request_id, None)
            return Failure("timeout", f"no answer within {timeout_s:.3g} s")
        except (OSError, ConnectionError, ProtocolError) as exc:
            return Failure("io", f"connection lost (native): {exc!r}")

    def close(self) -> None:
        conns, self._conns = self._conns, {}
        for node_conns in conns.values():
            for conn in node_conns:
                conn.close()
