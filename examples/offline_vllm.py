"""vLLM offline (`vllm.LLM`) with KVCDNConnector: publish once, then every prompt that
starts with the document loads it. Run twice: the second run starts a fresh engine and
still hits, because the artifact lives in the store.

    python examples/offline_vllm.py [--model DIR] [--store file:///tmp/kvcdn]
"""

from __future__ import annotations

import argparse

from transformers import AutoTokenizer

from vllm_kvcdn.cli.demo import QUESTION, SAMPLE_DOCUMENT, demo_model_dir, ensure_tiny_model
from vllm_kvcdn.testing.offline import generate, make_llm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--store", default="file:///tmp/kvcdn-example")
    args = parser.parse_args()
    model = args.model or str(ensure_tiny_model(demo_model_dir()))
    tok = AutoTokenizer.from_pretrained(model)
    llm = make_llm(model, store_url=args.store, enable_prefix_caching=False)
    doc = tok.encode(SAMPLE_DOCUMENT)
    print("publish:", generate(llm, doc, publish=True, title="sample").kvcdn)
    answer = generate(llm, doc + tok.encode(QUESTION), max_tokens=16)
    print("answer:", repr(answer.text), "| kvcdn:", answer.kvcdn)


if __name__ == "__main__":
    main()
