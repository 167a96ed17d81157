"""SiLU-and-mul activation of the gated MLP."""

from __future__ import annotations

import torch
from torch import nn

from fuselm.kernels._registry import select_preferred as select
from fuselm.kernels.silu_and_mul import silu_and_mul_ref


class SiluAndMul(nn.Module):
    """x ``[num_tokens, 2 * d]`` -> ``silu(x[:, :d]) * x[:, d:]``."""

    def __init__(self) -> None:
        super().__init__()
        self._op = silu_and_mul_ref

    def bind_kernels(self, backend: str, device: torch.device, for_graphs: bool = False) -> None:
        """Chooses the implementation for ``device`` (eager steps or CUDA graphs)."""
        self._op = select("silu_and_mul", backend, device, for_graphs=for_graphs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Applies the gate."""
        return self._op(x)
