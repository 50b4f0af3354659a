"""The watch stream's shell (``server/watch_http.py``) over a stand-in transactional tier:
how a stream ends, and that it always ends.

A real aiohttp server runs only the watch routes; the tier is a fake whose
``changes`` answers come from a list of commits and can be made to fail.
Checked: commits stream in order; a poll that keeps failing ends the stream
after ``STALL_S`` with the failure's code and ``last_version``; a compacted
poll ends it with ``compacted``; a node shutting down ends it with
``shutting_down``; a failure the loop does not expect ends it with
``internal`` instead of leaving the handler waiting; a client that leaves
frees its watch slot.
"""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from ringkv.clock import SystemClock
from ringkv.config import config_from_dict
from ringkv.errors import Compacted, NoLeader, NotFound
from ringkv.server import watch_http, watch_session


class FakeTxn:
    """The part of ``TxnService`` a watch uses: one range, commits from a list."""

    def __init__(self) -> None:
        self.keyspaces = {"txn": 3}
        self.stats = {"watches_open": 0, "watchers_too_slow": 0}
        self.commits: list[tuple[bytes, bytes | None, int]] = []
        self.now_us = 1_000
        self.fail: BaseException | None = None

    def snapshot_now_us(self) -> int:
        self.now_us += 10
        return self.now_us

    def range_map(self, keyspace: str) -> Any:
        return SimpleNamespace(ranges=[SimpleNamespace(end=0)])

    async def execute(self, op: Any, *, started_s: float, timeout_s: float) -> dict[str, Any]:
        if self.fail is not None:
            raise self.fail
        items = [[k, v, ts] for k, v, ts in self.commits
                 if op.since_us < ts <= op.snapshot_ts_us and k.startswith(op.key)]
        return {"items": items, "complete": op.snapshot_ts_us}


def fake_node() -> Any:
    def keyspace(name: str) -> None:
        if name != "txn":
            raise NotFound(f"keyspace {name!r} does not exist", keyspace=name)

    config = config_from_dict({"txn": {"watch_poll_ms": 10}})
    return SimpleNamespace(config=config, clock=SystemClock(), txn=FakeTxn(), draining=False,
                           coordinator=SimpleNamespace(keyspace=keyspace))


async def stream(node: Any, path: str, then: Any, *, lines: int = 50) -> list[dict[str, Any]]:
    """The events of one watch: ``then(node)`` runs once the stream has started."""
    app = web.Application()
    watch_http.add_routes(app, node)
    async with TestServer(app) as server, aiohttp.ClientSession() as session:
        async with session.get(server.make_url(path)) as response:
            assert response.status == 200
            events = [json.loads(await response.content.readline())]
            then(node)
            for _ in range(lines):  # bounded; each line waits for the next poll
                raw = await asyncio.wait_for(response.content.readline(), timeout=3)
                if not raw:
                    break
                events.append(json.loads(raw))
                if events[-1]["type"] == "error":
                    break
    return events


def commit(node: Any, key: str, value: Any) -> None:
    node.txn.now_us += 5
    node.txn.commits.append((key.encode(), json.dumps(value).encode(), node.txn.now_us))


def test_commits_stream_and_a_poll_that_keeps_failing_ends_it(monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    monkeypatch.setattr(watch_session, "STALL_S", 0.2)
    node = fake_node()

    def then(node: Any) -> None:
        commit(node, "p1", 1)
        commit(node, "p2", 2)
        loop = asyncio.get_running_loop()
        loop.call_later(0.2, setattr, node.txn, "fail",
                        NoLeader("no leader", range="txn/0"))

    events = asyncio.run(stream(node, "/v1/watch/txn/p?prefix=true", then))
    puts = [(e["key"], e["value"]) for e in events if e["type"] == "put"]
    assert puts == [("p1", 1), ("p2", 2)]
    final = events[-1]
    assert final["type"] == "error" and final["error"]["code"] == "no_leader"
    assert final["error"]["last_version"] >= node.txn.commits[-1][2]


@pytest.mark.parametrize(("failure", "code"), [
    (Compacted("gone", from_version=1, oldest_version=99), "compacted"),
    (ValueError("a bug"), "internal"),
])
def test_a_failure_mid_stream_ends_it_naming_why(failure: BaseException, code: str) -> None:
    node = fake_node()

    def then(node: Any) -> None:
        node.txn.fail = failure

    events = asyncio.run(stream(node, "/v1/watch/txn/k", then))
    assert events[-1]["type"] == "error" and events[-1]["error"]["code"] == code
    if code == "compacted":
        assert events[-1]["error"]["oldest_version"] == 99


def test_a_node_shutting_down_ends_its_streams() -> None:
    node = fake_node()

    def then(node: Any) -> None:
        node.draining = True

    events = asyncio.run(stream(node, "/v1/watch/txn/k", then))
    assert events[-1]["error"]["code"] == "shutting_down"


def test_a_client_that_leaves_frees_its_watch_slot() -> None:
    node = fake_node()

    async def run() -> None:
        app = web.Application()
        watch_http.add_routes(app, node)
        async with TestServer(app) as server:
            async with aiohttp.ClientSession() as session:
                async with session.get(server.make_url("/v1/watch/txn/k")) as response:
                    await response.content.readline()
                    assert node.txn.stats["watches_open"] == 1
            for _ in range(100):  # bounded: the node notices at its next write (a second)
                if node.txn.stats["watches_open"] == 0:
                    return
                await asyncio.sleep(0.05)
            raise AssertionError("the watch slot was never freed")

    asyncio.run(run())
