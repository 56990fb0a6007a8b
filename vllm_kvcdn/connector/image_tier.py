"""A node's disk tier of block images: the RAM tier's slots (``block_cache``), on disk.

A first read from the canonical format costs the platform's packing op (on CPU it
transposes K; 70 % of a first read, issue 29) and a fresh buffer per chunk. This tier keeps
the engine's own packed blocks, one file per chunk (written when a chunk is loaded from its
object or published by this node), so a node reads a chunk back without the op: into a
RAM-tier slot, or on CPU straight into the request's blocks of the paged cache (``read``
takes the destination as a list of views: one ``preadv``, no copy between). The shared
store keeps the portable canonical format; images are only valid for the engine layout that
made them, so each layout (model, dtype, packing, block size, rank) has a directory of its
own.

A file is a fixed header (magic, blocks held, payload bytes, the chunk key, xxh3-64 of the
key and the payload) and the payload: every layer's held blocks, layer after layer. The
same files keep the documents' partial last blocks (``kind="tail"``, the tail cache's
canonical form: "held" counts tokens), so a restarted node reads no chunk object for a
document of any length. Every read checks the header's key against the chunk the load asked
for and the checksum against both: a file name is no proof (a valid image of another chunk renamed to this one is
caught), and a file that fails is deleted (a caller that read it into the paged cache writes
those blocks again from the chunk object). Bounded by the node's one disk budget
(``store.lru``, shared with the chunk tier), least recently used first out, the order
rebuilt from mtimes on restart (every hit refreshes the file's mtime).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
import time
from functools import partial
from pathlib import Path

import torch
import xxhash

from vllm_kvcdn.log import get_logger
from vllm_kvcdn.store.lru import DiskLRU

logger = get_logger(__name__)

_HEADER = struct.Struct("<8sIQ64sQ")  # magic, units held, payload bytes, chunk key, xxh3-64 of key + payload
# kind -> (magic, file suffix, tag of its keys in the node's disk budget). Older image files
# (IMG: no key; IM2: whole slots) fail the magic check and are replaced.
_KINDS = {"image": (b"KVCDNIM3", ".img", "image:"), "tail": (b"KVCDNTL1", ".tail", "tail:")}


_MAX_IOV = 512  # views per preadv call (Linux allows 1024)


def bytes_of(tensor: torch.Tensor) -> memoryview:
    """A contiguous CPU tensor's memory as one flat byte view (no copy)."""
    return memoryview(tensor.view(torch.uint8).view(-1).numpy())  # raises if not contiguous


def _slot_views(slot: torch.Tensor, blocks: int) -> list[memoryview]:
    """The payload's order in a RAM-tier slot ``[layers, blocks, ...]``: each layer's first ``blocks``."""
    return [bytes_of(layer.narrow(0, 0, blocks)) for layer in slot]


def _checksum(key: bytes, payload: list[memoryview]) -> int:
    h = xxhash.xxh3_64(key)
    for view in payload:
        h.update(view)  # releases the GIL: reads of other chunks go on meanwhile
    return h.intdigest()


def _read_fully(fd: int, views: list[memoryview], offset: int) -> None:
    """Fill ``views``, in order, from the file at ``offset``; ValueError if it ends first."""
    views = [v for v in views if len(v)]
    while views:
        batch = views[:_MAX_IOV]
        n = os.preadv(fd, batch, offset)
        if n == 0:
            raise ValueError(f"truncated at byte {offset - _HEADER.size}")
        offset += n
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if n:
            views[0] = views[0][n:]


def layout_id(**fields) -> str:
    """A short digest naming one engine layout: images from another never load here."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


class BlockImageFiles:
    def __init__(self, directory: str | os.PathLike, capacity_bytes: int = 0, budget: DiskLRU | None = None,
                 kind: str = "image"):
        """``budget``: the node's disk budget, shared with its chunk tier (``store.lru``);
        else one of ``capacity_bytes`` of its own. ``kind``: "image" (whole blocks) or
        "tail" (partial last blocks): one directory may hold both."""
        self._magic, self._suffix, self._tag = _KINDS[kind]
        self.root = Path(directory)
        self.root.mkdir(parents=True, exist_ok=True)
        self.budget = budget if budget is not None else DiskLRU(capacity_bytes)
        self._lock = threading.Lock()
        self._blocks: dict[str, int] = {}  # chunk key -> units (blocks, or a tail's tokens) its file holds
        self.damaged = 0
        for tmp in self.root.glob("*/.*.tmp"):  # a write cut by a crash
            try:
                if time.time() - tmp.stat().st_mtime > 3600:
                    tmp.unlink()
            except OSError:
                pass
        found = []
        for path in self.root.glob(f"*/*{self._suffix}"):
            try:
                stat = path.stat()
                key, blocks = path.name.removesuffix(self._suffix).rsplit(".", 1)
                found.append((stat.st_mtime, key, stat.st_size, int(blocks)))
            except (OSError, ValueError):
                continue  # a stray file, or one removed meanwhile
        with self._lock:
            self._blocks = {key: blocks for _, key, _, blocks in sorted(found)}
        self.budget.restore((mtime, self._tag + key, size, partial(self._remove, key, blocks))
                            for mtime, key, size, blocks in found)
        logger.info("kvcdn: block-image tier %s: %d chunks' %ss; the node's disk budget: %.2f of %.2f GiB in use",
                    self.root, len(self), kind, self.budget.nbytes / 2**30, self.budget.capacity_bytes / 2**30)

    def blocks(self, key: str) -> int:
        """What the file of chunk ``key`` holds: whole blocks, or a tail's tokens (0: none)."""
        return self._blocks.get(key, 0)

    def read_into(self, key: str, slot: torch.Tensor) -> int:
        """Fill ``slot`` (a RAM-tier slot) with the image of chunk ``key``; the blocks it
        holds, or 0 when there is none or it fails its checks."""
        blocks = self.blocks(key)
        return blocks if blocks and self.read(key, _slot_views(slot, blocks)) else 0

    def read(self, key: str, views: list[memoryview]) -> bool:
        """Fill ``views`` (the payload's destination, in file order: each layer's held
        blocks) with the image of chunk ``key`` and check it; False when there is none or
        it fails (``views`` then hold garbage)."""
        blocks = self.blocks(key)
        if not blocks:
            return False
        path = self._path(key, blocks)
        size = sum(len(v) for v in views)
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                magic, held, stated, named, digest = _HEADER.unpack(os.pread(fd, _HEADER.size, 0))
                if magic != self._magic:
                    raise ValueError(f"not a block image of this format ({magic!r})")
                named = named.rstrip(b"\0")
                if named != key.encode():
                    raise ValueError(f"the file holds chunk {named[:16].decode(errors='replace')}, not {key[:16]}")
                if held != blocks or stated != size:
                    raise ValueError(f"header says {held} blocks / {stated} bytes, the reader expects {size} bytes")
                _read_fully(fd, views, _HEADER.size)
            finally:
                os.close(fd)
            if _checksum(named, views) != digest:
                raise ValueError("checksum mismatch")
        except FileNotFoundError:
            self._forget(key)
            return False
        except (OSError, ValueError, struct.error) as e:
            with self._lock:
                self.damaged += 1
            logger.warning("kvcdn: block image of chunk %s is damaged (%s); dropped, reading the chunk instead",
                           key[:16], e)
            self._forget(key)
            path.unlink(missing_ok=True)
            return False
        self.budget.touch(self._tag + key)
        try:
            os.utime(path)  # the order survives a restart
        except OSError:
            pass
        return True

    def write(self, key: str, slot: torch.Tensor, blocks: int) -> None:
        """Keep ``slot`` (holding ``blocks`` whole blocks of chunk ``key``) as its image."""
        self.write_views(key, _slot_views(slot, blocks), blocks)

    def write_views(self, key: str, payload: list[memoryview], blocks: int) -> None:
        """Keep ``payload`` (in file order) as the file of chunk ``key``, holding ``blocks``."""
        nbytes = sum(len(v) for v in payload)
        size = _HEADER.size + nbytes
        if not self.budget.fits(size) or self.blocks(key) >= blocks:
            return
        path = self._path(key, blocks)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            path.parent.mkdir(exist_ok=True)
            with open(tmp, "wb", buffering=0) as f:
                named = key.encode()
                f.write(_HEADER.pack(self._magic, blocks, nbytes, named, _checksum(named, payload)))
                for view in payload:
                    while view:  # an unbuffered write may take part of it
                        view = view[f.write(view):]
            os.replace(tmp, path)  # readers see the whole file or none
        except OSError as e:  # a full or broken disk costs speed, never a load
            tmp.unlink(missing_ok=True)
            logger.warning("kvcdn: block-image tier cannot keep chunk %s: %s", key[:16], e)
            return
        with self._lock:
            old = self._blocks.get(key)
            self._blocks[key] = blocks
        if old and old != blocks:
            self._path(key, old).unlink(missing_ok=True)
        self.budget.add(self._tag + key, size, partial(self._remove, key, blocks))

    def __len__(self) -> int:
        return len(self._blocks)

    def _path(self, key: str, blocks: int) -> Path:
        return self.root / key[:2] / f"{key}.{blocks}{self._suffix}"

    def _forget(self, key: str) -> None:
        with self._lock:
            self._blocks.pop(key, None)
        self.budget.discard(self._tag + key)

    def _remove(self, key: str, blocks: int) -> None:
        """Evicted by the node's disk budget."""
        with self._lock:
            if self._blocks.get(key) == blocks:
                del self._blocks[key]
        self._path(key, blocks).unlink(missing_ok=True)
