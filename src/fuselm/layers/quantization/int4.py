"""INT4 weight-only linear method (W4A16, groups of G input columns, integer zero points).

Canonical layout (QUANT_SPEC): ``qweight`` uint8 ``[N, K // 2]`` (column 2j in the low nibble
of byte j, 2j + 1 in the high one), ``scales`` ``[N, K // G]``, ``zeros`` uint8 ``[N, K // G]``;
``W[n, k] = (q[n, k] - zeros[n, k // G]) * scales[n, k // G]``. Per channel (``group_size``
None) is one group of the whole row: scales/zeros ``[N, 1]``, replicated over a row-parallel
split. Scales are stored in the model dtype (bf16 on a GPU: the bytes a decode step reads; the
kernels upcast them to fp32).

Online quantization (``--quantization int4``, G = 128): per group ``scale = (max - min) / 15``,
``zero = round(-min / scale)`` clamped to [0, 15], ``q = round(W / scale) + zero`` clamped to
[0, 15]; so |error| <= scale / 2 inside the group's range.

``apply`` runs the KernelSet's ``int4_matmul``; from ``layer.dense_from_m`` tokens on it
dequantizes and runs ``F.linear`` (the per-shape choice of the tuning table).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fuselm.kernels.int4_matmul import dequantize_int4_triton, int4_dequantize_ref
from fuselm.layers.quantization.base import (
    LinearMethod,
    ShardMeta,
    dense_from_tokens,
    new_param,
    replace_param,
    tensor_bytes,
)
from fuselm.layers.quantization.config import QuantizationConfig

INT4_MAX = 15
_MIN_SCALE = 1e-12


def quantize_int4(weight: torch.Tensor, group_size: int, scale_dtype: torch.dtype
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float ``[N, K]`` -> ``(qweight uint8 [N, K // 2], scales [N, K // G] scale_dtype,
    zeros uint8 [N, K // G])``, asymmetric per group (module docstring). The zero point and
    the rounding use the stored (scale_dtype) scale, so dequantization matches it."""
    n, k = weight.shape
    w = weight.float().reshape(n, k // group_size, group_size)
    lo = w.amin(dim=2).clamp(max=0.0)  # the range holds 0, so zero rows stay exact
    hi = w.amax(dim=2).clamp(min=0.0)
    scales = ((hi - lo) / INT4_MAX).clamp(min=_MIN_SCALE).to(scale_dtype)
    s = scales.float()
    zeros = torch.round(-lo / s).clamp(0, INT4_MAX)
    q = (torch.round(w / s[..., None]) + zeros[..., None]).clamp(0, INT4_MAX).to(torch.uint8)
    q = q.reshape(n, k)
    packed = q[:, 0::2] | (q[:, 1::2] << 4)
    return packed.contiguous(), scales, zeros.to(torch.uint8)


class Int4LinearMethod(LinearMethod):
    """W4A16 groups with zero points: online or pre-quantized (AWQ, GPTQ, compressed-tensors
    converted by ``loading.quant_formats``)."""

    def __init__(self, kernels, quant: QuantizationConfig) -> None:
        super().__init__(kernels)
        self.quant = quant
        self.online = quant.source == "online"
        self._matmul = kernels.op("int4_matmul")

    def _group(self, layer: nn.Module, k: int) -> int:
        group = self.quant.group_size or k
        if k % group:
            raise ValueError(
                f"int4 group size {group} does not divide the input width {k} of "
                f"{type(layer).__name__} (per tensor-parallel rank): use a group size that "
                "divides every layer's in_features / tp_size")
        return group

    def _meta(self, group: int, k: int) -> tuple[ShardMeta, ShardMeta]:
        """(qweight's, scales'/zeros') metadata; per channel: scales replicated along K."""
        if self.quant.group_size is None:
            return ShardMeta(input_pack=2, input_group=2), ShardMeta(input_dim=None)
        return (ShardMeta(input_pack=2, input_group=group),
                ShardMeta(input_pack=group, input_group=group))

    def create_weights(self, layer: nn.Module, in_per_partition: int, out_per_partition: int,
                       params_dtype: torch.dtype | None) -> None:
        """Online: a float ``weight``; pre-quantized: ``qweight``, ``scales``, ``zeros``
        (optional, 8, for symmetric formats)."""
        n, k = out_per_partition, in_per_partition
        group = self._group(layer, k)
        layer.group_size = group
        if self.online:
            new_param(layer, "weight", (n, k), params_dtype, ShardMeta())
        else:
            qmeta, gmeta = self._meta(group, k)
            new_param(layer, "qweight", (n, k // 2), torch.uint8, qmeta)
            new_param(layer, "scales", (n, k // group), params_dtype, gmeta)
            new_param(layer, "zeros", (n, k // group), torch.uint8, gmeta, fill=8,
                      optional=not self.quant.zero_point)
        layer.dense_from_m = dense_from_tokens(self.kernels, "int4_matmul", n, k)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Online: quantizes ``weight`` (groups of ``layer.group_size``) and drops it."""
        if not self.online:
            return
        weight = layer.weight.data
        packed, scales, zeros = quantize_int4(weight, layer.group_size, weight.dtype)
        del layer._parameters["weight"]
        qmeta, gmeta = self._meta(layer.group_size, weight.shape[1])
        replace_param(layer, "qweight", packed, qmeta)
        replace_param(layer, "scales", scales, gmeta)
        replace_param(layer, "zeros", zeros, gmeta)

    def apply(self, layer: nn.Module, x: torch.Tensor,
              bias: torch.Tensor | None) -> torch.Tensor:
        """``x [M, K]`` -> ``[M, N]`` in x's dtype."""
        dense_from = layer.dense_from_m
        if dense_from is not None and x.shape[0] >= dense_from:
            return F.linear(x, self.dense_weight(layer, x.dtype), bias)
        out = self._matmul.fn(x, layer.qweight, layer.scales, layer.zeros, layer.group_size)
        return out if bias is None else out + bias

    def dense_weight(self, layer: nn.Module, dtype: torch.dtype) -> torch.Tensor:
        """The layer's logical ``[N, K]`` weight in ``dtype``: one Triton kernel on a GPU (what
        the tuning table's ``dense_from_m`` measured), the reference elsewhere."""
        if layer.qweight.is_cuda:
            return dequantize_int4_triton(layer.qweight, layer.scales, layer.zeros,
                                          layer.group_size, dtype)
        return int4_dequantize_ref(layer.qweight, layer.scales, layer.zeros,
                                   layer.group_size).to(dtype)

    def weight_bytes(self, layer: nn.Module) -> int:
        """Packed nibbles + scales + zeros (+ bias)."""
        return tensor_bytes(layer.qweight, layer.scales, layer.zeros,
                            getattr(layer, "bias", None))

    def describe(self) -> str:
        """e.g. ``int4 g128 zp (w4a16)``."""
        group = f"g{self.quant.group_size}" if self.quant.group_size else "per-channel"
        return f"int4 {group}{' zp' if self.quant.zero_point else ''} (w4a16)"
