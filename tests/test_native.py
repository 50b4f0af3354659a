"""The native protocol's pure core (ringkv/net/native.py, ringkv/client/native.py): the
handshake, requests from untrusted frames, and the client's translation of HTTP requests.

Every malformed input becomes a ``ProtocolError`` naming the field (or a ``TooLarge``
naming the limit), never another exception: the same trust boundary as the internode
codec (Dynamo §4's nodes and clients share no trust beyond the protocol).
"""

from __future__ import annotations

import random

import msgpack
import pytest

from ringkv.client import native as client_native
from ringkv.client.plan import Send
from ringkv.errors import ProtocolError, RingKVError, TooLarge
from ringkv.net import native
from ringkv.net.codec import (
    KIND_ERROR,
    KIND_REQUEST,
    KIND_RESPONSE,
    Frame,
    FrameDecoder,
    encode_frame,
)


def frame(verb: str, payload: object, request_id: int = 1, kind: int = KIND_REQUEST) -> Frame:
    return Frame(native.NATIVE_VERSION, kind, request_id, verb, payload)


# -- the handshake -------------------------------------------------------------


def test_hello_chooses_the_highest_common_version() -> None:
    chosen = native.hello(frame("hello", {"versions": [7, 1], "client": "x"}, request_id=0))
    assert chosen.version == 1 and chosen.client == "x"


@pytest.mark.parametrize("offered", [[3], [99, 3]])
def test_an_unknown_version_is_refused_naming_versions(offered: list[int]) -> None:
    with pytest.raises(ProtocolError) as caught:
        native.hello(frame("hello", {"versions": offered}, request_id=0))
    assert caught.value.details["field"] == "versions"
    assert caught.value.details["supported"] == [1, 2]


@pytest.mark.parametrize("bad, field", [
    (frame("get", {"versions": [1]}, request_id=0), "hello"),  # not a hello first
    (frame("hello", {"versions": [1]}, request_id=5), "hello"),  # not id 0
    (frame("hello", [1], request_id=0), "hello"),
    (frame("hello", {"versions": "1"}, request_id=0), "versions"),
    (frame("hello", {"versions": [True]}, request_id=0), "versions"),
    (frame("hello", {"versions": []}, request_id=0), "versions"),
    (frame("hello", {"versions": [1], "client": 3}, request_id=0), "client"),
])
def test_a_bad_hello_names_its_field(bad: Frame, field: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        native.hello(bad)
    assert caught.value.details["field"] == field


def test_the_client_checks_the_nodes_answer() -> None:
    ok = frame("hello", {"version": 1, "node_id": "n1"}, request_id=0, kind=KIND_RESPONSE)
    assert client_native.check_hello(ok) == 1
    refused = frame("error", {"code": "protocol_error", "message": "no"}, 0, KIND_ERROR)
    with pytest.raises(ProtocolError, match="protocol_error"):
        client_native.check_hello(refused)
    with pytest.raises(ProtocolError):
        client_native.check_hello(frame("hello", {"version": 9}, 0, KIND_RESPONSE))


# -- requests --------------------------------------------------------------------


def test_a_request_becomes_typed_fields() -> None:
    request = native.request(frame("put", {
        "keyspace": "default", "key": "k", "body": b'{"value":1}',
        "args": {"consistency": "QUORUM", "ttl": 5, "local": True},
        "idempotency_key": "abc"}, request_id=9))
    assert request.request_id == 9 and request.verb == "put"
    assert request.args == {"consistency": "QUORUM", "ttl": "5", "local": "true"}
    assert request.body == b'{"value":1}' and request.idempotency_key == "abc"


@pytest.mark.parametrize("bad, field", [
    (frame("drop_table", {}), "verb"),
    (frame("get", {"keyspace": "default", "key": "k"}, request_id=0), "request_id"),
    (frame("get", {"keyspace": "default", "key": "k"}, kind=KIND_RESPONSE), "kind"),
    (frame("get", [1, 2]), "payload"),
    (frame("get", {"keyspace": "default"}), "key"),
    (frame("get", {"keyspace": "default", "key": 7}), "key"),
    (frame("scan", {}), "keyspace"),
    (frame("txn_status", {}), "txn_id"),
    (frame("put", {"keyspace": "d", "key": "k", "body": "{}"}), "body"),
    (frame("put", {"keyspace": "d", "key": "k", "idempotency_key": 1}), "idempotency_key"),
    (frame("get", {"keyspace": "d", "key": "k", "args": [1]}), "args"),
    (frame("get", {"keyspace": "d", "key": "k", "args": {"limit": 1.5}}), "args.limit"),
    (frame("get", {"keyspace": "d", "key": "k", "surprise": 1}), "surprise"),
])
def test_a_bad_request_names_its_field(bad: Frame, field: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        native.request(bad)
    assert caught.value.details["field"] == field


def test_garbage_never_escapes_as_another_exception() -> None:
    """Random frames and random bytes: only ProtocolError/TooLarge, whatever arrives."""
    rng = random.Random(14)
    values: list[object] = [None, 1, -1, 2**70 // 2**10, "x", b"y", [1], {"a": 1}, {1: 2},
                            True, 1.5, {"keyspace": [1]}, {"args": {"a": {}}}]
    for _ in range(2000):
        payload = rng.choice(values)
        if rng.random() < 0.5:
            payload = {rng.choice(["keyspace", "key", "args", "body", "txn_id", "x",
                                   "lease_id", "watch_id"]):
                       rng.choice(values) for _ in range(rng.randrange(4))}
        verb = rng.choice(list(native.OPERATIONS) + ["hello", "nope"])
        candidate = frame(verb, payload, request_id=rng.randrange(3), kind=rng.randrange(4))
        for parse in (native.hello, native.request,
                      lambda f: native.request(f, native.STREAM_VERSION)):
            try:
                parse(candidate)
            except ProtocolError:
                pass
    for _ in range(500):
        decoder = FrameDecoder(4096)
        blob = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
        try:
            for got in decoder.feed(blob):
                native.request(got)
        except ProtocolError:
            pass


def test_an_oversized_frame_is_too_large_naming_the_limit() -> None:
    decoder = FrameDecoder(1000)
    body = msgpack.packb([1, KIND_REQUEST, 1, "put", {"body": b"x" * 5000}])
    with pytest.raises(ProtocolError) as caught:
        decoder.feed(len(body).to_bytes(4, "big") + body[:10])  # refused before the body
    error = native.frame_error(caught.value, 1000)
    assert isinstance(error, TooLarge)
    assert error.details == {"field": "frame", "limit": 1000, "size": len(body)}
    other = native.frame_error(ProtocolError("bad msgpack body"), 1000)
    assert isinstance(other, RingKVError) and other.code == "protocol_error"


# -- the client's translation -------------------------------------------------------


@pytest.mark.parametrize("method, path, verb, fields", [
    ("GET", "/v1/kv/default/a%2Fb?consistency=QUORUM", "get",
     {"keyspace": "default", "key": "a/b", "args": {"consistency": "QUORUM"}}),
    ("PUT", "/v1/kv/txn/k", "put", {"keyspace": "txn", "key": "k"}),
    ("DELETE", "/v1/kv/default/k", "delete", {"keyspace": "default", "key": "k"}),
    ("GET", "/v1/kv/default?limit=7&page_token=", "scan",
     {"keyspace": "default", "args": {"limit": "7", "page_token": ""}}),
    ("POST", "/v1/batch", "batch", {}),
    ("POST", "/v1/txn", "txn", {}),
    ("GET", "/v1/txn/t-1?keyspace=txn", "txn_status", {"txn_id": "t-1",
                                                       "args": {"keyspace": "txn"}}),
    ("POST", "/v1/txn/begin", "txn_begin", {}),
    ("GET", "/v1/txn/n1%3A4%3A0000abcd/kv/bank/a%2Fb", "txn_get",
     {"txn_id": "n1:4:0000abcd", "keyspace": "bank", "key": "a/b"}),
    ("PUT", "/v1/txn/n1:4:0000abcd/kv/bank/k", "txn_put",
     {"txn_id": "n1:4:0000abcd", "keyspace": "bank", "key": "k"}),
    ("DELETE", "/v1/txn/n1:4:0000abcd/kv/bank/k", "txn_delete",
     {"txn_id": "n1:4:0000abcd", "keyspace": "bank", "key": "k"}),
    ("POST", "/v1/txn/n1:4:0000abcd/commit", "txn_commit", {"txn_id": "n1:4:0000abcd"}),
    ("POST", "/v1/txn/n1:4:0000abcd/abort", "txn_abort", {"txn_id": "n1:4:0000abcd"}),
    ("GET", "/v1/ring", "ring", {}),
    ("GET", "/v1/status", "status", {}),
])
def test_every_operation_of_the_plans_has_its_native_verb(
        method: str, path: str, verb: str, fields: dict[str, object]) -> None:
    send = Send(method, "http://127.0.0.1:7400" + path, None, {}, 1.0)
    request = client_native.to_native(send)
    assert request is not None and request.verb == verb
    assert request.base_url == "http://127.0.0.1:7400"
    assert dict(request.payload) == fields
    # And the node's core reads back what the client wrote.
    parsed = native.request(frame(verb, dict(request.payload)))
    assert parsed.verb == verb


def test_admin_requests_stay_on_http() -> None:
    send = Send("POST", "http://h:1/v1/admin/repair", b"{}", {}, 1.0)
    assert client_native.to_native(send) is None


@pytest.mark.parametrize("method,path", [
    ("POST", "/v1/txn/t-1"), ("GET", "/v1/txn/t-1/commit"), ("POST", "/v1/txn/t-1/kv/bank"),
    ("PATCH", "/v1/txn/t-1/kv/bank/k"), ("POST", "/v1/txn/t-1/other"),
])
def test_a_path_that_is_no_transaction_call_stays_on_http(method: str, path: str) -> None:
    """HTTP answers it (405 or 404) as it would any other."""
    assert client_native.to_native(Send(method, "http://h:1" + path, None, {}, 1.0)) is None


def test_the_idempotency_key_and_body_travel() -> None:
    send = Send("PUT", "http://h:1/v1/kv/default/k", b'{"value":1}',
                {"Idempotency-Key": "u-1"}, 1.0)
    request = client_native.to_native(send)
    assert request is not None
    assert request.payload["body"] == b'{"value":1}'
    assert request.payload["idempotency_key"] == "u-1"


def test_a_response_becomes_the_plans_reply() -> None:
    wire = encode_frame(KIND_RESPONSE, 3, "put",
                        native.response_payload(200, b'{"ok":true}', replayed=True))
    (decoded,) = FrameDecoder().feed(wire)
    reply = client_native.reply(decoded)
    assert reply.status == 200 and reply.body == b'{"ok":true}'
    assert reply.headers[client_native.REPLAYED_HEADER] == "true"
    with pytest.raises(ProtocolError):
        client_native.reply(frame("put", {"status": "200", "body": b""}, 3, KIND_RESPONSE))


# -- the listener's bound on requests in flight (server/native.py) ---------------------


class _FakeTransport:
    def __init__(self) -> None:
        self.written = bytearray()
        self.paused = False
        self.pauses = 0
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written += data

    def pause_reading(self) -> None:
        self.paused = True
        self.pauses += 1

    def resume_reading(self) -> None:
        self.paused = False

    def close(self) -> None:
        self.closed = True


def test_at_most_max_in_flight_run_and_the_rest_wait_in_order(monkeypatch) -> None:
    """A client that sends more than MAX_IN_FLIGHT requests at once is not refused:
    the excess waits, reading pauses, and every request is answered by its id."""
    import asyncio
    from types import SimpleNamespace

    from ringkv.clock import SystemClock
    from ringkv.config import Config
    from ringkv.door import Door, DoorLimits
    from ringkv.server import handlers, native as server_native
    from ringkv.server.idempotency import IdempotencyCache

    monkeypatch.setattr(server_native, "MAX_IN_FLIGHT", 4)
    release = None
    running = 0
    most = 0
    started: list[str] = []

    async def held(call: handlers.ApiCall) -> handlers.Answer:
        nonlocal running, most
        running += 1
        most = max(most, running)
        started.append(call.keyspace)
        assert release is not None
        await release.wait()
        running -= 1
        return handlers.answer({"ok": True})

    monkeypatch.setitem(server_native._ROUTES, "scan", held)
    config = Config()
    node = SimpleNamespace(draining=False, require_joined=lambda: None, config=config,
                           node_id="n1", metrics=SimpleNamespace(observe_request=lambda *a: None))

    async def run() -> None:
        nonlocal release
        release = asyncio.Event()
        clock = SystemClock()
        door = Door(DoorLimits.from_config(config.limits))
        server = server_native.NativeServer(node, door, IdempotencyCache(clock), clock)  # type: ignore[arg-type]
        connection = server_native.NativeConnection(server)
        transport = _FakeTransport()
        connection.connection_made(transport)  # type: ignore[arg-type]
        wire = encode_frame(KIND_REQUEST, 0, "hello", {"versions": [1]})
        wire += b"".join(encode_frame(KIND_REQUEST, i, "scan", {"keyspace": f"k{i:02}"})
                         for i in range(1, 11))
        connection.data_received(wire)
        await asyncio.sleep(0)
        assert running == 4 and transport.paused  # four run; six wait; reading paused
        release.set()
        for _ in range(200):
            if len(connection.tasks) == 0 and not connection._backlog:
                break
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.01)  # the last answers' flush
        frames = FrameDecoder().feed(bytes(transport.written))
        assert [f.request_id for f in frames][0] == 0  # the hello answer first
        assert sorted(f.request_id for f in frames[1:]) == list(range(1, 11))
        assert all(f.payload["status"] == 200 for f in frames[1:])
        assert not transport.paused and connection._visit.unanswered == 0
        connection.close()

    asyncio.run(asyncio.wait_for(run(), 10))
    assert most == 4 and started == [f"k{i:02}" for i in range(1, 11)]  # in arrival order


# -- version 2: leases and watch streams ------------------------------------------


def v2(verb: str, payload: object, request_id: int = 1) -> native.Request:
    return native.request(frame(verb, payload, request_id), native.STREAM_VERSION)


@pytest.mark.parametrize("method,path,verb,fields", [
    ("POST", "/v1/lease", "lease_grant", {}),
    ("POST", "/v1/lease/txn:ab12/keepalive", "lease_keepalive", {"lease_id": "txn:ab12"}),
    ("DELETE", "/v1/lease/txn:ab12", "lease_revoke", {"lease_id": "txn:ab12"}),
    ("GET", "/v1/lease/txn%3Aab12", "lease_info", {"lease_id": "txn:ab12"}),
])
def test_the_lease_paths_have_their_native_verbs(
        method: str, path: str, verb: str, fields: dict[str, object]) -> None:
    request = client_native.to_native(Send(method, "http://h:1" + path, None, {}, 1.0))
    assert request is not None and request.verb == verb and dict(request.payload) == fields
    assert client_native.needs_streams(request)
    assert v2(verb, dict(request.payload)).lease_id == fields.get("lease_id", "")


@pytest.mark.parametrize("method,path", [
    ("GET", "/v1/lease"), ("PUT", "/v1/lease/txn:ab"), ("POST", "/v1/lease/txn:ab/other"),
    ("GET", "/v1/lease/txn:ab/keepalive"),
])
def test_a_path_that_is_no_lease_call_stays_on_http(method: str, path: str) -> None:
    assert client_native.to_native(Send(method, "http://h:1" + path, None, {}, 1.0)) is None


def test_a_watch_request_becomes_typed_fields() -> None:
    parsed = v2("watch", {"keyspace": "txn", "key": "k",
                          "args": {"prefix": True, "from_version": 42}}, request_id=9)
    assert (parsed.request_id, parsed.keyspace, parsed.key) == (9, "txn", "k")
    assert dict(parsed.args) == {"prefix": "true", "from_version": "42"}
    assert v2("watch_cancel", {"watch_id": 9}).watch_id == 9


@pytest.mark.parametrize("verb,payload,field", [
    ("watch", {"key": "k"}, "keyspace"),
    ("watch", {"keyspace": "txn", "args": {"format": "sse"}}, "args.format"),
    ("watch", {"keyspace": "txn", "args": {"from_version": 1.5}}, "args.from_version"),
    ("watch_cancel", {}, "watch_id"),
    ("watch_cancel", {"watch_id": "7"}, "watch_id"),
    ("watch_cancel", {"watch_id": 0}, "watch_id"),
    ("watch_cancel", {"watch_id": True}, "watch_id"),
    ("lease_keepalive", {}, "lease_id"),
    ("lease_revoke", {"lease_id": ""}, "lease_id"),
    ("lease_info", {"lease_id": 3}, "lease_id"),
    ("lease_grant", {"body": "not bytes"}, "body"),
])
def test_a_bad_watch_or_lease_request_names_its_field(verb: str, payload: object,
                                                      field: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        v2(verb, payload)
    assert caught.value.details["field"] == field


@pytest.mark.parametrize("verb", sorted(native.V2_OPERATIONS))
def test_a_version_1_connection_is_refused_the_version_2_operations(verb: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        native.request(frame(verb, {"keyspace": "txn", "lease_id": "txn:a", "watch_id": 1}))
    assert caught.value.details["field"] == "verb"


def test_the_client_reads_a_watch_stream() -> None:
    core_payload = {"keyspace": "txn", "key": "k", "args": {"prefix": False}}
    wire = client_native.watch_frame(5, core_payload, native.STREAM_VERSION)
    (sent,) = FrameDecoder().feed(wire)
    assert (sent.request_id, sent.verb) == (5, "watch")
    assert v2(sent.verb, sent.payload).keyspace == "txn"
    event = b'{"type":"put","key":"k","value":1,"version":7}\n'
    part = client_native.stream_part(frame("watch", native.stream_payload(event, more=True),
                                           5, KIND_RESPONSE))
    assert (part.event, part.more, part.refusal) == (event, True, None)
    last = client_native.stream_part(frame("watch", native.stream_payload(None, more=False),
                                           5, KIND_RESPONSE))
    assert (last.event, last.more) == (None, False)
    refusal = client_native.stream_part(frame("watch", native.response_payload(410, b"{}"),
                                              5, KIND_RESPONSE))
    assert refusal.refusal is not None and refusal.refusal.status == 410 and not refusal.more
    for bad in ({"status": 200, "more": "yes"}, {"status": 500, "more": False},
                {"status": 200, "event": "text", "more": True}):
        with pytest.raises(ProtocolError):
            client_native.stream_part(frame("watch", bad, 5, KIND_RESPONSE))
    with pytest.raises(ProtocolError):
        client_native.stream_part(frame("error", {"code": "overloaded"}, 0, KIND_ERROR))
