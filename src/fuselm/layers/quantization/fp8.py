"""FP8 (e4m3fn) linear method: W8A8 with per-channel (or 128 x 128 block) weight scales.

Canonical layout (QUANT_SPEC): ``weight`` float8_e4m3fn ``[N, K]``; ``weight_scale`` float32
``[N]`` per output channel (a per-tensor checkpoint scale is broadcast into its shard's rows, so
q, k and v keep their own) or ``[ceil(N/128), ceil(K/128)]`` per block; static checkpoints add
``input_scale`` float32 ``[1]`` (the largest of a merged layer's shards).

Activations (``QuantizationConfig.activation_scheme``): ``dynamic`` per-token scales
(``quant_fp8_per_token``: s = max|x_row| / 448; a row-parallel layer over several ranks takes
the max over the TP group, so TP quantizes as one process), ``static`` the checkpoint's
``input_scale``, blocks per-token groups of 128; ``none`` (weight-only checkpoints)
dequantizes the weight and runs ``F.linear`` in x's dtype. On a GPU, batches of at most
``quant_gemv.FP8_MAX_M`` rows of a per-channel layer skip the activation quantization: the
KernelSet's ``fp8_w8a16_gemv`` (the CUDA GEMV where the extension is built) multiplies x as it
is by the e4m3 weights (decode reads the weights only).

Online quantization (``--quantization fp8``): per output channel the ``weight_scale`` (one of
``max|W_row| / 448 * 2^(j / 32)``, j = 0..31) whose e4m3 row has the least squared error,
``weight = W / weight_scale`` rounded to e4m3 (relative error <= 2^-4 per element); a
row-parallel layer combines the row max and the candidates' errors over the TP group, so TP
ranks hold TP=1's scales. On the default model (its weights on Q4_1 levels) the search took
W8A8 perplexity from +2.95 % to +2.22 % of the float model's (docs/perf/quality.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fuselm.kernels import quant_gemv
from fuselm.kernels.fp8_matmul import FP8_DTYPE, FP8_MAX, amax_scale
from fuselm.layers.quantization.base import (
    LinearMethod,
    ShardMeta,
    new_param,
    replace_param,
    tensor_bytes,
)
from fuselm.layers.quantization.config import FP8_BLOCK, QuantizationConfig
from fuselm.parallel import comm

_MIN_SCALE = 1e-12


SCALE_CANDIDATES = 32
"""Scales tried per output channel by ``quantize_fp8_per_channel``: ``max|W_row| / 448`` times
``2^(j / 32)``, j = 0..31 (one octave: e4m3's grid repeats beyond it; none clips a weight)."""


def quantize_fp8_per_channel(weight: torch.Tensor,
                             row_parallel: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Float ``[N, K]`` -> ``(weight e4m3fn [N, K], weight_scale float32 [N])``: each row's
    scale is the candidate (``SCALE_CANDIDATES``) whose dequantized row has the least squared
    error, the first on ties (j = 0 is ``max|W_row| / 448``). ``row_parallel``: ``weight`` is
    this rank's columns of the rows; the row max and the errors are combined over the TP group
    (collectives in the same order on every rank), so every rank picks TP=1's scale."""
    n, k = weight.shape
    q = torch.empty(n, k, dtype=FP8_DTYPE, device=weight.device)
    scales = torch.empty(n, dtype=torch.float32, device=weight.device)
    rows = max(1, (64 << 20) // max(1, 4 * k))  # ~64 MB of float32 temporaries at a time
    steps = 2.0 ** (torch.arange(SCALE_CANDIDATES, dtype=torch.float32) / SCALE_CANDIDATES)
    for r0 in range(0, n, rows):
        w = weight[r0:r0 + rows].float()
        amax = w.abs().amax(dim=1)
        if row_parallel:
            amax = comm.tp_all_gather(amax[:, None], dim=-1).amax(dim=1)
        base = (amax / FP8_MAX).clamp(min=_MIN_SCALE)
        best, best_err = base, None
        for step in steps.tolist():
            s = base * step
            # float64 sums: a row's error splits into per-rank parts without changing the pick
            err = _dequantized(w, s).sub_(w).square_().sum(dim=1, dtype=torch.float64)
            if row_parallel:
                err = comm.tp_all_reduce(err)
            if best_err is None:
                best_err = err
            else:
                better = err < best_err
                best, best_err = torch.where(better, s, best), torch.where(better, err, best_err)
        q[r0:r0 + rows] = (w / best[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
        scales[r0:r0 + rows] = best
    return q, scales


def _dequantized(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``w`` rounded to e4m3 under row scales ``s`` and scaled back (float32)."""
    return (w / s[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).float().mul_(s[:, None])


def dequantize_fp8(weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """The logical weight ``[N, K]`` float32 of a per-channel, per-tensor or block layout."""
    w = weight.float()
    n, k = w.shape
    s = weight_scale.float()
    if s.dim() == 2 and s.shape != (n, 1):  # blocks
        s = s.repeat_interleave(FP8_BLOCK, 0).repeat_interleave(FP8_BLOCK, 1)[:n, :k]
        return w * s
    return w * s.reshape(-1, 1) if s.numel() > 1 else w * s.reshape(1, 1)


def quant_fp8_row_parallel(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token dynamic quantization of this rank's columns ``x [M, K / tp]`` with the scale
    of the whole row (max over the TP group, one ``[M, tp]`` gather), so a row-parallel layer
    quantizes exactly as one process does: TP runs give TP=1's tokens."""
    amax = x.abs().amax(dim=1, keepdim=True).float()  # [M, 1]
    amax = comm.tp_all_gather(amax, dim=-1).amax(dim=1, keepdim=True)
    scale = amax_scale(amax)
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


class Fp8LinearMethod(LinearMethod):
    """W8A8 e4m3: online per channel, or pre-quantized (compressed-tensors, block fp8)."""

    def __init__(self, kernels, quant: QuantizationConfig) -> None:
        super().__init__(kernels)
        self.quant = quant
        self.online = quant.source == "online"
        self.block = quant.weight_block is not None
        self.scheme = quant.activation_scheme if not self.online else "dynamic"
        if self.block:
            self._quant = kernels.op("quant_fp8_per_token_group")
            self._matmul = kernels.op("fp8_block_matmul")
        else:
            self._quant = kernels.op("quant_fp8_static" if self.scheme == "static"
                                     else "quant_fp8_per_token")
            self._matmul = kernels.op("fp8_matmul")
            self._w8a16 = kernels.op("fp8_w8a16_gemv")

    def create_weights(self, layer: nn.Module, in_per_partition: int, out_per_partition: int,
                       params_dtype: torch.dtype | None) -> None:
        """Online: a float ``weight``; pre-quantized: fp8 ``weight``, ``weight_scale`` (and
        ``input_scale`` when static)."""
        n, k = out_per_partition, in_per_partition
        if self.online:
            new_param(layer, "weight", (n, k), params_dtype, ShardMeta())
            return
        new_param(layer, "weight", (n, k), FP8_DTYPE, ShardMeta())
        if self.block:
            blocks = (-(-n // FP8_BLOCK), -(-k // FP8_BLOCK))
            new_param(layer, "weight_scale", blocks, torch.float32,
                      ShardMeta(output_pack=FP8_BLOCK, input_pack=FP8_BLOCK,
                                input_group=FP8_BLOCK))
        else:
            new_param(layer, "weight_scale", (n,), torch.float32,
                      ShardMeta(input_dim=None, broadcast=True))
        if self.scheme == "static":
            new_param(layer, "input_scale", (1,), torch.float32,
                      ShardMeta(output_dim=None, input_dim=None, merge="max"), fill=0.0)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Online: quantizes ``weight`` per channel. Static: checks ``input_scale`` > 0."""
        if self.online:
            q, scale = quantize_fp8_per_channel(layer.weight.data,
                                                row_parallel=bool(layer.input_is_parallel))
            del layer._parameters["weight"]
            replace_param(layer, "weight", q, ShardMeta())
            replace_param(layer, "weight_scale", scale, ShardMeta(input_dim=None))
        elif self.scheme == "static" and not bool((layer.input_scale > 0).all()):
            raise ValueError(f"fp8 static checkpoint: {type(layer).__name__}.input_scale is "
                             "not positive (missing from the checkpoint?)")

    def apply(self, layer: nn.Module, x: torch.Tensor,
              bias: torch.Tensor | None) -> torch.Tensor:
        """``x [M, K]`` -> ``[M, N]`` in x's dtype (activations quantized per the scheme)."""
        if self.scheme == "none":
            w = dequantize_fp8(layer.weight, layer.weight_scale).to(x.dtype)
            return F.linear(x, w, bias)
        if x.is_cuda and not self.block and x.shape[0] <= quant_gemv.FP8_MAX_M:
            # decode batches: the weight stream is the whole cost, so the weight-only GEMV
            # reads the e4m3 weights with x as it is (no activation quantization kernel)
            return self._w8a16.fn(x, layer.weight, layer.weight_scale, bias)
        if self.scheme == "static":
            x_scale = layer.input_scale
            x_fp8 = self._quant.fn(x, x_scale)
        elif layer.input_is_parallel and not self.block:
            x_fp8, x_scale = quant_fp8_row_parallel(x)
        else:
            x_fp8, x_scale = self._quant.fn(x)
        return self._matmul.fn(x_fp8, x_scale, layer.weight, layer.weight_scale, x.dtype, bias)

    def weight_bytes(self, layer: nn.Module) -> int:
        """fp8 weight + scales (+ bias)."""
        return tensor_bytes(layer.weight, layer.weight_scale, getattr(layer, "input_scale", None),
                            getattr(layer, "bias", None))

    def describe(self) -> str:
        """e.g. ``fp8 e4m3 per-channel (w8a8 dynamic)``."""
        kind = "block128" if self.block else "per-channel"
        act = {"dynamic": "w8a8 dynamic", "static": "w8a8 static", "none": "w8a16"}[self.scheme]
        small = "" if self.block or self.scheme == "none" else \
            f"; w8a16 gemv up to {quant_gemv.FP8_MAX_M} rows on a GPU"
        return f"fp8 e4m3 {kind} ({act}{small})"
