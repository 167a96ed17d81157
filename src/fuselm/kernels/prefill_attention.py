"""Causal attention for a packed batch of new-token chunks, over cached prefixes (varlen, GQA).

Sequence ``b`` brings ``q_len = query_start_loc[b+1] - query_start_loc[b]`` new tokens, and has
``context_len = seq_lens[b] - q_len`` earlier tokens already in the paged KV cache (its blocks in
``block_tables[b]``). New query ``i`` sits at position ``context_len + i`` and attends keys at
positions ``<= context_len + i``: the cached prefix, then the new keys causally.

Shapes: q ``[num_tokens, num_heads, head_size]``; k, v ``[num_tokens, num_kv_heads, head_size]``
(the new tokens, already rotated); key_cache, value_cache ``[num_blocks, block_size,
num_kv_heads, head_size]``; query_start_loc int32 ``[num_seqs + 1]``; seq_lens int32
``[num_seqs]``; block_tables int32 ``[num_seqs, max_blocks]``; k_scale / v_scale floats: an FP8
(e4m3fn) cache holds K / k_scale and V / v_scale (``kv_quant``), other caches ignore them.
Returns ``[num_tokens, num_heads, head_size]`` in q's dtype. ``num_heads`` must be a multiple
of ``num_kv_heads``.

Backends: ``prefill_attention_ref`` (the spec, float32) and ``prefill_attention_triton``
(FlashAttention-2 style, head sizes multiple of 16 up to 256; optional ``config=`` and ``out=``),
registered as ``fuselm::prefill_attention``; ``resolver.resolve("prefill_attention", backend,
device)`` returns a callable with the reference's signature. Nothing is mutated. The new tokens'
k/v are also in the cache (rotary_store_kv wrote them); the kernel reads them from k/v,
contiguous. With an FP8 cache the cached prefix is read dequantized (the kernel converts the
e4m3 tiles in registers, constexpr ``KV_FP8``), the new tokens at full precision from k/v.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from fuselm.kernels import triton_utils
from fuselm.kernels.kv_quant import FP8_KV_DTYPE, check_kv_scale, dequantize_kv_ref
from fuselm.kernels.triton_utils import FUSELM_LIB, next_power_of_2


def gather_cached_kv(
    cache: torch.Tensor, block_table: torch.Tensor, length: int
) -> torch.Tensor:
    """The first ``length`` tokens of one sequence from a paged cache: ``[length, kv_heads, D]``."""
    block_size = cache.shape[1]
    num_blocks = (length + block_size - 1) // block_size
    blocks = cache[block_table[:num_blocks].long()]
    return blocks.reshape(-1, *cache.shape[2:])[:length]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
            context_len: int, sliding_window: int = 0) -> torch.Tensor:
    """q ``[L, H, D]``, k/v ``[C + L, Hkv, D]``; float32 causal attention with an offset (and
    a query at position i sees keys j > i - sliding_window when that is > 0)."""
    num_q, num_heads = q.shape[0], q.shape[1]
    group = num_heads // k.shape[1]
    qf = q.float().transpose(0, 1)  # [H, L, D]
    kf = k.float().repeat_interleave(group, dim=1).transpose(0, 1)
    vf = v.float().repeat_interleave(group, dim=1).transpose(0, 1)
    qpos = torch.arange(num_q, device=q.device)[:, None] + context_len
    kpos = torch.arange(k.shape[0], device=q.device)[None, :]
    mask = kpos <= qpos  # [L, C + L]
    if sliding_window > 0:
        mask &= kpos > qpos - sliding_window
    out = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=mask, scale=scale)
    return out.transpose(0, 1)


def prefill_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    sliding_window: int = 0,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Plain PyTorch varlen causal attention with cached prefixes, in float32; with
    ``sliding_window`` > 0 a query at position i attends to keys j with i - j < sliding_window
    (transformers' sliding-window mask); an FP8 cache's prefix dequantized with the scales."""
    out = torch.empty_like(q)
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    for b, seq_len in enumerate(lens):
        lo, hi = starts[b], starts[b + 1]
        if hi == lo:
            continue
        context_len = seq_len - (hi - lo)
        keys, values = k[lo:hi].float(), v[lo:hi].float()
        if context_len > 0:
            cached_k = gather_cached_kv(key_cache, block_tables[b], context_len)
            cached_v = gather_cached_kv(value_cache, block_tables[b], context_len)
            keys = torch.cat((dequantize_kv_ref(cached_k, k_scale), keys))
            values = torch.cat((dequantize_kv_ref(cached_v, v_scale), values))
        out[lo:hi] = _attend(q[lo:hi], keys, values, scale, context_len,
                             sliding_window).to(q.dtype)
    return out


# --------------------------------------------------------------------------------------------
# Triton: FlashAttention-2 style. One program owns BLOCK_Q new tokens of one sequence times
# HEADS_PER_PROG query heads that share one KV head, as one [BLOCK_M = BLOCK_Q * HEADS_PER_PROG,
# D] tile (row r: token r // HEADS_PER_PROG, head r % HEADS_PER_PROG), so each K/V tile is loaded
# once for that many heads. It walks the cached prefix through the block table (no mask but the
# tail), then the new keys from k/v: tiles left of the diagonal unmasked, diagonal tiles masked.
# Online softmax in fp32 in the log2 domain (scale * log2(e) folded into one multiply, exp2).
# Config switches that cut instructions (fold_scale, narrow_offsets, lean_edges: see
# _online_softmax_step, _token_offsets and the kernel's LEAN_EDGES) are off by default; the
# benchmark's sweep times them and the tuning table turns them on per GPU. (TMA loads of the new
# keys and FA4-style lazy rescaling were switches no table turned on: removed, numbers in
# docs/perf/log/attention-notes.md.)
# Program -> (sequence, q block): sequence s owns programs [qsl[s] // BLOCK_Q + s, qsl[s+1] //
# BLOCK_Q + s + 1) (at least cdiv(q_len, BLOCK_Q) of them), found by binary search, so the grid
# (num_tokens // BLOCK_Q + num_seqs) needs no host sync.
# --------------------------------------------------------------------------------------------

_LOG2E = 1.4426950408889634


class PrefillConfig(NamedTuple):
    """Launch parameters of ``_prefill_attention_kernel``."""

    block_m: int  # query rows per program (tokens x heads), power of 2 >= 16
    block_n: int  # keys per inner step, power of 2 >= 16
    num_warps: int
    num_stages: int
    max_heads_per_prog: int = 8  # 1: one query head per program
    # Fewer instructions in the unmasked loop (same results up to rounding; see the kernel):
    fold_scale: bool = False  # row max of the raw scores: no multiply a score (last bits only)
    narrow_offsets: bool = False  # int32 offsets for the new keys when they fit (no TMA)
    # Fewer instructions outside it (S=4096: a program's edges are ~10 % of its time):
    lean_edges: bool = False  # plainer diagonal mask, one 1/l a row in the epilogue


def heads_per_program(group: int, cfg: PrefillConfig) -> int:
    """Largest power of 2 dividing ``group`` (query heads per KV head) within the config's cap,
    leaving at least 16 tokens a program."""
    hpp = group & -group
    return max(1, min(hpp, cfg.block_m // 16, cfg.max_heads_per_prog))


def prefill_config(head_size: int, dtype: torch.dtype, device: torch.device) -> PrefillConfig:
    """Heuristic launch config, then the ``configs/prefill_attention.json`` entry for this GPU."""
    d_pad = next_power_of_2(head_size)
    if device.type != "cuda":  # the interpreter: small tiles keep masked waste (and time) low
        return PrefillConfig(16, 16, 4, 1)
    if dtype == torch.float32:
        cfg = PrefillConfig(64, 32, 4, 2)
    elif d_pad <= 64:
        cfg = PrefillConfig(128, 64, 4, 3)
    elif d_pad <= 128:  # Hopper starting point (FA2 / Triton tutorial): 2 warpgroups, 3 stages
        cfg = PrefillConfig(128, 64, 8, 3)
    else:  # 256: a 64 x 256 fp32 accumulator is 64 registers a thread at 8 warps
        cfg = PrefillConfig(64, 32, 8, 2)
    tuned = triton_utils.tuned_triton_config(
        "prefill_attention", f"d{d_pad}_{str(dtype).removeprefix('torch.')}", "cuda",
        device.index or 0)
    if tuned:
        cfg = cfg._replace(**{k: type(getattr(cfg, k))(v) for k, v in tuned.items()
                              if k in cfg._fields})
    return cfg


if triton_utils.triton_available():
    from fuselm.kernels._prefill_triton import _prefill_attention_kernel


def _check_prefill_args(q, k, v, key_cache, value_cache, query_start_loc, seq_lens,
                        block_tables) -> None:
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError("q, k, v must be [num_tokens, heads, head_size]")
    num_tokens, num_heads, head_size = q.shape
    if k.shape != v.shape or k.shape[0] != num_tokens or k.shape[2] != head_size:
        raise ValueError(f"k {tuple(k.shape)} / v {tuple(v.shape)} do not match q {tuple(q.shape)}")
    if num_heads % k.shape[1] != 0:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {k.shape[1]}")
    if head_size % 16 != 0 or head_size > 256:
        raise ValueError(f"head_size must be a multiple of 16 up to 256, got {head_size}")
    for name, t in (("q", q), ("k", k), ("v", v), ("key_cache", key_cache),
                    ("value_cache", value_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}")
    if key_cache.dim() != 4 or key_cache.shape != value_cache.shape or \
            key_cache.shape[2:] != k.shape[1:]:
        raise ValueError("caches must be [num_blocks, block_size, num_kv_heads, head_size]")
    if key_cache.dtype != value_cache.dtype or key_cache.dtype not in (k.dtype, FP8_KV_DTYPE):
        raise ValueError(f"caches ({key_cache.dtype}, {value_cache.dtype}) must both be k's "
                         f"dtype {k.dtype} or {FP8_KV_DTYPE}")
    if query_start_loc.shape[0] != seq_lens.shape[0] + 1 or \
            block_tables.shape[0] != seq_lens.shape[0]:
        raise ValueError("query_start_loc, seq_lens and block_tables disagree on num_seqs")
    if block_tables.stride(-1) != 1:
        raise ValueError("block_tables must be contiguous in its last dimension")


def prefill_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    config: PrefillConfig | None = None,
    out: torch.Tensor | None = None,
    sliding_window: int = 0,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Triton varlen causal attention over cached prefixes; same contract as the reference.

    ``config`` overrides the launch heuristic (the benchmark's sweep, the tests); ``out``
    (``[num_tokens, num_heads, head_size]``, q's dtype, last dim contiguous) avoids allocating.
    No host synchronisation: the grid depends on tensor shapes only.
    """
    _check_prefill_args(q, k, v, key_cache, value_cache, query_start_loc, seq_lens, block_tables)
    if sliding_window < 0:
        raise ValueError(f"sliding_window must be >= 0 (0: none), got {sliding_window}")
    k_scale, v_scale = check_kv_scale("k_scale", k_scale), check_kv_scale("v_scale", v_scale)
    num_tokens, num_heads, head_size = q.shape
    if out is None:
        out = torch.empty_like(q)
    num_seqs = seq_lens.shape[0]
    if num_tokens == 0 or num_seqs == 0:
        return out
    cfg = config or prefill_config(head_size, q.dtype, q.device)
    group = num_heads // k.shape[1]
    hpp = heads_per_program(group, cfg)
    block_q = cfg.block_m // hpp
    grid = (num_tokens // block_q + num_seqs, num_heads // hpp)
    _prefill_attention_kernel[grid](
        out, q, k, v, key_cache, value_cache,
        query_start_loc, seq_lens, block_tables,
        num_seqs, grid[0], scale * _LOG2E, k_scale, v_scale,
        out.stride(0), out.stride(1), q.stride(0), q.stride(1),
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        block_tables.stride(0), key_cache.shape[1],
        GROUP=group, HEADS_PER_PROG=hpp, HEAD_SIZE=head_size,
        D_PAD=max(16, next_power_of_2(head_size)), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        FOLD_SCALE=cfg.fold_scale, LEAN_EDGES=cfg.lean_edges, WINDOW=sliding_window,
        KV_FP8=key_cache.dtype == FP8_KV_DTYPE,
        NARROW_OFFSETS=cfg.narrow_offsets and _int32_offsets_fit(k, v, cfg.block_n),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out


def _int32_offsets_fit(k: torch.Tensor, v: torch.Tensor, block_n: int) -> bool:
    """Every offset into k/v a program forms (tokens up to num_tokens + block_n) fits int32."""
    return all((t.shape[0] + block_n) * t.stride(0) + t.shape[1] * t.stride(1) < 2**31
               for t in (k, v))


# --------------------------------------------------------------------------------------------
# Registration: fuselm::prefill_attention wraps the Triton launcher (one opaque op for
# torch.compile); the resolver hands out the op's default overload.
# --------------------------------------------------------------------------------------------

FUSELM_LIB.define(
    "prefill_attention(Tensor q, Tensor k, Tensor v, Tensor key_cache, Tensor value_cache, "
    "Tensor query_start_loc, Tensor seq_lens, Tensor block_tables, float scale, "
    "int sliding_window=0, float k_scale=1.0, float v_scale=1.0) -> Tensor"
)


@torch.library.register_fake("fuselm::prefill_attention", lib=FUSELM_LIB)
def _prefill_attention_fake(q, k, v, key_cache, value_cache, query_start_loc, seq_lens,
                            block_tables, scale, sliding_window=0, k_scale=1.0,
                            v_scale=1.0) -> torch.Tensor:
    return torch.empty_like(q)


def _prefill_attention_op(q, k, v, key_cache, value_cache, query_start_loc, seq_lens,
                          block_tables, scale, sliding_window=0, k_scale=1.0,
                          v_scale=1.0) -> torch.Tensor:
    return prefill_attention_triton(q, k, v, key_cache, value_cache, query_start_loc, seq_lens,
                                    block_tables, scale, sliding_window=sliding_window,
                                    k_scale=k_scale, v_scale=v_scale)


if triton_utils.triton_available():
    for _key in triton_utils.triton_dispatch_keys():
        FUSELM_LIB.impl("prefill_attention", _prefill_attention_op, _key)
