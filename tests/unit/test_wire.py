"""kv_transfer_params come from any client: parsing never raises, and only the publisher
key opens publish and verify (the engine-level proof is in test_server.py)."""

from __future__ import annotations

import pytest

from vllm_kvcdn.config import KVCDNConfig
from vllm_kvcdn.connector.wire import MAX_METADATA_BYTES, parse_params

KEY = "s3cret"
DOC = "ab" * 32


@pytest.mark.parametrize("raw", [None, {}, {"other": 1}, {"kvcdn": {}}, {"kvcdn": {"hit": True, "loaded_tokens": 3}},
                                 {"kvcdn": {"publish": False}}])
def test_ordinary_requests_ask_nothing(raw):
    parsed = parse_params(raw, KEY)
    assert parsed.ask is None and parsed.rejected is None


@pytest.mark.parametrize(
    "raw",
    [
        "not a dict", [1, 2], {"kvcdn": "publish"}, {"kvcdn": [True]},
        {"kvcdn": {"publish": "yes", "key": KEY}},
        {"kvcdn": {"publish": 1, "key": KEY}},
        {"kvcdn": {"verify": "../../../../etc/passwd", "key": KEY}},
        {"kvcdn": {"verify": DOC.upper(), "key": KEY}},
        {"kvcdn": {"verify": 12, "key": KEY}},
        {"kvcdn": {"verify": DOC + "\n", "key": KEY}},
        {"kvcdn": {"publish": True, "verify": DOC, "key": KEY}},
        {"kvcdn": {"publish": True, "key": KEY, "title": 5}},
        {"kvcdn": {"publish": True, "key": KEY, "title": "t" * 513}},
        {"kvcdn": {"publish": True, "key": KEY, "metadata": [1]}},
        {"kvcdn": {"publish": True, "key": KEY, "metadata": {"x": float("nan")}}},
        {"kvcdn": {"publish": True, "key": KEY, "metadata": {"x": "y" * MAX_METADATA_BYTES}}},
    ],
)
def test_malformed_params_are_rejected_not_raised(raw):
    parsed = parse_params(raw, KEY)
    assert parsed.ask is None and parsed.reason == "malformed" and parsed.rejected


@pytest.mark.parametrize("params", [{"publish": True}, {"publish": True, "key": "wrong"}, {"publish": True, "key": 7},
                                    {"verify": DOC}, {"verify": DOC, "key": KEY[:-1]}])
def test_publish_and_verify_need_the_key(params):
    parsed = parse_params({"kvcdn": params}, KEY)
    assert parsed.ask is None and parsed.reason == "unauthorized" and "key" in parsed.rejected


def test_without_a_configured_key_no_one_may_publish():
    parsed = parse_params({"kvcdn": {"publish": True, "key": ""}}, "")
    assert parsed.ask is None and parsed.reason == "unauthorized" and "publish_key" in parsed.rejected


def test_authorized_requests_are_parsed():
    pub = parse_params({"kvcdn": {"publish": True, "key": KEY, "title": "t", "metadata": {"a": [1]}}}, KEY).ask
    assert pub.verify is None and pub.title == "t" and pub.metadata == {"a": [1]}
    assert parse_params({"kvcdn": {"verify": DOC, "key": KEY}}, KEY).ask.verify == DOC


def test_publish_key_comes_from_extra_config_or_the_environment(monkeypatch):
    monkeypatch.delenv("KVCDN_PUBLISHER_KEY", raising=False)
    assert KVCDNConfig.from_extra_config({}).publish_key == ""  # off by default
    monkeypatch.setenv("KVCDN_PUBLISHER_KEY", "from-env")
    assert KVCDNConfig.from_extra_config({}).publish_key == "from-env"
    config = KVCDNConfig.from_extra_config({"publish_key": "explicit"})
    assert config.publish_key == "explicit" and "explicit" not in repr(config)
