"""Published documents in a store: listing, deletion that keeps shared chunks, checks."""

from vllm_kvcdn.artifact import catalog
from vllm_kvcdn.hf import HFKVCDN
from vllm_kvcdn.store.keys import chunk_object_key


def test_delete_keeps_chunks_other_documents_use(tiny_model, tmp_path):
    kv = HFKVCDN(str(tiny_model), store_url=f"file://{tmp_path}", device="cpu", chunk_size=128)
    tokens = list(range(10, 400))
    short, long = kv.publish(tokens[:300]), kv.publish(tokens)
    assert short.chunks[0].key == long.chunks[0].key  # the same first chunks
    assert {m.doc_id for m in catalog.manifests(kv.store)} == {short.doc_id, long.doc_id}
    assert catalog.document_tokens(kv.store, long) == tokens

    deleted = catalog.delete_document(kv.store, short)
    assert deleted.chunks_kept == 2 and deleted.chunks_deleted == 1  # its tail was its own
    assert catalog.intact(kv.store, long)
    assert [m.doc_id for m in catalog.manifests(kv.store)] == [long.doc_id]


def test_republish_checks_checksums_and_repairs(tiny_model, tmp_path):
    kv = HFKVCDN(str(tiny_model), store_url=f"file://{tmp_path}", device="cpu")
    tokens = list(range(10, 300))
    doc = kv.publish(tokens)
    assert all(status == "ok" for _, status in catalog.verify_chunks(kv.store, doc))
    first, tail = (tmp_path / chunk_object_key(c.key) for c in doc.chunks)
    flipped = bytearray(first.read_bytes())
    flipped[-3] ^= 0x10  # same size: a size check cannot see it
    first.write_bytes(bytes(flipped))
    tail.write_bytes(tail.read_bytes()[:-8])
    statuses = [status for _, status in catalog.verify_chunks(kv.store, doc)]
    assert statuses[0].startswith("checksum") and statuses[1].startswith("truncated")
    assert not catalog.intact(kv.store, doc)
    again = kv.publish(tokens)  # publishing again replaces both damaged chunks
    assert catalog.intact(kv.store, again) and again.chunks == doc.chunks


def test_republish_keeps_an_intact_chunk_and_records_it(tiny_model, tmp_path):
    """Another producer's intact chunk under the same key stays (other manifests record
    its checksum); the new manifest records what is stored, not what was computed."""
    kv = HFKVCDN(str(tiny_model), store_url=f"file://{tmp_path}", device="cpu", chunk_size=128)
    tokens = list(range(10, 200))
    doc = kv.publish(tokens)
    stored = catalog.verify_chunks(kv.store, doc)
    again = kv.publish(tokens + [5, 6, 7])  # shares the first chunk
    assert again.chunks[0] == doc.chunks[0] and catalog.intact(kv.store, again)
    assert catalog.verify_chunks(kv.store, doc) == stored


def test_damaged_manifest_is_listed_and_deletable(tiny_model, tmp_path):
    kv = HFKVCDN(str(tiny_model), store_url=f"file://{tmp_path}", device="cpu", chunk_size=128)
    keep, damaged = kv.publish(list(range(10, 300))), kv.publish(list(range(10, 200)) + [7] * 150)
    (tmp_path / "manifests" / f"{damaged.doc_id}.json").write_text("{not json")
    entries = {e.doc_id: e for e in catalog.entries(kv.store)}
    assert isinstance(entries[damaged.doc_id], catalog.DamagedManifest)
    assert "publish it again" in entries[damaged.doc_id].advice()
    assert catalog.get_manifest(kv.store, damaged.doc_id) is None  # a republish replaces it
    deleted = catalog.delete_document(kv.store, catalog.find(kv.store, damaged.doc_id[:12])[0])
    # Its chunks are found from the last one back through the parents; the shared first stays.
    assert (deleted.chunks_deleted, deleted.chunks_kept) == (2, 1)
    assert [e.doc_id for e in catalog.entries(kv.store)] == [keep.doc_id] and catalog.intact(kv.store, keep)
