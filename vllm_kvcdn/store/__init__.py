"""Stores picked by URL scheme: ``file:///path`` (or a bare path)."""

from __future__ import annotations

from urllib.parse import urlparse

from vllm_kvcdn.defaults import default_store_url
from vllm_kvcdn.store.base import Store, StoreError
from vllm_kvcdn.store.file import FileStore

__all__ = ["Store", "StoreError", "FileStore", "open_store"]


def open_store(url: str | None = None) -> Store:
    url = url or default_store_url()
    parsed = urlparse(url)
    if parsed.scheme in ("", "file"):
        return FileStore(parsed.netloc + parsed.path if parsed.scheme else url)
    raise ValueError(
        f"unsupported store URL {url!r}: use file:///path (s3:// is planned, see the README)"
    )
