"""Read grants (market/grants.py): the token, every refusal, and the scheduler half selling
reads of a document published with ``require_grant``: a valid grant loads and is metered
against in the ledger; a missing, forged, expired, exhausted or other tenant's grant is
computed as usual, counted, never billed (vLLM's own request objects, a real file store
and ledger; no engine: ``tests/rigs/scheduler.py``)."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest

from tests.rigs.scheduler import CHUNK, FINGERPRINT, PUBLISH_KEY, admit, publish, vllm_request
from vllm_kvcdn.artifact.provenance import PublisherKey
from vllm_kvcdn.cli.main import main as kvcdn
from vllm_kvcdn.config import KVCDNConfig
from vllm_kvcdn.connector.scheduler import KVCDNScheduler
from vllm_kvcdn.connector.wire import LoadReceipt, WorkerReport, grant_params
from vllm_kvcdn.market import grants, ledger
from vllm_kvcdn.store import open_store

DOC = list(range(300, 300 + CHUNK + 40))
PROMPT = DOC + [7, 8]
SALT = "tenant-a"


@pytest.fixture(scope="module")
def publisher() -> PublisherKey:
    return PublisherKey.generate()


def test_a_grant_token_round_trips_and_every_refusal_has_its_reason(publisher):
    token = grants.issue(publisher, ["d" * 64], "salt-x", ttl_s=60, reads=2)
    grant = grants.parse(token)
    assert grant.documents == ("d" * 64,) and grant.reads == 2 and grant.publisher == publisher.public_hex
    ok = dict(document="d" * 64, publisher=publisher.public_hex, tenant="salt-x", used=0)
    grants.check(grant, **ok)
    cases = {
        "wrong_publisher": dict(ok, publisher=PublisherKey.generate().public_hex),
        "wrong_document": dict(ok, document="e" * 64),
        "wrong_tenant": dict(ok, tenant="public"),
        "expired": dict(ok, now=grant.expires),
        "exhausted": dict(ok, used=2),
    }
    for reason, kw in cases.items():
        with pytest.raises(grants.GrantError) as e:
            grants.check(grant, **kw)
        assert e.value.reason == reason
    payload, signature = token.split(".")
    more = grants._b64(replace(grant, reads=1000).payload())  # a buyer raising its own count
    for bad, reason in ((f"{more}.{signature}", "bad_signature"), ("not-a-grant", "malformed"), (42, "malformed"),
                        (f"{payload}.{signature[:-4]}AAAA", "bad_signature")):
        with pytest.raises(grants.GrantError) as e:
            grants.parse(bad)
        assert e.value.reason == reason


def test_kvcdn_grant_signs_for_a_salts_tenant(tmp_path, capsys, publisher):
    publisher.save(tmp_path / "p.pem")
    kvcdn(["grant", "--key", str(tmp_path / "p.pem"), "--doc", "d" * 64, "--salt", SALT, "--reads", "3"])
    grant = grants.parse(capsys.readouterr().out.strip())
    assert grant.tenant == ledger.tenant_of(SALT) and grant.reads == 3 and grant.expires > time.time() + 3000


@pytest.fixture
def seller(tmp_path, publisher):
    url = f"file://{tmp_path / 'store'}"
    publisher.save(tmp_path / "publisher.pem")
    config = KVCDNConfig(store_url=url, chunk_size=CHUNK, ledger_path=str(tmp_path / "ledger.sqlite3"),
                         publish_key=PUBLISH_KEY, index_refresh_s=3600, signing_key=str(tmp_path / "publisher.pem"))
    half = KVCDNScheduler(config, FINGERPRINT, open_store(url))
    yield half
    half.shutdown()


def _read(half, grant: str | None, salt: str = SALT, served: bool = True) -> dict:
    """One request through the scheduler half; its report. A planned load is reported
    written in full when ``served``."""
    request = vllm_request(PROMPT, salt=salt, kvcdn=grant_params(grant) if grant else None)
    loaded = admit(half, request)
    if loaded:
        half.build_connector_meta(_empty_step())
        if served:
            half.update_connector_output(WorkerReport(loads={request.request_id: [LoadReceipt(loaded, 10, 10, 0.01)]}))
        else:
            half.update_connector_output(WorkerReport(failed_loads={request.request_id}))
    return half.request_finished(request)[1]["kvcdn"]


def _empty_step():
    from tests.rigs.scheduler import step_output

    return step_output(total=0)


def test_a_document_sold_by_grants_loads_only_under_a_valid_one_and_each_read_is_metered_against_it(
        seller, publisher):
    doc_id = publish(seller.index.store, DOC, salt=SALT, signer=publisher, require_grant=True)
    seller.index.refresh(force=True)
    tenant = ledger.tenant_of(SALT)
    two_reads = grants.issue(publisher, [doc_id], tenant, ttl_s=600, reads=2)

    assert _read(seller, None) == {"hit": False, "loaded_tokens": 0, "grant_refused": "missing"}
    first = _read(seller, two_reads)
    grant_id = grants.parse(two_reads).grant_id
    assert first["hit"] is True and first["loaded_tokens"] == len(DOC) and first["grant"] == grant_id
    assert _read(seller, two_reads, served=False)["hit"] is False  # a failed load: not billed, not counted
    assert _read(seller, two_reads)["grant"] == grant_id
    assert _read(seller, two_reads)["grant_refused"] == "exhausted"
    others = {
        "expired": grants.issue(publisher, [doc_id], tenant, ttl_s=-1),
        "wrong_tenant": grants.issue(publisher, [doc_id], ledger.tenant_of("tenant-b"), ttl_s=600),
        "wrong_publisher": grants.issue(PublisherKey.generate(), [doc_id], tenant, ttl_s=600),
        "wrong_document": grants.issue(publisher, ["f" * 64], tenant, ttl_s=600),
        "malformed": "x.y.z",
    }
    for reason, token in others.items():
        assert _read(seller, token)["grant_refused"] == reason
    rows = ledger.reads(seller.config.ledger_path, ledger.Filters(), 100)
    assert [(r.document, r.grant_id) for r in rows] == [(doc_id, grant_id)] * 2  # the two served reads only
    refusals = seller.stats.data["grant_refusals"]
    assert refusals == {"missing": 1, "exhausted": 1, **{reason: 1 for reason in others}}

    # A restarted server counts the grant's reads from its ledger.
    seller.ledger.close()
    again = KVCDNScheduler(seller.config, FINGERPRINT, seller.index.store)
    try:
        assert _read(again, two_reads)["grant_refused"] == "exhausted"
        assert _read(again, grants.issue(publisher, [doc_id], tenant, ttl_s=600))["hit"] is True
    finally:
        again.shutdown()


def test_public_documents_need_no_grant_unless_the_server_requires_grants(seller, publisher, tmp_path):
    publish(seller.index.store, DOC, salt=SALT, signer=publisher)
    seller.index.refresh(force=True)
    assert _read(seller, None)["hit"] is True
    strict = KVCDNScheduler(replace(seller.config, require_grants=True, ledger_path=str(tmp_path / "strict.sqlite3")),
                            FINGERPRINT, seller.index.store)
    try:
        assert _read(strict, None)["grant_refused"] == "missing"
    finally:
        strict.shutdown()
