"""Tests for ringkv.net: the frame codec (pure) and the asyncio transport on real
loopback sockets (127.0.0.1, ephemeral ports only). Every async test runs under
``asyncio.run`` with its own deadline; no pytest-asyncio needed."""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ringkv.clock import ManualClock
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
from ringkv.tools.launcher import free_port
from ringkv.net.codec import (
    KIND_ONEWAY,
    KIND_REQUEST,
    KIND_RESPONSE,
    PROTOCOL_VERSION,
    Frame,
    FrameDecoder,
    encode_frame,
)
from ringkv.net.rpc import resolved_future
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


async def wait_for_condition(pred: Callable[[], bool], what: str, timeout_s: float = 5.0) -> None:
    """Poll ``pred`` until it holds. The deadline only bounds a hang: nothing is
    asserted about how long the condition took."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not pred():
        if asyncio.get_running_loop().time() >= deadline:
            raise AssertionError(f"gave up after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.01)


async def retry_until_ok(attempt: Callable[[], Awaitable[Any]], what: str, timeout_s: float = 5.0) -> Any:
    """Repeat ``attempt`` while it fails with PeerUnreachable (e.g. a reconnect backoff
    that has not expired yet); return its first result. Bounded like wait_for_condition."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        try:
            return await attempt()
        except PeerUnreachable as e:
            if asyncio.get_running_loop().time() >= deadline:
                raise AssertionError(f"gave up after {timeout_s}s waiting for {what}") from e
        await asyncio.sleep(0.01)


class BlockingHandler:
    """Echo handler whose verb "block" records that it started and then waits until
    the test sets ``release``: lets a test know a request reached the peer's handler
    and control exactly when (or whether) it answers."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.running = 0

    async def __call__(self, from_node: str, verb: str, payload: Any) -> Any:
        if verb != "block":
            return await echo_handler(from_node, verb, payload)
        self.running += 1
        self.started.set()
        try:
            await self.release.wait()
        finally:
            self.running -= 1
        return payload


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


async def expect_hang_up(reader: asyncio.StreamReader, timeout_s: float = 2.0) -> None:
    """Wait until the server closes or resets the connection (skipping unread data)."""
    try:
        async with asyncio.timeout(timeout_s):
            while await reader.read(65536):
                pass
    except ConnectionError:
        pass  # a reset (what a protocol error gets) is as much a hang-up as a close
    except TimeoutError:
        raise AssertionError(f"the connection was still open after {timeout_s}s") from None


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


def test_outbound_connections_leave_from_the_listen_address() -> None:
    """So a peer (or the fault proxy) can tell nodes on one host apart by source IP."""

    async def body() -> None:
        a = Transport("a", CLUSTER, "127.0.0.2", 0, echo_handler)
        b = Transport("b", CLUSTER, "127.0.0.3", 0, echo_handler)
        await a.start()
        await b.start()
        try:
            link(a, b)
            assert (await a.request("b", "echo", 1, timeout_s=2))["payload"] == 1
            [inbound] = b._inbound
            assert inbound.peer_addr[0] == "127.0.0.2"
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


async def check_failures_come_back_typed(a: Transport, peer: str) -> None:
    """What echo_handler's failing verbs look like to the caller."""
    with pytest.raises(RemoteError) as ei:
        await a.request(peer, "bad_request", None, timeout_s=2)
    assert ei.value.remote_code == "bad_request" and ei.value.remote_details == {"field": "key"}
    with pytest.raises(RemoteError) as ei:
        await a.request(peer, "boom", None, timeout_s=2)
    assert ei.value.remote_code == "internal" and "ZeroDivisionError" in ei.value.remote_message
    with pytest.raises(RemoteError) as ei:
        await a.request(peer, "unencodable", None, timeout_s=2)
    assert ei.value.remote_code == "protocol_error"


class AnswersNow:
    """A handler with a synchronous path for some verbs (as replica reads have)."""

    SYNC_VERBS = ("echo", "bad_request", "boom", "unencodable")

    def __init__(self) -> None:
        self.awaited: list[str] = []

    def answer_future(self, from_node: str, verb: str, payload: Any) -> asyncio.Future[Any] | None:
        if verb not in self.SYNC_VERBS:
            return None
        coro = echo_handler(from_node, verb, payload)
        try:
            coro.send(None)  # these verbs of echo_handler never wait
        except StopIteration as done:
            return resolved_future(done.value)
        raise AssertionError(f"{verb} waited")

    async def __call__(self, from_node: str, verb: str, payload: Any) -> Any:
        self.awaited.append(verb)
        return await echo_handler(from_node, verb, payload)


def test_requests_answered_now_skip_the_handler_task_and_fail_alike() -> None:
    async def body() -> None:
        handler = AnswersNow()
        a, b = make("a"), make("b", handler=handler)
        await a.start()
        await b.start()
        try:
            link(a, b)
            assert (await a.request("b", "echo", "ok", timeout_s=2))["payload"] == "ok"
            await check_failures_come_back_typed(a, "b")
            assert handler.awaited == []  # all of that was answered without a task
            assert await a.request("b", "double", 21, timeout_s=2) == 42  # None: the task path
            assert handler.awaited == ["double"]
            assert b.stats["handler_errors"] == 2
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
            await check_failures_come_back_typed(a, "b")

            # None of that hurt the connection or the node.
            assert (await a.request("b", "echo", "ok", timeout_s=2))["payload"] == "ok"
            assert a.stats["connects"] == 1
            assert b.stats["handler_errors"] == 3  # bad_request twice, boom once
        finally:
            await a.stop()
            await b.stop()

    run(body())


def test_request_timeout_with_slow_handler() -> None:
    async def body() -> None:
        slow = BlockingHandler()
        a, b = make("a"), make("b", slow)
        await a.start()
        await b.start()
        try:
            link(a, b)
            # Connect first, so the request below reaches b's handler long before it expires.
            assert (await a.request("b", "echo", 0, timeout_s=5))["payload"] == 0
            # The handler cannot answer before the test releases it, which happens only
            # after the PeerTimeout: the caller's own timeout ended the wait, not the answer.
            task = asyncio.create_task(a.request("b", "block", 1, timeout_s=1.0))
            await asyncio.wait_for(slow.started.wait(), 5)  # sent before it expired
            with pytest.raises(PeerTimeout) as ei:
                await task
            e = ei.value
            assert e.node_id == "b" and e.verb == "block" and e.timeout_s == 1.0
            assert a.stats["timeouts"] == 1 and a.stats["pending_requests"] == 0
            # Other requests on the same connection are unaffected, even while the slow
            # handler is still running.
            assert slow.running == 1
            assert (await a.request("b", "echo", 2, timeout_s=5))["payload"] == 2
            # Now the slow answer arrives late and is dropped.
            slow.release.set()
            await wait_for_condition(lambda: a.stats["late_responses"] == 1, "the late answer to be dropped")
            assert a.stats["timeouts"] == 1
            assert a.stats["responses_received"] == 2  # the two echoes; the late answer is not one
            assert a.stats["pending_requests"] == 0
            assert a.stats["connects"] == 1
        finally:
            await a.stop()
            await b.stop()

    run(body())


def test_unknown_peer_and_nothing_listening() -> None:
    async def body() -> None:
        # The backoff runs on this clock, which moves only when the test says so: the
        # peer stays in backoff for exactly as long as the test needs.
        clock = ManualClock()
        # Request timeouts of 30 s, beyond run()'s deadline: a failure that waited for
        # the timeout would surface as PeerTimeout or as the test's own deadline, never
        # as the PeerUnreachable asserted here.
        a = make("a", max_backoff_s=1.0, clock=clock)
        await a.start()
        try:
            with pytest.raises(PeerUnreachable, match="no address"):
                await a.request("ghost", "echo", 1, timeout_s=30)
            assert a.stats["connects"] == 0 and a.stats["connect_failures"] == 0
            a.set_peer_address("b", LOCALHOST, free_port())
            # Refused at once by the OS, not given up on after a timeout.
            with pytest.raises(PeerUnreachable, match="ConnectionRefused"):
                await a.request("b", "echo", 1, timeout_s=30)
            assert a.stats["connect_failures"] == 1
            # In backoff now: fails fast without touching the network.
            with pytest.raises(PeerUnreachable, match="backoff"):
                await a.request("b", "echo", 1, timeout_s=30)
            assert a.send_oneway("b", "note", 1) is False
            assert a.stats["dropped_oneway"] == 1
            assert a.stats["connect_failures"] == 1  # no connect attempt during the backoff
            assert a.stats["timeouts"] == 0 and a.stats["pending_requests"] == 0
            # Once the backoff has expired, the next request tries the network again.
            clock.advance(1.0)
            with pytest.raises(PeerUnreachable, match="ConnectionRefused"):
                await a.request("b", "echo", 1, timeout_s=30)
            assert a.stats["connect_failures"] == 2
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
            await wait_for_condition(lambda: a.stats["connections_lost"] == 1, "a to notice the closed connection")
            assert a.stats["outbound_connections"] == 0

            # Fast: the 30 s timeout is beyond run()'s deadline, so waiting for it would
            # show up as PeerTimeout or a blown deadline, not PeerUnreachable.
            with pytest.raises(PeerUnreachable, match="ConnectionRefused"):
                await a.request("b", "echo", 2, timeout_s=30)  # reconnect refused
            with pytest.raises(PeerUnreachable):
                await a.request("b", "echo", 3, timeout_s=30)  # backoff, or refused again
            assert a.stats["timeouts"] == 0

            b = make("b", port=port)  # same node id, same port
            await b.start()
            # Requests fail fast until the (capped) backoff has expired, then reconnect.
            got = await retry_until_ok(lambda: a.request("b", "echo", 4, timeout_s=30), "a to reconnect to b")
            assert got["payload"] == 4
            assert a.stats["reconnects"] == 1
            assert a.stats["connections_lost"] == 1
            assert a.stats["timeouts"] == 0
        finally:
            await a.stop()
            await b.stop()

    run(body())


def test_pending_requests_fail_when_connection_drops() -> None:
    async def body() -> None:
        slow = BlockingHandler()  # never released: only the lost connection can end the wait
        a, b = make("a"), make("b", slow)
        await a.start()
        await b.start()
        try:
            link(a, b)
            # 30 s: beyond run()'s deadline, so only the dropped connection can fail it in time.
            task = asyncio.create_task(a.request("b", "block", 1, timeout_s=30))
            await asyncio.wait_for(slow.started.wait(), 5)  # the request reached b's handler
            await b.stop()
            with pytest.raises(PeerUnreachable, match="lost") as ei:
                await task
            assert ei.value.maybe_delivered is True
            assert a.stats["connections_lost"] == 1
            assert a.stats["timeouts"] == 0 and a.stats["pending_requests"] == 0
        finally:
            await a.stop()
            await b.stop()

    run(body())


def test_stop_fails_pending_with_shutting_down() -> None:
    async def body() -> None:
        slow = BlockingHandler()  # never released: b never answers
        a, b = make("a"), make("b", slow)
        await a.start()
        await b.start()
        try:
            link(a, b)
            task = asyncio.create_task(a.request("b", "block", 1, timeout_s=30))
            await asyncio.wait_for(slow.started.wait(), 5)  # the request is in flight at b
            await a.stop()
            with pytest.raises(ShuttingDown):
                await task
            with pytest.raises(ShuttingDown):
                await a.request("b", "echo", 1, timeout_s=30)
            assert a.stats["timeouts"] == 0
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
            await wait_for_condition(lambda: b.stats["refused_handshakes"] >= 1, "b to refuse the handshake")
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


def test_a_peer_that_answers_with_our_own_id_is_refused() -> None:
    """A seed address that leads back to this node (its own listener, a
    duplicate node id, or a TCP self-connect) is never taken for a peer."""

    async def body() -> None:
        a = make("a")
        await a.start()
        try:
            a.set_peer_address("@seed", *a.address)  # known only by address
            with pytest.raises(PeerUnreachable, match="this node's own id"):
                await a.request("@seed", "echo", 1, timeout_s=2)
            await wait_for_condition(lambda: a.stats["refused_handshakes"] >= 2,
                                     "both ends to refuse the handshake")
            assert a.stats["inbound_connections"] == 0
        finally:
            await a.stop()

    run(body())


def test_silent_connection_closed_after_handshake_timeout() -> None:
    async def body() -> None:
        b = make("b", handshake_timeout_s=0.2)
        await b.start()
        try:
            reader, writer = await asyncio.open_connection(*b.address)
            # Send nothing; the server hangs up (the bound only guards against a hang).
            assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()
            # ...and it did so because the hello deadline passed, not for another reason.
            s = b.stats
            assert s["inbound_accepted"] == 1
            assert s["handshake_timeouts"] == 1
            assert s["protocol_errors"] == 0 and s["refused_handshakes"] == 0
            assert s["inbound_connections"] == 0
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
                try:
                    await w.drain()
                except ConnectionError:  # already reset by b for its garbage
                    pass

            # The legit peer keeps being served while the bad connections are open.
            assert (await a.request("b", "echo", 1, timeout_s=2))["payload"] == 1
            # Every bad connection is closed by b (garbage at once, partial frames at the
            # handshake timeout), without closing a's connection.
            for r, w in raws:
                await expect_hang_up(r)
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


def test_a_peer_that_talks_garbage_gets_none_of_its_queued_answers() -> None:
    """After a protocol error the connection is reset, not drained: a peer that
    sends requests it never reads, then garbage, cannot keep our socket and its
    buffered answers (up to a frame each) alive for as long as it likes."""

    async def body() -> None:
        b = make("b")
        await b.start()
        try:
            host, port = b.address
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, (host, port))
            r, w = await asyncio.open_connection(sock=sock)
            await raw_hello(r, w)
            answer_bytes = 0
            for i in range(40):  # answers far larger than the socket buffers take
                payload = b"x" * 60_000
                w.write(encode_frame(KIND_REQUEST, i + 1, "echo", payload))
                answer_bytes += len(payload)
            await w.drain()
            deadline = asyncio.get_running_loop().time() + 5
            while b.stats["handler_errors"] + b.stats["frames_in"] < 40:
                assert asyncio.get_running_loop().time() < deadline, b.stats
                await asyncio.sleep(0.01)
            w.write(b"\xff" * 64)  # not a frame: a protocol error
            await w.drain()
            while b.stats["protocol_errors"] == 0:
                assert asyncio.get_running_loop().time() < deadline, b.stats
                await asyncio.sleep(0.01)
            received = 0
            try:
                while True:
                    data = await asyncio.wait_for(r.read(65536), 2)
                    if not data:
                        break
                    received += len(data)
            except ConnectionError:
                pass
            assert received < answer_bytes / 2, (received, answer_bytes)
            w.close()
        finally:
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
            # Then a response frame, which clients must never send: connection reset.
            w.write(encode_frame(KIND_RESPONSE, 1, "echo", None))
            await expect_hang_up(r)
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
            # Once drained (the writer runs on the next loop turns), requests flow again:
            # wait until all 4 request + 4 one-way frames have been written.
            await wait_for_condition(lambda: a.stats["frames_out"] == 8, "a's send queue to drain")
            assert (await a.request("b", "echo", "again", timeout_s=2))["payload"] == "again"
        finally:
            await a.stop()
            await b.stop()

    run(body())


def test_inflight_limit_answers_overloaded() -> None:
    async def body() -> None:
        release = asyncio.Event()
        started = 0

        async def handler(frm: str, verb: str, payload: Any) -> Any:
            nonlocal started
            started += 1
            await release.wait()
            return payload

        a, b = make("a"), make("b", handler, max_inflight_per_conn=2)
        await a.start()
        await b.start()
        try:
            link(a, b)
            tasks = [asyncio.create_task(a.request("b", "wait", i, timeout_s=30)) for i in range(5)]
            # The handlers block until released, so the only answers that can arrive
            # are b's Overloaded refusals.
            await wait_for_condition(
                lambda: started == 2 and sum(t.done() for t in tasks) == 3, "2 handlers running, 3 refusals"
            )
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


def test_an_abandoned_request_frees_its_place_at_once() -> None:
    """Cancelling a request's future (as a read does to a replica it no longer
    needs) frees its place in the pending table, as an answer would: abandoned
    requests to a slow peer must not make new ones Overloaded until they time out."""

    async def body() -> None:
        slow = BlockingHandler()  # released only at the end
        a, b = make("a", max_inflight_per_conn=3), make("b", slow)
        await a.start()
        await b.start()
        try:
            link(a, b)
            futures = [a.request_future("b", "block", i, timeout_s=30) for i in range(2)]
            caller = asyncio.create_task(a.request("b", "block", 2, timeout_s=30))
            await wait_for_condition(lambda: slow.running == 3, "b to run all three handlers")
            for future in futures:
                future.cancel()
            caller.cancel()
            await wait_for_condition(lambda: a.stats["pending_requests"] == 0,
                                     "abandoned requests to leave the table", timeout_s=2)
            assert (await a.request("b", "echo", 1, timeout_s=2))["payload"] == 1
            assert a.stats["overloaded_local"] == 0 and a.stats["timeouts"] == 0
        finally:
            slow.release.set()
            await a.stop()
            await b.stop()

    run(body())


def test_internode_sockets_carry_liveness_bounds() -> None:
    """Issue #10: a connection stalled in TCP's retransmission backoff is closed
    by the kernel after USER_TIMEOUT_MS of unacknowledged data (and an idle one
    to a dead peer by keepalive), so it is redialled rather than left carrying
    nothing for minutes after a partition heals."""
    import socket as socket_module

    from ringkv.net import sockets

    async def body() -> None:
        a, b = make("a"), make("b")
        await a.start()
        await b.start()
        try:
            link(a, b)
            assert (await a.request("b", "echo", 1, timeout_s=2))["payload"] == 1
            for conn in [a._peers["b"].conn, *b._inbound]:
                assert conn is not None
                sock = conn.sock.get_extra_info("socket")
                assert sock.getsockopt(socket_module.SOL_SOCKET, socket_module.SO_KEEPALIVE) == 1
                assert sock.getsockopt(socket_module.IPPROTO_TCP, socket_module.TCP_NODELAY) == 1
                if hasattr(socket_module, "TCP_USER_TIMEOUT"):
                    assert sock.getsockopt(socket_module.IPPROTO_TCP,
                                           socket_module.TCP_USER_TIMEOUT) == sockets.USER_TIMEOUT_MS
                    assert sock.getsockopt(socket_module.IPPROTO_TCP,
                                           socket_module.TCP_KEEPIDLE) == sockets.KEEPALIVE_IDLE_S
        finally:
            await a.stop()
            await b.stop()

    run(body())


def test_a_peer_back_up_is_dialled_at_once() -> None:
    """Gossip's UP forgets the reconnect backoff: the next request dials at once
    instead of failing fast for what is left of the backoff."""

    async def body() -> None:
        clock = ManualClock()
        a = make("a", max_backoff_s=60.0, clock=clock)
        await a.start()
        try:
            a.set_peer_address("c", LOCALHOST, free_port())
            with pytest.raises(PeerUnreachable, match="ConnectionRefused"):
                await a.request("c", "echo", 1, timeout_s=2)
            with pytest.raises(PeerUnreachable, match="backoff"):
                await a.request("c", "echo", 1, timeout_s=2)
            failures = a.stats["connect_failures"]
            a.peer_up("c")
            with pytest.raises(PeerUnreachable, match="ConnectionRefused"):
                await a.request("c", "echo", 1, timeout_s=2)  # dialled again, no waiting
            assert a.stats["connect_failures"] == failures + 1
        finally:
            await a.stop()

    run(body())
