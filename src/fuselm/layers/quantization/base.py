"""The linear-method seam: how a linear layer stores, loads and multiplies its weight.

A ``LinearBase`` layer (``layers/linear.py``) owns no weight layout of its own: its
``LinearMethod`` registers the parameters (``create_weights``), converts them once the
checkpoint is in (``process_weights_after_loading``: online quantization, repacking) and runs
``y = x W^T + bias`` (``apply``). Logical weight W is ``[N = out_per_partition,
K = in_per_partition]``; the stored tensors are the canonical layouts of QUANT_SPEC (int8 rows,
int4 nibbles with group scales and zero points, fp8 with scales, GGUF blocks).

Every parameter carries its sharding metadata (``ShardMeta``, set by ``new_param``), so the
layer's loaders narrow any layout along the output or input dimension in *logical* units:

- ``output_dim`` / ``input_dim``: which dim of the stored tensor runs along N / K (None: the
  tensor is whole on every rank and does not depend on that axis).
- ``output_pack``: logical rows per stored entry along ``output_dim`` (1; FP8 block scales: 128).
- ``input_pack``: logical columns per stored entry along ``input_dim`` (1; int4 nibbles: 2;
  group scales and zeros: the group size). ``input_block = (elems, stored)``: ``elems`` logical
  columns occupy ``stored`` entries (GGUF blocks: 32 values in 34 bytes of Q8_0); it overrides
  ``input_pack``.
- ``input_group``: the alignment a row-parallel shard boundary must respect (int4 group, GGUF
  super-block, FP8 block).
- ``broadcast``: a one-element checkpoint tensor fills the whole shard (a per-tensor scale
  loaded into per-channel storage); ``merge = "max"``: shards of a merged layer keep the
  largest value (a static input scale shared by q, k and v).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from fuselm.kernels.kernel_set import KernelSet


@dataclass(frozen=True)
class ShardMeta:
    """How a stored parameter maps onto the logical ``[N, K]`` weight (module docstring)."""

    output_dim: int | None = 0
    input_dim: int | None = 1
    output_pack: int = 1
    input_pack: int = 1
    input_block: tuple[int, int] | None = None
    input_group: int = 1
    broadcast: bool = False
    merge: str | None = None

    def stored_rows(self, logical: int) -> int:
        """Stored entries along ``output_dim`` for ``logical`` rows (ValueError if unaligned)."""
        return _convert(logical, self.output_pack, 1, "rows", "output")

    def stored_cols(self, logical: int) -> int:
        """Stored entries along ``input_dim`` for ``logical`` columns (ValueError if
        unaligned)."""
        elems, stored = self.input_block or (self.input_pack, 1)
        return _convert(logical, elems, stored, "columns", "input")


def _convert(logical: int, elems: int, stored: int, what: str, axis: str) -> int:
    if logical % elems:
        raise ValueError(f"{logical} logical {what} do not split into whole stored entries of "
                         f"{elems} along the {axis} dim (a shard boundary must be aligned)")
    return logical // elems * stored


def new_param(layer: nn.Module, name: str, shape: tuple[int, ...], dtype: torch.dtype,
              meta: ShardMeta, fill: float | None = None,
              optional: bool = False) -> nn.Parameter:
    """Registers ``layer.<name>``: an empty (or ``fill``-ed) frozen parameter with ``meta`` as
    its ``shard_meta`` attribute and the layer's ``weight_loader``; returns it. ``optional``:
    a checkpoint need not provide it (its ``fill`` stands, e.g. symmetric zero points 8)."""
    data = torch.empty(shape, dtype=dtype) if fill is None else torch.full(shape, fill,
                                                                          dtype=dtype)
    param = nn.Parameter(data, requires_grad=False)
    param.shard_meta = meta
    param.optional = optional
    loader = getattr(layer, "weight_loader", None)
    if loader is not None:
        param.weight_loader = loader
    layer.register_parameter(name, param)
    return param


def shard_meta(param: torch.Tensor) -> ShardMeta:
    """The parameter's sharding metadata; a parameter without it is a plain ``[N, K]``
    weight (or an ``[N]`` vector)."""
    meta = getattr(param, "shard_meta", None)
    if meta is not None:
        return meta
    return ShardMeta(output_dim=0, input_dim=1 if param.dim() == 2 else None)


def replace_param(layer: nn.Module, name: str, data: torch.Tensor,
                  meta: ShardMeta | None = None) -> nn.Parameter:
    """Swaps ``layer.<name>`` for a frozen parameter holding ``data`` (after loading: the
    float weight for its quantized form); keeps the old metadata unless ``meta`` is given."""
    old = getattr(layer, name, None)
    param = nn.Parameter(data, requires_grad=False)
    param.shard_meta = meta or (shard_meta(old) if old is not None else ShardMeta())
    if old is not None and hasattr(old, "weight_loader"):
        param.weight_loader = old.weight_loader
    if name in layer._parameters:
        del layer._parameters[name]
    layer.register_parameter(name, param)
    return param


def tensor_bytes(*tensors: torch.Tensor | None) -> int:
    """Bytes the given tensors hold (None counts 0)."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class LinearMethod(ABC):
    """How a linear layer holds and multiplies its weight (module docstring).

    One method object may serve many layers: per-layer state (parameters, kernel choices,
    the batch size from which a dequantize-then-GEMM route wins) lives on the layer.
    ``kernels`` is the model's KernelSet; on a CPU its ops are the references.
    """

    #: dense float layers keep the batch-1 fused gate/up + SiLU kernel (layers/mlp.py)
    is_dense: bool = False

    def __init__(self, kernels: KernelSet) -> None:
        self.kernels = kernels

    @abstractmethod
    def create_weights(self, layer: nn.Module, in_per_partition: int, out_per_partition: int,
                       params_dtype: torch.dtype | None) -> None:
        """Registers the layer's parameters (``new_param``) for a ``[out_per_partition,
        in_per_partition]`` weight; ``params_dtype`` is the model's float dtype (None: the
        default dtype)."""

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Called once after every checkpoint tensor is loaded (quantize, repack); default:
        nothing."""
        return None

    @abstractmethod
    def apply(self, layer: nn.Module, x: torch.Tensor,
              bias: torch.Tensor | None) -> torch.Tensor:
        """``x [M, in_per_partition]`` -> ``x W^T + bias`` ``[M, out_per_partition]`` in x's
        dtype."""

    @abstractmethod
    def weight_bytes(self, layer: nn.Module) -> int:
        """Bytes one full matmul of the layer reads (packed weight + scales + zeros + bias)."""

    @abstractmethod
    def describe(self) -> str:
        """One phrase for the startup log, e.g. ``int4 g128 (w4a16)``."""


def dense_from_tokens(kernels: KernelSet, op: str, n: int, k: int) -> int | None:
    """The per-shape hook for "the user never pays for quantization in speed": the number of
    tokens from which the tuning table ``configs/<op>.json`` measured dequantize-then-GEMM
    faster than ``op`` for a ``[n, k]`` weight (entry ``{"n{n}_k{k}": {"dense_from_m": M}}``
    or a ``default`` entry), or None (always the quantized kernel; no table on a CPU)."""
    if kernels.device.type != "cuda":
        return None
    from fuselm.kernels.triton_utils import gpu_table_entry

    index = kernels.device.index
    index = index if index is not None else torch.cuda.current_device()
    try:
        entry = gpu_table_entry(op, index)
    except (FileNotFoundError, KeyError):
        return None
    choice: Any = entry.get(f"n{n}_k{k}", entry.get("default"))
    value = choice.get("dense_from_m") if isinstance(choice, dict) else None
    return int(value) if value is not None else None
