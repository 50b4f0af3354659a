"""The lock checker of ``sim/lock_fence.py``, proved on planted histories: the
real-process lock tests (``tests/test_recipes.py``, ``tests/test_coordination_netns.py``)
judge the fenced writes their guarded resource accepted with it."""

from __future__ import annotations

from typing import Any

import pytest

from ringkv.sim.lock_fence import check_fenced_history

GOOD: list[dict[str, Any]] = [
    {"v": 1, "token": 5, "holder": "a", "event": "enter"},
    {"v": 2, "token": 5, "holder": "a", "event": "exit"},
    {"v": 3, "token": 9, "holder": "b", "event": "enter"},
    {"v": 4, "token": 9, "holder": "b", "event": "late"},  # a write of its own token
    {"v": 5, "token": 12, "holder": "c", "event": "enter"},  # b lost it without an exit
    {"v": 6, "token": 12, "holder": "c", "event": "exit"},
]


def test_a_clean_history_passes_in_any_order_given() -> None:
    assert check_fenced_history(GOOD) == []
    assert check_fenced_history(list(reversed(GOOD))) == []  # judged by commit order


@pytest.mark.parametrize("bad,what", [
    ([GOOD[0], {"v": 2, "token": 9, "holder": "b", "event": "enter"},
      {"v": 3, "token": 5, "holder": "a", "event": "exit"}], "went down"),  # interleaved
    ([*GOOD, {"v": 7, "token": 12, "holder": "d", "event": "late"}], "used by"),  # shared token
    ([GOOD[0], {"v": 2, "token": 4, "holder": "b", "event": "enter"}], "went down"),
    ([*GOOD[:5], {"v": 6, "token": 9, "holder": "b", "event": "late"}], "went down"),  # stale
    ([GOOD[0], {"v": 2, "token": 5, "holder": "a", "event": "enter"}], "overlap"),  # re-entered
    ([*GOOD[:2], {"v": 3, "token": 5, "holder": "a", "event": "exit"}], "outside"),
])
def test_planted_bad_histories_are_caught(bad: list[dict[str, Any]], what: str) -> None:
    problems = check_fenced_history(bad)
    assert problems and any(what in p for p in problems), problems
