"""Async scheduling (the next decode step queued before the host reads the current one) gives
exactly the outputs of synchronous scheduling, and really pipelines."""

from __future__ import annotations

import pytest
import torch

from fuselm import LLM, SamplingParams
from tests.tiny_models import make_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_checkpoint("qwen2-gqa-tied-bias", tmp_path_factory.mktemp("async"))


def _prompts(n: int, seed: int = 3) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (int(k),), generator=gen).tolist()
            for k in torch.randint(1, 40, (n,), generator=gen)]


def _params() -> list[SamplingParams]:
    return [
        SamplingParams(temperature=0.0, max_tokens=17, ignore_eos=True),
        SamplingParams(temperature=0.9, top_k=30, seed=5, max_tokens=9, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=30),  # may stop at EOS
        SamplingParams(temperature=0.7, n=2, seed=1, max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=20, stop=["a"], ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=11, repetition_penalty=1.3,
                       ignore_eos=True),  # not pipelined: reads the token history
        SamplingParams(temperature=0.0, max_tokens=25, ignore_eos=True),
    ]


def _run(path, async_scheduling: bool, **kwargs):
    llm = LLM(str(path), device="cpu", num_gpu_blocks=200, block_size=8,
              async_scheduling=async_scheduling, **kwargs)
    outs = llm.generate(_prompts(8), _params())
    return ([[(c.token_ids, c.text, c.finish_reason) for c in o.outputs] for o in outs],
            llm.engine)


@pytest.mark.parametrize("kwargs", [{}, {"max_num_batched_tokens": 16}, {"max_num_seqs": 3}])
def test_async_equals_sync(tiny, kwargs):
    sync, _ = _run(tiny, False, **kwargs)
    pipelined, engine = _run(tiny, True, **kwargs)
    assert pipelined == sync
    assert engine.num_pipelined_steps > 0
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_async_abort_mid_pipeline_frees_blocks(tiny):
    llm = LLM(str(tiny), device="cpu", num_gpu_blocks=100, block_size=8, async_scheduling=True)
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    for i, prompt in enumerate(_prompts(3)):
        engine.add_request(f"r{i}", prompt, params)
    for _ in range(6):
        engine.step()
    assert engine.num_pipelined_steps > 0
    engine.abort_request("r1")
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.block_manager.num_free_blocks == 100
    engine.add_request("after", _prompts(1, seed=9)[0], params)  # the stale step is harmless
    while engine.has_unfinished_requests():
        outs = engine.step()
    alone = LLM(str(tiny), device="cpu", num_gpu_blocks=100, block_size=8).generate(
        [_prompts(1, seed=9)[0]], params)[0]
    assert outs[-1].outputs[0].token_ids == alone.outputs[0].token_ids
