"""GPTQ checkpoints (``quant_method: gptq``), 4-bit, symmetric or not, without act-order.

Per quantized linear of logical weight ``[N, K]`` with group size ``G`` (``-1``: ``G = K``):

- ``qweight`` int32 ``[K / 8, N]``: word ``r`` of output column ``n`` packs input rows
  ``8r .. 8r + 7``, row ``8r + i`` in bits ``4i .. 4i + 3``.
- ``qzeros`` int32 ``[K / G, N / 8]``: zero points along N, column ``8c + i`` in bits ``4i``.
  ``checkpoint_format: gptq`` (v1, AutoGPTQ and every checkpoint without the field) stores
  ``zero - 1``: the real zero point is the stored field plus one (a symmetric checkpoint
  stores 7 for 8); ``gptq_v2`` (GPTQModel) stores the zero point itself.
- ``scales`` float16 ``[K / G, N]``; ``g_idx`` int32 ``[K]``, the group of each input row:
  ``k // G`` unless act-order (``desc_act``) permuted them, which is refused.

``W[n, k] = (q[k, n] - z[g_idx[k], n]) * s[g_idx[k], n]``. Converted here to the canonical int4
layout (``qweight`` uint8 ``[N, K / 2]``, ``scales [N, K / G]``, ``zeros`` uint8 ``[N, K / G]``,
the latter only when ``sym`` is false: a symmetric layer's zero points are checked to be 8; a
v1 zero point may be 16, a uint8 all the same).
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

FORMATS = ("gptq", "gptq_v2")
REQUIRED = ("qweight", "qzeros", "scales")
OPTIONAL = ("g_idx", "bias")


def checkpoint_format(quant: dict[str, Any]) -> str:
    """The packing version: ``checkpoint_format`` (optimum, GPTQModel), else ``format``,
    else ``gptq`` (v1)."""
    return str(quant.get("checkpoint_format") or quant.get("format") or "gptq").lower()


def check_config(quant: dict[str, Any]) -> None:
    """Refuses GPTQ settings the conversion does not implement, naming the field."""
    fmt = checkpoint_format(quant)
    if fmt not in FORMATS:
        raise UnsupportedModelError(f"gptq quantization_config checkpoint_format {fmt!r} is "
                                    f"not supported (fuselm reads {', '.join(FORMATS)})")
    if quant.get("is_marlin_format"):
        raise UnsupportedModelError("gptq quantization_config is_marlin_format true is not "
                                    "supported (fuselm reads the gptq packing)")
    if quant.get("lm_head"):
        raise UnsupportedModelError("gptq quantization_config lm_head true (a quantized LM "
                                    "head) is not supported")
    if quant.get("dynamic"):
        raise UnsupportedModelError("gptq quantization_config dynamic (per-module overrides) "
                                    "is not supported")
    group = int(quant.get("group_size", 128))
    if group != -1 and (group < 2 or group % 2):
        raise UnsupportedModelError(f"gptq quantization_config group_size {group} is not "
                                    "supported (an even size, or -1 per channel)")


def convert(qcfg: QuantizationConfig, suffix: str,
            tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """One GPTQ tensor of a layer -> its canonical tensors (module docstring)."""
    if suffix == "qweight":
        check_dtype(suffix, tensor, torch.int32)
        return {"qweight": int32_bytes(tensor.t().contiguous())}  # [N, K / 2]
    if suffix == "qzeros":
        check_dtype(suffix, tensor, torch.int32)
        z = unpack_int32(tensor, 4, dim=1)  # [K / G, N]
        if checkpoint_format(qcfg.raw) == "gptq":
            z = z + 1  # v1 stores zero - 1
        if not qcfg.zero_point:  # sym: the canonical layer holds 8 itself
            if not bool((z == 8).all()):
                raise CheckpointError("gptq sym true, but the checkpoint's qzeros hold zero "
                                      "points other than 8")
            return {}
        return {"zeros": z.t().contiguous()}
    if suffix == "scales":
        check_dtype(suffix, tensor, torch.float16, torch.bfloat16, torch.float32)
        return {"scales": tensor.t().contiguous()}
    if suffix == "g_idx":
        check_trivial_g_idx(tensor, qcfg.group_size, "gptq quantization_config desc_act")
        return {}
    if suffix == "bias":
        return {"bias": tensor}
    raise CheckpointError(f"unexpected tensor suffix {suffix!r} in a GPTQ layer (expected "
                          f"{', '.join(REQUIRED + OPTIONAL)})")
