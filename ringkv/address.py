"""Network addresses as text: ``"host:port"``, IPv6 hosts in brackets (pure).

The one parser and the one formatter for every address ringkv reads or
writes: config (seeds, broadcast_internode), gossip (INTERNODE_ADDR,
CLIENT_ADDR from peers), the ring the client fetches, and the local tools.

    parse_address("db-2.local:7500") == ("db-2.local", 7500)
    parse_address("[::1]:7500")      == ("::1", 7500)
    format_address("::1", 7500)      == "[::1]:7500"

A bare IPv6 address with a port ("::1:7500") is refused: it cannot be told
apart from the address "::1:7500" with no port. Hosts are kept as written
(not resolved or canonicalised), so an address survives parse -> format.
Errors are ValueError naming the address and what is wrong with it; a peer
may send anything, so the text quoted in a message is cut short.
"""

from __future__ import annotations

import ipaddress
import re

MAX_HOST_LEN = 253  # the longest DNS name
MIN_PORT = 1
MAX_PORT = 65535

# Host names and IPv4 addresses: DNS labels, plus "_" which some internal
# names use. Anything else (spaces, "/", "@", brackets) is refused.
_NAME_RE = re.compile(r"[A-Za-z0-9._-]+")


def _show(text: str) -> str:
    return repr(text) if len(text) <= 80 else repr(text[:77]) + "..."


def check_host(host: object) -> str:
    """``host`` if it is a host name, an IPv4 address or an unbracketed IPv6 address."""
    if not isinstance(host, str):
        raise ValueError(f"host must be a string, got {type(host).__name__}")
    if not host:
        raise ValueError("host is empty")
    if len(host) > MAX_HOST_LEN:
        raise ValueError(f"host is {len(host)} characters; the limit is {MAX_HOST_LEN}")
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)  # also takes a zone: fe80::1%eth0
        except ValueError:
            raise ValueError(f"host {_show(host)} has ':' but is not an IPv6 address") from None
        return host
    if not _NAME_RE.fullmatch(host):
        raise ValueError(
            f"host {_show(host)} may hold only letters, digits, '.', '-' and '_'"
        )
    return host


def is_wildcard(host: str) -> bool:
    """True for a host that means "every local address" when bound (0.0.0.0, ::, empty).

    Such a host is fine to listen on but means nothing to another machine:
    dialled, it reaches the dialler itself.
    """
    if not host:
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_unspecified
    except ValueError:
        return False  # a host name


def check_port(port: object) -> int:
    # bool is an int subclass; True is not a port.
    if isinstance(port, bool) or not isinstance(port, int):
        raise ValueError(f"port must be an integer, got {type(port).__name__}")
    if not MIN_PORT <= port <= MAX_PORT:
        raise ValueError(f"port {port} is out of range {MIN_PORT}-{MAX_PORT}")
    return port


def parse_address(text: object) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6addr]:port"`` -> (host, port), brackets removed."""
    if not isinstance(text, str):
        raise ValueError(f"address must be a string, got {type(text).__name__}")
    try:
        if text.startswith("["):
            close = text.find("]")
            if close < 0:
                raise ValueError("'[' has no closing ']'")
            host, rest = text[1:close], text[close + 1 :]
            if not rest.startswith(":"):
                raise ValueError("expected ':port' after ']'")
            port_text = rest[1:]
            if not host:
                raise ValueError("host is empty")
            if ":" not in host:
                raise ValueError(f"brackets are for IPv6 addresses, not {_show(host)}")
        else:
            host, sep, port_text = text.rpartition(":")
            if not sep:
                raise ValueError("no ':port' (want host:port, or [v6addr]:port for IPv6)")
            if ":" in host:
                raise ValueError("a bare IPv6 address is ambiguous; write [v6addr]:port")
        check_host(host)
        if not port_text:
            raise ValueError("port is empty")
        # isdigit alone also takes other scripts' digits ("٧"); the length
        # bound keeps int() cheap on hostile input.
        if not (port_text.isascii() and port_text.isdigit()):
            raise ValueError(f"port {_show(port_text)} is not a decimal number")
        if len(port_text) > 5:
            raise ValueError(f"port {_show(port_text)} is out of range {MIN_PORT}-{MAX_PORT}")
        return host, check_port(int(port_text))
    except ValueError as exc:
        raise ValueError(f"address {_show(text)}: {exc}") from None


def format_address(host: str, port: int) -> str:
    """The ``"host:port"`` text of (host, port); an IPv6 host is bracketed."""
    check_host(host)
    check_port(port)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
