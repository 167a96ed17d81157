"""GGUF linear method: the file's ggml blocks kept packed, multiplied by ``gguf_matmul``.

Canonical layout (QUANT_SPEC "GGUF packed"): ``qweight`` uint8 ``[N, (K // elems) * bytes]``, the
raw blocks of each row in file order, and the layer's ``ggml_type`` (a
``gguf.GGMLQuantizationType`` id). The type is the file's, per tensor, so it is known only
when the tensor arrives: ``create_weights`` registers an empty ``qweight`` whose
``weight_loader`` (this method's ``load``) takes ``loading.gguf.QuantizedTensor`` parts; the
layer says which logical rows (q, k, v or gate, up; a rank's heads) and columns (a row-parallel
rank's inputs, aligned to whole blocks: 32 values, or 256 for the K-quants) it holds, and
blocks never cross rows, so row shards are row slices and column shards byte slices.
``process_weights_after_loading`` concatenates the parts by rows into one ``qweight`` (on CUDA,
Q8_0 rows then take the split layout of ``gguf_matmul.q8_0_split``: the same bytes, ordered for
the CUDA GEMV's 16-byte loads). Where the parts' types differ (llama.cpp's Q4_K_M keeps some
``attn_v`` in Q6_K), consecutive parts of one type become one segment each (``qweight``,
``qweight_1``, ...) and ``apply`` runs one matmul per segment; a float part (F16/F32/BF16 in the
file) is a float segment (``F.linear``).

``apply`` runs the model's KernelSet ``gguf_matmul`` (Triton on CUDA: gemv, gemm or
dequantize + cuBLAS per batch from the tuning table; on a CPU the reference, which dequantizes
the weight every call: slow, for the quality check). ``loading.gguf_quantization`` decides
when a GGUF model runs packed.
"""

from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from fuselm.kernels.gguf_matmul import GGML_TYPES, Q8_0_SPLIT, TYPE_IDS, q8_0_split
from fuselm.layers.quantization.base import (
    LinearMethod,
    ShardMeta,
    new_param,
    replace_param,
    tensor_bytes,
)
from fuselm.layers.quantization.config import QuantizationConfig

_FLOAT_TYPES = ("F32", "F16", "BF16")
SUPER_BLOCK = 256  # the alignment of a row-parallel shard (every supported type divides it)


class Segment(NamedTuple):
    """Rows ``[start, stop)`` of the layer, held by parameter ``param`` in ggml ``ggml_type``
    (a type id; -1: a float weight ``[rows, K]``)."""

    start: int
    stop: int
    ggml_type: int
    param: str


class GGUFPackedLinearMethod(LinearMethod):
    """A layer of packed GGUF blocks (module docstring)."""

    def __init__(self, kernels, quant: QuantizationConfig) -> None:
        super().__init__(kernels)
        self.quant = quant
        self._matmul = kernels.op("gguf_matmul")

    def create_weights(self, layer: nn.Module, in_per_partition: int, out_per_partition: int,
                       params_dtype: torch.dtype | None) -> None:
        """An empty ``qweight`` (filled part by part by ``load``) and the float dtype a float
        part is kept in."""
        meta = ShardMeta(output_dim=0, input_dim=1, input_group=SUPER_BLOCK)
        param = new_param(layer, "qweight", (out_per_partition, 0), torch.uint8, meta)
        param.weight_loader = partial(self.load, layer)
        layer.gguf_parts = {}  # row offset -> (ggml type name, rows [size, row bytes or K])
        layer.gguf_segments = []
        layer.gguf_float_dtype = params_dtype or torch.get_default_dtype()

    def load(self, layer: nn.Module, param: nn.Parameter, loaded: Any,
             shard_id: Any = None) -> None:
        """Takes this rank's rows and columns of a full ``QuantizedTensor`` (part
        ``shard_id`` of a merged layer) into ``layer.gguf_parts``."""
        # a loading.gguf.QuantizedTensor (duck-typed: layers never import loading)
        if isinstance(loaded, torch.Tensor) or not hasattr(loaded, "ggml_type"):
            raise TypeError(f"a packed GGUF layer loads gguf QuantizedTensors, got "
                            f"{type(loaded).__name__} (was the GGUF read with dequantize?)")
        rows = layer._rows(shard_id)  # noqa: SLF001 - the layer's own shard arithmetic
        cols = layer._cols()  # noqa: SLF001
        data, k_full = loaded.data, loaded.shape[-1]
        dst_off, size = 0, loaded.shape[0]
        if rows is not None:
            dst_off, size, src_off = rows
            data = data.narrow(0, src_off, size)
        if cols is not None:
            data = _narrow_columns(data, loaded.ggml_type, k_full, *cols)
        if dst_off in layer.gguf_parts:
            raise ValueError(f"rows from {dst_off} of a packed GGUF layer loaded twice")
        # onto the layer's device now: the host never holds more than one tensor's parts
        layer.gguf_parts[dst_off] = (loaded.ggml_type, data.to(param.device).contiguous())

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Joins the loaded parts by rows into segments of one type (module docstring)."""
        parts = sorted(layer.gguf_parts.items())
        n, k = layer.out_features, layer.in_features
        runs: list[tuple[int, str, list[torch.Tensor]]] = []
        expect = 0
        for offset, (ggml_type, data) in parts:
            if offset != expect:
                raise ValueError(f"packed GGUF layer: rows {expect}..{offset} were not loaded")
            expect = offset + data.shape[0]
            if runs and runs[-1][1] == ggml_type:
                runs[-1][2].append(data)
            else:
                runs.append((offset, ggml_type, [data]))
        if expect != n:
            raise ValueError(f"packed GGUF layer: {expect} of {n} rows loaded")
        del layer._parameters["qweight"]
        segments = []
        for i, (start, ggml_type, datas) in enumerate(runs):
            joined = torch.cat(datas) if len(datas) > 1 else datas[0]
            name = "qweight" if i == 0 else f"qweight_{i}"
            if ggml_type in _FLOAT_TYPES:
                joined = _float_rows(joined, ggml_type, k).to(layer.gguf_float_dtype)
                tid = -1
            else:
                joined, tid = kernel_layout(joined, _type_id(ggml_type), k, joined.is_cuda)
            replace_param(layer, name, joined, ShardMeta(input_group=SUPER_BLOCK))
            segments.append(Segment(start, start + joined.shape[0], tid, name))
        layer.gguf_segments = segments
        layer.gguf_parts = {}

    def apply(self, layer: nn.Module, x: torch.Tensor,
              bias: torch.Tensor | None) -> torch.Tensor:
        """``x [M, K]`` -> ``[M, N]`` in x's dtype."""
        outs = [self._segment(layer, seg, x) for seg in layer.gguf_segments]
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
        return out if bias is None else out + bias

    def _segment(self, layer: nn.Module, seg: Segment, x: torch.Tensor) -> torch.Tensor:
        w = getattr(layer, seg.param)
        if seg.ggml_type < 0:
            return F.linear(x, w.to(x.dtype))
        return self._matmul.fn(x, w, seg.ggml_type)

    def weight_bytes(self, layer: nn.Module) -> int:
        """The packed blocks (and float segments) + bias."""
        params = [getattr(layer, seg.param) for seg in layer.gguf_segments]
        return tensor_bytes(*params, getattr(layer, "bias", None))

    def describe(self) -> str:
        """E.g. ``gguf Q4_1 packed (ggml blocks)`` (the file's most common linear type)."""
        fmt = self.quant.checkpoint_format
        return f"gguf {fmt} packed (ggml blocks)" if fmt else "gguf packed (ggml blocks)"


def kernel_layout(data: torch.Tensor, ggml_type: int, k: int,
                  cuda: bool) -> tuple[torch.Tensor, int]:
    """The rows and type id a segment keeps: on CUDA, Q8_0 rows (K % 64 == 0) in the split
    layout the CUDA GEMV reads (``gguf_matmul.q8_0_split``: the same bytes, rearranged);
    every other type as the file's blocks."""
    if cuda and ggml_type == TYPE_IDS["Q8_0"] and k % 64 == 0:
        return q8_0_split(data, k), Q8_0_SPLIT
    return data, ggml_type


def _type_id(name: str) -> int:
    if name not in TYPE_IDS:
        raise ValueError(f"ggml type {name} has no packed kernel; supported: "
                         f"{', '.join(TYPE_IDS)}")
    return TYPE_IDS[name]


def _narrow_columns(data: torch.Tensor, ggml_type: str, k_full: int, start: int,
                    size: int) -> torch.Tensor:
    """Logical columns ``[start, start + size)`` of packed rows ``data`` as a byte slice; the
    shard must start and end on block boundaries."""
    if ggml_type in _FLOAT_TYPES:
        elems, nbytes = 1, data.shape[1] // k_full
    else:
        _, elems, nbytes = GGML_TYPES[_type_id(ggml_type)]
    if start % elems or size % elems:
        raise ValueError(f"a row-parallel shard of columns {start}..{start + size} does not "
                         f"fall on the {elems}-value blocks of {ggml_type}")
    return data.narrow(1, start // elems * nbytes, size // elems * nbytes)


def _float_rows(data: torch.Tensor, ggml_type: str, k: int) -> torch.Tensor:
    """Raw float rows (bytes ``[rows, K * itemsize]``) as their float dtype ``[rows, K]``."""
    dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[ggml_type]
    return data.contiguous().view(dtype).reshape(-1, k)
