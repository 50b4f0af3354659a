"""Watches on three real node processes (``GET /v1/watch/...``, ``server/watch_http.py``).

Keyspaces ``w1`` to ``w4`` are transactional, RF 3, three ranges each (so a
prefix spans three Paxos groups with their own leaders). Checked:

- a prefix watch gets exactly the commits a writer made across the ranges,
  in version order, each with the version the write returned; a watcher
  whose connection is cut resumes after the last version it saw whole and
  gets no gap and no repeat; the Python clients (blocking and asyncio) get
  the same events; a transaction across ranges (two-phase commit) arrives
  whole, every write at its one version, and a key watch gets only its key;
- SIGKILL of a range's leader, the node the watcher is connected to, mid-stream:
  the client resumes on a survivor once the range has a new leader, and
  nothing is lost or repeated;
- a ``from_version`` garbage collection has thinned is refused with 410
  ``compacted`` naming the oldest version (``txn.mvcc_gc_s`` is 3 s here:
  only w3 overwrites or deletes after a cut's resume could be that old),
  and a watch from that version is served; server-sent events carry ``id:``;
- a watcher that stops reading is cut off with a last ``watcher_too_slow``
  event naming ``last_version``, from which a new watch resumes with no gap;
  more than ``txn.max_watches`` streams on a node get 503 ``overloaded``.
"""

from __future__ import annotations

import asyncio
import http.client as httpclient
import json
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from ringkv.client import AsyncClient, Client
from ringkv.errors import RingKVError
from ringkv.tools.launcher import NodeProcess, free_port_block
from ringkv.tools.local_cluster import LocalCluster
from tests.procs import http, wait_until

pytestmark = pytest.mark.cluster

# w1 and w2 span three ranges; w3 (compaction) and w4 (a slow watcher) one each.
KEYSPACES = {"w1": 3, "w2": 3, "w3": 1, "w4": 1}
MVCC_GC_S = 3
MAX_WATCHES = 4
BUFFER_EVENTS = 40


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    tmp: Path = tmp_path_factory.mktemp("watch")
    overrides: dict[str, Any] = {
        f"keyspaces.{ks}": {"replication_factor": 3, "tier": "transactional", "ranges": ranges}
        for ks, ranges in KEYSPACES.items()}
    overrides.update({"txn.lease_s": 2.0, "txn.mvcc_gc_s": MVCC_GC_S,
                      "txn.max_watches": MAX_WATCHES,
                      "txn.watch_buffer_events": BUFFER_EVENTS})
    cluster = LocalCluster(tmp, nodes=3, rf=3, base_client_port=free_port_block(3),
                           base_internode_port=free_port_block(3), config_overrides=overrides)
    try:
        cluster.up(timeout_s=30)
        a = cluster.procs[0]

        def warm(ks: str, ranges: int) -> None:
            for i in range(4 * ranges):
                wait_until(lambda: http("PUT", f"{a.url}/v1/kv/{ks}/warm{i}",
                                        {"value": 0})[0] == 200,
                           timeout_s=30, interval_s=0.2, what=f"a first write to {ks}")

        # Every range has a leader before the tests; the keyspaces' groups form at once.
        warmers = [threading.Thread(target=warm, args=item) for item in KEYSPACES.items()]
        for thread in warmers:
            thread.start()
        for thread in warmers:
            thread.join(timeout=60)
        yield cluster
    finally:
        cluster.down()


# -- a raw watch over http.client -------------------------------------------------------------


class RawWatch:
    """One watch connection read line by line, as any HTTP client would."""

    def __init__(self, proc: NodeProcess, path: str, *, rcvbuf_bytes: int | None = None) -> None:
        parts = urlsplit(proc.url)
        self.conn = httpclient.HTTPConnection(parts.hostname or "", parts.port, timeout=15)
        if rcvbuf_bytes is not None:  # a small window: the node's writes back up sooner
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf_bytes)
            sock.settimeout(15)
            sock.connect((parts.hostname or "", parts.port or 80))
            self.conn.sock = sock
        self.conn.request("GET", path)
        self.response = self.conn.getresponse()
        self.status = self.response.status

    def next(self) -> dict[str, Any] | None:
        try:
            raw = self.response.readline()
        except httpclient.IncompleteRead:
            return None  # a connection the node closed without the chunked trailer
        return json.loads(raw) if raw.strip() else None

    def close(self) -> None:
        self.conn.close()


def write_keys(proc: NodeProcess, keyspace: str, keys: list[str],
               acked: dict[int, float] | None = None) -> list[tuple[str, int, Any]]:
    """Commit each key (a put, or a delete of a key already put), one after another:
    [(type, version, key)] as each write's answer gave it."""
    done = []
    written = set()
    for i, key in enumerate(keys):
        if key in written and i % 3 == 0:
            status, answer = http("DELETE", f"{proc.url}/v1/kv/{keyspace}/{key}", {})
            kind = "delete"
        else:
            status, answer = http("PUT", f"{proc.url}/v1/kv/{keyspace}/{key}", {"value": i})
            kind = "put"
        assert status == 200, answer
        written.add(key)
        if acked is not None:
            acked[answer["version"]] = time.monotonic()
        done.append((kind, answer["version"], key))
    return done


def events_of(watch: RawWatch, want: int, seen: list[dict[str, Any]],
              received: dict[int, float] | None = None, *, timeout_s: float = 10) -> None:
    """Read until ``want`` put/delete events are in ``seen`` (or the stream ends)."""
    deadline = time.monotonic() + timeout_s
    while len(seen) < want and time.monotonic() < deadline:
        event = watch.next()
        if event is None:
            return
        if event["type"] in ("put", "delete"):
            seen.append(event)
            if received is not None:
                received.setdefault(event["version"], time.monotonic())


def as_commits(events: list[dict[str, Any]]) -> list[tuple[str, int, Any]]:
    return [(e["type"], e["version"], e["key"]) for e in events]


def test_prefix_watch_gets_every_commit_in_order_and_resumes_after_a_cut(
        cluster: LocalCluster) -> None:
    a, b, c = cluster.procs
    watch = RawWatch(b, "/v1/watch/w1/p?prefix=true")
    assert watch.status == 200
    assert watch.response.getheader("Content-Type") == "application/x-ndjson"
    start = watch.next()
    assert start is not None and start["type"] == "progress"
    acked: dict[int, float] = {}
    received: dict[int, float] = {}
    keys = [f"p{i % 25}" for i in range(60)]
    commits: list[tuple[str, int, Any]] = []
    writer = threading.Thread(target=lambda: commits.extend(
        write_keys(a, "w1", [*keys[:30], "other", *keys[30:]], acked)))
    writer.start()
    seen: list[dict[str, Any]] = []
    events_of(watch, 25, seen, received)
    watch.close()  # cut mid-stream
    # Resume as a client does: after the last version seen whole, dropping repeats.
    last_whole = max([start["version"]] + [e["version"] for e in seen[:-1]])
    watch = RawWatch(c, f"/v1/watch/w1/p?prefix=true&from_version={last_whole}")
    assert watch.status == 200
    resumed: list[dict[str, Any]] = []
    writer.join(timeout=30)
    events_of(watch, 60 - len(seen) + sum(e["version"] > last_whole for e in seen),
              resumed, received)
    watch.close()
    last = (seen[-1]["version"], seen[-1]["key"])
    got = seen + [e for e in resumed if (e["version"], e["key"]) > last]
    expected = [x for x in commits if x[2] != "other"]
    assert len(expected) == 60
    assert as_commits(got) == sorted(expected, key=lambda x: (x[1], x[2]))
    # A put's value is what was written: write_keys puts its index in the list.
    written = {(v, k): i for i, (kind, v, k) in enumerate(commits) if kind == "put"}
    assert all(e["value"] == written[(e["version"], e["key"])] for e in got if e["type"] == "put")
    lags_ms = sorted((received[v] - acked[v]) * 1000 for v in acked if v in received)
    print(f"watch delivery after the write's answer: p50 {statistics.median(lags_ms):.1f} ms, "
          f"p99 {lags_ms[int(0.99 * (len(lags_ms) - 1))]:.1f} ms over {len(lags_ms)} commits")


def test_python_clients_watch_a_prefix(cluster: LocalCluster) -> None:
    a, b, _ = cluster.procs
    got: list[Any] = []
    ready = threading.Event()

    def watcher() -> None:
        with Client([b.url], keyspace="w1", protocol="http") as kv:
            for event in kv.watch("w1", "q", prefix=True, from_version=origin):
                got.append(event)
                if len(got) == 10:
                    return

    status, first = http("PUT", f"{a.url}/v1/kv/w1/q-origin", {"value": "o"})
    assert status == 200
    origin = first["version"]
    thread = threading.Thread(target=watcher, daemon=True)
    thread.start()
    ready.set()
    commits = write_keys(a, "w1", [f"q{i}" for i in range(10)])
    thread.join(timeout=20)
    assert not thread.is_alive()
    assert [(e.type, e.version, e.key) for e in got] == commits

    async def async_watch() -> list[Any]:
        async with AsyncClient([b.url], keyspace="w1", protocol="http") as kv:
            seen = []
            async for event in kv.watch("w1", "q3", from_version=origin):
                seen.append(event)
                if len(seen) == 1:
                    return seen
        return seen

    seen = asyncio.run(async_watch())
    assert [(e.type, e.key, e.value) for e in seen] == [("put", "q3", 3)]


def test_a_transaction_across_ranges_arrives_whole_at_one_version(cluster: LocalCluster) -> None:
    a, b, c = cluster.procs
    status, first = http("PUT", f"{a.url}/v1/kv/w1/x-before", {"value": 0})
    assert status == 200
    keys = [f"x{i}" for i in range(8)]
    prefix_watch = RawWatch(b, f"/v1/watch/w1/x?prefix=true&from_version={first['version']}")
    key_watch = RawWatch(c, f"/v1/watch/w1/x1?from_version={first['version']}")
    status, txn = http("POST", f"{a.url}/v1/txn", {
        "keyspace": "w1", "writes": [{"op": "put", "key": k, "value": k} for k in keys]})
    assert status == 200 and txn["committed"], txn
    assert len(txn["receipt"]["ranges"]) > 1  # two-phase commit over several groups
    status, _ = http("PUT", f"{a.url}/v1/kv/w1/x1x", {"value": "not x1"})
    assert status == 200
    seen: list[dict[str, Any]] = []
    events_of(prefix_watch, len(keys) + 1, seen)
    assert [(e["key"], e["version"]) for e in seen[:len(keys)]] == \
        [(k, txn["commit_ts"]) for k in sorted(keys)]
    assert seen[-1]["key"] == "x1x"
    one: list[dict[str, Any]] = []
    events_of(key_watch, 1, one)
    assert [(e["key"], e["value"]) for e in one] == [("x1", "x1")]
    for _ in range(50):  # bounded: an idle stream says how far it got every second
        event = key_watch.next()
        assert event is not None and event["type"] == "progress", event  # never x1x
        if event["version"] >= seen[-1]["version"]:
            break
    else:
        raise AssertionError("the key watch never passed x1x's commit")
    prefix_watch.close()
    key_watch.close()


def test_a_compacted_from_version_is_refused_naming_the_oldest(cluster: LocalCluster) -> None:
    a, b, _ = cluster.procs
    status, first = http("PUT", f"{a.url}/v1/kv/w3/k", {"value": 0})
    assert status == 200

    def refused() -> dict[str, Any] | None:
        http("PUT", f"{a.url}/v1/kv/w3/k", {"value": 1})  # versions for GC to thin
        watch = RawWatch(b, f"/v1/watch/w3/k?from_version={first['version']}")
        try:  # served (a stream) until GC has thinned the history after first
            return json.loads(watch.response.read()) if watch.status == 410 else None
        finally:
            watch.close()

    # Versions stay MVCC_GC_S; a GC pass runs every second.
    answer = wait_until(refused, timeout_s=MVCC_GC_S + 8, interval_s=0.3,
                        what="a compacted from_version")
    error = answer["error"]
    assert error["code"] == "compacted" and error["from_version"] == first["version"]
    assert error["oldest_version"] > first["version"]
    watch = RawWatch(b, f"/v1/watch/w3/k?from_version={error['oldest_version'] + 1_000_000}")
    assert watch.status == 200  # from a version still kept: served
    watch.close()
    sse = RawWatch(b, "/v1/watch/w3/k?format=sse")
    assert sse.status == 200 and sse.response.getheader("Content-Type") == "text/event-stream"
    status, put = http("PUT", f"{a.url}/v1/kv/w3/k", {"value": "sse"})
    lines: list[bytes] = []
    while b"event: put\n" not in lines and len(lines) < 60:  # progress events, then the put
        lines.append(sse.response.readline())
    lines += [sse.response.readline() for _ in range(2)]  # its data and blank line
    sse.close()
    assert b"event: put\n" in lines and f"id: {put['version']}\n".encode() in lines, lines
    status, bad = http("GET", f"{b.url}/v1/watch/w3/k?from_version=x")
    assert (status, bad["error"]["field"]) == (400, "from_version")
    status, bad = http("GET", f"{b.url}/v1/watch/default/k")
    assert (status, bad["error"]["field"]) == (400, "keyspace")


def test_a_watcher_that_stops_reading_is_cut_off_and_resumes(cluster: LocalCluster) -> None:
    a, b, _ = cluster.procs
    status, first = http("PUT", f"{a.url}/v1/kv/w4/start", {"value": "start"})
    assert status == 200
    # Distinct keys: GC thins nothing, so the resume below is never compacted.
    slow = RawWatch(b, f"/v1/watch/w4/big?prefix=true&from_version={first['version']}",
                    rcvbuf_bytes=4096)
    assert slow.status == 200
    value = "x" * 80_000
    versions = []
    for i in range(100):  # 8 MB: more than the sockets (4 MB here) and the node's buffer hold
        status, answer = http("PUT", f"{a.url}/v1/kv/w4/big{i:03}", {"value": f"{i}{value}"})
        assert status == 200
        versions.append(answer["version"])

    def cut_off() -> bool:
        status, view = http("GET", f"{b.url}/v1/status")
        return status == 200 and view["transactional"]["stats"]["watchers_too_slow"] >= 1

    wait_until(cut_off, timeout_s=15, interval_s=0.2, what="the slow watcher cut off")
    events: list[dict[str, Any]] = []
    final = None
    for _ in range(len(versions) + 5):  # bounded: the node closed the stream
        event = slow.next()
        if event is None:
            break
        if event["type"] == "error":
            final = event
            break
        if event["type"] == "put":
            events.append(event)
    slow.close()
    assert final is not None and final["error"]["code"] == "watcher_too_slow", final
    last = final["error"]["last_version"]
    assert events and events[-1]["version"] == last  # everything up to it was delivered
    resumed = RawWatch(b, f"/v1/watch/w4/big?prefix=true&from_version={last}")
    rest: list[dict[str, Any]] = []
    events_of(resumed, len(versions) - len(events), rest)
    resumed.close()
    assert [e["version"] for e in events + rest] == versions


def test_more_watches_than_the_limit_get_503(cluster: LocalCluster) -> None:
    _, b, _ = cluster.procs

    def watches_open() -> int:
        status, view = http("GET", f"{b.url}/v1/status")
        assert status == 200
        return int(view["transactional"]["stats"]["watches_open"])

    # The watches earlier tests closed end once the node notices (its next write).
    wait_until(lambda: watches_open() == 0, timeout_s=10, interval_s=0.2,
               what="the earlier watches to end")
    open_ = [RawWatch(b, "/v1/watch/w1/limit") for _ in range(MAX_WATCHES)]
    try:
        assert [w.status for w in open_] == [200] * MAX_WATCHES
        status, refused = http("GET", f"{b.url}/v1/watch/w1/limit")
        assert status == 503 and refused["error"]["reason"] == "max_watches", refused
    finally:
        for watch in open_:
            watch.close()

    def served_again() -> bool:
        watch = RawWatch(b, "/v1/watch/w1/limit")
        watch.close()
        return watch.status == 200

    wait_until(served_again, timeout_s=10, interval_s=0.3, what="a watch after the others closed")


# Last: it kills a node of the module's cluster.
def leader_of_some_range(procs: list[NodeProcess], keyspace: str) -> NodeProcess:
    def find() -> NodeProcess | None:
        for proc in procs:
            status, view = http("GET", f"{proc.url}/v1/status")
            groups = view.get("transactional", {}).get("groups", {}) if status == 200 else {}
            if any(g["leads"] for gid, g in groups.items() if gid.startswith(keyspace + "/")):
                return proc
        return None

    return wait_until(find, timeout_s=10, interval_s=0.1, what=f"a leader in {keyspace}")


def test_leader_killed_mid_stream_loses_and_repeats_nothing(cluster: LocalCluster) -> None:
    procs = list(cluster.procs)
    leader = leader_of_some_range(procs, "w2")
    survivors = [p for p in procs if p is not leader]
    got: list[Any] = []
    errors: list[BaseException] = []
    status, first = http("PUT", f"{survivors[0].url}/v1/kv/w2/origin", {"value": 0})
    assert status == 200
    origin = first["version"]
    total = 40

    def watcher() -> None:
        # The leader is tried first: the kill cuts this very connection.
        try:
            with Client([leader.url, survivors[0].url], keyspace="w2", protocol="http") as kv:
                for event in kv.watch("w2", "k", prefix=True, from_version=origin,
                                      max_reconnects=30):
                    got.append(event)
                    if len(got) == total:
                        return
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    thread = threading.Thread(target=watcher, daemon=True)
    thread.start()
    commits: list[tuple[str, int, str]] = []
    with Client([p.url for p in survivors], keyspace="w2", protocol="http",
                timeout_s=2.0) as kv:
        for i in range(total):
            if i == total // 3:
                leader.kill()  # SIGKILL
                killed_at = time.monotonic()
            deadline = time.monotonic() + 20
            while True:  # the same id until it answers: committed at most once
                try:
                    result = kv.put(f"k{i}", i, txn_id=f"watch-kill-{i}")
                    break
                except RingKVError:
                    assert time.monotonic() < deadline, f"k{i} did not commit"
                    time.sleep(0.1)
            commits.append(("put", result.version, f"k{i}"))
        print(f"leader {leader.node_id} killed; the writes after it took "
              f"{time.monotonic() - killed_at:.2f} s")
    thread.join(timeout=30)
    assert not errors, errors
    assert not thread.is_alive(), f"{len(got)} of {total} events"
    assert [(e.type, e.version, e.key) for e in got] == sorted(commits, key=lambda x: x[1])
