"""Client histories exported in Jepsen's invoke/ok/fail/info form (Kingsbury and Alvaro,
"Elle", VLDB 2020, whose histories are in this form), so other tools can check them.

Every export is well formed the way Jepsen's checkers expect: events in time order,
each process running one operation at a time, never reused after an ``info``. A
list-append history survives the round trip: read back from the JSON, it gives the
list-append checker the same verdict.
"""

from __future__ import annotations

import json
import random
from itertools import pairwise
from pathlib import Path
from typing import Any

from ringkv.sim import list_append
from ringkv.sim.bank import Snapshot, Transfer
from ringkv.sim.history import FAIL, INFO, OK, Op
from ringkv.sim.jepsen_history import (
    from_bank,
    from_list_append,
    from_register_history,
    write_jepsen_history,
)
from ringkv.sim.list_append import Txn


def well_formed(events: list[dict[str, Any]]) -> None:
    """Jepsen's rules: indices in order, times never go back, a process invokes, then
    completes, then may invoke again, unless it completed with info."""
    assert [e["index"] for e in events] == list(range(len(events)))
    assert all(a["time"] <= b["time"] for a, b in pairwise(events))
    open_call: dict[int, dict[str, Any]] = {}
    crashed: set[int] = set()
    for event in events:
        process = event["process"]
        assert process not in crashed, f"process {process} reused after info: {event}"
        if event["type"] == "invoke":
            assert process not in open_call, f"process {process} invoked twice: {event}"
            open_call[process] = event
        else:
            assert event["type"] in ("ok", "fail", "info")
            invoked = open_call.pop(process)
            assert invoked["f"] == event["f"]
            if event["type"] == "info":
                crashed.add(process)
    assert open_call == {}, "every invocation is completed"
    json.dumps(events)  # JSON-serialisable


def test_list_append_transactions_export_as_txn_micro_ops() -> None:
    history = [
        Txn(1, "c1", (("append", "x", 1), ("r", "y", [])), OK, 0.0, 1.0),
        Txn(2, "c2", (("append", "y", 2),), FAIL, 0.5, 0.75),
        Txn(3, "c1", (("r", "x", None), ("append", "x", 3)), INFO, 2.0),
        Txn(4, "c1", (("r", "x", [1]),), OK, 3.0, 3.5),
    ]
    events = from_list_append(history)
    well_formed(events)
    assert [(e["type"], e["txn"], e["time"]) for e in events] == [
        ("invoke", 1, 0), ("invoke", 2, 500_000_000), ("fail", 2, 750_000_000),
        ("ok", 1, 1_000_000_000), ("invoke", 3, 2_000_000_000),
        ("invoke", 4, 3_000_000_000),  # T3's info follows its client's next call
        ("info", 3, 3_000_000_000), ("ok", 4, 3_500_000_000)]
    first = events[0]
    assert first["f"] == "txn" and first["value"] == [["append", "x", 1], ["r", "y", None]]
    assert events[3]["value"] == [["append", "x", 1], ["r", "y", []]]
    assert events[6]["value"] == [["r", "x", None], ["append", "x", 3]]  # unknown: as asked
    processes = {e["txn"]: e["process"] for e in events}
    assert processes[1] == 0 and processes[3] != processes[4]  # fresh after info
    assert {e["client"] for e in events if e["txn"] in (1, 3, 4)} == {"c1"}


def from_events(events: list[dict[str, Any]]) -> list[Txn]:
    """What another tool does with the file: pair each completion with its invocation."""
    open_call: dict[int, dict[str, Any]] = {}
    txns = []
    for event in events:
        if event["type"] == "invoke":
            open_call[event["process"]] = event
            continue
        invoked = open_call.pop(event["process"])
        ops = tuple((f, k, v) for f, k, v in event["value"])
        complete = None if event["type"] == "info" else event["time"] / 1e9
        txns.append(Txn(len(txns) + 1, str(event["process"]), ops, event["type"],
                        invoked["time"] / 1e9, complete))
    return txns


def test_a_list_append_history_round_trips_through_the_json_file(tmp_path: Path) -> None:
    """Elle's checker reads exported histories: the same verdict after the round trip,
    for a clean history and for one with an anomaly planted."""
    rng = random.Random(5)
    state: dict[str, list[int]] = {"x": [], "y": []}
    history = []
    for tid in range(1, 61):
        key = rng.choice(("x", "y"))
        if rng.random() < 0.5:
            state[key].append(tid)
            ops: tuple[list_append.MicroOp, ...] = (("append", key, tid),)
        else:
            ops = (("r", key, list(state[key])),)
        history.append(Txn(tid, f"c{tid % 3}", ops, OK, tid - 0.4, tid + 0.4))
    stale = Txn(99, "c9", (("r", "x", []),), OK, 70.0, 71.0)  # after every append: real-time
    for planted in ([], [stale]):
        path = tmp_path / "history.json"
        write_jepsen_history(path, from_list_append(history + planted))
        events = json.loads(path.read_text())
        well_formed(events)
        again = list_append.check(from_events(events))
        assert sorted(a.kind for a in again) == sorted(
            a.kind for a in list_append.check(history + planted))
        assert bool(again) == bool(planted)


def test_register_operations_export_as_independent_keys() -> None:
    """sim/history.py operations; a compare-and-set's value as [expected, new]."""
    ops = [
        Op(0, "c1", "write", "k1", "v1", 0.0, 0.1, OK, "n1", "QUORUM"),
        Op(1, "c2", "read", "k1", "v1", 0.05, 0.2, OK, "n2", "QUORUM"),
        Op(2, "c1", "cas", "k1", "'v1'->'v2'", 0.3, None, INFO, "n1", "SERIAL",
           error="client timeout"),
        Op(3, "c1", "read", "k1", None, 0.5, 0.6, FAIL, "n3", "SERIAL", error="Unavailable"),
        Op(4, "final", "read", "k1", "v2", 1.0, 1.1, OK, "n1", "SERIAL", final=True),
    ]
    events = from_register_history(ops)
    well_formed(events)
    by_type = [(e["type"], e["f"], e["value"]) for e in events]
    assert by_type == [
        ("invoke", "write", ["k1", "v1"]), ("invoke", "read", ["k1", None]),
        ("ok", "write", ["k1", "v1"]), ("ok", "read", ["k1", "v1"]),
        ("invoke", "cas", ["k1", ["v1", "v2"]]),
        ("invoke", "read", ["k1", None]), ("info", "cas", ["k1", ["v1", "v2"]]),
        ("fail", "read", ["k1", None]),
        ("invoke", "read", ["k1", None]), ("ok", "read", ["k1", "v2"])]
    info = events[6]
    assert info["error"] == "client timeout" and info["node"] == "n1"
    assert events[7]["error"] == "Unavailable" and events[9]["final"] is True


def test_at_one_instant_invocations_come_first() -> None:
    """No real-time order is claimed that the clock did not show: a call that begins
    the instant another ends is exported as concurrent with it, and a client whose
    next call begins the instant its last one ends takes a fresh process."""
    ops = [Op(0, "c1", "write", "k", "a", 0.0, 1.0, OK, "n1", "ONE"),
           Op(1, "c2", "read", "k", None, 1.0, 2.0, OK, "n1", "ONE"),
           Op(2, "c1", "write", "k", "b", 1.0, 2.0, OK, "n1", "ONE")]
    events = from_register_history(ops)
    well_formed(events)
    assert [e["type"] for e in events] == ["invoke", "invoke", "invoke", "ok", "ok", "ok"]
    assert events[0]["process"] != events[2]["process"]
    later = from_register_history([ops[0], ops[2]._replace(start=1.5)])
    assert later[0]["process"] == later[2]["process"]  # answered before: reused


def test_bank_operations_export_as_transfers_and_reads() -> None:
    events = from_bank([Transfer(1, "c1", "a", "b", 5, OK, 0.0, 1.0)],
                       [Snapshot(2, "c2", {"a": 5, "b": 15}, OK, 2.0, 3.0)])
    well_formed(events)
    assert [(e["type"], e["f"], e["value"]) for e in events] == [
        ("invoke", "transfer", {"from": "a", "to": "b", "amount": 5}),
        ("ok", "transfer", {"from": "a", "to": "b", "amount": 5}),
        ("invoke", "read", None), ("ok", "read", {"a": 5, "b": 15})]


def test_an_empty_history_writes_an_empty_array(tmp_path: Path) -> None:
    path = tmp_path / "empty.json"
    write_jepsen_history(path, from_list_append([]))
    assert json.loads(path.read_text()) == []
