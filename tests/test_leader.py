"""The leader's transaction manager and routing (ringkv/txn/leader.py), table-driven.

Checked: locks are taken in key order, exclusive for writes and shared for
reads (Spanner §4.2.1, two-phase locking at the leader); an older
transaction wounds a younger one that holds what it needs, a younger one
waits (wound-wait, Spanner §4.2.1), and one that is committing can no longer
be wounded; a wounded transaction is retried within a bound; conditions are
tested before any write (issue #11 §6, compare-and-set); routing serves at
the leader, forwards to it, waits for an election, serves snapshot reads at
any replica whose safe time has passed (Spanner §4.1.3), and refuses a range
whose persisted group differs from the ring's.
"""

from __future__ import annotations

import json

import pytest

from ringkv.txn.leader import (
    COMMIT,
    CONDITION_FAILED,
    READ_ONLY,
    Current,
    Retries,
    Route,
    TxnManager,
    evaluate,
    lock_plan,
    route,
)
from ringkv.txn.locks import Mode
from ringkv.txn.requests import Condition, TxnRequest, Write, comparable_json

S, X = Mode.SHARED, Mode.EXCLUSIVE


def test_lock_plan_orders_keys_and_takes_the_strongest_mode():
    assert lock_plan([b"b", b"a"], [b"b", b"c"]) == [(b"a", S), (b"b", X), (b"c", X)]
    assert lock_plan([], []) == []


# (name, steps, expected ready/wounded after each step). Priorities: smaller is older.
OLD, YOUNG = (1, "old"), (2, "young")
CASES = [
    ("disjoint keys: both ready",
     [("begin", "old", OLD, [(b"a", X)]), ("begin", "young", YOUNG, [(b"b", X)])],
     [(("old",), ()), (("young",), ())]),
    ("shared readers do not conflict",
     [("begin", "old", OLD, [(b"a", S)]), ("begin", "young", YOUNG, [(b"a", S)])],
     [(("old",), ()), (("young",), ())]),
    ("younger waits for an older holder, then gets the lock when it finishes",
     [("begin", "old", OLD, [(b"a", X)]), ("begin", "young", YOUNG, [(b"a", X)]),
      ("finish", "old")],
     [(("old",), ()), ((), ()), (("young",), ())]),
    ("older wounds a younger holder that is still locking",
     [("begin", "blocker", (0, "blocker"), [(b"b", X)]),
      ("begin", "young", YOUNG, [(b"a", X), (b"b", X)]),
      ("begin", "old", OLD, [(b"a", X)])],
     [(("blocker",), ()), ((), ()), ((), ("young",))]),
]


@pytest.mark.parametrize("name,steps,expected", CASES, ids=[c[0] for c in CASES])
def test_wound_wait_table(name, steps, expected):
    manager = TxnManager()
    for step, (ready, wounded) in zip(steps, expected):
        if step[0] == "begin":
            _, txn, prio, plan = step
            got = manager.begin(txn, prio, plan)
        else:
            got = manager.finish(step[1])
        assert (set(got.ready), set(got.wounded)) == (set(ready), set(wounded)), (name, step)


def test_committing_transaction_is_not_wounded():
    manager = TxnManager()
    assert manager.begin("young", YOUNG, [(b"a", X)]).ready == ("young",)
    manager.start_commit("young")
    step = manager.begin("old", OLD, [(b"a", X)])
    assert step == ((), ())  # the older one waits for the committing younger one
    assert manager.finish("young").ready == ("old",)


def test_wounded_transaction_aborts_and_the_older_proceeds():
    manager = TxnManager()
    manager.begin("other", (0, "other"), [(b"b", X)])
    manager.begin("young", YOUNG, [(b"a", X), (b"b", X)])  # holds a, waits on b
    step = manager.begin("old", OLD, [(b"a", X)])
    assert step.wounded == ("young",)
    assert manager.abort("young").ready == ("old",)
    assert "young" not in manager
    # Retried under its first priority, it waits behind the older ones.
    assert manager.begin("young", YOUNG, [(b"a", X), (b"b", X)]) == ((), ())


def test_retries_are_bounded():
    retries = Retries(2)
    assert [retries.again("t") for _ in range(3)] == [True, True, False]
    retries.forget("t")
    assert retries.again("t")


def _cond(kind: str, **kw) -> Condition:
    return Condition(b"k", kind, **kw)


EVALUATE = [
    ("absent holds", [_cond("absent")], {}, COMMIT),
    ("absent fails", [_cond("absent")], {b"k": Current(b"1", 5)}, CONDITION_FAILED),
    ("version holds", [_cond("version", version_us=5)], {b"k": Current(b"1", 5)}, COMMIT),
    ("version fails", [_cond("version", version_us=4)], {b"k": Current(b"1", 5)}, CONDITION_FAILED),
    ("version of an absent key fails", [_cond("version", version_us=0)], {}, CONDITION_FAILED),
    ("equals compares JSON", [_cond("equals", equals=comparable_json({"a": 1, "b": 2}))],
     {b"k": Current(json.dumps({"b": 2, "a": 1}).encode(), 3)}, COMMIT),
    ("equals fails", [_cond("equals", equals=comparable_json(1))], {b"k": Current(b"1.0", 3)},
     CONDITION_FAILED),
]


@pytest.mark.parametrize("name,conditions,current,kind", EVALUATE, ids=[e[0] for e in EVALUATE])
def test_evaluate_table(name, conditions, current, kind):
    request = TxnRequest("ks", None, (b"k",), tuple(conditions), (Write(b"k", b"2"),))
    verdict = evaluate(request, current)
    assert verdict.kind == kind, name
    if kind == COMMIT:
        assert verdict.writes == ((b"k", b"2"),)
        assert verdict.reads == ((b"k", current.get(b"k", Current(None, None))),)
    else:
        assert verdict.writes == () and verdict.failed_index == 0


def test_evaluate_read_only():
    verdict = evaluate(TxnRequest("ks", None, (b"a",), (), ()), {b"a": Current(b"1", 7)})
    assert verdict.kind == READ_ONLY and verdict.reads == ((b"a", Current(b"1", 7)),)


REPLICAS = ("a", "b", "c")
ROUTES = [
    # (name, node, kwargs, expected route, target)
    ("leader serves", "a", dict(leads=True, leader_hint="a"), Route.LOCAL, None),
    ("follower forwards to the leader", "b", dict(leads=False, leader_hint="a"), Route.FORWARD, "a"),
    ("no leader yet: wait", "b", dict(leads=False, leader_hint=None), Route.WAIT, None),
    ("outsider forwards to the preferred member", "z", dict(leads=False, leader_hint=None),
     Route.FORWARD, "a"),
    ("forwarded too often: no more hops", "b", dict(leads=False, leader_hint="a", hops=2),
     Route.WAIT, None),
    ("snapshot read at a caught-up follower", "b",
     dict(leads=False, leader_hint="a", snapshot_read=True, snapshot_ready=True), Route.LOCAL, None),
    ("snapshot read at a lagging follower goes to the leader", "b",
     dict(leads=False, leader_hint="a", snapshot_read=True, snapshot_ready=False),
     Route.FORWARD, "a"),
    ("persisted group differs: range moving", "a",
     dict(leads=True, leader_hint="a", persisted=("a", "b", "d")), Route.MOVING, None),
    ("persisted group in another order is the same group", "a",
     dict(leads=True, leader_hint="a", persisted=("c", "b", "a")), Route.LOCAL, None),
]


@pytest.mark.parametrize("name,node,kwargs,expected,target", ROUTES, ids=[r[0] for r in ROUTES])
def test_route_table(name, node, kwargs, expected, target):
    kwargs.setdefault("persisted", None)
    decision = route(node, REPLICAS, **kwargs)
    assert (decision.route, decision.target) == (expected, target), name
