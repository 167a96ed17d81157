"""compressed-tensors checkpoints (``quant_method: compressed-tensors``, llm-compressor).

One scheme (``config_groups``, targets ``Linear``) for every linear not in ``ignore``.
Per quantized linear of logical weight ``[N, K]``:

- ``float-quantized`` (FP8 e4m3): ``weight`` float8_e4m3fn ``[N, K]``; ``weight_scale``
  float32 ``[1]`` (strategy ``tensor``), ``[N, 1]`` (``channel``) or ``[ceil(N / bn),
  ceil(K / bk)]`` (``block``); ``W = weight * scale``. Static activations (strategy
  ``tensor``, ``dynamic: false``) add ``input_scale [1]``; dynamic ones store nothing.
- ``pack-quantized`` (W4A16 / W8A16): ``weight_packed`` int32 ``[N, ceil(K * bits / 32)]``,
  input column ``c`` of a row in bits ``bits * (c % (32 / bits))`` of word ``c // (32 / bits)``,
  as the unsigned value ``q + 2 ** (bits - 1)`` of the signed quantized ``q``;
  ``weight_scale [N, K / G]`` (``group``) or ``[N, 1]`` (``channel``); ``weight_shape`` int
  ``[2] = (N, K)``; asymmetric: ``weight_zero_point`` int32 ``[ceil(N / 8), K / G]`` packed the same
  way along dim 0 (older files: int8 ``[N, K / G]``, unpacked). ``W = (q - zp) * scale``; the
  unsigned fields are the canonical nibbles and the offset zero point the canonical zero
  (8 when symmetric).
- ``naive-quantized`` / ``int-quantized`` int8: ``weight`` int8 ``[N, K]``, ``weight_scale``.

Act-order ``group`` checkpoints carry ``weight_g_idx``; only a trivial one is accepted.
"""

from __future__ import annotations

from typing import Any

import torch

from fuselm.errors import CheckpointError, UnsupportedModelError
from fuselm.layers.quantization.config import QuantizationConfig
from fuselm.loading.quant_formats._packing import (
    check_dtype,
    check_trivial_g_idx,
    int32_bytes,
    unpack_int32,
)
from fuselm.loading.quant_formats.fp8 import fp8_weight, per_tensor_scale, scale_to_float32

FORMATS = ("float-quantized", "pack-quantized", "naive-quantized", "int-quantized")
STATUSES = ("compressed", "frozen")
_INT_FORMATS = {4: ("pack-quantized",), 8: ("pack-quantized", "naive-quantized",
                                            "int-quantized")}


def scheme(quant: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None, str]:
    """(weights args, input-activation args or None, compression format) of the single
    config group (QuantizationConfig.from_hf refuses several different ones)."""
    groups = list((quant.get("config_groups") or {}).values())
    if not groups:
        raise UnsupportedModelError("compressed-tensors quantization_config has no "
                                    "config_groups")
    group = groups[0]
    fmt = str(group.get("format") or quant.get("format") or "")
    return group.get("weights") or {}, group.get("input_activations"), fmt


def check_config(quant: dict[str, Any]) -> None:
    """Refuses compressed-tensors settings the conversion does not implement, naming the
    field."""
    for key in ("kv_cache_scheme", "transform_config"):
        if quant.get(key):
            raise UnsupportedModelError(f"compressed-tensors quantization_config {key} is not "
                                        "supported")
    sparsity = quant.get("sparsity_config") or {}
    if sparsity.get("format", "dense") != "dense":
        raise UnsupportedModelError("compressed-tensors sparsity_config format "
                                    f"{sparsity.get('format')!r} is not supported")
    status = quant.get("quantization_status", "compressed")
    if status not in STATUSES:
        raise UnsupportedModelError(f"compressed-tensors quantization_status {status!r} is "
                                    f"not supported ({', '.join(STATUSES)})")
    for name, group in (quant.get("config_groups") or {}).items():
        targets = list(group.get("targets") or [])
        if targets != ["Linear"]:
            raise UnsupportedModelError(f"compressed-tensors config_groups.{name}.targets "
                                        f"{targets} is not supported (fuselm runs ['Linear'])")
        if group.get("output_activations"):
            raise UnsupportedModelError(f"compressed-tensors config_groups.{name}."
                                        "output_activations is not supported")
    weights, acts, fmt = scheme(quant)
    _check_weights(weights, fmt)
    if acts is not None:
        _check_activations(acts, weights)


def _check_weights(weights: dict[str, Any], fmt: str) -> None:
    if fmt not in FORMATS:
        raise UnsupportedModelError(f"compressed-tensors format {fmt!r} is not supported "
                                    f"(fuselm reads {', '.join(FORMATS)})")
    bits, wtype = int(weights.get("num_bits", 8)), weights.get("type", "int")
    # older FP8 releases say naive-quantized: the same fp8 `weight` (the dtype is checked)
    if wtype == "float" and fmt not in ("float-quantized", "naive-quantized") or \
            wtype == "int" and fmt not in _INT_FORMATS.get(bits, ()):
        raise UnsupportedModelError(f"compressed-tensors format {fmt!r} with {wtype}{bits} "
                                    "weights is not supported")
    if weights.get("dynamic"):
        raise UnsupportedModelError("compressed-tensors weights dynamic true is not supported")
    if wtype == "float" and not weights.get("symmetric", True):
        raise UnsupportedModelError("compressed-tensors fp8 weights symmetric false is not "
                                    "supported")
    actorder = weights.get("actorder")
    if actorder not in (None, False, "weight", "group", "static", "dynamic"):
        raise UnsupportedModelError(f"compressed-tensors weights actorder {actorder!r} is "
                                    "not supported")


def _check_activations(acts: dict[str, Any], weights: dict[str, Any]) -> None:
    strategy, dynamic = acts.get("strategy", "tensor"), bool(acts.get("dynamic", True))
    block = weights.get("strategy") == "block"
    allowed = ("group",) if block else ("token", "tensor") if dynamic else ("tensor",)
    if strategy not in allowed:
        raise UnsupportedModelError(
            f"compressed-tensors input_activations strategy {strategy!r} "
            f"({'dynamic' if dynamic else 'static'}) is not supported with "
            f"{weights.get('strategy')!r} weights (expected {', '.join(allowed)})")
    if not acts.get("symmetric", True):
        raise UnsupportedModelError("compressed-tensors input_activations symmetric false is "
                                    "not supported")


def convert(qcfg: QuantizationConfig, suffix: str,
            tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """One compressed-tensors tensor of a layer -> its canonical tensors (module docstring)."""
    weights, _, _ = scheme(qcfg.raw)
    if suffix == "bias":
        return {"bias": tensor}
    if suffix == "weight_g_idx":
        check_trivial_g_idx(tensor, qcfg.group_size, "compressed-tensors weights actorder")
        return {}
    if suffix in ("weight_zero_point", "input_zero_point") and \
            (suffix == "input_zero_point" or not qcfg.zero_point):
        if torch.count_nonzero(tensor.to(torch.int64)):  # symmetric: stored zeros only
            raise CheckpointError(f"checkpoint tensor {suffix!r} is non-zero in a symmetric "
                                  "compressed-tensors scheme")
        return {}
    out = _convert_fp8(weights, suffix, tensor) if qcfg.method == "fp8" else \
        _convert_int(qcfg, suffix, tensor)
    if out is None:
        raise CheckpointError(f"unexpected tensor suffix {suffix!r} in a compressed-tensors "
                              f"{qcfg.method} layer")
    return out


def _convert_fp8(weights: dict[str, Any], suffix: str,
                 tensor: torch.Tensor) -> dict[str, torch.Tensor] | None:
    if suffix == "weight":
        return {"weight": fp8_weight(suffix, tensor)}
    if suffix == "input_scale":
        return {"input_scale": per_tensor_scale(suffix, tensor)}
    if suffix != "weight_scale":
        return None
    strategy = weights.get("strategy", "tensor")
    if strategy == "tensor":
        return {"weight_scale": per_tensor_scale(suffix, tensor)}
    if strategy == "channel":
        return {"weight_scale": scale_to_float32(suffix, tensor).reshape(-1)}
    return {"weight_scale": scale_to_float32(suffix, tensor)}  # block grid


def _convert_int(qcfg: QuantizationConfig, suffix: str,
                 tensor: torch.Tensor) -> dict[str, torch.Tensor] | None:
    if suffix == "weight_shape":
        return {}  # (N, K): the model config gives both
    if suffix == "weight_scale":
        check_dtype(suffix, tensor, torch.float16, torch.bfloat16, torch.float32)
        scales = tensor.reshape(tensor.shape[0], -1).contiguous()  # [N, K / G] or [N, 1]
        return {"scales": scales.reshape(-1) if qcfg.method == "int8" else scales}
    if suffix == "weight" and qcfg.method == "int8":
        check_dtype(suffix, tensor, torch.int8)
        return {"qweight": tensor.contiguous()}
    if suffix == "weight_packed":
        check_dtype(suffix, tensor, torch.int32)
        if qcfg.method == "int8":  # unsigned q + 128 -> int8 q
            fields = int32_bytes(tensor)  # [N, K]: four sequential 8-bit fields a word
            return {"qweight": (fields.to(torch.int16) - 128).to(torch.int8)}
        return {"qweight": int32_bytes(tensor)}  # [N, K / 2]: the canonical nibble pairs
    if suffix == "weight_zero_point":  # asymmetric int4
        if tensor.dtype == torch.int32:
            zeros = unpack_int32(tensor, 4, dim=0)  # [8 * ceil(N / 8), K / G] unsigned
        else:
            check_dtype(suffix, tensor, torch.int8)
            zeros = (tensor.to(torch.int16) + 8).to(torch.uint8)
        return {"zeros": zeros.reshape(zeros.shape[0], -1).contiguous()}
    return None
