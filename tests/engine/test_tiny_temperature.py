"""Tiny temperatures (down to float32 subnormals such as 1e-40) sample like greedy: the argmax
of the logits (plain PyTorch), on fresh random logits, with and without top-k/top-p."""

from __future__ import annotations

import pytest
import torch

from fuselm.layers.sampler import SamplingTensors, sample

TINY = [1e-40, 1e-38, 1e-30, 1e-12, 1e-8, 1e-6]


def _tensors(temps: list[float], vocab: int, filters: bool) -> SamplingTensors:
    n = len(temps)
    return SamplingTensors(
        temperature=torch.tensor(temps, dtype=torch.float32),
        top_k=torch.full((n,), 20 if filters else vocab, dtype=torch.int64),
        top_p=torch.full((n,), 0.9 if filters else 1.0),
        min_p=torch.zeros(n), all_greedy=False, need_top_k=filters, need_top_p=filters,
        need_min_p=False)


@pytest.mark.parametrize("filters", [False, True])
def test_tiny_temperature_is_greedy(filters: bool) -> None:
    vocab = 131
    for _ in range(5):
        logits = torch.randn(len(TINY) + 1, vocab) * 4
        t = _tensors([*TINY, 1.0], vocab, filters)
        token_ids = sample(logits, t).token_ids
        assert token_ids[:-1].tolist() == logits[:-1].argmax(dim=-1).tolist()


def test_temperature_one_still_samples() -> None:
    vocab = 131
    logits = torch.zeros(256, vocab)  # uniform: greedy would pick id 0 every time
    token_ids = sample(logits, _tensors([1.0] * 256, vocab, False)).token_ids
    assert len(set(token_ids.tolist())) > 50
