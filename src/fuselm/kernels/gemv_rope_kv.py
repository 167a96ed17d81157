"""Batch-1 QKV projection fused with rotary embedding and the KV-cache write (decode).

``gemv_rope_kv(x, w, bias, positions, cos_sin_cache, key_cache, value_cache, slot_mapping,
num_heads, num_kv_heads)``: x ``[M, K]``, w the merged QKV weight ``[(H + 2 Hkv) * D, K]`` (q
heads, then k heads, then v heads, ``D`` rows each), bias ``[(H + 2 Hkv) * D]`` or None. Returns
``qkv [M, (H + 2 Hkv) * D]`` in x's dtype with q and k rotated (neox layout over the whole head,
the contract of ``rotary_store_kv`` with ``rot_dim == D``) and stores the rotated k and v at
``slot_mapping`` (-1: do not store) in the paged caches ``[num_blocks, block_size, Hkv, D]``.

At one token a step this replaces two kernels (the QKV ``gemv`` and ``rotary_store_kv``) by one
weight stream: each program computes rows ``j`` and ``j + D/2`` of the same heads (a rotary pair),
rotates them in registers and writes them out. Whether it beats the two kernels is measured per
shape by ``python -m fuselm.bench.kernels_gemv`` (table bucket ``rope_n{rows}_k{K}``).

Backends: ``gemv_rope_kv_ref`` (float32 spec), ``gemv_rope_kv_triton`` (``fuselm::gemv_rope_kv``).
"""

from __future__ import annotations

import torch

from fuselm.kernels import _pdl, _registry, _triton_utils
from fuselm.kernels._triton_utils import FUSELM_LIB
from fuselm.kernels.gemv import GemvConfig, gemv_ref, paired_rows_config, select_tuned_op
from fuselm.kernels.rotary_store_kv import _check_args, rotary_store_kv_ref


def split_qkv(qkv: torch.Tensor, num_heads: int, num_kv_heads: int):
    """Views ``(q [M, H, D], k [M, Hkv, D], v [M, Hkv, D])`` of a QKV row block."""
    m, head_size = qkv.shape[0], qkv.shape[1] // (num_heads + 2 * num_kv_heads)
    q = qkv[:, : num_heads * head_size].view(m, num_heads, head_size)
    k = qkv[:, num_heads * head_size : (num_heads + num_kv_heads) * head_size]
    v = qkv[:, (num_heads + num_kv_heads) * head_size :]
    return q, k.view(m, num_kv_heads, head_size), v.view(m, num_kv_heads, head_size)


def gemv_rope_kv_ref(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None,
                     positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                     key_cache: torch.Tensor, value_cache: torch.Tensor,
                     slot_mapping: torch.Tensor, num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """``x @ w.T + bias`` (float32, rounded to x's dtype), then ``rotary_store_kv_ref``."""
    qkv = gemv_ref(x, w, bias)
    q, k, v = split_qkv(qkv, num_heads, num_kv_heads)
    rotary_store_kv_ref(q, k, v, positions, cos_sin_cache, key_cache, value_cache, slot_mapping)
    return qkv


_registry.register("gemv_rope_kv", "reference", gemv_rope_kv_ref)


def rope_bucket(n: int, k: int) -> str:
    """Tuning-table key (in the gemv table) of the fused kernel on a ``[n, k]`` QKV weight."""
    return f"rope_n{n}_k{k}"


def rope_config(n: int, k: int, device: torch.device) -> GemvConfig:
    """The fused kernel's config for a ``[n, k]`` QKV weight (a program computes rotary pairs)."""
    return paired_rows_config(rope_bucket(n, k), n, k, device)


def _check(x, w, bias, cos_sin_cache, num_heads, num_kv_heads) -> None:
    """Validates what ``rotary_store_kv``'s checks (run on the output's q/k/v views) do not."""
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1] or x.shape[1] == 0:
        raise ValueError(f"gemv_rope_kv needs x [M, K] and w [N, K] with K > 0, got "
                         f"{tuple(x.shape)} and {tuple(w.shape)}")
    if x.stride(1) != 1 or w.stride(1) != 1:
        raise ValueError("gemv_rope_kv needs x and w contiguous in their last dimension")
    heads = num_heads + 2 * num_kv_heads
    if num_heads <= 0 or num_kv_heads <= 0 or w.shape[0] % heads:
        raise ValueError(f"{w.shape[0]} weight rows are not {num_heads} q + 2 x {num_kv_heads} "
                         f"kv heads")
    head_size = w.shape[0] // heads
    if head_size % 2 or cos_sin_cache.dim() != 2 or cos_sin_cache.shape[1] != head_size:
        raise ValueError(f"gemv_rope_kv rotates whole heads: cos_sin_cache must be "
                         f"[max_position, {head_size}] (head size even), got "
                         f"{tuple(cos_sin_cache.shape)}")
    if bias is not None and bias.shape != (w.shape[0],):
        raise ValueError(f"gemv_rope_kv bias must be [{w.shape[0]}], got {tuple(bias.shape)}")


if _triton_utils.triton_available():
    import triton
    import triton.language as tl

    from fuselm.kernels._pdl import pdl_wait_then_release
    from fuselm.kernels.gemv import _w_tile, _x_chunk

    @triton.jit
    def _gemv_rope_kv_kernel(
        x_ptr, w_ptr, b_ptr, out_ptr, pos_ptr, cos_sin_ptr, kc_ptr, vc_ptr, slot_ptr,
        num_pairs, K, x_stride, w_stride, out_stride, cos_sin_stride, num_heads, num_kv_heads,
        block_size, kc_block_stride, kc_slot_stride, kc_head_stride,
        vc_block_stride, vc_slot_stride, vc_head_stride,
        HALF: tl.constexpr,  # head_size // 2
        HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, NUM_STAGES: tl.constexpr,
        PREFETCH: tl.constexpr, USE_PDL: tl.constexpr,
    ):  # fmt: skip
        m = tl.program_id(1).to(tl.int64)
        pairs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # (head, j < HALF)
        head = pairs // HALF
        j = pairs % HALF
        row_a = head * (2 * HALF) + j
        cols = tl.arange(0, BLOCK_K)
        wa = w_ptr + row_a.to(tl.int64)[:, None] * w_stride
        wb = wa + HALF * w_stride
        x_row = x_ptr + m * x_stride
        if PREFETCH:  # weights first (no kernel writes them), then wait for x
            acc_a = _w_tile(wa, pairs, cols, num_pairs, K, EVEN_N, EVEN_K)
            acc_b = _w_tile(wb, pairs, cols, num_pairs, K, EVEN_N, EVEN_K)
            pdl_wait_then_release(USE_PDL)
            x0 = _x_chunk(x_row, cols, K, EVEN_K)[None, :]
            acc_a = acc_a * x0
            acc_b = acc_b * x0
            start = BLOCK_K
        else:
            pdl_wait_then_release(USE_PDL)
            acc_a = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
            acc_b = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
            start = 0
        for k0 in tl.range(start, K, BLOCK_K, num_stages=NUM_STAGES):
            k = k0 + cols
            xk = _x_chunk(x_row, k, K, EVEN_K)[None, :]
            acc_a += _w_tile(wa, pairs, k, num_pairs, K, EVEN_N, EVEN_K) * xk
            acc_b += _w_tile(wb, pairs, k, num_pairs, K, EVEN_N, EVEN_K) * xk
        ya = tl.sum(acc_a, axis=1)
        yb = tl.sum(acc_b, axis=1)
        valid = pairs < num_pairs
        if HAS_BIAS:
            ya += tl.load(b_ptr + row_a, mask=valid, other=0.0).to(tl.float32)
            yb += tl.load(b_ptr + row_a + HALF, mask=valid, other=0.0).to(tl.float32)
        cs_row = cos_sin_ptr + tl.load(pos_ptr + m) * cos_sin_stride
        cos = tl.load(cs_row + j, mask=valid, other=1.0).to(tl.float32)
        sin = tl.load(cs_row + HALF + j, mask=valid, other=0.0).to(tl.float32)
        rotate = head < num_heads + num_kv_heads  # q and k heads; v passes through
        oa = tl.where(rotate, ya * cos - yb * sin, ya).to(out_ptr.dtype.element_ty)
        ob = tl.where(rotate, yb * cos + ya * sin, yb).to(out_ptr.dtype.element_ty)
        dst = out_ptr + m * out_stride + row_a
        if EVEN_N:
            tl.store(dst, oa)
            tl.store(dst + HALF, ob)
        else:
            tl.store(dst, oa, mask=valid)
            tl.store(dst + HALF, ob, mask=valid)
        slot = tl.load(slot_ptr + m)
        store = valid & (slot >= 0) & (head >= num_heads)
        slot = tl.maximum(slot, 0)
        block = slot // block_size
        offset = slot - block * block_size
        is_v = head >= num_heads + num_kv_heads
        kv_head = tl.where(is_v, head - num_heads - num_kv_heads, head - num_heads).to(tl.int64)
        kdst = kc_ptr + block * kc_block_stride + offset * kc_slot_stride
        kdst += kv_head * kc_head_stride + j
        vdst = vc_ptr + block * vc_block_stride + offset * vc_slot_stride
        vdst += kv_head * vc_head_stride + j
        tl.store(kdst, oa.to(kc_ptr.dtype.element_ty), mask=store & ~is_v)
        tl.store(kdst + HALF, ob.to(kc_ptr.dtype.element_ty), mask=store & ~is_v)
        tl.store(vdst, oa.to(vc_ptr.dtype.element_ty), mask=store & is_v)
        tl.store(vdst + HALF, ob.to(vc_ptr.dtype.element_ty), mask=store & is_v)


def launch_gemv_rope_kv(x, w, bias, out, positions, cos_sin_cache, key_cache, value_cache,
                        slot_mapping, num_heads: int, num_kv_heads: int, cfg: GemvConfig,
                        prefetch: bool | None = None) -> None:
    """Launches the Triton kernel with an explicit config into ``out [M, N]`` (arguments
    checked by the caller); ``prefetch`` as in ``gemv.launch_gemv``."""
    m, k = x.shape
    half = w.shape[0] // (num_heads + 2 * num_kv_heads) // 2
    num_pairs = w.shape[0] // 2
    if m == 0:
        return
    pdl = _pdl.use_pdl(x)
    _gemv_rope_kv_kernel[(triton.cdiv(num_pairs, cfg.block_n), m)](
        x, w, bias if bias is not None else w, out, positions, cos_sin_cache, key_cache,
        value_cache, slot_mapping, num_pairs, k, x.stride(0), w.stride(0), out.stride(0),
        cos_sin_cache.stride(0), num_heads, num_kv_heads, key_cache.shape[1],
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        HALF=half, HAS_BIAS=bias is not None, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        EVEN_N=num_pairs % cfg.block_n == 0, EVEN_K=k % cfg.block_k == 0,
        NUM_STAGES=cfg.num_stages, PREFETCH=pdl if prefetch is None else prefetch, USE_PDL=pdl,
        num_warps=cfg.num_warps, launch_pdl=pdl,
    )  # fmt: skip


def gemv_rope_kv_triton(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None,
                        positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                        key_cache: torch.Tensor, value_cache: torch.Tensor,
                        slot_mapping: torch.Tensor, num_heads: int,
                        num_kv_heads: int) -> torch.Tensor:
    """Triton QKV projection + rotary + KV-cache write; same contract as ``gemv_rope_kv_ref``."""
    _check(x, w, bias, cos_sin_cache, num_heads, num_kv_heads)
    out = torch.empty((x.shape[0], w.shape[0]), dtype=x.dtype, device=x.device)
    _check_args(*split_qkv(out, num_heads, num_kv_heads), positions, cos_sin_cache, key_cache,
                value_cache, slot_mapping)
    launch_gemv_rope_kv(x, w, bias, out, positions, cos_sin_cache, key_cache, value_cache,
                        slot_mapping, num_heads, num_kv_heads,
                        rope_config(w.shape[0], w.shape[1], x.device))
    return out


FUSELM_LIB.define(
    "gemv_rope_kv(Tensor x, Tensor w, Tensor? bias, Tensor positions, Tensor cos_sin_cache, "
    "Tensor(a!) key_cache, Tensor(b!) value_cache, Tensor slot_mapping, int num_heads, "
    "int num_kv_heads) -> Tensor"
)


@torch.library.register_fake("fuselm::gemv_rope_kv", lib=FUSELM_LIB)
def _gemv_rope_kv_fake(x, w, bias, positions, cos_sin_cache, key_cache, value_cache,
                       slot_mapping, num_heads, num_kv_heads):
    return x.new_empty((x.shape[0], w.shape[0]))


if _triton_utils.triton_available():
    for _key in _triton_utils.triton_dispatch_keys():
        FUSELM_LIB.impl("gemv_rope_kv", gemv_rope_kv_triton, _key)
    _registry.register("gemv_rope_kv", "triton", torch.ops.fuselm.gemv_rope_kv.default)


def select_gemv_rope_kv(backend: str, weight: torch.Tensor, device: torch.device,
                        rot_dim: int, head_size: int):
    """The batch-1 fused QKV projection + rotary + KV write for a ``[n, k]`` weight, or None
    (the separate kernels): see ``gemv.select_tuned_op``; only for rotary over the whole (even)
    head."""
    return select_tuned_op("gemv_rope_kv", backend, weight, device, rope_bucket,
                           fits=rot_dim == head_size and head_size % 2 == 0)
