"""The gated MLP of Llama-family decoders: ``down(silu(gate(x)) * up(x))``.

Gate and up are one column-parallel GEMM; under tensor parallelism the down projection leaves
its partial sum unreduced (the norm after it takes the all-reduce). A single row (batch-1
decode) runs the gate/up projection and the activation as one weight-streaming kernel where the
model's ``KernelSet`` chose ``gemv_silu_mul`` (measured faster for the weight shape).
"""

from __future__ import annotations

import torch
from torch import nn

from fuselm.kernels.kernel_set import KernelSet
from fuselm.layers.activation import SiluAndMul
from fuselm.layers.linear import MergedColumnParallelLinear, RowParallelLinear


class GatedMLP(nn.Module):
    """x ``[T, hidden_size]`` -> this rank's partial sum ``[T, hidden_size]``."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False,
                 kernels: KernelSet | None = None) -> None:
        super().__init__()
        kernels = kernels or KernelSet()
        self.gate_up_proj = MergedColumnParallelLinear(
            hidden_size, [intermediate_size, intermediate_size], bias=bias, kernels=kernels)
        self.act_fn = SiluAndMul(kernels)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias=bias,
                                           reduce_results=False, kernels=kernels)
        self.gate_up_act = kernels.gemv_silu_mul(self.gate_up_proj.out_features, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Runs the MLP; one contiguous row takes the fused batch-1 kernel when chosen."""
        fused = self.gate_up_act.fn
        if fused is not None and x.dim() == 2 and x.shape[0] == 1 and x.stride(1) == 1:
            return self.down_proj(fused(x, self.gate_up_proj.weight, self.gate_up_proj.bias))
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))
