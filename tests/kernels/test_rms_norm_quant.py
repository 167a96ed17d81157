"""rms_norm_quant_fp8 and the plain FP8 quantization ops: the reference against float64 math,
the Triton kernel (interpreter on a CPU) against the reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_fp8_matmul import check_quantized
from tolerances import assert_close, count_cuda_kernels

from fuselm.kernels import available_backends, resolve
from fuselm.kernels import fp8_matmul as fm
from fuselm.kernels import rms_norm_quant as rq

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
EPS = 1e-6
MODES = [{}, {"group_size": 128}, {"scale": 0.02}]


def _need(op: str = "rms_norm_quant_fp8"):
    if "triton" not in available_backends(op):
        pytest.skip(f"triton backend of {op} not available here")


def _kwargs(mode: dict) -> dict:
    kw = dict(mode)
    if "scale" in kw:
        kw["scale"] = torch.tensor([kw["scale"]], device=DEVICE)
    return kw


def _inputs(m, h, dtype, seed):
    g = torch.Generator(DEVICE).manual_seed(seed)  # on the device: the GPU shapes are large
    x = (torch.randn(m, h, generator=g, device=DEVICE) * 2).to(dtype)
    residual = torch.randn(m, h, generator=g, device=DEVICE).to(dtype)
    weight = (torch.rand(h, generator=g, device=DEVICE) + 0.5).to(dtype)
    return x, residual, weight


def _scale_per_column(scale: torch.Tensor, m: int, h: int) -> torch.Tensor:
    """A quantization scale ([M, 1], [1] or [M, groups]) broadcast to [M, H]."""
    if scale.dim() == 2 and scale.shape[1] > 1:
        return scale.repeat_interleave(128, dim=1)[:, :h]
    return scale.reshape(-1, 1).expand(m, h)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_reference_vs_float64(mode, with_residual):
    m, h = 6, 300
    x, residual, weight = _inputs(m, h, torch.float16, 1)
    res = residual.clone()
    q, scale = rq.rms_norm_quant_fp8_ref(x, weight, EPS, res if with_residual else None,
                                         **_kwargs(mode))
    src = (x.double() + residual.double()).half().double() if with_residual else x.double()
    if with_residual:
        assert torch.equal(res, (x.float() + residual.float()).half())
    y = src * torch.rsqrt(src.pow(2).mean(1, keepdim=True) + EPS) * weight.double()
    if not mode:
        assert_close(scale, (y.abs().amax(1, keepdim=True) / 448).float(), rtol=1e-5, atol=0)
    check_quantized(q, _scale_per_column(scale, m, h).float(), y, "norm+quant")


def _check_triton(x, residual, weight, mode):
    res_ref = residual.clone() if residual is not None else None
    q_ref, s_ref = rq.rms_norm_quant_fp8_ref(x, weight, EPS, res_ref, **_kwargs(mode))
    q, s = rq.rms_norm_quant_fp8_triton(x, weight, EPS, residual, **_kwargs(mode))
    if residual is not None:
        assert_close(residual, res_ref, name="residual")
    assert s.shape == s_ref.shape and q.shape == q_ref.shape
    assert_close(s, s_ref, rtol=1e-5, atol=0, name="scale")  # rsqrt and sums differ in order
    # so q may sit one e4m3 step off where y / scale falls near a tie: dequantized, within a step
    m, h = x.shape
    sc = _scale_per_column(s_ref, m, h)
    a, e = q.float() * sc, q_ref.float() * sc
    step = torch.exp2(torch.floor(torch.log2(e.abs() / sc).clamp(min=-6)) - 3) * sc
    assert ((a - e).abs() <= step * 1.001).all()
    assert int((a != e).sum()) <= max(2, q.numel() // 100), "too many off-by-one-step values"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("m,h,dtype", [(1, 128, torch.float32), (5, 300, torch.float16),
                                       (3, 1000, torch.float32)])
def test_triton(m, h, dtype, mode, with_residual):
    _need()
    x, residual, weight = _inputs(m, h, dtype, m * h)
    _check_triton(x, residual if with_residual else None, weight, mode)


def test_triton_chunked_rows(monkeypatch):
    """Rows wider than one register tile take the three-pass chunk loop."""
    _need()
    monkeypatch.setattr(rq, "_MAX_ONE_PASS", 128)
    monkeypatch.setattr(rq, "_CHUNK", 256)
    for mode in MODES:
        x, residual, weight = _inputs(3, 700, torch.float32, 9)
        _check_triton(x, residual, weight, mode)
        _check_triton(x, None, weight, mode)
        q, s = rq.quant_fp8_per_token_triton(x)
        q_ref, s_ref = fm.quant_fp8_per_token_ref(x)
        assert torch.equal(q.float(), q_ref.float()) and torch.equal(s, s_ref)


@pytest.mark.parametrize("m,k", [(1, 64), (7, 300), (4, 4096 + 3)])
def test_quant_ops_triton_equal_the_references(m, k):
    """Without the norm the math is one IEEE division: the Triton kernel equals the reference
    bit for bit (the interpreter's own fp8 cast is bypassed, see fp8_triton.e4m3_round)."""
    _need("quant_fp8_per_token")
    g = torch.Generator().manual_seed(k)
    x = (torch.randn(m, k, generator=g) * torch.exp(torch.randn(m, 1, generator=g) * 4))
    x = x.to(DEVICE)
    for op, args in (("quant_fp8_per_token", ()), ("quant_fp8_per_token_group", (128,)),
                     ("quant_fp8_static", (torch.tensor([0.03], device=DEVICE),))):
        got = resolve(op, "triton", DEVICE)(x, *args)
        ref = resolve(op, "reference", DEVICE)(x, *args)
        got, ref = (got, ref) if isinstance(got, tuple) else ((got,), (ref,))
        for a, e in zip(got, ref, strict=True):
            assert a.dtype == e.dtype and a.shape == e.shape, op
            assert torch.equal(a.float(), e.float()), op


def test_strided_rows_zero_rows_and_bad_inputs():
    _need()
    wide = torch.randn(5, 200, device=DEVICE)
    x = wide[:, 10:138]
    weight = torch.rand(128, device=DEVICE) + 0.5
    _check_triton(x, None, weight, {})
    q, s = rq.quant_fp8_per_token_triton(torch.zeros(2, 64, device=DEVICE))
    assert (q.float() == 0).all() and (s == fm.FP8_MIN_SCALE).all()
    q, s = rq.quant_fp8_per_token_triton(torch.zeros(0, 64, device=DEVICE))
    assert q.shape == (0, 64) and s.shape == (0, 1)
    with pytest.raises(ValueError, match="weight"):
        rq.rms_norm_quant_fp8_triton(x, weight[:64], EPS)
    with pytest.raises(ValueError, match="residual"):
        rq.rms_norm_quant_fp8_triton(x, weight, EPS, torch.zeros(5, 64, device=DEVICE))
    with pytest.raises(ValueError, match="excludes group_size"):
        rq.rms_norm_quant_fp8_triton(x, weight, EPS, scale=torch.ones(1), group_size=128)
    with pytest.raises(ValueError, match="power-of-2"):
        rq.quant_fp8_per_token_group_triton(x, 96)


def test_opcheck():
    _need()
    x, residual, weight = _inputs(3, 128, torch.float32, 4)
    torch.library.opcheck(torch.ops.fuselm.rms_norm_quant_fp8.default,
                          (x, weight, EPS, residual, None, 0))
    torch.library.opcheck(torch.ops.fuselm.rms_norm_quant_fp8.default,
                          (x, weight, EPS, None, torch.tensor([0.1], device=DEVICE), 0))
    torch.library.opcheck(torch.ops.fuselm.quant_fp8_per_token.default, (x,))
    torch.library.opcheck(torch.ops.fuselm.quant_fp8_per_token_group.default, (x, 128))
    torch.library.opcheck(torch.ops.fuselm.quant_fp8_static.default,
                          (x, torch.tensor([0.1], device=DEVICE)))


# ---- GPU: bf16 at the 8B hidden sizes, one launch -----------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("m", [1, 7, 16384])
@pytest.mark.parametrize("h", [4096, 14336, 28672])
def test_gpu_bf16(m, h, mode):
    x, residual, weight = _inputs(m, h, torch.bfloat16, m + h)
    _check_triton(x, residual, weight, mode)
    kw = _kwargs(mode)
    q, s = rq._launch(x, None, None, kw.get("scale"), kw.get("group_size", 0), 0.0, False)
    ref_q, ref_s = ((fm.quant_fp8_static_ref(x, kw["scale"]), None) if "scale" in kw else
                    fm.quant_fp8_per_token_group_ref(x) if kw else fm.quant_fp8_per_token_ref(x))
    # both divide (IEEE), so they should agree; at most one e4m3 step (2^-3 relative) on a
    # rounding tie is tolerated, and rarely
    got, want = q.float(), ref_q.float()
    off = (got - want).abs() > 0
    assert ((got - want).abs() <= 2**-3 * want.abs() + 2**-9)[off].all()
    assert off.float().mean().item() <= 1e-3, f"{int(off.sum())} of {off.numel()} differ"
    if ref_s is not None:
        assert_close(s, ref_s, atol=0.0, rtol=1e-6)


@pytest.mark.gpu
def test_gpu_one_launch():
    x, residual, weight = _inputs(4096, 4096, torch.bfloat16, 0)
    fn = resolve("rms_norm_quant_fp8", "triton", DEVICE)
    assert count_cuda_kernels(lambda: fn(x, weight, EPS, residual, None, 0)) == 1


def test_amax_scale_is_an_ieee_division():
    """The references' scale is amax / 448 rounded once, as the kernels' div_rn: multiplying
    by the reciprocal (what PyTorch's CUDA kernel does for a Python-number divisor) rounds
    about half of these differently, and moved 0.12 % of a group-quantized tensor one e4m3
    step on the H200."""
    amax = torch.rand(4096, generator=torch.Generator().manual_seed(3)) * 20 + 1e-3
    want = torch.from_numpy(amax.numpy().astype(np.float32) / np.float32(448.0))
    assert torch.equal(fm.amax_scale(amax), want)
    reciprocal = amax * torch.tensor(1 / 448.0, dtype=torch.float32)
    assert (reciprocal != want).float().mean() > 0.2  # the two roundings do differ
