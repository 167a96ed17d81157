"""Bit packing shared by the checkpoint formats: int32 words of 4- or 8-bit fields, and the
canonical int4 byte layout.

A format packs ``32 // bits`` unsigned fields into one int32 word, field ``i`` in bits
``[bits * i, bits * (i + 1))``; the formats differ only in which logical index field ``i``
holds (sequential for GPTQ and compressed-tensors, AWQ's interleave for AWQ). The shifts below
are arithmetic on the integer value, so the result does not depend on the host's byte order.
"""

from __future__ import annotations

import sys

import torch

from fuselm.errors import CheckpointError


def unpack_int32(packed: torch.Tensor, bits: int, dim: int,
                 order: tuple[int, ...] | None = None) -> torch.Tensor:
    """Unpacks the ``bits``-bit unsigned fields of int32 ``packed`` along ``dim`` (0 or 1):
    ``[R, C]`` -> uint8 ``[R * 32 // bits, C]`` (dim 0) or ``[R, C * 32 // bits]`` (dim 1).

    ``order[j]`` is the field index holding logical position ``j`` of each word (None:
    field ``j`` holds position ``j``).
    """
    _check_packed(packed)
    per_word = 32 // bits
    fields = order if order is not None else tuple(range(per_word))
    # int32 shifts sign-extend, and the mask drops those bits: no int64 copy (8B-model layers)
    shifts = torch.tensor([bits * f for f in fields], dtype=torch.int32)
    mask = (1 << bits) - 1
    if dim == 1:
        values = (packed.unsqueeze(-1) >> shifts) & mask  # [R, C, per_word]
        return values.to(torch.uint8).reshape(packed.shape[0], -1)
    values = (packed.unsqueeze(1) >> shifts.view(1, -1, 1)) & mask  # [R, per_word, C]
    return values.to(torch.uint8).reshape(-1, packed.shape[1])


def int32_bytes(packed: torch.Tensor) -> torch.Tensor:
    """int32 ``[R, C]`` -> uint8 ``[R, 4 C]``: the words' bytes, least significant first.

    Where a format packs eight sequential nibbles into a word (GPTQ along K after a
    transpose, compressed-tensors along K), byte ``m`` of word ``c`` holds nibbles ``8c + 2m``
    (low) and ``8c + 2m + 1`` (high): exactly the canonical int4 bytes. On a little-endian
    host that is the words' memory, viewed (no copy: a 8B-model MLP weight converts in
    milliseconds); elsewhere it is shifted out.
    """
    _check_packed(packed)
    if sys.byteorder == "little":
        return packed.contiguous().view(torch.uint8)
    return int32_bytes_shifted(packed)


def int32_bytes_shifted(packed: torch.Tensor) -> torch.Tensor:
    """``int32_bytes`` by arithmetic shifts (any byte order)."""
    shifts = torch.tensor([0, 8, 16, 24], dtype=torch.int32)
    return ((packed.unsqueeze(-1) >> shifts) & 0xFF).to(torch.uint8).reshape(
        packed.shape[0], -1)


def _check_packed(packed: torch.Tensor) -> None:
    if packed.dtype != torch.int32 or packed.dim() != 2:
        raise CheckpointError(f"expected a 2-D int32 packed tensor, got {packed.dtype} "
                              f"{list(packed.shape)}")


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
