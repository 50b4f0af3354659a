"""A watch whose node falls silent, on three real node processes.

A paused process (SIGSTOP) is silence on loopback: its connections stay open
and nothing comes, no reset. A node sends a ``progress`` line every second on an
idle stream (``txn/watch.py``), so the client gives a stream up after a few
missed ones (``client/watch.py``'s ``SILENT_STREAM_S``) and resumes from another
node. Checked for both clients over both protocols: the watch's node is paused
mid-stream (whether or not it leads the range: writes go on through the others,
after an election when it did); the watch's next connection opens on another
node within three progress intervals (plus a reconnect's backoff and scheduling:
``RESUME_BOUND_S``), and every commit arrives exactly once, in version order.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from ringkv.client import AsyncClient, Client
from ringkv.client.watch import WatchCore, WatchEvent
from ringkv.errors import RingKVError
from ringkv.tools.launcher import free_port_block
from ringkv.tools.local_cluster import LocalCluster
from ringkv.txn.watch import PROGRESS_INTERVAL_S
from tests.procs import http, wait_until

pytestmark = pytest.mark.cluster

KS = "wq"
TOTAL = 24  # commits per watch, a third of them before the pause
# The watch's next connection opens within three of the node's progress intervals (the
# silence taken for a node cut off), plus the first reconnect's backoff (at most
# backoff_base_s) and a shared machine's scheduling.
RESUME_BOUND_S = 3 * PROGRESS_INTERVAL_S + 1.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    tmp: Path = tmp_path_factory.mktemp("watch_silence")
    overrides: dict[str, Any] = {
        f"keyspaces.{KS}": {"replication_factor": 3, "tier": "transactional", "ranges": 1},
        "txn.lease_s": 2.0}
    cluster = LocalCluster(tmp, nodes=3, rf=3, base_client_port=free_port_block(3),
                           base_internode_port=free_port_block(3), config_overrides=overrides)
    try:
        cluster.up(timeout_s=30)
        a = cluster.procs[0]
        wait_until(lambda: http("PUT", f"{a.url}/v1/kv/{KS}/warm", {"value": 0})[0] == 200,
                   timeout_s=30, interval_s=0.2, what=f"a first write to {KS}")
        yield cluster
    finally:
        for proc in cluster.procs:
            if proc.proc is not None and proc.proc.poll() is None:
                proc.signal(signal.SIGCONT)  # a paused node cannot stop
        cluster.down()


class Connections:
    """Where and when each connection of a watch opened (monotonic seconds)."""

    def __init__(self) -> None:
        self.opened: list[tuple[float, str]] = []


class NotingClient(Client):
    """A ``Client`` whose watch notes each connection it opens."""

    noted: Connections

    def _watch_once(self, core: WatchCore, url: str) -> Iterator[WatchEvent]:
        self.noted.opened.append((time.monotonic(), url))
        yield from super()._watch_once(core, url)


class NotingAsyncClient(AsyncClient):
    """An ``AsyncClient`` whose watch notes each connection it opens."""

    noted: Connections

    async def _watch_once(self, core: WatchCore, url: str) -> AsyncIterator[WatchEvent]:
        self.noted.opened.append((time.monotonic(), url))
        async for event in super()._watch_once(core, url):
            yield event


def watch_in_thread(cluster: LocalCluster, flavour: str, protocol: str, prefix: str,
                    origin: int, got: list[WatchEvent], errors: list[BaseException],
                    noted: Connections) -> threading.Thread:
    seeds = [p.url for p in cluster.procs]

    def blocking() -> None:
        kv = NotingClient(seeds, keyspace=KS, protocol=protocol)
        kv.noted = noted
        with kv:
            kv.ensure_ring()  # native addresses come with the ring
            for event in kv.watch(KS, prefix, prefix=True, from_version=origin,
                                  max_reconnects=30):
                got.append(event)
                if len(got) == TOTAL:
                    return

    async def asynchronous() -> None:
        kv = NotingAsyncClient(seeds, keyspace=KS, protocol=protocol)
        kv.noted = noted
        async with kv:
            async for event in kv.watch(KS, prefix, prefix=True, from_version=origin,
                                        max_reconnects=30):
                got.append(event)
                if len(got) == TOTAL:
                    return

    def run() -> None:
        try:
            if flavour == "blocking":
                blocking()
            else:
                asyncio.run(asynchronous())
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("protocol", ["http", "native"])
@pytest.mark.parametrize("flavour", ["blocking", "async"])
def test_a_watch_whose_node_falls_silent_resumes_from_another_within_the_bound(
        cluster: LocalCluster, flavour: str, protocol: str) -> None:
    procs = list(cluster.procs)
    by_url = {p.url: p for p in procs}
    prefix = f"{flavour}-{protocol}/"
    status, first = http("PUT", f"{procs[0].url}/v1/kv/{KS}/origin-{prefix}", {"value": 0})
    assert status == 200, first
    got: list[WatchEvent] = []
    errors: list[BaseException] = []
    noted = Connections()
    thread = watch_in_thread(cluster, flavour, protocol, prefix, first["version"], got, errors,
                             noted)
    commits: list[tuple[str, int, str]] = []
    silent = None
    paused_at = 0.0
    try:
        with Client([p.url for p in procs], keyspace=KS, protocol="http", timeout_s=2.0) as kv:
            for i in range(TOTAL):
                if i == TOTAL // 3:
                    # Everything so far came on one connection: pause its node.
                    wait_until(lambda: len(got) == i, timeout_s=10, interval_s=0.02,
                               what="the events before the pause")
                    assert len(noted.opened) == 1, noted.opened
                    silent = by_url[noted.opened[0][1]]
                    silent.signal(signal.SIGSTOP)
                    paused_at = time.monotonic()
                deadline = time.monotonic() + 20
                while True:  # the same id until it answers: committed at most once
                    try:
                        result = kv.put(f"{prefix}k{i:02}", i, txn_id=f"silence-{flavour}-{protocol}-{i}")
                        break
                    except RingKVError:
                        assert time.monotonic() < deadline, f"k{i} did not commit"
                        time.sleep(0.1)
                assert result.version is not None, result
                commits.append(("put", result.version, f"{prefix}k{i:02}"))
        thread.join(timeout=30)
    finally:
        if silent is not None:
            silent.signal(signal.SIGCONT)
    assert silent is not None
    wait_until(lambda: http("GET", f"{silent.url}/v1/status", timeout_s=1.0)[0] == 200,
               timeout_s=20, interval_s=0.1, what=f"{silent.node_id} serving again")
    assert not errors, errors
    assert not thread.is_alive(), f"{len(got)} of {TOTAL} events"
    moved = [(at - paused_at, url) for at, url in noted.opened if at > paused_at]
    assert moved, noted.opened
    after_s, url = moved[0]
    print(f"{flavour}/{protocol}: paused {silent.node_id}; the watch reconnected to {url} "
          f"{after_s:.2f} s later (bound {RESUME_BOUND_S:g} s)")
    assert url != silent.url and after_s <= RESUME_BOUND_S, moved
    assert [(e.type, e.version, e.key) for e in got] == sorted(commits, key=lambda c: c[1])
