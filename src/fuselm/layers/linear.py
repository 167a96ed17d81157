"""Linear layers, tensor-parallel from the start (Megatron style).

- ``ReplicatedLinear``: every rank holds the whole weight.
- ``ColumnParallelLinear``: the output dim is split; rank r holds rows
  ``[r * out_per_partition, (r + 1) * out_per_partition)``; no communication.
- ``MergedColumnParallelLinear``: several column-parallel outputs (gate and up) in one GEMM;
  each rank holds its slice of every part, concatenated.
- ``QKVParallelLinear``: q, k and v heads in one GEMM; heads split over ranks, KV heads
  replicated when there are more ranks than KV heads.
- ``RowParallelLinear``: the input dim is split; partial outputs are summed by one all-reduce.

Each parameter carries ``weight_loader(param, full_tensor[, shard_id])`` that copies its slice from
a full checkpoint tensor (or a lazy slice, read only in part). Every layer is dense
(``LinearBase.matmul``): a quantized layout would add its linear method here when one exists.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fuselm.kernels.kernel_set import KernelSet
from fuselm.layers.weight_utils import copy_checked, default_weight_loader, narrow, tensor_shape
from fuselm.parallel import comm
from fuselm.parallel import parallel_state as ps


def divide(numerator: int, denominator: int) -> int:
    """Exact division, with an error naming both numbers otherwise."""
    if numerator % denominator:
        raise ValueError(f"{numerator} is not divisible by {denominator}")
    return numerator // denominator


class LinearBase(nn.Module):
    """A weight ``[out_per_partition, in_per_partition]`` and an optional bias."""

    def __init__(self, in_features: int, out_features: int, bias: bool,
                 dtype: torch.dtype | None = None, kernels: KernelSet | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype),
                                   requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        self.gemv = (kernels or KernelSet()).gemv(out_features, in_features)  # None: F.linear

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Dense ``x W^T + bias`` for x ``[num_tokens, in_per_partition]``; a single
        contiguous row goes through the bound matrix-vector kernel when there is one."""
        gemv = self.gemv.fn
        if gemv is not None and x.shape[0] == 1 and x.dim() == 2 and x.stride(1) == 1:
            return gemv(x, self.weight, bias, False)
        return F.linear(x, self.weight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[num_tokens, in_per_partition]`` -> ``[num_tokens, out_per_partition]``."""
        return self.matmul(x, self.bias)

    def weight_loader(self, param: nn.Parameter, loaded: Any) -> None:
        """Loads the full tensor (replicated layers)."""
        default_weight_loader(param, loaded)


class ReplicatedLinear(LinearBase):
    """Every rank holds the whole weight."""


class ColumnParallelLinear(LinearBase):
    """Output features split over the tensor-parallel ranks."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 dtype: torch.dtype | None = None, kernels: KernelSet | None = None) -> None:
        self.tp_rank, self.tp_size = ps.get_tp_rank(), ps.get_tp_size()
        self.out_features_total = out_features
        super().__init__(in_features, divide(out_features, self.tp_size), bias, dtype, kernels)

    def weight_loader(self, param: nn.Parameter, loaded: Any) -> None:
        """Loads this rank's rows of the full tensor."""
        size = param.shape[0]
        copy_checked(param, narrow(loaded, 0, self.tp_rank * size, size))


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of one input (gate and up) as one GEMM."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False,
                 dtype: torch.dtype | None = None, kernels: KernelSet | None = None) -> None:
        self.output_sizes = output_sizes
        super().__init__(in_features, sum(output_sizes), bias, dtype, kernels)

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: int) -> None:
        """Loads part ``shard_id`` (0 = gate, 1 = up) of this rank into its place."""
        part = self.output_sizes[shard_id] // self.tp_size
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        copy_checked(param.data.narrow(0, offset, part),
                     narrow(loaded, 0, self.tp_rank * part, part))


class QKVParallelLinear(ColumnParallelLinear):
    """q, k, v projections as one GEMM; heads split over ranks (KV replicated if needed)."""

    def __init__(self, hidden_size: int, head_size: int, total_num_heads: int,
                 total_num_kv_heads: int, bias: bool = False,
                 dtype: torch.dtype | None = None, kernels: KernelSet | None = None) -> None:
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
        super().__init__(hidden_size, out, bias, dtype, kernels)

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: str) -> None:
        """Loads this rank's heads of the full q, k or v tensor into its place."""
        q_size = self.num_heads * self.head_size
        kv_size = self.num_kv_heads * self.head_size
        offset, size = {"q": (0, q_size), "k": (q_size, kv_size),
                        "v": (q_size + kv_size, kv_size)}[shard_id]
        head_rank = self.tp_rank if shard_id == "q" else self.tp_rank // self.num_kv_head_replicas
        copy_checked(param.data.narrow(0, offset, size),
                     narrow(loaded, 0, head_rank * size, size))


class RowParallelLinear(LinearBase):
    """Input features split over ranks; outputs summed by one all-reduce."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 dtype: torch.dtype | None = None, reduce_results: bool = True,
                 kernels: KernelSet | None = None) -> None:
        self.tp_rank, self.tp_size = ps.get_tp_rank(), ps.get_tp_size()
        self.reduce_results = reduce_results
        super().__init__(divide(in_features, self.tp_size), out_features, bias, dtype, kernels)

    def weight_loader(self, param: nn.Parameter, loaded: Any) -> None:
        """Loads this rank's columns of the weight; the bias is whole."""
        if param.dim() == 1:
            default_weight_loader(param, loaded)
            return
        size = param.shape[1]
        copy_checked(param, narrow(loaded, 1, self.tp_rank * size, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Partial product on this rank, summed over ranks; the bias added once."""
        bias = self.bias if self.tp_rank == 0 else None
        out = self.matmul(x, bias)
        return comm.tp_all_reduce(out) if self.reduce_results else out


__all__ = [
    "ColumnParallelLinear", "MergedColumnParallelLinear", "QKVParallelLinear",
    "ReplicatedLinear", "RowParallelLinear", "tensor_shape",
]
