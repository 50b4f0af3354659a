"""Client histories in Jepsen's form, as JSON, for checking with other tools (pure).

Jepsen (and Knossos, Elle, elle-cli) read a history as a list of events in the
order they happened: an ``invoke`` when a process calls, then that process's
``ok`` (it happened), ``fail`` (it certainly did not) or ``info`` (unknown)::

    {"type": "invoke", "f": "txn", "value": [["append", "x", 1], ["r", "y", null]],
     "process": 0, "time": 1500000, "index": 0}

Times are integer nanoseconds on the clients' shared clock. A Jepsen process
runs one operation at a time and is never reused after an ``info`` (it may
still be running), so each client here maps to a fresh integer process after
an unknown outcome, or when its next call starts before its last one answered;
the client's own name is kept as ``"client"``. At one instant, invocations
come before completions, so no real-time order is claimed that the clock did
not show. An operation that never answered gets its ``info`` just before its
client's next call, or at the end of the history.

Shapes: list-append transactions (``"f": "txn"``, micro-ops with reads ``null``
until answered); the registers and eventual-tier operations of
``sim/history.py`` as Jepsen's independent keys (``"value": [key, v]``, a
compare-and-set's ``v`` as ``[expected, new]``); bank transfers
(``{"from", "to", "amount"}``) and reads (balances by account).
"""

from __future__ import annotations

import ast
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ringkv.sim.bank import Snapshot, Transfer
from ringkv.sim.history import FAIL, INFO, OK, Op
from ringkv.sim.list_append import APPEND, Txn

Event = dict[str, Any]


@dataclass(frozen=True)
class Call:
    """One operation, shape-free: what each history becomes before its events are laid out."""

    client: str
    f: str
    invoke_value: object
    invoke_s: float
    status: str  # OK, FAIL or INFO
    complete_value: object
    complete_s: float | None  # None: no answer came
    extra: tuple[tuple[str, object], ...] = ()  # more fields, on both events


def from_list_append(txns: Iterable[Txn]) -> list[Event]:
    calls = []
    for txn in txns:
        asked = [[f, key, value if f == APPEND else None] for f, key, value in txn.ops]
        told = [[f, key, list(value) if isinstance(value, (list, tuple)) else value]
                for f, key, value in txn.ops] if txn.status == OK else asked
        calls.append(Call(txn.process, "txn", asked, txn.invoke, txn.status, told, txn.complete,
                          (("txn", txn.id),)))
    return events(calls)


def from_register_history(ops: Iterable[Op]) -> list[Event]:
    """``sim/history.py`` operations: reads, writes, compare-and-sets, snapshot reads."""
    calls = []
    for op in ops:
        if op.kind in ("read", "snapshot"):
            asked: object = [op.key, None]
            told: object = [op.key, op.value if op.status == OK else None]
        else:
            value = _cas(op.value) if op.kind == "cas" else op.value
            asked = told = [op.key, value]
        extra: list[tuple[str, object]] = [("node", op.node), ("consistency", op.consistency)]
        if op.error:
            extra.append(("error", op.error))
        if op.final:
            extra.append(("final", True))
        calls.append(Call(op.process, op.kind, asked, op.start, op.status, told, op.end,
                          tuple(extra)))
    return events(calls)


def from_bank(transfers: Iterable[Transfer], snapshots: Iterable[Snapshot]) -> list[Event]:
    calls = []
    for move in transfers:
        value = {"from": move.src, "to": move.dst, "amount": move.amount}
        calls.append(Call(move.process, "transfer", value, move.invoke, move.status, value,
                          move.complete))
    for snap in snapshots:
        told = dict(snap.balances) if snap.status == OK else None
        calls.append(Call(snap.process, "read", None, snap.invoke, snap.status, told,
                          snap.complete))
    return events(calls)


def _cas(shown: str | None) -> object:
    """The workload records a compare-and-set as ``repr(expected)->repr(new)``."""
    if shown is None:
        return None
    at = shown.find("->")
    while at != -1:
        try:
            return [ast.literal_eval(shown[:at]), ast.literal_eval(shown[at + 2:])]
        except (ValueError, SyntaxError):
            at = shown.find("->", at + 1)
    return shown  # not in that form: kept as recorded


def _ns(seconds: float) -> int:
    return round(seconds * 1_000_000_000)


def events(calls: Iterable[Call]) -> list[Event]:
    """Invocations and completions in time order, with Jepsen processes and indices."""
    ordered = sorted(enumerate(calls), key=lambda item: (item[1].invoke_s, item[0]))
    if not ordered:
        return []
    last_s = max(max(c.invoke_s, c.complete_s or c.invoke_s) for _, c in ordered)
    # An unanswered call ends where its client moves on (or at the end).
    next_invoke: dict[int, float] = {}
    following: dict[str, float] = {}
    for position, call in reversed(ordered):
        if call.client in following:
            next_invoke[position] = following[call.client]
        following[call.client] = call.invoke_s
    processes: dict[str, tuple[int, int | None]] = {}  # client -> (process, answered at ns)
    fresh = 0
    rows: list[tuple[int, int, int, Event]] = []  # (time ns, 0 invoke / 1 completion, seq, event)
    for position, call in ordered:
        current = processes.get(call.client)
        # Reused only once its last call answered strictly before (in ns) this one began.
        if current is None or current[1] is None or current[1] >= _ns(call.invoke_s):
            current = (fresh, None)
            fresh += 1
        process = current[0]
        end_s = call.complete_s
        if end_s is None:
            end_s = next_invoke.get(position, last_s)
        answered = None if call.status == INFO or call.complete_s is None else _ns(call.complete_s)
        processes[call.client] = (process, answered)  # info: the process is never reused
        base: Event = {"process": process, "f": call.f, "client": call.client}
        base.update(call.extra)
        rows.append((_ns(call.invoke_s), 0, len(rows),
                     {"type": "invoke", **base, "value": call.invoke_value}))
        status = call.status if call.status in (OK, FAIL) else INFO
        rows.append((_ns(end_s), 1, len(rows),
                     {"type": status, **base, "value": call.complete_value}))
    rows.sort(key=lambda row: (row[0], row[1], row[2]))
    out = []
    for index, (time_ns, _, _, event) in enumerate(rows):
        event["time"] = time_ns
        event["index"] = index
        out.append(event)
    return out


def write_jepsen_history(path: str | os.PathLike[str], history_events: Iterable[Event]) -> None:
    """A JSON array, one event per line: valid JSON, and readable with grep."""
    lines = [json.dumps(event, separators=(",", ":"), sort_keys=False) for event in history_events]
    body = "[\n" + ",\n".join(lines) + "\n]\n" if lines else "[]\n"
    Path(path).write_text(body)
