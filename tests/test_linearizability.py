"""The register linearizability checker (ringkv/sim/linearizability.py): Herlihy and
Wing's definition, checked by Wing and Gong's search with Lowe's memoization.

Each checker is proved by planted bugs it must catch: a stale read, a lost write, two
compare-and-sets that both won, a value that was never written, a read of a write that
had not yet begun."""

from __future__ import annotations

import random

import pytest

from ringkv.sim.linearizability import RegisterOp, check_key, linearizable


def w(p: str, v: object, start: float, end: float | None, key: str = "k") -> RegisterOp:
    return RegisterOp(p, "write", key, v, start, end)


def r(p: str, v: object, start: float, end: float, key: str = "k") -> RegisterOp:
    return RegisterOp(p, "read", key, v, start, end)


def cas(p: str, expected: object, v: object, start: float, end: float | None,
        ok: bool | None = True, key: str = "k") -> RegisterOp:
    return RegisterOp(p, "cas", key, v, start, end, expected=expected, ok=ok)


LINEARIZABLE = {
    "empty": [],
    "read of nothing": [r("a", None, 0, 1)],
    "sequential": [w("a", 1, 0, 1), r("b", 1, 2, 3), w("a", 2, 4, 5), r("b", 2, 6, 7)],
    "concurrent write, read sees either (old)": [w("a", 1, 0, 1), w("a", 2, 2, 5),
                                                 r("b", 1, 3, 4)],
    "concurrent write, read sees either (new)": [w("a", 1, 0, 1), w("a", 2, 2, 5),
                                                 r("b", 2, 3, 4)],
    "reads order concurrent writes": [w("a", 1, 0, 10), w("b", 2, 0, 10), r("c", 2, 1, 2),
                                      r("c", 1, 3, 4)],
    "touching ops count as concurrent": [w("a", 1, 0, 1), r("b", 1, 1, 2)],
    "cas chain": [w("a", 0, 0, 1), cas("a", 0, 1, 2, 3), cas("b", 1, 2, 4, 5),
                  cas("c", 1, 3, 6, 7, ok=False), r("d", 2, 8, 9)],
    "concurrent cas, one wins": [w("a", 0, 0, 1), cas("a", 0, 1, 2, 5), cas("b", 0, 2, 2, 5,
                                                                             ok=False),
                                 r("c", 1, 6, 7)],
    "indeterminate write that took effect": [w("a", 1, 0, 1), w("b", 2, 2, None),
                                             r("c", 2, 5, 6)],
    "indeterminate write that never did": [w("a", 1, 0, 1), w("b", 2, 2, None),
                                           r("c", 1, 5, 6)],
    "indeterminate cas either way": [w("a", 0, 0, 1), cas("b", 0, 1, 2, None, ok=None),
                                     r("c", 0, 3, 4), r("c", 1, 5, 6)],
    "delete": [w("a", 1, 0, 1), w("a", None, 2, 3), r("b", None, 4, 5)],
}

NOT_LINEARIZABLE = {
    "stale read": [w("a", 1, 0, 1), w("a", 2, 2, 3), r("b", 1, 4, 5)],
    "lost write": [w("a", 1, 0, 1), r("b", None, 2, 3)],
    "read from the future": [r("b", 1, 0, 1), w("a", 1, 2, 3)],
    "never written": [w("a", 1, 0, 1), r("b", 7, 2, 3)],
    "two cas both won": [w("a", 0, 0, 1), cas("a", 0, 1, 2, 5), cas("b", 0, 2, 2, 5),
                         r("c", 2, 6, 7)],
    "cas failed though it held": [w("a", 0, 0, 1), cas("a", 0, 1, 2, 3, ok=False),
                                  r("c", 0, 4, 5)],
    "reads disagree on order": [w("a", 1, 0, 10), w("b", 2, 0, 10), r("c", 2, 1, 2),
                                r("c", 1, 3, 4), r("d", 2, 5, 6)],
    "indeterminate write seen then unseen": [w("a", 1, 0, 1), w("b", 2, 2, None),
                                             r("c", 2, 3, 4), r("c", 1, 5, 6)],
}


@pytest.mark.parametrize("name", sorted(LINEARIZABLE))
def test_linearizable_histories_pass(name: str) -> None:
    result = check_key(LINEARIZABLE[name])
    assert result.linearizable is True, name


@pytest.mark.parametrize("name", sorted(NOT_LINEARIZABLE))
def test_planted_violations_are_caught(name: str) -> None:
    result = check_key(NOT_LINEARIZABLE[name])
    assert result.linearizable is False, name
    assert result.stuck, "the report shows where the search got stuck"


def test_keys_are_checked_independently_and_the_verdict_names_the_bad_key() -> None:
    ops = [*LINEARIZABLE["cas chain"], *(
        RegisterOp(o.process, o.kind, "other", o.value, o.start, o.end, o.expected, o.ok)
        for o in NOT_LINEARIZABLE["stale read"])]
    verdict = linearizable(ops)
    assert not verdict.ok and verdict.count == 1
    assert "key other" in verdict.excerpt[0]
    assert linearizable(LINEARIZABLE["cas chain"]).ok


def test_an_undecided_search_fails_the_verdict() -> None:
    ops = [w(f"p{i}", i, 0, 100) for i in range(12)] + [r("z", 99, 101, 102)]
    verdict = linearizable(ops, max_steps=50)
    assert not verdict.ok and "undecided" in verdict.summary


def test_unknown_reads_are_refused() -> None:
    with pytest.raises(ValueError, match="read"):
        RegisterOp("a", "read", "k", 1, 0, None)


def simulate_register(seed: int, *, stale_read: bool = False, ops: int = 200) -> list[RegisterOp]:
    """A linearizable register under five concurrent clients: each op takes effect at
    one random instant inside its interval (at most 1 s either side; ops whose outcome
    is unknown have no end). With ``stale_read``, one late read returns a value that a
    known write had replaced before the read began (and that a known write had set:
    an unknown write may take effect arbitrarily late, so its value is never stale)."""
    rng = random.Random(seed)
    value: object = None
    value_known = True
    superseded: list[tuple[object, float]] = []  # (old value, when a known write replaced it)
    history: list[RegisterOp] = []
    for n, at in enumerate(sorted(rng.uniform(0, 100) for _ in range(ops))):
        start, end = at - rng.uniform(0, 1), at + rng.uniform(0, 1)
        process = f"p{n % 5}"
        unknown = rng.random() < 0.05
        kind = "read" if stale_read and n == 3 * ops // 4 else rng.choice(["read", "write", "cas"])
        if kind == "read":
            seen = value
            if stale_read and n == 3 * ops // 4:
                # Replaced by a known write that ended before this read began.
                seen = next(old for old, replaced_at in reversed(superseded)
                            if replaced_at < at - 2.0)
            history.append(r(process, seen, start, end))
            continue
        expected = value if kind == "write" or rng.random() < 0.7 else "nope"
        swapped = value == expected
        if swapped:
            if not unknown and value_known:
                superseded.append((value, at))
            value, value_known = f"v{n}", not unknown
        if kind == "write":
            history.append(w(process, f"v{n}", start, None if unknown else end))
        else:
            history.append(cas(process, expected, f"v{n}", start, None if unknown else end,
                               ok=None if unknown else swapped))
    return history


@pytest.mark.parametrize("seed", range(20))
def test_simulated_registers_are_linearizable_and_a_planted_stale_read_is_not(seed: int) -> None:
    assert check_key(simulate_register(seed)).linearizable is True
    assert check_key(simulate_register(seed, stale_read=True)).linearizable is False
