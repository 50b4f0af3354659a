"""Plans: the I/O an operation asks for, the outcomes it gets back, and how a client steps one.

Each operation of the client (``operations.py``) is a generator, a *plan*. It
yields effects (``Send`` an HTTP request, ``Sleep`` a while, ``Emit`` an item
to a streaming caller), receives each effect's outcome, and returns its
result. A plan performs no I/O itself: the blocking client (``blocking.py``)
and the asyncio client (``aio.py``) each perform the effects in their own
way, stepping through the plan with a ``Stepper``.
"""

from __future__ import annotations

from collections.abc import Generator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Send:
    """Send one HTTP request and wait at most ``timeout_s`` for its whole answer."""

    method: str
    url: str
    body: bytes | None
    headers: Mapping[str, str]
    timeout_s: float


@dataclass(frozen=True)
class Sleep:
    seconds: float


@dataclass(frozen=True)
class Emit:
    """A streaming operation hands one item to its consumer."""

    item: Any


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes
    headers: Mapping[str, str]


@dataclass(frozen=True)
class Failure:
    """No HTTP answer. ``kind``: "connect" (never sent), "timeout" or "io" (may have run)."""

    kind: str
    reason: str


Effect = Send | Sleep | Emit
# A Send gets a Reply or a Failure back; a Sleep or an Emit gets None.
Outcome = Reply | Failure | None
# A plan yields I/O effects, receives their outcomes, and returns its result.
Plan = Generator[Effect, Outcome, T]


class Stepper:
    """Steps a plan for a client: iterate over its effects, and set ``outcome`` after each.

    When the plan ends, its result is appended to ``result``; leaving the
    ``with`` block closes the plan (so an abandoned scan releases what it holds).
    """

    def __init__(self, plan: Plan[Any], result: list[Any]) -> None:
        self._plan = plan
        self._result = result
        self.outcome: Outcome = None

    def __enter__(self) -> Stepper:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._plan.close()

    def __iter__(self) -> Stepper:
        return self

    def __next__(self) -> Effect:
        outcome, self.outcome = self.outcome, None
        try:
            return self._plan.send(outcome)
        except StopIteration as done:
            self._result.append(done.value)
            raise StopIteration from None
