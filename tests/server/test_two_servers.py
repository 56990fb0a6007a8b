"""Two `kvcdn serve` processes on one S3 bucket (moto's S3 server on loopback: the real
protocol, tests/rigs/s3.py): what one publishes the other serves within the refresh bound,
what one deletes the other stops serving, a restart keeps everything, and both serve
concurrent traffic over documents published on either.

Each server signs what it publishes with its own key and trusts the other's (a shared
bucket serves signed documents only). Server B reads through a disk tier. Hits are
compared bit for bit across the two servers (same artifact, same engine settings) and
with a plain vLLM server (no connector) at level 3 of the contract, within the spread
plain vLLM shows itself (test_server.py).
"""

from __future__ import annotations

import concurrent.futures as futures
import time
import urllib.request

import pytest

from tests.rigs.s3 import FaultProxy
from tests.rigs.servers import ask, kvcdn_server, reference_answers, start_all, vllm_server
from vllm_kvcdn.api.client import SideAPIClient
from vllm_kvcdn.cli.main import main as kvcdn

KEY = "fleet-publisher-key"
REFRESH_S = 2.0  # the default bound: index_refresh_s
QUESTIONS = ["What is this about?", "Who wrote it?"]


def documents() -> list[list[dict]]:
    from vllm_kvcdn.testing.tiny_model import corpus

    lines = corpus()
    return [[{"role": "system", "content": f"Document {i}."},
             {"role": "user", "content": " ".join(lines[3000 + 40 * i : 3040 + 40 * i])}] for i in range(8)]


def conversation(doc: int, question: int = 0) -> list[dict]:
    return documents()[doc] + [{"role": "user", "content": QUESTIONS[question]}]


@pytest.fixture(scope="module")
def b_proxy(s3):
    """B reaches the bucket through this proxy: the faults below are injected there."""
    proxy = FaultProxy(s3.endpoint)
    yield proxy
    proxy.stop()


@pytest.fixture(scope="module")
def fleet(tiny_model, s3, b_proxy, tmp_path_factory, signing_key):
    base = tmp_path_factory.mktemp("fleet")
    bucket = s3.new_bucket()
    kvcdn(["keygen", str(base / "b.pem")])  # each server signs with its own key and trusts the other's
    a = kvcdn_server(tiny_model, f"s3://{bucket}/qwen3-tiny?endpoint_url={s3.endpoint}", KEY, base / "a.log",
                     signing_key=signing_key, trusted_publishers=[str(base / "b.pem.pub")])
    b = kvcdn_server(tiny_model, f"s3://{bucket}/qwen3-tiny?endpoint_url={b_proxy.endpoint}", KEY, base / "b.log",
                     disk_cache_gib=1, disk_cache_dir=str(base / "b-disk"), signing_key=str(base / "b.pem"),
                     trusted_publishers=[f"{signing_key}.pub"])
    plain = vllm_server(tiny_model, base / "plain.log")
    start_all(a, b, plain)
    try:
        convs = [conversation(d, q) for d in range(8) for q in range(2)]  # index 2 * d + q
        reference = reference_answers(plain.url, str(tiny_model), convs)
    finally:
        plain.stop()
    yield a, b, reference
    a.stop()
    b.stop()


def first_hit_after(url: str, model: str, conv: list[dict], since: float, bound_s: float) -> tuple[dict, float]:
    """Ask until the answer is a hit; (the answer, when the request that hit was sent)."""
    while True:
        sent = time.monotonic()
        got = ask(url, model, conv)
        if got["kvcdn"].get("hit") or sent - since > bound_s + 5:
            return got, sent - since
        time.sleep(0.1)


def metric(url: str, name: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        lines = r.read().decode().splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(name + "{") or
               line.startswith(name + " "))


def test_published_on_a_is_served_by_b_within_the_bound(fleet, tiny_model):
    a, b, reference = fleet
    model = str(tiny_model)
    assert ask(b.url, model, conversation(0))["kvcdn"].get("hit") is False  # nothing published yet
    doc = SideAPIClient(a.url, key=KEY).publish(messages=documents()[0], title="doc 0")
    got, after = first_hit_after(b.url, model, conversation(0), time.monotonic(), REFRESH_S)
    assert got["kvcdn"]["hit"] is True and got["kvcdn"]["document"] == doc["id"]
    assert after <= REFRESH_S + 0.5, f"B's first hit came {after:.2f}s after the publish"
    assert got["cached"] == got["kvcdn"]["loaded_tokens"] == doc["num_tokens"]
    on_a = ask(a.url, model, conversation(0))
    assert on_a["kvcdn"]["hit"] is True
    assert (got["tokens"], got["logprobs"]) == (on_a["tokens"], on_a["logprobs"])  # the same bits on both
    reference.check(got, 0, "B's hit against plain vLLM")
    assert metric(b.url, "vllm:kvcdn_disk_tier_misses_total") >= doc["num_chunks"]


def test_two_servers_sixteen_concurrent_requests_each_over_eight_documents(fleet, tiny_model):
    a, b, reference = fleet
    model = str(tiny_model)
    for i in range(1, 8):  # published on either server
        SideAPIClient((a, b)[i % 2].url, key=KEY).publish(messages=documents()[i], title=f"doc {i}")
    time.sleep(REFRESH_S + 0.5)
    jobs = [(server.url, d, q) for server in (a, b) for d in range(8) for q in range(2)]
    with futures.ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda job: ask(job[0], model, conversation(job[1], job[2])), jobs))
    assert len(answers) == 32
    missed = [job[1:] for job, got in zip(jobs, answers) if not got["kvcdn"].get("hit") or not got["cached"]]
    assert missed == []
    by_conv = {}
    for (_, d, q), got in zip(jobs, answers):
        by_conv.setdefault((d, q), []).append(got["tokens"])
    assert all(len(v) == 2 for v in by_conv.values())
    for (url, d, q), got in zip(jobs, answers):
        reference.check(got, 2 * d + q, f"{url}, document {d}, question {q}")


def test_deleted_on_a_stops_hitting_on_b_within_the_bound(fleet, tiny_model):
    a, b, reference = fleet
    model = str(tiny_model)
    api = SideAPIClient(a.url, key=KEY)
    doc = next(d for d in api.list()["documents"] if d["title"] == "doc 0")
    assert ask(b.url, model, conversation(0))["kvcdn"]["hit"] is True
    api.delete(doc["id"])
    deleted = time.monotonic()
    while True:
        sent = time.monotonic()
        got = ask(b.url, model, conversation(0))
        if not got["kvcdn"].get("hit"):
            break
        assert sent - deleted <= REFRESH_S + 0.5, "B still hits a deleted document"
    assert got["cached"] == 0 and got["tokens"]


def test_restarted_b_serves_published_documents_from_its_disk_tier(fleet, tiny_model):
    _, b, reference = fleet
    b.stop()
    b.start()
    got = ask(b.url, str(tiny_model), conversation(3, 1))
    assert got["kvcdn"]["hit"] is True and got["cached"] == got["kvcdn"]["loaded_tokens"] > 0
    # Kept on disk across the restart: whole chunks as block images, the tail's partial
    # block as a tail file; nothing read from the bucket.
    assert metric(b.url, "vllm:kvcdn_image_tier_hits_total") > 0
    assert metric(b.url, "vllm:kvcdn_image_tier_tail_hits_total") > 0
    assert metric(b.url, "vllm:kvcdn_store_read_bytes_total") == 0
    reference.check(got, 2 * 3 + 1, "B's hit after a restart against plain vLLM")


def publish_fresh(a, i: int) -> dict:
    """A document no server has read yet (so B must fetch it from the bucket)."""
    from vllm_kvcdn.testing.tiny_model import corpus

    lines = corpus()
    messages = [{"role": "system", "content": f"Fresh {i}."},
                {"role": "user", "content": " ".join(lines[3500 + 40 * i : 3540 + 40 * i])}]
    return {"messages": messages, **SideAPIClient(a.url, key=KEY).publish(messages=messages, title=f"fresh {i}")}


def test_throttling_on_b_is_retried_and_the_hit_is_the_same(fleet, b_proxy, tiny_model):
    a, b, reference = fleet
    doc = publish_fresh(a, 0)
    conv = doc["messages"] + [{"role": "user", "content": QUESTIONS[0]}]
    time.sleep(REFRESH_S + 0.5)
    b_proxy.inject("status", 503, times=2, method="GET", path="/chunks/")  # SlowDown, twice
    got = ask(b.url, str(tiny_model), conv)
    assert b_proxy.faulted == 2 and got["kvcdn"]["hit"] is True and got["cached"] == doc["num_tokens"]
    on_a = ask(a.url, str(tiny_model), conv)
    assert (got["tokens"], got["logprobs"]) == (on_a["tokens"], on_a["logprobs"])


def test_an_outage_on_b_costs_a_bounded_delay_and_a_counted_miss(fleet, b_proxy, tiny_model):
    a, b, reference = fleet
    doc = publish_fresh(a, 1)
    conv = doc["messages"] + [{"role": "user", "content": QUESTIONS[0]}]
    time.sleep(REFRESH_S + 0.5)
    before = metric(b.url, "vllm:kvcdn_load_failures_total")
    b_proxy.inject("status", 500, times=10_000, method="GET", path="/chunks/")  # a 500 storm on chunk reads
    try:
        started = time.monotonic()
        got = ask(b.url, str(tiny_model), conv)
        took = time.monotonic() - started
    finally:
        b_proxy.clear()
    assert got["kvcdn"]["hit"] is False and got["cached"] == 0  # recomputed: the answer of a cold prefill
    assert took < 10 + 2, f"an outage held a request {took:.1f}s (load_timeout_s is 10)"
    assert metric(b.url, "vllm:kvcdn_load_failures_total") > before and len(got["tokens"]) == 8
