"""The client door: how long a client connection may hold the node, and how many may.

One ``Door`` per node is shared by every client listener (the HTTP API now,
the native protocol next), and each connection has a ``Connection`` state.
Both are plain state machines: a listener's shell tells them what arrived
and when (``now``: seconds on the monotonic clock) and asks what to do. They
touch no socket and read no clock.

Read deadlines, one connection at a time (Apache's mod_reqtimeout, nginx's
client_header_timeout and keepalive_timeout):

  phase     what has arrived                   deadline
  waiting   nothing of a next request          idle_timeout_s after the last answer
                                               (header_timeout_s after the connect, before any request)
  head      part of a request's head           header_timeout_s after its first byte
                                               (after the connect, on a new connection)
  body      a head, and part of its body       body_timeout_s + received / body_min_rate_bytes_per_s
                                               after the head (mod_reqtimeout's MinRate)
  serving   requests not answered yet          none: each request has its own deadline (timing.*)

When a deadline passes the connection is closed; if part of a request had
arrived and nothing older is still unanswered, it is answered 408 first.
A protocol maps itself onto the phases: for HTTP the head is the request
line and headers; for a framed protocol, a frame's length prefix.

The cap: at most ``max_connections`` connections are open. At the cap a new
connection takes the place of the one that has been waiting longest (an
idle keep-alive connection, or one still sending its head, oldest first:
nginx reuses idle keep-alive connections the same way), so an idle or
trickling flood cannot lock out a client that sends its request at once.
Only when every connection is mid-request is the new one refused (503
``overloaded``).

The file plan: the cap must fit in the process's open-files limit beside
the descriptors LevelDB and internode links need, or LevelDB, not the
client, is the one refused ("Too many open files"). ``file_plan`` lowers the
cap to fit and says so.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import NamedTuple

from ringkv.config import LimitsConfig
from ringkv.errors import Overloaded, RequestTimeout, TooLarge

# Why the node closed a client connection (ringkv_client_connections_closed).
HEADER_TIMEOUT = "header_timeout"
BODY_TIMEOUT = "body_timeout"
IDLE_TIMEOUT = "idle_timeout"
EVICTED = "evicted"  # made room for a new connection at the cap
REFUSED = "refused"  # the cap was reached and nothing could make room
TOO_LARGE = "too_large"  # a declared body over max_request_bytes
CLIENT_CLOSED = "client_closed"  # the client went away mid-request
CLOSE_REASONS = (HEADER_TIMEOUT, BODY_TIMEOUT, IDLE_TIMEOUT, EVICTED, REFUSED, TOO_LARGE,
                 CLIENT_CLOSED)


@dataclass(frozen=True)
class DoorLimits:
    header_timeout_s: float
    body_timeout_s: float
    body_min_rate_bytes_per_s: int
    idle_timeout_s: float
    max_connections: int
    max_body_bytes: int

    @classmethod
    def from_config(cls, limits: LimitsConfig, max_connections: int | None = None) -> DoorLimits:
        """The door for ``limits``; ``max_connections`` overrides the configured cap
        (``file_plan`` lowers it to fit the open-files limit)."""
        return cls(
            header_timeout_s=limits.header_timeout_s,
            body_timeout_s=limits.body_timeout_s,
            body_min_rate_bytes_per_s=limits.body_min_rate_bytes_per_s,
            idle_timeout_s=limits.idle_timeout_s,
            max_connections=(limits.max_client_connections if max_connections is None
                             else max_connections),
            max_body_bytes=limits.max_request_bytes,
        )


class Expiry(NamedTuple):
    """A deadline passed: close the connection, for ``reason``, after answering
    ``error`` (None: close without a word)."""

    reason: str
    error: RequestTimeout | None


class Connection:
    """One client connection's read deadlines (see the table above)."""

    __slots__ = ("door", "owner", "fresh", "waiting_since_s", "head_since_s", "body_since_s",
                 "body_bytes", "unanswered", "closed_reason", "is_open")

    def __init__(self, door: Door, owner: object, now: float) -> None:
        self.door = door
        self.owner = owner  # the shell's object for this connection; never touched here
        self.fresh = True  # no request yet: waiting is bounded by the header timeout
        self.waiting_since_s: float = now
        self.head_since_s: float | None = None
        self.body_since_s: float | None = None
        self.body_bytes = 0
        self.unanswered = 0  # requests received whole and not answered yet
        self.closed_reason: str | None = None
        self.is_open = True

    # -- what arrived ------------------------------------------------------

    def head_started(self, now: float) -> None:
        """Bytes of a request head arrived, not all of it. On a new connection the
        head's time counts from the connect, so connecting early buys nothing."""
        if self.head_since_s is None:
            self.head_since_s = self.waiting_since_s if self.fresh else now

    def request_complete(self) -> None:
        """A whole request arrived (its head, and its body if it has one). On every
        request's path, so the door's bookkeeping is inline: it waits no more."""
        self.head_since_s = None
        self.fresh = False
        self.unanswered += 1
        self.door._waiting.pop(self, None)

    def head_complete(self, now: float) -> None:
        """A whole request head arrived, and its body is to follow."""
        self.request_complete()
        self.body_since_s = now
        self.body_bytes = 0

    def body_received(self, total_bytes: int) -> None:
        """The body has ``total_bytes`` so far (each byte buys time at the minimum rate)."""
        self.body_bytes = total_bytes

    def body_complete(self, now: float) -> None:
        self.body_since_s = None
        self._maybe_waiting(now)

    def answered(self, now: float) -> float | None:
        """The oldest unanswered request has its answer. Returns the deadline now
        (``deadline_s``; on every request's path, so the usual case is inline)."""
        if self.unanswered > 0:
            self.unanswered -= 1
        if self.unanswered or self.body_since_s is not None or self.head_since_s is not None:
            return self.deadline_s()
        self.waiting_since_s = now
        if self.is_open:  # at the back of the line of those who may make room
            waiting = self.door._waiting
            waiting[self] = None
            waiting.move_to_end(self)
        limits = self.door.limits
        return now + (limits.header_timeout_s if self.fresh else limits.idle_timeout_s)

    def _maybe_waiting(self, now: float) -> None:
        """If nothing is pending any more, wait for the next request from ``now``."""
        if self.unanswered or self.body_since_s is not None or self.head_since_s is not None:
            return
        self.waiting_since_s = now
        if self.is_open:  # at the back of the line of those who may make room
            waiting = self.door._waiting
            waiting[self] = None
            waiting.move_to_end(self)

    # -- what to do --------------------------------------------------------

    @property
    def in_request(self) -> bool:
        """Part of a request has arrived, or a request is not answered yet."""
        return (self.unanswered > 0 or self.head_since_s is not None
                or self.body_since_s is not None)

    def _body_due_s(self) -> float | None:
        if self.body_since_s is None:
            return None
        limits = self.door.limits
        return (self.body_since_s + limits.body_timeout_s
                + self.body_bytes / limits.body_min_rate_bytes_per_s)

    def _head_due_s(self) -> float | None:
        if self.head_since_s is None:
            return None
        return self.head_since_s + self.door.limits.header_timeout_s

    def _waiting_due_s(self) -> float | None:
        if self.in_request:
            return None
        limits = self.door.limits
        return self.waiting_since_s + (limits.header_timeout_s if self.fresh
                                       else limits.idle_timeout_s)

    def deadline_s(self) -> float | None:
        """When this connection is next due to be closed, unless something arrives.
        (On every request's path: the three dues above, without the calls.)"""
        limits = self.door.limits
        due = None
        if self.body_since_s is not None:
            due = (self.body_since_s + limits.body_timeout_s
                   + self.body_bytes / limits.body_min_rate_bytes_per_s)
        if self.head_since_s is not None:
            head_due = self.head_since_s + limits.header_timeout_s
            return head_due if due is None or head_due < due else due
        if due is None and self.unanswered == 0:
            return self.waiting_since_s + (limits.header_timeout_s if self.fresh
                                           else limits.idle_timeout_s)
        return due

    def expired(self, now: float) -> Expiry | None:
        """The deadline that has passed at ``now``, if one has."""
        if not self.is_open:
            return None
        limits = self.door.limits
        body_due = self._body_due_s()
        if body_due is not None and now >= body_due:
            assert self.body_since_s is not None
            # Answer only the request whose body it is (an HTTP answer may not overtake).
            error = RequestTimeout(
                f"the request body did not arrive in time: {self.body_bytes} bytes in "
                f"{now - self.body_since_s:.1f} s, and a body must arrive within "
                f"{limits.body_timeout_s:g} s plus 1 s per "
                f"{limits.body_min_rate_bytes_per_s} bytes (limits.body_timeout_s, "
                f"limits.body_min_rate_bytes_per_s)",
                field="body", timeout_s=limits.body_timeout_s,
            ) if self.unanswered == 1 else None
            return Expiry(BODY_TIMEOUT, error)
        head_due = self._head_due_s()
        if head_due is not None and now >= head_due:
            error = RequestTimeout(
                f"the request's head (an HTTP request line and headers, or a native "
                f"frame) did not arrive within {limits.header_timeout_s:g} s "
                f"(limits.header_timeout_s)",
                field="head", timeout_s=limits.header_timeout_s,
            ) if self.unanswered == 0 else None
            return Expiry(HEADER_TIMEOUT, error)
        waiting_due = self._waiting_due_s()
        if waiting_due is not None and now >= waiting_due:
            # Nothing of a request arrived: close without a word (nginx does the same).
            return Expiry(HEADER_TIMEOUT if self.fresh else IDLE_TIMEOUT, None)
        return None

    # -- the end -----------------------------------------------------------

    def closing(self, reason: str) -> None:
        """The node closes this connection, for ``reason``: counted, and its place freed now."""
        if self.is_open:
            self.door._close(self, reason)

    def lost(self) -> str | None:
        """The connection is gone. Returns why it counts (``client_closed`` when the
        client left mid-request), or None for a close nobody need count."""
        if not self.is_open:
            return None
        reason = CLIENT_CLOSED if self.in_request else None
        self.door._close(self, reason)
        return reason


class Admission(NamedTuple):
    """A new connection's fate. ``connection``: its state, or None when it is refused
    (answer ``refusal``). ``evict``: a connection to close to make room for it,
    answering ``evict_error`` first when it had begun a request."""

    connection: Connection | None
    refusal: Overloaded | None = None
    evict: Connection | None = None
    evict_error: Overloaded | None = None


class Door:
    """Every open client connection of a node, the cap, and what was closed and why."""

    def __init__(self, limits: DoorLimits) -> None:
        self.limits = limits
        self.open_count = 0
        self.closed = dict.fromkeys(CLOSE_REASONS, 0)
        # Connections that are waiting or sending a head, longest first: who makes room.
        self._waiting: OrderedDict[Connection, None] = OrderedDict()

    def admit(self, owner: object, now: float) -> Admission:
        """A client connected. ``owner`` is the shell's object for it."""
        limit = self.limits.max_connections
        evict = evict_error = None
        if self.open_count >= limit:
            if not self._waiting:
                self.closed[REFUSED] += 1
                return Admission(None, refusal=Overloaded(
                    f"the node has {limit} client connections open, its limit "
                    "(limits.max_client_connections), and all are busy; retry later",
                    limit=limit))
            evict = next(iter(self._waiting))
            if evict.head_since_s is not None:
                evict_error = Overloaded(
                    f"the node has {limit} client connections open, its limit, and closed "
                    "this one, the slowest to send its request, to make room", limit=limit)
            evict.closing(EVICTED)
        connection = Connection(self, owner, now)
        self.open_count += 1
        self._waiting[connection] = None
        return Admission(connection, evict=evict, evict_error=evict_error)

    def body_too_large(self, declared_bytes: int) -> TooLarge | None:
        """The error for a declared body over the limit, answered before any of it is read."""
        limit = self.limits.max_body_bytes
        if declared_bytes <= limit:
            return None
        return TooLarge(f"the request declares a body of {declared_bytes} bytes; the limit "
                        f"is {limit} bytes (limits.max_request_bytes)",
                        field="body", limit=limit, size=declared_bytes)

    def _close(self, connection: Connection, reason: str | None) -> None:
        connection.is_open = False
        connection.closed_reason = reason
        self.open_count -= 1
        self._waiting.pop(connection, None)
        if reason is not None:
            self.closed[reason] += 1


# -- the open-files budget ------------------------------------------------------

LEVELDB_FILES = 1000  # LevelDB's default max_open_files, which ringkv's LevelDB engine keeps
INTERNODE_PEERS = 64  # peers whose links are kept: each one dialled and one accepted
PROCESS_FILES = 64  # stdio, listening sockets, the event loop, logs, hint and identity files
MIN_CLIENT_CONNECTIONS = 16  # below this a node is not worth serving: warn, but serve this many


@dataclass(frozen=True)
class FilePlan:
    """How the process's open-files limit is shared out."""

    limit: int  # the soft RLIMIT_NOFILE after raising it
    reserved: int  # kept for storage, internode links and the process itself
    wanted: int  # limits.max_client_connections
    client_connections: int  # the cap the door enforces

    @property
    def needed(self) -> int:
        return self.wanted + self.reserved

    def warning(self) -> str | None:
        if self.limit >= self.needed:
            return None
        return (f"the open-files limit (RLIMIT_NOFILE) is {self.limit}, below the {self.needed} "
                f"that limits.max_client_connections ({self.wanted}) and {self.reserved} kept "
                f"for LevelDB and internode links need: serving at most "
                f"{self.client_connections} client connections; raise the limit "
                f"(ulimit -n, systemd LimitNOFILE) to {self.needed} or more")


def file_plan(open_files_limit: int, max_client_connections: int, *, leveldb: bool) -> FilePlan:
    """The client-connection cap that fits in ``open_files_limit``."""
    reserved = (LEVELDB_FILES if leveldb else 0) + 2 * INTERNODE_PEERS + PROCESS_FILES
    room = max(open_files_limit - reserved, MIN_CLIENT_CONNECTIONS)
    return FilePlan(open_files_limit, reserved, max_client_connections,
                    min(max_client_connections, room))
