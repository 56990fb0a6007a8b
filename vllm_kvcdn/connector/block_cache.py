"""Host-RAM tier of the worker: engine-native images of published chunks' whole blocks.

A cold load reads a chunk file, verifies it and packs its K/V into the paged cache with
the platform's op (on CPU that op transposes K and is the slowest step of a load). The
packed blocks it produced are then kept here, keyed by chunk key, so the next load of a
hot document is a plain block copy. Only whole blocks are kept; a chunk's partial last
block is always written from the file. Least recently used images go first.
"""

from __future__ import annotations

from collections import OrderedDict

import torch


class PackedBlockCache:
    def __init__(self, capacity_bytes: int):
        self.capacity_bytes = capacity_bytes
        self.used_bytes = 0
        self._images: OrderedDict[str, list[torch.Tensor]] = OrderedDict()

    @staticmethod
    def _size(image: list[torch.Tensor]) -> int:
        return sum(t.numel() * t.element_size() for t in image)

    def get(self, chunk_key: str) -> list[torch.Tensor] | None:
        """Per-layer packed whole blocks of the chunk, in block order; None if not held."""
        image = self._images.get(chunk_key)
        if image is not None:
            self._images.move_to_end(chunk_key)
        return image

    def put(self, chunk_key: str, image: list[torch.Tensor]) -> None:
        size = self._size(image)
        if size > self.capacity_bytes or chunk_key in self._images:
            return
        while self.used_bytes + size > self.capacity_bytes:
            _, evicted = self._images.popitem(last=False)
            self.used_bytes -= self._size(evicted)
        self._images[chunk_key] = image
        self.used_bytes += size

    def __len__(self) -> int:
        return len(self._images)
