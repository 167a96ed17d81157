"""The float linear method: ``weight [N, K]`` in the model dtype, ``x W^T + bias``.

A single contiguous row (batch-1 decode) goes through the bound matrix-vector kernel when the
model's KernelSet chose one for the weight shape (``KernelSet.gemv``: measured faster than
cuBLAS), else ``F.linear`` (cuBLAS on a GPU). ``apply`` is the whole per-call cost beyond the
layer's ``forward``: one attribute read and one shape test, as before the linear-method seam.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fuselm.layers.quantization.base import LinearMethod, ShardMeta, new_param, tensor_bytes


class DenseLinearMethod(LinearMethod):
    """Unquantized weights (bf16/fp16/fp32)."""

    is_dense = True

    def create_weights(self, layer: nn.Module, in_per_partition: int, out_per_partition: int,
                       params_dtype: torch.dtype | None) -> None:
        """Registers ``weight [out_per_partition, in_per_partition]`` and binds the batch-1
        kernel choice as ``layer.gemv``."""
        new_param(layer, "weight", (out_per_partition, in_per_partition), params_dtype,
                  ShardMeta())
        layer.gemv = self.kernels.gemv(out_per_partition, in_per_partition)  # None: F.linear

    def apply(self, layer: nn.Module, x: torch.Tensor,
              bias: torch.Tensor | None) -> torch.Tensor:
        """``x [M, K]`` -> ``[M, N]``; the gemv kernel for one contiguous row when bound."""
        gemv = layer.gemv.fn
        if gemv is not None and x.shape[0] == 1 and x.dim() == 2 and x.stride(1) == 1:
            return gemv(x, layer.weight, bias, False)
        return F.linear(x, layer.weight, bias)

    def weight_bytes(self, layer: nn.Module) -> int:
        """The weight and the bias."""
        return tensor_bytes(layer.weight, getattr(layer, "bias", None))

    def describe(self) -> str:
        """``dense``."""
        return "dense"
