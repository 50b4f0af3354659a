"""Session leases' decisions (``txn/leases.py``), without a node.

Expiry is judged on TrueTime intervals only: a lease lives while
``TT.now().earliest`` has not passed its deadline, whatever one clock says.
The expiry transaction deletes exactly the keys still attached (newest
version = the attaching one), under conditions that make a key overwritten
after the plan safe; the checker of that is proved by a planted bug.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping

import pytest

from ringkv.errors import BadRequest, CorruptRecord, Overloaded, TooLarge
from ringkv.txn import leases as L
from ringkv.txn.leader import COMMIT, CONDITION_FAILED, Current, evaluate
from ringkv.txn.truetime import TTInterval

KS = "bank"
LEASE = L.LeaseId(KS, "00000000000000aa")
S = 1_000_000_000  # a commit timestamp (µs)


def test_the_deadline_is_the_records_own_commit_timestamp_plus_ttl() -> None:
    record = L.LeaseRecord(ttl_s=2)
    assert L.expires_at_us(record, S) == S + 2_000_000
    # Renewed at a later commit: the deadline moves with the renewing commit.
    renewed = L.renewed(record, S)
    assert L.expires_at_us(renewed, S + 500_000) == S + 2_500_000


def test_a_lease_lives_while_true_time_may_not_have_passed_its_deadline() -> None:
    record, deadline = L.LeaseRecord(ttl_s=2), S + 2_000_000
    # A local clock (the midpoint) well past the deadline: still not expired, since
    # the earliest true time has not passed it.
    wide = TTInterval(deadline - 1, deadline + 10_000_000)
    assert wide.midpoint_us > deadline
    assert not L.is_expired(record, S, wide)
    assert not L.is_expired(record, S, TTInterval(deadline, deadline + 5))
    assert L.is_expired(record, S, TTInterval(deadline + 1, deadline + 2))
    # What it surely has left is counted from the latest true time.
    assert L.remaining_ms(record, S, TTInterval(S, S + 500_000)) == 1500
    assert L.remaining_ms(record, S, wide) == 0


def test_attach_resolves_earlier_keys_to_the_version_that_wrote_them() -> None:
    record = L.LeaseRecord(ttl_s=5)
    after_a = L.attached(record, S, b"a", max_keys=4)
    assert after_a.keys == {b"a": None}
    assert after_a.expires_at_us == S + 5_000_000  # an attach does not renew
    t1 = S + 100
    after_b = L.attached(after_a, t1, b"b", max_keys=4)
    assert after_b.keys == {b"a": t1, b"b": None}
    assert L.renewed(after_b, S + 200).keys == {b"a": t1, b"b": S + 200}
    with pytest.raises(TooLarge):
        L.attached(after_b, S + 200, b"c", max_keys=2)
    assert L.attached(after_b, S + 200, b"a", max_keys=2).keys == {b"a": None, b"b": S + 200}


def test_records_and_directories_round_trip_and_damage_is_typed() -> None:
    record = L.LeaseRecord(3, S, {b"k/1": S - 5, b"k/2": None})
    assert L.decode_record(L.encode_record(record)) == record
    with pytest.raises(CorruptRecord):
        L.decode_record(b'{"ttl_s": "x", "expires_at_us": null, "keys": {}}')
    with pytest.raises(CorruptRecord):
        L.decode_directory(b"[1]", S)
    assert L.decode_directory(L.encode_directory(["b", "a"]), S) == L.Directory(("a", "b"), S)
    assert L.decode_directory(None, None) == L.Directory()


def test_ids_name_their_keyspace_and_bad_ones_name_the_field() -> None:
    lease = L.new_id("t.x", random.Random(1))
    assert L.parse_id(str(lease)) == lease
    for bad in ("t", "t:xyz", ":00000000000000aa", 7, None, "t:00000000000000AA"):
        with pytest.raises(BadRequest) as caught:
            L.parse_id(bad, field="lease")
        assert caught.value.details["field"] == "lease"
    assert L.is_reserved(L.record_key(lease)) and L.is_reserved(L.DIRECTORY_KEY)
    assert not L.is_reserved(b"lease/x")
    for ttl in (0, -1, True, 2.5, "2", 11):
        with pytest.raises(BadRequest):
            L.check_ttl(ttl, 10)
    assert L.check_ttl(10, 10) == 10


def test_a_full_directory_refuses_a_grant() -> None:
    full = L.Directory(("a", "b"), S)
    with pytest.raises(Overloaded):
        L.grant_txn(KS, LEASE, 2, full, max_leases=2)
    txn = L.grant_txn(KS, LEASE, 2, L.Directory(("a",), S), max_leases=2)
    assert [c.kind for c in txn.conditions] == ["absent", "version"]


def test_a_nodes_waiting_grants_are_one_directory_write() -> None:
    """Grants arriving together at a node go as one transaction: every record created
    (each absent before), the directory listing them all, conditioned on its version;
    the room left in the keyspace (``txn.max_leases``) bounds how many a batch grants."""
    other = L.LeaseId(KS, "0123456789abcdef")
    txn = L.grants_txn(KS, [(LEASE, 2), (other, 5)], L.Directory(("a",), S), max_leases=4)
    assert [c.kind for c in txn.conditions] == ["absent", "absent", "version"]
    assert [w.key for w in txn.writes] == [L.record_key(LEASE), L.record_key(other),
                                           L.DIRECTORY_KEY]
    listed = L.decode_directory(txn.writes[-1].value, S + 1)
    assert set(listed.tags) == {"a", LEASE.tag, other.tag}
    assert L.grant_room(L.Directory(("a",), S), 4) == 3
    assert L.grant_room(L.Directory(("a", "b"), S), 2) == 0
    with pytest.raises(Overloaded):
        L.grants_txn(KS, [(LEASE, 2), (other, 5)], L.Directory(("a",), S), max_leases=2)


# -- the expiry plan: only still-attached keys, and only if still so when it commits --------

# The lease attached a at S, b at S+1 and c at S+2; then b was overwritten without the
# lease (S+3) and c deleted (S+4); d was never attached.
RECORD_VERSION = S + 2
RECORD = L.LeaseRecord(2, S + 2_000_000, {b"a": S, b"b": S + 1, b"c": None})
STATE: dict[bytes, Current] = {
    L.record_key(LEASE): Current(L.encode_record(RECORD), RECORD_VERSION),
    b"a": Current(b'"A"', S), b"b": Current(b'"mine"', S + 3), b"c": Current(None, S + 4),
    b"d": Current(b'"D"', S + 5),
}
Plan = Callable[[L.LeaseRecord, int, Mapping[bytes, tuple[bytes | None, int | None]]],
                dict[bytes, int]]


def deleted_by_expiry(plan: Plan, state: Mapping[bytes, Current],
                      race: Mapping[bytes, Current] | None = None) -> set[bytes]:
    """What the expiry deletes, planned on ``state`` and committed on ``race`` (the
    state when it commits, evaluated as the leader does)."""
    current = {k: (c.value, c.version_us) for k, c in state.items()}
    keys = plan(RECORD, RECORD_VERSION, current)
    txn = L.expiry_txn(KS, LEASE, RECORD_VERSION, keys)
    verdict = evaluate(txn, race if race is not None else state)
    if verdict.kind == CONDITION_FAILED:
        return set()
    assert verdict.kind == COMMIT
    return {k for k, v in verdict.writes if v is None and not L.is_reserved(k)}


def check_deletes_only_attached(plan: Plan) -> None:
    assert deleted_by_expiry(plan, STATE) == {b"a"}
    # a is overwritten by someone else between the plan and the commit: nothing goes.
    raced = {**STATE, b"a": Current(b'"theirs"', S + 9)}
    assert deleted_by_expiry(plan, STATE, raced) == set()
    # A keepalive committed between the plan and the commit: nothing goes.
    renewed = {**STATE, L.record_key(LEASE): Current(b"{}", RECORD_VERSION + 7)}
    assert deleted_by_expiry(plan, STATE, renewed) == set()


def test_the_expiry_deletes_exactly_the_keys_still_attached() -> None:
    check_deletes_only_attached(L.still_attached)
    txn = L.expiry_txn(KS, LEASE, RECORD_VERSION, {b"a": S})
    assert [w.key for w in txn.writes] == [L.record_key(LEASE), b"a"]
    assert txn.conditions[0].key == L.record_key(LEASE)


def test_the_check_catches_an_expiry_that_deletes_every_key_it_ever_held() -> None:
    def planted(record: L.LeaseRecord, version_us: int,
                current: Mapping[bytes, tuple[bytes | None, int | None]]) -> dict[bytes, int]:
        # The bug: every key the record names, at whatever version it holds now.
        return {k: v for k in record.keys if (v := current[k][1]) is not None
                and current[k][0] is not None}

    with pytest.raises(AssertionError):
        check_deletes_only_attached(planted)


def apply(state: Mapping[bytes, Current], writes: tuple[tuple[bytes, bytes | None], ...],
          at_us: int) -> dict[bytes, Current]:
    return {**state, **{k: Current(v, at_us) for k, v in writes}}


def test_a_keepalive_and_an_expiry_planned_together_never_both_commit() -> None:
    keys = L.still_attached(RECORD, RECORD_VERSION,
                            {k: (c.value, c.version_us) for k, c in STATE.items()})
    keepalive = L.keepalive_txn(KS, LEASE, RECORD, RECORD_VERSION)
    expiry = L.expiry_txn(KS, LEASE, RECORD_VERSION, keys)
    for first, second in ((keepalive, expiry), (expiry, keepalive)):
        verdict = evaluate(first, STATE)
        assert verdict.kind == COMMIT
        after = apply(STATE, verdict.writes, S + 50)
        assert evaluate(second, after).kind == CONDITION_FAILED
    # The renewed record keeps a attached (at the version that wrote it).
    verdict = evaluate(keepalive, STATE)
    after = apply(STATE, verdict.writes, S + 50)
    record_now = after[L.record_key(LEASE)]
    assert record_now.value is not None
    renewed = L.decode_record(record_now.value)
    assert L.expires_at_us(renewed, S + 50) == S + 50 + 2_000_000
    current = {k: (c.value, c.version_us) for k, c in after.items()}
    assert L.still_attached(renewed, S + 50, current) == {b"a": S}


def test_a_full_lease_drops_its_detached_keys_to_take_another() -> None:
    current = {k: (c.value, c.version_us) for k, c in STATE.items()}
    slim = L.pruned(RECORD, RECORD_VERSION, current)
    assert slim.keys == {b"a": S}  # b overwritten, c deleted: detached
    assert L.expires_at_us(slim, S + 99) == L.expires_at_us(RECORD, RECORD_VERSION)
    with pytest.raises(TooLarge):
        L.attached(RECORD, RECORD_VERSION, b"e", max_keys=3)
    assert L.attached(slim, RECORD_VERSION, b"e", max_keys=3).keys == {b"a": S, b"e": None}
