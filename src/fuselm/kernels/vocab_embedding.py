"""Vocabulary-parallel embedding lookup: this rank's rows for the ids in its range, zeros for the
others (under tensor parallelism the sum over the ranks is the embedding).

ids int64 ``[T]`` (any values), weight ``[V, D]`` (this rank's rows ``[start, start + V)`` of the
vocabulary; last dim contiguous) -> ``[T, D]`` in weight's dtype:
``out[t] = weight[ids[t] - start]`` where ``start <= ids[t] < start + V``, else 0.

One kernel where the PyTorch expression takes seven (two compares, and, subtract, where, gather,
multiply) at the start of every tensor-parallel decode step.

Backends: ``vocab_embedding_ref`` (the spec), ``vocab_embedding_triton`` (the torch op
``fuselm::vocab_embedding``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fuselm.kernels import _pdl, triton_utils
from fuselm.kernels.triton_utils import FUSELM_LIB, next_power_of_2


def vocab_embedding_ref(ids: torch.Tensor, weight: torch.Tensor, start: int) -> torch.Tensor:
    """Plain PyTorch masked lookup of ``ids`` in the rows ``[start, start + V)``."""
    mask = (ids >= start) & (ids < start + weight.shape[0])
    local = torch.where(mask, ids - start, 0)
    return F.embedding(local, weight) * mask[:, None].to(weight.dtype)


def _check(ids: torch.Tensor, weight: torch.Tensor) -> None:
    if ids.dim() != 1 or ids.dtype != torch.int64:
        raise ValueError(f"ids must be int64 [num_tokens], got {ids.dtype} {tuple(ids.shape)}")
    if weight.dim() != 2 or weight.stride(1) != 1:
        raise ValueError(f"weight must be [rows, dim] contiguous in dim, got {tuple(weight.shape)}")
    if ids.device != weight.device:
        raise ValueError(f"ids on {ids.device}, weight on {weight.device}")


if triton_utils.triton_available():
    import triton
    import triton.language as tl

    from fuselm.kernels._pdl import pdl_wait_then_release

    @triton.jit
    def _vocab_embedding_kernel(
        ids_ptr, w_ptr, out_ptr, start, rows, dim, w_stride,
        BLOCK: tl.constexpr, USE_PDL: tl.constexpr = False,
    ):  # fmt: skip
        pdl_wait_then_release(USE_PDL)
        t = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        local = tl.load(ids_ptr + t) - start
        mine = (local >= 0) & (local < rows)
        local = tl.where(mine, local, 0)
        row = tl.load(w_ptr + local * w_stride + cols, mask=(cols < dim) & mine, other=0.0)
        tl.store(out_ptr + t * dim + cols, row, mask=cols < dim)


def vocab_embedding_triton(ids: torch.Tensor, weight: torch.Tensor, start: int) -> torch.Tensor:
    """Triton masked lookup; same contract as ``vocab_embedding_ref``."""
    _check(ids, weight)
    dim = weight.shape[1]
    out = torch.empty((ids.shape[0], dim), dtype=weight.dtype, device=weight.device)
    if ids.numel() == 0 or dim == 0:
        return out
    block = min(next_power_of_2(dim), 4096)
    _vocab_embedding_kernel[(ids.shape[0], triton.cdiv(dim, block))](
        ids, weight, out, start, weight.shape[0], dim, weight.stride(0), BLOCK=block,
        num_warps=max(1, min(8, block * weight.element_size() // 1024)),
        **_pdl.launch_args(weight),
    )  # fmt: skip
    return out


FUSELM_LIB.define("vocab_embedding(Tensor ids, Tensor weight, int start) -> Tensor")


@torch.library.register_fake("fuselm::vocab_embedding", lib=FUSELM_LIB)
def _vocab_embedding_fake(ids: torch.Tensor, weight: torch.Tensor, start: int) -> torch.Tensor:
    return weight.new_empty((ids.shape[0], weight.shape[1]))


if triton_utils.triton_available():
    for _key in triton_utils.triton_dispatch_keys():
        FUSELM_LIB.impl("vocab_embedding", vocab_embedding_triton, _key)
