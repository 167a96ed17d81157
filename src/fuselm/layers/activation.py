"""SiLU-and-mul activation of the gated MLP."""

from __future__ import annotations

import torch
from torch import nn

from fuselm.kernels.kernel_set import KernelSet


class SiluAndMul(nn.Module):
    """x ``[num_tokens, 2 * d]`` -> ``silu(x[:, :d]) * x[:, d:]``."""

    def __init__(self, kernels: KernelSet | None = None) -> None:
        super().__init__()
        self._op = (kernels or KernelSet()).op("silu_and_mul")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Applies the gate."""
        return self._op.fn(x)
