"""One shared poll per range for every watch of a node (``server/watch_hub.py``).

Watch sessions (``server/watch_session.py``) run on a stand-in transactional
tier with three ranges whose ``changes`` answers come from a list of
commits; the tier counts the ``changes`` operations it serves: a range's
shared poll (the whole range) apart from a watch's own (catching up).
Checked: 30 watches, key and prefix, started at different versions, each
get exactly their commits once, in order, every transaction across ranges
whole at its version, and once they are live the tier serves one poll per
range per interval and none of their own; a watcher that stops reading
drops back to its own polls and is cut off with ``watcher_too_slow`` while
the others keep up; a watcher joining far behind while commits flow
switches to the shared polls with no gap and no repeat. Planted bugs
(switching before caught up, never switching, a multi-range merge that
does not wait for the slowest range) are each caught.
"""

from __future__ import annotations

import asyncio
import http.client as httpclient
import json
import random
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit

import pytest

from ringkv.clock import SystemClock
from ringkv.config import config_from_dict
from ringkv.server import watch_session as ws
from ringkv.tools.launcher import free_port_block
from ringkv.tools.local_cluster import LocalCluster
from ringkv.txn import watch as tw
from tests.procs import http, wait_until

ENDS = [100, 200, 300]
POLL_MS = 10


class FakeRanges:
    def __init__(self) -> None:
        self.ranges = [SimpleNamespace(end=end) for end in ENDS]

    def range_for_key(self, key: bytes) -> Any:
        return self.ranges[sum(key) % len(ENDS)]


class FakeTxn:
    """The part of ``TxnService`` a watch uses, over three ranges, counting polls."""

    def __init__(self) -> None:
        self.keyspaces = {"txn": 3}
        self.stats = {"watches_open": 0, "watchers_too_slow": 0}
        self.commits: list[tuple[bytes, bytes | None, int]] = []
        self.now_us = 1_000
        self.shared_polls = 0  # a whole range: the hub's
        self.own_polls = 0  # a session's own (catching up)
        self.map = FakeRanges()

    def snapshot_now_us(self) -> int:
        self.now_us += 10
        return self.now_us

    def range_map(self, keyspace: str) -> Any:
        return self.map

    def commit(self, writes: dict[str, Any]) -> int:
        self.now_us += 5
        for key, value in sorted(writes.items()):
            self.commits.append((key.encode(), json.dumps(value).encode(), self.now_us))
        return self.now_us

    async def execute(self, op: Any, *, started_s: float, timeout_s: float) -> dict[str, Any]:
        await asyncio.sleep(0)  # an answer comes later, as over a network
        if op.prefix and op.range_end is not None:
            end = op.range_end
            if op.key == b"":
                self.shared_polls += 1
            else:
                self.own_polls += 1
            items = [c for c in self.commits
                     if self.map.range_for_key(c[0]).end == end and c[0].startswith(op.key)]
        else:
            self.own_polls += 1
            items = [c for c in self.commits if c[0] == op.key]
        items = sorted((c for c in items if op.since_us < c[2] <= op.snapshot_ts_us),
                       key=lambda c: (c[2], c[0]))
        complete = op.snapshot_ts_us
        if len(items) > op.limit:
            complete = items[op.limit][2] - 1
            items = [c for c in items if c[2] <= complete]
        return {"items": [list(c) for c in items], "complete": complete}


def fake_node(buffer_events: int = 10_000) -> Any:
    config = config_from_dict({"txn": {"watch_poll_ms": POLL_MS,
                                       "watch_buffer_events": buffer_events}})
    return SimpleNamespace(config=config, clock=SystemClock(), txn=FakeTxn(), draining=False)


class ListSink:
    def __init__(self, slow: bool = False) -> None:
        self.events: list[dict[str, Any]] = []
        self.final: dict[str, Any] | None = None
        self.slow = slow
        self.ended = False

    async def begin(self, event: dict[str, Any], event_id: int) -> None:
        self.events.append(event)

    async def send(self, event: dict[str, Any], event_id: int | None) -> None:
        self.events.append(event)
        if self.slow:
            await asyncio.sleep(60)  # reads nothing more; the session cuts it off first

    async def end(self, final: dict[str, Any] | None) -> None:
        self.final = final
        self.ended = True


def watcher(node: Any, key: str, prefix: bool, from_version: int | None,
            sink: ListSink | None = None) -> tuple[ws.WatchSession, ListSink]:
    sink = sink or ListSink()
    spec = ws.WatchSpec("txn", key.encode(), prefix, from_version, sse=False)
    return ws.WatchSession(node, spec, sink), sink


def expected(node: Any, key: str, prefix: bool, after_us: int) -> list[tuple[str, int]]:
    wanted = [(k.decode(), ts) for k, _, ts in node.txn.commits
              if ts > after_us and (k.startswith(key.encode()) if prefix else k == key.encode())]
    return sorted(wanted, key=lambda kv: (kv[1], kv[0]))


def got(sink: ListSink) -> list[tuple[str, int]]:
    return [(e["key"], e["version"]) for e in sink.events if e["type"] == "put"]


async def until(condition: Any, timeout_s: float, what: str) -> None:
    for _ in range(int(timeout_s / 0.01)):  # bounded
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


async def writer(node: Any, count: int, rng: random.Random) -> None:
    """``count`` transactions, some across ranges, a few ms apart."""
    for i in range(count):
        keys = {f"k{rng.randrange(12)}": i for _ in range(rng.choice([1, 1, 2, 3]))}
        node.txn.commit(keys)
        await asyncio.sleep(0.002)


async def run_many(node: Any) -> tuple[list[Any], int, int]:
    rng = random.Random(15)
    txn = node.txn
    for i in range(40):  # history some watches start inside
        txn.commit({f"k{i % 12}": i, f"k{(i * 5) % 12}": -i})
    versions = sorted({ts for _, _, ts in txn.commits})
    watches = []
    for i in range(30):
        prefix = i % 2 == 0
        key = "k" if prefix and i % 4 == 0 else ("k1" if prefix else f"k{i % 12}")
        start = versions[rng.randrange(len(versions))] if i % 3 else None
        watches.append((*watcher(node, key, prefix, start), key, prefix))
    tasks = [asyncio.ensure_future(w.run()) for w, *_ in watches]
    await writer(node, 60, rng)
    await until(lambda: all(w.fanin is not None for w, *_ in watches), 5, "every watch live")
    # Steady state: every watch on the shared polls, none polling on its own.
    own, shared = txn.own_polls, txn.shared_polls
    await writer(node, 60, rng)
    last = txn.commits[-1][2]
    await until(lambda: all(w.buffer.delivered_us >= last for w, *_ in watches), 5,
                "every watch delivered the last commit")
    own_in_window, shared_in_window = txn.own_polls - own, txn.shared_polls - shared
    for w, *_ in watches:
        w.cancel()
    await asyncio.gather(*tasks)
    return watches, own_in_window, shared_in_window


def check_many(node: Any, watches: list[Any]) -> list[str]:
    wrong = []
    for w, sink, key, prefix in watches:
        after = w.spec.from_version if w.spec.from_version is not None else sink.events[0]["version"]
        if got(sink) != expected(node, key, prefix, after):
            wrong.append(f"{key} prefix={prefix} from={after}")
    return wrong


def test_many_watchers_share_one_poll_per_range_and_each_gets_its_commits() -> None:
    node = fake_node()

    async def run() -> None:
        started = asyncio.get_running_loop().time()
        watches, own, shared = await run_many(node)
        window_s = asyncio.get_running_loop().time() - started
        assert check_many(node, watches) == []
        assert own == 0, "a live watch polled on its own"
        # One poll per range per interval at most (the window is shorter than the run).
        assert 0 < shared <= len(ENDS) * (window_s / (POLL_MS / 1000) + 2)
        assert not node.watch_hub.feeds, "a feed kept polling with no watch left"

    asyncio.run(run())


def test_a_planted_merge_that_does_not_wait_for_every_range_is_caught(
        monkeypatch: pytest.MonkeyPatch) -> None:
    original = tw.Fanin.take

    def eager(self: tw.Fanin, since_us: int, room: int) -> tw.Merged | None:
        self._resolved = [max(self._resolved)] * len(self._resolved)  # bug: the fastest range
        return original(self, since_us, room)

    monkeypatch.setattr(tw.Fanin, "take", eager)
    node = fake_node()

    async def run() -> list[str]:
        watches, *_ = await run_many(node)
        return check_many(node, watches)

    assert asyncio.run(run()) != []


def test_a_slow_watcher_drops_to_its_own_polls_and_is_cut_off_without_delaying_others(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ws, "SLOW_S", 0.5)
    node = fake_node(buffer_events=20)

    async def run() -> None:
        slow, slow_sink = watcher(node, "k", True, None, ListSink(slow=True))
        fast = [watcher(node, "k", True, None) for _ in range(3)]
        tasks = [asyncio.ensure_future(w.run()) for w, _ in [(slow, slow_sink), *fast]]
        await until(lambda: slow.fanin is not None, 5, "the slow watcher live")
        rng = random.Random(3)
        await writer(node, 40, rng)
        last = node.txn.commits[-1][2]
        committed = asyncio.get_running_loop().time()
        await until(lambda: all(w.buffer.delivered_us >= last for w, _ in fast), 5,
                    "the fast watchers delivered the last commit")
        lag_s = asyncio.get_running_loop().time() - committed
        assert slow.fanin is None, "the slow watcher kept taking the shared polls"
        assert lag_s < ws.SLOW_S, "the others waited for the slow watcher"
        await until(lambda: slow_sink.ended, 5, "the slow watcher cut off")
        assert slow_sink.final is not None
        assert slow_sink.final["error"]["code"] == tw.WATCHER_TOO_SLOW
        assert node.txn.stats["watchers_too_slow"] == 1
        for w, _ in fast:
            w.cancel()
        await asyncio.gather(*tasks)
        for w, sink in fast:
            assert got(sink) == expected(node, "k", True, sink.events[0]["version"])

    asyncio.run(run())


async def join_while_commits_flow(node: Any, before_join: Any = None
                                  ) -> tuple[ws.WatchSession, ListSink, int]:
    """Watchers already live, commits flowing; a new one joins 200 commits behind, its
    own polls a few commits a page: it catches up over several polls, then goes live."""
    txn = node.txn
    for i in range(200):
        txn.commit({f"k{i % 12}": i})
    from_version = txn.commits[0][2]
    early = [watcher(node, "k", True, None) for _ in range(2)]
    tasks = [asyncio.ensure_future(w.run()) for w, _ in early]
    await until(lambda: all(w.fanin is not None for w, _ in early), 5, "the first watchers live")
    rng = random.Random(7)
    flow = asyncio.ensure_future(writer(node, 120, rng))
    await asyncio.sleep(0.03)
    if before_join is not None:
        before_join()
    joiner, sink = watcher(node, "k", True, from_version)
    tasks.append(asyncio.ensure_future(joiner.run()))
    await flow
    last = txn.commits[-1][2]
    await until(lambda: joiner.buffer is not None and joiner.buffer.delivered_us >= last, 5,
                "the joiner delivered the last commit")
    for w in [joiner, *(w for w, _ in early)]:
        w.cancel()
    await asyncio.gather(*tasks)
    return joiner, sink, from_version


def joined_right(node: Any, joiner: ws.WatchSession, sink: ListSink, from_version: int) -> bool:
    return got(sink) == expected(node, "k", True, from_version) and joiner.live_turns >= 1


def test_a_watcher_joining_while_commits_flow_goes_live_with_no_gap_or_repeat(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ws, "PAGE_EVENTS", 7)
    node = fake_node()
    joiner, sink, from_version = asyncio.run(join_while_commits_flow(node))
    assert joined_right(node, joiner, sink, from_version)
    assert joiner.live_turns == 1  # it caught up and stayed live


@pytest.mark.parametrize("planted", ["early", "never"])
def test_a_planted_switch_to_live_too_early_or_never_is_caught(
        monkeypatch: pytest.MonkeyPatch, planted: str) -> None:
    monkeypatch.setattr(ws, "PAGE_EVENTS", 7)
    original = tw.caught_up
    if planted == "early":  # bug: a poll early, before it reached the shared polls
        monkeypatch.setattr(tw, "caught_up", lambda offered_us, resolved: True)
    else:  # bug: never switches (a poll late, forever)
        monkeypatch.setattr(tw, "caught_up", lambda offered_us, resolved: False)
    node = fake_node()
    joiner_rule = tw.caught_up
    # The first watchers must go live for the scene to be set: they use the real rule.
    monkeypatch.setattr(tw, "caught_up", original)
    joiner, sink, from_version = asyncio.run(join_while_commits_flow(
        node, lambda: monkeypatch.setattr(tw, "caught_up", joiner_rule)))
    assert not joined_right(node, joiner, sink, from_version)


# -- on a real node ---------------------------------------------------------------------------


def node_polls(url: str) -> int:
    status, view = http("GET", f"{url}/v1/status")
    assert status == 200
    return int(view["transactional"]["stats"]["watch_polls"])


class StreamReader(threading.Thread):
    """One HTTP watch read line by line until it has reached ``target`` (bounded)."""

    def __init__(self, url: str, path: str) -> None:
        super().__init__(daemon=True)
        parts = urlsplit(url)
        self.conn = httpclient.HTTPConnection(parts.hostname or "", parts.port, timeout=15)
        self.conn.request("GET", path)
        self.response = self.conn.getresponse()
        assert self.response.status == 200
        self.events: list[dict[str, Any]] = [json.loads(self.response.readline())]
        self.target: int | None = None

    def run(self) -> None:
        for _ in range(10_000):  # bounded: a line per event, a progress line a second
            raw = self.response.readline()
            if not raw.strip():
                return
            event = json.loads(raw)
            self.events.append(event)
            if self.target is not None and event.get("version", 0) >= self.target:
                return


@pytest.mark.cluster
def test_thirty_watches_on_a_node_cost_one_poll_per_range(tmp_path: Path) -> None:
    """30 HTTP watches (key and prefix, from different versions) on one node: while
    commits flow, the node serves about one ``changes`` poll per range per interval
    and per commit (each wakes the feeds), not one per watch, and each watch gets exactly its commits once, in order."""
    ranges = 3
    cluster = LocalCluster(tmp_path, nodes=1, rf=1, base_client_port=free_port_block(1),
                           base_internode_port=free_port_block(1), config_overrides={
                               "keyspaces.hub": {"replication_factor": 1,
                                                 "tier": "transactional", "ranges": ranges}})
    readers: list[tuple[StreamReader, str, bool, int | None]] = []
    try:
        cluster.up(timeout_s=30)
        url = cluster.procs[0].url
        poll_s = 0.05  # txn.watch_poll_ms by default
        commits: list[tuple[str, int]] = []

        def put(key: str) -> None:
            status, answer = http("PUT", f"{url}/v1/kv/hub/{key}", {"value": len(commits)})
            assert status == 200, answer
            commits.append((key, int(answer["version"])))

        for i in range(4 * ranges):
            wait_until(lambda i=i: http("PUT", f"{url}/v1/kv/hub/warm{i}", {"value": 0})[0] == 200,
                       timeout_s=30, interval_s=0.2, what="a first write to every range")
        for i in range(30):
            put(f"k{i % 6}")
        for i in range(30):
            prefix = i % 2 == 0
            key = f"k{i % 6}"
            start = commits[i][1] if i % 3 else None
            path = (f"/v1/watch/hub/{'k' if prefix else key}?prefix={str(prefix).lower()}"
                    + ("" if start is None else f"&from_version={start}"))
            reader = StreamReader(url, path)
            reader.start()
            readers.append((reader, "k" if prefix else key, prefix, start))
        for i in range(10):  # the watches catch up and take the shared polls
            put(f"k{i % 6}")
        def bound(window_s: float, commits: int) -> float:
            # Unshared, 30 watches (half of them over 3 ranges) make 60 polls an interval.
            # Shared: one a range an interval, and one a range for each commit applied here
            # (it wakes the keyspace's feeds), however many watches there are.
            return ranges * (window_s / poll_s + 2 + commits) * 1.5

        last = [node_polls(url), time.monotonic()]

        def shared() -> bool:
            polls, now = node_polls(url), time.monotonic()
            settled = now - last[1] >= 0.25 and polls - last[0] <= bound(now - last[1], 1)
            last[:] = [polls, now]
            put("k0")  # commits keep flowing
            return settled

        wait_until(shared, timeout_s=10, interval_s=0.3, what="the watches on the shared polls")
        before, started = node_polls(url), time.monotonic()
        for i in range(40):
            put(f"k{i % 6}")
        polls, window_s = node_polls(url) - before, time.monotonic() - started
        target = commits[-1][1]
        for reader, *_ in readers:
            reader.target = target
        for reader, *_ in readers:
            reader.join(timeout=15)
            assert not reader.is_alive(), "a watch never reached the last commit"
        assert 0 < polls <= bound(window_s, 40), (polls, window_s)
        for reader, key, prefix, start in readers:
            after = reader.events[0]["version"] if start is None else start
            want = sorted(((k, v) for k, v in commits
                           if v > after and (k.startswith(key) if prefix else k == key)),
                          key=lambda kv: (kv[1], kv[0]))
            seen = [(e["key"], e["version"]) for e in reader.events if e["type"] == "put"]
            assert seen == want
    finally:
        for reader, *_ in readers:
            reader.conn.close()
        cluster.down()
