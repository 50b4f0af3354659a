"""Where a call goes: the ring as the client last fetched it, and the order to try nodes in.

The client fetches ``GET /v1/ring``, hashes each key with the server's
partitioner (``ringkv.ring``) and tries a live replica of the key first, so
that the coordinator serves its own copy; other live nodes come next, then
nodes lately unreachable, then seeds that are not in the ring. This module
also holds the time arithmetic of a call: its deadline, each attempt's
timeout and the backoff between retries.

Pure: times come in as ``now`` (monotonic seconds), randomness from a
``random.Random``.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from ringkv.address import format_address, parse_address
from ringkv.client.errors import InvalidArgument, InvalidArgumentType
from ringkv.client.types import NodeView
from ringkv.ring import NodeInfo, TokenRing

# After a connection error a node is tried last for this long (then as usual).
DOWN_COOLDOWN_S = 5.0
# The soonest a failed or forced ring refresh is tried again.
MIN_REFRESH_GAP_S = 1.0
# An attempt with less time left than this before its call's deadline is not made.
MIN_ATTEMPT_S = 0.005
# A lease renewal's attempt gets at most this share of the lease's TTL (less when the
# client's timeout_s is shorter): a silent node (cut off, paused) then leaves time to
# renew through another before the lease lapses. Renewals come every third of the TTL.
RENEWAL_ATTEMPT_SHARE = 0.25


@dataclass(frozen=True)
class Topology:
    """An immutable snapshot of the ring as the client knows it (replaced whole)."""

    ring: TokenRing | None
    urls: Mapping[str, str]
    up: Mapping[str, bool]
    replication: Mapping[str, int]
    # Keyspaces of the transactional tier (their default level is SERIAL).
    serial: frozenset[str] = frozenset()
    # Node URL -> the (host, port) of its native protocol, for nodes that have one.
    native: Mapping[str, tuple[str, int]] = field(default_factory=dict)


NO_TOPOLOGY = Topology(None, {}, {}, {})


def normalise_url(url: str) -> str:
    """A seed as a base URL: ``host:port`` gains ``http://``, a trailing slash goes."""
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) node URL: {url!r}")
    return url


def url_for(address: str, answered_by: str) -> str:
    """The base URL of a ``host:port`` client address from the ring (ValueError if malformed)."""
    host, port = parse_address(address)
    parts = urlsplit(answered_by)
    if host in ("0.0.0.0", "::"):  # a wildcard bind: reach it the way we reached the ring
        host = parts.hostname or "127.0.0.1"
    return f"{parts.scheme}://{format_address(host, port)}"


def native_for(address: str, answered_by: str) -> tuple[str, int]:
    """The (host, port) of a native address from the ring (ValueError if malformed)."""
    host, port = parse_address(address)
    if host in ("0.0.0.0", "::"):  # a wildcard bind: reach it the way we reached the ring
        host = urlsplit(answered_by).hostname or "127.0.0.1"
    return host, port


def parse_ring(body: bytes, answered_by: str) -> Topology:
    """The ``GET /v1/ring`` answer of the node at ``answered_by``, as a ``Topology``."""
    data = json.loads(body)
    tokens: dict[str, list[int]] = {}
    infos: dict[str, NodeInfo] = {}
    urls: dict[str, str] = {}
    up: dict[str, bool] = {}
    native: dict[str, tuple[str, int]] = {}
    for node in data["nodes"]:
        node_id = str(node["node_id"])
        tokens[node_id] = [int(t) for t in node["tokens"]]
        infos[node_id] = NodeInfo(node_id, dc=node.get("dc", "dc1"), rack=node.get("rack", "rack1"))
        if node.get("client_address"):
            urls[node_id] = url_for(str(node["client_address"]), answered_by)
            if node.get("native_address"):
                native[urls[node_id]] = native_for(str(node["native_address"]), answered_by)
        up[node_id] = bool(node.get("up", True))
    replication = {
        str(name): int(ks["replication_factor"])
        for name, ks in (data.get("keyspaces") or {}).items()
    }
    serial = frozenset(
        str(name) for name, ks in (data.get("keyspaces") or {}).items()
        if ks.get("default_consistency") == "SERIAL"
    )
    ring = TokenRing(tokens, infos) if tokens else None
    return Topology(ring, urls, up, replication, serial, native)


def key_text(key: object, field: str = "key") -> str:
    """A key as it goes on the wire: a ``str``, or ``bytes`` that are UTF-8 (keys are
    text to the API). Refused, naming ``field``: another type (``InvalidArgumentType``),
    an empty key, bytes that are not UTF-8, a string that cannot be UTF-8 (a lone
    surrogate) (``InvalidArgument``)."""
    if isinstance(key, (bytes, bytearray, memoryview)):
        try:
            key = bytes(key).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidArgument(f"{field} is bytes that are not UTF-8 ({exc.reason} at byte "
                                  f"{exc.start}); keys are text: decode it, or encode it "
                                  "(e.g. hex or base64) first", field=field) from None
    elif not isinstance(key, str):
        raise InvalidArgumentType(f"{field} must be a str or UTF-8 bytes, not "
                                  f"{type(key).__name__}", field=field)
    if not key:
        raise InvalidArgument(f"{field} must not be empty", field=field)
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgument(f"{field} is not valid UTF-8 (a lone surrogate?)",
                              field=field) from None
    return key


def key_bytes(key: object, field: str = "key") -> bytes:
    """A key as the ring hashes it (its UTF-8 bytes), checked as ``key_text`` does."""
    return key_text(key, field).encode("utf-8")


class Router:
    """The ring as last fetched, the nodes lately unreachable, and when to fetch the ring again."""

    def __init__(
        self, seeds: Sequence[str], *, refresh_interval_s: float, rng: random.Random
    ) -> None:
        self.seeds = list(seeds)
        self.refresh_interval_s = refresh_interval_s
        self.topology = NO_TOPOLOGY
        # True when the ring may be out of date (a node was unreachable, or
        # answered Unavailable): it is then fetched again soon, not on schedule.
        self.stale = True
        self._rng = rng
        self._next_refresh_at = 0.0
        self._last_refresh_attempt = -MIN_REFRESH_GAP_S
        self._down_until: dict[str, float] = {}
        # The last leader a transactional answer named, per (keyspace, replica set):
        # a range is a run of the ring with one replica set, so this names its group.
        self._leaders: dict[tuple[str, tuple[str, ...]], str] = {}

    # ---- the ring -------------------------------------------------------------

    def refresh_due(self, now: float, *, force: bool = False) -> bool:
        """Whether to fetch the ring now: on schedule, or soon once it is stale or forced."""
        if force or self.stale:
            return now >= self._last_refresh_attempt + MIN_REFRESH_GAP_S
        return now >= self._next_refresh_at

    def refresh_started(self, now: float) -> None:
        self._last_refresh_attempt = now

    def adopt(self, topology: Topology, now: float) -> None:
        """Use a freshly fetched ring; the next refresh is due ``refresh_interval_s`` from now."""
        for node_id, up in topology.up.items():
            if up and not self.topology.up.get(node_id, True):
                # The cluster saw it come back: stop avoiding it.
                self.mark_up(topology.urls.get(node_id, ""))
        self.topology = topology
        self.stale = False
        self._next_refresh_at = now + self.refresh_interval_s

    def nodes(self) -> list[NodeView]:
        """The nodes of the ring as last fetched, with their URL and liveness."""
        topology = self.topology
        if topology.ring is None:
            return []
        return [
            NodeView(node_id, topology.urls.get(node_id), topology.up.get(node_id, False))
            for node_id in topology.ring.node_ids
        ]

    def replicas(self, key: str | bytes, keyspace: str) -> list[str]:
        """The node ids that replicate ``key`` per the last fetched ring (empty if unknown)."""
        topology = self.topology
        if topology.ring is None or keyspace not in topology.replication:
            return []
        return list(topology.ring.replicas_for_key(key_bytes(key), topology.replication[keyspace]))

    def transactional(self, keyspace: str) -> bool:
        """Whether the last fetched ring shows ``keyspace`` on the transactional tier."""
        return keyspace in self.topology.serial

    def _range_of(self, keyspace: str, key: bytes) -> tuple[str, tuple[str, ...]] | None:
        topology = self.topology
        rf = topology.replication.get(keyspace)
        if topology.ring is None or rf is None:
            return None
        return keyspace, tuple(sorted(topology.ring.replicas_for_key(key, rf)))

    def note_leader(self, keyspace: str, key: bytes, node_id: str) -> None:
        """A transactional answer named ``node_id`` as the leader of ``key``'s range."""
        where = self._range_of(keyspace, key)
        if where is not None and node_id in where[1]:
            self._leaders[where] = node_id

    def leader(self, keyspace: str, key: bytes) -> str | None:
        """The leader last named for ``key``'s range, if any (a hint: leaders change)."""
        where = self._range_of(keyspace, key)
        return None if where is None else self._leaders.get(where)

    # ---- choosing nodes --------------------------------------------------------

    def mark_down(self, url: str, now: float) -> None:
        """``url`` refused a connection or left an attempt unanswered: try it last for a
        while (any answer from it lifts that), and fetch the ring soon."""
        self._down_until[url] = now + DOWN_COOLDOWN_S
        self.stale = True

    def mark_up(self, url: str) -> None:
        self._down_until.pop(url, None)

    def usable(self, url: str, now: float) -> bool:
        return self._down_until.get(url, 0.0) <= now

    def candidates(
        self, routing: Sequence[tuple[str, bytes]], now: float, affinity: str | None = None,
        prefer: str | None = None,
    ) -> list[str]:
        """Node URLs in the order to try: live replicas, other live nodes, the rest.

        ``routing`` holds the call's (keyspace, key) pairs; a node that
        replicates more of them comes first. Equally good nodes are shuffled
        to spread the load, except for a call with an ``affinity`` (its
        idempotency key): rendezvous hashing then sends every call with that
        key to the same node while the ring stays the same, because only that
        node can recognise a repeat. ``prefer`` (a node id: a range's last
        known leader) goes first among the live nodes, which saves a hop.
        """
        topology = self.topology
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

        def rank(node_id: str) -> tuple[int, bool, int]:
            url = topology.urls[node_id]
            live = topology.up.get(node_id, False) and self.usable(url, now)
            return (0 if live else 1, node_id != prefer, -preference[node_id])

        ordered = sorted((n for n in node_ids if n in topology.urls), key=rank)
        urls = [topology.urls[n] for n in ordered]
        known = set(urls)
        seeds = [seed for seed in self.seeds if seed not in known]
        seeds.sort(key=lambda seed: not self.usable(seed, now))
        return urls + seeds


# -- the time a call may take -----------------------------------------------------


def call_deadline_s(
    now: float, *, timeout_s: float, max_retries: int, backoff_max_s: float
) -> float:
    """When a call started at ``now`` gives up: every attempt in full, plus the longest backoffs."""
    return now + (max_retries + 1) * timeout_s + max_retries * backoff_max_s


def attempt_timeout_s(timeout_s: float, deadline_s: float | None, now: float) -> float | None:
    """``timeout_s``, cut to what is left before ``deadline_s``; None if nothing is."""
    if deadline_s is None:
        return timeout_s
    left_s = deadline_s - now
    return min(timeout_s, left_s) if left_s > MIN_ATTEMPT_S else None


def renewal_bounds_s(ttl_s: float, timeout_s: float, now: float,
                     expires_at_s: float) -> tuple[float, float]:
    """A lease renewal's (attempt timeout, deadline): each attempt at most
    ``RENEWAL_ATTEMPT_SHARE`` of the TTL, the whole renewal over by ``expires_at_s``
    (when the lease surely expires, as the client last heard), but never before one
    attempt (the node's clock bound may leave the lease a little longer)."""
    attempt_s = min(timeout_s, ttl_s * RENEWAL_ATTEMPT_SHARE)
    return attempt_s, max(expires_at_s, now + attempt_s)


def backoff_s(retry: int, *, base_s: float, max_s: float, rng: random.Random) -> float:
    """Exponential backoff with jitter: base * 2**retry, capped at ``max_s``, times 0.5-1."""
    ceiling = min(max_s, base_s * (2 ** retry))
    return ceiling * (0.5 + rng.random() / 2)
