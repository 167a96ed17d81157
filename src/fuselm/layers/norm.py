"""RMSNorm layer; with a residual it runs the fused add + norm in place, and with ``reduce``
it first sums x over the tensor-parallel group (one kernel with the custom all-reduce)."""

from __future__ import annotations

import torch
from torch import nn

from fuselm.kernels._registry import select_preferred as select
from fuselm.kernels.rms_norm import fused_add_rms_norm_ref, rms_norm_ref
from fuselm.parallel import comm


class RMSNorm(nn.Module):
    """``weight * x / rms(x)``; the kernel backend is bound once by ``bind_kernels``."""

    def __init__(self, hidden_size: int, eps: float = 1e-6,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)
        self._norm = rms_norm_ref
        self._add_norm = fused_add_rms_norm_ref

    def bind_kernels(self, backend: str, device: torch.device, for_graphs: bool = False) -> None:
        """Chooses the norm implementations for ``device`` (eager steps or CUDA graphs)."""
        self._norm = select("rms_norm", backend, device, for_graphs=for_graphs)
        self._add_norm = select("fused_add_rms_norm", backend, device, for_graphs=for_graphs)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None, reduce: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Without residual: the normed x. With it: ``(norm(x + residual), x + residual)``,
        computed in place in residual (and in x, unless the all-reduce gives a new tensor);
        with ``reduce``, x is this rank's partial sum and the sum over the TP group is added."""
        if residual is None:
            return self._norm(x, self.weight, self.eps)
        if reduce:
            x = comm.tp_all_reduce_add_rms_norm(x, residual, self.weight, self.eps,
                                                self._add_norm)
            return x, residual
        self._add_norm(x, residual, self.weight, self.eps)
        return x, residual
