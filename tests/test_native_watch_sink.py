"""The native protocol's watch sink (``server/watch_native.py``) over a stand-in
transactional tier and a stand-in connection: the frames a watch becomes, the
per-connection cap, ``watch_cancel``, and a connection whose transport stays over its
high-water mark cut off as too slow, its final event naming the last version written.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from ringkv.config import config_from_dict
from ringkv.errors import Overloaded, ProtocolError
from ringkv.server import watch_native, watch_session
from ringkv.server.watch_session import WatchSession
from tests.test_watch_http import commit, fake_node


class FakeConnection:
    """The part of ``server/native.py``'s connection a native watch uses."""

    def __init__(self) -> None:
        self.watches: dict[int, WatchSession] = {}
        self.writable = asyncio.Event()
        self.writable.set()
        self.frames: list[tuple[int, dict[str, Any] | None, bool]] = []
        self.closed = False

    @property
    def is_closed(self) -> bool:
        return self.closed

    def write_stream(self, request_id: int, event: bytes | None, *, more: bool) -> None:
        self.frames.append((request_id, None if event is None else json.loads(event), more))

    def close_unread(self) -> None:
        self.closed = True


async def until(predicate: Any, what: str) -> None:
    for _ in range(300):  # bounded: 3 s
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never: {what}")


def test_a_watch_streams_frames_and_a_cancel_ends_it_freeing_its_slot() -> None:
    node = fake_node()
    conn = FakeConnection()

    async def run() -> None:
        task = asyncio.ensure_future(watch_native.serve(node, conn, 5, "txn", b"k", {}))
        await until(lambda: conn.frames, "the first frame")
        assert node.txn.stats["watches_open"] == 1 and 5 in conn.watches
        commit(node, "k", 1)
        commit(node, "k", 2)
        await until(lambda: sum(f[1] is not None and f[1]["type"] == "put"
                                for f in conn.frames) == 2, "two events")
        conn.watches[5].cancel()
        await asyncio.wait_for(task, 3)

    asyncio.run(run())
    assert conn.frames[0][1] is not None and conn.frames[0][1]["type"] == "progress"
    assert all(rid == 5 for rid, _, _ in conn.frames)
    puts = [e["value"] for _, e, _ in conn.frames if e is not None and e["type"] == "put"]
    assert puts == [1, 2]
    assert conn.frames[-1] == (5, None, False)  # cancelled: the last frame, no error
    assert all(more for _, _, more in conn.frames[:-1])
    assert node.txn.stats["watches_open"] == 0 and not conn.watches


def test_a_connection_holds_at_most_its_cap_of_watches_and_unique_ids() -> None:
    node = fake_node()
    conn = FakeConnection()
    conn.watches = {i: None for i in range(1, watch_native.MAX_WATCHES_PER_CONNECTION + 1)}  # type: ignore[misc]
    with pytest.raises(Overloaded) as caught:
        asyncio.run(watch_native.serve(node, conn, 99, "txn", b"k", {}))
    assert caught.value.details["reason"] == "max_watches_per_connection"
    with pytest.raises(ProtocolError) as duplicate:
        asyncio.run(watch_native.serve(node, conn, 1, "txn", b"k", {}))
    assert duplicate.value.details["field"] == "request_id"
    assert node.txn.stats["watches_open"] == 0


def test_a_transport_over_its_high_water_mark_gets_the_watcher_cut_off(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The connection never drains: the writer waits, the buffer fills, and SLOW_S later
    the watch ends with watcher_too_slow naming the last event written."""
    monkeypatch.setattr(watch_session, "SLOW_S", 0.3)
    node = fake_node()
    node.config = config_from_dict({"txn": {"watch_poll_ms": 10, "watch_buffer_events": 10}})
    conn = FakeConnection()

    async def run() -> None:
        task = asyncio.ensure_future(watch_native.serve(node, conn, 1, "txn", b"p",
                                                        {"prefix": "true"}))
        await until(lambda: conn.frames, "the first frame")
        conn.writable.clear()  # the client stops reading
        for i in range(30):
            commit(node, f"p{i:02}", i)
        await asyncio.wait_for(task, 5)

    asyncio.run(run())
    final = conn.frames[-1]
    assert final[2] is False and final[1] is not None
    assert final[1]["error"]["code"] == "watcher_too_slow"
    written = [e for _, e, _ in conn.frames[:-1] if e is not None and e["type"] == "put"]
    assert written and final[1]["error"]["last_version"] == written[-1]["version"]
    assert len(written) < 30 and node.txn.stats["watchers_too_slow"] == 1
    assert conn.closed  # the client reads nothing: its connection is closed
    assert node.txn.stats["watches_open"] == 0
