"""Connector settings: parsing, checks, and error messages that name the fix."""

from pathlib import Path

import pytest

from tests.rigs import REPO
from vllm_kvcdn.cli.serve import build_command, plugin_allowlist
from vllm_kvcdn.config import KVCDNConfig


def test_defaults_and_env_store(monkeypatch, tmp_path):
    monkeypatch.setenv("KVCDN_STORE", f"file://{tmp_path}")
    cfg = KVCDNConfig.from_extra_config({})
    assert cfg.chunk_size == 256 and cfg.store_url == f"file://{tmp_path}" and cfg.verify_checksums
    assert KVCDNConfig.from_extra_config({"store_url": "file:///x"}).store_url == "file:///x"


def test_unknown_key_names_the_known_ones():
    with pytest.raises(ValueError, match="known keys"):
        KVCDNConfig.from_extra_config({"chunk_sise": 256})


def test_chunk_size_must_be_a_multiple_of_the_block_size():
    KVCDNConfig(chunk_size=256).check_block_size(128)
    with pytest.raises(ValueError, match="multiple of the engine's KV block size 128"):
        KVCDNConfig(chunk_size=200).check_block_size(128)
    with pytest.raises(ValueError):
        KVCDNConfig(chunk_size=0)


@pytest.mark.parametrize("bad", [{"io_threads": 0}, {"load_timeout_s": 0}, {"ram_tier_gib": -1},
                                 {"publish_isolation_s": -1}, {"publish_key": 5}])
def test_bad_values_are_refused_with_the_key_named(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        KVCDNConfig.from_extra_config(bad)


def test_cpu_env_defaults_are_defined_once(monkeypatch):
    """`python -m vllm_kvcdn.defaults cpu-env` (ci/test.sh, examples) prints CPU_ENGINE_ENV;
    a value already in the environment wins."""
    import subprocess
    import sys

    from vllm_kvcdn.defaults import CPU_ENGINE_ENV

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "7")
    monkeypatch.delenv("VLLM_CPU_NUM_OF_RESERVED_CPU", raising=False)
    script = f'eval "$({sys.executable} -m vllm_kvcdn.defaults cpu-env)"; env'
    env = dict(line.split("=", 1) for line in subprocess.check_output(["bash", "-c", script], text=True).splitlines()
               if "=" in line)
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "7"
    assert env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == CPU_ENGINE_ENV["VLLM_CPU_NUM_OF_RESERVED_CPU"]


def test_serve_adds_only_what_is_missing():
    argv, env, key = build_command("m", ["--port", "9"], store_url="file:///s", environ={})
    assert argv[-3] == "--kv-transfer-config" and '"store_url": "file:///s"' in argv[-2]
    assert argv[-1] == "--enable-prompt-tokens-details" and key and env["KVCDN_PUBLISHER_KEY"] == key
    assert env["VLLM_PLUGINS"] == "kvcdn,kvcdn-api"
    mine = ["--kv-transfer-config", "{}", "--enable-prompt-tokens-details"]
    argv, env, key = build_command("m", mine, environ={"KVCDN_PUBLISHER_KEY": "k", "VLLM_PLUGINS": "other"})
    assert argv[-3:] == mine and key is None and env["VLLM_PLUGINS"] == "other,kvcdn,kvcdn-api"
    assert plugin_allowlist("kvcdn") == "kvcdn,kvcdn-api"


def test_presets_parse():
    import json

    presets = REPO / "connectors"
    for path in presets.glob("*.json"):
        config = json.loads(path.read_text())
        kvcdn = [config] if config["kv_connector"] == "KVCDNConnector" else [
            c for c in config["kv_connector_extra_config"]["connectors"] if c["kv_connector"] == "KVCDNConnector"]
        assert kvcdn, path
        for c in kvcdn:
            KVCDNConfig.from_extra_config(c["kv_connector_extra_config"]).check_block_size(16)


def test_every_setting_and_environment_variable_is_documented_once_in_the_readme():
    """The README's table is printed from the settings themselves; a setting without a doc,
    or a table left behind, fails here."""
    from dataclasses import fields

    from vllm_kvcdn.config import KVCDNConfig, settings_markdown

    assert all(f.metadata.get("doc") for f in fields(KVCDNConfig))
    readme = (REPO / "README.md").read_text()
    begin, end = readme.index("<!-- settings:begin -->"), readme.index("<!-- settings:end -->")
    assert readme[begin:end].split("\n", 1)[1].strip() == settings_markdown()
    assert "Keys of `kv_connector_extra_config`" not in (REPO / "connectors" / "README.md").read_text()


def test_every_environment_variable_read_is_in_the_table():
    import re

    import vllm_kvcdn
    from vllm_kvcdn.defaults import ENVIRONMENT

    package = Path(vllm_kvcdn.__file__).parent
    named = {m for p in package.rglob("*.py") for m in re.findall(r'"(KVCDN_[A-Z_]+)"', p.read_text())}
    assert named == set(ENVIRONMENT)
