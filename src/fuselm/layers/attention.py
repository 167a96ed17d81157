"""Attention over the paged KV cache: rotary + KV write (one fused op), then prefill or decode.

The KV cache of the layer is a pair of tensors ``[num_blocks, block_size, num_kv_heads,
head_size]`` bound once by the engine with ``bind_kv_cache``. A step whose queries are all single
tokens runs paged decode attention; any other step runs varlen prefill attention (which also
serves the decode tokens mixed into it).

An FP8 (e4m3fn) cache holds K / k_scale and V / v_scale (``kernels.kv_quant``): per-layer
scalars, ``DEFAULT_KV_SCALE`` unless a checkpoint brings its own (``kv_scale_target`` maps the
compressed-tensors and ModelOpt names to this layer, ``load_kv_scale`` takes the tensor). They
are Python floats, fixed once the cache is bound, so the captured decode graphs keep them.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from fuselm.forward_batch import ForwardBatch
from fuselm.kernels.kernel_set import KernelSet
from fuselm.kernels.kv_quant import DEFAULT_KV_SCALE, check_kv_scale

# Checkpoint names of KV-cache scales (model.layers.N.self_attn. + one of these): compressed-
# tensors' kv_cache_scheme (self_attn.k_scale; older files k_proj.output_scale), ModelOpt's
# (k_proj.k_scale), and the single kv_scale of older FP8 checkpoints (both K and V).
_KV_SCALE_NAME = re.compile(
    r"^(?:model\.)?layers\.(\d+)\.self_attn\.(?:k_proj\.(k)_scale|v_proj\.(v)_scale|(k|v)_scale|"
    r"(k|v)_proj\.output_scale|(kv)_scale)$")


def kv_scale_target(name: str) -> tuple[int, str] | None:
    """(layer index, "k" | "v" | "kv") for a checkpoint tensor holding a KV-cache scale, e.g.
    ``model.layers.3.self_attn.k_scale`` -> ``(3, "k")``; None for any other name."""
    match = _KV_SCALE_NAME.match(name)
    if match is None:
        return None
    return int(match.group(1)), next(g for g in match.groups()[1:] if g)


class Attention(nn.Module):
    """Multi-head attention with GQA for one layer on this rank's heads."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_size: int, scale: float,
                 cos_sin_cache: torch.Tensor, kernels: KernelSet | None = None,
                 sliding_window: int | None = None) -> None:
        super().__init__()
        kernels = kernels or KernelSet()
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1 or None, got {sliding_window}")
        self.num_heads, self.num_kv_heads, self.head_size = num_heads, num_kv_heads, head_size
        self.scale = scale
        self.sliding_window = sliding_window or 0  # the kernels' "none"
        self.cos_sin_cache = cos_sin_cache  # shared by every layer; not a parameter
        self.key_cache = torch.empty(0)
        self.value_cache = torch.empty(0)
        self.k_scale = self.v_scale = DEFAULT_KV_SCALE  # used by an fp8 cache only
        self._rotary_store = kernels.op("rotary_store_kv")
        self._prefill = kernels.eager_only("prefill_attention")
        self._decode = kernels.decode_attention(num_heads, head_size)  # shared by all layers

    def bind_kv_cache(self, key_cache: torch.Tensor, value_cache: torch.Tensor) -> None:
        """Attaches this layer's slice of the paged KV cache."""
        self.key_cache, self.value_cache = key_cache, value_cache

    def load_kv_scale(self, which: str, tensor: torch.Tensor | float) -> None:
        """Sets k_scale ("k"), v_scale ("v") or both ("kv") from a checkpoint's scalar (a
        one-element tensor: read once, at load time). ValueError unless finite and > 0."""
        if isinstance(tensor, torch.Tensor):
            if tensor.numel() != 1:
                raise ValueError(f"a KV-cache scale must be one scalar per layer, got shape "
                                 f"{tuple(tensor.shape)} (per-head scales are not supported)")
            tensor = float(tensor.reshape(()).float())
        if which not in ("k", "v", "kv"):
            raise ValueError(f"which must be 'k', 'v' or 'kv', got {which!r}")
        value = check_kv_scale(f"{which}_scale", tensor)
        if "k" in which:
            self.k_scale = value
        if "v" in which:
            self.v_scale = value

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                positions: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """q ``[T, H, D]``, k/v ``[T, Hkv, D]`` (views of the QKV output) -> ``[T, H * D]``;
        rotates q and k in place and writes k, v into the cache."""
        scales = {"k_scale": self.k_scale, "v_scale": self.v_scale}
        self._rotary_store.fn(q, k, v, positions, self.cos_sin_cache, self.key_cache,
                              self.value_cache, batch.slot_mapping, **scales)
        if batch.is_decode:
            out = self._decode.fn(q, self.key_cache, self.value_cache, batch.block_tables,
                                  batch.seq_lens, self.scale, self.sliding_window, **scales)
        else:
            out = self._prefill.fn(q, k, v, self.key_cache, self.value_cache,
                                   batch.query_start_loc, batch.seq_lens, batch.block_tables,
                                   self.scale, self.sliding_window, **scales)
        return out.reshape(out.shape[0], self.num_heads * self.head_size)
