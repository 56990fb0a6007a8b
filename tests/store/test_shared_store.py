"""One bucket, many nodes: documents published to S3 by one producer and read by others,
through a node's disk tier; propagation of publishes and deletions to another node's
index; concurrent and interrupted publishes; garbage collection. Real S3 protocol
(moto's server, tests/rigs/s3.py), real artifacts from the transformers path."""

from __future__ import annotations

import threading

import pytest

from vllm_kvcdn.artifact import catalog
from vllm_kvcdn.artifact.index import ChunkIndex
from vllm_kvcdn.cli.main import main as kvcdn
from vllm_kvcdn.hf import HFKVCDN
from vllm_kvcdn.store import StoreError, open_store
from vllm_kvcdn.store.base import StoreWrapper
from vllm_kvcdn.store.keys import CHUNK_PREFIX, chunk_object_key, manifest_object_key

TOKENS = list(range(10, 400))  # 390 tokens: three chunks of 128 and a 6-token tail


@pytest.fixture
def bucket_url(s3) -> str:
    return f"s3://{s3.new_bucket()}/docs?endpoint_url={s3.endpoint}"


@pytest.fixture
def producer(tiny_model, bucket_url, signing_key) -> HFKVCDN:
    return HFKVCDN(str(tiny_model), store_url=bucket_url, device="cpu", chunk_size=128, signing_key=signing_key)


def via_proxy(url: str, s3, proxy) -> str:
    return url.replace(s3.endpoint, proxy.endpoint)


def chunk_gets(proxy) -> int:
    return sum(1 for method, path in proxy.requests if method == "GET" and f"/{CHUNK_PREFIX}" in path)


def test_a_node_reads_through_its_disk_tier_and_keeps_it_across_restarts(producer, bucket_url, s3, s3_proxy,
                                                                        tmp_path):
    doc = producer.publish(TOKENS)
    url = via_proxy(bucket_url, s3, s3_proxy)
    node = open_store(url, disk_cache_dir=str(tmp_path / "disk"), disk_cache_gib=1)
    assert catalog.intact(node, doc)  # first read: from S3, checksums verified
    assert node.tier_counts() == {"disk_tier_hits": 0, "disk_tier_misses": len(doc.chunks)}
    from_s3 = chunk_gets(s3_proxy)
    assert catalog.intact(node, doc) and chunk_gets(s3_proxy) == from_s3  # all from disk now

    restarted = open_store(url, disk_cache_dir=str(tmp_path / "disk"), disk_cache_gib=1)
    assert catalog.intact(restarted, doc) and chunk_gets(s3_proxy) == from_s3
    assert restarted.tier_counts()["disk_tier_hits"] == len(doc.chunks)

    # A cached copy that rotted is dropped and read again from S3, never served.
    cached = tmp_path / "disk" / chunk_object_key(doc.chunks[0].key)
    rotten = bytearray(cached.read_bytes())
    rotten[-5] ^= 0x01
    cached.write_bytes(bytes(rotten))
    assert catalog.intact(restarted, doc) and chunk_gets(s3_proxy) == from_s3 + 1
    assert cached.read_bytes() != bytes(rotten)

    # Manifests always come from S3: a deletion there is seen at once.
    catalog.delete_document(open_store(bucket_url), doc)
    assert catalog.get_manifest(restarted, doc.doc_id) is None


def test_the_disk_tier_stays_within_its_bound(producer, bucket_url, tmp_path):
    doc = producer.publish(TOKENS)
    largest = max(c.nbytes for c in doc.chunks)
    node = open_store(bucket_url, disk_cache_dir=str(tmp_path / "disk"), disk_cache_gib=1.5 * largest / 2**30)
    assert catalog.intact(node, doc)
    kept = {p.name.removesuffix(".safetensors"): p.stat().st_size for p in (tmp_path / "disk").rglob("*.safetensors")}
    assert sum(kept.values()) <= node.budget.capacity_bytes
    assert doc.chunks[-1].key in kept and doc.chunks[0].key not in kept  # least recently used out first


def test_another_node_sees_publishes_and_deletions_and_reads_only_new_manifests(producer, bucket_url, s3,
                                                                               s3_proxy):
    node = ChunkIndex(open_store(via_proxy(bucket_url, s3, s3_proxy)), producer.fingerprint.digest, 128,
                      trust=producer.trust)  # the producer's key, no unsigned documents (s3://)
    node.refresh(force=True)
    assert node.match(TOKENS, None).num_tokens == 0
    doc = producer.publish(TOKENS)
    node.refresh()
    assert node.match(TOKENS + [1, 2], None).num_tokens == len(TOKENS) and node.num_documents == 1

    other = producer.publish(list(range(300, 100, -1)))
    before = len(s3_proxy.requests)
    node.refresh()
    manifest_reads = [p for m, p in s3_proxy.requests[before:] if m == "GET" and "/manifests/" in p]
    assert manifest_reads and all(other.doc_id in p for p in manifest_reads)  # not the one it knew

    catalog.delete_document(producer.store, doc)
    node.refresh()
    assert node.match(TOKENS + [1, 2], None).num_tokens == 0 and node.num_documents == 1


def test_concurrent_publishes_of_one_document_end_in_one_consistent_manifest(tiny_model, bucket_url, signing_key):
    producers = [HFKVCDN(str(tiny_model), store_url=bucket_url, device="cpu", chunk_size=128, signing_key=signing_key)
                 for _ in range(2)]
    results, errors = [], []

    def publish(p: HFKVCDN) -> None:
        try:
            results.append(p.publish(TOKENS))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=publish, args=(p,)) for p in producers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len({r.doc_id for r in results}) == 1
    store = producers[0].store
    manifests = list(catalog.manifests(store))
    assert len(manifests) == 1 and catalog.intact(store, manifests[0])
    assert len(list(store.list(CHUNK_PREFIX))) == len(manifests[0].chunks)


class _CrashBeforeManifest(StoreWrapper):
    """A producer that dies after writing its chunks, before its manifest."""

    def put(self, key, data):
        if key.startswith("manifests/"):
            raise StoreError("simulated crash before the manifest")
        super().put(key, data)


def test_a_publish_cut_before_its_manifest_leaves_nothing_to_match_and_a_republish_repairs(producer):
    good = producer.store
    producer.store = _CrashBeforeManifest(good)
    with pytest.raises(StoreError):
        producer.publish(TOKENS)
    assert list(catalog.manifests(good)) == [] and len(list(good.list(CHUNK_PREFIX))) > 0
    producer.store = good
    doc = producer.publish(TOKENS)
    assert catalog.intact(good, doc)


def test_gc_removes_only_old_unreferenced_chunks(producer, bucket_url, capsys):
    store = producer.store
    shared = producer.publish(TOKENS)
    orphan = producer.publish(TOKENS[:256] + list(range(380, 280, -1)))  # shares two chunks with `shared`
    store.delete(manifest_object_key(orphan.doc_id))  # as a crash mid-publish would leave it
    own = {chunk_object_key(c.key) for c in orphan.chunks} - {chunk_object_key(c.key) for c in shared.chunks}
    assert len(own) == 1

    young = catalog.find_garbage(store, grace_s=3600)  # a publish under way looks the same: kept
    assert young.unreferenced == [] and young.young == 1

    kvcdn(["gc", "--store", bucket_url, "--grace", "0", "--dry-run"])
    out = capsys.readouterr().out
    assert "would delete 1 chunks" in out and next(iter(own)) in out
    assert len(list(store.list(CHUNK_PREFIX))) == len(shared.chunks) + 1  # a dry run deletes nothing

    kvcdn(["gc", "--store", bucket_url, "--grace", "0"])
    assert "deleted 1 chunks" in capsys.readouterr().out
    assert catalog.intact(store, shared) and len(list(store.list(CHUNK_PREFIX))) == len(shared.chunks)


def test_gc_spares_an_orphan_that_a_republish_took_back(producer):
    store = producer.store
    doc = producer.publish(TOKENS)
    store.delete(manifest_object_key(doc.doc_id))
    garbage = catalog.find_garbage(store, grace_s=0)
    assert len(garbage.unreferenced) == len(doc.chunks)
    producer.publish(TOKENS)  # reuses the orphaned chunks before gc deletes them
    assert catalog.collect_garbage(store, garbage) == 0 and catalog.intact(store, doc)
