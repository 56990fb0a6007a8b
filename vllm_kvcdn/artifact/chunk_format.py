"""Artifact format: one safetensors file per chunk (the document's JSON manifest: ``manifest``).

A chunk file is a standard safetensors file (readable by ``safetensors.safe_open``)
holding the chunk's token ids (``tokens``, int32) and, per layer ``i``,
``layers.{i}.k`` and ``layers.{i}.v`` shaped
``[tokens, kv_heads, head_dim]``: independent of any engine's paged layout or block
size. Its ``__metadata__`` carries the format version, the chunk key and parent, the
model fingerprint, the dtype, the shape and a checksum of the data section: BLAKE3 (a
cryptographic hash, so a signed manifest that records it binds the chunk's bytes: a forgery
cannot be made to match; ``artifact.provenance``); chunks written before it carry xxh3-128,
still read, never accepted under a signature. Everything in the header is checked before a
single value is used.

We write the file ourselves (the format is an 8-byte header length, a JSON header and
the raw data) so the bytes are canonical: the same KV always gives the same file.

Format v2 (``kvcdn.chunk/2``) is v1 with a compressed data section: the same header,
plus ``codec`` (e.g. ``zstd:1``), ``planes`` (the element width split into byte planes),
``raw_bytes`` and ``stored_bytes`` (a cut object is "truncated", as in v1); the checksum is
still over the uncompressed data, so a v2 chunk decodes to exactly the bytes of its v1 twin
(``codec.py``). Readers take both.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import xxhash

from vllm_kvcdn.artifact import codec as codecs
from vllm_kvcdn.artifact.manifest import ArtifactError

CHUNK_FORMAT = "kvcdn.chunk/1"
COMPRESSED_FORMAT = "kvcdn.chunk/2"
V2_FIELDS = ("codec", "raw_bytes", "stored_bytes")
try:  # a dependency of ours and of vLLM; a bare transformers box without it writes xxh3 (unsignable)
    import blake3

    CHECKSUM_ALGO = "blake3"
except ImportError:  # pragma: no cover
    blake3 = None
    CHECKSUM_ALGO = "xxh3_128"
# Checksums a signature may vouch for: a forger cannot find other bytes with the same digest.
CRYPTOGRAPHIC_CHECKSUMS = ("blake3",)

_ST_DTYPES = {
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float32: "F32",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.uint8: "U8",
    torch.int32: "I32",
}


@dataclass(frozen=True)
class ChunkHeader:
    key: str
    parent: str
    fingerprint: str
    dtype: str  # torch dtype name, e.g. "bfloat16"
    num_tokens: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    checksum: str = ""  # "blake3:<hex>" (older chunks "xxh3_128:<hex>") of the (uncompressed) data section
    codec: str = ""  # v2: how the data section is compressed ("zstd:1"); "": stored raw (v1)
    raw_bytes: int = 0  # v2: the data section's uncompressed length
    stored_bytes: int = 0  # v2: its compressed length
    part: str = ""  # the KV heads it holds when a tensor-parallel rank wrote it (``parts``); "": all


@dataclass
class ChunkKV:
    """Decoded chunk: its token ids and per-layer K and V, each ``[tokens, kv_heads, head_dim]``."""

    header: ChunkHeader
    tokens: torch.Tensor
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    sealed: bool = False  # read from a sealed (private) object: no plaintext copy of it goes to disk


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _hasher(algo: str):
    if algo == "blake3" and blake3 is not None:
        return blake3.blake3(max_threads=1)  # the I/O threads already run in parallel
    if algo == "xxh3_128":
        return xxhash.xxh3_128()
    raise ArtifactError("format", f"checksum algorithm {algo!r} is unknown to this reader")


def checksum(data, algo: str = CHECKSUM_ALGO) -> str:
    """``"<algo>:<hex>"`` of ``data`` (a bytes-like object)."""
    digest = _hasher(algo)
    digest.update(data)
    return f"{algo}:{digest.hexdigest()}"


def checksum_algo(value: str) -> str:
    """The algorithm a checksum string names ("blake3" of "blake3:9f...")."""
    return value.partition(":")[0]


def _raw_bytes(t: torch.Tensor) -> memoryview:
    t = t.contiguous()
    return memoryview(t.view(torch.uint8).numpy()).cast("B") if t.numel() else memoryview(b"")


def encode_chunk(
    key: str,
    parent: str,
    fingerprint: str,
    tokens: Sequence[int],
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    codec: str | None = None,
    part: str = "",
) -> tuple[bytearray, ChunkHeader]:
    """Serialize one chunk (or one rank's ``part`` of it: its heads only): its token ids and
    per-layer K/V (CPU, ``[tokens, kv_heads, head_dim]``); with ``codec`` (e.g.
    ``"zstd:1"``), in format v2."""
    if len(keys) != len(values) or not keys:
        raise ValueError("need the same, non-zero number of K and V layers")
    shape = tuple(keys[0].shape)
    dtype = keys[0].dtype
    for t in (*keys, *values):
        if tuple(t.shape) != shape or t.dtype != dtype or t.device.type != "cpu":
            raise ValueError("all K/V tensors must be CPU tensors of one shape and dtype")
    if len(shape) != 3 or shape[0] != len(tokens):
        raise ValueError(f"K/V must be [{len(tokens)} tokens, kv_heads, head_dim], got {shape}")

    # Token ids travel with their KV: a reader re-checks them (a guard against hash
    # collisions) and `kvcdn verify` can recompute the chunk from them alone.
    tensors: list[tuple[str, torch.Tensor]] = [("tokens", torch.tensor(list(tokens), dtype=torch.int32))]
    for i, (k, v) in enumerate(zip(keys, values)):
        tensors += [(f"layers.{i}.k", k), (f"layers.{i}.v", v)]
    raws = [_raw_bytes(t) for _, t in tensors]
    entries: dict[str, dict] = {}
    size = 0
    for (name, t), raw in zip(tensors, raws):
        entries[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [size, size + len(raw)]}
        size += len(raw)
    digest = _hasher(CHECKSUM_ALGO)
    for raw in raws:  # the checksum of the bytes as stored, without joining them first
        digest.update(raw)
    header = ChunkHeader(
        key=key,
        parent=parent,
        fingerprint=fingerprint,
        dtype=dtype_name(dtype),
        num_tokens=shape[0],
        num_layers=len(keys),
        num_kv_heads=shape[1],
        head_dim=shape[2],
        checksum=f"{CHECKSUM_ALGO}:{digest.hexdigest()}",
        part=part,
    )
    # A whole chunk's header has no "part": its bytes are those of readers that predate parts.
    meta = {"format": CHUNK_FORMAT, **{k: str(v) for k, v in asdict(header).items()
                                       if k not in V2_FIELDS and (k != "part" or part)}}
    if codec:
        c = codecs.parse(codec)
        raws = [codecs.encode(b"".join(raws), dtype.itemsize, c)]
        header = ChunkHeader(**{**asdict(header), "codec": c.spec, "raw_bytes": size, "stored_bytes": len(raws[0])})
        meta.update(format=COMPRESSED_FORMAT, codec=c.spec, planes=str(dtype.itemsize), raw_bytes=str(size),
                    stored_bytes=str(len(raws[0])))
    head = json.dumps({"__metadata__": meta, **entries}, separators=(",", ":"), sort_keys=True)
    head_bytes = head.encode()
    head_bytes += b" " * (-len(head_bytes) % 8)
    # One buffer, each tensor's bytes copied into it once (a publish's memory traffic is
    # what the decoding requests beside it feel: issue 29).
    out = bytearray(8 + len(head_bytes) + sum(len(raw) for raw in raws))
    struct.pack_into("<Q", out, 0, len(head_bytes))
    at = 8 + len(head_bytes)
    out[8:at] = head_bytes
    view = memoryview(out)
    for raw in raws:
        view[at : at + len(raw)] = raw
        at += len(raw)
    view.release()  # the caller gets a plain bytearray
    return out, header


def read_chunk_header(data) -> tuple[ChunkHeader, dict, int]:
    """Parse and check the header only. Returns (header, tensor entries, data offset)."""
    view = memoryview(data)
    if len(view) < 8:
        raise ArtifactError("truncated", f"chunk is {len(view)} bytes, shorter than its header")
    (head_len,) = struct.unpack("<Q", view[:8])
    if head_len > 100_000_000 or 8 + head_len > len(view):
        raise ArtifactError("truncated", "chunk header runs past the end of the file")
    try:
        head = json.loads(bytes(view[8 : 8 + head_len]))
        meta = head.pop("__metadata__")
        if meta.get("format") not in (CHUNK_FORMAT, COMPRESSED_FORMAT):
            raise ArtifactError(
                "format",
                f"chunk format {meta.get('format')!r}, this reader knows {CHUNK_FORMAT!r} and {COMPRESSED_FORMAT!r}",
            )
        compressed = meta["format"] == COMPRESSED_FORMAT
        header = ChunkHeader(
            key=meta["key"],
            parent=meta["parent"],
            fingerprint=meta["fingerprint"],
            dtype=meta["dtype"],
            num_tokens=int(meta["num_tokens"]),
            num_layers=int(meta["num_layers"]),
            num_kv_heads=int(meta["num_kv_heads"]),
            head_dim=int(meta["head_dim"]),
            checksum=meta["checksum"],
            codec=meta["codec"] if compressed else "",
            raw_bytes=int(meta["raw_bytes"]) if compressed else 0,
            stored_bytes=int(meta["stored_bytes"]) if compressed else 0,
            part=meta.get("part", ""),
        )
    except ArtifactError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ArtifactError("format", f"chunk header is not valid kvcdn metadata: {e}") from e
    return header, head, 8 + head_len


def decode_chunk(
    data,
    *,
    key: str | None = None,
    fingerprint: str | None = None,
    dtype: torch.dtype | None = None,
    num_layers: int | None = None,
    num_kv_heads: int | None = None,
    head_dim: int | None = None,
    tokens: Sequence[int] | None = None,
    verify: bool = True,
    out: memoryview | None = None,
    part: str | None = None,
    expected_checksum: str | None = None,
) -> ChunkKV:
    """Decode a chunk, checking every expectation given. Tensors view ``data`` (a v1
    chunk) or the decompressed data section (v2: written into ``out`` when it is a
    writable buffer large enough, which may be the one ``data`` views). ``expected_checksum``:
    the one the document's manifest records (it proves the data only when ``verify`` hashes
    it: a header is written by whoever wrote the object)."""
    header, entries, offset = read_chunk_header(data)
    if expected_checksum is not None and header.checksum != expected_checksum:
        raise ArtifactError("provenance", f"chunk {header.key[:16]}: its checksum is not the one its manifest "
                                          f"records ({header.checksum[:24]}... vs {expected_checksum[:24]}...)")
    expected = {
        "key": key,
        "fingerprint": fingerprint,
        "dtype": dtype_name(dtype) if dtype is not None else None,
        "num_layers": num_layers,
        "num_kv_heads": num_kv_heads,
        "head_dim": head_dim,
        "part": part,
    }
    for name, want in expected.items():
        got = getattr(header, name)
        if want is not None and got != want:
            raise ArtifactError(
                "fingerprint" if name == "fingerprint" else "mismatch",
                f"chunk {header.key[:16]}: {name} is {got!r}, this engine needs {want!r}",
            )
    torch_dtype = getattr(torch, header.dtype, None)
    if torch_dtype not in _ST_DTYPES:
        raise ArtifactError("format", f"chunk {header.key[:16]}: unknown dtype {header.dtype!r}")
    body = memoryview(data)[offset:]
    numel = header.num_layers * 2 * header.num_tokens * header.num_kv_heads * header.head_dim
    expected_bytes = 4 * header.num_tokens + numel * torch_dtype.itemsize
    if header.codec:
        body = _decompress(header, body, expected_bytes, torch_dtype.itemsize, out)
    if len(body) != expected_bytes:
        raise ArtifactError(
            "truncated", f"chunk {header.key[:16]}: data is {len(body)} bytes, header says {expected_bytes}"
        )
    if verify and checksum(body, checksum_algo(header.checksum)) != header.checksum:
        raise ArtifactError("checksum", f"chunk {header.key[:16]}: checksum mismatch (corrupt data)")

    def tensor(name: str, dtype: torch.dtype, shape: tuple) -> torch.Tensor:
        entry = entries.get(name)
        if entry is None or entry.get("shape") != list(shape) or entry.get("dtype") != _ST_DTYPES[dtype]:
            raise ArtifactError("format", f"chunk {header.key[:16]}: tensor {name} missing or misshapen")
        start, end = entry["data_offsets"]
        return torch.frombuffer(body[start:end], dtype=torch.uint8).view(dtype).view(shape)

    chunk_tokens = tensor("tokens", torch.int32, (header.num_tokens,))
    if tokens is not None and chunk_tokens.tolist() != list(tokens):
        raise ArtifactError("token_mismatch", f"chunk {header.key[:16]}: its token ids differ from the request's")
    shape = (header.num_tokens, header.num_kv_heads, header.head_dim)
    keys = [tensor(f"layers.{i}.k", torch_dtype, shape) for i in range(header.num_layers)]
    values = [tensor(f"layers.{i}.v", torch_dtype, shape) for i in range(header.num_layers)]
    return ChunkKV(header=header, tokens=chunk_tokens, keys=keys, values=values)


def as_v1(data) -> bytes:
    """The chunk's format v1 bytes: itself, or what a v2 (compressed) chunk decodes to."""
    header, _, _ = read_chunk_header(data)
    if not header.codec:
        return bytes(data)
    kv = decode_chunk(data)
    return encode_chunk(header.key, header.parent, header.fingerprint, kv.tokens.tolist(), kv.keys, kv.values,
                        part=header.part)[0]


def _decompress(header: ChunkHeader, body: memoryview, expected_bytes: int, width: int,
                out: memoryview | None) -> memoryview:
    if header.raw_bytes != expected_bytes:
        raise ArtifactError("format", f"chunk {header.key[:16]}: raw_bytes {header.raw_bytes}, "
                                      f"the header's shape says {expected_bytes}")
    if len(body) != header.stored_bytes:
        raise ArtifactError("truncated", f"chunk {header.key[:16]}: compressed data is {len(body)} bytes, "
                                         f"header says {header.stored_bytes}")
    try:
        return codecs.decode(body, width, codecs.parse(header.codec), expected_bytes, out)
    except codecs.CorruptStream as e:
        raise ArtifactError("checksum", f"chunk {header.key[:16]}: {e}") from e
    except codecs.CodecError as e:  # a codec this reader lacks
        raise ArtifactError("format", f"chunk {header.key[:16]}: {e}") from e
