"""The bank checker: transfers conserve money, snapshots see whole transfers (pure).

Jepsen's bank workload. Accounts live in different ranges, so each transfer is
a cross-range transaction; read-only snapshot transactions read balances. Under
snapshot isolation or stronger, every snapshot of all the accounts sums to the
starting total (a snapshot that sees one half of a transfer does not), and no
balance is ever negative (a transfer that would overdraw must abort).

A snapshot of only some accounts is judged on its sum only where that sum is
defined: when the caller names the total those accounts must hold. Its
balances are always judged for sign. Transfers are only described here (the
checker names those that overlap an offending snapshot); their outcomes do not
change what a snapshot must sum to.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

OK, FAIL, INFO = "ok", "fail", "info"

MAX_REPORTED = 64  # anomalies reported per kind


@dataclass(frozen=True)
class Transfer:
    index: int
    process: str
    src: str
    dst: str
    amount: int
    status: str  # OK, FAIL or INFO
    invoke: float
    complete: float | None = None

    def line(self) -> str:
        end = "..." if self.complete is None else f"{self.complete:.3f}"
        return (f"#{self.index} {self.process} {self.status} {self.invoke:.3f}-{end}: "
                f"transfer {self.amount} {self.src} -> {self.dst}")


@dataclass(frozen=True)
class Snapshot:
    """A read-only transaction's balances. ``total`` is what they must sum to when
    they are a subset of the accounts (None: the sum of a subset is not judged)."""

    index: int
    process: str
    balances: Mapping[str, int]
    status: str  # only OK snapshots returned balances
    invoke: float
    complete: float | None = None
    total: int | None = None

    def line(self) -> str:
        end = "..." if self.complete is None else f"{self.complete:.3f}"
        shown = ", ".join(f"{k}={v}" for k, v in sorted(self.balances.items()))
        return (f"#{self.index} {self.process} {self.status} {self.invoke:.3f}-{end}: "
                f"read {{{shown}}}")


@dataclass(frozen=True)
class BankAnomaly:
    kind: str  # "wrong-total", "negative-balance", "unknown-account"
    index: int  # the snapshot's
    detail: str
    lines: tuple[str, ...] = ()  # the snapshot, then the transfers that overlap it

    def render(self) -> str:
        return "\n".join([f"{self.kind}: {self.detail}", *(f"    {x}" for x in self.lines)])


def check(initial: Mapping[str, int], transfers: Iterable[Transfer],
          snapshots: Iterable[Snapshot]) -> list[BankAnomaly]:
    """Every offending snapshot (at most MAX_REPORTED per kind)."""
    accounts = dict(initial)
    if any(balance < 0 for balance in accounts.values()):
        raise ValueError("starting balances must not be negative")
    starting_total = sum(accounts.values())
    moves = list(transfers)
    for move in moves:
        if move.src not in accounts or move.dst not in accounts or move.src == move.dst:
            raise ValueError(f"transfer #{move.index} between {move.src!r} and {move.dst!r}")
        if move.amount <= 0:
            raise ValueError(f"transfer #{move.index} of {move.amount}")
    found: list[BankAnomaly] = []
    counts: dict[str, int] = {}

    def report(kind: str, snap: Snapshot, detail: str) -> None:
        counts[kind] = counts.get(kind, 0) + 1
        if counts[kind] <= MAX_REPORTED:
            found.append(BankAnomaly(kind, snap.index, detail,
                                     (snap.line(), *(m.line() for m in _overlapping(snap, moves)))))

    for snap in snapshots:
        if snap.status != OK:
            continue
        unknown = sorted(set(snap.balances) - set(accounts))
        if unknown:
            report("unknown-account", snap, f"read accounts that do not exist: {unknown}")
            continue
        negative = sorted(k for k, v in snap.balances.items() if v < 0)
        if negative:
            report("negative-balance", snap,
                   ", ".join(f"{k} = {snap.balances[k]}" for k in negative))
        complete = set(snap.balances) == set(accounts)
        expected = starting_total if complete else snap.total
        if expected is None:
            continue  # a subset whose total nobody knows: only signs are judged
        total = sum(snap.balances.values())
        if total != expected:
            report("wrong-total", snap, f"balances sum to {total}, not {expected} "
                                        f"({total - expected:+d})")
    return found


def _overlapping(snap: Snapshot, moves: list[Transfer]) -> list[Transfer]:
    """The transfers that may have been in flight during the snapshot: likely culprits."""
    end = float("inf") if snap.complete is None else snap.complete
    hits = [m for m in moves if m.status != FAIL and m.invoke <= end
            and (m.complete is None or m.complete >= snap.invoke)
            and (m.src in snap.balances or m.dst in snap.balances)]
    return hits[:8]
