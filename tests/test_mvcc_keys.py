"""The MVCC key layout: token order, each key's versions adjacent and newest
first, so that a snapshot read at t (Spanner §4.1) is one seek; the records."""

from __future__ import annotations

import bisect

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ringkv.errors import CorruptRecord
from ringkv.repair import hints
from ringkv.storage import keys as data_keys
from ringkv.txn import mvcc_keys as mk

MIN_TOKEN, MAX_TOKEN, MAX_TS = mk.MIN_TOKEN, mk.MAX_TOKEN, mk.MAX_TS_US

tokens = st.integers(MIN_TOKEN, MAX_TOKEN)
# Few distinct bytes, so equal tokens, shared prefixes and 0x00/0x01/0xFF edges are common.
user_keys = st.binary(max_size=6).map(lambda b: bytes(x % 4 * 0x55 if x % 5 else x % 3 for x in b))
stamps = st.integers(0, MAX_TS)
versions = st.tuples(st.sampled_from([MIN_TOKEN + 1, -1, 0, 7, MAX_TOKEN]) | tokens, user_keys, stamps)


@pytest.mark.parametrize(
    ("key", "escaped"),
    [
        (b"", b"\x00\x01"),
        (b"a", b"a\x00\x01"),
        (b"\x00", b"\x00\xff\x00\x01"),
        (b"a\x00b", b"a\x00\xffb\x00\x01"),
        (b"\x00\xff", b"\x00\xff\xff\x00\x01"),
        (b"\xff\xff", b"\xff\xff\x00\x01"),
    ],
)
def test_key_escaping_table(key: bytes, escaped: bytes) -> None:
    assert mk.escape_key(key) == escaped
    assert mk.unescape_key(escaped) == key


@pytest.mark.parametrize(
    "damaged", [b"a", b"a\x00", b"a\x00\x02", b"\x00a\x00\x01", b"a\x00\x00\xff\x00\x01"]
)
def test_damaged_key_escapes_are_corrupt(damaged: bytes) -> None:
    with pytest.raises(CorruptRecord):
        mk.unescape_key(damaged)


def test_versions_sort_by_token_then_key_then_newest_first() -> None:
    """A table in engine order: token ascending, key bytes ascending (a key
    before its extensions, 0x00 included), commit timestamps descending."""
    ordered = [
        (MIN_TOKEN + 1, b"z", 5),
        (-5, b"a", MAX_TS),
        (-5, b"a", 20),
        (-5, b"a", 10),
        (-5, b"a", 0),
        (-5, b"a\x00", 30),
        (-5, b"a\x00", 1),
        (-5, b"a\x00\x00", 1),
        (-5, b"a\x00\x01", 1),
        (-5, b"a\x01", 1),
        (-5, b"ab", 1),
        (-5, b"a\xff", 1),
        (-5, b"b", 1),
        (0, b"", 3),
        (MAX_TOKEN, b"\xff\xff", 0),
    ]
    encoded = [mk.version_key("ks", *item) for item in ordered]
    assert encoded == sorted(encoded)
    assert [mk.parse_version_key(raw) for raw in encoded] == [
        mk.VersionKey("ks", *item) for item in ordered
    ]
    lo, hi = mk.keyspace_bounds("ks")
    assert all(lo <= raw < hi for raw in encoded)


@settings(max_examples=300)
@given(versions, versions)
def test_key_order_is_token_key_then_descending_timestamp(a, b) -> None:
    """Byte order of version keys is exactly (token, key, -commit_ts) order."""
    ka, kb = mk.version_key("ks", *a), mk.version_key("ks", *b)
    assert (ka < kb) == ((a[0], a[1], -a[2]) < (b[0], b[1], -b[2]))
    assert (ka == kb) == (a == b)


@settings(max_examples=300)
@given(versions, versions)
def test_the_versions_of_a_key_lie_between_its_prefix_and_prefix_end(a, b) -> None:
    """Adjacency: [key_prefix, key_prefix_end) holds every version of one key and no other key's."""
    prefix = mk.key_prefix("ks", a[0], a[1])
    inside = prefix <= mk.version_key("ks", *b) < mk.key_prefix_end(prefix)
    assert inside == ((b[0], b[1]) == (a[0], a[1]))


@settings(max_examples=200)
@given(st.lists(versions, max_size=30), tokens, user_keys, st.integers(-5, MAX_TS))
def test_one_seek_finds_the_newest_version_at_or_below_t(stored, token, key, at_ts) -> None:
    """Spanner §4.1: a read at t sees the newest version at or below t. In a
    sorted engine, that is the first record at or after seek_key, if it is
    still below key_prefix_end."""
    stored = stored + [(token, key, ts) for (_, _, ts) in stored[:5]]  # versions of the read key
    engine = sorted({mk.version_key("ks", *v) for v in stored})
    prefix = mk.key_prefix("ks", token, key)
    index = bisect.bisect_left(engine, mk.seek_key(prefix, at_ts))
    found = None
    if index < len(engine) and engine[index] < mk.key_prefix_end(prefix):
        found = mk.parse_version_key(engine[index]).commit_ts_us
    model = [ts for (t, k, ts) in stored if (t, k) == (token, key) and ts <= at_ts]
    assert found == (max(model) if model else None)


@pytest.mark.parametrize(
    ("at_ts", "found"), [(-1, None), (0, 0), (4, 0), (5, 5), (6, 5), (MAX_TS, MAX_TS), (2**70, MAX_TS)]
)
def test_seek_table(at_ts: int, found: int | None) -> None:
    engine = sorted(mk.version_key("ks", 1, b"k", ts) for ts in (0, 5, MAX_TS))
    engine.append(mk.version_key("ks", 1, b"l", 3))  # the next key: never an answer
    prefix = mk.key_prefix("ks", 1, b"k")
    index = bisect.bisect_left(engine, mk.seek_key(prefix, at_ts))
    hit = engine[index] if index < len(engine) and engine[index] < mk.key_prefix_end(prefix) else None
    assert (None if hit is None else mk.parse_version_key(hit).commit_ts_us) == found


@pytest.mark.parametrize(
    ("start_exclusive", "end_inclusive", "inside", "outside"),
    [
        (MIN_TOKEN, MAX_TOKEN, [MIN_TOKEN + 1, 0, MAX_TOKEN], []),
        (-10, 10, [-9, 0, 10], [-10, 11, MIN_TOKEN + 1, MAX_TOKEN]),
        (0, 0, [], [0, 1, -1]),
        (MAX_TOKEN - 1, MAX_TOKEN, [MAX_TOKEN], [MAX_TOKEN - 1]),
        (MAX_TOKEN, MAX_TOKEN, [], [MAX_TOKEN]),
        (5, -5, [], [0, 5, -5]),  # wrapping ranges are the caller's to split
    ],
)
def test_range_bounds_select_tokens_in_start_exclusive_end_inclusive(
    start_exclusive: int, end_inclusive: int, inside: list[int], outside: list[int]
) -> None:
    lo, hi = mk.range_bounds("ks", start_exclusive, end_inclusive)
    for token in inside:
        for key, ts in [(b"", 0), (b"\xff" * 4, MAX_TS), (b"k", 7)]:
            assert lo <= mk.version_key("ks", token, key, ts) < hi, token
    for token in outside:
        for key, ts in [(b"", 0), (b"\xff" * 4, MAX_TS), (b"k", 7)]:
            assert not lo <= mk.version_key("ks", token, key, ts) < hi, token


@given(st.text(max_size=12), st.text(max_size=12), versions)
def test_keyspaces_do_not_overlap(name: str, other: str, version) -> None:
    if name == other:
        return
    lo, hi = mk.keyspace_bounds(name)
    assert lo <= mk.version_key(name, *version) < hi
    assert not lo <= mk.version_key(other, *version) < hi


def test_the_mvcc_records_are_apart_from_every_other_record() -> None:
    """Distinct first bytes: the eventual tier's scans and tombstone sweep
    (``d``), hints (``h``) and the sync marker never meet an MVCC record."""
    firsts = [
        mk.VERSION_PREFIX, mk.GC_THRESHOLD_PREFIX, data_keys.DATA_PREFIX, hints.PREFIX, b"\x00",
    ]
    assert all(len(p) == 1 for p in firsts)
    assert len(set(firsts)) == len(firsts)
    raw = mk.version_key("ks", 0, b"k", 1)
    assert not data_keys.DATA_PREFIX <= raw < bytes([data_keys.DATA_PREFIX[0] + 1])


@pytest.mark.parametrize("bad", [-1, MAX_TS + 1])
def test_timestamps_out_of_range_are_refused(bad: int) -> None:
    with pytest.raises(ValueError, match="commit timestamp"):
        mk.version_key("ks", 0, b"k", bad)


@pytest.mark.parametrize(
    "raw",
    [b"", b"m", b"d" + bytes(30), b"m\x02ks" + bytes(8) + b"k\x00\x01", b"m\x09ks" + bytes(20)],
)
def test_malformed_version_keys_are_corrupt(raw: bytes) -> None:
    with pytest.raises(CorruptRecord):
        mk.parse_version_key(raw)


@pytest.mark.parametrize("value", [None, b"", b"v", b"\x00" * 3, b"x" * 1000])
def test_record_round_trips(value: bytes | None) -> None:
    assert mk.decode_record(mk.encode_record(value)) == value


@given(st.one_of(st.none(), st.binary(max_size=40)), st.data())
def test_any_single_byte_corruption_of_a_record_is_detected(value, data) -> None:
    record = bytearray(mk.encode_record(value))
    index = data.draw(st.integers(0, len(record) - 1))
    record[index] ^= data.draw(st.integers(1, 255))
    with pytest.raises(CorruptRecord):
        mk.decode_record(bytes(record))


@pytest.mark.parametrize("cut", [1, 4, 5, 6])
def test_truncated_records_are_corrupt(cut: int) -> None:
    with pytest.raises(CorruptRecord):
        mk.decode_record(mk.encode_record(b"v")[:-cut])


def test_gc_threshold_record_round_trips_and_detects_damage() -> None:
    record = mk.encode_threshold(123_456)
    assert mk.decode_threshold(record) == 123_456
    with pytest.raises(CorruptRecord):
        mk.decode_threshold(record[:-1])
    with pytest.raises(CorruptRecord):
        mk.decode_threshold(bytes([record[0] ^ 1]) + record[1:])
    assert mk.gc_threshold_key("ks") != mk.gc_threshold_key("ks2")
