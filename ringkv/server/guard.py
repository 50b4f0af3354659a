"""The asyncio side of the client door (``ringkv.door``): deadline timers, the
open-files limit, and the door's metrics.

Every client listener uses these: the HTTP API's connections
(``server/http_protocol.py``) now, the native protocol's next. A listener's
connection implements ``Guest`` so that the door can close it to make room.
"""

from __future__ import annotations

import logging
import resource
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ringkv.clock import Clock, Timer
from ringkv.door import Connection, Door, Expiry
from ringkv.errors import RingKVError

log = logging.getLogger(__name__)

_NR_OPEN = Path("/proc/sys/fs/nr_open")  # Linux's ceiling for RLIMIT_NOFILE
_DEFAULT_NR_OPEN = 1 << 20


class Guest(Protocol):
    """A client connection as the door sees it."""

    def door_close(self, error: RingKVError | None) -> None:
        """Answer ``error`` (if any, and if the protocol still can), then close."""


class DeadlineTimer:
    """One connection's read deadline, as one timer re-armed lazily.

    Events only move the deadline (usually later); the timer is re-armed only
    when the deadline moved earlier than it. When it fires early it sleeps
    again until the deadline now due. So the hot path costs a comparison, and
    a busy keep-alive connection one timer per idle timeout. The listener
    calls ``update`` after any event that can bring the deadline forward (a
    head begun, a body expected, an answer); a request received whole only
    puts it off.
    """

    __slots__ = ("_connection", "_clock", "_on_expiry", "_timer", "_armed_s")

    def __init__(self, connection: Connection, clock: Clock,
                 on_expiry: Callable[[Expiry], None]) -> None:
        self._connection = connection
        self._clock = clock
        self._on_expiry = on_expiry
        self._timer: Timer | None = None
        self._armed_s = 0.0

    def update(self, now: float) -> None:
        """Something arrived or was answered at ``now``: make sure the timer is due in time."""
        self.update_to(self._connection.deadline_s(), now)

    def update_to(self, deadline: float | None, now: float) -> None:
        """``update``, with the connection's deadline already known."""
        if deadline is None or (self._timer is not None and self._armed_s <= deadline):
            return
        if self._timer is not None:
            self._timer.cancel()
        self._arm(deadline, now)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _arm(self, deadline: float, now: float) -> None:
        self._armed_s = deadline
        self._timer = self._clock.call_later(max(deadline - now, 0.0), self._fire)

    def _fire(self) -> None:
        self._timer = None
        now = self._clock.monotonic_s()
        expiry = self._connection.expired(now)
        if expiry is not None:
            self._on_expiry(expiry)
            return
        deadline = self._connection.deadline_s()
        if deadline is not None and self._connection.is_open:
            self._arm(deadline, now)


def raise_open_files_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (Cassandra asks the same of its
    operators); return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        try:  # Linux refuses more than fs.nr_open even when the hard limit is unlimited
            target = int(_NR_OPEN.read_text())
        except (OSError, ValueError):
            target = _DEFAULT_NR_OPEN
    if soft == resource.RLIM_INFINITY:
        return target
    if soft >= target:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError) as exc:
        log.warning("could not raise the open-files limit from %d to %d: %s", soft, target, exc)
        return soft
    log.info("raised the open-files limit (RLIMIT_NOFILE) from %d to %d", soft, target)
    return target


class DoorCollector:
    """The door's gauges and counters, read when /metrics is scraped."""

    def __init__(self, door: Door) -> None:
        self._door = door

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("ringkv_client_connections", "Open client connections",
                                value=self._door.open_count)
        yield GaugeMetricFamily(
            "ringkv_client_connections_limit",
            "The most client connections open at once (limits.max_client_connections, "
            "lowered to fit the open-files limit)",
            value=self._door.limits.max_connections,
        )
        closed = CounterMetricFamily(
            "ringkv_client_connections_closed",
            "Client connections closed by the door, by reason (client_closed: the client "
            "went away mid-request)",
            labels=["reason"],
        )
        for reason, count in self._door.closed.items():
            closed.add_metric([reason], count)
        yield closed
