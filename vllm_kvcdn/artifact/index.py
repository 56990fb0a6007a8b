"""The scheduler's index of published chunks, rebuilt from manifests.

It answers one question fast: how many leading tokens of this prompt are covered by
published chunks of this fingerprint and salt? Full chunks are found by key; a
document's partial last chunk is found by trying the tail lengths published after
the current parent key.

Matching does no I/O: a background refresher (``start_refresher``) rebuilds the index
from the store's manifests when they change and swaps it in whole; a publish this
engine finished is added at once (``add``), so its readers need not wait for a refresh.
A refresh lists the manifests (one LIST on S3) and reads only those that are new or
replaced since the last one: documents other servers publish or delete show up within
``refresh_interval_s``. A manifest the trust policy refuses (unsigned on a shared bucket,
signed by a key this server does not trust, a bad signature: ``provenance``) or that is
private to a tenant key this server lacks (``sealing``) is never matched, and counted
once per version read (``take_untrusted``). Each chunk carries the
checksums its signed manifest records into the load plan: every tier checks them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from vllm_kvcdn.artifact import catalog
from vllm_kvcdn.artifact.chain import ChunkSpan, chain_seed, chunk_key
from vllm_kvcdn.artifact.manifest import Manifest
from vllm_kvcdn.artifact.provenance import TrustPolicy
from vllm_kvcdn.artifact.sealing import NO_KEYS, TenantKeys
from vllm_kvcdn.log import get_logger
from vllm_kvcdn.store import Store, StoreError
from vllm_kvcdn.store.keys import MANIFEST_PREFIX, manifest_object_key

logger = get_logger(__name__)


@dataclass(frozen=True)
class IndexedChunk:
    num_tokens: int
    doc_id: str
    checksums: tuple[tuple[str, str], ...]  # (part name, checksum) of what is stored, as its manifest records
    private: bool = False  # its document is sealed for a tenant key (``sealing``)
    publisher: str = ""  # its manifest's signer (hex; "": unsigned)
    require_grant: bool = False  # its document's reads need a read grant (``market.grants``)


@dataclass
class Match:
    spans: list[ChunkSpan] = field(default_factory=list)
    chunks: list[IndexedChunk] = field(default_factory=list)  # the index's entry of each span
    doc_id: str | None = None  # the document whose chunk ends the match

    @property
    def num_tokens(self) -> int:
        return self.spans[-1].end if self.spans else 0


@dataclass
class _View:
    chunks: dict[str, IndexedChunk] = field(default_factory=dict)
    tails: dict[str, set[int]] = field(default_factory=dict)  # parent key -> partial chunk lengths


class ChunkIndex:
    def __init__(self, store: Store, fingerprint: str, chunk_size: int, refresh_interval_s: float = 2.0,
                 trust: TrustPolicy | None = None, keys: TenantKeys = NO_KEYS):
        """``trust``: the manifests it may match; ``keys``: the tenant keys this server holds
        (a private document sealed for another is never matched)."""
        self.store = store
        self.trust = trust or TrustPolicy()
        self.keys = keys
        self.fingerprint = fingerprint
        self.chunk_size = chunk_size
        self.refresh_interval_s = refresh_interval_s
        self._view = _View()  # replaced whole by a rebuild; read without a lock
        self._lock = threading.Lock()  # orders add() against a rebuild's swap
        self._added: list[tuple[int, Manifest]] = []  # (generation, manifest published here)
        self._generation = 0
        self._version: object = object()
        self._stop = threading.Event()
        self._wake = threading.Event()  # refresh now (a deletion through the side API)
        self.refreshed_at = 0.0  # monotonic time the last refresh (rebuilt or not) began
        self._thread: threading.Thread | None = None
        self._entries: dict[str, tuple[str, catalog.Entry, str | None]] = {}  # key -> (etag, entry, distrust)
        self.num_documents = 0
        self.num_foreign = 0  # manifests under another fingerprint or chunk size
        self.num_untrusted = 0  # manifests the trust policy refuses (never matched)
        self._untrusted: dict[str, int] = {}  # reason -> manifest versions refused since ``take_untrusted``

    # -- keeping it fresh -------------------------------------------------------------

    def start_refresher(self) -> None:
        """Refresh in a daemon thread every ``refresh_interval_s`` (after one refresh now)."""
        self.refresh(force=True)
        self._thread = threading.Thread(target=self._refresh_loop, name="kvcdn-index", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def request_refresh(self) -> None:
        self._wake.set()

    def _refresh_loop(self) -> None:
        while not self._stop.is_set():
            woken = self._wake.wait(self.refresh_interval_s)
            self._wake.clear()
            try:
                self.refresh(force=woken)
            except Exception:  # never let the refresher die: the old index keeps serving
                logger.exception("kvcdn: index refresh failed; keeping the old index")

    def refresh(self, force: bool = False) -> None:
        """Rebuild from the store's manifests when they changed: the store's cheap version
        token when it has one (a directory's mtime), else a listing compared by etags."""
        began = time.monotonic()
        try:
            version = self.store.version(MANIFEST_PREFIX)
            if force or version is None or version != self._version:
                self._rebuild(force)
                self._version = version
        except StoreError as e:
            logger.warning("kvcdn: store unavailable, keeping the old index: %s", e)
            return
        self.refreshed_at = began

    def _rebuild(self, force: bool) -> None:
        with self._lock:
            started = self._generation
        manifests, changed = self._read_manifests()
        if not changed and not force:
            return
        view = _View()
        docs = foreign = untrusted = 0
        for manifest, distrust in manifests:
            if manifest.fingerprint != self.fingerprint or manifest.chunk_size != self.chunk_size:
                foreign += 1
            elif distrust:
                untrusted += 1
            else:
                docs += 1
                self._add(view, manifest)
        with self._lock:
            # Publishes added while we listed may have been missed by the listing.
            for generation, manifest in self._added:
                if generation > started:
                    self._add(view, manifest)
            self._added = [a for a in self._added if a[0] > started]
            self._view = view
        self.num_documents, self.num_foreign, self.num_untrusted = docs, foreign, untrusted
        logger.info(
            "kvcdn: index holds %d documents, %d chunks (%d manifests of other models/settings, %d untrusted)",
            docs, len(view.chunks), foreign, untrusted,
        )

    def _read_manifests(self) -> tuple[list[tuple[Manifest, str | None]], bool]:
        """The store's manifests with the trust policy's verdict on each, and whether any was
        added, replaced or removed since the last call; only the new or replaced ones are
        read (and their signatures checked)."""
        entries, changed = {}, False
        for info in self.store.scan(MANIFEST_PREFIX):
            known = self._entries.get(info.key)
            if known is not None and known[0] == info.etag:
                entries[info.key] = known
                continue
            changed = True
            entry = catalog.read_entry(self.store, info.key)
            if entry is None:
                continue  # deleted since the listing
            entries[info.key] = (info.etag, entry, self._distrust(info.key, entry))
        changed = changed or entries.keys() != self._entries.keys()
        self._entries = entries
        return [(entry, distrust) for _, entry, distrust in entries.values() if isinstance(entry, Manifest)], changed

    def _distrust(self, object_key: str, entry: catalog.Entry) -> str | None:
        """Why a manifest just read may not be matched (None: it may), logged and counted."""
        if isinstance(entry, catalog.DamagedManifest):
            logger.warning("kvcdn: skipping the manifest of %s: %s", entry.doc_id[:16], entry.error)
            return "damaged"
        if entry.fingerprint != self.fingerprint or entry.chunk_size != self.chunk_size:
            return None  # another model's: not ours to judge
        why = self.trust.verdict(entry)
        if why is None and manifest_object_key(entry.doc_id) != object_key:
            why = "misplaced"  # a signed manifest copied under another document's name
        if why is None and entry.tenant_key is not None and not self.keys.holds(entry.tenant_key):
            why = "no_tenant_key"  # another tenant's private document: a miss, never an error
        if why is not None:
            logger.warning("kvcdn: not serving document %s: its manifest is %s (publisher %s)", entry.doc_id[:16],
                           why.replace("_", " "), entry.publisher[:16] or "none")
            with self._lock:
                self._untrusted[why] = self._untrusted.get(why, 0) + 1
        return why

    def take_untrusted(self) -> dict[str, int]:
        """Manifest versions refused since the last call, by reason (the scheduler counts them)."""
        with self._lock:
            taken, self._untrusted = self._untrusted, {}
        return taken

    def add(self, manifest: Manifest) -> None:
        """A document this engine just published (its manifest is already stored)."""
        with self._lock:
            self._generation += 1
            self._added.append((self._generation, manifest))
            self._add(self._view, manifest)

    def _add(self, view: _View, manifest: Manifest) -> None:
        for c in manifest.chunks:
            checksums = tuple((p.name, p.checksum) for p in c.stored())
            view.chunks.setdefault(c.key, IndexedChunk(c.num_tokens, manifest.doc_id, checksums,
                                                       manifest.tenant_key is not None, manifest.publisher,
                                                       manifest.require_grant))
            if c.num_tokens < self.chunk_size:
                view.tails.setdefault(c.parent, set()).add(c.num_tokens)

    def vouched(self, keys: Sequence[str]) -> dict[str, dict[str, str]]:
        """Chunk key -> {part name: checksum} that the trusted manifests indexed record, for
        those of ``keys`` indexed (a publish keeps those stored chunks: ``documents``)."""
        view = self._view
        return {key: dict(view.chunks[key].checksums) for key in keys if key in view.chunks}

    # -- matching ---------------------------------------------------------------------

    def match(self, tokens: Sequence[int], cache_salt: str | None, adapter: str | None = None) -> Match:
        """The longest run of published chunks that prefixes ``tokens`` (under this salt
        and LoRA adapter digest): whole chunks while they match, then the longest
        published tail hanging off the last one."""
        result = Match()
        view = self._view
        if not view.chunks:
            return result
        parent, pos = chain_seed(self.fingerprint, cache_salt, adapter), 0
        while self._extend(view, result, tokens, parent, pos, self.chunk_size):
            parent, pos = result.spans[-1].key, result.spans[-1].end
        for n in sorted(view.tails.get(parent, ()), reverse=True):
            if self._extend(view, result, tokens, parent, pos, n):
                break
        return result

    @staticmethod
    def _extend(view: _View, result: Match, tokens: Sequence[int], parent: str, pos: int, n: int) -> bool:
        """Append the chunk of ``n`` tokens at ``pos`` if it is published."""
        if pos + n > len(tokens):
            return False
        key = chunk_key(parent, tokens[pos : pos + n])
        entry = view.chunks.get(key)
        if entry is None or entry.num_tokens != n:
            return False
        result.spans.append(ChunkSpan(key, parent, pos, n))
        result.chunks.append(entry)
        result.doc_id = entry.doc_id
        return True
