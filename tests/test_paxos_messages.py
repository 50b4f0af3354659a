"""Paxos messages on the wire (ringkv/txn/paxos_messages.py).

Every message type of txn/paxos.py round-trips through msgpack (a table, then
hypothesis over all of them); whatever a peer sends instead is a
ProtocolError naming the field, never another exception (a table of
malformed inputs, then hypothesis garbage); coalesced batches keep the good
items of a batch with a bad one (CockroachDB's coalesced heartbeats, issue
#11 item 2); the commit value and the snapshot pages validate the same way.
The messages are those of "Paxos Made Simple" §2-3 and Spanner §4.1 (leases).
"""

from __future__ import annotations

import math
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ringkv.errors import ProtocolError
from ringkv.txn.paxos import (
    ZERO_BALLOT,
    Accept,
    Accepted,
    AcceptedSlot,
    Ballot,
    CatchUp,
    Commit,
    Entry,
    Heartbeat,
    HeartbeatAck,
    InstallSnapshot,
    Learn,
    Message,
    Prepare,
    Promise,
    Reject,
    Snapshot,
)
from ringkv.txn.paxos_messages import (
    MAX_INT,
    TAGS,
    CommitValue,
    Outbox,
    SnapshotPage,
    SnapshotRequest,
    decode_batch,
    decode_commit_value,
    decode_message,
    encode_batch,
    encode_commit_value,
    encode_message,
)


def wire(obj: Any) -> Any:
    """What the peer's decoder sees: the object through msgpack and back."""
    return msgpack.unpackb(msgpack.packb(obj, use_bin_type=True), raw=False, strict_map_key=False)


B = Ballot(3, "a")
E = Entry(b"value", 1_700_000_000_000_000)
SNAP = Snapshot("a", 40, 1_700_000_000_000_000)

EVERY_TYPE: list[Message] = [
    Prepare("a", B, 7, 12.5),
    Promise("b", B, (AcceptedSlot(7, Ballot(2, "c"), E), AcceptedSlot(8, B, Entry(b"", 0, noop=True))), 12.5),
    Promise("b", B, (), -3.0),  # monotonic clocks may read below zero
    Accept("a", B, ((7, E), (8, E)), 6),
    Accept("a", B, (), 0),  # an empty accept: the commit point only
    Accepted("b", B, (7, 8)),
    Reject("b", B, Ballot(4, "c"), "ballot"),
    Reject("b", B, Ballot(4, "c"), "lease", 1.25),
    Reject("b", B, ZERO_BALLOT, "restart", 2.0),
    Reject("b", B, B, "snapshot"),
    Heartbeat("a", B, 41, 99.0),
    HeartbeatAck("b", B, 99.0, 40, True),
    HeartbeatAck("b", B, 99.0, 0, False),
    Commit("a", B, 41),
    CatchUp("c", 12),
    Learn("a", ((12, E), (13, Entry(b"", 0, noop=True)))),
    InstallSnapshot("a", B, SNAP),
    InstallSnapshot("a", ZERO_BALLOT, SNAP),
    # Membership: a configuration entry, and a snapshot naming the configuration after it.
    Accept("a", B, ((9, Entry(b"", 0, noop=True, members=("a", "b", "d"))),), 8),
    InstallSnapshot("a", B, Snapshot("a", 40, 5, ("a", "b", "c", "d"))),
]


def test_every_message_type_is_covered() -> None:
    assert {type(m) for m in EVERY_TYPE} == set(TAGS.values())


@pytest.mark.parametrize("msg", EVERY_TYPE, ids=lambda m: type(m).__name__)
def test_every_message_round_trips_through_msgpack(msg: Message) -> None:
    """PMS §2-3 and Spanner §4.1's messages arrive as they were sent."""
    raw = wire(encode_message(msg))
    assert decode_message(raw, msg.sender) == msg


def test_the_sender_comes_from_the_envelope_not_the_message() -> None:
    """A peer cannot speak for another node: the message carries no sender."""
    raw = wire(encode_message(Heartbeat("a", B, 1, 1.0)))
    assert "a" not in raw  # the ballot's node id is inside its own list
    assert decode_message(raw, "mallory").sender == "mallory"


# --- malformed input: a table, each naming the field ------------------------------------

HB = [6, [3, "a"], 41, 99.0]  # a good Heartbeat
ACC = [3, [3, "a"], [[7, [b"v", 10, False]]], 6]  # a good Accept

MALFORMED: list[tuple[str, Any, str]] = [
    ("not a list", {"tag": 6}, "message"),
    ("empty list", [], "message"),
    ("unknown tag", [99, [3, "a"]], "message.tag"),
    ("tag as a string", ["6", [3, "a"], 1, 1.0], "message.tag"),
    ("tag as a bool", [True, [3, "a"]], "message.tag"),
    ("too few fields", HB[:3], "Heartbeat"),
    ("too many fields", [*HB, 1], "Heartbeat"),
    ("ballot not a list", [6, "3a", 41, 99.0], "Heartbeat.ballot"),
    ("ballot of three", [6, [3, "a", 1], 41, 99.0], "Heartbeat.ballot"),
    ("negative round", [6, [-1, "a"], 41, 99.0], "Heartbeat.ballot.round"),
    ("round past 2**63-1", [6, [2**63, "a"], 41, 99.0], "Heartbeat.ballot.round"),
    ("round as a bool", [6, [True, "a"], 41, 99.0], "Heartbeat.ballot.round"),
    ("ballot with an empty node", [6, [3, ""], 41, 99.0], "Heartbeat.ballot.node_id"),
    ("ballot node as bytes", [6, [3, b"a"], 41, 99.0], "Heartbeat.ballot.node_id"),
    ("ballot node too long", [6, [3, "n" * 256], 41, 99.0], "Heartbeat.ballot.node_id"),
    ("negative commit point", [6, [3, "a"], -1, 99.0], "Heartbeat.commit_through"),
    ("commit point as float", [6, [3, "a"], 1.0, 99.0], "Heartbeat.commit_through"),
    ("NaN send time", [6, [3, "a"], 41, math.nan], "Heartbeat.sent_s"),
    ("infinite send time", [6, [3, "a"], 41, math.inf], "Heartbeat.sent_s"),
    ("send time as string", [6, [3, "a"], 41, "99"], "Heartbeat.sent_s"),
    ("slot zero", [1, [3, "a"], 0, 1.0], "Prepare.from_slot"),
    ("entries not a list", [3, [3, "a"], {}, 6], "Accept.entries"),
    ("entry pair of one", [3, [3, "a"], [[7]], 6], "Accept.entries[0]"),
    ("entry slot zero", [3, [3, "a"], [[0, [b"v", 10, False]]], 6], "Accept.entries[0].slot"),
    ("entry value as str", [3, [3, "a"], [[7, ["v", 10, False]]], 6], "Accept.entries[0].entry.value"),
    ("entry ts negative", [3, [3, "a"], [[7, [b"v", -1, False]]], 6], "Accept.entries[0].entry.ts_us"),
    ("entry noop as int", [3, [3, "a"], [[7, [b"v", 10, 0]]], 6], "Accept.entries[0].entry.noop"),
    ("second entry bad", [3, [3, "a"], [[7, [b"v", 10, False]], [8, None]], 6], "Accept.entries[1].entry"),
    ("accepted slots not ints", [4, [3, "a"], [7, "8"]], "Accepted.slots[1]"),
    ("unknown reject reason", [5, [3, "a"], [4, "c"], "bored", 0.0], "Reject.reason"),
    ("reject reason as list", [5, [3, "a"], [4, "c"], ["ballot"], 0.0], "Reject.reason"),
    ("negative retry", [5, [3, "a"], [4, "c"], "lease", -1.0], "Reject.retry_after_s"),
    ("ack granted as int", [7, [3, "a"], 1.0, 4, 1], "HeartbeatAck.granted"),
    ("promise accepted item short", [2, [3, "a"], [[7, [2, "c"]]], 1.0], "Promise.accepted[0]"),
    ("promise accepted ballot bad", [2, [3, "a"], [[7, [2, ""], [b"", 0, True]]], 1.0],
     "Promise.accepted[0].ballot.node_id"),
    ("snapshot slot zero", [11, [3, "a"], ["a", 0, 5]], "InstallSnapshot.snapshot.last_slot"),
    ("snapshot handle empty", [11, [3, "a"], ["", 3, 5]], "InstallSnapshot.snapshot.handle"),
    ("snapshot not a list", [11, [3, "a"], None], "InstallSnapshot.snapshot"),
    ("learn entries bad", [10, [[1, [b"", 0]]]], "Learn.entries[0].entry"),
    ("entry of five", [3, [3, "a"], [[7, [b"", 0, True, ["a"], 1]]], 6], "Accept.entries[0].entry"),
    ("members not a list", [3, [3, "a"], [[7, [b"", 0, True, "ab"]]], 6], "Accept.entries[0].entry.members"),
    ("no members", [3, [3, "a"], [[7, [b"", 0, True, []]]], 6], "Accept.entries[0].entry.members"),
    ("member twice", [3, [3, "a"], [[7, [b"", 0, True, ["a", "a"]]]], 6], "Accept.entries[0].entry.members"),
    ("member empty", [3, [3, "a"], [[7, [b"", 0, True, ["a", ""]]]], 6], "Accept.entries[0].entry.members[1]"),
    ("snapshot members bad", [11, [3, "a"], ["a", 3, 5, [7]]], "InstallSnapshot.snapshot.members[0]"),
]


@pytest.mark.parametrize("name, raw, field", MALFORMED, ids=[case[0] for case in MALFORMED])
def test_malformed_messages_are_protocol_errors_naming_the_field(name: str, raw: Any, field: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        decode_message(wire(raw), "b")
    assert caught.value.details["field"] == field, caught.value.message
    assert field in caught.value.message


def test_the_good_rows_of_the_malformed_table_are_good() -> None:
    """The table's base messages decode, so each row fails for its own reason."""
    assert isinstance(decode_message(wire(HB), "a"), Heartbeat)
    assert isinstance(decode_message(wire(ACC), "a"), Accept)


# --- hypothesis: every message round-trips; garbage is only ever a ProtocolError ------------

nodes = st.text(min_size=1, max_size=12)
ints = st.integers(0, MAX_INT)
slots = st.integers(1, MAX_INT)
times = st.floats(allow_nan=False, allow_infinity=False)
ballots = st.one_of(st.just(ZERO_BALLOT), st.builds(Ballot, ints, nodes))
member_sets = st.one_of(st.none(), st.sets(nodes, min_size=1, max_size=5).map(lambda m: tuple(sorted(m))))
entries = st.builds(Entry, st.binary(max_size=40), ints, st.booleans(), member_sets)
slot_entries = st.lists(st.tuples(slots, entries), max_size=4).map(tuple)
snapshots = st.builds(Snapshot, st.text(min_size=1, max_size=20), slots, ints, member_sets)

messages = st.one_of(
    st.builds(Prepare, nodes, ballots, slots, times),
    st.builds(Promise, nodes, ballots, st.lists(st.builds(AcceptedSlot, slots, ballots, entries),
                                                max_size=4).map(tuple), times),
    st.builds(Accept, nodes, ballots, slot_entries, ints),
    st.builds(Accepted, nodes, ballots, st.lists(slots, max_size=5).map(tuple)),
    st.builds(Reject, nodes, ballots, ballots, st.sampled_from(["ballot", "lease", "restart", "snapshot"]),
              st.floats(min_value=0, allow_infinity=False)),
    st.builds(Heartbeat, nodes, ballots, ints, times),
    st.builds(HeartbeatAck, nodes, ballots, times, ints, st.booleans()),
    st.builds(Commit, nodes, ballots, ints),
    st.builds(CatchUp, nodes, slots),
    st.builds(Learn, nodes, slot_entries),
    st.builds(InstallSnapshot, nodes, ballots, snapshots),
)


@given(messages)
def test_any_message_round_trips(msg: Message) -> None:
    assert decode_message(wire(encode_message(msg)), msg.sender) == msg


@given(st.lists(st.tuples(st.text(min_size=1, max_size=10), messages), max_size=6))
def test_any_batch_round_trips(items: list[tuple[str, Message]]) -> None:
    """One sender per batch: every item comes back as that sender's."""
    batch = decode_batch(wire(encode_batch("n1", items)), expect_sender="n1")
    assert batch.errors == []
    assert [(g, m) for g, m in batch.items] == [
        (g, decode_message(encode_message(m), "n1")) for g, m in items]


garbage = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**64) + 1, 2**64 - 1) | st.floats()
    | st.text(max_size=8) | st.binary(max_size=8),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=4), children, max_size=3),
    max_leaves=20,
)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(garbage)
def test_garbage_is_only_ever_a_protocol_error(raw: Any) -> None:
    for decode in (lambda r: decode_message(r, "b"), lambda r: decode_batch(r),
                   SnapshotRequest.from_wire, SnapshotPage.from_wire):
        try:
            decode(raw)
        except ProtocolError:
            pass


@given(messages, st.data())
def test_a_valid_message_with_one_part_replaced_is_caught_or_still_valid(msg: Message, data: st.DataObject) -> None:
    """Mutants near the valid shape (where a careless decoder crashes) decode or are refused."""
    raw = wire(encode_message(msg))
    # Walk down to a random nested list and replace one element with garbage.
    target = raw
    while True:
        index = data.draw(st.integers(0, len(target) - 1))
        if isinstance(target[index], list) and target[index] and data.draw(st.booleans()):
            target = target[index]
            continue
        target[index] = data.draw(garbage)
        break
    try:
        decoded = decode_message(raw, msg.sender)
    except ProtocolError:
        return
    assert type(decoded) in TAGS.values()


# --- batches -----------------------------------------------------------------------------------


def test_a_batch_keeps_its_good_items_and_reports_the_bad_ones() -> None:
    """Issue #11 item 2: one bad item (a type this node does not know, say) does not
    cost the other groups their heartbeats."""
    raw = wire(encode_batch("a", [("ks/1", Heartbeat("a", B, 1, 1.0)), ("ks/2", Commit("a", B, 3))]))
    raw[2].insert(1, ["ks/9", [42, "from the future"]])
    raw[2].append(["", [8, [3, "a"], 1]])  # empty group id
    raw[2].append("not an item")
    batch = decode_batch(raw)
    assert [g for g, _ in batch.items] == ["ks/1", "ks/2"]
    assert [e.details["field"] for e in batch.errors] == [
        "message.tag", "batch.items[3].group_id", "batch.items[4]"]


@pytest.mark.parametrize("raw, field", [
    ("batch", "batch"),
    ([1, "a"], "batch"),
    ([2, "a", []], "batch.format"),
    ([True, "a", []], "batch.format"),
    ([1, "", []], "batch.sender"),
    ([1, 7, []], "batch.sender"),
    ([1, "a", {}], "batch.items"),
])
def test_a_malformed_batch_envelope_is_a_protocol_error(raw: Any, field: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        decode_batch(raw)
    assert caught.value.details["field"] == field


def test_a_batch_from_someone_else_than_the_connection_is_refused() -> None:
    raw = wire(encode_batch("a", [("ks/1", Heartbeat("a", B, 1, 1.0))]))
    assert decode_batch(raw, expect_sender="a").items
    with pytest.raises(ProtocolError, match="not the connection's peer"):
        decode_batch(raw, expect_sender="b")


def test_the_outbox_sends_one_batch_per_destination_per_turn() -> None:
    """Coalesced heartbeats: 100 groups' heartbeats to two peers are two messages."""
    outbox = Outbox("a")
    for g in range(100):
        for peer in ("b", "c"):
            outbox.add(peer, f"ks/{g}", Heartbeat("a", Ballot(1, "a"), g, 5.0))
    taken = outbox.take()
    assert sorted(taken) == ["b", "c"] and all(len(batches) == 1 for batches in taken.values())
    batch = decode_batch(wire(taken["b"][0]), expect_sender="a")
    assert [g for g, _ in batch.items] == [f"ks/{g}" for g in range(100)]
    assert (outbox.messages, outbox.batches) == (200, 2)
    assert not outbox and outbox.take() == {}
    size = len(msgpack.packb(taken["b"][0], use_bin_type=True))
    assert size < 100 * 30  # about 20 bytes per group's heartbeat


def test_the_outbox_cuts_batches_at_its_byte_budget() -> None:
    outbox = Outbox("a", budget_bytes=3_000)
    big = Entry(b"x" * 1_000, 5)
    for slot in range(1, 7):
        outbox.add("b", "ks/1", Accept("a", B, ((slot, big),), 0))
    batches = outbox.take()["b"]
    assert len(batches) == 3
    slots = [m.entries[0][0] for raw in batches for _, m in decode_batch(wire(raw)).items
             if isinstance(m, Accept)]
    assert slots == [1, 2, 3, 4, 5, 6]  # in order across the cut


# --- the commit value ------------------------------------------------------------------------------

writes = st.lists(st.tuples(st.binary(min_size=1, max_size=16), st.none() | st.binary(max_size=16)),
                  max_size=6, unique_by=lambda w: w[0]).map(tuple)


@given(st.builds(CommitValue, st.text(min_size=1, max_size=40), ints, writes))
def test_a_commit_value_round_trips(value: CommitValue) -> None:
    assert decode_commit_value(encode_commit_value(value)) == value


def pack(obj: Any) -> bytes:
    return bytes(msgpack.packb(obj, use_bin_type=True))


@pytest.mark.parametrize("data, field", [
    (b"\xc1", "commit"),  # not msgpack
    (b"", "commit"),
    (pack({"t": 1}), "commit"),
    (pack([2, "t", 1, []]), "commit.format"),
    (pack([1, "", 1, []]), "commit.txn_id"),
    (pack([1, "t" * 129, 1, []]), "commit.txn_id"),
    (pack([1, "t", -1, []]), "commit.commit_ts_us"),
    (pack([1, "t", 1, {}]), "commit.writes"),
    (pack([1, "t", 1, [[b"k"]]]), "commit.writes[0]"),
    (pack([1, "t", 1, [["k", b"v"]]]), "commit.writes[0].key"),
    (pack([1, "t", 1, [[b"", b"v"]]]), "commit.writes[0].key"),
    (pack([1, "t", 1, [[b"k", "v"]]]), "commit.writes[0].value"),
    (pack([1, "t", 1, [[b"k", b"v"], [b"k", None]]]), "commit.writes[1].key"),
])
def test_a_malformed_commit_value_names_the_field(data: bytes, field: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        decode_commit_value(data)
    assert caught.value.details["field"] == field


def test_encoding_refuses_a_malformed_commit() -> None:
    with pytest.raises(ProtocolError, match="repeats"):
        encode_commit_value(CommitValue("t", 1, ((b"k", b"1"), (b"k", b"2"))))
    with pytest.raises(ProtocolError, match="txn_id"):
        encode_commit_value(CommitValue("", 1, ()))


# --- snapshot pages -----------------------------------------------------------------------------------


def test_snapshot_requests_and_pages_round_trip() -> None:
    request = SnapshotRequest("ks/5", SNAP, b"m\x02ks", 500)
    assert SnapshotRequest.from_wire(wire(request.to_wire())) == request
    first = SnapshotRequest("ks/5", SNAP, None, 1)
    assert SnapshotRequest.from_wire(wire(first.to_wire())) == first
    page = SnapshotPage(((b"k1", b"r1"), (b"k2", b"r2")), b"k9", 77)
    assert SnapshotPage.from_wire(wire(page.to_wire())) == page
    last = SnapshotPage((), None, 0)
    assert SnapshotPage.from_wire(wire(last.to_wire())) == last


@pytest.mark.parametrize("raw, field", [
    (["ks/5", ["a", 4, 5], "after", 10], "snapshot_request.after"),
    (["ks/5", ["a", 4, 5], None, 0], "snapshot_request.limit"),
    (["ks/5", ["a", 4, 5], None, 10**6], "snapshot_request.limit"),
    (["", ["a", 4, 5], None, 10], "snapshot_request.group_id"),
    (["ks/5", ["a", 0, 5], None, 10], "snapshot_request.snapshot.last_slot"),
])
def test_malformed_snapshot_requests(raw: Any, field: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        SnapshotRequest.from_wire(raw)
    assert caught.value.details["field"] == field


@pytest.mark.parametrize("raw, field", [
    ([[[b"k", "r"]], None, 0], "snapshot_page.items[0]"),
    ([[[b"k"]], None, 0], "snapshot_page.items[0]"),
    ([[], "k", 0], "snapshot_page.resume_after"),
    ([[], None, -5], "snapshot_page.gc_threshold_us"),
    ([None, None, 0], "snapshot_page.items"),
])
def test_malformed_snapshot_pages(raw: Any, field: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        SnapshotPage.from_wire(raw)
    assert caught.value.details["field"] == field
