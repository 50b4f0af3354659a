"""Start real node processes on loopback, wait until they serve, and stop them by PID.

Used by `ringkv cluster up`, the benchmarks and the process tests alike.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import ssl
import subprocess
import threading
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from http import client as http_client
from pathlib import Path
from typing import Any

from ringkv.address import format_address
from ringkv.clock import SystemClock

_CLOCK = SystemClock()
START_DEADLINE_S = 30.0
STOP_DEADLINE_S = 15.0


def _ephemeral_port_range() -> tuple[int, int]:
    """The kernel's range for the source ports of outgoing connections."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


# Ports for listeners are taken from below the ephemeral range. A client that
# polls a port in that range before its server listens can be handed that very
# port as its own source port, and TCP then connects the socket to itself: the
# client reads back its own request (seen here as BadStatusLine "GET /v1/health").
_LOWEST_PORT = 10000
_PICKER = random.Random()
_HANDED_OUT: set[tuple[str, int]] = set()  # released after bind, so remember them
_MAX_ATTEMPTS = 500


def free_port_block(count: int, host: str = "127.0.0.1") -> int:
    """The first of ``count`` consecutive ports free on ``host`` and outside the ephemeral range.

    A port is free when it binds right now; ports this process has handed out
    before are skipped, since their listener may not have started yet.
    """
    ephemeral_low, ephemeral_high = _ephemeral_port_range()
    if ephemeral_low - _LOWEST_PORT > count:
        low, high = _LOWEST_PORT, ephemeral_low - count
    else:  # an unusual kernel setting: fall back to the ports above the range
        low, high = ephemeral_high + 1, 65535 - count
    for _ in range(_MAX_ATTEMPTS):
        start = _PICKER.randrange(low, high)
        ports = [(host, port) for port in range(start, start + count)]
        if any(p in _HANDED_OUT for p in ports):
            continue
        socks: list[socket.socket] = []
        try:
            for address in ports:
                sock = socket.socket()
                socks.append(sock)
                sock.bind(address)
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
        _HANDED_OUT.update(ports)
        return start
    raise RuntimeError(f"found no {count} consecutive free ports on {host} in {_MAX_ATTEMPTS} tries")


def port_is_free(host: str, port: int) -> bool:
    """Whether a listener could bind ``port`` on ``host`` right now."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on ``host`` right now, outside the ephemeral range (see above)."""
    return free_port_block(1, host)


class Interrupted(Exception):
    """The operator asked to stop (``STOP_REQUESTED``) while we were waiting."""


# Set by a signal handler (``ringkv cluster up`` on SIGTERM). Every wait gives
# up at its next poll, so a stop request ends start-up between steps instead of
# landing inside one: an exception raised from a handler in the middle of
# ``subprocess.Popen`` would leave a node running that nobody tracks.
STOP_REQUESTED = threading.Event()


def wait_until(predicate, *, timeout_s: float, interval_s: float = 0.05, what: str = "condition"):
    """Poll ``predicate`` until it returns a truthy value or the deadline passes."""
    deadline = _CLOCK.monotonic_s() + timeout_s
    while True:
        if STOP_REQUESTED.is_set():
            raise Interrupted(f"asked to stop while waiting for {what}")
        result = predicate()
        if result:
            return result
        if _CLOCK.monotonic_s() >= deadline:
            raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}")
        _CLOCK.sleep_s(interval_s)


@dataclass
class NodeProcess:
    node_id: str
    data_dir: Path
    host: str = "127.0.0.1"
    client_port: int = field(default_factory=free_port)
    internode_port: int = field(default_factory=free_port)
    native_port: int = field(default_factory=free_port)  # the native client protocol's
    extra_args: list[str] = field(default_factory=list)
    config_path: Path | None = None
    wrapper: list[str] = field(default_factory=list)  # e.g. ip netns exec NS: runs it on a test host
    url_host: str | None = None  # where clients reach it when ``host`` is a wildcard
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    # The directory of `ringkv certs` (ca.crt, client.crt/.key) when the node serves
    # TLS to clients (its config's tls.client): its URL is https://, and ``http``
    # trusts that CA for it.
    tls_dir: Path | None = None
    # Outlive the process that starts it (`ringkv cluster up --detach`): its own
    # session, so neither the terminal's Ctrl-C nor the end of the starting
    # shell reaches it, and no inherited stdin.
    detached: bool = False
    # Called once the process exists (its pid known), before any wait: a detached
    # cluster records it at once, so no node is left that nothing knows of.
    on_launch: Callable[[NodeProcess], None] | None = field(default=None, repr=False,
                                                            compare=False)

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    @property
    def url(self) -> str:
        scheme = "https" if self.tls_dir is not None else "http"
        return f"{scheme}://{format_address(self.url_host or self.host, self.client_port)}"

    def client_context(self) -> ssl.SSLContext | None:
        """What a client of this node uses: its CA, and the client certificate if any."""
        if self.tls_dir is None:
            return None
        return tls_client_context(self.tls_dir)

    def start(self, *, wait_joined: bool = True) -> NodeProcess:
        """Start the process; return once it serves clients (NORMAL on the ring), or
        with ``wait_joined=False`` once it answers /v1/status (maybe still joining)."""
        self.launch()
        ready = self._ready if wait_joined else self._answers_status
        wait_until(ready, timeout_s=START_DEADLINE_S, what=f"{self.node_id} to start")
        return self

    def launch(self) -> NodeProcess:
        """Start the process and return at once (``start`` also waits for it)."""
        self.log_path = self.data_dir / f"{self.node_id}.log"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        args = [
            *self.wrapper, sys.executable, "-m", "ringkv.cli", "node",
            "--id", self.node_id,
            "--host", self.host,
            "--client-port", str(self.client_port),
            "--internode-port", str(self.internode_port),
            "--native-port", str(self.native_port),
            "--data-dir", str(self.data_dir),
            *self.extra_args,
        ]
        if "--seeds" not in self.extra_args:
            # A lone node is its own seed; it must not wander into another cluster.
            args += ["--seeds", format_address(self.host, self.internode_port)]
        if self.config_path is not None:
            args += ["--config", str(self.config_path)]
        self.proc = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, start_new_session=self.detached,
            stdin=subprocess.DEVNULL if self.detached else None)
        log.close()
        if self.on_launch is not None:
            self.on_launch(self)
        context = self.client_context()
        if context is not None:
            trust(self.url, context)
        return self

    def _answers_status(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"{self.node_id} exited early:\n{self.log_tail()}")
        try:
            return http("GET", f"{self.url}/v1/status", timeout_s=1.0)[0] == 200
        except (OSError, http_client.HTTPException):
            return False

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"{self.node_id} exited early:\n{self.log_tail()}")
        try:
            status, _ = http("GET", f"{self.url}/v1/health", timeout_s=1.0)
            return status == 200
        except (OSError, http_client.HTTPException):
            return False  # not listening yet, or a half-started server

    def log_tail(self, lines: int = 40) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        """SIGKILL: no flush, no goodbye."""
        if self.proc is not None and self.proc.poll() is None:
            self.signal(signal.SIGKILL)
            self.proc.wait(timeout=STOP_DEADLINE_S)

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL if it does not exit in time. Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            try:
                self.signal(signal.SIGCONT)  # a paused process cannot handle SIGTERM
                self.signal(signal.SIGTERM)
                return self.proc.wait(timeout=STOP_DEADLINE_S)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode


# TLS nodes this process started (or was told of), by "scheme://host:port": the
# context to reach each, so that every helper here and in local_cluster reaches a
# TLS cluster with the same calls as a plain one.
_TRUSTED: dict[str, ssl.SSLContext] = {}


def trust(url: str, context: ssl.SSLContext) -> None:
    """Reach the node at ``url`` (its base URL) with ``context`` from now on."""
    parts = urllib.parse.urlsplit(url)
    _TRUSTED[f"{parts.scheme}://{parts.netloc}"] = context


def tls_client_context(tls_dir: Path) -> ssl.SSLContext:
    """Trust the CA of ``tls_dir`` (`ringkv certs`), showing its client.crt when there is one."""
    context = ssl.create_default_context(cafile=str(tls_dir / "ca.crt"))
    if (tls_dir / "client.crt").exists():
        context.load_cert_chain(tls_dir / "client.crt", tls_dir / "client.key")
    return context


def http(
    method: str,
    url: str,
    body: Any = None,
    *,
    raw: bytes | None = None,
    timeout_s: float = 10.0,
    headers: dict[str, str] | None = None,
    context: ssl.SSLContext | None = None,
) -> tuple[int, Any]:
    """A tiny HTTP client (stdlib only): returns (status, parsed JSON or text).

    An https:// URL uses ``context``, else the one ``trust`` gave its node, else
    the system's defaults."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None and "Content-Type" not in (headers or {}):
        request.add_header("Content-Type", "application/json")
    if context is None and url.startswith("https:"):
        parts = urllib.parse.urlsplit(url)
        context = _TRUSTED.get(f"{parts.scheme}://{parts.netloc}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s, context=context) as response:
            return response.status, _parse(response.read())
    except urllib.error.HTTPError as error:
        return error.code, _parse(error.read())


def _parse(payload: bytes) -> Any:
    try:
        return json.loads(payload)
    except ValueError:
        return payload.decode(errors="replace")
