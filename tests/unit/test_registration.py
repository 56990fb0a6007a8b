"""What a vLLM user types reaches our connector: the short name and the class name, the
JSON and the dotted command-line forms, and the MultiConnector preset for GPU servers
(resolved by vLLM 0.32's own MultiConnector; LMCache's connector itself needs a GPU and the
lmcache package, so it is resolved here, not started)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("vllm")

from vllm.config import KVTransferConfig, VllmConfig  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.v1.multi_connector import MultiConnector  # noqa: E402
from vllm.engine.arg_utils import EngineArgs  # noqa: E402

from tests.rigs import REPO
from vllm_kvcdn.connector.connector import KVCDNConnector  # noqa: E402
from vllm_kvcdn.plugin import register  # noqa: E402

PRESETS = REPO / "connectors"


@pytest.fixture(scope="module", autouse=True)
def registered():
    register()
    register()  # runs in every vLLM process, maybe twice in one: never raises


def _parse(argv: list[str]) -> KVTransferConfig:
    try:
        from vllm.utils.argparse_utils import FlexibleArgumentParser
    except ImportError:  # older vLLM
        from vllm.utils import FlexibleArgumentParser

    args = EngineArgs.add_cli_args(FlexibleArgumentParser()).parse_args(["--model", "m", *argv])
    config = EngineArgs.from_cli_args(args).kv_transfer_config
    return config if isinstance(config, KVTransferConfig) else KVTransferConfig(**config)


@pytest.mark.parametrize("argv", [
    ["--kv-transfer-config", '{"kv_connector":"kvcdn","kv_role":"kv_both"}'],
    ["--kv-transfer-config", '{"kv_connector":"KVCDNConnector","kv_role":"kv_both"}'],
    ["--kv-transfer-config.kv_connector", "kvcdn", "--kv-transfer-config.kv_role", "kv_both"],
], ids=["json-short", "json-class", "dotted"])
def test_every_spelling_reaches_the_connector(argv):
    config = _parse(argv)
    assert config.kv_role == "kv_both"
    assert KVConnectorFactory.get_connector_class(config) is KVCDNConnector


def test_the_gpu_multiconnector_preset_resolves_in_vllms_multiconnector():
    preset = json.loads((PRESETS / "multi-lmcache-gpu.json").read_text())
    vllm_config = VllmConfig(kv_transfer_config=KVTransferConfig(**preset))
    resolved = MultiConnector._get_connector_classes_and_configs(vllm_config)
    # kvcdn first: MultiConnector hands a request to the first connector that matches it,
    # so a published document loads from kvcdn and LMCache offloads everything else.
    assert [cls.__name__ for cls, _ in resolved] == ["KVCDNConnector", "LMCacheConnectorV1"]
    assert MultiConnector.get_required_kvcache_layout(vllm_config) is None  # no layout conflict
    # The scheduler reads the failure policy from the top-level config only: our connector
    # cannot set it from inside a MultiConnector, so the preset must.
    assert vllm_config.kv_transfer_config.kv_load_failure_policy == "recompute"


def test_every_preset_names_a_registered_connector():
    for path in PRESETS.glob("*.json"):
        config = KVTransferConfig(**json.loads(path.read_text()))
        assert KVConnectorFactory.get_connector_class(config) is not None, path
