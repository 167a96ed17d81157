"""Structured outputs through the engine on a tiny random-weight model (byte tokenizer, 258 of
300 ids in the vocabulary): constrained output always matches, in batches that mix free and
constrained sequences, with n > 1, seeds and async scheduling; free sequences are unchanged
by their constrained neighbours; every KV block comes back."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from fuselm import LLM, SamplingParams
from fuselm.errors import InvalidRequestError
from fuselm.sampling_params import StructuredOutputsParams
from tests.tiny_models import make_tiny_checkpoint

SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "tag": {"enum": ["red", "green"]},
                   "n": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["ok", "tag", "n"], "additionalProperties": False,
}
REGEX = r"[a-c]{2,4}-[0-9]{1,2}"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_checkpoint("qwen2-gqa-tied-bias", tmp_path_factory.mktemp("structured"))


def _prompts(n: int, seed: int = 4) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (int(k),), generator=gen).tolist()
            for k in torch.randint(2, 30, (n,), generator=gen)]


def _params() -> list[SamplingParams]:
    so = StructuredOutputsParams
    return [
        SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),  # free
        SamplingParams(temperature=1.0, seed=3, n=3, max_tokens=60,
                       structured_outputs=so(json=SCHEMA, disable_any_whitespace=True)),
        SamplingParams(temperature=0.8, seed=7, max_tokens=16, structured_outputs=so(regex=REGEX)),
        SamplingParams(temperature=0.0, max_tokens=14,
                       structured_outputs=so(choice=["alpha", "beta", "gamma delta"])),
        SamplingParams(temperature=1.2, seed=1, max_tokens=9, ignore_eos=True),  # free
        SamplingParams(temperature=0.0, max_tokens=16, repetition_penalty=1.2,
                       structured_outputs=so(grammar='root ::= "(" [xy]{1,6} ")"')),
    ]


def _check(outs) -> None:
    for c in outs[1].outputs:
        jsonschema.validate(json.loads(c.text), SCHEMA)
        assert c.finish_reason == "stop"
    assert re.fullmatch(REGEX, outs[2].outputs[0].text)
    assert outs[3].outputs[0].text in ("alpha", "beta", "gamma delta")
    assert re.fullmatch(r"\([xy]{1,6}\)", outs[5].outputs[0].text), outs[5].outputs[0].text
    for o in outs[1:4] + outs[5:]:
        assert all(t < 258 for c in o.outputs for t in c.token_ids)  # no padding id


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_constrained_and_free_sequences_in_one_batch(tiny, async_scheduling):
    llm = LLM(str(tiny), device="cpu", num_gpu_blocks=200, block_size=8,
              async_scheduling=async_scheduling)
    prompts, params = _prompts(6), _params()
    outs = llm.generate(prompts, params)
    _check(outs)
    engine = llm.engine
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    alone = LLM(str(tiny), device="cpu", num_gpu_blocks=200, block_size=8)
    free = alone.generate([prompts[0], prompts[4]], [params[0], params[4]])
    assert [o.outputs[0].token_ids for o in free] == [outs[0].outputs[0].token_ids,
                                                      outs[4].outputs[0].token_ids]
    if async_scheduling:  # constrained steps ran ahead too, their sampling deferred
        assert engine.num_pipelined_steps > 0


def test_deferred_sampling_gives_the_synchronous_tokens(tiny):
    """Async scheduling runs constrained steps ahead with their sampling (and mask) queued once
    the previous step's tokens are read: every token equals the synchronous engine's, seeded
    sampling included, and the constraints hold."""
    so = StructuredOutputsParams
    params = [SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True),
              SamplingParams(temperature=0.9, seed=5, max_tokens=40,
                             structured_outputs=so(json=SCHEMA, disable_any_whitespace=True)),
              SamplingParams(temperature=0.0, max_tokens=16, structured_outputs=so(regex=REGEX))]
    prompts = _prompts(3, seed=9)
    runs = {}
    for mode in (False, True):
        llm = LLM(str(tiny), device="cpu", num_gpu_blocks=100, block_size=8,
                  async_scheduling=mode)
        outs = llm.generate(prompts, params)
        runs[mode] = [o.outputs[0].token_ids for o in outs]
        jsonschema.validate(json.loads(outs[1].outputs[0].text), SCHEMA)
        assert re.fullmatch(REGEX, outs[2].outputs[0].text)
        steps = llm.engine.num_pipelined_steps
        assert (steps > 0) == mode, steps
        assert llm.engine.block_manager.num_free_blocks == 100
    assert runs[True] == runs[False]


def test_seeded_constrained_sampling_repeats(tiny):
    llm = LLM(str(tiny), device="cpu", num_gpu_blocks=100, block_size=8)
    params = SamplingParams(temperature=1.0, seed=11, n=2, max_tokens=16,
                            structured_outputs=StructuredOutputsParams(regex=REGEX))
    first = llm.generate(_prompts(1), params)[0]
    again = llm.generate(_prompts(1), params)[0]
    assert [c.text for c in first.outputs] == [c.text for c in again.outputs]
    assert all(re.fullmatch(REGEX, c.text) for c in first.outputs)


def test_bad_grammar_is_refused_before_anything_runs(tiny):
    llm = LLM(str(tiny), device="cpu", num_gpu_blocks=50, block_size=8)
    params = SamplingParams(structured_outputs=StructuredOutputsParams(regex="[a-"))
    with pytest.raises(InvalidRequestError) as info:
        llm.engine.add_request("bad", [1, 2, 3], params)
    assert info.value.param == "regex"
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.block_manager.num_free_blocks == 50


@pytest.mark.gpu
def test_constrained_decode_replays_cuda_graphs(tiny):
    """On a GPU the decode steps replay CUDA graphs and the mask is applied to their logits:
    constrained outputs still match, and the steps did replay graphs."""
    llm = LLM(str(tiny), device="cuda", num_gpu_blocks=200, block_size=8, max_num_seqs=16)
    prompts, params = _prompts(6), _params()
    outs = llm.generate(prompts, params)
    _check(outs)
    assert llm.engine.runner.num_graph_replays > 0
