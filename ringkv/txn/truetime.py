"""TrueTime: clock readings as intervals that contain true time (pure).

Spanner §3: ``TT.now()`` returns ``[earliest, latest]``, an interval sure to
contain the absolute time at which it was called; ``TT.after(t)`` holds once
``t`` has certainly passed, ``TT.before(t)`` while ``t`` has certainly not
arrived. ε is half the interval's width. Commit wait (§4.1.2) holds a commit
at timestamp ``s`` until ``TT.after(s)``: ``TrueTime.wait_until_after``.

Spanner reads GPS and atomic time masters; ringkv has only its nodes' own
clocks, so ε is measured, not assumed (issue #11):

    ε = floor (min_uncertainty_ms) + drift budget + offset bound vs peers

**The fault model.** A *truechimer* clock reads true time within the floor
(``min_uncertainty_ms``, 1 ms by default) whenever it is read, and every
oscillator (the local monotonic clock, a peer's clock while it answers a
ping) runs within ``max_drift_ppm`` (200 ppm, Spanner's figure) of true
rate. A strict majority of the cluster's clocks, this node's included, are
truechimers; the rest (*falsetickers*) may read anything. Under that
assumption every interval returned here contains true time, whatever this
node's own clock does, even when it is a falseticker that has stepped or
drifts. ("True time" may be read as "the time a majority of the cluster's
clocks keep": the transactional tier needs all nodes to agree on one
timeline, not to agree with UTC.)

**One ping is one sample** (NTP, RFC 5905 §8). The local node sends at
``t0`` (local clock), the peer receives at ``t1`` and answers at ``t2`` (its
clock), the answer arrives at ``t3`` (local clock). Whatever the one-way
delays, the peer-minus-local offset lies in ``[t2 - t3, t1 - t0]``: NTP's
``offset = ((t1 - t0) + (t2 - t3)) / 2`` is its midpoint and
``delay = (t3 - t0) - (t2 - t1)`` its width, so the true offset is within
``offset ± delay/2``, and the issue's ``|offset| + RTT/2`` is the largest
offset the sample allows. For true time the same sample says: at the
instant the answer arrived, true time lay in
``[t2 - floor, t2 + delay + floor]`` (the peer's reading ± its floor, plus
however long the answer took). That is anchored to the local *monotonic*
clock at arrival and carried forward along it, widened by the drift budget
(``max_drift_ppm`` of the time elapsed since), so a step of the local wall
clock cannot corrupt a sample already taken.

**Combining sources** (Marzullo, as NTP's intersection algorithm, RFC 5905
§11.2.1). The sources are the local clock (``local ± floor``) and each
peer's best fresh sample carried forward to now. Up to ``f`` of the
cluster's ``n`` clocks may be falsetickers, ``f = (n - 1) // 2``. Of the
``m`` sources at hand at least ``m - f`` are then truechimers, and true time
lies in every truechimer's interval, so it lies in the smallest interval
holding every point that at least ``m - f`` sources agree on. NTP instead
takes the points the *largest* number of sources agree on; that can leave
true time out when a falseticker's interval overlaps truechimers' elsewhere
(a table test shows the case), so here the count comes from the fault
model, not from the data.

With the clocks in step, ε (half the width) comes out as the issue's
``floor + 200 ppm x age + RTT/2``. A local clock that is off by some offset
gets a *shifted* interval, not a wider one (commit wait stays short), and
the issue's ``|offset| + RTT/2`` goes to the fence below instead.

**Until a majority is measured, ε is unknown.** With fewer than a majority
(``n // 2 + 1``) of the cluster's clocks measured, the local one included,
there is no interval to stand behind: ``now`` raises ``ClockUncertain`` and
the node is fenced. A node that has not yet heard its peers (just started,
or cut off from them) never claims a tight ε from its own clock, which may
be the one that is wrong; for an odd ``n`` this is exactly ``m - f < 1``,
and in a cluster of two it means the peer must have been heard. A cluster of
one has only its own clock: ``local ± floor``.

**Samples age out.** Each peer keeps its last ``SAMPLES_PER_PEER`` samples
and the one with the narrowest interval today counts (NTP's clock filter
keeps the lowest-delay sample of its last eight for the same reason: a slow
answer says little). A sample older than ``max_sample_age_s`` (30 s, the
interval at which Spanner's daemons poll their masters) stops counting: a
peer silent that long is taken as gone, its carried-forward interval has
grown by 2 x 200 ppm x 30 s = 12 ms by then, and fewer sources only ever
widen the answer (``m - f`` falls), never make it wrong.

**Fencing.** ``status`` says whether this node may do transactional work:
not when ε cannot be bounded (too few clocks measured, or they agree on no
point), not when ε exceeds ``max_uncertainty_ms`` (250 ms), and not when the
local clock may be further than that from the interval (it disagrees with
the clocks a majority keep: the issue's ``|offset| + RTT/2`` test, with the
floor and drift included). The reason names ε and the bound; the shell maps
an uncertain status to 503 ``clock_uncertain`` (``errors.ClockUncertain``).

Time is integer microseconds, like ``Clock.wall_us()`` and the HLC: commit
timestamps are integer µs. Readings are truncated to whole µs, so each
bound carries ``READING_SLACK_US`` of slack. Nothing here reads a clock: the
caller passes ``local_now_us`` (``Clock.wall_us()``) and ``monotonic_now_s``
(``Clock.monotonic_s()``).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ringkv.errors import ClockUncertain

__all__ = [
    "MAX_DRIFT_PPM", "MAX_SAMPLE_AGE_S", "MAX_UNCERTAINTY_MS", "MIN_UNCERTAINTY_MS",
    "SAMPLES_PER_PEER", "CERTAIN", "DISAGREE", "LOCAL_CLOCK", "UNMEASURED", "WIDE",
    "Agreement", "ClockStatus", "OffsetSample", "OffsetTracker", "TTInterval", "TrueTime",
    "carry_forward", "marzullo", "ntp_sample", "true_time_at_arrival",
]

MIN_UNCERTAINTY_MS = 1  # truetime.min_uncertainty_ms: how close a truechimer keeps to true time
MAX_DRIFT_PPM = 200  # truetime.max_drift_ppm: worst oscillator rate error (Spanner §3)
MAX_UNCERTAINTY_MS = 250  # truetime.max_uncertainty_ms: the fence
MAX_SAMPLE_AGE_S = 30.0  # a peer's sample stops counting after this long
SAMPLES_PER_PEER = 8  # NTP's clock filter holds eight

# Clock readings are whole microseconds, truncated: a reading is up to 1 µs
# below the clock's exact value, and a float monotonic reading converted to
# µs is off by a hair more. Two µs each side covers both.
READING_SLACK_US = 2

_PPM = 1_000_000


def _ceil_div(numerator: int, denominator: int) -> int:
    return -((-numerator) // denominator)


@dataclass(frozen=True)
class TTInterval:
    """``[earliest_us, latest_us]``: true time lies in it (Spanner §3, ``TTinterval``)."""

    earliest_us: int
    latest_us: int

    def __post_init__(self) -> None:
        if self.latest_us < self.earliest_us:
            raise ValueError(f"empty interval [{self.earliest_us}, {self.latest_us}]")

    @property
    def epsilon_us(self) -> int:
        """Half the width, rounded up: Spanner's ε."""
        return _ceil_div(self.latest_us - self.earliest_us, 2)

    @property
    def midpoint_us(self) -> int:
        return (self.earliest_us + self.latest_us) // 2

    def contains(self, t_us: int | float) -> bool:
        return self.earliest_us <= t_us <= self.latest_us

    def after(self, t_us: int) -> bool:
        """``t_us`` has certainly passed (``TT.after``)."""
        return t_us < self.earliest_us

    def before(self, t_us: int) -> bool:
        """``t_us`` has certainly not arrived (``TT.before``)."""
        return t_us > self.latest_us

    def to_json(self) -> list[int]:
        return [self.earliest_us, self.latest_us]


@dataclass(frozen=True)
class OffsetSample:
    """One ping exchange, NTP-style: the four timestamps in whole µs.

    ``t0_us`` sent (local clock), ``t1_us`` received and ``t2_us`` answered
    (peer's clock), ``t3_us`` answer received (local clock). The shell should
    take ``t3_us`` as ``t0_us`` plus the elapsed time on the monotonic clock,
    so a wall-clock step in mid-exchange cannot shrink the delay.
    """

    t0_us: int
    t1_us: int
    t2_us: int
    t3_us: int

    def __post_init__(self) -> None:
        for name in ("t0_us", "t1_us", "t2_us", "t3_us"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an int of microseconds, got {value!r}")
        if self.t3_us < self.t0_us:
            raise ValueError(
                f"answer received before the ping was sent ({self.t3_us} < {self.t0_us})"
            )
        if self.t2_us < self.t1_us:
            raise ValueError(f"peer answered before it received ({self.t2_us} < {self.t1_us})")
        if self.delay_us < 0:
            raise ValueError(
                f"peer held the ping {self.t2_us - self.t1_us} µs, longer than the "
                f"round trip {self.t3_us - self.t0_us} µs: its clock is not to be trusted"
            )

    @property
    def offset_low_us(self) -> int:
        """The smallest peer-minus-local offset consistent with the exchange."""
        return self.t2_us - self.t3_us

    @property
    def offset_high_us(self) -> int:
        """The largest peer-minus-local offset consistent with the exchange."""
        return self.t1_us - self.t0_us

    @property
    def offset_us(self) -> int:
        """NTP's offset ``((t1 - t0) + (t2 - t3)) / 2``, rounded down."""
        return (self.offset_low_us + self.offset_high_us) // 2

    @property
    def delay_us(self) -> int:
        """NTP's delay ``(t3 - t0) - (t2 - t1)``: the round trip less the peer's hold."""
        return self.offset_high_us - self.offset_low_us

    @property
    def bound_us(self) -> int:
        """The issue's ``|offset| + RTT/2``: how far apart the two clocks may be."""
        return max(abs(self.offset_low_us), abs(self.offset_high_us))


def ntp_sample(t0_us: int, t1_us: int, t2_us: int, t3_us: int) -> OffsetSample:
    """The sample of one ping exchange; ``ValueError`` if the timestamps are impossible."""
    return OffsetSample(t0_us, t1_us, t2_us, t3_us)


def true_time_at_arrival(
    sample: OffsetSample, *, min_uncertainty_us: int, max_drift_ppm: int
) -> TTInterval:
    """Where true time lay when the sample's answer arrived, if the peer is a truechimer.

    The peer read ``t2`` within the floor of true time; the answer then took
    at most the round trip less the peer's hold, each measured by a clock
    that may run ``max_drift_ppm`` fast or slow.
    """
    held_min_us = ((sample.t2_us - sample.t1_us) * _PPM) // (_PPM + max_drift_ppm)
    round_trip_max_us = _ceil_div((sample.t3_us - sample.t0_us) * _PPM, _PPM - max_drift_ppm)
    transit_max_us = max(0, round_trip_max_us - held_min_us)
    margin_us = min_uncertainty_us + READING_SLACK_US
    return TTInterval(sample.t2_us - margin_us, sample.t2_us + transit_max_us + margin_us)


def carry_forward(interval: TTInterval, elapsed_s: float, max_drift_ppm: int) -> TTInterval:
    """``interval`` held at some instant, moved ``elapsed_s`` of local monotonic time later.

    The local oscillator may run ``max_drift_ppm`` fast or slow, so
    ``elapsed_s`` of it is between ``elapsed/(1+ρ)`` and ``elapsed/(1-ρ)`` of
    true time (either sign): the interval widens by the drift budget.
    """
    elapsed_low_us = math.floor(elapsed_s * _PPM) - READING_SLACK_US
    elapsed_high_us = math.ceil(elapsed_s * _PPM) + READING_SLACK_US
    fast, slow = _PPM + max_drift_ppm, _PPM - max_drift_ppm
    low = (elapsed_low_us * _PPM) // (fast if elapsed_low_us >= 0 else slow)
    high = _ceil_div(elapsed_high_us * _PPM, slow if elapsed_high_us >= 0 else fast)
    return TTInterval(interval.earliest_us + low, interval.latest_us + high)


@dataclass(frozen=True)
class Agreement:
    """What a set of source intervals agree on.

    ``interval``: the smallest interval holding every point that at least
    ``min_sources`` of them contain. ``most``: the largest number of sources
    that share any one point.
    """

    interval: TTInterval
    min_sources: int
    most: int


def marzullo(intervals: Sequence[TTInterval], min_sources: int | None = None) -> Agreement | None:
    """Marzullo's intersection of closed intervals, by one sweep.

    With ``min_sources=None`` it is the classic algorithm: the smallest
    interval holding the points the largest number of sources agree on.
    With ``min_sources=k`` it holds every point at least ``k`` sources
    agree on, which contains true time whenever ``k`` of the sources are
    correct (NTP's intersection with the falseticker count fixed). None
    when no point is shared by that many.
    """
    events: list[tuple[int, int]] = []
    for interval in intervals:
        events.append((interval.earliest_us, 0))  # starts sort before ends: closed intervals
        events.append((interval.latest_us, 1))
    events.sort()
    most = 0
    depth = 0
    for _, kind in events:
        depth += 1 if kind == 0 else -1
        most = max(most, depth)
    need = most if min_sources is None else min_sources
    if need < 1 or most < need:
        return None
    earliest: int | None = None
    latest = 0
    depth = 0
    for at_us, kind in events:
        if kind == 0:
            depth += 1
            if depth >= need and earliest is None:
                earliest = at_us
        else:
            if depth >= need:
                latest = at_us
            depth -= 1
    assert earliest is not None
    return Agreement(TTInterval(earliest, latest), need, most)


@dataclass(frozen=True)
class _Held:
    sample: OffsetSample
    arrived_s: float  # local monotonic clock when the answer arrived
    then: TTInterval  # true time at arrival, if the peer is a truechimer
    # Carried forward, every interval widens by the same ~2ρ per second, so
    # the narrowest today is the one with the least width - 2ρ·arrived.
    rank: float


class OffsetTracker:
    """Each peer's recent ping samples, and the interval they give for true time now (pure).

    Only peers named in ``peers`` (the cluster's other members) are kept;
    each keeps its last ``samples_per_peer`` samples, and a sample older
    than ``max_sample_age_s`` on the local monotonic clock stops counting.
    The transport's pings feed it; ``TrueTime`` reads it.
    """

    def __init__(
        self,
        peers: Iterable[str] = (),
        *,
        min_uncertainty_us: int = MIN_UNCERTAINTY_MS * 1000,
        max_drift_ppm: int = MAX_DRIFT_PPM,
        samples_per_peer: int = SAMPLES_PER_PEER,
        max_sample_age_s: float = MAX_SAMPLE_AGE_S,
    ) -> None:
        for name, value in (("min_uncertainty_us", min_uncertainty_us),
                            ("max_drift_ppm", max_drift_ppm)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if max_drift_ppm >= _PPM:
            raise ValueError(f"max_drift_ppm must be below 1000000, got {max_drift_ppm!r}")
        if (isinstance(samples_per_peer, bool) or not isinstance(samples_per_peer, int)
                or samples_per_peer < 1):
            raise ValueError(f"samples_per_peer must be an int >= 1, got {samples_per_peer!r}")
        if not (math.isfinite(max_sample_age_s) and max_sample_age_s > 0):
            raise ValueError(f"max_sample_age_s must be > 0, got {max_sample_age_s!r}")
        self.min_uncertainty_us = min_uncertainty_us
        self.max_drift_ppm = max_drift_ppm
        self.samples_per_peer = samples_per_peer
        self.max_sample_age_s = float(max_sample_age_s)
        self._samples: dict[str, deque[_Held]] = {}
        self.set_peers(peers)

    @property
    def peers(self) -> frozenset[str]:
        return frozenset(self._samples)

    def set_peers(self, peers: Iterable[str]) -> None:
        """The cluster's other members now; a peer that left takes its samples along."""
        wanted = set(peers)
        for gone in set(self._samples) - wanted:
            del self._samples[gone]
        for peer in wanted - set(self._samples):
            self._samples[peer] = deque(maxlen=self.samples_per_peer)

    def record(self, peer: str, sample: OffsetSample, arrived_monotonic_s: float) -> bool:
        """Keep ``sample`` from ``peer``; False (and ignored) for a peer not in the cluster."""
        held = self._samples.get(peer)
        if held is None:
            return False
        if not math.isfinite(arrived_monotonic_s):
            raise ValueError(f"arrived_monotonic_s must be finite, got {arrived_monotonic_s!r}")
        then = true_time_at_arrival(
            sample, min_uncertainty_us=self.min_uncertainty_us, max_drift_ppm=self.max_drift_ppm
        )
        width_us = then.latest_us - then.earliest_us
        rank = width_us - 2 * self.max_drift_ppm * arrived_monotonic_s
        held.append(_Held(sample, float(arrived_monotonic_s), then, rank))
        return True

    def _fresh(self, peer: str, monotonic_now_s: float) -> list[_Held]:
        return [
            held for held in self._samples.get(peer, ())
            if abs(monotonic_now_s - held.arrived_s) <= self.max_sample_age_s
        ]

    def fresh(self, peer: str, monotonic_now_s: float) -> list[tuple[OffsetSample, float]]:
        """``peer``'s samples that still count, with their arrival times, oldest first."""
        return [(held.sample, held.arrived_s) for held in self._fresh(peer, monotonic_now_s)]

    def latest(self, peer: str, monotonic_now_s: float) -> OffsetSample | None:
        """``peer``'s newest sample that still counts (its offset and delay, for status)."""
        samples = self._fresh(peer, monotonic_now_s)
        return samples[-1].sample if samples else None

    def interval(self, peer: str, monotonic_now_s: float) -> TTInterval | None:
        """True time now by ``peer``'s narrowest fresh sample; None if none counts."""
        samples = self._fresh(peer, monotonic_now_s)
        if not samples:
            return None
        best = min(samples, key=lambda held: held.rank)
        return carry_forward(best.then, monotonic_now_s - best.arrived_s, self.max_drift_ppm)

    def last_sample_age_s(self, monotonic_now_s: float) -> float | None:
        """Time since the newest sample from any peer (None if none counts)."""
        ages = [
            monotonic_now_s - samples[-1].arrived_s
            for peer in self._samples
            if (samples := self._fresh(peer, monotonic_now_s))
        ]
        return min(ages) if ages else None


CERTAIN = "certain"
UNMEASURED = "unmeasured"  # fewer than a majority of the cluster's clocks measured
DISAGREE = "disagree"  # the measured clocks agree on no point
WIDE = "wide"  # ε above the bound
LOCAL_CLOCK = "local_clock"  # the local clock may be too far from true time


@dataclass(frozen=True)
class ClockStatus:
    """One reading of TrueTime and whether this node may stand behind it.

    ``interval`` is None when ε cannot be bounded. ``clocks``: the cluster's
    clocks, this node's included; ``measured``: those with a reading that
    counts (the local clock and peers with a fresh sample); ``needed``: how
    many of those must share a point (``measured`` less the falsetickers a
    majority tolerates); ``agreeing``: the most that do. ``verdict`` is
    ``CERTAIN`` or why not.
    """

    local_us: int
    interval: TTInterval | None
    max_uncertainty_us: int
    clocks: int
    measured: int
    needed: int
    agreeing: int
    last_sample_age_s: float | None
    verdict: str

    @property
    def uncertain(self) -> bool:
        """True when the node must refuse transactional work (503 ``clock_uncertain``)."""
        return self.verdict != CERTAIN

    @property
    def epsilon_us(self) -> int | None:
        return None if self.interval is None else self.interval.epsilon_us

    @property
    def offset_us(self) -> int | None:
        """The interval's midpoint less the local clock: the local clock's estimated error."""
        return None if self.interval is None else self.interval.midpoint_us - self.local_us

    @property
    def local_error_us(self) -> int | None:
        """How far the local clock may be from true time: the distance to the interval's far end."""
        if self.interval is None:
            return None
        return max(self.local_us - self.interval.earliest_us,
                   self.interval.latest_us - self.local_us)

    @property
    def reason(self) -> str:
        """Why, for people: names ε and the bound."""
        bound = _ms(self.max_uncertainty_us)
        counts = f"{self.measured} of {self.clocks} clocks measured, {self.agreeing} agree"
        if self.verdict == UNMEASURED:
            return (f"clock uncertain: ε unknown, {self.measured} of {self.clocks} clocks "
                    f"measured and a majority ({self.clocks // 2 + 1}) is needed to bound it "
                    f"(bound {bound})")
        if self.verdict == DISAGREE:
            return (f"clock uncertain: ε unknown, no time is agreed by {self.needed} of the "
                    f"{self.measured} measured clocks (at most {self.agreeing} agree; "
                    f"bound {bound})")
        assert self.epsilon_us is not None and self.local_error_us is not None
        assert self.offset_us is not None
        epsilon = _ms(self.epsilon_us)
        if self.verdict == WIDE:
            return f"clock uncertain: ε {epsilon} exceeds the bound {bound} ({counts})"
        if self.verdict == LOCAL_CLOCK:
            return (f"clock uncertain: the local clock may be {_ms(self.local_error_us)} from "
                    f"the time a majority of clocks keep (offset {_ms(self.offset_us)}), beyond "
                    f"the bound {bound}; ε {epsilon}")
        return (f"clock certain: ε {epsilon} within the bound {bound}, local clock within "
                f"{_ms(self.local_error_us)} ({counts})")

    def error(self) -> ClockUncertain:
        """The 503 ``clock_uncertain`` this status calls for."""
        return ClockUncertain(
            self.reason, epsilon_us=self.epsilon_us, max_uncertainty_us=self.max_uncertainty_us
        )

    def to_json(self) -> dict[str, Any]:
        """For ``/v1/status`` and ``/metrics``."""
        return {
            "uncertain": self.uncertain,
            "verdict": self.verdict,
            "reason": self.reason,
            "epsilon_us": self.epsilon_us,
            "max_uncertainty_us": self.max_uncertainty_us,
            "offset_us": self.offset_us,
            "local_error_us": self.local_error_us,
            "interval_us": None if self.interval is None else self.interval.to_json(),
            "clocks": self.clocks,
            "measured": self.measured,
            "agreeing": self.agreeing,
            "last_sample_age_s": self.last_sample_age_s,
        }


def _ms(us: int) -> str:
    return f"{us / 1000:.3f} ms"


class TrueTime:
    """``TT.now``, ``TT.after``, ``TT.before``, commit wait and the fence, over measured offsets.

    Every setting is a constructor argument with the issue's default; the
    clock is read by the caller and passed in. ``offsets`` holds the peers'
    samples: the shell feeds it with ``record`` and names the cluster's
    other members with ``set_peers``.
    """

    def __init__(
        self,
        peers: Iterable[str] = (),
        *,
        min_uncertainty_ms: float = MIN_UNCERTAINTY_MS,
        max_drift_ppm: float = MAX_DRIFT_PPM,
        max_uncertainty_ms: float = MAX_UNCERTAINTY_MS,
        max_sample_age_s: float = MAX_SAMPLE_AGE_S,
        samples_per_peer: int = SAMPLES_PER_PEER,
    ) -> None:
        if not (math.isfinite(min_uncertainty_ms) and min_uncertainty_ms >= 0):
            raise ValueError(f"min_uncertainty_ms must be >= 0, got {min_uncertainty_ms!r}")
        if not (math.isfinite(max_drift_ppm) and 0 <= max_drift_ppm < _PPM):
            raise ValueError(f"max_drift_ppm must be in [0, 1000000), got {max_drift_ppm!r}")
        if not (math.isfinite(max_uncertainty_ms) and max_uncertainty_ms > min_uncertainty_ms):
            raise ValueError(
                f"max_uncertainty_ms must exceed min_uncertainty_ms ({min_uncertainty_ms}), "
                f"got {max_uncertainty_ms!r}"
            )
        # Rounded outwards: a wider floor or drift budget is only ever safer.
        self.min_uncertainty_us = math.ceil(min_uncertainty_ms * 1000)
        self.max_drift_ppm = math.ceil(max_drift_ppm)
        self.max_uncertainty_us = math.floor(max_uncertainty_ms * 1000)
        self.offsets = OffsetTracker(
            peers, min_uncertainty_us=self.min_uncertainty_us, max_drift_ppm=self.max_drift_ppm,
            samples_per_peer=samples_per_peer, max_sample_age_s=max_sample_age_s,
        )

    def set_peers(self, peers: Iterable[str]) -> None:
        self.offsets.set_peers(peers)

    def record(self, peer: str, sample: OffsetSample, arrived_monotonic_s: float) -> bool:
        return self.offsets.record(peer, sample, arrived_monotonic_s)

    def local_interval(self, local_now_us: int) -> TTInterval:
        """The local clock as a source: within the floor of true time if it is a truechimer."""
        margin_us = self.min_uncertainty_us + READING_SLACK_US
        return TTInterval(local_now_us - margin_us, local_now_us + margin_us)

    def status(self, local_now_us: int, monotonic_now_s: float) -> ClockStatus:
        """TrueTime now, and whether this node is fenced (see the module notes)."""
        sources = [self.local_interval(local_now_us)]
        for peer in self.offsets.peers:
            interval = self.offsets.interval(peer, monotonic_now_s)
            if interval is not None:
                sources.append(interval)
        clocks = 1 + len(self.offsets.peers)
        measured = len(sources)
        needed = measured - (clocks - 1) // 2
        enough = measured >= clocks // 2 + 1  # implies needed >= 1
        agreement = marzullo(sources, needed) if enough else None
        if agreement is not None:
            agreeing = agreement.most
        else:
            classic = marzullo(sources)  # never None: the local clock is always a source
            agreeing = classic.most if classic is not None else 0
        interval = None if agreement is None else agreement.interval
        if not enough:
            verdict = UNMEASURED
        elif interval is None:
            verdict = DISAGREE
        elif interval.epsilon_us > self.max_uncertainty_us:
            verdict = WIDE
        elif max(local_now_us - interval.earliest_us,
                 interval.latest_us - local_now_us) > self.max_uncertainty_us:
            verdict = LOCAL_CLOCK
        else:
            verdict = CERTAIN
        return ClockStatus(
            local_us=local_now_us, interval=interval, max_uncertainty_us=self.max_uncertainty_us,
            clocks=clocks, measured=measured, needed=needed, agreeing=agreeing,
            last_sample_age_s=self.offsets.last_sample_age_s(monotonic_now_s), verdict=verdict,
        )

    def check(self, local_now_us: int, monotonic_now_s: float) -> ClockStatus:
        """The fence: the status, or ``ClockUncertain`` when this node must refuse."""
        status = self.status(local_now_us, monotonic_now_s)
        if status.uncertain:
            raise status.error()
        return status

    def now(self, local_now_us: int, monotonic_now_s: float) -> TTInterval:
        """``TT.now()``: an interval holding true time; ``ClockUncertain`` if none can be given.

        It returns a (valid) interval even while the node is fenced for a
        wide ε: whether to act on it is ``check``'s business.
        """
        status = self.status(local_now_us, monotonic_now_s)
        if status.interval is None:
            raise status.error()
        return status.interval

    def after(self, t_us: int, local_now_us: int, monotonic_now_s: float) -> bool:
        """``TT.after(t)``: ``t`` has certainly passed. False while ε is unknown."""
        interval = self.status(local_now_us, monotonic_now_s).interval
        return interval is not None and interval.after(t_us)

    def before(self, t_us: int, local_now_us: int, monotonic_now_s: float) -> bool:
        """``TT.before(t)``: ``t`` has certainly not arrived. False while ε is unknown."""
        interval = self.status(local_now_us, monotonic_now_s).interval
        return interval is not None and interval.before(t_us)

    def wait_until_after(self, s_us: int, local_now_us: int, monotonic_now_s: float) -> int:
        """Commit wait (Spanner §4.1.2): µs of local clock to wait until ``TT.after(s)``.

        0 when it already holds. Otherwise the time for ``earliest`` to pass
        ``s`` if it advances at the slowest rate the drift budget allows. New
        samples can move the interval meanwhile, so the shell waits, asks
        again, and stops at its deadline:
        ``while (w := tt.wait_until_after(s, ...)) > 0: await clock.sleep(w / 1e6)``.
        ``ClockUncertain`` while ε is unknown.
        """
        earliest_us = self.now(local_now_us, monotonic_now_s).earliest_us
        if s_us < earliest_us:
            return 0
        # The slack spares a second round for a µs lost to rounding the readings.
        slowest_us = _ceil_div((s_us + 1 - earliest_us) * (_PPM + self.max_drift_ppm), _PPM)
        return slowest_us + READING_SLACK_US
