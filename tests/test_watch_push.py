"""Watch events pushed as a commit is applied (``server/watch_hub.py``'s ``applied``).

On the simulator (three real nodes on virtual time, the keyspace in four
ranges, so the watching node leads some ranges and follows the others): a
prefix watch served by the node's shared polls gets each commit well under
one ``txn.watch_poll_ms`` after the write was sent, because the group
applying it on that node wakes the feeds; with the wake planted away
(the hub told nothing) the same run waits for the grid, and is caught.
Every run's stream is exactly the acknowledged commits, once each, in
order.

On a stand-in tier (as ``tests/test_watch_hub.py``'s): a burst of commits
applied while a feed polls wakes it once more, not once per commit; a
woken poll asks up to the replica's safe time the group reported, not
``TT.now().latest``; a commit in one range wakes the feeds of the
keyspace's other ranges, which are not yet past it; and while commits keep
waking a feed its grid points are skipped, until they stop (the skip taken
out, the check fails).
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
from typing import Any

import pytest

from ringkv.config import config_from_dict
from ringkv.server import watch_session as ws
from ringkv.server.watch_hub import WatchHub, hub_of
from ringkv.sim.coordination import boot_cluster, call, data_keys
from ringkv.sim.run import TXN_KEYSPACE
from ringkv.txn.requests import TxnRequest, Write
from ringkv.txn.service import Op
from tests.sim_waits import until
from tests.test_watch_hub import ENDS, ListSink, fake_node, watcher

POLL_S = 0.05  # txn.watch_poll_ms in the simulator's configs


class TimedSink(ListSink):
    """Notes the loop's (virtual) time each event arrives."""

    def __init__(self) -> None:
        super().__init__()
        self.at_s: dict[tuple[str, int], float] = {}

    async def send(self, event: dict[str, Any], event_id: int | None) -> None:
        await super().send(event, event_id)
        if event["type"] == "put":
            self.at_s[(event["key"], event["version"])] = asyncio.get_running_loop().time()


def run_paced(seed: int, writes: int = 30) -> dict[str, Any]:
    """One node serves a prefix watch; a client on another commits one key at a time,
    a little over a poll interval apart (off the grid); each event's latency is its
    delivery minus the time the put was sent."""
    loop, cluster = boot_cluster(seed)
    out: dict[str, Any] = {}

    async def main() -> None:
        await cluster.boot(60, provision=random.Random(seed))
        watching, writing = cluster.machines[0], cluster.machines[1]
        node = watching.node
        assert node is not None and writing.node is not None
        keys = data_keys(8)

        async def put(key: str, value: int) -> tuple[tuple[str, int], float]:
            assert writing.node is not None
            request = TxnRequest(TXN_KEYSPACE, f"w.{key}.{value}", (), (),
                                 (Write(key.encode(), json.dumps(value).encode()),))
            started = loop.time()
            ok, answer = await call(writing, writing.node.txn.execute(
                Op("txn", TXN_KEYSPACE, request),
                started_s=writing.node.clock.monotonic_s(), timeout_s=2.0))
            assert ok, answer
            return (key, int(answer["commit_ts"])), started

        for key in keys:  # every range has its group and a leader before the watch
            await put(key, -1)
        sink = TimedSink()
        session = ws.WatchSession(node, ws.WatchSpec(TXN_KEYSPACE, b"", True, None, False),
                                  sink)
        task = watching.run(session.run())
        await until(lambda: session.fanin is not None, "the watch on the shared polls", 10)
        rng = random.Random(f"paced:{seed}")
        sent: dict[tuple[str, int], float] = {}
        try:
            for i in range(writes):
                await asyncio.sleep(POLL_S * rng.uniform(1.1, 1.9))
                at, started = await put(keys[i % len(keys)], i)
                sent[at] = started
            await until(lambda: set(sent) <= set(sink.at_s), "every commit delivered", 10,
                        0.01)
        finally:  # a failed run ends its watch too
            session.cancel()
            await asyncio.wait([task], timeout=5)
        feeds = list(hub_of(node).feeds.values())
        out.update(latency_s=[sink.at_s[k] - s for k, s in sent.items()],
                   got=[(e["key"], e["version"]) for e in sink.events if e["type"] == "put"],
                   want=sorted(sent, key=lambda kv: (kv[1], kv[0])),
                   feeds_left=len(feeds),
                   polls=sum(m.node.txn.stats["watch_polls"] for m in cluster.machines
                             if m.node is not None),
                   unread_polls=sum(m.node.txn.stats["watch_polls_unread"]
                                    for m in cluster.machines if m.node is not None))

    try:
        loop.run_until_complete(asyncio.wait_for(main(), timeout=300))
    finally:
        cluster.stop_all()
        loop.dispose()
    return out


def test_a_commit_applied_on_the_node_is_delivered_well_under_a_poll_interval() -> None:
    out = run_paced(1)
    assert out["got"] == out["want"]  # once each, in order, nothing else
    assert out["feeds_left"] == 0
    latency = sorted(out["latency_s"])
    # Commit (a round of Paxos and commit wait) then one local poll: far below the 25 ms
    # the grid adds on average, and no event waits for a grid point.
    assert statistics.median(latency) < POLL_S / 4, latency
    assert latency[-1] < POLL_S / 2, latency


def test_a_planted_missing_wake_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hub told nothing (the bug): events wait for the grid, and the check fails."""
    monkeypatch.setattr(WatchHub, "applied", lambda self, *args: None)
    out = run_paced(1)
    assert out["got"] == out["want"]  # still correct: only later
    latency = sorted(out["latency_s"])
    assert not (statistics.median(latency) < POLL_S / 4 and latency[-1] < POLL_S / 2), latency


# -- on a stand-in tier ---------------------------------------------------------------------


class GatedTxn:
    """Wraps the stand-in tier: a shared poll of range ``hold`` (once it is set) waits
    for ``gate``, and each shared poll's timestamp is noted per range."""

    def __init__(self, txn: Any) -> None:
        self.inner = txn
        self.hold: int | None = None
        self.gate = asyncio.Event()
        self.polling = asyncio.Event()
        self.asked: dict[int, list[int]] = {end: [] for end in ENDS}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("inner", "hold", "gate", "polling", "asked"):
            object.__setattr__(self, name, value)
        else:
            setattr(self.inner, name, value)

    async def execute(self, op: Any, *, started_s: float, timeout_s: float) -> dict[str, Any]:
        if op.prefix and op.key == b"" and op.range_end is not None:
            self.asked[op.range_end].append(op.snapshot_ts_us)
            if op.range_end == self.hold:
                self.polling.set()
                await self.gate.wait()
        answer: dict[str, Any] = await self.inner.execute(op, started_s=started_s,
                                                          timeout_s=timeout_s)
        return answer


def slow_grid_node() -> Any:
    """The stand-in node with a grid too slow to come within a test: every poll after
    the first is a woken one."""
    node = fake_node()
    node.config = config_from_dict({"txn": {"watch_poll_ms": 10_000}})
    return node


def test_a_burst_applied_during_a_poll_wakes_one_more_poll_and_a_woken_poll_asks_up_to_safe_time(
        ) -> None:
    node = slow_grid_node()
    hold = ENDS[0]
    gated = node.txn = GatedTxn(node.txn)

    async def run() -> None:
        session, sink = watcher(node, "k", True, None)
        task = asyncio.ensure_future(session.run())
        await until(lambda: session.fanin is not None, "the watch live", 5, 0.01)
        hub = node.watch_hub
        feed = hub.feeds[("txn", hold)]
        assert gated.inner.on_applied == hub.applied
        polls_before = feed.polls
        gated.hold = hold
        # One commit wakes the feed: it polls at once, up to the safe time reported.
        gated.inner.commit({"k1": 1})  # in the held range (sum(b"k1") % 3 == 0)
        safe_us = gated.inner.now_us
        hub.applied("txn", hold, safe_us, safe_us)
        await asyncio.wait_for(gated.polling.wait(), 1)
        assert gated.asked[hold][-1] == safe_us, "a woken poll asked beyond the safe time"
        # While that poll is held, a burst of 50 commits is applied, each waking the feed.
        for i in range(50):
            gated.inner.commit({"k1": i})
            hub.applied("txn", hold, gated.inner.now_us, gated.inner.now_us)
        gated.gate.set()
        last = gated.inner.commits[-1][2]
        await until(lambda: session.buffer.delivered_us >= last, "the burst delivered", 5, 0.01)
        await asyncio.sleep(0.05)  # no poll more comes of it (bounded: the grid is 10 s)
        assert feed.polls - polls_before == 2, "the burst was not coalesced into one more poll"
        assert feed.woken_polls == 2
        session.cancel()
        await asyncio.wait_for(task, 5)
        assert [v for _, v in ((e["key"], e["version"]) for e in sink.events
                               if e["type"] == "put")] == [
            ts for _, _, ts in gated.inner.commits[-51:]]

    asyncio.run(run())


def test_a_commit_in_one_range_wakes_the_keyspaces_other_feeds_below_it() -> None:
    node = slow_grid_node()
    gated = node.txn = GatedTxn(node.txn)  # nothing held: polls only noted

    async def run() -> None:
        session, sink = watcher(node, "k", True, None)
        task = asyncio.ensure_future(session.run())
        await until(lambda: session.fanin is not None, "the watch live", 5, 0.01)
        hub = node.watch_hub
        asked = {end: len(gated.asked[end]) for end in ENDS}
        version = gated.inner.commit({"k1": 1})  # in range ENDS[0]
        # Only that range's group applied it here; the others report nothing.
        hub.applied("txn", ENDS[0], version, version)
        await until(lambda: session.buffer.delivered_us >= version, "the commit delivered", 1,
                    0.01)
        for end in ENDS:  # every range polled once more: its own to safe time, the others
            assert len(gated.asked[end]) == asked[end] + 1, end  # to TT.now().latest
        assert gated.asked[ENDS[0]][-1] == version
        assert all(gated.asked[end][-1] > version for end in ENDS[1:])
        # A range already past the commit is not woken again by an older one.
        hub.applied("txn", ENDS[1], version, version)
        await asyncio.sleep(0.05)
        assert all(len(gated.asked[end]) == asked[end] + 1 for end in ENDS)
        session.cancel()
        await asyncio.wait_for(task, 5)
        assert [e["version"] for e in sink.events if e["type"] == "put"] == [version]

    asyncio.run(run())


def test_grid_points_are_skipped_while_commits_keep_waking_the_feed() -> None:
    """Commits every 10 ms on a 50 ms grid: the feed polls for the commits, not also on
    the grid; once they stop, the grid polls again."""
    node = fake_node()  # a 10 ms grid
    node.config = config_from_dict({"txn": {"watch_poll_ms": 50}})

    async def run() -> None:
        session, _ = watcher(node, "k", True, None)
        task = asyncio.ensure_future(session.run())
        await until(lambda: session.fanin is not None, "the watch live", 5, 0.01)
        hub = node.watch_hub
        feed = hub.feeds[("txn", ENDS[0])]
        grid_before = feed.polls - feed.woken_polls
        for i in range(30):  # 0.3 s of commits, 10 ms apart
            version = node.txn.commit({"k1": i})
            hub.applied("txn", ENDS[0], version, version)
            await asyncio.sleep(0.01)
        assert feed.woken_polls >= 15
        assert feed.polls - feed.woken_polls - grid_before <= 1, "the grid polled as well"
        grid_after = feed.polls - feed.woken_polls
        await until(lambda: feed.polls - feed.woken_polls >= grid_after + 2,
                    "the grid polling again", 1, 0.01)
        session.cancel()
        await asyncio.wait_for(task, 5)

    asyncio.run(run())
