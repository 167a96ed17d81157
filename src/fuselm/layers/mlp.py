"""The gated MLP of Llama-family decoders: ``down(silu(gate(x)) * up(x))``.

Gate and up are one column-parallel GEMM; under tensor parallelism the down projection leaves
its partial sum unreduced (the norm after it takes the all-reduce). A single row (batch-1
decode) runs the gate/up projection and the activation as one weight-streaming kernel where the
model's ``KernelSet`` chose ``gemv_silu_mul`` (measured faster for the weight shape) and the
gate/up layer is dense (a quantized one runs its own method, then the activation).
"""

from __future__ import annotations

import torch
from torch import nn

from fuselm.kernels.kernel_set import KernelChoice, KernelSet
from fuselm.layers.activation import SiluAndMul
from fuselm.layers.linear import MergedColumnParallelLinear, RowParallelLinear
from fuselm.layers.quantization import linear_method
from fuselm.layers.quantization.config import QuantizationConfig


class GatedMLP(nn.Module):
    """x ``[T, hidden_size]`` -> this rank's partial sum ``[T, hidden_size]``."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False,
                 kernels: KernelSet | None = None, quant: QuantizationConfig | None = None,
                 prefix: str = "mlp") -> None:
        super().__init__()
        kernels = kernels or KernelSet()
        gate_up = linear_method(quant, kernels, (f"{prefix}.gate_proj", f"{prefix}.up_proj"))
        self.gate_up_proj = MergedColumnParallelLinear(
            hidden_size, [intermediate_size, intermediate_size], bias=bias, kernels=kernels,
            method=gate_up)
        self.act_fn = SiluAndMul(kernels)
        self.down_proj = RowParallelLinear(
            intermediate_size, hidden_size, bias=bias, reduce_results=False, kernels=kernels,
            method=linear_method(quant, kernels, (f"{prefix}.down_proj",)))
        if gate_up.is_dense:
            self.gate_up_act = kernels.gemv_silu_mul(self.gate_up_proj.out_features,
                                                     hidden_size)
        else:  # the fused kernel reads a dense weight
            self.gate_up_act = KernelChoice("gemv_silu_mul", "none", None, None, "unfused",
                                            "unfused")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Runs the MLP; one contiguous row takes the fused batch-1 kernel when chosen."""
        fused = self.gate_up_act.fn
        if fused is not None and x.dim() == 2 and x.shape[0] == 1 and x.stride(1) == 1:
            return self.down_proj(fused(x, self.gate_up_proj.weight, self.gate_up_proj.bias))
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))
