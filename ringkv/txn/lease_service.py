"""Session leases, carried out (shell): grant, keepalive, attach, revoke, and the sweeper.

Every decision is ``txn/leases.py``'s; this module reads records and runs the
transactions it plans through ``TxnService.execute`` (a transaction whose keys
fall in several ranges runs as one cross-range two-phase commit there). A
transaction that loses a race on a record's version (a keepalive against
another) is planned again from a fresh read, a bounded number of times. Grants
all rewrite the keyspace's lease directory, so a node grants the leases asked
of it meanwhile in one transaction, and a batch that loses the directory to
another node's goes again until each grant's deadline.

The sweeper runs on every node but works only where this node leads the range
of the keyspace's lease directory, every ``txn.lease_sweep_ms``: when its own
copy of the directory lists any lease (a local read: a keyspace without
leases costs no transaction), it reads the directory and every lease record
in serializable reads, and for each lease
that ``TT.now()`` says has certainly expired, runs the expiry transaction
(conditioned on the record's version, so a keepalive that committed first
wins). Two sweepers at once (a leadership change) are safe: the second one's
condition fails.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ringkv.clock import Clock
from ringkv.config import AUTH_KEYSPACE, Config
from ringkv.errors import Aborted, BadRequest, ConditionFailed, Overloaded, RingKVError
from ringkv.txn import leases as L
from ringkv.txn.requests import Condition, TxnRequest
from ringkv.txn.truetime import TTInterval
from ringkv.txn.service import Op, TxnService

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 8  # fresh reads and plans for one operation that keeps losing races
# Every grant in a keyspace rewrites its one lease directory. A node therefore grants
# the leases asked of it meanwhile together, in one transaction (group commit), at most
# this many at once; a batch that loses the directory's race to another node's goes
# again, with whatever arrived since, until each grant's own deadline.
MAX_GRANT_BATCH = 256
BACKOFF_S = 0.01  # times the attempt number, jittered: racing grants spread out
MAX_BACKOFF_S = 0.1

Current = dict[bytes, tuple[bytes | None, int | None]]


@dataclass
class _Grant:
    """A grant waiting for its batch: its TTL, when its request arrived (its deadline
    counts from there) and where its answer goes."""

    ttl_s: int
    started_s: float
    future: asyncio.Future[dict[str, Any]]


class LeaseService:
    def __init__(self, node_id: str, config: Config, *, clock: Clock, txn: TxnService) -> None:
        self.node_id = node_id
        self._config = config
        self._clock = clock
        self._txn = txn
        # Its own generator (seeded from the node and its start): lease ids draw
        # nothing from the node's, so the simulator's other draws are unchanged.
        self._rng = random.Random(f"lease:{node_id}:{clock.wall_us()}")
        self._task: asyncio.Task[None] | None = None
        # Grants waiting, by keyspace, and the task granting them (``_grant_batches``).
        self._grants: dict[str, list[_Grant]] = {}
        self._granting: dict[str, asyncio.Task[None]] = {}
        # The tier's counters (GET /v1/status, "transactional"."stats"), as watches' are.
        self.stats = txn.stats
        for name in ("leases_granted", "leases_renewed", "leases_revoked", "leases_expired"):
            self.stats.setdefault(name, 0)
        # A one-shot transaction (POST /v1/txn) whose puts name a lease comes here first.
        txn.lease_writes = self.txn

    # -- plumbing --------------------------------------------------------------------------

    def _timeout_s(self) -> float:
        return self._config.timing.write_timeout_ms / 1000

    def keyspace(self, name: str | None) -> str:
        """The transactional keyspace a lease lives in (None: the only one there is)."""
        spaces = sorted(ks for ks in self._txn.keyspaces if ks != AUTH_KEYSPACE)
        if name is None:
            if len(spaces) != 1:
                raise BadRequest("name the transactional keyspace of the lease: one of "
                                 f"{', '.join(spaces) or '(none)'}", field="keyspace")
            return spaces[0]
        if name not in spaces:
            raise BadRequest(f"keyspace {name!r} is not a transactional keyspace; leases need "
                             f"one of {', '.join(spaces) or '(none)'}", field="keyspace")
        return name

    async def _run(self, request: TxnRequest, started_s: float) -> dict[str, Any]:
        remaining_s = started_s + self._timeout_s() - self._clock.monotonic_s()
        return await self._txn.execute(Op("txn", request.keyspace, request),
                                       started_s=self._clock.monotonic_s(),
                                       timeout_s=max(0.001, remaining_s))

    async def _read(self, keyspace: str, keys: Sequence[bytes], started_s: float) -> Current:
        """Each key's (value, version) in one serializable read (across ranges if need be)."""
        answer = await self._run(TxnRequest(keyspace, None, tuple(dict.fromkeys(keys)), (), ()),
                                 started_s)
        return {bytes(r["key"]): (None if r["value"] is None else bytes(r["value"]), r["version"])
                for r in answer.get("reads") or ()}

    async def _record(self, lease: L.LeaseId, started_s: float
                      ) -> tuple[L.LeaseRecord, int]:
        """The lease's record and its version, or LeaseExpired when it is gone."""
        value, version = (await self._read(lease.keyspace, [L.record_key(lease)],
                                           started_s)).get(L.record_key(lease), (None, None))
        if value is None or version is None:
            raise L.expired_error(lease)
        return L.decode_record(value), version

    async def _backoff(self, attempt: int) -> None:
        await self._clock.sleep(self._rng.uniform(0, min(MAX_BACKOFF_S, BACKOFF_S * attempt)))

    @staticmethod
    def _on(exc: ConditionFailed, key: bytes) -> bool:
        return exc.details.get("key") == key.decode(errors="replace")

    # -- operations ------------------------------------------------------------------------

    async def grant(self, keyspace: str, ttl_s: int, started_s: float) -> dict[str, Any]:
        """A new lease of ``ttl_s``, granted with the other grants this node has waiting
        in ``keyspace`` (``_grant_batches``)."""
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._grants.setdefault(keyspace, []).append(_Grant(ttl_s, started_s, future))
        if keyspace not in self._granting:
            self._granting[keyspace] = asyncio.get_running_loop().create_task(
                self._grant_batches(keyspace))
        return await future

    async def _grant_batches(self, keyspace: str) -> None:
        """Grant what waits, a batch per transaction, until nothing does. A batch that
        loses the directory's race goes again with the grants that arrived since; a
        grant past its deadline is answered ``conflict`` (it was never granted)."""
        attempt = 0
        batch: list[_Grant] = []
        try:
            while True:  # bounded: every grant leaves by its deadline, and none come after
                batch = self._take_grants(keyspace, batch)
                if not batch:
                    return
                try:
                    await self._grant_batch(keyspace, batch)
                except ConditionFailed:
                    attempt += 1
                    await self._backoff(attempt)  # another node's grants changed the directory
                    continue
                except RingKVError as exc:
                    for grant in batch:
                        if not grant.future.done():
                            grant.future.set_exception(exc)
                attempt = 0
                batch = []
        except BaseException as exc:  # cancelled (the node stops), or a bug: none left hanging
            for grant in [*batch, *self._grants.pop(keyspace, [])]:
                if not grant.future.done():
                    grant.future.set_exception(RingKVError(f"the lease grant failed: {exc!r}"))
            raise
        finally:
            self._granting.pop(keyspace, None)

    def _take_grants(self, keyspace: str, batch: list[_Grant]) -> list[_Grant]:
        """The next batch: ``batch`` (it lost a race) and what waits, less the grants whose
        caller went away or whose deadline passed, at most MAX_GRANT_BATCH."""
        waiting = self._grants.get(keyspace, [])
        now_s = self._clock.monotonic_s()
        out: list[_Grant] = []
        for grant in [*batch, *waiting]:
            if grant.future.done():
                continue  # its request was cancelled
            if now_s >= grant.started_s + self._timeout_s():
                grant.future.set_exception(Aborted(
                    f"a lease grant in {keyspace!r} kept losing races for the lease directory "
                    f"to other nodes' grants for {self._timeout_s():g} s; try again",
                    reason="conflict"))
                continue
            out.append(grant)
        self._grants[keyspace] = out[MAX_GRANT_BATCH:]
        if not self._grants[keyspace]:
            del self._grants[keyspace]
        return out[:MAX_GRANT_BATCH]

    async def _grant_batch(self, keyspace: str, batch: list[_Grant]) -> None:
        """One transaction creating a lease for each of ``batch`` (as many as the keyspace
        has room for; the rest are refused ``max_leases``), and answer them."""
        started_s = min(grant.started_s for grant in batch)  # the tightest deadline
        found = await self._read(keyspace, [L.DIRECTORY_KEY], started_s)
        directory = L.decode_directory(*found.get(L.DIRECTORY_KEY, (None, None)))
        room = L.grant_room(directory, self._config.txn.max_leases)
        granted, refused = batch[:room], batch[room:]
        if granted:
            leases = [(L.new_id(keyspace, self._rng), grant.ttl_s) for grant in granted]
            answer = await self._run(L.grants_txn(keyspace, leases, directory,
                                                  self._config.txn.max_leases), started_s)
            self.stats["leases_granted"] += len(granted)
            for grant, (lease, ttl_s) in zip(granted, leases):
                if not grant.future.done():
                    grant.future.set_result({"ok": True, "id": str(lease), "ttl": ttl_s,
                                             "version": answer["commit_ts"]})
        for grant in refused:
            if not grant.future.done():
                limit = self._config.txn.max_leases
                grant.future.set_exception(Overloaded(
                    f"keyspace {keyspace!r} holds {limit} leases already (txn.max_leases)",
                    reason="max_leases", limit=limit))

    async def keepalive(self, lease: L.LeaseId, started_s: float) -> dict[str, Any]:
        for attempt in range(MAX_ATTEMPTS):
            record, version = await self._record(lease, started_s)
            if L.is_expired(record, version, self._txn.tt_now()):
                raise L.expired_error(lease)  # the sweeper deletes it, and its keys
            try:
                answer = await self._run(L.keepalive_txn(lease.keyspace, lease, record, version),
                                         started_s)
            except ConditionFailed:
                await self._backoff(attempt)  # renewed, attached to, or expired meanwhile
                continue
            self.stats["leases_renewed"] += 1
            commit_ts = int(answer["commit_ts"])
            renewed = L.renewed(record, version)
            return {"ok": True, "id": str(lease), "ttl": record.ttl_s, "version": commit_ts,
                    "remaining_ms": L.remaining_ms(renewed, commit_ts, self._txn.tt_now())}
        raise Aborted(f"a keepalive of lease {lease} lost {MAX_ATTEMPTS} races; try again",
                      reason="conflict", lease=str(lease))

    async def put(self, keyspace: str, key: bytes, value: bytes, lease: L.LeaseId,
                  conditions: Sequence[Condition], started_s: float) -> dict[str, Any]:
        """Put ``key`` attached to ``lease`` (the key and the lease record in one transaction)."""
        if lease.keyspace != keyspace:
            raise BadRequest(f"lease {lease} lives in keyspace {lease.keyspace!r}, not "
                             f"{keyspace!r}", field="lease")
        for attempt in range(MAX_ATTEMPTS):
            record, version = await self._record(lease, started_s)
            if L.is_expired(record, version, self._txn.tt_now()):
                raise L.expired_error(lease)
            if key not in record.keys and len(record.keys) >= self._config.txn.max_keys_per_lease:
                current = await self._read(keyspace, sorted(record.keys), started_s)
                record = L.pruned(record, version, current)  # detached keys free their places
            request = L.attach_txn(keyspace, lease, record, version, key, value, conditions,
                                   self._config.txn.max_keys_per_lease)
            try:
                return await self._run(request, started_s)
            except ConditionFailed as exc:
                if not self._on(exc, L.record_key(lease)):
                    raise  # the caller's own condition
                await self._backoff(attempt)
        raise Aborted(f"a put attached to lease {lease} lost {MAX_ATTEMPTS} races; try again",
                      reason="conflict", lease=str(lease))

    async def txn(self, request: TxnRequest, started_s: float, timeout_s: float
                  ) -> dict[str, Any]:
        """A one-shot transaction whose puts name leases (``Write.lease``): each lease's
        record is read, and the transaction runs with the records' conditions and
        writes added (``leases.leased_txn``): the keys are attached as a single put
        attaches its key, in the caller's transaction, at its commit timestamp."""
        deadline_s = started_s + timeout_s
        field_of: dict[str, str] = {}
        for i, write in enumerate(request.writes):
            if write.lease is not None:
                field_of.setdefault(write.lease, f"writes[{i}].lease")
        ids = {text: L.parse_id(text, field=where) for text, where in field_of.items()}
        max_keys = self._config.txn.max_keys_per_lease
        rkeys = {text: L.record_key(lease) for text, lease in ids.items()}
        for attempt in range(MAX_ATTEMPTS):
            now = self._txn.tt_now()
            # The first plan is from this node's own copy of the records when it has them
            # all alive: the transaction is conditioned on their versions, so a stale copy
            # only fails and is planned again from a serializable read (which alone may
            # refuse a lease as gone). One read transaction less per call, most times.
            found = self._local(request.keyspace, rkeys.values(), now) if attempt == 0 else None
            if found is None:
                found = await self._read(request.keyspace, sorted(rkeys.values()), started_s)
            records: dict[str, tuple[L.LeaseRecord, int]] = {}
            for text, rkey in rkeys.items():
                value, version = found.get(rkey, (None, None))
                record = None if value is None else L.decode_record(value)
                if record is None or version is None or L.is_expired(record, version, now):
                    error = L.expired_error(ids[text])
                    error.details["field"] = field_of[text]
                    raise error
                adding = {w.key for w in request.writes if w.lease == text} - set(record.keys)
                if len(record.keys) + len(adding) > max_keys:
                    current = await self._read(request.keyspace, sorted(record.keys), started_s)
                    record = L.pruned(record, version, current)  # detached keys free places
                records[text] = (record, version)
            plan = L.leased_txn(request, records, max_keys)
            remaining_s = deadline_s - self._clock.monotonic_s()
            try:
                return await self._txn.execute(Op("txn", plan.keyspace, plan),
                                               started_s=self._clock.monotonic_s(),
                                               timeout_s=max(0.001, remaining_s))
            except ConditionFailed as exc:
                if not any(self._on(exc, rkey) for rkey in rkeys.values()):
                    raise  # the caller's own condition
                await self._backoff(attempt)  # renewed or attached to meanwhile: read again
        raise Aborted(f"a transaction attaching keys to leases lost {MAX_ATTEMPTS} races; "
                      "try again", reason="conflict")

    def _local(self, keyspace: str, rkeys: Iterable[bytes], now: TTInterval) -> Current | None:
        """Lease records as this node has applied them (None: one is missing or looks
        expired here, which only a serializable read may decide)."""
        found: Current = {}
        for rkey in rkeys:
            got = self._txn.mvcc.latest_version(keyspace, rkey)
            if got is None or got.value is None:
                return None
            if L.is_expired(L.decode_record(got.value), got.commit_ts_us, now):
                return None
            found[rkey] = (got.value, got.commit_ts_us)
        return found

    async def _attached(self, lease: L.LeaseId, started_s: float
                        ) -> tuple[L.LeaseRecord, int, dict[bytes, int]]:
        """The record, its version and its still-attached keys, read at one cut."""
        for _ in range(MAX_ATTEMPTS):
            record, version = await self._record(lease, started_s)
            rkey = L.record_key(lease)
            current = await self._read(lease.keyspace, [rkey, *sorted(record.keys)], started_s)
            value, now_version = current.get(rkey, (None, None))
            if value is None:
                raise L.expired_error(lease)
            if now_version != version:
                continue  # renewed or attached to between the reads: read again
            return record, version, L.still_attached(record, version, current)
        raise Aborted(f"lease {lease} kept changing while it was read; try again",
                      reason="conflict", lease=str(lease))

    async def show(self, lease: L.LeaseId, started_s: float) -> dict[str, Any]:
        record, version, keys = await self._attached(lease, started_s)
        now = self._txn.tt_now()
        return {"id": str(lease), "ttl": record.ttl_s, "version": version,
                "expires_at": L.expires_at_us(record, version),
                "remaining_ms": L.remaining_ms(record, version, now),
                "expired": L.is_expired(record, version, now),
                "keys": [k.decode(errors="replace") for k in keys]}

    async def _expire(self, lease: L.LeaseId, started_s: float, *,
                      only_expired: bool) -> dict[str, Any] | None:
        """Delete the record and its attached keys in one transaction (None: the lease
        was renewed meanwhile, or has not expired, when ``only_expired``)."""
        for attempt in range(MAX_ATTEMPTS):
            record, version, keys = await self._attached(lease, started_s)
            if only_expired and not L.is_expired(record, version, self._txn.tt_now()):
                return None
            try:
                answer = await self._run(L.expiry_txn(lease.keyspace, lease, version, keys),
                                         started_s)
            except ConditionFailed as exc:
                if only_expired and self._on(exc, L.record_key(lease)):
                    return None  # a keepalive committed first: the lease lives on
                await self._backoff(attempt)  # a key was overwritten since: plan again
                continue
            return {"id": str(lease), "version": answer["commit_ts"],
                    "deleted": [k.decode(errors="replace") for k in keys]}
        raise Aborted(f"deleting lease {lease} lost {MAX_ATTEMPTS} races; try again",
                      reason="conflict", lease=str(lease))

    async def revoke(self, lease: L.LeaseId, started_s: float) -> dict[str, Any]:
        done = await self._expire(lease, started_s, only_expired=False)
        assert done is not None
        self.stats["leases_revoked"] += 1
        return {"ok": True, "revoked": True, **done}

    # -- the sweeper -----------------------------------------------------------------------

    async def sweep(self, keyspace: str) -> int:
        """Expire every lease of ``keyspace`` that has certainly expired, if this node
        leads the directory's range; prune the directory. How many it expired."""
        if not self._txn.leads(keyspace, L.DIRECTORY_KEY):
            return 0
        # A local look first (the leader has applied the directory's last write, or
        # will within a sweep): a keyspace that never had a lease costs no transaction.
        local = self._txn.mvcc.latest_version(keyspace, L.DIRECTORY_KEY)
        if local is None or local.value is None or not L.decode_directory(
                local.value, local.commit_ts_us).tags:
            return 0
        started_s = self._clock.monotonic_s()
        found = await self._read(keyspace, [L.DIRECTORY_KEY], started_s)
        directory = L.decode_directory(*found.get(L.DIRECTORY_KEY, (None, None)))
        if not directory.tags:
            return 0
        ids = [L.LeaseId(keyspace, tag) for tag in directory.tags]
        records = await self._read(keyspace, [L.record_key(i) for i in ids], started_s)
        now = self._txn.tt_now()
        gone: list[str] = []
        expired = 0
        for lease in ids:
            value, version = records.get(L.record_key(lease), (None, None))
            if value is None or version is None:
                gone.append(lease.tag)
                continue
            if not L.is_expired(L.decode_record(value), version, now):
                continue
            try:
                done = await self._expire(lease, self._clock.monotonic_s(), only_expired=True)
            except RingKVError as exc:
                if exc.code == "lease_expired":
                    gone.append(lease.tag)
                else:
                    log.info("lease %s: expiry failed, next sweep retries: %s", lease, exc)
                continue
            if done is not None:
                expired += 1
                self.stats["leases_expired"] += 1
                gone.append(lease.tag)
                log.info("lease %s expired: deleted %d keys at %s", lease, len(done["deleted"]),
                         done["version"])
        prune = L.prune_txn(keyspace, directory, gone)
        if prune is not None:
            try:
                await self._run(prune, self._clock.monotonic_s())
            except ConditionFailed:
                pass  # a grant changed the directory: the next sweep prunes
        return expired

    def start(self) -> None:
        spaces = [ks for ks in self._txn.keyspaces if ks != AUTH_KEYSPACE]
        if spaces and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(spaces))

    async def stop(self) -> None:
        tasks = [*self._granting.values(), *([self._task] if self._task else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._task = None

    async def _loop(self, keyspaces: Sequence[str]) -> None:
        interval_s = self._config.txn.lease_sweep_ms / 1000
        while True:  # until stop(); each sweep is bounded by its transactions' deadlines
            await self._clock.sleep(interval_s)
            for keyspace in keyspaces:
                try:
                    await self.sweep(keyspace)
                except RingKVError as exc:  # no leader yet, a peer down: next sweep
                    log.debug("lease sweep of %s: %s", keyspace, exc)
                except Exception:  # a bug must not end the sweeps for good
                    log.exception("lease sweep of %s failed", keyspace)


def lease_of(body: Mapping[str, Any]) -> L.LeaseId | None:
    """The ``lease`` field of a put's body (None: not given)."""
    raw = body.get("lease")
    return None if raw is None else L.parse_id(raw)
