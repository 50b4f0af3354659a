"""What both clients share: the constructor, the operations core it wires up, and the ring views.

A shell module: it hands the pure core (``operations.py``) the real clock,
a thread lock and random UUIDs for idempotency keys.
"""

from __future__ import annotations

import base64
import random
import ssl
import threading
import uuid
from collections.abc import Sequence

from ringkv.client.native import NativeRequest, base_url, to_native
from ringkv.client.operations import TXN_RETRIES, Operations
from ringkv.client.plan import Send
from ringkv.client.routing import DOWN_COOLDOWN_S
from ringkv.client.types import Key, NodeView
from ringkv.clock import SystemClock
from ringkv.quorum import ConsistencyLevel

# Idle pooled connections are closed after this long: well below the
# server's keep-alive timeout, so a pooled connection is rarely stale.
KEEPALIVE_S = 15.0
PROTOCOLS = ("native", "http")
# Native connections per node: each carries many requests at once, so a few are enough.
NATIVE_CONNECTIONS_PER_NODE = 2


def new_idempotency_key() -> str:
    """A key no other write has, from any client (so not from a seedable generator)."""
    return str(uuid.uuid4())


def tls_context(ca_file: str | None, cert_file: str | None, key_file: str | None, *,
                force: bool = False) -> ssl.SSLContext | None:
    """A client SSL context verifying node certificates against ``ca_file`` (None: the
    system's CAs) and showing ``cert_file``; None when nothing asks for TLS."""
    if not force and ca_file is None and cert_file is None:
        return None
    context = ssl.create_default_context(cafile=ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert_file is not None:
        context.load_cert_chain(cert_file, key_file)
    return context


class ClientBase:
    """Configuration, the operations core, and the ring as last fetched."""

    def __init__(
        self,
        seeds: Sequence[str] | str,
        *,
        keyspace: str = "default",
        consistency: str | ConsistencyLevel | None = None,
        timeout_s: float = 5.0,
        max_retries: int = 3,
        refresh_interval_s: float = 30.0,
        idempotent_writes: bool = True,
        pool_size: int = 32,
        backoff_base_s: float = 0.05,
        backoff_max_s: float = 1.0,
        txn_retries: int = TXN_RETRIES,
        leader_hints: bool = True,
        rng: random.Random | None = None,
        protocol: str = "native",
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        user: str | None = None,
        password: str | None = None,
        token: str | None = None,
    ) -> None:
        """Connect lazily to a cluster through ``seeds`` (one or more node URLs).

        ``keyspace`` and ``consistency`` are the defaults for every call
        (``consistency=None``: each keyspace's own default level).
        ``timeout_s`` bounds every attempt; ``max_retries`` bounds the
        retries of one call, which wait ``backoff_base_s * 2**n`` (at most
        ``backoff_max_s``, with jitter) in between. ``refresh_interval_s``:
        how often the ring is fetched again. ``idempotent_writes``: give every
        write an idempotency key, which makes it safe to retry.
        ``pool_size``: the most keep-alive connections kept per node.
        ``txn_retries``: how many times a transaction aborted by a conflict
        is sent again, under the same id. ``leader_hints``: send transactions
        to the range's leader last named by a receipt (else to any replica,
        which forwards them).
        ``rng``: the randomness behind load spreading and jitter.
        ``protocol``: ``"native"`` (the default) sends each request over the
        native binary protocol to nodes whose native address the ring names
        (the first ring fetch, and nodes without one, use HTTP), leases and
        watches too (a watch on a native connection of its own); ``"http"``
        sends everything over HTTP.
        ``ca_file``: the CA bundle (PEM) node certificates must chain to, for
        ``https://`` seeds (the nodes' ``tls.client``); the native protocol then
        runs over TLS too. None: the system's trusted CAs. ``cert_file`` and
        ``key_file``: this client's certificate and key, for nodes that require
        one (``tls.client.ca_file``). A node's certificate must name the host
        the client reaches it at (``ringkv certs issue --host``).
        ``user`` and ``password``, or ``token`` (from ``POST /v1/auth/token``):
        the credentials of a cluster with ``auth.enabled``, sent as HTTP Basic or
        Bearer on every HTTP request and in each native connection's hello.
        """
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
        self.protocol = protocol
        self._clock = SystemClock()
        self._ops = Operations(
            seeds,
            clock=self._clock,
            rng=rng or random.Random(),
            refresh_lock=threading.Lock(),
            new_idempotency_key=new_idempotency_key,
            keyspace=keyspace,
            consistency=consistency,
            timeout_s=timeout_s,
            max_retries=max_retries,
            refresh_interval_s=refresh_interval_s,
            idempotent_writes=idempotent_writes,
            backoff_base_s=backoff_base_s,
            backoff_max_s=backoff_max_s,
            txn_retries=txn_retries,
            leader_hints=leader_hints,
        )
        if (cert_file is None) != (key_file is None):
            raise ValueError("cert_file and key_file go together")
        self.ssl_context = tls_context(ca_file, cert_file, key_file)
        if (user is None) != (password is None):
            raise ValueError("user and password go together")
        if token is not None and user is not None:
            raise ValueError("give user and password, or a token, not both")
        self.credentials: dict[str, str] = (
            {"token": token} if token is not None
            else {"user": user, "password": password} if user is not None and password is not None
            else {})
        if token is not None:
            self._ops.headers["Authorization"] = f"Bearer {token}"
        elif user is not None and password is not None:
            self._ops.headers["Authorization"] = "Basic " + base64.b64encode(
                f"{user}:{password}".encode()).decode()
        self._pool_size = pool_size
        self._native_down: dict[tuple[str, int], float] = {}
        self._setup()

    def _setup(self) -> None:
        """Per-client I/O state (a connection pool); set up by each subclass."""

    def _tls_for(self, url: str) -> ssl.SSLContext | None:
        """The SSL context for a node URL: None for http://, ours (or the system
        default, made on first need) for https://."""
        if not url.startswith("https:"):
            return None
        if self.ssl_context is None:
            self.ssl_context = tls_context(None, None, None, force=True)
        return self.ssl_context

    def _native_route(
        self, effect: Send
    ) -> tuple[tuple[str, int], NativeRequest, ssl.SSLContext | None] | None:
        """Where and what to send over the native protocol (TLS with the context given:
        a node serving HTTPS serves TLS on its native port too), or None: over HTTP."""
        address = self._native_address(effect.url)
        if address is None:
            return None
        request = to_native(effect)
        return None if request is None else (address, request, self._tls_for(effect.url))

    def _native_address(self, url: str) -> tuple[str, int] | None:
        """The native address of the node at ``url`` when requests to it go native
        (the client's protocol, the ring names one, and it did not refuse us lately)."""
        if self.protocol != "native":
            return None
        native = self._ops.router.topology.native
        if not native:
            return None
        address = native.get(base_url(url))
        if address is None:
            return None
        if self._native_down and self._native_down.get(address, 0.0) > self._clock.monotonic_s():
            return None
        return address

    def _native_unreachable(self, address: tuple[str, int]) -> None:
        """The node's native port refused us (the request never went out): use HTTP to
        it for a while (a firewall may let only the HTTP port through)."""
        self._native_down[address] = self._clock.monotonic_s() + DOWN_COOLDOWN_S

    @property
    def keyspace(self) -> str:
        """The keyspace of calls that name none."""
        return self._ops.keyspace

    @property
    def consistency(self) -> str | None:
        """The consistency level of calls that name none (None: the keyspace's default)."""
        return self._ops.consistency

    def _ring_nodes(self) -> list[NodeView]:
        return self._ops.router.nodes()

    def _ring_replicas(self, key: Key, keyspace: str | None) -> list[str]:
        return self._ops.router.replicas(key, keyspace or self.keyspace)
