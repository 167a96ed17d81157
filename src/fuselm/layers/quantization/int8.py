"""INT8 weight-only linear method (W8A16, per output channel, symmetric).

Canonical layout: ``qweight`` int8 ``[N, K]``, ``scales`` float32 ``[N]``;
``W = qweight * scales[:, None]``. Online quantization of a float weight (``--quantization
int8``, and the 8-bit LM head of int8/int4): ``scales = max|W_row| / 127``,
``qweight = round(W / scales)`` clamped to [-127, 127] (|error| <= scales / 2 per element).

``apply`` runs the ``int8_matmul`` op of the model's KernelSet; from ``layer.dense_from_m``
tokens on (the tuning table's per-shape choice, ``base.dense_from_tokens``) it dequantizes to x's
dtype and runs ``F.linear``, where that measured faster.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fuselm.kernels.int8_matmul import dequantize_int8_triton, int8_dequantize_ref
from fuselm.layers.quantization.base import (
    LinearMethod,
    ShardMeta,
    dense_from_tokens,
    new_param,
    replace_param,
    tensor_bytes,
)
from fuselm.layers.quantization.config import QuantizationConfig

INT8_MAX = 127.0
_MIN_SCALE = 1e-12  # an all-zero row (vocabulary padding) keeps scale > 0


def quantize_int8_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float ``[N, K]`` -> ``(qweight int8 [N, K], scales float32 [N])``, symmetric per row."""
    w = weight.float()
    scales = (w.abs().amax(dim=1) / INT8_MAX).clamp(min=_MIN_SCALE)
    q = torch.round(w / scales[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q.contiguous(), scales


class Int8LinearMethod(LinearMethod):
    """W8A16 per channel: online (a float weight quantized after loading) or pre-quantized."""

    def __init__(self, kernels, quant: QuantizationConfig) -> None:
        super().__init__(kernels)
        self.quant = quant
        self.online = quant.source == "online"
        self._matmul = kernels.op("int8_matmul")

    def create_weights(self, layer: nn.Module, in_per_partition: int, out_per_partition: int,
                       params_dtype: torch.dtype | None) -> None:
        """Online: a float ``weight``; pre-quantized: ``qweight`` and ``scales``."""
        n, k = out_per_partition, in_per_partition
        if self.online:
            new_param(layer, "weight", (n, k), params_dtype, ShardMeta())
        else:
            new_param(layer, "qweight", (n, k), torch.int8, ShardMeta())
            new_param(layer, "scales", (n,), torch.float32, ShardMeta(input_dim=None))
        layer.dense_from_m = dense_from_tokens(self.kernels, "int8_matmul", n, k)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Online: quantizes ``weight`` into ``qweight``/``scales`` and drops it."""
        if not self.online:
            return
        q, scales = quantize_int8_per_channel(layer.weight.data)
        del layer._parameters["weight"]
        replace_param(layer, "qweight", q, ShardMeta())
        replace_param(layer, "scales", scales, ShardMeta(input_dim=None))

    def apply(self, layer: nn.Module, x: torch.Tensor,
              bias: torch.Tensor | None) -> torch.Tensor:
        """``x [M, K]`` -> ``[M, N]`` in x's dtype."""
        dense_from = layer.dense_from_m
        if dense_from is not None and x.shape[0] >= dense_from:
            return F.linear(x, self.dense_weight(layer, x.dtype), bias)
        out = self._matmul.fn(x, layer.qweight, layer.scales)
        return out if bias is None else out + bias

    def dense_weight(self, layer: nn.Module, dtype: torch.dtype) -> torch.Tensor:
        """The layer's logical ``[N, K]`` weight in ``dtype``: one Triton kernel on a GPU (what
        the tuning table's ``dense_from_m`` measured), the reference elsewhere."""
        if layer.qweight.is_cuda:
            return dequantize_int8_triton(layer.qweight, layer.scales, dtype)
        return int8_dequantize_ref(layer.qweight, layer.scales).to(dtype)

    def weight_bytes(self, layer: nn.Module) -> int:
        """qweight + scales (+ bias)."""
        return tensor_bytes(layer.qweight, layer.scales, getattr(layer, "bias", None))

    def describe(self) -> str:
        """``int8 per-channel (w8a16)``."""
        return "int8 per-channel (w8a16)"
