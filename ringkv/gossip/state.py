"""Endpoint state, merge rules and the gossip messages (pure).

This is Cassandra's gossip data model (``EndpointState``, ``HeartBeatState``,
``VersionedValue``) and its three-message exchange (``GossipDigestSyn``,
``GossipDigestAck``, ``GossipDigestAck2``); see also Dynamo §4.8.1
(gossip-based membership).

Model
-----
Every node owns one ``EndpointState``: a ``HeartbeatState(generation,
version)`` plus application states ``key -> VersionedValue(value, version)``.
The generation changes only when the node restarts (the shell uses e.g. the
wall-clock second of start-up), so a higher generation means "this is a newer
incarnation; forget the old one". Inside one generation, every change the node
makes to its own state (heartbeat tick or app state update) takes the next
number from ONE per-node counter, so ``max_version`` of a state summarises it:
two copies of a node's state with the same (generation, max_version) are
equal. Nodes only ever change their own state; everyone else copies.

Exchange (node A gossips to B)
------------------------------
1. A -> B ``Syn(cluster, digests)``: one ``GossipDigest(node_id, generation,
   max_version)`` per endpoint A knows.
2. B compares each digest with its own copy (``examine_digests``) and answers
   ``Ack(digests_requested, states)``: the digests it wants newer state for
   (``max_version`` = what B already has) and the states where B is ahead.
3. A merges ``states`` and answers ``Ack2(states)`` with its state newer than
   each requested digest (``states_for_requests``). B merges those.

Wire format
-----------
``to_wire()`` gives plain msgpack-able data (str, int, list, dict with str
keys); ``from_wire()`` / ``decode_message()`` validate it completely and raise
only ``ProtocolError``. Layout (``t`` tags the message type)::

    {"t": "syn",  "cluster": str, "digests": [[node_id, generation, max_version], ...]}
    {"t": "ack",  "digests": [...], "states": {node_id: STATE}}
    {"t": "ack2", "states": {node_id: STATE}}
    STATE = [generation, heartbeat_version, {key: [value, version]}]

Unknown top-level fields are ignored (room for later additions). Values of the
well-known keys are checked for syntax (``validate_app_state``); other keys
may hold any bounded string. All objects here are immutable by convention:
functions return new states and never modify their arguments.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Union

from ringkv.address import parse_address  # re-exported: gossip values are addresses
from ringkv.errors import ProtocolError

__all__ = [
    "STATUS",
    "TOKENS",
    "DC",
    "RACK",
    "INTERNODE_ADDR",
    "CLIENT_ADDR",
    "LOAD",
    "SCHEMA",
    "REPLACES",
    "REMOVING",
    "BOOT",
    "NORMAL",
    "LEAVING",
    "LEFT",
    "STATUSES",
    "MAX_ENDPOINTS_PER_MESSAGE",
    "MAX_APP_STATES",
    "MAX_NODE_ID_LEN",
    "MAX_KEY_LEN",
    "MAX_VALUE_LEN",
    "MAX_CLUSTER_LEN",
    "MAX_INT",
    "HeartbeatState",
    "VersionedValue",
    "EndpointState",
    "GossipDigest",
    "Syn",
    "Ack",
    "Ack2",
    "GossipMessage",
    "decode_message",
    "merge",
    "examine_digests",
    "state_newer_than",
    "states_for_requests",
    "digest_of",
    "is_valid_node_id",
    "validate_app_state",
    "parse_tokens",
    "format_tokens",
    "parse_address",
]

# --- application-state keys -------------------------------------------------
STATUS = "STATUS"  # one of STATUSES
TOKENS = "TOKENS"  # comma-separated signed 64-bit ints ("" = none yet); see format_tokens
DC = "DC"
RACK = "RACK"
INTERNODE_ADDR = "INTERNODE_ADDR"  # "host:port" where the node listens for internode traffic
CLIENT_ADDR = "CLIENT_ADDR"  # "host:port" of the client (HTTP) API
LOAD = "LOAD"  # bytes of data on disk, decimal
SCHEMA = "SCHEMA"  # schema version string
REPLACES = "REPLACES"  # node id of the dead node this one takes the place of (replace)
# The dead node this one is removing (removenode), "" when none: while it is set
# and this node lives, a removal runs, and no other topology change may start.
REMOVING = "REMOVING"

# --- STATUS values -----------------------------------------------------------
BOOT = "BOOT"
NORMAL = "NORMAL"
LEAVING = "LEAVING"
LEFT = "LEFT"
STATUSES = frozenset({BOOT, NORMAL, LEAVING, LEFT})

# --- bounds (a peer may send anything; nothing it sends may grow unbounded) ---
MAX_ENDPOINTS_PER_MESSAGE = 1024  # digests per Syn/Ack, states per Ack/Ack2
MAX_APP_STATES = 64  # application states per endpoint
MAX_NODE_ID_LEN = 128
MAX_KEY_LEN = 64
MAX_VALUE_LEN = 64 * 1024  # 256 tokens of 20 digits take ~5 KiB
MAX_CLUSTER_LEN = 256
MAX_INT = 2**63 - 1  # generations and versions fit msgpack's int64

_MIN_TOKEN = -(2**63)
_MAX_TOKEN = 2**63 - 1
_TOKENS_RE = re.compile(r"-?[0-9]{1,20}(?:,-?[0-9]{1,20})*")
_LOAD_RE = re.compile(r"[0-9]{1,20}")


# --- value helpers -------------------------------------------------------------


def _is_name(text: object, max_len: int) -> bool:
    # isprintable() rejects every whitespace character but the ASCII space, so
    # that is the one left to check (cheaper than testing each character).
    return (
        isinstance(text, str)
        and 0 < len(text) <= max_len
        and text.isprintable()
        and " " not in text
    )


def is_valid_node_id(node_id: object) -> bool:
    """A node id is 1..MAX_NODE_ID_LEN printable characters without whitespace."""
    return _is_name(node_id, MAX_NODE_ID_LEN)


def parse_tokens(value: str) -> list[int]:
    """Parse a TOKENS value ("" means no tokens). Raises ValueError if malformed."""
    if value == "":
        return []
    if not isinstance(value, str) or not _TOKENS_RE.fullmatch(value):
        raise ValueError("TOKENS must be comma-separated integers")
    tokens = [int(part) for part in value.split(",")]
    for token in tokens:
        if not _MIN_TOKEN <= token <= _MAX_TOKEN:
            raise ValueError(f"token {token} is outside the signed 64-bit range")
    return tokens


def format_tokens(tokens: Iterable[int]) -> str:
    """The TOKENS value for ``tokens`` (inverse of parse_tokens)."""
    return ",".join(str(int(token)) for token in tokens)


def validate_app_state(key: str, value: str) -> None:
    """Check one application state. Raises ValueError naming what is wrong.

    Keys: 1..MAX_KEY_LEN printable characters without whitespace. Values: str
    of at most MAX_VALUE_LEN characters; the well-known keys must also parse
    (STATUS in STATUSES, TOKENS via parse_tokens, addresses via parse_address,
    LOAD a decimal integer).
    """
    if not _is_name(key, MAX_KEY_LEN):
        raise ValueError(
            f"application-state key must be 1..{MAX_KEY_LEN} printable characters "
            f"without whitespace, got {key!r:.80}"
        )
    if not isinstance(value, str):
        raise ValueError(f"value of {key} must be a string, got {type(value).__name__}")
    if len(value) > MAX_VALUE_LEN:
        raise ValueError(f"value of {key} is {len(value)} characters; the limit is {MAX_VALUE_LEN}")
    if key == STATUS:
        if value not in STATUSES:
            raise ValueError(f"STATUS must be one of {sorted(STATUSES)}, got {value!r:.80}")
    elif key == TOKENS:
        parse_tokens(value)
    elif key in (INTERNODE_ADDR, CLIENT_ADDR):
        try:
            parse_address(value)
        except ValueError as exc:
            raise ValueError(f"{key}: {exc}") from None
    elif key == REPLACES:
        if not is_valid_node_id(value):
            raise ValueError(f"REPLACES must be a node id, got {value!r:.80}")
    elif key == REMOVING:
        if value and not is_valid_node_id(value):
            raise ValueError(f"REMOVING must be a node id or empty, got {value!r:.80}")
    elif key == LOAD:
        if not _LOAD_RE.fullmatch(value):
            raise ValueError(f"LOAD must be a non-negative decimal integer, got {value!r:.80}")


# --- the data model -------------------------------------------------------------


@dataclass(frozen=True)
class HeartbeatState:
    generation: int
    version: int


@dataclass(frozen=True)
class VersionedValue:
    value: str
    version: int


@dataclass(frozen=True)
class EndpointState:
    """One node's gossiped state. Treat ``app`` as read-only."""

    heartbeat: HeartbeatState
    app: dict[str, VersionedValue]

    @property
    def generation(self) -> int:
        return self.heartbeat.generation

    @property
    def max_version(self) -> int:
        """Highest version in this state (heartbeat and app states share one counter)."""
        versions = [vv.version for vv in self.app.values()]
        return max([self.heartbeat.version, *versions])

    def get(self, key: str) -> str | None:
        """The value of application state ``key``, or None."""
        vv = self.app.get(key)
        return None if vv is None else vv.value


@dataclass(frozen=True)
class GossipDigest:
    node_id: str
    generation: int
    max_version: int


def digest_of(node_id: str, state: EndpointState) -> GossipDigest:
    return GossipDigest(node_id, state.generation, state.max_version)


# --- merge and digest comparison -------------------------------------------------


def merge(
    local: EndpointState | None, remote: EndpointState
) -> tuple[EndpointState, frozenset[str]]:
    """Fold a received copy of a node's state into ours (Cassandra applyStateLocally).

    Returns the new state and the application keys whose value was taken from
    ``remote``.

    * no local state: take ``remote``; every key counts as changed.
    * higher remote generation: the node restarted; ``remote`` replaces the
      whole state and every remote key counts as changed.
    * lower remote generation: stale news; ``local`` is kept, nothing changed.
    * same generation: per entry, the higher version wins (heartbeat and each
      app key separately); keys only ``remote`` has are added. On a version
      tie ``local`` is kept.

    New keys beyond MAX_APP_STATES per endpoint are dropped (in key order), so
    a merged state always fits on the wire.
    """
    if local is None or remote.generation > local.generation:
        app = dict(remote.app)
        if len(app) > MAX_APP_STATES:
            app = {key: app[key] for key in sorted(app)[:MAX_APP_STATES]}
        return EndpointState(remote.heartbeat, app), frozenset(app)
    if remote.generation < local.generation:
        return local, frozenset()
    heartbeat = local.heartbeat
    if remote.heartbeat.version > heartbeat.version:
        heartbeat = remote.heartbeat
    app = dict(local.app)
    changed = []
    for key in sorted(remote.app):
        theirs = remote.app[key]
        ours = app.get(key)
        if ours is None:
            if len(app) >= MAX_APP_STATES:
                continue
        elif theirs.version <= ours.version:
            continue
        app[key] = theirs
        changed.append(key)
    if heartbeat is local.heartbeat and not changed:
        return local, frozenset()
    return EndpointState(heartbeat, app), frozenset(changed)


def state_newer_than(state: EndpointState, generation: int, version: int) -> EndpointState | None:
    """The part of ``state`` a peer lacks if it holds (generation, version).

    Cassandra's getStateForVersionBiggerThan.

    Same generation: the heartbeat (always, as the carrier of the generation)
    plus the app states with a version above ``version``; None if nothing is
    newer. Different generation: the whole state, because a partial state of
    a new generation would replace the peer's copy and lose the older keys.
    """
    if state.generation != generation:
        return state
    app = {key: vv for key, vv in state.app.items() if vv.version > version}
    if not app and state.heartbeat.version <= version:
        return None
    return EndpointState(state.heartbeat, app)


def examine_digests(
    local_states: Mapping[str, EndpointState], digests: Iterable[GossipDigest]
) -> tuple[list[GossipDigest], dict[str, EndpointState]]:
    """Compare a Syn's digests with our states (Cassandra Gossiper.examineGossiper).

    Returns ``(to_request, to_send)``:

    * unknown node, or higher remote generation: request everything
      (``GossipDigest(node, remote_generation, 0)``);
    * same generation, remote ahead: request what is above our max version;
    * same generation, we are ahead: send our entries above the remote max;
    * lower remote generation: send our whole state;
    * equal: nothing.
    """
    to_request: list[GossipDigest] = []
    to_send: dict[str, EndpointState] = {}
    for digest in digests:
        local = local_states.get(digest.node_id)
        if local is None or digest.generation > local.generation:
            to_request.append(GossipDigest(digest.node_id, digest.generation, 0))
            continue
        if digest.generation < local.generation:
            to_send[digest.node_id] = local
            continue
        local_max = local.max_version
        if digest.max_version > local_max:
            to_request.append(GossipDigest(digest.node_id, digest.generation, local_max))
        elif digest.max_version < local_max:
            delta = state_newer_than(local, digest.generation, digest.max_version)
            if delta is not None:
                to_send[digest.node_id] = delta
    return to_request, to_send


def states_for_requests(
    local_states: Mapping[str, EndpointState], requested: Iterable[GossipDigest]
) -> dict[str, EndpointState]:
    """What to send for a list of requested digests (the Ack -> Ack2 step)."""
    out: dict[str, EndpointState] = {}
    for digest in requested:
        local = local_states.get(digest.node_id)
        if local is None:
            continue
        delta = state_newer_than(local, digest.generation, digest.max_version)
        if delta is not None:
            out[digest.node_id] = delta
    return out


# --- wire validation helpers --------------------------------------------------------


def _fail(message: str) -> ProtocolError:
    return ProtocolError(f"malformed gossip message: {message}")


def _int(obj: object, what: str) -> int:
    if isinstance(obj, bool) or not isinstance(obj, int):
        raise _fail(f"{what} must be an integer, got {type(obj).__name__}")
    if not 0 <= obj <= MAX_INT:
        raise _fail(f"{what} must be in 0..{MAX_INT}")
    return obj


def _seq(obj: object, what: str, max_len: int) -> list[Any] | tuple[Any, ...]:
    if not isinstance(obj, (list, tuple)):
        raise _fail(f"{what} must be a list, got {type(obj).__name__}")
    if len(obj) > max_len:
        raise _fail(f"{what} has {len(obj)} entries; the limit is {max_len}")
    return obj


def _map(obj: object, what: str, max_len: int) -> dict[Any, Any]:
    if not isinstance(obj, dict):
        raise _fail(f"{what} must be a map, got {type(obj).__name__}")
    if len(obj) > max_len:
        raise _fail(f"{what} has {len(obj)} entries; the limit is {max_len}")
    return obj


def _node_id(obj: object, what: str) -> str:
    if not is_valid_node_id(obj):
        raise _fail(f"{what} is not a valid node id (1..{MAX_NODE_ID_LEN} printable characters)")
    assert isinstance(obj, str)
    return obj


def _field(obj: dict[Any, Any], name: str, kind: str) -> Any:
    if name not in obj:
        raise _fail(f"{kind} has no {name!r} field")
    return obj[name]


def _check_type(obj: object, tag: str) -> dict[Any, Any]:
    if not isinstance(obj, dict):
        raise _fail(f"expected a map, got {type(obj).__name__}")
    found = obj.get("t")
    if found != tag:
        shown = found if isinstance(found, str) else type(found).__name__
        raise _fail(f"expected message type {tag!r}, got {shown!r:.40}")
    return obj


def _digests_to_wire(digests: Iterable[GossipDigest]) -> list[list[Any]]:
    return [[d.node_id, d.generation, d.max_version] for d in digests]


def _digests_from_wire(obj: object, what: str) -> tuple[GossipDigest, ...]:
    entries = _seq(obj, what, MAX_ENDPOINTS_PER_MESSAGE)
    out: list[GossipDigest] = []
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        where = f"{what}[{i}]"
        triple = _seq(entry, where, 3)
        if len(triple) != 3:
            raise _fail(f"{where} must be [node_id, generation, max_version]")
        node_id = _node_id(triple[0], f"{where} node id")
        if node_id in seen:
            raise _fail(f"{what} lists node {node_id!r} twice")
        seen.add(node_id)
        out.append(
            GossipDigest(
                node_id,
                _int(triple[1], f"{where} generation"),
                _int(triple[2], f"{where} max_version"),
            )
        )
    return tuple(out)


def _state_to_wire(state: EndpointState) -> list[Any]:
    return [
        state.heartbeat.generation,
        state.heartbeat.version,
        {key: [vv.value, vv.version] for key, vv in state.app.items()},
    ]


def _state_from_wire(obj: object, what: str) -> EndpointState:
    triple = _seq(obj, what, 3)
    if len(triple) != 3:
        raise _fail(f"{what} must be [generation, heartbeat_version, app_states]")
    generation = _int(triple[0], f"{what} generation")
    hb_version = _int(triple[1], f"{what} heartbeat version")
    raw_app = _map(triple[2], f"{what} app states", MAX_APP_STATES)
    app: dict[str, VersionedValue] = {}
    for key, entry in raw_app.items():
        if not isinstance(key, str):
            raise _fail(f"{what} has a non-string app-state key")
        pair = _seq(entry, f"{what} app state {key!r:.70}", 2)
        if len(pair) != 2:
            raise _fail(f"{what} app state {key!r:.70} must be [value, version]")
        value, version = pair
        try:
            validate_app_state(key, value)
        except ValueError as exc:
            raise _fail(f"{what}: {exc}") from None
        app[key] = VersionedValue(value, _int(version, f"{what} version of {key}"))
    return EndpointState(HeartbeatState(generation, hb_version), app)


def _states_to_wire(states: Mapping[str, EndpointState]) -> dict[str, list[Any]]:
    return {node_id: _state_to_wire(state) for node_id, state in states.items()}


def _states_from_wire(obj: object, what: str) -> dict[str, EndpointState]:
    raw = _map(obj, what, MAX_ENDPOINTS_PER_MESSAGE)
    out: dict[str, EndpointState] = {}
    for node_id, state in raw.items():
        node_id = _node_id(node_id, f"{what} key")
        out[node_id] = _state_from_wire(state, f"state of {node_id!r}")
    return out


# --- messages ------------------------------------------------------------------------


@dataclass(frozen=True)
class Syn:
    """Gossip round opener: the sender's cluster name and one digest per known endpoint.

    An empty ``digests`` asks for every state the receiver knows (Cassandra's
    shadow round, used to learn the ring before joining).
    """

    cluster: str
    digests: tuple[GossipDigest, ...]

    def to_wire(self) -> dict[str, Any]:
        return {"t": "syn", "cluster": self.cluster, "digests": _digests_to_wire(self.digests)}

    @classmethod
    def from_wire(cls, obj: object) -> Syn:
        msg = _check_type(obj, "syn")
        cluster = _field(msg, "cluster", "syn")
        if not isinstance(cluster, str) or len(cluster) > MAX_CLUSTER_LEN:
            raise _fail(f"syn cluster must be a string of at most {MAX_CLUSTER_LEN} characters")
        return cls(cluster, _digests_from_wire(_field(msg, "digests", "syn"), "syn digests"))


@dataclass(frozen=True)
class Ack:
    """Reply to a Syn: digests the receiver wants newer state for, and states where it is ahead."""

    digests_requested: tuple[GossipDigest, ...]
    states: dict[str, EndpointState]

    def to_wire(self) -> dict[str, Any]:
        return {
            "t": "ack",
            "digests": _digests_to_wire(self.digests_requested),
            "states": _states_to_wire(self.states),
        }

    @classmethod
    def from_wire(cls, obj: object) -> Ack:
        msg = _check_type(obj, "ack")
        digests = _digests_from_wire(_field(msg, "digests", "ack"), "ack digests")
        return cls(digests, _states_from_wire(_field(msg, "states", "ack"), "ack states"))


@dataclass(frozen=True)
class Ack2:
    """Reply to an Ack: the states it requested."""

    states: dict[str, EndpointState]

    def to_wire(self) -> dict[str, Any]:
        return {"t": "ack2", "states": _states_to_wire(self.states)}

    @classmethod
    def from_wire(cls, obj: object) -> Ack2:
        msg = _check_type(obj, "ack2")
        return cls(_states_from_wire(_field(msg, "states", "ack2"), "ack2 states"))


GossipMessage = Union[Syn, Ack, Ack2]

_BY_TAG: dict[str, type[Syn] | type[Ack] | type[Ack2]] = {"syn": Syn, "ack": Ack, "ack2": Ack2}


def decode_message(obj: object) -> GossipMessage:
    """Decode any gossip message from its wire form. Raises only ProtocolError."""
    if not isinstance(obj, dict):
        raise _fail(f"expected a map, got {type(obj).__name__}")
    tag = obj.get("t")
    cls = _BY_TAG.get(tag) if isinstance(tag, str) else None
    if cls is None:
        shown = tag if isinstance(tag, str) else type(tag).__name__
        raise _fail(f"unknown message type {shown!r:.40}")
    return cls.from_wire(obj)
