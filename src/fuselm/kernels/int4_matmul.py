"""Weight-only INT4 matmul (W4A16, group-wise asymmetric): ``out = x @ W.T`` with
``W[n, k] = (q[n, k] - zeros[n, k // G]) * scales[n, k // G]``.

Canonical layout (QUANT_SPEC.md): qweight uint8 ``[N, K // 2]``, byte j of row n holds column
2j in its low nibble and column 2j + 1 in its high nibble; scales float ``[N, K // G]`` (upcast
to fp32); zeros uint8 ``[N, K // G]`` (0..15; symmetric formats use 8). G = group_size, an even
divisor of K. x ``[M, K]`` (fp16/bf16/fp32, last dim contiguous); out ``[M, N]`` in x's dtype,
accumulated in fp32.

Backends: ``int4_matmul_ref`` (float32 spec).
"""

from __future__ import annotations

import torch


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
