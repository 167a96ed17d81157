"""RMSNorm layer; with a residual it runs the fused add + norm in place, and with ``reduce``
it first sums x over the tensor-parallel group (one kernel with the custom all-reduce)."""

from __future__ import annotations

import torch
from torch import nn

from fuselm.kernels.kernel_set import KernelSet
from fuselm.parallel import comm


class RMSNorm(nn.Module):
    """``weight * x / rms(x)`` with the model's kernels (the reference ones by default)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, dtype: torch.dtype | None = None,
                 kernels: KernelSet | None = None) -> None:
        super().__init__()
        kernels = kernels or KernelSet()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)
        self._norm = kernels.op("rms_norm")
        self._add_norm = kernels.op("fused_add_rms_norm")

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None, reduce: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Without residual: the normed x. With it: ``(norm(x + residual), x + residual)``,
        computed in place in residual (and in x, unless the all-reduce gives a new tensor);
        with ``reduce``, x is this rank's partial sum and the sum over the TP group is added."""
        if residual is None:
            return self._norm.fn(x, self.weight, self.eps)
        if reduce:
            x = comm.tp_all_reduce_add_rms_norm(x, residual, self.weight, self.eps,
                                                self._add_norm.fn)
            return x, residual
        self._add_norm.fn(x, residual, self.weight, self.eps)
        return x, residual
