"""A replica's newest written commit timestamp (``txn/newest_write.py``), which
lets a watch's poll of an unwritten range answer without reading the store.

The pure rule: unknown until tracking began and the store's own newest was
read; the maximum of what applies, not the last; a forget (anything writing
the range past the apply path) makes it unknown and refuses a read begun
before it. ``MvccStore.newest_commit``: one seek per key, tombstones count.

On three group runners (``tests/test_group.py``'s bus, virtual time): a
value known before a snapshot install is forgotten by it (with the forget
planted away, the stale value is caught: it is below what the store holds),
and a restarted replica starts unknown.

On the simulator (three real nodes, four ranges): a paced prefix watch is
served with polls that read nothing once their range is known unwritten,
and the stream is exactly the acknowledged commits, in order; with the apply
path's note planted away, events are lost and the check fails.
"""

from __future__ import annotations

from typing import Any

import pytest

from ringkv.ring import token_for
from ringkv.storage.memory import MemoryEngine
from ringkv.sim.loop import VirtualTimeLoop
from ringkv.txn.group import GroupRunner
from ringkv.txn.mvcc import MvccStore
from ringkv.txn.newest_write import NewestWrite
from tests.test_group import GROUP, KS, commit, leader_of, run, sim_bus, wait_for
from tests.test_watch_push import run_paced

# -- the pure rule ----------------------------------------------------------------------------


def test_unknown_until_tracking_began_and_the_store_was_read() -> None:
    nw = NewestWrite()
    nw.applied(50)  # not tracking yet: says nothing
    assert nw.newest_us is None and not nw.nothing_after(10**9)
    epoch = nw.start()
    assert epoch is not None
    assert nw.start() is None  # one read at a time
    nw.applied(40)
    assert nw.newest_us is None  # the store's base is not read yet
    nw.settle(epoch, 30)
    assert nw.newest_us == 40
    assert nw.nothing_after(40) and not nw.nothing_after(39)
    assert nw.start() is None  # known: no read needed


def test_the_maximum_applied_not_the_last() -> None:
    """A 2PC outcome may apply below a later one-range commit's timestamp."""
    nw = NewestWrite()
    epoch = nw.start()
    assert epoch is not None
    nw.settle(epoch, 0)
    nw.applied(100)
    nw.applied(70)  # an outcome committed at 70, applied after the commit at 100
    assert nw.newest_us == 100
    assert not nw.nothing_after(99)


def test_a_forget_refuses_a_read_begun_before_it_and_leaves_it_unknown() -> None:
    nw = NewestWrite()
    epoch = nw.start()
    assert epoch is not None
    nw.forget()  # a snapshot page written while the store was being read
    nw.settle(epoch, 10)
    assert nw.newest_us is None
    again = nw.start()
    assert again is not None and again != epoch
    nw.settle(again, 10)
    assert nw.newest_us == 10
    nw.forget()
    assert nw.newest_us is None and not nw.nothing_after(10**9)


def test_a_failed_read_leaves_it_unknown_and_may_start_again() -> None:
    nw = NewestWrite()
    epoch = nw.start()
    assert epoch is not None
    nw.abandon(epoch)
    assert nw.newest_us is None
    assert nw.start() is not None


def test_the_stores_newest_commit_in_a_range_counts_tombstones_and_keeps_to_the_range() -> None:
    store = MvccStore(MemoryEngine())
    assert store.newest_commit_now(KS, 0, 0) == 0
    store.apply_now(KS, {b"a": b"1", b"b": b"1"}, 10)
    store.apply_now(KS, {b"a": b"2"}, 20)
    store.apply_now(KS, {b"b": None}, 30)  # a tombstone is a change too
    store.apply_now("other", {b"a": b"x"}, 99)
    assert store.newest_commit_now(KS, 0, 0) == 30  # (0, 0]: the whole ring
    token_a = token_for(b"a")
    # The range holding only b"a": b"b"'s tombstone is outside it.
    token_b = token_for(b"b")
    if token_b < token_a:
        assert store.newest_commit_now(KS, token_b, token_a) == 20
    else:
        assert store.newest_commit_now(KS, token_a - 1, token_a) == 20


# -- on three group runners ------------------------------------------------------------------


def known_from_store(runner: Any, mvcc: MvccStore) -> None:
    """Begin tracking on ``runner`` and read its store's base, as a watch's poll does."""
    epoch = runner.newest_write.start()
    assert epoch is not None
    runner.newest_write.settle(epoch, mvcc.newest_commit_now(KS, GROUP.start, GROUP.end))


def snapshot_run(forget_on_install: bool, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if not forget_on_install:
        monkeypatch.setattr(NewestWrite, "forget", lambda self: None)
    install = GroupRunner._install

    async def noting_install(self: GroupRunner, snapshot: Any) -> None:
        # The moment the snapshot is in, before the log's tail applies over it.
        await install(self, snapshot)
        mvcc = self._mvcc
        out["at_install"] = (self.newest_write.newest_us,
                             mvcc.newest_commit_now(KS, GROUP.start, GROUP.end))

    monkeypatch.setattr(GroupRunner, "_install", noting_install)

    async def main(loop: VirtualTimeLoop) -> None:
        bus = sim_bus(loop, max_log_slots=4, keep_log_slots=1)
        for node_id in GROUP.replicas:
            bus.start(node_id)
        leader = await wait_for(lambda: leader_of(bus), 10.0, "a leader")
        lagger = next(n for n in GROUP.replicas if n != leader.node_id)
        first = await commit(bus, "t0", [(b"k0", b"v")])
        await wait_for(lambda: bus.runner(lagger).applied_through >= first.slot, 5.0, "applied")
        mvcc = bus.nodes[lagger].mvcc
        assert mvcc is not None
        known_from_store(bus.runner(lagger), mvcc)
        assert bus.runner(lagger).newest_write.newest_us == first.commit_ts_us
        bus.kill(lagger)
        done = [await commit(bus, f"t{i}", [(f"k{i}".encode(), b"v")]) for i in range(1, 12)]
        restarted = bus.start(lagger)
        out["after_restart"] = restarted.newest_write.newest_us
        # Known at once from the store as it is before the snapshot arrives.
        known_from_store(restarted, mvcc)
        out["before_install"] = restarted.newest_write.newest_us
        await wait_for(lambda: restarted.applied_through >= done[-1].slot, 20.0, "caught up")
        out["installed"] = restarted.stats.snapshots_installed
        out["store_newest"] = mvcc.newest_commit_now(KS, GROUP.start, GROUP.end)

    run(main)
    return out


def test_a_restart_and_a_snapshot_install_leave_the_newest_write_unknown(
        monkeypatch: pytest.MonkeyPatch) -> None:
    out = snapshot_run(True, monkeypatch)
    assert out["after_restart"] is None
    assert out["installed"] == 1
    assert out["before_install"] is not None and out["before_install"] < out["store_newest"]
    assert out["at_install"][0] is None


def test_a_planted_missing_forget_on_install_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """The install forgets nothing (the bug): the value claims no write above a
    timestamp the snapshot wrote, and the check fails."""
    out = snapshot_run(False, monkeypatch)
    assert out["installed"] == 1
    newest, store_newest = out["at_install"]
    with pytest.raises(AssertionError):  # the check the test above makes
        assert newest is None
    assert newest < store_newest  # stale: a poll would lose the snapshot's events


# -- on the simulator -------------------------------------------------------------------------


def test_polls_of_unwritten_ranges_read_nothing_and_every_event_arrives_in_order() -> None:
    out = run_paced(1)
    assert out["got"] == out["want"]  # once each, in order, nothing else
    assert out["unread_polls"] > 0, out
    assert out["unread_polls"] < out["polls"]  # the ranges written are read


def test_a_planted_missing_apply_note_loses_events_and_is_caught(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Applies not noted (the bug): a range's newest write stays at its base, polls of
    it skip the store, and commits never reach the watch."""
    monkeypatch.setattr(NewestWrite, "applied", lambda self, commit_ts_us: None)
    with pytest.raises(AssertionError, match="every commit delivered"):
        run_paced(1)
