"""The chunk file and manifest formats: exact bytes, round trips, and every refusal."""

import hashlib
import struct

import pytest
import torch
from safetensors import safe_open

from vllm_kvcdn.artifact.chunk_format import decode_chunk, encode_chunk, read_chunk_header
from vllm_kvcdn.artifact.manifest import ArtifactError, Manifest, ManifestChunk

PINNED_SHA256 = "88ed90cebc5dcb07376a555693cc203c2f89aa524f4448982ea9d1c452192fa1"
PINNED_CHECKSUM = "57691d3c00eefbcf44ed5a18ced633fb5b93705fa11ba960fc6ac850b295d237"


def tiny_kv(layers=2, tokens=3, heads=2, dim=4, dtype=torch.bfloat16):
    n = tokens * heads * dim
    keys = [(torch.arange(n) + 100 * i).view(tokens, heads, dim).to(dtype) for i in range(layers)]
    values = [(-torch.arange(n) - 100 * i).view(tokens, heads, dim).to(dtype) for i in range(layers)]
    return keys, values


def encode(**kw):
    keys, values = tiny_kv(**kw)
    return encode_chunk("ab" * 32, "cd" * 32, "fp" * 16, list(range(7, 7 + keys[0].shape[0])), keys, values)


def test_exact_bytes_are_pinned():
    data, header = encode()
    # Canonical output: same KV, same bytes. A change here is a format change.
    assert hashlib.sha256(data).hexdigest() == PINNED_SHA256
    assert header.checksum == "blake3:" + PINNED_CHECKSUM
    (head_len,) = struct.unpack("<Q", data[:8])
    assert head_len % 8 == 0 and len(data) == 8 + head_len + 3 * 4 + 2 * 2 * 3 * 2 * 4 * 2


def test_safetensors_can_read_our_files(tmp_path):
    data, _ = encode()
    path = tmp_path / "c.safetensors"
    path.write_bytes(data)
    keys, values = tiny_kv()
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["format"] == "kvcdn.chunk/1"
        assert torch.equal(f.get_tensor("layers.1.k"), keys[1])
        assert torch.equal(f.get_tensor("layers.0.v"), values[0])
        assert f.get_tensor("tokens").tolist() == [7, 8, 9]


def test_round_trip_checks_every_expectation():
    data, _ = encode()
    kv = decode_chunk(bytearray(data), key="ab" * 32, fingerprint="fp" * 16, dtype=torch.bfloat16,
                      num_layers=2, num_kv_heads=2, head_dim=4, tokens=[7, 8, 9])
    keys, values = tiny_kv()
    assert all(torch.equal(a, b) for a, b in zip(kv.keys + kv.values, keys + values))
    assert kv.header.num_tokens == 3 and kv.header.parent == "cd" * 32


@pytest.mark.parametrize(
    "expect,reason",
    [
        ({"fingerprint": "other"}, "fingerprint"),
        ({"dtype": torch.float16}, "mismatch"),
        ({"num_layers": 3}, "mismatch"),
        ({"key": "ef" * 32}, "mismatch"),
        ({"tokens": [7, 8, 10]}, "token_mismatch"),
    ],
)
def test_mismatches_are_refused(expect, reason):
    data, _ = encode()
    with pytest.raises(ArtifactError) as e:
        decode_chunk(data, **expect)
    assert e.value.reason == reason


def test_flipped_byte_fails_the_checksum():
    data = bytearray(encode()[0])
    data[-3] ^= 1
    with pytest.raises(ArtifactError) as e:
        decode_chunk(data)
    assert e.value.reason == "checksum"


@pytest.mark.parametrize("cut", [1, 40, 10_000])
def test_truncated_file_is_refused(cut):
    data = encode()[0]
    with pytest.raises(ArtifactError) as e:
        decode_chunk(data[: max(0, len(data) - cut)])
    assert e.value.reason == "truncated"


def test_other_format_version_is_refused():
    data = encode()[0].replace(b"kvcdn.chunk/1", b"kvcdn.chunk/9")
    with pytest.raises(ArtifactError) as e:
        read_chunk_header(data)
    assert e.value.reason == "format"


def test_manifest_round_trip_and_validation():
    m = Manifest(doc_id="d" * 64, fingerprint="fp", num_tokens=300, chunk_size=256,
                 chunks=[ManifestChunk("a", "s", 256, 10, "x"), ManifestChunk("b", "a", 44, 5, "y")])
    back = Manifest.from_json(m.to_json())
    assert back == m and back.total_bytes == 15
    broken = m.to_json().replace(b'"num_tokens": 300', b'"num_tokens": 301')
    with pytest.raises(ArtifactError):
        Manifest.from_json(broken)
    with pytest.raises(ArtifactError):
        Manifest.from_json(b"{not json")
