"""One exception tree for ringkv.

Every error a client can see has a stable ``code`` and an HTTP status. Each
layer translates the errors below it into these (the HTTP layer maps them to
JSON; the client maps JSON back to the same classes), so a caller never has to
know about plyvel, msgpack or aiohttp exceptions.
"""

from __future__ import annotations

import math
from typing import Any


class RingKVError(Exception):
    """Base of every ringkv error. ``details`` is extra JSON-safe context."""

    code = "internal"
    http_status = 500

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def http_headers(self) -> dict[str, str]:
        """Headers an HTTP answer carrying this error adds (a 401's challenge, a 429's wait)."""
        return {}

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        body.update(self.details)
        return {"error": body}

    @staticmethod
    def from_json(payload: Any, *, http_status: int | None = None) -> RingKVError:
        """Rebuild the typed error from a JSON error body (the inverse of ``to_json``).

        The class comes from ``BY_CODE``; every detail becomes an attribute
        too (``err.required``, ``err.alive``, ...), as the constructors set
        them. An unknown code gives a plain ``RingKVError`` carrying that
        code; a body that is not an error body gives a ``ProtocolError``.
        """
        info = payload.get("error") if isinstance(payload, dict) else None
        if not isinstance(info, dict) or not isinstance(info.get("code"), str):
            return ProtocolError(
                f"expected a ringkv error body, got {str(payload)[:200]!r}", http_status=http_status
            )
        details = {k: v for k, v in info.items() if k not in ("code", "message")}
        cls = BY_CODE.get(info["code"], RingKVError)
        error = cls.__new__(cls)
        RingKVError.__init__(error, str(info.get("message", "")), **details)
        for name, value in details.items():
            if name not in _RESERVED_ATTRIBUTES:
                setattr(error, name, value)
        if cls is RingKVError:
            error.code = info["code"]
        if http_status is not None:
            error.http_status = http_status
        return error


class BadRequest(RingKVError):
    """The request is malformed. ``field`` names what is wrong."""

    code = "bad_request"
    http_status = 400

    def __init__(self, message: str, *, field: str, **details: Any) -> None:
        super().__init__(message, field=field, **details)
        self.field = field


class NotFound(RingKVError):
    code = "not_found"
    http_status = 404


class MethodNotAllowed(RingKVError):
    code = "method_not_allowed"
    http_status = 405


class TooLarge(RingKVError):
    """A key, value, batch or request body exceeds its configured limit."""

    code = "too_large"
    http_status = 413

    def __init__(self, message: str, *, field: str, limit: int, size: int | None = None,
                 **details: Any) -> None:
        super().__init__(message, field=field, limit=limit, size=size, **details)
        self.field = field
        self.limit = limit
        self.size = size


class RequestLineTooLong(TooLarge):
    """The request line (method, path and query) is over the HTTP parser's limit.

    414 URI Too Long (RFC 9110 §15.5.15). The parser stops reading there, so
    ``size`` is unknown; the connection is closed.
    """

    http_status = 414

    def __init__(self, message: str, *, limit: int) -> None:
        super().__init__(message, field="request_line", limit=limit)


class HeaderTooLarge(TooLarge):
    """One request header (name and value) is over its limit; ``header`` names it
    when it is known. 431 Request Header Fields Too Large (RFC 6585 §5)."""

    http_status = 431

    def __init__(self, message: str, *, header: str | None, limit: int,
                 size: int | None = None) -> None:
        super().__init__(message, field="header", limit=limit, size=size, header=header)
        self.header = header


class RequestTimeout(RingKVError):
    """The client did not send its request in time: the head (``field`` "head")
    within ``timeout_s`` of its first byte, or the body (``field`` "body") at
    the minimum rate. 408 Request Timeout (RFC 9110 §15.5.9); the node closes
    the connection."""

    code = "request_timeout"
    http_status = 408

    def __init__(self, message: str, *, field: str, timeout_s: float) -> None:
        super().__init__(message, field=field, timeout_s=timeout_s)
        self.field = field
        self.timeout_s = timeout_s


class Unavailable(RingKVError):
    """Too few replicas are alive to even try the request (nothing was sent)."""

    code = "unavailable"
    http_status = 503

    def __init__(self, message: str, *, consistency: str, required: int, alive: int) -> None:
        super().__init__(message, consistency=consistency, required=required, alive=alive)
        self.consistency = consistency
        self.required = required
        self.alive = alive


class Timeout(RingKVError):
    """The request was sent, but too few replicas answered in time."""

    code = "timeout"
    http_status = 504

    def __init__(
        self, message: str, *, consistency: str, required: int, received: int, write: bool
    ) -> None:
        super().__init__(
            message, consistency=consistency, required=required, received=received, write=write
        )
        self.consistency = consistency
        self.required = required
        self.received = received
        self.write = write


class Overloaded(RingKVError):
    """A bounded queue is full; the caller should back off and retry."""

    code = "overloaded"
    http_status = 503


class ShuttingDown(RingKVError):
    code = "shutting_down"
    http_status = 503


class NotJoined(RingKVError):
    """The node has not joined a cluster yet, so it owns no part of the ring.

    ``reason`` is why (``waiting_for_seeds``: it has no saved ring and none of
    ``seeds`` has answered; ``joining``: it is learning the ring). Serving
    anyway would make it a cluster of one that acknowledges quorum writes alone.
    """

    code = "not_joined"
    http_status = 503

    def __init__(self, message: str, *, reason: str, seeds: list[str]) -> None:
        super().__init__(message, reason=reason, seeds=seeds)
        self.reason = reason
        self.seeds = seeds


class ClockUncertain(RingKVError):
    """This node cannot stand behind a timestamp: its clock uncertainty ε is
    unknown or above the bound, or its clock is too far from the time a
    majority of the cluster's clocks keep (Spanner §3; ``txn/truetime.py``).
    Transactional work is refused until it is back inside the bound.

    ``epsilon_us`` is the current ε (None when it cannot be bounded at all),
    ``max_uncertainty_us`` the bound; the message says which test failed.
    """

    code = "clock_uncertain"
    http_status = 503

    def __init__(
        self, message: str, *, epsilon_us: int | None, max_uncertainty_us: int
    ) -> None:
        super().__init__(message, epsilon_us=epsilon_us, max_uncertainty_us=max_uncertainty_us)
        self.epsilon_us = epsilon_us
        self.max_uncertainty_us = max_uncertainty_us


class ConfigError(RingKVError):
    """A config file or flag is invalid. The message names the file and field."""

    code = "config_error"
    http_status = 500

    def __init__(self, message: str, *, field: str, source: str | None = None) -> None:
        super().__init__(message, field=field, source=source)
        self.field = field
        self.source = source


class StorageError(RingKVError):
    """The local storage engine failed (I/O error, closed database, ...)."""

    code = "storage_error"
    http_status = 500


class CorruptRecord(StorageError):
    """A stored record failed its checksum or format check. It is never returned as data."""

    code = "corrupt_record"


class SnapshotTooOld(RingKVError):
    """A read at a timestamp below the versions garbage collection has kept.

    ``snapshot_ts`` is the timestamp asked for, ``gc_threshold_ts`` the oldest
    one still readable (both in microseconds)."""

    code = "snapshot_too_old"
    http_status = 400


class Compacted(RingKVError):
    """A watch asked for changes after ``from_version``, but garbage collection has
    thinned the history there: versions at or below ``oldest_version`` may be gone,
    so some changes after ``from_version`` can no longer be delivered (etcd's
    "compacted"). ``oldest_version`` is the lowest ``from_version`` still served;
    a watcher that must not miss changes re-reads the keys and watches from there.
    410 Gone."""

    code = "compacted"
    http_status = 410

    def __init__(self, message: str, *, from_version: int, oldest_version: int) -> None:
        super().__init__(message, from_version=from_version, oldest_version=oldest_version)
        self.from_version = from_version
        self.oldest_version = oldest_version


class LeaseExpired(RingKVError):
    """A session lease (``POST /v1/lease``) that expired, was revoked, or never
    existed: its keys are gone (or going) and it cannot be renewed or attached
    to. 404 (etcd: "requested lease not found"); take a new lease."""

    code = "lease_expired"
    http_status = 404

    def __init__(self, message: str, *, lease: str) -> None:
        super().__init__(message, lease=lease)
        self.lease = lease


class ProtocolError(RingKVError):
    """A peer or client sent bytes that do not follow the protocol."""

    code = "protocol_error"
    http_status = 400


class PeerUnreachable(RingKVError):
    """The internode transport cannot reach a peer (refused, handshake failed,
    connection lost, or still inside its reconnect backoff). ``maybe_delivered``
    is true when the connection died after the message was queued for sending,
    so the peer may or may not have acted on it."""

    code = "peer_unreachable"
    http_status = 503

    def __init__(self, message: str, *, node_id: str, maybe_delivered: bool = False) -> None:
        super().__init__(message, node_id=node_id, maybe_delivered=maybe_delivered)
        self.node_id = node_id
        self.maybe_delivered = maybe_delivered


class PeerTimeout(RingKVError):
    """One internode request got no answer from its peer within its own timeout."""

    code = "peer_timeout"
    http_status = 504

    def __init__(self, message: str, *, node_id: str, verb: str, timeout_s: float) -> None:
        super().__init__(message, node_id=node_id, verb=verb, timeout_s=timeout_s)
        self.node_id = node_id
        self.verb = verb
        self.timeout_s = timeout_s


class RemoteError(RingKVError):
    """The handler on a peer raised. ``remote_code``/``remote_message`` are what it sent
    (a ringkv error code, or "internal" for an unexpected exception)."""

    code = "remote_error"
    http_status = 502

    def __init__(
        self,
        message: str,
        *,
        node_id: str,
        verb: str,
        remote_code: str,
        remote_message: str,
        remote_details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(
            message,
            node_id=node_id,
            verb=verb,
            remote_code=remote_code,
            remote_message=remote_message,
            remote_details=remote_details or {},
        )
        self.node_id = node_id
        self.verb = verb
        self.remote_code = remote_code
        self.remote_message = remote_message
        self.remote_details = remote_details or {}


class NoNodeAvailable(RingKVError):
    """Client side: no node gave an answer (every attempt failed to connect or went unanswered).

    ``tried`` lists the node URLs tried and ``reasons`` what went wrong with
    each attempt. ``maybe_applied`` is True when a write reached a node but
    no answer came back, so it may or may not have been applied.
    ``timed_out`` is True when an attempt went unanswered within its timeout
    or the call's deadline ran out (rather than every node refusing).
    """

    code = "no_node_available"
    http_status = 503

    def __init__(
        self, message: str, *, tried: list[str], reasons: list[str], maybe_applied: bool = False,
        timed_out: bool = False,
    ) -> None:
        super().__init__(message, tried=tried, reasons=reasons, maybe_applied=maybe_applied,
                         timed_out=timed_out)
        self.tried = tried
        self.reasons = reasons
        self.maybe_applied = maybe_applied
        self.timed_out = timed_out


class ConditionFailed(RingKVError):
    """A transaction's condition (``"if"``) does not hold; nothing was applied.

    ``key`` names the key, ``field`` the condition, ``current_value`` and
    ``current_version`` what the key holds (None: nothing).
    """

    code = "condition_failed"
    http_status = 409


class Aborted(RingKVError):
    """The transaction did not commit and nothing of it was applied (``reason``:
    ``conflict`` after its retries, ``lost`` or ``superseded`` on a leader change,
    ``in_progress`` when the same id is running)."""

    code = "aborted"
    http_status = 409


class CrossRange(RingKVError):
    """The keys of an operation that must stay in one range fall in several
    (``keys``, by range). One-shot transactions run across ranges (2PC)."""

    code = "cross_range"
    http_status = 400

    def __init__(self, message: str, *, field: str, **details: Any) -> None:
        super().__init__(message, field=field, **details)
        self.field = field


class RangeMoving(RingKVError):
    """The ring gives the range other replicas than the Paxos group persisted for
    it (``range``): it is served again once the group has moved."""

    code = "range_moving"
    http_status = 503


class NoLeader(RingKVError):
    """The range's Paxos group has no leader within the request's deadline (an
    election is running, or too few replicas are up)."""

    code = "no_leader"
    http_status = 503


class RepairRunning(RingKVError):
    """A repair is already running on this node (one at a time per node)."""

    code = "repair_running"
    http_status = 409


class SnapshotRefused(RingKVError):
    """A node snapshot was refused (``reason``): one is already being taken on this
    node (``running``: one at a time per node), or one of that name exists
    (``exists``), or the one to delete is still being taken (``running``)."""

    code = "snapshot_refused"
    http_status = 409

    def __init__(self, message: str, *, reason: str, **details: Any) -> None:
        super().__init__(message, reason=reason, **details)
        self.reason = reason


class ReplicaDown(RingKVError):
    """A repair needs every replica of its ranges, and ``down`` are not alive."""

    code = "replica_down"
    http_status = 503

    def __init__(self, message: str, *, down: list[str], **details: Any) -> None:
        super().__init__(message, down=down, **details)
        self.down = down
class TopologyRefused(RingKVError):
    """A topology change (``decommission``, ``removenode``, ``--replace``) was
    refused (``reason``): the node is not NORMAL, another change is running, a
    node is down, the node named is alive or unknown, or too few nodes would
    remain for the replication factor."""

    code = "topology_refused"
    http_status = 409

    def __init__(self, message: str, *, reason: str, **details: Any) -> None:
        super().__init__(message, reason=reason, **details)
        self.reason = reason


class Unauthenticated(RingKVError):
    """No credentials, or credentials that do not check out (``reason``: missing,
    bad_credentials, bad_token, expired_token, retired_secret (signed with a token
    secret rotated out since), malformed). Send HTTP Basic
    credentials or a bearer token from ``POST /v1/auth/token``."""

    code = "unauthenticated"
    http_status = 401

    def __init__(self, message: str, *, reason: str, **details: Any) -> None:
        super().__init__(message, reason=reason, **details)
        self.reason = reason

    def http_headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Basic realm="ringkv", charset="UTF-8"'}


class Forbidden(RingKVError):
    """The user is known but lacks ``permission`` on ``keyspace`` (None: cluster-wide)."""

    code = "forbidden"
    http_status = 403

    def __init__(self, message: str, *, permission: str, keyspace: str | None,
                 **details: Any) -> None:
        super().__init__(message, permission=permission, keyspace=keyspace, **details)
        self.permission = permission
        self.keyspace = keyspace


class TooManyAttempts(RingKVError):
    """Too many failed logins from this address: no login is checked for
    ``retry_after_s`` (HTTP 429 with Retry-After, RFC 6585 §4)."""

    code = "too_many_attempts"
    http_status = 429

    def __init__(self, message: str, *, retry_after_s: float, **details: Any) -> None:
        super().__init__(message, retry_after_s=retry_after_s, **details)
        self.retry_after_s = retry_after_s

    def http_headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}


_RESERVED_ATTRIBUTES = frozenset({"code", "message", "details", "args", "http_status"})

# Stable code -> class, used by the client to rebuild typed errors from JSON.
BY_CODE: dict[str, type[RingKVError]] = {
    cls.code: cls
    for cls in (
        BadRequest,
        NotFound,
        MethodNotAllowed,
        TooLarge,
        RequestTimeout,
        Unavailable,
        Timeout,
        Overloaded,
        ShuttingDown,
        NotJoined,
        ClockUncertain,
        StorageError,
        CorruptRecord,
        SnapshotTooOld,
        Compacted,
        LeaseExpired,
        ProtocolError,
        PeerUnreachable,
        PeerTimeout,
        RemoteError,
        ConditionFailed,
        Aborted,
        CrossRange,
        RangeMoving,
        NoLeader,
        RepairRunning,
        SnapshotRefused,
        ReplicaDown,
        TopologyRefused,
        Unauthenticated,
        Forbidden,
        TooManyAttempts,
    )
}
