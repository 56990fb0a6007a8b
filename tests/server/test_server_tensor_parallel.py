"""`kvcdn serve --tensor-parallel-size 2` over HTTP (vLLM 0.32's CPU backend, the ``mp``
executor, one core per rank): the side API publishes through both ranks, an OpenAI request
hits it, ``verify`` recomputes both ranks' parts, ``/stats`` and the ledger count the read
once for the request, not once per rank. The answers' exactness under TP is proven offline
(tests/engine/test_tensor_parallel.py); here, the server's plumbing."""

from __future__ import annotations

import pytest

from tests.rigs.servers import ask, kvcdn_server, metered_reads
from vllm_kvcdn.api.client import SideAPIClient

KEY = "tp-test-key"


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    base = tmp_path_factory.mktemp("tp-server")
    server = kvcdn_server(tiny_model, base / "store", KEY, base / "server.log",
                          vllm_args=("--tensor-parallel-size", "2", "--distributed-executor-backend", "mp"))
    server.env["VLLM_CPU_OMP_THREADS_BIND"] = "0|1"  # one core per rank
    server.start()
    yield server
    server.stop()


def test_publish_hit_verify_and_count_once_under_tensor_parallelism(server, tiny_model, texts):
    api = SideAPIClient(server.url, key=KEY)
    messages = [{"role": "user", "content": " ".join(texts["doc_e"][:60])}]
    doc = api.publish(messages=messages, title="tp2")
    listed = api.get(doc["id"])
    assert listed["parts"] == ["h0-1of2", "h1-2of2"] and listed["servable"] is True
    hit = ask(server.url, str(tiny_model), messages + [{"role": "user", "content": "What is it about?"}])
    assert hit["kvcdn"]["hit"] is True and hit["cached"] == doc["num_tokens"], hit["kvcdn"]
    assert api.verify(doc["id"])["identical"] is True  # both ranks recomputed their parts
    stats = api.stats()
    assert stats["profile"]["runtime"]["tensor_parallel_size"] == 2
    assert stats["published_documents"] == 1 and stats["reads"] == 1
    assert stats["loaded_tokens"] == doc["num_tokens"]  # once, not once per rank
    (read,) = metered_reads(api, 1)
    assert read["document"] == doc["id"] and read["loaded_tokens"] == doc["num_tokens"]
