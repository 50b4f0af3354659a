"""Cells, the record format and last-write-wins reconciliation."""

from __future__ import annotations

import functools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ringkv.hlc import Timestamp
from ringkv.errors import CorruptRecord
from ringkv.versioning import (
    Cell,
    cell_digest,
    decode_cell,
    encode_cell,
    reconcile,
    tombstone,
)

timestamps = st.builds(
    Timestamp, st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1)
)
cells = st.one_of(
    st.builds(
        Cell,
        value=st.binary(min_size=1, max_size=64),
        ts=timestamps,
        tombstone=st.just(False),
        expires_at_us=st.one_of(st.none(), st.integers(0, 2**64 - 1)),
    ),
    st.builds(tombstone, timestamps),
)


@given(cells)
def test_record_round_trips(cell: Cell) -> None:
    assert decode_cell(encode_cell(cell)) == cell


@given(cells, st.data())
def test_any_single_byte_corruption_is_detected(cell: Cell, data: st.DataObject) -> None:
    """A corrupt record is reported as corrupt, never returned as data."""
    record = bytearray(encode_cell(cell))
    index = data.draw(st.integers(0, len(record) - 1))
    flip = data.draw(st.integers(1, 255))
    record[index] ^= flip
    with pytest.raises(CorruptRecord):
        decode_cell(bytes(record))


@given(cells, st.integers(0, 40))
def test_truncated_records_are_corrupt(cell: Cell, cut: int) -> None:
    record = encode_cell(cell)
    with pytest.raises(CorruptRecord):
        decode_cell(record[: max(0, len(record) - 1 - cut)])


@given(st.lists(cells, min_size=1, max_size=8), st.randoms(use_true_random=False))
def test_arrival_order_never_matters(writes: list[Cell], rnd) -> None:
    """An older write never overwrites a newer one, whatever the order of arrival.

    Dynamo §4.4 reconciles divergent versions; with LWW cells the merge must be
    a join (commutative, associative, idempotent), so every replica that saw
    the same writes in any order converges on the same cell: the highest ranked.
    """
    shuffled = list(writes)
    rnd.shuffle(shuffled)
    in_order = functools.reduce(reconcile, writes, None)
    any_order = functools.reduce(reconcile, shuffled, None)
    assert in_order == any_order
    newest = max(write.ts for write in writes)
    assert in_order is not None and in_order.ts == newest
    assert reconcile(in_order, in_order) == in_order


@pytest.mark.parametrize(
    ("a", "b", "winner"),
    [
        # Newer timestamp wins, value or tombstone alike.
        (Cell(b"1", Timestamp(10)), Cell(b"2", Timestamp(11)), "b"),
        (Cell(b"1", Timestamp(10, 5)), Cell(b"2", Timestamp(10, 4)), "a"),
        (tombstone(Timestamp(12)), Cell(b"2", Timestamp(11)), "a"),
        (tombstone(Timestamp(10)), Cell(b"2", Timestamp(11)), "b"),
        # Ties: a delete beats a write with the same timestamp...
        (Cell(b"9", Timestamp(10)), tombstone(Timestamp(10)), "b"),
        # ...no expiry beats an expiry, a later expiry beats an earlier one...
        (Cell(b"1", Timestamp(10), expires_at_us=5), Cell(b"1", Timestamp(10)), "b"),
        (Cell(b"1", Timestamp(10), expires_at_us=5), Cell(b"1", Timestamp(10), expires_at_us=6), "b"),
        # ...and then the larger value bytes.
        (Cell(b'"a"', Timestamp(10)), Cell(b'"b"', Timestamp(10)), "b"),
        (None, Cell(b"1", Timestamp(1)), "b"),
        (Cell(b"1", Timestamp(1)), None, "a"),
    ],
)
def test_reconcile_table(a: Cell | None, b: Cell | None, winner: str) -> None:
    expected = a if winner == "a" else b
    assert reconcile(a, b) == expected
    assert reconcile(b, a) == expected


def test_liveness_and_purge_rules() -> None:
    second = 1_000_000
    live = Cell(b"1", Timestamp(100 * second))
    expiring = Cell(b"1", Timestamp(100 * second), expires_at_us=110 * second)
    deleted = tombstone(Timestamp(100 * second))
    assert live.is_live(10**18) and not live.is_purgeable(10**18, 0)
    assert expiring.is_live(109 * second) and not expiring.is_live(110 * second)
    assert not expiring.is_purgeable(114 * second, gc_grace_s=5)
    assert expiring.is_purgeable(115 * second, gc_grace_s=5)
    assert not deleted.is_live(100 * second)
    assert not deleted.is_purgeable(104 * second, gc_grace_s=5)
    assert deleted.is_purgeable(105 * second, gc_grace_s=5)


def test_digest_distinguishes_cells() -> None:
    a = Cell(b"1", Timestamp(1))
    assert cell_digest(a) == cell_digest(Cell(b"1", Timestamp(1)))
    assert cell_digest(a) != cell_digest(Cell(b"1", Timestamp(2)))
    assert cell_digest(None) != cell_digest(a)
