"""gemv_rope_kv (batch-1 QKV projection + rotary + KV-cache write): the Triton kernel against a
float64 reference written out here, and the attention layer's use of it."""

from __future__ import annotations

import pytest
import torch
from tolerances import assert_close, count_cuda_kernels

from fuselm.kernels import available_backends
from fuselm.kernels import gemv as gv
from fuselm.kernels import gemv_rope_kv as gr

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CPU_DTYPES = [torch.float32, torch.float16]
MAX_POSITION = 512


def _need_triton():
    if "triton" not in available_backends("gemv_rope_kv"):
        pytest.skip("triton backend of gemv_rope_kv not available here")


def _cos_sin(head_size: int) -> torch.Tensor:
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_size, 2, dtype=torch.float64) / head_size))
    freqs = torch.outer(torch.arange(MAX_POSITION, dtype=torch.float64), inv_freq)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).float().to(DEVICE)


def _case(m, heads, kv_heads, head_size, k, dtype, bias, seed, block_size=4, num_blocks=6):
    g = torch.Generator().manual_seed(seed)
    rows = (heads + 2 * kv_heads) * head_size
    x = torch.randn(m, k, generator=g).to(dtype).to(DEVICE)
    w = (torch.randn(rows, k, generator=g) / k**0.5).to(dtype).to(DEVICE)
    b = torch.randn(rows, generator=g).to(dtype).to(DEVICE) if bias else None
    kc = torch.randn(num_blocks, block_size, kv_heads, head_size, generator=g).to(dtype).to(DEVICE)
    vc = torch.randn(kc.shape, generator=g).to(dtype).to(DEVICE)
    pos = torch.randint(0, MAX_POSITION, (m,), generator=g).to(DEVICE)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:m].to(DEVICE)
    if m > 1:
        slots[1] = -1  # not stored
    return x, w, b, pos, _cos_sin(head_size), kc, vc, slots


def _expected(x, w, b, pos, cs, kc, vc, slots, heads, kv_heads):
    """float64: projection, neox rotary of q and k heads, then the cache rows at the slots."""
    qkv = x.double() @ w.double().t() + (b.double() if b is not None else 0.0)
    m, d = qkv.shape[0], w.shape[0] // (heads + 2 * kv_heads)
    half = d // 2
    h = qkv.view(m, heads + 2 * kv_heads, d).clone()
    cos = cs.double()[pos][:, None, :half]
    sin = cs.double()[pos][:, None, half:]
    rot = h[:, : heads + kv_heads]
    x1, x2 = rot[..., :half].clone(), rot[..., half:].clone()
    rot[..., :half] = x1 * cos - x2 * sin
    rot[..., half:] = x2 * cos + x1 * sin
    kc, vc = kc.clone().double(), vc.clone().double()
    block_size = kc.shape[1]
    for t in range(m):
        s = int(slots[t])
        if s >= 0:
            kc[s // block_size, s % block_size] = h[t, heads : heads + kv_heads]
            vc[s // block_size, s % block_size] = h[t, heads + kv_heads :]
    return h.view(m, -1), kc, vc


def _tol(dtype, k):
    atol, rtol = {torch.float32: (1e-5, 1e-5), torch.float16: (3e-3, 3e-3),
                  torch.bfloat16: (3e-2, 2e-2)}[dtype]
    return atol * max(1.0, (k / 256) ** 0.5), rtol


CONFIGS = [gv.GemvConfig(1, 64, 1), gv.GemvConfig(4, 32, 2, 2), gv.GemvConfig(8, 128, 4)]


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("m,heads,kv_heads,head_size,k",
                         [(1, 4, 2, 16, 64), (1, 2, 1, 12, 100), (3, 4, 1, 8, 130)])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.label)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("prefetch", [False, True])
def test_gemv_rope_kv_configs(dtype, m, heads, kv_heads, head_size, k, cfg, bias, prefetch):
    _need_triton()
    x, w, b, pos, cs, kc, vc, slots = _case(m, heads, kv_heads, head_size, k, dtype, bias,
                                            seed=m * 100 + head_size + k)
    want, want_kc, want_vc = _expected(x, w, b, pos, cs, kc, vc, slots, heads, kv_heads)
    out = torch.empty(m, w.shape[0], dtype=dtype, device=DEVICE)
    gr.launch_gemv_rope_kv(x, w, b, out, pos, cs, kc, vc, slots, heads, kv_heads, cfg,
                           prefetch=prefetch)
    atol, rtol = _tol(dtype, k)
    assert_close(out, want.to(dtype), atol=atol, rtol=rtol)
    assert_close(kc, want_kc.to(dtype), atol=atol, rtol=rtol)
    assert_close(vc, want_vc.to(dtype), atol=atol, rtol=rtol)


def test_reference_and_op_agree_with_the_float64_spec():
    _need_triton()
    args = _case(2, 4, 2, 16, 64, torch.float32, True, seed=11)
    x, w, b, pos, cs, kc, vc, slots = args
    want, want_kc, want_vc = _expected(*args, 4, 2)
    for fn in (gr.gemv_rope_kv_ref, torch.ops.fuselm.gemv_rope_kv):
        kc_i, vc_i = kc.clone(), vc.clone()
        out = fn(x, w, b, pos, cs, kc_i, vc_i, slots, 4, 2)
        assert_close(out, want.float(), atol=1e-5, rtol=1e-5)
        assert_close(kc_i, want_kc.float(), atol=1e-5, rtol=1e-5)
        assert_close(vc_i, want_vc.float(), atol=1e-5, rtol=1e-5)


def test_opcheck_and_bad_input():
    _need_triton()
    x, w, b, pos, cs, kc, vc, slots = _case(1, 4, 2, 16, 64, torch.float32, True, seed=2)
    torch.library.opcheck(torch.ops.fuselm.gemv_rope_kv.default,
                          (x, w, b, pos, cs, kc, vc, slots, 4, 2))
    with pytest.raises(ValueError, match="q \\+ 2 x"):
        gr.gemv_rope_kv_triton(x, w[:100], None, pos, cs, kc, vc, slots, 4, 2)
    with pytest.raises(ValueError, match="whole heads"):
        gr.gemv_rope_kv_triton(x, w, b, pos, cs[:, :8], kc, vc, slots, 4, 2)
    with pytest.raises(ValueError, match="key_cache"):
        gr.gemv_rope_kv_triton(x, w, b, pos, cs, kc[..., :8], vc, slots, 4, 2)
    with pytest.raises(ValueError, match="positions"):
        gr.gemv_rope_kv_triton(x, w, b, pos.int(), cs, kc, vc, slots, 4, 2)
    with pytest.raises(ValueError, match="gemv_rope_kv needs x"):
        gr.gemv_rope_kv_triton(x[:, :32], w, b, pos, cs, kc, vc, slots, 4, 2)


def test_select_only_on_cuda_whole_head_rotary_and_by_choice():
    w = torch.empty(128, 64, device=DEVICE)
    assert gr.select_gemv_rope_kv("triton", w, torch.device("cpu"), 16, 16) is None
    if DEVICE.type == "cuda" and "triton" in available_backends("gemv_rope_kv"):
        assert gr.select_gemv_rope_kv("triton", w, DEVICE, 16, 16) is not None
        assert gr.select_gemv_rope_kv("triton", w, DEVICE, 8, 16) is None  # partial rotary
        assert gr.select_gemv_rope_kv("reference", w, DEVICE, 16, 16) is None
        assert gr.select_gemv_rope_kv("auto", w, DEVICE, 16, 16) is None  # no table entry


# ---- GPU ------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("heads,kv_heads", [(32, 8), (16, 4)])  # Llama-3-8B at TP=1, TP=2
def test_gpu_bf16_8b_shapes_one_launch(heads, kv_heads):
    _need_triton()
    args = _case(1, heads, kv_heads, 128, 4096, torch.bfloat16, False, seed=heads,
                 block_size=16, num_blocks=8)
    x, w, b, pos, cs, kc, vc, slots = args
    want, want_kc, want_vc = _expected(*args, heads, kv_heads)
    out = torch.ops.fuselm.gemv_rope_kv(x, w, b, pos, cs, kc, vc, slots, heads, kv_heads)
    atol, rtol = _tol(torch.bfloat16, 4096)
    assert_close(out.float(), want.float(), atol=atol, rtol=rtol)
    assert_close(kc.float(), want_kc.float(), atol=atol, rtol=rtol)
    assert_close(vc.float(), want_vc.float(), atol=atol, rtol=rtol)
    assert count_cuda_kernels(torch.ops.fuselm.gemv_rope_kv.default,
                              x, w, b, pos, cs, kc, vc, slots, heads, kv_heads) == 1
