"""``file://`` store: one file per key under a root directory."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from vllm_kvcdn.store.base import Store, StoreError


class FileStore(Store):
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()
        self.url = f"file://{self.root}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create store directory {self.root}: {e}") from e

    def _path(self, key: str) -> Path:
        if key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"invalid store key {key!r}")
        return self.root / key

    def get(self, key: str) -> bytearray | None:
        # A writable buffer, so tensors can view it without a copy.
        try:
            with open(self._path(key), "rb") as f:
                buf = bytearray(os.fstat(f.fileno()).st_size)
                f.readinto(buf)
                return buf
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StoreError(f"reading {key} from {self.url}: {e}") from e

    def local_path(self, key: str) -> Path:
        """Where the object lives on disk (for readers that want to read in place)."""
        return self._path(key)

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # temp + fsync + rename: a crash leaves the old object or the new one.
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as e:
            raise StoreError(f"writing {key} to {self.url}: {e}") from e

    def contains(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int | None:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            return None

    def delete(self, key: str) -> bool:
        try:
            self._path(key).unlink()
            return True
        except FileNotFoundError:
            return False

    def list(self, prefix: str = "") -> Iterator[str]:
        base = self._path(prefix.rsplit("/", 1)[0]) if "/" in prefix else self.root
        if not base.is_dir():
            return
        for dirpath, _, files in os.walk(base):
            for name in files:
                if name.startswith(".tmp-"):
                    continue
                key = Path(dirpath, name).relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    yield key

    def version(self, prefix: str) -> object:
        # A directory's mtime changes when an entry is created, renamed in or removed.
        try:
            return self._path(prefix.rstrip("/")).stat().st_mtime_ns
        except FileNotFoundError:
            return 0
