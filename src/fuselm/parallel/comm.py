"""Collectives of the tensor-parallel group; identity when tp_size is 1.

Small CUDA all-reduces go through ``custom_all_reduce`` (one-shot over peer-mapped memory, fused
with the residual add + RMSNorm that follows a row-parallel layer) when installed; everything else
through torch.distributed (NCCL on GPU, gloo on CPU).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from fuselm.parallel import parallel_state as ps


def tp_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sums x over the tensor-parallel group; returns the sum (x itself, or a new tensor when
    the one-shot custom all-reduce takes a small CUDA message)."""
    if ps.get_tp_size() == 1:
        return x
    custom = ps.get_custom_all_reduce()
    if custom is not None and custom.should_use(x):
        return custom.all_reduce(x)
    dist.all_reduce(x, group=ps.get_tp_group())
    return x


def tp_all_reduce_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
    add_norm: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], None],
) -> torch.Tensor:
    """Sums x over the tensor-parallel group, then ``add_norm(sum, residual, weight, eps)``
    (in place: ``residual += sum``, ``sum = rms_norm(residual)``); returns the normed tensor.
    One kernel when the custom all-reduce takes x, else the all-reduce and then ``add_norm``."""
    custom = ps.get_custom_all_reduce() if ps.get_tp_size() > 1 else None
    if custom is not None and custom.should_use(x) and residual.is_contiguous():
        custom.all_reduce_add_rms_norm(x, residual, weight, eps)
        return x
    x = tp_all_reduce(x)
    add_norm(x, residual, weight, eps)
    return x


def tp_all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Concatenates x from every tensor-parallel rank along ``dim``."""
    size = ps.get_tp_size()
    if size == 1:
        return x
    d = dim % x.dim()
    # One output buffer (rank-major along dim 0), no list of parts to copy out and concatenate:
    # for a batch-1 row of logits the result is a view of it.
    out = x.new_empty((size * x.shape[0], *x.shape[1:]))
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, x.contiguous(), group=ps.get_tp_group())
    return out.view(size, *x.shape).movedim(0, d).flatten(d, d + 1)
