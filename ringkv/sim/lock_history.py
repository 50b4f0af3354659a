"""Judging a lock by what a guarded resource saw (pure): was it ever held by two
live clients at once?

The history of a run with contenders looping acquire, write, release
(``sim/locks.py``):

* ``ResourceWrite``: every write that reached the guarded resource, in the
  order it arrived, accepted or refused (its token below the highest the
  resource had accepted), each with the holder's fencing token and whether it
  opens (``enter``) or closes (``exit``) the holder's section;
* ``Hold``: every acquisition (holder, token, when ``acquire`` returned), and
  when the holder last confirmed it still held: the moment it *called* the
  lock's ``check()`` that then answered yes (a strong read of its contender
  key), or None;
* ``FencedPut``: the recipe's own fenced writes into the cluster
  (``AsyncLock.fenced_put``) that were acknowledged, with their commit version.

What must hold (``check_lock_history`` lists what does not):

1. tokens: the resource's accepted tokens never go down, and a token is one
   holder's; so do the fenced puts', by commit version;
2. sections: an accepted ``exit`` closes its own accepted ``enter``, with no
   other holder's write accepted in between (a newer holder may cut in on
   one whose lease lapsed: then the older one's ``exit`` must be refused);
3. refused means lost: a holder refused at the resource never confirms its
   hold afterwards (its key must be gone: a newer holder wrote, so the newer
   one took over);
4. no overlap: two holders that both reached the resource never both held
   at once, judged by their confirmed intervals ``[acquired, confirmed]``.
   Sound because reads are linearizable: a holder whose check started at
   ``c`` saw its key alive, so a later holder's read that saw it gone ended
   after ``c``, and its ``acquire`` returned later still.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

ENTER, EXIT = "enter", "exit"


@dataclass(frozen=True)
class ResourceWrite:
    token: int
    holder: str
    event: str  # ENTER or EXIT
    at_s: float  # virtual time it reached the resource
    accepted: bool


@dataclass(frozen=True)
class Hold:
    holder: str
    token: int
    acquired_s: float  # when acquire() returned True
    confirmed_s: float | None  # when the check() that confirmed the hold was called


@dataclass(frozen=True)
class FencedPut:
    token: int
    holder: str
    commit_ts: int


def check_lock_history(writes: Sequence[ResourceWrite], holds: Sequence[Hold],
                       fenced: Sequence[FencedPut] = ()) -> list[str]:
    """What the history shows went wrong (empty: the lock held)."""
    problems: list[str] = []
    accepted = [w for w in writes if w.accepted]
    problems += _tokens(accepted, "the resource")
    problems += _tokens([ResourceWrite(f.token, f.holder, ENTER, f.commit_ts, True)
                         for f in sorted(fenced, key=lambda f: f.commit_ts)],
                        "the fenced puts")
    problems += _sections(accepted)
    refused_at: dict[int, float] = {}
    for w in writes:
        if not w.accepted:
            refused_at.setdefault(w.token, w.at_s)
    for hold in holds:
        at = refused_at.get(hold.token)
        if at is not None and hold.confirmed_s is not None and hold.confirmed_s > at:
            problems.append(f"{hold.holder} (token {hold.token}) was refused at the resource "
                            f"at {at:.3f} s yet still held the lock at {hold.confirmed_s:.3f} s")
    problems += _overlaps(holds, {w.token for w in accepted})
    return problems


def _tokens(accepted: Sequence[ResourceWrite], where: str) -> list[str]:
    problems: list[str] = []
    holder_of: dict[int, str] = {}
    highest: ResourceWrite | None = None
    for w in accepted:
        if highest is not None and w.token < highest.token:
            problems.append(f"{where} accepted token {w.token} ({w.holder}) after "
                            f"{highest.token} ({highest.holder}): a token went down")
        if highest is None or w.token > highest.token:
            highest = w
        if holder_of.setdefault(w.token, w.holder) != w.holder:
            problems.append(f"{where}: token {w.token} used by {holder_of[w.token]} and "
                            f"{w.holder}")
    return problems


def _sections(accepted: Sequence[ResourceWrite]) -> list[str]:
    problems: list[str] = []
    open_: ResourceWrite | None = None
    for w in accepted:
        if w.event == ENTER:
            if open_ is not None and open_.token >= w.token:
                problems.append(f"{w.holder} (token {w.token}) entered at {w.at_s:.3f} s while "
                                f"{open_.holder} (token {open_.token}) was inside")
            open_ = w
        elif open_ is None or open_.token != w.token:
            inside = "nobody" if open_ is None else f"{open_.holder} (token {open_.token})"
            problems.append(f"{w.holder} (token {w.token}) left at {w.at_s:.3f} s a section "
                            f"it was not in: {inside} was inside")
            open_ = None
        else:
            open_ = None
    return problems


def _overlaps(holds: Sequence[Hold], reached: set[int]) -> list[str]:
    confirmed = sorted((h for h in holds if h.confirmed_s is not None and h.token in reached),
                       key=lambda h: (h.acquired_s, h.token))
    problems: list[str] = []
    latest: Hold | None = None  # the confirmed interval reaching furthest so far
    for hold in confirmed:
        assert hold.confirmed_s is not None
        if latest is not None and latest.confirmed_s is not None \
                and hold.acquired_s < latest.confirmed_s and hold.holder != latest.holder:
            problems.append(
                f"{latest.holder} (token {latest.token}) held from {latest.acquired_s:.3f} s "
                f"to {latest.confirmed_s:.3f} s while {hold.holder} (token {hold.token}) "
                f"held from {hold.acquired_s:.3f} s")
        if latest is None or latest.confirmed_s is None or hold.confirmed_s > latest.confirmed_s:
            latest = hold
    return problems
