"""The failed-login limit (pure): a token bucket per source address, fed ``now``.

Each failed login takes a token from its address's bucket; tokens come back
at ``refill_per_s`` up to ``burst``. An address whose bucket is empty is
refused every login (a right password too, else guessing would go on at
full speed) until a token is back; ``retry_after_s`` says when. Addresses
whose bucket is full again are forgotten, and at most ``max_addresses`` are
kept (the fullest go first), so a flood of addresses cannot grow memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class _Bucket:
    tokens: float
    at_s: float


@dataclass
class FailedLogins:
    burst: int = 10
    refill_per_s: float = 0.2
    max_addresses: int = 10_000
    _buckets: dict[str, _Bucket] = field(default_factory=dict)

    def _level(self, address: str, now_s: float) -> float:
        bucket = self._buckets.get(address)
        if bucket is None:
            return float(self.burst)
        return min(float(self.burst), bucket.tokens + (now_s - bucket.at_s) * self.refill_per_s)

    def retry_after_s(self, address: str, now_s: float) -> float | None:
        """None when ``address`` may try to log in now, else how long until it may."""
        level = self._level(address, now_s)
        if level >= 1.0:
            return None
        return (1.0 - level) / self.refill_per_s

    def failed(self, address: str, now_s: float) -> None:
        level = max(0.0, self._level(address, now_s) - 1.0)
        self._buckets.pop(address, None)  # re-inserted last: dict order is recency
        self._buckets[address] = _Bucket(level, now_s)
        if len(self._buckets) > self.max_addresses:
            self._forget(now_s)

    def _forget(self, now_s: float) -> None:
        full = [a for a in self._buckets if self._level(a, now_s) >= self.burst]
        for address in full:
            del self._buckets[address]
        while len(self._buckets) > self.max_addresses:
            del self._buckets[next(iter(self._buckets))]  # the least recently failed

    def tracked(self) -> int:
        return len(self._buckets)
