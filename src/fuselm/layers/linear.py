"""Linear layers, tensor-parallel from the start (Megatron style).

- ``ReplicatedLinear``: every rank holds the whole weight.
- ``ColumnParallelLinear``: the output dim is split; rank r holds rows
  ``[r * out_per_partition, (r + 1) * out_per_partition)``; no communication.
- ``MergedColumnParallelLinear``: several column-parallel outputs (gate and up) in one GEMM;
  each rank holds its slice of every part, concatenated.
- ``QKVParallelLinear``: q, k and v heads in one GEMM; heads split over ranks, KV heads
  replicated when there are more ranks than KV heads.
- ``RowParallelLinear``: the input dim is split; partial outputs are summed by one all-reduce.

Each layer delegates its weight layout to a ``LinearMethod`` (``layers/quantization``:
dense, int8, int4, fp8, GGUF packed): the method registers the parameters, each with its
``ShardMeta``, and runs the matmul. Every parameter carries ``weight_loader(param,
full_tensor[, shard_id])``; the layer says which logical rows (output shard) and columns (input
shard) of the full tensor this rank holds, and ``load_shard`` converts them to stored entries
through the parameter's metadata, so every layout shards the same way.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fuselm.kernels.kernel_set import KernelSet
from fuselm.layers.quantization.base import LinearMethod, ShardMeta, new_param, shard_meta
from fuselm.layers.quantization.dense import DenseLinearMethod
from fuselm.layers.weight_utils import copy_checked, materialize, narrow, tensor_shape
from fuselm.parallel import comm
from fuselm.parallel import parallel_state as ps

Rows = tuple[int, int, int]  # (offset in the parameter, size, offset in the full tensor)
Cols = tuple[int, int]  # (offset in the full tensor, size)


def divide(numerator: int, denominator: int) -> int:
    """Exact division, with an error naming both numbers otherwise."""
    if numerator % denominator:
        raise ValueError(f"{numerator} is not divisible by {denominator}")
    return numerator // denominator


def load_shard(param: nn.Parameter, loaded: Any, rows: Rows | None, cols: Cols | None) -> None:
    """Copies logical ``rows`` (None: all) and ``cols`` (None: all) of the full checkpoint
    tensor ``loaded`` into their place in ``param``, in stored units (``ShardMeta``)."""
    meta: ShardMeta = shard_meta(param)
    dst, src = param.data, loaded
    one = meta.broadcast and _numel(tensor_shape(loaded)) == 1
    if rows is not None and meta.output_dim is not None:
        dst_off, size, src_off = rows
        dim = meta.output_dim
        dst = dst.narrow(dim, meta.stored_rows(dst_off), meta.stored_rows(size))
        if not one:
            src = narrow(src, dim, meta.stored_rows(src_off), meta.stored_rows(size))
    if cols is not None and meta.input_dim is not None and not one:
        src_off, size = cols
        if src_off % meta.input_group:
            raise ValueError(f"a row-parallel shard starts at input column {src_off}, not a "
                             f"multiple of the layout's group {meta.input_group}")
        src = narrow(src, meta.input_dim, meta.stored_cols(src_off), meta.stored_cols(size))
    src = materialize(src)
    if one:
        dst.copy_(src.reshape(()).to(dst.dtype).expand_as(dst))
    elif meta.merge == "max":
        copy_checked(dst, torch.maximum(dst, src.to(dst.dtype).reshape(dst.shape)))
    else:
        copy_checked(dst, src)


def _numel(shape: tuple[int, ...]) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


class LinearBase(nn.Module):
    """A ``[out_per_partition, in_per_partition]`` linear whose layout and matmul are its
    ``method``'s (default: dense float), and an optional bias ``[out_per_partition]``."""

    #: x holds this rank's columns of the full input (row-parallel over > 1 rank): a method
    #: whose activation scale spans the row (fp8 per token) reduces it over the TP group
    input_is_parallel: bool = False

    def __init__(self, in_features: int, out_features: int, bias: bool,
                 dtype: torch.dtype | None = None, kernels: KernelSet | None = None,
                 method: LinearMethod | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.method = method or DenseLinearMethod(kernels or KernelSet())
        self.method.create_weights(self, in_features, out_features, dtype)
        if bias:
            new_param(self, "bias", (out_features,), dtype, ShardMeta(input_dim=None))
        else:
            self.bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[num_tokens, in_per_partition]`` -> ``[num_tokens, out_per_partition]``."""
        return self.method.apply(self, x, self.bias)

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
        """Loads this rank's shard of the full tensor ``loaded`` (part ``shard_id`` of a merged
        layer) into ``param``."""
        load_shard(param, loaded, self._rows(shard_id), self._cols())

    def _rows(self, shard_id: Any) -> Rows | None:
        """Logical output rows of this rank (None: the whole tensor)."""
        return None

    def _cols(self) -> Cols | None:
        """Logical input columns of this rank (None: the whole tensor)."""
        return None


class ReplicatedLinear(LinearBase):
    """Every rank holds the whole weight."""


class ColumnParallelLinear(LinearBase):
    """Output features split over the tensor-parallel ranks."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 dtype: torch.dtype | None = None, kernels: KernelSet | None = None,
                 method: LinearMethod | None = None) -> None:
        self.tp_rank, self.tp_size = ps.get_tp_rank(), ps.get_tp_size()
        self.out_features_total = out_features
        super().__init__(in_features, divide(out_features, self.tp_size), bias, dtype, kernels,
                         method)

    def _rows(self, shard_id: Any) -> Rows | None:
        size = self.out_features
        return 0, size, self.tp_rank * size


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of one input (gate and up) as one GEMM."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False,
                 dtype: torch.dtype | None = None, kernels: KernelSet | None = None,
                 method: LinearMethod | None = None) -> None:
        self.output_sizes = output_sizes
        super().__init__(in_features, sum(output_sizes), bias, dtype, kernels, method)

    def _rows(self, shard_id: Any) -> Rows | None:
        """Part ``shard_id`` (0 = gate, 1 = up) of this rank, in its place."""
        if shard_id is None:
            raise ValueError("a merged gate/up parameter loads per part (shard_id 0 or 1)")
        part = self.output_sizes[shard_id] // self.tp_size
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        return offset, part, self.tp_rank * part


class QKVParallelLinear(ColumnParallelLinear):
    """q, k, v projections as one GEMM; heads split over ranks (KV replicated if needed)."""

    def __init__(self, hidden_size: int, head_size: int, total_num_heads: int,
                 total_num_kv_heads: int, bias: bool = False,
                 dtype: torch.dtype | None = None, kernels: KernelSet | None = None,
                 method: LinearMethod | None = None) -> None:
        tp_size = ps.get_tp_size()
        self.head_size = head_size
        self.num_heads = divide(total_num_heads, tp_size)
        if tp_size >= total_num_kv_heads:
            self.num_kv_heads = 1
            self.num_kv_head_replicas = divide(tp_size, total_num_kv_heads)
        else:
            self.num_kv_heads = divide(total_num_kv_heads, tp_size)
            self.num_kv_head_replicas = 1
        out = (self.num_heads + 2 * self.num_kv_heads) * head_size * tp_size
        super().__init__(hidden_size, out, bias, dtype, kernels, method)

    def _rows(self, shard_id: Any) -> Rows | None:
        """This rank's heads of the full q, k or v tensor, in their place."""
        q_size = self.num_heads * self.head_size
        kv_size = self.num_kv_heads * self.head_size
        if shard_id not in ("q", "k", "v"):
            raise ValueError(f"a QKV parameter loads per part (q, k or v), got {shard_id!r}")
        offset, size = {"q": (0, q_size), "k": (q_size, kv_size),
                        "v": (q_size + kv_size, kv_size)}[shard_id]
        head_rank = self.tp_rank if shard_id == "q" else self.tp_rank // self.num_kv_head_replicas
        return offset, size, head_rank * size


class RowParallelLinear(LinearBase):
    """Input features split over ranks; outputs summed by one all-reduce."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 dtype: torch.dtype | None = None, reduce_results: bool = True,
                 kernels: KernelSet | None = None, method: LinearMethod | None = None) -> None:
        self.tp_rank, self.tp_size = ps.get_tp_rank(), ps.get_tp_size()
        self.reduce_results = reduce_results
        self.input_is_parallel = self.tp_size > 1
        super().__init__(divide(in_features, self.tp_size), out_features, bias, dtype, kernels,
                         method)

    def _cols(self) -> Cols | None:
        """This rank's input columns (parameters without an input dim, the bias among them,
        load whole)."""
        size = self.in_features
        return self.tp_rank * size, size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Partial product on this rank, summed over ranks; the bias added once."""
        bias = self.bias if self.tp_rank == 0 else None
        out = self.method.apply(self, x, bias)
        return comm.tp_all_reduce(out) if self.reduce_results else out


__all__ = [
    "ColumnParallelLinear", "MergedColumnParallelLinear", "QKVParallelLinear",
    "ReplicatedLinear", "RowParallelLinear", "tensor_shape",
]
