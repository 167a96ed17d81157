"""Engine features on a tiny random model: outputs equal transformers' greedy ones with chunked
prefill, prefix caching and preemption on or off; each test asserts its feature really ran."""

from __future__ import annotations

import pytest
import torch

from fuselm import LLM, SamplingParams
from tests.tiny_models import random_prompts, tiny_with_hf

transformers = pytest.importorskip("transformers")

NEW_TOKENS = 12


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_with_hf("llama3-gqa-scaled", tmp_path_factory.mktemp("engine"))


@pytest.fixture(scope="module")
def prompts():
    """Mixed lengths; the last six share a 40-token prefix (prefix-cache hits)."""
    return random_prompts(5, [3, 60, 17, 1, 33, 9], 40, [1, 5, 13, 20, 2, 8])


@pytest.fixture(scope="module")
def hf_greedy(tiny, prompts):
    _, hf = tiny
    outs = []
    with torch.inference_mode():
        for prompt in prompts:
            ids = list(prompt)
            for _ in range(NEW_TOKENS):
                logits = hf(torch.tensor([ids])).logits[0, -1]
                top2 = logits.topk(2).values
                assert top2[0] - top2[1] > 1e-3, "near-tie: pick other prompts"
                ids.append(int(logits.argmax()))
            outs.append(ids[len(prompt):])
    return outs


GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)


def _run(path, prompts, params=GREEDY, **kwargs):
    llm = LLM(str(path), device="cpu", **kwargs)
    outs = llm.generate(prompts, params)
    return [o.outputs[0].token_ids for o in outs], llm.engine.stats()


@pytest.mark.parametrize("chunked", [True, False])
@pytest.mark.parametrize("caching", [True, False])
def test_greedy_equals_hf(tiny, prompts, hf_greedy, chunked, caching):
    path, _ = tiny
    tokens, stats = _run(path, prompts, max_num_batched_tokens=64 if chunked else 256,
                         enable_chunked_prefill=chunked, enable_prefix_caching=caching,
                         num_gpu_blocks=200, block_size=8)
    assert tokens == hf_greedy
    assert stats["max_num_seqs_in_step"] > 1
    assert (stats["num_partial_prefills_total"] > 0) == chunked
    assert (stats["prefix_cache_hits_total"] > 0) == caching


def test_tiny_cache_preempts_with_identical_outputs(tiny, prompts, hf_greedy):
    path, _ = tiny
    tokens, stats = _run(path, prompts, num_gpu_blocks=12, block_size=8,
                         max_num_batched_tokens=64, max_model_len=96)
    assert stats["num_preemptions_total"] > 0
    assert tokens == hf_greedy
    seeded = SamplingParams(temperature=1.0, top_k=20, seed=3, max_tokens=NEW_TOKENS,
                            ignore_eos=True)
    small, small_stats = _run(path, prompts, seeded, num_gpu_blocks=12, block_size=8,
                              max_num_batched_tokens=64, max_model_len=96)
    large, _ = _run(path, prompts, seeded, num_gpu_blocks=400, block_size=8)
    assert small_stats["num_preemptions_total"] > 0
    assert small == large


def test_abort_frees_blocks_at_once(tiny, prompts):
    path, _ = tiny
    llm = LLM(str(path), device="cpu", num_gpu_blocks=100, block_size=8)
    engine = llm.engine
    for i, prompt in enumerate(prompts[:4]):
        engine.add_request(f"r{i}", prompt, GREEDY)
    engine.step()
    assert engine.stats()["num_free_blocks"] < 100
    for i in range(4):
        engine.abort_request(f"r{i}")
    assert engine.stats()["num_free_blocks"] == 100
    assert not engine.has_unfinished_requests()


def test_prefix_caching_saves_90_percent_of_prefill(tiny):
    """100 requests sharing a 2048-token prefix: >= 90% fewer prompt tokens computed than the
    100 x 2056 without the cache, and the outputs of the cache-less engine (compared on the
    first 20: its prefill of all 100 would be most of the test's time on a CPU)."""
    path, _ = tiny
    gen = torch.Generator().manual_seed(11)
    prefix = torch.randint(0, 256, (2048,), generator=gen).tolist()
    prompts = [prefix + torch.randint(0, 256, (8,), generator=gen).tolist() for _ in range(100)]
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    runs = {}
    for caching, batch in ((False, prompts[:20]), (True, prompts)):
        llm = LLM(str(path), device="cpu", enable_prefix_caching=caching, num_gpu_blocks=2000,
                  block_size=16, max_model_len=2304, max_num_batched_tokens=4096)
        llm.generate(prompts[:1], params)  # the first request fills the cache (if on)
        before = llm.engine.stats()["prompt_tokens_computed_total"]
        outs = llm.generate(batch, params)
        computed = llm.engine.stats()["prompt_tokens_computed_total"] - before
        runs[caching] = ([o.outputs[0].token_ids for o in outs], computed)
    assert runs[True][0][:20] == runs[False][0]
    assert runs[False][1] == 20 * 2056
    assert runs[True][1] <= 0.1 * 100 * 2056, runs[True][1]
