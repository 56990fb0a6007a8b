"""Shared fixtures: the generated tiny model (and a one-weight variant), documents, a
runner that executes real vLLM engines in fresh processes, and a real S3 server."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

# Tests live in folders by kind (``-m KIND`` selects one); engine and server tests start
# real vLLM engines (``-m "not engine"`` leaves them out).
KINDS = {
    "unit": "pure Python and vLLM's own objects, no engine",
    "store": "real files and the real S3 protocol (moto), no engine",
    "worker": "the worker half on plain tensors: loads, tiers, layouts",
    "hf": "the transformers path and the catalog it writes",
    "engine": "real vLLM engines in fresh processes",
    "server": "real OpenAI-compatible servers over HTTP",
}
STARTS_ENGINES = {"engine", "server"}


def pytest_configure(config):
    for kind, what in KINDS.items():
        config.addinivalue_line("markers", f"{kind}: {what}")


def pytest_collection_modifyitems(config, items):
    for item in items:
        kind = Path(str(item.fspath)).parent.name
        if kind not in KINDS:
            raise pytest.UsageError(f"{item.nodeid}: every test file goes in a folder of its kind: {sorted(KINDS)}")
        item.add_marker(getattr(pytest.mark, kind))
        if kind in STARTS_ENGINES:
            item.add_marker(pytest.mark.engine)


@pytest.fixture(scope="session", autouse=True)
def ledger_outside_home(tmp_path_factory):
    """Engines started by the tests (and their subprocesses) meter reads into a ledger of
    the session's own, never ~/.cache/kvcdn; tests that count rows give theirs a file."""
    from vllm_kvcdn.defaults import LEDGER_ENV

    saved = os.environ.get(LEDGER_ENV)
    os.environ[LEDGER_ENV] = str(tmp_path_factory.mktemp("ledger") / "ledger.sqlite3")
    yield
    if saved is None:
        os.environ.pop(LEDGER_ENV, None)
    else:
        os.environ[LEDGER_ENV] = saved


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from vllm_kvcdn.testing.tiny_model import make_model

    return make_model(tmp_path_factory.mktemp("models") / "tiny", "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_variant(tiny_model, tmp_path_factory) -> Path:
    """The tiny model with one weight element changed: a different fingerprint."""
    import torch
    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("models") / "tiny-variant"
    shutil.copytree(tiny_model, out)
    weights = load_file(str(out / "model.safetensors"))
    name = "model.layers.3.mlp.down_proj.weight"
    weights[name] = weights[name].clone()
    weights[name][0, 0] += torch.tensor(0.5, dtype=weights[name].dtype)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.fixture(scope="session")
def hybrid_model(tmp_path_factory) -> Path:
    """A tiny Gemma 3 text model: sliding-window and full-attention layers."""
    from vllm_kvcdn.testing.tiny_model import make_hybrid_model

    return make_hybrid_model(tmp_path_factory.mktemp("models") / "hybrid")


@pytest.fixture(scope="session")
def adapters(tmp_path_factory) -> dict[str, Path]:
    """LoRA adapters of the tiny model: ``a`` and ``b`` (other weights), and ``a-copy``
    (a's files at another path: the same adapter under another name)."""
    from vllm_kvcdn.testing.tiny_model import make_lora_adapter

    root = tmp_path_factory.mktemp("adapters")
    out = {"a": make_lora_adapter(root / "a", seed=1), "b": make_lora_adapter(root / "b", seed=2)}
    out["a-copy"] = Path(shutil.copytree(out["a"], root / "a-copy"))
    return out


@pytest.fixture(scope="session")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model))


@pytest.fixture(scope="session")
def texts() -> dict[str, list[str]]:
    from vllm_kvcdn.testing.tiny_model import corpus

    lines = corpus()
    return {"doc_d": lines[:150], "doc_e": lines[1000:1150], "other": lines[2000:2010]}


# The tiny model computes a prefill in milliseconds: a store slower than that (moto's S3, a
# slowed store) loses to it, and the default load_policy ("measured") rightly recomputes
# instead of loading once it has measured both. Tests about loads pin "always";
# tests/engine/test_load_or_recompute.py and the planner's own tests run "measured".
ALWAYS_LOAD = {"load_policy": "always"}


class EngineRunner:
    """Runs a ``vllm_kvcdn.testing.engine_job`` spec on a fresh engine process; returns its
    results. Connector settings default to ``ALWAYS_LOAD``."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.count = 0

    def __call__(self, spec: dict, timeout: float = 900) -> dict:
        from vllm_kvcdn.testing.engine_job import run_in_subprocess

        self.count += 1
        spec = {**spec, "extra_config": {**ALWAYS_LOAD, **(spec.get("extra_config") or {})}}
        return run_in_subprocess(spec, self.workdir, f"engine-{self.count}", timeout=timeout)


@pytest.fixture(scope="session")
def run_engine(tmp_path_factory) -> EngineRunner:
    return EngineRunner(tmp_path_factory.mktemp("engines"))


@pytest.fixture(scope="session")
def signing_key(tmp_path_factory) -> str:
    """A publisher's Ed25519 key file, made by ``kvcdn keygen`` (its public key beside it,
    ``.pub``): a shared bucket serves signed documents only, so every test that publishes
    to S3 signs with it."""
    from vllm_kvcdn.cli.main import main as kvcdn

    path = tmp_path_factory.mktemp("keys") / "publisher.pem"
    kvcdn(["keygen", str(path)])
    return str(path)


@pytest.fixture(scope="session")
def s3():
    """moto's S3 server on loopback (tests/rigs/s3.py), with credentials in the environment
    for this process and the servers it starts."""
    from tests.rigs.s3 import S3_ENV, MotoS3

    saved = {name: os.environ.get(name) for name in S3_ENV}
    os.environ.update(S3_ENV)
    server = MotoS3()
    yield server
    server.stop()
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture
def s3_proxy(s3):
    """A fault-injecting HTTP proxy in front of the S3 server."""
    from tests.rigs.s3 import FaultProxy

    proxy = FaultProxy(s3.endpoint)
    yield proxy
    proxy.stop()
