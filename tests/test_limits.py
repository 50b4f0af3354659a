"""ringkv.limits: the size limits that depend on the internode frame, and their relations."""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgpack
import pytest

from ringkv import limits
from ringkv import messages as m
from ringkv.clock import ManualClock
from ringkv.config import LimitsConfig, config_from_dict
from ringkv.errors import ConfigError
from ringkv.hlc import Timestamp
from ringkv.limits import (
    MAX_FRAME_BYTES,
    MAX_KEY_BYTES,
    MAX_SCAN_ITEMS,
    MAX_SCAN_REPLY_BYTES,
    MAX_VALUE_BYTES,
    SCAN_ITEM_OVERHEAD_BYTES,
    WRITE_ENVELOPE_BYTES,
)
from ringkv.net.codec import KIND_REQUEST, KIND_RESPONSE, MAX_REQUEST_ID, MAX_VERB_LEN, encode_frame
from ringkv.replica.local import LocalReplica
from ringkv.storage.memory import MemoryEngine
from ringkv.storage.store import LocalStore
from ringkv.versioning import Cell

LONGEST_KEYSPACE = "k" * m.MAX_NAME_BYTES
LONGEST_VERB = "v" * MAX_VERB_LEN
EXTREME_TS = Timestamp(2**63 - 1, 2**32 - 1)  # widest msgpack ints a cell header holds


def largest_cell() -> Cell:
    return Cell(b"v" * MAX_VALUE_BYTES, EXTREME_TS, expires_at_us=2**63 - 1)


def test_relations_between_the_limits():
    """The relations ringkv.limits checks at import, stated again here."""
    assert MAX_KEY_BYTES + MAX_VALUE_BYTES + WRITE_ENVELOPE_BYTES <= MAX_FRAME_BYTES
    assert MAX_SCAN_REPLY_BYTES <= MAX_FRAME_BYTES // 2
    assert (MAX_KEY_BYTES + MAX_VALUE_BYTES + SCAN_ITEM_OVERHEAD_BYTES + WRITE_ENVELOPE_BYTES
            <= MAX_FRAME_BYTES)
    assert MAX_SCAN_ITEMS * SCAN_ITEM_OVERHEAD_BYTES <= MAX_SCAN_REPLY_BYTES
    assert MAX_FRAME_BYTES < 2**32  # the codec's u32 length prefix


def test_a_broken_relation_fails_at_import():
    source = Path(limits.__file__).read_text()
    broken = source.replace("MAX_VALUE_BYTES = 15 * 1024 * 1024", "MAX_VALUE_BYTES = 16 * 1024 * 1024")
    assert broken != source
    with pytest.raises(AssertionError, match="fit one frame"):
        exec(compile(broken, "limits.py", "exec"), {"__name__": "limits_copy"})


def test_the_largest_write_fits_one_frame_within_its_envelope():
    """The internode write of the largest key and value, every other field at its
    widest, encodes within MAX_FRAME_BYTES, and its envelope is within the estimate."""
    key = b"k" * MAX_KEY_BYTES
    payload = m.KeyRef(LONGEST_KEYSPACE, -(2**63), key).to_wire()
    payload["c"] = m.cell_to_wire(largest_cell())
    frame = encode_frame(KIND_REQUEST, MAX_REQUEST_ID, LONGEST_VERB, payload,
                         max_frame_bytes=MAX_FRAME_BYTES)
    assert len(frame) - MAX_KEY_BYTES - MAX_VALUE_BYTES <= WRITE_ENVELOPE_BYTES


def test_the_largest_read_reply_fits_one_frame():
    frame = encode_frame(KIND_RESPONSE, MAX_REQUEST_ID, LONGEST_VERB,
                         m.cell_to_wire(largest_cell()), max_frame_bytes=MAX_FRAME_BYTES)
    assert len(frame) - MAX_VALUE_BYTES <= WRITE_ENVELOPE_BYTES


@pytest.mark.parametrize(
    ("key_bytes", "value_bytes"),
    [(1, 0), (255, 255), (256, 65535), (MAX_KEY_BYTES, 65536)],  # every msgpack bin header size
)
def test_scan_item_overhead_is_an_upper_bound(key_bytes, value_bytes):
    """What the replica adds per scan item to key + value bytes covers the real encoding."""
    item = (-(2**63), b"k" * key_bytes, Cell(b"v" * value_bytes, EXTREME_TS, expires_at_us=2**63 - 1))
    count = 20
    empty = len(msgpack.packb(m.ScanReply([], truncated=True).to_wire(), use_bin_type=True))
    full = len(msgpack.packb(m.ScanReply([item] * count, truncated=True).to_wire(), use_bin_type=True))
    per_item = (full - empty) / count
    assert per_item - key_bytes - value_bytes <= SCAN_ITEM_OVERHEAD_BYTES


def test_a_replica_scan_reply_fits_one_frame_with_room():
    """A replica cuts its reply at MAX_SCAN_REPLY_BYTES: with values of 1 MiB the
    reply stops after 7 of 12, and encodes to at most half a frame."""

    async def scenario() -> bytes:
        store = LocalStore(MemoryEngine(), ManualClock())
        await store.start()
        value = b"v" * (1024 * 1024)
        for i in range(12):
            await store.apply("ks", i, f"key{i}".encode(), Cell(value, Timestamp(1)))
        reply = await LocalReplica(store).scan("ks", (-(2**63), None), 2**63 - 1, limit=100)
        await store.close()
        assert reply.truncated and len(reply.items) == 7
        return encode_frame(KIND_RESPONSE, MAX_REQUEST_ID, LONGEST_VERB, reply.to_wire(),
                            max_frame_bytes=MAX_FRAME_BYTES)

    frame = asyncio.run(scenario())
    assert len(frame) <= MAX_FRAME_BYTES // 2


def test_config_caps_are_the_limits():
    """Config accepts up to the limits and no further: a value the API accepts can reach its replicas."""
    top = {"max_key_bytes": MAX_KEY_BYTES, "max_value_bytes": MAX_VALUE_BYTES,
           "max_request_bytes": 2 * MAX_VALUE_BYTES, "max_scan_page": MAX_SCAN_ITEMS}
    assert config_from_dict({"limits": top}).limits == LimitsConfig(**top)
    for name in ("max_key_bytes", "max_value_bytes", "max_scan_page"):
        with pytest.raises(ConfigError) as raised:
            config_from_dict({"limits": {**top, name: top[name] + 1}})
        assert raised.value.field == f"limits.{name}"
