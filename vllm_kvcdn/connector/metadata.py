"""What the scheduler half tells the worker half each step (pickled across processes)."""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata

from vllm_kvcdn.chain import ChunkSpan


@dataclass
class ChunkLoad:
    key: str  # chunk key (its object is chunks/<key[:2]>/<key>.safetensors)
    start: int  # prompt position of the chunk's first token
    num_tokens: int  # tokens in the chunk
    write_from: int  # first prompt position to write (>= start)
    write_to: int  # end of the positions to write (<= start + num_tokens)
    is_tail: bool  # a document's partial last chunk
    tokens: list[int]  # the request's tokens for this chunk (re-checked against the file)


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
    prefill: dict = field(default_factory=dict)  # how the document was computed (scheduler's _Publishing.prefill)


@dataclass
class KVCDNMetadata(KVConnectorMetadata):
    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)
    idle: bool = False  # the step computes nothing: the worker may wait for its background jobs
