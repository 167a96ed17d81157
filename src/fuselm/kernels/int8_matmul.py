"""Weight-only INT8 matmul (W8A16): ``out = x @ (qweight * scales[:, None]).T``.

x ``[M, K]`` (fp16/bf16/fp32, last dim contiguous), qweight int8 ``[N, K]`` row-major (the
canonical layout of QUANT_SPEC.md, read as is), scales ``[N]`` (any float dtype; upcast to
fp32); out ``[M, N]`` in x's dtype. Accumulation in fp32; the per-channel scale multiplies the
finished dot product.

The Triton kernels read the weight as int32 words (word w = columns 4w..4w+3, byte i = column
4w + i) and make floats of bytes without int-to-float conversions (see int4_matmul.py):

- ``gemv`` (batch 1): byte b becomes ``f = 1.5 + b / 256`` (the byte in bits 15..22 of 1.0f,
  its sign bit flipped; one shift and one LOP3), and ``sum_k b x = 256 (sum f x - 1.5 sum x)``.
- ``gemm`` (larger M): the tensor-core kernel of ``_quant_gemm_triton.py``: a K step's words
  become the exact bytes in x's dtype in registers (PTX: the byte + 128 in the mantissa of
  2^23, minus 2^23 + 128), one ``tl.dot`` chain in fp32 over K, the scale on the finished sum;
  config mode bit 0 puts the batch on the MMA's M side (else swap-AB: the weight rows are M);
  ``split_k`` > 1 splits K over that many programs an output tile (fp32 partials, summed).
- ``dequant``: cuBLAS on the dequantized weight: for bf16 x the exact bytes, the scale on the
  output; else ``q * s`` in x's dtype (one Triton kernel).
- ``cuda_gemv`` (M <= 16, fp16/bf16 x, K % 64 == 0): the CUDA tensor-core GEMV of
  ``quant_gemv.py``; inputs it does not take run the Triton ``default_config``.

Variant and launch config per call from M: ``configs/int8_matmul.json`` (bucket
``n{N}_k{K}_m{1|4|16|64|256}``, written by ``python -m fuselm.bench.kernels_quant``), else
``default_config``; M 5..8 take the ``m4`` entry when it is ``cuda_gemv``. K not a multiple
of 16 runs ``dequant``.

Backends: ``int8_matmul_ref`` (float32 spec), ``int8_matmul_triton`` (``fuselm::int8_matmul``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from fuselm.kernels import _pdl, quant_gemv, triton_utils
from fuselm.kernels.triton_utils import FUSELM_LIB


def _check(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> None:
    if x.dim() != 2 or qweight.dim() != 2 or x.shape[1] != qweight.shape[1]:
        raise ValueError(f"int8_matmul needs x [M, K] and qweight [N, K], got {tuple(x.shape)} "
                         f"and {tuple(qweight.shape)}")
    if qweight.dtype != torch.int8:
        raise ValueError(f"int8_matmul qweight must be int8, got {qweight.dtype}")
    if scales.shape != (qweight.shape[0],) or not scales.is_floating_point():
        raise ValueError(f"int8_matmul scales must be float [{qweight.shape[0]}], got "
                         f"{scales.dtype} {tuple(scales.shape)}")


def int8_dequantize_ref(qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The logical weight ``[N, K]`` float32: ``qweight * scales[:, None]``."""
    return qweight.float() * scales.float()[:, None]


def int8_matmul_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch W8A16 matmul in float32; ``[M, N]`` in x's dtype. The per-channel scale is
    applied after the dot product (it is constant along K)."""
    _check(x, qweight, scales)
    return ((x.float() @ qweight.float().t()) * scales.float()[None, :]).to(x.dtype)


VARIANTS = ("gemv", "gemm", "dequant", "cuda_gemv")
M_BUCKETS = (1, 4, 16, 64, 256)


# --------------------------------------------------------------------------------------------
# Launch configs (shared with int4_matmul).
# --------------------------------------------------------------------------------------------


class QuantMatmulConfig(NamedTuple):
    """Variant and launch parameters of a weight-only matmul."""

    variant: str  # one of VARIANTS
    block_n: int  # output rows (weight rows) a program computes
    block_k: int  # K columns a loop iteration reads (a power of 2)
    num_warps: int
    num_stages: int = 1
    block_m: int = 16  # gemm: batch rows a program computes (>= 16)
    # cuda_gemv: block_n rows a block (16), num_warps split K, num_stages K steps a warp loads
    mode: int = 0  # gemv: bit 0 = x loaded as one vector a word and split in registers (XVEC),
    #               bit 1 = the next step's weights loaded before this step's math (NEXT);
    #               gemm: bit 0 = the batch is the MMA's M side (else swap-AB)
    split_k: int = 1  # gemm: programs sharing one output tile, each a contiguous run of K
    #                  steps into an fp32 partial; a second kernel sums them in order

    @property
    def label(self) -> str:
        """Stable name used by the sweep and the tuning table."""
        if self.variant == "dequant":
            return "dequant"
        m = f"_m{self.block_m}" if self.variant == "gemm" else ""
        mode = f"_x{self.mode}" if self.mode else ""
        split = f"_sk{self.split_k}" if self.split_k != 1 else ""
        return (f"{self.variant}{m}_n{self.block_n}_k{self.block_k}_w{self.num_warps}"
                f"_s{self.num_stages}{mode}{split}")

    @classmethod
    def from_dict(cls, d: dict) -> QuantMatmulConfig:
        """Reads the ``triton`` entry of a tuning table (ValueError on an unknown variant)."""
        if d.get("variant") not in VARIANTS:
            raise ValueError(f"unknown weight-only matmul variant {d.get('variant')!r}")
        return cls(str(d["variant"]), int(d.get("block_n", 0)), int(d.get("block_k", 0)),
                   int(d.get("num_warps", 4)), int(d.get("num_stages", 1)),
                   int(d.get("block_m", 16)), int(d.get("mode", 0)), int(d.get("split_k", 1)))

    def to_dict(self) -> dict:
        """The ``triton`` entry of the tuning table."""
        return self._asdict()


def m_bucket(m: int) -> int:
    """The tuning-table batch bucket of M: the smallest of ``M_BUCKETS`` >= M (256 beyond)."""
    return next((b for b in M_BUCKETS if m <= b), M_BUCKETS[-1])


def tuned(op: str, bucket: str, device: torch.device) -> QuantMatmulConfig | None:
    """The config the tuning table ``configs/<op>.json`` recorded for this GPU and bucket."""
    if device.type != "cuda":
        return None
    entry = triton_utils.tuned_triton_config(op, bucket, "cuda", device.index or 0)
    try:
        return QuantMatmulConfig.from_dict(entry) if entry else None
    except (KeyError, ValueError):  # a table from another version: keep the heuristic
        return None


def gemm_default(m: int, block_k: int) -> QuantMatmulConfig:
    """The swap-AB tensor-core kernel sized to the batch (shared by int4 and int8); small
    ``block_n`` so that N = 4096 still gives >= 2 programs an SM (H200: 132 SMs)."""
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64 if m <= 64 else 128
    block_n = 32 if m <= 64 else 64
    return QuantMatmulConfig("gemm", block_n, block_k, 2 if block_m <= 16 else 4, 3, block_m)


def pow2_divisor(n: int, limit: int) -> int:
    """The largest power of 2 dividing ``n``, at most ``limit``."""
    return min(n & -n, limit)


def shape_bucket(n: int, k: int, m: int) -> str:
    """Tuning-table key of an int8 weight shape and batch."""
    return f"n{n}_k{k}_m{m_bucket(m)}"


def small_m_cuda(m: int, k: int, step_cols: int, cuda: bool | None) -> bool:
    """Whether M <= 16 takes ``cuda_gemv`` by default (``cuda`` None: where the CUDA extension
    is already loaded; shared with int4_matmul)."""
    if m > quant_gemv.MAX_M or k % step_cols:
        return False
    return quant_gemv.available(build=False) if cuda is None else cuda


def default_config(n: int, k: int, m: int, cuda: bool | None = None) -> QuantMatmulConfig:
    """Heuristic config: ``cuda_gemv`` at M <= 16 (see ``small_m_cuda``); ``gemv`` at M = 1 (8
    rows over 4 warps, 1024 columns a step; the best of the H200 sweep on the qkv shape,
    9.6 us), else ``gemm``; ``dequant`` for K % 16 != 0."""
    if small_m_cuda(m, k, quant_gemv.INT8_STEP_COLS, cuda):
        block_n, warps, stages = quant_gemv.default_launch(n, k // quant_gemv.INT8_STEP_COLS, m)
        return QuantMatmulConfig("cuda_gemv", block_n, 0, warps, stages)
    if k % 16:
        return QuantMatmulConfig("dequant", 0, 0, 4)
    if m == 1:
        return QuantMatmulConfig("gemv", 8, 1024, 4, 1)
    return gemm_default(m, 64 if k % 64 == 0 else 16)


def valid_config(cfg: QuantMatmulConfig, k: int) -> bool:
    """Whether ``cfg`` can run K (words need K % 4; a gemm K step must divide K; ``split_k``
    > 1 only for ``gemm``; not swap-AB
    ``gemm`` with 128+ weight rows over 8+ warps and 128+ batch rows: on the H200 ``block_n
    128 block_k 64 8 warps block_m 128`` wrote garbage into half of the outputs, cause not
    found yet; the same with ``block_m 64`` was right)."""
    if cfg.split_k != 1 and (cfg.variant != "gemm" or cfg.split_k < 1):
        return False
    if cfg.variant == "cuda_gemv":
        return (k % quant_gemv.INT8_STEP_COLS == 0
                and quant_gemv.valid_launch(cfg.block_n, cfg.num_warps, cfg.num_stages)
                and quant_gemv.available())
    if cfg.variant == "gemv":
        return k % 16 == 0 and cfg.block_k >= 16
    if cfg.variant == "gemm":
        swap_two_groups = (not cfg.mode & 1 and cfg.block_n >= 128 and cfg.num_warps >= 8
                           and cfg.block_m >= 128)
        return (cfg.block_k >= 16 and k % cfg.block_k == 0 and cfg.block_m >= 16
                and not swap_two_groups)
    return cfg.variant == "dequant"


def config_for(n: int, k: int, m: int, device: torch.device) -> QuantMatmulConfig:
    """The tuned config of this shape and batch bucket, else ``default_config``."""
    cfg = tuned("int8_matmul", shape_bucket(n, k, m), device)
    # M 5..8 outside a CUDA GEMV of their own bucket take bucket m4's (it serves up to 8 rows)
    if 4 < m <= quant_gemv.STRIDED_MAX_M and (cfg is None or cfg.variant != "cuda_gemv"):
        small = tuned("int8_matmul", shape_bucket(n, k, 4), device)
        cfg = small if small is not None and small.variant == "cuda_gemv" else cfg
    if cfg is not None and valid_config(cfg, k):
        return cfg
    return default_config(n, k, m)


if triton_utils.triton_available():
    import triton
    import triton.language as tl

    from fuselm.kernels._pdl import pdl_wait_then_release

    if triton_utils.is_interpreting():
        triton_utils.patch_interpreter_range()  # the K loops have runtime bounds

    @triton.jit
    def _byte_fma_value(words, BYTE: tl.constexpr):
        """Byte BYTE of int32 words (signed b) as ``1.5 + b / 256``: the byte in bits 15..22,
        its top bit flipped (b + 128), under the exponent of 1.0f."""
        if BYTE <= 1:
            t = words << (15 - 8 * BYTE)
        else:
            t = words >> (8 * BYTE - 15)
        return ((t & 0x007F8000) ^ 0x3FC00000).to(tl.float32, bitcast=True)

    @triton.jit
    def _int8_gemv_words(qw_rows, rmask, w, KW, EVEN: tl.constexpr):
        """The words ``[BLOCK_N, BLOCK_KW]`` of one K step (weights only: safe before the PDL
        wait)."""
        if EVEN:
            return tl.load(qw_rows + w[None, :], eviction_policy="evict_first")
        return tl.load(qw_rows + w[None, :], mask=rmask[:, None] & (w < KW)[None, :], other=0,
                       eviction_policy="evict_first")

    @triton.jit
    def _int8_gemv_step(words, x_row, w, KW, EVEN_K: tl.constexpr, XVEC: tl.constexpr):
        """One K step's ``sum f x - 1.5 sum x`` (= ``sum b x / 256``) per word slot. XVEC: a
        word's 4 x values are one 8-byte load, split into planes in registers."""
        if XVEC:
            cols = (w * 4)[:, None] + tl.arange(0, 4)[None, :]
            if EVEN_K:
                x2 = tl.load(x_row + cols).to(tl.float32)
            else:
                x2 = tl.load(x_row + cols, mask=(w < KW)[:, None], other=0.0).to(tl.float32)
            ev, od = tl.split(tl.reshape(x2, (x2.shape[0], 2, 2)))  # x[2j], x[2j + 1]
            p0, p2 = tl.split(ev)
            p1, p3 = tl.split(od)
            acc = _byte_fma_value(words, 0) * p0[None, :]
            acc += _byte_fma_value(words, 1) * p1[None, :]
            acc += _byte_fma_value(words, 2) * p2[None, :]
            acc += _byte_fma_value(words, 3) * p3[None, :]
            xsum = (p0 + p1) + (p2 + p3)
        else:
            acc = tl.zeros(words.shape, dtype=tl.float32)
            xsum = tl.zeros(w.shape, dtype=tl.float32)
            for i in tl.static_range(4):
                if EVEN_K:
                    xi = tl.load(x_row + w * 4 + i).to(tl.float32)
                else:
                    xi = tl.load(x_row + w * 4 + i, mask=w < KW, other=0.0).to(tl.float32)
                acc += _byte_fma_value(words, i) * xi[None, :]
                xsum += xi
        return acc - 1.5 * xsum[None, :]

    @triton.jit
    def _int8_gemv_kernel(
        x_ptr,  # [M, K], rows x_stride apart
        qw_ptr,  # int32 [N, K // 4], rows qw_stride apart
        s_ptr,  # [N]
        out_ptr,  # [M, N], rows out_stride apart
        N,
        KW,  # K // 4
        x_stride,
        qw_stride,
        out_stride,
        BLOCK_N: tl.constexpr,
        BLOCK_KW: tl.constexpr,  # words an iteration
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
        kw = tl.arange(0, BLOCK_KW)
        qw_rows = qw_ptr + rows64[:, None] * qw_stride
        x_row = x_ptr + m * x_stride
        if NEXT:
            # register double buffering (see int4_matmul): the next step's words are in flight
            words = _int8_gemv_words(qw_rows, rmask, kw, KW, EVEN)
            pdl_wait_then_release(USE_PDL)
            acc = tl.zeros([BLOCK_N, BLOCK_KW], dtype=tl.float32)
            for w0 in tl.range(0, KW, BLOCK_KW):
                n_words = _int8_gemv_words(qw_rows, rmask, w0 + BLOCK_KW + kw, KW, False)
                acc += _int8_gemv_step(words, x_row, w0 + kw, KW, EVEN_K, XVEC)
                words = n_words
        else:
            if PREFETCH:
                words = _int8_gemv_words(qw_rows, rmask, kw, KW, EVEN)
                pdl_wait_then_release(USE_PDL)
                acc = _int8_gemv_step(words, x_row, kw, KW, EVEN_K, XVEC)
                start = BLOCK_KW
            else:
                pdl_wait_then_release(USE_PDL)
                acc = tl.zeros([BLOCK_N, BLOCK_KW], dtype=tl.float32)
                start = 0
            for w0 in tl.range(start, KW, BLOCK_KW, num_stages=NUM_STAGES):
                words = _int8_gemv_words(qw_rows, rmask, w0 + kw, KW, EVEN)
                acc += _int8_gemv_step(words, x_row, w0 + kw, KW, EVEN_K, XVEC)
        s = tl.load(s_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
        y = tl.sum(acc, axis=1) * (s * 256.0)
        dst = out_ptr + m * out_stride + rows
        if EVEN_N:
            tl.store(dst, y.to(out_ptr.dtype.element_ty))
        else:
            tl.store(dst, y.to(out_ptr.dtype.element_ty), mask=rmask)

    @triton.jit
    def _int8_dequant_kernel(
        qw_ptr,  # int8 [N, K], rows qw_stride apart
        s_ptr,  # [N]
        out_ptr,  # [N, K] contiguous
        N,
        K,
        qw_stride,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rows64 = rows.to(tl.int64)
        k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        mask = (rows < N)[:, None] & (k < K)[None, :]
        q = tl.load(qw_ptr + rows64[:, None] * qw_stride + k[None, :], mask=mask, other=0)
        s = tl.load(s_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)
        v = q.to(tl.float32) * s[:, None]
        tl.store(out_ptr + rows64[:, None] * K + k[None, :], v.to(out_ptr.dtype.element_ty),
                 mask=mask)


def dequantize_int8_triton(qweight: torch.Tensor, scales: torch.Tensor,
                           dtype: torch.dtype) -> torch.Tensor:
    """The logical weight ``[N, K]`` in ``dtype`` (one Triton kernel)."""
    n, k = qweight.shape
    out = torch.empty(n, k, dtype=dtype, device=qweight.device)
    grid = (triton.cdiv(n, 16), triton.cdiv(k, 256))
    _int8_dequant_kernel[grid](qweight, scales, out, n, k, qweight.stride(0), BLOCK_N=16,
                               BLOCK_K=256, num_warps=4)
    return out


def as_words(qweight: torch.Tensor, op: str) -> torch.Tensor:
    """A packed weight as int32 words ``[N, bytes // 4]`` (a view; ValueError if it can't be)."""
    if qweight.stride(1) != 1:
        raise ValueError(f"{op} qweight must be contiguous in its last dimension")
    try:
        return qweight.view(torch.int32)
    except RuntimeError as err:
        raise ValueError(f"{op} qweight {tuple(qweight.shape)} (row stride {qweight.stride(0)}) "
                         "cannot be read as int32 words: rows must be 4-byte aligned") from err


def launch_int8_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                       out: torch.Tensor, cfg: QuantMatmulConfig,
                       prefetch: bool | None = None) -> None:
    """Runs ``cfg``'s variant into ``out [M, N]`` with explicit meta-parameters (the bench
    sweeps them). ``prefetch`` (gemv; default: with PDL) loads the first weight step before
    waiting for the previous kernel. ValueError where ``cfg`` cannot run this K."""
    m, k = x.shape
    n = qweight.shape[0]
    if m == 0 or n == 0:
        return
    if not valid_config(cfg, k):
        raise ValueError(f"int8_matmul config {cfg.label} cannot run K={k}")
    pdl = _pdl.use_pdl(x)
    if cfg.variant == "cuda_gemv":
        if quant_gemv.launch_int8_gemv(x, qweight, scales, out, cfg.block_n, cfg.num_warps,
                                       cfg.num_stages, pdl):
            return
        cfg = default_config(n, k, m, cuda=False)  # fp32 x, M > 8, unaligned rows
    if cfg.variant == "dequant":
        if x.dtype == torch.bfloat16:
            # the bytes are exact in bf16, q * s is not (8 + 8 significant bits into 8): the
            # scaled weight put single near-zero outputs of the 8B shapes at M = 256 1.2% of the
            # output's std off (tests/kernels/test_int8_matmul.py, H200); scale the output
            torch.mm(x, qweight.to(torch.bfloat16).t(), out=out)
            out.mul_(scales)
        else:  # fp16 keeps 11 bits of q * s, and x @ q.T itself could overflow it
            torch.mm(x, dequantize_int8_triton(qweight, scales, x.dtype).t(), out=out)
        return
    words = as_words(qweight, "int8_matmul")
    kw = k // 4
    if cfg.variant == "gemv":
        bkw = max(1, cfg.block_k // 4)
        grid = (triton.cdiv(n, cfg.block_n), m)
        _int8_gemv_kernel[grid](
            x, words, scales, out, n, kw, x.stride(0), words.stride(0), out.stride(0),
            BLOCK_N=cfg.block_n, BLOCK_KW=bkw, EVEN_N=n % cfg.block_n == 0,
            EVEN_K=kw % bkw == 0, EVEN=n % cfg.block_n == 0 and kw % bkw == 0,
            NUM_STAGES=cfg.num_stages,
            PREFETCH=pdl if prefetch is None else prefetch, USE_PDL=pdl,
            XVEC=bool(cfg.mode & 1), NEXT=bool(cfg.mode & 2), num_warps=cfg.num_warps,
            launch_pdl=pdl)
        return
    from fuselm.kernels._quant_gemm_triton import int8_gemm

    int8_gemm(x, words, scales, out, cfg)


def int8_matmul_triton(x: torch.Tensor, qweight: torch.Tensor,
                       scales: torch.Tensor) -> torch.Tensor:
    """Triton W8A16 matmul; same contract as ``int8_matmul_ref``. The variant and config come
    from ``config_for`` (tuning table by batch bucket, else the heuristic)."""
    _check(x, qweight, scales)
    if x.stride(1) != 1 or qweight.stride(1) != 1:
        raise ValueError("int8_matmul x and qweight must be contiguous in their last dimension")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"int8_matmul x must be fp32, fp16 or bf16, got {x.dtype}")
    n, k = qweight.shape
    out = torch.empty((x.shape[0], n), dtype=x.dtype, device=x.device)
    launch_int8_matmul(x, qweight, scales, out, config_for(n, k, x.shape[0], x.device))
    return out


# --------------------------------------------------------------------------------------------
# Registration (see rms_norm.py).
# --------------------------------------------------------------------------------------------

FUSELM_LIB.define("int8_matmul(Tensor x, Tensor qweight, Tensor scales) -> Tensor")


@torch.library.register_fake("fuselm::int8_matmul", lib=FUSELM_LIB)
def _int8_matmul_fake(x: torch.Tensor, qweight: torch.Tensor,
                      scales: torch.Tensor) -> torch.Tensor:
    return x.new_empty((x.shape[0], qweight.shape[0]))


if triton_utils.triton_available():
    for _key in triton_utils.triton_dispatch_keys():
        FUSELM_LIB.impl("int8_matmul", int8_matmul_triton, _key)
