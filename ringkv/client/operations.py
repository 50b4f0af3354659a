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

import json
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import quote

from ringkv.client.plan import Emit, Failure, Outcome, Plan, Reply, Send, Sleep
from ringkv.client.routing import (
    Router,
    attempt_timeout_s,
    backoff_s,
    call_deadline_s,
    key_bytes,
    normalise_url,
    parse_ring,
)
from ringkv.client.types import BatchResult, Page, Record, WriteResult
from ringkv.errors import (
    BadRequest,
    NoNodeAvailable,
    Overloaded,
    RingKVError,
    ShuttingDown,
    Unavailable,
)
from ringkv.hlc import Timestamp
from ringkv.quorum import ConsistencyLevel

IDEMPOTENCY_HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
JSON_HEADERS = {"Content-Type": "application/json", "Accept": "application/json"}
# Nodes asked for the ring in one refresh before giving up until the next.
MAX_REFRESH_TRIES = 4


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

    @property
    def repeatable(self) -> bool:
        """Safe to send again even if an earlier attempt ran."""
        return self.read or self.idempotency_key is not None


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
        if timeout_s <= 0 or max_retries < 0 or refresh_interval_s <= 0:
            raise ValueError("timeout_s and refresh_interval_s must be > 0, max_retries >= 0")
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

    # ---- the plans of the public calls ------------------------------------------

    def get(
        self,
        key: str,
        *,
        keyspace: str | None = None,
        consistency: str | ConsistencyLevel | None = None,
    ) -> Plan[Any]:
        """Plan: ``key``'s value, or None if the key is absent."""
        record = yield from self.get_with_meta(key, keyspace=keyspace, consistency=consistency)
        return None if record is None else record.value

    def get_with_meta(
        self,
        key: str,
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
    ) -> Plan[WriteResult]:
        """Plan: write ``value`` under ``key``, with an idempotency key unless writes have none."""
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
    ) -> Plan[WriteResult]:
        """Plan: write a tombstone for ``key``."""
        return (yield from self._write("DELETE", keyspace, key, consistency, None, idempotency_key))

    def batch(
        self,
        ops: Sequence[Mapping[str, Any]],
        *,
        consistency: str | ConsistencyLevel | None = None,
        idempotency_key: str | None = None,
    ) -> Plan[list[BatchResult]]:
        """Plan: one ``POST /v1/batch``, routed to the node that replicates most of its keys."""
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
            routing.append((str(item["keyspace"]), key_bytes(item.get("key"), f"ops[{i}].key")))
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
        return self._new_idempotency_key() if self.idempotent_writes else None

    def _key_call(
        self, method: str, keyspace: str, key: str, consistency: Any, *,
        body: dict[str, Any] | None, idempotency_key: str | None = None,
    ) -> Call:
        raw = key_bytes(key)
        read = method == "GET"
        level = self._level(consistency, write=not read, default=self.consistency)
        # Every reserved character is escaped, and dots too, so that no key
        # (not even "." or "..") is ever read as a path segment to normalise.
        path = f"/v1/kv/{quote(keyspace, safe='')}/{quote(raw, safe='').replace('.', '%2E')}"
        if level:
            path += f"?consistency={level}"
        return Call(
            method, path, None if body is None else json.dumps(body).encode(),
            ((keyspace, raw),), read=read,
            idempotency_key=None if read else self._idempotency_key(idempotency_key),
        )

    def _write(
        self, method: str, keyspace: str | None, key: str, consistency: Any,
        body: dict[str, Any] | None, idempotency_key: str | None,
    ) -> Plan[WriteResult]:
        call = self._key_call(method, keyspace or self.keyspace, key, consistency, body=body,
                              idempotency_key=idempotency_key)
        reply = yield from self._execute(call)
        answer = _json(reply)
        replayed = reply.headers.get(REPLAYED_HEADER, "").lower() == "true"
        return WriteResult(_timestamp(answer["timestamp"]), answer["receipt"], replayed)

    # ---- the ring -----------------------------------------------------------

    def _refresh(self, *, force: bool = False, deadline_s: float | None = None) -> Plan[None]:
        """Fetch ``/v1/ring`` from a live node when it is due (one refresh at a time).

        ``deadline_s`` (monotonic): the refresh gives up then, so that it stays
        inside the time bound of the call it runs for.
        """
        router = self.router
        now = self._clock.monotonic_s()
        if not router.refresh_due(now, force=force) or not self._refreshing.acquire(blocking=False):
            return  # not due, or another call is refreshing: carry on with the ring we have
        try:
            router.refresh_started(now)
            for url in router.candidates((), self._clock.monotonic_s())[:MAX_REFRESH_TRIES]:
                timeout_s = attempt_timeout_s(self.timeout_s, deadline_s, self._clock.monotonic_s())
                if timeout_s is None:
                    return
                outcome = yield Send("GET", url + "/v1/ring", None, JSON_HEADERS, timeout_s)
                if isinstance(outcome, Failure):
                    if outcome.kind == "connect":
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

    def _execute(self, call: Call) -> Plan[Reply]:
        """Send ``call`` until a node answers for good; returns a 2xx (or a get's 404) reply.

        Connection failures (nothing was sent) move on to the next node and
        cost no retry, so every node is tried before ``NoNodeAvailable``.
        Other failures are retried, up to ``max_retries`` times, only when
        that is safe; a repeatable write whose answer was lost is retried on
        the same node, which de-duplicates it by its idempotency key. The whole
        call, ring refresh and connection attempts included, ends by its
        deadline: ``(max_retries + 1) * timeout_s`` plus the longest backoffs.
        """
        router = self.router
        deadline_s = call_deadline_s(self._clock.monotonic_s(), timeout_s=self.timeout_s,
                                     max_retries=self.max_retries, backoff_max_s=self.backoff_max_s)
        yield from self._refresh(deadline_s=deadline_s)
        now = self._clock.monotonic_s()
        candidates = router.candidates(call.routing, now, affinity=call.idempotency_key)
        headers = dict(JSON_HEADERS)
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
                url, position = _next_url(candidates, excluded, position)
                if url is None:
                    break
            timeout_s = attempt_timeout_s(self.timeout_s, deadline_s, self._clock.monotonic_s())
            if timeout_s is None:
                if last_error is not None:
                    raise last_error
                reasons.append(f"the call's deadline passed after {len(tried)} node(s)")
                raise _no_node(call, tried, reasons, maybe_applied)
            if url not in tried:
                tried.append(url)
            outcome = yield Send(call.method, url + call.path, call.body, headers, timeout_s)
            assert outcome is not None
            if isinstance(outcome, Reply):
                router.mark_up(url)
                if outcome.status < 300 or (outcome.status == 404 and call.method == "GET"):
                    return outcome
                error = RingKVError.from_json(_safe_json(outcome.body), http_status=outcome.status)
                last_error = error
                if isinstance(error, Unavailable):
                    router.stale = True  # the node sees replicas down: our ring may be stale
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
                    router.mark_down(url, self._clock.monotonic_s())
                    excluded.add(url)
                    url = None
                    continue  # nothing was sent: try the next node, at no retry cost
                router.stale = True
                maybe_applied = maybe_applied or not call.read
                if not call.repeatable or retries >= self.max_retries:
                    raise _no_node(call, tried, reasons, maybe_applied)
                if call.idempotency_key is None:
                    url = None  # a read: any replica will do
                # else: same node, same key, so the node can de-duplicate it
            retries += 1
            pause_s = backoff_s(retries - 1, base_s=self.backoff_base_s,
                                max_s=self.backoff_max_s, rng=self._rng)
            yield Sleep(min(pause_s, max(0.0, deadline_s - self._clock.monotonic_s())))
        if last_error is not None:
            raise last_error
        raise _no_node(call, tried, reasons, maybe_applied)


# -- encoding and decoding -----------------------------------------------------------


def _next_url(candidates: list[str], excluded: set[str], position: int) -> tuple[str | None, int]:
    """The next candidate not excluded, cycling through the list."""
    for step in range(len(candidates)):
        url = candidates[(position + step) % len(candidates)]
        if url not in excluded:
            return url, position + step + 1
    return None, position


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
    except (TypeError, ValueError) as exc:
        raise BadRequest(f"value is not JSON-serialisable: {exc}", field=field) from None
    return value


def _no_node(
    call: Call, tried: list[str], reasons: list[str], maybe_applied: bool
) -> NoNodeAvailable:
    what = f"{call.method} {call.path.split('?')[0]}"
    note = " (the write may have been applied)" if maybe_applied else ""
    return NoNodeAvailable(
        f"no ringkv node answered {what}{note}: " + ("; ".join(reasons) or "no nodes to try"),
        tried=tried, reasons=reasons, maybe_applied=maybe_applied,
    )
