"""Cross-profile experiment: a vLLM-produced artifact consumed by transformers.

Exactness is promised within one compute profile; this measures what crossing costs.
vLLM (CPU, eager) publishes documents; transformers (CPU) then answers questions over
them twice: loading the vLLM artifact (``allow_cross_profile=True``) and from a full
prefill of its own. Reported: greedy token agreement and the max |logit difference| of
the next token, plus vLLM's own answer against transformers' for scale.

    python benchmarks/cross_profile.py [--model DIR] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

QUESTIONS = ["\nQuestion: which river runs past the stone city? Answer:", "\nQ: what is stored in a chunk? A:",
             "\nSummary of the text above:"]


def documents(n: int) -> list[str]:
    from vllm_kvcdn.testing.tiny_model import corpus

    lines = corpus()
    return [" ".join(lines[i * 70 : i * 70 + 60]) for i in range(n)]


def vllm_phase(model: str, store_url: str, n_docs: int, new_tokens: int, out: str) -> None:
    """Publish the documents and answer every question with vLLM (runs in its own process)."""
    from transformers import AutoTokenizer

    from vllm_kvcdn.testing.offline import generate, make_llm

    tok = AutoTokenizer.from_pretrained(model)
    llm = make_llm(model, store_url=store_url, enable_prefix_caching=False)
    result = {"docs": [], "answers": {}}
    for d, text in enumerate(documents(n_docs)):
        report = generate(llm, tok.encode(text), publish=True).kvcdn
        result["docs"].append(report["document"])
        for q, question in enumerate(QUESTIONS):
            answer = generate(llm, tok.encode(text + question), max_tokens=new_tokens)
            result["answers"][f"{d}/{q}"] = answer.token_ids
    Path(out).write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model dir (default: the generated tiny model)")
    parser.add_argument("--docs", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--_vllm-phase", nargs=2, metavar=("STORE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    from vllm_kvcdn.cli.demo import demo_model_dir, ensure_tiny_model

    model = args.model or str(ensure_tiny_model(demo_model_dir()))
    if args._vllm_phase:
        return vllm_phase(model, args._vllm_phase[0], args.docs, args.new_tokens, args._vllm_phase[1])

    import torch
    from report import write_report

    from vllm_kvcdn.hf import HFKVCDN

    work = Path(tempfile.mkdtemp(prefix="kvcdn-cross-"))
    store_url = f"file://{work / 'store'}"
    vllm_out = work / "vllm.json"
    print("[cross-profile] publishing with vLLM ...", flush=True)
    subprocess.run([sys.executable, __file__, "--model", model, "--docs", str(args.docs), "--new-tokens",
                    str(args.new_tokens), "--_vllm-phase", store_url, str(vllm_out)], check=True,
                   stdout=subprocess.DEVNULL if not sys.stdout.isatty() else None)
    published = json.loads(vllm_out.read_text())

    hf = HFKVCDN(model, store_url=store_url, device="cpu", allow_cross_profile=True)
    rows = []
    for d, (text, doc_id) in enumerate(zip(documents(args.docs), published["docs"])):
        for q, question in enumerate(QUESTIONS):
            prompt = hf.encode(text + question)
            loaded = hf.generate(prompt, doc_id=doc_id, max_new_tokens=args.new_tokens)
            ids = torch.tensor([prompt])
            scratch = hf.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                                        do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()
            diff = (hf.next_token_logits(prompt, doc_id=doc_id)
                    - hf.next_token_logits(prompt, use_artifact=False)).abs().max().item()
            vllm_answer = published["answers"][f"{d}/{q}"]
            rows.append({
                "prompt": f"doc {d} / q {q}",
                "doc_tokens": loaded.cached_tokens,
                "agree_vllm_artifact": _agreement(loaded.token_ids, scratch),
                "max_logit_diff": diff,
                "agree_vllm_engine": _agreement(vllm_answer, scratch),
            })
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in ("agree_vllm_artifact", "agree_vllm_engine")}
    worst = max(r["max_logit_diff"] for r in rows)
    notes = (f"Token agreement = share of the {args.new_tokens} greedy tokens equal to transformers' own "
             f"full-prefill answer, up to the first divergence. Mean with the vLLM artifact loaded: "
             f"{mean['agree_vllm_artifact']:.3f}; vLLM's own answer vs transformers: "
             f"{mean['agree_vllm_engine']:.3f}; worst next-token |logit diff|: {worst:g} (bf16).")

    def plot(ax):
        x = range(len(rows))
        ax.bar([i - 0.2 for i in x], [r["agree_vllm_artifact"] for r in rows], 0.4,
               label="transformers + vLLM artifact")
        ax.bar([i + 0.2 for i in x], [r["agree_vllm_engine"] for r in rows], 0.4, label="vLLM engine answer")
        ax.set_xticks(list(x), [r["prompt"] for r in rows], rotation=45, fontsize=7)
        ax.set_ylabel("greedy agreement with transformers prefill")
        ax.set_ylim(0, 1.05)
        ax.legend(fontsize=8)

    title = "Cross-profile: vLLM (CPU) artifact used by transformers (CPU)"
    path = write_report(args.out, "cross_profile", title=title,
                        rows=rows, plot=plot, notes=notes, extra={"summary": {**mean, "worst_logit_diff": worst}},
                        columns=[("prompt", "prompt"), ("doc_tokens", "doc tokens loaded"),
                                 ("agree_vllm_artifact", "agreement, artifact loaded"),
                                 ("max_logit_diff", "max abs logit diff"),
                                 ("agree_vllm_engine", "agreement, vLLM's own answer")])
    print(path.read_text())


def _agreement(a: list[int], b: list[int]) -> float:
    n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return n / max(len(b), 1)


if __name__ == "__main__":
    main()
