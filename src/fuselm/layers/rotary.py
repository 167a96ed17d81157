"""Rotary position embedding tables: cos/sin per position, with llama3 and linear scaling.

The table is float32 ``[max_position, head_size]``: cosines in the first half of the columns,
sines in the second (the layout ``kernels.rotary_store_kv`` reads). Frequencies follow Hugging
Face's float32 arithmetic so that logits match it closely.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    factor = scaling["factor"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_len = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rotary_inv_freq(head_size: int, base: float,
                    scaling: dict[str, Any] | None = None) -> torch.Tensor:
    """Inverse frequencies ``[head_size // 2]`` (float32) after scaling."""
    exponents = torch.arange(0, head_size, 2, dtype=torch.int64).float() / head_size
    inv_freq = 1.0 / (base ** exponents)
    if scaling is None:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    if kind == "linear":
        return inv_freq / scaling["factor"]
    raise ValueError(f"unsupported rope scaling {kind!r}")


def cos_sin_cache(head_size: int, max_position: int, base: float,
                  scaling: dict[str, Any] | None = None,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """float32 ``[max_position, head_size]``: cos | sin of ``position * inv_freq``, computed on
    the CPU (as transformers does) and placed on ``device`` (default: the current one)."""
    with torch.device("cpu"):
        inv_freq = rotary_inv_freq(head_size, base, scaling)
        positions = torch.arange(max_position, dtype=torch.int64).float()
        freqs = torch.outer(positions, inv_freq)
        table = torch.cat((freqs.cos(), freqs.sin()), dim=-1)
    return table.to(device if device is not None else torch.empty(0).device)
