"""Locust load scenarios for ringkv, through the Python client (token-aware, pooled).

    locust -f bench/locustfile.py --host http://127.0.0.1:7400,http://127.0.0.1:7401 \\
           --scenario read-heavy --consistency ONE,QUORUM,ALL --key-count 10000

Scenarios (``--scenario`` or RINGKV_SCENARIO):

    read-heavy     95% reads,  5% updates, uniform keys
    update-heavy   50% reads, 50% updates, uniform keys
    write-only     100% updates, uniform keys
    hot-key        50% reads, 50% updates, Zipfian keys (a few keys get most requests)
    node-kill      50% reads, 50% updates, uniform keys, at ONE, QUORUM and ALL unless
                   --consistency says otherwise: for an operator who kills and restarts a
                   node during the run (see README, "Load testing with locust")

Settings come from locust's command line or the environment:

    --consistency   RINGKV_CONSISTENCY   levels, comma-separated; each request takes the
                                         next one in turn (default QUORUM)
    --key-count     RINGKV_KEY_COUNT     keys key0..keyN-1 (default 1000)
    --value-bytes   RINGKV_VALUE_BYTES   size of the string values written (default 100)
    --read-fraction RINGKV_READ_FRACTION override the scenario's share of reads (0-1)
    --skip-preload  RINGKV_SKIP_PRELOAD  do not write every key before the run

``--host`` takes one or more comma-separated node URLs (seeds); the client
finds the rest of the ring itself. Requests are reported per operation and
consistency level, e.g. "GET [QUORUM]" and "PUT [ALL]", so one run compares
levels side by side.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from typing import Any

from locust import User, constant, events, task
from locust.runners import WorkerRunner

from bench.loadgen import key_chooser
from ringkv.client import Client
from ringkv.clock import SystemClock
from ringkv.errors import RingKVError
from ringkv.quorum import ConsistencyLevel

_CLOCK = SystemClock()

SCENARIOS: dict[str, tuple[float, str]] = {  # name -> (read fraction, key distribution)
    "read-heavy": (0.95, "uniform"),
    "update-heavy": (0.5, "uniform"),
    "write-only": (0.0, "uniform"),
    "hot-key": (0.5, "zipfian"),
    "node-kill": (0.5, "uniform"),
}
PRELOAD_BATCH = 100


@events.init_command_line_parser.add_listener
def _add_options(parser: Any) -> None:
    group = parser.add_argument_group("ringkv")
    group.add_argument("--scenario", choices=sorted(SCENARIOS), default="read-heavy",
                       env_var="RINGKV_SCENARIO", help="which workload to run")
    group.add_argument("--consistency", default=None, env_var="RINGKV_CONSISTENCY",
                       help="consistency levels, comma-separated (default QUORUM; "
                            "node-kill: ONE,QUORUM,ALL)")
    group.add_argument("--key-count", type=int, default=1000, env_var="RINGKV_KEY_COUNT",
                       help="number of distinct keys")
    group.add_argument("--value-bytes", type=int, default=100, env_var="RINGKV_VALUE_BYTES",
                       help="size of each written value")
    group.add_argument("--read-fraction", type=float, default=None,
                       env_var="RINGKV_READ_FRACTION", help="override the scenario's reads share")
    group.add_argument("--skip-preload", action="store_true", env_var="RINGKV_SKIP_PRELOAD",
                       help="do not write every key before the run")


@dataclass(frozen=True)
class Settings:
    """The run's settings, checked once from locust's parsed options."""

    scenario: str
    levels: tuple[str, ...]
    key_count: int
    value: str
    read_fraction: float
    key_dist: str
    preload: bool
    seeds: tuple[str, ...]

    @classmethod
    def from_environment(cls, environment: Any) -> Settings:
        options = environment.parsed_options
        read_fraction, key_dist = SCENARIOS[options.scenario]
        if options.read_fraction is not None:
            read_fraction = options.read_fraction
        if not 0 <= read_fraction <= 1 or options.key_count < 1 or options.value_bytes < 0:
            raise ValueError("need 0 <= --read-fraction <= 1, --key-count >= 1, --value-bytes >= 0")
        default = "ONE,QUORUM,ALL" if options.scenario == "node-kill" else "QUORUM"
        levels = tuple(  # ANY is for writes only, so only the write-only scenario takes it
            ConsistencyLevel.parse(level.strip(), write=read_fraction == 0).value
            for level in (options.consistency or default).split(",") if level.strip()
        )
        if not levels:
            raise ValueError("--consistency names no level")
        seeds = tuple(url.strip() for url in (environment.host or "").split(",") if url.strip())
        if not seeds:
            raise ValueError("give the cluster's node URLs with --host (comma-separated)")
        return cls(options.scenario, levels, options.key_count, "x" * options.value_bytes,
                   read_fraction, key_dist, not options.skip_preload, seeds)


_shared: dict[str, Any] = {}


def _client(environment: Any) -> tuple[Settings, Client]:
    """One settings object and one pooled client per locust process, shared by its users."""
    if "client" not in _shared:
        settings = Settings.from_environment(environment)
        _shared["settings"] = settings
        _shared["client"] = Client(list(settings.seeds), timeout_s=5.0, max_retries=3,
                                   pool_size=256)
    return _shared["settings"], _shared["client"]


@events.test_start.add_listener
def _preload(environment: Any, **_: Any) -> None:
    """Write every key once (not on workers: the master or the local runner does it)."""
    if isinstance(environment.runner, WorkerRunner):
        return
    settings, kv = _client(environment)
    if not settings.preload or settings.read_fraction == 0:
        return
    for first in range(0, settings.key_count, PRELOAD_BATCH):
        kv.batch([{"op": "put", "key": f"key{i}", "value": settings.value}
                  for i in range(first, min(first + PRELOAD_BATCH, settings.key_count))])


@events.test_stop.add_listener
def _close(environment: Any, **_: Any) -> None:
    client = _shared.get("client")
    if client is not None:
        client.close()


class RingKVUser(User):
    """A closed-loop user: one request at a time, no think time."""

    wait_time = constant(0)

    def on_start(self) -> None:
        """Share the process's client; pick this user's key chooser and level order."""
        self.settings, self.kv = _client(self.environment)
        rng = random.Random()
        self.rng = rng
        self.next_key = key_chooser(self.settings.key_dist, self.settings.key_count, rng)
        levels = list(self.settings.levels)
        rng.shuffle(levels)  # users start at different levels, so all levels get equal load
        self.levels = itertools.cycle(levels)

    @task
    def operation(self) -> None:
        """One read or update (per the scenario's mix) at the next consistency level."""
        level = next(self.levels)
        key = f"key{self.next_key()}"
        if self.rng.random() < self.settings.read_fraction:
            self._timed(f"GET [{level}]", lambda: self.kv.get(key, consistency=level))
        else:
            self._timed(f"PUT [{level}]",
                        lambda: self.kv.put(key, self.settings.value, consistency=level))

    def _timed(self, name: str, call: Any) -> None:
        started = _CLOCK.monotonic_s()
        exception: Exception | None = None
        try:
            call()
        except RingKVError as exc:
            exception = exc
        self.environment.events.request.fire(
            request_type="ringkv", name=name,
            response_time=(_CLOCK.monotonic_s() - started) * 1000, response_length=0,
            exception=exception, context={},
        )
