"""Replica messages on the wire (ringkv.messages): a peer may send anything,
and every malformed shape is a ProtocolError that names what is wrong."""

from __future__ import annotations

import msgpack
import pytest

from ringkv.hlc import Timestamp
from ringkv.errors import ProtocolError
from ringkv.messages import KeyRef, ScanReply, ScanRequest
from ringkv.versioning import Cell, encode_cell


def through_msgpack(obj: object) -> object:
    return msgpack.unpackb(msgpack.packb(obj, use_bin_type=True), raw=False)


def test_messages_round_trip_through_msgpack() -> None:
    ref = KeyRef("ks", -5, b"key")
    assert KeyRef.from_wire(through_msgpack(ref.to_wire())) == ref
    request = ScanRequest("ks", 1, None, 2**62, 100)
    assert ScanRequest.from_wire(through_msgpack(request.to_wire())) == request
    reply = ScanReply([(1, b"a", Cell(b"1", Timestamp(7))), (2, b"b", Cell(b"2", Timestamp(8)))],
                      truncated=True)
    assert ScanReply.from_wire(through_msgpack(reply.to_wire())) == reply
    assert ScanReply.from_wire(through_msgpack(ScanReply([]).to_wire())) == ScanReply([])


GOOD_ITEM = [1, b"k", encode_cell(Cell(b"1", Timestamp(1)))]


@pytest.mark.parametrize("wire, complaint", [
    ([GOOD_ITEM], "message body must be a map"),  # the shape before replies said "truncated"
    ({"i": [GOOD_ITEM]}, "'more'"),
    ({"i": [GOOD_ITEM], "more": 1}, "'more'"),
    ({"i": "no", "more": False}, "'i'"),
    ({"i": [[1, b"k"]], "more": False}, r"must be \[token, key, cell\]"),
    ({"i": [["1", b"k", GOOD_ITEM[2]]], "more": False}, "wrong types"),
    ({"i": [[1, b"k", None]], "more": False}, "has no cell"),
    ({"i": [[1, b"k", b"\x01garbage"]], "more": False}, "corrupt cell"),
    ({"i": [], "more": True}, "at least one item"),
])
def test_malformed_scan_replies_are_protocol_errors(wire: object, complaint: str) -> None:
    with pytest.raises(ProtocolError, match=complaint):
        ScanReply.from_wire(wire)


@pytest.mark.parametrize("wire, complaint", [
    ([], "message body must be a map"),
    ({"t": 1, "k": b"k"}, "'ks'"),
    ({"ks": "", "t": 1, "k": b"k"}, "'ks' is not a keyspace name"),
    ({"ks": "é" * 200, "t": 1, "k": b"k"}, "'ks' is not a keyspace name"),  # 400 bytes
    ({"ks": "ks", "t": True, "k": b"k"}, "'t'"),
    ({"ks": "ks", "t": 2**63, "k": b"k"}, "'t' is not a token"),
    ({"ks": "ks", "t": 1, "k": "k"}, "'k'"),
])
def test_malformed_key_references_are_protocol_errors(wire: object, complaint: str) -> None:
    with pytest.raises(ProtocolError, match=complaint):
        KeyRef.from_wire(wire)
