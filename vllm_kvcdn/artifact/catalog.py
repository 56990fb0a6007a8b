"""Published documents in a store: list, find, delete (shared chunks are kept).

Listing and finding read manifests only; the chunk codec (and torch) is imported by the
functions that read chunks.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

from vllm_kvcdn.artifact.chain import is_chunk_key
from vllm_kvcdn.artifact.manifest import ArtifactError, Manifest
from vllm_kvcdn.log import get_logger
from vllm_kvcdn.store import Store
from vllm_kvcdn.store.keys import CHUNK_PREFIX, MANIFEST_PREFIX, chunk_object_key, doc_id_of, manifest_object_key

logger = get_logger(__name__)


@dataclass(frozen=True)
class DamagedManifest:
    """A manifest object that does not parse: listed, explained, deletable, replaceable."""

    doc_id: str
    error: str

    def advice(self) -> str:
        return (f"document {self.doc_id} has a damaged manifest ({self.error}); publish it again to replace "
                f"it, or delete it (DELETE /kvcdn/v1/documents/{self.doc_id}, `kvcdn rm {self.doc_id[:16]}`)")


Entry = Manifest | DamagedManifest


def read_entry(store: Store, key: str) -> Entry | None:
    """The manifest object at ``key``; None when it is gone."""
    data = store.get(key)
    if data is None:
        return None  # deleted meanwhile
    try:
        return Manifest.from_json(data)
    except ArtifactError as e:
        return DamagedManifest(doc_id_of(key), str(e))


def entries(store: Store) -> Iterator[Entry]:
    """Every document's manifest, damaged ones included."""
    for key in sorted(store.list(MANIFEST_PREFIX)):
        entry = read_entry(store, key)
        if entry is not None:
            yield entry


def manifests(store: Store) -> Iterator[Manifest]:
    """The manifests that parse (the damaged ones are logged and left out)."""
    for entry in entries(store):
        if isinstance(entry, DamagedManifest):
            logger.warning("kvcdn: skipping the manifest of %s: %s", entry.doc_id[:16], entry.error)
        else:
            yield entry


def get_entry(store: Store, doc_id: str) -> Entry | None:
    return read_entry(store, manifest_object_key(doc_id)) if len(doc_id) == 64 else None


def get_manifest(store: Store, doc_id: str) -> Manifest | None:
    """The document's manifest; None when absent or damaged (a republish replaces it)."""
    entry = get_entry(store, doc_id)
    return entry if isinstance(entry, Manifest) else None


def find(store: Store, id_prefix: str) -> list[Entry]:
    exact = get_entry(store, id_prefix)
    return [exact] if exact else [e for e in entries(store) if e.doc_id.startswith(id_prefix)]


def find_manifests(store: Store, id_prefix: str) -> list[Manifest]:
    return [e for e in find(store, id_prefix) if isinstance(e, Manifest)]


def intact(store: Store, manifest: Manifest, keys=None) -> bool:
    """Every chunk is there, passes its checksum and is the one the manifest records
    (``keys``: the tenant keys that open a private document's chunks, ``sealing``)."""
    return all(status == "ok" for _, status in verify_chunks(store, manifest, keys))


@dataclass
class Deleted:
    doc_id: str
    chunks_deleted: int
    chunks_kept: int  # still used by other documents


def delete_document(store: Store, entry: Entry) -> Deleted:
    """Manifest first (no request can match it any more), then chunks no one else uses."""
    store.delete(manifest_object_key(entry.doc_id))
    if isinstance(entry, Manifest):
        objects = _objects(entry)
    else:
        objects = [chunk_object_key(k) for k in _chain_back(store, entry.doc_id)]
    still_used = {key for other in manifests(store) for key in _objects(other)}
    deleted = sum(store.delete(key) for key in objects if key not in still_used)
    return Deleted(entry.doc_id, deleted, len(objects) - deleted)


def _objects(manifest: Manifest) -> list[str]:
    """The object keys of a document's chunks (each part of a chunk stored in parts)."""
    return [chunk_object_key(c.key, p.name) for c in manifest.chunks for p in c.stored()]


def _chain_back(store: Store, last_key: str) -> list[str]:
    """A document's chunk keys without its manifest: from its last chunk (the document
    id), parent by parent, as far as the chunk headers can be read."""
    from vllm_kvcdn.artifact.chunk_format import read_chunk_header

    keys, key = [], last_key
    while is_chunk_key(key) and key not in keys:  # a header is data: never follow it outside the store
        data = store.get(chunk_object_key(key))
        if data is None:
            break
        try:
            header, _, _ = read_chunk_header(data)
        except ArtifactError:
            break
        keys.append(key)
        key = header.parent
    return keys


def verify_chunks(store: Store, manifest: Manifest, keys=None) -> list[tuple[str, str]]:
    """(chunk key, "ok" or what is wrong) for every chunk: reads and checks each one
    (a private document's with ``keys``)."""
    from vllm_kvcdn.artifact.documents import read_chunk
    from vllm_kvcdn.artifact.sealing import NO_KEYS

    keys = keys or NO_KEYS
    out = []
    for c in manifest.chunks:
        statuses = []
        for part in c.stored():
            try:
                kv, _ = read_chunk(store, c.key, part=part.name, keys=keys, fingerprint=manifest.fingerprint)
                statuses.append("ok" if kv.header.checksum == part.checksum else
                                f"{'part ' + part.name + ': ' if part.name else ''}checksum differs from the manifest")
            except ArtifactError as e:
                statuses.append(f"{e.reason}: {e}")
        out.append((c.key, next((s for s in statuses if s != "ok"), "ok")))
    return out


def document_tokens(store: Store, manifest: Manifest, keys=None) -> list[int]:
    """The document's token ids, read back from its chunks (a private document's with ``keys``)."""
    from vllm_kvcdn.artifact.documents import read_chunk
    from vllm_kvcdn.artifact.sealing import NO_KEYS

    tokens: list[int] = []
    for c in manifest.chunks:
        tokens += read_chunk(store, c.key, part=c.stored()[0].name, keys=keys or NO_KEYS)[0].tokens.tolist()
    return tokens


@dataclass
class Garbage:
    unreferenced: list[str]  # chunk object keys no manifest names, older than the grace period
    young: int  # unreferenced, but within the grace period (maybe a publish under way): kept
    referenced: int
    bytes: int  # of ``unreferenced``


def _referenced_chunks(store: Store) -> set[str]:
    used = set()
    for entry in entries(store):
        if isinstance(entry, DamagedManifest):  # its chunks cannot be told: refuse rather than break it
            raise ArtifactError("format", f"{entry.advice()}; then run gc again")
        used.update(_objects(entry))
    return used


def find_garbage(store: Store, grace_s: float, now: float | None = None) -> Garbage:
    """Chunks no manifest references. A publish writes its chunks before its manifest,
    so a chunk younger than ``grace_s`` may belong to one under way: it is kept. Chunks
    are listed before manifests are read, so a document published meanwhile protects
    its chunks (they are young, or named by a manifest read after them)."""
    now = time.time() if now is None else now
    chunks = list(store.scan(CHUNK_PREFIX))
    used = _referenced_chunks(store)
    unused = [c for c in chunks if c.key not in used]
    old = [c for c in unused if now - c.modified >= grace_s]
    return Garbage([c.key for c in old], len(unused) - len(old), len(chunks) - len(unused), sum(c.size for c in old))


def collect_garbage(store: Store, garbage: Garbage) -> int:
    """Delete what ``find_garbage`` found, except chunks a manifest written since then
    names (a republish reusing an old orphan); returns how many objects went."""
    used = _referenced_chunks(store)
    return sum(store.delete(key) for key in garbage.unreferenced if key not in used)
