"""Which part of a chunk a rank holds, as vLLM places KV heads and layers.

Under tensor parallelism rank r computes and caches only its KV heads, so each rank
stores and loads its own *part* of every chunk: one object per part, named by the heads
it holds (``h0-4of8``), written by that rank alone, with no gather between ranks. Ranks
that replicate a head (fewer KV heads than ranks) hold the same part, so they share one
object. A whole chunk (one rank) is the part named ``""``. Under pipeline parallelism a
stage holds a range of layers (``l0-14of28``; both: ``h0-4of8.l0-14of28``); the connector
still refuses PP at start (README "Tensor and pipeline parallelism"), the naming and the
stage ranges are ready and tested against vLLM's own assignment (``get_pp_indices``).

Placement follows vLLM's ``QKVParallelLinear`` (vLLM 0.32, ``linear.py``): with H KV heads
and T ranks, each rank holds ``max(1, H // T)`` heads; when T >= H the heads are
replicated ``T // H`` times and rank r holds head ``r // (T // H)``; else rank r holds
heads ``[r * H/T, (r + 1) * H/T)``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_RANGE = re.compile(r"([hl])(\d+)-(\d+)of(\d+)")


@dataclass(frozen=True)
class KVPart:
    first_head: int
    end_head: int  # exclusive
    total_heads: int
    layers: tuple[int, int, int] | None = None  # (first, end, total) of a pipeline stage; None: all

    @property
    def name(self) -> str:
        """The part's name in object keys, headers and manifests ("": the whole chunk)."""
        names = []
        if (self.first_head, self.end_head) != (0, self.total_heads):
            names.append(f"h{self.first_head}-{self.end_head}of{self.total_heads}")
        if self.layers is not None and self.layers[:2] != (0, self.layers[2]):
            names.append("l{}-{}of{}".format(*self.layers))
        return ".".join(names)

    @property
    def num_heads(self) -> int:
        return self.end_head - self.first_head

    @property
    def first_layer(self) -> int:
        return self.layers[0] if self.layers else 0

    @classmethod
    def parse(cls, name: str, total_heads: int) -> "KVPart":
        heads, layers = (0, total_heads, total_heads), None
        for piece in name.split(".") if name else []:
            found = _RANGE.fullmatch(piece)
            if found is None:
                raise ValueError(f"not a KV part name: {name!r}")
            kind, *bounds = found.groups()
            first, end, total = map(int, bounds)
            if not 0 <= first < end <= total or (kind == "h" and total != total_heads):
                raise ValueError(f"KV part {name!r} does not fit a model with {total_heads} KV heads")
            if kind == "h":
                heads = (first, end, total)
            else:
                layers = (first, end, total)
        part = cls(*heads, layers)
        if part.name != name:  # one spelling per part: it is an object key
            raise ValueError(f"not a KV part name: {name!r}")
        return part


def rank_part(total_heads: int, tp_size: int, tp_rank: int, layers: tuple[int, int, int] | None = None) -> KVPart:
    """The KV heads tensor-parallel rank ``tp_rank`` of ``tp_size`` holds (of the pipeline
    stage holding ``layers``: first, end, total)."""
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"rank {tp_rank} is not one of {tp_size} ranks")
    if tp_size >= total_heads:
        if tp_size % total_heads:
            raise ValueError(f"{tp_size} ranks do not replicate {total_heads} KV heads evenly")
        head = tp_rank // (tp_size // total_heads)
        return KVPart(head, head + 1, total_heads, layers)
    if total_heads % tp_size:
        raise ValueError(f"{total_heads} KV heads do not split evenly over {tp_size} ranks")
    per_rank = total_heads // tp_size
    return KVPart(tp_rank * per_rank, (tp_rank + 1) * per_rank, total_heads, layers)


def all_parts(total_heads: int, tp_size: int, stages: list[tuple[int, int, int]] | None = None) -> list[str]:
    """The names of the distinct parts every chunk has under ``tp_size`` ranks (and the
    pipeline ``stages``' layer ranges), stage by stage, in head order."""
    names = [rank_part(total_heads, tp_size, r, stage).name for stage in stages or [None] for r in range(tp_size)]
    return list(dict.fromkeys(names))


def stage_layers(layer_indices: list[int], total_layers: int) -> tuple[int, int, int] | None:
    """The layer range a worker holds, from the indices of its KV caches (None: all of
    them); a stage holds one contiguous range."""
    first, end = min(layer_indices), max(layer_indices) + 1
    if sorted(layer_indices) != list(range(first, end)) or end > total_layers:
        raise ValueError(f"KV cache layers {sorted(layer_indices)} are not one range of 0..{total_layers - 1}")
    return None if (first, end) == (0, total_layers) else (first, end, total_layers)
