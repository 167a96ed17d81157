"""The CUDA weight-only GEMV (``cuda_gemv`` of int4_matmul / int8_matmul, csrc/quant_gemv.cu)
against independent float64 dequantize-then-matmuls of the canonical layouts: fp16 and bf16 x,
M = 1..16, odd N, every launch the kernel has (both weight streams), the Llama-3-8B shapes,
CUDA graph capture and the fallback to Triton; the e4m3 (W8A16) entry every finite byte. The
config choice runs on CPU."""

from __future__ import annotations

import pytest
import torch
from helpers import replay_on_fresh_input
from tolerances import assert_close

from fuselm.kernels import int4_matmul as i4
from fuselm.kernels import int8_matmul as i8
from fuselm.kernels import quant_gemv
from fuselm.kernels.int4_matmul import QuantMatmulConfig as Cfg

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.bfloat16, torch.float16]
# (block_n, num_warps, num_stages): warp counts up to 16, odd ones too; stages 1 the strided
# stream, 2 and 4 the ring of that depth, 3 the lean ring (13: its two-accumulator form)
LAUNCHES = [(16, 8, 1), (16, 16, 1), (16, 3, 1), (16, 8, 2), (16, 1, 2), (16, 5, 2),
            (16, 16, 4), (16, 3, 4), (16, 7, 4), (16, 8, 3), (16, 1, 3), (16, 5, 3), (16, 16, 3),
            (16, 3, 13), (16, 16, 13)]


def _stages_for(m):
    """A weight stream that takes m rows, cycling through them as m grows."""
    streams = [s for s in quant_gemv.STAGES if m <= quant_gemv.max_rows(s)]
    return streams[m % len(streams)]


def _need_cuda_gemv():
    if not quant_gemv.available():
        pytest.skip("CUDA extension not loaded")


def _int4_inputs(m, n, k, g, dtype, seed, scale_dtype=None):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    x = torch.randn(m, k, generator=gen, device=DEVICE).to(dtype)
    q = torch.randint(0, 256, (n, k // 2), generator=gen, dtype=torch.uint8, device=DEVICE)
    s = (torch.rand(n, k // g, generator=gen, device=DEVICE) * 0.02 + 0.005).to(
        scale_dtype or dtype)
    z = torch.randint(0, 16, (n, k // g), generator=gen, dtype=torch.uint8, device=DEVICE)
    return x, q, s, z


def _int4_expected(x, q, s, z, g):
    """float64 x @ W.T; W[n, 2j] low nibble of byte j, W[n, 2j + 1] its high nibble."""
    w = torch.empty(q.shape[0], 2 * q.shape[1], dtype=torch.float64, device=q.device)
    w[:, 0::2], w[:, 1::2] = (q & 15).double(), (q >> 4).double()
    groups = torch.arange(w.shape[1], device=q.device) // g
    return x.double() @ ((w - z.double()[:, groups]) * s.double()[:, groups]).t()


def _int8_inputs(m, n, k, dtype, seed, scale_dtype=None):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    x = torch.randn(m, k, generator=gen, device=DEVICE).to(dtype)
    q = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8, device=DEVICE)
    s = (torch.rand(n, generator=gen, device=DEVICE) * 0.002 + 0.0005).to(scale_dtype or dtype)
    return x, q, s


def _int8_expected(x, q, s):
    return x.double() @ (q.double() * s.double()[:, None]).t()


def _fp8_inputs(m, n, k, dtype, seed):
    """e4m3 weights of every finite byte value (subnormals and both zeros too), fp32 scales."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    x = torch.randn(m, k, generator=gen, device=DEVICE).to(dtype)
    finite = torch.tensor([b for b in range(256) if b & 0x7F != 0x7F], dtype=torch.uint8,
                          device=DEVICE)
    idx = torch.randint(0, finite.numel(), (n, k), generator=gen, device=DEVICE)
    q = finite[idx].view(torch.float8_e4m3fn)
    s = torch.rand(n, generator=gen, device=DEVICE) * 0.002 + 0.0005
    return x, q, s


def _fp8_expected(x, q, s):
    return x.double() @ (q.double() * s.double()[:, None]).t()


def _check(out, expected, dtype):
    # the products and their sums are fp32-exact; the output rounding dominates
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-3
    assert_close(out.double(), expected, atol=tol * expected.std().item(), rtol=tol)


# ---- config choice (CPU) --------------------------------------------------------------------


def test_default_config_small_m():
    cfg = i4.default_config(4096, 4096, 128, 1, cuda=True)
    assert cfg.variant == "cuda_gemv" and quant_gemv.valid_launch(cfg.block_n, cfg.num_warps,
                                                                  cfg.num_stages)
    assert i4.default_config(4096, 4096, 128, 16, cuda=True).variant == "cuda_gemv"
    assert i4.default_config(4096, 4096, 128, 17, cuda=True).variant == "gemm"
    assert i4.default_config(4096, 4096, 64, 1, cuda=True).variant == "gemv"  # G % 128 != 0
    assert i4.default_config(4096, 4096, 128, 1, cuda=False).variant == "gemv"
    assert i8.default_config(4096, 14336, 4, cuda=True).variant == "cuda_gemv"
    assert i8.default_config(4096, 4128, 1, cuda=True).variant == "gemv"  # K % 64 != 0
    assert i8.default_config(4096, 4096, 1, cuda=False).variant == "gemv"
    assert Cfg.from_dict(cfg.to_dict()) == cfg
    for n, k_steps in [(4096, 32), (28672, 32), (4096, 112), (16, 1), (7, 3)]:
        launch = quant_gemv.default_launch(n, k_steps, 16)
        assert quant_gemv.valid_launch(*launch) and launch[1] <= max(1, k_steps)
        assert quant_gemv.max_rows(launch[2]) == 16
    assert not quant_gemv.valid_launch(32, 8, 2) and not quant_gemv.valid_launch(16, 8, 5)
    assert quant_gemv.max_rows(3) == quant_gemv.max_rows(13) == 8  # the lean ring
    assert not quant_gemv.valid_launch(16, 17, 2)


def test_packaged_tables_name_valid_launches():
    """Every cuda_gemv entry of the tuning tables is a launch the kernel has, in a batch bucket
    its stream serves (m1, m4; m16 for the ring)."""
    import json

    from fuselm.kernels.extension import CSRC_DIR

    found = 0
    for op in ("int4_matmul", "int8_matmul"):
        table = json.loads((CSRC_DIR.parent / "configs" / f"{op}.json").read_text())
        for gpu, entries in table.items():
            if gpu.startswith("_"):
                continue
            for bucket, entry in entries.items():
                if "triton" not in entry:  # a shape's dense_from_m entry
                    continue
                cfg = Cfg.from_dict(entry["triton"])
                if cfg.variant == "cuda_gemv":
                    found += 1
                    ring = quant_gemv.max_rows(cfg.num_stages) >= 16
                    assert bucket.endswith(("_m1", "_m4")) or (
                        bucket.endswith("_m16") and ring), bucket
                    assert quant_gemv.valid_launch(cfg.block_n, cfg.num_warps, cfg.num_stages)
    assert found > 0


# ---- GPU ------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", range(1, 17))
def test_gpu_int4_batch_and_odd_n(dtype, m):
    _need_cuda_gemv()
    for n, k, g in [(333, 512, 128), (40, 768, 256), (16, 128, 128), (21, 2816, 128),
                    (37, 2816, 2816), (19, 1536, 384)]:
        x, q, s, z = _int4_inputs(m, n, k, g, dtype, seed=m * 10 + n)
        out = torch.full((m, n), float("nan"), dtype=dtype, device=DEVICE)
        assert quant_gemv.launch_int4_gemv(x, q, s, z, g, out, 16, 1 + m % 5, _stages_for(m),
                                           False)
        _check(out, _int4_expected(x, q, s, z, g), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", range(1, 17))
def test_gpu_int8_batch_and_odd_n(dtype, m):
    _need_cuda_gemv()
    for n, k in [(333, 512), (40, 704), (16, 64), (21, 2880)]:
        x, q, s = _int8_inputs(m, n, k, dtype, seed=m * 10 + n)
        out = torch.full((m, n), float("nan"), dtype=dtype, device=DEVICE)
        assert quant_gemv.launch_int8_gemv(x, q, s, out, 16, 1 + m % 5, _stages_for(m), False)
        _check(out, _int8_expected(x, q, s), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", range(1, 17))
def test_gpu_fp8_batch_and_odd_n(dtype, m):
    """e4m3 weights (every finite byte) through both streams against float64."""
    _need_cuda_gemv()
    for n, k in [(333, 512), (40, 704), (21, 2880)]:
        x, q, s = _fp8_inputs(m, n, k, dtype, seed=m * 10 + n)
        out = torch.full((m, n), float("nan"), dtype=dtype, device=DEVICE)
        assert quant_gemv.launch_fp8_gemv(x, q, s, out, 16, 1 + m % 5, _stages_for(m), False)
        _check(out, _fp8_expected(x, q, s), dtype)


@pytest.mark.gpu
def test_gpu_fp8_w8a16_entry_and_refusals():
    """``fp8_w8a16_gemv`` on an 8B shape; None for what it does not take (9+ rows, a
    per-tensor scale, K % 64 != 0)."""
    _need_cuda_gemv()
    x, q, s = _fp8_inputs(4, 6144, 4096, torch.bfloat16, seed=3)
    _check(quant_gemv.fp8_w8a16_gemv(x, q, s), _fp8_expected(x, q, s), torch.bfloat16)
    x9, _, _ = _fp8_inputs(quant_gemv.FP8_MAX_M + 1, 64, 4096, torch.bfloat16, seed=4)
    assert quant_gemv.fp8_w8a16_gemv(x9, q[:64], s[:64]) is None
    assert quant_gemv.fp8_w8a16_gemv(x, q, s[:1]) is None
    xo, qo, so = _fp8_inputs(2, 64, 96, torch.bfloat16, seed=5)
    assert quant_gemv.fp8_w8a16_gemv(xo, qo, so) is None


@pytest.mark.gpu
@pytest.mark.parametrize("launch", LAUNCHES, ids=lambda c: "n{}_w{}_s{}".format(*c))
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_every_launch_and_scale_dtype(launch, scale_dtype):
    _need_cuda_gemv()
    block_n, warps, stages = launch
    rows = [(1, torch.bfloat16), (5, torch.float16), (8, torch.bfloat16), (13, torch.float16)]
    for m, dtype in [r for r in rows if r[0] <= quant_gemv.max_rows(stages)]:
        x, q, s, z = _int4_inputs(m, 1000 + 1, 2560, 128, dtype, seed=m, scale_dtype=scale_dtype)
        out = torch.full((m, 1001), float("nan"), dtype=dtype, device=DEVICE)
        assert quant_gemv.launch_int4_gemv(x, q, s, z, 128, out, block_n, warps, stages, True)
        _check(out, _int4_expected(x, q, s, z, 128), dtype)
        x, q, s = _int8_inputs(m, 1001, 2560, dtype, seed=m, scale_dtype=scale_dtype)
        out = torch.full((m, 1001), float("nan"), dtype=dtype, device=DEVICE)
        assert quant_gemv.launch_int8_gemv(x, q, s, out, block_n, warps, stages, False)
        _check(out, _int8_expected(x, q, s), dtype)


GPU_SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", GPU_SHAPES)
@pytest.mark.parametrize("m,dtype", [(1, torch.bfloat16), (4, torch.float16),
                                     (8, torch.bfloat16), (16, torch.float16)])
def test_gpu_8b_shapes(n, k, m, dtype):
    """The Llama-3-8B projections through the op's own config (the tuning table's entry, else
    the heuristic) and through the default launch."""
    _need_cuda_gemv()
    x, q, s, z = _int4_inputs(m, n, k, 128, dtype, seed=n + k + m)
    expected = _int4_expected(x, q, s, z, 128)
    _check(torch.ops.fuselm.int4_matmul(x, q, s, z, 128), expected, dtype)
    out = torch.empty(m, n, dtype=dtype, device=DEVICE)
    i4.launch_int4_matmul(x, q, s, z, 128, out, i4.default_config(n, k, 128, m, cuda=True))
    _check(out, expected, dtype)
    x, q, s = _int8_inputs(m, n, k, dtype, seed=n + k + m)
    expected = _int8_expected(x, q, s)
    _check(torch.ops.fuselm.int8_matmul(x, q, s), expected, dtype)
    i8.launch_int8_matmul(x, q, s, out, i8.default_config(n, k, m, cuda=True))
    _check(out, expected, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("pdl", [False, True])
def test_gpu_cuda_graph(pdl):
    """Captured with fresh x values replayed: no host sync or allocation inside the op."""
    _need_cuda_gemv()
    x, q, s, z = _int4_inputs(3, 4096, 4096, 128, torch.bfloat16, seed=11)
    x8, q8, s8 = _int8_inputs(3, 4096, 4096, torch.bfloat16, seed=12)
    out = torch.empty(3, 4096, dtype=torch.bfloat16, device=DEVICE)
    out8 = torch.empty_like(out)

    def step():
        quant_gemv.launch_int4_gemv(x, q, s, z, 128, out, 16, 8, 1, pdl)
        quant_gemv.launch_int8_gemv(out, q8, s8, out8, 16, 8, 4, pdl)

    replay_on_fresh_input(step, x)
    expected = _int4_expected(x, q, s, z, 128)
    _check(out, expected, torch.bfloat16)
    _check(out8, _int8_expected(out, q8, s8), torch.bfloat16)


@pytest.mark.gpu
def test_gpu_fallback_to_triton():
    """Inputs the CUDA kernel does not take (fp32 x, 17 rows, 9 rows for the strided stream,
    an unaligned x view) run the Triton default under a cuda_gemv config."""
    _need_cuda_gemv()
    for m, dtype, offset, stages in [(1, torch.float32, 0, 2), (17, torch.bfloat16, 0, 4),
                                     (9, torch.float16, 0, 1), (2, torch.bfloat16, 1, 2)]:
        cfg = Cfg("cuda_gemv", 16, 0, 8, stages)
        x, q, s, z = _int4_inputs(m, 64, 512, 128, dtype, seed=m)
        if offset:  # rows 16-byte apart, but the view starts 2 bytes in
            wide = torch.zeros(m, 520, dtype=dtype, device=DEVICE)
            wide[:, offset:offset + 512] = x
            x = wide[:, offset:offset + 512]
        assert not quant_gemv.launch_int4_gemv(x, q, s, z, 128, torch.empty(m, 64, dtype=dtype,
                                               device=DEVICE), 16, 8, stages, False)
        out = torch.empty(m, 64, dtype=dtype, device=DEVICE)
        i4.launch_int4_matmul(x, q, s, z, 128, out, cfg)
        tol = 1e-4 if dtype == torch.float32 else 1e-2
        expected = _int4_expected(x, q, s, z, 128)
        assert_close(out.double(), expected, atol=tol * expected.std().item(), rtol=tol)


@pytest.mark.gpu
def test_gpu_opcheck():
    _need_cuda_gemv()
    x, q, s, z = _int4_inputs(2, 32, 256, 128, torch.bfloat16, seed=5)
    out = torch.empty(2, 32, dtype=torch.bfloat16, device=DEVICE)
    torch.library.opcheck(torch.ops.fuselm_C.int4_gemv.default,
                          (out, x, q, s, z, 128, 4, 2, False))
    x, q, s = _int8_inputs(2, 32, 256, torch.float16, seed=6)
    out = torch.empty(2, 32, dtype=torch.float16, device=DEVICE)
    torch.library.opcheck(torch.ops.fuselm_C.int8_gemv.default, (out, x, q, s, 4, 2, True))
    x, q, s = _fp8_inputs(2, 32, 256, torch.bfloat16, seed=7)
    out = torch.empty(2, 32, dtype=torch.bfloat16, device=DEVICE)
    # test_schema perturbs the inputs with a multiply, which torch lacks for float8_e4m3fn
    torch.library.opcheck(torch.ops.fuselm_C.fp8_gemv.default, (out, x, q, s, 4, 1, True),
                          test_utils=("test_autograd_registration", "test_faketensor"))


@pytest.mark.gpu
def test_gpu_op_checks_raise_with_numbers():
    """The ops' own checks raise RuntimeErrors whose messages carry numbers and shapes (built
    as strings: streaming a long from the extension crashed the process on the device image)."""
    _need_cuda_gemv()
    x, q, s = _int8_inputs(17, 16, 64, torch.bfloat16, seed=1)
    out = torch.empty(17, 16, dtype=torch.bfloat16, device=DEVICE)
    with pytest.raises(RuntimeError, match="at most 16 rows, got 17"):
        torch.ops.fuselm_C.int8_gemv(out, x, q, s, 4, 1, False)
    with pytest.raises(RuntimeError, match=r"out must be 2-D \[rows, cols\], got \[1, 3, 16\]"):
        torch.ops.fuselm_C.int8_gemv(out[None, :3], x[:3], q, s, 4, 1, False)
