"""The tls section of the config: files checked at load time, each error naming its field."""

from __future__ import annotations

import datetime

import pytest

from ringkv.config import config_from_dict, load_config
from ringkv.errors import ConfigError
from ringkv.tools.certs import init_ca, issue

NOW = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)


@pytest.fixture
def pki(tmp_path):
    init_ca(tmp_path, NOW)
    issue(tmp_path, "node1", NOW, hosts=("127.0.0.1",))
    issue(tmp_path, "node2", NOW, hosts=("127.0.0.1",))
    return tmp_path


def files(d, name="node1", ca=True):
    out = {"cert_file": str(d / f"{name}.crt"), "key_file": str(d / f"{name}.key")}
    if ca:
        out["ca_file"] = str(d / "ca.crt")
    return out


def error_of(data):
    with pytest.raises(ConfigError) as info:
        config_from_dict(data, "x.yaml")
    return info.value


def test_defaults_are_plain_tcp_and_a_full_config_loads(pki):
    assert not config_from_dict({}).tls.client.enabled
    config = config_from_dict({"tls": {"client": files(pki, ca=False), "internode": files(pki)}})
    assert config.tls.client.enabled and config.tls.client.ca_file is None
    assert config.tls.internode.ca_file == pki / "ca.crt"
    # to_dict round-trips
    assert config_from_dict(config.to_dict()) == config


def test_missing_file_names_the_field(pki):
    bad = files(pki)
    bad["cert_file"] = str(pki / "nope.crt")
    error = error_of({"tls": {"internode": bad}})
    assert error.field == "tls.internode.cert_file"
    assert "nope.crt" in str(error) and "No such file" in str(error)


def test_a_long_missing_path_keeps_its_file_name_in_the_message(pki, tmp_path):
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    bad = files(pki)
    bad["cert_file"] = str(deep / "nope.crt")
    message = str(error_of({"tls": {"internode": bad}}))
    assert "nope.crt" in message and "..." in message, message  # cut in the middle


def test_unreadable_file_names_the_field(pki, tmp_path):
    bad = files(pki)
    bad["ca_file"] = str(tmp_path)  # a directory cannot be read as a file
    assert error_of({"tls": {"internode": bad}}).field == "tls.internode.ca_file"


def test_not_pem_names_the_field(pki):
    bad = files(pki)
    bad["key_file"] = bad["cert_file"]
    error = error_of({"tls": {"client": bad}})
    assert error.field == "tls.client.key_file" and "PRIVATE KEY" in str(error)


def test_mismatched_key_names_the_key_field(pki):
    bad = files(pki)
    bad["key_file"] = str(pki / "node2.key")
    error = error_of({"tls": {"client": bad}})
    assert error.field == "tls.client.key_file"
    assert "does not match" in str(error)


def test_internode_needs_all_three(pki):
    error = error_of({"tls": {"internode": files(pki, ca=False)}})
    assert error.field == "tls.internode.ca_file"
    error = error_of({"tls": {"client": {"ca_file": str(pki / "ca.crt")}}})
    assert error.field == "tls.client.cert_file"


def test_unknown_keys_and_overrides(pki):
    assert error_of({"tls": {"clients": {}}}).field == "tls.clients"
    assert error_of({"tls": {"client": {"cert": "x"}}}).field == "tls.client.cert"
    config = load_config(None, {f"tls.client.{k}": v for k, v in files(pki).items()})
    assert config.tls.client.ca_file == pki / "ca.crt"
    with pytest.raises(ConfigError) as info:
        load_config(None, {"tls.client.cert": "x"})
    assert info.value.field == "tls.client.cert"
    with pytest.raises(ConfigError) as info:
        load_config(None, {"tls.client.key_file": str(pki / "nope.key"),
                           "tls.client.cert_file": str(pki / "node1.crt")})
    assert info.value.field == "tls.client.key_file" and "<overrides>" in str(info.value)
