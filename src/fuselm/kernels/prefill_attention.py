"""Causal attention for a packed batch of new-token chunks, over cached prefixes (varlen, GQA).

Sequence ``b`` brings ``q_len = query_start_loc[b+1] - query_start_loc[b]`` new tokens, and has
``context_len = seq_lens[b] - q_len`` earlier tokens already in the paged KV cache (its blocks in
``block_tables[b]``). New query ``i`` sits at position ``context_len + i`` and attends keys at
positions ``<= context_len + i``: the cached prefix, then the new keys causally.

Shapes: q ``[num_tokens, num_heads, head_size]``; k, v ``[num_tokens, num_kv_heads, head_size]``
(the new tokens, already rotated); key_cache, value_cache ``[num_blocks, block_size,
num_kv_heads, head_size]``; query_start_loc int32 ``[num_seqs + 1]``; seq_lens int32
``[num_seqs]``; block_tables int32 ``[num_seqs, max_blocks]``. Returns ``[num_tokens, num_heads,
head_size]`` in q's dtype. ``num_heads`` must be a multiple of ``num_kv_heads``.

Backends: ``prefill_attention_ref`` (the spec, float32) and ``prefill_attention_triton``
(FlashAttention-2 style, head sizes multiple of 16 up to 256; optional ``config=`` and ``out=``),
registered as ``fuselm::prefill_attention``; ``select("prefill_attention", backend, device)``
returns a callable with the reference's signature. Nothing is mutated. The new tokens' k/v are
also in the cache (rotary_store_kv wrote them); the kernel reads them from k/v, contiguous.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from fuselm.kernels import _registry, _triton_utils
from fuselm.kernels._triton_utils import FUSELM_LIB, next_power_of_2


def gather_cached_kv(
    cache: torch.Tensor, block_table: torch.Tensor, length: int
) -> torch.Tensor:
    """The first ``length`` tokens of one sequence from a paged cache: ``[length, kv_heads, D]``."""
    block_size = cache.shape[1]
    num_blocks = (length + block_size - 1) // block_size
    blocks = cache[block_table[:num_blocks].long()]
    return blocks.reshape(-1, *cache.shape[2:])[:length]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
            context_len: int) -> torch.Tensor:
    """q ``[L, H, D]``, k/v ``[C + L, Hkv, D]``; float32 causal attention with an offset."""
    num_q, num_heads = q.shape[0], q.shape[1]
    group = num_heads // k.shape[1]
    qf = q.float().transpose(0, 1)  # [H, L, D]
    kf = k.float().repeat_interleave(group, dim=1).transpose(0, 1)
    vf = v.float().repeat_interleave(group, dim=1).transpose(0, 1)
    qpos = torch.arange(num_q, device=q.device)[:, None] + context_len
    kpos = torch.arange(k.shape[0], device=q.device)[None, :]
    mask = kpos <= qpos  # [L, C + L]
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
) -> torch.Tensor:
    """Plain PyTorch varlen causal attention with cached prefixes, in float32."""
    out = torch.empty_like(q)
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    for b, seq_len in enumerate(lens):
        lo, hi = starts[b], starts[b + 1]
        if hi == lo:
            continue
        context_len = seq_len - (hi - lo)
        keys, values = k[lo:hi], v[lo:hi]
        if context_len > 0:
            keys = torch.cat(
                (gather_cached_kv(key_cache, block_tables[b], context_len).to(k.dtype), keys)
            )
            values = torch.cat(
                (gather_cached_kv(value_cache, block_tables[b], context_len).to(v.dtype), values)
            )
        out[lo:hi] = _attend(q[lo:hi], keys, values, scale, context_len).to(q.dtype)
    return out


_registry.register("prefill_attention", "reference", prefill_attention_ref)


# --------------------------------------------------------------------------------------------
# Triton: FlashAttention-2 style. One program owns BLOCK_Q new tokens of one sequence times
# HEADS_PER_PROG query heads that share one KV head, as one [BLOCK_M = BLOCK_Q * HEADS_PER_PROG,
# D] tile (row r: token r // HEADS_PER_PROG, head r % HEADS_PER_PROG), so each K/V tile is loaded
# once for that many heads. It walks the cached prefix through the block table (no mask but the
# tail), then the new keys from k/v: tiles left of the diagonal unmasked, diagonal tiles masked.
# Online softmax in fp32 in the log2 domain (scale * log2(e) folded into one multiply, exp2).
# Config switches that cut instructions (fold_scale, narrow_offsets, lazy_rescale, lean_edges:
# see _online_softmax_step, _token_offsets, _lazy_rescale_step and the kernel's LEAN_EDGES) are
# off by default; the benchmark's sweep times them and the tuning table turns them on per GPU.
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
    use_tma: bool = False  # new keys through TMA descriptors (Hopper+; power-of-2 head sizes)
    # Fewer instructions in the unmasked loop (same results up to rounding; see the kernel):
    fold_scale: bool = False  # row max of the raw scores: no multiply a score (last bits only)
    narrow_offsets: bool = False  # int32 offsets for the new keys when they fit (no TMA)
    lazy_rescale: bool = False  # FA4: rescale acc only when a row max grew by > 2^8
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
    tuned = _triton_utils.tuned_triton_config(
        "prefill_attention", f"d{d_pad}_{str(dtype).removeprefix('torch.')}", "cuda",
        device.index or 0)
    if tuned:
        cfg = cfg._replace(**{k: type(getattr(cfg, k))(v) for k, v in tuned.items()
                              if k in cfg._fields})
    return cfg


def patch_interpreter_range() -> None:
    """Lets Triton's CPU interpreter loop over a runtime bound (``range(0, ctx_len, BLOCK_N)``).

    The interpreter holds scalars as 1-element arrays and converts a range bound with ``int()``,
    which numpy >= 2.3 refuses for arrays of ndim > 0 (triton 3.6, numpy 2.4). Only under
    ``TRITON_INTERPRET=1``; idempotent. The attention kernels need runtime bounds (context lengths)
    and a ``for`` loop, not ``while``, so that the compiler pipelines it on the GPU.
    """
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_fuselm_range_patch", False):
        return

    def patched(tensor, scope) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._fuselm_range_patch = True
    interpreter._patch_lang_tensor = patched


if _triton_utils.triton_available():
    import triton
    import triton.language as tl

    if _triton_utils.is_interpreting():
        patch_interpreter_range()

    @triton.jit
    def _online_softmax_step(acc, m_i, l_i, qk, v, qk_scale, DOT_PRECISION: tl.constexpr,
                             FOLD_SCALE: tl.constexpr, LAZY_RESCALE: tl.constexpr):
        """One key tile: qk [M, N] from _scores (-inf where masked), v [N, D]; qk_scale is
        scale * log2(e) > 0. FOLD_SCALE (as Triton's tutorial 06): the max of the raw scores
        times the scale is the max of the scaled ones (bit for bit), so the scores need no
        multiply of their own; ``qk * s - m`` is one FMA an element either way (sm_90, 128 x 64:
        32 of a thread's 412 instructions an iteration)."""
        if LAZY_RESCALE:
            acc, m_new, l_i = _lazy_rescale_step(acc, m_i, l_i, qk, v, qk_scale, DOT_PRECISION)
        else:
            if FOLD_SCALE:
                m_new = tl.maximum(m_i, tl.max(qk, axis=1) * qk_scale)
                alpha = tl.exp2(m_i - m_new)
                p = tl.exp2(qk * qk_scale - m_new[:, None])
            else:  # qk came scaled (_scores)
                m_new = tl.maximum(m_i, tl.max(qk, axis=1))
                alpha = tl.exp2(m_i - m_new)
                p = tl.exp2(qk - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None]
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        return acc, m_new, l_i

    @triton.jit
    def _lazy_rescale_step(acc, m_i, l_i, qk, v, qk_scale, DOT_PRECISION: tl.constexpr):
        """_online_softmax_step, scale folded, with FlashAttention-4's conditional rescaling:
        m_i and acc (``acc *= alpha``: 64 FMUL a thread at 128 x 64) stay until some row's max
        grows by more than 8 (log2), so probabilities stay below 2^8 (as precise in bf16). One
        max over all rows (shared memory, a barrier) gives every thread the same branch."""
        m_tile = tl.max(qk, axis=1) * qk_scale
        if tl.max(m_tile - m_i, axis=0) > 8.0:
            m_new = tl.maximum(m_i, m_tile)
            alpha = tl.exp2(m_i - m_new)
            acc = acc * alpha[:, None]
            l_i = l_i * alpha
            m_i = m_new
        p = tl.exp2(qk * qk_scale - m_i[:, None])
        l_i = l_i + tl.sum(p, axis=1)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        return acc, m_i, l_i

    @triton.jit
    def _scores(q, k, qk_scale, DOT_PRECISION: tl.constexpr, RAW: tl.constexpr):
        """q k^T [M, N] in fp32, times qk_scale unless RAW (then _online_softmax_step scales)."""
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if not RAW:
            qk = qk * qk_scale
        return qk

    @triton.jit
    def _token_offsets(tokens, NARROW: tl.constexpr):
        """Token indices, in int32 where all offsets fit (sm_90, 128 x 64: ~3 instead of ~7
        instructions for each of a thread's 8 cp.async addresses an iteration), else int64."""
        return tokens if NARROW else tokens.to(tl.int64)

    @triton.jit
    def _find_seq(qsl_ptr, num_seqs, pid, BLOCK_Q: tl.constexpr):
        """Largest s < num_seqs with qsl[s] // BLOCK_Q + s <= pid (binary search)."""
        lo = num_seqs * 0  # a tensor, also when the loop below does not run
        hi = num_seqs
        while lo + 1 < hi:
            mid = (lo + hi) // 2
            first = tl.load(qsl_ptr + mid) // BLOCK_Q + mid
            if first <= pid:
                lo = mid
            else:
                hi = mid
        return lo

    # num_seqs == 1 must not become a constexpr: it seeds a loop-carried value of _find_seq.
    @triton.jit(do_not_specialize=["num_seqs", "num_q_blocks"])
    def _prefill_attention_kernel(
        out_ptr, q_ptr, k_ptr, v_ptr, kc_ptr, vc_ptr,  # see prefill_attention_ref
        k_desc, v_desc,  # TMA descriptors of k, v as [num_tokens, num_kv_heads * D] (USE_TMA)
        qsl_ptr, seq_lens_ptr, bt_ptr,
        num_seqs, num_q_blocks, qk_scale,  # num_q_blocks: grid size on axis 0
        o_tok_stride, o_head_stride, q_tok_stride, q_head_stride,
        k_tok_stride, k_head_stride, v_tok_stride, v_head_stride,
        kc_block_stride, kc_slot_stride, kc_head_stride,
        vc_block_stride, vc_slot_stride, vc_head_stride,
        bt_stride, block_size,
        GROUP: tl.constexpr,  # query heads per KV head
        HEADS_PER_PROG: tl.constexpr,  # power of 2 dividing GROUP
        HEAD_SIZE: tl.constexpr, D_PAD: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        USE_TMA: tl.constexpr,
        FOLD_SCALE: tl.constexpr, LAZY_RESCALE: tl.constexpr,  # see _online_softmax_step
        NARROW_OFFSETS: tl.constexpr, LEAN_EDGES: tl.constexpr,  # see PrefillConfig
    ):  # fmt: skip
        BLOCK_Q: tl.constexpr = BLOCK_M // HEADS_PER_PROG
        # Last programs first: under causality they own the longest key ranges (less tail).
        pid = num_q_blocks - 1 - tl.program_id(0)
        head0 = tl.program_id(1) * HEADS_PER_PROG
        kv_head = head0 // GROUP
        seq = _find_seq(qsl_ptr, num_seqs, pid, BLOCK_Q)
        q_start = tl.load(qsl_ptr + seq)
        q_len = tl.load(qsl_ptr + seq + 1) - q_start
        q0 = (pid - (q_start // BLOCK_Q + seq)) * BLOCK_Q  # first token of this block
        if q0 >= q_len:
            return
        ctx_len = tl.load(seq_lens_ptr + seq) - q_len

        rows = tl.arange(0, BLOCK_M)
        tok = q0 + rows // HEADS_PER_PROG  # [M] token index within the new chunk
        head = head0 + rows % HEADS_PER_PROG
        offs_d = tl.arange(0, D_PAD)
        d_mask = offs_d < HEAD_SIZE
        row_mask = tok < q_len
        q_off = (q_start + tok).to(tl.int64) * q_tok_stride + head * q_head_stride
        q = tl.load(q_ptr + q_off[:, None] + offs_d[None, :],
                    mask=row_mask[:, None] & d_mask[None, :], other=0.0)

        m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)  # finite: no inf - inf on masked rows
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
        offs_n = tl.arange(0, BLOCK_N)

        # 1) The cached prefix, gathered through the block table; only the last tile is partial.
        # (Not under `if ctx_len > 0`: a branch result in acc makes ptxas serialize wgmma, C7515.)
        kc_base = kc_ptr + kv_head * kc_head_stride
        vc_base = vc_ptr + kv_head * vc_head_stride
        bt_row = bt_ptr + seq.to(tl.int64) * bt_stride
        for n0 in range(0, ctx_len, BLOCK_N):
            pos = n0 + offs_n
            n_mask = pos < ctx_len
            blk = tl.load(bt_row + pos // block_size, mask=n_mask, other=0).to(tl.int64)
            slot = pos % block_size
            kv_mask = n_mask[:, None] & d_mask[None, :]
            k = tl.load(kc_base + (blk * kc_block_stride + slot * kc_slot_stride)[:, None]
                        + offs_d[None, :], mask=kv_mask, other=0.0)
            qk = _scores(q, k, qk_scale, DOT_PRECISION, FOLD_SCALE or LAZY_RESCALE)
            qk = tl.where(n_mask[None, :], qk, float("-inf"))
            v = tl.load(vc_base + (blk * vc_block_stride + slot * vc_slot_stride)[:, None]
                        + offs_d[None, :], mask=kv_mask, other=0.0)
            acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, qk, v, qk_scale, DOT_PRECISION,
                                                 FOLD_SCALE, LAZY_RESCALE)

        # 2) New keys left of the diagonal: every row sees every key, no mask.
        k_base = k_ptr + kv_head * k_head_stride
        v_base = v_ptr + kv_head * v_head_stride
        full_end = (q0 // BLOCK_N) * BLOCK_N
        for n0 in range(0, full_end, BLOCK_N):
            kv_off = _token_offsets(q_start + n0 + offs_n, NARROW_OFFSETS)
            if USE_TMA:
                k = k_desc.load([q_start + n0, kv_head * HEAD_SIZE])
            else:
                k = tl.load(k_base + (kv_off * k_tok_stride)[:, None] + offs_d[None, :],
                            mask=d_mask[None, :], other=0.0)
            qk = _scores(q, k, qk_scale, DOT_PRECISION, FOLD_SCALE or LAZY_RESCALE)
            if USE_TMA:
                v = v_desc.load([q_start + n0, kv_head * HEAD_SIZE])
            else:
                v = tl.load(v_base + (kv_off * v_tok_stride)[:, None] + offs_d[None, :],
                            mask=d_mask[None, :], other=0.0)
            acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, qk, v, qk_scale, DOT_PRECISION,
                                                 FOLD_SCALE, LAZY_RESCALE)

        # 3) Diagonal tiles: causal mask.
        diag_end = tl.minimum(q0 + BLOCK_Q, q_len)
        for n0 in range(full_end, diag_end, BLOCK_N):
            pos = n0 + offs_n
            n_mask = pos < q_len
            kv_off = _token_offsets(q_start + pos, NARROW_OFFSETS)
            kv_mask = n_mask[:, None] & d_mask[None, :]
            # Rows past the sequence (the next one's, or beyond num_tokens: zeros under TMA)
            # only meet masked scores and zero probabilities.
            if USE_TMA:
                k = k_desc.load([q_start + n0, kv_head * HEAD_SIZE])
            else:
                k = tl.load(k_base + (kv_off * k_tok_stride)[:, None] + offs_d[None, :],
                            mask=kv_mask, other=0.0)
            qk = _scores(q, k, qk_scale, DOT_PRECISION, FOLD_SCALE or LAZY_RESCALE)
            if LEAN_EDGES:  # a valid row's keys (pos <= tok < q_len) are in its sequence
                visible = pos[None, :] <= tok[:, None]
            else:
                visible = (pos[None, :] <= tok[:, None]) & n_mask[None, :]
            qk = tl.where(visible, qk, float("-inf"))
            if USE_TMA:
                v = v_desc.load([q_start + n0, kv_head * HEAD_SIZE])
            else:
                v = tl.load(v_base + (kv_off * v_tok_stride)[:, None] + offs_d[None, :],
                            mask=kv_mask, other=0.0)
            acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, qk, v, qk_scale, DOT_PRECISION,
                                                 FOLD_SCALE, LAZY_RESCALE)

        if LEAN_EDGES:  # one division a row, not a (5-instruction) div.full.f32 an element
            out = acc * (1.0 / l_i)[:, None]
        else:
            out = acc / l_i[:, None]
        o_off = (q_start + tok).to(tl.int64) * o_tok_stride + head * o_head_stride
        tl.store(out_ptr + o_off[:, None] + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=row_mask[:, None] & d_mask[None, :])


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
) -> torch.Tensor:
    """Triton varlen causal attention over cached prefixes; same contract as the reference.

    ``config`` overrides the launch heuristic (the benchmark's sweep, the tests); ``out``
    (``[num_tokens, num_heads, head_size]``, q's dtype, last dim contiguous) avoids allocating.
    No host synchronisation: the grid depends on tensor shapes only.
    """
    _check_prefill_args(q, k, v, key_cache, value_cache, query_start_loc, seq_lens, block_tables)
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
    use_tma = cfg.use_tma and _tma_ok(k, v)
    k_desc, v_desc = (_kv_descriptor(k, cfg.block_n), _kv_descriptor(v, cfg.block_n)) \
        if use_tma else (k, v)
    _prefill_attention_kernel[grid](
        out, q, k, v, key_cache, value_cache, k_desc, v_desc,
        query_start_loc, seq_lens, block_tables,
        num_seqs, grid[0], scale * _LOG2E,
        out.stride(0), out.stride(1), q.stride(0), q.stride(1),
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        block_tables.stride(0), key_cache.shape[1],
        GROUP=group, HEADS_PER_PROG=hpp, HEAD_SIZE=head_size,
        D_PAD=max(16, next_power_of_2(head_size)), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", USE_TMA=use_tma,
        FOLD_SCALE=cfg.fold_scale, LAZY_RESCALE=cfg.lazy_rescale, LEAN_EDGES=cfg.lean_edges,
        NARROW_OFFSETS=cfg.narrow_offsets and _int32_offsets_fit(k, v, cfg.block_n),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out


def _int32_offsets_fit(k: torch.Tensor, v: torch.Tensor, block_n: int) -> bool:
    """Every offset into k/v a program forms (tokens up to num_tokens + block_n) fits int32."""
    return all((t.shape[0] + block_n) * t.stride(0) + t.shape[1] * t.stride(1) < 2**31
               for t in (k, v))


def _tma_ok(k: torch.Tensor, v: torch.Tensor) -> bool:
    """TMA descriptors apply: Hopper or newer (or the interpreter), power-of-2 head size, heads
    of a token adjacent (so k is a [num_tokens, num_kv_heads * D] view), 16-byte alignment."""
    head_size = k.shape[2]
    if k.device.type == "cuda":
        if torch.cuda.get_device_capability(k.device)[0] < 9:
            return False
    elif not _triton_utils.is_interpreting():
        return False
    return head_size == next_power_of_2(head_size) and all(
        t.stride(1) == head_size and t.data_ptr() % 16 == 0
        and (t.stride(0) * t.element_size()) % 16 == 0 for t in (k, v))


def _kv_descriptor(x: torch.Tensor, block_n: int):
    from triton.tools.tensor_descriptor import TensorDescriptor

    num_tokens, num_kv_heads, head_size = x.shape
    return TensorDescriptor(x, [num_tokens, num_kv_heads * head_size], [x.stride(0), 1],
                            [block_n, head_size])


# --------------------------------------------------------------------------------------------
# Registration: fuselm::prefill_attention wraps the Triton launcher (one opaque op for
# torch.compile); the registry hands out the op's default overload.
# --------------------------------------------------------------------------------------------

FUSELM_LIB.define(
    "prefill_attention(Tensor q, Tensor k, Tensor v, Tensor key_cache, Tensor value_cache, "
    "Tensor query_start_loc, Tensor seq_lens, Tensor block_tables, float scale) -> Tensor"
)


@torch.library.register_fake("fuselm::prefill_attention", lib=FUSELM_LIB)
def _prefill_attention_fake(q, k, v, key_cache, value_cache, query_start_loc, seq_lens,
                            block_tables, scale) -> torch.Tensor:
    return torch.empty_like(q)


def _prefill_attention_op(q, k, v, key_cache, value_cache, query_start_loc, seq_lens,
                          block_tables, scale) -> torch.Tensor:
    return prefill_attention_triton(q, k, v, key_cache, value_cache, query_start_loc, seq_lens,
                                    block_tables, scale)


if _triton_utils.triton_available():
    for _key in _triton_utils.triton_dispatch_keys():
        FUSELM_LIB.impl("prefill_attention", _prefill_attention_op, _key)
    _registry.register("prefill_attention", "triton", torch.ops.fuselm.prefill_attention.default)
