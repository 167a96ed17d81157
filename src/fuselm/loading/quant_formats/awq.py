"""AWQ checkpoints (``quant_method: awq``, ``version: gemm``), 4-bit with zero points.

Per quantized linear of logical weight ``[N, K]`` with group size ``G``:

- ``qweight`` int32 ``[K, N / 8]``: word ``c`` of input row ``k`` packs output columns
  ``8c .. 8c + 7``; AWQ's GEMM packer writes column ``8c + AWQ_PACK_ORDER[i]`` into bits
  ``4i .. 4i + 3``, so output column ``8c + j`` sits in field ``AWQ_FIELD_OF[j]``.
- ``qzeros`` int32 ``[K / G, N / 8]``: the zero points, packed the same way.
- ``scales`` float16 ``[K / G, N]``.

``W[n, k] = (q[k, n] - z[k // G, n]) * s[k // G, n]``. Converted here to the canonical int4
layout (``qweight`` uint8 ``[N, K / 2]``, ``scales [N, K / G]``, ``zeros`` uint8 ``[N, K / G]``).
"""

from __future__ import annotations

from typing import Any

import torch

from fuselm.errors import CheckpointError, UnsupportedModelError
from fuselm.layers.quantization.config import QuantizationConfig
from fuselm.loading.quant_formats._packing import check_dtype, int32_bytes, unpack_int32

AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
"""Field ``i`` of a word holds column ``AWQ_PACK_ORDER[i]`` of its 8."""
AWQ_FIELD_OF = tuple(AWQ_PACK_ORDER.index(j) for j in range(8))
"""Column ``j`` of a word's 8 sits in field ``AWQ_FIELD_OF[j]`` (0, 4, 1, 5, 2, 6, 3, 7)."""

REQUIRED = ("qweight", "qzeros", "scales")
OPTIONAL = ("bias",)


def check_config(quant: dict[str, Any]) -> None:
    """Refuses AWQ settings the GEMM conversion does not implement, naming the field."""
    if not quant.get("zero_point", True):
        raise UnsupportedModelError("awq quantization_config zero_point false is not "
                                    "supported (fuselm reads AWQ GEMM checkpoints with zero "
                                    "points)")
    group = int(quant.get("group_size", quant.get("q_group_size", 128)))
    if group != -1 and (group < 2 or group % 2):
        raise UnsupportedModelError(f"awq quantization_config group_size {group} is not "
                                    "supported (an even size, or -1 per channel)")


def _qweight(qweight: torch.Tensor) -> torch.Tensor:
    """int32 ``[K, N / 8]`` -> canonical uint8 ``[N, K / 2]``.

    Byte ``m`` of a word holds fields ``2m`` (low nibble) and ``2m + 1`` (high). The
    canonical byte of a column pairs input rows ``2j`` (low) and ``2j + 1`` (high), so it is
    built from the two rows' bytes directly (uint8 work), then fields are put in column order
    (AWQ_FIELD_OF) in the same copy as the transpose: about 0.5 s for an 8B-model MLP weight
    on one CPU core, against 5 s for unpacking every field.
    """
    k = qweight.shape[0]
    if k % 2:
        raise CheckpointError(f"AWQ qweight has {k} input rows; int4 needs an even number")
    rows = int32_bytes(qweight).view(k // 2, 2, -1, 4)  # [K / 2, 2 rows, N / 8, 4 bytes]
    even, odd = rows[:, 0], rows[:, 1]
    low_fields = (even & 15) | (odd << 4)  # fields 2m: row 2j low, row 2j + 1 high
    high_fields = (even >> 4) | (odd & 0xF0)  # fields 2m + 1
    fields = torch.stack([low_fields, high_fields], dim=-1).view(k // 2, -1, 8)
    order = torch.tensor(AWQ_FIELD_OF)
    return fields.permute(1, 2, 0).index_select(1, order).reshape(-1, k // 2)


def convert(qcfg: QuantizationConfig, suffix: str,
            tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """One AWQ tensor of a layer -> its canonical tensors (module docstring)."""
    if suffix == "qweight":
        check_dtype(suffix, tensor, torch.int32)
        return {"qweight": _qweight(tensor)}
    if suffix == "qzeros":
        check_dtype(suffix, tensor, torch.int32)
        z = unpack_int32(tensor, 4, dim=1, order=AWQ_FIELD_OF)  # [K / G, N]
        return {"zeros": z.t().contiguous()}
    if suffix == "scales":
        check_dtype(suffix, tensor, torch.float16, torch.bfloat16, torch.float32)
        return {"scales": tensor.t().contiguous()}
    if suffix == "bias":
        return {"bias": tensor}
    raise CheckpointError(f"unexpected tensor suffix {suffix!r} in an AWQ layer (expected "
                          f"{', '.join(REQUIRED + OPTIONAL)})")
