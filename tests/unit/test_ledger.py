"""The metering ledger on a real SQLite file: batched writes, filters, tenants, restarts,
and the usage report priced at a tariff (``kvcdn usage`` included)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from vllm_kvcdn.market import ledger, usage
from vllm_kvcdn.market.economics import PAPER_RATIOS, Tariff


def read(i: int, document: str = "doc-a" + "0" * 27, tenant: str = ledger.PUBLIC_TENANT, when: float = 0.0,
         loaded: int = 3774) -> ledger.Read:
    return ledger.Read(time=when or 1_700_000_000.0 + i, request_id=f"req-{i}", document=document, tenant=tenant,
                       prompt_tokens=loaded + 16, loaded_tokens=loaded, cached_tokens=0, computed_tokens=16,
                       kv_bytes=loaded * 1024, store_bytes=loaded * 1100, load_seconds=0.01)


def wait_for(path, n: int, timeout: float = 10.0) -> list[ledger.Read]:
    deadline = time.monotonic() + timeout
    while True:
        rows = ledger.reads(path)
        if len(rows) >= n or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)


def test_a_row_is_in_the_file_when_record_returns(tmp_path):
    path = tmp_path / "ledger.sqlite3"
    writer = ledger.LedgerWriter(path, flush_s=60)  # the writer thread would wait a minute
    for i in range(500):
        writer.record(read(i))
        if i in (0, 499):
            assert ledger.reads(path, limit=1)[-1] == read(i)  # committed, not queued
    assert [r.request_id for r in ledger.reads(path)] == [f"req-{i}" for i in range(500)]
    writer.close()


def test_a_busy_file_never_holds_the_recorder(tmp_path):
    """Another writer holds the file: the row is queued (the engine step is not kept
    waiting) and reaches the file from the writer thread once the lock is gone."""
    path = tmp_path / "ledger.sqlite3"
    writer = ledger.LedgerWriter(path, flush_s=0.1)
    other = ledger.connect(path)
    other.execute("BEGIN EXCLUSIVE")
    started = time.perf_counter()
    writer.record(read(0))
    assert time.perf_counter() - started < 0.5
    other.rollback()
    other.close()
    assert [r.request_id for r in wait_for(path, 1)] == ["req-0"]
    writer.close()


def test_filters_and_totals(tmp_path):
    path = tmp_path / "ledger.sqlite3"
    writer = ledger.LedgerWriter(path)
    a, b = "aaaa1111" + "0" * 24, "bbbb2222" + "0" * 24
    alice, bob = ledger.tenant_of("alice-salt"), ledger.tenant_of("bob-salt")
    rows = [read(0, a, alice), read(1, a, alice), read(2, a, bob), read(3, b, bob, loaded=100)]
    for r in rows:
        writer.record(r)
    writer.close()
    assert [r.request_id for r in ledger.reads(path, ledger.Filters(document=a[:8]))] == ["req-0", "req-1", "req-2"]
    assert [r.request_id for r in ledger.reads(path, ledger.Filters(tenant=bob))] == ["req-2", "req-3"]
    assert [r.request_id for r in ledger.reads(path, ledger.Filters(since=rows[1].time, until=rows[3].time))] == \
        ["req-1", "req-2"]
    assert ledger.reads(path, ledger.Filters(document="aaaa%")) == []  # a LIKE wildcard is a plain character
    totals = {(t.document, t.tenant): t for t in ledger.totals(path)}
    assert totals[a, alice].reads == 2 and totals[a, alice].loaded_tokens == 2 * 3774
    assert totals[b, bob].reads == 1 and totals[b, bob].store_bytes == 100 * 1100


def test_tenants_are_hashes_of_the_salt_never_the_salt():
    assert ledger.tenant_of(None) == ledger.tenant_of("") == ledger.PUBLIC_TENANT
    assert ledger.tenant_of("alice") == ledger.tenant_of("alice") != ledger.tenant_of("bob")
    assert "alice" not in ledger.tenant_of("alice")


_WRITER = """
import os
import signal
import sys
from vllm_kvcdn.market import ledger
from tests.unit.test_ledger import read
writer = ledger.LedgerWriter(sys.argv[1], flush_s=60)  # only a close (or exit) writes
for i in range(int(sys.argv[2]), int(sys.argv[3])):
    writer.record(read(i))
{end}
"""


@pytest.mark.parametrize("end", ["writer.close()", "pass  # exit without close",
                                 "os.kill(os.getpid(), signal.SIGKILL)  # a crash right after the reads"])
def test_the_ledger_survives_a_restart(tmp_path, end):
    path = tmp_path / "ledger.sqlite3"
    script = _WRITER.format(end=end)
    for first, last in ((0, 3), (3, 5)):  # two lives of a server
        subprocess.run([sys.executable, "-c", script, str(path), str(first), str(last)], timeout=60)
    assert [r.request_id for r in ledger.reads(path)] == [f"req-{i}" for i in range(5)]


def test_a_write_that_fails_is_kept_for_the_next_try(tmp_path):
    path = tmp_path / "ledger.sqlite3"
    writer = ledger.LedgerWriter(path, flush_s=0.1, busy_timeout_s=0.1)
    other = ledger.connect(path)
    other.execute("BEGIN EXCLUSIVE")  # no writer gets in for a while
    writer.record(read(0))
    deadline = time.monotonic() + 10
    while not writer.failed_writes and time.monotonic() < deadline:
        time.sleep(0.05)
    assert writer.failed_writes
    other.rollback()
    other.close()
    assert [r.request_id for r in wait_for(path, 1)] == ["req-0"]
    writer.close()


def test_usage_report_prices_reads_at_the_tariff(tmp_path):
    path = tmp_path / "ledger.sqlite3"
    writer = ledger.LedgerWriter(path)
    for i in range(4):
        writer.record(read(i))
    writer.close()
    tariff = Tariff(input_usd_per_mtok=5.0, cache_read_multiplier=0.1)
    rep = usage.report(path, ledger.Filters(), tariff, PAPER_RATIOS)
    (row,) = rep["rows"]
    prefill = 4 * 3774 * 5.0 / 1e6  # what re-prefilling the loaded tokens would have cost
    assert row["reads"] == 4 and row["billed_usd"] == pytest.approx(0.1 * prefill)
    assert row["saved_usd"] == pytest.approx(0.9 * prefill)
    assert row["compute_usd"] == pytest.approx(prefill * 0.296 / 14.71)  # Table 1 at 3774 tokens
    assert rep["total"]["reads"] == 4
    csv_lines = usage.as_csv(rep).splitlines()
    assert csv_lines[0].split(",") == usage.COLUMNS and len(csv_lines) == 2


def test_kvcdn_usage_reads_a_ledger_file(tmp_path):
    path = tmp_path / "ledger.sqlite3"
    writer = ledger.LedgerWriter(path)
    writer.record(read(0, tenant=ledger.tenant_of("alice")))
    writer.record(read(1, tenant=ledger.tenant_of("bob")))
    writer.close()

    def cli(*args) -> str:
        return subprocess.run([sys.executable, "-m", "vllm_kvcdn.cli.main", "usage", "--ledger", str(path), *args],
                              check=True, capture_output=True, text=True, timeout=60).stdout

    rep = json.loads(cli("--format", "json", "--salt", "alice", "--detail"))
    assert [r["request_id"] for r in rep["reads"]] == ["req-0"] and rep["total"]["reads"] == 1
    assert "total" in cli() and "$5 per 1M input tokens" in cli()
    assert len(cli("--format", "csv").splitlines()) == 3
    missing = subprocess.run([sys.executable, "-m", "vllm_kvcdn.cli.main", "usage", "--ledger", str(tmp_path / "none")],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode != 0 and "no ledger" in missing.stderr
