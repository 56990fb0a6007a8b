"""The transformers path on CPU: the paper's correctness check and every refusal."""

from __future__ import annotations

import shutil

import pytest
import torch

from vllm_kvcdn.artifact.manifest import ArtifactError
from vllm_kvcdn.hf import HFKVCDN, FingerprintMismatch
from vllm_kvcdn.store.keys import chunk_object_key

QUESTIONS = ["\nQuestion: which river runs past the stone city? Answer:",
             "\nQ: what does the engine store in a chunk? A:",
             "\nSummary of the text above:"]


@pytest.fixture(scope="module", params=["bfloat16", "float32"])
def hf(request, tiny_model, tmp_path_factory):
    store = tmp_path_factory.mktemp("hf-store")
    return HFKVCDN(str(tiny_model), store_url=f"file://{store}", dtype=request.param, device="cpu")


@pytest.fixture(scope="module")
def docs(texts) -> list[str]:
    return [" ".join(texts["doc_d"][:40]), " ".join(texts["doc_e"][:70]), " ".join(texts["doc_d"][60:90])]


def test_generate_from_artifact_equals_prefill_from_scratch(hf, docs, capsys):
    worst = 0.0
    for text in docs:
        doc = hf.publish(text=text)
        for q in QUESTIONS:
            prompt = hf.encode(text + q)
            got = hf.generate(prompt, doc_id=doc.doc_id, max_new_tokens=24)
            assert got.cached_tokens == doc.num_tokens
            ids = torch.tensor([prompt])
            ref = hf.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24,
                                    do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()
            assert got.token_ids == ref and len(ref) == 24
            diff = (hf.next_token_logits(prompt, doc_id=doc.doc_id)
                    - hf.next_token_logits(prompt, use_artifact=False)).abs().max().item()
            worst = max(worst, diff)
    with capsys.disabled():
        print(f"\n[hf exactness] dtype={hf.dtype} max |logit diff| over {len(docs) * len(QUESTIONS)} "
              f"prompts: {worst:g}")
    # With eager attention every query row is computed the same way from a cache as in
    # one full pass: bf16 logits are bit-identical, as the paper's argument says. In
    # float32, CPU GEMMs block differently by row count and move the last bits (~5e-6).
    assert worst == 0.0 if hf.dtype == torch.bfloat16 else worst < 1e-5


def test_finds_the_document_by_prefix_and_samples(hf, docs):
    doc = hf.publish(text=docs[0])
    prompt = hf.encode(docs[0] + QUESTIONS[0])
    assert hf.find_document(prompt) == doc.doc_id
    out = hf.generate(prompt, max_new_tokens=8, do_sample=True, temperature=0.8)
    assert out.doc_id == doc.doc_id and out.cached_tokens == doc.num_tokens and len(out.token_ids) == 8


def test_prompt_not_starting_with_the_document_is_refused(hf, docs):
    doc = hf.publish(text=docs[1])
    with pytest.raises(ValueError, match="does not start with document"):
        hf.generate(hf.encode("Something else entirely. " + docs[1]), doc_id=doc.doc_id)


def test_prompt_equal_to_the_document_still_computes_one_token(hf, docs):
    doc = hf.publish(text=docs[2])
    prompt = hf.encode(docs[2])
    assert hf.generate(prompt, doc_id=doc.doc_id, max_new_tokens=2).cached_tokens == len(prompt) - 1


def test_other_model_dtype_or_profile_is_refused(tiny_model, tiny_variant, tmp_path, docs):
    store = f"file://{tmp_path}"
    producer = HFKVCDN(str(tiny_model), store_url=store, dtype="bfloat16", device="cpu")
    doc = producer.publish(text=docs[0])
    with pytest.raises(FingerprintMismatch, match="weights"):
        HFKVCDN(str(tiny_variant), store_url=store, dtype="bfloat16", device="cpu").load(doc.doc_id)
    with pytest.raises(FingerprintMismatch, match="kv_dtype"):
        HFKVCDN(str(tiny_model), store_url=store, dtype="float16", device="cpu").load(doc.doc_id)
    # Same model, another compute profile: refused unless explicitly allowed.
    manifest_path = tmp_path / "manifests" / f"{doc.doc_id}.json"
    text = manifest_path.read_text().replace('"engine": "transformers"', '"engine": "vllm"')
    manifest_path.write_text(text.replace(f'"fingerprint": "{doc.fingerprint}"', '"fingerprint": "other"'))
    with pytest.raises(FingerprintMismatch, match="allow_cross_profile"):
        producer.load(doc.doc_id)


def test_corrupt_artifact_is_refused_with_a_clear_error(tiny_model, tmp_path, docs):
    hf = HFKVCDN(str(tiny_model), store_url=f"file://{tmp_path}", device="cpu")
    doc = hf.publish(text=docs[0])
    path = tmp_path / chunk_object_key(doc.chunks[0].key)
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="checksum"):
        hf.load(doc.doc_id)
    shutil.rmtree(tmp_path / "chunks")
    with pytest.raises(ArtifactError, match="missing"):
        hf.load(doc.doc_id)
