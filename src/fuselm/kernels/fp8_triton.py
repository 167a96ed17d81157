"""Triton kernels of the FP8 ops (``fp8_matmul.py``, ``rms_norm_quant.py`` hold the contracts,
the references and the torch ops): e4m3 rounding, the weight-streaming GEMV for small M and the
tiled GEMM (per-tensor / rowwise scales in the epilogue, or 128 x 128 block scales per K step).

Launchers take explicit configs (the benchmark sweeps them; ``fp8_matmul`` picks one from the
heuristics here, then ``configs/fp8_matmul.json``). Import only where Triton is available.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from fuselm.kernels import _pdl
from fuselm.kernels._pdl import pdl_wait_then_release
from fuselm.kernels.triton_utils import is_interpreting, next_power_of_2, patch_interpreter_range

if is_interpreting():
    patch_interpreter_range()  # the K loops run over runtime bounds

FP8_MAX = 448.0
FP8_BLOCK = 128


@triton.jit
def e4m3_round(v):
    """``v`` (float32, already within +-448) rounded to the nearest e4m3 value, ties to even.

    Only the interpreter needs it: its float32 -> fp8 cast (triton 3.6) drops the carry of a
    mantissa that rounds up into the next binade (-1.99 -> -1.0). Adding and subtracting
    1.5 * 2**23 * ulp rounds to a multiple of the e4m3 ulp of v's binade (2**-9 below the
    normal range) in one IEEE add; the exact result then casts exactly.
    """
    bits = v.to(tl.int32, bitcast=True)
    e = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)  # binade, subnormals share 2**-6's ulp
    c = (((e + 147) << 23) | 0x400000).to(tl.float32, bitcast=True)  # 1.5 * 2**(e - 3 + 23)
    return (v + c) - c


@triton.jit
def quantize_fp8(v, scale, INTERPRET: tl.constexpr):
    """``clamp(v / scale, +-448)`` as float8e4nv (float32 v, IEEE division as the reference)."""
    q = tl.math.div_rn(v, scale)
    q = tl.minimum(tl.maximum(q, -448.0), 448.0)
    if INTERPRET:
        q = e4m3_round(q)
    return q.to(tl.float8e4nv)


# --------------------------------------------------------------------------------------------
# GEMV: small M. Each program streams BLOCK_N weight rows once (16-byte loads: 16 fp8 elements
# a thread) and reduces them in registers against one x row; the grid's second axis is M.
# x is fp8 with its scale (W8A8) or a float row (W8A16: no activation quantization).
# --------------------------------------------------------------------------------------------


class GemvConfig(NamedTuple):
    """Launch parameters of ``_fp8_gemv_kernel``."""

    block_n: int
    block_k: int
    num_warps: int
    num_stages: int = 1
    rows_m: int = 1  # x rows a program multiplies with each weight tile it loads
    # > 0: a persistent grid of this many programs an SM, each looping over row blocks with
    # NUM_STAGES tiles in flight (M = 1, K <= block_k); 0: one program a row block
    programs_per_sm: int = 0

    @property
    def label(self) -> str:
        """Stable name used by the sweep and the tuning table."""
        rows = f"_r{self.rows_m}" if self.rows_m > 1 else ""
        pers = f"_p{self.programs_per_sm}" if self.programs_per_sm else ""
        return (f"gemv_n{self.block_n}_k{self.block_k}_w{self.num_warps}_s{self.num_stages}"
                f"{rows}{pers}")


def default_gemv_config(n: int, k: int) -> GemvConfig:
    """~16 KB of fp8 weight in flight a program (8 warps x 16 bytes x up to 4096 columns)."""
    block_k = min(next_power_of_2(k), 4096)
    return GemvConfig(max(1, min(4, 16384 // block_k)), block_k, 8 if block_k >= 4096 else 4)


@triton.jit
def _gemv_w_tile(w_rows, rows, k, N, K, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr):
    if EVEN_K and EVEN_N:
        wv = tl.load(w_rows + k[None, :], eviction_policy="evict_first")
    else:
        wv = tl.load(w_rows + k[None, :], mask=(rows < N)[:, None] & (k < K)[None, :],
                     other=0.0, eviction_policy="evict_first")
    return wv.to(tl.float32)


@triton.jit
def _gemv_x_chunk(x_row, k, K, EVEN_K: tl.constexpr):
    if EVEN_K:
        xv = tl.load(x_row + k)
    else:
        xv = tl.load(x_row + k, mask=k < K, other=0.0)
    return xv.to(tl.float32)


@triton.jit
def _fp8_gemv_kernel(
    x_ptr,  # [M, K] fp8 (X_SCALED) or float, rows x_stride apart
    xs_ptr,  # [M] (X_PER_TOKEN) or [1] float32; unused unless X_SCALED
    w_ptr,  # [N, K] fp8, rows w_stride apart
    ws_ptr,  # [N] (W_PER_CHANNEL) or [1] float32
    b_ptr,  # [N] or a dummy
    out_ptr,  # [M, N], rows out_stride apart
    N, K, x_stride, w_stride, out_stride,
    X_SCALED: tl.constexpr, X_PER_TOKEN: tl.constexpr, W_PER_CHANNEL: tl.constexpr,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, NUM_STAGES: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    m = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * w_stride
    x_row = x_ptr + m * x_stride
    # the first weight tile does not depend on the previous kernel: with PDL it streams while
    # that kernel finishes
    acc = _gemv_w_tile(w_rows, rows, cols, N, K, EVEN_N, EVEN_K)
    pdl_wait_then_release(USE_PDL)
    acc = acc * _gemv_x_chunk(x_row, cols, K, EVEN_K)[None, :]
    for k0 in tl.range(BLOCK_K, K, BLOCK_K, num_stages=NUM_STAGES):
        k = k0 + cols
        acc += _gemv_w_tile(w_rows, rows, k, N, K, EVEN_N, EVEN_K) * _gemv_x_chunk(
            x_row, k, K, EVEN_K)[None, :]
    y = tl.sum(acc, axis=1)
    if W_PER_CHANNEL:
        y *= tl.load(ws_ptr + rows, mask=rows < N, other=0.0)
    else:
        y *= tl.load(ws_ptr)
    if X_SCALED:
        if X_PER_TOKEN:
            y *= tl.load(xs_ptr + m)
        else:
            y *= tl.load(xs_ptr)
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)
    tl.store(out_ptr + m * out_stride + rows, y.to(out_ptr.dtype.element_ty), mask=rows < N)


@triton.jit
def _fp8_gemv_rows_kernel(
    x_ptr, xs_ptr, w_ptr, ws_ptr, b_ptr, out_ptr,  # as _fp8_gemv_kernel
    M, N, K, x_stride, w_stride, out_stride,
    X_SCALED: tl.constexpr, X_PER_TOKEN: tl.constexpr, W_PER_CHANNEL: tl.constexpr,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ROWS_M: tl.constexpr, NUM_STAGES: tl.constexpr, USE_PDL: tl.constexpr,
):
    """``_fp8_gemv_kernel`` for a few rows (2 <= M <= 16): each weight tile is loaded once and
    reduced against ROWS_M x rows, instead of once per row (the grid's second axis)."""
    m0 = tl.program_id(1) * ROWS_M
    mi = tl.arange(0, ROWS_M)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * w_stride
    acc = tl.zeros([ROWS_M, BLOCK_N], dtype=tl.float32)
    pdl_wait_then_release(USE_PDL)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=NUM_STAGES):
        k = k0 + cols
        w = _gemv_w_tile(w_rows, rows, k, N, K, False, False)
        for i in tl.static_range(ROWS_M):
            xv = tl.load(x_ptr + (m0 + i).to(tl.int64) * x_stride + k,
                         mask=(k < K) & (m0 + i < M), other=0.0).to(tl.float32)
            part = tl.sum(w * xv[None, :], axis=1)  # [BLOCK_N]
            acc += tl.where(mi[:, None] == i, part[None, :], 0.0)
    m_rows = m0 + mi
    if W_PER_CHANNEL:
        acc *= tl.load(ws_ptr + rows, mask=rows < N, other=0.0)[None, :]
    else:
        acc *= tl.load(ws_ptr)
    if X_SCALED:
        if X_PER_TOKEN:
            acc *= tl.load(xs_ptr + m_rows, mask=m_rows < M, other=0.0)[:, None]
        else:
            acc *= tl.load(xs_ptr)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)[None, :]
    dst = out_ptr + m_rows.to(tl.int64)[:, None] * out_stride + rows[None, :]
    tl.store(dst, acc.to(out_ptr.dtype.element_ty),
             mask=(m_rows < M)[:, None] & (rows < N)[None, :])


@triton.jit
def _fp8_gemv_persistent_kernel(
    x_ptr, xs_ptr, w_ptr, ws_ptr, b_ptr, out_ptr,  # as _fp8_gemv_kernel, M = 1
    N, K,
    X_SCALED: tl.constexpr, W_PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """M = 1, K <= BLOCK_K: the x row stays in registers and each program streams row blocks
    pid, pid + P, ... with NUM_STAGES weight tiles in flight, so no program waits out a DRAM
    round trip per tile."""
    pdl_wait_then_release(USE_PDL)
    cols = tl.arange(0, BLOCK_K)
    xv = tl.load(x_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
    x_scale = 1.0
    if X_SCALED:
        x_scale = tl.load(xs_ptr)
    w_scale = 1.0
    if not W_PER_CHANNEL:
        w_scale = tl.load(ws_ptr)
    for rb in tl.range(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.num_programs(0),
                       num_stages=NUM_STAGES):
        rows = rb * BLOCK_N + tl.arange(0, BLOCK_N)
        w = _gemv_w_tile(w_ptr + rows.to(tl.int64)[:, None] * K, rows, cols, N, K, False,
                         False)
        y = tl.sum(w * xv[None, :], axis=1) * (x_scale * w_scale)
        if W_PER_CHANNEL:
            y *= tl.load(ws_ptr + rows, mask=rows < N, other=0.0)
        if HAS_BIAS:
            y += tl.load(b_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)
        tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty), mask=rows < N)


@functools.cache
def _num_sms(device_index: int) -> int:
    if not torch.cuda.is_available():
        return 4  # the interpreter: a few programs, each looping
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def launch_gemv(x: torch.Tensor, x_scale: torch.Tensor | None, weight: torch.Tensor,
                weight_scale: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor,
                cfg: GemvConfig) -> None:
    """``out [M, N] = x @ (weight * weight_scale).T (* x_scale) + bias``; scales float32,
    x_scale ``[M]``/``[1]`` (None: x is a float activation), weight_scale ``[N]``/``[1]``."""
    m, k = x.shape
    n = weight.shape[0]
    if m == 0 or n == 0:
        return
    pdl = _pdl.use_pdl(x)
    common = dict(
        X_SCALED=x_scale is not None,
        X_PER_TOKEN=x_scale is not None and x_scale.numel() == m and m > 1,
        W_PER_CHANNEL=weight_scale.numel() == n and n > 1, HAS_BIAS=bias is not None,
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, NUM_STAGES=cfg.num_stages, USE_PDL=pdl,
        num_warps=cfg.num_warps, launch_pdl=pdl)
    args = (x, x_scale if x_scale is not None else weight_scale, weight, weight_scale,
            bias if bias is not None else weight_scale, out)
    if cfg.programs_per_sm and m == 1 and k <= cfg.block_k and weight.stride(0) == k:
        grid = (min(triton.cdiv(n, cfg.block_n),
                    cfg.programs_per_sm * _num_sms(x.device.index or 0)),)
        common.pop("X_PER_TOKEN")
        _fp8_gemv_persistent_kernel[grid](*args, n, k, **common)
        return
    if cfg.rows_m > 1 and m > 1:
        grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(m, cfg.rows_m))
        _fp8_gemv_rows_kernel[grid](*args, m, n, k, x.stride(0), weight.stride(0),
                                    out.stride(0), ROWS_M=cfg.rows_m, **common)
        return
    _fp8_gemv_kernel[(triton.cdiv(n, cfg.block_n), m)](
        *args, n, k, x.stride(0), weight.stride(0), out.stride(0),
        EVEN_N=n % cfg.block_n == 0, EVEN_K=k % cfg.block_k == 0, **common)


# --------------------------------------------------------------------------------------------
# GEMM: [BLOCK_M, BLOCK_N] output tiles, grouped along M for L2 reuse of the weight tiles; fp8
# x fp8 tensor-core dots accumulating in float32. SCALE_MODE 0: per-tensor / rowwise scales
# applied once in the epilogue; 1: block scales (1 x 128 activation groups, 128 x 128 weight
# blocks): each K step's partial product is scaled before it is accumulated (BLOCK_K | 128).
# --------------------------------------------------------------------------------------------


class GemmConfig(NamedTuple):
    """Launch parameters of the GEMM kernels; ``tma``: operand tiles through TMA descriptors
    (``_fp8_gemm_tma_kernel``, K a multiple of 16) instead of pointer loads."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int
    tma: int = 0

    @property
    def label(self) -> str:
        """Stable name used by the sweep and the tuning table."""
        return (f"gemm{'_tma' if self.tma else ''}_m{self.block_m}_n{self.block_n}"
                f"_k{self.block_k}_g{self.group_m}_w{self.num_warps}_s{self.num_stages}")


def default_gemm_config(m: int, n: int, k: int, block_scaled: bool) -> GemmConfig:
    """Tile heuristic by M (the tuning table overrides it per shape and M bucket)."""
    bk = 128
    if is_interpreting():  # small tiles: the interpreter's cost grows with the tile
        return GemmConfig(16, 32, 32, 1, 4, 1)
    if m <= 16:
        return GemmConfig(16, 64, bk, 1, 4, 4)
    if m <= 64:
        return GemmConfig(64, 64, bk, 1, 4, 4)
    if m <= 256 or block_scaled:
        return GemmConfig(64, 128, bk, 8, 4, 4)
    return GemmConfig(128, 256, bk, 8, 8, 3)


@triton.jit
def _tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's (pid_m, pid_n): GROUP_M row tiles sweep the N tiles together, so their
    weight tiles are read once from HBM."""
    pid = tl.program_id(0)
    num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % size_m
    pid_n = (pid % (GROUP_M * num_n)) // size_m
    return pid_m, pid_n


@triton.jit
def _block_scales(xs_ptr, ws_ptr, rm_l, rn_l, k0, xs_stride, ws_stride):
    """[BLOCK_M, BLOCK_N] product of the activation-group and weight-block scales at k0."""
    kb = k0 // 128
    sa = tl.load(xs_ptr + rm_l * xs_stride + kb)
    sb = tl.load(ws_ptr + (rn_l // 128) * ws_stride + kb)
    return sa[:, None] * sb[None, :]


@triton.jit
def _epilogue(acc, xs_ptr, ws_ptr, b_ptr, out_ptr, rm, rn, rm_l, rn_l, M, N, out_stride,
              SCALE_MODE: tl.constexpr, X_PER_TOKEN: tl.constexpr, W_PER_CHANNEL: tl.constexpr,
              HAS_BIAS: tl.constexpr):
    if SCALE_MODE == 0:
        if X_PER_TOKEN:
            acc *= tl.load(xs_ptr + rm_l)[:, None]
        else:
            acc *= tl.load(xs_ptr)
        if W_PER_CHANNEL:
            acc *= tl.load(ws_ptr + rn_l)[None, :]
        else:
            acc *= tl.load(ws_ptr)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn_l).to(tl.float32)[None, :]
    dst = out_ptr + rm.to(tl.int64)[:, None] * out_stride + rn[None, :]
    tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=(rm < M)[:, None] & (rn < N)[None, :])


@triton.jit
def _fp8_gemm_kernel(
    x_ptr, xs_ptr, w_ptr, ws_ptr, b_ptr, out_ptr,
    M, N, K, x_stride, w_stride, out_stride,
    xs_stride,  # row stride of the block x_scale [M, KB] (SCALE_MODE 1)
    ws_stride,  # row stride of the block weight_scale [NB, KB] (SCALE_MODE 1)
    SCALE_MODE: tl.constexpr, X_PER_TOKEN: tl.constexpr, W_PER_CHANNEL: tl.constexpr,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, EVEN_K: tl.constexpr,
):
    pid_m, pid_n = _tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    # rows past M / N load row 0 instead of masking (their results are never stored)
    rm_l = tl.where(rm < M, rm, 0).to(tl.int64)
    rn_l = tl.where(rn < N, rn, 0).to(tl.int64)
    a_ptrs = x_ptr + rm_l[:, None] * x_stride + rk[None, :]  # [BLOCK_M, BLOCK_K]
    b_ptrs = w_ptr + rn_l[None, :] * w_stride + rk[:, None]  # [BLOCK_K, BLOCK_N], K-major
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            a = tl.load(a_ptrs, mask=(k0 + rk)[None, :] < K, other=0.0)
            b = tl.load(b_ptrs, mask=(k0 + rk)[:, None] < K, other=0.0)
        if SCALE_MODE == 1:
            acc += tl.dot(a, b) * _block_scales(xs_ptr, ws_ptr, rm_l, rn_l, k0, xs_stride,
                                                ws_stride)
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    _epilogue(acc, xs_ptr, ws_ptr, b_ptr, out_ptr, rm, rn, rm_l, rn_l, M, N, out_stride,
              SCALE_MODE, X_PER_TOKEN, W_PER_CHANNEL, HAS_BIAS)


@triton.jit
def _fp8_gemm_tma_kernel(
    x_desc, xs_ptr, w_desc, ws_ptr, b_ptr, out_ptr,  # descriptors of x [M, K], w [N, K]
    M, N, K, out_stride, xs_stride, ws_stride,
    SCALE_MODE: tl.constexpr, X_PER_TOKEN: tl.constexpr, W_PER_CHANNEL: tl.constexpr,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """``_fp8_gemm_kernel`` with TMA tile loads (out-of-bounds rows and K columns read as
    zeros), which frees the warps from address math and lets the copies run ahead."""
    pid_m, pid_n = _tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    off_m, off_n = pid_m * BLOCK_M, pid_n * BLOCK_N
    rm = off_m + tl.arange(0, BLOCK_M)
    rn = off_n + tl.arange(0, BLOCK_N)
    rm_l = tl.where(rm < M, rm, 0).to(tl.int64)
    rn_l = tl.where(rn < N, rn, 0).to(tl.int64)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = x_desc.load([off_m, k0])
        b = w_desc.load([off_n, k0])
        if SCALE_MODE == 1:
            acc += tl.dot(a, b.T) * _block_scales(xs_ptr, ws_ptr, rm_l, rn_l, k0, xs_stride,
                                                  ws_stride)
        else:
            acc = tl.dot(a, b.T, acc)
    _epilogue(acc, xs_ptr, ws_ptr, b_ptr, out_ptr, rm, rn, rm_l, rn_l, M, N, out_stride,
              SCALE_MODE, X_PER_TOKEN, W_PER_CHANNEL, HAS_BIAS)


def launch_gemm(x_fp8: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor,
                weight_scale: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor,
                cfg: GemmConfig, block_scaled: bool = False) -> None:
    """``out [M, N]`` of the scaled product. Scales float32: rowwise x_scale ``[M]``/``[1]``,
    weight_scale ``[N]``/``[1]``; ``block_scaled``: x_scale ``[M, KB]``, weight_scale
    ``[NB, KB]`` with row strides (cfg.block_k must divide 128)."""
    m, k = x_fp8.shape
    n = weight.shape[0]
    if m == 0 or n == 0:
        return
    if block_scaled and FP8_BLOCK % cfg.block_k:
        raise ValueError(f"block-scaled GEMM needs block_k dividing 128, got {cfg.block_k}")
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n),)
    modes = dict(
        SCALE_MODE=1 if block_scaled else 0, X_PER_TOKEN=x_scale.numel() == m and m > 1,
        W_PER_CHANNEL=weight_scale.numel() == n and n > 1, HAS_BIAS=bias is not None,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    bias_arg = bias if bias is not None else weight_scale
    strides = (x_scale.stride(0) if block_scaled else 0,
               weight_scale.stride(0) if block_scaled else 0)
    if cfg.tma and _tma_ok(x_fp8, weight):
        from triton.tools.tensor_descriptor import TensorDescriptor

        x_desc = TensorDescriptor.from_tensor(x_fp8, [cfg.block_m, cfg.block_k])
        w_desc = TensorDescriptor.from_tensor(weight, [cfg.block_n, cfg.block_k])
        _fp8_gemm_tma_kernel[grid](x_desc, x_scale, w_desc, weight_scale, bias_arg, out,
                                   m, n, k, out.stride(0), *strides, **modes)
        return
    _fp8_gemm_kernel[grid](
        x_fp8, x_scale, weight, weight_scale, bias_arg, out, m, n, k, x_fp8.stride(0),
        weight.stride(0), out.stride(0), *strides, EVEN_K=k % cfg.block_k == 0, **modes)


def _tma_ok(x_fp8: torch.Tensor, weight: torch.Tensor) -> bool:
    """TMA needs 16-byte aligned bases and row strides; else the pointer kernel runs."""
    return all(t.data_ptr() % 16 == 0 and t.stride(0) % 16 == 0 for t in (x_fp8, weight))
