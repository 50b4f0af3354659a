"""Everything the clients do, written once as plans (see ``plan.py``): the sans-I/O core.

Each public method of ``Operations`` is the plan behind the client method of
the same name: it validates and encodes the call, asks ``routing.Router``
which nodes to try, yields the requests (with retries where they are safe
and backoff in between, all inside one deadline), and decodes the answer
into the types of ``types.py`` or a typed ``ringkv.errors`` error.

Pure: no sockets, no event loop, no threads. Time is read through the
``clock`` passed in, randomness comes from the ``random.Random`` passed in,
and the shell supplies idempotency keys and the lock that keeps ring
refreshes one at a time.
"""

from __future__ import annotations

import datetime
import json
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import quote

from ringkv.client.errors import InvalidArgument, InvalidArgumentType
from ringkv.client.plan import Emit, Failure, Outcome, Plan, Reply, Send, Sleep
from ringkv.client.routing import (
    Router,
    attempt_timeout_s,
    backoff_s,
    call_deadline_s,
    key_bytes,
    key_text,
    normalise_url,
    parse_ring,
    renewal_bounds_s,
)
from ringkv.client.types import (
    BatchResult,
    Key,
    Page,
    Record,
    TxnCommit,
    TxnHandle,
    TxnResult,
    TxnStatus,
    Versioned,
    WriteResult,
)
from ringkv.errors import (
    Aborted,
    ConditionFailed,
    NoNodeAvailable,
    NotFound,
    Overloaded,
    RingKVError,
    ShuttingDown,
    TooLarge,
    Unavailable,
)
from ringkv.hlc import Timestamp
from ringkv.quorum import ConsistencyLevel

IDEMPOTENCY_HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
JSON_HEADERS = {"Content-Type": "application/json", "Accept": "application/json"}
# Nodes asked for the ring in one refresh before giving up until the next.
MAX_REFRESH_TRIES = 4
# A transaction aborted by a conflict (409 aborted) is sent again, under the
# same id, at most this many times (each a whole call with its own deadline).
TXN_RETRIES = 8
# How often a transaction id reported pending is asked about again.
STATUS_POLLS = 5
# Keys per POST /v1/batch of get_many (a node's limits.max_batch_ops may be lower:
# its 413 names its limit, and the client then sends batches of that size).
GET_MANY_BATCH = 100


class _Unset:
    """No ``if_equals`` condition (None is a JSON value one may compare with)."""

    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()


class MonotonicClock(Protocol):
    def monotonic_s(self) -> float: ...


class TryLock(Protocol):
    """Only ever try-acquired (``threading.Lock`` is one)."""

    def acquire(self, blocking: bool = ...) -> bool: ...

    def release(self) -> None: ...


@dataclass(frozen=True)
class Call:
    """One request as the client means it, before a node is chosen."""

    method: str
    path: str
    body: bytes | None
    routing: tuple[tuple[str, bytes], ...]  # (keyspace, key) pairs, for replica choice
    read: bool
    idempotency_key: str | None = None
    # A transaction's id: the range's leader runs an id at most once, so a
    # call carrying one is safe to send again, through any node.
    txn_id: str | None = None
    prefer: str | None = None  # a node id to try first (the range's last known leader)
    # A node URL the call must go to and nowhere else: an interactive
    # transaction's calls go to the node that began it.
    pin: str | None = None
    # A call with a time bound of its own (a lease renewal, within the lease's TTL):
    # each attempt's timeout when shorter than the client's ``timeout_s``, and a
    # deadline (monotonic) when sooner than the call's own.
    timeout_s: float | None = None
    deadline_s: float | None = None

    @property
    def repeatable(self) -> bool:
        """Safe to send again even if an earlier attempt ran."""
        return self.read or self.idempotency_key is not None or self.txn_id is not None


class Operations:
    """The plans of every client call, over one client's configuration and ring."""

    def __init__(
        self,
        seeds: Sequence[str] | str,
        *,
        clock: MonotonicClock,
        rng: random.Random,
        refresh_lock: TryLock,
        new_idempotency_key: Callable[[], str],
        keyspace: str = "default",
        consistency: str | ConsistencyLevel | None = None,
        timeout_s: float = 5.0,
        max_retries: int = 3,
        refresh_interval_s: float = 30.0,
        idempotent_writes: bool = True,
        backoff_base_s: float = 0.05,
        backoff_max_s: float = 1.0,
        txn_retries: int = TXN_RETRIES,
        leader_hints: bool = True,
    ) -> None:
        """The options are the client's (see ``ClientBase``); the rest is what the shell provides.

        ``clock`` is read for deadlines and down-marking; ``rng`` spreads the
        load and jitters backoff; ``refresh_lock`` keeps ring refreshes one at
        a time across the threads sharing a blocking client;
        ``new_idempotency_key`` returns a key no other write ever had.
        """
        if isinstance(seeds, str):
            seeds = [seeds]
        if not seeds:
            raise ValueError("a client needs at least one seed URL")
        if timeout_s <= 0 or max_retries < 0 or refresh_interval_s <= 0 or txn_retries < 0:
            raise ValueError("timeout_s and refresh_interval_s must be > 0, max_retries and "
                             "txn_retries >= 0")
        self.txn_retries = txn_retries
        self.leader_hints = leader_hints
        self.keyspace = keyspace
        self.consistency = self._level(consistency, write=True, default=None)
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.idempotent_writes = idempotent_writes
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.router = Router(
            [normalise_url(seed) for seed in seeds], refresh_interval_s=refresh_interval_s, rng=rng
        )
        self._clock = clock
        self._rng = rng
        self._refreshing = refresh_lock
        self._new_idempotency_key = new_idempotency_key
        # Every HTTP request's headers (``Authorization`` when the client has credentials).
        self.headers = dict(JSON_HEADERS)

    # ---- the plans of the public calls ------------------------------------------

    def get(
        self,
        key: Key,
        *,
        keyspace: str | None = None,
        consistency: str | ConsistencyLevel | None = None,
    ) -> Plan[Any]:
        """Plan: ``key``'s value, or None if the key is absent."""
        record = yield from self.get_with_meta(key, keyspace=keyspace, consistency=consistency)
        return None if record is None else record.value

    def get_with_meta(
        self,
        key: Key,
        *,
        keyspace: str | None = None,
        consistency: str | ConsistencyLevel | None = None,
    ) -> Plan[Record | None]:
        """Plan: ``key`` as a ``Record``, or None if absent."""
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
            # A transactional keyspace answers a version: its commit timestamp in µs.
            timestamp=(_timestamp(body["timestamp"]) if "timestamp" in body
                       else Timestamp(int(body["version"]), 0)),
            expires_at_us=body.get("expires_at_us"),
            receipt=body.get("receipt"),
            ttl_remaining_ms=body.get("ttl_remaining_ms"),
        )

    def exists(
        self,
        key: Key,
        *,
        keyspace: str | None = None,
        consistency: str | ConsistencyLevel | None = None,
    ) -> Plan[bool]:
        """Plan: whether ``key`` holds a live value."""
        record = yield from self.get_with_meta(key, keyspace=keyspace, consistency=consistency)
        return record is not None

    def ttl_s(
        self,
        key: Key,
        *,
        keyspace: str | None = None,
        consistency: str | ConsistencyLevel | None = None,
    ) -> Plan[float | None]:
        """Plan: the seconds ``key`` has left (the node's count), None if it has no TTL;
        ``NotFound`` if it is absent."""
        record = yield from self.get_with_meta(key, keyspace=keyspace, consistency=consistency)
        if record is None:
            where = keyspace or self.keyspace
            raise NotFound(f"key {key_text(key)!r} not found in {where!r}",
                           key=key_text(key), keyspace=where)
        return None if record.ttl_remaining_ms is None else record.ttl_remaining_ms / 1000

    def get_many(
        self,
        keys: Iterable[Key],
        *,
        keyspace: str | None = None,
        consistency: str | ConsistencyLevel | None = None,
        batch_size: int = GET_MANY_BATCH,
    ) -> Plan[dict[str, Any]]:
        """Plan: ``{key: value}`` for each of ``keys`` that exists (absent keys are left
        out), read through ``POST /v1/batch`` in batches of at most ``batch_size`` keys
        (fewer if a node's limit is lower). An operation that failed raises its error."""
        if isinstance(keys, (str, bytes)):
            raise InvalidArgumentType("keys must be an iterable of keys, not one key",
                                      field="keys")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InvalidArgument("batch_size must be a whole number >= 1", field="batch_size")
        wanted = list(dict.fromkeys(key_text(key, f"keys[{i}]") for i, key in enumerate(keys)))
        found: dict[str, Any] = {}
        start = 0
        while start < len(wanted):
            chunk = wanted[start:start + batch_size]
            ops = [{"op": "get", "key": key} for key in chunk]
            if keyspace is not None:
                for op in ops:
                    op["keyspace"] = keyspace
            try:
                results = yield from self.batch(ops, consistency=consistency)
            except TooLarge as exc:
                limit = exc.details.get("limit")
                if exc.details.get("field") != "ops" or not isinstance(limit, int) \
                        or not 1 <= limit < len(chunk):
                    raise
                batch_size = limit  # the node's limits.max_batch_ops: smaller batches
                continue
            for result in results:
                if not result.ok:
                    assert result.error is not None
                    raise result.error
                if result.found:
                    found[result.key] = result.value
            start += len(chunk)
        return {key: found[key] for key in wanted if key in found}

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
    ) -> Plan[WriteResult]:
        """Plan: write ``value`` under ``key``, with an idempotency key unless writes have none;
        ``lease`` (a lease id, or what ``lease()`` returned): attach the key to it."""
        body: dict[str, Any] = {"value": _encode_value(value, "value")}
        seconds = ttl_seconds(ttl)
        if seconds is not None:
            body["ttl"] = seconds
        condition = _condition(if_version, if_absent, if_equals)
        if lease is not None:
            return (yield from self._leased_put(keyspace, key, body, condition, lease_id(lease)))
        return (yield from self._write("PUT", keyspace, key, consistency, body, idempotency_key,
                                       condition, txn_id))

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
    ) -> Plan[WriteResult]:
        """Plan: write a tombstone for ``key``."""
        condition = _condition(if_version, if_absent, if_equals)
        return (yield from self._write("DELETE", keyspace, key, consistency, None, idempotency_key,
                                       condition, txn_id))

    def batch(
        self,
        ops: Sequence[Mapping[str, Any]],
        *,
        consistency: str | ConsistencyLevel | None = None,
        idempotency_key: str | None = None,
    ) -> Plan[list[BatchResult]]:
        """Plan: one ``POST /v1/batch``, routed to the node that replicates most of its keys."""
        if not ops:
            raise InvalidArgument("a batch needs at least one operation", field="ops")
        wire: list[dict[str, Any]] = []
        routing: list[tuple[str, bytes]] = []
        has_writes = False
        for i, op in enumerate(ops):
            if not isinstance(op, Mapping):
                raise InvalidArgumentType("each operation must be a mapping", field=f"ops[{i}]")
            item = dict(op)
            item.setdefault("keyspace", self.keyspace)
            item["key"] = key_text(item.get("key"), f"ops[{i}].key")
            routing.append((str(item["keyspace"]), item["key"].encode("utf-8")))
            if item.get("ttl") is not None:
                item["ttl"] = ttl_seconds(item["ttl"], f"ops[{i}].ttl")
            if "value" in item:
                _encode_value(item["value"], f"ops[{i}].value")
            if "consistency" in item and item["consistency"] is not None:
                level = self._level(item["consistency"], write=item.get("op") != "get",
                                    default=None, field=f"ops[{i}].consistency")
                item["consistency"] = level
            has_writes = has_writes or item.get("op") != "get"
            wire.append(item)
        level = self._level(consistency, write=has_writes, default=self.consistency)
        call = Call(
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
    ) -> Plan[None]:
        """Plan: emit each ``Page`` of a keyspace in token order, following ``next_page_token``."""
        keyspace = keyspace or self.keyspace
        level = self._level(consistency, write=False, default=self.consistency)
        while True:
            query = [f"limit={int(page_size)}"]
            if page_token is not None:
                query.append(f"page_token={quote(page_token, safe='')}")
            if level:
                query.append(f"consistency={level}")
            path = f"/v1/kv/{quote(keyspace, safe='')}?{'&'.join(query)}"
            reply = yield from self._execute(Call("GET", path, None, (), read=True))
            if reply.status == 404:
                raise RingKVError.from_json(_json(reply), http_status=404)
            body = _json(reply)
            items = [
                Record(key=i["key"], value=i["value"], timestamp=_timestamp(i["timestamp"]))
                for i in body["items"]
            ]
            page_token = body.get("next_page_token")
            yield Emit(Page(items, page_token, body.get("receipt")))
            if page_token is None:
                return

    def scan(
        self,
        *,
        keyspace: str | None = None,
        consistency: str | ConsistencyLevel | None = None,
        page_size: int = 100,
        page_token: str | None = None,
    ) -> Plan[None]:
        """Plan: emit each ``Record`` of ``scan_pages``' pages, one at a time."""
        pages = self.scan_pages(keyspace=keyspace, consistency=consistency,
                                page_size=page_size, page_token=page_token)
        outcome: Outcome = None
        try:
            while True:
                try:
                    effect = pages.send(outcome)
                except StopIteration:
                    return
                if isinstance(effect, Emit):
                    for record in effect.item.items:
                        yield Emit(record)
                    outcome = None
                else:
                    outcome = yield effect
        finally:
            pages.close()

    def refresh_ring(self) -> Plan[None]:
        """Plan: fetch the ring now (unless a refresh ran within the last second)."""
        yield from self._refresh(force=True)

    def ensure_ring(self) -> Plan[None]:
        """Plan: fetch the ring if it never has been, so that ``nodes()`` and
        ``replicas()`` are right before the first request; ``NoNodeAvailable`` if no
        node answers ``GET /v1/ring``."""
        if self.router.topology.ring is not None:
            return
        deadline_s = call_deadline_s(self._clock.monotonic_s(), timeout_s=self.timeout_s,
                                     max_retries=self.max_retries,
                                     backoff_max_s=self.backoff_max_s)
        yield from self._refresh(force=True, deadline_s=deadline_s)
        if self.router.topology.ring is None:
            seeds = self.router.seeds
            raise NoNodeAvailable("no ringkv node answered GET /v1/ring (tried "
                                  f"{', '.join(seeds)}), so the ring is not known yet",
                                  tried=list(seeds), reasons=["no ring fetched"])

    # ---- building calls ---------------------------------------------------

    def _level(
        self, level: str | ConsistencyLevel | None, *, write: bool, default: str | None,
        field: str = "consistency",
    ) -> str | None:
        if level is None:
            return None if default == "ANY" and not write else default  # ANY is for writes only
        if isinstance(level, ConsistencyLevel):
            level = level.value
        if not isinstance(level, str):
            raise InvalidArgumentType(f"{field} must be a str or a ConsistencyLevel, not "
                                      f"{type(level).__name__}", field=field)
        try:
            return ConsistencyLevel.parse(level, write=write, field=field).value
        except RingKVError as exc:  # the same words as a node's 400, raised as ours
            raise InvalidArgument(exc.message, field=field) from None

    def _idempotency_key(self, given: str | None) -> str | None:
        if given is not None:
            return given
        return self._new_idempotency_key() if self.idempotent_writes else None

    def _key_call(
        self, method: str, keyspace: str, key: Key, consistency: Any, *,
        body: dict[str, Any] | None, idempotency_key: str | None = None,
        txn_id: str | None = None,
    ) -> Call:
        raw = key_bytes(key)
        read = method == "GET"
        # A transactional keyspace is SERIAL only: the client's default level is not sent.
        serial = txn_id is not None or self.router.transactional(keyspace)
        default = None if serial else self.consistency
        level = self._level(consistency, write=not read, default=default)
        path = _key_path(keyspace, raw)
        if level:
            path += f"?consistency={level}"
        return Call(
            method, path, None if body is None else json.dumps(body).encode(),
            ((keyspace, raw),), read=read,
            # A transaction's id already makes it run once; a key is sent only if given.
            idempotency_key=None if read else (
                idempotency_key if txn_id is not None else self._idempotency_key(idempotency_key)),
            txn_id=txn_id,
            prefer=self._leader(keyspace, raw) if txn_id is not None else None,
        )

    def _write(
        self, method: str, keyspace: str | None, key: Key, consistency: Any,
        body: dict[str, Any] | None, idempotency_key: str | None,
        condition: dict[str, Any] | None = None, txn_id: str | None = None,
    ) -> Plan[WriteResult]:
        keyspace = keyspace or self.keyspace
        raw = key_bytes(key)
        transactional = (condition is not None or txn_id is not None
                         or self.router.transactional(keyspace))
        if not transactional:
            call = self._key_call(method, keyspace, key, consistency, body=body,
                                  idempotency_key=idempotency_key)
            reply = yield from self._execute(call)
            answer = _json(reply)
            replayed = reply.headers.get(REPLAYED_HEADER, "").lower() == "true"
            if "version" in answer:  # a transactional keyspace the ring had not shown yet
                self._note_leader(keyspace, raw, answer.get("receipt"))
                return _txn_write_result(answer, None, replayed)
            return WriteResult(_timestamp(answer["timestamp"]), answer["receipt"], replayed)
        # A single-key transaction: under one id for all its attempts, so that
        # a retry after a lost answer or a conflict abort never applies twice.
        body = dict(body or {})
        if "ttl" in body:
            raise InvalidArgument("a transactional keyspace takes no ttl", field="ttl")
        if condition is not None:
            body["if"] = condition
        txn_id = _txn_id(txn_id, self._new_idempotency_key)
        body["id"] = txn_id
        call = self._key_call(method, keyspace, key, consistency, body=body,
                              idempotency_key=idempotency_key, txn_id=txn_id)
        reply, _ = yield from self._execute_txn(call)
        answer = _json(reply)
        self._note_leader(keyspace, raw, answer.get("receipt"))
        return _txn_write_result(answer, txn_id, answer.get("receipt") is None)

    def _leased_put(self, keyspace: str | None, key: Key, body: dict[str, Any],
                    condition: dict[str, Any] | None, lease: str) -> Plan[WriteResult]:
        """A put attached to a lease: no transaction id (the node runs it as one transaction
        with the lease record); sent again after a lost answer, it writes the same again."""
        keyspace = keyspace or self.keyspace
        raw = key_bytes(key)
        if "ttl" in body:
            raise InvalidArgument("a put attached to a lease takes no ttl", field="ttl")
        body = {**body, "lease": lease}
        if condition is not None:
            body["if"] = condition
        call = Call("PUT", _key_path(keyspace, raw), json.dumps(body).encode(),
                    ((keyspace, raw),), read=False)
        answer = _json((yield from self._execute(call)))
        return _txn_write_result(answer, None, False)

    # ---- session leases (``POST /v1/lease``) ----------------------------------------

    def lease_grant(self, ttl_s: int, *, keyspace: str | None = None) -> Plan[dict[str, Any]]:
        """Plan: grant a lease of ``ttl_s`` seconds on a transactional keyspace."""
        if isinstance(ttl_s, bool) or not isinstance(ttl_s, int) or ttl_s < 1:
            raise InvalidArgument("ttl_s must be a whole number of seconds, at least 1",
                                  field="ttl_s")
        body = {"ttl": ttl_s, "keyspace": keyspace or self.keyspace}
        call = Call("POST", "/v1/lease", json.dumps(body).encode(), (), read=False)
        return dict(_json((yield from self._execute(call))))

    def lease_keepalive(self, lease: Any, *, ttl_s: float | None = None,
                        expires_at_s: float | None = None) -> Plan[dict[str, Any]]:
        """Plan: renew a lease (``LeaseExpired`` once it has expired or was revoked).

        A background renewal names the lease's ``ttl_s`` and when it surely expires
        (``expires_at_s``, monotonic): its attempts are then bounded by the TTL, not
        by the client's ``timeout_s`` (``routing.renewal_bounds_s``), so that a silent
        node leaves time to renew through another before the lease lapses."""
        timeout_s = deadline_s = None
        if ttl_s is not None and expires_at_s is not None:
            timeout_s, deadline_s = renewal_bounds_s(ttl_s, self.timeout_s,
                                                     self._clock.monotonic_s(), expires_at_s)
        # Safe to send again (a repeat renews again), so marked as a read.
        call = Call("POST", f"{_lease_path(lease)}/keepalive", b"{}", (), read=True,
                    timeout_s=timeout_s, deadline_s=deadline_s)
        return dict(_json((yield from self._execute(call))))

    def lease_revoke(self, lease: Any) -> Plan[dict[str, Any]]:
        """Plan: revoke a lease: its keys are deleted at once."""
        call = Call("DELETE", _lease_path(lease), None, (), read=False)
        return dict(_json((yield from self._execute(call))))

    def lease_info(self, lease: Any) -> Plan[dict[str, Any]]:
        """Plan: a lease's TTL, what it surely has left, and its attached keys."""
        reply = yield from self._execute(Call("GET", _lease_path(lease), None, (), read=True))
        body = _json(reply)
        if reply.status >= 300:
            raise RingKVError.from_json(body, http_status=reply.status)
        return dict(body)

    def _leader(self, keyspace: str, key: bytes) -> str | None:
        return self.router.leader(keyspace, key) if self.leader_hints else None

    def _note_leader(self, keyspace: str, key: bytes, receipt: Any) -> None:
        if isinstance(receipt, dict) and isinstance(receipt.get("leader"), str):
            self.router.note_leader(keyspace, key, receipt["leader"])

    def _execute_txn(self, call: Call) -> Plan[tuple[Reply, int]]:
        """``_execute`` a transaction, sending it again under the same id after a conflict
        abort (at most ``txn_retries`` times, with backoff); returns the reply and the retries.

        Only ``aborted`` is retried: nothing of the transaction was applied.
        A failed condition (``ConditionFailed``) is the answer, raised as is,
        once the id's outcome (``txn_status``) shows it did not commit: an
        earlier attempt may have run, and the condition may have failed
        *because* it committed. That attempt may be one the client never saw
        fail: a node forwarding to a leader that dies forwards again, in the
        same request, to the next leader, which (before it re-checks ids after
        catching up its log) runs the id a second time. So every failed
        condition costs one more round trip, and only a failed one.
        """
        conflicts = 0
        uncertain: list[str] = []
        while True:
            try:
                return (yield from self._execute(call, uncertain)), conflicts
            except ConditionFailed:
                if call.txn_id is None:
                    raise
                keyspace, key = call.routing[0]
                for asked in range(STATUS_POLLS):
                    status = yield from self.txn_status(call.txn_id, keyspace=keyspace,
                                                        key=key)
                    if status.status != "pending":
                        break
                    yield Sleep(backoff_s(asked, base_s=self.backoff_base_s,
                                          max_s=self.backoff_max_s, rng=self._rng))
                if status.status == "pending":
                    raise NoNodeAvailable(
                        f"transaction {call.txn_id} is still pending after a failed condition; "
                        "its outcome is unknown", tried=[], reasons=uncertain,
                        maybe_applied=True) from None
                if status.status != "committed" or status.commit_ts is None:
                    raise
                answer = {"ok": True, "id": call.txn_id, "committed": True,
                          "version": status.commit_ts, "commit_ts": status.commit_ts,
                          "receipt": None}
                return Reply(200, json.dumps(answer).encode(), {}), conflicts
            except Aborted:
                if conflicts >= self.txn_retries:
                    raise
            conflicts += 1
            yield Sleep(backoff_s(conflicts - 1, base_s=self.backoff_base_s,
                                  max_s=self.backoff_max_s, rng=self._rng))

    # ---- the transactional tier --------------------------------------------------

    def get_versioned(
        self,
        key: Key,
        *,
        keyspace: str | None = None,
        snapshot_ts: int | None = None,
        max_staleness_ms: int | None = None,
    ) -> Plan[Versioned | None]:
        """Plan: ``key`` of a transactional keyspace with its version, or None if absent."""
        keyspace = keyspace or self.keyspace
        raw = key_bytes(key)
        query = []
        if snapshot_ts is not None:
            query.append(f"snapshot_ts={int(snapshot_ts)}")
        if max_staleness_ms is not None:
            query.append(f"max_staleness_ms={int(max_staleness_ms)}")
        path = _key_path(keyspace, raw) + ("?" + "&".join(query) if query else "")
        strong = not query
        prefer = self._leader(keyspace, raw) if strong else None
        call = Call("GET", path, None, ((keyspace, raw),), read=True, prefer=prefer)
        reply = yield from self._execute(call)
        body = _json(reply)
        if reply.status == 404:
            error = RingKVError.from_json(body, http_status=404)
            if "receipt" in error.details:  # the key is absent (not: no such keyspace)
                return None
            raise error
        if strong:
            self._note_leader(keyspace, raw, body.get("receipt"))
        return Versioned(body["key"], body["value"], int(body["version"]), body.get("receipt"))

    def txn(
        self,
        keyspace: str | None = None,
        *,
        reads: Sequence[str] = (),
        conditions: Sequence[Mapping[str, Any]] = (),
        writes: Sequence[Mapping[str, Any]] = (),
        txn_id: str | None = None,
    ) -> Plan[TxnResult]:
        """Plan: one ``POST /v1/txn``, retried under one id after a conflict abort."""
        keyspace = keyspace or self.keyspace
        wire, routing = _txn_body(keyspace, reads, conditions, writes)
        txn_id = _txn_id(txn_id, self._new_idempotency_key)
        wire["id"] = txn_id
        first = routing[0][1]
        call = Call("POST", "/v1/txn", json.dumps(wire).encode(), tuple(routing), read=False,
                    txn_id=txn_id, prefer=self._leader(keyspace, first))
        reply, conflicts = yield from self._execute_txn(call)
        answer = _json(reply)
        receipt = answer.get("receipt")
        self._note_leader(keyspace, first, receipt)
        got: dict[str, Versioned | None] = {}
        for item in answer.get("reads") or ():
            got[item["key"]] = (Versioned(item["key"], item["value"], int(item["version"]))
                                if item.get("found") else None)
        commit_ts = answer.get("commit_ts")
        return TxnResult(
            id=str(answer.get("id", txn_id)), committed=bool(answer.get("committed")),
            commit_ts=None if commit_ts is None else int(commit_ts), reads=got, receipt=receipt,
            # The node says so (a node of an older release only left the receipt out).
            conflict_retries=conflicts, replayed=bool(answer.get("replayed")) or (
                receipt is None and bool(answer.get("committed"))),
        )

    def txn_status(
        self, txn_id: str, *, keyspace: str | None = None, key: Key | None = None,
    ) -> Plan[TxnStatus]:
        """Plan: ``GET /v1/txn/{id}``: what the range's leader knows of a transaction."""
        keyspace = keyspace or self.keyspace
        if not isinstance(txn_id, str) or not _TXN_ID_CHARS.issuperset(txn_id) \
                or not 1 <= len(txn_id) <= 64:
            raise InvalidArgument("id must be 1-64 characters of letters, digits and . _ : -",
                                  field="id")
        query = f"keyspace={quote(keyspace, safe='')}"
        routing: tuple[tuple[str, bytes], ...] = ()
        if key is not None:
            raw = key_bytes(key)
            query += f"&key={quote(raw, safe='')}"
            routing = ((keyspace, raw),)
        call = Call("GET", f"/v1/txn/{quote(txn_id, safe='')}?{query}", None, routing,
                    read=True)
        reply = yield from self._execute(call)
        body = _json(reply)
        if reply.status == 404:
            error = RingKVError.from_json(body, http_status=404)
            if error.details.get("status") == "not_committed":
                return TxnStatus(txn_id, "not_committed",
                                 definitive=bool(error.details.get("definitive", True)))
            raise error
        commit_ts = body.get("commit_ts")
        return TxnStatus(str(body["id"]), str(body["status"]),
                         None if commit_ts is None else int(commit_ts), body.get("range"))

    # ---- interactive transactions (``transaction.py`` steps them) ----------------

    def backoff(self, retry: int) -> float:
        """The pause before retry ``retry`` (from 0): exponential, capped, jittered."""
        return backoff_s(retry, base_s=self.backoff_base_s, max_s=self.backoff_max_s,
                         rng=self._rng)

    def txn_begin(
        self, keyspace: str | None = None, *, read_only: bool = False,
        priority: int | None = None,
    ) -> Plan[TxnHandle]:
        """Plan: ``POST /v1/txn/begin`` at any node; the handle names that node, where
        every later call of the transaction goes. ``keyspace`` None: the client's
        keyspace when the ring shows it transactional, else the node's choice (the
        cluster's one transactional keyspace; a 400 naming ``keyspace`` if it has several)."""
        yield from self._refresh()
        if keyspace is None and self.router.transactional(self.keyspace):
            keyspace = self.keyspace
        body: dict[str, Any] = {} if keyspace is None else {"keyspace": keyspace}
        if read_only:
            body["read_only"] = True
        if priority is not None:
            if isinstance(priority, bool) or not isinstance(priority, int) or priority < 0:
                raise InvalidArgument("priority must be the priority an earlier attempt's begin "
                                      "answered", field="priority")
            body["priority"] = priority
        # Keyed, so that a begin whose answer was lost is not begun twice there.
        call = Call("POST", "/v1/txn/begin", json.dumps(body).encode(), (), read=False,
                    idempotency_key=self._new_idempotency_key())
        answered: list[str] = []
        reply = yield from self._execute(call, answered=answered)
        began = _json(reply)
        read_ts = began.get("read_ts")
        return TxnHandle(
            id=str(began["txn_id"]), keyspace=str(began["keyspace"]),
            read_only=bool(began["read_only"]), priority=int(began["priority"]),
            node_id=str(began.get("node_id", "")), url=answered[0],
            read_ts=None if read_ts is None else int(read_ts))

    def _in_txn(self, handle: TxnHandle, method: str, path: str,
                body: dict[str, Any] | None) -> Call:
        """A call of the transaction: to its node only, keyed so that a retry after a
        lost answer gets the first answer instead of running again."""
        return Call(method, f"/v1/txn/{quote(handle.id, safe='')}{path}",
                    None if body is None else json.dumps(body).encode(), (),
                    read=method == "GET", idempotency_key=self._new_idempotency_key(),
                    pin=handle.url)

    def txn_read(self, handle: TxnHandle, key: Key) -> Plan[Versioned | None]:
        """Plan: ``key`` as the transaction sees it (its own write first), or None if absent;
        ``version`` is None for the transaction's own write."""
        raw = key_bytes(key)
        call = self._in_txn(handle, "GET", _txn_key_path(handle.keyspace, raw), None)
        reply = yield from self._execute(call)
        body = _json(reply)
        if reply.status == 404:
            error = RingKVError.from_json(body, http_status=404)
            if error.details.get("found") is False:
                return None
            raise error
        version = body.get("version")
        return Versioned(body["key"], body["value"], None if version is None else int(version))

    def txn_write(self, handle: TxnHandle, key: Key, value: Any = UNSET) -> Plan[None]:
        """Plan: lock ``key`` and buffer a put of ``value`` (UNSET: a delete) until commit."""
        raw = key_bytes(key)
        body = None if value is UNSET else {"value": _encode_value(value, "value")}
        call = self._in_txn(handle, "DELETE" if value is UNSET else "PUT",
                            _txn_key_path(handle.keyspace, raw), body)
        yield from self._execute(call)

    def txn_commit(self, handle: TxnHandle) -> Plan[TxnCommit]:
        """Plan: commit; ``Timeout`` (or ``NoNodeAvailable``) means the outcome is unknown."""
        reply = yield from self._execute(self._in_txn(handle, "POST", "/commit", None))
        done = _json(reply)
        commit_ts, read_ts = done.get("commit_ts"), done.get("read_ts")
        return TxnCommit(str(done["id"]), bool(done["committed"]),
                         None if commit_ts is None else int(commit_ts),
                         None if read_ts is None else int(read_ts), done.get("receipt"))

    def txn_abort(self, handle: TxnHandle) -> Plan[None]:
        """Plan: abort (the node releases the transaction's locks)."""
        yield from self._execute(self._in_txn(handle, "POST", "/abort", None))

    # ---- the ring -----------------------------------------------------------

    def _refresh(self, *, force: bool = False, deadline_s: float | None = None,
                 timeout_s: float | None = None) -> Plan[None]:
        """Fetch ``/v1/ring`` from a live node when it is due (one refresh at a time).

        ``deadline_s`` (monotonic): the refresh gives up then, and ``timeout_s``
        bounds each attempt (the client's ``timeout_s`` when None), so that it stays
        inside the time bounds of the call it runs for.
        """
        attempt_s = self.timeout_s if timeout_s is None else timeout_s
        router = self.router
        now = self._clock.monotonic_s()
        if not router.refresh_due(now, force=force) or not self._refreshing.acquire(blocking=False):
            return  # not due, or another call is refreshing: carry on with the ring we have
        try:
            router.refresh_started(now)
            for url in router.candidates((), self._clock.monotonic_s())[:MAX_REFRESH_TRIES]:
                left_s = attempt_timeout_s(attempt_s, deadline_s, self._clock.monotonic_s())
                if left_s is None:
                    return
                outcome = yield Send("GET", url + "/v1/ring", None, self.headers, left_s)
                if isinstance(outcome, Failure):
                    if outcome.kind in ("connect", "timeout"):
                        router.mark_down(url, self._clock.monotonic_s())
                    continue
                assert outcome is not None
                if outcome.status != 200:
                    continue
                try:
                    topology = parse_ring(outcome.body, url)
                except (ValueError, KeyError, TypeError):
                    continue
                router.adopt(topology, self._clock.monotonic_s())
                return
        finally:
            self._refreshing.release()

    # ---- sending, with retries ---------------------------------------------------

    def _execute(self, call: Call, uncertain: list[str] | None = None,
                 answered: list[str] | None = None) -> Plan[Reply]:
        """Send ``call`` until a node answers for good; returns a 2xx (or a get's 404) reply.

        Connection failures (nothing was sent) move on to the next node and
        cost no retry, so every node is tried before ``NoNodeAvailable``.
        Other failures are retried, up to ``max_retries`` times, only when
        that is safe; a repeatable write whose answer was lost is retried on
        the same node, which de-duplicates it by its idempotency key. The whole
        call, ring refresh and connection attempts included, ends by its
        deadline: ``(max_retries + 1) * timeout_s`` plus the longest backoffs (a call
        with a ``timeout_s`` or ``deadline_s`` of its own: within those too).
        ``uncertain`` gets a line for each attempt that may have run without
        its outcome coming back (a lost answer, a 5xx after it was sent).
        ``answered`` gets the URL of the node whose reply is returned. A call
        with a ``pin`` tries that node only.
        """
        router = self.router
        attempt_s = self.timeout_s if call.timeout_s is None else min(self.timeout_s,
                                                                        call.timeout_s)
        deadline_s = call_deadline_s(self._clock.monotonic_s(), timeout_s=attempt_s,
                                     max_retries=self.max_retries, backoff_max_s=self.backoff_max_s)
        if call.deadline_s is not None:
            deadline_s = min(deadline_s, call.deadline_s)
        yield from self._refresh(deadline_s=deadline_s, timeout_s=attempt_s)
        now = self._clock.monotonic_s()
        # A transaction goes to its range's last known leader first; its id (not
        # an idempotency key) makes it safe to send again, through any node.
        affinity = None if call.txn_id is not None else call.idempotency_key
        candidates = ([call.pin] if call.pin is not None else
                      router.candidates(call.routing, now, affinity=affinity, prefer=call.prefer))
        headers = dict(self.headers)
        if call.idempotency_key is not None:
            headers[IDEMPOTENCY_HEADER] = call.idempotency_key
        excluded: set[str] = set()
        tried: list[str] = []
        reasons: list[str] = []
        last_error: RingKVError | None = None
        maybe_applied = False
        timed_out = False  # an attempt unanswered in time, or the deadline spent
        retries = 0
        position = 0
        url: str | None = None
        while True:
            if url is None:
                url, position = _next_url(candidates, excluded, position)
                if url is None:
                    break
            timeout_s = attempt_timeout_s(attempt_s, deadline_s, self._clock.monotonic_s())
            if timeout_s is None:
                if last_error is not None:
                    raise last_error
                reasons.append(f"the call's deadline passed after {len(tried)} node(s)")
                raise _no_node(call, tried, reasons, maybe_applied, timed_out=True)
            if url not in tried:
                tried.append(url)
            outcome = yield Send(call.method, url + call.path, call.body, headers, timeout_s)
            assert outcome is not None
            if isinstance(outcome, Reply):
                router.mark_up(url)
                if outcome.status < 300 or (outcome.status == 404 and call.method == "GET"):
                    if answered is not None:
                        answered.append(url)
                    return outcome
                error = RingKVError.from_json(_safe_json(outcome.body), http_status=outcome.status)
                last_error = error
                if isinstance(error, Unavailable):
                    router.stale = True  # the node sees replicas down: our ring may be stale
                    excluded.add(url)  # it will say the same again; ask another coordinator
                elif isinstance(error, (Overloaded, ShuttingDown)):
                    pass  # did not run: safe to retry anywhere
                elif outcome.status < 500 or not call.repeatable or call.pin is not None:
                    # (A pinned call's node answered: its session has acted on it.)
                    raise error
                elif uncertain is not None:
                    uncertain.append(f"{url}: {error.code}")
                if retries >= self.max_retries:
                    raise error
                url = None  # retry on the next node
            else:
                reasons.append(f"{url}: {outcome.reason}")
                if outcome.kind == "connect":
                    router.mark_down(url, self._clock.monotonic_s())
                    excluded.add(url)
                    url = None
                    continue  # nothing was sent: try the next node, at no retry cost
                router.stale = True
                maybe_applied = maybe_applied or not call.read
                if outcome.kind == "timeout":
                    # A silent node (cut off, paused) costs a whole timeout per call:
                    # later calls try it last for a while, as a refused one is.
                    router.mark_down(url, self._clock.monotonic_s())
                    timed_out = True
                if uncertain is not None:
                    uncertain.append(f"{url}: {outcome.reason}")
                if not call.repeatable or retries >= self.max_retries:
                    raise _no_node(call, tried, reasons, maybe_applied, timed_out=timed_out)
                if call.idempotency_key is None or call.txn_id is not None:
                    url = None  # a read, or a transaction (its id): any node will do
                # else: same node, same key, so the node can de-duplicate it
            retries += 1
            pause_s = backoff_s(retries - 1, base_s=self.backoff_base_s,
                                max_s=self.backoff_max_s, rng=self._rng)
            yield Sleep(min(pause_s, max(0.0, deadline_s - self._clock.monotonic_s())))
        if last_error is not None:
            raise last_error
        raise _no_node(call, tried, reasons, maybe_applied, timed_out=timed_out)


# -- encoding and decoding -----------------------------------------------------------


def _next_url(candidates: list[str], excluded: set[str], position: int) -> tuple[str | None, int]:
    """The next candidate not excluded, cycling through the list."""
    for step in range(len(candidates)):
        url = candidates[(position + step) % len(candidates)]
        if url not in excluded:
            return url, position + step + 1
    return None, position


_TXN_ID_CHARS = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:-"
)
_CONDITION_KINDS = ("version", "absent", "equals")


def _key_path(keyspace: str, raw: bytes) -> str:
    # Every reserved character is escaped, and dots too, so that no key
    # (not even "." or "..") is ever read as a path segment to normalise.
    return f"/v1/kv/{quote(keyspace, safe='')}/{quote(raw, safe='').replace('.', '%2E')}"


def lease_id(lease: Any) -> str:
    """A lease's id: the text itself, or the ``id`` of what ``lease()`` returned."""
    text = getattr(lease, "id", lease)
    if not isinstance(text, str) or ":" not in text:
        raise InvalidArgument("lease must be a lease id (as POST /v1/lease answers) or a "
                              "Lease", field="lease")
    return text


def _lease_path(lease: Any) -> str:
    return f"/v1/lease/{quote(lease_id(lease), safe=':')}"


def _txn_key_path(keyspace: str, raw: bytes) -> str:
    return f"/kv/{quote(keyspace, safe='')}/{quote(raw, safe='').replace('.', '%2E')}"


def _txn_write_result(answer: Any, txn_id: str | None, replayed: bool) -> WriteResult:
    """A single-key transaction's answer; its version (commit timestamp, µs) is the timestamp too."""
    if "version" not in answer:  # an eventual keyspace after all (a txn_id was given)
        return WriteResult(_timestamp(answer["timestamp"]), answer["receipt"], replayed)
    version = int(answer["version"])
    return WriteResult(Timestamp(version, 0), answer.get("receipt") or {}, replayed=replayed,
                       version=version, txn_id=str(answer.get("id", txn_id)))


def _txn_id(given: str | None, new: Callable[[], str]) -> str:
    """The caller's transaction id, checked, or a fresh one (the same for every attempt)."""
    txn_id = given if given is not None else new()
    if not isinstance(txn_id, str) or not 1 <= len(txn_id) <= 64 \
            or not _TXN_ID_CHARS.issuperset(txn_id):
        raise InvalidArgument("txn_id must be 1-64 characters of letters, digits and . _ : -",
                              field="txn_id")
    return txn_id


def _condition(if_version: int | None, if_absent: bool, if_equals: Any) -> dict[str, Any] | None:
    """The ``"if"`` of a single-key write, from at most one of the three keyword arguments."""
    given: dict[str, Any] = {}
    if if_version is not None:
        if isinstance(if_version, bool) or not isinstance(if_version, int) or if_version < 0:
            raise InvalidArgument("if_version must be a version (a commit timestamp, µs, >= 0)",
                                  field="if_version")
        given["version"] = if_version
    if if_absent:
        given["absent"] = True
    if if_equals is not UNSET:
        given["equals"] = _encode_value(if_equals, "if_equals")
    if len(given) > 1:
        raise InvalidArgument("give at most one of if_version, if_absent and if_equals",
                              field="if_" + sorted(given)[1])
    return given or None


def _txn_body(
    keyspace: str, reads: Sequence[str], conditions: Sequence[Mapping[str, Any]],
    writes: Sequence[Mapping[str, Any]],
) -> tuple[dict[str, Any], list[tuple[str, bytes]]]:
    """The body of ``POST /v1/txn`` and its (keyspace, key) pairs, checked before sending."""
    if isinstance(reads, str):
        raise InvalidArgumentType("reads must be a list of keys, not one string", field="reads")
    read_keys = [key_text(key, f"reads[{i}]") for i, key in enumerate(reads)]
    routing = [(keyspace, key.encode("utf-8")) for key in read_keys]
    wire_conditions = []
    for i, cond in enumerate(conditions):
        if not isinstance(cond, Mapping):
            raise InvalidArgumentType("a condition is a mapping: key and one of version, "
                                      "absent, equals", field=f"conditions[{i}]")
        cond = {**cond, "key": key_text(cond.get("key"), f"conditions[{i}].key")}
        routing.append((keyspace, cond["key"].encode("utf-8")))
        kinds = [kind for kind in _CONDITION_KINDS if kind in cond]
        if len(kinds) != 1:
            raise InvalidArgument("a condition names exactly one of version, absent, equals",
                                  field=f"conditions[{i}]")
        if "equals" in cond:
            _encode_value(cond["equals"], f"conditions[{i}].equals")
        wire_conditions.append(dict(cond))
    wire_writes = []
    for i, write in enumerate(writes):
        if not isinstance(write, Mapping):
            raise InvalidArgumentType("a write is a mapping: op (put or delete), key, value",
                                      field=f"writes[{i}]")
        item = dict(write)
        item.setdefault("op", "put")
        if item["op"] not in ("put", "delete"):
            raise InvalidArgument("op must be put or delete", field=f"writes[{i}].op")
        item["key"] = key_text(item.get("key"), f"writes[{i}].key")
        routing.append((keyspace, item["key"].encode("utf-8")))
        if item["op"] == "put":
            if "value" not in item:
                raise InvalidArgument("a put needs a value", field=f"writes[{i}].value")
            _encode_value(item["value"], f"writes[{i}].value")
            if item.get("lease") is not None:  # a Lease object or its id
                item["lease"] = str(getattr(item["lease"], "id", item["lease"]))
        wire_writes.append(item)
    if not routing:
        raise InvalidArgument("a transaction needs reads, conditions or writes", field="body")
    wire: dict[str, Any] = {"keyspace": keyspace}
    if read_keys:
        wire["reads"] = read_keys
    if wire_conditions:
        wire["conditions"] = wire_conditions
    if wire_writes:
        wire["writes"] = wire_writes
    return wire, routing


def _timestamp(raw: Any) -> Timestamp:
    return Timestamp(int(raw[0]), int(raw[1]))


def _json(reply: Reply) -> Any:
    try:
        return json.loads(reply.body)
    except ValueError:
        raise RingKVError.from_json(None, http_status=reply.status) from None


def _safe_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return body[:200].decode(errors="replace")


def _encode_value(value: Any, field: str) -> Any:
    """Check that ``value`` is JSON (no NaN, no sets, ...) before it leaves the client."""
    try:
        json.dumps(value, allow_nan=False)
    except TypeError as exc:
        raise InvalidArgumentType(f"{field} is not JSON-serialisable: {exc}",
                                  field=field) from None
    except (ValueError, RecursionError) as exc:
        raise InvalidArgument(f"{field} is not JSON-serialisable: {exc}", field=field) from None
    return value


def ttl_seconds(ttl: object, field: str = "ttl") -> int | None:
    """A TTL as the API takes it, whole seconds: from an ``int`` or a
    ``datetime.timedelta`` of whole seconds. A float, a bool, a negative or
    sub-second TTL is refused here, naming ``field``, rather than rounded."""
    if ttl is None:
        return None
    if isinstance(ttl, datetime.timedelta):
        if ttl < datetime.timedelta(0):
            raise InvalidArgument(f"{field} must not be negative, got {ttl!r}", field=field)
        if ttl.microseconds:
            raise InvalidArgument(f"{field} must be whole seconds (the API's unit), got {ttl}",
                                       field=field)
        return ttl.days * 86_400 + ttl.seconds
    if isinstance(ttl, bool) or not isinstance(ttl, int):
        raise InvalidArgumentType(f"{field} must be an int (seconds) or a datetime.timedelta, "
                                  f"not {type(ttl).__name__}", field=field)
    if ttl < 0:
        raise InvalidArgument(f"{field} must not be negative, got {ttl}", field=field)
    return ttl


def _no_node(
    call: Call, tried: list[str], reasons: list[str], maybe_applied: bool, *,
    timed_out: bool = False,
) -> NoNodeAvailable:
    what = f"{call.method} {call.path.split('?')[0]}"
    note = " (the write may have been applied)" if maybe_applied else ""
    return NoNodeAvailable(
        f"no ringkv node answered {what}{note}: " + ("; ".join(reasons) or "no nodes to try"),
        tried=tried, reasons=reasons, maybe_applied=maybe_applied, timed_out=timed_out,
    )
