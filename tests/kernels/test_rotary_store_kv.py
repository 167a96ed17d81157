"""rotary_store_kv: every backend against the reference, q/k/v as views of one QKV tensor."""

from __future__ import annotations

import math

import pytest
import torch
from tolerances import assert_close, count_cuda_kernels

from fuselm.kernels import available_backends, resolve
from fuselm.kernels import rotary_store_kv as rk

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CPU_DTYPES = [torch.float32, torch.float16]
MAX_POSITION = 4096


def _impl(backend: str):
    if backend not in available_backends("rotary_store_kv"):
        pytest.skip(f"{backend} backend of rotary_store_kv not available here")
    return resolve("rotary_store_kv", backend, DEVICE)


def _cos_sin_cache(rot_dim: int, scaling: str = "none") -> torch.Tensor:
    """float32 [MAX_POSITION, rot_dim]; 'linear' divides positions by 4, 'llama3' rescales the
    low frequencies (both reach the kernel only through the cache)."""
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim))
    if scaling == "llama3":
        wavelen = 2 * math.pi / inv_freq
        inv_freq = torch.where(wavelen > 8192 / 1.0, inv_freq / 8.0, inv_freq)
    t = torch.arange(MAX_POSITION, dtype=torch.float64)
    if scaling == "linear":
        t = t / 4.0
    freqs = torch.outer(t, inv_freq)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).float().to(DEVICE)


def _make(num_tokens, num_kv_heads, ratio, head_size, block_size, dtype, num_blocks=None):
    num_heads = num_kv_heads * ratio
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_size, dtype=dtype,
                      device=DEVICE)  # fmt: skip
    num_blocks = num_blocks or (num_tokens + block_size - 1) // block_size + 2
    key_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_size, dtype=dtype,
                            device=DEVICE)  # fmt: skip
    value_cache = torch.randn_like(key_cache)
    slots = torch.randperm(num_blocks * block_size, device=DEVICE)[:num_tokens]  # scattered
    if num_tokens > 2:
        slots[1::3] = -1  # some tokens not stored
    positions = torch.randint(0, MAX_POSITION, (num_tokens,), device=DEVICE)
    return qkv, key_cache, value_cache, positions, slots, (num_heads, num_kv_heads, head_size)


def _views(qkv, heads):
    num_heads, num_kv_heads, head_size = heads
    q_end, k_end = num_heads * head_size, (num_heads + num_kv_heads) * head_size
    t = qkv.shape[0]
    return (qkv[:, :q_end].view(t, num_heads, head_size),
            qkv[:, q_end:k_end].view(t, num_kv_heads, head_size),
            qkv[:, k_end:].view(t, num_kv_heads, head_size))  # fmt: skip


def _check(fn, qkv, key_cache, value_cache, positions, slots, heads, cos_sin):
    expected = [qkv.clone(), key_cache.clone(), value_cache.clone()]  # reference first
    rk.rotary_store_kv_ref(*_views(expected[0], heads), positions, cos_sin, *expected[1:], slots)
    assert fn(*_views(qkv, heads), positions, cos_sin, key_cache, value_cache, slots) is None
    names = ("qkv", "key_cache", "value_cache")
    for name, a, e in zip(names, (qkv, key_cache, value_cache), expected, strict=True):
        assert_close(a, e, name=name)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("ratio", [1, 3, 4, 7, 8])
@pytest.mark.parametrize("num_tokens", [1, 7, 40])
def test_gqa_ratios(backend, dtype, ratio, num_tokens):
    torch.manual_seed(ratio * 100 + num_tokens)
    args = _make(num_tokens, 2, ratio, 64, 16, dtype)
    _check(_impl(backend), *args, _cos_sin_cache(64))


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("head_size,rot_dim", [(128, 128), (64, 32), (96, 96), (36, 36), (40, 20)])
@pytest.mark.parametrize("scaling", ["none", "linear", "llama3"])
def test_geometry_and_scaling(backend, block_size, head_size, rot_dim, scaling):
    torch.manual_seed(block_size + head_size + rot_dim)
    args = _make(37, 1, 4, head_size, block_size, torch.float32)  # 37 > one block of tokens
    _check(_impl(backend), *args, _cos_sin_cache(rot_dim, scaling))


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_separate_tensors_and_empty(backend):
    fn = _impl(backend)
    torch.manual_seed(3)
    qkv, kc, vc, pos, slots, heads = _make(9, 2, 2, 32, 16, torch.float32)
    q, k, v = (t.contiguous() for t in _views(qkv, heads))
    exp = [q.clone(), k.clone(), kc.clone(), vc.clone()]
    cs = _cos_sin_cache(32)
    rk.rotary_store_kv_ref(exp[0], exp[1], v, pos, cs, exp[2], exp[3], slots)
    fn(q, k, v, pos, cs, kc, vc, slots)
    for a, e in zip((q, k, kc, vc), exp, strict=True):
        assert_close(a, e)
    empty = _make(0, 2, 2, 32, 16, torch.float32)
    _check(fn, *empty, cs)


def test_bad_inputs():
    qkv, kc, vc, pos, slots, heads = _make(4, 2, 2, 32, 16, torch.float32)
    q, k, v = _views(qkv, heads)
    cs = _cos_sin_cache(32)
    with pytest.raises(ValueError):
        rk.rotary_store_kv_triton(q, k, v, pos.int(), cs, kc, vc, slots)
    with pytest.raises(ValueError):
        rk.rotary_store_kv_triton(q, k, v, pos, cs, kc[:, :, :1], vc, slots)
    with pytest.raises(ValueError):
        rk.rotary_store_kv_triton(q, k, v, pos, _cos_sin_cache(64)[:, :66], kc, vc, slots)


def test_opcheck_triton_op():
    if "triton" not in available_backends("rotary_store_kv"):
        pytest.skip("no triton")
    qkv, kc, vc, pos, slots, heads = _make(5, 2, 2, 32, 16, torch.float32)
    q, k, v = (t.contiguous() for t in _views(qkv, heads))
    args = (q, k, v, pos, _cos_sin_cache(32), kc, vc, slots)
    torch.library.opcheck(torch.ops.fuselm.rotary_store_kv.default, args)


# ---- GPU ------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("num_tokens", [1, 7, 16384])
@pytest.mark.parametrize("num_kv_heads,ratio,head_size", [(8, 4, 128), (3, 3, 64), (8, 8, 128)])
def test_gpu_bf16(backend, num_tokens, num_kv_heads, ratio, head_size):
    args = _make(num_tokens, num_kv_heads, ratio, head_size, 16, torch.bfloat16)
    _check(_impl(backend), *args, _cos_sin_cache(head_size, "llama3"))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_one_launch(backend):
    qkv, kc, vc, pos, slots, heads = _make(4096, 8, 4, 128, 16, torch.bfloat16)
    args = (*_views(qkv, heads), pos, _cos_sin_cache(128), kc, vc, slots)
    assert count_cuda_kernels(_impl(backend), *args) == 1


@pytest.mark.gpu
def test_gpu_opcheck_cuda_op():
    if "cuda" not in available_backends("rotary_store_kv"):
        pytest.skip("CUDA extension not loaded")
    qkv, kc, vc, pos, slots, heads = _make(6, 8, 4, 128, 16, torch.bfloat16)
    q, k, v = (t.contiguous() for t in _views(qkv, heads))
    args = (q, k, v, pos, _cos_sin_cache(128), kc, vc, slots)
    torch.library.opcheck(torch.ops.fuselm_C.rotary_store_kv.default, args)
    torch.library.opcheck(torch.ops.fuselm.rotary_store_kv.default, args)


# ---- FP8 (e4m3fn) caches: K / k_scale and V / v_scale, saturating, ties to even ------------

FP8 = torch.float8_e4m3fn


def test_fp8_quantize_ref_matches_the_format_definition():
    """quantize_kv_ref against e4m3 rounding from the format's definition, on random values,
    exact ties between neighbours, subnormals and values past +-448 (saturated)."""
    from fp8_reference import e4m3_grid, round_e4m3

    from fuselm.kernels.kv_quant import dequantize_kv_ref, quantize_kv_ref

    grid, _ = e4m3_grid()
    ties = (grid[1:] + grid[:-1]) / 2  # exactly halfway: the even neighbour wins
    gen = torch.Generator().manual_seed(11)
    x = torch.cat((torch.randn(4000, generator=gen) * 60, ties.float(), -ties.float(),
                   torch.tensor([0.0, 1e-4, 2.0**-10, 460.0, -1e6, 127.99])))
    for scale in (1.0, 0.37, 4.0):
        stored = quantize_kv_ref(x, scale, FP8)
        assert stored.dtype == FP8
        expected = round_e4m3(x / torch.tensor(scale))  # float32 division, as specified
        mism = int((stored.double() != expected).sum())
        assert mism == 0, f"scale {scale}: {mism} of {x.numel()} values rounded differently"
        assert_close(dequantize_kv_ref(stored, scale), (expected * scale).float())
    assert quantize_kv_ref(x, 0.5, torch.float16).dtype == torch.float16  # others: a cast


def _fp8_store_case(backend, dtype, k_scale, v_scale, amplitude):
    fn = _impl(backend)
    qkv, _, _, pos, slots, heads = _make(23, 2, 3, 64, 16, dtype, num_blocks=4)
    qkv.mul_(amplitude)
    gen = torch.Generator().manual_seed(2)
    kc = torch.randn(4, 16, 2, 64, generator=gen).to(FP8).to(DEVICE)  # unwritten slots stay
    vc = torch.randn(4, 16, 2, 64, generator=gen).to(FP8).to(DEVICE)
    exp = [qkv.clone(), kc.clone(), vc.clone()]
    cs = _cos_sin_cache(64)
    rk.rotary_store_kv_ref(*_views(exp[0], heads), pos, cs, exp[1], exp[2], slots, k_scale,
                           v_scale)
    fn(*_views(qkv, heads), pos, cs, kc, vc, slots, k_scale, v_scale)
    return qkv, kc, vc, exp, heads, slots


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize(("k_scale", "v_scale", "amplitude"),
                         [(1.0, 1.0, 1.0), (0.37, 0.11, 3.0), (0.004, 0.005, 1.0)])
def test_fp8_store_matches_reference(backend, dtype, k_scale, v_scale, amplitude):
    """The kernel's fp8 cache values: V exactly the reference's (no arithmetic but the
    division; +0 and -0 count as equal: the interpreter's cast drops the sign of zero); K,
    rotated first, exactly on all but a rare value one e4m3 step apart (a last-bit difference of
    the rotation at a rounding boundary). Scales 0.004/0.005 saturate many."""
    qkv, kc, vc, exp, heads, slots = _fp8_store_case(backend, dtype, k_scale, v_scale,
                                                     amplitude)
    assert_close(qkv, exp[0], name="qkv")
    v_bad = int((vc.float() != exp[2].float()).sum())
    assert v_bad == 0, f"{v_bad} V cache values differ"
    k_bad = int((kc.float() != exp[1].float()).sum())
    assert k_bad <= max(1, kc.numel() // 1000), f"{k_bad} K cache values differ"
    assert_close(kc.float(), exp[1].float(), atol=2.0**-9, rtol=2.0**-3, name="key_cache")
    if k_scale < 0.01:
        assert bool((kc.float().abs() == 448).any()), "nothing saturated: the case tests nothing"


def test_fp8_store_checks_scales_and_dtypes():
    qkv, kc, vc, pos, slots, heads = _make(4, 2, 2, 32, 16, torch.float32)
    k8, v8 = kc.to(FP8), vc.to(FP8)
    cs = _cos_sin_cache(32)
    with pytest.raises(ValueError, match="k_scale"):
        rk.rotary_store_kv_triton(*_views(qkv, heads), pos, cs, k8, v8, slots, 0.0, 1.0)
    with pytest.raises(ValueError, match="v_scale"):
        rk.rotary_store_kv_triton(*_views(qkv, heads), pos, cs, k8, v8, slots, 1.0, float("nan"))
    with pytest.raises(ValueError, match="one dtype"):
        rk.rotary_store_kv_triton(*_views(qkv, heads), pos, cs, k8, vc, slots)


def test_fp8_opcheck_triton_op():
    if "triton" not in available_backends("rotary_store_kv"):
        pytest.skip("no triton")
    qkv, kc, vc, pos, slots, heads = _make(5, 2, 2, 32, 16, torch.float32)
    q, k, v = (t.contiguous() for t in _views(qkv, heads))
    args = (q, k, v, pos, _cos_sin_cache(32), kc.to(FP8), vc.to(FP8), slots, 0.5, 0.25)
    # test_schema is left out: its mutation check multiplies the inputs, which torch's CPU
    # kernels do not do for float8 (the float32 opcheck above covers the schema)
    torch.library.opcheck(torch.ops.fuselm.rotary_store_kv.default, args, test_utils=(
        "test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic"))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("num_tokens", [1, 4096])
def test_gpu_fp8_bf16(backend, num_tokens):
    """bf16 q/k/v into fp8 caches at the 8B shape (the CUDA backend hands them to Triton)."""
    fn = _impl(backend)
    qkv, kc, vc, pos, slots, heads = _make(num_tokens, 8, 4, 128, 16, torch.bfloat16)
    kc, vc = torch.zeros_like(kc, dtype=FP8), torch.zeros_like(vc, dtype=FP8)
    exp = [qkv.clone(), kc.clone(), vc.clone()]
    cs = _cos_sin_cache(128, "llama3")
    rk.rotary_store_kv_ref(*_views(exp[0], heads), pos, cs, exp[1], exp[2], slots, 0.3, 0.7)
    fn(*_views(qkv, heads), pos, cs, kc, vc, slots, 0.3, 0.7)
    assert_close(qkv, exp[0], name="qkv")
    assert int((vc.float() != exp[2].float()).sum()) == 0
    k_bad = int((kc.float() != exp[1].float()).sum())
    assert k_bad <= max(1, kc.numel() // 1000)
