"""Prompt logprobs (``SamplingParams.prompt_logprobs``) on a tiny random model equal the log-softmax
of transformers' logits at every prompt position, through chunked prefill, prefix caching,
preemption and n > 1; bad values and distributed engines are refused by name."""

from __future__ import annotations

import math

import pytest
import torch

from fuselm import LLM, SamplingParams
from fuselm.errors import InvalidRequestError
from tests.tiny_models import random_prompts, tiny_with_hf

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_with_hf("llama3-gqa-scaled", tmp_path_factory.mktemp("plp"))


@pytest.fixture(scope="module")
def prompts():
    """Lengths across block and chunk edges; the last two share a 40-token prefix."""
    return random_prompts(17, [1, 2, 37, 90], 40, [3, 11])


def _hf_logprobs(hf, prompt: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        logits = hf(torch.tensor([prompt])).logits[0].double()
    return torch.log_softmax(logits, dim=-1)


def _check(outs, hf, prompts, k: int) -> None:
    for out, prompt in zip(outs, prompts, strict=True):
        got = out.prompt_logprobs
        assert got is not None and len(got) == len(prompt) and got[0] is None
        ref = _hf_logprobs(hf, prompt)
        for pos in range(1, len(prompt)):
            entry = got[pos]
            want = ref[pos - 1]
            assert math.isclose(entry[prompt[pos]], float(want[prompt[pos]]), abs_tol=2e-4)
            top = want.topk(k).indices.tolist() if k else []
            assert set(entry) == set(top) | {prompt[pos]}
            for tid, lp in entry.items():
                assert math.isclose(lp, float(want[tid]), abs_tol=2e-4)


@pytest.mark.parametrize("k", [0, 3])
def test_prompt_logprobs_equal_hf_through_chunks_and_cache(tiny, prompts, k):
    path, hf = tiny
    llm = LLM(str(path), device="cpu", max_num_batched_tokens=24, enable_chunked_prefill=True,
              enable_prefix_caching=True, num_gpu_blocks=200, block_size=8)
    params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True, prompt_logprobs=k)
    llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=1))  # fills the cache
    outs = llm.generate(prompts, params)
    stats = llm.engine.stats()
    assert stats["num_partial_prefills_total"] > 0
    _check(outs, hf, prompts, k)
    assert outs[-1].num_cached_tokens == 0  # computed, not read from the cache
    plain = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=2))
    assert all(o.prompt_logprobs is None for o in plain)
    assert [o.outputs[0].token_ids for o in plain] == [o.outputs[0].token_ids for o in outs]


def test_prompt_logprobs_survive_preemption_and_n(tiny, prompts):
    path, hf = tiny
    llm = LLM(str(path), device="cpu", num_gpu_blocks=14, block_size=8,
              max_num_batched_tokens=64, max_model_len=112)
    params = SamplingParams(temperature=1.0, seed=1, n=2, max_tokens=12, ignore_eos=True,
                            prompt_logprobs=1)
    outs = llm.generate(prompts, params)
    assert llm.engine.stats()["num_preemptions_total"] > 0
    _check(outs, hf, prompts, 1)


def test_bad_prompt_logprobs_refused(tiny):
    with pytest.raises(InvalidRequestError, match="prompt_logprobs") as err:
        SamplingParams(prompt_logprobs=-1)
    assert err.value.param == "prompt_logprobs"
    with pytest.raises(InvalidRequestError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=10**6)
