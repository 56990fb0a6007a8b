"""Tensor parallelism without an engine: which KV heads each rank holds (against vLLM's own
placement), and the scheduler's side of a TP=2 engine driven with vLLM's objects: a publish
is written (its manifest, last) only when every rank's part is stored, a load is metered
once and only when every rank loaded its part, and one rank's failure is every rank's."""

from __future__ import annotations

import json

import pytest

from tests.rigs.scheduler import BLOCK, CHUNK, FINGERPRINT, PUBLISH_KEY, blocks_for, step_output, vllm_request
from vllm_kvcdn.artifact import catalog
from vllm_kvcdn.artifact.chain import document_chunks
from vllm_kvcdn.artifact.documents import join_parts, new_manifest, put_manifest
from vllm_kvcdn.artifact.manifest import ChunkPart, Manifest, ManifestChunk
from vllm_kvcdn.artifact.parts import KVPart, all_parts, rank_part
from vllm_kvcdn.config import KVCDNConfig
from vllm_kvcdn.connector.scheduler import KVCDNScheduler
from vllm_kvcdn.connector.wire import DocumentResult, LoadReceipt, WorkerReport
from vllm_kvcdn.market import ledger
from vllm_kvcdn.store import open_store

DOC = list(range(100, 100 + 2 * CHUNK + 40))
PROMPT = DOC + [7, 8, 9]
PARTS = ["h0-1of2", "h1-2of2"]


@pytest.mark.parametrize("heads,ranks", [(8, 1), (8, 2), (8, 4), (8, 8), (8, 16), (2, 2), (2, 4), (4, 8), (1, 4)])
def test_each_rank_holds_the_heads_vllm_gives_it(heads, ranks):
    """vLLM 0.32's ``QKVParallelLinear`` loads K/V shard ``tp_rank // replicas`` of size
    ``max(1, heads // ranks)`` (``linear.py``); ``ModelConfig.get_num_kv_heads`` counts as
    much, and the worker's geometry takes its count from there."""
    replicas = ranks // heads if ranks >= heads else 1
    size = max(1, heads // ranks)
    for rank in range(ranks):
        part = rank_part(heads, ranks, rank)
        assert (part.first_head, part.num_heads) == ((rank // replicas) * size, size)
        assert KVPart.parse(part.name, heads) == part
    names = all_parts(heads, ranks)
    assert len(names) == min(heads, ranks) and (names == [""]) == (min(heads, ranks) == 1)  # 1 head: whole


@pytest.mark.parametrize("layers,stages,partition", [(28, 2, None), (36, 4, None), (7, 3, None), (4, 2, None),
                                                     (28, 2, "10,18"), (28, 4, "7,7,7,7")])
def test_pipeline_stages_hold_the_layers_vllm_assigns(layers, stages, partition, monkeypatch):
    """Pipeline parallelism is refused at start (vLLM's CPU backend cannot run it here),
    but its parts are named now: each stage's layer range, told from the indices of the
    KV caches vLLM gives that stage's worker, is the range vLLM's own ``get_pp_indices``
    assigns it (its uneven split and ``VLLM_PP_LAYER_PARTITION`` included), and every
    (stage, rank) part is one of the parts the scheduler expects."""
    from vllm.distributed.utils import get_pp_indices

    from vllm_kvcdn.artifact.parts import stage_layers
    from vllm_kvcdn.connector.geometry import layer_indices, layers_in_order

    if partition:
        monkeypatch.setenv("VLLM_PP_LAYER_PARTITION", partition)
    ranges = [(*get_pp_indices(layers, rank, stages), layers) for rank in range(stages)]
    expected = all_parts(8, 2, ranges)
    assert len(expected) == 2 * stages
    for first, end, _ in ranges:
        caches = {f"model.layers.{i}.self_attn.attn": None for i in range(first, end)}  # as vLLM names them
        held = stage_layers(list(layer_indices(caches)), layers)
        assert held == (first, end, layers)
        assert layers_in_order(caches, first_layer=first) == list(caches)
        for rank in range(2):
            part = rank_part(8, 2, rank, held)
            assert part.name in expected and KVPart.parse(part.name, 8) == part
    with pytest.raises(ValueError):
        stage_layers([0, 1, 3], layers)


def test_part_names_are_checked():
    with pytest.raises(ValueError):
        KVPart.parse("h0-4of8", 4)
    with pytest.raises(ValueError):
        KVPart.parse("../x", 8)
    with pytest.raises(ValueError):
        rank_part(8, 3, 0)
    with pytest.raises(ValueError):  # one spelling per part: it is an object key
        KVPart.parse("h0-8of8", 8)
    assert KVPart.parse("h0-4of8.l0-14of28", 8) == KVPart(0, 4, 8, (0, 14, 28))


def test_a_manifest_of_whole_chunks_is_written_as_before_parts_existed():
    """Readers that predate parts read one-rank manifests (no "parts" key anywhere)."""
    whole = Manifest("d", "f", 10, CHUNK, [ManifestChunk("d", "s", 10, 5, "x")])
    assert "parts" not in whole.to_json().decode()
    parted = Manifest("d", "f", 10, CHUNK, [ManifestChunk("d", "s", 10, 10, "", (ChunkPart("h0-1of2", 5, "a"),
                                                                                     ChunkPart("h1-2of2", 5, "b")))],
                      parts=PARTS)
    assert Manifest.from_json(parted.to_json()) == parted
    broken = json.loads(parted.to_json())
    broken["parts"] = ["h0-1of2"]
    with pytest.raises(Exception, match="parts"):
        Manifest.from_json(json.dumps(broken).encode())


def test_reports_of_two_ranks_for_one_request_are_both_kept():
    a = WorkerReport(loads={"r": [LoadReceipt(10, 100, 50, 0.1)]})
    b = WorkerReport(loads={"r": [LoadReceipt(10, 100, 50, 0.3)]}, failed_loads={"q"})
    merged = a.aggregate(b)
    assert len(merged.loads["r"]) == 2 and merged.failed_loads == {"q"}


@pytest.fixture
def tp2(tmp_path):
    url = f"file://{tmp_path / 'store'}"
    config = KVCDNConfig(store_url=url, chunk_size=CHUNK, ledger_path=str(tmp_path / "ledger.sqlite3"),
                         publish_key=PUBLISH_KEY, index_refresh_s=3600)
    half = KVCDNScheduler(config, FINGERPRINT, open_store(url), parts=PARTS, ranks=2)
    yield half
    half.shutdown()


def _published(half) -> tuple:
    """A publish request through its prefill: (request, its save)."""
    pub = vllm_request(DOC, kvcdn={"publish": True, "key": PUBLISH_KEY})
    half.on_new_request(pub)
    assert half.get_num_new_matched_tokens(pub, 0) == (0, False)
    half.update_state_after_alloc(pub, blocks_for(len(DOC)), 0)
    (save,) = half.build_connector_meta(step_output((pub, list(range(1, -(-len(DOC) // BLOCK) + 1)), len(DOC)))).saves
    return pub, save


def _stored(save, part: str, ok: bool = True) -> DocumentResult:
    chunks = [ManifestChunk(s.key, s.parent, s.num_tokens, 100, f"x{part}") for s in save.spans]
    if not ok:
        return DocumentResult(save.doc_id, False, False, save.prefill, error=f"rank {part} could not write")
    return DocumentResult(save.doc_id, False, True, save.prefill, {"num_chunks": len(chunks), "new_chunks": 3,
                                                                   "new_bytes": 300, "write_seconds": 0.1},
                          part=part, stored=chunks)


def test_the_manifest_is_written_when_every_rank_has_stored_its_part(tp2):
    pub, save = _published(tp2)
    tp2.request_finished(pub)
    store = tp2.index.store
    tp2.update_connector_output(WorkerReport(documents={pub.request_id: [_stored(save, PARTS[0])]}))
    assert catalog.get_manifest(store, save.doc_id) is None  # rank 1 has not stored its part yet
    tp2.update_connector_output(WorkerReport(documents={pub.request_id: [_stored(save, PARTS[1])]}))
    manifest = catalog.get_manifest(store, save.doc_id)
    assert manifest.parts == PARTS
    assert [[p.checksum for p in c.parts] for c in manifest.chunks] == [["x" + p for p in PARTS]] * 3
    report = tp2.desk._results[save.doc_id]
    assert report["published"] is True and report["new_chunks"] == 6 and report["parts"] == PARTS


def test_one_rank_failing_publishes_nothing(tp2):
    pub, save = _published(tp2)
    tp2.request_finished(pub)
    tp2.update_connector_output(WorkerReport(documents={pub.request_id: [_stored(save, PARTS[0]),
                                                                         _stored(save, PARTS[1], ok=False)]}))
    assert catalog.get_manifest(tp2.index.store, save.doc_id) is None
    report = tp2.desk._results[save.doc_id]
    assert report["published"] is False and "could not write" in report["error"]
    other = vllm_request(PROMPT)
    tp2.on_new_request(other)
    assert tp2.get_num_new_matched_tokens(other, 0) == (0, False)  # nothing to hit


def _hit(half):
    spans = document_chunks(DOC, FINGERPRINT.digest, None, CHUNK)
    by_part = {p: [ManifestChunk(s.key, s.parent, s.num_tokens, 100, "x") for s in spans] for p in PARTS}
    put_manifest(half.index.store, new_manifest(doc_id=spans[-1].key, chunks=join_parts(by_part),
                                                num_tokens=len(DOC), fingerprint=FINGERPRINT.digest, profile={},
                                                chunk_size=CHUNK, producer={}))
    half.index.refresh(force=True)
    request = vllm_request(PROMPT)
    half.on_new_request(request)
    assert half.get_num_new_matched_tokens(request, 0) == (len(DOC), True)
    half.update_state_after_alloc(request, blocks_for(len(PROMPT)), len(DOC))
    half.build_connector_meta(step_output(total=0))
    return request


def test_a_load_is_metered_once_when_every_rank_has_loaded_its_part(tp2):
    request = _hit(tp2)
    tp2.update_connector_output(WorkerReport(loads={request.request_id: [LoadReceipt(len(DOC), 100, 90, 0.2)]}))
    assert ledger.reads(tp2.config.ledger_path, ledger.Filters(), 10) == []  # one rank of two
    tp2.update_connector_output(WorkerReport(loads={request.request_id: [LoadReceipt(len(DOC), 100, 80, 0.4)]}))
    _, params = tp2.request_finished(request)
    assert params["kvcdn"]["hit"] is True
    (row,) = ledger.reads(tp2.config.ledger_path, ledger.Filters(), 10)
    assert (row.kv_bytes, row.store_bytes, row.load_seconds) == (200, 170, 0.4)


def test_one_rank_failing_a_load_makes_it_a_miss_for_every_rank(tp2):
    request = _hit(tp2)
    tp2.update_connector_output(WorkerReport(loads={request.request_id: [LoadReceipt(len(DOC), 100, 90, 0.2)]}))
    tp2.update_connector_output(WorkerReport(failed_loads={request.request_id}))
    assert tp2.get_num_new_matched_tokens(request, 0) == (0, False)  # recomputed, never loaded again
    _, params = tp2.request_finished(request)
    assert params["kvcdn"]["hit"] is False and params["kvcdn"]["loaded_tokens"] == 0
    assert ledger.reads(tp2.config.ledger_path, ledger.Filters(), 10) == []


def test_a_load_that_failed_after_a_prefix_meters_the_prefix_every_rank_wrote(tp2):
    """vLLM keeps what was written before a rank's first failed block and recomputes the
    rest: the tokens every rank wrote are served, and metered (the least of the ranks)."""
    request = _hit(tp2)
    rid = request.request_id
    tp2.update_connector_output(WorkerReport(loads={rid: [LoadReceipt(2 * CHUNK, 200, 150, 0.2)]},
                                             failed_loads={rid}))
    tp2.update_connector_output(WorkerReport(loads={rid: [LoadReceipt(CHUNK, 100, 80, 0.3)]}, failed_loads={rid}))
    _, params = tp2.request_finished(request)
    assert params["kvcdn"]["hit"] is False and params["kvcdn"]["loaded_tokens"] == CHUNK
    assert params["kvcdn"]["error"].startswith(f"loaded 256 of {len(DOC)} tokens")
    (row,) = ledger.reads(tp2.config.ledger_path, ledger.Filters(), 10)
    assert (row.loaded_tokens, row.computed_tokens) == (CHUNK, len(PROMPT) - CHUNK)


def test_the_node_disk_budget_is_shared_by_its_workers(tiny_model, monkeypatch):
    """``disk_cache_gib`` is the node's: under TP=2 each rank's worker keeps half (each
    worker process runs its own LRU over its own files)."""
    from vllm.engine.arg_utils import EngineArgs

    from vllm_kvcdn.compat import workers_per_node

    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # vLLM's CPU backend binds one core per rank

    def workers(tp: int) -> int:
        args = EngineArgs(model=str(tiny_model), enforce_eager=True, max_model_len=4096, tensor_parallel_size=tp,
                          kv_transfer_config={"kv_connector": "KVCDNConnector", "kv_role": "kv_both"})
        return workers_per_node(args.create_engine_config())

    assert (workers(1), workers(2)) == (1, 2)
    config = KVCDNConfig(store_url="file:///tmp/unused", disk_cache_gib=8.0)
    assert config.for_worker(2).disk_cache_gib == 4.0 and config.for_worker(1) is config
    off = KVCDNConfig(store_url="file:///tmp/unused")
    assert off.for_worker(2).disk_cache_gib == 0.0
