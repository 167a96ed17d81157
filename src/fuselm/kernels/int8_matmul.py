"""Weight-only INT8 matmul (W8A16): ``out = x @ (qweight * scales[:, None]).T``.

x ``[M, K]`` (fp16/bf16/fp32, last dim contiguous), qweight int8 ``[N, K]`` row-major (the
canonical layout of QUANT_SPEC.md), scales ``[N]`` (any float dtype; upcast to fp32);
out ``[M, N]`` in x's dtype. Accumulation in fp32.

Backends: ``int8_matmul_ref`` (float32 spec).
"""

from __future__ import annotations

import torch


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
