"""Everything that crosses a process boundary, in one place (as vLLM's NIXL connector
keeps its wire types in ``metadata.py``):

- scheduler -> worker, each step: ``KVCDNMetadata`` (loads and saves to start);
- worker -> scheduler, each step: ``WorkerReport`` (failed loads, ``LoadReceipt``s,
  ``DocumentResult``s), aggregated over the workers by vLLM;
- client -> connector: the ``kvcdn`` request schema in ``kv_transfer_params``, parsed
  (``parse_params``, never raises: any client may send anything) and built
  (``publish_params``, ``verify_params``, ``wait_params``, ``sync_params``) here only;
- connector -> client: the report under ``kv_transfer_params["kvcdn"]`` of the response,
  and the publish-then-wait exchange (``pending_wait``, ``merge_waited``) that the side
  API and the offline helpers both run.

Schema versions (``"v"`` in a request; absent means 1):
- 1: ``publish`` | ``verify`` | ``wait_for`` | ``sync_index``, with ``key``, ``title``,
  ``metadata``, ``require_grant``, ``private`` (a publish sealed with the server's tenant key; added without a
  version change: a server that predates it ignores it and publishes in the clear, so the
  side API checks the manifest it gets back); ``grant``: an ordinary request's read grant
  (``market.grants``; no publisher key needed).
Everything here pickles: vLLM sends metadata between processes with pickle.
"""

from __future__ import annotations

import hmac
import json
from dataclasses import dataclass, field
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata, KVConnectorWorkerMetadata

from vllm_kvcdn.artifact.chain import ChunkSpan, is_chunk_key

PUBLISH_PARAM = "kvcdn"  # kv_transfer_params key: {"kvcdn": {"publish": true, "key": ..., ...}}
PARAMS_VERSION = 1
MAX_TITLE_CHARS = 512
MAX_METADATA_BYTES = 16 * 1024  # JSON; the manifest carries it to every reader
WAIT_PROMPT = [0]  # the prompt of a wait_for or sync_index request: one token, nothing to match
MAX_GRANT_CHARS = 8192  # a read grant token (``market.grants``)


# -- scheduler -> worker ------------------------------------------------------------


@dataclass
class ChunkLoad:
    key: str  # chunk key (its object is chunks/<key[:2]>/<key>.safetensors)
    start: int  # prompt position of the chunk's first token
    num_tokens: int  # tokens in the chunk
    write_from: int  # first prompt position to write (>= start)
    write_to: int  # end of the positions to write (<= start + num_tokens)
    is_tail: bool  # a document's partial last chunk
    tokens: list[int]  # the request's tokens for this chunk (re-checked against the file)
    # Part name ("" for a whole chunk) -> the checksum its (signed) manifest records: every
    # tier checks what it loads against it (``artifact.provenance``); empty: header checks only.
    checksums: dict[str, str] = field(default_factory=dict)
    private: bool = False  # sealed in the store: its engine copies stay in RAM, never on the node's disk


@dataclass
class LoadSpec:
    req_id: str
    block_ids: list[int]  # the request's blocks, from position 0
    chunks: list[ChunkLoad]


@dataclass
class SaveSpec:
    req_id: str
    doc_id: str  # the document published (its last chunk's key) or verified
    token_ids: list[int]  # the whole document (the request's prompt)
    block_ids: list[int]  # the request's blocks, from position 0
    spans: list[ChunkSpan] = field(default_factory=list)  # the chunks to write (a verify reads the manifest's)
    title: str = ""
    metadata: dict = field(default_factory=dict)
    salted: bool = False
    adapter: str = ""  # digest of the LoRA adapter it was computed with ("": the base model)
    adapter_name: str = ""  # this server's name for the adapter
    verify: bool = False  # compare with the stored chunks instead of publishing
    prefill: dict = field(default_factory=dict)  # how the document was computed (publish_desk.Publishing.prefill)
    vouched: dict = field(default_factory=dict)  # chunk key -> {part: checksum} trusted manifests record (index)
    private: bool = False  # sealed with the server's tenant key (``artifact.sealing``)
    require_grant: bool = False  # its reads need a read grant (``market.grants``)


@dataclass
class KVCDNMetadata(KVConnectorMetadata):
    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)
    idle: bool = False  # the step computes nothing: the worker may wait for its background jobs
    scheduled_tokens: int = 0  # tokens the step computes (the worker times it: the engine's prefill rate)


# -- worker -> scheduler --------------------------------------------------------------


@dataclass(frozen=True)
class LoadReceipt:
    """What a rank's load wrote: every chunk it planned, or the chunks before the first one
    that failed (the scheduler meters what every rank wrote: ``ledger``)."""

    loaded_tokens: int
    kv_bytes: int  # bytes written into the KV cache
    store_bytes: int  # bytes read from the store (0: every block came from a tier)
    load_seconds: float


@dataclass(frozen=True)
class DocumentResult:
    """A publish's or a verify's outcome, as its client reads it (``as_report``)."""

    document: str
    verify: bool  # a verify's verdict, else a publish's result
    ok: bool  # published / compared (whether the bytes matched is in ``details``)
    prefill: dict  # how the document was computed (SaveSpec.prefill)
    details: dict = field(default_factory=dict)  # counts and timings, or the verdict
    error: str | None = None
    part: str = ""  # the KV heads of the rank that reports it ("": all; ``artifact.parts``)
    stored: list = field(default_factory=list)  # a publish: what the rank stored (``ManifestChunk``s)

    @classmethod
    def failed(cls, spec: SaveSpec, error: str) -> "DocumentResult":
        return cls(spec.doc_id, spec.verify, False, spec.prefill, error=error)

    def as_report(self) -> dict:
        return {"verified" if self.verify else "published": self.ok, "document": self.document, **self.details,
                **({"error": self.error} if self.error else {}), "prefill": self.prefill}


@dataclass
class WorkerReport(KVConnectorWorkerMetadata):
    """What the worker tells the scheduler after a step."""

    # Per request, one entry per rank (tensor parallelism); a rank's entries may come in
    # another step than another rank's.
    failed_loads: set[str] = field(default_factory=set)  # their responses must not claim a hit
    loads: dict[str, list[LoadReceipt]] = field(default_factory=dict)  # what ranks' loads wrote (a failed one too)
    documents: dict[str, list[DocumentResult]] = field(default_factory=dict)  # publish/verify request -> results
    refusal: str | None = None  # this worker will not load (its layout probe failed): stop planning loads

    def __bool__(self) -> bool:
        return bool(self.failed_loads or self.loads or self.documents or self.refusal)

    def aggregate(self, other: "KVConnectorWorkerMetadata") -> "WorkerReport":
        if isinstance(other, WorkerReport):
            self.failed_loads |= other.failed_loads
            for mine, theirs in ((self.loads, other.loads), (self.documents, other.documents)):
                for req_id, entries in theirs.items():
                    mine.setdefault(req_id, []).extend(entries)
            self.refusal = self.refusal or other.refusal
        return self


# -- client -> connector: the kvcdn request schema ------------------------------------


@dataclass(frozen=True)
class PublishAsk:
    """A checked publish, verify (``verify``: the document id) or wait for the result of
    either (``wait_for``: the document id; see ``publish_desk``)."""

    verify: str | None = None
    wait_for: str | None = None
    sync_index: bool = False  # wait until the index has re-read the store (after a deletion)
    title: str = ""
    metadata: dict = field(default_factory=dict)
    private: bool = False  # a publish: chunks sealed with the server's tenant key (``artifact.sealing``)
    require_grant: bool = False  # a publish: its reads need a read grant (``market.grants``)


@dataclass(frozen=True)
class KVCDNParams:
    ask: PublishAsk | None = None  # None: an ordinary request (it may still hit)
    grant: str | None = None  # an ordinary request's read grant token (checked by ``market.grants``)
    rejected: str | None = None  # why the kvcdn params were ignored, for the response and the log
    reason: str | None = None  # short label of ``rejected`` for metrics


def publish_params(key: str | None, title: str = "", metadata: dict | None = None, private: bool = False,
                   require_grant: bool = False) -> dict:
    return _signed({"publish": True, "title": title, "metadata": metadata or {},
                    **({"private": True} if private else {}), **({"require_grant": True} if require_grant else {})},
                   key)


def grant_params(token: str) -> dict:
    """An ordinary request's ``kv_transfer_params["kvcdn"]`` carrying a read grant."""
    return {"v": PARAMS_VERSION, "grant": token}


def verify_params(doc_id: str, key: str | None) -> dict:
    return _signed({"verify": doc_id}, key)


def wait_params(doc_id: str, key: str | None) -> dict:
    return _signed({"wait_for": doc_id}, key)


def sync_params(key: str | None) -> dict:
    return _signed({"sync_index": True}, key)


def as_transfer_params(kvcdn: dict) -> dict:
    """A request's whole ``kv_transfer_params`` carrying ``kvcdn``."""
    return {PUBLISH_PARAM: kvcdn}


def report_of(kv_transfer_params: dict | None) -> dict:
    """The connector's report in a response's ``kv_transfer_params`` ({} if none)."""
    report = (kv_transfer_params or {}).get(PUBLISH_PARAM)
    return dict(report) if isinstance(report, dict) else {}


def _signed(kvcdn: dict, key: str | None) -> dict:
    return {"v": PARAMS_VERSION, **kvcdn, **({"key": key} if key is not None else {})}


def metadata_problem(metadata: Any) -> str | None:
    """Why ``metadata`` cannot go into a manifest, or None (shared with the side API)."""
    if not isinstance(metadata, dict):
        return "'metadata' must be a JSON object"
    try:
        size = len(json.dumps(metadata, allow_nan=False))
    except (TypeError, ValueError) as e:
        return f"'metadata' is not plain JSON: {e}"
    if size > MAX_METADATA_BYTES:
        return f"'metadata' is {size} bytes of JSON; the limit is {MAX_METADATA_BYTES}"
    return None


def parse_params(raw: Any, publish_key: str) -> KVCDNParams:
    """What a request's ``kv_transfer_params`` asks of kvcdn. Never raises; publishing or
    verifying writes to the shared store, so it needs the publisher key (none configured:
    no request may)."""
    try:
        return _parse(raw, publish_key)
    except Exception as e:  # a bug here must not reach the engine: treat it as malformed
        return _reject("malformed", f"kvcdn params could not be read: {type(e).__name__}")


def _reject(reason: str, message: str) -> KVCDNParams:
    return KVCDNParams(rejected=message, reason=reason)


def _parse(raw: Any, publish_key: str) -> KVCDNParams:
    if raw is None:
        return KVCDNParams()
    if not isinstance(raw, dict):
        return _reject("malformed", "kv_transfer_params must be a JSON object")
    params = raw.get(PUBLISH_PARAM)
    if params is None:
        return KVCDNParams()
    if not isinstance(params, dict):
        return _reject("malformed", f"kv_transfer_params.{PUBLISH_PARAM} must be a JSON object")
    publish, verify, wait_for = params.get("publish", False), params.get("verify"), params.get("wait_for")
    sync_index = params.get("sync_index") is True
    grant = params.get("grant")
    if grant is not None and not publish and verify is None and wait_for is None and not sync_index:
        if not isinstance(grant, str) or len(grant) > MAX_GRANT_CHARS:
            return _reject("malformed", f"'grant' must be a read grant token of at most {MAX_GRANT_CHARS} characters")
        return KVCDNParams(grant=grant)  # an ordinary request: anyone may carry one
    if not publish and verify is None and wait_for is None and not sync_index:
        return KVCDNParams()  # nothing asked (e.g. a client echoing back a response's report)
    if params.get("v", 1) != PARAMS_VERSION:
        return _reject("malformed", f"kvcdn params version {params.get('v')!r} is not understood here "
                                    f"(this server speaks version {PARAMS_VERSION})")
    if publish is not True and publish is not False:
        return _reject("malformed", "'publish' must be true or false")
    if sum((bool(publish), verify is not None, wait_for is not None, sync_index)) > 1:
        return _reject("malformed", "ask for one of 'publish', 'verify', 'wait_for' and 'sync_index'")
    for name, doc_id in (("verify", verify), ("wait_for", wait_for)):
        if doc_id is not None and not is_chunk_key(doc_id):
            return _reject("malformed", f"'{name}' must be a document id (64 lowercase hex digits)")
    title, metadata = params.get("title", ""), params.get("metadata") or {}
    if not isinstance(title, str) or len(title) > MAX_TITLE_CHARS:
        return _reject("malformed", f"'title' must be a string of at most {MAX_TITLE_CHARS} characters")
    problem = metadata_problem(metadata)
    if problem:
        return _reject("malformed", problem)
    private, require_grant = params.get("private", False), params.get("require_grant", False)
    if not isinstance(private, bool) or not isinstance(require_grant, bool):
        return _reject("malformed", "'private' and 'require_grant' must be true or false")
    key = params.get("key")
    if not publish_key:
        return _reject("unauthorized", "publishing through kv_transfer_params is off on this server "
                                       "(publish with `kvcdn serve`'s side API, or set "
                                       "kv_connector_extra_config.publish_key)")
    if not isinstance(key, str) or not hmac.compare_digest(key.encode(), publish_key.encode()):
        return _reject("unauthorized", f"publish, verify and wait_for need the publisher key in "
                                       f"kv_transfer_params.{PUBLISH_PARAM}.key")
    ask = PublishAsk(verify=verify, wait_for=wait_for, sync_index=sync_index, title=title, metadata=metadata,
                     private=bool(publish and private), require_grant=bool(publish and require_grant))
    return KVCDNParams(ask=ask)


# -- connector -> client: publish, then wait for the worker's result -------------------


def pending_wait(report: dict, key: str | None) -> dict | None:
    """A publish or verify answers in the step that ends its prefill, ``"pending"``
    while the worker writes (or compares) in the background: the params of the second
    request (prompt ``WAIT_PROMPT``) that fetches its result, or None if not pending."""
    if report.get("pending") and report.get("document"):
        return wait_params(report["document"], key)
    return None


def merge_waited(first: dict, waited: dict) -> dict:
    """The first request's report completed by the wait's."""
    return {**{k: v for k, v in first.items() if k != "pending"}, **waited}
