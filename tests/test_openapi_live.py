"""A live node against its own OpenAPI document: schemathesis fuzzes every operation
that /v1/openapi.json describes and checks each answer against it.

The checks: no server error (no 5xx at all but the 503 and 504 an operation
documents: a lone node answers 503 unavailable to a level above its
replication factor, say), the status is one the operation documents, the body
conforms to that status's schema, and its Content-Type is the documented one.
Auth is off; the examples per operation and the request timeout are bounded,
so the run takes seconds (about 20 on a busy machine).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import schemathesis
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.config import SchemathesisConfig

from ringkv.config import config_from_dict
from ringkv.server.openapi import build_spec
from tests.procs import NodeProcess, http, wait_until

pytestmark = pytest.mark.cluster

MAX_EXAMPLES = 40  # per operation: about 35 operations, a few ms a request
REQUEST_TIMEOUT_S = 10
# Left out of the fuzzing (they are described all the same): decommissioning the
# node under test would end the run, and a watch that is served streams until the
# client leaves (each case would wait out the request timeout; tests/test_watch.py
# checks the watches).
NOT_FUZZED = ("decommission", "watch", "watch_keyspace")
CHECKS = [not_a_server_error, status_code_conformance, response_schema_conformance,
          content_type_conformance]


# A lone node serves both tiers at replication factor 1.
NODE_CONFIG = {"keyspaces": {
    "default": {"replication_factor": 1, "default_consistency": "ONE"},
    "txn": {"replication_factor": 1, "tier": "transactional"},
}}


@pytest.fixture(scope="module")
def live_node(tmp_path_factory: pytest.TempPathFactory):
    data_dir = tmp_path_factory.mktemp("openapi")
    config_path = data_dir / "ringkv.yaml"
    config_path.write_text(yaml.safe_dump(NODE_CONFIG))
    node = NodeProcess("openapi", data_dir, config_path=config_path)
    node.start()
    yield node
    node.stop()


def fuzz_config(base_url: str) -> SchemathesisConfig:
    return SchemathesisConfig.from_dict({
        "base-url": base_url,
        "request-timeout": REQUEST_TIMEOUT_S,
        "checks": {
            # A 5xx is a failure; 503 and 504 only where the operation documents them
            # (status_code_conformance fails an undocumented one).
            "not_a_server_error": {"expected-statuses": ["2xx", "3xx", "4xx", "503", "504"]},
        },
        "generation": {"max-examples": MAX_EXAMPLES},
    })


@pytest.fixture(scope="module")
def api_schema(live_node: NodeProcess):
    url = f"{live_node.url}/v1/openapi.json"
    return schemathesis.openapi.from_url(url, config=fuzz_config(live_node.url))


def test_the_node_serves_the_document_the_fuzzing_reads(live_node: NodeProcess) -> None:
    status, body = http("GET", f"{live_node.url}/v1/openapi.json")
    assert status == 200
    assert body == json.loads(json.dumps(build_spec(config_from_dict(NODE_CONFIG).limits)))


# One test per operation of the document (the node's is the same: the test above).
OPERATIONS = sorted(
    operation["operationId"]
    for methods in build_spec(config_from_dict(NODE_CONFIG).limits)["paths"].values()
    for operation in methods.values()
    if operation["operationId"] not in NOT_FUZZED
)


KEYSPACES = ("default", "txn")  # the node's two keyspaces, one of each tier


@pytest.fixture(scope="module")
def open_txn(live_node: NodeProcess) -> str:
    """An interactive transaction left open on the node: the transaction calls
    fuzzed with its id reach their real work (a lock, a read, a commit)."""
    def begun() -> bool:
        return http("POST", f"{live_node.url}/v1/txn/begin", {"keyspace": "txn"})[0] == 200

    # The transactional tier elects its group leaders after the node joins.
    wait_until(begun, timeout_s=30, what="the transactional tier to serve")
    status, body = http("POST", f"{live_node.url}/v1/txn/begin", {"keyspace": "txn"})
    assert status == 200, body
    return body["txn_id"]


def steered(case: Any, keyspace: str | None, txn_id: str | None) -> Any:
    """``case`` aimed at what exists on the node: random keyspaces and transaction ids
    only reach a 404, so most cases name a real one (``None``: left as generated)."""
    if keyspace is not None:
        if case.path_parameters and "keyspace" in case.path_parameters:
            case.path_parameters["keyspace"] = keyspace
        if isinstance(case.body, dict) and isinstance(case.body.get("keyspace"), str):
            case.body["keyspace"] = keyspace
        if isinstance(case.body, dict) and isinstance(case.body.get("ops"), list):
            for op in case.body["ops"]:
                if isinstance(op, dict) and "keyspace" in op:
                    op["keyspace"] = "default"
        if case.query and "keyspace" in case.query:
            case.query["keyspace"] = keyspace
    if txn_id is not None and case.path_parameters and "txn_id" in case.path_parameters:
        case.path_parameters["txn_id"] = txn_id
    return case


def cases(operation: Any, txn_id: str) -> st.SearchStrategy[Any]:
    """Valid requests and requests the document says are wrong, mostly steered."""
    generated = st.one_of(operation.as_strategy(GenerationMode.POSITIVE),
                          operation.as_strategy(GenerationMode.NEGATIVE))
    # Two in three cases name a real keyspace or transaction (a sample's first
    # choice is the one hypothesis shrinks towards: a real one).
    return st.builds(steered, generated, st.sampled_from((*KEYSPACES, *KEYSPACES, None)),
                     st.sampled_from((txn_id, txn_id, None)))


@pytest.mark.parametrize("operation_id", OPERATIONS)
def test_every_operation_answers_as_documented(api_schema, open_txn: str,
                                               operation_id: str) -> None:
    fuzz(api_schema, operation_id, open_txn, MAX_EXAMPLES)


def fuzz(schema: Any, operation_id: str, txn_id: str, examples: int) -> None:
    operation = schema.find_operation_by_id(operation_id)

    @given(cases(operation, txn_id))
    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    def answers_as_documented(case) -> None:
        case.call_and_validate(checks=CHECKS, timeout=REQUEST_TIMEOUT_S)

    answers_as_documented()


def failures(schema: Any, operation_id: str, txn_id: str, examples: int) -> list[str]:
    """The titles of the failures fuzzing ``operation_id`` finds (schemathesis
    raises them together, as an exception group)."""
    try:
        fuzz(schema, operation_id, txn_id, examples)
    except BaseExceptionGroup as exc:  # schemathesis' FailureGroup: what was found
        found: list[str] = []
        pending: list[BaseException] = [exc]
        while pending:
            error = pending.pop()
            if isinstance(error, BaseExceptionGroup):
                pending.extend(error.exceptions)
            else:
                found.append(getattr(error, "title", type(error).__name__))
        return found
    return []


def planted(live_node: NodeProcess, change: Any) -> Any:
    """The node's document with one mistake planted, to fuzz the node against."""
    document = build_spec(config_from_dict(NODE_CONFIG).limits)
    change(document)
    return schemathesis.openapi.from_dict(document, config=fuzz_config(live_node.url))


def test_the_fuzzing_catches_a_body_the_document_does_not_describe(
        live_node: NodeProcess, open_txn: str) -> None:
    def health_has_uptime(document: dict[str, Any]) -> None:
        ok = document["paths"]["/v1/health"]["get"]["responses"]["200"]
        ok["content"]["application/json"]["schema"]["required"].append("uptime_s")

    assert failures(planted(live_node, health_has_uptime), "health", open_txn, 5) == [
        "Response violates schema"]


def test_the_fuzzing_catches_an_undocumented_status(live_node: NodeProcess,
                                                    open_txn: str) -> None:
    def get_never_404s(document: dict[str, Any]) -> None:
        del document["paths"]["/v1/kv/{keyspace}/{key}"]["get"]["responses"]["404"]

    assert failures(planted(live_node, get_never_404s), "get", open_txn, 30) == [
        "Undocumented status code"]


def test_the_fuzzing_catches_a_wrong_content_type(live_node: NodeProcess,
                                                  open_txn: str) -> None:
    def metrics_as_json(document: dict[str, Any]) -> None:
        ok = document["paths"]["/metrics"]["get"]["responses"]["200"]
        ok["content"] = {"application/json": {"schema": {"type": "object"}}}

    assert failures(planted(live_node, metrics_as_json), "metrics", open_txn, 5) == [
        "Undocumented Content-Type"]


# -- what the fuzzing found, kept as plain regressions ---------------------------------


def test_a_batch_refuses_a_bad_level_even_when_every_op_names_its_own(
        live_node: NodeProcess) -> None:
    """It was ignored (200): the request's level was read only for ops without one."""
    ops = [{"op": "put", "key": "k", "value": 1, "consistency": "ONE"}]
    status, body = http("POST", f"{live_node.url}/v1/batch?consistency=%C2%9D", {"ops": ops})
    assert status == 400, body
    assert body["error"]["field"] == "consistency"
    status, body = http("POST", f"{live_node.url}/v1/batch?consistency=ANY",
                        {"ops": [{"op": "get", "key": "k"}]})
    assert (status, body["error"]["field"]) == (400, "ops[0].consistency")
    assert http("POST", f"{live_node.url}/v1/batch?consistency=ANY", {"ops": ops})[0] == 200
