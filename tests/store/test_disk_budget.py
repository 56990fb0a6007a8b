"""One disk budget for a node's two disk tiers: chunks read through from the shared store
(``store.disk_cache``) and the worker's block images (``connector.image_tier``) count
against one ``disk_cache_gib``, least recently used first out across both, the order
kept across a restart."""

import os
import time

import torch

from vllm_kvcdn.connector.image_tier import BlockImageFiles
from vllm_kvcdn.store.disk_cache import DiskCachedStore
from vllm_kvcdn.store.file import FileStore
from vllm_kvcdn.store.lru import DiskLRU

CHUNK_BYTES = 10_000


def _slot(seed: int) -> torch.Tensor:
    return torch.full((2, 4, 1250), seed, dtype=torch.bfloat16)  # 20,000 bytes


def _disk_bytes(*roots) -> int:
    return sum(p.stat().st_size for root in roots for p in root.rglob("*") if p.is_file())


def test_both_tiers_share_one_budget_and_evict_each_other(tmp_path):
    origin = FileStore(tmp_path / "origin")
    for i in range(3):
        origin.put(f"chunks/0{i}/c{i}", os.urandom(CHUNK_BYTES))
    budget = DiskLRU(50_000)
    chunks = DiskCachedStore(origin, tmp_path / "tier", budget=budget)
    images = BlockImageFiles(tmp_path / "images", budget=budget)
    for i in range(3):
        assert chunks.get(f"chunks/0{i}/c{i}") is not None  # read through: 30,000 bytes kept
    assert budget.nbytes == 3 * CHUNK_BYTES
    chunks.get("chunks/00/c0")  # c0 is now the most recent chunk
    images.write("a" * 32, _slot(1), blocks=4)  # 20,000 + header: c1 and c2 (least recent) go
    assert budget.nbytes <= budget.capacity_bytes
    assert _disk_bytes(tmp_path / "tier", tmp_path / "images") <= budget.capacity_bytes
    assert "disk:chunks/00/c0" in budget and "disk:chunks/01/c1" not in budget
    assert images.blocks("a" * 32) == 4
    images.write("b" * 32, _slot(2), blocks=4)  # now c0, then image a, are the oldest
    assert "disk:chunks/00/c0" not in budget and images.blocks("b" * 32) == 4
    assert _disk_bytes(tmp_path / "tier", tmp_path / "images") <= budget.capacity_bytes


def test_the_order_across_tiers_survives_a_restart(tmp_path):
    origin = FileStore(tmp_path / "origin")
    origin.put("chunks/00/old", os.urandom(CHUNK_BYTES))
    budget = DiskLRU(45_000)
    DiskCachedStore(origin, tmp_path / "tier", budget=budget).get("chunks/00/old")
    BlockImageFiles(tmp_path / "images", budget=budget).write("a" * 32, _slot(1), blocks=4)
    old = time.time() - 60
    os.utime(next((tmp_path / "images").rglob("*.img")), (old - 60, old - 60))  # the image is older
    os.utime(next((tmp_path / "tier").rglob("old")), (old, old))
    restarted = DiskLRU(45_000)
    chunks = DiskCachedStore(origin, tmp_path / "tier", budget=restarted)
    images = BlockImageFiles(tmp_path / "images", budget=restarted)
    assert restarted.nbytes == budget.nbytes
    images.write("b" * 32, _slot(2), blocks=4)  # over budget: the oldest file of either tier goes
    assert images.blocks("a" * 32) == 0 and "disk:chunks/00/old" in restarted
    assert chunks.get("chunks/00/old") is not None and chunks.tier_counts()["disk_tier_hits"] == 1


def test_a_publishing_node_keeps_the_chunks_it_writes_in_its_disk_tier(tmp_path):
    """A publish writes chunks with ``put_if_absent``: they stay on the node's disk too, so
    after a restart it reads them (a tail chunk above all: its blocks have no image) without
    going to the shared store; manifests always go to the store."""
    origin = FileStore(tmp_path / "origin")
    node = DiskCachedStore(origin, tmp_path / "disk", 1 << 20)
    assert node.put_if_absent("chunks/ab/k.safetensors", b"x" * 10)
    assert not node.put_if_absent("chunks/ab/k.safetensors", b"y" * 10)  # the first writer's stays
    assert node.put_if_absent("manifests/m.json", b"{}")
    restarted = DiskCachedStore(origin, tmp_path / "disk", 1 << 20)
    assert bytes(restarted.get("chunks/ab/k.safetensors")) == b"x" * 10
    assert restarted.tier_counts() == {"disk_tier_hits": 1, "disk_tier_misses": 0}
    assert bytes(restarted.get("manifests/m.json")) == b"{}" and not list((tmp_path / "disk").rglob("*.json"))
