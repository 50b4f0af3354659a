"""Judging a lock by what its guarded resource accepted (pure).

Each holder of a lock (``client/recipes.py``'s ``Lock``) writes to a resource
with ``fenced_put``: the write carries the holder's fencing token, and the
resource accepts it only if no higher token was accepted before. A holder
marks its critical section with an ``enter`` write and an ``exit`` write;
anything else it writes (a write retried after an unknown outcome, a late
write from a holder cut off past its lease) is a plain write of its token.

``check_fenced_history`` takes the writes the resource accepted, each a dict
with ``v`` (its commit version), ``token``, ``holder`` and ``event``, and
returns the problems (empty: none), by commit order:

* tokens never go down (a lower token after a higher one is a stale holder's
  write that got through: two holders at once);
* one token belongs to one holder;
* no two sections interleave: an ``enter`` comes only when no section is
  open or the open one has a lower token (its holder lost the lock without
  writing ``exit``), and an ``exit`` closes the section of its own token.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import pairwise
from typing import Any

ENTER = "enter"
EXIT = "exit"


def check_fenced_history(writes: Sequence[Mapping[str, Any]]) -> list[str]:
    """The problems with the fenced writes a resource accepted (empty: none)."""
    problems: list[str] = []
    ordered = sorted(writes, key=lambda w: w["v"])
    for before, after in pairwise(ordered):
        if after["token"] < before["token"]:
            problems.append(f"token went down: {dict(before)} then {dict(after)}")
    holder_of: dict[int, str] = {}
    for w in ordered:
        if holder_of.setdefault(w["token"], w["holder"]) != w["holder"]:
            problems.append(f"token {w['token']} used by {holder_of[w['token']]} "
                            f"and {w['holder']}")
    open_token: int | None = None
    for w in ordered:
        if w["event"] == ENTER:
            if open_token is not None and open_token >= w["token"]:
                problems.append(f"overlap: {dict(w)} entered while token {open_token} held")
            open_token = w["token"]
        elif w["event"] == EXIT:
            if open_token != w["token"]:
                problems.append(f"an exit outside its section (open: {open_token}): {dict(w)}")
            open_token = None
    return problems
