"""``file://`` store: one file per key under a root directory."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from vllm_kvcdn.store.base import ObjectInfo, Store, StoreError, new_buffer


class FileStore(Store):
    def __init__(self, root: str | os.PathLike, durable: bool = True):
        # durable=False skips the fsyncs: for a cache whose copies are checked on read.
        self.durable = durable
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

    def get(self, key: str, into: memoryview | None = None) -> bytearray | memoryview | None:
        # A writable buffer, so tensors can view it without a copy.
        try:
            with open(self._path(key), "rb") as f:
                buf = new_buffer(os.fstat(f.fileno()).st_size, into)
                got = f.readinto(buf)
                return buf if got == len(buf) else buf[:got]  # cut short meanwhile: never unread bytes
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StoreError(f"reading {key} from {self.url}: {e}") from e

    def local_path(self, key: str) -> Path:
        """Where the object lives on disk (for readers that want to read in place)."""
        return self._path(key)

    def put(self, key: str, data: bytes) -> None:
        self._write(key, data, os.replace)

    def put_if_absent(self, key: str, data: bytes) -> bool:
        # A hard link fails when the target exists: the atomic "create" a rename lacks.
        try:
            self._write(key, data, os.link)
            return True
        except FileExistsError:
            return False

    def _write(self, key: str, data: bytes, place) -> None:
        """Write a temporary file, then ``place(tmp, path)``: a crash leaves the old
        object or the new one, never a part."""
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    if self.durable:
                        f.flush()
                        os.fsync(f.fileno())
                place(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            if place is not os.replace:
                Path(tmp).unlink()  # a link leaves the temporary name behind
            if self.durable:
                dir_fd = os.open(path.parent, os.O_RDONLY)
                try:
                    os.fsync(dir_fd)
                finally:
                    os.close(dir_fd)
        except FileExistsError:
            raise
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

    def scan(self, prefix: str = "") -> Iterator[ObjectInfo]:
        base = self._path(prefix.rsplit("/", 1)[0]) if "/" in prefix else self.root
        if not base.is_dir():
            return
        for dirpath, _, files in os.walk(base):
            for name in files:
                if name.startswith(".tmp-"):
                    continue
                path = Path(dirpath, name)
                key = path.relative_to(self.root).as_posix()
                if not key.startswith(prefix):
                    continue
                try:
                    st = path.stat()
                except FileNotFoundError:  # deleted while we walked
                    continue
                yield ObjectInfo(key, st.st_size, st.st_mtime, f"{st.st_mtime_ns}:{st.st_ino}:{st.st_size}")

    def version(self, prefix: str) -> object:
        # A directory's mtime changes when an entry is created, renamed in or removed.
        try:
            return self._path(prefix.rstrip("/")).stat().st_mtime_ns
        except FileNotFoundError:
            return 0
