"""Batched generation equals one-at-a-time generation on the default model."""

from __future__ import annotations

import pytest

from fuselm import SamplingParams

PROMPTS = [
    "Hi", "What is 2 + 2?", "Name a color.",
    "Tell me something about the ocean and the creatures living in it.",
    "Translate 'cat' to French.", "Why is the sky blue? Answer briefly, please.",
    "List three fruits.", "Who wrote Hamlet?",
]


@pytest.fixture(scope="module")
def step_sizes(default_llm):
    """Records how many sequences each engine step ran."""
    executor = default_llm.engine.executor
    sizes: list[int] = []
    original = executor.execute

    def recording(out, follows=None):
        sizes.append(len(out.sequences))
        return original(out, follows)

    executor.execute = recording
    yield sizes
    del executor.execute


def _chat(llm, texts):
    return [llm.tokenizer.apply_chat_template([{"role": "user", "content": t}]) for t in texts]


def test_batched_greedy_equals_alone(default_llm, step_sizes):
    prompts = _chat(default_llm, PROMPTS)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    step_sizes.clear()
    batched = default_llm.generate(prompts, params)
    assert max(step_sizes) == len(PROMPTS), "the batch did not hold every sequence at once"
    for prompt, out in zip(prompts, batched, strict=True):
        alone = default_llm.generate([prompt], params)[0]
        assert out.outputs[0].token_ids == alone.outputs[0].token_ids


def test_seeded_request_same_alone_and_in_batch(default_llm, step_sizes):
    prompts = _chat(default_llm, PROMPTS)
    seeded = SamplingParams(temperature=0.9, top_p=0.95, seed=1234, max_tokens=12,
                            ignore_eos=True)
    others = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)
    alone = default_llm.generate([prompts[3]], seeded)[0].outputs[0].token_ids
    step_sizes.clear()
    params = [others] * len(prompts)
    params[3] = seeded
    batched = default_llm.generate(prompts, params)[3].outputs[0].token_ids
    assert max(step_sizes) == len(PROMPTS)
    assert batched == alone


def test_n_sequences_and_stop_strings(default_llm):
    prompt = _chat(default_llm, ["Count from 1 to 20, separated by commas."])[0]
    params = SamplingParams(temperature=0.8, n=3, seed=7, max_tokens=24, stop=["5"])
    out = default_llm.generate([prompt], params)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    for c in out.outputs:
        assert "5" not in c.text
        assert c.finish_reason in ("stop", "length")
