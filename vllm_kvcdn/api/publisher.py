"""Turn a publish request (text or chat messages) into tokens and run it through the engine."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from vllm_kvcdn.connector.wire import (
    WAIT_PROMPT,
    as_transfer_params,
    merge_waited,
    pending_wait,
    publish_params,
    report_of,
    sync_params,
    verify_params,
)


class PublishError(Exception):
    """A request we refuse; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def text_tokens(tokenizer, text: str) -> list[int]:
    """Tokens of a raw prefix, as ``/v1/completions`` tokenizes a prompt that starts with it."""
    return list(tokenizer.encode(text))


_CUT_MARK = "\ue000kvcdn-cut\ue000"  # private-use characters: never part of a chat template


def chat_tokens(tokenizer, messages: list[dict]) -> list[int]:
    """Tokens the chat template gives for ``messages``, cut at the end of the last
    message's content: a later chat request that starts with these messages (and adds a
    question, as a new message or appended to the last one) starts with these tokens."""
    if not messages or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
        raise PublishError(400, "messages must be a non-empty list of {role, content} objects")
    content = messages[-1]["content"]
    if not isinstance(content, str) or not content:
        raise PublishError(400, "the last message's content must be a non-empty string")

    def render(msgs: list[dict]) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)

    # Find where the content ends by rendering it once more followed by a marker: a
    # search for the content itself can land inside the template's own text (a document
    # ending in "end" matched inside "<|im_end|>").
    marked = render([*messages[:-1], {**messages[-1], "content": content + _CUT_MARK}])
    cut = marked.find(_CUT_MARK)
    prefix = marked[:cut] if cut >= 0 else ""
    if not prefix.endswith(content) or not render(messages).startswith(prefix):
        raise PublishError(400, "the chat template does not reproduce the last message's content verbatim")
    return list(tokenizer.encode(prefix, add_special_tokens=False))


@dataclass
class Published:
    doc_id: str | None
    num_tokens: int
    num_chunks: int
    published: bool
    seconds: float
    fingerprint: str
    error: str = ""  # why not published (the connector's report)


async def _run(engine_client, tokens: list[int], kvcdn_params: dict, cache_salt: str | None,
               skip_prefix_cache: bool, lora_request=None) -> dict:
    """One flagged request through the serving engine; returns the connector's report."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=1, temperature=0.0, skip_reading_prefix_cache=skip_prefix_cache,
                            extra_args={"kv_transfer_params": as_transfer_params(kvcdn_params)})
    prompt = TokensPrompt(prompt_token_ids=tokens)
    if cache_salt:
        prompt["cache_salt"] = cache_salt
    final = None
    async for output in engine_client.generate(prompt, params, f"kvcdn-{uuid.uuid4().hex}", lora_request=lora_request):
        final = output
    report = report_of(final.kv_transfer_params if final else None)
    if not report:
        raise PublishError(503, "the engine did not report back: is it running KVCDNConnector?")
    if report.get("rejected"):
        raise PublishError(503, f"the engine refused to publish: {report['rejected']}")
    return report


async def _prefill(engine_client, tokens: list[int], kvcdn_params: dict, cache_salt: str | None,
                   lora_request=None) -> dict:
    """One flagged prefill through the serving engine (with the LoRA adapter
    ``lora_request``, if any), then (the worker writes in the background) a wait for its
    result; returns the two reports merged."""
    # The whole document is computed, never read from vLLM's prefix cache (the connector
    # also insists): cached blocks were computed in other requests' steps.
    report = await _run(engine_client, tokens, kvcdn_params, cache_salt, skip_prefix_cache=True,
                        lora_request=lora_request)
    wait = pending_wait(report, kvcdn_params.get("key"))
    if wait is None:
        return report
    return merge_waited(report, await _run(engine_client, WAIT_PROMPT, wait, None, skip_prefix_cache=False))


async def sync_index(engine_client, *, key: str) -> dict:
    """Wait until the engine's index has re-read the store (after a deletion: no request
    admitted afterwards matches the deleted document)."""
    return await _run(engine_client, WAIT_PROMPT, sync_params(key), None, skip_prefix_cache=False)


async def verify_tokens(engine_client, tokens: list[int], doc_id: str, *, key: str, lora_request=None) -> dict:
    """Recompute a published document from scratch, as a publish does, and have the worker
    compare it with the stored chunks byte for byte."""
    return await _prefill(engine_client, tokens, verify_params(doc_id, key), cache_salt=None,
                          lora_request=lora_request)


async def publish_tokens(engine_client, tokens: list[int], *, key: str, cache_salt: str | None, title: str,
                         metadata: dict, lora_request=None, private: bool = False,
                         require_grant: bool = False) -> Published:
    """Prefill ``tokens`` once through the serving engine (with a LoRA adapter:
    ``lora_request``), flagged (with the publisher key, which never leaves this process)
    so the connector saves it."""
    started = time.perf_counter()
    params = publish_params(key, title, metadata, private, require_grant)
    report = await _prefill(engine_client, tokens, params, cache_salt, lora_request=lora_request)
    return Published(
        doc_id=report.get("document"),
        num_tokens=report.get("num_tokens", len(tokens)),
        num_chunks=report.get("num_chunks", 0),
        published=bool(report.get("published")),
        seconds=time.perf_counter() - started,
        fingerprint=report.get("fingerprint", ""),
        error=str(report.get("rejected") or report.get("error") or ""),
    )
