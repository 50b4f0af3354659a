"""The OpenAPI document (ringkv/server/openapi.py) against the code it describes.

* it is valid OpenAPI;
* every route the aiohttp app registers is described, with its route name as the
  operationId, and nothing else is (a route added later fails here until it is);
* every error code an operation lists is one errors.py answers with that status;
* the consistency enums are exactly what the validator accepts;
* request bodies: what the validators accept the schema accepts, and what they
  refuse for a field's shape or an unknown field the schema refuses too.

Each checker is shown catching a planted mistake. The live node is fuzzed against
the document in tests/test_openapi_live.py.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
from aiohttp import web
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate
from openapi_spec_validator.validation.exceptions import OpenAPIValidationError

from ringkv.auth.permissions import parse_grant
from ringkv.clock import ManualClock
from ringkv.config import LimitsConfig, config_from_dict
from ringkv.errors import BadRequest, RingKVError, TooLarge
from ringkv.node import Node
from ringkv.quorum import ConsistencyLevel
from ringkv.server import idempotency, openapi
from ringkv.server import txn_validation as tv
from ringkv.server import validation as v
from ringkv.server.api import NODE_KEY, build_app
from ringkv.server.openapi import PATH, build_spec
from ringkv.storage.snapshot_manifest import check_name as check_snapshot_name
from tests.test_layering import FORBIDDEN_IN_PURE, imports_of, is_shell, reachable

LIMITS = LimitsConfig()
SPEC = build_spec(LIMITS)
HTTP_METHODS = ("get", "put", "post", "delete", "patch", "head", "options", "trace")


@pytest.fixture(scope="module")
def app() -> web.Application:
    node = Node(config_from_dict({"storage": {"engine": "memory"}}), clock=ManualClock(),
                standalone=True)
    return build_app(node)  # the routes only: the node is never started


# -- the document is OpenAPI --------------------------------------------------------------


def test_the_document_is_valid_openapi() -> None:
    validate(SPEC)
    validate(build_spec(LimitsConfig(max_batch_ops=7, max_scan_page=9)))


def test_the_validator_catches_a_broken_document() -> None:
    broken = copy.deepcopy(SPEC)
    del broken["paths"]["/v1/batch"]["post"]["responses"]["200"]["description"]
    with pytest.raises(OpenAPIValidationError):
        validate(broken)


def test_the_document_follows_the_limits() -> None:
    spec = build_spec(LimitsConfig(max_batch_ops=7, max_scan_page=9))
    assert spec["components"]["schemas"]["BatchBody"]["properties"]["ops"]["maxItems"] == 7
    limit = next(p for p in spec["paths"]["/v1/kv/{keyspace}"]["get"]["parameters"]
                 if p["name"] == "limit")
    assert limit["schema"]["maximum"] == 9


def test_the_idempotency_names_are_the_caches() -> None:
    assert (openapi.IDEMPOTENCY_HEADER, openapi.REPLAY_HEADER,
            openapi.MAX_IDEMPOTENCY_KEY_CHARS) == (idempotency.HEADER, idempotency.REPLAY_HEADER,
                                                   idempotency.MAX_KEY_CHARS)


def test_the_document_imports_no_io_module() -> None:
    """The module is pure (ARCHITECTURE.md): nothing it imports, at any depth, is a
    shell module or an I/O library. (server/* is the shell's by default there.)"""
    module = "server/openapi.py"
    shells = {route for target, route in reachable(module).items() if is_shell(target)}
    assert not shells
    reached = [module, *reachable(module)]
    assert not {name: imports_of(name)[0] & FORBIDDEN_IN_PURE for name in reached
                if imports_of(name)[0] & FORBIDDEN_IN_PURE}


# -- every route is described -------------------------------------------------------------


def undescribed(app: web.Application, spec: dict[str, Any]) -> list[str]:
    """What the app and the document disagree on: a route the document lacks (or names
    otherwise), or an operation no route serves."""
    problems = []
    routes = {(route.method.lower(), route.resource.canonical): route.name
              for route in app.router.routes() if route.resource is not None}
    for (method, path), name in sorted(routes.items()):
        operation = spec["paths"].get(path, {}).get(method)
        if operation is None:
            problems.append(f"{method.upper()} {path} ({name}) is not described")
        elif operation.get("operationId") != name:
            problems.append(f"{method.upper()} {path} is {name}, described as "
                            f"{operation.get('operationId')}")
    for path, methods in spec["paths"].items():
        for method in methods:
            if method in HTTP_METHODS and (method, path) not in routes:
                problems.append(f"{method.upper()} {path} is described but not served")
    return problems


def test_every_route_the_app_registers_is_described(app: web.Application) -> None:
    assert undescribed(app, SPEC) == []
    assert (("get", PATH) in {(r.method.lower(), r.resource.canonical)
                              for r in app.router.routes() if r.resource is not None})


def test_a_route_added_without_a_description_is_caught(app: web.Application) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response()

    node = app[NODE_KEY]
    planted = build_app(node)
    planted.router.add_get("/v1/new/{thing}", handler, name="new_thing", allow_head=False)
    assert undescribed(planted, SPEC) == ["GET /v1/new/{thing} (new_thing) is not described"]
    phantom = copy.deepcopy(SPEC)
    phantom["paths"]["/v1/gone"] = {"get": {"operationId": "gone", "responses": {}}}
    renamed = copy.deepcopy(SPEC)
    renamed["paths"]["/v1/ring"]["get"]["operationId"] = "rings"
    assert undescribed(app, phantom) == ["GET /v1/gone is described but not served"]
    assert undescribed(app, renamed) == ["GET /v1/ring is ring, described as rings"]


# -- errors: codes and statuses from errors.py ----------------------------------------------


def _statuses_by_code() -> dict[str, set[int]]:
    found: dict[str, set[int]] = {}
    pending: list[type[RingKVError]] = [RingKVError]
    while pending:  # every class of the tree: a subclass may keep its code, change its status
        cls = pending.pop()
        found.setdefault(cls.code, set()).add(cls.http_status)
        pending.extend(cls.__subclasses__())
    return found


def _error_codes(spec: dict[str, Any], status: str, response: dict[str, Any]) -> list[str]:
    if "$ref" in response:
        response = spec["components"]["responses"][response["$ref"].rsplit("/", 1)[1]]
    schema = response["content"]["application/json"]["schema"]
    return schema["properties"]["error"]["properties"]["code"]["enum"]


def wrong_error_codes(spec: dict[str, Any]) -> list[str]:
    """Error codes an operation lists under a status errors.py never gives them."""
    statuses = _statuses_by_code()
    problems = []
    for path, methods in spec["paths"].items():
        for method, operation in methods.items():
            errors = {s: r for s, r in operation["responses"].items() if int(s) >= 400}
            if not errors:
                problems.append(f"{method.upper()} {path} lists no errors")
            for status, response in errors.items():
                for code in _error_codes(spec, status, response):
                    if int(status) not in statuses.get(code, set()):
                        problems.append(f"{method.upper()} {path}: {code} under {status}")
    return problems


def test_every_error_code_is_listed_under_its_status() -> None:
    assert wrong_error_codes(SPEC) == []
    # The document lists the codes an operation may meet, with their statuses:
    put = SPEC["paths"]["/v1/kv/{keyspace}/{key}"]["put"]["responses"]
    assert {"400", "404", "409", "413", "503", "504"} <= set(put)
    assert "condition_failed" in _error_codes(SPEC, "409", put["409"])
    assert {"unavailable", "not_joined"} <= set(_error_codes(SPEC, "503", put["503"]))
    status = SPEC["paths"]["/v1/status"]["get"]["responses"]
    assert "not_joined" not in _error_codes(SPEC, "503", status["503"])  # served before joining


def test_a_code_under_the_wrong_status_is_caught() -> None:
    planted = copy.deepcopy(SPEC)
    name = planted["paths"]["/v1/batch"]["post"]["responses"]["400"]["$ref"].rsplit("/", 1)[1]
    response = copy.deepcopy(planted["components"]["responses"][name])
    response["content"]["application/json"]["schema"]["properties"]["error"]["properties"][
        "code"]["enum"].append("timeout")
    planted["paths"]["/v1/batch"]["post"]["responses"]["400"] = response
    assert wrong_error_codes(planted) == ["POST /v1/batch: timeout under 400"]


def test_an_error_body_the_server_sends_matches_the_error_schema() -> None:
    responses = SPEC["paths"]["/v1/kv/{keyspace}/{key}"]["put"]["responses"]
    error = BadRequest("ttl must be a whole number of seconds", field="ttl")
    assert schema_errors(_response_schema(responses["400"]), error.to_json()) == []
    too_large = TooLarge("value is 9 bytes; the limit is 8", field="value", limit=8, size=9)
    assert schema_errors(_response_schema(responses["413"]), too_large.to_json()) == []
    # ... and one under the wrong status does not.
    assert schema_errors(_response_schema(responses["400"]), too_large.to_json()) != []


# -- consistency levels -----------------------------------------------------------------------


def _enum_of(operation: dict[str, Any], name: str) -> list[str]:
    return next(p["schema"]["enum"] for p in operation["parameters"] if p["name"] == name)


def consistency_mismatches(levels: list[str], *, write: bool) -> list[str]:
    """Levels the enum lists that the validator refuses, and levels it accepts that
    the enum leaves out."""
    problems = []
    for name in levels:
        try:
            v.consistency(name, write=write)
        except BadRequest:
            problems.append(f"{name} is listed but refused")
    for level in ConsistencyLevel:
        for name in (level.value, level.value.lower()):
            try:
                v.consistency(name, write=write)
            except BadRequest:
                continue
            if name not in levels:
                problems.append(f"{name} is accepted but not listed")
    return problems


def test_the_consistency_enums_are_what_the_validator_accepts() -> None:
    key_ops = SPEC["paths"]["/v1/kv/{keyspace}/{key}"]
    for method, write in (("put", True), ("delete", True), ("get", False)):
        assert consistency_mismatches(_enum_of(key_ops[method], "consistency"),
                                      write=write) == []
    scan = SPEC["paths"]["/v1/kv/{keyspace}"]["get"]
    assert consistency_mismatches(_enum_of(scan, "consistency"), write=False) == []
    assert "ANY" not in _enum_of(key_ops["get"], "consistency")


def test_a_wrong_consistency_enum_is_caught() -> None:
    writes = _enum_of(SPEC["paths"]["/v1/kv/{keyspace}/{key}"]["put"], "consistency")
    assert consistency_mismatches(writes, write=False) == ["ANY is listed but refused",
                                                           "any is listed but refused"]
    assert consistency_mismatches([x for x in writes if x != "SERIAL"], write=True) == [
        "SERIAL is accepted but not listed"]


# -- request bodies: the schemas against the validators ---------------------------------------


def _response_schema(response: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in response:
        response = SPEC["components"]["responses"][response["$ref"].rsplit("/", 1)[1]]
    return response["content"]["application/json"]["schema"]


def schema_errors(schema: dict[str, Any], document: Any) -> list[str]:
    rooted = {**schema, "components": SPEC["components"]}  # "#/components/..." resolves here
    return [error.message for error in Draft202012Validator(rooted).iter_errors(document)]


def _named(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _accepts(parse: Any, body: Any) -> bool:
    try:
        parse(body)
    except (BadRequest, TooLarge):
        return False
    return True


TXN_BODIES: list[tuple[Any, bool]] = [  # (body, the server accepts it)
    ({"keyspace": "txn", "writes": [{"op": "put", "key": "a", "value": {"x": [1]}}]}, True),
    ({"keyspace": "txn", "id": "t-1", "reads": ["a", "b"],
      "conditions": [{"key": "a", "absent": True}, {"key": "b", "version": 7},
                     {"key": "c", "equals": None}],
      "writes": [{"op": "delete", "key": "b"}]}, True),
    ({"keyspace": "txn", "reads": ["a"], "extra": 1}, False),
    ({"keyspace": "", "reads": ["a"]}, False),
    ({"reads": ["a"]}, False),
    ({"keyspace": "txn", "id": "not an id!", "reads": ["a"]}, False),
    ({"keyspace": "txn", "reads": [""]}, False),
    ({"keyspace": "txn", "reads": "a"}, False),
    ({"keyspace": "txn", "writes": [{"op": "delete", "key": "a", "value": 1}]}, False),
    ({"keyspace": "txn", "writes": [{"op": "put", "key": "a"}]}, False),
    ({"keyspace": "txn", "writes": [{"op": "upsert", "key": "a", "value": 1}]}, False),
    ({"keyspace": "txn", "writes": [{"op": "put", "key": "a", "value": 1, "ttl": 3}]}, False),
    ({"keyspace": "txn", "conditions": [{"key": "a", "absent": True, "version": 1}]}, False),
    ({"keyspace": "txn", "conditions": [{"key": "a", "version": -1}]}, False),
    ({"keyspace": "txn", "conditions": [{"key": "a", "absent": False}]}, False),
    ({"keyspace": "txn", "conditions": [{"key": "a", "newer": 1}]}, False),
    ({"keyspace": "txn", "conditions": [{"absent": True}]}, False),
    ([], False),
]
BEGIN_BODIES: list[tuple[Any, bool]] = [
    ({}, True),
    ({"keyspace": "txn", "read_only": True, "priority": 12}, True),
    ({"read_only": 1}, False),
    ({"priority": -1}, False),
    ({"priority": True}, False),
    ({"keyspace": ""}, False),
    ({"timeout": 5}, False),
    ("begin", False),
]
CONDITIONS: list[tuple[Any, bool]] = [
    ({"version": 0}, True), ({"absent": True}, True), ({"equals": [1, "x"]}, True),
    ({}, False), ({"version": 1.5}, False), ({"absent": 1}, False),
    ({"version": 1, "equals": 1}, False), ({"exists": True}, False),
]


GRANTS: list[tuple[Any, bool]] = [
    ({"permission": "read", "keyspace": "orders"}, True),
    ({"permission": "admin"}, True),
    ({"permission": "admin", "keyspace": None, "note": "extra fields are ignored"}, True),
    ({"permission": "write"}, False),
    ({"permission": "write", "keyspace": None}, False),
    ({"permission": "read", "keyspace": "system_auth"}, False),
    ({"permission": "read", "keyspace": "not a name"}, False),
    ({"permission": "own", "keyspace": "orders"}, False),
    ({"keyspace": "orders"}, False),
]


def body_mismatches(schema_name: str, parse: Any, cases: list[tuple[Any, bool]]) -> list[str]:
    """Bodies where the schema and the validator disagree, or the table is wrong."""
    problems = []
    for body, accepted in cases:
        server = _accepts(parse, body)
        schema = not schema_errors(_named(schema_name), body)
        if server != accepted:
            problems.append(f"the server {'accepts' if server else 'refuses'} {body!r}")
        if schema != server:
            problems.append(f"{schema_name} {'accepts' if schema else 'refuses'} {body!r}; "
                            f"the server {'accepts' if server else 'refuses'} it")
    return problems


def test_the_transaction_body_schema_agrees_with_the_validator() -> None:
    assert body_mismatches("TxnBody", lambda b: tv.parse_txn(b, LIMITS), TXN_BODIES) == []


def test_the_begin_body_schema_agrees_with_the_validator() -> None:
    assert body_mismatches("BeginBody", tv.parse_begin, BEGIN_BODIES) == []


def test_the_grant_schema_agrees_with_the_validator() -> None:
    def parse(body: Any) -> str:
        return parse_grant(body.get("permission"), body.get("keyspace"))

    assert body_mismatches("Grant", parse, GRANTS) == []


SNAPSHOT_NAMES: list[tuple[Any, bool]] = [
    ("nightly-2026.12.01", True), ("0", True), ("x" * 64, True),
    ("", False), ("x" * 65, False), ("-leading-dash", False), (".hidden", False),
    ("a/b", False), ("with space", False), (7, False),
]


def test_the_snapshot_name_schema_agrees_with_the_validator() -> None:
    assert body_mismatches("SnapshotName", check_snapshot_name, SNAPSHOT_NAMES) == []


def test_the_condition_schema_agrees_with_the_validator() -> None:
    put_if = SPEC["components"]["schemas"]["PutBody"]["properties"]["if"]
    SPEC["components"]["schemas"]["_If"] = put_if
    try:
        assert body_mismatches(
            "_If", lambda c: tv.parse_condition(c, b"k", LIMITS, field="if"), CONDITIONS) == []
    finally:
        del SPEC["components"]["schemas"]["_If"]


def test_a_schema_that_drifted_from_the_validator_is_caught() -> None:
    begin = SPEC["components"]["schemas"]["BeginBody"]
    saved = copy.deepcopy(begin)
    begin["additionalProperties"] = True  # planted: the server refuses unknown fields
    try:
        assert body_mismatches("BeginBody", tv.parse_begin, BEGIN_BODIES) == [
            "BeginBody accepts {'timeout': 5}; the server refuses it"]
    finally:
        SPEC["components"]["schemas"]["BeginBody"] = saved
