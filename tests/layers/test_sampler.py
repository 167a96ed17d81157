"""Sampling filters equal transformers' logits processors; seeded draws are batch-invariant."""

from __future__ import annotations

import pytest
import torch

from fuselm.engine.request import Request
from fuselm.engine.sampling_inputs import build_sampling_tensors
from fuselm.layers.sampler import process_logits, sample
from fuselm.sampling_params import SamplingParams

gen_utils = pytest.importorskip("transformers.generation.logits_process")

VOCAB = 200


def _logits(rows: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def _req(params: SamplingParams, prompt: list[int], output: list[int]) -> Request:
    req = Request("r", list(prompt), params)
    req.output_token_ids = list(output)
    return req


def _ours(logits: torch.Tensor, params: SamplingParams, prompt=(), output=()) -> torch.Tensor:
    reqs = [_req(params, list(prompt), list(output)) for _ in range(logits.shape[0])]
    return process_logits(logits, build_sampling_tensors(reqs, VOCAB, logits.device))


def _same_support_and_probs(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs)), "different filtered tokens"
    assert torch.allclose(ours.softmax(-1), theirs.softmax(-1), atol=1e-6)


@pytest.mark.parametrize("top_k", [1, 5, 50])
def test_top_k(top_k):
    logits = _logits(4, top_k)
    theirs = gen_utils.TopKLogitsWarper(top_k)(None, logits.clone())
    _same_support_and_probs(_ours(logits, SamplingParams(top_k=top_k)), theirs)


@pytest.mark.parametrize("top_p", [0.1, 0.5, 0.9])
def test_top_p(top_p):
    logits = _logits(4, int(top_p * 10))
    theirs = gen_utils.TopPLogitsWarper(top_p)(None, logits.clone())
    _same_support_and_probs(_ours(logits, SamplingParams(top_p=top_p)), theirs)


@pytest.mark.parametrize("min_p", [0.05, 0.3])
def test_min_p(min_p):
    logits = _logits(4, 7)
    theirs = gen_utils.MinPLogitsWarper(min_p)(None, logits.clone())
    _same_support_and_probs(_ours(logits, SamplingParams(min_p=min_p)), theirs)


@pytest.mark.parametrize("temperature", [0.5, 1.7])
def test_temperature(temperature):
    logits = _logits(3, 11)
    theirs = gen_utils.TemperatureLogitsWarper(temperature)(None, logits.clone())
    _same_support_and_probs(_ours(logits, SamplingParams(temperature=temperature)), theirs)


def test_combined_order_matches_hf_pipeline():
    """Temperature, top-k, top-p and min-p together, in transformers' order."""
    logits = _logits(4, 13)
    procs = gen_utils.LogitsProcessorList([
        gen_utils.TemperatureLogitsWarper(0.8), gen_utils.TopKLogitsWarper(40),
        gen_utils.TopPLogitsWarper(0.8), gen_utils.MinPLogitsWarper(0.05)])
    theirs = procs(None, logits.clone())
    params = SamplingParams(temperature=0.8, top_k=40, top_p=0.8, min_p=0.05)
    _same_support_and_probs(_ours(logits, params), theirs)


def test_repetition_penalty():
    logits = _logits(1, 17)
    prompt, output = [3, 9, 9, 120], [7, 3, 150]
    ids = torch.tensor([prompt + output])
    theirs = gen_utils.RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.clone())
    ours = _ours(logits, SamplingParams(repetition_penalty=1.3), prompt, output)
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_presence_and_frequency_penalties_openai_formula():
    """logit - frequency * count - presence * [count > 0], over generated tokens only."""
    logits = _logits(1, 19)
    prompt, output = [4, 4, 5], [7, 7, 7, 9]
    ours = _ours(logits, SamplingParams(presence_penalty=0.5, frequency_penalty=0.25),
                 prompt, output)
    want = logits.double().clone()
    for token, count in ((7, 3), (9, 1)):
        want[0, token] -= 0.25 * count + 0.5
    assert torch.allclose(ours.double(), want, atol=1e-6)


def test_logit_bias_matches_sequence_bias():
    logits = _logits(2, 23)
    bias = {5: 10.0, 17: -100.0, 199: 2.5}
    theirs = gen_utils.SequenceBiasLogitsProcessor({(k,): v for k, v in bias.items()})(
        torch.zeros(2, 1, dtype=torch.long), logits.clone())
    ours = _ours(logits, SamplingParams(logit_bias=bias))
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_seeded_draw_independent_of_batch():
    """A seeded row draws the same token alone and among other rows."""
    logits = _logits(5, 29)
    params = [SamplingParams(temperature=1.0, seed=s) for s in range(5)]

    def draw(rows: list[int]) -> list[int]:
        reqs = []
        for r in rows:
            req = _req(params[r], [1], [])
            req.generator = torch.Generator().manual_seed(100 + r)
            reqs.append(req)
        t = build_sampling_tensors(reqs, VOCAB, logits.device)
        return sample(logits[rows], t).token_ids.tolist()

    batched = draw([0, 1, 2, 3, 4])
    assert [draw([r])[0] for r in range(5)] == batched
