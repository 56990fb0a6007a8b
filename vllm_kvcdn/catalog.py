"""Published documents in a store: list, find, delete (shared chunks are kept)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from vllm_kvcdn.artifact import ArtifactError, Manifest, decode_chunk
from vllm_kvcdn.index import MANIFEST_PREFIX, chunk_object_key, manifest_object_key
from vllm_kvcdn.log import get_logger
from vllm_kvcdn.store import Store

logger = get_logger(__name__)


def manifests(store: Store) -> Iterator[Manifest]:
    for key in sorted(store.list(MANIFEST_PREFIX)):
        data = store.get(key)
        if data is None:
            continue  # deleted while we listed
        try:
            yield Manifest.from_json(data)
        except ArtifactError as e:
            logger.warning("kvcdn: skipping %s: %s", key, e)


def get_manifest(store: Store, doc_id: str) -> Manifest | None:
    data = store.get(manifest_object_key(doc_id)) if len(doc_id) == 64 else None
    return Manifest.from_json(data) if data is not None else None


def find_manifests(store: Store, id_prefix: str) -> list[Manifest]:
    exact = get_manifest(store, id_prefix)
    return [exact] if exact else [m for m in manifests(store) if m.doc_id.startswith(id_prefix)]


def chunks_present(store: Store, manifest: Manifest) -> bool:
    """Every chunk object exists with the size its manifest recorded (a cheap check)."""
    return all(store.size(chunk_object_key(c.key)) == c.nbytes for c in manifest.chunks)


@dataclass
class Deleted:
    doc_id: str
    chunks_deleted: int
    chunks_kept: int  # still used by other documents


def delete_document(store: Store, manifest: Manifest) -> Deleted:
    """Manifest first (no request can match it any more), then chunks no one else uses."""
    store.delete(manifest_object_key(manifest.doc_id))
    still_used = {c.key for other in manifests(store) for c in other.chunks}
    deleted = sum(store.delete(chunk_object_key(c.key)) for c in manifest.chunks if c.key not in still_used)
    return Deleted(manifest.doc_id, deleted, len(manifest.chunks) - deleted)


def verify_chunks(store: Store, manifest: Manifest) -> list[tuple[str, str]]:
    """(chunk key, "ok" or what is wrong) for every chunk: reads and checks each one."""
    out = []
    for c in manifest.chunks:
        data = store.get(chunk_object_key(c.key))
        try:
            if data is None:
                raise ArtifactError("missing", "chunk object is missing")
            kv = decode_chunk(data, key=c.key, fingerprint=manifest.fingerprint)
            status = "ok" if kv.header.checksum == c.checksum else "checksum differs from the manifest"
        except ArtifactError as e:
            status = f"{e.reason}: {e}"
        out.append((c.key, status))
    return out


def document_tokens(store: Store, manifest: Manifest) -> list[int]:
    """The document's token ids, read back from its chunks."""
    tokens: list[int] = []
    for c in manifest.chunks:
        data = store.get(chunk_object_key(c.key))
        if data is None:
            raise ArtifactError("missing", f"chunk {c.key[:16]} is missing")
        tokens += decode_chunk(data, key=c.key).tokens.tolist()
    return tokens
