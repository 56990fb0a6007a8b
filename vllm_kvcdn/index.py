"""The scheduler's index of published chunks, rebuilt from manifests.

It answers one question fast: how many leading tokens of this prompt are covered by
published chunks of this fingerprint and salt? Full chunks are found by key; a
document's partial last chunk is found by trying the tail lengths published after
the current parent key.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from vllm_kvcdn.artifact import ArtifactError, Manifest
from vllm_kvcdn.chain import ChunkSpan, chain_seed, chunk_key
from vllm_kvcdn.log import get_logger
from vllm_kvcdn.store import Store, StoreError

logger = get_logger(__name__)

MANIFEST_PREFIX = "manifests/"


def chunk_object_key(key: str) -> str:
    return f"chunks/{key[:2]}/{key}.safetensors"


def manifest_object_key(doc_id: str) -> str:
    return f"{MANIFEST_PREFIX}{doc_id}.json"


def verify_report_key(doc_id: str) -> str:
    return f"verify/{doc_id}.json"


@dataclass(frozen=True)
class IndexedChunk:
    num_tokens: int
    nbytes: int
    doc_id: str


@dataclass
class Match:
    spans: list[ChunkSpan] = field(default_factory=list)
    doc_id: str | None = None  # the document whose chunk ends the match

    @property
    def num_tokens(self) -> int:
        return self.spans[-1].end if self.spans else 0


class ChunkIndex:
    def __init__(self, store: Store, fingerprint: str, chunk_size: int, refresh_interval_s: float = 2.0):
        self.store = store
        self.fingerprint = fingerprint
        self.chunk_size = chunk_size
        self.refresh_interval_s = refresh_interval_s
        self._chunks: dict[str, IndexedChunk] = {}
        self._tails: dict[str, set[int]] = {}  # parent key -> partial chunk lengths
        self._version: object = object()
        self._refreshed_at = 0.0
        self.num_documents = 0
        self.num_foreign = 0  # manifests under another fingerprint or chunk size

    def refresh(self, force: bool = False) -> None:
        """Rebuild from the store's manifests when they changed (cheap check)."""
        try:
            version = self.store.version(MANIFEST_PREFIX)
            stale = version is None and time.monotonic() - self._refreshed_at > self.refresh_interval_s
            if not force and version is not None and version == self._version and not stale:
                return
            if not force and version is None and not stale:
                return
            self._rebuild()
            self._version = version
            self._refreshed_at = time.monotonic()
        except StoreError as e:
            logger.warning("kvcdn: store unavailable, keeping the old index: %s", e)

    def _rebuild(self) -> None:
        chunks: dict[str, IndexedChunk] = {}
        tails: dict[str, set[int]] = {}
        docs = foreign = 0
        for key in self.store.list(MANIFEST_PREFIX):
            data = self.store.get(key)
            if data is None:
                continue  # deleted while we listed
            try:
                manifest = Manifest.from_json(data)
            except ArtifactError as e:
                logger.warning("kvcdn: skipping manifest %s: %s", key, e)
                continue
            if manifest.fingerprint != self.fingerprint or manifest.chunk_size != self.chunk_size:
                foreign += 1
                continue
            docs += 1
            self._add(manifest, chunks, tails)
        self._chunks, self._tails = chunks, tails
        self.num_documents, self.num_foreign = docs, foreign
        logger.info(
            "kvcdn: index holds %d documents, %d chunks (%d manifests of other models/settings)",
            docs, len(chunks), foreign,
        )

    def add(self, manifest: Manifest) -> None:
        if manifest.fingerprint == self.fingerprint and manifest.chunk_size == self.chunk_size:
            self._add(manifest, self._chunks, self._tails)

    def _add(self, manifest: Manifest, chunks: dict, tails: dict) -> None:
        for c in manifest.chunks:
            chunks.setdefault(c.key, IndexedChunk(c.num_tokens, c.nbytes, manifest.doc_id))
            if c.num_tokens < manifest.chunk_size:
                tails.setdefault(c.parent, set()).add(c.num_tokens)

    def match(self, tokens: Sequence[int], cache_salt: str | None) -> Match:
        """The longest run of published chunks that prefixes ``tokens``: whole chunks
        while they match, then the longest published tail hanging off the last one."""
        result = Match()
        if not self._chunks:
            return result
        parent, pos = chain_seed(self.fingerprint, cache_salt), 0
        while self._extend(result, tokens, parent, pos, self.chunk_size):
            parent, pos = result.spans[-1].key, result.spans[-1].end
        for n in sorted(self._tails.get(parent, ()), reverse=True):
            if self._extend(result, tokens, parent, pos, n):
                break
        return result

    def _extend(self, result: Match, tokens: Sequence[int], parent: str, pos: int, n: int) -> bool:
        """Append the chunk of ``n`` tokens at ``pos`` if it is published."""
        if pos + n > len(tokens):
            return False
        key = chunk_key(parent, tokens[pos : pos + n])
        entry = self._chunks.get(key)
        if entry is None or entry.num_tokens != n:
            return False
        result.spans.append(ChunkSpan(key, parent, pos, n))
        result.doc_id = entry.doc_id
        return True
