"""What a coordinated request returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from ringkv.versioning import Cell


@dataclass
class Receipt:
    """What a response reports about how it was served."""

    consistency: str
    replicas: list[str]
    asked: list[str] = field(default_factory=list)
    answered: list[str] = field(default_factory=list)
    hints_stored: int = 0
    read_repair: bool = False
    repaired: list[str] = field(default_factory=list)
    speculative: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return {
            "consistency": self.consistency,
            "replicas": self.replicas,
            "asked": self.asked,
            "answered": self.answered,
            "hints_stored": self.hints_stored,
            "read_repair": self.read_repair,
            "repaired": self.repaired,
            "speculative": self.speculative,
        }


# The per-request results are named tuples: immutable, and quicker to build
# than frozen dataclasses, whose __init__ makes a setattr call per field.
class WriteResult(NamedTuple):
    cell: Cell
    receipt: Receipt


class ReadResult(NamedTuple):
    cell: Cell | None  # the reconciled cell (possibly a tombstone or expired)
    receipt: Receipt


@dataclass(frozen=True)
class ScanPage:
    items: list[tuple[int, bytes, Cell]]  # live cells only, in token order
    next_after: tuple[int, bytes] | None  # cursor for the next page; None at the end
    receipt: Receipt
