"""Chunk keys: pinned values, partial tails, and isolation by fingerprint and salt."""

from vllm_kvcdn.artifact.chain import chain_seed, chunk_key, document_chunks, iter_chunks


def test_keys_are_pinned():
    # If these change, every published artifact becomes unreachable: bump CHAIN_VERSION.
    seed = chain_seed("f" * 32, None)
    assert seed == "78bb1e192a068d41347fb9f08bf6d0d1014089240557dec9d2c94923a89c0d13"
    assert chunk_key(seed, [1, 2, 3]) == "ffee5d77d88b4100cb9d3025040fb05bd42a9bdabe10a04fe3346b8b02c8718b"


def test_document_chunks_cover_all_tokens_with_a_partial_tail():
    spans = document_chunks(list(range(700)), "fp", None, 256)
    assert [(s.start, s.num_tokens) for s in spans] == [(0, 256), (256, 256), (512, 188)]
    assert spans[1].parent == spans[0].key and spans[2].parent == spans[1].key


def test_a_key_names_the_whole_prefix_not_just_its_chunk():
    a = document_chunks([1] * 256 + [2] * 256, "fp", None, 256)
    b = document_chunks([3] * 256 + [2] * 256, "fp", None, 256)
    assert a[1].key != b[1].key  # same chunk tokens, different prefix


def test_fingerprint_and_salt_separate_keys():
    tokens = list(range(300))
    base = document_chunks(tokens, "fp", None, 256)
    assert document_chunks(tokens, "fp2", None, 256)[0].key != base[0].key
    assert document_chunks(tokens, "fp", "tenant", 256)[0].key != base[0].key
    assert document_chunks(tokens, "fp", "", 256)[0].key == base[0].key  # empty salt = none


def test_full_only_walk_stops_before_the_tail():
    spans = list(iter_chunks(list(range(700)), chain_seed("fp", None), 256, include_partial=False))
    assert len(spans) == 2
