"""Stores picked by URL scheme: ``file:///path`` (or a bare path), ``s3://bucket/prefix``;
optionally behind a node-local disk tier (``disk_cache.py``)."""

from __future__ import annotations

from urllib.parse import urlparse

from vllm_kvcdn.defaults import default_store_url
from vllm_kvcdn.store.base import ObjectInfo, Store, StoreError
from vllm_kvcdn.store.file import FileStore

__all__ = ["Store", "StoreError", "ObjectInfo", "FileStore", "open_store"]


def open_store(url: str | None = None, *, disk_cache_dir: str | None = None, disk_cache_gib: float = 0.0) -> Store:
    """The store at ``url``; with ``disk_cache_gib`` > 0, its chunks cached on local disk
    under ``disk_cache_dir``."""
    url = url or default_store_url()
    parsed = urlparse(url)
    if parsed.scheme in ("", "file"):
        store: Store = FileStore(parsed.netloc + parsed.path if parsed.scheme else url)
    elif parsed.scheme == "s3":
        from vllm_kvcdn.store.s3 import S3Options, S3Store

        store = S3Store(parsed.netloc, parsed.path, S3Options.from_query(parsed.query))
    else:
        raise ValueError(f"unsupported store URL {url!r}: use file:///path or s3://bucket/prefix")
    if disk_cache_gib > 0:
        from vllm_kvcdn.store.disk_cache import DiskCachedStore

        if not disk_cache_dir:
            raise ValueError("a disk tier needs a directory: set disk_cache_dir")
        store = DiskCachedStore(store, disk_cache_dir, int(disk_cache_gib * 2**30))
    return store
