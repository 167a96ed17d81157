"""int8_matmul (W8A16, per-channel scales): every Triton variant against an independent float64
dequantize-then-matmul, under the interpreter on CPU (fp32, fp16) and at the Llama-3-8B shapes
(the LM head included) in bf16 on the GPU."""

from __future__ import annotations

import pytest
import torch
from tolerances import assert_close, tolerance

from fuselm.kernels import available_backends, triton_utils
from fuselm.kernels import int8_matmul as i8
from fuselm.kernels.int4_matmul import QuantMatmulConfig as Cfg

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CPU_DTYPES = [torch.float32, torch.float16]


def _need_triton():
    if not triton_utils.triton_available():
        pytest.skip("triton not available here")


def _inputs(m, n, k, dtype, seed, device=DEVICE):
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)  # on the device: 8B shapes are big
    x = torch.randn(m, k, generator=gen, device=device).to(dtype)
    q = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8, device=device)
    s = torch.rand(n, generator=gen, device=device) * 0.002 + 0.0005
    return x, q, s


def _expected(x, q, s):
    """float64 x @ (q * s[:, None]).T."""
    return x.double() @ (q.double() * s.double()[:, None]).t()


def _tol(dtype, k):
    # fp32 accumulation in another order than float64; the gemv's 1.5 + b/256 trick costs bits
    atol, rtol = tolerance(dtype)
    return atol * max(1.0, (k / 64) ** 0.5), max(rtol, 4e-6)


GEMV = [Cfg("gemv", 4, 256, 4), Cfg("gemv", 8, 128, 2, 2, 16, 3)]
GEMM = [Cfg("gemm", 16, 16, 4, 1, 16), Cfg("gemm", 32, 32, 4, 2, 32),
        Cfg("gemm", 32, 16, 4, 2, 16, 1)]  # mode 1: the batch on the MMA's M side
SHAPES = [(33, 96), (20, 208), (24, 256)]


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("m,n,k", [(1, *SHAPES[0]), (3, *SHAPES[1]), (1, *SHAPES[1])])
@pytest.mark.parametrize("cfg,prefetch", [(GEMV[0], False), (GEMV[1], True),
                                          (GEMV[0]._replace(mode=1), False)],
                         ids=["plain", "prefetch_xvec_next", "xvec"])
def test_gemv_variant(dtype, m, n, k, cfg, prefetch):
    _need_triton()
    x, q, s = _inputs(m, n, k, dtype, seed=m * 100 + n + k)
    out = torch.empty(m, n, dtype=dtype, device=DEVICE)
    i8.launch_int8_matmul(x, q, s, out, cfg, prefetch=prefetch)
    atol, rtol = _tol(dtype, k)
    assert_close(out, _expected(x, q, s).to(dtype), atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("m,n,k", [(1, *SHAPES[0]), (3, *SHAPES[1]), (17, *SHAPES[2]),
                                   (17, *SHAPES[0])])
@pytest.mark.parametrize("cfg", GEMM + [Cfg("dequant", 0, 0, 4)], ids=lambda c: c.label)
def test_gemm_and_dequant_variants(dtype, m, n, k, cfg):
    _need_triton()
    if not i8.valid_config(cfg, k):
        pytest.skip(f"{cfg.label} does not divide K={k}")
    x, q, s = _inputs(m, n, k, dtype, seed=m * 100 + n + k + 1)
    out = torch.empty(m, n, dtype=dtype, device=DEVICE)
    i8.launch_int8_matmul(x, q, s, out, cfg)
    atol, rtol = _tol(dtype, k)
    if cfg.variant == "dequant" and dtype == torch.float16:
        rtol = 2e-3  # the weight is rounded to fp16 before cuBLAS
    assert_close(out, _expected(x, q, s).to(dtype), atol=atol, rtol=rtol)


# the gemm kernel at odd sizes: M past a block, N odd (masked rows), several K steps, both
# operand roles
ODD_GEMM = [Cfg("gemm", 16, 32, 4, 2, 16), Cfg("gemm", 32, 64, 4, 2, 32),
            Cfg("gemm", 16, 16, 4, 1, 32, 1), Cfg("gemm", 32, 64, 4, 2, 16, 1),
            # split K: 8 steps into runs of 3, 3, 2 (each run scaled before the sum); 4 steps
            # into 4; the batch on the M side, 2 runs
            Cfg("gemm", 16, 32, 4, 2, 16, 0, 3), Cfg("gemm", 32, 64, 4, 2, 16, 0, 8),
            Cfg("gemm", 16, 32, 4, 1, 32, 1, 2)]


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("cfg", ODD_GEMM, ids=lambda c: c.label)
def test_gemm_odd_shapes(dtype, cfg):
    _need_triton()
    m, n, k = 19, 37, 256
    x, q, s = _inputs(m, n, k, dtype, seed=11)
    out = torch.empty(m, n, dtype=dtype, device=DEVICE)
    i8.launch_int8_matmul(x, q, s, out, cfg)
    atol, rtol = _tol(dtype, k)
    assert_close(out.float(), i8.int8_matmul_ref(x.float(), q, s), atol=atol, rtol=rtol)


def test_reference():
    x, q, s = _inputs(5, 24, 128, torch.float32, seed=7, device="cpu")
    assert_close(i8.int8_matmul_ref(x, q, s), _expected(x, q, s).float(), atol=2e-5)


@pytest.mark.parametrize("m", [1, 4, 17])
def test_op_default_configs_and_odd_k(m):
    """The torch op with its heuristic config (fp16 scales); K = 40 (not a multiple of 16)
    runs the dequantize path."""
    _need_triton()
    for n, k in [(40, 192), (12, 40)]:
        x, q, s = _inputs(m, n, k, torch.float32, seed=m + k)
        s = s.to(torch.float16)
        out = torch.ops.fuselm.int8_matmul(x, q, s)
        atol, rtol = _tol(torch.float32, k)
        assert_close(out, _expected(x, q, s).float(), atol=atol, rtol=rtol)


def test_opcheck():
    _need_triton()
    x, q, s = _inputs(2, 16, 64, torch.float32, seed=3)
    torch.library.opcheck(torch.ops.fuselm.int8_matmul.default, (x, q, s))


def test_bad_input():
    x, q, s = _inputs(1, 8, 64, torch.float32, seed=1, device="cpu")
    with pytest.raises(ValueError, match="qweight"):
        i8.int8_matmul_ref(x, q[:, :16], s)
    with pytest.raises(ValueError, match="int8"):
        i8.int8_matmul_ref(x, q.to(torch.uint8), s)
    with pytest.raises(ValueError, match="scales"):
        i8.int8_matmul_ref(x, q, s[:4])
    with pytest.raises(ValueError, match="cannot run"):
        i8.launch_int8_matmul(x, q, s, torch.empty(1, 8), Cfg("gemm", 16, 48, 4))
    for cfg in (Cfg("gemm", 16, 32, 4, split_k=-1), Cfg("gemv", 8, 64, 2, split_k=2)):
        with pytest.raises(ValueError, match="cannot run"):
            i8.launch_int8_matmul(x, q, s, torch.empty(1, 8), cfg)


def test_resolver_rows():
    assert "reference" in available_backends("int8_matmul")


def test_dequant_bf16_keeps_the_bytes_exact():
    """bf16 ``dequant`` multiplies the output, not the weight, by the scale: q * s rounded to
    bf16 put near-zero outputs up to 1.4% of the std off (H200 8B shapes at M = 256); the
    error is now relative to each output (two bf16 roundings)."""
    x, q, s = _inputs(64, 48, 2048, torch.bfloat16, seed=17, device="cpu")
    s = s.to(torch.bfloat16)
    out = torch.empty(64, 48, dtype=torch.bfloat16)
    i8.launch_int8_matmul(x, q, s, out, Cfg("dequant", 0, 0, 4))
    expected = _expected(x, q, s)
    assert_close(out.double(), expected, atol=1e-4 * expected.std().item(), rtol=2**-7)


def test_swap_ab_over_two_warp_groups_rejected():
    """Swap-AB gemm with 128 weight rows over 8 warps and 128 batch rows wrote garbage on the
    H200 (half the outputs of test_gpu_bf16_variants): rejected; its neighbours ran right."""
    assert not i8.valid_config(Cfg("gemm", 128, 64, 8, 3, 128), 4096)
    assert i8.valid_config(Cfg("gemm", 128, 64, 8, 3, 128, 1), 4096)  # batch as M
    assert i8.valid_config(Cfg("gemm", 128, 64, 8, 4, 64), 4096)  # 64 batch rows
    assert i8.valid_config(Cfg("gemm", 64, 128, 4, 3, 16), 4096)


def test_config_choice():
    cpu = torch.device("cpu")
    assert i8.config_for(128256, 4096, 1, cpu).variant == "gemv"
    assert i8.config_for(4096, 4096, 64, cpu).variant == "gemm"
    assert i8.config_for(64, 40, 1, cpu).variant == "dequant"
    assert i8.shape_bucket(4096, 14336, 17) == "n4096_k14336_m64"


# ---- GPU ------------------------------------------------------------------------------------

GPU_SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (128256, 4096)]


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", GPU_SHAPES)
@pytest.mark.parametrize("m", [1, 4, 16, 64, 256])
def test_gpu_bf16_8b_shapes(n, k, m):
    _need_triton()
    x, q, s = _inputs(m, n, k, torch.bfloat16, seed=n + k + m)
    s = s.to(torch.bfloat16)
    expected = _expected(x, q, s)
    out = torch.ops.fuselm.int8_matmul(x, q, s)
    # bf16 output rounding (2^-9 relative) dominates; the gemm rounds nothing else
    assert_close(out.double(), expected, atol=1e-2 * expected.std().item(), rtol=1e-2)


GPU_VARIANTS = [*GEMV, GEMV[0]._replace(mode=1), GEMV[0]._replace(mode=2), *GEMM,
                Cfg("gemm", 32, 128, 4, 3, 64, 1, 4), Cfg("gemm", 32, 128, 4, 3, 16, 0, 3),
                Cfg("gemm", 64, 128, 4, 3, 16),
                Cfg("gemm", 128, 64, 8, 3, 128, 1), Cfg("gemm", 256, 64, 8, 3, 64, 1),
                Cfg("dequant", 0, 0, 4)]


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", GPU_VARIANTS, ids=lambda c: c.label)
def test_gpu_bf16_variants(cfg):
    _need_triton()
    x, q, s = _inputs(33, 4096, 4096, torch.bfloat16, seed=5)
    expected = _expected(x, q, s)
    out = torch.empty(33, 4096, dtype=torch.bfloat16, device=DEVICE)
    i8.launch_int8_matmul(x, q, s, out, cfg)
    tol = 1e-2 if cfg.variant != "dequant" else 2e-2  # dequant rounds the weight to bf16
    assert_close(out.double(), expected, atol=tol * expected.std().item(), rtol=tol)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cfg", [Cfg("gemm", 64, 128, 4, 3, 16), Cfg("gemm", 128, 64, 8, 4, 64),
                                 Cfg("gemm", 128, 64, 8, 3, 128, 1),
                                 Cfg("gemm", 64, 256, 4, 3, 64, 1),
                                 Cfg("gemm", 32, 128, 4, 3, 64, 1, 3)], ids=lambda c: c.label)
def test_gpu_gemm_odd_shapes(dtype, cfg):
    """The PTX byte conversion (bf16 and fp16) with masked rows (N odd) and a batch tail; the
    weights are exact, so only the output rounding remains."""
    _need_triton()
    m, n, k = 77, 1001, 1024
    x, q, s = _inputs(m, n, k, dtype, seed=13)
    expected = _expected(x, q, s)
    out = torch.empty(m, n, dtype=dtype, device=DEVICE)
    i8.launch_int8_matmul(x, q, s, out, cfg)
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    assert_close(out.double(), expected, atol=tol * expected.std().item(), rtol=tol)
