"""Where things live in a store: the key layout, in one place.

    chunks/<key[:2]>/<key>.safetensors          one chunk (content-addressed by its chain key)
    chunks/<key[:2]>/<key>.<part>.safetensors   one tensor-parallel rank's part of it (``parts``)
    manifests/<doc id>.json              one document (its id is its last chunk's key)
"""

from __future__ import annotations

MANIFEST_PREFIX = "manifests/"
CHUNK_PREFIX = "chunks/"


def chunk_object_key(key: str, part: str = "") -> str:
    return f"{CHUNK_PREFIX}{key[:2]}/{key}{'.' + part if part else ''}.safetensors"


def manifest_object_key(doc_id: str) -> str:
    return f"{MANIFEST_PREFIX}{doc_id}.json"


def doc_id_of(manifest_key: str) -> str:
    return manifest_key.removeprefix(MANIFEST_PREFIX).removesuffix(".json")
