"""A tiny random Llama whose layer widths take int4 groups of 128 on one and on two TP ranks
(hidden 256, 4 heads of 64, 2 KV heads, MLP 512), written with ``save_pretrained``."""

from __future__ import annotations

from pathlib import Path

import torch

from fuselm.bench.dummy_model import write_byte_tokenizer

VOCAB_SIZE = 300


def make_quant_checkpoint(path: Path, seed: int = 0, tied: bool = False) -> Path:
    """Saves the model (float32) and a byte tokenizer into ``path``; returns it."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=256,
        rms_norm_eps=1e-5, tie_word_embeddings=tied, bos_token_id=256, eos_token_id=257)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).float().eval()
    with torch.no_grad():  # weights large enough that the logits spread out
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.normal_(0.0, 0.5 if "lm_head" in name else 0.08)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    write_byte_tokenizer(path)
    return path
