"""The publishing side API, ``/kvcdn/v1/...``, mounted on vLLM's own server.

Writes (publish, delete) need the publisher key (``Authorization: Bearer KEY``); reads
are open, except usage: the publisher key sees every tenant's, a tenant its own (by its
``cache_salt``). Publishing prefills through the serving engine itself, so an artifact holds
exactly what this server computes.
"""

from __future__ import annotations

import asyncio
import hmac
import sqlite3
from dataclasses import asdict, dataclass, field
from typing import Any

from fastapi import APIRouter, Depends, Header, HTTPException, Request, Response
from pydantic import BaseModel, Field

from vllm_kvcdn.api.metrics import kvcdn_counters
from vllm_kvcdn.api.publisher import (
    PublishError,
    chat_tokens,
    publish_tokens,
    sync_index,
    text_tokens,
    verify_tokens,
)
from vllm_kvcdn.artifact import catalog
from vllm_kvcdn.artifact.chain import document_chunks
from vllm_kvcdn.artifact.fingerprint import Fingerprint
from vllm_kvcdn.artifact.manifest import ArtifactError, Manifest
from vllm_kvcdn.artifact.provenance import TrustPolicy
from vllm_kvcdn.artifact.sealing import NO_KEYS, TenantKeys
from vllm_kvcdn.config import PUBLISHER_KEY_ENV
from vllm_kvcdn.connector.request_profile import AdapterDigests
from vllm_kvcdn.connector.wire import metadata_problem
from vllm_kvcdn.log import get_logger
from vllm_kvcdn.market import ledger, usage
from vllm_kvcdn.market.economics import ComputeRatios, Tariff
from vllm_kvcdn.store import Store, StoreError

logger = get_logger(__name__)

MAX_TEXT_CHARS = 4_000_000

router = APIRouter(prefix="/kvcdn/v1", tags=["kvcdn"])


@dataclass
class KVCDNService:
    """Per-app state the routes use (``app.state.kvcdn``)."""

    engine_client: Any
    store: Store
    fingerprint: Fingerprint
    chunk_size: int
    max_model_len: int
    vocab_size: int
    publisher_key: str | None
    ledger_path: str  # "": no ledger
    tariff: Tariff
    ratios: ComputeRatios
    adapters: AdapterDigests = field(default_factory=AdapterDigests)
    trust: TrustPolicy = field(default_factory=TrustPolicy)  # the manifests this server serves
    keys: TenantKeys = NO_KEYS  # open private documents

    @property
    def tokenizer(self):
        return self.engine_client.renderer.get_tokenizer()

    def reads(self) -> dict[str, int] | None:
        """Successful reads per document, all tenants, from the ledger (None: no ledger)."""
        if not self.ledger_path:
            return None
        try:
            totals = ledger.totals(self.ledger_path)
        except (OSError, sqlite3.Error) as e:
            logger.error("kvcdn: cannot read the ledger %s: %s", self.ledger_path, e)
            return None
        counts: dict[str, int] = {}
        for t in totals:
            counts[t.document] = counts.get(t.document, 0) + t.reads
        return counts


class PublishRequest(BaseModel):
    text: str | None = Field(None, description="raw prefix, for /v1/completions prompts that start with it")
    messages: list[dict[str, Any]] | None = Field(None, description="chat prefix: the conversation so far")
    tokens: list[int] | None = Field(None, description="token ids, for clients that tokenize themselves")
    cache_salt: str | None = Field(None, description="tenant salt; only requests with the same salt hit")
    adapter: str | None = Field(None, description="a LoRA adapter this server serves (--lora-modules NAME=PATH): "
                                                  "the document is computed with it; only its requests hit")
    title: str = Field("", max_length=512)
    metadata: dict[str, Any] = Field(default_factory=dict)
    private: bool = Field(False, description="seal the chunks with the server's tenant key (AES-256-GCM): only "
                                             "servers holding it read or serve the document")
    require_grant: bool = Field(False, description="reads load only under a read grant signed by this server's "
                                                   "key (`kvcdn grant`)")


def service(request: Request) -> KVCDNService:
    svc = getattr(request.app.state, "kvcdn", None)
    if svc is None:
        raise HTTPException(503, "kvcdn is not configured on this server: start it with `kvcdn serve` "
                                 "or set --kv-transfer-config with kv_connector=KVCDNConnector")
    return svc


def _is_publisher(svc: KVCDNService, authorization: str | None) -> bool:
    scheme, _, given = (authorization or "").partition(" ")
    return bool(svc.publisher_key) and scheme == "Bearer" and hmac.compare_digest(
        given.strip().encode(), svc.publisher_key.encode())


def require_publisher(request: Request, authorization: str | None = Header(None)) -> None:
    svc = service(request)
    if not svc.publisher_key:
        raise HTTPException(403, f"publishing is disabled: set {PUBLISHER_KEY_ENV} (or `kvcdn serve --publisher-key`)")
    if not _is_publisher(svc, authorization):
        raise HTTPException(401, "missing or wrong publisher key: send 'Authorization: Bearer <publisher key>'",
                            headers={"WWW-Authenticate": "Bearer"})


def _document_view(svc: KVCDNService, m, reads: dict[str, int] | None) -> dict:
    return {
        "id": m.doc_id,
        "title": m.title,
        "num_tokens": m.num_tokens,
        "num_chunks": len(m.chunks),
        "bytes": m.total_bytes,
        "created": m.created,
        "fingerprint": m.fingerprint,
        "servable": m.fingerprint == svc.fingerprint.digest and m.chunk_size == svc.chunk_size,
        "salted": m.salted,
        "adapter": m.adapter or None,
        "parts": m.parts,  # each chunk's tensor-parallel parts ([]: whole chunks)
        "private": m.tenant_key is not None,
        "require_grant": m.require_grant,
        "publisher": m.publisher or None,
        "trusted": svc.trust.verdict(m) is None,  # signed by a key this server trusts (or unsigned, allowed)
        "reads": None if reads is None else reads.get(m.doc_id, 0),  # from the ledger, all tenants
        "metadata": m.metadata,
    }


@router.post("/documents", status_code=201, dependencies=[Depends(require_publisher)])
async def publish_document(body: PublishRequest, request: Request, response: Response) -> dict:
    svc = service(request)
    if sum(x is not None for x in (body.text, body.messages, body.tokens)) != 1:
        raise HTTPException(400, "give exactly one of 'text' (a raw prefix), 'messages' (a chat prefix) "
                                 "or 'tokens' (token ids)")
    problem = metadata_problem(body.metadata)
    if problem:
        raise HTTPException(400, problem)
    try:
        if body.tokens is not None:
            if not body.tokens or not all(0 <= t < svc.vocab_size for t in body.tokens):
                raise PublishError(400, f"'tokens' must be a non-empty list of token ids in [0, {svc.vocab_size})")
            tokens = list(body.tokens)
        elif body.text is not None:
            if not body.text.strip():
                raise PublishError(400, "'text' is empty")
            if len(body.text) > MAX_TEXT_CHARS:
                raise PublishError(413, f"'text' is longer than {MAX_TEXT_CHARS} characters")
            # Off the event loop: a long document takes seconds to tokenize.
            tokens = await asyncio.to_thread(text_tokens, svc.tokenizer, body.text)
        else:
            tokens = await asyncio.to_thread(chat_tokens, svc.tokenizer, body.messages)
        if len(tokens) >= svc.max_model_len:
            raise PublishError(413, f"the document is {len(tokens)} tokens; this server's context is "
                                    f"{svc.max_model_len} (--max-model-len), and a question must still fit")
        lora, adapter = await _adapter(svc, request, body.adapter) if body.adapter else (None, None)
        doc_id = document_chunks(tokens, svc.fingerprint.digest, body.cache_salt, svc.chunk_size, adapter)[-1].key
        existing = catalog.get_manifest(svc.store, doc_id)  # None too when damaged: replaced below
        if (existing is not None and svc.trust.verdict(existing) is None
                and (existing.tenant_key is not None) == body.private and existing.require_grant == body.require_grant
                and await asyncio.to_thread(catalog.intact, svc.store, existing, svc.keys)):
            # Content-addressed: the same document is already there, from a publisher this
            # server trusts (anyone may write a manifest), every chunk checked.
            response.status_code = 200
            return _publish_view(existing, seconds=0.0, created=False)
        result = await publish_tokens(svc.engine_client, tokens, key=svc.publisher_key, cache_salt=body.cache_salt,
                                      title=body.title, metadata=body.metadata, lora_request=lora,
                                      private=body.private, require_grant=body.require_grant)
    except PublishError as e:
        raise HTTPException(e.status, str(e)) from e
    except ValueError as e:  # the engine refused the prompt (e.g. a token id out of vocabulary)
        raise HTTPException(400, f"the engine refused the document: {e}") from e
    if not result.published:
        raise HTTPException(503, f"the document was not published: {result.error or 'see the server log'}")
    logger.info("kvcdn: published %s (%d tokens) in %.2fs", result.doc_id[:16], result.num_tokens, result.seconds)
    manifest = catalog.get_manifest(svc.store, result.doc_id)
    if manifest is None:
        raise HTTPException(503, "the document's manifest is not in the store after publishing; see the server log")
    if (manifest.tenant_key is not None) != body.private:
        raise HTTPException(503, f"the document was published {'in the clear' if body.private else 'sealed'}, not as "
                                 "asked; see the server log")
    return _publish_view(manifest, seconds=result.seconds, created=True)


def _served_adapters(request: Request) -> dict:
    """The LoRA adapters vLLM's OpenAI routes serve: name -> LoRARequest."""
    models = getattr(request.app.state, "openai_serving_models", None)
    return dict(getattr(models, "lora_requests", None) or {})


async def _adapter(svc: KVCDNService, request: Request, name: str):
    """(LoRARequest, digest of its files) of the adapter this server serves as ``name``."""
    lora = _served_adapters(request).get(name)
    if lora is None:
        served = ", ".join(sorted(_served_adapters(request))) or "none"
        raise PublishError(400, f"this server serves no LoRA adapter {name!r} (serving: {served}); start it with "
                                f"--enable-lora --lora-modules {name}=PATH")
    digest = await asyncio.to_thread(svc.adapters.digest, lora.lora_path)
    if digest is None:
        raise PublishError(409, f"LoRA adapter {name!r}: no adapter files under {lora.lora_path!r} on this machine; "
                                "kvcdn keys a document by its adapter's files")
    return lora, digest


async def _adapter_by_digest(svc: KVCDNService, request: Request, digest: str):
    """The LoRARequest of a served adapter whose files have ``digest``, or None."""
    for lora in _served_adapters(request).values():
        if await asyncio.to_thread(svc.adapters.digest, lora.lora_path) == digest:
            return lora
    return None


def _publish_view(m, *, seconds: float, created: bool) -> dict:
    return {
        "id": m.doc_id,
        "num_tokens": m.num_tokens,
        "num_chunks": len(m.chunks),
        "bytes": m.total_bytes,
        "fingerprint": m.fingerprint,
        "seconds": round(seconds, 4),
        "created": created,
    }


@router.get("/documents")
async def list_documents(request: Request) -> dict:
    svc = service(request)
    reads = svc.reads()
    docs = [_document_view(svc, e, reads) if isinstance(e, Manifest) else {"id": e.doc_id, "damaged": e.error}
            for e in catalog.entries(svc.store)]
    return {"documents": docs, "count": len(docs)}


def _one_entry(svc: KVCDNService, doc_id: str) -> catalog.Entry:
    found = catalog.find(svc.store, doc_id) if len(doc_id) >= 8 else []
    if len(found) != 1:
        raise HTTPException(404, f"no document {doc_id!r}" if not found else f"{doc_id!r} is ambiguous")
    return found[0]


def _one(svc: KVCDNService, doc_id: str) -> Manifest:
    entry = _one_entry(svc, doc_id)
    if isinstance(entry, catalog.DamagedManifest):
        raise HTTPException(409, entry.advice())
    return entry


@router.get("/documents/{doc_id}")
async def get_document(doc_id: str, request: Request, verify: bool = False) -> dict:
    """The document and its manifest; ``?verify=true`` also reads and checks every chunk
    (what `kvcdn inspect --verify` reports)."""
    svc = service(request)
    m = _one(svc, doc_id)
    view = _document_view(svc, m, svc.reads())
    view["manifest"] = asdict(m)
    if verify:
        checked = await asyncio.to_thread(catalog.verify_chunks, svc.store, m, svc.keys)
        view["chunks"] = [{"key": key, "status": status} for key, status in checked]
        view["intact"] = all(status == "ok" for _, status in checked)
    return view


@router.delete("/documents/{doc_id}", dependencies=[Depends(require_publisher)])
async def delete_document(doc_id: str, request: Request) -> dict:
    svc = service(request)
    deleted = catalog.delete_document(svc.store, _one_entry(svc, doc_id))
    # The engine's index forgets it, then vLLM drops its own copies: no request admitted
    # after this answer is served this document's KV again.
    await sync_index(svc.engine_client, key=svc.publisher_key)
    await svc.engine_client.reset_prefix_cache()
    logger.info("kvcdn: deleted %s", deleted.doc_id[:16])
    return asdict(deleted)


@router.post("/documents/{doc_id}/verify", dependencies=[Depends(require_publisher)])
async def verify_document(doc_id: str, request: Request) -> dict:
    """Recompute the document through this engine and compare with the store, bit for bit."""
    svc = service(request)
    m = _one(svc, doc_id)
    if m.fingerprint != svc.fingerprint.digest:
        raise HTTPException(409, "this document was made under another fingerprint; this server cannot recompute it")
    lora = None
    if m.adapter:
        lora = await _adapter_by_digest(svc, request, m.adapter)
        if lora is None:
            raise HTTPException(409, f"this document was computed with LoRA adapter {m.adapter}, which this server "
                                     "does not serve; serve it (--lora-modules NAME=PATH) to verify the document")
    try:
        tokens = catalog.document_tokens(svc.store, m, svc.keys)
    except ArtifactError as e:
        return {"document": m.doc_id, "identical": False, "error": str(e)}
    report = await verify_tokens(svc.engine_client, tokens, m.doc_id, key=svc.publisher_key, lora_request=lora)
    if not report.get("verified"):
        raise HTTPException(503, f"the engine could not verify it: {report.get('error', 'see the server log')}")
    return report


@router.get("/stats")
async def stats(request: Request) -> dict:
    svc = service(request)
    counters = kvcdn_counters()
    return {
        "fingerprint": svc.fingerprint.digest,
        "profile": svc.fingerprint.fields,
        "store": svc.store.url,
        "chunk_size": svc.chunk_size,
        **counters,
    }


@router.get("/usage")
async def get_usage(request: Request, document: str | None = None, tenant: str | None = None,
                    since: float | None = None, until: float | None = None, detail: bool = False,
                    limit: int = 1000, authorization: str | None = Header(None),
                    x_kvcdn_cache_salt: str | None = Header(None)) -> dict:
    """Metered cache reads per document and tenant, priced at this server's tariff
    (``since``/``until``: unix seconds; ``detail=true``: the reads themselves, newest
    ``limit``). The publisher key sees every tenant; a tenant sends its ``cache_salt`` in
    ``X-KVCDN-Cache-Salt`` and sees its own reads only."""
    svc = service(request)
    if not svc.ledger_path:
        raise HTTPException(404, "this server keeps no ledger: set kv_connector_extra_config.ledger_path "
                                 "(or $KVCDN_LEDGER) to meter cache reads")
    if not _is_publisher(svc, authorization):
        if not x_kvcdn_cache_salt:  # an empty salt is no salt: the unsalted (public) reads are the publisher's
            raise HTTPException(401, "send 'Authorization: Bearer <publisher key>' (every tenant), or your "
                                     "cache_salt in 'X-KVCDN-Cache-Salt' (your own reads)",
                                headers={"WWW-Authenticate": "Bearer"})
        own = ledger.tenant_of(x_kvcdn_cache_salt)
        if tenant not in (None, own):
            raise HTTPException(403, "a tenant sees its own reads only: leave 'tenant' out")
        tenant = own
    if not 1 <= limit <= 100_000:
        raise HTTPException(400, "'limit' must be in [1, 100000]")
    filters = ledger.Filters(document=document, tenant=tenant, since=since, until=until)
    try:
        rep = await asyncio.to_thread(usage.report, svc.ledger_path, filters, svc.tariff, svc.ratios)
        if detail:
            rows = await asyncio.to_thread(ledger.reads, svc.ledger_path, filters, limit)
            rep["reads"] = [asdict(r) for r in rows]
    except (OSError, sqlite3.Error) as e:
        raise HTTPException(503, f"cannot read the ledger {svc.ledger_path}: {e}") from e
    return rep


def store_errors_as_503(app) -> None:
    @app.exception_handler(StoreError)
    async def _store_error(request: Request, exc: StoreError):
        from fastapi.responses import JSONResponse

        return JSONResponse(status_code=503, content={"error": f"kvcdn store unavailable: {exc}"})
