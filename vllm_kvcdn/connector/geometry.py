"""The shape of this engine's KV cache, as an artifact must match it, and the arithmetic
of positions, blocks and slots that loads and publishes share."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")
_FP8 = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


@dataclass(frozen=True)
class KVGeometry:
    """What an artifact must match to go into this engine's cache."""

    block_size: int
    num_kv_heads: int
    head_dim: int
    model_dtype: torch.dtype
    cache_dtype: str  # vLLM's cache_dtype string ("auto", "fp8", ...)

    @property
    def kv_dtype(self) -> torch.dtype:
        if self.cache_dtype == "auto":
            return self.model_dtype
        return _FP8.get(self.cache_dtype) or getattr(torch, self.cache_dtype)

    def token_bytes(self, num_layers: int) -> int:
        """KV bytes of one token over ``num_layers`` layers."""
        return num_layers * 2 * self.num_kv_heads * self.head_dim * self.kv_dtype.itemsize

    def chunk_object_bytes(self, chunk_size: int, num_layers: int) -> int:
        """Room for a stored chunk: its K and V, its token ids and a header."""
        header_room = 64 << 10  # the safetensors header: a few hundred bytes per layer
        return chunk_size * (self.token_bytes(num_layers) + 4) + header_room

    def slots(self, block_ids: list[int], start: int, end: int) -> torch.Tensor:
        """vLLM's slot mapping of prompt positions [start, end) in a request's blocks."""
        positions = torch.arange(start, end, dtype=torch.long)
        blocks = torch.tensor(block_ids, dtype=torch.long)[positions // self.block_size]
        return blocks * self.block_size + positions % self.block_size

    def block_ids(self, block_ids: list[int], start: int, end: int) -> torch.Tensor:
        """Ids of the request's blocks holding positions [start, end) (block-aligned)."""
        return torch.tensor(block_ids[start // self.block_size : end // self.block_size], dtype=torch.long)

    def whole_blocks(self, start: int, end: int) -> tuple[int, int]:
        """Positions [first, last) of the whole blocks inside [start, end)."""
        bs = self.block_size
        return -(-start // bs) * bs, end // bs * bs

    def blocks_touched(self, block_ids: list[int], start: int, end: int) -> list[int]:
        """The request's blocks holding any of positions [start, end)."""
        return block_ids[start // self.block_size : (end - 1) // self.block_size + 1]


def layer_indices(kv_caches: dict) -> dict[int, str]:
    """The caches' layer names by layer index. Two caches with one index (a draft model's
    layer 0 beside the target's) would put KV in the wrong layer: refused."""
    by_index: dict[int, str] = {}
    for name in kv_caches:
        found = _LAYER_INDEX.search(name)
        if found is None:
            raise ValueError(f"kvcdn: cannot tell the layer index of KV cache {name!r}")
        index = int(found.group(1))
        if index in by_index:
            raise ValueError(f"kvcdn: KV caches {by_index[index]!r} and {name!r} are both layer {index} "
                             "(a draft model's layers?); kvcdn loads one model's layers")
        by_index[index] = name
    return by_index


def layers_in_order(kv_caches: dict, first_layer: int = 0) -> list[str]:
    """The caches' layer names by layer index: an artifact's (or a pipeline stage's part's)
    layer i is the model's layer ``first_layer + i``; a gap is refused."""
    by_index = layer_indices(kv_caches)
    expected = list(range(first_layer, first_layer + len(by_index)))
    if sorted(by_index) != expected:
        raise ValueError(f"kvcdn: KV cache layers {sorted(by_index)} are not {expected[0]}..{expected[-1]}")
    return [by_index[i] for i in expected]
