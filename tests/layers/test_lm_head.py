"""The LM head's logits against a float64 matmul, returned fresh or written into a given
buffer (how the decode CUDA graphs above batch 1 share one logits buffer)."""

from __future__ import annotations

import pytest
import torch

from fuselm.layers.embedding import ParallelLMHead


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_logits_fresh_and_into_a_buffer_match_float64(dtype):
    gen = torch.Generator().manual_seed(3)
    head = ParallelLMHead(50, 16, dtype=dtype)
    head.weight.data.copy_(torch.randn(50, 16, generator=gen))
    hidden = torch.randn(3, 16, generator=gen).to(dtype)
    want = hidden.double() @ head.weight.double().T
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    fresh = head(hidden)
    buffer = torch.full((8, 50), float("nan"))
    into = head(hidden, buffer[:3])
    assert fresh.dtype == into.dtype == torch.float32
    assert into.data_ptr() == buffer.data_ptr()
    torch.testing.assert_close(fresh.double(), want, atol=tol, rtol=tol)
    torch.testing.assert_close(buffer[:3], fresh, atol=0, rtol=0)
    assert buffer[3:].isnan().all(), "rows past the batch must stay untouched"
