"""``KVCDNConnector``: a thin facade that builds the scheduler half (``scheduler``) or the
worker half (``worker``) by role, as vLLM's offloading connector does, and restates each
of vLLM's methods' contracts (``KVConnectorBase_V1``) in our words."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from vllm_kvcdn.artifact.parts import all_parts
from vllm_kvcdn.compat import (
    io_cpus,
    kv_geometry,
    kv_part,
    total_kv_heads,
    unchecked_release,
    vllm_fingerprint,
    workers_per_node,
)
from vllm_kvcdn.config import KVCDNConfig, injected_faults
from vllm_kvcdn.connector.kv_settings import engine_refusal
from vllm_kvcdn.connector.stats import KVCDNPromMetrics, KVCDNStats
from vllm_kvcdn.connector.wire import KVCDNMetadata, WorkerReport
from vllm_kvcdn.log import get_logger
from vllm_kvcdn.store.latency import LatencyStore

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

logger = get_logger(__name__)


class KVCDNConnector(KVConnectorBase_V1):
    _cache_hit_source = CacheHitSource.DISK

    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole, kv_cache_config: "KVCacheConfig"):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        transfer = self._kv_transfer_config
        self.config = KVCDNConfig.from_extra_config(transfer.kv_connector_extra_config)
        if role == KVConnectorRole.WORKER:
            self.config = self.config.for_worker(workers_per_node(vllm_config))
        self.config.check_block_size(vllm_config.cache_config.block_size)
        warning = unchecked_release()
        if warning:
            logger.warning("kvcdn: %s", warning)
        refusal = engine_refusal(vllm_config, kv_cache_config)  # what cannot work at all (kv_settings.py)
        if refusal is not None:
            raise ValueError(f"kvcdn: {refusal}")
        self.fingerprint = vllm_fingerprint(vllm_config, in_worker=role == KVConnectorRole.WORKER)
        store = self.config.open_store(tiers=role == KVConnectorRole.WORKER)
        faults = injected_faults()
        if faults.get("chunk_get_delay_s") or faults.get("chunk_get_delay_file"):
            store = LatencyStore(store, float(faults.get("chunk_get_delay_s") or 0), faults.get("chunk_get_delay_file"))
        self.scheduler_half = self.worker_half = None
        if role == KVConnectorRole.SCHEDULER:
            from vllm_kvcdn.connector.scheduler import KVCDNScheduler

            if transfer.kv_load_failure_policy != "recompute":
                # A cache miss must never fail a request: recompute what did not load. vLLM
                # reads the policy after building the connector, from this same config,
                # unless we are inside a MultiConnector (its top-level config decides).
                logger.info("kvcdn: setting kv_load_failure_policy='recompute' (was %r; inside a MultiConnector, "
                            "set it in the top-level --kv-transfer-config)", transfer.kv_load_failure_policy)
                transfer.kv_load_failure_policy = "recompute"
            tp_size = vllm_config.parallel_config.tensor_parallel_size
            cache = vllm_config.cache_config
            shared_block_size = cache.block_size if cache.enable_prefix_caching else 0  # loads can be shared
            self.scheduler_half = KVCDNScheduler(self.config, self.fingerprint, store,
                                                 parts=all_parts(total_kv_heads(vllm_config), tp_size),
                                                 ranks=tp_size, shared_block_size=shared_block_size)
            logger.info(
                "kvcdn: scheduler ready: store %s, chunk %d tokens, fingerprint %s (%s, %s, %s, kernels %s)",
                store.url, self.config.chunk_size, self.fingerprint.digest,
                *(self.fingerprint.fields[k] for k in ("engine", "device", "compile", "kernels")),
            )
        else:
            from vllm_kvcdn.connector.worker import KVCDNWorker  # torch work: the worker process only

            self.worker_half = KVCDNWorker(self.config, self.fingerprint, store, kv_geometry(vllm_config),
                                           io_cpus=io_cpus(vllm_config), part=kv_part(vllm_config))

    # -- worker side -------------------------------------------------------------

    def register_kv_caches(self, kv_caches):
        """Once, at start: the engine's KV cache tensors by layer name (layout checked here)."""
        self.worker_half.register_kv_caches(kv_caches)

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        """Before the step's forward pass: start the loads the scheduler planned (in the
        background; their requests wait outside the step until ``get_finished``)."""
        meta = self._get_connector_metadata()
        if isinstance(meta, KVCDNMetadata):
            self.worker_half.start_load_kv(meta)

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Before a layer's attention: block until its KV is in."""
        # Loads are asynchronous: the request waits outside the step until every layer is
        # in, and other requests' steps overlap it. Nothing is left to wait for per layer.
        return

    def save_kv_layer(self, layer_name, kv_layer, attn_metadata, **kwargs) -> None:
        """After a layer's attention: nothing (a publish copies every layer at once in ``wait_for_save``)."""
        return

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        """Before the step's forward pass: its plan (and, for the prefill rate, its start)."""
        super().bind_connector_metadata(connector_metadata)
        if self.worker_half is not None and isinstance(connector_metadata, KVCDNMetadata):
            self.worker_half.step_started(connector_metadata)

    def wait_for_save(self):
        """After the forward pass: copy out the documents whose prefill ended in this step
        (their blocks may be reused next step); they are written in the background."""
        meta = self._connector_metadata
        if isinstance(meta, KVCDNMetadata):
            self.worker_half.wait_for_save(meta)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """(requests whose saves ended, requests whose loads ended): we never hold a
        finished request's blocks (None), and report every load that ended, failed or not."""
        if self.worker_half is None:
            return None, None
        meta = self._connector_metadata
        idle = isinstance(meta, KVCDNMetadata) and meta.idle
        return None, self.worker_half.take_finished_loads(idle) or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        """Blocks of loads that failed since the last call: vLLM recomputes them and never
        caches them (``kv_load_failure_policy="recompute"``)."""
        return self.worker_half.get_block_ids_with_load_errors() if self.worker_half else set()

    def build_connector_worker_meta(self):
        """The worker's report of this step (``wire.WorkerReport``), or None."""
        return self.worker_half.build_worker_meta() if self.worker_half else None

    def shutdown(self):
        (self.worker_half or self.scheduler_half).shutdown()

    def get_kv_connector_stats(self):
        half = self.worker_half or self.scheduler_half
        return half.stats.take()

    @classmethod
    def get_required_kvcache_layout(cls, vllm_config: "VllmConfig") -> str | None:
        return None  # any: our layouts index vLLM's logical per-layer view (kv_layout.py)

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a cache, not a hand-off: a save that does not happen is a later miss

    @classmethod
    def supports_sleep_mode(cls, kv_transfer_config) -> bool:
        return False  # vLLM 0.33: the worker holds the cache tensors it registered (and a RAM tier of them)

    # -- scheduler side ----------------------------------------------------------

    def on_new_request(self, request: "Request") -> None:
        """A request arrives: its ``kv_transfer_params`` are read (untrusted; never raises)."""
        self.scheduler_half.on_new_request(request)

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int):
        """(tokens past ``num_computed_tokens`` we load, load asynchronously?); (None, False):
        ask again next step. May be called several times for one request."""
        return self.scheduler_half.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int):
        """The request's blocks are allocated: ``num_external_tokens`` of them are ours to fill."""
        self.scheduler_half.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        """Once per step, after scheduling: the loads and saves the worker starts."""
        return self.scheduler_half.build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output: "KVConnectorOutput"):
        """The workers' output of a step: our ``WorkerReport`` rides in it, and the loads
        every rank ended (``finished_recving``)."""
        report = connector_output.kv_connector_worker_meta
        self.scheduler_half.update_connector_output(report if isinstance(report, WorkerReport) else None,
                                                    set(connector_output.finished_recving or ()))

    def request_finished(self, request: "Request", block_ids: list[int]):
        """(hold the blocks?, kv_transfer_params of the response): never held; the report
        says what kvcdn did for the request."""
        return self.scheduler_half.request_finished(request)

    # -- metrics -------------------------------------------------------------------

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None):
        return KVCDNStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(cls, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        return KVCDNPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)
