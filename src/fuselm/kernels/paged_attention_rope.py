"""Decode attention with the rotary embedding and the KV-cache write of the new token fused in.

One kernel instead of ``rotary_store_kv`` followed by ``paged_attention``: every split-KV program
rotates its group's query rows itself, and the program whose partition holds the new token
(position ``seq_len - 1``) rotates that token's k and writes k and v to the cache slot before it
reads its partition. Neox rotary over the whole head (``rot_dim == head_size``, as in Llama).

Shapes: q ``[num_seqs, num_heads, head_size]``, k and v ``[num_seqs, num_kv_heads, head_size]``
(unrotated; views of one QKV output are fine, last dim contiguous), positions and slot_mapping
int64 ``[num_seqs]`` (slot -1: nothing stored), cos_sin_cache float32 ``[max_position,
head_size]``; the caches, block tables and seq_lens as in ``paged_attention`` (seq_lens include
the new token). Returns the attention output ``[num_seqs, num_heads, head_size]``; q, k and v
are left as they are, the caches get the new token.

Backends: ``paged_attention_rope_ref`` (``rotary_store_kv_ref`` on copies of q and k, then
``paged_attention_ref``) and ``paged_attention_rope_triton_out`` (``fuselm::
paged_attention_rope_out``, behind ``PagedAttentionWorkspace.rope``).
"""

from __future__ import annotations

import torch

from fuselm.kernels import _triton_utils
from fuselm.kernels._triton_utils import FUSELM_LIB
from fuselm.kernels.paged_attention import paged_attention_ref, paged_attention_triton_out
from fuselm.kernels.rotary_store_kv import _check_args, rotary_store_kv_ref


def paged_attention_rope_ref(q, k, v, positions, cos_sin_cache, slot_mapping, key_cache,
                             value_cache, block_tables, seq_lens, scale) -> torch.Tensor:
    """The spec: rotary + KV write (``rotary_store_kv_ref`` on copies of q and k), then paged
    decode attention in float32; the result in q's dtype."""
    q, k = q.clone(), k.clone()
    rotary_store_kv_ref(q, k, v, positions, cos_sin_cache, key_cache, value_cache, slot_mapping)
    return paged_attention_ref(q, key_cache, value_cache, block_tables, seq_lens, scale)


def check_rope_args(q, k, v, positions, cos_sin_cache, slot_mapping, key_cache,
                    value_cache) -> None:
    """ValueError unless the fused kernel takes these (rotary_store_kv's checks, a whole-head
    rotary table in float32, one dtype for q, k, v and the caches)."""
    _check_args(q, k, v, positions, cos_sin_cache, key_cache, value_cache, slot_mapping)
    if cos_sin_cache.shape[-1] != q.shape[-1] or cos_sin_cache.dtype != torch.float32:
        raise ValueError(f"the fused decode needs a float32 rotary table over the whole head "
                         f"({q.shape[-1]}), got {tuple(cos_sin_cache.shape)} "
                         f"{cos_sin_cache.dtype}")
    if len({q.dtype, k.dtype, v.dtype, key_cache.dtype, value_cache.dtype}) != 1:
        raise ValueError("q, k, v and the caches must share one dtype")


def paged_attention_rope_triton_out(out, tmp_out, max_logits, exp_sums, q, k, v, positions,
                                    cos_sin_cache, slot_mapping, key_cache, value_cache,
                                    block_tables, seq_lens, scale: float,
                                    partition_size: int) -> None:
    """The fused Triton decode into ``out`` with the split-KV workspace buffers given."""
    check_rope_args(q, k, v, positions, cos_sin_cache, slot_mapping, key_cache, value_cache)
    rope = (k, v, positions, cos_sin_cache, slot_mapping, k.stride(0), k.stride(1),
            v.stride(0), v.stride(1), cos_sin_cache.stride(0))
    paged_attention_triton_out(out, tmp_out, max_logits, exp_sums, q, key_cache, value_cache,
                               block_tables, seq_lens, scale, partition_size, rope=rope)


FUSELM_LIB.define(
    "paged_attention_rope_out(Tensor(a!) out, Tensor(b!) tmp_out, Tensor(c!) max_logits, "
    "Tensor(d!) exp_sums, Tensor q, Tensor k, Tensor v, Tensor positions, Tensor cos_sin_cache, "
    "Tensor slot_mapping, Tensor(e!) key_cache, Tensor(f!) value_cache, Tensor block_tables, "
    "Tensor seq_lens, float scale, int partition_size) -> ()"
)


@torch.library.register_fake("fuselm::paged_attention_rope_out", lib=FUSELM_LIB)
def _paged_attention_rope_out_fake(*args) -> None:
    return None


if _triton_utils.triton_available():
    for _key in _triton_utils.triton_dispatch_keys():
        FUSELM_LIB.impl("paged_attention_rope_out", paged_attention_rope_triton_out, _key)
