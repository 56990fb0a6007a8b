"""Which part of a chunk a tensor-parallel rank holds, as vLLM places KV heads.

Under tensor parallelism rank r computes and caches only its KV heads, so each rank
stores and loads its own *part* of every chunk: one object per part, named by the heads
it holds (``h0-4of8``), written by that rank alone, with no gather between ranks. Ranks
that replicate a head (fewer KV heads than ranks) hold the same part, so they share one
object. A whole chunk (one rank) is the part named ``""``.

Placement follows vLLM's ``QKVParallelLinear`` (vLLM 0.32, ``linear.py``): with H KV heads
and T ranks, each rank holds ``max(1, H // T)`` heads; when T >= H the heads are
replicated ``T // H`` times and rank r holds head ``r // (T // H)``; else rank r holds
heads ``[r * H/T, (r + 1) * H/T)``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_NAME = re.compile(r"h(\d+)-(\d+)of(\d+)")


@dataclass(frozen=True)
class KVPart:
    first_head: int
    end_head: int  # exclusive
    total_heads: int

    @property
    def name(self) -> str:
        """The part's name in object keys, headers and manifests ("": the whole chunk)."""
        if self.first_head == 0 and self.end_head == self.total_heads:
            return ""
        return f"h{self.first_head}-{self.end_head}of{self.total_heads}"

    @property
    def num_heads(self) -> int:
        return self.end_head - self.first_head

    @classmethod
    def parse(cls, name: str, total_heads: int) -> "KVPart":
        if name == "":
            return cls(0, total_heads, total_heads)
        found = _NAME.fullmatch(name)
        if found is None:
            raise ValueError(f"not a KV part name: {name!r}")
        first, end, total = map(int, found.groups())
        if total != total_heads or not 0 <= first < end <= total:
            raise ValueError(f"KV part {name!r} does not fit a model with {total_heads} KV heads")
        return cls(first, end, total)


def rank_part(total_heads: int, tp_size: int, tp_rank: int) -> KVPart:
    """The KV heads tensor-parallel rank ``tp_rank`` of ``tp_size`` holds."""
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"rank {tp_rank} is not one of {tp_size} ranks")
    if tp_size >= total_heads:
        if tp_size % total_heads:
            raise ValueError(f"{tp_size} ranks do not replicate {total_heads} KV heads evenly")
        head = tp_rank // (tp_size // total_heads)
        return KVPart(head, head + 1, total_heads)
    if total_heads % tp_size:
        raise ValueError(f"{total_heads} KV heads do not split evenly over {tp_size} ranks")
    per_rank = total_heads // tp_size
    return KVPart(tp_rank * per_rank, (tp_rank + 1) * per_rank, total_heads)


def all_parts(total_heads: int, tp_size: int) -> list[str]:
    """The names of the distinct parts every chunk has under ``tp_size`` ranks, in head order."""
    names = [rank_part(total_heads, tp_size, r).name for r in range(tp_size)]
    return list(dict.fromkeys(names))
