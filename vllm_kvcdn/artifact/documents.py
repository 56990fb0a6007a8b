"""Reading and writing documents in a store: the one protocol every producer and reader uses
(the vLLM worker, the transformers path, the catalog and the side API).

Writing: chunks first, content-addressed (an intact stored chunk is kept: other
documents' manifests record its checksum; a missing or damaged one is replaced), the
manifest last, so a crash never leaves a manifest pointing at missing chunks.
Reading: one chunk at a time, every expectation given checked (checksum, fingerprint,
dtype, shape, the request's tokens).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from vllm_kvcdn.artifact.chain import ChunkSpan
from vllm_kvcdn.artifact.chunk_format import ChunkKV, as_v1, decode_chunk, encode_chunk
from vllm_kvcdn.artifact.manifest import ArtifactError, ChunkPart, Manifest, ManifestChunk
from vllm_kvcdn.artifact.parts import KVPart
from vllm_kvcdn.log import get_logger
from vllm_kvcdn.store import Store
from vllm_kvcdn.store.keys import chunk_object_key, manifest_object_key

logger = get_logger(__name__)

# Per layer, (K, V) of the whole document on the CPU, each [tokens, kv_heads, head_dim].
DocumentKV = list[tuple[torch.Tensor, torch.Tensor]]


def read_chunk(store: Store, key: str, into: memoryview | None = None, part: str = "",
               **expect) -> tuple[ChunkKV, int]:
    """(the decoded chunk, or its ``part``; its stored size); ``expect`` as ``decode_chunk``'s
    checks (the part is one); read into ``into`` when it fits (the chunk's tensors then view
    it; ``Store.get``). A missing chunk is an ``ArtifactError("missing")`` like any other
    unusable one. A local copy (disk tier) that fails its checks is dropped and the origin
    read once."""
    object_key = chunk_object_key(key, part)
    for attempt in range(2):
        data = store.get(object_key, into)
        if data is None:
            raise ArtifactError("missing", f"chunk {key[:16]}{' part ' + part if part else ''} is missing "
                                           f"from {store.url}")
        try:
            return decode_chunk(data, key=key, out=into, part=part, **expect), len(data)
        except ArtifactError as e:
            if attempt or e.reason not in ("checksum", "truncated", "format") or not store.drop_cached(object_key):
                raise
            logger.warning("kvcdn: the local copy of chunk %s is damaged (%s); reading it from %s again",
                           key[:16], e, store.url)
    raise AssertionError("unreachable")


def read_whole_chunk(store: Store, entry: ManifestChunk, num_kv_heads: int, **expect) -> ChunkKV:
    """A chunk with all ``num_kv_heads`` heads, from its one object or joined from its
    tensor-parallel parts (each checked, in head order): how a reader that runs every head
    (the transformers path) uses a TP publish."""
    if not entry.parts:
        return read_chunk(store, entry.key, num_kv_heads=num_kv_heads, **expect)[0]
    pieces = []
    for part in entry.parts:
        heads = KVPart.parse(part.name, num_kv_heads)
        pieces.append(read_chunk(store, entry.key, part=part.name, num_kv_heads=heads.num_heads, **expect)[0])
    first = pieces[0]
    return ChunkKV(header=first.header, tokens=first.tokens,
                   keys=[torch.cat(ks, dim=1) for ks in zip(*(p.keys for p in pieces))],
                   values=[torch.cat(vs, dim=1) for vs in zip(*(p.values for p in pieces))])


def encode_span(span: ChunkSpan, fingerprint: str, tokens: Sequence[int], kv: DocumentKV, codec: str | None = None,
                part: str = ""):
    """(bytes, header) of the chunk ``span`` of a document whose KV is ``kv`` (compressed
    with ``codec``: format v2; ``kv`` holds ``part``'s heads only when one is named)."""
    s, e = span.start, span.end
    return encode_chunk(span.key, span.parent, fingerprint, tokens[s:e],
                        [k[s:e].contiguous() for k, _ in kv], [v[s:e].contiguous() for _, v in kv], codec=codec,
                        part=part)


def keep_or_put_chunk(store: Store, entry: ManifestChunk, data: bytes, fingerprint: str,
                      tokens: Sequence[int], part: str = "") -> tuple[ManifestChunk, bool]:
    """Content-addressed write of one chunk (or part); returns the manifest entry of what
    is stored, and whether it was written. The first writer wins: when another server
    stores the chunk meanwhile, its copy is kept and recorded."""
    object_key = chunk_object_key(entry.key, part)

    def stored() -> ManifestChunk:
        kept, nbytes = read_chunk(store, entry.key, part=part, fingerprint=fingerprint, tokens=tokens)  # checksum too
        return replace(entry, nbytes=nbytes, checksum=kept.header.checksum)

    try:
        return stored(), False
    except ArtifactError as e:
        if e.reason != "missing":
            logger.warning("kvcdn: replacing damaged chunk %s: %s", entry.key[:16], e)
            store.put(object_key, data)
            return entry, True
    if store.put_if_absent(object_key, data):
        return entry, True
    return stored(), False


@dataclass
class Written:
    chunks: list[ManifestChunk]  # what is stored for each chunk (of one part: its size and checksum)
    new_chunks: int  # chunks this write stored (the others were there, intact)
    new_bytes: int
    seconds: float
    manifest: Manifest | None = None  # written by ``write_document``, not by ``write_chunks``


def write_chunks(store: Store, *, spans: list[ChunkSpan], tokens: Sequence[int], kv: DocumentKV, fingerprint: str,
                 codec: str | None = None, part: str = "") -> Written:
    """Store a document's chunks, or one rank's ``part`` of each, and no manifest."""
    started = time.perf_counter()
    entries, new_chunks, new_bytes = [], 0, 0
    for span in spans:
        data, header = encode_span(span, fingerprint, tokens, kv, codec, part)
        entry = ManifestChunk(span.key, span.parent, span.num_tokens, len(data), header.checksum)
        entry, written = keep_or_put_chunk(store, entry, data, fingerprint, tokens[span.start : span.end], part)
        entries.append(entry)
        new_chunks += written
        new_bytes += len(data) if written else 0
    return Written(entries, new_chunks, new_bytes, time.perf_counter() - started)


def join_parts(by_part: dict[str, list[ManifestChunk]]) -> list[ManifestChunk]:
    """A manifest's chunks from what each part's writer stored (``write_chunks``); one
    part named "" is the whole chunk."""
    if list(by_part) == [""]:
        return by_part[""]
    columns = list(by_part.values())
    if len({len(c) for c in columns}) != 1:
        raise ValueError("the parts do not hold the same chunks")
    joined = []
    for row in zip(*columns):
        first = row[0]
        if any((e.key, e.num_tokens) != (first.key, first.num_tokens) for e in row):
            raise ValueError(f"the parts of chunk {first.key[:16]} disagree on its key or tokens")
        parts = tuple(ChunkPart(name, e.nbytes, e.checksum) for name, e in zip(by_part, row))
        joined.append(replace(first, nbytes=sum(p.nbytes for p in parts), checksum="", parts=parts))
    return joined


def new_manifest(*, doc_id: str, chunks: list[ManifestChunk], num_tokens: int, fingerprint: str, profile: dict,
                 chunk_size: int, producer: dict, salted: bool = False, adapter: str = "", title: str = "",
                 metadata: dict | None = None) -> Manifest:
    return Manifest(
        doc_id=doc_id, fingerprint=fingerprint, num_tokens=num_tokens, chunk_size=chunk_size, chunks=chunks,
        profile=profile, salted=salted, adapter=adapter, created=time.time(), producer=producer, title=title,
        metadata=dict(metadata or {}), parts=[p.name for p in chunks[0].parts] if chunks else [],
    )


def put_manifest(store: Store, manifest: Manifest) -> None:
    """Last, once every chunk it names is stored: a manifest never dangles."""
    store.put(manifest_object_key(manifest.doc_id), manifest.to_json())


def write_document(store: Store, *, spans: list[ChunkSpan], tokens: Sequence[int], kv: DocumentKV,
                   fingerprint: str, profile: dict, chunk_size: int, producer: dict, salted: bool = False,
                   adapter: str = "", title: str = "", metadata: dict | None = None,
                   codec: str | None = None) -> Written:
    """Store a whole document: its chunks (compressed with ``codec``, if given), then its
    manifest (its id is the last chunk's key)."""
    written = write_chunks(store, spans=spans, tokens=tokens, kv=kv, fingerprint=fingerprint, codec=codec)
    written.manifest = new_manifest(
        doc_id=spans[-1].key, chunks=written.chunks, num_tokens=len(tokens), fingerprint=fingerprint,
        profile=profile, chunk_size=chunk_size, producer=producer, salted=salted, adapter=adapter, title=title,
        metadata=metadata,
    )
    put_manifest(store, written.manifest)
    return written


def manifest_spans(manifest: Manifest) -> list[ChunkSpan]:
    spans, start = [], 0
    for c in manifest.chunks:
        spans.append(ChunkSpan(c.key, c.parent, start, c.num_tokens))
        start += c.num_tokens
    return spans


def compare_document(store: Store, manifest: Manifest, tokens: Sequence[int], kv: DocumentKV,
                     part: str = "") -> dict:
    """A recomputed document (or one rank's ``part`` of it) against its stored chunks, byte
    for byte (a compressed chunk as the uncompressed chunk it decodes to): the verify verdict."""
    results = []
    for span in manifest_spans(manifest):
        data, _ = encode_span(span, manifest.fingerprint, tokens, kv, part=part)
        stored = store.get(chunk_object_key(span.key, part))
        try:
            same = stored is not None and as_v1(stored) == data
        except ArtifactError:
            same = False
        status = "missing" if stored is None else "identical" if same else "differs"
        results.append({"key": span.key, "num_tokens": span.num_tokens, "status": status})
    return {"document": manifest.doc_id, "identical": all(r["status"] == "identical" for r in results),
            "chunks": results, "checked_at": time.time(), "fingerprint": manifest.fingerprint}
