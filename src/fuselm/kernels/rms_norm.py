"""RMSNorm and fused residual-add + RMSNorm.

``rms_norm``: ``out = x / sqrt(mean(x**2, -1) + eps) * weight``; x ``[num_tokens, hidden]``
(any leading shape, last dim contiguous), weight ``[hidden]``; out has x's dtype.

``fused_add_rms_norm``: in place, ``residual += x`` then ``x = rms_norm(residual)``, both
``[num_tokens, hidden]`` of one dtype; the sum is rounded to that dtype before the norm, as an
unfused add followed by a norm would.

Backends: ``*_ref`` (the spec), ``*_triton`` (registered as the torch ops ``fuselm::rms_norm`` and
``fuselm::fused_add_rms_norm``), ``*_cuda`` (``fuselm_C::*`` from ``csrc/rms_norm.cu``; weight of
x's dtype). Launches are single kernels that neither synchronize nor allocate beyond the output.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from fuselm.kernels import _pdl, triton_utils
from fuselm.kernels.triton_utils import FUSELM_LIB, as_rows, next_power_of_2


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Plain PyTorch RMSNorm, computed in float32."""
    # F.rms_norm computes x * rsqrt(mean(x^2) + eps) * weight: the spec, in one call on CPU
    return F.rms_norm(x.float(), (x.shape[-1],), weight.float(), eps).to(x.dtype)


def fused_add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> None:
    """In place: ``residual += x``; ``x = rms_norm(residual)``."""
    residual.add_(x)
    x.copy_(rms_norm_ref(residual, weight, eps))


# --------------------------------------------------------------------------------------------
# Triton. One program normalises ROWS rows held in registers as one [ROWS, BLOCK] tile (fp32
# math, 16-byte vector loads when hidden % 8 == 0); rows wider than _MAX_ONE_PASS_BLOCK take two
# passes over column chunks (the second re-reads the row, mostly from L2).
# --------------------------------------------------------------------------------------------

_MAX_ONE_PASS_BLOCK = 16384  # fp32 row of 64 KB: 32 registers a thread at 16 warps
_CHUNK_BLOCK = 4096


class _NormConfig(NamedTuple):
    block: int  # columns a program handles at once (power of 2)
    rows: int  # rows per program (power of 2)
    num_warps: int
    one_pass: bool


def _norm_config(hidden: int, elem_size: int, num_rows: int, op: str, device: torch.device):
    """Launch config: heuristic, then the ``configs/<op>.json`` override for this GPU."""
    block = next_power_of_2(hidden)
    if block > _MAX_ONE_PASS_BLOCK:
        return _NormConfig(_CHUNK_BLOCK, 1, 8, False)
    rows = 1
    row_bytes = block * elem_size
    if num_rows >= 1024 and row_bytes < 8192:
        # small hidden (576 bf16 = 1.1 KB) with many tokens: 8 KB a program amortises the
        # per-program cost; with few tokens keep one row a program for parallelism.
        rows = min(8192 // row_bytes, 16)
    # about two 16-byte vectors per thread per input
    num_warps = max(1, min(16, rows * row_bytes // 1024))
    cfg = _NormConfig(block, rows, num_warps, True)
    if num_rows >= 1024 and device.type == "cuda":
        tuned = triton_utils.tuned_triton_config(op, f"h{hidden}", "cuda", device.index or 0)
        if tuned:
            cfg = cfg._replace(**{k: v for k, v in tuned.items() if k in ("rows", "num_warps")})
    return cfg


def _check_norm_args(x2: torch.Tensor, weight: torch.Tensor) -> None:
    hidden = x2.shape[-1]
    if weight.dim() != 1 or weight.shape[0] != hidden or weight.stride(0) != 1:
        raise ValueError(
            f"weight must be a contiguous [{hidden}] tensor, got {tuple(weight.shape)}"
        )
    if weight.device != x2.device:
        raise ValueError(f"weight on {weight.device} but x on {x2.device}")


if triton_utils.triton_available():
    import triton
    import triton.language as tl

    from fuselm.kernels._pdl import pdl_wait_then_release

    @triton.jit
    def _load_row(x_row, r_row, c, mask, ADD_RESIDUAL: tl.constexpr):
        """fp32 tile of x, or of x + residual rounded to the dtype (as an unfused add would
        store it) and stored back into residual."""
        xf = tl.load(x_row + c[None, :], mask=mask, other=0.0).to(tl.float32)
        if ADD_RESIDUAL:
            s = xf + tl.load(r_row + c[None, :], mask=mask, other=0.0).to(tl.float32)
            s = s.to(r_row.dtype.element_ty)
            tl.store(r_row + c[None, :], s, mask=mask)
            xf = s.to(tl.float32)
        return xf

    @triton.jit
    def _store_normed(o_row, w_ptr, xf, rstd, c, mask, col_mask):
        w = tl.load(w_ptr + c, mask=col_mask, other=0.0).to(tl.float32)
        y = xf * rstd[:, None] * w[None, :]
        tl.store(o_row + c[None, :], y.to(o_row.dtype.element_ty), mask=mask)

    @triton.jit
    def _rms_norm_kernel(
        x_ptr,  # [num_rows, hidden], rows x_stride apart; output too when ADD_RESIDUAL
        residual_ptr,  # [num_rows, hidden] (ADD_RESIDUAL only)
        w_ptr,  # [hidden]
        out_ptr,  # [num_rows, hidden]
        num_rows,
        hidden,
        x_stride,
        residual_stride,
        out_stride,
        eps,
        BLOCK: tl.constexpr,
        ROWS: tl.constexpr,
        ADD_RESIDUAL: tl.constexpr,
        ONE_PASS: tl.constexpr,
        NUM_CHUNKS: tl.constexpr,  # cdiv(hidden, BLOCK) when not ONE_PASS (loop count as a
        # constexpr: the interpreter cannot iterate over a runtime bound)
        USE_PDL: tl.constexpr = False,  # programmatic dependent launch (_pdl.py)
    ):
        pdl_wait_then_release(USE_PDL)
        rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
        row_mask = rows < num_rows
        cols = tl.arange(0, BLOCK)
        x_row = x_ptr + rows[:, None] * x_stride  # [ROWS, 1]
        r_row = residual_ptr + rows[:, None] * residual_stride
        o_row = out_ptr + rows[:, None] * out_stride
        if ONE_PASS:  # the row stays in registers between the reduction and the store
            col_mask = cols < hidden
            mask = row_mask[:, None] & col_mask[None, :]
            xf = _load_row(x_row, r_row, cols, mask, ADD_RESIDUAL)
            rstd = tl.rsqrt(tl.sum(xf * xf, axis=1) / hidden + eps)  # [ROWS]
            _store_normed(o_row, w_ptr, xf, rstd, cols, mask, col_mask)
        else:
            acc = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
            for chunk in range(NUM_CHUNKS):
                c = chunk * BLOCK + cols
                xf = _load_row(x_row, r_row, c, row_mask[:, None] & (c < hidden)[None, :],
                               ADD_RESIDUAL)  # fmt: skip
                acc += xf * xf
            rstd = tl.rsqrt(tl.sum(acc, axis=1) / hidden + eps)
            tl.debug_barrier()  # the residual stores above are read back below
            if ADD_RESIDUAL:
                src_row = r_row
            else:
                src_row = x_row
            for chunk in range(NUM_CHUNKS):
                c = chunk * BLOCK + cols
                mask = row_mask[:, None] & (c < hidden)[None, :]
                xf = tl.load(src_row + c[None, :], mask=mask, other=0.0).to(tl.float32)
                _store_normed(o_row, w_ptr, xf, rstd, c, mask, c < hidden)


def _launch_rms_norm(x2, residual2, weight, out2, eps: float, cfg: _NormConfig) -> None:
    """Launches ``_rms_norm_kernel`` with an explicit config (the benchmark sweeps configs)."""
    num_rows, hidden = x2.shape
    if num_rows == 0:
        return
    add = residual2 is not None
    res = residual2 if add else x2
    grid = (triton.cdiv(num_rows, cfg.rows),)
    _rms_norm_kernel[grid](
        x2, res, weight, out2, num_rows, hidden, x2.stride(0), res.stride(0), out2.stride(0), eps,
        BLOCK=cfg.block, ROWS=cfg.rows, ADD_RESIDUAL=add, ONE_PASS=cfg.one_pass,
        NUM_CHUNKS=1 if cfg.one_pass else triton.cdiv(hidden, cfg.block), num_warps=cfg.num_warps,
        **_pdl.launch_args(x2),
    )  # fmt: skip


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Triton RMSNorm; same contract as ``rms_norm_ref`` (output contiguous, x's dtype)."""
    x2 = as_rows(x, "x")
    _check_norm_args(x2, weight)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    out2 = out.view(-1, x.shape[-1])
    cfg = _norm_config(x2.shape[1], x.element_size(), x2.shape[0], "rms_norm", x.device)
    _launch_rms_norm(x2, None, weight, out2, eps, cfg)
    return out


def fused_add_rms_norm_triton(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> None:
    """Triton fused residual add + RMSNorm, in place; same contract as the reference."""
    x2, r2 = as_rows(x, "x"), as_rows(residual, "residual")
    _check_norm_args(x2, weight)
    if r2.shape != x2.shape or residual.dtype != x.dtype or residual.device != x.device:
        raise ValueError(
            f"residual {tuple(residual.shape)} {residual.dtype} must match x "
            f"{tuple(x.shape)} {x.dtype} on {x.device}"
        )
    cfg = _norm_config(x2.shape[1], x.element_size(), x2.shape[0], "fused_add_rms_norm", x.device)
    _launch_rms_norm(x2, r2, weight, x2, eps, cfg)


# --------------------------------------------------------------------------------------------
# CUDA: kernels in csrc/rms_norm.cu, registered as fuselm_C::rms_norm / fused_add_rms_norm.
# --------------------------------------------------------------------------------------------


def _check_cuda_weight(x2: torch.Tensor, weight: torch.Tensor) -> None:
    _check_norm_args(x2, weight)
    if weight.dtype != x2.dtype:
        raise ValueError(
            f"the cuda backend needs weight in x's dtype {x2.dtype}, not {weight.dtype}"
        )


def rms_norm_cuda(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """CUDA RMSNorm (``fuselm_C::rms_norm``); weight must have x's dtype."""
    x2 = as_rows(x, "x")
    _check_cuda_weight(x2, weight)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    torch.ops.fuselm_C.rms_norm(out.view(-1, x.shape[-1]), x2, weight, eps)
    return out


def fused_add_rms_norm_cuda(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> None:
    """CUDA fused residual add + RMSNorm, in place (``fuselm_C::fused_add_rms_norm``)."""
    x2 = as_rows(x, "x")
    _check_cuda_weight(x2, weight)
    torch.ops.fuselm_C.fused_add_rms_norm(x2, as_rows(residual, "residual"), weight, eps)


# --------------------------------------------------------------------------------------------
# Registration. fuselm::<op> wraps the Triton launcher so that torch.compile and CUDA graphs see
# one opaque op; the CUDA ops are torch ops already (fuselm_C::<op>), given fakes here.
# --------------------------------------------------------------------------------------------

FUSELM_LIB.define("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor")
FUSELM_LIB.define(
    "fused_add_rms_norm(Tensor(a!) x, Tensor(b!) residual, Tensor weight, float eps) -> ()"
)


@torch.library.register_fake("fuselm::rms_norm", lib=FUSELM_LIB)
def _rms_norm_fake(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.register_fake("fuselm::fused_add_rms_norm", lib=FUSELM_LIB)
def _fused_add_rms_norm_fake(x, residual, weight, eps) -> None:
    return None


if triton_utils.triton_available():
    for _key in triton_utils.triton_dispatch_keys():
        FUSELM_LIB.impl("rms_norm", rms_norm_triton, _key)
        FUSELM_LIB.impl("fused_add_rms_norm", fused_add_rms_norm_triton, _key)

