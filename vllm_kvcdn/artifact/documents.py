"""Reading and writing documents in a store: the one protocol every producer and reader uses
(the vLLM worker, the transformers path, the catalog and the side API).

Writing: chunks first, content-addressed, the manifest last, so a crash never leaves a
manifest pointing at missing chunks. A stored chunk is kept when it holds the very bytes
computed, or bytes a trusted manifest already records for it (``vouched``: documents that
share a prefix share its chunks, though a longer pass may differ in the last bits);
a missing, damaged or unvouched one is replaced and the replacement logged: chunk keys
are a public function of the tokens, so anyone who can write to the store could put
other KV under a popular document's keys before its publisher does.
Reading: one chunk at a time, every expectation given checked (checksum, fingerprint,
dtype, shape, the request's tokens).
"""

from __future__ import annotations

import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

import torch

from vllm_kvcdn.artifact.chain import ChunkSpan
from vllm_kvcdn.artifact.chunk_format import ChunkKV, as_v1, decode_chunk, encode_chunk
from vllm_kvcdn.artifact.manifest import ArtifactError, ChunkPart, Manifest, ManifestChunk
from vllm_kvcdn.artifact.parts import KVPart
from vllm_kvcdn.artifact.sealing import ALGORITHM, NO_KEYS, TenantKeys, is_sealed, object_context
from vllm_kvcdn.log import get_logger
from vllm_kvcdn.store import Store
from vllm_kvcdn.store.keys import chunk_object_key, manifest_object_key

logger = get_logger(__name__)

# Per layer, (K, V) of the whole document on the CPU, each [tokens, kv_heads, head_dim].
DocumentKV = list[tuple[torch.Tensor, torch.Tensor]]


def read_chunk(store: Store, key: str, into: memoryview | None = None, part: str = "",
               keys: TenantKeys = NO_KEYS, **expect) -> tuple[ChunkKV, int]:
    """(the decoded chunk, or its ``part``; its stored size); ``expect`` as ``decode_chunk``'s
    checks (the part is one); read into ``into`` when it fits (the chunk's tensors then view
    it; ``Store.get``). A sealed (private) chunk is opened with ``keys`` first. A missing
    chunk is an ``ArtifactError("missing")`` like any other unusable one. A local copy (disk
    tier) that fails its checks is dropped and the origin read once."""
    object_key = chunk_object_key(key, part)
    for attempt in range(2):
        data = store.get(object_key, into)
        if data is None:
            raise ArtifactError("missing", f"chunk {key[:16]}{' part ' + part if part else ''} is missing "
                                           f"from {store.url}")
        size, sealed = len(data), is_sealed(data)
        try:
            if sealed:
                data = keys.open(data, object_context(key, part), into)
            chunk = decode_chunk(data, key=key, out=into, part=part, **expect)
            chunk.sealed = sealed
            return chunk, size
        except ArtifactError as e:
            if attempt or e.reason not in ("checksum", "truncated", "format", "provenance", "decrypt") \
                    or not store.drop_cached(object_key):
                raise
            logger.warning("kvcdn: the local copy of chunk %s is damaged (%s); reading it from %s again",
                           key[:16], e, store.url)
    raise AssertionError("unreachable")


def read_whole_chunk(store: Store, entry: ManifestChunk, num_kv_heads: int, **expect) -> ChunkKV:
    """A chunk with all ``num_kv_heads`` heads, from its one object or joined from its
    tensor-parallel parts (each checked, in head order): how a reader that runs every head
    (the transformers path) uses a TP publish). Each object is checked against the checksum
    the manifest records."""
    if not entry.parts:
        return read_chunk(store, entry.key, num_kv_heads=num_kv_heads, expected_checksum=entry.checksum, **expect)[0]
    pieces = []
    for part in entry.parts:
        heads = KVPart.parse(part.name, num_kv_heads)
        pieces.append(read_chunk(store, entry.key, part=part.name, num_kv_heads=heads.num_heads,
                                 expected_checksum=part.checksum, **expect)[0])
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
                      tokens: Sequence[int], part: str = "", vouched: Collection[str] = (),
                      keys: TenantKeys = NO_KEYS) -> tuple[ManifestChunk, str]:
    """Content-addressed write of one chunk (or part) whose computed bytes are ``data``
    (checksum ``entry.checksum``); ``vouched``: the checksums trusted manifests record for
    it. Returns the manifest entry of what is stored and what happened: "kept" (the stored
    chunk holds these bytes or vouched ones), "written" (it was missing; when another
    server stores it meanwhile, its copy is kept on the same terms) or "replaced" (the
    stored one was damaged, or held other, unvouched bytes: logged). ``data`` is the object
    as stored (sealed, for a private document); ``keys`` open a stored sealed one. A private
    publish keeps an unsealed copy of the very same bytes: another document has made them
    public, and sealing them would break its readers."""
    object_key = chunk_object_key(entry.key, part)

    def stored() -> ManifestChunk:
        kept, nbytes = read_chunk(store, entry.key, part=part, keys=keys, fingerprint=fingerprint,
                                  tokens=tokens)  # checksum too
        return replace(entry, nbytes=nbytes, checksum=kept.header.checksum)  # its size: maybe another codec

    def replace_with_ours(why: str) -> tuple[ManifestChunk, str]:
        logger.warning("kvcdn: replacing chunk %s%s: %s", entry.key[:16], f" part {part}" if part else "", why)
        store.put(object_key, data)
        return entry, "replaced"

    try:
        found = stored()
    except ArtifactError as e:
        if e.reason != "missing":
            return replace_with_ours(f"the stored one is unusable ({e})")
        if store.put_if_absent(object_key, data):
            return entry, "written"
        try:
            found = stored()  # another writer's, stored meanwhile
        except ArtifactError as e:
            return replace_with_ours(f"the one stored meanwhile is unusable ({e})")
    if found.checksum != entry.checksum and found.checksum not in vouched:
        # Not what this engine computed for these tokens, and no trusted document uses it:
        # a forgery, an orphan of a failed publish, or a chunk written before BLAKE3 checksums.
        return replace_with_ours(f"its checksum {found.checksum[:24]}... is neither what this engine computed "
                                 f"({entry.checksum[:24]}...) nor one a trusted manifest records")
    return found, "kept"


@dataclass
class Written:
    chunks: list[ManifestChunk]  # what is stored for each chunk (of one part: its size and checksum)
    new_chunks: int  # chunks this write stored (the others were there, intact)
    new_bytes: int
    seconds: float
    replaced_chunks: int = 0  # of ``new_chunks``: stored ones that were damaged or held other bytes
    computed: list[str] = field(default_factory=list)  # each chunk's checksum as computed (a kept one may differ)
    manifest: Manifest | None = None  # written by ``write_document``, not by ``write_chunks``


def write_chunks(store: Store, *, spans: list[ChunkSpan], tokens: Sequence[int], kv: DocumentKV, fingerprint: str,
                 codec: str | None = None, part: str = "", vouched: Mapping[str, Collection[str]] | None = None,
                 keys: TenantKeys = NO_KEYS, private: bool = False) -> Written:
    """Store a document's chunks, or one rank's ``part`` of each, and no manifest;
    ``vouched``: chunk key -> the checksums (of this part) trusted manifests record;
    ``private``: sealed with ``keys``' sealing tenant key (``sealing``)."""
    if private and keys.sealer is None:
        raise ValueError("kvcdn: a private document needs a tenant key to seal it with (tenant_keys)")
    started = time.perf_counter()
    entries, outcomes, computed = [], [], []
    for span in spans:
        data, header = encode_span(span, fingerprint, tokens, kv, codec, part)
        if private:
            data = keys.seal(data, object_context(span.key, part))
        entry = ManifestChunk(span.key, span.parent, span.num_tokens, len(data), header.checksum)
        entry, outcome = keep_or_put_chunk(store, entry, data, fingerprint, tokens[span.start : span.end], part,
                                           (vouched or {}).get(span.key, ()), keys)
        entries.append(entry)
        outcomes.append(outcome)
        computed.append(header.checksum)
    new = [e.nbytes for e, o in zip(entries, outcomes) if o != "kept"]
    return Written(entries, len(new), sum(new), time.perf_counter() - started, outcomes.count("replaced"), computed)


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
                 metadata: dict | None = None, tenant_key: str | None = None,
                 require_grant: bool = False) -> Manifest:
    """``tenant_key``: the key id a private document's chunks are sealed for (``sealing``);
    ``require_grant``: its reads need a read grant (``market.grants``)."""
    return Manifest(
        doc_id=doc_id, fingerprint=fingerprint, num_tokens=num_tokens, chunk_size=chunk_size, chunks=chunks,
        profile=profile, salted=salted, adapter=adapter, created=time.time(), producer=producer, title=title,
        metadata=dict(metadata or {}), parts=[p.name for p in chunks[0].parts] if chunks else [],
        encryption={"alg": ALGORITHM, "tenant": tenant_key} if tenant_key else {}, require_grant=require_grant,
    )


def put_manifest(store: Store, manifest: Manifest) -> None:
    """Last, once every chunk it names is stored: a manifest never dangles."""
    store.put(manifest_object_key(manifest.doc_id), manifest.to_json())


class Signer(Protocol):
    def sign(self, manifest: Manifest) -> Manifest: ...


def write_document(store: Store, *, spans: list[ChunkSpan], tokens: Sequence[int], kv: DocumentKV,
                   fingerprint: str, profile: dict, chunk_size: int, producer: dict, salted: bool = False,
                   adapter: str = "", title: str = "", metadata: dict | None = None,
                   codec: str | None = None, signer: Signer | None = None,
                   vouched: Mapping[str, Collection[str]] | None = None, keys: TenantKeys = NO_KEYS,
                   private: bool = False, require_grant: bool = False) -> Written:
    """Store a whole document: its chunks (compressed with ``codec``, if given; sealed with
    ``keys``' tenant key if ``private``), then its manifest (its id is the last chunk's key),
    signed by ``signer`` if given (``provenance.PublisherKey``)."""
    written = write_chunks(store, spans=spans, tokens=tokens, kv=kv, fingerprint=fingerprint, codec=codec,
                           vouched=vouched, keys=keys, private=private)
    written.manifest = new_manifest(
        doc_id=spans[-1].key, chunks=written.chunks, num_tokens=len(tokens), fingerprint=fingerprint,
        tenant_key=keys.sealer.key_id if private else None, require_grant=require_grant,
        profile=profile, chunk_size=chunk_size, producer=producer, salted=salted, adapter=adapter, title=title,
        metadata=metadata,
    )
    if signer is not None:
        written.manifest = signer.sign(written.manifest)
    put_manifest(store, written.manifest)
    return written


def manifest_spans(manifest: Manifest) -> list[ChunkSpan]:
    spans, start = [], 0
    for c in manifest.chunks:
        spans.append(ChunkSpan(c.key, c.parent, start, c.num_tokens))
        start += c.num_tokens
    return spans


def compare_document(store: Store, manifest: Manifest, tokens: Sequence[int], kv: DocumentKV,
                     part: str = "", keys: TenantKeys = NO_KEYS) -> dict:
    """A recomputed document (or one rank's ``part`` of it) against its stored chunks, byte
    for byte (a compressed chunk as the uncompressed chunk it decodes to, a sealed one as
    the chunk inside): the verify verdict."""
    results = []
    for span in manifest_spans(manifest):
        data, _ = encode_span(span, manifest.fingerprint, tokens, kv, part=part)
        stored = store.get(chunk_object_key(span.key, part))
        try:
            if stored is not None and is_sealed(stored):
                stored = keys.open(stored, object_context(span.key, part))
            same = stored is not None and as_v1(stored) == data
        except ArtifactError:
            same = False
        status = "missing" if stored is None else "identical" if same else "differs"
        results.append({"key": span.key, "num_tokens": span.num_tokens, "status": status})
    return {"document": manifest.doc_id, "identical": all(r["status"] == "identical" for r in results),
            "chunks": results, "checked_at": time.time(), "fingerprint": manifest.fingerprint}
