"""gemv (batch-1 linear): the Triton kernel against the float32 reference, and its use by the
linear layers."""

from __future__ import annotations

import pytest
import torch
from tolerances import assert_close, count_cuda_kernels

from fuselm.kernels import KernelChoice, KernelSet, available_backends
from fuselm.kernels import gemv as gv

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CPU_DTYPES = [torch.float32, torch.float16]


def _need_triton():
    if "triton" not in available_backends("gemv"):
        pytest.skip("triton backend of gemv not available here")


def _inputs(m, n, k, dtype, bias, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype).to(DEVICE)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(dtype).to(DEVICE)
    b = torch.randn(n, generator=g).to(dtype).to(DEVICE) if bias else None
    return x, w, b


def _tol(dtype, k):
    # fp32 accumulation in a different order than the reference: rounding grows with sqrt(K)
    atol, rtol = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3),
                  torch.bfloat16: (2e-2, 2e-2)}[dtype]
    return atol * max(1.0, (k / 256) ** 0.5), rtol


CONFIGS = [gv.GemvConfig(1, 64, 1), gv.GemvConfig(4, 32, 2, 2), gv.GemvConfig(8, 256, 4),
           gv.GemvConfig(2, 128, 4, 3)]


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("m,n,k", [(1, 96, 64), (1, 100, 200), (1, 7, 576), (3, 33, 130)])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.label)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("prefetch", [False, True])
def test_gemv_configs(dtype, m, n, k, cfg, bias, prefetch):
    _need_triton()
    x, w, b = _inputs(m, n, k, dtype, bias, seed=m * 1000 + n + k)
    out = torch.empty(m, n, dtype=dtype, device=DEVICE)
    gv.launch_gemv(x, w, b, out, cfg, prefetch=prefetch)
    atol, rtol = _tol(dtype, k)
    assert_close(out, gv.gemv_ref(x, w, b), atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_gemv_op_fp32_out_strided_rows_and_default_config(dtype):
    _need_triton()
    torch.manual_seed(0)
    x, w, _ = _inputs(1, 80, 96, dtype, False, seed=5)
    wide = torch.randn(80, 128, dtype=dtype, device=DEVICE)
    wide[:, 16:112] = w  # weight rows 128 apart
    out = torch.ops.fuselm.gemv(x, wide[:, 16:112], None, True)
    assert out.dtype == torch.float32
    atol, rtol = _tol(dtype, 96)
    assert_close(out, gv.gemv_ref(x, w, None, fp32_out=True), atol=atol, rtol=rtol)


def test_gemv_bad_input_and_empty():
    _need_triton()
    x = torch.randn(1, 64, device=DEVICE)
    with pytest.raises(ValueError, match="gemv needs"):
        gv.gemv_triton(x, torch.randn(8, 32, device=DEVICE))
    with pytest.raises(ValueError, match="contiguous"):
        gv.gemv_triton(x, torch.randn(64, 8, device=DEVICE).t())
    with pytest.raises(ValueError, match="bias"):
        gv.gemv_triton(x, torch.randn(8, 64, device=DEVICE), torch.randn(4, device=DEVICE))
    assert gv.gemv_triton(torch.randn(0, 64, device=DEVICE),
                          torch.randn(8, 64, device=DEVICE)).shape == (0, 8)


def test_opcheck_triton_op():
    _need_triton()
    x, w, b = _inputs(1, 48, 64, torch.float32, True, seed=1)
    torch.library.opcheck(torch.ops.fuselm.gemv.default, (x, w, b, False))


def _gated_expected(x, w, b):
    """float64 silu(x @ gate.T + b_gate) * (x @ up.T + b_up), written out independently."""
    h = x.double() @ w.double().t() + (b.double() if b is not None else 0.0)
    n = h.shape[1] // 2
    gate, up = h[:, :n], h[:, n:]
    return gate / (1.0 + torch.exp(-gate)) * up


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("m,n,k", [(1, 48, 64), (1, 50, 200), (2, 7, 130)])
@pytest.mark.parametrize("cfg", CONFIGS[:3], ids=lambda c: c.label)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("prefetch", [False, True])
def test_gemv_silu_mul_configs(dtype, m, n, k, cfg, bias, prefetch):
    _need_triton()
    x, w, b = _inputs(m, 2 * n, k, dtype, bias, seed=m * 77 + n + k)
    out = torch.empty(m, n, dtype=dtype, device=DEVICE)
    gv.launch_gemv(x, w, b, out, cfg, prefetch=prefetch, gated=True)
    atol, rtol = _tol(dtype, k)
    expected = _gated_expected(x, w, b)
    assert_close(out, expected.to(dtype), atol=atol, rtol=rtol)
    assert_close(gv.gemv_silu_mul_ref(x, w, b), expected.to(dtype), atol=atol, rtol=rtol)


def test_gemv_silu_mul_op_and_bad_input():
    _need_triton()
    x, w, b = _inputs(1, 64, 96, torch.float32, True, seed=9)
    out = torch.ops.fuselm.gemv_silu_mul(x, w, b)
    assert out.shape == (1, 32)
    assert_close(out, _gated_expected(x, w, b).float(), atol=1e-5, rtol=1e-5)
    torch.library.opcheck(torch.ops.fuselm.gemv_silu_mul.default, (x, w, b))
    with pytest.raises(ValueError, match="even"):
        gv.gemv_silu_mul_triton(x, torch.randn(7, 96, device=DEVICE))
    with pytest.raises(ValueError, match="gemv needs"):
        gv.gemv_silu_mul_triton(x, torch.randn(8, 32, device=DEVICE))


def test_gemv_silu_mul_choice_by_table_and_backend():
    assert KernelSet("triton", "cpu").gemv_silu_mul(64, 32).fn is None
    if DEVICE.type == "cuda" and "triton" in available_backends("gemv_silu_mul"):
        assert KernelSet("triton", DEVICE).gemv_silu_mul(64, 32).fn is not None
        assert KernelSet("triton", DEVICE).gemv_silu_mul(63, 32).fn is None  # odd rows
        assert KernelSet("reference", DEVICE).gemv_silu_mul(64, 32).fn is None
        # auto: only where the table measured it (no entry for this tiny shape)
        assert KernelSet("auto", DEVICE).gemv_silu_mul(64, 32).fn is None


def test_gated_config_halves_the_plain_rows():
    plain = gv.default_config(2 * 14336, 4096)
    gated = gv.gated_config(14336, 4096, torch.device("cpu"))
    assert gated.block_n == max(1, plain.block_n // 2)
    assert gated.block_k == plain.block_k


def test_gemv_choice_only_on_cuda_and_by_backend():
    assert KernelSet("triton", "cpu").gemv(64, 64).fn is None  # CPU keeps F.linear
    if DEVICE.type == "cuda" and "triton" in available_backends("gemv"):
        assert KernelSet("triton", DEVICE).gemv(64, 64).fn is not None
        assert KernelSet("reference", DEVICE).gemv(64, 64).fn is None


def test_default_config_shapes():
    for n, k in [(6144, 4096), (4096, 14336), (128256, 4096), (7, 3)]:
        cfg = gv.default_config(n, k)
        assert cfg.block_k & (cfg.block_k - 1) == 0 and cfg.block_k <= 4096
        assert cfg.block_n * cfg.block_k <= 8192 or cfg.block_n == 1


# ---- GPU ------------------------------------------------------------------------------------

GPU_SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (128256, 4096),
              (3072, 4096), (4096, 7168)]


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", GPU_SHAPES)
@pytest.mark.parametrize("fp32_out", [False, True])
def test_gpu_bf16(n, k, fp32_out):
    _need_triton()
    x, w, _ = _inputs(1, n, k, torch.bfloat16, False, seed=n + k)
    out = torch.ops.fuselm.gemv(x, w, None, fp32_out)
    atol, rtol = _tol(torch.bfloat16, k)
    assert_close(out.float(), gv.gemv_ref(x, w, None, fp32_out=True), atol=atol, rtol=rtol)


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", [(14336, 4096), (7168, 4096)])
def test_gpu_gemv_silu_mul_bf16(n, k):
    _need_triton()
    x, w, _ = _inputs(1, 2 * n, k, torch.bfloat16, False, seed=n + k + 1)
    out = torch.ops.fuselm.gemv_silu_mul(x, w, None)
    atol, rtol = _tol(torch.bfloat16, k)
    assert_close(out.float(), _gated_expected(x, w, None).float(), atol=atol, rtol=rtol)
    assert count_cuda_kernels(torch.ops.fuselm.gemv_silu_mul.default, x, w, None) == 1


@pytest.mark.gpu
def test_gpu_one_launch():
    _need_triton()
    x, w, _ = _inputs(1, 6144, 4096, torch.bfloat16, False, seed=3)
    assert count_cuda_kernels(torch.ops.fuselm.gemv.default, x, w, None, False) == 1


@pytest.mark.gpu
def test_gpu_linear_layer_uses_gemv_at_batch_1():
    _need_triton()
    from fuselm.layers.linear import ReplicatedLinear

    layer = ReplicatedLinear(512, 256, bias=True, dtype=torch.bfloat16,
                             kernels=KernelSet("triton", DEVICE)).to(DEVICE)
    torch.nn.init.normal_(layer.weight, std=0.05)
    torch.nn.init.normal_(layer.bias)
    assert layer.gemv.fn is torch.ops.fuselm.gemv.default
    x = torch.randn(1, 512, dtype=torch.bfloat16, device=DEVICE)
    expected = gv.gemv_ref(x, layer.weight, layer.bias)
    assert_close(layer(x), expected, atol=3e-2, rtol=2e-2)
    assert_close(layer(x.expand(4, 512).contiguous())[:1], expected, atol=3e-2, rtol=2e-2)


def test_gated_mlp_single_row_takes_the_fused_kernel():
    """GatedMLP with the fused kernel chosen: one row goes through it and matches the separate
    projection + activation (a float64 MLP); several rows keep the separate path."""
    _need_triton()
    from fuselm.layers.mlp import GatedMLP

    gen = torch.Generator().manual_seed(3)
    mlp = GatedMLP(64, 96).to(DEVICE)
    for p in mlp.parameters():
        p.copy_(torch.randn(p.shape, generator=gen).to(DEVICE) / p.shape[-1] ** 0.5)
    calls = []

    def fused(x, w, b):
        calls.append(x.shape[0])
        return torch.ops.fuselm.gemv_silu_mul(x, w, b)

    mlp.gate_up_act = KernelChoice("gemv_silu_mul", "test", fused, fused, "test", "test")
    x = torch.randn(3, 64, generator=gen).to(DEVICE)
    w_down = mlp.down_proj.weight.double()
    expected = (_gated_expected(x, mlp.gate_up_proj.weight, None) @ w_down.t())
    assert_close(mlp(x[:1]), expected[:1].float(), atol=1e-5, rtol=1e-5)
    assert_close(mlp(x), expected.float(), atol=1e-5, rtol=1e-5)
    assert calls == [1]


@pytest.mark.skipif("triton" not in available_backends("gemv"), reason="needs triton")
def test_batch1_choices_follow_the_table_under_auto(monkeypatch):
    """The two batch-1 choices of a kernel set on a CUDA device (none is touched): ``auto``
    takes Triton exactly where the table's bucket for that weight says so, ``triton`` always
    where the weight fits, other backends never."""
    from fuselm.kernels import resolver

    table = {"n64_k32": "triton", "n96_k32": "triton", "gated_n32_k32": "triton"}
    monkeypatch.setattr(resolver, "tuned_backend", lambda op, dev, bucket: table.get(bucket))

    def choice(backend, kind, n, k):
        return getattr(KernelSet(backend, "cuda:0"), kind)(n, k)

    assert choice("auto", "gemv", 64, 32).fn is torch.ops.fuselm.gemv.default
    assert choice("auto", "gemv", 64, 32).bucket == "n64_k32"
    assert choice("auto", "gemv", 48, 32).fn is None  # no entry: cuBLAS
    assert choice("cuda", "gemv", 64, 32).fn is None
    gated = torch.ops.fuselm.gemv_silu_mul.default
    assert choice("auto", "gemv_silu_mul", 64, 32).fn is gated
    assert choice("auto", "gemv_silu_mul", 48, 32).fn is None  # gated_n24_k32: no entry
    # the plain bucket n96_k32 is in the table, the gated one (gated_n48_k32) is not
    assert choice("auto", "gemv_silu_mul", 96, 32).fn is None
    assert choice("triton", "gemv_silu_mul", 47, 32).fn is None  # odd rows


