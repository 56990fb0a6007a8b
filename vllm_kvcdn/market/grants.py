"""Read rights a publisher can sell: signed, expiring read grants, checked and counted by
the server that loads (issue 30; the paper's "the right to load a hosted cache").

A grant names documents, a tenant (``ledger.tenant_of`` of the requests' ``cache_salt``:
the grant is worth nothing to another tenant), an expiry and, optionally, a number of
reads; the publisher that signed the documents' manifests signs it with the same Ed25519
key (``provenance``), so only that publisher can sell reads of its documents. A request
carries it in ``kv_transfer_params`` (``{"kvcdn": {"grant": TOKEN}}``; no publisher key
needed). A document published with ``require_grant`` (and, on a server with
``require_grants``, every document) loads only under a valid grant; otherwise the request
is computed as usual, never billed, and the refusal counted by reason. A granted read is
one ledger row naming the grant, and the grant's count is kept against the ledger, so a
restart does not reset it.

Where this differs from a CDN's signed URLs: the count is per server (its own ledger); a
fleet that must share one count needs a shared ledger (issue 31's combined ledgers).

The token: ``base64url(canonical JSON payload) "." base64url(signature)``.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
from dataclasses import asdict, dataclass

from vllm_kvcdn.artifact.provenance import PublisherKey, verify_signature

MAX_TOKEN_CHARS = 8192
MAX_DOCUMENTS = 64
GRANT_VERSION = 1


class GrantError(Exception):
    """A grant that does not let this read load; ``reason`` labels the metric."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class ReadGrant:
    grant_id: str  # random, names the grant in the ledger
    publisher: str  # the signer's Ed25519 public key (hex): the documents' publisher
    documents: tuple[str, ...]  # document ids it covers
    tenant: str  # ``ledger.tenant_of(cache_salt)`` of the requests it covers
    expires: float  # unix seconds
    reads: int | None = None  # how many reads it buys (None: any number until it expires)
    v: int = GRANT_VERSION

    def payload(self) -> bytes:
        d = asdict(self)
        d["documents"] = list(self.documents)
        return json.dumps(d, sort_keys=True, separators=(",", ":")).encode()


def issue(key: PublisherKey, documents: list[str], tenant: str, ttl_s: float, reads: int | None = None) -> str:
    """A grant token signed by ``key`` (the documents' publisher)."""
    if not documents or len(documents) > MAX_DOCUMENTS:
        raise ValueError(f"a grant names 1 to {MAX_DOCUMENTS} documents")
    if reads is not None and reads < 1:
        raise ValueError("a grant's reads must be at least 1")
    grant = ReadGrant(secrets.token_hex(16), key.public_hex, tuple(documents), tenant, time.time() + ttl_s, reads)
    payload = grant.payload()
    return f"{_b64(payload)}.{_b64(key.sign_bytes(payload))}"


def parse(token: object) -> ReadGrant:
    """The grant a token carries, its signature checked against the key it names (whether
    that key may grant a given document is ``check``'s question). Raises ``GrantError``."""
    if not isinstance(token, str) or len(token) > MAX_TOKEN_CHARS or token.count(".") != 1:
        raise GrantError("malformed", "a read grant is a string 'PAYLOAD.SIGNATURE'")
    try:
        payload_b64, signature_b64 = token.split(".")
        payload, signature = _unb64(payload_b64), _unb64(signature_b64)
        d = json.loads(payload)
        grant = ReadGrant(grant_id=str(d["grant_id"]), publisher=str(d["publisher"]),
                          documents=tuple(str(x) for x in d["documents"])[:MAX_DOCUMENTS], tenant=str(d["tenant"]),
                          expires=float(d["expires"]), reads=None if d.get("reads") is None else int(d["reads"]),
                          v=int(d.get("v", 0)))
    except (ValueError, KeyError, TypeError) as e:
        raise GrantError("malformed", f"the read grant cannot be read: {e}") from e
    if grant.v != GRANT_VERSION:
        raise GrantError("malformed", f"read grant version {grant.v} is not understood here")
    if grant.payload() != payload or not verify_signature(grant.publisher, payload, signature):
        raise GrantError("bad_signature", "the read grant's signature does not hold")
    return grant


def check(grant: ReadGrant, *, document: str, publisher: str, tenant: str, used: int,
          now: float | None = None) -> None:
    """Raise ``GrantError`` unless ``grant`` lets ``tenant`` read ``document`` (signed by
    ``publisher``) once more, having read it ``used`` times."""
    now = time.time() if now is None else now
    if grant.publisher != publisher:
        raise GrantError("wrong_publisher", "the read grant is not signed by the document's publisher")
    if document not in grant.documents:
        raise GrantError("wrong_document", "the read grant does not name this document")
    if grant.tenant != tenant:
        raise GrantError("wrong_tenant", "the read grant is for another tenant (cache_salt)")
    if now >= grant.expires:
        raise GrantError("expired", "the read grant has expired")
    if grant.reads is not None and used >= grant.reads:
        raise GrantError("exhausted", f"the read grant's {grant.reads} reads are used")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class GrantBook:
    """How many reads each grant has had on this server: the ledger's count when a grant
    is first seen (one indexed query), then kept here, plus the reads admitted and not yet
    metered (so concurrent requests cannot overspend a grant). The scheduler's thread only."""

    def __init__(self, ledger_path: str):
        self.ledger_path = ledger_path
        self._metered: dict[str, int] = {}
        self._in_flight: dict[str, int] = {}

    def used(self, grant_id: str) -> int:
        if grant_id not in self._metered:
            from vllm_kvcdn.market.ledger import grant_reads

            self._metered[grant_id] = grant_reads(self.ledger_path, grant_id) if self.ledger_path else 0
        return self._metered[grant_id] + self._in_flight.get(grant_id, 0)

    def reserve(self, grant_id: str) -> None:
        self._in_flight[grant_id] = self._in_flight.get(grant_id, 0) + 1

    def settle(self, grant_id: str, metered: bool) -> None:
        """A reserved read ended: metered (served) or not (failed, aborted: not billed)."""
        left = self._in_flight.get(grant_id, 0) - 1
        if left > 0:
            self._in_flight[grant_id] = left
        else:
            self._in_flight.pop(grant_id, None)
        if metered:
            self._metered[grant_id] = self._metered.get(grant_id, 0) + 1
