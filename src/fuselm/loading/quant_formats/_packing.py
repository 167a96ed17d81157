"""Bit packing shared by the checkpoint formats: int32 words of 4- or 8-bit fields, and the
canonical int4 byte layout.

A format packs ``32 // bits`` unsigned fields into one int32 word, field ``i`` in bits
``[bits * i, bits * (i + 1))``; the formats differ only in which logical index field ``i``
holds (sequential for GPTQ and compressed-tensors, AWQ's interleave for AWQ). The shifts below
are arithmetic on the integer value, so the result does not depend on the host's byte order.
"""

from __future__ import annotations

import torch

from fuselm.errors import CheckpointError


def unpack_int32(packed: torch.Tensor, bits: int, dim: int,
                 order: tuple[int, ...] | None = None) -> torch.Tensor:
    """Unpacks the ``bits``-bit unsigned fields of int32 ``packed`` along ``dim`` (0 or 1):
    ``[R, C]`` -> uint8 ``[R * 32 // bits, C]`` (dim 0) or ``[R, C * 32 // bits]`` (dim 1).

    ``order[j]`` is the field index holding logical position ``j`` of each word (None:
    field ``j`` holds position ``j``).
    """
    if packed.dtype != torch.int32 or packed.dim() != 2:
        raise CheckpointError(f"expected a 2-D int32 packed tensor, got {packed.dtype} "
                              f"{list(packed.shape)}")
    per_word = 32 // bits
    fields = order if order is not None else tuple(range(per_word))
    shifts = torch.tensor([bits * f for f in fields], dtype=torch.int64)
    words = packed.to(torch.int64) & 0xFFFFFFFF  # the word's unsigned value
    mask = (1 << bits) - 1
    if dim == 1:
        values = (words.unsqueeze(-1) >> shifts) & mask  # [R, C, per_word]
        return values.reshape(packed.shape[0], -1).to(torch.uint8)
    values = (words.unsqueeze(1) >> shifts.view(1, -1, 1)) & mask  # [R, per_word, C]
    return values.reshape(-1, packed.shape[1]).to(torch.uint8)


def pack_int4_rows(q: torch.Tensor) -> torch.Tensor:
    """uint8 nibbles ``[N, K]`` (values 0..15, K even) -> the canonical int4 ``qweight``
    uint8 ``[N, K // 2]``: byte ``j`` holds column ``2j`` low, ``2j + 1`` high."""
    if q.shape[-1] % 2:
        raise CheckpointError(f"an int4 weight needs an even number of input columns, got "
                              f"{q.shape[-1]}")
    q = q.to(torch.uint8)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def check_dtype(suffix: str, tensor: torch.Tensor, *dtypes: torch.dtype) -> None:
    """Raises CheckpointError naming ``suffix`` unless ``tensor`` has one of ``dtypes``."""
    if tensor.dtype not in dtypes:
        names = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise CheckpointError(f"checkpoint tensor {suffix!r} has dtype "
                              f"{str(tensor.dtype).removeprefix('torch.')}, expected {names}")


def check_trivial_g_idx(g_idx: torch.Tensor, group_size: int | None, field: str) -> None:
    """Raises UnsupportedModelError naming ``field`` unless ``g_idx [K]`` maps input column
    ``k`` to group ``k // group_size`` (all zeros per channel): act-order checkpoints permute
    the groups, which the canonical contiguous-group layout cannot express."""
    from fuselm.errors import UnsupportedModelError

    k = g_idx.numel()
    expected = torch.zeros(k, dtype=torch.int64) if group_size is None else \
        torch.arange(k, dtype=torch.int64) // group_size
    if not torch.equal(g_idx.reshape(-1).to(torch.int64), expected):
        raise UnsupportedModelError(
            f"{field}: this checkpoint's g_idx is a non-trivial act-order permutation of the "
            "input groups, which fuselm does not run; use a checkpoint quantized with "
            f"{field} = false")
