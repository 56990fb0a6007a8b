"""The node's block-image files: RAM-tier slots kept on disk, verified on every read."""

import os
import time

import torch

from vllm_kvcdn.connector.image_tier import BlockImageFiles, layout_id


def slot(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 4, 2, 16, 8, generator=g).to(torch.bfloat16)  # layers x blocks x ...


def test_an_image_round_trips_and_survives_a_restart(tmp_path):
    images = BlockImageFiles(tmp_path, 1 << 20)
    src = slot(0)
    images.write("ab" * 16, src, blocks=3)
    assert images.blocks("ab" * 16) == 3 and images.blocks("cd" * 16) == 0
    restarted = BlockImageFiles(tmp_path, 1 << 20)
    dst = torch.zeros_like(src)
    assert restarted.read_into("ab" * 16, dst) == 3
    assert torch.equal(dst[:, :3].view(torch.int16), src[:, :3].view(torch.int16))  # bit for bit
    assert not dst[:, 3:].any()  # the slot's fourth block was not part of the image
    assert (tmp_path / "ab").is_dir() and next((tmp_path / "ab").glob("*.img")).stat().st_size \
        == 3 * 3 * src[0, 0].nbytes + 92  # layers x held blocks, and the 92-byte header


def test_an_image_reads_straight_into_scattered_blocks(tmp_path):
    """On CPU a load reads an image straight into the request's blocks of the paged cache
    (``BlockTier.read_image``): the payload lands in any list of views, layer after layer."""
    images = BlockImageFiles(tmp_path, 1 << 20)
    src = slot(5)
    images.write("ef" * 16, src, blocks=2)
    cache = [torch.zeros(9, *src.shape[2:], dtype=src.dtype) for _ in range(3)]  # 3 layers, 9 blocks
    ids = [7, 2]  # no run: two views per layer
    views = [memoryview(c[i].view(torch.uint8).view(-1).numpy()) for c in cache for i in ids]
    assert images.read("ef" * 16, views)
    for layer, c in enumerate(cache):
        assert torch.equal(c[ids].view(torch.int16), src[layer, :2].view(torch.int16))
    short = views[:-1]  # a reader expecting other bytes than the header states: refused, dropped
    assert not images.read("ef" * 16, short) and images.blocks("ef" * 16) == 0 and images.damaged == 1


def test_a_damaged_image_is_dropped_and_reads_as_none(tmp_path):
    images = BlockImageFiles(tmp_path, 1 << 20)
    for key, seed in (("a1" * 16, 1), ("b2" * 16, 2), ("c3" * 16, 3)):
        images.write(key, slot(seed), blocks=4)
    flipped, cut, gone = (next(tmp_path.glob(f"*/{k * 16}.*.img")) for k in ("a1", "b2", "c3"))
    data = bytearray(flipped.read_bytes())
    data[-1] ^= 1
    flipped.write_bytes(bytes(data))
    cut.write_bytes(cut.read_bytes()[:100])
    gone.unlink()
    dst = torch.zeros_like(slot(0))
    for key in ("a1" * 16, "b2" * 16, "c3" * 16):
        assert images.read_into(key, dst) == 0
        assert images.blocks(key) == 0  # forgotten
    assert images.damaged == 2 and not list(tmp_path.glob("*/*.img"))


def test_the_tier_stays_within_its_bound_least_recently_used_out(tmp_path):
    one = slot(0).numel() * 2 + 128  # payload + header
    images = BlockImageFiles(tmp_path, 2 * one)
    images.write("a" * 32, slot(1), 4)
    images.write("b" * 32, slot(2), 4)
    assert images.read_into("a" * 32, torch.zeros_like(slot(0))) == 4  # a is now the most recent
    images.write("c" * 32, slot(3), 4)
    assert (images.blocks("a" * 32), images.blocks("b" * 32), images.blocks("c" * 32)) == (4, 0, 4)
    assert sum(p.stat().st_size for p in tmp_path.glob("*/*.img")) <= 2 * one
    # The order survives a restart (mtimes): a fourth image evicts the oldest, "a" now.
    old = time.time() - 60
    os.utime(next(tmp_path.glob(f"*/{'a' * 32}.*.img")), (old, old))
    restarted = BlockImageFiles(tmp_path, 2 * one)
    restarted.write("d" * 32, slot(4), 4)
    assert restarted.blocks("a" * 32) == 0 and restarted.blocks("c" * 32) == 4


def test_layouts_get_directories_of_their_own():
    base = {"fingerprint": "f", "layout": "CpuAttnLayout", "isa": "vec", "shape": [8, 16, 256],
            "dtype": "torch.bfloat16", "layers": 28, "chunk_size": 256, "rank": 0}
    assert layout_id(**base) == layout_id(**dict(base))
    assert len({layout_id(**{**base, k: v}) for k, v in [("isa", "amx"), ("rank", 1), ("dtype", "torch.float16"),
                                                        ("fingerprint", "g")]} | {layout_id(**base)}) == 5


def test_an_image_of_another_chunk_under_this_name_is_refused(tmp_path):
    """A file name is no proof: a valid image of chunk B renamed to chunk A's name (a
    swap on the node's disk) fails the key check and is dropped, never loaded as A."""
    images = BlockImageFiles(tmp_path, 1 << 20)
    a, b = "a1" * 32, "b2" * 32
    images.write(a, slot(1), blocks=4)
    images.write(b, slot(2), blocks=4)
    path_a, path_b = (next(tmp_path.glob(f"*/{k}.4.img")) for k in (a, b))
    path_a.write_bytes(path_b.read_bytes())  # B's bytes, A's name
    restarted = BlockImageFiles(tmp_path, 1 << 20)
    assert restarted.blocks(a) == 4  # listed by its name...
    dst = torch.zeros_like(slot(0))
    assert restarted.read_into(a, dst) == 0  # ...but not loaded
    assert restarted.damaged == 1 and restarted.blocks(a) == 0 and not path_a.exists()
    assert restarted.read_into(b, dst) == 4 and torch.equal(dst.view(torch.int16), slot(2).view(torch.int16))
