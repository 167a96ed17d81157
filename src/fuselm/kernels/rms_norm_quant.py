"""RMSNorm (optionally after the residual add) fused with FP8 (e4m3fn) activation quantization.

``rms_norm_quant_fp8(x [M, H], weight [H], eps, residual=None, scale=None, group_size=0)`` ->
``(out_fp8 [M, H] float8_e4m3fn, out_scale float32)``:

- ``y = x / sqrt(mean(x**2, -1) + eps) * weight`` in float32 (not rounded to x's dtype before
  the quantization: one rounding, to fp8, instead of two);
- with ``residual`` ``[M, H]`` (x's dtype): in place ``residual += x`` first (the sum rounded to
  the dtype, as ``fused_add_rms_norm``), and the norm reads the sum; x is not modified;
- quantization: dynamic per token (``out_scale [M, 1] = max(max|y_row| / 448, FP8_MIN_SCALE)``),
  static per tensor with ``scale`` ``[1]`` (``out_scale`` is that scale, float32 ``[1]``), or
  dynamic per 1 x ``group_size`` group (``out_scale [M, ceil(H / group_size)]``, block FP8).

It replaces the norm + ``quant_fp8_*`` pair before a W8A8 linear layer (qkv after the input
norm, gate/up after the post-attention norm), so the activation is read once and written as one
byte per element.

The plain quantization ops of ``fp8_matmul.py`` (``quant_fp8_per_token``, ``quant_fp8_static``,
``quant_fp8_per_token_group``) are the same Triton kernel without the norm, so they live here.

Backends: ``*_ref`` (the spec); ``*_triton``, registered as the torch ops
``fuselm::rms_norm_quant_fp8``, ``fuselm::quant_fp8_per_token``, ``fuselm::quant_fp8_static``,
``fuselm::quant_fp8_per_token_group``. One program per row (one launch, no allocation beyond
the outputs); rows up to 16384 wide stay in registers, wider ones take three passes over
4096-column chunks (the later passes re-read the row, mostly from L2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fuselm.kernels import _pdl, triton_utils
from fuselm.kernels.fp8_matmul import (
    FP8_DTYPE,
    FP8_MIN_SCALE,
    quant_fp8_per_token_group_ref,
    quant_fp8_per_token_ref,
    quant_fp8_static_ref,
)


def _check_args(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None,
                scale: torch.Tensor | None, group_size: int) -> None:
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [M, H], got shape {tuple(x.shape)}")
    hidden = x.shape[1]
    if weight.dim() != 1 or weight.shape[0] != hidden:
        raise ValueError(f"weight must be [{hidden}], got {tuple(weight.shape)}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"residual {tuple(residual.shape)} {residual.dtype} must match x "
                         f"{tuple(x.shape)} {x.dtype}")
    if group_size < 0:
        raise ValueError(f"group_size must be 0 (per token) or positive, got {group_size}")
    if scale is not None and (scale.numel() != 1 or group_size):
        raise ValueError("scale (static quantization) must hold one element and excludes "
                         f"group_size; got scale {tuple(scale.shape)}, group_size {group_size}")


def rms_norm_quant_fp8_ref(x: torch.Tensor, weight: torch.Tensor, eps: float,
                           residual: torch.Tensor | None = None,
                           scale: torch.Tensor | None = None, group_size: int = 0
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch spec (see the module docstring); mutates ``residual`` only."""
    _check_args(x, weight, residual, scale, group_size)
    src = x
    if residual is not None:
        residual.add_(x)
        src = residual
    y = F.rms_norm(src.float(), (src.shape[-1],), weight.float(), eps)
    if scale is not None:
        return quant_fp8_static_ref(y, scale), scale.float().reshape(1)
    if group_size:
        return quant_fp8_per_token_group_ref(y, group_size)
    return quant_fp8_per_token_ref(y)


# --------------------------------------------------------------------------------------------
# Triton. A row is a [NG, G] tile: NG groups of G columns (G = group_size, or 128 per token),
# so a group's scale is a reduction over axis 1 and the row's over both.
# --------------------------------------------------------------------------------------------

_MAX_ONE_PASS = 16384  # an fp32 row of 64 KB in registers (as rms_norm.py)
_CHUNK = 4096
_MODE = {"token": 0, "static": 1, "group": 2}

if triton_utils.triton_available():
    import triton
    import triton.language as tl

    from fuselm.kernels._pdl import pdl_wait_then_release
    from fuselm.kernels.fp8_triton import quantize_fp8

    FP8_MIN = tl.constexpr(FP8_MIN_SCALE)

    @triton.jit
    def _load_src(x_row, r_row, offs, mask, ADD_RESIDUAL: tl.constexpr):
        """fp32 tile of x, or of x + residual rounded to the dtype and stored into residual."""
        v = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
        if ADD_RESIDUAL:
            s = v + tl.load(r_row + offs, mask=mask, other=0.0).to(tl.float32)
            s = s.to(r_row.dtype.element_ty)
            tl.store(r_row + offs, s, mask=mask)
            v = s.to(tl.float32)
        return v

    @triton.jit
    def _normed(v, w_ptr, offs, mask, rstd, NORM: tl.constexpr):
        if NORM:
            v = v * rstd * tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        return v

    @triton.jit
    def _quant_store(v, offs, mask, q_row, s_row, g0, num_groups, scale,
                     MODE: tl.constexpr, NG: tl.constexpr, INTERPRET: tl.constexpr):
        """Quantizes a [NG, G] tile; MODE 2 computes and stores its NG group scales (groups
        g0 .. g0 + NG), else ``scale`` (a scalar) is the row's or the static one."""
        if MODE == 2:
            gmax = tl.max(tl.abs(v), axis=1)  # [NG]
            gscale = tl.maximum(tl.math.div_rn(gmax, 448.0), FP8_MIN)
            gi = g0 + tl.arange(0, NG)
            tl.store(s_row + gi, gscale, mask=gi < num_groups)
            q = quantize_fp8(v, gscale[:, None], INTERPRET)
        else:
            q = quantize_fp8(v, scale, INTERPRET)
        tl.store(q_row + offs, q, mask=mask)

    @triton.jit
    def _rms_norm_quant_kernel(
        x_ptr, r_ptr, w_ptr, q_ptr, s_ptr, static_ptr,
        hidden, num_groups, x_stride, r_stride, q_stride, s_stride, eps,
        G: tl.constexpr,  # columns a group (power of 2)
        NG: tl.constexpr,  # groups a tile: the whole row (ONE_PASS) or a chunk
        NUM_CHUNKS: tl.constexpr,  # tiles a row when not ONE_PASS
        ONE_PASS: tl.constexpr, NORM: tl.constexpr, ADD_RESIDUAL: tl.constexpr,
        MODE: tl.constexpr,  # 0 per token, 1 static, 2 per group
        INTERPRET: tl.constexpr, USE_PDL: tl.constexpr = False,
    ):
        pdl_wait_then_release(USE_PDL)
        row = tl.program_id(0).to(tl.int64)
        tile = tl.arange(0, NG)[:, None] * G + tl.arange(0, G)[None, :]  # [NG, G]
        x_row, r_row = x_ptr + row * x_stride, r_ptr + row * r_stride
        q_row, s_row = q_ptr + row * q_stride, s_ptr + row * s_stride
        scale = 1.0
        if MODE == 1:
            scale = tl.load(static_ptr)
            if row == 0:  # the returned scale: a copy, not an alias of the input
                tl.store(s_ptr, scale)
        if ONE_PASS:
            mask = tile < hidden
            v = _load_src(x_row, r_row, tile, mask, ADD_RESIDUAL)
            rstd = 1.0
            if NORM:
                rstd = tl.rsqrt(tl.sum(tl.sum(v * v, axis=1), axis=0) / hidden + eps)
            v = _normed(v, w_ptr, tile, mask, rstd, NORM)
            if MODE == 0:
                scale = tl.maximum(tl.math.div_rn(tl.max(tl.max(tl.abs(v), axis=1), axis=0),
                                                  448.0), FP8_MIN)
                tl.store(s_row, scale)
            _quant_store(v, tile, mask, q_row, s_row, 0, num_groups, scale, MODE, NG, INTERPRET)
        else:
            src_row = x_row
            rstd = 1.0
            if NORM or ADD_RESIDUAL:  # pass 1: the residual sum and the sum of squares
                acc = tl.zeros([NG, G], dtype=tl.float32)
                for c in range(NUM_CHUNKS):
                    offs = c * NG * G + tile
                    v = _load_src(x_row, r_row, offs, offs < hidden, ADD_RESIDUAL)
                    acc += v * v
                rstd = tl.rsqrt(tl.sum(tl.sum(acc, axis=1), axis=0) / hidden + eps)
                tl.debug_barrier()  # pass 1's residual stores are read back below
                if ADD_RESIDUAL:
                    src_row = r_row
            if MODE == 0:  # pass 2: the row's largest |y|
                amax = tl.zeros([NG, G], dtype=tl.float32)
                for c in range(NUM_CHUNKS):
                    offs = c * NG * G + tile
                    v = tl.load(src_row + offs, mask=offs < hidden, other=0.0).to(tl.float32)
                    amax = tl.maximum(amax, tl.abs(_normed(v, w_ptr, offs, offs < hidden,
                                                           rstd, NORM)))
                scale = tl.maximum(tl.math.div_rn(tl.max(tl.max(amax, axis=1), axis=0),
                                                  448.0), FP8_MIN)
                tl.store(s_row, scale)
            for c in range(NUM_CHUNKS):  # last pass: quantize and store
                offs = c * NG * G + tile
                mask = offs < hidden
                v = tl.load(src_row + offs, mask=mask, other=0.0).to(tl.float32)
                v = _normed(v, w_ptr, offs, mask, rstd, NORM)
                _quant_store(v, offs, mask, q_row, s_row, c * NG, num_groups, scale, MODE,
                             NG, INTERPRET)


def _launch(x, residual, weight, static_scale, group_size: int, eps: float, norm: bool
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Allocates the outputs and launches one program per row."""
    m, hidden = x.shape
    mode = "static" if static_scale is not None else ("group" if group_size else "token")
    g = group_size if group_size else 128
    if g & (g - 1):
        raise ValueError(f"the Triton kernel needs a power-of-2 group_size, got {group_size}")
    num_groups = -(-hidden // g)
    q = torch.empty(m, hidden, dtype=FP8_DTYPE, device=x.device)
    static = static_scale.float().reshape(1) if static_scale is not None else None
    if mode == "static":
        scale = torch.empty(1, dtype=torch.float32, device=x.device)
    else:
        scale = torch.empty(m, num_groups if mode == "group" else 1, dtype=torch.float32,
                            device=x.device)
    if m == 0 or hidden == 0:
        if static is not None:
            scale.copy_(static)
        else:
            scale.fill_(FP8_MIN_SCALE)
        return q, scale
    block = triton_utils.next_power_of_2(hidden)
    one_pass = block <= _MAX_ONE_PASS
    tile = max(block, g) if one_pass else max(_CHUNK, g)
    res = residual if residual is not None else x
    _rms_norm_quant_kernel[(m,)](
        x, res, weight if weight is not None else x, q, scale,
        static if static is not None else scale, hidden, num_groups,
        x.stride(0), res.stride(0), q.stride(0), scale.stride(0) if scale.dim() == 2 else 0,
        eps, G=g, NG=tile // g, NUM_CHUNKS=triton.cdiv(hidden, tile), ONE_PASS=one_pass,
        NORM=norm, ADD_RESIDUAL=residual is not None, MODE=_MODE[mode],
        INTERPRET=triton_utils.is_interpreting(), num_warps=max(1, min(16, tile // 1024)),
        **_pdl.launch_args(x),
    )  # fmt: skip
    return q, scale


def _rows(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [M, K], got shape {tuple(x.shape)}")
    return triton_utils.as_rows(x, name)


def rms_norm_quant_fp8_triton(x: torch.Tensor, weight: torch.Tensor, eps: float,
                              residual: torch.Tensor | None = None,
                              scale: torch.Tensor | None = None, group_size: int = 0
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton fused (residual add +) RMSNorm + FP8 quantization; the reference's contract."""
    _check_args(x, weight, residual, scale, group_size)
    x2 = _rows(x, "x")
    r2 = _rows(residual, "residual") if residual is not None else None
    if weight.stride(0) != 1 or weight.device != x.device:
        raise ValueError(f"weight must be contiguous and on {x.device}")
    return _launch(x2, r2, weight, scale, group_size, eps, norm=True)


def quant_fp8_per_token_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton ``quant_fp8_per_token``; the reference's contract."""
    return _launch(_rows(x, "x"), None, None, None, 0, 0.0, norm=False)


def quant_fp8_static_triton(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Triton ``quant_fp8_static``; the reference's contract."""
    if scale.numel() != 1:
        raise ValueError(f"scale must hold one element (per tensor), got {tuple(scale.shape)}")
    return _launch(_rows(x, "x"), None, None, scale, 0, 0.0, norm=False)[0]


def quant_fp8_per_token_group_triton(x: torch.Tensor, group_size: int = 128
                                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton ``quant_fp8_per_token_group``; the reference's contract."""
    if group_size <= 0:
        raise ValueError(f"group_size must be positive, got {group_size}")
    return _launch(_rows(x, "x"), None, None, None, group_size, 0.0, norm=False)


# --------------------------------------------------------------------------------------------
# Registration.
# --------------------------------------------------------------------------------------------

FUSELM_LIB = triton_utils.FUSELM_LIB
FUSELM_LIB.define("rms_norm_quant_fp8(Tensor x, Tensor weight, float eps, "
                  "Tensor(a!)? residual=None, Tensor? scale=None, int group_size=0) "
                  "-> (Tensor, Tensor)")
FUSELM_LIB.define("quant_fp8_per_token(Tensor x) -> (Tensor, Tensor)")
FUSELM_LIB.define("quant_fp8_static(Tensor x, Tensor scale) -> Tensor")
FUSELM_LIB.define("quant_fp8_per_token_group(Tensor x, int group_size=128) -> (Tensor, Tensor)")


def _fake_scale(x: torch.Tensor, scale, group_size: int) -> torch.Tensor:
    if scale is not None:
        return x.new_empty((1,), dtype=torch.float32)
    cols = -(-x.shape[1] // group_size) if group_size else 1
    return x.new_empty((x.shape[0], cols), dtype=torch.float32)


@torch.library.register_fake("fuselm::rms_norm_quant_fp8", lib=FUSELM_LIB)
def _rms_norm_quant_fp8_fake(x, weight, eps, residual=None, scale=None, group_size=0):
    return x.new_empty(x.shape, dtype=FP8_DTYPE), _fake_scale(x, scale, group_size)


@torch.library.register_fake("fuselm::quant_fp8_per_token", lib=FUSELM_LIB)
def _quant_fp8_per_token_fake(x):
    return x.new_empty(x.shape, dtype=FP8_DTYPE), _fake_scale(x, None, 0)


@torch.library.register_fake("fuselm::quant_fp8_static", lib=FUSELM_LIB)
def _quant_fp8_static_fake(x, scale):
    return x.new_empty(x.shape, dtype=FP8_DTYPE)


@torch.library.register_fake("fuselm::quant_fp8_per_token_group", lib=FUSELM_LIB)
def _quant_fp8_per_token_group_fake(x, group_size=128):
    return x.new_empty(x.shape, dtype=FP8_DTYPE), _fake_scale(x, None, group_size)


if triton_utils.triton_available():
    for _key in triton_utils.triton_dispatch_keys():
        FUSELM_LIB.impl("rms_norm_quant_fp8", rms_norm_quant_fp8_triton, _key)
        FUSELM_LIB.impl("quant_fp8_per_token", quant_fp8_per_token_triton, _key)
        FUSELM_LIB.impl("quant_fp8_static", quant_fp8_static_triton, _key)
        FUSELM_LIB.impl("quant_fp8_per_token_group", quant_fp8_per_token_group_triton, _key)
