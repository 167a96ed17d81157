"""GPTQ rounding of fp8 (e4m3) weights: each column's rounding error is carried onto the
columns not yet rounded, weighted by the inverse of the layer inputs' second moments, so the
layer's output error on inputs like the calibration ones shrinks (Frantar et al., 2022).

``gptq_fp8_per_channel(weight, hessian)`` takes the float ``[N, K]`` weight and
``H = E[x x^T]`` ``[K, K]`` of its inputs and returns the canonical fp8 layout (e4m3
``[N, K]``, float32 scales ``[N]``). The per-channel scale is ``max|W_row| / 448``, fixed before
the rounding (the later columns' updates may exceed it: they are clamped to +-448). Columns are
rounded in order, in blocks of 128 (lazy batch updates); the damping adds 1 % of H's mean
diagonal, and an input column that never moved (zero diagonal) is rounded with no update.

``engine.calibration`` collects H from the model's own samples and applies the result
(``--quantization fp8 --quantization-calibration gptq``).
"""

from __future__ import annotations

import torch

from fuselm.kernels.fp8_matmul import FP8_DTYPE, FP8_MAX, amax_scale

BLOCK = 128
DAMPING = 0.01


def _e4m3(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``w`` (one column, ``[N]``) divided by the row scales and rounded to e4m3."""
    return (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def _upper_inverse_factor(hessian: torch.Tensor) -> torch.Tensor:
    """The upper Cholesky factor of ``(H + damping)^-1`` (what the column updates read)."""
    h = hessian.clone()
    h.diagonal().add_(DAMPING * h.diagonal().mean().clamp(min=1e-12))
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)


def gptq_fp8_per_channel(weight: torch.Tensor, hessian: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Float ``[N, K]`` and its inputs' ``[K, K]`` second moments -> ``(weight e4m3fn [N, K],
    weight_scale float32 [N])`` rounded by GPTQ (module docstring); float64 math on the
    weight's device."""
    n, k = weight.shape
    if hessian.shape != (k, k):
        raise ValueError(f"gptq: the Hessian is {tuple(hessian.shape)}, the weight takes {k} "
                         "inputs")
    scale32 = amax_scale(weight.abs().amax(dim=1))
    scale = scale32.double()
    w = weight.double().clone()
    h = hessian.double().to(w.device)
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    hinv = _upper_inverse_factor(h)
    q = torch.empty(n, k, dtype=FP8_DTYPE, device=w.device)
    for c0 in range(0, k, BLOCK):
        c1 = min(c0 + BLOCK, k)
        block = w[:, c0:c1].clone()
        errors = torch.empty_like(block)
        hb = hinv[c0:c1, c0:c1]
        for i in range(c1 - c0):
            column = block[:, i]
            q[:, c0 + i] = _e4m3(column, scale)
            rounded = q[:, c0 + i].double() * scale
            err = (column - rounded) / hb[i, i]
            block[:, i:] -= err[:, None] * hb[i, i:][None, :]
            errors[:, i] = err
        w[:, c1:] -= errors @ hinv[c0:c1, c1:]
    return q, scale32
