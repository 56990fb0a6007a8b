"""Host-RAM copies of documents' partial last blocks, beside the RAM tier's whole blocks.

The RAM tier (``block_cache``) keeps engine-native images of whole blocks only; a hot
document whose length is not a multiple of the block size used to read its last chunk
from the store on every hit for the few positions past its last whole block (measured,
issue 29: +0.12 s per hot hit of a 255-token document on ``s3://``). Those positions are
kept here in the canonical ``[tokens, kv_heads, head_dim]`` form, every layer's K then V in
one tensor, and written with the layout's own op on a hit (at most one block of tokens:
the packing op's cost there is small). Least recently used out first, bounded in bytes.
On a node with a disk tier of block images the tails are kept there too (``block_tier``).
The caller serializes every call (``block_tier`` holds its lock).
"""

from __future__ import annotations

from collections import OrderedDict

import torch


class TailCache:
    def __init__(self, capacity_bytes: int):
        self.capacity_bytes = capacity_bytes
        self.nbytes = 0
        self._tails: OrderedDict[str, tuple[int, torch.Tensor]] = OrderedDict()  # key -> (offset, [2L, n, H, D])

    def holds(self, chunk_key: str, lo: int, hi: int) -> bool:
        """Whether the chunk's positions [lo, hi) (counted from the chunk's start) are held."""
        held = self._tails.get(chunk_key)
        return held is not None and held[0] <= lo and hi <= held[0] + held[1].shape[1]

    def get(self, chunk_key: str, lo: int, hi: int) -> torch.Tensor | None:
        """The chunk's positions [lo, hi): ``[2 * layers, hi - lo, kv_heads, head_dim]``
        (every layer's K, then every layer's V), a view; None if not held."""
        if not self.holds(chunk_key, lo, hi):
            return None
        self._tails.move_to_end(chunk_key)
        offset, tail = self._tails[chunk_key]
        return tail.narrow(1, lo - offset, hi - lo)

    def put(self, chunk_key: str, offset: int, tail: torch.Tensor) -> None:
        """Keep the chunk's positions from ``offset`` to its end: ``tail`` is
        ``[2 * layers, n, kv_heads, head_dim]`` in host memory, kept as it is (not copied)."""
        size = tail.nbytes
        if chunk_key in self._tails or not size or size > self.capacity_bytes:
            return
        while self.nbytes + size > self.capacity_bytes:
            _, (_, evicted) = self._tails.popitem(last=False)
            self.nbytes -= evicted.nbytes
        self._tails[chunk_key] = (offset, tail)
        self.nbytes += size

    def __len__(self) -> int:
        return len(self._tails)
