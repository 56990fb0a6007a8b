"""Lossless chunk compression (artifact format v2): byte planes, then a general codec.

A bf16 / fp16 value's high byte holds the sign and most of the exponent (few distinct
values: compressible), its low byte the mantissa (close to random). Interleaved, a
byte-oriented compressor sees neither pattern; split into planes (every element's byte
0, then every byte 1, ...) the exponent plane compresses and the mantissa plane costs
little. ``benchmarks/compression.py`` measures the ratio and the speeds on our KV.

Codec names: ``zstd[:level]`` (zstandard; the default), ``lz4`` (lz4.frame, faster,
weaker), ``zlib[:level]`` (the standard library). Libraries are imported when used, so
nothing here is needed to read v1 artifacts.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

DEFAULT = "zstd:1"  # benchmarks/compression.py: the best ratio and the fastest decode of the zstd levels on our KV


def for_store(store_url: str, setting: str = "auto") -> str | None:
    """The codec publishes to ``store_url`` use (None: raw, format v1). ``auto``: compress
    for a remote store only (s3://), where the bytes cross a network and are billed."""
    if setting == "auto":
        return DEFAULT if store_url.startswith("s3://") else None
    return None if setting in ("", "none") else setting


class CodecError(ValueError):
    """A codec name this build cannot use."""


class CorruptStream(CodecError):
    """A stream that does not decode to what its header says."""


@dataclass(frozen=True)
class Codec:
    name: str  # "zstd", "lz4", "zlib"
    level: int | None = None

    @property
    def spec(self) -> str:
        return self.name if self.level is None else f"{self.name}:{self.level}"

    def compress(self, data) -> bytes:
        if self.name == "zstd":
            import zstandard

            return zstandard.ZstdCompressor(level=self.level or 3, write_checksum=True).compress(data)
        if self.name == "lz4":
            import lz4.frame

            return lz4.frame.compress(data, content_checksum=True)
        return zlib.compress(data, 6 if self.level is None else self.level)

    def decompress(self, data, size: int) -> bytes:
        """``size``: the length the stream must decode to (a stream that says otherwise is corrupt)."""
        try:
            if self.name == "zstd":
                import zstandard

                out = zstandard.ZstdDecompressor().decompress(data, max_output_size=size)
            elif self.name == "lz4":
                import lz4.frame

                out = lz4.frame.decompress(data)
            else:
                out = zlib.decompress(data, bufsize=size)
        except ImportError:
            raise
        except Exception as e:  # each library has its own error type for a damaged stream
            raise CorruptStream(f"the {self.spec} stream does not decode: {e}") from e
        if len(out) != size:
            raise CorruptStream(f"the {self.spec} stream decodes to {len(out)} bytes, the header says {size}")
        return out


def parse(spec: str) -> Codec:
    """``"zstd:3"`` -> Codec; checks the library is importable (a writer fails at start)."""
    name, _, level = spec.partition(":")
    if name not in ("zstd", "lz4", "zlib"):
        raise CodecError(f"unknown codec {spec!r}: use zstd[:level], lz4 or zlib[:level] (or none)")
    try:
        codec = Codec(name, int(level) if level else None)
    except ValueError:
        raise CodecError(f"codec level in {spec!r} is not an integer") from None
    try:
        __import__({"zstd": "zstandard", "lz4": "lz4.frame", "zlib": "zlib"}[name])
    except ImportError as e:
        raise CodecError(f"codec {name} needs a library that is not installed: {e}") from None
    return codec


def to_planes(data, width: int) -> memoryview:
    """Bytes of ``width``-byte elements -> their byte planes, plane 0 first."""
    raw = np.frombuffer(data, dtype=np.uint8)
    return memoryview(raw if width == 1 else np.ascontiguousarray(raw.reshape(-1, width).T)).cast("B")


def from_planes(planes, width: int, out: memoryview) -> memoryview:
    """The inverse of ``to_planes``, written into ``out`` (at least ``len(planes)`` bytes)."""
    n = len(planes)
    src = np.frombuffer(planes, dtype=np.uint8)
    dest = np.frombuffer(out, dtype=np.uint8, count=n)
    rows, planes = dest.reshape(-1, width), src.reshape(width, -1)
    for i in range(width):  # a plane at a time: ~6x faster than one transposed copy
        rows[:, i] = planes[i]
    return out[:n]


def encode(data, width: int, codec: Codec) -> bytes:
    return codec.compress(to_planes(data, width))


def decode(stream, width: int, codec: Codec, size: int, out: memoryview | None = None) -> memoryview:
    """The original bytes, in ``out`` when given (it may hold ``stream`` itself: the stream
    is decompressed to a copy before ``out`` is written)."""
    planes = codec.decompress(stream, size)
    if out is None or len(out) < size or out.readonly:
        out = memoryview(bytearray(size))
    return from_planes(planes, width, out)
