"""A published document's manifest (JSON), and the error every artifact check raises.

Kept apart from the chunk codec (``artifact``) so that listing, finding and deleting
documents (``catalog``, ``kvcdn ls``) never import torch.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

MANIFEST_FORMAT = "kvcdn.manifest/1"


class ArtifactError(Exception):
    """An artifact that must not be used. ``reason`` is a short label for metrics."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class ChunkPart:
    """One tensor-parallel rank's part of a chunk, as stored (``parts``)."""

    name: str  # "h0-4of8": the KV heads it holds
    nbytes: int
    checksum: str


@dataclass(frozen=True)
class ManifestChunk:
    key: str
    parent: str
    num_tokens: int
    nbytes: int  # of the chunk, or of all its parts
    checksum: str  # of a whole chunk ("" when stored in parts: each part has its own)
    parts: tuple[ChunkPart, ...] = ()  # a chunk stored in parts (tensor parallelism), in head order

    def stored(self) -> list[ChunkPart]:
        """What is stored for this chunk: its parts, or the whole chunk as the part ""."""
        return list(self.parts) or [ChunkPart("", self.nbytes, self.checksum)]


@dataclass
class Manifest:
    """One published document: which chunks, under which fingerprint, made how."""

    doc_id: str
    fingerprint: str
    num_tokens: int
    chunk_size: int
    chunks: list[ManifestChunk]
    profile: dict = field(default_factory=dict)  # the fingerprint's fields, for humans
    salted: bool = False
    adapter: str = ""  # digest of the LoRA adapter's files it was computed with ("": the base model)
    created: float = 0.0
    producer: dict = field(default_factory=dict)
    title: str = ""
    metadata: dict = field(default_factory=dict)
    parts: list[str] = field(default_factory=list)  # every chunk's part names, when stored in parts (TP)
    format: str = MANIFEST_FORMAT
    encryption: dict = field(default_factory=dict)  # a private document: {"alg", "tenant": key id} (``sealing``)
    require_grant: bool = False  # reads need a read grant from its publisher (``market.grants``)
    publisher: str = ""  # the signer's Ed25519 public key, hex ("": unsigned; ``provenance``)
    signature: str = ""  # Ed25519 over ``signed_bytes()``, hex

    @property
    def tenant_key(self) -> str | None:
        """The tenant key id a private document's chunks are sealed for (None: public)."""
        return self.encryption.get("tenant") if self.encryption else None

    @property
    def total_bytes(self) -> int:
        return sum(c.nbytes for c in self.chunks)

    def to_json(self) -> bytes:
        d = asdict(self)
        d["total_bytes"] = self.total_bytes
        # A manifest of whole chunks has no "parts", an unsigned one no signature: readers that
        # predate them read it.
        for c in [d, *d["chunks"]]:
            if not c["parts"]:
                del c["parts"]
        for name in ("encryption", "require_grant", "publisher", "signature"):
            if not d[name]:
                del d[name]
        return json.dumps(d, indent=1, sort_keys=True).encode()

    def signed_bytes(self) -> bytes:
        """What a signature covers: every field but the signature (the publisher's key
        included), as canonical JSON. Computed from the parsed fields, never from the stored
        text, so the signer and every reader hash the same bytes."""
        d = asdict(self)
        del d["signature"]
        return json.dumps(d, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "Manifest":
        try:
            d = json.loads(data if isinstance(data, (str, bytes, bytearray)) else bytes(data))
            if d.get("format") != MANIFEST_FORMAT:
                raise ArtifactError("format", f"manifest format {d.get('format')!r} is not {MANIFEST_FORMAT!r}")
            d.pop("total_bytes", None)
            d["chunks"] = [ManifestChunk(**{**c, "parts": tuple(ChunkPart(**p) for p in c.get("parts", ()))})
                           for c in d["chunks"]]
            m = cls(**d)
        except ArtifactError:
            raise
        except (ValueError, KeyError, TypeError) as e:
            raise ArtifactError("format", f"manifest is not valid: {e}") from e
        if sum(c.num_tokens for c in m.chunks) != m.num_tokens:
            raise ArtifactError("format", f"manifest {m.doc_id[:16]}: chunk tokens do not add up")
        if any([p.name for p in c.parts] != m.parts for c in m.chunks):
            raise ArtifactError("format", f"manifest {m.doc_id[:16]}: its chunks' parts are not {m.parts}")
        return m
