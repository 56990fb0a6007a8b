"""How close two answers to the same prompt are: bit-equal (level 2), or the measures
behind level 3 of the exactness contract (README "Exactness"), used by ``kvcdn demo``, the tests and
``benchmarks/exactness.py``. Answers are ``offline.Answer`` dicts (token ids, logprobs).
"""

from __future__ import annotations


def identical(got: dict, ref: dict) -> bool:
    """The same greedy tokens with bit-equal logprobs (levels 1-2: the same computation)."""
    return got["token_ids"] == ref["token_ids"] and got["logprobs"] == ref["logprobs"]


def agreement(got: dict, ref: dict) -> int:
    """Generated tokens equal to ``ref``'s, up to the first divergence."""
    pairs = list(zip(got["token_ids"], ref["token_ids"]))
    return next((i for i, (a, b) in enumerate(pairs) if a != b), len(pairs))


def max_logprob_diff(got: dict, ref: dict, n: int | None = None) -> float:
    """Max |logprob difference| over the first ``n`` generated tokens (all when None; the
    first token always counts: both answers follow the same prompt up to there)."""
    k = None if n is None else max(n, 1)
    return max((abs(a - b) for a, b in zip(got["logprobs"][:k], ref["logprobs"][:k])), default=0.0)
