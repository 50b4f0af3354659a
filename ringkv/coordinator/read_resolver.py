"""The read path's decisions, without the waiting (pure).

Dynamo §4.5 and Cassandra's ``DigestResolver``: a read asks one replica for
the data and ``block_for - 1`` others for a digest of theirs. ``ReadRound``
decides whom to ask and when the read has enough: it counts answers with
the same ``ResponseTracker`` as writes, brings in a spare replica when one of
those asked fails (or, through ``on_slow``, when one is slower than the
speculative-retry threshold), and remembers which replicas reported a
corrupt record. ``resolve`` turns data and digests into the winner and the
replicas to repair, or says that full data is needed first because a digest
disagreed.

The coordinator's driver (``driver.py``) sends the asks, waits, and feeds
answers back in; nothing here awaits, sends or reads a clock.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

from ringkv.quorum import FAILED, LOST, OK, PENDING, WON, ResponseTracker, Vote
from ringkv.versioning import Cell, cell_digest, reconcile


class Ask(NamedTuple):
    node: str
    data: bool  # the full cell, or only its digest


NOTHING: tuple[Ask, ...] = ()  # no new asks


class ReadRound:
    """Whom a read asks, and whether it has enough answers yet."""

    def __init__(self, targets: Sequence[str], spares: Sequence[str], block_for: int) -> None:
        if not targets:
            raise ValueError("a read asks at least one replica")
        self._targets = list(targets)
        self._spares = list(spares)
        self.block_for = block_for
        self.tracker = ResponseTracker(self._targets, block_for)
        self.data: dict[str, Cell | None] = {}
        self.digests: dict[str, bytes] = {}
        self.corrupt: list[str] = []
        self.speculative: list[str] = []  # spares asked, in order
        self.speculated = False  # a spare was asked for slowness (once per read)

    def start(self) -> list[Ask]:
        first, rest = self._targets[0], self._targets[1:]
        return [Ask(first, True)] + [Ask(node, False) for node in rest]

    def on_data(self, node: str, cell: Cell | None) -> Sequence[Ask]:
        tracker = self.tracker
        if node in tracker.outstanding:  # not a duplicate, nor a replica never asked
            self.data[node] = cell
            if tracker.record(node, OK) is WON:
                return NOTHING  # won, with data: the usual end of a read
        return self._refill()

    def on_digest(self, node: str, digest: bytes) -> Sequence[Ask]:
        tracker = self.tracker
        if node in tracker.outstanding:
            self.digests[node] = digest
            if tracker.record(node, OK) is WON and self.data:
                return NOTHING
        return self._refill()

    def on_failure(self, node: str, *, corrupt: bool = False) -> Sequence[Ask]:
        if corrupt and node not in self.corrupt:
            # A replica whose record failed its checksum is stale: the read
            # repair write replaces the record (LocalStore.apply).
            self.corrupt.append(node)
        self.tracker.record(node, FAILED)
        return self._refill()

    def on_slow(self) -> Sequence[Ask]:
        """The read waited past the speculative threshold: back it up with a spare."""
        if not self.can_speculate:
            return NOTHING
        self.speculated = True
        return [self._ask_spare()]

    @property
    def can_speculate(self) -> bool:
        return bool(self._spares) and not self.speculated and self.vote is PENDING

    @property
    def vote(self) -> Vote:
        vote = self.tracker.vote
        if vote is WON and not self.data:
            # Enough digests but no data to compare them with: only a data
            # read (a spare) can finish this read. (A read asks one data and
            # block_for - 1 digests, and spares for data, so this is rare.)
            return PENDING if self.tracker.outstanding or self._spares else LOST
        return vote

    @property
    def answered(self) -> list[str]:
        return list(self.data) + list(self.digests)

    def _refill(self) -> Sequence[Ask]:
        """Once those asked can no longer make the quorum, ask a spare."""
        if not self._spares:
            return NOTHING
        if (
            self.tracker.vote is LOST
            or (self.vote is PENDING and not self.tracker.outstanding)
        ):
            return [self._ask_spare()]
        return NOTHING

    def _ask_spare(self) -> Ask:
        node = self._spares.pop(0)
        self.speculative.append(node)
        self.tracker.ask(node)
        return Ask(node, True)


class Resolution(NamedTuple):
    winner: Cell | None  # the newest cell (last write wins), once resolved
    stale: tuple[str, ...]  # replicas to write the winner back to (blocking read repair)
    needs_data_from: tuple[str, ...]  # a digest disagreed: fetch these replicas' data first

    @property
    def resolved(self) -> bool:
        return not self.needs_data_from


def resolve(
    data: Mapping[str, Cell | None],
    digests: Mapping[str, bytes],
    corrupt: Sequence[str] = (),
) -> Resolution:
    """Dynamo §4.5 read reconciliation over what the replicas answered.

    If every digest matches the data, the data is the answer and only
    corrupt replicas need repair. Otherwise full data is needed from every
    replica that sent a digest; called again with that data (and no
    digests), the winner is the newest cell and every replica that answered
    anything else is stale.
    """
    if not data:
        raise ValueError("resolve needs at least one data answer")
    cells = list(data.values())
    reference = cells[0]
    if len(cells) == 1 and digests:
        # The usual QUORUM read: one data answer, digests that match it.
        expected = cell_digest(reference)
        for digest in digests.values():
            if digest != expected:
                return Resolution(None, (), tuple(digests))
        return Resolution(reference, tuple(corrupt), ())
    if digests:
        expected = cell_digest(reference)
        if any(digest != expected for digest in digests.values()) or any(
            cell != reference for cell in cells
        ):
            return Resolution(None, (), tuple(digests))
    winner: Cell | None = None
    for cell in cells:
        winner = reconcile(winner, cell)
    stale = [node for node, cell in data.items() if cell != winner]
    stale += [node for node in corrupt if node not in stale]
    return Resolution(winner, tuple(stale), ())
