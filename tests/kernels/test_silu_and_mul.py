"""silu_and_mul: every backend against the reference."""

from __future__ import annotations

import pytest
import torch
from tolerances import assert_close, count_cuda_kernels

from fuselm.kernels import available_backends, select
from fuselm.kernels import silu_and_mul as sm

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CPU_DTYPES = [torch.float32, torch.float16]


def _impl(backend: str):
    if backend not in available_backends("silu_and_mul"):
        pytest.skip(f"{backend} backend of silu_and_mul not available here")
    return select("silu_and_mul", backend, DEVICE)


def _check(fn, x):
    expected = sm.silu_and_mul_ref(x)
    out = fn(x)
    assert out.dtype == x.dtype
    assert_close(out, expected)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("d", [96, 1536, 100, 1])
@pytest.mark.parametrize("num_tokens", [1, 7, 33])
def test_silu_and_mul(backend, dtype, d, num_tokens):
    torch.manual_seed(d * 100 + num_tokens)
    x = 3 * torch.randn(num_tokens, 2 * d, dtype=dtype, device=DEVICE)
    _check(_impl(backend), x)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_strided_rows_leading_dims_and_empty(backend):
    fn = _impl(backend)
    torch.manual_seed(0)
    wide = torch.randn(5, 300, device=DEVICE)
    _check(fn, wide[:, 4:260])  # rows 300 apart, d = 128
    _check(fn, torch.randn(2, 3, 64, device=DEVICE))
    assert fn(torch.randn(0, 64, device=DEVICE)).shape == (0, 32)
    with pytest.raises(ValueError):
        fn(torch.randn(3, 63, device=DEVICE))


def test_opcheck_triton_op():
    if "triton" not in available_backends("silu_and_mul"):
        pytest.skip("no triton")
    x = torch.randn(3, 2 * 96, device=DEVICE)
    torch.library.opcheck(torch.ops.fuselm.silu_and_mul.default, (x,))


# ---- GPU ------------------------------------------------------------------------------------

GPU_SHAPES = [(t, d) for t in (1, 7, 16384) for d in (1536, 14336, 28672)]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("num_tokens,d", GPU_SHAPES)
def test_gpu_bf16(backend, num_tokens, d):
    x = 3 * torch.randn(num_tokens, 2 * d, dtype=torch.bfloat16, device=DEVICE)
    _check(_impl(backend), x)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_one_launch(backend):
    x = torch.randn(4096, 2 * 14336, dtype=torch.bfloat16, device=DEVICE)
    assert count_cuda_kernels(_impl(backend), x) == 1


@pytest.mark.gpu
def test_gpu_opcheck_cuda_op():
    if "cuda" not in available_backends("silu_and_mul"):
        pytest.skip("CUDA extension not loaded")
    x = torch.randn(5, 2 * 1536, dtype=torch.bfloat16, device=DEVICE)
    out = torch.empty(5, 1536, dtype=torch.bfloat16, device=DEVICE)
    torch.library.opcheck(torch.ops.fuselm_C.silu_and_mul.default, (out, x))
    torch.library.opcheck(torch.ops.fuselm.silu_and_mul.default, (x,))
