"""int4_matmul (W4A16, group-wise with zero points): every Triton variant against an independent
float64 dequantize-then-matmul of the canonical layout, under the interpreter on CPU (fp32, fp16)
and at the Llama-3-8B shapes in bf16 on the GPU."""

from __future__ import annotations

import pytest
import torch
from tolerances import assert_close, tolerance

from fuselm.kernels import available_backends, triton_utils
from fuselm.kernels import int4_matmul as i4
from fuselm.kernels.int4_matmul import QuantMatmulConfig as Cfg

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CPU_DTYPES = [torch.float32, torch.float16]


def _need_triton():
    if not triton_utils.triton_available():
        pytest.skip("triton not available here")


def _inputs(m, n, k, g, dtype, seed, device=DEVICE):
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)  # on the device: 8B shapes are big
    x = torch.randn(m, k, generator=gen, device=device).to(dtype)
    q = torch.randint(0, 256, (n, k // 2), generator=gen, dtype=torch.uint8, device=device)
    s = torch.rand(n, k // g, generator=gen, device=device) * 0.02 + 0.005
    z = torch.randint(0, 16, (n, k // g), generator=gen, dtype=torch.uint8, device=device)
    return x, q, s, z


def _expected(x, q, s, z, g, swap_nibbles=False):
    """float64 x @ W.T, W[n, 2j] = low nibble of byte j, W[n, 2j + 1] = high nibble (spec), each
    minus its group's zero, times its group's scale; written out without the module's code."""
    lo, hi = (q & 15).double(), (q >> 4).double()
    if swap_nibbles:
        lo, hi = hi, lo
    w = torch.empty(q.shape[0], 2 * q.shape[1], dtype=torch.float64, device=q.device)
    w[:, 0::2], w[:, 1::2] = lo, hi
    groups = torch.arange(w.shape[1], device=q.device) // g
    w = (w - z.double()[:, groups]) * s.double()[:, groups]
    return x.double() @ w.t()


def _tol(dtype, k):
    # fp32 accumulation in another order than float64; the gemv's 1 + q/16 trick costs 4 bits
    atol, rtol = tolerance(dtype)
    return atol * max(1.0, (k / 64) ** 0.5), max(rtol, 4e-6)


GEMV = [Cfg("gemv", 4, 256, 4), Cfg("gemv", 8, 128, 2, 2, 16, 3)]
GEMM = [Cfg("gemm", 16, 32, 4, 1, 16), Cfg("gemm", 32, 16, 4, 2, 32),
        Cfg("gemm", 32, 32, 4, 2, 16, 1)]  # mode 1: the batch on the MMA's M side
SHAPES = [(33, 96, 32), (20, 192, 64), (24, 256, 128)]


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("m,n,k,g", [(1, *SHAPES[0]), (3, *SHAPES[1]), (1, *SHAPES[1])])
@pytest.mark.parametrize("cfg,prefetch", [(GEMV[0], False), (GEMV[1], True),
                                          (GEMV[0]._replace(mode=1), False)],
                         ids=["plain", "prefetch_xvec_next", "xvec"])
def test_gemv_variant(dtype, m, n, k, g, cfg, prefetch):
    _need_triton()
    x, q, s, z = _inputs(m, n, k, g, dtype, seed=m * 100 + n + k)
    out = torch.empty(m, n, dtype=dtype, device=DEVICE)
    i4.launch_int4_matmul(x, q, s, z, g, out, cfg, prefetch=prefetch)
    atol, rtol = _tol(dtype, k)
    assert_close(out, _expected(x, q, s, z, g).to(dtype), atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("m,n,k,g", [(1, *SHAPES[0]), (3, *SHAPES[1]), (17, *SHAPES[2]),
                                     (17, *SHAPES[0])])
@pytest.mark.parametrize("cfg", GEMM + [Cfg("dequant", 0, 0, 4)], ids=lambda c: c.label)
def test_gemm_and_dequant_variants(dtype, m, n, k, g, cfg):
    _need_triton()
    x, q, s, z = _inputs(m, n, k, g, dtype, seed=m * 100 + n + k + 1)
    out = torch.empty(m, n, dtype=dtype, device=DEVICE)
    i4.launch_int4_matmul(x, q, s, z, g, out, cfg)
    atol, rtol = _tol(dtype, k)
    if cfg.variant == "dequant" and dtype == torch.float16:
        rtol = 2e-3  # the weight is rounded to fp16 before cuBLAS
    assert_close(out, _expected(x, q, s, z, g).to(dtype), atol=atol, rtol=rtol)


# the gemm kernel at odd sizes: M past a block, N odd (masked rows), 4 groups, K steps of a
# group and less, both operand roles
ODD_GEMM = [Cfg("gemm", 16, 32, 4, 2, 16), Cfg("gemm", 32, 64, 4, 2, 32),
            Cfg("gemm", 16, 16, 4, 1, 32, 1), Cfg("gemm", 32, 64, 4, 2, 16, 1),
            # split K: 8 steps into runs of 3, 3, 2 (the second starts inside a group); 4
            # steps into 4 (more splits asked than steps); the batch on the M side, 2 runs
            Cfg("gemm", 16, 32, 4, 2, 16, 0, 3), Cfg("gemm", 32, 64, 4, 2, 16, 0, 8),
            Cfg("gemm", 16, 32, 4, 1, 32, 1, 2)]


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("cfg", ODD_GEMM, ids=lambda c: c.label)
def test_gemm_odd_shapes(dtype, cfg):
    _need_triton()
    m, n, k, g = 19, 37, 256, 64
    x, q, s, z = _inputs(m, n, k, g, dtype, seed=11)
    out = torch.empty(m, n, dtype=dtype, device=DEVICE)
    i4.launch_int4_matmul(x, q, s, z, g, out, cfg)
    # the kernel rounds each scale, then each weight (q - z) * s, to x's dtype (fp16 here)
    s_used = s.to(dtype).float()
    ref = i4.int4_matmul_ref(x.float(), q, s_used, z, g)
    atol, rtol = _tol(dtype, k)
    assert_close(out.float(), ref, atol=atol, rtol=2e-3 if dtype == torch.float16 else rtol)


def test_reference_and_sensitivity():
    """The module's reference equals the float64 expectation, and that expectation tells the
    nibble order apart (the kernels' tests could not pass with swapped nibbles)."""
    x, q, s, z = _inputs(5, 24, 128, 32, torch.float32, seed=7, device="cpu")
    expected = _expected(x, q, s, z, 32)
    assert_close(i4.int4_matmul_ref(x, q, s, z, 32), expected.float(), atol=2e-5)
    assert (_expected(x, q, s, z, 32, swap_nibbles=True) - expected).abs().max() > 0.1


@pytest.mark.parametrize("m", [1, 4, 17])
def test_op_default_configs_and_odd_group(m):
    """The torch op with its heuristic config; a group size the kernels do not cover (6: not a
    multiple of 8) runs the dequantize path."""
    _need_triton()
    for n, k, g in [(40, 192, 64), (12, 48, 6)]:
        x, q, s, z = _inputs(m, n, k, g, torch.float32, seed=m + k)
        out = torch.ops.fuselm.int4_matmul(x, q, s.to(torch.float16), z, g)
        atol, rtol = _tol(torch.float32, k)
        assert_close(out, _expected(x, q, s.to(torch.float16), z, g).float(), atol=atol,
                     rtol=rtol)


def test_opcheck():
    _need_triton()
    x, q, s, z = _inputs(1, 16, 64, 32, torch.float32, seed=3)  # M = 1: fast under the interpreter
    torch.library.opcheck(torch.ops.fuselm.int4_matmul.default, (x, q, s, z, 32))


def test_bad_input():
    x, q, s, z = _inputs(1, 8, 64, 32, torch.float32, seed=1, device="cpu")
    with pytest.raises(ValueError, match="qweight"):
        i4.int4_matmul_ref(x, q[:, :16], s, z, 32)
    with pytest.raises(ValueError, match="uint8"):
        i4.int4_matmul_ref(x, q.to(torch.int8), s, z, 32)
    with pytest.raises(ValueError, match="group_size"):
        i4.int4_matmul_ref(x, q, s, z, 24)
    with pytest.raises(ValueError, match="scales"):
        i4.int4_matmul_ref(x, q, s[:, :1], z, 32)
    with pytest.raises(ValueError, match="zeros"):
        i4.int4_matmul_ref(x, q, s, z.to(torch.int32), 32)
    with pytest.raises(ValueError, match="variant"):
        Cfg.from_dict({"variant": "splitk"})
    with pytest.raises(ValueError, match="cannot run"):
        i4.launch_int4_matmul(x, q, s, z, 32, torch.empty(1, 8), Cfg("gemm", 16, 64, 4))
    for cfg in (Cfg("gemm", 16, 32, 4, split_k=0), Cfg("dequant", 0, 0, 4, split_k=2)):
        with pytest.raises(ValueError, match="cannot run"):
            i4.launch_int4_matmul(x, q, s, z, 32, torch.empty(1, 8), cfg)


def test_split_k_config_round_trips_the_table():
    cfg = Cfg("gemm", 32, 128, 4, 3, 64, 1, 4)
    assert Cfg.from_dict(cfg.to_dict()) == cfg and cfg.label.endswith("_x1_sk4")
    assert Cfg.from_dict({"variant": "gemm", "block_n": 32, "block_k": 128}).split_k == 1


def test_resolver_rows():
    assert "reference" in available_backends("int4_matmul")


def test_config_choice():
    assert [i4.m_bucket(m) for m in (1, 2, 4, 5, 16, 64, 65, 300)] == [1, 4, 4, 16, 16, 64,
                                                                         256, 256]
    cpu = torch.device("cpu")
    assert i4.config_for(4096, 4096, 128, 1, cpu).variant == "gemv"
    big = i4.config_for(4096, 4096, 128, 256, cpu)
    assert big.variant == "gemm" and i4.valid_config(big, 128) and big.block_m == 128
    assert i4.config_for(64, 96, 6, 1, cpu).variant == "dequant"
    assert i4.shape_bucket(4096, 4096, 128, 3) == "n4096_k4096_g128_m4"


# ---- GPU ------------------------------------------------------------------------------------

GPU_SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", GPU_SHAPES)
@pytest.mark.parametrize("m", [1, 4, 16, 64, 256])
def test_gpu_bf16_8b_shapes(n, k, m):
    _need_triton()
    x, q, s, z = _inputs(m, n, k, 128, torch.bfloat16, seed=n + k + m)
    s = s.to(torch.bfloat16)
    expected = _expected(x, q, s, z, 128)
    out = torch.ops.fuselm.int4_matmul(x, q, s, z, 128)
    # bf16 output rounding (2^-9 relative) dominates; gemm / dequant round each weight to bf16
    # (~0.15% of the std per output, the scales being bf16 already)
    assert_close(out.double(), expected, atol=1e-2 * expected.std().item(), rtol=1e-2)


GPU_VARIANTS = [*GEMV, GEMV[0]._replace(mode=1), GEMV[0]._replace(mode=2), *GEMM,
                Cfg("gemm", 32, 128, 4, 3, 64, 1, 4), Cfg("gemm", 32, 128, 4, 3, 16, 0, 3),
                Cfg("gemm", 128, 128, 8, 3, 128), Cfg("gemm", 64, 128, 4, 3, 16),
                Cfg("gemm", 128, 64, 8, 3, 128, 1), Cfg("gemm", 256, 64, 8, 3, 64, 1),
                Cfg("dequant", 0, 0, 4)]


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", GPU_VARIANTS, ids=lambda c: c.label)
def test_gpu_bf16_variants(cfg):
    _need_triton()
    x, q, s, z = _inputs(33, 4096, 4096, 128, torch.bfloat16, seed=5)
    expected = _expected(x, q, s, z, 128)
    out = torch.empty(33, 4096, dtype=torch.bfloat16, device=DEVICE)
    i4.launch_int4_matmul(x, q, s, z, 128, out, cfg)
    # gemm and dequant round each weight (q - z) * s to bf16, gemm the fp32 scale too first:
    # a few outputs of this seed land 1.0% of the std off (1.3% in a CPU emulation), the same
    # for both; gemv keeps the weights exact
    tol = 1e-2 if cfg.variant == "gemv" else 2e-2
    assert_close(out.double(), expected, atol=tol * expected.std().item(), rtol=tol)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cfg", [Cfg("gemm", 64, 128, 4, 3, 16), Cfg("gemm", 128, 64, 8, 4, 64),
                                 Cfg("gemm", 128, 64, 8, 3, 128, 1),
                                 Cfg("gemm", 64, 64, 4, 3, 64, 1),
                                 Cfg("gemm", 32, 128, 4, 3, 64, 1, 3)], ids=lambda c: c.label)
def test_gpu_gemm_odd_shapes(dtype, cfg):
    """The PTX dequantization (bf16 and fp16) with masked rows (N odd) and a batch tail."""
    _need_triton()
    m, n, k, g = 77, 1001, 1024, 128
    x, q, s, z = _inputs(m, n, k, g, dtype, seed=13)
    s = s.to(dtype)
    expected = _expected(x, q, s, z, g)
    out = torch.empty(m, n, dtype=dtype, device=DEVICE)
    i4.launch_int4_matmul(x, q, s, z, g, out, cfg)
    # the weights are rounded to x's dtype (as ``dequant``): ~2^-9 (bf16) of each term
    tol = 1e-2 if dtype == torch.bfloat16 else 3e-3
    assert_close(out.double(), expected, atol=tol * expected.std().item(), rtol=tol)
