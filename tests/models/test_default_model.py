"""The default GGUF model: fuselm's greedy output equals transformers' from the same file."""

from __future__ import annotations

import torch

from fuselm import SamplingParams

CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that reverses a string.",
    "Give me three tips for sleeping better.",
]


@torch.inference_mode()
def _hf_greedy(hf, ids: list[int], num_tokens: int) -> list[int]:
    """Greedy decoding with transformers' KV cache, never stopping at EOS."""
    out = hf(torch.tensor([ids]), use_cache=True)
    generated = []
    for _ in range(num_tokens):
        token = int(out.logits[0, -1].argmax())
        generated.append(token)
        out = hf(torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
    return generated


def test_greedy_64_tokens_equal_transformers(default_llm, hf_default_model):
    """Three chat prompts, batched in fuselm, each equal to transformers alone."""
    tok = default_llm.tokenizer
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}]) for p in CHAT_PROMPTS]
    params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    outs = default_llm.generate(prompts, params)
    for prompt, out in zip(prompts, outs, strict=True):
        want = _hf_greedy(hf_default_model, tok.encode(prompt), 64)
        assert out.outputs[0].token_ids == want, (prompt, out.outputs[0].text)


def test_capital_of_france_answer(default_llm):
    """A sensible answer, as the README's first command shows."""
    out = default_llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                           SamplingParams(temperature=0.0, max_tokens=32))
    assert "Paris" in out[0].outputs[0].text


def test_default_model_is_smollm2(default_llm):
    """The default model is SmolLM2-135M-Instruct: 30 layers, hidden 576, tied embeddings."""
    cfg = default_llm.model_config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.tie_word_embeddings) == (30, 576, True)
