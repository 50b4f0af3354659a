"""The client's rough edges (issue #16 §6), each on a real node over both protocols.

``nodes()`` and ``replicas()`` before the first request, ``bytes`` keys,
``datetime.timedelta`` TTLs, ``exists``, ``get_many`` (split into batches the
node's limit takes) and ``ttl_s``, and the client's own refusals
(``InvalidArgument``) kept apart from a node's errors (``RingKVError``).
"""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import Iterator
from typing import Any

import pytest

from ringkv.client import AsyncClient, Client
from ringkv.client.errors import InvalidArgument, InvalidArgumentType
from ringkv.client.operations import ttl_seconds
from ringkv.client.routing import key_text
from ringkv.config import config_from_dict
from ringkv.errors import BadRequest, NoNodeAvailable, NotFound, RingKVError
from ringkv.tools.launcher import free_port
from tests.test_client import DEADLINE_S, InProcessNode


@pytest.fixture(params=["native", "http"])
def node(request: pytest.FixtureRequest) -> Iterator[InProcessNode]:
    """One node whose batches take at most 3 operations (so get_many must split)."""
    served = InProcessNode(native=request.param == "native")
    served.config = config_from_dict({
        "cluster": {"client_port": served.port},
        "storage": {"engine": "memory"},
        "limits": {"max_value_bytes": 4096, "max_scan_page": 100, "max_batch_ops": 3},
        "keyspaces": {
            "default": {"replication_factor": 3, "default_consistency": "QUORUM"},
            "solo": {"replication_factor": 1, "default_consistency": "ONE"},
        },
    })
    with served:
        yield served


def run_async(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout=DEADLINE_S))


# -- pure: keys and TTLs as Python has them ----------------------------------------------


def test_keys_may_be_str_or_utf8_bytes_and_anything_else_is_refused_naming_key() -> None:
    assert key_text("ключ") == key_text("ключ".encode()) == "ключ"
    assert key_text(bytearray("ключ".encode())) == "ключ"
    with pytest.raises(InvalidArgument) as refused:
        key_text(b"\xff\xfe")
    assert refused.value.field == "key" and "not UTF-8" in refused.value.message
    assert not isinstance(refused.value, TypeError)
    with pytest.raises(InvalidArgumentType) as wrong:
        key_text(42, "keys[3]")
    assert wrong.value.field == "keys[3]" and isinstance(wrong.value, TypeError)
    for empty in ("", b""):
        with pytest.raises(InvalidArgument):
            key_text(empty)
    with pytest.raises(InvalidArgument):
        key_text("\ud800")  # a lone surrogate: no UTF-8 for it


def test_a_ttl_is_whole_seconds_from_an_int_or_a_timedelta() -> None:
    assert ttl_seconds(None) is None
    assert ttl_seconds(60) == 60
    assert ttl_seconds(datetime.timedelta(minutes=2)) == 120
    assert ttl_seconds(datetime.timedelta(days=1, seconds=5)) == 86_405
    for bad, kind in [(datetime.timedelta(seconds=1.5), InvalidArgument),
                      (datetime.timedelta(milliseconds=1), InvalidArgument),
                      (datetime.timedelta(seconds=-1), InvalidArgument),
                      (-5, InvalidArgument), (1.5, InvalidArgumentType),
                      (True, InvalidArgumentType), ("10", InvalidArgumentType)]:
        with pytest.raises(kind) as refused:
            ttl_seconds(bad, "ops[1].ttl")
        assert refused.value.field == "ops[1].ttl", bad


# -- on a real node ------------------------------------------------------------------------


def test_nodes_and_replicas_are_right_before_the_first_request(node: InProcessNode) -> None:
    assert node.node is not None
    node_id = node.node.node_id
    with Client(node.url) as kv:
        assert [view.node_id for view in kv.nodes()] == [node_id]  # no call made before
    with Client(node.url) as kv:
        assert kv.replicas("some-key") == [node_id]
        assert kv.replicas(b"some-key", keyspace="solo") == [node_id]

    async def main() -> None:
        async with AsyncClient(node.url) as akv:  # the ring is fetched on entry
            assert [view.node_id for view in await akv.nodes()] == [node_id]
            assert await akv.replicas("some-key") == [node_id]
        # Outside ``async with``, with no call made before: fetched on demand, as Client does.
        outside = AsyncClient(node.url)
        try:
            assert outside._ops.router.topology.ring is None
            assert [view.node_id for view in await outside.nodes()] == [node_id]
        finally:
            await outside.close()
        outside = AsyncClient(node.url)
        try:
            assert await outside.replicas(b"some-key", keyspace="solo") == [node_id]
        finally:
            await outside.close()

    run_async(main())


def test_nodes_with_no_node_answering_says_so() -> None:
    with Client(f"http://127.0.0.1:{free_port()}", timeout_s=1.0) as kv, \
            pytest.raises(NoNodeAvailable):
        kv.nodes()

    async def main() -> None:
        kv = AsyncClient(f"http://127.0.0.1:{free_port()}", timeout_s=1.0)
        try:
            with pytest.raises(NoNodeAvailable):
                await kv.nodes()
            with pytest.raises(NoNodeAvailable):
                await kv.replicas("k")
        finally:
            await kv.close()

    run_async(main())


def test_bytes_keys_timedelta_ttls_exists_and_ttl_s(node: InProcessNode) -> None:
    with Client(node.url) as kv:
        kv.put(b"bytes-key", 1, ttl=datetime.timedelta(minutes=1))
        assert kv.get("bytes-key") == 1 and kv.get(b"bytes-key") == 1
        record = kv.get_with_meta(b"bytes-key")
        assert record is not None and record.key == "bytes-key"
        assert record.expires_at_us == record.timestamp.wall_us + 60_000_000
        assert 59.0 < kv.ttl_s(b"bytes-key") <= 60.0  # type: ignore[operator]
        assert kv.exists("bytes-key") and not kv.exists("nope")
        kv.put("forever", None)  # a JSON null is a value: it exists, without a TTL
        assert kv.exists("forever") and kv.ttl_s("forever") is None
        with pytest.raises(NotFound) as absent:
            kv.ttl_s("nope")
        assert absent.value.http_status == 404
        kv.delete(b"bytes-key")
        assert not kv.exists(b"bytes-key")
        # Not UTF-8, sub-second, negative: refused here, nothing sent.
        for call, field in [(lambda: kv.put(b"\xff", 1), "key"),
                            (lambda: kv.put("k", 1, ttl=datetime.timedelta(seconds=0.5)), "ttl"),
                            (lambda: kv.put("k", 1, ttl=-1), "ttl"),
                            (lambda: kv.get_many(["a", 7]), "keys[1]"),
                            (lambda: kv.batch([{"op": "put", "key": "a", "value": 1,
                                                "ttl": 1.5}]), "ops[0].ttl")]:
            with pytest.raises(InvalidArgument) as refused:
                call()
            assert refused.value.field == field
        assert not kv.exists("k") and not kv.exists("a")


def test_get_many_splits_into_batches_the_node_takes(node: InProcessNode) -> None:
    keys = [f"many-{i}" for i in range(10)]
    with Client(node.url) as kv:
        for i, key in enumerate(keys):
            if i % 3:
                kv.put(key, {"i": i})
        want = {key: {"i": i} for i, key in enumerate(keys) if i % 3}
        # The node takes 3 per batch: the default of 100 is answered 413 naming its
        # limit, and the client goes on in batches of 3.
        assert kv.get_many(keys) == want
        assert kv.get_many(keys, batch_size=2) == want
        assert kv.get_many([k.encode() for k in keys] + keys[:2]) == want  # bytes, repeats
        assert kv.get_many([]) == {}
        with pytest.raises(InvalidArgumentType):
            kv.get_many("many-1")  # one key, not keys
        with pytest.raises(NotFound):
            kv.get_many(keys, keyspace="nosuch")

    async def main() -> None:
        async with AsyncClient(node.url) as akv:
            assert await akv.get_many(keys) == want
            assert await akv.exists(keys[1]) and not await akv.exists(keys[0])
            await akv.put(b"async-ttl", 1, ttl=datetime.timedelta(seconds=30))
            assert 29.0 < (await akv.ttl_s("async-ttl") or 0) <= 30.0

    run_async(main())


def test_own_refusals_and_server_errors_are_apart(node: InProcessNode) -> None:
    with Client(node.url, max_retries=0) as kv:
        with pytest.raises(ValueError) as own:
            kv.get("k", consistency="MOST")
        assert isinstance(own.value, InvalidArgument) and not isinstance(own.value, RingKVError)
        with pytest.raises(TypeError):
            kv.put("k", {1, 2})  # a set is not JSON
        with pytest.raises(RingKVError) as answered:
            kv.put("k", 1, ttl=10**10)  # well formed here; the node's limit is 20 years
        assert isinstance(answered.value, BadRequest) and not isinstance(answered.value,
                                                                          ValueError)
        assert (answered.value.code, answered.value.http_status,
                answered.value.field) == ("bad_request", 400, "ttl")

