"""The gossiper: membership and liveness as a pure state machine.

Cassandra's Gossiper (after Dynamo §4.8.1, gossip-based membership), without
any I/O. The asyncio shell owns the timer and the sockets and drives it:

* every second (``GOSSIP_INTERVAL_S``)::

      for out in gossiper.tick(clock.monotonic_s(), rng):
          transport.send(out.to_addr, out.msg.to_wire())

* for every gossip message that arrives::

      msg = decode_message(obj)                  # raises only ProtocolError
      for out in gossiper.handle(sender_addr, msg, clock.monotonic_s()):
          transport.send(out.to_addr, out.msg.to_wire())

  ``sender_addr`` is the sender's *listening* internode address
  ("host:port", as in its INTERNODE_ADDR), not an ephemeral source port:
  replies go there.

* after either call, ``drain_events()`` and react (log, replay hints on
  "up", update the ring on "change", ...).

``rng`` is a ``random.Random`` owned by the shell; with the same seed and the
same inputs the gossiper sends the same messages (the simulator relies on it).

Liveness
--------
A peer is UP once we have seen evidence that it is running *while we knew
it*: its heartbeat version advanced within a generation, or a new generation
appeared (restart). Merely learning about a node (maybe a long-dead one, from
a third party's old copy) does not make it UP. Each tick asks the failure
detector about every UP peer and marks it DOWN once phi reaches the threshold.
The detector is fed whenever a peer's heartbeat version increases, whoever
relayed it (as Cassandra does).

Because heartbeats arrive second-hand, a round late now and then, configure
the detector with an ``acceptable_pause_s`` (the node uses half a gossip
interval). The detector learns how irregular second-hand arrivals are (a
standard deviation of ~0.55 s with 1 s gossip), which is what keeps peers
from flapping; each second of acceptable pause adds a second to every
detection. With 2 s a stopped node was DOWN everywhere within 5.7-11.4 s;
with 0.5 s, 4-9.9 s over 400 simulated isolations, with the same histories
in runs without faults.

Give it a ``max_interval_s`` too (``timing.phi_max_interval_ms``, 2 s): the
detector is fed one interval per heartbeat, and the silence of a partition
would otherwise enter its history as an interval like any other, so that
after one long partition the same node's next partitions went undetected.

Eviction: nodes that are LEFT or DOWN for a long time stay in the endpoint map
for now (Cassandra evicts them after a quarantine delay / ``removenode``);
the map is bounded by MAX_KNOWN_ENDPOINTS instead.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ringkv.errors import ProtocolError
from ringkv.gossip.failure_detector import PhiAccrualFailureDetector
from ringkv.gossip.state import (
    INTERNODE_ADDR,
    LOAD,
    MAX_APP_STATES,
    MAX_CLUSTER_LEN,
    MAX_ENDPOINTS_PER_MESSAGE,
    MAX_INT,
    LEFT,
    STATUS,
    TOKENS,
    Ack,
    Ack2,
    EndpointState,
    GossipDigest,
    GossipMessage,
    HeartbeatState,
    Syn,
    VersionedValue,
    digest_of,
    examine_digests,
    is_valid_node_id,
    merge,
    parse_address,
    parse_tokens,
    states_for_requests,
    validate_app_state,
)

if TYPE_CHECKING:
    import random

__all__ = [
    "GOSSIP_INTERVAL_S",
    "MAX_KNOWN_ENDPOINTS",
    "MAX_PENDING_EVENTS",
    "MAX_GENERATION_DIFFERENCE",
    "EVENT_KINDS",
    "Outgoing",
    "Event",
    "Gossiper",
]

GOSSIP_INTERVAL_S = 1.0  # how often the shell should call tick()
MAX_KNOWN_ENDPOINTS = 4096  # endpoints beyond this are not learned
MAX_PENDING_EVENTS = 10_000  # undrained events beyond this are dropped (oldest first)
# A generation this far above the one we hold is treated as garbage (Cassandra's
# MAX_GENERATION_DIFFERENCE: one year of seconds, for time-based generations).
MAX_GENERATION_DIFFERENCE = 86400 * 365

EVENT_KINDS = frozenset({"join", "up", "down", "change", "restart", "foreign_cluster",
                         "left_before"})


@dataclass(frozen=True)
class Outgoing:
    """A message for the shell to send to internode address ``to_addr``."""

    to_addr: str
    msg: GossipMessage


@dataclass(frozen=True)
class Event:
    """Something the shell may want to log or react to.

    kind (``node_id`` is None only for foreign_cluster):

    * ``join``: first time we hear of ``node_id``. details: generation, address, status.
    * ``restart``: ``node_id`` came back with a higher generation; its old state
      was replaced. details: old_generation, generation.
    * ``change``: application states of ``node_id`` changed, including the
      initial ones after ``join``/``restart``. details: ``{"keys": {key: value}}``.
    * ``up`` / ``down``: liveness transitions. details: phi.
    * ``foreign_cluster``: a Syn for another cluster was ignored.
      details: sender_addr, cluster.
    """

    kind: str
    node_id: str | None
    details: dict[str, Any] = field(default_factory=dict)


class Gossiper:
    """Membership state of one node plus the Syn/Ack/Ack2 protocol.

    ``seeds`` are internode addresses ("host:port"). Set INTERNODE_ADDR with
    ``set_local`` before the first tick: peers reach us through it, and a seed
    equal to it (we are a seed) is skipped when picking one. ``generation``
    identifies this incarnation and must grow across restarts (e.g. start-up
    wall-clock seconds). ``detector`` is keyed by peer node id and decides
    UP -> DOWN; see the module docstring for liveness.
    """

    def __init__(
        self,
        node_id: str,
        cluster: str,
        seeds: list[str],
        generation: int,
        detector: PhiAccrualFailureDetector,
    ) -> None:
        if not is_valid_node_id(node_id):
            raise ValueError(f"invalid node id {node_id!r}")
        if not isinstance(cluster, str) or len(cluster) > MAX_CLUSTER_LEN:
            raise ValueError(f"cluster must be a string of at most {MAX_CLUSTER_LEN} characters")
        for seed in seeds:
            parse_address(seed)
        if isinstance(generation, bool) or not isinstance(generation, int):
            raise ValueError("generation must be an int")
        if not 0 <= generation <= MAX_INT:
            raise ValueError(f"generation must be in 0..{MAX_INT}")
        self.node_id = node_id
        self.cluster = cluster
        self.seeds: tuple[str, ...] = tuple(dict.fromkeys(seeds))
        self.detector = detector
        self.events_dropped = 0
        self._version = 0
        self._states: dict[str, EndpointState] = {
            node_id: EndpointState(HeartbeatState(generation, self._next_version()), {})
        }
        self._live: set[str] = set()
        self._events: deque[Event] = deque()
        # Endpoints we asked for whole (from version 0) and not yet heard about.
        self._asked_whole: set[str] = set()
        # Endpoints whose state may be only part of one: taken whole from a reply
        # we did not ask for whole (a reply to this node's previous incarnation,
        # which named them: then it is a delta above what that one held). Until
        # we get it whole (asked from version 0 when a peer's Syn names it), our
        # digests claim nothing of it, and we pass none of it on; claiming its
        # versions would keep the missing keys (TOKENS, STATUS) from us, and
        # from every node we relay it to.
        self._unsure: set[str] = set()
        # Peers that answered a shadow round, and whether one of them knew an
        # earlier incarnation of this node as LEFT (removed or replaced while down).
        self.shadow_answers: set[str] = set()
        self.left_before = False

    # --- local state -----------------------------------------------------------

    def _next_version(self) -> int:
        self._version += 1
        return self._version

    def set_local(self, key: str, value: str) -> None:
        """Set one of our application states (bumps the shared version counter).

        Raises ValueError for a key or value that peers would reject.
        """
        validate_app_state(key, value)
        local = self._states[self.node_id]
        app = dict(local.app)
        if key not in app and len(app) >= MAX_APP_STATES:
            raise ValueError("too many application states")
        app[key] = VersionedValue(value, self._next_version())
        self._states[self.node_id] = EndpointState(local.heartbeat, app)

    def set_for_dead(self, node_id: str, key: str, value: str) -> bool:
        """Set an application state of a peer that is down for good (Cassandra's
        ``advertiseRemoving``): removenode and replace mark the dead node
        LEAVING, then LEFT, on its behalf.

        The value takes the dead node's next version in its own generation,
        so gossip spreads it like any change the node made itself; a node that
        does come back starts a new generation and overrides it. Returns False
        (and changes nothing) for an unknown node, this node, or a node UP.
        """
        validate_app_state(key, value)
        state = self._states.get(node_id)
        if state is None or node_id == self.node_id or node_id in self._live:
            return False
        app = dict(state.app)
        if key not in app and len(app) >= MAX_APP_STATES:
            raise ValueError("too many application states")
        app[key] = VersionedValue(value, state.max_version + 1)
        self._states[node_id] = EndpointState(state.heartbeat, app)
        self._emit_change(node_id, self._states[node_id], frozenset({key}))
        return True

    @property
    def generation(self) -> int:
        return self._states[self.node_id].generation

    # --- driving -----------------------------------------------------------------

    def tick(self, now_s: float, rng: random.Random) -> list[Outgoing]:
        """One gossip round: beat our heartbeat, check liveness, and return the Syns to send.

        Targets, as Cassandra's GossipTask: one random live peer; then, with
        probability #unreachable / (#live + 1), one random unreachable peer;
        then, if the live peer chosen was not a seed or fewer peers are live
        than there are seeds, a random seed (always when no peer is live,
        otherwise with probability #seeds / (#live + #unreachable)).
        """
        local = self._states[self.node_id]
        self._states[self.node_id] = EndpointState(
            HeartbeatState(local.generation, self._next_version()), local.app
        )
        self._check_liveness(now_s)

        syn = Syn(self.cluster, self._digests(rng))
        live = self._addressed(sorted(self._live))
        unreachable = self._addressed(self.unreachable_peers())
        own_addr = self.address_of(self.node_id)
        seeds = [seed for seed in self.seeds if seed != own_addr]
        targets: list[str] = []

        gossiped_to_seed = False
        if live:
            addr = rng.choice(live)
            targets.append(addr)
            gossiped_to_seed = addr in seeds
        if unreachable:
            if rng.random() < len(unreachable) / (len(live) + 1):
                targets.append(rng.choice(unreachable))
        if seeds and (not gossiped_to_seed or len(live) < len(seeds)):
            if not live or rng.random() <= len(seeds) / (len(live) + len(unreachable)):
                targets.append(rng.choice(seeds))
        return [Outgoing(addr, syn) for addr in targets]

    def shadow_round(self) -> list[Outgoing]:
        """Syns with no digests, to every seed and every peer with an address but
        us: each answers with everything it knows, our own earlier state
        included (Cassandra's shadow round). A restarting node asks before it
        serves, to learn whether the ring moved on without it (``left_before``)."""
        own = self.address_of(self.node_id)
        addresses = [*self.seeds, *(self.address_of(n) for n in sorted(self._states))]
        syn = Syn(self.cluster, ())
        return [Outgoing(addr, syn) for addr in dict.fromkeys(addresses)
                if addr is not None and addr != own]

    def handle(self, sender_addr: str, msg: GossipMessage, now_s: float) -> list[Outgoing]:
        """Process one received message; return the replies (at most one, to ``sender_addr``).

        Syn from another cluster: ignored (a ``foreign_cluster`` event).
        Syn -> Ack (skipped when there is nothing to request or send).
        Ack -> merge its states; Ack2 with what it requested (skipped if empty).
        Ack2 -> merge its states.
        Raises ProtocolError only if ``msg`` is not a gossip message object.
        """
        if isinstance(msg, Syn):
            return self._handle_syn(sender_addr, msg)
        if isinstance(msg, Ack):
            self._note_shadow_answer(sender_addr, msg.states)
            # A shadow round's answer (it carries our own state) is every state whole.
            self._apply(msg.states, now_s, reply_to_syn=True,
                        shadow=self.node_id in msg.states)
            states = _capped(states_for_requests(self._states, msg.digests_requested))
            if self._unsure:  # never pass on what may be only part of a state
                states = {n: st for n, st in states.items() if n not in self._unsure}
            return [Outgoing(sender_addr, Ack2(states))] if states else []
        if isinstance(msg, Ack2):
            self._apply(msg.states, now_s, reply_to_syn=False)
            return []
        raise ProtocolError(f"not a gossip message: {type(msg).__name__}")

    def drain_events(self) -> list[Event]:
        """Return and forget the events recorded since the last call, oldest first."""
        events = list(self._events)
        self._events.clear()
        return events

    # --- queries -------------------------------------------------------------------

    def endpoint_states(self) -> dict[str, EndpointState]:
        """Every known endpoint's state, ours included (a copy of the map)."""
        return dict(self._states)

    def is_alive(self, node_id: str) -> bool:
        """UP per gossip and the failure detector; this node is always alive."""
        return node_id == self.node_id or node_id in self._live

    def may_be_alive(self, node_id: str, now_s: float) -> bool:
        """UP, or heard of and not yet convicted by the failure detector.

        A node learned of a moment ago is not UP until its heartbeat is seen
        to advance, but it may well be running: this says whether it could be.
        """
        if node_id not in self._states:
            return False
        return self.is_alive(node_id) or self.detector.is_available(node_id, now_s)

    def live_peers(self) -> list[str]:
        """Node ids of UP peers (not this node), sorted."""
        return sorted(self._live)

    def unreachable_peers(self) -> list[str]:
        """Node ids of known peers that are not UP, sorted."""
        return sorted(n for n in self._states if n != self.node_id and n not in self._live)

    def address_of(self, node_id: str) -> str | None:
        """The node's INTERNODE_ADDR, or None if unknown."""
        state = self._states.get(node_id)
        return None if state is None else state.get(INTERNODE_ADDR)

    def status_of(self, node_id: str) -> str | None:
        """The node's STATUS (BOOT, NORMAL, LEAVING, LEFT), or None if unknown."""
        state = self._states.get(node_id)
        return None if state is None else state.get(STATUS)

    def tokens_of(self, node_id: str) -> list[int]:
        """The node's tokens ([] if unknown or none announced)."""
        state = self._states.get(node_id)
        value = None if state is None else state.get(TOKENS)
        if value is None:
            return []
        try:
            return parse_tokens(value)
        except ValueError:  # from_wire validates; only a hand-built message could get here
            return []

    def snapshot(self, now_s: float) -> list[dict[str, Any]]:
        """One JSON-safe row per known endpoint, sorted by node id (for a status endpoint)."""
        rows = []
        for node_id in sorted(self._states):
            state = self._states[node_id]
            load = state.get(LOAD)
            is_self = node_id == self.node_id
            rows.append(
                {
                    "node_id": node_id,
                    "address": state.get(INTERNODE_ADDR),
                    "state": "UP" if self.is_alive(node_id) else "DOWN",
                    "status": state.get(STATUS),
                    "load": int(load) if load is not None and load.isdigit() else None,
                    "token_count": len(self.tokens_of(node_id)),
                    "phi": 0.0 if is_self else self.detector.phi(node_id, now_s),
                    "generation": state.generation,
                    "heartbeat_version": state.heartbeat.version,
                    "local": is_self,
                }
            )
        return rows

    # --- internals -----------------------------------------------------------------

    def _emit(self, kind: str, node_id: str | None, **details: Any) -> None:
        if len(self._events) >= MAX_PENDING_EVENTS:
            self._events.popleft()
            self.events_dropped += 1
        self._events.append(Event(kind, node_id, details))

    def _addressed(self, node_ids: list[str]) -> list[str]:
        """Addresses of the given nodes, skipping nodes without one (order kept, no duplicates)."""
        out: dict[str, None] = {}
        for node_id in node_ids:
            addr = self.address_of(node_id)
            if addr is not None:
                out[addr] = None
        return list(out)

    def _digests(self, rng: random.Random) -> tuple[GossipDigest, ...]:
        node_ids = sorted(self._states)
        if len(node_ids) > MAX_ENDPOINTS_PER_MESSAGE:
            others = [n for n in node_ids if n != self.node_id]
            node_ids = [self.node_id, *sorted(rng.sample(others, MAX_ENDPOINTS_PER_MESSAGE - 1))]
        return tuple(GossipDigest(n, self._states[n].generation, 0) if n in self._unsure
                     else digest_of(n, self._states[n]) for n in node_ids)

    def _check_liveness(self, now_s: float) -> None:
        for node_id in sorted(self._live):
            phi = self.detector.phi(node_id, now_s)
            if phi >= self.detector.threshold:
                self._live.discard(node_id)
                self._emit("down", node_id, phi=phi)

    def _mark_up(self, node_id: str, now_s: float) -> None:
        if node_id not in self._live:
            self._live.add(node_id)
            self._emit("up", node_id, phi=self.detector.phi(node_id, now_s))

    def _handle_syn(self, sender_addr: str, syn: Syn) -> list[Outgoing]:
        if syn.cluster != self.cluster:
            self._emit("foreign_cluster", None, sender_addr=sender_addr, cluster=syn.cluster)
            return []
        if not syn.digests:  # shadow round: the sender wants everything we know
            known = {n: st for n, st in self._states.items() if n not in self._unsure}
            return [Outgoing(sender_addr, Ack((), _capped(known)))]
        to_request, to_send = examine_digests(self._states, syn.digests)
        # Nobody knows our own state better than we do: never ask for it.
        to_request = [d for d in to_request if d.node_id != self.node_id]
        if self._unsure:
            # Ask again, whole, for what we may hold only part of (see _unsure).
            named = {d.node_id: d.generation for d in syn.digests if d.node_id in self._unsure}
            to_request = [d for d in to_request if d.node_id not in named]
            to_request += [GossipDigest(n, g, 0) for n, g in sorted(named.items())]
            # Never pass on what may be only part of a state (it would be taken whole).
            to_send = {n: st for n, st in to_send.items() if n not in self._unsure}
        for digest in to_request:
            if digest.max_version == 0 and len(self._asked_whole) < MAX_KNOWN_ENDPOINTS:
                self._asked_whole.add(digest.node_id)
        if not to_request and not to_send:
            return []
        return [Outgoing(sender_addr, Ack(tuple(to_request), _capped(to_send)))]

    def _note_shadow_answer(self, sender_addr: str, states: dict[str, EndpointState]) -> None:
        """An Ack that carries our own state answers a shadow round (a normal Ack
        never sends us our own state: our Syn's digest names it, and nobody
        knows it better)."""
        ours = states.get(self.node_id)
        if ours is None:
            return
        self.shadow_answers.add(sender_addr)
        if ours.generation < self.generation and ours.get(STATUS) == LEFT:
            self.left_before = True
            self._emit("left_before", self.node_id, sender_addr=sender_addr,
                       generation=ours.generation)

    def _apply(self, states: dict[str, EndpointState], now_s: float, *,
               reply_to_syn: bool, shadow: bool = False) -> None:
        """Merge the states of an Ack (``reply_to_syn``: computed against the digests
        of our Syn, or ``shadow``: everything the peer knows, whole) or an Ack2 (the
        answer to what our Ack asked for)."""
        for node_id in sorted(states):
            if node_id == self.node_id or not is_valid_node_id(node_id):
                continue  # our own state is authoritative here
            remote = states[node_id]
            local = self._states.get(node_id)
            asked_whole = node_id in self._asked_whole
            self._asked_whole.discard(node_id)
            # Whether ``remote`` is the whole state. Our Syns name only endpoints we
            # know, so an Ack's state of one we do not know was computed for
            # another's digest (unless the Ack answers a shadow round); an Ack2
            # answers what we asked, an unknown endpoint from version 0. A new
            # incarnation's state is always sent whole.
            if local is None:
                whole = not reply_to_syn or shadow
            elif remote.generation > local.generation:
                whole = True
            elif remote.generation == local.generation:
                # (Not an Ack: more answers to the old incarnation's Syns may come.)
                whole = asked_whole or shadow
            else:
                whole = False  # old news, ignored below
            if whole:
                self._unsure.discard(node_id)
            elif (local is None or remote.generation > local.generation) and \
                    len(self._unsure) < MAX_KNOWN_ENDPOINTS:
                self._unsure.add(node_id)
            if local is None:
                if len(self._states) >= MAX_KNOWN_ENDPOINTS:
                    continue
                new, changed = merge(None, remote)
                self._states[node_id] = new
                self.detector.heartbeat(node_id, now_s)
                self._emit(
                    "join",
                    node_id,
                    generation=new.generation,
                    address=new.get(INTERNODE_ADDR),
                    status=new.get(STATUS),
                )
                self._emit_change(node_id, new, changed)
            elif remote.generation > local.generation:
                if local.generation > 2 and (
                    remote.generation > local.generation + MAX_GENERATION_DIFFERENCE
                ):
                    continue  # implausible jump: corrupted or hostile, ignore
                new, changed = merge(local, remote)
                self._states[node_id] = new
                self.detector.remove(node_id)  # new process: relearn its intervals
                self.detector.heartbeat(node_id, now_s)
                self._emit(
                    "restart", node_id, old_generation=local.generation, generation=new.generation
                )
                self._emit_change(node_id, new, changed)
                self._mark_up(node_id, now_s)
            elif remote.generation == local.generation:
                new, changed = merge(local, remote)
                if new is local:
                    continue
                self._states[node_id] = new
                self._emit_change(node_id, new, changed)
                if new.heartbeat.version > local.heartbeat.version:
                    self.detector.heartbeat(node_id, now_s)
                    self._mark_up(node_id, now_s)
            # lower generation: old news about a previous incarnation, ignore

    def _emit_change(self, node_id: str, state: EndpointState, changed: frozenset[str]) -> None:
        if changed:
            self._emit("change", node_id, keys={k: state.app[k].value for k in sorted(changed)})


def _capped(states: dict[str, EndpointState]) -> dict[str, EndpointState]:
    """At most MAX_ENDPOINTS_PER_MESSAGE states (the first by node id), so peers accept it."""
    if len(states) <= MAX_ENDPOINTS_PER_MESSAGE:
        return states
    return {n: states[n] for n in sorted(states)[:MAX_ENDPOINTS_PER_MESSAGE]}
