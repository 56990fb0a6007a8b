"""The node's block-image tier under real engines: a restart loads the images bit for bit."""

from vllm_kvcdn.testing.exactness import identical


def test_a_restarted_node_loads_block_images_bit_for_bit(tmp_path, run_engine, tiny_model, tokenizer):
    """Real engines, one after another on one node disk: the first reads the document's
    chunks (and keeps their block images); a restart loads the images, with the same bits
    in the KV cache and the same answer; a damaged image is dropped, counted, and the
    chunk read instead, still the same answer. The node that published the document kept
    its blocks at publish time: it serves them from RAM at once and, restarted, reads their
    images and the tail file from its disk: no chunk object is read after a restart."""
    from vllm_kvcdn.testing.tiny_model import corpus

    doc = tokenizer(" ".join(corpus()[2400:2600])).input_ids[:700]  # 2 chunks; a tail: 1 whole block, 1 part
    prompt = doc + tokenizer(" Q: what was in the box? A:").input_ids
    store, disk = tmp_path / "store", tmp_path / "node-disk"

    def node(disk):
        return {"model": str(tiny_model), "store_url": f"file://{store}", "prefix_caching": False,
                "extra_config": {"disk_cache_gib": 1, "disk_cache_dir": str(disk)}}

    publisher, node = node(tmp_path / "publisher-disk"), node(disk)
    ask = [{"name": "q", "op": "query", "ids": prompt, "max_tokens": 8},
           {"name": "kv", "op": "kv_blocks", "of": "load", "tokens": len(doc)}]
    at_publish = run_engine({**publisher, "ops": [{"name": "pub", "op": "publish", "ids": doc},
                                                  {"name": "q", "op": "query", "ids": prompt, "max_tokens": 8}]})
    published = run_engine({**publisher, "ops": ask})
    first = run_engine({**node, "ops": ask})
    images = list((disk / "images").glob("*/*/*.img"))
    # Two whole chunks and the tail chunk's whole block, and its partial block as a tail file.
    assert len(doc) == 700 and sorted(p.name.split(".")[1] for p in images) == ["1", "2", "2"]
    assert [p.name.split(".")[1] for p in (disk / "images").glob("*/*/*.tail")] == [str(700 % 128)]
    restarted = run_engine({**node, "ops": ask})
    whole_chunk = next(p for p in images if p.name.endswith(".2.img"))
    data = bytearray(whole_chunk.read_bytes())
    data[-1] ^= 1
    whole_chunk.write_bytes(bytes(data))
    damaged = run_engine({**node, "ops": ask})

    def counter(run, name):
        return run["q"]["counters"].get(f"vllm:kvcdn_{name}", 0)

    assert counter(first, "image_tier_hits") == 0 and counter(first, "loaded_tokens") == len(doc)
    for run in (restarted, published):  # every chunk from the node's disk: nothing read from the store
        assert (counter(run, "image_tier_hits"), counter(run, "image_tier_tail_hits")) == (3, 1)
        assert counter(run, "loaded_tokens") == len(doc) and not counter(run, "store_read_bytes")
    assert (counter(damaged, "image_tier_hits"), counter(damaged, "image_tier_misses")) == (2, 1)
    assert counter(damaged, "loaded_tokens") == len(doc)
    # The publishing engine serves it hot at once: every block and the tail from RAM, nothing read.
    assert (counter(at_publish, "ram_tier_hits"), counter(at_publish, "ram_tier_tail_hits")) == (3, 1)
    assert counter(at_publish, "loaded_tokens") == len(doc) and not counter(at_publish, "store_read_bytes")
    assert identical(at_publish["q"]["answer"], first["q"]["answer"])
    for run in (restarted, damaged, published):
        assert run["kv"] == first["kv"]  # digests of the bytes in the KV cache
        assert identical(run["q"]["answer"], first["q"]["answer"])
