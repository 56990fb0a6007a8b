"""Attacks on a shared bucket by a party that can write objects but holds no signing key
(moto's S3 server on loopback: the real protocol, tests/rigs/s3.py), against a reading node:
its index (the scheduler's view, with its trust policy) and its worker loading into paged
caches (plain tensors, vLLM's CPU op) through its disk tier, RAM tier and block images.
The engine-level twin (a forged chunk under a real engine, answer bit-equal to plain vLLM)
is ``tests/engine/test_s3_faults.py`` ``forge``.

- a chunk replaced by a self-consistent forgery: refused (counted ``provenance``), in the
  bucket and in the node's disk tier; nothing of it reaches the paged cache;
- forgeries stored before the real publisher publishes: the publish replaces them (and
  says so), and the node loads the publisher's KV;
- a manifest the publisher signed for another fingerprint, replayed over the document's:
  never matched; edited to claim this fingerprint: a bad signature, counted;
- manifests unsigned or signed by a stranger: never matched, counted;
- a private document (sealed with a tenant key): served only by a node holding the key, kept
  sealed on its disk tier and never as block images; a tampered sealed chunk fails its
  authentication (counted ``decrypt``); a node without the key misses (``no_tenant_key``).
"""

from __future__ import annotations

import time
from dataclasses import replace

import pytest
import torch

from tests.rigs.forgery import forged_chunk
from vllm_kvcdn.artifact.chain import document_chunks
from vllm_kvcdn.artifact.documents import write_chunks, write_document
from vllm_kvcdn.artifact.fingerprint import Fingerprint
from vllm_kvcdn.artifact.index import ChunkIndex
from vllm_kvcdn.artifact.manifest import Manifest
from vllm_kvcdn.artifact.provenance import PublisherKey
from vllm_kvcdn.artifact.sealing import NO_KEYS, FileTenantKey, TenantKeys, is_sealed
from vllm_kvcdn.config import KVCDNConfig
from vllm_kvcdn.connector.geometry import KVGeometry
from vllm_kvcdn.connector.kv_layout import layout_for
from vllm_kvcdn.connector.wire import ChunkLoad, KVCDNMetadata, LoadSpec
from vllm_kvcdn.connector.worker import KVCDNWorker
from vllm_kvcdn.store import open_store
from vllm_kvcdn.store.keys import chunk_object_key, manifest_object_key

BLOCK, HEADS, DIM, LAYERS, CHUNK = 128, 2, 64, 2, 128
DOC_TOKENS = 3 * CHUNK + 8
FINGERPRINT = Fingerprint("f" * 64, {"test": "provenance"})


@pytest.fixture
def bucket(s3):
    name = s3.new_bucket()
    return name, f"s3://{name}/docs?endpoint_url={s3.endpoint}"


@pytest.fixture(scope="module")
def publisher() -> PublisherKey:
    return PublisherKey.generate()


def _document(seed: int):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 30000, (DOC_TOKENS,), generator=gen).tolist()
    kv = [(torch.randn(DOC_TOKENS, HEADS, DIM, generator=gen).to(torch.bfloat16),
           torch.randn(DOC_TOKENS, HEADS, DIM, generator=gen).to(torch.bfloat16)) for _ in range(LAYERS)]
    return tokens, kv


def _publish(url: str, tokens, kv, key: PublisherKey | None, fingerprint: str = FINGERPRINT.digest,
             keys: TenantKeys = NO_KEYS):
    """The document, signed by ``key``; sealed with ``keys`` when given (a private one)."""
    spans = document_chunks(tokens, fingerprint, None, CHUNK)
    return write_document(open_store(url), spans=spans, tokens=tokens, kv=kv, fingerprint=fingerprint, profile={},
                          chunk_size=CHUNK, producer={}, signer=key, keys=keys, private=keys is not NO_KEYS)


class Node:
    """A reading server's index and worker, trusting ``publisher``; a disk tier with images."""

    def __init__(self, url: str, publisher: PublisherKey, tmp_path, tenant_key: str | None = None):
        tmp_path.mkdir(parents=True, exist_ok=True)
        pub = tmp_path / "publisher.pub"
        pub.write_text(publisher.public_hex)
        self.config = KVCDNConfig(store_url=url, chunk_size=CHUNK, trusted_publishers=[str(pub)], ram_tier_gib=0.05,
                                  disk_cache_gib=1, disk_cache_dir=str(tmp_path / "disk"), load_policy="always",
                                  tenant_keys=[tenant_key] if tenant_key else [])
        self.index = ChunkIndex(open_store(url), FINGERPRINT.digest, CHUNK, trust=self.config.trust_policy(),
                                keys=self.config.keyring())
        geometry = KVGeometry(BLOCK, HEADS, DIM, torch.bfloat16, "auto")
        self.worker = KVCDNWorker(self.config, FINGERPRINT, self.config.open_store(), geometry,
                                  layout_factory=layout_for)
        self.worker.register_kv_caches({f"model.layers.{i}.attn": torch.zeros(16, HEADS, BLOCK, 2 * DIM,
                                                                               dtype=torch.bfloat16)
                                        for i in range(LAYERS)})
        self.loads = 0

    def hit_tokens(self, tokens) -> int:
        self.index.refresh(force=True)
        return self.index.match(tokens + [1], None).num_tokens

    def load(self, tokens) -> tuple[set[int], LoadSpec]:
        """Plan as the scheduler does (the index's checksums travel in the plan; its
        ``private`` flag is left out here: the loader must see a sealed object for itself)
        and load; the blocks reported for recompute."""
        match = self.index.match(tokens + [1], None)
        assert match.num_tokens == len(tokens)
        chunks = [ChunkLoad(s.key, s.start, s.num_tokens, s.start, s.end, s.num_tokens < CHUNK,
                            tokens[s.start : s.end], dict(c.checksums)) for s, c in zip(match.spans, match.chunks)]
        self.loads += 1
        spec = LoadSpec(f"r{self.loads}", list(range(4)), chunks)
        self.worker.start_load_kv(KVCDNMetadata(loads=[spec], idle=True))
        deadline = time.monotonic() + 30
        while spec.req_id not in self.worker.take_finished_loads(idle=True):
            assert time.monotonic() < deadline
        return self.worker.get_block_ids_with_load_errors(), spec

    def holds(self, spec: LoadSpec, kv) -> bool:
        slots = self.worker.geometry.slots(spec.block_ids, 0, DOC_TOKENS)
        return all(torch.equal(k_got, k) and torch.equal(v_got, v) for (k, v), (k_got, v_got) in
                   zip(kv, (self.worker.layout.read(c, slots) for c in self.worker.caches)))

    def failures(self) -> dict:
        self.worker.collect()
        return dict(self.worker.stats.data.get("failures", {}))


def _forge(s3, bucket: str, key: str) -> None:
    client = s3.client()
    data = client.get_object(Bucket=bucket, Key=f"docs/{key}")["Body"].read()
    client.put_object(Bucket=bucket, Key=f"docs/{key}", Body=forged_chunk(data))


def test_a_forged_chunk_is_refused_from_the_bucket_and_from_the_disk_tier(s3, bucket, publisher, tmp_path):
    name, url = bucket
    tokens, kv = _document(0)
    manifest = _publish(url, tokens, kv, publisher).manifest
    _forge(s3, name, chunk_object_key(manifest.chunks[1].key))
    node = Node(url, publisher, tmp_path)
    assert node.hit_tokens(tokens) == DOC_TOKENS  # the signed manifest still matches
    failed, _ = node.load(tokens)
    assert failed == {1, 2, 3} and node.failures() == {"provenance": 1}  # the chunk and all after: recomputed

    # The bucket healed, the node's disk tier still holds the forgery: dropped, read again.
    _publish(url, tokens, kv, publisher)
    forged_copy = tmp_path / "disk" / chunk_object_key(manifest.chunks[1].key)
    assert forged_copy.read_bytes() != s3.client().get_object(
        Bucket=name, Key=f"docs/{chunk_object_key(manifest.chunks[1].key)}")["Body"].read()
    failed, spec = node.load(tokens)
    assert failed == set() and node.holds(spec, kv) and node.failures() == {"provenance": 1}
    honest = s3.client().get_object(Bucket=name, Key=f"docs/{chunk_object_key(manifest.chunks[1].key)}")
    assert forged_copy.read_bytes() == honest["Body"].read()  # the disk tier holds the publisher's now


def test_forgeries_stored_before_the_publisher_are_replaced_and_the_node_loads_the_publishers_kv(
        bucket, publisher, tmp_path):
    _, url = bucket
    tokens, kv = _document(1)
    _, bad_kv = _document(2)
    spans = document_chunks(tokens, FINGERPRINT.digest, None, CHUNK)  # the keys are public
    write_chunks(open_store(url), spans=spans, tokens=tokens, kv=bad_kv, fingerprint=FINGERPRINT.digest)
    written = _publish(url, tokens, kv, publisher)
    assert written.replaced_chunks == len(written.manifest.chunks) == 4
    node = Node(url, publisher, tmp_path)
    assert node.hit_tokens(tokens) == DOC_TOKENS
    failed, spec = node.load(tokens)
    assert failed == set() and node.holds(spec, kv)
    hot_failed, hot = node.load(tokens)  # from the RAM tier and the tail cache now: the same bytes
    assert hot_failed == set() and node.holds(hot, kv) and node.failures() == {}
    assert node.worker.stats.data["ram_tier_hits"] == 3 and node.worker.stats.data["ram_tier_tail_hits"] == 1


def test_replayed_unsigned_and_strangers_manifests_are_never_matched(s3, bucket, publisher, tmp_path):
    name, url = bucket
    tokens, kv = _document(3)
    node = Node(url, publisher, tmp_path)
    # Signed by the trusted publisher for another fingerprint (another dtype, say), replayed
    # over this fingerprint's manifest: its chunk keys are another chain; it is not ours.
    other_fp = "e" * 64
    replayed = _publish(url, tokens, kv, publisher, fingerprint=other_fp).manifest
    ours = _publish(url, tokens, kv, publisher).manifest
    store = open_store(url)
    store.put(manifest_object_key(ours.doc_id), replayed.to_json())
    assert node.hit_tokens(tokens) == 0
    claimed = replace(replayed, doc_id=ours.doc_id, fingerprint=FINGERPRINT.digest, chunks=ours.chunks)
    store.put(manifest_object_key(ours.doc_id), claimed.to_json())  # edited: its signature no longer holds
    assert node.hit_tokens(tokens) == 0 and node.index.take_untrusted() == {"bad_signature": 1}

    stranger = PublisherKey.generate()
    for key, reason in ((None, "unsigned"), (stranger, "unknown_publisher")):
        doc_tokens, doc_kv = _document(4 if key is None else 5)
        _publish(url, doc_tokens, doc_kv, key)
        assert node.hit_tokens(doc_tokens) == 0 and node.index.take_untrusted() == {reason: 1}
    assert Manifest.from_json(store.get(manifest_object_key(ours.doc_id))).signature  # the replay stays signed
    _publish(url, tokens, kv, publisher)  # the publisher republishes: served again
    assert node.hit_tokens(tokens) == DOC_TOKENS and node.index.num_untrusted == 2


def test_a_private_document_is_served_only_with_its_tenant_key_and_stays_sealed_on_the_nodes_disk(
        s3, bucket, publisher, tmp_path):
    name, url = bucket
    tenant = FileTenantKey.generate()
    tenant.save(tmp_path / "tenant.key")
    tokens, kv = _document(6)
    manifest = _publish(url, tokens, kv, publisher, keys=TenantKeys([tenant])).manifest
    assert manifest.tenant_key == tenant.key_id

    outsider = Node(url, publisher, tmp_path / "outsider")
    assert outsider.hit_tokens(tokens) == 0 and outsider.index.take_untrusted() == {"no_tenant_key": 1}

    node = Node(url, publisher, tmp_path / "tenant", tenant_key=str(tmp_path / "tenant.key"))
    assert node.hit_tokens(tokens) == DOC_TOKENS
    failed, spec = node.load(tokens)
    assert failed == set() and node.holds(spec, kv) and node.failures() == {}
    disk = tmp_path / "tenant" / "disk"
    chunk_files = [p for p in disk.rglob("*.safetensors")]
    assert len(chunk_files) == 4 and all(is_sealed(p.read_bytes()) for p in chunk_files)
    assert not list(disk.rglob("*.img")) and not list(disk.rglob("*.tail"))  # engine copies: RAM only
    hot_failed, hot = node.load(tokens)
    assert hot_failed == set() and node.holds(hot, kv)

    # A byte of one sealed chunk flipped in the bucket: a node reading it fresh refuses it.
    client = s3.client()
    key = f"docs/{chunk_object_key(manifest.chunks[2].key)}"
    data = bytearray(client.get_object(Bucket=name, Key=key)["Body"].read())
    data[-100] ^= 1
    client.put_object(Bucket=name, Key=key, Body=bytes(data))
    fresh = Node(url, publisher, tmp_path / "fresh", tenant_key=str(tmp_path / "tenant.key"))
    assert fresh.hit_tokens(tokens) == DOC_TOKENS
    failed, _ = fresh.load(tokens)
    assert failed == {2, 3} and fresh.failures() == {"decrypt": 1}
