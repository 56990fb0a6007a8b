"""Who published a document, proven: Ed25519-signed manifests and the publishers a server trusts.

Anyone who can write one object of a shared bucket could otherwise replace a chunk with a
self-consistent one carrying other KV (its header's checksum then matches its data), and
every server would load it: a wrong answer reported as a hit (issue 30). So a publisher
signs its manifest (fingerprint, chunk keys, sizes, BLAKE3 checksums, its own key, the
time), a server matches only manifests signed by a key it trusts (``TrustPolicy``), and
every chunk read is checked against the checksum the signed manifest records, in every
tier (``decode_chunk(expected_checksum=...)``; the block tiers key what they hold by chunk
key *and* checksum, ``tier_key``). A writer without the signing key can then make a server
miss, never make it load other KV.

A publisher's id is its public key (64 hex digits): nothing to look up, nothing to spoof.
Keys are files: the private key as PKCS#8 PEM (``kvcdn keygen``), the public key as hex.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

from vllm_kvcdn.artifact.manifest import Manifest

PUBLIC_KEY_HEX_LEN = 64


def _crypto():
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    return serialization, ed25519


class PublisherKey:
    """A publisher's Ed25519 signing key."""

    def __init__(self, private_key):
        self._key = private_key
        serialization, _ = _crypto()
        raw = private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.public_hex = raw.hex()

    @classmethod
    def generate(cls) -> "PublisherKey":
        _, ed25519 = _crypto()
        return cls(ed25519.Ed25519PrivateKey.generate())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PublisherKey":
        serialization, ed25519 = _crypto()
        try:
            key = serialization.load_pem_private_key(Path(path).expanduser().read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as e:
            raise ValueError(f"kvcdn: cannot read the signing key {path}: {e} (make one with `kvcdn keygen`)") from e
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise ValueError(f"kvcdn: the signing key {path} is not an Ed25519 key (make one with `kvcdn keygen`)")
        return cls(key)

    def save(self, path: str | os.PathLike) -> None:
        """The private key as PKCS#8 PEM, readable by its owner only."""
        serialization, _ = _crypto()
        pem = self._key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())
        path = Path(path).expanduser()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)

    def sign(self, manifest: Manifest) -> Manifest:
        """The manifest, signed by this key (a copy; the publisher field set to this key)."""
        unsigned = replace(manifest, publisher=self.public_hex, signature="")
        return replace(unsigned, signature=self.sign_bytes(unsigned.signed_bytes()).hex())

    def sign_bytes(self, data: bytes) -> bytes:
        return self._key.sign(data)


def verify_signature(public_hex: str, data: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is the Ed25519 signature of ``data`` by the key ``public_hex``."""
    _, ed25519 = _crypto()
    try:
        ed25519.Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_hex)).verify(signature, data)
    except Exception:  # InvalidSignature, a malformed key or hex: the same answer
        return False
    return True


def parse_public_key(value: str) -> str:
    """A trusted publisher as configured: 64 hex digits, or a file holding them (a ``.pub``
    that ``kvcdn keygen`` wrote); the key, lower-case hex."""
    text = value.strip()
    if not _is_hex_key(text):
        try:
            text = Path(text).expanduser().read_text().split()[0]
        except (OSError, IndexError) as e:
            raise ValueError(f"kvcdn: trusted publisher {value!r} is neither a 64-hex-digit Ed25519 public key "
                             f"nor a file holding one ({e})") from e
        if not _is_hex_key(text):
            raise ValueError(f"kvcdn: the file {value!r} does not hold a 64-hex-digit Ed25519 public key")
    return text.lower()


def _is_hex_key(text: str) -> bool:
    return len(text) == PUBLIC_KEY_HEX_LEN and all(c in "0123456789abcdefABCDEF" for c in text)


@dataclass(frozen=True)
class TrustPolicy:
    """Which manifests a server may match: those signed by a key in ``publishers``, and,
    with ``allow_unsigned`` (a single-party deployment), those signed by no one."""

    publishers: frozenset[str] = frozenset()
    allow_unsigned: bool = True

    def verdict(self, manifest: Manifest) -> str | None:
        """None if the manifest may be matched, else why not (a metric label):
        ``unsigned``, ``unknown_publisher``, ``bad_signature``, ``weak_checksum``."""
        if not manifest.signature:
            return None if self.allow_unsigned and not manifest.publisher else "unsigned"
        if manifest.publisher not in self.publishers:
            return "unknown_publisher"
        try:
            signature = bytes.fromhex(manifest.signature)
        except ValueError:
            return "bad_signature"
        if not verify_signature(manifest.publisher, manifest.signed_bytes(), signature):
            return "bad_signature"
        if not all(_cryptographic(part.checksum) for c in manifest.chunks for part in c.stored()):
            return "weak_checksum"  # a signature over xxh3 digests would not bind the chunks' bytes
        return None

    @property
    def requires_signatures(self) -> bool:
        return not self.allow_unsigned


def policy_for(store_url: str, *, signing_key: str = "", trusted_publishers=(),
               allow_unsigned: bool | None = None) -> tuple[PublisherKey | None, TrustPolicy]:
    """(the key this party signs with, the manifests it may match) from its settings: its
    own key and ``trusted_publishers`` are trusted; unsigned documents are allowed where
    ``allow_unsigned`` says, by default on a local store and not on a shared ``s3://`` one."""
    signer = PublisherKey.load(signing_key) if signing_key else None
    publishers = {parse_public_key(str(p)) for p in trusted_publishers}
    if signer is not None:
        publishers.add(signer.public_hex)
    unsigned = allow_unsigned if allow_unsigned is not None else not store_url.startswith("s3://")
    return signer, TrustPolicy(frozenset(publishers), bool(unsigned))


def _cryptographic(checksum: str) -> bool:
    from vllm_kvcdn.artifact.chunk_format import CRYPTOGRAPHIC_CHECKSUMS, checksum_algo

    return checksum_algo(checksum) in CRYPTOGRAPHIC_CHECKSUMS


def tier_key(chunk_key: str, checksum: str) -> str:
    """What the block tiers (RAM slots, disk images, tails) key a chunk's engine-native
    copy by: the chunk key and the checksum of the bytes it was made from, so a copy made
    from one version of a chunk never serves a manifest that records another (64 hex
    digits, like a chunk key)."""
    import hashlib

    return hashlib.sha256(f"{chunk_key}:{checksum}".encode()).hexdigest()
