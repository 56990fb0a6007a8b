"""The saver built directly from its collaborators: a document's KV written into plain CPU
caches (the GPU backends' layout, pure torch) at scattered blocks, copied out as a publish
does in its step, written to a real file store, read back through the artifact's own
reader, and verified against the store byte for byte."""

from __future__ import annotations

import torch

from vllm_kvcdn.artifact import catalog
from vllm_kvcdn.artifact.chain import document_chunks
from vllm_kvcdn.artifact.documents import read_chunk
from vllm_kvcdn.artifact.fingerprint import Fingerprint
from vllm_kvcdn.connector.device_copies import CacheDevice
from vllm_kvcdn.connector.geometry import KVGeometry
from vllm_kvcdn.connector.kv_layout import SplitKVLayout
from vllm_kvcdn.connector.saver import DocumentSaver
from vllm_kvcdn.connector.wire import SaveSpec
from vllm_kvcdn.store.file import FileStore

BLOCK, HEADS, DIM, LAYERS, CHUNK = 16, 2, 8, 2, 32
GEOMETRY = KVGeometry(BLOCK, HEADS, DIM, torch.bfloat16, "auto")
FINGERPRINT = Fingerprint("c" * 64, {"test": "saver"})
TOKENS = list(range(1, 1 + 2 * CHUNK + 9))  # two whole chunks and a tail
BLOCKS = [7, 2, 12, 5, 9]


def _saver(tmp_path):
    caches = [torch.zeros(16, HEADS, BLOCK, 2 * DIM, dtype=torch.bfloat16) for _ in range(LAYERS)]
    layout = SplitKVLayout(BLOCK, BLOCK, DIM)
    kv = [(torch.randn(len(TOKENS), HEADS, DIM).to(torch.bfloat16), torch.randn(len(TOKENS), HEADS, DIM).to(
        torch.bfloat16)) for _ in range(LAYERS)]
    slots = GEOMETRY.slots(BLOCKS, 0, len(TOKENS))
    for cache, (k, v) in zip(caches, kv):
        layout.write(cache, k, v, slots)  # as the engine's prefill would have
    saver = DocumentSaver(store=FileStore(tmp_path / "store", durable=False), fingerprint=FINGERPRINT,
                          geometry=GEOMETRY, caches=caches, layout=layout, device=CacheDevice(torch.device("cpu")),
                          chunk_size=CHUNK, codec=None)
    return saver, kv


def test_a_publish_stores_exactly_the_blocks_it_copied_out(tmp_path):
    saver, kv = _saver(tmp_path)
    spans = document_chunks(TOKENS, FINGERPRINT.digest, None, CHUNK)
    spec = SaveSpec("p", spans[-1].key, TOKENS, BLOCKS, spans, title="t", prefill={"alone": True})
    copied = saver.copy_out(spec)
    for cache in saver.caches:
        cache.zero_()  # the blocks are reused after the step: the copy must not depend on them
    outcome = saver.run(spec, copied)
    report = outcome.result.as_report()
    assert report["published"] is True and report["num_chunks"] == 3 and report["prefill"] == {"alone": True}
    assert outcome.stats.data["published_documents"] == 1
    manifest = catalog.get_manifest(saver.store, spans[-1].key)
    assert manifest.title == "t" and manifest.num_tokens == len(TOKENS)
    for span in spans:
        chunk, _ = read_chunk(saver.store, span.key, fingerprint=FINGERPRINT.digest, tokens=TOKENS[span.start:span.end])
        for layer, (k, v) in enumerate(kv):
            assert torch.equal(chunk.keys[layer], k[span.start : span.end])
            assert torch.equal(chunk.values[layer], v[span.start : span.end])
    verify = SaveSpec("v", spans[-1].key, TOKENS, BLOCKS, verify=True)
    assert saver.run(verify, copied).result.details["identical"] is True
    copied[1][0][3, 0, 0] += 1  # one element of a recompute differs
    assert saver.run(verify, copied).result.details["identical"] is False


def test_a_verify_of_an_unknown_document_fails_with_a_reason(tmp_path):
    saver, _ = _saver(tmp_path)
    spec = SaveSpec("v", "d" * 64, TOKENS, BLOCKS, verify=True)
    result = saver.run(spec, saver.copy_out(spec)).result
    assert not result.ok and "cannot verify" in result.error and result.as_report()["verified"] is False
