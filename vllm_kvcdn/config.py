"""The connector's settings, parsed once from ``kv_connector_extra_config``."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace

from vllm_kvcdn.defaults import (
    DEFAULT_CHUNK_SIZE,
    ENVIRONMENT,
    PUBLISHER_KEY_ENV,
    SIGNING_KEY_ENV,
    TENANT_KEY_ENV,
    TEST_FAULTS_ENV,
    default_ledger_path,
    default_store_url,
    disk_tier_dir,
)
from vllm_kvcdn.market.economics import Tariff


def injected_faults() -> dict[str, str]:
    """Faults tests and benchmarks inject (``name`` or ``name=value``, comma-separated);
    never set in production. ``skip_partial_tail``: claim a document's partial last chunk
    loaded, leave its slots stale (proves the exactness tests can see a wrong load).
    ``chunk_get_delay_s=S``: sleep S seconds before each chunk read (store/latency.py);
    ``chunk_get_delay_file=PATH``: as long as the number in that file says (read at each
    chunk read; none: no delay), so a test can slow a running engine's store and heal it."""
    faults = (f.partition("=") for f in os.environ.get(TEST_FAULTS_ENV, "").split(",") if f)
    return {name.strip(): value.strip() for name, _, value in faults}


def setting(default=None, *, doc: str, shown: str | None = None, factory=None, **kw):
    """A setting: its default (or ``factory``), what it does (``doc``), and how the
    table shows the default (``shown``; else its value). ``settings_markdown`` prints them."""
    meta = {"doc": doc, "shown": shown}
    if factory is not None:
        return field(default_factory=factory, metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


@dataclass(frozen=True)
class KVCDNConfig:
    """``kv_connector_extra_config``: every key, its default and what it does (the
    README's settings table is printed from here: ``settings_markdown``)."""

    store_url: str = setting(
        factory=default_store_url, shown="`$KVCDN_STORE`, else `file://~/.cache/kvcdn`",
        doc="where artifacts live: `file:///path`, or `s3://bucket/prefix[?endpoint_url=...]` shared by many "
            "servers (store/s3.py)")
    chunk_size: int = setting(DEFAULT_CHUNK_SIZE, doc="tokens per chunk, a multiple of the engine's KV block size")
    publish_key: str = setting(
        "", repr=False, shown="`$KVCDN_PUBLISHER_KEY`, else none",
        doc="the key a request must carry to publish, verify or `wait_for` through `kv_transfer_params` (none: "
            "no request may); vLLM logs its arguments, so prefer the environment variable")
    signing_key: str = setting(
        "", shown="`$KVCDN_SIGNING_KEY`, else none",
        doc="this server's Ed25519 key file (`kvcdn keygen`): every manifest it publishes is signed with it, and "
            "its own documents are trusted (artifact/provenance.py)")
    trusted_publishers: list = setting(
        factory=list, shown="`[]`",
        doc="the publishers whose documents this server serves: Ed25519 public keys (64 hex digits) or files "
            "holding one (`kvcdn keygen` writes `KEY.pub`); a manifest signed by anyone else is never matched "
            "(counted: `vllm:kvcdn_untrusted_documents`)")
    tenant_keys: list = setting(
        factory=list, shown="`$KVCDN_TENANT_KEY`, else none",
        doc="tenant key files (`kvcdn keygen --tenant`): private documents (`\"private\": true` at publish) are "
            "sealed with the first (AES-256-GCM, artifact/sealing.py), and any of them opens them; a private "
            "document whose key this server lacks is never matched (a miss, counted)")
    require_grants: bool = setting(
        False, doc="every document loads only under a valid read grant (`kvcdn grant`, carried in "
                   "`kv_transfer_params`); off: only documents published with `require_grant` need one "
                   "(market/grants.py)")
    allow_unsigned: bool | None = setting(
        None, shown="true for `file://`, false for `s3://`",
        doc="serve unsigned documents too (one party owns the store); a shared bucket needs signatures: anyone "
            "who can write one object could otherwise make every server load other KV")
    publish_isolation_s: float = setting(
        10.0, doc="how long a publish may hold new requests back so its prefill runs alone and its bytes depend "
                  "only on the tokens and the compute profile (connector/publish_gate.py); 0: publishes share "
                  "steps, and the manifest says so")
    ram_tier_gib: float = setting(
        1.0, doc="per-worker host-RAM tier of hot chunks' engine-native block images, allocated at start, an "
                 "eighth of it for documents' partial last blocks (0: off)")
    verify_checksums: bool = setting(
        True, doc="hash every chunk's data before it enters the KV cache and check it against the checksum its "
                  "manifest records (false skips the hash where unsigned documents are allowed; a store that "
                  "needs signatures is always checked)")
    async_io: bool = setting(
        True, doc="store reads, checks and writes in background threads, never holding an engine step (false: "
                  "inside the step, kept so benchmarks compare both)")
    io_threads: int = setting(
        4, doc="chunk reads in flight at once per worker; the worker keeps `io_threads` + 2 chunk-sized read "
               "buffers (connector/read_buffers.py)")
    load_jobs: int = setting(2, doc="requests whose chunks a worker loads at once (each uses the read threads)")
    load_timeout_s: float = setting(
        10.0, doc="a load still reading after this long gives up on the chunks it has not written; they are "
                  "computed (failure reason `timeout`): a slow store delays a request by at most this much")
    load_policy: str = setting(
        "measured", doc="`measured`: a hit's chunks load only if they arrive sooner than computing their tokens "
                        "would take, each source's read time and the engine's prefill rate learnt online "
                        "(connector/load_costs.py; a skipped source is probed until it recovers); `always`: "
                        "every hit loads")
    recompute_margin_s: float = setting(
        0.05, doc="with `load_policy` `measured`: recompute only when that is faster than loading by more than this")
    idle_wait_s: float = setting(
        0.005, doc="how long a worker step that computes nothing waits for a background job before vLLM steps "
                   "again (longer: fewer idle steps, later reports)")
    disk_cache_gib: float = setting(
        0.0, shown="0 (off)", doc="the node's disk budget: chunks read from (or published to) an `s3://` store "
                                  "stay on local disk, least recently used out first, across restarts; the block "
                                  "images below count against it too (store/lru.py); the node's workers "
                                  "(tensor-parallel ranks) each keep an equal share")
    disk_cache_dir: str = setting(factory=lambda: str(disk_tier_dir()), shown="`~/.cache/kvcdn/disk-tier`",
                                  doc="where the disk tier keeps its files")
    disk_images: bool = setting(
        True, doc="with the disk tier on, each worker also keeps there the block images of the chunks it loads or "
                  "publishes (and the documents' partial last blocks), read back without the packing op (on CPU "
                  "straight into the paged cache; false: canonical chunks only)")
    index_refresh_s: float = setting(
        2.0, doc="how soon documents other servers publish or delete are seen (one listing of the manifests per "
                 "refresh; only new or changed ones are read)")
    wait_limit_s: float = setting(
        600.0, doc="how long a `wait_for` or `sync_index` request (the side API's second request of a publish, "
                   "verify or delete) may wait in vLLM's queue before it answers `pending`")
    max_results: int = setting(4096, doc="publish and verify results kept for `wait_for` requests (oldest out)")
    codec: str = setting(
        "auto", doc="how published chunks are stored: `auto` = `zstd:1` over byte planes (format v2) for "
                    "`s3://`, raw (v1) for `file://`; `none`, `zstd[:level]`, `lz4`, `zlib[:level]`; readers take "
                    "every format (artifact/codec.py)")
    ledger_path: str = setting(
        factory=default_ledger_path, shown="`$KVCDN_LEDGER`, else `~/.cache/kvcdn/ledger.sqlite3`",
        doc="the metering ledger: one SQLite row per successful cache read (`\"\"` or `KVCDN_LEDGER=off`: none)")
    tariff: dict = setting(
        factory=dict, shown="the paper's prices",
        doc="prices for the usage report: `input_usd_per_mtok`, `cache_read_multiplier`, "
            "`storage_usd_per_gb_month`, `egress_usd_per_gb` (market/economics.py)")
    measured_ratios: str = setting(
        "", shown="the paper's Table 1",
        doc="a `benchmarks/results/*.json` (`gpu_paper_table.py` or `paper_table.py`) whose read/prefill ratios "
            "estimate the compute a read costs the provider")

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
        if not isinstance(self.trusted_publishers, list):
            raise ValueError(f"kvcdn: trusted_publishers must be a list of public keys or key files, got "
                             f"{self.trusted_publishers!r}")
        self.trust_policy()  # names the unreadable key
        if not isinstance(self.tenant_keys, list):
            raise ValueError(f"kvcdn: tenant_keys must be a list of key files, got {self.tenant_keys!r}")
        self.keyring()  # names the unreadable key
        if not isinstance(self.io_threads, int) or self.io_threads < 1:
            raise ValueError(f"kvcdn: io_threads must be a positive integer, got {self.io_threads!r}")
        if not self.load_timeout_s > 0:
            raise ValueError(f"kvcdn: load_timeout_s must be > 0, got {self.load_timeout_s!r}")
        for name in ("load_jobs", "max_results"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"kvcdn: {name} must be a positive integer, got {getattr(self, name)!r}")
        if self.load_policy not in ("measured", "always"):
            raise ValueError(f"kvcdn: load_policy must be \"measured\" or \"always\", got {self.load_policy!r}")
        for name in ("idle_wait_s", "wait_limit_s", "recompute_margin_s"):
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

    def trust_policy(self):
        """The manifests this server may match (``provenance.TrustPolicy``): its own key's and
        the trusted publishers' signed ones, and unsigned ones where ``allow_unsigned``."""
        return self._provenance()[1]

    def signer(self):
        """The key this server signs its manifests with (None: it publishes unsigned)."""
        return self._provenance()[0]

    def keyring(self):
        """The tenant keys this server seals and opens private documents with (``sealing``)."""
        from vllm_kvcdn.artifact.sealing import tenant_keys

        return tenant_keys([str(p) for p in self.tenant_keys])

    def _provenance(self):
        from vllm_kvcdn.artifact.provenance import policy_for

        return policy_for(self.store_url, signing_key=self.signing_key, trusted_publishers=self.trusted_publishers,
                          allow_unsigned=self.allow_unsigned)

    @property
    def prices(self) -> Tariff:
        return Tariff.from_dict(self.tariff)

    def compute_ratios(self):
        """The read/prefill ratios the usage report prices the provider's compute with."""
        from vllm_kvcdn.market.economics import PAPER_RATIOS, load_measured

        return load_measured(self.measured_ratios) if self.measured_ratios else PAPER_RATIOS

    @classmethod
    def from_extra_config(cls, extra: dict | None) -> "KVCDNConfig":
        """Parse ``kv_connector_extra_config``; ``KVCDN_STORE``, ``KVCDN_PUBLISHER_KEY``,
        ``KVCDN_SIGNING_KEY`` and ``KVCDN_TENANT_KEY`` stand in for an absent store_url (see
        ``defaults``), publish_key, signing_key and tenant_keys."""
        extra = dict(extra or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(extra) - known)
        if unknown:
            raise ValueError(
                f"kvcdn: unknown kv_connector_extra_config keys {unknown}; known keys: {sorted(known)}"
            )
        if "publish_key" not in extra and os.environ.get(PUBLISHER_KEY_ENV):
            extra["publish_key"] = os.environ[PUBLISHER_KEY_ENV]
        if "signing_key" not in extra and os.environ.get(SIGNING_KEY_ENV):
            extra["signing_key"] = os.environ[SIGNING_KEY_ENV]
        if "tenant_keys" not in extra and os.environ.get(TENANT_KEY_ENV):
            extra["tenant_keys"] = [os.environ[TENANT_KEY_ENV]]
        return cls(**extra)

    def for_worker(self, workers_per_node: int) -> "KVCDNConfig":
        """A worker's own settings: its share of the node's disk budget (each worker
        process keeps its own LRU over its own files)."""
        if workers_per_node <= 1 or not self.disk_cache_gib:
            return self
        return replace(self, disk_cache_gib=self.disk_cache_gib / workers_per_node)

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


def settings_markdown() -> str:
    """The README's table of settings and environment variables (a test keeps them equal)."""
    rows = ["| key | default | what it does |", "|---|---|---|"]
    for f in fields(KVCDNConfig):
        default = f.metadata["shown"] or f"`{str(f.default).lower() if isinstance(f.default, bool) else f.default}`"
        rows.append(f"| `{f.name}` | {default} | {f.metadata['doc']} |")
    rows += ["", "| environment variable | what it does |", "|---|---|"]
    rows += [f"| `{name}` | {doc} |" for name, doc in ENVIRONMENT.items()]
    return "\n".join(rows)
