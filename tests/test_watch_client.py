"""The client's watch core (``client/watch.py``): where a reconnect resumes, what it
drops as already delivered, which endings it gets past and which it raises.

``deliver_through_cuts`` cuts a stream of events at every possible point,
reconnects as the core says (the server resends everything strictly after
``from_version``), and checks each event comes out exactly once; a planted
core that resumes after the last version it saw (whole or not) is caught.
"""

from __future__ import annotations

import json
import random
from urllib.parse import parse_qs, urlsplit

import pytest

from ringkv.client.errors import InvalidArgument
from ringkv.client.watch import (
    MISSED_PROGRESS_LINES,
    PROGRESS_INTERVAL_S,
    SILENT_STREAM_S,
    StreamEnded,
    WatchCore,
    WatchEvent,
)
from ringkv.errors import BadRequest, Compacted, NoNodeAvailable, ProtocolError
from ringkv.txn import watch as server_watch


def line(doc: dict[str, object]) -> bytes:
    return json.dumps(doc).encode() + b"\n"


def put(key: str, version: int, value: object = 1) -> bytes:
    return line({"type": "put", "key": key, "version": version, "value": value})


def core(**kwargs: object) -> WatchCore:
    options: dict[str, object] = {"prefix": True, "from_version": None,
                                  "rng": random.Random(1)}
    options.update(kwargs)
    return WatchCore("txn", "p", **options)  # type: ignore[arg-type]


def from_version(watch: WatchCore) -> int | None:
    query = parse_qs(urlsplit(watch.path()).query)
    return int(query["from_version"][0]) if "from_version" in query else None


def test_the_path_names_the_watch_and_where_to_resume() -> None:
    watch = core()
    assert watch.path() == "/v1/watch/txn/p?prefix=true"
    assert watch.line(line({"type": "progress", "version": 100})) is None
    assert watch.path() == "/v1/watch/txn/p?prefix=true&from_version=100"
    whole = WatchCore("txn", "", prefix=True, from_version=0, rng=random.Random(1))
    assert whole.path() == "/v1/watch/txn?prefix=true&from_version=0"
    with pytest.raises(InvalidArgument) as refused:
        WatchCore("txn", "", prefix=False, from_version=None, rng=random.Random(1))
    assert refused.value.field == "key"
    with pytest.raises(InvalidArgument) as refused:
        WatchCore("txn", "k", prefix=False, from_version=-1, rng=random.Random(1))
    assert refused.value.field == "from_version"


def test_events_come_out_and_the_resume_point_follows_whole_versions() -> None:
    watch = core(from_version=5)
    assert watch.line(put("a", 7, {"x": 1})) == WatchEvent("put", "a", {"x": 1}, 7)
    assert from_version(watch) == 5  # version 7 may have more events
    assert watch.line(put("b", 7)) is not None and from_version(watch) == 5
    assert watch.line(line({"type": "delete", "key": "c", "version": 9})) == \
        WatchEvent("delete", "c", None, 9)
    assert from_version(watch) == 7  # a later version came: 7 is whole
    assert watch.line(put("b", 7)) is None  # a repeat of what was delivered


ENDINGS = [
    ("watcher_too_slow", StreamEnded), ("shutting_down", StreamEnded), ("no_leader", StreamEnded),
    ("compacted", Compacted), ("bad_request", BadRequest),
]


@pytest.mark.parametrize(("code", "raised"), ENDINGS)
def test_a_stream_ending_with_an_error_event(code: str, raised: type[Exception]) -> None:
    watch = core()
    error = {"code": code, "message": "m", "last_version": 3}
    if code == "compacted":
        error.update(from_version=1, oldest_version=3)
    if code == "bad_request":
        error["field"] = "x"
    with pytest.raises(raised):
        watch.line(line({"type": "error", "error": error}))


def test_refusals_a_reconnect_may_get_past_and_those_it_may_not() -> None:
    watch = core()
    watch.refused(503, b'{"error":{"code":"overloaded","message":"max_watches"}}')
    with pytest.raises(Compacted) as gone:
        watch.refused(410, json.dumps({"error": {
            "code": "compacted", "message": "m", "from_version": 1,
            "oldest_version": 9}}).encode())
    assert gone.value.oldest_version == 9
    with pytest.raises(ProtocolError):
        watch.line(b"{not json\n")


def test_reconnects_in_a_row_are_bounded_and_reset_by_progress() -> None:
    watch = core(max_reconnects=2)
    assert watch.reconnect_pause_s("http://a", "refused") >= 0
    assert watch.reconnect_pause_s("http://b", "refused") >= 0
    watch.line(line({"type": "progress", "version": 10}))  # got somewhere: the count restarts
    watch.reconnect_pause_s("http://a", "refused")
    watch.reconnect_pause_s("http://b", "refused")
    with pytest.raises(NoNodeAvailable) as lost:
        watch.reconnect_pause_s("http://c", "refused")
    assert lost.value.details["last_version"] == 10 and "http://c" in lost.value.tried


def test_a_silent_stream_is_given_up_after_a_few_missed_progress_lines() -> None:
    """The client's silence bound is a few of the node's progress intervals, not ten."""
    assert PROGRESS_INTERVAL_S == server_watch.PROGRESS_INTERVAL_S
    assert SILENT_STREAM_S == MISSED_PROGRESS_LINES * PROGRESS_INTERVAL_S
    assert 2 <= MISSED_PROGRESS_LINES <= 5 and SILENT_STREAM_S <= 5.0


def test_a_reconnect_passes_over_the_node_that_fell_silent() -> None:
    candidates = ["http://a", "http://b", "http://c"]
    watch = core()
    assert watch.next_url(candidates) == "http://a"  # the best first
    watch.reconnect_pause_s("http://a", f"silent for {SILENT_STREAM_S} s")
    assert watch.next_url(candidates) == "http://b"  # not the silent one again
    assert watch.next_url(["http://a", "http://c", "http://b"]) == "http://c"
    watch.reconnect_pause_s("http://c", "refused")
    watch.reconnect_pause_s("http://b", "refused")
    # Every one tried since the stream last spoke: they take turns.
    assert {watch.next_url(candidates)} <= set(candidates)
    watch.line(line({"type": "progress", "version": 10}))  # spoke: the best first again
    assert watch.next_url(candidates) == "http://a"


# -- the cut checker ------------------------------------------------------------------------


STREAM = [("a", 10), ("b", 10), ("c", 10), ("a", 12), ("d", 15), ("e", 15), ("b", 20)]


class _EagerCore(WatchCore):
    """Planted: resumes after the last version it saw, whole or not."""

    def line(self, raw: bytes) -> WatchEvent | None:
        event = super().line(raw)
        if event is not None:
            self.resume_us = event.version
        return event


def deliver_through_cuts(cls: type[WatchCore], cuts: list[int]) -> list[tuple[str, int]]:
    """The events a watcher gets when its connection is cut after each count of
    lines in ``cuts``; the server resends everything after ``from_version``."""
    watch = cls("txn", "", prefix=True, from_version=0, rng=random.Random(1))
    got: list[tuple[str, int]] = []
    for cut in [*cuts, len(STREAM) + 1]:
        since = from_version(watch) or 0
        sent = [line({"type": "progress", "version": since})]
        sent += [put(k, v) for k, v in STREAM if v > since]
        for raw in sent[:cut]:
            event = watch.line(raw)
            if event is not None:
                got.append((event.key, event.version))
    return got


def check_once_in_order(got: list[tuple[str, int]]) -> bool:
    return got == STREAM


def test_every_event_once_whatever_the_cuts() -> None:
    for first in range(len(STREAM) + 2):
        for second in range(len(STREAM) + 2):
            assert check_once_in_order(deliver_through_cuts(WatchCore, [first, second]))


def test_the_cut_checker_catches_a_core_resuming_inside_a_version() -> None:
    caught = sum(not check_once_in_order(deliver_through_cuts(_EagerCore, [cut]))
                 for cut in range(len(STREAM) + 2))
    assert caught > 0
