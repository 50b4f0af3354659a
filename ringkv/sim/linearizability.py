"""A linearizability checker for registers with compare-and-set (pure).

Herlihy and Wing (1990) define a history as linearizable when every
operation can be placed at one instant between its call and its return so
that the sequence obeys the object's sequential specification. Checking it
is a search: Wing and Gong's algorithm tries to linearize, at each point,
some operation whose call has happened, backtracking on failure; Lowe's
refinement (2017) caches every (set of operations linearized, state) pair
already explored, so the search never explores the same configuration twice.
This is the algorithm of Knossos and Porcupine. Registers are checked one
key at a time: linearizability is local (Herlihy and Wing, §3.3), so a
history is linearizable iff each key's sub-history is.

The register's value is any hashable (None: absent). Operations:

* ``read``, which returned ``value``;
* ``write`` of ``value`` (a delete writes None);
* ``cas`` from ``expected`` to ``value``, which returned ``ok`` True (it
  swapped) or False (the register did not hold ``expected``).

An operation whose outcome is unknown (a timeout: ``end`` is None, and for a
cas ``ok`` is None) may have taken effect at any instant after its call, or
never. As Knossos does, it is given an end after every other operation: a
write placed after everything else has the same effect on the check as one
that never happened, so both possibilities are covered. Operations that
certainly failed (nothing was applied) are left out by the caller.

The search is bounded (``max_steps``); a key it cannot decide within the
bound is reported as undecided, which fails the verdict: a checker that
gives up must not pass.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass

from ringkv.sim.checkers import EXCERPT_LINES, Verdict

MAX_STEPS = 2_000_000  # per key; histories in tests take a few thousand


@dataclass(frozen=True)
class RegisterOp:
    process: str
    kind: str  # "read" | "write" | "cas"
    key: str
    value: Hashable  # read: what it returned; write and cas: the new value
    start: float
    end: float | None  # None: outcome unknown (may or may not have taken effect)
    expected: Hashable = None  # cas only
    ok: bool | None = True  # cas: swapped or not; None: unknown

    def __post_init__(self) -> None:
        if self.kind not in ("read", "write", "cas"):
            raise ValueError(f"unknown register operation {self.kind!r}")
        if self.kind == "read" and self.end is None:
            raise ValueError("a read with an unknown outcome tells nothing: leave it out")

    def step(self, state: Hashable) -> tuple[bool, Hashable]:
        """The sequential specification: may this op happen in ``state``, and the state after."""
        if self.kind == "read":
            return state == self.value, state
        if self.kind == "write":
            return True, self.value
        holds = state == self.expected
        if self.ok is None:  # unknown: swapped if it could, else it did nothing
            return True, self.value if holds else state
        if self.ok:
            return holds, self.value if holds else state
        return not holds, state

    def describe(self) -> str:
        when = f"[{self.start:.3f}, {'?' if self.end is None else f'{self.end:.3f}'}]"
        what = {"read": f"read -> {self.value!r}", "write": f"write {self.value!r}",
                "cas": f"cas {self.expected!r} -> {self.value!r}: "
                       f"{'unknown' if self.ok is None else 'ok' if self.ok else 'failed'}"}
        return f"{self.process} {when} {what[self.kind]}"


@dataclass(frozen=True)
class KeyResult:
    key: str
    linearizable: bool | None  # None: undecided within the step bound
    ops: int
    steps: int
    stuck: tuple[RegisterOp, ...] = ()  # where the deepest attempt could go no further


def check_key(ops: Sequence[RegisterOp], initial: Hashable = None, *,
              max_steps: int = MAX_STEPS) -> KeyResult:
    """Lowe's just-in-time linearization search over one key's operations."""
    key = ops[0].key if ops else ""
    n = len(ops)
    # Events: (time, 0 for a call / 1 for a return, op index). Calls sort before
    # returns at the same instant, so touching operations count as concurrent.
    horizon = max([op.start for op in ops] + [op.end for op in ops if op.end is not None] + [0.0])
    events = sorted([(op.start, 0, i) for i, op in enumerate(ops)]
                    + [(horizon + 1.0 if op.end is None else op.end, 1, i)
                       for i, op in enumerate(ops)])
    # A doubly linked list over the events, so a linearized op's call and return
    # can be lifted out and put back in O(1).
    size = len(events)
    nxt = list(range(1, size + 1)) + [-1]  # index size is the tail sentinel
    prv = [-1] + list(range(size))  # prv[e] for e in 0..size; -1 before the head
    head: list[int] = [0]  # the first event still in the list (size: none left)
    call_at = [0] * n
    return_at = [0] * n
    for position, (_, is_return, i) in enumerate(events):
        (return_at if is_return else call_at)[i] = position

    def lift(e: int) -> None:
        before, after = prv[e], nxt[e]
        if before == -1:
            head[0] = after
        else:
            nxt[before] = after
        prv[after] = before

    def unlift(e: int) -> None:
        before, after = prv[e], nxt[e]
        if before == -1:
            head[0] = e
        else:
            nxt[before] = e
        prv[after] = e

    state = initial
    linearized = 0  # bitmask of op indices
    seen: set[tuple[int, Hashable]] = set()
    stack: list[tuple[int, Hashable]] = []  # (op index, state before it)
    deepest: tuple[int, tuple[RegisterOp, ...]] = (-1, ())
    steps = 0
    e = head[0]
    while e != size:
        steps += 1
        if steps > max_steps:
            return KeyResult(key, None, n, steps)
        _, is_return, i = events[e]
        if not is_return:
            ok, after = ops[i].step(state)
            if ok and (linearized | (1 << i), after) not in seen:
                seen.add((linearized | (1 << i), after))
                stack.append((i, state))
                state, linearized = after, linearized | (1 << i)
                lift(call_at[i])
                lift(return_at[i])
                e = head[0]
                continue
            e = nxt[e]
            continue
        # A return whose op is not yet linearized: this path is stuck. Back up.
        if len(stack) > deepest[0]:
            deepest = (len(stack), _pending(ops, events, head[0], nxt, size))
        if not stack:
            return KeyResult(key, False, n, steps, deepest[1])
        i, state = stack.pop()
        linearized &= ~(1 << i)
        unlift(return_at[i])
        unlift(call_at[i])
        e = nxt[call_at[i]]
    return KeyResult(key, True, n, steps)


def _pending(ops: Sequence[RegisterOp], events: list[tuple[float, int, int]], head: int,
             nxt: list[int], size: int) -> tuple[RegisterOp, ...]:
    """The operations still waiting to be linearized, up to the first return."""
    found: list[RegisterOp] = []
    e = head
    while e != size and len(found) < EXCERPT_LINES:
        _, is_return, i = events[e]
        if not is_return:
            found.append(ops[i])
        else:
            found.insert(0, ops[i])
            break
        e = nxt[e]
    return tuple(found)


def linearizable(ops: Iterable[RegisterOp], *, max_steps: int = MAX_STEPS) -> Verdict:
    """Judge a register history key by key (every key starts absent)."""
    by_key: dict[str, list[RegisterOp]] = {}
    for op in ops:
        by_key.setdefault(op.key, []).append(op)
    results = [check_key(key_ops, max_steps=max_steps) for _, key_ops in sorted(by_key.items())]
    total = sum(r.ops for r in results)
    bad = [r for r in results if r.linearizable is False]
    undecided = [r for r in results if r.linearizable is None]
    if not bad and not undecided:
        return Verdict("linearizable", True,
                       f"{total} operations on {len(results)} keys linearizable")
    lines: list[str] = []
    for r in bad[:2]:
        lines.append(f"key {r.key}: no linearization; stuck at the return of the first of:")
        lines.extend(f"  {op.describe()}" for op in r.stuck)
    lines.extend(f"key {r.key}: undecided after {r.steps} steps" for r in undecided[:2])
    summary = (f"{len(bad)} of {len(results)} keys not linearizable"
               + (f", {len(undecided)} undecided within {max_steps} steps" if undecided else ""))
    return Verdict("linearizable", False, summary, len(bad) + len(undecided),
                   tuple(lines[:EXCERPT_LINES]))
