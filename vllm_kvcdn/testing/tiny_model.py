"""Write Qwen3-architecture models with seeded random weights and a locally trained tokenizer.

No model hub is needed: ``tiny`` is the test and demo model (a few MB, loads in
seconds); ``qwen3-0.6b`` and ``qwen3-4b`` have the real models' layer, head and
dimension sizes, so their prefill compute and KV bytes per token are the real ones.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

SHAPES = {
    "tiny": dict(
        hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, tie_word_embeddings=True, max_position_embeddings=4096,
    ),
    # One KV head for four query heads: under tensor parallelism every rank replicates it.
    "tiny-mqa": dict(
        hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=1, head_dim=64, tie_word_embeddings=True, max_position_embeddings=4096,
    ),
    "qwen3-0.6b": dict(
        hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, tie_word_embeddings=True, max_position_embeddings=40960,
    ),
    # Qwen3-0.6B's KV geometry (bytes per token) at a fraction of its compute: for
    # benchmarks of store I/O on a CPU where the real shape prefills ~20 tokens/s.
    "kv-0.6b": dict(
        hidden_size=256, intermediate_size=512, num_hidden_layers=28, num_attention_heads=8,
        num_key_value_heads=8, head_dim=128, tie_word_embeddings=True, max_position_embeddings=40960,
    ),
    "qwen3-4b": dict(
        hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, tie_word_embeddings=True, max_position_embeddings=40960,
    ),
}
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Weight scale of the tiny model: large enough that greedy output depends on the prompt
# (at the usual 0.02 a random model repeats one token whatever it is asked).
TINY_INIT_STD = 0.25


def corpus() -> list[str]:
    """A deterministic English-like corpus to train the byte-level BPE on."""
    words = (
        "the a document agent cache prefill token model reads writes layer key value store "
        "publish load serve question answer fast exact chunk block engine request server "
        "paper table cost market price compute memory disk network bytes time first latency "
        "alpha beta gamma delta river mountain city music garden winter summer light stone "
        "is are was were will can may should must and or but if then because while of to in on"
    ).split()
    lines, x = [], 12345
    for _ in range(4000):
        n = 6 + x % 10
        line = []
        for _ in range(n):
            x = (x * 1103515245 + 12345) % (1 << 31)
            line.append(words[x % len(words)])
        lines.append(" ".join(line).capitalize() + ".")
    return lines


def build_tokenizer(out: Path, vocab_size: int = 2048) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": None,
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
                "unk_token": None,
                "model_max_length": 40960,
                "chat_template": CHAT_TEMPLATE,
                "clean_up_tokenization_spaces": False,
            },
            indent=1,
        )
    )
    return tok.get_vocab_size()


def make_model(out_dir: str | os.PathLike, shape: str = "tiny", seed: int = 0, dtype: str = "bfloat16") -> Path:
    """Write config, seeded weights (safetensors) and tokenizer into ``out_dir``."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose one of {sorted(SHAPES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = build_tokenizer(out)
    small = shape in ("tiny", "tiny-mqa", "kv-0.6b")
    vocab_size = vocab if small else 151936  # real embedding size for the big shapes
    config = Qwen3Config(
        vocab_size=vocab_size, rms_norm_eps=1e-6, rope_theta=1_000_000.0, eos_token_id=2,
        bos_token_id=None, pad_token_id=0, dtype=dtype, **SHAPES[shape],
    )
    config.architectures = ["Qwen3ForCausalLM"]
    std = TINY_INIT_STD if small else 0.02
    _write_weights(out, Qwen3ForCausalLM, config, std=std, seed=seed, dtype=dtype, norm=1.0)
    return out


def make_hybrid_model(out_dir: str | os.PathLike, seed: int = 0, dtype: str = "bfloat16") -> Path:
    """A tiny Gemma 3 text model whose layers alternate sliding-window (128 tokens) and
    full attention: the hybrid KV-cache case (gpt-oss, Gemma 3) on this CPU."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = build_tokenizer(out)
    dims = {k: v for k, v in SHAPES["tiny"].items() if k != "tie_word_embeddings"}
    config = Gemma3TextConfig(
        vocab_size=vocab, sliding_window=128, eos_token_id=2, bos_token_id=None, pad_token_id=0, dtype=dtype,
        layer_types=["sliding_attention", "full_attention"] * (dims["num_hidden_layers"] // 2), **dims,
    )
    config.architectures = ["Gemma3ForCausalLM"]
    # Gemma scales embeddings by sqrt(hidden) and norms by (1 + w): smaller weights than
    # the Qwen3 model's keep its output spread over many tokens.
    _write_weights(out, Gemma3ForCausalLM, config, std=0.1, seed=seed, dtype=dtype, norm=0.0)
    return out


def _write_weights(out: Path, model_class, config, *, std: float, seed: int, dtype: str, norm: float) -> None:
    """Save ``config`` and seeded normal weights (norms set to ``norm``), in shards of
    at most 2 GiB."""
    import torch
    from safetensors.torch import save_file

    config.save_pretrained(out)
    with torch.device("meta"):
        skeleton = model_class(config)
    gen = torch.Generator().manual_seed(seed)
    torch_dtype = getattr(torch, dtype)
    shard: dict[str, torch.Tensor] = {}
    shard_bytes, shards, weight_map = 0, [], {}
    names = [n for n, _ in skeleton.named_parameters()]
    for name, param in skeleton.named_parameters():
        if name.endswith("norm.weight"):
            t = torch.full(param.shape, norm)
        else:
            t = torch.randn(param.shape, generator=gen) * std
        shard[name] = t.to(torch_dtype)
        shard_bytes += shard[name].numel() * shard[name].element_size()
        if shard_bytes > 2 << 30 or name == names[-1]:
            shards.append(shard)
            shard, shard_bytes = {}, 0
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        for i, s in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(s, str(out / fname), metadata={"format": "pt"})
            weight_map.update({n: fname for n in s})
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1)
        )
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": 2, "do_sample": False}))


def make_lora_adapter(out_dir: str | os.PathLike, seed: int, rank: int = 8, scale: float = 0.05) -> Path:
    """A PEFT-format LoRA adapter for the ``tiny`` model with seeded random A and B on
    every attention projection (q, k, v, o), so it changes the KV of every layer."""
    import torch
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dims = SHAPES["tiny"]
    hidden, q_out = dims["hidden_size"], dims["num_attention_heads"] * dims["head_dim"]
    kv_out = dims["num_key_value_heads"] * dims["head_dim"]
    shapes = {"q_proj": (hidden, q_out), "k_proj": (hidden, kv_out), "v_proj": (hidden, kv_out),
              "o_proj": (q_out, hidden)}
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for layer in range(dims["num_hidden_layers"]):
        for module, (fan_in, fan_out) in shapes.items():
            name = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            weights[f"{name}.lora_A.weight"] = (torch.randn(rank, fan_in, generator=gen) * scale).to(torch.bfloat16)
            weights[f"{name}.lora_B.weight"] = (torch.randn(fan_out, rank, generator=gen) * scale).to(torch.bfloat16)
    save_file(weights, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0,
        "target_modules": sorted(shapes), "bias": "none", "fan_in_fan_out": False, "base_model_name_or_path": "tiny",
    }, indent=1))
    return out
