"""`kvcdn serve` over real HTTP on loopback, driven with the official `openai` client.

Every answer is compared with a plain vLLM server without the connector (same flags,
same CPU thread setup) computing the whole prompt. Both run with vLLM's own prefix cache
off, so every cached token reported below came from the kvcdn store.

Over HTTP the check is level 3 of the contract (README "Exactness"): logprobs within the
band vLLM shows itself, and greedy tokens that differ only where vLLM itself is at a
near-tie. The band is measured in the same run by asking the plain server the same
conversations all at once (its batch-variant CPU kernels move the last bits with batch
composition, and on near-ties its own greedy tokens). The bit-exact levels are proven
offline, with schedules under control (test_engine_exactness.py).
"""

from __future__ import annotations

import concurrent.futures as futures
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest

from tests.rigs.servers import (
    Reference,
    ask,
    ask_all_at_once,
    deviation,
    kvcdn_server,
    metered_reads,
    reference_answers,
    vllm_server,
)
from vllm_kvcdn.api.client import APIError, SideAPIClient
from vllm_kvcdn.market import ledger
from vllm_kvcdn.store.keys import chunk_object_key

KEY = "test-publisher-key"
QUESTIONS = ["Why is it exact?", "What is a chunk?", "Who pays for prefill?", "What happens on damage?"]


def documents(texts) -> list[list[dict]]:
    """Four chat documents: a system line and one long user message each."""
    lines = texts["doc_d"] + texts["doc_e"]
    return [
        [{"role": "system", "content": f"You answer questions about document {i}."},
         {"role": "user", "content": " ".join(lines[i * 60 : i * 60 + 60])}]
        for i in range(4)
    ]


def conversations(texts) -> list[list[dict]]:
    return [doc + [{"role": "user", "content": q}] for doc in documents(texts) for q in QUESTIONS]


@pytest.fixture(scope="module")
def reference(tiny_model, texts, tmp_path_factory) -> Reference:
    log = tmp_path_factory.mktemp("servers") / "reference.log"
    server = vllm_server(tiny_model, log).start()
    try:
        return reference_answers(server.url, str(tiny_model), conversations(texts))
    finally:
        server.stop()


@pytest.fixture(scope="module")
def kvcdn(tiny_model, tmp_path_factory, reference):
    base = tmp_path_factory.mktemp("kvcdn-server")
    server = kvcdn_server(tiny_model, base / "store", KEY, base / "server.log").start()
    server.store_path = base / "store"
    yield server
    server.stop()


@pytest.fixture(scope="module")
def api(kvcdn) -> SideAPIClient:
    return SideAPIClient(kvcdn.url, key=KEY)


@pytest.fixture(scope="module")
def published(api, texts) -> list[dict]:
    return [api.publish(messages=doc, title=f"doc {i}") for i, doc in enumerate(documents(texts))]


def test_publish_reports_the_artifact_and_is_idempotent(api, published, texts):
    first = published[0]
    assert first["created"] is True and first["num_chunks"] >= 2 and first["bytes"] > 0
    again = api.publish(messages=documents(texts)[0], title="doc 0")
    assert again["id"] == first["id"] and again["created"] is False
    listed = {d["id"]: d for d in api.list()["documents"]}
    assert set(listed) == {p["id"] for p in published}
    assert all(d["servable"] for d in listed.values())


def test_chat_hit_is_exact_and_cached_tokens_are_the_loaded_ones(kvcdn, api, published, reference, tiny_model, texts):
    got = ask(kvcdn.url, str(tiny_model), conversations(texts)[0])
    reference.check(got, 0)
    assert got["kvcdn"]["hit"] is True and got["kvcdn"]["document"] == published[0]["id"]
    assert got["cached"] == got["kvcdn"]["loaded_tokens"] == published[0]["num_tokens"]
    assert len(metered_reads(api, 1, document=published[0]["id"])) >= 1
    assert api.get(published[0]["id"][:12])["reads"] >= 1


def test_sixteen_concurrent_requests_over_four_documents(kvcdn, api, published, reference, tiny_model, texts,
                                                         capsys):
    since = time.time()
    answers = ask_all_at_once(kvcdn.url, str(tiny_model), conversations(texts))
    ours = [deviation(got, ref) for got, ref in zip(answers, reference.answers)]
    with capsys.disabled():
        print(f"\n[concurrency] vs one-at-a-time plain vLLM: kvcdn max |logprob diff| {max(d for _, d in ours):.3g}, "
              f"greedy tokens identical in {sum(n == 8 for n, _ in ours)}/16; plain vLLM itself {reference.band:.3g}")
    for i, got in enumerate(answers):
        doc = published[i // len(QUESTIONS)]
        assert got["kvcdn"]["hit"] is True and got["cached"] == doc["num_tokens"], f"request {i}"
        reference.check(got, i, f"request {i}")
    # Metered: one row per request, with the tokens its response reported.
    reads = metered_reads(api, 16, since=since)
    assert len(reads) == 16 and len({r["request_id"] for r in reads}) == 16, reads
    expected = sorted((a["kvcdn"]["document"], a["cached"], a["prompt_tokens"] - a["cached"]) for a in answers)
    assert sorted((r["document"], r["loaded_tokens"], r["computed_tokens"]) for r in reads) == expected
    assert all(r["tenant"] == "public" and r["cached_tokens"] == 0 and r["kv_bytes"] > 0 for r in reads)
    report = api.usage(since=since)
    assert {row["document"]: row["reads"] for row in report["rows"]} == {p["id"]: 4 for p in published}
    assert report["total"]["billed_usd"] == pytest.approx(report["total"]["loaded_tokens"] * 5.0 / 1e6 * 0.1)


def test_tenants_see_their_own_reads_only(kvcdn, api, tiny_model, texts):
    """A document published with a cache_salt hits only requests with that salt; the
    ledger bills that tenant, and the tenant's report (by its salt, no key) holds only
    its own reads."""
    conv = documents(texts)[2][:1] + [{"role": "user", "content": " ".join(texts["other"])}]
    doc = api.publish(messages=conv, title="alice's", cache_salt="alice-salt")
    since = time.time()
    question = conv + [{"role": "user", "content": QUESTIONS[0]}]
    assert ask(kvcdn.url, str(tiny_model), question, cache_salt="alice-salt")["kvcdn"]["hit"] is True
    assert ask(kvcdn.url, str(tiny_model), question, cache_salt="bob-salt")["kvcdn"]["hit"] is False
    assert ask(kvcdn.url, str(tiny_model), question)["kvcdn"]["hit"] is False
    tenant = SideAPIClient(kvcdn.url)
    tenant.key = None  # no publisher key
    alice = metered_reads(tenant, 1, cache_salt="alice-salt", since=since)
    assert [(r["document"], r["tenant"]) for r in alice] == [(doc["id"], ledger.tenant_of("alice-salt"))]
    assert tenant.usage(cache_salt="bob-salt", detail=True, since=since)["reads"] == []
    with pytest.raises(APIError, match="HTTP 403"):  # another tenant's id, asked with one's own salt
        tenant.usage(cache_salt="bob-salt", tenant=ledger.tenant_of("alice-salt"))
    with pytest.raises(APIError, match="HTTP 401"):
        tenant.usage()
    with pytest.raises(APIError, match="HTTP 401"):  # an empty salt is no salt: the public reads stay hidden
        tenant.usage(cache_salt="", detail=True)
    assert [r["document"] for r in api.usage(detail=True, since=since)["reads"]] == [doc["id"]]


def test_stats_count_what_happened(api, published):
    stats = api.stats()
    assert stats["loaded_tokens"] >= sum(p["num_tokens"] for p in published)
    assert stats["reads"] >= 17 and stats["matched_requests"] >= stats["reads"]
    assert stats["published_documents"] >= 4 and stats["failures"] == {}


def test_cli_publishes_lists_and_inspects(kvcdn, tmp_path, texts):
    doc = tmp_path / "manual.txt"
    doc.write_text(" ".join(texts["other"]))

    def cli(*args):
        out = _kvcdn_cli(*args, "--server", kvcdn.url)
        assert out.returncode == 0, out.stderr
        return out.stdout

    doc_id = cli("publish", str(doc)).split()[0]
    listed = json.loads(cli("ls", "--json"))
    assert doc_id in {d["id"] for d in listed} and any(d["title"] == "manual.txt" for d in listed)
    assert json.loads(cli("inspect", doc_id[:16]))["manifest"]["doc_id"] == doc_id
    assert "removed document" in cli("rm", doc_id)


def test_cli_lists_without_torch_fastapi_or_vllm(kvcdn):
    """`kvcdn ls` on a server or on a store is a small client: none of them is imported."""
    for where in (["--server", kvcdn.url], ["--store", f"file://{kvcdn.store_path}"]):
        out = subprocess.run([sys.executable, "-X", "importtime", "-m", "vllm_kvcdn.cli.main", "ls", *where],
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert "documents" in out.stdout
        imported = {line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines()
                    if line.startswith("import time:")}
        assert "vllm_kvcdn.artifact.catalog" in imported  # -X importtime lists what was imported
        assert not imported & {"torch", "fastapi", "vllm"}, where


def test_writes_need_the_publisher_key(kvcdn):
    with pytest.raises(APIError, match="401"):
        SideAPIClient(kvcdn.url, key="wrong").publish(text="hello")
    with pytest.raises(APIError, match="401"):
        SideAPIClient(kvcdn.url, key="").delete("0" * 64)
    code, text = _post(kvcdn.url, json.dumps({"text": "hello"}).encode(), authorization=KEY)  # no "Bearer "
    assert code == 401 and "Bearer" in text


def _complete(url: str, model: str, prompt: str, kv_transfer_params) -> dict:
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    resp = client.completions.create(model=model, prompt=prompt, max_tokens=1,
                                     extra_body={"kv_transfer_params": kv_transfer_params})
    return resp.model_extra["kv_transfer_params"]["kvcdn"]


@pytest.mark.parametrize(
    "params",
    [
        {"kvcdn": {"verify": "../../../../etc/passwd"}},  # once killed the engine
        {"kvcdn": {"verify": "../../../../etc/passwd", "key": KEY}},
        {"kvcdn": {"publish": True}},  # once wrote a manifest without any key
        {"kvcdn": {"publish": True, "key": "guess"}},
        {"kvcdn": {"publish": "yes", "metadata": "x" * 100_000}},
        {"kvcdn": "publish"},
    ],
)
def test_openai_routes_cannot_publish_or_verify_without_the_key(kvcdn, api, published, tiny_model, texts, params):
    before = api.list()["count"]
    report = _complete(kvcdn.url, str(tiny_model), " ".join(texts["other"]), params)
    assert report["rejected"] and "published" not in report and "verified" not in report, report
    assert api.list()["count"] == before  # nothing written
    assert _complete(kvcdn.url, str(tiny_model), "still alive?", None)["hit"] is False  # the engine serves on


def _post(url: str, body: bytes, authorization: str = f"Bearer {KEY}") -> tuple[int, str]:
    req = urllib.request.Request(url + "/kvcdn/v1/documents", data=body, method="POST",
                                 headers={"Content-Type": "application/json", "Authorization": authorization})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.mark.parametrize(
    "body,status,message",
    [
        (b"{not json", 400, ""),
        (json.dumps({"text": "   "}).encode(), 400, "empty"),
        (json.dumps({"text": "x", "messages": [{"role": "user", "content": "y"}]}).encode(), 400, "exactly one"),
        (json.dumps({"messages": []}).encode(), 400, "messages"),
        (json.dumps({"text": "river " * 5000}).encode(), 413, "context"),
        (json.dumps({"tokens": [1, 2, 4294967296]}).encode(), 400, "token ids in [0,"),
        (json.dumps({"tokens": [1, 2, 10**9]}).encode(), 400, "token ids in [0,"),
        (json.dumps({"text": "hi", "metadata": {"blob": "x" * 5_000_000}}).encode(), 400, "limit"),
    ],
)
def test_bad_bodies_get_a_clear_4xx(kvcdn, body, status, message):
    code, text = _post(kvcdn.url, body)
    assert code == status or (status == 400 and code == 422), text
    assert message in text


def _kvcdn_cli(*args: str) -> subprocess.CompletedProcess:
    kvcdn_bin = str(Path(sys.executable).with_name("kvcdn"))
    return subprocess.run([kvcdn_bin, *args], env={**os.environ, "KVCDN_PUBLISHER_KEY": KEY},
                          capture_output=True, text=True)


def test_damaged_manifest_is_listed_explained_replaced_and_deleted(kvcdn, api, texts):
    text = " ".join(texts["other"][:4])
    doc = api.publish(text=text, title="to be damaged")
    manifest = kvcdn.store_path / "manifests" / f"{doc['id']}.json"
    manifest.write_text("{not json")
    listed = {d["id"]: d for d in api.list()["documents"]}
    assert "damaged" in listed[doc["id"]]
    with pytest.raises(APIError, match="409.*damaged manifest.*publish it again"):
        api.get(doc["id"])
    again = api.publish(text=text, title="replaced")  # a republish replaces it
    assert again["created"] is True and api.get(doc["id"])["title"] == "replaced"
    manifest.write_text("{not json")
    store = f"file://{kvcdn.store_path}"
    assert "DAMAGED" in _kvcdn_cli("ls", "--store", store).stdout
    api.delete(doc["id"][:16])  # and a delete removes it
    assert doc["id"] not in {d["id"] for d in api.list()["documents"]}


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_republish_repairs_damaged_chunks(kvcdn, api, texts, damage):
    text = " ".join(texts["doc_e"][10:40] if damage == "flip" else texts["doc_e"][40:70])
    doc = api.publish(text=text)
    chunks = api.get(doc["id"])["manifest"]["chunks"]
    path = kvcdn.store_path / chunk_object_key(chunks[0 if damage == "flip" else -1]["key"])
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[-5] ^= 0x04  # same size
    else:
        del data[len(data) // 2 :]
    path.write_bytes(bytes(data))
    store = f"file://{kvcdn.store_path}"
    assert api.get(doc["id"], verify=True)["intact"] is False
    assert _kvcdn_cli("inspect", doc["id"], "--verify", "--store", store).returncode != 0  # the CLI agrees
    again = api.publish(text=text)
    assert again["created"] is True  # recomputed: a damaged copy is never taken as "already published"
    assert api.get(doc["id"], verify=True)["intact"] is True
    for where in (["--store", store], ["--server", kvcdn.url]):
        done = _kvcdn_cli("inspect", doc["id"], "--verify", *where)
        verdicts = [line.rsplit("  ", 1)[-1] for line in done.stdout.splitlines() if line.startswith("chunk ")]
        assert done.returncode == 0 and verdicts == ["ok"] * len(chunks), done.stdout + done.stderr


def test_a_long_document_is_tokenized_off_the_event_loop(kvcdn):
    """While a 3.6M-character document is tokenized, the server keeps answering."""
    body = json.dumps({"text": "the stone city by the river " * 130_000}).encode()
    with futures.ThreadPoolExecutor(1) as pool:
        publish = pool.submit(_post, kvcdn.url, body)
        answered = 0
        while not publish.done():
            with urllib.request.urlopen(kvcdn.url + "/health", timeout=30) as r:
                answered += (r.status == 200) and not publish.done()
        code, text = publish.result()
    assert code == 413 and "context" in text  # tokenized, then refused: longer than the context
    assert answered >= 3, answered  # on the event loop, /health would wait for the tokenizer


def test_concurrent_publishes_of_a_long_document(kvcdn, api):
    """Four publishes of one document longer than a prefill step (2,048 tokens here) at
    once: each is answered, with the one document, each computed alone."""
    from vllm_kvcdn.testing.tiny_model import corpus

    text = " ".join(corpus()[:220])  # ~2,560 tokens: two prefill steps
    with futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda i: api.publish(text=text, title=f"copy {i}"), range(4)))
    assert len({r["id"] for r in results}) == 1 and results[0]["num_tokens"] > 2048
    prefill = api.get(results[0]["id"])["manifest"]["producer"]["prefill"]
    assert prefill["alone"] is True and len(prefill["steps"]) >= 2, prefill  # a document of several steps


def test_verify_recomputes_and_matches_bit_for_bit(api, published):
    report = api.verify(published[2]["id"][:16])
    assert report["identical"] is True
    assert [c["status"] for c in report["chunks"]] == ["identical"] * published[2]["num_chunks"]


def test_delete_then_no_hit_and_still_right(kvcdn, api, published, reference, tiny_model, texts):
    doc = published[3]
    api.delete(doc["id"])
    got = ask(kvcdn.url, str(tiny_model), conversations(texts)[12])
    assert got["kvcdn"]["hit"] is False and got["cached"] == 0
    assert got["text"] == reference[12]["text"] and got["logprobs"] == reference[12]["logprobs"]  # a cold prefill
    assert doc["id"] not in {d["id"] for d in api.list()["documents"]}


def test_a_crash_keeps_published_documents_and_every_answered_read(kvcdn, api, published, reference, tiny_model,
                                                                     texts):
    """SIGKILL right after eight hits were answered: after the restart the documents are
    there, and the ledger holds every read, those eight included, each once."""
    before = {d["id"] for d in api.list()["documents"]}
    time.sleep(2 * ledger.FLUSH_S)
    reads = api.usage(detail=True, limit=100_000)["reads"]
    answered = ask_all_at_once(kvcdn.url, str(tiny_model), conversations(texts)[:8])
    assert all(a["kvcdn"]["hit"] for a in answered)
    kvcdn.kill()
    kvcdn.start()
    assert {d["id"] for d in api.list()["documents"]} == before
    after = api.usage(detail=True, limit=100_000)["reads"]
    assert after[: len(reads)] == reads and len(reads) >= 17
    assert len(after) == len(reads) + 8 and len({r["request_id"] for r in after[len(reads):]}) == 8
    got = ask(kvcdn.url, str(tiny_model), conversations(texts)[5])
    assert got["kvcdn"]["hit"] is True and got["cached"] == published[1]["num_tokens"]
    reference.check(got, 5)


def test_plain_vllm_with_kv_transfer_config_publishes_and_hits(tiny_model, tmp_path, texts, monkeypatch):
    """Operators who skip our wrapper: plain vLLM + --kv-transfer-config, publishing with a
    flagged /v1/completions request (no side API) that carries the publish_key they opted
    into, waiting for its result with a second request, then an ordinary request hits."""
    import sys

    from tests.rigs.servers import COMMON_ARGS, SERVER_ENV
    from vllm_kvcdn.testing.offline import kv_transfer_config
    from vllm_kvcdn.testing.server_process import Server

    monkeypatch.delenv("KVCDN_PUBLISHER_KEY", raising=False)
    store = tmp_path / "store"
    config = json.dumps(kv_transfer_config(f"file://{store}", publish_key="plain-key"))
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_model),
            "--enable-prompt-tokens-details", "--kv-transfer-config", config, *COMMON_ARGS]
    server = Server(argv, tmp_path / "plain.log", env=SERVER_ENV).start()
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
        document = " ".join(texts["doc_e"][:60])
        for params in ({"publish": True}, {"publish": True, "key": "plain-ke"}):
            refused = _complete(server.url, str(tiny_model), document, {"kvcdn": params})
            assert "key" in refused["rejected"] and not list(store.glob("manifests/*")), refused
        report = _complete(server.url, str(tiny_model), document, {"kvcdn": {"publish": True, "key": "plain-key"}})
        # Written in the background: the response says so; a wait_for request gets the result.
        assert report["pending"] is True and "published" not in report, report
        wait = {"kvcdn": {"wait_for": report["document"], "key": "plain-key"}}
        result = _complete(server.url, str(tiny_model), "Hello", wait)
        assert result["published"] is True and result["document"] == report["document"], result
        assert result["new_chunks"] == result["num_chunks"] > 0, result
        prompt = document + "\nQuestion: what is the river called?\nAnswer:"
        resp = client.completions.create(model=str(tiny_model), prompt=prompt, max_tokens=4, temperature=0)
        kvcdn_report = resp.model_extra["kv_transfer_params"]["kvcdn"]
        assert kvcdn_report["hit"] is True and kvcdn_report["document"] == report["document"]
        assert resp.usage.prompt_tokens_details.cached_tokens == kvcdn_report["loaded_tokens"] > 0
        # The side API is off without `kvcdn serve` (endpoint plugins need VLLM_PLUGINS).
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(server.url + "/kvcdn/v1/documents", timeout=10)
        assert e.value.code == 404
    finally:
        server.stop()
