"""A request's profile: what its chunk keys carry besides tokens (salt, LoRA adapter by the
digest of its files), and the requests served without kvcdn because their tokens do not
name their inputs (images, prompt embeddings, unreadable adapters). The scheduler half runs
on vLLM's own request objects (tests/rigs/scheduler.py), no engine; the engine tests
(test_vllm_features.py) check the answers."""

from __future__ import annotations

import os
import shutil

import pytest

from tests.rigs.scheduler import PUBLISH_KEY, admit, publish, scheduler, vllm_request
from vllm_kvcdn.artifact.chain import document_chunks
from vllm_kvcdn.connector.request_profile import AdapterDigests, request_profile
from vllm_kvcdn.store import open_store

DOC = list(range(100, 100 + 600))  # two whole chunks and a tail
PROMPT = DOC + [7, 8, 9]


def lora(name: str, path, int_id: int = 1):
    from vllm.lora.request import LoRARequest

    return LoRARequest(name, int_id, str(path))


@pytest.fixture
def rig(tmp_path, adapters):
    """A store holding DOC twice: for the base model and through adapter ``a``."""
    url = f"file://{tmp_path / 'store'}"
    store = open_store(url)
    digest = AdapterDigests().digest(str(adapters["a"]))
    docs = {"base": publish(store, DOC), "a": publish(store, DOC, adapter=digest)}
    half = scheduler(url)
    yield half, docs
    half.shutdown()


def test_an_adapter_is_known_by_its_files_not_its_name_or_path(adapters, tmp_path):
    digests = AdapterDigests()
    a, b, copy = (digests.digest(str(adapters[n])) for n in ("a", "b", "a-copy"))
    assert a.startswith("sha256:") and a == copy != b
    changed = shutil.copytree(adapters["a"], tmp_path / "changed")
    config = changed / "adapter_config.json"
    config.write_text(config.read_text().replace('"lora_alpha": 16', '"lora_alpha": 8'))  # same weights, other scale
    assert digests.digest(str(changed)) not in (a, None)
    (changed / "adapter_model.safetensors").unlink()
    assert digests.digest(str(changed)) is None  # no weights: no identity
    assert digests.digest(str(tmp_path / "nowhere")) is None


def test_lora_requests_hit_only_documents_of_their_adapter(rig, adapters):
    half, docs = rig
    cases = [(None, "base"), (lora("a", adapters["a"]), "a"), (lora("a2", adapters["a-copy"], 2), "a"),
             (lora("b", adapters["b"], 3), None)]
    for adapter, expected in cases:
        request = vllm_request(PROMPT, lora=adapter)
        loaded = admit(half, request)
        report = half.request_finished(request)[1]["kvcdn"]
        if expected is None:
            assert loaded == 0 and report["hit"] is False, adapter
        else:
            assert loaded == len(DOC) and report["document"] == docs[expected], adapter


@pytest.mark.parametrize("kind,reason", [("image", "multimodal"), ("embeds", "prompt_embeds"),
                                         ("missing_adapter", "adapter_unresolved"), ("pooling", "pooling")])
def test_requests_whose_tokens_do_not_name_their_inputs_load_nothing(rig, tmp_path, kind, reason, caplog):
    """Their token ids equal a published document's, yet they are served as ordinary
    requests: no load, counted with a reason, the first of each logged."""
    half, _ = rig
    kw = {"image": {"image": True}, "embeds": {"embeds": True}, "pooling": {"pooling": True},
          "missing_adapter": {"lora": lora("gone", tmp_path / "gone")}}[kind]
    for _ in range(2):
        request = vllm_request(PROMPT, **kw)
        assert admit(half, request) == 0
        assert half.request_finished(request)[1]["kvcdn"]["hit"] is False
    assert half.stats.data["unsupported_requests"] == {reason: 2}
    assert sum("served without kvcdn" in r.getMessage() for r in caplog.records) == 1


def test_an_unsupported_request_cannot_publish(rig):
    half, _ = rig
    request = vllm_request(PROMPT, image=True, kvcdn={"publish": True, "key": PUBLISH_KEY})
    admit(half, request)
    meta = half.build_connector_meta(_empty_output())
    report = half.request_finished(request)[1]["kvcdn"]
    assert "multimodal" in report["rejected"] and not meta.saves and "published" not in report


def test_a_publish_through_an_adapter_is_keyed_by_it(rig, adapters):
    half, docs = rig
    request = vllm_request(PROMPT, lora=lora("a", adapters["a"]), kvcdn={"publish": True, "key": PUBLISH_KEY})
    half.on_new_request(request)
    digest = AdapterDigests().digest(str(adapters["a"]))
    doc_id = half.request_finished(request)[1]["kvcdn"]["document"]  # the document it would have written
    assert doc_id == document_chunks(PROMPT, half.fingerprint.digest, None, 256, digest)[-1].key
    assert doc_id != document_chunks(PROMPT, half.fingerprint.digest, None, 256)[-1].key


def test_the_profile_reads_vllm_requests(adapters):
    digests = AdapterDigests()
    assert request_profile(vllm_request(PROMPT, salt="t"), digests).cache_salt == "t"
    assert request_profile(vllm_request(PROMPT, salt=""), digests).cache_salt is None  # an empty salt is none
    profile = request_profile(vllm_request(PROMPT, lora=lora("a", adapters["a"])), digests)
    assert profile.adapter == digests.digest(str(adapters["a"])) and profile.adapter_name == "a"
    assert profile.unsupported is None


def test_an_input_kind_a_later_vllm_keys_is_refused_not_ignored(rig, monkeypatch):
    """The profile asks vLLM's own extra-key function which inputs a request's blocks are
    keyed on; a kind kvcdn does not carry (here a made-up one, as a later vLLM might add)
    makes the request unsupported."""
    from vllm.v1.core import kv_cache_utils

    real = kv_cache_utils.generate_block_hash_extra_keys

    def with_hints(request, start, end, mm_index):
        keys, index = real(request, start, end, mm_index)
        return (*(keys or ()), ("kv_hints", "h")), index

    monkeypatch.setattr(kv_cache_utils, "generate_block_hash_extra_keys", with_hints)
    half, _ = rig
    request = vllm_request(PROMPT)
    assert admit(half, request) == 0
    assert half.stats.data["unsupported_requests"] == {"kv_hints": 1}


def _empty_output():
    from vllm.v1.core.sched.output import SchedulerOutput

    return SchedulerOutput.make_empty()


def test_a_hub_adapter_name_resolves_only_to_local_files(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert AdapterDigests().digest("some-org/some-adapter") is None  # never downloaded on the request path
    assert not os.path.exists(tmp_path / "hf" / "hub" / "models--some-org--some-adapter" / "snapshots")
