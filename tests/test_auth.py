"""The pure cores of authentication and authorization (ringkv/auth/).

Password hashes verify the right password only, carry their parameters
(so raised ones and old ones both verify) and salt; the permission matrix
gives each route what it needs and ``authorize`` names the first missing
permission; tokens verify until their expiry and not with another secret
or a changed byte; the failed-login bucket refuses after ``burst``
failures and lets one more in per refill; the user document round-trips.
"""

from __future__ import annotations

import pytest

from ringkv.auth import passwords, tokens
from ringkv.auth.permissions import (
    Need, Principal, authorize, may_manage, needs, parse_grant,
)
from ringkv.auth.ratelimit import FailedLogins
from ringkv.auth.users import AuthDoc
from ringkv.errors import BadRequest, Forbidden, NotFound

FAST = passwords.ScryptParams(n=2**10, r=8, p=1)


def test_hash_and_verify() -> None:
    encoded = passwords.hash_password("correct horse", b"s" * 16, FAST)
    assert encoded.startswith("scrypt$1024$8$1$")
    assert passwords.verify_password("correct horse", encoded)
    assert not passwords.verify_password("correct hors", encoded)
    assert not passwords.verify_password("correct horse", "garbage")
    # Same password, another salt: another hash. The default parameters still verify.
    assert passwords.hash_password("correct horse", b"t" * 16, FAST) != encoded
    strong = passwords.hash_password("correct horse", b"s" * 16)
    assert strong.startswith("scrypt$16384$8$1$") and passwords.verify_password("correct horse", strong)
    assert passwords.check_password("short") is not None
    assert passwords.check_password(12345678) is not None
    assert passwords.check_password("long enough") is None


def test_permission_matrix() -> None:
    reader = Principal("r", frozenset({"read:default"}))
    writer = Principal("w", frozenset({"read:default", "write:default"}))
    ks_admin = Principal("k", frozenset({"admin:default"}))
    root = Principal("root", frozenset({"admin"}))
    cases = [  # route, keyspace, query, body, needs
        ("get", "default", {}, b"", [Need("read", "default")]),
        ("put", "default", {}, b"", [Need("write", "default")]),
        ("txn_status", "", {"keyspace": "t"}, b"", [Need("read", "t")]),
        ("status", "", {}, b"", [Need("admin", None)]),
        ("removenode", "", {}, b"", [Need("admin", None)]),
        ("ring", "", {}, b"", []),
        ("openapi", "", {}, b"", []),
        ("dashboard_cluster", "", {}, b"", [Need("admin", None)]),
        ("ui_file", "", {}, b"", [Need("admin", None)]),
        ("health", "", {}, b"", []),
        ("batch", "", {}, b'{"ops":[{"op":"get","key":"a"},{"op":"put","keyspace":"o","key":"b"}]}',
         [Need("read", "default"), Need("write", "o")]),
        ("txn", "", {}, b'{"keyspace":"t","reads":["a"]}', [Need("read", "t")]),
        ("txn", "", {}, b'{"keyspace":"t","writes":[{}]}', [Need("read", "t"), Need("write", "t")]),
        ("txn_begin", "", {}, b'{"keyspace":"t"}', [Need("read", "t")]),
        ("no_such_route", "", {}, b"", [Need("admin", None)]),
    ]
    for route, keyspace, query, body, expected in cases:
        assert needs(route, keyspace, query, body) == expected, route
    authorize(reader, [Need("read", "default")])
    with pytest.raises(Forbidden) as refused:
        authorize(reader, [Need("read", "default"), Need("write", "default")])
    assert (refused.value.permission, refused.value.keyspace) == ("write", "default")
    with pytest.raises(Forbidden) as refused:
        authorize(writer, [Need("read", "other")])
    assert (refused.value.permission, refused.value.keyspace) == ("read", "other")
    authorize(ks_admin, [Need("read", "default"), Need("write", "default")])
    with pytest.raises(Forbidden):
        authorize(ks_admin, [Need("admin", None)])
    authorize(root, [Need("admin", None), Need("write", "anything")])
    with pytest.raises(Forbidden):  # nobody reaches the user store's raw records
        authorize(root, [Need("read", "system_auth")])
    # Who may manage whom.
    may_manage(reader, "r", None)  # its own password
    with pytest.raises(Forbidden):
        may_manage(reader, "w", None)
    may_manage(ks_admin, "r", "write:default")
    with pytest.raises(Forbidden) as refused:
        may_manage(ks_admin, "r", "write:other")
    assert refused.value.keyspace == "other"
    with pytest.raises(Forbidden):
        may_manage(ks_admin, "r", "admin")
    assert parse_grant("admin", None) == "admin"
    assert parse_grant("read", "default") == "read:default"
    for permission, keyspace in (("read", None), ("own", "x"), ("read", "system_auth"),
                                 ("read", "bad/name")):
        with pytest.raises(BadRequest):
            parse_grant(permission, keyspace)


def test_tokens_expire_and_are_bound_to_the_secret() -> None:
    claims = tokens.TokenClaims("alice", 3, expires_us=2_000)
    token = tokens.issue(b"k" * 32, claims)
    assert tokens.verify(b"k" * 32, token, now_us=1_999) == claims
    with pytest.raises(tokens.BadToken) as expired:
        tokens.verify(b"k" * 32, token, now_us=2_000)
    assert expired.value.expired
    with pytest.raises(tokens.BadToken) as forged:
        tokens.verify(b"j" * 32, token, now_us=0)
    assert not forged.value.expired
    head, payload, mac = token.split(".")
    with pytest.raises(tokens.BadToken):
        tokens.verify(b"k" * 32, f"{head}.{payload[:-1]}A.{mac}", now_us=0)
    with pytest.raises(tokens.BadToken):
        tokens.verify(b"k" * 32, "not a token", now_us=0)


def test_failed_logins_refill_per_address() -> None:
    limiter = FailedLogins(burst=3, refill_per_s=0.5, max_addresses=2)
    for _ in range(3):
        assert limiter.retry_after_s("a", 10.0) is None
        limiter.failed("a", 10.0)
    assert limiter.retry_after_s("a", 10.0) == pytest.approx(2.0)
    assert limiter.retry_after_s("b", 10.0) is None  # another address is not held back
    assert limiter.retry_after_s("a", 11.0) == pytest.approx(1.0)
    assert limiter.retry_after_s("a", 12.0) is None  # one token back
    limiter.failed("a", 12.0)
    assert limiter.retry_after_s("a", 12.0) is not None
    # Bounded: a flood of addresses keeps at most max_addresses.
    for i in range(10):
        limiter.failed(f"x{i}", 13.0)
    assert limiter.tracked() <= 2


def test_user_document() -> None:
    doc = AuthDoc(b"s" * 32).with_user("admin", "h1", ["admin"]).with_user("bob", "h2")
    again = AuthDoc.decode(doc.encode())
    assert again == doc
    doc = doc.with_password("bob", "h3").with_grants("bob", add=["read:default"])
    assert (doc.user("bob").generation, doc.user("bob").grants) == (2, frozenset({"read:default"}))
    assert doc.with_grants("bob", remove=["read:default"]).user("bob").grants == frozenset()
    with pytest.raises(BadRequest):
        doc.with_user("bob", "h")
    with pytest.raises(BadRequest):
        doc.with_user("no spaces", "h")
    with pytest.raises(NotFound):
        doc.without_user("bob").user("bob")
    assert [u["name"] for u in doc.listing()] == ["admin", "bob"]


def test_auth_config_is_validated_and_adds_the_user_store() -> None:
    from ringkv.config import AUTH_KEYSPACE, TRANSACTIONAL, config_from_dict, default_config
    from ringkv.errors import ConfigError

    assert not default_config().auth.enabled and AUTH_KEYSPACE not in default_config().keyspaces
    config = config_from_dict({"auth": {"enabled": True, "replication_factor": 2}})
    store = config.keyspaces[AUTH_KEYSPACE]
    assert (store.tier, store.replication_factor) == (TRANSACTIONAL, 2)
    assert config_from_dict(config.to_dict()) == config  # round-trips without a clash
    for bad, field in (({"enabled": "yes"}, "auth.enabled"), ({"token_ttl_s": 0}, "auth.token_ttl_s"),
                       ({"login_burst": 0}, "auth.login_burst"), ({"nope": 1}, "auth.nope")):
        with pytest.raises(ConfigError) as info:
            config_from_dict({"auth": bad})
        assert info.value.field == field, info.value
    with pytest.raises(ConfigError) as info:
        config_from_dict({"keyspaces": {AUTH_KEYSPACE: {"replication_factor": 1}}})
    assert info.value.field == f"keyspaces.{AUTH_KEYSPACE}"


def test_the_native_hello_carries_credentials() -> None:
    from ringkv.errors import ProtocolError
    from ringkv.net import native as core
    from ringkv.net.codec import KIND_REQUEST, Frame

    def hello(**fields: object) -> core.Hello:
        return core.hello(Frame(1, KIND_REQUEST, 0, "hello", {"versions": [1], **fields}))

    assert hello().user is None and hello().token is None
    chosen = hello(user="app", password="pw-123456")
    assert (chosen.user, chosen.password, chosen.token) == ("app", "pw-123456", None)
    assert hello(token="rk1.x.y").token == "rk1.x.y"
    answer = core.hello_answer(chosen, node_id="n1", max_frame_bytes=1, max_in_flight=1,
                               user="app")
    assert answer["user"] == "app"
    for fields, field in (({"user": "app"}, "password"), ({"password": "x"}, "password"),
                          ({"user": "a", "password": "b", "token": "t"}, "token"),
                          ({"token": 5}, "token"), ({"user": "u" * 5000, "password": "p"}, "user")):
        with pytest.raises(ProtocolError) as refused:
            hello(**fields)
        assert refused.value.details["field"] == field, fields
