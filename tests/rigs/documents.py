"""Documents and queries for the engine tests: token ids cut from the tiny model's corpus
(``testing.tiny_model.corpus``), the engine-job ops that ask about them, and vLLM's
counters the tests read (``testing.engine_job`` collects them per op)."""

from __future__ import annotations

EXTERNAL = "vllm:prompt_tokens_by_source{source=external_kv_transfer}"  # tokens loaded through a connector
COMPUTED = "vllm:request_prefill_kv_computed_tokens"  # tokens vLLM computed in prefill


def document(tokenizer, first_line: int, tokens: int, lines: int = 200) -> list[int]:
    """Exactly ``tokens`` token ids of the corpus from line ``first_line`` on."""
    from vllm_kvcdn.testing.tiny_model import corpus

    ids = tokenizer(" ".join(corpus()[first_line : first_line + lines])).input_ids[:tokens]
    assert len(ids) == tokens, f"lines {first_line}+{lines} of the corpus give {len(ids)} < {tokens} tokens"
    return ids


def query(name: str, ids: list[int], max_tokens: int, **kw) -> dict:
    """An engine-job op: one greedy request of ``ids`` (``kw``: salt, lora, ...)."""
    return {"name": name, "op": "query", "ids": ids, "max_tokens": max_tokens, **kw}
