"""Vocabulary-parallel embedding and LM head.

The vocabulary (padded up to a multiple of tp_size) is split into contiguous ranges, one per rank.
The embedding looks up ids in its range (zeros elsewhere) and all-reduces; the LM head computes
logits for its range and all-gathers them, dropping the padding.

With int4/int8 quantization the LM head is int8 per channel (``method``: quantized after
loading from its float rows, which a tied embedding keeps for its lookups); else it multiplies
its float weight (the batch-1 gemv where the KernelSet bound one).

On a CPU (one rank, float32, no quantization) a table that arrives as GGUF Q8_0 blocks stays in
them (``keep_q8_table``, ``layers/q8_table.py``): its Parameter then holds the int8 values and
carries their scales as ``q8_scales``, so that a tied LM head shares both.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fuselm.kernels.kernel_set import KernelSet
from fuselm.layers import q8_table
from fuselm.layers.quantization.base import LinearMethod
from fuselm.layers.weight_utils import copy_checked, narrow, tensor_shape
from fuselm.parallel import comm
from fuselm.parallel import parallel_state as ps


class VocabParallelEmbedding(nn.Module):
    """Token embedding ``[vocab_per_partition, dim]`` of this rank's vocabulary range."""

    def __init__(self, num_embeddings: int, embedding_dim: int,
                 dtype: torch.dtype | None = None, kernels: KernelSet | None = None) -> None:
        super().__init__()
        kernels = kernels or KernelSet()
        self.tp_rank, self.tp_size = ps.get_tp_rank(), ps.get_tp_size()
        self.num_embeddings = num_embeddings
        padded = -(-num_embeddings // self.tp_size) * self.tp_size
        self.num_embeddings_per_partition = padded // self.tp_size
        self.vocab_start = self.tp_rank * self.num_embeddings_per_partition
        self.vocab_end = self.vocab_start + self.num_embeddings_per_partition
        self.weight = nn.Parameter(
            torch.zeros(self.num_embeddings_per_partition, embedding_dim, dtype=dtype),
            requires_grad=False,
        )
        self.weight.weight_loader = self.weight_loader
        self._lookup = kernels.op("vocab_embedding")  # a TP rank's masked lookup
        self.keep_q8_table = False  # set before loading by the CPU engine (engine.builder)

    def weight_loader(self, param: nn.Parameter, loaded: Any) -> None:
        """Loads this rank's vocabulary rows (the padding rows stay zero); a GGUF table
        (``loading.gguf.QuantizedTensor``) is dequantized, or kept as Q8_0 blocks where
        ``keep_q8_table`` allows."""
        if hasattr(loaded, "ggml_type"):
            if self._keeps_q8(param, loaded):
                rows, dim = loaded.shape
                param.data, param.q8_scales = q8_table.from_q8_0_blocks(loaded.data, rows, dim)
                return
            loaded = loaded.dequantize()
        total = tensor_shape(loaded)[0]
        if total != self.num_embeddings:
            raise ValueError(f"embedding has {total} rows, expected {self.num_embeddings}")
        size = min(self.vocab_end, total) - self.vocab_start
        copy_checked(param.data[:size], narrow(loaded, 0, self.vocab_start, size))

    def _keeps_q8(self, param: nn.Parameter, loaded: Any) -> bool:
        if not (self.keep_q8_table and loaded.ggml_type == "Q8_0" and self.tp_size == 1):
            return False
        if tuple(loaded.shape) != tuple(param.shape):
            raise ValueError(f"embedding has shape {tuple(loaded.shape)}, expected "
                             f"{tuple(param.shape)}")
        return True

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """ids ``[num_tokens]`` -> ``[num_tokens, dim]``."""
        if self.weight.dtype == torch.int8:
            return q8_table.lookup(input_ids, self.weight, self.weight.q8_scales)
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        return comm.tp_all_reduce(self._lookup.fn(input_ids, self.weight, self.vocab_start))


class ParallelLMHead(VocabParallelEmbedding):
    """Output projection to the vocabulary; may share its weight with the embedding."""

    def __init__(self, num_embeddings: int, embedding_dim: int,
                 dtype: torch.dtype | None = None, kernels: KernelSet | None = None,
                 method: LinearMethod | None = None) -> None:
        kernels = kernels or KernelSet()
        super().__init__(num_embeddings, embedding_dim, dtype, kernels)
        self.gemv = kernels.gemv(self.num_embeddings_per_partition, embedding_dim)  # batch 1
        # an online method (the int8 head): its ``process_weights_after_loading`` turns the
        # loaded float ``weight`` into its layout (its ``create_weights`` is not called: the
        # rows load as the embedding's do, padding included)
        self.method = method
        self.dense_from_m: int | None = None  # the int8 head always runs its kernel

    def tie_to(self, embedding: VocabParallelEmbedding) -> None:
        """Uses the embedding's weight (tied embeddings; a quantized head quantizes a copy)."""
        self.weight = embedding.weight

    def forward(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """hidden ``[n, dim]`` -> float32 logits ``[n, vocab_size]`` (gathered over ranks),
        written into ``out`` when given."""
        gemv = self.gemv.fn
        if self.method is not None:
            logits = self.method.apply(self, hidden, None)
        elif self.weight.dtype == torch.int8:
            logits = q8_table.logits(hidden, self.weight, self.weight.q8_scales)
        elif gemv is not None and hidden.shape[0] == 1 and hidden.stride(1) == 1:
            logits = gemv(hidden, self.weight, None, True)  # float32 straight out
        else:
            logits = F.linear(hidden, self.weight)
        logits = comm.tp_all_gather(logits, dim=-1)[:, : self.num_embeddings]
        return logits.float() if out is None else out.copy_(logits)
