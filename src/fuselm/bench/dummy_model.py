"""Checkpoint directories of known model shapes, for runs with dummy (random) weights."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fuselm.planner_hardware import KNOWN_MODELS

KNOWN_SHAPES: dict[str, dict[str, Any]] = {
    # the planner's shapes of the Hub configs, with Llama 3's RoPE base
    "llama-3-8b": {**KNOWN_MODELS["Llama-3-8B"], "rope_theta": 500000.0},
    "llama-3-70b": {**KNOWN_MODELS["Llama-3-70B"], "rope_theta": 500000.0},
    "llama-tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                       num_attention_heads=8, num_key_value_heads=2, vocab_size=512,
                       rope_theta=10000.0, max_position_embeddings=4096),
}


def _filler_token(token_id: int) -> str:
    """A word of byte-level letters naming `token_id` (" w" + base-26), unique per id."""
    letters = ""
    while True:
        token_id, digit = divmod(token_id, 26)
        letters = chr(ord("a") + digit) + letters
        if token_id == 0:
            return "Ġw" + letters  # Ġ: the byte-level spelling of a space


def write_byte_tokenizer(path: Path, vocab_size: int | None = None) -> None:
    """A byte-level BPE tokenizer: 256 byte tokens, ``<s>`` (256), ``</s>`` (257), no merges.
    With `vocab_size`, ids 258 .. vocab_size-1 decode to words (`" wabc"`), so that a model with
    that vocabulary and random weights streams text (encoding still yields byte tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    vocab = {tok: i for i, tok in enumerate(sorted(ByteLevel.alphabet()))}
    vocab.update({"<s>": 256, "</s>": 257})
    for token_id in range(258, vocab_size or 0):
        vocab[_filler_token(token_id)] = token_id
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>"])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": False}))


def write_dummy_checkpoint(name: str, path: Path, **overrides: Any) -> Path:
    """A directory with config.json of shape ``name`` and a byte tokenizer covering its
    vocabulary (no weights: load it with ``load_format="dummy"``)."""
    if name not in KNOWN_SHAPES:
        raise ValueError(f"unknown shape {name!r}; known: {', '.join(KNOWN_SHAPES)}")
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
           "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "bos_token_id": 256,
           "eos_token_id": 257, **KNOWN_SHAPES[name], **overrides}
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg, indent=1))
    write_byte_tokenizer(path, cfg["vocab_size"])
    return path
