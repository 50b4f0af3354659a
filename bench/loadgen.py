"""A closed-loop HTTP load generator that runs in its own process.

Each of ``concurrency`` workers keeps one request in flight on its own
keep-alive connection. Latencies are recorded per request; the generator also
reports its own CPU use, so a saturated client shows up in the results rather
than silently capping the server's numbers.

A phase is *generator-limited* (``limited_by``; marked ``*`` in the tables
and hatched in the plots) when the generator, not the nodes, may have set its
pace: a generator process used more than ``proc_cpu.GEN_LIMITED_SHARE`` of a
core ("cpu"), or its event loop ran late ("lag"). The lag is measured by a
ticker in the generator's loop: how much later than asked each short sleep
wakes, its median over the phase less its median with the loop idle just
before. A closed loop always holds ``concurrency`` requests in flight; when
answers wait in the generator for more than ``LAG_SHARE`` of the median
latency (and at least ``LAG_FLOOR_MS``), it is the client that holds them at
that cap, and the phase's ops/s and latencies measure it as much as the nodes.
A busy machine (other processes on the generator's core) shows as lag too,
rightly: the generator could not keep up, whatever the reason.

Operations: ``put``, ``get``, or ``mix`` (a read with probability
``read_fraction``, else an update), on keys chosen uniformly or from a
Zipfian distribution (YCSB's: a few hot keys get most requests). Requests
go out as plain HTTP spread over the base URLs, or through the token-aware
``ringkv.client.AsyncClient`` (``use_client=True``). While it runs, the child
reports progress to the parent about twice a second (``on_progress``).
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import random
import ssl
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from bench import proc_cpu
from ringkv.address import format_address
from ringkv.clock import SystemClock

PROGRESS_INTERVAL_S = 0.5
_CLOCK = SystemClock()
# The event-loop ticker: how often it sleeps, how many idle ticks calibrate it, and at
# most how many samples a phase keeps (a bound: 15 minutes of ticks).
LAG_TICK_S = 0.005
LAG_IDLE_TICKS = 20
MAX_LAG_SAMPLES = 180_000
# Lag above this share of the median latency, and above the floor, limits a phase.
LAG_SHARE = 0.25
LAG_FLOOR_MS = 1.0
GEN_LAG_NOTE = (f"{proc_cpu.GEN_LIMITED_MARK} on gen lag: generator-limited: its event loop ran "
                f"late by more than {LAG_SHARE:.0%} of the median latency (and "
                f"{LAG_FLOOR_MS:g} ms), so answers waited in the generator and the client, "
                "not the nodes, held the requests in flight at the concurrency cap")


@dataclass
class LoadResult:
    label: str
    op: str
    concurrency: int
    ops: int
    errors: int
    duration_s: float
    ops_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    client_cpu_pct: float  # the generator process's CPU over the phase, in % of one core
    read_fraction: float | None = None
    key_dist: str = "uniform"
    consistency: str | None = None
    # CPU the node processes spent per completed op, summed over them (bench/proc_cpu.py):
    # the figure regressions are judged by. None if not measured.
    server_cpu_us_per_op: float | None = None
    # The generator's own CPU per completed op, and whether it used more than 80% of a core.
    gen_cpu_us_per_op: float | None = None
    gen_limited: bool = False  # by either rule (``limited_by``)
    # The generator's event-loop lag over the phase, ms (median, less the idle median);
    # None when not measured (a phase not run by ``run_load``).
    gen_lag_ms: float | None = None
    gen_cpu_limited: bool = False
    gen_lag_limited: bool = False

    def apply(self, phase: proc_cpu.PhaseCpu) -> None:
        """Take the CPU figures of a phase measured by ``proc_cpu.PhaseMeter``."""
        self.server_cpu_us_per_op = phase.node_us_per_op
        self.gen_cpu_us_per_op = phase.gen_us_per_op
        self.client_cpu_pct = phase.gen_core_pct
        self.gen_cpu_limited = phase.gen_limited
        self._judge()

    def apply_lag(self, lag_ms: float | None) -> None:
        """Take the generator's event-loop lag over the phase (see ``lag_limited``)."""
        self.gen_lag_ms = None if lag_ms is None else round(lag_ms, 3)
        self.gen_lag_limited = lag_limited(self.gen_lag_ms, self.p50_ms)
        self._judge()

    def _judge(self) -> None:
        self.gen_limited = self.gen_cpu_limited or self.gen_lag_limited

    @property
    def limited_by(self) -> str:
        """Why the phase is generator-limited: "cpu", "lag", "cpu+lag", or "" if it is not."""
        return "+".join(name for name, hit in (("cpu", self.gen_cpu_limited),
                                               ("lag", self.gen_lag_limited)) if hit)

    def to_json(self) -> dict[str, object]:
        return {**asdict(self), "limited_by": self.limited_by}


def lag_limited(lag_ms: float | None, p50_ms: float) -> bool:
    """The lag rule: the generator's loop ran late by more than ``LAG_SHARE`` of the
    median latency and more than ``LAG_FLOOR_MS`` (below that, timer granularity)."""
    return lag_ms is not None and lag_ms > max(LAG_FLOOR_MS, LAG_SHARE * p50_ms)


def loop_lag_ms(idle_s: Sequence[float], busy_s: Sequence[float]) -> float | None:
    """The loop's lag over a phase, ms: the median late wake-up under load less the
    median idle one (the timer's own granularity); None without samples."""
    if not busy_s:
        return None
    idle = percentile(sorted(idle_s), 50) if idle_s else 0.0
    return max(0.0, percentile(sorted(busy_s), 50) - idle) * 1000


def percentile(sorted_values: list[float], pct: float) -> float:
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, int(round(pct / 100 * (len(sorted_values) - 1))))
    return sorted_values[index]


class ZipfianGenerator:
    """Item numbers 0..n-1 with P(i) proportional to 1/(i+1)**theta (YCSB's request distribution).

    Gray et al., "Quickly Generating Billion-Record Synthetic Databases"
    (SIGMOD 1994), as in YCSB's ZipfianGenerator: O(n) set-up once, O(1)
    per draw. With theta 0.99 (YCSB's default) and 10,000 keys, the
    hottest key gets about 10% of all requests and the 10 hottest about 30%.
    """

    def __init__(self, n: int, theta: float = 0.99, rng: random.Random | None = None) -> None:
        if n < 1 or not 0 < theta < 1:
            raise ValueError("need n >= 1 and 0 < theta < 1")
        self.n = n
        self.theta = theta
        self._rng = rng or random.Random()
        self._zetan = sum(1.0 / (i ** theta) for i in range(1, n + 1))
        self._alpha = 1.0 / (1.0 - theta)
        zeta2 = 1.0 + 0.5 ** theta
        self._eta = (1 - (2.0 / n) ** (1 - theta)) / (1 - zeta2 / self._zetan) if n > 2 else 1.0
        self._half_pow_theta = 0.5 ** theta

    def next(self) -> int:
        """One draw: 0 is the hottest item."""
        u = self._rng.random()
        uz = u * self._zetan
        if uz < 1.0:
            return 0
        if uz < 1.0 + self._half_pow_theta:
            return min(1, self.n - 1)
        return min(self.n - 1, int(self.n * (self._eta * u - self._eta + 1) ** self._alpha))


def key_chooser(key_dist: str, key_count: int, rng: random.Random) -> Callable[[], int]:
    """A function returning the next key number: ``uniform`` or ``zipfian``."""
    if key_dist == "uniform":
        return lambda: rng.randrange(key_count)
    if key_dist == "zipfian":
        return ZipfianGenerator(key_count, rng=rng).next
    raise ValueError(f"unknown key distribution {key_dist!r}")


def _read_fraction(op: str, read_fraction: float | None) -> float:
    if op in ("put", "get"):
        return 0.0 if op == "put" else 1.0
    if op != "mix" or read_fraction is None or not 0 <= read_fraction <= 1:
        raise ValueError("op must be put, get, or mix with 0 <= read_fraction <= 1")
    return read_fraction


@dataclass(frozen=True)
class _Target:
    host: str
    port: int
    prefix: str  # a path prefix in the base URL, if any

    @property
    def host_header(self) -> str:
        return format_address(self.host, self.port)  # [v6addr]:port, as HTTP wants

    @staticmethod
    def parse(url: str) -> _Target:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"load target must be an http:// or https:// URL, got {url!r}")
        return _Target(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80),
                       parts.path.rstrip("/"))


class _Connection:
    """One keep-alive HTTP/1.1 connection carrying one request at a time.

    A plain-HTTP phase measures the cluster, not the client: a general client
    such as aiohttp's spends ~100 us of CPU a request, which on a small machine
    takes cores from the nodes under test. Like wrk, this writes precomputed
    bytes and reads only the status line and Content-Length.
    """

    def __init__(self, target: _Target, context: ssl.SSLContext | None = None) -> None:
        self._target = target
        self._context = context  # https targets
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def request(self, data: bytes) -> int:
        """Send one request; the response's status, or 0 if the exchange failed."""
        return (await self.exchange(data))[0]

    async def exchange(self, data: bytes) -> tuple[int, bytes]:
        """Send one request; the response's status and body, or (0, b"") if it failed."""
        try:
            if self._writer is None:
                self._reader, self._writer = await asyncio.open_connection(
                    self._target.host, self._target.port, ssl=self._context)
            assert self._reader is not None
            self._writer.write(data)
            head = await self._reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            lowered = head.lower()
            at = lowered.find(b"\r\ncontent-length:")
            if at < 0:
                raise ValueError("response without Content-Length")
            length = int(lowered[at + 17:lowered.index(b"\r\n", at + 2)])
            body = await self._reader.readexactly(length)
            if b"\r\nconnection: close" in lowered:
                self.close()
            return status, body
        except (OSError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            self.close()
            return 0, b""

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None


class _NativeLink(asyncio.Protocol):
    """One pipelined native-protocol connection to a node, shared by every worker.

    As lean as the plain-HTTP generator: a request is one frame packed by a
    reused packer; requests written in one loop turn go out in one write; an
    answer is matched to its waiter by request id and only its status is read.
    """

    def __init__(self) -> None:
        from ringkv.net.codec import FrameDecoder, frame_packer

        self.transport: asyncio.Transport | None = None
        self.decoder = FrameDecoder()
        self.packer = frame_packer()
        self.pending: dict[int, asyncio.Future[int]] = {}
        self.next_id = 1
        self.out: list[bytes] = []
        self.hello: asyncio.Future[object] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        for frame in self.decoder.feed(data):
            if frame.request_id == 0:
                if not self.hello.done():
                    self.hello.set_result(frame.payload)
                continue
            waiter = self.pending.pop(frame.request_id, None)
            if waiter is not None and not waiter.done():
                payload = frame.payload
                waiter.set_result(payload.get("status", 0) if isinstance(payload, dict) else 0)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.transport = None
        pending, self.pending = self.pending, {}
        for waiter in pending.values():
            if not waiter.done():
                waiter.set_result(0)
        if not self.hello.done():
            self.hello.set_exception(ConnectionError("closed during the handshake"))

    def request(self, verb: str, payload: dict[str, object]) -> asyncio.Future[int]:
        from ringkv.net.codec import KIND_REQUEST, encode_frame

        waiter: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        if self.transport is None:
            waiter.set_result(0)
            return waiter
        request_id = self.next_id
        self.next_id += 1
        self.pending[request_id] = waiter
        if not self.out:
            asyncio.get_running_loop().call_soon(self._flush)
        self.out.append(encode_frame(KIND_REQUEST, request_id, verb, payload,
                                     packer=self.packer))
        return waiter

    def _flush(self) -> None:
        out, self.out = self.out, []
        if self.transport is not None and out:
            self.transport.write(b"".join(out))


async def _native_links(base_urls: list[str],
                        context: ssl.SSLContext | None = None) -> list[_NativeLink]:
    """A handshaken native connection to each node of ``base_urls`` (their native
    addresses from the ring the first one serves); TLS with ``context``."""
    import urllib.request

    from ringkv.address import parse_address
    from ringkv.net.codec import KIND_REQUEST, encode_frame

    with urllib.request.urlopen(base_urls[0].rstrip("/") + "/v1/ring", timeout=10,
                                context=context) as answer:
        ring = json.loads(answer.read())
    wanted = {urllib.parse.urlsplit(url).netloc for url in base_urls}
    addresses = [parse_address(n["native_address"]) for n in ring["nodes"]
                 if n.get("native_address") and n.get("client_address") in wanted]
    if not addresses:
        raise RuntimeError("no node of the ring has a native address")
    loop = asyncio.get_running_loop()
    links = []
    for host, port in addresses:
        _, link = await loop.create_connection(_NativeLink, host, port, ssl=context,
                                               server_hostname=host if context else None)
        assert link.transport is not None
        link.transport.write(encode_frame(KIND_REQUEST, 0, "hello", {"versions": [1]}))
        await asyncio.wait_for(link.hello, 10)
        links.append(link)
    return links


def _native_request(path_template: str) -> tuple[str, dict[str, str]]:
    """The keyspace and args of a ``/v1/kv/{keyspace}/{key}?...`` template."""
    parts = urllib.parse.urlsplit(path_template)
    keyspace = parts.path[len("/v1/kv/"):].split("/", 1)[0]
    return keyspace, dict(urllib.parse.parse_qsl(parts.query))


async def _run(
    base_url: str | list[str], path_template: str, op: str, concurrency: int, duration_s: float,
    key_count: int, value: object, seed: int, read_fraction: float | None = None,
    key_dist: str = "uniform", use_client: bool = False, consistency: str | None = None,
    progress: Callable[[int, int, float], None] | None = None, protocol: str = "http",
    ca_file: str | None = None,
) -> tuple[list[float], int, float, float | None]:
    latencies: list[float] = []
    errors = 0
    idle_lags: list[float] = []
    lags: list[float] = []
    loaded = False  # the ticker's samples count once the workers run
    reads = _read_fraction(op, read_fraction)
    body = json.dumps({"value": value}).encode()
    deadline = _CLOCK.monotonic_s() + duration_s
    rng = random.Random(seed)
    next_key = key_chooser(key_dist, key_count, rng)
    # Several base URLs spread the load over a cluster's coordinators.
    base_urls = [base_url] if isinstance(base_url, str) else list(base_url)

    targets = [_Target.parse(url) for url in base_urls]
    # https:// targets (a TLS cluster): trust its CA; the native links use TLS too.
    context = ssl.create_default_context(cafile=ca_file) if ca_file else None
    put_suffix = (f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                  .encode() + body)

    async def http_op(conns: dict[int, _Connection], read: bool, key: str) -> bool:
        index = rng.randrange(len(targets))
        target = targets[index]
        conn = conns.get(index) or conns.setdefault(index, _Connection(target, context))
        path = target.prefix + path_template.format(key=key)
        if read:
            status = await conn.request(f"GET {path} HTTP/1.1\r\nHost: {target.host_header}\r\n\r\n"
                                        .encode())
            return status in (200, 404)
        status = await conn.request(f"PUT {path} HTTP/1.1\r\nHost: {target.host_header}\r\n"
                                    .encode() + put_suffix)
        return status == 200

    native_keyspace, native_args = _native_request(path_template)
    native_body = body

    async def native_op(links: list[_NativeLink], read: bool, key: str) -> bool:
        link = links[rng.randrange(len(links))]
        if read:
            status = await link.request("get", {"keyspace": native_keyspace, "key": key,
                                                "args": native_args})
            return status in (200, 404)
        status = await link.request("put", {"keyspace": native_keyspace, "key": key,
                                            "args": native_args, "body": native_body})
        return status == 200

    # etcd's v3 JSON gateway (bench/etcd.py): the same lean connections, the same value bytes.
    etcd_value = value.encode() if isinstance(value, str) else json.dumps(value).encode()

    async def etcd_op(conns: dict[int, _Connection], read: bool, key: str) -> bool:
        from bench.etcd import etcd_put_request, etcd_range_request

        index = rng.randrange(len(targets))
        target = targets[index]
        conn = conns.get(index) or conns.setdefault(index, _Connection(target))
        request = (etcd_range_request(target.host_header, key) if read
                   else etcd_put_request(target.host_header, key, etcd_value))
        return await conn.request(request) == 200

    async def client_op(kv: object, read: bool, key: str) -> bool:
        from ringkv.errors import RingKVError

        try:
            if read:
                await kv.get(key)  # type: ignore[attr-defined]
            else:
                await kv.put(key, value)  # type: ignore[attr-defined]
        except RingKVError:
            return False
        return True

    async def worker(target: object, do: Callable[..., object]) -> None:
        nonlocal errors
        while _CLOCK.monotonic_s() < deadline:
            read = rng.random() < reads
            key = f"key{next_key()}"
            started = _CLOCK.monotonic_s()
            if await do(target, read, key):  # type: ignore[misc]
                latencies.append(_CLOCK.monotonic_s() - started)
            else:
                errors += 1

    async def report() -> None:
        while progress is not None:
            await asyncio.sleep(PROGRESS_INTERVAL_S)
            progress(len(latencies), errors, _CLOCK.monotonic_s() - started)

    async def tick() -> None:
        """How late each short sleep wakes: the loop's lag (see the module docstring)."""
        while len(lags) < MAX_LAG_SAMPLES:
            asked = _CLOCK.monotonic_s()
            await asyncio.sleep(LAG_TICK_S)
            late = max(0.0, _CLOCK.monotonic_s() - asked - LAG_TICK_S)
            if loaded:  # (while connections open and the ring is read: neither idle nor load)
                lags.append(late)

    for _ in range(LAG_IDLE_TICKS):  # the idle loop first: the timer's own lateness
        asked = _CLOCK.monotonic_s()
        await asyncio.sleep(LAG_TICK_S)
        idle_lags.append(max(0.0, _CLOCK.monotonic_s() - asked - LAG_TICK_S))
    started = _CLOCK.monotonic_s()
    reporter = asyncio.ensure_future(report())
    ticker = asyncio.ensure_future(tick())

    def go() -> float:
        nonlocal loaded
        loaded = True
        return _CLOCK.monotonic_s()

    try:
        if use_client:
            from ringkv.client import AsyncClient

            async with AsyncClient(base_urls, consistency=consistency,
                                   pool_size=concurrency, protocol=protocol,
                                   ca_file=ca_file) as kv:
                await kv.refresh_ring()
                started = go()
                await asyncio.gather(*(worker(kv, client_op) for _ in range(concurrency)))
        elif protocol == "native":
            links = await _native_links(base_urls, context)
            try:
                started = go()
                await asyncio.gather(*(worker(links, native_op) for _ in range(concurrency)))
            finally:
                for link in links:
                    if link.transport is not None:
                        link.transport.close()
        else:
            pools: list[dict[int, _Connection]] = [{} for _ in range(concurrency)]
            do = etcd_op if protocol == "etcd" else http_op
            try:
                started = go()
                await asyncio.gather(*(worker(pool, do) for pool in pools))
            finally:
                for pool in pools:
                    for conn in pool.values():
                        conn.close()
        elapsed = _CLOCK.monotonic_s() - started
    finally:
        reporter.cancel()
        ticker.cancel()
    return latencies, errors, elapsed, loop_lag_ms(idle_lags, lags)


def _child(conn, kwargs: dict[str, object]) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass

    def progress(ops: int, errors: int, elapsed: float) -> None:
        conn.send(("progress", ops, errors, elapsed))

    conn.send(("go",))  # the parent starts reading the nodes' CPU
    cpu_before_s = proc_cpu.own_cpu_s()
    latencies, errors, elapsed, lag_ms = asyncio.run(
        _run(**kwargs, progress=progress))  # type: ignore[arg-type]
    cpu_s = proc_cpu.own_cpu_s() - cpu_before_s
    conn.send(("done", latencies, errors, elapsed, cpu_s, lag_ms))
    conn.close()


def run_load(
    label: str, base_url: str | list[str], path_template: str, *, op: str, concurrency: int,
    duration_s: float, key_count: int = 10_000, value: object = "x" * 100, seed: int = 1,
    read_fraction: float | None = None, key_dist: str = "uniform", use_client: bool = False,
    consistency: str | None = None,
    on_progress: Callable[[int, int, float], None] | None = None, protocol: str = "http",
    node_pids: Sequence[int] = (), ca_file: str | None = None,
) -> LoadResult:
    """Run one load phase in a separate process and summarise it.

    ``node_pids``: the node processes under test, whose CPU per operation
    (``proc_cpu.PhaseMeter``, read from the generator's start to its end) goes
    into the result beside the generator's own.

    ``op``: put, get, or mix (reads with probability ``read_fraction``).
    ``key_dist``: uniform or zipfian. ``use_client``: go through the
    token-aware ``AsyncClient`` at ``consistency`` instead of plain HTTP to
    ``path_template``. ``on_progress(ops, errors, elapsed_s)`` is called as
    the child reports. ``protocol``: ``native`` sends the requests over the
    native protocol (a lean pipelined generator, one connection per node; or
    the client's native default with ``use_client``), ``http`` over HTTP,
    ``etcd`` as etcd v3 gateway puts and linearizable ranges (``path_template``
    unused; bench/etcd.py). ``ca_file``: the CA of an https:// cluster (TLS on
    HTTP and native alike).
    """
    _read_fraction(op, read_fraction)  # fail here, not in the child
    parent, child = multiprocessing.Pipe(duplex=False)
    kwargs = dict(base_url=base_url, path_template=path_template, op=op, concurrency=concurrency,
                  duration_s=duration_s, key_count=key_count, value=value, seed=seed,
                  read_fraction=read_fraction, key_dist=key_dist, use_client=use_client,
                  consistency=consistency, protocol=protocol, ca_file=ca_file)
    process = multiprocessing.get_context("spawn").Process(target=_child, args=(child, kwargs))
    meter = proc_cpu.PhaseMeter(node_pids)
    process.start()
    child.close()
    deadline = _CLOCK.monotonic_s() + duration_s + 60
    try:
        while True:
            if not parent.poll(max(0.0, deadline - _CLOCK.monotonic_s())):
                raise RuntimeError(f"load generator for {label} did not report in time")
            message = parent.recv()
            if message[0] == "go":
                meter.start()
            elif message[0] == "done":
                meter.stop()
                break
            elif on_progress is not None:
                on_progress(*message[1:])
        _, latencies, errors, elapsed, cpu_s, lag_ms = message
        meter.add_reported_gen(cpu_s)
    except BaseException:  # an error or Ctrl-C here: the child must not run out its phase
        process.kill()
        raise
    finally:
        process.join(timeout=30)
        if process.is_alive():
            process.kill()
            process.join(timeout=30)
    ordered = sorted(latencies)
    ms = [value * 1000 for value in ordered]
    result = LoadResult(
        label=label, op=op, concurrency=concurrency, ops=len(ordered), errors=errors,
        duration_s=round(elapsed, 2), ops_per_s=round(len(ordered) / elapsed, 1),
        p50_ms=round(percentile(ms, 50), 3), p95_ms=round(percentile(ms, 95), 3),
        p99_ms=round(percentile(ms, 99), 3), max_ms=round(ms[-1] if ms else 0.0, 3),
        client_cpu_pct=0.0,
        read_fraction=_read_fraction(op, read_fraction), key_dist=key_dist,
        consistency=consistency,
    )
    result.apply(meter.result(len(ordered), elapsed_s=elapsed))  # node figures None without pids
    result.apply_lag(lag_ms)
    return result


def compare(name: str, ours: LoadResult, base: LoadResult) -> tuple[dict[str, object], str]:
    """``ours`` against ``base`` from the same run: a JSON record and a printable line."""
    ratio = ours.ops_per_s / base.ops_per_s if base.ops_per_s else 0.0
    record: dict[str, object] = {
        "name": name, "op": ours.op, "concurrency": ours.concurrency,
        "ratio": round(ratio, 3), "p99_ms": ours.p99_ms, "base_p99_ms": base.p99_ms}
    line = (f"{name} {ours.op:<4} c={ours.concurrency:<3} throughput ratio {ratio:.2f}x  "
            f"(p99 {ours.p99_ms:.2f} ms vs {base.p99_ms:.2f} ms)")
    if ours.server_cpu_us_per_op and base.server_cpu_us_per_op:
        cpu_ratio = ours.server_cpu_us_per_op / base.server_cpu_us_per_op
        record["server_cpu_ratio"] = round(cpu_ratio, 3)
        line += f"  server CPU/op ratio {cpu_ratio:.2f}x"
    return record, line


# The leading columns of the default table: (header, format spec, value of a result).
DEFAULT_LEADING: tuple[tuple[str, str, Callable[[LoadResult], object]], ...] = (
    ("target", "<18", lambda r: r.label),
    ("op", "<5", lambda r: r.op),
    ("conc", ">5", lambda r: r.concurrency),
)


def _header(leading: tuple[tuple[str, str, Callable[[LoadResult], object]], ...]) -> str:
    return ("".join(f"{name:{spec}}" for name, spec, _ in leading)
            + f"{'ops/s':>10}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'max ms':>9}{'errors':>8}"
            + f"{'node us/op':>12}{'gen us/op':>11}{'gen core':>10}{'gen lag':>9}")


def _us(value: float | None, width: int) -> str:
    return f"{value:>{width}.0f}" if value is not None else f"{'-':>{width}}"


def format_row(
    r: LoadResult,
    leading: tuple[tuple[str, str, Callable[[LoadResult], object]], ...] = DEFAULT_LEADING,
) -> str:
    """One result as a row of ``format_table``; a generator-limited phase ends in the mark."""
    gen_core = f"{r.client_cpu_pct:.0f}%{proc_cpu.gen_mark(r.gen_cpu_limited)}"
    gen_lag = ("-" if r.gen_lag_ms is None
               else f"{r.gen_lag_ms:.1f}ms{proc_cpu.gen_mark(r.gen_lag_limited)}")
    return ("".join(f"{str(value(r)):{spec}}" for _, spec, value in leading)
            + f"{r.ops_per_s:>10.0f}{r.p50_ms:>9.2f}"
            f"{r.p95_ms:>9.2f}{r.p99_ms:>9.2f}{r.max_ms:>9.1f}{r.errors:>8}"
            f"{_us(r.server_cpu_us_per_op, 12)}{_us(r.gen_cpu_us_per_op, 11)}{gen_core:>10}"
            f"{gen_lag:>9}")


def format_table(
    results: list[LoadResult],
    leading: tuple[tuple[str, str, Callable[[LoadResult], object]], ...] = DEFAULT_LEADING,
) -> str:
    """One row per result: the ``leading`` columns, then ops/s, latencies, errors, the node
    processes' CPU us/op (summed over them; "-" when not measured), the generator's own CPU
    us/op and its share of a core, and its event loop's lag; a generator-limited phase has
    the mark on the figure that tripped the rule (``LoadResult.limited_by``), explained
    in a note under the table."""
    header = _header(leading)
    lines = [header, "-" * len(header)] + [format_row(r, leading) for r in results]
    if any(r.gen_cpu_limited for r in results):
        lines.append(proc_cpu.GEN_LIMITED_NOTE)
    if any(r.gen_lag_limited for r in results):
        lines.append(GEN_LAG_NOTE)
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover - manual use
    print(os.getpid())
