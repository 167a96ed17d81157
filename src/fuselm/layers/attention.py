"""Attention over the paged KV cache: rotary + KV write (one fused op), then prefill or decode.

The KV cache of the layer is a pair of tensors ``[num_blocks, block_size, num_kv_heads,
head_size]`` bound once by the engine with ``bind_kv_cache``. A step whose queries are all single
tokens runs paged decode attention; any other step runs varlen prefill attention (which also
serves the decode tokens mixed into it).
"""

from __future__ import annotations

import torch
from torch import nn

from fuselm.forward_batch import ForwardBatch
from fuselm.kernels.kernel_set import KernelSet


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
        self._rotary_store = kernels.op("rotary_store_kv")
        self._prefill = kernels.eager_only("prefill_attention")
        self._decode = kernels.decode_attention(num_heads, head_size)  # shared by all layers

    def bind_kv_cache(self, key_cache: torch.Tensor, value_cache: torch.Tensor) -> None:
        """Attaches this layer's slice of the paged KV cache."""
        self.key_cache, self.value_cache = key_cache, value_cache

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                positions: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """q ``[T, H, D]``, k/v ``[T, Hkv, D]`` (views of the QKV output) -> ``[T, H * D]``;
        rotates q and k in place and writes k, v into the cache."""
        self._rotary_store.fn(q, k, v, positions, self.cos_sin_cache, self.key_cache,
                              self.value_cache, batch.slot_mapping)
        if batch.is_decode:
            out = self._decode.fn(q, self.key_cache, self.value_cache, batch.block_tables,
                                  batch.seq_lens, self.scale, self.sliding_window)
        else:
            out = self._prefill.fn(q, k, v, self.key_cache, self.value_cache,
                                   batch.query_start_loc, batch.seq_lens, batch.block_tables,
                                   self.scale, self.sliding_window)
        return out.reshape(out.shape[0], self.num_heads * self.head_size)
