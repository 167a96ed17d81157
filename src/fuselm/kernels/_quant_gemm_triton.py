"""Tensor-core kernels (variant ``gemm``) of ``int4_matmul`` and ``int8_matmul`` (layouts and
math in those modules' docstrings).

A program owns ``BLOCK_N`` weight rows and ``BLOCK_M`` batch rows. Each K step reads the packed
weight as int32 words, dequantizes the tile in registers to x's dtype in the natural column
order (so x's tile is an ordinary contiguous load) and feeds ``tl.dot`` with fp32
accumulation: one dot chain over the program's K range. Split K (config ``split_k`` > 1, grid
axis 2): the programs of one output tile take contiguous runs of K steps and write fp32
partials ``[splits, M, N]``; ``_split_sum_kernel`` adds them in a fixed order into ``out``
(deterministic: no atomics). It multiplies the programs of the narrow shapes (N = 4096 / 6144
give 96-192 tiles at batch 16-64 on 132 SMs), whose single chain of K steps was latency-bound.

- int4: ``w = (q - z) * s`` per group in x's dtype (the group's scale rounded to x's dtype, then
  the product rounded once: what the ``dequant`` variant computes). A K step lies within one
  group; the next step's scales and zeros are loaded a step ahead.
- int8: the exact byte ``q`` in x's dtype; the per-channel scale multiplies the finished fp32
  dot product.

On the GPU, for 16-bit x, a word becomes its values in a few instructions of inline PTX
(``lop3`` puts a nibble pair into the mantissas of a float16x2 constant, ``prmt`` moves bytes
into the mantissas of 2^23 in fp32; about 2.5 / 2.75 instructions a value); under the
interpreter and for fp32 x the same tile comes from plain shifts and fp32 math (identical
values: every product is exact in fp32 before its single rounding).

``SWAP`` picks the MMA's operand roles: 1 (small batch) the weight tile is the MMA's M side
(64 rows a warp group) and the batch its N side (>= 8); 0 (large batch) the batch is M and
the dequantized weight tile the B operand in shared memory.

H200, Llama-3-8B shapes (the ``us`` of ``configs/int{4,8}_matmul.json``): with split K 0.56-0.76x
bf16 cuBLAS's time at M = 16 and 0.90-1.0x at M = 64 (without it, 1.1-1.6x on the N = 4096 /
6144 shapes: few programs, each K step's load latency exposed); 1.5-2.0x at M = 256 (a
program's dequantization and MMA do not overlap: each dot waits for its shared-memory weight
tile; split K does not help there).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fuselm.kernels import _pdl, triton_utils
from fuselm.kernels._pdl import pdl_wait_then_release

if triton_utils.is_interpreting():
    triton_utils.patch_interpreter_range()  # the K loops have runtime bounds

# int4: a word (8 nibbles, column 8w + i in bits 4i..4i+3) -> 4 x 16-bit pairs in column order
# (k0 k1) (k2 k3) (k4 k5) (k6 k7), each (q - z) * s: lop3 makes (k_i, k_i+4) = MAGIC + q pairs,
# prmt regroups them, sub / mul in pairs. $5 = (MAGIC + z) twice, $6 = s twice.
_INT4_ASM = """
{
.reg .b32 t0, t1, t2, t3, u;
lop3.b32 t0, $4, 0x000F000F, MAGIC, 0xea;
shr.u32 u, $4, 4;
lop3.b32 t1, u, 0x000F000F, MAGIC, 0xea;
shr.u32 u, $4, 8;
lop3.b32 t2, u, 0x000F000F, MAGIC, 0xea;
shr.u32 u, $4, 12;
lop3.b32 t3, u, 0x000F000F, MAGIC, 0xea;
prmt.b32 $0, t0, t1, 0x5410;
prmt.b32 $1, t2, t3, 0x5410;
prmt.b32 $2, t0, t1, 0x7632;
prmt.b32 $3, t2, t3, 0x7632;
sub.rn.TYPE $0, $0, $5;
sub.rn.TYPE $1, $1, $5;
sub.rn.TYPE $2, $2, $5;
sub.rn.TYPE $3, $3, $5;
mul.rn.TYPE $0, $0, $6;
mul.rn.TYPE $1, $1, $6;
mul.rn.TYPE $2, $2, $6;
mul.rn.TYPE $3, $3, $6;
}
"""
INT4_ASM_BF16 = tl.constexpr(_INT4_ASM.replace("MAGIC", "0x43004300").replace("TYPE", "bf16x2"))
INT4_ASM_FP16 = tl.constexpr(_INT4_ASM.replace("MAGIC", "0x64006400").replace("TYPE", "f16x2"))

# int8, bf16: a word (signed bytes, column 4w + i = byte i) -> (k0 k1) (k2 k3) bf16 pairs:
# b + 128 into the mantissa of 2^23 (prmt), minus 2^23 + 128 (exact b), packed by cvt.
INT8_ASM_BF16 = tl.constexpr("""
{
.reg .b32 u, m, f0, f1, f2, f3;
xor.b32 u, $2, 0x80808080;
mov.b32 m, 0x4B000000;
prmt.b32 f0, u, m, 0x7540;
prmt.b32 f1, u, m, 0x7541;
prmt.b32 f2, u, m, 0x7542;
prmt.b32 f3, u, m, 0x7543;
sub.f32 f0, f0, 0f4B000080;
sub.f32 f1, f1, 0f4B000080;
sub.f32 f2, f2, 0f4B000080;
sub.f32 f3, f3, 0f4B000080;
cvt.rn.bf16x2.f32 $0, f1, f0;
cvt.rn.bf16x2.f32 $1, f3, f2;
}
""")
# int8, fp16: b + 128 into the mantissa of 1024 (one prmt a pair), minus 1152 (exact b)
INT8_ASM_FP16 = tl.constexpr("""
{
.reg .b32 u, m, c;
xor.b32 u, $2, 0x80808080;
mov.b32 m, 0x64646464;
mov.b32 c, 0x64806480;
prmt.b32 $0, u, m, 0x4140;
prmt.b32 $1, u, m, 0x4342;
sub.rn.f16x2 $0, $0, c;
sub.rn.f16x2 $1, $1, c;
}
""")


@triton.jit
def _halves(t, DT: tl.constexpr):
    """int32 ``t`` -> its low and high 16 bits as two DT (fp16/bf16) values."""
    lo = t.to(tl.int16).to(DT, bitcast=True)
    hi = (t >> 16).to(tl.int16).to(DT, bitcast=True)
    return lo, hi


@triton.jit
def _columns8(p0, p1, p2, p3, p4, p5, p6, p7):
    """8 planes ``[R, W]`` (plane i = column 8w + i) -> ``[R, 8 W]`` in column order; the
    joins add in-register dims, so the reshape moves nothing."""
    q = tl.join(tl.join(tl.join(p0, p4), tl.join(p2, p6)), tl.join(tl.join(p1, p5),
                                                                   tl.join(p3, p7)))
    return tl.reshape(q, (p0.shape[0], p0.shape[1] * 8))  # [.., c, b, a] = plane 4c + 2b + a


@triton.jit
def _columns4(p0, p1, p2, p3):
    """4 planes ``[R, W]`` (plane i = column 4w + i) -> ``[R, 4 W]`` in column order."""
    q = tl.join(tl.join(p0, p2), tl.join(p1, p3))
    return tl.reshape(q, (p0.shape[0], p0.shape[1] * 4))


@triton.jit
def _pair16(v, DT: tl.constexpr):
    """[R] values -> int32 ``[R, 1]`` holding v (as DT) in both 16-bit halves."""
    h = v.to(DT).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return (h | (h << 16))[:, None]


@triton.jit
def _int4_tile(words, s, z, DT: tl.constexpr, ASM: tl.constexpr):
    """int32 words ``[BN, BKW]`` of one group, the group's scales ``[BN]`` and zeros ``[BN]``
    -> the weights ``(q - z) * s`` ``[BN, 8 BKW]`` in the dot dtype."""
    if ASM:
        if DT == tl.bfloat16:
            magic: tl.constexpr = 0x4300  # bf16 128 + q
        else:
            magic: tl.constexpr = 0x6400  # fp16 1024 + q
        zz = tl.broadcast_to(((z.to(tl.int32) | magic) * 65537)[:, None], words.shape)
        ss = tl.broadcast_to(_pair16(s, DT), words.shape)
        if DT == tl.bfloat16:
            asm: tl.constexpr = INT4_ASM_BF16
        else:
            asm: tl.constexpr = INT4_ASM_FP16
        o0, o1, o2, o3 = tl.inline_asm_elementwise(
            asm=asm, constraints="=r,=r,=r,=r,r,r,r", args=[words, zz, ss],
            dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)
        a0, a1 = _halves(o0, DT)
        a2, a3 = _halves(o1, DT)
        a4, a5 = _halves(o2, DT)
        a6, a7 = _halves(o3, DT)
        w = _columns8(a0, a1, a2, a3, a4, a5, a6, a7)
    else:
        w = _int4_tile_fp32(words, s, z, DT)
    return w


@triton.jit
def _int4_tile_fp32(words, s, z, DT: tl.constexpr):
    """``_int4_tile`` by shifts and fp32 math (the interpreter, fp32 x)."""
    zf = z.to(tl.float32)[:, None]
    sf = s.to(DT).to(tl.float32)[:, None]  # the scale as the kernel rounds it
    p0 = (((words & 0xF).to(tl.float32) - zf) * sf).to(DT)
    p1 = ((((words >> 4) & 0xF).to(tl.float32) - zf) * sf).to(DT)
    p2 = ((((words >> 8) & 0xF).to(tl.float32) - zf) * sf).to(DT)
    p3 = ((((words >> 12) & 0xF).to(tl.float32) - zf) * sf).to(DT)
    p4 = ((((words >> 16) & 0xF).to(tl.float32) - zf) * sf).to(DT)
    p5 = ((((words >> 20) & 0xF).to(tl.float32) - zf) * sf).to(DT)
    p6 = ((((words >> 24) & 0xF).to(tl.float32) - zf) * sf).to(DT)
    p7 = ((((words >> 28) & 0xF).to(tl.float32) - zf) * sf).to(DT)
    return _columns8(p0, p1, p2, p3, p4, p5, p6, p7)


@triton.jit
def _int8_tile(words, DT: tl.constexpr, ASM: tl.constexpr):
    """int32 words ``[BN, BKW]`` (4 signed bytes each) -> the exact bytes ``[BN, 4 BKW]`` in
    the dot dtype."""
    if ASM:
        if DT == tl.bfloat16:
            asm: tl.constexpr = INT8_ASM_BF16
        else:
            asm: tl.constexpr = INT8_ASM_FP16
        o0, o1 = tl.inline_asm_elementwise(
            asm=asm, constraints="=r,=r,r", args=[words], dtype=(tl.int32, tl.int32),
            is_pure=True, pack=1)
        a0, a1 = _halves(o0, DT)
        a2, a3 = _halves(o1, DT)
        w = _columns4(a0, a1, a2, a3)
    else:
        w = _int8_tile_fp32(words, DT)
    return w


@triton.jit
def _int8_tile_fp32(words, DT: tl.constexpr):
    """``_int8_tile`` by shifts (the interpreter, fp32 x)."""
    p0 = ((words << 24) >> 24).to(tl.float32).to(DT)  # arithmetic shifts: sign-extended
    p1 = ((words << 16) >> 24).to(tl.float32).to(DT)
    p2 = ((words << 8) >> 24).to(tl.float32).to(DT)
    p3 = (words >> 24).to(tl.float32).to(DT)
    return _columns4(p0, p1, p2, p3)


@triton.jit
def _x_tile(x_ptr, cols, x_stride, BLOCK_K: tl.constexpr, SWAP: tl.constexpr):
    """Pointers of x's first K step: ``[BLOCK_K, BLOCK_M]`` (SWAP) or ``[BLOCK_M, BLOCK_K]``."""
    kk = tl.arange(0, BLOCK_K)
    if SWAP:
        ptrs = x_ptr + cols.to(tl.int64)[None, :] * x_stride + kk[:, None]
    else:
        ptrs = x_ptr + cols.to(tl.int64)[:, None] * x_stride + kk[None, :]
    return ptrs


@triton.jit
def _mma(acc, w, x_tile, k0, cmask, SWAP: tl.constexpr, PREC: tl.constexpr):
    """``acc += w @ x.T`` (SWAP: acc ``[BN, BM]``) or ``x @ w.T`` (acc ``[BM, BN]``) of one K
    step; w ``[BN, BK]`` in the dot dtype."""
    if SWAP:
        xt = tl.load(x_tile + k0, mask=cmask[None, :], other=0.0)
        acc = tl.dot(w, xt, acc, input_precision=PREC)
    else:
        xt = tl.load(x_tile + k0, mask=cmask[:, None], other=0.0)
        acc = tl.dot(xt, tl.trans(w), acc, input_precision=PREC)
    return acc


@triton.jit
def _store(out_ptr, acc, rows, cols, rmask, cmask, out_stride, SWAP: tl.constexpr):
    """Writes the fp32 tile (layout of ``_mma``) into ``out [M, N]`` in out's dtype."""
    if SWAP:
        dst = out_ptr + cols.to(tl.int64)[None, :] * out_stride + rows[:, None]
        tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=cmask[None, :] & rmask[:, None])
    else:
        dst = out_ptr + cols.to(tl.int64)[:, None] * out_stride + rows[None, :]
        tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=cmask[:, None] & rmask[None, :])


@triton.jit
def _load_rows(ptrs, rmask, EVEN_N: tl.constexpr):
    """A per-row vector ``[BN]`` (scales, zeros): masked only past N."""
    if EVEN_N:
        v = tl.load(ptrs)
    else:
        v = tl.load(ptrs, mask=rmask, other=0)
    return v


@triton.jit
def _load_words(ptrs, rmask, EVEN_N: tl.constexpr):
    """A weight tile ``[BN, BKW]`` of int32 words (streamed once: evict first)."""
    if EVEN_N:
        words = tl.load(ptrs, eviction_policy="evict_first")
    else:
        words = tl.load(ptrs, mask=rmask[:, None], other=0, eviction_policy="evict_first")
    return words


@triton.jit
def _split_range(out_ptr, K, split_steps, split_stride, BLOCK_K: tl.constexpr):
    """This program's K range ``[k_lo, k_hi)`` (axis 2 = its share of split K) and the output
    it writes: its own partial plane."""
    split = tl.program_id(2)
    k_lo = split * split_steps * BLOCK_K
    k_hi = tl.minimum(k_lo + split_steps * BLOCK_K, K)
    return k_lo, k_hi, out_ptr + split.to(tl.int64) * split_stride


@triton.jit
def _split_sum_kernel(
    part_ptr,  # fp32 [SPLIT, M, N] contiguous
    out_ptr,  # [M, N], rows out_stride apart
    M,
    N,
    out_stride,
    SPLIT: tl.constexpr,
    BLOCK: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl_wait_then_release(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    src = part_ptr + row * N + cols
    acc = tl.load(src, mask=mask, other=0.0)
    for i in tl.static_range(1, SPLIT):  # a fixed order: the same sum every run
        acc += tl.load(src + i * M * N, mask=mask, other=0.0)
    tl.store(out_ptr + row * out_stride + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _int4_gemm_kernel(
    x_ptr,  # [M, K], rows x_stride apart
    qw_ptr,  # int32 [N, K // 8] (the uint8 [N, K // 2] weight as words), rows qw_stride apart
    s_ptr,  # [N, K // G], rows s_stride apart
    z_ptr,  # uint8 [N, K // G], rows z_stride apart
    out_ptr,  # [M, N], rows out_stride apart (split K: fp32 partials, planes split_stride apart)
    M,
    N,
    K,
    x_stride,
    qw_stride,
    s_stride,
    z_stride,
    out_stride,
    split_steps,  # K steps a program of axis 2 runs (all of them without split K)
    split_stride,
    GROUP: tl.constexpr,  # G, a multiple of BLOCK_K
    ASM: tl.constexpr,  # the PTX dequantization (GPU, 16-bit x)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # K columns a step (8 * words), within one group
    SWAP: tl.constexpr,
    EVEN_N: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    USE_PDL: tl.constexpr,
    PREC: tl.constexpr,  # "ieee" for fp32 x (no TF32 rounding); ignored for 16-bit x
):
    pdl_wait_then_release(USE_PDL)
    cols = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # batch rows
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # weight rows
    rows64 = rows.to(tl.int64)
    rmask = rows < N
    cmask = cols < M
    qw_tile = qw_ptr + rows64[:, None] * qw_stride + tl.arange(0, BLOCK_K // 8)[None, :]
    s_rows = s_ptr + rows64 * s_stride
    z_rows = z_ptr + rows64 * z_stride
    x_tile = _x_tile(x_ptr, cols, x_stride, BLOCK_K, SWAP)
    if SWAP:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    last_group = K // GROUP - 1
    k_lo, k_hi, out_ptr = _split_range(out_ptr, K, split_steps, split_stride, BLOCK_K)
    s = _load_rows(s_rows + k_lo // GROUP, rmask, EVEN_N)
    z = _load_rows(z_rows + k_lo // GROUP, rmask, EVEN_N)
    for k0 in tl.range(k_lo, k_hi, BLOCK_K, num_stages=NUM_STAGES):
        words = _load_words(qw_tile + k0 // 8, rmask, EVEN_N)
        # the next step's scales and zeros: in flight during this step (the pipeliner does
        # not stage these 1-2 byte loads; a queue two steps deep stops it pipelining at all)
        g = tl.minimum((k0 + BLOCK_K) // GROUP, last_group)
        s_next = _load_rows(s_rows + g, rmask, EVEN_N)
        z_next = _load_rows(z_rows + g, rmask, EVEN_N)
        w = _int4_tile(words, s, z, x_ptr.dtype.element_ty, ASM)  # [BLOCK_N, BLOCK_K]
        acc = _mma(acc, w, x_tile, k0, cmask, SWAP, PREC)
        s = s_next
        z = z_next
    _store(out_ptr, acc, rows, cols, rmask, cmask, out_stride, SWAP)


@triton.jit
def _int8_gemm_kernel(
    x_ptr,  # [M, K], rows x_stride apart
    qw_ptr,  # int32 [N, K // 4] (the int8 [N, K] weight as words), rows qw_stride apart
    s_ptr,  # [N]
    out_ptr,  # [M, N], rows out_stride apart (split K: fp32 partials, planes split_stride apart)
    M,
    N,
    K,
    x_stride,
    qw_stride,
    out_stride,
    split_steps,
    split_stride,
    ASM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # K columns a step (4 * words; divides K)
    SWAP: tl.constexpr,
    EVEN_N: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    USE_PDL: tl.constexpr,
    PREC: tl.constexpr,
):
    pdl_wait_then_release(USE_PDL)
    cols = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows64 = rows.to(tl.int64)
    rmask = rows < N
    cmask = cols < M
    qw_tile = qw_ptr + rows64[:, None] * qw_stride + tl.arange(0, BLOCK_K // 4)[None, :]
    x_tile = _x_tile(x_ptr, cols, x_stride, BLOCK_K, SWAP)
    if SWAP:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_lo, k_hi, out_ptr = _split_range(out_ptr, K, split_steps, split_stride, BLOCK_K)
    for k0 in tl.range(k_lo, k_hi, BLOCK_K, num_stages=NUM_STAGES):
        words = _load_words(qw_tile + k0 // 4, rmask, EVEN_N)
        w = _int8_tile(words, x_ptr.dtype.element_ty, ASM)  # [BLOCK_N, BLOCK_K]
        acc = _mma(acc, w, x_tile, k0, cmask, SWAP, PREC)
    s = _load_rows(s_ptr + rows, rmask, EVEN_N).to(tl.float32)
    if SWAP:
        acc = acc * s[:, None]
    else:
        acc = acc * s[None, :]
    _store(out_ptr, acc, rows, cols, rmask, cmask, out_stride, SWAP)


def _meta(x: torch.Tensor, cfg, n: int) -> dict:
    """The launch meta-parameters both kernels share."""
    pdl = _pdl.use_pdl(x)
    return dict(ASM=x.is_cuda and not triton_utils.is_interpreting() and x.dtype != torch.float32,
                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                SWAP=not cfg.mode & 1, EVEN_N=n % cfg.block_n == 0, NUM_STAGES=cfg.num_stages,
                USE_PDL=pdl, PREC="ieee" if x.dtype == torch.float32 else "tf32",
                num_warps=cfg.num_warps, launch_pdl=pdl)


def _split(m: int, n: int, k: int, cfg, out: torch.Tensor) -> tuple[int, int, torch.Tensor]:
    """(programs along K, K steps each, the tensor the kernel writes): ``out`` itself, or
    fp32 partials ``[splits, M, N]`` when ``cfg.split_k`` leaves more than one program."""
    steps = k // cfg.block_k
    per = -(-steps // max(1, cfg.split_k))
    splits = -(-steps // per)
    if splits == 1:
        return 1, steps, out
    return splits, per, torch.empty((splits, m, n), dtype=torch.float32, device=out.device)


def _sum_splits(part: torch.Tensor, out: torch.Tensor) -> None:
    """``out = part.sum(0)`` in out's dtype, the partials added in order (no atomics)."""
    splits, m, n = part.shape
    block = 512
    pdl = _pdl.use_pdl(out)
    _split_sum_kernel[(m, triton.cdiv(n, block))](part, out, m, n, out.stride(0), SPLIT=splits,
                                                  BLOCK=block, USE_PDL=pdl, num_warps=4,
                                                  launch_pdl=pdl)


def int4_gemm(x: torch.Tensor, words: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
              group_size: int, out: torch.Tensor, cfg) -> None:
    """``out [M, N] = x @ W.T`` of the int4 layout (words: the weight as int32 ``[N, K // 8]``)
    with ``cfg`` (a valid ``gemm`` config: ``group_size % cfg.block_k == 0``)."""
    m, k = x.shape
    n = words.shape[0]
    splits, per, dst = _split(m, n, k, cfg, out)
    grid = (triton.cdiv(m, cfg.block_m), triton.cdiv(n, cfg.block_n), splits)
    _int4_gemm_kernel[grid](
        x, words, scales, zeros, dst, m, n, k, x.stride(0), words.stride(0), scales.stride(0),
        zeros.stride(0), dst.stride(-2), per, m * n if splits > 1 else 0, GROUP=group_size,
        **_meta(x, cfg, n))
    if splits > 1:
        _sum_splits(dst, out)


def int8_gemm(x: torch.Tensor, words: torch.Tensor, scales: torch.Tensor, out: torch.Tensor,
              cfg) -> None:
    """``out [M, N] = (x @ q.T) * scales`` (words: the int8 weight as int32 ``[N, K // 4]``)
    with ``cfg`` (a valid ``gemm`` config: ``K % cfg.block_k == 0``)."""
    m, k = x.shape
    n = words.shape[0]
    splits, per, dst = _split(m, n, k, cfg, out)
    grid = (triton.cdiv(m, cfg.block_m), triton.cdiv(n, cfg.block_n), splits)
    _int8_gemm_kernel[grid](x, words, scales, dst, m, n, k, x.stride(0), words.stride(0),
                            dst.stride(-2), per, m * n if splits > 1 else 0, **_meta(x, cfg, n))
    if splits > 1:
        _sum_splits(dst, out)
