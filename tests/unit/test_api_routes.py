"""The side API's routes through FastAPI's test client: publishing, listing, deleting,
auth, bad bodies, usage rights, store outages.

The engine is a stand-in that answers the flagged requests as the connector does (parsed
with the connector's own ``wire.parse_params``; documents written with the artifact's
``write_document``, zero KV): the routes' behaviour is tested without an engine here, and
``tests/server/`` runs the same routes over a real vLLM engine."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient

from vllm_kvcdn.api.routes import KVCDNService, router, store_errors_as_503
from vllm_kvcdn.artifact.chain import chain_seed, document_chunks, iter_chunks
from vllm_kvcdn.artifact.documents import write_document
from vllm_kvcdn.artifact.fingerprint import Fingerprint
from vllm_kvcdn.artifact.provenance import PublisherKey
from vllm_kvcdn.artifact.sealing import NO_KEYS, FileTenantKey, TenantKeys, is_sealed
from vllm_kvcdn.connector.wire import parse_params, report_of
from vllm_kvcdn.market.economics import PAPER_RATIOS, Tariff
from vllm_kvcdn.market.ledger import LedgerWriter, Read, tenant_of
from vllm_kvcdn.store.base import StoreError, StoreWrapper
from vllm_kvcdn.store.file import FileStore

KEY = "api-test-key"
CHUNK = 128
FINGERPRINT = Fingerprint("a" * 64, {"test": "api routes"})
VOCAB = 1000


class Engine:
    """Answers publish, wait_for and sync_index requests as the connector does."""

    def __init__(self, store, keys=NO_KEYS):
        self.store, self.keys = store, keys  # ``keys``: the tenant keys a private publish seals with
        self.asked: list[dict] = []  # every request's kvcdn params, in order
        self.results: dict[str, dict] = {}
        self.prefix_cache_resets = 0
        self.renderer = SimpleNamespace(get_tokenizer=lambda: SimpleNamespace(encode=self.encode))

    @staticmethod
    def encode(text: str) -> list[int]:
        return [ord(c) % VOCAB for c in text]

    async def generate(self, prompt, params, request_id, lora_request=None):
        kvcdn = params.extra_args["kv_transfer_params"]
        self.asked.append(report_of(kvcdn))
        ask = parse_params(kvcdn, KEY).ask
        assert ask is not None, "the side API sends only requests the connector accepts"
        tokens = prompt["prompt_token_ids"]
        if ask.sync_index:
            report = {"index_synced": True, "documents": 0}
        elif ask.wait_for:
            report = self.results[ask.wait_for]
        else:
            spans = list(iter_chunks(tokens, chain_seed(FINGERPRINT.digest, prompt.get("cache_salt")), CHUNK))
            zeros = torch.zeros(len(tokens), 1, 8, dtype=torch.bfloat16)
            write_document(self.store, spans=spans, tokens=tokens, kv=[(zeros, zeros)],
                           fingerprint=FINGERPRINT.digest, profile={}, chunk_size=CHUNK, producer={},
                           title=ask.title, metadata=ask.metadata, keys=self.keys, private=ask.private,
                           require_grant=ask.require_grant)
            doc = spans[-1].key
            self.results[doc] = {"published": True, "document": doc}
            report = {"document": doc, "num_tokens": len(tokens), "num_chunks": len(spans),
                      "fingerprint": FINGERPRINT.digest, "pending": True}
        yield SimpleNamespace(kv_transfer_params={"kvcdn": report})

    async def reset_prefix_cache(self):
        self.prefix_cache_resets += 1


def _app(store, engine, *, key: str | None = KEY, ledger_path: str = "") -> TestClient:
    app = FastAPI()
    app.include_router(router)
    store_errors_as_503(app)
    app.state.kvcdn = KVCDNService(engine_client=engine, store=store, fingerprint=FINGERPRINT, chunk_size=CHUNK,
                                   max_model_len=2048, vocab_size=VOCAB, publisher_key=key, ledger_path=ledger_path,
                                   tariff=Tariff(), ratios=PAPER_RATIOS, keys=engine.keys)
    return TestClient(app)


AUTH = {"Authorization": f"Bearer {KEY}"}
TOKENS = list(range(1, 301))  # two whole chunks and a tail


@pytest.fixture
def store(tmp_path):
    return FileStore(tmp_path / "store", durable=False)


@pytest.fixture
def engine(store):
    return Engine(store)


def test_a_publish_prefills_then_waits_and_a_second_is_already_there(store, engine):
    api = _app(store, engine)
    got = api.post("/kvcdn/v1/documents", json={"tokens": TOKENS, "title": "t"}, headers=AUTH)
    assert got.status_code == 201, got.text
    doc = got.json()
    assert doc["id"] == document_chunks(TOKENS, FINGERPRINT.digest, None, CHUNK)[-1].key
    assert (doc["num_tokens"], doc["num_chunks"], doc["created"]) == (300, 3, True)
    # The exchange: the flagged prefill, then a wait for the worker's result, both with the key.
    assert [("publish" in a, a.get("wait_for"), a["key"], a["v"]) for a in engine.asked] == \
        [(True, None, KEY, 1), (False, doc["id"], KEY, 1)]
    again = api.post("/kvcdn/v1/documents", json={"tokens": TOKENS}, headers=AUTH)
    assert again.status_code == 200 and again.json()["created"] is False
    assert len(engine.asked) == 2  # content-addressed and intact: no prefill
    listed = api.get("/kvcdn/v1/documents").json()
    assert listed["count"] == 1 and listed["documents"][0]["servable"] is True
    one = api.get(f"/kvcdn/v1/documents/{doc['id'][:12]}", params={"verify": True}).json()
    assert one["intact"] is True and one["manifest"]["title"] == "t"


def test_a_private_sold_publish_is_sealed_and_a_strangers_manifest_is_never_taken_as_published(store):
    engine = Engine(store, TenantKeys([FileTenantKey.generate()]))
    api = _app(store, engine)
    # Someone with write access stored a self-consistent document under these tokens first.
    spans = document_chunks(TOKENS, FINGERPRINT.digest, None, CHUNK)
    zeros = torch.zeros(len(TOKENS), 1, 8, dtype=torch.bfloat16)
    write_document(store, spans=spans, tokens=TOKENS, kv=[(zeros + 1, zeros)], fingerprint=FINGERPRINT.digest,
                   profile={}, chunk_size=CHUNK, producer={}, signer=PublisherKey.generate())
    got = api.post("/kvcdn/v1/documents", json={"tokens": TOKENS, "private": True, "require_grant": True},
                   headers=AUTH)
    assert got.status_code == 201 and got.json()["created"] is True, got.text  # prefilled, not taken as there
    assert [(a.get("private"), a.get("require_grant")) for a in engine.asked[:1]] == [(True, True)]
    listed = api.get(f"/kvcdn/v1/documents/{got.json()['id']}").json()
    assert (listed["private"], listed["require_grant"], listed["trusted"]) == (True, True, True)
    assert all(is_sealed(store.get(f"chunks/{c.key[:2]}/{c.key}.safetensors")) for c in spans)
    again = api.post("/kvcdn/v1/documents", json={"tokens": TOKENS, "private": True, "require_grant": True},
                     headers=AUTH)
    assert again.status_code == 200 and again.json()["created"] is False  # ours, intact: opened with the key


def test_writes_need_the_publisher_key(store, engine):
    api = _app(store, engine)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        assert api.post("/kvcdn/v1/documents", json={"tokens": TOKENS}, headers=headers).status_code == 401
    assert api.delete("/kvcdn/v1/documents/" + "0" * 64).status_code == 401
    closed = _app(store, engine, key=None)
    got = closed.post("/kvcdn/v1/documents", json={"tokens": TOKENS}, headers=AUTH)
    assert got.status_code == 403 and "KVCDN_PUBLISHER_KEY" in got.json()["detail"]
    assert engine.asked == [] and not list(store.scan("manifests/"))


@pytest.mark.parametrize("body, status, message", [
    ({"tokens": TOKENS, "text": "x"}, 400, "exactly one of"),
    ({"tokens": [VOCAB]}, 400, "token ids in"),
    ({"tokens": []}, 400, "non-empty"),
    ({"text": "   "}, 400, "empty"),
    ({"tokens": [1] * 2048}, 413, "--max-model-len"),
    ({"tokens": TOKENS, "metadata": {"x": "y" * 20000}}, 400, "limit"),
    ({"messages": [{"role": "user"}]}, 400, "role, content"),
])
def test_bad_bodies_get_a_clear_4xx_and_write_nothing(store, engine, body, status, message):
    got = _app(store, engine).post("/kvcdn/v1/documents", json=body, headers=AUTH)
    assert got.status_code == status and message in got.text
    assert engine.asked == [] and not list(store.scan("manifests/"))


def test_a_delete_resyncs_the_index_and_drops_vllms_copies(store, engine):
    api = _app(store, engine)
    doc = api.post("/kvcdn/v1/documents", json={"tokens": TOKENS}, headers=AUTH).json()
    got = api.delete(f"/kvcdn/v1/documents/{doc['id']}", headers=AUTH)
    assert got.status_code == 200 and got.json()["doc_id"] == doc["id"]
    assert engine.asked[-1] == {"v": 1, "sync_index": True, "key": KEY} and engine.prefix_cache_resets == 1
    assert api.get(f"/kvcdn/v1/documents/{doc['id']}").status_code == 404


def test_usage_shows_a_tenant_its_own_reads_and_the_publisher_all(store, engine, tmp_path):
    assert _app(store, engine).get("/kvcdn/v1/usage", headers=AUTH).status_code == 404  # no ledger
    path = str(tmp_path / "ledger.sqlite3")
    writer = LedgerWriter(path)
    for i, salt in enumerate(("tenant-a", "tenant-a", "tenant-b")):
        writer.record(Read(time=time.time(), request_id=f"r{i}", document="d" * 64, tenant=tenant_of(salt),
                           prompt_tokens=310, loaded_tokens=300, cached_tokens=0, computed_tokens=10,
                           kv_bytes=1, store_bytes=1, load_seconds=0.01))
    writer.close()
    api = _app(store, engine, ledger_path=path)
    assert api.get("/kvcdn/v1/usage").status_code == 401
    assert api.get("/kvcdn/v1/usage", headers={"X-KVCDN-Cache-Salt": ""}).status_code == 401
    own = api.get("/kvcdn/v1/usage", headers={"X-KVCDN-Cache-Salt": "tenant-a"}).json()
    everyone = api.get("/kvcdn/v1/usage", headers=AUTH).json()
    assert own["total"]["reads"] == 2 and everyone["total"]["reads"] == 3
    other = api.get("/kvcdn/v1/usage", params={"tenant": tenant_of("tenant-b")},
                    headers={"X-KVCDN-Cache-Salt": "tenant-a"})
    assert other.status_code == 403


class _Down(StoreWrapper):
    def scan(self, prefix):
        raise StoreError("the bucket does not answer")


def test_a_store_outage_is_a_503_that_says_so(store, engine):
    got = _app(_Down(store), engine).get("/kvcdn/v1/documents")
    assert got.status_code == 503 and "store unavailable" in got.json()["error"]
