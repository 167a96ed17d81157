"""FP8 (e4m3fn) W8A8 linear layers: activation quantization and scaled matrix products.

Canonical layouts (QUANT_SPEC, issue #18). Logical weight ``W [N, K]``; ``y = x @ W.T + bias``.

- ``quant_fp8_per_token(x [M, K])`` -> ``(x_fp8 [M, K] float8_e4m3fn, scale float32 [M, 1])``:
  ``scale = max(max|x_row|, eps) / 448``, ``x_fp8 = clamp(x / scale, -448, 448)`` rounded to
  nearest even (``x ~= x_fp8 * scale``). ``quant_fp8_static(x, scale [1])`` uses a given
  per-tensor scale; ``quant_fp8_per_token_group(x, group_size=128)`` a scale per 1 x 128 group
  (``[M, ceil(K / 128)]``, DeepSeek-V3 block-FP8 activations).
- ``fp8_matmul(x_fp8 [M, K], x_scale [M, 1] | [1], weight [N, K] fp8, weight_scale [N] | [1],
  out_dtype, bias [N] | None)`` -> ``[M, N]`` of ``out_dtype``:
  ``(x_fp8 * x_scale) @ (weight * weight_scale[:, None]).T + bias``, accumulated in float32.
- ``fp8_block_matmul(x_fp8, x_scale [M, ceil(K/128)], weight, weight_scale [ceil(N/128),
  ceil(K/128)], out_dtype, bias)``: the same product with a scale per 128 x 128 weight block
  and per 1 x 128 activation group.

Scales of any float dtype are upcast to float32. Nothing here is in place.

``fp8_w8a16_gemv(x [M, K] float, weight, weight_scale, bias)``: the weight-only product
``x @ (weight * weight_scale).T + bias`` in x's dtype, for batch-1 decode where quantizing the
activation costs a kernel and buys nothing (the weight stream is the whole cost).

Backends: ``*_ref`` (the spec, float32 math, any device); ``*_triton`` (kernels in
``fp8_triton.py``; torch ops ``fuselm::fp8_matmul``, ``fuselm::fp8_block_matmul``,
``fuselm::fp8_w8a16_gemv``): a weight-streaming GEMV at small M, a tiled tensor-core GEMM
above; ``fp8_matmul_cuda``: cuBLASLt through ``torch._scaled_mm`` (per-tensor, or rowwise
per-token x per-channel scales), except for the weight shapes and M buckets where
``configs/fp8_matmul.json`` (``python -m fuselm.bench.kernels_fp8``) measured the Triton kernel
faster. The quantization ops are in ``rms_norm_quant.py`` with the fused norm.
"""

from __future__ import annotations

from functools import cache

import torch

from fuselm.kernels import triton_utils
from fuselm.kernels.triton_utils import FUSELM_LIB

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
# The smallest scale a row may get: an all-zero row quantizes to zeros instead of 0/0, and
# 1/scale stays finite in float32.
FP8_MIN_SCALE = 1.0 / (FP8_MAX * 512.0)
FP8_BLOCK = 128  # block-FP8 checkpoints: 128 x 128 weight blocks, 1 x 128 activation groups


# --------------------------------------------------------------------------------------------
# References (the spec): plain PyTorch in float32.
# --------------------------------------------------------------------------------------------


def amax_scale(amax: torch.Tensor) -> torch.Tensor:
    """``max(amax / 448, FP8_MIN_SCALE)`` in float32 with an IEEE division, as the kernels
    compute it (``div_rn``): PyTorch's CUDA kernel multiplies by the reciprocal of a
    Python-number divisor, which rounds about half the scales one ulp away and moves ~0.1 % of
    the quantized values one e4m3 step."""
    amax = amax.float()
    return (amax / torch.full_like(amax, FP8_MAX)).clamp(min=FP8_MIN_SCALE)


def _check_float_2d(x: torch.Tensor, name: str) -> None:
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [M, K], got shape {tuple(x.shape)}")
    if not x.dtype.is_floating_point or x.dtype == FP8_DTYPE:
        raise ValueError(f"{name} must be a float16/bfloat16/float32 tensor, got {x.dtype}")


def _to_fp8(scaled: torch.Tensor) -> torch.Tensor:
    # torch's cast does not saturate (an out-of-range value becomes NaN): clamp first
    return scaled.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def quant_fp8_per_token_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token quantization of ``x [M, K]`` (float) to e4m3fn: ``(x_fp8 [M, K],
    scale float32 [M, 1])`` with ``scale = max(max|x_row| / 448, FP8_MIN_SCALE)``."""
    _check_float_2d(x, "x")
    xf = x.float()
    amax = xf.abs().amax(dim=1, keepdim=True) if x.shape[1] else xf.new_zeros(x.shape[0], 1)
    scale = amax_scale(amax)
    return _to_fp8(xf / scale), scale


def quant_fp8_static_ref(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Static per-tensor quantization of ``x [M, K]`` with a given ``scale`` (one element):
    ``clamp(x / scale, -448, 448)`` as e4m3fn."""
    _check_float_2d(x, "x")
    if scale.numel() != 1:
        raise ValueError(f"scale must hold one element (per tensor), got {tuple(scale.shape)}")
    return _to_fp8(x.float() / scale.float().reshape(1, 1))


def quant_fp8_per_token_group_ref(x: torch.Tensor, group_size: int = FP8_BLOCK
                                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token-group quantization of ``x [M, K]``: one scale per ``1 x group_size``
    group, ``(x_fp8 [M, K], scale float32 [M, ceil(K / group_size)])`` (the last group may be
    short)."""
    _check_float_2d(x, "x")
    if group_size <= 0:
        raise ValueError(f"group_size must be positive, got {group_size}")
    m, k = x.shape
    groups = -(-k // group_size)
    padded = torch.zeros(m, groups * group_size, dtype=torch.float32, device=x.device)
    padded[:, :k] = x.float()
    padded = padded.view(m, groups, group_size)
    scale = amax_scale(padded.abs().amax(dim=2))  # [M, groups]
    q = _to_fp8(padded / scale[:, :, None]).view(m, groups * group_size)[:, :k]
    return q.contiguous(), scale


def _check_fp8_operands(x_fp8: torch.Tensor, weight: torch.Tensor) -> tuple[int, int, int]:
    if x_fp8.dim() != 2 or x_fp8.dtype != FP8_DTYPE:
        raise ValueError(f"x_fp8 must be a 2-D float8_e4m3fn tensor, got {x_fp8.dtype} "
                         f"{tuple(x_fp8.shape)}")
    if weight.dim() != 2 or weight.dtype != FP8_DTYPE:
        raise ValueError(f"weight must be a 2-D float8_e4m3fn tensor [N, K], got "
                         f"{weight.dtype} {tuple(weight.shape)}")
    if weight.shape[1] != x_fp8.shape[1]:
        raise ValueError(f"weight {tuple(weight.shape)} has K={weight.shape[1]} but x_fp8 "
                         f"{tuple(x_fp8.shape)} has K={x_fp8.shape[1]}")
    return x_fp8.shape[0], weight.shape[0], weight.shape[1]


def x_scale_column(x_scale: torch.Tensor, m: int) -> torch.Tensor:
    """``x_scale`` ([M, 1], [M], [1] or 0-d) as a float32 ``[M, 1]`` or ``[1, 1]`` tensor."""
    if x_scale.numel() == 1 and x_scale.dim() <= 1 or tuple(x_scale.shape) == (1, 1):
        return x_scale.float().reshape(1, 1)
    if tuple(x_scale.shape) in ((m, 1), (m,)):
        return x_scale.float().reshape(m, 1)
    raise ValueError(f"x_scale must be [M, 1] (per token, M={m}) or [1] (per tensor), got "
                     f"{tuple(x_scale.shape)}")


def weight_scale_row(weight_scale: torch.Tensor, n: int) -> torch.Tensor:
    """``weight_scale`` ([N], [N, 1], [1] or 0-d) as a float32 ``[1, N]`` or ``[1, 1]``
    tensor."""
    if weight_scale.numel() == 1 and (weight_scale.dim() <= 1 or n != 1):
        return weight_scale.float().reshape(1, 1)
    if tuple(weight_scale.shape) in ((n,), (n, 1)):
        return weight_scale.float().reshape(1, n)
    raise ValueError(f"weight_scale must be [N] (per channel, N={n}) or [1] (per tensor), "
                     f"got {tuple(weight_scale.shape)}")


def _check_bias(bias: torch.Tensor | None, n: int) -> None:
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must be [N] = [{n}], got {tuple(bias.shape)}")


def fp8_matmul_ref(x_fp8: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor,
                   weight_scale: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """``(x_fp8 * x_scale) @ (weight * weight_scale).T + bias`` in float32, as ``out_dtype``
    ``[M, N]``. x_scale ``[M, 1]`` or ``[1]``, weight_scale ``[N]`` or ``[1]``."""
    m, n, _ = _check_fp8_operands(x_fp8, weight)
    xs, ws = x_scale_column(x_scale, m), weight_scale_row(weight_scale, n)
    _check_bias(bias, n)
    out = (x_fp8.float() @ weight.float().t()) * xs * ws
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


def block_scale_shapes(m: int, n: int, k: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Expected (x_scale, weight_scale) shapes of ``fp8_block_matmul``."""
    kb = -(-k // FP8_BLOCK)
    return (m, kb), (-(-n // FP8_BLOCK), kb)


def _check_block_scales(x_scale: torch.Tensor, weight_scale: torch.Tensor, m: int, n: int,
                        k: int) -> None:
    xs_shape, ws_shape = block_scale_shapes(m, n, k)
    if tuple(x_scale.shape) != xs_shape:
        raise ValueError(f"x_scale must be [M, ceil(K/128)] = {list(xs_shape)}, got "
                         f"{tuple(x_scale.shape)}")
    if tuple(weight_scale.shape) != ws_shape:
        raise ValueError(f"weight_scale must be [ceil(N/128), ceil(K/128)] = {list(ws_shape)}, "
                         f"got {tuple(weight_scale.shape)}")


def fp8_block_matmul_ref(x_fp8: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor,
                         weight_scale: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16,
                         bias: torch.Tensor | None = None) -> torch.Tensor:
    """Block-scaled product in float32: ``x = x_fp8 * x_scale`` per 1 x 128 group
    (x_scale ``[M, ceil(K/128)]``), ``W = weight * weight_scale`` per 128 x 128 block
    (weight_scale ``[ceil(N/128), ceil(K/128)]``); ``x @ W.T + bias`` as ``out_dtype``."""
    m, n, k = _check_fp8_operands(x_fp8, weight)
    _check_block_scales(x_scale, weight_scale, m, n, k)
    _check_bias(bias, n)
    xs = x_scale.float().repeat_interleave(FP8_BLOCK, dim=1)[:, :k]
    ws = weight_scale.float().repeat_interleave(FP8_BLOCK, 0).repeat_interleave(FP8_BLOCK, 1)
    out = (x_fp8.float() * xs) @ (weight.float() * ws[:n, :k]).t()
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


# --------------------------------------------------------------------------------------------
# cuBLASLt through torch._scaled_mm. mat_b is the weight's transpose view [K, N] (column-major,
# as cuBLASLt's FP8 path requires); rowwise scales must be float32 [M, 1] and [1, N].
# --------------------------------------------------------------------------------------------


def fp8_matmul_cuda(x_fp8: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor,
                    weight_scale: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """``fp8_matmul`` through ``torch._scaled_mm`` (cuBLASLt per-tensor, or the rowwise kernel
    when either scale is per row); same contract as ``fp8_matmul_ref``. K and N must be
    multiples of 16 (cuBLASLt's FP8 alignment)."""
    m, n, k = _check_fp8_operands(x_fp8, weight)
    xs, ws = x_scale_column(x_scale, m), weight_scale_row(weight_scale, n)
    _check_bias(bias, n)
    if k % 16 or n % 16:
        raise ValueError(f"torch._scaled_mm needs K and N multiples of 16, got K={k} N={n}")
    if x_fp8.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError("x_fp8 and weight must be contiguous in their last dimension")
    if x_fp8.device.type == "cuda" and _tuned_entry(n, k, m, x_fp8.device).get(
            "backend", "triton" if m <= UNTUNED_TRITON_MAX_M else "cuda") == "triton":
        return fp8_matmul_triton(x_fp8, x_scale, weight, weight_scale, out_dtype, bias)
    return scaled_mm(x_fp8, xs, weight, ws, out_dtype, bias)


def scaled_mm(x_fp8: torch.Tensor, xs: torch.Tensor, weight: torch.Tensor, ws: torch.Tensor,
              out_dtype: torch.dtype, bias: torch.Tensor | None,
              fast_accum: bool = True) -> torch.Tensor:
    """``torch._scaled_mm`` on checked operands: xs ``[M, 1]``/``[1, 1]``, ws ``[1, N]``/``[1,
    1]`` float32 (``x_scale_column``, ``weight_scale_row``). ``fast_accum``: Hopper's FP8
    tensor-core accumulation without periodic promotion to float32, as vLLM's CUTLASS kernels
    and Triton's fp8 dot do by default (the GPU tests bound its error at the 8B shapes)."""
    m, n = x_fp8.shape[0], weight.shape[0]
    if m == 0:
        return torch.empty(0, n, dtype=out_dtype, device=x_fp8.device)
    if xs.numel() == 1 and ws.numel() == 1:
        # cuBLASLt takes a bias of the output's dtype only
        bias = bias.to(out_dtype) if bias is not None else None
        return torch._scaled_mm(x_fp8, weight.t(), scale_a=xs.reshape(()),
                                scale_b=ws.reshape(()), bias=bias, out_dtype=out_dtype,
                                use_fast_accum=fast_accum)
    # rowwise: both scales per row (a per-tensor one broadcast); cuBLASLt/CUTLASS rowwise
    # writes bfloat16 only, so another out_dtype is a cast of the bf16 result
    xs = xs.expand(m, 1).contiguous()
    ws = ws.expand(1, n).contiguous()
    rowwise_bias = bias.to(torch.bfloat16) if bias is not None else None
    out = torch._scaled_mm(x_fp8, weight.t(), scale_a=xs, scale_b=ws, bias=rowwise_bias,
                           out_dtype=torch.bfloat16, use_fast_accum=fast_accum)
    return out if out_dtype == torch.bfloat16 else out.to(out_dtype)


# --------------------------------------------------------------------------------------------
# Triton (kernels in fp8_triton.py). Config: the tuning table's entry for the weight shape and
# M bucket (``n{N}_k{K}_m{bucket}``, block-scaled ``block_n{N}_k{K}_m{bucket}``), else the
# heuristics: GEMV up to GEMV_MAX_M rows, the tiled GEMM above.
# --------------------------------------------------------------------------------------------

M_BUCKETS = (1, 4, 16, 64, 256, 4096, 8192)  # what the benchmark measures
# Without a tuning-table entry the cuda backend sends M <= this to Triton: torch._scaled_mm's
# rowwise kernel is slow at small M (H200, qkv 6144x4096, M=1: 15.3 us, bf16 cuBLAS 15.8 us,
# the Triton GEMV 9.1 us; M=16: 15.5 vs Triton 11.5; M=256: 17.1 vs 16.3)
UNTUNED_TRITON_MAX_M = 256
# the GEMV at batch 1 only: with 4 rows a tile it made the 8B decode step 6.82 ms at batch 4
# (H200, 2026-12-02) where the 16-row GEMM tile made it 4.37 ms at batch 16 (bf16: 4.60, 4.90)
GEMV_MAX_M = 1


def m_bucket(m: int) -> int:
    """The smallest measured M bucket holding ``m`` rows (the largest for more)."""
    return next((b for b in M_BUCKETS if m <= b), M_BUCKETS[-1])


def shape_bucket(n: int, k: int, m: int, block_scaled: bool = False) -> str:
    """Tuning-table key of a weight shape and M bucket."""
    return f"{'block_' if block_scaled else ''}n{n}_k{k}_m{m_bucket(m)}"


@cache
def _table_entry(bucket: str, device_index: int) -> dict:
    entry = triton_utils.gpu_table_entry("fp8_matmul", device_index).get(bucket, {})
    return entry if isinstance(entry, dict) else {}


def _tuned_entry(n: int, k: int, m: int, device: torch.device,
                 block_scaled: bool = False) -> dict:
    if device.type != "cuda":
        return {}
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _table_entry(shape_bucket(n, k, m, block_scaled), index)


def triton_config(n: int, k: int, m: int, device: torch.device, block_scaled: bool = False):
    """The ``GemvConfig`` or ``GemmConfig`` the Triton path launches for this product."""
    from fuselm.kernels import fp8_triton as ft

    tuned = config_from_entry(_tuned_entry(n, k, m, device, block_scaled).get("triton"))
    if tuned is not None and not (block_scaled and isinstance(tuned, ft.GemvConfig)):
        return tuned
    if m <= GEMV_MAX_M and not block_scaled:
        cfg = ft.default_gemv_config(n, k)
        # a few rows: each weight tile loaded once for all of them (a power-of-2 row tile)
        return cfg if m == 1 else cfg._replace(rows_m=1 << (m - 1).bit_length())
    return ft.default_gemm_config(m, n, k, block_scaled)


def config_from_entry(entry: dict | None):
    """The ``GemvConfig`` / ``GemmConfig`` of a tuning-table ``triton`` entry (``{"kind":
    "gemv" | "gemm", <fields>}``), or None."""
    from fuselm.kernels import fp8_triton as ft

    if not isinstance(entry, dict):
        return None
    cls = {"gemv": ft.GemvConfig, "gemm": ft.GemmConfig}.get(entry.get("kind"))
    try:
        return cls(*(int(entry[f] if f in entry else cls._field_defaults[f])
                     for f in cls._fields)) if cls else None
    except (KeyError, TypeError, ValueError):
        return None  # a malformed entry: the heuristic config


def _check_triton_operands(x_fp8: torch.Tensor, weight: torch.Tensor) -> None:
    if x_fp8.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError("x_fp8 and weight must be contiguous in their last dimension")
    if x_fp8.device != weight.device:
        raise ValueError(f"x_fp8 on {x_fp8.device} but weight on {weight.device}")


def launch_fp8_matmul(x_fp8: torch.Tensor, xs: torch.Tensor, weight: torch.Tensor,
                      ws: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor,
                      cfg) -> None:
    """Launches the Triton kernel ``cfg`` names (GEMV or GEMM) into ``out [M, N]``; xs, ws
    contiguous float32 ``[M]``/``[1]`` and ``[N]``/``[1]`` (the benchmark sweeps configs)."""
    from fuselm.kernels import fp8_triton as ft

    if isinstance(cfg, ft.GemvConfig):
        ft.launch_gemv(x_fp8, xs, weight, ws, bias, out, cfg)
    else:
        ft.launch_gemm(x_fp8, xs, weight, ws, bias, out, cfg)


def fp8_matmul_triton(x_fp8: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor,
                      weight_scale: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16,
                      bias: torch.Tensor | None = None) -> torch.Tensor:
    """Triton ``fp8_matmul``; same contract as ``fp8_matmul_ref``."""
    m, n, k = _check_fp8_operands(x_fp8, weight)
    xs = x_scale_column(x_scale, m).reshape(-1).contiguous()
    ws = weight_scale_row(weight_scale, n).reshape(-1).contiguous()
    _check_bias(bias, n)
    _check_triton_operands(x_fp8, weight)
    out = torch.empty(m, n, dtype=out_dtype, device=x_fp8.device)
    launch_fp8_matmul(x_fp8, xs, weight, ws, bias, out, triton_config(n, k, m, x_fp8.device))
    return out


def fp8_block_matmul_triton(x_fp8: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor,
                            weight_scale: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16,
                            bias: torch.Tensor | None = None) -> torch.Tensor:
    """Triton ``fp8_block_matmul``; same contract as ``fp8_block_matmul_ref``."""
    from fuselm.kernels import fp8_triton as ft

    m, n, k = _check_fp8_operands(x_fp8, weight)
    _check_block_scales(x_scale, weight_scale, m, n, k)
    _check_bias(bias, n)
    _check_triton_operands(x_fp8, weight)
    xs = x_scale.float().contiguous()
    ws = weight_scale.float().contiguous()
    out = torch.empty(m, n, dtype=out_dtype, device=x_fp8.device)
    cfg = triton_config(n, k, m, x_fp8.device, block_scaled=True)
    ft.launch_gemm(x_fp8, xs, weight, ws, bias, out, cfg, block_scaled=True)
    return out


def _check_w8a16(x: torch.Tensor, weight: torch.Tensor) -> int:
    _check_float_2d(x, "x")
    if weight.dim() != 2 or weight.dtype != FP8_DTYPE or weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight must be a float8_e4m3fn [N, K={x.shape[1]}] tensor, got "
                         f"{weight.dtype} {tuple(weight.shape)}")
    return weight.shape[0]


def fp8_w8a16_gemv_ref(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """Weight-only ``x @ (weight * weight_scale).T + bias`` in float32, as x's dtype
    ``[M, N]``; x ``[M, K]`` float, weight fp8 ``[N, K]``, weight_scale ``[N]`` or ``[1]``."""
    n = _check_w8a16(x, weight)
    ws = weight_scale_row(weight_scale, n)
    _check_bias(bias, n)
    out = (x.float() @ weight.float().t()) * ws
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def fp8_w8a16_gemv_triton(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                          bias: torch.Tensor | None = None) -> torch.Tensor:
    """Weight-only GEMV (fp8 weight dequantized in registers); the reference's contract. Up to
    ``quant_gemv.FP8_MAX_M`` rows with a scale per row it runs the CUDA GEMV of
    ``quant_gemv`` where the extension is built, else the Triton one."""
    from fuselm.kernels import fp8_triton as ft
    from fuselm.kernels import quant_gemv

    n = _check_w8a16(x, weight)
    k = weight.shape[1]
    _check_bias(bias, n)
    cuda = quant_gemv.fp8_w8a16_gemv(x, weight, weight_scale)  # decode batches, when built
    if cuda is not None:
        return cuda if bias is None else cuda + bias
    ws = weight_scale_row(weight_scale, n).reshape(-1).contiguous()
    _check_triton_operands(x, weight)
    out = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    m = x.shape[0]
    cfg = triton_config(n, k, m, x.device)
    if not isinstance(cfg, ft.GemvConfig):  # the table chose a GEMM for W8A8 at this M
        cfg = ft.default_gemv_config(n, k)._replace(rows_m=1 << (min(m, 16) - 1).bit_length())
    ft.launch_gemv(x, None, weight, ws, bias, out, cfg)
    return out


# --------------------------------------------------------------------------------------------
# Registration: the Triton launchers as fuselm:: ops (opaque to torch.compile and CUDA graphs).
# --------------------------------------------------------------------------------------------

FUSELM_LIB.define("fp8_matmul(Tensor x_fp8, Tensor x_scale, Tensor weight, Tensor weight_scale, "
                  "ScalarType out_dtype, Tensor? bias=None) -> Tensor")
FUSELM_LIB.define("fp8_block_matmul(Tensor x_fp8, Tensor x_scale, Tensor weight, "
                  "Tensor weight_scale, ScalarType out_dtype, Tensor? bias=None) -> Tensor")
FUSELM_LIB.define("fp8_w8a16_gemv(Tensor x, Tensor weight, Tensor weight_scale, "
                  "Tensor? bias=None) -> Tensor")


@torch.library.register_fake("fuselm::fp8_matmul", lib=FUSELM_LIB)
def _fp8_matmul_fake(x_fp8, x_scale, weight, weight_scale, out_dtype, bias=None):
    return x_fp8.new_empty((x_fp8.shape[0], weight.shape[0]), dtype=out_dtype)


@torch.library.register_fake("fuselm::fp8_block_matmul", lib=FUSELM_LIB)
def _fp8_block_matmul_fake(x_fp8, x_scale, weight, weight_scale, out_dtype, bias=None):
    return x_fp8.new_empty((x_fp8.shape[0], weight.shape[0]), dtype=out_dtype)


@torch.library.register_fake("fuselm::fp8_w8a16_gemv", lib=FUSELM_LIB)
def _fp8_w8a16_gemv_fake(x, weight, weight_scale, bias=None):
    return x.new_empty((x.shape[0], weight.shape[0]))


if triton_utils.triton_available():
    for _key in triton_utils.triton_dispatch_keys():
        FUSELM_LIB.impl("fp8_matmul", fp8_matmul_triton, _key)
        FUSELM_LIB.impl("fp8_block_matmul", fp8_block_matmul_triton, _key)
        FUSELM_LIB.impl("fp8_w8a16_gemv", fp8_w8a16_gemv_triton, _key)
