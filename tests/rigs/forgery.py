"""What an attacker with write access to a shared bucket, and no signing key, can make:
chunks in the public format that pass every check a chunk can make of itself."""

from __future__ import annotations

from vllm_kvcdn.artifact.chunk_format import decode_chunk, encode_chunk, read_chunk_header


def forged_chunk(data: bytes) -> bytes:
    """A chunk object with the same key, parent, fingerprint, tokens, shapes and codec as
    ``data``, other K/V (every value negated, plus one), and a correct checksum of its new
    data: self-consistent, so only a checksum recorded elsewhere (the signed manifest) can
    refuse it."""
    header, _, _ = read_chunk_header(data)
    kv = decode_chunk(data)
    keys = [(1 - k.float()).to(k.dtype) for k in kv.keys]
    values = [(1 - v.float()).to(v.dtype) for v in kv.values]
    forged, _ = encode_chunk(header.key, header.parent, header.fingerprint, kv.tokens.tolist(), keys, values,
                             codec=header.codec or None, part=header.part)
    return bytes(forged)
