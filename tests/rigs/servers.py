"""Real OpenAI-compatible servers on loopback for the HTTP tests."""

from __future__ import annotations

import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from vllm_kvcdn.cli.serve import kv_transfer_config
from vllm_kvcdn.defaults import CPU_ENGINE_ENV, LEDGER_ENV
from vllm_kvcdn.market.ledger import FLUSH_S
from vllm_kvcdn.testing.server_process import Server

SERVER_ENV = CPU_ENGINE_ENV
VLLM_BATCH_SPREAD = 0.05  # |logprob| moved by batching alone (Reference.tolerance)
COMMON_ARGS = ["--max-model-len", "4096", "--enforce-eager", "--gpu-memory-utilization", "0.3",
               "--no-enable-prefix-caching", "--max-logprobs", "5"]


def vllm_server(model: Path, log: Path) -> Server:
    """Plain vLLM, no connector: the reference."""
    return Server([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
                   "--enable-prompt-tokens-details", *COMMON_ARGS], log, env=SERVER_ENV)


def kvcdn_server(model: Path, store: Path | str, key: str, log: Path, vllm_args: tuple[str, ...] = (),
                 **extra_config) -> Server:
    """`kvcdn serve` on ``store`` (a directory, or a store URL), with more vLLM flags
    ``vllm_args``; ``extra_config``: more connector settings (kv_connector_extra_config;
    ``load_policy`` "always" unless given: see ``tests/conftest.py`` ``ALWAYS_LOAD``).
    Its ledger is a file of its own, beside its log (kept across its restarts)."""
    kvcdn = Path(sys.executable).with_name("kvcdn")
    url = f"file://{store}" if isinstance(store, Path) else store
    transfer = kv_transfer_config(url, None, None)
    transfer["kv_connector_extra_config"].update({"load_policy": "always", **extra_config})
    config = ["--kv-transfer-config", json.dumps(transfer)]
    return Server([str(kvcdn), "serve", str(model), "--kvcdn-store", url, *config, *COMMON_ARGS, *vllm_args], log,
                  env={**SERVER_ENV, "KVCDN_PUBLISHER_KEY": key, LEDGER_ENV: str(log.with_suffix(".ledger.sqlite3"))})


def start_all(*servers: Server) -> None:
    """Start servers side by side (an engine takes ~30 s to come up)."""
    with ThreadPoolExecutor(len(servers)) as pool:
        list(pool.map(lambda s: s.start(), servers))


def ask(url: str, model: str, messages: list[dict], cache_salt: str | None = None) -> dict:
    """A greedy chat completion through the official client, with what it says of the cache."""
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    # Tokens as ids, not text: the text of a byte-level token that is part of a UTF-8
    # character depends on how the detokenizer meets it ('' in one answer, 'it' in another for
    # the same id, seen on AVX-512), and distinct ids with the same text would merge in `top`.
    resp = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0,
                                          logprobs=True, top_logprobs=5,
                                          extra_body={"return_tokens_as_token_ids": True,
                                                      **({"cache_salt": cache_salt} if cache_salt else {})})
    choice = resp.choices[0]
    return {
        "text": choice.message.content,
        "tokens": [t.token for t in choice.logprobs.content],
        "logprobs": [t.logprob for t in choice.logprobs.content],
        "top": [{top.token: top.logprob for top in t.top_logprobs} for t in choice.logprobs.content],
        "cached": resp.usage.prompt_tokens_details.cached_tokens or 0,
        "prompt_tokens": resp.usage.prompt_tokens,
        "kvcdn": (resp.model_extra.get("kv_transfer_params") or {}).get("kvcdn", {}),
    }


def metered_reads(api, n: int, timeout: float = 15.0, **filters) -> list[dict]:
    """The ledger's reads matching ``filters`` once ``n`` are there (or ``timeout``), and a
    flush period later: rows reach the file within ``ledger.FLUSH_S``, and a count checked
    at once could miss rows still queued."""
    deadline = time.monotonic() + timeout
    while len(api.usage(detail=True, **filters)["reads"]) < n and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(2 * FLUSH_S)
    return api.usage(detail=True, **filters)["reads"]


def ask_all_at_once(url: str, model: str, convs: list[list[dict]]) -> list[dict]:
    with ThreadPoolExecutor(len(convs)) as pool:
        return list(pool.map(lambda c: ask(url, model, c), convs))


def deviation(got: dict, ref: dict) -> tuple[int, float]:
    """(the first generated token where the two differ, the max |logprob diff| before it,
    the first token's top-5 distribution included)."""
    n = next((i for i, (a, b) in enumerate(zip(got["tokens"], ref["tokens"])) if a != b), len(ref["tokens"]))
    shared = got["top"][0].keys() & ref["top"][0].keys()
    diffs = [abs(got["top"][0][t] - ref["top"][0][t]) for t in shared]
    diffs += [abs(a - b) for a, b in zip(got["logprobs"][:n], ref["logprobs"][:n])]
    return n, max(diffs, default=0.0)


def near_tie(answer: dict, i: int, tol: float) -> bool:
    """The top two candidates at generated token ``i`` are within ``tol`` of each other."""
    best = sorted(answer["top"][i].values(), reverse=True)
    return len(best) > 1 and best[0] - best[1] <= tol


@dataclass
class Reference:
    """The plain server's answers, one request at a time, and its own spread."""

    answers: list[dict]
    band: float  # max deviation when the plain server got the same requests all at once

    def __getitem__(self, i: int) -> dict:
        return self.answers[i]

    @property
    def tolerance(self) -> float:
        """Twice vLLM's own spread: what this run measured, and at least what batching moves
        on these CPUs (plain vLLM, this model, 16 requests at once: 0.052-0.061 on an AVX2
        EPYC over four runs, 0.049 on an AVX-512 one). One run's batches can show far less
        (0.008 once on AVX-512) while a hit among 32 requests, in other batches, moved 0.05
        (the same bits on either server: batching, not the load). A wrong load is off by
        10x-100x (the exactness tests' negative control); bit-exactness is tested there."""
        return 2 * max(self.band, VLLM_BATCH_SPREAD)

    def check(self, got: dict, i: int, what: str = "") -> None:
        """Level 3: logprobs within the band; a greedy token may differ only where vLLM itself
        is at a near-tie, and the first token's distribution must match."""
        ref = self.answers[i]
        n, diff = deviation(got, ref)
        assert diff <= self.tolerance, f"{what}: |logprob diff| {diff:.3g}"
        assert len(got["top"][0].keys() & ref["top"][0].keys()) >= 3, f"{what}: another first-token distribution"
        if n < len(ref["tokens"]):
            best = sorted(ref["top"][n].values(), reverse=True)
            assert near_tie(ref, n, self.tolerance), (
                f"{what}: diverged at token {n} (|logprob diff| before it {diff:.3g}; the reference's top two "
                f"there {best[0] - best[1]:.3g} apart; tolerance {self.tolerance:.3g}); got {got['tokens'][n]} "
                f"({got['logprobs'][n]:.4g}), reference's top {ref['top'][n]}")


def reference_answers(url: str, model: str, convs: list[list[dict]]) -> Reference:
    """A plain server's answers one at a time, and its own spread when asked all at once."""
    answers = [ask(url, model, conv) for conv in convs]
    concurrent = ask_all_at_once(url, model, convs)
    return Reference(answers, band=max(deviation(a, b)[1] for a, b in zip(concurrent, answers)))
