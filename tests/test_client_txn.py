"""The client's transactional plans, stepped by hand: no socket, no loop.

Checked: a conditional put carries its condition and a client-made
transaction id; a conflict abort (409 ``aborted``) is sent again under the
same id, within ``txn_retries``; a failed condition (409
``condition_failed``) is not retried: once the id's outcome shows it did not
commit, it is raised with the current value and version;
a lost answer is sent again through another node under the same id (the
leader runs an id at most once: Spanner §4.2.1, work at the group leader);
the leader named by a receipt is tried first next time.
"""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from ringkv.client.errors import InvalidArgument
from ringkv.client.operations import Operations
from ringkv.client.plan import Failure, Plan, Reply, Send, Sleep
from ringkv.client.types import TxnResult, TxnStatus, Versioned, WriteResult
from ringkv.clock import ManualClock
from ringkv.errors import Aborted, ConditionFailed, RingKVError
from ringkv.hlc import Timestamp

URLS = {"n0": "http://127.0.0.1:7400", "n1": "http://127.0.0.1:7401", "n2": "http://127.0.0.1:7402"}


def ring_body() -> bytes:
    nodes = [{"node_id": node_id, "client_address": url.removeprefix("http://"),
              "tokens": [(i - 1) * 4 * 10**18], "up": True}
             for i, (node_id, url) in enumerate(URLS.items())]
    keyspaces = {"default": {"replication_factor": 1, "default_consistency": "ONE"},
                 "txn": {"replication_factor": 3, "default_consistency": "SERIAL"}}
    return json.dumps({"nodes": nodes, "keyspaces": keyspaces}).encode()


class NoLock:
    def acquire(self, blocking: bool = True) -> bool:
        return True

    def release(self) -> None:
        pass


def make_ops(**options: Any) -> tuple[Operations, ManualClock]:
    clock = ManualClock(monotonic_s=10.0)
    ids = iter(f"id-{i}" for i in range(100))
    ops = Operations(["http://127.0.0.1:7400"], clock=clock, rng=random.Random(5),
                     refresh_lock=NoLock(), new_idempotency_key=lambda: next(ids),
                     keyspace="txn", **options)
    return ops, clock


def error(code: str, **details: Any) -> bytes:
    return json.dumps({"error": {"code": code, "message": code, **details}}).encode()


def start(plan: Plan[Any]) -> Send:
    """Answer the ring fetch; return the plan's first request."""
    fetch = next(plan)
    assert isinstance(fetch, Send) and fetch.url.endswith("/v1/ring")
    first = plan.send(Reply(200, ring_body(), {}))
    assert isinstance(first, Send)
    return first


def finish(plan: Plan[Any], outcome: Reply) -> Any:
    with pytest.raises(StopIteration) as done:
        plan.send(outcome)
    return done.value.value


COMMITTED = {"ok": True, "id": "id-0", "version": 1_000_123, "commit_ts": 1_000_123,
             "receipt": {"leader": "n2", "commit_ts": 1_000_123, "commit_wait_ms": 1.2}}


def test_a_conflict_abort_is_sent_again_under_the_same_id() -> None:
    ops, clock = make_ops()
    plan = ops.put("k", 7, if_version=5)
    first = start(plan)
    body = json.loads(first.body or b"")
    assert body == {"value": 7, "if": {"version": 5}, "id": "id-0"}
    assert "consistency" not in first.url  # SERIAL only: no level is sent
    pause = plan.send(Reply(409, error("aborted", reason="conflict", id="id-0"), {}))
    assert isinstance(pause, Sleep)
    clock.advance(pause.seconds)
    again = plan.send(None)
    assert isinstance(again, Send) and json.loads(again.body or b"")["id"] == "id-0"
    result = finish(plan, Reply(200, json.dumps(COMMITTED).encode(), {}))
    assert result == WriteResult(Timestamp(1_000_123, 0), COMMITTED["receipt"], replayed=False,
                                 version=1_000_123, txn_id="id-0")


def test_conflict_aborts_stop_after_txn_retries() -> None:
    ops, clock = make_ops(txn_retries=2)
    plan = ops.txn(writes=[{"op": "put", "key": "a", "value": 1}])
    sent = start(plan)
    attempts = 1
    with pytest.raises(Aborted):
        while True:
            effect = plan.send(Reply(409, error("aborted", reason="conflict"), {}))
            assert isinstance(effect, Sleep)
            effect = plan.send(None)
            assert isinstance(effect, Send) and effect.body == sent.body
            attempts += 1
    assert attempts == 3  # the first and two retries


def test_a_failed_condition_is_not_retried_and_carries_the_current_value() -> None:
    ops, _ = make_ops()
    plan = ops.put("k", 2, if_equals=None)
    first = start(plan)
    assert json.loads(first.body or b"")["if"] == {"equals": None}  # null is a value to compare
    ask = plan.send(Reply(409, error("condition_failed", key="k", current_value=1,
                                     current_version=99, field="conditions[0]"), {}))
    # The id's outcome first: a forwarding node may have run an earlier attempt.
    assert isinstance(ask, Send) and ask.method == "GET" and "/v1/txn/id-0?" in ask.url
    with pytest.raises(ConditionFailed) as failed:
        plan.send(Reply(404, error("not_found", status="not_committed", definitive=True), {}))
    assert (failed.value.current_value, failed.value.current_version) == (1, 99)


def test_a_lost_answer_is_sent_again_through_another_node_under_the_same_id() -> None:
    ops, clock = make_ops()
    plan = ops.put("k", 1, if_absent=True, txn_id="mine")
    first = start(plan)
    pause = plan.send(Failure("timeout", "no answer"))
    assert isinstance(pause, Sleep)
    again = plan.send(None)
    assert isinstance(again, Send) and again.body == first.body
    assert again.url != first.url  # any node: the leader de-duplicates by id
    replay = {"ok": True, "id": "mine", "version": 42, "commit_ts": 42, "receipt": None}
    result = finish(plan, Reply(200, json.dumps(replay).encode(), {}))
    assert (result.version, result.replayed, result.txn_id) == (42, True, "mine")


def test_the_leader_named_by_a_receipt_is_tried_first() -> None:
    ops, _ = make_ops()
    plan = ops.put("k", 1)  # the ring shows txn as SERIAL: a transaction with an id
    start(plan)
    finish(plan, Reply(200, json.dumps(COMMITTED).encode(), {}))
    for _ in range(5):
        plan = ops.delete("k", if_version=1)
        first = next(plan)
        assert isinstance(first, Send) and first.url.startswith(URLS["n2"])
        plan.close()


def test_txn_decodes_reads_and_status() -> None:
    ops, _ = make_ops()
    plan = ops.txn(reads=["a", "b"], conditions=[{"key": "a", "version": 3}],
                   writes=[{"key": "c", "value": [1]}, {"op": "delete", "key": "d"}])
    first = start(plan)
    assert first.url.endswith("/v1/txn")
    assert json.loads(first.body or b"") == {
        "keyspace": "txn", "id": "id-0", "reads": ["a", "b"],
        "conditions": [{"key": "a", "version": 3}],
        "writes": [{"op": "put", "key": "c", "value": [1]}, {"op": "delete", "key": "d"}]}
    answer = {"ok": True, "id": "id-0", "committed": True, "commit_ts": 50,
              "reads": [{"key": "a", "found": True, "value": "x", "version": 3},
                        {"key": "b", "found": False, "value": None, "version": None}],
              "receipt": {"leader": "n1", "commit_ts": 50}}
    result = finish(plan, Reply(200, json.dumps(answer).encode(), {}))
    assert result == TxnResult("id-0", True, 50, {"a": Versioned("a", "x", 3), "b": None},
                               answer["receipt"])
    status = ops.txn_status("id-0", key="a")
    sent = next(status)
    assert isinstance(sent, Send) and "/v1/txn/id-0?keyspace=txn&key=a" in sent.url
    gone = finish(status, Reply(404, error("not_found", status="not_committed",
                                           definitive=False), {}))
    assert gone == TxnStatus("id-0", "not_committed", definitive=False)


def test_a_replayed_answer_is_known_by_its_flag_whatever_its_receipt() -> None:
    """An answer replayed for an id that already committed carries no reads; a recipe that
    judged who is live by them would see nobody (a lock held twice). The node flags it;
    a node of an older release only left the receipt out."""
    for answer in ({"ok": True, "id": "id-0", "committed": True, "commit_ts": 9, "reads": [],
                    "receipt": {"txn_id": "id-0"}, "replayed": True},
                   {"ok": True, "id": "id-0", "committed": True, "commit_ts": 9, "reads": [],
                    "receipt": None}):
        ops, _ = make_ops()
        plan = ops.txn(reads=["a"], writes=[{"key": "c", "value": 1}])
        start(plan)
        result = finish(plan, Reply(200, json.dumps(answer).encode(), {}))
        assert result.replayed and result.reads == {}, answer
    ops, _ = make_ops()
    plan = ops.txn(reads=["a"], writes=[{"key": "c", "value": 1}])
    start(plan)
    fresh = {"ok": True, "id": "id-0", "committed": True, "commit_ts": 9,
             "reads": [{"key": "a", "found": False, "value": None, "version": None}],
             "receipt": {"leader": "n1"}}
    assert not finish(plan, Reply(200, json.dumps(fresh).encode(), {})).replayed


@pytest.mark.parametrize("call, field", [
    (lambda ops: ops.put("k", 1, if_version=1, if_absent=True), "if_version"),
    (lambda ops: ops.put("k", 1, if_version=-1), "if_version"),
    (lambda ops: ops.put("k", 1, if_equals=float("nan")), "if_equals"),
    (lambda ops: ops.put("k", 1, txn_id="has space"), "txn_id"),
    (lambda ops: ops.put("k", 1, ttl=5, if_absent=True), "ttl"),
    (lambda ops: ops.txn(), "body"),
    (lambda ops: ops.txn(reads="ab"), "reads"),
    (lambda ops: ops.txn(writes=[{"op": "put", "key": "a"}]), "writes[0].value"),
    (lambda ops: ops.txn(conditions=[{"key": "a"}]), "conditions[0]"),
])
def test_bad_input_is_refused_before_sending(call: Any, field: str) -> None:
    ops, _ = make_ops()
    # The client's own refusal, kept apart from a node's answer (ringkv.client.errors).
    with pytest.raises(InvalidArgument) as bad:
        next(call(ops))
    assert bad.value.field == field
    assert not isinstance(bad.value, RingKVError)


def test_a_failed_condition_after_a_lost_answer_is_settled_by_the_id() -> None:
    """The lost attempt may have committed, and a new leader that had not yet
    applied it ran the id again: its condition then fails because of that very
    commit. The id's outcome (GET /v1/txn/{id}) decides."""
    ops, _ = make_ops()
    plan = ops.put("k", 2, if_version=1, txn_id="cas-1")
    start(plan)
    assert isinstance(plan.send(Failure("timeout", "no answer")), Sleep)
    retry = plan.send(None)
    assert isinstance(retry, Send)
    ask = plan.send(Reply(409, error("condition_failed", current_value=2, current_version=7,
                                     key="k", id="cas-1"), {}))
    assert isinstance(ask, Send) and "/v1/txn/cas-1?keyspace=txn&key=k" in ask.url
    committed = {"id": "cas-1", "status": "committed", "commit_ts": 7, "range": "txn/0"}
    result = finish(plan, Reply(200, json.dumps(committed).encode(), {}))
    assert (result.version, result.replayed, result.txn_id) == (7, True, "cas-1")

    plan = ops.put("k", 2, if_version=1, txn_id="cas-2")
    next(plan)
    assert isinstance(plan.send(Failure("io", "reset")), Sleep)
    plan.send(None)
    plan.send(Reply(409, error("condition_failed", current_value=5, current_version=9), {}))
    with pytest.raises(ConditionFailed):  # not committed: the condition failed for real
        plan.send(Reply(404, error("not_found", status="not_committed", definitive=True), {}))


def test_a_txn_id_on_an_eventual_keyspace_still_returns_its_write() -> None:
    ops, _ = make_ops()
    plan = ops.put("k", 1, keyspace="default", txn_id="t-1")
    start(plan)
    answer = {"ok": True, "timestamp": [5, 1], "receipt": {"answered": ["n0"]}}
    result = finish(plan, Reply(200, json.dumps(answer).encode(), {}))
    assert result == WriteResult(Timestamp(5, 1), {"answered": ["n0"]})
