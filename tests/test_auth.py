"""The pure cores of authentication and authorization (ringkv/auth/).

Password hashes verify the right password only, carry their parameters
(so raised ones and old ones both verify) and salt; the permission matrix
gives each route what it needs and ``authorize`` names the first missing
permission; tokens verify until their expiry and not with another secret
or a changed byte, name the secret generation that signed them, and one
signed by a retired secret is refused saying so; the secret rotates keeping
the newest previous ones; the failed-login bucket refuses after ``burst``
failures and lets one more in per refill; the user document round-trips.
"""

from __future__ import annotations

import base64
import json

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
    assert tokens.verify({1: b"k" * 32}, token, now_us=1_999) == claims
    with pytest.raises(tokens.BadToken) as expired:
        tokens.verify({1: b"k" * 32}, token, now_us=2_000)
    assert expired.value.expired and expired.value.reason == "expired_token"
    with pytest.raises(tokens.BadToken) as forged:
        tokens.verify({1: b"j" * 32}, token, now_us=0)
    assert not forged.value.expired and forged.value.reason == "bad_token"
    head, payload, mac = token.split(".")
    with pytest.raises(tokens.BadToken):
        tokens.verify({1: b"k" * 32}, f"{head}.{payload[:-1]}A.{mac}", now_us=0)
    with pytest.raises(tokens.BadToken):
        tokens.verify({1: b"k" * 32}, "not a token", now_us=0)


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def test_tokens_name_their_secret_and_a_retired_one_is_refused_saying_so() -> None:
    claims = tokens.TokenClaims("alice", 1, expires_us=10**18)
    old, new = b"o" * 32, b"n" * 32
    first = tokens.issue(old, claims, 1)
    second = tokens.issue(new, claims, 2)
    both = {2: new, 1: old}
    assert tokens.verify(both, first, 0) == claims == tokens.verify(both, second, 0)
    with pytest.raises(tokens.BadToken) as retired:
        tokens.verify({2: new, 3: b"t" * 32}, first, 0)
    assert retired.value.reason == "retired_secret" and "generation 1" in str(retired.value)
    with pytest.raises(tokens.BadToken) as unknown:
        tokens.verify({1: old}, second, 0)
    assert unknown.value.reason == "unknown_secret"
    # Naming another listed generation does not help a token signed with a retired secret.
    _, payload, mac = first.split(".")
    claimed = json.loads(base64.urlsafe_b64decode(payload + "=="))
    relabelled = _b64url(json.dumps({**claimed, "k": 2}, separators=(",", ":")).encode())
    with pytest.raises(tokens.BadToken) as forged:
        tokens.verify({2: new}, f"rk1.{relabelled}.{mac}", 0)
    assert forged.value.reason == "bad_token"
    # A token from before rotation (no "k") is generation 1's.
    legacy_payload = _b64url(json.dumps({"u": "alice", "g": 1, "exp": 10**18},
                                        separators=(",", ":")).encode())
    legacy = f"rk1.{legacy_payload}.{tokens._mac(old, legacy_payload)}"  # noqa: SLF001
    assert tokens.verify({2: new, 1: old}, legacy, 0) == claims


def test_the_token_secret_rotates_keeping_the_newest_previous_ones() -> None:
    doc = AuthDoc(b"1" * 32).with_user("admin", "h1", ["admin"])
    assert doc.token_secrets() == {1: b"1" * 32}
    assert AuthDoc.decode(doc.encode()) == doc
    doc = doc.with_rotated_secret(b"2" * 32, keep=2).with_rotated_secret(b"3" * 32, keep=2)
    assert (doc.secret, doc.secret_generation) == (b"3" * 32, 3)
    assert doc.token_secrets() == {3: b"3" * 32, 2: b"2" * 32, 1: b"1" * 32}
    doc = doc.with_rotated_secret(b"4" * 32, keep=2)
    assert doc.token_secrets() == {4: b"4" * 32, 3: b"3" * 32, 2: b"2" * 32}  # 1 retired
    again = AuthDoc.decode(doc.encode())
    assert again == doc and again.user("admin").grants == frozenset({"admin"})
    assert doc.with_password("admin", "h2").token_secrets() == doc.token_secrets()
    assert doc.with_rotated_secret(b"5" * 32, keep=0).token_secrets() == {5: b"5" * 32}
    with pytest.raises(BadRequest):
        doc.with_rotated_secret(b"short", keep=2)


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
                       ({"login_burst": 0}, "auth.login_burst"), ({"nope": 1}, "auth.nope"),
                       ({"previous_secrets": -1}, "auth.previous_secrets"),
                       ({"previous_secrets": 17}, "auth.previous_secrets")):
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
