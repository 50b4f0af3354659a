"""No lost writes under crashes: a concurrent workload while a node is killed and restarted.

Dynamo §4.5 with R + W > N: every QUORUM read overlaps every QUORUM write, so
(a) no acknowledged write is missing afterwards, and (b) no read returns a
value older than a write acknowledged before the read began. Both are checked
on the recorded history, using the write timestamps the servers report.
"""

from __future__ import annotations

import bisect
import random
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from ringkv.clock import SystemClock
from tests.procs import FAST_GOSSIP, http
from tests.test_cluster import make_cluster

pytestmark = pytest.mark.cluster

CLOCK = SystemClock()
CLIENTS = 8
KEYS = 16
# make test: 15 s of load, two or three kill-and-restart cycles; make soak: 30 s, five or so.
DURATION_S = 15.0
SOAK_DURATION_S = 30.0
MIN_KILLS = 2  # however slow the restarts, the short run kills at least this often


@dataclass
class Op:
    kind: str  # "write" or "read"
    key: str
    value: object
    start_s: float
    end_s: float
    ok: bool
    ts: tuple[int, int] | None  # write: its timestamp; read: the timestamp of what it saw


def stale_reads(reads: list[Op], acked: list[Op]) -> list[Op]:
    """Each successful read older than a write acknowledged before the read began. Per key,
    the acknowledged writes sorted by when they ended, with a running maximum of their
    timestamps, give each read its floor by one bisection (a scan of every write per read
    took most of this test's time)."""
    ends: dict[str, list[float]] = {}
    floors: dict[str, list[tuple[int, int]]] = {}
    for write in sorted(acked, key=lambda w: w.end_s):
        assert write.ts is not None
        running = floors.setdefault(write.key, [])
        running.append(max(running[-1], write.ts) if running else write.ts)
        ends.setdefault(write.key, []).append(write.end_s)
    stale = []
    for read in (r for r in reads if r.ok):
        before = bisect.bisect_left(ends.get(read.key, []), read.start_s)
        if before and (read.ts is None or read.ts < floors[read.key][before - 1]):
            stale.append(read)
    return stale


def test_the_stale_read_check_finds_a_read_older_than_an_earlier_acknowledged_write() -> None:
    writes = [Op("write", "k", "a", 0.0, 1.0, True, (10, 0)),
              Op("write", "k", "b", 2.0, 3.0, True, (20, 0)),
              Op("write", "j", "c", 0.0, 1.0, True, (30, 0))]
    fresh = Op("read", "k", "b", 3.5, 4.0, True, (20, 0))
    overlapping = Op("read", "k", "a", 2.5, 4.0, True, (10, 0))  # began before b ended
    stale = Op("read", "k", "a", 3.5, 4.0, True, (10, 0))
    missing = Op("read", "j", None, 1.5, 2.0, True, None)
    assert stale_reads([fresh, overlapping, stale, missing], writes) == [stale, missing]


@pytest.mark.parametrize("duration_s", [
    pytest.param(DURATION_S, id="short"),
    pytest.param(SOAK_DURATION_S, id="long", marks=pytest.mark.soak),
])
def test_no_acknowledged_write_is_lost_while_a_node_crashes(tmp_path: Path,
                                                           duration_s: float) -> None:
    cluster = make_cluster(tmp_path, **FAST_GOSSIP)
    kills: list[str] = []
    history: list[Op] = []
    lock = threading.Lock()
    stop = threading.Event()
    try:
        cluster.up(timeout_s=30)
        urls = [proc.url for proc in cluster.procs]

        def client(cid: int) -> None:
            rng = random.Random(cid)
            for seq in range(1_000_000):  # bounded; stop ends it
                if stop.is_set():
                    return
                key = f"key{rng.randrange(KEYS)}"
                url = rng.choice(urls)
                start = CLOCK.monotonic_s()
                if rng.random() < 0.5:
                    value = f"c{cid}-{seq}"
                    try:
                        status, body = http("PUT", f"{url}/v1/kv/default/{key}?consistency=QUORUM",
                                            {"value": value}, timeout_s=5)
                    except OSError:
                        status, body = 0, None
                    ok = status == 200
                    ts = tuple(body["timestamp"]) if ok else None
                    op = Op("write", key, value, start, CLOCK.monotonic_s(), ok, ts)
                else:
                    try:
                        status, body = http("GET", f"{url}/v1/kv/default/{key}?consistency=QUORUM",
                                            timeout_s=5)
                    except OSError:
                        status, body = 0, None
                    ok = status in (200, 404)
                    ts = tuple(body["timestamp"]) if status == 200 else None
                    value = body["value"] if status == 200 else None
                    op = Op("read", key, value, start, CLOCK.monotonic_s(), ok, ts)
                with lock:
                    history.append(op)

        def nemesis() -> None:
            rng = random.Random(99)
            deadline = CLOCK.monotonic_s() + duration_s
            while len(kills) < MIN_KILLS or CLOCK.monotonic_s() < deadline - 6:
                victim = rng.choice(cluster.procs)
                victim.kill()
                kills.append(victim.node_id)
                stop.wait(rng.uniform(1.0, 3.0))
                victim.start()
                stop.wait(rng.uniform(1.0, 3.0))
            stop.wait(max(0.0, deadline - CLOCK.monotonic_s()))

        threads = [threading.Thread(target=client, args=(c,)) for c in range(CLIENTS)]
        for thread in threads:
            thread.start()
        killer = threading.Thread(target=nemesis)
        killer.start()
        killer.join(timeout=duration_s + 60)
        stop.set()
        for thread in threads:
            thread.join(timeout=30)

        # Heal: everyone up, then read every key at QUORUM.
        cluster.wait_all_up(timeout_s=30)
        final: dict[str, tuple[int, int] | None] = {}
        for k in range(KEYS):
            status, body = http("GET", f"{urls[0]}/v1/kv/default/key{k}?consistency=QUORUM")
            assert status in (200, 404), body
            final[f"key{k}"] = tuple(body["timestamp"]) if status == 200 else None
    finally:
        stop.set()
        cluster.down()

    writes = [op for op in history if op.kind == "write"]
    reads = [op for op in history if op.kind == "read"]
    acked = [op for op in writes if op.ok]
    lost = [w for w in acked if final[w.key] is None or final[w.key] < w.ts]
    stale = stale_reads(reads, acked)
    print(f"killed and restarted: {', '.join(kills)}; "
          f"history: {len(writes)} writes ({len(acked)} acknowledged), {len(reads)} reads "
          f"({sum(r.ok for r in reads)} ok); lost acknowledged writes: {len(lost)}; "
          f"stale reads: {len(stale)}")
    assert len(kills) >= MIN_KILLS
    assert len(acked) > 100 and sum(r.ok for r in reads) > 100
    assert lost == []
    assert stale == []
