"""ringkv.address: the one "host:port" parser and formatter."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ringkv.address import check_host, format_address, is_wildcard, parse_address

GOOD = [
    # (text, host, port)
    ("127.0.0.1:7500", "127.0.0.1", 7500),
    ("db-2.local:7502", "db-2.local", 7502),
    ("localhost:1", "localhost", 1),
    ("node_1:65535", "node_1", 65535),
    ("0.0.0.0:7400", "0.0.0.0", 7400),
    ("[::1]:7500", "::1", 7500),
    ("[::]:7400", "::", 7400),
    ("[2001:db8::17]:9042", "2001:db8::17", 9042),
    ("[fe80::1%eth0]:7000", "fe80::1%eth0", 7000),
    ("[::ffff:10.0.0.1]:7000", "::ffff:10.0.0.1", 7000),
    ("h:07500", "h", 7500),  # leading zeros are still a decimal number
]


@pytest.mark.parametrize(("text", "host", "port"), GOOD)
def test_parse_address(text, host, port):
    assert parse_address(text) == (host, port)


@pytest.mark.parametrize(("text", "host", "port"), [row for row in GOOD if row[0] != "h:07500"])
def test_format_address_is_the_inverse(text, host, port):
    assert format_address(host, port) == text


BAD = [
    # (text, what the message must say)
    ("[::1", "no closing ']'"),
    ("[::1]", "expected ':port' after ']'"),
    ("[::1]7500", "expected ':port' after ']'"),
    ("::1:7500", "bare IPv6 address is ambiguous"),
    ("fe80::1", "bare IPv6 address is ambiguous"),
    ("127.0.0.1", "no ':port'"),
    ("", "no ':port'"),
    (":7500", "host is empty"),
    ("[]:7500", "host is empty"),
    ("[db-2.local]:7500", "brackets are for IPv6"),
    ("[1.2.3.4]:7500", "brackets are for IPv6"),
    ("[::g]:7500", "is not an IPv6 address"),
    ("h:", "port is empty"),
    ("h:0", "port 0 is out of range 1-65535"),
    ("h:65536", "port 65536 is out of range"),
    ("h:9999999999999", "out of range"),
    ("h:75x0", "is not a decimal number"),
    ("h:-1", "is not a decimal number"),
    ("h: 7500", "is not a decimal number"),
    ("h:٧٥٠٠", "is not a decimal number"),  # Arabic-Indic digits: isdigit() but not a port
    ("bad host:7500", "may hold only letters"),
    ("a/b:7500", "may hold only letters"),
    ("user@h:7500", "may hold only letters"),
    ("h\n:7500", "may hold only letters"),
    ("x" * 254 + ":7500", "the limit is 253"),
]


@pytest.mark.parametrize(("text", "problem"), BAD)
def test_parse_address_rejects_malformed(text, problem):
    with pytest.raises(ValueError) as raised:
        parse_address(text)
    message = str(raised.value)
    assert problem in message
    assert message.startswith("address "), "the message must name the address"


def test_parse_address_rejects_non_strings():
    with pytest.raises(ValueError, match="address must be a string, got int"):
        parse_address(7500)


def test_quoted_text_in_errors_is_cut_short():
    with pytest.raises(ValueError) as raised:
        parse_address("[" + "a" * 10_000)
    assert len(str(raised.value)) < 200


@pytest.mark.parametrize(
    ("host", "port", "problem"),
    [
        ("", 7500, "host is empty"),
        ("[::1]", 7500, "not an IPv6 address"),
        ("bad host", 7500, "may hold only letters"),
        ("h", 0, "out of range"),
        ("h", 65536, "out of range"),
        ("h", "7500", "port must be an integer, got str"),
        ("h", True, "port must be an integer, got bool"),
    ],
)
def test_format_address_rejects_bad_parts(host, port, problem):
    with pytest.raises(ValueError, match=problem.replace("[", r"\[")):
        format_address(host, port)


def test_check_host_takes_unbracketed_ipv6_and_names():
    assert check_host("::1") == "::1"
    assert check_host("db-2.local") == "db-2.local"
    with pytest.raises(ValueError, match="host must be a string"):
        check_host(None)


hosts = st.one_of(
    st.from_regex(r"[A-Za-z0-9._-]{1,30}", fullmatch=True),
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
)


@given(hosts, st.integers(1, 65535))
def test_format_then_parse_round_trips(host, port):
    assert parse_address(format_address(host, port)) == (host, port)


@pytest.mark.parametrize("host, wildcard", [
    ("0.0.0.0", True), ("::", True), ("0:0::0", True), ("", True),
    ("127.0.0.1", False), ("::1", False), ("10.0.0.1", False), ("db-1.example", False),
])
def test_is_wildcard_knows_the_unspecified_addresses(host, wildcard):
    assert is_wildcard(host) is wildcard
