"""Interactive transactions in the Python client (``client.transaction``, ``run_transaction``).

The first part steps the plans by hand (no socket, no loop): every call of a
transaction goes to the node that began it, whatever the key; a commit whose
answer was lost is sent again to that node only, under the same idempotency
key, so it runs at most once; which aborts ``run_transaction`` reruns. The
second part runs both clients, over the native protocol and over HTTP,
against one in-process node with a transactional keyspace in four ranges:
commit on a clean exit, abort on an exception, reads of its own writes, a
read-only snapshot, and a rerun proven by a conflict the test provokes (an
older transaction wounds the first attempt, and the rerun keeps the first
attempt's priority).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from ringkv.client import AsyncClient, Client
from ringkv.client.aio import AsyncTransaction
from ringkv.client.blocking import Transaction
from ringkv.client.plan import Failure, Reply, Send
from ringkv.client.transaction import RERUN_REASONS, TxnCore, rerun_pause_s
from ringkv.client.types import TxnCommit
from ringkv.config import config_from_dict
from ringkv.errors import Aborted, NoLeader, NoNodeAvailable, NotFound, Timeout
from ringkv.server.native import _ROUTES as native_routes
from ringkv.txn.sessions import RETRYABLE_REASONS
from tests.test_client import InProcessNode
from tests.test_client_txn import finish, make_ops, start

# -- the plans, by hand ---------------------------------------------------------------

BEGUN = {"ok": True, "txn_id": "n2:7:0000beef", "keyspace": "txn", "read_only": False,
         "priority": 1_700_000, "idle_timeout_s": 30.0, "max_duration_s": 60.0,
         "node_id": "n2"}


def begun_core() -> tuple[TxnCore, Any]:
    ops, _ = make_ops()
    core = TxnCore(ops, "txn")
    plan = core.begin()
    send = start(plan)
    assert (send.method, send.url.split("/v1/")[1]) == ("POST", "txn/begin")
    assert json.loads(send.body or b"") == {"keyspace": "txn"}
    url = send.url.split("/v1/")[0]
    handle = finish(plan, Reply(200, json.dumps(BEGUN).encode(), {}))
    assert handle.url == url and handle.id == BEGUN["txn_id"] and core.priority == 1_700_000
    return core, ops


def test_every_call_goes_to_the_node_that_began_it() -> None:
    core, _ = begun_core()
    url = core.handle.url
    for key in ("a", "b", "c", "d", "e"):
        plan = core.write(key, {"k": key})
        send = next(plan)
        assert send.url == f"{url}/v1/txn/n2%3A7%3A0000beef/kv/txn/{key}", send
        assert json.loads(send.body or b"") == {"value": {"k": key}}
        finish(plan, Reply(200, b'{"ok":true}', {}))
    plan = core.get("a")
    send = next(plan)
    assert send.method == "GET" and send.url.startswith(url)
    got = finish(plan, Reply(200, b'{"id":"x","key":"a","version":null,"own_write":true,'
                                  b'"value":{"k":"a"}}', {}))
    assert (got.value, got.version) == ({"k": "a"}, None)
    plan = core.get("zz")
    next(plan)
    absent = json.dumps({"error": {"code": "not_found", "message": "m", "id": "x",
                                   "found": False, "ended": None}}).encode()
    assert finish(plan, Reply(404, absent, {})) is None


def test_a_lost_commit_answer_is_sent_again_to_that_node_only_under_its_key() -> None:
    core, _ = begun_core()
    url = core.handle.url
    plan = core.commit()
    first = next(plan)
    assert first.url == f"{url}/v1/txn/n2%3A7%3A0000beef/commit"
    key = first.headers["Idempotency-Key"]
    pause = plan.send(Failure("timeout", "no answer"))
    again = plan.send(None) if not isinstance(pause, Send) else pause
    assert isinstance(again, Send) and again.url == first.url
    assert again.headers["Idempotency-Key"] == key  # the node replays the first answer
    done = finish(plan, Reply(200, b'{"ok":true,"id":"n2:7:0000beef","committed":true,'
                                   b'"commit_ts":99,"receipt":{}}', {}))
    assert done == TxnCommit("n2:7:0000beef", True, 99, None, {})
    assert core.ended == "committed"


def test_a_commit_whose_node_is_gone_is_never_sent_elsewhere() -> None:
    core, _ = begun_core()
    plan = core.commit()
    first = next(plan)
    with pytest.raises(NoNodeAvailable) as lost:
        outcome: Any = Failure("connect", "refused")
        while True:
            effect = plan.send(outcome)
            assert not isinstance(effect, Send) or effect.url == first.url
            outcome = Failure("connect", "refused") if isinstance(effect, Send) else None
    assert lost.value.tried == [core.handle.url]


def test_without_a_keyspace_the_node_chooses_unless_the_clients_is_transactional() -> None:
    ops, _ = make_ops()  # the client's keyspace "txn" is transactional in the ring
    send = start(ops.txn_begin())
    assert json.loads(send.body or b"") == {"keyspace": "txn"}
    ops, _ = make_ops()
    ops.keyspace = "default"  # eventual: the node picks its one transactional keyspace
    send = start(ops.txn_begin(read_only=True))
    assert json.loads(send.body or b"") == {"read_only": True}


def test_an_error_the_node_answered_is_raised_not_sent_again() -> None:
    """The node's session acted on the call (a 503 there ended the transaction): sending
    it again would only hide why."""
    core, _ = begun_core()
    plan = core.write("a", 1)
    next(plan)
    no_leader = json.dumps({"error": {"code": "no_leader", "message": "m", "id": "x",
                                      "ended": "failed"}}).encode()
    with pytest.raises(NoLeader):
        plan.send(Reply(503, no_leader, {}))
    assert core.ended == "failed"


def test_a_repeated_commit_the_node_no_longer_remembers_is_still_a_commit() -> None:
    core, _ = begun_core()
    plan = core.commit()
    next(plan)
    committed = json.dumps({"error": {"code": "aborted", "message": "m", "id": "x",
                                      "reason": "committed", "ended": "committed"}}).encode()
    done = finish(plan, Reply(409, committed, {}))
    assert done.committed and done.commit_ts is None and core.ended == "committed"


def test_which_aborts_are_rerun() -> None:
    ops, _ = make_ops()
    assert RERUN_REASONS == RETRYABLE_REASONS  # the node's list
    for reason in ("wounded", "leader_changed", "aborted"):
        assert rerun_pause_s(ops, Aborted("x", reason=reason), 0, 3) is not None
        assert rerun_pause_s(ops, Aborted("x", reason=reason), 3, 3) is None
    for reason in ("committed", "unknown", "client", "timeout", "idle", "in_progress", None):
        assert rerun_pause_s(ops, Aborted("x", reason=reason), 0, 3) is None
    unknown = Timeout("outcome unknown", consistency="SERIAL", required=1, received=0,
                      write=True)
    assert rerun_pause_s(ops, unknown, 0, 3) is None
    gone = NoNodeAvailable("gone", tried=[], reasons=[], maybe_applied=True)
    assert rerun_pause_s(ops, gone, 0, 3) is None
    assert rerun_pause_s(ops, NotFound("x"), 0, 3) is None


def test_an_ended_transaction_refuses_further_calls_here() -> None:
    core, _ = begun_core()
    plan = core.write("a", 1)
    next(plan)
    wounded = json.dumps({"error": {"code": "aborted", "message": "wounded", "id": "x",
                                    "reason": "wounded", "ended": "wounded"}}).encode()
    with pytest.raises(Aborted):
        plan.send(Reply(409, wounded, {}))
    assert core.ended == "wounded"
    with pytest.raises(Aborted) as refused:
        next(core.get("a"))
    assert refused.value.details["reason"] == "wounded"
    # Leaving the block after that sends nothing: nothing is held at the node.
    with pytest.raises(StopIteration):
        next(core.leave(failed=True))


# -- both clients against a node ----------------------------------------------------------


class TxnNode(InProcessNode):
    """A standalone node with a transactional keyspace ``bank`` in four ranges."""

    def __init__(self, *, native: bool) -> None:
        super().__init__(native=native)
        self.config = config_from_dict({
            "cluster": {"client_port": self.port},
            "storage": {"engine": "memory"},
            "keyspaces": {
                "default": {"replication_factor": 1, "default_consistency": "ONE"},
                "bank": {"replication_factor": 1, "tier": "transactional", "ranges": 4},
            },
        })


@pytest.fixture(params=["native", "http"])
def node(request: pytest.FixtureRequest) -> Iterator[TxnNode]:
    with TxnNode(native=request.param == "native") as served:
        yield served


def client(node: TxnNode) -> Client:
    return Client([node.url], keyspace="bank", timeout_s=5.0,
                  protocol="native" if node.native_port else "http")


def test_commit_on_exit_abort_on_exception_and_own_writes(
        node: TxnNode, monkeypatch: pytest.MonkeyPatch) -> None:
    native_calls: list[str] = []
    for verb in ("txn_begin", "txn_get", "txn_put", "txn_delete", "txn_commit", "txn_abort"):
        def counted(call: Any, verb: str = verb, run: Any = native_routes[verb]) -> Any:
            native_calls.append(verb)
            return run(call)
        monkeypatch.setitem(native_routes, verb, counted)
    with client(node) as kv:
        kv.put("a", 100)
        with kv.transaction() as tx:
            assert tx.handle is not None and tx.handle.node_id == node.node.node_id
            assert tx.get("a") == 100
            tx.put("a", 60)
            tx.put("b", 40)
            tx.delete("gone")
            assert tx.get("a") == 60 and tx.get("gone") is None
            assert kv.get_versioned("b", snapshot_ts=10**6) is None  # not committed yet
        assert tx.outcome is not None and tx.outcome.committed
        # Over the native protocol when the client speaks it, else over HTTP.
        assert native_calls == (["txn_begin", "txn_get", "txn_put", "txn_put", "txn_delete",
                                 "txn_get", "txn_get", "txn_commit"] if node.native else [])
        a, b = kv.get_versioned("a"), kv.get_versioned("b")
        assert a is not None and b is not None
        assert (a.value, b.value) == (60, 40)
        assert a.version == b.version == tx.outcome.commit_ts

        with pytest.raises(ZeroDivisionError), kv.transaction("bank") as failed:
            failed.put("a", 0)
            raise ZeroDivisionError("the block fails")
        assert kv.get("a") == 60
        # The abort released its lock: a single-key write goes through at once.
        kv.put("a", 61)
        assert kv.get("a") == 61
        with kv.transaction("bank") as odd:
            odd.put("a/b.c", "slash")
            assert odd.get("a/b.c") == "slash"
        assert kv.get("a/b.c") == "slash"
        # It is over: the client refuses its calls, naming it and why it ended.
        with pytest.raises(Aborted) as over:
            failed.get("a")
        assert (over.value.details["id"], over.value.details["reason"]) == (failed.id, "client")


def test_a_client_on_an_eventual_keyspace_begins_on_the_transactional_one(
        node: TxnNode) -> None:
    with Client([node.url], timeout_s=5.0) as kv, kv.transaction() as tx:
        tx.put("k", 1)
    assert tx.handle is not None and tx.handle.keyspace == "bank"
    assert tx.outcome is not None and tx.outcome.committed


def test_read_only_transaction_sees_one_snapshot(node: TxnNode) -> None:
    with client(node) as kv:
        kv.txn(writes=[{"op": "put", "key": "x", "value": 5}, {"op": "put", "key": "y", "value": 5}])
        with kv.transaction("bank", read_only=True) as tx:
            assert tx.handle is not None and tx.handle.read_ts
            assert tx.get("x") == 5
            kv.txn(writes=[{"op": "put", "key": "x", "value": 1},
                           {"op": "put", "key": "y", "value": 9}])
            assert tx.get("y") == 5  # as of its snapshot, not the transfer after it
            with pytest.raises(Aborted) as refused:
                tx.put("x", 0)
            assert refused.value.details["reason"] == "read_only"
            assert refused.value.details["id"] == tx.id
        assert tx.outcome is not None and tx.outcome.read_ts == tx.handle.read_ts


def test_run_transaction_reruns_a_wounded_attempt_with_its_first_priority(node: TxnNode) -> None:
    with client(node) as kv:
        kv.put("acct", 10)
        older = kv.transaction("bank")
        older.begin()  # older than every attempt below: it wins their conflicts
        attempts: list[Transaction] = []

        def add_one(tx: Transaction) -> int:
            attempts.append(tx)
            value = int(tx.get("acct"))
            tx.put("acct", value + 1)
            if len(attempts) == 1:
                # The older transaction takes the key from this attempt (wound-wait)
                # and commits first.
                older.put("acct", 100)
                older.commit()
            return value + 1

        assert kv.run_transaction(add_one, keyspace="bank", max_retries=3) == 101
        assert kv.get("acct") == 101
        assert len(attempts) == 2
        first, rerun = attempts
        assert first.id != rerun.id and rerun.outcome is not None
        assert first.priority == rerun.priority  # the rerun kept its age

        def always_loses(tx: Transaction) -> None:
            fresh = kv.transaction("bank", priority=0)  # older than anything
            tx.put("acct", -1)
            fresh.put("acct", 7)
            fresh.commit()

        with pytest.raises(Aborted) as gave_up:
            kv.run_transaction(always_loses, keyspace="bank", max_retries=1)
        assert gave_up.value.details["reason"] in RERUN_REASONS
        assert kv.get("acct") == 7


def test_the_async_client_does_the_same(node: TxnNode) -> None:
    async def scenario() -> None:
        async with AsyncClient([node.url], keyspace="bank", timeout_s=5.0,
                               protocol="native" if node.native_port else "http") as kv:
            async with kv.transaction("bank") as tx:
                await tx.put("p", 1)
                await tx.put("q", 2)
                assert await tx.get("p") == 1
            assert tx.outcome is not None and tx.outcome.committed
            assert await kv.get("q") == 2
            with pytest.raises(KeyError):
                async with kv.transaction("bank") as failed:
                    await failed.put("p", 0)
                    raise KeyError("no")
            assert await kv.get("p") == 1
            older = kv.transaction("bank")
            await older.begin()
            attempts: list[AsyncTransaction] = []

            async def add_one(tx: AsyncTransaction) -> None:
                attempts.append(tx)
                await tx.put("p", int(await tx.get("p")) + 1)
                if len(attempts) == 1:
                    await older.put("p", 10)
                    await older.commit()

            await kv.run_transaction(add_one, keyspace="bank")
            assert await kv.get("p") == 11 and len(attempts) == 2
            assert attempts[0].priority == attempts[1].priority
            async with kv.transaction("bank", read_only=True) as snap:
                assert await snap.get("p") == 11

    node.run(scenario())
