"""The client door's pure core: read deadlines, the connection cap, the open-files plan.

Sources: Apache mod_reqtimeout (a header timeout, and a body timeout that a
minimum rate extends), nginx (client_header_timeout, keepalive_timeout, and
reusing idle keep-alive connections when out of connections), RFC 9110
§15.5.9 (408 Request Timeout) and §15.5.14 (413 Content Too Large).
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ringkv.config import config_from_dict
from ringkv.door import (
    BODY_TIMEOUT,
    CLIENT_CLOSED,
    EVICTED,
    HEADER_TIMEOUT,
    IDLE_TIMEOUT,
    INTERNODE_PEERS,
    LEVELDB_FILES,
    MIN_CLIENT_CONNECTIONS,
    PROCESS_FILES,
    REFUSED,
    Connection,
    Door,
    DoorLimits,
    file_plan,
)

LIMITS = DoorLimits(header_timeout_s=10.0, body_timeout_s=5.0, body_min_rate_bytes_per_s=1000,
                    idle_timeout_s=60.0, max_connections=3, max_body_bytes=4096)


def door(**changes: float) -> Door:
    return Door(DoorLimits(**{**LIMITS.__dict__, **changes}))


def step(conn: Connection, action: str, now: float) -> None:
    """One event, as a listener's shell reports it."""
    name, _, arg = action.partition(" ")
    if name == "head":
        conn.head_started(now)
    elif name == "request":  # a whole request (a head, and a body if any)
        conn.request_complete()
    elif name == "upload":  # a whole head, its body to follow
        conn.head_complete(now)
    elif name == "body":
        conn.body_received(int(arg))
    elif name == "body_done":
        conn.body_complete(now)
    elif name == "answered":
        conn.answered(now)
    else:
        raise AssertionError(f"unknown step {action!r}")


# Each case: events at times, then (the deadline, what expires at it and whether a 408 goes out).
DEADLINE_CASES = [
    ("a new connection must send its head within the header timeout",
     [], 10.0, HEADER_TIMEOUT, None),
    ("on a new connection the head's time counts from the connect",
     [(4.0, "head")], 10.0, HEADER_TIMEOUT, "head"),
    ("a trickled head (slowloris) gains nothing from each new line",
     [(1.0, "request"), (2.0, "answered"), (3.0, "head"), (9.0, "head"), (12.0, "head")],
     13.0, HEADER_TIMEOUT, "head"),
    ("between requests a keep-alive connection may idle for the idle timeout",
     [(1.0, "request"), (2.0, "answered")], 62.0, IDLE_TIMEOUT, None),
    ("a request being served has no read deadline", [(1.0, "request")], None, None, None),
    ("a body gets the body timeout plus a second per min-rate bytes received",
     [(1.0, "upload"), (3.0, "body 2000")], 8.0, BODY_TIMEOUT, "body"),
    ("a stalled body is cut at the body timeout", [(1.0, "upload")], 6.0, BODY_TIMEOUT, "body"),
    ("a complete body leaves the request to be served",
     [(1.0, "upload"), (2.0, "body 10"), (2.0, "body_done")], None, None, None),
    ("a body still arriving after its early answer is cut without a second answer",
     [(1.0, "upload"), (1.5, "answered")], 6.0, BODY_TIMEOUT, None),
    ("a pipelined head stuck behind a request in service is closed without an answer",
     [(1.0, "request"), (2.0, "head")], 12.0, HEADER_TIMEOUT, None),
]


@pytest.mark.parametrize("what,events,deadline,reason,answer", DEADLINE_CASES,
                         ids=[case[0] for case in DEADLINE_CASES])
def test_read_deadlines(what: str, events: list[tuple[float, str]], deadline: float | None,
                        reason: str | None, answer: str | None) -> None:
    """mod_reqtimeout's header and body timeouts with MinRate; nginx's keepalive_timeout;
    RFC 9110 §15.5.9: 408 only when part of a request came and nothing older is unanswered."""
    d = door()
    conn = d.admit("owner", 0.0).connection
    assert conn is not None
    for now, action in events:
        step(conn, action, now)
    assert conn.deadline_s() == deadline
    if deadline is None:
        assert conn.expired(1e9) is None
        return
    assert conn.expired(deadline - 0.001) is None
    expiry = conn.expired(deadline)
    assert expiry is not None and expiry.reason == reason
    if answer is None:
        assert expiry.error is None
    else:
        assert expiry.error is not None
        assert (expiry.error.http_status, expiry.error.code, expiry.error.field) == (
            408, "request_timeout", answer)


def test_each_case_can_fail() -> None:
    """The table is not vacuous: a wrong expected deadline is caught."""
    with pytest.raises(AssertionError):
        test_read_deadlines(*DEADLINE_CASES[0][:2], 9.0, HEADER_TIMEOUT, None)


def test_at_the_cap_a_new_connection_takes_the_place_of_the_longest_waiting() -> None:
    """nginx's reuse of idle keep-alive connections: the one waiting longest goes first,
    a connection sending its head before one merely idle since later; busy ones stay."""
    d = door()
    a, b, c = (d.admit(name, float(i)).connection for i, name in enumerate("abc"))
    assert a is not None and b is not None and c is not None
    a.request_complete()  # busy: never evicted
    b.head_started(4.0)  # waiting since 1.0, sending a head since then
    admission = d.admit("d", 5.0)
    assert admission.connection is not None
    assert admission.evict is b and admission.evict.owner == "b"
    assert admission.evict_error is not None and admission.evict_error.code == "overloaded"
    assert not b.is_open and d.open_count == 3 and d.closed[EVICTED] == 1
    admission = d.admit("e", 6.0)
    assert admission.evict is c and admission.evict_error is None  # idle: closed without a word
    assert b.lost() is None  # its transport goes later: counted once, as evicted
    assert d.closed[EVICTED] == 2 and d.closed[CLIENT_CLOSED] == 0


def test_when_every_connection_is_busy_a_new_one_is_refused_overloaded() -> None:
    d = door(max_connections=2)
    for owner in "ab":
        conn = d.admit(owner, 0.0).connection
        assert conn is not None
        conn.head_complete(1.0)
    admission = d.admit("c", 2.0)
    assert admission.connection is None and admission.evict is None
    assert admission.refusal is not None
    assert (admission.refusal.http_status, admission.refusal.code,
            admission.refusal.details["limit"]) == (503, "overloaded", 2)
    assert d.closed[REFUSED] == 1 and d.open_count == 2


def test_an_answered_connection_waits_again_at_the_back_of_the_line() -> None:
    d = door(max_connections=2)
    a = d.admit("a", 0.0).connection
    b = d.admit("b", 1.0).connection
    assert a is not None and b is not None
    a.request_complete()
    a.answered(3.0)  # waiting again, since 3.0: b has waited longer
    assert d.admit("c", 4.0).evict is b


def test_a_client_leaving_mid_request_counts_as_client_closed_and_an_idle_one_not() -> None:
    d = door()
    busy, idle, partial = (d.admit(name, 0.0).connection for name in ("busy", "idle", "part"))
    assert busy is not None and idle is not None and partial is not None
    busy.head_complete(1.0)
    partial.head_started(1.0)
    assert (busy.lost(), idle.lost(), partial.lost()) == (CLIENT_CLOSED, None, CLIENT_CLOSED)
    assert d.closed[CLIENT_CLOSED] == 2 and d.open_count == 0
    assert busy.lost() is None  # only once


def test_a_connection_the_door_closed_is_not_counted_again_when_it_goes() -> None:
    d = door()
    conn = d.admit("a", 0.0).connection
    assert conn is not None
    conn.head_complete(0.5)
    expiry = conn.expired(100.0)
    assert expiry is not None and expiry.reason == BODY_TIMEOUT
    conn.closing(expiry.reason)
    assert conn.lost() is None and conn.expired(200.0) is None
    assert d.closed[BODY_TIMEOUT] == 1 and d.closed[CLIENT_CLOSED] == 0 and d.open_count == 0


@pytest.mark.parametrize("declared,refused", [(4096, False), (4097, True),
                                              (100_000_000_000, True)])
def test_a_declared_body_over_the_limit_is_refused_naming_it(declared: int,
                                                             refused: bool) -> None:
    """RFC 9110 §15.5.14: 413, before any of the body is read."""
    error = door().body_too_large(declared)
    assert (error is not None) == refused
    if error is not None:
        assert (error.http_status, error.code, error.limit, error.size) == (
            413, "too_large", 4096, declared)
        assert "limits.max_request_bytes" in error.message


RESERVED = LEVELDB_FILES + 2 * INTERNODE_PEERS + PROCESS_FILES


@pytest.mark.parametrize("limit,wanted,leveldb,cap,warns", [
    (1 << 20, 1024, True, 1024, False),
    (RESERVED + 1024, 1024, True, 1024, False),
    (RESERVED + 1023, 1024, True, 1023, True),
    (1250, 1024, True, 1250 - RESERVED, True),
    (1024, 1024, True, MIN_CLIENT_CONNECTIONS, True),
    (1024, 500, False, 500, False),
])
def test_the_cap_fits_the_open_files_limit_beside_leveldb_and_internode_links(
    limit: int, wanted: int, leveldb: bool, cap: int, warns: bool,
) -> None:
    plan = file_plan(limit, wanted, leveldb=leveldb)
    assert plan.client_connections == cap
    warning = plan.warning()
    assert (warning is not None) == warns
    if warning is not None:
        assert f"serving at most {cap} client connections" in warning
        assert str(plan.needed) in warning


def test_door_limits_come_from_the_config() -> None:
    config = config_from_dict({"limits": {"header_timeout_s": 2.5, "max_client_connections": 7}})
    limits = DoorLimits.from_config(config.limits)
    assert (limits.header_timeout_s, limits.max_connections, limits.max_body_bytes) == (
        2.5, 7, config.limits.max_request_bytes)
    assert DoorLimits.from_config(config.limits, max_connections=3).max_connections == 3


ACTIONS = ["head", "request", "upload", "body 500", "body 5000", "body_done", "answered"]


@given(st.lists(st.tuples(st.floats(0.0, 30.0), st.sampled_from(ACTIONS)), max_size=12))
def test_the_deadline_is_the_earliest_due_and_expires_exactly_then(
    events: list[tuple[float, str]],
) -> None:
    """Any order of events: ``deadline_s`` is the earliest of the body, head and waiting
    dues, nothing expires before it, and something expires at it."""
    d = door()
    conn = d.admit("owner", 0.0).connection
    assert conn is not None
    now = 0.0
    for delay, action in events:
        now += delay
        step(conn, action, now)
    dues = [due for due in (conn._body_due_s(), conn._head_due_s(), conn._waiting_due_s())
            if due is not None]
    deadline = conn.deadline_s()
    assert deadline == (min(dues) if dues else None)
    if deadline is not None:
        assert conn.expired(deadline - 1e-6) is None
        assert conn.expired(deadline) is not None


@given(st.lists(st.tuples(st.floats(0.0, 30.0), st.sampled_from(ACTIONS)), max_size=12))
def test_an_answer_returns_the_deadline_it_leaves(events: list[tuple[float, str]]) -> None:
    """``answered`` hands the listener its new deadline (saving a call per request):
    it must be ``deadline_s``'s."""
    d = door()
    conn = d.admit("owner", 0.0).connection
    assert conn is not None
    now = 0.0
    for delay, action in events:
        now += delay
        if action == "answered":
            assert conn.answered(now) == conn.deadline_s()
        else:
            step(conn, action, now)
