"""Watches under load and faults, on three real node processes (soak: about a minute).

Writers commit single-key puts and deletes and transactions across ranges
(each under an id, sent again until answered, so every commit and its
version is known exactly) into a keyspace of four ranges. Meanwhile:

- a watcher on the client's ``WatchCore`` over plain HTTP has its
  connection cut after a random number of lines, again and again, and
  resumes each time on another node;
- a blocking ``Client.watch`` and an ``AsyncClient.watch`` follow the same prefix;
- halfway, the node leading the most ranges is killed with SIGKILL.

Each watcher must see exactly the committed writes under its prefix, in
(version, key) order, nothing lost and nothing twice.
"""

from __future__ import annotations

import asyncio
import http.client as httpclient
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from ringkv.client import AsyncClient, Client
from ringkv.client.watch import StreamEnded, WatchCore
from ringkv.tools.launcher import NodeProcess, free_port_block
from ringkv.tools.local_cluster import LocalCluster
from tests.procs import http, wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.soak]

RUN_S = 20.0


def leader_count(proc: NodeProcess) -> int:
    status, view = http("GET", f"{proc.url}/v1/status")
    groups = view.get("transactional", {}).get("groups", {}) if status == 200 else {}
    return sum(g["leads"] for g in groups.values())


def committed_write(urls: Callable[[], list[str]], rng: random.Random,
                    n: int) -> list[tuple[int, str, str]]:
    """One commit, sent again under its id (through any live node) until answered:
    [(version, key, type)]."""
    txn_id = f"soak-{n}"
    if rng.random() < 0.3:
        keys = sorted({f"s{rng.randrange(40)}" for _ in range(rng.randrange(2, 5))})
        body: dict[str, Any] = {"keyspace": "ws", "id": txn_id,
                                "writes": [{"op": "put", "key": k, "value": n} for k in keys]}
        method, path = "POST", "/v1/txn"
    else:
        key = f"s{rng.randrange(40)}"
        delete = rng.random() < 0.2
        keys = [key]
        body = {"id": txn_id} if delete else {"value": n, "id": txn_id}
        method, path = ("DELETE" if delete else "PUT"), f"/v1/kv/ws/{key}"
    deadline = time.monotonic() + 30
    while True:
        try:
            status, answer = http(method, rng.choice(urls()) + path, body)
        except OSError:
            status, answer = 0, {}
        if status == 200:
            version = answer.get("commit_ts") or answer["version"]
            kind = "delete" if method == "DELETE" else "put"
            return [(version, k, kind) for k in keys]
        assert time.monotonic() < deadline, (status, answer)
        time.sleep(0.1)


def cutting_watcher(urls: list[str], origin: int, stop: threading.Event,
                    got: list[tuple[int, str, str]], rng: random.Random) -> None:
    """A watch over plain HTTP whose connection is cut every few lines."""
    core = WatchCore("ws", "s", prefix=True, from_version=origin, rng=rng, max_reconnects=60)
    for attempt in range(10_000):  # bounded: each turn reads a few lines or fails
        if marked.is_set() and core.resume_us is not None and core.resume_us >= stop_at[0]:
            return
        parts = urlsplit(urls[attempt % len(urls)])
        conn = httpclient.HTTPConnection(parts.hostname or "", parts.port, timeout=10)
        try:
            conn.request("GET", core.path())
            response = conn.getresponse()
            if response.status != 200:
                core.refused(response.status, response.read())
                raise OSError(f"HTTP {response.status}")
            for _ in range(rng.randrange(1, 30)):
                raw = response.readline()
                if not raw:
                    break
                event = core.line(raw)
                if event is not None:
                    got.append((event.version, event.key, event.type))
        except (OSError, StreamEnded, httpclient.HTTPException) as exc:
            time.sleep(core.reconnect_pause_s(urls[attempt % len(urls)], repr(exc)))
        finally:
            conn.close()


stop_at = [0]  # the marker commit's version, once ``marked`` is set
marked = threading.Event()


def test_watchers_see_every_commit_once_through_cuts_and_a_leader_kill(tmp_path: Path) -> None:
    cluster = LocalCluster(tmp_path, nodes=3, rf=3, base_client_port=free_port_block(3),
                           base_internode_port=free_port_block(3), config_overrides={
                               "keyspaces.ws": {"replication_factor": 3,
                                                "tier": "transactional", "ranges": 4},
                               "txn.lease_s": 2.0})
    try:
        cluster.up(timeout_s=30)
        procs = list(cluster.procs)
        for i in range(16):
            wait_until(lambda: http("PUT", f"{procs[0].url}/v1/kv/ws/warm{i}",
                                    {"value": 0})[0] == 200,
                       timeout_s=30, interval_s=0.2, what="a first write")
        status, first = http("PUT", f"{procs[0].url}/v1/kv/ws/origin", {"value": 0})
        assert status == 200
        origin = first["version"]
        victim = max(procs, key=leader_count)
        survivors = [p for p in procs if p is not victim]
        urls = [p.url for p in procs]
        stop = threading.Event()

        def live_urls() -> list[str]:
            return [p.url for p in procs if p.proc is not None and p.proc.poll() is None]

        commits: list[tuple[int, str, str]] = []
        cut: list[tuple[int, str, str]] = []
        blocking: list[tuple[int, str, str]] = []
        asynchronous: list[tuple[int, str, str]] = []

        def blocking_watch() -> None:
            with Client(urls, protocol="http") as kv:
                for event in kv.watch("ws", "s", prefix=True, from_version=origin,
                                      max_reconnects=60):
                    blocking.append((event.version, event.key, event.type))
                    if marked.is_set() and event.version >= stop_at[0]:
                        return

        def async_watch() -> None:
            async def run() -> None:
                async with AsyncClient(urls, protocol="http") as kv:
                    async for event in kv.watch("ws", "s", prefix=True, from_version=origin,
                                                max_reconnects=60):
                        asynchronous.append((event.version, event.key, event.type))
                        if marked.is_set() and event.version >= stop_at[0]:
                            return
            asyncio.run(run())

        def writer(seed: int) -> None:
            rng = random.Random(seed)
            n = seed * 1_000_000
            while not stop.is_set():
                n += 1
                commits.extend(committed_write(live_urls, rng, n))

        threads = [threading.Thread(target=cutting_watcher,
                                    args=(urls, origin, stop, cut, random.Random(7))),
                   threading.Thread(target=blocking_watch), threading.Thread(target=async_watch),
                   *(threading.Thread(target=writer, args=(s,)) for s in (1, 2, 3))]
        for thread in threads:
            thread.daemon = True
            thread.start()
        time.sleep(RUN_S / 2)
        victim.kill()
        time.sleep(RUN_S / 2)
        for thread in threads[3:]:  # the writers finish their last commit
            stop.set()
            thread.join(timeout=40)
        # The watchers stop once they have passed a last marker commit.
        status, marker = http("PUT", f"{survivors[0].url}/v1/kv/ws/s-marker", {"value": 0})
        assert status == 200
        commits.append((marker["version"], "s-marker", "put"))
        stop_at[0] = marker["version"]
        marked.set()
        for thread in threads[:3]:
            thread.join(timeout=60)
        assert not any(t.is_alive() for t in threads), "a watcher or writer did not finish"
        expected = sorted(commits)
        print(f"{len(expected)} writes; cut watcher {len(cut)}, client {len(blocking)}, "
              f"async client {len(asynchronous)} events; {victim.node_id} killed")
        for name, got in (("cut", cut), ("blocking", blocking), ("async", asynchronous)):
            got_upto = [e for e in got if e[0] <= stop_at[0]]
            assert got_upto == expected, f"{name} watcher: " + diff(expected, got_upto)
    finally:
        cluster.down()


def diff(expected: list[Any], got: list[Any]) -> str:
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    repeats = len(got) - len(set(got))
    return f"{len(missing)} missing {missing[:3]}, {len(extra)} extra {extra[:3]}, {repeats} twice"
