"""Gossip state, merge rules, Syn/Ack/Ack2 codec and the Gossiper state machine.

Dynamo §4.8.1 (gossip-based membership and failure detection) as implemented
by Cassandra's Gossiper. Everything is pure: Gossiper instances are wired by a
tiny in-memory network that delivers Outgoing messages by address, through
the real wire codec (to_wire -> msgpack -> decode_message).
"""

from __future__ import annotations

import random

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ringkv.errors import ProtocolError
from ringkv.gossip.failure_detector import PhiAccrualFailureDetector
from ringkv.gossip.gossiper import EVENT_KINDS, MAX_KNOWN_ENDPOINTS, Event, Gossiper, Outgoing
from ringkv.gossip.state import (
    BOOT,
    CLIENT_ADDR,
    INTERNODE_ADDR,
    LEFT,
    LOAD,
    MAX_APP_STATES,
    MAX_ENDPOINTS_PER_MESSAGE,
    NORMAL,
    STATUS,
    TOKENS,
    Ack,
    Ack2,
    EndpointState,
    GossipDigest,
    HeartbeatState,
    Syn,
    VersionedValue,
    decode_message,
    examine_digests,
    format_tokens,
    merge,
    parse_address,
    parse_tokens,
    state_newer_than,
    states_for_requests,
    validate_app_state,
)

CLUSTER = "test-cluster"


def es(gen: int, hb: int, **app: tuple[str, int]) -> EndpointState:
    return EndpointState(
        HeartbeatState(gen, hb), {k: VersionedValue(v, ver) for k, (v, ver) in app.items()}
    )


# --- merge ------------------------------------------------------------------------

MERGE_TABLE = [
    pytest.param(
        None,
        es(1, 5, STATUS=(NORMAL, 3)),
        es(1, 5, STATUS=(NORMAL, 3)),
        {"STATUS"},
        id="unknown-node-taken-whole",
    ),
    pytest.param(
        es(1, 9, STATUS=(NORMAL, 3), LOAD=("10", 8)),
        es(2, 1, STATUS=(BOOT, 1)),
        es(2, 1, STATUS=(BOOT, 1)),
        {"STATUS"},
        id="higher-generation-replaces-everything",
    ),
    pytest.param(
        es(2, 5, STATUS=(NORMAL, 3)),
        es(1, 99, STATUS=(LEFT, 98)),
        es(2, 5, STATUS=(NORMAL, 3)),
        set(),
        id="lower-generation-ignored",
    ),
    pytest.param(
        es(1, 5, STATUS=(BOOT, 2), LOAD=("10", 4)),
        es(1, 7, STATUS=(NORMAL, 6), LOAD=("5", 3)),
        es(1, 7, STATUS=(NORMAL, 6), LOAD=("10", 4)),
        {"STATUS"},
        id="same-generation-higher-version-wins-per-key",
    ),
    pytest.param(
        es(1, 8, STATUS=(NORMAL, 3)),
        es(1, 4, STATUS=(NORMAL, 3), DC=("dc1", 2)),
        es(1, 8, STATUS=(NORMAL, 3), DC=("dc1", 2)),
        {"DC"},
        id="unknown-key-added-older-heartbeat-kept",
    ),
    pytest.param(
        es(1, 8, STATUS=(NORMAL, 3), custom=("x", 5)),
        es(1, 8, custom=("y", 5)),
        es(1, 8, STATUS=(NORMAL, 3), custom=("x", 5)),
        set(),
        id="version-tie-keeps-local",
    ),
    pytest.param(
        es(1, 8),
        es(1, 9),
        es(1, 9),
        set(),
        id="heartbeat-only-update",
    ),
]


@pytest.mark.parametrize(("local", "remote", "expected", "changed"), MERGE_TABLE)
def test_merge_table(local, remote, expected, changed):
    before = None if local is None else EndpointState(local.heartbeat, dict(local.app))
    merged, keys = merge(local, remote)
    assert merged == expected
    assert keys == frozenset(changed)
    assert local == before  # arguments are never modified


def test_merge_caps_app_states():
    local = es(1, 1, **{f"k{i:03}": ("v", 1) for i in range(MAX_APP_STATES)})
    merged, keys = merge(local, es(1, 2, zzz=("v", 2)))
    assert len(merged.app) == MAX_APP_STATES and "zzz" not in merged.app and not keys


def test_max_version_covers_heartbeat_and_app_states():
    assert es(1, 5).max_version == 5
    assert es(1, 5, STATUS=(NORMAL, 9)).max_version == 9


# --- digest comparison ----------------------------------------------------------------

LOCAL = {
    "same": es(1, 10, STATUS=(NORMAL, 4)),
    "behind": es(1, 10, STATUS=(NORMAL, 4)),
    "ahead": es(1, 10, STATUS=(NORMAL, 9), LOAD=("1", 3)),
    "restarted": es(1, 10),
    "old-gen-remote": es(5, 3, STATUS=(BOOT, 2)),
}


def test_examine_digests_like_cassandra():
    digests = [
        GossipDigest("same", 1, 10),
        GossipDigest("behind", 1, 15),
        GossipDigest("ahead", 1, 5),
        GossipDigest("restarted", 2, 3),
        GossipDigest("old-gen-remote", 4, 100),
        GossipDigest("unknown", 7, 42),
    ]
    to_request, to_send = examine_digests(LOCAL, digests)
    assert to_request == [
        GossipDigest("behind", 1, 10),  # send me what is above my max version
        GossipDigest("restarted", 2, 0),  # new generation: everything
        GossipDigest("unknown", 7, 0),
    ]
    assert to_send == {
        "ahead": es(1, 10, STATUS=(NORMAL, 9)),  # only entries above version 5
        "old-gen-remote": LOCAL["old-gen-remote"],  # whole state
    }


def test_state_newer_than():
    s = es(3, 10, STATUS=(NORMAL, 4), LOAD=("7", 8))
    assert state_newer_than(s, 3, 10) is None
    assert state_newer_than(s, 3, 8) == es(3, 10)
    assert state_newer_than(s, 3, 5) == es(3, 10, LOAD=("7", 8))
    assert state_newer_than(s, 3, 0) == s
    assert state_newer_than(s, 2, 50) == s  # other generation: whole state
    assert states_for_requests({"a": s}, [GossipDigest("a", 3, 5), GossipDigest("b", 1, 0)]) == {
        "a": es(3, 10, LOAD=("7", 8))
    }


# --- wire codec ---------------------------------------------------------------------------


def roundtrip(msg):
    wire = msgpack.unpackb(msgpack.packb(msg.to_wire()), raw=False)
    return decode_message(wire)


def test_messages_roundtrip_through_msgpack():
    state = es(1_700_000_000, 12, STATUS=(NORMAL, 3), TOKENS=("-5,0,9223372036854775807", 4))
    for msg in (
        Syn(CLUSTER, (GossipDigest("a", 1, 2), GossipDigest("b", 3, 0))),
        Syn(CLUSTER, ()),
        Ack((GossipDigest("a", 1, 0),), {"b": state}),
        Ack2({"a": state, "b": es(1, 1)}),
    ):
        assert roundtrip(msg) == msg
        assert type(msg).from_wire(msg.to_wire()) == msg


GOOD_STATE = [1, 2, {"STATUS": ["NORMAL", 1]}]
BAD_WIRE = [
    (None, "expected a map"),
    ([], "expected a map"),
    ({}, "unknown message type"),
    ({"t": "nope"}, "unknown message type"),
    ({"t": 5}, "unknown message type"),
    ({"t": "syn", "digests": []}, "no 'cluster'"),
    ({"t": "syn", "cluster": 7, "digests": []}, "cluster must be a string"),
    ({"t": "syn", "cluster": "c", "digests": {}}, "must be a list"),
    ({"t": "syn", "cluster": "c", "digests": [["a", 1]]}, "[node_id, generation, max_version]"),
    ({"t": "syn", "cluster": "c", "digests": [["a", -1, 0]]}, "generation must be in"),
    ({"t": "syn", "cluster": "c", "digests": [["a", 1, 2**64]]}, "max_version must be in"),
    ({"t": "syn", "cluster": "c", "digests": [["a", True, 0]]}, "must be an integer"),
    ({"t": "syn", "cluster": "c", "digests": [["a", 1.0, 0]]}, "must be an integer"),
    ({"t": "syn", "cluster": "c", "digests": [["", 1, 0]]}, "not a valid node id"),
    ({"t": "syn", "cluster": "c", "digests": [["a b", 1, 0]]}, "not a valid node id"),
    ({"t": "syn", "cluster": "c", "digests": [["x" * 500, 1, 0]]}, "not a valid node id"),
    ({"t": "syn", "cluster": "c", "digests": [[b"a", 1, 0]]}, "not a valid node id"),
    ({"t": "syn", "cluster": "c", "digests": [["a", 1, 0], ["a", 2, 0]]}, "twice"),
    (
        {"t": "syn", "cluster": "c", "digests": [[f"n{i}", 1, 0] for i in range(1025)]},
        "the limit is 1024",
    ),
    ({"t": "ack", "digests": [], "states": []}, "must be a map"),
    ({"t": "ack", "states": {}}, "no 'digests'"),
    ({"t": "ack2", "states": {"a": [1, 2]}}, "[generation, heartbeat_version, app_states]"),
    ({"t": "ack2", "states": {"a": [1, 2, []]}}, "must be a map"),
    ({"t": "ack2", "states": {"a": [1, 2, {"STATUS": ["NORMAL"]}]}}, "[value, version]"),
    ({"t": "ack2", "states": {"a": [1, 2, {"STATUS": ["DANCING", 1]}]}}, "STATUS must be"),
    ({"t": "ack2", "states": {"a": [1, 2, {"TOKENS": ["1,x", 1]}]}}, "TOKENS"),
    ({"t": "ack2", "states": {"a": [1, 2, {"TOKENS": [str(2**63), 1]}]}}, "64-bit"),
    ({"t": "ack2", "states": {"a": [1, 2, {"INTERNODE_ADDR": ["nohost", 1]}]}}, "host:port"),
    ({"t": "ack2", "states": {"a": [1, 2, {"CLIENT_ADDR": ["h:70000", 1]}]}}, "port"),
    ({"t": "ack2", "states": {"a": [1, 2, {"LOAD": ["-1", 1]}]}}, "LOAD"),
    ({"t": "ack2", "states": {"a": [1, 2, {"k": [3, 1]}]}}, "must be a string"),
    ({"t": "ack2", "states": {"a": [1, 2, {"k": ["v" * 70_000, 1]}]}}, "limit"),
    ({"t": "ack2", "states": {"a": [1, 2, {"bad key": ["v", 1]}]}}, "key must be"),
    ({"t": "ack2", "states": {"a": [1, 2, {"k": ["v", -4]}]}}, "must be in"),
    ({"t": "ack2", "states": {5: GOOD_STATE}}, "not a valid node id"),
    ({"t": "ack2", "states": {"a": [1, 2, {f"k{i}": ["v", 1] for i in range(65)}]}}, "limit is 64"),
    (
        {"t": "ack2", "states": {f"n{i}": GOOD_STATE for i in range(1025)}},
        "the limit is 1024",
    ),
]


@pytest.mark.parametrize(("obj", "fragment"), BAD_WIRE)
def test_from_wire_rejects_garbage_with_clear_message(obj, fragment):
    with pytest.raises(ProtocolError) as info:
        decode_message(obj)
    assert fragment in str(info.value)
    assert "malformed gossip message" in str(info.value)


def test_from_wire_checks_the_message_type():
    with pytest.raises(ProtocolError, match="expected message type 'syn'"):
        Syn.from_wire(Ack2({}).to_wire())
    with pytest.raises(ProtocolError):
        Ack.from_wire("ack")


def test_unknown_fields_are_ignored():
    wire = Syn(CLUSTER, ()).to_wire()
    wire["future"] = [1, 2, 3]
    assert decode_message(wire) == Syn(CLUSTER, ())


msgpackable = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**64), max_value=2**64)
    | st.floats(allow_nan=True)
    | st.text(max_size=20)
    | st.binary(max_size=10)
    | st.sampled_from(["syn", "ack", "ack2", "t", "cluster", "digests", "states", "STATUS",
                       "TOKENS", "NORMAL", "LOAD", "INTERNODE_ADDR", "h:1"]),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(
        st.sampled_from(["t", "cluster", "digests", "states", "a", "STATUS", "TOKENS"])
        | st.text(max_size=5),
        children,
        max_size=5,
    ),
    max_leaves=30,
)

leaf = st.one_of(
    st.integers(min_value=-3, max_value=2**64),
    st.text(max_size=6),
    st.none(),
    st.booleans(),
    st.sampled_from(["NORMAL", "1,2,3", "h:7000", "12"]),
)
near_state = st.lists(
    leaf | st.dictionaries(st.sampled_from(["STATUS", "TOKENS", "LOAD", "INTERNODE_ADDR", "x"]),
                           st.lists(leaf, max_size=3) | leaf, max_size=4),
    max_size=4,
)
near_digest = st.lists(leaf, max_size=4)
near_valid = st.one_of(
    st.fixed_dictionaries(
        {"t": st.just("syn"), "cluster": leaf, "digests": st.lists(near_digest, max_size=4) | leaf}
    ),
    st.fixed_dictionaries(
        {
            "t": st.sampled_from(["ack", "ack2"]),
            "digests": st.lists(near_digest, max_size=4) | leaf,
            "states": st.dictionaries(leaf, near_state | leaf, max_size=4) | leaf,
        }
    ),
)

# Valid messages with one spot replaced by garbage: reaches the deepest checks.
node_ids = st.sampled_from(["n0", "n1", "n2", "node-α"])
versions = st.integers(min_value=0, max_value=2**63 - 1)
app_entries = st.sampled_from(
    [(STATUS, NORMAL), (STATUS, LEFT), (TOKENS, "1,-2,3"), (TOKENS, ""), (LOAD, "77"),
     (INTERNODE_ADDR, "10.0.0.1:7000"), (CLIENT_ADDR, "[::1]:8080"), ("SCHEMA", "v1")]
)
states_st = st.builds(
    lambda hb, entries: EndpointState(hb, {k: VersionedValue(v, ver) for (k, v), ver in entries}),
    st.builds(HeartbeatState, versions, versions),
    st.lists(st.tuples(app_entries, versions), max_size=4),
)
digests_st = st.lists(
    st.builds(GossipDigest, node_ids, versions, versions),
    max_size=3,
    unique_by=lambda d: d.node_id,
).map(tuple)
valid_msgs = st.one_of(
    st.builds(Syn, st.text(max_size=8), digests_st),
    st.builds(Ack, digests_st, st.dictionaries(node_ids, states_st, max_size=3)),
    st.builds(Ack2, st.dictionaries(node_ids, states_st, max_size=3)),
)


@st.composite
def mutated(draw):
    wire = draw(valid_msgs).to_wire()
    parents = []

    def walk(obj):
        if isinstance(obj, dict):
            for key in obj:
                parents.append((obj, key))
                walk(obj[key])
        elif isinstance(obj, list):
            for i, item in enumerate(obj):
                parents.append((obj, i))
                walk(item)

    walk(wire)
    if parents:
        container, key = draw(st.sampled_from(parents))
        container[key] = draw(msgpackable)
    return wire


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(msgpackable, near_valid, mutated()))
def test_arbitrary_input_raises_only_protocol_error(obj):
    try:
        msg = decode_message(obj)
    except ProtocolError:
        return
    # Whatever is accepted is well formed: it re-encodes to itself.
    assert decode_message(msg.to_wire()) == msg
    # ...and a gossiper digests it without complaint.
    g = make_node(0)
    g.handle("10.0.0.9:7000", msg, 1.0)


def test_validate_app_state_and_tokens_helpers():
    assert parse_tokens(format_tokens([-(2**63), 0, 42])) == [-(2**63), 0, 42]
    assert parse_tokens("") == []
    validate_app_state(INTERNODE_ADDR, "[::1]:7000")
    assert parse_address("[::1]:7000") == ("::1", 7000)  # brackets are syntax, not host
    validate_app_state("anything", "free text is fine")
    for key, value in [(STATUS, "UP"), (TOKENS, "1_000"), (LOAD, "1e3"), (CLIENT_ADDR, "h:0")]:
        with pytest.raises(ValueError):
            validate_app_state(key, value)


# --- the in-memory cluster ------------------------------------------------------------------


def addr(i: int) -> str:
    return f"10.0.0.{i}:7000"


# Heartbeats reach a node second-hand, one gossip round late now and then; a
# detector with no acceptable pause reads that jitter as failures (see
# test_steady_state_has_no_false_downs). Akka's cluster default is 3 s.
PAUSE_S = 3.0


def make_node(
    i: int, *, seeds=(0,), generation: int = 1, cluster: str = CLUSTER, pause_s: float = PAUSE_S
) -> Gossiper:
    detector = PhiAccrualFailureDetector(acceptable_pause_s=pause_s)
    g = Gossiper(f"n{i}", cluster, [addr(s) for s in seeds], generation, detector)
    g.set_local(INTERNODE_ADDR, addr(i))
    g.set_local(STATUS, NORMAL)
    g.set_local(TOKENS, format_tokens([i * 100 + k for k in range(4)]))
    g.set_local(LOAD, str(1000 * i))
    return g


class Net:
    """Delivers Outgoing messages by address, through the wire codec.

    Stopped nodes neither tick nor receive (messages to them are dropped).
    """

    def __init__(self, nodes: list[Gossiper], seed: int = 1) -> None:
        self.nodes = {g.address_of(g.node_id): g for g in nodes}
        self.rngs = {a: random.Random(f"{seed}-{a}") for a in self.nodes}
        self.stopped: set[str] = set()
        self.log: list[tuple[str, str, dict]] = []
        self.now = 0.0

    def deliver(self, sender: str, outgoing: list[Outgoing]) -> None:
        queue = [(sender, o) for o in outgoing]
        while queue:
            src, out = queue.pop(0)
            wire = msgpack.unpackb(msgpack.packb(out.msg.to_wire()), raw=False)
            self.log.append((src, out.to_addr, wire))
            dest = self.nodes.get(out.to_addr)
            if dest is None or out.to_addr in self.stopped:
                continue  # dropped
            replies = dest.handle(src, decode_message(wire), self.now)
            queue.extend((out.to_addr, r) for r in replies)

    def round(self) -> None:
        self.now += 1.0
        for a in sorted(self.nodes):
            if a not in self.stopped:
                self.deliver(a, self.nodes[a].tick(self.now, self.rngs[a]))

    def converged(self) -> bool:
        everyone = {g.node_id: g for g in self.nodes.values()}
        for g in everyone.values():
            for other in everyone.values():
                if g.tokens_of(other.node_id) != other.tokens_of(other.node_id):
                    return False
                if g.status_of(other.node_id) != other.status_of(other.node_id):
                    return False
        return True


def rounds_to_converge(net: Net, limit: int) -> int:
    rounds = 0
    while not net.converged():
        net.round()
        rounds += 1
        assert rounds <= limit, f"no convergence after {limit} rounds"
    return rounds


def test_five_nodes_knowing_only_a_seed_converge():
    """Dynamo §4.8.1: membership spreads by gossip from a seed to every node.

    Over 100 seeds, 5 nodes took 2..8 rounds (mostly 3-4); 20 nodes 5..18.
    """
    for seed in range(20):
        net = Net([make_node(i) for i in range(5)], seed=seed)
        assert rounds_to_converge(net, limit=10) >= 2
    # Everyone ends up seeing everyone UP after a couple more rounds.
    for _ in range(3):
        net.round()
    for g in net.nodes.values():
        assert len(g.live_peers()) == 4
        assert sorted(g.endpoint_states()) == [f"n{i}" for i in range(5)]


def test_twenty_nodes_converge_in_logarithmic_rounds():
    net = Net([make_node(i) for i in range(20)], seed=1)
    rounds_to_converge(net, limit=20)


def test_new_node_is_announced_as_join_and_change_then_up():
    net = Net([make_node(0), make_node(1)])
    net.round()
    seed = net.nodes[addr(0)]
    events = seed.drain_events()
    assert [e.kind for e in events[:2]] == ["join", "change"]
    assert events[0] == Event("join", "n1", {"generation": 1, "address": addr(1), "status": NORMAL})
    assert events[1].details["keys"][TOKENS] == "100,101,102,103"
    assert not seed.is_alive("n1")  # learning of a node is no proof that it runs
    for _ in range(3):
        net.round()
    assert seed.is_alive("n1")
    assert any(e.kind == "up" and e.node_id == "n1" for e in seed.drain_events())
    assert all(e.kind in EVENT_KINDS for e in net.nodes[addr(1)].drain_events())


def test_a_node_just_learned_of_may_be_alive_until_the_detector_convicts_it():
    """Not UP before its heartbeat is seen to advance, but not ruled out either (a
    joiner heard of once may well be joining too); a silent one is convicted."""
    net = Net([make_node(0), make_node(1)])
    net.round()
    seed = net.nodes[addr(0)]
    assert not seed.is_alive("n1") and seed.may_be_alive("n1", net.now)
    assert not seed.may_be_alive("n9", net.now)  # never heard of
    net.stopped.add(addr(1))
    assert seed.may_be_alive("n1", net.now + 1.0)
    assert not seed.may_be_alive("n1", net.now + 10.0)


@pytest.mark.parametrize("pause_s", [PAUSE_S, 0.0])
def test_stopped_node_goes_down_and_comes_back_up(pause_s):
    net = Net([make_node(i, pause_s=pause_s) for i in range(4)], seed=7)
    for _ in range(10):
        net.round()
    for g in net.nodes.values():
        g.drain_events()
        assert len(g.live_peers()) == 3
    net.stopped.add(addr(3))
    stopped_at = net.now
    down_at: dict[str, float] = {}
    while len(down_at) < 3:
        net.round()
        assert net.now - stopped_at <= 15, "not DOWN within 15 s"
        for a in (addr(0), addr(1), addr(2)):
            g = net.nodes[a]
            if not g.is_alive("n3") and a not in down_at:
                down_at[a] = net.now
                kinds = [e.kind for e in g.drain_events() if e.node_id == "n3"]
                if pause_s:
                    assert kinds == ["down"]
                else:  # a late second-hand heartbeat may bring it back up once
                    assert kinds[-1] == "down"
    for a in (addr(0), addr(1), addr(2)):
        assert net.nodes[a].unreachable_peers() == ["n3"]
        row = next(r for r in net.nodes[a].snapshot(net.now) if r["node_id"] == "n3")
        assert row["state"] == "DOWN" and row["phi"] >= 8.0
    # The others keep seeing each other.
    assert net.nodes[addr(0)].live_peers() == ["n1", "n2"]

    net.stopped.clear()
    for _ in range(5):
        net.round()
    for a in (addr(0), addr(1), addr(2)):
        g = net.nodes[a]
        assert g.is_alive("n3")
        assert "up" in [e.kind for e in g.drain_events() if e.node_id == "n3"]
    assert net.nodes[addr(3)].live_peers() == ["n0", "n1", "n2"]


@pytest.mark.parametrize(("pause_s", "max_false_downs"), [(PAUSE_S, 0), (0.0, None)])
def test_steady_state_has_no_false_downs(pause_s, max_false_downs):
    nodes = [make_node(i, pause_s=pause_s) for i in range(6)]
    net = Net(nodes, seed=2)
    for _ in range(60):
        net.round()
    downs = sum(e.kind == "down" for g in nodes for e in g.drain_events())
    if max_false_downs is None:
        assert downs > 0  # documents why the shell should configure a pause
    else:
        assert downs <= max_false_downs
    for g in nodes:
        assert len(g.live_peers()) == 5


def test_restarted_node_replaces_its_old_state():
    net = Net([make_node(i) for i in range(3)], seed=3)
    for _ in range(6):
        net.round()
    old = net.nodes[addr(2)]
    old.set_local("custom", "only-in-gen-1")
    net.round()
    net.round()
    # Restart: same id and address, higher generation, fresh state without "custom".
    new = Gossiper("n2", CLUSTER, [addr(0)], 2, PhiAccrualFailureDetector())
    new.set_local(INTERNODE_ADDR, addr(2))
    new.set_local(STATUS, BOOT)
    net.nodes[addr(2)] = new
    for g in net.nodes.values():
        g.drain_events()
    for _ in range(6):
        net.round()
    for a in (addr(0), addr(1)):
        g = net.nodes[a]
        state = g.endpoint_states()["n2"]
        assert state.generation == 2
        assert "custom" not in state.app and g.tokens_of("n2") == []
        assert g.status_of("n2") == BOOT
        events = [e for e in g.drain_events() if e.node_id == "n2"]
        assert events[0] == Event("restart", "n2", {"old_generation": 1, "generation": 2})
        assert g.is_alive("n2")
    # The restarted node relearns the others.
    assert sorted(new.endpoint_states()) == ["n0", "n1", "n2"]


def test_stale_generation_and_implausible_generation_are_ignored():
    g = make_node(0)
    g.handle(addr(1), Ack2({"n1": es(1_700_000_000, 5, STATUS=(NORMAL, 1))}), 1.0)
    g.handle(addr(1), Ack2({"n1": es(1_600_000_000, 9, STATUS=(LEFT, 8))}), 2.0)
    assert g.status_of("n1") == NORMAL
    g.handle(addr(1), Ack2({"n1": es(1_700_000_000 + 10 * 86400 * 365, 9, STATUS=(LEFT, 8))}), 3.0)
    assert g.status_of("n1") == NORMAL and g.endpoint_states()["n1"].generation == 1_700_000_000


def test_foreign_cluster_syn_is_ignored():
    ours = make_node(0)
    theirs = make_node(1, cluster="other-cluster")
    before = ours.endpoint_states()
    syn = theirs.tick(1.0, random.Random(0))[0]
    assert syn.to_addr == addr(0)
    assert ours.handle(addr(1), roundtrip(syn.msg), 1.0) == []
    assert ours.endpoint_states() == before
    assert ours.drain_events() == [
        Event("foreign_cluster", None, {"sender_addr": addr(1), "cluster": "other-cluster"})
    ]


def test_states_about_ourselves_are_never_taken():
    g = make_node(0)
    mine = g.endpoint_states()["n0"]
    g.handle(addr(1), Ack2({"n0": es(99, 999, STATUS=(LEFT, 998))}), 1.0)
    assert g.endpoint_states()["n0"] == mine
    # ...nor requested, even when a peer claims to know a newer one.
    assert g.handle(addr(1), Syn(CLUSTER, (GossipDigest("n0", 99, 999),)), 1.0) == []
    # A peer that is behind on us gets our newer entries.
    (reply,) = g.handle(addr(1), Syn(CLUSTER, (GossipDigest("n0", 1, 2),)), 1.0)
    assert reply.msg.digests_requested == ()
    assert reply.msg.states["n0"] == state_newer_than(mine, 1, 2)


def test_syn_ack_ack2_exchange_between_two_nodes():
    a, b = make_node(0), make_node(1)
    (syn,) = b.tick(1.0, random.Random(0))
    assert syn.to_addr == addr(0) and isinstance(syn.msg, Syn)
    (ack,) = a.handle(addr(1), roundtrip(syn.msg), 1.0)
    assert ack.to_addr == addr(1)
    assert ack.msg.digests_requested == (GossipDigest("n1", 1, 0),)
    assert set(ack.msg.states) == set()  # n0 is not in b's digests: not offered in the ack
    (ack2,) = b.handle(addr(0), roundtrip(ack.msg), 1.0)
    assert set(ack2.msg.states) == {"n1"}
    assert a.handle(addr(1), roundtrip(ack2.msg), 1.0) == []
    assert a.endpoint_states()["n1"] == b.endpoint_states()["n1"]
    # Nothing left to exchange: an in-sync Syn gets no Ack.
    in_sync = Syn(CLUSTER, tuple(GossipDigest(n, s.generation, s.max_version)
                                 for n, s in sorted(a.endpoint_states().items())))
    assert a.handle(addr(1), in_sync, 1.0) == []


def test_empty_syn_is_a_shadow_round():
    g = make_node(0)
    g.handle(addr(1), Ack2({"n1": es(1, 5, STATUS=(NORMAL, 1))}), 1.0)
    (reply,) = g.handle(addr(2), Syn(CLUSTER, ()), 1.0)
    assert reply.to_addr == addr(2) and set(reply.msg.states) == {"n0", "n1"}


def test_tick_targets():
    # Alone, with no seeds: nothing to do.
    lonely = Gossiper("solo", CLUSTER, [], 1, PhiAccrualFailureDetector())
    assert lonely.tick(1.0, random.Random(0)) == []
    # The only seed is ourselves: nothing to do either.
    seed = make_node(0)
    assert seed.tick(1.0, random.Random(0)) == []
    # No live peers: always a seed.
    g = make_node(1, seeds=(0, 5))
    for k in range(20):
        outs = g.tick(float(k + 1), random.Random(k))
        assert len(outs) == 1 and outs[0].to_addr in (addr(0), addr(5))
    # Every tick beats the heartbeat.
    hb = g.endpoint_states()["n1"].heartbeat.version
    g.tick(30.0, random.Random(0))
    assert g.endpoint_states()["n1"].heartbeat.version == hb + 1


def test_unreachable_peers_get_gossip_sometimes():
    net = Net([make_node(i) for i in range(4)], seed=11)
    for _ in range(8):
        net.round()
    net.stopped.add(addr(3))
    for _ in range(20):
        net.round()
    to_dead = [1 for src, dst, _ in net.log[-200:] if dst == addr(3)]
    assert to_dead  # Cassandra keeps probing unreachable nodes


def test_set_local_bumps_one_shared_version_counter():
    g = Gossiper("n0", CLUSTER, [], 7, PhiAccrualFailureDetector())
    v0 = g.endpoint_states()["n0"].max_version
    g.set_local(STATUS, BOOT)
    g.tick(1.0, random.Random(0))
    g.set_local(STATUS, NORMAL)
    state = g.endpoint_states()["n0"]
    assert state.heartbeat == HeartbeatState(7, v0 + 2)
    assert state.app[STATUS] == VersionedValue(NORMAL, v0 + 3)
    assert state.max_version == v0 + 3
    with pytest.raises(ValueError):
        g.set_local(STATUS, "SLEEPING")
    with pytest.raises(ValueError):
        g.set_local(INTERNODE_ADDR, "no-port")


def test_constructor_validates():
    fd = PhiAccrualFailureDetector()
    with pytest.raises(ValueError):
        Gossiper("", CLUSTER, [], 1, fd)
    with pytest.raises(ValueError):
        Gossiper("n0", CLUSTER, ["not an address"], 1, fd)
    with pytest.raises(ValueError):
        Gossiper("n0", CLUSTER, [], -1, fd)


def test_queries_and_snapshot():
    net = Net([make_node(i) for i in range(3)], seed=5)
    for _ in range(6):
        net.round()
    g = net.nodes[addr(0)]
    assert g.is_alive("n0") and g.is_alive("n1") and not g.is_alive("nobody")
    assert g.address_of("n2") == addr(2) and g.address_of("nobody") is None
    assert g.status_of("n1") == NORMAL and g.status_of("nobody") is None
    assert g.tokens_of("n2") == [200, 201, 202, 203] and g.tokens_of("nobody") == []
    rows = g.snapshot(net.now)
    assert [r["node_id"] for r in rows] == ["n0", "n1", "n2"]
    row = rows[2]
    assert row["address"] == addr(2) and row["state"] == "UP" and row["status"] == NORMAL
    assert row["load"] == 2000 and row["token_count"] == 4 and row["generation"] == 1
    assert 0 <= row["phi"] < 8 and row["heartbeat_version"] > 0 and not row["local"]
    assert rows[0]["local"] and rows[0]["phi"] == 0.0
    msgpack.packb(rows)  # plain data


def test_deterministic_given_the_same_seed():
    def run(seed: int) -> list:
        net = Net([make_node(i) for i in range(5)], seed=seed)
        for _ in range(8):
            net.round()
        net.stopped.add(addr(2))
        for _ in range(6):
            net.round()
        return net.log

    assert run(42) == run(42)
    assert run(42) != run(43)


def test_bounded_endpoint_map():
    g = make_node(0)
    state = [1, 1, {STATUS: [NORMAL, 1]}]
    for batch in range(MAX_KNOWN_ENDPOINTS // MAX_ENDPOINTS_PER_MESSAGE + 2):
        states = {f"x{batch}-{i}": state for i in range(MAX_ENDPOINTS_PER_MESSAGE)}
        wire = {"t": "ack2", "states": states}
        g.handle(addr(1), decode_message(wire), 1.0)
    assert len(g.endpoint_states()) == MAX_KNOWN_ENDPOINTS
    # The gossiper still works, and what it sends still fits the limits.
    outs = g.tick(2.0, random.Random(0))
    for out in outs:
        assert len(out.msg.digests) <= MAX_ENDPOINTS_PER_MESSAGE
        roundtrip(out.msg)
    (reply,) = g.handle(addr(1), Syn(CLUSTER, ()), 2.0)
    assert len(reply.msg.states) == MAX_ENDPOINTS_PER_MESSAGE
    roundtrip(reply.msg)


def test_handle_rejects_non_messages():
    g = make_node(0)
    with pytest.raises(ProtocolError):
        g.handle(addr(1), {"t": "syn"}, 1.0)  # raw wire must be decoded first


# Purity of these modules is enforced with the other pure cores in tests/test_layering.py.


class RecordingTransport:
    """The two calls GossipService makes of a transport, recorded."""

    def __init__(self) -> None:
        self.peers: dict[str, tuple[str, int]] = {}
        self.sent: list[str] = []

    def set_peer_address(self, node_id: str, host: str, port: int) -> None:
        self.peers[node_id] = (host, port)

    def forget_peer(self, node_id: str) -> None:
        del self.peers[node_id]

    def send_oneway(self, node_id: str, verb: str, payload: object) -> None:
        assert node_id in self.peers, f"sent to {node_id}, which the transport does not know"
        self.sent.append(node_id)


def test_senders_named_only_by_address_are_bounded_and_seeds_kept() -> None:
    """A peer that names a new sender address in every Syn must neither grow
    the transport's peer table nor steer this node to dial without bound."""
    import asyncio

    from ringkv.clock import ManualClock
    from ringkv.gossip.service import MAX_ADDRESS_PEERS, VERB, GossipService

    g = make_node(1, seeds=(0,))
    transport = RecordingTransport()
    service = GossipService(g, transport, ManualClock(), random.Random(1), self_address=addr(1),
                            interval_s=1.0, on_events=lambda events: None)
    service.tick_now()  # gossips with its seed
    assert "@" + addr(0) in transport.peers

    async def flood() -> None:
        for port in range(1, 3 * MAX_ADDRESS_PEERS):
            payload = {"from": f"10.9.0.1:{port}", "m": Syn(CLUSTER, ()).to_wire()}
            await service.handle("x", VERB, payload)

    asyncio.run(flood())
    assert len(transport.sent) > 3 * MAX_ADDRESS_PEERS - 5  # every sender got its answer
    assert len(transport.peers) <= MAX_ADDRESS_PEERS + 1
    assert "@" + addr(0) in transport.peers  # the seed was never evicted
    assert f"@10.9.0.1:{3 * MAX_ADDRESS_PEERS - 1}" in transport.peers  # the newest were kept


def test_a_dead_nodes_state_can_be_set_on_its_behalf_and_a_restart_overrides_it():
    """Cassandra's advertiseRemoving: removenode marks a dead node LEAVING, then
    LEFT, with the dead node's next version; gossip spreads it like the node's
    own change, and the node coming back (a new generation) overrides it."""
    net = Net([make_node(i) for i in range(3)], seed=5)
    for _ in range(6):
        net.round()
    coordinator = net.nodes[addr(0)]
    # n2 is UP: nothing may be said on its behalf; nor on ours, nor on a stranger's.
    assert not coordinator.set_for_dead("n2", STATUS, LEFT)
    assert not coordinator.set_for_dead("n0", STATUS, LEFT)
    assert not coordinator.set_for_dead("nobody", STATUS, LEFT)
    net.stopped.add(addr(2))
    for _ in range(40):
        net.round()
        if not coordinator.is_alive("n2"):
            break
    assert not coordinator.is_alive("n2")
    with pytest.raises(ValueError):
        coordinator.set_for_dead("n2", STATUS, "GONE")
    coordinator.drain_events()
    assert coordinator.set_for_dead("n2", STATUS, LEFT)
    assert [e.kind for e in coordinator.drain_events() if e.node_id == "n2"] == ["change"]
    for _ in range(4):
        net.round()
    assert net.nodes[addr(1)].status_of("n2") == LEFT
    assert net.nodes[addr(1)].tokens_of("n2") == coordinator.tokens_of("n2")
    # It comes back after all: its new generation wins over what was said for it.
    back = make_node(2, generation=2)
    net.nodes[addr(2)] = back
    net.stopped.discard(addr(2))
    for _ in range(6):
        net.round()
    assert coordinator.status_of("n2") == NORMAL and net.nodes[addr(1)].status_of("n2") == NORMAL


# -- a restarted node asks first whether the ring moved on without it ----------------


def test_a_shadow_round_tells_a_restarted_node_it_was_removed_while_down():
    """Cassandra's shadow round before a restart: every seed and known peer answers
    with all it knows, our own earlier incarnation included. One that was marked
    LEFT on our behalf (removenode, replace) must not come back with its data."""
    nodes = [make_node(i) for i in range(3)]
    net = Net(nodes)
    rounds_to_converge(net, limit=10)
    # n2 dies for good and n0 removes it: LEFT on its behalf, in its generation.
    net.stopped.add(addr(2))
    for _ in range(12):
        net.round()
    assert not nodes[0].is_alive("n2")
    assert nodes[0].set_for_dead("n2", STATUS, "LEFT")
    for _ in range(3):
        net.round()
    assert nodes[1].status_of("n2") == "LEFT"

    # Its restart: a new generation, peers from the last run; it asks before it gossips.
    back = make_node(2, seeds=(0, 1), generation=2)
    net.nodes[addr(2)] = back
    net.stopped.discard(addr(2))
    syns = back.shadow_round()
    assert sorted(o.to_addr for o in syns) == [addr(0), addr(1)]
    assert all(o.msg.digests == () for o in syns)
    net.deliver(addr(2), syns)
    assert back.left_before and back.shadow_answers == {addr(0), addr(1)}
    assert [e.kind for e in back.drain_events()].count("left_before") == 2

    # A node that only restarted is told nothing of the kind.
    fresh = [make_node(i) for i in range(3)]
    net = Net(fresh)
    rounds_to_converge(net, limit=10)
    again = make_node(2, seeds=(0, 1), generation=2)
    net.nodes[addr(2)] = again
    net.deliver(addr(2), again.shadow_round())
    assert not again.left_before and again.shadow_answers == {addr(0), addr(1)}


def test_a_normal_exchange_never_counts_as_a_shadow_answer():
    nodes = [make_node(i) for i in range(3)]
    net = Net(nodes)
    for _ in range(8):
        net.round()
    assert all(not g.shadow_answers and not g.left_before for g in nodes)
