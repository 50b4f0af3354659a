"""Tests for ringkv.net: the frame codec (pure) and the asyncio transport on real
loopback sockets (127.0.0.1, ephemeral ports only). Every async test runs under
``asyncio.run`` with its own deadline; no pytest-asyncio needed."""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import struct
import time
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ringkv.errors import (
    BY_CODE,
    BadRequest,
    Overloaded,
    PeerTimeout,
    PeerUnreachable,
    ProtocolError,
    RemoteError,
    ShuttingDown,
    TooLarge,
)
from ringkv.net.codec import (
    KIND_ERROR,
    KIND_ONEWAY,
    KIND_REQUEST,
    KIND_RESPONSE,
    PROTOCOL_VERSION,
    Frame,
    FrameDecoder,
    encode_frame,
)
from ringkv.net.transport import Transport

pytestmark = pytest.mark.timeout(30)

LOCALHOST = "127.0.0.1"
CLUSTER = "test-cluster"


def run(coro: Any, timeout_s: float = 10.0) -> Any:
    """Run one async test body with a hard deadline."""

    async def bounded() -> Any:
        async with asyncio.timeout(timeout_s):
            return await coro

    return asyncio.run(bounded())


async def echo_handler(from_node: str, verb: str, payload: Any) -> Any:
    if verb == "echo":
        return {"from": from_node, "payload": payload}
    if verb == "sleep_echo":
        await asyncio.sleep(payload["sleep"])
        return payload["value"]
    if verb == "bad_request":
        raise BadRequest("key too odd", field="key")
    if verb == "boom":
        raise ZeroDivisionError("oops")
    if verb == "double":
        return payload * 2
    if verb == "unencodable":
        return object()
    raise BadRequest(f"unknown verb {verb}", field="verb")


def make(node_id: str, handler: Any = echo_handler, port: int = 0, cluster: str = CLUSTER, **kw: Any) -> Transport:
    kw.setdefault("handshake_timeout_s", 1.0)
    kw.setdefault("connect_timeout_s", 1.0)
    kw.setdefault("max_backoff_s", 0.2)
    return Transport(node_id, cluster, LOCALHOST, port, handler, **kw)


def link(a: Transport, b: Transport) -> None:
    host, port = b.address
    a.set_peer_address(b.node_id, host, port)


def free_port() -> int:
    """A port on which nothing listens (bound then released)."""
    with socket.socket() as s:
        s.bind((LOCALHOST, 0))
        return s.getsockname()[1]


async def raw_hello(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, node_id: str = "raw") -> None:
    writer.write(
        encode_frame(KIND_ONEWAY, 0, "hello", {"cluster": CLUSTER, "node_id": node_id, "protocol": PROTOCOL_VERSION})
    )
    await writer.drain()
    dec = FrameDecoder()
    frames: list[Frame] = []
    while not frames:
        data = await reader.read(4096)
        assert data, "server closed during handshake"
        frames = dec.feed(data)
    assert frames[0].verb == "hello"


# --------------------------------------------------------------------------- codec


def test_codec_round_trip_all_kinds() -> None:
    payloads = [None, 1, -5, "x", b"\x00\xff", [1, [2, 3]], {"a": {"b": b"c"}, 7: None}, 2**64 - 1, 1.5, True]
    dec = FrameDecoder()
    data = b"".join(
        encode_frame(kind, i, f"verb{i}", p) for i, (kind, p) in enumerate(zip([0, 1, 2, 3] * 3, payloads))
    )
    frames = dec.feed(data)
    assert [f.payload for f in frames] == payloads
    assert [f.kind for f in frames] == [0, 1, 2, 3] * 2 + [0, 1]
    assert all(f.version == PROTOCOL_VERSION for f in frames)
    assert frames[5] == Frame(PROTOCOL_VERSION, KIND_RESPONSE, 5, "verb5", [1, [2, 3]])
    assert dec.buffered == 0


def test_codec_frame_layout() -> None:
    data = encode_frame(KIND_REQUEST, 42, "get", {"k": "v"})
    (n,) = struct.unpack(">I", data[:4])
    assert n == len(data) - 4
    assert msgpack.unpackb(data[4:], raw=False) == [PROTOCOL_VERSION, 0, 42, "get", {"k": "v"}]


def test_decoder_one_byte_at_a_time() -> None:
    frames_in = [
        (KIND_REQUEST, 1, "put", {"key": "k", "value": b"x" * 300}),
        (KIND_RESPONSE, 1, "put", None),
        (KIND_ONEWAY, 0, "gossip", [1, 2, 3]),
    ]
    data = b"".join(encode_frame(*f) for f in frames_in)
    dec = FrameDecoder()
    out: list[Frame] = []
    for i in range(len(data)):
        got = dec.feed(data[i : i + 1])
        out.extend(got)
    assert [(f.kind, f.request_id, f.verb, f.payload) for f in out] == frames_in
    assert dec.buffered == 0


def test_decoder_rejects_oversized_length_before_body() -> None:
    dec = FrameDecoder(max_frame_bytes=1024)
    with pytest.raises(ProtocolError, match="exceeds limit"):
        dec.feed(struct.pack(">I", 1025))  # header alone is enough to refuse
    with pytest.raises(ProtocolError):  # and it stays failed
        dec.feed(encode_frame(KIND_ONEWAY, 0, "x", None))
    assert dec.buffered == 0


@pytest.mark.parametrize(
    "body",
    [
        b"\xc1",  # never-used msgpack byte
        msgpack.packb([1, 0, 1, "v", None]) + b"\x00",  # trailing data
        msgpack.packb({"not": "a list"}),
        msgpack.packb([1, 0, 1, "v"]),  # 4 elements
        msgpack.packb(["1", 0, 1, "v", None]),  # version not int
        msgpack.packb([1, 9, 1, "v", None]),  # unknown kind
        msgpack.packb([1, True, 1, "v", None]),  # bool is not an int
        msgpack.packb([1, 0, -1, "v", None]),  # negative id
        msgpack.packb([1, 0, 1, 5, None]),  # verb not str
        msgpack.packb([1, 0, 1, "", None]),  # empty verb
        msgpack.packb([1, 0, 1, b"v", None], use_bin_type=True),  # verb bytes
        msgpack.packb([1, 0, 1, "v", {(1, 2): 3}]),  # unhashable map key
        b"\xa3\xff\xfe\xfd",  # invalid utf-8 str
        b"\xdd\xff\xff\xff\xff",  # array claiming 4G elements
    ],
)
def test_decoder_rejects_bad_bodies(body: bytes) -> None:
    with pytest.raises(ProtocolError):
        FrameDecoder().feed(struct.pack(">I", len(body)) + body)


def test_decoder_rejects_empty_body() -> None:
    with pytest.raises(ProtocolError):
        FrameDecoder().feed(b"\x00\x00\x00\x00")


def test_encode_rejects_bad_inputs() -> None:
    with pytest.raises(ProtocolError):
        encode_frame(KIND_REQUEST, 1, "v", object())
    with pytest.raises(TooLarge):
        encode_frame(KIND_REQUEST, 1, "v", b"x" * 2000, max_frame_bytes=1000)
    with pytest.raises(ValueError):
        encode_frame(7, 1, "v", None)
    with pytest.raises(ValueError):
        encode_frame(KIND_REQUEST, -1, "v", None)
    with pytest.raises(ValueError):
        encode_frame(KIND_REQUEST, 1, "", None)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512), st.integers(min_value=1, max_value=64))
def test_decoder_random_bytes_only_raise_protocol_error(data: bytes, chunk: int) -> None:
    dec = FrameDecoder(max_frame_bytes=4096)
    try:
        for i in range(0, len(data), chunk):
            for f in dec.feed(data[i : i + chunk]):
                assert isinstance(f, Frame)
    except ProtocolError:
        pass
    assert dec.buffered <= 4096 + 4


payload_values = st.recursive(
    st.none() | st.integers(min_value=-(2**63), max_value=2**64 - 1) | st.text(max_size=20) | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([0, 1, 2, 3]), st.integers(0, 2**64 - 1), payload_values), max_size=5), st.integers(1, 50))
def test_codec_round_trip_property(frames: list[tuple[int, int, Any]], chunk: int) -> None:
    data = b"".join(encode_frame(k, rid, "v", p) for k, rid, p in frames)
    dec = FrameDecoder()
    out: list[Frame] = []
    for i in range(0, len(data), chunk):
        out.extend(dec.feed(data[i : i + chunk]))
    assert [(f.kind, f.request_id, f.payload) for f in out] == frames


# --------------------------------------------------------------------------- transport


def test_request_response_round_trip() -> None:
    async def body() -> None:
        a, b = make("a"), make("b")
        await a.start()
        await b.start()
        try:
            assert b.address[0] == LOCALHOST and b.address[1] > 0
            link(a, b)
            got = await a.request("b", "echo", {"k": b"\x01", "n": [1, 2]}, timeout_s=2)
            assert got == {"from": "a", "payload": {"k": b"\x01", "n": [1, 2]}}
            # Reuses the one persistent connection.
            for i in range(5):
                assert (await a.request("b", "echo", i, timeout_s=2))["payload"] == i
            assert a.stats["connects"] == 1
            assert a.stats["outbound_connections"] == 1
            assert b.stats["inbound_connections"] == 1
            assert a.stats["frames_out"] == 6 and b.stats["frames_in"] == 6
            assert a.stats["bytes_out"] > 0 and b.stats["bytes_in"] > 0
        finally:
            await a.stop()
            await b.stop()

    run(body())


def test_both_directions_and_oneway() -> None:
    async def body() -> None:
        got: list[tuple[str, str, Any]] = []
        seen = asyncio.Event()

        async def handler(frm: str, verb: str, payload: Any) -> Any:
            if verb == "note":
                got.append((frm, verb, payload))
                seen.set()
                return None
            return await echo_handler(frm, verb, payload)

        a, b = make("a", handler), make("b", handler)
        await a.start()
        await b.start()
        try:
            link(a, b)
            link(b, a)
            assert (await a.request("b", "echo", 1, timeout_s=2))["from"] == "a"
            assert (await b.request("a", "echo", 2, timeout_s=2))["from"] == "b"
            assert a.send_oneway("b", "note", {"x": 1}) is True
            await asyncio.wait_for(seen.wait(), 2)
            assert got == [("a", "note", {"x": 1})]
        finally:
            await a.stop()
            await b.stop()

    run(body())


def test_many_concurrent_requests_are_matched() -> None:
    async def body() -> None:
        rnd = random.Random(7)
        a, b = make("a"), make("b")
        await a.start()
        await b.start()
        try:
            link(a, b)
            n = 1000
            reqs = [
                a.request("b", "sleep_echo", {"sleep": rnd.random() * 0.05, "value": i}, timeout_s=5)
                for i in range(n)
            ]
            results = await asyncio.gather(*reqs)
            assert results == list(range(n))  # each answer went to its own caller
            assert a.stats["connects"] == 1
            # Coalescing: far fewer socket writes than frames is not observable directly,
            # but every frame went over the one connection.
            assert a.stats["frames_out"] == n and a.stats["responses_received"] == n
        finally:
            await a.stop()
            await b.stop()

    run(body())


def test_handler_errors_come_back_typed() -> None:
    async def body() -> None:
        a, b = make("a"), make("b")
        await a.start()
        await b.start()
        try:
            link(a, b)
            with pytest.raises(RemoteError) as ei:
                await a.request("b", "bad_request", None, timeout_s=2)
            e = ei.value
            assert e.remote_code == "bad_request" and e.remote_message == "key too odd"
            assert e.remote_details == {"field": "key"}
            assert e.node_id == "b" and e.verb == "bad_request"
            assert BY_CODE[e.code] is RemoteError

            with pytest.raises(RemoteError) as ei:
                await a.request("b", "boom", None, timeout_s=2)
            assert ei.value.remote_code == "internal" and "ZeroDivisionError" in ei.value.remote_message

            with pytest.raises(RemoteError) as ei:
                await a.request("b", "unencodable", None, timeout_s=2)
            assert ei.value.remote_code == "protocol_error"

            # None of that hurt the connection or the node.
            assert (await a.request("b", "echo", "ok", timeout_s=2))["payload"] == "ok"
            assert a.stats["connects"] == 1
            assert b.stats["handler_errors"] == 2
        finally:
            await a.stop()
            await b.stop()

    run(body())


def test_request_timeout_with_slow_handler() -> None:
    async def body() -> None:
        a, b = make("a"), make("b")
        await a.start()
        await b.start()
        try:
            link(a, b)
            t0 = time.monotonic()
            with pytest.raises(PeerTimeout) as ei:
                await a.request("b", "sleep_echo", {"sleep": 0.4, "value": 1}, timeout_s=0.1)
            assert time.monotonic() - t0 < 0.35
            assert ei.value.node_id == "b" and ei.value.verb == "sleep_echo"
            # Other requests on the same connection are unaffected.
            assert (await a.request("b", "echo", 2, timeout_s=2))["payload"] == 2
            await asyncio.sleep(0.5)  # the slow answer arrives late and is dropped
            assert a.stats["late_responses"] == 1
            assert a.stats["timeouts"] == 1
            assert a.stats["pending_requests"] == 0
        finally:
            await a.stop()
            await b.stop()

    run(body())


def test_unknown_peer_and_nothing_listening() -> None:
    async def body() -> None:
        a = make("a", max_backoff_s=1.0)
        await a.start()
        try:
            with pytest.raises(PeerUnreachable, match="no address"):
                await a.request("ghost", "echo", 1, timeout_s=1)
            a.set_peer_address("b", LOCALHOST, free_port())
            t0 = time.monotonic()
            with pytest.raises(PeerUnreachable):
                await a.request("b", "echo", 1, timeout_s=5)
            # In backoff now: fails fast without touching the network.
            with pytest.raises(PeerUnreachable, match="backoff"):
                await a.request("b", "echo", 1, timeout_s=5)
            assert time.monotonic() - t0 < 0.5
            assert a.send_oneway("b", "note", 1) is False
            assert a.stats["dropped_oneway"] == 1
            assert a.stats["connect_failures"] == 1
        finally:
            await a.stop()

    run(body())


def test_peer_stopped_then_restarted_reconnects() -> None:
    async def body() -> None:
        a, b = make("a", max_backoff_s=0.2), make("b")
        await a.start()
        await b.start()
        port = b.address[1]
        try:
            link(a, b)
            assert (await a.request("b", "echo", 1, timeout_s=2))["payload"] == 1
            await b.stop()
            await asyncio.sleep(0.05)  # let a notice the closed connection

            t0 = time.monotonic()
            with pytest.raises(PeerUnreachable):
                await a.request("b", "echo", 2, timeout_s=5)
            with pytest.raises(PeerUnreachable):
                await a.request("b", "echo", 3, timeout_s=5)
            assert time.monotonic() - t0 < 0.5  # fast, nowhere near the 5 s timeout

            b = make("b", port=port)  # same node id, same port
            await b.start()
            await asyncio.sleep(0.25)  # past the (capped) backoff
            assert (await a.request("b", "echo", 4, timeout_s=2))["payload"] == 4
            assert a.stats["reconnects"] == 1
            assert a.stats["connections_lost"] == 1
        finally:
            await a.stop()
            await b.stop()

    run(body())


def test_pending_requests_fail_when_connection_drops() -> None:
    async def body() -> None:
        a, b = make("a"), make("b")
        await a.start()
        await b.start()
        try:
            link(a, b)
            task = asyncio.create_task(a.request("b", "sleep_echo", {"sleep": 5, "value": 1}, timeout_s=5))
            await asyncio.sleep(0.1)
            await b.stop()
            t0 = time.monotonic()
            with pytest.raises(PeerUnreachable) as ei:
                await task
            assert ei.value.maybe_delivered is True
            assert time.monotonic() - t0 < 0.5
        finally:
            await a.stop()
            await b.stop()

    run(body())


def test_stop_fails_pending_with_shutting_down() -> None:
    async def body() -> None:
        a, b = make("a"), make("b")
        await a.start()
        await b.start()
        try:
            link(a, b)
            task = asyncio.create_task(a.request("b", "sleep_echo", {"sleep": 5, "value": 1}, timeout_s=5))
            await asyncio.sleep(0.1)
            await a.stop()
            with pytest.raises(ShuttingDown):
                await task
            with pytest.raises(ShuttingDown):
                await a.request("b", "echo", 1, timeout_s=1)
        finally:
            await a.stop()
            await b.stop()

    run(body())


def test_foreign_cluster_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        x, b = make("x", cluster="other-cluster"), make("b")
        await x.start()
        await b.start()
        try:
            link(x, b)
            with pytest.raises(PeerUnreachable, match="handshake refused"):
                await x.request("b", "echo", 1, timeout_s=2)
            await asyncio.sleep(0.05)
            assert b.stats["refused_handshakes"] == 1
            assert x.stats["refused_handshakes"] == 1
            assert b.stats["inbound_connections"] == 0
        finally:
            await x.stop()
            await b.stop()

    with caplog.at_level(logging.WARNING, logger="ringkv.net"):
        run(body())
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert refusals
    assert all("other-cluster" in m and CLUSTER in m and "'x'" in m for m in refusals)


def test_wrong_node_at_address_is_refused() -> None:
    async def body() -> None:
        a, b = make("a"), make("b")
        await a.start()
        await b.start()
        try:
            a.set_peer_address("c", *b.address)  # b answers where a expects c
            with pytest.raises(PeerUnreachable, match="expected node 'c'"):
                await a.request("c", "echo", 1, timeout_s=2)
        finally:
            await a.stop()
            await b.stop()

    run(body())


def test_silent_connection_closed_after_handshake_timeout() -> None:
    async def body() -> None:
        b = make("b", handshake_timeout_s=0.2)
        await b.start()
        try:
            reader, writer = await asyncio.open_connection(*b.address)
            t0 = time.monotonic()
            assert await asyncio.wait_for(reader.read(), 2) == b""  # server hung up
            assert 0.15 < time.monotonic() - t0 < 1.0
            writer.close()
            assert b.stats["handshake_timeouts"] == 1
        finally:
            await b.stop()

    run(body())


def test_garbage_and_oversized_frames_do_not_hurt_the_node() -> None:
    async def body() -> None:
        rnd = random.Random(1234)
        a = make("a")
        b = make("b", handshake_timeout_s=0.3, max_frame_bytes=64 * 1024)
        await a.start()
        await b.start()
        try:
            link(a, b)
            assert (await a.request("b", "echo", 0, timeout_s=2))["payload"] == 0
            host, port = b.address
            raws = []
            # Random bytes before any handshake.
            for _ in range(30):
                r, w = await asyncio.open_connection(host, port)
                w.write(rnd.randbytes(rnd.randint(1, 2000)))
                raws.append((r, w))
            # An oversized length prefix.
            r, w = await asyncio.open_connection(host, port)
            w.write(struct.pack(">I", 2**31) + b"\x00" * 16)
            raws.append((r, w))
            # A proper hello, then garbage and an oversized frame on established connections.
            for junk in (rnd.randbytes(500), struct.pack(">I", 10**9)):
                r, w = await asyncio.open_connection(host, port)
                await raw_hello(r, w)
                w.write(junk)
                raws.append((r, w))
            for r, w in raws:
                await w.drain()

            # The legit peer keeps being served while the bad connections are open.
            assert (await a.request("b", "echo", 1, timeout_s=2))["payload"] == 1
            # Every bad connection is closed by b (garbage at once, partial frames at the
            # handshake timeout), without closing a's connection.
            for r, w in raws:
                try:
                    assert await asyncio.wait_for(r.read(), 2) == b""
                except ConnectionError:  # a reset is an equally valid hang-up
                    pass
                w.close()
            assert (await a.request("b", "echo", 2, timeout_s=2))["payload"] == 2
            assert a.stats["connects"] == 1
            s = b.stats
            assert s["protocol_errors"] >= 3  # at least the oversized ones and post-hello garbage
            assert s["inbound_connections"] == 1  # only a's
        finally:
            await a.stop()
            await b.stop()

    run(body())


def test_protocol_error_closes_only_that_connection() -> None:
    async def body() -> None:
        a, b = make("a"), make("b")
        await a.start()
        await b.start()
        try:
            link(a, b)
            assert (await a.request("b", "echo", 1, timeout_s=2))["payload"] == 1
            r, w = await asyncio.open_connection(*b.address)
            await raw_hello(r, w, node_id="mallory")
            # A valid raw request first: it is served.
            w.write(encode_frame(KIND_REQUEST, 9, "echo", "hi"))
            dec = FrameDecoder()
            frames: list[Frame] = []
            while not frames:
                frames = dec.feed(await asyncio.wait_for(r.read(4096), 2))
            assert frames[0].kind == KIND_RESPONSE and frames[0].request_id == 9
            assert frames[0].payload == {"from": "mallory", "payload": "hi"}
            # Then a response frame, which clients must never send: connection closed.
            w.write(encode_frame(KIND_RESPONSE, 1, "echo", None))
            assert await asyncio.wait_for(r.read(), 2) == b""
            w.close()
            assert (await a.request("b", "echo", 2, timeout_s=2))["payload"] == 2
            assert b.stats["protocol_errors"] == 1
        finally:
            await a.stop()
            await b.stop()

    run(body())


def test_full_send_queue_raises_overloaded() -> None:
    async def body() -> None:
        a, b = make("a", max_queue=4), make("b")
        await a.start()
        await b.start()
        try:
            link(a, b)
            # All ten enqueue before the connection exists, so only four fit.
            results = await asyncio.gather(
                *(a.request("b", "echo", i, timeout_s=2) for i in range(10)), return_exceptions=True
            )
            ok = [r for r in results if not isinstance(r, BaseException)]
            over = [r for r in results if isinstance(r, Overloaded)]
            assert len(ok) == 4 and len(over) == 6
            assert a.stats["overloaded_local"] == 6
            # One-way sends drop (counted) instead of raising or blocking.
            sent = [a.send_oneway("b", "note", i) for i in range(10)]
            assert sent.count(True) == 4 and a.stats["dropped_oneway"] == 6
            # Once drained (the writer runs on the next loop turns), requests flow again.
            await asyncio.sleep(0.05)
            assert (await a.request("b", "echo", "again", timeout_s=2))["payload"] == "again"
        finally:
            await a.stop()
            await b.stop()

    run(body())


def test_inflight_limit_answers_overloaded() -> None:
    async def body() -> None:
        release = asyncio.Event()

        async def handler(frm: str, verb: str, payload: Any) -> Any:
            await release.wait()
            return payload

        a, b = make("a"), make("b", handler, max_inflight_per_conn=2)
        await a.start()
        await b.start()
        try:
            link(a, b)
            tasks = [asyncio.create_task(a.request("b", "wait", i, timeout_s=3)) for i in range(5)]
            await asyncio.sleep(0.2)
            done = [t for t in tasks if t.done()]
            assert len(done) == 3 and all(isinstance(t.exception(), Overloaded) for t in done)
            release.set()
            assert sorted([await t for t in tasks if t not in done]) == [0, 1]
            assert b.stats["overloaded_responses"] == 3
        finally:
            await a.stop()
            await b.stop()

    run(body())


def test_too_large_payload_is_refused_locally() -> None:
    async def body() -> None:
        a, b = make("a", max_frame_bytes=1024), make("b", max_frame_bytes=1024)
        await a.start()
        await b.start()
        try:
            link(a, b)
            with pytest.raises(TooLarge):
                await a.request("b", "echo", b"x" * 4096, timeout_s=2)
            # A handler answer that is too large becomes an error, not a dead connection.
            with pytest.raises(RemoteError) as ei:
                await a.request("b", "double", b"y" * 900, timeout_s=2)
            assert ei.value.remote_code == "too_large"
            assert (await a.request("b", "echo", 1, timeout_s=2))["payload"] == 1
        finally:
            await a.stop()
            await b.stop()

    run(body())
