"""Chunk keys: a hash chain over token ids.

``h_0 = H("kvcdn/1", fingerprint, salt[, adapter])`` and ``h_i = H(h_{i-1}, tokens of chunk i)``.
A key therefore names one exact token prefix under one model fingerprint, one
``cache_salt`` and one LoRA adapter (by a digest of its files, ``adapters``): another
model, dtype, tenant or adapter can never produce the same key.
A document's last chunk may be shorter than the chunk size; it is keyed the same
way by its exact tokens, so a hit can cover the whole document.
"""

from __future__ import annotations

import hashlib
import re
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

CHAIN_VERSION = b"kvcdn/1"
_KEY = re.compile(r"[0-9a-f]{64}")  # a sha256 hex digest: chunk keys and document ids


def is_chunk_key(value: object) -> bool:
    """Whether ``value`` can be a chunk key or document id (and so a safe store key part)."""
    return isinstance(value, str) and _KEY.fullmatch(value) is not None


@dataclass(frozen=True)
class ChunkSpan:
    """One chunk of a token sequence: its key, its parent's key and its place."""

    key: str
    parent: str
    start: int
    num_tokens: int

    @property
    def end(self) -> int:
        return self.start + self.num_tokens


def chain_seed(fingerprint: str, cache_salt: str | None, adapter: str | None = None) -> str:
    """The parent key of a sequence's first chunk (``adapter``: the LoRA adapter's digest,
    None for the base model)."""
    h = hashlib.sha256(CHAIN_VERSION)
    h.update(b"\0fp\0" + fingerprint.encode())
    h.update(b"\0salt\0" + (cache_salt or "").encode())
    if adapter:
        h.update(b"\0adapter\0" + adapter.encode())
    return h.hexdigest()


def chunk_key(parent: str, tokens: Sequence[int]) -> str:
    """The key of a chunk holding ``tokens`` right after the prefix named ``parent``."""
    h = hashlib.sha256(bytes.fromhex(parent))
    h.update(struct.pack(f"<{len(tokens)}I", *tokens))
    return h.hexdigest()


def iter_chunks(
    tokens: Sequence[int], seed: str, chunk_size: int, *, include_partial: bool = True
) -> Iterator[ChunkSpan]:
    """Walk ``tokens`` in chunks of ``chunk_size``; the last one may be partial."""
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    parent = seed
    for start in range(0, len(tokens), chunk_size):
        piece = tokens[start : start + chunk_size]
        if len(piece) < chunk_size and not include_partial:
            return
        key = chunk_key(parent, piece)
        yield ChunkSpan(key=key, parent=parent, start=start, num_tokens=len(piece))
        parent = key


def document_chunks(
    tokens: Sequence[int], fingerprint: str, cache_salt: str | None, chunk_size: int, adapter: str | None = None
) -> list[ChunkSpan]:
    """All chunks of a document, the partial tail included."""
    return list(iter_chunks(tokens, chain_seed(fingerprint, cache_salt, adapter), chunk_size))
