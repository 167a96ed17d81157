"""The preallocated split-KV workspace of paged decode attention (CUDA-graph safe).

One ``PagedAttentionWorkspace`` serves every layer; it picks the partition size from the batch
size (a shape, so a graph captured at one context replays at any other) and hands the kernels
views of flat float32 buffers sized for the largest batch of each partition bucket.
"""

from __future__ import annotations

import torch

DEFAULT_PARTITION_SIZE = 512
MAX_PARTITIONS = 64  # caps the workspace: longer contexts get longer partitions


def partition_size_for(max_model_len: int) -> int:
    """512 tokens, doubled until ``max_model_len`` needs at most ``MAX_PARTITIONS`` partitions."""
    size = DEFAULT_PARTITION_SIZE
    while -(-max_model_len // size) > MAX_PARTITIONS:
        size *= 2
    return size


class PagedAttentionWorkspace:
    """Decode attention with a preallocated split-KV workspace; the attention layer's callable.

    Build one at model-build time, sized for the largest decode batch, and share it between all
    layers (they run one after another)::

        ws = PagedAttentionWorkspace(max_num_seqs, num_heads, head_size, max_model_len, device)
        out = ws(q, key_cache, value_cache, block_tables, seq_lens, scale)   # ref's signature
        ws(q, key_cache, value_cache, block_tables, seq_lens, scale, out=out)  # no allocation

    Buffers (float32, overwritten by every call): ``tmp_out [max_num_seqs, num_heads,
    max_partitions, head_size]``, ``max_logits`` and ``exp_sums [max_num_seqs, num_heads,
    max_partitions]``; ``max_partitions = cdiv(max_model_len, partition_size)``. A call launches
    ``min(max_partitions, cdiv(block_tables.shape[1] * block_size, partition_size))`` partitions:
    shapes only, so it is CUDA-graph safe. Preconditions (not checked on the host, to avoid a
    sync): ``seq_lens <= max_model_len`` and every block a sequence uses is in its table row.
    """

    def __init__(self, max_num_seqs: int, num_heads: int, head_size: int, max_model_len: int,
                 device: torch.device | str, *, partition_size: int | None = None) -> None:
        if partition_size is not None and (partition_size < 16
                                           or partition_size & (partition_size - 1)):
            raise ValueError(f"partition_size must be a power of 2 >= 16, got {partition_size}")
        self.fixed_partition_size = partition_size
        self.max_model_len = max_model_len
        self.partition_size = partition_size or partition_size_for(max_model_len)
        self.max_num_seqs, self.num_heads, self.head_size = max_num_seqs, num_heads, head_size
        self.max_partitions = max(1, -(-max_model_len // self.partition_size))
        rows = max(n * -(-max_model_len // self.partition_size_for_batch(n))
                   for n in _batch_bucket_limits(max_num_seqs))
        self._tmp_flat = torch.empty(rows * num_heads * head_size, dtype=torch.float32,
                                     device=device)
        self._max_flat = torch.empty(rows * num_heads, dtype=torch.float32, device=device)
        self._sum_flat = torch.empty(rows * num_heads, dtype=torch.float32, device=device)
        self._kernel = None  # resolved at the first call (the ops are defined after this module)

    def _op(self):
        if self._kernel is None:
            self._kernel = torch.ops.fuselm.paged_attention_out.default
        return self._kernel

    def partition_size_for_batch(self, num_seqs: int) -> int:
        """Smaller partitions for small batches, so that short contexts still spread over the
        SMs (H100, batch 1, context 384: one 512-token partition per KV head left 124 of 132 SMs
        idle); at most 256 partitions per sequence."""
        if self.fixed_partition_size is not None:
            return self.fixed_partition_size
        size = next((p for limit, p in _PARTITION_BUCKETS if num_seqs <= limit), 512)
        while -(-self.max_model_len // size) > 256:
            size *= 2
        return size

    def buffers(self, num_seqs: int) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Partition size and the workspace views ``[num_seqs, num_heads, partitions(, D)]``."""
        size = self.partition_size_for_batch(num_seqs)
        parts = max(1, -(-self.max_model_len // size))
        n = num_seqs * self.num_heads * parts
        return (size, self._tmp_flat[: n * self.head_size].view(
                    num_seqs, self.num_heads, parts, self.head_size),
                self._max_flat[:n].view(num_seqs, self.num_heads, parts),
                self._sum_flat[:n].view(num_seqs, self.num_heads, parts))

    def __call__(self, q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                 block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                 sliding_window: int = 0, out: torch.Tensor | None = None, *,
                 k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
        """Same contract as ``paged_attention_ref``; writes into ``out`` when given."""
        num_seqs, num_heads, head_size = q.shape
        if num_seqs > self.max_num_seqs or num_heads != self.num_heads or \
                head_size != self.head_size:
            raise ValueError(
                f"q {tuple(q.shape)} does not fit the workspace (max_num_seqs "
                f"{self.max_num_seqs}, num_heads {self.num_heads}, head_size {self.head_size})")
        if out is None:
            out = torch.empty_like(q)
        size, tmp_out, max_logits, exp_sums = self.buffers(num_seqs)
        self._op()(out, tmp_out, max_logits, exp_sums, q, key_cache, value_cache,
                   block_tables, seq_lens, scale, size, sliding_window, k_scale, v_scale)
        return out


# (batch size limit, partition size): the partition of the first bucket the batch fits
_PARTITION_BUCKETS = ((2, 32), (8, 64), (32, 128), (128, 256))


def _batch_bucket_limits(max_num_seqs: int) -> list[int]:
    """The largest batch of each partition bucket, capped at ``max_num_seqs``."""
    return sorted({min(limit, max_num_seqs) for limit, _ in _PARTITION_BUCKETS} | {max_num_seqs})
