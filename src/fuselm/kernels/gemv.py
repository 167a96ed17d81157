"""Weight-streaming matrix-vector product for batch-1 decode: ``out = x @ w.T (+ bias)``.

x ``[M, K]`` (M small, typically 1; last dim contiguous), w ``[N, K]`` row-major (a linear
layer's weight), bias ``[N]`` or None; out ``[M, N]`` in x's dtype, or float32 with
``fp32_out`` (the LM head's logits, without a separate cast kernel).

At M = 1 a linear layer is a pure stream of its weight: the kernel is one launch that reads
every weight byte once with 16-byte loads and reduces each output row in registers (no split-K
workspace, no second reduction kernel). Whether it beats cuBLAS is measured per weight shape by
``python -m fuselm.bench.kernels_gemv``, which writes ``configs/gemv.json``; the linear layers use
it only where that table says so (or with ``--kernel-backend triton``).

The gated variant computes the MLP's ``silu(x @ gate.T) * (x @ up.T)`` from the merged
``[2N, K]`` gate/up weight in the same stream (each program reads its gate rows and the matching
up rows), so the activation is no kernel of its own.

Backends: ``gemv_ref`` (float32 spec), ``gemv_triton`` (the torch op ``fuselm::gemv``);
``gemv_silu_mul_ref``, ``gemv_silu_mul_triton`` (``fuselm::gemv_silu_mul``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from fuselm.kernels import _pdl, triton_utils
from fuselm.kernels.triton_utils import FUSELM_LIB, next_power_of_2


def gemv_ref(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
             fp32_out: bool = False) -> torch.Tensor:
    """Plain PyTorch ``x @ w.T + bias`` in float32; x's dtype out unless ``fp32_out``."""
    out = x.float() @ w.float().t()
    if bias is not None:
        out = out + bias.float()
    return out if fp32_out else out.to(x.dtype)


def gemv_silu_mul_ref(x: torch.Tensor, w: torch.Tensor,
                      bias: torch.Tensor | None = None) -> torch.Tensor:
    """The gated MLP's first half in float32: ``silu(x @ gate.T) * (x @ up.T)`` with w ``[2N, K]``
    (gate rows, then up rows) and bias ``[2N]``; ``[M, N]`` in x's dtype."""
    h = gemv_ref(x, w, bias, fp32_out=True)
    n = h.shape[1] // 2
    return (F.silu(h[:, :n]) * h[:, n:]).to(x.dtype)


class GemvConfig(NamedTuple):
    """Launch parameters of the Triton kernel."""

    block_n: int  # output rows a program computes
    block_k: int  # columns loaded per loop iteration (a power of 2)
    num_warps: int
    num_stages: int = 1

    @property
    def label(self) -> str:
        """Stable name used by the sweep and the tuning table."""
        return f"n{self.block_n}_k{self.block_k}_w{self.num_warps}_s{self.num_stages}"

    @classmethod
    def from_dict(cls, d: dict) -> GemvConfig:
        """Reads the ``triton`` entry of the tuning table."""
        return cls(int(d["block_n"]), int(d["block_k"]), int(d["num_warps"]),
                   int(d.get("num_stages", 1)))

    def to_dict(self) -> dict:
        """The ``triton`` entry of the tuning table."""
        return self._asdict()


def shape_bucket(n: int, k: int) -> str:
    """Tuning-table key of a weight shape."""
    return f"n{n}_k{k}"


def default_config(n: int, k: int) -> GemvConfig:
    """A config that keeps ~16 KB of weight in flight a program: ``block_n`` rows of up to
    4096 columns (one 16-byte load per thread per row and 512 columns)."""
    block_k = min(next_power_of_2(k), 4096)
    block_n = max(1, min(8, 8192 // block_k))
    return GemvConfig(block_n, block_k, 4, 1)


def _check(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> None:
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"gemv needs x [M, K] and w [N, K], got {tuple(x.shape)} and "
                         f"{tuple(w.shape)}")
    if x.stride(1) != 1 or w.stride(1) != 1:
        raise ValueError("gemv needs x and w contiguous in their last dimension")
    if bias is not None and bias.shape != (w.shape[0],):
        raise ValueError(f"gemv bias must be [{w.shape[0]}], got {tuple(bias.shape)}")


if triton_utils.triton_available():
    import triton
    import triton.language as tl

    from fuselm.kernels._pdl import pdl_wait_then_release

    @triton.jit
    def _w_tile(w_rows, rows, k, N, K, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr):
        """A [BLOCK_N, BLOCK_K] weight tile (streamed once: evict first)."""
        if EVEN_K:
            if EVEN_N:
                wv = tl.load(w_rows + k[None, :], eviction_policy="evict_first")
            else:
                wv = tl.load(w_rows + k[None, :], mask=(rows < N)[:, None], other=0.0,
                             eviction_policy="evict_first")
        else:
            wv = tl.load(w_rows + k[None, :], mask=(rows < N)[:, None] & (k < K)[None, :],
                         other=0.0, eviction_policy="evict_first")
        return wv.to(tl.float32)

    @triton.jit
    def _x_chunk(x_row, k, K, EVEN_K: tl.constexpr):
        if EVEN_K:
            xv = tl.load(x_row + k)
        else:
            xv = tl.load(x_row + k, mask=k < K, other=0.0)
        return xv.to(tl.float32)

    @triton.jit
    def _gemv_kernel(
        x_ptr,  # [M, K], rows x_stride apart
        w_ptr,  # [N, K] ([2N, K] gated: gate rows, then up rows), rows w_stride apart
        b_ptr,  # [N] ([2N] gated) or a dummy
        out_ptr,  # [M, N], rows out_stride apart
        N,
        K,
        x_stride,
        w_stride,
        out_stride,
        HAS_BIAS: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        EVEN_N: tl.constexpr,
        EVEN_K: tl.constexpr,
        NUM_STAGES: tl.constexpr,
        PREFETCH: tl.constexpr,  # load the first weight tile before waiting for x
        USE_PDL: tl.constexpr,
        GATED: tl.constexpr = False,  # out = silu(x @ gate.T) * (x @ up.T)
    ):
        m = tl.program_id(1).to(tl.int64)
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.arange(0, BLOCK_K)
        w_rows = w_ptr + rows.to(tl.int64)[:, None] * w_stride
        up_rows = w_ptr + (rows + N).to(tl.int64)[:, None] * w_stride  # read only when GATED
        x_row = x_ptr + m * x_stride
        if PREFETCH:
            # the first weight tile does not depend on the previous kernel: with PDL it streams
            # while that kernel finishes; then wait for x
            acc = _w_tile(w_rows, rows, cols, N, K, EVEN_N, EVEN_K)
            if GATED:
                acc_up = _w_tile(up_rows, rows, cols, N, K, EVEN_N, EVEN_K)
            pdl_wait_then_release(USE_PDL)
            if GATED:
                x0 = _x_chunk(x_row, cols, K, EVEN_K)[None, :]
                acc = acc * x0
                acc_up = acc_up * x0
            else:
                acc = acc * _x_chunk(x_row, cols, K, EVEN_K)[None, :]
            start = BLOCK_K
        else:
            pdl_wait_then_release(USE_PDL)
            acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
            if GATED:
                acc_up = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
            start = 0
        for k0 in tl.range(start, K, BLOCK_K, num_stages=NUM_STAGES):
            k = k0 + cols
            if GATED:
                xk = _x_chunk(x_row, k, K, EVEN_K)[None, :]
                acc += _w_tile(w_rows, rows, k, N, K, EVEN_N, EVEN_K) * xk
                acc_up += _w_tile(up_rows, rows, k, N, K, EVEN_N, EVEN_K) * xk
            else:
                acc += _w_tile(w_rows, rows, k, N, K, EVEN_N, EVEN_K) * _x_chunk(
                    x_row, k, K, EVEN_K)[None, :]
        y = tl.sum(acc, axis=1)
        if HAS_BIAS:
            y += tl.load(b_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)
        if GATED:
            up = tl.sum(acc_up, axis=1)
            if HAS_BIAS:
                up += tl.load(b_ptr + N + rows, mask=rows < N, other=0.0).to(tl.float32)
            y = y / (1.0 + tl.exp(-y)) * up
        dst = out_ptr + m * out_stride + rows
        if EVEN_N:
            tl.store(dst, y.to(out_ptr.dtype.element_ty))
        else:
            tl.store(dst, y.to(out_ptr.dtype.element_ty), mask=rows < N)


def launch_gemv(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor,
                cfg: GemvConfig, prefetch: bool | None = None, gated: bool = False) -> None:
    """Launches the Triton kernel with an explicit config into ``out [M, N]``; ``prefetch``
    (default: with PDL) loads the first weight tile before waiting for the previous kernel.
    ``gated``: w is ``[2N, K]`` (gate rows, then up rows) and ``out = silu(gate) * up``; a
    program then reads ``cfg.block_n`` rows of each."""
    m, k = x.shape
    n = w.shape[0] // 2 if gated else w.shape[0]
    if m == 0 or n == 0:
        return
    if k == 0:
        full = bias.float().expand(m, w.shape[0]) if bias is not None else torch.zeros(
            m, w.shape[0], device=out.device)
        out.copy_(F.silu(full[:, :n]) * full[:, n:] if gated else full)
        return
    grid = (triton.cdiv(n, cfg.block_n), m)
    pdl = _pdl.use_pdl(x)
    _gemv_kernel[grid](
        x, w, bias if bias is not None else w, out, n, k, x.stride(0), w.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        EVEN_N=n % cfg.block_n == 0, EVEN_K=k % cfg.block_k == 0, NUM_STAGES=cfg.num_stages,
        PREFETCH=pdl if prefetch is None else prefetch, USE_PDL=pdl, num_warps=cfg.num_warps,
        GATED=gated, launch_pdl=pdl,
    )


def tuned_config(n: int, k: int, device: torch.device) -> GemvConfig | None:
    """The Triton config the tuning table recorded for this weight shape on this GPU, or None."""
    if device.type != "cuda":
        return None
    entry = triton_utils.tuned_triton_config("gemv", shape_bucket(n, k), "cuda",
                                              device.index or 0)
    return GemvConfig.from_dict(entry) if entry else None


def gated_bucket(n: int, k: int) -> str:
    """Tuning-table key of the gated kernel on a ``[2n, k]`` gate/up weight (``n`` outputs)."""
    return f"gated_n{n}_k{k}"


def paired_rows_config(bucket: str, n: int, k: int, device: torch.device) -> GemvConfig:
    """Config of a fused kernel whose programs each read two rows of a ``[n, k]`` weight per
    output row (gate and up; a rotary pair): the table's entry under ``bucket``, else the plain
    kernel's config for the weight with half the rows a program."""
    if device.type == "cuda":
        entry = triton_utils.tuned_triton_config("gemv", bucket, "cuda", device.index or 0)
        if entry:
            return GemvConfig.from_dict(entry)
    cfg = tuned_config(n, k, device) or default_config(n, k)
    return cfg._replace(block_n=max(1, cfg.block_n // 2))


def gated_config(n: int, k: int, device: torch.device) -> GemvConfig:
    """The gated kernel's config for ``n`` outputs of a ``[2n, k]`` gate/up weight."""
    return paired_rows_config(gated_bucket(n, k), 2 * n, k, device)


def gemv_triton(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
                fp32_out: bool = False) -> torch.Tensor:
    """Triton ``x @ w.T + bias``; same contract as ``gemv_ref``."""
    _check(x, w, bias)
    n, k = w.shape
    out = torch.empty((x.shape[0], n), dtype=torch.float32 if fp32_out else x.dtype,
                      device=x.device)
    cfg = tuned_config(n, k, x.device) or default_config(n, k)
    launch_gemv(x, w, bias, out, cfg)
    return out


FUSELM_LIB.define("gemv(Tensor x, Tensor w, Tensor? bias, bool fp32_out) -> Tensor")


@torch.library.register_fake("fuselm::gemv", lib=FUSELM_LIB)
def _gemv_fake(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None,
               fp32_out: bool) -> torch.Tensor:
    return x.new_empty((x.shape[0], w.shape[0]),
                       dtype=torch.float32 if fp32_out else x.dtype)


def gemv_silu_mul_triton(x: torch.Tensor, w: torch.Tensor,
                         bias: torch.Tensor | None = None) -> torch.Tensor:
    """Triton ``silu(x @ gate.T) * (x @ up.T)`` in one weight stream; same contract as
    ``gemv_silu_mul_ref``."""
    _check(x, w, bias)
    if w.shape[0] % 2:
        raise ValueError(f"gemv_silu_mul needs gate and up rows, an even count; got {w.shape[0]}")
    n, k = w.shape[0] // 2, w.shape[1]
    out = torch.empty((x.shape[0], n), dtype=x.dtype, device=x.device)
    launch_gemv(x, w, bias, out, gated_config(n, k, x.device), gated=True)
    return out


FUSELM_LIB.define("gemv_silu_mul(Tensor x, Tensor w, Tensor? bias) -> Tensor")


@torch.library.register_fake("fuselm::gemv_silu_mul", lib=FUSELM_LIB)
def _gemv_silu_mul_fake(x: torch.Tensor, w: torch.Tensor,
                        bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((x.shape[0], w.shape[0] // 2))


if triton_utils.triton_available():
    for _key in triton_utils.triton_dispatch_keys():
        FUSELM_LIB.impl("gemv", gemv_triton, _key)
        FUSELM_LIB.impl("gemv_silu_mul", gemv_silu_mul_triton, _key)

