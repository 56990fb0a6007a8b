"""A publish's or a verify's results from every rank, joined into one (tensor parallelism:
each rank stored or compared its own part of every chunk, ``artifact.parts``).

Sans I/O: the publish desk writes the manifest and keeps the result."""

from __future__ import annotations

from vllm_kvcdn.artifact.documents import join_parts, new_manifest
from vllm_kvcdn.artifact.manifest import Manifest
from vllm_kvcdn.connector.wire import DocumentResult, SaveSpec


def manifest_of(save: SaveSpec, results: list[DocumentResult], parts: list[str], *, fingerprint: str, profile: dict,
                chunk_size: int, tenant_key: str | None = None) -> Manifest:
    """The document's manifest from what every rank stored; ValueError if the ranks stored
    other parts or other chunks than this engine's document has."""
    by_part = {r.part: r.stored for r in results}  # replicated heads: one part, several ranks
    if sorted(by_part) != sorted(parts):
        raise ValueError(f"the ranks stored parts {sorted(by_part)}, this engine's are {parts}")
    chunks = join_parts({name: by_part[name] for name in parts})
    if [c.key for c in chunks] != [s.key for s in save.spans]:
        raise ValueError("the ranks stored other chunks than the document's")
    return new_manifest(
        doc_id=save.doc_id, chunks=chunks, num_tokens=len(save.token_ids), fingerprint=fingerprint,
        profile=profile, chunk_size=chunk_size,
        producer={**_producer(), "prefill": save.prefill, "adapter": save.adapter_name or None},
        salted=save.salted, adapter=save.adapter, title=save.title, metadata=save.metadata, tenant_key=tenant_key,
        require_grant=save.require_grant,
    )


def publish_details(results: list[DocumentResult], manifest: Manifest) -> dict:
    """What the client reads of a publish: objects and bytes every rank stored, the
    slowest rank's time, the parts."""
    details = dict(results[0].details)
    if len(results) > 1:
        for key in ("new_chunks", "new_bytes", "replaced_chunks"):
            details[key] = sum(r.details.get(key, 0) for r in results)
        details["write_seconds"] = max(r.details.get("write_seconds", 0.0) for r in results)
        details["parts"] = manifest.parts
    return details


def verdict(results: list[DocumentResult]) -> dict:
    """A verify's verdict: a chunk is identical only if every rank's part of it is."""
    joined = dict(results[0].details)
    joined["identical"] = all(r.details.get("identical") for r in results)
    chunks = [dict(c) for c in joined.get("chunks", [])]
    for r in results[1:]:
        for mine, theirs in zip(chunks, r.details.get("chunks", [])):
            if mine["status"] == "identical":
                mine["status"] = theirs["status"]
    joined["chunks"] = chunks
    return joined


def _producer() -> dict:
    import torch
    import vllm

    from vllm_kvcdn import __version__

    return {"engine": "vllm", "vllm": vllm.__version__, "kvcdn": __version__, "torch": torch.__version__}
