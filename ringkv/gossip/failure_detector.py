"""Phi accrual failure detector (pure).

Hayashibara, Défago, Yared, Katayama, "The phi accrual failure detector",
SRDS 2004, in the form used by Cassandra and Akka. Instead of a boolean
"alive / dead", the detector reports a suspicion level

    phi(t) = -log10(P_later(t - t_last))

where ``P_later(d)`` is the probability that the next heartbeat arrives more
than ``d`` seconds after the previous one, under a normal distribution fitted
to the recent inter-arrival times. phi = 1 means a 10% chance that declaring
the node dead is a mistake, phi = 2 a 1% chance, phi = 8 a 1e-8 chance. A
node is available while ``phi < threshold``.

P_later uses Akka's logistic approximation of the normal CDF,
``1 / (1 + exp(-y * (1.5976 + 0.070566 * y**2)))`` with
``y = (d - mean) / std_dev``. Its CDF is within about 1e-4 of the exact one;
phi matches the exact tail within a few percent up to 3.5 standard deviations
and beyond that grows faster (7.3 instead of 6.5 at 5 sigma), i.e. it convicts
a little earlier than the exact normal would. It is evaluated in log space, so
it neither overflows nor loses precision far in the tail.

Like every pure core in ringkv, this module never reads a clock: callers pass
``now_s``, seconds on a monotonic clock (``Clock.monotonic_s()``).

Cold start (as in Akka): while a node has only one heartbeat, there is no
interval to learn from, so the distribution is assumed to have mean
``first_heartbeat_estimate_s`` and standard deviation a quarter of that. From
the second heartbeat on, only measured intervals are used.

Gaps (as Cassandra's ``ArrivalWindow.add``): an interval longer than
``max_interval_s`` is not a sample of the heartbeat process but an outage
(a partition, a paused or overloaded node), so it never enters the history;
the next heartbeat only restarts the clock. Every learned interval is then
at most the bound, so whatever a node went through, its history stays that of
a node heartbeating at least that often. Without this bound one 20 s
partition among twenty 1 s intervals moves the mean to ~2 s and the standard
deviation to ~4 s, after which phi stays below 8 for any silence the node
will plausibly have: the next partition of the same node is never detected.
With it, the history after a partition is what it was before, so the
detector convicts the fifth partition as fast as the first.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

__all__ = ["MAX_PHI", "PhiAccrualFailureDetector"]

# phi is capped here so that it stays a finite float (safe for JSON and
# comparisons) even after an absurdly long silence. 1e6 means "wrong with
# probability 10**-1000000": every threshold anyone would configure is far below.
MAX_PHI = 1e6

_LN10 = math.log(10.0)


@dataclass
class _History:
    """Arrival history of one node: last heartbeat and a bounded window of intervals."""

    last_s: float
    intervals: deque[float]
    total: float = 0.0
    total_sq: float = 0.0

    def add(self, interval: float) -> None:
        maxlen = self.intervals.maxlen
        if maxlen is not None and len(self.intervals) == maxlen:
            old = self.intervals.popleft()
            self.total -= old
            self.total_sq -= old * old
        self.intervals.append(interval)
        self.total += interval
        self.total_sq += interval * interval

    def mean_and_std(self) -> tuple[float, float]:
        n = len(self.intervals)
        mean = self.total / n
        # Population variance, as Akka. Running sums can drift a hair below zero.
        variance = max(0.0, self.total_sq / n - mean * mean)
        return mean, math.sqrt(variance)


def _check_time(now_s: float) -> float:
    now = float(now_s)
    if not math.isfinite(now):
        raise ValueError(f"now_s must be a finite number of seconds, got {now_s!r}")
    return now


class PhiAccrualFailureDetector:
    """Per-node suspicion levels from heartbeat arrival times.

    ``threshold``: a node is available while phi < threshold (Cassandra's
    ``phi_convict_threshold``, default 8).
    ``max_samples``: intervals kept per node; older ones are forgotten.
    ``min_std_dev_s``: lower bound on the standard deviation, so that a very
    regular heartbeat does not make phi jump on the smallest delay.
    ``acceptable_pause_s``: added to the mean interval; a pause this long is
    tolerated without suspicion (e.g. GC pauses).
    ``first_heartbeat_estimate_s``: assumed mean interval until a second
    heartbeat arrives.
    ``max_interval_s``: longer intervals are outages, not samples: they are
    left out of the history (Cassandra's ``fd_max_interval_ms``, 2 s by
    default). ``None`` keeps every interval (the paper's plain detector).

    Heartbeats reported with a ``now_s`` earlier than the node's last one are
    ignored (a monotonic clock never does that; the detector just refuses to
    learn a negative interval).
    """

    def __init__(
        self,
        threshold: float = 8.0,
        max_samples: int = 1000,
        min_std_dev_s: float = 0.1,
        acceptable_pause_s: float = 0.0,
        first_heartbeat_estimate_s: float = 1.0,
        max_interval_s: float | None = None,
    ) -> None:
        if not (math.isfinite(threshold) and threshold > 0):
            raise ValueError(f"threshold must be > 0, got {threshold!r}")
        if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1:
            raise ValueError(f"max_samples must be an int >= 1, got {max_samples!r}")
        if not (math.isfinite(min_std_dev_s) and min_std_dev_s > 0):
            raise ValueError(f"min_std_dev_s must be > 0, got {min_std_dev_s!r}")
        if not (math.isfinite(acceptable_pause_s) and acceptable_pause_s >= 0):
            raise ValueError(f"acceptable_pause_s must be >= 0, got {acceptable_pause_s!r}")
        if not (math.isfinite(first_heartbeat_estimate_s) and first_heartbeat_estimate_s > 0):
            raise ValueError(
                f"first_heartbeat_estimate_s must be > 0, got {first_heartbeat_estimate_s!r}"
            )
        if max_interval_s is not None and not (
            math.isfinite(max_interval_s) and max_interval_s > 0
        ):
            raise ValueError(f"max_interval_s must be > 0 or None, got {max_interval_s!r}")
        self.threshold = float(threshold)
        self.max_samples = max_samples
        self.min_std_dev_s = float(min_std_dev_s)
        self.acceptable_pause_s = float(acceptable_pause_s)
        self.first_heartbeat_estimate_s = float(first_heartbeat_estimate_s)
        self.max_interval_s = None if max_interval_s is None else float(max_interval_s)
        self._nodes: dict[str, _History] = {}

    def heartbeat(self, node_id: str, now_s: float) -> None:
        """Record that a heartbeat from ``node_id`` arrived at ``now_s``.

        An interval longer than ``max_interval_s`` (an outage) is not learned;
        the heartbeat still counts as the node's latest.
        """
        now = _check_time(now_s)
        hist = self._nodes.get(node_id)
        if hist is None:
            self._nodes[node_id] = _History(last_s=now, intervals=deque(maxlen=self.max_samples))
            return
        interval = now - hist.last_s
        if interval < 0:
            return
        if self.max_interval_s is None or interval <= self.max_interval_s:
            hist.add(interval)
        hist.last_s = now

    def phi(self, node_id: str, now_s: float) -> float:
        """Suspicion level of ``node_id`` at ``now_s``: 0.0 if it never sent a heartbeat.

        Always finite and in [0, MAX_PHI]; non-decreasing in ``now_s`` between heartbeats.
        """
        now = _check_time(now_s)
        hist = self._nodes.get(node_id)
        if hist is None:
            return 0.0
        if hist.intervals:
            mean, std = hist.mean_and_std()
        else:
            mean = self.first_heartbeat_estimate_s
            std = mean / 4.0
        mean += self.acceptable_pause_s
        std = max(std, self.min_std_dev_s)
        elapsed = max(0.0, now - hist.last_s)
        return _phi(elapsed, mean, std)

    def is_available(self, node_id: str, now_s: float) -> bool:
        """True while phi < threshold. A node never heard from counts as available."""
        return self.phi(node_id, now_s) < self.threshold

    def remove(self, node_id: str) -> None:
        """Forget ``node_id``'s history (e.g. it restarted, or left the cluster)."""
        self._nodes.pop(node_id, None)

    def sample_count(self, node_id: str) -> int:
        """Number of intervals held for ``node_id`` (at most ``max_samples``)."""
        hist = self._nodes.get(node_id)
        return 0 if hist is None else len(hist.intervals)


def _phi(elapsed: float, mean: float, std: float) -> float:
    """-log10(1 - F(elapsed)) with F Akka's logistic approximation of the normal CDF.

    With z = y * (1.5976 + 0.070566 * y**2), 1 - F = 1 / (1 + exp(z)), so
    phi = log10(1 + exp(z)) = softplus(z) / ln 10. Akka's two branches
    (elapsed above / below the mean) are this same quantity; the softplus form
    is stable for every z, including +-inf.
    """
    y = (elapsed - mean) / std
    z = y * (1.5976 + 0.070566 * y * y)
    if math.isnan(z):  # cannot happen for finite inputs; never let NaN out
        return MAX_PHI
    softplus = max(z, 0.0) + math.log1p(math.exp(-abs(z)))
    return min(softplus / _LN10, MAX_PHI)
