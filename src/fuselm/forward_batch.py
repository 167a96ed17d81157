"""Per-step metadata of one flat token batch: the only thing attention needs besides q, k, v.

A leaf module: the engine builds it, models and layers read it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ForwardBatch:
    """One step's metadata. Sequences are packed back to back in the flat token batch.

    Attributes:
        query_start_loc: int32 ``[num_seqs + 1]``, cumulative query (new-token) lengths.
        seq_lens: int32 ``[num_seqs]``, context length of each sequence after this step
            (cached tokens + new tokens).
        slot_mapping: int64 ``[num_tokens]``, KV-cache slot (block * block_size + offset) of
            each new token; -1 for padding tokens, which are not stored.
        block_tables: int32 ``[num_seqs, max_blocks_per_seq]``, physical block ids per sequence.
        logits_indices: int64 ``[num_logits]``, flat token indices whose logits are needed.
        max_query_len: longest query in the batch (host int; 1 means pure decode).
        max_seq_len: longest context in the batch (host int).
    """

    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    logits_indices: torch.Tensor
    max_query_len: int
    max_seq_len: int

    @property
    def num_seqs(self) -> int:
        """Number of sequences in the step."""
        return self.seq_lens.shape[0]

    @property
    def is_decode(self) -> bool:
        """True when every sequence brings exactly one new token."""
        return self.max_query_len == 1
