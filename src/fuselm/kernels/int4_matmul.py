"""Weight-only INT4 matmul (W4A16, group-wise asymmetric): ``out = x @ W.T`` with
``W[n, k] = (q[n, k] - zeros[n, k // G]) * scales[n, k // G]``.

Canonical layout (QUANT_SPEC.md), read as is by every backend (no repacking): qweight uint8
``[N, K // 2]``, byte j of row n holds column 2j in its low nibble and column 2j + 1 in its high
nibble; scales float ``[N, K // G]`` (upcast to fp32); zeros uint8 ``[N, K // G]`` (0..15;
symmetric formats use 8). G = group_size, an even divisor of K. x ``[M, K]`` (fp16/bf16/fp32,
last dim contiguous); out ``[M, N]`` in x's dtype, accumulated in fp32.

The Triton kernels read the bytes as int32 words (word w = columns 8w..8w+7, nibble i =
column 8w + i) and make floats of nibbles without int-to-float conversions (1/8 of the FMA rate
on Hopper): a shift and a LOP3 put a nibble into the mantissa of a float constant.
- ``gemv`` (batch 1): fp32 FMAs on ``f = 1 + q/16`` (bits 19..22 of 1.0f); per group
  ``sum W x = 16 s (sum f x - (1 + z/16) sum x)``. A thread's x values serve all its rows.
- ``gemm``: the tensor-core kernel of ``_quant_gemm_triton.py``: a K step's words become
  ``(q - z) * s`` in x's dtype in registers (PTX: LOP3 puts nibble pairs into the mantissas of
  bf16 128 / fp16 1024, PRMT regroups them, then a packed sub and mul), one ``tl.dot`` chain in
  fp32 over K; a K step lies within one group; config mode bit 0 puts the batch on the MMA's
  M side (else swap-AB: the weight rows are M); ``split_k`` > 1 gives each output tile that
  many programs, each a run of K steps (fp32 partials, then summed in order).
- ``dequant``: the weight dequantized to x's dtype (one kernel), then cuBLAS.
- ``cuda_gemv`` (M <= 16, fp16/bf16 x, G % 128 == 0): the CUDA tensor-core GEMV of
  ``quant_gemv.py``; inputs it does not take run the Triton ``default_config``.
Variant and config per call from M: ``configs/int4_matmul.json`` (bucket
``n{N}_k{K}_g{G}_m{1|4|16|64|256}``, by ``python -m fuselm.bench.kernels_quant``), else
``default_config`` (M 5..8 take the ``m4`` entry when it is ``cuda_gemv``); G not a multiple
of 8 (gemv) / 16 (gemm) runs ``dequant``.

Backends: ``int4_matmul_ref`` (float32 spec), ``int4_matmul_triton`` (``fuselm::int4_matmul``).
"""

from __future__ import annotations

import torch

from fuselm.kernels import _pdl, quant_gemv, triton_utils
from fuselm.kernels.int8_matmul import (
    QuantMatmulConfig,
    as_words,
    gemm_default,
    m_bucket,
    pow2_divisor,
    small_m_cuda,
    tuned,
)
from fuselm.kernels.triton_utils import FUSELM_LIB


def _check(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
           group_size: int) -> None:
    if x.dim() != 2 or qweight.dim() != 2 or x.shape[1] != 2 * qweight.shape[1]:
        raise ValueError(f"int4_matmul needs x [M, K] and qweight [N, K // 2], got "
                         f"{tuple(x.shape)} and {tuple(qweight.shape)}")
    if qweight.dtype != torch.uint8:
        raise ValueError(f"int4_matmul qweight must be uint8 (two nibbles a byte), got "
                         f"{qweight.dtype}")
    n, k = qweight.shape[0], x.shape[1]
    if group_size <= 0 or group_size % 2 or k % group_size:
        raise ValueError(f"int4_matmul group_size must be an even divisor of K={k}, got "
                         f"{group_size}")
    groups = (n, k // group_size)
    if scales.shape != groups or not scales.is_floating_point():
        raise ValueError(f"int4_matmul scales must be float {list(groups)}, got {scales.dtype} "
                         f"{tuple(scales.shape)}")
    if zeros.shape != groups or zeros.dtype != torch.uint8:
        raise ValueError(f"int4_matmul zeros must be uint8 {list(groups)}, got {zeros.dtype} "
                         f"{tuple(zeros.shape)}")


def unpack_int4_ref(qweight: torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, K // 2]`` -> the nibbles as uint8 ``[N, K]`` (low nibble first)."""
    return torch.stack((qweight & 0xF, qweight >> 4), dim=-1).reshape(qweight.shape[0], -1)


def int4_dequantize_ref(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                        group_size: int) -> torch.Tensor:
    """The logical weight ``[N, K]`` float32 of the canonical layout."""
    q = unpack_int4_ref(qweight).float()
    s = scales.float().repeat_interleave(group_size, dim=1)
    z = zeros.float().repeat_interleave(group_size, dim=1)
    return (q - z) * s


def int4_matmul_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                    zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """Plain PyTorch W4A16 matmul in float32 (dequantize, then matmul); ``[M, N]`` in x's
    dtype."""
    _check(x, qweight, scales, zeros, group_size)
    w = int4_dequantize_ref(qweight, scales, zeros, group_size)
    return (x.float() @ w.t()).to(x.dtype)


# Launch configs: QuantMatmulConfig and the batch buckets live in int8_matmul.py.


def shape_bucket(n: int, k: int, group_size: int, m: int) -> str:
    """Tuning-table key of an int4 weight shape and batch."""
    return f"n{n}_k{k}_g{group_size}_m{m_bucket(m)}"


def default_config(n: int, k: int, group_size: int, m: int,
                   cuda: bool | None = None) -> QuantMatmulConfig:
    """Heuristic config: ``cuda_gemv`` at M <= 16 (``small_m_cuda``: where the CUDA extension is
    loaded, or as ``cuda`` says); ``gemv`` at M = 1 (8 rows over 2 warps: a thread holds 4 rows
    of the same 32 columns, so its x loads serve 4 rows), else ``gemm``; ``dequant`` where a
    kernel does not cover the group size."""
    if small_m_cuda(m, group_size, quant_gemv.INT4_STEP_COLS, cuda):
        block_n, warps, stages = quant_gemv.default_launch(n, k // quant_gemv.INT4_STEP_COLS, m)
        return QuantMatmulConfig("cuda_gemv", block_n, 0, warps, stages)
    if m == 1 and group_size % 8 == 0:
        return QuantMatmulConfig("gemv", 8, 1024, 2, 1)
    if group_size % 16 == 0:
        return gemm_default(m, pow2_divisor(group_size, 128))
    return QuantMatmulConfig("dequant", 0, 0, 4)


def valid_config(cfg: QuantMatmulConfig, group_size: int) -> bool:
    """Whether ``cfg`` can run this group size (a K step of ``gemm`` lies within one group; a
    word chunk of ``gemv`` too; ``cuda_gemv`` needs G % 128 == 0; ``split_k`` > 1 only for
    ``gemm``)."""
    if cfg.split_k != 1 and (cfg.variant != "gemm" or cfg.split_k < 1):
        return False
    if cfg.variant == "cuda_gemv":
        return (group_size % quant_gemv.INT4_STEP_COLS == 0
                and quant_gemv.valid_launch(cfg.block_n, cfg.num_warps, cfg.num_stages)
                and quant_gemv.available())
    if cfg.variant == "gemv":
        return group_size % 8 == 0 and cfg.block_k >= 8
    if cfg.variant == "gemm":
        return cfg.block_k >= 16 and group_size % cfg.block_k == 0 and cfg.block_m >= 16
    return cfg.variant == "dequant"


def config_for(n: int, k: int, group_size: int, m: int,
               device: torch.device) -> QuantMatmulConfig:
    """The tuned config of this shape and batch bucket, else ``default_config``."""
    cfg = tuned("int4_matmul", shape_bucket(n, k, group_size, m), device)
    # M 5..8 outside a CUDA GEMV of their own bucket take bucket m4's (it serves up to 8 rows)
    if 4 < m <= quant_gemv.STRIDED_MAX_M and (cfg is None or cfg.variant != "cuda_gemv"):
        small = tuned("int4_matmul", shape_bucket(n, k, group_size, 4), device)
        cfg = small if small is not None and small.variant == "cuda_gemv" else cfg
    if cfg is not None and valid_config(cfg, group_size):
        return cfg
    return default_config(n, k, group_size, m)


# --------------------------------------------------------------------------------------------
# Triton kernels.
# --------------------------------------------------------------------------------------------

if triton_utils.triton_available():
    import triton
    import triton.language as tl

    from fuselm.kernels._pdl import pdl_wait_then_release

    if triton_utils.is_interpreting():
        triton_utils.patch_interpreter_range()  # the K loops have runtime bounds

    @triton.jit
    def _nibble_fma_value(words, NIB: tl.constexpr):
        """Nibble NIB (bits 4 NIB .. 4 NIB + 3) of int32 words as ``1 + q / 16`` (bits 19..22
        of 1.0f)."""
        if NIB <= 4:
            t = words << (19 - 4 * NIB)
        else:
            t = words >> (4 * NIB - 19)  # arithmetic shift: the sign bits are masked off
        return ((t & 0x00780000) | 0x3F800000).to(tl.float32, bitcast=True)

    @triton.jit
    def _int4_gemv_weights(qw_rows, s_rows, z_rows, rmask, w0, wofs, chunk, KW,
                           GROUP_WORDS: tl.constexpr, CW: tl.constexpr, EVEN: tl.constexpr):
        """The words ``[BLOCK_N, CHUNKS, CW]`` of one K step and their chunks' ``16 s`` and
        ``1 + z / 16`` (``[BLOCK_N, CHUNKS, 1]``); weights only (safe before the PDL wait)."""
        w = w0 + wofs  # [CHUNKS, CW] word indices
        grp = (w0 + chunk * CW) // GROUP_WORDS  # [CHUNKS]
        if EVEN:
            words = tl.load(qw_rows + w[None, :, :], eviction_policy="evict_first")
            s = tl.load(s_rows + grp[None, :])
            z = tl.load(z_rows + grp[None, :])
        else:
            gmask = rmask[:, None] & (grp < tl.cdiv(KW, GROUP_WORDS))[None, :]
            words = tl.load(qw_rows + w[None, :, :],
                            mask=rmask[:, None, None] & (w < KW)[None, :, :], other=0,
                            eviction_policy="evict_first")
            s = tl.load(s_rows + grp[None, :], mask=gmask, other=0.0)
            z = tl.load(z_rows + grp[None, :], mask=gmask, other=0)
        s16 = (s.to(tl.float32) * 16.0)[:, :, None]
        zoff = (1.0 + z.to(tl.float32) * 0.0625)[:, :, None]
        return words, s16, zoff

    @triton.jit
    def _planes8(x3):
        """``[A, B, 8]`` -> its 8 planes ``[A, B]`` (plane i = ``x3[..., i]``) by splits of
        in-register pairs (no data movement)."""
        a: tl.constexpr = x3.shape[0]
        b: tl.constexpr = x3.shape[1]
        ev, od = tl.split(tl.reshape(x3, (a, b, 4, 2)))  # x[2j], x[2j + 1]
        e0, e1 = tl.split(tl.reshape(ev, (a, b, 2, 2)))  # x[4t], x[4t + 2]
        o0, o1 = tl.split(tl.reshape(od, (a, b, 2, 2)))  # x[4t + 1], x[4t + 3]
        p0, p4 = tl.split(e0)
        p2, p6 = tl.split(e1)
        p1, p5 = tl.split(o0)
        p3, p7 = tl.split(o1)
        return p0, p1, p2, p3, p4, p5, p6, p7

    @triton.jit
    def _int4_gemv_step(words, s16, zoff, x_row, w, KW, EVEN_K: tl.constexpr,
                        XVEC: tl.constexpr):
        """One K step's ``sum W x`` per word slot ``[BLOCK_N, CHUNKS, CW]`` (w: the step's
        word indices ``[CHUNKS, CW]``). XVEC: a word's 8 x values are one 16-byte load."""
        if XVEC:
            cols = (w * 8)[:, :, None] + tl.arange(0, 8)[None, None, :]
            if EVEN_K:
                x3 = tl.load(x_row + cols).to(tl.float32)
            else:
                x3 = tl.load(x_row + cols, mask=(w < KW)[:, :, None], other=0.0).to(tl.float32)
            p0, p1, p2, p3, p4, p5, p6, p7 = _planes8(x3)
            dot = _nibble_fma_value(words, 0) * p0[None, :, :]
            dot += _nibble_fma_value(words, 1) * p1[None, :, :]
            dot += _nibble_fma_value(words, 2) * p2[None, :, :]
            dot += _nibble_fma_value(words, 3) * p3[None, :, :]
            dot += _nibble_fma_value(words, 4) * p4[None, :, :]
            dot += _nibble_fma_value(words, 5) * p5[None, :, :]
            dot += _nibble_fma_value(words, 6) * p6[None, :, :]
            dot += _nibble_fma_value(words, 7) * p7[None, :, :]
            xsum = ((p0 + p1) + (p2 + p3)) + ((p4 + p5) + (p6 + p7))
        else:
            dot = tl.zeros(words.shape, dtype=tl.float32)
            xsum = tl.zeros(w.shape, dtype=tl.float32)
            for i in tl.static_range(8):
                if EVEN_K:
                    xi = tl.load(x_row + w * 8 + i).to(tl.float32)
                else:
                    xi = tl.load(x_row + w * 8 + i, mask=w < KW, other=0.0).to(tl.float32)
                dot += _nibble_fma_value(words, i) * xi[None, :, :]
                xsum += xi
        return s16 * (dot - zoff * xsum[None, :, :])

    @triton.jit
    def _int4_gemv_kernel(
        x_ptr,  # [M, K], rows x_stride apart
        qw_ptr,  # int32 [N, K // 8] (the uint8 [N, K // 2] weight as words), rows qw_stride
        s_ptr,  # [N, K // G], rows s_stride apart
        z_ptr,  # uint8 [N, K // G], rows z_stride apart
        out_ptr,  # [M, N], rows out_stride apart
        N,
        KW,  # K // 8
        x_stride,
        qw_stride,
        s_stride,
        z_stride,
        out_stride,
        GROUP_WORDS: tl.constexpr,  # G // 8
        BLOCK_N: tl.constexpr,
        CHUNKS: tl.constexpr,  # word chunks an iteration: CHUNKS * CW words
        CW: tl.constexpr,  # words a chunk (a power of 2 dividing GROUP_WORDS): one scale each
        EVEN_N: tl.constexpr,
        EVEN_K: tl.constexpr,
        EVEN: tl.constexpr,  # EVEN_N and EVEN_K: no masks at all
        NUM_STAGES: tl.constexpr,
        PREFETCH: tl.constexpr,  # load the first weight step before waiting for x (PDL)
        USE_PDL: tl.constexpr,
        XVEC: tl.constexpr = False,  # config mode bit 0
        NEXT: tl.constexpr = False,  # config mode bit 1
    ):
        m = tl.program_id(1).to(tl.int64)
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < N
        rows64 = rows.to(tl.int64)
        chunk = tl.arange(0, CHUNKS)
        wofs = chunk[:, None] * CW + tl.arange(0, CW)[None, :]  # [CHUNKS, CW]
        qw_rows = qw_ptr + rows64[:, None, None] * qw_stride  # [BLOCK_N, 1, 1]
        s_rows = s_ptr + rows64[:, None] * s_stride
        z_rows = z_ptr + rows64[:, None] * z_stride
        x_row = x_ptr + m * x_stride
        step: tl.constexpr = CHUNKS * CW
        if NEXT:
            # register double buffering: the next step's weights are in flight during this
            # step's math (the step past the end loads nothing: masked)
            words, s16, zoff = _int4_gemv_weights(qw_rows, s_rows, z_rows, rmask, 0, wofs,
                                                  chunk, KW, GROUP_WORDS, CW, EVEN)
            pdl_wait_then_release(USE_PDL)
            acc = tl.zeros([BLOCK_N, CHUNKS, CW], dtype=tl.float32)
            for w0 in tl.range(0, KW, step):
                n_words, n_s16, n_zoff = _int4_gemv_weights(
                    qw_rows, s_rows, z_rows, rmask, w0 + step, wofs, chunk, KW, GROUP_WORDS, CW,
                    False)
                acc += _int4_gemv_step(words, s16, zoff, x_row, w0 + wofs, KW, EVEN_K, XVEC)
                words, s16, zoff = n_words, n_s16, n_zoff
        else:
            if PREFETCH:
                # the weights do not depend on the previous kernel: with PDL the first step
                # streams while that kernel finishes
                words, s16, zoff = _int4_gemv_weights(qw_rows, s_rows, z_rows, rmask, 0, wofs,
                                                      chunk, KW, GROUP_WORDS, CW, EVEN)
                pdl_wait_then_release(USE_PDL)
                acc = _int4_gemv_step(words, s16, zoff, x_row, wofs, KW, EVEN_K, XVEC)
                start = step
            else:
                pdl_wait_then_release(USE_PDL)
                acc = tl.zeros([BLOCK_N, CHUNKS, CW], dtype=tl.float32)
                start = 0
            for w0 in tl.range(start, KW, step, num_stages=NUM_STAGES):
                words, s16, zoff = _int4_gemv_weights(qw_rows, s_rows, z_rows, rmask, w0, wofs,
                                                      chunk, KW, GROUP_WORDS, CW, EVEN)
                acc += _int4_gemv_step(words, s16, zoff, x_row, w0 + wofs, KW, EVEN_K, XVEC)
        y = tl.sum(tl.sum(acc, axis=2), axis=1)
        dst = out_ptr + m * out_stride + rows
        if EVEN_N:
            tl.store(dst, y.to(out_ptr.dtype.element_ty))
        else:
            tl.store(dst, y.to(out_ptr.dtype.element_ty), mask=rmask)

    @triton.jit
    def _nibble_values(words):
        """int32 words ``[R, W]`` -> their 8 nibbles ``[R, W * 8]`` (column order) as exact
        fp32 (the nibble in the mantissa of 2^23, minus 2^23)."""
        shifts = tl.arange(0, 8) * 4
        nib = (words[:, :, None] >> shifts[None, None, :]) & 0xF
        v = (nib | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
        return tl.reshape(v, (words.shape[0], words.shape[1] * 8))

    @triton.jit
    def _int4_dequant_kernel(
        qw_ptr,  # int32 [N, K // 8], rows qw_stride apart
        s_ptr,
        z_ptr,
        out_ptr,  # [N, K] contiguous
        N,
        KW,
        qw_stride,
        s_stride,
        z_stride,
        GROUP_WORDS: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_KW: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rows64 = rows.to(tl.int64)
        w = tl.program_id(1) * BLOCK_KW + tl.arange(0, BLOCK_KW)
        mask = (rows < N)[:, None] & (w < KW)[None, :]
        words = tl.load(qw_ptr + rows64[:, None] * qw_stride + w[None, :], mask=mask, other=0)
        g = w // GROUP_WORDS
        s = tl.load(s_ptr + rows64[:, None] * s_stride + g[None, :], mask=mask, other=0.0)
        z = tl.load(z_ptr + rows64[:, None] * z_stride + g[None, :], mask=mask, other=0)
        q = _nibble_values(words)  # exact q, [BLOCK_N, BLOCK_KW * 8]
        q = tl.reshape(q, (BLOCK_N, BLOCK_KW, 8))
        v = (q - z.to(tl.float32)[:, :, None]) * s.to(tl.float32)[:, :, None]
        cols = w[:, None] * 8 + tl.arange(0, 8)[None, :]  # [BLOCK_KW, 8]
        dst = out_ptr + rows64[:, None, None] * (KW * 8) + cols[None, :, :]
        tl.store(dst, v.to(out_ptr.dtype.element_ty), mask=mask[:, :, None])


_X_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def dequantize_int4_triton(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                           group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """The logical weight ``[N, K]`` in ``dtype`` (one Triton kernel; group_size % 8 == 0,
    else the reference)."""
    n, k = qweight.shape[0], 2 * qweight.shape[1]
    if group_size % 8:
        return int4_dequantize_ref(qweight, scales, zeros, group_size).to(dtype)
    out = torch.empty(n, k, dtype=dtype, device=qweight.device)
    words = as_words(qweight, "int4_matmul")
    grid = (triton.cdiv(n, 16), triton.cdiv(k // 8, 64))
    _int4_dequant_kernel[grid](words, scales, zeros, out, n, k // 8, words.stride(0),
                               scales.stride(0), zeros.stride(0), GROUP_WORDS=group_size // 8,
                               BLOCK_N=16, BLOCK_KW=64, num_warps=4)
    return out


def launch_int4_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                       zeros: torch.Tensor, group_size: int, out: torch.Tensor,
                       cfg: QuantMatmulConfig, prefetch: bool | None = None) -> None:
    """Runs ``cfg``'s variant into ``out [M, N]`` with explicit meta-parameters (the bench
    sweeps them). ``prefetch`` (gemv; default: with PDL) loads the first weight step before
    waiting for the previous kernel. ValueError where ``cfg`` cannot run this group size."""
    m, k = x.shape
    n = qweight.shape[0]
    if m == 0 or n == 0:
        return
    if not valid_config(cfg, group_size):
        raise ValueError(f"int4_matmul config {cfg.label} cannot run group_size {group_size}")
    pdl = _pdl.use_pdl(x)
    if cfg.variant == "cuda_gemv":
        if quant_gemv.launch_int4_gemv(x, qweight, scales, zeros, group_size, out, cfg.block_n,
                                       cfg.num_warps, cfg.num_stages, pdl):
            return
        cfg = default_config(n, k, group_size, m, cuda=False)  # fp32 x, M > 8, unaligned rows
    if cfg.variant == "dequant":
        w = dequantize_int4_triton(qweight, scales, zeros, group_size, x.dtype)
        torch.mm(x, w.t(), out=out)
        return
    if scales.stride(1) != 1 or zeros.stride(1) != 1:
        raise ValueError("int4_matmul scales and zeros must be contiguous in their last dim")
    words = as_words(qweight, "int4_matmul")
    kw, gw = k // 8, group_size // 8
    common = (words.stride(0), scales.stride(0), zeros.stride(0), out.stride(0))
    if cfg.variant == "gemv":
        cw = pow2_divisor(gw, min(16, cfg.block_k // 8))
        chunks = max(1, cfg.block_k // 8 // cw)
        grid = (triton.cdiv(n, cfg.block_n), m)
        _int4_gemv_kernel[grid](
            x, words, scales, zeros, out, n, kw, x.stride(0), *common, GROUP_WORDS=gw,
            BLOCK_N=cfg.block_n, CHUNKS=chunks, CW=cw, EVEN_N=n % cfg.block_n == 0,
            EVEN_K=kw % (chunks * cw) == 0,
            EVEN=n % cfg.block_n == 0 and kw % (chunks * cw) == 0, NUM_STAGES=cfg.num_stages,
            PREFETCH=pdl if prefetch is None else prefetch, USE_PDL=pdl,
            XVEC=bool(cfg.mode & 1), NEXT=bool(cfg.mode & 2), num_warps=cfg.num_warps,
            launch_pdl=pdl)
        return
    from fuselm.kernels._quant_gemm_triton import int4_gemm

    int4_gemm(x, words, scales, zeros, group_size, out, cfg)


def int4_matmul_triton(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                       zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """Triton W4A16 matmul; same contract as ``int4_matmul_ref``. The variant and config come
    from ``config_for`` (tuning table by batch bucket, else the heuristic)."""
    _check(x, qweight, scales, zeros, group_size)
    if x.stride(1) != 1:
        raise ValueError("int4_matmul x must be contiguous in its last dimension")
    if x.dtype not in _X_DTYPES:
        raise ValueError(f"int4_matmul x must be fp32, fp16 or bf16, got {x.dtype}")
    n, k = qweight.shape[0], x.shape[1]
    out = torch.empty((x.shape[0], n), dtype=x.dtype, device=x.device)
    cfg = config_for(n, k, group_size, x.shape[0], x.device)
    launch_int4_matmul(x, qweight, scales, zeros, group_size, out, cfg)
    return out


# --------------------------------------------------------------------------------------------
# Registration (see rms_norm.py).
# --------------------------------------------------------------------------------------------

FUSELM_LIB.define("int4_matmul(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, "
                  "int group_size) -> Tensor")


@torch.library.register_fake("fuselm::int4_matmul", lib=FUSELM_LIB)
def _int4_matmul_fake(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                      zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    return x.new_empty((x.shape[0], qweight.shape[0]))


if triton_utils.triton_available():
    for _key in triton_utils.triton_dispatch_keys():
        FUSELM_LIB.impl("int4_matmul", int4_matmul_triton, _key)

