"""Host-RAM tier of the worker: engine-native images of published chunks' whole blocks.

A cold load reads a chunk file, verifies it and packs its K/V into the paged cache with
the platform's op (on CPU that op transposes K and is the slowest step of a load). The
packed blocks it produced are then copied here, keyed by chunk key, so the next load of
a hot document is a plain block copy. Only whole blocks are kept; a chunk's partial last
block is always written from the file. Least recently used images go first.

The memory is one arena of fixed-size slots (one chunk's blocks for every layer),
allocated and touched when the worker starts: filling fresh memory page by page on the
request path cost more than the load itself (measured: 0.9 s of a 1.4 s first read of
940 MB).

A slot can also be filled from outside (``reserve``, then ``commit`` or ``release``: the
node's block-image files, ``image_tier``) and pinned while it is written out (``pin``):
neither a reserved nor a pinned slot is evicted. The caller serializes every call.
"""

from __future__ import annotations

from collections import OrderedDict

import torch


class PackedBlockCache:
    def __init__(self, capacity_bytes: int, caches: list[torch.Tensor], blocks_per_chunk: int):
        """``caches``: each layer's cache indexed by block id on dim 0 (``PagedKVLayout.blocks``)."""
        layer = (blocks_per_chunk, *caches[0].shape[1:])
        slot_bytes = len(caches) * torch.Size(layer).numel() * caches[0].element_size()
        self.num_slots = capacity_bytes // slot_bytes
        pin = caches[0].is_cuda  # host-to-device copies from pinned memory run asynchronously, at full speed
        self.arena = torch.empty((self.num_slots, len(caches), *layer), dtype=caches[0].dtype, pin_memory=pin)
        self.arena.zero_()  # touch every page now, not on the request path
        self._slots: OrderedDict[str, tuple[int, int]] = OrderedDict()  # chunk key -> (slot, blocks held)
        self._free = list(range(self.num_slots))
        self._pins: dict[str, int] = {}  # chunk key -> pins held

    @property
    def capacity_bytes(self) -> int:
        return self.arena.numel() * self.arena.element_size()

    def holds(self, chunk_key: str, hi: int) -> bool:
        """Whether the chunk's whole blocks [0, hi) are held (no LRU update)."""
        held = self._slots.get(chunk_key)
        return held is not None and hi <= held[1]

    def get(self, chunk_key: str, lo: int, hi: int) -> torch.Tensor | None:
        """Images of the chunk's whole blocks [lo, hi), ``[layers, hi - lo, ...]`` (a view
        of its slot); None if not held."""
        held = self._slots.get(chunk_key)
        if held is None or hi > held[1]:
            return None
        self._slots.move_to_end(chunk_key)
        return self.arena[held[0]].narrow(1, lo, hi - lo)

    def put(self, chunk_key: str, caches: list[torch.Tensor], block_ids: torch.Tensor) -> None:
        """Copy the chunk's whole blocks (``block_ids``, in order) out of the paged caches."""
        if chunk_key in self._slots:
            return
        slot = self.reserve()
        if slot is None:
            return
        self.fill(slot, caches, block_ids)
        self._slots[chunk_key] = (slot, len(block_ids))

    def fill(self, slot: int, caches: list[torch.Tensor], block_ids: torch.Tensor) -> None:
        """Copy blocks (``block_ids``, in order) out of the paged caches into a reserved slot."""
        for layer, cache in zip(self.arena[slot], caches):
            dst = layer.narrow(0, 0, len(block_ids))
            if dst.is_contiguous() and dst.device == cache.device and cache.is_contiguous():
                torch.index_select(cache, 0, block_ids, out=dst)  # no temporary
            else:
                dst.copy_(cache.index_select(0, block_ids.to(cache.device)))

    def reserve(self) -> int | None:
        """A slot out of use (the least recently used unpinned image goes), or None."""
        if not self._free:
            victim = next((key for key in self._slots if key not in self._pins), None)
            if victim is None:
                return None
            self._free.append(self._slots.pop(victim)[0])
        return self._free.pop()

    def slot(self, slot: int) -> torch.Tensor:
        """The whole slot: ``[layers, *layer shape with blocks_per_chunk blocks]``, contiguous."""
        return self.arena[slot]

    def commit(self, chunk_key: str, slot: int, blocks: int) -> None:
        """A reserved slot now holds the chunk's first ``blocks`` whole blocks."""
        if chunk_key in self._slots:
            self.release(slot)
        else:
            self._slots[chunk_key] = (slot, blocks)

    def release(self, slot: int) -> None:
        self._free.append(slot)

    def pin(self, chunk_key: str) -> tuple[torch.Tensor, int] | None:
        """Keep the chunk's slot from eviction until ``unpin``; (the slot, blocks held)."""
        held = self._slots.get(chunk_key)
        if held is None:
            return None
        self._pins[chunk_key] = self._pins.get(chunk_key, 0) + 1
        return self.arena[held[0]], held[1]

    def unpin(self, chunk_key: str) -> None:
        left = self._pins.pop(chunk_key, 1) - 1
        if left:
            self._pins[chunk_key] = left

    def __len__(self) -> int:
        return len(self._slots)
