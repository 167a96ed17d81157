"""rms_norm and fused_add_rms_norm: every backend against the reference."""

from __future__ import annotations

import pytest
import torch
from tolerances import assert_close, count_cuda_kernels

from fuselm.kernels import available_backends, resolve
from fuselm.kernels import rms_norm as rn

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CPU_DTYPES = [torch.float32, torch.float16]  # the interpreter's bf16 arithmetic is unreliable
EPS = 1e-6


def _impl(op: str, backend: str):
    if backend not in available_backends(op):
        pytest.skip(f"{backend} backend of {op} not available here")
    return resolve(op, backend, DEVICE)


def _check_rms_norm(fn, x, weight):
    expected = rn.rms_norm_ref(x, weight, EPS)
    out = fn(x, weight, EPS)
    assert out.dtype == x.dtype and out.shape == x.shape
    assert_close(out, expected)


def _check_fused(fn, x, residual, weight):
    x_ref, res_ref = x.clone(), residual.clone()  # the reference first, on clones
    rn.fused_add_rms_norm_ref(x_ref, res_ref, weight, EPS)
    assert fn(x, residual, weight, EPS) is None
    assert_close(residual, res_ref, name="residual")
    assert_close(x, x_ref, name="x")


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("hidden", [576, 4096, 129])
@pytest.mark.parametrize("num_tokens", [1, 7, 33])
def test_rms_norm(backend, dtype, hidden, num_tokens):
    torch.manual_seed(hidden * 100 + num_tokens)
    x = torch.randn(num_tokens, hidden, dtype=dtype, device=DEVICE)
    weight = torch.randn(hidden, dtype=dtype, device=DEVICE)
    _check_rms_norm(_impl("rms_norm", backend), x, weight)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("hidden", [576, 4096, 129])
@pytest.mark.parametrize("num_tokens", [1, 7, 33])
def test_fused_add_rms_norm(backend, dtype, hidden, num_tokens):
    torch.manual_seed(hidden * 100 + num_tokens + 1)
    x = torch.randn(num_tokens, hidden, dtype=dtype, device=DEVICE)
    residual = torch.randn_like(x)
    weight = torch.randn(hidden, dtype=dtype, device=DEVICE)
    _check_fused(_impl("fused_add_rms_norm", backend), x, residual, weight)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_strided_rows_and_leading_dims(backend):
    torch.manual_seed(0)
    wide = torch.randn(9, 200, device=DEVICE)
    x = wide[:, 8:136]  # rows 200 elements apart, 128 wide
    weight = torch.randn(128, device=DEVICE)
    _check_rms_norm(_impl("rms_norm", backend), x, weight)
    _check_rms_norm(_impl("rms_norm", backend), torch.randn(2, 3, 64, device=DEVICE), weight[:64])
    res_wide = torch.randn(9, 300, device=DEVICE)
    _check_fused(_impl("fused_add_rms_norm", backend), x, res_wide[:, :128], weight)


def test_triton_two_pass_path(monkeypatch):
    """Rows wider than one tile take the chunked two-pass loop."""
    if "triton" not in available_backends("rms_norm"):
        pytest.skip("no triton")
    monkeypatch.setattr(rn, "_MAX_ONE_PASS_BLOCK", 64)
    monkeypatch.setattr(rn, "_CHUNK_BLOCK", 32)
    torch.manual_seed(1)
    for hidden in (100, 129):
        x = torch.randn(5, hidden, device=DEVICE)
        weight = torch.randn(hidden, device=DEVICE)
        _check_rms_norm(rn.rms_norm_triton, x, weight)
        _check_fused(rn.fused_add_rms_norm_triton, x, torch.randn_like(x), weight)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_empty_and_bad_inputs(backend):
    fn = _impl("rms_norm", backend)
    x = torch.randn(0, 64, device=DEVICE)
    assert fn(x, torch.ones(64, device=DEVICE), EPS).shape == (0, 64)
    with pytest.raises((ValueError, RuntimeError)):
        fn(torch.randn(3, 64, device=DEVICE), torch.ones(32, device=DEVICE), EPS)
    with pytest.raises(ValueError):
        rn.fused_add_rms_norm_triton(
            torch.randn(3, 64, device=DEVICE),
            torch.randn(3, 32, device=DEVICE),
            torch.ones(64, device=DEVICE),
            EPS,
        )


def test_opcheck_triton_ops():
    if "triton" not in available_backends("rms_norm"):
        pytest.skip("no triton")
    torch.manual_seed(2)
    x = torch.randn(3, 64, device=DEVICE)
    w = torch.randn(64, device=DEVICE)
    torch.library.opcheck(torch.ops.fuselm.rms_norm.default, (x, w, EPS))
    torch.library.opcheck(
        torch.ops.fuselm.fused_add_rms_norm.default, (x.clone(), torch.randn_like(x), w, EPS)
    )


# ---- GPU: bf16, full sizes, one launch per op ----------------------------------------------

GPU_SHAPES = [(t, h) for t in (1, 7, 16384) for h in (576, 4096, 8192)]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("num_tokens,hidden", GPU_SHAPES)
def test_gpu_bf16(backend, num_tokens, hidden):
    x = torch.randn(num_tokens, hidden, dtype=torch.bfloat16, device=DEVICE)
    weight = torch.randn(hidden, dtype=torch.bfloat16, device=DEVICE)
    _check_rms_norm(_impl("rms_norm", backend), x, weight)
    residual = torch.randn_like(x)
    _check_fused(_impl("fused_add_rms_norm", backend), x, residual, weight)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_one_launch(backend):
    x = torch.randn(4096, 4096, dtype=torch.bfloat16, device=DEVICE)
    w = torch.randn(4096, dtype=torch.bfloat16, device=DEVICE)
    assert count_cuda_kernels(_impl("rms_norm", backend), x, w, EPS) == 1
    fused = _impl("fused_add_rms_norm", backend)
    assert count_cuda_kernels(fused, x, torch.randn_like(x), w, EPS) == 1


@pytest.mark.gpu
def test_gpu_opcheck_cuda_ops():
    if "cuda" not in available_backends("rms_norm"):
        pytest.skip("CUDA extension not loaded")
    x = torch.randn(5, 4096, dtype=torch.bfloat16, device=DEVICE)
    w = torch.randn(4096, dtype=torch.bfloat16, device=DEVICE)
    torch.library.opcheck(torch.ops.fuselm_C.rms_norm.default, (torch.empty_like(x), x, w, EPS))
    torch.library.opcheck(
        torch.ops.fuselm_C.fused_add_rms_norm.default, (x.clone(), torch.randn_like(x), w, EPS)
    )
    torch.library.opcheck(torch.ops.fuselm.rms_norm.default, (x, w, EPS))
