"""gguf_matmul: the block decoders against gguf-py's ``gguf.quants.dequantize`` (the independent
reference), and the Triton kernels (gemv, gemm, dequant) against a float64 product of it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants
from helpers import replay_on_fresh_input
from tolerances import assert_close

from fuselm.bench.dummy_gguf import random_blocks
from fuselm.kernels import available_backends
from fuselm.kernels import gguf_matmul as gm

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TYPES = list(gm.TYPE_IDS)
QUANTIZABLE = ("Q8_0", "Q4_0", "Q4_1")  # the types gguf.quants.quantize implements


def _need_triton():
    if "triton" not in available_backends("gguf_matmul"):
        pytest.skip("triton backend of gguf_matmul not available here")


def _gguf_dequantize(q: torch.Tensor, name: str, k: int) -> torch.Tensor:
    """gguf-py's own decoder: float32 [N, k]."""
    out = quants.dequantize(q.cpu().numpy(), GGMLQuantizationType[name])
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).reshape(-1, k)


@pytest.mark.parametrize("name", TYPES)
def test_dequantize_random_blocks_match_gguf(name):
    tid = gm.TYPE_IDS[name]
    elems, _ = gm.block_layout(tid)
    k = 3 * elems
    q = random_blocks(tid, 7, k, seed=len(name))
    expected = _gguf_dequantize(q, name, k)
    assert expected.abs().max() > 0
    assert_close(gm.gguf_dequantize_ref(q, tid, k), expected)


@pytest.mark.parametrize("name", QUANTIZABLE)
def test_dequantize_quantized_weights_match_gguf(name):
    rng = np.random.default_rng(1)
    w = rng.normal(scale=0.02, size=(5, 96)).astype(np.float32)
    q = torch.from_numpy(quants.quantize(w, GGMLQuantizationType[name]))
    got = gm.gguf_dequantize_ref(q, gm.TYPE_IDS[name], 96)
    assert_close(got, _gguf_dequantize(q, name, 96))
    # and it is a quantization of w: 4-bit error under a few percent of the range
    assert (got - torch.from_numpy(w)).abs().max() < 0.15 * float(np.abs(w).max())


def _case(name: str, m: int, n: int, blocks: int, dtype: torch.dtype, seed: int):
    tid = gm.TYPE_IDS[name]
    elems, _ = gm.block_layout(tid)
    k = blocks * elems
    q = random_blocks(tid, n, k, seed=seed).to(DEVICE)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype).to(DEVICE)
    expected = x.double().cpu() @ _gguf_dequantize(q, name, k).double().t()
    return tid, q, x, expected


def _check(out: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, name: str) -> None:
    # fp32: sums of a few hundred products in another order; fp16: the gemm rounds the weight
    # tile and the output to fp16 (scale: outputs of magnitude ~1)
    scale = float(expected.abs().max())
    tol = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}[dtype]
    assert_close(out.float().cpu(), expected.float().cpu(), atol=tol * scale, rtol=tol, name=name)


CPU_CONFIGS = [gm.GGUFConfig("gemv", 1, 8, 4, 2), gm.GGUFConfig("gemm", 16, 16, 1, 2, 2),
               gm.GGUFConfig("dequant", 1, 8, 2, 2)]


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("cfg", CPU_CONFIGS, ids=lambda c: c.variant)
def test_triton_variants_fp32(name, cfg):
    _need_triton()
    m = 1 if cfg.variant == "gemv" else 3
    tid, q, x, expected = _case(name, m, 7, 3, torch.float32, seed=11)
    out = torch.empty(m, 7, device=DEVICE)
    gm.launch_gguf_matmul(x, q, tid, out, cfg)
    _check(out, expected, torch.float32, f"{name} {cfg.label}")


@pytest.mark.parametrize("name", TYPES)
def test_triton_gemm_fp16_masked_rows_and_blocks(name):
    _need_triton()
    # 17 x rows (two M tiles), 13 weight rows (a masked N tile), 3 blocks 2 a step (K tail)
    tid, q, x, expected = _case(name, 17, 13, 3, torch.float16, seed=12)
    out = torch.empty(17, 13, dtype=torch.float16, device=DEVICE)
    gm.launch_gguf_matmul(x, q, tid, out, gm.GGUFConfig("gemm", 16, 16, 2, 2, 1))
    _check(out, expected, torch.float16, name)


@pytest.mark.parametrize("name", ["Q8_0", "Q4_K"])
@pytest.mark.parametrize("m", [1, 3])
def test_halfword_gemv(name, m):
    """gemv16: Q8_0 bytes / Q4_K nibbles masked in place (no shifts); a K tail, masked rows."""
    _need_triton()
    tid, q, x, expected = _case(name, m, 7, 3, torch.float32, seed=16)
    out = torch.empty(m, 7, device=DEVICE)
    gm.launch_gguf_matmul(x, q, tid, out, gm.GGUFConfig("gemv16", 1, 8, 2, 2))
    _check(out, expected, torch.float32, "gemv16")


@pytest.mark.parametrize("name", ["Q8_0", "Q4_K", "Q6_K"])
def test_op_default_config_strided_rows(name):
    _need_triton()
    tid, q, x, expected = _case(name, 1, 5, 2, torch.float32, seed=13)
    wide = torch.zeros(1, x.shape[1] + 64, device=DEVICE)
    wide[:, 32:32 + x.shape[1]] = x
    out = torch.ops.fuselm.gguf_matmul(wide[:, 32:32 + x.shape[1]], q, tid)
    _check(out, expected, torch.float32, name)
    assert torch.ops.fuselm.gguf_matmul(x[:0], q, tid).shape == (0, 5)


def test_reference_matmul_and_dequant_kernel_agree():
    _need_triton()
    tid, q, x, expected = _case("Q5_K", 2, 9, 2, torch.float32, seed=14)
    _check(gm.gguf_matmul_ref(x, q, tid), expected, torch.float32, "ref")
    w = gm.gguf_dequantize_triton(q, tid, x.shape[1], torch.float32,
                                  gm.GGUFConfig("dequant", 1, 16, 1, 2))
    assert_close(w.cpu(), _gguf_dequantize(q, "Q5_K", x.shape[1]))


def test_opcheck():
    _need_triton()
    tid, q, x, _ = _case("Q4_0", 1, 4, 1, torch.float32, seed=15)
    # schema and fake tensor only: the autograd checks rerun the interpreted kernel ~20 times
    torch.library.opcheck(torch.ops.fuselm.gguf_matmul.default, (x, q, tid),
                          test_utils=("test_schema", "test_faketensor"))


def test_bad_inputs_name_the_argument():
    q = torch.zeros(4, 34, dtype=torch.uint8)
    with pytest.raises(ValueError, match="ggml_type 9 is not supported"):
        gm.gguf_dequantize_ref(q, 9, 32)
    with pytest.raises(ValueError, match="whole blocks"):
        gm.gguf_dequantize_ref(q, gm.TYPE_IDS["Q8_0"], 64)
    with pytest.raises(ValueError, match="uint8"):
        gm.gguf_dequantize_ref(q.to(torch.int8), gm.TYPE_IDS["Q8_0"], 32)
    with pytest.raises(ValueError, match="x \\[M, K\\]"):
        gm.gguf_matmul_ref(torch.zeros(32), q, gm.TYPE_IDS["Q8_0"])


def test_config_buckets():
    q4k = gm.TYPE_IDS["Q4_K"]
    assert gm.shape_bucket(q4k, 4096, 4096, 3) == "Q4_K_n4096_k4096_m4"
    assert gm.shape_bucket(q4k, 4096, 4096, 1000) == "Q4_K_n4096_k4096_m256"
    assert [gm.default_config(q4k, 64, 256, m).variant for m in (1, 8, 16, 17, 200)] == [
        "cuda", "cuda", "cuda", "dequant", "dequant"]
    assert gm.default_config(q4k, 4096, 4096, 1).num_warps == 16
    assert gm.default_config(q4k, 4096, 4096, 9).num_warps == 8
    assert gm.triton_default_config(q4k, 64, 256, 1).variant == "gemv"
    q6k = gm.TYPE_IDS["Q6_K"]  # no CUDA kernel: Triton at every batch
    assert [gm.default_config(q6k, 64, 256, m).variant for m in (1, 5)] == ["gemv", "dequant"]
    assert gm.default_config(gm.TYPE_IDS["Q8_0"], 64, 256, 1).variant == "gemv"  # raw blocks
    assert gm.default_config(gm.Q8_0_SPLIT, 64, 256, 1).variant == "cuda"
    assert gm.default_config(gm.Q8_0_SPLIT, 64, 96, 1).variant == "gemv"  # K % 64
    cfg = gm.GGUFConfig("gemm", 16, 64, 1, 4, 2)
    assert gm.GGUFConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.gpu
@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("m", [1, 4, 16, 64, 256])
def test_gpu_8b_shape_bf16(name, m):
    """The default config of each batch bucket at the 8B down-projection shape, bf16."""
    tid = gm.TYPE_IDS[name]
    n, k = 512, 14336  # the rows cut to 512 to keep the float64 reference quick
    q = random_blocks(tid, n, k, DEVICE, seed=m)
    x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
    expected = x.double() @ gm.gguf_dequantize_ref(q, tid, k).double().t()
    _check(torch.ops.fuselm.gguf_matmul(x, q, tid), expected, torch.bfloat16, name)


@pytest.mark.gpu
@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("cfg", [gm.GGUFConfig("gemv", 1, 1, 4, 8), gm.GGUFConfig(
    "gemv", 1, 8, 2, 4, 2), gm.GGUFConfig("gemm", 64, 128, 1, 8, 3),
    gm.GGUFConfig("dequant", 1, 64, 2, 8), gm.GGUFConfig("gemv16", 1, 4, 2, 4)],
    ids=lambda c: c.label)
def test_gpu_variants_odd_shape(name, cfg):
    tid = gm.TYPE_IDS[name]
    elems, _ = gm.block_layout(tid)
    n, k, m = 1001, 7 * 256, 1 if cfg.variant == "gemv" else 33
    q = random_blocks(tid, n, k, DEVICE, seed=3)
    x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
    out = torch.empty(m, n, device=DEVICE, dtype=torch.bfloat16)
    gm.launch_gguf_matmul(x, q, tid, out, cfg)
    expected = x.double() @ gm.gguf_dequantize_ref(q, tid, k).double().t()
    _check(out, expected, torch.bfloat16, f"{name} {cfg.label}")


CUDA_TYPES = ["Q4_K", "Q8_0"]  # Q8_0 as its split rows


def _need_cuda_gemv():
    from fuselm.kernels import quant_gemv

    if not quant_gemv.available():
        pytest.skip("CUDA extension not loaded")
    return quant_gemv


def _cuda_rows(name: str, n: int, k: int, seed: int) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(type id the CUDA GEMV takes, its rows, the file's blocks) of random weights."""
    q = random_blocks(gm.TYPE_IDS[name], n, k, DEVICE, seed=seed)
    if name == "Q8_0":
        return gm.Q8_0_SPLIT, gm.q8_0_split(q, k), q
    return gm.TYPE_IDS[name], q, q


def test_q8_0_split_layout():
    """The split rows hold the same bytes, in the documented order, and decode to the blocks'
    values (gguf-py's own decoder); odd layouts are refused."""
    k = 192
    q = random_blocks(gm.TYPE_IDS["Q8_0"], 3, k, seed=5)
    split = gm.q8_0_split(q, k)
    assert split.shape == q.shape and torch.equal(gm.q8_0_unsplit(split, k), q)
    blocks = q.reshape(3, k // 32, 34)
    assert torch.equal(split[:, k:].reshape(3, k // 32, 2), blocks[:, :, :2])  # the scales
    # byte 16 t + 8 b + v of step s: value 8 t + v of the step's block b
    s, t, b, v = 2, 3, 1, 5
    assert torch.equal(split[:, 64 * s + 16 * t + 8 * b + v], blocks[:, 2 * s + b, 2 + 8 * t + v])
    assert_close(gm.gguf_dequantize_ref(split, gm.Q8_0_SPLIT, k), _gguf_dequantize(q, "Q8_0", k))
    with pytest.raises(ValueError, match="K % 64"):
        gm.q8_0_split(random_blocks(gm.TYPE_IDS["Q8_0"], 2, 96), 96)


@pytest.mark.parametrize("cfg", CPU_CONFIGS + [gm.GGUFConfig("gemv16", 1, 8, 2, 2)],
                         ids=lambda c: c.variant)
def test_triton_q8_0_split(cfg):
    _need_triton()
    m = 1 if cfg.variant.startswith("gemv") else 3
    tid, q, x, expected = _case("Q8_0", m, 7, 6, torch.float32, seed=17)
    out = torch.empty(m, 7, device=DEVICE)
    gm.launch_gguf_matmul(x, gm.q8_0_split(q, x.shape[1]), gm.Q8_0_SPLIT, out, cfg)
    _check(out, expected, torch.float32, cfg.label)


@pytest.mark.gpu
@pytest.mark.parametrize("name", CUDA_TYPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,warps", [(1, 16), (3, 3), (8, 8), (5, 1), (9, 8), (16, 5)])
def test_gpu_cuda_gemv(name, dtype, m, warps):
    """The CUDA GEMV: odd N (a masked row tile), K of 14 / 28 steps split over 1..16 warps
    (some idle), every batch row of one or two MMA tiles, against gguf-py's dequantization of
    the file's blocks."""
    qg = _need_cuda_gemv()
    n, k = 1001, 7 * 256
    tid, rows, q = _cuda_rows(name, n, k, seed=m + warps)
    x = torch.randn(m, k, device=DEVICE).to(dtype)
    out = torch.full((m, n), float("nan"), device=DEVICE, dtype=dtype)
    assert qg.launch_gguf_gemv(x, rows, tid, out, warps, False)
    expected = x.double().cpu() @ _gguf_dequantize(q, name, k).double().t()
    _check(out, expected, dtype, f"{name} m{m} w{warps}")


@pytest.mark.gpu
@pytest.mark.parametrize("pdl", [False, True])
def test_gpu_cuda_gemv_graph(pdl):
    """Captured, replayed on fresh x: both types chained (the second reads the first's out)."""
    qg = _need_cuda_gemv()
    ta, wa, qa = _cuda_rows("Q4_K", 512, 1024, seed=1)
    tb, wb, qb = _cuda_rows("Q8_0", 256, 512, seed=2)
    x = torch.randn(2, 1024, device=DEVICE, dtype=torch.bfloat16)
    mid = torch.empty(2, 512, device=DEVICE, dtype=torch.bfloat16)
    out = torch.empty(2, 256, device=DEVICE, dtype=torch.bfloat16)

    def step():
        assert qg.launch_gguf_gemv(x, wa, ta, mid, 8, pdl)
        assert qg.launch_gguf_gemv(mid, wb, tb, out, 4, pdl)

    replay_on_fresh_input(step, x)
    expected_mid = x.double().cpu() @ _gguf_dequantize(qa, "Q4_K", 1024).double().t()
    _check(mid, expected_mid, torch.bfloat16, "Q4_K")
    expected = mid.double().cpu() @ _gguf_dequantize(qb, "Q8_0", 512).double().t()
    _check(out, expected, torch.bfloat16, "Q8_0")


@pytest.mark.gpu
def test_gpu_cuda_gemv_refusals_run_triton():
    """Inputs the CUDA GEMV does not take (17 rows, 12 rows with 16 warps, fp32 x, split rows
    not 16-byte aligned (K = 320), an x view 2 bytes off alignment, the raw Q8_0 blocks, Q6_K)
    launch nothing; a cuda config then runs Triton's default."""
    qg = _need_cuda_gemv()
    cfg = gm.GGUFConfig("cuda", 1, 16, 1, 16, 1)
    cases = [("Q4_K", 17, 512, torch.bfloat16, 0, True), ("Q8_0", 12, 512, torch.bfloat16, 0, True),
             ("Q4_K", 2, 512, torch.float32, 0, True), ("Q8_0", 1, 320, torch.bfloat16, 0, True),
             ("Q8_0", 2, 512, torch.float16, 1, True), ("Q8_0", 1, 512, torch.bfloat16, 0, False),
             ("Q6_K", 1, 512, torch.bfloat16, 0, False)]
    for name, m, k, dtype, offset, cuda_layout in cases:
        tid, rows, q = _cuda_rows(name, 40, k, seed=k + m)
        if not cuda_layout:
            tid, rows = gm.TYPE_IDS[name], q
        x = torch.randn(m, k, device=DEVICE).to(dtype)
        if offset:
            wide = torch.zeros(m, k + 8, device=DEVICE, dtype=dtype)
            wide[:, offset:offset + k] = x
            x = wide[:, offset:offset + k]
        out = torch.empty(m, 40, device=DEVICE, dtype=dtype)
        assert not qg.launch_gguf_gemv(x, rows, tid, out, 16, False), name
        gm.launch_gguf_matmul(x, rows, tid, out, cfg)
        expected = x.double().cpu() @ _gguf_dequantize(q, name, k).double().t()
        _check(out, expected, dtype, f"{name} m{m} k{k}")


@pytest.mark.gpu
def test_gpu_cuda_gemv_op_errors():
    """The op's own checks raise (the Python launcher never passes such inputs)."""
    _need_cuda_gemv()
    q4 = random_blocks(gm.TYPE_IDS["Q4_K"], 40, 512, DEVICE, seed=0)
    x = torch.zeros(17, 512, device=DEVICE, dtype=torch.bfloat16)
    out = torch.empty(17, 40, device=DEVICE, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="at most 16 rows .*, got 17 rows, 8 warps"):
        torch.ops.fuselm_C.gguf_gemv(out, x, q4, gm.TYPE_IDS["Q4_K"], 8, False)
    with pytest.raises(RuntimeError, match="above 8 at most 8 warps"):
        torch.ops.fuselm_C.gguf_gemv(out[:9], x[:9], q4, gm.TYPE_IDS["Q4_K"], 16, False)
    with pytest.raises(RuntimeError, match="takes Q4_K .* got type 14"):
        torch.ops.fuselm_C.gguf_gemv(out[:1], x[:1], q4, gm.TYPE_IDS["Q6_K"], 8, False)
