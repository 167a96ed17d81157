"""A vocabulary table kept in GGUF's Q8_0 blocks on the CPU: int8 values and one scale per 32.

The default model's tied embedding / LM head table is Q8_0 in its file; held as float32 it is
113 MB, a fifth of the process, while its int8 values and scales are 30 MB and dequantize to the
very same float32 numbers (an int8 times an fp16 scale is exact in float32). The lookup
dequantizes only the rows it reads; the LM head dequantizes ``chunk`` rows at a time into a
buffer that stays in the cache and multiplies them, which on a 2-core EPYC is faster than the
float32 product over the whole table (batch 1: 8.4 vs 9.4 ms; batch 8: 14.7 vs 20.9 ms), since
the whole float32 table streams from memory for every step.
"""

from __future__ import annotations

import torch

BLOCK = 32  # values per Q8_0 block
CHUNK_ROWS = 1024  # rows dequantized at a time by the LM head (2.4 MB of float32 at dim 576)


def from_q8_0_blocks(blocks: torch.Tensor, rows: int, dim: int) -> tuple[torch.Tensor,
                                                                          torch.Tensor]:
    """Raw Q8_0 blocks ``uint8 [rows, dim / 32 * 34]`` (fp16 scale, 32 int8) -> ``(values
    int8 [rows, dim], scales float32 [rows, dim / 32])``."""
    if dim % BLOCK:
        raise ValueError(f"a Q8_0 table's width must be a multiple of {BLOCK}, got {dim}")
    per_row = dim // BLOCK
    b = blocks.reshape(rows, per_row, 2 + BLOCK)
    scales = b[..., :2].contiguous().view(torch.float16).reshape(rows, per_row).float()
    values = b[..., 2:].contiguous().view(torch.int8).reshape(rows, dim)
    return values, scales


def dequantize_rows(values: torch.Tensor, scales: torch.Tensor,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """``values int8 [n, dim]`` with their ``scales [n, dim / 32]`` -> float32 ``[n, dim]``
    (written into ``out`` when given)."""
    n, dim = values.shape
    blocks = values.view(n, dim // BLOCK, BLOCK)
    target = None if out is None else out.view(n, dim // BLOCK, BLOCK)
    return torch.mul(blocks, scales.unsqueeze(-1), out=target).view(n, dim)


def lookup(ids: torch.Tensor, values: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Rows ``ids [num_tokens]`` of the table, float32 ``[num_tokens, dim]``."""
    return dequantize_rows(values.index_select(0, ids), scales.index_select(0, ids))


def logits(hidden: torch.Tensor, values: torch.Tensor, scales: torch.Tensor,
           chunk: int = CHUNK_ROWS) -> torch.Tensor:
    """``hidden [n, dim]`` times the table's transpose: float32 ``[n, rows]``."""
    rows, dim = values.shape
    hidden = hidden.float()
    out = torch.empty(hidden.shape[0], rows, dtype=torch.float32, device=hidden.device)
    buf = torch.empty(min(chunk, rows), dim, dtype=torch.float32, device=hidden.device)
    for start in range(0, rows, chunk):
        end = min(start + chunk, rows)
        w = dequantize_rows(values[start:end], scales[start:end], buf[: end - start])
        torch.matmul(hidden, w.t(), out=out[:, start:end])
    return out
