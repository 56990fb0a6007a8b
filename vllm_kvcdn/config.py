"""The connector's settings, parsed once from ``kv_connector_extra_config``."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields

from vllm_kvcdn.defaults import (
    DEFAULT_CHUNK_SIZE,
    PUBLISHER_KEY_ENV,
    default_ledger_path,
    default_store_url,
    disk_tier_dir,
)
from vllm_kvcdn.market.economics import Tariff

TEST_FAULTS_ENV = "KVCDN_TEST_FAULTS"  # tests only: comma-separated faults to inject (see injected_faults)


def injected_faults() -> dict[str, str]:
    """Faults tests and benchmarks inject (``name`` or ``name=value``, comma-separated);
    never set in production. ``skip_partial_tail``: claim a document's partial last chunk
    loaded, leave its slots stale (proves the exactness tests can see a wrong load).
    ``chunk_get_delay_s=S``: sleep S seconds before each chunk read (store/latency.py)."""
    faults = (f.partition("=") for f in os.environ.get(TEST_FAULTS_ENV, "").split(",") if f)
    return {name.strip(): value.strip() for name, _, value in faults}


@dataclass(frozen=True)
class KVCDNConfig:
    # Where artifacts live: file:///path (default $KVCDN_STORE or ~/.cache/kvcdn), or
    # s3://bucket/prefix[?endpoint_url=...] shared by many servers (store/s3.py).
    store_url: str = field(default_factory=default_store_url)
    # The node's disk tier in front of the store (for s3://): chunks once read stay on
    # local disk, least recently used out first, across restarts. 0: off.
    disk_cache_gib: float = 0.0
    disk_cache_dir: str = field(default_factory=lambda: str(disk_tier_dir()))
    # With the disk tier on, each worker also keeps the engine's own block images of the
    # chunks it loaded (its RAM tier's slots) under disk_cache_dir/images, bounded by
    # disk_cache_gib too: a read from disk then skips the packing op. false: canonical only.
    disk_images: bool = True
    # How often the scheduler looks for documents published or deleted by other servers
    # (one listing of the manifests; only new or changed ones are read).
    index_refresh_s: float = 2.0
    # Tokens per chunk; a multiple of the engine's KV block size.
    chunk_size: int = DEFAULT_CHUNK_SIZE
    # Verify each chunk's checksum before it is copied into the KV cache.
    verify_checksums: bool = True
    # Host-RAM tier per worker: engine-native images of hot chunks' whole blocks (0: off).
    ram_tier_gib: float = 1.0
    # How long a publish may hold back new requests while in-flight ones finish, so its
    # prefill runs alone and its bytes depend only on the tokens and the compute profile
    # (connector/publish_gate.py). 0: publishes share steps; their bytes then depend on
    # the batch, which the manifest records.
    publish_isolation_s: float = 10.0
    # The publisher key: a request may publish or verify through kv_transfer_params only
    # when it carries this key ({"kvcdn": {"publish": true, "key": ...}}). Empty (the
    # default, unless $KVCDN_PUBLISHER_KEY is set, as `kvcdn serve` does): no request may.
    # vLLM logs its arguments at start: prefer the environment variable.
    publish_key: str = field(default="", repr=False)
    # Store reads, checks and writes run in background threads, never holding an engine
    # step. false: they run inside the step (how kvcdn ran before background I/O; kept so benchmarks
    # can compare both in one run).
    async_io: bool = True
    # Chunk reads in flight at once per worker (a remote store's round trips overlap); the
    # worker keeps io_threads + 2 chunk-sized read buffers (connector/read_buffers.py).
    io_threads: int = 4
    # A background load still reading after this many seconds gives up on the chunks it
    # has not written (they are recomputed, counted as reason "timeout"): a slow or hung
    # store delays a request by at most this much.
    load_timeout_s: float = 10.0
    # Background load jobs per worker: requests whose chunks load at once (each runs its
    # chunk reads on the io_threads).
    load_jobs: int = 2
    # How long a worker step that computes nothing waits for a background job to end
    # before vLLM steps again (longer: fewer idle steps, later reports).
    idle_wait_s: float = 0.005
    # How long a wait_for or sync_index request (the side API's second request of a
    # publish, verify or delete) may wait in vLLM's queue before it answers "pending".
    wait_limit_s: float = 600.0
    # Publish/verify results the scheduler keeps for wait_for requests (oldest dropped).
    max_results: int = 4096
    # The metering ledger (ledger.py): one row per successful cache read, in this SQLite
    # file ($KVCDN_LEDGER, else ~/.cache/kvcdn/ledger.sqlite3). "": no ledger.
    ledger_path: str = field(default_factory=default_ledger_path)
    # Prices for the usage report (economics.Tariff): input_usd_per_mtok,
    # cache_read_multiplier, storage_usd_per_gb_month, egress_usd_per_gb.
    tariff: dict = field(default_factory=dict)
    # A benchmark result (benchmarks/gpu_paper_table.py or paper_table.py JSON) whose
    # read/prefill ratios estimate the provider's compute cost in the usage report;
    # "": the paper's Table 1.
    measured_ratios: str = ""
    # How published chunks are stored (codec.py): "auto" compresses for a remote store
    # (s3://: zstd:1 over byte planes, artifact format v2) and not for a local one (file://:
    # decoding costs more than the read it saves; benchmarks/compression.py measures both);
    # "none", or a codec: "zstd[:level]", "lz4", "zlib[:level]". Readers take every format.
    codec: str = "auto"

    def __post_init__(self):
        if not isinstance(self.chunk_size, int) or self.chunk_size <= 0:
            raise ValueError(f"kvcdn: chunk_size must be a positive integer, got {self.chunk_size!r}")
        if self.disk_cache_gib < 0:
            raise ValueError(f"kvcdn: disk_cache_gib must be >= 0, got {self.disk_cache_gib!r}")
        if not self.index_refresh_s > 0:
            raise ValueError(f"kvcdn: index_refresh_s must be > 0, got {self.index_refresh_s!r}")
        if self.ram_tier_gib < 0:
            raise ValueError(f"kvcdn: ram_tier_gib must be >= 0, got {self.ram_tier_gib!r}")
        if not isinstance(self.publish_key, str):
            raise ValueError("kvcdn: publish_key must be a string")
        if not isinstance(self.io_threads, int) or self.io_threads < 1:
            raise ValueError(f"kvcdn: io_threads must be a positive integer, got {self.io_threads!r}")
        if not self.load_timeout_s > 0:
            raise ValueError(f"kvcdn: load_timeout_s must be > 0, got {self.load_timeout_s!r}")
        for name in ("load_jobs", "max_results"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"kvcdn: {name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("idle_wait_s", "wait_limit_s"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"kvcdn: {name} must be >= 0, got {getattr(self, name)!r}")
        if self.publish_isolation_s < 0:
            raise ValueError(f"kvcdn: publish_isolation_s must be >= 0, got {self.publish_isolation_s!r}")
        if not isinstance(self.ledger_path, str):
            raise ValueError(f"kvcdn: ledger_path must be a path (or \"\" for none), got {self.ledger_path!r}")
        if not isinstance(self.tariff, dict):
            raise ValueError(f"kvcdn: tariff must be an object of prices, got {self.tariff!r}")
        Tariff.from_dict(self.tariff)  # names the bad key or price
        if self.chunk_codec:
            from vllm_kvcdn.artifact.codec import parse

            parse(self.chunk_codec)  # names the codec, or the library that is missing

    @property
    def chunk_codec(self) -> str | None:
        """The codec publishes use (None: stored raw, format v1)."""
        from vllm_kvcdn.artifact.codec import for_store

        return for_store(self.store_url, self.codec)

    @property
    def prices(self) -> Tariff:
        return Tariff.from_dict(self.tariff)

    def compute_ratios(self):
        """The read/prefill ratios the usage report prices the provider's compute with."""
        from vllm_kvcdn.market.economics import PAPER_RATIOS, load_measured

        return load_measured(self.measured_ratios) if self.measured_ratios else PAPER_RATIOS

    @classmethod
    def from_extra_config(cls, extra: dict | None) -> "KVCDNConfig":
        """Parse ``kv_connector_extra_config``; ``KVCDN_STORE`` and ``KVCDN_PUBLISHER_KEY``
        stand in for an absent store_url (see ``defaults``) and publish_key."""
        extra = dict(extra or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(extra) - known)
        if unknown:
            raise ValueError(
                f"kvcdn: unknown kv_connector_extra_config keys {unknown}; known keys: {sorted(known)}"
            )
        if "publish_key" not in extra and os.environ.get(PUBLISHER_KEY_ENV):
            extra["publish_key"] = os.environ[PUBLISHER_KEY_ENV]
        return cls(**extra)

    def open_store(self, tiers: bool = True):
        """The store, behind the disk tier when one is configured (``tiers``: the
        workers, who read chunks; the scheduler and the side API read manifests only)."""
        from vllm_kvcdn.store import open_store

        gib = self.disk_cache_gib if tiers else 0.0
        return open_store(self.store_url, disk_cache_dir=self.disk_cache_dir, disk_cache_gib=gib)

    def check_block_size(self, block_size: int) -> None:
        if self.chunk_size % block_size:
            raise ValueError(
                f"kvcdn: chunk_size {self.chunk_size} is not a multiple of the engine's KV block "
                f"size {block_size}; set kv_connector_extra_config.chunk_size to a multiple of "
                f"{block_size} (e.g. {max(block_size, self.chunk_size // block_size * block_size)})"
            )
