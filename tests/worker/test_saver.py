"""The saver built directly from its collaborators: a document's KV written into plain CPU
caches (the GPU backends' layout, pure torch) at scattered blocks, copied out as a publish
does in its step, written to a real file store, read back through the artifact's own
reader, and verified against the store byte for byte."""

from __future__ import annotations

import pytest
import torch

from vllm_kvcdn.artifact import catalog
from vllm_kvcdn.artifact.chain import document_chunks
from vllm_kvcdn.artifact.documents import join_parts, new_manifest, put_manifest, read_chunk, read_whole_chunk
from vllm_kvcdn.artifact.fingerprint import Fingerprint
from vllm_kvcdn.artifact.manifest import ArtifactError
from vllm_kvcdn.artifact.parts import KVPart
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


def _saver(tmp_path, kv=None, part=None):
    """A saver over caches holding ``kv`` (random if None) at ``BLOCKS``; ``part``: the
    heads of a tensor-parallel rank (``kv`` then holds those heads only)."""
    heads = part.num_heads if part else HEADS
    caches = [torch.zeros(16, heads, BLOCK, 2 * DIM, dtype=torch.bfloat16) for _ in range(LAYERS)]
    layout = SplitKVLayout(BLOCK, BLOCK, DIM)
    kv = kv or [(torch.randn(len(TOKENS), HEADS, DIM).to(torch.bfloat16), torch.randn(len(TOKENS), HEADS, DIM).to(
        torch.bfloat16)) for _ in range(LAYERS)]
    slots = GEOMETRY.slots(BLOCKS, 0, len(TOKENS))
    for cache, (k, v) in zip(caches, kv):
        layout.write(cache, k, v, slots)  # as the engine's prefill would have
    geometry = KVGeometry(BLOCK, heads, DIM, torch.bfloat16, "auto")
    saver = DocumentSaver(store=FileStore(tmp_path / "store", durable=False), fingerprint=FINGERPRINT,
                          geometry=geometry, caches=caches, layout=layout, device=CacheDevice(torch.device("cpu")),
                          chunk_size=CHUNK, codec=None, part=part)
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
    assert outcome.stats.data["published_chunks"] == 3
    # The chunks only: the scheduler writes the manifest once every rank's part is in.
    assert catalog.get_manifest(saver.store, spans[-1].key) is None
    assert [c.key for c in outcome.result.stored] == [s.key for s in spans]
    _put_manifest(saver, outcome.result.stored)
    for span in spans:
        chunk, _ = read_chunk(saver.store, span.key, fingerprint=FINGERPRINT.digest, tokens=TOKENS[span.start:span.end])
        for layer, (k, v) in enumerate(kv):
            assert torch.equal(chunk.keys[layer], k[span.start : span.end])
            assert torch.equal(chunk.values[layer], v[span.start : span.end])
    verify = SaveSpec("v", spans[-1].key, TOKENS, BLOCKS, verify=True)
    assert saver.run(verify, copied).result.details["identical"] is True
    copied[1][0][3, 0, 0] += 1  # one element of a recompute differs
    assert saver.run(verify, copied).result.details["identical"] is False


def _put_manifest(saver, stored) -> None:
    """As the scheduler's publish desk does when every rank has reported."""
    put_manifest(saver.store, new_manifest(doc_id=stored[-1].key, chunks=stored, num_tokens=len(TOKENS),
                                           fingerprint=FINGERPRINT.digest, profile={}, chunk_size=CHUNK, producer={}))


def test_a_verify_of_an_unknown_document_fails_with_a_reason(tmp_path):
    saver, _ = _saver(tmp_path)
    spec = SaveSpec("v", "d" * 64, TOKENS, BLOCKS, verify=True)
    result = saver.run(spec, saver.copy_out(spec)).result
    assert not result.ok and "cannot verify" in result.error and result.as_report()["verified"] is False


def test_tensor_parallel_ranks_store_their_heads_and_one_manifest_names_every_part(tmp_path):
    """Two ranks of TP=2, each holding one of the two KV heads: each stores its own part of
    every chunk, the joined manifest names both, each part reads back as its heads only,
    no whole chunk exists, and gc and delete see every part."""
    whole = [(torch.randn(len(TOKENS), HEADS, DIM).to(torch.bfloat16), torch.randn(len(TOKENS), HEADS, DIM).to(
        torch.bfloat16)) for _ in range(LAYERS)]
    spans = document_chunks(TOKENS, FINGERPRINT.digest, None, CHUNK)
    spec = SaveSpec("p", spans[-1].key, TOKENS, BLOCKS, spans)
    stored = {}
    for head in range(HEADS):
        part = KVPart(head, head + 1, HEADS)
        mine = [(k[:, head : head + 1], v[:, head : head + 1]) for k, v in whole]
        saver, _ = _saver(tmp_path, mine, part)
        outcome = saver.run(spec, saver.copy_out(spec))
        assert outcome.result.ok and outcome.result.part == part.name == f"h{head}-{head + 1}of2"
        stored[part.name] = outcome.result.stored
    manifest = new_manifest(doc_id=spans[-1].key, chunks=join_parts(stored), num_tokens=len(TOKENS),
                            fingerprint=FINGERPRINT.digest, profile={}, chunk_size=CHUNK, producer={})
    put_manifest(saver.store, manifest)
    manifest = catalog.get_manifest(saver.store, spans[-1].key)  # as every reader sees it
    assert manifest.parts == ["h0-1of2", "h1-2of2"] and all(len(c.parts) == 2 for c in manifest.chunks)
    assert catalog.verify_chunks(saver.store, manifest) == [(s.key, "ok") for s in spans]
    for head, name in enumerate(manifest.parts):
        for span in spans:
            chunk, _ = read_chunk(saver.store, span.key, part=name, num_kv_heads=1)
            assert torch.equal(chunk.keys[1], whole[1][0][span.start : span.end, head : head + 1])
    with pytest.raises(ArtifactError, match="missing"):  # no whole chunk was stored
        read_chunk(saver.store, spans[0].key)
    # A reader that runs every head (the transformers path) joins the parts.
    joined = read_whole_chunk(saver.store, manifest.chunks[-1], HEADS, fingerprint=FINGERPRINT.digest)
    assert torch.equal(joined.values[0], whole[0][1][spans[-1].start : spans[-1].end])
    # gc keeps every part a manifest names, and deleting the document removes them all.
    assert catalog.find_garbage(saver.store, grace_s=0).unreferenced == []
    assert catalog.delete_document(saver.store, manifest).chunks_deleted == 2 * len(spans)
