"""RMSNorm (optionally after the residual add) fused with FP8 (e4m3fn) activation quantization.

``rms_norm_quant_fp8(x [M, H], weight [H], eps, residual=None, scale=None, group_size=0)`` ->
``(out_fp8 [M, H] float8_e4m3fn, out_scale float32)``:

- ``y = x / sqrt(mean(x**2, -1) + eps) * weight`` in float32 (not rounded to x's dtype before
  the quantization: one rounding, to fp8, instead of two);
- with ``residual`` ``[M, H]`` (x's dtype): in place ``residual += x`` first (the sum rounded to
  the dtype, as ``fused_add_rms_norm``), and the norm reads the sum; x is not modified;
- quantization: dynamic per token (``out_scale [M, 1] = max(max|y_row| / 448, FP8_MIN_SCALE)``),
  static per tensor with ``scale`` ``[1]`` (``out_scale`` is that scale, float32 ``[1]``), or
  dynamic per 1 x ``group_size`` group (``out_scale [M, ceil(H / group_size)]``, block FP8).

It replaces the norm + ``quant_fp8_*`` pair before a W8A8 linear layer (qkv after the input
norm, gate/up after the post-attention norm), so the activation is read once and written as one
byte per element.

Backends: ``rms_norm_quant_fp8_ref`` (the spec).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fuselm.kernels.fp8_matmul import (
    quant_fp8_per_token_group_ref,
    quant_fp8_per_token_ref,
    quant_fp8_static_ref,
)


def _check_args(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None,
                scale: torch.Tensor | None, group_size: int) -> None:
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [M, H], got shape {tuple(x.shape)}")
    hidden = x.shape[1]
    if weight.dim() != 1 or weight.shape[0] != hidden:
        raise ValueError(f"weight must be [{hidden}], got {tuple(weight.shape)}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"residual {tuple(residual.shape)} {residual.dtype} must match x "
                         f"{tuple(x.shape)} {x.dtype}")
    if group_size < 0:
        raise ValueError(f"group_size must be 0 (per token) or positive, got {group_size}")
    if scale is not None and (scale.numel() != 1 or group_size):
        raise ValueError("scale (static quantization) must hold one element and excludes "
                         f"group_size; got scale {tuple(scale.shape)}, group_size {group_size}")


def rms_norm_quant_fp8_ref(x: torch.Tensor, weight: torch.Tensor, eps: float,
                           residual: torch.Tensor | None = None,
                           scale: torch.Tensor | None = None, group_size: int = 0
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch spec (see the module docstring); mutates ``residual`` only."""
    _check_args(x, weight, residual, scale, group_size)
    src = x
    if residual is not None:
        residual.add_(x)
        src = residual
    y = F.rms_norm(src.float(), (src.shape[-1],), weight.float(), eps)
    if scale is not None:
        return quant_fp8_static_ref(y, scale), scale.float().reshape(1)
    if group_size:
        return quant_fp8_per_token_group_ref(y, group_size)
    return quant_fp8_per_token_ref(y)
