"""Matching prompts against published chunks (pure Python, no engine)."""

import time

from vllm_kvcdn.artifact.chain import document_chunks
from vllm_kvcdn.artifact.index import ChunkIndex
from vllm_kvcdn.artifact.manifest import Manifest, ManifestChunk
from vllm_kvcdn.store import FileStore
from vllm_kvcdn.store.keys import manifest_object_key

FP = "f" * 32


def publish(store, tokens, salt=None, fp=FP, chunk_size=256):
    spans = document_chunks(tokens, fp, salt, chunk_size)
    m = Manifest(
        doc_id=spans[-1].key, fingerprint=fp, num_tokens=len(tokens), chunk_size=chunk_size,
        chunks=[ManifestChunk(s.key, s.parent, s.num_tokens, 100, "x") for s in spans],
    )
    store.put(manifest_object_key(m.doc_id), m.to_json())
    return m


def index_for(tmp_path, **kw):
    store = FileStore(tmp_path)
    return store, ChunkIndex(store, FP, 256, **kw)


def test_whole_document_including_its_partial_tail(tmp_path):
    store, index = index_for(tmp_path)
    doc = list(range(1000, 1700))
    m = publish(store, doc)
    index.refresh()
    match = index.match(doc + [1, 2, 3], None)
    assert match.num_tokens == 700 and match.doc_id == m.doc_id
    assert [s.num_tokens for s in match.spans] == [256, 256, 188]


def test_prompt_sharing_two_chunks_hits_those_two(tmp_path):
    store, index = index_for(tmp_path)
    doc = list(range(1000, 1700))
    publish(store, doc)
    index.refresh()
    assert index.match(doc[:512] + [7] * 40, None).num_tokens == 512
    assert index.match(doc[:600], None).num_tokens == 512  # tail not fully present
    assert index.match(doc[:100], None).num_tokens == 0


def test_short_document_is_a_tail_off_the_seed(tmp_path):
    store, index = index_for(tmp_path)
    publish(store, [5] * 100)
    index.refresh()
    assert index.match([5] * 100 + [9], None).num_tokens == 100


def test_longest_tail_wins_and_longer_documents_continue(tmp_path):
    store, index = index_for(tmp_path)
    doc = list(range(2000, 3000))
    publish(store, doc[:300])
    publish(store, doc[:400])
    index.refresh()
    assert index.match(doc[:500], None).num_tokens == 400
    publish(store, doc)
    index.refresh()
    assert index.match(doc + [1], None).num_tokens == 1000


def test_salt_and_fingerprint_isolate(tmp_path):
    store, index = index_for(tmp_path)
    doc = list(range(700))
    publish(store, doc, salt="tenant-a")
    publish(store, list(range(5000, 5700)), fp="e" * 32)
    index.refresh()
    assert index.match(doc, None).num_tokens == 0
    assert index.match(doc, "tenant-b").num_tokens == 0
    assert index.match(doc, "tenant-a").num_tokens == 700
    assert index.match(doc + [1], "tenant-a").num_tokens == 700
    assert index.match(list(range(5000, 5701)), None).num_tokens == 0
    assert index.num_documents == 1 and index.num_foreign == 1


def test_refresh_sees_publish_and_delete(tmp_path):
    store, index = index_for(tmp_path)
    doc = list(range(300))
    index.refresh()
    m = publish(store, doc)
    index.refresh()
    assert index.match(doc + [1], None).num_tokens == 300
    time.sleep(0.01)
    store.delete(manifest_object_key(m.doc_id))
    index.refresh()
    assert index.match(doc + [1], None).num_tokens == 0


def test_corrupt_manifest_is_skipped(tmp_path):
    store, index = index_for(tmp_path)
    store.put("manifests/bad.json", b"{oops")
    publish(store, list(range(300)))
    index.refresh()
    assert index.num_documents == 1
