"""Membership change through the group's own log (Paxos Made Simple §3's
reconfiguration, Raft §6's single-server change, Spanner §4.1's lease
disjointness): unit cases for the rules, then whole-group runs in the
paxos_world with faults, and a planted bug the checkers catch."""

from __future__ import annotations

import random

import pytest

from ringkv.txn.paxos import (
    Accepted,
    Entry,
    Heartbeat,
    HeartbeatAck,
    InstallSnapshot,
    PaxosReplica,
    PersistedState,
    ProposalRefused,
    Ready,
    Role,
)
from tests.paxos_world import World
from tests.test_paxos import elect

ABC = frozenset("abc")
ABCD = frozenset("abcd")


def committed_config(leader: PaxosReplica, members: frozenset[str], now_s: float = 10.2) -> Ready:
    """Propose ``members`` at ``leader`` (elected in {a,b,c}) and have b accept it."""
    ready = leader.change_members(members, now_s)
    slot = leader.next_slot - 1
    assert leader._config_slot == slot
    ready2 = leader.step(Accepted("b", leader.ballot, (slot,)), now_s + 0.01)
    return Ready(ready.persist + ready2.persist, ready.messages + ready2.messages, None,
                 ready.committed + ready2.committed)


def caught_up(leader: PaxosReplica, node: str, now_s: float = 10.1) -> None:
    """``node`` acknowledges the leader's commit point, as a learner does."""
    leader._learners.setdefault(node, -1)
    leader.tick(now_s, random.Random(5))  # a heartbeat, to the learner too
    sent_s = leader._last_beat[0]
    leader.step(HeartbeatAck(node, leader.ballot, sent_s, leader.commit_through, False), now_s)


@pytest.mark.parametrize("target, reason", [
    (frozenset("abde"), "bad_config"),  # two added at once
    (frozenset("ad"), "bad_config"),  # one swapped for another: two changes
    (frozenset("a"), "bad_config"),  # two removed at once
    (ABC, "bad_config"),  # no change
    (ABCD, "catching_up"),  # d has not caught up yet
])
def test_one_member_at_a_time_and_only_caught_up(target: frozenset[str], reason: str) -> None:
    """Raft §6: changes go one server at a time; a new one holds the log before it counts."""
    leader = elect("a")
    with pytest.raises(ProposalRefused) as refused:
        leader.change_members(target, 10.1)
    assert refused.value.reason == reason


def test_a_joining_node_is_sent_heartbeats_and_caught_up() -> None:
    leader = elect("a")
    with pytest.raises(ProposalRefused):
        leader.change_members(ABCD, 10.1)
    ready = leader.tick(10.6, random.Random(1))
    assert any(out.to == "d" and isinstance(out.msg, Heartbeat) for out in ready.messages)
    caught_up(leader, "d", 10.7)
    leader.change_members(ABCD, 10.7)  # now taken


def test_a_configuration_takes_effect_when_chosen_and_the_leader_reruns_phase_one() -> None:
    """The entry is decided by the old configuration; slots after it by the new
    one, under a phase 1 run with a quorum of the new members."""
    leader = elect("a")
    caught_up(leader, "d")
    ready = leader.change_members(ABCD, 10.2)
    assert leader.members == ABC  # appended is not enough
    assert not leader.lease_valid(10.2) and leader.assign_ts(10.2, 0, 1) is None
    with pytest.raises(ProposalRefused, match="config_change"):
        leader.propose(b"x", 10.2, ts_us=10**9)
    with pytest.raises(ProposalRefused, match="config_change"):
        leader.change_members(frozenset("abd"), 10.2)  # the first one is not chosen yet
    assert [out.to for out in ready.messages] == ["b", "c"]  # decided by {a,b,c}
    ready = leader.step(Accepted("b", leader.ballot, (leader.next_slot - 1,)), 10.3)
    assert leader.members == ABCD and leader.quorum == 3
    assert leader.role is Role.CANDIDATE  # phase 1 again, now with d
    prepares = {out.to for out in ready.messages if type(out.msg).__name__ == "Prepare"}
    assert prepares == {"b", "c", "d"}
    assert any(item.entry.members == tuple(sorted(ABCD)) for item in ready.committed)


def test_the_next_change_waits_for_the_lease_counted_under_the_old_configuration() -> None:
    leader = elect("a")
    caught_up(leader, "d")
    committed_config(leader, ABCD)
    old_end = leader._change_not_before_s
    assert old_end > 10.3
    # The new phase 1: b, c and d promise, and a leads {a,b,c,d}.
    from tests.test_paxos import Promise
    prepare_ballot = leader.ballot
    for peer in "bcd":
        leader.step(Promise(peer, prepare_ballot, (), 10.3), 10.31)
    assert leader.is_leader(10.32)
    with pytest.raises(ProposalRefused, match="config_change"):
        leader.change_members(frozenset("abd"), 10.4)
    leader.tick(old_end + 0.01, random.Random(2))
    for peer in "bcd":
        leader.step(HeartbeatAck(peer, leader.ballot, old_end + 0.01, leader.commit_through, True), old_end + 0.02)
    leader.change_members(frozenset("abd"), old_end + 0.03)


def test_a_leader_that_removes_itself_steps_down_and_votes_no_more() -> None:
    leader = elect("a")
    committed_config(leader, frozenset("bc"))
    assert leader.role is Role.FOLLOWER and leader.removed
    assert not leader.is_leader(10.5)
    from tests.test_paxos import Prepare
    from ringkv.txn.paxos import Ballot
    assert not leader.step(Prepare("b", Ballot(9, "b"), 1, 20.0), 20.0).messages
    assert leader.tick(100.0, random.Random(3)).messages == []  # never stands again


def test_restart_recovers_the_configuration_from_the_log_and_the_snapshot() -> None:
    """Persisted with the log: the fold of what was persisted gives the configuration back."""
    leader = elect("a")
    caught_up(leader, "d")
    disk = PersistedState()
    disk.apply(committed_config(leader, ABCD).persist)
    restored = PaxosReplica.restore("a", "bc", disk.copy(), 50.0)
    assert restored.members == ABCD
    assert leader.applied_through == leader.commit_through
    snap = leader.compact(leader.commit_through, "h")
    disk.apply(snap.persist)
    assert disk.snapshot is not None and disk.snapshot.members == tuple(sorted(ABCD))
    restored = PaxosReplica.restore("a", "bc", disk.copy(), 60.0)
    assert restored.members == ABCD and restored.quorum == 3


def test_a_learner_joins_by_the_snapshot_and_then_counts() -> None:
    leader = elect("a")
    caught_up(leader, "d")
    committed_config(leader, ABCD)
    leader.compact(leader.commit_through, "h")
    learner = PaxosReplica("d", [], ABC)
    assert learner.tick(100.0, random.Random(4)).messages == []  # not a member: never stands
    assert leader.snapshot is not None
    learner.step(InstallSnapshot("a", leader.ballot, leader.snapshot), 10.4)
    assert learner.members == ABCD and not learner.removed


def test_a_configuration_entry_is_never_superseded_and_is_no_data() -> None:
    entry = Entry(b"", 0, noop=True, members=("a", "b"))
    assert entry.noop  # the shell applies no data for it


# --- whole-group runs --------------------------------------------------------------------

PLAN = [frozenset({"n0", "n1", "n2", "n3"}), frozenset({"n1", "n2", "n3"}),
        frozenset({"n1", "n2", "n3", "n4"}), frozenset({"n2", "n3", "n4"})]


def run_moves(seed: int, **world: object) -> tuple[World, int]:
    w = World(seed, spares=2, **world)  # type: ignore[arg-type]
    w.run_until(2.0)
    done = w.reconfigure(PLAN, 40.0)
    w.heal()
    done = w.reconfigure(PLAN, w.now + 30.0, chaos=False) if done < len(PLAN) else done
    w.propose_rate = 0.0
    # Quiet: the final members converge (bounded; a leader that removed itself
    # leaves its votes to be waited out first, then an election).
    deadline = w.now + 15.0
    while w.now < deadline:
        w.run_until(w.now + 0.5)
        if len({w.nodes[n].applied_through for n in PLAN[-1]} | {max(w.committed, default=0)}) == 1:
            break
    return w, done


@pytest.mark.parametrize("first_seed", range(0, 60, 20))
def test_members_move_under_chaos(first_seed: int) -> None:
    """{n0,n1,n2} -> +n3 -> -n0 -> +n4 -> -n1, one member at a time, under
    loss, duplication, reordering, partitions, crashes (leaders included) and
    drifting clocks: no slot gets two values (PMS §2.1), leases never overlap
    (Spanner §4.1), timestamps rise (§4.1.1), and after heal the plan completes
    and the final members converge."""
    seen: dict[str, int] = {}
    for seed in range(first_seed, first_seed + 20):
        w, done = run_moves(seed)
        for kind in ("crash", "leader removes itself", "snapshot installed"):
            seen[kind] = seen.get(kind, 0) + w.counts.get(kind, 0)
        found = w.violations + w.lease_overlaps()
        assert not found, f"seed {seed}: {found[:3]}"
        assert done == len(PLAN), f"seed {seed}: {done} of {len(PLAN)} changes: {w.counts}"
        final = PLAN[-1]
        through = {n: w.nodes[n].applied_through for n in final}
        assert len(set(through.values())) == 1, f"seed {seed}: {through}"
        for n in final:
            replica = w.nodes[n].replica
            assert replica is not None and replica.members == final, (seed, n)
    # The runs crashed leaders, had leaders remove themselves and caught nodes up by snapshot.
    assert all(seen[kind] >= 1 for kind in seen), seen


# --- a stale member of an old configuration: why a lease waits for a pending change ----------


class LeaseWhileConfigPending(PaxosReplica):
    """Planted bug: serves under its lease while a configuration entry found in
    its phase 1 is still unchosen, i.e. before its view of the members is current."""

    def lease_valid(self, now_s: float) -> bool:
        return self._lease_start_s is not None and now_s < self._lease_end_s


def stale_candidate_scenario(seed: int, replica_cls: type[PaxosReplica]) -> World:
    """a leads {a,b,c}. With c cut off, d is added and then c removed, so a leads
    {a,b,d} on the votes of {a,d}. Then b is cut off from a and d but can reach
    c. c never learned either change: it stands in {a,b,c} and b, whose vote
    for a has lapsed, promises. {b,c} and {a,d} share no member, so c must not
    count a lease until its view is current (its phase 1 finds the pending
    configuration entry b accepted)."""
    w = World(seed, spares=1, compact_every=0, replica_cls=replica_cls)
    ids = list(w.nodes)
    w.run_until(3.0)
    a = w.leader()
    assert a is not None
    b, c = sorted(n for n in w.initial_members if n != a)
    d = "n3"
    w.faults.cut = {(x, y) for x in ids for y in ids if (x == c) != (y == c)}
    plan = [frozenset({a, b, c, d}), frozenset({a, b, d})]
    assert w.reconfigure(plan, 30.0, chaos=False) == 2
    assert w.leader() == a
    stale = w.nodes[c].replica
    assert stale is not None and stale.members == frozenset({a, b, c})  # it knows neither change
    w.faults.cut = {(x, y) for x in ids for y in ids
                    if ({x, y} & {b, c} and {x, y} & {a, d}) or (x == d and y == c) or (x == c and y == d)}
    w.run_until(w.now + 15.0)
    return w


def test_a_stale_member_cannot_hold_a_lease_beside_the_new_configurations_leader() -> None:
    """Spanner §4.1 disjointness across a change: the planted bug is caught by
    the lease checker, and the correct code in the same runs is clean."""
    caught = 0
    for seed in range(10):
        w = stale_candidate_scenario(seed, LeaseWhileConfigPending)
        caught += bool(w.lease_overlaps() or w.violations)
        w = stale_candidate_scenario(seed, PaxosReplica)
        assert not (w.lease_overlaps() + w.violations), f"seed {seed}: {(w.lease_overlaps() + w.violations)[:3]}"
    assert caught == 10


def majorities(members: frozenset[str]) -> list[frozenset[str]]:
    from itertools import combinations
    need = len(members) // 2 + 1
    return [frozenset(c) for c in combinations(sorted(members), need)]


def test_why_one_member_at_a_time_quorums_of_adjacent_configurations_intersect() -> None:
    """Raft §6's argument, which rule 3 ("Membership") rests on: the voters
    backing a lease counted under C (a majority of C) meet every majority of
    C plus or minus one member, so nobody leads C' before that lease ends.
    Swapping one member (two changes at once) breaks it from five members on."""
    nodes = [f"n{i}" for i in range(7)]
    for size in range(1, 6):
        old = frozenset(nodes[:size])
        for new in [old | {nodes[size]}] + [old - {n} for n in old if size > 1]:
            assert all(m & q for m in majorities(old) for q in majorities(new)), (old, new)
    old = frozenset(nodes[:5])
    swapped = old - {"n0"} | {"n5"}
    assert any(not (m & q) for m in majorities(old) for q in majorities(swapped))


def test_a_removed_node_answers_heartbeats_unvoted_so_it_can_be_added_back() -> None:
    """Removed, it votes and promises no more (Spanner §4.1: its vote must not count),
    yet it says how far behind it is, which is what a leader adding it back needs."""
    leader = elect("a")
    committed_config(leader, frozenset("bc"))
    assert leader.removed
    promised = leader.promised
    from ringkv.txn.paxos import Ballot
    ready = leader.step(Heartbeat("b", Ballot(9, "b"), leader.commit_through, 20.0), 20.0)
    acks = [out.msg for out in ready.messages if isinstance(out.msg, HeartbeatAck)]
    assert len(acks) == 1 and not acks[0].granted and acks[0].commit_through == leader.commit_through
    assert leader.promised == promised and not ready.persist  # no promise, no vote


def test_a_leader_heartbeats_a_removed_node_until_it_has_learned_its_removal() -> None:
    """The Commit of the entry that removes c goes to the new peers only; c may have
    missed the entry, so the leader heartbeats it (answers only) until c
    acknowledges the slot, then stops."""
    from tests.test_paxos import Promise
    leader = elect("a")
    caught_up(leader, "d")
    committed_config(leader, ABCD)
    old_end = leader._change_not_before_s
    for peer in "bcd":  # the new phase 1
        leader.step(Promise(peer, leader.ballot, (), 10.3), 10.31)
    leader.tick(old_end + 0.01, random.Random(2))
    for peer in "bcd":
        leader.step(HeartbeatAck(peer, leader.ballot, old_end + 0.01, leader.commit_through, True),
                    old_end + 0.02)
    ready = leader.change_members(frozenset("abd"), old_end + 0.03)
    slot = leader.next_slot - 1
    for voter in "bd":
        leader.step(Accepted(voter, leader.ballot, (slot,)), old_end + 0.04)
    assert leader.members == frozenset("abd") and leader.departed() == frozenset("c")
    for peer in "bd":  # phase 1 again, among {a,b,d}
        leader.step(Promise(peer, leader.ballot, (), old_end + 0.05), old_end + 0.05)
    beats = leader.tick(30.0, random.Random(5))
    to_c = [out.msg for out in beats.messages if out.to == "c"]
    assert any(isinstance(m, Heartbeat) for m in to_c)
    sent_s = leader._last_beat[0]
    leader.step(HeartbeatAck("c", leader.ballot, sent_s, slot - 1, False), 30.0)
    assert leader.departed() == frozenset("c")  # behind the slot that removed it: still heartbeated
    leader.step(HeartbeatAck("c", leader.ballot, sent_s, slot, False), 30.0)
    assert leader.departed() == frozenset()
    assert ready is not None


def test_a_removed_node_that_never_answers_is_heartbeated_a_bounded_number_of_times() -> None:
    from ringkv.txn.paxos import DEPARTED_BEATS
    leader = elect("a")
    leader._departed["e"] = (5, DEPARTED_BEATS)  # as after a configuration that removed e
    beats = 0
    for i in range(3 * DEPARTED_BEATS):
        ready = leader.tick(10.0 + i * leader.heartbeat_interval_s, random.Random(i))
        beats += sum(1 for out in ready.messages if out.to == "e" and isinstance(out.msg, Heartbeat))
    assert beats == DEPARTED_BEATS and leader.departed() == frozenset()
