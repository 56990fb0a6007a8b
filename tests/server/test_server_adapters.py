"""Per-adapter documents over HTTP: `kvcdn serve --enable-lora --lora-modules a=PATH`, a
document published through the side API with ``"adapter": "a"`` and OpenAI requests for
model ``a`` (hits), for the base model (no hit), for adapter ``b`` (no hit). The answers'
exactness with adapters is proven offline (test_vllm_features.py); here, the plumbing:
the side API, the `kvcdn publish --adapter` CLI, verify with the adapter, and clear errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.rigs.servers import ask, kvcdn_server
from vllm_kvcdn.api.client import APIError, SideAPIClient
from vllm_kvcdn.connector.request_profile import AdapterDigests

KEY = "adapter-test-key"


@pytest.fixture(scope="module")
def server(tiny_model, adapters, tmp_path_factory):
    base = tmp_path_factory.mktemp("adapter-server")
    modules = [f"{name}={path}" for name, path in adapters.items() if name in ("a", "b")]
    server = kvcdn_server(tiny_model, base / "store", KEY, base / "server.log",
                          vllm_args=("--enable-lora", "--max-lora-rank", "8", "--lora-modules", *modules)).start()
    yield server
    server.stop()


def test_a_document_published_through_an_adapter_hits_that_adapter_only(server, tiny_model, adapters, texts):
    api = SideAPIClient(server.url, key=KEY)
    messages = [{"role": "user", "content": " ".join(texts["doc_e"][:50])}]
    doc = api.publish(messages=messages, adapter="a", title="for adapter a")
    listed = api.get(doc["id"])
    assert listed["adapter"] == AdapterDigests().digest(str(adapters["a"])) and doc["created"] is True
    conversation = messages + [{"role": "user", "content": "What is it about?"}]
    hit = ask(server.url, "a", conversation)
    assert hit["kvcdn"]["hit"] is True and hit["kvcdn"]["document"] == doc["id"]
    assert hit["cached"] == doc["num_tokens"]
    for model in (str(tiny_model), "b"):
        other = ask(server.url, model, conversation)
        assert other["kvcdn"]["hit"] is False and other["cached"] == 0, model
    assert api.verify(doc["id"])["identical"] is True  # recomputed with adapter a
    base = api.publish(messages=messages, title="base")  # the same text for the base model: another document
    assert base["id"] != doc["id"] and api.get(base["id"])["adapter"] is None


def test_an_adapter_the_server_does_not_serve_is_a_clear_400(server):
    with pytest.raises(APIError, match="HTTP 400.*no LoRA adapter 'c'.*--lora-modules c=PATH"):
        SideAPIClient(server.url, key=KEY).publish(text="hello", adapter="c")


def test_the_cli_publishes_through_an_adapter(server, tmp_path, texts):
    doc = tmp_path / "manual.txt"
    doc.write_text(" ".join(texts["other"]))
    kvcdn = str(Path(sys.executable).with_name("kvcdn"))
    out = subprocess.run([kvcdn, "publish", str(doc), "--adapter", "b", "--server", server.url],
                         env={**os.environ, "KVCDN_PUBLISHER_KEY": KEY}, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    doc_id = out.stdout.split()[0]
    assert SideAPIClient(server.url, key=KEY).get(doc_id)["adapter"].startswith("sha256:")
