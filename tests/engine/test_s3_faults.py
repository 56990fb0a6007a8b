"""Faults on the S3 path, end to end: a real engine reads published documents from moto's
S3 server (the real protocol, tests/rigs/s3.py) through a node disk tier and the fault proxy.

One engine publishes seven documents, signed (the consumer trusts its public key); then, in
the bucket or at the HTTP boundary:
- ``flip`` / ``truncate``: the first chunk object is replaced by a damaged copy (a
  corrupt object, a cut upload);
- ``forge``: it is replaced by a self-consistent chunk with other KV (same key, parent,
  fingerprint and tokens, a correct checksum of its new data), as anyone who can write one
  object of the bucket could: the signed manifest's checksum refuses it;
- ``delete``: the chunk object is deleted after the manifest was listed;
- ``reset``: the first GET of a chunk is cut mid-body by a connection reset;
- ``during``: the document is deleted while the request's read is held up at the proxy
  (a chunk deleted between match and load).
A ``private`` document is published sealed with a tenant key and sold by read grants
(issue 30). A second engine (in-process core, disk tier on; it holds the tenant key) asks
a question about each, the private one twice under a one-read grant and once under an
expired one. Damage and deletion
must end in a full prefill bit-equal to plain vLLM computing the prompt cold, with the
reason counted in our metric and no tokens counted as loaded by vLLM; the reset read is
resumed and the hit is bit-equal to plain vLLM serving the document from its own prefix
cache (level 2); so is the hit on the signed, sealed, granted private document, metered
against its grant in the ledger; the asks under a spent or expired grant are computed
cold, counted and not billed.
"""

from __future__ import annotations

import re
from functools import partial

import pytest

from tests.rigs.documents import EXTERNAL, document, query
from tests.rigs.forgery import forged_chunk
from tests.rigs.s3 import FaultProxy
from vllm_kvcdn.artifact.chain import document_chunks
from vllm_kvcdn.artifact.provenance import PublisherKey
from vllm_kvcdn.cli.main import main as kvcdn
from vllm_kvcdn.market import grants, ledger
from vllm_kvcdn.market.ledger import PUBLIC_TENANT
from vllm_kvcdn.store.keys import chunk_object_key
from vllm_kvcdn.testing.exactness import identical

DAMAGE = {"flip": "checksum", "truncate": "truncated", "delete": "missing", "forge": "provenance"}  # -> reason
DOCS = (*DAMAGE, "reset", "during", "private")
DOC_TOKENS = 512  # whole blocks: plain vLLM's prefix cache then reuses exactly the document
NEW_TOKENS = 8
ENGINE_ARGS = {"max_num_batched_tokens": 2048}
PREFIX = "tiny"


@pytest.fixture(scope="module")
def prompts(tokenizer) -> dict[str, list[int]]:
    out = {}
    for i, name in enumerate(DOCS):
        doc = document(tokenizer, 1200 + i * 200, DOC_TOKENS)
        out[name] = doc
        out[f"{name}_q"] = doc + tokenizer(" Q: who rang the bell at noon? A:").input_ids
    return out


_query = partial(query, max_tokens=NEW_TOKENS)


def _damage(client, bucket: str, key: str, kind: str) -> None:
    if kind == "delete":
        client.delete_object(Bucket=bucket, Key=key)
        return
    data = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    if kind == "forge":
        data = forged_chunk(data)
    elif kind == "flip":
        data[-1] ^= 0x01  # in the KV data: the header still parses
    else:
        data = data[: len(data) // 2]
    client.put_object(Bucket=bucket, Key=key, Body=bytes(data))


@pytest.fixture(scope="module")
def runs(s3, tmp_path_factory, run_engine, tiny_model, prompts, signing_key) -> dict:
    bucket, model = s3.new_bucket(), str(tiny_model)
    tenant_key = str(tmp_path_factory.mktemp("tenant") / "tenant.key")
    kvcdn(["keygen", "--tenant", tenant_key])
    published = run_engine({
        "model": model, "store_url": f"s3://{bucket}/{PREFIX}?endpoint_url={s3.endpoint}",
        "engine_args": ENGINE_ARGS, "extra_config": {"signing_key": signing_key, "tenant_keys": [tenant_key]},
        "ops": [{"name": name, "op": "publish", "ids": prompts[name], "private": name == "private",
                 "require_grant": name == "private"} for name in DOCS]})
    first_chunk = {}
    for name in DOCS:
        report = published[name]["answer"]["kvcdn"]
        assert report["published"], report
        chunk = document_chunks(prompts[name], report["fingerprint"], None, 256)[0]
        first_chunk[name] = f"{PREFIX}/{chunk_object_key(chunk.key)}"
    private_doc, publisher = published["private"]["answer"]["kvcdn"]["document"], PublisherKey.load(signing_key)
    grant = grants.issue(publisher, [private_doc], PUBLIC_TENANT, ttl_s=3600, reads=1)
    expired = grants.issue(publisher, [private_doc], PUBLIC_TENANT, ttl_s=-1)
    ledger_path = str(tmp_path_factory.mktemp("consumer-ledger") / "ledger.sqlite3")
    client = s3.client()
    for kind in DAMAGE:
        _damage(client, bucket, first_chunk[kind], kind)

    proxy = FaultProxy(s3.endpoint)
    try:
        proxy.inject("reset", 200, method="GET", path=re.escape(first_chunk["reset"]))
        # Held 3 s at the proxy, then forwarded: by then the document is gone.
        proxy.inject("delay", 3, method="GET", path=re.escape(first_chunk["during"]))
        consumer = run_engine({
            "model": model, "store_url": f"s3://{bucket}/{PREFIX}?endpoint_url={proxy.endpoint}",
            "inproc": True, "engine_args": ENGINE_ARGS,
            "extra_config": {"disk_cache_gib": 1, "disk_cache_dir": str(tmp_path_factory.mktemp("disk-tier")),
                             "trusted_publishers": [f"{signing_key}.pub"], "tenant_keys": [tenant_key],
                             "ledger_path": ledger_path},
            "ops": [*(_query(kind, prompts[f"{kind}_q"]) for kind in (*DAMAGE, "reset")),
                    {**_query("private", prompts["private_q"]), "grant": grant},
                    {"name": "forget_private", "op": "reset"},  # else vLLM's own prefix cache serves it again
                    {**_query("private_again", prompts["private_q"]), "grant": grant},  # its one read is spent
                    {"name": "forget_again", "op": "reset"},
                    {**_query("private_expired", prompts["private_q"]), "grant": expired},
                    {"name": "during", "op": "delete_during", "ids": prompts["during_q"],
                     "doc": published["during"]["answer"]["kvcdn"]["document"],
                     "after_steps": 1, "max_tokens": NEW_TOKENS},
                    {"name": "forget", "op": "reset"},  # the recompute left the document in vLLM's own cache
                    _query("flip_again", prompts["flip_q"])]})
        faulted = proxy.faulted
    finally:
        proxy.stop()

    ref_ops = []
    for name in DOCS:
        ref_ops += [{"name": f"reset_{name}", "op": "reset"}, _query(f"{name}_cold", prompts[f"{name}_q"])]
    for name in ("reset", "private"):
        ref_ops += [{"name": f"reset_{name}_warm", "op": "reset"}, _query(f"{name}_doc", prompts[name]),
                    _query(f"{name}_warm", prompts[f"{name}_q"])]
    plain = run_engine({"model": model, "store_url": None, "inproc": True, "engine_args": ENGINE_ARGS,
                        "ops": ref_ops})
    return {"consumer": consumer, "plain": plain, "faulted": faulted, "grant": grants.parse(grant),
            "ledger": ledger_path}


@pytest.mark.parametrize("kind", [*DAMAGE, "flip_again"])
def test_a_damaged_or_deleted_object_is_a_counted_miss_and_a_cold_answer(runs, kind):
    done = runs["consumer"][kind]
    report = done["answer"]["kvcdn"]
    assert report["hit"] is False and report["loaded_tokens"] == 0, report
    reason = DAMAGE[kind.removesuffix("_again")]
    assert done["counters"].get(f"vllm:kvcdn_load_failures{{reason={reason}}}", 0) >= 1, done["counters"]
    assert done["counters"].get(EXTERNAL, 0) == 0, done["counters"]
    assert identical(done["answer"], runs["plain"][f"{kind.removesuffix('_again')}_cold"]["answer"])


def test_a_chunk_deleted_between_match_and_load_is_a_counted_miss(runs):
    done = runs["consumer"]["during"]
    assert done["answer"]["kvcdn"]["hit"] is False, done["answer"]["kvcdn"]
    assert done["counters"].get("vllm:kvcdn_load_failures{reason=missing}", 0) >= 1, done["counters"]
    assert done["counters"].get(EXTERNAL, 0) == 0, done["counters"]
    assert identical(done["answer"], runs["plain"]["during_cold"]["answer"])


def test_a_read_cut_by_a_connection_reset_is_resumed_and_hits(runs):
    assert runs["faulted"] == 2  # the reset and the held read both happened
    done = runs["consumer"]["reset"]
    report = done["answer"]["kvcdn"]
    assert report["hit"] is True and report["loaded_tokens"] == DOC_TOKENS, report
    assert done["counters"][EXTERNAL] == DOC_TOKENS  # vLLM's own count: prefill of the document skipped
    warm = runs["plain"]["reset_warm"]["answer"]
    assert warm["num_cached_tokens"] >= DOC_TOKENS  # the reference really reused the document
    assert identical(done["answer"], warm)


def test_a_signed_sealed_granted_document_is_a_hit_bit_equal_to_vllms_own_prefix_cache(runs):
    done = runs["consumer"]["private"]
    report = done["answer"]["kvcdn"]
    assert report["hit"] is True and report["loaded_tokens"] == DOC_TOKENS, report
    assert report["grant"] == runs["grant"].grant_id
    assert done["counters"][EXTERNAL] == DOC_TOKENS
    warm = runs["plain"]["private_warm"]["answer"]
    assert warm["num_cached_tokens"] >= DOC_TOKENS
    assert identical(done["answer"], warm)
    (row,) = [r for r in ledger.reads(runs["ledger"]) if r.grant_id]
    assert (row.document, row.grant_id, row.loaded_tokens) == (report["document"], report["grant"], DOC_TOKENS)


@pytest.mark.parametrize("kind", ["again", "expired"])
def test_a_spent_or_expired_grant_is_served_cold_counted_and_not_billed(runs, kind):
    done = runs["consumer"][f"private_{kind}"]
    reason = {"again": "exhausted", "expired": "expired"}[kind]
    report = done["answer"]["kvcdn"]
    assert report == {"hit": False, "loaded_tokens": 0, "grant_refused": reason}, report
    assert done["counters"].get(f"vllm:kvcdn_grant_refusals{{reason={reason}}}", 0) == 1, done["counters"]
    assert done["counters"].get(EXTERNAL, 0) == 0
    assert identical(done["answer"], runs["plain"]["private_cold"]["answer"])
    assert len([r for r in ledger.reads(runs["ledger"]) if r.grant_id]) == 1
