"""The file store: atomic, idempotent puts, listing, deletion, change detection."""

import os

import pytest

from vllm_kvcdn.store import FileStore, open_store


def test_put_get_contains_delete(tmp_path):
    s = FileStore(tmp_path)
    assert s.get("chunks/ab/x.safetensors") is None and not s.contains("chunks/ab/x.safetensors")
    s.put("chunks/ab/x.safetensors", b"hello")
    s.put("chunks/ab/x.safetensors", b"hello")  # idempotent
    assert bytes(s.get("chunks/ab/x.safetensors")) == b"hello"
    assert s.size("chunks/ab/x.safetensors") == 5
    assert s.delete("chunks/ab/x.safetensors") and not s.delete("chunks/ab/x.safetensors")


def test_list_skips_temporaries_and_filters_prefix(tmp_path):
    s = FileStore(tmp_path)
    s.put("manifests/a.json", b"{}")
    s.put("chunks/aa/b.safetensors", b"x")
    (tmp_path / "manifests" / ".tmp-123").write_bytes(b"partial")
    assert sorted(s.list("manifests/")) == ["manifests/a.json"]
    assert sorted(s.list()) == ["chunks/aa/b.safetensors", "manifests/a.json"]


def test_no_temp_file_is_left_behind(tmp_path):
    s = FileStore(tmp_path)
    s.put("manifests/a.json", b"{}")
    assert os.listdir(tmp_path / "manifests") == ["a.json"]


def test_version_changes_when_a_manifest_is_added_or_removed(tmp_path):
    s = FileStore(tmp_path)
    v0 = s.version("manifests/")
    s.put("manifests/a.json", b"{}")
    v1 = s.version("manifests/")
    s.delete("manifests/a.json")
    assert len({v0, v1, s.version("manifests/")}) == 3


def test_keys_cannot_escape_the_root(tmp_path):
    s = FileStore(tmp_path)
    with pytest.raises(ValueError):
        s.put("../outside", b"x")


def test_open_store_by_url(tmp_path, monkeypatch):
    assert open_store(f"file://{tmp_path}/s").root == (tmp_path / "s").resolve()
    monkeypatch.setenv("KVCDN_STORE", f"file://{tmp_path}/env")
    assert open_store().root == (tmp_path / "env").resolve()
    with pytest.raises(ValueError, match="unsupported store URL"):
        open_store("ftp://x/y")


def test_put_if_absent_keeps_the_first_writer_and_leaves_no_temporaries(tmp_path):
    s = FileStore(tmp_path)
    assert s.put_if_absent("chunks/ab/k.safetensors", b"first")
    assert not s.put_if_absent("chunks/ab/k.safetensors", b"second")
    assert bytes(s.get("chunks/ab/k.safetensors")) == b"first"
    assert os.listdir(tmp_path / "chunks" / "ab") == ["k.safetensors"]


def test_scan_gives_size_time_and_an_etag_that_changes_on_replace(tmp_path):
    s = FileStore(tmp_path)
    s.put("manifests/a.json", b"{}")
    (first,) = s.scan("manifests/")
    assert first.key == "manifests/a.json" and first.size == 2 and first.modified > 0
    s.put("manifests/a.json", b"{ }")
    (second,) = s.scan("manifests/")
    assert second.etag != first.etag and second.size == 3


def test_circuit_breaker_opens_after_a_run_of_failures_and_lets_one_trial_through():
    from vllm_kvcdn.store.breaker import CircuitBreaker, CircuitOpen

    now = [0.0]
    breaker = CircuitBreaker("store", threshold=3, cooldown_s=5, clock=lambda: now[0])
    for _ in range(2):
        breaker.before_call()
        breaker.failed()
    breaker.before_call()
    breaker.succeeded()  # a success resets the run
    for _ in range(3):
        breaker.before_call()
        breaker.failed()
    assert breaker.is_open
    with pytest.raises(CircuitOpen):
        breaker.before_call()
    now[0] = 5.0
    breaker.before_call()  # the trial
    with pytest.raises(CircuitOpen):
        breaker.before_call()  # only one at a time
    breaker.failed()  # the trial failed: open again for a full cooldown
    now[0] = 9.0
    with pytest.raises(CircuitOpen):
        breaker.before_call()
    now[0] = 10.0
    breaker.before_call()
    breaker.succeeded()
    assert not breaker.is_open and breaker.times_opened == 2


def test_large_objects_come_in_unzeroed_buffers_that_read_like_bytes(tmp_path):
    import torch

    from vllm_kvcdn.store.base import UNZEROED_FROM

    store = FileStore(tmp_path)
    big, small = os.urandom(UNZEROED_FROM + 3), b'{"a": 1}'
    store.put("chunks/big", big)
    store.put("manifests/small.json", small)
    got = store.get("chunks/big")
    assert isinstance(got, memoryview) and len(got) == len(big) and got == big and bytes(got[-3:]) == big[-3:]
    assert torch.frombuffer(got, dtype=torch.uint8)[0].item() == big[0]  # writable: a tensor views it
    assert isinstance(store.get("manifests/small.json"), bytearray)  # small objects: plain bytes, for json


def test_a_read_fills_the_callers_buffer_when_the_object_fits(tmp_path):
    """Loads reuse their read buffers (connector/read_buffers.py): a store given one reads
    into it and returns a view of it; an object that does not fit gets memory of its own.
    The disk tier does the same for a hit and for a miss read through to the origin."""
    from vllm_kvcdn.store.disk_cache import DiskCachedStore

    data = os.urandom(5000)
    origin = FileStore(tmp_path / "origin")
    origin.put("chunks/ab/x", data)
    tiered = DiskCachedStore(origin, tmp_path / "tier", capacity_bytes=1 << 20)
    for store in (origin, tiered, tiered):  # the tier: a miss (read through), then a hit
        into = memoryview(bytearray(8192))
        got = store.get("chunks/ab/x", into)
        assert got == data and got.obj is into.obj and bytes(into[: len(data)]) == data
        small = memoryview(bytearray(100))
        got = store.get("chunks/ab/x", small)
        assert got == data and bytes(small) == bytes(100)  # too small: left alone
    assert tiered.tier_counts() == {"disk_tier_hits": 3, "disk_tier_misses": 1}
