"""Decode attention: one query token per sequence over the paged KV cache (GQA).

Shapes: q ``[num_seqs, num_heads, head_size]``; key_cache, value_cache ``[num_blocks,
block_size, num_kv_heads, head_size]``; block_tables int32 ``[num_seqs, max_blocks]``; seq_lens
int32 ``[num_seqs]`` (tokens in the cache, the current one included; 0 gives a zero output);
k_scale / v_scale floats: an FP8 (e4m3fn) cache holds K / k_scale and V / v_scale (``kv_quant``),
other caches ignore them. Returns ``[num_seqs, num_heads, head_size]`` in q's dtype:
``softmax(q . K[:seq_len]^T * scale) V[:seq_len]`` per head, query head ``h`` reading KV head
``h // (num_heads // num_kv_heads)``. K and V are the dequantized cache.

Backends and API:

- ``paged_attention_ref``: the spec (float32, gathers the whole block table).
- ``fuselm::paged_attention`` (``resolver.resolve("paged_attention", "triton", device)``): the
  Triton kernel with the reference's signature. It allocates its
  split-KV workspace on every call, sized by the block-table width; fine for tests and eager use.
- ``PagedAttentionWorkspace(max_num_seqs, num_heads, head_size, max_model_len, device)``: the
  serving path. Preallocated float32 buffers; ``ws(q,
  key_cache, value_cache, block_tables, seq_lens, scale, out=None)`` has the reference's
  signature plus ``out=``. One workspace serves every layer. The partition count it launches
  depends on shapes only, so a CUDA graph captured at a short context replays at a long one.
  The model's ``KernelSet`` builds one for Triton and hands it to every attention layer.
- ``paged_attention_triton_out`` / ``fuselm::paged_attention_out``: the in-place launcher behind
  the workspace.

There is no CUDA backend: the CUDA split-KV kernel measured 0.44x cuDNN against Triton's 0.94x
(H100, B=64 x 4096), 924 against 1,131 GB/s at B=1 x 32768 and 22 us against 5.9 us a layer in
the batch-1 decode graph, and no tuning table chose it; it was removed (history and numbers in
git and ``docs/perf/log/attention-notes.md``).

Split-KV: the context is cut into partitions of ``partition_size`` tokens (512; doubled for
``max_model_len`` > 32768 so that at most 64 partitions exist); one program per (sequence, KV
head, partition) reads its K/V slice once for all the query heads of the group; a sequence that
fits one partition writes its output directly, longer ones write partial results that a second
kernel merges. ``seq_lens`` must not exceed ``max_model_len`` (the workspace's capacity).

FP8 caches (the constexpr ``KV_FP8``; the bf16 kernel compiles without it): K and V tiles are
loaded as 1 byte an element and converted to fp16 in registers (exact; one ``cvt`` per two
elements on sm_89+, where e4m3 -> bf16 takes a chain; float32 q stays float32), q and the
probabilities join them in fp16 (q bf16 -> fp16 gains mantissa bits; |q| < 65504 assumed);
k_scale is folded into the score scale and v_scale into the final normalisation. V goes
through ``_e4m3x4_to_f16`` (see there: a plain conversion let the compiler read V byte by
byte), and the fp8 launch config differs from bf16's (``decode_config``: 2 warps, two tiles
in flight, partitions of 4x the workspace's). H200, b64 x 4096, 8B shape, same run: fp8
172 us against 292 for the bf16 cache (0.59x; 314 us for bf16 before the block size became a
constant); the fp8 kernel before these changes took 309 us (0.98x).
"""

from __future__ import annotations

from functools import cache
from typing import NamedTuple

import torch
import torch.nn.functional as F

from fuselm.kernels import _pdl, triton_utils
from fuselm.kernels.decode_workspace import (  # noqa: F401  (public names)
    DEFAULT_PARTITION_SIZE,
    MAX_PARTITIONS,
    PagedAttentionWorkspace,
    partition_size_for,
)
from fuselm.kernels.kv_quant import FP8_KV_DTYPE, check_kv_scale, dequantize_kv_ref
from fuselm.kernels.triton_utils import FUSELM_LIB, next_power_of_2


def paged_attention_ref(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sliding_window: int = 0,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Plain PyTorch paged decode attention over the whole block table, in float32; with
    ``sliding_window`` > 0 only the last ``sliding_window`` tokens of each sequence; an FP8
    cache dequantized with ``k_scale`` / ``v_scale``."""
    num_seqs, num_heads, head_size = q.shape
    num_kv_heads = key_cache.shape[2]
    bt = block_tables.long().reshape(-1)
    # [B, Hkv, max_blocks * block_size, D]
    keys = key_cache.index_select(0, bt).reshape(num_seqs, -1, num_kv_heads, head_size)
    values = value_cache.index_select(0, bt).reshape(num_seqs, -1, num_kv_heads, head_size)
    keys = dequantize_kv_ref(keys, k_scale).transpose(1, 2)
    values = dequantize_kv_ref(values, v_scale).transpose(1, 2)
    pos = torch.arange(keys.shape[2], device=q.device)
    visible = pos[None, :] < seq_lens[:, None].long()
    if sliding_window > 0:
        visible &= pos[None, :] >= seq_lens[:, None].long() - sliding_window
    mask = visible[:, None, None, :]  # [B, 1, 1, S]
    qf = q.float()[:, :, None, :]  # [B, H, 1, D]
    out = F.scaled_dot_product_attention(qf, keys, values, attn_mask=mask, scale=scale,
                                         enable_gqa=num_heads != num_kv_heads)
    if bool((seq_lens == 0).any()):
        out = torch.where(seq_lens[:, None, None, None] > 0, out, torch.zeros_like(out))
    return out[:, :, 0, :].to(q.dtype)


# --------------------------------------------------------------------------------------------
# Split-KV ("flash-decoding"). A sequence's context is cut into partitions of partition_size
# tokens; one program per (sequence, KV head, partition) reads its slice of K and V once for all
# the query heads of the group and writes a normalised partial output with its max logit and
# exp-sum (log2 domain); a second kernel merges the partitions. A sequence whose context fits one
# partition writes its output directly and the merge skips it. The number of partitions launched
# depends on tensor shapes only (the workspace and the block-table width), never on seq_lens, so a
# CUDA graph captured at a short context replays correctly at a long one: the extra programs see
# an empty partition and exit.
# --------------------------------------------------------------------------------------------

_LOG2E = 1.4426950408889634
def _check_decode_args(out, tmp_out, q, key_cache, value_cache, block_tables, seq_lens,
                       partition_size: int) -> None:
    if q.dim() != 3 or out.shape != q.shape or out.dtype != q.dtype:
        raise ValueError(f"q and out must be [num_seqs, num_heads, head_size] of one dtype, got "
                         f"{tuple(q.shape)} {q.dtype} and {tuple(out.shape)} {out.dtype}")
    num_seqs, num_heads, head_size = q.shape
    if key_cache.dim() != 4 or key_cache.shape != value_cache.shape or \
            key_cache.shape[3] != head_size or num_heads % key_cache.shape[2] != 0:
        raise ValueError(f"caches {tuple(key_cache.shape)} must be [num_blocks, block_size, "
                         f"num_kv_heads, {head_size}] with num_heads % num_kv_heads == 0")
    if head_size % 16 != 0 or head_size > 256:
        raise ValueError(f"head_size must be a multiple of 16 up to 256, got {head_size}")
    if key_cache.dtype != value_cache.dtype or key_cache.dtype not in (q.dtype, FP8_KV_DTYPE):
        raise ValueError(f"caches ({key_cache.dtype}, {value_cache.dtype}) must both be q's "
                         f"dtype {q.dtype} or {FP8_KV_DTYPE}")
    for name, t in (("q", q), ("out", out), ("key_cache", key_cache),
                    ("value_cache", value_cache), ("block_tables", block_tables)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}")
    if block_tables.shape[0] < num_seqs or seq_lens.shape[0] < num_seqs:
        raise ValueError("block_tables and seq_lens need a row per sequence")
    if not tmp_out.is_contiguous() or tmp_out.shape[0] < num_seqs or \
            tmp_out.shape[1] != num_heads or tmp_out.shape[3] != head_size:
        raise ValueError(f"workspace {tuple(tmp_out.shape)} does not fit q {tuple(q.shape)}")


def num_partitions_to_launch(max_partitions: int, block_tables: torch.Tensor, block_size: int,
                             partition_size: int) -> int:
    """Partitions a call launches: the most a block-table row can address, within the workspace."""
    max_context = block_tables.shape[1] * block_size
    return max(1, min(max_partitions, -(-max_context // partition_size)))


class DecodeConfig(NamedTuple):
    """Launch parameters of ``_paged_attention_kernel``."""

    block_n: int  # tokens per inner step (divides the partition size)
    num_warps: int
    num_stages: int
    # ptxas register cap a thread (0: the compiler's choice): more programs an SM
    max_regs: int = 0
    # the kernel's partition is this many of the workspace's (fewer, longer programs; the
    # workspace, sized for its own partition count, has room for the fewer partials)
    partition_scale: int = 1


def decode_config(head_size: int, dtype: torch.dtype, partition_size: int,
                  device: torch.device, kv_fp8: bool = False) -> DecodeConfig:
    """Heuristic launch config, then the ``configs/paged_attention.json`` entry for this GPU
    (bucket ``d<D>_<dtype>``, with ``_kvfp8`` appended for an FP8 cache)."""
    if device.type != "cuda":
        return DecodeConfig(min(16, partition_size), 4, 1)
    # K and V tiles of 64 tokens x 128 x 2 B = 16 KB each; 3 stages keep ~96 KB of loads in
    # flight per program, enough to cover HBM latency at 2 programs per SM (H100: 228 KB smem).
    cfg = DecodeConfig(64 if head_size <= 128 else 32, 4, 3)
    if kv_fp8 and head_size <= 128:
        # 1-byte tiles: 2 warps (fewer barriers a tile, more programs an SM), 2 tiles in
        # flight (5 stages: the block-table load takes a level), 4x the workspace's partition
        # (per-program start-up is what limits short programs). H200, b64 x 4096, 8B shape:
        # 172 us against 292 for the bf16 cache (0.59x); n64 w4 s3 x1: 260 us; n128 w4 s5 x2:
        # 206 us; n32 w1 s5 x2: 171 us
        cfg = DecodeConfig(64, 2, 5, 0, 4)
    bucket = f"d{next_power_of_2(head_size)}_{str(dtype).removeprefix('torch.')}"
    tuned = triton_utils.tuned_triton_config(
        "paged_attention", bucket + ("_kvfp8" if kv_fp8 else ""), "cuda", device.index or 0)
    if tuned:
        cfg = cfg._replace(**{k: int(v) for k, v in tuned.items() if k in cfg._fields})
    return cfg._replace(block_n=min(cfg.block_n, partition_size * cfg.partition_scale))


if triton_utils.triton_available():
    import triton
    import triton.language as tl

    from fuselm.kernels._pdl import pdl_wait_then_release

    if triton_utils.is_interpreting():
        triton_utils.patch_interpreter_range()

    @triton.jit
    def _e4m3x4_to_f16(x):
        """e4m3 -> fp16, four elements a 32-bit register (two ``cvt.rn.f16x2.e4m3x2``).

        Why not ``x.to(tl.float16)`` for V: Triton moves the PV dot's operand layout (token
        pairs a thread) up through a plain conversion onto the 1-byte shared-memory load, which
        sm_90 can only do byte by byte (64 ``LDS.U8`` + byte packing a thread a 64-token tile:
        905 instructions a warp an iteration, against 751 for bf16). A non-pure asm is a
        barrier to that move: V is read 16 bytes a thread in its row layout, converted, and the
        fp16 tile takes ``ldmatrix.trans`` like a bf16 cache's (486 instructions with the
        constant block size; sm_90 compile, n64 w4 s3)."""
        return tl.inline_asm_elementwise(
            "{ .reg .b16 lo, hi; mov.b32 {lo, hi}, $2; cvt.rn.f16x2.e4m3x2 $0, lo; "
            "cvt.rn.f16x2.e4m3x2 $1, hi; }",
            "=r,=r,r", [x.to(tl.int8, bitcast=True)], dtype=tl.float16, is_pure=False, pack=4)

    @triton.jit
    def _paged_attention_kernel(
        out_ptr, tmp_out_ptr, max_logits_ptr, exp_sums_ptr,
        q_ptr, kc_ptr, vc_ptr, bt_ptr, seq_lens_ptr,
        qk_scale,  # scale * log2(e) (* k_scale for an fp8 cache)
        v_scale,  # fp8 caches: V's scale
        o_seq_stride, o_head_stride, q_seq_stride, q_head_stride,
        kc_block_stride, kc_slot_stride, kc_head_stride,
        vc_block_stride, vc_slot_stride, vc_head_stride,
        bt_stride,
        ws_seq_stride, ws_head_stride,  # of max_logits / exp_sums; tmp_out's are x HEAD_SIZE
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
        HEAD_SIZE: tl.constexpr, D_PAD: tl.constexpr,
        PARTITION_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        # the cache's tokens a block, a constant: pos // BLOCK_SIZE is a shift, not a division
        # (bf16 loop 751 -> 477 instructions a warp; H200 b64 x 4096: 314 -> 292 us)
        BLOCK_SIZE: tl.constexpr,
        USE_PDL: tl.constexpr = False,  # programmatic dependent launch (_pdl.py)
        WINDOW: tl.constexpr = 0,  # sliding window: the last WINDOW tokens; 0: all, no cost
        KV_FP8: tl.constexpr = False,  # fp8 caches, converted to fp16 in registers
        V_CVT_ASM: tl.constexpr = False,  # fp8 V converted by _e4m3x4_to_f16 (sm_89+ GPUs)
    ):  # fmt: skip
        pdl_wait_then_release(USE_PDL)
        seq = tl.program_id(0)
        kv_head = tl.program_id(1)
        part = tl.program_id(2)
        seq_len = tl.load(seq_lens_ptr + seq)
        start = part * PARTITION_SIZE
        if (part > 0) & (start >= seq_len):  # empty partition (partition 0 also zeroes seq_len 0)
            return
        end = tl.minimum(start + PARTITION_SIZE, seq_len)
        num_parts = tl.minimum(tl.cdiv(seq_len, PARTITION_SIZE), tl.num_programs(2))

        g = tl.arange(0, GROUP_PAD)
        g_mask = g < GROUP
        head = kv_head * GROUP + g  # [GROUP_PAD]
        offs_d = tl.arange(0, D_PAD)
        d_mask = offs_d < HEAD_SIZE
        q = tl.load(q_ptr + seq.to(tl.int64) * q_seq_stride + (head * q_head_stride)[:, None]
                    + offs_d[None, :], mask=g_mask[:, None] & d_mask[None, :], other=0.0)

        if KV_FP8 and q.dtype != tl.float32:
            q = q.to(tl.float16)
        m_i = tl.full([GROUP_PAD], -1.0e30, tl.float32)
        l_i = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, D_PAD], tl.float32)
        kc_base = kc_ptr + kv_head * kc_head_stride
        vc_base = vc_ptr + kv_head * vc_head_stride
        bt_row = bt_ptr + seq.to(tl.int64) * bt_stride
        offs_n = tl.arange(0, BLOCK_N)
        if WINDOW > 0:  # from the tile holding the first visible token
            win_lo = seq_len - WINDOW
            lo = start + (tl.maximum(win_lo - start, 0) // BLOCK_N) * BLOCK_N
        else:
            win_lo = 0
            lo = start
        for n0 in range(lo, end, BLOCK_N):
            pos = n0 + offs_n
            n_mask = pos < end
            if WINDOW > 0:
                n_mask = n_mask & (pos >= win_lo)
            blk = tl.load(bt_row + pos // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
            slot = pos % BLOCK_SIZE
            kv_mask = n_mask[:, None] & d_mask[None, :]
            k = tl.load(kc_base + (blk * kc_block_stride + slot * kc_slot_stride)[:, None]
                        + offs_d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(vc_base + (blk * vc_block_stride + slot * vc_slot_stride)[:, None]
                        + offs_d[None, :], mask=kv_mask, other=0.0)
            if KV_FP8:  # e4m3 -> fp16 (q's dtype here) is exact; scales apply outside the tile
                k = k.to(q.dtype)
                v = _e4m3x4_to_f16(v) if V_CVT_ASM else v.to(q.dtype)
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
            qk = tl.where(n_mask[None, :], qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(qk - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None]
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
            m_i = m_new

        if KV_FP8:
            acc = acc * v_scale
        part_out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # seq_len 0: zeros
        io_mask = g_mask[:, None] & d_mask[None, :]
        if num_parts <= 1:
            o_off = seq.to(tl.int64) * o_seq_stride + head * o_head_stride
            tl.store(out_ptr + o_off[:, None] + offs_d[None, :],
                     part_out.to(out_ptr.dtype.element_ty), mask=io_mask)
        else:
            ws_off = seq.to(tl.int64) * ws_seq_stride + head * ws_head_stride + part
            tl.store(max_logits_ptr + ws_off, m_i, mask=g_mask)
            tl.store(exp_sums_ptr + ws_off, l_i, mask=g_mask)
            tl.store(tmp_out_ptr + (ws_off * HEAD_SIZE)[:, None] + offs_d[None, :], part_out,
                     mask=io_mask)

    @triton.jit
    def _paged_attention_reduce_kernel(
        out_ptr, tmp_out_ptr, max_logits_ptr, exp_sums_ptr, seq_lens_ptr,
        o_seq_stride, o_head_stride, ws_seq_stride, ws_head_stride, num_launched,
        PARTITION_SIZE: tl.constexpr, P_PAD: tl.constexpr,
        HEAD_SIZE: tl.constexpr, D_PAD: tl.constexpr,
        USE_PDL: tl.constexpr = False,  # programmatic dependent launch (_pdl.py)
    ):  # fmt: skip
        pdl_wait_then_release(USE_PDL)
        seq = tl.program_id(0)
        head = tl.program_id(1)
        seq_len = tl.load(seq_lens_ptr + seq)
        num_parts = tl.minimum(tl.cdiv(seq_len, PARTITION_SIZE), num_launched)
        if num_parts <= 1:  # written directly by the partition kernel
            return
        offs_p = tl.arange(0, P_PAD)
        p_mask = offs_p < num_parts
        ws_off = seq.to(tl.int64) * ws_seq_stride + head * ws_head_stride + offs_p
        m = tl.load(max_logits_ptr + ws_off, mask=p_mask, other=float("-inf"))
        w = tl.load(exp_sums_ptr + ws_off, mask=p_mask, other=0.0) * tl.exp2(m - tl.max(m, 0))
        offs_d = tl.arange(0, D_PAD)
        d_mask = offs_d < HEAD_SIZE
        parts = tl.load(tmp_out_ptr + (ws_off * HEAD_SIZE)[:, None] + offs_d[None, :],
                        mask=p_mask[:, None] & d_mask[None, :], other=0.0)
        out = tl.sum(parts * w[:, None], axis=0) / tl.sum(w, axis=0)
        o_off = seq.to(tl.int64) * o_seq_stride + head * o_head_stride
        tl.store(out_ptr + o_off + offs_d, out.to(out_ptr.dtype.element_ty), mask=d_mask)


def paged_attention_triton_out(
    out: torch.Tensor, tmp_out: torch.Tensor, max_logits: torch.Tensor, exp_sums: torch.Tensor,
    q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
    block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float, partition_size: int,
    config: DecodeConfig | None = None, sliding_window: int = 0, k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Triton split-KV decode into ``out`` with the given workspace (see the module docstring);
    its partitions are ``partition_size`` (the workspace's) x ``config.partition_scale``."""
    _check_decode_args(out, tmp_out, q, key_cache, value_cache, block_tables, seq_lens,
                       partition_size)
    if sliding_window < 0:
        raise ValueError(f"sliding_window must be >= 0 (0: none), got {sliding_window}")
    num_seqs, num_heads, head_size = q.shape
    if num_seqs == 0:
        return
    num_kv_heads, block_size = key_cache.shape[2], key_cache.shape[1]
    group = num_heads // num_kv_heads
    kv_fp8 = key_cache.dtype == FP8_KV_DTYPE
    k_scale, v_scale = check_kv_scale("k_scale", k_scale), check_kv_scale("v_scale", v_scale)
    cfg = config or decode_config(head_size, q.dtype, partition_size, q.device, kv_fp8)
    partition_size *= cfg.partition_scale
    num_parts = num_partitions_to_launch(tmp_out.shape[2], block_tables, block_size,
                                         partition_size)
    d_pad = max(16, next_power_of_2(head_size))
    _paged_attention_kernel[(num_seqs, num_kv_heads, num_parts)](
        out, tmp_out, max_logits, exp_sums, q, key_cache, value_cache, block_tables, seq_lens,
        scale * _LOG2E * (k_scale if kv_fp8 else 1.0), v_scale,
        out.stride(0), out.stride(1), q.stride(0), q.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        block_tables.stride(0), max_logits.stride(0), max_logits.stride(1),
        GROUP=group, GROUP_PAD=max(16, next_power_of_2(group)), HEAD_SIZE=head_size,
        D_PAD=d_pad, PARTITION_SIZE=partition_size, BLOCK_N=cfg.block_n,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", BLOCK_SIZE=block_size,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, WINDOW=sliding_window,
        KV_FP8=kv_fp8, V_CVT_ASM=kv_fp8 and q.dtype != torch.float32 and _fp8_cvt_asm(q),
        **({"maxnreg": cfg.max_regs} if cfg.max_regs else {}), **_pdl.launch_args(q),
    )  # fmt: skip
    if num_parts > 1:
        _paged_attention_reduce_kernel[(num_seqs, num_heads)](
            out, tmp_out, max_logits, exp_sums, seq_lens, out.stride(0), out.stride(1),
            max_logits.stride(0), max_logits.stride(1), num_parts,
            PARTITION_SIZE=partition_size, P_PAD=next_power_of_2(num_parts),
            HEAD_SIZE=head_size, D_PAD=d_pad, num_warps=4,
            **_pdl.launch_args(q),
        )  # fmt: skip


@cache
def _fp8_cvt_asm_on(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) >= (8, 9)


def _fp8_cvt_asm(t: torch.Tensor) -> bool:
    """Whether ``t``'s GPU converts e4m3 with ``cvt.rn.f16x2.e4m3x2`` (sm_89+; not under the
    interpreter, which runs no PTX)."""
    return t.is_cuda and not triton_utils.is_interpreting() and _fp8_cvt_asm_on(
        t.device.index if t.device.index is not None else torch.cuda.current_device())


def _allocate_workspace(q, key_cache, block_tables, partition_size=None):
    max_context = block_tables.shape[1] * key_cache.shape[1]
    partition_size = partition_size or partition_size_for(max_context)
    num_parts = max(1, -(-max_context // partition_size))
    shape = (q.shape[0], q.shape[1], num_parts)
    tmp_out = torch.empty((*shape, q.shape[2]), dtype=torch.float32, device=q.device)
    max_logits = torch.empty(shape, dtype=torch.float32, device=q.device)
    return tmp_out, max_logits, torch.empty_like(max_logits), partition_size


def paged_attention_triton(q, key_cache, value_cache, block_tables, seq_lens, scale,
                           sliding_window: int = 0, partition_size: int | None = None,
                           config: DecodeConfig | None = None, k_scale: float = 1.0,
                           v_scale: float = 1.0) -> torch.Tensor:
    """Triton decode with the reference's signature; allocates its own workspace, sized by the
    block-table width (the serving path uses ``PagedAttentionWorkspace`` instead)."""
    out = torch.empty_like(q)
    tmp_out, max_logits, exp_sums, psize = _allocate_workspace(q, key_cache, block_tables,
                                                                partition_size)
    paged_attention_triton_out(out, tmp_out, max_logits, exp_sums, q, key_cache, value_cache,
                               block_tables, seq_lens, scale, psize, config, sliding_window,
                               k_scale, v_scale)
    return out


# --------------------------------------------------------------------------------------------
# Registration. fuselm::paged_attention (allocating, the reference's signature) and
# fuselm::paged_attention_out (workspace, in place) wrap the Triton launchers.
# --------------------------------------------------------------------------------------------

FUSELM_LIB.define(
    "paged_attention(Tensor q, Tensor key_cache, Tensor value_cache, Tensor block_tables, "
    "Tensor seq_lens, float scale, int sliding_window=0, float k_scale=1.0, "
    "float v_scale=1.0) -> Tensor"
)
FUSELM_LIB.define(
    "paged_attention_out(Tensor(a!) out, Tensor(b!) tmp_out, Tensor(c!) max_logits, "
    "Tensor(d!) exp_sums, Tensor q, Tensor key_cache, Tensor value_cache, Tensor block_tables, "
    "Tensor seq_lens, float scale, int partition_size, int sliding_window=0, "
    "float k_scale=1.0, float v_scale=1.0) -> ()"
)


@torch.library.register_fake("fuselm::paged_attention", lib=FUSELM_LIB)
def _paged_attention_fake(q, key_cache, value_cache, block_tables, seq_lens, scale,
                          sliding_window=0, k_scale=1.0, v_scale=1.0):
    return torch.empty_like(q)


@torch.library.register_fake("fuselm::paged_attention_out", lib=FUSELM_LIB)
def _paged_attention_out_fake(out, tmp_out, max_logits, exp_sums, q, key_cache, value_cache,
                              block_tables, seq_lens, scale, partition_size,
                              sliding_window=0, k_scale=1.0, v_scale=1.0) -> None:
    return None


def _paged_attention_op(q, key_cache, value_cache, block_tables, seq_lens, scale,
                        sliding_window=0, k_scale=1.0, v_scale=1.0):
    return paged_attention_triton(q, key_cache, value_cache, block_tables, seq_lens, scale,
                                  sliding_window, k_scale=k_scale, v_scale=v_scale)


def _paged_attention_out_op(out, tmp_out, max_logits, exp_sums, q, key_cache, value_cache,
                            block_tables, seq_lens, scale, partition_size,
                            sliding_window=0, k_scale=1.0, v_scale=1.0) -> None:
    paged_attention_triton_out(out, tmp_out, max_logits, exp_sums, q, key_cache, value_cache,
                               block_tables, seq_lens, scale, partition_size,
                               sliding_window=sliding_window, k_scale=k_scale, v_scale=v_scale)


if triton_utils.triton_available():
    for _key in triton_utils.triton_dispatch_keys():
        FUSELM_LIB.impl("paged_attention", _paged_attention_op, _key)
        FUSELM_LIB.impl("paged_attention_out", _paged_attention_out_op, _key)

