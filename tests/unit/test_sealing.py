"""Private documents sealed at rest (artifact/sealing.py): the envelope, what a server
without the tenant key sees, and a private publish through the store's tiers (no engine,
real files)."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from vllm_kvcdn.artifact.chain import document_chunks
from vllm_kvcdn.artifact.documents import read_chunk, write_document
from vllm_kvcdn.artifact.index import ChunkIndex
from vllm_kvcdn.artifact.manifest import ArtifactError
from vllm_kvcdn.artifact.sealing import MAGIC, NO_KEYS, FileTenantKey, TenantKeys, is_sealed, object_context
from vllm_kvcdn.cli.main import main as kvcdn
from vllm_kvcdn.store import open_store
from vllm_kvcdn.store.keys import chunk_object_key

FP = "a" * 64
CHUNK = 16
CONTEXT = object_context("b" * 64)


@pytest.fixture(scope="module")
def keys() -> TenantKeys:
    return TenantKeys([FileTenantKey.generate()])


def test_a_sealed_object_opens_only_with_its_key_under_its_own_name(keys):
    plain = os.urandom(1000)
    sealed = keys.seal(plain, CONTEXT)
    assert is_sealed(sealed) and plain not in sealed and keys.open(sealed, CONTEXT) == plain
    assert keys.seal(plain, CONTEXT) != sealed  # a fresh data key and nonce every time
    reasons = []
    for data, context, holder in (
        (sealed, object_context("c" * 64), keys),  # copied under another chunk's name
        (sealed, object_context("b" * 64, "h0-1of2"), keys),  # or another part's
        (sealed[:-1] + bytes([sealed[-1] ^ 1]), CONTEXT, keys),  # the tag
        (sealed[:200] + bytes([sealed[200] ^ 1]) + sealed[201:], CONTEXT, keys),  # the ciphertext
        (sealed[:50] + bytes([sealed[50] ^ 1]) + sealed[51:], CONTEXT, keys),  # the wrapped data key
        (sealed, CONTEXT, TenantKeys([FileTenantKey.generate()])),  # another tenant
        (sealed, CONTEXT, NO_KEYS),
    ):
        with pytest.raises(ArtifactError) as e:
            holder.open(data, context)
        reasons.append(e.value.reason)
    assert reasons == ["decrypt"] * 5 + ["no_tenant_key"] * 2


def test_a_rotated_out_key_still_opens_and_the_first_key_seals(keys):
    new = FileTenantKey.generate()
    rotated = TenantKeys([new, keys.sealer])
    assert rotated.open(keys.seal(b"old", CONTEXT), CONTEXT) == b"old"
    assert MAGIC + len(new.key_id).to_bytes(2, "little") + new.key_id.encode() == rotated.seal(b"x", CONTEXT)[:42]


def test_keygen_makes_a_tenant_key_only_its_owner_reads(tmp_path, capsys):
    path = tmp_path / "tenant.key"
    kvcdn(["keygen", "--tenant", str(path)])
    key = FileTenantKey.load(path)
    assert key.key_id in capsys.readouterr().out and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert not (tmp_path / "tenant.key.pub").exists()


def _kv(tokens: int):
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(tokens, 2, 8, generator=gen).to(torch.bfloat16),
             torch.randn(tokens, 2, 8, generator=gen).to(torch.bfloat16)) for _ in range(2)]


def test_a_private_document_is_sealed_in_the_store_and_the_disk_tier_and_served_only_with_the_key(
        tmp_path, keys):
    store = open_store(f"file://{tmp_path / 'store'}")
    tokens = list(range(40))
    kv = _kv(len(tokens))
    manifest = write_document(store, spans=document_chunks(tokens, FP, "tenant-salt", CHUNK), tokens=tokens, kv=kv,
                              fingerprint=FP, profile={}, chunk_size=CHUNK, producer={}, salted=True, keys=keys,
                              private=True).manifest
    assert manifest.encryption == {"alg": "AES-256-GCM", "tenant": keys.sealer.key_id}
    first = manifest.chunks[0]
    stored = (tmp_path / "store" / chunk_object_key(first.key)).read_bytes()
    assert is_sealed(stored) and b"layers.0.k" not in stored  # not even the safetensors header in the clear
    chunk, nbytes = read_chunk(store, first.key, keys=keys, expected_checksum=first.checksum, tokens=tokens[:16])
    assert torch.equal(chunk.keys[1], kv[1][0][:16]) and nbytes == first.nbytes == len(stored)
    with pytest.raises(ArtifactError, match="does not hold"):
        read_chunk(store, first.key)

    # A node's disk tier keeps what the store holds: sealed.
    node = open_store(f"file://{tmp_path / 'store'}", disk_cache_dir=str(tmp_path / "disk"), disk_cache_gib=1)
    read_chunk(node, first.key, keys=keys, expected_checksum=first.checksum)
    assert is_sealed((tmp_path / "disk" / chunk_object_key(first.key)).read_bytes())

    # A server without the key never matches it (counted); one with it does, and knows it is private.
    for held, served in ((NO_KEYS, 0), (keys, len(tokens))):
        index = ChunkIndex(store, FP, CHUNK, keys=held)
        index.refresh(force=True)
        match = index.match(tokens + [1], "tenant-salt")
        assert match.num_tokens == served
        assert index.take_untrusted() == ({} if served else {"no_tenant_key": 1})
    assert all(c.private for c in match.chunks)
