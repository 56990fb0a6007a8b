"""The s3:// store against a real S3 server on loopback (moto's, tests/rigs/s3.py), with faults
injected at the HTTP boundary by a proxy: nothing on the client side is stubbed."""

from __future__ import annotations

import os
import time

import pytest

from vllm_kvcdn.store import StoreError, open_store
from vllm_kvcdn.store.breaker import CircuitOpen


def s3_store(bucket: str, endpoint: str, prefix: str = "kv", **options):
    query = "&".join(f"{k}={v}" for k, v in {"endpoint_url": endpoint, **options}.items())
    return open_store(f"s3://{bucket}/{prefix}?{query}")


@pytest.fixture
def bucket(s3) -> str:
    return s3.new_bucket()


def test_objects_round_trip_and_a_missing_one_is_a_miss(s3, bucket):
    store = s3_store(bucket, s3.endpoint)
    assert store.get("chunks/ab/x.safetensors") is None and not store.contains("chunks/ab/x.safetensors")
    store.put("chunks/ab/x.safetensors", b"hello")
    store.put("manifests/a.json", b"{}")
    data = store.get("chunks/ab/x.safetensors")
    assert bytes(data) == b"hello" and isinstance(data, bytearray)  # writable: tensors view it
    assert store.size("chunks/ab/x.safetensors") == 5
    assert sorted(store.list()) == ["chunks/ab/x.safetensors", "manifests/a.json"]
    assert [i.key for i in store.scan("manifests/")] == ["manifests/a.json"]
    assert store.delete("manifests/a.json") and not store.delete("manifests/a.json")
    assert store.get("manifests/a.json") is None
    # The prefix is the store's own space in the bucket.
    assert list(s3_store(bucket, s3.endpoint, prefix="other").list()) == []
    assert s3.client().head_object(Bucket=bucket, Key="kv/chunks/ab/x.safetensors")["ContentLength"] == 5


def test_large_objects_are_read_in_parallel_ranged_parts(s3, bucket, s3_proxy):
    data = os.urandom(3 * 2**20 + 12345)
    s3_store(bucket, s3.endpoint).put("chunks/aa/big.safetensors", data)
    store = s3_store(bucket, s3_proxy.endpoint, part_mib=1)
    assert store.get("chunks/aa/big.safetensors") == data
    gets = [p for m, p in s3_proxy.requests if m == "GET"]
    assert len(gets) == 4  # 1 MiB parts: the first tells the size, three more in parallel
    into = memoryview(bytearray(len(data) + 10))
    got = store.get("chunks/aa/big.safetensors", into)  # every part into the caller's buffer
    assert got == data and got.obj is into.obj and bytes(into[: len(data)]) == data


def test_connections_are_kept_between_gets(s3, bucket, s3_proxy):
    """A body read to its end into our buffer leaves the connection to the next GET: a
    TCP (on AWS, TLS) handshake per chunk would cost more than the read."""
    data = os.urandom(2**20 + 7)
    s3_store(bucket, s3.endpoint).put("chunks/aa/d.safetensors", data)
    store = s3_store(bucket, s3_proxy.endpoint, part_mib=4)
    for _ in range(3):
        assert store.get("chunks/aa/d.safetensors") == data
    assert len(s3_proxy.client_ports) == 3 and len(set(s3_proxy.client_ports)) == 1


def test_put_if_absent_keeps_the_first_writer(s3, bucket):
    store = s3_store(bucket, s3.endpoint)
    assert store.put_if_absent("chunks/ab/k.safetensors", b"first")
    assert not store.put_if_absent("chunks/ab/k.safetensors", b"second")
    assert bytes(store.get("chunks/ab/k.safetensors")) == b"first"


def test_throttling_and_server_errors_are_retried(s3, bucket, s3_proxy):
    s3_store(bucket, s3.endpoint).put("manifests/a.json", b"{}")
    store = s3_store(bucket, s3_proxy.endpoint)
    s3_proxy.inject("status", 503, times=2, method="GET")  # SlowDown twice, then served
    assert bytes(store.get("manifests/a.json")) == b"{}"
    s3_proxy.inject("status", 500, times=1, method="PUT")
    store.put("manifests/b.json", b"[]")
    assert s3_proxy.faulted == 3 and not store.breaker.is_open


def test_a_body_cut_mid_read_is_resumed(s3, bucket, s3_proxy):
    data = os.urandom(2 * 2**20)
    s3_store(bucket, s3.endpoint).put("chunks/aa/c.safetensors", data)
    store = s3_store(bucket, s3_proxy.endpoint, part_mib=4)
    s3_proxy.inject("reset", 100_000, times=1, method="GET")
    assert store.get("chunks/aa/c.safetensors") == data
    ranges = [p for m, p in s3_proxy.requests if m == "GET"]
    assert len(ranges) == 2 and s3_proxy.faulted == 1


def test_an_outage_opens_the_breaker_and_costs_a_bounded_delay(s3, bucket, s3_proxy):
    s3_store(bucket, s3.endpoint).put("manifests/a.json", b"{}")
    store = s3_store(bucket, s3_proxy.endpoint, attempts=2, breaker_failures=3, breaker_cooldown_s=1)
    s3_proxy.inject("status", 500, times=10_000)  # a 500 storm
    for _ in range(3):
        with pytest.raises(StoreError):
            store.get("manifests/a.json")
    assert store.breaker.is_open
    seen = len(s3_proxy.requests)
    started = time.monotonic()
    with pytest.raises(CircuitOpen):
        store.get("manifests/a.json")
    assert time.monotonic() - started < 0.1 and len(s3_proxy.requests) == seen  # not even asked
    s3_proxy.clear()
    time.sleep(1.1)  # the cooldown: one trial call goes through, and closes the breaker
    assert bytes(store.get("manifests/a.json")) == b"{}" and not store.breaker.is_open


def test_a_hung_server_times_out(s3, bucket, s3_proxy):
    s3_store(bucket, s3.endpoint).put("manifests/a.json", b"{}")
    store = s3_store(bucket, s3_proxy.endpoint, attempts=1, read_timeout_s=0.5)
    s3_proxy.inject("delay", 3, method="GET")
    started = time.monotonic()
    with pytest.raises(StoreError):
        store.get("manifests/a.json")
    assert time.monotonic() - started < 2.5


def test_a_missing_bucket_is_an_error_that_says_so(s3):
    store = s3_store("no-such-bucket-kvcdn", s3.endpoint)
    with pytest.raises(StoreError, match="does not exist"):
        store.get("manifests/a.json")


def test_url_options_are_checked():
    with pytest.raises(ValueError, match="unknown s3:// URL option"):
        open_store("s3://b/p?endpont_url=http://x")
    with pytest.raises(ValueError, match="without a bucket"):
        open_store("s3:///p")
