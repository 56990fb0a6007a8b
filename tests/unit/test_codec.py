"""Artifact format v2: compressed chunks that decode to exactly their v1 twin; damage,
truncation and unknown codecs refused with the reasons loads count."""

from __future__ import annotations

import pytest
import torch

from vllm_kvcdn.artifact import codec
from vllm_kvcdn.artifact.chunk_format import COMPRESSED_FORMAT, as_v1, decode_chunk, encode_chunk, read_chunk_header
from vllm_kvcdn.artifact.manifest import ArtifactError

CODECS = ["zstd:1", "zstd:3", "zstd:9", "lz4", "zlib:6"]


def kv(dtype=torch.bfloat16, tokens=64, layers=3, heads=2, dim=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    keys = [torch.randn(tokens, heads, dim, generator=gen).to(dtype) for _ in range(layers)]
    values = [torch.randn(tokens, heads, dim, generator=gen).to(dtype) for _ in range(layers)]
    return keys, values


def encode(codec_spec, dtype=torch.bfloat16, **kw):
    keys, values = kv(dtype, **kw)
    return encode_chunk("ab" * 32, "cd" * 32, "fp" * 16, list(range(keys[0].shape[0])), keys, values,
                        codec=codec_spec)


@pytest.mark.parametrize("spec", CODECS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn])
def test_a_compressed_chunk_decodes_to_its_uncompressed_twin(spec, dtype):
    raw, raw_header = encode(None, dtype)
    packed, header = encode(spec, dtype)
    assert read_chunk_header(packed)[0].codec == spec and header.checksum == raw_header.checksum
    assert as_v1(packed) == raw  # byte for byte
    got, want = decode_chunk(packed, dtype=dtype), decode_chunk(raw)
    for a, b in zip(got.keys + got.values, want.keys + want.values):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def test_bf16_kv_shrinks_and_byte_planes_help():
    raw, _ = encode(None, tokens=256)
    packed, _ = encode("zstd:3", tokens=256)
    data = raw[-256 * 3 * 2 * 2 * 32 * 2:]  # the K/V bytes
    interleaved = codec.parse("zstd:3").compress(data)
    assert len(packed) < len(interleaved) < len(raw)  # normal bf16: the exponent plane compresses


def test_decoding_into_the_buffer_that_holds_the_stream():
    packed, _ = encode("zstd:3")
    raw, _ = encode(None)
    buffer = memoryview(bytearray(len(raw)))
    buffer[: len(packed)] = packed
    got = decode_chunk(buffer[: len(packed)], out=buffer)
    assert got.keys[0].untyped_storage().data_ptr() == torch.frombuffer(buffer, dtype=torch.uint8).data_ptr() + 4 * 64
    assert all(torch.equal(a, b) for a, b in zip(got.keys, decode_chunk(raw).keys))


def test_damage_truncation_and_unknown_codecs_are_refused_with_a_reason():
    packed, _ = encode("zstd:3")
    flipped = bytearray(packed)
    flipped[-20] ^= 0x40
    with pytest.raises(ArtifactError) as e:
        decode_chunk(bytes(flipped))
    assert e.value.reason == "checksum"
    with pytest.raises(ArtifactError) as e:
        decode_chunk(packed[:-100])
    assert e.value.reason == "truncated"  # as for an uncompressed chunk
    unknown = packed.replace(b'"codec":"zstd:3"', b'"codec":"zstd:X"')
    with pytest.raises(ArtifactError) as e:
        decode_chunk(unknown)
    assert e.value.reason == "format"
    assert COMPRESSED_FORMAT.encode() in packed


def test_a_bad_codec_setting_names_the_choices():
    from vllm_kvcdn.config import KVCDNConfig

    with pytest.raises(ValueError, match="zstd"):
        KVCDNConfig(codec="brotli")
    assert KVCDNConfig(store_url="s3://bucket/x").chunk_codec == codec.DEFAULT
    assert KVCDNConfig(store_url="file:///tmp/x").chunk_codec is None
    assert KVCDNConfig(store_url="file:///tmp/x", codec="lz4").chunk_codec == "lz4"
