"""Row-wise argmax: ``out[r] = argmax(x[r, :])`` for the greedy decode path.

x ``[num_rows, n]`` float32, float16 or bfloat16 (rows may be strided, last dim contiguous,
n >= 1); out int64 ``[num_rows]``. Semantics are ``torch.argmax(x, dim=-1)``'s: the first index
of the maximum on ties, and in a row holding NaN the index of its first NaN (NaN counts as
larger than everything, +inf included). Nothing is modified in place.

Backends: ``argmax_ref`` (the spec), ``argmax_triton`` (the torch op ``fuselm::argmax``).
``greedy_argmax`` is what the engine calls: the Triton op for CUDA tensors, ``torch.argmax``
otherwise (CPU keeps torch's speed and never runs the interpreter).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from fuselm.kernels import _pdl, triton_utils
from fuselm.kernels.triton_utils import FUSELM_LIB, next_power_of_2

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_N = 2**30  # int32 indices inside the kernel, with room for the last chunk


def argmax_ref(x: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch ``torch.argmax(x, dim=-1)``: int64 ``[num_rows]`` (exact comparisons, so no
    float32 upcast is needed: widening keeps order and NaN)."""
    return torch.argmax(x, dim=-1)


# --------------------------------------------------------------------------------------------
# Triton. A program walks a span of a row in BLOCK-wide chunks (16-byte loads), each lane keeping
# its running maximum and the first index where it saw it (strict >, so later equal values
# never replace it; a NaN replaces any number and is never replaced); a final reduction over the
# lanes takes the smallest index among the lanes holding the maximum (or a NaN). Long rows (a
# vocabulary) are cut into spans of SPAN elements, one program each, whose (value, index)
# winners a second small kernel merges by the same rule: at one row (decode, [1, 128256] fp32 =
# 513 KB) a single program would stream the whole row through one SM.
# --------------------------------------------------------------------------------------------


class _ArgmaxConfig(NamedTuple):
    block: int  # elements of a row loaded per loop iteration (power of 2)
    num_warps: int
    num_stages: int = 1  # > 1: the loop's loads are software-pipelined (cp.async, sm_80+)
    span: int = 0  # elements a program takes (a multiple of block); 0: the whole row


_SPLIT_ABOVE = 8192  # rows longer than this are split into spans of 4096


def _argmax_config(n: int, device: torch.device) -> _ArgmaxConfig:
    """Launch config: chunks of up to 4096 elements, 8 warps at full size (16 elements a thread
    a chunk: 4 16-byte loads in fp32, 2 in bf16), rows above 8192 elements split into spans of
    4096 (one chunk a program); then the ``configs/argmax.json`` entry for this GPU and n."""
    block = min(next_power_of_2(n), 4096)
    num_warps = max(1, min(8, block // 512))
    cfg = _ArgmaxConfig(block, num_warps, 1, 4096 if n > _SPLIT_ABOVE else 0)
    if device.type == "cuda":
        tuned = triton_utils.tuned_triton_config("argmax", f"n{n}", "cuda", device.index or 0)
        if tuned:
            cfg = cfg._replace(**{k: v for k, v in tuned.items() if k in _ArgmaxConfig._fields})
    return cfg


def _check_argmax_input(x: torch.Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"argmax needs a 2-D [num_rows, n] tensor, got shape {tuple(x.shape)}")
    if x.shape[1] == 0:
        raise ValueError("argmax of an empty last dimension is undefined")
    if x.shape[1] > _MAX_N:
        raise ValueError(f"argmax supports rows of at most 2**30 elements, got {x.shape[1]}")
    if x.dtype not in _DTYPES:
        raise ValueError(f"argmax supports {_DTYPES}, got {x.dtype}")
    if x.shape[1] > 1 and x.stride(1) != 1:
        raise ValueError(f"argmax needs the last dimension contiguous, got strides {x.stride()}")


if triton_utils.triton_available():
    import triton
    import triton.language as tl

    from fuselm.kernels._pdl import pdl_wait_then_release

    if triton_utils.is_interpreting():
        triton_utils.patch_interpreter_range()

    @triton.jit
    def _first_max(best, best_idx):
        """(value, index) of the lanes' winner: the smallest index among the lanes holding the
        maximum, or among the NaN lanes if there is one (value NaN then)."""
        is_nan = best != best
        any_nan = tl.max(is_nan.to(tl.int32), axis=0) > 0
        finite = tl.where(is_nan, float("-inf"), best)
        row_max = tl.max(finite, axis=0)
        winner = tl.where(any_nan, is_nan, finite == row_max)
        idx = tl.min(tl.where(winner, best_idx, 2147483647), axis=0)  # int32 max: no winner
        return tl.where(any_nan, float("nan"), row_max), idx

    @triton.jit
    def _argmax_kernel(
        x_ptr,  # [num_rows, n], rows x_stride apart
        out_ptr,  # [num_rows] int64 (one span a row), else the spans' winning indices
        val_ptr,  # [num_rows, num_spans] float32: the spans' winning values (SPLIT only)
        n,
        x_stride,
        BLOCK: tl.constexpr,
        NUM_STAGES: tl.constexpr = 1,
        USE_PDL: tl.constexpr = False,  # programmatic dependent launch (_pdl.py)
        SPAN: tl.constexpr = 0,  # elements a program takes; 0: the whole row
    ):
        pdl_wait_then_release(USE_PDL)
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * x_stride
        if SPAN > 0:
            first = tl.program_id(1) * SPAN
            end = tl.minimum(first + SPAN, n)
        else:
            first = 0
            end = n
        cols = first + tl.arange(0, BLOCK)
        # the first chunk seeds every lane (masked lanes: -inf at an index >= end, which loses
        # every tie with a real element, so a row of -inf still answers its first index)
        best = tl.load(x_row + cols, mask=cols < end, other=float("-inf")).to(tl.float32)
        best_idx = cols
        for start in tl.range(first + BLOCK, end, BLOCK, num_stages=NUM_STAGES):
            c = start + tl.arange(0, BLOCK)
            v = tl.load(x_row + c, mask=c < end, other=float("-inf")).to(tl.float32)
            take = (v > best) | ((v != v) & (best == best))  # larger, or the lane's first NaN
            best = tl.where(take, v, best)
            best_idx = tl.where(take, c, best_idx)
        value, idx = _first_max(best, best_idx)
        if SPAN > 0:
            part = row * tl.num_programs(1) + tl.program_id(1)
            tl.store(val_ptr + part, value)
            tl.store(out_ptr + part, idx)
        else:
            tl.store(out_ptr + row, idx.to(tl.int64))

    @triton.jit
    def _argmax_merge_kernel(
        val_ptr,  # [num_rows, num_spans] float32
        idx_ptr,  # [num_rows, num_spans] int32
        out_ptr,  # [num_rows] int64
        num_spans,
        P_PAD: tl.constexpr,
        USE_PDL: tl.constexpr = False,
    ):
        pdl_wait_then_release(USE_PDL)
        row = tl.program_id(0).to(tl.int64)
        p = tl.arange(0, P_PAD)
        mask = p < num_spans
        vals = tl.load(val_ptr + row * num_spans + p, mask=mask, other=float("-inf"))
        idxs = tl.load(idx_ptr + row * num_spans + p, mask=mask, other=2147483647)
        _, idx = _first_max(vals, idxs)
        tl.store(out_ptr + row, idx.to(tl.int64))


def _launch_argmax(x: torch.Tensor, out: torch.Tensor, cfg: _ArgmaxConfig) -> None:
    """Launches the kernels with an explicit config (tests and benchmarks sweep it): x
    ``[num_rows, n]`` checked, out int64 ``[num_rows]``; writes out (two launches when the row
    is split into spans)."""
    if cfg.span % cfg.block:
        raise ValueError(f"span {cfg.span} is not a multiple of block {cfg.block}")
    num_rows, n = x.shape
    if num_rows == 0:
        return
    spans = triton.cdiv(n, cfg.span) if cfg.span else 1
    if spans == 1:
        _argmax_kernel[(num_rows, 1)](
            x, out, out, n, x.stride(0), BLOCK=cfg.block, NUM_STAGES=cfg.num_stages,
            num_warps=cfg.num_warps, **_pdl.launch_args(x),
        )  # fmt: skip
        return
    vals = torch.empty((num_rows, spans), dtype=torch.float32, device=x.device)
    idxs = torch.empty((num_rows, spans), dtype=torch.int32, device=x.device)
    _argmax_kernel[(num_rows, spans)](
        x, idxs, vals, n, x.stride(0), BLOCK=cfg.block, NUM_STAGES=cfg.num_stages,
        num_warps=cfg.num_warps, SPAN=cfg.span, **_pdl.launch_args(x),
    )  # fmt: skip
    _argmax_merge_kernel[(num_rows,)](
        vals, idxs, out, spans, P_PAD=max(2, next_power_of_2(spans)), num_warps=1,
        **_pdl.launch_args(x),
    )  # fmt: skip


def argmax_triton(x: torch.Tensor) -> torch.Tensor:
    """Triton row-wise argmax; same contract as ``argmax_ref`` for 2-D float x (ValueError for
    other input)."""
    _check_argmax_input(x)
    out = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    _launch_argmax(x, out, _argmax_config(x.shape[1], x.device))
    return out


# --------------------------------------------------------------------------------------------
# Registration (see rms_norm.py) and the engine's entry point.
# --------------------------------------------------------------------------------------------

FUSELM_LIB.define("argmax(Tensor x) -> Tensor")


@torch.library.register_fake("fuselm::argmax", lib=FUSELM_LIB)
def _argmax_fake(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[:-1], dtype=torch.int64)


_TRITON_OP = None
if triton_utils.triton_available():
    for _key in triton_utils.triton_dispatch_keys():
        FUSELM_LIB.impl("argmax", argmax_triton, _key)
    _TRITON_OP = torch.ops.fuselm.argmax.default


def greedy_argmax(logits: torch.Tensor) -> torch.Tensor:
    """Greedy tokens: int64 ``[num_rows]``, the argmax of logits ``[num_rows, vocab]`` per row.

    CUDA tensors the Triton kernel takes (2-D, float, last dim contiguous, non-empty) go to
    ``fuselm::argmax``; everything else, CPU included, to ``torch.argmax`` (same result)."""
    if (
        _TRITON_OP is not None
        and logits.is_cuda
        and logits.dim() == 2
        and logits.dtype in _DTYPES
        and 0 < logits.shape[1] <= _MAX_N
        and (logits.stride(1) == 1 or logits.shape[1] == 1)
    ):
        return _TRITON_OP(logits)
    return logits.argmax(dim=-1)
