"""Batch-1 linear layers: the Triton ``gemv`` against cuBLAS (``F.linear``) per weight shape.

For each weight shape of a model (Llama-3-8B at TP=1 and TP=2 by default), the benchmark times
cuBLAS and a sweep of Triton configs the way a decode step runs them: inside one CUDA graph,
back to back over enough distinct weight copies (>= 256 MB) that nothing is served from L2.
It prints the achieved weight bandwidth beside the copy bandwidth measured in the same run and
writes ``gemv.json`` (into ``--configs-dir``, else ``<output-dir>/configs``; into the package's
``kernels/configs`` only with ``--write-package-configs``): per shape, the faster of ``triton`` and
``reference`` (cuBLAS) and the best Triton config. The linear layers read that table when the
model is built (``fuselm.kernels.KernelSet.gemv``).

    python -m fuselm.bench.kernels_gemv --output-dir docs/perf
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from fuselm.bench import common
from fuselm.bench.kernels import add_configs_arguments, resolve_configs_dir

# (name, N, K) of Llama-3-8B's linear layers at TP=1 and TP=2 (column-parallel N halves,
# row-parallel K halves), and the LM head (float32 logits out).
LLAMA3_8B_SHAPES = [
    ("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336),
    ("lm_head", 128256, 4096),
    ("qkv_tp2", 3072, 4096), ("o_tp2", 4096, 2048), ("gate_up_tp2", 14336, 4096),
    ("down_tp2", 4096, 7168), ("lm_head_tp2", 64128, 4096),
]
# the gated MLP's gate/up projection + SiLU-and-mul in one kernel: (name, outputs N, K) on a
# [2N, K] weight, against the plain gemv + the silu_and_mul kernel
LLAMA3_8B_GATED = [("gated", 14336, 4096), ("gated_tp2", 7168, 4096)]
TINY_SHAPES = [("tiny_a", 96, 64), ("tiny_lm_head", 200, 64), ("gated_tiny", 48, 64)]


def sweep_configs(k: int) -> list[Any]:
    """Triton configs tried for a weight of ``k`` columns (tiles of 2-16 K elements)."""
    from fuselm.kernels.gemv import GemvConfig, default_config

    out = []
    for bk in (1024, 2048, 4096):
        for bn in (1, 2, 4, 8, 16):
            if not 2048 <= bn * bk <= 16384:
                continue
            for warps in (4, 8):
                stages = (1, 3) if bk < k else (1,)
                out += [GemvConfig(bn, bk, warps, s) for s in stages]
    full = 1 << max(k - 1, 0).bit_length()
    if full > 4096:
        out += [GemvConfig(1, min(full, 16384), 8, 1), GemvConfig(1, min(full, 16384), 16, 1)]
    return list(dict.fromkeys(out + [default_config(1, k)]))


def _weight_copies(rows: int, k: int, device: torch.device, dtype: torch.dtype, seed: int):
    """Enough distinct ``[rows, k]`` weights (>= 256 MB together) that nothing is served from L2,
    and one input row: ``(weights, x, weight_bytes)``."""
    weight_bytes = rows * k * torch.empty(0, dtype=dtype).element_size()
    copies = max(2, -(-(256 << 20) // weight_bytes))
    gen = torch.Generator(device=device).manual_seed(seed)
    weights = [torch.randn(rows, k, device=device, dtype=dtype, generator=gen) * k**-0.5
               for _ in range(copies)]
    return weights, torch.randn(1, k, device=device, dtype=dtype, generator=gen), weight_bytes


def _sweep(name: str, configs: list, body_for, error, scale: float, copies: int,
           replays: int) -> tuple[dict[str, float], tuple[float, Any] | None]:
    """Times ``body_for(cfg)`` for every config in one CUDA graph; a config that fails or whose
    ``error()`` after the run exceeds 5 % of ``scale`` (+ 0.01) is skipped. Returns the times
    by label and the fastest ``(us, config)``."""
    results: dict[str, float] = {}
    best: tuple[float, Any] | None = None
    for cfg in configs:
        try:
            t = common.graph_time_us(body_for(cfg), copies, replays)
        except Exception as exc:  # noqa: BLE001 - one config failing must not end the sweep
            results[cfg.label] = float("nan")
            print(f"  {name}: config {cfg.label} failed: {type(exc).__name__}: {exc}",
                  file=sys.stderr)
            continue
        err = error()
        if err > 0.05 * scale + 1e-2:
            print(f"  {name}: config {cfg.label} wrong (max err {err:.3g}); skipped",
                  file=sys.stderr)
            continue
        results[cfg.label] = round(t, 3)
        if best is None or t < best[0]:
            best = (t, cfg)
    return results, best


def measure_shape(name: str, n: int, k: int, device: torch.device, dtype: torch.dtype,
                  copy_gbs: float, replays: int, sweep: bool) -> dict[str, Any]:
    """cuBLAS and every Triton config on one weight shape; times in us a call. A ``gated*``
    shape times the fused gate/up + SiLU-and-mul kernel on a ``[2n, k]`` weight against the
    separate path (``separate_us``: the plain gemv with its tuned config, then silu_and_mul)."""
    from fuselm.kernels.gemv import (
        default_config,
        gated_config,
        gemv_silu_mul_ref,
        launch_gemv,
        tuned_config,
    )
    from fuselm.kernels.silu_and_mul import silu_and_mul_triton

    fp32_out = name.startswith("lm_head")
    gated = name.startswith("gated")
    rows = 2 * n if gated else n
    weights, x, weight_bytes = _weight_copies(rows, k, device, dtype, seed=n * 7 + k)
    copies = len(weights)
    out_dtype = torch.float32 if fp32_out else dtype
    outs = [torch.empty(1, n, device=device, dtype=out_dtype) for _ in range(copies)]
    full = torch.empty(1, rows, device=device, dtype=dtype)

    def cublas() -> None:
        for w, o in zip(weights, outs, strict=True):
            if gated:
                o.copy_(silu_and_mul_triton(F.linear(x, w)))
            elif fp32_out:  # the LM head's F.linear + .float(): the cast is its own kernel
                o.copy_(F.linear(x, w))
            else:
                torch.mm(x, w.t(), out=o)

    plain_cfg = tuned_config(rows, k, device) or default_config(rows, k)

    def separate() -> None:
        for w, o in zip(weights, outs, strict=True):
            launch_gemv(x, w, None, full, plain_cfg)
            o.copy_(silu_and_mul_triton(full))

    def triton_body(cfg):
        def body() -> None:
            for w, o in zip(weights, outs, strict=True):
                launch_gemv(x, w, None, o, cfg, gated=gated)
        return body

    row: dict[str, Any] = {"name": name, "n": n, "k": k, "weight_MB": round(weight_bytes / 1e6, 2),
                           "fp32_out": fp32_out, "gated": gated}
    row["cublas_us"] = common.graph_time_us(cublas, copies, replays)
    if gated:
        row["separate_us"] = common.graph_time_us(separate, copies, replays)
        row["separate_config"] = plain_cfg.to_dict()
        expected = gemv_silu_mul_ref(x, weights[-1]).float()
        configs = sweep_configs(k) if sweep else []
        configs = list(dict.fromkeys(configs + [gated_config(n, k, device)]))
    else:
        expected = (x.float() @ weights[-1].float().t())
        configs = sweep_configs(k) if sweep else [default_config(n, k)]
    row["configs_us"], best = _sweep(
        name, configs, triton_body, lambda: (outs[-1].float() - expected).abs().max().item(),
        expected.abs().max().item(), copies, replays)
    return _summarize(row, best, weight_bytes, copy_gbs)


def _summarize(row: dict[str, Any], best: tuple[float, Any] | None, weight_bytes: int,
               copy_gbs: float) -> dict[str, Any]:
    """Adds the best Triton config, the GB/s of both and the speed-up to ``row``."""
    nan = float("nan")
    row["triton_us"] = best[0] if best else nan
    row["triton_config"] = best[1].to_dict() if best else None
    gb = weight_bytes / 1e9
    row["cublas_GB/s"] = round(gb / (row["cublas_us"] * 1e-6), 1)
    row["triton_GB/s"] = round(gb / (row["triton_us"] * 1e-6), 1) if best else nan
    row["triton_%copy"] = round(100 * row["triton_GB/s"] / copy_gbs, 1) if best else nan
    row["cublas_%copy"] = round(100 * row["cublas_GB/s"] / copy_gbs, 1)
    row["x_cublas"] = round(row["cublas_us"] / row["triton_us"], 3) if best else nan
    if "separate_us" in row:
        row["x_separate"] = round(row["separate_us"] / row["triton_us"], 3) if best else nan
    return row


def tuning_table(rows: list[dict[str, Any]], margin: float) -> dict[str, dict]:
    """bucket -> {"backend": triton|reference, "triton": best config, "us": the times}: Triton
    only where it beats cuBLAS (a gated shape: the faster of cuBLAS and the separate path) by
    ``margin`` (a fraction)."""
    from fuselm.kernels.gemv import gated_bucket, shape_bucket

    table: dict[str, dict] = {}
    for r in rows:
        if r["triton_config"] is None:
            continue
        baseline = min(r["cublas_us"], r.get("separate_us", r["cublas_us"]))
        faster = r["triton_us"] < baseline * (1 - margin)
        times = {"triton": round(r["triton_us"], 2), "cublas": round(r["cublas_us"], 2)}
        if "separate_us" in r:
            times["separate"] = round(r["separate_us"], 2)
        key = gated_bucket if r.get("gated") else shape_bucket
        bucket = key(r["n"], r["k"])
        table[bucket] = {"backend": "triton" if faster else "reference",
                         "triton": r["triton_config"], "us": times}
    return table


COLUMNS = ("name", "n", "k", "weight_MB", "cublas_us", "cublas_GB/s", "cublas_%copy", "triton_us",
           "triton_GB/s", "triton_%copy", "x_cublas", "separate_us", "x_separate")


def build_parser() -> argparse.ArgumentParser:
    """Flags of ``python -m fuselm.bench.kernels_gemv``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output-dir", default=None, help="write gemv-<gpu>.json here")
    p.add_argument("--shapes", default="llama3-8b", choices=["llama3-8b", "fused", "tiny"],
                   help="fused: only the fused kernels (gate/up + SiLU-and-mul, QKV + rotary + "
                        "KV write)")
    p.add_argument("--replays", type=int, default=20)
    p.add_argument("--no-sweep", action="store_true", help="time only the default config")
    p.add_argument("--margin", type=float, default=0.01,
                   help="Triton must beat cuBLAS by this fraction to be chosen")
    add_configs_arguments(p)  # gemv.json: --configs-dir, else <output-dir or out>/configs
    p.add_argument("--no-write", dest="no_write_configs", action="store_true",
                   help="same as --no-write-configs")
    return p


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    args = build_parser().parse_args(argv)
    if not torch.cuda.is_available():
        print("kernels_gemv needs a CUDA GPU", file=sys.stderr)
        return 2
    device, dtype = torch.device("cuda"), torch.bfloat16
    copy_gbs = common.copy_bandwidth_gbs(device)
    shapes = {"llama3-8b": LLAMA3_8B_SHAPES + LLAMA3_8B_GATED, "fused": LLAMA3_8B_GATED,
              "tiny": TINY_SHAPES}[args.shapes]
    rows = []
    for name, n, k in shapes:
        rows.append(measure_shape(name, n, k, device, dtype, copy_gbs, args.replays,
                                  not args.no_sweep))
        torch.cuda.empty_cache()
        print(common.format_table(rows[-1:], COLUMNS), flush=True)
    print(common.format_table(rows, COLUMNS))
    gpu = torch.cuda.get_device_name(device)
    result = {"env": common.environment(), "copy_GB/s": copy_gbs, "rows": rows}
    if args.output_dir:
        path = common.write_json(Path(args.output_dir) / f"gemv-{common.gpu_slug(gpu)}.json",
                                 result)
        print(f"wrote {path}")
    configs_dir = resolve_configs_dir(args)
    if configs_dir is not None:
        from fuselm.bench.kernels import configs_note, write_tuning_tables

        table = {"gemv": tuning_table(rows, args.margin)}
        print(f"wrote {write_tuning_tables(table, gpu, configs_dir)[0]}")
        print(configs_note(configs_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
