"""Publish a document to a running `kvcdn serve`, then query it with the official `openai`
client, through both /v1/completions and /v1/chat/completions.

    kvcdn serve MODEL --publisher-key secret &            # or: bash examples/serve_tiny.sh
    KVCDN_PUBLISHER_KEY=secret python examples/openai_client.py --server http://localhost:8000
"""

from __future__ import annotations

import argparse

import openai

from vllm_kvcdn.api.client import SideAPIClient
from vllm_kvcdn.cli.demo import SAMPLE_DOCUMENT


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", default="http://localhost:8000")
    args = parser.parse_args()

    side = SideAPIClient(args.server)  # publisher key from $KVCDN_PUBLISHER_KEY
    client = openai.OpenAI(base_url=args.server + "/v1", api_key="unused")
    model = client.models.list().data[0].id

    # 1. A raw prefix, for /v1/completions prompts that start with it.
    doc = side.publish(text=SAMPLE_DOCUMENT, title="sample (text)")
    print(f"published text document {doc['id'][:16]}: {doc['num_tokens']} tokens")
    resp = client.completions.create(model=model, prompt=SAMPLE_DOCUMENT + "\nQuestion: why is it exact?\nAnswer:",
                                     max_tokens=16, temperature=0)
    report(resp, resp.choices[0].text)

    # 2. A chat prefix: later conversations that start with these messages hit.
    messages = [{"role": "system", "content": "Answer questions about the document."},
                {"role": "user", "content": SAMPLE_DOCUMENT}]
    doc = side.publish(messages=messages, title="sample (chat)")
    print(f"published chat document {doc['id'][:16]}: {doc['num_tokens']} tokens")
    resp = client.chat.completions.create(
        model=model, messages=messages + [{"role": "user", "content": "What is a chunk?"}], max_tokens=16,
        temperature=0)
    report(resp, resp.choices[0].message.content)


def report(resp, text: str) -> None:
    details = resp.usage.prompt_tokens_details
    kvcdn = (resp.model_extra.get("kv_transfer_params") or {}).get("kvcdn", {})
    print(f"  answer: {text!r}")
    print(f"  prompt tokens {resp.usage.prompt_tokens}, cached {details.cached_tokens if details else 0}, "
          f"kvcdn: {kvcdn}")


if __name__ == "__main__":
    main()
