"""SwiGLU gate: ``out = silu(x[..., :d]) * x[..., d:]`` for x ``[num_tokens, 2 * d]``.

x's rows may be strided (last dim contiguous); out is a new contiguous ``[..., d]`` of x's dtype.
Backends: ``silu_and_mul_ref`` (the spec), ``silu_and_mul_triton`` (the torch op
``fuselm::silu_and_mul``), ``silu_and_mul_cuda`` (``fuselm_C::silu_and_mul``,
``csrc/silu_and_mul.cu``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fuselm.kernels import _extension, _registry, _triton_utils
from fuselm.kernels._triton_utils import FUSELM_LIB, as_rows, next_power_of_2


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch SiLU-and-mul, computed in float32; returns ``[..., d]`` in x's dtype."""
    d = x.shape[-1] // 2
    xf = x.float()
    return (F.silu(xf[..., :d]) * xf[..., d:]).to(x.dtype)


_registry.register("silu_and_mul", "reference", silu_and_mul_ref)


# --------------------------------------------------------------------------------------------
# Triton. Grid (rows, column tiles): a program reads one BLOCK-wide tile of the gate and of the
# up half of its row and writes one tile of out; every byte moves once, fp32 math.
# --------------------------------------------------------------------------------------------


def _silu_config(d: int, elem_size: int, num_rows: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK, num_warps): the tile that wastes fewest masked lanes, ~2 vectors a thread."""
    if d <= 512:
        block = next_power_of_2(d)
    else:
        # ties go to the larger tile: 1536 -> 512 (3 full tiles), 14336 -> 2048 (7 tiles)
        block = min((2048, 1024, 512), key=lambda b: (-(-d // b) * b - d, -b))
    num_warps = max(1, min(16, block * elem_size // 1024))
    if num_rows >= 1024 and device.type == "cuda":
        tuned = _triton_utils.tuned_triton_config(
            "silu_and_mul", f"d{d}", "cuda", device.index or 0
        )
        block, num_warps = tuned.get("block", block), tuned.get("num_warps", num_warps)
    return block, num_warps


if _triton_utils.triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _silu_and_mul_kernel(
        x_ptr,  # [num_rows, 2 * d], rows x_stride apart
        out_ptr,  # [num_rows, d]
        d,
        x_stride,
        out_stride,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < d
        x_row = x_ptr + row * x_stride
        g = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(x_row + d + cols, mask=mask, other=0.0).to(tl.float32)
        y = g * tl.sigmoid(g) * u
        tl.store(out_ptr + row * out_stride + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def _launch_silu_and_mul(x2: torch.Tensor, out2: torch.Tensor, block: int, num_warps: int):
    """Launches ``_silu_and_mul_kernel`` with an explicit config (the benchmark sweeps it)."""
    num_rows, d = out2.shape
    if num_rows == 0 or d == 0:
        return
    grid = (num_rows, triton.cdiv(d, block))
    _silu_and_mul_kernel[grid](
        x2, out2, d, x2.stride(0), out2.stride(0), BLOCK=block, num_warps=num_warps
    )


def _silu_out(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x2 = as_rows(x, "x")
    if x.shape[-1] % 2:
        raise ValueError(f"silu_and_mul needs an even last dimension, got {x.shape[-1]}")
    d = x.shape[-1] // 2
    out = torch.empty((*x.shape[:-1], d), dtype=x.dtype, device=x.device)
    return x2, out, out.view(-1, d)


def silu_and_mul_triton(x: torch.Tensor) -> torch.Tensor:
    """Triton SiLU-and-mul; same contract as ``silu_and_mul_ref`` (output contiguous)."""
    x2, out, out2 = _silu_out(x)
    block, num_warps = _silu_config(out2.shape[1], x.element_size(), x2.shape[0], x.device)
    _launch_silu_and_mul(x2, out2, block, num_warps)
    return out


# --------------------------------------------------------------------------------------------
# CUDA: csrc/silu_and_mul.cu, registered as fuselm_C::silu_and_mul.
# --------------------------------------------------------------------------------------------


def silu_and_mul_cuda(x: torch.Tensor) -> torch.Tensor:
    """CUDA SiLU-and-mul (``fuselm_C::silu_and_mul``)."""
    x2, out, out2 = _silu_out(x)
    torch.ops.fuselm_C.silu_and_mul(out2, x2)
    return out


# --------------------------------------------------------------------------------------------
# Registration (see rms_norm.py).
# --------------------------------------------------------------------------------------------

FUSELM_LIB.define("silu_and_mul(Tensor x) -> Tensor")


@torch.library.register_fake("fuselm::silu_and_mul", lib=FUSELM_LIB)
def _silu_and_mul_fake(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))


if _triton_utils.triton_available():
    for _key in _triton_utils.triton_dispatch_keys():
        FUSELM_LIB.impl("silu_and_mul", silu_and_mul_triton, _key)
    _registry.register("silu_and_mul", "triton", torch.ops.fuselm.silu_and_mul.default)

if _extension.load_extension() is not None:
    _extension.register_fake_void("silu_and_mul")
    _registry.register("silu_and_mul", "cuda", silu_and_mul_cuda)
