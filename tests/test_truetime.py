"""TrueTime (Spanner §3) and commit wait (Spanner §4.1.2), with NTP-style offsets
(RFC 5905 §8) combined by Marzullo's intersection (RFC 5905 §11.2.1).

The simulated clocks below follow ``sim/clock.py``: wall = epoch + elapsed x
(1 + drift) + offset, truncated to whole µs, and a monotonic clock with the
same drift that never steps.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ringkv.errors import BY_CODE, ClockUncertain, RingKVError
from ringkv.txn import truetime
from ringkv.txn.truetime import (
    CERTAIN,
    DISAGREE,
    LOCAL_CLOCK,
    MAX_DRIFT_PPM,
    MAX_SAMPLE_AGE_S,
    MAX_UNCERTAINTY_MS,
    MIN_UNCERTAINTY_MS,
    READING_SLACK_US,
    UNMEASURED,
    WIDE,
    OffsetSample,
    OffsetTracker,
    TrueTime,
    TTInterval,
    marzullo,
    ntp_sample,
)

EPOCH_US = 1_700_000_000_000_000
FLOOR_US = MIN_UNCERTAINTY_MS * 1000
BOUND_US = MAX_UNCERTAINTY_MS * 1000


@dataclass
class Machine:
    """A clock as the simulator models one; ``t`` is true time in µs since ``EPOCH_US``."""

    offset_us: float = 0.0
    drift_ppm: float = 0.0
    mono_base_s: float = 100.0

    def wall_us(self, t: float) -> int:
        return EPOCH_US + math.floor(t * (1 + self.drift_ppm * 1e-6) + self.offset_us)

    def monotonic_s(self, t: float) -> float:
        return self.mono_base_s + t * (1 + self.drift_ppm * 1e-6) / 1e6

    def sleep_true_us(self, local_us: float) -> float:
        """True µs that pass while this machine sleeps ``local_us`` of its own time."""
        return local_us / (1 + self.drift_ppm * 1e-6)


def ping(local: Machine, peer: Machine, t: float, *, out_us: float, hold_us: float,
         back_us: float) -> tuple[OffsetSample, float, float]:
    """One exchange sent at true time ``t``: the sample, the arrival's monotonic reading
    and true time. ``t3`` is ``t0`` plus the elapsed monotonic time, as the shell takes it."""
    arrive = t + out_us + hold_us + back_us
    t0 = local.wall_us(t)
    t1 = peer.wall_us(t + out_us)
    t2 = peer.wall_us(t + out_us + hold_us)
    t3 = t0 + math.floor((local.monotonic_s(arrive) - local.monotonic_s(t)) * 1e6)
    return ntp_sample(t0, t1, t2, t3), local.monotonic_s(arrive), arrive


def cluster(peers: dict[str, Machine], local: Machine | None = None) -> tuple[TrueTime, Machine]:
    return TrueTime(peers), local or Machine()


def sample_all(tt: TrueTime, local: Machine, peers: dict[str, Machine], t: float,
               one_way_us: float = 100.0, hold_us: float = 20.0) -> float:
    arrived = t
    for name, peer in peers.items():
        sample, mono, arrived = ping(local, peer, t, out_us=one_way_us, hold_us=hold_us,
                                     back_us=one_way_us)
        assert tt.record(name, sample, mono)
    return arrived


# ---- one ping exchange (RFC 5905 §8) ---------------------------------------------------------

SAMPLES = [
    # name, (t0, t1, t2, t3), offset, delay, bound, (low, high)
    ("in step, symmetric", (1000, 1100, 1120, 1220), 0, 200, 100, (-100, 100)),
    ("peer 5 ms ahead", (1000, 6100, 6120, 1220), 5000, 200, 5100, (4900, 5100)),
    ("peer 5 ms behind", (1000, -3900, -3880, 1220), -5000, 200, 5100, (-5100, -4900)),
    ("asymmetric path: all delay one way", (0, 300, 300, 300), 150, 300, 300, (0, 300)),
    ("peer held the ping 10 ms", (0, 100, 10_100, 10_200), 0, 200, 100, (-100, 100)),
    ("zero delay", (0, 7, 7, 0), 7, 0, 7, (7, 7)),
    ("odd sum rounds down", (0, 1, 1, 1), 0, 1, 1, (0, 1)),
]


@pytest.mark.parametrize("name,stamps,offset,delay,bound,span", SAMPLES,
                         ids=[case[0] for case in SAMPLES])
def test_ntp_sample_offset_delay_and_bound(
    name: str, stamps: tuple[int, int, int, int], offset: int, delay: int, bound: int,
    span: tuple[int, int],
) -> None:
    """NTP: offset = ((t1-t0)+(t2-t3))/2, delay = (t3-t0)-(t2-t1); the true offset lies in
    [t2-t3, t1-t0] = offset ± delay/2, and the issue's bound is |offset| + delay/2."""
    sample = ntp_sample(*stamps)
    t0, t1, t2, t3 = stamps
    assert sample.offset_us == ((t1 - t0) + (t2 - t3)) // 2 == offset
    assert sample.delay_us == (t3 - t0) - (t2 - t1) == delay
    assert sample.bound_us == bound
    assert (sample.offset_low_us, sample.offset_high_us) == span
    assert sample.offset_high_us - sample.offset_low_us == sample.delay_us


@pytest.mark.parametrize("stamps,match", [
    ((100, 0, 0, 50), "before the ping was sent"),
    ((0, 50, 10, 100), "answered before it received"),
    ((0, 0, 500, 100), "longer than the round trip"),
    ((0, 0, 0, True), "int of microseconds"),
    ((0.5, 0, 0, 1), "int of microseconds"),
])
def test_impossible_exchanges_are_refused(stamps: tuple[int, int, int, int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ntp_sample(*stamps)


@settings(max_examples=300, deadline=None)
@given(
    offset=st.integers(-10**9, 10**9), out=st.integers(0, 10**6), hold=st.integers(0, 10**6),
    back=st.integers(0, 10**6), t0=st.integers(-10**12, 10**12),
)
def test_the_true_offset_lies_in_the_sample_interval(
    offset: int, out: int, hold: int, back: int, t0: int
) -> None:
    """RFC 5905 §8: whatever the (non-negative) one-way delays, the true offset is within
    offset ± delay/2."""
    t1 = t0 + offset + out
    t2 = t1 + hold
    t3 = t2 - offset + back
    sample = ntp_sample(t0, t1, t2, t3)
    assert sample.offset_low_us <= offset <= sample.offset_high_us
    assert sample.delay_us == out + back
    assert abs(offset) <= sample.bound_us


# ---- Marzullo (RFC 5905 §11.2.1) -------------------------------------------------------------

I = TTInterval
MARZULLO = [
    # name, intervals, min_sources, expected (earliest, latest, most) or None
    ("one source", [I(0, 10)], None, (0, 10, 1)),
    ("nested: all agree on the innermost", [I(0, 100), I(10, 90), I(40, 60)], None, (40, 60, 3)),
    ("classic: one falseticker far off", [I(0, 10), I(2, 12), I(100, 110)], None, (2, 10, 2)),
    ("two falsetickers far off, three truechimers",
     [I(0, 10), I(2, 12), I(4, 9), I(100, 110), I(-500, -400)], None, (4, 9, 3)),
    ("closed intervals: touching ends agree on the point", [I(0, 5), I(5, 10)], None, (5, 5, 2)),
    ("tie between two disjoint pairs: the hull of both",
     [I(0, 10), I(5, 15), I(100, 110), I(105, 115)], None, (5, 110, 2)),
    ("nobody agrees: each point holds one", [I(0, 1), I(10, 11), I(20, 21)], None, (0, 21, 1)),
    # A falseticker overlapping both truechimers: the classic answer leaves true time (10) out,
    # the fault model's (2 of 3 correct) keeps it.
    ("overlapping falseticker, classic", [I(0, 20), I(5, 100), I(15, 60)], None, (15, 20, 3)),
    ("overlapping falseticker, 2 of 3", [I(0, 20), I(5, 100), I(15, 60)], 2, (5, 60, 3)),
    ("1 of 2: the hull", [I(0, 10), I(50, 60)], 1, (0, 60, 1)),
    ("2 of 2 disjoint: none", [I(0, 10), I(50, 60)], 2, None),
    ("more than there are: none", [I(0, 10)], 2, None),
    ("no sources", [], None, None),
    ("min_sources 0: none", [I(0, 10)], 0, None),
]


@pytest.mark.parametrize("name,intervals,min_sources,expected", MARZULLO,
                         ids=[case[0] for case in MARZULLO])
def test_marzullo(name: str, intervals: list[TTInterval], min_sources: int | None,
                  expected: tuple[int, int, int] | None) -> None:
    agreement = marzullo(intervals, min_sources)
    if expected is None:
        assert agreement is None
    else:
        assert agreement is not None
        assert (agreement.interval.earliest_us, agreement.interval.latest_us,
                agreement.most) == expected
    # Order of the sources never matters.
    assert marzullo(list(reversed(intervals)), min_sources) == agreement


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(-1000, 1000), st.integers(0, 500)), min_size=1, max_size=7),
       st.integers(-1000, 1500), st.data())
def test_marzullo_keeps_every_point_enough_sources_share(
    raw: list[tuple[int, int]], point: int, data: st.DataObject
) -> None:
    """The defining property, by brute force: every point in at least k intervals is inside."""
    intervals = [I(start, start + width) for start, width in raw]
    k = data.draw(st.integers(1, len(intervals)))
    agreement = marzullo(intervals, k)
    depth = sum(interval.contains(point) for interval in intervals)
    if depth >= k:
        assert agreement is not None and agreement.interval.contains(point)
    if agreement is not None:
        for end in (agreement.interval.earliest_us, agreement.interval.latest_us):
            assert sum(interval.contains(end) for interval in intervals) >= k  # smallest such


# ---- the interval and ε (Spanner §3) ---------------------------------------------------------


def test_interval_after_and_before_follow_spanner() -> None:
    """Spanner §3: TT.after(t) is t < earliest, TT.before(t) is t > latest; ε is half the
    width."""
    interval = TTInterval(100, 111)
    assert interval.epsilon_us == 6 and interval.midpoint_us == 105
    assert [interval.after(t) for t in (98, 99, 100, 101)] == [True, True, False, False]
    assert [interval.before(t) for t in (110, 111, 112)] == [False, False, True]
    with pytest.raises(ValueError, match="empty"):
        TTInterval(5, 4)


PEERS3 = {"b": Machine(), "c": Machine()}


def test_epsilon_is_floor_plus_half_the_round_trip_when_clocks_agree() -> None:
    """The issue's ε = floor + offset bound (drift 0 right after a sample): all clocks in step,
    a 200 µs round trip: ε is 1 ms + 100 µs, give or take the reading slack."""
    tt, local = cluster(PEERS3)
    t = sample_all(tt, local, PEERS3, 0.0)
    status = tt.status(local.wall_us(t), local.monotonic_s(t))
    assert status.verdict == CERTAIN and status.measured == 3 and status.agreeing == 3
    assert status.epsilon_us is not None
    assert FLOOR_US + 100 <= status.epsilon_us <= FLOOR_US + 100 + 2 * READING_SLACK_US + 2
    assert status.interval is not None and status.interval.contains(EPOCH_US + t)


DRIFT = [  # seconds since the last sample -> the drift budget's share of ε, in µs
    (0.0, 0), (1.0, 200), (10.0, 2000), (29.0, 5800), (MAX_SAMPLE_AGE_S - 0.1, 5980),
]


@pytest.mark.parametrize("age_s,budget_us", DRIFT)
def test_epsilon_grows_by_the_drift_budget_between_samples(age_s: float, budget_us: int) -> None:
    """Spanner §3: between synchronisations ε grows at the assumed worst drift, 200 µs/s
    (the sawtooth), measured on the monotonic clock."""
    tt, local = cluster(PEERS3)
    t = sample_all(tt, local, PEERS3, 0.0)
    eps0 = tt.status(local.wall_us(t), local.monotonic_s(t)).epsilon_us
    later = t + age_s * 1e6
    status = tt.status(local.wall_us(later), local.monotonic_s(later))
    assert status.verdict == CERTAIN
    assert eps0 is not None and status.epsilon_us is not None
    assert budget_us - 3 <= status.epsilon_us - eps0 <= budget_us + 3
    assert status.last_sample_age_s == pytest.approx(age_s, abs=1e-6)


def test_a_sample_past_its_age_stops_counting_and_a_new_one_restarts_the_sawtooth() -> None:
    """Spanner §3: the sawtooth restarts at each synchronisation; a node whose samples have all
    aged out cannot bound ε at all (it does not fall back to a tight guess)."""
    tt, local = cluster(PEERS3)
    sample_all(tt, local, PEERS3, 0.0)
    old = (MAX_SAMPLE_AGE_S + 1) * 1e6
    status = tt.status(local.wall_us(old), local.monotonic_s(old))
    assert status.verdict == UNMEASURED and status.interval is None and status.measured == 1
    assert "ε unknown" in status.reason and "250.000 ms" in status.reason
    t = sample_all(tt, local, PEERS3, old)
    fresh = tt.status(local.wall_us(t), local.monotonic_s(t))
    assert fresh.verdict == CERTAIN and fresh.epsilon_us is not None
    assert fresh.epsilon_us < FLOOR_US + 200


def test_the_narrowest_recent_sample_counts_not_the_latest() -> None:
    """NTP's clock filter: one slow answer (a paused peer, a queue) does not widen ε."""
    tt, local = cluster(PEERS3)
    t = sample_all(tt, local, PEERS3, 0.0)
    eps_good = tt.status(local.wall_us(t), local.monotonic_s(t)).epsilon_us
    t = sample_all(tt, local, PEERS3, t + 1e6, one_way_us=300_000)  # 600 ms round trip
    status = tt.status(local.wall_us(t), local.monotonic_s(t))
    assert status.verdict == CERTAIN
    assert eps_good is not None and status.epsilon_us is not None
    assert status.epsilon_us < eps_good + 1000  # the 1 s old sample plus its drift budget
    # Alone, the slow sample would fence the node.
    alone, _ = cluster(PEERS3)
    sample_all(alone, local, PEERS3, 0.0, one_way_us=300_000)
    assert alone.status(local.wall_us(t), local.monotonic_s(0.6e6)).verdict == WIDE


# ---- fencing (Spanner §3 / issue #11: refuse rather than break external consistency) ---------


@dataclass
class Case:
    name: str
    peers: dict[str, Machine]
    verdict: str
    local: Machine = field(default_factory=Machine)
    sampled: tuple[str, ...] | None = None  # which peers answered (default all)
    one_way_us: float = 100.0
    offset_near_us: float | None = None  # the estimated local clock error, if checked


FENCING = [
    Case("three clocks in step", PEERS3, CERTAIN, offset_near_us=0),
    Case("nothing measured yet: ε unknown, not a tight guess", PEERS3, UNMEASURED, sampled=()),
    Case("one of two peers answered: still a majority of three", PEERS3, CERTAIN, sampled=("b",)),
    Case("a falseticker peer 1 s ahead is outvoted", {"b": Machine(), "c": Machine(1e6)},
         CERTAIN, offset_near_us=0),
    Case("local clock 1 s behind the majority is fenced", PEERS3, LOCAL_CLOCK,
         local=Machine(-1e6), offset_near_us=1e6),
    Case("local clock 100 ms fast: inside the bound, serves", PEERS3, CERTAIN,
         local=Machine(100_000), offset_near_us=-100_000),
    Case("local clock 240 ms slow: inside the bound, serves", PEERS3, CERTAIN,
         local=Machine(-240_000), offset_near_us=240_000),
    Case("local clock 249.5 ms slow: with ε on top it may be beyond, fenced", PEERS3, LOCAL_CLOCK,
         local=Machine(-249_500), offset_near_us=249_500),
    Case("every clock 1 s from every other: no agreement", {"b": Machine(1e6), "c": Machine(2e6)},
         DISAGREE),
    Case("the one peer heard disagrees by 1 s: cannot tell who is right",
         {"b": Machine(1e6), "c": Machine()}, WIDE, sampled=("b",)),
    Case("600 ms round trips: ε above the bound", PEERS3, WIDE, one_way_us=300_000),
    Case("two nodes in step", {"b": Machine()}, CERTAIN),
    Case("two nodes, peer not heard: ε unknown", {"b": Machine()}, UNMEASURED, sampled=()),
    Case("two nodes 1 s apart: no agreement", {"b": Machine(1e6)}, DISAGREE),
    Case("a cluster of one: its own clock", {}, CERTAIN),
    Case("five clocks, two falsetickers either side",
         {"b": Machine(), "c": Machine(300), "d": Machine(5e5), "e": Machine(-7e5)}, CERTAIN,
         offset_near_us=0),
    Case("five clocks, two peers heard: a bare majority",
         {"b": Machine(), "c": Machine(), "d": Machine(), "e": Machine()}, CERTAIN,
         sampled=("b", "c")),
    Case("five clocks, one peer heard: ε unknown",
         {"b": Machine(), "c": Machine(), "d": Machine(), "e": Machine()}, UNMEASURED,
         sampled=("b",)),
]


@pytest.mark.parametrize("case", FENCING, ids=[case.name for case in FENCING])
def test_fencing(case: Case) -> None:
    """Issue #11's fence: refuse when ε is unknown or above 250 ms, or when the local clock may
    be further than that from the time a majority keep; serve otherwise. The interval holds true
    time in every case where there is one, fenced or not (Spanner §3's invariant)."""
    tt, local = cluster(case.peers, case.local)
    sampled = case.peers if case.sampled is None else {p: case.peers[p] for p in case.sampled}
    t = sample_all(tt, local, sampled, 0.0, one_way_us=case.one_way_us)
    status = tt.status(local.wall_us(t), local.monotonic_s(t))
    assert status.verdict == case.verdict, status.reason
    assert status.uncertain == (case.verdict != CERTAIN)
    if status.interval is not None:
        assert status.interval.contains(EPOCH_US + t)
    if case.offset_near_us is not None:
        assert status.offset_us is not None
        assert abs(status.offset_us - case.offset_near_us) <= 2 * FLOOR_US
    assert "250.000 ms" in status.reason
    if status.epsilon_us is not None:
        assert f"ε {status.epsilon_us / 1000:.3f} ms" in status.reason
    if status.uncertain:
        with pytest.raises(ClockUncertain) as caught:
            tt.check(local.wall_us(t), local.monotonic_s(t))
        assert caught.value.http_status == 503 and caught.value.code == "clock_uncertain"
        assert caught.value.epsilon_us == status.epsilon_us
        assert caught.value.max_uncertainty_us == BOUND_US
    else:
        assert tt.check(local.wall_us(t), local.monotonic_s(t)) == status


def test_the_fence_lifts_once_the_node_is_back_inside_the_bound() -> None:
    """Issue #11: refused until it is back inside the bound."""
    tt, local = cluster(PEERS3, Machine(-1e6))
    t = sample_all(tt, local, PEERS3, 0.0)
    assert tt.status(local.wall_us(t), local.monotonic_s(t)).verdict == LOCAL_CLOCK
    local.offset_us = 0.0  # the operator fixes NTP; the wall clock steps back
    assert tt.status(local.wall_us(t), local.monotonic_s(t)).verdict == CERTAIN


def test_a_local_wall_step_does_not_move_the_interval() -> None:
    """Samples are carried forward on the monotonic clock, so a wall-clock step after them
    moves only the local clock's own vote: the interval still holds true time."""
    tt, local = cluster(PEERS3)
    t = sample_all(tt, local, PEERS3, 0.0)
    before = tt.now(local.wall_us(t), local.monotonic_s(t))
    local.offset_us += 5e6
    status = tt.status(local.wall_us(t), local.monotonic_s(t))
    assert status.interval == before and status.verdict == LOCAL_CLOCK


def test_unknown_epsilon_answers_neither_after_nor_before_and_now_raises() -> None:
    tt, local = cluster(PEERS3)
    wall, mono = local.wall_us(0), local.monotonic_s(0)
    assert not tt.after(wall - 10**9, wall, mono) and not tt.before(wall + 10**9, wall, mono)
    with pytest.raises(ClockUncertain, match="ε unknown"):
        tt.now(wall, mono)
    with pytest.raises(ClockUncertain):
        tt.wait_until_after(wall, wall, mono)


def test_clock_uncertain_is_a_typed_503_that_round_trips_through_json() -> None:
    tt, local = cluster(PEERS3)
    error = tt.status(local.wall_us(0), local.monotonic_s(0)).error()
    assert BY_CODE["clock_uncertain"] is ClockUncertain
    again = RingKVError.from_json(error.to_json())
    assert isinstance(again, ClockUncertain) and again.http_status == 503
    assert again.max_uncertainty_us == BOUND_US and again.epsilon_us is None
    assert "ε unknown" in again.message


def test_status_to_json_names_the_figures() -> None:
    tt, local = cluster(PEERS3)
    t = sample_all(tt, local, PEERS3, 0.0)
    body = tt.status(local.wall_us(t), local.monotonic_s(t)).to_json()
    assert body["uncertain"] is False and body["verdict"] == CERTAIN
    assert body["max_uncertainty_us"] == BOUND_US and body["clocks"] == 3
    assert body["epsilon_us"] > FLOOR_US and body["interval_us"][0] < body["interval_us"][1]


# ---- commit wait (Spanner §4.1.2) ------------------------------------------------------------


def commit_wait(tt: TrueTime, local: Machine, s_us: int, t: float) -> tuple[float, int]:
    """Wait as the shell will (bounded loop); returns the true time when done and the rounds."""
    for rounds in range(1, 20):
        wait_us = tt.wait_until_after(s_us, local.wall_us(t), local.monotonic_s(t))
        if wait_us == 0:
            return t, rounds
        t += local.sleep_true_us(wait_us)
    raise AssertionError("commit wait did not finish in 20 rounds")


@pytest.mark.parametrize("drift_ppm", [-MAX_DRIFT_PPM, 0, MAX_DRIFT_PPM])
@pytest.mark.parametrize("age_s", [0.0, 5.0, 25.0])
def test_commit_wait_outlasts_the_uncertainty(drift_ppm: float, age_s: float) -> None:
    """Spanner §4.1.2: with s = TT.now().latest, the commit is acknowledged only once TT.after(s),
    so s is below the true time of the acknowledgement; the wait is about 2ε and one round
    suffices at the worst assumed drift either way."""
    tt, local = cluster(PEERS3, Machine(0, drift_ppm))
    sample_all(tt, local, PEERS3, 0.0)
    t = age_s * 1e6
    interval = tt.now(local.wall_us(t), local.monotonic_s(t))
    s = interval.latest_us
    first_wait = tt.wait_until_after(s, local.wall_us(t), local.monotonic_s(t))
    assert 2 * interval.epsilon_us <= first_wait <= 2 * interval.epsilon_us * 1.001 + 5
    done, rounds = commit_wait(tt, local, s, t)
    assert EPOCH_US + done > s  # the invariant: s < t_abs(acknowledgement)
    assert tt.after(s, local.wall_us(done), local.monotonic_s(done))
    assert rounds == 2  # one wait, then TT.after(s) holds


def test_commit_wait_is_zero_once_the_timestamp_has_passed() -> None:
    tt, local = cluster(PEERS3)
    t = sample_all(tt, local, PEERS3, 0.0)
    interval = tt.now(local.wall_us(t), local.monotonic_s(t))
    wall, mono = local.wall_us(t), local.monotonic_s(t)
    assert tt.wait_until_after(interval.earliest_us - 1, wall, mono) == 0
    assert tt.wait_until_after(interval.earliest_us, wall, mono) > 0


# ---- the invariant under simulated clocks (Spanner §3) ---------------------------------------


def scenario(rng: random.Random, *, floor_us: int, run_s: float = 60.0
             ) -> tuple[dict[str, Machine], Machine, set[str]]:
    """A cluster of 1 to 6 clocks, at most a minority of them falsetickers (perhaps this one).

    Truechimers stay within the floor of true time over the run, drifting within what that
    allows (never beyond 200 ppm). Falsetickers read anything: seconds off, any rate (the local
    clock's oscillator still keeps within 200 ppm; only its wall reading is wrong).
    """
    n = rng.randint(1, 6)
    names = [f"n{i}" for i in range(1, n)]
    bad = set(rng.sample(["local", *names], rng.randint(0, (n - 1) // 2)))

    def truechimer() -> Machine:
        drift = rng.uniform(-1, 1) * min(MAX_DRIFT_PPM, 0.5 * floor_us / run_s)
        return Machine(rng.uniform(-0.45, 0.45) * floor_us, drift, rng.uniform(0, 1e5))

    def falseticker(rate_ppm: float) -> Machine:
        # Often just outside the floor (where its interval overlaps the truechimers'), or far off.
        scale = floor_us * rng.choice([1.5, 3.0, 10.0]) if rng.random() < 0.6 else 3e6
        offset = rng.choice([-1, 1]) * rng.uniform(0, scale)
        return Machine(offset, rng.uniform(-rate_ppm, rate_ppm), rng.uniform(0, 1e5))

    peers = {name: falseticker(5000) if name in bad else truechimer() for name in names}
    local = falseticker(MAX_DRIFT_PPM) if "local" in bad else truechimer()
    return peers, local, bad


@dataclass
class Tally:
    readings: int = 0
    intervals: int = 0
    certain: int = 0
    commits: int = 0
    violations: list[str] = field(default_factory=list)


def run_scenario(seed: int, tally: Tally) -> None:
    rng = random.Random(seed)
    floor_us = rng.choice([1000, 1000, 5000, 20000])
    run_s = 60.0
    peers, local, bad = scenario(rng, floor_us=floor_us, run_s=run_s)
    tt = TrueTime(peers, min_uncertainty_ms=floor_us / 1000)
    events: list[tuple[float, int, str]] = []
    for _ in range(rng.randint(0, 80)):
        events.append((rng.uniform(0, run_s * 1e6), 0, rng.choice([*peers, "query", "step"])))
    events.sort()
    arrivals: list[tuple[float, str, OffsetSample, float]] = []

    def deliver_until(t: float) -> None:
        arrivals.sort(key=lambda item: item[0])
        while arrivals and arrivals[0][0] <= t:
            _, name, sample, mono = arrivals.pop(0)
            tt.record(name, sample, mono)

    for t, _, what in events:
        deliver_until(t)
        if what == "step":
            if "local" in bad:
                local.offset_us += rng.uniform(-2e6, 2e6)  # only a falseticker's wall steps
            continue
        if what != "query":
            if rng.random() < 0.1:
                continue  # lost
            slow = rng.random() < 0.1
            out, back = (rng.expovariate(1 / (50_000 if slow else 200)) for _ in range(2))
            hold = rng.expovariate(1 / (20_000 if slow else 30))
            try:
                sample, mono, arrive = ping(local, peers[what], t, out_us=out, hold_us=hold,
                                            back_us=back)
            except ValueError:
                continue  # a falseticker running wild claimed an impossible hold: dropped
            arrivals.append((arrive, what, sample, mono))
            continue
        status = tt.status(local.wall_us(t), local.monotonic_s(t))
        tally.readings += 1
        if status.interval is None:
            continue
        tally.intervals += 1
        tally.certain += not status.uncertain
        if not status.interval.contains(EPOCH_US + t):
            tally.violations.append(f"seed {seed}: t={t:.0f} not in {status.interval}")
            continue
        if not status.uncertain and rng.random() < 0.5:
            s = status.interval.latest_us
            try:
                done, _ = commit_wait(tt, local, s, t)
            except ClockUncertain:
                continue  # the samples aged out mid-wait: no acknowledgement, nothing to check
            tally.commits += 1
            if not EPOCH_US + done > s:
                tally.violations.append(f"seed {seed}: commit wait for {s} ended at {done}")


def run_many(seeds: range) -> Tally:
    tally = Tally()
    for seed in seeds:
        run_scenario(seed, tally)
    return tally


def test_the_interval_holds_true_time_under_skew_drift_steps_and_falsetickers() -> None:
    """Spanner §3: TT.now() contains the absolute time, and commit wait (§4.1.2) ends only
    after s, for skewed and drifting clocks, random (sometimes very slow) round trips, lost
    pings, a stepping local clock and up to a minority of falsetickers; 400 seeded runs."""
    tally = run_many(range(400))
    assert tally.violations == []
    # Not vacuous: most readings gave an interval, and many were fit to serve.
    assert tally.readings > 3000
    assert tally.intervals > 0.5 * tally.readings
    assert tally.certain > 0.3 * tally.readings
    assert tally.commits > 500


def test_the_invariant_check_catches_classic_marzullo(monkeypatch: pytest.MonkeyPatch) -> None:
    """Negative control: taking the points the most sources agree on (classic Marzullo) instead
    of those enough truechimers must share loses true time in some runs, and the check sees it."""
    real = truetime.marzullo
    monkeypatch.setattr(truetime, "marzullo", lambda intervals, min_sources=None: real(intervals))
    assert run_many(range(400)).violations != []


def test_the_invariant_check_catches_a_missing_drift_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Negative control: carrying samples forward without the drift budget loses true time."""
    real = truetime.carry_forward
    monkeypatch.setattr(truetime, "carry_forward",
                        lambda interval, elapsed_s, max_drift_ppm: real(interval, elapsed_s, 0))
    assert run_many(range(400)).violations != []


Exchange = tuple[float, float, float, float]  # sent at, out, hold, back (true µs)
Reading = tuple[int, dict[str, Machine], Machine, dict[str, Exchange], float]


def test_the_invariant_check_catches_a_skipped_commit_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    """Negative control (the issue's ``--fault skip-commit-wait``, in miniature): acknowledging
    at once leaves s at or above the true time of the acknowledgement, and the check sees it."""
    monkeypatch.setattr(TrueTime, "wait_until_after", lambda self, s_us, local_us, mono_s: 0)
    violations = run_many(range(100)).violations
    assert violations and all("commit wait" in violation for violation in violations)


@st.composite
def one_reading(draw: st.DrawFn) -> Reading:
    rng = random.Random(draw(st.integers(0, 2**32)))
    floor_us = draw(st.sampled_from([1000, 5000]))
    peers, local, _ = scenario(rng, floor_us=floor_us)
    exchanges = {
        name: (
            draw(st.floats(0, 50e6)),  # sent at (true µs)
            draw(st.floats(0, 5e5)), draw(st.floats(0, 1e5)), draw(st.floats(0, 5e5)),
        )
        for name in peers if draw(st.booleans())
    }
    last = max((sent + a + b + c for sent, a, b, c in exchanges.values()), default=0.0)
    at = last + draw(st.floats(0, 40e6))
    return floor_us, peers, local, exchanges, at


@settings(max_examples=300, deadline=None)
@given(one_reading())
def test_hypothesis_the_interval_holds_true_time(reading: Reading) -> None:
    """Spanner §3, searched by hypothesis: any minority of falsetickers, any delays, any age."""
    floor_us, peers, local, exchanges, at = reading
    tt = TrueTime(peers, min_uncertainty_ms=floor_us / 1000)
    for name, (sent, out, hold, back) in exchanges.items():
        try:
            sample, mono, _ = ping(local, peers[name], sent, out_us=out, hold_us=hold, back_us=back)
        except ValueError:
            continue
        tt.record(name, sample, mono)
    status = tt.status(local.wall_us(at), local.monotonic_s(at))
    if status.interval is not None:
        assert status.interval.contains(EPOCH_US + at), status


# ---- the offset tracker ----------------------------------------------------------------------


def test_offset_tracker_keeps_members_bounded_samples_and_ages_them_out() -> None:
    tracker = OffsetTracker(["b"], samples_per_peer=3, max_sample_age_s=10.0)
    sample = ntp_sample(0, 100, 120, 220)
    assert not tracker.record("stranger", sample, 0.0)  # not a member: ignored
    for i in range(5):
        assert tracker.record("b", ntp_sample(i, 100 + i, 120 + i, 220 + i), float(i))
    assert [arrived for _, arrived in tracker.fresh("b", 4.0)] == [2.0, 3.0, 4.0]
    assert tracker.latest("b", 4.0) == ntp_sample(4, 104, 124, 224)
    assert [arrived for _, arrived in tracker.fresh("b", 13.5)] == [4.0]
    assert tracker.last_sample_age_s(13.5) == pytest.approx(9.5)
    assert tracker.interval("b", 14.5) is None and tracker.last_sample_age_s(14.5) is None
    tracker.set_peers(["c"])
    assert tracker.peers == frozenset({"c"}) and tracker.fresh("b", 4.0) == []


@pytest.mark.parametrize("kwargs,match", [
    ({"min_uncertainty_ms": -1}, "min_uncertainty_ms"),
    ({"max_drift_ppm": 1e6}, "max_drift_ppm"),
    ({"max_drift_ppm": float("nan")}, "max_drift_ppm"),
    ({"max_uncertainty_ms": 1}, "max_uncertainty_ms"),
    ({"max_sample_age_s": 0}, "max_sample_age_s"),
    ({"samples_per_peer": 0}, "samples_per_peer"),
])
def test_settings_are_checked(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TrueTime(**kwargs)  # type: ignore[arg-type]


def test_defaults_are_the_issues() -> None:
    tt = TrueTime()
    assert (tt.min_uncertainty_us, tt.max_drift_ppm, tt.max_uncertainty_us) == (1000, 200, 250_000)
