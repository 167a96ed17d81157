"""FP8 checkpoints of ``quant_method: fp8`` (transformers' fine-grained FP8, DeepSeek-V3 and
Qwen3 FP8 releases; vLLM's serialized per-tensor FP8).

Block-wise (``weight_block_size: [128, 128]``), per linear of logical weight ``[N, K]``:

- ``weight`` float8_e4m3fn ``[N, K]``;
- ``weight_scale_inv`` float32 ``[ceil(N / 128), ceil(K / 128)]``: despite its name the factor
  that *multiplies* the block: ``W[n, k] = weight[n, k] * weight_scale_inv[n // 128, k // 128]``.
  Activations are quantized per token and 128-column group at run time (dynamic only).

Per tensor (no ``weight_block_size``): ``weight`` fp8 ``[N, K]``, ``weight_scale`` float32 ``[]``
or ``[1]`` (``W = weight * weight_scale``), and with ``activation_scheme: static`` an
``input_scale`` ``[]``/``[1]``.

Canonical: ``weight`` fp8 ``[N, K]``, ``weight_scale`` float32 (block grid, or ``[1]`` per
tensor, broadcast by the loader into merged layers), ``input_scale`` float32 ``[1]``.
"""

from __future__ import annotations

from typing import Any

import torch

from fuselm.errors import CheckpointError, UnsupportedModelError
from fuselm.layers.quantization.config import QuantizationConfig
from fuselm.loading.quant_formats._packing import check_dtype

BLOCK_REQUIRED = ("weight", "weight_scale_inv")
TENSOR_REQUIRED = ("weight", "weight_scale")
OPTIONAL = ("input_scale", "bias")


def check_config(quant: dict[str, Any]) -> None:
    """Refuses fp8 settings the conversion does not implement, naming the field."""
    block = quant.get("weight_block_size")
    if block is not None and quant.get("activation_scheme", "dynamic") != "dynamic":
        raise UnsupportedModelError("fp8 quantization_config weight_block_size with "
                                    f"activation_scheme {quant.get('activation_scheme')!r} "
                                    "is not supported (block-wise fp8 is dynamic)")
    if block is not None and (not isinstance(block, list | tuple) or len(block) != 2):
        raise UnsupportedModelError(f"fp8 quantization_config weight_block_size {block!r} "
                                    "is not supported (expected [128, 128])")


def scale_to_float32(suffix: str, tensor: torch.Tensor) -> torch.Tensor:
    """A scale of any float checkpoint dtype as float32 (exact: fp16/bf16 embed in fp32)."""
    check_dtype(suffix, tensor, torch.float32, torch.bfloat16, torch.float16)
    return tensor.to(torch.float32).contiguous()


def per_tensor_scale(suffix: str, tensor: torch.Tensor) -> torch.Tensor:
    """A one-element scale (``[]`` or ``[1]``) as float32 ``[1]``."""
    if tensor.numel() != 1:
        raise CheckpointError(f"checkpoint tensor {suffix!r} of a per-tensor fp8 layer has "
                              f"shape {list(tensor.shape)}, expected one element")
    return scale_to_float32(suffix, tensor).reshape(1)


def fp8_weight(suffix: str, tensor: torch.Tensor) -> torch.Tensor:
    """The e4m3 weight as stored (e5m2 and float weights are refused by name)."""
    check_dtype(suffix, tensor, torch.float8_e4m3fn)
    return tensor


def convert(qcfg: QuantizationConfig, suffix: str,
            tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """One fp8 tensor of a layer -> its canonical tensors (module docstring)."""
    if suffix == "weight":
        return {"weight": fp8_weight(suffix, tensor)}
    if suffix == "weight_scale_inv" and qcfg.weight_block is not None:
        return {"weight_scale": scale_to_float32(suffix, tensor)}
    if suffix in ("weight_scale", "input_scale") and qcfg.weight_block is None:
        return {suffix: per_tensor_scale(suffix, tensor)}
    if suffix == "bias":
        return {"bias": tensor}
    expected = BLOCK_REQUIRED if qcfg.weight_block is not None else TENSOR_REQUIRED
    raise CheckpointError(f"unexpected tensor suffix {suffix!r} in an fp8 layer (expected "
                          f"{', '.join(expected + OPTIONAL)})")
