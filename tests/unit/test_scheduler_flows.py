"""The scheduler half's two flows end to end, without an engine: vLLM's own request
objects (``tests/rigs/scheduler.py``), a real file store, and the two things only an
engine makes stood in for: the ``SchedulerOutput`` of a step (the fields the connector
reads) and the worker's ``WorkerReport``.

- publish desk: a publish runs alone, its save goes out in the step that ends its
  prefill, its response says "pending", a wait_for request waits in vLLM's queue until
  the worker's result is in, then reports it; the document hits at once.
- load planner: a hit is planned asynchronously, its load goes out with the request's
  blocks, a receipt meters it in the ledger, a failed load is never claimed or retried.
"""

from __future__ import annotations

import time

import pytest

from tests.rigs.scheduler import (
    BLOCK,
    CHUNK,
    FINGERPRINT,
    PUBLISH_KEY,
    blocks_for,
    publish,
    step_output,
    vllm_request,
)
from vllm_kvcdn.artifact import catalog
from vllm_kvcdn.artifact.chain import document_chunks
from vllm_kvcdn.artifact.manifest import ManifestChunk
from vllm_kvcdn.config import KVCDNConfig
from vllm_kvcdn.connector.scheduler import KVCDNScheduler
from vllm_kvcdn.connector.wire import DocumentResult, LoadReceipt, WorkerReport
from vllm_kvcdn.market import ledger
from vllm_kvcdn.store import open_store

DOC = list(range(100, 100 + 2 * CHUNK + 40))  # two whole chunks and a tail
PROMPT = DOC + [7, 8, 9]


@pytest.fixture
def half(tmp_path):
    url = f"file://{tmp_path / 'store'}"
    config = KVCDNConfig(store_url=url, chunk_size=CHUNK, ledger_path=str(tmp_path / "ledger.sqlite3"),
                         publish_key=PUBLISH_KEY, index_refresh_s=3600)
    half = KVCDNScheduler(config, FINGERPRINT, open_store(url))
    yield half
    half.shutdown()


def test_a_publish_is_saved_at_the_end_of_its_prefill_and_its_result_is_waited_for(half):
    pub = vllm_request(DOC, kvcdn={"publish": True, "key": PUBLISH_KEY, "title": "t"})
    half.on_new_request(pub)
    assert half.get_num_new_matched_tokens(pub, 0) == (0, False)  # alone: nothing else runs
    half.update_state_after_alloc(pub, blocks_for(len(DOC)), 0)
    other = vllm_request(PROMPT)
    half.on_new_request(other)
    assert half.get_num_new_matched_tokens(other, 0) == (None, False)  # held while the publish computes
    block_ids = list(range(1, -(-len(DOC) // BLOCK) + 1))
    meta = half.build_connector_meta(step_output((pub, block_ids, len(DOC))))
    (save,) = meta.saves
    doc_id = document_chunks(DOC, FINGERPRINT.digest, None, CHUNK)[-1].key
    assert (save.doc_id, save.block_ids, save.title, save.verify) == (doc_id, block_ids, "t", False)
    assert save.prefill == {"steps": [[0, len(DOC), 1]], "alone": True}
    _, params = half.request_finished(pub)
    assert params["kvcdn"]["pending"] is True and params["kvcdn"]["document"] == doc_id

    wait = vllm_request([0], kvcdn={"wait_for": doc_id, "key": PUBLISH_KEY})
    half.on_new_request(wait)
    assert half.get_num_new_matched_tokens(wait, 0) == (None, False)  # the worker has not reported
    stored = [ManifestChunk(s.key, s.parent, s.num_tokens, 100, "x") for s in save.spans]
    result = DocumentResult(doc_id, False, True, save.prefill, {"num_chunks": 3}, stored=stored)
    half.update_connector_output(WorkerReport(documents={pub.request_id: [result]}))
    assert half.get_num_new_matched_tokens(wait, 0) == (0, False)
    _, params = half.request_finished(wait)
    assert params["kvcdn"] == result.as_report()
    # The scheduler wrote the manifest from what the worker stored (no chunk was written
    # in this test), and its index took the document from the report: a request may hit
    # it before any refresh.
    manifest = catalog.get_manifest(half.index.store, doc_id)
    assert [c.key for c in manifest.chunks] == [s.key for s in save.spans] and manifest.parts == []
    assert half.get_num_new_matched_tokens(other, 0) == (len(DOC), True)


def test_a_hit_is_planned_loaded_and_metered_once(half):
    doc_id = publish(half.index.store, DOC, fingerprint=FINGERPRINT.digest)
    half.index.refresh(force=True)
    request = vllm_request(PROMPT, salt=None)
    half.on_new_request(request)
    assert half.get_num_new_matched_tokens(request, 0) == (len(DOC), True)
    half.update_state_after_alloc(request, blocks_for(len(PROMPT)), len(DOC))
    meta = half.build_connector_meta(step_output(total=0))
    (load,) = meta.loads
    assert meta.idle and load.req_id == request.request_id
    assert [(c.start, c.write_from, c.write_to, c.is_tail) for c in load.chunks] == \
        [(0, 0, CHUNK, False), (CHUNK, CHUNK, 2 * CHUNK, False), (2 * CHUNK, 2 * CHUNK, len(DOC), True)]
    manifest = catalog.get_manifest(half.index.store, doc_id)  # every tier checks what it loads against it
    assert [c.checksums for c in load.chunks] == [{"": c.checksum} for c in manifest.chunks]
    assert not any(c.private for c in load.chunks)
    assert half.build_connector_meta(step_output(total=0)).loads == []  # sent once
    receipt = LoadReceipt(len(DOC), 1000, 900, 0.05)
    half.update_connector_output(WorkerReport(loads={request.request_id: [receipt]}))
    _, params = half.request_finished(request)
    assert params["kvcdn"] == {"hit": True, "document": doc_id, "matched_tokens": len(DOC), "loaded_tokens": len(DOC)}
    (row,) = ledger.reads(half.config.ledger_path, ledger.Filters(), 10)
    assert (row.document, row.loaded_tokens, row.computed_tokens, row.store_bytes) == (doc_id, len(DOC), 3, 900)


def test_a_failed_load_is_not_claimed_not_metered_and_not_retried(half):
    publish(half.index.store, DOC, fingerprint=FINGERPRINT.digest)
    half.index.refresh(force=True)
    request = vllm_request(PROMPT)
    half.on_new_request(request)
    count, _ = half.get_num_new_matched_tokens(request, 0)
    half.update_state_after_alloc(request, blocks_for(len(PROMPT)), count)
    half.build_connector_meta(step_output(total=0))
    half.update_connector_output(WorkerReport(failed_loads={request.request_id}))
    assert half.get_num_new_matched_tokens(request, 0) == (0, False)  # recomputed, never loaded again
    _, params = half.request_finished(request)
    assert params["kvcdn"]["hit"] is False and params["kvcdn"]["loaded_tokens"] == 0 and "error" in params["kvcdn"]
    assert ledger.reads(half.config.ledger_path, ledger.Filters(), 10) == []


def test_a_worker_refusal_stops_planning_loads(half):
    publish(half.index.store, DOC, fingerprint=FINGERPRINT.digest)
    half.index.refresh(force=True)
    half.update_connector_output(WorkerReport(refusal="KV layout probe failed"))
    request = vllm_request(PROMPT)
    half.on_new_request(request)
    assert half.get_num_new_matched_tokens(request, 0) == (0, False)


@pytest.fixture
def sharing(tmp_path):
    """A scheduler half whose engine runs vLLM's prefix cache (blocks of ``BLOCK``)."""
    url = f"file://{tmp_path / 'store'}"
    config = KVCDNConfig(store_url=url, chunk_size=CHUNK, ledger_path="", index_refresh_s=3600, load_timeout_s=0.2)
    half = KVCDNScheduler(config, FINGERPRINT, open_store(url), shared_block_size=BLOCK)
    publish(half.index.store, DOC, fingerprint=FINGERPRINT.digest)
    half.index.refresh(force=True)
    yield half
    half.shutdown()


def _start_load(half, request) -> None:
    half.on_new_request(request)
    count, _ = half.get_num_new_matched_tokens(request, 0)
    half.update_state_after_alloc(request, blocks_for(len(request.prompt_token_ids)), count)


def test_a_request_waits_for_a_load_of_its_chunks_in_flight_then_loads_only_what_vllm_did_not_keep(sharing):
    first, second = vllm_request(PROMPT), vllm_request(DOC + [5, 6])
    _start_load(sharing, first)
    sharing.on_new_request(second)
    assert sharing.get_num_new_matched_tokens(second, 0) == (None, False)  # first's load writes its blocks
    sharing.update_connector_output(WorkerReport(), {first.request_id})
    # vLLM cached first's whole blocks; second finds them locally: only the partial block loads.
    whole = len(DOC) // BLOCK * BLOCK
    assert sharing.get_num_new_matched_tokens(second, whole) == (len(DOC) - whole, True)
    sharing.update_state_after_alloc(second, blocks_for(len(DOC) + 2), len(DOC) - whole)
    assert sharing.stats.data["collapsed_loads"] == 1


def test_a_load_that_shares_no_whole_block_or_takes_too_long_is_not_waited_for(sharing):
    first = vllm_request(PROMPT)
    _start_load(sharing, first)
    tail_only = vllm_request(DOC + [1, 2])  # vLLM holds its whole blocks already: nothing to share
    sharing.on_new_request(tail_only)
    whole = len(DOC) // BLOCK * BLOCK
    assert sharing.get_num_new_matched_tokens(tail_only, whole) == (len(DOC) - whole, True)
    late = vllm_request(DOC + [3, 4])
    sharing.on_new_request(late)
    assert sharing.get_num_new_matched_tokens(late, 0) == (None, False)
    time.sleep(0.25)  # past load_timeout_s: the first load is not coming
    assert sharing.get_num_new_matched_tokens(late, 0) == (len(DOC), True)
    assert "collapsed_loads" not in sharing.stats.data


def test_without_vllms_prefix_cache_every_request_loads_its_own(half):
    publish(half.index.store, DOC, fingerprint=FINGERPRINT.digest)
    half.index.refresh(force=True)
    first, second = vllm_request(PROMPT), vllm_request(DOC + [5, 6])
    _start_load(half, first)
    half.on_new_request(second)
    assert half.get_num_new_matched_tokens(second, 0) == (len(DOC), True)
