"""Quorum arithmetic and the response tracker (Dynamo §4.5; etcd raft's quorum package).

The tracker's cases live in ``testdata/quorum/response_tracker.txt``, one
table a case, so a new case is a few lines of text.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ringkv.quorum import ConsistencyLevel as CL
from ringkv.quorum import Response, ResponseTracker, Vote, block_for

CASES = Path(__file__).parent / "testdata" / "quorum" / "response_tracker.txt"


def load_cases() -> list[tuple[str, list[tuple[int, str]]]]:
    cases: list[tuple[str, list[tuple[int, str]]]] = []
    for number, raw in enumerate(CASES.read_text().splitlines(), start=1):
        line = raw.strip()
        if line.startswith("tracker "):
            cases.append((f"line {number}: {line}", []))
        elif line and not line.startswith("#"):
            cases[-1][1].append((number, line))
    return cases


def run_case(header: str, steps: list[tuple[int, str]]) -> None:
    words = header.split(": ", 1)[1].split()
    options = dict(word.split("=", 1) for word in words[1:] if "=" in word)
    asked = [node for node in options["asked"].split(",") if node]
    tracker = ResponseTracker(asked, int(options["block_for"]), hints_count="hints_count" in words)
    for number, step in steps:
        action, expected = (part.strip() for part in step.split("->"))
        parts = action.split()
        if parts == ["start"]:
            got = tracker.vote
        elif parts[0] == "ask":
            got = tracker.ask(parts[1])
        else:
            got = tracker.record(parts[0], Response(parts[1]))
        assert got is Vote(expected), f"line {number}: {step!r} gave {got.value}"


@pytest.mark.parametrize("header,steps", load_cases(), ids=lambda value: str(value)[:60])
def test_response_tracker_cases(header: str, steps: list[tuple[int, str]]) -> None:
    run_case(header, steps)


def test_the_case_file_is_read_and_a_wrong_expectation_fails() -> None:
    """The table runner is not vacuous: a case with a planted wrong answer fails."""
    assert len(load_cases()) >= 10
    with pytest.raises(AssertionError, match="gave pending"):
        run_case("line 0: tracker asked=a,b block_for=2", [(1, "a ok -> won")])


@pytest.mark.parametrize(
    "level,rf,needed",
    [(CL.ONE, 3, 1), (CL.ANY, 3, 1), (CL.TWO, 3, 2), (CL.THREE, 3, 3), (CL.QUORUM, 1, 1),
     (CL.QUORUM, 3, 2), (CL.QUORUM, 4, 3), (CL.QUORUM, 5, 3), (CL.ALL, 5, 5)],
)
def test_block_for_is_a_majority_or_a_fixed_count(level: CL, rf: int, needed: int) -> None:
    """Dynamo §4.5: R + W > N when both are QUORUM, for every N."""
    assert block_for(level, rf) == needed
