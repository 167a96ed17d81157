"""FP8 (e4m3fn) W8A8: the references against independent float64 math, the Triton kernels
(under the interpreter on a CPU: it runs fp8 loads and dots) and torch._scaled_mm against the
references, and the torch ops' registrations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tolerances import FP8_SUM_ATOL, assert_close

from fuselm.kernels import available_backends, resolve
from fuselm.kernels import fp8_matmul as fm
from fuselm.kernels import fp8_triton as ft

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FP8 = torch.float8_e4m3fn


def _need(op: str, backend: str = "triton"):
    if backend not in available_backends(op):
        pytest.skip(f"{backend} backend of {op} not available here")


def e4m3_grid_step(v: np.ndarray) -> np.ndarray:
    """Spacing of the e4m3 values around |v| (float64): 2**(e - 3) in binade e, 2**-9 below
    the smallest normal 2**-6. Independent of torch's and Triton's casts."""
    e = np.floor(np.log2(np.maximum(np.abs(v), 2.0**-6)))
    return 2.0 ** (e - 3)


def check_quantized(q: torch.Tensor, scale: torch.Tensor, x: torch.Tensor, name: str) -> None:
    """q is the nearest e4m3 value of clamp(x / scale) (ties either way: the float32 division
    may round a float64 tie to one side), computed in float64."""
    v = np.clip(x.double().cpu().numpy() / scale.double().cpu().numpy(), -448.0, 448.0)
    qv = q.float().double().cpu().numpy()
    err = np.abs(qv - v) - 0.5 * e4m3_grid_step(v) * (1 + 1e-5)
    bad = int((err > 1e-12).sum())
    assert bad == 0, f"{name}: {bad} of {q.numel()} values are not the nearest e4m3 value"


# ---- references vs float64 ------------------------------------------------------------------


@pytest.mark.parametrize("m,k", [(1, 1), (5, 300), (17, 129)])
def test_quant_references_vs_float64(m, k):
    g = torch.Generator().manual_seed(m * 1000 + k)
    x = torch.randn(m, k, generator=g) * torch.exp(torch.randn(m, 1, generator=g) * 3)
    q, s = fm.quant_fp8_per_token_ref(x)
    assert q.dtype == FP8 and s.shape == (m, 1) and s.dtype == torch.float32
    expected = np.maximum(np.abs(x.double().numpy()).max(axis=1, keepdims=True) / 448.0,
                          fm.FP8_MIN_SCALE)
    np.testing.assert_allclose(s.double().numpy(), expected, rtol=1e-6)
    check_quantized(q, s, x, "per token")
    qg, sg = fm.quant_fp8_per_token_group_ref(x, 128)
    assert sg.shape == (m, -(-k // 128))
    for j in range(sg.shape[1]):
        cols = slice(128 * j, 128 * (j + 1))
        np.testing.assert_allclose(sg[:, j].double().numpy(), np.maximum(
            np.abs(x[:, cols].double().numpy()).max(axis=1) / 448.0, fm.FP8_MIN_SCALE), rtol=1e-6)
        check_quantized(qg[:, cols], sg[:, j:j + 1], x[:, cols], f"group {j}")
    static = torch.tensor([0.01])
    qs = fm.quant_fp8_static_ref(x, static)
    check_quantized(qs, static.view(1, 1), x, "static")  # saturates at +-448, no NaN
    assert not qs.float().isnan().any()


def test_zero_rows_and_bad_inputs():
    q, s = fm.quant_fp8_per_token_ref(torch.zeros(2, 8))
    assert (q.float() == 0).all() and (s == fm.FP8_MIN_SCALE).all()
    with pytest.raises(ValueError, match="x must be 2-D"):
        fm.quant_fp8_per_token_ref(torch.zeros(8))
    with pytest.raises(ValueError, match="scale must hold one element"):
        fm.quant_fp8_static_ref(torch.zeros(2, 8), torch.ones(2))
    x8, w8 = torch.zeros(2, 8, dtype=FP8), torch.zeros(3, 8, dtype=FP8)
    with pytest.raises(ValueError, match="weight_scale"):
        fm.fp8_matmul_ref(x8, torch.ones(2, 1), w8, torch.ones(2))
    with pytest.raises(ValueError, match="x_scale"):
        fm.fp8_matmul_ref(x8, torch.ones(3, 1), w8, torch.ones(3))
    with pytest.raises(ValueError, match="K="):
        fm.fp8_matmul_ref(x8, torch.ones(2, 1), torch.zeros(3, 9, dtype=FP8), torch.ones(3))
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        fm.fp8_matmul_ref(x8.float(), torch.ones(2, 1), w8, torch.ones(3))
    with pytest.raises(ValueError, match="ceil"):
        fm.fp8_block_matmul_ref(x8, torch.ones(2, 1), w8, torch.ones(2, 1))


def _operands(m, n, k, seed, x_mode="token", w_mode="channel", device=DEVICE):
    """Quantized operands and their dequantized values (x [M, K], w [N, K]): float64 on a CPU,
    float32 on a GPU (there they only bound the error)."""
    g = torch.Generator(device).manual_seed(seed)  # on the device: the 8B shapes are large
    x = torch.randn(m, k, generator=g, device=device) * 3
    w = torch.randn(n, k, generator=g, device=device) / k**0.5
    xq, xs = fm.quant_fp8_per_token_ref(x)
    if x_mode == "tensor":
        xs = xs.max().reshape(1)
        xq = fm.quant_fp8_static_ref(x, xs)
    wq, ws = fm.quant_fp8_per_token_ref(w)
    ws = ws.reshape(n) if w_mode == "channel" else ws.max().reshape(1)
    if w_mode == "tensor":
        wq = fm.quant_fp8_static_ref(w, ws)
    wide = torch.float64 if device.type == "cpu" else torch.float32
    x64 = xq.to(wide) * xs.to(wide).reshape(-1, 1)
    w64 = wq.to(wide) * ws.to(wide).reshape(-1, 1)
    bias = torch.randn(n, generator=g, device=device)
    return [xq, xs, wq, ws, bias], x64, w64


def _sum_atol(x64, w64, kind="float32"):
    return FP8_SUM_ATOL[kind] * float((x64.abs() @ w64.abs().t()).max()) + 1e-6


@pytest.mark.parametrize("x_mode,w_mode", [("token", "channel"), ("tensor", "channel"),
                                           ("token", "tensor"), ("tensor", "tensor")])
def test_matmul_reference_vs_float64(x_mode, w_mode):
    (xq, xs, wq, ws, bias), x64, w64 = _operands(7, 33, 200, 1, x_mode, w_mode,
                                                 torch.device("cpu"))
    expected = x64 @ w64.t() + bias.double()
    out = fm.fp8_matmul_ref(xq, xs, wq, ws, torch.float32, bias)
    assert_close(out, expected.float(), atol=_sum_atol(x64, w64), rtol=1e-5)


def test_block_reference_vs_float64():
    g = torch.Generator().manual_seed(3)
    m, n, k = 5, 200, 300
    xq, xs = fm.quant_fp8_per_token_group_ref(torch.randn(m, k, generator=g), 128)
    wq = (torch.randn(n, k, generator=g) * 100).clamp(-448, 448).to(FP8)
    ws = torch.rand(2, 3, generator=g) + 0.1
    x64 = xq.double() * xs.double().repeat_interleave(128, 1)[:, :k]
    w64 = wq.double().clone()
    for i in range(n):  # block scales applied one element at a time: no broadcasting tricks
        for j in range(0, k, 64):
            w64[i, j:j + 64] *= float(ws[i // 128, j // 128])
    out = fm.fp8_block_matmul_ref(xq, xs, wq, ws, torch.float32)
    assert_close(out, (x64 @ w64.t()).float(), atol=_sum_atol(x64, w64), rtol=1e-5)


# ---- Triton (interpreter on a CPU) and torch._scaled_mm vs the references --------------------

SHAPES = [(1, 33, 129), (3, 64, 256), (20, 50, 200), (37, 48, 96)]
MODES = [("token", "channel"), ("tensor", "channel"), ("token", "tensor"), ("tensor", "tensor")]


def _check_backend(fn, m, n, k, seed, x_mode, w_mode, out_dtype, with_bias):
    (xq, xs, wq, ws, bias), x64, w64 = _operands(m, n, k, seed, x_mode, w_mode)
    b = bias if with_bias else None
    expected = fm.fp8_matmul_ref(xq, xs, wq, ws, torch.float32, b)
    out = fn(xq, xs, wq, ws, out_dtype, b)
    assert out.dtype == out_dtype and out.shape == (m, n)
    atol = _sum_atol(x64, w64, "float32" if out_dtype == torch.float32 else "gpu")
    assert_close(out.float(), expected, atol=atol, rtol=1e-5 if out_dtype == torch.float32
                 else 1.6e-2)


@pytest.mark.parametrize("x_mode,w_mode", MODES)
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_fp8_matmul_triton(m, n, k, x_mode, w_mode):
    _need("fp8_matmul")
    fn = resolve("fp8_matmul", "triton", DEVICE)
    _check_backend(fn, m, n, k, m + n + k, x_mode, w_mode, torch.float32, with_bias=m % 2 == 1)


@pytest.mark.parametrize("cfg", [ft.GemvConfig(8, 64, 1), ft.GemvConfig(16, 32, 2, 2),
                                 ft.GemvConfig(8, 64, 2, 1, rows_m=4),
                                 ft.GemvConfig(16, 32, 2, 2, rows_m=2),
                                 ft.GemvConfig(8, 256, 2, 2, programs_per_sm=1),
                                 ft.GemmConfig(16, 32, 64, 2, 4, 2),
                                 ft.GemmConfig(32, 16, 32, 1, 4, 1),
                                 ft.GemmConfig(16, 32, 64, 2, 4, 2, tma=1)])
def test_triton_configs_and_fp16_out(cfg):
    """Both kernels at several tiles (EVEN_K and masked K, N tails, GROUP_M swizzle)."""
    _need("fp8_matmul")
    m, n, k = (3, 45, 160) if isinstance(cfg, ft.GemvConfig) else (40, 45, 160)
    m = 1 if isinstance(cfg, ft.GemvConfig) and cfg.programs_per_sm else m  # persistent: M=1
    (xq, xs, wq, ws, bias), x64, w64 = _operands(m, n, k, 7)
    out = torch.empty(m, n, dtype=torch.float16, device=DEVICE)
    fm.launch_fp8_matmul(xq, xs.reshape(-1), wq, ws, bias, out, cfg)
    expected = fm.fp8_matmul_ref(xq, xs, wq, ws, torch.float32, bias)
    assert_close(out, expected.half(), atol=1e-3 + _sum_atol(x64, w64), rtol=1e-3)


@pytest.mark.parametrize("m,n,k", [(1, 130, 256), (5, 129, 200), (33, 256, 384)])
def test_fp8_block_matmul_triton(m, n, k):
    _need("fp8_block_matmul")
    g = torch.Generator().manual_seed(m * n)
    xq, xs = fm.quant_fp8_per_token_group_ref(torch.randn(m, k, generator=g), 128)
    wq = (torch.randn(n, k, generator=g) * 100).clamp(-448, 448).to(FP8)
    ws = torch.rand(*fm.block_scale_shapes(m, n, k)[1], generator=g) / 100 + 1e-3
    bias = torch.randn(n, generator=g)
    xq, xs, wq, ws, bias = (t.to(DEVICE) for t in (xq, xs, wq, ws, bias))
    expected = fm.fp8_block_matmul_ref(xq, xs, wq, ws, torch.float32, bias)
    out = resolve("fp8_block_matmul", "triton", DEVICE)(xq, xs, wq, ws, torch.float32, bias)
    x64 = xq.double() * xs.double().repeat_interleave(128, 1)[:, :k]
    w64 = wq.double() * ws.double().repeat_interleave(128, 0).repeat_interleave(128, 1)[:n, :k]
    assert_close(out, expected, atol=_sum_atol(x64, w64), rtol=1e-5)
    out_tma = torch.empty_like(out)
    ft.launch_gemm(xq, xs, wq, ws, bias, out_tma, ft.GemmConfig(16, 32, 64, 2, 4, 1, tma=1),
                   block_scaled=True)
    assert_close(out_tma, expected, atol=_sum_atol(x64, w64), rtol=1e-5, name="tma")
    with pytest.raises(ValueError, match="block_k dividing 128"):
        ft.launch_gemm(xq, xs, wq, ws, None, out, ft.GemmConfig(16, 32, 256, 1, 4, 1), True)


@pytest.mark.parametrize("m,n,k", [(1, 33, 129), (2, 64, 4096 + 64)])
def test_fp8_w8a16_gemv(m, n, k):
    _need("fp8_w8a16_gemv")
    g = torch.Generator().manual_seed(k)
    x = torch.randn(m, k, generator=g).to(DEVICE)
    wq, ws = fm.quant_fp8_per_token_ref(torch.randn(n, k, generator=g))
    wq, ws, bias = wq.to(DEVICE), ws.reshape(n).to(DEVICE), torch.randn(n).to(DEVICE)
    w64 = wq.double() * ws.double()[:, None]
    expected64 = x.double() @ w64.t() + bias.double()
    assert_close(fm.fp8_w8a16_gemv_ref(x, wq, ws, bias), expected64.float(),
                 atol=_sum_atol(x.double(), w64), rtol=1e-5)
    out = resolve("fp8_w8a16_gemv", "triton", DEVICE)(x, wq, ws, bias)
    assert_close(out, expected64.float(), atol=_sum_atol(x.double(), w64), rtol=1e-5)


def test_triton_bad_inputs_and_empty():
    _need("fp8_matmul")
    x8 = torch.zeros(4, 64, dtype=FP8, device=DEVICE)
    w8 = torch.zeros(32, 64, dtype=FP8, device=DEVICE)
    one = torch.ones(1, device=DEVICE)
    with pytest.raises(ValueError, match="contiguous"):
        fm.fp8_matmul_triton(torch.zeros(64, 4, dtype=FP8, device=DEVICE).t(), one, w8, one)
    with pytest.raises(ValueError, match="bias"):
        fm.fp8_matmul_triton(x8, one, w8, one, torch.float32, torch.ones(3, device=DEVICE))
    out = fm.fp8_matmul_triton(x8[:0], one, w8, one, torch.float32)
    assert out.shape == (0, 32)


# opcheck's test_schema multiplies every input to detect mutation, which torch cannot do to an
# fp8 tensor ("mul_cpu_reduced_float" not implemented): the other checks run
# (test_aot_dispatch_dynamic once: it costs seconds a call)
OPCHECK_UTILS = ("test_faketensor",)


def test_opcheck():
    _need("fp8_matmul")
    (xq, xs, wq, ws, bias), _, _ = _operands(3, 32, 64, 11)
    torch.library.opcheck(torch.ops.fuselm.fp8_matmul.default,
                          (xq, xs, wq, ws, torch.float32, bias),
                          test_utils=OPCHECK_UTILS + ("test_aot_dispatch_dynamic",))
    xg, xsg = fm.quant_fp8_per_token_group_ref(torch.randn(3, 64, device=DEVICE))
    wsb = torch.ones(1, 1, device=DEVICE)
    torch.library.opcheck(torch.ops.fuselm.fp8_block_matmul.default,
                          (xg, xsg, wq, wsb, torch.float32, None), test_utils=OPCHECK_UTILS)
    torch.library.opcheck(torch.ops.fuselm.fp8_w8a16_gemv.default,
                          (torch.randn(1, 64, device=DEVICE), wq, ws, None),
                          test_utils=OPCHECK_UTILS)


def test_tuning_table_round_trip():
    """What the benchmark writes is what the launcher reads back (through JSON)."""
    import json

    from fuselm.bench.kernels_fp8 import tuning_table

    gemv, gemm = ft.GemvConfig(2, 4096, 8, 1), ft.GemmConfig(128, 256, 128, 8, 8, 3)
    rows = [{"name": "qkv", "m": 1, "n": 6144, "k": 4096, "block": False, "triton_config": gemv,
             "triton_us": 10.0, "cuda_us": 20.0, "bf16_us": 30.0},
            {"name": "qkv", "m": 4096, "n": 6144, "k": 4096, "block": False,
             "triton_config": gemm, "triton_us": 100.0, "cuda_us": 99.0, "bf16_us": 160.0}]
    table = json.loads(json.dumps(tuning_table(rows, 0.02)))
    assert table["n6144_k4096_m1"]["backend"] == "triton"
    assert table["n6144_k4096_m4096"]["backend"] == "cuda"
    assert fm.config_from_entry(table["n6144_k4096_m1"]["triton"]) == gemv
    assert fm.config_from_entry(table["n6144_k4096_m4096"]["triton"]) == gemm
    assert fm.config_from_entry({"kind": "gemm", "block_m": 64}) is None
    old_entry = {k: v for k, v in table["n6144_k4096_m4096"]["triton"].items() if k != "tma"}
    assert fm.config_from_entry(old_entry) == gemm  # fields added later take their defaults
    assert fm.shape_bucket(6144, 4096, 3000) == "n6144_k4096_m4096"
    assert fm.shape_bucket(6144, 4096, 20000, block_scaled=True) == "block_n6144_k4096_m8192"


# ---- GPU: the Llama-3-8B layer shapes, bf16 out -----------------------------------------------

LLAMA_8B = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]  # qkv, o, gate_up, down


def _scaled_mm(xq, xs, wq, ws, out_dtype, bias):
    """torch._scaled_mm itself (the cuda backend sends small M to Triton without a table)."""
    m, n = xq.shape[0], wq.shape[0]
    return fm.scaled_mm(xq, fm.x_scale_column(xs, m), wq, fm.weight_scale_row(ws, n), out_dtype,
                        bias)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda", "scaled_mm"])
@pytest.mark.parametrize("m", [1, 4, 16, 256, 4096])
@pytest.mark.parametrize("n,k", LLAMA_8B)
def test_gpu_8b_shapes(backend, m, n, k):
    if backend == "scaled_mm":
        fn = _scaled_mm
    else:
        _need("fp8_matmul", backend)
        fn = resolve("fp8_matmul", backend, DEVICE)
    (xq, xs, wq, ws, bias), x64, w64 = _operands(m, n, k, 5, device=DEVICE)
    expected = fm.fp8_matmul_ref(xq, xs, wq, ws, torch.float32)
    out = fn(xq, xs, wq, ws, torch.bfloat16, None)
    assert_close(out, expected.bfloat16(), atol=_sum_atol(x64, w64, "gpu"))
    rel = float((out.float() - expected).norm() / expected.norm())
    assert rel < 4e-3, f"relative Frobenius error {rel:.2e}"  # bf16 output rounding ~1.1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 4096])
@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 14336)])
def test_gpu_block_8b_shapes(m, n, k):
    g = torch.Generator(DEVICE).manual_seed(m)
    xq, xs = fm.quant_fp8_per_token_group_ref(
        torch.randn(m, k, generator=g, device=DEVICE), 128)
    wq = (torch.randn(n, k, generator=g, device=DEVICE) * 100).clamp(-448, 448).to(FP8)
    ws = torch.rand(*fm.block_scale_shapes(m, n, k)[1], generator=g, device=DEVICE) / 1e4
    expected = fm.fp8_block_matmul_ref(xq, xs, wq, ws, torch.float32)
    out = fm.fp8_block_matmul_triton(xq, xs, wq, ws, torch.bfloat16)
    rel = float((out.float() - expected).norm() / expected.norm())
    assert rel < 4e-3, f"relative Frobenius error {rel:.2e}"


@pytest.mark.gpu
@pytest.mark.parametrize("x_mode,w_mode", MODES)
def test_gpu_scale_modes_and_bias(x_mode, w_mode):
    for fn in (resolve("fp8_matmul", "triton", DEVICE), _scaled_mm):
        for m in (1, 300):
            _check_backend(fn, m, 4096, 4096, m, x_mode, w_mode, torch.bfloat16, True)
