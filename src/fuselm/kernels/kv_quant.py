"""The FP8 (e4m3fn) KV cache's number format: per-layer scalar scales, quantize and dequantize.

A cache tensor of dtype ``torch.float8_e4m3fn`` holds ``q = e4m3(clamp(x / scale, -448, 448))``
(round to nearest even, saturating) for every element ``x`` of K (scale ``k_scale``) or V
(``v_scale``); it reads back as ``q.float() * scale``. A cache of any other dtype ignores the
scales (stores ``x`` converted, reads it back converted). The attention kernels compute with the
dequantized values; ``rotary_store_kv`` writes the quantized ones.

Scales are Python floats held by the attention layer (fixed after loading, so they enter the
kernels as scalars and a captured CUDA graph keeps them): a checkpoint's ``k_scale`` /
``v_scale`` when present, else ``DEFAULT_KV_SCALE``.
"""

from __future__ import annotations

import torch

FP8_KV_DTYPE = torch.float8_e4m3fn
FP8_E4M3_MAX = 448.0  # the largest finite e4m3fn value
# Default scale without a checkpoint's: 1.0, as vLLM. e4m3 keeps 3 mantissa bits from 2^-6 to
# 448, so any scale that neither saturates (|x| > 448 s) nor pushes most values into the
# subnormals (|x| < 2^-6 s) gives the same <= 6.25 % relative error; the K and V of the default
# model sit well inside that range at 1.0 (SmolLM2-135M, 512 tokens: per-layer max |k| 13-28,
# max |v| 3-13, 1-6 % of |v| below 2^-6; teacher-forced perplexity over 2,044 tokens +0.51 %).
DEFAULT_KV_SCALE = 1.0
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")


def kv_cache_torch_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The cache tensors' dtype for ``--kv-cache-dtype``: auto is the model's dtype, fp8 and
    fp8_e4m3 are ``torch.float8_e4m3fn``."""
    if kv_cache_dtype == "auto":
        return model_dtype
    if kv_cache_dtype in ("fp8", "fp8_e4m3"):
        return FP8_KV_DTYPE
    raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {kv_cache_dtype!r}")


def is_fp8_cache(cache: torch.Tensor) -> bool:
    """True for an FP8 (e4m3fn) KV cache tensor."""
    return cache.dtype == FP8_KV_DTYPE


def check_kv_scale(name: str, scale: float) -> float:
    """``scale`` as a float; ValueError naming it unless finite and > 0."""
    value = float(scale)
    if not (value > 0 and value != float("inf")):
        raise ValueError(f"{name} must be a finite float > 0, got {scale!r}")
    return value


def quantize_kv_ref(x: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """``x`` as a cache of ``dtype`` holds it: fp8 ``e4m3(clamp(x / scale))`` (the division in
    float32, round to nearest even, saturating at 448), else ``x.to(dtype)``."""
    if dtype != FP8_KV_DTYPE:
        return x.to(dtype)
    divisor = torch.tensor(scale, dtype=torch.float32, device=x.device)
    return (x.float() / divisor).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(dtype)


def dequantize_kv_ref(cache: torch.Tensor, scale: float) -> torch.Tensor:
    """A cache (or part of one) as float32 values: fp8 times ``scale``, others converted."""
    if cache.dtype != FP8_KV_DTYPE:
        return cache.float()
    return cache.float() * scale
