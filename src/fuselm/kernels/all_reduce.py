"""One-shot all-reduce over peer-mapped exchange buffers, alone or fused with the residual add
and RMSNorm that follow every row-parallel layer of a decoder.

Protocol (one kernel a call, no barrier, no host synchronisation; "Lamport" style): every rank owns
an exchange buffer of 2 slots x world rows x ``rank_numel`` words, peer-mapped so that every other
rank can store into it, and every word of it starts as ``EMPTY`` (the bit pattern of -0.0).
Call ``n`` uses slot ``n % 2``: rank ``r`` stores its input (with -0.0 turned into +0.0, so no
real value looks empty) into row ``r`` of that slot in every peer's buffer, then reads the other
rows of its own buffer until no word is ``EMPTY``, sets them back to ``EMPTY`` and sums all rows
in rank order (so every rank gets the same bits). A peer can be at most one call ahead (it cannot
finish call ``n + 1`` without this rank's input of it), so it writes the other slot while this
rank still reads; a slot is reused only after every rank has emptied it. The call count lives on
the device (``state``: the count and the programs finished in this call), so the kernel can be
captured in a CUDA graph and replayed.

The result is the sum in float32 in rank order, rounded to the input dtype (what NCCL gives for
two ranks); the fused op then does what ``fused_add_rms_norm`` does with it. The buffers and the
peer addresses come from ``fuselm.parallel.custom_all_reduce``; this module only launches
kernels on given addresses.
"""

from __future__ import annotations

import torch

from fuselm.kernels import _pdl, triton_utils
from fuselm.kernels.triton_utils import next_power_of_2

NUM_SLOTS = 2
_EMPTY = {2: -(1 << 15), 4: -(1 << 31)}  # the -0.0 bit pattern of 16- and 32-bit floats
_WORD = {2: torch.int16, 4: torch.int32}


def word_dtype(dtype: torch.dtype) -> torch.dtype:
    """The integer dtype of the exchange buffer for activations of ``dtype``."""
    if dtype.itemsize not in _WORD or not dtype.is_floating_point:
        raise ValueError(f"the one-shot all-reduce takes 16- or 32-bit floats, not {dtype}")
    return _WORD[dtype.itemsize]


def empty_word(dtype: torch.dtype) -> int:
    """The integer value that marks an exchange-buffer word as not yet written."""
    return _EMPTY[word_dtype(dtype).itemsize]


if triton_utils.triton_available():
    import triton
    import triton.language as tl

    from fuselm.kernels._pdl import pdl_wait_then_release

    @triton.jit
    def _all_reduce_kernel(
        x_ptr,  # [rows, hidden] this rank's input; the normed output when NORM
        residual_ptr,  # [rows, hidden] in/out (NORM only)
        w_ptr,  # [hidden] (NORM only)
        out_ptr,  # [rows, hidden] the sum (not NORM)
        peers_ptr,  # int64 [WORLD]: every rank's exchange buffer address
        local_ptr,  # this rank's exchange buffer (integer words)
        state_ptr,  # int32 [2]: calls so far, programs finished in this call
        rank,
        hidden,
        rank_numel,  # words of one rank's row block in a slot
        eps,
        EMPTY: tl.constexpr,
        WORD_BYTES: tl.constexpr,
        WORLD: tl.constexpr,
        BLOCK: tl.constexpr,
        NORM: tl.constexpr,
        SINGLE: tl.constexpr = False,  # one program: it advances the call count without an atomic
        USE_PDL: tl.constexpr = False,
    ):
        pdl_wait_then_release(USE_PDL)
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < hidden
        offs = row * hidden + cols
        calls = tl.load(state_ptr)
        slot_base = (calls % 2).to(tl.int64) * WORLD * rank_numel
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        word = local_ptr.dtype.element_ty
        bits = x.to(word, bitcast=True)
        bits = tl.where(bits == EMPTY, tl.zeros_like(bits), bits)
        mine = slot_base + rank * rank_numel + offs
        here = tl.load(peers_ptr + rank)
        for p in tl.static_range(WORLD):
            if p != rank:
                # the peer's buffer as an offset from ours, in words: 16-byte aligned (checked on
                # the host), so the stores stay 16-byte vectors like the local ones
                delta = (tl.load(peers_ptr + p) - here) // WORD_BYTES
                delta = tl.multiple_of(delta, 16 // WORD_BYTES)
                tl.store(local_ptr + delta + mine, bits, mask=mask)
        if NORM:  # loaded while the peers' stores are in flight
            res = tl.load(residual_ptr + offs, mask=mask, other=0.0)
            w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for p in tl.static_range(WORLD):
            if p == rank:
                got = bits
            else:
                src = local_ptr + slot_base + p * rank_numel + offs
                got = tl.load(src, mask=mask, other=0, volatile=True)
                while tl.max((got == EMPTY).to(tl.int32), axis=0) > 0:
                    got = tl.load(src, mask=mask, other=0, volatile=True)
                tl.store(src, tl.full([BLOCK], EMPTY, word), mask=mask)
            acc += got.to(x.dtype, bitcast=True).to(tl.float32)
        total = acc.to(x.dtype)
        if NORM:
            h = (total.to(tl.float32) + res.to(tl.float32)).to(x.dtype)
            tl.store(residual_ptr + offs, h, mask=mask)
            hf = h.to(tl.float32)
            rstd = tl.rsqrt(tl.sum(hf * hf, axis=0) / hidden + eps)
            tl.store(x_ptr + offs, (hf * rstd * w).to(x.dtype), mask=mask)
        else:
            tl.store(out_ptr + offs, total, mask=mask)
        if SINGLE:
            tl.store(state_ptr, calls + 1)
        else:
            finished = tl.atomic_add(state_ptr + 1, 1)
            if finished == tl.num_programs(0) - 1:  # the last program moves on to the other slot
                tl.store(state_ptr, calls + 1)
                tl.store(state_ptr + 1, 0)


def _check(x: torch.Tensor, buffer: torch.Tensor, world: int, rank_numel: int) -> None:
    if x.dim() != 2 or not x.is_contiguous():
        raise ValueError(f"x must be a contiguous [rows, hidden] tensor, got {tuple(x.shape)}")
    if x.numel() > rank_numel:
        raise ValueError(f"{x.numel()} elements do not fit the exchange rows of {rank_numel}")
    if buffer.dtype != word_dtype(x.dtype) or buffer.numel() < NUM_SLOTS * world * rank_numel:
        raise ValueError(f"exchange buffer {buffer.dtype} [{buffer.numel()}] does not hold "
                         f"{NUM_SLOTS} x {world} x {rank_numel} words for {x.dtype}")


def _launch(x, residual, weight, out, peers: torch.Tensor, buffer: torch.Tensor,
            state: torch.Tensor, rank: int, rank_numel: int, eps: float, norm: bool) -> None:
    rows, hidden = x.shape
    if rows == 0:
        return
    block = next_power_of_2(hidden)
    _all_reduce_kernel[(rows,)](
        x, residual, weight, out, peers, buffer, state, rank, hidden, rank_numel, eps,
        EMPTY=empty_word(x.dtype), WORD_BYTES=x.element_size(), WORLD=peers.numel(),
        BLOCK=block, NORM=norm, SINGLE=rows == 1,
        num_warps=max(1, min(16, block * x.element_size() // 512)), **_pdl.launch_args(x),
    )  # fmt: skip


def one_shot_all_reduce(x: torch.Tensor, peers: torch.Tensor, buffer: torch.Tensor,
                        state: torch.Tensor, rank: int, rank_numel: int) -> torch.Tensor:
    """The sum of ``x`` ``[rows, hidden]`` over every rank (a new tensor); a collective: every
    rank calls it with the same shape in the same order."""
    _check(x, buffer, peers.numel(), rank_numel)
    out = torch.empty_like(x)
    _launch(x, x, x, out, peers, buffer, state, rank, rank_numel, 0.0, norm=False)
    return out


def one_shot_all_reduce_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
    peers: torch.Tensor, buffer: torch.Tensor, state: torch.Tensor, rank: int, rank_numel: int,
) -> None:
    """In place: ``residual += sum over ranks of x``, then ``x = rms_norm(residual)``; a
    collective, like ``one_shot_all_reduce``."""
    _check(x, buffer, peers.numel(), rank_numel)
    if residual.shape != x.shape or residual.dtype != x.dtype or not residual.is_contiguous():
        raise ValueError(f"residual {tuple(residual.shape)} {residual.dtype} must match x "
                         f"{tuple(x.shape)} {x.dtype} and be contiguous")
    if weight.shape != (x.shape[1],) or weight.stride(0) != 1:
        raise ValueError(f"weight must be a contiguous [{x.shape[1]}], got {tuple(weight.shape)}")
    _launch(x, residual, weight, x, peers, buffer, state, rank, rank_numel, eps, norm=True)
