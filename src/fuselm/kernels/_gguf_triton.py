"""Triton kernels of ``gguf_matmul`` (the block layouts are in ``gguf_matmul``'s docstring).

Every ggml type decodes a tile of ``BLOCK_N`` rows x ``BLOCK_B`` blocks into a few *planes*:
float32 ``[BLOCK_N, PLANE_K]`` weight tiles, each with the K index of its columns (``koff``).
A plane is the part of the blocks whose bytes share one decode (the low nibbles of Q4_K, the
third 32-value group of each Q6_K half), so every load of the packed bytes is contiguous and
the block's own byte alignment is what Triton vectorizes (Q4_K/Q5_K blocks are 16-byte
multiples: 16-byte loads). The x values are gathered at ``koff`` (x is small and cached), so
nothing is permuted in registers. ``_accumulate`` then does one of:

- MODE 0 (gemv): ``acc [BLOCK_N, PLANE_K] += w * x[koff]``, reduced once after the K loop;
- MODE 1 (gemm): ``acc [BLOCK_M, BLOCK_N] += tl.dot(x[:, koff], w.T)`` in x's dtype;
- MODE 2 (dequant): stores the plane into ``out[rows, koff]``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fuselm.kernels import triton_utils
from fuselm.kernels.gguf_matmul import GGML_TYPES, GGUFConfig

if triton_utils.is_interpreting():
    triton_utils.patch_interpreter_range()  # the K loop has a runtime bound

_MODES = {"gemv": 0, "gemv16": 0, "gemm": 1, "dequant": 2}
# the kernels' TYPE codes of Q8_0 / Q4_K read as half-words (variant gemv16)
HALFWORDS = {8: 108, 12: 112}


@triton.jit
def _expand(v, ND: tl.constexpr):
    """[BN] -> [BN, 1, ...] of ND dims (the row axis of an ND plane tile)."""
    if ND == 3:
        return v[:, None, None]
    elif ND == 4:
        return v[:, None, None, None]
    else:
        return v[:, None, None, None, None]


@triton.jit
def _accumulate(acc, w, koff, K, x_ptr, x_row, m_rows, M, x_stride, out_ptr, rows, N,
                out_stride, MODE: tl.constexpr, IEEE: tl.constexpr, ND: tl.constexpr,
                BN: tl.constexpr, PK: tl.constexpr):
    """One plane: w [BN, ...] (ND dims), koff [...] (ND - 1 dims); see the module docstring."""
    kmask = koff < K
    if MODE == 0:
        xv = tl.load(x_ptr + x_row + koff, mask=kmask, other=0.0).to(tl.float32)
        acc += w * xv[None]
    elif MODE == 1:
        k2 = tl.reshape(koff, (PK,))
        xv = tl.load(x_ptr + m_rows.to(tl.int64)[:, None] * x_stride + k2[None, :],
                     mask=(m_rows < M)[:, None] & (k2 < K)[None, :], other=0.0)
        wt = tl.trans(tl.reshape(w, (BN, PK)).to(xv.dtype))
        if IEEE:
            acc = tl.dot(xv, wt, acc, input_precision="ieee")
        else:
            acc = tl.dot(xv, wt, acc)
    else:
        dst = out_ptr + _expand(rows.to(tl.int64) * out_stride, ND) + koff[None]
        tl.store(dst, w.to(out_ptr.dtype.element_ty),
                 mask=_expand(rows < N, ND) & kmask[None])
    return acc


@triton.jit
def _mantissa(q, BITS: tl.constexpr):
    """``1 + q / 2**BITS`` as float32 for unsigned ints ``q < 2**BITS``: q shifted into the
    mantissa of 1.0 (a shift and an or; no int-to-float conversion, which Hopper runs at a
    quarter of the FMA rate, too slow for the 4-8 values a byte streamed at full bandwidth)."""
    return ((q.to(tl.int32) << (23 - BITS)) | 0x3F800000).to(tl.float32, bitcast=True)


@triton.jit
def _half(wp16, b, words: tl.constexpr, at: tl.constexpr, wmask):
    """The fp16 at half-word ``at`` of each block (``words`` half-words long), fp32 [BN, BB]."""
    return tl.load(wp16[:, None] + b[None, :] * words + at, mask=wmask,
                   other=0.0).to(tl.float32)


@triton.jit
def _planes_q8_0(wp8, wp16, b, wmask):
    lane = tl.arange(0, 32)
    base = wp8[:, None, None] + (b * 34)[None, :, None]
    u = tl.load(base + 2 + lane[None, None, :], mask=wmask[:, :, None], other=0)
    f = _mantissa(u ^ 0x80, 8)  # 1 + (q + 128) / 256 for the int8 q
    d = _half(wp16, b, 17, 0, wmask)[:, :, None]
    w = (256.0 * d) * f - 384.0 * d  # = d q
    return w, b[:, None] * 32 + lane[None, :]


@triton.jit
def _planes_q8_0_split(wp8, wp16, b, wmask, K):
    """Q8_0 rows in the split layout (``gguf_matmul.q8_0_split``): value 8 t + v of block b at
    byte 64 (b // 2) + 16 t + 8 (b % 2) + v, its d at half-word K / 2 + b."""
    lane = tl.arange(0, 32)
    pos = (b // 2 * 64 + (b % 2) * 8)[None, :, None] + ((lane // 8) * 16 + lane % 8)[None, None, :]
    u = tl.load(wp8[:, None, None] + pos, mask=wmask[:, :, None], other=0)
    f = _mantissa(u ^ 0x80, 8)
    d = tl.load(wp16[:, None] + K // 2 + b[None, :], mask=wmask, other=0.0).to(tl.float32)
    w = (256.0 * d[:, :, None]) * f - 384.0 * d[:, :, None]  # = d q
    return w, b[:, None] * 32 + lane[None, :]


@triton.jit
def _planes_q4(wp8, wp16, b, wmask, SIZE: tl.constexpr, WITH_MIN: tl.constexpr):
    """Q4_0 (SIZE 18) or Q4_1 (SIZE 20, WITH_MIN): the low-nibble and high-nibble planes."""
    j = tl.arange(0, 16)
    base = wp8[:, None, None] + (b * SIZE)[None, :, None]
    qs = tl.load(base + (SIZE - 16) + j[None, None, :], mask=wmask[:, :, None], other=0)
    d = _half(wp16, b, SIZE // 2, 0, wmask)[:, :, None]
    # f = 1 + q / 16: d q + m = 16 d f - (16 d - m); d (q - 8) = 16 d f - 24 d
    scale = 16.0 * d
    if WITH_MIN:
        offset = scale - _half(wp16, b, SIZE // 2, 1, wmask)[:, :, None]
    else:
        offset = 24.0 * d
    lo = scale * _mantissa(qs & 0x0F, 4) - offset
    hi = scale * _mantissa(qs >> 4, 4) - offset
    k_lo = b[:, None] * 32 + j[None, :]
    return lo, k_lo, hi, k_lo + 16


@triton.jit
def _k_scale_min(base3, s, mask3):
    """6-bit (scale, min) of sub-blocks ``s`` ([1, 1, 4]) from the 12 scale bytes at block
    byte 4: as float32 [BN, BB, 4] each (``gguf_matmul._k_scale_min`` spells the rule out)."""
    jm = s % 4
    p = tl.load(base3 + 4 + jm, mask=mask3, other=0).to(tl.int32)
    q = tl.load(base3 + 8 + jm, mask=mask3, other=0).to(tl.int32)
    r = tl.load(base3 + 12 + jm, mask=mask3, other=0).to(tl.int32)
    high = s >= 4
    sc = tl.where(high, (r & 0x0F) | ((p >> 6) << 4), p & 63)
    mn = tl.where(high, (r >> 4) | ((q >> 6) << 4), q & 63)
    return sc.to(tl.float32), mn.to(tl.float32)


@triton.jit
def _planes_k(wp8, wp16, b, wmask, SIZE: tl.constexpr, HIGH_BIT: tl.constexpr,
              BITS: tl.constexpr):
    """Q4_K (SIZE 144, BITS 4) or Q5_K (SIZE 176, HIGH_BIT, BITS 5): the planes of the even
    sub-blocks (low nibbles of each 32-byte chunk) and of the odd ones (high nibbles), 128
    values a block, as [BN, BB, 4 chunks, 32]."""
    c = tl.arange(0, 4)
    lane = tl.arange(0, 32)
    base3 = wp8[:, None, None] + (b * SIZE)[None, :, None]
    mask3 = wmask[:, :, None]
    qs = tl.load(base3[:, :, :, None] + (SIZE - 128) + c[None, None, :, None] * 32
                 + lane[None, None, None, :], mask=mask3[:, :, :, None], other=0)
    lo = qs & 0x0F
    hi = qs >> 4
    s_lo = (2 * c)[None, None, :]
    if HIGH_BIT:
        qh = tl.load(base3[:, :, :, None] + 16 + lane[None, None, None, :],
                     mask=mask3[:, :, :, None], other=0)
        lo = lo | (((qh >> s_lo[:, :, :, None]) & 1) << 4)
        hi = hi | (((qh >> (s_lo + 1)[:, :, :, None]) & 1) << 4)
    d = _half(wp16, b, SIZE // 2, 0, wmask)[:, :, None]
    dmin = _half(wp16, b, SIZE // 2, 1, wmask)[:, :, None]
    sc_lo, mn_lo = _k_scale_min(base3, s_lo, mask3)
    sc_hi, mn_hi = _k_scale_min(base3, s_lo + 1, mask3)
    # f = 1 + q / 2**BITS: a q - b = 2**BITS a f - (2**BITS a + b)
    a_lo = (d * sc_lo * (1 << BITS))[:, :, :, None]
    a_hi = (d * sc_hi * (1 << BITS))[:, :, :, None]
    w_lo = a_lo * _mantissa(lo, BITS) - (a_lo + (dmin * mn_lo)[:, :, :, None])
    w_hi = a_hi * _mantissa(hi, BITS) - (a_hi + (dmin * mn_hi)[:, :, :, None])
    k_lo = b[:, None, None] * 256 + c[None, :, None] * 64 + lane[None, None, :]
    return w_lo, k_lo, w_hi, k_lo + 32


@triton.jit
def _planes_q8_0_halfwords(wp16, b, wmask):
    """Q8_0 as [BN, BB, 16 half-words, 2 bytes] (blocks are 17 half-words: d, then 16 of two
    int8 each): flipping both sign bits makes each byte q + 128, masked in place into the
    mantissa of 2**23 (``gemv16`` of Q4_K spells the trick out)."""
    j = tl.arange(0, 16)[None, None, :]
    p = tl.arange(0, 2)
    at = wp16[:, None, None] + (b * 17)[None, :, None] + 1 + j
    v = tl.load(at, mask=wmask[:, :, None], other=0.0).to(tl.int16, bitcast=True)
    u = (v.to(tl.int32) ^ 0x8080)[:, :, :, None]
    t = ((u & (0xFF << (8 * p))[None, None, None, :]) | 0x4B000000).to(
        tl.float32, bitcast=True) - 8388608.0  # (q + 128) 2**(8 p)
    d = _half(wp16, b, 17, 0, wmask)[:, :, None, None]
    scale = d * tl.where(p == 0, 1.0, 0.00390625)[None, None, None, :]
    koff = b[:, None, None] * 32 + tl.arange(0, 16)[None, :, None] * 2 + p[None, None, :]
    return t * scale - 128.0 * d, koff


@triton.jit
def _planes_q4_k_halfwords(wp8, wp16, b, wmask):
    """Q4_K as [BN, BB, 4 chunks, 16 half-words, 2 bytes]: each nibble is masked in place into
    the mantissa of 2**23 (one and-or a value: no shift, no conversion), so a nibble at bit
    ``pos`` reads f = 2**23 + q 2**pos and ``f - 2**23`` is ``q 2**pos`` exactly; then
    ``w = (f - 2**23) (a 2**-pos) - b``."""
    c = tl.arange(0, 4)[None, None, :, None]
    hw = tl.arange(0, 16)[None, None, None, :]
    p = tl.arange(0, 2)  # byte of the half-word
    mask4 = wmask[:, :, None, None]
    at = wp16[:, None, None, None] + (b * 72)[None, :, None, None] + 8 + c * 16 + hw
    v = tl.load(at, mask=mask4, other=0.0).to(tl.int16, bitcast=True).to(tl.int32)
    v = v[:, :, :, :, None]  # the sign extension lies above the masks
    lo_mask = (0x0F << (8 * p))[None, None, None, None, :]
    t_lo = ((v & lo_mask) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
    t_hi = ((v & (lo_mask << 4)) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
    base3 = wp8[:, None, None] + (b * 144)[None, :, None]
    s_lo = (2 * tl.arange(0, 4))[None, None, :]
    mask3 = wmask[:, :, None]
    d = _half(wp16, b, 72, 0, wmask)[:, :, None]
    dmin = _half(wp16, b, 72, 1, wmask)[:, :, None]
    sc_lo, mn_lo = _k_scale_min(base3, s_lo, mask3)
    sc_hi, mn_hi = _k_scale_min(base3, s_lo + 1, mask3)
    pow_lo = tl.where(p == 0, 1.0, 0.00390625)[None, None, None, None, :]  # 2**-pos: 0, 8
    a_lo = (d * sc_lo)[:, :, :, None, None] * pow_lo
    a_hi = (d * sc_hi)[:, :, :, None, None] * (pow_lo * 0.0625)  # pos 4, 12
    w_lo = t_lo * a_lo - (dmin * mn_lo)[:, :, :, None, None]
    w_hi = t_hi * a_hi - (dmin * mn_hi)[:, :, :, None, None]
    k_lo = (b[:, None, None, None] * 256 + tl.arange(0, 4)[None, :, None, None] * 64
            + tl.arange(0, 16)[None, None, :, None] * 2 + p[None, None, None, :])
    return w_lo, k_lo, w_hi, k_lo + 32


@triton.jit
def _q6_plane(ql, qh, base4, hh, ii, g: tl.constexpr, d, mask4, b, lane):
    """Plane ``g`` (values 32 g .. 32 g + 31 of each half) of Q6_K tiles [BN, BB, 2, 2, 16]."""
    if g < 2:
        low = ql & 0x0F
    else:
        low = ql >> 4
    f = _mantissa(low | (((qh >> (2 * g)) & 3) << 4), 6)  # 1 + q / 64
    sc = tl.load(base4 + 192 + 8 * hh + 2 * g + ii, mask=mask4, other=0)
    sc = sc.to(tl.int8, bitcast=True).to(tl.float32)  # [BN, BB, 2, 2]
    a = (d[:, :, None, None] * sc)[:, :, :, :, None]
    w = (64.0 * a) * f - 96.0 * a  # a (q - 32)
    # [BB, 2, 2, 16]
    koff = b[:, None, None, None] * 256 + (hh * 128)[:, :, :, None] + 32 * g + lane
    return w, koff


@triton.jit
def _q6_tiles(wp8, b, wmask):
    """Q6_K bytes of a tile as [BN, BB, 2 halves, 2, 16] (value lane = 16 i + r of a group)."""
    hh = tl.arange(0, 2)[None, :, None]  # [1, 2, 1]: the half
    ii = tl.arange(0, 2)[None, None, :]  # [1, 1, 2]: which 16 of a 32-value group
    r = tl.arange(0, 16)
    base4 = wp8[:, None, None, None] + (b * 210)[None, :, None, None]
    mask4 = wmask[:, :, None, None]
    lane = ii[:, :, :, None] * 16 + r[None, None, None, :]  # [1, 1, 2, 16]
    at = base4[:, :, :, :, None] + (hh * 64)[:, :, :, None] + lane
    ql_a = tl.load(at, mask=mask4[:, :, :, :, None], other=0)
    ql_b = tl.load(at + 32, mask=mask4[:, :, :, :, None], other=0)
    qh = tl.load(base4[:, :, :, :, None] + 128 + (hh * 32)[:, :, :, None] + lane,
                 mask=mask4[:, :, :, :, None], other=0)
    return ql_a, ql_b, qh, base4, mask4, hh, ii, lane


@triton.jit
def _step(acc, TYPE: tl.constexpr, wp8, wp16, b, wmask, K, x_ptr, x_row, m_rows, M,
          x_stride, out_ptr, rows, N, out_stride, MODE: tl.constexpr, IEEE: tl.constexpr,
          BN: tl.constexpr, BB: tl.constexpr):
    """Decodes one tile of every plane of ggml type TYPE and accumulates (or stores) it."""
    if TYPE == 8 or TYPE == 1008:
        if TYPE == 8:
            w, k = _planes_q8_0(wp8, wp16, b, wmask)
        else:
            w, k = _planes_q8_0_split(wp8, wp16, b, wmask, K)
        acc = _accumulate(acc, w, k, K, x_ptr, x_row, m_rows, M, x_stride, out_ptr, rows, N,
                          out_stride, MODE, IEEE, 3, BN, BB * 32)
    elif TYPE == 14:
        ql_a, ql_b, qh, base4, mask4, hh, ii, lane = _q6_tiles(wp8, b, wmask)
        d = _half(wp16, b, 105, 104, wmask)
        # planes 0 and 2 take the low / high nibbles of ql_a, planes 1 and 3 those of ql_b
        for g in tl.static_range(0, 4, 2):
            w, k = _q6_plane(ql_a, qh, base4, hh, ii, g, d, mask4, b, lane)
            acc = _accumulate(acc, w, k, K, x_ptr, x_row, m_rows, M, x_stride, out_ptr, rows,
                              N, out_stride, MODE, IEEE, 5, BN, BB * 64)
        for g in tl.static_range(1, 4, 2):
            w, k = _q6_plane(ql_b, qh, base4, hh, ii, g, d, mask4, b, lane)
            acc = _accumulate(acc, w, k, K, x_ptr, x_row, m_rows, M, x_stride, out_ptr, rows,
                              N, out_stride, MODE, IEEE, 5, BN, BB * 64)
    elif TYPE == 2 or TYPE == 3:
        if TYPE == 2:
            w0, k0, w1, k1 = _planes_q4(wp8, wp16, b, wmask, 18, False)
        else:
            w0, k0, w1, k1 = _planes_q4(wp8, wp16, b, wmask, 20, True)
        acc = _accumulate(acc, w0, k0, K, x_ptr, x_row, m_rows, M, x_stride, out_ptr, rows, N,
                          out_stride, MODE, IEEE, 3, BN, BB * 16)
        acc = _accumulate(acc, w1, k1, K, x_ptr, x_row, m_rows, M, x_stride, out_ptr, rows, N,
                          out_stride, MODE, IEEE, 3, BN, BB * 16)
    elif TYPE == 108:
        w, k = _planes_q8_0_halfwords(wp16, b, wmask)
        acc = _accumulate(acc, w, k, K, x_ptr, x_row, m_rows, M, x_stride, out_ptr, rows, N,
                          out_stride, MODE, IEEE, 4, BN, BB * 32)
    elif TYPE == 112:
        w0, k0, w1, k1 = _planes_q4_k_halfwords(wp8, wp16, b, wmask)
        acc = _accumulate(acc, w0, k0, K, x_ptr, x_row, m_rows, M, x_stride, out_ptr, rows, N,
                          out_stride, MODE, IEEE, 5, BN, BB * 128)
        acc = _accumulate(acc, w1, k1, K, x_ptr, x_row, m_rows, M, x_stride, out_ptr, rows, N,
                          out_stride, MODE, IEEE, 5, BN, BB * 128)
    else:
        if TYPE == 12:
            w0, k0, w1, k1 = _planes_k(wp8, wp16, b, wmask, 144, False, 4)
        else:
            w0, k0, w1, k1 = _planes_k(wp8, wp16, b, wmask, 176, True, 5)
        acc = _accumulate(acc, w0, k0, K, x_ptr, x_row, m_rows, M, x_stride, out_ptr, rows, N,
                          out_stride, MODE, IEEE, 4, BN, BB * 128)
        acc = _accumulate(acc, w1, k1, K, x_ptr, x_row, m_rows, M, x_stride, out_ptr, rows, N,
                          out_stride, MODE, IEEE, 4, BN, BB * 128)
    return acc


@triton.jit
def _gemv_acc(TYPE: tl.constexpr, BN: tl.constexpr, BB: tl.constexpr):
    """The gemv accumulator: the shape of the type's plane tiles."""
    if TYPE == 8 or TYPE == 1008:
        acc = tl.zeros([BN, BB, 32], dtype=tl.float32)
    elif TYPE == 112:
        acc = tl.zeros([BN, BB, 4, 16, 2], dtype=tl.float32)
    elif TYPE == 108:
        acc = tl.zeros([BN, BB, 16, 2], dtype=tl.float32)
    elif TYPE == 14:
        acc = tl.zeros([BN, BB, 2, 2, 16], dtype=tl.float32)
    elif TYPE == 2 or TYPE == 3:
        acc = tl.zeros([BN, BB, 16], dtype=tl.float32)
    else:
        acc = tl.zeros([BN, BB, 4, 32], dtype=tl.float32)
    return acc


@triton.jit
def _row_sums(acc, TYPE: tl.constexpr):
    """[BN, ...] -> [BN]: the gemv accumulator summed once, after the K loop."""
    if TYPE == 14 or TYPE == 112:
        acc = tl.sum(acc, axis=4)
    if TYPE == 14 or TYPE == 112 or TYPE == 12 or TYPE == 13 or TYPE == 108:
        acc = tl.sum(acc, axis=3)
    return tl.sum(tl.sum(acc, axis=2), axis=1)


@triton.jit
def _gguf_matmul_kernel(
    x_ptr, w8, w16, out_ptr,  # x [M, K]; the packed rows as uint8 and as fp16; out [M, N]
    M, N, K, num_blocks, x_stride, w_stride, out_stride,  # w_stride in bytes
    TYPE: tl.constexpr, MODE: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    # gemv: the x rows of one weight tile are neighbouring programs, so its bytes come from
    # DRAM once and from L2 for the other rows
    if MODE == 0:
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
    else:
        pid_m = tl.program_id(1)
        pid_n = tl.program_id(0)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    # int64 only in the row pointers; offsets inside a row are int32
    wp8 = w8 + rows.to(tl.int64) * w_stride
    wp16 = w16 + rows.to(tl.int64) * (w_stride // 2)
    m_rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    x_row = pid_m.to(tl.int64) * x_stride  # gemv: one x row a program
    if MODE == 0:
        acc = _gemv_acc(TYPE, BLOCK_N, BLOCK_B)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for b0 in tl.range(0, num_blocks, BLOCK_B, num_stages=NUM_STAGES):
        b = b0 + tl.arange(0, BLOCK_B)
        wmask = rmask[:, None] & (b < num_blocks)[None, :]
        acc = _step(acc, TYPE, wp8, wp16, b, wmask, K, x_ptr, x_row, m_rows, M, x_stride,
                    out_ptr, rows, N, out_stride, MODE, IEEE, BLOCK_N, BLOCK_B)
    if MODE == 0:
        y = _row_sums(acc, TYPE)
        tl.store(out_ptr + pid_m.to(tl.int64) * out_stride + rows,
                 y.to(out_ptr.dtype.element_ty), mask=rmask)
    else:
        dst = out_ptr + m_rows.to(tl.int64)[:, None] * out_stride + rows[None, :]
        tl.store(dst, acc.to(out_ptr.dtype.element_ty),
                 mask=(m_rows < M)[:, None] & rmask[None, :])


@triton.jit
def _gguf_dequant_kernel(w8, w16, out_ptr, N, K, num_blocks, w_stride, out_stride,
                         TYPE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    b = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    wmask = (rows < N)[:, None] & (b < num_blocks)[None, :]
    wp8 = w8 + rows.to(tl.int64) * w_stride
    wp16 = w16 + rows.to(tl.int64) * (w_stride // 2)
    none = tl.zeros([1, 1], dtype=tl.float32)
    _step(none, TYPE, wp8, wp16, b, wmask, K, out_ptr, 0, rows, 0, 0, out_ptr, rows, N,
          out_stride, 2, False, BLOCK_N, BLOCK_B)


def _views(qweight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The packed rows as bytes and as fp16 half-words (every block size and scale offset is
    even, so each fp16 field is one aligned half-word)."""
    if qweight.stride(1) != 1 or qweight.stride(0) % 2:
        raise ValueError(f"gguf qweight rows must be contiguous and start at even bytes, got "
                         f"strides {qweight.stride()}")
    return qweight, qweight.view(torch.float16)


def launch_matmul(x: torch.Tensor, qweight: torch.Tensor, ggml_type: int, out: torch.Tensor,
                  cfg: GGUFConfig) -> None:
    """gemv (``cfg.block_m`` ignored: one x row a program) or gemm into ``out [M, N]``."""
    m, k = x.shape
    n = qweight.shape[0]
    _, elems, _ = GGML_TYPES[ggml_type]
    mode = _MODES[cfg.variant]
    block_m = 1 if mode == 0 else max(16, cfg.block_m)
    w8, w16 = _views(qweight)
    tiles = triton.cdiv(n, cfg.block_n)
    grid = (m, tiles) if mode == 0 else (tiles, triton.cdiv(m, block_m))
    code = HALFWORDS.get(ggml_type, ggml_type) if cfg.variant == "gemv16" else ggml_type
    _gguf_matmul_kernel[grid](
        x, w8, w16, out, m, n, k, k // elems, x.stride(0), qweight.stride(0), out.stride(0),
        TYPE=code, MODE=mode, IEEE=x.dtype == torch.float32, BLOCK_M=block_m,
        BLOCK_N=cfg.block_n, BLOCK_B=cfg.block_b, NUM_STAGES=cfg.num_stages,
        num_warps=cfg.num_warps,
    )


def launch_dequant(qweight: torch.Tensor, ggml_type: int, out: torch.Tensor,
                   cfg: GGUFConfig) -> None:
    """The logical weight into ``out [N, K]`` (its dtype)."""
    n, k = out.shape
    if n == 0 or k == 0:
        return
    _, elems, _ = GGML_TYPES[ggml_type]
    w8, w16 = _views(qweight)
    grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(k // elems, cfg.block_b))
    _gguf_dequant_kernel[grid](w8, w16, out, n, k, k // elems, qweight.stride(0),
                               out.stride(0), TYPE=ggml_type, BLOCK_N=cfg.block_n,
                               BLOCK_B=cfg.block_b, num_warps=cfg.num_warps)
