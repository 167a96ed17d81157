"""The Kernels-I cases of ``fuselm bench kernels`` (RMSNorm, fused add + RMSNorm, SiLU-and-mul,
rotary + KV write) and ``KernelCase``, the form every provider of cases returns."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class KernelCase:
    """One op at one shape. ``make_args(device, dtype)`` returns fresh inputs for the op's
    registered signature; ``bytes_moved(args)`` its minimum device-memory traffic."""

    op: str
    shape: str  # label, e.g. "16384x4096"
    make_args: Callable[[torch.device, torch.dtype], tuple]
    bytes_moved: Callable[[tuple], int]
    reference: Callable  # the op's *_ref: the eager baseline, and compiled
    bucket: str | None = None  # tuning-table bucket this case decides
    # extra baselines: name -> factory of a callable with the op's signature
    baselines: dict[str, Callable[[], Callable]] = field(default_factory=dict)
    # Triton launch configs to sweep: args -> {config label: (config dict, callable())}
    triton_variants: Callable[[tuple], dict[str, tuple[dict, Callable]]] | None = None
    # targets checked in the report: (baseline or "copy", minimum ratio) per fast backend
    targets: tuple[tuple[str, float], ...] = ()


# ---- the ops of kernels I --------------------------------------------------------------------


def _rows(preset: str, full: list, quick: list, tiny: list) -> list:
    return {"full": full, "quick": quick, "tiny": tiny}[preset]


def _norm_cases(preset: str) -> list[KernelCase]:
    from fuselm.kernels import rms_norm as rn

    shapes = _rows(preset, [(16384, 4096), (16384, 576), (16384, 8192), (256, 4096), (1, 4096)],
                   [(16384, 4096), (1, 4096)], [(4, 64), (1, 96)])  # fmt: skip
    cases = []
    for tokens, hidden in shapes:
        big = tokens >= 1024
        targets = (("copy", 0.85), ("compile", 0.97)) if (tokens, hidden) == (16384, 4096) else ()

        def make(device, dtype, t=tokens, h=hidden):
            return (torch.randn(t, h, device=device, dtype=dtype),
                    torch.randn(h, device=device, dtype=dtype), 1e-6)  # fmt: skip

        def make_fused(device, dtype, t=tokens, h=hidden):
            x, w, eps = make(device, dtype, t, h)
            return x, torch.randn_like(x), w, eps

        def variants(args, fused: bool) -> dict:
            x, w = args[0], args[-2]
            base = rn._norm_config(x.shape[1], x.element_size(), x.shape[0], "rms_norm", x.device)
            res = args[1] if fused else None
            out = x if fused else torch.empty_like(x)
            found = {}
            for warps in (2, 4, 8, 16):
                for rows in sorted({1, base.rows}):
                    cfg = base._replace(num_warps=warps, rows=rows)
                    fn = lambda c=cfg: rn._launch_rms_norm(x, res, w, out, 1e-6, c)  # noqa: B023
                    found[f"w{warps}r{rows}"] = ({"num_warps": warps, "rows": rows}, fn)
            return found

        cases.append(KernelCase(
            "rms_norm", f"{tokens}x{hidden}", make,
            lambda a: (2 * a[0].numel() + a[1].numel()) * a[0].element_size(), rn.rms_norm_ref,
            bucket=f"h{hidden}" if big else f"h{hidden}_t{tokens}", targets=targets,
            triton_variants=(lambda a: variants(a, False)) if big else None,
        ))  # fmt: skip
        fused_targets = (*targets, ("compile add+norm", 1.0)) if targets else ()
        cases.append(KernelCase(
            "fused_add_rms_norm", f"{tokens}x{hidden}", make_fused,
            lambda a: (4 * a[0].numel() + a[2].numel()) * a[0].element_size(),
            rn.fused_add_rms_norm_ref,
            bucket=f"h{hidden}" if big else f"h{hidden}_t{tokens}", targets=fused_targets,
            baselines={"compile add+norm": _compiled_add_then_norm},
            triton_variants=(lambda a: variants(a, True)) if big else None,
        ))  # fmt: skip
    return cases


def _compiled_add_then_norm() -> Callable:
    """The unfused pair a user gets from torch.compile: residual += x; then norm(residual)."""
    from fuselm.kernels.rms_norm import rms_norm_ref

    add = torch.compile(lambda x, residual: residual.add_(x), dynamic=False)
    norm = torch.compile(rms_norm_ref, dynamic=False)
    return lambda x, residual, w, eps: norm(add(x, residual), w, eps)


def _silu_cases(preset: str) -> list[KernelCase]:
    from fuselm.kernels import silu_and_mul as sm

    shapes = _rows(preset, [(16384, 14336), (16384, 1536), (16384, 28672), (256, 14336),
                            (1, 14336)], [(16384, 14336), (1, 14336)], [(4, 64)])  # fmt: skip
    cases = []
    for tokens, d in shapes:
        big = tokens >= 1024

        def variants(args) -> dict:
            x = args[0]
            out = torch.empty(x.shape[0], x.shape[1] // 2, device=x.device, dtype=x.dtype)
            found = {}
            for cfg in _silu_sweep(out.shape[1], x.element_size()):
                fn = lambda c=cfg: sm._launch_silu_and_mul(x, out, c)  # noqa: B023
                found[_silu_label(cfg)] = (cfg._asdict(), fn)
            return found

        cases.append(KernelCase(
            "silu_and_mul", f"{tokens}x{d}",
            lambda dev, dtype, t=tokens, d=d: (torch.randn(t, 2 * d, device=dev, dtype=dtype),),
            lambda a: a[0].numel() * 3 // 2 * a[0].element_size(), sm.silu_and_mul_ref,
            bucket=f"d{d}" if big else f"d{d}_t{tokens}",
            targets=(("copy", 0.85), ("compile", 0.97)) if (tokens, d) == (16384, 14336) else (),
            triton_variants=variants if big else None,
        ))  # fmt: skip
    return cases


def _silu_sweep(d: int, elem_size: int) -> list:
    """The silu_and_mul launch configs the bench times (14): the "2d" tiles of before; "rows"
    (the heuristic column tile, 1, 2 or 4 rows a program, column tiles fastest, ~2 vectors a
    thread, plus 1 row at one vector a thread); "flat" (TorchInductor's 1-D shape, whose
    default is BLOCK 1024 with 4 warps)."""
    from fuselm.kernels.silu_and_mul import SiluConfig, silu_config

    tile = silu_config(d, elem_size, 1, torch.device("cpu")).block
    warps = [max(1, min(16, r * tile * elem_size // 1024)) for r in (1, 2, 4)]  # 2 vectors/thread
    two_d = ((512, 2), (1024, 4), (2048, 4), (2048, 8), (4096, 8))
    rows = ((1, warps[0]), (1, min(16, 2 * warps[0])), (2, warps[1]), (4, warps[2]))
    flat = ((1024, 2), (1024, 4), (2048, 4), (2048, 8), (4096, 8))
    return [
        *(SiluConfig("2d", b, w) for b, w in two_d),
        *(SiluConfig("rows", tile, w, r) for r, w in rows),
        *(SiluConfig("flat", b, w) for b, w in flat),
    ]


def _silu_label(cfg) -> str:
    """Stable sweep label: "b2048w4" ("2d", the labels of earlier reports), "rows-r2b2048w8",
    "flat-b1024w4"."""
    tag = f"b{cfg.block}w{cfg.num_warps}"
    if cfg.variant == "rows":
        return f"rows-r{cfg.rows}{tag}"
    return tag if cfg.variant == "2d" else f"{cfg.variant}-{tag}"


def _rotary_args(device, dtype, tokens, heads, kv_heads, head_size, block_size=16):
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_size, device=device, dtype=dtype)
    q = qkv[:, : heads * head_size].view(tokens, heads, head_size)
    k = qkv[:, heads * head_size : (heads + kv_heads) * head_size].view(tokens, kv_heads, -1)
    v = qkv[:, (heads + kv_heads) * head_size :].view(tokens, kv_heads, head_size)
    max_pos = max(4096, tokens)
    angles = torch.rand(max_pos, head_size // 2, device=device) * 6.283
    cos_sin = torch.cat((angles.cos(), angles.sin()), dim=-1)
    num_blocks = -(-tokens // block_size) + 1
    cache = torch.randn(num_blocks, block_size, kv_heads, head_size, device=device, dtype=dtype)
    slots = torch.randperm(num_blocks * block_size, device=device)[:tokens]  # scattered
    positions = torch.randint(0, max_pos, (tokens,), device=device)
    return q, k, v, positions, cos_sin, cache, torch.randn_like(cache), slots


def _rotary_bytes(a: tuple) -> int:
    q, k = a[0], a[1]
    per_elem = q.element_size()
    # q, k read + written; v read; k, v written to the cache; positions, slots, cos/sin rows
    return (2 * q.numel() + 4 * k.numel() + k.numel()) * per_elem + q.shape[0] * (
        16 + 4 * a[4].shape[1]
    )


def _rotary_cases(preset: str) -> list[KernelCase]:
    from fuselm.kernels import rotary_store_kv as rk

    shapes = _rows(preset, [(16384, 32, 8, 128), (256, 32, 8, 128), (1, 32, 8, 128),
                            (16384, 9, 3, 64)], [(16384, 32, 8, 128), (1, 32, 8, 128)],
                   [(4, 4, 2, 32)])  # fmt: skip
    cases = []
    for tokens, heads, kv_heads, head_size in shapes:
        big = tokens >= 1024

        def variants(args, h=heads, kv=kv_heads, d=head_size) -> dict:
            base = rk._rotary_config(h, kv, d, args[4].shape[1], args[0].device)
            found = {}
            for warps in (2, 4, 8):
                cfg = {**base, "num_warps": warps}
                fn = lambda c=cfg: rk._launch_rotary_store_kv(*args, c)  # noqa: B023
                found[f"w{warps}"] = ({"num_warps": warps}, fn)
            return found

        cases.append(KernelCase(
            "rotary_store_kv", f"{tokens}t_{heads}q_{kv_heads}kv_{head_size}d",
            lambda device, dtype, s=(tokens, heads, kv_heads, head_size): _rotary_args(
                device, dtype, *s),
            _rotary_bytes, rk.rotary_store_kv_ref,
            bucket=f"q{heads}_kv{kv_heads}_d{head_size}" + ("" if big else f"_t{tokens}"),
            targets=(("copy", 0.70),) if (tokens, heads, head_size) == (16384, 32, 128) else (),
            triton_variants=variants if big else None,
        ))  # fmt: skip
    return cases


def core_cases(preset: str) -> list[KernelCase]:
    """rms_norm, fused_add_rms_norm, silu_and_mul, rotary_store_kv."""
    return _norm_cases(preset) + _silu_cases(preset) + _rotary_cases(preset)
