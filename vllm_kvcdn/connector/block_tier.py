"""The worker's tier of engine-native block images: host-RAM slots (``block_cache``) and,
behind them, the same slots as files on the node's disk (``image_tier``), plus the
documents' partial last blocks in RAM (``tail_cache``, an eighth of the RAM budget) and,
with the images, on disk: one object with one lock.

A load asks ``where`` a chunk's whole blocks are; ``promote`` reads a disk image into a
RAM slot; on CPU, ``read_image`` reads it straight into the request's blocks instead (one
copy less); ``copy_into`` hands a RAM image to the caller's write while no eviction can
reuse the slot; ``keep`` copies a chunk's blocks (loaded) into a slot and writes the slot
to disk in the background (pinned meanwhile, so it is not evicted mid-write). A publish
copies its blocks out in its step (``stage``: a slot no load can see) and names them once
its chunks are stored and their checksums known (``commit``), or lets them go (``drop``).
Every entry is keyed by ``provenance.tier_key`` (chunk key and checksum). A private
document's copies (``disk=False``) stay in RAM, which holds only what the engine's own
cache holds: its disk copies are the sealed chunk objects of the disk tier (``sealing``).
Loads of several requests run at once: every call takes the lock.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Executor
from pathlib import Path

import torch

from vllm_kvcdn.connector.block_cache import PackedBlockCache
from vllm_kvcdn.connector.image_tier import BlockImageFiles, bytes_of
from vllm_kvcdn.connector.kv_layout import runs
from vllm_kvcdn.connector.tail_cache import TailCache
from vllm_kvcdn.log import get_logger
from vllm_kvcdn.store.lru import DiskLRU

logger = get_logger(__name__)


class BlockTier:
    def __init__(self, blocks: list[torch.Tensor], ram_bytes: int, blocks_per_chunk: int,
                 images_dir: Path | None, disk_budget: DiskLRU | None, image_writer: Executor,
                 tail_token: tuple[tuple[int, int, int], torch.dtype] | None = None):
        """``blocks``: each layer's cache indexed by block id (``PagedKVLayout.blocks``);
        ``images_dir`` None: RAM slots only; ``disk_budget``: the node's (``store.lru``);
        ``tail_token``: one token's tail shape ``(2 * layers, kv_heads, head_dim)`` and
        dtype (``tail_cache``'s form), for the tails on disk (None: tails in RAM only)."""
        self._blocks = blocks
        self.tails = TailCache(ram_bytes // 8)
        self.ram = PackedBlockCache(ram_bytes - self.tails.capacity_bytes, blocks, blocks_per_chunk)
        self.images = self.tail_files = None
        if images_dir is not None and disk_budget is not None and self.ram.num_slots:
            self.images = BlockImageFiles(images_dir, budget=disk_budget)
            if tail_token is not None:
                self.tail_files = BlockImageFiles(images_dir, budget=disk_budget, kind="tail")
        self._tail_token = tail_token
        self._image_writer = image_writer
        self._lock = threading.Lock()
        self._counts = {"ram_tier_hits": 0, "ram_tier_tail_hits": 0, "image_tier_hits": 0, "image_tier_misses": 0,
                        "image_tier_tail_hits": 0}

    def tier_counts(self) -> dict[str, int]:
        """Totals since start, as the store's tiers count theirs (``Store.tier_counts``)."""
        with self._lock:
            return dict(self._counts)

    def where(self, key: str, blocks: int) -> str | None:
        """"ram" when a RAM slot holds the chunk's first ``blocks`` whole blocks, "image"
        when the node's disk does, else None."""
        with self._lock:
            if self.ram.holds(key, blocks):
                return "ram"
        if self.images is not None and self.images.blocks(key) >= blocks:
            return "image"
        return None

    def reads_direct(self, key: str, blocks: int) -> bool:
        """Whether ``read_image`` can fill ``blocks`` whole blocks of the chunk from its disk
        image: the caches are host memory and the image holds exactly those blocks."""
        return self.images is not None and self._blocks[0].device.type == "cpu" and self.images.blocks(key) == blocks

    def read_image(self, key: str, block_ids: list[int]) -> bool:
        """Read the chunk's disk image into the blocks ``block_ids`` (its whole blocks, in
        order); whether they hold it now. False: those blocks hold garbage, and the caller
        writes them from the chunk object."""
        views = []
        for layer in self._blocks:
            for _, first, count in runs(block_ids):
                run = layer.narrow(0, first, count)
                if not run.is_contiguous():
                    return False
                views.append(bytes_of(run))
        done = self.images.read(key, views)
        with self._lock:
            self._counts["image_tier_hits" if done else "image_tier_misses"] += 1
        return done

    def promote(self, key: str) -> bool:
        """Read the chunk's disk image into a RAM slot; whether it is there now."""
        with self._lock:
            slot = self.ram.reserve()
            if slot is None:
                self._counts["image_tier_misses"] += 1
                return False
        blocks = 0
        try:
            blocks = self.images.read_into(key, self.ram.slot(slot))
        finally:
            with self._lock:
                if blocks:
                    self.ram.commit(key, slot, blocks)
                else:
                    self.ram.release(slot)
                self._counts["image_tier_hits" if blocks else "image_tier_misses"] += 1
        return blocks > 0

    def copy_into(self, key: str, lo: int, hi: int, write: Callable[[torch.Tensor], None]) -> bool:
        """Call ``write`` with the chunk's whole blocks [lo, hi) (``[layers, blocks, ...]``)
        if a RAM slot holds them; whether it did."""
        with self._lock:  # an eviction must not reuse the slot while we copy from it
            image = self.ram.get(key, lo, hi)
            if image is None:
                return False
            write(image)
            self._counts["ram_tier_hits"] += 1
        return True

    def holds_tail(self, key: str, lo: int, hi: int) -> bool:
        """Whether the chunk's positions [lo, hi) past its last whole block are held: in
        RAM, or on disk (a tail file holds them all, from the last whole block on)."""
        with self._lock:
            if self.tails.holds(key, lo, hi):
                return True
        return self.tail_files is not None and self.tail_files.blocks(key) > 0

    def copy_tail(self, key: str, offset: int, lo: int, hi: int, write: Callable[[torch.Tensor], None]) -> bool:
        """Call ``write`` with the chunk's positions [lo, hi) past its last whole block
        (which ends at ``offset``; ``tail_cache.get``) if held, reading its tail file into
        RAM first when only the disk holds it; whether it did."""
        with self._lock:  # no eviction while we copy from it
            if self._copy_tail(key, lo, hi, write):
                return True
        tail = self._read_tail_file(key)
        with self._lock:
            if tail is not None:
                self.tails.put(key, offset, tail)
                self._counts["image_tier_tail_hits"] += 1
            return self._copy_tail(key, lo, hi, write)

    def _copy_tail(self, key: str, lo: int, hi: int, write: Callable[[torch.Tensor], None]) -> bool:
        tail = self.tails.get(key, lo, hi)
        if tail is None:
            return False
        write(tail)
        self._counts["ram_tier_tail_hits"] += 1
        return True

    def _read_tail_file(self, key: str) -> torch.Tensor | None:
        """The chunk's tail from its file (checked), or None."""
        tokens = self.tail_files.blocks(key) if self.tail_files is not None else 0
        if not tokens:
            return None
        (rows, heads, head_dim), dtype = self._tail_token
        tail = torch.empty((rows, tokens, heads, head_dim), dtype=dtype)
        return tail if self.tail_files.read(key, [bytes_of(tail)]) else None

    def keep_tail(self, key: str, offset: int, tensors: list[torch.Tensor], disk: bool = True) -> None:
        """Copy the chunk's positions from ``offset`` (its last whole block's end) on
        (every layer's K, then every layer's V), and (``disk``) to disk in the background."""
        tail = torch.stack([t.cpu() for t in tensors])
        with self._lock:
            self.tails.put(key, offset, tail)
        if (disk and self.tail_files is not None and not self.tail_files.blocks(key)
                and (tuple(tail.shape[:1] + tail.shape[2:]), tail.dtype) == self._tail_token):
            self._image_writer.submit(self._write_tail, key, tail)

    def _write_tail(self, key: str, tail: torch.Tensor) -> None:
        try:
            self.tail_files.write_views(key, [bytes_of(tail)], tail.shape[1])
        except Exception:  # a background copy: it costs a later read speed, never a load
            logger.exception("kvcdn: could not write the tail of chunk %s", key[:16])

    def stage(self, block_ids: torch.Tensor) -> int | None:
        """Copy whole blocks (``block_ids``, in order) into a slot no load sees until
        ``commit``; the slot, or None when none is free."""
        with self._lock:
            slot = self.ram.reserve()
            if slot is not None:
                self.ram.fill(slot, self._blocks, block_ids)
        return slot

    def commit(self, key: str, slot: int, blocks: int, disk: bool = True) -> None:
        """A staged slot holds the chunk ``key``'s first ``blocks`` whole blocks: into the RAM
        tier, and (``disk``) its image to disk in the background."""
        with self._lock:
            self.ram.commit(key, slot, blocks)
            pinned = self.ram.pin(key) if self.images is not None and disk else None
        if pinned is not None:
            self._image_writer.submit(self._write_image, key, *pinned)

    def drop(self, slot: int) -> None:
        """Let a staged slot go (its publish failed)."""
        with self._lock:
            self.ram.release(slot)

    def keep(self, key: str, block_ids: torch.Tensor, disk: bool = True) -> None:
        """Copy the chunk's whole blocks (``block_ids``, in order, on the cache's device)
        into a RAM slot, and (``disk``) its image to disk in the background."""
        with self._lock:
            self.ram.put(key, self._blocks, block_ids)
            pinned = self.ram.pin(key) if self.images is not None and disk else None
        if pinned is not None:
            self._image_writer.submit(self._write_image, key, *pinned)

    def _write_image(self, key: str, slot: torch.Tensor, blocks: int) -> None:
        try:
            self.images.write(key, slot, blocks)
        except Exception:  # a background copy: it costs a later read speed, never a load
            logger.exception("kvcdn: could not write the block image of chunk %s", key[:16])
        finally:
            with self._lock:
                self.ram.unpin(key)
