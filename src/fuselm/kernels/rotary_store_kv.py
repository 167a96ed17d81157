"""Rotary embedding of q and k (neox layout) fused with writing k and v to the paged KV cache.

Shapes: q ``[num_tokens, num_heads, head_size]``, k and v ``[num_tokens, num_kv_heads,
head_size]`` (each may be a strided view of one QKV output; the last dim is contiguous),
positions int64 ``[num_tokens]``, cos_sin_cache float32 ``[max_position, rot_dim]`` with the
cosines in the first ``rot_dim // 2`` columns and the sines in the rest, key_cache and value_cache
``[num_blocks, block_size, num_kv_heads, head_size]``, slot_mapping int64 ``[num_tokens]``
(-1: do not store), k_scale / v_scale floats (used by an FP8 cache only: ``kv_quant``).
Neox layout: dims ``i`` and ``i + rot_dim // 2`` form a pair, ``x1' = x1 cos - x2 sin``,
``x2' = x2 cos + x1 sin``; dims beyond rot_dim pass through.

In place: q and k are rotated; rotated k and v are written at their slots (an FP8 cache stores
``e4m3(clamp(x / scale))``, see ``kv_quant``; the Triton kernel rounds in float32 itself, so that
the interpreter, whose own float32 -> fp8 cast does not round to nearest even, matches too).

Backends: ``rotary_store_kv_ref`` (the spec), ``rotary_store_kv_triton`` (the torch op
``fuselm::rotary_store_kv``), ``rotary_store_kv_cuda`` (``fuselm_C::rotary_store_kv``,
``csrc/rotary_store_kv.cu``; cos_sin_cache float32, caches of k's dtype: an FP8 cache goes to the
Triton kernel). The fast backends do not check positions and slots against the cache sizes (that
would synchronize): out-of-range values are the caller's bug.
"""

from __future__ import annotations

import torch

from fuselm.kernels import _pdl, triton_utils
from fuselm.kernels.kv_quant import FP8_KV_DTYPE, check_kv_scale, quantize_kv_ref
from fuselm.kernels.triton_utils import FUSELM_LIB, next_power_of_2


def apply_rotary_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Neox rotary on x ``[T, H, D]`` with cos/sin ``[T, rot_dim // 2]``, in float32."""
    half = cos.shape[-1]
    xf = x.float()
    x1, x2 = xf[..., :half], xf[..., half : 2 * half]
    c, s = cos[:, None, :], sin[:, None, :]
    out = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s, xf[..., 2 * half :]), dim=-1)
    return out.to(x.dtype)


def _rotate_full(x: torch.Tensor, cos2: torch.Tensor, sin2: torch.Tensor) -> torch.Tensor:
    """Neox rotary over the whole head, ``x * cos2 + swap_halves(x) * sin2`` (sin2 = -sin|sin);
    the same arithmetic as ``apply_rotary_ref`` in fewer operations (the CPU decode path)."""
    xf = x.float()
    half = xf.shape[-1] // 2
    return (xf * cos2 + torch.cat((xf[..., half:], xf[..., :half]), dim=-1) * sin2).to(x.dtype)


def rotary_store_kv_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Rotates q and k in place and stores k and v in the cache at ``slot_mapping`` (an FP8
    cache quantized with ``k_scale`` / ``v_scale``)."""
    half = cos_sin_cache.shape[-1] // 2
    cs = cos_sin_cache.index_select(0, positions)
    cos, sin = cs[:, :half].float(), cs[:, half:].float()
    if 2 * half == q.shape[-1]:
        cos2 = torch.cat((cos, cos), dim=-1)[:, None, :]
        sin2 = torch.cat((-sin, sin), dim=-1)[:, None, :]
        q.copy_(_rotate_full(q, cos2, sin2))
        k.copy_(_rotate_full(k, cos2, sin2))
    else:
        q.copy_(apply_rotary_ref(q, cos, sin))
        k.copy_(apply_rotary_ref(k, cos, sin))
    slots, keys, values = slot_mapping, k, v
    if bool((slot_mapping < 0).any()):
        keep = slot_mapping >= 0
        slots, keys, values = slot_mapping[keep], k[keep], v[keep]
    flat_shape = (-1, *key_cache.shape[2:])
    key_cache.view(flat_shape)[slots] = quantize_kv_ref(keys, k_scale, key_cache.dtype)
    value_cache.view(flat_shape)[slots] = quantize_kv_ref(values, v_scale, value_cache.dtype)


# --------------------------------------------------------------------------------------------
# Argument checks shared by the Triton and CUDA launchers (ValueError; no device sync).
# --------------------------------------------------------------------------------------------


def _check_args(q, k, v, positions, cos_sin_cache, key_cache, value_cache, slot_mapping) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 3 or (t.shape[-1] > 1 and t.stride(-1) != 1):
            raise ValueError(f"{name} must be [tokens, heads, head_size], contiguous in head_size")
    num_tokens, _, head_size = q.shape
    if k.shape != v.shape or k.shape[0] != num_tokens or k.shape[2] != head_size:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} disagree")
    for name, c in (("key_cache", key_cache), ("value_cache", value_cache)):
        if c.dim() != 4 or c.shape[2:] != k.shape[1:] or c.stride(-1) != 1:
            raise ValueError(
                f"{name} must be [num_blocks, block_size, {k.shape[1]}, {head_size}] "
                f"contiguous in head_size, got {tuple(c.shape)}"
            )
    if key_cache.shape[1] != value_cache.shape[1]:
        raise ValueError("key_cache and value_cache block sizes differ")
    for name, t in (("positions", positions), ("slot_mapping", slot_mapping)):
        if t.shape != (num_tokens,) or t.dtype != torch.int64 or t.stride(0) != 1:
            raise ValueError(f"{name} must be contiguous int64 [{num_tokens}]")
    rot_dim = cos_sin_cache.shape[-1]
    if cos_sin_cache.dim() != 2 or cos_sin_cache.stride(-1) != 1 or rot_dim % 2:
        raise ValueError("cos_sin_cache must be [max_position, rot_dim], rot_dim even")
    if rot_dim > head_size:
        raise ValueError(f"rot_dim {rot_dim} exceeds head_size {head_size}")
    devices = {t.device for t in (q, k, v, positions, cos_sin_cache, key_cache, value_cache)}
    if len(devices | {slot_mapping.device}) != 1:
        raise ValueError(f"all tensors must be on one device, got {devices}")


# --------------------------------------------------------------------------------------------
# Triton. Grid (num_tokens, 2): program (t, 0) rotates q of token t; program (t, 1) rotates k,
# stores it and copies v into the cache slot. Heads are tiled BLOCK_H at a time as
# [BLOCK_H, BLOCK_HALF] tiles of the two rotary halves (fp32 math, 16-byte loads at half >= 8).
# --------------------------------------------------------------------------------------------


def _rotary_config(num_heads: int, num_kv_heads: int, head_size: int, rot_dim: int, device):
    """Meta-parameters: tile sizes from the head geometry, then the tuned num_warps."""
    block_half = next_power_of_2(max(rot_dim // 2, 1))
    max_heads = max(1, 2048 // block_half)  # tiles of at most 2048 elements a half
    block_hq = min(next_power_of_2(num_heads), max_heads)
    block_hk = min(next_power_of_2(num_kv_heads), max_heads)
    cfg = {
        "BLOCK_HQ": block_hq,
        "NUM_HQ_CHUNKS": -(-num_heads // block_hq),
        "BLOCK_HK": block_hk,
        "NUM_HK_CHUNKS": -(-num_kv_heads // block_hk),
        "BLOCK_HALF": block_half,
        "BLOCK_D": next_power_of_2(head_size),
        "BLOCK_TAIL": next_power_of_2(max(head_size - rot_dim, 1)),
        "HAS_TAIL": rot_dim < head_size,
        # about one 16-byte vector of each rotary half a thread: 32 heads x 64 -> 8 warps
        "num_warps": max(1, min(8, block_hq * block_half // 256)),
    }
    if device.type == "cuda":
        bucket = f"q{num_heads}_kv{num_kv_heads}_d{head_size}"
        index = device.index or 0
        tuned = triton_utils.tuned_triton_config("rotary_store_kv", bucket, "cuda", index)
        cfg["num_warps"] = tuned.get("num_warps", cfg["num_warps"])
    return cfg


if triton_utils.triton_available():
    import triton
    import triton.language as tl

    from fuselm.kernels._pdl import pdl_wait_then_release

    @triton.jit
    def _quantize_e4m3(x, scale):
        """float32 ``x / scale`` rounded to the nearest e4m3fn value (ties to even), saturating
        at +-448, still float32 (so the cast to fp8 after it is exact on every backend)."""
        y = tl.div_rn(x, scale)  # IEEE division, as the reference's
        bits = y.to(tl.int32, bitcast=True)
        mag = tl.minimum(tl.abs(y), 448.0)
        e = ((mag.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127  # unbiased exponent
        e = tl.maximum(e, -6)  # subnormals share the ulp of 2^-6 (2^-9)
        up = ((130 - e) << 23).to(tl.float32, bitcast=True)  # 2^(3 - e): ulp -> 1
        down = ((124 + e) << 23).to(tl.float32, bitcast=True)  # 2^(e - 3)
        # + 1.5 * 2^23 and back rounds mag * up < 16 to an integer, ties to even
        r = ((mag * up + 12582912.0) - 12582912.0) * down
        return tl.where(bits < 0, -r, r)  # the sign bit: -0.0 and tiny negatives stay -0

    @triton.jit
    def _cache_value(x, scale, cty, KV_FP8: tl.constexpr):
        """What a cache of element type ``cty`` stores for x (fp8: scaled and rounded)."""
        if KV_FP8:
            return _quantize_e4m3(x.to(tl.float32), scale).to(cty)
        return x.to(cty)

    @triton.jit
    def _rotate_heads(
        x_tok, head_stride, cache_tok, cache_head_stride, num_heads, half, rot_dim, head_size,
        cos, sin, store, kv_scale,
        BLOCK_H: tl.constexpr, NUM_H_CHUNKS: tl.constexpr, BLOCK_HALF: tl.constexpr,
        BLOCK_TAIL: tl.constexpr, STORE: tl.constexpr, HAS_TAIL: tl.constexpr,
        KV_FP8: tl.constexpr,
    ):  # fmt: skip
        """Rotates heads of one token in place; with STORE also writes them to the cache slot."""
        offs = tl.arange(0, BLOCK_HALF)
        dmask = offs < half
        for chunk in range(NUM_H_CHUNKS):  # constexpr bound: the interpreter needs one
            heads = (chunk * BLOCK_H + tl.arange(0, BLOCK_H)).to(tl.int64)
            mask = (heads < num_heads)[:, None] & dmask[None, :]
            p1 = x_tok + heads[:, None] * head_stride + offs[None, :]  # [BLOCK_H, BLOCK_HALF]
            x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
            x2 = tl.load(p1 + half, mask=mask, other=0.0).to(tl.float32)
            o1 = (x1 * cos[None, :] - x2 * sin[None, :]).to(x_tok.dtype.element_ty)
            o2 = (x2 * cos[None, :] + x1 * sin[None, :]).to(x_tok.dtype.element_ty)
            tl.store(p1, o1, mask=mask)
            tl.store(p1 + half, o2, mask=mask)
            if STORE:
                c1 = cache_tok + heads[:, None] * cache_head_stride + offs[None, :]
                cty = cache_tok.dtype.element_ty
                tl.store(c1, _cache_value(o1, kv_scale, cty, KV_FP8), mask=mask & store)
                tl.store(c1 + half, _cache_value(o2, kv_scale, cty, KV_FP8), mask=mask & store)
                if HAS_TAIL:  # dims beyond rot_dim pass through to the cache
                    tail = rot_dim + tl.arange(0, BLOCK_TAIL)
                    tmask = (heads < num_heads)[:, None] & (tail < head_size)[None, :] & store
                    xt = tl.load(x_tok + heads[:, None] * head_stride + tail[None, :], mask=tmask)
                    tl.store(
                        cache_tok + heads[:, None] * cache_head_stride + tail[None, :],
                        _cache_value(xt, kv_scale, cty, KV_FP8),
                        mask=tmask,
                    )

    @triton.jit
    def _rotary_store_kv_kernel(
        q_ptr, k_ptr, v_ptr, pos_ptr, cos_sin_ptr, kc_ptr, vc_ptr, slot_ptr, k_scale, v_scale,
        num_heads, num_kv_heads, head_size, half, block_size, cos_sin_stride,
        q_tok_stride, q_head_stride, k_tok_stride, k_head_stride, v_tok_stride, v_head_stride,
        kc_block_stride, kc_slot_stride, kc_head_stride,
        vc_block_stride, vc_slot_stride, vc_head_stride,
        BLOCK_HQ: tl.constexpr, NUM_HQ_CHUNKS: tl.constexpr, BLOCK_HK: tl.constexpr,
        NUM_HK_CHUNKS: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_TAIL: tl.constexpr, HAS_TAIL: tl.constexpr,
        KV_FP8: tl.constexpr = False,  # fp8 caches: store x / scale, rounded (kv_quant)
        USE_PDL: tl.constexpr = False,  # programmatic dependent launch (_pdl.py)
    ):  # fmt: skip
        pdl_wait_then_release(USE_PDL)
        t = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK_HALF)
        cs_row = cos_sin_ptr + tl.load(pos_ptr + t) * cos_sin_stride
        cos = tl.load(cs_row + offs, mask=offs < half, other=0.0).to(tl.float32)
        sin = tl.load(cs_row + half + offs, mask=offs < half, other=0.0).to(tl.float32)
        if tl.program_id(1) == 0:
            _rotate_heads(
                q_ptr + t * q_tok_stride, q_head_stride, q_ptr, 0, num_heads, half, 2 * half,
                head_size, cos, sin, False, 1.0,
                BLOCK_H=BLOCK_HQ, NUM_H_CHUNKS=NUM_HQ_CHUNKS, BLOCK_HALF=BLOCK_HALF,
                BLOCK_TAIL=BLOCK_TAIL, STORE=False, HAS_TAIL=False, KV_FP8=False,
            )  # fmt: skip
        else:
            slot = tl.load(slot_ptr + t)
            store = slot >= 0
            slot = tl.maximum(slot, 0)
            block = slot // block_size
            offset = slot - block * block_size
            kc_tok = kc_ptr + block * kc_block_stride + offset * kc_slot_stride
            vc_tok = vc_ptr + block * vc_block_stride + offset * vc_slot_stride
            _rotate_heads(
                k_ptr + t * k_tok_stride, k_head_stride, kc_tok, kc_head_stride, num_kv_heads,
                half, 2 * half, head_size, cos, sin, store, k_scale,
                BLOCK_H=BLOCK_HK, NUM_H_CHUNKS=NUM_HK_CHUNKS, BLOCK_HALF=BLOCK_HALF,
                BLOCK_TAIL=BLOCK_TAIL, STORE=True, HAS_TAIL=HAS_TAIL, KV_FP8=KV_FP8,
            )  # fmt: skip
            dims = tl.arange(0, BLOCK_D)
            for chunk in range(NUM_HK_CHUNKS):
                heads = (chunk * BLOCK_HK + tl.arange(0, BLOCK_HK)).to(tl.int64)
                mask = (heads < num_kv_heads)[:, None] & (dims < head_size)[None, :] & store
                vals = tl.load(
                    v_ptr + t * v_tok_stride + heads[:, None] * v_head_stride + dims[None, :],
                    mask=mask,
                )
                tl.store(
                    vc_tok + heads[:, None] * vc_head_stride + dims[None, :],
                    _cache_value(vals, v_scale, vc_ptr.dtype.element_ty, KV_FP8),
                    mask=mask,
                )


def _check_cache_dtypes(key_cache: torch.Tensor, value_cache: torch.Tensor, k_scale: float,
                        v_scale: float) -> bool:
    """ValueError unless both caches share a dtype and the scales are > 0; True for fp8."""
    if key_cache.dtype != value_cache.dtype:
        raise ValueError(f"key_cache ({key_cache.dtype}) and value_cache ({value_cache.dtype}) "
                         "must have one dtype")
    check_kv_scale("k_scale", k_scale)
    check_kv_scale("v_scale", v_scale)
    return key_cache.dtype == FP8_KV_DTYPE


def _launch_rotary_store_kv(q, k, v, positions, cos_sin_cache, key_cache, value_cache,
                            slot_mapping, cfg: dict, k_scale: float = 1.0,
                            v_scale: float = 1.0) -> None:  # fmt: skip
    """Launches ``_rotary_store_kv_kernel`` with explicit meta-parameters."""
    num_tokens, num_heads, head_size = q.shape
    if num_tokens == 0:
        return
    _rotary_store_kv_kernel[(num_tokens, 2)](
        q, k, v, positions, cos_sin_cache, key_cache, value_cache, slot_mapping,
        float(k_scale), float(v_scale),
        num_heads, k.shape[1], head_size, cos_sin_cache.shape[1] // 2, key_cache.shape[1],
        cos_sin_cache.stride(0),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        KV_FP8=key_cache.dtype == FP8_KV_DTYPE, **cfg, **_pdl.launch_args(q),
    )  # fmt: skip


def rotary_store_kv_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Triton rotary + KV-cache write, in place; same contract as ``rotary_store_kv_ref``."""
    args = (q, k, v, positions, cos_sin_cache, key_cache, value_cache, slot_mapping)
    _check_args(*args)
    _check_cache_dtypes(key_cache, value_cache, k_scale, v_scale)
    cfg = _rotary_config(q.shape[1], k.shape[1], q.shape[2], cos_sin_cache.shape[1], q.device)
    _launch_rotary_store_kv(*args, cfg, k_scale, v_scale)


# --------------------------------------------------------------------------------------------
# CUDA: csrc/rotary_store_kv.cu, registered as fuselm_C::rotary_store_kv (cos_sin_cache fp32,
# caches of k's dtype). An FP8 cache runs the Triton kernel: the store is a few KB a token, so a
# CUDA quantizing variant would gain a launch's worth at most.
# --------------------------------------------------------------------------------------------


def rotary_store_kv_cuda(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """CUDA rotary + KV-cache write, in place (``fuselm_C::rotary_store_kv``); an FP8 cache
    goes to ``rotary_store_kv_triton``."""
    args = (q, k, v, positions, cos_sin_cache, key_cache, value_cache, slot_mapping)
    _check_args(*args)
    if _check_cache_dtypes(key_cache, value_cache, k_scale, v_scale):
        cfg = _rotary_config(q.shape[1], k.shape[1], q.shape[2], cos_sin_cache.shape[1],
                             q.device)
        _launch_rotary_store_kv(*args, cfg, k_scale, v_scale)
        return
    if key_cache.dtype != k.dtype:
        raise ValueError(f"the CUDA rotary_store_kv needs caches of k's dtype {k.dtype} (or "
                         f"fp8), got {key_cache.dtype}")
    torch.ops.fuselm_C.rotary_store_kv(*args)


# --------------------------------------------------------------------------------------------
# Registration (see rms_norm.py).
# --------------------------------------------------------------------------------------------

FUSELM_LIB.define(
    "rotary_store_kv(Tensor(a!) q, Tensor(b!) k, Tensor v, Tensor positions, "
    "Tensor cos_sin_cache, Tensor(c!) key_cache, Tensor(d!) value_cache, "
    "Tensor slot_mapping, float k_scale=1.0, float v_scale=1.0) -> ()"
)


@torch.library.register_fake("fuselm::rotary_store_kv", lib=FUSELM_LIB)
def _rotary_store_kv_fake(q, k, v, positions, cos_sin_cache, key_cache, value_cache, slots,
                          k_scale=1.0, v_scale=1.0):
    return None


if triton_utils.triton_available():
    for _key in triton_utils.triton_dispatch_keys():
        FUSELM_LIB.impl("rotary_store_kv", rotary_store_kv_triton, _key)

