"""Published documents in a store: listing, deletion that keeps shared chunks, checks."""

from vllm_kvcdn import catalog
from vllm_kvcdn.hf import HFKVCDN
from vllm_kvcdn.index import chunk_object_key


def test_delete_keeps_chunks_other_documents_use(tiny_model, tmp_path):
    kv = HFKVCDN(str(tiny_model), store_url=f"file://{tmp_path}", device="cpu", chunk_size=128)
    tokens = list(range(10, 400))
    short, long = kv.publish(tokens[:300]), kv.publish(tokens)
    assert short.chunks[0].key == long.chunks[0].key  # the same first chunks
    assert {m.doc_id for m in catalog.manifests(kv.store)} == {short.doc_id, long.doc_id}
    assert catalog.document_tokens(kv.store, long) == tokens

    deleted = catalog.delete_document(kv.store, short)
    assert deleted.chunks_kept == 2 and deleted.chunks_deleted == 1  # its tail was its own
    assert catalog.chunks_present(kv.store, long)
    assert [m.doc_id for m in catalog.manifests(kv.store)] == [long.doc_id]


def test_chunks_present_and_verify_see_damage(tiny_model, tmp_path):
    kv = HFKVCDN(str(tiny_model), store_url=f"file://{tmp_path}", device="cpu")
    doc = kv.publish(list(range(10, 300)))
    assert all(status == "ok" for _, status in catalog.verify_chunks(kv.store, doc))
    path = tmp_path / chunk_object_key(doc.chunks[1].key)
    path.write_bytes(path.read_bytes()[:-8])
    assert not catalog.chunks_present(kv.store, doc)
    assert catalog.verify_chunks(kv.store, doc)[1][1].startswith("truncated")
    kv.publish(list(range(10, 300)))  # publishing again repairs the damaged chunk
    assert catalog.chunks_present(kv.store, doc)
