"""Signed manifests and the trust policy (artifact/provenance.py), `kvcdn keygen`, and what a
publish does with a stored chunk it did not write (artifact/documents.py): no engine, a
real file store."""

from __future__ import annotations

import os
import stat
from dataclasses import replace

import pytest
import torch

from tests.rigs.forgery import forged_chunk
from vllm_kvcdn.artifact.chain import document_chunks
from vllm_kvcdn.artifact.chunk_format import decode_chunk
from vllm_kvcdn.artifact.documents import read_chunk, write_document
from vllm_kvcdn.artifact.index import ChunkIndex
from vllm_kvcdn.artifact.manifest import ArtifactError, Manifest, ManifestChunk
from vllm_kvcdn.artifact.provenance import PublisherKey, TrustPolicy, parse_public_key, policy_for
from vllm_kvcdn.cli.main import main as kvcdn
from vllm_kvcdn.config import KVCDNConfig
from vllm_kvcdn.store.file import FileStore
from vllm_kvcdn.store.keys import chunk_object_key, manifest_object_key

FP = "a" * 64
CHUNK = 16


@pytest.fixture(scope="module")
def key() -> PublisherKey:
    return PublisherKey.generate()


def _manifest(checksum: str = "blake3:" + "1" * 64) -> Manifest:
    chunk = ManifestChunk("b" * 64, "c" * 64, 16, 100, checksum)
    return Manifest(doc_id="b" * 64, fingerprint=FP, num_tokens=16, chunk_size=16, chunks=[chunk],
                    profile={"dtype": "bfloat16", "nested": {"x": [1, 2.5]}}, created=1733600000.123456,
                    metadata={"title": "ünïcode"})


def test_a_signed_manifest_survives_its_json_and_every_field_is_covered(key):
    signed = key.sign(_manifest())
    trust = TrustPolicy(frozenset({key.public_hex}), allow_unsigned=False)
    stored = Manifest.from_json(signed.to_json())
    assert stored.publisher == key.public_hex and trust.verdict(stored) is None
    tampered = [
        replace(stored, fingerprint="d" * 64),
        replace(stored, chunks=[replace(stored.chunks[0], checksum="blake3:" + "2" * 64)]),
        replace(stored, chunks=[replace(stored.chunks[0], key="e" * 64)]),
        replace(stored, created=stored.created + 1),
        replace(stored, metadata={"title": "other"}),
    ]
    assert [trust.verdict(m) for m in tampered] == ["bad_signature"] * len(tampered)
    other = PublisherKey.generate()
    assert trust.verdict(other.sign(_manifest())) == "unknown_publisher"
    # Claiming a trusted key without its signature:
    assert trust.verdict(replace(other.sign(_manifest()), publisher=key.public_hex)) == "bad_signature"


def test_unsigned_documents_are_served_only_where_allowed_and_weak_checksums_never_under_a_signature(key):
    unsigned = _manifest()
    assert TrustPolicy(allow_unsigned=True).verdict(unsigned) is None
    assert TrustPolicy(allow_unsigned=False).verdict(unsigned) == "unsigned"
    assert TrustPolicy(allow_unsigned=True).verdict(replace(unsigned, publisher=key.public_hex)) == "unsigned"
    weak = key.sign(_manifest(checksum="xxh3_128:" + "1" * 32))
    assert TrustPolicy(frozenset({key.public_hex})).verdict(weak) == "weak_checksum"


def test_a_shared_bucket_needs_signatures_by_default_and_a_server_trusts_its_own_key(tmp_path, key):
    path = tmp_path / "k.pem"
    key.save(path)
    signer, s3 = policy_for("s3://bucket/prefix", signing_key=str(path))
    assert signer.public_hex == key.public_hex and s3.publishers == {key.public_hex} and s3.requires_signatures
    _, local = policy_for("file:///tmp/store")
    assert not local.requires_signatures and not local.publishers
    other = PublisherKey.generate()
    (tmp_path / "other.pub").write_text(other.public_hex + "\n")
    config = KVCDNConfig(store_url="s3://b/p", trusted_publishers=[str(tmp_path / "other.pub"), key.public_hex.upper()],
                         allow_unsigned=True)
    assert config.trust_policy() == TrustPolicy(frozenset({other.public_hex, key.public_hex}), True)
    with pytest.raises(ValueError, match="neither a 64-hex-digit"):
        KVCDNConfig(trusted_publishers=["not-a-key"])
    with pytest.raises(ValueError, match="kvcdn keygen"):
        KVCDNConfig(signing_key=str(tmp_path / "missing.pem"))


def test_keygen_writes_a_private_key_only_its_owner_reads_and_never_overwrites(tmp_path, capsys):
    path = tmp_path / "publisher.pem"
    kvcdn(["keygen", str(path)])
    public = (tmp_path / "publisher.pem.pub").read_text().strip()
    assert public in capsys.readouterr().out and parse_public_key(str(tmp_path / "publisher.pem.pub")) == public
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert PublisherKey.load(path).public_hex == public
    with pytest.raises(SystemExit, match="never overwrites"):
        kvcdn(["keygen", str(path)])


def _document(seed: int, tokens: list[int]):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(len(tokens), 2, 8, generator=gen).to(torch.bfloat16),
             torch.randn(len(tokens), 2, 8, generator=gen).to(torch.bfloat16)) for _ in range(2)]


def _publish(store, tokens, kv, key=None, vouched=None):
    spans = document_chunks(tokens, FP, None, CHUNK)
    return write_document(store, spans=spans, tokens=tokens, kv=kv, fingerprint=FP, profile={}, chunk_size=CHUNK,
                          producer={}, signer=key, vouched=vouched)


def test_a_publish_replaces_forged_chunks_stored_before_it_and_keeps_vouched_ones(tmp_path, key):
    store = FileStore(tmp_path / "store", durable=False)
    tokens = list(range(40))  # two whole chunks and an 8-token tail
    kv = _document(0, tokens)
    honest = _publish(FileStore(tmp_path / "elsewhere", durable=False), tokens, kv).manifest
    # The attacker computes the keys (a public function of the tokens) and stores forgeries first.
    for c in honest.chunks:
        data = (tmp_path / "elsewhere" / chunk_object_key(c.key)).read_bytes()
        store.put(chunk_object_key(c.key), forged_chunk(data))
    written = _publish(store, tokens, kv, key)
    assert written.replaced_chunks == len(honest.chunks) == written.new_chunks
    manifest = written.manifest
    assert [c.checksum for c in manifest.chunks] == [c.checksum for c in honest.chunks]
    start = 0
    for c in manifest.chunks:  # what is stored now is the publisher's KV
        kept, _ = read_chunk(store, c.key, expected_checksum=c.checksum)
        assert torch.equal(kept.keys[0], kv[0][0][start : start + c.num_tokens])
        start += c.num_tokens

    # Another document sharing the first chunk, whose pass computed other last bits there:
    # a trusted manifest records the stored chunk, so it is kept and recorded as stored.
    longer = tokens[:16] + list(range(100, 140))
    other_kv = [(torch.cat([k[:16] + 1, k2]), torch.cat([v[:16], v2]))
                for (k, v), (k2, v2) in zip(kv, _document(1, longer[16:]))]
    index = ChunkIndex(store, FP, CHUNK, trust=TrustPolicy(frozenset({key.public_hex}), False))
    index.refresh(force=True)
    spans = document_chunks(longer, FP, None, CHUNK)
    again = _publish(store, longer, other_kv, key, vouched={
        k: list(parts.values()) for k, parts in index.vouched([s.key for s in spans]).items()})
    assert again.replaced_chunks == 0 and again.manifest.chunks[0].checksum == manifest.chunks[0].checksum
    # Without the vouching manifest it would have been replaced (and said so).
    third = _publish(FileStore(tmp_path / "store", durable=False), longer, other_kv, key)
    assert third.replaced_chunks == 1


def test_a_chunk_whose_checksum_is_not_its_manifests_is_refused_even_when_self_consistent(tmp_path, key):
    store = FileStore(tmp_path / "store", durable=False)
    tokens = list(range(20))
    manifest = _publish(store, tokens, _document(0, tokens), key).manifest
    first = manifest.chunks[0]
    path = tmp_path / "store" / chunk_object_key(first.key)
    forged = forged_chunk(path.read_bytes())
    decode_chunk(forged, key=first.key, tokens=tokens[:16])  # passes every check it can make of itself
    path.write_bytes(forged)
    with pytest.raises(ArtifactError) as refused:
        read_chunk(store, first.key, expected_checksum=first.checksum)
    assert refused.value.reason == "provenance"
    # A copy of the signed manifest under another document's name is not served either.
    index = ChunkIndex(store, FP, CHUNK, trust=TrustPolicy(frozenset({key.public_hex}), False))
    store.put(manifest_object_key("f" * 64), manifest.to_json())
    index.refresh(force=True)
    assert index.num_documents == 1 and index.take_untrusted() == {"misplaced": 1}
    assert index.match(tokens + [1], None).chunks[0].checksums == (("", first.checksum),)
