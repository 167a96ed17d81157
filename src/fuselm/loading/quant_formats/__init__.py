"""Pre-quantized Hugging Face checkpoint formats -> fuselm's canonical quantized layouts.

``parse(quantization_config)`` checks the format's own fields (refusing, by name, any value
the conversion does not implement) and returns the ``QuantizationConfig`` the layers run;
``convert(qcfg, suffix, tensor)`` turns one full (unsharded) checkpoint tensor of a quantized
linear, named by its suffix after the module name (``qweight``, ``weight_scale_inv``, ...),
into a dict of canonical full tensors (``layers/quantization``, QUANT_SPEC); the layer's
loaders shard them. ``checkpoint_suffixes`` says which suffixes a quantized linear has.

One module per format: ``compressed_tensors``, ``fp8`` (``quant_method: fp8``), ``awq``,
``gptq``; their docstrings give the bit layouts.
"""

from __future__ import annotations

import dataclasses
import re
from types import ModuleType
from typing import Any

import torch

from fuselm.errors import UnsupportedModelError
from fuselm.layers.quantization.config import KNOWN_HF_METHODS, QuantizationConfig
from fuselm.loading.quant_formats import awq, compressed_tensors, fp8, gptq

_FORMATS: dict[str, ModuleType] = {"compressed-tensors": compressed_tensors, "fp8": fp8,
                                   "awq": awq, "gptq": gptq}
_LM_HEAD_FLOAT = ("awq", "fp8", "gptq")
"""Formats whose LM head is never quantized (gptq ``lm_head: true`` is refused)."""


def quant_method(quant: Any) -> str:
    """The normalized ``quant_method`` of a ``quantization_config`` (``compressed-tensors``,
    ``awq``, ...); UnsupportedModelError when it is not a mapping."""
    if not isinstance(quant, dict):
        raise UnsupportedModelError(f"quantization_config must be a mapping, got {quant!r:.80}")
    return str(quant.get("quant_method", "unknown")).lower().replace("_", "-")


def parse(quant: Any) -> QuantizationConfig:
    """``config.json``'s ``quantization_config`` -> the QuantizationConfig its layers run.

    Raises UnsupportedModelError naming the ``quant_method`` fuselm does not load, or the
    field whose value it does not implement (``bits: 3``, ``checkpoint_format: marlin``, ...).
    """
    method = quant_method(quant)
    module = _FORMATS.get(method)
    if module is None:
        raise UnsupportedModelError(
            f"the checkpoint's quantization_config.quant_method {method!r} is not supported; "
            f"fuselm loads {', '.join(KNOWN_HF_METHODS)} checkpoints, or quantizes a float "
            "checkpoint itself with --quantization {fp8,int8,int4}")
    module.check_config(quant)
    qcfg = QuantizationConfig.from_hf(quant)
    if method == "awq" and quant.get("modules_to_not_convert"):
        # AutoAWQ (and vLLM) skip a module whose name *contains* an entry ("visual" skips
        # every vision layer); QuantizationConfig.skips matches whole names or "re:" patterns
        qcfg = dataclasses.replace(qcfg, ignore=tuple(
            f"re:.*{re.escape(str(name))}.*" for name in quant["modules_to_not_convert"]))
    if method in _LM_HEAD_FLOAT and not qcfg.skips("lm_head"):
        qcfg = dataclasses.replace(qcfg, ignore=(*qcfg.ignore, "lm_head"))
    return qcfg


def _module(qcfg: QuantizationConfig) -> ModuleType:
    module = _FORMATS.get(qcfg.source)
    if module is None:
        raise ValueError(f"QuantizationConfig.source {qcfg.source!r} is no checkpoint format "
                         f"({', '.join(_FORMATS)})")
    return module


def checkpoint_suffixes(qcfg: QuantizationConfig) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(required, optional) tensor suffixes of one quantized linear in a ``qcfg.source``
    checkpoint (``bias`` is optional everywhere)."""
    module = _module(qcfg)
    if module is fp8:
        required = fp8.BLOCK_REQUIRED if qcfg.weight_block else fp8.TENSOR_REQUIRED
        return required, fp8.OPTIONAL
    if module is compressed_tensors:
        return _compressed_tensors_suffixes(qcfg)
    return module.REQUIRED, module.OPTIONAL


def _compressed_tensors_suffixes(
        qcfg: QuantizationConfig) -> tuple[tuple[str, ...], tuple[str, ...]]:
    _, _, fmt = compressed_tensors.scheme(qcfg.raw)
    if qcfg.method == "fp8":
        required = ("weight", "weight_scale") + \
            (("input_scale",) if qcfg.activation_scheme == "static" else ())
        return required, ("bias",)
    if fmt == "pack-quantized":
        zero = ("weight_zero_point",) if qcfg.zero_point else ()
        return ("weight_packed", "weight_scale") + zero, ("weight_shape", "weight_g_idx",
                                                          "bias")
    return ("weight", "weight_scale"), ("bias",)


def convert(qcfg: QuantizationConfig, suffix: str,
            tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """One full checkpoint tensor of a quantized linear (``suffix`` after the module name)
    -> ``{canonical_suffix: tensor}`` in the canonical layouts (QUANT_SPEC):

    - int4: ``qweight`` uint8 ``[N, K / 2]``, ``scales [N, K / G]`` (checkpoint dtype;
      ``[N, 1]`` per channel), ``zeros`` uint8 ``[N, K / G]`` only when ``qcfg.zero_point``
      (symmetric layers have none: their zero point is 8);
    - int8: ``qweight`` int8 ``[N, K]``, ``scales [N]``;
    - fp8: ``weight`` float8_e4m3fn ``[N, K]``, ``weight_scale`` float32 (``[1]`` per tensor,
      ``[N]`` per channel, ``[ceil(N / 128), ceil(K / 128)]`` per block), ``input_scale``
      float32 ``[1]``;
    - ``bias`` unchanged; ``{}`` for a tensor with no canonical counterpart (a checked
      ``g_idx``, ``weight_shape``).

    Raises CheckpointError for a suffix or dtype the format does not have, and
    UnsupportedModelError for a valid but unsupported tensor (an act-order ``g_idx``).
    """
    return _module(qcfg).convert(qcfg, suffix, tensor)


__all__ = ["checkpoint_suffixes", "convert", "parse", "quant_method"]
