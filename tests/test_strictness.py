"""Strict input on the HTTP API (issue #16 §6): what a new user gets wrong in their
first hour is a 400 that names the field, never a silent guess.

A repeated query parameter, a TTL that is not a JSON integer, an unknown field
in a body or a batch operation, and an empty key. (The lean key path answers
the same: ``tests/test_http_lean.py`` compares the two.)
"""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from ringkv.clock import ManualClock
from ringkv.errors import BadRequest
from ringkv.node import Node
from ringkv.server import validation as v
from tests.test_api import call, serve

# -- the pure checks ------------------------------------------------------------------


@pytest.mark.parametrize("value", ["10", "1_0", 1.5, 10.0, True, False, [1], {"s": 1}, -1,
                                   v.MAX_TTL_S + 1])
def test_a_json_ttl_must_be_a_whole_number_of_seconds(value: Any) -> None:
    with pytest.raises(BadRequest) as caught:
        v.ttl_s(value, field="ops[2].ttl")
    assert caught.value.field == "ops[2].ttl"


def test_a_json_ttl_that_is_an_integer_is_taken() -> None:
    assert v.ttl_s(None, field="ttl") is None
    assert v.ttl_s(0, field="ttl") is None  # 0: no TTL, as before
    assert v.ttl_s(10, field="ttl") == 10
    assert v.ttl_s(v.MAX_TTL_S, field="ttl") == v.MAX_TTL_S


@pytest.mark.parametrize("text", ["1_0", " 10", "10 ", "+10", "-1", "1e3", "1.5", "",
                                  "\u0661\u0660", "0x10"])
def test_a_query_ttl_must_be_decimal_digits(text: str) -> None:
    with pytest.raises(BadRequest) as caught:
        v.ttl_from_query(text)
    assert caught.value.field == "ttl"


def test_a_query_ttl_of_digits_is_taken() -> None:
    assert v.ttl_from_query(None) is None
    assert v.ttl_from_query("10") == 10
    assert v.ttl_from_query("0") is None


def test_a_repeated_query_parameter_is_named() -> None:
    from multidict import MultiDict, MultiDictProxy

    v.check_query(MultiDictProxy(MultiDict([("a", "1"), ("b", "2")])))
    v.check_query({"consistency": "ONE"})
    with pytest.raises(BadRequest) as caught:
        v.check_query(MultiDictProxy(MultiDict(
            [("limit", "5"), ("consistency", "ONE"), ("consistency", "ONE")])))
    assert caught.value.field == "consistency"
    assert "2 times" in caught.value.message


def test_unknown_fields_are_named_where_they_are() -> None:
    v.check_fields({"value": 1}, ("value", "ttl"), what="a put")
    with pytest.raises(BadRequest) as caught:
        v.check_fields({"value": 1, "tll": 5}, ("value", "ttl"), what="a put")
    assert caught.value.field == "tll" and "value, ttl" in caught.value.message
    with pytest.raises(BadRequest) as caught:
        v.check_fields({"op": "get", "value": 1}, ("op", "key"), what="a batch get",
                       where="ops[3]")
    assert caught.value.field == "ops[3].value"


@pytest.mark.parametrize("value", ["55", "1_0", " 5", "-1", 5.0, True])
def test_a_bounded_query_integer_is_digits_only(value: Any) -> None:
    with pytest.raises(BadRequest) as caught:
        v.bounded_int(value, field="limit", low=1, high=50, default=10)
    assert caught.value.field == "limit"


def test_a_bounded_query_integer_of_digits_is_taken() -> None:
    assert v.bounded_int("7", field="limit", low=1, high=50, default=10) == 7
    assert v.bounded_int(None, field="limit", low=1, high=50, default=10) == 10


# -- over HTTP, every route --------------------------------------------------------------


def _field(body: Any) -> str:
    return str(body["error"]["field"])


REPEATED = [
    ("GET", "/v1/kv/default/k?consistency=ONE&consistency=FOO", {}, "consistency"),
    ("GET", "/v1/kv/default/k?consistency=ONE&consistency=ONE", {}, "consistency"),
    ("PUT", "/v1/kv/default/k?consistency=ONE&consistency=ALL", {"json": {"value": 1}},
     "consistency"),
    ("DELETE", "/v1/kv/default/k?consistency=ONE&consistency=ONE", {}, "consistency"),
    ("GET", "/v1/kv/default?limit=5&limit=6", {}, "limit"),
    ("POST", "/v1/batch?consistency=ONE&consistency=ONE",
     {"json": {"ops": [{"op": "get", "key": "k"}]}}, "consistency"),
    ("GET", "/v1/status?x=1&x=2", {}, "x"),
    ("GET", "/v1/ring?x=1&x=1", {}, "x"),
    ("GET", "/v1/health?x=1&x=1", {}, "x"),
    ("GET", "/v1/txn/t-1?keyspace=a&keyspace=b", {}, "keyspace"),
    ("GET", "/metrics?name=a&name=b", {}, "name"),
    ("GET", "/v1/kv/de%20fault/k?consistency=ONE&consistency=ONE", {}, "consistency"),  # router
]


def test_a_repeated_query_parameter_is_a_400_naming_it_on_every_route() -> None:
    async def scenario(client: TestClient, node: Node, clock: ManualClock) -> None:
        for method, path, kwargs, field in REPEATED:
            status, body = await call(client, method, path, **kwargs)
            assert (status, _field(body)) == (400, field), (method, path, body)
        # Once each is fine (the planted bug: check_query off would let these all pass too).
        status, _ = await call(client, "GET", "/v1/status?x=1&y=1")
        assert status == 200

    serve(scenario)


def test_the_first_of_a_repeated_consistency_does_not_win_silently() -> None:
    """Without the check the first value was used: ONE would have answered 200."""

    async def scenario(client: TestClient, node: Node, clock: ManualClock) -> None:
        await call(client, "PUT", "/v1/kv/solo/k", json={"value": 1})
        status, body = await call(client, "GET", "/v1/kv/solo/k?consistency=ONE")
        assert status == 200 and body["value"] == 1
        status, body = await call(client, "GET", "/v1/kv/solo/k?consistency=ONE&consistency=ONE")
        assert status == 400 and "2 times" in body["error"]["message"]

    serve(scenario)


BAD_BODIES = [
    # ttl: a JSON integer only, wherever it is taken
    ("PUT", "/v1/kv/default/k", {"value": 1, "ttl": "10"}, "ttl"),
    ("PUT", "/v1/kv/default/k", {"value": 1, "ttl": "1_0"}, "ttl"),
    ("PUT", "/v1/kv/default/k", {"value": 1, "ttl": 1.5}, "ttl"),
    ("PUT", "/v1/kv/default/k", {"value": 1, "ttl": False}, "ttl"),
    ("PUT", "/v1/kv/default/k?ttl=1_0", {"value": 1}, "ttl"),
    ("PUT", "/v1/kv/default/k?ttl=5", {"value": 1, "ttl": 5}, "ttl"),  # given twice
    ("POST", "/v1/batch", {"ops": [{"op": "put", "key": "a", "value": 1, "ttl": "10"}]},
     "ops[0].ttl"),
    ("POST", "/v1/batch", {"ops": [{"op": "get", "key": "a"},
                                   {"op": "put", "key": "a", "value": 1, "ttl": 2.5}]},
     "ops[1].ttl"),
    # unknown fields
    ("PUT", "/v1/kv/default/k", {"value": 1, "tll": 5}, "tll"),
    ("PUT", "/v1/kv/default/k", {"value": 1, "id": "t-1"}, "id"),  # a txn id, eventual keyspace
    ("DELETE", "/v1/kv/default/k", {"value": 1}, "value"),
    ("POST", "/v1/batch", {"ops": [{"op": "get", "key": "a"}], "consistency": "ONE"},
     "consistency"),
    ("POST", "/v1/batch", {"ops": [{"op": "get", "key": "a", "value": 1}]}, "ops[0].value"),
    ("POST", "/v1/batch", {"ops": [{"op": "delete", "key": "a", "ttl": 5}]}, "ops[0].ttl"),
    ("POST", "/v1/batch", {"ops": [{"op": "put", "key": "a", "value": 1, "keyspce": "x"}]},
     "ops[0].keyspce"),
    ("POST", "/v1/removenode", {"node_id": "gone", "force": True}, "force"),
]


def test_bad_ttls_and_unknown_fields_are_a_400_naming_them() -> None:
    async def scenario(client: TestClient, node: Node, clock: ManualClock) -> None:
        for method, path, body, field in BAD_BODIES:
            status, answer = await call(client, method, path, json=body)
            assert (status, _field(answer)) == (400, field), (method, path, body, answer)
        # Nothing of a refused batch ran, nor any refused put.
        status, _ = await call(client, "GET", "/v1/kv/default/a")
        assert status == 404
        status, _ = await call(client, "GET", "/v1/kv/default/k")
        assert status == 404

    serve(scenario)


def test_good_ttls_still_work_in_the_body_the_query_and_a_batch() -> None:
    async def scenario(client: TestClient, node: Node, clock: ManualClock) -> None:
        status, _ = await call(client, "PUT", "/v1/kv/default/b", json={"value": 1, "ttl": 5})
        assert status == 200
        status, _ = await call(client, "PUT", "/v1/kv/default/q?ttl=7", json={"value": 1})
        assert status == 200
        status, body = await call(client, "POST", "/v1/batch", json={"ops": [
            {"op": "put", "key": "c", "value": 1, "ttl": 9, "consistency": "ONE",
             "keyspace": "default"},
            {"op": "get", "key": "c", "consistency": "ONE"},
            {"op": "delete", "key": "zz"}]})
        assert status == 200 and all(r["ok"] for r in body["results"])
        remaining = {}
        for key in ("b", "q", "c"):
            status, body = await call(client, "GET", f"/v1/kv/default/{key}")
            assert status == 200
            remaining[key] = body["ttl_remaining_ms"]
        assert remaining == {"b": 5000, "q": 7000, "c": 9000}

    serve(scenario)


def test_the_remaining_ttl_counts_down_and_rounds_up() -> None:
    async def scenario(client: TestClient, node: Node, clock: ManualClock) -> None:
        await call(client, "PUT", "/v1/kv/default/t", json={"value": 1, "ttl": 5})
        status, body = await call(client, "GET", "/v1/kv/default/t")
        assert status == 200 and body["ttl_remaining_ms"] == 5000
        expires_at_us = body["expires_at_us"]
        clock.advance(3.9999995)  # 0.5 µs short of 4 s
        status, body = await call(client, "GET", "/v1/kv/default/t")
        assert body["ttl_remaining_ms"] == 1001 and body["expires_at_us"] == expires_at_us
        clock.advance(0.9995)
        status, body = await call(client, "GET", "/v1/kv/default/t")
        assert status == 200 and body["ttl_remaining_ms"] == 1  # live: never 0
        # No TTL: neither field.
        await call(client, "PUT", "/v1/kv/default/forever", json={"value": 1})
        status, body = await call(client, "GET", "/v1/kv/default/forever")
        assert "ttl_remaining_ms" not in body and "expires_at_us" not in body

    serve(scenario)


@pytest.mark.parametrize("method", ["PUT", "GET", "DELETE"])
@pytest.mark.parametrize("path", ["/v1/kv/default/", "/v1/kv/de%66ault/"])
def test_an_empty_key_is_a_400_naming_key_not_a_404(method: str, path: str) -> None:
    async def scenario(client: TestClient, node: Node, clock: ManualClock) -> None:
        kwargs = {"json": {"value": 1}} if method == "PUT" else {}
        status, body = await call(client, method, path, **kwargs)
        assert (status, body["error"]["code"], _field(body)) == (400, "bad_request", "key"), body
        # An unknown keyspace is still its own 404.
        status, body = await call(client, method, "/v1/kv/nosuch/", **kwargs)
        assert status == 404 and body["error"]["code"] == "not_found"

    serve(scenario)


# -- ringkv sim refuses nonsense settings -------------------------------------------------

SIM_NONSENSE = [
    (["--ops", "-5"], "--ops"),
    (["--ops", "0"], "--ops"),
    (["--clients", "0"], "--clients"),
    (["--write-fraction", "2"], "--write-fraction"),
    (["--write-fraction", "-0.1"], "--write-fraction"),
    (["--duration", "-1"], "--duration"),
    (["--duration", "0"], "--duration"),
    (["--duration", "inf"], "--duration"),
    (["--nodes", "0"], "--nodes"),
    (["--rf", "0"], "--rf"),
    (["--keys", "-3"], "--keys"),
    (["--seeds", "0"], "--seeds"),
    (["--max-skew", "-0.5"], "--max-skew"),
    (["--max-skew", "nan"], "--max-skew"),
    (["--ranges", "0"], "--ranges"),
    (["--deletes", "1.5"], "--deletes"),
    (["--gc-grace", "-1"], "--gc-grace"),
    (["--ops", "many"], "--ops"),
]


@pytest.mark.parametrize("argv,flag", SIM_NONSENSE)
def test_sim_refuses_a_nonsense_setting_naming_the_flag(argv: list[str], flag: str,
                                                       capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    from ringkv.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["sim", *argv])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}:" in err, err


def test_sim_refuses_more_replicas_than_nodes(capsys: pytest.CaptureFixture[str]) -> None:
    from ringkv.cli import main

    assert main(["sim", "--nodes", "3", "--rf", "7"]) == 2
    assert "--rf 7 is more than --nodes 3" in capsys.readouterr().err


def test_sim_takes_sensible_settings_as_before() -> None:
    from ringkv.cli import build_parser, sim_settings

    args = build_parser().parse_args(["sim", "--ops", "10", "--clients", "1", "--duration",
                                      "0.5", "--write-fraction", "0", "--deletes", "1",
                                      "--max-skew", "0", "--gc-grace", "10"])
    settings = sim_settings(args)
    assert (settings.ops, settings.clients, settings.duration_s, settings.write_fraction,
            settings.deletes, settings.max_skew_s, settings.gc_grace_s) == (
        10, 1, 0.5, 0.0, 1.0, 0.0, 10)
    defaults = sim_settings(build_parser().parse_args(["sim"]))
    assert (defaults.ops, defaults.clients, defaults.write_fraction) == (2000, 10, 0.5)
