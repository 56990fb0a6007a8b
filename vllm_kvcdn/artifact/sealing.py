"""Private documents encrypted at rest: chunk objects sealed with AES-256-GCM under data
keys that only a tenant's servers can unwrap.

A document's KV is its text in another form, so a private document's chunks must not sit
in the clear in a shared bucket or on a node's disk. Envelope encryption, as a KMS does it:
every sealed chunk object gets a **fresh random 256-bit data key**, used for exactly that
one encryption (so its nonce can never repeat under it), wrapped by the tenant's key (a
``KeyWrapper``: a key file here, ``FileTenantKey``; a KMS can sit behind the same three
members). The wrapped key travels in the object's own envelope, not in a manifest: the
chunks of a tenant's documents that share a prefix share their objects, and any of the
tenant's servers opens them. Both the wrap and the encryption are authenticated with the
object's name (chunk key and part) as associated data, so a sealed chunk copied under
another name, or a wrapped key moved into another envelope, fails to open.

Where this differs from "a data key per document" (issue 30's wording): a data key per
chunk object keeps chunk sharing across a tenant's documents without a manifest having to
carry another document's key; the manifest says which tenant key a document needs
(``Manifest.encryption``), and it is signed with everything else.

The envelope: ``KVCDNSL1``, the tenant key id (u16 length + ASCII), the wrapped data key
(u16 length + bytes), a 12-byte nonce, then the ciphertext of the whole chunk object and
GCM's 16-byte tag. What is sealed is the canonical chunk (format v1 or v2) whose BLAKE3
checksum the signed manifest records: after opening, every check a plain chunk gets runs.
"""

from __future__ import annotations

import hashlib
import os
import struct
import threading
from pathlib import Path
from typing import Protocol

from vllm_kvcdn.artifact.manifest import ArtifactError

MAGIC = b"KVCDNSL1"
ALGORITHM = "AES-256-GCM"
_NONCE = 12
_TAG = 16
_KEY_BYTES = 32
_local = threading.local()  # each read thread's scratch buffer for ciphertext (``TenantKeys.open``)


def _scratch(size: int) -> memoryview:
    buffer = getattr(_local, "buffer", None)
    if buffer is None or len(buffer) < size:
        buffer = _local.buffer = bytearray(size)
    return memoryview(buffer)[:size]


def _aesgcm(key: bytes):
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    return AESGCM(key)


class KeyWrapper(Protocol):
    """A tenant key that wraps and unwraps data keys (a key file, or a KMS key)."""

    key_id: str  # names the key in envelopes and manifests (never the key itself)

    def wrap(self, data_key: bytes, context: bytes) -> bytes: ...

    def unwrap(self, wrapped: bytes, context: bytes) -> bytes: ...


class FileTenantKey:
    """A 256-bit tenant key held in a file (64 hex digits), wrapping with AES-256-GCM."""

    def __init__(self, key: bytes):
        if len(key) != _KEY_BYTES:
            raise ValueError(f"kvcdn: a tenant key is {_KEY_BYTES} bytes, got {len(key)}")
        self._key = key
        self.key_id = hashlib.sha256(b"kvcdn tenant key id\0" + key).hexdigest()[:32]

    @classmethod
    def generate(cls) -> "FileTenantKey":
        return cls(os.urandom(_KEY_BYTES))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FileTenantKey":
        try:
            return cls(bytes.fromhex(Path(path).expanduser().read_text().strip()))
        except (OSError, ValueError) as e:
            raise ValueError(f"kvcdn: cannot read the tenant key {path}: {e} (make one with "
                             f"`kvcdn keygen --tenant PATH`)") from e

    def save(self, path: str | os.PathLike) -> None:
        fd = os.open(Path(path).expanduser(), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self._key.hex() + "\n")

    def wrap(self, data_key: bytes, context: bytes) -> bytes:
        nonce = os.urandom(_NONCE)
        return nonce + _aesgcm(self._key).encrypt(nonce, data_key, b"wrap\0" + context)

    def unwrap(self, wrapped: bytes, context: bytes) -> bytes:
        return _aesgcm(self._key).decrypt(wrapped[:_NONCE], wrapped[_NONCE:], b"wrap\0" + context)


def object_context(chunk_key: str, part: str = "") -> bytes:
    """The associated data that binds a sealed object to its name."""
    return f"{chunk_key}.{part}".encode()


def is_sealed(data) -> bool:
    return bytes(memoryview(data)[: len(MAGIC)]) == MAGIC


class TenantKeys:
    """The tenant keys a server holds: the first seals what it publishes privately, any of
    them opens (a rotated-out key still reads old documents)."""

    def __init__(self, wrappers: list[KeyWrapper]):
        self._by_id = {w.key_id: w for w in wrappers}
        self.sealer = wrappers[0] if wrappers else None

    def holds(self, key_id: str) -> bool:
        return key_id in self._by_id

    def seal(self, plaintext, context: bytes) -> bytes:
        """The sealed envelope of ``plaintext`` (a whole chunk object)."""
        data_key = os.urandom(_KEY_BYTES)
        wrapped = self.sealer.wrap(data_key, context)
        nonce = os.urandom(_NONCE)  # a fresh key per object: even a fixed nonce would not repeat under it
        key_id = self.sealer.key_id.encode()
        head = MAGIC + struct.pack("<H", len(key_id)) + key_id + struct.pack("<H", len(wrapped)) + wrapped + nonce
        return head + _aesgcm(data_key).encrypt(nonce, bytes(plaintext), context)

    def open(self, sealed, context: bytes, out: memoryview | None = None):
        """The chunk object inside ``sealed`` (written into ``out`` when it is given and large
        enough: a view of it; ``sealed`` may view the same buffer); ``ArtifactError``
        ``no_tenant_key`` (this server lacks the key: a miss) or ``decrypt`` (tampered with,
        or under another name)."""
        view = memoryview(sealed)
        try:
            at = len(MAGIC)
            (n,) = struct.unpack_from("<H", view, at)
            key_id = bytes(view[at + 2 : at + 2 + n]).decode("ascii")
            at += 2 + n
            (n,) = struct.unpack_from("<H", view, at)
            wrapped = bytes(view[at + 2 : at + 2 + n])
            at += 2 + n
            nonce = bytes(view[at : at + _NONCE])
            body = view[at + _NONCE :]
        except (struct.error, UnicodeDecodeError) as e:
            raise ArtifactError("decrypt", f"sealed chunk envelope is not valid: {e}") from e
        wrapper = self._by_id.get(key_id)
        if wrapper is None:
            raise ArtifactError("no_tenant_key", f"a private chunk sealed for tenant key {key_id[:12]}, which this "
                                                 f"server does not hold")
        from cryptography.exceptions import InvalidTag

        try:
            cipher = _aesgcm(wrapper.unwrap(wrapped, context))
            size = len(body) - _TAG
            if out is None or len(out) < size or not hasattr(cipher, "decrypt_into"):
                return cipher.decrypt(nonce, body, context)
            # Into a buffer the caller reuses: 3x the speed of a fresh allocation (page faults,
            # measured: 4.1 vs 1.3 GB/s). The ciphertext may sit in that buffer: it is copied
            # aside first (the library refuses overlapping buffers), into this thread's scratch.
            scratch = _scratch(len(body))
            scratch[:] = body
            cipher.decrypt_into(nonce, scratch, context, out[:size])
            return out[:size]
        except (InvalidTag, ValueError) as e:
            raise ArtifactError("decrypt", "a private chunk failed authentication (tampered with, or stored "
                                           "under another name)") from e


NO_KEYS = TenantKeys([])


def tenant_keys(paths: list[str] | tuple[str, ...]) -> TenantKeys:
    """The keys in these files, the first one sealing."""
    return TenantKeys([FileTenantKey.load(p) for p in paths])
