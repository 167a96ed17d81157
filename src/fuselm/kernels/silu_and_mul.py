"""SwiGLU gate: ``out = silu(x[..., :d]) * x[..., d:]`` for x ``[num_tokens, 2 * d]``.

x's rows may be strided (last dim contiguous); out is a new contiguous ``[..., d]`` of x's dtype.
Backends: ``silu_and_mul_ref`` (the spec), ``silu_and_mul_triton`` (the torch op
``fuselm::silu_and_mul``), ``silu_and_mul_cuda`` (``fuselm_C::silu_and_mul``,
``csrc/silu_and_mul.cu``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from fuselm.kernels import _pdl, triton_utils
from fuselm.kernels.triton_utils import FUSELM_LIB, as_rows, next_power_of_2


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch SiLU-and-mul, computed in float32; returns ``[..., d]`` in x's dtype."""
    d = x.shape[-1] // 2
    xf = x.float()
    return (F.silu(xf[..., :d]) * xf[..., d:]).to(x.dtype)


# --------------------------------------------------------------------------------------------
# Triton. Three launch shapes of the same streaming op (every byte moves once, fp32 math); the
# bench sweeps all three and ``configs/silu_and_mul.json`` names the fastest per d:
#   "2d":   grid (rows, column tiles); a program does one BLOCK-wide tile of one row.
#   "rows": 1-D grid, column tiles fastest; a program does a [ROWS, BLOCK] tile. Programs that
#           run together touch neighbouring bytes (as "flat"), with no per-element division.
#   "flat": 1-D grid over the num_rows * d outputs, BLOCK a program (TorchInductor's shape);
#           d is a compile-time constant (one compile per d), so ``idx // d`` is a
#           multiply-shift, done once per 16-byte pack (PTX for sm_90, bf16, d 14336, BLOCK
#           1024: one mul.hi a thread, v4 loads and stores; a runtime d costs a division).
# --------------------------------------------------------------------------------------------

SILU_VARIANTS = ("2d", "rows", "flat")
_INT32_LIMIT = 2**31


class SiluConfig(NamedTuple):
    variant: str  # one of SILU_VARIANTS
    block: int  # columns ("2d", "rows") or output elements ("flat") a program handles (power of 2)
    num_warps: int
    rows: int = 1  # rows a program ("rows" only; power of 2)


def silu_config(d: int, elem_size: int, num_rows: int, device: torch.device) -> SiluConfig:
    """Launch config: the "2d" tile that wastes fewest masked lanes, ~2 vectors a thread; then
    the ``configs/silu_and_mul.json`` entry for this GPU and d (a missing variant means "2d")."""
    if d <= 512:
        block = next_power_of_2(d)
    else:
        # ties go to the larger tile: 1536 -> 512 (3 full tiles), 14336 -> 2048 (7 tiles)
        block = min((2048, 1024, 512), key=lambda b: (-(-d // b) * b - d, -b))
    num_warps = max(1, min(16, block * elem_size // 1024))
    cfg = SiluConfig("2d", block, num_warps)
    if num_rows >= 1024 and device.type == "cuda":
        tuned = triton_utils.tuned_triton_config(
            "silu_and_mul", f"d{d}", "cuda", device.index or 0
        )
        if tuned.get("variant", "2d") in SILU_VARIANTS:  # an unknown variant: keep the heuristic
            cfg = cfg._replace(**{k: v for k, v in tuned.items() if k in SiluConfig._fields})
    return cfg


if triton_utils.triton_available():
    import triton
    import triton.language as tl

    from fuselm.kernels._pdl import pdl_wait_then_release

    @triton.jit
    def _silu_and_mul_kernel(
        x_ptr,  # [num_rows, 2 * d], rows x_stride apart
        out_ptr,  # [num_rows, d]
        d,
        x_stride,
        out_stride,
        BLOCK: tl.constexpr,
        USE_PDL: tl.constexpr = False,  # programmatic dependent launch (_pdl.py)
    ):
        pdl_wait_then_release(USE_PDL)
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < d
        x_row = x_ptr + row * x_stride
        g = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(x_row + d + cols, mask=mask, other=0.0).to(tl.float32)
        y = g * tl.sigmoid(g) * u
        tl.store(out_ptr + row * out_stride + cols, y.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _silu_and_mul_rows_kernel(
        x_ptr,  # [num_rows, 2 * d], rows x_stride apart
        out_ptr,  # [num_rows, d]
        num_rows,
        d,
        x_stride,
        out_stride,
        num_tiles,  # cdiv(d, BLOCK)
        BLOCK: tl.constexpr,
        ROWS: tl.constexpr,
        USE_PDL: tl.constexpr = False,  # programmatic dependent launch (_pdl.py)
    ):
        pdl_wait_then_release(USE_PDL)
        pid = tl.program_id(0)
        rows = (pid // num_tiles).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # one scalar division
        cols = (pid % num_tiles) * BLOCK + tl.arange(0, BLOCK)
        mask = (rows[:, None] < num_rows) & (cols[None, :] < d)  # [ROWS, BLOCK]
        x_tile = x_ptr + rows[:, None] * x_stride + cols[None, :]
        g = tl.load(x_tile, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(x_tile + d, mask=mask, other=0.0).to(tl.float32)
        y = g * tl.sigmoid(g) * u
        out_tile = out_ptr + rows[:, None] * out_stride + cols[None, :]
        tl.store(out_tile, y.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _silu_and_mul_flat_kernel(
        x_ptr,  # [num_rows, 2 * d], rows x_stride apart
        out_ptr,  # [num_rows, d]
        num_out,  # num_rows * d
        x_stride,
        out_stride,
        D: tl.constexpr,  # d: a constant divisor (multiply-shift), and its divisibility is known
        BLOCK: tl.constexpr,
        WIDE: tl.constexpr,  # int64 indices (some offset reaches 2**31)
        USE_PDL: tl.constexpr = False,  # programmatic dependent launch (_pdl.py)
    ):
        pdl_wait_then_release(USE_PDL)
        if WIDE:
            start = tl.program_id(0).to(tl.int64) * BLOCK
        else:
            start = tl.program_id(0) * BLOCK
        idx = start + tl.arange(0, BLOCK)
        mask = idx < num_out
        row = idx // D
        col = idx % D
        x_el = x_ptr + row * x_stride + col
        g = tl.load(x_el, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(x_el + D, mask=mask, other=0.0).to(tl.float32)
        y = g * tl.sigmoid(g) * u
        tl.store(out_ptr + row * out_stride + col, y.to(out_ptr.dtype.element_ty), mask=mask)


def _launch_flat(x2: torch.Tensor, out2: torch.Tensor, cfg: SiluConfig, wide: bool) -> None:
    """``_silu_and_mul_flat_kernel``; ``wide`` selects int64 indices (tests force it)."""
    num_rows, d = out2.shape
    grid = (triton.cdiv(num_rows * d, cfg.block),)
    _silu_and_mul_flat_kernel[grid](
        x2, out2, num_rows * d, x2.stride(0), out2.stride(0),
        D=d, BLOCK=cfg.block, WIDE=wide, num_warps=cfg.num_warps,
        **_pdl.launch_args(x2),
    )  # fmt: skip


def _launch_silu_and_mul(x2: torch.Tensor, out2: torch.Tensor, cfg: SiluConfig) -> None:
    """Launches the kernel of ``cfg.variant`` with explicit meta-parameters (the bench sweeps
    them). x2 ``[num_rows, 2 * d]`` (rows strided), out2 ``[num_rows, d]``; writes out2."""
    num_rows, d = out2.shape
    if cfg.variant not in SILU_VARIANTS:
        raise ValueError(f"unknown silu_and_mul variant {cfg.variant!r}, not in {SILU_VARIANTS}")
    if num_rows == 0 or d == 0:
        return
    if cfg.variant == "flat":
        span = num_rows * max(x2.stride(0), 2 * d, out2.stride(0))
        _launch_flat(x2, out2, cfg, wide=span >= _INT32_LIMIT)
    elif cfg.variant == "rows":
        num_tiles = triton.cdiv(d, cfg.block)
        grid = (triton.cdiv(num_rows, cfg.rows) * num_tiles,)
        _silu_and_mul_rows_kernel[grid](
            x2, out2, num_rows, d, x2.stride(0), out2.stride(0), num_tiles,
            BLOCK=cfg.block, ROWS=cfg.rows, num_warps=cfg.num_warps,
            **_pdl.launch_args(x2),
        )  # fmt: skip
    else:
        grid = (num_rows, triton.cdiv(d, cfg.block))
        _silu_and_mul_kernel[grid](
            x2, out2, d, x2.stride(0), out2.stride(0), BLOCK=cfg.block, num_warps=cfg.num_warps,
            **_pdl.launch_args(x2),
        )


def _silu_out(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x2 = as_rows(x, "x")
    if x.shape[-1] % 2:
        raise ValueError(f"silu_and_mul needs an even last dimension, got {x.shape[-1]}")
    d = x.shape[-1] // 2
    out = torch.empty((*x.shape[:-1], d), dtype=x.dtype, device=x.device)
    return x2, out, out.view(-1, d)


def silu_and_mul_triton(x: torch.Tensor) -> torch.Tensor:
    """Triton SiLU-and-mul; same contract as ``silu_and_mul_ref`` (output contiguous)."""
    x2, out, out2 = _silu_out(x)
    cfg = silu_config(out2.shape[1], x.element_size(), x2.shape[0], x.device)
    _launch_silu_and_mul(x2, out2, cfg)
    return out


# --------------------------------------------------------------------------------------------
# CUDA: csrc/silu_and_mul.cu, registered as fuselm_C::silu_and_mul.
# --------------------------------------------------------------------------------------------


def silu_and_mul_cuda(x: torch.Tensor) -> torch.Tensor:
    """CUDA SiLU-and-mul (``fuselm_C::silu_and_mul``)."""
    x2, out, out2 = _silu_out(x)
    torch.ops.fuselm_C.silu_and_mul(out2, x2)
    return out


# --------------------------------------------------------------------------------------------
# Registration (see rms_norm.py).
# --------------------------------------------------------------------------------------------

FUSELM_LIB.define("silu_and_mul(Tensor x) -> Tensor")


@torch.library.register_fake("fuselm::silu_and_mul", lib=FUSELM_LIB)
def _silu_and_mul_fake(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))


if triton_utils.triton_available():
    for _key in triton_utils.triton_dispatch_keys():
        FUSELM_LIB.impl("silu_and_mul", silu_and_mul_triton, _key)

