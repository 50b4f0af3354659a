"""Transactional requests (txn/requests.py, server/txn_validation.py): conditions for
compare-and-set and one-shot transactions, parsed from untrusted JSON; every refusal
names the field that is wrong (issue #11, §6)."""

from __future__ import annotations

from typing import Any

import pytest

from ringkv.config import LimitsConfig
from ringkv.errors import BadRequest, TooLarge
from ringkv.server.txn_validation import parse_condition, parse_txn
from ringkv.txn.requests import Condition, TxnRequest, Write

LIMITS = LimitsConfig(max_key_bytes=16, max_value_bytes=64, max_batch_ops=4)


@pytest.mark.parametrize("condition,value,version,holds", [
    (Condition(b"k", "absent"), None, None, True),
    (Condition(b"k", "absent"), b"1", 5, False),
    (Condition(b"k", "version", version_us=5), b"1", 5, True),
    (Condition(b"k", "version", version_us=5), b"1", 6, False),
    (Condition(b"k", "version", version_us=5), None, None, False),
    (Condition(b"k", "equals", equals=b'{"a":1}'), b'{"a":1}', 9, True),
    (Condition(b"k", "equals", equals=b'{"a":1,"b":2}'), b'{"b":2,"a":1}', 9, True),
    (Condition(b"k", "equals", equals=b"1"), b"1.0", 9, False),
    (Condition(b"k", "equals", equals=b"1"), b"true", 9, False),
    (Condition(b"k", "equals", equals=b'{"a":1}'), b'{"a":2}', 9, False),
    (Condition(b"k", "equals", equals=b"null"), None, None, False),  # absent is not null
])
def test_a_condition_holds_on_the_committed_state(condition: Condition, value: bytes | None,
                                                  version: int | None, holds: bool) -> None:
    assert condition.holds(value, version) is holds


def test_conditions_parse_and_equals_compares_canonical_json() -> None:
    assert parse_condition({"version": 7}, b"k", LIMITS, field="if") == \
        Condition(b"k", "version", version_us=7)
    assert parse_condition({"absent": True}, b"k", LIMITS, field="if") == Condition(b"k", "absent")
    spaced = parse_condition({"equals": {"b": 2, "a": 1}}, b"k", LIMITS, field="if")
    assert spaced.equals == b'{"a":1,"b":2}'


@pytest.mark.parametrize("obj,field", [
    (7, "if"),
    ({}, "if"),
    ({"version": 1, "absent": True}, "if"),
    ({"version": -1}, "if.version"),
    ({"version": True}, "if.version"),
    ({"version": "5"}, "if.version"),
    ({"absent": False}, "if.absent"),
    ({"equals": "x" * 100}, "if.equals"),
    ({"vesion": 3}, "if.vesion"),
])
def test_bad_conditions_name_the_field(obj: Any, field: str) -> None:
    with pytest.raises((BadRequest, TooLarge)) as caught:
        parse_condition(obj, b"k", LIMITS, field="if")
    assert caught.value.details["field"] == field


def test_a_one_shot_transaction_parses() -> None:
    request = parse_txn({
        "keyspace": "txn", "id": "t-1",
        "reads": ["a"],
        "conditions": [{"key": "b", "version": 3}],
        "writes": [{"op": "put", "key": "a", "value": [1]}, {"op": "delete", "key": "c"}],
    }, LIMITS)
    assert request == TxnRequest("txn", "t-1", (b"a",), (Condition(b"b", "version", 3),),
                                 (Write(b"a", b"[1]"), Write(b"c", None)))
    assert request.keys() == [b"a", b"b", b"c"]
    assert parse_txn({"keyspace": "txn", "reads": ["a"]}, LIMITS).txn_id is None


@pytest.mark.parametrize("body,field", [
    ([], "body"),
    ({"keyspace": "txn"}, "body"),
    ({"reads": ["a"]}, "keyspace"),
    ({"keyspace": "", "reads": ["a"]}, "keyspace"),
    ({"keyspace": "txn", "reads": ["a"], "id": "has space"}, "id"),
    ({"keyspace": "txn", "reads": ["a"], "id": "x" * 65}, "id"),
    ({"keyspace": "txn", "reads": "a"}, "reads"),
    ({"keyspace": "txn", "reads": [1]}, "reads[0]"),
    ({"keyspace": "txn", "reads": ["k" * 17]}, "reads[0]"),
    ({"keyspace": "txn", "conditions": [{"version": 1}]}, "conditions[0].key"),
    ({"keyspace": "txn", "conditions": [{"key": "a"}]}, "conditions[0]"),
    ({"keyspace": "txn", "writes": [{"op": "put", "key": "a"}]}, "writes[0].value"),
    ({"keyspace": "txn", "writes": [{"op": "delete", "key": "a", "value": 1}]},
     "writes[0].value"),
    ({"keyspace": "txn", "writes": [{"op": "upsert", "key": "a", "value": 1}]}, "writes[0].op"),
    ({"keyspace": "txn", "writes": [{"op": "put", "key": "a", "value": 1, "ttl": 5}]},
     "writes[0].ttl"),
    ({"keyspace": "txn", "writes": [{"op": "put", "key": "a", "value": 1},
                                    {"op": "delete", "key": "a"}]}, "writes[1].key"),
    ({"keyspace": "txn", "reads": ["a", "b", "c", "d", "e"]}, "body"),  # over max_batch_ops
    ({"keyspace": "txn", "reads": ["a"], "read": ["b"]}, "read"),
])
def test_bad_transactions_name_the_field(body: Any, field: str) -> None:
    with pytest.raises((BadRequest, TooLarge)) as caught:
        parse_txn(body, LIMITS)
    assert caught.value.details["field"] == field
