"""The transformers path (no server): publish a document's KV, then answer from it.
Runs on Apple MPS when available, else CUDA, else CPU.

    python examples/transformers_mps.py [--model DIR] [--device mps|cuda|cpu]
"""

from __future__ import annotations

import argparse
import time

from vllm_kvcdn.cli.demo import QUESTION, SAMPLE_DOCUMENT, demo_model_dir, ensure_tiny_model
from vllm_kvcdn.hf import HFKVCDN


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a transformers model dir (default: the tiny model)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--store", default=None, help="store URL (default: $KVCDN_STORE or ~/.cache/kvcdn)")
    args = parser.parse_args()

    kv = HFKVCDN(args.model or str(ensure_tiny_model(demo_model_dir())), store_url=args.store, device=args.device)
    t0 = time.perf_counter()
    doc = kv.publish(text=SAMPLE_DOCUMENT, title="sample")
    print(f"[{kv.device.type}] published {doc.doc_id[:16]}: {doc.num_tokens} tokens in {time.perf_counter() - t0:.2f}s")

    prompt = kv.encode(SAMPLE_DOCUMENT + QUESTION)
    t0 = time.perf_counter()
    out = kv.generate(prompt, max_new_tokens=24)
    print(f"[{kv.device.type}] from the artifact ({out.cached_tokens} tokens loaded): {out.text!r} "
          f"in {time.perf_counter() - t0:.2f}s")


if __name__ == "__main__":
    main()
