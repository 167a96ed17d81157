"""Independent references for the FP8 KV cache tests: e4m3fn rounding from the format's
definition (not torch's cast) and float64 paged attention over dequantized caches."""

from __future__ import annotations

import torch

E4M3_MAX = 448.0


def e4m3_grid() -> tuple[torch.Tensor, torch.Tensor]:
    """Every finite non-negative e4m3fn value (float64, ascending) and its mantissa's low bit,
    from the definition: exponent field e (bias 7), 3 mantissa bits m; e = 0 is subnormal
    (m / 8 * 2^-6); e = 15, m = 7 is NaN (no infinities)."""
    values, low_bits = [], []
    for e in range(16):
        for m in range(8):
            if e == 15 and m == 7:
                continue
            values.append(m / 8 * 2.0**-6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7))
            low_bits.append(m & 1)
    return torch.tensor(values, dtype=torch.float64), torch.tensor(low_bits)


def round_e4m3(y: torch.Tensor) -> torch.Tensor:
    """``y`` (any float dtype) to the nearest e4m3fn value, ties to the even mantissa,
    saturating at +-448; float64."""
    grid, low = e4m3_grid()
    mag = y.double().abs().clamp(max=E4M3_MAX).reshape(-1)
    hi = torch.searchsorted(grid, mag).clamp(max=grid.numel() - 1)  # first grid value >= mag
    lo = (hi - 1).clamp(min=0)
    d_lo, d_hi = mag - grid[lo], grid[hi] - mag
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (low[hi] == 0))
    out = torch.where(pick_hi, grid[hi], grid[lo]).reshape(y.shape)
    return torch.where(y < 0, -out, out)


def gather_tokens(cache: torch.Tensor, block_row: torch.Tensor, length: int) -> torch.Tensor:
    """Tokens ``0..length-1`` of one sequence from a paged cache, one index at a time:
    ``[length, kv_heads, head_size]`` in the cache's dtype."""
    block_size = cache.shape[1]
    pos = torch.arange(length)
    return cache[block_row.long()[pos // block_size], pos % block_size]


def attention_f64(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float,
                  visible: torch.Tensor) -> torch.Tensor:
    """q ``[L, H, D]``, keys/values float64 ``[S, Hkv, D]``, visible bool ``[L, S]``: softmax
    attention per query head (head h reads KV head h // (H / Hkv)), float64 ``[L, H, D]``;
    a row that sees nothing is zero."""
    group = q.shape[1] // keys.shape[1]
    k = keys.repeat_interleave(group, dim=1).transpose(0, 1)  # [H, S, D]
    v = values.repeat_interleave(group, dim=1).transpose(0, 1)
    s = q.double().transpose(0, 1) @ k.transpose(1, 2) * scale  # [H, L, S]
    s = s.masked_fill(~visible[None], float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return (p @ v).transpose(0, 1)


def to_fp8_cache(cache: torch.Tensor, scale: float) -> torch.Tensor:
    """An fp8 cache holding ``cache / scale`` (torch's own cast; |values| stay < 448)."""
    return (cache.double() / scale).to(torch.float8_e4m3fn)
