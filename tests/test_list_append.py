"""The list-append checker (Kingsbury and Alvaro, "Elle: Inferring Isolation Anomalies
from Experimental Observations", VLDB 2020), judged on hand-built histories.

Each anomaly is one of Adya's phenomena ("Weak Consistency: A Generalized Theory and
Optimistic Implementations for Distributed Transactions", 1999): G0 write cycles,
G1a aborted reads, G1b intermediate reads, G1c circular information flow, G-single
single anti-dependency cycles, G2 anti-dependency cycles, and their real-time
variants for strict serializability. Every one is planted and caught, with its cycle
printed as operations; a seeded generator of serializable executions with
concurrency is clean, and mutations planted in those executions are caught.
"""

from __future__ import annotations

import random
import time
from dataclasses import replace

import pytest

from ringkv.sim import list_append
from ringkv.sim.list_append import FAIL, INFO, OK, Anomaly, Txn, analyse, check

# -- building histories by hand ---------------------------------------------------


def a(key: str, value: int) -> tuple[str, str, int]:
    return ("append", key, value)


def r(key: str, values: list[int] | None) -> tuple[str, str, list[int] | None]:
    return ("r", key, values)


def txn(tid: int, *ops: tuple[str, str, object], status: str = OK,
        at: float | None = None) -> Txn:
    """Transactions that all overlap unless ``at`` places them (no real-time order)."""
    invoke, complete = (0.0, 100.0) if at is None else (at, at + 1.0)
    return Txn(tid, f"c{tid}", tuple(ops), status, invoke,
               None if status == INFO else complete)


def kinds(anomalies: list[Anomaly]) -> list[str]:
    return sorted(x.kind for x in anomalies)


def only(anomalies: list[Anomaly], kind: str) -> Anomaly:
    found = [x for x in anomalies if x.kind == kind]
    assert len(found) == 1, [x.render() for x in anomalies]
    return found[0]


# -- Elle's dependencies: a serializable history passes -------------------------------


def test_a_serializable_history_has_no_anomalies() -> None:
    """Elle's inferred serialization graph (ww, wr, rw, rt) of a serial execution is acyclic."""
    history = [
        txn(1, a("x", 1), a("y", 1), at=0),
        txn(2, r("x", [1]), a("x", 2), at=2),
        txn(3, r("x", [1, 2]), r("y", [1]), a("y", 2), at=4),
        txn(4, r("y", [1, 2]), r("z", []), at=6),
    ]
    report = analyse(history)
    assert report.ok and report.anomalies == []
    assert report.edges["ww"] == 2 and report.edges["wr"] >= 3 and report.edges["rt"] == 3


def test_a_read_of_a_longer_list_orders_the_appends_it_contains() -> None:
    """Elle (recoverability): the longest read is the version order; ww edges follow it."""
    history = [txn(1, a("x", 1)), txn(2, a("x", 2)), txn(3, a("x", 3)),
               txn(4, r("x", [2, 1, 3]))]
    report = analyse(history)
    assert report.ok and report.edges == {"ww": 2, "wr": 1}


# -- Adya's phenomena, each planted -----------------------------------------------------


def test_g0_write_cycle_is_caught() -> None:
    """Adya G0 (write cycles): T1 and T2 each append to x and y, in opposite orders."""
    history = [txn(1, a("x", 1), a("y", 1)), txn(2, a("x", 2), a("y", 2)),
               txn(3, r("x", [1, 2]), r("y", [2, 1]))]
    found = check(history)
    assert kinds(found) == ["G0"]
    g0 = found[0]
    assert {e.kind for e in g0.cycle} == {"ww"} and set(g0.txns) == {1, 2}
    text = g0.render()
    assert "T1 -ww-> T2" in text and "T2 -ww-> T1" in text
    assert "append x 1" in text and "append y 2" in text  # the cycle printed as operations


def test_g1a_aborted_read_is_caught() -> None:
    """Adya G1a (aborted reads): a committed read sees a failed transaction's append."""
    history = [txn(1, a("x", 1), status=FAIL), txn(2, r("x", [1]))]
    g1a = only(check(history), "G1a")
    assert g1a.txns == (2, 1) and "T1" in g1a.render() and "failed" in g1a.detail


def test_an_unknown_outcome_may_be_read() -> None:
    """An info transaction may have committed: reading its append is no G1a."""
    history = [txn(1, a("x", 1), status=INFO), txn(2, r("x", [1])), txn(3, r("x", []))]
    assert check(history) == []


def test_g1b_intermediate_read_is_caught() -> None:
    """Adya G1b (intermediate reads): a read ends at an append that its transaction
    later followed with another append to the same key."""
    history = [txn(1, a("x", 1), a("x", 2)), txn(2, r("x", [1]))]
    g1b = only(check(history), "G1b")
    assert g1b.txns == (2, 1) and "not T1's last append" in g1b.detail
    assert check([txn(1, a("x", 1), a("x", 2)), txn(2, r("x", [1, 2]))]) == []


def test_g1c_circular_information_flow_is_caught() -> None:
    """Adya G1c: each of T1 and T2 reads what the other appended (wr both ways)."""
    history = [txn(1, a("x", 1), r("y", [2])), txn(2, a("y", 2), r("x", [1]))]
    g1c = only(check(history), "G1c")
    assert sorted(e.kind for e in g1c.cycle) == ["wr", "wr"]
    assert "T1 -wr-> T2" in g1c.render() and "T2 -wr-> T1" in g1c.render()


def test_g_single_read_skew_is_caught() -> None:
    """Adya G-single (single anti-dependency cycle): T1 sees T2's y but not its x."""
    history = [txn(1, r("x", []), r("y", [1])), txn(2, a("x", 1), a("y", 1)),
               txn(3, r("x", [1]))]
    single = only(check(history), "G-single")
    assert sorted(e.kind for e in single.cycle) == ["rw", "wr"]
    assert "T1 -rw-> T2" in single.render()


def test_g2_write_skew_is_caught() -> None:
    """Adya G2 (anti-dependency cycles): each reads the key the other appends to, empty."""
    history = [txn(1, r("x", []), a("y", 1)), txn(2, r("y", []), a("x", 1)),
               txn(3, r("x", [1]), r("y", [1]))]
    g2 = only(check(history), "G2")
    assert [e.kind for e in g2.cycle] == ["rw", "rw"]
    assert "G-single" not in kinds(check(history))


def test_a_stale_read_after_completion_is_a_real_time_violation() -> None:
    """Strict serializability (Elle's rt edges): T2 begins after T1's append is
    acknowledged, yet reads x empty. Serializable (T2 before T1), not strictly."""
    history = [txn(1, a("x", 1), at=0), txn(2, r("x", []), at=5), txn(3, r("x", [1]), at=10)]
    found = check(history)
    assert kinds(found) == ["G-single-realtime"]
    assert sorted(e.kind for e in found[0].cycle) == ["rt", "rw"]
    assert "T1 -rt-> T2" in found[0].render()
    assert check(history, realtime=False) == []


def test_g0_and_g1c_real_time_variants() -> None:
    """A cycle of ww or wr edges closed by real time is reported with -realtime."""
    g0 = [txn(1, a("x", 2), at=5), txn(2, a("x", 1), at=0), txn(3, r("x", [2, 1]), at=10)]
    assert kinds(check(g0)) == ["G0-realtime"]
    g1c = [txn(1, r("x", [1]), at=0), txn(2, a("x", 1), at=5)]
    assert kinds(check(g1c)) == ["G1c-realtime"]
    assert check(g0, realtime=False) == [] and check(g1c, realtime=False) == []


def test_incompatible_orders_are_caught() -> None:
    """Elle: reads of a list must be prefixes of one another, else no version order exists."""
    history = [txn(1, a("x", 1)), txn(2, a("x", 2)), txn(3, r("x", [1, 2])), txn(4, r("x", [2, 1]))]
    bad = only(check(history), "incompatible-order")
    assert "neither is a prefix" in bad.detail and set(bad.txns) == {3, 4}


def test_duplicate_elements_and_garbage_are_caught() -> None:
    history = [txn(1, a("x", 1)), txn(2, r("x", [1, 1])), txn(3, r("y", [99]))]
    found = check(history)
    assert kinds(found) == ["duplicate-elements", "garbage"]
    assert "99 was never appended" in only(found, "garbage").detail


def test_a_transaction_that_does_not_see_its_own_appends_is_caught() -> None:
    """Elle's internal consistency: a read after an append in one transaction shows it."""
    assert kinds(check([txn(1, a("x", 1), r("x", []))])) == ["internal"]
    assert kinds(check([txn(1, r("x", []), a("x", 1), r("x", [1]))])) == []
    # T2's append appears between two reads of T1 (with it, a G-single as well).
    assert "internal" in kinds(check([txn(1, r("x", []), a("x", 1), r("x", [2, 1])),
                                      txn(2, a("x", 2))]))


def test_values_appended_twice_are_refused() -> None:
    with pytest.raises(ValueError, match="unique per key"):
        check([txn(1, a("x", 1)), txn(2, a("x", 1))])
    with pytest.raises(ValueError, match="two transactions with id 1"):
        check([txn(1, a("x", 1)), txn(1, a("x", 2))])


def test_cycles_reported_per_kind_are_capped() -> None:
    """Bounded output: many disjoint G0 cycles, at most MAX_PER_KIND reported."""
    history = []
    for i in range(3 * list_append.MAX_PER_KIND):
        x, y = f"x{i}", f"y{i}"
        history += [txn(10 * i + 1, a(x, 1), a(y, 1)), txn(10 * i + 2, a(x, 2), a(y, 2)),
                    txn(10 * i + 3, r(x, [1, 2]), r(y, [2, 1]))]
    report = analyse(history)
    assert kinds(report.anomalies) == ["G0"] * list_append.MAX_PER_KIND
    assert report.components == 3 * list_append.MAX_PER_KIND


# -- randomized: serializable executions pass, planted mutations are caught -----------

KEYS = ("k0", "k1", "k2", "k3")


def serial_history(rng: random.Random, n: int = 40) -> list[Txn]:
    """Transactions executed one at a time at commit points in their [invoke, complete]
    windows, which overlap: a strictly serializable history with concurrency."""
    state: dict[str, list[int]] = {k: [] for k in KEYS}
    next_value = iter(range(1, 10_000))
    history = []
    point = 0.0
    for tid in range(1, n + 1):
        point += rng.uniform(0.1, 1.0)
        ops: list[tuple[str, str, object]] = []
        status = rng.choices((OK, FAIL, INFO), weights=(8, 1, 1))[0]
        applies = status == OK or (status == INFO and rng.random() < 0.5)
        scratch = {k: list(v) for k, v in state.items()}
        for _ in range(rng.randint(1, 4)):
            key = rng.choice(KEYS)
            if rng.random() < 0.5:
                value = next(next_value)
                scratch[key].append(value)
                ops.append(("append", key, value))
            else:
                ops.append(("r", key, list(scratch[key]) if status == OK else None))
        if applies:
            state = scratch
        invoke = point - rng.uniform(0, 2.0)
        complete = point + rng.uniform(0, 2.0)
        history.append(Txn(tid, f"c{tid % 5}", tuple(ops), status, invoke,
                           None if status == INFO else complete))
    return history


SEEDS = range(100)


def test_random_serial_executions_are_clean() -> None:
    started = time.perf_counter()
    txns = 0
    for seed in SEEDS:
        history = serial_history(random.Random(seed))
        report = analyse(history)
        assert report.ok, (seed, [x.render() for x in report.anomalies])
        txns += report.txns
    assert txns == 40 * len(SEEDS)
    assert time.perf_counter() - started < 5.0


def _read_modify_writes(history: list[Txn]) -> list[tuple[int, int, str]]:
    """(txn position, op position, key) of ok reads of a non-empty list followed in the
    same transaction by an append to that key, an append some later read saw."""
    seen_later = {v for t in history if t.status == OK for f, _, vals in t.ops
                  if f == "r" and isinstance(vals, list) for v in vals}
    found = []
    for i, t in enumerate(history):
        if t.status != OK:
            continue
        for j, (f, key, value) in enumerate(t.ops):
            own = {v for g, k, v in t.ops if g == "append" and k == key}
            if f == "r" and isinstance(value, list) and value and value[-1] not in own and any(
                    g == "append" and k == key and v in seen_later for g, k, v in t.ops[j + 1:]):
                found.append((i, j, key))
    return found


def test_a_planted_stale_read_is_caught() -> None:
    """Mutation: a read-modify-write sees a shorter prefix (a lost update). Its rw edge
    to the append it missed closes a cycle through its own later append."""
    caught = tried = 0
    for seed in SEEDS:
        history = serial_history(random.Random(seed))
        targets = _read_modify_writes(history)
        if not targets:
            continue
        i, j, key = targets[0]
        ops = list(history[i].ops)
        read = ops[j][2]
        assert isinstance(read, list)
        ops[j] = ("r", key, read[:-1])
        mutated = history[:i] + [replace(history[i], ops=tuple(ops))] + history[i + 1:]
        tried += 1
        found = check(mutated, realtime=False)
        cycles = [x for x in found if x.cycle and history[i].id in x.txns]
        caught += bool(cycles)
        assert cycles, (seed, [x.render() for x in found])
        assert cycles[0].kind in ("G-single", "G2")
    assert tried >= 90 and caught == tried


def test_a_planted_commit_reorder_is_caught() -> None:
    """Mutation: swap the real-time windows of a writer and a later reader of its
    append; the read now returns a value appended after the reader completed."""
    tried = 0
    for seed in SEEDS:
        history = serial_history(random.Random(seed))
        pairs = []
        for w in history:
            for rd in history:
                if w.status == rd.status == OK and w.complete is not None and \
                        rd.complete is not None and w.complete < rd.invoke:
                    last = {k: v for f, k, v in w.ops if f == "append"}
                    if any(f == "r" and isinstance(vals, list) and vals and last.get(k) == vals[-1]
                           for f, k, vals in rd.ops):
                        pairs.append((w, rd))
        if not pairs:
            continue
        w, rd = pairs[0]
        moved = {w.id: replace(w, invoke=rd.invoke, complete=rd.complete),
                 rd.id: replace(rd, invoke=w.invoke, complete=w.complete)}
        mutated = [moved.get(t.id, t) for t in history]
        tried += 1
        assert check(history) == []
        found = check(mutated)
        # One cycle is reported per component and kind, so the one printed may pass
        # through other transactions the move put out of real-time order.
        assert found and all(x.kind.endswith("-realtime") and x.cycle for x in found), (
            seed, [x.render() for x in found])
        assert check(mutated, realtime=False) == []
    assert tried >= 90


def test_planted_reorders_and_aborts_in_random_histories_are_caught() -> None:
    """Mutations: two elements of the longest read of a key swapped (incompatible order,
    when another read saw both), and an observed append's transaction marked failed (G1a)."""
    orders = aborts = 0
    for seed in SEEDS:
        history = serial_history(random.Random(seed))
        reads = [(i, j, v) for i, t in enumerate(history) if t.status == OK
                 for j, (f, _, v) in enumerate(t.ops)
                 if f == "r" and isinstance(v, list) and len(v) >= 2]
        if reads:
            i, j, values = max(reads, key=lambda item: len(item[2]))
            assert isinstance(values, list)
            swapped = values[:-2] + [values[-1], values[-2]]
            ops = list(history[i].ops)
            ops[j] = ("r", ops[j][1], swapped)
            mutated = history[:i] + [replace(history[i], ops=tuple(ops))] + history[i + 1:]
            # Another read that saw the second-to-last element contradicts the swap.
            others_saw_it = any(
                k == ops[j][1] and isinstance(v, list) and len(v) >= len(values) - 1
                for t in history if t is not history[i] and t.status == OK for f, k, v in t.ops
                if f == "r")
            if others_saw_it:
                orders += 1
                assert "incompatible-order" in kinds(check(mutated, realtime=False)), seed
        observed = {(t.id, v) for t in history if t.status == OK for f, _, vals in t.ops
                    if f == "r" and isinstance(vals, list) for v in vals}
        writer = next((t for t in history if t.status == OK and any(
            f == "append" and (rd, v) in observed for f, _, v in t.ops
            for rd in range(1, len(history) + 1) if rd != t.id)), None)
        if writer is not None:
            aborted = [replace(t, status=FAIL) if t is writer else t for t in history]
            assert "G1a" in kinds(check(aborted)), seed
            aborts += 1
    assert orders >= 50 and aborts >= 90


def test_a_large_history_is_checked_in_polynomial_time() -> None:
    """Bounded search: 2,000 transactions, each real-time edge set transitively reduced."""
    history = serial_history(random.Random(7), n=2000)
    started = time.perf_counter()
    report = analyse(history)
    assert report.ok and report.txns == 2000
    assert report.edges["rt"] < 20 * 2000  # the frontier, not all n^2 pairs
    assert time.perf_counter() - started < 5.0


def _stale_everywhere(history: list[Txn], rng: random.Random, count: int) -> list[Txn]:
    """Mutation: ``count`` transactions' reads cut to a random shorter prefix."""
    history = list(history)
    for _ in range(count):
        i = rng.randrange(len(history))
        ops = [("r", k, v[:rng.randrange(len(v))]) if f == "r" and isinstance(v, list) and v
               else (f, k, v) for f, k, v in history[i].ops]
        history[i] = replace(history[i], ops=tuple(ops))
    return history


def test_a_large_anomalous_history_is_judged_within_its_bounds() -> None:
    """One strongly connected component of a thousand transactions: each kind is found
    with a candidate whose reachability says a path closes it, not by trying them all."""
    rng = random.Random(11)
    history = _stale_everywhere(serial_history(rng, n=1000), rng, 100)
    started = time.perf_counter()
    report = analyse(history)
    assert {"G-single", "G-single-realtime"} <= report.kinds() and not report.truncated
    assert time.perf_counter() - started < 5.0


def test_a_search_cut_short_by_its_budget_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(11)
    history = _stale_everywhere(serial_history(rng, n=300), rng, 40)
    assert not analyse(history).truncated
    monkeypatch.setattr(list_append, "MAX_STEPS", 5)
    assert analyse(history).truncated


def test_reports_print_long_lists_short_and_sum_up() -> None:
    """A long read is printed as its last few elements; two reads that part are
    printed up to where they part."""
    values = list(range(1, 41))
    history = [*(txn(v, a("x", v)) for v in values),
               txn(100, r("x", values)), txn(101, r("x", [*values[:9], 99]))]
    report = analyse(history)
    assert kinds(report.anomalies) == ["garbage", "incompatible-order"]
    bad = only(report.anomalies, "incompatible-order")
    assert "[...4 more, 5, 6, 7, 8, 9, 10, ...30 more]" in bad.detail
    assert "part at element 9" in bad.detail
    assert len(bad.render()) < 600
    # A key whose reads disagree orders nothing: only the wr edges of its reads remain.
    assert report.summary() == "42 transactions, edges: 2 wr; 1 garbage, 1 incompatible-order"
