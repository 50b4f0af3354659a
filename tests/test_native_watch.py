"""Watches and session leases over the native protocol (version 2), on three real node
processes (``server/watch_native.py``, ``server/native.py``, ``docs/native-protocol.md``).

Keyspace ``nw`` is transactional, RF 3, three ranges (a prefix spans three Paxos
groups); ``ns`` has one range (compaction, a slow watcher). Checked:

- a native ``watch`` streams exactly the commits a writer made across the ranges,
  in version order, as the HTTP watch's NDJSON lines; cut mid-stream and resumed
  from the last version seen whole, nothing is missed or repeated; the event
  latency (the write's answer to the event's arrival) over native is printed
  beside HTTP's;
- the Python clients (blocking and asyncio) watch over native when their protocol
  is native, with no HTTP watch at all, and over HTTP when the native port refuses;
- a compacted ``from_version`` is refused with 410 ``compacted`` naming
  ``oldest_version``; a watcher that stops reading is cut off with a last
  ``watcher_too_slow`` event naming ``last_version``;
- ``txn.max_watches`` counts native and HTTP watches together; ``watch_cancel``
  ends one watch (its last frame) and frees its slot, closing the connection
  frees the rest; the idle timeout does not close a connection while a watch
  streams on it, the header timeout still does (and frees its watch);
- ``lease_grant``/``keepalive``/``info``/``revoke`` frames answer as HTTP does, and
  a key put with the lease vanishes on revoke; the Python client's leases go native;
- malformed watch and lease frames get a 400 naming the field, and the connection
  serves on; a version 1 connection is refused the version 2 operations.
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
from typing import Any, cast
from urllib.parse import urlsplit

import pytest

from ringkv.client import AsyncClient, Client
from ringkv.net.codec import KIND_REQUEST, KIND_RESPONSE, Frame, FrameDecoder, encode_frame
from ringkv.tools.launcher import NodeProcess, free_port_block
from ringkv.tools.local_cluster import LocalCluster
from tests.procs import http, wait_until

pytestmark = pytest.mark.cluster

KEYSPACES = {"nw": 3, "ns": 1}
MVCC_GC_S = 3
MAX_WATCHES = 4
BUFFER_EVENTS = 40
DEADLINE_S = 15.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    tmp: Path = tmp_path_factory.mktemp("native_watch")
    overrides: dict[str, Any] = {
        f"keyspaces.{ks}": {"replication_factor": 3, "tier": "transactional", "ranges": ranges}
        for ks, ranges in KEYSPACES.items()}
    overrides.update({"txn.lease_s": 2.0, "txn.mvcc_gc_s": MVCC_GC_S,
                      "txn.max_watches": MAX_WATCHES,
                      "txn.watch_buffer_events": BUFFER_EVENTS,
                      "limits.idle_timeout_s": 1.0, "limits.header_timeout_s": 1.0})
    cluster = LocalCluster(tmp, nodes=3, rf=3, base_client_port=free_port_block(3),
                           base_internode_port=free_port_block(3), config_overrides=overrides)
    try:
        cluster.up(timeout_s=30)
        a = cluster.procs[0]
        for ks, ranges in KEYSPACES.items():  # every range has a leader before the tests
            for i in range(4 * ranges):
                wait_until(lambda ks=ks, i=i: http("PUT", f"{a.url}/v1/kv/{ks}/warm{i}",
                                                   {"value": 0})[0] == 200,
                           timeout_s=30, interval_s=0.2, what=f"a first write to {ks}")
        yield cluster
    finally:
        cluster.down()


class Raw:
    """A hand-driven native connection (version 2 unless told otherwise)."""

    def __init__(self, proc: NodeProcess, *, versions: tuple[int, ...] = (1, 2),
                 rcvbuf_bytes: int | None = None) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf_bytes is not None:  # a small window: the node's writes back up sooner
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf_bytes)
        self.sock.settimeout(DEADLINE_S)
        self.sock.connect(("127.0.0.1", proc.native_port))
        self.decoder = FrameDecoder()
        self.frames: list[Frame] = []
        self.sock.sendall(encode_frame(KIND_REQUEST, 0, "hello", {"versions": list(versions)}))
        hello = self.read()
        assert hello.kind == KIND_RESPONSE
        self.version = hello.payload["version"]
        assert self.version == max(versions)

    def send(self, verb: str, request_id: int, **payload: Any) -> None:
        self.sock.sendall(encode_frame(KIND_REQUEST, request_id, verb, payload,
                                       version=self.version))

    def read(self) -> Frame:
        while not self.frames:  # bounded: each recv times out after DEADLINE_S
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed")
            self.frames.extend(self.decoder.feed(data))
        return self.frames.pop(0)

    def answer(self, request_id: int) -> tuple[int, Any]:
        """The status and JSON document answering ``request_id`` (skipping stream frames)."""
        for _ in range(1000):  # bounded: other streams' frames are skipped
            frame = self.read()
            if frame.request_id == request_id and "body" in frame.payload:
                return frame.payload["status"], json.loads(frame.payload["body"])
        raise AssertionError(f"no answer to {request_id}")

    def closed(self) -> bool:
        try:
            return self.sock.recv(65536) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


def watch_events(raw: Raw, request_id: int, want: int, seen: list[dict[str, Any]],
                 received: dict[int, float] | None = None) -> dict[str, Any] | None:
    """Read the stream of ``request_id`` until ``want`` put/delete events are in ``seen``;
    the final event if the stream ended first."""
    deadline = time.monotonic() + DEADLINE_S
    while len(seen) < want and time.monotonic() < deadline:
        frame = raw.read()
        if frame.request_id != request_id:
            continue
        event = json.loads(frame.payload["event"]) if "event" in frame.payload else None
        if event is not None and event["type"] in ("put", "delete"):
            seen.append(event)
            if received is not None:
                received.setdefault(event["version"], time.monotonic())
        if not frame.payload.get("more", False):
            return event if event is not None else {"type": "end"}
    return None


def write_keys(proc: NodeProcess, keyspace: str, keys: list[str],
               acked: dict[int, float] | None = None) -> list[tuple[str, int, str]]:
    """Commit each key over HTTP: [(type, version, key)] as each write's answer gave it."""
    done = []
    for i, key in enumerate(keys):
        status, answer = http("PUT", f"{proc.url}/v1/kv/{keyspace}/{key}", {"value": i})
        assert status == 200, answer
        if acked is not None:
            acked[answer["version"]] = time.monotonic()
        done.append(("put", answer["version"], key))
    return done


def watches_open(proc: NodeProcess) -> int:
    status, view = http("GET", f"{proc.url}/v1/status")
    assert status == 200
    return int(view["transactional"]["stats"]["watches_open"])


def percentiles(lags_ms: list[float]) -> str:
    lags_ms = sorted(lags_ms)
    return (f"p50 {statistics.median(lags_ms):.1f} ms, "
            f"p99 {lags_ms[int(0.99 * (len(lags_ms) - 1))]:.1f} ms over {len(lags_ms)}")


def test_a_native_watch_gets_every_commit_in_order_and_resumes_after_a_cut(
        cluster: LocalCluster) -> None:
    a, b, c = cluster.procs
    raw = Raw(b)
    raw.send("watch", 7, keyspace="nw", key="p", args={"prefix": True})
    first = raw.read()
    assert (first.request_id, first.verb, first.payload["more"]) == (7, "watch", True)
    start = json.loads(first.payload["event"])
    assert start["type"] == "progress"
    keys = [f"p{i % 25}" for i in range(60)]
    commits: list[tuple[str, int, str]] = []
    writer = threading.Thread(target=lambda: commits.extend(
        write_keys(a, "nw", [*keys[:30], "other", *keys[30:]])))
    writer.start()
    seen: list[dict[str, Any]] = []
    assert watch_events(raw, 7, 25, seen) is None
    raw.close()  # cut mid-stream
    last_whole = max([start["version"]] + [e["version"] for e in seen[:-1]])
    raw = Raw(c)
    raw.send("watch", 1, keyspace="nw", key="p",
             args={"prefix": "true", "from_version": last_whole})
    resumed: list[dict[str, Any]] = []
    writer.join(timeout=30)
    watch_events(raw, 1, 60 - len(seen) + sum(e["version"] > last_whole for e in seen),
                 resumed)
    raw.close()
    last = (seen[-1]["version"], seen[-1]["key"])
    got = seen + [e for e in resumed if (e["version"], e["key"]) > last]
    expected = [x for x in commits if x[2] != "other"]
    assert len(expected) == 60
    assert [(e["type"], e["version"], e["key"]) for e in got] == \
        sorted(expected, key=lambda x: (x[1], x[2]))


def watch_latency_ms(a: NodeProcess, b: NodeProcess, protocol: str, prefix: str,
                     count: int = 40) -> list[float]:
    """A client's watch on ``b`` over ``protocol`` while ``count`` writes go back to back to
    ``a``: each event's arrival after its write's answer, in ms."""
    status, head = http("PUT", f"{a.url}/v1/kv/nw/{prefix}-origin", {"value": 0})
    assert status == 200
    acked: dict[int, float] = {}
    received: dict[int, float] = {}
    with Client([b.url], keyspace="nw", protocol=protocol) as kv:
        kv.refresh_ring()
        writer = threading.Thread(target=write_keys,
                                  args=(a, "nw", [f"{prefix}{i}" for i in range(count)], acked))
        writer.start()
        got = 0
        for event in kv.watch("nw", prefix, prefix=True, from_version=head["version"]):
            received.setdefault(event.version, time.monotonic())
            got += 1
            if got == count:
                break
        writer.join(timeout=30)
    return [(received[v] - acked[v]) * 1000 for v in acked if v in received]


def test_watch_latency_native_and_http(cluster: LocalCluster) -> None:
    """Printed: the same writes, watched over each protocol in turn."""
    a, b, _ = cluster.procs
    native_ms = watch_latency_ms(a, b, "native", "ln")
    http_ms = watch_latency_ms(a, b, "http", "lh")
    assert len(native_ms) == len(http_ms) == 40
    print(f"watch event after the write's answer, 40 writes back to back: native "
          f"{percentiles(native_ms)}; HTTP {percentiles(http_ms)}")


def test_the_python_clients_watch_over_native(cluster: LocalCluster) -> None:
    a, b, _ = cluster.procs
    status, first = http("PUT", f"{a.url}/v1/kv/nw/q-origin", {"value": "o"})
    assert status == 200
    origin = first["version"]
    commits = write_keys(a, "nw", [f"q{i}" for i in range(10)])

    def no_http(*args: Any) -> Any:
        raise AssertionError("the watch went over HTTP")

    with Client([b.url], keyspace="nw") as kv:
        kv.refresh_ring()
        setattr(kv, "_watch_http", no_http)
        got = []
        for event in kv.watch("nw", "q", prefix=True, from_version=origin):
            got.append(event)
            if len(got) == 10:
                break
    assert [(e.type, e.version, e.key) for e in got] == commits

    async def async_watch() -> list[Any]:
        async with AsyncClient([b.url], keyspace="nw") as kv:
            setattr(kv, "_watch_http", no_http)
            seen = []
            async for event in kv.watch("nw", "q3", from_version=origin):
                seen.append(event)
                break
            return seen

    seen = asyncio.run(asyncio.wait_for(async_watch(), DEADLINE_S))
    assert [(e.type, e.key, e.value) for e in seen] == [("put", "q3", 3)]

    # A native port that refuses: the watch goes over HTTP, as other requests do.
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        refusing = unused.getsockname()[:2]
    with Client([b.url], keyspace="nw") as kv:
        kv.refresh_ring()
        native_map = cast(dict[str, tuple[str, int]], kv._ops.router.topology.native)
        for url in native_map:  # every node's native port refuses
            native_map[url] = refusing
        over_http = []
        for event in kv.watch("nw", "q5", from_version=origin):
            over_http.append(event)
            break
        assert refusing in kv._native_down
    assert [(e.key, e.value) for e in over_http] == [("q5", 5)]


@pytest.mark.parametrize("cut_after", [3, 6, 9])
def test_the_clients_native_watch_resumes_after_a_cut_with_no_gap_or_repeat(
        cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch, cut_after: int) -> None:
    """The connection breaks after ``cut_after`` frames (inside a transaction's version
    for some): the client reconnects over native from the last version seen whole."""
    from ringkv.client import aio as aio_client
    from ringkv.client import blocking

    a, b, c = cluster.procs
    prefix = f"r{cut_after}-"
    status, first = http("PUT", f"{a.url}/v1/kv/nw/{prefix}origin", {"value": 0})
    assert status == 200
    commits = write_keys(a, "nw", [f"{prefix}{i}" for i in range(3)])
    keys = [f"{prefix}t{i}" for i in range(4)]
    status, txn = http("POST", f"{a.url}/v1/txn", {
        "keyspace": "nw", "writes": [{"op": "put", "key": k, "value": k} for k in keys]})
    assert status == 200 and txn["committed"], txn
    commits += [("put", txn["commit_ts"], k) for k in sorted(keys)]
    commits += write_keys(a, "nw", [f"{prefix}{i}" for i in range(3, 6)])
    expected = [(kind, version, key) for kind, version, key in commits]

    frames_read = [0]
    real_next = blocking._FrameReader.next

    def cutting_next(self: Any) -> Frame:
        frames_read[0] += 1
        if frames_read[0] == cut_after + 2:  # the hello, the first progress, then events
            raise ConnectionResetError("cut by the test")
        return real_next(self)

    monkeypatch.setattr(blocking._FrameReader, "next", cutting_next)
    with Client([b.url, c.url], keyspace="nw", backoff_max_s=0.05) as kv:
        kv.refresh_ring()
        got = []
        for event in kv.watch("nw", prefix, prefix=True, from_version=first["version"]):
            got.append((event.type, event.version, event.key))
            if len(got) == len(expected):
                break
    assert frames_read[0] > cut_after + 2  # it was cut, and went on over native
    assert got == expected

    reads = [0]
    real_read = aio_client._read_frame

    async def cutting_read(reader: asyncio.StreamReader) -> Frame:
        reads[0] += 1
        if reads[0] == cut_after + 2:
            raise ConnectionResetError("cut by the test")
        return await real_read(reader)

    monkeypatch.setattr(aio_client, "_read_frame", cutting_read)

    async def async_watch() -> list[tuple[str, int, str]]:
        seen = []
        async with AsyncClient([b.url, c.url], keyspace="nw", backoff_max_s=0.05) as kv:
            async for event in kv.watch("nw", prefix, prefix=True,
                                        from_version=first["version"]):
                seen.append((event.type, event.version, event.key))
                if len(seen) == len(expected):
                    break
        return seen

    assert asyncio.run(asyncio.wait_for(async_watch(), DEADLINE_S)) == expected
    assert reads[0] > cut_after + 2


@pytest.mark.soak
def test_a_compacted_from_version_is_refused_naming_the_oldest(cluster: LocalCluster) -> None:
    a, b, _ = cluster.procs
    status, first = http("PUT", f"{a.url}/v1/kv/ns/k", {"value": 0})
    assert status == 200
    raw = Raw(b)
    ids = iter(range(1, 1000))

    def refused() -> dict[str, Any] | None:
        http("PUT", f"{a.url}/v1/kv/ns/k", {"value": 1})  # versions for GC to thin
        request_id = next(ids)
        raw.send("watch", request_id, keyspace="ns", key="k",
                 args={"from_version": first["version"]})
        frame = raw.read()
        assert frame.request_id == request_id
        if "body" in frame.payload:  # refused before any stream
            assert frame.payload["status"] == 410
            return dict(json.loads(frame.payload["body"]))
        raw.send("watch_cancel", 10_000 + request_id, watch_id=request_id)
        cancelled = ended = False
        for _ in range(100):  # bounded: its remaining frames, its last, the cancel's answer
            frame = raw.read()
            cancelled = cancelled or frame.request_id == 10_000 + request_id
            ended = ended or (frame.request_id == request_id and not frame.payload["more"])
            if cancelled and ended:
                return None
        raise AssertionError("no answer to watch_cancel")

    answer = wait_until(refused, timeout_s=MVCC_GC_S + 8, interval_s=0.3,
                        what="a compacted from_version")
    error = answer["error"]
    assert error["code"] == "compacted" and error["from_version"] == first["version"]
    assert error["oldest_version"] > first["version"]
    raw.close()


def test_watch_cancel_and_closing_free_the_slots_and_idle_does_not_close(
        cluster: LocalCluster) -> None:
    _, b, _ = cluster.procs
    wait_until(lambda: watches_open(b) == 0, timeout_s=10, interval_s=0.2,
               what="the earlier watches to end")
    raw = Raw(b)
    for request_id in range(1, MAX_WATCHES):
        raw.send("watch", request_id, keyspace="nw", key="limit")
        assert raw.read().payload["more"] is True
    # An HTTP watch takes the last slot: both front ends count against txn.max_watches.
    parts = urlsplit(b.url)
    over_http = httpclient.HTTPConnection(parts.hostname or "", parts.port, timeout=DEADLINE_S)
    over_http.request("GET", "/v1/watch/nw/limit")
    assert over_http.getresponse().status == 200
    raw.send("watch", 9, keyspace="nw", key="limit")
    status, refusal = raw.answer(9)
    assert status == 503 and refusal["error"]["reason"] == "max_watches", refusal
    hold_until = time.monotonic() + 1.8  # past limits.idle_timeout_s (1 s): streams keep it
    while time.monotonic() < hold_until:
        raw.read()  # progress frames, about one a second per watch
    raw.send("watch_cancel", 20, watch_id=2)
    final: list[Frame] = []
    cancel: list[Frame] = []
    for _ in range(100):  # bounded: the other watches' progress frames are skipped
        frame = raw.read()
        if frame.request_id == 2:
            final.append(frame)
        elif frame.request_id == 20:
            cancel.append(frame)
        if cancel and final and final[-1].payload["more"] is False:
            break
    assert json.loads(cancel[0].payload["body"]) == {"cancelled": True, "watch_id": 2}
    assert "event" not in final[-1].payload  # a cancelled watch ends without an error
    raw.send("watch", 10, keyspace="nw", key="limit")  # the cancelled watch's slot
    for _ in range(100):  # bounded: the other watches' progress frames are skipped
        started = raw.read()
        if started.request_id == 10:
            break
    assert started.payload.get("more") is True, started.payload
    assert watches_open(b) == MAX_WATCHES
    raw.close()
    over_http.close()
    wait_until(lambda: watches_open(b) == 0, timeout_s=5, interval_s=0.1,
               what="closing the connections to free their watches")


def test_the_header_timeout_holds_on_a_connection_with_a_watch(cluster: LocalCluster) -> None:
    """A frame begun and never finished closes the connection (limits.header_timeout_s,
    1 s here) even while a watch streams on it, and the watch's slot is freed."""
    _, b, _ = cluster.procs
    wait_until(lambda: watches_open(b) == 0, timeout_s=10, interval_s=0.2,
               what="the earlier watches to end")
    raw = Raw(b)
    try:
        raw.send("watch", 1, keyspace="nw", key="header")
        assert raw.read().payload["more"] is True
        assert watches_open(b) == 1
        raw.sock.sendall(b"\x00\x00\x01\x00")  # a length prefix, and nothing of its frame
        began = time.monotonic()
        with pytest.raises((ConnectionError, OSError)):
            for _ in range(100):  # bounded: progress frames until the node closes
                raw.read()
        assert time.monotonic() - began < 5
    finally:
        raw.close()
    wait_until(lambda: watches_open(b) == 0, timeout_s=5, interval_s=0.1,
               what="the closed connection's watch to end")


def test_lease_operations_over_native(cluster: LocalCluster) -> None:
    a, b, _ = cluster.procs
    raw = Raw(a)
    raw.send("lease_grant", 1, body=b'{"ttl": 30, "keyspace": "nw"}')
    status, granted = raw.answer(1)
    assert status == 200 and granted["ttl"] == 30, granted
    lease = granted["id"]
    raw.send("put", 2, keyspace="nw", key="leased",
             body=json.dumps({"value": 1, "lease": lease}).encode())
    assert raw.answer(2)[0] == 200
    raw.send("lease_keepalive", 3, lease_id=lease)
    status, renewed = raw.answer(3)
    assert status == 200 and renewed["remaining_ms"] > 0
    raw.send("lease_info", 4, lease_id=lease)
    status, info = raw.answer(4)
    assert status == 200 and "leased" in info["keys"], info
    raw.send("lease_revoke", 5, lease_id=lease)
    status, revoked = raw.answer(5)
    assert status == 200 and revoked["deleted"] == ["leased"]
    assert http("GET", f"{b.url}/v1/kv/nw/leased")[0] == 404
    raw.send("lease_keepalive", 6, lease_id=lease)
    status, expired = raw.answer(6)
    assert status == 404 and expired["error"]["code"] == "lease_expired"
    raw.close()
    # The Python client's lease calls go native: its HTTP pool sends nothing after the ring.
    with Client([a.url], keyspace="nw") as kv:
        kv.refresh_ring()
        sent: list[Any] = []
        http_send = kv._pool.send
        kv._pool.send = lambda effect: sent.append(effect) or http_send(effect)  # type: ignore
        with kv.lease(30, keyspace="nw") as held:
            kv.put("leased2", 2, lease=held)
            assert held.keepalive() > 0
            assert "leased2" in held.info()["keys"]
        assert kv.get("leased2") is None
        assert sent == [], [s.url for s in sent]


@pytest.mark.parametrize(("verb", "payload", "field"), [
    ("watch", {"key": "k"}, "keyspace"),
    ("watch", {"keyspace": "nw", "key": "k", "args": {"format": "sse"}}, "args.format"),
    ("watch", {"keyspace": "nw", "key": "k", "args": {"from_version": "x"}}, "from_version"),
    ("watch", {"keyspace": "nw", "args": {"prefix": False}}, "prefix"),
    ("watch", {"keyspace": "default", "key": "k"}, "keyspace"),
    ("watch_cancel", {"watch_id": "x"}, "watch_id"),
    ("watch_cancel", {}, "watch_id"),
    ("lease_keepalive", {}, "lease_id"),
    ("lease_revoke", {"lease_id": 5}, "lease_id"),
    ("lease_info", {"lease_id": "no-colon"}, "id"),
    ("lease_grant", {"body": b'{"keyspace": "nw"}'}, "ttl"),
    ("lease_grant", {"body": b'{"ttl": "soon"}'}, "ttl"),
])
def test_malformed_watch_and_lease_frames_name_the_field(
        cluster: LocalCluster, verb: str, payload: dict[str, Any], field: str) -> None:
    raw = Raw(cluster.procs[2])
    try:
        raw.send(verb, 3, **payload)
        status, answer = raw.answer(3)
        assert status == 400 and answer["error"]["field"] == field, answer
        raw.send("health", 4)
        assert raw.answer(4)[0] == 200  # the connection serves on
    finally:
        raw.close()


def test_a_version_1_connection_is_refused_the_version_2_operations(
        cluster: LocalCluster) -> None:
    raw = Raw(cluster.procs[2], versions=(1,))
    try:
        raw.send("watch", 1, keyspace="nw", key="k")
        status, answer = raw.answer(1)
        assert status == 400 and answer["error"]["field"] == "verb", answer
        raw.send("health", 2)
        assert raw.answer(2)[0] == 200
    finally:
        raw.close()


@pytest.mark.soak
def test_a_native_watcher_that_stops_reading_is_cut_off(cluster: LocalCluster) -> None:
    a, b, _ = cluster.procs
    status, first = http("PUT", f"{a.url}/v1/kv/ns/start", {"value": "start"})
    assert status == 200
    slow = Raw(b, rcvbuf_bytes=4096)
    slow.send("watch", 1, keyspace="ns", key="big",
              args={"prefix": True, "from_version": first["version"]})
    value = "x" * 80_000
    versions = []
    for i in range(100):  # 8 MB: more than the sockets and the node's buffer hold
        status, answer = http("PUT", f"{a.url}/v1/kv/ns/big{i:03}", {"value": f"{i}{value}"})
        assert status == 200
        versions.append(answer["version"])

    def cut_off() -> bool:
        status, view = http("GET", f"{b.url}/v1/status")
        return status == 200 and view["transactional"]["stats"]["watchers_too_slow"] >= 1

    wait_until(cut_off, timeout_s=15, interval_s=0.2, what="the slow watcher cut off")
    events: list[dict[str, Any]] = []
    final = watch_events(slow, 1, len(versions) + 1, events)
    slow.close()
    assert final is not None and final["type"] == "error", final
    assert final["error"]["code"] == "watcher_too_slow"
    last = final["error"]["last_version"]
    assert events and events[-1]["version"] == last
    resumed = Raw(b)
    resumed.send("watch", 1, keyspace="ns", key="big",
                 args={"prefix": True, "from_version": last})
    rest: list[dict[str, Any]] = []
    watch_events(resumed, 1, len(versions) - len(events), rest)
    resumed.close()
    assert [e["version"] for e in events + rest] == versions
