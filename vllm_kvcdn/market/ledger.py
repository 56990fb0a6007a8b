"""The metering ledger: one row per cache read that succeeded, in SQLite, across restarts.

The engine's scheduler records a read when the worker reports its load finished without a
failed chunk (a failed or aborted load is not billed), in the step that learns it, before
the request computes its first token: ``LedgerWriter.record`` commits the row there and
then (WAL, ``synchronous=NORMAL``: measured ~36 us per row on the 2-core test box, against
~210 us with an fsync per row), so a read whose response went out survives a crash of the
server (SIGKILL), and each read is one row, written once. Not promised: a power loss of
the machine (no fsync per row), and a row that found the file busy (another writer) or
broken: it is queued for the writer thread (within ``FLUSH_S``), never waited for on the
engine step. The side API (``GET /kvcdn/v1/usage``) and ``kvcdn usage`` read the same
file (WAL mode: readers never block the writer). Prometheus keeps bounded labels; the
detail per document and tenant is here.

Imports nothing heavy (the CLI reads it without torch or vLLM).
"""

from __future__ import annotations

import atexit
import hashlib
import sqlite3
import threading
from contextlib import closing
from dataclasses import astuple, dataclass, fields
from pathlib import Path

from vllm_kvcdn.log import get_logger

logger = get_logger(__name__)

FLUSH_S = 1.0  # a row the step could not commit reaches the file at most this long after its load finished
MAX_PENDING = 100_000  # rows kept in memory while the file cannot be written (oldest dropped beyond)
PUBLIC_TENANT = "public"  # requests without a cache_salt


def tenant_of(cache_salt: str | None) -> str:
    """A request's tenant: a hash of its ``cache_salt`` (the salt itself is a secret that
    grants hits on the tenant's documents, so it is never stored)."""
    if not cache_salt:
        return PUBLIC_TENANT
    return "salt-" + hashlib.sha256(b"kvcdn-tenant\0" + cache_salt.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Read:
    """One successful cache read (a request whose prompt loaded a published document)."""

    time: float  # unix seconds when the load finished
    request_id: str
    document: str  # the document id matched (its last chunk's key)
    tenant: str  # tenant_of(cache_salt)
    prompt_tokens: int
    loaded_tokens: int  # served from the store (or this node's tiers of it)
    cached_tokens: int  # already in vLLM's own prefix cache
    computed_tokens: int  # prefilled by the engine
    kv_bytes: int  # KV bytes written into the cache
    store_bytes: int  # artifact bytes read from the store or the disk tier (0: the RAM tier had them)
    load_seconds: float
    grant_id: str = ""  # the read grant it was metered against ("": none; ``grants``)


_COLUMNS = [f.name for f in fields(Read)]
_SCHEMA = """
CREATE TABLE IF NOT EXISTS reads (
    id INTEGER PRIMARY KEY,
    time REAL NOT NULL, request_id TEXT NOT NULL, document TEXT NOT NULL, tenant TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL, loaded_tokens INTEGER NOT NULL, cached_tokens INTEGER NOT NULL,
    computed_tokens INTEGER NOT NULL, kv_bytes INTEGER NOT NULL, store_bytes INTEGER NOT NULL,
    load_seconds REAL NOT NULL, grant_id TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS reads_by_time ON reads (time);
CREATE INDEX IF NOT EXISTS reads_by_document ON reads (document, time);
CREATE INDEX IF NOT EXISTS reads_by_tenant ON reads (tenant, time);
"""
_INSERT = f"INSERT INTO reads ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"


def connect(path: str | Path, *, create: bool = True, timeout: float = 10.0) -> sqlite3.Connection:
    """A connection in WAL mode; ``timeout``: how long a write waits for another writer."""
    path = Path(path).expanduser()
    if create:
        path.parent.mkdir(parents=True, exist_ok=True)
    elif not path.exists():
        raise FileNotFoundError(f"no ledger at {path}: reads are recorded by a server with ledger_path there")
    db = sqlite3.connect(str(path), timeout=timeout, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")  # a commit is in the WAL file: it survives the process, not power loss
    if create:
        db.executescript(_SCHEMA)
        _add_grant_column(db)
    return db


def _add_grant_column(db: sqlite3.Connection) -> None:
    """A ledger written before read grants gets their column (empty for its rows)."""
    if "grant_id" not in {row[1] for row in db.execute("PRAGMA table_info(reads)")}:
        with db:
            db.execute("ALTER TABLE reads ADD COLUMN grant_id TEXT NOT NULL DEFAULT ''")
    db.execute("CREATE INDEX IF NOT EXISTS reads_by_grant ON reads (grant_id) WHERE grant_id != ''")


def grant_reads(path: str | Path, grant_id: str) -> int:
    """Reads metered against a grant so far."""
    with _reader(path) as db:
        return db.execute("SELECT COUNT(*) FROM reads WHERE grant_id = ?", [grant_id]).fetchone()[0]


@dataclass(frozen=True)
class Filters:
    """Which reads a query covers; None: any."""

    document: str | None = None  # a document id, or a prefix of one (8+ characters)
    tenant: str | None = None
    since: float | None = None  # unix seconds, inclusive
    until: float | None = None  # exclusive

    def where(self) -> tuple[str, list]:
        terms, args = [], []
        if self.document:
            terms.append("document LIKE ? ESCAPE '\\'")
            args.append(self.document.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%")
        for column, op, value in (("tenant", "=", self.tenant), ("time", ">=", self.since),
                                  ("time", "<", self.until)):
            if value is not None:
                terms.append(f"{column} {op} ?")
                args.append(value)
        return (" WHERE " + " AND ".join(terms)) if terms else "", args


def reads(path: str | Path, filters: Filters = Filters(), limit: int = 1000) -> list[Read]:
    """The newest ``limit`` reads matching ``filters``, oldest first."""
    where, args = filters.where()
    with _reader(path) as db:
        rows = db.execute(f"SELECT {', '.join(_COLUMNS)} FROM reads{where} ORDER BY time DESC, id DESC LIMIT ?",
                          [*args, limit]).fetchall()
    return [Read(*row) for row in reversed(rows)]


@dataclass(frozen=True)
class Totals:
    """Reads of one document by one tenant, summed."""

    document: str
    tenant: str
    reads: int
    loaded_tokens: int
    cached_tokens: int
    computed_tokens: int
    kv_bytes: int
    store_bytes: int
    load_seconds: float
    first: float
    last: float


def totals(path: str | Path, filters: Filters = Filters()) -> list[Totals]:
    """Per (document, tenant): what was read, most read first."""
    where, args = filters.where()
    sql = (f"SELECT document, tenant, COUNT(*), SUM(loaded_tokens), SUM(cached_tokens), SUM(computed_tokens), "
           f"SUM(kv_bytes), SUM(store_bytes), SUM(load_seconds), MIN(time), MAX(time) FROM reads{where} "
           f"GROUP BY document, tenant ORDER BY COUNT(*) DESC, document, tenant")
    with _reader(path) as db:
        return [Totals(*row) for row in db.execute(sql, args).fetchall()]


def _reader(path: str | Path) -> closing[sqlite3.Connection]:
    """A connection for one query; a ledger not written yet reads as empty."""
    return closing(connect(path, create=True))


class LedgerWriter:
    """Commits each row when it is recorded; rows that cannot be committed then go to a
    background thread that inserts them in batches."""

    def __init__(self, path: str | Path, flush_s: float = FLUSH_S, busy_timeout_s: float = 10.0):
        self.path = Path(path).expanduser()
        self.busy_timeout_s = busy_timeout_s  # how long the writer thread waits for another writer
        # The recording thread's own connection (a bad path fails at start, not at the
        # first read); it never waits for another writer: a busy file queues the row.
        self._db = connect(self.path, timeout=0)
        self.flush_s = flush_s
        self._pending: list[Read] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self.dropped = 0  # rows lost because the file could not be written for too long
        self.failed_writes = 0  # batches that could not be written (kept for the next try)
        self._thread = threading.Thread(target=self._run, name="kvcdn-ledger", daemon=True)
        self._thread.start()
        atexit.register(self.close)  # a clean exit writes what is queued, shutdown or not

    def record(self, read: Read) -> None:
        """Commit one row now; queue it if the file is busy or cannot be written."""
        if self._db is not None:
            try:
                with self._db:
                    self._db.execute(_INSERT, astuple(read))
                return
            except sqlite3.Error as e:
                logger.warning("kvcdn: ledger %s: a read queued, not committed: %s", self.path, e)
        with self._lock:
            self._pending.append(read)
            if len(self._pending) > MAX_PENDING:
                del self._pending[0]
                self.dropped += 1

    def close(self) -> None:
        """Write what is queued and stop (again: nothing)."""
        if not self._thread.is_alive():
            return
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=30)
        db, self._db = self._db, None
        if db is not None:
            db.close()

    def _run(self) -> None:
        db = None
        while True:
            self._wake.wait(self.flush_s)
            stopping = self._stopping
            with self._lock:
                batch, self._pending = self._pending, []
            if batch:
                try:
                    db = db or connect(self.path, timeout=self.busy_timeout_s)
                    with db:
                        db.executemany(_INSERT, [astuple(r) for r in batch])
                except sqlite3.Error as e:
                    self.failed_writes += 1
                    logger.error("kvcdn: could not write %d reads to the ledger %s (kept for the next try): %s",
                                 len(batch), self.path, e)
                    with self._lock:
                        self._pending[:0] = batch
                    if db is not None:
                        db.close()
                        db = None
            if stopping:
                break
        if db is not None:
            db.close()
