"""Tiny random-weight Hugging Face checkpoints written to disk for fidelity tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fuselm.bench.dummy_model import write_byte_tokenizer

VOCAB_SIZE = 300

TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama2-mha-untied": dict(
        arch="LlamaForCausalLM", num_key_value_heads=4, tie_word_embeddings=False,
        rope_theta=10000.0),
    "llama3-gqa-scaled": dict(
        arch="LlamaForCausalLM", num_key_value_heads=2, tie_word_embeddings=False,
        rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "llama-linear-tied": dict(
        arch="LlamaForCausalLM", num_key_value_heads=1, tie_word_embeddings=True,
        rope_theta=10000.0, rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "mistral-gqa": dict(arch="MistralForCausalLM", num_key_value_heads=2,
                        tie_word_embeddings=False, rope_theta=10000.0),
    "qwen2-gqa-tied-bias": dict(arch="Qwen2ForCausalLM", num_key_value_heads=2,
                                tie_word_embeddings=True, rope_theta=1000000.0),
    # sliding windows shorter than the test prompts (Qwen2: layer 0 full, layer 1 sliding)
    "mistral-sliding": dict(arch="MistralForCausalLM", num_key_value_heads=2,
                            tie_word_embeddings=False, rope_theta=10000.0, sliding_window=11),
    "qwen2-sliding": dict(arch="Qwen2ForCausalLM", num_key_value_heads=2,
                          tie_word_embeddings=False, rope_theta=1000000.0,
                          use_sliding_window=True, sliding_window=13, max_window_layers=1),
    "llama-mlp-bias": dict(arch="LlamaForCausalLM", num_key_value_heads=2,
                           tie_word_embeddings=False, rope_theta=10000.0, mlp_bias=True),
}


def make_tiny_checkpoint(name: str, path: Path, seed: int = 0) -> Path:
    """Saves a random tiny model of preset ``name`` with ``save_pretrained``; returns its dir."""
    import transformers

    spec = dict(TINY_CONFIGS[name])
    arch = spec.pop("arch")
    config_cls = {"LlamaForCausalLM": transformers.LlamaConfig,
                  "MistralForCausalLM": transformers.MistralConfig,
                  "Qwen2ForCausalLM": transformers.Qwen2Config}[arch]
    scaling = spec.pop("rope_scaling", None)
    theta = spec.pop("rope_theta")
    rope = {"rope_type": "default", "rope_theta": theta} if scaling is None else \
        {**scaling, "rope_theta": theta}
    config = config_cls(
        vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-5,
        rope_parameters=rope, bos_token_id=256, eos_token_id=257, **spec)
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(config).float().eval()
    with torch.no_grad():  # larger weights than the init's 0.02, so logits spread out
        for pname, param in model.named_parameters():
            if "norm" not in pname:
                std = 1.0 if "lm_head" in pname else 0.15
                param.normal_(0.0, std)
            if pname.endswith("bias"):
                param.normal_(0.0, 0.1)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    write_byte_tokenizer(path)
    return path


def tiny_with_hf(name: str, path: Path) -> tuple[Path, Any]:
    """A tiny checkpoint of preset ``name`` under ``path`` and transformers' float32 model of
    it (eval mode): the pair the engine-fidelity tests compare."""
    import transformers

    ckpt = make_tiny_checkpoint(name, path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt, torch_dtype=torch.float32)
    return ckpt, hf.eval()


def random_prompts(seed: int, lengths: list[int], shared_len: int,
                   shared_tails: list[int]) -> list[list[int]]:
    """Prompts of ``lengths`` random tokens, then prompts of a common ``shared_len``-token
    prefix followed by ``shared_tails`` random tokens (prefix-cache hits)."""
    gen = torch.Generator().manual_seed(seed)
    shared = torch.randint(0, 256, (shared_len,), generator=gen).tolist()
    distinct = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in lengths]
    return distinct + [shared + torch.randint(0, 256, (n,), generator=gen).tolist()
                       for n in shared_tails]
